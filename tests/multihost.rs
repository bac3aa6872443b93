//! Desktops over several libvirt hosts (fake hosts on this machine: their own libvirtd in
//! network and mount namespaces, reached by qemu+tcp; TCG guests): placement, layers before
//! desktops, rollouts and rollback over hosts, drain, and a dead host's desktops made again
//! elsewhere only once it is fenced.

mod common;
use common::hosts::FakeHosts;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `vdim host add hv<i>` for every fake host, each with a layer store in its own directory.
fn add_hosts(t: &LibvirtEnv, fake: &FakeHosts, fence: &[Option<String>]) -> Vec<String> {
    let mut names = vec![];
    for (i, h) in fake.hosts().iter().enumerate() {
        let name = format!("hv{i}");
        let store = h.dir.join("vdim-layers").display().to_string();
        let mut args = vec!["host", "add", name.as_str(), h.uri.as_str(), "--store-path", store.as_str()];
        if let Some(Some(f)) = fence.get(i) {
            args.extend(["--fence-command", f.as_str()]);
        }
        t.vdim_json(&args);
        names.push(name);
    }
    names
}

fn desktops(t: &LibvirtEnv, pool: &str) -> Vec<serde_json::Value> {
    t.vdim_json(&["pool", "show", pool])["desktops"].as_array().unwrap().clone()
}

/// Desktop name -> host name, as `pool show` says.
fn placement(t: &LibvirtEnv, pool: &str) -> BTreeMap<String, String> {
    desktops(t, pool)
        .iter()
        .map(|d| (d["name"].as_str().unwrap().to_string(), d["host"].as_str().unwrap_or("-").to_string()))
        .collect()
}

/// The serial log of a desktop on a host: beside its overlay in the host's desktop store.
fn serial_log(d: &serde_json::Value) -> PathBuf {
    let overlay = Path::new(d["overlay"].as_str().unwrap());
    overlay.with_file_name(format!("{}.serial.log", d["name"].as_str().unwrap()))
}

fn wait_markers(t: &LibvirtEnv, pool: &str, want: &str) {
    for d in desktops(t, pool) {
        wait_serial(&serial_log(&d), d["name"].as_str().unwrap(), want, 300);
    }
}

/// Running domains of a fake host whose names start with `prefix`.
fn running_on(uri: &str, prefix: &str) -> Vec<String> {
    domains_on(uri, prefix, &[])
}

/// Defined domains (running or not) of a fake host whose names start with `prefix`.
fn defined_on(uri: &str, prefix: &str) -> Vec<String> {
    domains_on(uri, prefix, &["--all"])
}

