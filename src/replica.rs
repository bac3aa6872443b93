//! Layers reach a host, verified. A version's chain (its layer and every ancestor) is copied
//! into a libvirt host's layer store over that host's own connection, and a copy counts only
//! once it has been read back from the host with the SHA-256 its name promises.
//!
//! A host's layer store is a directory storage pool ([`HostStore`]: `vdim-layers` at
//! `/var/lib/vdim/layers-replica` unless set otherwise) holding each layer under the name the
//! local store gives it, `<sha256>.qcow2`. A layer's backing name is its parent's file name
//! with the format stated, so the chain resolves on the host as it does in the local store.
//!
//! ```text
//!  chain (base first) ─┐
//!  host's volumes ─────┼─► plan (pure), per layer:
//!  recorded verified ──┘
//!   Keep     held, right length, recorded verified by the caller ─────────► Present
//!   Check    held, right length, not recorded ─ read back ─ digest right ─► Present (rehashed)
//!                                                        └ wrong ──┐
//!   Replace  held, wrong length ───────────────────────────────────┤ quarantine (delete)
//!   Upload   not held ◄────────────────────────────────────────────┘
//!      │ sparse upload ─ read back ─ digest right ───────────────────────► Copied
//!      │                            └ wrong ─ quarantine, upload once more ─► Copied | Failed
//! ```
//!
//! **Verify, then record.** libvirt cannot rename a volume, so a copy is uploaded under its
//! final name, and a name in the pool proves nothing: only a read-back whose SHA-256 equals the
//! name counts. [`replicate`] reports which layers are verified on the host now
//! ([`Replicated::verified`]); the caller records them (its catalog) and passes what it has
//! recorded next time, so a layer known good is not read back again. The upload sends the
//! qcow2 header last: a copy whose upload died (vdim killed, host lost) has no qcow2 magic, so
//! QEMU refuses it as a qcow2 image, and the next [`replicate`] finds it unrecorded, reads it
//! back and replaces it.
//!
//! **Quarantine is deletion.** A copy that reads back wrong is deleted at once and its digest
//! reported ([`BadCopy`]) and logged. It is not kept under another name: libvirt has no
//! rename, and a clone (`virStorageVolCreateXMLFrom`) of a qcow2 volume is made by
//! `qemu-img convert`, which rewrites the very bytes that would be evidence. A desktop already
//! running on a deleted copy keeps its open file until it stops; new ones get the replacement.
//!
//! Two vdim processes replicating the same layer to the same host at once: the second one's
//! upload finds the volume taken and that layer fails (`VolumeExists`, a conflict); callers
//! serialise replication per host.

use crate::digest;
use crate::error::{ErrorKind, Kind};
use crate::home;
use crate::hypervisor::{sparse, xml, Hypervisor, HypervisorError, Volume};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;
use thiserror::Error;

/// The storage pool of a host's layer store unless set otherwise.
pub const DEFAULT_STORAGE_POOL: &str = "vdim-layers";
/// Its directory on the host unless set otherwise: vdim's own, outside libvirt's
/// `/var/lib/libvirt/images`, so no other pool lists the layers as its volumes.
pub const DEFAULT_PATH: &str = "/var/lib/vdim/layers-replica";

