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
//! Transactions keep SQLite's guarantees on both: a read sees one snapshot (PostgreSQL:
//! REPEATABLE READ, READ ONLY) and writers take turns (SQLite: BEGIN IMMEDIATE; PostgreSQL:
//! one transaction-scoped advisory lock), so a read-then-write in a write transaction never
//! races another writer: the broker's atomic assignment holds across processes and machines.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// The advisory lock every PostgreSQL write transaction holds: writers take turns like
/// SQLite's, whichever broker or command they come from.
const WRITE_LOCK: i64 = 0x7664_696d; // "vdim"

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

/// A value as it crosses to or from either engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

pub trait ToValue {
    fn to_value(&self) -> Value;
}

pub trait FromValue: Sized {
    /// `Err` says what was found instead.
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

fn found(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => format!("integer {i}"),
        Value::Real(r) => format!("real {r}"),
        Value::Text(t) => format!("text {:?}", t.chars().take(40).collect::<String>()),
        Value::Blob(b) => format!("{} bytes", b.len()),
    }
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
        impl FromValue for $t {
            fn from_value(v: &Value) -> std::result::Result<$t, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i).map_err(|_| format!("integer {i} out of range")),
                    other => Err(format!("expected an integer, found {}", found(other))),
                }
            }
        }
    )*};
}
integer!(i32, i64, u32, u16, u8);

impl ToValue for u64 {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> std::result::Result<u64, String> {
        i64::from_value(v).map(|i| i as u64)
    }
}
impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<bool, String> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            other => Err(format!("expected a flag, found {}", found(other))),
        }
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> std::result::Result<f64, String> {
        match v {
            Value::Real(r) => Ok(*r),
            Value::Int(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {}", found(other))),
        }
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for std::borrow::Cow<'_, str> {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<String, String> {
        match v {
            Value::Text(t) => Ok(t.clone()),
            other => Err(format!("expected text, found {}", found(other))),
        }
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Vec<u8>, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(format!("expected bytes, found {}", found(other))),
        }
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl FromValue for Value {
    fn from_value(v: &Value) -> std::result::Result<Value, String> {
        Ok(v.clone())
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A query's parameters: `params![a, b]`, an array of one type, or `()` for none.
pub trait Params {
    fn values(self) -> Vec<Value>;
}
impl Params for () {
    fn values(self) -> Vec<Value> {
        vec![]
    }
}
impl Params for &[&dyn ToValue] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}
impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}
impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}

/// `params![a, b, c]`: parameters of different types for one query.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::catalog::sql::ToValue] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::catalog::sql::ToValue),+] as &[&dyn $crate::catalog::sql::ToValue] };
}
pub use params;

/// One row, read whole.
#[derive(Debug, Clone)]
pub struct Row {
    names: Rc<[String]>,
    values: Vec<Value>,
}

/// A column by position or by name.
pub trait RowIndex {
    fn index(&self, row: &Row) -> Result<usize>;
}
impl RowIndex for usize {
    fn index(&self, row: &Row) -> Result<usize> {
        if *self < row.values.len() {
            Ok(*self)
        } else {
            Err(Error::Column { column: self.to_string(), problem: "no such column".into() })
        }
    }
}
impl RowIndex for &str {
    fn index(&self, row: &Row) -> Result<usize> {
        row.names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(self))
            .ok_or_else(|| Error::Column { column: self.to_string(), problem: "no such column".into() })
    }
}

