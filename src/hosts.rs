//! libvirt hosts: the daemons desktops run on, each reached by its URI, and the layers each
//! holds verified. A home without hosts drives the one libvirt of `--connect`, as it always
//! did; hosts added here get the image chains their desktops will need (`sync`), copied over
//! their own libvirt connection and read back before they count ([`crate::replica`]).

use crate::catalog::hosts::{Host, NewHost};
use crate::catalog::{Audit, Catalog, CatalogError};
use crate::home::Home;
use crate::hypervisor::{Connections, HypervisorError};
use crate::names::{self, NameError};
use crate::replica::{self, ChainLayer, HostStore, ReplicaError, Replicated, Verification};
use crate::store::Actor;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HostError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("no host named '{0}' (see 'vdim host list')")]
    NotFound(String),
    #[error("host '{name}' exists already (it is {uri})")]
    Exists { name: String, uri: String },
    #[error("{uri} is host '{name}' already")]
    UriTaken { uri: String, name: String },
    #[error("host URI {0:?} is not a libvirt URI (e.g. qemu+tls://hv2.example.com/system)")]
    BadUri(String),
    #[error("host '{host}' is {state}: {what}")]
    State { host: String, state: String, what: String },
    #[error(
        "host '{host}' still holds {count} desktop(s) (e.g. {example}): drain it first ('vdim host drain {host}')"
    )]
    HasDesktops { host: String, count: usize, example: String },
    #[error("fencing host '{0}' needs --confirm: confirm that it is powered off (its desktops are made again elsewhere; one still running there would run twice)")]
    Unconfirmed(String),
}

impl crate::error::Kind for HostError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            HostError::Name(e) => e.kind(),
            HostError::Catalog(e) => e.kind(),
            HostError::Hypervisor(e) => e.kind(),
            HostError::Replica(e) => e.kind(),
            HostError::NotFound(_) => K::NotFound,
            HostError::Exists { .. } | HostError::UriTaken { .. } => K::Conflict,
            HostError::BadUri(_) | HostError::Unconfirmed(_) => K::Invalid,
            HostError::State { .. } | HostError::HasDesktops { .. } => K::Conflict,
        }
    }
}

pub type Result<T> = std::result::Result<T, HostError>;

/// How long a host gets to answer a probe (a fresh connection and a call).
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Probes missed in a row before a host counts as dead (suspect before): with the broker's
/// probe every 2 s, 6 to 15 s after its last answer.
pub const DEAD_AFTER: u32 = 3;
/// How long a fence command may run.
pub const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a probe round found of one host.
#[derive(Debug, Serialize)]
pub struct Probe {
    pub host: String,
    /// up, suspect, dead, or fenced (not probed).
    pub liveness: &'static str,
    pub missed: u32,
    pub error: Option<String>,
}

/// A host's liveness from its state and the probes it missed in a row.
pub fn liveness(h: &Host) -> &'static str {
    match (h.state.as_str(), h.missed) {
        ("fenced", _) => "fenced",
        (_, 0) => "up",
        (_, m) if m < DEAD_AFTER => "suspect",
        _ => "dead",
    }
}

/// What `vdim host add` asks for.
#[derive(Debug, Clone)]
pub struct AddRequest {
    pub name: String,
    pub uri: String,
    pub zone: Option<String>,
    pub max_desktops: Option<u32>,
    /// Its layer store; the default pool and directory unless given.
    pub store: HostStore,
    /// Run by `sh -c` when the host stops answering (e.g. an IPMI power-off): its success
    /// fences the host, and its desktops are made again elsewhere.
    pub fence_command: Option<String>,
}

/// A host as `host list` and `host show` give it.
#[derive(Debug, Serialize)]
pub struct HostView {
    #[serde(flatten)]
    pub host: Host,
    /// up, suspect, dead (by its probes) or fenced.
    pub liveness: &'static str,
    /// Desktops placed there.
    pub desktops: usize,
    /// Layers recorded verified there.
    pub layers_verified: usize,
}

