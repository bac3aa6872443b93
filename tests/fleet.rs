//! Fleet speed on the real libvirt daemon (qemu:///system, TCG guests): operations on many
//! running desktops make their libvirt calls at once, and one desktop's failure does not stop
//! the others.

mod common;
use common::*;
use std::collections::BTreeMap;

/// The desktops of a pool, by name.
fn desktops(t: &LibvirtEnv, pool: &str) -> Vec<serde_json::Value> {
    t.vdim_json(&["pool", "show", pool])["desktops"].as_array().unwrap().clone()
}

fn names(t: &LibvirtEnv, pool: &str) -> Vec<String> {
    desktops(t, pool).iter().map(|d| d["name"].as_str().unwrap().to_string()).collect()
}

/// Per domain, the (begin, end) line numbers of its `destroying` … `destroyed` in vdim's debug
/// log: two domains whose spans interleave were being destroyed at the same time.
fn destroy_spans(log: &str) -> BTreeMap<String, (usize, usize)> {
    let mut spans: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, line) in log.lines().enumerate() {
        let Some(domain) = line.split("domain=").nth(1).and_then(|r| r.split_whitespace().next()) else { continue };
        if line.contains(" destroying") {
            spans.entry(domain.to_string()).or_insert((i, usize::MAX)).0 = i;
        } else if line.contains(" destroyed") {
            spans.entry(domain.to_string()).or_insert((0, i)).1 = i;
        }
    }
    spans
}

#[test]
fn a_running_pool_rolls_back_with_its_desktops_at_once_and_every_guest_boots_the_previous_version() {
    let t = LibvirtEnv::new("fleet");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "fleet-v1");
    t.create_pool(&pool, "img", "dev", 6, "test-linux", &["--start"]);
    let all = names(&t, &pool);
    for d in &all {
        t.wait_marker(&pool, d, "fleet-v1", 240);
    }
    seal_marker(&t.env, "img", "fleet-v2", "ok");
    t.vdim_json(&["pool", "update", &pool]);
    for d in &all {
        t.wait_marker(&pool, d, "fleet-v2", 240);
    }

    // The on-call admin's one command, with vdim's libvirt calls logged.
    let out = t
        .env
        .cmd()
        .env("VDIM_VIRT_TYPE", "qemu")
        .env("VDIM_LOG", "vdim=debug")
        .args(["--json", "rollback", &pool])
        .output()
        .expect("run vdim");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "rollback failed: {log}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(2), Some(1)));
    assert_eq!(r["failed"].as_array().map(Vec::len), Some(0), "{r}");
    let mut started: Vec<String> =
        r["started"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    started.sort();
    assert_eq!(started, all, "every desktop booted again");

    // At once: some desktop's destroy began while another's was still in progress.
    let spans = destroy_spans(&log);
    assert_eq!(spans.len(), all.len(), "each running desktop destroyed once: {spans:?}\n{log}");
    let overlapping =
        spans.iter().filter(|(a, (b1, e1))| spans.iter().any(|(o, (b2, _))| o != *a && b2 > b1 && b2 < e1)).count();
    assert!(overlapping >= 2, "destroys overlapped, not one after another: {spans:?}");

    for d in desktops(&t, &pool) {
        assert_eq!((d["version"].as_u64(), d["needs_reset"].as_bool()), (Some(1), Some(false)), "{d}");
        assert!(d["state"].as_str().unwrap().starts_with("running"), "{d}");
    }
    for d in &all {
        t.wait_marker(&pool, d, "fleet-v1", 240);
    }
}

#[test]
fn a_desktop_whose_destroy_fails_does_not_stop_the_others_and_the_next_command_heals_it() {
    let t = LibvirtEnv::new("fleetfail");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "ff-v1");
    t.create_pool(&pool, "img", "dev", 4, "test-linux", &["--start"]);
    seal_marker(&t.env, "img", "ff-v2", "ok");
    t.vdim_json(&["pool", "update", &pool]);
    let all = names(&t, &pool);
    for d in &all {
        t.wait_marker(&pool, d, "ff-v2", 240);
    }
    let victim = all[1].clone();

    // libvirt fails to destroy one desktop (injected: libvirt has no way to make it fail).
    let out = t
        .env
        .cmd()
        .env("VDIM_VIRT_TYPE", "qemu")
        .env("VDIM_TEST_FAIL", format!("destroy:{victim}"))
        .args(["--json", "rollback", &pool])
        .output()
        .expect("run vdim");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "the command fails (internal: libvirt's error): {stderr}");
    assert!(stderr.contains(&victim) && stderr.contains("destroy"), "the error names the desktop: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report is printed all the same");
    let failed: Vec<&str> = r["failed"].as_array().unwrap().iter().map(|f| f["desktop"].as_str().unwrap()).collect();
    assert_eq!(failed, [victim.as_str()]);
    let others: Vec<String> = all.iter().filter(|d| **d != victim).cloned().collect();
    let mut started: Vec<String> =
        r["started"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    started.sort();
    assert_eq!(started, others, "the others went on");
    for d in &others {
        t.wait_marker(&pool, d, "ff-v1", 240);
    }
    let show = desktops(&t, &pool);
    let v = show.iter().find(|d| d["name"] == victim.as_str()).unwrap();
    assert_eq!((v["version"].as_u64(), v["needs_reset"].as_bool()), (Some(1), Some(true)), "its move is due: {v}");
    // It still runs the version it had; the catalog never hands it out before its reset.
    assert_eq!(t.wait_marker(&pool, &victim, "ff-v2", 5), "GUEST-MARKER: VDIM-TEST ff-v2 health=ok");

    // The next command on the pool finishes its move.
    let r = t.vdim_json(&["pool", "start", &pool]);
    assert_eq!(r["started"], serde_json::json!([victim]), "{r}");
    t.wait_marker(&pool, &victim, "ff-v1", 240);
    for d in desktops(&t, &pool) {
        assert_eq!((d["version"].as_u64(), d["needs_reset"].as_bool()), (Some(1), Some(false)), "{d}");
    }
}

