//! Per-desktop identity: every clone of a golden image is its own machine to Windows.
//!
//! A pool with an identity gives each desktop a small read-only config drive (ISO 9660 with
//! Joliet and Rock Ridge, volume label `config-2`), rebuilt at every reset:
//!
//! ```text
//!  /openstack/latest/meta_data.json   hostname, uuid, name    ► cloudbase-init (ConfigDrive)
//!  /openstack/latest/user_data        the admin's file, as is ► cloudbase-init
//!  /autounattend.xml, /unattend.xml   ComputerName, domain join (specialize pass) ► Windows Setup
//! ```
//!
//! The pool records its settings (hostname pattern, domain, OU, the *path* of the join
//! credentials file); the credentials are read from that file each time a drive is built, so
//! the secret lives only on the drives (0600, in the desktop's run directory).

mod credentials;
mod drive;
mod unattend;

pub use credentials::Credentials;
pub use drive::build as build_drive;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The placeholder a hostname pattern must contain: the desktop's number, three digits.
pub const NUMBER: &str = "{n}";
/// NetBIOS computer names are at most 15 characters.
pub const MAX_HOSTNAME: usize = 15;
/// OpenStack limits user data to 64 KiB; so does vdim.
pub const MAX_USER_DATA: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("hostname pattern {pattern:?} is not usable: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error(
        "hostname pattern {pattern:?} can give the same computer names as pool '{other}' ({theirs:?}); Windows compares them without case and two machines with one name break each other's domain join: choose another pattern"
    )]
    Clash { pattern: String, other: String, theirs: String },
    #[error("join domain {0:?} is not a DNS domain name (e.g. corp.example.com)")]
    Domain(String),
    #[error("join OU {0:?} is not usable: it must be a distinguished name without control characters (e.g. OU=VDI,DC=corp,DC=example,DC=com)")]
    Ou(String),
    #[error("{what} of the identity need --identity")]
    NeedsIdentity { what: &'static str },
    #[error("a domain join needs --join-domain and --join-credentials FILE (the credentials are read from the file, never given on the command line)")]
    IncompleteJoin,
    #[error("credentials file {path} {problem}")]
    Credentials { path: String, problem: String },
    #[error("user data file {path} {problem}")]
    UserData { path: String, problem: String },
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("cannot run xorriso to build the config drive of {desktop} (is xorriso installed? scripts/setup-host installs it): {source}")]
    ToolMissing { desktop: String, source: std::io::Error },
    #[error("xorriso could not build the config drive of {desktop}: {stderr}")]
    Tool { desktop: String, stderr: String },
}

impl crate::error::Kind for IdentityError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            IdentityError::Clash { .. } => K::Conflict,
            IdentityError::Pattern { .. }
            | IdentityError::Domain(_)
            | IdentityError::Ou(_)
            | IdentityError::NeedsIdentity { .. }
            | IdentityError::IncompleteJoin
            | IdentityError::Credentials { .. }
            | IdentityError::UserData { .. } => K::Invalid,
            IdentityError::Io { .. } | IdentityError::ToolMissing { .. } | IdentityError::Tool { .. } => K::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, IdentityError>;

/// A pool's identity setting, as the catalog keeps it: no secret, only where to find one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// e.g. `FIN-{n}`: desktop 7 is `FIN-007`.
    pub hostname_pattern: String,
    pub join: Option<DomainJoin>,
    /// A file on this host put on each drive as `user_data` (read at every build).
    pub user_data: Option<PathBuf>,
}

/// An Active Directory join done by Windows Setup in the specialize pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainJoin {
    pub domain: String,
    /// The OU the computer object goes to; the domain's default container when absent.
    pub ou: Option<String>,
    /// The credentials file on this host (see [`Credentials::read`]); never its contents.
    pub credentials: PathBuf,
}

/// The pattern used when a pool asks for an identity without one: `<pool>-{n}`.
pub fn default_pattern(pool: &str) -> String {
    format!("{pool}-{NUMBER}")
}

/// Whether two pools' patterns can give the same computer name: Windows compares computer
/// names without case, and two machines with one name take each other's domain account.
/// Names are `prefix + number + suffix` (the number at least three digits), so they can meet
/// only when one prefix extends the other by digits, and one suffix the other by digits.
pub fn patterns_may_clash(a: &str, b: &str) -> bool {
    let split = |p: &str| {
        let (pre, suf) = p.split_once(NUMBER).unwrap_or((p, ""));
        (pre.to_ascii_uppercase(), suf.to_ascii_uppercase())
    };
    let ((pa, sa), (pb, sb)) = (split(a), split(b));
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    let (short, long) = if pa.len() <= pb.len() { (&pa, &pb) } else { (&pb, &pa) };
    let prefixes = long.starts_with(short.as_str()) && digits(&long[short.len()..]);
    let (short, long) = if sa.len() <= sb.len() { (&sa, &sb) } else { (&sb, &sa) };
    let suffixes = long.ends_with(short.as_str()) && digits(&long[..long.len() - short.len()]);
    prefixes && suffixes
}

