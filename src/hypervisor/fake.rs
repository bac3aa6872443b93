//! A recording, in-memory [`Hypervisor`]: pool, rollout and dev logic tested without root or
//! libvirtd (`cargo test --lib`), next to the real-libvirt tests that stay.
//!
//! It keeps domain definitions and states, records every call in order, delivers lifecycle
//! events to subscribers the way libvirt does (started, stopped, crashed, rebooted), and lets
//! a test decide how a guest behaves when it boots ([`Boot`], chosen by the layer its disk is
//! backed by, as the real test guest's disk marker does), inject events, and fail chosen calls.
//! Its storage pools keep volumes in memory; a test can flip a byte of a stored volume or of
//! the next upload, or leave a volume as a crashed upload would.
//!
//! Compiled for unit tests and under the `fake` feature only: the shipped binary has no fake
//! hypervisor in it, and nothing can select one by accident.

use super::sparse::{self, Extent};
use super::xml::{cdrom, element_text, find_elements};
use super::{
    DomainState, GraphicsEndpoint, GraphicsKind, Hypervisor, HypervisorError, LifecycleEvent, LifecycleKind,
    StorageRef, Subscription, Upload, Volume, VolumeDigest,
};
use crate::digest::Running;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// A trait method, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Define,
    Start,
    Shutdown,
    Destroy,
    Undefine,
    State,
    Exists,
    List,
    Xml,
    SetGraphicsPassword,
    Graphics,
    AgentPing,
    Subscribe,
    SpiceTls,
    EjectMedia,
    EnsureStoragePool,
    StorageVolumes,
    UploadVolume,
    VolumeSha256,
    DeleteVolume,
}

impl Op {
    /// Calls that change a domain or a volume (the others only read).
    pub fn changes(self) -> bool {
        matches!(
            self,
            Op::Define
                | Op::Start
                | Op::Shutdown
                | Op::Destroy
                | Op::Undefine
                | Op::EjectMedia
                | Op::EnsureStoragePool
                | Op::UploadVolume
                | Op::DeleteVolume
        )
    }
}

/// One recorded call: the domain (the prefix for `List` and `Subscribe`, the storage pool for
/// `EnsureStoragePool` and `StorageVolumes`, the volume for the other volume calls) and, for
/// `Start`, the backing file of the domain's disk at that moment (what the guest boots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub domain: String,
    pub disk_backing: Option<String>,
    /// Calls in flight when this one began, itself included (1: nothing overlapped it yet).
    pub in_flight: usize,
}

/// How a guest behaves once started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Runs, and its guest agent answers where the domain has an agent channel.
    Healthy,
    /// Panics at once: a `Crashed` event (`panicked`), state crashed (as `on_crash=preserve`).
    Panic,
    /// Reboots this many times right after booting.
    Reboots(u32),
    /// Powers itself off: a `Stopped` event (`shutdown`), state shut off.
    PowerOff,
    /// Runs, but its guest agent never answers.
    SilentAgent,
}

#[derive(Debug)]
struct Domain {
    xml: String,
    state: DomainState,
    reason: String,
    agent_answers: bool,
    passwords: BTreeMap<&'static str, String>,
}

/// A storage pool: its directory (named only) and its volumes' bytes.
#[derive(Debug, Default)]
struct StoragePool {
    path: PathBuf,
    volumes: BTreeMap<String, StoredVolume>,
}

#[derive(Debug)]
struct StoredVolume {
    bytes: Vec<u8>,
    /// The data bytes it was uploaded with (holes take no room).
    allocation: u64,
}

#[derive(Default)]
struct Inner {
    domains: BTreeMap<String, Domain>,
    calls: Vec<Call>,
    failures: Vec<(Op, String)>,
    /// (only this domain, if named; layer; behaviour)
    boots: Vec<(Option<String>, String, Boot)>,
    subscribers: Vec<(String, Sender<LifecycleEvent>)>,
    /// How long each call of an op takes (outside the lock, as libvirt's own work would).
    latency: BTreeMap<Op, Duration>,
    storage: BTreeMap<String, StoragePool>,
    /// Volumes whose next upload arrives with a byte flipped at this offset.
    corrupt_uploads: Vec<(String, u64)>,
}

