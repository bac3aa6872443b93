//! Hardware profiles: the virtual hardware a golden image boots on, as TOML.
//!
//! A golden image only boots on the virtual hardware it was installed on: Windows 11 wants
//! UEFI with Secure Boot and a TPM, a stock Windows has no virtio drivers, the test guest boots
//! a kernel directly and reports health on its serial console. A profile
//! (`images/profiles/<name>.toml`) names that hardware once and is validated once at load;
//! `hypervisor::domain_xml` turns it plus one desktop's disk, name and display password into
//! the XML given to libvirt.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::hypervisor::xml::{name_problem, path_problem};

use serde::Deserialize;

/// Profile files are a few hundred bytes; anything this large is not a profile.
const MAX_PROFILE_BYTES: u64 = 64 * 1024;
const MAX_CMDLINE_CHARS: usize = 2048;
const MAX_USB_REDIRECTION: u32 = 8;

/// Errors of loading a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("Profile name {name:?} is invalid: {reason}")]
    InvalidProfileName { name: String, reason: &'static str },

    #[error("Profile {name} does not exist: there is no file {}", path.display())]
    NotFound { name: String, path: PathBuf },

    #[error("Cannot read profile file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Profile file {} is larger than {MAX_PROFILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },

    #[error("Profile file {}, line {line}: {message}", path.display())]
    Parse { path: PathBuf, line: usize, message: String },

    #[error("Profile {profile} ({}) is invalid: {problem}", path.display())]
    Invalid { profile: String, path: PathBuf, problem: String },
}

impl crate::error::Kind for ProfileError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            ProfileError::InvalidProfileName { .. } => K::Invalid,
            ProfileError::NotFound { .. } => K::NotFound,
            // The profile files are the host's configuration.
            ProfileError::Read { .. }
            | ProfileError::TooLarge { .. }
            | ProfileError::Parse { .. }
            | ProfileError::Invalid { .. } => K::Internal,
        }
    }
}

/// Chipset of the virtual machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Machine {
    Q35,
    Pc,
}

/// How the desktop boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// OVMF with Secure Boot enforced and the Microsoft keys enrolled (needs q35 + SMM).
    UefiSecure,
    /// OVMF without Secure Boot.
    Uefi,
    /// SeaBIOS.
    Bios,
    /// The profile's `kernel`, `initrd` and `cmdline`, no firmware boot loader.
    DirectKernel,
}

