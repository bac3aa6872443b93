//! `vdim backup` and `vdim restore` through the real binary: a disaster-recovery drill on the
//! real libvirt (TCG guests), a backup beside a process writing the catalog, damaged and
//! missing layers, and the refusals that change nothing.

mod common;
use common::*;
use sha2::Digest;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn vdim_in(env: &Env, home: &Path, args: &[&str]) -> Run {
    let out = env.cmd().env("VDIM_HOME", home).args(args).output().expect("run vdim");
    Run { out, args: args.iter().map(|s| s.to_string()).collect() }
}

fn json_in(env: &Env, home: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let r = vdim_in(env, home, &a);
    r.assert_success();
    r.json()
}

fn sha256(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// (number, digest) of every version of `image`.
fn digests(h: &serde_json::Value) -> Vec<(u64, String)> {
    h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["number"].as_u64().unwrap(), v["digest"].as_str().unwrap().to_string()))
        .collect()
}

/// Files and directories under `dir`, relative, sorted (for "nothing changed" checks).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

/// An image `img` with two versions (markers `<label>-v1`, `<label>-v2`; v2 on dev).
fn two_versions(env: &Env, label: &str) {
    marker_image(env, "img", &format!("{label}-v1"));
    seal_marker(env, "img", &format!("{label}-v2"), "ok");
}

#[test]
fn disaster_recovery_drill_brings_back_images_pools_users_and_running_desktops() {
    dr_drill(Engine::Sqlite);
}

#[test]
fn disaster_recovery_drill_on_a_postgresql_catalog() {
    dr_drill(Engine::Postgres);
}

