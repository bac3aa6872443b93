//! Catalog queries for rollouts: their durable state is what lets a killed vdim be resumed.
//!
//! A rollout's life, as [`RolloutState`] and [`RolloutState::can_become`] allow it:
//!
//! ```text
//!              halt, or its vdim died            resume
//!   running ─────────────────────────► halted ───────────► running
//!     │  all waves healthy ─► succeeded                       │
//!     │  a desktop failed  ─► failed                          │
//!     └─ rollback --image --channel ─► reverted ◄─────────────┘ (from halted too)
//! ```
//!
//! States are stored as their lowercase names, so catalogs of older vdims read the same.

use super::sql::{self, params, FromValue, OptionalExtension, ToValue, Value};
use super::{now, Channel, Result, Tx};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A stored state name this vdim does not know (a newer vdim's, or a damaged row).
#[derive(Debug, thiserror::Error)]
#[error("{what} state '{found}' is not one of {known}")]
pub struct UnknownState {
    what: &'static str,
    found: String,
    known: String,
}

/// A closed set of states stored as lowercase names: parsing, display and SQL in one place.
macro_rules! stored_states {
    ($ty:ident, $what:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownState;
            fn from_str(s: &str) -> std::result::Result<$ty, UnknownState> {
                $ty::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| UnknownState {
                    what: $what,
                    found: s.escape_default().to_string(),
                    known: $ty::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToValue for $ty {
            fn to_value(&self) -> Value {
                Value::Text(self.as_str().to_string())
            }
        }

        impl FromValue for $ty {
            fn from_value(v: &Value) -> std::result::Result<$ty, String> {
                String::from_value(v)?.parse().map_err(|e: UnknownState| e.to_string())
            }
        }
    };
}

/// Where a rollout is; see the module diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Its vdim is moving or soaking desktops wave by wave.
    Running,
    /// Stopped after a wave (by `rollout halt`, or found with its vdim dead); what moved stays.
    Halted,
    /// Every wave healthy; the channel points at the version.
    Succeeded,
    /// A desktop failed its soak; every moved desktop went back.
    Failed,
    /// Undone by an emergency channel rollback.
    Reverted,
}

stored_states!(RolloutState, "rollout", [
    Running => "running",
    Halted => "halted",
    Succeeded => "succeeded",
    Failed => "failed",
    Reverted => "reverted",
]);

impl RolloutState {
    /// Running or halted: the one rollout of its image that `resume` and `rollback` act on.
    pub fn is_open(self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Halted)
    }

    /// Whether a rollout in this state may be put in `next`: only an open rollout changes,
    /// and only a halted one runs again.
    pub fn can_become(self, next: RolloutState) -> bool {
        use RolloutState::*;
        matches!((self, next), (Running, Halted | Succeeded | Failed | Reverted) | (Halted, Running | Reverted))
    }
}

/// Where one desktop of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesktopState {
    /// Picked for a wave, not yet recorded as moving.
    Pending,
    /// Its overlay is being recreated on the new version.
    Moving,
    /// Booted on the new version, watched.
    Soaking,
    /// Ran the soak without a crash, reboot loop or stop.
    Healthy,
    /// Crashed, looped, stopped or had a silent guest agent.
    Failed,
    /// Moved back to the version it had.
    Reverted,
    /// Given to a user before it moved; it follows at logoff.
    Skipped,
}

stored_states!(DesktopState, "rollout desktop", [
    Pending => "pending",
    Moving => "moving",
    Soaking => "soaking",
    Healthy => "healthy",
    Failed => "failed",
    Reverted => "reverted",
    Skipped => "skipped",
]);

