//! The rollout engine: a promotion reaches a channel's pools in waves, each wave watched
//! through libvirt's lifecycle events, and undoes itself when a desktop crashes.
//!
//! ```text
//!  promote ──► rollout (catalog) ──► wave 1: 1 desktop/pool ─soak─► wave 2 ─soak─► ... 100% ─► channel moves
//!                                         │ crash / reboot loop / stop
//!                                         ▼
//!                     every desktop this rollout moved goes back; version marked failed
//! ```
//! Every step is written to the catalog before it is taken, so a vdim killed mid-rollout
//! leaves a rollout that the next command finds (`recover_interrupted`) and that
//! `rollout resume` carries on or `rollback --image --channel` undoes.

use crate::catalog::leases::Driver;
use crate::catalog::rollouts::{
    DesktopState, Failure, Interruption, NewRollout, Rollout, RolloutDesktop, RolloutState, FAILED_PREFIX,
};
use crate::catalog::{Audit, Catalog, CatalogError, Channel, Tx};
use crate::health;
use crate::home::Home;
use crate::hypervisor::{Connections, Hypervisor, HypervisorError, LifecycleEvent, Subscription};
use crate::leader;
use crate::lock::{self, LockError, Mode};
use crate::names::{self, NameError};
use crate::pool::sites::Sites;
use crate::pool::{DesktopMove, PoolError, Pools};
use crate::profile::Profile;
use crate::rules::{self, PromotionDenied, WaveSize};
use crate::store::{Actor, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, SystemTime};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RolloutError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Denied(#[from] PromotionDenied),
    #[error("{0}")]
    Waves(String),
    #[error("--force needs --reason: the audit log records why a gate was skipped")]
    ForceWithoutReason,
    #[error(
        "the rollout of '{image}' is running, driven by {driver}: 'vdim rollout halt {image}' stops it after its wave"
    )]
    Driven { image: String, driver: String },
    #[error("no rollout of '{0}' is running or halted")]
    NothingOpen(String),
    #[error("the rollout of '{image}' version {version} to {channel} is {state}, not running")]
    NotRunning { image: String, version: u32, channel: Channel, state: RolloutState },
    #[error("the rollout of '{image}' version {version} to {channel} failed and was rolled back: {summary}")]
    Failed { image: String, version: u32, channel: Channel, summary: String, report: Box<RolloutReport> },
    #[error("channel {channel} of '{image}' has no earlier version to go back to (use --to N)")]
    NoPrevious { image: String, channel: Channel },
}

impl crate::error::Kind for RolloutError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            RolloutError::Name(e) => e.kind(),
            RolloutError::Catalog(e) => e.kind(),
            RolloutError::Store(e) => e.kind(),
            RolloutError::Pool(e) => e.kind(),
            RolloutError::Hypervisor(e) => e.kind(),
            RolloutError::Lock(e) => e.kind(),
            RolloutError::Denied(e) => e.kind(),
            RolloutError::Waves(_) | RolloutError::ForceWithoutReason => K::Invalid,
            RolloutError::NothingOpen(_)
            | RolloutError::Driven { .. }
            | RolloutError::NotRunning { .. }
            | RolloutError::Failed { .. }
            | RolloutError::NoPrevious { .. } => K::Conflict,
        }
    }
}

pub type Result<T> = std::result::Result<T, RolloutError>;

/// Seconds one guest-agent ping may take.
const AGENT_PING_TIMEOUT: i32 = 5;
/// How long after a soak a guest agent may take to answer at all.
const AGENT_GRACE: Duration = Duration::from_secs(60);

/// What `rollout status` and `promote` print.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub waves: Vec<WaveReport>,
    /// (host, pool): hosts of the channel's pools where the version's chain is not verified;
    /// their desktops there do not move until it is (`vdim host sync`).
    pub pending: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveReport {
    pub wave: u32,
    pub size: String,
    pub moved: usize,
    pub healthy: usize,
    pub failed: usize,
    pub desktops: Vec<RolloutDesktop>,
}

/// What an emergency channel rollback did (`vdim rollback --image --channel`).
#[derive(Debug, Clone, Serialize)]
pub struct ChannelRollback {
    pub image: String,
    pub channel: Channel,
    /// The version the channel points at now.
    pub version: u32,
    /// The open rollout it stopped, if any.
    pub stopped_rollout: Option<i64>,
    /// Desktops of that rollout moved back.
    pub reverted_desktops: Vec<String>,
    pub pools: BTreeMap<String, PoolRollback>,
}

/// One pool of a channel rollback.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum PoolRollback {
    /// `failed`: desktops whose move failed (the others moved); due for the next command.
    Moved {
        at_logoff: Vec<String>,
        moved_now: Vec<String>,
        failed: Vec<crate::fleet::Failure>,
    },
    Error {
        error: String,
    },
}

/// Cumulative share of each pool's desktops per wave, unless told otherwise.
pub const DEFAULT_WAVES: &str = "1,10%,50%,100%";
/// How long each wave's desktops must run healthy, unless told otherwise.
pub const DEFAULT_SOAK: &str = "120s";

/// A request to promote a version of an image, with its defaults: what `vdim promote`'s
/// flags become and what `POST /api/v1/admin/images/{image}/promote` reads as its body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub version: u32,
    pub to: Channel,
    #[serde(default = "default_waves")]
    pub waves: String,
    /// A duration such as "120s" or "5m".
    #[serde(default = "default_soak", deserialize_with = "soak_de")]
    pub soak: Duration,
    /// Skip a promotion gate (recorded in the audit log with `reason`).
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_waves() -> String {
    DEFAULT_WAVES.into()
}

fn default_soak() -> Duration {
    humantime::parse_duration(DEFAULT_SOAK).expect("the default is a duration")
}

fn soak_de<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("soak: {e}")))
}

