//! The libvirt seam against the real daemon (qemu:///system, TCG guests): lifecycle calls,
//! console passwords on live displays, and lifecycle events with their latency. These need
//! libvirtd, so they live here rather than in the fast tier (`cargo test --lib`), whose
//! tests of the seam use libvirt's in-process `test:///default` driver.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vdim::hypervisor::{
    resolve_virt_type, DomainState, GraphicsKind, Hypervisor, HypervisorError, Libvirt, LifecycleEvent, LifecycleKind,
    Subscription,
};

const QEMU_URI: &str = "qemu:///system";
/// Where scripts/build-test-guest puts the guest (its VDIM_TEST_GUEST_DIR, same default).
fn test_guest_dir() -> PathBuf {
    std::env::var_os("VDIM_TEST_GUEST_DIR").map_or_else(|| "/var/cache/vdim/test-guest".into(), PathBuf::from)
}

/// `vdimtest-hv-<pid>-<n>`: unique across tests and runs.
fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("vdimtest-hv-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Destroys and undefines its domain however the test ends.
struct Cleanup<'a> {
    hv: &'a Libvirt,
    name: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.hv.destroy(&self.name);
        let _ = self.hv.undefine(&self.name);
    }
}

fn cleanup<'a>(hv: &'a Libvirt, name: &str) -> Cleanup<'a> {
    Cleanup { hv, name: name.to_string() }
}

fn qemu() -> Libvirt {
    Libvirt::connect(QEMU_URI)
        .unwrap_or_else(|e| panic!("{e}: these tests need the real daemon, run scripts/setup-host first"))
}

/// The minimal real guest: no disk (SeaBIOS finds nothing to boot and waits), two consoles.
fn qemu_domain_xml(name: &str) -> String {
    format!(
        "<domain type='{virt}'>
           <name>{name}</name>
           <memory unit='MiB'>64</memory>
           <vcpu>1</vcpu>
           <os><type arch='x86_64' machine='pc'>hvm</type></os>
           <devices>
             <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='first-vn'>
               <listen type='address' address='127.0.0.1'/>
             </graphics>
             <graphics type='spice' port='-1' autoport='yes' listen='127.0.0.1' passwd='first-spice'>
               <listen type='address' address='127.0.0.1'/>
             </graphics>
           </devices>
         </domain>",
        virt = resolve_virt_type(true),
    )
}

/// Waits for the first event of `domain` matching `want`, skipping others.
fn wait_for(
    sub: &Subscription,
    domain: &str,
    want: impl Fn(&LifecycleKind) -> bool,
    timeout: Duration,
) -> Option<(LifecycleEvent, Duration)> {
    let started = Instant::now();
    loop {
        let left = timeout.checked_sub(started.elapsed())?;
        match sub.events.recv_timeout(left) {
            Ok(ev) if ev.domain == domain && want(&ev.kind) => return Some((ev, started.elapsed())),
            Ok(ev) => eprintln!("  (other event: {} {:?} {})", ev.domain, ev.kind, ev.detail),
            Err(_) => return None,
        }
    }
}

