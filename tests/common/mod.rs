//! Shared harness for binary-level tests: a temp vdim home, a runner for the real `vdim`
//! binary with `assert_success` / `assert_exit_code`, and qcow2 fixtures made with qemu-img.
#![allow(dead_code)]

pub mod efi;
pub mod host;
pub mod hosts;
pub mod prometheus;
pub mod serve;
pub mod viewer;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use vdim::catalog::sql::Engine;

pub struct Env {
    /// The catalog's PostgreSQL database when the test runs on one (every command is given
    /// it as VDIM_CATALOG); dropped after the commands that clean up.
    pub db: Option<vdim::catalog::scratch::ScratchDatabase>,
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub out: Output,
    pub args: Vec<String>,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.out.status.success(),
            "vdim {:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.args,
            self.out.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.out.status.success(), "vdim {:?} should fail but succeeded:\n{}", self.args, self.stdout());
        self
    }
    #[track_caller]
    pub fn assert_exit_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.out.status.code(),
            Some(code),
            "vdim {:?}: stdout {} stderr {}",
            self.args,
            self.stdout(),
            self.stderr()
        );
        self
    }
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(self.stderr().contains(needle), "stderr of vdim {:?} lacks {needle:?}:\n{}", self.args, self.stderr());
        self
    }
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("vdim {:?} printed no JSON ({e}):\n{}", self.args, self.stdout()))
    }
}

