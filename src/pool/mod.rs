//! Pools: sets of identical desktops (libvirt domains) that boot from one image version
//! through thin copy-on-write overlays.
//!
//! ```text
//!  layers/<v3>.qcow2 (0440) ◄── desktops/finance/vdim-finance-001.qcow2 ◄── domain vdim-finance-001
//!                           ◄── desktops/finance/vdim-finance-002.qcow2 ◄── domain vdim-finance-002
//! ```
//! Moving a desktop to another version never copies data: its overlay is replaced by a new
//! empty one on the other layer (O(1)). Which moves are allowed is decided in `rules`; this
//! module gathers the facts and carries the plan out, catalog first (`needs_reset`), files
//! and domains after, so a crash is healed by the next command (`heal`).

use crate::catalog::pools::{NewDesktop, NewPool};
use crate::catalog::{Audit, Catalog, CatalogError, Channel, Desktop, Pool, Tx};
use crate::fleet::{Failure, Progress, Quiet};
use crate::home::Home;
use crate::hypervisor::domain_xml::{self, DomainXmlError, VirtType};
use crate::hypervisor::{Connections, DomainState, GraphicsEndpoint, Hypervisor, HypervisorError};
use crate::identity::{self, DomainJoin, Identity, IdentityError};
use crate::lock::{self, Lock, LockError};
use crate::names::{self, NameError};
use crate::profile::{self, Profile, ProfileError};
use crate::qcow2::Qcow2Error;
use crate::rules::{self, Denied, DesktopFacts, MovePlan, PoolFacts, VersionFacts};
use crate::store::{Actor, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use thiserror::Error;

/// Desktop names carry a three-digit index.
pub const MAX_POOL_SIZE: u32 = names::MAX_DESKTOP_INDEX;

/// Where a pool's desktop displays listen unless told otherwise: only this host reaches them.
pub const DEFAULT_DISPLAY_LISTEN: &str = "127.0.0.1";

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    DomainXml(#[from] DomainXmlError),
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("no pool named '{0}' (see 'vdim pool list')")]
    NotFound(String),
    #[error("no host named '{0}' (see 'vdim host list')")]
    NoHost(String),
    #[error("host {0} of a desktop is no longer registered")]
    HostGone(i64),
    #[error("host '{0}' is fenced: vdim calls nothing there until it is back ('vdim host unfence {0}')")]
    HostFenced(String),
    #[error("pool '{pool}': {why}")]
    Placement { pool: String, why: String },
    #[error(
        "the display of desktop '{desktop}' listens on loopback on host '{host}', which nothing but that host \
         reaches: create pools on hosts with --display-listen 0.0.0.0 (or the hosts' address)"
    )]
    DisplayOnLoopback { desktop: String, host: String },
    #[error(
        "desktop '{desktop}' was not reset: version {version} is pending on host '{host}' (its chain is not \
         verified there: 'vdim host sync {host}'); it is not handed out before its reset"
    )]
    Pending { desktop: String, version: u32, host: String },
    #[error("pool '{0}' already exists")]
    Exists(String),
    #[error("pool size {size} is not possible: a pool has 1 to {max} desktops")]
    Size { size: u32, max: u32 },
    #[error("pool name '{0}' is too long for desktop names: use at most 50 characters")]
    NameTooLong(String),
    #[error("domain {domain} is the dev desktop of image '{image}' (named by an older vdim) and would be a desktop of pool '{pool}': seal or discard the draft of '{image}' first")]
    LegacyDevDesktop { domain: String, image: String, pool: String },
    #[error("no desktop named '{0}'")]
    DesktopNotFound(String),
    #[error("desktop '{desktop}' is in use by {user}: {what}")]
    InUse { desktop: String, user: String, what: String },
    #[error(
        "desktop '{desktop}' of pool '{pool}' was not handed out: the media of its identity drive, which \
         holds the domain-join secret, could not be ejected"
    )]
    Eject { desktop: String, pool: String, source: Box<HypervisorError> },
    #[error(
        "desktop '{desktop}' was not reset: its identity drive could not be built; it stays as it was and \
         is not handed out before its reset (fix the cause, then 'vdim pool start {pool}' or any command that \
         changes the pool resets it)"
    )]
    Drive { desktop: String, pool: String, source: Box<IdentityError> },
    #[error("pool '{pool}' is exhausted: all {size} desktops are in use")]
    Exhausted { pool: String, size: u32 },
    #[error("{} desktop(s) failed, the others went on: {}", failed.len(), failure_list(failed))]
    Desktops { failed: Vec<Failure> },
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error(
        "image '{image}' version {version} has a {} disk, smaller than the {} minimum of profile {profile}: \
         grow the image's disk or choose another profile",
        gib(*size), gib(*min)
    )]
    ImageTooSmall { image: String, version: u32, size: u64, profile: String, min: u64 },
    #[error("virt type '{0}' is not one of auto, kvm, qemu")]
    VirtType(String),
    #[error("display listen address {0:?} is not an IP address (e.g. 127.0.0.1, 192.0.2.10, 0.0.0.0 or ::)")]
    DisplayListen(String),
    #[error(
        "pool '{pool}' would put its SPICE displays on {listen}, off loopback, but the libvirt at {uri} has no \
         SPICE TLS: set spice_tls = 1 and spice_tls_x509_cert_dir (holding ca-cert.pem, server-cert.pem, \
         server-key.pem) in that host's qemu.conf and restart its libvirtd, or pass --insecure-display to send \
         console traffic and tickets in plaintext"
    )]
    DisplayTlsUnavailable { pool: String, listen: String, uri: String },
}

impl crate::error::Kind for PoolError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            PoolError::Name(e) => e.kind(),
            PoolError::Catalog(e) => e.kind(),
            PoolError::Store(e) => e.kind(),
            PoolError::Lock(e) => e.kind(),
            PoolError::Hypervisor(e) => e.kind(),
            PoolError::Profile(e) => e.kind(),
            PoolError::DomainXml(e) => e.kind(),
            PoolError::Qcow2(e) => e.kind(),
            PoolError::Denied(e) => e.kind(),
            PoolError::Identity(e) => e.kind(),
            PoolError::NotFound(_) | PoolError::DesktopNotFound(_) | PoolError::NoHost(_) => K::NotFound,
            PoolError::HostGone(_) => K::Internal,
            PoolError::HostFenced(_)
            | PoolError::Placement { .. }
            | PoolError::Pending { .. }
            | PoolError::DisplayOnLoopback { .. } => K::Conflict,
            PoolError::Size { .. }
            | PoolError::NameTooLong(_)
            | PoolError::VirtType(_)
            | PoolError::DisplayListen(_)
            | PoolError::ImageTooSmall { .. } => K::Invalid,
            PoolError::Exists(_)
            | PoolError::LegacyDevDesktop { .. }
            | PoolError::InUse { .. }
            | PoolError::DisplayTlsUnavailable { .. } => K::Conflict,
            PoolError::Drive { source, .. } => source.kind(),
            PoolError::Exhausted { .. } | PoolError::Eject { .. } => K::Exhausted,
            PoolError::Io { .. } => K::Internal,
            PoolError::Desktops { failed } => failed.first().map_or(K::Internal, |f| f.kind),
        }
    }
}

pub type Result<T> = std::result::Result<T, PoolError>;

fn failure_list(failed: &[Failure]) -> String {
    failed.iter().map(|f| f.error.as_str()).collect::<Vec<_>>().join("; ")
}

/// What a step over many desktops did: the desktops it acted on, and each one it could not
/// finish with its error (the others went on).
#[derive(Debug, Default)]
pub(crate) struct Done {
    pub ok: Vec<String>,
    pub failed: Vec<(String, PoolError)>,
}

impl Done {
    /// From each desktop's outcome: `Ok(true)` acted, `Ok(false)` had nothing to do.
    fn of(names: &[String], outcomes: Vec<Result<bool>>) -> Done {
        let mut done = Done::default();
        for (n, r) in names.iter().zip(outcomes) {
            match r {
                Ok(true) => done.ok.push(n.clone()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(desktop = %n, error = %crate::error::message(&e), "desktop failed");
                    done.failed.push((n.clone(), e));
                }
            }
        }
        done
    }

    fn add(&mut self, other: Done) {
        self.ok.extend(other.ok);
        self.failed.extend(other.failed);
    }

    /// The failures as reports show them.
    pub fn failures(&self) -> Vec<Failure> {
        self.failed.iter().map(|(d, e)| Failure::new(d, e)).collect()
    }

    /// Only the desktops of `pool`.
    fn of_pool(&self, pool: &str) -> (Vec<String>, Vec<Failure>) {
        let ok = self.ok.iter().filter(|d| is_desktop_of(pool, d)).cloned().collect();
        let failed = self.failures().into_iter().filter(|f| is_desktop_of(pool, &f.desktop)).collect();
        (ok, failed)
    }

    /// The desktops acted on, or the first failure (for callers that stop at one).
    fn into_result(self) -> Result<Vec<String>> {
        match self.failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(self.ok),
        }
    }
}

