//! A host leaving, against fake hypervisors (one per host URI): which desktops move, which
//! wait, and that a fenced or merely silent host is handled as the rules say.

use super::*;
use crate::catalog::hosts::NewHost;
use crate::catalog::{CatalogError, Channel};
use crate::hypervisor::domain_xml::VirtType;
use crate::hypervisor::fake::FakeHypervisor;
use crate::hypervisor::{Connections, Hypervisor, HypervisorError};
use crate::pool::CreateOptions;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::pool::tests::V1;

struct Hosts2 {
    ctx: Context,
    _dir: tempfile::TempDir,
    _db: Option<crate::catalog::scratch::ScratchDatabase>,
    hosts: BTreeMap<&'static str, Arc<FakeHypervisor>>,
    /// While set, hv2 does not answer (a power failure or a cut link).
    hv2_down: Arc<AtomicBool>,
}

fn actor() -> Actor {
    Actor("tester".into())
}

impl Hosts2 {
    /// The pool tests' home (image `img`, v1 on every channel) with hosts hv1 and hv2, each
    /// holding v1 verified; `fence` is hv2's fence command.
    fn new(fence: Option<&str>) -> Hosts2 {
        let crate::pool::tests::Fixture { _dir: dir, ctx, _db, .. } = crate::pool::tests::Fixture::new();
        let hosts: BTreeMap<&'static str, Arc<FakeHypervisor>> =
            [("hv1", Arc::new(FakeHypervisor::new())), ("hv2", Arc::new(FakeHypervisor::new()))].into();
        let hv2_down = Arc::new(AtomicBool::new(false));
        let (by_uri, down) = (hosts.clone(), hv2_down.clone());
        let links = Connections::new(move |uri| {
            if uri == "fake://hv2" && down.load(Ordering::SeqCst) {
                return Err(HypervisorError::Connect { uri: uri.into(), message: "no route to host".into() });
            }
            Ok(by_uri[uri.trim_start_matches("fake://")].clone() as Arc<dyn Hypervisor>)
        });
        let mut ctx = ctx.with_connections(links);
        ctx.catalog()
            .write(|tx| -> std::result::Result<(), CatalogError> {
                for (name, fence) in [("hv1", None), ("hv2", fence)] {
                    let h = tx.insert_host(&NewHost {
                        name,
                        uri: &format!("fake://{name}"),
                        zone: None,
                        max_desktops: None,
                        storage_pool: "vdim-layers",
                        store_path: &format!("/store/{name}"),
                        fence_command: fence,
                    })?;
                    tx.record_host_layers(h.id, &[V1])?;
                }
                Ok(())
            })
            .expect("catalog");
        Hosts2 { ctx, _dir: dir, _db, hosts, hv2_down }
    }

    fn create(&mut self, name: &str, size: u32, persistent: bool) {
        self.create_with(name, size, persistent, None);
    }

    fn create_with(&mut self, name: &str, size: u32, persistent: bool, identity: Option<crate::identity::Identity>) {
        let hosts = ["hv1".to_string(), "hv2".to_string()];
        let o = CreateOptions {
            name,
            image: "img",
            channel: Channel::Test,
            size,
            profile: "test-linux",
            persistent,
            virt: VirtType::Qemu,
            start: true,
            display_listen: "127.0.0.1".parse().expect("ip"),
            insecure_display: false,
            identity,
            hosts: &hosts,
            zone: None,
        };
        self.ctx.pools().expect("pools").create(&o, &actor()).expect("create");
    }

    /// Desktop -> host name.
    fn placement(&mut self, pool: &str) -> BTreeMap<String, String> {
        let v = self.ctx.pools().expect("pools").show(pool).expect("show");
        v.desktops.into_iter().map(|d| (d.name, d.host.unwrap_or_default())).collect()
    }

    fn running(&self, host: &str) -> Vec<String> {
        let hv = &self.hosts[host];
        let mut out: Vec<String> = hv
            .list("vdim-")
            .expect("list")
            .into_iter()
            .filter(|d| hv.state(d).is_ok_and(|(s, _)| s == crate::hypervisor::DomainState::Running))
            .collect();
        out.sort();
        out
    }
}

