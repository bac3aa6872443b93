//! File modes of the vdim home: desktop overlays, drafts, run directories, NVRAM and the
//! catalog are private to the owner (0600 files, 0700 directories); sealed layers are 0440 or
//! stricter. Every file and directory is stat'ed after the real binary made it.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Every path under `root` (itself included) with its permission bits.
fn modes(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = vec![];
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        out.push((p.clone(), meta.permissions().mode() & 0o7777, meta.is_dir()));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out
}

/// Layers: read-only, nobody but owner and group (0440 or stricter). Everything else: no
/// group or other bits at all.
#[track_caller]
fn assert_private(home: &Path) -> Vec<(PathBuf, u32, bool)> {
    let all = modes(home);
    let layers = home.join("layers");
    let mut bad = vec![];
    for (p, mode, dir) in &all {
        let ok = if !dir && p.parent() == Some(layers.as_path()) { mode & !0o440 == 0 } else { mode & 0o077 == 0 };
        if !ok {
            bad.push(format!("{} {:04o}", p.strip_prefix(home).unwrap().display(), mode));
        }
    }
    assert!(bad.is_empty(), "readable by other local users (or writable layers): {bad:#?}");
    all
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode() & 0o7777
}

#[test]
fn store_files_are_private_after_import_edit_seal_and_pool_create() {
    let env = Env::new();
    let home = env.home();
    assert_eq!(mode_of(&home.join("catalog.db")), 0o600);
    marker_image(&env, "img", "modes-v1");
    let draft = env.vdim_json(&["image", "edit", "img"]);
    let draft = PathBuf::from(draft["draft"].as_str().unwrap());
    assert_eq!(mode_of(&draft), 0o600, "draft");
    assert_private(&home);
    qemu_io_write(&draft, 0x42, 1 << 20, 4096);
    env.vdim_json(&["image", "seal", "img", "--note", "v2"]);
    let layers: Vec<_> = std::fs::read_dir(home.join("layers")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(layers.len(), 2, "{layers:?}");
    for l in &layers {
        assert_eq!(mode_of(l), 0o440, "{}", l.display());
    }
    let create = env.vdim(&[
        "--connect",
        "test:///default",
        "--json",
        "pool",
        "create",
        "p",
        "--image",
        "img",
        "--size",
        "2",
        "--profile",
        "test-linux",
    ]);
    create.assert_success();
    for dir in [home.join("desktops/p"), home.join("run/p"), home.join("drafts"), home.join("run")] {
        assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
    }
    assert_eq!(mode_of(&home.join("desktops/p/vdim-p-001.qcow2")), 0o600);
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let p = home.join(f);
        if p.exists() {
            assert_eq!(mode_of(&p), 0o600, "{f}");
        }
    }
    let all = assert_private(&home);
    assert!(all.len() > 10, "the walk saw the home: {all:?}");
    // verify agrees that 0440 layers are sealed layers.
    env.vdim(&["image", "verify"]).assert_success();
}

#[test]
fn nvram_and_run_files_of_a_running_uefi_desktop_are_private() {
    let t = LibvirtEnv::new("mod");
    let pool = t.pool_name("w");
    let src = t.env.path("w11.qcow2");
    // windows11's minimum disk; sparse, so it costs nothing.
    sh("qemu-img", &["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64G"]);
    t.vdim_json(&["image", "import", "win11", src.to_str().unwrap()]);
    t.create_pool(&pool, "win11", "prod", 1, "windows11", &["--start"]);
    let run = t.env.home().join("run").join(&pool);
    let desktops = t.env.home().join("desktops").join(&pool);
    let nvram = desktops.join(format!("vdim-{pool}-001.nvram"));
    assert!(nvram.exists(), "libvirt made the NVRAM from its template: {:?}", modes(&desktops));
    assert_eq!(mode_of(&nvram), 0o600);
    assert_eq!(mode_of(&desktops), 0o700);
    assert_eq!(mode_of(&run), 0o700);
    assert_private(&t.env.home());
    t.vdim(&["pool", "delete", &pool, "--force"]).assert_success();
}
