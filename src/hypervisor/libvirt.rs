//! The [`Hypervisor`] implementation on libvirt through the `virt` crate: the command
//! connection, console passwords on live graphics devices, and lifecycle events from
//! libvirt's event loop.
//!
//! Two kinds of connections per [`Libvirt`]:
//! - the command connections: up to [`Hypervisor::parallel`] of them, opened as concurrent calls
//!   need them (one serves a command that calls one after another), each reopened when keepalive
//!   declares it dead. libvirtd serves only 5 calls of one connection at once
//!   (`max_client_requests`), and a destroy holds its call for the seconds QEMU takes to exit:
//!   a fleet's calls need connections of their own;
//! - one event connection per [`Subscription`](super::Subscription), whose domain lifecycle callbacks are run by a
//!   single process-wide event loop thread. Crashes are reported by libvirt's events, not found by
//!   polling, so a rollout sees a panicked guest as soon as QEMU reports it. When an event
//!   connection is lost (libvirtd restarted, keepalive timeout) the subscription's channel is
//!   closed: `recv` returns `Err`, and the caller must subscribe again and re-read states.
//!   On `test:///default`, whose connections all share one event queue, one callback stays
//!   registered for the life of the process (see [`hold_shared_test_events`]).

use std::ffi::{c_int, c_void, CStr};
use std::ops::Deref;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as RawState};
use virt::enumutil::Enum;
use virt::sys;

use super::storage::Host;
use super::xml::{cdrom, element_text, empty_cdrom, find_elements, Element as XmlElement};
use super::*;

/// The `virt`-crate implementation of [`Hypervisor`].
#[derive(Debug)]
pub struct Libvirt {
    uri: String,
    lanes: Lanes,
}

/// The command connections: idle ones, how many are open, and at most how many.
#[derive(Debug)]
struct Lanes {
    state: Mutex<LaneState>,
    freed: Condvar,
    max: usize,
}

#[derive(Debug)]
struct LaneState {
    idle: Vec<Connect>,
    open: usize,
}

/// A command connection lent to one call; back to the idle ones when dropped.
struct Lease<'a> {
    lanes: &'a Lanes,
    conn: Option<Connect>,
}

impl Deref for Lease<'_> {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        self.conn.as_ref().expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            lock(&self.lanes.state).idle.push(c);
            self.lanes.freed.notify_one();
        }
    }
}

/// A value (a domain) used under the lease of the connection it came from.
struct Leased<'a, T> {
    _lease: Lease<'a>,
    value: T,
}

impl<T> Deref for Leased<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl Libvirt {
    /// Opens the command connection. Starts the process-wide event loop first: libvirt needs it
    /// registered before a connection is opened for keepalive and events to work on it.
    /// libvirt's in-process test driver: no guests, no NVRAM/TPM, no device updates. The only
    /// driver for which vdim accepts doing less than asked.
    fn is_test_driver(&self) -> bool {
        self.uri.starts_with("test:")
    }

    pub fn connect(uri: &str) -> Result<Libvirt, HypervisorError> {
        Libvirt::connect_with(uri, DEFAULT_PARALLEL)
    }

    /// As [`Libvirt::connect`], serving up to `parallel` calls at once (at least one).
    pub fn connect_with(uri: &str, parallel: usize) -> Result<Libvirt, HypervisorError> {
        ensure_event_loop().map_err(|message| HypervisorError::Connect { uri: uri.to_string(), message })?;
        let conn = open(uri)?;
        // A test:///<file> connection is a host of its own (a second would hold other domains),
        // so a test-driver host keeps one connection.
        let max = if uri.starts_with("test:") { 1 } else { parallel.max(1) };
        let lanes = Lanes { state: Mutex::new(LaneState { idle: vec![conn], open: 1 }), freed: Condvar::new(), max };
        Ok(Libvirt { uri: uri.to_string(), lanes })
    }

    /// A command connection for one call: an idle one (reopened first if keepalive found it
    /// dead), a new one while fewer than `max` are open, else the next one freed.
    fn conn(&self) -> Result<Lease<'_>, HypervisorError> {
        let lanes = &self.lanes;
        let mut st = lock(&lanes.state);
        let reuse = loop {
            if let Some(c) = st.idle.pop() {
                break Some(c);
            }
            if st.open < lanes.max {
                st.open += 1;
                break None;
            }
            st = lanes.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        drop(st);
        let conn = match reuse {
            Some(c) if c.is_alive().unwrap_or(false) => Ok(c),
            Some(_) => {
                tracing::warn!(uri = %self.uri, "libvirt connection lost, reconnecting");
                open(&self.uri)
            }
            None => open(&self.uri),
        };
        match conn {
            Ok(c) => Ok(Lease { lanes, conn: Some(c) }),
            Err(e) => {
                lock(&lanes.state).open -= 1;
                lanes.freed.notify_one();
                Err(e)
            }
        }
    }

