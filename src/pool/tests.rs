//! Pool logic against the recording fake hypervisor (no root, no libvirtd): the catalog,
//! the desktops' overlays (the crate's own qcow2 writer) and the pool service are the real
//! ones; the image's layers are only catalog rows, which is all an overlay needs to point at.
//! The naming and parsing helpers' tests come first.

use super::*;
use crate::context::{Context, Settings};
use crate::hypervisor::fake::{Call, FakeHypervisor, Op};
use std::sync::Arc;

#[test]
fn desktop_names_belong_to_exactly_one_pool() {
    assert_eq!(desktop_name("finance", 7), "vdim-finance-007");
    assert!(is_desktop_of("a", "vdim-a-001"));
    assert!(!is_desktop_of("a", "vdim-a-b-001"), "pool a-b's desktop is not pool a's");
    assert!(!is_desktop_of("a", "vdim-a-01"));
    assert!(!is_desktop_of("a", "vdim-ab-001"));
}

#[test]
fn display_listen_is_an_ip_literal_only() {
    for ok in ["127.0.0.1", "0.0.0.0", "192.0.2.10", "::", "::1", "fd00::5"] {
        assert_eq!(parse_display_listen(ok).unwrap().to_string(), ok);
    }
    for bad in ["not-an-ip", "localhost", "1.2.3.4'/>", "", " 0.0.0.0", "1.2.3.4\n", "fe80::1%eth0", "[::1]", "1.2.3"] {
        let e = parse_display_listen(bad).unwrap_err().to_string();
        assert!(e.contains("is not an IP address"), "{bad:?}: {e}");
    }
}

#[test]
fn secrets_are_long_and_different() {
    let (a, b) = (random_secret(16), random_secret(16));
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
}

// ---- against the fake hypervisor -----------------------------------------------------------

pub(crate) const V1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
pub(crate) const V2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// A home with image `img`: v1 on every channel, v2 sealed onto dev (as import and seal
/// leave them), its catalog on a fake hypervisor.
pub(crate) struct Fixture {
    pub ctx: Context,
    pub hv: Arc<FakeHypervisor>,
    pub _dir: tempfile::TempDir,
    /// Dropped after the context (its connection), when the tests run on PostgreSQL.
    pub _db: Option<crate::catalog::scratch::ScratchDatabase>,
}

/// `VDIM_TEST_ENGINE=postgres` (scripts/test's second pass) runs the service tests on a
/// scratch PostgreSQL database; a catalog there is what the settings point at.
pub(crate) fn test_catalog(settings: &mut Settings) -> Option<crate::catalog::scratch::ScratchDatabase> {
    if std::env::var("VDIM_TEST_ENGINE").as_deref() != Ok("postgres") {
        return None;
    }
    let db = crate::catalog::scratch::ScratchDatabase::new();
    settings.catalog = Some(crate::catalog::Location::parse(&db.url));
    Some(db)
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings {
            profiles: dir.path().join("profiles"),
            virt_type: "qemu".into(),
            ..Settings::new(Home::new(dir.path().join("home")))
        };
        let db = test_catalog(&mut settings);
        crate::profile::install_shipped(&settings.profiles).expect("profiles");
        let hv = Arc::new(FakeHypervisor::new());
        let mut ctx = Context::init(settings).expect("context").with_hypervisor(hv.clone());
        ctx.catalog()
            .write(|tx| -> std::result::Result<(), CatalogError> {
                let image = tx.insert_image("img", 1 << 30)?;
                tx.insert_version(&image, None, V1, 4096, 1 << 30, "tester", "v1")?;
                for ch in Channel::ALL {
                    tx.set_channel(&image, ch, 1)?;
                }
                tx.insert_version(&image, Some(1), V2, 4096, 1 << 30, "tester", "v2")?;
                tx.set_channel(&image, Channel::Dev, 2)
            })
            .expect("catalog");
        Fixture { ctx, hv, _dir: dir, _db: db }
    }

    pub fn pools(&mut self) -> Pools<'_> {
        self.ctx.pools().expect("pools")
    }

    /// A non-persistent test-linux pool of `size` desktops on the test channel.
    pub fn create(&mut self, name: &str, size: u32, start: bool) -> PoolView {
        let create = CreateOptions {
            name,
            image: "img",
            channel: Channel::Test,
            size,
            profile: "test-linux",
            persistent: false,
            virt: VirtType::Qemu,
            start,
            display_listen: "127.0.0.1".parse().expect("ip"),
            insecure_display: false,
            identity: None,
            hosts: &[],
            zone: None,
        };
        self.pools().create(&create, &actor()).expect("pool create")
    }

    pub fn set_channel(&mut self, channel: Channel, version: u32) {
        self.ctx
            .catalog()
            .write(|tx| -> std::result::Result<(), CatalogError> {
                tx.set_channel(&tx.image("img")?, channel, version)
            })
            .expect("set channel");
    }

    pub fn pool(&mut self, name: &str) -> Pool {
        self.ctx.catalog().read(|tx| tx.pool(name)).expect("catalog").expect("pool")
    }

    pub fn desktops(&mut self, pool: &str) -> Vec<Desktop> {
        let id = self.pool(pool).id;
        self.ctx.catalog().read(|tx| tx.desktops(id)).expect("desktops")
    }

    pub fn home(&self) -> &Home {
        self.ctx.home()
    }
}

