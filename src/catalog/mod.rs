//! The catalog: vdim's single source of truth. By default an embedded SQLite file in the
//! home; where a site outgrows one machine, a PostgreSQL database that several brokers
//! share (`--catalog postgres://…`). Both run the same schema and the same queries
//! ([`sql`]).
//!
//! SQLite runs in WAL mode with `synchronous=FULL` and foreign keys on: a committed change
//! survives power loss, and the database itself refuses a version whose parent or a channel
//! whose version does not exist (PostgreSQL does both by itself). Every read and write goes
//! through a transaction (`read`/`write`), so a command sees one consistent state and
//! changes it all-or-nothing. Files are created before the row that names them and deleted
//! after it, so the catalog never names a missing file.

mod copy;
pub mod location;
mod migrations;
pub mod console_sessions;
pub mod hosts;
pub mod incidents;
pub mod leases;
pub mod pools;
pub mod rollouts;
#[doc(hidden)]
pub mod scratch;
pub mod sql;
pub mod users;
pub use location::Location;
pub use pools::{Desktop, Pool};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use sql::{params, Conn, Engine, OptionalExtension};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("no image named '{0}' (see 'vdim image list')")]
    ImageNotFound(String),
    #[error("image '{image}' has no version {version} (see 'vdim image history {image}')")]
    VersionNotFound { image: String, version: u32 },
    #[error("image '{0}' already exists; import a new version with 'vdim image edit' and 'vdim image seal'")]
    ImageExists(String),
    #[error("the catalog {path} does not exist: run 'vdim init' first (or pass --home)")]
    NotInitialized { path: String },
    #[error("the catalog {path} has schema version {found}, newer than this vdim understands ({known}): upgrade vdim")]
    TooNew { path: String, found: i64, known: i64 },
    #[error("catalog {path}: {source}")]
    Open { path: String, source: sql::Error },
    #[error("cannot create the catalog {path} or make it private (0600)")]
    Create { path: String, source: std::io::Error },
    #[error("the catalog stayed busy for 30 s while it was being copied to {path}; try again")]
    CopyBusy { path: String },
    #[error("{what} needs the catalog to be a SQLite file; this one is {location}")]
    NotSqlite { what: &'static str, location: String },
    #[error("the catalog {location} is not empty ({counts}); restore only onto an empty one")]
    NotEmpty { location: String, counts: Counts },
    #[error("catalog query failed")]
    Sql(#[from] sql::Error),
}

impl From<rusqlite::Error> for CatalogError {
    fn from(e: rusqlite::Error) -> CatalogError {
        CatalogError::Sql(e.into())
    }
}

impl crate::error::Kind for CatalogError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            CatalogError::ImageNotFound(_) | CatalogError::VersionNotFound { .. } => K::NotFound,
            CatalogError::ImageExists(_) | CatalogError::NotEmpty { .. } => K::Conflict,
            CatalogError::CopyBusy { .. } => K::Busy,
            // A home without a catalog is a setup problem, not a missing object.
            CatalogError::NotInitialized { .. }
            | CatalogError::TooNew { .. }
            | CatalogError::Open { .. }
            | CatalogError::Create { .. }
            | CatalogError::Sql(_) => K::Internal,
            CatalogError::NotSqlite { .. } => K::Invalid,
        }
    }
}

pub type Result<T> = std::result::Result<T, CatalogError>;

/// A catalog (and its -wal, -shm) that an older vdim left readable by others becomes 0600.
fn tighten_modes(db: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::metadata(&name) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&name, std::fs::Permissions::from_mode(crate::home::PRIVATE_FILE))?
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Dev,
    Test,
    Prod,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Dev, Channel::Test, Channel::Prod];
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Dev => "dev",
            Channel::Test => "test",
            Channel::Prod => "prod",
        }
    }
    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Image {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub created: String,
    pub virtual_size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Version {
    #[serde(skip)]
    pub image_id: i64,
    pub number: u32,
    pub parent: Option<u32>,
    pub digest: String,
    /// Bytes of this version's own layer file (the delta on its parent).
    pub size: u64,
    pub virtual_size: u64,
    pub author: String,
    pub note: String,
    pub created: String,
    pub status: String,
    /// When gc removed the layer; the row stays for the history.
    pub removed: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Draft {
    #[serde(skip)]
    pub image_id: i64,
    pub base_version: u32,
    /// Relative to the vdim home.
    pub path: String,
    pub created: String,
    pub author: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub image: Option<String>,
    pub pool: Option<String>,
    pub version: Option<u32>,
    pub detail: serde_json::Value,
}

/// What one audit entry records; `detail` is free-form JSON.
#[derive(Debug, Default)]
pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub image: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub version: Option<u32>,
    pub detail: serde_json::Value,
}

pub struct Catalog {
    conn: Conn,
    location: Location,
}

/// Audit entries `vdim audit` and the admin API return unless asked for another number.
pub const DEFAULT_AUDIT_LIMIT: usize = 200;

/// How many of each object a catalog holds: what a backup's manifest records, and what
/// decides whether a home is empty enough to restore onto.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub images: u64,
    pub versions: u64,
    pub pools: u64,
    pub desktops: u64,
    pub users: u64,
    pub entitlements: u64,
    pub hosts: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images, {} versions, {} pools, {} desktops, {} users, {} entitlements, {} hosts",
            self.images, self.versions, self.pools, self.desktops, self.users, self.entitlements, self.hosts
        )
    }
}

