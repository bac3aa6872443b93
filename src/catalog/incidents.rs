//! Catalog queries for the fleet watch: what it saw of each desktop, each channel's breaker
//! policy, and the incidents the breaker opened.
//!
//! An incident's life:
//!
//! ```text
//!   open ──── incident ack ───► acknowledged
//!     │                              │
//!     └── no desktop of the channel's unpinned pools runs the version any more ──► resolved
//! ```
//!
//! Times the watch compares are INTEGER milliseconds since the epoch, computed in Rust.

use super::sql::{self, params, OptionalExtension};
use super::{Channel, Result, Tx};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the watch saw happen to a desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The guest panicked or its QEMU process died.
    Crash,
    /// Rebooted again and again within a short time.
    RebootLoop,
    /// Went off while its pool runs, and nobody turned it back on: recorded, never a crash.
    Stop,
    /// Its profile has a guest agent and the agent stopped answering.
    AgentSilent,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [EventKind::Crash, EventKind::RebootLoop, EventKind::Stop, EventKind::AgentSilent];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Crash => "crash",
            EventKind::RebootLoop => "reboot_loop",
            EventKind::Stop => "stop",
            EventKind::AgentSilent => "agent_silent",
        }
    }

    fn parse(s: &str) -> EventKind {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s).unwrap_or(EventKind::Stop)
    }

    /// Whether the breaker counts it: crashes and reboot loops, never a stop or an agent.
    pub fn is_crash(self) -> bool {
        matches!(self, EventKind::Crash | EventKind::RebootLoop)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing the watch recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchEvent {
    pub id: i64,
    pub desktop: String,
    pub pool: String,
    pub image: String,
    pub version: u32,
    pub channel: Channel,
    /// The host's name, `local` for the libvirt of `--connect`.
    pub host: String,
    pub kind: EventKind,
    pub detail: String,
    /// When it happened (libvirt's event time).
    pub at_ms: i64,
    /// When the watch saw it.
    pub seen_ms: i64,
}

/// Where a desktop is, as the watch records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub desktop: String,
    pub pool: String,
    pub image: String,
    pub version: u32,
    pub channel: Channel,
    pub host: String,
    pub pool_running: bool,
    pub needs_reset: bool,
}

/// What the breaker does when it trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Halt the version's rollouts, roll the channel back, mark the version failed.
    Rollback,
    /// Open the incident only.
    Alert,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Rollback => "rollback",
            Action::Alert => "alert",
        }
    }
    fn parse(s: &str) -> Action {
        if s == "rollback" {
            Action::Rollback
        } else {
            Action::Alert
        }
    }
}

/// A channel's breaker policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub channel: Channel,
    /// Distinct desktops of one version that crashed within `within`.
    pub crashes: u32,
    /// Or this share (percent) of the version's desktops, when less (never under 2 desktops).
    pub share: Option<u32>,
    #[serde(serialize_with = "as_humantime")]
    pub within: Duration,
    pub action: Action,
    /// False while the channel has no policy of its own (the defaults apply).
    pub set: bool,
}

fn as_humantime<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Policy {
    /// Crashes of distinct desktops within a window unless set otherwise.
    pub const DEFAULT_CRASHES: u32 = 2;
    pub const DEFAULT_WITHIN: Duration = Duration::from_secs(15 * 60);

    /// The default: two desktops within 15 minutes; roll back in prod, alert elsewhere.
    pub fn default_for(channel: Channel) -> Policy {
        let action = if channel == Channel::Prod { Action::Rollback } else { Action::Alert };
        Policy {
            channel,
            crashes: Self::DEFAULT_CRASHES,
            share: None,
            within: Self::DEFAULT_WITHIN,
            action,
            set: false,
        }
    }
}

/// Where an incident is; see the module diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentState {
    Open,
    Acknowledged,
    Resolved,
}

impl IncidentState {
    pub const ALL: [IncidentState; 3] = [IncidentState::Open, IncidentState::Acknowledged, IncidentState::Resolved];
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Acknowledged => "acknowledged",
            IncidentState::Resolved => "resolved",
        }
    }
    fn parse(s: &str) -> IncidentState {
        IncidentState::ALL.into_iter().find(|k| k.as_str() == s).unwrap_or(IncidentState::Open)
    }
}

