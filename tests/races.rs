//! Races between commands: one write transaction decides, or the object lock is held.
//!
//! Two real vdim processes are interleaved deterministically: the first is paused between
//! its read and its write (`VDIM_TEST_PAUSE_BEFORE`, see `src/test_hook.rs`), the second runs
//! in that gap, then the first carries on. Catalog-side races run on libvirt's in-process
//! `test:///default` driver; the dev desktop's re-check needs the real daemon.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use vdim::context::{Context, Settings};
use vdim::pool::DesktopMove;
use vdim::rules::Claim;
use vdim::store::Actor;

/// The services as the CLI opens them, on libvirt's in-process test driver.
fn test_driver_context(env: &Env) -> Context {
    let settings = Settings { connect: TEST_DRIVER.into(), ..Settings::new(vdim::home::Home::new(env.home())) };
    Context::open(settings).unwrap()
}

const TEST_DRIVER: &str = "test:///default";

/// `vdim --connect test:///default ...`
fn td(env: &Env, args: &[&str]) -> Run {
    let mut a = vec!["--connect", TEST_DRIVER];
    a.extend_from_slice(args);
    env.vdim(&a)
}

fn td_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let r = td(env, &a);
    r.assert_success();
    r.json()
}

/// A vdim command paused at `step` (between its read and its write) until `resume`.
struct Paused {
    child: Option<Child>,
    file: PathBuf,
    args: Vec<String>,
}

