//! Promotion and canary rollouts on the real libvirt daemon, with test guests whose disk
//! marker decides whether they boot healthy or panic.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn desktops(t: &LibvirtEnv, pool: &str) -> Vec<serde_json::Value> {
    t.vdim_json(&["pool", "show", pool])["desktops"].as_array().unwrap().clone()
}

fn status(t: &LibvirtEnv) -> serde_json::Value {
    t.vdim_json(&["rollout", "status", "img", "--limit", "1"])[0].clone()
}

fn overlay_inode(d: &serde_json::Value) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(d["overlay"].as_str().unwrap()).unwrap().ino()
}

#[test]
fn a_good_version_goes_to_test_then_prod_in_waves_and_can_be_rolled_back_at_once() {
    let t = LibvirtEnv::new("good");
    let (tp, pp) = (t.pool_name("t"), t.pool_name("p"));
    marker_image(&t.env, "img", "good-v1");
    t.create_pool(&tp, "img", "test", 1, "test-linux", &["--start"]);
    t.create_pool(&pp, "img", "prod", 4, "test-linux", &["--start"]);
    seal_marker(&t.env, "img", "good-v2", "ok");
    // Gates: prod only after test; dev is not a promotion target; no such version.
    t.vdim(&["promote", "img", "2", "--to", "prod"]).assert_failure().assert_stderr_contains("has not run on test");
    t.vdim(&["promote", "img", "2", "--to", "dev"]).assert_failure().assert_stderr_contains("vdim image seal");
    t.vdim(&["promote", "img", "9", "--to", "test"]).assert_exit_code(4).assert_stderr_contains("has no version 9");
    t.vdim(&["promote", "img", "2", "--to", "prod", "--force"])
        .assert_failure()
        .assert_stderr_contains("--force needs --reason");

    let r = t.vdim_json(&["promote", "img", "2", "--to", "test", "--soak", "8s"]);
    assert_eq!(r["state"], "succeeded", "{r}");
    let r = t.vdim_json(&["promote", "img", "2", "--to", "prod", "--soak", "8s", "--waves", "1,50%,100%"]);
    assert_eq!(r["state"], "succeeded", "{r}");
    let moved: Vec<u64> = r["waves"].as_array().unwrap().iter().map(|w| w["moved"].as_u64().unwrap()).collect();
    assert_eq!(moved, [1, 1, 2], "canary first, then half, then everyone: {r}");
    assert!(r["waves"].as_array().unwrap().iter().all(|w| w["failed"] == 0));
    for d in desktops(&t, &pp) {
        assert_eq!(d["version"], 2);
        t.wait_marker(&pp, d["name"].as_str().unwrap(), "good-v2", 60);
    }
    t.vdim(&["promote", "img", "1", "--to", "prod"]).assert_failure().assert_stderr_contains("promoting backwards");
    let audit = t.vdim_json(&["audit", "--image", "img"]);
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "rollout.start").count(), 2);
    assert_eq!(actions.iter().filter(|a| **a == "rollout.wave").count(), 4, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == "rollout.succeeded").count(), 2);

    // The emergency: the whole channel and its pools back at once, in-use desktop at logoff.
    let alice = t.vdim_json(&["pool", "assign", &pp, "alice"]);
    let r = t.vdim_json(&["rollback", "--image", "img", "--channel", "prod"]);
    assert_eq!(r["version"], 1);
    assert_eq!(r["pools"][&pp]["at_logoff"], serde_json::json!([alice["name"]]));
    assert_eq!(r["pools"][&pp]["moved_now"].as_array().unwrap().len(), 3);
    let h = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(h["versions"][0]["channels"], serde_json::json!(["prod"]));
    for d in desktops(&t, &pp) {
        assert_eq!(d["will_run"], 1, "{d}");
    }
    t.vdim(&["rollout", "halt", "img"]).assert_failure().assert_stderr_contains("no rollout of 'img' is running");
}