fn dr_drill(engine: Engine) {
    let t = LibvirtEnv::on("dr", engine);
    let pool = t.pool_name("p");
    let kept = t.pool_name("k");
    two_versions(&t.env, "dr");
    t.create_pool(&pool, "img", "dev", 2, "test-linux", &["--start"]);
    t.create_pool(&kept, "img", "dev", 1, "test-linux", &["--persistent", "--start"]);
    t.vdim_json(&["user", "add", "alice"]);
    t.vdim_json(&["pool", "entitle", &pool, "alice"]);
    let given = t.vdim_json(&["pool", "assign", &pool, "alice"])["name"].as_str().unwrap().to_string();
    for d in ["001", "002"] {
        t.wait_marker(&pool, &format!("vdim-{pool}-{d}"), "dr-v2", 120);
    }
    let history = t.vdim_json(&["image", "history", "img"]);

    let dir = t.env.path("backup");
    let b = t.vdim_json(&["backup", dir.to_str().unwrap(), "--layers"]);
    assert_eq!(
        (b["layers"].as_u64(), b["layers_copied"].as_u64(), b["layers_present"].as_u64()),
        (Some(2), Some(2), Some(0)),
        "{b}"
    );
    assert_eq!(
        (b["counts"]["images"].as_u64(), b["counts"]["pools"].as_u64(), b["counts"]["users"].as_u64()),
        (Some(1), Some(2), Some(1))
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("catalog.db")), 0o600);
    for (_, digest) in digests(&history) {
        let layer = dir.join("layers").join(format!("{digest}.qcow2"));
        assert_eq!((sha256(&layer), mode(&layer)), (digest.clone(), 0o440));
    }
    let m = manifest(&dir);
    assert_eq!(m["catalog"]["sha256"].as_str().unwrap(), sha256(&dir.join("catalog.db")));
    assert_eq!(m["catalog"]["engine"], "sqlite", "the copy is a SQLite file whatever it was taken from");
    assert_eq!(m["catalog"]["taken_from"], engine.as_str());

    // The machine is lost: its domains and the whole home go.
    for d in t.domains() {
        let _ = Command::new("virsh").args(["-c", "qemu:///system", "destroy", &d]).output();
        sh("virsh", &["-c", "qemu:///system", "undefine", "--nvram", &d]);
    }
    std::fs::remove_dir_all(t.env.home()).unwrap();
    if let Some(db) = &t.env.db {
        db.wipe();
    }

    let r = t.vdim_json(&["restore", dir.to_str().unwrap()]);
    assert_eq!((r["layers"].as_u64(), r["layers_copied"].as_u64()), (Some(2), Some(2)), "{r}");
    assert_eq!(r["desktops_reset"], 3);
    assert_eq!(r["persistent_desktops"], serde_json::json!([format!("vdim-{kept}-001")]));
    let started: Vec<&str> = r["started"].as_array().unwrap().iter().map(|o| o["pool"].as_str().unwrap()).collect();
    assert_eq!(started, [kept.as_str(), pool.as_str()]);
    assert!(r["not_started"].as_array().unwrap().is_empty(), "{r}");

    t.vdim(&["image", "verify"]).assert_success();
    let restored = t.vdim_json(&["image", "history", "img"]);
    assert_eq!(digests(&restored), digests(&history));
    assert_eq!(restored["versions"][1]["channels"], serde_json::json!(["dev"]));
    let users = t.vdim_json(&["user", "list"]);
    assert_eq!(users[0]["name"], "alice", "{users}");
    assert_eq!(users[0]["pools"], serde_json::json!([pool]), "her entitlement came back");
    for d in ["001", "002"] {
        t.wait_marker(&pool, &format!("vdim-{pool}-{d}"), "dr-v2", 120);
    }
    t.wait_marker(&kept, &format!("vdim-{kept}-001"), "dr-v2", 120);
    let show = t.vdim_json(&["pool", "show", &pool]);
    for d in show["desktops"].as_array().unwrap() {
        assert_eq!(d["version"], 2);
        assert!(d["assigned_to"].is_null(), "{given} was handed back with the old machine: {d}");
        assert!(d["state"].as_str().unwrap().starts_with("running"), "{d}");
    }
    let actions: Vec<String> = t
        .vdim_json(&["audit", "--limit", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert!(actions.iter().any(|a| a == "catalog.restore"), "{actions:?}");

    // A second restore onto the home, no longer empty, is refused and changes nothing.
    let before =
        (tree(&t.env.home()), t.vdim_json(&["audit", "--limit", "1000"]), t.vdim_json(&["pool", "show", &pool]));
    t.vdim(&["restore", dir.to_str().unwrap()])
        .assert_exit_code(5)
        .assert_stderr_contains("is not empty: its catalog holds 1 image, 2 pools, 1 user");
    let after =
        (tree(&t.env.home()), t.vdim_json(&["audit", "--limit", "1000"]), t.vdim_json(&["pool", "show", &pool]));
    assert_eq!(before.0, after.0);
    assert_eq!(before.1, after.1);
    assert_eq!(before.2["desktops"], after.2["desktops"]);

    // The restored pools go as any other.
    for p in [&pool, &kept] {
        t.vdim(&["pool", "delete", p, "--force"]).assert_success();
    }
    assert!(t.domains().is_empty(), "{:?}", t.domains());
}

#[test]
fn a_backup_beside_a_process_writing_the_catalog_is_one_consistent_state() {
    let env = Env::new();
    two_versions(&env, "busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, home) = (stop.clone(), env.home());
        let bin = env!("CARGO_BIN_EXE_vdim");
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new(bin).env("VDIM_HOME", &home).args(["user", "add", &format!("u{n}")]).output();
                assert!(out.unwrap().status.success());
                n += 1;
            }
            n
        })
    };
    let mut seen = vec![];
    for k in 0..4 {
        let dir = env.path(&format!("b{k}"));
        let b = env.vdim_json(&["backup", dir.to_str().unwrap()]);
        let m = manifest(&dir);
        let copy = dir.join("catalog.db");
        assert_eq!(m["catalog"]["sha256"].as_str().unwrap(), sha256(&copy));
        assert_eq!(b["catalog_sha256"], m["catalog"]["sha256"]);
        assert!(!dir.join("catalog.db-wal").exists(), "the copy is one file");
        let db = rusqlite::Connection::open_with_flags(&copy, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let users: u64 = db.query_row("SELECT count(*) FROM users", [], |r| r.get(0)).unwrap();
        assert_eq!(m["counts"]["users"].as_u64(), Some(users), "the manifest describes the copy it sits beside");
        let layers: Vec<&str> = m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
        assert_eq!(layers.len(), 2);
        seen.push(users);
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let added = writer.join().unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen[3] > seen[0], "users grew while backups ran: {seen:?}");
    assert!(added as u64 >= seen[3]);
    let audit = env.vdim_json(&["audit"]);
    assert_eq!(audit.as_array().unwrap().iter().filter(|e| e["action"] == "catalog.backup").count(), 4);
}

