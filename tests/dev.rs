//! The dev desktop on real libvirt: a draft booted for patching, never sealed while it runs.

mod common;
use common::*;

#[test]
fn a_dev_desktop_boots_the_draft_and_seal_waits_for_its_shutdown() {
    let t = LibvirtEnv::new("dev");
    // Images named with the test's prefix so the guard's sweep finds the dev domain too.
    let image = t.prefix.clone();
    marker_image(&t.env, &image, "dev-v1");
    // The "patch", written before the dev desktop boots (QEMU locks a draft it runs on).
    let d = t.vdim_json(&["image", "edit", &image]);
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x61 4M 64k", d["draft"].as_str().unwrap()]);
    let r = t.vdim_json(&["image", "edit", &image, "--start", "--profile", "test-linux"]);
    assert_eq!(r["draft"], d["draft"], "--start boots the existing draft");
    let dd = &r["dev_desktop"];
    let domain = dd["domain"].as_str().unwrap().to_string();
    assert_eq!(domain, format!("vdim-dev-{image}-draft"));
    assert!(r["draft"].as_str().unwrap().ends_with(".qcow2"));
    let consoles = dd["consoles"].as_array().unwrap();
    assert!(
        consoles.iter().any(|c| c["kind"] == "spice"
            && c["port"].as_u64().unwrap() > 0
            && c["password"].as_str().unwrap().len() >= 16),
        "{dd}"
    );
    // The guest boots from the draft: it shows the base version's marker.
    let log = std::path::PathBuf::from(dd["serial_log"].as_str().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        if text.contains("GUEST-MARKER: VDIM-TEST dev-v1 health=ok") && text.contains("GUEST: healthy") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "dev desktop never booted: {text}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    // While it runs, QEMU holds the draft's write lock: nothing else can change it.
    let busy = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x62 0 512", r["draft"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(!busy.status.success(), "a running dev desktop's draft must be locked");
    t.vdim(&["image", "seal", &image]).assert_failure().assert_stderr_contains("is running and writing to the draft");
    assert_eq!(t.vdim_json(&["image", "history", &image])["versions"].as_array().unwrap().len(), 1, "nothing sealed");
    let s = t.vdim_json(&["image", "seal", &image, "--shutdown", "--shutdown-timeout", "90s", "--note", "patched"]);
    assert_eq!(s["number"], 2);
    assert!(
        t.domains().iter().all(|d| d != &domain) && !dev_domain_exists(&domain),
        "the dev desktop goes with its draft"
    );
}

fn dev_domain_exists(domain: &str) -> bool {
    std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "dominfo", domain])
        .output()
        .unwrap()
        .status
        .success()
}
