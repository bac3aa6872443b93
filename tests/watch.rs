//! The fleet watch on the real libvirt daemon: `vdim serve` follows every desktop after its
//! rollout; a version that crashes desktops is stopped by the circuit breaker, an admin's
//! stop never trips it, and `--action alert` changes nothing.

mod common;
use common::prometheus::{Options, Prometheus};
use common::serve::Server;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn desktops(t: &LibvirtEnv, pool: &str) -> Vec<serde_json::Value> {
    t.vdim_json(&["pool", "show", pool])["desktops"].as_array().unwrap().clone()
}

/// Kills a desktop's QEMU process, as a crash of it would: libvirt reports the domain
/// crashed. The process is one this test's pool started.
fn crash(desktop: &str) {
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{desktop}.pid")).unwrap();
    sh("kill", &["-9", pid.trim()]);
}

/// Polls `f` every 200 ms until it returns Some, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A local HTTP listener that answers 503 to its first `fail_first` POSTs, 200 to the rest,
/// and keeps the JSON bodies it accepted.
struct Hook {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl Hook {
    fn start(fail_first: usize) -> Hook {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/vdim", l.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(vec![]));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (keep, count) = (bodies.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = BufReader::new(s);
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let read = r.read_exact(&mut body).is_ok();
                if n < fail_first {
                    let _ =
                        r.get_mut().write_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    continue;
                }
                if let Some(v) = read.then(|| serde_json::from_slice(&body).ok()).flatten() {
                    keep.lock().unwrap().push(v);
                }
                let _ = r.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        Hook { url, bodies, requests }
    }

    fn events(&self) -> Vec<String> {
        self.bodies.lock().unwrap().iter().map(|b| b["event"].as_str().unwrap_or_default().to_string()).collect()
    }
}

/// One admin API call on `base` with `token`: (status, JSON body).
fn api(base: &str, method: &str, path: &str, token: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let mut r = c.request(method.parse().unwrap(), format!("{base}{path}")).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    })
}

fn incidents(t: &LibvirtEnv) -> Vec<serde_json::Value> {
    t.vdim_json(&["incident", "list"]).as_array().unwrap().clone()
}

