//! The layout of a vdim home directory (`--home`, `$VDIM_HOME`).
//!
//! ```text
//! $VDIM_HOME/
//!   catalog.db            SQLite catalog (WAL)
//!   layers/<sha256>.qcow2 sealed version layers, mode 0440, backing = "<parent sha256>.qcow2"
//!   layers/.tmp-<pid>-*   work in progress of a running command (gc removes dead ones)
//!   drafts/<image>-*.qcow2 writable dev clones, backing = "../layers/<sha256>.qcow2"
//!   desktops/<pool>/      desktop overlays, backing = "../../layers/<sha256>.qcow2", and NVRAM
//!   locks/                flock files: one per image, pool and rollout, one for the whole store
//!   run/<pool>/           serial logs of a pool's desktops (their NVRAM is beside their overlays)
//!   run/_dev/             serial logs and NVRAM of dev desktops (`_` starts no pool name)
//! ```
//! Every name below `desktops/`, `run/` and `locks/` comes from `names`, which keeps them disjoint.
//! Backing paths are relative so the whole home can move without breaking a chain.
//!
//! Desktops' disks hold users' data and the catalog holds token hashes, so nothing in the
//! home is readable by other local users: directories are 0700, files 0600, sealed layers
//! 0440. Modes are set when a file is created (explicit modes, and a 077 umask for what
//! qemu-img and SQLite create), never by a chmod after a window in which it was readable.

use crate::names;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every directory vdim creates in its home.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of overlays, drafts, the catalog and other files vdim creates in its home.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of a sealed layer: read-only, never readable by other users. `verify` accepts this
/// or stricter.
pub const LAYER_MODE: u32 = 0o440;

/// Files this process and its children (qemu-img) create get no group or other bits unless
/// given explicitly. Called once at the start of `vdim`.
pub fn private_umask() {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
}

/// `mkdir -p` whose new directories are 0700 from the start; an existing directory that
/// others can reach is made 0700 too.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(path)?;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR))?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `/var/lib/vdim` for root, `$XDG_DATA_HOME/vdim` (or `~/.local/share/vdim`) otherwise.
    pub fn default_root() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/vdim");
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("vdim");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".local/share/vdim")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.db")
    }
    /// Where a home whose catalog is a PostgreSQL database keeps its URL (0600), written by
    /// `vdim init --catalog postgres://…` so later commands need no flag.
    pub fn catalog_url(&self) -> PathBuf {
        self.root.join("catalog.url")
    }
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }
    pub fn layer(&self, digest: &str) -> PathBuf {
        self.layers().join(layer_file_name(digest))
    }
    pub fn drafts(&self) -> PathBuf {
        self.root.join("drafts")
    }
    pub fn desktops(&self) -> PathBuf {
        self.root.join("desktops")
    }
    pub fn pool_dir(&self, pool: &str) -> PathBuf {
        self.desktops().join(pool)
    }
    pub fn locks(&self) -> PathBuf {
        self.root.join("locks")
    }
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Files an admin puts here to be pools' OpenStack user data: the only place the admin
    /// API takes them from, so an API token cannot copy an arbitrary host file into guests.
    pub fn user_data(&self) -> PathBuf {
        self.root.join("user-data")
    }
    /// Runtime files of `pool`'s desktops.
    pub fn pool_run(&self, pool: &str) -> PathBuf {
        self.run().join(names::pool_run_dir(pool))
    }
    /// Runtime files of dev desktops.
    pub fn dev_run(&self) -> PathBuf {
        self.run().join(names::DEV_RUN_DIR)
    }

    /// Every directory a working home has.
    pub fn dirs(&self) -> [PathBuf; 6] {
        [self.root.clone(), self.layers(), self.drafts(), self.desktops(), self.locks(), self.run()]
    }

    /// A unique name for work in progress inside `dir`; the pid lets gc and verify tell a
    /// running command's file from a dead one's.
    pub fn tmp_path(dir: &Path, what: &str) -> PathBuf {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        dir.join(format!(".tmp-{}-{nanos}-{what}", std::process::id()))
    }
}

pub fn layer_file_name(digest: &str) -> String {
    format!("{digest}.qcow2")
}

/// The pid a `.tmp-<pid>-...` file name belongs to.
pub fn tmp_owner(file_name: &str) -> Option<i32> {
    file_name.strip_prefix(".tmp-")?.split('-').next()?.parse().ok()
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_carry_the_owner_pid() {
        let p = Home::tmp_path(Path::new("/x"), "import-a");
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(tmp_owner(name), Some(std::process::id() as i32));
        assert!(pid_alive(std::process::id() as i32));
        assert_eq!(tmp_owner("abc.qcow2"), None);
    }

    #[test]
    fn private_dirs_are_0700_even_when_they_existed_open() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("a/b");
        create_private_dir(&new).unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&open).unwrap();
        for p in [d.path().join("a"), new, open] {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, PRIVATE_DIR, "{p:?}");
        }
    }
}
