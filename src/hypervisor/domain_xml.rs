//! The libvirt domain XML of a desktop, built from its hardware profile.
//!
//! The XML is built here and nowhere else so that the rules hold for every desktop:
//! every value is escaped (`xml::escape`), and names and paths that would need
//! escaping are refused outright; the disk format is always stated; displays always have a
//! password; Hyper-V enlightenments appear only under KVM (QEMU refuses them under TCG);
//! `on_crash` is `preserve` so the rollout engine can see a crashed desktop; the desktop name
//! reaches the guest as the SMBIOS serial so a startup script in the golden image can set
//! the hostname.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::xml::{self, Writer};
use super::VNC_PASSWORD_MAX;
use crate::profile::{
    Clock, CpuMode, DiskBus, Firmware, Graphics, Hardware, Machine, NicModel, PanicModel, Profile, Sound, Video,
};

/// spice-server refuses longer tickets (`SPICE_MAX_PASSWORD_LENGTH`).
const MAX_PASSWORD_CHARS: usize = 60;
const METADATA_NS: &str = "https://vdim.dev/xmlns/desktop/1";

/// Errors of building a desktop's domain XML: a value of the desktop that cannot go into it.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("{kind} name {name:?} is invalid: {reason}")]
    InvalidName { kind: &'static str, name: String, reason: &'static str },

    #[error("{what} path {path:?} of desktop {desktop} is not usable: {reason}")]
    InvalidPath { what: &'static str, desktop: String, path: PathBuf, reason: &'static str },

    #[error("Graphics password of desktop {desktop} is not usable: {reason}")]
    InvalidPassword { desktop: String, reason: &'static str },

    #[error("UUID {uuid:?} of desktop {desktop} is invalid: expected 8-4-4-4-12 hex digits")]
    InvalidUuid { desktop: String, uuid: String },

    #[error("Listen address {listen:?} of desktop {desktop} is invalid: expected an IP address")]
    InvalidListen { desktop: String, listen: String },

    #[error("Desktop {desktop} does not fit profile {profile}: {problem}")]
    SpecMismatch { desktop: String, profile: String, problem: &'static str },
}

impl crate::error::Kind for DomainXmlError {
    fn kind(&self) -> crate::error::ErrorKind {
        // The desktop values are vdim's own (names, paths, passwords it made), not the caller's.
        crate::error::ErrorKind::Internal
    }
}

type Result<T> = std::result::Result<T, DomainXmlError>;

/// How the domain is accelerated. `auto` is resolved by the caller before building XML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtType {
    /// Hardware virtualisation: Hyper-V enlightenments are emitted for profiles that want them.
    Kvm,
    /// TCG emulation: Hyper-V enlightenments are left out (QEMU refuses them).
    Qemu,
}

impl VirtType {
    /// The value of `<domain type=…>`.
    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Kvm => "kvm",
            VirtType::Qemu => "qemu",
        }
    }
}

/// One desktop to be defined from a profile.
#[derive(Debug, Clone)]
pub struct DesktopSpec<'a> {
    /// Domain name, e.g. `vdim-finance-001`; see [`validate_name`].
    pub name: &'a str,
    /// Fixed domain UUID; libvirt generates one when absent.
    pub uuid: Option<&'a str>,
    /// The desktop's qcow2 overlay; its header names the backing file and format.
    pub disk: &'a Path,
    /// Serial console log file; required exactly when the profile has `serial_log = true`.
    pub serial_log: Option<&'a Path>,
    /// Per-desktop UEFI variables file; only for UEFI profiles. Absent: libvirt's default
    /// location. Created from the firmware's template when missing.
    pub nvram: Option<&'a Path>,
    /// The desktop's config drive (identity, see `crate::identity`): an ISO attached
    /// read-only as a SATA CD-ROM, which Windows reads without extra drivers.
    pub config_drive: Option<&'a Path>,
    /// Password of every display: 1 to 60 printable ASCII characters. A VNC display gets the
    /// first [`VNC_PASSWORD_MAX`] (libvirt refuses more; VNC clients such as noVNC use only
    /// that many of whatever they are given, so the whole password still works there).
    pub graphics_password: &'a str,
    /// IP address the displays listen on, e.g. `127.0.0.1`.
    pub listen: &'a str,
    /// SPICE over TLS only (`defaultMode='secure'`: libvirt opens no plaintext port); needs
    /// the host's libvirt configured for SPICE TLS.
    pub display_tls: bool,
    /// Pool and image version, recorded in the domain's `<metadata>`.
    pub pool: &'a str,
    pub version: u32,
}

