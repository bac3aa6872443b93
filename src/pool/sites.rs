//! Where desktops run. A desktop without a host runs on the one libvirt of `--connect` and
//! keeps its files in the home, as vdim always did; a desktop on a registered host keeps
//! them in that host's desktop store (a libvirt directory storage pool beside its layer
//! store) and is reached through that host's libvirt only: nothing of it is on this machine.
//!
//! ```text
//!  host hv2 (libvirt at its URI)
//!    <store_path>/<sha256>.qcow2               layers, replicated and read back (replica)
//!    <store_path>-desktops/vdim-p-001.qcow2    its overlay (backing: the layer's path there)
//!                          vdim-p-001.nvram    UEFI variables (libvirt makes them from the template)
//!                          vdim-p-001.serial.log, vdim-p-001.config.iso (identity pools)
//! ```

use super::{PoolError, Result};
use crate::catalog::hosts::Host;
use crate::hypervisor::{Connections, Hypervisor};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A host's desktop store: the storage pool and its directory on the host.
pub fn desktop_store(h: &Host) -> (String, PathBuf) {
    (format!("{}-desktops", h.storage_pool), PathBuf::from(format!("{}-desktops", h.store_path)))
}

/// The files a desktop on a host keeps in its desktop store: overlay, UEFI variables, serial
/// log, config drive.
pub fn desktop_files(desktop: &str) -> [String; 4] {
    [
        format!("{desktop}.qcow2"),
        format!("{desktop}.nvram"),
        format!("{desktop}.serial.log"),
        super::config_drive_name(desktop),
    ]
}

/// A layer's path in a host's layer store.
pub fn layer_on(h: &Host, digest: &str) -> PathBuf {
    PathBuf::from(&h.store_path).join(format!("{digest}.qcow2"))
}

/// The host part of a libvirt URI (`qemu+tls://hv2.example.com:16514/system` -> `hv2.example.com`,
/// `qemu+ssh://root@[fd00::2]/system` -> `fd00::2`): where the host's displays are reached.
pub fn uri_host(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host =
        if let Some(v6) = host_port.strip_prefix('[') { v6.split(']').next()? } else { host_port.split(':').next()? };
    (!host.is_empty()).then(|| host.to_string())
}

/// The hypervisor a desktop is on.
pub enum Hv<'a> {
    Local(&'a dyn Hypervisor),
    Host(Arc<dyn Hypervisor>),
}

impl<'a> Deref for Hv<'a> {
    type Target = dyn Hypervisor + 'a;
    fn deref(&self) -> &Self::Target {
        match self {
            Hv::Local(hv) => *hv,
            Hv::Host(hv) => hv.as_ref(),
        }
    }
}

/// The hosts known when an operation began, and their connections (made on first use).
pub struct Sites<'a> {
    local: &'a dyn Hypervisor,
    links: &'a Connections,
    hosts: BTreeMap<i64, Host>,
    /// Hosts whose desktop store is known to exist (made once per operation).
    stores: Mutex<BTreeSet<i64>>,
}

impl<'a> Sites<'a> {
    pub fn new(local: &'a dyn Hypervisor, links: &'a Connections, hosts: Vec<Host>) -> Sites<'a> {
        Sites { local, links, hosts: hosts.into_iter().map(|h| (h.id, h)).collect(), stores: Mutex::default() }
    }

    pub fn host(&self, id: i64) -> Result<&Host> {
        self.hosts.get(&id).ok_or(PoolError::HostGone(id))
    }

    pub fn host_name(&self, id: Option<i64>) -> Option<String> {
        id.and_then(|i| self.hosts.get(&i)).map(|h| h.name.clone())
    }

    pub fn local(&self) -> &'a dyn Hypervisor {
        self.local
    }

    /// Calls in flight at most: the local host's bound, once per host (each bounds its own).
    pub fn parallel(&self) -> usize {
        (self.local.parallel() * (1 + self.hosts.len())).min(256)
    }

    /// The hypervisor of `host` (none: the local one). A fenced host is never called: it is
    /// powered off, or must be treated as if it were.
    pub fn hv(&self, host: Option<i64>) -> Result<Hv<'a>> {
        let Some(id) = host else { return Ok(Hv::Local(self.local)) };
        let h = self.host(id)?;
        if h.state == "fenced" {
            return Err(PoolError::HostFenced(h.name.clone()));
        }
        Ok(Hv::Host(self.links.get(&h.uri)?))
    }

    /// The host's desktop store, made (a directory storage pool) the first time it is needed.
    pub fn desktop_store(&self, id: i64) -> Result<(String, PathBuf)> {
        let h = self.host(id)?;
        let store = desktop_store(h);
        if !self.stores.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
            self.hv(Some(id))?.ensure_storage_pool(&store.0, &store.1)?;
            self.stores.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        }
        Ok(store)
    }
}

