//! vdim's Prometheus alert rules (scripts/prometheus): `promtool check rules` and the unit tests
//! of `promtool test rules` pass, a broken rule makes them fail, and in a real Prometheus
//! scraping a live /metrics the crash alert goes pending, then firing.

mod common;

use common::prometheus::{rules_file, Options, Prometheus};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMTOOL: &str = "/usr/bin/promtool";

fn promtool(args: &[&str]) -> Output {
    Command::new(PROMTOOL).args(args).output().unwrap_or_else(|e| panic!("{PROMTOOL} (scripts/setup-host): {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn unit_tests_file(dir: &Path) -> String {
    dir.join("vdim-alerts.test.yml").to_str().unwrap().to_string()
}

#[test]
fn shipped_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = rules_file();
    let check = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(check.status.success(), "promtool check rules:\n{}", text(&check));
    assert!(text(&check).contains("SUCCESS: 3 rules found"), "{}", text(&check));
    let test = promtool(&["test", "rules", &unit_tests_file(rules.parent().unwrap())]);
    assert!(test.status.success(), "promtool test rules:\n{}", text(&test));
}

#[test]
fn every_alert_has_unit_tests() {
    let dir = rules_file().parent().unwrap().to_path_buf();
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let tests = std::fs::read_to_string(dir.join("vdim-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    for required in ["VdimVersionCrashing", "VdimIncidentOpen"] {
        assert!(alerts.contains(&required), "no {required} in vdim-alerts.yml: {alerts:?}");
    }
    for a in &alerts {
        let firing = tests.split(&format!("alertname: {a}\n")).skip(1).any(|rest| {
            let case = rest.split("alertname:").next().unwrap_or("");
            case.contains("exp_labels:")
        });
        let silent = tests.contains(&format!("alertname: {a}\n        exp_alerts: []"));
        assert!(firing && silent, "alert {a} needs a unit test where it fires and one where it does not");
    }
}

/// Each mutation breaks one rule the way a careless edit would; the unit tests must catch it
/// (and a syntax error must fail `promtool check rules`).
#[test]
fn a_broken_rule_fails_the_rule_tests() {
    let mutations: &[(&str, &str, &str)] = &[
        ("crash threshold", ">= 2\n", ">= 3\n"),
        ("crash window", "[15m]", "[1m]"),
        ("crashes per version", "sum by (image, version) (increase", "sum by (pool) (increase"),
        ("crash pending time", "for: 30s", "for: 5m"),
        ("incident state", "vdim_incidents{state=\"open\"}", "vdim_incidents{state=~\".+\"}"),
        ("crashed desktops", "{state=\"crashed\"}) > 0", "{state=\"crashed\"}) > 2"),
    ];
    let shipped = std::fs::read_to_string(rules_file()).unwrap();
    let tests = std::fs::read_to_string(rules_file().with_file_name("vdim-alerts.test.yml")).unwrap();
    for (what, from, to) in mutations {
        assert_eq!(shipped.matches(from).count(), 1, "mutation {what}: {from:?} must occur once in the rules");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vdim-alerts.yml"), shipped.replacen(from, to, 1)).unwrap();
        std::fs::write(dir.path().join("vdim-alerts.test.yml"), &tests).unwrap();
        let check = promtool(&["check", "rules", dir.path().join("vdim-alerts.yml").to_str().unwrap()]);
        assert!(check.status.success(), "mutation {what} is still valid syntax:\n{}", text(&check));
        let out = promtool(&["test", "rules", &unit_tests_file(dir.path())]);
        assert!(!out.status.success(), "the rule tests did not notice the broken {what} ({from:?} -> {to:?})");
        assert!(text(&out).contains("FAILED"), "{}", text(&out));
    }
    let dir = tempfile::tempdir().unwrap();
    let broken =
        shipped.replacen("increase(vdim_desktop_crashes_total[15m])", "increase(vdim_desktop_crashes_total[15m]", 1);
    std::fs::write(dir.path().join("vdim-alerts.yml"), broken).unwrap();
    let check = promtool(&["check", "rules", dir.path().join("vdim-alerts.yml").to_str().unwrap()]);
    assert!(!check.status.success(), "promtool check rules accepted an unbalanced expression");
}

/// A tiny /metrics endpoint on 127.0.0.1 whose crash counters the test raises.
struct Metrics {
    addr: String,
    crashes: Arc<[AtomicU64; 3]>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The series served: version 4 on two pools and hosts, version 3 on one.
const SERIES: [&str; 3] = [
    r#"{image="win11",version="4",pool="prod-a",host="h1"}"#,
    r#"{image="win11",version="4",pool="prod-b",host="h2"}"#,
    r#"{image="win11",version="3",pool="prod-a",host="h1"}"#,
];

impl Metrics {
    fn start() -> Metrics {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let crashes: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (crashes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut req = [0u8; 4096];
                        let n = conn.read(&mut req).unwrap_or(0);
                        let req = String::from_utf8_lossy(&req[..n]);
                        let (status, body) = if req.starts_with("GET /metrics ") {
                            ("200 OK", exposition(&c))
                        } else {
                            ("404 Not Found", String::new())
                        };
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Metrics { addr, crashes, stop, thread: Some(thread) }
    }
}

fn exposition(crashes: &[AtomicU64; 3]) -> String {
    let mut s = String::from(
        "# HELP vdim_desktop_crashes_total Desktop crashes the watch recorded.\n\
         # TYPE vdim_desktop_crashes_total counter\n",
    );
    for (labels, n) in SERIES.iter().zip(crashes.iter()) {
        s += &format!("vdim_desktop_crashes_total{labels} {}\n", n.load(SeqCst));
    }
    s += "# HELP vdim_incidents Incidents by state.\n# TYPE vdim_incidents gauge\nvdim_incidents{state=\"open\"} 0\n";
    s
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn version_crashing_alert_fires_in_a_real_prometheus() {
    let metrics = Metrics::start();
    let prom =
        Prometheus::start_with(Options { target: &metrics.addr, metrics_path: "/metrics", rule_for: Some("2s") });
    prom.wait_scraped(Duration::from_secs(30));
    prom.wait_until("crash series at 0", Duration::from_secs(10), |p| {
        p.query_values("vdim_desktop_crashes_total") == [0.0, 0.0, 0.0]
    });
    assert!(prom.alert_list().is_empty(), "alerts before any crash: {:?}", prom.alert_list());

    // One crash of each version: below the threshold, nothing to alert on.
    metrics.crashes[0].fetch_add(1, SeqCst);
    metrics.crashes[2].fetch_add(1, SeqCst);
    prom.wait_until("both first crashes scraped", Duration::from_secs(10), |p| {
        p.query_values("sum(vdim_desktop_crashes_total)") == [2.0]
    });
    std::thread::sleep(Duration::from_secs(3)); // three more evaluations
    assert!(prom.alert_list().is_empty(), "alerts after one crash per version: {:?}", prom.alert_list());

    // The second desktop of version 4 crashes, on another pool and host.
    let t0 = Instant::now();
    metrics.crashes[1].fetch_add(1, SeqCst);
    let state = |p: &Prometheus| p.alert_list().into_iter().find(|a| a.name == "VdimVersionCrashing");
    prom.wait_until("pending VdimVersionCrashing", Duration::from_secs(20), |p| state(p).is_some());
    let pending = state(&prom).unwrap();
    assert_eq!(pending.state, "pending", "VdimVersionCrashing fired without pending first (for: 2s)");
    let pending_after = t0.elapsed();
    prom.wait_until("firing VdimVersionCrashing", Duration::from_secs(20), |p| {
        state(p).is_some_and(|a| a.state == "firing")
    });
    let firing_after = t0.elapsed();
    let alert = state(&prom).unwrap();
    assert_eq!(alert.labels.get("image").map(String::as_str), Some("win11"));
    assert_eq!(alert.labels.get("version").map(String::as_str), Some("4"), "{alert:?}");
    assert_eq!(alert.labels.get("severity").map(String::as_str), Some("critical"));
    assert_eq!(prom.alerts(), ["VdimVersionCrashing"], "only version 4's alert: {:?}", prom.alert_list());
    assert_eq!(prom.alert_list().len(), 1, "{:?}", prom.alert_list());
    eprintln!(
        "second crash -> pending {pending_after:.1?}, firing {firing_after:.1?} (scrape and evaluation 1 s, for 2 s)"
    );
}