/// Uploads of one layer before it fails: the first, and one more after a bad read-back.
const ATTEMPTS: u32 = 2;

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("The layer store's storage pool name {name:?} is refused: {reason}")]
    StoragePoolName { name: String, reason: &'static str },
    #[error("The layer store's path {path} is refused: {reason}")]
    StorePath { path: PathBuf, reason: &'static str },
    #[error("Cannot replicate this chain: {reason}")]
    Chain { reason: String },
    #[error("Cannot read layer {digest} at {path}: {source}")]
    LocalLayer { digest: String, path: PathBuf, source: std::io::Error },
    #[error("Layer {digest} at {path} reads as {found}, not as its name: the local store is damaged (run 'vdim image verify'); its copy on {uri} was deleted")]
    LocalCorrupt { uri: String, digest: String, path: PathBuf, found: String },
    #[error("Layer {digest} read back from {uri} (storage pool {pool}) wrong after each of {attempts} uploads (last as {found}): that host's disk or the network corrupts data; the bad copies were deleted")]
    CopyCorrupt { uri: String, pool: String, digest: String, found: String, attempts: u32 },
}

impl Kind for ReplicaError {
    fn kind(&self) -> ErrorKind {
        match self {
            ReplicaError::Hypervisor(e) => e.kind(),
            ReplicaError::StoragePoolName { .. } | ReplicaError::StorePath { .. } | ReplicaError::Chain { .. } => {
                ErrorKind::Invalid
            }
            ReplicaError::LocalLayer { .. } | ReplicaError::LocalCorrupt { .. } | ReplicaError::CopyCorrupt { .. } => {
                ErrorKind::Internal
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, ReplicaError>;

/// Where a host keeps its layers: a libvirt directory storage pool. Each host has its own
/// (hosts sharing one filesystem, as test hosts on one machine do, need distinct paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostStore {
    /// The storage pool's name on the host.
    pub storage_pool: String,
    /// Its directory on the host (absolute; libvirt makes it, mode 0711).
    pub path: PathBuf,
}

impl Default for HostStore {
    fn default() -> HostStore {
        HostStore { storage_pool: DEFAULT_STORAGE_POOL.into(), path: PathBuf::from(DEFAULT_PATH) }
    }
}

impl HostStore {
    /// Refuses names and paths that would need more than escaping in libvirt's XML.
    pub fn validate(&self) -> Result<()> {
        if let Some(reason) = xml::name_problem(&self.storage_pool) {
            return Err(ReplicaError::StoragePoolName { name: self.storage_pool.clone(), reason });
        }
        if let Some(reason) = xml::path_problem(&self.path) {
            return Err(ReplicaError::StorePath { path: self.path.clone(), reason });
        }
        Ok(())
    }
}

/// One layer of a chain: its digest and its file in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    pub digest: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Data bytes sent of those the layer holds.
    Upload,
    /// Bytes read back and hashed of the copy's length (holes included).
    ReadBack,
}

/// How far one layer's step has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    pub layer: &'a str,
    pub step: Step,
    pub done: u64,
    pub total: u64,
}

// ---- the pure decision ------------------------------------------------------------------------

/// A layer the host should hold: its digest and the length of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub digest: String,
    pub length: u64,
}

/// What to do about one layer on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Held with the right length and recorded verified: nothing to send or read.
    Keep,
    /// Held with the right length but not recorded verified: read it back; replace it if wrong.
    Check,
    /// Held with another length: certainly not the layer. Quarantine it, then upload.
    Replace { held_length: u64 },
    /// Not held: upload.
    Upload,
}

/// What to do about each layer of `chain` (in its order), given the volumes the host's
/// storage pool holds and the digests the caller has recorded verified on that host. Volumes
/// that are no layer of the chain are none of its business.
pub fn plan(chain: &[Wanted], held: &[Volume], recorded: &BTreeSet<String>) -> Vec<Action> {
    chain
        .iter()
        .map(|w| {
            let name = home::layer_file_name(&w.digest);
            match held.iter().find(|v| v.name == name) {
                None => Action::Upload,
                Some(v) if v.physical != w.length => Action::Replace { held_length: v.physical },
                Some(_) if recorded.contains(&w.digest) => Action::Keep,
                Some(_) => Action::Check,
            }
        })
        .collect()
}

// ---- reports ----------------------------------------------------------------------------------

/// A copy on the host that was not the layer, and was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "found", rename_all = "snake_case")]
pub enum BadCopy {
    /// Read back as this SHA-256.
    Digest { sha256: String },
    /// Its file had this length, not the layer's.
    Length { length: u64, wanted: u64 },
}

impl fmt::Display for BadCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadCopy::Digest { sha256 } => write!(f, "read back as {sha256}"),
            BadCopy::Length { length, wanted } => write!(f, "{length} bytes long, not {wanted}"),
        }
    }
}

