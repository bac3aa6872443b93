//! Connections to many libvirt hosts, one [`Hypervisor`] per URI, made on first use and
//! shared by every thread of a process (each one holds up to `parallel` libvirt connections).

use super::{Hypervisor, HypervisorError, Libvirt};
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Makes a host's hypervisor from its URI (libvirt's, or a test's fake).
pub type ConnectFn = dyn Fn(&str) -> Result<Arc<dyn Hypervisor>, HypervisorError> + Send + Sync;

pub struct Connections {
    connect: Arc<ConnectFn>,
    open: Mutex<BTreeMap<String, Arc<dyn Hypervisor>>>,
}

impl Connections {
    /// libvirt connections serving up to `parallel` calls each.
    pub fn libvirt(parallel: usize) -> Connections {
        Connections::new(move |uri| Ok(Arc::new(Libvirt::connect_with(uri, parallel)?) as Arc<dyn Hypervisor>))
    }

    pub fn new(
        connect: impl Fn(&str) -> Result<Arc<dyn Hypervisor>, HypervisorError> + Send + Sync + 'static,
    ) -> Connections {
        Connections { connect: Arc::new(connect), open: Mutex::new(BTreeMap::new()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<dyn Hypervisor>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host's hypervisor, connected now unless it already is.
    pub fn get(&self, uri: &str) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
        if let Some(hv) = self.map().get(uri) {
            return Ok(hv.clone());
        }
        let hv = (self.connect)(uri)?;
        // Two threads may connect at once: the first one kept wins.
        Ok(self.map().entry(uri.to_string()).or_insert(hv).clone())
    }

    /// Drops the kept connection of a host (it died): the next use connects afresh.
    pub fn forget(&self, uri: &str) {
        self.map().remove(uri);
    }

    /// Whether the host answers a fresh connection and a call within `timeout`. The attempt
    /// runs on a thread of its own: a host whose link is down holds a TCP connect for minutes,
    /// and a probe must say "no answer" in seconds (the thread ends when the OS gives up).
    pub fn probe(&self, uri: &str, timeout: Duration) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        let connect = self.connect.clone();
        let uri_owned = uri.to_string();
        std::thread::Builder::new()
            .name("vdim-probe".into())
            .spawn(move || {
                let answer = connect(&uri_owned).and_then(|hv| hv.list("vdim-").map(drop));
                let _ = tx.send(answer.map_err(|e| crate::error::message(&e)));
            })
            .map_err(|e| format!("cannot start a probe thread: {e}"))?;
        match rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f32())),
        }
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("open", &self.map().keys().collect::<Vec<_>>()).finish()
    }
}
