//! The domain-join credentials file: the one place the join secret comes from.
//!
//! Same format as mount.cifs credentials files, one `key=value` a line:
//! ```text
//! username=svc-vdi-join
//! password=...
//! domain=CORP          (optional: the account's domain; the join domain when absent)
//! ```
//! Like ssh with a private key, vdim refuses a file that anyone but its owner may read or
//! write, or that is not owned by root or the user vdim runs as. No error ever quotes the file.

use super::{IdentityError, Result};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// More than any real credentials file.
const MAX_BYTES: u64 = 4096;

/// A domain account allowed to join computers. `Debug` never shows the password.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub domain: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("domain", &self.domain)
            .finish()
    }
}

impl Credentials {
    /// Reads and checks the file (absolute path, regular file, not a symlink, private).
    pub fn read(path: &Path) -> Result<Credentials> {
        let bad =
            |problem: &str| IdentityError::Credentials { path: path.display().to_string(), problem: problem.into() };
        if !path.is_absolute() {
            return Err(bad("must be given as an absolute path (it is read again at every desktop reset)"));
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => bad("does not exist"),
                _ if e.raw_os_error() == Some(libc::ELOOP) => bad("is a symbolic link: give the file itself"),
                _ => IdentityError::Credentials {
                    path: path.display().to_string(),
                    problem: format!("cannot be read: {e}"),
                },
            })?;
        let meta = f.metadata().map_err(|e| bad(&format!("cannot be read: {e}")))?;
        if !meta.is_file() {
            return Err(bad("is not a regular file"));
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != 0 && meta.uid() != me {
            return Err(bad("is not owned by root or the user vdim runs as"));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(&format!(
                "is accessible by others (mode {:04o}): it holds a domain password; chmod 600 it",
                meta.mode() & 0o7777
            )));
        }
        if meta.len() > MAX_BYTES {
            return Err(bad(&format!("is larger than {MAX_BYTES} bytes")));
        }
        let mut text = String::new();
        f.by_ref().take(MAX_BYTES).read_to_string(&mut text).map_err(|_| bad("is not UTF-8 text"))?;
        Self::parse(&text).map_err(bad)
    }

    /// The problem, if any, names only keys and line numbers, never a value.
    fn parse(text: &str) -> std::result::Result<Credentials, &'static str> {
        let (mut username, mut password, mut domain) = (None, None, None);
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err("has a line that is not key=value (username=, password=, domain=)");
            };
            let slot = match key.trim() {
                "username" | "user" => &mut username,
                "password" | "pass" => &mut password,
                "domain" => &mut domain,
                _ => return Err("has a key other than username, password and domain"),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err("gives a key twice");
            }
        }
        let username = username.map(|u| u.trim().to_string()).filter(|u| !u.is_empty());
        let Some(username) = username else { return Err("has no username= line") };
        let Some(password) = password.filter(|p| !p.is_empty()) else { return Err("has no password= line") };
        if [&username, &password].iter().any(|v| v.chars().any(char::is_control)) {
            return Err("has a control character in a value");
        }
        let domain = domain.map(|d| d.trim().to_string()).filter(|d| !d.is_empty());
        Ok(Credentials { username, password, domain })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join("join.cred");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            Credentials::read(&file(dir.path(), "username=svc\npassword=p=w d\n# x\ndomain=CORP\n", 0o600)).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str(), c.domain.as_deref()), ("svc", "p=w d", Some("CORP")));
        assert!(!format!("{c:?}").contains("p=w d"), "Debug hides the password");
    }

    #[test]
    fn files_others_can_read_or_write_are_refused_like_ssh_keys() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644] {
            let e = Credentials::read(&file(dir.path(), "username=a\npassword=SECRETPW\n", mode)).unwrap_err();
            let s = e.to_string();
            assert!(s.contains("accessible by others") && s.contains("join.cred"), "{mode:o}: {s}");
            assert!(!s.contains("SECRETPW"));
        }
        for mode in [0o600, 0o400] {
            Credentials::read(&file(dir.path(), "username=a\npassword=b\n", mode)).unwrap();
        }
    }

    #[test]
    fn missing_linked_relative_and_malformed_files_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = Credentials::read(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let real = file(dir.path(), "username=a\npassword=b\n", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(Credentials::read(&link).unwrap_err().to_string().contains("symbolic link"));
        assert!(Credentials::read(Path::new("join.cred")).unwrap_err().to_string().contains("absolute"));
        for (text, why) in [
            ("username=a\n", "no password"),
            ("password=SECRETPW\n", "no username"),
            ("username=a\nSECRETPW\n", "not key=value"),
            ("username=a\npassword=SECRETPW\nsecret=SECRETPW\n", "other than"),
            ("username=a\npassword=SECRETPW\npassword=SECRETPW\n", "twice"),
        ] {
            let e = Credentials::read(&file(dir.path(), text, 0o600)).unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains("SECRETPW"), "{text:?}: {e}");
        }
    }
}