/// What a command on a whole pool did: per desktop, acted on or failed with why.
#[derive(Debug, Default, Serialize)]
pub struct PoolOutcome {
    pub pool: String,
    /// The desktops the command acted on (started, stopped).
    pub desktops: Vec<String>,
    pub failed: Vec<Failure>,
}

/// A disk size for messages: `64 GiB`, `31.5 GiB`.
fn gib(bytes: u64) -> String {
    let g = bytes as f64 / f64::from(1u32 << 30);
    if g.fract() == 0.0 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PoolError + 'a {
    move |source| PoolError::Io { what, path: path.display().to_string(), source }
}

/// A desktop's config drive (identity), beside its serial log in the pool's run directory.
fn config_drive_name(desktop: &str) -> String {
    format!("{desktop}.config.iso")
}

/// Where a desktop's overlay lives, relative to the vdim home (what the catalog records).
fn overlay_rel(pool: &str, desktop: &str) -> String {
    format!("desktops/{pool}/{desktop}.qcow2")
}

/// Where a desktop's UEFI variable store lives, relative to the vdim home. libvirt creates
/// it (0600) from the firmware's template at the first start and removes it on undefine.
fn nvram_rel(pool: &str, desktop: &str) -> String {
    format!("desktops/{pool}/{desktop}.nvram")
}

mod desktops;
mod on_hosts;
pub mod sites;
use desktops::{Desktops, Reset};
pub use on_hosts::Evacuated;
use sites::{Hv, Sites};

pub use names::{desktop_domain as desktop_name, is_desktop_of};

/// A password no one knows: displays are never open; the broker sets one-time tickets.
pub fn random_secret(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the OS random source works");
    hex::encode(b)
}

/// A pool's display listen address: an IPv4 or IPv6 literal, nothing else (no host names,
/// no zone ids), so the value that reaches the domain XML is always a plain address.
pub fn parse_display_listen(s: &str) -> Result<IpAddr> {
    s.parse::<IpAddr>().map_err(|_| PoolError::DisplayListen(s.to_string()))
}

/// Whether a pool's SPICE displays speak TLS only: every display off loopback, unless the
/// administrator chose plaintext (`--insecure-display`).
pub fn display_tls(listen: &str, insecure_display: bool) -> bool {
    !insecure_display && !listen.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn parse_virt_type(s: &str) -> Result<VirtType> {
    match s {
        "kvm" => Ok(VirtType::Kvm),
        "qemu" => Ok(VirtType::Qemu),
        "auto" => Ok(if crate::hypervisor::resolve_virt_type(false) == "kvm" { VirtType::Kvm } else { VirtType::Qemu }),
        other => Err(PoolError::VirtType(other.to_string())),
    }
}

/// Channel a new pool follows unless told otherwise.
pub const DEFAULT_CHANNEL: Channel = Channel::Prod;
/// Hardware profile of new pools (and of dev desktops) unless told otherwise.
pub const DEFAULT_PROFILE: &str = "windows11";

/// A request to create a pool, with its defaults: what `vdim pool create`'s flags become and
/// what `POST /api/v1/admin/pools` reads as its body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub image: String,
    #[serde(default = "default_channel")]
    pub channel: Channel,
    pub size: u32,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Desktops keep their system disk across logoffs.
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub start: bool,
    /// IP address the desktops' displays listen on (checked by [`parse_display_listen`]).
    #[serde(default = "default_display_listen", deserialize_with = "display_listen_de")]
    pub display_listen: IpAddr,
    /// Plaintext SPICE off loopback instead of TLS.
    #[serde(default)]
    pub insecure_display: bool,
    /// Each desktop gets a config drive: its hostname, and the domain join when given.
    #[serde(default)]
    pub identity: bool,
    /// e.g. `FIN-{n}`; `<pool>-{n}` when absent.
    #[serde(default)]
    pub hostname_pattern: Option<String>,
    #[serde(default)]
    pub join_domain: Option<String>,
    #[serde(default)]
    pub join_ou: Option<String>,
    /// An absolute path on the host vdim runs on: the secret itself is never in a request.
    #[serde(default)]
    pub join_credentials: Option<PathBuf>,
    /// A file on this host put on each drive as OpenStack user data.
    #[serde(default)]
    pub user_data: Option<PathBuf>,
    /// Registered hosts its desktops spread over (`--hosts`); with `zone`, every host of it.
    /// Neither: the local libvirt of `--connect`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

fn default_channel() -> Channel {
    DEFAULT_CHANNEL
}

fn default_profile() -> String {
    DEFAULT_PROFILE.into()
}

fn default_display_listen() -> IpAddr {
    parse_display_listen(DEFAULT_DISPLAY_LISTEN).expect("the default is an address")
}

fn display_listen_de<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<IpAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_display_listen(&s).map_err(serde::de::Error::custom)
}

impl CreateRequest {
    /// The identity setting the request asks for, its flags checked against each other
    /// (the files and values themselves are checked by [`Pools::create`]).
    pub fn identity(&self) -> std::result::Result<Option<Identity>, IdentityError> {
        let join_given = self.join_domain.is_some() || self.join_ou.is_some() || self.join_credentials.is_some();
        if !self.identity {
            let what = if self.hostname_pattern.is_some() {
                Some("a hostname pattern (--hostname-pattern)")
            } else if join_given {
                Some("a domain join (--join-domain, --join-ou, --join-credentials)")
            } else if self.user_data.is_some() {
                Some("user data (--user-data)")
            } else {
                None
            };
            return match what {
                Some(what) => Err(IdentityError::NeedsIdentity { what }),
                None => Ok(None),
            };
        }
        let join = match (&self.join_domain, &self.join_credentials) {
            (Some(domain), Some(credentials)) => {
                Some(DomainJoin { domain: domain.clone(), ou: self.join_ou.clone(), credentials: credentials.clone() })
            }
            (None, None) if self.join_ou.is_none() => None,
            _ => return Err(IdentityError::IncompleteJoin),
        };
        Ok(Some(Identity {
            hostname_pattern: self.hostname_pattern.clone().unwrap_or_else(|| identity::default_pattern(&self.name)),
            join,
            user_data: self.user_data.clone(),
        }))
    }

    /// The request as [`Pools::create`] takes it, for desktops of virt type `virt`.
    pub fn options(&self, virt: VirtType) -> Result<CreateOptions<'_>> {
        Ok(CreateOptions {
            name: &self.name,
            image: &self.image,
            channel: self.channel,
            size: self.size,
            profile: &self.profile,
            persistent: self.persistent,
            virt,
            start: self.start,
            display_listen: self.display_listen,
            insecure_display: self.insecure_display,
            identity: self.identity()?,
            hosts: &self.hosts,
            zone: self.zone.as_deref(),
        })
    }
}

#[derive(Debug)]
pub struct CreateOptions<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub channel: Channel,
    pub size: u32,
    pub profile: &'a str,
    pub persistent: bool,
    pub virt: VirtType,
    pub start: bool,
    /// Where the desktops' SPICE and VNC displays listen.
    pub display_listen: IpAddr,
    /// Plaintext SPICE off loopback instead of TLS (recorded on the pool, shown by `show`).
    pub insecure_display: bool,
    /// Per-desktop identity (config drives); checked by [`Pools::create`] before anything is made.
    pub identity: Option<Identity>,
    /// The hosts its desktops spread over, by name, and/or every host of a zone.
    pub hosts: &'a [String],
    pub zone: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct DesktopView {
    pub name: String,
    pub state: String,
    /// The version its overlay sits on.
    pub version: u32,
    /// The version it will run after its next move (logoff), when different.
    pub will_run: u32,
    pub assigned_to: Option<String>,
    pub needs_reset: bool,
    pub overlay: PathBuf,
    /// Its computer name, when the pool gives identities.
    pub hostname: Option<String>,
    /// The host it runs on; none: the local libvirt.
    pub host: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PoolView {
    #[serde(flatten)]
    pub pool: Pool,
    pub channel_version: u32,
    /// The hosts its desktops may go to (none: the local libvirt).
    pub hosts: Vec<String>,
    /// (host, version): versions the pool runs or its channel points at whose chain is not
    /// verified on one of its hosts; desktops of them wait there.
    pub pending: Vec<(String, u32)>,
    pub desktops: Vec<DesktopView>,
}

#[derive(Debug, Serialize)]
pub struct PoolSummary {
    #[serde(flatten)]
    pub pool: Pool,
    pub in_use: usize,
    pub pending_moves: usize,
}

/// What `move_desktops` did with the desktops it was asked to move.
#[derive(Debug, Default, Serialize)]
pub struct Moved {
    /// Moved now (fresh overlays).
    pub now: Vec<String>,
    /// Given to a user meanwhile; they move at logoff.
    pub at_logoff: Vec<String>,
    /// Given to a user meanwhile; left as they are.
    pub skipped: Vec<String>,
    /// Booted by this call.
    pub started: Vec<String>,
    /// Not moved now: their reset failed and stays pending for the next command.
    pub failed: Vec<Failure>,
}

/// Desktops of one pool to move to version `to`.
#[derive(Debug, Clone)]
pub struct DesktopMove {
    pub pool: String,
    pub desktops: Vec<String>,
    pub to: u32,
}

#[derive(Debug, Serialize)]
pub struct MoveReport {
    #[serde(flatten)]
    pub plan: MovePlan,
    pub started: Vec<String>,
    /// Desktops whose move failed (the others moved); each stays due for the next command.
    pub failed: Vec<Failure>,
}

/// The pool service, borrowing the home, catalog, hypervisor and profiles of a
/// [`crate::context::Context`].
pub struct Pools<'a> {
    home: &'a Home,
    pub(crate) catalog: &'a mut Catalog,
    /// The local libvirt and the registered hosts: where each desktop is.
    pub(crate) sites: Sites<'a>,
    links: &'a Connections,
    profiles: &'a Path,
    progress: &'a dyn Progress,
    /// Once set, resets stop booting desktops (a rollout wave whose desktop crashed).
    halt: Option<&'a AtomicBool>,
}