pub(crate) fn actor() -> Actor {
    Actor("tester".into())
}

/// The layer a recorded start booted ("v1", "v2"), from the backing file of the domain's disk.
pub(crate) fn layer(call: &Call) -> Option<&'static str> {
    call.disk_backing.as_deref().map(|b| match () {
        _ if b.contains(V1) => "v1",
        _ if b.contains(V2) => "v2",
        _ => "other",
    })
}

/// The calls that changed a domain: (op, domain, the layer it booted for a start).
pub(crate) fn changes(calls: &[Call]) -> Vec<(Op, String, Option<&'static str>)> {
    calls.iter().filter(|c| c.op.changes()).map(|c| (c.op, c.domain.clone(), layer(c))).collect()
}

/// The qcow2 files a domain's XML names as disks.
pub(crate) fn disks(xml: &str) -> Vec<PathBuf> {
    xml.split("<source file='")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .filter(|f| f.ends_with(".qcow2"))
        .map(PathBuf::from)
        .collect()
}

fn names(pool: &str, indexes: std::ops::RangeInclusive<u32>) -> Vec<String> {
    indexes.map(|i| desktop_name(pool, i)).collect()
}

#[test]
fn creating_a_pool_defines_each_desktop_on_an_overlay_of_the_version_layer_and_does_nothing_else() {
    let mut f = Fixture::new();
    let view = f.create("a", 3, false);
    assert_eq!(view.pool.version, 1);
    let want = names("a", 1..=3);
    let defined: Vec<(Op, String, Option<&str>)> = want.iter().map(|n| (Op::Define, n.clone(), None)).collect();
    let mut got = changes(&f.hv.calls());
    got.sort();
    assert_eq!(got, defined, "three defines (at once: in any order), no start, nothing removed");
    assert_eq!(f.hv.list("").expect("list"), want);
    for d in f.desktops("a") {
        assert_eq!(d.version, 1, "{}", d.name);
        let xml = f.hv.xml(&d.name).expect("xml");
        let overlay = f.home().root().join(&d.overlay);
        assert_eq!(overlay, f.home().pool_dir("a").join(format!("{}.qcow2", d.name)));
        assert_eq!(disks(&xml), vec![overlay.clone()], "the domain boots its own overlay");
        let header = crate::qcow2::read_header(&overlay).expect("overlay is a qcow2");
        assert_eq!(header.backing_file.as_deref(), Some(format!("../../layers/{V1}.qcow2").as_str()));
        assert_eq!(header.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(header.virtual_size, 1 << 30);
        assert_eq!(f.hv.state(&d.name).expect("state").0, DomainState::ShutOff);
    }
}

#[test]
fn a_started_pool_boots_each_desktop_once_on_its_version() {
    let mut f = Fixture::new();
    f.create("a", 3, true);
    let mut starts: Vec<(String, Option<&str>)> =
        changes(&f.hv.calls()).into_iter().filter(|c| c.0 == Op::Start).map(|c| (c.1, c.2)).collect();
    starts.sort();
    let want: Vec<(String, Option<&str>)> = names("a", 1..=3).into_iter().map(|n| (n, Some("v1"))).collect();
    assert_eq!(starts, want);
    assert!(f.pool("a").running);
}

#[test]
fn update_moves_idle_desktops_now_and_leaves_an_assigned_one_for_its_logoff() {
    let mut f = Fixture::new();
    f.create("a", 3, true);
    let taken = f.pools().assign("a", "alice", &actor()).expect("assign").name;
    f.set_channel(Channel::Test, 2);
    f.hv.take_calls();
    let report = f.pools().update("a", false, &actor()).expect("update");
    let idle: Vec<String> = names("a", 1..=3).into_iter().filter(|n| *n != taken).collect();
    assert_eq!((report.plan.from, report.plan.to), (1, 2));
    assert_eq!(report.plan.now, idle);
    assert_eq!(report.plan.at_logoff, vec![taken.clone()]);
    let mut moved = vec![];
    // Non-persistent: each is defined afresh (no UEFI variables or TPM state kept).
    for n in &idle {
        moved.extend([(Op::Destroy, n.clone(), None), (Op::Undefine, n.clone(), None), (Op::Define, n.clone(), None)]);
        moved.push((Op::Start, n.clone(), Some("v2")));
    }
    let mut got = changes(&f.hv.take_calls());
    got.sort();
    moved.sort();
    assert_eq!(got, moved, "each idle desktop restarted on v2; alice's desktop untouched");
    for d in f.desktops("a") {
        let want = if d.name == taken { (1, Some(2)) } else { (2, None) };
        assert_eq!((d.version, d.target), want, "{}", d.name);
    }

    f.pools().release(&taken, &actor()).expect("logoff");
    assert_eq!(
        changes(&f.hv.calls()),
        [
            (Op::Destroy, taken.clone(), None),
            (Op::Undefine, taken.clone(), None),
            (Op::Define, taken.clone(), None),
            (Op::Start, taken.clone(), Some("v2"))
        ],
        "alice's desktop moves at her logoff"
    );
    assert!(f.desktops("a").iter().all(|d| d.version == 2 && d.target.is_none()));
}

#[test]
fn rollback_pins_the_pool_and_moves_its_desktops_back() {
    let mut f = Fixture::new();
    f.create("a", 2, true);
    f.set_channel(Channel::Test, 2);
    f.pools().update("a", false, &actor()).expect("update");
    f.hv.take_calls();
    let report = f.pools().rollback("a", None, false, &actor()).expect("rollback");
    assert_eq!((report.plan.from, report.plan.to, report.plan.pinned), (2, 1, Some(1)));
    let mut got = changes(&f.hv.calls());
    got.sort();
    let mut want = vec![];
    for n in names("a", 1..=2) {
        want.extend([(Op::Destroy, n.clone(), None), (Op::Undefine, n.clone(), None), (Op::Define, n.clone(), None)]);
        want.push((Op::Start, n, Some("v1")));
    }
    want.sort();
    assert_eq!(got, want, "every desktop restarted on v1");
    let pool = f.pool("a");
    assert_eq!((pool.version, pool.pinned), (1, Some(1)));
    assert!(f.desktops("a").iter().all(|d| d.version == 1 && d.target.is_none()));
    // Pinned: following the channel is refused until unpinned.
    f.hv.take_calls();
    let err = f.pools().update("a", false, &actor()).expect_err("a pinned pool does not follow its channel");
    assert!(matches!(err, PoolError::Denied(Denied::Pinned { version: 1, .. })), "{err:?}");
    assert!(changes(&f.hv.calls()).is_empty());
}

/// A pool start boots every desktop at once: one libvirt fails to start is reported by
/// name, the others boot, and the next start boots it.
#[test]
fn a_failed_start_is_reported_for_its_desktop_and_the_others_start() {
    let mut f = Fixture::new();
    f.create("a", 4, false);
    let [one, two, three, four]: [String; 4] = names("a", 1..=4).try_into().expect("four");
    f.hv.fail_next(Op::Start, &two);
    f.hv.take_calls();
    let r = f.pools().start("a", &actor()).expect("the others start");
    assert_eq!(r.desktops, [one.clone(), three.clone(), four.clone()]);
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].desktop, two);
    assert!(r.failed[0].error.contains(&two), "{}", r.failed[0].error);
    assert_eq!(r.failed[0].kind, crate::error::ErrorKind::Internal);
    let mut starts: Vec<String> =
        f.hv.take_calls().into_iter().filter(|c| c.op == Op::Start).map(|c| c.domain).collect();
    starts.sort();
    assert_eq!(starts, [one.clone(), two.clone(), three.clone(), four.clone()], "every desktop was tried");
    let running = |f: &Fixture, n: &str| f.hv.state(n).expect("state").0 == DomainState::Running;
    assert!(running(&f, &one) && !running(&f, &two) && running(&f, &three) && running(&f, &four));

    let again = f.pools().start("a", &actor()).expect("start again");
    assert_eq!(again.desktops, [two], "a second start boots the one left, not the running ones");
    assert!(again.failed.is_empty());
}