#[test]
fn a_version_that_crashes_after_its_rollout_is_rolled_back_by_the_breaker() {
    let t = LibvirtEnv::new("wrb");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "wrb-v1");
    t.create_pool(&pp, "img", "prod", 6, "test-linux", &["--start"]);
    let ds: Vec<String> = desktops(&t, &pp).iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    for d in &ds {
        t.wait_marker(&pp, d, "wrb-v1", 120);
    }
    // Healthy for 30 s after boot, then a panic: it passes a 10 s soak.
    seal_marker(&t.env, "img", "wrb-v2", "panic-after=30");
    // The hook refuses the first two attempts: the notice comes through on the third.
    let hook = Hook::start(2);
    let server = Server::start(&t.env, "qemu:///system", &["--webhook", &hook.url, "--metrics-listen", "127.0.0.1:0"]);
    let metrics = server.banner.split("metrics http://").nth(1).unwrap().split('/').next().unwrap().to_string();
    let prom = Prometheus::start_with(Options { target: &metrics, metrics_path: "/metrics", rule_for: Some("2s") });
    prom.wait_scraped(Duration::from_secs(60));

    let r = t.vdim_json(&[
        "promote",
        "img",
        "2",
        "--to",
        "prod",
        "--soak",
        "10s",
        "--waves",
        "1,100%",
        "--force",
        "--reason",
        "watch test",
    ]);
    assert_eq!(r["state"], "succeeded", "the version passed its soak: {r}");
    let canary = r["waves"][0]["desktops"][0]["desktop"].as_str().unwrap().to_string();
    // The canary booted first: it crashes alone, well before the others.
    wait_for(90, "the canary's crash recorded", || {
        let ev = t.vdim_json(&["watch", "events", "--image", "img"]);
        ev.as_array().unwrap().iter().any(|e| e["desktop"] == canary.as_str() && e["kind"] == "crash").then_some(())
    });
    assert!(incidents(&t).is_empty(), "one desktop's crash never trips it alone");

    let opened = wait_for(90, "the breaker's incident", || incidents(&t).first().cloned());
    assert_eq!(
        (opened["image"].as_str(), opened["version"].as_u64(), opened["action"].as_str()),
        (Some("img"), Some(2), Some("rollback"))
    );
    let resolved =
        wait_for(180, "the incident resolved", || incidents(&t).first().filter(|i| i["state"] == "resolved").cloned());
    let after = |k: &str| resolved[k].as_i64().unwrap() - resolved["threshold_crash_ms"].as_i64().unwrap();
    println!(
        "watch: threshold crash event → decision {} ms, → every desktop back on v1 (vdim's view) {} ms",
        after("opened_ms"),
        after("restored_ms")
    );
    for d in desktops(&t, &pp) {
        assert_eq!(d["version"], 1, "{d}");
        t.wait_marker(&pp, d["name"].as_str().unwrap(), "wrb-v1", 120);
    }
    let h = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(h["versions"][1]["status"], "failed", "{h}");
    assert!(h["versions"][0]["channels"].as_array().unwrap().contains(&serde_json::json!("prod")), "{h}");

    let id = resolved["id"].to_string();
    let review = t.vdim_json(&["incident", "show", &id]);
    let timeline: Vec<String> =
        review["timeline"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap().to_string()).collect();
    for want in [
        "version 2 sealed, note \"wrb-v2\"",
        "rollout 1 to prod started",
        "rollout 1 wave 1",
        "rollout 1 wave 2",
        "rollout 1 succeeded",
        &format!("{canary} crash on host local (pool {pp})"),
        "breaker tripped: ",
        "rolled back from version 2 to 1",
        "restored to version 1",
        "incident.resolved",
    ] {
        assert!(timeline.iter().any(|l| l.contains(want)), "no {want:?} in the timeline:\n{}", timeline.join("\n"));
    }
    let first_crash = timeline.iter().position(|l| l.contains("crash on host")).unwrap();
    let trip = timeline.iter().position(|l| l.contains("breaker tripped")).unwrap();
    assert!(first_crash < trip, "the timeline is in order:\n{}", timeline.join("\n"));
    assert_eq!(review["blast_radius"]["ran_version"].as_array().unwrap().len(), 6, "{review}");
    assert!(review["blast_radius"]["crashed"].as_array().unwrap().len() >= 2, "{review}");
    assert!(review["times"]["restore_ms"].as_i64().is_some(), "{review}");
    let md = t.vdim(&["incident", "show", &id, "--markdown"]);
    md.assert_success();
    assert!(md.stdout().starts_with(&format!("# Incident {id}: 'img' version 2 in prod")), "{}", md.stdout());
    assert!(md.stdout().contains("## Timeline") && md.stdout().contains("## Blast radius"));

    t.vdim(&["incident", "ack", &id, "--note", " "]).assert_exit_code(2).assert_stderr_contains("needs a --note");
    let acked = t.vdim_json(&["incident", "ack", &id, "--note", "vendor driver; KB pulled"]);
    assert_eq!((acked["state"].as_str(), acked["note"].as_str()), (Some("resolved"), Some("vendor driver; KB pulled")));
    wait_for(30, "the webhook's notices", || (hook.events() == ["incident.opened", "incident.resolved"]).then_some(()));
    assert_eq!(hook.requests.load(std::sync::atomic::Ordering::SeqCst), 4, "two refused, then one POST per notice");
    let body = hook.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["incident"]["version"], 2, "{body}");
    assert!(body["summary"].as_str().unwrap().contains("'img' version 2 in prod"), "{body}");

    // Prometheus, scraping vdim serve, fired the shipped alert for the version.
    prom.wait_until("VdimVersionCrashing firing for version 2", Duration::from_secs(60), |p| {
        p.alert_list().iter().any(|a| {
            a.name == "VdimVersionCrashing"
                && a.state == "firing"
                && a.labels.get("version").map(String::as_str) == Some("2")
        })
    });
    drop(server);
}

