//! Every shipped hardware profile's domain XML against libvirt itself: its schema
//! (virt-xml-validate), a define on the real daemon, and a Windows 11 domain booting under
//! TCG with secure boot and a TPM. These need libvirt's tools and daemon, so they live here
//! rather than in the fast tier (`cargo test --lib`), which checks the XML's content.

use std::path::{Path, PathBuf};
use std::process::Command;
use vdim::hypervisor::domain_xml::{domain_xml, DesktopSpec, VirtType};
use vdim::profile::Profile;

const URI: &str = "qemu:///system";

fn profiles_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/images/profiles"))
}

/// Every profile vdim ships (images/profiles/*.toml), by name.
fn shipped() -> Vec<Profile> {
    let mut names: Vec<String> = std::fs::read_dir(profiles_dir())
        .expect("profiles dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "shipped profiles: {names:?}");
    names.iter().map(|n| Profile::load(&profiles_dir(), n).unwrap_or_else(|e| panic!("{e}"))).collect()
}

/// A desktop of pool `finance` as the pool service would describe it, on `files` (disk, serial log, NVRAM).
fn spec<'a>(profile: &Profile, name: &'a str, files: &'a (PathBuf, PathBuf, PathBuf)) -> DesktopSpec<'a> {
    DesktopSpec {
        name,
        uuid: None,
        disk: &files.0,
        serial_log: profile.wants_serial_log().then_some(files.1.as_path()),
        nvram: profile.uses_uefi().then_some(files.2.as_path()),
        config_drive: None,
        graphics_password: "s3cret-ticket",
        listen: "127.0.0.1",
        display_tls: false,
        pool: "finance",
        version: 7,
    }
}

fn files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join(format!("{name}.qcow2")), dir.join(format!("{name}.serial.log")), dir.join(format!("{name}_VARS.fd")))
}

/// Runs `virsh -c qemu:///system` with a timeout; returns (success, stdout + stderr).
fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout").arg("120").args(["virsh", "-c", URI]).args(args).output().expect("run virsh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[track_caller]
fn assert_daemon() {
    let (ok, text) = virsh(&["version"]);
    assert!(ok, "libvirtd does not answer on {URI} (run scripts/setup-host): {text}");
}

/// `vdimtest-prof-<pid>-<nanos>-<tag>`: unique across tests and runs.
fn unique_name(tag: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("vdimtest-prof-{}-{nanos}-{tag}", std::process::id())
}

/// Destroys and undefines the test domain (with its NVRAM and TPM state) when dropped.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", "--nvram", "--tpm", &self.0]);
    }
}

/// Whether an swtpm process serves `domain` (its socket path carries the domain name).
fn swtpm_running_for(domain: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&raw);
        let program = cmdline.split('\0').next().unwrap_or("");
        program.rsplit('/').next() == Some("swtpm") && cmdline.contains(domain)
    })
}

#[test]
fn every_profile_validates_against_libvirt_schema() {
    assert!(
        Command::new("sh").args(["-c", "command -v virt-xml-validate"]).output().is_ok_and(|o| o.status.success()),
        "virt-xml-validate is missing: run scripts/setup-host (libvirt-clients, libxml2-utils)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = files(Path::new("/var/lib/vdim/desktops/finance"), "vdim-finance-001");
    for profile in shipped() {
        for virt in [VirtType::Kvm, VirtType::Qemu] {
            let mut spec = spec(&profile, "vdim-finance-001", &paths);
            spec.uuid = Some("0b9e3c47-5f0e-4b4e-9d43-2b8f27f1c0aa");
            // With a config drive (identity): its CD-ROM must pass the schema too.
            spec.config_drive = Some(Path::new("/var/lib/vdim/run/finance/vdim-finance-001.config.iso"));
            let out = domain_xml(&profile, virt, &spec).expect("domain XML");
            let file = dir.path().join(format!("{}-{}.xml", profile.name(), virt.as_str()));
            std::fs::write(&file, &out).expect("write XML");
            let result =
                Command::new("virt-xml-validate").arg(&file).arg("domain").output().expect("run virt-xml-validate");
            assert!(
                result.status.success(),
                "{} ({virt:?}) rejected: {}{}\n{out}",
                profile.name(),
                String::from_utf8_lossy(&result.stdout),
                String::from_utf8_lossy(&result.stderr)
            );
        }
    }
}

#[test]
fn every_profile_defines_on_the_real_daemon() {
    assert_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    for profile in shipped() {
        let name = unique_name(profile.name());
        let paths = files(dir.path(), &name);
        let out = domain_xml(&profile, VirtType::Qemu, &spec(&profile, &name, &paths)).expect("domain XML");
        let xml_path = dir.path().join(format!("{name}.xml"));
        std::fs::write(&xml_path, &out).expect("write XML");
        let (ok, text) = virsh(&["define", xml_path.to_str().expect("utf-8 temp path")]);
        let _guard = DomainGuard(name.clone());
        assert!(ok, "{}: define failed: {text}\n{out}", profile.name());
        let (ok, state) = virsh(&["domstate", &name]);
        assert!(ok && state.trim() == "shut off", "{}: {state}", profile.name());
        let (ok, stored) = virsh(&["dumpxml", "--inactive", &name]);
        assert!(ok, "dumpxml failed: {stored}");
        assert!(stored.contains("<vdim:pool>finance</vdim:pool>"), "{}: metadata lost: {stored}", profile.name());
        assert!(stored.contains(&paths.0.display().to_string()), "{}: disk lost: {stored}", profile.name());
    }
}

#[test]
fn windows11_domain_runs_under_tcg_with_secure_boot_and_swtpm() {
    assert_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    let nvram = dir.path().join("VARS.fd");
    let made =
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("1G").status().expect("qemu-img");
    assert!(made.success(), "qemu-img create failed");
    let name = unique_name("w11");
    let profile = Profile::load(&profiles_dir(), "windows11").expect("windows11");
    let spec = DesktopSpec {
        name: &name,
        uuid: None,
        disk: &disk,
        serial_log: None,
        nvram: Some(&nvram),
        config_drive: None,
        graphics_password: "e2e-ticket",
        listen: "127.0.0.1",
        display_tls: false,
        pool: "e2e",
        version: 1,
    };
    let out = domain_xml(&profile, VirtType::Qemu, &spec).expect("domain XML");
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, &out).expect("write XML");

    let (ok, text) = virsh(&["define", xml_path.to_str().expect("utf-8 temp path")]);
    assert!(ok, "define failed: {text}\n{out}");
    let _guard = DomainGuard(name.clone());
    let (ok, text) = virsh(&["start", &name]);
    assert!(ok, "start failed: {text}\n{out}");

    // Let OVMF run for a moment: a firmware that kills QEMU would show here.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (ok, state) = virsh(&["domstate", &name]);
    assert!(ok && state.trim() == "running", "domstate: {state}");
    assert!(swtpm_running_for(&name), "no swtpm process for {name}");
    let (ok, live) = virsh(&["dumpxml", &name]);
    assert!(ok, "dumpxml failed: {live}");
    let loader =
        live.lines().find(|l| l.contains("<loader")).unwrap_or_else(|| panic!("no loader in live XML: {live}"));
    assert!(loader.contains("secure='yes'"), "{loader}");
    assert!(live.contains("<entry name='serial'>"), "{live}");
    assert!(nvram.exists(), "libvirt did not create the NVRAM file");
}