/// The spec's paths, checked and as they go into the XML.
struct Paths<'a> {
    disk: &'a str,
    nvram: Option<&'a str>,
    serial_log: Option<&'a str>,
    config_drive: Option<&'a str>,
}

/// Checks a domain (desktop) name: 1 to 80 characters of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-`. Names that would need escaping are refused, not escaped.
pub fn validate_name(s: &str) -> Result<()> {
    check_name("Desktop", s)
}

/// Builds the libvirt domain XML of one desktop.
pub fn domain_xml(profile: &Profile, virt: VirtType, spec: &DesktopSpec) -> Result<String> {
    let paths = check_spec(profile, spec)?;
    let hw = profile.hardware();
    let hyperv = hw.hyperv && virt == VirtType::Kvm;
    let mut x = Writer::default();
    x.open("domain", &[("type", virt.as_str())]);
    identity(&mut x, profile, spec);
    os(&mut x, profile, paths.nvram);
    features(&mut x, hw, hyperv);
    cpu_clock_and_power(&mut x, hw, virt, hyperv);
    x.open("devices", &[]);
    disk_network_and_channels(&mut x, hw, &paths);
    displays(&mut x, hw, spec);
    platform_devices(&mut x, hw, hyperv);
    x.close("devices");
    x.close("domain");
    Ok(x.out)
}

/// Everything about the desktop that must hold before any XML is written.
fn check_spec<'a>(profile: &Profile, spec: &DesktopSpec<'a>) -> Result<Paths<'a>> {
    let hw = profile.hardware();
    let desktop = spec.name;
    validate_name(desktop)?;
    check_name("Pool", spec.pool)?;
    if let Some(uuid) = spec.uuid {
        if !is_uuid(uuid) {
            return Err(DomainXmlError::InvalidUuid { desktop: desktop.to_string(), uuid: uuid.to_string() });
        }
    }
    let disk = spec_path("Disk", desktop, spec.disk)?;
    let nvram = spec.nvram.map(|p| spec_path("NVRAM", desktop, p)).transpose()?;
    let serial_log = spec.serial_log.map(|p| spec_path("Serial log", desktop, p)).transpose()?;
    let config_drive = spec.config_drive.map(|p| spec_path("Config drive", desktop, p)).transpose()?;
    let mismatch = |problem| DomainXmlError::SpecMismatch {
        desktop: desktop.to_string(),
        profile: profile.name().to_string(),
        problem,
    };
    if nvram.is_some() && !profile.uses_uefi() {
        return Err(mismatch("an NVRAM file was given but the profile does not boot UEFI"));
    }
    match (hw.serial_log, serial_log.is_some()) {
        (true, false) => {
            return Err(mismatch("the profile logs the serial console to a file but no serial log path was given"))
        }
        (false, true) => return Err(mismatch("a serial log path was given but the profile has serial_log = false")),
        _ => {}
    }
    if !hw.graphics.is_empty() {
        check_password(desktop, spec.graphics_password)?;
        if spec.listen.parse::<IpAddr>().is_err() {
            return Err(DomainXmlError::InvalidListen {
                desktop: desktop.to_string(),
                listen: spec.listen.to_string(),
            });
        }
    }

    Ok(Paths { disk, nvram, serial_log, config_drive })
}

/// Name, UUID, vdim's metadata, memory, vCPUs and the SMBIOS identity.
fn identity(x: &mut Writer, profile: &Profile, spec: &DesktopSpec) {
    let hw = profile.hardware();
    x.leaf("name", &[], spec.name);
    if let Some(uuid) = spec.uuid {
        x.leaf("uuid", &[], uuid);
    }
    x.open("metadata", &[]);
    x.open("vdim:desktop", &[("xmlns:vdim", METADATA_NS)]);
    x.leaf("vdim:pool", &[], spec.pool);
    x.leaf("vdim:version", &[], &spec.version.to_string());
    x.leaf("vdim:profile", &[], profile.name());
    x.close("vdim:desktop");
    x.close("metadata");
    let memory = hw.memory_mib.to_string();
    x.leaf("memory", &[("unit", "MiB")], &memory);
    x.leaf("currentMemory", &[("unit", "MiB")], &memory);
    x.leaf("vcpu", &[("placement", "static")], &hw.vcpus.to_string());

    x.open("sysinfo", &[("type", "smbios")]);
    x.open("system", &[]);
    x.leaf("entry", &[("name", "manufacturer")], "vdim");
    x.leaf("entry", &[("name", "product")], "vdim desktop");
    x.leaf("entry", &[("name", "serial")], spec.name);
    x.close("system");
    x.close("sysinfo");
}

