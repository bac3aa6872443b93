//! Catalog queries for thin-client users, their entitlements to pools, and their sessions.
//!
//! Tokens are only ever stored as SHA-256 hashes. The session table's partial unique
//! indexes (migration 4) make "one desktop, one open session" a property of the database,
//! not of the code that inserts sessions.

use super::sql::{self, params, OptionalExtension};
use super::{now, Result, Tx};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct User {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub admin: bool,
    /// When the token stops working (RFC 3339), if ever.
    pub token_expires: Option<String>,
    pub created: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: String,
    #[serde(skip)]
    pub user_id: i64,
    pub user: String,
    pub pool: String,
    pub desktop: String,
    pub created: String,
    pub expires_at: String,
    pub ended: Option<String>,
    pub released: Option<String>,
    #[serde(skip)]
    pub console_token_hash: String,
}

/// A session's row before it is inserted.
pub struct NewSession<'a> {
    pub id: &'a str,
    pub user_id: i64,
    pub pool: &'a str,
    pub desktop: &'a str,
    pub expires_at: &'a str,
    pub console_token_hash: &'a str,
}

/// Desktops of one pool by what they are doing, for metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DesktopCounts {
    pub pool: String,
    pub idle: u64,
    pub in_use: u64,
    pub resetting: u64,
}

const USER_COLS: &str = "id, name, admin, token_expires, created";
const SESSION_COLS: &str = "s.id, s.user_id, u.name, s.pool, s.desktop, s.created, s.expires_at, s.ended, s.released,
     s.console_token_hash";

fn user_row(r: &sql::Row) -> sql::Result<User> {
    Ok(User { id: r.get(0)?, name: r.get(1)?, admin: r.get(2)?, token_expires: r.get(3)?, created: r.get(4)? })
}

fn session_row(r: &sql::Row) -> sql::Result<Session> {
    Ok(Session {
        id: r.get(0)?,
        user_id: r.get(1)?,
        user: r.get(2)?,
        pool: r.get(3)?,
        desktop: r.get(4)?,
        created: r.get(5)?,
        expires_at: r.get(6)?,
        ended: r.get(7)?,
        released: r.get(8)?,
        console_token_hash: r.get(9)?,
    })
}