#[test]
fn deleting_pool_a_removes_exactly_its_domains_and_files_and_leaves_pool_a_b_alone() {
    let mut f = Fixture::new();
    f.create("a", 2, true);
    f.create("a-b", 2, true);
    let a_b_dir = f.home().pool_dir("a-b");
    let a_b_files: Vec<_> = std::fs::read_dir(&a_b_dir).expect("a-b dir").flatten().map(|e| e.path()).collect();
    f.hv.take_calls();
    f.pools().delete("a", false, &actor()).expect("delete");
    for n in names("a", 1..=2) {
        let of_n: Vec<Op> = changes(&f.hv.calls()).into_iter().filter(|c| c.1 == n).map(|c| c.0).collect();
        assert_eq!(of_n, [Op::Destroy, Op::Undefine], "{n} stopped, then undefined");
    }
    assert!(changes(&f.hv.calls()).iter().all(|c| is_desktop_of("a", &c.1)), "only pool a's desktops");
    assert_eq!(f.hv.list("").expect("list"), names("a-b", 1..=2));
    assert!(f.hv.list("").expect("list").iter().all(|n| f.hv.state(n).expect("state").0 == DomainState::Running));
    assert!(!f.home().pool_dir("a").exists());
    assert_eq!(a_b_files.len(), 2);
    assert!(a_b_files.iter().all(|p| p.is_file()), "pool a-b's overlays stay");
    assert!(f.ctx.catalog().read(|tx| tx.pool("a")).expect("catalog").is_none());
    assert_eq!(f.desktops("a-b").len(), 2);
}