fn os(x: &mut Writer, profile: &Profile, nvram: Option<&str>) {
    let hw = profile.hardware();
    let machine = match hw.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    };
    let secure = hw.firmware == Firmware::UefiSecure;
    if profile.uses_uefi() {
        x.open("os", &[("firmware", "efi")]);
    } else {
        x.open("os", &[]);
    }
    x.leaf("type", &[("arch", "x86_64"), ("machine", machine)], "hvm");
    if profile.uses_uefi() {
        let enabled = if secure { "yes" } else { "no" };
        x.open("firmware", &[]);
        x.empty("feature", &[("enabled", enabled), ("name", "enrolled-keys")]);
        x.empty("feature", &[("enabled", enabled), ("name", "secure-boot")]);
        x.close("firmware");
        // libvirt refuses `secure='no'` beside firmware autoselection; the features say it.
        if secure {
            x.empty("loader", &[("secure", "yes")]);
        }
        if let Some(nvram) = nvram {
            x.leaf("nvram", &[], nvram);
        }
    }
    if hw.firmware == Firmware::DirectKernel {
        // Present and checked at load.
        for (tag, value) in [("kernel", &hw.kernel), ("initrd", &hw.initrd)] {
            if let Some(path) = value.as_deref().and_then(Path::to_str) {
                x.leaf(tag, &[], path);
            }
        }
        if let Some(cmdline) = &hw.cmdline {
            x.leaf("cmdline", &[], cmdline);
        }
    } else {
        x.empty("boot", &[("dev", "hd")]);
    }
    x.empty("smbios", &[("mode", "sysinfo")]);
    x.close("os");
}

fn features(x: &mut Writer, hw: &Hardware, hyperv: bool) {
    let secure = hw.firmware == Firmware::UefiSecure;
    x.open("features", &[]);
    x.empty("acpi", &[]);
    x.empty("apic", &[]);
    if hyperv {
        x.open("hyperv", &[("mode", "custom")]);
        for flag in ["relaxed", "vapic"] {
            x.empty(flag, &[("state", "on")]);
        }
        x.empty("spinlocks", &[("state", "on"), ("retries", "8191")]);
        for flag in ["vpindex", "runtime", "synic", "stimer", "reset", "frequencies", "tlbflush", "ipi"] {
            x.empty(flag, &[("state", "on")]);
        }
        x.close("hyperv");
    }
    if hw.machine == Machine::Q35 {
        x.empty("vmport", &[("state", "off")]);
    }
    if secure {
        x.empty("smm", &[("state", "on")]);
    }
    x.close("features");
}

fn cpu_clock_and_power(x: &mut Writer, hw: &Hardware, virt: VirtType, hyperv: bool) {
    let cores = hw.vcpus.to_string();
    let topology = [("sockets", "1"), ("dies", "1"), ("cores", cores.as_str()), ("threads", "1")];
    match (hw.cpu, virt) {
        (CpuMode::Host, VirtType::Kvm) => {
            x.open("cpu", &[("mode", "host-passthrough"), ("check", "none"), ("migratable", "on")])
        }
        (CpuMode::Host, VirtType::Qemu) => x.open("cpu", &[("mode", "maximum"), ("check", "none")]),
        (CpuMode::Default, _) => x.open("cpu", &[]),
    }
    // One socket: Windows client editions use at most two.
    x.empty("topology", &topology);
    x.close("cpu");

    match hw.clock {
        Clock::Utc => x.empty("clock", &[("offset", "utc")]),
        Clock::Localtime => {
            x.open("clock", &[("offset", "localtime")]);
            x.empty("timer", &[("name", "rtc"), ("tickpolicy", "catchup")]);
            x.empty("timer", &[("name", "pit"), ("tickpolicy", "delay")]);
            x.empty("timer", &[("name", "hpet"), ("present", "no")]);
            if hyperv {
                x.empty("timer", &[("name", "hypervclock"), ("present", "yes")]);
            }
            x.close("clock");
        }
    }
    x.leaf("on_poweroff", &[], "destroy");
    x.leaf("on_reboot", &[], "restart");
    x.leaf("on_crash", &[], "preserve");
    x.open("pm", &[]);
    x.empty("suspend-to-mem", &[("enabled", "no")]);
    x.empty("suspend-to-disk", &[("enabled", "no")]);
    x.close("pm");
}

/// The SATA target of a desktop's config drive (CD-ROM) on this profile: beside the system disk.
pub fn config_drive_dev(profile: &Profile) -> &'static str {
    config_drive_target(profile.hardware())
}

fn config_drive_target(hw: &Hardware) -> &'static str {
    match hw.disk_bus {
        DiskBus::Sata => "sdb",
        DiskBus::Virtio => "sda",
    }
}