#[test]
fn a_damaged_or_missing_layer_refuses_the_restore_naming_it_and_a_second_backup_copies_only_what_it_must() {
    let env = Env::new();
    two_versions(&env, "dmg");
    let h = env.vdim_json(&["image", "history", "img"]);
    let v2 = digests(&h)[1].1.clone();
    let dir = env.path("backup");
    env.vdim_json(&["backup", dir.to_str().unwrap(), "--layers"]);
    let again = env.vdim_json(&["backup", dir.to_str().unwrap(), "--layers"]);
    assert_eq!((again["layers_copied"].as_u64(), again["layers_present"].as_u64()), (Some(0), Some(2)), "{again}");

    let layer = dir.join("layers").join(format!("{v2}.qcow2"));
    let mut bytes = std::fs::read(&layer).unwrap();
    let at = 70000 % bytes.len();
    bytes[at] ^= 0xff;
    std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(&layer, &bytes).unwrap();
    let fresh = env.path("fresh");
    let r = vdim_in(&env, &fresh, &["restore", dir.to_str().unwrap()]);
    r.assert_exit_code(2).assert_stderr_contains(&v2).assert_stderr_contains("image 'img' version 2");
    assert!(!fresh.join("catalog.db").exists(), "nothing half-restored");
    assert!(tree(&fresh.join("layers")).is_empty(), "{:?}", tree(&fresh.join("layers")));

    std::fs::remove_file(&layer).unwrap();
    let r = vdim_in(&env, &fresh, &["restore", dir.to_str().unwrap()]);
    r.assert_exit_code(4).assert_stderr_contains(&v2).assert_stderr_contains("--layers");
    assert!(!fresh.join("catalog.db").exists());

    // Damaged in the directory: the next backup replaces it, the good one stays.
    std::fs::write(&layer, &bytes).unwrap();
    let fixed = env.vdim_json(&["backup", dir.to_str().unwrap(), "--layers"]);
    assert_eq!(
        (fixed["layers_copied"].as_u64(), fixed["layers_present"].as_u64(), fixed["layers_replaced"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{fixed}"
    );
    assert_eq!(sha256(&layer), v2);
    // Onto a home `vdim init` made (an empty catalog): restored and sound.
    let inited = env.path("inited");
    vdim_in(&env, &inited, &["init"]).assert_success();
    let r = json_in(&env, &inited, &["restore", dir.to_str().unwrap()]);
    assert_eq!(r["layers_copied"], 2);
    vdim_in(&env, &inited, &["image", "verify"]).assert_success();
    assert_eq!(digests(&json_in(&env, &inited, &["image", "history", "img"])), digests(&h));
}

#[test]
fn a_missing_backup_a_changed_catalog_copy_and_a_home_with_objects_are_refused_changing_nothing() {
    let env = Env::new();
    two_versions(&env, "ref");
    let fresh = env.path("fresh");
    vdim_in(&env, &fresh, &["restore", env.path("nowhere").to_str().unwrap()])
        .assert_exit_code(4)
        .assert_stderr_contains("nowhere");
    let dir = env.path("backup");
    env.vdim_json(&["backup", dir.to_str().unwrap()]);
    std::fs::rename(dir.join("manifest.json"), env.path("manifest.json")).unwrap();
    vdim_in(&env, &fresh, &["restore", dir.to_str().unwrap()])
        .assert_exit_code(4)
        .assert_stderr_contains("no backup in");
    std::fs::rename(env.path("manifest.json"), dir.join("manifest.json")).unwrap();
    let copy = dir.join("catalog.db");
    let good = std::fs::read(&copy).unwrap();
    let mut changed = good.clone();
    changed.extend_from_slice(&[0; 512]);
    std::fs::write(&copy, &changed).unwrap();
    vdim_in(&env, &fresh, &["restore", dir.to_str().unwrap()]).assert_exit_code(2).assert_stderr_contains("SHA-256");
    assert!(!fresh.exists(), "a refused restore makes not even the home");
    std::fs::write(&copy, &good).unwrap();

    let before = (tree(&env.home()), sha256(&env.home().join("catalog.db")), env.vdim_json(&["audit"]));
    env.vdim(&["restore", dir.to_str().unwrap()]).assert_exit_code(5).assert_stderr_contains("1 image");
    assert_eq!(before, (tree(&env.home()), sha256(&env.home().join("catalog.db")), env.vdim_json(&["audit"])));
}

#[test]
fn a_lost_catalog_comes_back_from_a_backup_without_layers_when_the_layers_stayed() {
    let env = Env::new();
    two_versions(&env, "cat");
    let h = env.vdim_json(&["image", "history", "img"]);
    let dir = env.path("backup");
    let b = env.vdim_json(&["backup", dir.to_str().unwrap()]);
    assert_eq!((b["with_layers"].as_bool(), b["layers_copied"].as_u64()), (Some(false), Some(0)));
    assert!(!dir.join("layers").exists());
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(env.home().join(f));
    }
    let r = env.vdim_json(&["restore", dir.to_str().unwrap()]);
    assert_eq!((r["layers_in_home"].as_u64(), r["layers_copied"].as_u64()), (Some(2), Some(0)), "{r}");
    env.vdim(&["image", "verify"]).assert_success();
    assert_eq!(digests(&env.vdim_json(&["image", "history", "img"])), digests(&h));
}
