//! A real Prometheus (Debian's `/usr/bin/prometheus`) for tests: its own temp data dir and a
//! free port on 127.0.0.1, scraping one target every second with vdim's alert rules
//! (scripts/prometheus/vdim-alerts.yml) evaluated every second; killed and removed on drop.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = "/usr/bin/prometheus";

/// The shipped alert rules.
pub fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prometheus/vdim-alerts.yml")
}

pub struct Options<'a> {
    /// `host:port` scraped as job `vdim`.
    pub target: &'a str,
    pub metrics_path: &'a str,
    /// Replaces every rule's `for:` (e.g. "2s") so that a test sees pending -> firing quickly;
    /// None loads the rules as shipped.
    pub rule_for: Option<&'a str>,
}

pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` of its HTTP API.
    pub addr: String,
}

#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
    pub labels: BTreeMap<String, String>,
}

impl Prometheus {
    /// Scrape `target` at `metrics_path` with the rules as shipped.
    pub fn start(target: &str, metrics_path: &str) -> Prometheus {
        Prometheus::start_with(Options { target, metrics_path, rule_for: None })
    }

    pub fn start_with(opts: Options) -> Prometheus {
        let mut dir = tempfile::Builder::new().prefix("vdimprom-").tempdir().expect("tempdir");
        let rules = std::fs::read_to_string(rules_file()).expect("read vdim-alerts.yml");
        let rules = match opts.rule_for {
            Some(d) => override_for(&rules, d),
            None => rules,
        };
        std::fs::write(dir.path().join("vdim-alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: vdim\n    metrics_path: {path:?}\n    \
             static_configs:\n      - targets: [{target:?}]\n",
            rules = dir.path().join("vdim-alerts.yml").display(),
            path = opts.metrics_path,
            target = opts.target,
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        // The free port is found by binding :0 and released before Prometheus binds it: on
        // the rare race with another process, start again on another port.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let child = Command::new(BINARY)
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("start {BINARY} (scripts/setup-host installs it): {e}"));
            let mut p = Prometheus { child, dir, addr };
            match p.wait_ready(&log) {
                Ok(()) => return p,
                Err(why) => {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if attempt < 5 && text.contains("address already in use") {
                        p.stop();
                        dir = p.take_dir();
                        continue;
                    }
                    panic!("Prometheus on {}: {why}\n{text}", p.addr);
                }
            }
        }
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("exited ({st}), log {}", log.display()));
            }
            if matches!(http_get(&self.addr, "/-/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("not ready within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The temp dir, for a restart; `self` then only kills its (already stopped) child.
    fn take_dir(&mut self) -> tempfile::TempDir {
        let empty = tempfile::Builder::new().prefix("vdimprom-").tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, empty)
    }

    /// GET an API path; the JSON `data` of a successful answer.
    fn api(&self, path_and_query: &str) -> Value {
        let (status, body) =
            http_get(&self.addr, path_and_query).unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path_and_query} -> {status}: {e}: {body}"));
        assert!(status == 200 && v["status"] == "success", "GET {path_and_query} -> {status}: {body}");
        v["data"].clone()
    }

    /// An instant query: the `result` array of the answer (vector: `metric` + `value`).
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", percent_encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The values of an instant query's samples (empty when nothing matches).
    pub fn query_values(&self, expr: &str) -> Vec<f64> {
        self.query(expr)
            .iter()
            .map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()).expect("sample value"))
            .collect()
    }

    /// Every active alert, pending or firing.
    pub fn alert_list(&self) -> Vec<Alert> {
        let data = self.api("/api/v1/alerts");
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let labels: BTreeMap<String, String> = a["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                Alert {
                    name: labels.get("alertname").cloned().unwrap_or_default(),
                    state: a["state"].as_str().unwrap_or_default().to_string(),
                    labels,
                }
            })
            .collect()
    }

    /// The names of the firing alerts, sorted, each once.
    pub fn alerts(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.alert_list().into_iter().filter(|a| a.state == "firing").map(|a| a.name).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Waits until `f` says yes, polling every 100 ms; panics with `what` and the log after
    /// `timeout`.
    #[track_caller]
    pub fn wait_until(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Prometheus) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "Prometheus: no {what} within {timeout:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the target has been scraped successfully (`up` is 1).
    pub fn wait_scraped(&self, timeout: Duration) {
        self.wait_until("successful scrape of job vdim", timeout, |p| p.query_values("up{job=\"vdim\"}") == [1.0]);
    }

    pub fn log(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.last().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every rule's `for:` line set to `duration`, indentation kept.
fn override_for(rules: &str, duration: &str) -> String {
    let mut n = 0;
    let out: Vec<String> = rules
        .lines()
        .map(|l| {
            let body = l.trim_start();
            if body.starts_with("for:") {
                n += 1;
                format!("{}for: {duration}", &l[..l.len() - body.len()])
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(n > 0, "no `for:` in the alert rules to override");
    out.join("\n") + "\n"
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET (Prometheus answers it unchunked and closes): (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}
