//! One desktop's files and domain: the steps a pool command takes for each desktop, on the
//! fleet's threads (no catalog here: the caller records before and after).

use super::{display_tls, io, nvram_rel, parse_virt_type, random_secret, syncfs, PoolError, Result};
use crate::catalog::{Desktop, Pool};
use crate::fleet::{self, Progress};
use crate::home::Home;
use crate::hypervisor::domain_xml::{self, DesktopSpec};
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError};
use crate::identity::{self, IdentityError};
use crate::profile::Profile;
use crate::{qcow2, store};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a persistent desktop gets to shut down cleanly before it is stopped hard.
const CLEAN_SHUTDOWN: Duration = Duration::from_secs(60);

/// A desktop whose reset is due: a fresh overlay on its version, defined afresh unless its
/// pool is persistent, booted when `boot`.
pub(super) struct Reset<'p> {
    pub pool: &'p Pool,
    /// The pool's profile, for desktops defined afresh.
    pub profile: Option<&'p Profile>,
    pub desktop: Desktop,
    pub digest: String,
    pub virtual_size: u64,
    pub boot: bool,
}

/// What acts on desktops' files and domains; shared by the fleet's threads.
#[derive(Clone, Copy)]
pub(super) struct Desktops<'a> {
    pub home: &'a Home,
    pub hv: &'a dyn Hypervisor,
    pub progress: &'a dyn Progress,
    /// Once set, [`Desktops::reset`] boots nothing more.
    pub halt: Option<&'a AtomicBool>,
}

