//! One catalog API over two engines: the embedded SQLite file (rusqlite) and a PostgreSQL
//! server (the `postgres` crate). Every query is written once, in the SQL both engines
//! speak; this module only carries it to the engine and back:
//!
//! - parameters are `?1..?N` in the text; for PostgreSQL they become `$1..$N`;
//! - values cross as [`Value`] (null, integer, real, text, bytes), so a row reads the same
//!   from either engine. PostgreSQL's stricter types are met at the wire: an integer is
//!   written as the 2-, 4- or 8-byte integer or boolean the server inferred for the
//!   parameter, and any integer, boolean or numeric column reads back as an integer;
//! - a schema migration is written once in SQLite's dialect and its type names are mapped
//!   for PostgreSQL ([`postgres_ddl`]); what differs beyond names (triggers) is kept per
//!   engine in `migrations.rs`.
//!
//! `value` holds what crosses (values, parameters, rows), `postgresql` the PostgreSQL side;
//! rusqlite needs no more than the few lines at the end of this file.
//!
//! Transactions keep SQLite's guarantees on both: a read sees one snapshot (PostgreSQL:
//! REPEATABLE READ, READ ONLY) and writers take turns (SQLite: BEGIN IMMEDIATE; PostgreSQL:
//! one transaction-scoped advisory lock), so a read-then-write in a write transaction never
//! races another writer: the broker's atomic assignment holds across processes and machines.

mod postgresql;
mod value;

pub use crate::params;
pub use postgresql::{postgres_ddl, Pg, PgTx};
pub use value::{FromValue, Params, Row, RowIndex, ToValue, Value};

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("the query returned no rows")]
    NoRows,
    #[error("column {column}: {problem}")]
    Column { column: String, problem: String },
    #[error("the catalog's PostgreSQL URL: {0}")]
    Url(String),
}

/// PostgreSQL's own words (message, detail) rather than the driver's "db error".
fn postgres_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {} ({d})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => e.to_string(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `query_row(..).optional()`: no row is `None`, not an error.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(Error::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// An open connection to either engine.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl Conn {
    /// Connects to a PostgreSQL server (a `postgres://` URL; see [`Pg::connect`]).
    pub fn postgres(url: &str, timeout: Duration) -> Result<Conn> {
        Ok(Conn::Postgres(Box::new(Pg::connect(url, timeout)?)))
    }

    pub fn engine(&self) -> Engine {
        match self {
            Conn::Sqlite(_) => Engine::Sqlite,
            Conn::Postgres(_) => Engine::Postgres,
        }
    }

    /// A snapshot to read from.
    pub fn read(&mut self) -> Result<Tx<'_>> {
        Ok(match self {
            Conn::Sqlite(c) => Tx::Sqlite(c.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?),
            Conn::Postgres(pg) => Tx::Postgres(RefCell::new(pg.read()?)),
        })
    }

    /// A write transaction, taken once no other writer holds one.
    pub fn write(&mut self) -> Result<Tx<'_>> {
        Ok(match self {
            Conn::Sqlite(c) => Tx::Sqlite(c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?),
            Conn::Postgres(pg) => Tx::Postgres(RefCell::new(pg.write()?)),
        })
    }
}

/// A transaction on either engine; dropped without [`Tx::commit`], it rolls back.
pub enum Tx<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(RefCell<PgTx<'c>>),
}

impl<'c> Tx<'c> {
    pub fn engine(&self) -> Engine {
        match self {
            Tx::Sqlite(_) => Engine::Sqlite,
            Tx::Postgres(_) => Engine::Postgres,
        }
    }

    pub fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit()?,
            Tx::Postgres(t) => t.into_inner().commit()?,
        }
        Ok(())
    }

    /// Runs one statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let values = params.values();
        match self {
            Tx::Sqlite(t) => {
                let mut st = t.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(values.iter().map(SqliteValue)))?)
            }
            Tx::Postgres(t) => t.borrow_mut().execute(sql, &values),
        }
    }

    /// Runs statements without parameters (a migration).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.execute_batch(sql)?,
            Tx::Postgres(t) => t.borrow_mut().batch(sql)?,
        }
        Ok(())
    }

    /// Every row the query returns.
    pub fn query(&self, sql: &str, params: impl Params) -> Result<Vec<Row>> {
        let values = params.values();
        match self {
            Tx::Sqlite(t) => {
                let mut st = t.prepare_cached(sql)?;
                let names: Rc<[String]> = st.column_names().iter().map(|n| n.to_string()).collect();
                let width = names.len();
                let mut rows = st.query(rusqlite::params_from_iter(values.iter().map(SqliteValue)))?;
                let mut out = vec![];
                while let Some(r) = rows.next()? {
                    let values = (0..width).map(|i| r.get_ref(i).map(from_sqlite)).collect::<rusqlite::Result<_>>()?;
                    out.push(Row { names: names.clone(), values });
                }
                Ok(out)
            }
            Tx::Postgres(t) => t.borrow_mut().query(sql, &values),
        }
    }

    /// The first row's `f`, or [`Error::NoRows`].
    pub fn query_row<T>(&self, sql: &str, params: impl Params, f: impl FnOnce(&Row) -> Result<T>) -> Result<T> {
        let rows = self.query(sql, params)?;
        f(rows.first().ok_or(Error::NoRows)?)
    }

    /// A query to map rows with (the shape rusqlite's callers know).
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_, 'c>> {
        Ok(Statement { tx: self, sql: sql.to_string() })
    }

    /// Does this table exist (a migration may not have made it yet)?
    pub fn table_exists(&self, table: &str) -> Result<bool> {
        let sql = match self.engine() {
            Engine::Sqlite => "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            Engine::Postgres => {
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?1)"
            }
        };
        self.query_row(sql, [table], |r| r.get(0))
    }
}

pub struct Statement<'t, 'c> {
    tx: &'t Tx<'c>,
    sql: String,
}

impl Statement<'_, '_> {
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.tx.query(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }
}

// ---- SQLite ----------------------------------------------------------------------------

struct SqliteValue<'a>(&'a Value);

impl rusqlite::ToSql for SqliteValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}
