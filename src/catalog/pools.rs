//! Catalog queries for pools and their desktops.

use super::sql::{self, params, OptionalExtension};
use super::{now, Channel, Result, Tx};
use crate::identity::{DomainJoin, Identity};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    #[serde(skip)]
    pub image_id: i64,
    pub image: String,
    pub channel: Channel,
    pub version: u32,
    pub pinned: Option<u32>,
    pub size: u32,
    pub profile: String,
    pub persistent: bool,
    pub virt_type: String,
    /// The IP address its desktops' displays (SPICE, VNC) listen on.
    pub display_listen: String,
    /// Plaintext SPICE off loopback, as the administrator asked with `--insecure-display`.
    pub insecure_display: bool,
    pub running: bool,
    pub created: String,
    /// Each desktop gets a config drive with its own hostname (and domain join).
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Desktop {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub pool_id: i64,
    pub index: u32,
    pub name: String,
    /// Relative to the vdim home.
    pub overlay: String,
    pub version: u32,
    pub target: Option<u32>,
    pub needs_reset: bool,
    pub assigned_to: Option<String>,
    pub assigned_at: Option<String>,
    /// The domain UUID vdim gave it (desktops made before vdim chose them have none).
    pub uuid: Option<String>,
    /// The host it runs on; none: the one libvirt of `--connect`, files in the home.
    #[serde(skip)]
    pub host_id: Option<i64>,
}

const POOL_COLS: &str = "p.id, p.name, p.image_id, i.name, p.channel, p.version, p.pinned, p.size, p.profile,
     p.persistent, p.virt_type, p.running, p.created, p.display_listen,
     p.insecure_display, p.hostname_pattern, p.join_domain, p.join_ou, p.join_credentials, p.user_data";

fn pool_row(r: &sql::Row) -> sql::Result<Pool> {
    let channel: String = r.get(4)?;
    Ok(Pool {
        id: r.get(0)?,
        name: r.get(1)?,
        image_id: r.get(2)?,
        image: r.get(3)?,
        channel: Channel::parse(&channel).unwrap_or(Channel::Prod),
        version: r.get(5)?,
        pinned: r.get(6)?,
        size: r.get(7)?,
        profile: r.get(8)?,
        persistent: r.get(9)?,
        virt_type: r.get(10)?,
        running: r.get(11)?,
        created: r.get(12)?,
        display_listen: r.get(13)?,
        insecure_display: r.get(14)?,
        identity: identity_cols(r, 15)?,
    })
}

/// The identity columns from `at` on: pattern, domain, OU, credentials path, user data path.
fn identity_cols(r: &sql::Row, at: usize) -> sql::Result<Option<Identity>> {
    let Some(hostname_pattern) = r.get::<_, Option<String>>(at)? else { return Ok(None) };
    let domain: Option<String> = r.get(at + 1)?;
    let credentials: Option<String> = r.get(at + 3)?;
    let join = match (domain, credentials) {
        (Some(domain), Some(credentials)) => {
            Some(DomainJoin { domain, ou: r.get(at + 2)?, credentials: credentials.into() })
        }
        _ => None,
    };
    let user_data: Option<String> = r.get(at + 4)?;
    Ok(Some(Identity { hostname_pattern, join, user_data: user_data.map(Into::into) }))
}

fn desktop_row(r: &sql::Row) -> sql::Result<Desktop> {
    Ok(Desktop {
        id: r.get(0)?,
        pool_id: r.get(1)?,
        index: r.get(2)?,
        name: r.get(3)?,
        overlay: r.get(4)?,
        version: r.get(5)?,
        target: r.get(6)?,
        needs_reset: r.get(7)?,
        assigned_to: r.get(8)?,
        assigned_at: r.get(9)?,
        uuid: r.get(10)?,
        host_id: r.get(11)?,
    })
}

const DESKTOP_COLS: &str =
    "id, pool_id, idx, name, overlay, version, target, needs_reset, assigned_to, assigned_at, uuid, host_id";

/// A new pool's row, before its desktops are added.
pub struct NewPool<'a> {
    pub name: &'a str,
    pub image_id: i64,
    pub channel: Channel,
    pub version: u32,
    pub size: u32,
    pub profile: &'a str,
    pub persistent: bool,
    pub virt_type: &'a str,
    /// An IP address, checked by the caller (it goes into domain XML).
    pub display_listen: &'a str,
    pub insecure_display: bool,
    pub identity: Option<&'a Identity>,
}