impl Tx<'_> {
    // ---- users -------------------------------------------------------------------------

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        Ok(self.0.query_row(&format!("SELECT {USER_COLS} FROM users WHERE name = ?1"), [name], user_row).optional()?)
    }

    /// The user holding the token whose hash this is, with the stored hash (for the caller's
    /// constant-time comparison).
    pub fn user_by_token_hash(&self, hash: &str) -> Result<Option<(User, String)>> {
        Ok(self
            .0
            .query_row(&format!("SELECT {USER_COLS}, token_hash FROM users WHERE token_hash = ?1"), [hash], |r| {
                Ok((user_row(r)?, r.get(5)?))
            })
            .optional()?)
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let mut st = self.0.prepare(&format!("SELECT {USER_COLS} FROM users ORDER BY name"))?;
        let rows = st.query_map((), user_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn insert_user(&self, name: &str, admin: bool, token_hash: &str, token_expires: Option<&str>) -> Result<User> {
        let id: i64 = self.0.query_row(
            "INSERT INTO users (name, admin, token_hash, token_expires, created) VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            params![name, admin, token_hash, token_expires, now()],
            |r| r.get(0),
        )?;
        Ok(self.0.query_row(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"), [id], user_row)?)
    }

    /// Deletes the user with their entitlements and session history (the audit log keeps it).
    pub fn delete_user(&self, user_id: i64) -> Result<()> {
        self.0.execute("DELETE FROM users WHERE id = ?1", [user_id])?;
        Ok(())
    }

    // ---- entitlements ------------------------------------------------------------------

    /// `true` when the entitlement is new.
    pub fn entitle(&self, pool_id: i64, user_id: i64) -> Result<bool> {
        Ok(self.0.execute(
            "INSERT INTO entitlements (pool_id, user_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![pool_id, user_id],
        )? == 1)
    }

    /// `true` when there was an entitlement to remove.
    pub fn unentitle(&self, pool_id: i64, user_id: i64) -> Result<bool> {
        Ok(self.0.execute("DELETE FROM entitlements WHERE pool_id = ?1 AND user_id = ?2", params![pool_id, user_id])?
            == 1)
    }

    pub fn is_entitled(&self, pool_id: i64, user_id: i64) -> Result<bool> {
        Ok(self.0.query_row(
            "SELECT EXISTS (SELECT 1 FROM entitlements WHERE pool_id = ?1 AND user_id = ?2)",
            params![pool_id, user_id],
            |r| r.get(0),
        )?)
    }

    /// Names of the pools a user is entitled to, sorted.
    pub fn entitled_pool_names(&self, user_id: i64) -> Result<Vec<String>> {
        let mut st = self.0.prepare(
            "SELECT p.name FROM entitlements e JOIN pools p ON p.id = e.pool_id WHERE e.user_id = ?1 ORDER BY p.name",
        )?;
        let rows = st.query_map([user_id], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Names of the users entitled to a pool, sorted.
    pub fn entitled_user_names(&self, pool_id: i64) -> Result<Vec<String>> {
        let mut st = self.0.prepare(
            "SELECT u.name FROM entitlements e JOIN users u ON u.id = e.user_id WHERE e.pool_id = ?1 ORDER BY u.name",
        )?;
        let rows = st.query_map([pool_id], |r| r.get(0))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- sessions ----------------------------------------------------------------------

    pub fn insert_session(&self, s: &NewSession) -> Result<()> {
        self.0.execute(
            "INSERT INTO sessions (id, user_id, pool, desktop, created, expires_at, console_token_hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![s.id, s.user_id, s.pool, s.desktop, now(), s.expires_at, s.console_token_hash],
        )?;
        Ok(())
    }

    pub fn session(&self, id: &str) -> Result<Option<Session>> {
        Ok(self
            .0
            .query_row(
                &format!("SELECT {SESSION_COLS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = ?1"),
                [id],
                session_row,
            )
            .optional()?)
    }

    fn sessions_where(&self, cond: &str, p: impl sql::Params) -> Result<Vec<Session>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {SESSION_COLS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE {cond} ORDER BY s.created, s.id"
        ))?;
        let rows = st.query_map(p, session_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// The user's open session in a pool (at most one, by the unique index).
    pub fn open_session_of(&self, user_id: i64, pool: &str) -> Result<Option<Session>> {
        Ok(self.sessions_where("s.ended IS NULL AND s.user_id = ?1 AND s.pool = ?2", params![user_id, pool])?.pop())
    }

    /// The open session on a desktop (at most one, by the unique index).
    pub fn open_session_on(&self, desktop: &str) -> Result<Option<Session>> {
        Ok(self.sessions_where("s.ended IS NULL AND s.desktop = ?1", [desktop])?.pop())
    }

    /// The latest session on a desktop, open or not.
    pub fn last_session_on(&self, desktop: &str) -> Result<Option<Session>> {
        Ok(self.sessions_where("s.desktop = ?1", [desktop])?.pop())
    }

    /// Open sessions, all or one user's.
    pub fn open_sessions(&self, user_id: Option<i64>) -> Result<Vec<Session>> {
        self.sessions_where("s.ended IS NULL AND (CAST(?1 AS BIGINT) IS NULL OR s.user_id = ?1)", [user_id])
    }

    /// Open sessions whose `expires_at` is at or before `at` (same RFC 3339 format: string order is time order).
    pub fn expired_sessions(&self, at: &str) -> Result<Vec<Session>> {
        self.sessions_where("s.ended IS NULL AND s.expires_at <= ?1", [at])
    }

    /// Ended sessions whose logoff is not complete yet.
    pub fn unreleased_sessions(&self) -> Result<Vec<Session>> {
        self.sessions_where("s.ended IS NOT NULL AND s.released IS NULL", ())
    }

    /// Ends an open session; `false` when it was not open (already ended, or unknown).
    pub fn end_session(&self, id: &str) -> Result<bool> {
        Ok(self.0.execute("UPDATE sessions SET ended = ?2 WHERE id = ?1 AND ended IS NULL", params![id, now()])? == 1)
    }

    pub fn mark_released(&self, id: &str) -> Result<()> {
        self.0.execute("UPDATE sessions SET released = ?2 WHERE id = ?1 AND released IS NULL", params![id, now()])?;
        Ok(())
    }

    /// Ends (as released) sessions still open on a desktop that was given back without the
    /// broker (`vdim pool release`, a forced pool delete): they no longer hold it.
    pub fn end_stale_sessions_on(&self, desktop: &str) -> Result<usize> {
        let at = now();
        Ok(self.0.execute(
            "UPDATE sessions SET ended = ?2, released = ?2 WHERE desktop = ?1 AND ended IS NULL",
            params![desktop, at],
        )?)
    }

    pub fn set_console_token_hash(&self, id: &str, hash: &str) -> Result<()> {
        self.0.execute("UPDATE sessions SET console_token_hash = ?2 WHERE id = ?1", params![id, hash])?;
        Ok(())
    }

    // ---- metrics -----------------------------------------------------------------------

    pub fn open_session_count(&self) -> Result<u64> {
        Ok(self.0.query_row("SELECT COUNT(*) FROM sessions WHERE ended IS NULL", (), |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn desktop_counts(&self) -> Result<Vec<DesktopCounts>> {
        let mut st = self.0.prepare(
            "SELECT p.name,
                    COUNT(*) FILTER (WHERE d.assigned_to IS NULL AND d.needs_reset = 0),
                    COUNT(*) FILTER (WHERE d.assigned_to IS NOT NULL),
                    COUNT(*) FILTER (WHERE d.assigned_to IS NULL AND d.needs_reset = 1)
             FROM pools p JOIN desktops d ON d.pool_id = p.id GROUP BY p.name ORDER BY p.name",
        )?;
        let rows = st.query_map((), |r| {
            Ok(DesktopCounts {
                pool: r.get(0)?,
                idle: r.get::<_, i64>(1)? as u64,
                in_use: r.get::<_, i64>(2)? as u64,
                resetting: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Rollouts by state (the table of migration 3), for metrics.
    pub fn rollout_state_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut st = self.0.prepare("SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY state")?;
        let rows = st.query_map((), |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::CatalogError;
    use super::*;

    use super::super::tests::cats;

    fn h(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn session<'a>(id: &'a str, user_id: i64, desktop: &'a str, token: &'a str) -> NewSession<'a> {
        NewSession { id, user_id, pool: "p", desktop, expires_at: "2999-01-01T00:00:00Z", console_token_hash: token }
    }

    #[test]
    fn the_database_refuses_one_desktop_in_two_open_sessions() {
        for (_d, mut c) in cats() {
            let (t1, t2) = (h('1'), h('2'));
            let r = c.write(|tx| {
                let a = tx.insert_user("alice", false, &h('a'), None)?;
                let b = tx.insert_user("bob", false, &h('b'), None)?;
                tx.insert_session(&session(&"a".repeat(32), a.id, "vdim-p-001", &t1))?;
                tx.insert_session(&session(&"b".repeat(32), b.id, "vdim-p-001", &t2))
            });
            assert!(matches!(r, Err(CatalogError::Sql(_))), "{r:?}");
            // Once the first one ended, the desktop can be in a new session.
            c.write(|tx| {
                let a = tx.insert_user("alice", false, &h('a'), None)?;
                let b = tx.insert_user("bob", false, &h('b'), None)?;
                tx.insert_session(&session(&"a".repeat(32), a.id, "vdim-p-001", &t1))?;
                assert!(tx.end_session(&"a".repeat(32))?);
                assert!(!tx.end_session(&"a".repeat(32))?, "ending twice reports it was not open");
                tx.insert_session(&session(&"b".repeat(32), b.id, "vdim-p-001", &t2))?;
                assert_eq!(tx.open_session_on("vdim-p-001")?.map(|s| s.user), Some("bob".into()));
                assert_eq!(tx.unreleased_sessions()?.len(), 1);
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn one_open_session_per_user_and_pool() {
        for (_d, mut c) in cats() {
            let r = c.write(|tx| {
                let a = tx.insert_user("alice", false, &h('a'), None)?;
                tx.insert_session(&session(&"a".repeat(32), a.id, "vdim-p-001", &h('1')))?;
                tx.insert_session(&session(&"b".repeat(32), a.id, "vdim-p-002", &h('2')))
            });
            assert!(r.is_err());
        }
    }

    #[test]
    fn tokens_are_found_by_hash_only() {
        for (_d, mut c) in cats() {
            c.write(|tx| {
                tx.insert_user("alice", true, &h('a'), Some("2999-01-01T00:00:00Z"))?;
                let (u, stored) = tx.user_by_token_hash(&h('a'))?.unwrap();
                assert_eq!((u.name.as_str(), u.admin, stored), ("alice", true, h('a')));
                assert!(tx.user_by_token_hash(&h('b'))?.is_none());
                assert!(tx.insert_user("bob", false, "short", None).is_err(), "the schema wants a SHA-256 hex");
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }
}
