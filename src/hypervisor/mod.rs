//! The one narrow seam between vdim and libvirt.
//!
//! Pools, rollouts and the broker speak to the [`Hypervisor`] trait only; [`Libvirt`] implements
//! it with the `virt` crate, so no code above this module builds a `virsh` command line or
//! touches a libvirt pointer. The libvirt XML vdim writes is built here too: `domain_xml`
//! from a hardware profile, with the one escaper of `xml`.
//!
//! ```text
//! hypervisor/
//!   mod.rs         the trait, its types, VNC_PASSWORD_MAX
//!   connections.rs many hosts: one hypervisor per URI, made on first use; probes
//!   libvirt.rs     Libvirt: the `virt` implementation and lifecycle events
//!   storage.rs     its storage half: a host's layer store (storage pool, volumes, sparse streams)
//!   sparse.rs      a local file's data and holes (SEEK_DATA / SEEK_HOLE)
//!   domain_xml.rs  a desktop's domain XML from its profile
//!   xml.rs         the one escaper; the little reading of libvirt's XML
//!   fake.rs        a recording in-memory implementation for tests
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::SystemTime;

mod connections;
pub mod domain_xml;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod libvirt;
pub(crate) mod sparse;
mod storage;
pub(crate) mod xml;

pub use connections::{ConnectFn, Connections};
pub use libvirt::Libvirt;

/// VNC authentication (DES) keys on the first 8 bytes of a password, and libvirt refuses
/// longer VNC passwords: every VNC password vdim makes or sets is at most this long.
pub const VNC_PASSWORD_MAX: usize = 8;

/// Keepalive for long-lived connections: a ping every 5 s, dead after 3 unanswered ones.
const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// Calls in flight to one libvirt host unless set otherwise (`--parallel`, `VDIM_PARALLEL`).
/// libvirtd serves 20 calls at once by default (`max_workers`) and 5 per connection
/// (`max_client_requests`): vdim opens up to this many connections, leaving workers for the
/// broker and other clients.
pub const DEFAULT_PARALLEL: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    Crashed,
    /// Shutting down.
    Shutdown,
    PmSuspended,
    Blocked,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum LifecycleKind {
    Started,
    Stopped,
    /// The guest panicked, or its QEMU process died (stopped with detail `crashed`).
    Crashed,
    Rebooted,
    Shutdown,
    Suspended,
    Resumed,
    Defined,
    Undefined,
    Other(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LifecycleEvent {
    pub domain: String,
    pub kind: LifecycleKind,
    /// libvirt's detail, e.g. `booted`, `destroyed`, `panicked`.
    pub detail: String,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphicsKind {
    Spice,
    Vnc,
}

impl GraphicsKind {
    /// The `type` attribute of `<graphics>`.
    pub fn as_str(self) -> &'static str {
        match self {
            GraphicsKind::Spice => "spice",
            GraphicsKind::Vnc => "vnc",
        }
    }
}

impl fmt::Display for GraphicsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a thin client connects to a running domain's console.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GraphicsEndpoint {
    pub listen: String,
    /// The plaintext port; none for a TLS-only SPICE display.
    pub port: Option<u16>,
    pub tls_port: Option<u16>,
}

/// A storage volume as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Volume {
    pub name: String,
    /// libvirt's capacity: for a qcow2 volume the disk size it offers a guest, not the file's.
    pub capacity: u64,
    /// Bytes the file takes on the host's disk (holes take none).
    pub allocation: u64,
    /// The file's length.
    pub physical: u64,
}

/// What an upload sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Data bytes on the wire: holes travel as their length only.
    pub bytes_sent: u64,
    /// The volume's length (the local file's).
    pub length: u64,
}

