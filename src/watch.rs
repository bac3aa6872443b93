//! The fleet watch: every desktop on every host followed after its rollout, its crashes
//! recorded against its pool, version and host, and a version that crashes too many desktops
//! stopped by the circuit breaker.
//!
//! ```text
//!  libvirt events (local + every host), state sweep every 5 s
//!     │  tracker (pure): a crash once per boot, reboots → one reboot loop, a stop still off 5 s later
//!     ▼
//!  watch_events (catalog: desktop, pool, image, version, channel, host) ──► metrics
//!     │  breaker (pure): distinct desktops of one version within the channel's window
//!     ▼ trips
//!  incident opened (audit, webhook) ─ action rollback ─► rollouts of the version halted,
//!     │                                                   channel rolled back (emergency path),
//!     │                                                   version failed, pinned pools listed
//!     ▼ no desktop of the channel's unpinned pools on the version any more
//!  incident resolved (audit, webhook)
//! ```
//! `vdim serve` calls [`Watch::round`] in a loop; a round waits for events up to a given time,
//! so the loop decides how often, and whether (one broker watches), the fleet is watched.

pub mod breaker;
pub mod tracker;
pub mod webhook;

use crate::catalog::incidents::{Action, EventKind, Incident, IncidentOutcome, NewIncident, Place, Policy, WatchEvent};
use crate::catalog::{Audit, CatalogError, Channel};
use crate::context::{Context, ContextError};
use crate::health;
use crate::hypervisor::{DomainState, Subscription};
use crate::pool::sites::Sites;
use crate::rollout::{PoolRollback, RolloutError};
use crate::store::Actor;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;
use tracker::{Signal, Tracker};

#[derive(Debug, Error)]
pub enum WatchError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    #[error("the watch policy of {channel} {why}")]
    BadPolicy { channel: Channel, why: &'static str },
}

impl crate::error::Kind for WatchError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            WatchError::Catalog(e) => e.kind(),
            WatchError::Context(e) => e.kind(),
            WatchError::Rollout(e) => e.kind(),
            WatchError::Pool(e) => e.kind(),
            WatchError::Hypervisor(e) => e.kind(),
            WatchError::BadPolicy { .. } => crate::error::ErrorKind::Invalid,
        }
    }
}

pub type Result<T> = std::result::Result<T, WatchError>;

/// How often the watch reads every desktop's state, in case an event was lost.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often the watch pings the guest agents of running desktops whose profile has one.
const AGENT_INTERVAL: Duration = Duration::from_secs(15);
/// Seconds one guest-agent ping may take.
const AGENT_PING_TIMEOUT: i32 = 2;
/// How often a watch whose event stream closed subscribes again.
const RESUBSCRIBE_INTERVAL: Duration = Duration::from_secs(10);
/// Who the audit log says acted.
pub const ACTOR: &str = "watch";

/// An incident opened or resolved: what the webhook posts.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    /// `incident.opened` or `incident.resolved`.
    pub event: &'static str,
    pub incident: Incident,
}

/// Hears of every incident opened or resolved; must not block.
pub type Notify = Box<dyn Fn(&Notice) + Send>;

/// What one round did.
#[derive(Debug, Default)]
pub struct Round {
    pub recorded: Vec<WatchEvent>,
    pub opened: Vec<Incident>,
    pub resolved: Vec<Incident>,
}

pub fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A change to a channel's policy: what `vdim watch policy CHANNEL` was given, and the body of
/// `PUT /api/v1/admin/watch/policies/{channel}` (`within` as "15m").
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    #[serde(default)]
    pub crashes: Option<u32>,
    #[serde(default)]
    pub share: Option<u32>,
    #[serde(default, deserialize_with = "within_de")]
    pub within: Option<Duration>,
    #[serde(default)]
    pub action: Option<Action>,
}

fn within_de<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    s.map(|s| humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("within: {e}")))).transpose()
}

