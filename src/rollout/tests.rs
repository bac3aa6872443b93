//! Rollouts against the recording fake hypervisor: no root, no libvirtd. The catalog, the
//! desktops' overlays (the crate's own qcow2 writer) and the engine are the real ones; the
//! fake boots nothing, so the image's layers are catalog rows the overlays point at.

use super::*;
use crate::catalog::Channel;
use crate::context::Context;
use crate::hypervisor::fake::{disk_backing, Boot, Call, FakeHypervisor, Op};
use crate::hypervisor::{DomainState, Hypervisor};
use std::sync::Arc;

const POOL: &str = "canary";
use crate::pool::tests::{V1, V2};

struct Fixture {
    ctx: Context,
    hv: Arc<FakeHypervisor>,
    _dir: tempfile::TempDir,
    _db: Option<crate::catalog::scratch::ScratchDatabase>,
}

impl Fixture {
    /// Image `img` with v1 on every channel and v2 sealed onto dev (as import and seal leave
    /// them), and a running pool of four desktops on the test channel.
    fn new() -> Fixture {
        Fixture::with_size(4)
    }

    /// As [`Fixture::new`], with `size` desktops.
    fn with_size(size: u32) -> Fixture {
        // The pool tests' home (`img` with v1 on every channel, v2 on dev, a fake hypervisor)
        // and its running test-channel pool.
        let mut pool_home = crate::pool::tests::Fixture::new();
        pool_home.create(POOL, size, true);
        let crate::pool::tests::Fixture { ctx, hv, _dir, _db } = pool_home;
        Fixture { ctx, hv, _dir, _db }
    }

    fn pools(&mut self) -> Pools<'_> {
        self.ctx.pools().expect("pools")
    }

    fn promote(&mut self, waves: &str) -> Result<RolloutReport> {
        let opts = PromoteOptions {
            image: "img",
            version: 2,
            to: Channel::Test,
            waves,
            soak: Duration::from_millis(300),
            force: false,
            reason: None,
        };
        self.ctx.engine(Actor("tester".into())).expect("engine").promote(&opts)
    }

    fn versions(&mut self) -> Vec<u32> {
        self.ctx
            .catalog()
            .read(|tx| -> std::result::Result<Vec<u32>, CatalogError> {
                let pool = tx.pool(POOL)?.expect("pool");
                Ok(tx.desktops(pool.id)?.into_iter().map(|d| d.version).collect())
            })
            .expect("desktops")
    }

    /// The version's status in the catalog, and the version the test channel points at.
    fn v2_status_and_channel(&mut self) -> (String, u32) {
        self.ctx
            .catalog()
            .read(|tx| -> std::result::Result<(String, u32), CatalogError> {
                let image = tx.image("img")?;
                Ok((tx.version(&image, 2)?.status, tx.channel(&image, Channel::Test)?))
            })
            .expect("catalog")
    }

    /// The layer a domain's disk is on now ("v1", "v2"), read from its overlay's header.
    fn layer(&self, domain: &str) -> &'static str {
        let backing = disk_backing(&self.hv.xml(domain).expect("xml")).expect("a qcow2 disk with a backing file");
        layer_name(&backing)
    }
}

fn layer_name(backing: &str) -> &'static str {
    match () {
        _ if backing.contains(V1) => "v1",
        _ if backing.contains(V2) => "v2",
        _ => "other",
    }
}

fn desktop(i: u32) -> String {
    crate::pool::desktop_name(POOL, i)
}

/// The calls that changed a domain, as (op, domain, the layer its disk was on at a start).
fn changes(calls: &[Call]) -> Vec<(Op, String, Option<&'static str>)> {
    let layer = |c: &Call| c.disk_backing.as_deref().map(layer_name);
    calls.iter().filter(|c| c.op.changes()).map(|c| (c.op, c.domain.clone(), layer(c))).collect()
}

#[test]
fn a_crash_in_wave_1_reverts_exactly_the_moved_desktops() {
    let mut f = Fixture::new();
    f.hv.on_boot(V2, Boot::Panic);
    f.hv.take_calls();
    let err = f.promote("1,50%,100%").expect_err("a panicking version fails its rollout");
    let RolloutError::Failed { summary, report, .. } = err else { panic!("not a failed rollout: {err}") };
    let canary = desktop(1);
    assert_eq!(summary, format!("{canary} crashed (panicked)"));
    assert_eq!(report.rollout.state, RolloutState::Failed);
    let moved: Vec<usize> = report.waves.iter().map(|w| w.moved).collect();
    assert_eq!(moved, [1, 0, 0], "the crash stops the rollout in its first wave");
    // Only the canary was touched: stopped, defined afresh (non-persistent: no firmware state
    // kept), booted on v2, crashed, stopped, defined afresh, booted on v1.
    assert_eq!(
        changes(&f.hv.calls()),
        [
            (Op::Destroy, canary.clone(), None),
            (Op::Undefine, canary.clone(), None),
            (Op::Define, canary.clone(), None),
            (Op::Start, canary.clone(), Some("v2")),
            (Op::Destroy, canary.clone(), None),
            (Op::Undefine, canary.clone(), None),
            (Op::Define, canary.clone(), None),
            (Op::Start, canary.clone(), Some("v1")),
        ]
    );
    assert_eq!(f.versions(), [1, 1, 1, 1]);
    let st = f.hv.state(&canary).expect("state");
    assert_eq!(st.0, DomainState::Running, "the canary runs the previous version again");
}

