//! Layers reach a real libvirt host, verified (qemu:///system, started by scripts/setup-host):
//! a sparse qcow2 chain is replicated into a storage pool in a temp directory through libvirt
//! streams, read back, damaged behind libvirt's back and replaced. Each test owns a uniquely
//! named storage pool, undefined on drop however the test ends; its directory goes with the
//! temp dir.

mod common;

use common::sh;
use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use vdim::hypervisor::{Hypervisor, HypervisorError, Libvirt};
use vdim::replica::{replicate, verify_host, BadCopy, ChainLayer, CopyState, HostStore, Outcome, Replicated};

const QEMU_URI: &str = "qemu:///system";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn qemu() -> Libvirt {
    Libvirt::connect(QEMU_URI)
        .unwrap_or_else(|e| panic!("{e}: these tests need the real daemon, run scripts/setup-host first"))
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh").arg("-c").arg(QEMU_URI).args(args).output().expect("virsh")
}

/// A storage pool this test owns, in a temp directory: destroyed and undefined on drop (even
/// when the test fails), its files removed with the directory.
struct HostPool {
    store: HostStore,
    _dir: tempfile::TempDir,
}

impl HostPool {
    fn new(tag: &str) -> HostPool {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("vdimtest-replica-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let dir = tempfile::tempdir().expect("temp dir");
        let store = HostStore { storage_pool: name, path: dir.path().join("layers") };
        HostPool { store, _dir: dir }
    }

    fn name(&self) -> &str {
        &self.store.storage_pool
    }

    fn file(&self, digest: &str) -> PathBuf {
        self.store.path.join(format!("{digest}.qcow2"))
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        let _ = virsh(&["pool-destroy", self.name()]);
        let _ = virsh(&["pool-undefine", self.name()]);
    }
}

/// A chain in a local store: base first, each `<sha256>.qcow2`, the child backed by the base's
/// file name with its format stated, as the store seals layers.
struct Chain {
    dir: tempfile::TempDir,
    layers: Vec<ChainLayer>,
}

impl Chain {
    /// The base: 1 GiB virtual, metadata preallocated (a 1 GiB file, sparse) with
    /// `base_data` bytes of random data; the child: a plain overlay holding 2 MiB.
    fn new(base_data: u64) -> Chain {
        Chain::with(base_data, true)
    }

    /// As [`Chain::new`]; without preallocation the base is a dense file of about its data,
    /// as `qemu-img convert` writes them.
    fn with(base_data: u64, preallocated: bool) -> Chain {
        let dir = tempfile::tempdir().expect("temp dir");
        let random = dir.path().join("random");
        sh(
            "dd",
            &["if=/dev/urandom", &format!("of={}", random.display()), "bs=1M", &format!("count={}", base_data / MIB)],
        );
        let tmp = dir.path().join("tmp-base");
        let prealloc = if preallocated { "preallocation=metadata" } else { "preallocation=off" };
        sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", prealloc, p(&tmp), &GIB.to_string()]);
        let half = base_data / 2;
        write_from(&tmp, &random, 0, 0, half);
        write_from(&tmp, &random, half, 512 * MIB, base_data - half);
        let base = named_by_digest(&tmp);

        let tmp = dir.path().join("tmp-child");
        let backing = format!("{}.qcow2", base.digest);
        sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &backing, "-F", "qcow2", p(&tmp)]);
        write_from(&tmp, &random, 0, 100 * MIB, 2 * MIB);
        let child = named_by_digest(&tmp);
        std::fs::remove_file(&random).unwrap();
        Chain { dir, layers: vec![base, child] }
    }

    fn digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `len` bytes of `src` from `src_off` written at guest offset `at` of a qcow2 (qemu-io).