/// A volume read back from its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDigest {
    /// SHA-256 of the volume's bytes, holes as zeros.
    pub sha256: String,
    pub length: u64,
    /// Data bytes received (the rest came as holes).
    pub bytes_received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("Cannot connect to libvirt at {uri}: {message} (is libvirtd running? scripts/setup-host starts it)")]
    Connect { uri: String, message: String },
    #[error("Domain {domain} is not defined")]
    NotFound { domain: String },
    #[error("Libvirt could not {op} domain {domain}: {message}")]
    Libvirt { op: &'static str, domain: String, message: String },
    #[error("Libvirt at {uri} could not {op}: {message}")]
    Connection { uri: String, op: &'static str, message: String },
    #[error("Domain {domain} has no {kind} graphics device")]
    NoGraphics { domain: String, kind: GraphicsKind },
    #[error("The {kind} console of domain {domain} has no TCP port: {reason}")]
    NoConsolePort { domain: String, kind: GraphicsKind, reason: String },
    #[error("Refusing console password for domain {domain}: {reason}")]
    InvalidPassword { domain: String, reason: String },
    #[error("Cannot subscribe to events of domains starting with {prefix:?} on {uri}: {message}")]
    Subscribe { uri: String, prefix: String, message: String },
    #[error("Libvirt could not {op} {at}: {message}")]
    Storage { at: Box<StorageRef>, op: &'static str, message: String },
    #[error("The {at} is {found}, not a directory pool at {wanted}: give vdim's layer store another storage pool name or path")]
    StoragePoolElsewhere { at: Box<StorageRef>, found: String, wanted: PathBuf },
    #[error("The {at} already exists: delete it before uploading it again")]
    VolumeExists { at: Box<StorageRef> },
    #[error("Cannot read {path} to upload it as {at}: {source}")]
    LocalFile { at: Box<StorageRef>, path: PathBuf, source: std::io::Error },
}

/// Where a storage error happened: the host, its storage pool, the volume if it was one's.
/// (Boxed in [`HypervisorError`], which every module's error carries.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    pub uri: String,
    pub pool: String,
    pub volume: Option<String>,
}

impl StorageRef {
    pub fn pool(uri: &str, pool: &str) -> Box<StorageRef> {
        Box::new(StorageRef { uri: uri.into(), pool: pool.into(), volume: None })
    }

    pub fn volume(uri: &str, pool: &str, volume: &str) -> Box<StorageRef> {
        Box::new(StorageRef { uri: uri.into(), pool: pool.into(), volume: Some(volume.into()) })
    }
}

impl fmt::Display for StorageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.volume {
            Some(v) => write!(f, "volume {v} of storage pool {} at {}", self.pool, self.uri),
            None => write!(f, "storage pool {} at {}", self.pool, self.uri),
        }
    }
}

impl crate::error::Kind for HypervisorError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        // vdim names and defines every domain itself: one that is missing, or has no display,
        // is an inconsistency on the host, not a name the caller got wrong.
        match self {
            HypervisorError::Connect { .. }
            | HypervisorError::NotFound { .. }
            | HypervisorError::Libvirt { .. }
            | HypervisorError::Connection { .. }
            | HypervisorError::NoGraphics { .. }
            | HypervisorError::NoConsolePort { .. }
            | HypervisorError::InvalidPassword { .. }
            | HypervisorError::Subscribe { .. }
            | HypervisorError::Storage { .. }
            | HypervisorError::LocalFile { .. } => K::Internal,
            // Another libvirt user's pool holds the name, or another upload runs: not vdim's to undo.
            HypervisorError::StoragePoolElsewhere { .. } | HypervisorError::VolumeExists { .. } => K::Conflict,
        }
    }
}

/// The one narrow seam between vdim and libvirt.
pub trait Hypervisor: Send + Sync {
    fn uri(&self) -> &str;
    /// How many calls this host serves for vdim at once: the bound of every operation on
    /// many desktops ([`crate::fleet`]).
    fn parallel(&self) -> usize;
    /// Defines a persistent domain (or updates the definition of an existing one).
    fn define(&self, xml: &str) -> Result<(), HypervisorError>;
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to power off through ACPI; returns without waiting.
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Hard stop. `Ok` when the domain is already off; `NotFound` when it is not defined.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Removes the definition with its NVRAM, TPM state, managed save and snapshot metadata.
    /// `NotFound` when not defined: the caller decides whether that is fine. A running domain
    /// keeps running as a transient one: destroy it first.
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// The state and libvirt's reason for it, e.g. `(Crashed, "panicked")`.
    fn state(&self, name: &str) -> Result<(DomainState, String), HypervisorError>;
    fn exists(&self, name: &str) -> Result<bool, HypervisorError>;
    /// All domains (active and inactive) whose name starts with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, HypervisorError>;
    /// The live XML of a running domain, the persistent one otherwise, with secrets
    /// (`VIR_DOMAIN_XML_SECURE`: console passwords are shown).
    fn xml(&self, name: &str) -> Result<String, HypervisorError>;
    /// One-time console ticket: sets `passwd` and `passwdValidTo` (UTC) on the live graphics
    /// device of that kind, and for SPICE `connected='disconnect'` so clients holding the old
    /// ticket are dropped. QEMU only implements `keep` for VNC, so VNC clients already connected
    /// stay connected. VNC passwords are at most [`VNC_PASSWORD_MAX`] characters.
    fn set_graphics_password(
        &self,
        name: &str,
        kind: GraphicsKind,
        password: &str,
        valid_to: SystemTime,
    ) -> Result<GraphicsEndpoint, HypervisorError>;
    /// Empties the CD-ROM at `target_dev` (e.g. `sdb`): no media in the running domain (when
    /// it runs) nor in its persistent definition. The drive itself stays.
    fn eject_media(&self, name: &str, target_dev: &str) -> Result<(), HypervisorError>;
    /// Whether this host's libvirt serves SPICE over TLS (qemu.conf `spice_tls = 1` with
    /// certificates in `spice_tls_x509_cert_dir`). Answered by libvirt itself, so it holds for
    /// remote hosts: a throwaway definition with a TLS port is validated, then removed.
    fn spice_tls(&self) -> Result<bool, HypervisorError>;
    /// The listen address and ports of a running domain's console (autoport resolved).
    fn graphics(&self, name: &str, kind: GraphicsKind) -> Result<GraphicsEndpoint, HypervisorError>;
    /// Ask the QEMU guest agent inside a running domain for a `guest-ping`: Ok when it
    /// answered within `timeout` seconds.
    fn agent_ping(&self, name: &str, timeout: i32) -> Result<(), HypervisorError>;
    /// Lifecycle events of domains whose name starts with `prefix`, delivered on a channel.
    /// Dropping the returned Subscription deregisters the callback.
    fn subscribe(&self, prefix: &str) -> Result<Subscription, HypervisorError>;