/// A host's layers against what the channels need: verified there, or still missing.
#[derive(Debug, Serialize)]
pub struct HostDetail {
    #[serde(flatten)]
    pub host: Host,
    /// up, suspect, dead (by the probes recorded) or fenced.
    pub liveness: &'static str,
    /// Whether its libvirt answered now, and its error when not.
    pub reachable: bool,
    /// The desktops placed there.
    pub desktops: Vec<String>,
    pub error: Option<String>,
    /// Every layer recorded verified there (digest, when).
    pub layers: Vec<(String, String)>,
    /// Per image channel: the version and whether its whole chain is there verified.
    pub channels: Vec<ChannelChain>,
}

#[derive(Debug, Serialize)]
pub struct ChannelChain {
    pub image: String,
    pub channel: String,
    pub version: u32,
    /// Layers of the chain not verified on the host yet: desktops of it wait ("pending").
    pub missing: Vec<String>,
}

/// What `host gc` removed from a host's layer store, and what it kept.
#[derive(Debug, Serialize)]
pub struct HostGc {
    pub host: String,
    pub dry_run: bool,
    /// Layers removed there (or that would be, with `dry_run`).
    pub removed: Vec<String>,
    /// Layers kept: some desktop, pool window or channel there needs them.
    pub kept: Vec<String>,
}

/// What `host sync` did: per version, the replication report.
#[derive(Debug, Serialize)]
pub struct Synced {
    pub host: String,
    pub versions: Vec<SyncedVersion>,
}

#[derive(Debug, Serialize)]
pub struct SyncedVersion {
    pub image: String,
    pub version: u32,
    #[serde(flatten)]
    pub report: Replicated,
}

/// The host service, borrowing the catalog and home of a [`crate::context::Context`].
pub struct Hosts<'a> {
    home: &'a Home,
    catalog: &'a mut Catalog,
    links: &'a Connections,
    /// Told how far each layer's upload and read-back have come (a terminal's progress line).
    progress: Option<&'a CopyProgress>,
}

