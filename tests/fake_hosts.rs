//! Several libvirt hosts on one machine (`scripts/fake-hosts`, `tests/common/hosts.rs`):
//! `vdim --connect` boots test guests on one fake host and nowhere else, a power failure takes
//! the host off the network, and nothing of the hosts is left afterwards.

mod common;
use common::hosts::FakeHosts;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn virsh(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout").args(["10", "virsh", "-c", uri]).args(args).output().unwrap()
}

fn domains(uri: &str) -> Vec<String> {
    let out = virsh(uri, &["list", "--all", "--name"]);
    assert!(out.status.success(), "virsh -c {uri} list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Processes whose command line mentions `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// A process that has not exited (a zombie has: it only waits for PID 1 to reap it).
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

fn cpus_allowed(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string()
}

#[test]
fn a_pool_boots_on_the_fake_host_it_names_only_and_a_power_failure_takes_that_host_away() {
    let hosts = FakeHosts::up(2);
    let (one, two) = (hosts.hosts()[0].clone(), hosts.hosts()[1].clone());
    assert_eq!(hosts.uris(), [one.uri.as_str(), two.uri.as_str()]);
    assert!(one.uri.starts_with("qemu+tcp://10.77.") && one.uri.ends_with(".2/system"), "{}", one.uri);
    let t = LibvirtEnv::new("fh");
    marker_image(&t.env, "img", "fh-v1");
    // Not `pool_name`: LibvirtEnv cleans up on qemu:///system, this pool lives on host one,
    // and taking the host down removes its guests.
    let pool = format!("{}p", t.prefix);
    let on_one = |args: &[&str]| {
        let mut a = vec!["--connect", one.uri.as_str()];
        a.extend_from_slice(args);
        t.vdim_json(&a)
    };
    let args =
        ["pool", "create", &pool, "--image", "img", "--channel", "prod", "--size", "2", "--profile", "test-linux"];
    on_one(&[&args[..], &["--start"]].concat());
    let show = on_one(&["pool", "show", &pool]);
    let desktops: Vec<String> =
        show["desktops"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(desktops.len(), 2, "{show}");
    // The guests read the kernel and their disks through the shared filesystem and write
    // their serial logs into the vdim home, from inside the host's mount namespace.
    for d in &desktops {
        t.wait_marker(&pool, d, "fh-v1", 180);
    }

    // The guests are on host one: its libvirtd has them, their QEMUs run in its namespace.
    let mut on_host_one = domains(&one.uri);
    on_host_one.sort();
    assert_eq!(on_host_one, desktops);
    let system = domains("qemu:///system");
    assert!(desktops.iter().all(|d| !system.contains(d)), "the system libvirtd has {system:?}");
    assert_eq!(domains(&two.uri), Vec::<String>::new(), "host two has no guests");
    let qemus: Vec<u32> = desktops.iter().flat_map(|d| processes_naming(&format!("guest={d},"))).collect();
    assert_eq!(qemus.len(), 2, "one QEMU per desktop");
    let pids = hosts.pids(0);
    assert!(qemus.iter().all(|q| pids.contains(q)), "QEMUs {qemus:?} in host one's namespace {pids:?}");
    // libvirtd runs pinned to one CPU (see the script); its QEMUs get every CPU this test has.
    let ours = cpus_allowed(std::process::id());
    assert!(qemus.iter().all(|&q| cpus_allowed(q) == ours), "QEMU CPUs {:?} vs {ours}", cpus_allowed(qemus[0]));

    // A cut link: host two stops answering, its processes run on; healed, it answers again.
    let two_pids = hosts.pids(1);
    hosts.cut(1);
    assert!(!virsh(&two.uri, &["version"]).status.success(), "host two answers through a cut link");
    assert_eq!(hosts.pids(1), two_pids, "a cut keeps the host's processes");
    hosts.heal(1);
    assert!(virsh(&two.uri, &["version"]).status.success(), "host two answers after heal");

    // Power failure of host one: the daemon refuses connections, the guests are gone.
    hosts.kill(0);
    let out = virsh(&one.uri, &["version"]);
    assert!(!out.status.success(), "host one answers after its power failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Connection refused"), "{err}");
    assert_eq!(hosts.pids(0), Vec::<u32>::new());
    assert!(qemus.iter().all(|&q| !running(q)), "QEMUs {qemus:?} survived");
    assert!(virsh(&two.uri, &["version"]).status.success(), "host two lives on");

    // After drop nothing of either host is left.
    let all = [one, two];
    drop(hosts);
    let deadline = Instant::now() + Duration::from_secs(10);
    for h in &all {
        assert!(!Path::new(&format!("/run/netns/{}", h.netns)).exists(), "namespace {} left", h.netns);
        let link = Command::new("ip").args(["link", "show", &h.veth]).output().unwrap();
        assert!(!link.status.success(), "veth {} left", h.veth);
        assert!(!h.dir.exists(), "{} left", h.dir.display());
        let claim = Path::new("/var/tmp/vdim-fake-hosts/claims").join(&h.name);
        assert!(!claim.exists(), "claim {} left", claim.display());
        let addrs = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
        let prefix = format!(" 10.77.{}.", h.number);
        assert!(!String::from_utf8_lossy(&addrs.stdout).contains(&prefix), "address{prefix}x left");
        loop {
            let left: Vec<u32> =
                processes_naming(h.dir.to_str().unwrap()).into_iter().filter(|&p| running(p)).collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "processes of {} left: {left:?}", h.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
