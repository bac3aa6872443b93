//! Pools on the real libvirt daemon (qemu:///system), guests booting under TCG.

mod common;
use common::*;
use std::path::Path;

fn chain(overlay: &str) -> Vec<String> {
    let out = sh("qemu-img", &["info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", overlay]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // qemu-img prints backing files as "<dir>/../../layers/x": compare canonical paths.
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| std::fs::canonicalize(i["filename"].as_str().unwrap()).unwrap().display().to_string())
        .collect()
}

fn layer_of(env: &Env, image: &str, version: usize) -> String {
    let h = env.vdim_json(&["image", "history", image]);
    let digest = h["versions"][version - 1]["digest"].as_str().unwrap().to_string();
    std::fs::canonicalize(env.home().join("layers").join(format!("{digest}.qcow2"))).unwrap().display().to_string()
}

#[test]
fn a_pool_boots_its_version_updates_and_rolls_back_with_one_command() {
    let t = LibvirtEnv::new("boot");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "boot-v1");
    // The pool follows dev, which seal moves: the "promotion" of this test.
    t.create_pool(&pool, "img", "dev", 3, "test-linux", &["--start"]);
    let show = t.vdim_json(&["pool", "show", &pool]);
    let desktops: Vec<String> =
        show["desktops"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(desktops.len(), 3);
    let l1 = layer_of(&t.env, "img", 1);
    for d in &show["desktops"].as_array().unwrap().clone() {
        let overlay = d["overlay"].as_str().unwrap();
        let o = std::fs::canonicalize(overlay).unwrap().display().to_string();
        assert_eq!(chain(overlay), [o, l1.clone()], "desktop overlay → version layer");
        t.wait_marker(&pool, d["name"].as_str().unwrap(), "boot-v1", 120);
    }

    seal_marker(&t.env, "img", "boot-v2", "ok");
    let r = t.vdim_json(&["pool", "update", &pool]);
    assert_eq!((r["from"].as_u64(), r["to"].as_u64()), (Some(1), Some(2)));
    let l2 = layer_of(&t.env, "img", 2);
    for d in t.vdim_json(&["pool", "show", &pool])["desktops"].as_array().unwrap() {
        let overlay = d["overlay"].as_str().unwrap();
        let o = std::fs::canonicalize(overlay).unwrap().display().to_string();
        assert_eq!(chain(overlay), [o, l2.clone(), l1.clone()], "overlay → v2 → v1");
        assert_eq!(d["version"], 2);
        t.wait_marker(&pool, d["name"].as_str().unwrap(), "boot-v2", 120);
    }

    // The on-call admin's one command.
    let r = t.vdim_json(&["rollback", &pool]);
    assert_eq!((r["to"].as_u64(), r["pinned"].as_u64()), (Some(1), Some(1)));
    for d in &desktops {
        t.wait_marker(&pool, d, "boot-v1", 120);
    }
    let show = t.vdim_json(&["pool", "show", &pool]);
    assert_eq!(show["pinned"], 1);
    assert!(show["desktops"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["version"] == 1 && d["state"].as_str().unwrap().starts_with("running")));
    // Pinned: a later seal (promotion) and update do not move it.
    seal_marker(&t.env, "img", "boot-v3", "ok");
    t.vdim(&["pool", "update", &pool]).assert_failure().assert_stderr_contains("is pinned at version 1");
    let actions: Vec<String> = t
        .vdim_json(&["audit", "--pool", &pool])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions, ["pool.create", "pool.start", "pool.update", "pool.rollback"]);
    t.vdim(&["pool", "delete", &pool]).assert_success();
    assert!(t.domains().is_empty(), "pool delete leaves no domain: {:?}", t.domains());
    assert!(!t.env.home().join("desktops").join(&pool).exists());
}