/// The hostname of desktop number `index` of a pool with this pattern.
pub fn hostname(pattern: &str, index: u32) -> String {
    pattern.replacen(NUMBER, &format!("{index:03}"), 1)
}

/// Checks a pattern: exactly one `{n}`, no other braces, and every expansion (they all have
/// the same length) a NetBIOS computer name Windows accepts.
pub fn check_pattern(pattern: &str) -> Result<()> {
    let bad = |reason: String| Err(IdentityError::Pattern { pattern: pattern.to_string(), reason });
    if pattern.matches(NUMBER).count() != 1 {
        return bad(format!("it must contain {NUMBER} exactly once (the desktop's number, e.g. FIN-{NUMBER})"));
    }
    if pattern.replacen(NUMBER, "", 1).contains(['{', '}']) {
        return bad(format!("{NUMBER} is the only placeholder"));
    }
    let example = hostname(pattern, 1);
    if let Some(reason) = netbios_problem(&example) {
        return bad(format!("it gives names like {example:?}, and {reason}"));
    }
    Ok(())
}

/// Why `name` is not a computer name Windows accepts, if it is not: 1 to 15 characters of
/// `A-Z a-z 0-9 -` (DNS-compatible NetBIOS), not starting or ending with `-`, not digits only.
pub fn netbios_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_HOSTNAME {
        Some(format!("a computer name has 1 to {MAX_HOSTNAME} characters (NetBIOS), this one {}", name.len()))
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Some("a computer name has only letters, digits and '-'".into())
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("a computer name does not start or end with '-'".into())
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        Some("a computer name is not digits only".into())
    } else {
        None
    }
}

impl Identity {
    /// Checks everything an admin gave, once at pool create: the pattern, the domain and OU,
    /// and that the credentials and user data files can be read (and the credentials are
    /// private to root). Nothing read is kept.
    pub fn check(&self) -> Result<()> {
        check_pattern(&self.hostname_pattern)?;
        if let Some(j) = &self.join {
            if !is_dns_domain(&j.domain) {
                return Err(IdentityError::Domain(j.domain.clone()));
            }
            if let Some(ou) = &j.ou {
                if ou.trim().is_empty() || ou.chars().any(char::is_control) || !ou.contains('=') {
                    return Err(IdentityError::Ou(ou.clone()));
                }
            }
            Credentials::read(&j.credentials)?;
        }
        if let Some(u) = &self.user_data {
            read_user_data(u)?;
        }
        Ok(())
    }
}

fn is_dns_domain(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn read_user_data(path: &Path) -> Result<Vec<u8>> {
    let bad = |problem: String| IdentityError::UserData { path: path.display().to_string(), problem };
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if meta.len() > MAX_USER_DATA {
        return Err(bad(format!("is larger than {MAX_USER_DATA} bytes (OpenStack's limit)")));
    }
    std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))
}

/// One desktop's identity, as its drive states it.
#[derive(Debug, Clone)]
pub struct DesktopIdentity<'a> {
    /// The domain (desktop) name, e.g. `vdim-finance-001`.
    pub desktop: &'a str,
    pub pool: &'a str,
    pub hostname: String,
    /// The domain's UUID (also its SMBIOS system UUID); desktops made before vdim chose
    /// UUIDs have none on record.
    pub uuid: Option<&'a str>,
}

/// OpenStack's `meta_data.json` as cloudbase-init's ConfigDrive service reads it.
pub fn meta_data_json(d: &DesktopIdentity) -> String {
    let v = serde_json::json!({
        "uuid": d.uuid,
        "hostname": d.hostname,
        "name": d.hostname,
        "launch_index": 0,
        "availability_zone": "vdim",
        "meta": { "vdim_pool": d.pool, "vdim_desktop": d.desktop },
    });
    serde_json::to_string_pretty(&v).expect("a JSON value serializes")
}

