//! One desktop's files and domain: the steps a pool command takes for each desktop, on the
//! fleet's threads (no catalog here: the caller records before and after).

use super::sites::{layer_on, Sites};
use super::{display_tls, io, nvram_rel, parse_virt_type, random_secret, syncfs, PoolError, Result};
use crate::catalog::{Desktop, Pool};
use crate::fleet::{self, Progress};
use crate::home::Home;
use crate::hypervisor::domain_xml::{self, DesktopSpec};
use crate::hypervisor::{DomainState, HypervisorError};
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
    /// The pool's profile: a non-persistent desktop is defined afresh from it, a persistent
    /// one only when its domain is gone.
    pub profile: Option<&'p Profile>,
    pub desktop: Desktop,
    pub digest: String,
    pub virtual_size: u64,
    pub boot: bool,
}

/// What acts on desktops' files and domains, on whichever host each is; shared by the
/// fleet's threads. A desktop is named by its host (none: the local libvirt) and name.
#[derive(Clone, Copy)]
pub(super) struct Desktops<'a> {
    pub home: &'a Home,
    pub sites: &'a Sites<'a>,
    pub progress: &'a dyn Progress,
    /// Once set, [`Desktops::reset`] boots nothing more.
    pub halt: Option<&'a AtomicBool>,
}