#[test]
fn an_identity_pool_boots_each_desktop_with_its_drive_and_builds_it_again_at_logoff() {
    use std::os::unix::fs::MetadataExt;
    let mut f = Fixture::new();
    let identity = Identity { hostname_pattern: "LAB-{n}".into(), join: None, user_data: None };
    let create = CreateOptions {
        name: "lab",
        image: "img",
        channel: Channel::Test,
        size: 2,
        profile: "test-linux",
        persistent: false,
        virt: VirtType::Qemu,
        start: true,
        display_listen: "127.0.0.1".parse().expect("ip"),
        insecure_display: false,
        identity: Some(identity),
        hosts: &[],
        zone: None,
    };
    let view = f.pools().create(&create, &actor()).expect("pool create");
    let hosts: Vec<_> = view.desktops.iter().map(|d| d.hostname.clone().unwrap_or_default()).collect();
    assert_eq!(hosts, ["LAB-001", "LAB-002"]);
    let drive = f.home().pool_run("lab").join("vdim-lab-001.config.iso");
    let xml = f.hv.xml("vdim-lab-001").expect("defined");
    assert!(xml.contains(&format!("<source file='{}'/>", drive.display())) && xml.contains("<readonly/>"), "{xml}");
    let uuid = f.desktops("lab")[0].uuid.clone().expect("a uuid on record");
    assert!(xml.contains(&format!("<uuid>{uuid}</uuid>")), "the domain has the recorded uuid");
    let ino = std::fs::metadata(&drive).expect("drive").ino();
    f.pools().assign("lab", "alice", &actor()).expect("assign");
    f.pools().release("vdim-lab-001", &actor()).expect("release");
    assert_ne!(std::fs::metadata(&drive).expect("drive").ino(), ino, "a new drive at the reset");
    f.pools().delete("lab", false, &actor()).expect("delete");
    assert!(!drive.exists(), "the drive goes with its desktop");
}

#[test]
fn a_pool_whose_computer_names_could_be_another_pools_is_refused_and_nothing_is_made() {
    let mut f = Fixture::new();
    let options = |name: &'static str, pattern: &str| CreateOptions {
        name,
        image: "img",
        channel: Channel::Test,
        size: 1,
        profile: "test-linux",
        persistent: false,
        virt: VirtType::Qemu,
        start: false,
        display_listen: "127.0.0.1".parse().expect("ip"),
        insecure_display: false,
        identity: Some(Identity { hostname_pattern: pattern.into(), join: None, user_data: None }),
        hosts: &[],
        zone: None,
    };
    f.pools().create(&options("fin", "FIN-{n}"), &actor()).expect("first pool");
    let before = f.hv.calls().len();
    // `fin-001` is FIN-001 to Windows.
    for pattern in ["fin-{n}", "FIN-{n}", "Fin-1{n}"] {
        let e = f.pools().create(&options("other", pattern), &actor()).expect_err(pattern);
        assert!(e.to_string().contains("pool 'fin'"), "{pattern}: {e}");
        assert_eq!(crate::error::Kind::kind(&e), crate::error::ErrorKind::Conflict);
        assert!(f.pools().show("other").is_err(), "{pattern}: no pool");
    }
    assert_eq!(f.hv.calls().len(), before, "nothing was defined for a refused pool");
    f.pools().create(&options("other", "FINX-{n}"), &actor()).expect("a pattern of its own");
}

// ---- firmware state (UEFI variables, TPM) at resets ------------------------------------------