impl<'a> Pools<'a> {
    /// The pool service on the local libvirt `hv` and the hosts registered now.
    pub fn new(
        home: &'a Home,
        catalog: &'a mut Catalog,
        hv: &'a dyn Hypervisor,
        links: &'a Connections,
        profiles: &'a Path,
    ) -> Result<Pools<'a>> {
        let hosts = catalog.read(|tx| tx.hosts())?;
        let sites = Sites::new(hv, links, hosts);
        Ok(Pools { home, catalog, sites, links, profiles, progress: &Quiet, halt: None })
    }

    /// Desktops reset from here on are not booted once `halt` is set (they are still reset).
    pub fn with_halt(self, halt: &'a AtomicBool) -> Pools<'a> {
        Pools { halt: Some(halt), ..self }
    }

    /// Reports desktops done in operations on many of them to `progress`.
    pub fn with_progress(self, progress: &'a dyn Progress) -> Pools<'a> {
        Pools { progress, ..self }
    }

    fn home(&self) -> &Home {
        self.home
    }

    fn lock_pool(&self, pool: &str) -> Result<(Lock, Lock)> {
        Ok(lock::for_change(
            &self.home().locks(),
            &names::pool_lock(pool),
            &format!("pool '{pool}'"),
            Duration::from_secs(10),
        )?)
    }

    fn load_pool(tx: &Tx, name: &str) -> Result<Pool> {
        tx.pool(name)?.ok_or_else(|| PoolError::NotFound(name.to_string()))
    }

    /// Overlays, domains and config drives for new desktops of `pool` (on `pool.version`),
    /// each on its host (`hosts`, in `indexes` order; none: the local libvirt), made before
    /// any catalog row names them; the caller commits the rows (with the domain UUIDs and
    /// overlay paths returned, in `indexes` order) or undoes these on failure.
    fn provision(
        &mut self,
        pool: &Pool,
        profile: &Profile,
        indexes: &[u32],
        hosts: &[Option<i64>],
        digest: &str,
        vsize: u64,
    ) -> Result<Vec<(String, String)>> {
        let names: Vec<String> = indexes.iter().map(|i| desktop_name(&pool.name, *i)).collect();
        if let Some((domain, image)) =
            self.legacy_dev_desktops(&pool.name)?.into_iter().find(|(d, _)| names.contains(d))
        {
            return Err(PoolError::LegacyDevDesktop { domain, image, pool: pool.name.clone() });
        }
        // Overlays in the home in one batch (one sync); a host's are written there one by one.
        let overlays: Vec<(PathBuf, String, u64)> = names
            .iter()
            .zip(hosts)
            .filter(|(_, h)| h.is_none())
            .map(|(n, _)| (self.home().root().join(overlay_rel(&pool.name, n)), digest.to_string(), vsize))
            .collect();
        let desktops = self.desktops();
        desktops.write_overlays(&overlays)?;
        let jobs: Vec<(&String, u32, Option<i64>)> =
            names.iter().zip(indexes).zip(hosts).map(|((n, i), h)| (n, *i, *h)).collect();
        desktops
            .each(&jobs, "defined", |(n, index, host)| {
                let uuid = identity::new_uuid();
                let overlay = desktops.overlay_for(*host, &pool.name, n)?;
                if let Some(h) = host {
                    desktops.write_host_overlay(*h, &pool.name, n, digest, vsize)?;
                }
                desktops.write_config_drive(pool, *index, n, Some(&uuid))?;
                if let (Some(h), Some(_)) = (host, &pool.identity) {
                    desktops.upload_config_drive(*h, &pool.name, n)?;
                }
                desktops.define(pool, profile, *host, n, &uuid, &overlay, pool.version)?;
                let recorded = match host {
                    None => overlay_rel(&pool.name, n),
                    Some(_) => overlay.display().to_string(),
                };
                Ok((uuid, recorded))
            })
            .into_iter()
            .collect()
    }

    fn desktops(&self) -> Desktops<'_> {
        Desktops { home: self.home, sites: &self.sites, progress: self.progress, halt: self.halt }
    }

    /// Boots every desktop of `desktops` that is not running, all at once.
    fn start_all(&self, desktops: &[Desktop]) -> Done {
        let ds = self.desktops();
        let names: Vec<String> = desktops.iter().map(|d| d.name.clone()).collect();
        Done::of(&names, ds.each(desktops, "started", |d| ds.start(d)))
    }

    // ---- create ----------------------------------------------------------------------------

    /// Check the options, the admin's identity files and the profile's display needs before
    /// anything is locked or made. Returns the profile and whether the display is plaintext.
    fn check_create_options(&mut self, o: &CreateOptions) -> Result<(Profile, bool)> {
        names::validate("pool", o.name)?;
        if o.name.len() > 50 {
            return Err(PoolError::NameTooLong(o.name.to_string()));
        }
        names::validate("image", o.image)?;
        if o.size == 0 || o.size > MAX_POOL_SIZE {
            return Err(PoolError::Size { size: o.size, max: MAX_POOL_SIZE });
        }
        // The admin's files are read and checked here, before anything is made.
        if let Some(id) = &o.identity {
            id.check()?;
            self.catalog.read(|tx| no_hostname_clash(tx, o.name, id))?;
        }
        let profile = Profile::load(self.profiles, o.profile)?;
        // Loopback needs no TLS, and plaintext elsewhere only when asked for.
        let insecure_display = o.insecure_display && !o.display_listen.is_loopback();
        Ok((profile, insecure_display))
    }

    /// SPICE off loopback is TLS unless asked otherwise: every libvirt the pool's desktops
    /// go to (its hosts, or the local one) must serve it.
    fn check_display_tls(&self, o: &CreateOptions, profile: &Profile, insecure: bool, hosts: &[i64]) -> Result<()> {
        let listen = o.display_listen.to_string();
        if !profile.graphics().contains(&profile::Graphics::Spice) || !display_tls(&listen, insecure) {
            return Ok(());
        }
        let sites: Vec<Option<i64>> =
            if hosts.is_empty() { vec![None] } else { hosts.iter().map(|h| Some(*h)).collect() };
        for site in sites {
            let hv = self.sites.hv(site)?;
            if !hv.spice_tls()? {
                return Err(PoolError::DisplayTlsUnavailable {
                    pool: o.name.to_string(),
                    listen,
                    uri: hv.uri().to_string(),
                });
            }
        }
        Ok(())
    }

    pub fn create(&mut self, o: &CreateOptions, actor: &Actor) -> Result<PoolView> {
        let (profile, insecure_display) = self.check_create_options(o)?;
        let hosts = self.resolve_hosts(o.hosts, o.zone)?;
        let _locks = self.lock_pool(o.name)?;
        let (image, version) = self.catalog.read(|tx| -> Result<_> {
            if tx.pool(o.name)?.is_some() {
                return Err(PoolError::Exists(o.name.to_string()));
            }
            let image = tx.image(o.image)?;
            let n = tx.channel(&image, o.channel)?;
            Ok((image.clone(), tx.version(&image, n)?))
        })?;
        usable_version(&profile, &image.name, &version)?;
        self.check_display_tls(o, &profile, insecure_display, &hosts)?;
        // Layers reach a host before desktops do.
        self.replicate_to(&hosts, &image.name, version.number, false, actor);
        let placed = self.place_new(o.name, &hosts, &image.name, version.number, o.size as usize)?;
        // Leftovers of an interrupted create of the same name: never in the catalog, safe to drop.
        self.remove_leftovers(o.name, &hosts)?;
        let home = self.home();
        let pool_dir = home.pool_dir(o.name);
        let run_dir = home.pool_run(o.name);
        crate::home::create_private_dir(&pool_dir).map_err(io("create", &pool_dir))?;
        crate::home::create_private_dir(&run_dir).map_err(io("create", &run_dir))?;
        let virt_type = o.virt.as_str();
        let display_listen = o.display_listen.to_string();
        let pool = Pool {
            id: 0,
            name: o.name.to_string(),
            image_id: image.id,
            image: image.name.clone(),
            channel: o.channel,
            version: version.number,
            pinned: None,
            size: o.size,
            profile: o.profile.to_string(),
            persistent: o.persistent,
            virt_type: virt_type.to_string(),
            display_listen: display_listen.clone(),
            insecure_display,
            running: false,
            created: String::new(),
            identity: o.identity.clone(),
        };
        let indexes: Vec<u32> = (1..=o.size).collect();
        let made = self.provision(&pool, &profile, &indexes, &placed, &version.digest, version.virtual_size);
        // Files and domains exist before the catalog names them; undo them on any failure.
        let committed = made.and_then(|made| {
            self.catalog.write(|tx| -> Result<()> {
                // Again in the write: two creates at once must not both pass.
                if let Some(identity) = &o.identity {
                    no_hostname_clash(tx, o.name, identity)?;
                }
                let id = tx.insert_pool(&NewPool {
                    name: o.name,
                    image_id: image.id,
                    channel: o.channel,
                    version: version.number,
                    size: o.size,
                    profile: o.profile,
                    persistent: o.persistent,
                    virt_type,
                    display_listen: &display_listen,
                    insecure_display,
                    identity: o.identity.as_ref(),
                })?;
                tx.set_pool_hosts(id, &hosts)?;
                for ((i, (uuid, overlay)), host_id) in (1..=o.size).zip(&made).zip(&placed) {
                    let name = desktop_name(o.name, i);
                    let d =
                        NewDesktop { index: i, name: &name, overlay, version: version.number, uuid, host_id: *host_id };
                    tx.insert_desktop(id, &d)?;
                }
                tx.audit(Audit {
                    actor: &actor.0,
                    action: "pool.create",
                    image: Some(&image.name),
                    pool: Some(o.name),
                    version: Some(version.number),
                    detail: json!({
                        "size": o.size, "channel": o.channel, "profile": o.profile, "persistent": o.persistent,
                        "virt_type": virt_type, "display_listen": display_listen,
                        "insecure_display": insecure_display,
                        // Paths and names only: the join secret is never read into the catalog.
                        "identity": o.identity,
                        "hosts": o.hosts, "zone": o.zone,
                    }),
                })?;
                Ok(())
            })
        });
        if let Err(e) = committed {
            let _ = self.remove_leftovers(o.name, &hosts);
            return Err(e);
        }
        if o.start {
            self.start_locked(o.name, actor)?;
        }
        self.show(o.name)
    }

    /// Domains and files named for `pool` that the catalog does not know.
    /// Dev desktops an older vdim named `vdim-dev-<image>` that are still defined: with a pool
    /// named `dev` or `dev-*` they share the pool's desktop names, so nothing here touches them.
    fn legacy_dev_desktops(&mut self, pool: &str) -> Result<Vec<(String, String)>> {
        let images = self.catalog.read(|tx| -> Result<Vec<String>> {
            let with_draft: Vec<i64> = tx.drafts()?.into_iter().map(|d| d.image_id).collect();
            Ok(tx.images()?.into_iter().filter(|i| with_draft.contains(&i.id)).map(|i| i.name).collect())
        })?;
        let mut out = vec![];
        for image in images {
            let d = names::legacy_dev_domain(&image);
            if is_desktop_of(pool, &d) && self.sites.local().exists(&d)? {
                out.push((d, image));
            }
        }
        Ok(out)
    }

    /// Domains and files named for `pool`, here and on `hosts`, that the catalog does not know.
    fn remove_leftovers(&mut self, pool: &str, hosts: &[i64]) -> Result<()> {
        let keep: Vec<String> = self.legacy_dev_desktops(pool)?.into_iter().map(|(d, _)| d).collect();
        for d in self.sites.local().list(&format!("vdim-{pool}-"))? {
            if is_desktop_of(pool, &d) && !keep.contains(&d) {
                self.desktops().remove_domain(None, &d)?;
            }
        }
        for h in hosts {
            let ds = self.desktops();
            for d in self.sites.hv(Some(*h))?.list(&format!("vdim-{pool}-"))? {
                if is_desktop_of(pool, &d) {
                    ds.remove_domain(Some(*h), &d)?;
                    ds.remove_host_files(*h, &d)?;
                }
            }
        }
        let home = self.home();
        let dir = home.pool_dir(pool);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PoolError::Io { what: "remove", path: dir.display().to_string(), source: e }),
        }
        // Only the pool's own desktops' files: an older vdim kept dev desktops' files in
        // `run/dev/`, which is also pool `dev`'s run directory.
        let run = home.pool_run(pool);
        let Ok(entries) = fs::read_dir(&run) else { return Ok(()) };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let desktop = name.split('.').next().unwrap_or_default();
            if is_desktop_of(pool, desktop) && !keep.iter().any(|k| k == desktop) {
                let p = e.path();
                // A config drive's staging directory survives a crash mid-build.
                let removed = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                removed.map_err(io("remove", &p))?;
            }
        }
        let _ = fs::remove_dir(&run);
        Ok(())
    }

    // ---- views -----------------------------------------------------------------------------

    pub fn list(&mut self) -> Result<Vec<PoolSummary>> {
        self.catalog.read(|tx| -> Result<_> {
            let mut out = Vec::new();
            for pool in tx.pools()? {
                let ds = tx.desktops(pool.id)?;
                out.push(PoolSummary {
                    in_use: ds.iter().filter(|d| d.assigned_to.is_some()).count(),
                    pending_moves: ds.iter().filter(|d| d.target.is_some()).count(),
                    pool,
                });
            }
            Ok(out)
        })
    }

    pub fn show(&mut self, name: &str) -> Result<PoolView> {
        names::validate("pool", name)?;
        let (pool, desktops, channel_version, hosts, pending) = self.catalog.read(|tx| -> Result<_> {
            let pool = Self::load_pool(tx, name)?;
            let image = tx.image(&pool.image)?;
            let cv = tx.channel(&image, pool.channel)?;
            let hosts = tx.pool_hosts(pool.id)?;
            let mut pending = vec![];
            for h in &hosts {
                let mut versions = vec![pool.version, cv];
                versions.dedup();
                for v in versions {
                    if !tx.holds_chain(*h, &image, v)? {
                        pending.push((self.sites.host_name(Some(*h)).unwrap_or_default(), v));
                    }
                }
            }
            Ok((pool.clone(), tx.desktops(pool.id)?, cv, hosts, pending))
        })?;
        let hosts = hosts.into_iter().filter_map(|h| self.sites.host_name(Some(h))).collect();
        let desktops = desktops
            .into_iter()
            .map(|d| {
                let state = match self.sites.hv(d.host_id).and_then(|hv| Ok(hv.state(&d.name)?)) {
                    Ok((s, reason)) => format!(
                        "{}{}",
                        state_word(s),
                        if reason.is_empty() { String::new() } else { format!(" ({reason})") }
                    ),
                    Err(PoolError::Hypervisor(HypervisorError::NotFound { .. })) => "undefined".into(),
                    Err(e) => format!("unknown: {}", crate::error::message(&e)),
                };
                DesktopView {
                    hostname: pool.identity.as_ref().map(|i| identity::hostname(&i.hostname_pattern, d.index)),
                    state,
                    version: d.version,
                    will_run: d.target.unwrap_or(d.version),
                    overlay: self.desktops().overlay_path(&d),
                    host: self.sites.host_name(d.host_id),
                    assigned_to: d.assigned_to,
                    needs_reset: d.needs_reset,
                    name: d.name,
                }
            })
            .collect();
        Ok(PoolView { pool, channel_version, hosts, pending, desktops })
    }

    // ---- start / stop ----------------------------------------------------------------------

    /// Boots every desktop of the pool, all at once (up to the host's bound); one that fails
    /// to start is reported and the others boot.
    pub fn start(&mut self, name: &str, actor: &Actor) -> Result<PoolOutcome> {
        names::validate("pool", name)?;
        let _l = self.lock_pool(name)?;
        let done = self.start_locked(name, actor)?;
        Ok(PoolOutcome { pool: name.to_string(), desktops: done.ok.clone(), failed: done.failures() })
    }

    fn start_locked(&mut self, name: &str, actor: &Actor) -> Result<Done> {
        let pool = self.catalog.write(|tx| -> Result<Pool> {
            let p = Self::load_pool(tx, name)?;
            tx.set_pool_running(p.id, true)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "pool.start",
                pool: Some(name),
                image: Some(&p.image),
                ..Default::default()
            })?;
            Ok(p)
        })?;
        // Pending resets first (they boot what they reset), then every other desktop.
        let mut done = self.heal_pools(std::slice::from_ref(&pool.name), &[])?;
        let rest: Vec<Desktop> = self
            .catalog
            .read(|tx| tx.desktops(pool.id))?
            .into_iter()
            .filter(|d| !done.failed.iter().any(|(f, _)| *f == d.name))
            .collect();
        done.add(self.start_all(&rest));
        Ok(done)
    }

    /// The pool and its desktops, unless one is in use and `force` is not given.
    fn unless_in_use(&mut self, name: &str, force: bool, why: &str) -> Result<(Pool, Vec<Desktop>)> {
        let (pool, desktops) = self.catalog.read(|tx| -> Result<_> {
            let p = Self::load_pool(tx, name)?;
            Ok((p.clone(), tx.desktops(p.id)?))
        })?;
        if let Some(d) = desktops.iter().find(|d| d.assigned_to.is_some()).filter(|_| !force) {
            return Err(PoolError::InUse {
                desktop: d.name.clone(),
                user: d.assigned_to.clone().unwrap_or_default(),
                what: format!("{why} (pool '{name}'); log them off first or use --force"),
            });
        }
        Ok((pool, desktops))
    }

    /// Stops every desktop of the pool at once; one that fails is reported, the others stop.
    pub fn stop(&mut self, name: &str, force: bool, actor: &Actor) -> Result<PoolOutcome> {
        names::validate("pool", name)?;
        let _l = self.lock_pool(name)?;
        let why = "stopping it would cut the user off";
        let (pool, desktops) = self.unless_in_use(name, force, why)?;
        crate::test_hook::pause(crate::test_hook::POOL_STOP);
        self.catalog.write(|tx| -> Result<()> {
            // Checked again where the pool stops: from this commit on the broker opens no
            // session on it, so no user can be given a desktop that is about to stop.
            still_unused(tx, &pool, rules::Claim::Stop { force }, why)?;
            tx.set_pool_running(pool.id, false)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "pool.stop",
                pool: Some(name),
                image: Some(&pool.image),
                detail: json!({"force": force}),
                ..Default::default()
            })?;
            Ok(())
        })?;
        let names: Vec<String> = desktops.iter().map(|d| d.name.clone()).collect();
        let ds = self.desktops();
        // Persistent desktops get an ACPI shutdown first: the user's disk should be clean.
        let clean = pool.persistent && !force;
        let done = Done::of(&names, ds.each(&desktops, "stopped", |d| ds.stop(d, clean)));
        Ok(PoolOutcome { pool: name.to_string(), desktops: done.ok.clone(), failed: done.failures() })
    }

    // ---- moving between versions ------------------------------------------------------------

    fn facts(tx: &Tx, pool: &Pool) -> Result<(PoolFacts, Vec<DesktopFacts>, Vec<Desktop>)> {
        let image = tx.image(&pool.image)?;
        let facts = PoolFacts {
            name: pool.name.clone(),
            version: pool.version,
            pinned: pool.pinned,
            persistent: pool.persistent,
            channel_version: tx.channel(&image, pool.channel)?,
            history: tx.pool_history(pool.id)?,
        };
        let desktops = tx.desktops(pool.id)?;
        let dfacts = desktops
            .iter()
            .map(|d| DesktopFacts {
                name: d.name.clone(),
                version: d.version,
                target: d.target,
                in_use: d.assigned_to.is_some(),
            })
            .collect();
        Ok((facts, dfacts, desktops))
    }

    fn version_facts(tx: &Tx, pool: &Pool, number: u32) -> Result<VersionFacts> {
        let image = tx.image(&pool.image)?;
        let v = tx.version(&image, number)?;
        Ok(VersionFacts { number, removed: v.removed.is_some(), failed: v.status == "failed" })
    }

    /// `pool update`: follow the channel.
    pub fn update(&mut self, name: &str, force: bool, actor: &Actor) -> Result<MoveReport> {
        self.move_with(name, actor, "pool.update", force, |tx, pool, facts, desktops| {
            let to = Self::version_facts(tx, pool, facts.channel_version)?;
            Ok(rules::plan_update(facts, desktops, to, force)?)
        })
    }

    /// `rollback`: back to the version run before (or `to`), pinned there.
    pub fn rollback(&mut self, name: &str, to: Option<u32>, force: bool, actor: &Actor) -> Result<MoveReport> {
        self.move_with(name, actor, "pool.rollback", force, |tx, pool, facts, desktops| {
            let to = to.map(|n| Self::version_facts(tx, pool, n)).transpose()?;
            Ok(rules::plan_rollback(facts, desktops, to, force)?)
        })
    }

    pub fn pin(&mut self, name: &str, version: u32, force: bool, actor: &Actor) -> Result<MoveReport> {
        self.move_with(name, actor, "pool.pin", force, |tx, pool, facts, desktops| {
            let to = Self::version_facts(tx, pool, version)?;
            Ok(rules::plan_pin(facts, desktops, to, force)?)
        })
    }

    /// Follow the channel again from the next promotion or `pool update` on.
    pub fn unpin(&mut self, name: &str, actor: &Actor) -> Result<Pool> {
        names::validate("pool", name)?;
        let _l = self.lock_pool(name)?;
        self.catalog.write(|tx| -> Result<Pool> {
            let p = Self::load_pool(tx, name)?;
            tx.set_pool_pin(p.id, None)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "pool.unpin",
                pool: Some(name),
                image: Some(&p.image),
                version: p.pinned,
                ..Default::default()
            })?;
            Self::load_pool(tx, name)
        })
    }

    fn move_with(
        &mut self,
        name: &str,
        actor: &Actor,
        action: &str,
        force: bool,
        plan: impl Fn(&Tx, &Pool, &PoolFacts, &[DesktopFacts]) -> Result<MovePlan>,
    ) -> Result<MoveReport> {
        let mut reports = self.move_pools(&[name.to_string()], actor, action, force, plan)?;
        reports.pop().map(|(_, r)| r).unwrap_or_else(|| Err(PoolError::NotFound(name.to_string())))
    }

    /// `pool update` of several pools at once (emergency channel rollback): each pool's move
    /// is planned and recorded under its lock, then all their desktops move together. A pool
    /// that cannot move says why; the others go on.
    pub fn update_pools(
        &mut self,
        names: &[String],
        force: bool,
        actor: &Actor,
    ) -> Result<Vec<(String, Result<MoveReport>)>> {
        self.move_pools(names, actor, "pool.update", force, |tx, pool, facts, desktops| {
            let to = Self::version_facts(tx, pool, facts.channel_version)?;
            Ok(rules::plan_update(facts, desktops, to, force)?)
        })
    }

    /// Plans and records each pool's move (catalog first), then carries out every pool's
    /// resets in one concurrent batch.
    fn move_pools(
        &mut self,
        names: &[String],
        actor: &Actor,
        action: &str,
        force: bool,
        plan: impl Fn(&Tx, &Pool, &PoolFacts, &[DesktopFacts]) -> Result<MovePlan>,
    ) -> Result<Vec<(String, Result<MoveReport>)>> {
        for n in names {
            names::validate("pool", n)?;
        }
        let _locks = self.lock_pools(names)?;
        // Resets a crash left pending go first, so the plans start from what is on disk.
        self.heal_pools(names, &[])?;
        let mut plans = vec![];
        for name in names {
            let planned = self.catalog.write(|tx| -> Result<MovePlan> {
                let pool = Self::load_pool(tx, name)?;
                let (facts, dfacts, desktops) = Self::facts(tx, &pool)?;
                let plan = plan(tx, &pool, &facts, &dfacts)?;
                apply_plan(tx, &pool, &desktops, &plan)?;
                tx.audit(Audit {
                    actor: &actor.0,
                    action,
                    image: Some(&pool.image),
                    pool: Some(name),
                    version: Some(plan.to),
                    detail: json!({"from": plan.from, "to": plan.to, "now": plan.now, "at_logoff": plan.at_logoff, "pinned": plan.pinned, "force": force}),
                })?;
                Ok(plan)
            });
            plans.push((name.clone(), planned));
        }
        let moving: Vec<String> = plans.iter().filter(|(_, p)| p.is_ok()).map(|(n, _)| n.clone()).collect();
        let done = self.heal_pools(&moving, &[])?;
        Ok(plans
            .into_iter()
            .map(|(name, planned)| {
                let report = planned.map(|plan| {
                    let (started, failed) = done.of_pool(&name);
                    MoveReport { plan, started, failed }
                });
                (name, report)
            })
            .collect())
    }

    /// Carry out every pending reset of idle desktops: a fresh overlay on their version,
    /// booted again when the pool runs. Safe to repeat; every pool command calls it first,
    /// so a crash between the catalog change and the file change is healed here.
    pub fn heal(&mut self, name: &str) -> Result<Vec<String>> {
        names::validate("pool", name)?;
        let _l = self.lock_pool(name)?;
        self.heal_pools(&[name.to_string()], &[])?.into_result()
    }

    /// Every pool's pending resets in one batch (the broker at start, after a crash); a pool
    /// another command holds is left to that command. Returns the desktops reset and those
    /// that failed (still due).
    pub fn heal_all(&mut self) -> Result<(Vec<String>, Vec<Failure>)> {
        let names: Vec<String> = self.catalog.read(|tx| tx.pools())?.into_iter().map(|p| p.name).collect();
        let mut locks = vec![];
        let mut locked = vec![];
        for n in names {
            match self.lock_pool(&n) {
                Ok(l) => {
                    locks.push(l);
                    locked.push(n);
                }
                Err(e) => tracing::warn!(pool = %n, error = %crate::error::message(&e), "pool not healed"),
            }
        }
        let done = self.heal_pools(&locked, &[])?;
        drop(locks);
        Ok((done.ok.clone(), done.failures()))
    }

    /// Pool locks of several pools, always taken in name order (no two commands wait on
    /// each other).
    fn lock_pools(&self, names: &[String]) -> Result<Vec<(Lock, Lock)>> {
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        sorted.into_iter().map(|n| self.lock_pool(n)).collect()
    }

    /// The pending resets of idle desktops of `pool` (a persistent desktop stays assigned to
    /// its owner: in use only while in a session), with their version's layer.
    fn due_resets(tx: &Tx, pool: &Pool) -> Result<Vec<(Desktop, String, u64)>> {
        let image = tx.image(&pool.image)?;
        let mut todo = vec![];
        for d in tx.desktops(pool.id)? {
            let in_use = match d.assigned_to {
                None => false,
                Some(_) if pool.persistent => tx.open_session_on(&d.name)?.is_some(),
                Some(_) => true,
            };
            if d.needs_reset && !in_use {
                let v = tx.version(&image, d.version)?;
                todo.push((d, v.digest, v.virtual_size));
            }
        }
        Ok(todo)
    }

    /// Every pending reset of the pools (locked by the caller), all at once: new drives
    /// first, while every desktop is still as it was (one whose drive cannot be built is left
    /// alone, defined and running, its reset pending); then the overlays in one batch with one
    /// sync; then each desktop stopped, defined afresh and booted when its pool runs (or it is
    /// in `boot`). A desktop is recorded clean only once all of that is done: one that failed
    /// keeps its reset pending for the next command, and the others go on.
    fn heal_pools(&mut self, names: &[String], boot: &[String]) -> Result<Done> {
        let mut pools = vec![];
        for name in names {
            let found = self.catalog.read(|tx| -> Result<_> {
                let pool = Self::load_pool(tx, name)?;
                let todo = Self::due_resets(tx, &pool)?;
                Ok((pool, todo))
            })?;
            pools.push(found);
        }
        self.move_off_hosts(&mut pools)?;
        // Firmware state (UEFI variables, TPM) goes with the disk: a persistent desktop keeps
        // its definition, so its NVRAM file and its UUID (libvirt's key to the swtpm state)
        // stay; a non-persistent one is defined afresh, both removed first. A persistent one
        // whose domain is gone (a home restored on a new machine) is defined again.
        let mut profiles = vec![];
        for (pool, todo) in &pools {
            profiles.push(if todo.is_empty() { None } else { Some(Profile::load(self.profiles, &pool.profile)?) });
        }
        let mut resets: Vec<Reset> = vec![];
        for ((pool, todo), profile) in pools.iter().zip(&profiles) {
            for (d, digest, vsize) in todo {
                resets.push(Reset {
                    pool,
                    profile: profile.as_ref(),
                    boot: pool.running || boot.contains(&d.name),
                    desktop: d.clone(),
                    digest: digest.clone(),
                    virtual_size: *vsize,
                });
            }
        }
        let mut done = Done::default();
        // A desktop on a host is made only from a chain read back right there: one whose
        // version is pending on its host is left as it was, its reset due.
        let pending = self.catalog.read(|tx| -> Result<Vec<(String, PoolError)>> {
            let mut out = vec![];
            // Asked once per host and version, however many desktops share them.
            let mut holds: BTreeMap<(i64, i64, u32), bool> = BTreeMap::new();
            for r in resets.iter().filter(|r| r.desktop.host_id.is_some()) {
                let h = r.desktop.host_id.expect("on a host");
                let key = (h, r.pool.image_id, r.desktop.version);
                let held = match holds.get(&key) {
                    Some(held) => *held,
                    None => *holds.entry(key).or_insert(tx.holds_chain(h, &tx.image(&r.pool.image)?, key.2)?),
                };
                if !held {
                    let host = self.sites.host_name(Some(h)).unwrap_or_default();
                    out.push((
                        r.desktop.name.clone(),
                        PoolError::Pending { desktop: r.desktop.name.clone(), version: r.desktop.version, host },
                    ));
                }
            }
            Ok(out)
        })?;
        resets.retain(|r| !pending.iter().any(|(n, _)| *n == r.desktop.name));
        done.failed.extend(pending);
        let ds = self.desktops();
        let with_drive: Vec<&Reset> = resets.iter().filter(|r| r.pool.identity.is_some()).collect();
        let drives = ds.each(&with_drive, "drives built", |r| {
            let d = &r.desktop;
            ds.write_config_drive(r.pool, d.index, &d.name, d.uuid.as_deref()).map(|()| false).map_err(|e| {
                PoolError::Drive { desktop: d.name.clone(), pool: r.pool.name.clone(), source: Box::new(e) }
            })
        });
        let names: Vec<String> = with_drive.iter().map(|r| r.desktop.name.clone()).collect();
        done.add(Done::of(&names, drives));
        resets.retain(|r| !done.failed.iter().any(|(n, _)| *n == r.desktop.name));
        // The home's overlays in one batch; a host's desktop gets its own in its reset.
        let overlays: Vec<(PathBuf, String, u64)> = resets
            .iter()
            .filter(|r| r.desktop.host_id.is_none())
            .map(|r| (ds.overlay_path(&r.desktop), r.digest.clone(), r.virtual_size))
            .collect();
        ds.write_overlays(&overlays)?;
        let names: Vec<String> = resets.iter().map(|r| r.desktop.name.clone()).collect();
        let outcomes = ds.each(&resets, "reset", |r| ds.reset(r));
        let clean: Vec<i64> =
            resets.iter().zip(&outcomes).filter(|(_, o)| o.is_ok()).map(|(r, _)| r.desktop.id).collect();
        done.add(Done::of(&names, outcomes));
        if !clean.is_empty() {
            self.catalog.write(|tx| -> Result<()> {
                for id in &clean {
                    tx.clear_reset(*id)?;
                }
                Ok(())
            })?;
        }
        Ok(done)
    }

    /// Move desktops of pools, picked while idle, to the version each move names, now (fresh
    /// overlays), booting them when `boot` or when their pool runs: all pools' desktops at
    /// once. The rollout engine's step. A desktop given to a user since it was picked is not
    /// moved now; `rules::when_taken(claim)` says what becomes of it. A desktop whose move
    /// failed is in `failed`, its reset pending for the next command.
    pub fn move_desktops(
        &mut self,
        moves: &[DesktopMove],
        boot: bool,
        actor: &Actor,
        why: &str,
        claim: rules::Claim,
    ) -> Result<Moved> {
        let pools: Vec<String> = moves.iter().map(|m| m.pool.clone()).collect();
        let _locks = self.lock_pools(&pools)?;
        let mut moved = self.catalog.write(|tx| -> Result<Moved> {
            let mut moved = Moved::default();
            for m in moves {
                Self::claim_moves(tx, m, actor, why, claim, &mut moved)?;
            }
            Ok(moved)
        })?;
        let mut unique = pools.clone();
        unique.sort();
        unique.dedup();
        let boot: &[String] = if boot { &moved.now } else { &[] };
        let done = self.heal_pools(&unique, boot)?;
        moved.failed = done.failures();
        moved.started = done.ok;
        Ok(moved)
    }

    /// In the caller's write: claim one pool's desktops for a move (or say what becomes of
    /// those given to a user meanwhile) and audit it.
    fn claim_moves(
        tx: &Tx,
        m: &DesktopMove,
        actor: &Actor,
        why: &str,
        claim: rules::Claim,
        moved: &mut Moved,
    ) -> Result<()> {
        let p = Self::load_pool(tx, &m.pool)?;
        let mut mine = Moved::default();
        for name in &m.desktops {
            let d = tx
                .desktop(name)?
                .filter(|d| d.pool_id == p.id)
                .ok_or_else(|| PoolError::DesktopNotFound(name.clone()))?;
            if tx.claim_for_reset(d.id, m.to)? {
                mine.now.push(d.name);
                continue;
            }
            match rules::when_taken(claim) {
                rules::Taken::Skip => mine.skipped.push(d.name),
                rules::Taken::AtLogoff => {
                    tx.set_target(d.id, (d.version != m.to).then_some(m.to))?;
                    mine.at_logoff.push(d.name);
                }
                rules::Taken::Refuse => {
                    return Err(PoolError::InUse {
                        user: d.assigned_to.unwrap_or_default(),
                        desktop: d.name,
                        what: format!("it was given to the user while {why} was about to move it"),
                    })
                }
                rules::Taken::Proceed => {
                    tx.mark_reset(d.id, m.to)?;
                    mine.now.push(d.name);
                }
            }
        }
        tx.audit(Audit {
            actor: &actor.0,
            action: "desktop.move",
            image: Some(&p.image),
            pool: Some(&m.pool),
            version: Some(m.to),
            detail: json!({"desktops": mine.now, "at_logoff": mine.at_logoff, "skipped": mine.skipped, "why": why}),
        })?;
        moved.now.extend(mine.now);
        moved.at_logoff.extend(mine.at_logoff);
        moved.skipped.extend(mine.skipped);
        Ok(())
    }

    /// Stop desktops a rollout booted in a pool that is not running, all at once.
    pub fn stop_if_pool_stopped(&mut self, pool: &str, desktops: &[String]) -> Result<()> {
        let (p, idle) = self.catalog.read(|tx| -> Result<_> {
            let p = Self::load_pool(tx, pool)?;
            let idle: Vec<Desktop> = tx.desktops(p.id)?.into_iter().filter(|d| d.assigned_to.is_none()).collect();
            Ok((p, idle))
        })?;
        if p.running {
            return Ok(());
        }
        let stop: Vec<Desktop> = idle.into_iter().filter(|d| desktops.contains(&d.name)).collect();
        let names: Vec<String> = stop.iter().map(|d| d.name.clone()).collect();
        let ds = self.desktops();
        Done::of(&names, ds.each(&stop, "stopped", |d| ds.stop(d, false))).into_result().map(drop)
    }

    /// After a rollout: the pool runs `to` (history recorded); in-use desktops still on
    /// another version move at logoff.
    pub fn settle(&mut self, pool: &str, to: u32, actor: &Actor, why: &str) -> Result<Vec<String>> {
        let _l = self.lock_pool(pool)?;
        self.catalog.write(|tx| -> Result<Vec<String>> {
            let p = Self::load_pool(tx, pool)?;
            let mut later = vec![];
            for d in tx.desktops(p.id)? {
                if d.version != to {
                    tx.set_target(d.id, Some(to))?;
                    later.push(d.name);
                }
            }
            if p.version != to {
                tx.set_pool_version(p.id, to, p.pinned)?;
                tx.record_pool_version(p.id, to, why)?;
            }
            tx.audit(Audit {
                actor: &actor.0,
                action: "pool.settle",
                image: Some(&p.image),
                pool: Some(pool),
                version: Some(to),
                detail: json!({"at_logoff": later, "why": why}),
            })?;
            Ok(later)
        })
    }

    // ---- assignment (the broker's and an admin's) -----------------------------------------------

    /// The hypervisor of the host a desktop is on.
    pub(crate) fn hv_of(&mut self, desktop: &str) -> Result<Hv<'a>> {
        let d =
            self.catalog.read(|tx| tx.desktop(desktop))?.ok_or_else(|| PoolError::DesktopNotFound(desktop.into()))?;
        self.sites.hv(d.host_id)
    }

    /// What hands desktops to users (this service's `assign` and the broker's sessions).
    pub(crate) fn hand_out(&self) -> HandOut<'a> {
        HandOut { sites: self.sites.clone(), profiles: self.profiles }
    }

    /// Give an idle desktop of the pool to `user`.
    pub fn assign(&mut self, name: &str, user: &str, actor: &Actor) -> Result<Desktop> {
        names::validate("pool", name)?;
        let hand_out = self.hand_out();
        self.catalog.write(|tx| -> Result<Desktop> {
            let pool = Self::load_pool(tx, name)?;
            let d = hand_out.idle(tx, &pool, user)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "desktop.assign",
                pool: Some(name),
                image: Some(&pool.image),
                version: Some(d.version),
                detail: json!({"desktop": d.name, "user": user}),
            })?;
            Ok(d)
        })
    }

    /// Logoff: the desktop is wiped (non-persistent) and moved where it is due, before
    /// anyone can get it again.
    pub fn release(&mut self, desktop: &str, actor: &Actor) -> Result<rules::Release> {
        let (pool_name, release) = self.release_recorded(desktop, actor)?;
        // The released desktop's own reset: a failure is this command's error.
        let done = self.heal_many(std::slice::from_ref(&pool_name))?;
        if let Some((_, e)) = done.failed.into_iter().find(|(d, _)| d == desktop) {
            return Err(e);
        }
        Ok(release)
    }

    /// The catalog half of a logoff: the desktop unassigned and, when due, marked for its
    /// reset (which [`Pools::heal_many`] carries out, for many logoffs at once). Returns its
    /// pool and what the release decided.
    pub(crate) fn release_recorded(&mut self, desktop: &str, actor: &Actor) -> Result<(String, rules::Release)> {
        let pool_name = self.catalog.read(|tx| -> Result<String> {
            let d = tx.desktop(desktop)?.ok_or_else(|| PoolError::DesktopNotFound(desktop.to_string()))?;
            Ok(tx.pools()?.into_iter().find(|p| p.id == d.pool_id).map(|p| p.name).unwrap_or_default())
        })?;
        let _l = self.lock_pool(&pool_name)?;
        let release = self.catalog.write(|tx| -> Result<rules::Release> {
            let d = tx.desktop(desktop)?.ok_or_else(|| PoolError::DesktopNotFound(desktop.to_string()))?;
            let pool = Self::load_pool(tx, &pool_name)?;
            let facts = DesktopFacts { name: d.name.clone(), version: d.version, target: d.target, in_use: true };
            let r = rules::plan_release(pool.persistent, &facts);
            if r.reset {
                tx.mark_reset(d.id, r.version)?;
            }
            tx.unassign(d.id)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "desktop.release",
                pool: Some(&pool_name),
                image: Some(&pool.image),
                version: Some(r.version),
                detail: json!({"desktop": desktop, "user": d.assigned_to, "reset": r.reset}),
            })?;
            Ok(r)
        })?;
        Ok((pool_name, release))
    }

    /// Every pending reset of these pools, in one batch (many logoffs at once).
    pub(crate) fn heal_many(&mut self, names: &[String]) -> Result<Done> {
        let _locks = self.lock_pools(names)?;
        self.heal_pools(names, &[])
    }

    // ---- resize / delete -------------------------------------------------------------------

    pub fn resize(&mut self, name: &str, size: u32, actor: &Actor) -> Result<PoolView> {
        names::validate("pool", name)?;
        if size == 0 || size > MAX_POOL_SIZE {
            return Err(PoolError::Size { size, max: MAX_POOL_SIZE });
        }
        let _l = self.lock_pool(name)?;
        self.heal_pools(&[name.to_string()], &[])?;
        let (pool, desktops, digest, vsize) = self.catalog.read(|tx| -> Result<_> {
            let pool = Self::load_pool(tx, name)?;
            let image = tx.image(&pool.image)?;
            let v = tx.version(&image, pool.version)?;
            Ok((pool.clone(), tx.desktops(pool.id)?, v.digest, v.virtual_size))
        })?;
        let current = desktops.len() as u32;
        if size > current {
            let next = desktops.iter().map(|d| d.index).max().unwrap_or(0) + 1;
            self.grow(&pool, next..next + (size - current), &digest, vsize, actor, current, size)?;
        } else if size < current {
            // Shrink from the top, never taking a desktop from its user.
            let doomed: Vec<&Desktop> = desktops.iter().rev().take((current - size) as usize).collect();
            self.shrink(&pool, &doomed, actor, current, size)?;
        }
        self.show(name)
    }

    #[allow(clippy::too_many_arguments)]
    fn grow(
        &mut self,
        pool: &Pool,
        indexes: std::ops::Range<u32>,
        digest: &str,
        vsize: u64,
        actor: &Actor,
        current: u32,
        size: u32,
    ) -> Result<()> {
        let name = &pool.name;
        let profile = Profile::load(self.profiles, &pool.profile)?;
        let new: Vec<(u32, String)> = indexes.map(|i| (i, desktop_name(name, i))).collect();
        if let Some((i, _)) = new.iter().find(|(i, _)| *i > MAX_POOL_SIZE) {
            return Err(PoolError::Size { size: *i, max: MAX_POOL_SIZE });
        }
        let indexes: Vec<u32> = new.iter().map(|(i, _)| *i).collect();
        let pool_hosts = self.catalog.read(|tx| tx.pool_hosts(pool.id))?;
        self.replicate_to(&pool_hosts, &pool.image, pool.version, false, actor);
        let placed = self.place_new(name, &pool_hosts, &pool.image, pool.version, indexes.len())?;
        let made = self.provision(pool, &profile, &indexes, &placed, digest, vsize);
        let committed = made.and_then(|made| {
            self.catalog.write(|tx| -> Result<()> {
                for (((i, dn), (uuid, overlay)), host_id) in new.iter().zip(&made).zip(&placed) {
                    let d = NewDesktop { index: *i, name: dn, overlay, version: pool.version, uuid, host_id: *host_id };
                    tx.insert_desktop(pool.id, &d)?;
                }
                record_resize(tx, pool, actor, current, size)?;
                Ok(())
            })
        });
        let ds = self.desktops();
        if let Err(e) = committed {
            for ((_, dn), host) in new.iter().zip(&placed) {
                let _ = ds.remove_domain(*host, dn);
                match host {
                    None => drop(fs::remove_file(self.home().root().join(overlay_rel(name, dn)))),
                    Some(h) => drop(ds.remove_host_files(*h, dn)),
                }
                let _ = fs::remove_file(ds.config_drive(name, dn));
            }
            return Err(e);
        }
        if pool.running {
            let names: Vec<String> = new.into_iter().map(|(_, n)| n).collect();
            let fresh: Vec<Desktop> =
                self.catalog.read(|tx| tx.desktops(pool.id))?.into_iter().filter(|d| names.contains(&d.name)).collect();
            self.start_all(&fresh).into_result()?;
        }
        Ok(())
    }

    fn shrink(&mut self, pool: &Pool, doomed: &[&Desktop], actor: &Actor, current: u32, size: u32) -> Result<()> {
        let name = &pool.name;
        if let Some(d) = doomed.iter().find(|d| d.assigned_to.is_some()) {
            return Err(PoolError::InUse {
                desktop: d.name.clone(),
                user: d.assigned_to.clone().unwrap_or_default(),
                what: format!("shrinking pool '{name}' to {size} would remove it"),
            });
        }
        crate::test_hook::pause(crate::test_hook::POOL_SHRINK);
        // The broker may have given one away since the look above: checked again in the
        // write, and then the shrink refuses (`rules::when_taken(Claim::Shrink)`).
        self.catalog.write(|tx| -> Result<()> {
            for d in doomed {
                if !tx.delete_idle_desktop(d.id)? {
                    let now = tx.desktop(&d.name)?.and_then(|d| d.assigned_to).unwrap_or_default();
                    return Err(PoolError::InUse {
                        desktop: d.name.clone(),
                        user: now,
                        what: format!("shrinking pool '{name}' to {size} would remove it"),
                    });
                }
            }
            record_resize(tx, pool, actor, current, size)?;
            Ok(())
        })?;
        let ds = self.desktops();
        let outcomes = ds.each(doomed, "removed", |d| {
            ds.remove_domain(d.host_id, &d.name)?;
            ds.remove_files(d, name)?;
            Ok(true)
        });
        let names: Vec<String> = doomed.iter().map(|d| d.name.clone()).collect();
        Done::of(&names, outcomes).into_result().map(drop)
    }

    /// Remove exactly the pool's domains, overlays and runtime files.
    pub fn delete(&mut self, name: &str, force: bool, actor: &Actor) -> Result<()> {
        names::validate("pool", name)?;
        let _l = self.lock_pool(name)?;
        let why = "deleting the pool would take the desktop away";
        let (pool, desktops) = self.unless_in_use(name, force, why)?;
        crate::test_hook::pause(crate::test_hook::POOL_DELETE);
        // Stopped in the same write that checks again: the broker gives no desktop of it away
        // from here on, so none is deleted from under a user.
        self.catalog.write(|tx| -> Result<()> {
            still_unused(tx, &pool, rules::Claim::Delete { force }, why)?;
            tx.set_pool_running(pool.id, false)?;
            // Sessions end first, so their consoles close before the domains go.
            for d in &desktops {
                tx.end_stale_sessions_on(&d.name)?;
            }
            Ok(())
        })?;
        // Domains first: a desktop still defined must keep its overlay. All at once; when one
        // fails the pool stays (stopped) and the command can be run again.
        let names: Vec<String> = desktops.iter().map(|d| d.name.clone()).collect();
        let ds = self.desktops();
        let removed = Done::of(
            &names,
            ds.each(&desktops, "removed", |d| {
                ds.remove_domain(d.host_id, &d.name)?;
                if d.host_id.is_some() {
                    ds.remove_files(d, name)?;
                }
                Ok(true)
            }),
        );
        if !removed.failed.is_empty() {
            return Err(PoolError::Desktops { failed: removed.failures() });
        }
        let pool_hosts = self.catalog.read(|tx| tx.pool_hosts(pool.id))?;
        self.catalog.write(|tx| -> Result<()> {
            tx.delete_pool(pool.id)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "pool.delete",
                pool: Some(name),
                image: Some(&pool.image),
                version: Some(pool.version),
                detail: json!({"desktops": desktops.len(), "force": force}),
            })?;
            Ok(())
        })?;
        // Hosts that are fenced are not called (what they hold is removed at their return).
        let reachable: Vec<i64> =
            pool_hosts.into_iter().filter(|h| self.sites.host(*h).is_ok_and(|h| h.state != "fenced")).collect();
        self.remove_leftovers(name, &reachable)
    }
}