impl Row {
    pub fn get<I: RowIndex, T: FromValue>(&self, i: I) -> Result<T> {
        let at = i.index(self)?;
        T::from_value(&self.values[at]).map_err(|problem| Error::Column { column: self.names[at].clone(), problem })
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn values(&self) -> &[Value] {
        &self.values
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

/// A PostgreSQL connection with its prepared statements (a statement outlives the
/// transaction it was prepared in; preparing each query once saves a round trip per query).
pub struct Pg {
    client: std::mem::ManuallyDrop<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

impl Pg {
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Closing a connection blocks on the driver's own runtime, which may not happen on a thread
/// that drives async tasks (a broker's catalog connections dropped at its shutdown): there,
/// the connection is closed on a thread of its own.
impl Drop for Pg {
    fn drop(&mut self) {
        // SAFETY: the client is taken once, here, and never used again.
        let client = unsafe { std::mem::ManuallyDrop::take(&mut self.client) };
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::spawn(move || drop(client));
        } else {
            drop(client);
        }
    }
}

/// An open connection to either engine.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl Conn {
    /// Connects to a PostgreSQL server (a `postgres://` URL). With `sslrootcert=FILE` the
    /// connection is TLS (rustls), the server's certificate checked against that CA and
    /// its name against the URL's host, whatever `sslmode` says beyond `disable`
    /// (`require`, `verify-ca` and `verify-full` alike); `sslmode=require` without a CA is
    /// refused rather than trusting any certificate.
    pub fn postgres(url: &str, timeout: Duration) -> Result<Conn> {
        let (url, ca) = take_query_param(url, "sslrootcert");
        let (url, mode) = take_query_param(&url, "sslmode");
        let mut config: postgres::Config = url.parse()?;
        config.connect_timeout(timeout);
        if config.get_application_name().is_none() {
            config.application_name("vdim");
        }
        let client = match (mode.as_deref(), ca) {
            (Some("disable"), _) => config.ssl_mode(postgres::config::SslMode::Disable).connect(postgres::NoTls)?,
            (Some("require" | "verify-ca" | "verify-full"), None) => {
                return Err(Error::Url(format!(
                    "sslmode={} needs sslrootcert=FILE, the CA that signed the server's certificate",
                    mode.unwrap_or_default()
                )))
            }
            (None | Some("prefer"), None) => config.connect(postgres::NoTls)?,
            (Some("require" | "verify-ca" | "verify-full") | None | Some("prefer"), Some(ca)) => {
                config.ssl_mode(postgres::config::SslMode::Require).connect(tls(&ca)?)?
            }
            (Some(other), _) => return Err(Error::Url(format!("unknown sslmode {other:?}"))),
        };
        Ok(Conn::Postgres(Box::new(Pg { client: std::mem::ManuallyDrop::new(client), statements: HashMap::new() })))
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
            Conn::Postgres(pg) => {
                let Pg { client, statements } = &mut **pg;
                let tx = (**client)
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                Tx::Postgres(RefCell::new(PgTx { tx, statements }))
            }
        })
    }

    /// A write transaction, taken once no other writer holds one.
    pub fn write(&mut self) -> Result<Tx<'_>> {
        Ok(match self {
            Conn::Sqlite(c) => Tx::Sqlite(c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?),
            Conn::Postgres(pg) => {
                let Pg { client, statements } = &mut **pg;
                let mut tx = (**client).transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
                Tx::Postgres(RefCell::new(PgTx { tx, statements }))
            }
        })
    }
}