    fn domain(&self, name: &str, op: &'static str) -> Result<Leased<'_, Domain>, HypervisorError> {
        let lease = self.conn()?;
        let value = lease.lookup_domain_by_name(name).map_err(|e| domain_error(op, name, &e))?;
        Ok(Leased { _lease: lease, value })
    }

    fn live_graphics(
        &self,
        name: &str,
        kind: GraphicsKind,
        op: &'static str,
    ) -> Result<(Leased<'_, Domain>, XmlElement), HypervisorError> {
        let dom = self.domain(name, op)?;
        let xml = dom.xml_desc(sys::VIR_DOMAIN_XML_SECURE).map_err(|e| domain_error(op, name, &e))?;
        let element = find_elements(&xml, "graphics")
            .into_iter()
            .find(|g| g.attr("type") == Some(kind.as_str()))
            .ok_or_else(|| HypervisorError::NoGraphics { domain: name.to_string(), kind })?;
        Ok((dom, element))
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn parallel(&self) -> usize {
        self.lanes.max
    }

    fn spice_tls(&self) -> Result<bool, HypervisorError> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("the OS random source works");
        let name = format!("vdim-probe-spice-tls-{}", hex::encode(r));
        // libvirt refuses a tlsPort at define time when qemu.conf has spice_tls = 0.
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory><os><type>hvm</type></os>\
             <devices><graphics type='spice' autoport='no' port='65534' tlsPort='65535'>\
             <listen type='address' address='127.0.0.1'/></graphics></devices></domain>"
        );
        let conn = self.conn()?;
        match conn.define_domain_xml(&xml) {
            Ok(dom) => {
                dom.undefine().map_err(|e| domain_error("undefine", &name, &e))?;
                Ok(true)
            }
            Err(e) if e.code().to_raw() == sys::VIR_ERR_CONFIG_UNSUPPORTED && e.message().contains("TLS") => {
                tracing::debug!(uri = %self.uri, message = %e.message(), "no SPICE TLS");
                Ok(false)
            }
            Err(e) => Err(domain_error("define", &name, &e)),
        }
    }

    fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        let name = element_text(xml, "name").unwrap_or_else(|| "(unnamed)".to_string());
        self.conn()?.define_domain_xml(xml).map_err(|e| domain_error("define", &name, &e))?;
        tracing::debug!(domain = %name, "defined");
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        tracing::debug!(domain = %name, "starting");
        self.domain(name, "start")?.create().map_err(|e| domain_error("start", name, &e))?;
        tracing::debug!(domain = %name, "started");
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.domain(name, "shut down")?;
        match dom.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
            Ok(()) => Ok(()),
            // Drivers without ACPI (the test driver) reject the flag: let them choose.
            Err(e) if e.code().to_raw() == sys::VIR_ERR_INVALID_ARG => {
                dom.shutdown().map(|_| ()).map_err(|e| domain_error("shut down", name, &e))
            }
            Err(e) => Err(domain_error("shut down", name, &e)),
        }
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        tracing::debug!(domain = %name, "destroying");
        if crate::test_hook::fails("destroy", name) {
            let message = "failed as the test asked (VDIM_TEST_FAIL)".to_string();
            return Err(HypervisorError::Libvirt { op: "destroy", domain: name.to_string(), message });
        }
        let dom = self.domain(name, "destroy")?;
        // QEMU may take a moment to die after SIGKILL (EBUSY): libvirt advises retrying.
        for attempt in 1..=3 {
            if !dom.is_active().map_err(|e| domain_error("destroy", name, &e))? {
                return Ok(());
            }
            match dom.destroy() {
                Ok(()) => {
                    tracing::debug!(domain = %name, "destroyed");
                    return Ok(());
                }
                Err(e) if attempt < 3 && e.code().to_raw() == sys::VIR_ERR_SYSTEM_ERROR => {
                    tracing::warn!(domain = %name, error = %e.message(), "destroy failed, retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    if dom.is_active().ok() == Some(false) {
                        return Ok(());
                    }
                    return Err(domain_error("destroy", name, &e));
                }
            }
        }
        Ok(())
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let dom = self.domain(name, "undefine")?;
        let full = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_TPM;
        match dom.undefine_flags(full) {
            Ok(()) => {}
            // libvirt's in-process test driver keeps no NVRAM, TPM or checkpoints and rejects
            // those flags. Nowhere else: undefining while keeping the firmware state would hand
            // a non-persistent desktop's TPM and UEFI variables to its next user.
            Err(e) if e.code().to_raw() == sys::VIR_ERR_INVALID_ARG && self.is_test_driver() => {
                tracing::debug!(domain = %name, "test driver: undefining without NVRAM and TPM flags");
                dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                    .map_err(|e| domain_error("undefine", name, &e))?
            }
            Err(e) => return Err(domain_error("undefine", name, &e)),
        }
        tracing::debug!(domain = %name, "undefined");
        Ok(())
    }

    fn state(&self, name: &str) -> Result<(DomainState, String), HypervisorError> {
        let dom = self.domain(name, "read the state of")?;
        let (state, reason) = dom.state().map_err(|e| domain_error("read the state of", name, &e))?;
        let state = match state {
            Enum::Known(RawState::Running) => DomainState::Running,
            Enum::Known(RawState::Paused) => DomainState::Paused,
            Enum::Known(RawState::Shutoff) => DomainState::ShutOff,
            Enum::Known(RawState::Crashed) => DomainState::Crashed,
            Enum::Known(RawState::Shutdown) => DomainState::Shutdown,
            Enum::Known(RawState::PMSuspended) => DomainState::PmSuspended,
            Enum::Known(RawState::Blocked) => DomainState::Blocked,
            Enum::Known(RawState::NoState) => DomainState::Other,
            // virt 0.5 ignores virDomainGetState's failure and reports state -1.
            Enum::Unknown(raw) if raw as c_int == -1 => {
                return Err(domain_error("read the state of", name, &virt::error::Error::last_error()))
            }
            Enum::Unknown(_) => DomainState::Other,
        };
        let reason = match reason {
            Enum::Known(r) => r.to_string(),
            Enum::Unknown(raw) => format!("reason {raw}"),
        };
        Ok((state, reason))
    }

    fn exists(&self, name: &str) -> Result<bool, HypervisorError> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(_) => Ok(true),
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => Ok(false),
            Err(e) => Err(domain_error("look up", name, &e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, HypervisorError> {
        let domains = self.conn()?.list_all_domains(0).map_err(|e| HypervisorError::Connection {
            uri: self.uri.clone(),
            op: "list domains",
            message: e.message().to_string(),
        })?;
        let mut names = Vec::with_capacity(domains.len());
        for dom in domains {
            match dom.name() {
                Ok(n) if n.starts_with(prefix) => names.push(n),
                Ok(_) => {}
                Err(e) => {
                    return Err(HypervisorError::Connection {
                        uri: self.uri.clone(),
                        op: "read a domain name",
                        message: e.message().to_string(),
                    })
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn xml(&self, name: &str) -> Result<String, HypervisorError> {
        self.domain(name, "read the XML of")?
            .xml_desc(sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| domain_error("read the XML of", name, &e))
    }

    fn set_graphics_password(
        &self,
        name: &str,
        kind: GraphicsKind,
        password: &str,
        valid_to: SystemTime,
    ) -> Result<GraphicsEndpoint, HypervisorError> {
        const OP: &str = "set the console password of";
        let invalid =
            |reason: &str| HypervisorError::InvalidPassword { domain: name.to_string(), reason: reason.to_string() };
        if password.is_empty() {
            return Err(invalid("the password is empty"));
        }
        if password.chars().any(char::is_control) {
            return Err(invalid("the password contains control characters"));
        }
        if kind == GraphicsKind::Vnc && password.chars().count() > VNC_PASSWORD_MAX {
            return Err(invalid(&format!("VNC passwords are at most {VNC_PASSWORD_MAX} characters")));
        }
        let valid_to = libvirt_utc(valid_to).ok_or_else(|| invalid("it expires before 1970"))?;
        let (dom, mut graphics) = self.live_graphics(name, kind, OP)?;
        graphics.set_attr("passwd", password);
        graphics.set_attr("passwdValidTo", &valid_to);
        match kind {
            GraphicsKind::Spice => graphics.set_attr("connected", "disconnect"),
            GraphicsKind::Vnc => graphics.remove_attr("connected"),
        }
        dom.update_device_flags(&graphics.to_xml(), sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| domain_error(OP, name, &e))?;
        // Its connection back before the next call takes one (there may be only one).
        drop(dom);
        tracing::info!(domain = %name, %kind, valid_to = %valid_to, "console password set");
        self.graphics(name, kind)
    }

    fn eject_media(&self, name: &str, target_dev: &str) -> Result<(), HypervisorError> {
        const OP: &str = "eject the CD-ROM media of";
        let dom = self.domain(name, OP)?;
        let xml = dom.xml_desc(0).map_err(|e| domain_error(OP, name, &e))?;
        let Some(cdrom) = cdrom(&xml, target_dev) else {
            let message = format!("it has no CD-ROM {target_dev}");
            return Err(HypervisorError::Libvirt { op: OP, domain: name.to_string(), message });
        };
        // The persistent definition always; the running domain too when there is one.
        let live = dom.is_active().map_err(|e| domain_error(OP, name, &e))?;
        let flags = sys::VIR_DOMAIN_AFFECT_CONFIG | if live { sys::VIR_DOMAIN_AFFECT_LIVE } else { 0 };
        match dom.update_device_flags(&empty_cdrom(&cdrom, target_dev), flags) {
            Ok(_) => {}
            // libvirt's in-process test driver has no device updates (and runs no guest to
            // read a drive); every other driver must eject, or nothing is handed out.
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_SUPPORT && self.is_test_driver() => {
                tracing::debug!(domain = %name, "test driver: no media to eject");
                return Ok(());
            }
            Err(e) => return Err(domain_error(OP, name, &e)),
        }
        tracing::info!(domain = %name, target = %target_dev, live, "CD-ROM media ejected");
        Ok(())
    }

    fn agent_ping(&self, name: &str, timeout: i32) -> Result<(), HypervisorError> {
        let dom = self.domain(name, "ping the guest agent of")?;
        dom.qemu_agent_command(r#"{"execute":"guest-ping"}"#, timeout, 0)
            .map(|_| ())
            .map_err(|e| domain_error("ping the guest agent of", name, &e))
    }

    fn graphics(&self, name: &str, kind: GraphicsKind) -> Result<GraphicsEndpoint, HypervisorError> {
        let (_, graphics) = self.live_graphics(name, kind, "read the console of")?;
        endpoint(&graphics).map_err(|reason| HypervisorError::NoConsolePort { domain: name.to_string(), kind, reason })
    }

    fn subscribe(&self, prefix: &str) -> Result<Subscription, HypervisorError> {
        let fail =
            |message: String| HypervisorError::Subscribe { uri: self.uri.clone(), prefix: prefix.to_string(), message };
        ensure_event_loop().map_err(fail)?;
        if self.uri == SHARED_TEST_URI {
            hold_shared_test_events().map_err(fail)?;
        }
        let conn = Connect::open(Some(&self.uri)).map_err(|e| fail(e.message().to_string()))?;
        set_keepalive(&conn, &self.uri);
        let (tx, events) = mpsc::channel();
        let sink = Arc::new(EventSink { prefix: prefix.to_string(), tx: Mutex::new(Some(tx)) });
        let mut registration = EventRegistration { sink, callback_ids: Vec::new(), close_registered: false, conn };
        registration.register().map_err(fail)?;
        Ok(Subscription { events, prefix: prefix.to_string(), _registration: Some(registration), _forwarders: None })
    }

    fn ensure_storage_pool(&self, pool: &str, path: &Path) -> Result<(), HypervisorError> {
        Host { uri: &self.uri, pool }.ensure_pool(&*self.conn()?, path)
    }

    fn storage_volumes(&self, pool: &str) -> Result<Vec<Volume>, HypervisorError> {
        Host { uri: &self.uri, pool }.volumes(&*self.conn()?)
    }

    fn upload_volume(
        &self,
        pool: &str,
        volume: &str,
        source: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Upload, HypervisorError> {
        Host { uri: &self.uri, pool }.upload(&*self.conn()?, volume, source, storage::LAYER_MODE, progress)
    }

    fn upload_disk(&self, pool: &str, volume: &str, source: &Path) -> Result<Upload, HypervisorError> {
        Host { uri: &self.uri, pool }.upload(&*self.conn()?, volume, source, storage::DISK_MODE, &mut |_| {})
    }

    fn volume_sha256(
        &self,
        pool: &str,
        volume: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeDigest, HypervisorError> {
        Host { uri: &self.uri, pool }.sha256(&*self.conn()?, volume, progress)
    }

    fn delete_volume(&self, pool: &str, volume: &str) -> Result<(), HypervisorError> {
        Host { uri: &self.uri, pool }.delete(&*self.conn()?, volume)
    }
}

fn open(uri: &str) -> Result<Connect, HypervisorError> {
    let conn = Connect::open(Some(uri))
        .map_err(|e| HypervisorError::Connect { uri: uri.to_string(), message: e.message().to_string() })?;
    set_keepalive(&conn, uri);
    Ok(conn)
}

fn set_keepalive(conn: &Connect, uri: &str) {
    // Only remote connections have keepalive; in-process drivers (test://) refuse it.
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
        tracing::debug!(%uri, error = %e.message(), "no keepalive on this connection");
    }
}

fn domain_error(op: &'static str, domain: &str, e: &virt::error::Error) -> HypervisorError {
    if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN {
        HypervisorError::NotFound { domain: domain.to_string() }
    } else {
        HypervisorError::Libvirt { op, domain: domain.to_string(), message: e.message().to_string() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn endpoint(graphics: &XmlElement) -> Result<GraphicsEndpoint, String> {
    // Inactive domains and unallocated autoports read -1.
    let port_attr = |attr: &str| graphics.attr(attr).and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0);
    let (port, tls_port) = (port_attr("port"), port_attr("tlsPort"));
    if port.is_none() && tls_port.is_none() {
        return Err("the domain is not running or listens on a socket".into());
    }
    let listen = graphics
        .attr("listen")
        .map(str::to_string)
        .or_else(|| find_elements(&graphics.inner, "listen").iter().find_map(|l| l.attr("address").map(str::to_string)))
        .ok_or("no listen address in the live XML")?;
    Ok(GraphicsEndpoint { listen, port, tls_port })
}

/// `2026-11-22T10:00:00`: UTC, no offset, as `passwdValidTo` wants it.
fn libvirt_utc(t: SystemTime) -> Option<String> {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rem / 3_600, rem % 3_600 / 60, rem % 60))
}

// ---------------------------------------------------------------------------------------------
// Events. virt 0.5 has no domain event API: the callbacks are registered through virt::sys.

/// Registers libvirt's default event loop and starts the thread that runs it, once per process.
fn ensure_event_loop() -> Result<(), String> {
    static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    EVENT_LOOP
        .get_or_init(|| {
            // libvirt's default error handler prints every error to stderr, even a NotFound
            // that `exists` expects; errors are still returned to the caller.
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl()
                .map_err(|e| format!("cannot register libvirt's event loop: {}", e.message()))?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e.message(), "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
                .map(|_| ())
                .map_err(|e| format!("cannot start the libvirt event thread: {e}"))
        })
        .clone()
}

/// libvirt's in-process test driver: every connection of the process to this URI shares one
/// driver state, and with it one event queue and one dispatch timer for all subscriptions.
const SHARED_TEST_URI: &str = "test:///default";

/// Keeps one callback registered on the shared `test:///default` event state for the life of
/// the process, so that the state never loses its last callback.
///
/// libvirt (9.0 here, and its current sources) checks the state's timer before it takes the
/// state's lock to queue an event (`virObjectEventStateQueueRemote`). If the last callback is
/// deregistered in between, the timer is removed and the queue cleared, then the event is queued
/// anyway: it stays there with no timer to dispatch it. The next registration creates a disarmed
/// timer, and since a timer is armed only when the queue goes from empty to one event, no event
/// is dispatched again until every callback of the state is gone. Through the shared state, one
/// subscription's drop racing another connection's start or define silently stops the events of
/// every later subscription in the process. With this callback the state always keeps one, so
/// its timer is never removed (and the state itself stays alive).
///
/// Other URIs are not affected: each subscription has a connection, and so an event state, of its
/// own, and the race only happens when that subscription is dropped.
fn hold_shared_test_events() -> Result<(), String> {
    static HOLD: OnceLock<Result<EventRegistration, String>> = OnceLock::new();
    HOLD.get_or_init(|| {
        let conn = Connect::open(Some(SHARED_TEST_URI)).map_err(|e| e.message().to_string())?;
        let sink = Arc::new(EventSink { prefix: String::new(), tx: Mutex::new(None) });
        let mut registration = EventRegistration { sink, callback_ids: Vec::new(), close_registered: false, conn };
        registration.register()?;
        Ok(registration)
    })
    .as_ref()
    .map(|_| ())
    .map_err(Clone::clone)
}

/// Shared by the callbacks of one subscription. Taking `tx` closes the channel.
struct EventSink {
    prefix: String,
    tx: Mutex<Option<Sender<LifecycleEvent>>>,
}

impl EventSink {
    fn deliver(&self, dom: sys::virDomainPtr, kind: LifecycleKind, detail: &str) {
        // SAFETY: libvirt passes a domain that is valid for the duration of the callback;
        // virDomainGetName returns a NUL-terminated string owned by that domain (not freed here).
        let name = unsafe {
            let p = sys::virDomainGetName(dom);
            if p.is_null() {
                return;
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        if !name.starts_with(&self.prefix) {
            return;
        }
        if let Some(tx) = lock(&self.tx).as_ref() {
            // A dropped receiver means the subscription is being dropped: nothing to do.
            let _ = tx.send(LifecycleEvent { domain: name, kind, detail: detail.to_string(), at: SystemTime::now() });
        }
    }

    fn close(&self) {
        lock(&self.tx).take();
    }
}

/// Recovers the sink from a callback's `opaque` without taking ownership.
///
/// # Safety
/// `opaque` must be the `Box<Arc<EventSink>>` pointer given at registration, not yet freed.
unsafe fn sink_ref<'a>(opaque: *mut c_void) -> &'a EventSink {
    // SAFETY: guaranteed by the caller; libvirt calls free_sink only after the last callback.
    unsafe { &*(opaque as *const Arc<EventSink>) }
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let (kind, detail) = lifecycle(event, detail);
    // SAFETY: registered with a Box<Arc<EventSink>> freed only by free_sink.
    unsafe { sink_ref(opaque) }.deliver(dom, kind, &detail);
    0
}

unsafe extern "C" fn on_reboot(_conn: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: registered with a Box<Arc<EventSink>> freed only by free_sink.
    unsafe { sink_ref(opaque) }.deliver(dom, LifecycleKind::Rebooted, "");
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    tracing::warn!(reason, "libvirt event connection closed; subscription ends");
    // SAFETY: opaque is the Arc<EventSink> that the registration keeps alive until it has
    // unregistered this callback (see EventRegistration::drop).
    unsafe { &*(opaque as *const EventSink) }.close();
}

unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    // SAFETY: opaque came from Box::into_raw(Box<Arc<EventSink>>) and libvirt frees it once.
    drop(unsafe { Box::from_raw(opaque as *mut Arc<EventSink>) });
}

/// The callbacks of one subscription on its own event connection.
pub(super) struct EventRegistration {
    sink: Arc<EventSink>,
    callback_ids: Vec<c_int>,
    close_registered: bool,
    conn: Connect,
}

impl EventRegistration {
    fn register(&mut self) -> Result<(), String> {
        type LifecycleCallback =
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
        type GenericCallback = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        // SAFETY: libvirt calls a VIR_DOMAIN_EVENT_ID_LIFECYCLE callback with the lifecycle
        // signature; the generic type is only how it is passed (C's VIR_DOMAIN_EVENT_CALLBACK).
        let lifecycle_cb = unsafe { std::mem::transmute::<LifecycleCallback, GenericCallback>(on_lifecycle) };
        let wanted: [(c_int, GenericCallback); 2] = [
            (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int, lifecycle_cb),
            (sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int, on_reboot),
        ];
        for (event_id, cb) in wanted {
            let opaque = Box::into_raw(Box::new(Arc::clone(&self.sink))) as *mut c_void;
            // SAFETY: the connection is open and owned by self; opaque is a leaked Box that
            // libvirt owns from here and releases through free_sink.
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    self.conn.as_ptr(),
                    std::ptr::null_mut(),
                    event_id,
                    Some(cb),
                    opaque,
                    Some(free_sink),
                )
            };
            if id < 0 {
                // SAFETY: registration failed, so libvirt did not take opaque: reclaim it.
                drop(unsafe { Box::from_raw(opaque as *mut Arc<EventSink>) });
                return Err(virt::error::Error::last_error().message().to_string());
            }
            self.callback_ids.push(id);
        }
        // SAFETY: the connection is open; opaque points into self.sink, which outlives the
        // registration because Drop unregisters before the Arc is released. No free callback.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                self.conn.as_ptr(),
                Some(on_close),
                Arc::as_ptr(&self.sink) as *mut c_void,
                None,
            )
        };
        if rc < 0 {
            let e = virt::error::Error::last_error();
            tracing::warn!(error = %e.message(), "no close callback: a lost event connection will go unnoticed");
        } else {
            self.close_registered = true;
        }
        Ok(())
    }
}

impl Drop for EventRegistration {
    fn drop(&mut self) {
        for id in self.callback_ids.drain(..) {
            // SAFETY: id was returned by virConnectDomainEventRegisterAny on this connection.
            if unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) } < 0 {
                let e = virt::error::Error::last_error();
                tracing::debug!(id, error = %e.message(), "event callback already gone");
            }
        }
        if self.close_registered {
            // SAFETY: on_close was registered on this connection by register().
            unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close)) };
        }
    }
}