/// Sets a channel's breaker policy (what is not given stays as it was, or its default);
/// refused, with nothing changed, when one desktop could trip it alone or the window is empty.
pub fn set_policy(
    catalog: &mut crate::catalog::Catalog,
    channel: Channel,
    c: &PolicyChange,
    actor: &Actor,
) -> Result<Policy> {
    let bad = |why| WatchError::BadPolicy { channel, why };
    if c.crashes.is_some_and(|n| n < 2) {
        return Err(bad("needs --crashes 2 or more: one desktop (its reboot loop, a crash seen twice) never trips the breaker alone"));
    }
    if c.share.is_some_and(|p| p == 0 || p > 100) {
        return Err(bad("needs --share between 1 and 100 (percent of the version's desktops)"));
    }
    if c.within.is_some_and(|d| d.is_zero()) {
        return Err(bad("needs --within longer than zero"));
    }
    catalog.write(|tx| -> Result<Policy> {
        let old = tx.watch_policy(channel)?;
        let p = Policy {
            channel,
            crashes: c.crashes.unwrap_or(old.crashes),
            share: c.share.or(old.share),
            within: c.within.unwrap_or(old.within),
            action: c.action.unwrap_or(old.action),
            set: true,
        };
        tx.set_watch_policy(&p)?;
        tx.audit(Audit {
            actor: &actor.0,
            action: "watch.policy",
            detail: json!({"channel": channel, "crashes": p.crashes, "share": p.share, "within_ms": p.within.as_millis() as u64, "action": p.action}),
            ..Default::default()
        })?;
        Ok(p)
    })
}

/// The watch's state between rounds: its event subscription and what it saw of each desktop.
pub struct Watch {
    sub: Option<Subscription>,
    last_subscribe: Option<Instant>,
    next_sweep: Instant,
    next_agents: Instant,
    tracker: Tracker,
    seeded: bool,
    notify: Notify,
}

impl Watch {
    /// `notify` hears of every incident opened or resolved; it must not block.
    pub fn new(notify: Notify) -> Watch {
        Watch {
            sub: None,
            last_subscribe: None,
            next_sweep: Instant::now(),
            next_agents: Instant::now(),
            tracker: Tracker::new(),
            seeded: false,
            notify,
        }
    }