impl PromoteRequest {
    /// The request as [`Engine::promote`] takes it, for `image`.
    pub fn options<'a>(&'a self, image: &'a str) -> PromoteOptions<'a> {
        PromoteOptions {
            image,
            version: self.version,
            to: self.to,
            waves: &self.waves,
            soak: self.soak,
            force: self.force,
            reason: self.reason.as_deref(),
        }
    }
}

#[derive(Debug)]
pub struct PromoteOptions<'a> {
    pub image: &'a str,
    pub version: u32,
    pub to: Channel,
    pub waves: &'a str,
    pub soak: Duration,
    pub force: bool,
    pub reason: Option<&'a str>,
}

fn ms(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn wave_label(w: WaveSize) -> String {
    match w {
        WaveSize::Count(n) => n.to_string(),
        WaveSize::Percent(p) => format!("{p}%"),
    }
}

pub fn report(tx: &Tx, id: i64) -> std::result::Result<RolloutReport, CatalogError> {
    let rollout = tx.rollout(id)?;
    let desktops = tx.rollout_desktops(id)?;
    let sizes = rules::parse_waves(&rollout.waves).unwrap_or_default();
    let waves = sizes
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let ds: Vec<RolloutDesktop> = desktops.iter().filter(|d| d.wave == i as u32).cloned().collect();
            WaveReport {
                wave: i as u32 + 1,
                size: wave_label(*w),
                moved: ds.len(),
                healthy: ds.iter().filter(|d| d.state == DesktopState::Healthy).count(),
                failed: ds.iter().filter(|d| d.failed()).count(),
                desktops: ds,
            }
        })
        .collect();
    let image = tx.image(&rollout.image)?;
    let mut pending = vec![];
    for p in tx.pools_of_image(image.id)?.into_iter().filter(|p| p.channel == rollout.channel && p.pinned.is_none()) {
        for h in tx.pool_hosts(p.id)? {
            if !tx.holds_chain(h, &image, rollout.version)? {
                let host = tx.host_by_id(h)?.map(|h| h.name).unwrap_or_default();
                pending.push((host, p.name.clone()));
            }
        }
    }
    Ok(RolloutReport { rollout, waves, pending })
}

/// Rollouts whose driver is gone ([`crate::leader::driver_gone`]): marked halted, with what
/// was in flight, so nothing is left half-moved without saying so. Returns one line per
/// rollout found. While a broker leads, nothing is halted: the leader adopts them.
pub fn recover_interrupted(catalog: &mut Catalog) -> std::result::Result<Vec<String>, CatalogError> {
    let now = leader::now_ms();
    let here = leader::hostname();
    let (leads, drivers) =
        catalog.read(|tx| Ok::<_, CatalogError>((leader::live_leader(tx, now)?, tx.rollout_drivers()?)))?;
    if leads.is_some() {
        return Ok(vec![]);
    }
    let alive = |p: i64| crate::home::pid_alive(p as i32);
    let mut said = vec![];
    for d in drivers.into_iter().filter(|d| leader::driver_gone(d, &here, now, alive)) {
        let halted = catalog.write(|tx| -> std::result::Result<Option<Rollout>, CatalogError> {
            // Only as read: a driver that beat meanwhile, or a resume, keeps it.
            if tx.rollout_driver(d.rollout)? != d || !tx.set_rollout_state(d.rollout, RolloutState::Halted)? {
                return Ok(None);
            }
            let r = tx.rollout(d.rollout)?;
            tx.forget_rollout_driver(r.id)?;
            tx.update_rollout_outcome(r.id, |o| {
                o.interrupted = Some(Interruption { pid: d.pid, wave: r.wave + 1, at: ms(SystemTime::now()) });
            })?;
            tx.audit(Audit {
                actor: "vdim",
                action: "rollout.interrupted",
                image: Some(&r.image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "pid": d.pid, "driver": d.owner, "wave": r.wave + 1}),
                ..Default::default()
            })?;
            Ok(Some(r))
        })?;
        let Some(r) = halted else { continue };
        said.push(format!(
            "the rollout of '{}' version {} to {} was interrupted in wave {} (its vdim {} is gone); it is halted with desktops possibly mid-move: 'vdim rollout resume {}' carries on, 'vdim rollback --image {} --channel {}' undoes it",
            r.image,
            r.version,
            r.channel,
            r.wave + 1,
            d.owner.clone().unwrap_or_else(|| format!("pid {}", d.pid.unwrap_or(0))),
            r.image,
            r.image,
            r.channel
        ));
    }
    Ok(said)
}

