//! The layout of a vdim home directory (`--home`, `$VDIM_HOME`).
//!
//! ```text
//! $VDIM_HOME/
//!   catalog.db            SQLite catalog (WAL)
//!   layers/<sha256>.qcow2 sealed version layers, mode 0444, backing = "<parent sha256>.qcow2"
//!   layers/.tmp-<pid>-*   work in progress of a running command (gc removes dead ones)
//!   drafts/<image>-*.qcow2 writable dev clones, backing = "../layers/<sha256>.qcow2"
//!   desktops/<pool>/      desktop overlays, backing = "../../layers/<sha256>.qcow2"
//!   locks/                flock files: one per image, pool and rollout, one for the whole store
//!   run/<pool>/           serial logs, NVRAM of a pool's desktops
//!   run/_dev/             the same for dev desktops (`_` starts no pool name)
//! ```
//! Every name below `desktops/`, `run/` and `locks/` comes from `names`, which keeps them disjoint.
//! Backing paths are relative so the whole home can move without breaking a chain.

use crate::names;
use std::path::{Path, PathBuf};

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
}