/// Told, with the host's name, how far a layer's copy has come.
pub type CopyProgress = dyn Fn(&str, replica::Progress<'_>) + Sync;

impl<'a> Hosts<'a> {
    pub fn new(home: &'a Home, catalog: &'a mut Catalog, links: &'a Connections) -> Hosts<'a> {
        Hosts { home, catalog, links, progress: None }
    }

    /// Reports each layer's copy as it goes to `progress` (host name, how far).
    pub fn with_progress(self, progress: &'a CopyProgress) -> Hosts<'a> {
        Hosts { progress: Some(progress), ..self }
    }

    fn load(&mut self, name: &str) -> Result<Host> {
        names::validate("host", name)?;
        self.catalog.read(|tx| tx.host(name))?.ok_or_else(|| HostError::NotFound(name.to_string()))
    }

    /// Registers a host after its libvirt answered and its layer store is usable.
    pub fn add(&mut self, r: &AddRequest, actor: &Actor) -> Result<Host> {
        names::validate("host", &r.name)?;
        if let Some(z) = &r.zone {
            names::validate("zone", z)?;
        }
        if !r.uri.contains(":/") || r.uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(HostError::BadUri(r.uri.escape_default().to_string()));
        }
        r.store.validate()?;
        self.catalog.read(|tx| -> Result<()> {
            if let Some(h) = tx.host(&r.name)? {
                return Err(HostError::Exists { name: h.name, uri: h.uri });
            }
            if let Some(h) = tx.host_by_uri(&r.uri)? {
                return Err(HostError::UriTaken { uri: h.uri, name: h.name });
            }
            Ok(())
        })?;
        // It must answer before it is one of ours, and hold a layer store.
        let hv = self.links.get(&r.uri)?;
        hv.ensure_storage_pool(&r.store.storage_pool, &r.store.path)?;
        let store_path = r.store.path.display().to_string();
        self.catalog.write(|tx| -> Result<Host> {
            let h = tx.insert_host(&NewHost {
                name: &r.name,
                uri: &r.uri,
                zone: r.zone.as_deref(),
                max_desktops: r.max_desktops,
                storage_pool: &r.store.storage_pool,
                store_path: &store_path,
                fence_command: r.fence_command.as_deref(),
            })?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "host.add",
                detail: json!({"host": h.name, "uri": h.uri, "zone": h.zone, "max_desktops": h.max_desktops,
                    "storage_pool": h.storage_pool, "store_path": h.store_path}),
                ..Default::default()
            })?;
            Ok(h)
        })
    }

    pub fn list(&mut self) -> Result<Vec<HostView>> {
        self.catalog.read(|tx| -> Result<Vec<HostView>> {
            let mut out = vec![];
            for host in tx.hosts()? {
                let layers_verified = tx.host_layers(host.id)?.len();
                let desktops = tx.desktops_on(host.id)?.len();
                out.push(HostView { liveness: liveness(&host), host, desktops, layers_verified });
            }
            Ok(out)
        })
    }

    /// The host, whether it answers, its layers, and which channel versions it lacks.
    pub fn show(&mut self, name: &str) -> Result<HostDetail> {
        let host = self.load(name)?;
        let error = self.links.probe(&host.uri, PROBE_TIMEOUT).err();
        let (layers, channels, desktops) = self.catalog.read(|tx| -> Result<_> {
            let layers = tx.host_layers(host.id)?;
            let desktops = tx.desktops_on(host.id)?.into_iter().map(|d| d.name).collect();
            let held: BTreeSet<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
            let mut channels = vec![];
            for image in tx.images()? {
                for (channel, version) in channels_of(tx, &image)? {
                    let missing =
                        tx.chain(&image, version)?.into_iter().filter(|d| !held.contains(d.as_str())).collect();
                    channels.push(ChannelChain {
                        image: image.name.clone(),
                        channel: channel.to_string(),
                        version,
                        missing,
                    });
                }
            }
            Ok((layers, channels, desktops))
        })?;
        Ok(HostDetail {
            liveness: liveness(&host),
            reachable: error.is_none(),
            error,
            host,
            desktops,
            layers,
            channels,
        })
    }

    /// Forgets a host (its libvirt and its layer store are left as they are). Refused while
    /// desktops are placed there.
    pub fn remove(&mut self, name: &str, actor: &Actor) -> Result<()> {
        let host = self.load(name)?;
        self.catalog.write(|tx| -> Result<()> {
            let on = tx.desktops_on(host.id)?;
            if let Some(d) = on.first() {
                return Err(HostError::HasDesktops {
                    host: host.name.clone(),
                    count: on.len(),
                    example: d.name.clone(),
                });
            }
            tx.delete_host(host.id)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "host.remove",
                detail: json!({"host": host.name, "uri": host.uri}),
                ..Default::default()
            })?;
            Ok(())
        })
    }

    /// Copies version chains to the host, verified, and records what reads back right: every
    /// channel's version of every image, or `image`'s versions (not removed), or one `version`.
    pub fn sync(&mut self, name: &str, image: Option<&str>, version: Option<u32>, actor: &Actor) -> Result<Synced> {
        self.sync_with(name, image, version, true, actor)
    }

    /// [`Hosts::sync`]; unless `trust_recorded`, copies recorded verified are read back again
    /// too (a flipped byte since is found, the copy replaced).
    fn sync_with(
        &mut self,
        name: &str,
        image: Option<&str>,
        version: Option<u32>,
        trust_recorded: bool,
        actor: &Actor,
    ) -> Result<Synced> {
        let host = self.load(name)?;
        let wanted = self.catalog.read(|tx| -> Result<Vec<(String, u32, Vec<String>)>> {
            let mut wanted: Vec<(String, u32)> = vec![];
            match (image, version) {
                (Some(i), Some(v)) => wanted.push((i.to_string(), v)),
                (Some(i), None) => {
                    for v in tx.versions(&tx.image(i)?)?.into_iter().filter(|v| v.removed.is_none()) {
                        wanted.push((i.to_string(), v.number));
                    }
                }
                (None, _) => {
                    for image in tx.images()? {
                        for (_, v) in channels_of(tx, &image)? {
                            wanted.push((image.name.clone(), v));
                        }
                    }
                }
            }
            wanted.sort();
            wanted.dedup();
            wanted.into_iter().map(|(i, v)| Ok((i.clone(), v, tx.chain(&tx.image(&i)?, v)?))).collect()
        })?;
        let hv = self.links.get(&host.uri)?;
        let store = store_of(&host);
        let mut out = Synced { host: host.name.clone(), versions: vec![] };
        for (image, version, digests) in wanted {
            let recorded: BTreeSet<String> = if trust_recorded {
                self.catalog.read(|tx| tx.host_layers(host.id))?.into_iter().map(|(d, _)| d).collect()
            } else {
                BTreeSet::new()
            };
            let layers: Vec<ChainLayer> =
                digests.iter().map(|d| ChainLayer { digest: d.clone(), path: self.home.layer(d) }).collect();
            let (progress, host_name) = (self.progress, host.name.as_str());
            let report = replica::replicate(&*hv, &store, &layers, &recorded, &mut |p| {
                if let Some(f) = progress {
                    f(host_name, p);
                }
            })?;
            let verified: Vec<&str> = report.verified();
            let lost: Vec<&str> = digests.iter().map(String::as_str).filter(|d| !verified.contains(d)).collect();
            self.catalog.write(|tx| -> Result<()> {
                tx.record_host_layers(host.id, &verified)?;
                tx.forget_host_layers(host.id, &lost)?;
                tx.audit(Audit {
                    actor: &actor.0,
                    action: "host.sync",
                    image: Some(&image),
                    version: Some(version),
                    detail: json!({"host": host.name, "verified": verified, "failed": lost,
                        "quarantined": report.quarantined(), "bytes_sent": report.bytes_sent()}),
                    ..Default::default()
                })?;
                Ok(())
            })?;
            out.versions.push(SyncedVersion { image, version, report });
        }
        Ok(out)
    }

    /// The host by name, as the catalog has it now.
    pub fn get(&mut self, name: &str) -> Result<Host> {
        self.load(name)
    }

    /// Sets the host's state (`up`, `draining`, `fenced`), audited.
    pub fn set_state(&mut self, name: &str, state: &str, actor: &Actor, detail: serde_json::Value) -> Result<Host> {
        let host = self.load(name)?;
        self.catalog.write(|tx| -> Result<Host> {
            tx.set_host_state(host.id, state)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: match state {
                    "draining" => "host.drain",
                    "fenced" => "host.fence",
                    _ => "host.up",
                },
                detail: json!({"host": host.name, "from": host.state, "detail": detail}),
                ..Default::default()
            })?;
            Ok(tx.host_by_id(host.id)?.expect("still there"))
        })
    }

    /// One probe of every host that is not fenced (all at once): answered or not, recorded.
    /// A host that stopped answering loses its kept connection (the next use reconnects).
    pub fn probe_all(&mut self) -> Result<Vec<Probe>> {
        let hosts: Vec<Host> =
            self.catalog.read(|tx| tx.hosts())?.into_iter().filter(|h| h.state != "fenced").collect();
        let links = self.links;
        let answers: Vec<std::result::Result<(), String>> = std::thread::scope(|s| {
            let probes: Vec<_> = hosts.iter().map(|h| s.spawn(move || links.probe(&h.uri, PROBE_TIMEOUT))).collect();
            probes.into_iter().map(|p| p.join().unwrap_or_else(|_| Err("probe panicked".into()))).collect()
        });
        let mut out = vec![];
        for (h, answer) in hosts.iter().zip(answers) {
            let missed = self.catalog.write(|tx| tx.record_probe(h.id, answer.is_ok()))?;
            if answer.is_err() {
                self.links.forget(&h.uri);
            }
            let now = Host { missed, ..h.clone() };
            if missed != h.missed && (missed == 1 || missed == DEAD_AFTER || missed == 0) {
                tracing::warn!(host = %h.name, liveness = liveness(&now), missed, error = ?answer.as_ref().err(), "host liveness changed");
            }
            out.push(Probe { host: h.name.clone(), liveness: liveness(&now), missed, error: answer.err() });
        }
        Ok(out)
    }

    /// Runs the host's fence command (`sh -c`, env VDIM_HOST and VDIM_HOST_URI) with a time
    /// limit: whether it exited 0. No command: false.
    pub fn run_fence_command(&mut self, name: &str) -> Result<bool> {
        let host = self.load(name)?;
        let Some(cmd) = &host.fence_command else { return Ok(false) };
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("VDIM_HOST", &host.name)
            .env("VDIM_HOST_URI", &host.uri)
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(host = %host.name, error = %e, "fence command did not start");
                return Ok(false);
            }
        };
        let deadline = std::time::Instant::now() + FENCE_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(host = %host.name, %status, "fence command ran");
                    return Ok(status.success());
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!(host = %host.name, "fence command timed out: the host is not fenced");
                    return Ok(false);
                }
            }
        }
    }

    /// A fenced host is back: desktop domains there that the catalog no longer places there
    /// (made again elsewhere while it was off, or removed with their pool) are removed with
    /// their files, so none of them ever runs twice. Returns the domains removed.
    pub fn reconcile(&mut self, name: &str) -> Result<Vec<String>> {
        let host = self.load(name)?;
        let hv = self.links.get(&host.uri)?;
        let (spool, _) = crate::pool::sites::desktop_store(&host);
        let mut removed = vec![];
        for domain in hv.list("vdim-")? {
            let placed_here = self.catalog.read(|tx| tx.desktop(&domain))?.is_some_and(|d| d.host_id == Some(host.id));
            if placed_here || !crate::names::is_desktop_domain(&domain) {
                continue;
            }
            match hv.destroy(&domain).and_then(|_| hv.undefine(&domain)) {
                Ok(()) | Err(HypervisorError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            for f in crate::pool::sites::desktop_files(&domain) {
                hv.delete_volume(&spool, &f)?;
            }
            removed.push(domain);
        }
        Ok(removed)
    }

    /// The layers a host must keep: the chains of every version its pools' desktops run or
    /// move to, its pools' versions, pins and rollback windows, and the versions their
    /// channels point at, so neither a rollback nor a promotion there waits for a copy.
    fn needed_on(tx: &crate::catalog::Tx, host: &Host) -> Result<BTreeSet<String>> {
        let mut keep = BTreeSet::new();
        let all = tx.pools()?;
        for p in &all {
            if !tx.pool_hosts(p.id)?.contains(&host.id) {
                continue;
            }
            let image = tx.image(&p.image)?;
            let mut versions = vec![p.version, tx.channel(&image, p.channel)?];
            versions.extend(p.pinned);
            for d in tx.desktops(p.id)? {
                versions.push(d.version);
                versions.extend(d.target);
            }
            let mut window: Vec<u32> = vec![];
            for v in tx.pool_history(p.id)?.into_iter().rev() {
                if !window.contains(&v) && window.len() < crate::store::ROLLBACK_WINDOW {
                    window.push(v);
                }
            }
            versions.extend(window);
            for v in versions {
                keep.extend(tx.chain(&image, v)?);
            }
        }
        // Desktops placed there whatever their pool says now.
        for d in tx.desktops_on(host.id)? {
            if let Some(p) = all.iter().find(|p| p.id == d.pool_id) {
                keep.extend(tx.chain(&tx.image(&p.image)?, d.version)?);
            }
        }
        Ok(keep)
    }

    /// Removes from the host's layer store every layer no desktop, pool window or channel
    /// there needs (rows first: a layer is forgotten before its copy goes).
    pub fn gc(&mut self, name: &str, dry_run: bool, actor: &Actor) -> Result<HostGc> {
        let host = self.load(name)?;
        let keep = self.catalog.read(|tx| Self::needed_on(tx, &host))?;
        let hv = self.links.get(&host.uri)?;
        let store = store_of(&host);
        let held: Vec<String> = hv
            .storage_volumes(&store.storage_pool)?
            .into_iter()
            .filter_map(|v| v.name.strip_suffix(".qcow2").map(str::to_string))
            .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        let (kept, removed): (Vec<String>, Vec<String>) = held.into_iter().partition(|d| keep.contains(d));
        if !dry_run && !removed.is_empty() {
            let gone: Vec<&str> = removed.iter().map(String::as_str).collect();
            self.catalog.write(|tx| -> Result<()> {
                tx.forget_host_layers(host.id, &gone)?;
                tx.audit(Audit {
                    actor: &actor.0,
                    action: "host.gc",
                    detail: json!({"host": host.name, "removed": gone}),
                    ..Default::default()
                })?;
                Ok(())
            })?;
            for d in &removed {
                hv.delete_volume(&store.storage_pool, &format!("{d}.qcow2"))?;
            }
        }
        Ok(HostGc { host: host.name, dry_run, removed, kept })
    }

    /// Copies a version's chain to the host unless all of it is recorded verified there; with
    /// `reread`, every copy of it there is read back again first (before a rollout moves
    /// desktops onto it).
    pub fn ensure_version(&mut self, name: &str, image: &str, version: u32, reread: bool, actor: &Actor) -> Result<()> {
        let host = self.load(name)?;
        let missing =
            self.catalog.read(|tx| -> Result<bool> { Ok(!tx.holds_chain(host.id, &tx.image(image)?, version)?) })?;
        if missing || reread {
            let r = self.sync_with(name, Some(image), Some(version), !reread, actor)?;
            if let Some(v) = r.versions.iter().find(|v| !v.report.complete()) {
                tracing::warn!(host = name, image, version = v.version, "version not complete on the host");
            }
        }
        Ok(())
    }

    /// Reads back every layer recorded on the host: a copy that reads back wrong is removed
    /// there and forgotten here (the next `sync` copies it again).
    pub fn verify(&mut self, name: &str, actor: &Actor) -> Result<Verification> {
        let host = self.load(name)?;
        let digests: Vec<String> =
            self.catalog.read(|tx| tx.host_layers(host.id))?.into_iter().map(|(d, _)| d).collect();
        let hv = self.links.get(&host.uri)?;
        let v = replica::verify_host(&*hv, &store_of(&host), &digests, &mut |_| {})?;
        let good: Vec<&str> = v.verified();
        let bad: Vec<&str> = digests.iter().map(String::as_str).filter(|d| !good.contains(d)).collect();
        self.catalog.write(|tx| -> Result<()> {
            tx.record_host_layers(host.id, &good)?;
            tx.forget_host_layers(host.id, &bad)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "host.verify",
                detail: json!({"host": host.name, "verified": good, "not_verified": bad}),
                ..Default::default()
            })?;
            Ok(())
        })?;
        Ok(v)
    }
}

fn store_of(h: &Host) -> HostStore {
    HostStore { storage_pool: h.storage_pool.clone(), path: PathBuf::from(&h.store_path) }
}

/// Where each channel of an image points.
fn channels_of(tx: &crate::catalog::Tx, image: &crate::catalog::Image) -> Result<Vec<(crate::catalog::Channel, u32)>> {
    crate::catalog::Channel::ALL.into_iter().map(|c| Ok((c, tx.channel(image, c)?))).collect()
}
