//! Error kinds at the command line: every command that names an object exits 4 when the
//! object does not exist, and `--json` puts `{"error": {"kind", "message"}}` on stderr.
//! libvirt is libvirt's own in-process `test:///default`: no daemon, nothing defined on the host.

mod common;

use common::{marker_raw, Env, Run};
use std::collections::BTreeSet;

const CONNECT: &str = "test:///default";

/// Commands that take no object name, or only as a filter: they have no not-found case.
const NO_OBJECT: &[&str] = &[
    "init",
    "image list",
    "image gc",
    "pool list",
    "user add",
    "user list",
    "host add",
    "host list",
    "host check",
    "serve",
    "audit",
    "incident list",
    "watch policy",
    "backup",
];

fn run(env: &Env, json: bool, args: &[&str]) -> Run {
    let mut a = vec!["--connect", CONNECT];
    if json {
        a.push("--json");
    }
    a.extend_from_slice(args);
    let out = env.cmd().env("VDIM_VIRT_TYPE", "qemu").args(&a).output().expect("run vdim");
    Run { out, args: a.iter().map(|s| s.to_string()).collect() }
}

/// The JSON error: the last line of stderr (warnings may come before it).
#[track_caller]
fn json_error(r: &Run) -> serde_json::Value {
    let err = r.stderr();
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("vdim {:?}: stderr's last line is not JSON ({e}):\n{err}", r.args));
    assert!(v["error"]["kind"].is_string() && v["error"]["message"].is_string(), "{v}");
    assert!(r.stdout().trim().is_empty(), "vdim {:?} printed to stdout on error: {}", r.args, r.stdout());
    v
}

/// Asserts the exit code, the text form, and the JSON form of one failing command.
#[track_caller]
fn assert_kind(env: &Env, args: &[&str], code: i32, kind: &str, needle: &str) {
    let text = run(env, false, args);
    text.assert_exit_code(code).assert_stderr_contains("error: ").assert_stderr_contains(needle);
    let json = run(env, true, args);
    json.assert_exit_code(code);
    let v = json_error(&json);
    assert_eq!(v["error"]["kind"], kind, "vdim {:?}: {v}", json.args);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "vdim {:?}: the message does not name {needle:?}: {message}", json.args);
}

/// A home with image "img" (version 1 only), pool "p" on it, and user "alice".
fn setup() -> Env {
    let env = Env::new();
    let raw = env.path("img.raw");
    marker_raw(&raw, "img", "ok", 32 << 20);
    run(&env, false, &["image", "import", "img", raw.to_str().unwrap()]).assert_success();
    run(&env, false, &["pool", "create", "p", "--image", "img", "--size", "1", "--profile", "test-linux"])
        .assert_success();
    run(&env, false, &["user", "add", "alice"]).assert_success();
    env
}

/// Every command with an object name, given a name that does not exist: (command, args, what
/// the message must name).
fn not_found_cases(env: &Env) -> Vec<(&'static str, Vec<String>, &'static str)> {
    let out = env.path("out.qcow2").display().to_string();
    let c = |cmd: &'static str, args: &[&str], needle: &'static str| {
        (cmd, args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), needle)
    };
    vec![
        c("image import", &["image", "import", "new", "/nonexistent/disk.raw"], "/nonexistent/disk.raw"),
        c("image edit", &["image", "edit", "ghost"], "'ghost'"),
        c("image edit", &["image", "edit", "img", "--from", "9"], "no version 9"),
        c("image discard", &["image", "discard", "ghost"], "'ghost'"),
        c("image seal", &["image", "seal", "ghost"], "'ghost'"),
        c("image history", &["image", "history", "ghost"], "'ghost'"),
        c("image verify", &["image", "verify", "ghost"], "'ghost'"),
        c("image export", &["image", "export", "ghost", "1", &out], "'ghost'"),
        c("image export", &["image", "export", "img", "9", &out], "no version 9"),
        c("pool create", &["pool", "create", "q", "--image", "ghost", "--size", "1"], "'ghost'"),
        c("pool create", &["pool", "create", "q", "--image", "img", "--size", "1", "--profile", "ghost"], "ghost"),
        c("pool show", &["pool", "show", "ghost"], "'ghost'"),
        c("pool start", &["pool", "start", "ghost"], "'ghost'"),
        c("pool stop", &["pool", "stop", "ghost"], "'ghost'"),
        c("pool resize", &["pool", "resize", "ghost", "2"], "'ghost'"),
        c("pool update", &["pool", "update", "ghost"], "'ghost'"),
        c("pool pin", &["pool", "pin", "ghost", "1"], "'ghost'"),
        c("pool pin", &["pool", "pin", "p", "9"], "no version 9"),
        c("pool unpin", &["pool", "unpin", "ghost"], "'ghost'"),
        c("pool assign", &["pool", "assign", "ghost", "alice"], "'ghost'"),
        c("pool release", &["pool", "release", "vdim-ghost-001"], "'vdim-ghost-001'"),
        c("pool entitle", &["pool", "entitle", "ghost", "alice"], "'ghost'"),
        c("pool entitle", &["pool", "entitle", "p", "nobody"], "'nobody'"),
        c("pool unentitle", &["pool", "unentitle", "ghost", "alice"], "'ghost'"),
        c("pool unentitle", &["pool", "unentitle", "p", "nobody"], "'nobody'"),
        c("pool delete", &["pool", "delete", "ghost"], "'ghost'"),
        c("promote", &["promote", "ghost", "1", "--to", "test"], "'ghost'"),
        c("promote", &["promote", "img", "9", "--to", "test"], "no version 9"),
        c("rollout status", &["rollout", "status", "ghost"], "'ghost'"),
        c("rollout halt", &["rollout", "halt", "ghost"], "'ghost'"),
        c("rollout resume", &["rollout", "resume", "ghost"], "'ghost'"),
        c("rollback", &["rollback", "ghost"], "'ghost'"),
        c("rollback", &["rollback", "--image", "ghost", "--channel", "prod"], "'ghost'"),
        c("rollback", &["rollback", "--image", "img", "--channel", "prod", "--to", "9"], "no version 9"),
        c("user remove", &["user", "remove", "ghost"], "'ghost'"),
        c("host show", &["host", "show", "ghost"], "'ghost'"),
        c("host sync", &["host", "sync", "ghost"], "'ghost'"),
        c("host verify", &["host", "verify", "ghost"], "'ghost'"),
        c("host remove", &["host", "remove", "ghost"], "'ghost'"),
        c("host drain", &["host", "drain", "ghost"], "'ghost'"),
        c("host fence", &["host", "fence", "ghost", "--confirm"], "'ghost'"),
        c("host unfence", &["host", "unfence", "ghost"], "'ghost'"),
        c("host gc", &["host", "gc", "ghost"], "'ghost'"),
        c("pool create", &["pool", "create", "q", "--image", "img", "--size", "1", "--hosts", "ghost"], "'ghost'"),
        c("restore", &["restore", "/nonexistent/backup"], "/nonexistent/backup"),
        c("incident show", &["incident", "show", "99"], "no incident 99"),
        c("incident ack", &["incident", "ack", "99", "--note", "n"], "no incident 99"),
        c("watch events", &["watch", "events", "--image", "ghost"], "'ghost'"),
        c("watch events", &["watch", "events", "--image", "img", "--version", "9"], "no version 9"),
    ]
}