/// A running pool of two `windows11` desktops (UEFI + TPM) on v1 of `img`, v2 on prod,
/// against the fake hypervisor; returns the context and the fake.
fn windows_pool(persistent: bool) -> (tempfile::TempDir, Context, Arc<FakeHypervisor>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings =
        Settings { profiles: dir.path().join("profiles"), ..Settings::new(Home::new(dir.path().join("home"))) };
    profile::install_shipped(&settings.profiles).expect("profiles");
    let hv = Arc::new(FakeHypervisor::new());
    let mut ctx = Context::init(settings).expect("context").with_hypervisor(hv.clone());
    ctx.catalog()
        .write(|tx| -> std::result::Result<(), CatalogError> {
            let image = tx.insert_image("img", 64 << 30)?;
            tx.insert_version(&image, None, &"1".repeat(64), 4096, 64 << 30, "tester", "v1")?;
            for ch in Channel::ALL {
                tx.set_channel(&image, ch, 1)?;
            }
            tx.insert_version(&image, Some(1), &"2".repeat(64), 4096, 64 << 30, "tester", "v2")?;
            Ok(())
        })
        .expect("catalog");
    let create = CreateOptions {
        name: "win",
        image: "img",
        channel: Channel::Prod,
        size: 2,
        profile: "windows11",
        persistent,
        virt: VirtType::Qemu,
        start: true,
        display_listen: "127.0.0.1".parse().expect("ip"),
        insecure_display: false,
        identity: None,
        hosts: &[],
        zone: None,
    };
    ctx.pools().expect("pools").create(&create, &Actor("tester".into())).expect("create");
    ctx.catalog()
        .write(|tx| -> std::result::Result<(), CatalogError> {
            let image = tx.image("img")?;
            tx.set_channel(&image, Channel::Prod, 2)
        })
        .expect("promote");
    (dir, ctx, hv)
}

fn definitions(hv: &FakeHypervisor) -> Vec<(Op, String)> {
    hv.take_calls()
        .into_iter()
        .filter(|c| matches!(c.op, Op::Define | Op::Undefine))
        .map(|c| (c.op, c.domain))
        .collect()
}

#[test]
fn a_persistent_desktop_keeps_its_definition_and_firmware_state_through_moves_and_restarts() {
    let (_dir, mut ctx, hv) = windows_pool(true);
    hv.take_calls();
    let actor = Actor("tester".into());
    let mut pools = ctx.pools().expect("pools");
    // A persistent pool moves only when forced: its users' disks get fresh overlays.
    pools.update("win", true, &actor).expect("update");
    pools.stop("win", true, &actor).expect("stop");
    pools.start("win", &actor).expect("start");
    pools.rollback("win", None, true, &actor).expect("rollback");
    assert_eq!(definitions(&hv), [], "never undefined: NVRAM and the UUID keying the TPM state stay");
}

#[test]
fn a_persistent_desktop_whose_domain_is_gone_is_defined_again_at_its_reset() {
    let (_dir, mut ctx, hv) = windows_pool(true);
    // A home restored on a new machine: the catalog has the desktops, libvirt has no domain.
    hv.undefine("vdim-win-001").expect("undefine");
    ctx.catalog()
        .write(|tx| -> std::result::Result<(), CatalogError> {
            let pool = tx.pool("win")?.expect("pool");
            for d in tx.desktops(pool.id)? {
                tx.mark_reset(d.id, d.version)?;
            }
            Ok(())
        })
        .expect("due");
    hv.take_calls();
    ctx.pools().expect("pools").start("win", &Actor("tester".into())).expect("start");
    assert_eq!(definitions(&hv), [(Op::Define, "vdim-win-001".to_string())], "the other keeps its definition");
    let xml = hv.xml("vdim-win-001").expect("defined again");
    assert!(xml.contains("desktops/win/vdim-win-001.nvram</nvram>"), "{xml}");
}

#[test]
fn a_non_persistent_desktop_is_defined_afresh_at_every_reset() {
    let (_dir, mut ctx, hv) = windows_pool(false);
    hv.take_calls();
    let actor = Actor("tester".into());
    let mut pools = ctx.pools().expect("pools");
    pools.update("win", false, &actor).expect("update");
    let fresh = |d: &str| [(Op::Undefine, d.to_string()), (Op::Define, d.to_string())];
    let mut both = definitions(&hv);
    both.sort();
    assert_eq!(
        both,
        [(Op::Define, "vdim-win-001".into()), (Op::Define, "vdim-win-002".into())]
            .into_iter()
            .chain([(Op::Undefine, "vdim-win-001".into()), (Op::Undefine, "vdim-win-002".into())])
            .collect::<Vec<_>>()
    );
    pools.stop("win", true, &actor).expect("stop");
    pools.start("win", &actor).expect("start");
    assert_eq!(definitions(&hv), [], "a restart is no reset");
    pools.assign("win", "alice", &actor).expect("assign");
    pools.release("vdim-win-001", &actor).expect("logoff");
    assert_eq!(definitions(&hv), fresh("vdim-win-001"), "logoff resets");
    let xml = hv.xml("vdim-win-001").expect("defined again");
    assert!(xml.contains("desktops/win/vdim-win-001.nvram</nvram>"), "{xml}");
}

// ---- the identity drive at hand-out and at reset ---------------------------------------------

