//! Hostile imports through the real `vdim` binary: a VMDK that QEMU reads as a different
//! file than vdim does, a source swapped between inspection and conversion, and an
//! expansion bomb on a small tmpfs store.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fake `qemu-img` first on PATH: logs every call, runs `first_call` (shell) once before
/// the first one, then execs the real qemu-img.
fn spy_qemu_img(env: &Env, first_call: &str) -> (String, PathBuf) {
    let bin = env.path("spybin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = env.path("qemu-img.calls");
    let flag = env.path("spy.first-done");
    let script = format!(
        "#!/bin/sh\nif [ ! -e {flag} ]; then : > {flag}; {first_call}; fi\necho \"$@\" >> {log}\nexec /usr/bin/qemu-img \"$@\"\n",
        flag = flag.display(),
        log = log.display(),
    );
    let p = bin.join("qemu-img");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    (format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()), log)
}

/// The guest-visible bytes of a stored layer.
fn layer_bytes(env: &Env, layer: &Path) -> Vec<u8> {
    let out = env.path(&format!("{}.raw", layer.file_name().unwrap().to_string_lossy()));
    sh("qemu-img", &["convert", "-q", "-f", "qcow2", "-O", "raw", layer.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Write `pattern` bytes into a raw file in place.
fn qemu_io_write_raw(path: &Path, pattern: u8, offset: u64, len: u64) {
    sh("qemu-io", &["-f", "raw", "-c", &format!("write -P {pattern} {offset} {len}"), path.to_str().unwrap()]);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const SECRET: &[u8] = b"HOST-SECRET-7f3a9c: this line must never reach a layer";

/// CVE-2022-47951's shape against vdim: a sparse VMDK header with capacity 0, so QEMU reads
/// the embedded text at sector 1 as a whole descriptor *file*. The text is built so vdim's
/// old line-based reading saw a monolithicSparse with one SPARSE extent, while QEMU finds
/// `createType` as a substring (the comment line) and reads an extent line across a
/// newline with sscanf: a FLAT extent on a host file.
fn capacity_zero_vmdk(secret: &Path) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, b"KDMV"); // magic
    put(4, &1u32.to_le_bytes()); // version
    put(8, &1u32.to_le_bytes()); // flags: newline detection
    put(12, &0u64.to_le_bytes()); // capacity: 0 sectors -> QEMU re-reads the descriptor
    put(20, &128u64.to_le_bytes()); // grain size (sectors)
    put(28, &1u64.to_le_bytes()); // descriptor offset: sector 1
    put(36, &20u64.to_le_bytes()); // descriptor size: 20 sectors
    put(44, &512u32.to_le_bytes()); // grain table entries per grain table
    put(56, &21u64.to_le_bytes()); // grain directory offset
    put(64, &128u64.to_le_bytes()); // first grain offset
    put(73, b"\n \r\n"); // newline check bytes
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         #createType=\"monolithicFlat\"\ncreateType=\"monolithicSparse\"\n\
         RDONLY 2048 SPARSE \"evil.vmdk\"\nRW\n2048 FLAT \"{}\" 0\n",
        secret.display()
    );
    put(512, text.as_bytes());
    b
}

#[test]
fn a_capacity_zero_vmdk_naming_a_host_file_is_refused_before_qemu_img_runs() {
    let env = Env::new();
    let secret = env.path("host-secret.bin");
    let mut s = SECRET.to_vec();
    s.resize(1 << 20, b'.');
    std::fs::write(&secret, &s).unwrap();
    let evil = env.path("evil.vmdk");
    std::fs::write(&evil, capacity_zero_vmdk(&secret)).unwrap();
    let (path, log) = spy_qemu_img(&env, ":");

    let out = env
        .cmd()
        .env("PATH", &path)
        .args(["--json", "image", "import", "evil", evil.to_str().unwrap()])
        .output()
        .unwrap();
    if out.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let leaked = contains(&layer_bytes(&env, Path::new(r["path"].as_str().unwrap())), SECRET);
        panic!("the crafted VMDK was imported (host file's bytes in the layer: {leaked}): {r}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(evil.to_str().unwrap()), "the message names the file: {err}");
    assert!(err.contains("capacity"), "the message says what is wrong: {err}");
    assert!(!log.exists(), "qemu-img ran on the crafted VMDK: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(env.store_files().is_empty(), "{:?}", env.store_files());
    env.vdim(&["image", "history", "evil"]).assert_exit_code(4);
}

#[test]
fn a_source_swapped_after_inspection_never_reaches_the_layer() {
    let env = Env::new();
    let src = env.path("drop/win.raw");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    marker_raw(&src, "original", "ok", 2 << 20);
    let reference = env.path("reference.raw");
    std::fs::copy(&src, &reference).unwrap();
    let hostile = env.path("hostile.raw");
    let mut h = SECRET.to_vec();
    h.resize(2 << 20, b'!');
    std::fs::write(&hostile, &h).unwrap();
    // Whoever controls the drop folder swaps the file the moment vdim hands it to qemu-img.
    let modes = env.path("modes");
    let swap = format!(
        "mv -f {} {}; for last; do :; done; stat -c '%a' \"$(dirname \"$last\")\" \"$last\" > {}",
        hostile.display(),
        src.display(),
        modes.display()
    );
    let (path, log) = spy_qemu_img(&env, &swap);

    let out = env
        .cmd()
        .env("PATH", &path)
        .args(["--json", "image", "import", "win", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(std::fs::read(&src).unwrap().starts_with(SECRET), "the spy swapped the source");
    assert!(log.exists(), "qemu-img ran");
    if out.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let layer = layer_bytes(&env, Path::new(r["path"].as_str().unwrap()));
        assert!(!contains(&layer, SECRET), "the swapped-in file was imported");
        assert_eq!(layer, std::fs::read(&reference).unwrap(), "the layer holds the inspected bytes");
        assert_eq!(env.store_files().len(), 1, "only the layer is left: {:?}", env.store_files());
    } else {
        assert!(env.store_files().is_empty(), "{:?}", env.store_files());
    }
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(!calls.contains(src.to_str().unwrap()), "qemu-img was handed the source path itself: {calls}");
    let modes = std::fs::read_to_string(&modes).unwrap();
    assert_eq!(modes.split_whitespace().collect::<Vec<_>>(), ["700", "600"], "a private copy in a private directory");
}

#[test]
fn monolithic_sparse_and_stream_optimized_vmdks_made_by_qemu_img_still_import() {
    let env = Env::new();
    let raw = env.path("disk.raw");
    marker_raw(&raw, "vmdk", "ok", 8 << 20);
    qemu_io_write_raw(&raw, 0x5c, 1 << 20, 1 << 20);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let src = env.path(&format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        sh(
            "qemu-img",
            &["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", &opt, raw.to_str().unwrap(), src.to_str().unwrap()],
        );
        let r = env.vdim_json(&["image", "import", &sub.to_lowercase(), src.to_str().unwrap()]);
        assert_eq!(r["virtual_size"], 8 << 20, "{sub}: {r}");
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2", raw.to_str().unwrap(), r["path"].as_str().unwrap()])
            .status()
            .unwrap();
        assert!(same.success(), "{sub}: the layer holds the disk's data");
    }
    // The same data converts to the same layer, stored once; no work files are left.
    assert_eq!(env.store_files().len(), 1, "{:?}", env.store_files());
}

/// Even when `qemu-img measure` is wrong, convert cannot write past what was checked.
#[test]
fn convert_runs_under_an_output_size_limit_from_the_measurement() {
    let env = Env::new();
    let raw = env.path("data.raw");
    std::fs::write(&raw, vec![0x77u8; 48 << 20]).unwrap();
    // A measure that predicts 1 MiB for 48 MiB of data.
    let lie = "case \"$1\" in measure) echo '{\"required\": 1048576, \"fully-allocated\": 1048576}'; exit 0;; esac";
    let (path, log) = spy_qemu_img(&env, ":");
    let script = std::fs::read_to_string(env.path("spybin/qemu-img")).unwrap();
    let script = script.replacen("echo \"$@\"", &format!("{lie}\necho \"$@ fsize=$(ulimit -f)\""), 1);
    std::fs::write(env.path("spybin/qemu-img"), script).unwrap();

    let out = env.cmd().env("PATH", &path).args(["image", "import", "capped", raw.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the import ran past its measured size");
    assert!(err.contains("size qemu-img measure predicted"), "the message says the output limit stopped it: {err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    let convert = calls.lines().find(|l| l.starts_with("convert")).expect("convert ran");
    // ulimit -f counts 512-byte blocks: 1 MiB + 1/64 + 16 MiB of slack.
    let blocks: u64 = convert.rsplit("fsize=").next().unwrap().trim().parse().unwrap_or_else(|_| panic!("{convert}"));
    assert_eq!(blocks * 512, (1 << 20) + (1 << 20) / 64 + (16 << 20), "{convert}");
    assert!(env.store_files().is_empty(), "{:?}", env.store_files());
    env.vdim(&["image", "history", "capped"]).assert_exit_code(4);
}

/// A 2 GiB qcow2 of one compressed 64 KiB cluster of 0x41, repeated through every L2 entry:
/// a few hundred KiB on disk, 2 GiB of data when converted.
fn expansion_bomb(path: &Path) {
    sh("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "2G"]);
    let p = path.to_str().unwrap();
    // One compressed cluster in each of the four L2 tables (each maps 512 MiB).
    for at in ["0", "512M", "1G", "1536M"] {
        sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -c -P 0x41 {at} 64k"), p]);
    }
    let mut b = std::fs::read(path).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap()) as usize;
    let l1 = be64(&b, 40) as usize;
    assert_eq!(l1_size, 4, "64 KiB clusters: four L2 tables cover 2 GiB");
    for i in 0..l1_size {
        let l2 = (be64(&b, l1 + i * 8) & 0x00ff_ffff_ffff_fe00) as usize;
        let entry: [u8; 8] = b[l2..l2 + 8].try_into().unwrap();
        assert!(entry[0] & 0x40 != 0, "L2 entry 0 is a compressed cluster");
        for e in 1..8192 {
            b[l2 + e * 8..l2 + e * 8 + 8].copy_from_slice(&entry);
        }
    }
    std::fs::write(path, b).unwrap();
}

fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes only into the zeroed struct it is given; `c` is a C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

#[test]
fn an_expansion_bomb_is_measured_and_refused_without_touching_free_space() {
    let env = Env::new();
    let small = env.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=192m", "tmpfs", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success(), "this test needs root to mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let home = small.join("home");
    let vdim = || {
        let mut c = env.cmd();
        c.env("VDIM_HOME", &home);
        c
    };
    assert!(vdim().arg("init").output().unwrap().status.success());

    let bomb = env.path("bomb.qcow2");
    expansion_bomb(&bomb);
    let on_disk = std::fs::metadata(&bomb).unwrap().len();
    assert!(on_disk < 4 << 20, "the bomb is small on disk: {on_disk} bytes");
    let measured = sh("qemu-img", &["measure", "--output=json", "-f", "qcow2", "-O", "qcow2", bomb.to_str().unwrap()]);
    let need: serde_json::Value = serde_json::from_slice(&measured.stdout).unwrap();
    assert!(need["required"].as_u64().unwrap() > 2 << 30, "it expands to 2 GiB: {need}");

    let start = free_bytes(&small);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = {
        let (done, small) = (done.clone(), small.clone());
        std::thread::spawn(move || {
            let mut min = u64::MAX;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                min = min.min(free_bytes(&small));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            min
        })
    };
    let out = vdim().args(["image", "import", "bomb", bomb.to_str().unwrap()]).output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let min = poll.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bomb was imported");
    // The private copy of the (small) source is all the import may take, briefly.
    assert!(
        min + on_disk + (4 << 20) >= start,
        "free space dropped from {start} to {min} bytes during the refused import"
    );
    assert!(err.contains(bomb.to_str().unwrap()), "the message names the image: {err}");
    let number_after = |word: &str| -> u64 {
        let at = err.find(word).unwrap_or_else(|| panic!("no {word:?} in {err}")) + word.len();
        err[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
    };
    assert!(number_after(" needs ") > 2 << 30, "the message gives the bytes needed: {err}");
    let free = number_after(" only ");
    assert!(free <= start && free + on_disk + (4 << 20) >= start, "the message gives the free bytes: {err}");
    assert_eq!(std::fs::read_dir(home.join("layers")).unwrap().count(), 0, "no partial layer, no copy left");
    assert!(!vdim().args(["image", "history", "bomb"]).output().unwrap().status.success());
    assert!(free_bytes(&small) + (1 << 20) >= start, "the store is back to its free space");
}
