//! Several `vdim serve` on one catalog (the SQLite file of one shared home here; the home is
//! each test's one parameter, so the same tests run on any catalog the home points at):
//! every broker serves, exactly one leads, another takes over within 10 s of a kill -9, and
//! a rollout whose driver was killed is carried on by the leader without a command. Real
//! binary, real HTTP; real libvirt (qemu:///system, TCG test guests) where desktops boot.

mod common;
use common::serve::Server;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

struct Http {
    rt: tokio::runtime::Runtime,
    c: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let c = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Http { rt, c }
    }

    fn json(&self, method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut r = self.c.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        self.rt.block_on(async {
            let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        })
    }

    #[track_caller]
    fn ok(&self, method: &str, url: &str, token: &str, body: Option<Value>) -> Value {
        let (s, v) = self.json(method, url, Some(token), body);
        assert!((200..300).contains(&s), "{method} {url} -> {s}: {v}");
        v
    }

    fn text(&self, url: &str, token: &str) -> String {
        self.rt.block_on(async { self.c.get(url).bearer_auth(token).send().await.unwrap().text().await.unwrap() })
    }
}

/// Whether the broker at `base` says it leads.
fn leads(http: &Http, base: &str) -> bool {
    let (s, v) = http.json("GET", &format!("{base}/healthz"), None, None);
    assert_eq!(s, 200, "{v}");
    v["leader"].as_bool().unwrap_or_else(|| panic!("healthz says nothing of leading: {v}"))
}

