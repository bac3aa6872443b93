//! A desktop's firmware state on the real libvirt daemon (qemu:///system, TCG), with the
//! windows11 profile (OVMF with Secure Boot, TPM 2.0 by swtpm): a persistent desktop keeps
//! its UEFI variable store and its TPM state through an update, a pool restart and a
//! rollback; a non-persistent desktop gets fresh ones at logoff. Both are removed with the
//! desktop.
//!
//! What the test reads: OVMF raises its `MTC` variable once per boot, so the store's boot
//! count grows while the store is kept and starts over in a fresh one; the swtpm state lives
//! in libvirt's directory named by the domain's UUID, where the test leaves a marker file
//! that only survives if libvirt never removed that directory.

mod common;
use common::efi;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MARKER: &str = "vdim-test-marker";

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh").args(["-c", "qemu:///system"]).args(args).output().expect("run virsh");
    assert!(out.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The boot count once OVMF has written one above `above` and it has stayed put for 3 s
/// (the firmware finished its start), waiting up to 3 minutes.
fn settled_boot_count(nvram: &Path, above: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut last, mut since) = (None, Instant::now());
    loop {
        let now = efi::boot_count(nvram);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        match last {
            Some(n) if n > above && since.elapsed() >= Duration::from_secs(3) => return n,
            _ => assert!(Instant::now() < deadline, "{nvram:?}: boot count {last:?}, waited for one above {above}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Removes whatever swtpm state directories the test saw, however it ends (libvirt removes
/// them with the domain; this is for a test that failed half-way).
struct StateDirs(std::cell::RefCell<Vec<PathBuf>>);

impl Drop for StateDirs {
    fn drop(&mut self) {
        for d in self.0.borrow().iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct Desktop<'a> {
    dirs: &'a StateDirs,
    name: String,
    nvram: PathBuf,
}

impl Desktop<'_> {
    fn uuid(&self) -> String {
        virsh(&["domuuid", &self.name])
    }

    /// The domain's swtpm state directory, once swtpm has written the TPM's state there.
    fn tpm_state(&self) -> PathBuf {
        let dir = efi::swtpm_state_dir(&self.uuid());
        self.dirs.0.borrow_mut().push(dir.clone());
        let permall = dir.join("tpm2/tpm2-00.permall");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !permall.is_file() {
            assert!(Instant::now() < deadline, "{}: no TPM state in {dir:?}", self.name);
            std::thread::sleep(Duration::from_millis(250));
        }
        dir
    }

    fn running(&self) -> bool {
        virsh(&["domstate", &self.name]) == "running"
    }
}

/// An image of the disk `esp_disk` makes, at windows11's minimum.
fn windows_image(t: &LibvirtEnv) {
    let raw = t.env.path("win.raw");
    efi::esp_disk(&raw, "win", 64 << 30);
    t.env.vdim_json(&["image", "import", "win", raw.to_str().unwrap()]);
}

/// Version 2 of the image, on the dev channel.
fn seal_v2(t: &LibvirtEnv) {
    let draft = t.env.vdim_json(&["image", "edit", "win"]);
    qemu_io_write(Path::new(draft["draft"].as_str().unwrap()), 0x5a, 40 << 20, 4096);
    t.env.vdim_json(&["image", "seal", "win", "--note", "v2"]);
}

fn desktop<'a>(t: &'a LibvirtEnv, dirs: &'a StateDirs, pool: &str) -> Desktop<'a> {
    let name = format!("vdim-{pool}-001");
    let nvram = t.env.home().join("desktops").join(pool).join(format!("{name}.nvram"));
    Desktop { dirs, name, nvram }
}

#[test]
fn a_persistent_desktop_keeps_its_nvram_and_tpm_state_through_update_restart_and_rollback() {
    let t = LibvirtEnv::new("fwp");
    let dirs = StateDirs(Default::default());
    windows_image(&t);
    let pool = t.pool_name("p");
    t.create_pool(&pool, "win", "dev", 1, "windows11", &["--persistent", "--start"]);
    let d = desktop(&t, &dirs, &pool);
    let uuid = d.uuid();
    let state = d.tpm_state();
    std::fs::write(state.join(MARKER), "written by the test").expect("marker");
    let mut boots = settled_boot_count(&d.nvram, 0);
    seal_v2(&t);

    let steps: [&[&str]; 4] = [
        &["pool", "update", &pool, "--force"],
        &["pool", "stop", &pool, "--force"],
        &["pool", "start", &pool],
        &["rollback", &pool, "--force"],
    ];
    for (i, step) in steps.into_iter().enumerate() {
        t.vdim_json(step);
        let version = &t.vdim_json(&["pool", "show", &pool])["desktops"][0]["version"];
        assert_eq!(version, if i < 3 { 2 } else { 1 }, "after {step:?}");
        assert_eq!(d.uuid(), uuid, "after {step:?}: the domain keeps its UUID");
        assert!(state.join(MARKER).is_file(), "after {step:?}: the TPM state directory was replaced");
        assert!(state.join("tpm2/tpm2-00.permall").is_file(), "after {step:?}: no TPM state");
        if d.running() {
            let now = settled_boot_count(&d.nvram, boots);
            assert!(now > boots, "after {step:?}: the same variable store counts on");
            boots = now;
        } else {
            assert_eq!(efi::boot_count(&d.nvram), Some(boots), "after {step:?}: the store is kept while off");
        }
    }

    t.vdim(&["pool", "delete", &pool, "--force"]).assert_success();
    assert!(!state.exists(), "the TPM state goes with the desktop");
    assert!(!d.nvram.exists(), "the NVRAM goes with the desktop");
}

#[test]
fn a_non_persistent_desktop_gets_fresh_nvram_and_tpm_state_at_logoff() {
    let t = LibvirtEnv::new("fwn");
    let dirs = StateDirs(Default::default());
    windows_image(&t);
    let pool = t.pool_name("n");
    t.create_pool(&pool, "win", "prod", 1, "windows11", &["--start"]);
    let d = desktop(&t, &dirs, &pool);
    let first_boot = settled_boot_count(&d.nvram, 0);
    let state = d.tpm_state();
    std::fs::write(state.join(MARKER), "written by the test").expect("marker");
    // A restart is no reset: the same store counts on.
    t.vdim_json(&["pool", "stop", &pool, "--force"]);
    t.vdim_json(&["pool", "start", &pool]);
    let before = settled_boot_count(&d.nvram, first_boot);
    assert!(state.join(MARKER).is_file(), "a restart keeps the TPM state");

    t.vdim_json(&["pool", "assign", &pool, "alice"]);
    t.vdim_json(&["pool", "release", &d.name]);
    assert!(d.running(), "booted again after logoff");
    let after = settled_boot_count(&d.nvram, 0);
    assert_eq!(after, first_boot, "a fresh variable store counts its first boot (was {before})");
    // The desktop keeps its UUID (its identity), so swtpm may use the same directory again:
    // made anew, without the marker.
    let fresh = d.tpm_state();
    assert!(!fresh.join(MARKER).exists(), "the old TPM state is gone, a fresh one made");
    let mode = std::fs::metadata(&d.nvram).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "{:?}", d.nvram);

    t.vdim(&["pool", "delete", &pool, "--force"]).assert_success();
    assert!(!fresh.exists() && !d.nvram.exists(), "removed with the desktop");
}