impl std::fmt::Display for IncidentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the breaker did, filled in as it happens; stored as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IncidentOutcome {
    /// The desktops whose crashes tripped the breaker.
    #[serde(default)]
    pub crashed: Vec<String>,
    /// The breaker's reason, e.g. "2 desktops crashed within 15m (policy: 2)".
    #[serde(default)]
    pub decision: String,
    /// The version the channel went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<u32>,
    /// Rollouts of the version it stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub halted_rollouts: Vec<i64>,
    /// Pools pinned to the version: left alone, listed for the admin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned_pools: Vec<String>,
    /// Desktops back on the previous version, with when (ms since the epoch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<(String, i64)>,
    /// Desktops in use that move back at logoff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_logoff: Vec<String>,
    /// What could not be done, said as it was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub id: i64,
    pub image: String,
    pub version: u32,
    pub channel: Channel,
    pub action: Action,
    pub state: IncidentState,
    pub opened_ms: i64,
    pub first_crash_ms: i64,
    pub threshold_crash_ms: i64,
    pub restored_ms: Option<i64>,
    pub resolved_ms: Option<i64>,
    pub note: Option<String>,
    pub acked_by: Option<String>,
    pub acked_ms: Option<i64>,
    pub report: IncidentOutcome,
}

pub struct NewIncident<'a> {
    pub image: &'a str,
    pub version: u32,
    pub channel: Channel,
    pub action: Action,
    pub opened_ms: i64,
    pub first_crash_ms: i64,
    pub threshold_crash_ms: i64,
    pub report: &'a IncidentOutcome,
}

/// Crashes recorded of one version in one pool on one host (a metric's labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashCount {
    pub image: String,
    pub version: u32,
    pub pool: String,
    pub host: String,
    pub crashes: u64,
}

/// A session on a desktop, for an incident's blast radius.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesktopSession {
    pub desktop: String,
    pub user: String,
    pub created: String,
    pub ended: Option<String>,
}

const EVENT_COLS: &str = "id, desktop, pool, image, version, channel, host, kind, detail, at_ms, seen_ms";

fn event_row(r: &sql::Row) -> sql::Result<WatchEvent> {
    let channel: String = r.get(5)?;
    let kind: String = r.get(7)?;
    Ok(WatchEvent {
        id: r.get(0)?,
        desktop: r.get(1)?,
        pool: r.get(2)?,
        image: r.get(3)?,
        version: r.get(4)?,
        channel: Channel::parse(&channel).unwrap_or(Channel::Prod),
        host: r.get(6)?,
        kind: EventKind::parse(&kind),
        detail: r.get(8)?,
        at_ms: r.get(9)?,
        seen_ms: r.get(10)?,
    })
}

const INCIDENT_COLS: &str = "id, image, version, channel, action, state, opened_ms, first_crash_ms, threshold_crash_ms,
     restored_ms, resolved_ms, note, acked_by, acked_ms, report";

fn incident_row(r: &sql::Row) -> sql::Result<Incident> {
    let (channel, action, state, report): (String, String, String, String) =
        (r.get(3)?, r.get(4)?, r.get(5)?, r.get(14)?);
    let report = serde_json::from_str(&report)
        .map_err(|e| sql::Error::Column { column: "report".into(), problem: e.to_string() })?;
    Ok(Incident {
        id: r.get(0)?,
        image: r.get(1)?,
        version: r.get(2)?,
        channel: Channel::parse(&channel).unwrap_or(Channel::Prod),
        action: Action::parse(&action),
        state: IncidentState::parse(&state),
        opened_ms: r.get(6)?,
        first_crash_ms: r.get(7)?,
        threshold_crash_ms: r.get(8)?,
        restored_ms: r.get(9)?,
        resolved_ms: r.get(10)?,
        note: r.get(11)?,
        acked_by: r.get(12)?,
        acked_ms: r.get(13)?,
        report,
    })
}

