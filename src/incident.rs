//! Incidents the fleet watch opened, and their review: the timeline from the audit log and
//! the watch's events, the blast radius, the times to detect and to restore; `--markdown`
//! renders it as a post-incident review to paste into a tracker.

use crate::catalog::incidents::{Incident, WatchEvent};
use crate::catalog::{Catalog, CatalogError};
use crate::store::Actor;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::SystemTime;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IncidentError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("no incident {0} (see 'vdim incident list')")]
    NotFound(i64),
    #[error("an acknowledgement needs a --note saying what was found or done")]
    EmptyNote,
    #[error("give --markdown or --json, not both")]
    TwoFormats,
}

impl crate::error::Kind for IncidentError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            IncidentError::Catalog(e) => e.kind(),
            IncidentError::NotFound(_) => K::NotFound,
            IncidentError::EmptyNote | IncidentError::TwoFormats => K::Invalid,
        }
    }
}

pub type Result<T> = std::result::Result<T, IncidentError>;

/// Audit entries an incident's timeline reads at most.
const AUDIT_WINDOW: usize = 10_000;

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
    /// `audit`, `watch` or `breaker`.
    pub source: &'static str,
    pub what: String,
}

/// Who and what the version reached.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlastRadius {
    /// Desktops that ran the version (rollouts, the watch's events, now).
    pub ran_version: Vec<String>,
    pub crashed: Vec<String>,
    /// Sessions on crashed desktops ended since the first crash.
    pub sessions_ended: usize,
    /// Users of sessions on crashed desktops open at the first crash or after.
    pub users_affected: Vec<String>,
}

/// Milliseconds between the crashes, the decision and the restored fleet.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Times {
    /// First crash to the breaker's decision.
    pub detect_ms: i64,
    /// The crash that passed the threshold to the decision.
    pub decision_ms: i64,
    /// Decision to every desktop moved back (rollback only).
    pub restore_ms: Option<i64>,
    /// The threshold crash to every desktop moved back.
    pub threshold_to_restored_ms: Option<i64>,
}

/// What `incident show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    #[serde(flatten)]
    pub incident: Incident,
    pub times: Times,
    pub blast_radius: BlastRadius,
    pub timeline: Vec<Entry>,
    pub events: Vec<WatchEvent>,
}

