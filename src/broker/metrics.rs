//! Prometheus text exposition: the broker's own counters, plus what the catalog and the
//! listener say at scrape time (open sessions, desktops by state, rollouts by state,
//! connections). Hand-written: the format is a few lines, a metrics crate would be the
//! bigger dependency. Served to administrators, or on `--metrics-listen` without a token.

use crate::catalog::incidents::CrashCount;
use crate::catalog::users::DesktopCounts;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_opened: AtomicU64,
    pub sessions_reconnected: AtomicU64,
    pub sessions_closed: AtomicU64,
    pub sessions_ended_by_reaper: AtomicU64,
    pub pool_exhausted: AtomicU64,
    pub console_connections: AtomicI64,
    pub console_connections_total: AtomicU64,
    pub http_responses: Mutex<BTreeMap<u16, u64>>,
}

/// What the catalog and the main listener say at scrape time.
#[derive(Debug, Default)]
pub struct Facts {
    pub open_sessions: u64,
    pub desktops: Vec<DesktopCounts>,
    pub rollouts: Vec<(String, u64)>,
    /// The fleet watch's crashes by image, version, pool and host.
    pub crashes: Vec<CrashCount>,
    /// Desktops by image, version and state.
    pub by_version: Vec<(String, u32, String, u64)>,
    pub incidents: Vec<(String, u64)>,
    pub connections_open: u64,
    pub connections_evicted: u64,
    pub connections_refused: u64,
    /// Whether this broker holds the leader lease (runs the background duties).
    pub leader: bool,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn count_response(&self, status: u16) {
        let mut m = self.http_responses.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(status).or_default() += 1;
    }

    pub fn render(&self, facts: &Facts) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(s, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "vdim_broker_leader",
            "gauge",
            "1 if this broker leads (reaper, heal, host watch, rollout adoption), 0 if it follows.",
            one(u8::from(facts.leader).to_string()),
        );
        metric("vdim_sessions_open", "gauge", "Sessions open now.", one(facts.open_sessions.to_string()));
        metric(
            "vdim_sessions_opened_total",
            "counter",
            "Sessions opened by this broker.",
            one(self.sessions_opened.load(Relaxed).to_string()),
        );
        metric(
            "vdim_sessions_reconnected_total",
            "counter",
            "Session requests answered with the user's open session.",
            one(self.sessions_reconnected.load(Relaxed).to_string()),
        );
        metric(
            "vdim_sessions_closed_total",
            "counter",
            "Logoffs through the API.",
            one(self.sessions_closed.load(Relaxed).to_string()),
        );
        metric(
            "vdim_sessions_reaped_total",
            "counter",
            "Sessions ended by expiry or because their desktop was given back elsewhere.",
            one(self.sessions_ended_by_reaper.load(Relaxed).to_string()),
        );
        metric(
            "vdim_pool_exhausted_total",
            "counter",
            "Session requests refused because the pool had no idle desktop.",
            one(self.pool_exhausted.load(Relaxed).to_string()),
        );
        let mut desktops = vec![];
        for d in &facts.desktops {
            for (state, n) in [("idle", d.idle), ("in_use", d.in_use), ("resetting", d.resetting)] {
                desktops.push((format!("{{pool=\"{}\",state=\"{state}\"}}", label(&d.pool)), n.to_string()));
            }
        }
        metric("vdim_desktops", "gauge", "Desktops by pool and state.", desktops);
        metric(
            "vdim_rollouts",
            "gauge",
            "Rollouts by state.",
            facts.rollouts.iter().map(|(st, n)| (format!("{{state=\"{}\"}}", label(st)), n.to_string())).collect(),
        );
        let (crashes, by_version, incidents) = watch_lines(facts);
        metric(
            "vdim_desktop_crashes_total",
            "counter",
            "Crashes and reboot loops the fleet watch recorded, by image, version, pool and host.",
            crashes,
        );
        metric("vdim_desktops_by_version", "gauge", "Desktops by image, version and state.", by_version);
        metric("vdim_incidents", "gauge", "Incidents by state.", incidents);
        metric(
            "vdim_console_connections",
            "gauge",
            "HTML5 console connections open now.",
            one(self.console_connections.load(Relaxed).to_string()),
        );
        metric(
            "vdim_console_connections_total",
            "counter",
            "HTML5 console connections made.",
            one(self.console_connections_total.load(Relaxed).to_string()),
        );
        metric("vdim_connections", "gauge", "Client connections open now.", one(facts.connections_open.to_string()));
        metric(
            "vdim_connections_evicted_total",
            "counter",
            "Waiting connections closed to make room at --max-connections.",
            one(facts.connections_evicted.to_string()),
        );
        metric(
            "vdim_connections_refused_total",
            "counter",
            "Connections refused at --max-connections because every connection was busy.",
            one(facts.connections_refused.to_string()),
        );
        let codes = self.http_responses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        metric(
            "vdim_http_responses_total",
            "counter",
            "HTTP responses by status code.",
            codes.iter().map(|(c, n)| (format!("{{code=\"{c}\"}}"), n.to_string())).collect(),
        );
        s
    }
}

type Lines = Vec<(String, String)>;

/// The fleet watch's metrics: crashes, desktops by version, incidents.
fn watch_lines(facts: &Facts) -> (Lines, Lines, Lines) {
    let crashes = facts
        .crashes
        .iter()
        .map(|c| {
            let labels = format!(
                "{{image=\"{}\",version=\"{}\",pool=\"{}\",host=\"{}\"}}",
                label(&c.image),
                c.version,
                label(&c.pool),
                label(&c.host)
            );
            (labels, c.crashes.to_string())
        })
        .collect();
    let by_version = facts
        .by_version
        .iter()
        .map(|(i, v, st, n)| {
            (format!("{{image=\"{}\",version=\"{v}\",state=\"{}\"}}", label(i), label(st)), n.to_string())
        })
        .collect();
    let incidents =
        facts.incidents.iter().map(|(st, n)| (format!("{{state=\"{}\"}}", label(st)), n.to_string())).collect();
    (crashes, by_version, incidents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.sessions_opened.fetch_add(2, Relaxed);
        m.count_response(201);
        let facts = Facts {
            open_sessions: 2,
            desktops: vec![DesktopCounts { pool: "finance".into(), idle: 18, in_use: 2, resetting: 0 }],
            rollouts: vec![("running".into(), 1)],
            crashes: vec![CrashCount {
                image: "win".into(),
                version: 7,
                pool: "finance".into(),
                host: "local".into(),
                crashes: 2,
            }],
            by_version: vec![("win".into(), 7, "idle".into(), 18)],
            incidents: vec![("open".into(), 1)],
            connections_open: 3,
            connections_evicted: 4,
            connections_refused: 0,
            leader: true,
        };
        let text = m.render(&facts);
        for line in [
            "# TYPE vdim_sessions_open gauge",
            "vdim_sessions_open 2",
            "vdim_sessions_opened_total 2",
            "vdim_desktops{pool=\"finance\",state=\"in_use\"} 2",
            "vdim_rollouts{state=\"running\"} 1",
            "# TYPE vdim_desktop_crashes_total counter",
            "vdim_desktop_crashes_total{image=\"win\",version=\"7\",pool=\"finance\",host=\"local\"} 2",
            "vdim_desktops_by_version{image=\"win\",version=\"7\",state=\"idle\"} 18",
            "vdim_incidents{state=\"open\"} 1",
            "vdim_http_responses_total{code=\"201\"} 1",
            "vdim_connections 3",
            "vdim_connections_evicted_total 4",
            "vdim_broker_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