    /// Waits up to `wait` for events, records what they say, runs the breaker on every
    /// version that crashed, and resolves incidents whose fleet is restored.
    pub fn round(&mut self, ctx: &mut Context, wait: Duration) -> Result<Round> {
        if !self.seeded {
            self.seed(ctx)?;
        }
        self.subscribe(ctx);
        let mut seen: Vec<(String, health::Event, SystemTime)> = self.drain(wait);
        // Desktops seen booting (or running, by the sweep): not crashed any more.
        let mut started: Vec<String> =
            seen.iter().filter(|(_, e, _)| *e == health::Event::Started).map(|(d, _, _)| d.clone()).collect();
        if Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + SWEEP_INTERVAL;
            let (found, running) = sweep(ctx)?;
            seen.extend(found);
            for d in &running {
                self.tracker.running(d);
            }
            started.extend(running);
        }
        let mut signals: Vec<Signal> =
            seen.into_iter().filter_map(|(d, e, at)| self.tracker.observe(&d, e, at)).collect();
        signals.extend(self.stops_still_off(ctx)?);
        if Instant::now() >= self.next_agents {
            self.next_agents = Instant::now() + AGENT_INTERVAL;
            for (d, answer) in agent_pings(ctx)? {
                signals.extend(self.tracker.agent(&d, answer, SystemTime::now()));
            }
        }
        let mut round = Round::default();
        let now = SystemTime::now();
        round.recorded = ctx.catalog().write(|tx| -> Result<Vec<WatchEvent>> {
            let mut out = vec![];
            for d in &started {
                tx.set_started(d)?;
            }
            for s in &signals {
                let Some(place) = tx.desktop_place(&s.desktop)? else { continue };
                if s.kind == EventKind::Crash {
                    tx.set_crashed(&s.desktop, ms(s.at))?;
                }
                if let Some(id) = tx.record_watch_event(&place, s.kind, &s.detail, ms(s.at), ms(now))? {
                    out.push(event(id, &place, s, ms(now)));
                }
            }
            Ok(out)
        })?;
        for e in &round.recorded {
            tracing::warn!(desktop = %e.desktop, pool = %e.pool, version = e.version, host = %e.host, kind = %e.kind, detail = %e.detail, "watch");
        }
        let crashed: BTreeSet<(String, u32, Channel)> = round
            .recorded
            .iter()
            .filter(|e| e.kind.is_crash())
            .map(|e| (e.image.clone(), e.version, e.channel))
            .collect();
        for (image, version, channel) in crashed {
            if let Some(i) = self.judge(ctx, &image, version, channel)? {
                round.opened.push(i);
            }
        }
        round.resolved = self.resolve(ctx)?;
        Ok(round)
    }

    /// A watch starting afresh knows the desktops crashed now, so none is counted again.
    fn seed(&mut self, ctx: &mut Context) -> Result<()> {
        for d in ctx.catalog().read(|tx| tx.crashed_desktops())? {
            self.tracker.already_crashed(&d);
        }
        self.seeded = true;
        Ok(())
    }

    /// Lifecycle events of the local libvirt and every host that is not fenced, on one
    /// channel; subscribed again a while after the stream closed.
    fn subscribe(&mut self, ctx: &mut Context) {
        if self.sub.is_some() || self.last_subscribe.is_some_and(|t| t.elapsed() < RESUBSCRIBE_INTERVAL) {
            return;
        }
        self.last_subscribe = Some(Instant::now());
        let hosts = match ctx.catalog().read(|tx| tx.hosts()) {
            Ok(h) => h,
            Err(e) => return tracing::warn!(error = %crate::error::message(&e), "watch: cannot read the hosts"),
        };
        let Ok(hv) = ctx.hypervisor() else { return };
        let ids: Vec<Option<i64>> =
            std::iter::once(None).chain(hosts.iter().filter(|h| h.state != "fenced").map(|h| Some(h.id))).collect();
        let sites = Sites::new(hv.as_ref(), ctx.links(), hosts);
        let mut subs = vec![];
        for id in ids {
            match sites
                .hv(id)
                .map_err(|e| crate::error::message(&e))
                .and_then(|h| h.subscribe("vdim-").map_err(|e| e.to_string()))
            {
                Ok(s) => subs.push(s),
                Err(e) => tracing::warn!(host = ?sites.host_name(id), error = %e, "watch: no events from this host"),
            }
        }
        if !subs.is_empty() {
            self.sub = Some(Subscription::merge(subs));
        }
    }

    /// Events until `wait` passes with none, in the rules' words.
    fn drain(&mut self, wait: Duration) -> Vec<(String, health::Event, SystemTime)> {
        let mut out = vec![];
        let Some(sub) = &self.sub else {
            std::thread::sleep(wait);
            return out;
        };
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Once something came, take what follows at once: a round acts on all of it.
            let timeout = if out.is_empty() { left } else { Duration::ZERO };
            match sub.events.recv_timeout(timeout) {
                Ok(ev) => {
                    if let Some(e) = health::from_lifecycle(&ev.kind, &ev.detail) {
                        out.push((ev.domain, e, ev.at));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return out,
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::warn!("watch: the libvirt event stream closed; sweeping states until it is back");
                    self.sub = None;
                    return out;
                }
            }
        }
    }

    /// Stops whose grace is over, for desktops still off in a running pool that no move of
    /// vdim's is about to start.
    fn stops_still_off(&mut self, ctx: &mut Context) -> Result<Vec<Signal>> {
        let due = self.tracker.due_stops(SystemTime::now());
        if due.is_empty() {
            return Ok(vec![]);
        }
        let mut out = vec![];
        for (desktop, why, at) in due {
            let place = ctx.catalog().read(|tx| tx.desktop_place(&desktop))?;
            let Some(place) = place.filter(|p| p.pool_running && !p.needs_reset) else { continue };
            if state_of(ctx, &place)?.is_some_and(|s| s == DomainState::ShutOff) {
                out.push(Signal { desktop, kind: EventKind::Stop, detail: why, at });
            }
        }
        Ok(out)
    }

    /// The breaker on one version's crashes; opens (and acts on) an incident when it trips.
    fn judge(&mut self, ctx: &mut Context, image: &str, version: u32, channel: Channel) -> Result<Option<Incident>> {
        let now = SystemTime::now();
        let (policy, crashes, on_version, known) = ctx.catalog().read(|tx| -> Result<_> {
            let policy = tx.watch_policy(channel)?;
            let since = ms(now) - policy.within.as_millis() as i64;
            let crashes: Vec<breaker::Crash> = tx
                .version_crashes(image, version, channel, since)?
                .into_iter()
                .map(|e| breaker::Crash { desktop: e.desktop, at_ms: e.at_ms })
                .collect();
            let on = tx.desktops_on_version(image, version, channel)?.len();
            Ok((policy, crashes, on, tx.incident_of(image, version, channel)?))
        })?;
        if known.is_some() {
            return Ok(None);
        }
        let breaker::Decision::Trip(trip) = breaker::decide(&policy, &crashes, on_version, ms(now)) else {
            return Ok(None);
        };
        let report =
            IncidentOutcome { crashed: trip.desktops.clone(), decision: trip.reason.clone(), ..Default::default() };
        let incident = ctx.catalog().write(|tx| -> Result<Incident> {
            let id = tx.insert_incident(&NewIncident {
                image,
                version,
                channel,
                action: policy.action,
                opened_ms: ms(SystemTime::now()),
                first_crash_ms: trip.first_ms,
                threshold_crash_ms: trip.threshold_ms,
                report: &report,
            })?;
            tx.audit(Audit {
                actor: ACTOR,
                action: "incident.opened",
                image: Some(image),
                version: Some(version),
                detail: json!({"incident": id, "channel": channel, "action": policy.action, "decision": trip.reason, "desktops": trip.desktops}),
                ..Default::default()
            })?;
            Ok(tx.incident(id)?.expect("just inserted"))
        })?;
        tracing::warn!(incident = incident.id, image, version, %channel, action = policy.action.as_str(), "{}", trip.reason);
        (self.notify)(&Notice { event: "incident.opened", incident: incident.clone() });
        if policy.action == Action::Rollback {
            roll_back(ctx, &incident)?;
        }
        Ok(Some(ctx.catalog().read(|tx| tx.incident(incident.id))?.unwrap_or(incident)))
    }

    /// Incidents whose channel has no desktop left on the version are resolved.
    fn resolve(&mut self, ctx: &mut Context) -> Result<Vec<Incident>> {
        let done = ctx.catalog().write(|tx| -> Result<Vec<Incident>> {
            let mut out = vec![];
            for i in tx.unresolved_incidents()? {
                if !tx.unpinned_desktops_left_on(&i.image, i.version, i.channel)?.is_empty() {
                    continue;
                }
                if tx.resolve_incident(i.id, ms(SystemTime::now()))? {
                    tx.audit(Audit {
                        actor: ACTOR,
                        action: "incident.resolved",
                        image: Some(&i.image),
                        version: Some(i.version),
                        detail: json!({"incident": i.id, "channel": i.channel}),
                        ..Default::default()
                    })?;
                    out.push(tx.incident(i.id)?.expect("it exists"));
                }
            }
            Ok(out)
        })?;
        for i in &done {
            (self.notify)(&Notice { event: "incident.resolved", incident: i.clone() });
        }
        Ok(done)
    }
}