/// A remote display protocol; every display gets the desktop's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Graphics {
    Spice,
    Vnc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuMode {
    /// The host CPU under KVM (`host-passthrough`), everything TCG can emulate otherwise.
    Host,
    /// Whatever libvirt picks.
    #[default]
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clock {
    #[default]
    Utc,
    /// Windows keeps the RTC in local time.
    Localtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PanicModel {
    Isa,
    Pvpanic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    Virtio,
    Sata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    E1000e,
    Virtio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Video {
    Qxl,
    Virtio,
    Vga,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sound {
    Ich9,
    #[default]
    None,
}

/// The TOML file as written; see [`Profile::load_file`] for the rules checked on top. Read
/// through [`Profile::hardware`]: a `Profile` only exists validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub description: String,
    pub machine: Machine,
    pub firmware: Firmware,
    pub memory_mib: u64,
    /// The least memory the guest OS supports; `memory_mib` below it is refused at load.
    pub min_memory_mib: Option<u64>,
    /// The least disk the guest OS installs on: `pool create` refuses smaller images.
    pub min_disk_gib: Option<u64>,
    pub vcpus: u32,
    #[serde(default)]
    pub cpu: CpuMode,
    #[serde(default)]
    pub clock: Clock,
    #[serde(default)]
    pub tpm: bool,
    #[serde(default)]
    pub hyperv: bool,
    pub panic_model: Option<PanicModel>,
    pub disk_bus: DiskBus,
    pub nic: Option<NicModel>,
    pub nic_network: Option<String>,
    pub nic_bridge: Option<String>,
    pub video: Video,
    pub graphics: Vec<Graphics>,
    #[serde(default)]
    pub spice_agent: bool,
    #[serde(default)]
    pub guest_agent: bool,
    #[serde(default)]
    pub usb_redirection: u32,
    #[serde(default)]
    pub sound: Sound,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub serial_log: bool,
}

/// A loaded and validated hardware profile.
#[derive(Debug, Clone)]
pub struct Profile {
    name: String,
    path: PathBuf,
    hw: Hardware,
}

impl Profile {
    /// Loads `<dir>/<name>.toml`. The name must match `[a-z0-9][a-z0-9._-]{0,62}`, so it can
    /// never leave `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Profile, ProfileError> {
        check_profile_name(name)?;
        let path = dir.join(format!("{name}.toml"));
        if !path.is_file() {
            return Err(ProfileError::NotFound { name: name.to_string(), path });
        }
        Self::load_file(&path)
    }

    /// Loads one profile file; the profile is named after the file (`windows11.toml` is
    /// `windows11`). Unknown keys, bad values and contradictory settings are errors.
    pub fn load_file(path: &Path) -> Result<Profile, ProfileError> {
        let stem = match (path.file_stem(), path.extension()) {
            (Some(stem), Some(ext)) if ext == "toml" => stem.to_string_lossy().into_owned(),
            _ => {
                return Err(ProfileError::InvalidProfileName {
                    name: path.display().to_string(),
                    reason: "a profile file is named <profile>.toml",
                })
            }
        };
        check_profile_name(&stem)?;
        let text = read_capped(path)?;
        let hw: Hardware = toml::from_str(&text).map_err(|e| ProfileError::Parse {
            path: path.to_path_buf(),
            line: e.span().map_or(1, |s| text.bytes().take(s.start).filter(|&b| b == b'\n').count() + 1),
            message: e.message().to_string(),
        })?;
        validate_hardware(&hw).map_err(|problem| ProfileError::Invalid {
            profile: stem.clone(),
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(Profile { name: stem, path: path.to_path_buf(), hw })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the profile was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn description(&self) -> &str {
        &self.hw.description
    }

    /// Whether the guest has a QEMU guest agent channel (`org.qemu.guest_agent.0`).
    pub fn has_guest_agent(&self) -> bool {
        self.hw.guest_agent
    }

    /// Whether the desktop boots OVMF and so keeps UEFI variables (see `DesktopSpec::nvram`).
    pub fn uses_uefi(&self) -> bool {
        matches!(self.hw.firmware, Firmware::Uefi | Firmware::UefiSecure)
    }

    /// Whether the serial console goes to a file (`DesktopSpec::serial_log` is then required).
    pub fn wants_serial_log(&self) -> bool {
        self.hw.serial_log
    }

    pub fn firmware(&self) -> Firmware {
        self.hw.firmware
    }

    pub fn machine(&self) -> Machine {
        self.hw.machine
    }

    /// The remote displays of the desktop, in profile order.
    pub fn graphics(&self) -> &[Graphics] {
        &self.hw.graphics
    }

    pub fn memory_mib(&self) -> u64 {
        self.hw.memory_mib
    }

    /// The least virtual disk size, in bytes, an image needs to run under this profile.
    pub fn min_disk_bytes(&self) -> Option<u64> {
        self.hw.min_disk_gib.map(|gib| gib << 30)
    }

    /// Whether the desktop has a TPM 2.0 (an swtpm process, state kept by libvirt).
    pub fn has_tpm(&self) -> bool {
        self.hw.tpm
    }

    pub fn vcpus(&self) -> u32 {
        self.hw.vcpus
    }

    /// Every setting, for the domain XML builder.
    pub fn hardware(&self) -> &Hardware {
        &self.hw
    }
}

fn check_profile_name(name: &str) -> Result<(), ProfileError> {
    let bad = |reason| Err(ProfileError::InvalidProfileName { name: name.to_string(), reason });
    let first_ok = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !first_ok {
        return bad("it must start with a-z or 0-9");
    }
    if name.len() > 63 {
        return bad("it must be at most 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("use only a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

fn read_capped(path: &Path) -> Result<String, ProfileError> {
    let read_err = |source| ProfileError::Read { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_PROFILE_BYTES + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_PROFILE_BYTES {
        return Err(ProfileError::TooLarge { path: path.to_path_buf() });
    }
    Ok(text)
}

/// The rules serde cannot express. Returns the first problem found.
fn validate_hardware(hw: &Hardware) -> Result<(), String> {
    validate_sizes(hw)?;
    validate_boot(hw)?;
    validate_network(hw)?;
    validate_displays(hw)
}

/// Memory, vCPUs, and what the chipset allows.
fn validate_sizes(hw: &Hardware) -> Result<(), String> {
    if !(64..=1_048_576).contains(&hw.memory_mib) {
        return Err(format!("memory_mib = {} is out of range 64..=1048576", hw.memory_mib));
    }
    if let Some(min) = hw.min_memory_mib.filter(|min| hw.memory_mib < *min) {
        return Err(format!(
            "memory_mib = {} is below min_memory_mib = {min}, the least the guest supports",
            hw.memory_mib
        ));
    }
    if hw.min_disk_gib.is_some_and(|gib| !(1..=65_536).contains(&gib)) {
        return Err("min_disk_gib is out of range 1..=65536".into());
    }
    if !(1..=256).contains(&hw.vcpus) {
        return Err(format!("vcpus = {} is out of range 1..=256", hw.vcpus));
    }
    if hw.machine == Machine::Pc && hw.vcpus > 255 {
        return Err("machine \"pc\" supports at most 255 vcpus".into());
    }
    if hw.firmware == Firmware::UefiSecure && hw.machine != Machine::Q35 {
        return Err("firmware \"uefi-secure\" needs machine \"q35\" (Secure Boot needs SMM)".into());
    }
    Ok(())
}

/// Firmware and direct kernel boot.
fn validate_boot(hw: &Hardware) -> Result<(), String> {
    let direct = hw.firmware == Firmware::DirectKernel;
    for (key, value) in [("kernel", &hw.kernel), ("initrd", &hw.initrd)] {
        match value {
            None if direct => {
                return Err(format!("firmware \"direct-kernel\" needs {key}"));
            }
            Some(_) if !direct => {
                return Err(format!("{key} is only used with firmware \"direct-kernel\""));
            }
            Some(path) => {
                if let Some(problem) = path_problem(path) {
                    return Err(format!("{key} = {path:?} is not usable: {problem}"));
                }
            }
            None => {}
        }
    }
    if let Some(cmdline) = &hw.cmdline {
        if !direct {
            return Err("cmdline is only used with firmware \"direct-kernel\"".into());
        }
        if cmdline.chars().any(char::is_control) {
            return Err("cmdline must not contain control characters".into());
        }
        if cmdline.len() > MAX_CMDLINE_CHARS {
            return Err(format!("cmdline is longer than {MAX_CMDLINE_CHARS} characters"));
        }
    }
    Ok(())
}

/// The NIC and where it connects.
fn validate_network(hw: &Hardware) -> Result<(), String> {
    if hw.nic.is_none() && (hw.nic_network.is_some() || hw.nic_bridge.is_some()) {
        return Err("nic_network and nic_bridge need a nic model".into());
    }
    if hw.nic_network.is_some() && hw.nic_bridge.is_some() {
        return Err("set nic_network or nic_bridge, not both".into());
    }
    for (key, value) in [("nic_network", &hw.nic_network), ("nic_bridge", &hw.nic_bridge)] {
        if let Some(name) = value {
            if let Some(reason) = name_problem(name) {
                return Err(format!("{key} = {name:?} is invalid: {reason}"));
            }
        }
    }
    Ok(())
}

/// Graphics, video, SPICE extras and the one-line description.
fn validate_displays(hw: &Hardware) -> Result<(), String> {
    for (i, g) in hw.graphics.iter().enumerate() {
        if hw.graphics[..i].contains(g) {
            return Err(format!("graphics lists {g:?} twice"));
        }
    }
    if hw.video == Video::None && !hw.graphics.is_empty() {
        return Err("video \"none\" leaves the graphics nothing to show".into());
    }
    let spice = hw.graphics.contains(&Graphics::Spice);
    if hw.spice_agent && !spice {
        return Err("spice_agent needs \"spice\" in graphics".into());
    }
    if hw.usb_redirection > 0 && !spice {
        return Err("usb_redirection needs \"spice\" in graphics".into());
    }
    if hw.usb_redirection > MAX_USB_REDIRECTION {
        return Err(format!("usb_redirection = {} is out of range 0..={MAX_USB_REDIRECTION}", hw.usb_redirection));
    }
    if hw.description.chars().any(|c| c.is_control()) {
        return Err("description must be one line".into());
    }
    Ok(())
}

/// The profiles shipped in `images/profiles/`, built into the binary so `vdim init` can put
/// them in a new home, where admins may then edit them.
pub const SHIPPED: &[(&str, &str)] = &[
    ("windows11", include_str!("../images/profiles/windows11.toml")),
    ("windows10", include_str!("../images/profiles/windows10.toml")),
    ("windows-server-2022", include_str!("../images/profiles/windows-server-2022.toml")),
    ("test-linux", include_str!("../images/profiles/test-linux.toml")),
    ("test-linux-agent", include_str!("../images/profiles/test-linux-agent.toml")),
];

/// Write the shipped profiles into `dir`, never overwriting an admin's edited copy.
pub fn install_shipped(dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = vec![];
    for (name, text) in SHIPPED {
        let path = dir.join(format!("{name}.toml"));
        if !path.exists() {
            std::fs::write(&path, text)?;
            written.push(name.to_string());
        }
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SHIPPED: [&str; 4] = ["windows11", "windows10", "windows-server-2022", "test-linux"];

    pub(crate) fn profiles_dir() -> PathBuf {
        let in_crate = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/images/profiles"));
        if in_crate.is_dir() {
            in_crate
        } else {
            PathBuf::from("/work/main/images/profiles")
        }
    }

    pub(crate) fn shipped(name: &str) -> Profile {
        Profile::load(&profiles_dir(), name).expect("shipped profile loads")
    }

    pub(crate) const MINIMAL: &str = r#"
description = "minimal"
machine = "q35"
firmware = "bios"
memory_mib = 512
vcpus = 1
disk_bus = "virtio"
video = "vga"
graphics = ["vnc"]
"#;

    pub(crate) fn load_text(text: &str) -> Result<Profile, ProfileError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("custom.toml");
        std::fs::write(&path, text).expect("write profile");
        Profile::load_file(&path)
    }

    fn invalid_problem(text: &str) -> String {
        match load_text(text) {
            Err(ProfileError::Invalid { problem, .. }) => problem,
            other => panic!("expected an invalid profile, got {other:?}"),
        }
    }

    #[test]
    fn every_shipped_profile_loads() {
        let dir = profiles_dir();
        for name in SHIPPED {
            let profile = shipped(name);
            assert_eq!(profile.name(), name);
            assert!(!profile.description().is_empty());
        }
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("profiles dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Profile::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
                count += 1;
            }
        }
        assert!(count >= SHIPPED.len());
    }

    #[test]
    fn shipped_profiles_have_the_promised_hardware() {
        let w11 = shipped("windows11");
        assert_eq!(w11.firmware(), Firmware::UefiSecure);
        assert_eq!((w11.memory_mib(), w11.vcpus()), (4096, 2));
        assert!(!w11.has_guest_agent());
        let server = shipped("windows-server-2022");
        assert!(server.has_guest_agent() && server.uses_uefi());
        let linux = shipped("test-linux");
        assert_eq!(linux.firmware(), Firmware::DirectKernel);
        assert_eq!((linux.memory_mib(), linux.vcpus()), (256, 1));
        assert!(linux.wants_serial_log() && !linux.uses_uefi());
        assert_eq!(linux.graphics(), &[Graphics::Spice, Graphics::Vnc]);
    }

    #[test]
    fn unknown_key_is_rejected_naming_key_and_file() {
        let err = load_text(&format!("{MINIMAL}colour = \"blue\"\n")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(matches!(err, ProfileError::Parse { line: 10, .. }), "{err:?}");
        assert!(msg.contains("colour"), "{msg}");
        assert!(msg.contains("custom.toml"), "{msg}");
    }

    #[test]
    fn bad_enum_value_and_missing_key_are_rejected() {
        let err = load_text(&MINIMAL.replace("\"vga\"", "\"cirrus\"")).expect_err("bad video");
        assert!(err.to_string().contains("cirrus"), "{err}");
        let err = load_text(&MINIMAL.replace("vcpus = 1\n", "")).expect_err("no vcpus");
        assert!(err.to_string().contains("vcpus"), "{err}");
    }

    #[test]
    fn minimal_profile_loads() {
        let profile = load_text(MINIMAL).expect("minimal profile");
        assert_eq!(profile.name(), "custom");
        assert!(!profile.has_guest_agent());
    }

    #[test]
    fn out_of_range_memory_and_vcpus_are_rejected() {
        for (from, to, key) in [
            ("memory_mib = 512", "memory_mib = 63", "memory_mib"),
            ("memory_mib = 512", "memory_mib = 1048577", "memory_mib"),
            ("vcpus = 1", "vcpus = 0", "vcpus"),
            ("vcpus = 1", "vcpus = 257", "vcpus"),
        ] {
            let problem = invalid_problem(&MINIMAL.replace(from, to));
            assert!(problem.contains(key), "{to}: {problem}");
        }
        let err = load_text(&MINIMAL.replace("vcpus = 1", "vcpus = -1")).expect_err("negative");
        assert!(matches!(err, ProfileError::Parse { .. }), "{err:?}");
        let problem = invalid_problem(&format!("{MINIMAL}usb_redirection = 9\n"));
        assert!(problem.contains("usb_redirection"), "{problem}");
    }

    #[test]
    fn memory_below_the_profiles_minimum_is_refused_at_load() {
        let problem = invalid_problem(&format!("{MINIMAL}min_memory_mib = 1024\n"));
        assert!(problem.contains("memory_mib = 512") && problem.contains("min_memory_mib = 1024"), "{problem}");
        let ok = load_text(&format!("{MINIMAL}min_memory_mib = 512\nmin_disk_gib = 20\n")).expect("at the minimum");
        assert_eq!(ok.min_disk_bytes(), Some(20 << 30));
        assert_eq!(load_text(MINIMAL).expect("no minimums").min_disk_bytes(), None);
        let problem = invalid_problem(&format!("{MINIMAL}min_disk_gib = 0\n"));
        assert!(problem.contains("min_disk_gib"), "{problem}");
    }

    #[test]
    fn windows_profiles_state_their_minimums() {
        for (name, disk_gib) in [("windows11", 64), ("windows10", 32), ("windows-server-2022", 32)] {
            assert_eq!(shipped(name).min_disk_bytes(), Some(disk_gib << 30), "{name}");
        }
        let w11 = std::fs::read_to_string(profiles_dir().join("windows11.toml")).expect("read");
        let problem = invalid_problem(&w11.replace("\nmemory_mib = 4096", "\nmemory_mib = 2048"));
        assert!(problem.contains("min_memory_mib = 4096"), "{problem}");
    }

    #[test]
    fn contradictory_settings_are_rejected() {
        let cases = [
            (MINIMAL.replace("\"bios\"", "\"uefi-secure\"").replace("\"q35\"", "\"pc\""), "q35"),
            (MINIMAL.replace("\"bios\"", "\"direct-kernel\""), "kernel"),
            (MINIMAL.replace("\"bios\"", "\"direct-kernel\"") + "kernel = \"/boot/vmlinuz\"\n", "initrd"),
            (MINIMAL.to_string() + "kernel = \"/boot/vmlinuz\"\n", "direct-kernel"),
            (MINIMAL.to_string() + "cmdline = \"quiet\"\n", "direct-kernel"),
            (
                MINIMAL.replace("\"bios\"", "\"direct-kernel\"")
                    + "kernel = \"boot/vmlinuz\"\ninitrd = \"/boot/initrd\"\n",
                "absolute",
            ),
            (
                MINIMAL.replace("\"bios\"", "\"direct-kernel\"")
                    + "kernel = \"/boot/vm'linuz\"\ninitrd = \"/boot/initrd\"\n",
                "must not contain",
            ),
            (MINIMAL.to_string() + "spice_agent = true\n", "spice"),
            (MINIMAL.to_string() + "usb_redirection = 1\n", "spice"),
            (MINIMAL.replace("\"vga\"", "\"none\""), "video"),
            (MINIMAL.replace("[\"vnc\"]", "[\"vnc\", \"vnc\"]"), "twice"),
            (MINIMAL.to_string() + "nic_network = \"lan\"\n", "nic model"),
            (MINIMAL.to_string() + "nic = \"virtio\"\nnic_network = \"x'/>\"\n", "nic_network"),
        ];
        for (text, needle) in cases {
            let problem = invalid_problem(&text);
            assert!(problem.contains(needle), "{problem} (wanted {needle})");
        }
    }

    #[test]
    fn profile_names_cannot_leave_the_directory() {
        let dir = profiles_dir();
        for name in ["../windows11", "a/b", "", ".hidden", "Windows11", "x y", &"a".repeat(64)] {
            let err = Profile::load(&dir, name).expect_err(name);
            assert!(matches!(err, ProfileError::InvalidProfileName { .. }), "{name}: {err:?}");
        }
        let err = Profile::load(&dir, "no-such-profile").expect_err("missing");
        assert!(matches!(err, ProfileError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-profile"), "{err}");
    }
}