impl DesktopState {
    /// Done with for this rollout: not soaked again when a halted rollout resumes.
    pub fn is_settled(self) -> bool {
        matches!(self, DesktopState::Healthy | DesktopState::Reverted)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    pub id: i64,
    #[serde(skip)]
    pub image_id: i64,
    pub image: String,
    pub version: u32,
    pub channel: Channel,
    pub from_version: u32,
    pub state: RolloutState,
    pub waves: String,
    pub soak_ms: u64,
    /// Index of the next wave to run.
    pub wave: u32,
    pub actor: String,
    pub forced: Option<String>,
    pub owner_pid: Option<i64>,
    pub created: String,
    pub updated: String,
    pub report: RolloutOutcome,
}

/// What happened to a rollout beyond its waves (the `report` of `rollout status --json`),
/// filled in as it happens; stored as JSON. Absent parts are left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<Interruption>,
    /// The wave (from 1) in which a desktop failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_wave: Option<u32>,
    /// When libvirt reported the first failure (its event time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_event_at: Option<String>,
    /// When vdim saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
    /// When every moved desktop was back on its previous version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_to_verdict_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Per pool, the in-use desktops that move when their user logs off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_logoff: Option<BTreeMap<String, Vec<String>>>,
}

/// The vdim running a rollout died.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interruption {
    pub pid: Option<i64>,
    /// The wave (from 1) it was in.
    pub wave: u32,
    pub at: String,
}

/// One desktop that failed its soak.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub desktop: String,
    pub how: String,
    /// When it happened (libvirt's event time).
    pub at: String,
    pub detected_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutDesktop {
    pub desktop: String,
    pub pool: String,
    pub wave: u32,
    pub from_version: u32,
    pub state: DesktopState,
    pub detail: String,
    pub at: String,
}

impl RolloutDesktop {
    /// Failed its soak, whether or not it has been moved back since.
    pub fn failed(&self) -> bool {
        self.state == DesktopState::Failed || self.detail.starts_with(FAILED_PREFIX)
    }
}

/// How a reverted desktop's detail starts when it had failed (see [`RolloutDesktop::failed`]).
pub const FAILED_PREFIX: &str = "failed";

const COLS: &str =
    "r.id, r.image_id, i.name, r.version, r.channel, r.from_version, r.state, r.waves, r.soak_ms, r.wave,
     r.actor, r.forced, r.owner_pid, r.created, r.updated, r.report";

fn row(r: &sql::Row) -> sql::Result<Rollout> {
    let ch: String = r.get(4)?;
    let report: String = r.get(15)?;
    let report = serde_json::from_str(&report)
        .map_err(|e| sql::Error::Column { column: "report".into(), problem: e.to_string() })?;
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
        report,
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
        Ok(self.0.query_row(
            "INSERT INTO rollouts (image_id, version, channel, from_version, state, waves, soak_ms, actor, forced, owner_pid, created, updated)
             VALUES (?1, ?2, ?3, ?4, ?11, ?5, ?6, ?7, ?8, ?9, ?10, ?10) RETURNING id",
            params![n.image_id, n.version, n.channel.as_str(), n.from_version, n.waves, n.soak_ms as i64, n.actor, n.forced, std::process::id(), t, RolloutState::Running],
            |r| r.get(0),
        )?)
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
             WHERE (CAST(?1 AS BIGINT) IS NULL OR r.image_id = ?1) ORDER BY r.id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![image_id, limit as i64], row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn running_rollouts(&self) -> Result<Vec<Rollout>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {COLS} FROM rollouts r JOIN images i ON i.id = r.image_id WHERE r.state = 'running'"
        ))?;
        let rows = st.query_map((), row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Puts the rollout in `next` if its current state may become that
    /// ([`RolloutState::can_become`]); false (nothing changed) otherwise, e.g. when a channel
    /// rollback reverted it meanwhile.
    pub fn set_rollout_state(&self, id: i64, next: RolloutState) -> Result<bool> {
        // The names are this enum's own constants, so they can be spelled into the SQL.
        let from: Vec<String> =
            RolloutState::ALL.iter().filter(|s| s.can_become(next)).map(|s| format!("'{s}'")).collect();
        let n = self.0.execute(
            &format!("UPDATE rollouts SET state = ?2, updated = ?3 WHERE id = ?1 AND state IN ({})", from.join(", ")),
            params![id, next, now()],
        )?;
        Ok(n == 1)
    }

    pub fn set_rollout_wave(&self, id: i64, wave: u32) -> Result<()> {
        self.0.execute("UPDATE rollouts SET wave = ?2, updated = ?3 WHERE id = ?1", params![id, wave, now()])?;
        Ok(())
    }

    pub fn set_rollout_owner(&self, id: i64, pid: Option<u32>) -> Result<()> {
        self.0.execute("UPDATE rollouts SET owner_pid = ?2, updated = ?3 WHERE id = ?1", params![id, pid, now()])?;
        Ok(())
    }

    /// Changes the rollout's [`RolloutOutcome`] in this transaction.
    pub fn update_rollout_outcome(&self, id: i64, change: impl FnOnce(&mut RolloutOutcome)) -> Result<()> {
        let mut outcome = self.rollout(id)?.report;
        change(&mut outcome);
        let json = serde_json::to_string(&outcome).expect("an outcome serialises");
        self.0.execute("UPDATE rollouts SET report = ?2, updated = ?3 WHERE id = ?1", params![id, json, now()])?;
        Ok(())
    }

    pub fn add_rollout_desktop(&self, id: i64, desktop: &str, pool: &str, wave: u32, from_version: u32) -> Result<()> {
        self.0.execute(
            "INSERT INTO rollout_desktops (rollout_id, desktop, pool, wave, from_version, state, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?7, ?6)
             ON CONFLICT (rollout_id, desktop) DO UPDATE SET wave = excluded.wave, state = excluded.state, at = excluded.at",
            params![id, desktop, pool, wave, from_version, now(), DesktopState::Pending],
        )?;
        Ok(())
    }

    pub fn set_rollout_desktop(&self, id: i64, desktop: &str, state: DesktopState, detail: &str) -> Result<()> {
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
        Ok(rows.collect::<sql::Result<_>>()?)
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
            st.query_map(params![image_id, channel.as_str()], |r| r.get(0))?.collect::<sql::Result<_>>()?;
        let current = versions.first().copied();
        Ok(versions.into_iter().find(|v| Some(*v) != current))
    }
}

