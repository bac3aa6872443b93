//! A second libvirt "host" on this machine for tests: its own libvirtd in a network namespace
//! (address 10.77.N.2, reached over qemu+tcp like a remote host) and a mount namespace with
//! its own /etc/libvirt (a copy, plus what the test adds to qemu.conf) and state directories.
//! The system libvirtd and its qemu.conf are never touched. Drop kills every process in the
//! namespace (its libvirtd and QEMUs), deletes the namespace, the veth pair and the files,
//! also when the test failed. See machine-notes "Several hosts on one machine".

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct TestHost {
    /// The `N` of 10.77.N.0/24.
    pub n: u32,
    /// The host's address, where its libvirtd and displays listen.
    pub addr: String,
    /// `qemu+tcp://10.77.N.2/system`.
    pub uri: String,
    pub netns: String,
    veth: String,
    dir: Option<tempfile::TempDir>,
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> Output {
    let out = run(cmd, args);
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

impl TestHost {
    /// Start a host. `prepare` runs first with the host's private directory (e.g. to write
    /// certificates there) and its address, and returns lines to add to its qemu.conf.
    pub fn start(prepare: impl FnOnce(&Path, &str) -> String) -> TestHost {
        let mut host = Self::claim();
        let root = host.root().to_path_buf();
        let qemu_conf_extra = prepare(&root, &host.addr);
        for d in ["run", "lib", "cache", "log", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // The daemons' settings only: not the system daemon's domain, network or storage definitions.
        for e in std::fs::read_dir("/etc/libvirt").unwrap().flatten() {
            let name = e.file_name();
            if e.path().is_file() && name.to_string_lossy().ends_with(".conf") {
                std::fs::copy(e.path(), root.join("etc").join(&name)).unwrap();
            }
        }
        let conf = root.join("etc/qemu.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        // No virtlogd and no cgroups inside the namespace.
        text.push_str("\nstdio_handler = \"file\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n");
        text.push_str(&qemu_conf_extra);
        std::fs::write(&conf, text).unwrap();
        let daemon_conf = root.join("libvirtd.conf");
        std::fs::write(
            &daemon_conf,
            format!(
                "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{}\"\nauth_tcp = \"none\"\n\
                 unix_sock_dir = \"/run/libvirt\"\nlog_outputs = \"3:file:{}\"\n",
                host.addr,
                root.join("libvirtd.log").display()
            ),
        )
        .unwrap();
        let r = root.display();
        let script = format!(
            "set -e; mount --bind {r}/run /run/libvirt; mount --bind {r}/lib /var/lib/libvirt; \
             mount --bind {r}/cache /var/cache/libvirt; mount --bind {r}/log /var/log/libvirt; \
             mount --bind {r}/etc /etc/libvirt; \
             exec libvirtd -d --listen --config {r}/libvirtd.conf --pid-file {r}/libvirtd.pid"
        );
        let out = run(
            "ip",
            &["netns", "exec", &host.netns, "unshare", "-m", "--propagation", "private", "bash", "-c", &script],
        );
        assert!(out.status.success(), "libvirtd in {}: {}", host.netns, String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if run("virsh", &["-c", &host.uri, "version"]).status.success() {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(root.join("libvirtd.log")).unwrap_or_default();
                host.stop();
                panic!("libvirtd of test host {} did not answer at {}:\n{log}", host.n, host.uri);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        host
    }

    /// A free 10.77.N.0/24 with a network namespace and veth pair of this test's own. N is
    /// above 200: 1..=200 are `scripts/fake-hosts`' (see hosts.rs).
    fn claim() -> TestHost {
        for i in 0..50 {
            let n = 201 + (std::process::id() + i) % 50;
            let addrs = String::from_utf8_lossy(&run("ip", &["-o", "-4", "addr", "show"]).stdout).into_owned();
            if addrs.contains(&format!(" 10.77.{n}.")) {
                continue;
            }
            let netns = format!("vdimh{n}");
            // `ip netns add` fails when the name is taken: that is the claim.
            if !run("ip", &["netns", "add", &netns]).status.success() {
                continue;
            }
            let veth = format!("vdh{n}");
            let peer = format!("vdh{n}p");
            if !run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", &peer]).status.success() {
                let _ = run("ip", &["netns", "del", &netns]);
                continue;
            }
            let dir = tempfile::Builder::new().prefix(&format!("vdimhost{n}-")).tempdir().unwrap();
            let host = TestHost {
                n,
                addr: format!("10.77.{n}.2"),
                uri: format!("qemu+tcp://10.77.{n}.2/system"),
                netns: netns.clone(),
                veth: veth.clone(),
                dir: Some(dir),
            };
            ok("ip", &["link", "set", &peer, "netns", &netns]);
            ok("ip", &["addr", "add", &format!("10.77.{n}.1/24"), "dev", &veth]);
            ok("ip", &["link", "set", &veth, "up"]);
            let inside = |args: &[&str]| {
                let mut a = vec!["netns", "exec", &netns];
                a.extend_from_slice(args);
                ok("ip", &a);
            };
            inside(&["ip", "addr", "add", &format!("10.77.{n}.2/24"), "dev", &peer]);
            inside(&["ip", "link", "set", &peer, "up"]);
            inside(&["ip", "link", "set", "lo", "up"]);
            return host;
        }
        panic!("no free 10.77.N.0/24 for a test host");
    }

    /// The host's private directory (its /etc/libvirt copy, state, logs).
    pub fn root(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// Run a command inside the host's network namespace (e.g. `ss`).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut a = vec!["netns", "exec", &self.netns, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Power failure: every process of the host dies at once.
    fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = String::from_utf8_lossy(&run("ip", &["netns", "pids", &self.netns]).stdout).into_owned();
            let pids: Vec<&str> = pids.split_whitespace().collect();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for p in pids {
                let _ = run("kill", &["-9", p]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        self.kill_all();
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = run("ip", &["link", "del", &self.veth]);
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop();
    }
}