#[test]
fn an_admins_stop_of_healthy_desktops_never_trips_the_breaker() {
    let t = LibvirtEnv::new("wstop");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "wstop-v1");
    t.create_pool(&pp, "img", "prod", 3, "test-linux", &["--start"]);
    let ds: Vec<String> = desktops(&t, &pp).iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    for d in &ds {
        t.wait_marker(&pp, d, "wstop-v1", 120);
    }
    let _server = Server::start(&t.env, "qemu:///system", &[]);
    std::thread::sleep(Duration::from_secs(2));
    for d in &ds[..2] {
        sh("virsh", &["-c", "qemu:///system", "destroy", d]);
    }
    wait_for(30, "the stops recorded", || {
        let ev = t.vdim_json(&["watch", "events", "--image", "img"]);
        (ev.as_array().unwrap().len() >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(6));
    let events = t.vdim_json(&["watch", "events", "--image", "img"]).as_array().unwrap().clone();
    assert!(events.iter().all(|e| e["kind"] == "stop"), "{events:?}");
    assert_eq!(events.len(), 2, "each stop once, whatever the sweeps saw: {events:?}");
    assert!(incidents(&t).is_empty(), "stops are not crashes");
    let h = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(h["versions"][0]["status"], "ok");
}

#[test]
fn with_action_alert_the_breaker_opens_the_incident_and_changes_nothing() {
    let t = LibvirtEnv::new("walert");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "walert-v1");
    t.create_pool(&pp, "img", "prod", 3, "test-linux", &["--start"]);
    let ds: Vec<String> = desktops(&t, &pp).iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    for d in &ds {
        t.wait_marker(&pp, d, "walert-v1", 120);
    }
    t.vdim(&["watch", "policy", "prod", "--crashes", "1"])
        .assert_exit_code(2)
        .assert_stderr_contains("never trips the breaker alone");
    let p = t.vdim_json(&["watch", "policy", "prod", "--action", "alert", "--within", "10m"]);
    assert_eq!(
        (p["action"].as_str(), p["crashes"].as_u64(), p["within"].as_str()),
        (Some("alert"), Some(2), Some("10m"))
    );
    let before = desktops(&t, &pp);
    let audit_before = t.vdim_json(&["audit", "--image", "img"]).as_array().unwrap().len();
    let server = Server::start(&t.env, "qemu:///system", &[]);
    std::thread::sleep(Duration::from_secs(2));
    crash(&ds[0]);
    crash(&ds[1]);
    let opened = wait_for(30, "the alert incident", || incidents(&t).first().cloned());
    assert_eq!((opened["action"].as_str(), opened["state"].as_str()), (Some("alert"), Some("open")));
    // The admin API says what the CLI says.
    let admin = t.vdim_json(&["user", "add", "root", "--admin"])["token"].as_str().unwrap().to_string();
    let (st, list) = api(&server.base, "GET", "/api/v1/admin/incidents", &admin, None);
    assert_eq!((st, list[0]["id"].clone()), (200, opened["id"].clone()), "{list}");
    let id = opened["id"].to_string();
    let (st, review) = api(&server.base, "GET", &format!("/api/v1/admin/incidents/{id}"), &admin, None);
    assert_eq!((st, review["blast_radius"]["crashed"].as_array().map(Vec::len)), (200, Some(2)), "{review}");
    let (st, _) = api(&server.base, "GET", "/api/v1/admin/incidents/999", &admin, None);
    assert_eq!(st, 404);
    let (st, e) =
        api(&server.base, "PUT", "/api/v1/admin/watch/policies/prod", &admin, Some(serde_json::json!({"crashes": 1})));
    assert_eq!(st, 400, "{e}");
    let (st, e) =
        api(&server.base, "PUT", "/api/v1/admin/watch/policies/prod", &admin, Some(serde_json::json!({"evil": 1})));
    assert_eq!(st, 400, "{e}");
    let (st, p) = api(
        &server.base,
        "PUT",
        "/api/v1/admin/watch/policies/prod",
        &admin,
        Some(serde_json::json!({"within": "20m"})),
    );
    assert_eq!((st, p["within"].as_str(), p["action"].as_str()), (200, Some("20m"), Some("alert")), "{p}");
    let (st, acked) = api(
        &server.base,
        "POST",
        &format!("/api/v1/admin/incidents/{id}/ack"),
        &admin,
        Some(serde_json::json!({"note": "seen"})),
    );
    assert_eq!((st, acked["state"].as_str()), (200, Some("acknowledged")), "{acked}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(incidents(&t)[0]["state"], "acknowledged", "nothing moved, so nothing is resolved");
    let after = desktops(&t, &pp);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&a["version"], &a["needs_reset"]), (&b["version"], &b["needs_reset"]), "{a}");
    }
    let h = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(h["versions"][0]["status"], "ok", "an alert never marks the version failed");
    let actions: Vec<String> = t.vdim_json(&["audit", "--image", "img"]).as_array().unwrap()[audit_before..]
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions,
        ["incident.opened", "incident.ack"],
        "the only changes to the image are the incident and its ack"
    );
}