impl Inner {
    fn emit(&mut self, domain: &str, kind: LifecycleKind, detail: &str) {
        let ev = LifecycleEvent { domain: domain.into(), kind, detail: detail.into(), at: SystemTime::now() };
        // A dropped receiver is a dropped subscription: forget it, as libvirt deregisters.
        self.subscribers.retain(|(prefix, tx)| !domain.starts_with(prefix.as_str()) || tx.send(ev.clone()).is_ok());
    }

    fn domain(&mut self, name: &str) -> Result<&mut Domain, HypervisorError> {
        self.domains.get_mut(name).ok_or_else(|| HypervisorError::NotFound { domain: name.into() })
    }
}

/// The fake; see the module documentation.
pub struct FakeHypervisor {
    inner: Mutex<Inner>,
    parallel: usize,
    /// Calls in flight, kept within `parallel` as libvirt's connections keep them.
    lanes: Mutex<usize>,
    lane_freed: std::sync::Condvar,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

impl Default for FakeHypervisor {
    fn default() -> FakeHypervisor {
        FakeHypervisor::with_parallel(4)
    }
}

impl FakeHypervisor {
    pub fn new() -> FakeHypervisor {
        FakeHypervisor::default()
    }

    /// A fake host serving `parallel` calls at once.
    pub fn with_parallel(parallel: usize) -> FakeHypervisor {
        FakeHypervisor {
            inner: Mutex::default(),
            parallel,
            lanes: Mutex::new(0),
            lane_freed: std::sync::Condvar::new(),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Every call of `op` takes `d` from now on, spent outside the fake's lock, so calls from
    /// several threads overlap as they do on libvirtd (QEMU's exit after a destroy takes seconds).
    pub fn set_latency(&self, op: Op, d: Duration) {
        self.lock().latency.insert(op, d);
    }

    /// The most calls that were in flight at once since the start or [`Self::reset_peak`].
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Start counting [`Self::peak_in_flight`] afresh (before the step a test looks at).
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a call, then fail it when the test asked for that.
    fn call(&self, op: Op, domain: &str) -> Result<MutexGuard<'_, Inner>, HypervisorError> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        while *lanes >= self.parallel {
            lanes = self.lane_freed.wait(lanes).unwrap_or_else(|e| e.into_inner());
        }
        *lanes += 1;
        drop(lanes);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let latency = self.lock().latency.get(&op).copied();
        if let Some(d) = latency {
            std::thread::sleep(d);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        *self.lanes.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.lane_freed.notify_one();
        let mut inner = self.lock();
        let disk_backing =
            (op == Op::Start).then(|| inner.domains.get(domain).and_then(|d| disk_backing(&d.xml))).flatten();
        inner.calls.push(Call { op, domain: domain.into(), disk_backing, in_flight: now });
        if let Some(i) = inner.failures.iter().position(|(o, d)| *o == op && d == domain) {
            inner.failures.remove(i);
            return Err(HypervisorError::Libvirt {
                op: "do (injected failure)",
                domain: domain.into(),
                message: format!("the test made {op:?} fail"),
            });
        }
        Ok(inner)
    }

    /// As [`Self::call`] for a call on a volume of a storage pool: an injected failure names
    /// the host, the storage pool and the volume, as libvirt's do.
    fn volume_call(&self, op: Op, pool: &str, volume: &str) -> Result<MutexGuard<'_, Inner>, HypervisorError> {
        self.call(op, volume).map_err(|e| HypervisorError::Storage {
            at: StorageRef::volume(FAKE_URI, pool, volume),
            op: "do (injected failure)",
            message: match e {
                HypervisorError::Libvirt { message, .. } => message,
                other => other.to_string(),
            },
        })
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The calls so far, and forget them (to look at one step of a test).
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.lock().calls)
    }

    /// The next `op` on `domain` fails with a libvirt error (once).
    pub fn fail_next(&self, op: Op, domain: &str) {
        self.lock().failures.push((op, domain.into()));
    }

    /// Guests whose disk is backed by a file whose name contains `backing_contains` (a
    /// layer's digest: the version they boot) behave as `boot` when started.
    pub fn on_boot(&self, backing_contains: &str, boot: Boot) {
        self.lock().boots.push((None, backing_contains.into(), boot));
    }

