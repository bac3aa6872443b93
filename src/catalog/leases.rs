//! Catalog queries for leases (which broker leads, [`crate::leader`]) and for the heartbeat
//! of a rollout's driver. Every change is a compare-and-set on what was read, so exactly one
//! of several brokers wins, whatever the engine's isolation level.

use super::sql::{self, params, OptionalExtension};
use super::{Result, Tx};
use serde::Serialize;

/// One lease: who holds it, in which term, until when (milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub holder: String,
    pub term: i64,
    pub expires_ms: i64,
}

/// Who drives a running rollout, and when it last said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Driver {
    pub rollout: i64,
    /// `host:pid:suffix` ([`crate::leader::Holder`]); none in rows of an older vdim.
    pub owner: Option<String>,
    pub pid: Option<i64>,
    pub seen_ms: Option<i64>,
}

impl Tx<'_> {
    pub fn lease(&self, name: &str) -> Result<Option<Lease>> {
        Ok(self
            .0
            .query_row("SELECT holder, term, expires_ms FROM leases WHERE name = ?1", [name], |r| {
                Ok(Lease { holder: r.get(0)?, term: r.get(1)?, expires_ms: r.get(2)? })
            })
            .optional()?)
    }

    /// Takes a lease nobody ever held; false when someone took it first.
    pub fn insert_lease(&self, name: &str, new: &Lease) -> Result<bool> {
        let n = self.0.execute(
            "INSERT INTO leases (name, holder, term, expires_ms) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO NOTHING",
            params![name, new.holder, new.term, new.expires_ms],
        )?;
        Ok(n == 1)
    }

    /// Replaces the lease `seen` with `new`, only if it is still `seen` (same holder and term).
    pub fn replace_lease(&self, name: &str, seen: &Lease, new: &Lease) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE leases SET holder = ?4, term = ?5, expires_ms = ?6 WHERE name = ?1 AND holder = ?2 AND term = ?3",
            params![name, seen.holder, seen.term, new.holder, new.term, new.expires_ms],
        )?;
        Ok(n == 1)
    }

    /// Ends `holder`'s lease now (a broker shutting down), so another takes over at once.
    pub fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.0.execute("UPDATE leases SET expires_ms = 0 WHERE name = ?1 AND holder = ?2", params![name, holder])?;
        Ok(())
    }

    /// The drivers of every running rollout.
    pub fn rollout_drivers(&self) -> Result<Vec<Driver>> {
        let mut st =
            self.0.prepare("SELECT id, owner, owner_pid, owner_seen_ms FROM rollouts WHERE state = 'running'")?;
        let rows = st.query_map((), |r| {
            Ok(Driver { rollout: r.get(0)?, owner: r.get(1)?, pid: r.get(2)?, seen_ms: r.get(3)? })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// The driver of one rollout, whatever its state.
    pub fn rollout_driver(&self, id: i64) -> Result<Driver> {
        Ok(self.0.query_row("SELECT id, owner, owner_pid, owner_seen_ms FROM rollouts WHERE id = ?1", [id], |r| {
            Ok(Driver { rollout: r.get(0)?, owner: r.get(1)?, pid: r.get(2)?, seen_ms: r.get(3)? })
        })?)
    }

    /// Makes `owner` (process `pid`) the rollout's driver if its driver is still `seen`
    /// (owner and last beat as read); false when another process changed it meanwhile.
    pub fn claim_rollout(&self, seen: &Driver, owner: &str, pid: u32, now_ms: i64) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE rollouts SET owner = ?4, owner_pid = ?5, owner_seen_ms = ?6
             WHERE id = ?1 AND COALESCE(owner, '') = ?2 AND COALESCE(owner_seen_ms, -1) = ?3",
            params![seen.rollout, seen.owner.as_deref().unwrap_or(""), seen.seen_ms.unwrap_or(-1), owner, pid, now_ms],
        )?;
        Ok(n == 1)
    }

    /// The driver's heartbeat; false when `owner` no longer drives the rollout (it was
    /// adopted, or it ended).
    pub fn beat_rollout(&self, id: i64, owner: &str, now_ms: i64) -> Result<bool> {
        let n = self.0.execute(
            "UPDATE rollouts SET owner_seen_ms = ?3 WHERE id = ?1 AND owner = ?2",
            params![id, owner, now_ms],
        )?;
        Ok(n == 1)
    }

    /// The rollout has no driver (its process is on a machine it will never run on again).
    pub fn forget_rollout_driver(&self, id: i64) -> Result<()> {
        self.0
            .execute("UPDATE rollouts SET owner = NULL, owner_pid = NULL, owner_seen_ms = NULL WHERE id = ?1", [id])?;
        Ok(())
    }

    /// `owner` lets go of the rollout (it ended or halted); nothing if another drives it.
    pub fn let_go_rollout(&self, id: i64, owner: &str) -> Result<()> {
        self.0.execute(
            "UPDATE rollouts SET owner = NULL, owner_pid = NULL, owner_seen_ms = NULL WHERE id = ?1 AND owner = ?2",
            params![id, owner],
        )?;
        Ok(())
    }
}