fn event(id: i64, p: &Place, s: &Signal, seen_ms: i64) -> WatchEvent {
    WatchEvent {
        id,
        desktop: p.desktop.clone(),
        pool: p.pool.clone(),
        image: p.image.clone(),
        version: p.version,
        channel: p.channel,
        host: p.host.clone(),
        kind: s.kind,
        detail: s.detail.clone(),
        at_ms: ms(s.at),
        seen_ms,
    }
}

/// The domain state of a desktop where it runs; `None` when its host cannot be asked.
fn state_of(ctx: &mut Context, place: &Place) -> Result<Option<DomainState>> {
    let (host_id, hosts) = ctx
        .catalog()
        .read(|tx| -> Result<_> { Ok((tx.desktop(&place.desktop)?.and_then(|d| d.host_id), tx.hosts()?)) })?;
    let hv = ctx.hypervisor()?;
    let sites = Sites::new(hv.as_ref(), ctx.links(), hosts);
    Ok(sites.hv(host_id).ok().and_then(|h| h.state(&place.desktop).ok()).map(|s| s.0))
}

/// Every desktop of a running pool, its state read where it runs: what the rules make of it,
/// and the desktops running.
#[allow(clippy::type_complexity)]
fn sweep(ctx: &mut Context) -> Result<(Vec<(String, health::Event, SystemTime)>, Vec<String>)> {
    let (desktops, hosts) = ctx.catalog().read(|tx| -> Result<_> {
        let mut out = vec![];
        for p in tx.pools()?.into_iter().filter(|p| p.running) {
            out.extend(tx.desktops(p.id)?.into_iter().filter(|d| !d.needs_reset).map(|d| (d.name, d.host_id)));
        }
        Ok((out, tx.hosts()?))
    })?;
    let hv = ctx.hypervisor()?;
    let sites = Sites::new(hv.as_ref(), ctx.links(), hosts);
    let (mut out, mut running) = (vec![], vec![]);
    for (d, host) in desktops {
        // A host that cannot be asked is the host watch's business, not a desktop's crash.
        let Ok(h) = sites.hv(host) else { continue };
        let state = h.state(&d);
        if matches!(
            state,
            Err(crate::hypervisor::HypervisorError::Connection { .. }
                | crate::hypervisor::HypervisorError::Connect { .. })
        ) {
            continue;
        }
        if matches!(state, Ok((DomainState::Running, _))) {
            running.push(d.clone());
        }
        if let Some(e) = health::from_state(&state) {
            out.push((d, e, SystemTime::now()));
        }
    }
    Ok((out, running))
}