/// A new desktop's row.
pub struct NewDesktop<'a> {
    pub index: u32,
    pub name: &'a str,
    /// Relative to the vdim home; on a host, the path there.
    pub overlay: &'a str,
    pub version: u32,
    pub uuid: &'a str,
    pub host_id: Option<i64>,
}

impl Tx<'_> {
    pub fn pool(&self, name: &str) -> Result<Option<Pool>> {
        Ok(self
            .0
            .query_row(
                &format!("SELECT {POOL_COLS} FROM pools p JOIN images i ON i.id = p.image_id WHERE p.name = ?1"),
                [name],
                pool_row,
            )
            .optional()?)
    }

    pub fn pools(&self) -> Result<Vec<Pool>> {
        let mut st = self
            .0
            .prepare(&format!("SELECT {POOL_COLS} FROM pools p JOIN images i ON i.id = p.image_id ORDER BY p.name"))?;
        let rows = st.query_map((), pool_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn pools_of_image(&self, image_id: i64) -> Result<Vec<Pool>> {
        Ok(self.pools()?.into_iter().filter(|p| p.image_id == image_id).collect())
    }

    pub fn insert_pool(&self, p: &NewPool) -> Result<i64> {
        let join = p.identity.and_then(|i| i.join.as_ref());
        let id: i64 = self.0.query_row(
            "INSERT INTO pools (name, image_id, channel, version, size, profile, persistent, virt_type, created,
                                display_listen, insecure_display, hostname_pattern, join_domain, join_ou,
                                join_credentials, user_data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) RETURNING id",
            params![
                p.name,
                p.image_id,
                p.channel.as_str(),
                p.version,
                p.size,
                p.profile,
                p.persistent,
                p.virt_type,
                now(),
                p.display_listen,
                p.insecure_display,
                p.identity.map(|i| &i.hostname_pattern),
                join.map(|j| &j.domain),
                join.and_then(|j| j.ou.as_ref()),
                join.map(|j| j.credentials.to_string_lossy()),
                p.identity.and_then(|i| i.user_data.as_ref()).map(|u| u.to_string_lossy()),
            ],
            |r| r.get(0),
        )?;
        self.record_pool_version(id, p.version, "create")?;
        Ok(id)
    }

    pub fn record_pool_version(&self, pool_id: i64, version: u32, reason: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO pool_history (pool_id, version, reason, at) VALUES (?1, ?2, ?3, ?4)",
            params![pool_id, version, reason, now()],
        )?;
        Ok(())
    }

    pub fn pool_history(&self, pool_id: i64) -> Result<Vec<u32>> {
        let mut st = self.0.prepare("SELECT version FROM pool_history WHERE pool_id = ?1 ORDER BY id")?;
        let rows = st.query_map([pool_id], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn set_pool_version(&self, pool_id: i64, version: u32, pinned: Option<u32>) -> Result<()> {
        self.0
            .execute("UPDATE pools SET version = ?2, pinned = ?3 WHERE id = ?1", params![pool_id, version, pinned])?;
        Ok(())
    }

    pub fn set_pool_pin(&self, pool_id: i64, pinned: Option<u32>) -> Result<()> {
        self.0.execute("UPDATE pools SET pinned = ?2 WHERE id = ?1", params![pool_id, pinned])?;
        Ok(())
    }

    pub fn set_pool_running(&self, pool_id: i64, running: bool) -> Result<()> {
        self.0.execute("UPDATE pools SET running = ?2 WHERE id = ?1", params![pool_id, running])?;
        Ok(())
    }

    pub fn set_pool_size(&self, pool_id: i64, size: u32) -> Result<()> {
        self.0.execute("UPDATE pools SET size = ?2 WHERE id = ?1", params![pool_id, size])?;
        Ok(())
    }

    pub fn delete_pool(&self, pool_id: i64) -> Result<()> {
        self.0.execute("DELETE FROM desktops WHERE pool_id = ?1", [pool_id])?;
        self.0.execute("DELETE FROM pool_hosts WHERE pool_id = ?1", [pool_id])?;
        self.0.execute("DELETE FROM pool_history WHERE pool_id = ?1", [pool_id])?;
        self.0.execute("DELETE FROM pools WHERE id = ?1", [pool_id])?;
        Ok(())
    }

    pub fn insert_desktop(&self, pool_id: i64, d: &NewDesktop) -> Result<()> {
        self.0.execute(
            "INSERT INTO desktops (pool_id, idx, name, overlay, version, uuid, host_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![pool_id, d.index, d.name, d.overlay, d.version, d.uuid, d.host_id],
        )?;
        Ok(())
    }

    /// Moves a desktop to another host (its overlay path there); its reset is due, so the
    /// next heal makes it there afresh.
    pub fn place_desktop(&self, desktop_id: i64, host_id: i64, overlay: &str) -> Result<()> {
        self.0.execute(
            "UPDATE desktops SET host_id = ?2, overlay = ?3, needs_reset = 1 WHERE id = ?1",
            params![desktop_id, host_id, overlay],
        )?;
        Ok(())
    }

    /// The desktops on a host, of every pool.
    pub fn desktops_on(&self, host_id: i64) -> Result<Vec<Desktop>> {
        let mut st =
            self.0.prepare(&format!("SELECT {DESKTOP_COLS} FROM desktops WHERE host_id = ?1 ORDER BY name"))?;
        let rows = st.query_map([host_id], desktop_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// How many desktops each host holds.
    pub fn desktops_per_host(&self) -> Result<std::collections::BTreeMap<i64, u32>> {
        let mut st =
            self.0.prepare("SELECT host_id, count(*) FROM desktops WHERE host_id IS NOT NULL GROUP BY host_id")?;
        let rows = st.query_map((), |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// The hosts a pool's desktops may go to (none: the one libvirt of `--connect`).
    pub fn pool_hosts(&self, pool_id: i64) -> Result<Vec<i64>> {
        let mut st = self.0.prepare("SELECT host_id FROM pool_hosts WHERE pool_id = ?1 ORDER BY host_id")?;
        let rows = st.query_map([pool_id], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn set_pool_hosts(&self, pool_id: i64, hosts: &[i64]) -> Result<()> {
        self.0.execute("DELETE FROM pool_hosts WHERE pool_id = ?1", [pool_id])?;
        for h in hosts {
            self.0.execute("INSERT INTO pool_hosts (pool_id, host_id) VALUES (?1, ?2)", params![pool_id, h])?;
        }
        Ok(())
    }

    pub fn delete_desktop(&self, id: i64) -> Result<()> {
        self.0.execute("DELETE FROM desktops WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn desktops(&self, pool_id: i64) -> Result<Vec<Desktop>> {
        let mut st = self.0.prepare(&format!("SELECT {DESKTOP_COLS} FROM desktops WHERE pool_id = ?1 ORDER BY idx"))?;
        let rows = st.query_map([pool_id], desktop_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn desktop(&self, name: &str) -> Result<Option<Desktop>> {
        Ok(self
            .0
            .query_row(&format!("SELECT {DESKTOP_COLS} FROM desktops WHERE name = ?1"), [name], desktop_row)
            .optional()?)
    }

    /// The desktop must get a fresh overlay on `version` before use; `target` cleared.
    pub fn mark_reset(&self, desktop_id: i64, version: u32) -> Result<()> {
        self.0.execute(
            "UPDATE desktops SET version = ?2, target = NULL, needs_reset = 1 WHERE id = ?1",
            params![desktop_id, version],
        )?;
        Ok(())
    }

    /// `mark_reset`, only while the desktop is still unassigned: the check and the mark are
    /// one statement, so a desktop the broker gives away meanwhile is never claimed.
    /// Returns whether it was claimed.
    pub fn claim_for_reset(&self, desktop_id: i64, version: u32) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE desktops SET version = ?2, target = NULL, needs_reset = 1 WHERE id = ?1 AND assigned_to IS NULL",
            params![desktop_id, version],
        )?;
        Ok(n == 1)
    }

    /// Remove a desktop's row only while it is unassigned; returns whether it was removed.
    pub fn delete_idle_desktop(&self, id: i64) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM desktops WHERE id = ?1 AND assigned_to IS NULL", [id])? == 1)
    }

    /// The first desktop of the pool that is assigned now, with its user.
    pub fn first_assigned(&self, pool_id: i64) -> Result<Option<(String, String)>> {
        Ok(self
            .0
            .query_row(
                "SELECT name, assigned_to FROM desktops WHERE pool_id = ?1 AND assigned_to IS NOT NULL ORDER BY idx LIMIT 1",
                [pool_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn clear_reset(&self, desktop_id: i64) -> Result<()> {
        self.0.execute("UPDATE desktops SET needs_reset = 0 WHERE id = ?1", [desktop_id])?;
        Ok(())
    }

    pub fn set_target(&self, desktop_id: i64, target: Option<u32>) -> Result<()> {
        self.0.execute("UPDATE desktops SET target = ?2 WHERE id = ?1", params![desktop_id, target])?;
        Ok(())
    }

    /// Atomically give the first idle, clean desktop of a pool to `user`. The UPDATE's
    /// WHERE clause re-checks idleness, so two racing callers never get the same desktop.
    pub fn assign_idle(&self, pool_id: i64, user: &str) -> Result<Option<Desktop>> {
        let id: Option<i64> = self
            .0
            .query_row(
                "UPDATE desktops SET assigned_to = ?2, assigned_at = ?3
                 WHERE id = (SELECT id FROM desktops WHERE pool_id = ?1 AND assigned_to IS NULL AND needs_reset = 0
                               -- never on a host that is draining, fenced or not answering
                               AND (host_id IS NULL OR host_id IN (SELECT id FROM hosts WHERE state = 'up' AND missed = 0))
                             ORDER BY idx LIMIT 1)
                   AND assigned_to IS NULL
                 RETURNING id",
                params![pool_id, user, now()],
                |r| r.get(0),
            )
            .optional()?;
        match id {
            Some(id) => Ok(Some(self.0.query_row(
                &format!("SELECT {DESKTOP_COLS} FROM desktops WHERE id = ?1"),
                [id],
                desktop_row,
            )?)),
            None => Ok(None),
        }
    }

    pub fn assign(&self, desktop_id: i64, user: &str) -> Result<()> {
        self.0.execute(
            "UPDATE desktops SET assigned_to = ?2, assigned_at = ?3 WHERE id = ?1",
            params![desktop_id, user, now()],
        )?;
        Ok(())
    }

    pub fn unassign(&self, desktop_id: i64) -> Result<()> {
        self.0.execute("UPDATE desktops SET assigned_to = NULL, assigned_at = NULL WHERE id = ?1", [desktop_id])?;
        Ok(())
    }

    /// Versions of `image` that pools run, are pinned at, move to, or may roll back to.
    pub fn versions_used_by_pools(&self, image_id: i64, window: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for p in self.pools_of_image(image_id)? {
            out.push(p.version);
            out.extend(p.pinned);
            for d in self.desktops(p.id)? {
                out.push(d.version);
                out.extend(d.target);
            }
            let mut seen: Vec<u32> = Vec::new();
            for v in self.pool_history(p.id)?.into_iter().rev() {
                if !seen.contains(&v) {
                    seen.push(v);
                    if seen.len() == window {
                        break;
                    }
                }
            }
            out.extend(seen);
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::tests::cats;
    use crate::catalog::CatalogError;

    /// A pool "p" of two idle desktops on version 1 of image "a"; returns the pool id.
    pub(crate) fn pool_of_two(tx: &Tx) -> Result<i64> {
        let img = tx.insert_image("a", 1)?;
        tx.insert_version(&img, None, &"0".repeat(64), 1, 1, "t", "")?;
        tx.insert_version(&img, Some(1), &"1".repeat(64), 1, 1, "t", "")?;
        let id = tx.insert_pool(&NewPool {
            name: "p",
            image_id: img.id,
            channel: Channel::Prod,
            version: 1,
            size: 2,
            profile: "x",
            persistent: false,
            virt_type: "qemu",
            display_listen: "127.0.0.1",
            insecure_display: false,
            identity: None,
        })?;
        for i in 1..=2 {
            let (name, overlay) = (format!("vdim-p-00{i}"), format!("desktops/p/vdim-p-00{i}.qcow2"));
            let uuid = crate::identity::new_uuid();
            tx.insert_desktop(
                id,
                &NewDesktop { index: i, name: &name, overlay: &overlay, version: 1, uuid: &uuid, host_id: None },
            )?;
        }
        Ok(id)
    }

    #[test]
    fn a_pools_identity_and_its_desktops_uuids_are_kept() {
        for (_dir, mut cat) in cats() {
            let identity = Identity {
                hostname_pattern: "FIN-{n}".into(),
                join: Some(DomainJoin {
                    domain: "corp.example.com".into(),
                    ou: Some("OU=VDI,DC=corp,DC=example,DC=com".into()),
                    credentials: "/root/join.cred".into(),
                }),
                user_data: Some("/root/user-data".into()),
            };
            let (pool, desktops) = cat
                .write(|tx| -> Result<_> {
                    let id = pool_of_two(tx)?;
                    let img = tx.image("a")?;
                    let with = tx.insert_pool(&NewPool {
                        name: "q",
                        image_id: img.id,
                        channel: Channel::Prod,
                        version: 1,
                        size: 1,
                        profile: "x",
                        persistent: false,
                        virt_type: "qemu",
                        display_listen: "127.0.0.1",
                        insecure_display: false,
                        identity: Some(&identity),
                    })?;
                    assert_ne!(id, with);
                    assert_eq!(tx.pool("p")?.unwrap().identity, None);
                    Ok((tx.pool("q")?.unwrap(), tx.desktops(id)?))
                })
                .unwrap();
            assert_eq!(pool.identity, Some(identity));
            assert!(desktops.iter().all(|d| d.uuid.as_ref().is_some_and(|u| u.len() == 36)));
            assert_ne!(desktops[0].uuid, desktops[1].uuid);
        }
    }

    #[test]
    fn a_desktop_the_broker_assigned_after_the_plan_is_not_claimed() {
        for (_d, mut c) in cats() {
            let id = c.write(pool_of_two).unwrap();
            // The plan: every idle desktop moves.
            let plan: Vec<Desktop> = c.read(|tx| tx.desktops(id)).unwrap();
            assert!(plan.iter().all(|d| d.assigned_to.is_none()));
            // The broker's assignment, in its own transaction, takes the first one.
            let given = c.write(|tx| tx.assign_idle(id, "alice")).unwrap().unwrap();
            assert_eq!(given.name, "vdim-p-001");
            let claimed: Vec<String> = c
                .write(|tx| -> Result<Vec<String>> {
                    let mut out = vec![];
                    for d in &plan {
                        if tx.claim_for_reset(d.id, 2)? {
                            out.push(d.name.clone());
                        }
                    }
                    Ok(out)
                })
                .unwrap();
            assert_eq!(claimed, ["vdim-p-002"]);
            let now = c.read(|tx| tx.desktops(id)).unwrap();
            assert_eq!((now[0].version, now[0].needs_reset, now[0].assigned_to.as_deref()), (1, false, Some("alice")));
            assert_eq!((now[1].version, now[1].needs_reset), (2, true));
        }
    }

    #[test]
    fn shrink_and_stop_see_an_assignment_made_after_their_look() {
        for (_d, mut c) in cats() {
            let id = c.write(pool_of_two).unwrap();
            let plan: Vec<Desktop> = c.read(|tx| tx.desktops(id)).unwrap();
            assert_eq!(c.read(|tx| tx.first_assigned(id)).unwrap(), None);
            c.write(|tx| tx.assign_idle(id, "alice")).unwrap();
            assert_eq!(c.read(|tx| tx.first_assigned(id)).unwrap(), Some(("vdim-p-001".into(), "alice".into())));
            let removed = c.write(|tx| tx.delete_idle_desktop(plan[0].id)).unwrap();
            assert!(!removed, "alice's desktop must not be removed");
            assert!(c.write(|tx| tx.delete_idle_desktop(plan[1].id)).unwrap());
            let left =
                c.read(|tx| Ok::<_, CatalogError>(tx.desktops(id)?.into_iter().map(|d| d.name).collect::<Vec<_>>()));
            assert_eq!(left.unwrap(), ["vdim-p-001"]);
        }
    }
}