/// The rows of each table (a table an older schema lacks counts none).
fn count_rows(tx: &sql::Tx) -> sql::Result<Counts> {
    let count = |table: &str| -> sql::Result<u64> {
        if !tx.table_exists(table)? {
            return Ok(0);
        }
        tx.query_row(&format!("SELECT count(*) FROM {table}"), (), |r| r.get::<_, u64>(0))
    };
    Ok(Counts {
        images: count("images")?,
        versions: count("versions")?,
        pools: count("pools")?,
        desktops: count("desktops")?,
        users: count("users")?,
        entitlements: count("entitlements")?,
        hosts: count("hosts")?,
    })
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// How long a command waits for a PostgreSQL server to answer a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Catalog {
    /// Open (and, with `create`, make) the SQLite catalog file and bring its schema up to date.
    pub fn open(path: &Path, create: bool) -> Result<Catalog> {
        Catalog::connect(&Location::Sqlite(path.to_path_buf()), create)
    }

    /// Open the catalog at `location` (with `create`: make it, or its schema in an empty
    /// PostgreSQL database) and bring its schema up to date.
    pub fn connect(location: &Location, create: bool) -> Result<Catalog> {
        let p = location.to_string();
        let conn = match location {
            Location::Sqlite(path) => open_sqlite(path, create)?,
            Location::Postgres(url) => {
                Conn::postgres(url, CONNECT_TIMEOUT).map_err(|source| CatalogError::Open { path: p.clone(), source })?
            }
        };
        let mut cat = Catalog { conn, location: location.clone() };
        cat.migrate(&p, create)?;
        Ok(cat)
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn engine(&self) -> Engine {
        self.conn.engine()
    }

    /// A PostgreSQL connection the server closed (restart, failover) is of no further use:
    /// whoever pools catalogs opens a new one.
    pub fn is_broken(&self) -> bool {
        match &self.conn {
            Conn::Sqlite(_) => false,
            Conn::Postgres(pg) => pg.is_closed(),
        }
    }

    /// SQLite's own busy handler sleeps in steps of up to 100 ms, which a broker request
    /// would wait behind any concurrent writer; the broker's connections retry every
    /// millisecond instead, for as long as the CLI's do (30 s). PostgreSQL queues writers
    /// on its lock without sleeping.
    pub fn retry_busy_soon(&mut self) -> Result<()> {
        fn retry_soon(count: i32) -> bool {
            std::thread::sleep(Duration::from_millis(1));
            count < 30_000
        }
        if let Conn::Sqlite(c) = &self.conn {
            c.busy_handler(Some(retry_soon))?;
        }
        Ok(())
    }

    fn migrate(&mut self, path: &str, create: bool) -> Result<()> {
        let known = migrations::MIGRATIONS.len() as i64;
        let engine = self.conn.engine();
        let tx = self.conn.write()?;
        let current: i64 = match engine {
            Engine::Sqlite => tx.query_row("PRAGMA user_version", (), |r| r.get(0))?,
            Engine::Postgres => {
                if !tx.table_exists("vdim_schema")? {
                    if !create {
                        return Err(CatalogError::NotInitialized { path: path.to_string() });
                    }
                    tx.execute_batch(
                        "CREATE TABLE vdim_schema (version BIGINT NOT NULL); INSERT INTO vdim_schema VALUES (0);",
                    )?;
                }
                tx.query_row("SELECT version FROM vdim_schema", (), |r| r.get(0))?
            }
        };
        if current > known {
            return Err(CatalogError::TooNew { path: path.to_string(), found: current, known });
        }
        for i in current as usize..known as usize {
            tx.execute_batch(&migrations::for_engine(i, engine))?;
            match engine {
                Engine::Sqlite => tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?,
                Engine::Postgres => {
                    tx.execute("UPDATE vdim_schema SET version = ?1", [i as i64 + 1])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A consistent copy of the whole catalog in the new SQLite file `dest` (0600), taken
    /// while other connections may write: one committed state. From SQLite, with its online
    /// backup API (every page in one step); from PostgreSQL, every row read in one snapshot
    /// into a new catalog file of the same schema. The copy is one self-contained file
    /// (rollback journal, no WAL beside it) that [`Catalog::read_copy`] and `open` read.
    pub fn snapshot_to(&mut self, dest: &Path) -> Result<()> {
        let p = dest.display().to_string();
        let source = match &mut self.conn {
            Conn::Sqlite(c) => c,
            Conn::Postgres(_) => {
                let mut copy = open_sqlite_new(dest)?;
                copy.migrate(&p, true)?;
                let to = copy.conn.write()?;
                let from = self.conn.read()?;
                copy::rows(&from, &to)?;
                to.commit()?;
                return copy.close_as_one_file();
            }
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::home::PRIVATE_FILE)
            .open(dest)
            .map_err(|source| CatalogError::Create { path: p.clone(), source })?;
        let mut copy =
            Connection::open(dest).map_err(|source| CatalogError::Open { path: p.clone(), source: source.into() })?;
        {
            use rusqlite::backup::{Backup, StepResult};
            let backup = Backup::new(source, &mut copy)?;
            // -1: every page in one step. A source busy or locked is tried again, as long as
            // a busy catalog makes other commands wait.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    StepResult::More | StepResult::Busy | StepResult::Locked
                        if std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => return Err(CatalogError::CopyBusy { path: p }),
                }
            }
        }
        copy.pragma_update(None, "journal_mode", "DELETE")?;
        copy.close().map_err(|(_, e)| CatalogError::from(e))?;
        Ok(())
    }

    /// Puts every row of `from` (a restored catalog, same schema version) into this
    /// catalog, which must hold none: one transaction, all of it or nothing.
    pub fn fill_from(&mut self, from: &mut Catalog) -> Result<Counts> {
        let to = self.conn.write()?;
        let had = count_rows(&to)?;
        if had != Counts::default() {
            return Err(CatalogError::NotEmpty { location: self.location.to_string(), counts: had });
        }
        let src = from.conn.read()?;
        copy::rows(&src, &to)?;
        let now = count_rows(&to)?;
        to.commit()?;
        Ok(now)
    }

    /// Runs `f` on a catalog copy (a backup's) read-only, as it is: not migrated, not
    /// switched to WAL, so its bytes (and SHA-256) stay what they were.
    pub fn read_copy<T, E: From<CatalogError>>(
        path: &Path,
        f: impl FnOnce(&Tx) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let p = path.display().to_string();
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|source| CatalogError::Open { path: p.clone(), source: source.into() })?;
        let mut conn = Conn::Sqlite(conn);
        let tx = conn.read().map_err(|source| CatalogError::Open { path: p, source })?;
        let out = f(&Tx(tx));
        out
    }

    /// What an existing catalog holds, read without migrating or changing it. A PostgreSQL
    /// database vdim never initialized holds nothing.
    pub fn peek_counts(location: &Location) -> Result<Counts> {
        let p = location.to_string();
        let mut conn = match location {
            Location::Sqlite(path) => {
                let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(path, flags)
                    .map_err(|source| CatalogError::Open { path: p.clone(), source: source.into() })?;
                conn.busy_timeout(Duration::from_secs(30))?;
                Conn::Sqlite(conn)
            }
            Location::Postgres(url) => {
                Conn::postgres(url, CONNECT_TIMEOUT).map_err(|source| CatalogError::Open { path: p.clone(), source })?
            }
        };
        let tx = conn.read().map_err(|source| CatalogError::Open { path: p.clone(), source })?;
        count_rows(&tx).map_err(|source| CatalogError::Open { path: p, source })
    }

    /// `PRAGMA integrity_check`'s findings; empty when the database is sound. PostgreSQL
    /// checks its pages itself.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let Conn::Sqlite(c) = &self.conn else { return Ok(vec![]) };
        let mut st = c.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = st.query_map((), |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// Closes a SQLite catalog as one self-contained file: its WAL checkpointed into it and
    /// removed (what a restore renames into a home).
    pub fn close_as_one_file(self) -> Result<()> {
        let Conn::Sqlite(c) = self.conn else {
            return Err(CatalogError::NotSqlite { what: "closing as one file", location: self.location.to_string() });
        };
        c.pragma_update(None, "journal_mode", "DELETE")?;
        c.close().map_err(|(_, e)| CatalogError::from(e))?;
        Ok(())
    }

    /// The newest schema version this vdim knows (its number of migrations).
    pub fn known_schema_version() -> i64 {
        migrations::MIGRATIONS.len() as i64
    }

    pub fn schema_version(&mut self) -> Result<i64> {
        self.read(|tx| tx.schema_version())
    }

    /// Run `f` on a consistent snapshot.
    pub fn read<T, E: From<CatalogError>>(
        &mut self,
        f: impl FnOnce(&Tx) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let tx = Tx(self.conn.read().map_err(CatalogError::from)?);
        f(&tx)
    }

    /// Run `f` as one write transaction: all of it commits, or none of it.
    pub fn write<T, E: From<CatalogError>>(
        &mut self,
        f: impl FnOnce(&Tx) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let tx = Tx(self.conn.write().map_err(CatalogError::from)?);
        let out = f(&tx)?;
        tx.0.commit().map_err(CatalogError::from)?;
        Ok(out)
    }
}

/// A new SQLite catalog file (0600), made and opened as a connection.
fn open_sqlite(path: &Path, create: bool) -> Result<Conn> {
    let p = path.display().to_string();
    if !create && !path.exists() {
        return Err(CatalogError::NotInitialized { path: p });
    }
    if create {
        // SQLite would create it 0644; its -wal and -shm files copy the database's mode.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::home::PRIVATE_FILE)
            .open(path)
            .map_err(|source| CatalogError::Create { path: p.clone(), source })?;
    }
    let conn =
        Connection::open(path).map_err(|source| CatalogError::Open { path: p.clone(), source: source.into() })?;
    tighten_modes(path).map_err(|source| CatalogError::Create { path: p.clone(), source })?;
    let setup = || -> sql::Result<()> {
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(())
    };
    setup().map_err(|source| CatalogError::Open { path: p.clone(), source })?;
    Ok(Conn::Sqlite(conn))
}

/// A catalog in the new file `dest`, which must not exist yet.
fn open_sqlite_new(dest: &Path) -> Result<Catalog> {
    let p = dest.display().to_string();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::home::PRIVATE_FILE)
        .open(dest)
        .map_err(|source| CatalogError::Create { path: p, source })?;
    Ok(Catalog { conn: open_sqlite(dest, false)?, location: Location::Sqlite(dest.to_path_buf()) })
}

/// A transaction; all catalog queries live here.
pub struct Tx<'c>(sql::Tx<'c>);

fn version_from_row(r: &sql::Row) -> sql::Result<Version> {
    Ok(Version {
        image_id: r.get("image_id")?,
        number: r.get("number")?,
        parent: r.get("parent")?,
        digest: r.get("digest")?,
        size: r.get::<_, i64>("file_size")? as u64,
        virtual_size: r.get::<_, i64>("virtual_size")? as u64,
        author: r.get("author")?,
        note: r.get("note")?,
        created: r.get("created")?,
        status: r.get("status")?,
        removed: r.get("removed")?,
    })
}

impl<'c> Tx<'c> {
    /// The engine-neutral transaction, for the few callers that run their own statements
    /// (tests, the copy of a whole catalog).
    pub fn sql(&self) -> &sql::Tx<'c> {
        &self.0
    }
}