/// Maps a `VIR_DOMAIN_EVENT_*` event and its detail to a kind and libvirt's detail word.
fn lifecycle(event: c_int, detail: c_int) -> (LifecycleKind, String) {
    use LifecycleKind as K;
    let (event, d) = (event as u32, detail as u32);
    let (kind, detail) = match event {
        sys::VIR_DOMAIN_EVENT_DEFINED => (
            K::Defined,
            match d {
                sys::VIR_DOMAIN_EVENT_DEFINED_ADDED => "added",
                sys::VIR_DOMAIN_EVENT_DEFINED_UPDATED => "updated",
                sys::VIR_DOMAIN_EVENT_DEFINED_RENAMED => "renamed",
                sys::VIR_DOMAIN_EVENT_DEFINED_FROM_SNAPSHOT => "from-snapshot",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_UNDEFINED => (
            K::Undefined,
            match d {
                sys::VIR_DOMAIN_EVENT_UNDEFINED_REMOVED => "removed",
                sys::VIR_DOMAIN_EVENT_UNDEFINED_RENAMED => "renamed",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_STARTED => (
            K::Started,
            match d {
                sys::VIR_DOMAIN_EVENT_STARTED_BOOTED => "booted",
                sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED => "migrated",
                sys::VIR_DOMAIN_EVENT_STARTED_RESTORED => "restored",
                sys::VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT => "from-snapshot",
                sys::VIR_DOMAIN_EVENT_STARTED_WAKEUP => "wakeup",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_SUSPENDED => (
            K::Suspended,
            match d {
                sys::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED => "paused",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED => "migrated",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => "ioerror",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG => "watchdog",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_RESTORED => "restored",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT => "from-snapshot",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR => "api-error",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY => "postcopy",
                sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED => "postcopy-failed",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_RESUMED => (
            K::Resumed,
            match d {
                sys::VIR_DOMAIN_EVENT_RESUMED_UNPAUSED => "unpaused",
                sys::VIR_DOMAIN_EVENT_RESUMED_MIGRATED => "migrated",
                sys::VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT => "from-snapshot",
                sys::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY => "postcopy",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_STOPPED => match d {
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => (K::Crashed, "crashed"),
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => (K::Stopped, "shutdown"),
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => (K::Stopped, "destroyed"),
            sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => (K::Stopped, "migrated"),
            sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => (K::Stopped, "saved"),
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => (K::Stopped, "failed"),
            sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => (K::Stopped, "from-snapshot"),
            _ => (K::Stopped, ""),
        },
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => (
            K::Shutdown,
            match d {
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED => "finished",
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST => "guest",
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_HOST => "host",
                _ => "",
            },
        ),
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => (
            K::Suspended,
            match d {
                sys::VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY => "pm-memory",
                sys::VIR_DOMAIN_EVENT_PMSUSPENDED_DISK => "pm-disk",
                _ => "pm",
            },
        ),
        sys::VIR_DOMAIN_EVENT_CRASHED => (
            K::Crashed,
            match d {
                sys::VIR_DOMAIN_EVENT_CRASHED_PANICKED => "panicked",
                sys::VIR_DOMAIN_EVENT_CRASHED_CRASHLOADED => "crashloaded",
                _ => "",
            },
        ),
        other => return (K::Other(format!("event {other}")), format!("detail {d}")),
    };
    let detail = if detail.is_empty() { format!("detail {d}") } else { detail.to_string() };
    (kind, detail)
}

/// Pure helpers and libvirt's in-process `test:///default` driver: no daemon. The tests
/// against the real daemon (qemu:///system) are in `tests/hypervisor.rs`.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    const TEST_URI: &str = "test:///default";

    /// `vdimtest-hv-<pid>-<n>`: unique across tests and runs.
    fn unique_name() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!("vdimtest-hv-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
    }

    /// Destroys and undefines its domain however the test ends.
    struct Cleanup<'a> {
        hv: &'a Libvirt,
        name: String,
    }

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.hv.destroy(&self.name);
            let _ = self.hv.undefine(&self.name);
        }
    }

    fn cleanup<'a>(hv: &'a Libvirt, name: &str) -> Cleanup<'a> {
        Cleanup { hv, name: name.to_string() }
    }

    fn test_domain_xml(name: &str) -> String {
        format!(
            "<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        )
    }

    /// Waits for the first event of `domain` matching `want`, skipping others.
    fn wait_for(
        sub: &Subscription,
        domain: &str,
        want: impl Fn(&LifecycleKind) -> bool,
        timeout: Duration,
    ) -> Option<(LifecycleEvent, Duration)> {
        let started = Instant::now();
        loop {
            let left = timeout.checked_sub(started.elapsed())?;
            match sub.events.recv_timeout(left) {
                Ok(ev) if ev.domain == domain && want(&ev.kind) => return Some((ev, started.elapsed())),
                Ok(ev) => eprintln!("  (other event: {} {:?} {})", ev.domain, ev.kind, ev.detail),
                Err(_) => return None,
            }
        }
    }

    // --- pure helpers -------------------------------------------------------------------------

    #[test]
    fn valid_to_is_formatted_as_utc_without_offset() {
        let at = |s: u64| libvirt_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0).as_deref(), Some("1970-01-01T00:00:00"));
        // date -u -d 2026-11-22T10:00:00 +%s
        assert_eq!(at(1_795_341_600).as_deref(), Some("2026-11-22T10:00:00"));
        // Leap day, and the last second of a year.
        assert_eq!(at(951_782_400).as_deref(), Some("2000-02-29T00:00:00"));
        assert_eq!(at(1_767_225_599).as_deref(), Some("2025-12-31T23:59:59"));
        assert_eq!(libvirt_utc(UNIX_EPOCH - Duration::from_secs(1)), None);
    }

    #[test]
    fn graphics_element_is_found_and_rewritten_with_children_kept() {
        let xml = "<domain><devices>\
            <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='o&apos;ld'>\
              <listen type='address' address='127.0.0.1'/>\
            </graphics>\
            <graphics type='spice' port='5902' tlsPort='5903' autoport='yes'>\
              <listen type='address' address='0.0.0.0'/>\
            </graphics>\
            <graphicsx type='vnc'/>\
            </devices></domain>";
        let all = find_elements(xml, "graphics");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].attr("passwd"), Some("o'ld"));
        let spice = endpoint(&all[1]).expect("spice endpoint");
        assert_eq!(spice, GraphicsEndpoint { listen: "0.0.0.0".into(), port: Some(5902), tls_port: Some(5903) });
        let mut vnc = all[0].clone();
        vnc.set_attr("passwd", "n<e>w'\"&");
        vnc.set_attr("passwdValidTo", "2026-11-22T10:00:00");
        let out = vnc.to_xml();
        assert!(out.starts_with("<graphics type='vnc' port='5901'"), "{out}");
        assert!(out.contains("passwd='n&lt;e&gt;w&apos;&quot;&amp;'"), "{out}");
        assert!(out.contains("<listen type='address' address='127.0.0.1'/>"), "{out}");
        assert_eq!(find_elements(&out, "graphics")[0].attr("passwd"), Some("n<e>w'\"&"));
    }

    #[test]
    fn stopped_graphics_has_no_port() {
        let g = &find_elements("<graphics type='vnc' port='-1' autoport='yes'/>", "graphics")[0];
        assert!(g.self_closing);
        assert!(endpoint(g).is_err());
    }

    #[test]
    fn domain_name_is_read_from_xml() {
        assert_eq!(element_text("<domain><name> a&amp;b </name></domain>", "name").as_deref(), Some("a&b"));
        assert_eq!(element_text("<domain/>", "name"), None);
    }

    #[test]
    fn lifecycle_numbers_map_to_kinds() {
        let e = |ev: u32, d: u32| lifecycle(ev as c_int, d as c_int);
        assert_eq!(
            e(sys::VIR_DOMAIN_EVENT_CRASHED, sys::VIR_DOMAIN_EVENT_CRASHED_PANICKED),
            (LifecycleKind::Crashed, "panicked".to_string())
        );
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_STOPPED, sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED).0, LifecycleKind::Crashed);
        assert_eq!(
            e(sys::VIR_DOMAIN_EVENT_STOPPED, sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
            (LifecycleKind::Stopped, "destroyed".to_string())
        );
        assert_eq!(
            e(sys::VIR_DOMAIN_EVENT_STARTED, sys::VIR_DOMAIN_EVENT_STARTED_BOOTED),
            (LifecycleKind::Started, "booted".to_string())
        );
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_DEFINED, 0).0, LifecycleKind::Defined);
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_UNDEFINED, 0).0, LifecycleKind::Undefined);
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_SUSPENDED, 0).0, LifecycleKind::Suspended);
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_RESUMED, 0).0, LifecycleKind::Resumed);
        assert_eq!(e(sys::VIR_DOMAIN_EVENT_SHUTDOWN, 0).0, LifecycleKind::Shutdown);
        assert_eq!(e(99, 3).0, LifecycleKind::Other("event 99".into()));
    }

    #[test]
    fn errors_name_the_domain_and_operation() {
        let e = HypervisorError::Libvirt { op: "start", domain: "pool-a-3".into(), message: "boom".into() };
        assert_eq!(e.to_string(), "Libvirt could not start domain pool-a-3: boom");
        let e = HypervisorError::NotFound { domain: "pool-a-3".into() };
        assert_eq!(e.to_string(), "Domain pool-a-3 is not defined");
    }

    #[test]
    fn libvirt_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Libvirt>();
        fn assert_send<T: Send>() {}
        assert_send::<Subscription>();
        let _object_safe: Option<Box<dyn Hypervisor>> = None;
    }

    // --- test:///default ------------------------------------------------------------------------

    #[test]
    fn test_driver_define_start_state_destroy_undefine() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        assert_eq!(hv.uri(), TEST_URI);
        let name = unique_name();
        let _guard = cleanup(&hv, &name);

        assert!(!hv.exists(&name).expect("exists"));
        hv.define(&test_domain_xml(&name)).expect("define");
        assert!(hv.exists(&name).expect("exists"));
        assert_eq!(hv.state(&name).expect("state").0, DomainState::ShutOff);

        hv.start(&name).expect("start");
        assert_eq!(hv.state(&name).expect("state"), (DomainState::Running, "booted".to_string()));
        assert!(hv.xml(&name).expect("xml").contains(&name));

        hv.destroy(&name).expect("destroy");
        assert_eq!(hv.state(&name).expect("state"), (DomainState::ShutOff, "destroyed".to_string()));
        hv.destroy(&name).expect("destroy of a stopped domain is Ok");

        hv.start(&name).expect("start again");
        hv.shutdown(&name).expect("shutdown");
        assert_eq!(hv.state(&name).expect("state").0, DomainState::ShutOff);

        hv.undefine(&name).expect("undefine");
        assert!(!hv.exists(&name).expect("exists"));
    }

    #[test]
    fn test_driver_missing_domain_is_not_found_everywhere() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let name = unique_name();
        let not_found = |r: Result<(), HypervisorError>, op: &str| match r {
            Err(HypervisorError::NotFound { domain }) => assert_eq!(domain, name, "{op}"),
            other => panic!("{op}: expected NotFound, got {other:?}"),
        };
        not_found(hv.start(&name), "start");
        not_found(hv.shutdown(&name), "shutdown");
        not_found(hv.destroy(&name), "destroy");
        not_found(hv.undefine(&name), "undefine");
        not_found(hv.state(&name).map(|_| ()), "state");
        not_found(hv.xml(&name).map(|_| ()), "xml");
        not_found(hv.graphics(&name, GraphicsKind::Vnc).map(|_| ()), "graphics");
        let err = hv.start(&name).expect_err("start");
        assert_eq!(err.to_string(), format!("Domain {name} is not defined"));
    }

    #[test]
    fn test_driver_list_filters_by_prefix() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let base = unique_name();
        let names: Vec<String> = (0..3).map(|i| format!("{base}-{i}")).collect();
        let _guards: Vec<_> = names.iter().map(|n| cleanup(&hv, n)).collect();
        for n in &names {
            hv.define(&test_domain_xml(n)).expect("define");
        }
        hv.start(&names[1]).expect("start");
        assert_eq!(hv.list(&format!("{base}-")).expect("list"), names);
        assert!(hv.list("no-such-prefix-").expect("list").is_empty());
        assert!(hv.list("").expect("list").contains(&"test".to_string()));
    }

    #[test]
    fn test_driver_bad_xml_error_names_the_domain() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let name = unique_name();
        let _guard = cleanup(&hv, &name);
        let err = hv
            .define(&format!("<domain type='test'><name>{name}</name></domain>"))
            .expect_err("a domain without memory or os is invalid");
        let msg = err.to_string();
        assert!(msg.contains(&name) && msg.contains("define"), "{msg}");
    }

    #[test]
    fn test_driver_events_arrive_on_the_subscription() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let name = unique_name();
        let _guard = cleanup(&hv, &name);
        let sub = hv.subscribe(&name).expect("subscribe");
        let other = hv.subscribe("nobody-").expect("subscribe");

        // Arrival is what counts here, not latency: the event loop thread may be starved on a
        // loaded machine.
        let timeout = Duration::from_secs(10);
        hv.define(&test_domain_xml(&name)).expect("define");
        let (ev, dt) = wait_for(&sub, &name, |k| *k == LifecycleKind::Defined, timeout).expect("Defined event");
        assert_eq!(ev.detail, "added");
        eprintln!("test driver: Defined after {dt:?}");
        hv.start(&name).expect("start");
        let (ev, dt) = wait_for(&sub, &name, |k| *k == LifecycleKind::Started, timeout).expect("Started event");
        assert_eq!(ev.detail, "booted");
        eprintln!("test driver: Started after {dt:?}");
        hv.destroy(&name).expect("destroy");
        let (ev, dt) = wait_for(&sub, &name, |k| *k == LifecycleKind::Stopped, timeout).expect("Stopped event");
        assert_eq!(ev.detail, "destroyed");
        eprintln!("test driver: Stopped after {dt:?}");
        hv.undefine(&name).expect("undefine");
        wait_for(&sub, &name, |k| *k == LifecycleKind::Undefined, timeout).expect("Undefined event");

        assert!(other.events.try_recv().is_err(), "a subscription sees only its prefix");
    }

    #[test]
    fn test_driver_dropped_subscription_stops_delivery() {
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let name = unique_name();
        let _guard = cleanup(&hv, &name);
        let sub = hv.subscribe(&name).expect("subscribe");
        drop(sub);
        // Defining after the drop must not crash the event thread (callbacks are gone).
        hv.define(&test_domain_xml(&name)).expect("define");
        let sub = hv.subscribe(&name).expect("subscribe again");
        hv.start(&name).expect("start");
        wait_for(&sub, &name, |k| *k == LifecycleKind::Started, Duration::from_secs(10))
            .expect("Started event after resubscribing");
    }

    /// Sets its flag when dropped, so helper threads stop however the test ends.
    struct StopOnDrop(Arc<AtomicBool>);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// All `test:///default` connections share one event queue: a subscription dropped while
    /// other connections start and stop domains must not stop the events of the next one.
    /// (Without [`hold_shared_test_events`] this lost every event of a round within about a
    /// second, and with it the events of the other tests subscribed at that time.)
    #[test]
    fn test_driver_events_survive_subscriptions_dropped_while_domains_change() {
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let busy: Vec<_> = (0..2)
            .map(|_| {
                let stop = Arc::clone(&stop.0);
                std::thread::spawn(move || {
                    let hv = Libvirt::connect(TEST_URI).expect("test driver");
                    let name = unique_name();
                    let _guard = cleanup(&hv, &name);
                    hv.define(&test_domain_xml(&name)).expect("define");
                    while !stop.load(Ordering::SeqCst) {
                        hv.start(&name).expect("start");
                        hv.destroy(&name).expect("destroy");
                    }
                })
            })
            .collect();
        let hv = Libvirt::connect(TEST_URI).expect("test driver");
        let name = unique_name();
        let _guard = cleanup(&hv, &name);
        hv.define(&test_domain_xml(&name)).expect("define");
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            let sub = hv.subscribe(&name).expect("subscribe");
            hv.start(&name).expect("start");
            wait_for(&sub, &name, |k| *k == LifecycleKind::Started, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("no Started event in round {rounds}"));
            hv.destroy(&name).expect("destroy");
            drop(sub);
            rounds += 1;
        }
        drop(stop);
        for t in busy {
            t.join().expect("a busy thread");
        }
        eprintln!("{rounds} rounds of subscribe, start, event, drop");
    }
}