pub fn at(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_ms(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339(rfc3339).map_or(0, crate::watch::ms)
}

pub fn list(catalog: &mut Catalog, limit: usize) -> Result<Vec<Incident>> {
    Ok(catalog.read(|tx| tx.incidents(limit))?)
}

/// An admin's acknowledgement, with a note; audited.
pub fn ack(catalog: &mut Catalog, id: i64, note: &str, actor: &Actor) -> Result<Incident> {
    if note.trim().is_empty() {
        return Err(IncidentError::EmptyNote);
    }
    catalog.write(|tx| -> Result<Incident> {
        let i = tx.incident(id)?.ok_or(IncidentError::NotFound(id))?;
        tx.ack_incident(id, &actor.0, note.trim(), crate::watch::ms(SystemTime::now()))?;
        tx.audit(crate::catalog::Audit {
            actor: &actor.0,
            action: "incident.ack",
            image: Some(&i.image),
            version: Some(i.version),
            detail: json!({"incident": id, "note": note.trim()}),
            ..Default::default()
        })?;
        Ok(tx.incident(id)?.expect("it exists"))
    })
}

/// The whole review of one incident.
pub fn review(catalog: &mut Catalog, id: i64) -> Result<Review> {
    catalog.read(|tx| -> Result<Review> {
        let i = tx.incident(id)?.ok_or(IncidentError::NotFound(id))?;
        let events = tx.watch_events(Some(&i.image), Some(i.version), AUDIT_WINDOW)?;
        let img = tx.image(&i.image)?;
        let mut ran: BTreeSet<String> = events.iter().map(|e| e.desktop.clone()).collect();
        for r in tx.rollouts(Some(img.id), AUDIT_WINDOW)?.into_iter().filter(|r| r.version == i.version) {
            ran.extend(tx.rollout_desktops(r.id)?.into_iter().map(|d| d.desktop));
        }
        ran.extend(tx.desktops_on_version(&i.image, i.version, i.channel)?);
        let crashed: BTreeSet<String> =
            events.iter().filter(|e| e.kind.is_crash()).map(|e| e.desktop.clone()).collect();
        let crashed: Vec<String> = crashed.into_iter().collect();
        let sessions = tx.sessions_on_desktops(&crashed)?;
        let after_first = |t: &Option<String>| t.as_deref().is_none_or(|t| parse_ms(t) >= i.first_crash_ms - 1000);
        let sessions_ended = sessions.iter().filter(|s| s.ended.is_some() && after_first(&s.ended)).count();
        let users: BTreeSet<String> =
            sessions.iter().filter(|s| after_first(&s.ended)).map(|s| s.user.clone()).collect();
        let audit = tx.audit_log(Some(&i.image), None, AUDIT_WINDOW)?;
        let mut timeline: Vec<Entry> = audit
            .iter()
            .filter(|a| concerns(a, &i))
            .map(|a| Entry { at: a.at.clone(), at_ms: parse_ms(&a.at), source: "audit", what: audit_text(a) })
            .collect();
        timeline.extend(events.iter().map(|e| Entry {
            at: at(e.at_ms),
            at_ms: e.at_ms,
            source: "watch",
            what: format!("{} {} on host {} (pool {}): {}", e.desktop, e.kind, e.host, e.pool, e.detail),
        }));
        timeline.push(Entry {
            at: at(i.opened_ms),
            at_ms: i.opened_ms,
            source: "breaker",
            what: format!("breaker tripped: {}; action {}", i.report.decision, i.action.as_str()),
        });
        timeline.extend(i.report.restored.iter().map(|(d, ms)| Entry {
            at: at(*ms),
            at_ms: *ms,
            source: "breaker",
            what: format!("{d} restored to version {}", i.report.rolled_back_to.map_or("?".into(), |v| v.to_string())),
        }));
        // Stable: events of one second keep the order they were recorded in.
        timeline.sort_by_key(|e| e.at_ms);
        let times = Times {
            detect_ms: i.opened_ms - i.first_crash_ms,
            decision_ms: i.opened_ms - i.threshold_crash_ms,
            restore_ms: i.restored_ms.map(|r| r - i.opened_ms),
            threshold_to_restored_ms: i.restored_ms.map(|r| r - i.threshold_crash_ms),
        };
        let blast_radius = BlastRadius {
            ran_version: ran.into_iter().collect(),
            crashed,
            sessions_ended,
            users_affected: users.into_iter().collect(),
        };
        Ok(Review { incident: i, times, blast_radius, timeline, events })
    })
}

/// Whether an audit entry of the image belongs in the incident's timeline.
fn concerns(a: &crate::catalog::AuditEntry, i: &Incident) -> bool {
    let of_incident = a.detail.get("incident").and_then(|v| v.as_i64()) == Some(i.id);
    let from_version =
        a.action == "channel.rollback" && a.detail.get("from").and_then(|v| v.as_u64()) == Some(i.version as u64);
    a.version == Some(i.version) || of_incident || from_version
}

fn audit_text(a: &crate::catalog::AuditEntry) -> String {
    let d = &a.detail;
    let s = |k: &str| d.get(k).map(|v| v.as_str().map_or_else(|| v.to_string(), String::from)).unwrap_or_default();
    let what = match a.action.as_str() {
        "image.seal" => format!("version {} sealed, note {:?}", a.version.unwrap_or(0), s("note")),
        "rollout.start" => format!(
            "rollout {} to {} started (waves {}, soak {} ms)",
            s("rollout"),
            s("channel"),
            s("waves"),
            s("soak_ms")
        ),
        "rollout.wave" => format!("rollout {} wave {}: {}", s("rollout"), s("wave"), s("desktops")),
        "rollout.succeeded" => {
            format!("rollout {} succeeded: {} points at version {}", s("rollout"), s("channel"), a.version.unwrap_or(0))
        }
        "channel.rollback" => format!("channel {} rolled back from version {} to {}", s("channel"), s("from"), s("to")),
        _ => format!("{} {}", a.action, d),
    };
    format!("{what} (by {})", a.actor)
}

/// The review as Markdown, to paste into a tracker.
pub fn markdown(r: &Review) -> String {
    let i = &r.incident;
    let mut s = String::new();
    let _ = writeln!(s, "# Incident {}: '{}' version {} in {}\n", i.id, i.image, i.version, i.channel);
    let _ = writeln!(s, "- **State:** {}", i.state);
    let _ = writeln!(s, "- **Action:** {}", i.action.as_str());
    let _ = writeln!(s, "- **Decision:** {}", i.report.decision);
    if let Some(v) = i.report.rolled_back_to {
        let _ = writeln!(s, "- **Channel rolled back to:** version {v}");
    }
    if !i.report.pinned_pools.is_empty() {
        let _ = writeln!(s, "- **Pinned pools left on the version:** {}", i.report.pinned_pools.join(", "));
    }
    if let Some(n) = &i.note {
        let _ = writeln!(s, "- **Note** ({}): {n}", i.acked_by.as_deref().unwrap_or("?"));
    }
    let t = &r.times;
    let _ = writeln!(s, "\n## Times\n");
    let _ = writeln!(s, "| first crash → decision | threshold crash → decision | decision → restored |");
    let _ = writeln!(s, "|---|---|---|");
    let restore = t.restore_ms.map_or("not restored".into(), |m| format!("{m} ms"));
    let _ = writeln!(s, "| {} ms | {} ms | {restore} |", t.detect_ms, t.decision_ms);
    let b = &r.blast_radius;
    let _ = writeln!(s, "\n## Blast radius\n");
    let _ = writeln!(s, "- Desktops that ran the version: {} ({})", b.ran_version.len(), b.ran_version.join(", "));
    let _ = writeln!(s, "- Desktops that crashed: {} ({})", b.crashed.len(), b.crashed.join(", "));
    let _ = writeln!(s, "- Sessions ended: {}", b.sessions_ended);
    let _ = writeln!(s, "- Users affected: {} ({})", b.users_affected.len(), b.users_affected.join(", "));
    let _ = writeln!(s, "\n## Timeline\n");
    let _ = writeln!(s, "| time | source | what |\n|---|---|---|");
    for e in &r.timeline {
        let _ = writeln!(s, "| {} | {} | {} |", e.at, e.source, e.what.replace('|', "\\|"));
    }
    s
}

/// The review as plain text.
pub fn text(r: &Review) -> String {
    let i = &r.incident;
    let mut s = format!(
        "incident {} ({}): '{}' version {} in {}, action {}\n  {}",
        i.id,
        i.state,
        i.image,
        i.version,
        i.channel,
        i.action.as_str(),
        i.report.decision
    );
    let t = &r.times;
    s += &format!("\n  first crash → decision {} ms; threshold crash → decision {} ms", t.detect_ms, t.decision_ms);
    if let Some(m) = t.restore_ms {
        s += &format!("; decision → restored {m} ms");
    }
    if !i.report.pinned_pools.is_empty() {
        s += &format!("\n  pinned pools left on version {}: {}", i.version, i.report.pinned_pools.join(", "));
    }
    let b = &r.blast_radius;
    s += &format!(
        "\n  blast radius: {} desktops ran it, {} crashed, {} sessions ended, {} users affected",
        b.ran_version.len(),
        b.crashed.len(),
        b.sessions_ended,
        b.users_affected.len()
    );
    for e in &r.timeline {
        s += &format!("\n  {}  {:<7} {}", e.at, e.source, e.what);
    }
    s
}