fn write_from(image: &Path, src: &Path, src_off: u64, at: u64, len: u64) {
    let cmd = format!("write -s {} -o {src_off} {at} {len}", src.display());
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", &cmd, p(image)]).output().unwrap();
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("error") {
        // Older qemu-io has no `-o` for `write -s`: write the slice from a file of its own.
        let slice = src.with_extension(format!("{src_off}"));
        let data = std::fs::read(src).unwrap();
        std::fs::write(&slice, &data[src_off as usize..(src_off + len) as usize]).unwrap();
        sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -s {} {at} {len}", slice.display()), p(image)]);
        std::fs::remove_file(slice).unwrap();
    }
}

/// Renames a layer file to `<sha256sum>.qcow2` next to it.
fn named_by_digest(tmp: &Path) -> ChainLayer {
    let digest = sha256sum(tmp);
    let path = tmp.with_file_name(format!("{digest}.qcow2"));
    std::fs::rename(tmp, &path).unwrap();
    ChainLayer { digest, path }
}

fn sha256sum(path: &Path) -> String {
    let out = sh("sha256sum", &[p(path)]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Flips one byte of guest data in a qcow2 file, written directly (behind libvirt's back):
/// the host offset of the first allocated data cluster, from `qemu-img map`.
fn flip_a_data_byte(path: &Path) {
    let out = sh("qemu-img", &["map", "-U", "--output=json", "-f", "qcow2", p(path)]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true && e["depth"] == 0 && e.get("offset").is_some())
        .and_then(|e| e["offset"].as_u64())
        .expect("an allocated data cluster")
        + 1000;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    f.sync_all().unwrap();
}

fn copied(r: &Replicated, i: usize) -> (u64, f64, f64, Vec<BadCopy>) {
    match &r.layers[i].outcome {
        Outcome::Copied { bytes_sent, upload_seconds, read_back_seconds, quarantined, .. } => {
            (*bytes_sent, *upload_seconds, *read_back_seconds, quarantined.clone())
        }
        other => panic!("layer {i} not copied: {other:?}"),
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

#[test]
fn a_sparse_chain_is_replicated_verified_and_a_flipped_byte_is_detected_and_replaced() {
    let hv = qemu();
    let host = HostPool::new("chain");
    let chain = Chain::new(4 * MIB);
    let nothing = BTreeSet::new();

    let mut uploads = 0;
    let r = replicate(&hv, &host.store, &chain.layers, &nothing, &mut |p| {
        uploads += usize::from(p.step == vdim::replica::Step::Upload)
    })
    .expect("replicate");
    assert!(r.complete(), "{r:#?}");
    assert!(uploads > 0, "progress was reported");
    for (i, layer) in chain.layers.iter().enumerate() {
        let (sent, up_s, back_s, quarantined) = copied(&r, i);
        let (length, alloc) = (std::fs::metadata(&layer.path).unwrap().len(), allocated(&layer.path));
        eprintln!(
            "layer {i}: file {:.1} MiB, allocated {:.1} MiB, sent {:.1} MiB; upload {up_s:.3} s, read back {back_s:.3} s",
            mb(length),
            mb(alloc),
            mb(sent)
        );
        assert!(sent < 2 * alloc, "layer {i}: sent {sent} bytes for {alloc} allocated");
        assert!(quarantined.is_empty());
        // The copy on the host is the layer, byte for byte, holes and all.
        let want = sha256sum(&layer.path);
        assert_eq!(want, layer.digest);
        assert_eq!(sha256sum(&host.file(&layer.digest)), want);
        let back = hv.volume_sha256(host.name(), &format!("{}.qcow2", layer.digest), &mut |_| {}).unwrap();
        assert_eq!((back.sha256.as_str(), back.length), (want.as_str(), length));
        assert!(allocated(&host.file(&layer.digest)) < 2 * alloc + 4 * MIB, "the host's copy stays sparse");
    }
    let (base_sent, ..) = copied(&r, 0);
    assert!(base_sent < 64 * MIB, "the 1 GiB base file travelled as its data: {base_sent} bytes");

    // The chain resolves on the host as in the local store, and QEMU reads it.
    let child = host.file(&chain.layers[1].digest);
    let info = sh("qemu-img", &["info", "-U", "--backing-chain", "--output=json", p(&child)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info[1]["filename"].as_str().map(PathBuf::from), Some(host.file(&chain.layers[0].digest)));
    sh("qemu-img", &["check", "-U", "-f", "qcow2", p(&child)]);

    // Recorded verified: nothing is sent or read.
    let all: BTreeSet<String> = chain.digests().into_iter().collect();
    let r = replicate(&hv, &host.store, &chain.layers, &all, &mut |_| {}).expect("replicate again");
    assert!(r.layers.iter().all(|l| l.outcome == Outcome::Present { rehashed: false }), "{r:#?}");

    // A byte flipped in the host's copy of the base: verify finds it and quarantines it.
    flip_a_data_byte(&host.file(&chain.layers[0].digest));
    let v = verify_host(&hv, &host.store, &chain.digests(), &mut |_| {}).expect("verify");
    match &v.layers[0].state {
        CopyState::Corrupt { copy: BadCopy::Digest { sha256 }, quarantined: true } => {
            assert_ne!(*sha256, chain.layers[0].digest)
        }
        other => panic!("the flipped byte went unseen: {other:?}"),
    }
    assert_eq!(v.layers[1].state, CopyState::Verified);
    assert!(!host.file(&chain.layers[0].digest).exists(), "the corrupt copy is gone");
    let names: Vec<String> = hv.storage_volumes(host.name()).unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, [format!("{}.qcow2", chain.layers[1].digest)]);

    // The caller records what verify found; the next replicate replaces the base only.
    let recorded: BTreeSet<String> = v.verified().into_iter().map(String::from).collect();
    let r = replicate(&hv, &host.store, &chain.layers, &recorded, &mut |_| {}).expect("replace");
    copied(&r, 0);
    assert_eq!(r.layers[1].outcome, Outcome::Present { rehashed: false });
    assert_eq!(sha256sum(&host.file(&chain.layers[0].digest)), chain.layers[0].digest);

    // A flipped byte found by replicate itself (nothing recorded): read back, quarantined, replaced.
    flip_a_data_byte(&host.file(&chain.layers[1].digest));
    let r = replicate(&hv, &host.store, &chain.layers, &BTreeSet::new(), &mut |_| {}).expect("replace child");
    assert_eq!(r.layers[0].outcome, Outcome::Present { rehashed: true });
    let (_, _, _, quarantined) = copied(&r, 1);
    assert!(matches!(&quarantined[..], [BadCopy::Digest { .. }]), "{quarantined:?}");
    assert_eq!(sha256sum(&host.file(&chain.layers[1].digest)), chain.layers[1].digest);
}

#[test]
fn an_upload_that_died_leaves_no_qcow2_image_and_is_read_back_and_replaced() {
    let hv = qemu();
    let host = HostPool::new("died");
    let chain = Chain::new(2 * MIB);
    let base = &chain.layers[0];
    hv.ensure_storage_pool(host.name(), &host.store.path).expect("storage pool");
    // What a dead upload leaves: the volume at its length, the body sent, the header not yet.
    let length = std::fs::metadata(&base.path).unwrap().len();
    let vol = format!("{}.qcow2", base.digest);
    let out = virsh(&["vol-create-as", host.name(), &vol, &format!("{length}b"), "--format", "raw"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tail = chain.dir.path().join("tail");
    sh(
        "dd",
        &[
            &format!("if={}", base.path.display()),
            &format!("of={}", tail.display()),
            "bs=4096",
            "skip=1",
            "conv=sparse",
        ],
    );
    let out = virsh(&["vol-upload", "--sparse", "--pool", host.name(), &vol, p(&tail), "--offset", "4096"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refused = Command::new("qemu-img").args(["info", "-U", "-f", "qcow2", p(&host.file(&base.digest))]).output();
    assert!(!refused.unwrap().status.success(), "QEMU must not open a copy without its header as qcow2");

    let r = replicate(&hv, &host.store, &chain.layers, &BTreeSet::new(), &mut |_| {}).expect("replicate");
    assert!(r.complete(), "{r:#?}");
    let (_, _, _, quarantined) = copied(&r, 0);
    assert!(matches!(&quarantined[..], [BadCopy::Digest { .. }]), "{quarantined:?}");
    assert_eq!(sha256sum(&host.file(&base.digest)), base.digest);
}

#[test]
fn the_storage_pool_is_made_started_when_inactive_and_refused_elsewhere() {
    let hv = qemu();
    let host = HostPool::new("pool");
    hv.ensure_storage_pool(host.name(), &host.store.path).expect("define, build, start");
    assert!(host.store.path.is_dir());
    hv.ensure_storage_pool(host.name(), &host.store.path).expect("again: nothing to do");
    assert!(virsh(&["pool-destroy", host.name()]).status.success());
    hv.ensure_storage_pool(host.name(), &host.store.path).expect("started again");
    assert!(hv.storage_volumes(host.name()).expect("running").is_empty());

    let other = host.store.path.with_file_name("other");
    let e = hv.ensure_storage_pool(host.name(), &other).expect_err("another path");
    assert!(matches!(e, HypervisorError::StoragePoolElsewhere { .. }), "{e}");
    let msg = e.to_string();
    for part in [QEMU_URI, host.name(), p(&host.store.path), p(&other)] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    let e = hv.volume_sha256(host.name(), "nothing.qcow2", &mut |_| {}).expect_err("no such volume");
    let msg = e.to_string();
    assert!(msg.contains(QEMU_URI) && msg.contains(host.name()) && msg.contains("nothing.qcow2"), "{msg}");
}

/// The figure: a 1 GiB layer holding 200 MiB, replicated (upload + read-back) against
/// `virsh vol-upload` of the same file, plain and `--sparse`, in the same run; once as a 1 GiB
/// sparse file (metadata preallocated), once as a dense 200 MiB file.
#[test]
fn throughput_against_virsh_vol_upload() {
    let hv = qemu();
    for preallocated in [true, false] {
        let host = HostPool::new("speed");
        let chain = Chain::with(200 * MIB, preallocated);
        measure(&hv, &host, &chain.layers[..1]);
    }
}

fn measure(hv: &Libvirt, host: &HostPool, base: &[ChainLayer]) {
    let t = Instant::now();
    let r = replicate(hv, &host.store, base, &BTreeSet::new(), &mut |_| {}).expect("replicate");
    let ours = t.elapsed().as_secs_f64();
    let (sent, up_s, back_s, _) = copied(&r, 0);
    let length = std::fs::metadata(&base[0].path).unwrap().len();
    let alloc = allocated(&base[0].path);
    assert!(sent < 2 * alloc, "sent {sent} for {alloc} allocated");

    let virsh_upload = |name: &str, sparse: bool| {
        let out = virsh(&["vol-create-as", host.name(), name, &format!("{length}b"), "--format", "raw"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut args = vec!["vol-upload", "--pool", host.name(), name, p(&base[0].path)];
        if sparse {
            args.insert(1, "--sparse");
        }
        let t = Instant::now();
        let out = virsh(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(sha256sum(&host.store.path.join(name)), base[0].digest);
        secs
    };
    let plain = virsh_upload("virsh-plain.qcow2", false);
    let sparse = virsh_upload("virsh-sparse.qcow2", true);
    eprintln!(
        "1 GiB virtual, {:.0} MiB file, {:.0} MiB allocated: vdim sent {:.0} MiB, upload {up_s:.2} s + read back \
         {back_s:.2} s = {ours:.2} s in all; virsh vol-upload {plain:.2} s, --sparse {sparse:.2} s (neither \
         verifies); vdim against virsh plain {:.2}x, against --sparse {:.2}x",
        mb(length),
        mb(alloc),
        mb(sent),
        plain / ours,
        sparse / ours,
    );
}