/// Waits until the broker at `base` leads; returns how long that took.
fn until_leader(http: &Http, base: &str, secs: u64) -> Duration {
    let t = Instant::now();
    while !leads(http, base) {
        assert!(t.elapsed() < Duration::from_secs(secs), "{base} did not lead within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

fn audit(env: &Env, action: &str) -> Vec<Value> {
    let all = env.vdim_json(&["audit", "--limit", "10000"]);
    all.as_array().unwrap().iter().filter(|e| e["action"] == action).cloned().collect()
}

fn add_user(env: &Env, name: &str, admin: bool) -> String {
    let mut args = vec!["user", "add", name];
    if admin {
        args.push("--admin");
    }
    env.vdim_json(&args)["token"].as_str().unwrap().to_string()
}

fn inode(p: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

#[test]
fn five_hundred_session_opens_over_two_brokers_on_postgresql_give_twenty_sessions_on_twenty_desktops() {
    rush(Engine::Postgres);
}

#[test]
fn five_hundred_session_opens_over_two_brokers_on_one_sqlite_file_give_twenty_sessions_on_twenty_desktops() {
    rush(Engine::Sqlite);
}

fn rush(engine: Engine) {
    let env = Env::on(engine);
    marker_image(&env, "img", "brk-rush");
    let admin = add_user(&env, "admin", true);
    let (a, b) = (Server::start(&env, "test:///default", &[]), Server::start(&env, "test:///default", &[]));
    let http = Http::new();
    until_leader(&http, &a.base, 10);
    assert!(!leads(&http, &b.base), "two brokers lead at once");
    let body = json!({"name": "rush", "image": "img", "size": 20, "profile": "test-linux", "start": true});
    assert_eq!(http.json("POST", &format!("{}/api/v1/admin/pools", a.base), Some(&admin), Some(body)).0, 201);
    let tokens: Vec<String> = (0..500)
        .map(|i| {
            let v = http.ok(
                "POST",
                &format!("{}/api/v1/admin/users", b.base),
                &admin,
                Some(json!({"name": format!("u{i:03}")})),
            );
            http.ok("PUT", &format!("{}/api/v1/admin/pools/rush/entitlements/u{i:03}", a.base), &admin, None);
            v["token"].as_str().unwrap().to_string()
        })
        .collect();
    // Every other request to the other broker, all at once.
    let results: Vec<(u16, Value)> = http.rt.block_on(async {
        let all = tokens.iter().enumerate().map(|(i, tok)| {
            let url = format!("{}/api/v1/pools/rush/sessions", if i % 2 == 0 { &a.base } else { &b.base });
            let c = http.c.clone();
            async move {
                let r = c.post(url).bearer_auth(tok).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        });
        futures_util::future::join_all(all).await
    });
    let created: Vec<&Value> = results.iter().filter(|(s, _)| *s == 201).map(|(_, v)| v).collect();
    let other: Vec<&(u16, Value)> = results.iter().filter(|(s, _)| *s != 201 && *s != 503).collect();
    assert_eq!((created.len(), results.len() - created.len()), (20, 480), "unexpected: {other:?}");
    let desktops: BTreeSet<&str> = created.iter().map(|v| v["desktop"].as_str().unwrap()).collect();
    assert_eq!(desktops.len(), 20, "no desktop twice");
    for (i, base) in [&a.base, &b.base].into_iter().enumerate() {
        let served = results.iter().skip(i).step_by(2).filter(|(s, _)| *s == 201).count();
        println!("broker {i}: {served} of the 20 sessions");
        let show = http.ok("GET", &format!("{base}/api/v1/admin/pools/rush"), &admin, None);
        let users: BTreeSet<&str> =
            show["desktops"].as_array().unwrap().iter().filter_map(|d| d["assigned_to"].as_str()).collect();
        assert_eq!(users.len(), 20, "{show}");
        assert_eq!(
            http.ok("GET", &format!("{base}/api/v1/admin/sessions"), &admin, None).as_array().unwrap().len(),
            20
        );
    }
    let leader_metric = |base: &str| {
        let m = http.text(&format!("{base}/metrics"), &admin);
        m.lines().find(|l| l.starts_with("vdim_broker_leader ")).map(String::from).unwrap_or_else(|| panic!("{m}"))
    };
    assert_eq!(
        (leader_metric(&a.base), leader_metric(&b.base)),
        ("vdim_broker_leader 1".into(), "vdim_broker_leader 0".into())
    );
    assert_eq!(audit(&env, "leader.elected").len(), 1, "one election, by the first broker");
}

#[test]
fn the_other_broker_leads_within_10_s_of_a_kill_and_reaps_and_resets_an_expired_session() {
    let t = LibvirtEnv::on("brkfo", Engine::Postgres);
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "brk-fo");
    t.create_pool(&pool, "img", "prod", 1, "test-linux", &["--start"]);
    let alice = add_user(&t.env, "alice", false);
    let admin = add_user(&t.env, "admin", true);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let http = Http::new();
    // The leader on another machine: its death is known only by its lease running out.
    let a = Server::start_elsewhere(&t.env, "qemu:///system", "broker-a");
    until_leader(&http, &a.base, 10);
    let b = Server::start(&t.env, "qemu:///system", &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!leads(&http, &b.base) && leads(&http, &a.base), "exactly one leader");
    // A follower serves sessions too.
    let s = http.ok("POST", &format!("{}/api/v1/pools/{pool}/sessions", b.base), &alice, None);
    let (id, desktop) = (s["id"].as_str().unwrap().to_string(), s["desktop"].as_str().unwrap().to_string());
    let overlay = t.env.home().join("desktops").join(&pool).join(format!("{desktop}.qcow2"));
    let before = inode(&overlay);

    a.crash();
    let took = until_leader(&http, &b.base, 10);
    println!("failover: the other broker led {:.1} s after the leader's kill -9", took.as_secs_f64());
    let elected = audit(&t.env, "leader.elected");
    assert_eq!(elected.len(), 2, "{elected:?}");
    let (first, second) = (&elected[0]["detail"], &elected[1]["detail"]);
    assert_eq!((second["term"].as_i64(), &second["took_over_from"]), (Some(2), &first["broker"]), "{second}");
    assert_ne!(second["broker"], first["broker"]);

    // An expired session is reaped by the new leader, its desktop wiped and booted again.
    t.env.expire_session_now(&id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let show = http.ok("GET", &format!("{}/api/v1/admin/pools/{pool}", b.base), &admin, None);
        let d = &show["desktops"][0];
        if d["assigned_to"].is_null() && d["needs_reset"] == false && inode(&overlay) != before {
            break;
        }
        assert!(Instant::now() < deadline, "the expired session was not reaped and reset: {show}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let expired = audit(&t.env, "session.expire");
    assert!(expired.iter().any(|e| e["detail"]["session"] == id.as_str()), "{expired:?}");
    t.wait_marker(&pool, &desktop, "brk-fo health=ok", 60);
}

/// `vdim promote` as a driver on another machine: its own host name (UTS namespace), so
/// only its heartbeat can tell the leader it is alive. It pauses once its first wave is
/// recorded, desktops about to move.
fn promote_elsewhere(t: &LibvirtEnv, pause: &std::path::Path, soak: &str) -> Child {
    let mut cmd = t.env.cmd_on_host("elsewhere");
    cmd.args([
        "promote", "img", "2", "--to", "prod", "--soak", soak, "--waves", "1,100%", "--force", "--reason", "adopt",
    ])
    .env("VDIM_VIRT_TYPE", "qemu")
    .env("VDIM_TEST_PAUSE_BEFORE", "rollout-wave")
    .env("VDIM_TEST_PAUSE_FILE", pause)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

/// Kills a `vdim promote` mid-wave while a broker leads; returns the rollout as it ended
/// without any command, and its adoption's audit entry.
fn kill_the_driver_mid_wave(t: &LibvirtEnv, pool: &str, v2: &str, soak: &str) -> (Value, Value) {
    marker_image(&t.env, "img", "brk-ad-v1");
    t.create_pool(pool, "img", "prod", 2, "test-linux", &[]);
    seal_marker(&t.env, "img", "brk-ad-v2", v2);
    let http = Http::new();
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    until_leader(&http, &srv.base, 10);
    let pause = t.env.path("promote.pause");
    let mut driver = promote_elsewhere(t, &pause, soak);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pause.exists() {
        assert!(Instant::now() < deadline, "the promotion never reached its first wave");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Alive and beating from "elsewhere": nobody adopts it, no command halts it.
    std::thread::sleep(Duration::from_secs(7));
    let st = t.vdim(&["--json", "rollout", "status", "img", "--limit", "1"]);
    assert_eq!(st.assert_success().json()[0]["state"], "running", "{}", st.stderr());
    assert!(audit(&t.env, "rollout.adopted").is_empty());
    driver.kill().unwrap();
    driver.wait().unwrap();
    let killed = Instant::now();
    let adopted = loop {
        if let Some(e) = audit(&t.env, "rollout.adopted").pop() {
            break e;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "the leader did not adopt the rollout");
        std::thread::sleep(Duration::from_millis(250));
    };
    let silent = killed.elapsed();
    println!("adoption: {:.1} s after the driver's kill -9 (heartbeat silence > 5 s)", silent.as_secs_f64());
    assert!(silent >= Duration::from_secs(4), "adopted after {silent:?}: before its driver fell silent");
    let deadline = Instant::now() + Duration::from_secs(180);
    let end = loop {
        let r = t.vdim_json(&["rollout", "status", "img", "--limit", "1"])[0].clone();
        if r["state"] != "running" {
            break r;
        }
        assert!(Instant::now() < deadline, "the adopted rollout did not end: {r}");
        std::thread::sleep(Duration::from_secs(1));
    };
    drop(srv);
    (end, adopted)
}

#[test]
fn a_promote_killed_mid_wave_is_adopted_by_the_leader_and_completes_without_a_command() {
    let t = LibvirtEnv::on("brkad", Engine::Postgres);
    let pool = t.pool_name("p");
    let (end, adopted) = kill_the_driver_mid_wave(&t, &pool, "ok", "4s");
    assert_eq!(end["state"], "succeeded", "{end}");
    let d = &adopted["detail"];
    assert!(d["from"].as_str().is_some_and(|f| f.starts_with("elsewhere:")), "{adopted}");
    assert!(d["by"].as_str().is_some_and(|b| !b.starts_with("elsewhere:")), "{adopted}");
    assert_eq!(d["wave"], 1, "{adopted}");
    for desk in t.vdim_json(&["pool", "show", &pool])["desktops"].as_array().unwrap() {
        assert_eq!((desk["version"].as_u64(), desk["needs_reset"].as_bool()), (Some(2), Some(false)), "{desk}");
    }
    assert_eq!(t.vdim_json(&["pool", "show", &pool])["version"], 2);
}

#[test]
fn a_promote_of_a_crashing_version_killed_mid_wave_is_adopted_and_reverted_without_a_command() {
    let t = LibvirtEnv::new("brkrv");
    let pool = t.pool_name("p");
    // A long soak: the crash, not its end, decides.
    let (end, adopted) = kill_the_driver_mid_wave(&t, &pool, "panic", "60s");
    assert_eq!(end["state"], "failed", "{end}");
    assert!(adopted["detail"]["from"].as_str().is_some_and(|f| f.starts_with("elsewhere:")), "{adopted}");
    for desk in t.vdim_json(&["pool", "show", &pool])["desktops"].as_array().unwrap() {
        assert_eq!(desk["version"].as_u64(), Some(1), "{desk}");
    }
    assert!(!audit(&t.env, "rollout.failed").is_empty());
}
