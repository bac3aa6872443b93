//! Catalog queries for libvirt hosts and the layers each holds verified.

use super::sql::{self, params, OptionalExtension};
use super::{now, Result, Tx};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub uri: String,
    pub zone: Option<String>,
    pub max_desktops: Option<u32>,
    /// The libvirt storage pool of its layer store, and that pool's directory on the host.
    pub storage_pool: String,
    pub store_path: String,
    /// up, draining or fenced.
    pub state: String,
    pub added: String,
    /// Run (by `sh -c`) when the host stops answering; its success fences the host.
    pub fence_command: Option<String>,
    /// When a probe last got an answer, and how many probes since got none.
    pub seen: Option<String>,
    pub missed: u32,
    pub fenced_at: Option<String>,
}

/// A host's row before it is inserted.
pub struct NewHost<'a> {
    pub name: &'a str,
    pub uri: &'a str,
    pub zone: Option<&'a str>,
    pub max_desktops: Option<u32>,
    pub storage_pool: &'a str,
    pub store_path: &'a str,
    pub fence_command: Option<&'a str>,
}

const HOST_COLS: &str =
    "id, name, uri, zone, max_desktops, storage_pool, store_path, state, added, fence_command, seen, missed, fenced_at";

fn host_row(r: &sql::Row) -> sql::Result<Host> {
    Ok(Host {
        id: r.get(0)?,
        name: r.get(1)?,
        uri: r.get(2)?,
        zone: r.get(3)?,
        max_desktops: r.get(4)?,
        storage_pool: r.get(5)?,
        store_path: r.get(6)?,
        state: r.get(7)?,
        added: r.get(8)?,
        fence_command: r.get(9)?,
        seen: r.get(10)?,
        missed: r.get(11)?,
        fenced_at: r.get(12)?,
    })
}

impl Tx<'_> {
    pub fn hosts(&self) -> Result<Vec<Host>> {
        let mut st = self.0.prepare(&format!("SELECT {HOST_COLS} FROM hosts ORDER BY name"))?;
        let rows = st.query_map((), host_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn host(&self, name: &str) -> Result<Option<Host>> {
        Ok(self.0.query_row(&format!("SELECT {HOST_COLS} FROM hosts WHERE name = ?1"), [name], host_row).optional()?)
    }

    /// The host reached by `uri`, if one is.
    pub fn host_by_uri(&self, uri: &str) -> Result<Option<Host>> {
        Ok(self.0.query_row(&format!("SELECT {HOST_COLS} FROM hosts WHERE uri = ?1"), [uri], host_row).optional()?)
    }

    pub fn insert_host(&self, h: &NewHost) -> Result<Host> {
        let id: i64 = self.0.query_row(
            "INSERT INTO hosts (name, uri, zone, max_desktops, storage_pool, store_path, added, fence_command, seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7) RETURNING id",
            params![h.name, h.uri, h.zone, h.max_desktops, h.storage_pool, h.store_path, now(), h.fence_command],
            |r| r.get(0),
        )?;
        Ok(self.0.query_row(&format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?1"), [id], host_row)?)
    }

    pub fn host_by_id(&self, id: i64) -> Result<Option<Host>> {
        Ok(self.0.query_row(&format!("SELECT {HOST_COLS} FROM hosts WHERE id = ?1"), [id], host_row).optional()?)
    }

    /// `up`, `draining` or `fenced` (`fenced_at` set when fenced, cleared otherwise).
    pub fn set_host_state(&self, id: i64, state: &str) -> Result<()> {
        self.0.execute(
            "UPDATE hosts SET state = ?2, fenced_at = CASE WHEN ?2 = 'fenced' THEN ?3 ELSE NULL END WHERE id = ?1",
            params![id, state, now()],
        )?;
        Ok(())
    }

    /// A probe's outcome: answered (seen now, nothing missed) or one more missed. Returns the
    /// probes missed in a row.
    pub fn record_probe(&self, id: i64, answered: bool) -> Result<u32> {
        if answered {
            self.0.execute("UPDATE hosts SET seen = ?2, missed = 0 WHERE id = ?1", params![id, now()])?;
        } else {
            self.0.execute("UPDATE hosts SET missed = missed + 1 WHERE id = ?1", [id])?;
        }
        Ok(self.0.query_row("SELECT missed FROM hosts WHERE id = ?1", [id], |r| r.get(0))?)
    }

    /// Removes the host and its layer records.
    pub fn delete_host(&self, id: i64) -> Result<()> {
        self.0.execute("DELETE FROM host_layers WHERE host_id = ?1", [id])?;
        self.0.execute("DELETE FROM pool_hosts WHERE host_id = ?1", [id])?;
        self.0.execute("DELETE FROM hosts WHERE id = ?1", [id])?;
        Ok(())
    }

    /// The layers recorded verified on a host, with when.
    pub fn host_layers(&self, host_id: i64) -> Result<Vec<(String, String)>> {
        let mut st = self
            .0
            .prepare("SELECT digest, verified_at FROM host_layers WHERE host_id = ?1 ORDER BY verified_at, digest")?;
        let rows = st.query_map([host_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Whether the host holds a version's whole chain recorded verified: desktops of that
    /// version may be made there (otherwise it is "pending" there).
    pub fn holds_chain(&self, host_id: i64, image: &super::Image, version: u32) -> Result<bool> {
        let held: Vec<String> = self.host_layers(host_id)?.into_iter().map(|(d, _)| d).collect();
        Ok(self.chain(image, version)?.iter().all(|d| held.contains(d)))
    }

    /// Records these layers as read back right from the host now.
    pub fn record_host_layers(&self, host_id: i64, digests: &[&str]) -> Result<()> {
        let at = now();
        for d in digests {
            self.0.execute(
                "INSERT INTO host_layers (host_id, digest, verified_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (host_id, digest) DO UPDATE SET verified_at = excluded.verified_at",
                params![host_id, d, at],
            )?;
        }
        Ok(())
    }

    /// Forgets layers of a host (its copy is gone or read back wrong).
    pub fn forget_host_layers(&self, host_id: i64, digests: &[&str]) -> Result<()> {
        for d in digests {
            self.0.execute("DELETE FROM host_layers WHERE host_id = ?1 AND digest = ?2", params![host_id, d])?;
        }
        Ok(())
    }
}