#[test]
fn a_good_rollout_passes_all_waves_and_moves_every_desktop_once() {
    let mut f = Fixture::new();
    f.hv.take_calls();
    let rep = f.promote("1,50%,100%").expect("a healthy version passes");
    assert_eq!(rep.rollout.state, RolloutState::Succeeded);
    let moved: Vec<usize> = rep.waves.iter().map(|w| w.moved).collect();
    assert_eq!(moved, [1, 1, 2], "canary first, then half, then everyone");
    assert!(rep.waves.iter().all(|w| w.failed == 0 && w.healthy == w.moved), "{:?}", rep.waves);
    let mut starts: Vec<(String, Option<&str>)> =
        changes(&f.hv.calls()).into_iter().filter(|c| c.0 == Op::Start).map(|c| (c.1, c.2)).collect();
    // Within a wave the desktops boot at once, in any order.
    starts[2..].sort();
    let want: Vec<(String, Option<&str>)> = (1..=4).map(|i| (desktop(i), Some("v2"))).collect();
    assert_eq!(starts, want, "each desktop booted once, on v2, wave by wave");
    assert_eq!(f.versions(), [2, 2, 2, 2]);
}

/// The changes made to one domain, as (op, the layer its disk was on at a start).
fn changes_of(calls: &[Call], domain: &str) -> Vec<(Op, Option<&'static str>)> {
    changes(calls).into_iter().filter(|c| c.1 == domain).map(|c| (c.0, c.2)).collect()
}

/// The domains started on `layer`, in order.
fn started_on(calls: &[Call], layer: &str) -> Vec<String> {
    changes(calls).into_iter().filter(|c| c.0 == Op::Start && c.2 == Some(layer)).map(|c| c.1).collect()
}

/// Exactly `moved` (in wave order, the canary first) went to v2 and back to v1 after the last
/// of them; `untouched` saw no change at all. A desktop of the failing wave may have been moved
/// without booting v2: the crash of a wave-mate stops the boots not yet made.
fn assert_moved_and_back(calls: &[Call], moved: &[String], untouched: &[String]) {
    let fresh_boot = |layer| [(Op::Destroy, None), (Op::Undefine, None), (Op::Define, None), (Op::Start, Some(layer))];
    let there_and_back: Vec<(Op, Option<&str>)> = fresh_boot("v2").into_iter().chain(fresh_boot("v1")).collect();
    let not_booted: Vec<(Op, Option<&str>)> =
        fresh_boot("v2").into_iter().take(3).chain(fresh_boot("v1").into_iter().skip(1)).collect();
    for d in moved {
        let got = changes_of(calls, d);
        assert!(got == there_and_back || got == not_booted, "{d}: to v2 and back to v1, once each: {got:?}");
    }
    for d in untouched {
        assert!(changes_of(calls, d).is_empty(), "{d} is not touched: {:?}", changes_of(calls, d));
    }
    let changed: BTreeSet<String> = changes(calls).into_iter().map(|c| c.1).collect();
    assert_eq!(changed, moved.iter().cloned().collect::<BTreeSet<String>>(), "no other domain changed");
    let v2 = started_on(calls, "v2");
    assert_eq!(v2.first(), moved.first(), "the canary first");
    assert!(v2.iter().all(|d| moved.contains(d)), "only moved desktops booted v2: {v2:?}");
    let mut back = started_on(calls, "v1");
    back.sort();
    assert_eq!(back, moved, "each moved desktop boots v1 again");
    let starts: Vec<(String, Option<&str>)> =
        changes(calls).into_iter().filter(|c| c.0 == Op::Start).map(|c| (c.1, c.2)).collect();
    let last_v2 = starts.iter().rposition(|s| s.1 == Some("v2"));
    let first_v1 = starts.iter().position(|s| s.1 == Some("v1"));
    assert!(last_v2 < first_v1, "the revert follows the crash: {starts:?}");
}