    // ---- the host's layer store: a storage pool of content-addressed volumes ----------------

    /// Makes sure storage pool `pool` is a directory pool at `path` on this host: defined
    /// (autostarted, directory mode 0711) when missing, built and started when inactive.
    /// [`HypervisorError::StoragePoolElsewhere`] when a pool of that name is of another type or
    /// at another path. Directories are the host's own: `path` names one there.
    fn ensure_storage_pool(&self, pool: &str, path: &Path) -> Result<(), HypervisorError>;
    /// The volumes of a storage pool, by name, as the pool's directory holds them now (libvirt
    /// re-reads the directory first, so files changed behind its back are seen).
    fn storage_volumes(&self, pool: &str) -> Result<Vec<Volume>, HypervisorError>;
    /// Uploads the local file `source` as a new volume `volume` (mode 0440) of `pool` through a
    /// libvirt stream on this host's own connection, sparse: holes travel as their length.
    /// `progress` gets the data bytes sent so far. The file's first 4 KiB (a qcow2 header and
    /// its magic) are sent last, so a volume whose upload died is no image QEMU would open;
    /// a failed upload deletes its volume. [`HypervisorError::VolumeExists`] when the name is
    /// taken. Nothing here says the copy is good: read it back with [`Self::volume_sha256`].
    fn upload_volume(
        &self,
        pool: &str,
        volume: &str,
        source: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Upload, HypervisorError>;
    /// Uploads a desktop's disk (a small overlay written here) as a new volume (mode 0600)
    /// of `pool`, as [`Self::upload_volume`] does a layer: header last, deleted when the
    /// upload fails, [`HypervisorError::VolumeExists`] when the name is taken.
    fn upload_disk(&self, pool: &str, volume: &str, source: &Path) -> Result<Upload, HypervisorError>;
    /// Reads a volume back from the host (a sparse download: holes as zeros) and returns its
    /// SHA-256. `progress` gets the bytes hashed so far, holes included.
    fn volume_sha256(
        &self,
        pool: &str,
        volume: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeDigest, HypervisorError>;
    /// Deletes a volume and its file. `Ok` when there is no such volume.
    fn delete_volume(&self, pool: &str, volume: &str) -> Result<(), HypervisorError>;
}

/// Lifecycle events on a channel. The channel closes (`recv` returns `Err`) when the event
/// connection is lost; dropping the subscription deregisters its callbacks.
pub struct Subscription {
    pub events: Receiver<LifecycleEvent>,
    prefix: String,
    /// libvirt's callbacks, deregistered on drop; `None` for the fake's in-memory channel.
    _registration: Option<libvirt::EventRegistration>,
    /// For a merged subscription: tells its forwarding threads to stop (and drop theirs).
    _forwarders: Option<StopOnDrop>,
}

struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Subscription {
    /// The events of several hosts' subscriptions on one channel (each forwarded by a thread
    /// of its own). The channel closes when every one of them closed; dropping the merged
    /// subscription deregisters them all (within half a second).
    pub fn merge(mut subs: Vec<Subscription>) -> Subscription {
        if subs.len() == 1 {
            return subs.pop().expect("one");
        }
        let prefix = subs.first().map(|s| s.prefix.clone()).unwrap_or_default();
        let (tx, events) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sub in subs {
            let (tx, stop) = (tx.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match sub.events.recv_timeout(std::time::Duration::from_millis(500)) {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            });
        }
        Subscription { events, prefix, _registration: None, _forwarders: Some(StopOnDrop(stop)) }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// The virt type for `auto`: `kvm` only when `/dev/kvm` exists and the caller did not force
/// `qemu`. On this project's machines `/dev/kvm` exists but guests do not boot under it (nested
/// virtualisation), so tests and CI force `qemu` (TCG).
pub fn resolve_virt_type(force_qemu: bool) -> &'static str {
    virt_type_for(Path::new("/dev/kvm").exists(), force_qemu)
}

fn virt_type_for(kvm_present: bool, force_qemu: bool) -> &'static str {
    if kvm_present && !force_qemu {
        "kvm"
    } else {
        "qemu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_virt_type_is_kvm_only_with_dev_kvm_and_not_forced() {
        assert_eq!(virt_type_for(true, false), "kvm");
        assert_eq!(virt_type_for(true, true), "qemu");
        assert_eq!(virt_type_for(false, false), "qemu");
        assert_eq!(virt_type_for(false, true), "qemu");
        assert_eq!(resolve_virt_type(true), "qemu");
    }
}
