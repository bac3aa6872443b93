//! Catalog queries for the consoles of sessions: which one is current. A session may have a
//! console through any broker on the catalog; the newest takes over, so the number lives here.

use super::sql::{params, OptionalExtension};
use super::{Result, Tx};

impl Tx<'_> {
    /// A new console of an open session: its number, one more than the last one's; `None` when
    /// the session is not open.
    pub fn take_console(&self, session: &str) -> Result<Option<i64>> {
        Ok(self
            .0
            .query_row(
                "UPDATE sessions SET console_generation = console_generation + 1
                 WHERE id = ?1 AND ended IS NULL RETURNING console_generation",
                params![session],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The number of the newest console of `session`, if the session exists.
    pub fn current_console(&self, session: &str) -> Result<Option<i64>> {
        Ok(self
            .0
            .query_row("SELECT console_generation FROM sessions WHERE id = ?1", params![session], |r| r.get(0))
            .optional()?)
    }
}