impl Env {
    pub fn new() -> Env {
        Env::on(Engine::Sqlite)
    }
    /// A home whose catalog is on `engine` (PostgreSQL: a scratch database of its own).
    pub fn on(engine: Engine) -> Env {
        let dir = tempfile::Builder::new().prefix("vdimtest-").tempdir().expect("tempdir");
        let db = (engine == Engine::Postgres).then(vdim::catalog::scratch::ScratchDatabase::new);
        let env = Env { db, dir };
        env.vdim(&["init"]).assert_success();
        env
    }
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    /// Sets a session's expiry to now in the catalog, as the clock would.
    pub fn expire_session_now(&self, id: &str) {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.catalog()
            .write(|tx| {
                tx.sql()
                    .execute("UPDATE sessions SET expires_at = ?2 WHERE id = ?1", [id, now.as_str()])
                    .map_err(vdim::catalog::CatalogError::from)
            })
            .unwrap();
    }
    /// The home's catalog, opened as the commands open it.
    pub fn catalog(&self) -> vdim::catalog::Catalog {
        let location = match &self.db {
            Some(db) => vdim::catalog::Location::parse(&db.url),
            None => vdim::catalog::Location::Sqlite(self.home().join("catalog.db")),
        };
        vdim::catalog::Catalog::connect(&location, false).expect("open the catalog")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn cmd(&self) -> Command {
        self.with_env(Command::new(env!("CARGO_BIN_EXE_vdim")))
    }
    /// `vdim` as on another machine: in a UTS namespace of its own named `host` (leases and
    /// rollout drivers tell machines apart by host name; a pid says nothing across them).
    pub fn cmd_on_host(&self, host: &str) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--uts", "sh", "-c", &format!("hostname {host} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_vdim")]);
        self.with_env(c)
    }
    fn with_env(&self, mut c: Command) -> Command {
        c.env("VDIM_HOME", self.home()).env("USER", "tester").env_remove("VDIM_CONNECT");
        match &self.db {
            Some(db) => c.env("VDIM_CATALOG", &db.url),
            None => c.env_remove("VDIM_CATALOG"),
        };
        c
    }
    pub fn vdim(&self, args: &[&str]) -> Run {
        let out = self.cmd().args(args).output().expect("run vdim");
        Run { out, args: args.iter().map(|s| s.to_string()).collect() }
    }
    pub fn vdim_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let r = self.vdim(&a);
        r.assert_success();
        r.json()
    }
    /// Every file under the home's layers/ and drafts/, for "nothing changed" checks.
    pub fn store_files(&self) -> Vec<String> {
        let mut out = vec![];
        for d in ["layers", "drafts"] {
            if let Ok(rd) = std::fs::read_dir(self.home().join(d)) {
                for e in rd.flatten() {
                    out.push(format!("{d}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        out
    }
}

pub fn sh(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A raw disk whose first bytes are the test-guest marker (see machine-notes).
pub fn marker_raw(path: &Path, label: &str, health: &str, size: u64) {
    let mut data = format!("VDIM-TEST {label} health={health}").into_bytes();
    data.resize(512, 0);
    std::fs::write(path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
}

/// Write `pattern` bytes at `offset` into a qcow2 with qemu-io (as a patch would).
pub fn qemu_io_write(path: &Path, pattern: u8, offset: u64, len: u64) {
    sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} {len}"), path.to_str().unwrap()]);
}

pub fn qemu_io_read_pattern(path: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-U", "-c", &format!("read -P {pattern} {offset} {len}"), path.to_str().unwrap()])
        .output()
        .unwrap();
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

/// Environment for tests on the real libvirt daemon: TCG guests, a unique pool-name prefix,
/// and a guard that deletes every pool (and any domain named for it) even when the test fails.
pub struct LibvirtEnv {
    pub env: Env,
    pub prefix: String,
    pools: std::cell::RefCell<Vec<String>>,
}

impl LibvirtEnv {
    pub fn new(tag: &str) -> LibvirtEnv {
        LibvirtEnv::on(tag, Engine::Sqlite)
    }
    pub fn on(tag: &str, engine: Engine) -> LibvirtEnv {
        let env = Env::on(engine);
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prefix = format!("t{tag}{}x{n}", std::process::id());
        LibvirtEnv { env, prefix, pools: Default::default() }
    }
    /// A pool name owned by this test; remembered for cleanup.
    pub fn pool_name(&self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        self.pools.borrow_mut().push(name.clone());
        name
    }
    pub fn vdim(&self, args: &[&str]) -> Run {
        let out = self.env.cmd().env("VDIM_VIRT_TYPE", "qemu").args(args).output().expect("run vdim");
        Run { out, args: args.iter().map(|s| s.to_string()).collect() }
    }
    pub fn vdim_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let r = self.vdim(&a);
        r.assert_success();
        r.json()
    }
    /// `vdim pool create` of a pool this test owns; `extra` flags such as `--start`.
    pub fn create_pool(
        &self,
        pool: &str,
        image: &str,
        channel: &str,
        size: u32,
        profile: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let size = size.to_string();
        let mut args =
            vec!["pool", "create", pool, "--image", image, "--channel", channel, "--size", &size, "--profile", profile];
        args.extend_from_slice(extra);
        self.vdim_json(&args)
    }

    /// Domains libvirt has whose names start with this test's prefix.
    pub fn domains(&self) -> Vec<String> {
        let out = Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| {
                l.starts_with(&format!("vdim-{}", self.prefix)) || l.starts_with(&format!("vdim-dev-{}", self.prefix))
            })
            .map(String::from)
            .collect()
    }
    /// The latest `GUEST-MARKER:` line of a desktop's serial console, waiting up to `secs`.
    pub fn wait_marker(&self, pool: &str, desktop: &str, want: &str, secs: u64) -> String {
        let log = self.env.home().join("run").join(pool).join(format!("{desktop}.serial.log"));
        wait_serial(&log, desktop, want, secs)
    }
}

/// The latest `GUEST-MARKER:` line of the serial console logged at `log`, once it contains
/// `want` and the guest said it is healthy, waiting up to `secs`.
pub fn wait_serial(log: &Path, desktop: &str, want: &str, secs: u64) -> String {
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut last = String::new();
        while std::time::Instant::now() < deadline {
            let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            if let Some(l) = text.lines().rev().find(|l| l.starts_with("GUEST-MARKER:")) {
                last = l.trim_end_matches('\r').to_string();
                if last.contains(want) && text.contains("GUEST: healthy") {
                    return last;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        panic!("{desktop}: no marker {want:?} within {secs} s (last: {last:?}, log {log:?})");
    }
}

impl Drop for LibvirtEnv {
    fn drop(&mut self) {
        for p in self.pools.borrow().iter() {
            let _ = self.env.cmd().args(["pool", "delete", p, "--force"]).output();
        }
        for d in self.domains() {
            let _ = Command::new("virsh").args(["-c", "qemu:///system", "destroy", &d]).output();
            let _ = Command::new("virsh").args(["-c", "qemu:///system", "undefine", "--nvram", "--tpm", &d]).output();
        }
    }
}

/// An image whose versions carry test-guest markers: v1 "<label>-v1", each `seal_marker`
/// adds the next. Returns nothing; versions are numbered from 1.
pub fn marker_image(env: &Env, name: &str, label: &str) {
    let raw = env.path(&format!("{name}.raw"));
    marker_raw(&raw, label, "ok", 32 << 20);
    env.vdim_json(&["image", "import", name, raw.to_str().unwrap()]);
}

/// Seal a new version whose disk marker is `VDIM-TEST <label> health=<health>`.
pub fn seal_marker(env: &Env, name: &str, label: &str, health: &str) -> serde_json::Value {
    let d = env.vdim_json(&["image", "edit", name]);
    let m = env.path(&format!("marker-{}", label.replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
    let mut data = format!("VDIM-TEST {label} health={health}").into_bytes();
    data.resize(512, 0);
    std::fs::write(&m, &data).unwrap();
    sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -s {} 0 512", m.display()), d["draft"].as_str().unwrap()]);
    env.vdim_json(&["image", "seal", name, "--note", label])
}