/// The attributes of the start tag of the live XML's `<graphics type='kind'>` (libvirt writes
/// attributes in single quotes; the values read here need no unescaping).
fn graphics_attrs(xml: &str, kind: &str) -> Vec<(String, String)> {
    let tag = xml
        .split("<graphics ")
        .skip(1)
        .map(|rest| &rest[..rest.find('>').unwrap_or(rest.len())])
        .find(|tag| tag.contains(&format!("type='{kind}'")))
        .unwrap_or_else(|| panic!("no {kind} graphics in {xml}"));
    tag.split("' ")
        .filter_map(|kv| kv.trim().trim_end_matches(['/', '\'']).split_once("='"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `date -u` of `t` in libvirt's `passwdValidTo` form (no offset), computed by date(1).
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn qemu_lifecycle_consoles_and_event_latency() {
    let hv = qemu();
    let name = unique_name();
    let _guard = cleanup(&hv, &name);
    let sub = hv.subscribe("vdimtest-hv-").expect("subscribe");

    hv.define(&qemu_domain_xml(&name)).expect("define");
    wait_for(&sub, &name, |k| *k == LifecycleKind::Defined, Duration::from_secs(2)).expect("Defined event");
    assert!(matches!(hv.graphics(&name, GraphicsKind::Vnc), Err(HypervisorError::NoConsolePort { .. })));

    let t = Instant::now();
    hv.start(&name).expect("start");
    let start_call = t.elapsed();
    let (ev, _) =
        wait_for(&sub, &name, |k| *k == LifecycleKind::Started, Duration::from_secs(5)).expect("Started event");
    eprintln!(
        "qemu: start() took {start_call:?}; Started ({}) arrived {:?} after the call began",
        ev.detail,
        t.elapsed()
    );
    assert_eq!(hv.state(&name).expect("state").0, DomainState::Running);

    let before = hv.graphics(&name, GraphicsKind::Vnc).expect("vnc endpoint");
    assert!(before.port.is_some());
    assert_eq!(before.listen, "127.0.0.1");

    let valid_to = SystemTime::now() + Duration::from_secs(600);
    let vnc = hv.set_graphics_password(&name, GraphicsKind::Vnc, "tkt-vnc1", valid_to).expect("vnc password");
    assert_eq!(vnc, before, "the endpoint does not move");
    assert_eq!(hv.graphics(&name, GraphicsKind::Vnc).expect("vnc"), vnc);
    let spice = hv.set_graphics_password(&name, GraphicsKind::Spice, "tkt-spice-1", valid_to).expect("spice password");
    assert!(spice.port.is_some() && spice.port != vnc.port);

    let xml = hv.xml(&name).expect("xml");
    let (vnc_el, spice_el) = (graphics_attrs(&xml, "vnc"), graphics_attrs(&xml, "spice"));
    assert_eq!(attr(&vnc_el, "passwd"), Some("tkt-vnc1"), "{xml}");
    assert_eq!(attr(&spice_el, "passwd"), Some("tkt-spice-1"), "{xml}");
    let want_valid_to = utc(valid_to);
    assert_eq!(attr(&vnc_el, "passwdValidTo"), Some(want_valid_to.as_str()), "{xml}");
    assert_eq!(attr(&spice_el, "passwdValidTo"), Some(want_valid_to.as_str()), "{xml}");
    eprintln!("qemu: live spice graphics after ticket: connected={:?}", attr(&spice_el, "connected"));
    assert!(matches!(
        hv.set_graphics_password(&name, GraphicsKind::Vnc, "", valid_to),
        Err(HypervisorError::InvalidPassword { .. })
    ));
    assert!(matches!(
        hv.set_graphics_password(&name, GraphicsKind::Vnc, "123456789", valid_to),
        Err(HypervisorError::InvalidPassword { .. })
    ));

    let t = Instant::now();
    hv.destroy(&name).expect("destroy");
    let (ev, latency) = wait_for(&sub, &name, |k| *k == LifecycleKind::Stopped, Duration::from_secs(2))
        .expect("Stopped event within 2 s of destroy");
    eprintln!(
        "qemu: Stopped ({}) arrived {:?} after destroy() began ({latency:?} after it returned)",
        ev.detail,
        t.elapsed()
    );
    assert_eq!(hv.state(&name).expect("state"), (DomainState::ShutOff, "destroyed".to_string()));
    hv.undefine(&name).expect("undefine");
    wait_for(&sub, &name, |k| *k == LifecycleKind::Undefined, Duration::from_secs(2)).expect("Undefined event");
    assert!(!hv.exists(&name).expect("exists"));
    assert!(!hv.list("vdimtest-hv-").expect("list").contains(&name));
}

/// A test guest (scripts/build-test-guest; `kernel` vmlinuz or vmlinux) whose disk, in `dir`,
/// starts with `marker`; its serial console goes to `dir`/serial.log.
fn marker_guest_xml(name: &str, kernel: &str, dir: &Path, marker: &str) -> String {
    let kernel = test_guest_dir().join(kernel);
    let initrd = test_guest_dir().join("initrd.img");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "the test guest is missing: {} and {} are built by scripts/build-test-guest; run it first",
        kernel.display(),
        initrd.display()
    );
    let disk = dir.join("disk.raw");
    let mut image = marker.as_bytes().to_vec();
    image.resize(16 << 20, 0);
    std::fs::write(&disk, image).expect("disk image");
    format!(
        "<domain type='{virt}'>
           <name>{name}</name>
           <memory unit='MiB'>256</memory>
           <vcpu>1</vcpu>
           <os>
             <type arch='x86_64' machine='pc'>hvm</type>
             <kernel>{kernel}</kernel>
             <initrd>{initrd}</initrd>
             <cmdline>console=ttyS0</cmdline>
           </os>
           <features><acpi/></features><!-- the kernel finds the ISA pvpanic through ACPI -->
           <on_crash>preserve</on_crash>
           <devices>
             <disk type='file' device='disk'>
               <driver name='qemu' type='raw'/>
               <source file='{disk}'/>
               <target dev='vda' bus='virtio'/>
             </disk>
             <serial type='file'><source path='{serial}'/><target port='0'/></serial>
             <panic model='isa'/>
           </devices>
         </domain>",
        virt = resolve_virt_type(true),
        kernel = kernel.display(),
        initrd = initrd.display(),
        disk = disk.display(),
        serial = dir.join("serial.log").display(),
    )
}

#[test]
fn qemu_panicking_guest_is_reported_by_a_crashed_event() {
    let hv = qemu();
    let name = unique_name();
    let _guard = cleanup(&hv, &name);
    let dir = tempfile::tempdir().expect("tempdir");
    let serial = dir.path().join("serial.log");
    let xml = marker_guest_xml(&name, "vmlinuz", dir.path(), "VDIM-TEST hv health=panic");
    let sub = hv.subscribe(&name).expect("subscribe");
    hv.define(&xml).expect("define");
    let t = Instant::now();
    hv.start(&name).expect("start");
    let crashed = wait_for(&sub, &name, |k| *k == LifecycleKind::Crashed, Duration::from_secs(60));
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let (ev, _) = crashed.unwrap_or_else(|| panic!("no Crashed event within 60 s; serial console:\n{console}"));
    // The guest is paused once it panicked: the serial log's last write is the end of the
    // panic message, so its mtime tells how long libvirt's event took after the panic.
    let after_panic = std::fs::metadata(&serial)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|written| ev.at.duration_since(written).ok());
    eprintln!(
        "qemu: Crashed ({}) arrived {:?} after start() began, {after_panic:?} after the panic message",
        ev.detail,
        t.elapsed()
    );
    assert_eq!(ev.detail, "panicked");
    assert!(console.contains("GUEST-MARKER: VDIM-TEST hv health=panic"), "{console}");
    assert_eq!(hv.state(&name).expect("state"), (DomainState::Crashed, "panicked".to_string()));
}

/// `health=panic-after=N`: the guest boots healthy, is still running N s after printing
/// `GUEST: healthy`, then panics as `health=panic` does (a version that passes a short soak).
#[test]
fn qemu_panic_after_guest_is_healthy_for_n_seconds_then_crashes() {
    const N: u64 = 6;
    let hv = qemu();
    let name = unique_name();
    let _guard = cleanup(&hv, &name);
    let dir = tempfile::tempdir().expect("tempdir");
    let serial = dir.path().join("serial.log");
    let marker = format!("VDIM-TEST hv-late health=panic-after={N}");
    let xml = marker_guest_xml(&name, "vmlinux", dir.path(), &marker);
    let sub = hv.subscribe(&name).expect("subscribe");
    hv.define(&xml).expect("define");
    hv.start(&name).expect("start");
    let console = || std::fs::read_to_string(&serial).unwrap_or_default().replace('\r', "");

    let deadline = Instant::now() + Duration::from_secs(90);
    while !console().lines().any(|l| l == "GUEST: healthy") {
        let (state, why) = hv.state(&name).expect("state");
        assert_eq!(state, DomainState::Running, "{why} before GUEST: healthy:\n{}", console());
        assert!(Instant::now() < deadline, "no GUEST: healthy within 90 s:\n{}", console());
        std::thread::sleep(Duration::from_millis(100));
    }
    let healthy = Instant::now();

    let early = wait_for(&sub, &name, |k| *k == LifecycleKind::Crashed, Duration::from_secs(N - 1));
    assert!(early.is_none(), "crashed {:?} after GUEST: healthy, before N = {N} s:\n{}", healthy.elapsed(), console());
    assert_eq!(hv.state(&name).expect("state").0, DomainState::Running, "{}", console());

    let crashed = wait_for(&sub, &name, |k| *k == LifecycleKind::Crashed, Duration::from_secs(30));
    let (ev, _) = crashed.unwrap_or_else(|| panic!("no Crashed event within N + 30 s:\n{}", console()));
    let after = healthy.elapsed();
    eprintln!("panic-after={N}: Crashed ({}) {after:?} after GUEST: healthy was seen", ev.detail);
    assert_eq!(ev.detail, "panicked");
    assert!(after <= Duration::from_secs(N + 10), "crashed only {after:?} after GUEST: healthy");
    let lines: Vec<String> = console().lines().map(str::to_string).collect();
    let at = |want: &str| lines.iter().position(|l| l == want);
    assert!(at(&format!("GUEST-MARKER: {marker}")).is_some(), "{lines:#?}");
    let panicking = at(&format!("GUEST: panicking (panic-after={N})"));
    assert!(panicking.is_some() && at("GUEST: healthy") < panicking, "{lines:#?}");
    assert_eq!(hv.state(&name).expect("state"), (DomainState::Crashed, "panicked".to_string()));
}