#[test]
fn an_in_use_desktop_moves_only_at_logoff_unless_forced() {
    let t = LibvirtEnv::new("inuse");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "inuse-v1");
    t.create_pool(&pool, "img", "dev", 2, "test-linux", &[]);
    let a = t.vdim_json(&["pool", "assign", &pool, "alice"]);
    let busy = a["name"].as_str().unwrap().to_string();
    seal_marker(&t.env, "img", "inuse-v2", "ok");
    let r = t.vdim_json(&["pool", "update", &pool]);
    assert_eq!(r["at_logoff"], serde_json::json!([busy]));
    let l1 = layer_of(&t.env, "img", 1);
    let l2 = layer_of(&t.env, "img", 2);
    let show = t.vdim_json(&["pool", "show", &pool]);
    let d = show["desktops"].as_array().unwrap().iter().find(|d| d["name"] == busy.as_str()).unwrap().clone();
    assert_eq!(
        (d["version"].as_u64(), d["will_run"].as_u64(), d["assigned_to"].as_str()),
        (Some(1), Some(2), Some("alice"))
    );
    let overlay = d["overlay"].as_str().unwrap().to_string();
    // Untouched: the user's overlay still sits on v1 and keeps what was written to it.
    qemu_io_write(Path::new(&overlay), 0x42, 8 << 20, 4096);
    assert_eq!(chain(&overlay)[1], l1);
    t.vdim_json(&["pool", "release", &busy]);
    assert_eq!(chain(&overlay)[1], l2, "moved at logoff");
    assert!(!qemu_io_read_pattern(Path::new(&overlay), 0x42, 8 << 20, 4096), "the user's write is wiped at logoff");

    // --force moves a desktop in use now.
    let b = t.vdim_json(&["pool", "assign", &pool, "bob"]);
    seal_marker(&t.env, "img", "inuse-v3", "ok");
    let r = t.vdim_json(&["pool", "update", &pool, "--force"]);
    assert!(r["now"].as_array().unwrap().iter().any(|n| n == &b["name"]), "{r}");
    assert!(r["at_logoff"].as_array().unwrap().is_empty());
}

#[test]
fn a_persistent_pool_moves_only_with_force_and_keeps_user_data_across_logoff() {
    let t = LibvirtEnv::new("pers");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "pers-v1");
    t.create_pool(&pool, "img", "dev", 1, "test-linux", &["--persistent"]);
    let d = t.vdim_json(&["pool", "assign", &pool, "carol"]);
    let overlay = t.env.home().join("desktops").join(&pool).join(format!("{}.qcow2", d["name"].as_str().unwrap()));
    qemu_io_write(&overlay, 0x43, 8 << 20, 4096);
    t.vdim_json(&["pool", "release", d["name"].as_str().unwrap()]);
    assert!(qemu_io_read_pattern(&overlay, 0x43, 8 << 20, 4096), "a persistent desktop keeps its disk at logoff");
    seal_marker(&t.env, "img", "pers-v2", "ok");
    t.vdim(&["pool", "update", &pool]).assert_failure().assert_stderr_contains("changes on it are lost");
    assert!(qemu_io_read_pattern(&overlay, 0x43, 8 << 20, 4096), "refused update changed nothing");
    t.vdim_json(&["pool", "update", &pool, "--force"]);
    assert!(!qemu_io_read_pattern(&overlay, 0x43, 8 << 20, 4096));
}

#[test]
fn windows11_profile_runs_under_tcg_with_secure_boot_and_tpm() {
    let t = LibvirtEnv::new("w11");
    let pool = t.pool_name("w");
    let src = t.env.path("w11.qcow2");
    // windows11's minimum disk; sparse, so it costs nothing.
    sh("qemu-img", &["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64G"]);
    t.vdim_json(&["image", "import", "win11", src.to_str().unwrap()]);
    t.create_pool(&pool, "win11", "prod", 1, "windows11", &["--start"]);
    let name = format!("vdim-{pool}-001");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let state = sh("virsh", &["-c", "qemu:///system", "domstate", &name]);
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "running");
    let xml = String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &name]).stdout).into_owned();
    assert!(xml.contains("secure='yes'"), "secure boot loader: {xml}");
    assert!(xml.contains("<tpm model='tpm-crb'>") && xml.contains("version='2.0'"), "{xml}");
    assert!(xml.contains(&format!("<entry name='serial'>{name}</entry>")), "SMBIOS identity: {xml}");
    assert!(!xml.contains("<hyperv"), "no Hyper-V enlightenments under TCG");
    let ps = String::from_utf8_lossy(&std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap().stdout)
        .into_owned();
    assert!(ps.lines().any(|l| l.contains("swtpm") && l.contains(&name)), "swtpm runs for {name}");
    t.vdim(&["pool", "delete", &pool, "--force"]).assert_success();
    assert!(t.domains().is_empty());
}