/// What became of one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Already on the host and good: recorded verified by the caller (`rehashed: false`), or
    /// read back now with the right digest.
    Present { rehashed: bool },
    /// Uploaded and read back with the right digest.
    Copied {
        /// Data bytes sent, every attempt counted (holes travel as their length only).
        bytes_sent: u64,
        /// The layer file's length.
        length: u64,
        upload_seconds: f64,
        read_back_seconds: f64,
        /// 1, or 2 when the first copy read back wrong.
        attempts: u32,
        /// Copies deleted on the way: one the host held, one that read back wrong.
        quarantined: Vec<BadCopy>,
    },
    /// Not on the host verified; nothing of it counts there.
    Failed {
        /// Names the host, the storage pool or layer, and what failed.
        error: String,
        #[serde(skip)]
        kind: ErrorKind,
        quarantined: Vec<BadCopy>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    pub digest: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What [`replicate`] did on one host, layer by layer in the chain's order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replicated {
    pub host: String,
    pub storage_pool: String,
    pub layers: Vec<LayerReport>,
}

impl Replicated {
    /// Every layer of the chain is on the host, verified: desktops of it may be placed there.
    pub fn complete(&self) -> bool {
        self.layers.iter().all(|l| !matches!(l.outcome, Outcome::Failed { .. }))
    }

    /// The digests verified on the host now (for the caller to record).
    pub fn verified(&self) -> Vec<&str> {
        let ok = |l: &&LayerReport| !matches!(l.outcome, Outcome::Failed { .. });
        self.layers.iter().filter(ok).map(|l| l.digest.as_str()).collect()
    }

    /// Copies found bad on the host and replaced (or deleted), by layer.
    pub fn quarantined(&self) -> Vec<(&str, String)> {
        let mut out = vec![];
        for l in &self.layers {
            if let Outcome::Copied { quarantined, .. } | Outcome::Failed { quarantined, .. } = &l.outcome {
                out.extend(quarantined.iter().map(|q| (l.digest.as_str(), q.to_string())));
            }
        }
        out
    }

    /// Data bytes sent over all layers.
    pub fn bytes_sent(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l.outcome {
                Outcome::Copied { bytes_sent, .. } => bytes_sent,
                _ => 0,
            })
            .sum()
    }
}

/// The state of one layer's copy found by [`verify_host`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CopyState {
    /// Read back with the right digest.
    Verified,
    /// Not in the storage pool.
    Missing,
    /// Read back wrong; deleted unless `quarantined` is false (then the deletion failed, and
    /// the next [`replicate`] tries again).
    Corrupt { copy: BadCopy, quarantined: bool },
    /// Could not be read back.
    Unreadable {
        error: String,
        #[serde(skip)]
        kind: ErrorKind,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostCopy {
    pub digest: String,
    #[serde(flatten)]
    pub state: CopyState,
}

/// What [`verify_host`] found on one host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    pub host: String,
    pub storage_pool: String,
    pub layers: Vec<HostCopy>,
}

impl Verification {
    /// The digests read back right.
    pub fn verified(&self) -> Vec<&str> {
        let ok = |c: &&HostCopy| c.state == CopyState::Verified;
        self.layers.iter().filter(ok).map(|c| c.digest.as_str()).collect()
    }
}

// ---- the work ---------------------------------------------------------------------------------