/// The driver's heartbeat: a thread of its own, with its own catalog connection, renews
/// the rollout's `owner_seen_ms` every [`leader::HEARTBEAT`] until dropped. It notices when
/// the rollout was taken from it (adopted after it fell silent).
struct Heartbeat {
    stop: std::sync::Arc<AtomicBool>,
    lost: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(catalog: crate::catalog::Location, id: i64) -> Heartbeat {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let lost = std::sync::Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), lost.clone());
        let thread = std::thread::spawn(move || {
            let mut cat = None;
            while !s.load(Ordering::SeqCst) {
                let waited = std::time::Instant::now();
                if cat.is_none() {
                    cat = Catalog::connect(&catalog, false)
                        .inspect_err(|e| tracing::warn!(rollout = id, error = %crate::error::message(e), "rollout heartbeat: no catalog"))
                        .ok();
                }
                if let Some(c) = cat.as_mut() {
                    match c.write(|tx| tx.beat_rollout(id, leader::me(), leader::now_ms())) {
                        Ok(true) => {}
                        Ok(false) => {
                            l.store(true, Ordering::SeqCst);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(rollout = id, error = %crate::error::message(&e), "rollout heartbeat failed")
                        }
                    }
                }
                while !s.load(Ordering::SeqCst) && waited.elapsed() < leader::HEARTBEAT {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Heartbeat { stop, lost, thread: Some(thread) }
    }

    /// Another process drives the rollout now.
    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes this process the rollout's driver if its driver is `seen` (or, without `seen`, as
/// it is now); false when another process drives it.
fn claim(tx: &Tx, id: i64, seen: Option<&Driver>) -> std::result::Result<bool, CatalogError> {
    let now = tx.rollout_driver(id)?;
    if seen.is_some_and(|s| *s != now) {
        return Ok(false);
    }
    tx.claim_rollout(&now, leader::me(), std::process::id(), leader::now_ms())
}

/// A pool a rollout reaches: (name, size, desktops already on the new version, idle ones not
/// yet moved with their host).
type Candidate = (String, u32, u32, Vec<(String, Option<i64>)>);

/// The rollout engine, borrowing what it needs from a [`crate::context::Context`]; it drives
/// pools through [`Engine::pools`] and watches desktops through the hypervisor.
pub struct Engine<'a> {
    home: &'a Home,
    catalog: &'a mut Catalog,
    hv: &'a dyn Hypervisor,
    links: &'a Connections,
    profiles: &'a Path,
    actor: Actor,
    progress: &'a dyn crate::fleet::Progress,
    /// The local libvirt and the registered hosts; where each desktop of the wave is.
    sites: Sites<'a>,
    placed: BTreeMap<String, Option<i64>>,
}

impl<'a> Engine<'a> {
    pub fn new(
        home: &'a Home,
        catalog: &'a mut Catalog,
        hv: &'a dyn Hypervisor,
        links: &'a Connections,
        profiles: &'a Path,
        actor: Actor,
    ) -> Result<Engine<'a>> {
        let hosts = catalog.read(|tx| tx.hosts())?;
        let sites = Sites::new(hv, links, hosts);
        let progress = &crate::fleet::Quiet;
        Ok(Engine { home, catalog, hv, links, profiles, actor, progress, sites, placed: BTreeMap::new() })
    }

    /// Reports desktops done in waves, reverts and channel rollbacks to `progress`.
    pub fn with_progress(self, progress: &'a dyn crate::fleet::Progress) -> Engine<'a> {
        Engine { progress, ..self }
    }

    fn pools(&mut self) -> Result<Pools<'_>> {
        Ok(Pools::new(self.home, self.catalog, self.hv, self.links, self.profiles)?.with_progress(self.progress))
    }

    /// Lifecycle events of every host the desktops are on, on one channel.
    fn subscribe(&mut self, desktops: &[String]) -> Result<Subscription> {
        self.placed = self.catalog.read(|tx| -> Result<BTreeMap<String, Option<i64>>> {
            let mut out = BTreeMap::new();
            for d in desktops {
                if let Some(desktop) = tx.desktop(d)? {
                    out.insert(d.clone(), desktop.host_id);
                }
            }
            Ok(out)
        })?;
        let mut hosts: Vec<Option<i64>> = self.placed.values().copied().collect();
        if hosts.is_empty() {
            hosts.push(None);
        }
        hosts.sort();
        hosts.dedup();
        let mut subs = vec![];
        for h in hosts {
            subs.push(self.sites.hv(h)?.subscribe("vdim-")?);
        }
        Ok(Subscription::merge(subs))
    }

    /// The hypervisor a desktop of the wave is on.
    fn hv_of(&self, desktop: &str) -> std::result::Result<crate::pool::sites::Hv<'a>, PoolError> {
        self.sites.hv(self.placed.get(desktop).copied().flatten())
    }

    /// Layers reach a host before desktops do: the version's chain is copied (and read back)
    /// to every host of the channel's pools before the first wave; a desktop on a host that
    /// could not take it is not moved (its reset says the version is pending there).
    fn replicate_for(&mut self, image: &str, channel: Channel, version: u32) -> Result<()> {
        let hosts = self.catalog.read(|tx| -> Result<Vec<i64>> {
            let img = tx.image(image)?;
            let mut out = vec![];
            for p in tx.pools_of_image(img.id)?.into_iter().filter(|p| p.channel == channel) {
                out.extend(tx.pool_hosts(p.id)?);
            }
            out.sort();
            out.dedup();
            Ok(out)
        })?;
        if !hosts.is_empty() {
            let actor = self.actor.clone();
            // Read back even where recorded: no desktop boots from a copy changed since.
            self.pools()?.replicate_to(&hosts, image, version, true, &actor);
        }
        Ok(())
    }

    fn lock(&self, image: &str) -> Result<lock::Lock> {
        let locks = self.home.locks();
        Ok(lock::acquire(
            &locks,
            &names::rollout_lock(image),
            &format!("the rollout of '{image}'"),
            Mode::Exclusive,
            Duration::from_secs(2),
        )?)
    }

    pub fn status(&mut self, image: Option<&str>, limit: usize) -> Result<Vec<RolloutReport>> {
        if let Some(i) = image {
            names::validate("image", i)?;
        }
        // One whose vdim died while this process runs (a broker) shows halted, not running.
        for line in recover_interrupted(self.catalog)? {
            tracing::warn!("{line}");
        }
        self.catalog.read(|tx| -> Result<Vec<RolloutReport>> {
            let id = image.map(|i| tx.image(i)).transpose()?.map(|i| i.id);
            let mut out = vec![];
            for r in tx.rollouts(id, limit)? {
                out.push(report(tx, r.id)?);
            }
            Ok(out)
        })
    }

    /// Start a promotion and run it to the end (or to its failure) in this process.
    pub fn promote(&mut self, o: &PromoteOptions) -> Result<RolloutReport> {
        names::validate("image", o.image)?;
        // Refuse bad waves before anything is recorded; run() parses them again from the row.
        rules::parse_waves(o.waves).map_err(RolloutError::Waves)?;
        if o.force && o.reason.is_none_or(|r| r.trim().is_empty()) {
            return Err(RolloutError::ForceWithoutReason);
        }
        let _l = self.lock(o.image)?;
        self.replicate_for(o.image, o.to, o.version)?;
        let actor = self.actor.0.clone();
        let id = self.catalog.write(|tx| -> Result<i64> {
            let image = tx.image(o.image)?;
            let v = tx.version(&image, o.version)?;
            let current = tx.channel(&image, o.to)?;
            let facts = rules::PromotionFacts {
                image: image.name.clone(),
                version: o.version,
                failed: v.status == "failed",
                removed: v.removed.is_some(),
                to: o.to,
                current,
                was_on_dev: tx.channel_held(image.id, Channel::Dev, o.version)?,
                passed_test: tx.passed_test(image.id, o.version)?,
                rollout_open: tx.open_rollout(image.id)?.map(|r| r.version),
            };
            let skipped = rules::check_promotion(&facts, o.force)?;
            let forced = (!skipped.is_empty()).then(|| format!("{:?}: {}", skipped, o.reason.unwrap_or_default()));
            let id = tx.insert_rollout(&NewRollout {
                image_id: image.id,
                version: o.version,
                channel: o.to,
                from_version: current,
                waves: o.waves,
                soak_ms: o.soak.as_millis() as u64,
                actor: &actor,
                forced: forced.as_deref(),
            })?;
            claim(tx, id, None)?;
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.start",
                image: Some(o.image),
                version: Some(o.version),
                detail: json!({"rollout": id, "channel": o.to, "from": current, "waves": o.waves, "soak_ms": o.soak.as_millis() as u64, "skipped_gates": skipped, "reason": o.reason}),
                ..Default::default()
            })?;
            Ok(id)
        })?;
        self.run(id)
    }

    /// Carry on a halted (or interrupted) rollout from its next wave.
    pub fn resume(&mut self, image: &str) -> Result<RolloutReport> {
        names::validate("image", image)?;
        let _l = self.lock(image)?;
        let said = recover_interrupted(self.catalog)?;
        for s in said {
            tracing::warn!("{s}");
        }
        let actor = self.actor.0.clone();
        let (now, here) = (leader::now_ms(), leader::hostname());
        let id = self.catalog.write(|tx| -> Result<i64> {
            let img = tx.image(image)?;
            let r = tx.open_rollout(img.id)?.ok_or_else(|| RolloutError::NothingOpen(image.to_string()))?;
            // A running one only when its driver is gone (a broker's leader adopts those too:
            // whichever claims it first drives it).
            let d = tx.rollout_driver(r.id)?;
            let gone = leader::driver_gone(&d, &here, now, |p| crate::home::pid_alive(p as i32));
            if r.state == RolloutState::Running && (!gone || !claim(tx, r.id, Some(&d))?) {
                return Err(RolloutError::Driven { image: image.into(), driver: d.owner.unwrap_or_default() });
            }
            claim(tx, r.id, None)?;
            tx.set_rollout_state(r.id, RolloutState::Running)?;
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.resume",
                image: Some(image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "wave": r.wave + 1}),
                ..Default::default()
            })?;
            Ok(r.id)
        })?;
        self.run(id)
    }

    /// The leader carries on a running rollout whose driver is gone (`seen`, as the leader
    /// read it), by resume's rules: the wave in flight moved and soaked again, then the next
    /// waves; it completes, or reverts on a failure. `None` when another process claimed it
    /// first.
    pub fn adopt(&mut self, seen: &Driver) -> Result<Option<RolloutReport>> {
        let r = self.catalog.read(|tx| tx.rollout(seen.rollout))?;
        let _l = self.lock(&r.image)?;
        let actor = self.actor.0.clone();
        let adopted = self.catalog.write(|tx| -> Result<bool> {
            if tx.rollout(r.id)?.state != RolloutState::Running || !claim(tx, r.id, Some(seen))? {
                return Ok(false);
            }
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.adopted",
                image: Some(&r.image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "wave": r.wave + 1, "from": seen.owner, "from_pid": seen.pid, "by": leader::me()}),
                ..Default::default()
            })?;
            Ok(true)
        })?;
        if !adopted {
            return Ok(None);
        }
        self.run(r.id).map(Some)
    }

    /// Ask a running rollout to stop after its current wave; keeps what moved.
    pub fn halt(&mut self, image: &str) -> Result<RolloutReport> {
        names::validate("image", image)?;
        let actor = self.actor.0.clone();
        self.catalog.write(|tx| -> Result<RolloutReport> {
            let img = tx.image(image)?;
            let r = tx.open_rollout(img.id)?.ok_or_else(|| RolloutError::NothingOpen(image.to_string()))?;
            if !r.state.can_become(RolloutState::Halted) {
                return Err(RolloutError::NotRunning {
                    image: image.into(),
                    version: r.version,
                    channel: r.channel,
                    state: r.state,
                });
            }
            tx.set_rollout_state(r.id, RolloutState::Halted)?;
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.halt",
                image: Some(image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "wave": r.wave + 1}),
                ..Default::default()
            })?;
            Ok(report(tx, r.id)?)
        })
    }

    fn state_of(&mut self, id: i64) -> Result<RolloutState> {
        Ok(self.catalog.read(|tx| tx.rollout(id))?.state)
    }

    /// Pools that follow the rollout's channel (pinned pools ignore promotions), with their
    /// idle desktops not yet moved by this rollout, and the count already moved.
    fn candidates(&mut self, r: &Rollout) -> Result<Vec<Candidate>> {
        self.catalog.read(|tx| -> Result<_> {
            let done: Vec<String> = tx.rollout_desktops(r.id)?.into_iter().map(|d| d.desktop).collect();
            let mut out = vec![];
            for p in tx.pools_of_image(r.image_id)? {
                if p.channel != r.channel || p.pinned.is_some() {
                    continue;
                }
                let ds = tx.desktops(p.id)?;
                let moved = ds.iter().filter(|d| done.contains(&d.name)).count() as u32;
                let idle: Vec<(String, Option<i64>)> = ds
                    .iter()
                    .filter(|d| d.assigned_to.is_none() && !done.contains(&d.name) && d.version != r.version)
                    .map(|d| (d.name.clone(), d.host_id))
                    .collect();
                let already = ds.iter().filter(|d| !done.contains(&d.name) && d.version == r.version).count() as u32;
                out.push((p.name.clone(), p.size, moved + already, idle));
            }
            Ok(out)
        })
    }

    /// Drives a rollout this process has claimed ([`claim`]), beating while it does.
    fn run(&mut self, id: i64) -> Result<RolloutReport> {
        let r = self.catalog.read(|tx| tx.rollout(id))?;
        let beat = Heartbeat::start(self.catalog.location().clone(), id);
        let waves = rules::parse_waves(&r.waves).map_err(RolloutError::Waves)?;
        let soak = Duration::from_millis(r.soak_ms);
        // Desktops of a wave cut short by a killed vdim are soaked again.
        let unfinished: Vec<RolloutDesktop> = self
            .catalog
            .read(|tx| tx.rollout_desktops(id))?
            .into_iter()
            .filter(|d| d.wave >= r.wave && !d.state.is_settled())
            .collect();
        for (k, wave) in waves.iter().enumerate().skip(r.wave as usize) {
            if self.state_of(id)? != RolloutState::Running || beat.lost() {
                break;
            }
            let mut picks: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for d in unfinished.iter().filter(|d| d.wave as usize == k) {
                picks.entry(d.pool.clone()).or_default().push(d.desktop.clone());
            }
            let candidates = self.candidates(&r)?;
            let all_idle: Vec<(String, Option<i64>)> = candidates.iter().flat_map(|c| c.3.clone()).collect();
            let canary = rules::canary_host(&all_idle);
            for (pool, size, moved, idle) in candidates {
                let taken = picks.get(&pool).map(|v| v.len() as u32).unwrap_or(0);
                let idle = rules::wave_order(k == 0, canary, &idle);
                let more = rules::wave_pick(*wave, size, moved + taken, &idle);
                picks.entry(pool).or_default().extend(more);
            }
            picks.retain(|_, v| !v.is_empty());
            if !picks.is_empty() {
                self.run_wave(&r, k as u32, &picks, soak)?;
            }
            self.catalog.write(|tx| tx.set_rollout_wave(id, k as u32 + 1))?;
        }
        if beat.lost() {
            // Adopted by a broker while this process was thought gone: it goes on there.
            tracing::warn!(rollout = id, "another vdim drives this rollout now; stopping here");
            return Ok(self.catalog.read(|tx| report(tx, id))?);
        }
        let state = self.state_of(id)?;
        let finished = self.catalog.read(|tx| tx.rollout(id))?.wave as usize >= waves.len();
        if state == RolloutState::Running && finished {
            self.succeed(&r)?;
        }
        drop(beat);
        let actor = self.actor.0.clone();
        self.catalog.write(|tx| -> Result<RolloutReport> {
            tx.let_go_rollout(id, leader::me())?;
            let rep = report(tx, id)?;
            if rep.rollout.state == RolloutState::Halted {
                tx.audit(Audit {
                    actor: &actor,
                    action: "rollout.halted",
                    image: Some(&r.image),
                    version: Some(r.version),
                    detail: json!({"rollout": id, "next_wave": rep.rollout.wave + 1}),
                    ..Default::default()
                })?;
            }
            Ok(rep)
        })
    }

    /// The wave's desktops into the catalog as moving, before any of them moves.
    fn record_wave(&mut self, r: &Rollout, k: u32, picks: &BTreeMap<String, Vec<String>>) -> Result<()> {
        let all: Vec<String> = picks.values().flatten().cloned().collect();
        let actor = self.actor.0.clone();
        self.catalog.write(|tx| -> Result<()> {
            for (pool, ds) in picks {
                for d in ds {
                    let from = tx.desktop(d)?.map(|x| x.version).unwrap_or(r.from_version);
                    tx.add_rollout_desktop(r.id, d, pool, k, if from == r.version { r.from_version } else { from })?;
                    tx.set_rollout_desktop(r.id, d, DesktopState::Moving, "")?;
                }
            }
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.wave",
                image: Some(&r.image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "wave": k + 1, "desktops": all}),
                ..Default::default()
            })?;
            Ok(())
        })
    }

    /// [`Engine::move_wave`] while a watcher reads the wave's events: booting a large wave
    /// takes seconds, and a desktop that crashes meanwhile stops the boots not yet made (the
    /// soak then acts on it at once). Returns the desktops that moved, the subscription, and
    /// the events seen meanwhile with when they were seen.
    #[allow(clippy::type_complexity)]
    fn move_wave_watched(
        &mut self,
        r: &Rollout,
        k: u32,
        picks: &BTreeMap<String, Vec<String>>,
        sub: Subscription,
        since: SystemTime,
    ) -> Result<(BTreeMap<String, Vec<String>>, Subscription, Vec<(LifecycleEvent, SystemTime)>)> {
        let halt = AtomicBool::new(false);
        let booted = AtomicBool::new(false);
        let all: Vec<String> = picks.values().flatten().cloned().collect();
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let sub = sub;
                // The soak's own rules, with no end: only a failure matters here.
                let until = since + Duration::from_secs(365 * 24 * 3600);
                let window = health::Window { since, until, agent_grace: AGENT_GRACE };
                let mut watch = health::Wave::new(window, all.iter().map(|d| (d.clone(), false)));
                let mut seen = vec![];
                while !booted.load(Ordering::SeqCst) {
                    match sub.events.recv_timeout(Duration::from_millis(50)) {
                        Ok(ev) => {
                            let now = SystemTime::now();
                            let event = health::from_lifecycle(&ev.kind, &ev.detail);
                            if event.is_some_and(|e| watch.observe(&ev.domain, e, ev.at, now)) {
                                tracing::warn!(desktop = %ev.domain, "a desktop of the wave failed while it booted: no more boots");
                                halt.store(true, Ordering::SeqCst);
                            }
                            seen.push((ev, now));
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        // The soak finds the stream closed and falls back to state checks.
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                (sub, seen)
            });
            let moved = self.move_wave(r, k, picks, &halt);
            booted.store(true, Ordering::SeqCst);
            let (sub, seen) = watcher.join().expect("the wave's watcher does not panic");
            moved.map(|m| (m, sub, seen))
        })
    }

    /// Moves the wave's desktops to the new version and marks them soaking; those given to a
    /// user meanwhile are marked skipped. Boots stop once `halt` is set. Returns the desktops
    /// that moved, by pool.
    fn move_wave(
        &mut self,
        r: &Rollout,
        k: u32,
        picks: &BTreeMap<String, Vec<String>>,
        halt: &AtomicBool,
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let mut picks = picks.clone();
        let moves: Vec<DesktopMove> = picks
            .iter()
            .map(|(pool, ds)| DesktopMove { pool: pool.clone(), desktops: ds.clone(), to: r.version })
            .collect();
        let actor = self.actor.clone();
        let why = format!("rollout {} wave {}", r.id, k + 1);
        // Every pool's desktops of the wave at once.
        let moved = self.pools()?.with_halt(halt).move_desktops(&moves, true, &actor, &why, rules::Claim::Wave)?;
        if !moved.failed.is_empty() {
            // A desktop the wave could not boot cannot be soaked: the rollout stops here,
            // halted for the admin (resume or roll back); the catalog knows every move.
            return Err(PoolError::Desktops { failed: moved.failed }.into());
        }
        for ds in picks.values_mut() {
            ds.retain(|d| !moved.skipped.contains(d));
        }
        let skipped = moved.skipped;
        let all: Vec<String> = picks.values().flatten().cloned().collect();
        self.catalog.write(|tx| -> Result<()> {
            for d in &all {
                tx.set_rollout_desktop(r.id, d, DesktopState::Soaking, "")?;
            }
            for d in &skipped {
                tx.set_rollout_desktop(
                    r.id,
                    d,
                    DesktopState::Skipped,
                    "given to a user before it moved; follows at logoff",
                )?;
            }
            Ok(())
        })?;
        Ok(picks)
    }

    fn run_wave(&mut self, r: &Rollout, k: u32, picks: &BTreeMap<String, Vec<String>>, soak: Duration) -> Result<()> {
        // Record first, act after: a killed vdim leaves desktops the next run knows about.
        self.record_wave(r, k, picks)?;
        // Subscribe before the desktops start, so even a crash at once is seen.
        let wave_desktops: Vec<String> = picks.values().flatten().cloned().collect();
        let sub = self.subscribe(&wave_desktops)?;
        let soak_start = SystemTime::now();
        crate::test_hook::pause(crate::test_hook::ROLLOUT_WAVE);
        let (picks, sub, early) = self.move_wave_watched(r, k, picks, sub, soak_start)?;
        let picks = &picks;
        let all: Vec<String> = picks.values().flatten().cloned().collect();
        let agents = self.agent_desktops(picks)?;
        let window = health::Window { since: soak_start, until: SystemTime::now() + soak, agent_grace: AGENT_GRACE };
        let mut wave = health::Wave::new(window, all.iter().map(|d| (d.clone(), agents.contains(d))));
        // What happened while the wave booted counts as it happened.
        for (ev, seen) in early {
            if let Some(event) = health::from_lifecycle(&ev.kind, &ev.detail) {
                wave.observe(&ev.domain, event, ev.at, seen);
            }
        }
        self.soak(&mut wave, window.until, &all, &sub);
        drop(sub);
        let failed: Vec<(String, String, SystemTime, SystemTime)> = match self.await_agents(&mut wave) {
            health::WaveVerdict::Failed(f) => {
                f.into_iter().map(|(d, f)| (d, f.reason.to_string(), f.at, f.seen)).collect()
            }
            _ => vec![],
        };
        if failed.is_empty() {
            self.catalog.write(|tx| -> Result<()> {
                for d in &all {
                    tx.set_rollout_desktop(
                        r.id,
                        d,
                        DesktopState::Healthy,
                        &format!("ran {} s without crash or reboot", soak.as_secs()),
                    )?;
                }
                Ok(())
            })?;
            for (pool, ds) in picks {
                self.pools()?.stop_if_pool_stopped(pool, ds)?;
            }
            return Ok(());
        }
        self.fail(r, k, &failed)
    }

    /// Desktops whose profile has the guest agent channel: the extra signal of a soak.
    fn agent_desktops(&mut self, picks: &BTreeMap<String, Vec<String>>) -> Result<BTreeSet<String>> {
        let profiles = self.profiles.to_path_buf();
        let mut out = BTreeSet::new();
        for (pool, desktops) in picks {
            let profile = self
                .catalog
                .read(|tx| -> Result<String> { Ok(tx.pool(pool)?.map(|p| p.profile).unwrap_or_default()) })?;
            match Profile::load(&profiles, &profile) {
                Ok(p) if p.has_guest_agent() => out.extend(desktops.iter().cloned()),
                Ok(_) => {}
                Err(e) => tracing::warn!("pool '{pool}': no guest-agent check, its profile does not load: {e}"),
            }
        }
        Ok(out)
    }

    /// Feed the wave's rules until the soak ends or a desktop fails: lifecycle events first,
    /// a state check every second as backstop.
    fn soak(&self, wave: &mut health::Wave, until: SystemTime, desktops: &[String], sub: &Subscription) {
        let mut next_check = SystemTime::now() + Duration::from_secs(1);
        let mut events_alive = true;
        loop {
            let now = SystemTime::now();
            if wave.verdict_at(now) != health::WaveVerdict::Soaking {
                return;
            }
            let wait = until.duration_since(now).unwrap_or_default().min(Duration::from_millis(200));
            let ev = if events_alive {
                match sub.events.recv_timeout(wait) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        // Lost the event stream: fall back to state checks, never to blindness.
                        tracing::warn!("libvirt event stream closed during soak; checking domain states instead");
                        events_alive = false;
                        None
                    }
                }
            } else {
                std::thread::sleep(wait);
                None
            };
            if let Some(ev) = ev {
                if let Some(event) = health::from_lifecycle(&ev.kind, &ev.detail) {
                    if wave.observe(&ev.domain, event, ev.at, SystemTime::now()) {
                        // A crash stops the rollout at once: no waiting out the soak.
                        return;
                    }
                }
            }
            if SystemTime::now() >= next_check {
                next_check = SystemTime::now() + Duration::from_secs(1);
                for d in desktops {
                    let state = self.hv_of(d).map_err(|e| HypervisorError::Connection {
                        uri: String::new(),
                        op: "reach the host of",
                        message: crate::error::message(&e),
                    });
                    if let Some(event) = health::from_state(&state.and_then(|hv| hv.state(d))) {
                        let now = SystemTime::now();
                        wave.observe(d, event, now, now);
                    }
                }
            }
        }
    }

    /// After a healthy soak: ping the guest agents the wave still waits for, once a second,
    /// until they answer or their grace is over. Returns the wave's final verdict.
    fn await_agents(&self, wave: &mut health::Wave) -> health::WaveVerdict {
        loop {
            let health::WaveVerdict::AwaitingAgents(waiting) = wave.verdict_at(SystemTime::now()) else {
                return wave.verdict_at(SystemTime::now());
            };
            for d in waiting {
                let ping = self.hv_of(&d).map_err(|e| crate::error::message(&e));
                let event = match ping.and_then(|hv| hv.agent_ping(&d, AGENT_PING_TIMEOUT).map_err(|e| e.to_string())) {
                    Ok(()) => health::Event::AgentReplied,
                    Err(e) => health::Event::AgentFailed(e),
                };
                let now = SystemTime::now();
                wave.observe(&d, event, now, now);
            }
            if matches!(wave.verdict_at(SystemTime::now()), health::WaveVerdict::AwaitingAgents(_)) {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Stop at once: every desktop this rollout moved goes back to where it was, boots,
    /// and the version is marked failed.
    fn fail(&mut self, r: &Rollout, k: u32, failed: &[(String, String, SystemTime, SystemTime)]) -> Result<()> {
        let detected = failed.iter().map(|f| f.3).min().unwrap_or_else(SystemTime::now);
        // When libvirt reported the crash (its event), not when the guest panicked: the
        // panic itself is only visible inside the guest (scripts/bench measures it there).
        let crash_event_at = failed.iter().map(|f| f.2).min().unwrap_or(detected);
        let actor = self.actor.0.clone();
        let moved = self.catalog.write(|tx| -> Result<Vec<RolloutDesktop>> {
            tx.set_rollout_state(r.id, RolloutState::Failed)?;
            let image = tx.image(&r.image)?;
            tx.set_version_status(&image, r.version, "failed")?;
            for (d, how, at, _) in failed {
                tx.set_rollout_desktop(r.id, d, DesktopState::Failed, &format!("{how} at {}", ms(*at)))?;
            }
            tx.update_rollout_outcome(r.id, |o| {
                o.failed_wave = Some(k + 1);
                o.crash_event_at = Some(ms(crash_event_at));
                o.detected_at = Some(ms(detected));
                o.failures = failed
                    .iter()
                    .map(|(d, how, at, seen)| Failure {
                        desktop: d.clone(),
                        how: how.clone(),
                        at: ms(*at),
                        detected_at: ms(*seen),
                    })
                    .collect();
            })?;
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.failed",
                image: Some(&r.image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "wave": k + 1, "failures": failed.iter().map(|f| json!({"desktop": f.0, "how": f.1})).collect::<Vec<_>>()}),
                ..Default::default()
            })?;
            Ok(tx.rollout_desktops(r.id)?)
        })?;
        self.revert(r, &moved)?;
        let restored = SystemTime::now();
        let rep = self.catalog.write(|tx| -> Result<RolloutReport> {
            let millis = |later: SystemTime, earlier| later.duration_since(earlier).map_or(0, |d| d.as_millis() as u64);
            tx.update_rollout_outcome(r.id, |o| {
                o.restored_at = Some(ms(restored));
                o.event_to_verdict_ms = Some(millis(detected, crash_event_at));
                o.restore_ms = Some(millis(restored, detected));
            })?;
            tx.let_go_rollout(r.id, leader::me())?;
            Ok(report(tx, r.id)?)
        })?;
        let summary = failed.iter().map(|(d, how, _, _)| format!("{d} {how}")).collect::<Vec<_>>().join("; ");
        Err(RolloutError::Failed {
            image: r.image.clone(),
            version: r.version,
            channel: r.channel,
            summary,
            report: Box::new(rep),
        })
    }

    /// Move every desktop a rollout touched back to the version it had, and boot it.
    fn revert(&mut self, r: &Rollout, moved: &[RolloutDesktop]) -> Result<()> {
        let mut by_pool: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        for d in moved.iter().filter(|d| !matches!(d.state, DesktopState::Reverted | DesktopState::Skipped)) {
            by_pool.entry((d.pool.clone(), d.from_version)).or_default().push(d.desktop.clone());
        }
        let moves: Vec<DesktopMove> = by_pool
            .iter()
            .map(|((pool, from), ds)| DesktopMove { pool: pool.clone(), desktops: ds.clone(), to: *from })
            .collect();
        let actor = self.actor.clone();
        let why = format!("revert of rollout {}", r.id);
        // Every desktop back at once, whatever its pool; one that fails keeps its move back
        // pending in the catalog, done by the next command on its pool.
        let moved = self.pools()?.move_desktops(&moves, true, &actor, &why, rules::Claim::Revert)?;
        let at_logoff = moved.at_logoff;
        let failed = moved.failed;
        self.catalog.write(|tx| -> Result<()> {
            for ds in by_pool.values() {
                for d in ds {
                    let prior = tx
                        .rollout_desktops(r.id)?
                        .into_iter()
                        .find(|x| &x.desktop == d)
                        .map(|x| x.detail)
                        .unwrap_or_default();
                    let not_yet = failed.iter().find(|f| &f.desktop == d);
                    let how = match not_yet {
                        Some(f) => format!("move back pending (the next command on its pool does it): {}", f.error),
                        None if at_logoff.contains(d) => "in use, moves back at logoff".to_string(),
                        None => "moved back".to_string(),
                    };
                    let detail = if prior.is_empty() { how } else { format!("{FAILED_PREFIX}: {prior}; {how}") };
                    tx.set_rollout_desktop(r.id, d, DesktopState::Reverted, &detail)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    fn succeed(&mut self, r: &Rollout) -> Result<()> {
        let pools: Vec<String> = self.catalog.read(|tx| -> Result<Vec<String>> {
            Ok(tx
                .pools_of_image(r.image_id)?
                .into_iter()
                .filter(|p| p.channel == r.channel && p.pinned.is_none())
                .map(|p| p.name)
                .collect())
        })?;
        let mut later = BTreeMap::new();
        for p in &pools {
            let actor = self.actor.clone();
            let l = self.pools()?.settle(p, r.version, &actor, &format!("rollout {}", r.id))?;
            if !l.is_empty() {
                later.insert(p.clone(), l);
            }
        }
        let actor = self.actor.0.clone();
        self.catalog.write(|tx| -> Result<()> {
            let image = tx.image(&r.image)?;
            tx.set_channel(&image, r.channel, r.version)?;
            tx.set_rollout_state(r.id, RolloutState::Succeeded)?;
            tx.update_rollout_outcome(r.id, |o| {
                o.finished_at = Some(ms(SystemTime::now()));
                o.at_logoff = Some(later.clone());
            })?;
            tx.audit(Audit {
                actor: &actor,
                action: "rollout.succeeded",
                image: Some(&r.image),
                version: Some(r.version),
                detail: json!({"rollout": r.id, "channel": r.channel, "pools": pools, "at_logoff": later}),
                ..Default::default()
            })?;
            Ok(())
        })?;
        Ok(())
    }

    /// Emergency: the channel and all its pools back at once, no waves. An open rollout
    /// of the image is stopped and everything it moved goes back.
    pub fn rollback_channel(
        &mut self,
        image: &str,
        channel: Channel,
        to: Option<u32>,
        force: bool,
    ) -> Result<ChannelRollback> {
        names::validate("image", image)?;
        // Stop a rollout in flight first; its own process notices within a second.
        let open = self.catalog.write(|tx| -> Result<Option<Rollout>> {
            let img = tx.image(image)?;
            let open = tx.open_rollout(img.id)?.filter(|r| r.channel == channel);
            if let Some(r) = &open {
                tx.set_rollout_state(r.id, RolloutState::Reverted)?;
            }
            Ok(open)
        })?;
        let mut moved_back = vec![];
        if let Some(r) = &open {
            let ds = self.catalog.read(|tx| tx.rollout_desktops(r.id))?;
            self.revert(r, &ds)?;
            moved_back = ds.into_iter().map(|d| d.desktop).collect();
        }
        let (target, pools) = self.point_channel_back(image, channel, to, open.as_ref().map(|r| r.id), force)?;
        let results = self.update_pools(pools, force)?;
        Ok(ChannelRollback {
            image: image.to_string(),
            channel,
            version: target,
            stopped_rollout: open.map(|r| r.id),
            reverted_desktops: moved_back,
            pools: results,
        })
    }

    /// The channel at `to`, or where it was before (the stopped rollout's start when one was
    /// stopped); returns that version and the pools following the channel.
    fn point_channel_back(
        &mut self,
        image: &str,
        channel: Channel,
        to: Option<u32>,
        stopped: Option<i64>,
        force: bool,
    ) -> Result<(u32, Vec<String>)> {
        let actor = self.actor.0.clone();
        self.catalog.write(|tx| -> Result<(u32, Vec<String>)> {
            let img = tx.image(image)?;
            let current = tx.channel(&img, channel)?;
            let target = match (to, stopped) {
                (Some(n), _) => {
                    tx.version(&img, n)?;
                    n
                }
                (None, Some(_)) => current,
                (None, None) => tx
                    .channel_previous(img.id, channel)?
                    .ok_or(RolloutError::NoPrevious { image: image.into(), channel })?,
            };
            if target != current {
                tx.set_channel(&img, channel, target)?;
            }
            let pools = tx
                .pools_of_image(img.id)?
                .into_iter()
                .filter(|p| p.channel == channel && p.pinned.is_none())
                .map(|p| p.name)
                .collect();
            tx.audit(Audit {
                actor: &actor,
                action: "channel.rollback",
                image: Some(image),
                version: Some(target),
                detail: json!({"channel": channel, "from": current, "to": target, "stopped_rollout": stopped, "force": force}),
                ..Default::default()
            })?;
            Ok((target, pools))
        })
    }

    /// Every pool onto its channel's version now, all pools' desktops at once; a pool that
    /// fails says why and the rest go on.
    fn update_pools(&mut self, pools: Vec<String>, force: bool) -> Result<BTreeMap<String, PoolRollback>> {
        let actor = self.actor.clone();
        let reports = self.pools()?.update_pools(&pools, force, &actor)?;
        Ok(reports
            .into_iter()
            .map(|(p, r)| {
                let r = match r {
                    Ok(m) => {
                        PoolRollback::Moved { at_logoff: m.plan.at_logoff, moved_now: m.plan.now, failed: m.failed }
                    }
                    Err(PoolError::Denied(rules::Denied::AlreadyThere { .. })) => {
                        PoolRollback::Moved { at_logoff: vec![], moved_now: vec![], failed: vec![] }
                    }
                    Err(e) => PoolRollback::Error { error: crate::error::message(&e) },
                };
                (p, r)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
