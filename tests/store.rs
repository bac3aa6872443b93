//! The image store through the real `vdim` binary, on real qcow2/raw/vmdk/vhdx/vdi files.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn qemu_img_create(path: &Path, fmt: &str, size: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    args.push(size);
    sh("qemu-img", &args);
}

/// An image with one version whose first sector carries a marker and 1 MiB of pattern 0x11.
fn imported(env: &Env, name: &str) -> serde_json::Value {
    let raw = env.path(&format!("{name}.raw"));
    marker_raw(&raw, name, "ok", 64 << 20);
    let q = env.path(&format!("{name}-src.qcow2"));
    sh("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), q.to_str().unwrap()]);
    qemu_io_write(&q, 0x11, 1 << 20, 1 << 20);
    env.vdim_json(&["image", "import", name, q.to_str().unwrap()])
}

fn seal_change(env: &Env, name: &str, pattern: u8, note: &str) -> serde_json::Value {
    let d = env.vdim_json(&["image", "edit", name]);
    let draft = d["draft"].as_str().unwrap().to_string();
    qemu_io_write(Path::new(&draft), pattern, 4 << 20, 1 << 20);
    env.vdim_json(&["image", "seal", name, "--note", note])
}

fn header_backing(path: &Path) -> (Option<String>, Option<String>) {
    let out = sh("qemu-img", &["info", "-U", "-f", "qcow2", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["backing-filename"].as_str().map(String::from), v["backing-filename-format"].as_str().map(String::from))
}

#[test]
fn imports_every_supported_format_as_a_standalone_sealed_layer() {
    let env = Env::new();
    let raw = env.path("base.raw");
    marker_raw(&raw, "fmt", "ok", 16 << 20);
    for fmt in ["qcow2", "raw", "vmdk", "vhdx", "vdi"] {
        let src = env.path(&format!("src.{fmt}"));
        if fmt == "raw" {
            std::fs::copy(&raw, &src).unwrap();
        } else {
            sh("qemu-img", &["convert", "-q", "-f", "raw", "-O", fmt, raw.to_str().unwrap(), src.to_str().unwrap()]);
        }
        let name = format!("img-{fmt}");
        let r = env.vdim_json(&["image", "import", &name, src.to_str().unwrap()]);
        assert_eq!(r["number"], 1, "{fmt}: {r}");
        let path = Path::new(r["path"].as_str().unwrap());
        let digest = r["digest"].as_str().unwrap();
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), format!("{digest}.qcow2"));
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o7777, 0o440, "{fmt}");
        assert_eq!(header_backing(path), (None, None), "{fmt}: version 1 must be standalone");
        assert_eq!(r["virtual_size"], 16 << 20);
        let h = env.vdim_json(&["image", "history", &name]);
        let chans: Vec<&str> =
            h["versions"][0]["channels"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(chans, ["dev", "test", "prod"], "{fmt}: import points all three channels at v1");
        // The data survived conversion: the marker is the first bytes of the layer's disk.
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2", raw.to_str().unwrap(), path.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(cmp.success(), "{fmt}: content differs after import");
    }
    env.vdim(&["image", "verify"]).assert_success();
}