#[test]
fn a_failed_waves_desktops_of_every_pool_go_back_at_once() {
    let t = LibvirtEnv::new("fleetrev");
    let (pa, pb) = (t.pool_name("a"), t.pool_name("b"));
    marker_image(&t.env, "img", "fr-v1");
    for p in [&pa, &pb] {
        t.create_pool(p, "img", "prod", 2, "test-linux", &["--start"]);
    }
    seal_marker(&t.env, "img", "fr-v2", "panic");
    let out = t
        .env
        .cmd()
        .env("VDIM_VIRT_TYPE", "qemu")
        .env("VDIM_LOG", "vdim=debug")
        .args(["--json", "promote", "img", "2", "--to", "prod", "--waves", "100%", "--soak", "60s", "--force"])
        .args(["--reason", "a wave over two pools"])
        .output()
        .expect("run vdim");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(5), "a failed rollout: {log}");
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["state"], "failed");
    assert_eq!(rep["waves"][0]["moved"], 4, "{rep}");
    // The revert's destroys (each desktop's last) overlapped, across both pools.
    let spans = destroy_spans(&log);
    assert_eq!(spans.len(), 4, "{spans:?}");
    let overlapping: Vec<&String> = spans
        .iter()
        .filter(|(a, (b1, e1))| spans.iter().any(|(o, (b2, _))| o != *a && b2 > b1 && b2 < e1))
        .map(|(a, _)| a)
        .collect();
    assert!(overlapping.len() >= 2, "the revert stopped desktops together: {spans:?}");
    for p in [&pa, &pb] {
        for d in desktops(&t, p) {
            assert_eq!((d["version"].as_u64(), d["needs_reset"].as_bool()), (Some(1), Some(false)), "{d}");
            t.wait_marker(p, d["name"].as_str().unwrap(), "fr-v1", 240);
        }
    }
}

/// Runs `vdim args` on a pseudo-terminal (util-linux `script`), as an admin at a console would.
fn on_a_terminal(t: &LibvirtEnv, args: &[&str]) -> String {
    let mut line = format!("{} ", env!("CARGO_BIN_EXE_vdim"));
    line += &args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" ");
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("VDIM_HOME", t.env.home())
        .env("VDIM_VIRT_TYPE", "qemu")
        .env_remove("VDIM_CONNECT")
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?} failed: {text}");
    text
}

#[test]
fn on_a_terminal_pool_start_and_stop_show_progress_and_end_with_each_desktop() {
    let t = LibvirtEnv::new("fleettty");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "tty-v1");
    t.create_pool(&pool, "img", "dev", 3, "test-linux", &[]);
    let all = names(&t, &pool);

    let text = on_a_terminal(&t, &["pool", "start", &pool]);
    for step in 1..=3 {
        assert!(text.contains(&format!("started {step}/3 desktops")), "progress {step}/3: {text:?}");
    }
    assert!(text.contains(&format!("started (3): {}", all.join(", "))), "each desktop in the summary: {text:?}");
    let text = on_a_terminal(&t, &["pool", "stop", &pool, "--force"]);
    assert!(text.contains("stopped 3/3 desktops"), "{text:?}");
    assert!(text.contains(&format!("stopped (3): {}", all.join(", "))), "{text:?}");
    // Not on a terminal (and with --json): no progress line, only the report.
    let r = t.vdim(&["--json", "pool", "start", &pool]);
    r.assert_success();
    assert!(!r.stderr().contains("desktops"), "{}", r.stderr());
    assert_eq!(r.json()["started"].as_array().map(Vec::len), Some(3));
}