#[test]
fn a_crash_in_wave_2_reverts_waves_1_and_2_and_leaves_the_rest_and_an_assigned_desktop_alone() {
    let mut f = Fixture::with_size(6);
    let in_use = f.pools().assign(POOL, "alice", &Actor("tester".into())).expect("assign").name;
    let idle: Vec<String> = (1..=6).map(desktop).filter(|d| *d != in_use).collect();
    let (wave1, wave2, wave3) = (&idle[..1], &idle[1..3], &idle[3..]);
    // v2 is healthy (wave 1 passes), but the first desktop of wave 2 panics on it: its
    // wave-mate still moves, and must go back too.
    f.hv.on_boot_of(&wave2[0], V2, Boot::Panic);
    f.hv.take_calls();
    let err = f.promote("1,3,100%").expect_err("a crash in wave 2 fails the rollout");
    let RolloutError::Failed { summary, report, .. } = err else { panic!("not a failed rollout: {err}") };
    assert_eq!(summary, format!("{} crashed (panicked)", wave2[0]));
    assert_eq!(report.rollout.state, RolloutState::Failed);
    let moved: Vec<String> = wave1.iter().chain(wave2).cloned().collect();
    let untouched: Vec<String> = wave3.iter().chain([&in_use]).cloned().collect();
    assert_moved_and_back(&f.hv.calls(), &moved, &untouched);
    let waves: Vec<Vec<String>> =
        report.waves.iter().map(|w| w.desktops.iter().map(|d| d.desktop.clone()).collect()).collect();
    assert_eq!(waves, [wave1.to_vec(), wave2.to_vec(), vec![]], "the crash stops the rollout in wave 2");
    let states: Vec<DesktopState> = report.waves.iter().flat_map(|w| &w.desktops).map(|d| d.state).collect();
    assert_eq!(states, [DesktopState::Reverted; 3], "{:?}", report.waves);
    assert_eq!(f.v2_status_and_channel(), ("failed".to_string(), 1), "v2 marked failed, the channel stays on v1");
    for d in idle.iter().chain([&in_use]) {
        assert_eq!(f.layer(d), "v1", "{d} ends on v1");
        assert_eq!(f.hv.state(d).expect("state").0, DomainState::Running, "{d} runs");
    }
    assert_eq!(f.versions(), [1; 6]);
}

#[test]
fn a_failed_waves_desktops_go_back_at_once() {
    let mut f = Fixture::with_size(6);
    // One desktop of wave 1 (three) panics on v2; its wave-mates are booting meanwhile (a
    // start takes a while) and QEMU takes its time to exit.
    f.hv.on_boot_of(&desktop(1), V2, Boot::Panic);
    f.hv.set_latency(Op::Start, std::time::Duration::from_millis(100));
    f.hv.set_latency(Op::Destroy, std::time::Duration::from_millis(80));
    f.hv.take_calls();
    let err = f.promote("50%,100%").expect_err("a panicking version fails");
    let RolloutError::Failed { report, .. } = err else { panic!("not a failed rollout: {err}") };
    assert_eq!(report.waves[0].desktops.len(), 3);
    let destroys: Vec<Call> = f.hv.calls().into_iter().filter(|c| c.op == Op::Destroy).collect();
    assert_eq!(destroys.len(), 6, "each wave-1 desktop stopped to move to v2, then to move back");
    // The revert's three destroys (the last ones) overlapped: the last to begin found the
    // other two still in flight.
    let revert_overlap = destroys[3..].iter().map(|c| c.in_flight).max().unwrap_or(0);
    assert!(revert_overlap >= 3, "the wave's desktops were stopped together: {destroys:?}");
    assert_eq!(f.versions(), [1; 6]);
    for i in 1..=6 {
        assert_eq!(f.hv.state(&desktop(i)).expect("state").0, DomainState::Running);
    }
}

#[test]
fn a_crash_while_a_large_wave_boots_stops_the_boots_not_yet_made() {
    let mut f = Fixture::with_size(8);
    // Four boots at once; the first four desktops panic as they boot on v2.
    f.hv.on_boot(V2, Boot::Panic);
    f.hv.set_latency(Op::Start, std::time::Duration::from_millis(50));
    f.hv.set_latency(Op::Destroy, std::time::Duration::from_millis(50));
    f.hv.take_calls();
    let err = f.promote("100%").expect_err("a panicking version fails");
    let RolloutError::Failed { report, .. } = err else { panic!("not a failed rollout: {err}") };
    assert_eq!(report.waves[0].moved, 8, "the whole wave was moved (recorded)");
    let v2_boots =
        f.hv.calls()
            .iter()
            .filter(|c| c.op == Op::Start && c.disk_backing.as_deref().map(layer_name) == Some("v2"))
            .count();
    assert!(v2_boots < 8, "the crash stopped the boots still to come: {v2_boots} of 8 booted v2");
    assert_eq!(f.versions(), [1; 8], "every desktop back on v1");
    for i in 1..=8 {
        assert_eq!(f.hv.state(&desktop(i)).expect("state").0, DomainState::Running, "{}", desktop(i));
    }
}