/// `url` without its query parameter `name`, and that parameter's value (percent-decoded).
fn take_query_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None) };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(percent_decode(v));
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    (url, value)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// rustls with the CA in the PEM file `ca` as the only root.
fn tls(ca: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bad = |why: String| Error::Url(format!("sslrootcert {ca}: {why}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

pub struct PgTx<'c> {
    tx: postgres::Transaction<'c>,
    statements: &'c mut HashMap<String, postgres::Statement>,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(&postgres_placeholders(sql))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
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
            Tx::Postgres(t) => t.into_inner().tx.commit()?,
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
            Tx::Postgres(t) => {
                let mut t = t.borrow_mut();
                let st = t.statement(sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
                Ok(t.tx.execute(&st, &refs)? as usize)
            }
        }
    }

    /// Runs statements without parameters (a migration).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.execute_batch(sql)?,
            Tx::Postgres(t) => t.borrow_mut().tx.batch_execute(sql)?,
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
            Tx::Postgres(t) => {
                let mut t = t.borrow_mut();
                let st = t.statement(sql)?;
                let names: Rc<[String]> = st.columns().iter().map(|c| c.name().to_string()).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
                let rows = t.tx.query(&st, &refs)?;
                rows.iter()
                    .map(|r| {
                        let values = (0..names.len())
                            .map(|i| r.try_get::<_, Value>(i))
                            .collect::<std::result::Result<_, _>>()?;
                        Ok(Row { names: names.clone(), values })
                    })
                    .collect()
            }
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

// ---- PostgreSQL ------------------------------------------------------------------------

/// `?N` placeholders as PostgreSQL's `$N`, outside quoted text.
pub fn postgres_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted: Option<char> = None;
    for c in sql.chars() {
        match quoted {
            Some(q) if c == q => quoted = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quoted = Some(c),
            None if c == '?' => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

/// A migration written for SQLite as PostgreSQL DDL: the same tables, with PostgreSQL's
/// names for the types (64-bit integers everywhere, so every integer reads back alike) and
/// an identity column where SQLite makes `id INTEGER PRIMARY KEY` a rowid. Explicit ids
/// (a restore) are allowed; [`Tx::reset_identities`] moves the counters past them.
pub fn postgres_ddl(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    for line in sql.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let rowid = words.len() >= 4
            && words[0] == "id"
            && words[1..3] == ["INTEGER", "PRIMARY"]
            && words[3].trim_end_matches(',') == "KEY";
        let line = if rowid {
            let indent = &line[..line.len() - line.trim_start().len()];
            let rest = format!("{} {}", &words[3][3..], words[4..].join(" "));
            format!("{indent}id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY{}", rest.trim_end())
        } else {
            replace_word(&replace_word(line, "INTEGER", "BIGINT"), "BLOB", "BYTEA")
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn replace_word(line: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(word) {
        let before_ok = rest[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric() && c != '_');
        let after_ok = rest[at + word.len()..].chars().next().is_none_or(|c| !c.is_alphanumeric() && c != '_');
        out.push_str(&rest[..at]);
        out.push_str(if before_ok && after_ok { with } else { word });
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

impl Tx<'_> {
    /// After rows were inserted with their ids (a restore), each identity counter starts past
    /// the highest id, so the next insert does not collide.
    pub fn reset_identities(&self, tables: &[&str]) -> Result<()> {
        if self.engine() != Engine::Postgres {
            return Ok(());
        }
        for t in tables {
            let has_id: bool = self.query_row(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = ?1 AND column_name = 'id' AND is_identity = 'YES')",
                [*t],
                |r| r.get(0),
            )?;
            if has_id {
                // Table names come from the schema's own list, never from input.
                self.execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{t}', 'id'), COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)"
                    ),
                    (),
                )?;
            }
        }
        Ok(())
    }
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::UNKNOWN => i.to_string().to_sql(ty, out),
                ref other => Err(format!("an integer for a parameter of type {other}").into()),
            },
            Value::Real(r) => match *ty {
                Type::FLOAT8 => r.to_sql(ty, out),
                Type::FLOAT4 => (*r as f32).to_sql(ty, out),
                ref other => Err(format!("a real for a parameter of type {other}").into()),
            },
            Value::Text(t) => t.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{FromSql, Type};
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)? as i64),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)? as i64),
            Type::OID => Value::Int(u32::from_sql(ty, raw)? as i64),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)? as i64),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)? as f64),
            Type::NUMERIC => numeric(raw)?,
            Type::BYTEA => Value::Blob(Vec::<u8>::from_sql(ty, raw)?),
            _ if <String as FromSql>::accepts(ty) => Value::Text(String::from_sql(ty, raw)?),
            ref other => return Err(format!("a column of type {other}").into()),
        })
    }

    fn from_sql_null(
        _: &postgres::types::Type,
    ) -> std::result::Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