/// Gets `chain` (base first, as parent links give it: a layer's backing is the one before)
/// onto the host behind `hv`, verified. Makes the host's layer store when it has none, uploads
/// what the host lacks (sparse), reads every copy back, quarantines and uploads once more a copy
/// that reads back wrong, and reads back held copies not in `recorded` (the digests the caller
/// has recorded verified on this host). Per-layer failures are in the report; `Err` only when
/// nothing could be done (bad settings or chain, a missing local layer, the store unreachable).
pub fn replicate(
    hv: &dyn Hypervisor,
    store: &HostStore,
    chain: &[ChainLayer],
    recorded: &BTreeSet<String>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Replicated> {
    store.validate()?;
    check_chain(chain.iter().map(|l| l.digest.as_str()))?;
    let wanted = chain
        .iter()
        .map(|l| {
            let length = std::fs::metadata(&l.path).map_err(|e| local_error(l, e))?.len();
            Ok(Wanted { digest: l.digest.clone(), length })
        })
        .collect::<Result<Vec<_>>>()?;
    hv.ensure_storage_pool(&store.storage_pool, &store.path)?;
    let held = hv.storage_volumes(&store.storage_pool)?;
    let actions = plan(&wanted, &held, recorded);
    let mut r = Replicator { hv, pool: &store.storage_pool, progress };
    let layers = chain.iter().zip(&wanted).zip(actions).map(|((l, w), action)| r.layer(l, w.length, action)).collect();
    let report = Replicated { host: hv.uri().into(), storage_pool: store.storage_pool.clone(), layers };
    tracing::info!(host = %report.host, pool = %report.storage_pool, layers = report.layers.len(),
        verified = report.verified().len(), bytes_sent = report.bytes_sent(), "replicated");
    Ok(report)
}

/// Reads back every copy of `digests` the host's layer store holds and checks its SHA-256;
/// a copy that reads back wrong is quarantined (deleted) at once, so nothing uses it. The
/// store must exist ([`replicate`] makes it).
pub fn verify_host(
    hv: &dyn Hypervisor,
    store: &HostStore,
    digests: &[String],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Verification> {
    store.validate()?;
    check_chain(digests.iter().map(String::as_str))?;
    let pool = &store.storage_pool;
    let held = hv.storage_volumes(pool)?;
    let mut layers = Vec::with_capacity(digests.len());
    for digest in digests {
        let name = home::layer_file_name(digest);
        let state = match held.iter().find(|v| v.name == name) {
            None => CopyState::Missing,
            Some(v) => match read_back(hv, pool, digest, v.physical, progress) {
                Ok((sha256, _)) if sha256 == *digest => CopyState::Verified,
                Ok((sha256, _)) => {
                    let copy = BadCopy::Digest { sha256 };
                    tracing::warn!(host = %hv.uri(), %pool, %digest, %copy, "corrupt layer copy found, deleting it");
                    let quarantined = hv.delete_volume(pool, &name).is_ok();
                    CopyState::Corrupt { copy, quarantined }
                }
                Err(e) => CopyState::Unreadable { error: crate::error::message(&e), kind: e.kind() },
            },
        };
        layers.push(HostCopy { digest: digest.clone(), state });
    }
    Ok(Verification { host: hv.uri().into(), storage_pool: pool.clone(), layers })
}

fn check_chain<'a>(digests: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = BTreeSet::new();
    for d in digests {
        if !digest::is_digest(d) {
            return Err(ReplicaError::Chain {
                reason: format!("{d:?} is not a layer digest (64 lowercase hex digits)"),
            });
        }
        if !seen.insert(d) {
            return Err(ReplicaError::Chain { reason: format!("layer {d} appears twice") });
        }
    }
    Ok(())
}

fn local_error(layer: &ChainLayer, source: std::io::Error) -> ReplicaError {
    ReplicaError::LocalLayer { digest: layer.digest.clone(), path: layer.path.clone(), source }
}

/// Reads a copy back: its SHA-256 and the seconds it took.
fn read_back(
    hv: &dyn Hypervisor,
    pool: &str,
    digest: &str,
    length: u64,
    progress: &mut dyn FnMut(Progress<'_>),
) -> std::result::Result<(String, f64), HypervisorError> {
    let t = Instant::now();
    let name = home::layer_file_name(digest);
    let back = hv.volume_sha256(pool, &name, &mut |done| {
        progress(Progress { layer: digest, step: Step::ReadBack, done, total: length })
    })?;
    Ok((back.sha256, t.elapsed().as_secs_f64()))
}

fn failed<E: Kind + std::error::Error + 'static>(e: &E, quarantined: Vec<BadCopy>) -> Outcome {
    Outcome::Failed { error: crate::error::message(e), kind: e.kind(), quarantined }
}

struct Replicator<'a> {
    hv: &'a dyn Hypervisor,
    pool: &'a str,
    progress: &'a mut dyn FnMut(Progress<'_>),
}