#[test]
fn a_fenced_hosts_desktops_are_made_on_the_others_persistent_ones_wait_and_it_is_never_called() {
    let mut h = Hosts2::new(None);
    h.create("np", 4, false);
    h.create("per", 2, true);
    let before = h.placement("np");
    let on_hv2: Vec<String> = before.iter().filter(|(_, host)| *host == "hv2").map(|(d, _)| d.clone()).collect();
    assert_eq!(on_hv2.len(), 2, "spread: {before:?}");
    // carol's desktop (the first) is on hv1, alice's on hv2.
    h.ctx.pools().expect("pools").assign("np", "carol", &actor()).expect("assign");
    let taken = h.ctx.pools().expect("pools").assign("np", "alice", &actor()).expect("assign");
    assert_eq!(before[&taken.name], "hv2");
    h.hv2_down.store(true, Ordering::SeqCst);
    h.hosts["hv2"].take_calls();

    assert!(matches!(
        fence(&mut h.ctx, "hv2", false, "test", &actor()),
        Err(FailoverError::Host(HostError::Unconfirmed(_)))
    ));
    let left = fence(&mut h.ctx, "hv2", true, "test", &actor()).expect("fence");
    let mut moved = left.desktops.moved.clone();
    moved.sort();
    assert_eq!(moved, on_hv2, "{left:?}");
    assert_eq!(left.desktops.waiting.len(), 1, "the persistent desktop on hv2 waits: {left:?}");
    assert!(left.desktops.failed.is_empty(), "{left:?}");
    assert!(h.hosts["hv2"].calls().is_empty(), "a fenced host is never called: {:?}", h.hosts["hv2"].calls());
    let after = h.placement("np");
    assert!(after.values().all(|host| host == "hv1"), "{after:?}");
    assert_eq!(h.running("hv1").iter().filter(|d| d.contains("-np-")).count(), 4);
    let per = h.placement("per");
    assert_eq!(per.values().filter(|host| *host == "hv2").count(), 1, "persistent stays: {per:?}");
    // alice's desktop went down with hv2: her session ended, the desktop made afresh and free.
    let d = h.ctx.catalog().read(|tx| tx.desktop(&taken.name)).expect("catalog").expect("desktop");
    assert_eq!((d.assigned_to, d.needs_reset), (None, false));
    let carol = h.ctx.catalog().read(|tx| tx.desktop("vdim-np-001")).expect("catalog").expect("desktop");
    assert_eq!(carol.assigned_to.as_deref(), Some("carol"), "a desktop on hv1 stays its user's");

    // The persistent pool can still be deleted while hv2 is off; what hv2 still defines (the
    // desktops made elsewhere, the deleted pool's) goes when it is back.
    let waiting = left.desktops.waiting[0].clone();
    h.ctx.pools().expect("pools").delete("per", true, &actor()).expect("delete with a desktop on a fenced host");
    assert!(h.hosts["hv2"].calls().is_empty(), "still not called");
    h.hv2_down.store(false, Ordering::SeqCst);
    let mut removed = unfence(&mut h.ctx, "hv2", &actor()).expect("unfence");
    removed.sort();
    let mut want = on_hv2.clone();
    want.push(waiting);
    want.sort();
    assert_eq!(removed, want);
    assert!(h.hosts["hv2"].list("vdim-").expect("list").is_empty());
    assert_eq!(h.ctx.hosts().get("hv2").expect("hv2").state, "up");
}

