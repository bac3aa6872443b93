//! Catalog queries for rollouts: their durable state is what lets a killed vdim be resumed.

use super::{now, Channel, Result, Tx};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    pub id: i64,
    #[serde(skip)]
    pub image_id: i64,
    pub image: String,
    pub version: u32,
    pub channel: Channel,
    pub from_version: u32,
    pub state: String,
    pub waves: String,
    pub soak_ms: u64,
    /// Index of the next wave to run.
    pub wave: u32,
    pub actor: String,
    pub forced: Option<String>,
    pub owner_pid: Option<i64>,
    pub created: String,
    pub updated: String,
    pub report: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutDesktop {
    pub desktop: String,
    pub pool: String,
    pub wave: u32,
    pub from_version: u32,
    pub state: String,
    pub detail: String,
    pub at: String,
}

const COLS: &str =
    "r.id, r.image_id, i.name, r.version, r.channel, r.from_version, r.state, r.waves, r.soak_ms, r.wave,
     r.actor, r.forced, r.owner_pid, r.created, r.updated, r.report";

fn row(r: &rusqlite::Row) -> rusqlite::Result<Rollout> {
    let ch: String = r.get(4)?;
    let report: String = r.get(15)?;
    Ok(Rollout {
        id: r.get(0)?,
        image_id: r.get(1)?,
        image: r.get(2)?,
        version: r.get(3)?,
        channel: Channel::parse(&ch).unwrap_or(Channel::Prod),
        from_version: r.get(5)?,
        state: r.get(6)?,
        waves: r.get(7)?,
        soak_ms: r.get::<_, i64>(8)? as u64,
        wave: r.get(9)?,
        actor: r.get(10)?,
        forced: r.get(11)?,
        owner_pid: r.get(12)?,
        created: r.get(13)?,
        updated: r.get(14)?,
        report: serde_json::from_str(&report).unwrap_or_default(),
    })
}

pub struct NewRollout<'a> {
    pub image_id: i64,
    pub version: u32,
    pub channel: Channel,
    pub from_version: u32,
    pub waves: &'a str,
    pub soak_ms: u64,
    pub actor: &'a str,
    pub forced: Option<&'a str>,
}