/// A started non-persistent test-linux pool `lab` of `size` desktops with identity, the join
/// credentials read from `cred` (written 0600 here).
fn identity_pool(f: &mut Fixture, size: u32, cred: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(cred, "username=svc-vdi-join\npassword=JoinSecret\n").expect("credentials");
    fs::set_permissions(cred, fs::Permissions::from_mode(0o600)).expect("chmod");
    let join = DomainJoin { domain: "corp.example.com".into(), ou: None, credentials: cred.to_path_buf() };
    let identity = Identity { hostname_pattern: "LAB-{n}".into(), join: Some(join), user_data: None };
    let create = CreateOptions {
        name: "lab",
        image: "img",
        channel: Channel::Test,
        size,
        profile: "test-linux",
        persistent: false,
        virt: VirtType::Qemu,
        start: true,
        display_listen: "127.0.0.1".parse().expect("ip"),
        insecure_display: false,
        identity: Some(identity),
        hosts: &[],
        zone: None,
    };
    f.pools().create(&create, &actor()).expect("pool create");
}

/// The media of a desktop's identity drive in its (fake) definition, if any.
fn drive_media(hv: &FakeHypervisor, desktop: &str) -> Option<String> {
    let xml = hv.xml(desktop).expect("defined");
    let cdrom = crate::hypervisor::xml::cdrom(&xml, "sda").expect("an identity drive");
    crate::hypervisor::xml::find_elements(&cdrom.inner, "source").first().and_then(|s| s.attr("file").map(String::from))
}

fn assigned(f: &mut Fixture, desktop: &str) -> Option<String> {
    f.desktops("lab").into_iter().find(|d| d.name == desktop).and_then(|d| d.assigned_to)
}

#[test]
fn assigning_a_desktop_ejects_its_identity_drive_first_and_a_failed_eject_hands_nothing_out() {
    let mut f = Fixture::new();
    let cred = f.home().root().join("../join.cred");
    identity_pool(&mut f, 2, &cred);
    assert!(drive_media(&f.hv, "vdim-lab-001").is_some(), "booted with its drive");
    f.hv.take_calls();

    f.hv.fail_next(Op::EjectMedia, "vdim-lab-001");
    let e = f.pools().assign("lab", "alice", &actor()).expect_err("the eject failed");
    assert!(matches!(e, PoolError::Eject { ref desktop, .. } if desktop == "vdim-lab-001"), "{e:?}");
    assert_eq!(crate::error::Kind::kind(&e), crate::error::ErrorKind::Exhausted);
    assert!(e.to_string().contains("vdim-lab-001") && e.to_string().contains("not handed out"), "{e}");
    assert_eq!(assigned(&mut f, "vdim-lab-001"), None, "not assigned");
    assert!(drive_media(&f.hv, "vdim-lab-001").is_some());

    let d = f.pools().assign("lab", "alice", &actor()).expect("assign");
    assert_eq!(d.name, "vdim-lab-001");
    assert_eq!(drive_media(&f.hv, "vdim-lab-001"), None, "ejected");
    assert_eq!(
        drive_media(&f.hv, "vdim-lab-002"),
        Some(f.home().pool_run("lab").join("vdim-lab-002.config.iso").display().to_string()),
        "the idle one keeps it"
    );
    let ejects: Vec<String> =
        f.hv.take_calls().into_iter().filter(|c| c.op == Op::EjectMedia).map(|c| c.domain).collect();
    assert_eq!(ejects, ["vdim-lab-001", "vdim-lab-001"]);
    let audited = f.ctx.catalog().read(|tx| tx.audit_log(None, Some("lab"), 100)).expect("audit");
    let assigns: Vec<_> = audited.iter().filter(|a| a.action == "desktop.assign").collect();
    assert_eq!(assigns.len(), 1, "only the hand-out that happened is recorded");

    // A logoff defines the desktop again with its rebuilt drive.
    f.pools().release("vdim-lab-001", &actor()).expect("release");
    assert!(drive_media(&f.hv, "vdim-lab-001").is_some(), "media again after the reset");
}

#[test]
fn a_broker_session_ejects_the_identity_drive_before_it_is_recorded() {
    let mut f = Fixture::new();
    let cred = f.home().root().join("../join.cred");
    identity_pool(&mut f, 1, &cred);
    let user = f.ctx.users().add("alice", false, None, &actor()).expect("user").user;
    f.ctx.users().entitle("lab", "alice", &actor()).expect("entitle");
    let ttl = std::time::Duration::from_secs(600);

    f.hv.fail_next(Op::EjectMedia, "vdim-lab-001");
    let e = f.ctx.sessions().expect("sessions").open(&user, "lab", ttl).expect_err("the eject failed");
    assert!(matches!(e, crate::users::UserError::Pool(PoolError::Eject { .. })), "{e:?}");
    assert_eq!(assigned(&mut f, "vdim-lab-001"), None, "not assigned");
    assert!(f.ctx.catalog().read(|tx| tx.open_sessions(None)).expect("sessions").is_empty(), "no session");
    assert!(drive_media(&f.hv, "vdim-lab-001").is_some());

    let opened = f.ctx.sessions().expect("sessions").open(&user, "lab", ttl).expect("open");
    assert_eq!(opened.session.desktop, "vdim-lab-001");
    assert_eq!(drive_media(&f.hv, "vdim-lab-001"), None, "ejected before the user got it");
}