fn disk_network_and_channels(x: &mut Writer, hw: &Hardware, paths: &Paths) {
    let (dev, bus) = match hw.disk_bus {
        DiskBus::Virtio => ("vda", "virtio"),
        DiskBus::Sata => ("sda", "sata"),
    };
    x.open("disk", &[("type", "file"), ("device", "disk")]);
    // The overlay's header states its backing file and format; libvirt follows it from there.
    x.empty("driver", &[("name", "qemu"), ("type", "qcow2"), ("discard", "unmap")]);
    x.empty("source", &[("file", paths.disk)]);
    x.empty("target", &[("dev", dev), ("bus", bus)]);
    x.close("disk");
    if let Some(drive) = paths.config_drive {
        x.open("disk", &[("type", "file"), ("device", "cdrom")]);
        x.empty("driver", &[("name", "qemu"), ("type", "raw")]);
        x.empty("source", &[("file", drive)]);
        x.empty("target", &[("dev", config_drive_target(hw)), ("bus", "sata")]);
        x.empty("readonly", &[]);
        x.close("disk");
    }

    if !hw.graphics.is_empty() || hw.usb_redirection > 0 {
        x.empty("controller", &[("type", "usb"), ("model", "qemu-xhci"), ("ports", "15")]);
    }
    if let Some(nic) = hw.nic {
        let model = match nic {
            NicModel::E1000e => "e1000e",
            NicModel::Virtio => "virtio",
        };
        match (&hw.nic_network, &hw.nic_bridge) {
            (Some(network), _) => {
                x.open("interface", &[("type", "network")]);
                x.empty("source", &[("network", network)]);
            }
            (None, Some(bridge)) => {
                x.open("interface", &[("type", "bridge")]);
                x.empty("source", &[("bridge", bridge)]);
            }
            (None, None) => x.open("interface", &[("type", "user")]),
        }
        x.empty("model", &[("type", model)]);
        x.close("interface");
    }
    if let Some(log) = paths.serial_log {
        x.open("serial", &[("type", "file")]);
        x.empty("source", &[("path", log)]);
        x.empty("target", &[("port", "0")]);
        x.close("serial");
    }
    if hw.spice_agent {
        x.open("channel", &[("type", "spicevmc")]);
        x.empty("target", &[("type", "virtio"), ("name", "com.redhat.spice.0")]);
        x.close("channel");
    }
    if hw.guest_agent {
        x.open("channel", &[("type", "unix")]);
        x.empty("target", &[("type", "virtio"), ("name", "org.qemu.guest_agent.0")]);
        x.close("channel");
    }
    if !hw.graphics.is_empty() {
        // Absolute pointer: the mouse follows the client's cursor.
        x.empty("input", &[("type", "tablet"), ("bus", "usb")]);
    }
}

/// Graphics with the desktop's password, video, sound and USB redirection.
fn displays(x: &mut Writer, hw: &Hardware, spec: &DesktopSpec) {
    for graphics in &hw.graphics {
        match graphics {
            Graphics::Spice => {
                let mut attrs = vec![
                    ("type", "spice"),
                    ("autoport", "yes"),
                    ("passwd", spec.graphics_password),
                    ("connected", "disconnect"),
                ];
                if spec.display_tls {
                    attrs.push(("defaultMode", "secure"));
                }
                x.open("graphics", &attrs)
            }
            // libvirt allows only connected='keep' for VNC, and passwords of 8 characters.
            Graphics::Vnc => x.open(
                "graphics",
                &[("type", "vnc"), ("autoport", "yes"), ("passwd", vnc_password(spec.graphics_password))],
            ),
        }
        // VNC stays on loopback whatever the pool's display address: only the broker's console
        // proxy uses it, and its password is 8 characters (libvirt's limit). Remote clients get
        // SPICE, whose one-time tickets are full length.
        let listen = match graphics {
            Graphics::Spice => spec.listen,
            Graphics::Vnc if spec.listen.contains(':') => "::1",
            Graphics::Vnc => "127.0.0.1",
        };
        x.empty("listen", &[("type", "address"), ("address", listen)]);
        x.close("graphics");
    }
    let video = match hw.video {
        Video::Qxl => "qxl",
        Video::Virtio => "virtio",
        Video::Vga => "vga",
        Video::None => "none",
    };
    x.open("video", &[]);
    if hw.video == Video::None {
        x.empty("model", &[("type", video)]);
    } else {
        x.empty("model", &[("type", video), ("heads", "1"), ("primary", "yes")]);
    }
    x.close("video");
    if hw.sound == Sound::Ich9 {
        x.empty("sound", &[("model", "ich9")]);
    }
    for _ in 0..hw.usb_redirection {
        x.empty("redirdev", &[("bus", "usb"), ("type", "spicevmc")]);
    }
}

