//! UEFI fixtures for tests of the firmware profiles: a disk whose EFI system partition holds
//! an unsigned boot loader that powers the machine off, and a reader for OVMF's boot counter
//! in a desktop's variable store. Built by the test (mtools for the FAT), nothing in git.

use super::sh;
use std::path::Path;

const SECTOR: usize = 512;
/// The EFI system partition starts at 1 MiB, as partitioning tools place it.
const ESP_START_LBA: u32 = 2048;

/// A minimal unsigned x86-64 EFI application (PE32+, subsystem 10) whose whole program is
/// `SystemTable->RuntimeServices->ResetSystem(EfiResetShutdown, EFI_SUCCESS, 0, NULL)`.
/// A firmware that runs it powers the domain off; one enforcing Secure Boot refuses to load
/// it, having no signature to verify.
pub fn poweroff_efi_app() -> Vec<u8> {
    let code: &[u8] = &[
        0x48, 0x83, 0xec, 0x28, //       sub  rsp, 0x28        (shadow space, alignment)
        0x48, 0x8b, 0x42, 0x58, //       mov  rax, [rdx+0x58]  (SystemTable->RuntimeServices)
        0xb9, 0x02, 0x00, 0x00, 0x00, // mov  ecx, 2           (EfiResetShutdown)
        0x31, 0xd2, //                   xor  edx, edx         (EFI_SUCCESS)
        0x45, 0x31, 0xc0, //             xor  r8d, r8d         (DataSize 0)
        0x45, 0x31, 0xc9, //             xor  r9d, r9d         (ResetData NULL)
        0xff, 0x50, 0x68, //             call [rax+0x68]       (->ResetSystem)
        0xeb, 0xfe, //                   jmp  $
    ];
    let mut pe = vec![0u8; 0x400];
    pe[0..2].copy_from_slice(b"MZ");
    pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes()); // e_lfanew
    let mut h = b"PE\0\0".to_vec();
    // COFF: x86-64, one section, 240-byte optional header, executable + large-address-aware.
    for (v, n) in [(0x8664u64, 2), (1, 2), (0, 4), (0, 4), (0, 4), (240, 2), (0x22, 2)] {
        h.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    // PE32+ optional header: code at RVA 0x1000, image base 0x10000000, EFI application.
    let fields: &[(u64, usize)] = &[
        (0x20b, 2), // magic
        (0, 1),
        (0, 1),
        (0x200, 4),       // size of code
        (0, 4),           // initialised data
        (0, 4),           // uninitialised data
        (0x1000, 4),      // entry point
        (0x1000, 4),      // base of code
        (0x1000_0000, 8), // image base
        (0x1000, 4),      // section alignment
        (0x200, 4),       // file alignment
        (0, 2),
        (0, 2),
        (0, 2),
        (0, 2),
        (0, 2),
        (0, 2),
        (0, 4),      // win32 version
        (0x2000, 4), // size of image
        (0x200, 4),  // size of headers
        (0, 4),      // checksum
        (10, 2),     // subsystem: EFI application
        (0, 2),      // DLL characteristics
        (0, 8),      // stack reserve
        (0, 8),      // stack commit
        (0, 8),      // heap reserve
        (0, 8),      // heap commit
        (0, 4),      // loader flags
        (16, 4),     // data directories, all empty (no relocations, no signature)
    ];
    for &(v, n) in fields {
        h.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    h.extend_from_slice(&[0u8; 128]);
    // Section .text: 0x200 bytes at RVA 0x1000, file offset 0x200, code | execute | read.
    h.extend_from_slice(b".text\0\0\0");
    for v in [0x200u32, 0x1000, 0x200, 0x200, 0, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&[0u8; 4]);
    h.extend_from_slice(&0x6000_0020u32.to_le_bytes());
    pe[0x40..0x40 + h.len()].copy_from_slice(&h);
    pe[0x200..0x200 + code.len()].copy_from_slice(code);
    pe
}

/// A raw disk of `size` bytes (at least 34 MiB) that every shipped profile can boot: it starts
/// with the test guest's marker `VDIM-TEST <label> health=ok` (the direct-kernel guest reads it),
/// has an MBR whose one partition (type EF, at 1 MiB, 32 MiB) is a FAT file system holding
/// [`poweroff_efi_app`] as `\EFI\BOOT\BOOTX64.EFI`, the path UEFI firmware boots by default.
pub fn esp_disk(path: &Path, label: &str, size: u64) {
    let dir = path.parent().expect("disk has a directory");
    let app = dir.join("BOOTX64.EFI");
    std::fs::write(&app, poweroff_efi_app()).expect("write EFI app");
    let esp_sectors: u32 = 32 * 2048;
    let fat = dir.join("esp.fat");
    let _ = std::fs::remove_file(&fat);
    let fat_s = fat.to_str().expect("utf-8 path");
    sh("mformat", &["-i", fat_s, "-C", "-T", &esp_sectors.to_string(), "-h", "64", "-s", "32", "::"]);
    sh("mmd", &["-i", fat_s, "::/EFI", "::/EFI/BOOT"]);
    sh("mcopy", &["-i", fat_s, app.to_str().expect("utf-8 path"), "::/EFI/BOOT/BOOTX64.EFI"]);

    let mut mbr = format!("VDIM-TEST {label} health=ok").into_bytes();
    mbr.resize(SECTOR, 0);
    // Partition entry 1 at 446: not active, CHS "beyond 8 GB", type EF (EFI system), LBA extent.
    let mut entry = vec![0x00, 0xfe, 0xff, 0xff, 0xef, 0xfe, 0xff, 0xff];
    entry.extend_from_slice(&ESP_START_LBA.to_le_bytes());
    entry.extend_from_slice(&esp_sectors.to_le_bytes());
    mbr[446..462].copy_from_slice(&entry);
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);

    let mut disk = mbr;
    disk.resize(ESP_START_LBA as usize * SECTOR, 0);
    disk.extend_from_slice(&std::fs::read(&fat).expect("read FAT image"));
    std::fs::write(path, &disk).expect("write disk");
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open disk");
    f.set_len(size.max(disk.len() as u64)).expect("size disk");
}

/// OVMF's boot counter: the live `MTC` variable (MonotonicCounterRuntimeDxe raises it once
/// per boot) in a variable store file, or `None` when the store has none (never booted).
/// The store is a log: old values stay behind as deleted records, the one with state
/// VAR_ADDED (0x3f) is current. Records use the authenticated header (60 bytes).
pub fn boot_count(vars: &Path) -> Option<u32> {
    let b = std::fs::read(vars).ok()?;
    let name: Vec<u8> = "MTC\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut found = None;
    let mut at = 0;
    while let Some(i) = b[at..].windows(name.len()).position(|w| w == name.as_slice()).map(|p| p + at) {
        at = i + 1;
        let Some(h) = i.checked_sub(60) else { continue };
        let start_id = u16::from_le_bytes([b[h], b[h + 1]]);
        let state = b[h + 2];
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let (name_size, data_size) = (u32_at(h + 36) as usize, u32_at(h + 40) as usize);
        if start_id == 0x55aa && state == 0x3f && name_size == name.len() && data_size == 4 {
            found = Some(u32_at(i + name_size));
        }
    }
    found
}

/// libvirt's swtpm state directory of a domain (by UUID) on this host.
pub fn swtpm_state_dir(uuid: &str) -> std::path::PathBuf {
    Path::new("/var/lib/libvirt/swtpm").join(uuid)
}
