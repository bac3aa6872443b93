//! A recording, in-memory [`Hypervisor`]: pool, rollout and dev logic tested without root or
//! libvirtd (`cargo test --lib`), next to the real-libvirt tests that stay.
//!
//! It keeps domain definitions and states, records every call in order, delivers lifecycle
//! events to subscribers the way libvirt does (started, stopped, crashed, rebooted), and lets
//! a test decide how a guest behaves when it boots ([`Boot`], chosen by the layer its disk is
//! backed by, as the real test guest's disk marker does), inject events, and fail chosen calls.
//!
//! Compiled for unit tests and under the `fake` feature only: the shipped binary has no fake
//! hypervisor in it, and nothing can select one by accident.

use super::xml::{cdrom, element_text, find_elements};
use super::{
    DomainState, GraphicsEndpoint, GraphicsKind, Hypervisor, HypervisorError, LifecycleEvent, LifecycleKind,
    Subscription,
};
use std::collections::BTreeMap;
use std::path::Path;
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
}

impl Op {
    /// Calls that change a domain (the others only read).
    pub fn changes(self) -> bool {
        matches!(self, Op::Define | Op::Start | Op::Shutdown | Op::Destroy | Op::Undefine | Op::EjectMedia)
    }
}

/// One recorded call: the domain (the prefix for `List` and `Subscribe`) and, for `Start`,
/// the backing file of the domain's disk at that moment (what the guest boots).
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
        FakeHypervisor { inner: Mutex::default(), parallel, in_flight: AtomicUsize::new(0), peak: AtomicUsize::new(0) }
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
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let latency = self.lock().latency.get(&op).copied();
        if let Some(d) = latency {
            std::thread::sleep(d);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
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

    fn running(inner: &mut Inner, name: &str, op: &'static str) -> Result<(), HypervisorError> {
        match inner.domain(name)?.state {
            DomainState::Running => Ok(()),
            _ => Err(HypervisorError::Libvirt { op, domain: name.into(), message: "domain is not running".into() }),
        }
    }
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
        "fake:///"
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
        Ok(Subscription { events, prefix: prefix.into(), _registration: None })
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