fn platform_devices(x: &mut Writer, hw: &Hardware, hyperv: bool) {
    if hw.tpm {
        x.open("tpm", &[("model", "tpm-crb")]);
        x.empty("backend", &[("type", "emulator"), ("version", "2.0")]);
        x.close("tpm");
    }
    if hyperv {
        x.empty("panic", &[("model", "hyperv")]);
    }
    match hw.panic_model {
        Some(PanicModel::Isa) => x.empty("panic", &[("model", "isa")]),
        Some(PanicModel::Pvpanic) => x.empty("panic", &[("model", "pvpanic")]),
        None => {}
    }
}

fn check_name(kind: &'static str, name: &str) -> Result<()> {
    match xml::name_problem(name) {
        Some(reason) => Err(DomainXmlError::InvalidName { kind, name: name.to_string(), reason }),
        None => Ok(()),
    }
}

fn spec_path<'p>(what: &'static str, desktop: &str, path: &'p Path) -> Result<&'p str> {
    match (xml::path_problem(path), path.to_str()) {
        (None, Some(s)) => Ok(s),
        (problem, _) => Err(DomainXmlError::InvalidPath {
            what,
            desktop: desktop.to_string(),
            path: path.to_path_buf(),
            reason: problem.unwrap_or("it is not valid UTF-8"),
        }),
    }
}

fn check_password(desktop: &str, password: &str) -> Result<()> {
    let reason = if password.is_empty() {
        Some("it is empty, and displays are never left open")
    } else if password.chars().count() > MAX_PASSWORD_CHARS {
        Some("it is longer than 60 characters (the SPICE limit)")
    } else if !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        // A newline would also break the `.vv` file the broker writes it into.
        Some("use only printable ASCII characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DomainXmlError::InvalidPassword { desktop: desktop.to_string(), reason }),
        None => Ok(()),
    }
}