    /// As [`FakeHypervisor::on_boot`], for the one domain `domain` only; it wins over a
    /// rule for every domain.
    pub fn on_boot_of(&self, domain: &str, backing_contains: &str, boot: Boot) {
        self.lock().boots.push((Some(domain.into()), backing_contains.into(), boot));
    }

    /// Deliver an event to subscribers as libvirt would, with the state change it implies.
    pub fn inject(&self, domain: &str, kind: LifecycleKind, detail: &str) {
        let mut inner = self.lock();
        if let Some(d) = inner.domains.get_mut(domain) {
            match kind {
                LifecycleKind::Crashed => (d.state, d.reason) = (DomainState::Crashed, detail.into()),
                LifecycleKind::Stopped | LifecycleKind::Shutdown => {
                    (d.state, d.reason) = (DomainState::ShutOff, detail.into())
                }
                LifecycleKind::Started | LifecycleKind::Rebooted => {
                    (d.state, d.reason) = (DomainState::Running, "booted".into())
                }
                _ => {}
            }
        }
        inner.emit(domain, kind, detail);
    }

    /// The console password last set on a domain's display.
    pub fn password(&self, domain: &str, kind: GraphicsKind) -> Option<String> {
        self.lock().domains.get(domain).and_then(|d| d.passwords.get(kind.as_str()).cloned())
    }

    /// The bytes of a stored volume.
    pub fn volume_bytes(&self, pool: &str, volume: &str) -> Option<Vec<u8>> {
        self.lock().storage.get(pool).and_then(|p| p.volumes.get(volume)).map(|v| v.bytes.clone())
    }

    /// Flips the byte at `offset` of a stored volume, as a failing disk would.
    pub fn corrupt_volume(&self, pool: &str, volume: &str, offset: usize) {
        let mut inner = self.lock();
        let v = inner.storage.get_mut(pool).and_then(|p| p.volumes.get_mut(volume)).expect("a stored volume");
        v.bytes[offset] ^= 0xff;
    }

    /// The next upload of `volume` arrives with the byte at `offset` flipped, as a bad
    /// network or disk would deliver it (once per call).
    pub fn corrupt_next_upload(&self, volume: &str, offset: u64) {
        self.lock().corrupt_uploads.push((volume.into(), offset));
    }

    /// Puts a volume into a storage pool as something other than vdim left it (a crashed
    /// upload, another tool).
    pub fn put_volume(&self, pool: &str, volume: &str, bytes: Vec<u8>) {
        let mut inner = self.lock();
        let p = inner.storage.get_mut(pool).expect("an ensured storage pool");
        let allocation = bytes.len() as u64;
        p.volumes.insert(volume.into(), StoredVolume { bytes, allocation });
    }

    fn storage_pool<'a>(
        inner: &'a mut Inner,
        pool: &str,
        op: &'static str,
    ) -> Result<&'a mut StoragePool, HypervisorError> {
        inner.storage.get_mut(pool).ok_or_else(|| HypervisorError::Storage {
            at: StorageRef::pool(FAKE_URI, pool),
            op,
            message: format!("Storage pool not found: no storage pool with matching name '{pool}'"),
        })
    }

    fn running(inner: &mut Inner, name: &str, op: &'static str) -> Result<(), HypervisorError> {
        match inner.domain(name)?.state {
            DomainState::Running => Ok(()),
            _ => Err(HypervisorError::Libvirt { op, domain: name.into(), message: "domain is not running".into() }),
        }
    }
}

const FAKE_URI: &str = "fake:///";

/// The local file's bytes (holes read as zeros) and the data bytes a sparse upload sends.
fn read_sparse(path: &Path) -> std::io::Result<(Vec<u8>, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut bytes = vec![0u8; len as usize];
    let mut data = 0;
    for e in sparse::extents(&file, 0, len)? {
        if let Extent::Data { offset, len } = e {
            file.read_exact_at(&mut bytes[offset as usize..(offset + len) as usize], offset)?;
            data += len;
        }
    }
    Ok((bytes, data))
}