#[cfg(test)]
mod tests {
    use super::super::sql::Engine;
    use super::super::tests::cats;
    use super::*;

    fn one_rollout(tx: &Tx) -> Result<i64> {
        let img = tx.insert_image("a", 1)?;
        tx.insert_version(&img, None, &"0".repeat(64), 1, 1, "t", "")?;
        tx.insert_rollout(&NewRollout {
            image_id: img.id,
            version: 1,
            channel: Channel::Test,
            from_version: 1,
            waves: "1",
            soak_ms: 0,
            actor: "t",
            forced: None,
        })
    }

    #[test]
    fn every_state_is_stored_under_its_lowercase_name_and_parsed_back() {
        for s in RolloutState::ALL {
            assert_eq!(s.as_str().parse::<RolloutState>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in DesktopState::ALL {
            assert_eq!(s.as_str().parse::<DesktopState>().unwrap(), *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let names: Vec<&str> = RolloutState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["running", "halted", "succeeded", "failed", "reverted"]);
    }

    #[test]
    fn an_unknown_state_name_is_refused_with_the_known_ones() {
        let e = "Running".parse::<RolloutState>().unwrap_err().to_string();
        assert_eq!(e, "rollout state 'Running' is not one of running, halted, succeeded, failed, reverted");
        let e = "done\n".parse::<DesktopState>().unwrap_err().to_string();
        assert!(e.starts_with("rollout desktop state 'done\\n' is not one of pending,"), "{e}");
    }

    #[test]
    fn only_an_open_rollout_changes_state_and_only_a_halted_one_runs_again() {
        use RolloutState::*;
        let allowed: Vec<(RolloutState, RolloutState)> = RolloutState::ALL
            .iter()
            .flat_map(|a| RolloutState::ALL.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            [
                (Running, Halted),
                (Running, Succeeded),
                (Running, Failed),
                (Running, Reverted),
                (Halted, Running),
                (Halted, Reverted)
            ]
        );
        assert!(RolloutState::ALL.iter().all(|s| s.is_open() == matches!(s, Running | Halted)));
    }

    #[test]
    fn a_rollout_reverted_meanwhile_is_not_marked_failed_or_succeeded() {
        for (_d, mut c) in cats() {
            c.write(|tx| -> Result<()> {
                let id = one_rollout(tx)?;
                assert_eq!(tx.rollout(id)?.state, RolloutState::Running);
                assert!(tx.set_rollout_state(id, RolloutState::Reverted)?);
                assert!(!tx.set_rollout_state(id, RolloutState::Failed)?);
                assert!(!tx.set_rollout_state(id, RolloutState::Succeeded)?);
                assert!(!tx.set_rollout_state(id, RolloutState::Running)?);
                assert_eq!(tx.rollout(id)?.state, RolloutState::Reverted);
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn the_schema_accepts_exactly_the_states_the_enums_know() {
        for (_d, mut c) in cats() {
            c.write(|tx| -> Result<()> {
                let id = one_rollout(tx)?;
                tx.add_rollout_desktop(id, "vdim-p-001", "p", 0, 1)?;
                for s in RolloutState::ALL {
                    tx.sql().execute("UPDATE rollouts SET state = ?1", [s])?;
                }
                for s in DesktopState::ALL {
                    tx.sql().execute("UPDATE rollout_desktops SET state = ?1", [s])?;
                }
                assert!(tx.sql().execute("UPDATE rollouts SET state = 'paused'", ()).is_err());
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn a_halted_rollout_resumes_and_a_desktop_state_is_stored_typed() {
        for (_d, mut c) in cats() {
            c.write(|tx| -> Result<()> {
                let id = one_rollout(tx)?;
                assert!(tx.set_rollout_state(id, RolloutState::Halted)?);
                assert!(tx.set_rollout_state(id, RolloutState::Running)?);
                tx.add_rollout_desktop(id, "vdim-p-001", "p", 0, 1)?;
                assert_eq!(tx.rollout_desktops(id)?[0].state, DesktopState::Pending);
                tx.set_rollout_desktop(id, "vdim-p-001", DesktopState::Soaking, "")?;
                let raw: String = tx.sql().query_row("SELECT state FROM rollout_desktops", (), |r| r.get(0))?;
                assert_eq!(raw, "soaking");
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn an_outcome_written_by_an_older_vdim_reads_back_with_the_same_json() {
        // The report as vdim wrote it with json! before it was typed.
        let old = serde_json::json!({
            "interrupted": {"pid": 4242, "wave": 1, "at": "2026-01-01T00:00:00.000Z"},
            "failed_wave": 2, "crash_event_at": "t1", "detected_at": "t2",
            "failures": [{"desktop": "vdim-p-001", "how": "crashed (panicked)", "at": "t1", "detected_at": "t2"}],
            "restored_at": "t3", "event_to_verdict_ms": 12, "restore_ms": 3400,
            "finished_at": "t4", "at_logoff": {"p": ["vdim-p-002"]}
        });
        let typed: RolloutOutcome = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(typed.failures[0].how, "crashed (panicked)");
        assert_eq!(serde_json::to_value(&typed).unwrap(), old);
        assert_eq!(serde_json::to_value(RolloutOutcome::default()).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn a_new_rollout_has_an_empty_report_and_updates_keep_earlier_parts() {
        for (_d, mut c) in cats() {
            c.write(|tx| -> Result<()> {
                let id = one_rollout(tx)?;
                assert_eq!(tx.rollout(id)?.report, RolloutOutcome::default());
                tx.update_rollout_outcome(id, |o| o.failed_wave = Some(1))?;
                tx.update_rollout_outcome(id, |o| o.restore_ms = Some(5))?;
                let o = tx.rollout(id)?.report;
                assert_eq!((o.failed_wave, o.restore_ms), (Some(1), Some(5)));
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn an_unknown_rollout_state_in_the_catalog_is_an_error_naming_it() {
        for (_d, mut c) in cats() {
            let e = c
                .write(|tx| {
                    let id = one_rollout(tx)?;
                    // As a newer vdim, or a damaged catalog, could leave it: past the schema's CHECK.
                    match tx.sql().engine() {
                        Engine::Sqlite => tx.sql().execute_batch("PRAGMA ignore_check_constraints = 1")?,
                        Engine::Postgres => {
                            tx.sql().execute_batch("ALTER TABLE rollouts DROP CONSTRAINT rollouts_state_check")?
                        }
                    }
                    tx.sql().execute("UPDATE rollouts SET state = 'paused' WHERE id = ?1", [id])?;
                    tx.rollout(id)
                })
                .expect_err("an unknown state is not read as a rollout");
            let chain = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            assert!(chain.contains("'paused'") && chain.contains("running, halted"), "{chain}");
        }
    }
}
