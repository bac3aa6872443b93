//! Replication against the recording fake hypervisor (volumes in memory, no libvirtd): the
//! pure plan first, then whole runs. The layers are sparse local files named by their digest;
//! the real-libvirt test with qcow2 chains is `tests/replica.rs`.

use super::*;
use crate::hypervisor::fake::{FakeHypervisor, Op};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const POOL: &str = "vdim-layers";
/// Each test layer's length: small, as hashing in a debug build is slow.
const LEN: u64 = 1 << 20;

fn wanted(digest: char, length: u64) -> Wanted {
    Wanted { digest: digest.to_string().repeat(64), length }
}

fn held(digest: char, physical: u64) -> Volume {
    Volume { name: format!("{}.qcow2", digest.to_string().repeat(64)), capacity: 1 << 30, allocation: 4096, physical }
}

fn recorded(digests: &[char]) -> BTreeSet<String> {
    digests.iter().map(|d| d.to_string().repeat(64)).collect()
}

#[test]
fn the_plan_uploads_what_the_host_lacks_in_chain_order_and_keeps_recorded_copies() {
    let chain = [wanted('a', 100), wanted('b', 200), wanted('c', 300)];
    assert_eq!(plan(&chain, &[], &recorded(&[])), [Action::Upload, Action::Upload, Action::Upload]);
    let host = [held('a', 100), held('c', 300), held('f', 7)];
    assert_eq!(plan(&chain, &host, &recorded(&['a', 'c'])), [Action::Keep, Action::Upload, Action::Keep]);
}

#[test]
fn the_plan_reads_back_unrecorded_copies_and_replaces_one_of_the_wrong_length() {
    let chain = [wanted('a', 100), wanted('b', 200)];
    let host = [held('a', 100), held('b', 199)];
    assert_eq!(plan(&chain, &host, &recorded(&[])), [Action::Check, Action::Replace { held_length: 199 }]);
    // A recorded digest does not save a copy whose length is wrong: the host changed since.
    assert_eq!(plan(&chain, &host, &recorded(&['a', 'b'])), [Action::Keep, Action::Replace { held_length: 199 }]);
}

// ---- whole runs against the fake ----------------------------------------------------------------

struct Fixture {
    dir: tempfile::TempDir,
    chain: Vec<ChainLayer>,
    store: HostStore,
}

impl Fixture {
    /// `n` sparse layers of [`LEN`] bytes each holding 8 KiB of data, base first.
    fn new(n: u8) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let chain = (0..n).map(|i| layer(dir.path(), i + 1, LEN)).collect();
        let store = HostStore { storage_pool: POOL.into(), path: dir.path().join("host-layers") };
        Fixture { dir, chain, store }
    }

    fn digests(&self) -> Vec<String> {
        self.chain.iter().map(|l| l.digest.clone()).collect()
    }

    fn volume(&self, i: usize) -> String {
        format!("{}.qcow2", self.chain[i].digest)
    }
}

/// A sparse file of `len` bytes with 4 KiB of `seed` at its start and in its middle, named
/// `<sha256>.qcow2` as the local store names layers.
fn layer(dir: &Path, seed: u8, len: u64) -> ChainLayer {
    let tmp = dir.join(format!("tmp-{seed}"));
    let f = File::create(&tmp).unwrap();
    f.set_len(len).unwrap();
    f.write_all_at(&[seed; 4096], 0).unwrap();
    f.write_all_at(&[seed; 4096], len / 2).unwrap();
    let digest = digest::sha256_file(&tmp, |_| {}).unwrap();
    let path = dir.join(format!("{digest}.qcow2"));
    std::fs::rename(&tmp, &path).unwrap();
    ChainLayer { digest, path }
}

fn run(hv: &FakeHypervisor, f: &Fixture, recorded: &BTreeSet<String>) -> Replicated {
    replicate(hv, &f.store, &f.chain, recorded, &mut |_| {}).expect("replicate")
}

/// The volume calls, as (op, volume or pool).
fn volume_calls(hv: &FakeHypervisor) -> Vec<(Op, String)> {
    hv.take_calls().into_iter().map(|c| (c.op, c.domain)).collect()
}

fn copied(r: &LayerReport) -> (u64, u32, Vec<BadCopy>) {
    match &r.outcome {
        Outcome::Copied { bytes_sent, attempts, quarantined, .. } => (*bytes_sent, *attempts, quarantined.clone()),
        other => panic!("layer {} not copied: {other:?}", r.digest),
    }
}

fn failure(r: &LayerReport) -> (String, ErrorKind) {
    match &r.outcome {
        Outcome::Failed { error, kind, .. } => (error.clone(), *kind),
        other => panic!("layer {} did not fail: {other:?}", r.digest),
    }
}