#[test]
fn edit_write_seal_makes_a_relative_delta_layer_and_moves_only_dev() {
    let env = Env::new();
    imported(&env, "win11");
    let d = env.vdim_json(&["image", "edit", "win11"]);
    assert_eq!(d["image"], "win11");
    assert_eq!(d["base_version"], 1);
    let draft = Path::new(d["draft"].as_str().unwrap()).to_path_buf();
    assert!(draft.is_absolute() && draft.exists(), "{d}");
    // A second edit hands back the same draft instead of forking a second one.
    assert_eq!(env.vdim_json(&["image", "edit", "win11"])["draft"], d["draft"]);
    qemu_io_write(&draft, 0x22, 4 << 20, 1 << 20);
    let s = env.vdim_json(&["image", "seal", "win11", "--note", "KB5040442", "--author", "alice"]);
    assert_eq!(s["number"], 2);
    assert_eq!(s["parent"], 1);
    assert_eq!(s["author"], "alice");
    assert!(!draft.exists(), "the draft file is gone once sealed");

    let h = env.vdim_json(&["image", "history", "win11"]);
    let v = h["versions"].as_array().unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[1]["parent"], 1);
    assert_eq!(v[1]["note"], "KB5040442");
    for key in ["number", "parent", "digest", "size", "created", "author", "note", "channels"] {
        assert!(v[1].get(key).is_some(), "history lacks {key}: {}", v[1]);
    }
    assert_eq!(v[1]["channels"], serde_json::json!(["dev"]));
    assert_eq!(v[0]["channels"], serde_json::json!(["test", "prod"]));
    // The delta holds the 1 MiB change, not the 64 MiB disk.
    let delta = v[1]["size"].as_u64().unwrap();
    assert!(delta < 4 << 20 && delta > 1 << 20, "delta size {delta}");

    let layer2 = env.home().join("layers").join(format!("{}.qcow2", v[1]["digest"].as_str().unwrap()));
    let (backing, fmt) = header_backing(&layer2);
    assert_eq!(
        backing.as_deref(),
        Some(format!("{}.qcow2", v[0]["digest"].as_str().unwrap()).as_str()),
        "relative backing"
    );
    assert_eq!(fmt.as_deref(), Some("qcow2"));
    assert_eq!(std::fs::metadata(&layer2).unwrap().permissions().mode() & 0o7777, 0o440);
    // Reading through the chain sees both the base data and the change.
    assert!(qemu_io_read_pattern(&layer2, 0x11, 1 << 20, 1 << 20));
    assert!(qemu_io_read_pattern(&layer2, 0x22, 4 << 20, 1 << 20));

    let audit = env.vdim_json(&["audit", "--image", "win11"]);
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["image.import", "image.edit", "image.seal"]);
    env.vdim(&["image", "verify", "win11"]).assert_success();
}

#[test]
fn seal_refuses_a_draft_without_changes_and_records_user_as_author() {
    let env = Env::new();
    imported(&env, "a");
    env.vdim_json(&["image", "edit", "a"]);
    env.vdim(&["image", "seal", "a"]).assert_failure().assert_stderr_contains("no changes since version 1");
    assert_eq!(env.vdim_json(&["image", "history", "a"])["versions"].as_array().unwrap().len(), 1);
    env.vdim(&["image", "seal", "b"]).assert_exit_code(4).assert_stderr_contains("no image named 'b'");
    let s = seal_change(&env, "a", 0x33, "x");
    assert_eq!(s["author"], "tester", "$USER is the default author");
    env.vdim(&["image", "seal", "a"]).assert_failure().assert_stderr_contains("has no draft");
}

