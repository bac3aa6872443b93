//! The pool service's side of many hosts: where new desktops go, a version copied to a
//! pool's hosts first, desktops leaving a draining or fenced host, and where a thin client
//! reaches a display on a host.

use super::*;

/// A desktop whose reset is due, with its version's layer (digest, virtual size).
type DueReset = (Desktop, String, u64);

/// What leaving a host did to its desktops.
#[derive(Debug, Default, Serialize)]
pub struct Evacuated {
    /// Due to be made on another host (then `moved` or `failed`).
    pub moving: Vec<String>,
    /// Made again on another host (and booted where their pool runs).
    pub moved: Vec<String>,
    /// In use on a draining host: they move at logoff.
    pub at_logoff: Vec<String>,
    /// Persistent desktops of a fenced host: their disk is there, they wait for it.
    pub waiting: Vec<String>,
    pub failed: Vec<Failure>,
}

impl<'a> Pools<'a> {
    /// Where `n` new desktops of a pool go: nowhere but the local libvirt when the pool has
    /// no hosts; else each to the least loaded of its hosts that is up, answering and holds
    /// the version's whole chain verified ([`sites::place`]).
    pub(super) fn place_new(
        &mut self,
        pool: &str,
        hosts: &[i64],
        image: &str,
        version: u32,
        n: usize,
    ) -> Result<Vec<Option<i64>>> {
        if hosts.is_empty() {
            return Ok(vec![None; n]);
        }
        let candidates = self.catalog.read(|tx| -> Result<Vec<sites::Candidate>> {
            let image = tx.image(image)?;
            let load = tx.desktops_per_host()?;
            let mut out = vec![];
            for id in hosts {
                let Some(h) = tx.host_by_id(*id)? else { continue };
                let refused = if h.state != "up" {
                    Some(h.state.clone())
                } else if h.missed > 0 {
                    Some(format!("not answering ({} probes missed)", h.missed))
                } else if !tx.holds_chain(h.id, &image, version)? {
                    Some(format!(
                        "version {version} pending (its chain is not verified there: vdim host sync {})",
                        h.name
                    ))
                } else {
                    None
                };
                out.push(sites::Candidate {
                    id: h.id,
                    desktops: load.get(&h.id).copied().unwrap_or(0),
                    max_desktops: h.max_desktops,
                    name: h.name,
                    refused,
                });
            }
            Ok(out)
        })?;
        let placed =
            sites::place(&candidates, n).map_err(|why| PoolError::Placement { pool: pool.to_string(), why })?;
        Ok(placed.into_iter().map(Some).collect())
    }

