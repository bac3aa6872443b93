//! The PostgreSQL side of the query layer: connecting (TLS with rustls), transactions whose
//! writers take turns, prepared statements kept per connection, `?N` as `$N`, the schema's
//! DDL in PostgreSQL's names, and values on the wire in the types the server inferred.

use super::{Engine, Error, Result, Row, Tx, Value};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// The advisory lock every PostgreSQL write transaction holds: writers take turns like
/// SQLite's, whichever broker or command they come from.
const WRITE_LOCK: i64 = 0x7664_696d; // "vdim"

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

impl Pg {
    /// Connects to a PostgreSQL server (a `postgres://` URL). With `sslrootcert=FILE` the
    /// connection is TLS (rustls), the server's certificate checked against that CA and
    /// its name against the URL's host, whatever `sslmode` says beyond `disable`
    /// (`require`, `verify-ca` and `verify-full` alike); `sslmode=require` without a CA is
    /// refused rather than trusting any certificate.
    pub fn connect(url: &str, timeout: Duration) -> Result<Pg> {
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
        Ok(Pg { client: std::mem::ManuallyDrop::new(client), statements: HashMap::new() })
    }

    /// A snapshot to read from: REPEATABLE READ, READ ONLY.
    pub fn read(&mut self) -> Result<PgTx<'_>> {
        let Pg { client, statements } = self;
        let tx = (**client)
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        Ok(PgTx { tx, statements })
    }

    /// A write transaction, once no other writer holds the write lock.
    pub fn write(&mut self) -> Result<PgTx<'_>> {
        let Pg { client, statements } = self;
        let mut tx = (**client).transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        Ok(PgTx { tx, statements })
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

impl PgTx<'_> {
    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }

    pub fn execute(&mut self, sql: &str, values: &[Value]) -> Result<usize> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
        Ok(self.tx.execute(&st, &refs)? as usize)
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.tx.batch_execute(sql)?)
    }

    pub fn query(&mut self, sql: &str, values: &[Value]) -> Result<Vec<Row>> {
        let st = self.statement(sql)?;
        let names: Rc<[String]> = st.columns().iter().map(|c| c.name().to_string()).collect();
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
        let rows = self.tx.query(&st, &refs)?;
        rows.iter()
            .map(|r| {
                let values =
                    (0..names.len()).map(|i| r.try_get::<_, Value>(i)).collect::<std::result::Result<_, _>>()?;
                Ok(Row { names: names.clone(), values })
            })
            .collect()
    }
}

/// `?N` placeholders as PostgreSQL's `$N`, outside quoted text.
pub(super) fn postgres_placeholders(sql: &str) -> String {
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
    use crate::catalog::sql::Conn;
    use std::time::Duration;

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
    fn tls_to_postgresql_checks_the_servers_certificate_against_the_given_ca() {
        let db = crate::catalog::scratch::ScratchDatabase::new();
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