impl Clone for Sites<'_> {
    fn clone(&self) -> Self {
        Sites { local: self.local, links: self.links, hosts: self.hosts.clone(), stores: Mutex::default() }
    }
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: i64,
    pub name: String,
    /// Desktops it holds now (of every pool).
    pub desktops: u32,
    pub max_desktops: Option<u32>,
    /// Why no desktop may go there now (draining, fenced, not answering, the version's
    /// chain not verified there), or none.
    pub refused: Option<String>,
}

/// Where `n` new desktops go: each to the least loaded eligible host (fewest desktops, then
/// name), within its `max_desktops`. An error says why each host was refused or full.
pub fn place(candidates: &[Candidate], n: usize) -> std::result::Result<Vec<i64>, String> {
    let mut load: Vec<(u32, &Candidate)> =
        candidates.iter().filter(|c| c.refused.is_none()).map(|c| (c.desktops, c)).collect();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let best = load
            .iter_mut()
            .filter(|(l, c)| c.max_desktops.is_none_or(|m| *l < m))
            .min_by(|(la, a), (lb, b)| la.cmp(lb).then_with(|| a.name.cmp(&b.name)));
        match best {
            Some((l, c)) => {
                *l += 1;
                out.push(c.id);
            }
            None => {
                let loaded = |c: &Candidate| load.iter().find(|(_, l)| l.id == c.id).map_or(c.desktops, |(n, _)| *n);
                let why: Vec<String> = candidates
                    .iter()
                    .map(|c| match &c.refused {
                        Some(r) => format!("{}: {r}", c.name),
                        None => format!("{}: full ({} of at most {})", c.name, loaded(c), c.max_desktops.unwrap_or(0)),
                    })
                    .collect();
                return Err(format!(
                    "{} of {n} desktops have no host ({})",
                    n - out.len(),
                    if why.is_empty() { "the pool has no hosts".into() } else { why.join("; ") }
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: i64, name: &str, desktops: u32, max: Option<u32>, refused: Option<&str>) -> Candidate {
        Candidate { id, name: name.into(), desktops, max_desktops: max, refused: refused.map(str::to_string) }
    }

    #[test]
    fn desktops_go_to_the_least_loaded_eligible_host_within_its_maximum() {
        let hosts = [host(1, "hv1", 2, None, None), host(2, "hv2", 0, Some(3), None), host(3, "hv3", 0, None, None)];
        // hv2 and hv3 tie at 0 (name decides), then spread until hv2 is full at 3.
        assert_eq!(place(&hosts, 6).unwrap(), vec![2, 3, 2, 3, 1, 2]);
        assert_eq!(place(&hosts, 9).unwrap().iter().filter(|h| **h == 2).count(), 3, "hv2 never past its maximum");
    }

    #[test]
    fn a_hosts_display_address_is_its_uris_host() {
        assert_eq!(uri_host("qemu+tls://hv2.example.com:16514/system").as_deref(), Some("hv2.example.com"));
        assert_eq!(uri_host("qemu+ssh://root@[fd00::2]/system").as_deref(), Some("fd00::2"));
        assert_eq!(uri_host("qemu+tcp://10.77.3.2/system").as_deref(), Some("10.77.3.2"));
        assert_eq!(uri_host("qemu:///system"), None);
    }

    #[test]
    fn refused_hosts_get_nothing_and_the_error_says_why() {
        let hosts = [host(1, "hv1", 0, None, Some("fenced")), host(2, "hv2", 1, Some(2), None)];
        assert_eq!(place(&hosts, 1).unwrap(), vec![2]);
        let e = place(&hosts, 3).unwrap_err();
        assert!(e.contains("2 of 3 desktops have no host"), "{e}");
        assert!(e.contains("hv1: fenced") && e.contains("hv2: full (2 of at most 2)"), "{e}");
        assert!(place(&[], 1).unwrap_err().contains("the pool has no hosts"));
    }
}
