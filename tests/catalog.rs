//! The catalog's location: the home's SQLite file, or a PostgreSQL database the home records.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;

fn without_catalog_env(env: &Env, args: &[&str]) -> std::process::Output {
    env.cmd().env_remove("VDIM_CATALOG").args(args).output().unwrap()
}

#[test]
fn init_with_a_postgresql_url_records_it_and_later_commands_use_it() {
    let env = Env::on(Engine::Postgres);
    let url_file = env.home().join("catalog.url");
    assert_eq!(std::fs::metadata(&url_file).unwrap().permissions().mode() & 0o777, 0o600, "it may hold a password");
    assert!(!env.home().join("catalog.db").exists(), "no SQLite catalog beside it");
    marker_image(&env, "img", "pg-v1");
    // No flag, no VDIM_CATALOG: the home's recorded URL.
    let out = without_catalog_env(&env, &["--json", "image", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "img", "{list}");
    let counts = env.catalog().read(|tx| tx.counts()).unwrap();
    assert_eq!(counts.images, 1);
}

#[test]
fn a_home_whose_catalog_holds_objects_keeps_it() {
    let env = Env::new();
    marker_image(&env, "img", "sq-v1");
    let db = vdim::catalog::scratch::ScratchDatabase::new();
    let out = env.cmd().args(["--catalog", &db.url, "init"]).output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already has its catalog") && err.contains("1 images"), "{err}");
    assert!(!env.home().join("catalog.url").exists(), "the home still uses its own catalog");
    env.vdim(&["image", "history", "img"]).assert_success();
    // Nothing was made in the database either.
    let mut pg = vdim::catalog::Catalog::connect(&vdim::catalog::Location::parse(&db.url), true).unwrap();
    assert_eq!(pg.read(|tx| tx.counts()).unwrap(), vdim::catalog::Counts::default());
}

#[test]
fn a_catalog_url_password_is_never_printed() {
    let env = Env::new();
    let url = "postgres://vdim:hunter2secret@127.0.0.1:1/vdim";
    let out = env.cmd().args(["--catalog", url, "image", "list"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://vdim:***@127.0.0.1:1/vdim"), "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");
}