impl Tx<'_> {
    pub fn insert_rollout(&self, n: &NewRollout) -> Result<i64> {
        let t = now();
        self.0.execute(
            "INSERT INTO rollouts (image_id, version, channel, from_version, state, waves, soak_ms, actor, forced, owner_pid, created, updated)
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
            params![n.image_id, n.version, n.channel.as_str(), n.from_version, n.waves, n.soak_ms as i64, n.actor, n.forced, std::process::id(), t],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    pub fn rollout(&self, id: i64) -> Result<Rollout> {
        Ok(self.0.query_row(
            &format!("SELECT {COLS} FROM rollouts r JOIN images i ON i.id = r.image_id WHERE r.id = ?1"),
            [id],
            row,
        )?)
    }

    /// The rollout of an image that is running or halted, if any.
    pub fn open_rollout(&self, image_id: i64) -> Result<Option<Rollout>> {
        Ok(self
            .0
            .query_row(
                &format!(
                    "SELECT {COLS} FROM rollouts r JOIN images i ON i.id = r.image_id
                     WHERE r.image_id = ?1 AND r.state IN ('running', 'halted') ORDER BY r.id DESC LIMIT 1"
                ),
                [image_id],
                row,
            )
            .optional()?)
    }

    pub fn rollouts(&self, image_id: Option<i64>, limit: usize) -> Result<Vec<Rollout>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {COLS} FROM rollouts r JOIN images i ON i.id = r.image_id
             WHERE (?1 IS NULL OR r.image_id = ?1) ORDER BY r.id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![image_id, limit as i64], row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn running_rollouts(&self) -> Result<Vec<Rollout>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {COLS} FROM rollouts r JOIN images i ON i.id = r.image_id WHERE r.state = 'running'"
        ))?;
        let rows = st.query_map([], row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_rollout_state(&self, id: i64, state: &str) -> Result<()> {
        self.0.execute("UPDATE rollouts SET state = ?2, updated = ?3 WHERE id = ?1", params![id, state, now()])?;
        Ok(())
    }

    pub fn set_rollout_wave(&self, id: i64, wave: u32) -> Result<()> {
        self.0.execute("UPDATE rollouts SET wave = ?2, updated = ?3 WHERE id = ?1", params![id, wave, now()])?;
        Ok(())
    }

    pub fn set_rollout_owner(&self, id: i64, pid: Option<u32>) -> Result<()> {
        self.0.execute("UPDATE rollouts SET owner_pid = ?2, updated = ?3 WHERE id = ?1", params![id, pid, now()])?;
        Ok(())
    }

    /// Merge `patch`'s keys into the rollout's report.
    pub fn merge_rollout_report(&self, id: i64, patch: serde_json::Value) -> Result<()> {
        let mut report = self.rollout(id)?.report;
        if !report.is_object() {
            report = serde_json::json!({});
        }
        if let (Some(r), Some(p)) = (report.as_object_mut(), patch.as_object()) {
            for (k, v) in p {
                r.insert(k.clone(), v.clone());
            }
        }
        self.0.execute(
            "UPDATE rollouts SET report = ?2, updated = ?3 WHERE id = ?1",
            params![id, report.to_string(), now()],
        )?;
        Ok(())
    }

    pub fn add_rollout_desktop(&self, id: i64, desktop: &str, pool: &str, wave: u32, from_version: u32) -> Result<()> {
        self.0.execute(
            "INSERT INTO rollout_desktops (rollout_id, desktop, pool, wave, from_version, state, at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)
             ON CONFLICT (rollout_id, desktop) DO UPDATE SET wave = excluded.wave, state = 'pending', at = excluded.at",
            params![id, desktop, pool, wave, from_version, now()],
        )?;
        Ok(())
    }

    pub fn set_rollout_desktop(&self, id: i64, desktop: &str, state: &str, detail: &str) -> Result<()> {
        self.0.execute(
            "UPDATE rollout_desktops SET state = ?3, detail = ?4, at = ?5 WHERE rollout_id = ?1 AND desktop = ?2",
            params![id, desktop, state, detail, now()],
        )?;
        Ok(())
    }

    pub fn rollout_desktops(&self, id: i64) -> Result<Vec<RolloutDesktop>> {
        let mut st = self.0.prepare(
            "SELECT desktop, pool, wave, from_version, state, detail, at FROM rollout_desktops
             WHERE rollout_id = ?1 ORDER BY wave, desktop",
        )?;
        let rows = st.query_map([id], |r| {
            Ok(RolloutDesktop {
                desktop: r.get(0)?,
                pool: r.get(1)?,
                wave: r.get(2)?,
                from_version: r.get(3)?,
                state: r.get(4)?,
                detail: r.get(5)?,
                at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Did this version finish a rollout to test with at least one desktop, all healthy?
    pub fn passed_test(&self, image_id: i64, version: u32) -> Result<bool> {
        Ok(self.0.query_row(
            "SELECT EXISTS (SELECT 1 FROM rollouts r WHERE r.image_id = ?1 AND r.version = ?2 AND r.channel = 'test'
                AND r.state = 'succeeded'
                AND EXISTS (SELECT 1 FROM rollout_desktops d WHERE d.rollout_id = r.id AND d.state = 'healthy')
                AND NOT EXISTS (SELECT 1 FROM rollout_desktops d WHERE d.rollout_id = r.id AND d.state IN ('failed', 'reverted')))",
            params![image_id, version],
            |r| r.get(0),
        )?)
    }

    pub fn channel_held(&self, image_id: i64, channel: Channel, version: u32) -> Result<bool> {
        Ok(self.0.query_row(
            "SELECT EXISTS (SELECT 1 FROM channel_history WHERE image_id = ?1 AND channel = ?2 AND version = ?3)",
            params![image_id, channel.as_str(), version],
            |r| r.get(0),
        )?)
    }

    /// The version a channel pointed at before its current one.
    pub fn channel_previous(&self, image_id: i64, channel: Channel) -> Result<Option<u32>> {
        let mut st = self
            .0
            .prepare("SELECT version FROM channel_history WHERE image_id = ?1 AND channel = ?2 ORDER BY id DESC")?;
        let versions: Vec<u32> =
            st.query_map(params![image_id, channel.as_str()], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        let current = versions.first().copied();
        Ok(versions.into_iter().find(|v| Some(*v) != current))
    }
}