#[test]
fn bad_pool_requests_define_nothing_and_write_nothing() {
    let t = LibvirtEnv::new("bad");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "bad-v1");
    let create = |extra: &[&str]| {
        let mut a = vec!["pool", "create"];
        a.extend_from_slice(extra);
        t.vdim(&a)
    };
    create(&[&pool, "--image", "nope", "--size", "2", "--profile", "test-linux"])
        .assert_exit_code(4)
        .assert_stderr_contains("no image named 'nope'");
    create(&[&pool, "--image", "img", "--channel", "beta", "--size", "2", "--profile", "test-linux"]).assert_failure();
    create(&[&pool, "--image", "img", "--size", "0", "--profile", "test-linux"])
        .assert_failure()
        .assert_stderr_contains("pool size 0");
    create(&[&pool, "--image", "img", "--size", "100000", "--profile", "test-linux"])
        .assert_failure()
        .assert_stderr_contains("1 to 999");
    create(&[&pool, "--image", "img", "--size", "2", "--profile", "../../etc/passwd"]).assert_failure();
    create(&[&pool, "--image", "img", "--size", "2", "--profile", "nosuch"]).assert_failure();
    create(&["x'/><devices>", "--image", "img", "--size", "2", "--profile", "test-linux"])
        .assert_failure()
        .assert_stderr_contains("is not allowed");
    // A profile file with an unknown key.
    let profiles = t.env.home().join("profiles");
    let good = std::fs::read_to_string(profiles.join("test-linux.toml")).unwrap();
    std::fs::write(profiles.join("evil.toml"), format!("{good}\nshell = \"rm -rf /\"\n")).unwrap();
    create(&[&pool, "--image", "img", "--size", "2", "--profile", "evil"])
        .assert_failure()
        .assert_stderr_contains("shell");
    assert!(t.domains().is_empty(), "nothing defined: {:?}", t.domains());
    assert!(!t.env.home().join("desktops").join(&pool).exists(), "nothing written");
    t.vdim(&["pool", "show", &pool]).assert_exit_code(4);
    t.vdim(&["rollback", &pool]).assert_exit_code(4);
    // A pool with no history has nothing to roll back to.
    t.create_pool(&pool, "img", "prod", 1, "test-linux", &[]);
    t.vdim(&["rollback", &pool]).assert_failure().assert_stderr_contains("nothing to roll back to");
    t.vdim(&["pool", "create", &pool, "--image", "img", "--size", "1", "--profile", "test-linux"])
        .assert_failure()
        .assert_stderr_contains("already exists");
    t.vdim(&["pool", "pin", &pool, "7"]).assert_exit_code(4).assert_stderr_contains("has no version 7");
}

#[test]
fn delete_removes_exactly_its_own_desktops_and_gc_keeps_what_pools_use() {
    let t = LibvirtEnv::new("del");
    let a = t.pool_name("a");
    let ab = t.pool_name("a-b");
    marker_image(&t.env, "img", "del-v1");
    t.create_pool(&a, "img", "dev", 2, "test-linux", &[]);
    t.create_pool(&ab, "img", "dev", 2, "test-linux", &[]);
    t.vdim_json(&["pool", "pin", &a, "1"]);
    // dev moves on four times; v1 stays needed because pool a is pinned at it.
    for n in 2..=5 {
        seal_marker(&t.env, "img", &format!("del-v{n}"), "ok");
    }
    t.vdim_json(&["pool", "update", &ab]);
    let gc = t.vdim_json(&["image", "gc", "--dry-run"]);
    let doomed: Vec<u64> = gc["removed"].as_array().unwrap().iter().filter_map(|r| r["version"].as_u64()).collect();
    assert!(doomed.is_empty(), "v1 is used by pool a, v2..v5 are its descendants in use: {gc}");
    t.vdim(&["pool", "delete", &a]).assert_success();
    let left = t.domains();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|d| d.starts_with(&format!("vdim-{ab}-"))), "{left:?}");
    assert!(t.env.home().join("desktops").join(&ab).join(format!("vdim-{ab}-001.qcow2")).exists());
    t.vdim(&["image", "verify"]).assert_success();
}

/// The `<graphics type='KIND' ...>...</graphics>` element of a domain's XML.
fn graphics_element<'a>(xml: &'a str, kind: &str) -> &'a str {
    let start = xml.find(&format!("<graphics type='{kind}'")).unwrap_or_else(|| panic!("no {kind} graphics: {xml}"));
    let len = xml[start..].find("</graphics>").unwrap_or_else(|| panic!("unclosed {kind} graphics: {xml}"));
    &xml[start..start + len]
}

/// The TCP port in a live graphics element (`port='5901'`).
fn graphics_port(element: &str) -> u16 {
    let rest = element.split(" port='").nth(1).unwrap_or_else(|| panic!("no port: {element}"));
    rest.split('\'').next().unwrap().parse().unwrap_or_else(|e| panic!("port in {element}: {e}"))
}