#[test]
fn verify_catches_a_flipped_byte_a_mode_change_a_missing_layer_and_a_wrong_backing_path() {
    let env = Env::new();
    imported(&env, "a");
    let s2 = seal_change(&env, "a", 0x22, "two");
    let s3 = seal_change(&env, "a", 0x33, "three");
    let v = env.vdim_json(&["image", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let l2 = Path::new(s2["path"].as_str().unwrap()).to_path_buf();
    let l3 = Path::new(s3["path"].as_str().unwrap()).to_path_buf();

    let problems = |env: &Env| -> Vec<serde_json::Value> {
        let r = env.vdim(&["--json", "image", "verify"]);
        r.assert_failure();
        let j = r.json();
        assert_eq!(j["ok"], false);
        j["problems"].as_array().unwrap().clone()
    };

    // One flipped bit in a data cluster of version 2.
    let mut bytes = std::fs::read(&l2).unwrap();
    let at = bytes.len() - 4096;
    bytes[at] ^= 0x01;
    std::fs::set_permissions(&l2, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&l2, &bytes).unwrap();
    std::fs::set_permissions(&l2, std::fs::Permissions::from_mode(0o440)).unwrap();
    let p = problems(&env);
    assert!(
        p.iter().any(|p| p["version"] == 2
            && p["image"] == "a"
            && p["problem"].as_str().unwrap().contains("content changed")
            && p["path"] == l2.to_str().unwrap()),
        "{p:?}"
    );
    bytes[at] ^= 0x01;
    std::fs::set_permissions(&l2, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&l2, &bytes).unwrap();
    // Now only the mode is wrong.
    let p = problems(&env);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0]["problem"].as_str().unwrap().contains("0644"), "{p:?}");
    // Readable by every local user: also wrong.
    std::fs::set_permissions(&l2, std::fs::Permissions::from_mode(0o444)).unwrap();
    let p = problems(&env);
    assert!(p.len() == 1 && p[0]["problem"].as_str().unwrap().contains("0444"), "{p:?}");
    std::fs::set_permissions(&l2, std::fs::Permissions::from_mode(0o440)).unwrap();
    assert_eq!(env.vdim_json(&["image", "verify"])["ok"], true);

    // A layer moved away.
    let moved = env.path("moved.qcow2");
    std::fs::rename(&l3, &moved).unwrap();
    let p = problems(&env);
    assert!(p.iter().any(|p| p["version"] == 3 && p["problem"].as_str().unwrap().contains("missing")), "{p:?}");
    std::fs::rename(&moved, &l3).unwrap();

    // A wrong backing path written into version 3's header.
    std::fs::set_permissions(&l3, std::fs::Permissions::from_mode(0o644)).unwrap();
    let orig = std::fs::read(&l3).unwrap();
    sh("qemu-img", &["rebase", "-u", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", l3.to_str().unwrap()]);
    std::fs::set_permissions(&l3, std::fs::Permissions::from_mode(0o440)).unwrap();
    let p = problems(&env);
    assert!(p.iter().any(|p| p["version"] == 3 && p["problem"].as_str().unwrap().contains("backing file")), "{p:?}");
    std::fs::set_permissions(&l3, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&l3, orig).unwrap();
    std::fs::set_permissions(&l3, std::fs::Permissions::from_mode(0o440)).unwrap();
    env.vdim(&["image", "verify"]).assert_success();
}

#[test]
fn gc_keeps_channels_drafts_the_rollback_window_and_ancestors() {
    let env = Env::new();
    imported(&env, "a");
    for n in 2..=7u8 {
        seal_change(&env, "a", 0x20 + n, &format!("v{n}"));
    }
    // dev=7 (and held 2..7), test/prod held only 1. Window keeps dev's last 3: 7,6,5.
    env.vdim_json(&["image", "edit", "a"]); // draft on 7
    let dry = env.vdim_json(&["image", "gc", "--dry-run"]);
    let doomed: Vec<u64> = dry["removed"].as_array().unwrap().iter().filter_map(|r| r["version"].as_u64()).collect();
    // Everything is an ancestor of 7, so nothing may go.
    assert!(doomed.is_empty(), "ancestors of a kept version must stay: {dry}");
    assert_eq!(dry["dry_run"], true);
    env.vdim(&["image", "verify"]).assert_success();
}

#[test]
fn gc_removes_a_dead_branch_outside_the_window_and_files_left_by_crashes() {
    let env = Env::new();
    imported(&env, "a");
    seal_change(&env, "a", 0x22, "v2");
    let bad = seal_change(&env, "a", 0x33, "v3 is bad");
    // Patch again on v2: v3 becomes a dead branch once dev has moved on three times.
    let d = env.vdim_json(&["image", "edit", "a", "--from", "2"]);
    assert_eq!(d["base_version"], 2);
    qemu_io_write(Path::new(d["draft"].as_str().unwrap()), 0x44, 8 << 20, 65536);
    assert_eq!(env.vdim_json(&["image", "seal", "a"])["parent"], 2);
    let dry = env.vdim_json(&["image", "gc", "--dry-run"]);
    assert!(dry["removed"].as_array().unwrap().is_empty(), "v3 is still in dev's rollback window: {dry}");
    for n in 5..=6u8 {
        seal_change(&env, "a", 0x50 + n, "more");
    }
    // dev held 1..6: its window is 6,5,4; test/prod hold 1. v3 is needed by no one.
    let before = env.store_files();
    let orphan = env.home().join("layers").join(format!("{}.qcow2", "f".repeat(64)));
    std::fs::write(&orphan, vec![7u8; 10_000]).unwrap();
    let dead_tmp = env.home().join("layers").join(".tmp-999999-1-import-x.qcow2");
    std::fs::write(&dead_tmp, vec![1u8; 5_000]).unwrap();
    let stray_draft = env.home().join("drafts").join("a-v1-999999.qcow2");
    std::fs::write(&stray_draft, vec![1u8; 3_000]).unwrap();

    let v = env.vim_verify_json_failing();
    let paths: Vec<&str> = v["problems"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    for f in [&orphan, &dead_tmp, &stray_draft] {
        assert!(paths.contains(&f.to_str().unwrap()), "verify must report {f:?}: {v}");
    }
    let bad_path = bad["path"].as_str().unwrap();
    let bad_size = std::fs::metadata(bad_path).unwrap().len();
    let dry = env.vdim_json(&["image", "gc", "--dry-run"]);
    let items = dry["removed"].as_array().unwrap();
    assert_eq!(items.iter().filter_map(|r| r["version"].as_u64()).collect::<Vec<_>>(), [3], "{dry}");
    assert_eq!(dry["bytes_freed"], 18_000 + bad_size, "{dry}");
    assert!(
        orphan.exists() && dead_tmp.exists() && stray_draft.exists() && Path::new(bad_path).exists(),
        "dry run removes nothing"
    );
    let done = env.vdim_json(&["image", "gc"]);
    assert_eq!(done["bytes_freed"], 18_000 + bad_size);
    assert!(!Path::new(bad_path).exists());
    let mut expect = before.clone();
    expect.retain(|f| !bad_path.ends_with(f.as_str()));
    assert_eq!(env.store_files(), expect);
    // History keeps the removed version's record; everything else still verifies.
    let h = env.vdim_json(&["image", "history", "a"]);
    assert!(h["versions"][2]["removed"].is_string(), "{h}");
    env.vdim(&["image", "verify"]).assert_success();
    env.vdim(&["image", "export", "a", "3", env.path("x.qcow2").to_str().unwrap()])
        .assert_failure()
        .assert_stderr_contains("removed by gc");
    for n in [1, 2, 4, 5, 6] {
        env.vdim_json(&["image", "export", "a", &n.to_string(), env.path(&format!("e{n}.qcow2")).to_str().unwrap()]);
    }
}

trait VerifyExt {
    fn vim_verify_json_failing(&self) -> serde_json::Value;
}
impl VerifyExt for Env {
    fn vim_verify_json_failing(&self) -> serde_json::Value {
        let r = self.vdim(&["--json", "image", "verify"]);
        r.assert_failure();
        r.json()
    }
}

#[test]
fn export_writes_one_flattened_standalone_qcow2_equal_to_the_version() {
    let env = Env::new();
    imported(&env, "a");
    let s = seal_change(&env, "a", 0x44, "x");
    let out = env.path("out.qcow2");
    let r = env.vdim_json(&["image", "export", "a", "2", out.to_str().unwrap()]);
    assert_eq!(r["version"], 2);
    assert_eq!(header_backing(&out), (None, None));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2", out.to_str().unwrap(), s["path"].as_str().unwrap()])
        .status()
        .unwrap();
    assert!(cmp.success());
    env.vdim(&["image", "export", "a", "2", out.to_str().unwrap()])
        .assert_failure()
        .assert_stderr_contains("already exists");
    env.vdim(&["image", "export", "a", "9", env.path("x.qcow2").to_str().unwrap()])
        .assert_exit_code(4)
        .assert_stderr_contains("has no version 9");
}

#[test]
fn bad_names_unknown_objects_and_missing_files_change_nothing() {
    let env = Env::new();
    imported(&env, "a");
    let before = env.store_files();
    let hist = env.vdim(&["--json", "image", "history", "a"]).stdout();
    let src = env.path("a-src.qcow2");
    for bad in ["Win11", "../x", "a/b", "_x", "x y", "x'><", &"x".repeat(64), ""] {
        env.vdim(&["image", "import", bad, src.to_str().unwrap()])
            .assert_failure()
            .assert_stderr_contains("is not allowed");
    }
    env.vdim(&["image", "import", "a", src.to_str().unwrap()])
        .assert_failure()
        .assert_stderr_contains("already exists");
    env.vdim(&["image", "import", "n", "/nonexistent/disk.qcow2"]).assert_failure();
    env.vdim(&["image", "import", "n", env.path("").to_str().unwrap()]).assert_failure();
    env.vdim(&["image", "history", "nope"]).assert_exit_code(4).assert_stderr_contains("no image named 'nope'");
    env.vdim(&["image", "edit", "nope"]).assert_exit_code(4);
    env.vdim(&["image", "verify", "nope"]).assert_exit_code(4);
    let empty = env.path("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    env.vdim(&["image", "import", "n", empty.to_str().unwrap()]).assert_failure();
    assert_eq!(env.store_files(), before);
    assert_eq!(env.vdim(&["--json", "image", "history", "a"]).stdout(), hist);
    env.vdim(&["image", "history", "n"]).assert_exit_code(4);
}

/// A fake `qemu-img` first on PATH that logs every call, then runs the real one.
fn spy_path(env: &Env) -> (String, std::path::PathBuf) {
    let bin = env.path("spybin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = env.path("qemu-img.calls");
    let script = format!("#!/bin/sh\necho \"$@\" >> {}\nexec /usr/bin/qemu-img \"$@\"\n", log.display());
    let p = bin.join("qemu-img");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    (format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()), log)
}

#[test]
fn hostile_images_are_refused_before_qemu_img_opens_them() {
    let env = Env::new();
    let (path, log) = spy_path(&env);
    let base = env.path("base.raw");
    marker_raw(&base, "h", "ok", 1 << 20);
    let backing = env.path("backing.qcow2");
    qemu_img_create(&backing, "qcow2", "1M", &["-b", "/etc/passwd", "-F", "raw"]);
    let datafile = env.path("datafile.qcow2");
    qemu_img_create(&datafile, "qcow2", "1M", &["-o", &format!("data_file={}", env.path("data.bin").display())]);
    let qcow_as_raw = env.path("disguised.raw");
    qemu_img_create(&qcow_as_raw, "qcow2", "1M", &["-b", "/etc/shadow", "-F", "raw"]);
    let plain_qcow = env.path("plain.qcow2");
    qemu_img_create(&plain_qcow, "qcow2", "1M", &[]);
    let flat_vmdk = env.path("flat.vmdk");
    qemu_img_create(&flat_vmdk, "vmdk", "1M", &["-o", "subformat=monolithicFlat"]);
    let corrupt = env.path("corrupt.qcow2");
    qemu_img_create(&corrupt, "qcow2", "1M", &[]);
    let mut b = std::fs::read(&corrupt).unwrap();
    b[79] |= 0x02; // incompatible_features bit 1: corrupt
    std::fs::write(&corrupt, &b).unwrap();

    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&backing, vec![], "backing file"),
        (&datafile, vec![], "data file"),
        (&qcow_as_raw, vec![], "qcow2"),
        (&plain_qcow, vec!["--format", "raw"], "qcow2"),
        (&flat_vmdk, vec![], "vmdk"),
        (&corrupt, vec![], "corrupt"),
    ];
    for (file, extra, needle) in cases {
        let mut args = vec!["image", "import", "evil", file.to_str().unwrap()];
        args.extend(extra);
        let out = env.cmd().env("PATH", &path).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{file:?} must be refused");
        assert!(err.contains(needle), "{file:?}: message should mention {needle:?}: {err}");
        assert!(
            !log.exists(),
            "qemu-img was run on hostile {file:?}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert!(env.store_files().is_empty());
    env.vdim(&["image", "history", "evil"]).assert_exit_code(4);
    // The spy works: a good image does reach qemu-img, with the format stated.
    let good = env.cmd().env("PATH", &path).args(["image", "import", "good", base.to_str().unwrap()]).output().unwrap();
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.lines().all(|l| l.contains("-f ")), "every qemu-img call states the format: {calls}");
}

#[test]
fn a_second_command_on_a_busy_image_says_busy_and_changes_nothing() {
    let env = Env::new();
    imported(&env, "a");
    let d = env.vdim_json(&["image", "edit", "a"]);
    qemu_io_write(Path::new(d["draft"].as_str().unwrap()), 0x55, 0, 65536);
    // Another holder of the image's lock, as a running vdim command would be.
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(env.home().join("locks/image-a.lock")).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let r = env.vdim(&["image", "seal", "a"]);
    drop(lock);
    r.assert_exit_code(3).assert_stderr_contains("image 'a' is busy");
    assert_eq!(env.vdim_json(&["image", "history", "a"])["versions"].as_array().unwrap().len(), 1);
    env.vdim_json(&["image", "seal", "a"]);
}

#[test]
fn concurrent_seals_never_interleave() {
    let env = Env::new();
    imported(&env, "a");
    let d = env.vdim_json(&["image", "edit", "a"]);
    qemu_io_write(Path::new(d["draft"].as_str().unwrap()), 0x66, 0, 1 << 20);
    let kids: Vec<_> = (0..4)
        .map(|_| env.cmd().args(["image", "seal", "a"]).stderr(std::process::Stdio::piped()).spawn().unwrap())
        .collect();
    let outs: Vec<_> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    assert_eq!(outs.iter().filter(|o| o.status.success()).count(), 1, "exactly one seal wins");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("busy") || e.contains("has no draft"), "{e}");
    }
    assert_eq!(env.vdim_json(&["image", "history", "a"])["versions"].as_array().unwrap().len(), 2);
    env.vdim(&["image", "verify"]).assert_success();
}

#[test]
fn killed_import_leaves_old_or_new_state_and_gc_heals() {
    let env = Env::new();
    let big = env.path("big.raw");
    // Non-zero data so qemu-img really writes it (zero clusters would be skipped).
    let chunk = vec![0x5au8; 1 << 20];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        for _ in 0..768 {
            f.write_all(&chunk).unwrap();
        }
    }
    for delay_ms in [50u64, 400, 1500] {
        let name = format!("k{delay_ms}");
        let mut child = env.cmd().args(["image", "import", &name, big.to_str().unwrap()]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Either the import finished (new state) or no trace of it is in the catalog.
        let h = env.vdim(&["--json", "image", "history", &name]);
        if h.out.status.success() {
            env.vdim(&["image", "verify", &name]).assert_success();
        } else {
            h.assert_exit_code(4);
        }
    }
    // Kill any qemu-img orphan the killed vdim left behind before gc looks.
    let _ = Command::new("pkill").args(["-f", big.to_str().unwrap()]).status();
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.vdim_json(&["image", "gc"]);
    env.vdim(&["image", "verify"]).assert_success();
}

/// A tmpfs home too small for the image: refused up front, nothing written.
#[test]
fn full_disk_is_refused_before_writing_and_leaves_no_partial_version() {
    let env = Env::new();
    let small = env.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success(), "this test needs root to mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let home = small.join("home");
    let run = |args: &[&str]| env.cmd().env("VDIM_HOME", &home).args(args).output().unwrap();
    assert!(run(&["init"]).status.success());
    let big = env.path("big.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        for _ in 0..64 {
            f.write_all(&vec![0x77u8; 1 << 20]).unwrap();
        }
    }
    let out = run(&["image", "import", "big", big.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not enough free space"), "{err}");
    assert_eq!(std::fs::read_dir(home.join("layers")).unwrap().count(), 0, "no partial layer");
    assert!(!run(&["image", "history", "big"]).status.success());
}

#[test]
fn qemu_img_runs_bounded_and_a_hung_one_is_stopped_without_leaving_anything() {
    let env = Env::new();
    let raw = env.path("a.raw");
    marker_raw(&raw, "b", "ok", 1 << 20);
    let bin = env.path("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let limits = env.path("limits");
    // A qemu-img that records the limits it runs under, then hangs on convert.
    let script = format!(
        "#!/bin/sh\necho \"as=$(ulimit -v) cpu=$(ulimit -t)\" >> {}\ncase \"$1\" in convert) sleep 30;; esac\nexec /usr/bin/qemu-img \"$@\"\n",
        limits.display()
    );
    std::fs::write(bin.join("qemu-img"), script).unwrap();
    std::fs::set_permissions(bin.join("qemu-img"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let started = std::time::Instant::now();
    let out = env
        .cmd()
        .env("PATH", &path)
        .env("VDIM_QEMU_IMG_TIMEOUT", "2")
        .args(["image", "import", "hung", raw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("took longer than 2 s and was stopped"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the hung qemu-img was not stopped");
    let seen = std::fs::read_to_string(&limits).unwrap();
    // info (2 GiB, 60 s) then convert (4 GiB, 4 h): ulimit -v is in KiB.
    assert!(seen.contains("as=2097152 cpu=60"), "{seen}");
    assert!(seen.contains("as=4194304 cpu=14400"), "{seen}");
    assert!(env.store_files().is_empty(), "no partial layer: {:?}", env.store_files());
    env.vdim(&["image", "history", "hung"]).assert_exit_code(4);
    let ps =
        String::from_utf8_lossy(&Command::new("pgrep").args(["-f", "sleep 30"]).output().unwrap().stdout).into_owned();
    let ours = ps.lines().filter(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/environ")).is_ok_and(|e| e.contains(bin.to_str().unwrap()))
    });
    assert_eq!(ours.count(), 0, "the hung qemu-img's whole process group is killed");
}