/// A guest-agent ping of every running desktop whose profile has the agent channel, all at
/// once (at most the hypervisor's `parallel` at a time).
fn agent_pings(ctx: &mut Context) -> Result<Vec<(String, std::result::Result<(), String>)>> {
    let profiles = ctx.settings().profiles.clone();
    let (desktops, hosts) = ctx.catalog().read(|tx| -> Result<_> {
        let mut out = vec![];
        for p in tx.pools()?.into_iter().filter(|p| p.running) {
            let agent = crate::profile::Profile::load(&profiles, &p.profile).is_ok_and(|pr| pr.has_guest_agent());
            if agent {
                out.extend(tx.desktops(p.id)?.into_iter().filter(|d| !d.needs_reset).map(|d| (d.name, d.host_id)));
            }
        }
        Ok((out, tx.hosts()?))
    })?;
    if desktops.is_empty() {
        return Ok(vec![]);
    }
    let hv = ctx.hypervisor()?;
    let sites = Sites::new(hv.as_ref(), ctx.links(), hosts);
    let mut out = vec![];
    for chunk in desktops.chunks(hv.parallel().max(1)) {
        std::thread::scope(|s| {
            let pings: Vec<_> = chunk
                .iter()
                .map(|(d, host)| {
                    let sites = &sites;
                    s.spawn(move || {
                        let h = sites.hv(*host).ok()?;
                        // Only a running guest has an agent to ask.
                        matches!(h.state(d), Ok((DomainState::Running, _)))
                            .then(|| (d.clone(), h.agent_ping(d, AGENT_PING_TIMEOUT).map_err(|e| e.to_string())))
                    })
                })
                .collect();
            out.extend(pings.into_iter().filter_map(|p| p.join().ok().flatten()));
        });
    }
    Ok(out)
}

/// What the on-call admin would do: halt every rollout of the version, roll the channel back
/// (the emergency path), mark the version failed, list the pools pinned to it.
fn roll_back(ctx: &mut Context, incident: &Incident) -> Result<()> {
    let (image, version, channel) = (incident.image.as_str(), incident.version, incident.channel);
    let (halted, pinned, points_here) = ctx.catalog().write(|tx| -> Result<_> {
        let img = tx.image(image)?;
        let mut halted = vec![];
        if let Some(r) = tx.open_rollout(img.id)?.filter(|r| r.version == version && r.channel != channel) {
            if tx.set_rollout_state(r.id, crate::catalog::rollouts::RolloutState::Halted)? {
                halted.push(r.id);
            }
        }
        let open_here = tx.open_rollout(img.id)?.is_some_and(|r| r.version == version && r.channel == channel);
        let points_here = open_here || tx.channel(&img, channel)? == version;
        tx.set_version_status(&img, version, "failed")?;
        tx.audit(Audit {
            actor: ACTOR,
            action: "version.failed",
            image: Some(image),
            version: Some(version),
            detail: json!({"incident": incident.id, "halted_rollouts": halted}),
            ..Default::default()
        })?;
        Ok((halted, tx.pools_pinned_to(image, version)?, points_here))
    })?;
    let (mut to, mut restored, mut at_logoff, mut errors) = (None, vec![], vec![], vec![]);
    if points_here {
        match ctx.engine(Actor(ACTOR.into()))?.rollback_channel(image, channel, None, false) {
            Ok(r) => {
                let now = ms(SystemTime::now());
                to = Some(r.version);
                restored = r.reverted_desktops.iter().map(|d| (d.clone(), now)).collect();
                for p in r.pools.values() {
                    match p {
                        PoolRollback::Moved { at_logoff: later, moved_now, failed } => {
                            restored.extend(moved_now.iter().map(|d| (d.clone(), now)));
                            at_logoff.extend(later.iter().cloned());
                            errors.extend(failed.iter().map(|f| format!("{}: {}", f.desktop, f.error)));
                        }
                        PoolRollback::Error { error } => errors.push(error.clone()),
                    }
                }
            }
            Err(e) => errors.push(crate::error::message(&e)),
        }
    }
    let restored_ms = ms(SystemTime::now());
    ctx.catalog().write(|tx| -> Result<()> {
        tx.update_incident_report(incident.id, |o| {
            o.rolled_back_to = to;
            o.halted_rollouts = halted.clone();
            o.pinned_pools = pinned.clone();
            o.restored = restored.clone();
            o.at_logoff = at_logoff.clone();
            o.errors = errors.clone();
        })?;
        if errors.is_empty() {
            tx.set_incident_restored(incident.id, restored_ms)?;
        }
        Ok(())
    })?;
    for e in &errors {
        tracing::warn!(incident = incident.id, error = %e, "the breaker's rollback did not finish");
    }
    Ok(())
}