/// The local addresses (`addr:port`) of the TCP sockets listening on `port` (iproute2's ss).
fn listening_on(port: u16) -> Vec<String> {
    let out = sh("ss", &["-H", "-l", "-t", "-n", &format!("sport = :{port}")]);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(3)).map(String::from).collect()
}

#[test]
fn display_listen_puts_spice_and_vnc_on_the_pools_address_and_refuses_anything_but_an_ip() {
    let t = LibvirtEnv::new("lsn");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "lsn-v1");
    let create = |extra: &[&str]| {
        let mut a = vec!["pool", "create", &pool, "--image", "img", "--size", "1", "--profile", "test-linux"];
        a.extend_from_slice(extra);
        t.vdim(&a)
    };

    // Anything but an IP address literal is refused before anything is defined or written.
    for bad in ["not-an-ip", "1.2.3.4'/>", "localhost", ""] {
        create(&["--display-listen", bad, "--start"]).assert_failure().assert_stderr_contains("is not an IP address");
    }
    assert!(t.domains().is_empty(), "nothing defined: {:?}", t.domains());
    assert!(!t.env.home().join("desktops").join(&pool).exists(), "no overlay written");
    assert!(!t.env.home().join("run").join(&pool).exists(), "no runtime directory written");
    t.vdim(&["pool", "show", &pool]).assert_exit_code(4);
    assert_eq!(t.vdim_json(&["audit", "--pool", &pool]), serde_json::json!([]), "nothing recorded");

    // On every address: the live domain has both displays there, and QEMU listens there.
    let mut args = vec!["--json", "pool", "create", &pool, "--image", "img", "--size", "1", "--profile", "test-linux"];
    args.extend(["--display-listen", "0.0.0.0", "--insecure-display", "--start"]);
    let created = t.vdim(&args);
    created.assert_success();
    assert_eq!(created.json()["display_listen"], "0.0.0.0", "{}", created.stdout());
    assert_eq!(t.vdim_json(&["pool", "show", &pool])["display_listen"], "0.0.0.0");
    let text = t.vdim(&["pool", "show", &pool]);
    assert!(text.assert_success().stdout().contains("displays on 0.0.0.0"), "{}", text.stdout());
    let audit = t.vdim_json(&["audit", "--pool", &pool]);
    assert_eq!(audit[0]["detail"]["display_listen"], "0.0.0.0", "{audit}");

    let name = format!("vdim-{pool}-001");
    let xml = String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &name]).stdout).into_owned();
    let g = graphics_element(&xml, "spice");
    assert!(
        g.contains("listen='0.0.0.0'") && g.contains("<listen type='address' address='0.0.0.0'/>"),
        "spice listens on 0.0.0.0: {g}"
    );
    assert!(!g.contains("127.0.0.1"), "spice: {g}");
    let port = graphics_port(g);
    assert_eq!(listening_on(port), [format!("0.0.0.0:{port}")], "QEMU's spice socket is bound on every address");
    // VNC (8-character passwords, used only by the broker's console proxy) never leaves loopback.
    let g = graphics_element(&xml, "vnc");
    assert!(
        g.contains("<listen type='address' address='127.0.0.1'/>") && !g.contains("0.0.0.0"),
        "vnc stays on loopback: {g}"
    );
    let port = graphics_port(g);
    assert_eq!(listening_on(port), [format!("127.0.0.1:{port}")], "QEMU's vnc socket is bound on loopback only");

    // Desktops added later get the pool's address too.
    t.vdim_json(&["pool", "resize", &pool, "2"]);
    let added = format!("vdim-{pool}-002");
    let xml = String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &added]).stdout).into_owned();
    let g = graphics_element(&xml, "spice");
    assert!(g.contains("<listen type='address' address='0.0.0.0'/>"), "resized desktop's spice: {g}");

    // Without the option a pool keeps its displays on loopback, as before.
    let lo = t.pool_name("lo");
    let v = t.create_pool(&lo, "img", "prod", 1, "test-linux", &[]);
    assert_eq!(v["display_listen"], "127.0.0.1");
    let xml =
        String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &format!("vdim-{lo}-001")]).stdout)
            .into_owned();
    for kind in ["spice", "vnc"] {
        let g = graphics_element(&xml, kind);
        assert!(g.contains("<listen type='address' address='127.0.0.1'/>"), "default {kind}: {g}");
    }
}