/// The backing file named by the header of a domain's first qcow2 disk.
pub fn disk_backing(xml: &str) -> Option<String> {
    find_elements(xml, "source")
        .into_iter()
        .filter_map(|s| s.attr("file").map(str::to_string))
        .find(|f| f.ends_with(".qcow2"))
        .and_then(|f| crate::qcow2::read_header(Path::new(&f)).ok())
        .and_then(|h| h.backing_file)
}

impl Hypervisor for FakeHypervisor {
    fn uri(&self) -> &str {
        FAKE_URI
    }

    fn parallel(&self) -> usize {
        self.parallel
    }

    /// The fake host has no SPICE TLS: pools off loopback need `--insecure-display`, as on a
    /// default libvirt.
    fn spice_tls(&self) -> Result<bool, HypervisorError> {
        drop(self.call(Op::SpiceTls, "")?);
        Ok(false)
    }

    fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        let name = element_text(xml, "name").unwrap_or_default();
        let mut inner = self.call(Op::Define, &name)?;
        let detail = match inner.domains.get_mut(&name) {
            Some(d) => {
                d.xml = xml.into();
                "updated"
            }
            None => {
                let d = Domain {
                    xml: xml.into(),
                    state: DomainState::ShutOff,
                    reason: "unknown".into(),
                    agent_answers: true,
                    passwords: BTreeMap::new(),
                };
                inner.domains.insert(name.clone(), d);
                "added"
            }
        };
        inner.emit(&name, LifecycleKind::Defined, detail);
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::Start, name)?;
        let d = inner.domain(name)?;
        if !matches!(d.state, DomainState::ShutOff | DomainState::Crashed) {
            return Err(HypervisorError::Libvirt {
                op: "start",
                domain: name.into(),
                message: "domain is already running".into(),
            });
        }
        (d.state, d.reason) = (DomainState::Running, "booted".into());
        let backing = disk_backing(&d.xml).unwrap_or_default();
        let boot = inner
            .boots
            .iter()
            .filter(|(only, needle, _)| only.as_deref().is_none_or(|o| o == name) && backing.contains(needle.as_str()))
            .min_by_key(|(only, _, _)| only.is_none())
            .map(|(_, _, b)| b.clone());
        let boot = boot.unwrap_or(Boot::Healthy);
        inner.domain(name)?.agent_answers = boot != Boot::SilentAgent;
        inner.emit(name, LifecycleKind::Started, "booted");
        let d = inner.domain(name)?;
        match boot {
            Boot::Healthy | Boot::SilentAgent => {}
            Boot::Panic => {
                (d.state, d.reason) = (DomainState::Crashed, "panicked".into());
                inner.emit(name, LifecycleKind::Crashed, "panicked");
            }
            Boot::Reboots(n) => (0..n).for_each(|_| inner.emit(name, LifecycleKind::Rebooted, "")),
            Boot::PowerOff => {
                (d.state, d.reason) = (DomainState::ShutOff, "shutdown".into());
                inner.emit(name, LifecycleKind::Stopped, "shutdown");
            }
        }
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::Shutdown, name)?;
        Self::running(&mut inner, name, "shut down")?;
        let d = inner.domain(name)?;
        (d.state, d.reason) = (DomainState::ShutOff, "shutdown".into());
        inner.emit(name, LifecycleKind::Stopped, "shutdown");
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::Destroy, name)?;
        let d = inner.domain(name)?;
        if d.state != DomainState::ShutOff {
            (d.state, d.reason) = (DomainState::ShutOff, "destroyed".into());
            inner.emit(name, LifecycleKind::Stopped, "destroyed");
        }
        Ok(())
    }

    /// Unlike libvirt, a running domain goes too (no transient domain is kept).
    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::Undefine, name)?;
        inner.domain(name)?;
        inner.domains.remove(name);
        inner.emit(name, LifecycleKind::Undefined, "removed");
        Ok(())
    }

    fn state(&self, name: &str) -> Result<(DomainState, String), HypervisorError> {
        let mut inner = self.call(Op::State, name)?;
        let d = inner.domain(name)?;
        Ok((d.state, d.reason.clone()))
    }

    fn exists(&self, name: &str) -> Result<bool, HypervisorError> {
        Ok(self.call(Op::Exists, name)?.domains.contains_key(name))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, HypervisorError> {
        let inner = self.call(Op::List, prefix)?;
        Ok(inner.domains.keys().filter(|n| n.starts_with(prefix)).cloned().collect())
    }

    fn xml(&self, name: &str) -> Result<String, HypervisorError> {
        Ok(self.call(Op::Xml, name)?.domain(name)?.xml.clone())
    }

    fn set_graphics_password(
        &self,
        name: &str,
        kind: GraphicsKind,
        password: &str,
        _valid_to: SystemTime,
    ) -> Result<GraphicsEndpoint, HypervisorError> {
        let mut inner = self.call(Op::SetGraphicsPassword, name)?;
        Self::running(&mut inner, name, "set the console password of")?;
        inner.domain(name)?.passwords.insert(kind.as_str(), password.into());
        drop(inner);
        self.graphics(name, kind)
    }

    fn graphics(&self, name: &str, kind: GraphicsKind) -> Result<GraphicsEndpoint, HypervisorError> {
        let mut inner = self.call(Op::Graphics, name)?;
        let index = inner.domains.keys().position(|n| n == name);
        let d = inner.domain(name)?;
        if !find_elements(&d.xml, "graphics").iter().any(|g| g.attr("type") == Some(kind.as_str())) {
            return Err(HypervisorError::NoGraphics { domain: name.into(), kind });
        }
        if d.state != DomainState::Running {
            let reason = "the domain is not running".into();
            return Err(HypervisorError::NoConsolePort { domain: name.into(), kind, reason });
        }
        Ok(GraphicsEndpoint {
            listen: "127.0.0.1".into(),
            port: Some(5900 + index.unwrap_or(0) as u16),
            tls_port: None,
        })
    }

    /// The CD-ROM loses its `<source>` (one definition: live and persistent alike).
    fn eject_media(&self, name: &str, target_dev: &str) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::EjectMedia, name)?;
        let d = inner.domain(name)?;
        let no_cdrom = || HypervisorError::Libvirt {
            op: "eject the CD-ROM media of",
            domain: name.into(),
            message: format!("it has no CD-ROM {target_dev}"),
        };
        cdrom(&d.xml, target_dev).ok_or_else(no_cdrom)?;
        let target = d.xml.find(&format!("<target dev='{target_dev}'")).ok_or_else(no_cdrom)?;
        let start = d.xml[..target].rfind("<disk ").ok_or_else(no_cdrom)?;
        let end = target + d.xml[target..].find("</disk>").ok_or_else(no_cdrom)?;
        if let Some(at) = d.xml[start..end].find("<source ").map(|i| start + i) {
            let len = d.xml[at..].find("/>").map_or(0, |i| i + 2);
            d.xml.replace_range(at..at + len, "");
        }
        Ok(())
    }

    fn agent_ping(&self, name: &str, _timeout: i32) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::AgentPing, name)?;
        Self::running(&mut inner, name, "ping the guest agent of")?;
        let d = inner.domain(name)?;
        if d.xml.contains("org.qemu.guest_agent.0") && d.agent_answers {
            return Ok(());
        }
        Err(HypervisorError::Libvirt {
            op: "ping the guest agent of",
            domain: name.into(),
            message: "QEMU guest agent is not connected".into(),
        })
    }

    fn subscribe(&self, prefix: &str) -> Result<Subscription, HypervisorError> {
        let mut inner = self.call(Op::Subscribe, prefix)?;
        let (tx, events) = mpsc::channel();
        inner.subscribers.push((prefix.into(), tx));
        Ok(Subscription { events, prefix: prefix.into(), _registration: None, _forwarders: None })
    }

    fn ensure_storage_pool(&self, pool: &str, path: &Path) -> Result<(), HypervisorError> {
        let mut inner = self.call(Op::EnsureStoragePool, pool)?;
        let p =
            inner.storage.entry(pool.into()).or_insert_with(|| StoragePool { path: path.into(), ..Default::default() });
        if p.path != path {
            return Err(HypervisorError::StoragePoolElsewhere {
                at: StorageRef::pool(FAKE_URI, pool),
                found: format!("a dir pool at {}", p.path.display()),
                wanted: path.into(),
            });
        }
        Ok(())
    }

    fn storage_volumes(&self, pool: &str) -> Result<Vec<Volume>, HypervisorError> {
        let mut inner = self.call(Op::StorageVolumes, pool)?;
        let p = Self::storage_pool(&mut inner, pool, "find")?;
        Ok(p.volumes
            .iter()
            .map(|(name, v)| Volume {
                name: name.clone(),
                capacity: v.bytes.len() as u64,
                allocation: v.allocation,
                physical: v.bytes.len() as u64,
            })
            .collect())
    }

    fn upload_volume(
        &self,
        pool: &str,
        volume: &str,
        source: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Upload, HypervisorError> {
        let mut inner = self.volume_call(Op::UploadVolume, pool, volume)?;
        let p = Self::storage_pool(&mut inner, pool, "find")?;
        if p.volumes.contains_key(volume) {
            return Err(HypervisorError::VolumeExists { at: StorageRef::volume(FAKE_URI, pool, volume) });
        }
        let (mut bytes, data) = read_sparse(source).map_err(|source_error| HypervisorError::LocalFile {
            at: StorageRef::volume(FAKE_URI, pool, volume),
            path: source.into(),
            source: source_error,
        })?;
        progress(data);
        if let Some(i) = inner.corrupt_uploads.iter().position(|(v, _)| v == volume) {
            let (_, at) = inner.corrupt_uploads.remove(i);
            bytes[at as usize] ^= 0xff;
        }
        let length = bytes.len() as u64;
        let p = Self::storage_pool(&mut inner, pool, "find")?;
        p.volumes.insert(volume.into(), StoredVolume { bytes, allocation: data });
        Ok(Upload { bytes_sent: data, length })
    }

    fn upload_disk(&self, pool: &str, volume: &str, source: &Path) -> Result<Upload, HypervisorError> {
        self.upload_volume(pool, volume, source, &mut |_| {})
    }

    fn volume_sha256(
        &self,
        pool: &str,
        volume: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeDigest, HypervisorError> {
        let mut inner = self.volume_call(Op::VolumeSha256, pool, volume)?;
        let p = Self::storage_pool(&mut inner, pool, "find")?;
        let v = p.volumes.get(volume).ok_or_else(|| HypervisorError::Storage {
            at: StorageRef::volume(FAKE_URI, pool, volume),
            op: "find",
            message: format!("Storage volume not found: no storage vol with matching name '{volume}'"),
        })?;
        let mut hash = Running::new();
        hash.data(&v.bytes);
        progress(hash.bytes());
        Ok(VolumeDigest { length: hash.bytes(), sha256: hash.finish(), bytes_received: v.allocation })
    }

    fn delete_volume(&self, pool: &str, volume: &str) -> Result<(), HypervisorError> {
        let mut inner = self.volume_call(Op::DeleteVolume, pool, volume)?;
        Self::storage_pool(&mut inner, pool, "find")?.volumes.remove(volume);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn xml(name: &str) -> String {
        format!("<domain type='qemu'><name>{name}</name><devices><graphics type='vnc'/></devices></domain>")
    }

    fn kinds(sub: &Subscription) -> Vec<(String, LifecycleKind, String)> {
        let mut out = vec![];
        while let Ok(ev) = sub.events.recv_timeout(Duration::from_millis(10)) {
            out.push((ev.domain, ev.kind, ev.detail));
        }
        out
    }

    #[test]
    fn every_call_is_recorded_in_order_with_its_domain() {
        let hv = FakeHypervisor::new();
        hv.define(&xml("vdim-a-001")).expect("define");
        hv.start("vdim-a-001").expect("start");
        assert!(matches!(hv.start("vdim-a-001"), Err(HypervisorError::Libvirt { .. })), "already running");
        hv.destroy("vdim-a-001").expect("destroy");
        assert!(matches!(hv.state("ghost"), Err(HypervisorError::NotFound { .. })));
        let calls: Vec<(Op, String)> = hv.calls().into_iter().map(|c| (c.op, c.domain)).collect();
        let want = [(Op::Define, "vdim-a-001"), (Op::Start, "vdim-a-001"), (Op::Start, "vdim-a-001")];
        let want: Vec<(Op, String)> = want
            .into_iter()
            .chain([(Op::Destroy, "vdim-a-001"), (Op::State, "ghost")])
            .map(|(o, d)| (o, d.to_string()))
            .collect();
        assert_eq!(calls, want);
        assert_eq!(hv.state("vdim-a-001").expect("state"), (DomainState::ShutOff, "destroyed".into()));
    }

    #[test]
    fn subscribers_get_the_events_of_their_prefix_and_injected_ones() {
        let hv = FakeHypervisor::new();
        let sub = hv.subscribe("vdim-a-").expect("subscribe");
        for n in ["vdim-a-001", "vdim-b-001"] {
            hv.define(&xml(n)).expect("define");
            hv.start(n).expect("start");
        }
        hv.inject("vdim-a-001", LifecycleKind::Crashed, "panicked");
        let got = kinds(&sub);
        let want = [
            (LifecycleKind::Defined, "added"),
            (LifecycleKind::Started, "booted"),
            (LifecycleKind::Crashed, "panicked"),
        ]
        .map(|(k, d)| ("vdim-a-001".to_string(), k, d.to_string()));
        assert_eq!(got, want);
        assert_eq!(hv.state("vdim-a-001").expect("state"), (DomainState::Crashed, "panicked".into()));
        drop(sub);
        hv.inject("vdim-a-001", LifecycleKind::Rebooted, "");
        assert!(hv.lock().subscribers.is_empty(), "a dropped subscription is forgotten");
    }

    #[test]
    fn volumes_are_kept_in_memory_and_a_flipped_byte_changes_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("layer");
        let f = File::create(&src).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"QFI\xfb", 0).unwrap();
        let hv = FakeHypervisor::new();
        let pools = dir.path().join("pool");
        assert!(matches!(hv.storage_volumes("layers"), Err(HypervisorError::Storage { .. })));
        hv.ensure_storage_pool("layers", &pools).expect("ensure");
        hv.ensure_storage_pool("layers", &pools).expect("ensure again");
        let e = hv.ensure_storage_pool("layers", Path::new("/elsewhere")).expect_err("another path");
        assert!(e.to_string().contains("/elsewhere") && e.to_string().contains("layers"), "{e}");

        let up = hv.upload_volume("layers", "a.qcow2", &src, &mut |_| {}).expect("upload");
        assert_eq!(up.length, 1 << 20);
        assert!(up.bytes_sent < 1 << 20, "sparse: only the data travels ({})", up.bytes_sent);
        let e = hv.upload_volume("layers", "a.qcow2", &src, &mut |_| {}).expect_err("exists");
        assert!(matches!(e, HypervisorError::VolumeExists { .. }), "{e}");
        let good = hv.volume_sha256("layers", "a.qcow2", &mut |_| {}).expect("read back");
        assert_eq!(good.sha256, crate::digest::sha256_file(&src, |_| {}).unwrap());
        hv.corrupt_volume("layers", "a.qcow2", 12345);
        assert_ne!(hv.volume_sha256("layers", "a.qcow2", &mut |_| {}).expect("read back").sha256, good.sha256);
        let vols = hv.storage_volumes("layers").expect("list");
        assert_eq!((vols.len(), vols[0].physical), (1, 1 << 20));
        hv.delete_volume("layers", "a.qcow2").expect("delete");
        hv.delete_volume("layers", "a.qcow2").expect("deleting a missing volume is Ok");
        let e = hv.volume_sha256("layers", "a.qcow2", &mut |_| {}).expect_err("gone");
        let msg = e.to_string();
        assert!(msg.contains("fake:///") && msg.contains("layers") && msg.contains("a.qcow2"), "{msg}");
        let ops: Vec<Op> = hv.calls().into_iter().map(|c| c.op).collect();
        assert!(ops.contains(&Op::UploadVolume) && ops.contains(&Op::DeleteVolume));
    }

    #[test]
    fn a_chosen_call_fails_once_and_changes_nothing() {
        let hv = FakeHypervisor::new();
        hv.define(&xml("vdim-a-001")).expect("define");
        hv.fail_next(Op::Start, "vdim-a-001");
        let e = hv.start("vdim-a-001").expect_err("injected");
        assert!(e.to_string().contains("vdim-a-001"), "{e}");
        assert_eq!(hv.state("vdim-a-001").expect("state").0, DomainState::ShutOff);
        hv.start("vdim-a-001").expect("only the next call fails");
        assert_eq!(hv.state("vdim-a-001").expect("state").0, DomainState::Running);
    }
}