/// PostgreSQL's binary NUMERIC (what SUM of integers gives): base-10000 digits with a
/// weight and sign. A whole number reads as an integer, like SQLite's SUM.
fn numeric(raw: &[u8]) -> std::result::Result<Value, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> std::result::Result<i16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(i * 2..i * 2 + 2).map(|b| i16::from_be_bytes([b[0], b[1]])).ok_or_else(|| "a short numeric".into())
    };
    let (ndigits, weight, sign, scale) = (word(0)? as usize, word(1)? as i32, word(2)? as u16, word(3)?);
    if sign == 0xC000 {
        return Ok(Value::Null); // NaN
    }
    let mut v = 0f64;
    for i in 0..ndigits {
        v += word(4 + i)? as f64 * 10000f64.powi(weight - i as i32);
    }
    if sign == 0x4000 {
        v = -v;
    }
    Ok(if scale == 0 && v.abs() < 9.0e15 { Value::Int(v as i64) } else { Value::Real(v) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            postgres_placeholders("SELECT '?1', \"a?\" FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', \"a?\" FROM t WHERE a = $1 AND b = $12"
        );
    }

    #[test]
    fn ddl_maps_types_and_rowids() {
        let sql =
            "CREATE TABLE t (\n    id      INTEGER PRIMARY KEY,\n    n INTEGER NOT NULL, INTEGERS TEXT, b BLOB\n);";
        let pg = postgres_ddl(sql);
        assert!(pg.contains("    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n"), "{pg}");
        assert!(pg.contains("n BIGINT NOT NULL, INTEGERS TEXT, b BYTEA"), "{pg}");
        // A key that is not a rowid keeps its type mapped, not an identity.
        let pg = postgres_ddl("    image_id     INTEGER PRIMARY KEY REFERENCES images(id),");
        assert_eq!(pg.trim(), "image_id     BIGINT PRIMARY KEY REFERENCES images(id),");
    }

    #[test]
    fn numeric_sums_read_as_integers() {
        // 12345678: digits 1234, 5678 with weight 1.
        let raw: Vec<u8> = [2i16, 1, 0, 0, 1234, 5678].iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Int(12_345_678));
        let raw: Vec<u8> = [1i16, 0, 0x4000u16 as i16, 0, 7].iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Int(-7));
        let raw: Vec<u8> = [0i16, 0, 0, 0].iter().flat_map(|w| w.to_be_bytes()).collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Int(0));
    }

    #[test]
    fn a_row_reads_by_position_and_name_and_says_what_it_found() {
        let row =
            Row { names: vec!["n".to_string(), "t".to_string()].into(), values: vec![Value::Int(3), Value::Null] };
        assert_eq!(row.get::<_, u32>(0).unwrap(), 3);
        assert_eq!(row.get::<_, Option<String>>("T").unwrap(), None);
        let e = row.get::<_, String>("n").unwrap_err().to_string();
        assert_eq!(e, "column n: expected text, found integer 3");
        assert!(row.get::<_, i64>("missing").is_err());
    }

    #[test]
    fn tls_to_postgresql_checks_the_servers_certificate_against_the_given_ca() {
        let db = super::super::scratch::ScratchDatabase::new();
        let ca = "/var/lib/vdim-test-pg/tls/ca.crt";
        let on_tls = |url: &str| -> Result<bool> {
            let mut c = Conn::postgres(url, Duration::from_secs(10))?;
            let tx = c.read()?;
            tx.query_row("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", (), |r| r.get(0))
        };
        assert!(on_tls(&format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url)).unwrap());
        assert!(on_tls(&format!("{}?sslrootcert={}", db.url, ca.replace('/', "%2F"))).unwrap(), "a CA alone means TLS");
        assert!(!on_tls(&db.url).unwrap(), "no CA, no sslmode: as libpq's default, plain");
        let e = on_tls(&format!("{}?sslmode=require", db.url)).unwrap_err().to_string();
        assert!(e.contains("needs sslrootcert"), "{e}");
        // A CA that did not sign the server's certificate: refused, never trusted.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.crt");
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other"])
            .arg("-keyout")
            .arg(dir.path().join("other.key"))
            .arg("-out")
            .arg(&other)
            .output()
            .unwrap();
        assert!(made.status.success());
        let e = on_tls(&format!("{}?sslmode=verify-full&sslrootcert={}", db.url, other.display())).unwrap_err();
        assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    }

    #[test]
    fn a_url_parameter_is_taken_out_decoded() {
        assert_eq!(
            take_query_param("postgres://a@b/c?sslmode=require&sslrootcert=%2Fetc%2Fca.crt", "sslrootcert"),
            ("postgres://a@b/c?sslmode=require".to_string(), Some("/etc/ca.crt".to_string()))
        );
        assert_eq!(take_query_param("postgres://a@b/c?x=1", "sslmode"), ("postgres://a@b/c?x=1".to_string(), None));
        assert_eq!(
            take_query_param("postgres://a@b/c?sslmode=disable", "sslmode"),
            ("postgres://a@b/c".to_string(), Some("disable".to_string()))
        );
    }
}