/// The VNC share of a checked (ASCII) password.
fn vnc_password(password: &str) -> &str {
    password.get(..VNC_PASSWORD_MAX).unwrap_or(password)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The XML's content; libvirt's schema, a define and a boot of each profile are checked
/// against the real tools and daemon in `tests/profiles.rs`.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::tests::{load_text, shipped, MINIMAL};

    fn spec<'a>(profile: &Profile, name: &'a str) -> DesktopSpec<'a> {
        DesktopSpec {
            name,
            uuid: None,
            disk: Path::new("/var/lib/vdim/desktops/finance/vdim-finance-001.qcow2"),
            serial_log: profile.wants_serial_log().then_some(Path::new("/var/log/vdim/vdim-finance-001.serial.log")),
            nvram: profile.uses_uefi().then_some(Path::new("/var/lib/vdim/nvram/vdim-finance-001_VARS.fd")),
            config_drive: None,
            graphics_password: "s3cret-ticket",
            listen: "127.0.0.1",
            display_tls: false,
            pool: "finance",
            version: 7,
        }
    }

    fn xml(profile: &Profile, virt: VirtType) -> String {
        domain_xml(profile, virt, &spec(profile, "vdim-finance-001")).expect("domain XML")
    }

    #[test]
    fn windows11_under_kvm_has_hyperv_enlightenments_and_panic() {
        let out = xml(&shipped("windows11"), VirtType::Kvm);
        assert!(out.starts_with("<domain type='kvm'>"), "{out}");
        assert!(out.contains("<hyperv mode='custom'>"), "{out}");
        for flag in [
            "relaxed",
            "vapic",
            "spinlocks",
            "vpindex",
            "runtime",
            "synic",
            "stimer",
            "reset",
            "frequencies",
            "tlbflush",
            "ipi",
        ] {
            assert!(out.contains(&format!("<{flag} state='on'")), "{flag}: {out}");
        }
        assert!(out.contains("<timer name='hypervclock' present='yes'/>"), "{out}");
        assert!(out.contains("<panic model='hyperv'/>"), "{out}");
        assert!(out.contains("<cpu mode='host-passthrough'"), "{out}");
    }

    #[test]
    fn windows11_under_tcg_has_no_hyperv() {
        let out = xml(&shipped("windows11"), VirtType::Qemu);
        assert!(out.starts_with("<domain type='qemu'>"), "{out}");
        assert!(!out.contains("<hyperv"), "{out}");
        assert!(!out.contains("hypervclock"), "{out}");
        assert!(!out.contains("<panic model='hyperv'"), "{out}");
        assert!(out.contains("<cpu mode='maximum'"), "{out}");
    }

    #[test]
    fn windows11_has_its_hardware_under_both_virt_types() {
        let profile = shipped("windows11");
        for virt in [VirtType::Kvm, VirtType::Qemu] {
            let out = xml(&profile, virt);
            for needle in [
                "<os firmware='efi'>",
                "<feature enabled='yes' name='enrolled-keys'/>",
                "<feature enabled='yes' name='secure-boot'/>",
                "<loader secure='yes'/>",
                "<nvram>/var/lib/vdim/nvram/vdim-finance-001_VARS.fd</nvram>",
                "<smm state='on'/>",
                "<type arch='x86_64' machine='q35'>hvm</type>",
                "<tpm model='tpm-crb'>",
                "<backend type='emulator' version='2.0'/>",
                "<model type='qxl' heads='1' primary='yes'/>",
                "<graphics type='spice' autoport='yes' passwd='s3cret-ticket' connected='disconnect'>",
                "<listen type='address' address='127.0.0.1'/>",
                "<channel type='spicevmc'>",
                "<target type='virtio' name='com.redhat.spice.0'/>",
                "<sound model='ich9'/>",
                "<target dev='sda' bus='sata'/>",
                "<driver name='qemu' type='qcow2' discard='unmap'/>",
                "<model type='e1000e'/>",
                "<smbios mode='sysinfo'/>",
                "<entry name='manufacturer'>vdim</entry>",
                "<entry name='product'>vdim desktop</entry>",
                "<entry name='serial'>vdim-finance-001</entry>",
                "<on_crash>preserve</on_crash>",
                "<on_reboot>restart</on_reboot>",
                "<on_poweroff>destroy</on_poweroff>",
                "<vdim:desktop xmlns:vdim='https://vdim.dev/xmlns/desktop/1'>",
                "<vdim:pool>finance</vdim:pool>",
                "<vdim:version>7</vdim:version>",
                "<vdim:profile>windows11</vdim:profile>",
                "<clock offset='localtime'>",
            ] {
                assert!(out.contains(needle), "{virt:?} lacks {needle}: {out}");
            }
            assert_eq!(out.matches("<redirdev bus='usb' type='spicevmc'/>").count(), 2);
            assert!(!out.contains("org.qemu.guest_agent.0"), "{out}");
            assert!(!out.contains("<backingStore"), "{out}");
        }
    }

    #[test]
    fn windows10_boots_uefi_without_secure_boot() {
        let out = xml(&shipped("windows10"), VirtType::Qemu);
        assert!(out.contains("<feature enabled='no' name='secure-boot'/>"), "{out}");
        assert!(out.contains("<feature enabled='no' name='enrolled-keys'/>"), "{out}");
        assert!(!out.contains("<loader"), "libvirt refuses a loader with firmware autoselection: {out}");
        assert!(!out.contains("<smm"), "{out}");
    }

    #[test]
    fn server_uses_virtio_and_the_guest_agent() {
        let out = xml(&shipped("windows-server-2022"), VirtType::Kvm);
        assert!(out.contains("<target dev='vda' bus='virtio'/>"), "{out}");
        assert!(out.contains("<model type='virtio'/>"), "{out}");
        assert!(out.contains("name='org.qemu.guest_agent.0'"), "{out}");
        assert!(!out.contains("<sound"), "{out}");
        assert!(!out.contains("<redirdev"), "{out}");
    }

    #[test]
    fn test_linux_boots_its_kernel_and_logs_serial() {
        let out = xml(&shipped("test-linux"), VirtType::Qemu);
        for needle in [
            "<kernel>/var/cache/vdim/test-guest/vmlinux</kernel>",
            "<initrd>/var/cache/vdim/test-guest/initrd.img</initrd>",
            "<cmdline>console=ttyS0 panic=0 quiet no_timer_check</cmdline>",
            "<type arch='x86_64' machine='pc'>hvm</type>",
            "<serial type='file'>",
            "<source path='/var/log/vdim/vdim-finance-001.serial.log'/>",
            "<panic model='isa'/>",
            "<target dev='vda' bus='virtio'/>",
            "<graphics type='vnc' autoport='yes' passwd='s3cret-t'>",
            "<graphics type='spice' autoport='yes' passwd='s3cret-ticket' connected='disconnect'>",
            "<memory unit='MiB'>256</memory>",
            "<vcpu placement='static'>1</vcpu>",
        ] {
            assert!(out.contains(needle), "lacks {needle}: {out}");
        }
        for absent in ["<interface", "firmware='efi'", "<tpm", "<boot ", "<nvram"] {
            assert!(!out.contains(absent), "has {absent}: {out}");
        }
    }

    #[test]
    fn a_config_drive_is_a_read_only_sata_cdrom_beside_the_system_disk() {
        let drive = Path::new("/var/lib/vdim/run/finance/vdim-finance-001.config.iso");
        for (name, dev) in [("windows11", "sdb"), ("windows-server-2022", "sda"), ("test-linux", "sda")] {
            let profile = shipped(name);
            let mut spec = spec(&profile, "vdim-finance-001");
            assert!(!domain_xml(&profile, VirtType::Qemu, &spec).unwrap().contains("cdrom"));
            spec.config_drive = Some(drive);
            let out = domain_xml(&profile, VirtType::Qemu, &spec).unwrap();
            let cdrom = &out[out.find("<disk type='file' device='cdrom'>").expect("a CD-ROM")..];
            let cdrom = &cdrom[..cdrom.find("</disk>").unwrap()];
            for needle in [
                "<driver name='qemu' type='raw'/>".to_string(),
                format!("<source file='{}'/>", drive.display()),
                format!("<target dev='{dev}' bus='sata'/>"),
                "<readonly/>".to_string(),
            ] {
                assert!(cdrom.contains(&needle), "{name}: lacks {needle}: {cdrom}");
            }
            spec.config_drive = Some(Path::new("relative.iso"));
            assert!(domain_xml(&profile, VirtType::Qemu, &spec).is_err(), "paths are checked like every other");
        }
    }

    #[test]
    fn injected_names_are_rejected_not_escaped() {
        let profile = shipped("windows11");
        for name in ["x'/><devices>", "a\"b", "a<b", "a&b", "a\nb", "a b", "", "-rf", ".hidden", "a/b", "vdim-ümlaut"]
        {
            assert!(validate_name(name).is_err(), "{name:?}");
            let err = domain_xml(&profile, VirtType::Qemu, &spec(&profile, name)).expect_err("bad desktop name");
            assert!(matches!(err, DomainXmlError::InvalidName { kind: "Desktop", .. }), "{err:?}");
            let mut pool_spec = spec(&profile, "vdim-ok");
            pool_spec.pool = name;
            let err = domain_xml(&profile, VirtType::Qemu, &pool_spec).expect_err("bad pool");
            assert!(matches!(err, DomainXmlError::InvalidName { kind: "Pool", .. }), "{err:?}");
        }
        assert!(validate_name(&"a".repeat(80)).is_ok());
        assert!(validate_name(&"a".repeat(81)).is_err());
        assert!(validate_name("vdim-finance-001").is_ok());
        assert!(validate_name("Desk_01.a").is_ok());
    }

    #[test]
    fn injected_paths_are_rejected() {
        let profile = shipped("windows11");
        for path in [
            "/tmp/x'/><disk",
            "/tmp/a\"b",
            "/tmp/a<b",
            "/tmp/a>b",
            "/tmp/a&b",
            "/tmp/a\nb",
            "relative/disk.qcow2",
            "/tmp/../etc/shadow",
        ] {
            let p = Path::new(path);
            let mut s = spec(&profile, "vdim-ok");
            s.disk = p;
            let err = domain_xml(&profile, VirtType::Qemu, &s).expect_err(path);
            assert!(matches!(err, DomainXmlError::InvalidPath { what: "Disk", .. }), "{err:?}");
            let mut s = spec(&profile, "vdim-ok");
            s.nvram = Some(p);
            assert!(domain_xml(&profile, VirtType::Qemu, &s).is_err(), "nvram {path:?}");
        }
        let linux = shipped("test-linux");
        let mut s = spec(&linux, "vdim-ok");
        s.serial_log = Some(Path::new("/tmp/log'/>"));
        assert!(domain_xml(&linux, VirtType::Qemu, &s).is_err());
    }

    #[test]
    fn passwords_are_escaped_and_the_document_stays_whole() {
        let profile = shipped("test-linux");
        let mut s = spec(&profile, "vdim-ok");
        s.graphics_password = "p'/><devices></devices></domain><x a=\"&";
        let out = domain_xml(&profile, VirtType::Qemu, &s).expect("escaped password");
        assert_eq!(out.matches("<domain").count(), 1, "{out}");
        assert_eq!(out.matches("</domain>").count(), 1, "{out}");
        assert_eq!(out.matches("<devices>").count(), 1, "{out}");
        let spice = "<graphics type='spice' autoport='yes' passwd='p&apos;/&gt;&lt;devices&gt;&lt;/devices&gt;&lt;/domain&gt;&lt;x a=&quot;&amp;' connected='disconnect'>";
        assert_eq!(out.matches(spice).count(), 1, "{out}");
        let vnc = "<graphics type='vnc' autoport='yes' passwd='p&apos;/&gt;&lt;dev'>";
        assert_eq!(out.matches(vnc).count(), 1, "{out}");
        for bad in ["", "line\nbreak", "tab\there", "caf\u{e9}", &"x".repeat(61)] {
            s.graphics_password = bad;
            let err = domain_xml(&profile, VirtType::Qemu, &s).expect_err("bad password");
            assert!(matches!(err, DomainXmlError::InvalidPassword { .. }), "{err:?}");
            assert!(!err.to_string().contains(bad) || bad.is_empty(), "{err}");
        }
    }

    #[test]
    fn profile_values_are_escaped_too() {
        let text = MINIMAL.replace("\"bios\"", "\"direct-kernel\"")
            + "kernel = \"/boot/vmlinuz\"\ninitrd = \"/boot/initrd\"\ncmdline = \"a=<b>&c='d'\"\n";
        let profile = load_text(&text).expect("profile");
        let out = domain_xml(&profile, VirtType::Qemu, &spec(&profile, "vdim-ok")).expect("xml");
        assert!(out.contains("<cmdline>a=&lt;b&gt;&amp;c=&apos;d&apos;</cmdline>"), "{out}");
    }

    #[test]
    fn a_tls_display_is_spice_secure_only_and_vnc_stays_on_loopback() {
        let profile = shipped("test-linux");
        let mut s = spec(&profile, "vdim-ok");
        s.listen = "192.0.2.10";
        let plain = domain_xml(&profile, VirtType::Qemu, &s).expect("xml");
        assert!(!plain.contains("defaultMode"), "{plain}");
        s.display_tls = true;
        let out = domain_xml(&profile, VirtType::Qemu, &s).expect("xml");
        let spice =
            "<graphics type='spice' autoport='yes' passwd='s3cret-ticket' connected='disconnect' defaultMode='secure'>";
        assert!(out.contains(spice), "{out}");
        assert_eq!(out.matches("defaultMode").count(), 1, "SPICE only: {out}");
        assert!(out.contains("<listen type='address' address='127.0.0.1'/>"), "VNC on loopback: {out}");
    }

    #[test]
    fn uuid_and_listen_are_checked() {
        let profile = shipped("windows11");
        let mut s = spec(&profile, "vdim-ok");
        s.uuid = Some("0b9e3c47-5f0e-4b4e-9d43-2b8f27f1c0aa");
        let out = domain_xml(&profile, VirtType::Qemu, &s).expect("xml");
        assert!(out.contains("<uuid>0b9e3c47-5f0e-4b4e-9d43-2b8f27f1c0aa</uuid>"));
        s.uuid = Some("0b9e3c47-5f0e-4b4e-9d43-2b8f27f1c0a'");
        assert!(matches!(domain_xml(&profile, VirtType::Qemu, &s), Err(DomainXmlError::InvalidUuid { .. })));
        s.uuid = None;
        for listen in ["localhost", "127.0.0.1'/>", "", "0.0.0.0 "] {
            s.listen = listen;
            assert!(
                matches!(domain_xml(&profile, VirtType::Qemu, &s), Err(DomainXmlError::InvalidListen { .. })),
                "{listen:?}"
            );
        }
        s.listen = "::1";
        assert!(domain_xml(&profile, VirtType::Qemu, &s).is_ok());
    }

    #[test]
    fn spec_must_fit_the_profile() {
        let linux = shipped("test-linux");
        let mut s = spec(&linux, "vdim-ok");
        s.serial_log = None;
        let err = domain_xml(&linux, VirtType::Qemu, &s).expect_err("no serial log");
        assert!(err.to_string().contains("test-linux"), "{err}");
        let mut s = spec(&linux, "vdim-ok");
        s.nvram = Some(Path::new("/tmp/vars.fd"));
        assert!(matches!(domain_xml(&linux, VirtType::Qemu, &s), Err(DomainXmlError::SpecMismatch { .. })));
        let w11 = shipped("windows11");
        let mut s = spec(&w11, "vdim-ok");
        s.serial_log = Some(Path::new("/tmp/serial.log"));
        assert!(domain_xml(&w11, VirtType::Qemu, &s).is_err());
        s.serial_log = None;
        s.nvram = None;
        let out = domain_xml(&w11, VirtType::Qemu, &s).expect("libvirt's default nvram");
        assert!(!out.contains("<nvram"), "{out}");
    }
}