impl Desktops<'_> {
    /// `step` for every item at once; each item's outcome apart. Twice as many desktops as the
    /// host serves calls are under way, so one waiting for QEMU to exit never holds the next
    /// desktop's define or start back; the hypervisor itself keeps its calls in flight within
    /// its bound.
    /// Every host bounds its own calls in flight (its connections); the fleet keeps twice as
    /// many desktops under way as all the hosts serve together.
    pub fn each<T: Sync, R: Send>(&self, items: &[T], what: &str, step: impl Fn(&T) -> R + Sync) -> Vec<R> {
        fleet::run(self.sites.parallel() * 2, items, what, self.progress, step)
    }

    /// Its overlay: in the home (a relative path there) or on its host (the path there).
    pub fn overlay_path(&self, d: &Desktop) -> PathBuf {
        self.home.root().join(&d.overlay)
    }

    /// A file of a desktop on a host: in that host's desktop store.
    fn on_host(&self, host: i64, file: &str) -> Result<PathBuf> {
        Ok(self.sites.desktop_store(host)?.1.join(file))
    }

    /// Where a new desktop's overlay goes.
    pub fn overlay_for(&self, host: Option<i64>, pool: &str, desktop: &str) -> Result<PathBuf> {
        match host {
            None => Ok(self.home.root().join(super::overlay_rel(pool, desktop))),
            Some(h) => self.on_host(h, &format!("{desktop}.qcow2")),
        }
    }

    pub fn serial_log(&self, host: Option<i64>, pool: &str, desktop: &str) -> Result<PathBuf> {
        match host {
            None => Ok(self.home.pool_run(pool).join(format!("{desktop}.serial.log"))),
            Some(h) => self.on_host(h, &format!("{desktop}.serial.log")),
        }
    }

    /// A desktop's UEFI variables: beside its overlay, since they belong to it as its disk does.
    pub fn nvram_path(&self, host: Option<i64>, pool: &str, desktop: &str) -> Result<PathBuf> {
        match host {
            None => Ok(self.home.root().join(nvram_rel(pool, desktop))),
            Some(h) => self.on_host(h, &format!("{desktop}.nvram")),
        }
    }

    /// The config drive as built here (it is uploaded to a desktop's host).
    pub fn config_drive(&self, pool: &str, desktop: &str) -> PathBuf {
        self.home.pool_run(pool).join(super::config_drive_name(desktop))
    }

    /// The config drive where the desktop's domain reads it.
    fn config_drive_at(&self, host: Option<i64>, pool: &str, desktop: &str) -> Result<PathBuf> {
        match host {
            None => Ok(self.config_drive(pool, desktop)),
            Some(h) => self.on_host(h, &super::config_drive_name(desktop)),
        }
    }

    /// A fresh overlay of a desktop on a host: written here (the same writer as the home's),
    /// its old volume deleted there and the new one uploaded (libvirt cannot rename a volume;
    /// the reset stays due in the catalog until the desktop boots, so a crash between the two
    /// is finished by the next heal). Its backing is the layer's path in the host's store.
    pub fn write_host_overlay(&self, host: i64, pool: &str, desktop: &str, digest: &str, vsize: u64) -> Result<()> {
        let h = self.sites.host(host)?;
        let (spool, _) = self.sites.desktop_store(host)?;
        let hv = self.sites.hv(Some(host))?;
        let tmp = Home::tmp_path(&self.home.pool_run(pool), &format!("{desktop}.qcow2"));
        let backing = layer_on(h, digest).display().to_string();
        let result = (|| -> Result<()> {
            qcow2::create_overlay_unsynced(&tmp, &backing, "qcow2", vsize)?;
            let volume = format!("{desktop}.qcow2");
            hv.delete_volume(&spool, &volume)?;
            hv.upload_disk(&spool, &volume, &tmp)?;
            Ok(())
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Removes a removed desktop's files, wherever they are.
    pub fn remove_files(&self, d: &Desktop, pool: &str) -> Result<()> {
        if let Some(h) = d.host_id {
            return self.remove_host_files(h, &d.name);
        }
        let _ = fs::remove_file(self.overlay_path(d));
        let _ = fs::remove_file(self.nvram_path(None, pool, &d.name)?);
        let _ = fs::remove_file(self.serial_log(None, pool, &d.name)?);
        let _ = fs::remove_file(self.config_drive(pool, &d.name));
        Ok(())
    }

    /// Removes what a desktop on a host keeps in its desktop store (on a fenced host: nothing
    /// now, `host unfence` does).
    pub fn remove_host_files(&self, host: i64, desktop: &str) -> Result<()> {
        if matches!(self.sites.hv(Some(host)), Err(PoolError::HostFenced(_))) {
            return Ok(());
        }
        let (spool, _) = self.sites.desktop_store(host)?;
        let hv = self.sites.hv(Some(host))?;
        for f in super::sites::desktop_files(desktop) {
            hv.delete_volume(&spool, &f)?;
        }
        Ok(())
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

    /// The config drive built here, uploaded to the desktop's host (read-only there).
    pub fn upload_config_drive(&self, host: i64, pool: &str, desktop: &str) -> Result<()> {
        let (spool, _) = self.sites.desktop_store(host)?;
        let hv = self.sites.hv(Some(host))?;
        let volume = super::config_drive_name(desktop);
        hv.delete_volume(&spool, &volume)?;
        hv.upload_volume(&spool, &volume, &self.config_drive(pool, desktop), &mut |_| {})?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn define(
        &self,
        pool: &Pool,
        profile: &Profile,
        host: Option<i64>,
        name: &str,
        uuid: &str,
        overlay: &Path,
        version: u32,
    ) -> Result<()> {
        let serial = self.serial_log(host, &pool.name, name)?;
        let nvram = self.nvram_path(host, &pool.name, name)?;
        let drive = self.config_drive_at(host, &pool.name, name)?;
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
        self.sites.hv(host)?.define(&xml)?;
        Ok(())
    }

    /// Stop and undefine a domain, ignoring one that is already gone. On a fenced host (it is
    /// off) nothing is called: `host unfence` removes what the catalog no longer places there.
    pub fn remove_domain(&self, host: Option<i64>, name: &str) -> Result<()> {
        let hv = match self.sites.hv(host) {
            Err(PoolError::HostFenced(_)) => return Ok(()),
            other => other?,
        };
        match hv.destroy(name).and_then(|_| hv.undefine(name)) {
            Ok(()) | Err(HypervisorError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the domain runs; never on a fenced host (it is off).
    pub fn is_active(&self, host: Option<i64>, name: &str) -> Result<bool> {
        let hv = match self.sites.hv(host) {
            Err(PoolError::HostFenced(_)) => return Ok(false),
            other => other?,
        };
        match hv.state(name) {
            Ok((s, _)) => Ok(!matches!(s, DomainState::ShutOff)),
            Err(HypervisorError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Boots the desktop unless it runs; whether this call booted it.
    pub fn start(&self, d: &Desktop) -> Result<bool> {
        if self.is_active(d.host_id, &d.name)? {
            return Ok(false);
        }
        self.sites.hv(d.host_id)?.start(&d.name)?;
        Ok(true)
    }

    /// Stops the desktop if it runs, after an ACPI shutdown of up to a minute when `clean`
    /// (a persistent desktop's disk should be consistent); whether it ran.
    pub fn stop(&self, d: &Desktop, clean: bool) -> Result<bool> {
        let (host, name) = (d.host_id, d.name.as_str());
        if !self.is_active(host, name)? {
            return Ok(false);
        }
        let hv = self.sites.hv(host)?;
        if clean {
            let _ = hv.shutdown(name);
            let deadline = Instant::now() + CLEAN_SHUTDOWN;
            while self.is_active(host, name)? && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        hv.destroy(name)?;
        Ok(true)
    }

    /// Write fresh, empty overlays in the home (path, digest, virtual size), each replacing any old one
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
    /// (its NVRAM and TPM state go with the old definition) or when its domain is gone,
    /// booted when due. Whether it booted.
    pub fn reset(&self, r: &Reset) -> Result<bool> {
        let d = &r.desktop;
        if let Some(host) = d.host_id {
            // Written before the old QEMU is stopped, as the home's overlays are (it keeps its
            // open file until it exits).
            self.write_host_overlay(host, &r.pool.name, &d.name, &r.digest, r.virtual_size)?;
            if r.pool.identity.is_some() {
                self.upload_config_drive(host, &r.pool.name, &d.name)?;
            }
        }
        let hv = self.sites.hv(d.host_id)?;
        if self.is_active(d.host_id, &d.name)? {
            hv.destroy(&d.name)?;
        }
        let kept = r.pool.persistent && hv.exists(&d.name)?;
        if let Some(profile) = r.profile.filter(|_| !kept) {
            if !r.pool.persistent {
                match hv.undefine(&d.name) {
                    Ok(()) | Err(HypervisorError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // The desktop keeps its UUID (its identity); the TPM state went with the definition.
            let uuid = d.uuid.clone().unwrap_or_else(identity::new_uuid);
            self.define(r.pool, profile, d.host_id, &d.name, &uuid, &self.overlay_path(d), d.version)?;
        }
        let boot = r.boot && !self.halt.is_some_and(|h| h.load(Ordering::SeqCst));
        if boot {
            hv.start(&d.name)?;
        }
        Ok(boot)
    }
}