    /// The hosts of a new pool: those named, or every host of `zone`; none for neither.
    pub(super) fn resolve_hosts(&mut self, names: &[String], zone: Option<&str>) -> Result<Vec<i64>> {
        self.catalog.read(|tx| -> Result<Vec<i64>> {
            let mut out = vec![];
            for n in names {
                out.push(tx.host(n)?.ok_or_else(|| PoolError::NoHost(n.clone()))?.id);
            }
            if let Some(z) = zone {
                let in_zone: Vec<i64> =
                    tx.hosts()?.into_iter().filter(|h| h.zone.as_deref() == Some(z)).map(|h| h.id).collect();
                if in_zone.is_empty() {
                    return Err(PoolError::NoHost(format!("in zone {z}")));
                }
                out.extend(in_zone);
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    /// Copies a version's chain to each of `hosts` that lacks it verified (so its desktops
    /// can be placed there); a host that cannot take it is left out of placement, which
    /// says why.
    pub(crate) fn replicate_to(&mut self, hosts: &[i64], image: &str, version: u32, reread: bool, actor: &Actor) {
        let names: Vec<String> = hosts.iter().filter_map(|h| self.sites.host_name(Some(*h))).collect();
        let mut service = crate::hosts::Hosts::new(self.home, self.catalog, self.links);
        for n in names {
            if let Err(e) = service.ensure_version(&n, image, version, reread, actor) {
                tracing::warn!(host = %n, image, version, error = %crate::error::message(&e), "version not replicated");
            }
        }
    }

    /// Due desktops of non-persistent pools on a host that is draining or fenced get another
    /// host of their pool before their reset (which makes them there afresh): each to the
    /// least loaded eligible one. What a draining host held is removed there first (a fenced
    /// host is not called: it is off). A desktop no host can take stays where it is, due.
    pub(super) fn move_off_hosts(&mut self, pools: &mut [(Pool, Vec<DueReset>)]) -> Result<()> {
        let leaving: BTreeMap<i64, String> = self
            .catalog
            .read(|tx| tx.hosts())?
            .into_iter()
            .filter(|h| h.state == "draining" || h.state == "fenced")
            .map(|h| (h.id, h.state))
            .collect();
        if leaving.is_empty() {
            return Ok(());
        }
        for (pool, todo) in pools.iter_mut().filter(|(p, _)| !p.persistent) {
            let away: Vec<usize> =
                (0..todo.len()).filter(|i| todo[*i].0.host_id.is_some_and(|h| leaving.contains_key(&h))).collect();
            if away.is_empty() {
                continue;
            }
            let hosts: Vec<i64> = self
                .catalog
                .read(|tx| tx.pool_hosts(pool.id))?
                .into_iter()
                .filter(|h| !leaving.contains_key(h))
                .collect();
            // Each version's chain is checked per host: place per version.
            let mut by_version: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
            for i in away {
                by_version.entry(todo[i].0.version).or_default().push(i);
            }
            for (version, idx) in by_version {
                self.replicate_to(&hosts, &pool.image, version, false, &Actor("vdim".into()));
                let placed = match self.place_new(&pool.name, &hosts, &pool.image, version, idx.len()) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(pool = %pool.name, error = %crate::error::message(&e), "desktops stay on a leaving host");
                        continue;
                    }
                };
                for (i, new) in idx.into_iter().zip(placed) {
                    let new = new.expect("a pool with hosts places on hosts");
                    let d = &todo[i].0;
                    let old = d.host_id.expect("on a leaving host");
                    if leaving.get(&old).is_some_and(|s| s == "draining") {
                        let ds = self.desktops();
                        if let Err(e) =
                            ds.remove_domain(Some(old), &d.name).and_then(|()| ds.remove_host_files(old, &d.name))
                        {
                            tracing::warn!(desktop = %d.name, error = %crate::error::message(&e), "not moved off its draining host");
                            continue;
                        }
                    }
                    let overlay = self.desktops().overlay_for(Some(new), &pool.name, &d.name)?.display().to_string();
                    self.catalog.write(|tx| tx.place_desktop(d.id, new, &overlay))?;
                    tracing::info!(desktop = %d.name, from = ?self.sites.host_name(Some(old)), to = ?self.sites.host_name(Some(new)), "desktop moved to another host");
                    let d = &mut todo[i].0;
                    (d.host_id, d.overlay) = (Some(new), overlay);
                }
            }
        }
        Ok(())
    }

    /// A host's desktops leave it: `fenced` (it is off) ends every session on them and makes
    /// each non-persistent one again on another host of its pool, at once; a persistent one
    /// waits for the host (its disk is there). Otherwise (draining) idle desktops move now and
    /// those in use at their logoff. Returns the desktops made elsewhere, those waiting, and
    /// those that failed (still due: the next heal tries again).
    pub fn evacuate(&mut self, host: i64, fenced: bool, actor: &Actor) -> Result<Evacuated> {
        let (desktops, pools) = self.catalog.read(|tx| -> Result<_> {
            let ds = tx.desktops_on(host)?;
            let pools: BTreeMap<i64, Pool> = tx.pools()?.into_iter().map(|p| (p.id, p)).collect();
            Ok((ds, pools))
        })?;
        let mut names: Vec<String> =
            desktops.iter().filter_map(|d| pools.get(&d.pool_id)).map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        let _locks = self.lock_pools(&names)?;
        let mut out = Evacuated::default();
        let host_name = self.sites.host_name(Some(host)).unwrap_or_default();
        self.catalog.write(|tx| -> Result<()> {
            for d in &desktops {
                let Some(p) = pools.get(&d.pool_id) else { continue };
                let version = d.target.unwrap_or(d.version);
                if p.persistent {
                    if fenced {
                        tx.end_stale_sessions_on(&d.name)?;
                        out.waiting.push(d.name.clone());
                    }
                    continue;
                }
                if fenced {
                    // Its user's session died with the host: ended here, the desktop free again.
                    tx.end_stale_sessions_on(&d.name)?;
                    tx.unassign(d.id)?;
                    tx.mark_reset(d.id, version)?;
                    out.moving.push(d.name.clone());
                } else if tx.claim_for_reset(d.id, version)? {
                    out.moving.push(d.name.clone());
                } else {
                    out.at_logoff.push(d.name.clone());
                }
            }
            tx.audit(Audit {
                actor: &actor.0,
                action: if fenced { "host.failover" } else { "host.drain" },
                detail: json!({"host": host_name, "moving": out.moving, "at_logoff": out.at_logoff, "waiting": out.waiting}),
                ..Default::default()
            })?;
            Ok(())
        })?;
        let done = self.heal_pools(&names, &[])?;
        out.failed = done.failures();
        out.moved = done.ok;
        Ok(out)
    }

    /// Where the broker and thin clients reach a desktop's display: on its host, a display on
    /// every address is reached at the host's own address (its URI's); one on loopback
    /// there is reachable from nowhere else, and says so.
    pub(crate) fn reachable_display(&mut self, desktop: &str, mut e: GraphicsEndpoint) -> Result<GraphicsEndpoint> {
        let d =
            self.catalog.read(|tx| tx.desktop(desktop))?.ok_or_else(|| PoolError::DesktopNotFound(desktop.into()))?;
        let Some(h) = d.host_id else { return Ok(e) };
        let host = self.sites.host(h)?;
        let ip = e.listen.parse::<IpAddr>().ok();
        if ip.is_some_and(|ip| ip.is_loopback()) {
            return Err(PoolError::DisplayOnLoopback { desktop: desktop.into(), host: host.name.clone() });
        }
        if ip.is_some_and(|ip| ip.is_unspecified()) {
            e.listen = sites::uri_host(&host.uri)
                .ok_or_else(|| PoolError::DisplayOnLoopback { desktop: desktop.into(), host: host.name.clone() })?;
        }
        Ok(e)
    }
}
