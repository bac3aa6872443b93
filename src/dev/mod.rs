//! The dev desktop: an image's draft booted as a desktop so an admin can patch it, and the
//! rule that a draft is never sealed while that desktop still writes to it.
//!
//! `image edit --start` and `image seal` hold the image lock from first look to last step,
//! so one cannot start the dev desktop while the other seals; seal also checks again once
//! the draft is copied, for a desktop started by other means (virsh).

use crate::catalog::Catalog;
use crate::home::Home;
use crate::hypervisor::domain_xml::{self, DesktopSpec, DomainXmlError};
use crate::hypervisor::{DomainState, GraphicsEndpoint, GraphicsKind, Hypervisor, HypervisorError, VNC_PASSWORD_MAX};
use crate::names;
use crate::pool::{self, PoolError};
use crate::profile::{self, Profile};
use crate::store::{Actor, DraftReport, Store, StoreError, VersionReport};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// How long a console ticket printed for the dev desktop stays valid.
const TICKET: Duration = Duration::from_secs(3600);

#[derive(Debug, Error)]
pub enum DevError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error(transparent)]
    DomainXml(#[from] DomainXmlError),
    #[error("the dev desktop {domain} of '{image}' is running and writing to the draft: shut it down first, or seal with --shutdown")]
    Running { image: String, domain: String },
    #[error("the dev desktop {domain} of '{image}' did not shut down within {secs} s after the ACPI request; the draft was not sealed")]
    ShutdownTimeout { image: String, domain: String, secs: u64 },
    #[error("cannot create {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl crate::error::Kind for DevError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            DevError::Store(e) => e.kind(),
            DevError::Pool(e) => e.kind(),
            DevError::Hypervisor(e) => e.kind(),
            DevError::Profile(e) => e.kind(),
            DevError::DomainXml(e) => e.kind(),
            DevError::Running { .. } | DevError::ShutdownTimeout { .. } => K::Conflict,
            DevError::Io { .. } => K::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, DevError>;

#[derive(Debug, Serialize)]
pub struct Console {
    pub kind: GraphicsKind,
    pub listen: String,
    pub port: u16,
    pub password: String,
    pub valid_until: String,
}

#[derive(Debug, Serialize)]
pub struct DevDesktop {
    pub domain: String,
    pub serial_log: Option<String>,
    pub consoles: Vec<Console>,
}

#[derive(Debug, Serialize)]
pub struct EditReport {
    #[serde(flatten)]
    pub draft: DraftReport,
    pub dev_desktop: Option<DevDesktop>,
}

fn active(hv: &dyn Hypervisor, domain: &str) -> Result<bool> {
    match hv.state(domain) {
        Ok((s, _)) => Ok(s != DomainState::ShutOff),
        Err(HypervisorError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The dev desktop service, borrowing the home, catalog, hypervisor and profiles of a
/// [`crate::context::Context`]: it starts, seals and discards drafts together with their
/// dev desktop, each under the image lock.
pub struct Dev<'a> {
    home: &'a Home,
    catalog: &'a mut Catalog,
    hv: &'a dyn Hypervisor,
    profiles: &'a Path,
    virt: &'a str,
}

impl<'a> Dev<'a> {
    pub fn new(
        home: &'a Home,
        catalog: &'a mut Catalog,
        hv: &'a dyn Hypervisor,
        profiles: &'a Path,
        virt: &'a str,
    ) -> Dev<'a> {
        Dev { home, catalog, hv, profiles, virt }
    }

    fn store(&mut self) -> Store<'_> {
        Store::new(self.home, self.catalog)
    }

    /// The dev desktop's domain: `names::dev_domain`, or the name an older vdim gave it while
    /// that domain is still defined and is no pool's desktop.
    pub fn domain_name(&mut self, image: &str) -> Result<String> {
        let legacy = names::legacy_dev_domain(image);
        if self.hv.exists(&legacy)? && self.catalog.read(|tx| tx.desktop(&legacy)).map_err(StoreError::from)?.is_none()
        {
            return Ok(legacy);
        }
        Ok(names::dev_domain(image))
    }

    /// `image edit --start`: the draft (made or handed back) booted as the dev desktop with
    /// `profile`, all under the image lock, so a seal never runs in between.
    pub fn edit_and_start(
        &mut self,
        image: &str,
        from: Option<u32>,
        actor: &Actor,
        profile: &str,
    ) -> Result<EditReport> {
        names::validate("image", image).map_err(StoreError::from)?;
        let locks = self.store().lock_image(image)?;
        let draft = self.store().edit_locked(&locks, image, from, actor)?;
        let dev_desktop = self.start(&draft, profile)?;
        drop(locks);
        Ok(EditReport { draft, dev_desktop: Some(dev_desktop) })
    }

    /// Boot the draft as a dev desktop (defined once, started if not running) and hand out
    /// one-time console tickets for it. The caller holds the image lock.
    fn start(&mut self, draft: &DraftReport, profile: &str) -> Result<DevDesktop> {
        let domain = self.domain_name(&draft.image)?;
        let hv = self.hv;
        let profile = Profile::load(self.profiles, profile)?;
        let run = self.home.dev_run();
        crate::home::create_private_dir(&run)
            .map_err(|source| DevError::Io { path: run.display().to_string(), source })?;
        let serial = run.join(format!("{}.serial.log", draft.image));
        let nvram = run.join(format!("{}.nvram", draft.image));
        if !hv.exists(&domain)? {
            let secret = pool::random_secret(16);
            let spec = DesktopSpec {
                name: &domain,
                uuid: None,
                disk: &draft.draft,
                serial_log: profile.wants_serial_log().then_some(serial.as_path()),
                nvram: profile.uses_uefi().then_some(nvram.as_path()),
                config_drive: None,
                graphics_password: &secret,
                listen: "127.0.0.1",
                display_tls: false,
                pool: &draft.image,
                version: draft.base_version,
            };
            hv.define(&domain_xml::domain_xml(&profile, pool::parse_virt_type(self.virt)?, &spec)?)?;
        }
        if !active(hv, &domain)? {
            hv.start(&domain)?;
        }
        let until = SystemTime::now() + TICKET;
        let mut consoles = vec![];
        for kind in [GraphicsKind::Spice, GraphicsKind::Vnc] {
            // Hex: two characters a byte. VNC takes VNC_PASSWORD_MAX at most; SPICE gets a longer ticket.
            let password = pool::random_secret(if kind == GraphicsKind::Vnc { VNC_PASSWORD_MAX / 2 } else { 16 });
            match hv.set_graphics_password(&domain, kind, &password, until) {
                // Dev desktops listen on loopback in plaintext, so the plain port is always there.
                Ok(GraphicsEndpoint { listen, port: Some(port), .. }) => consoles.push(Console {
                    kind,
                    listen,
                    port,
                    password,
                    valid_until: humantime::format_rfc3339_seconds(until).to_string(),
                }),
                Ok(_) | Err(HypervisorError::NoGraphics { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(DevDesktop {
            domain,
            serial_log: profile.wants_serial_log().then(|| serial.display().to_string()),
            consoles,
        })
    }

    /// Seal the draft, refusing while the dev desktop runs unless `shutdown` (ACPI request,
    /// wait up to `timeout`, then seal). The dev desktop is removed once its draft is sealed.
    pub fn seal(
        &mut self,
        image: &str,
        note: &str,
        actor: &Actor,
        shutdown: Option<Duration>,
    ) -> Result<VersionReport> {
        names::validate("image", image).map_err(StoreError::from)?;
        let locks = self.store().lock_image(image)?;
        let domain = self.domain_name(image)?;
        let hv = self.hv;
        if active(hv, &domain)? {
            let Some(timeout) = shutdown else {
                return Err(DevError::Running { image: image.into(), domain });
            };
            hv.shutdown(&domain)?;
            let deadline = Instant::now() + timeout;
            while active(hv, &domain)? {
                if Instant::now() >= deadline {
                    return Err(DevError::ShutdownTimeout { image: image.into(), domain, secs: timeout.as_secs() });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        crate::test_hook::pause(crate::test_hook::SEAL_COPY);
        let v = self.store().seal_locked(&locks, image, note, actor, || match active(hv, &domain) {
            Ok(false) => Ok(()),
            Ok(true) => Err(StoreError::DraftInUse {
                image: image.into(),
                why: format!("its dev desktop {domain} was started; shut it down and seal again"),
            }),
            Err(e) => Err(StoreError::DraftInUse {
                image: image.into(),
                why: format!("cannot tell whether {domain} runs: {e}"),
            }),
        })?;
        self.remove(image)?;
        Ok(v)
    }

    /// Throw the draft away, and its dev desktop with it.
    pub fn discard(&mut self, image: &str, actor: &Actor) -> Result<()> {
        self.remove(image)?;
        Ok(self.store().discard(image, actor)?)
    }

    /// Take the dev desktop away (after seal or discard); nothing to do when there is none.
    fn remove(&mut self, image: &str) -> Result<()> {
        let domain = self.domain_name(image)?;
        match self.hv.destroy(&domain).and_then(|_| self.hv.undefine(&domain)) {
            Ok(()) | Err(HypervisorError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;