impl Desktops<'_> {
    /// `step` for every item at once; each item's outcome apart. Twice as many desktops as the
    /// host serves calls are under way, so one waiting for QEMU to exit never holds the next
    /// desktop's define or start back; the hypervisor itself keeps its calls in flight within
    /// its bound.
    pub fn each<T: Sync, R: Send>(&self, items: &[T], what: &str, step: impl Fn(&T) -> R + Sync) -> Vec<R> {
        fleet::run(self.hv.parallel() * 2, items, what, self.progress, step)
    }

    pub fn overlay_path(&self, d: &Desktop) -> PathBuf {
        self.home.root().join(&d.overlay)
    }

    pub fn serial_log(&self, pool: &str, desktop: &str) -> PathBuf {
        self.home.pool_run(pool).join(format!("{desktop}.serial.log"))
    }

    /// A desktop's UEFI variables: beside its overlay, since they belong to it as its disk does.
    pub fn nvram_path(&self, pool: &str, desktop: &str) -> PathBuf {
        self.home.root().join(nvram_rel(pool, desktop))
    }

    pub fn config_drive(&self, pool: &str, desktop: &str) -> PathBuf {
        self.home.pool_run(pool).join(super::config_drive_name(desktop))
    }

    /// (Re)build a desktop's config drive when its pool gives identities, reading the
    /// credentials and user data files now.
    pub fn write_config_drive(
        &self,
        pool: &Pool,
        index: u32,
        desktop: &str,
        uuid: Option<&str>,
    ) -> std::result::Result<(), IdentityError> {
        let Some(id) = &pool.identity else { return Ok(()) };
        let d = identity::DesktopIdentity {
            desktop,
            pool: &pool.name,
            hostname: identity::hostname(&id.hostname_pattern, index),
            uuid,
        };
        let files = identity::drive_files(id, &d)?;
        identity::build_drive(desktop, &self.config_drive(&pool.name, desktop), &files)?;
        Ok(())
    }

    pub fn define(
        &self,
        pool: &Pool,
        profile: &Profile,
        name: &str,
        uuid: &str,
        overlay: &Path,
        version: u32,
    ) -> Result<()> {
        let serial = self.serial_log(&pool.name, name);
        let nvram = self.nvram_path(&pool.name, name);
        let drive = self.config_drive(&pool.name, name);
        let secret = random_secret(16);
        let spec = DesktopSpec {
            name,
            uuid: Some(uuid),
            config_drive: pool.identity.is_some().then_some(drive.as_path()),
            disk: overlay,
            serial_log: profile.wants_serial_log().then_some(serial.as_path()),
            nvram: profile.uses_uefi().then_some(nvram.as_path()),
            graphics_password: &secret,
            listen: &pool.display_listen,
            display_tls: display_tls(&pool.display_listen, pool.insecure_display),
            pool: &pool.name,
            version,
        };
        let virt = parse_virt_type(&pool.virt_type)?;
        let xml = domain_xml::domain_xml(profile, virt, &spec)?;
        self.hv.define(&xml)?;
        Ok(())
    }

    /// Stop and undefine a domain, ignoring one that is already gone.
    pub fn remove_domain(&self, name: &str) -> Result<()> {
        match self.hv.destroy(name).and_then(|_| self.hv.undefine(name)) {
            Ok(()) | Err(HypervisorError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn is_active(&self, name: &str) -> Result<bool> {
        match self.hv.state(name) {
            Ok((s, _)) => Ok(!matches!(s, DomainState::ShutOff)),
            Err(HypervisorError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Boots the desktop unless it runs; whether this call booted it.
    pub fn start(&self, name: &str) -> Result<bool> {
        if self.is_active(name)? {
            return Ok(false);
        }
        self.hv.start(name)?;
        Ok(true)
    }

    /// Stops the desktop if it runs, after an ACPI shutdown of up to a minute when `clean`
    /// (a persistent desktop's disk should be consistent); whether it ran.
    pub fn stop(&self, name: &str, clean: bool) -> Result<bool> {
        if !self.is_active(name)? {
            return Ok(false);
        }
        if clean {
            let _ = self.hv.shutdown(name);
            let deadline = Instant::now() + CLEAN_SHUTDOWN;
            while self.is_active(name)? && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        self.hv.destroy(name)?;
        Ok(true)
    }

    /// Write fresh, empty overlays (path, digest, virtual size), each replacing any old one
    /// atomically. All are written, made durable with one `syncfs`, then renamed into place
    /// and the directories synced: a crash leaves each overlay old or new, never torn, and
    /// hundreds cost one sync instead of hundreds.
    pub fn write_overlays(&self, overlays: &[(PathBuf, String, u64)]) -> Result<()> {
        let mut tmps = Vec::with_capacity(overlays.len());
        let cleanup = |tmps: &[PathBuf]| tmps.iter().for_each(|t| drop(fs::remove_file(t)));
        for (path, digest, vsize) in overlays {
            let dir = path.parent().expect("overlay has a directory");
            let tmp = Home::tmp_path(dir, "overlay.qcow2");
            if let Err(e) = qcow2::create_overlay_unsynced(&tmp, &store::backing_from(2, digest), "qcow2", *vsize) {
                cleanup(&tmps);
                return Err(e.into());
            }
            tmps.push(tmp);
        }
        let Some((first, ..)) = overlays.first() else { return Ok(()) };
        let dir = first.parent().expect("overlay has a directory");
        if let Err(e) = syncfs(dir) {
            cleanup(&tmps);
            return Err(e);
        }
        for (tmp, (path, ..)) in tmps.iter().zip(overlays) {
            fs::rename(tmp, path).map_err(|e| {
                cleanup(&tmps);
                PoolError::Io { what: "replace overlay", path: path.display().to_string(), source: e }
            })?;
        }
        let mut dirs: Vec<&Path> = overlays.iter().filter_map(|(p, ..)| p.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            fs::File::open(d).and_then(|f| f.sync_all()).map_err(io("sync", d))?;
        }
        Ok(())
    }

    /// One desktop's reset after its new overlay is in place (a running QEMU keeps the old
    /// one open until it exits): stopped, defined afresh with its UUID when not persistent
    /// (its NVRAM and TPM state go with the old definition), booted when due. Whether it booted.
    pub fn reset(&self, r: &Reset) -> Result<bool> {
        let d = &r.desktop;
        if self.is_active(&d.name)? {
            self.hv.destroy(&d.name)?;
        }
        if let Some(profile) = r.profile {
            match self.hv.undefine(&d.name) {
                Ok(()) | Err(HypervisorError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // The desktop keeps its UUID (its identity); the TPM state went with the definition.
            let uuid = d.uuid.clone().unwrap_or_else(identity::new_uuid);
            self.define(r.pool, profile, &d.name, &uuid, &self.overlay_path(d), d.version)?;
        }
        let boot = r.boot && !self.halt.is_some_and(|h| h.load(Ordering::SeqCst));
        if boot {
            self.hv.start(&d.name)?;
        }
        Ok(boot)
    }
}