impl Replicator<'_> {
    fn layer(&mut self, layer: &ChainLayer, length: u64, action: Action) -> LayerReport {
        let mut quarantined = Vec::new();
        let outcome = match action {
            Action::Keep => Outcome::Present { rehashed: false },
            Action::Upload => self.copy(layer, quarantined),
            Action::Replace { held_length } => {
                match self.quarantine(layer, BadCopy::Length { length: held_length, wanted: length }, &mut quarantined)
                {
                    Ok(()) => self.copy(layer, quarantined),
                    Err(e) => failed(&e, quarantined),
                }
            }
            Action::Check => match read_back(self.hv, self.pool, &layer.digest, length, self.progress) {
                Ok((sha256, _)) if sha256 == layer.digest => Outcome::Present { rehashed: true },
                Ok((sha256, _)) => match self.quarantine(layer, BadCopy::Digest { sha256 }, &mut quarantined) {
                    Ok(()) => self.copy(layer, quarantined),
                    Err(e) => failed(&e, quarantined),
                },
                Err(e) => failed(&e, quarantined),
            },
        };
        LayerReport { digest: layer.digest.clone(), outcome }
    }

    fn quarantine(
        &self,
        layer: &ChainLayer,
        bad: BadCopy,
        quarantined: &mut Vec<BadCopy>,
    ) -> std::result::Result<(), HypervisorError> {
        tracing::warn!(host = %self.hv.uri(), pool = %self.pool, layer = %layer.digest, copy = %bad,
            "bad layer copy on the host, deleting it");
        self.hv.delete_volume(self.pool, &home::layer_file_name(&layer.digest))?;
        quarantined.push(bad);
        Ok(())
    }

    /// Uploads, reads back; once more after a copy that reads back wrong.
    fn copy(&mut self, layer: &ChainLayer, mut quarantined: Vec<BadCopy>) -> Outcome {
        let (hv, pool, digest) = (self.hv, self.pool, layer.digest.as_str());
        let name = home::layer_file_name(digest);
        let total = match sparse::data_bytes(&layer.path) {
            Ok(n) => n,
            Err(e) => return failed(&local_error(layer, e), quarantined),
        };
        let (mut bytes_sent, mut upload_seconds, mut read_back_seconds) = (0u64, 0f64, 0f64);
        let mut found = String::new();
        for attempt in 1..=ATTEMPTS {
            let t = Instant::now();
            let progress = &mut *self.progress;
            let up = match hv.upload_volume(pool, &name, &layer.path, &mut |done| {
                progress(Progress { layer: digest, step: Step::Upload, done, total })
            }) {
                Ok(up) => up,
                Err(e) => return failed(&e, quarantined),
            };
            upload_seconds += t.elapsed().as_secs_f64();
            bytes_sent += up.bytes_sent;
            let (sha256, secs) = match read_back(hv, pool, digest, up.length, self.progress) {
                Ok(r) => r,
                // Unverified, so it does not count; the next replicate reads it back again.
                Err(e) => return failed(&e, quarantined),
            };
            read_back_seconds += secs;
            if sha256 == digest {
                tracing::info!(host = %hv.uri(), %pool, layer = %digest, bytes_sent, attempt, "layer copied and verified");
                return Outcome::Copied {
                    bytes_sent,
                    length: up.length,
                    upload_seconds,
                    read_back_seconds,
                    attempts: attempt,
                    quarantined,
                };
            }
            // Wrong on the host. Only now is the local file hashed (a copy that reads back
            // right needs no local hash): if it is what is damaged, no upload can help.
            match digest::sha256_file(&layer.path, |_| {}) {
                Ok(local) if local != digest => {
                    let _ = self.quarantine(layer, BadCopy::Digest { sha256 }, &mut quarantined);
                    let e = ReplicaError::LocalCorrupt {
                        uri: hv.uri().into(),
                        digest: digest.into(),
                        path: layer.path.clone(),
                        found: local,
                    };
                    return failed(&e, quarantined);
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = hv.delete_volume(pool, &name);
                    return failed(&local_error(layer, e), quarantined);
                }
            }
            found = sha256.clone();
            if let Err(e) = self.quarantine(layer, BadCopy::Digest { sha256 }, &mut quarantined) {
                return failed(&e, quarantined);
            }
        }
        let e = ReplicaError::CopyCorrupt {
            uri: hv.uri().into(),
            pool: pool.into(),
            digest: digest.into(),
            found,
            attempts: ATTEMPTS,
        };
        failed(&e, quarantined)
    }
}

#[cfg(test)]
mod tests;