#[test]
fn a_crashing_version_is_caught_in_the_first_wave_and_undone() {
    let t = LibvirtEnv::new("bad");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "bad-v1");
    t.create_pool(&pp, "img", "prod", 4, "test-linux", &["--start"]);
    let before = desktops(&t, &pp);
    for d in &before {
        t.wait_marker(&pp, d["name"].as_str().unwrap(), "bad-v1", 120);
    }
    seal_marker(&t.env, "img", "bad-v2", "panic");
    let started = Instant::now();
    let r = t.vdim(&[
        "--json",
        "promote",
        "img",
        "2",
        "--to",
        "prod",
        "--soak",
        "60s",
        "--force",
        "--reason",
        "test the canary",
    ]);
    let took = started.elapsed();
    // A failed rollout is a conflict (5), not an internal error (1): scripts can tell it apart.
    r.assert_exit_code(5).assert_stderr_contains("crashed (panicked)");
    let rep = r.json();
    assert_eq!(rep["state"], "failed");
    assert!(took < Duration::from_secs(60), "a crash stops the wave at once, not after the soak: {took:?}");
    let failures = rep["report"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{rep}");
    let victim = failures[0]["desktop"].as_str().unwrap().to_string();
    assert!(failures[0]["how"].as_str().unwrap().contains("crashed (panicked)"));
    println!(
        "bad version: crash event → verdict {} ms, verdict → desktops running the previous version {} ms (rollout took {:.1} s)",
        rep["report"]["event_to_verdict_ms"],
        rep["report"]["restore_ms"],
        took.as_secs_f64()
    );
    // Only the canary moved; the others never left version 1 (same overlay file).
    assert_eq!(rep["waves"][0]["moved"], 1);
    assert!(rep["waves"].as_array().unwrap()[1..].iter().all(|w| w["moved"] == 0));
    let after = desktops(&t, &pp);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["version"], 1, "{a}");
        assert!(a["state"].as_str().unwrap().starts_with("running"), "{a}");
        if a["name"] != victim.as_str() {
            assert_eq!(overlay_inode(a), overlay_inode(b), "{} was touched", a["name"]);
        }
    }
    t.wait_marker(&pp, &victim, "bad-v1", 120);
    let h = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(h["versions"][1]["status"], "failed");
    assert_eq!(h["versions"][0]["channels"], serde_json::json!(["test", "prod"]), "the channel never moved");
    let st = status(&t);
    let wave1 = &st["waves"][0]["desktops"][0];
    assert_eq!(wave1["desktop"], victim.as_str());
    assert!(wave1["detail"].as_str().unwrap().contains("crashed (panicked)"), "{st}");
    t.vdim(&["promote", "img", "2", "--to", "prod", "--soak", "5s"])
        .assert_failure()
        .assert_stderr_contains("failed a rollout");
    let actions: Vec<String> = t
        .vdim_json(&["audit", "--image", "img"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert!(actions.contains(&"rollout.failed".to_string()), "{actions:?}");
}

#[test]
fn a_vdim_killed_mid_wave_is_found_by_the_next_command_and_resumed() {
    let t = LibvirtEnv::new("kill");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "kill-v1");
    t.create_pool(&pp, "img", "prod", 3, "test-linux", &[]);
    seal_marker(&t.env, "img", "kill-v2", "ok");
    let mut child = t
        .env
        .cmd()
        .env("VDIM_VIRT_TYPE", "qemu")
        .args([
            "promote",
            "img",
            "2",
            "--to",
            "prod",
            "--soak",
            "30s",
            "--waves",
            "1,100%",
            "--force",
            "--reason",
            "kill test",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first wave soaks, then kill vdim without warning.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = t.vdim(&["--json", "rollout", "status", "img"]);
        if st.out.status.success() && st.stdout().contains("\"soaking\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout never reached its soak");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second promotion of the same image while one runs is refused.
    t.vdim(&["promote", "img", "2", "--to", "prod", "--force", "--reason", "x"])
        .assert_failure()
        .assert_stderr_contains("busy");
    child.kill().unwrap();
    child.wait().unwrap();

    let st = t.vdim(&["--json", "rollout", "status", "img", "--limit", "1"]);
    st.assert_success().assert_stderr_contains("was interrupted in wave 1");
    let st = st.json();
    assert_eq!(st[0]["state"], "halted", "{st}");
    assert!(st[0]["report"]["interrupted"].is_object());
    t.vdim(&["promote", "img", "2", "--to", "prod", "--force", "--reason", "x"])
        .assert_failure()
        .assert_stderr_contains("is not finished");
    let r = t.vdim_json(&["rollout", "resume", "img"]);
    assert_eq!(r["state"], "succeeded", "{r}");
    for d in desktops(&t, &pp) {
        assert_eq!((d["version"].as_u64(), d["needs_reset"].as_bool()), (Some(2), Some(false)), "{d}");
    }
    assert_eq!(t.vdim_json(&["pool", "show", &pp])["version"], 2);
}

#[test]
fn halt_stops_between_waves_keeps_what_moved_and_resume_finishes() {
    let t = LibvirtEnv::new("halt");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "halt-v1");
    t.create_pool(&pp, "img", "prod", 2, "test-linux", &[]);
    seal_marker(&t.env, "img", "halt-v2", "ok");
    let child = t
        .env
        .cmd()
        .env("VDIM_VIRT_TYPE", "qemu")
        .args([
            "--json",
            "promote",
            "img",
            "2",
            "--to",
            "prod",
            "--soak",
            "8s",
            "--waves",
            "1,100%",
            "--force",
            "--reason",
            "halt test",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !t.vdim(&["--json", "rollout", "status", "img"]).stdout().contains("\"soaking\"") {
        assert!(Instant::now() < deadline, "the rollout never reached its soak");
        std::thread::sleep(Duration::from_millis(200));
    }
    t.vdim_json(&["rollout", "halt", "img"]);
    t.vdim(&["rollout", "halt", "img"]).assert_failure().assert_stderr_contains("is halted, not running");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "an admin's halt is not a failure");
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["state"], "halted", "{rep}");
    assert_eq!((rep["waves"][0]["healthy"].as_u64(), rep["waves"][1]["moved"].as_u64()), (Some(1), Some(0)), "{rep}");
    let versions: Vec<u64> = desktops(&t, &pp).iter().map(|d| d["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, [2, 1], "the canary keeps v2, the rest waits");
    let r = t.vdim_json(&["rollout", "resume", "img"]);
    assert_eq!(r["state"], "succeeded");
    assert!(desktops(&t, &pp).iter().all(|d| d["version"] == 2));
}

#[test]
fn where_the_profile_has_a_guest_agent_a_silent_agent_fails_the_wave() {
    let t = LibvirtEnv::new("agent");
    let pp = t.pool_name("p");
    marker_image(&t.env, "img", "agent-v1");
    t.create_pool(&pp, "img", "prod", 2, "test-linux-agent", &["--start"]);
    // A good version: the guest's agent answers at the end of each soak.
    seal_marker(&t.env, "img", "agent-v2", "ok");
    let r = t.vdim_json(&[
        "promote",
        "img",
        "2",
        "--to",
        "prod",
        "--soak",
        "15s",
        "--waves",
        "1,100%",
        "--force",
        "--reason",
        "agent test",
    ]);
    assert_eq!(r["state"], "succeeded", "{r}");
    // A version that boots and runs but whose agent never answers (a hung service, say).
    seal_marker(&t.env, "img", "agent-v3 agent=off", "ok");
    let r = t.vdim(&[
        "--json",
        "promote",
        "img",
        "3",
        "--to",
        "prod",
        "--soak",
        "15s",
        "--waves",
        "1,100%",
        "--force",
        "--reason",
        "agent test",
    ]);
    r.assert_failure().assert_stderr_contains("guest agent did not answer");
    let rep = r.json();
    assert_eq!(rep["state"], "failed");
    assert_eq!(rep["waves"][0]["moved"], 1, "caught in the canary wave: {rep}");
    assert!(desktops(&t, &pp).iter().all(|d| d["version"] == 2), "everything back on v2");
}