impl Paused {
    fn start(mut cmd: Command, env: &Env, step: &str, args: &[&str]) -> Paused {
        let file = env.path(&format!("pause-{step}"));
        let child = cmd
            .args(args)
            .env("VDIM_TEST_PAUSE_BEFORE", step)
            .env("VDIM_TEST_PAUSE_FILE", &file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vdim");
        let mut p = Paused { child: Some(child), file, args: args.iter().map(|s| s.to_string()).collect() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !p.file.exists() {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                let out = p.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "vdim {:?} ended ({status}) without pausing at {step}:\n{}{}",
                    p.args,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "vdim {:?} never reached {step}", p.args);
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn resume(mut self) -> Run {
        std::fs::remove_file(&self.file).unwrap();
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        Run { out, args: std::mem::take(&mut self.args) }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn paused_td(env: &Env, step: &str, args: &[&str]) -> Paused {
    let mut a = vec!["--json", "--connect", TEST_DRIVER];
    a.extend_from_slice(args);
    Paused::start(env.cmd(), env, step, &a)
}

fn desktop<'a>(show: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    show["desktops"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("{name}: {show}"))
}

/// A test-driver pool of `size` desktops on image "img" (v1), started.
fn td_pool(env: &Env, pool: &str, size: u32) {
    let size = size.to_string();
    td_json(env, &["pool", "create", pool, "--image", "img", "--size", &size, "--profile", "test-linux", "--start"]);
}

// ---- item 1: shrink, stop, delete and rollout moves never take a desktop given away meanwhile

#[test]
fn shrink_refuses_when_the_desktop_it_picked_is_given_to_a_user_meanwhile() {
    let env = Env::new();
    marker_image(&env, "img", "race-v1");
    td_pool(&env, "p", 2);
    td_json(&env, &["pool", "assign", "p", "bob"]);
    // The shrink looks: vdim-p-002 is idle, so it may go.
    let shrink = paused_td(&env, vdim::test_hook::POOL_SHRINK, &["pool", "resize", "p", "1"]);
    // Meanwhile the broker's assignment gives vdim-p-002 to alice.
    let a = td_json(&env, &["pool", "assign", "p", "alice"]);
    assert_eq!(a["name"], "vdim-p-002");
    let r = shrink.resume();
    r.assert_failure().assert_stderr_contains("desktop 'vdim-p-002' is in use by alice");
    let show = td_json(&env, &["pool", "show", "p"]);
    assert_eq!(show["size"], 2, "nothing changed: {show}");
    assert_eq!(desktop(&show, "vdim-p-002")["assigned_to"], "alice");
    assert!(env.home().join("desktops/p/vdim-p-002.qcow2").exists(), "alice's disk is still there");
}

#[test]
fn stop_refuses_when_a_desktop_is_given_to_a_user_meanwhile() {
    let env = Env::new();
    marker_image(&env, "img", "race-v1");
    td_pool(&env, "p", 1);
    let stop = paused_td(&env, vdim::test_hook::POOL_STOP, &["pool", "stop", "p"]);
    td_json(&env, &["pool", "assign", "p", "alice"]);
    stop.resume().assert_failure().assert_stderr_contains("desktop 'vdim-p-001' is in use by alice");
    let show = td_json(&env, &["pool", "show", "p"]);
    assert_eq!(show["running"], true, "the pool still runs: {show}");
    // --force is the admin saying users are cut off: it still works.
    td_json(&env, &["pool", "stop", "p", "--force"]);
}

#[test]
fn delete_refuses_when_a_desktop_is_given_to_a_user_meanwhile() {
    let env = Env::new();
    marker_image(&env, "img", "race-v1");
    td_pool(&env, "p", 1);
    let delete = paused_td(&env, vdim::test_hook::POOL_DELETE, &["pool", "delete", "p"]);
    td_json(&env, &["pool", "assign", "p", "alice"]);
    delete.resume().assert_failure().assert_stderr_contains("desktop 'vdim-p-001' is in use by alice");
    let show = td_json(&env, &["pool", "show", "p"]);
    assert_eq!(desktop(&show, "vdim-p-001")["assigned_to"], "alice");
    assert!(env.home().join("desktops/p/vdim-p-001.qcow2").exists());
}

/// A real rollout: its wave has picked both idle desktops when the broker's assignment gives
/// one to alice; the wave moves only the other, and alice's follows at her logoff.
#[test]
fn a_wave_does_not_move_a_desktop_given_to_a_user_after_the_wave_picked_it() {
    let t = LibvirtEnv::new("wave");
    let pool = t.pool_name("w");
    marker_image(&t.env, "img", "wave-v1");
    t.create_pool(&pool, "img", "test", 2, "test-linux", &[]);
    seal_marker(&t.env, "img", "wave-v2", "ok");
    let mut cmd = t.env.cmd();
    cmd.env("VDIM_VIRT_TYPE", "qemu");
    let args = ["--json", "promote", "img", "2", "--to", "test", "--waves", "100%", "--soak", "3s"];
    let promote = Paused::start(cmd, &t.env, vdim::test_hook::ROLLOUT_WAVE, &args);
    let alice = t.vdim_json(&["pool", "assign", &pool, "alice"]);
    let (mine, other) = (format!("vdim-{pool}-001"), format!("vdim-{pool}-002"));
    assert_eq!(alice["name"], mine.as_str());
    let r = promote.resume();
    r.assert_success();
    let rep = r.json();
    assert_eq!(rep["state"], "succeeded", "{rep}");
    let wave = &rep["waves"][0]["desktops"];
    let state = |d: &str| wave.as_array().unwrap().iter().find(|x| x["desktop"] == d).unwrap()["state"].clone();
    assert_eq!((state(&mine), state(&other)), ("skipped".into(), "healthy".into()), "{wave}");
    let show = t.vdim_json(&["pool", "show", &pool]);
    let a = desktop(&show, &mine);
    assert_eq!(
        (&a["version"], &a["needs_reset"], &a["assigned_to"], &a["will_run"]),
        (&1.into(), &false.into(), &"alice".into(), &2.into()),
        "alice's desktop is untouched until her logoff: {a}"
    );
    assert_eq!(desktop(&show, &other)["version"], 2);
    t.vdim_json(&["pool", "release", &mine]);
    assert_eq!(desktop(&t.vdim_json(&["pool", "show", &pool]), &mine)["version"], 2);
}

/// The rollout engine's step, driven through the library: desktops picked while idle, one
/// given to a user through the broker's own catalog call, then the move.
#[test]
fn rollout_moves_leave_a_desktop_given_to_a_user_after_it_was_picked() {
    let env = Env::new();
    marker_image(&env, "img", "race-v1");
    seal_marker(&env, "img", "race-v2", "ok");
    let mut ctx = test_driver_context(&env);
    let actor = Actor("tester".into());
    let mut pools = ctx.pools().unwrap();
    pools
        .create(
            &vdim::pool::CreateOptions {
                name: "p",
                image: "img",
                channel: vdim::catalog::Channel::Prod,
                size: 2,
                profile: "test-linux",
                persistent: false,
                virt: vdim::hypervisor::domain_xml::VirtType::Qemu,
                start: true,
                display_listen: "127.0.0.1".parse().unwrap(),
                insecure_display: false,
                identity: None,
                hosts: &[],
                zone: None,
            },
            &actor,
        )
        .unwrap();
    // The wave picks both idle desktops...
    let picked: Vec<String> = pools.show("p").unwrap().desktops.iter().map(|d| d.name.clone()).collect();
    assert_eq!(picked, ["vdim-p-001", "vdim-p-002"]);
    // ...and the broker gives the first idle one to alice before the wave writes.
    assert_eq!(pools.assign("p", "alice", &actor).unwrap().name, "vdim-p-001");
    let moved = pools
        .move_desktops(
            &[DesktopMove { pool: "p".into(), desktops: picked.clone(), to: 2 }],
            true,
            &actor,
            "rollout 1 wave 1",
            Claim::Wave,
        )
        .unwrap();
    assert_eq!(moved.now, ["vdim-p-002"]);
    assert_eq!(moved.skipped, ["vdim-p-001"]);
    let show = pools.show("p").unwrap();
    let alices = show.desktops.iter().find(|d| d.name == "vdim-p-001").unwrap();
    assert_eq!(
        (alices.version, alices.will_run, alices.needs_reset, alices.assigned_to.as_deref()),
        (1, 1, false, Some("alice")),
        "alice's desktop is untouched"
    );
    assert_eq!(show.desktops.iter().find(|d| d.name == "vdim-p-002").unwrap().version, 2);

    // A revert: bob is given the moved desktop during the soak; it goes back at his logoff.
    assert_eq!(pools.assign("p", "bob", &actor).unwrap().name, "vdim-p-002");
    let back = pools
        .move_desktops(
            &[DesktopMove { pool: "p".into(), desktops: vec!["vdim-p-002".into()], to: 1 }],
            true,
            &actor,
            "revert",
            Claim::Revert,
        )
        .unwrap();
    assert!(back.now.is_empty(), "{back:?}");
    assert_eq!(back.at_logoff, ["vdim-p-002"]);
    let bobs = pools.show("p").unwrap().desktops.into_iter().find(|d| d.name == "vdim-p-002").unwrap();
    assert_eq!((bobs.version, bobs.will_run, bobs.needs_reset), (2, 1, false), "moves back at logoff");
    let r = pools.release("vdim-p-002", &actor).unwrap();
    assert_eq!((r.version, r.reset), (1, true));
}

// ---- item 2: seal and edit --start never interleave ----------------------------------------

#[test]
fn edit_start_is_busy_while_seal_holds_the_image() {
    let t = LibvirtEnv::new("sealbusy");
    let image = t.prefix.clone();
    marker_image(&t.env, &image, "race-v1");
    let d = t.vdim_json(&["image", "edit", &image]);
    qemu_io_write(std::path::Path::new(d["draft"].as_str().unwrap()), 0x61, 1 << 20, 65536);
    let mut cmd = t.env.cmd();
    cmd.env("VDIM_VIRT_TYPE", "qemu");
    let seal = Paused::start(cmd, &t.env, vdim::test_hook::SEAL_COPY, &["--json", "image", "seal", &image]);
    // Seal has found no dev desktop running and holds the image: --start must not boot one now.
    t.vdim(&["image", "edit", &image, "--start", "--profile", "test-linux"])
        .assert_exit_code(3)
        .assert_stderr_contains(&format!("image '{image}' is busy"));
    let v = seal.resume();
    v.assert_success();
    assert_eq!(v.json()["number"], 2);
    assert!(t.domains().is_empty(), "no dev desktop was booted: {:?}", t.domains());
}

/// A dev desktop started behind vdim's back (virsh) after seal's first check is caught by
/// the check after the copy: nothing is sealed, the draft stays.
#[test]
fn seal_rechecks_the_dev_desktop_after_copying_the_draft() {
    let t = LibvirtEnv::new("sealrace");
    let image = t.prefix.clone();
    marker_image(&t.env, &image, "race-v1");
    let d = t.vdim_json(&["image", "edit", &image]);
    qemu_io_write(std::path::Path::new(d["draft"].as_str().unwrap()), 0x61, 1 << 20, 65536);
    let r = t.vdim_json(&["image", "edit", &image, "--start", "--profile", "test-linux"]);
    let domain = r["dev_desktop"]["domain"].as_str().unwrap().to_string();
    sh("virsh", &["-c", "qemu:///system", "destroy", &domain]);
    let mut cmd = t.env.cmd();
    cmd.env("VDIM_VIRT_TYPE", "qemu");
    let seal = Paused::start(cmd, &t.env, vdim::test_hook::SEAL_COPY, &["--json", "image", "seal", &image]);
    sh("virsh", &["-c", "qemu:///system", "start", &domain]);
    seal.resume()
        .assert_failure()
        .assert_stderr_contains(&format!("its dev desktop {domain} was started; shut it down and seal again"));
    let h = t.vdim_json(&["image", "history", &image]);
    assert_eq!(h["versions"].as_array().unwrap().len(), 1, "nothing sealed: {h}");
    assert_eq!(h["draft"]["path"].as_str().map(|p| t.env.home().join(p).exists()), Some(true), "{h}");
}

// ---- item 3: pool `dev` and image `001` share no domain and no run directory ------------------

/// The test guest's profile without displays: the test driver cannot set display passwords.
fn headless_profile(env: &Env) -> &'static str {
    let linux = std::fs::read_to_string(env.home().join("profiles/test-linux.toml")).unwrap();
    let headless = linux.replace(r#"graphics = ["spice", "vnc"]"#, "graphics = []");
    assert_ne!(linux, headless);
    std::fs::write(env.home().join("profiles/test-headless.toml"), headless).unwrap();
    "test-headless"
}

#[test]
fn pool_dev_and_image_001_dev_desktop_are_different_domains_and_run_dirs() {
    let env = Env::new();
    marker_image(&env, "001", "race-001");
    marker_image(&env, "img", "race-v1");
    let profile = headless_profile(&env);
    let e = td_json(&env, &["image", "edit", "001", "--start", "--profile", profile]);
    let dev_domain = e["dev_desktop"]["domain"].as_str().unwrap().to_string();
    let dev_log = PathBuf::from(e["dev_desktop"]["serial_log"].as_str().unwrap());
    let p = td_json(&env, &["pool", "create", "dev", "--image", "img", "--size", "2", "--profile", "test-linux"]);
    let desktops: Vec<&str> = p["desktops"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert!(!desktops.contains(&dev_domain.as_str()), "{dev_domain} is also a desktop of pool dev: {desktops:?}");
    let pool_run = env.home().join("run").join("dev");
    assert_ne!(dev_log.parent().unwrap(), pool_run, "the dev desktop's run directory is pool dev's");

    // As QEMU would: the dev desktop's serial log has content. Deleting pool dev keeps it.
    std::fs::write(&dev_log, "GUEST-MARKER: dev\n").unwrap();
    td_json(&env, &["pool", "delete", "dev"]);
    assert!(dev_log.exists(), "deleting pool dev removed the dev desktop's {dev_log:?}");
    assert!(!pool_run.exists(), "pool dev's own run directory goes");
    // Image 001 keeps its draft.
    assert_eq!(td_json(&env, &["image", "history", "001"])["draft"]["base_version"], 1);
}

/// After an upgrade: image 001's dev desktop still has the name an older vdim gave it,
/// `vdim-dev-001`, which is also pool `dev`'s first desktop. vdim keeps finding the dev
/// desktop under that name and refuses to make pool `dev` on top of it.
#[test]
fn a_dev_desktop_named_by_an_older_vdim_is_found_and_never_taken_by_a_pool() {
    let env = Env::new();
    marker_image(&env, "001", "race-001");
    marker_image(&env, "img", "race-v1");
    let profile = headless_profile(&env);
    let mut ctx = test_driver_context(&env);
    let hv = ctx.hypervisor().unwrap();
    let draft = ctx.store().edit("001", None, &Actor("tester".into())).unwrap();
    let p = vdim::profile::Profile::load(&env.home().join("profiles"), profile).unwrap();
    let spec = vdim::hypervisor::domain_xml::DesktopSpec {
        name: "vdim-dev-001",
        uuid: None,
        disk: &draft.draft,
        serial_log: Some(&env.home().join("run/dev/001.serial.log")),
        nvram: None,
        config_drive: None,
        graphics_password: "secret",
        listen: "127.0.0.1",
        display_tls: false,
        pool: "001",
        version: 1,
    };
    hv.define(
        &vdim::hypervisor::domain_xml::domain_xml(&p, vdim::hypervisor::domain_xml::VirtType::Qemu, &spec).unwrap(),
    )
    .unwrap();
    hv.start("vdim-dev-001").unwrap();
    assert_eq!(ctx.dev().unwrap().domain_name("001").unwrap(), "vdim-dev-001");

    let mut pools = ctx.pools().unwrap();
    let err = pools
        .create(
            &vdim::pool::CreateOptions {
                name: "dev",
                image: "img",
                channel: vdim::catalog::Channel::Prod,
                size: 2,
                profile,
                persistent: false,
                virt: vdim::hypervisor::domain_xml::VirtType::Qemu,
                start: false,
                display_listen: "127.0.0.1".parse().unwrap(),
                insecure_display: false,
                identity: None,
                hosts: &[],
                zone: None,
            },
            &Actor("tester".into()),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("domain vdim-dev-001 is the dev desktop of image '001'"), "{err}");
    assert_eq!(hv.state("vdim-dev-001").unwrap().0, vdim::hypervisor::DomainState::Running, "left running");
    assert!(pools.show("dev").is_err(), "no pool dev was made");
    // Sealing finds the old name too: it refuses while that desktop runs.
    let e = ctx.dev().unwrap().seal("001", "n", &Actor("tester".into()), None).unwrap_err().to_string();
    assert!(e.contains("vdim-dev-001 of '001' is running"), "{e}");
}