impl Tx<'_> {
    /// The schema version this catalog is at.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(match self.0.engine() {
            Engine::Sqlite => self.0.query_row("PRAGMA user_version", (), |r| r.get(0))?,
            Engine::Postgres => self.0.query_row("SELECT version FROM vdim_schema", (), |r| r.get(0))?,
        })
    }

    /// How many images, versions, pools, desktops, users, entitlements and hosts there are.
    pub fn counts(&self) -> Result<Counts> {
        Ok(count_rows(&self.0)?)
    }

    // ---- images ------------------------------------------------------------------------

    pub fn image(&self, name: &str) -> Result<Image> {
        self.0
            .query_row("SELECT id, name, created, virtual_size FROM images WHERE name = ?1", [name], |r| {
                Ok(Image {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created: r.get(2)?,
                    virtual_size: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?
            .ok_or_else(|| CatalogError::ImageNotFound(name.to_string()))
    }

    pub fn images(&self) -> Result<Vec<Image>> {
        let mut st = self.0.prepare("SELECT id, name, created, virtual_size FROM images ORDER BY name")?;
        let rows = st.query_map((), |r| {
            Ok(Image { id: r.get(0)?, name: r.get(1)?, created: r.get(2)?, virtual_size: r.get::<_, i64>(3)? as u64 })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn insert_image(&self, name: &str, virtual_size: u64) -> Result<Image> {
        if self.image(name).is_ok() {
            return Err(CatalogError::ImageExists(name.to_string()));
        }
        let created = now();
        self.0.execute(
            "INSERT INTO images (name, created, virtual_size) VALUES (?1, ?2, ?3)",
            params![name, created, virtual_size as i64],
        )?;
        self.image(name)
    }

    // ---- versions ----------------------------------------------------------------------

    pub fn versions(&self, image: &Image) -> Result<Vec<Version>> {
        let mut st = self.0.prepare("SELECT * FROM versions WHERE image_id = ?1 ORDER BY number")?;
        let rows = st.query_map([image.id], version_from_row)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn version(&self, image: &Image, number: u32) -> Result<Version> {
        self.0
            .query_row(
                "SELECT * FROM versions WHERE image_id = ?1 AND number = ?2",
                params![image.id, number],
                version_from_row,
            )
            .optional()?
            .ok_or_else(|| CatalogError::VersionNotFound { image: image.name.clone(), version: number })
    }

    /// The digests of a version's chain, base first (a layer's backing is the one before).
    pub fn chain(&self, image: &Image, version: u32) -> Result<Vec<String>> {
        let mut out = vec![];
        let mut next = Some(version);
        while let Some(n) = next {
            let v = self.version(image, n)?;
            out.push(v.digest);
            next = v.parent;
        }
        out.reverse();
        Ok(out)
    }

    pub fn newest_version(&self, image: &Image) -> Result<Version> {
        self.0
            .query_row(
                "SELECT * FROM versions WHERE image_id = ?1 ORDER BY number DESC LIMIT 1",
                [image.id],
                version_from_row,
            )
            .optional()?
            .ok_or_else(|| CatalogError::VersionNotFound { image: image.name.clone(), version: 1 })
    }

    /// Versions whose layers still exist, across every image (for verify and gc).
    pub fn live_versions(&self) -> Result<Vec<(String, Version)>> {
        let mut st = self.0.prepare(
            "SELECT i.name AS image_name, v.* FROM versions v JOIN images i ON i.id = v.image_id
             WHERE v.removed IS NULL ORDER BY i.name, v.number",
        )?;
        let rows = st.query_map((), |r| Ok((r.get("image_name")?, version_from_row(r)?)))?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn insert_version(
        &self,
        image: &Image,
        parent: Option<u32>,
        digest: &str,
        size: u64,
        virtual_size: u64,
        author: &str,
        note: &str,
    ) -> Result<Version> {
        let number: u32 = self.0.query_row(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE image_id = ?1",
            [image.id],
            |r| r.get(0),
        )?;
        self.0.execute(
            "INSERT INTO versions (image_id, number, parent, digest, file_size, virtual_size, author, note, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![image.id, number, parent, digest, size as i64, virtual_size as i64, author, note, now()],
        )?;
        self.version(image, number)
    }

    pub fn mark_removed(&self, image: &Image, number: u32) -> Result<()> {
        self.0.execute(
            "UPDATE versions SET removed = ?3 WHERE image_id = ?1 AND number = ?2",
            params![image.id, number, now()],
        )?;
        Ok(())
    }

    pub fn set_version_status(&self, image: &Image, number: u32, status: &str) -> Result<()> {
        self.0.execute(
            "UPDATE versions SET status = ?3 WHERE image_id = ?1 AND number = ?2",
            params![image.id, number, status],
        )?;
        Ok(())
    }

    /// Is any live version (of any image) stored in the layer with this digest?
    pub fn digest_in_use(&self, digest: &str) -> Result<bool> {
        Ok(self.0.query_row(
            "SELECT EXISTS (SELECT 1 FROM versions WHERE digest = ?1 AND removed IS NULL)",
            [digest],
            |r| r.get(0),
        )?)
    }

    // ---- channels ----------------------------------------------------------------------

    pub fn channels(&self, image: &Image) -> Result<Vec<(Channel, u32)>> {
        let mut st = self.0.prepare("SELECT name, version FROM channels WHERE image_id = ?1")?;
        let rows = st.query_map([image.id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
        let mut out: Vec<(Channel, u32)> = rows
            .collect::<sql::Result<Vec<_>>>()?
            .into_iter()
            .filter_map(|(c, v)| Channel::parse(&c).map(|c| (c, v)))
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn channel(&self, image: &Image, channel: Channel) -> Result<u32> {
        Ok(self.0.query_row(
            "SELECT version FROM channels WHERE image_id = ?1 AND name = ?2",
            params![image.id, channel.as_str()],
            |r| r.get(0),
        )?)
    }

    /// Point `channel` at `version` and remember the move (rollback window).
    pub fn set_channel(&self, image: &Image, channel: Channel, version: u32) -> Result<()> {
        self.0.execute(
            "INSERT INTO channels (image_id, name, version) VALUES (?1, ?2, ?3)
             ON CONFLICT (image_id, name) DO UPDATE SET version = excluded.version",
            params![image.id, channel.as_str(), version],
        )?;
        self.0.execute(
            "INSERT INTO channel_history (image_id, channel, version, at) VALUES (?1, ?2, ?3, ?4)",
            params![image.id, channel.as_str(), version, now()],
        )?;
        Ok(())
    }

    /// The last `depth` distinct versions each channel of `image` has held, newest first.
    pub fn rollback_window(&self, image: &Image, depth: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for ch in Channel::ALL {
            let mut st = self
                .0
                .prepare("SELECT version FROM channel_history WHERE image_id = ?1 AND channel = ?2 ORDER BY id DESC")?;
            let mut seen: Vec<u32> = Vec::new();
            for v in st.query_map(params![image.id, ch.as_str()], |r| r.get::<_, u32>(0))? {
                let v = v?;
                if !seen.contains(&v) {
                    seen.push(v);
                    if seen.len() == depth {
                        break;
                    }
                }
            }
            out.extend(seen);
        }
        Ok(out)
    }

    // ---- drafts ------------------------------------------------------------------------

    pub fn draft(&self, image: &Image) -> Result<Option<Draft>> {
        Ok(self
            .0
            .query_row(
                "SELECT image_id, base_version, path, created, author FROM drafts WHERE image_id = ?1",
                [image.id],
                |r| {
                    Ok(Draft {
                        image_id: r.get(0)?,
                        base_version: r.get(1)?,
                        path: r.get(2)?,
                        created: r.get(3)?,
                        author: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn drafts(&self) -> Result<Vec<Draft>> {
        let mut st = self.0.prepare("SELECT image_id, base_version, path, created, author FROM drafts")?;
        let rows = st.query_map((), |r| {
            Ok(Draft {
                image_id: r.get(0)?,
                base_version: r.get(1)?,
                path: r.get(2)?,
                created: r.get(3)?,
                author: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    pub fn insert_draft(&self, image: &Image, base_version: u32, path: &str, author: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO drafts (image_id, base_version, path, created, author) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![image.id, base_version, path, now(), author],
        )?;
        Ok(())
    }

    pub fn delete_draft(&self, image: &Image) -> Result<()> {
        self.0.execute("DELETE FROM drafts WHERE image_id = ?1", [image.id])?;
        Ok(())
    }

    // ---- audit -------------------------------------------------------------------------

    pub fn audit(&self, a: Audit) -> Result<()> {
        self.0.execute(
            "INSERT INTO audit (at, actor, action, image, pool, version, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![now(), a.actor, a.action, a.image, a.pool, a.version, a.detail.to_string()],
        )?;
        Ok(())
    }

    pub fn audit_log(&self, image: Option<&str>, pool: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut st = self.0.prepare(
            "SELECT id, at, actor, action, image, pool, version, detail FROM audit
             WHERE (CAST(?1 AS TEXT) IS NULL OR image = ?1) AND (CAST(?2 AS TEXT) IS NULL OR pool = ?2)
             ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![image, pool, limit as i64], |r| {
            let detail: String = r.get(7)?;
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                image: r.get(4)?,
                pool: r.get(5)?,
                version: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        })?;
        let mut out: Vec<AuditEntry> = rows.collect::<sql::Result<_>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cat() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("c.db"), true).unwrap();
        (d, c)
    }

    /// What keeps a test catalog alive: its directory, or its scratch database.
    #[allow(dead_code)]
    pub(crate) enum Keep {
        Dir(tempfile::TempDir),
        Db(super::scratch::ScratchDatabase),
    }

    /// A new catalog on each engine: every catalog test runs on both.
    pub(crate) fn cats() -> Vec<(Keep, Catalog)> {
        let (d, sqlite) = cat();
        let db = super::scratch::ScratchDatabase::new();
        let pg = Catalog::connect(&Location::parse(&db.url), true).unwrap();
        vec![(Keep::Dir(d), sqlite), (Keep::Db(db), pg)]
    }

    #[test]
    fn opens_in_wal_with_foreign_keys_and_full_sync() {
        let (_d, mut c) = cat();
        c.read(|tx| {
            let mode: String = tx.sql().query_row("PRAGMA journal_mode", (), |r| r.get(0))?;
            let fk: i64 = tx.sql().query_row("PRAGMA foreign_keys", (), |r| r.get(0))?;
            let sync: i64 = tx.sql().query_row("PRAGMA synchronous", (), |r| r.get(0))?;
            assert_eq!((mode.as_str(), fk, sync), ("wal", 1, 2));
            Ok::<_, CatalogError>(())
        })
        .unwrap();
        assert_eq!(c.schema_version().unwrap(), migrations::MIGRATIONS.len() as i64);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        drop(Catalog::open(&p, true).unwrap());
        Connection::open(&p).unwrap().pragma_update(None, "user_version", 999).unwrap();
        let e = Catalog::open(&p, false).err().unwrap().to_string();
        assert!(e.contains("newer than this vdim"), "{e}");
    }

    #[test]
    fn migration_5_gives_existing_pools_loopback_displays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        // A catalog as vdim left it before migration 5, with one pool.
        let conn = Connection::open(&p).unwrap();
        for (i, sql) in migrations::MIGRATIONS[..4].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
        }
        conn.execute_batch(&format!(
            "INSERT INTO images (id, name, created, virtual_size) VALUES (1, 'img', 'then', 1);
             INSERT INTO versions (image_id, number, digest, file_size, virtual_size, author, created)
                 VALUES (1, 1, '{}', 1, 1, 't', 'then');
             INSERT INTO pools (name, image_id, channel, version, size, profile, virt_type, created)
                 VALUES ('old', 1, 'prod', 1, 1, 'windows11', 'qemu', 'then');",
            "0".repeat(64)
        ))
        .unwrap();
        drop(conn);
        let mut c = Catalog::open(&p, false).unwrap();
        assert_eq!(c.schema_version().unwrap(), migrations::MIGRATIONS.len() as i64);
        let pool = c.read(|tx| tx.pool("old")).unwrap().unwrap();
        assert_eq!(pool.display_listen, "127.0.0.1");
        assert!(!pool.insecure_display);
    }

    #[test]
    fn catalog_files_are_0600_new_or_left_open_by_an_older_vdim() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(Catalog::open(&p, true).unwrap());
        assert_eq!(mode(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Catalog::open(&p, false).unwrap();
        assert_eq!(mode(&p), 0o600);
        let wal = d.path().join("c.db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
        drop(c);
    }

    #[test]
    fn migration_6_marks_plaintext_pools_off_loopback_insecure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.db");
        let conn = Connection::open(&p).unwrap();
        for (i, sql) in migrations::MIGRATIONS[..5].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
        }
        conn.execute_batch(&format!(
            "INSERT INTO images (id, name, created, virtual_size) VALUES (1, 'img', 'then', 1);
             INSERT INTO versions (image_id, number, digest, file_size, virtual_size, author, created)
                 VALUES (1, 1, '{}', 1, 1, 't', 'then');
             INSERT INTO pools (name, image_id, channel, version, size, profile, virt_type, created, display_listen)
                 VALUES ('lo', 1, 'prod', 1, 1, 'w', 'qemu', 'then', '127.0.0.1'),
                        ('lo6', 1, 'prod', 1, 1, 'w', 'qemu', 'then', '::1'),
                        ('any', 1, 'prod', 1, 1, 'w', 'qemu', 'then', '0.0.0.0'),
                        ('lan', 1, 'prod', 1, 1, 'w', 'qemu', 'then', '192.0.2.10');",
            "0".repeat(64)
        ))
        .unwrap();
        drop(conn);
        let mut c = Catalog::open(&p, false).unwrap();
        let pools = c.read(|tx| tx.pools()).unwrap();
        let insecure: Vec<_> = pools.iter().filter(|p| p.insecure_display).map(|p| p.name.as_str()).collect();
        assert_eq!(insecure, ["any", "lan"], "they served plaintext SPICE off loopback");
    }

    #[test]
    fn foreign_keys_refuse_a_channel_on_a_missing_version() {
        for (_d, mut c) in cats() {
            let r = c.write(|tx| {
                let img = tx.insert_image("a", 1)?;
                tx.set_channel(&img, Channel::Prod, 7)
            });
            assert!(r.is_err());
            // The failed transaction left nothing behind.
            c.read(|tx| {
                assert!(tx.images()?.is_empty());
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn audit_log_is_append_only() {
        for (_d, mut c) in cats() {
            c.write(|tx| tx.audit(Audit { actor: "t", action: "x", ..Default::default() })).unwrap();
            let upd = c.write(|tx| Ok::<_, CatalogError>(tx.sql().execute("UPDATE audit SET actor = 'evil'", ())?));
            assert!(upd.is_err());
            let del = c.write(|tx| Ok::<_, CatalogError>(tx.sql().execute("DELETE FROM audit", ())?));
            assert!(del.is_err());
            let log = c.read(|tx| tx.audit_log(None, None, 10)).unwrap();
            assert_eq!(log.len(), 1);
            assert_eq!(log[0].actor, "t");
        }
    }

    #[test]
    fn rollback_window_keeps_the_last_distinct_versions_per_channel() {
        for (_d, mut c) in cats() {
            c.write(|tx| {
                let img = tx.insert_image("a", 1)?;
                let d = "0".repeat(64);
                for n in 1..=6u32 {
                    tx.insert_version(&img, if n == 1 { None } else { Some(n - 1) }, &d, 1, 1, "t", "")?;
                }
                for v in [1, 2, 3, 3, 4, 5] {
                    tx.set_channel(&img, Channel::Prod, v)?;
                }
                let w = tx.rollback_window(&img, 3)?;
                assert_eq!(w, vec![5, 4, 3]);
                Ok::<_, CatalogError>(())
            })
            .unwrap();
        }
    }

    #[test]
    fn a_backup_copies_every_table_the_schema_has() {
        for (_k, mut c) in cats() {
            let tables = c.read(|tx| Ok::<_, CatalogError>(super::copy::schema_tables(&tx.0)?)).unwrap();
            let mut listed: Vec<String> = super::copy::TABLES.iter().map(|t| t.to_string()).collect();
            listed.sort();
            assert_eq!(tables, listed, "{:?}: a table missing from copy::TABLES is lost by a backup", c.engine());
        }
    }

    /// A catalog with one of everything that refers to something else.
    fn fill(c: &mut Catalog) {
        c.write(|tx| {
            let img = tx.insert_image("a", 1)?;
            let d = "0".repeat(64);
            for n in 1..=3u32 {
                tx.insert_version(&img, if n == 1 { None } else { Some(n - 1) }, &d, 1, 1, "t", "")?;
            }
            tx.set_channel(&img, Channel::Prod, 2)?;
            tx.set_channel(&img, Channel::Prod, 3)?;
            tx.audit(Audit { actor: "t", action: "x", image: Some("a"), ..Default::default() })?;
            tx.insert_user("alice", false, &"a".repeat(64), None)?;
            Ok::<_, CatalogError>(())
        })
        .unwrap();
    }

    #[test]
    fn a_postgres_catalog_is_copied_to_a_sqlite_file_and_restored_onto_another_database() {
        let source_db = scratch::ScratchDatabase::new();
        let mut source = Catalog::connect(&Location::parse(&source_db.url), true).unwrap();
        fill(&mut source);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("copy.db");
        source.snapshot_to(&file).unwrap();
        let mut copy = Catalog::open(&file, false).unwrap();
        let want = source.read(|tx| tx.counts()).unwrap();
        assert_eq!(copy.read(|tx| tx.counts()).unwrap(), want);
        assert_eq!(want.versions, 3);
        let history = |c: &mut Catalog| {
            c.read(|tx| {
                let img = tx.image("a")?;
                Ok::<_, CatalogError>((tx.rollback_window(&img, 3)?, tx.audit_log(None, None, 10)?.len()))
            })
            .unwrap()
        };
        assert_eq!(history(&mut copy), (vec![3, 2], 1));

        let target_db = scratch::ScratchDatabase::new();
        let mut target = Catalog::connect(&Location::parse(&target_db.url), true).unwrap();
        assert_eq!(target.fill_from(&mut copy).unwrap(), want);
        assert_eq!(history(&mut target), (vec![3, 2], 1));
        // New rows after the restored ones: the identity counters moved past their ids.
        target
            .write(|tx| {
                tx.insert_user("bob", false, &"b".repeat(64), None)?;
                tx.audit(Audit { actor: "t", action: "y", ..Default::default() })
            })
            .unwrap();
        // A second restore onto it is refused and changes nothing.
        let e = target.fill_from(&mut copy).unwrap_err();
        assert!(matches!(e, CatalogError::NotEmpty { .. }), "{e}");
        assert_eq!(target.read(|tx| tx.counts()).unwrap().users, 2);
    }
}