#[test]
fn every_command_exits_4_with_a_json_not_found_naming_the_object() {
    let env = setup();
    for (_, args, needle) in not_found_cases(&env) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_kind(&env, &args, 4, "not_found", needle);
    }
}

#[test]
fn a_missing_version_is_4_for_promote_as_for_pin() {
    let env = setup();
    run(&env, false, &["pool", "pin", "p", "9"]).assert_exit_code(4);
    run(&env, false, &["promote", "img", "9", "--to", "test"]).assert_exit_code(4);
    run(&env, false, &["user", "remove", "ghost"]).assert_exit_code(4);
}

/// Subcommands as `vdim ... --help` lists them, recursively, without `help`.
fn commands(env: &Env, path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let r = env.vdim(&args);
    r.assert_success();
    let help = r.stdout();
    let Some(list) = help.split("Commands:\n").nth(1) else {
        return vec![path.join(" ")];
    };
    let mut out = vec![];
    for line in list.lines().take_while(|l| !l.trim().is_empty()) {
        let name = line.split_whitespace().next().unwrap();
        if name != "help" {
            let mut sub = path.to_vec();
            sub.push(name);
            out.extend(commands(env, &sub));
        }
    }
    out
}

#[test]
fn every_command_has_a_not_found_case_or_takes_no_object() {
    let env = Env::new();
    let all: BTreeSet<String> = commands(&env, &[]).into_iter().collect();
    assert!(all.contains("pool pin") && all.contains("rollout halt"), "{all:?}");
    let mut covered: BTreeSet<String> = not_found_cases(&env).into_iter().map(|(c, ..)| c.to_string()).collect();
    covered.extend(NO_OBJECT.iter().map(|s| s.to_string()));
    let missing: Vec<_> = all.difference(&covered).collect();
    assert!(missing.is_empty(), "commands without a not-found case in tests/errors.rs: {missing:?}");
    let stale: Vec<_> = covered.difference(&all).collect();
    assert!(stale.is_empty(), "cases for commands vdim does not have: {stale:?}");
}

#[test]
fn a_busy_rollout_lock_is_3_even_through_the_rollout_error() {
    let env = setup();
    let path = env.home().join("locks/rollout-img.lock");
    let lock = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    assert_kind(&env, &["promote", "img", "1", "--to", "test"], 3, "busy", "the rollout of 'img' is busy");
    drop(lock);
}

#[test]
fn a_bad_name_is_invalid_and_an_existing_one_a_conflict() {
    let env = setup();
    assert_kind(&env, &["image", "history", "Bad!"], 2, "invalid", "'Bad!'");
    assert_kind(&env, &["pool", "show", "Bad!"], 2, "invalid", "'Bad!'");
    let raw = env.path("img.raw").display().to_string();
    assert_kind(&env, &["image", "import", "img", &raw], 5, "conflict", "image 'img' already exists");
    assert_kind(&env, &["user", "add", "alice"], 5, "conflict", "user 'alice' already exists");
    assert_kind(&env, &["image", "seal", "img"], 4, "not_found", "image 'img' has no draft");
}
