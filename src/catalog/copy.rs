//! Every row of one catalog into another of the same schema version, whichever the engines:
//! a PostgreSQL catalog's backup (into a SQLite file), a restore onto PostgreSQL.

use super::sql::{Result, Tx};

/// Every table, parents before the tables that refer to them. A migration that adds a
/// table adds it here (a test compares this list with the schema).
pub(super) const TABLES: &[&str] = &[
    "images",
    "versions",
    "channels",
    "channel_history",
    "drafts",
    "audit",
    "hosts",
    "host_layers",
    "pools",
    "pool_history",
    "pool_hosts",
    "desktops",
    "rollouts",
    "rollout_desktops",
    "users",
    "entitlements",
    "sessions",
    "leases",
    "watch_events",
    "watch_policies",
    "incidents",
    "crashed_desktops",
];

/// Each table's rows, in key order (a version after its parent), inserted with their ids.
pub(super) fn rows(from: &Tx, to: &Tx) -> Result<()> {
    for table in TABLES {
        let rows = from.query(&format!("SELECT * FROM {table} ORDER BY 1, 2"), ())?;
        let Some(first) = rows.first() else { continue };
        let cols = first.names().join(", ");
        let marks: Vec<String> = (1..=first.names().len()).map(|i| format!("?{i}")).collect();
        let insert = format!("INSERT INTO {table} ({cols}) VALUES ({})", marks.join(", "));
        for r in &rows {
            to.execute(&insert, r.values().to_vec())?;
        }
    }
    to.reset_identities(TABLES)?;
    Ok(())
}

#[cfg(test)]
/// The tables the schema has, for the test that keeps [`TABLES`] whole.
pub(super) fn schema_tables(tx: &Tx) -> Result<Vec<String>> {
    let sql = match tx.engine() {
        super::sql::Engine::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        }
        super::sql::Engine::Postgres => {
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()
             AND table_name <> 'vdim_schema' ORDER BY table_name"
        }
    };
    tx.query(sql, ())?.iter().map(|r| r.get(0)).collect()
}