#[test]
fn a_drive_that_cannot_be_built_at_logoff_leaves_the_desktop_as_it_was_and_heal_resets_it_later() {
    use std::os::unix::fs::PermissionsExt;
    let mut f = Fixture::new();
    let cred = f.home().root().join("../join.cred");
    identity_pool(&mut f, 1, &cred);
    f.pools().assign("lab", "alice", &actor()).expect("assign");
    fs::set_permissions(&cred, fs::Permissions::from_mode(0o644)).expect("chmod");
    f.hv.take_calls();

    let e = f.pools().release("vdim-lab-001", &actor()).expect_err("no drive, no reset");
    assert!(matches!(e, PoolError::Drive { ref desktop, .. } if desktop == "vdim-lab-001"), "{e:?}");
    let chain = crate::error::message(&e);
    assert!(chain.contains("vdim-lab-001") && chain.contains("accessible by others"), "{chain}");
    assert_eq!(changes(&f.hv.take_calls()), [], "nothing destroyed, undefined or defined");
    assert_eq!(f.hv.state("vdim-lab-001").expect("still defined").0, crate::hypervisor::DomainState::Running);
    let d = &f.desktops("lab")[0];
    assert!(d.needs_reset && d.assigned_to.is_none(), "released, its reset pending: {d:?}");
    assert!(f.pools().assign("lab", "bob", &actor()).is_err(), "not handed out before its reset");

    fs::set_permissions(&cred, fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(f.pools().heal("lab").expect("heal"), ["vdim-lab-001"]);
    assert!(!f.desktops("lab")[0].needs_reset);
    let done: Vec<Op> = changes(&f.hv.take_calls()).into_iter().map(|(op, ..)| op).collect();
    assert_eq!(done, [Op::Destroy, Op::Undefine, Op::Define, Op::Start]);
    assert!(drive_media(&f.hv, "vdim-lab-001").is_some(), "defined with its new drive");
}

// ---- at fleet speed ---------------------------------------------------------------------------

#[test]
fn a_running_pool_is_rolled_back_with_its_desktops_at_once_up_to_the_hosts_bound() {
    let mut f = Fixture::new();
    f.create("a", 8, true);
    f.set_channel(Channel::Test, 2);
    f.pools().update("a", false, &actor()).expect("update");
    // QEMU takes its time to exit and to boot: calls overlap only if vdim makes them at once.
    f.hv.set_latency(Op::Destroy, std::time::Duration::from_millis(150));
    f.hv.set_latency(Op::Start, std::time::Duration::from_millis(60));
    f.hv.take_calls();
    f.hv.reset_peak();
    let report = f.pools().rollback("a", None, false, &actor()).expect("rollback");
    assert_eq!(report.plan.now.len(), 8);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut started = report.started.clone();
    started.sort();
    assert_eq!(started, names("a", 1..=8), "every desktop booted again");
    let peak = f.hv.peak_in_flight();
    assert!(peak > 2 && peak <= f.hv.parallel(), "calls at once, up to what the host serves and no more: {peak}");
    for n in names("a", 1..=8) {
        let of_n: Vec<(Op, Option<&str>)> =
            changes(&f.hv.calls()).into_iter().filter(|c| c.1 == n).map(|c| (c.0, c.2)).collect();
        assert_eq!(of_n, [(Op::Destroy, None), (Op::Undefine, None), (Op::Define, None), (Op::Start, Some("v1"))]);
        assert_eq!(f.hv.state(&n).expect("state").0, DomainState::Running);
    }
    assert!(f.desktops("a").iter().all(|d| d.version == 1 && !d.needs_reset));
}

#[test]
fn a_desktop_whose_destroy_fails_does_not_stop_the_others_and_the_next_command_heals_it() {
    let mut f = Fixture::new();
    f.create("a", 4, true);
    f.set_channel(Channel::Test, 2);
    f.pools().update("a", false, &actor()).expect("update");
    let [one, two, three, four]: [String; 4] = names("a", 1..=4).try_into().expect("four");
    f.hv.fail_next(Op::Destroy, &two);
    let report = f.pools().rollback("a", None, false, &actor()).expect("the others roll back");
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert_eq!(report.failed[0].desktop, two);
    assert!(report.failed[0].error.contains(&two), "names the desktop: {}", report.failed[0].error);
    let mut started = report.started.clone();
    started.sort();
    assert_eq!(started, [one.clone(), three.clone(), four.clone()]);
    let err = crate::pool::PoolError::Desktops { failed: report.failed.clone() };
    assert_eq!(crate::error::Kind::kind(&err), crate::error::ErrorKind::Internal);
    let ds = f.desktops("a");
    let d2 = ds.iter().find(|d| d.name == two).expect("two");
    assert!(d2.needs_reset && d2.version == 1, "its move back is recorded and pending: {d2:?}");
    assert!(ds.iter().filter(|d| d.name != two).all(|d| d.version == 1 && !d.needs_reset));
    // Still running (on its old disk): never handed out before its reset.
    assert_eq!(f.hv.state(&two).expect("state").0, DomainState::Running);
    for _ in 0..3 {
        let d = f.pools().assign("a", "alice", &actor()).expect("an idle clean desktop");
        assert_ne!(d.name, two, "a desktop with a pending reset is not handed out");
    }
    assert!(f.pools().assign("a", "bob", &actor()).is_err(), "the fourth one waits for its reset");

    f.hv.take_calls();
    let healed = f.pools().heal("a").expect("the next command heals it");
    assert_eq!(healed, std::slice::from_ref(&two));
    let of_two: Vec<(Op, Option<&str>)> =
        changes(&f.hv.calls()).into_iter().filter(|c| c.1 == two).map(|c| (c.0, c.2)).collect();
    assert_eq!(of_two, [(Op::Destroy, None), (Op::Undefine, None), (Op::Define, None), (Op::Start, Some("v1"))]);
    assert!(!f.desktops("a").iter().find(|d| d.name == two).expect("two").needs_reset);
}

#[test]
fn channel_rollback_moves_every_pool_of_the_channel_at_once() {
    let mut f = Fixture::new();
    for p in ["p1", "p2", "p3"] {
        f.create(p, 2, true);
    }
    f.set_channel(Channel::Test, 2);
    for p in ["p1", "p2", "p3"] {
        f.pools().update(p, false, &actor()).expect("update");
    }
    f.hv.set_latency(Op::Destroy, std::time::Duration::from_millis(150));
    f.hv.reset_peak();
    let ctx = &mut f.ctx;
    let r =
        ctx.engine(actor()).expect("engine").rollback_channel("img", Channel::Test, Some(1), false).expect("rollback");
    assert_eq!(r.version, 1);
    assert_eq!(r.pools.len(), 3);
    // Six desktops of three pools (two each), up to four calls at once: more than one pool's
    // desktops were in flight together, never one pool after another.
    let peak = f.hv.peak_in_flight();
    assert!(peak > 2 && peak <= 4, "desktops of several pools moved together: {peak}");
    for p in ["p1", "p2", "p3"] {
        assert!(f.desktops(p).iter().all(|d| d.version == 1 && !d.needs_reset), "{p}");
        for n in names(p, 1..=2) {
            assert_eq!(f.hv.state(&n).expect("state").0, DomainState::Running, "{n}");
        }
    }
}

#[test]
fn sessions_expiring_together_are_logged_off_with_their_resets_in_one_batch() {
    let mut f = Fixture::new();
    f.create("a", 6, true);
    let mut users = vec![];
    for i in 1..=6 {
        let name = format!("user{i}");
        let u = f.ctx.users().add(&name, false, None, &actor()).expect("user").user;
        f.ctx.users().entitle("a", &name, &actor()).expect("entitle");
        users.push(u);
    }
    for u in &users {
        f.ctx.sessions().expect("sessions").open(u, "a", std::time::Duration::from_secs(1)).expect("open");
    }
    assert!(f.desktops("a").iter().all(|d| d.assigned_to.is_some()));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    f.hv.set_latency(Op::Destroy, std::time::Duration::from_millis(150));
    f.hv.take_calls();
    let reaped = f.ctx.sessions().expect("sessions").reap(&actor(), &|_| {}).expect("reap");
    assert_eq!((reaped.ended.len(), reaped.finished.len(), reaped.failed.len()), (6, 6, 0), "{reaped:?}");
    let destroys: Vec<Call> = f.hv.calls().into_iter().filter(|c| c.op == Op::Destroy).collect();
    assert_eq!(destroys.len(), 6, "each desktop wiped");
    let overlap = destroys.iter().map(|c| c.in_flight).max().unwrap_or(0);
    assert!(overlap > 2, "the expired sessions' desktops were reset together: {destroys:?}");
    for d in f.desktops("a") {
        assert!(d.assigned_to.is_none() && !d.needs_reset, "{d:?}");
        assert_eq!(f.hv.state(&d.name).expect("state").0, DomainState::Running, "booted again: {}", d.name);
    }
}