#[test]
fn a_missing_chain_is_copied_parent_first_each_copy_read_back_before_the_next() {
    let f = Fixture::new(3);
    let hv = FakeHypervisor::new();
    let mut steps = Vec::new();
    let r = replicate(&hv, &f.store, &f.chain, &BTreeSet::new(), &mut |p| {
        steps.push((p.layer.to_string(), p.step, p.done, p.total))
    })
    .expect("replicate");

    assert!(r.complete());
    assert_eq!(r.verified(), f.digests().iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((r.host.as_str(), r.storage_pool.as_str()), ("fake:///", POOL));
    for l in &r.layers {
        let (sent, attempts, quarantined) = copied(l);
        assert_eq!((sent, attempts), (8192, 1), "only the data travels, once");
        assert!(quarantined.is_empty());
    }
    assert_eq!(r.bytes_sent(), 3 * 8192);
    let mut want = vec![(Op::EnsureStoragePool, POOL.to_string()), (Op::StorageVolumes, POOL.to_string())];
    for i in 0..3 {
        want.push((Op::UploadVolume, f.volume(i)));
        want.push((Op::VolumeSha256, f.volume(i)));
    }
    assert_eq!(volume_calls(&hv), want);
    for (i, l) in f.chain.iter().enumerate() {
        assert_eq!(hv.volume_bytes(POOL, &f.volume(i)).unwrap(), std::fs::read(&l.path).unwrap());
    }
    // Progress: each layer's upload reaches its data, its read-back its length.
    let last = |d: &str, s: Step| {
        steps.iter().rfind(|(l, st, ..)| l == d && *st == s).map(|(.., done, total)| (*done, *total))
    };
    assert_eq!(last(&f.chain[1].digest, Step::Upload), Some((8192, 8192)));
    assert_eq!(last(&f.chain[1].digest, Step::ReadBack), Some((LEN, LEN)));
}

#[test]
fn recorded_copies_are_skipped_and_unrecorded_ones_only_read_back() {
    let f = Fixture::new(2);
    let hv = FakeHypervisor::new();
    run(&hv, &f, &BTreeSet::new());
    hv.take_calls();

    let all: BTreeSet<String> = f.digests().into_iter().collect();
    let r = run(&hv, &f, &all);
    assert!(r.layers.iter().all(|l| l.outcome == Outcome::Present { rehashed: false }), "{r:?}");
    assert_eq!(r.bytes_sent(), 0);
    assert!(volume_calls(&hv).iter().all(|(op, _)| matches!(op, Op::EnsureStoragePool | Op::StorageVolumes)));

    let only_base: BTreeSet<String> = [f.chain[0].digest.clone()].into();
    let r = run(&hv, &f, &only_base);
    assert_eq!(r.layers[0].outcome, Outcome::Present { rehashed: false });
    assert_eq!(r.layers[1].outcome, Outcome::Present { rehashed: true });
    let reads: Vec<_> = volume_calls(&hv).into_iter().filter(|(op, _)| *op != Op::StorageVolumes).collect();
    assert_eq!(
        reads,
        [(Op::EnsureStoragePool, POOL.into()), (Op::VolumeSha256, f.volume(1))],
        "read back, nothing sent"
    );
}

#[test]
fn a_flipped_byte_on_the_host_is_detected_quarantined_and_replaced() {
    let f = Fixture::new(2);
    let hv = FakeHypervisor::new();
    run(&hv, &f, &BTreeSet::new());
    hv.corrupt_volume(POOL, &f.volume(1), 4000);
    hv.take_calls();

    // The caller's record says nothing about the child: it is read back, found wrong, replaced.
    let r = run(&hv, &f, &[f.chain[0].digest.clone()].into());
    assert_eq!(r.layers[0].outcome, Outcome::Present { rehashed: false });
    let (sent, attempts, quarantined) = copied(&r.layers[1]);
    assert_eq!((sent, attempts), (8192, 1));
    assert!(
        matches!(&quarantined[..], [BadCopy::Digest { sha256 }] if *sha256 != f.chain[1].digest),
        "{quarantined:?}"
    );
    let calls: Vec<_> =
        volume_calls(&hv).into_iter().filter(|(op, _)| op.changes() || *op == Op::VolumeSha256).collect();
    let v = f.volume(1);
    let want = [
        (Op::EnsureStoragePool, POOL.to_string()),
        (Op::VolumeSha256, v.clone()),
        (Op::DeleteVolume, v.clone()),
        (Op::UploadVolume, v.clone()),
        (Op::VolumeSha256, v.clone()),
    ];
    assert_eq!(calls, want);
    assert_eq!(hv.volume_bytes(POOL, &v).unwrap(), std::fs::read(&f.chain[1].path).unwrap());
}

#[test]
fn verify_host_reads_back_every_copy_and_quarantines_a_corrupt_one_at_once() {
    let f = Fixture::new(3);
    let hv = FakeHypervisor::new();
    run(&hv, &f, &BTreeSet::new());
    hv.corrupt_volume(POOL, &f.volume(0), 0);
    hv.delete_volume(POOL, &f.volume(2)).unwrap();

    let v = verify_host(&hv, &f.store, &f.digests(), &mut |_| {}).expect("verify");
    assert!(matches!(&v.layers[0].state, CopyState::Corrupt { copy: BadCopy::Digest { .. }, quarantined: true }));
    assert_eq!(v.layers[1].state, CopyState::Verified);
    assert_eq!(v.layers[2].state, CopyState::Missing);
    assert_eq!(v.verified(), [f.chain[1].digest.as_str()]);
    assert!(hv.volume_bytes(POOL, &f.volume(0)).is_none(), "the corrupt copy is gone, nothing can use it");

    // What verify found is what the caller records: the next replicate copies the rest.
    let recorded: BTreeSet<String> = v.verified().into_iter().map(String::from).collect();
    let r = run(&hv, &f, &recorded);
    assert!(r.complete());
    copied(&r.layers[0]);
    assert_eq!(r.layers[1].outcome, Outcome::Present { rehashed: false });
    copied(&r.layers[2]);
}

#[test]
fn a_copy_that_reads_back_wrong_is_quarantined_and_uploaded_once_more() {
    let f = Fixture::new(1);
    let hv = FakeHypervisor::new();
    hv.corrupt_next_upload(&f.volume(0), 100);
    let r = run(&hv, &f, &BTreeSet::new());
    let (sent, attempts, quarantined) = copied(&r.layers[0]);
    assert_eq!((sent, attempts, quarantined.len()), (2 * 8192, 2, 1), "both uploads counted");
    assert_eq!(hv.volume_bytes(POOL, &f.volume(0)).unwrap(), std::fs::read(&f.chain[0].path).unwrap());
}

#[test]
fn a_copy_wrong_after_both_uploads_fails_naming_host_pool_and_layer_and_is_not_left() {
    let f = Fixture::new(2);
    let hv = FakeHypervisor::new();
    hv.corrupt_next_upload(&f.volume(1), 100);
    hv.corrupt_next_upload(&f.volume(1), 200);
    let r = run(&hv, &f, &BTreeSet::new());
    assert!(!r.complete());
    assert_eq!(r.verified(), [f.chain[0].digest.as_str()]);
    let (error, kind) = failure(&r.layers[1]);
    assert_eq!(kind, ErrorKind::Internal);
    for part in ["fake:///", POOL, &f.chain[1].digest, "2 uploads"] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
    assert!(hv.volume_bytes(POOL, &f.volume(1)).is_none(), "no bad copy stays under the layer's name");
}

#[test]
fn an_upload_error_fails_that_layer_only_and_names_host_pool_and_layer() {
    let f = Fixture::new(3);
    let hv = FakeHypervisor::new();
    hv.fail_next(Op::UploadVolume, &f.volume(1));
    let r = run(&hv, &f, &BTreeSet::new());
    copied(&r.layers[0]);
    copied(&r.layers[2]);
    let (error, kind) = failure(&r.layers[1]);
    assert_eq!(kind, ErrorKind::Internal);
    assert!(error.contains(&f.chain[1].digest) && error.contains("fake:///"), "{error}");
    assert!(!r.complete());
    // The next run copies only the missing one.
    hv.take_calls();
    let r = run(&hv, &f, &r.verified().into_iter().map(String::from).collect());
    assert!(r.complete());
    let uploads: Vec<_> = volume_calls(&hv).into_iter().filter(|(op, _)| *op == Op::UploadVolume).collect();
    assert_eq!(uploads, [(Op::UploadVolume, f.volume(1))]);
}

#[test]
fn a_damaged_local_layer_is_refused_once_and_not_left_on_the_host() {
    let f = Fixture::new(1);
    let hv = FakeHypervisor::new();
    let file = std::fs::OpenOptions::new().write(true).open(&f.chain[0].path).unwrap();
    file.write_all_at(b"rot", 10).unwrap();
    let r = run(&hv, &f, &BTreeSet::new());
    let (error, kind) = failure(&r.layers[0]);
    assert_eq!(kind, ErrorKind::Internal);
    assert!(error.contains("local store is damaged") && error.contains(&f.chain[0].digest), "{error}");
    let uploads = hv.calls().iter().filter(|c| c.op == Op::UploadVolume).count();
    assert_eq!(uploads, 1, "no retry can fix the source");
    assert!(hv.volume_bytes(POOL, &f.volume(0)).is_none());
}

#[test]
fn what_a_crashed_upload_left_is_read_back_and_replaced() {
    let f = Fixture::new(1);
    let hv = FakeHypervisor::new();
    hv.ensure_storage_pool(POOL, &f.store.path).unwrap();
    // The header goes last: a dead upload leaves the right length with zeros in front.
    let mut partial = std::fs::read(&f.chain[0].path).unwrap();
    partial[..4096].fill(0);
    hv.put_volume(POOL, &f.volume(0), partial);
    let r = run(&hv, &f, &BTreeSet::new());
    let (_, attempts, quarantined) = copied(&r.layers[0]);
    assert_eq!((attempts, quarantined.len()), (1, 1));
    // A copy of another length is replaced without reading it back.
    hv.delete_volume(POOL, &f.volume(0)).unwrap();
    hv.put_volume(POOL, &f.volume(0), vec![0; 100]);
    hv.take_calls();
    let r = run(&hv, &f, &BTreeSet::new());
    let (_, _, quarantined) = copied(&r.layers[0]);
    assert_eq!(quarantined, [BadCopy::Length { length: 100, wanted: LEN }]);
    let reads = volume_calls(&hv).iter().filter(|(op, _)| *op == Op::VolumeSha256).count();
    assert_eq!(reads, 1, "only the new copy is read back");
}

#[test]
fn a_storage_pool_of_that_name_elsewhere_is_a_conflict_naming_both_paths() {
    let f = Fixture::new(1);
    let hv = FakeHypervisor::new();
    hv.ensure_storage_pool(POOL, Path::new("/srv/other")).unwrap();
    let e = replicate(&hv, &f.store, &f.chain, &BTreeSet::new(), &mut |_| {}).expect_err("elsewhere");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let msg = e.to_string();
    assert!(msg.contains("/srv/other") && msg.contains(&f.store.path.display().to_string()) && msg.contains(POOL));
}

#[test]
fn bad_settings_and_chains_are_refused_before_any_call() {
    let f = Fixture::new(1);
    let hv = FakeHypervisor::new();
    let nothing = &BTreeSet::new();
    let bad_pool = HostStore { storage_pool: "a'b".into(), ..f.store.clone() };
    let bad_path = HostStore { path: "relative/dir".into(), ..f.store.clone() };
    let twice = vec![f.chain[0].clone(), f.chain[0].clone()];
    let not_digest = vec![ChainLayer { digest: "v1".into(), path: f.chain[0].path.clone() }];
    let missing = vec![ChainLayer { digest: "e".repeat(64), path: f.dir.path().join("gone.qcow2") }];
    for (store, chain, kind) in [
        (&bad_pool, &f.chain, ErrorKind::Invalid),
        (&bad_path, &f.chain, ErrorKind::Invalid),
        (&f.store, &twice, ErrorKind::Invalid),
        (&f.store, &not_digest, ErrorKind::Invalid),
        (&f.store, &missing, ErrorKind::Internal),
    ] {
        let e = replicate(&hv, store, chain, nothing, &mut |_| {}).expect_err("refused");
        assert_eq!(e.kind(), kind, "{e}");
    }
    assert!(hv.calls().is_empty());
    let e = verify_host(&hv, &f.store, &f.digests(), &mut |_| {}).expect_err("no store on the host yet");
    assert!(e.to_string().contains(POOL) && e.to_string().contains("fake:///"), "{e}");
}

#[test]
fn the_host_store_setting_has_defaults_and_refuses_unknown_keys() {
    let d = HostStore::default();
    assert_eq!((d.storage_pool.as_str(), d.path.as_path()), ("vdim-layers", Path::new("/var/lib/vdim/layers-replica")));
    d.validate().expect("the defaults are valid");
    let s: HostStore = toml::from_str("path = \"/srv/vdim/layers\"").unwrap();
    assert_eq!((s.storage_pool.as_str(), s.path.as_path()), ("vdim-layers", Path::new("/srv/vdim/layers")));
    assert!(toml::from_str::<HostStore>("pool = \"x\"").is_err());
}

#[test]
fn reports_serialise_with_their_outcome_and_found_digest() {
    let r = LayerReport {
        digest: "a".repeat(64),
        outcome: Outcome::Failed {
            error: "boom".into(),
            kind: ErrorKind::Internal,
            quarantined: vec![BadCopy::Digest { sha256: "b".repeat(64) }],
        },
    };
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["quarantined"][0]["found"], "digest");
    assert_eq!(v["quarantined"][0]["sha256"], "b".repeat(64));
    assert!(v.get("kind").is_none());
}