#[test]
fn a_silent_guest_agent_is_recorded_where_the_profile_has_one_and_never_trips_the_breaker() {
    let t = LibvirtEnv::new("wagent");
    let pp = t.pool_name("p");
    // The guest boots and runs, but its agent never answers (a hung service, say).
    marker_image(&t.env, "img", "wagent-v1 agent=off");
    t.create_pool(&pp, "img", "prod", 2, "test-linux-agent", &["--start"]);
    let ds: Vec<String> = desktops(&t, &pp).iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    for d in &ds {
        t.wait_marker(&pp, d, "wagent-v1", 120);
    }
    let _server = Server::start(&t.env, "qemu:///system", &[]);
    // The agent's grace (60 s) and a ping every 15 s.
    let events = wait_for(120, "the silent agents recorded", || {
        let ev = t.vdim_json(&["watch", "events", "--image", "img"]);
        let silent: Vec<serde_json::Value> =
            ev.as_array().unwrap().iter().filter(|e| e["kind"] == "agent_silent").cloned().collect();
        (silent.len() == 2).then_some(silent)
    });
    for e in &events {
        assert!(e["detail"].as_str().unwrap().starts_with("guest agent did not answer for"), "{e}");
    }
    assert!(incidents(&t).is_empty(), "a silent agent is recorded, not counted as a crash");
}

#[test]
fn bad_input_is_refused_with_a_clear_error_and_changes_nothing() {
    let env = Env::new();
    let before = env.vdim_json(&["watch", "policy"]);
    for (args, says) in [
        (vec!["watch", "policy", "prod", "--crashes", "1"], "the watch policy of prod needs --crashes 2 or more"),
        (vec!["watch", "policy", "test", "--share", "0"], "the watch policy of test needs --share between 1 and 100"),
        (vec!["watch", "policy", "dev", "--within", "0s"], "the watch policy of dev needs --within longer than zero"),
    ] {
        env.vdim(&args).assert_exit_code(2).assert_stderr_contains(says);
    }
    assert_eq!(env.vdim_json(&["watch", "policy"]), before, "a refused policy changes nothing");
    assert!(before.as_array().unwrap().iter().all(|p| p["set"] == false), "{before}");
    assert_eq!(before[2]["action"], "rollback", "prod rolls back by default: {before}");
    assert_eq!((before[0]["action"].as_str(), before[1]["action"].as_str()), (Some("alert"), Some("alert")));
    env.vdim(&["incident", "show", "7"])
        .assert_exit_code(4)
        .assert_stderr_contains("no incident 7 (see 'vdim incident list')");
    env.vdim(&["incident", "ack", "7", "--note", "x"]).assert_exit_code(4).assert_stderr_contains("no incident 7");
    env.vdim(&["serve", "--webhook", "ftp://hooks.example.com/x"])
        .assert_exit_code(2)
        .assert_stderr_contains("--webhook \"ftp://hooks.example.com/x\" must be an http:// or https:// URL");
    let audit = env.vdim_json(&["audit"]);
    assert!(audit.as_array().unwrap().iter().all(|e| e["action"] != "watch.policy"), "{audit}");
    let p = env.vdim_json(&["watch", "policy", "test", "--crashes", "3", "--share", "20"]);
    assert_eq!(
        (p["crashes"].as_u64(), p["share"].as_u64(), p["within"].as_str(), p["set"].as_bool()),
        (Some(3), Some(20), Some("15m"), Some(true))
    );
}