#[test]
fn a_silent_host_is_dead_after_three_probes_and_fenced_only_by_a_fence_command_that_succeeds() {
    for (fence_cmd, fenced) in [(None, false), (Some("exit 1"), false), (Some("test \"$VDIM_HOST\" = hv2"), true)] {
        let mut h = Hosts2::new(fence_cmd);
        h.create("np", 4, false);
        h.hv2_down.store(true, Ordering::SeqCst);
        let mut liveness = vec![];
        for _ in 0..3 {
            let (probes, left) = watch_round(&mut h.ctx, &actor()).expect("round");
            liveness.push(probes.iter().find(|p| p.host == "hv2").expect("hv2 probed").liveness);
            if liveness.len() < 3 {
                assert!(left.is_empty());
            }
        }
        assert_eq!(liveness, ["suspect", "suspect", "dead"], "{fence_cmd:?}");
        let state = h.ctx.hosts().get("hv2").expect("hv2").state;
        assert_eq!(state == "fenced", fenced, "{fence_cmd:?}: {state}");
        let on_hv2 = h.placement("np").values().filter(|host| *host == "hv2").count();
        assert_eq!(on_hv2, if fenced { 0 } else { 2 }, "{fence_cmd:?}: replaced only when fenced");
    }
}

#[test]
fn a_drained_host_gets_no_new_desktops_and_its_idle_ones_leave() {
    let mut h = Hosts2::new(None);
    h.create("np", 4, false);
    h.ctx.pools().expect("pools").assign("np", "carol", &actor()).expect("assign");
    let taken = h.ctx.pools().expect("pools").assign("np", "bob", &actor()).expect("assign");
    assert_eq!(h.placement("np")[&taken.name], "hv2");
    let left = drain(&mut h.ctx, "hv2", &actor()).expect("drain");
    assert_eq!(left.desktops.at_logoff, std::slice::from_ref(&taken.name), "{left:?}");
    let placed = h.placement("np");
    let on_hv2: Vec<&String> = placed.iter().filter(|(_, host)| *host == "hv2").map(|(d, _)| d).collect();
    // bob's desktop, when it is on hv2, stays there until his logoff; nothing else does.
    assert_eq!(on_hv2.len(), left.desktops.at_logoff.len(), "{placed:?} {left:?}");
    assert!(on_hv2.iter().all(|d| **d == taken.name));
    // A new desktop never goes to a draining host.
    h.ctx.pools().expect("pools").resize("np", 6, &actor()).expect("grow");
    let placed = h.placement("np");
    assert_eq!(placed.values().filter(|host| *host == "hv2").count(), on_hv2.len(), "{placed:?}");
    // At bob's logoff his desktop leaves too.
    h.ctx.pools().expect("pools").release(&taken.name, &actor()).expect("release");
    assert!(h.placement("np").values().all(|host| host == "hv1"));
}

#[test]
fn a_desktop_made_again_on_another_host_has_its_disk_and_identity_drive_there() {
    let mut h = Hosts2::new(None);
    let identity = crate::identity::Identity { hostname_pattern: "LAB-{n}".into(), join: None, user_data: None };
    h.create_with("idp", 2, false, Some(identity));
    let moving = h.placement("idp").into_iter().find(|(_, host)| host == "hv2").map(|(d, _)| d).expect("one on hv2");
    let drive = format!("{moving}.config.iso");
    assert!(h.hosts["hv2"].volume_bytes("vdim-layers-desktops", &drive).is_some(), "its drive is on its host");
    h.hv2_down.store(true, Ordering::SeqCst);
    fence(&mut h.ctx, "hv2", true, "test", &actor()).expect("fence");
    let hv1 = &h.hosts["hv1"];
    assert!(hv1.volume_bytes("vdim-layers-desktops", &format!("{moving}.qcow2")).is_some(), "overlay on hv1");
    let iso = hv1.volume_bytes("vdim-layers-desktops", &drive).expect("drive uploaded to hv1");
    let hostname = format!("LAB-{}", &moving[moving.len() - 3..]);
    assert!(String::from_utf8_lossy(&iso).contains(&hostname), "{hostname}: the same identity on its new host");
    let xml = hv1.xml(&moving).expect("defined on hv1");
    assert!(xml.contains("/store/hv1-desktops/"), "its disk and drive are hv1's paths: {xml}");
    assert!(!xml.contains("/store/hv2"), "{xml}");
}