/// Hands desktops to users. The identity drive is for the first boot only (Windows Setup,
/// cloudbase-init) and its answer file holds the domain-join secret: its media is ejected
/// before a user gets the desktop. Both calls run inside the catalog transaction that records
/// the hand-out, so a failed eject rolls it back and nothing is handed out.
pub(crate) struct HandOut<'a> {
    sites: Sites<'a>,
    profiles: &'a Path,
}

impl HandOut<'_> {
    /// The next idle clean desktop of `pool`, assigned to `user`, its drive ejected.
    pub(crate) fn idle(&self, tx: &Tx, pool: &Pool, user: &str) -> Result<Desktop> {
        let d =
            tx.assign_idle(pool.id, user)?.ok_or(PoolError::Exhausted { pool: pool.name.clone(), size: pool.size })?;
        self.eject(pool, &d)?;
        Ok(d)
    }

    /// Eject the media of `desktop`'s identity drive (nothing to do in a pool without one).
    /// A reset defines a non-persistent desktop with a fresh drive again; a persistent one
    /// keeps no media in its definition from here on.
    pub(crate) fn eject(&self, pool: &Pool, desktop: &Desktop) -> Result<()> {
        if pool.identity.is_none() {
            return Ok(());
        }
        let dev = domain_xml::config_drive_dev(&Profile::load(self.profiles, &pool.profile)?);
        self.sites.hv(desktop.host_id)?.eject_media(&desktop.name, dev).map_err(|source| PoolError::Eject {
            desktop: desktop.name.clone(),
            pool: pool.name.clone(),
            source: Box::new(source),
        })
    }
}