fn domains_on(uri: &str, prefix: &str, flags: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("timeout")
        .args(["10", "virsh", "-c", uri, "list", "--name"])
        .args(flags)
        .output()
        .expect("virsh");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = sh("sha256sum", &[path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn layer_digests(t: &LibvirtEnv, image: &str) -> BTreeMap<u64, String> {
    let h = t.vdim_json(&["image", "history", image]);
    h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["number"].as_u64().unwrap(), v["digest"].as_str().unwrap().to_string()))
        .collect()
}

fn host_layers(t: &LibvirtEnv, host: &str) -> BTreeSet<String> {
    t.vdim_json(&["host", "show", host])["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[0].as_str().unwrap().to_string())
        .collect()
}

fn audit_count(t: &LibvirtEnv, action: &str) -> usize {
    t.vdim_json(&["audit"]).as_array().unwrap().iter().filter(|e| e["action"] == action).count()
}

#[test]
fn a_pool_over_three_hosts_boots_rolls_out_rolls_back_and_drains() {
    let fake = FakeHosts::up(3);
    let t = LibvirtEnv::new("mh");
    let hosts = add_hosts(&t, &fake, &[]);
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "mh-v1");
    let v1 = layer_digests(&t, "img")[&1].clone();

    t.create_pool(&pool, "img", "test", 6, "test-linux", &["--start", "--hosts", &hosts.join(",")]);
    let placed = placement(&t, &pool);
    for h in &hosts {
        assert_eq!(placed.values().filter(|p| *p == h).count(), 2, "two desktops on each host: {placed:?}");
    }
    // Each host holds exactly the verified chain its desktops need, and runs exactly its own.
    for (i, h) in hosts.iter().enumerate() {
        assert_eq!(host_layers(&t, h), BTreeSet::from([v1.clone()]), "{h}");
        let mut running = running_on(fake.uris()[i], &format!("vdim-{pool}-"));
        running.sort();
        let mut mine: Vec<String> = placed.iter().filter(|(_, p)| *p == h).map(|(d, _)| d.clone()).collect();
        mine.sort();
        assert_eq!(running, mine, "{h} runs its own desktops");
    }
    assert!(t.domains().is_empty(), "nothing on the local libvirt: {:?}", t.domains());
    wait_markers(&t, &pool, "mh-v1");

    // v2 reaches every host before desktops move. A copy of it placed on hv1 earlier and
    // changed since (one flipped byte) is found at the promotion and replaced.
    seal_marker(&t.env, "img", "mh-v2", "ok");
    let v2 = layer_digests(&t, "img")[&2].clone();
    t.vdim_json(&["host", "sync", "hv1", "--image", "img", "--version", "2"]);
    let copy = fake.hosts()[1].dir.join("vdim-layers").join(format!("{v2}.qcow2"));
    let mut bytes = std::fs::read(&copy).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&copy, &bytes).unwrap();
    assert_ne!(sha256(&copy), v2);

    let r = t.vdim_json(&["promote", "img", "2", "--to", "test", "--soak", "5s", "--waves", "2,4,100%"]);
    assert_eq!(r["state"], "succeeded", "{r}");
    // The first wave stays on one host; the next takes one desktop from each of the others.
    let hosts_of = |w: usize| -> BTreeSet<String> {
        r["waves"][w]["desktops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| placed[d["desktop"].as_str().unwrap()].clone())
            .collect()
    };
    assert_eq!(r["waves"][0]["moved"], 2, "{r}");
    assert_eq!(hosts_of(0).len(), 1, "canary wave on one host: {r}");
    assert_eq!(r["waves"][1]["moved"], 2, "{r}");
    assert_eq!(hosts_of(1).len(), 2, "spread over the other hosts: {r}");
    assert!(hosts_of(1).is_disjoint(&hosts_of(0)), "{r}");
    assert_eq!(sha256(&copy), v2, "the changed copy was replaced before any desktop moved onto it");
    for h in &hosts {
        assert_eq!(host_layers(&t, h), BTreeSet::from([v1.clone(), v2.clone()]), "{h}");
    }
    let audit = t.vdim_json(&["audit"]);
    let syncs: Vec<&serde_json::Value> =
        audit.as_array().unwrap().iter().filter(|e| e["action"] == "host.sync").collect();
    assert!(
        syncs.iter().any(|e| e["detail"]["host"] == "hv1"
            && e["version"] == 2
            && e["detail"]["quarantined"][0][0] == v2.as_str()
            && e["detail"]["verified"].as_array().unwrap().contains(&serde_json::json!(v2))),
        "hv1's changed copy found and replaced: {syncs:?}"
    );
    let first_sync = audit.as_array().unwrap().iter().position(|e| e["action"] == "host.sync" && e["version"] == 2);
    let first_wave = audit.as_array().unwrap().iter().position(|e| e["action"] == "rollout.wave");
    assert!(first_sync < first_wave, "replicated before the first wave: {audit}");
    for d in desktops(&t, &pool) {
        assert_eq!(d["version"], 2, "{d}");
    }
    wait_markers(&t, &pool, "mh-v2");

    rollback_waits_for_a_good_copy(&t, &fake, &pool, &v1);
    drain_hv2(&t, &fake, &pool);

    // Host gc: a version no pool there needs goes; the channel's and the rollback window's stay.
    seal_marker(&t.env, "img", "mh-v3", "ok");
    let v3 = layer_digests(&t, "img")[&3].clone();
    t.vdim_json(&["host", "sync", "hv0", "--image", "img", "--version", "3"]);
    assert!(host_layers(&t, "hv0").contains(&v3));
    let r = t.vdim_json(&["host", "gc", "hv0"]);
    assert_eq!(r["removed"], serde_json::json!([v3]), "{r}");
    assert_eq!(host_layers(&t, "hv0"), BTreeSet::from([v1.clone(), v2.clone()]));
    assert!(!fake.hosts()[0].dir.join("vdim-layers").join(format!("{v3}.qcow2")).exists());
}

/// A copy of v1 changed on hv2's disk: verify forgets it, rollback copies nothing and leaves
/// hv2's desktops due (pending there), a good copy again and the next command finishes them.
fn rollback_waits_for_a_good_copy(t: &LibvirtEnv, fake: &FakeHosts, pool: &str, v1: &str) {
    // hv2's copy of v1 changes on its disk: `host verify` finds it and forgets it there, the
    // pool shows v1 pending on hv2, and no desktop there is made from it.
    let v1_on_hv2 = fake.hosts()[2].dir.join("vdim-layers").join(format!("{v1}.qcow2"));
    let mut bytes = std::fs::read(&v1_on_hv2).unwrap();
    bytes[4096] ^= 1;
    std::fs::write(&v1_on_hv2, &bytes).unwrap();
    t.vdim_json(&["host", "verify", "hv2"]);
    assert!(!host_layers(t, "hv2").contains(v1), "the changed copy no longer counts");
    let shown = t.vdim_json(&["pool", "show", pool]);
    assert_eq!(shown["pending"], serde_json::json!([["hv2", 2]]), "v2 stands on v1: {shown}");
    let status = t.vdim_json(&["rollout", "status", "img", "--limit", "1"]);
    assert_eq!(status[0]["pending"], serde_json::json!([["hv2", pool]]), "{status}");

    // Rollback over three hosts copies nothing; hv2's desktops wait for a good copy of v1.
    let syncs_before = audit_count(t, "host.sync");
    let on_hv2: Vec<String> = placement(t, pool).into_iter().filter(|(_, h)| h == "hv2").map(|(d, _)| d).collect();
    let r = t.vdim(&["--json", "rollback", pool]);
    r.assert_exit_code(5);
    let report = r.json();
    let mut failed: Vec<String> =
        report["failed"].as_array().unwrap().iter().map(|f| f["desktop"].as_str().unwrap().to_string()).collect();
    failed.sort();
    assert_eq!(failed, on_hv2, "{report}");
    assert!(report["failed"][0]["error"].as_str().unwrap().contains("pending on host 'hv2'"), "{report}");
    assert_eq!(audit_count(t, "host.sync"), syncs_before, "no copy at rollback");
    for d in desktops(t, pool).iter().filter(|d| d["host"] == "hv2") {
        assert_eq!(d["needs_reset"], true, "left as it was, its reset due: {d}");
    }
    // A good copy again, and the next command finishes the move.
    t.vdim_json(&["host", "sync", "hv2"]);
    assert_eq!(sha256(&v1_on_hv2), v1);
    t.vdim_json(&["pool", "start", pool]);
    for d in desktops(t, pool) {
        assert_eq!((d["version"].as_u64(), d["needs_reset"].as_bool()), (Some(1), Some(false)), "{d}");
    }
    wait_markers(t, pool, "mh-v1");
}

/// Drain hv2: its desktops go to the other hosts, nothing of them stays there.
fn drain_hv2(t: &LibvirtEnv, fake: &FakeHosts, pool: &str) {
    // Drain hv2: its two desktops go to hv0 and hv1, booted there, gone from hv2.
    let on_hv2: Vec<String> = placement(t, pool).into_iter().filter(|(_, h)| h == "hv2").map(|(d, _)| d).collect();
    let r = t.vdim_json(&["host", "drain", "hv2"]);
    let mut moved: Vec<String> =
        r["moved"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    moved.sort();
    assert_eq!(moved, on_hv2, "{r}");
    let placed = placement(t, pool);
    assert!(placed.values().all(|h| h != "hv2"), "{placed:?}");
    assert!(defined_on(fake.uris()[2], &format!("vdim-{pool}-")).is_empty(), "nothing left on hv2");
    let s = t.vdim_json(&["host", "show", "hv2"]);
    assert_eq!(s["state"], "draining", "{s}");
    wait_markers(t, pool, "mh-v1");
    // Nothing runs twice: each desktop runs on exactly one host.
    let mut all: Vec<String> = (0..3).flat_map(|i| running_on(fake.uris()[i], &format!("vdim-{pool}-"))).collect();
    all.sort();
    let names: Vec<String> = placed.keys().cloned().collect();
    assert_eq!(all, names);
    t.vdim(&["host", "remove", "hv0"]).assert_exit_code(5).assert_stderr_contains("drain it first");
}

/// Waits until every desktop of `pool` runs on a host other than `gone`, each on exactly one.
fn wait_moved_off(t: &LibvirtEnv, fake: &FakeHosts, pool: &str, gone: usize, secs: u64) -> Duration {
    let start = Instant::now();
    let names: Vec<String> = placement(t, pool).keys().cloned().collect();
    loop {
        let mut running: Vec<String> = (0..fake.hosts().len())
            .filter(|i| *i != gone)
            .flat_map(|i| running_on(fake.uris()[i], &format!("vdim-{pool}-")))
            .collect();
        running.sort();
        if running == names {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "not all of {names:?} run elsewhere: {running:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_killed_host_with_a_fence_command_has_its_desktops_back_elsewhere_and_users_get_one() {
    let fake = FakeHosts::up(3);
    let t = LibvirtEnv::new("fo");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fake-hosts");
    let fence: Vec<Option<String>> =
        fake.hosts().iter().map(|h| Some(format!("{} kill {}", script.display(), h.number))).collect();
    let hosts = add_hosts(&t, &fake, &fence);
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "fo-v1");
    let listen = ["--display-listen", "0.0.0.0", "--insecure-display"];
    t.create_pool(
        &pool,
        "img",
        "test",
        6,
        "test-linux",
        &[&["--start", "--hosts", &hosts.join(",")][..], &listen].concat(),
    );
    wait_markers(&t, &pool, "fo-v1");
    let alice = t.vdim_json(&["user", "add", "alice"]);
    let token = alice["token"].as_str().unwrap().to_string();
    t.vdim_json(&["pool", "entitle", &pool, "alice"]);
    let srv = serve::Server::start(&t.env, "qemu:///system", &[]);

    // Power failure of hv1: the broker finds it dead, fences it (its command), and makes its
    // desktops again on hv0 and hv2.
    fake.kill(1);
    let took = wait_moved_off(&t, &fake, &pool, 1, 60);
    eprintln!("failover: every desktop running elsewhere {took:?} after the kill");
    assert!(took < Duration::from_secs(30), "failover took {took:?}");
    let placed = placement(&t, &pool);
    assert!(placed.values().all(|h| h != "hv1"), "{placed:?}");
    assert_eq!(t.vdim_json(&["host", "show", "hv1"])["state"], "fenced");
    assert!(fake.pids(1).is_empty(), "hv1 is off");
    wait_markers(&t, &pool, "fo-v1");

    // A thin client gets a desktop at once, through the broker.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-X", "POST", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/api/v1/pools/{pool}/sessions", srv.base))
        .output()
        .unwrap();
    let sess: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let desktop = sess["desktop"].as_str().unwrap_or_else(|| panic!("{sess}\n{}", srv.log()));
    assert!(placed.contains_key(desktop), "{sess}");
    assert!(srv.log().contains("host fenced"), "{}", srv.log());

    // Its console is on its host: the .vv names that host's address, and the display answers there.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/api/v1/sessions/{}/console.vv", srv.base, sess["id"].as_str().unwrap()))
        .output()
        .unwrap();
    let vv = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| vv.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("{vv}"));
    let host_index: usize = placed[desktop].trim_start_matches("hv").parse().unwrap();
    let want = fake.uris()[host_index].split("//").nth(1).unwrap().split('/').next().unwrap().to_string();
    assert_eq!(field("host"), want, "{vv}");
    let port: u16 = field("port").parse().unwrap();
    std::net::TcpStream::connect_timeout(&format!("{want}:{port}").parse().unwrap(), Duration::from_secs(5))
        .expect("the display answers on its host");
}

#[test]
fn a_host_cut_off_without_a_fence_command_keeps_its_desktops_until_an_admin_fences_it() {
    let fake = FakeHosts::up(2);
    let t = LibvirtEnv::new("cut");
    let hosts = add_hosts(&t, &fake, &[]);
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "cut-v1");
    t.create_pool(&pool, "img", "test", 4, "test-linux", &["--start", "--hosts", &hosts.join(",")]);
    wait_markers(&t, &pool, "cut-v1");
    let before = placement(&t, &pool);
    let on_hv1: Vec<String> = before.iter().filter(|(_, h)| *h == "hv1").map(|(d, _)| d.clone()).collect();
    assert_eq!(on_hv1.len(), 2);

    fake.cut(1);
    // Dead by its probes, but not fenced: nothing is made again, anywhere.
    let mut last = serde_json::Value::Null;
    for _ in 0..4 {
        last = t.vdim_json(&["host", "check"]);
    }
    let hv1 = last["probes"].as_array().unwrap().iter().find(|p| p["host"] == "hv1").unwrap().clone();
    assert_eq!(hv1["liveness"], "dead", "{last}");
    assert_eq!(placement(&t, &pool), before, "no replacement without fencing");
    assert!(running_on(fake.uris()[0], &format!("vdim-{pool}-")).iter().all(|d| !on_hv1.contains(d)));
    // Nor may a user be given a desktop there.
    t.vdim(&["pool", "assign", &pool, "bob"]).assert_success();
    t.vdim(&["pool", "assign", &pool, "carol"]).assert_success();
    t.vdim(&["pool", "assign", &pool, "dave"]).assert_failure().assert_stderr_contains("exhausted");

    // The admin confirms it is off: its desktops are made on hv0.
    t.vdim(&["host", "fence", "hv1"]).assert_exit_code(2).assert_stderr_contains("--confirm");
    let r = t.vdim_json(&["host", "fence", "hv1", "--confirm"]);
    let mut moved: Vec<String> =
        r["moved"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    moved.sort();
    assert_eq!(moved, on_hv1, "{r}");
    let mut running = running_on(fake.uris()[0], &format!("vdim-{pool}-"));
    running.sort();
    assert_eq!(running, before.keys().cloned().collect::<Vec<_>>());
    wait_markers(&t, &pool, "cut-v1");

    // hv1 comes back: what was made elsewhere meanwhile is removed there, never run twice.
    fake.heal(1);
    let r = t.vdim_json(&["host", "unfence", "hv1"]);
    let mut removed: Vec<String> =
        r["removed"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    removed.sort();
    assert_eq!(removed, on_hv1, "{r}");
    assert!(defined_on(fake.uris()[1], &format!("vdim-{pool}-")).is_empty());
}