/// The files of one desktop's drive: built from the pool's setting, reading the credentials
/// and user data files now. Paths are relative to the drive's root.
pub fn drive_files(identity: &Identity, d: &DesktopIdentity) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let join = match &identity.join {
        Some(j) => Some((j, Credentials::read(&j.credentials)?)),
        None => None,
    };
    let answer = unattend::answer_file(&d.hostname, join.as_ref().map(|(j, c)| (*j, c))).into_bytes();
    let mut files = vec![
        ("openstack/latest/meta_data.json", meta_data_json(d).into_bytes()),
        // Windows Setup's implicit search finds only `autounattend.xml` on removable media;
        // `unattend.xml` is for an explicit `/unattend:` or a copy into %WINDIR%\Panther.
        ("autounattend.xml", answer.clone()),
        ("unattend.xml", answer),
    ];
    if let Some(u) = &identity.user_data {
        files.push(("openstack/latest/user_data", read_user_data(u)?));
    }
    Ok(files)
}

/// A fresh random (version 4) UUID for a new desktop's domain.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {

    #[test]
    fn patterns_clash_when_they_can_give_one_computer_name_in_any_case() {
        for (a, b) in [("FIN-{n}", "fin-{n}"), ("FIN-{n}", "FIN-1{n}"), ("{n}-FIN", "1{n}-fin"), ("LAB{n}X", "lab{n}x")]
        {
            assert!(patterns_may_clash(a, b) && patterns_may_clash(b, a), "{a} {b}");
        }
        for (a, b) in [("FIN-{n}", "FINX-{n}"), ("FIN-{n}", "FIN-{n}X"), ("A{n}", "AB{n}"), ("{n}A", "{n}BA")] {
            assert!(!patterns_may_clash(a, b) && !patterns_may_clash(b, a), "{a} {b}");
        }
    }
    use super::*;

    #[test]
    fn a_pattern_expands_to_the_desktops_three_digit_number() {
        assert_eq!(hostname("FIN-{n}", 7), "FIN-007");
        assert_eq!(hostname("{n}-LAB", 120), "120-LAB");
        assert_eq!(hostname(&default_pattern("finance"), 2), "finance-002");
    }

    #[test]
    fn patterns_giving_names_windows_refuses_are_refused() {
        for ok in ["FIN-{n}", "{n}X", "a{n}b", "VERYLONGNAM{n}"] {
            check_pattern(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("FIN", "exactly once"),
            ("{n}-{n}", "exactly once"),
            ("FIN-{x}{n}", "only placeholder"),
            ("VERYLONGNAMES{n}", "1 to 15 characters"),
            ("FIN_{n}", "only letters, digits"),
            ("FIN.{n}", "only letters, digits"),
            ("FIN {n}", "only letters, digits"),
            ("-{n}", "start or end"),
            ("{n}-", "start or end"),
            ("{n}", "digits only"),
            ("1{n}2", "digits only"),
        ] {
            let e = check_pattern(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad:?}: {e}");
        }
    }

    #[test]
    fn domains_and_ous_are_checked() {
        let id = |domain: &str, ou: Option<&str>| Identity {
            hostname_pattern: "FIN-{n}".into(),
            join: Some(DomainJoin {
                domain: domain.into(),
                ou: ou.map(Into::into),
                credentials: "/nonexistent".into(),
            }),
            user_data: None,
        };
        for bad in ["corp", "corp..example", "-corp.example", "corp.example/x", "corp example.com"] {
            assert!(matches!(id(bad, None).check(), Err(IdentityError::Domain(_))), "{bad}");
        }
        for bad in ["", "VDI", "OU=VDI\n,DC=x"] {
            assert!(matches!(id("corp.example.com", Some(bad)).check(), Err(IdentityError::Ou(_))), "{bad:?}");
        }
        // A good domain and OU get as far as the credentials file.
        let e = id("corp.example.com", Some("OU=VDI,DC=corp,DC=example,DC=com")).check().unwrap_err();
        assert!(matches!(e, IdentityError::Credentials { .. }), "{e}");
    }

    #[test]
    fn meta_data_names_the_hostname_and_uuid() {
        let uuid = new_uuid();
        let d = DesktopIdentity { desktop: "vdim-fin-001", pool: "fin", hostname: "FIN-001".into(), uuid: Some(&uuid) };
        let v: serde_json::Value = serde_json::from_str(&meta_data_json(&d)).unwrap();
        assert_eq!(v["hostname"], "FIN-001");
        assert_eq!(v["uuid"], uuid.as_str());
        assert_eq!(v["meta"]["vdim_desktop"], "vdim-fin-001");
    }

    #[test]
    fn uuids_are_version_4_and_different() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