/// Refuse a removed image version, or one whose disk is smaller than the profile's minimum.
fn usable_version(profile: &Profile, image: &str, v: &crate::catalog::Version) -> Result<()> {
    if let Some(r) = &v.removed {
        return Err(StoreError::Removed { image: image.to_string(), version: v.number, removed: r.clone() }.into());
    }
    match profile.min_disk_bytes().filter(|min| v.virtual_size < *min) {
        Some(min) => Err(PoolError::ImageTooSmall {
            image: image.to_string(),
            version: v.number,
            size: v.virtual_size,
            profile: profile.name().to_string(),
            min,
        }),
        None => Ok(()),
    }
}

/// Refuses a pool whose desktops' computer names could be another identity pool's.
fn no_hostname_clash(tx: &Tx, pool: &str, id: &Identity) -> Result<()> {
    for other in tx.pools()? {
        let Some(theirs) = other.identity.as_ref().map(|i| &i.hostname_pattern) else { continue };
        if other.name != pool && identity::patterns_may_clash(&id.hostname_pattern, theirs) {
            return Err(IdentityError::Clash {
                pattern: id.hostname_pattern.clone(),
                other: other.name.clone(),
                theirs: theirs.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// In the caller's write transaction: refuse (unless `claim` is forced) when a desktop of
/// the pool is assigned now, however idle it was when the command looked.
fn still_unused(tx: &Tx, pool: &Pool, claim: rules::Claim, why: &str) -> Result<()> {
    if rules::when_taken(claim) != rules::Taken::Refuse {
        return Ok(());
    }
    match tx.first_assigned(pool.id)? {
        Some((desktop, user)) => Err(PoolError::InUse {
            desktop,
            user,
            what: format!("{why} (pool '{}'); log them off first or use --force", pool.name),
        }),
        None => Ok(()),
    }
}

/// The pool's new size and its audit entry, in the caller's transaction.
fn record_resize(tx: &Tx, pool: &Pool, actor: &Actor, from: u32, to: u32) -> Result<()> {
    tx.set_pool_size(pool.id, to)?;
    tx.audit(Audit {
        actor: &actor.0,
        action: "pool.resize",
        pool: Some(&pool.name),
        image: Some(&pool.image),
        detail: json!({"from": from, "to": to}),
        ..Default::default()
    })?;
    Ok(())
}

/// Record a plan in the catalog: moves now become pending resets, in-use desktops get a
/// target, and the pool's version, pin and history change. Files follow in `heal`.
fn apply_plan(tx: &Tx, pool: &Pool, desktops: &[Desktop], plan: &MovePlan) -> Result<()> {
    for d in desktops {
        if plan.now.contains(&d.name) {
            tx.mark_reset(d.id, plan.to)?;
            if d.assigned_to.is_some() {
                // Moved while in use (--force): its session ends now, so its consoles close.
                tx.end_stale_sessions_on(&d.name)?;
                if !pool.persistent {
                    tx.unassign(d.id)?;
                }
            }
        } else if plan.at_logoff.contains(&d.name) {
            tx.set_target(d.id, Some(plan.to))?;
        } else if plan.cancel_pending.contains(&d.name) {
            tx.set_target(d.id, None)?;
        }
    }
    tx.set_pool_version(pool.id, plan.to, plan.pinned)?;
    if plan.to != pool.version {
        tx.record_pool_version(pool.id, plan.to, "move")?;
    }
    Ok(())
}

/// Flush the filesystem holding `dir`: one call makes a whole batch of files durable.
fn syncfs(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(dir).map_err(io("open", dir))?;
    // SAFETY: syncfs only reads the fd, which `f` keeps open for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(PoolError::Io {
            what: "sync",
            path: dir.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn state_word(s: DomainState) -> &'static str {
    match s {
        DomainState::Running => "running",
        DomainState::Paused => "paused",
        DomainState::ShutOff => "shut off",
        DomainState::Crashed => "crashed",
        DomainState::Shutdown => "shutting down",
        DomainState::PmSuspended => "suspended",
        DomainState::Blocked => "blocked",
        DomainState::Other => "other",
    }
}

#[cfg(test)]
pub(crate) mod tests;
