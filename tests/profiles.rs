//! Every shipped hardware profile against libvirt itself. Each profile in images/profiles/
//! (enumerated, so a new profile is covered without touching this file): its domain XML
//! passes libvirt's schema (virt-xml-validate) and defines on the real daemon; a 1-desktop
//! pool of it boots under TCG (qemu:///system), its live XML checked (loader, Secure Boot,
//! NVRAM, TPM); a disk whose EFI system partition holds an unsigned loader that powers the
//! machine off boots under UEFI without Secure Boot (the positive control) and is refused
//! under Secure Boot. A profile's minimum disk size is enforced by `pool create`. These need
//! libvirt's tools and daemon, so they live here rather than in the fast tier
//! (`cargo test --lib`), which checks the XML's content.

mod common;
use common::efi;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vdim::hypervisor::domain_xml::{domain_xml, DesktopSpec, VirtType};
use vdim::profile::{Firmware, Profile};

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

fn domstate(domain: &str) -> String {
    virsh(&["domstate", "--reason", domain]).1.trim().to_string()
}

/// The text of the first `<tag …>text</tag>` in `xml`.
fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}"))?;
    let rest = &xml[start..];
    let open_end = rest.find('>')? + 1;
    let close = rest.find(&format!("</{tag}>"))?;
    Some(&rest[open_end..close])
}

fn line_with<'a>(xml: &'a str, needle: &str) -> &'a str {
    xml.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle} in:\n{xml}"))
}

struct Booted {
    profile: Profile,
    desktop: String,
    started: Instant,
    nvram: Option<PathBuf>,
}

#[test]
fn every_shipped_profile_defines_and_boots_and_secure_boot_refuses_an_unsigned_loader() {
    let t = LibvirtEnv::new("prof");
    let profiles = shipped();
    assert!(profiles.len() >= 5, "the shipped profiles: {:?}", profiles.iter().map(Profile::name).collect::<Vec<_>>());
    // `vdim init` puts exactly these files in the home (they are built into the binary).
    for p in &profiles {
        let installed = t.env.home().join("profiles").join(format!("{}.toml", p.name()));
        assert_eq!(
            std::fs::read_to_string(&installed).ok(),
            std::fs::read_to_string(p.path()).ok(),
            "vdim init does not install {} as shipped (profile::SHIPPED)",
            p.path().display()
        );
    }
    let uefi = |p: &Profile| p.uses_uefi();
    let secure = |p: &Profile| p.firmware() == Firmware::UefiSecure;
    assert!(
        !profiles.iter().any(secure) || profiles.iter().any(|p| uefi(p) && !secure(p)),
        "a Secure Boot refusal means something only beside a UEFI profile without it that boots the same disk"
    );

    // One disk for all: big enough for every profile's minimum, the test guest's marker for
    // the direct-kernel profiles, the unsigned loader for the UEFI ones.
    let size = profiles.iter().filter_map(Profile::min_disk_bytes).max().unwrap_or(0).max(1 << 30);
    let raw = t.env.path("esp.raw");
    efi::esp_disk(&raw, "esp", size);
    t.env.vdim_json(&["image", "import", "esp", raw.to_str().unwrap()]);

    let mut booted = vec![];
    for (i, profile) in profiles.into_iter().enumerate() {
        let pool = t.pool_name(&format!("p{i}"));
        let started = Instant::now();
        t.create_pool(&pool, "esp", "prod", 1, profile.name(), &["--start"]);
        let desktop = format!("vdim-{pool}-001");
        let name = profile.name().to_string();
        // At once, while even the fastest guest is still in its firmware: the live XML.
        let (ok, live) = virsh(&["dumpxml", &desktop]);
        assert!(ok, "{name}: {live}");
        assert!(domstate(&desktop).starts_with("running"), "{name}: {desktop} is {}", domstate(&desktop));
        let mut nvram = None;
        if profile.uses_uefi() {
            let loader = line_with(&live, "<loader");
            assert!(loader.contains("type='pflash'") && loader.contains("/OVMF"), "{name}: {loader}");
            assert_eq!(loader.contains("secure='yes'"), secure(&profile), "{name}: {loader}");
            let nv_line = line_with(&live, "<nvram");
            if secure(&profile) {
                // Secure Boot with Microsoft's keys enrolled, and SMM to protect the variables.
                assert!(nv_line.contains(".ms.fd"), "{name}: keys not enrolled: {nv_line}");
                assert!(live.contains("<smm state='on'/>"), "{name}: no SMM");
            }
            let path = PathBuf::from(element_text(&live, "nvram").expect("nvram path"));
            assert!(path.starts_with(t.env.home().join("desktops").join(&pool)), "{name}: NVRAM at {path:?}");
            let mode = std::fs::metadata(&path).expect("NVRAM file").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}: NVRAM {path:?} mode {mode:o}");
            nvram = Some(path);
        } else {
            assert!(!live.contains("<loader") && !live.contains("<nvram"), "{name} has firmware:\n{live}");
            assert!(live.contains("<kernel>"), "{name}: {live}");
        }
        if profile.has_tpm() {
            assert!(live.contains("<tpm model='tpm-crb'>"), "{name}: {live}");
            assert!(line_with(&live, "<backend type='emulator'").contains("version='2.0'"), "{name}");
            assert!(swtpm_running_for(&desktop), "{name}: no swtpm process");
            let uuid = element_text(&live, "uuid").expect("uuid");
            assert!(efi::swtpm_state_dir(uuid).join("tpm2").is_dir(), "{name}: no swtpm state for {uuid}");
        } else {
            assert!(!live.contains("<tpm"), "{name} has a TPM:\n{live}");
        }
        booted.push(Booted { profile, desktop, started, nvram });
    }

    // The direct-kernel guests read the disk's marker and report healthy.
    for b in booted.iter().filter(|b| !b.profile.uses_uefi()) {
        let pool = b.desktop.trim_start_matches("vdim-").trim_end_matches("-001");
        t.wait_marker(pool, &b.desktop, "VDIM-TEST esp health=ok", 120);
    }
    // Positive control: without Secure Boot the firmware runs the unsigned loader, which
    // powers the machine off.
    let mut slowest = Duration::ZERO;
    for b in booted.iter().filter(|b| uefi(&b.profile) && !secure(&b.profile)) {
        let deadline = b.started + Duration::from_secs(180);
        while domstate(&b.desktop) != "shut off (shutdown)" {
            assert!(Instant::now() < deadline, "{}: the loader never ran: {}", b.profile.name(), domstate(&b.desktop));
            std::thread::sleep(Duration::from_millis(250));
        }
        slowest = slowest.max(b.started.elapsed());
        let nvram = b.nvram.as_deref().expect("nvram");
        assert_eq!(efi::boot_count(nvram), Some(1), "{}: OVMF counted one boot in {nvram:?}", b.profile.name());
    }
    // Under Secure Boot the same disk's loader is refused: twice the control's time and more
    // later, the firmware is still up (it wrote its variables) and the machine never powered off.
    for b in booted.iter().filter(|b| secure(&b.profile)) {
        let until = b.started + slowest * 2 + Duration::from_secs(15);
        while Instant::now() < until {
            let state = domstate(&b.desktop);
            assert!(state.starts_with("running"), "{}: the unsigned loader ran ({state})", b.profile.name());
            std::thread::sleep(Duration::from_millis(500));
        }
        let nvram = b.nvram.as_deref().expect("nvram");
        assert!(efi::boot_count(nvram).is_some(), "{}: OVMF never wrote {nvram:?}", b.profile.name());
    }
    eprintln!("positive control powered off within {slowest:?}");
}

