//! Several libvirt hosts on this machine for one test, through `scripts/fake-hosts` (its header
//! says what a host is: a libvirtd in network and mount namespaces of its own, reached over
//! qemu+tcp). `FakeHosts::up(n)` claims n free host numbers from 100 up, so tests running in
//! parallel never share a host, and Drop takes exactly those hosts down again (processes,
//! namespace, veth, directory), also when the test failed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = "/var/tmp/vdim-fake-hosts";
/// Tests take host numbers from here up; lower ones are for the bench and people.
const FIRST: u32 = 100;
/// The script's last host number.
const LAST: u32 = 200;

/// One host as `fake-hosts up` printed it.
#[derive(Debug, Clone)]
pub struct FakeHost {
    /// The `k` of 10.77.k.0/24.
    pub number: u32,
    /// `h<k>`.
    pub name: String,
    /// `qemu+tcp://10.77.<k>.2/system`.
    pub uri: String,
    /// Its state directory (its /etc/libvirt copy, run, lib, cache, log; libvirtd.log).
    pub dir: PathBuf,
    /// Its network namespace, where its libvirtd and QEMUs run.
    pub netns: String,
    /// The host side of its veth pair.
    pub veth: String,
}

pub struct FakeHosts {
    base: u32,
    count: u32,
    hosts: Vec<FakeHost>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fake-hosts")
}

fn fake_hosts(args: &[String]) -> Output {
    Command::new(script()).args(args).output().unwrap_or_else(|e| panic!("scripts/fake-hosts {args:?}: {e}"))
}

/// The start time of a process (field 22 of /proc/<pid>/stat), to tell it from a later one
/// with the same pid.
fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(String::from)
}

/// Whether the process that wrote a claim (`<pid> <start time>`) still runs.
fn claim_alive(claim: &Path) -> bool {
    let Ok(text) = fs::read_to_string(claim.join("owner")) else { return false };
    let mut it = text.split_whitespace();
    match (it.next().and_then(|p| p.parse().ok()), it.next()) {
        (Some(pid), Some(start)) => start_time(pid).as_deref() == Some(start),
        _ => false,
    }
}

/// Whether host number `k` is free for this test: unclaimed (a claim of a process gone is
/// taken back, its host removed), no fake host of the script there, no address of 10.77.k.0/24
/// on this machine and no namespace of that number (`tests/common/host.rs` makes `vdimh<k>`).
fn free(claims: &Path, k: u32, addresses: &str) -> bool {
    let claim = claims.join(format!("h{k}"));
    if claim.exists() {
        if claim_alive(&claim) {
            return false;
        }
        let out = fake_hosts(&["down".into(), "1".into(), "--base".into(), k.to_string()]);
        if !out.status.success() {
            eprintln!("fake host {k} of a test gone: {}", String::from_utf8_lossy(&out.stderr));
            return false;
        }
        let _ = fs::remove_dir_all(&claim);
    }
    !Path::new(ROOT).join(format!("h{k}")).exists()
        && !addresses.contains(&format!(" 10.77.{k}."))
        && !Path::new(&format!("/run/netns/vdimfh{k}")).exists()
        && !Path::new(&format!("/run/netns/vdimh{k}")).exists()
}

/// Claim `n` consecutive free host numbers: one directory per host under `claims/`, made while
/// holding `claims/.lock`, holding this process's pid and start time.
fn claim(n: u32) -> u32 {
    let claims = Path::new(ROOT).join("claims");
    fs::create_dir_all(&claims).unwrap();
    let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(claims.join(".lock")).unwrap();
    lock.lock().unwrap();
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
    let addresses = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = std::process::id();
    let owner = format!("{pid} {}", start_time(pid).unwrap());
    for base in FIRST..=LAST + 1 - n {
        if (base..base + n).all(|k| free(&claims, k, &addresses)) {
            for k in base..base + n {
                let c = claims.join(format!("h{k}"));
                fs::create_dir(&c).unwrap();
                fs::write(c.join("owner"), &owner).unwrap();
            }
            return base;
        }
    }
    panic!("no {n} free fake host numbers in {FIRST}..={LAST} (see {}/claims)", ROOT);
}

/// `h<k> <uri> <dir>`, with the names from the host's `fake-host` file.
fn parse(line: &str) -> FakeHost {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 3, "fake-hosts printed {line:?}");
    let dir = PathBuf::from(f[2]);
    let info = fs::read_to_string(dir.join("fake-host")).unwrap();
    let field =
        |key: &str| info.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(String::from).unwrap_or_default();
    FakeHost {
        number: f[0].trim_start_matches('h').parse().unwrap(),
        name: f[0].to_string(),
        uri: f[1].to_string(),
        dir,
        netns: field("netns"),
        veth: field("veth"),
    }
}

impl FakeHosts {
    /// `n` hosts of this test's own, each answering on its URI.
    pub fn up(n: u32) -> FakeHosts {
        assert!((1..=LAST + 1 - FIRST).contains(&n), "FakeHosts::up({n})");
        let base = claim(n);
        // From here Drop takes the hosts down, also when `up` fails half way.
        let mut hosts = FakeHosts { base, count: n, hosts: vec![] };
        let out = fake_hosts(&["up".into(), n.to_string(), "--base".into(), base.to_string()]);
        assert!(
            out.status.success(),
            "scripts/fake-hosts up {n} --base {base}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        hosts.hosts = String::from_utf8_lossy(&out.stdout).lines().map(parse).collect();
        assert_eq!(hosts.hosts.len(), n as usize, "one line per host: {:?}", hosts.hosts);
        hosts
    }

    pub fn hosts(&self) -> &[FakeHost] {
        &self.hosts
    }
    pub fn uris(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.uri.as_str()).collect()
    }
    pub fn names(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    fn host_cmd(&self, cmd: &str, i: usize) {
        let h = &self.hosts[i];
        let out = fake_hosts(&[cmd.into(), h.number.to_string()]);
        assert!(out.status.success(), "fake-hosts {cmd} {}: {}", h.number, String::from_utf8_lossy(&out.stderr));
    }
    /// Power failure of host `i` (0-based): its libvirtd and QEMUs die at once.
    pub fn kill(&self, i: usize) {
        self.host_cmd("kill", i);
    }
    /// Take host `i`'s link down; its processes keep running.
    pub fn cut(&self, i: usize) {
        self.host_cmd("cut", i);
    }
    /// Bring host `i`'s link up again.
    pub fn heal(&self, i: usize) {
        self.host_cmd("heal", i);
    }
    /// The pids of every process of host `i` (its libvirtd and QEMUs).
    pub fn pids(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.hosts[i].netns]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }
}

impl Drop for FakeHosts {
    fn drop(&mut self) {
        let out = fake_hosts(&["down".into(), self.count.to_string(), "--base".into(), self.base.to_string()]);
        if !out.status.success() {
            // No panic in drop (the test may be panicking already): the claims stay, so the
            // next test that finds them removes the hosts.
            eprintln!("fake-hosts down {} --base {}: {}", self.count, self.base, String::from_utf8_lossy(&out.stderr));
            return;
        }
        for k in self.base..self.base + self.count {
            let _ = fs::remove_dir_all(Path::new(ROOT).join("claims").join(format!("h{k}")));
        }
    }
}