impl Tx<'_> {
    // ---- events ------------------------------------------------------------------------

    /// Where a desktop is now (pool, image, version, channel, host), if vdim knows it.
    pub fn desktop_place(&self, desktop: &str) -> Result<Option<Place>> {
        Ok(self
            .0
            .query_row(
                "SELECT d.name, p.name, i.name, d.version, p.channel, COALESCE(h.name, 'local'), p.running, d.needs_reset
                 FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = p.image_id
                 LEFT JOIN hosts h ON h.id = d.host_id WHERE d.name = ?1",
                [desktop],
                |r| {
                    let channel: String = r.get(4)?;
                    Ok(Place {
                        desktop: r.get(0)?,
                        pool: r.get(1)?,
                        image: r.get(2)?,
                        version: r.get(3)?,
                        channel: Channel::parse(&channel).unwrap_or(Channel::Prod),
                        host: r.get(5)?,
                        pool_running: r.get::<_, i64>(6)? == 1,
                        needs_reset: r.get::<_, i64>(7)? == 1,
                    })
                },
            )
            .optional()?)
    }

    /// Records what the watch saw; `None` when that very happening is recorded already.
    pub fn record_watch_event(
        &self,
        place: &Place,
        kind: EventKind,
        detail: &str,
        at_ms: i64,
        seen_ms: i64,
    ) -> Result<Option<i64>> {
        Ok(self
            .0
            .query_row(
                "INSERT INTO watch_events (desktop, pool, image, version, channel, host, kind, detail, at_ms, seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (desktop, kind, at_ms) DO NOTHING RETURNING id",
                params![
                    place.desktop,
                    place.pool,
                    place.image,
                    place.version,
                    place.channel.as_str(),
                    place.host,
                    kind.as_str(),
                    detail,
                    at_ms,
                    seen_ms
                ],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Recorded events, newest last; of one image (and version) when given.
    pub fn watch_events(&self, image: Option<&str>, version: Option<u32>, limit: usize) -> Result<Vec<WatchEvent>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {EVENT_COLS} FROM watch_events WHERE (?1 IS NULL OR image = ?1) AND (?2 IS NULL OR version = ?2)
             ORDER BY at_ms DESC, id DESC LIMIT ?3"
        ))?;
        let mut out: Vec<WatchEvent> =
            st.query_map(params![image, version, limit as i64], event_row)?.collect::<sql::Result<_>>()?;
        out.reverse();
        Ok(out)
    }

    /// Crashes and reboot loops of a version in a channel since `since_ms`, oldest first.
    pub fn version_crashes(
        &self,
        image: &str,
        version: u32,
        channel: Channel,
        since_ms: i64,
    ) -> Result<Vec<WatchEvent>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {EVENT_COLS} FROM watch_events
             WHERE image = ?1 AND version = ?2 AND channel = ?3 AND at_ms >= ?4 AND kind IN ('crash', 'reboot_loop')
             ORDER BY at_ms, id"
        ))?;
        let rows = st.query_map(params![image, version, channel.as_str(), since_ms], event_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Desktops of a channel's pools (not pinned elsewhere) on a version, by name.
    pub fn desktops_on_version(&self, image: &str, version: u32, channel: Channel) -> Result<Vec<String>> {
        let mut st = self.0.prepare(
            "SELECT d.name FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = p.image_id
             WHERE i.name = ?1 AND d.version = ?2 AND p.channel = ?3 ORDER BY d.name",
        )?;
        let rows = st.query_map(params![image, version, channel.as_str()], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Desktops of the channel's unpinned pools still on `version` or due to go to it at logoff.
    pub fn unpinned_desktops_left_on(&self, image: &str, version: u32, channel: Channel) -> Result<Vec<String>> {
        let mut st = self.0.prepare(
            "SELECT d.name FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = p.image_id
             WHERE i.name = ?1 AND p.channel = ?3 AND p.pinned IS NULL
               AND (d.version = ?2 OR d.target = ?2) ORDER BY d.name",
        )?;
        let rows = st.query_map(params![image, version, channel.as_str()], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Pools of the image pinned to `version`.
    pub fn pools_pinned_to(&self, image: &str, version: u32) -> Result<Vec<String>> {
        let mut st = self.0.prepare(
            "SELECT p.name FROM pools p JOIN images i ON i.id = p.image_id WHERE i.name = ?1 AND p.pinned = ?2
             ORDER BY p.name",
        )?;
        let rows = st.query_map(params![image, version], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Sessions ever opened on these desktops (an incident's blast radius).
    pub fn sessions_on_desktops(&self, desktops: &[String]) -> Result<Vec<DesktopSession>> {
        let mut st = self.0.prepare(
            "SELECT s.desktop, u.name, s.created, s.ended FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.desktop = ?1 ORDER BY s.created",
        )?;
        let mut out = vec![];
        for d in desktops {
            let rows = st.query_map([d], |r| {
                Ok(DesktopSession { desktop: r.get(0)?, user: r.get(1)?, created: r.get(2)?, ended: r.get(3)? })
            })?;
            out.extend(rows.collect::<sql::Result<Vec<_>>>()?);
        }
        Ok(out)
    }

    // ---- policies ----------------------------------------------------------------------

    /// The channel's policy, or the default for it.
    pub fn watch_policy(&self, channel: Channel) -> Result<Policy> {
        let row = self
            .0
            .query_row(
                "SELECT crashes, share, within_ms, action FROM watch_policies WHERE channel = ?1",
                [channel.as_str()],
                |r| {
                    let action: String = r.get(3)?;
                    Ok(Policy {
                        channel,
                        crashes: r.get(0)?,
                        share: r.get(1)?,
                        within: Duration::from_millis(r.get::<_, i64>(2)? as u64),
                        action: Action::parse(&action),
                        set: true,
                    })
                },
            )
            .optional()?;
        Ok(row.unwrap_or_else(|| Policy::default_for(channel)))
    }

    pub fn set_watch_policy(&self, p: &Policy) -> Result<()> {
        self.0.execute(
            "INSERT INTO watch_policies (channel, crashes, share, within_ms, action, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (channel) DO UPDATE SET crashes = excluded.crashes, share = excluded.share,
                 within_ms = excluded.within_ms, action = excluded.action, updated = excluded.updated",
            params![
                p.channel.as_str(),
                p.crashes,
                p.share,
                p.within.as_millis() as i64,
                p.action.as_str(),
                super::now()
            ],
        )?;
        Ok(())
    }

    // ---- incidents ---------------------------------------------------------------------

    pub fn insert_incident(&self, n: &NewIncident) -> Result<i64> {
        let report = serde_json::to_string(n.report).expect("an outcome serialises");
        Ok(self.0.query_row(
            "INSERT INTO incidents (image, version, channel, action, state, opened_ms, first_crash_ms, threshold_crash_ms, report)
             VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7, ?8) RETURNING id",
            params![
                n.image,
                n.version,
                n.channel.as_str(),
                n.action.as_str(),
                n.opened_ms,
                n.first_crash_ms,
                n.threshold_crash_ms,
                report
            ],
            |r| r.get(0),
        )?)
    }

    pub fn incident(&self, id: i64) -> Result<Option<Incident>> {
        Ok(self
            .0
            .query_row(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE id = ?1"), [id], incident_row)
            .optional()?)
    }

    /// The incident of a version in a channel, whatever its state.
    pub fn incident_of(&self, image: &str, version: u32, channel: Channel) -> Result<Option<Incident>> {
        Ok(self
            .0
            .query_row(
                &format!("SELECT {INCIDENT_COLS} FROM incidents WHERE image = ?1 AND version = ?2 AND channel = ?3"),
                params![image, version, channel.as_str()],
                incident_row,
            )
            .optional()?)
    }

    /// Incidents, newest first.
    pub fn incidents(&self, limit: usize) -> Result<Vec<Incident>> {
        let mut st = self.0.prepare(&format!("SELECT {INCIDENT_COLS} FROM incidents ORDER BY id DESC LIMIT ?1"))?;
        let rows = st.query_map([limit as i64], incident_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Incidents not resolved yet.
    pub fn unresolved_incidents(&self) -> Result<Vec<Incident>> {
        let mut st =
            self.0.prepare(&format!("SELECT {INCIDENT_COLS} FROM incidents WHERE state <> 'resolved' ORDER BY id"))?;
        let rows = st.query_map((), incident_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Changes the incident's [`IncidentOutcome`] in this transaction.
    pub fn update_incident_report(&self, id: i64, change: impl FnOnce(&mut IncidentOutcome)) -> Result<()> {
        let Some(incident) = self.incident(id)? else { return Ok(()) };
        let mut report = incident.report;
        change(&mut report);
        let json = serde_json::to_string(&report).expect("an outcome serialises");
        self.0.execute("UPDATE incidents SET report = ?2 WHERE id = ?1", params![id, json])?;
        Ok(())
    }

    pub fn set_incident_restored(&self, id: i64, at_ms: i64) -> Result<()> {
        self.0.execute("UPDATE incidents SET restored_ms = ?2 WHERE id = ?1", params![id, at_ms])?;
        Ok(())
    }

    /// Resolves an unresolved incident; false when it was resolved already.
    pub fn resolve_incident(&self, id: i64, at_ms: i64) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE incidents SET state = 'resolved', resolved_ms = ?2 WHERE id = ?1 AND state <> 'resolved'",
            params![id, at_ms],
        )?;
        Ok(n == 1)
    }

    /// An admin's acknowledgement with a note; a resolved incident keeps its state.
    pub fn ack_incident(&self, id: i64, by: &str, note: &str, at_ms: i64) -> Result<()> {
        self.0.execute(
            "UPDATE incidents SET note = ?2, acked_by = ?3, acked_ms = ?4,
                 state = CASE WHEN state = 'open' THEN 'acknowledged' ELSE state END WHERE id = ?1",
            params![id, note, by, at_ms],
        )?;
        Ok(())
    }

    /// A desktop crashed (until it starts again: [`Tx::set_started`]).
    pub fn set_crashed(&self, desktop: &str, at_ms: i64) -> Result<()> {
        self.0.execute(
            "INSERT INTO crashed_desktops (desktop, at_ms) VALUES (?1, ?2) ON CONFLICT (desktop) DO NOTHING",
            params![desktop, at_ms],
        )?;
        Ok(())
    }

    /// Desktops crashed since they last started.
    pub fn crashed_desktops(&self) -> Result<Vec<String>> {
        let mut st = self.0.prepare("SELECT desktop FROM crashed_desktops ORDER BY desktop")?;
        let rows = st.query_map((), |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// A desktop started: it is not crashed any more.
    pub fn set_started(&self, desktop: &str) -> Result<()> {
        self.0.execute("DELETE FROM crashed_desktops WHERE desktop = ?1", [desktop])?;
        Ok(())
    }

    // ---- metrics -----------------------------------------------------------------------

    /// Crashes (and reboot loops) ever recorded, by image, version, pool and host; zero for
    /// every version, pool and host that has desktops now, so a counter exists before its
    /// first crash (Prometheus's increase() counts only what follows a series' first scrape).
    pub fn crash_counts(&self) -> Result<Vec<CrashCount>> {
        let mut st = self.0.prepare(
            "SELECT image, version, pool, host, SUM(n) FROM (
                 SELECT image, version, pool, host, 1 AS n FROM watch_events WHERE kind IN ('crash', 'reboot_loop')
                 UNION ALL
                 SELECT i.name, d.version, p.name, COALESCE(h.name, 'local'), 0
                 FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = p.image_id
                 LEFT JOIN hosts h ON h.id = d.host_id
             ) AS c GROUP BY image, version, pool, host ORDER BY image, version, pool, host",
        )?;
        let rows = st.query_map((), |r| {
            Ok(CrashCount {
                image: r.get(0)?,
                version: r.get(1)?,
                pool: r.get(2)?,
                host: r.get(3)?,
                crashes: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Desktops by image, version and state (crashed, in_use, resetting, idle).
    pub fn desktops_by_version(&self) -> Result<Vec<(String, u32, String, u64)>> {
        let mut st = self.0.prepare(
            "SELECT name, version, state, COUNT(*) FROM (
                 SELECT i.name AS name, d.version AS version,
                        CASE WHEN c.desktop IS NOT NULL THEN 'crashed'
                             WHEN d.assigned_to IS NOT NULL THEN 'in_use'
                             WHEN d.needs_reset = 1 THEN 'resetting' ELSE 'idle' END AS state
                 FROM desktops d JOIN pools p ON p.id = d.pool_id JOIN images i ON i.id = p.image_id
                 LEFT JOIN crashed_desktops c ON c.desktop = d.name
             ) AS s GROUP BY name, version, state ORDER BY name, version, state",
        )?;
        let rows = st.query_map((), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Incidents by state, every state named (zero included).
    pub fn incident_state_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut out = vec![];
        for s in IncidentState::ALL {
            let n: i64 =
                self.0.query_row("SELECT COUNT(*) FROM incidents WHERE state = ?1", [s.as_str()], |r| r.get(0))?;
            out.push((s.as_str().to_string(), n as u64));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cats;
    use super::super::CatalogError;
    use super::*;

    fn place(desktop: &str) -> Place {
        Place {
            desktop: desktop.into(),
            pool: "p".into(),
            image: "img".into(),
            version: 2,
            channel: Channel::Prod,
            host: "local".into(),
            pool_running: true,
            needs_reset: false,
        }
    }

    #[test]
    fn the_same_happening_is_recorded_once() {
        for (_d, mut c) in cats() {
            c.write(|tx| {
                assert!(tx.record_watch_event(&place("a"), EventKind::Crash, "panicked", 1000, 1001)?.is_some());
                assert!(tx.record_watch_event(&place("a"), EventKind::Crash, "panicked", 1000, 1500)?.is_none());
                assert!(tx.record_watch_event(&place("a"), EventKind::Crash, "panicked", 2000, 2001)?.is_some());
                assert!(tx.record_watch_event(&place("b"), EventKind::Stop, "destroyed", 1000, 1001)?.is_some());
                let crashes = tx.version_crashes("img", 2, Channel::Prod, 0)?;
                assert_eq!(crashes.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [1000, 2000], "stops are not crashes");
                let counts = tx.crash_counts()?;
                assert_eq!(
                    counts.iter().map(|c| (c.pool.as_str(), c.host.as_str(), c.crashes)).collect::<Vec<_>>(),
                    [("p", "local", 2)]
                );
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn a_channel_without_a_policy_has_the_default_and_a_set_one_replaces_it() {
        for (_d, mut c) in cats() {
            c.write(|tx| {
                assert_eq!(tx.watch_policy(Channel::Prod)?.action, Action::Rollback);
                assert_eq!(tx.watch_policy(Channel::Test)?.action, Action::Alert);
                assert!(!tx.watch_policy(Channel::Test)?.set);
                let p = Policy { crashes: 3, within: Duration::from_secs(60), ..Policy::default_for(Channel::Test) };
                tx.set_watch_policy(&p)?;
                tx.set_watch_policy(&Policy { action: Action::Rollback, ..p })?;
                let got = tx.watch_policy(Channel::Test)?;
                assert_eq!(
                    (got.crashes, got.within, got.action, got.set),
                    (3, Duration::from_secs(60), Action::Rollback, true)
                );
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn an_incident_is_opened_once_per_version_and_channel_acked_then_resolved() {
        for (_d, mut c) in cats() {
            let report = IncidentOutcome { crashed: vec!["a".into(), "b".into()], ..Default::default() };
            let n = NewIncident {
                image: "img",
                version: 2,
                channel: Channel::Prod,
                action: Action::Alert,
                opened_ms: 10,
                first_crash_ms: 1,
                threshold_crash_ms: 5,
                report: &report,
            };
            let id = c.write(|tx| tx.insert_incident(&n)).unwrap();
            // Its own transaction: on PostgreSQL a failed statement ends the transaction.
            assert!(c.write(|tx| tx.insert_incident(&n)).is_err(), "one incident per version and channel");
            c.write(|tx| {
                tx.ack_incident(id, "alice", "vendor driver", 20)?;
                let i = tx.incident(id)?.unwrap();
                assert_eq!((i.state, i.note.as_deref()), (IncidentState::Acknowledged, Some("vendor driver")));
                assert!(tx.resolve_incident(id, 30)?);
                assert!(!tx.resolve_incident(id, 40)?, "resolved once");
                tx.ack_incident(id, "bob", "later note", 50)?;
                assert_eq!(tx.incident(id)?.unwrap().state, IncidentState::Resolved);
                assert_eq!(tx.incident(id)?.unwrap().report.crashed, ["a", "b"]);
                let counts = tx.incident_state_counts()?;
                assert_eq!(counts, [("open".into(), 0), ("acknowledged".into(), 0), ("resolved".into(), 1)]);
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn every_version_with_desktops_has_a_crash_counter_and_a_crashed_desktop_counts_as_crashed() {
        for (_d, mut c) in cats() {
            c.write(|tx| {
                // Image "a", versions 1 and 2, pool "p" of two idle desktops on version 1.
                super::super::pools::tests::pool_of_two(tx)?;
                let counts = |tx: &Tx| -> Result<Vec<(String, u64)>> {
                    Ok(tx
                        .crash_counts()?
                        .into_iter()
                        .map(|c| (format!("{}/{}/{}/{}", c.image, c.version, c.pool, c.host), c.crashes))
                        .collect())
                };
                assert_eq!(counts(tx)?, [("a/1/p/local".to_string(), 0)], "a counter before the first crash");
                let mut p = place("vdim-p-001");
                (p.image, p.version) = ("a".into(), 1);
                tx.record_watch_event(&p, EventKind::Crash, "panicked", 5, 6)?;
                tx.set_crashed("vdim-p-001", 5)?;
                tx.set_crashed("vdim-p-001", 9)?;
                assert_eq!(tx.crashed_desktops()?, ["vdim-p-001"]);
                assert_eq!(counts(tx)?, [("a/1/p/local".to_string(), 1)]);
                let states = tx.desktops_by_version()?;
                assert_eq!(states, [("a".into(), 1, "crashed".into(), 1), ("a".into(), 1, "idle".into(), 1)]);
                tx.set_started("vdim-p-001")?;
                assert_eq!(tx.desktops_by_version()?, [("a".into(), 1, "idle".into(), 2)]);
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }
}