#[test]
fn an_image_smaller_than_the_profile_minimum_is_refused_and_nothing_is_created() {
    let t = LibvirtEnv::new("pmin");
    let pool = t.pool_name("p");
    let small = t.env.path("small.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", small.to_str().unwrap(), "10G"]);
    t.env.vdim_json(&["image", "import", "small", small.to_str().unwrap()]);
    let w11 = Profile::load(&t.env.home().join("profiles"), "windows11").expect("windows11");
    assert_eq!(w11.min_disk_bytes(), Some(64 << 30));

    let r = t.vdim(&["pool", "create", &pool, "--image", "small", "--size", "1", "--profile", "windows11", "--start"]);
    r.assert_exit_code(2);
    r.assert_stderr_contains(
        "image 'small' version 1 has a 10 GiB disk, smaller than the 64 GiB minimum of profile windows11",
    );
    let r = t.vdim(&["--json", "pool", "create", &pool, "--image", "small", "--size", "1", "--profile", "windows10"]);
    let err: serde_json::Value = serde_json::from_str(r.stderr().trim()).expect("JSON error");
    assert_eq!(err["error"]["kind"], "invalid", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("32 GiB minimum of profile windows10"), "{err}");

    assert_eq!(t.vdim_json(&["pool", "list"]), serde_json::json!([]));
    assert!(t.domains().is_empty(), "{:?}", t.domains());
    assert!(!t.env.home().join("desktops").join(&pool).exists());
    assert!(!t.env.home().join("run").join(&pool).exists());
    let audit = t.vdim_json(&["audit"]);
    assert!(!audit.to_string().contains("pool.create"), "{audit}");

    // The test guest's profile states no minimum: the same image is fine there.
    t.create_pool(&pool, "small", "prod", 1, "test-linux", &[]);
}
