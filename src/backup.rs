//! Backup and restore of a vdim home: a consistent copy of the catalog taken while vdim runs,
//! a manifest naming every layer that catalog needs, and (with `--layers`) the layers
//! themselves; a restore puts all of it onto an empty home, every byte verified first.
//!
//! ```text
//!  vdim backup DIR [--layers]                   vdim restore DIR  (onto an empty home)
//!   store lock shared (gc waits)                 manifest read; the catalog copy's SHA-256
//!   DIR/manifest.json removed: incomplete          must be the manifest's
//!   catalog ─► DIR/.tmp-…-catalog.db              home empty? (no image, pool, user, host)
//!     (SQLite online backup: one snapshot)        store lock exclusive; layers/.tmp-…-restore/:
//!   the layers that copy names ─► DIR/layers/       catalog copy opened, integrity checked
//!     <sha256>.qcow2: only what DIR lacks or        every layer it names: the home's copy or
//!     holds wrong, each hashed once copied          DIR's, hashed; missing or wrong: refused
//!   DIR/profiles/*.toml                             sessions ended, desktops due for reset,
//!   catalog renamed into place, then                drafts dropped, audited (in the copy)
//!   DIR/manifest.json written last               layers, profiles renamed in; catalog last
//!                                                 then (boot): `pool start` per running pool
//! ```
//! The manifest names the catalog's engine. What is engine-specific is taking the copy
//! ([`Catalog::snapshot_to`]) and opening it ([`Catalog::read_copy`], `Catalog::open`): a
//! second engine is a variant of [`Engine`] and those two steps.
//!
//! Not in a backup: desktops' overlays (so persistent desktops' disks), drafts, desktops'
//! firmware state, and the join-credentials and user-data files pools name by path. After a
//! restore every desktop is made afresh on its version.

use crate::catalog::{self, Audit, Catalog, CatalogError, Counts, Location, Tx};
use crate::context::{ContextError, Settings};
use crate::digest;
use crate::home::{self, Home};
use crate::lock::{self, LockError, Mode};
use crate::names;
use crate::pool::PoolOutcome;
use crate::store::{self, Actor, PrivateDir, StoreError, TmpFile};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// The manifest format this vdim writes and reads (it refuses newer ones).
pub const FORMAT: u32 = 1;
/// The file whose presence makes a backup directory a complete backup.
pub const MANIFEST: &str = "manifest.json";
const LAYERS: &str = "layers";
const PROFILES: &str = "profiles";

/// What a backup leaves out, for the commands' output and the manifest.
pub const NOT_INCLUDED: &[&str] = &[
    "desktops' overlays (persistent desktops' disks: they start afresh on their version)",
    "drafts (an image's draft is dropped at restore)",
    "desktops' firmware state (UEFI variables, TPM)",
    "join-credentials and user-data files (pools keep their paths only)",
];

#[derive(Debug, Error)]
pub enum BackupError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no backup in {dir}: it has no {MANIFEST} (an interrupted backup has none); take one with 'vdim backup {dir}'"
    )]
    NoBackup { dir: String },
    #[error("the backup lacks {what} ({path}): it is incomplete; use another backup")]
    Missing { what: String, path: String },
    #[error("the backup manifest {path} cannot be used: {why}; use another backup")]
    BadManifest { path: String, why: String },
    #[error("the backup in {dir} was written by a newer vdim ({what}); restore it with that vdim or a newer one")]
    TooNew { dir: String, what: String },
    #[error("the catalog copy {path} has SHA-256 {found}, its manifest says {expected}: the backup is damaged; use another backup")]
    CatalogDiffers { path: String, expected: String, found: String },
    #[error("the catalog copy {path} is damaged ({why}); use another backup")]
    CatalogDamaged { path: String, why: String },
    #[error("the home {home} is not empty: its catalog holds {what}; a restore only goes onto an empty home (choose another --home, or move this one away first)")]
    NotEmpty { home: String, what: String },
    #[error("layer {digest} (image '{image}' version {version}) is neither in {backup} nor in {home}: restore from a backup taken with --layers, or put the layer there")]
    LayerMissing { image: String, version: u32, digest: String, backup: String, home: String },
    #[error("layer {path} (image '{image}' version {version}) has SHA-256 {found}, not {digest}: the file is damaged; use another backup or replace that file")]
    LayerDiffers { image: String, version: u32, digest: String, path: String, found: String },
    #[error("the home's layer {path} (image '{image}' version {version}) reads with SHA-256 {found}, not {digest}: it is damaged, nothing of it was backed up; see 'vdim image verify'")]
    StoreLayerDamaged { image: String, version: u32, digest: String, path: String, found: String },
    #[error(
        "profile {path} has SHA-256 {found}, the manifest says {expected}: the backup is damaged; use another backup"
    )]
    ProfileDiffers { path: String, expected: String, found: String },
    #[error("cannot use the backup directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
}

impl crate::error::Kind for BackupError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            BackupError::Catalog(e) => e.kind(),
            BackupError::Context(e) => e.kind(),
            BackupError::Lock(e) => e.kind(),
            BackupError::Store(e) => e.kind(),
            BackupError::NoBackup { .. } | BackupError::Missing { .. } | BackupError::LayerMissing { .. } => {
                K::NotFound
            }
            BackupError::BadManifest { .. }
            | BackupError::TooNew { .. }
            | BackupError::CatalogDiffers { .. }
            | BackupError::CatalogDamaged { .. }
            | BackupError::LayerDiffers { .. }
            | BackupError::ProfileDiffers { .. } => K::Invalid,
            BackupError::NotEmpty { .. } => K::Conflict,
            // The backup directory is the caller's path.
            BackupError::Dir { source, .. } => K::of_io(source),
            BackupError::StoreLayerDamaged { .. } | BackupError::Io { .. } => K::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, BackupError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io { what, path: path.display().to_string(), source }
}

// ---- the manifest -------------------------------------------------------------------------

/// The catalog's database engine; names the copy's file and how it is taken and opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
}

fn sqlite() -> crate::catalog::sql::Engine {
    crate::catalog::sql::Engine::Sqlite
}

impl Engine {
    /// The catalog copy's file name in a backup directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Engine::Sqlite => "catalog.db",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogCopy {
    /// The copy's own format (a SQLite file, whatever the catalog it was taken from).
    pub engine: Engine,
    /// The engine of the catalog it was taken from: a PostgreSQL catalog's rows are read in
    /// one snapshot into the copy. A restore puts them onto either engine.
    #[serde(default = "sqlite")]
    pub taken_from: crate::catalog::sql::Engine,
    /// Its file in the backup directory.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub schema_version: i64,
}

/// A version's layer, as the catalog copy names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    pub image: String,
    pub version: u32,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    pub name: String,
    pub sha256: String,
}

/// `DIR/manifest.json`: what the backup holds, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub vdim_version: String,
    /// When the catalog was copied (RFC 3339).
    pub created: String,
    /// The home it was taken of.
    pub home: String,
    pub catalog: CatalogCopy,
    /// What the catalog copy holds.
    pub counts: Counts,
    /// Whether `DIR/layers` holds the layers (`--layers`).
    pub layers_included: bool,
    /// Every live version's layer the catalog copy names, by image and version.
    pub layers: Vec<LayerEntry>,
    /// Hardware profiles (`DIR/profiles/<name>.toml`).
    pub profiles: Vec<ProfileEntry>,
    pub not_included: Vec<String>,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Reads a manifest: the format version first (a newer one is refused as such), then the
    /// whole of it, strictly, and [`Manifest::check`].
    pub fn parse(text: &str, dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST).display().to_string();
        let bad = |why: String| BackupError::BadManifest { path: path.clone(), why };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e})")))?;
        let format = value.get("format").and_then(serde_json::Value::as_u64).ok_or_else(|| bad("no format".into()))?;
        if format > u64::from(FORMAT) {
            return Err(BackupError::TooNew {
                dir: dir.display().to_string(),
                what: format!("manifest format {format}, this vdim reads up to {FORMAT}"),
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        m.check().map_err(bad)?;
        Ok(m)
    }

    /// What must hold before any file is opened by the manifest's word: the catalog copy's
    /// name is its engine's, digests are SHA-256 hex, profile names are plain file names.
    pub fn check(&self) -> std::result::Result<(), String> {
        let c = &self.catalog;
        if c.file != c.engine.file_name() {
            return Err(format!("its catalog file is {:?}, not {:?}", c.file, c.engine.file_name()));
        }
        if !is_sha256(&c.sha256) {
            return Err(format!("the catalog's SHA-256 {:?} is not one", c.sha256));
        }
        if let Some(l) = self.layers.iter().find(|l| !is_sha256(&l.digest)) {
            return Err(format!(
                "image '{}' version {} has the digest {:?}, not a SHA-256",
                l.image, l.version, l.digest
            ));
        }
        for p in &self.profiles {
            let plain = !p.name.is_empty()
                && !p.name.starts_with('.')
                && p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !plain {
                return Err(format!("the profile name {:?} is not a plain file name", p.name));
            }
            if !is_sha256(&p.sha256) {
                return Err(format!("profile '{}' has no SHA-256", p.name));
            }
        }
        Ok(())
    }

    /// Each layer once (several versions may share one file), the first version naming it.
    pub fn distinct_layers(&self) -> Vec<&LayerEntry> {
        let mut seen = BTreeMap::new();
        for l in &self.layers {
            seen.entry(l.digest.as_str()).or_insert(l);
        }
        seen.into_values().collect()
    }
}

/// Refuses a restore onto a home whose catalog holds anything of its own.
pub fn refuse_unless_empty(home: &Path, c: &Counts) -> Result<()> {
    let parts: Vec<String> = [(c.images, "image"), (c.pools, "pool"), (c.users, "user"), (c.hosts, "host")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}{}", if n == 1 { "" } else { "s" }))
        .collect();
    if parts.is_empty() {
        return Ok(());
    }
    Err(BackupError::NotEmpty { home: home.display().to_string(), what: parts.join(", ") })
}

// ---- file helpers -------------------------------------------------------------------------

fn sha256(path: &Path) -> Result<String> {
    digest::sha256_file(path, |_| {}).map_err(io("read", path))
}

/// Writes `bytes` as `dir/name`: a temporary name, synced, renamed, the directory synced.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = TmpFile(Some(Home::tmp_path(dir, name)));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(home::PRIVATE_FILE)
        .open(tmp.path())
        .map_err(io("create", tmp.path()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io("write", tmp.path()))?;
    let dest = dir.join(name);
    fs::rename(tmp.path(), &dest).map_err(io("rename", tmp.path()))?;
    tmp.disarm();
    store::fsync_dir(dir)?;
    Ok(())
}

/// Copies `src` to the new file `dest` (holes kept), synced; the copy's SHA-256.
fn copy_hashed(src: &Path, dest: &Path) -> Result<(String, u64)> {
    let file = fs::File::open(src).map_err(io("open", src))?;
    let len = file.metadata().map_err(io("read", src))?.len();
    store::copy_sparse(&file, len, dest).map_err(io("copy to", dest))?;
    store::fsync_file(dest)?;
    Ok((sha256(dest)?, len))
}

/// Removes `.tmp-<pid>-…` files an interrupted backup left in `dir`.
fn remove_dead_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if home::tmp_owner(&name).is_some_and(|pid| !home::pid_alive(pid)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn private_dir(path: &Path) -> Result<()> {
    home::create_private_dir(path).map_err(|source| BackupError::Dir { path: path.display().to_string(), source })
}

// ---- backup -------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub catalog_bytes: u64,
    pub catalog_sha256: String,
    pub counts: Counts,
    /// Distinct layers the catalog names, and their bytes.
    pub layers: usize,
    pub layer_bytes: u64,
    /// Whether the layers were copied (`--layers`).
    pub with_layers: bool,
    pub layers_copied: usize,
    /// Already in the directory with the right SHA-256.
    pub layers_present: usize,
    /// In the directory with the wrong SHA-256: copied again.
    pub layers_replaced: usize,
    pub bytes_copied: u64,
    pub profiles: usize,
    pub not_included: &'static [&'static str],
}

/// `vdim backup DIR [--layers]`: a consistent copy of the live catalog, the profiles, the
/// layers with `with_layers`, and the manifest last. Runs beside brokers and commands that
/// write the catalog; gc waits for it (the store lock, shared).
pub fn backup(ctx: &mut crate::context::Context, dir: &Path, with_layers: bool, actor: &Actor) -> Result<BackupReport> {
    let home = ctx.home().clone();
    let profiles_dir = ctx.settings().profiles.clone();
    let _store = lock::acquire(
        &home.locks(),
        names::STORE_LOCK,
        "the image store (gc is running)",
        Mode::Shared,
        Duration::from_secs(2),
    )?;
    private_dir(dir)?;
    remove_dead_leftovers(dir);
    // From here until the new manifest is in place, the directory is no complete backup.
    let manifest_path = dir.join(MANIFEST);
    match fs::remove_file(&manifest_path) {
        Ok(()) => store::fsync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &manifest_path)(e)),
    }

    let engine = Engine::Sqlite;
    let mut copy = TmpFile(Some(Home::tmp_path(dir, engine.file_name())));
    ctx.catalog().snapshot_to(copy.path())?;
    store::fsync_file(copy.path())?;
    let catalog_sha256 = sha256(copy.path())?;
    let catalog_bytes = fs::metadata(copy.path()).map_err(io("read", copy.path()))?.len();
    let (counts, schema_version, versions) = Catalog::read_copy(copy.path(), |tx| -> Result<_> {
        Ok((tx.counts()?, schema_version(tx)?, tx.live_versions()?))
    })?;
    let layers: Vec<LayerEntry> = versions
        .into_iter()
        .map(|(image, v)| LayerEntry { image, version: v.number, digest: v.digest, size: v.size })
        .collect();
    let mut manifest = Manifest {
        format: FORMAT,
        vdim_version: env!("CARGO_PKG_VERSION").to_string(),
        created: catalog::now(),
        home: home.root().display().to_string(),
        catalog: CatalogCopy {
            engine,
            taken_from: ctx.catalog().engine(),
            file: engine.file_name().to_string(),
            sha256: catalog_sha256.clone(),
            bytes: catalog_bytes,
            schema_version,
        },
        counts,
        layers_included: with_layers,
        layers,
        profiles: vec![],
        not_included: NOT_INCLUDED.iter().map(|s| s.to_string()).collect(),
    };
    let distinct: Vec<LayerEntry> = manifest.distinct_layers().into_iter().cloned().collect();
    let mut report = BackupReport {
        dir: dir.to_path_buf(),
        manifest: manifest_path.clone(),
        catalog_bytes,
        catalog_sha256: catalog_sha256.clone(),
        counts,
        layers: distinct.len(),
        layer_bytes: distinct.iter().map(|l| l.size).sum(),
        with_layers,
        layers_copied: 0,
        layers_present: 0,
        layers_replaced: 0,
        bytes_copied: 0,
        profiles: 0,
        not_included: NOT_INCLUDED,
    };
    if with_layers {
        copy_layers(&home, dir, &distinct, &mut report)?;
    }
    manifest.profiles = copy_profiles(&profiles_dir, dir)?;
    report.profiles = manifest.profiles.len();

    let catalog_path = dir.join(engine.file_name());
    fs::rename(copy.path(), &catalog_path).map_err(io("rename", copy.path()))?;
    copy.disarm();
    store::fsync_dir(dir)?;
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    write_atomic(dir, MANIFEST, &text)?;

    ctx.catalog().write(|tx| {
        tx.audit(Audit {
            actor: &actor.0,
            action: "catalog.backup",
            detail: json!({
                "dir": dir.display().to_string(),
                "catalog_sha256": catalog_sha256,
                "layers": report.layers,
                "with_layers": with_layers,
                "layers_copied": report.layers_copied,
            }),
            ..Default::default()
        })
    })?;
    Ok(report)
}

fn schema_version(tx: &Tx) -> std::result::Result<i64, CatalogError> {
    tx.schema_version()
}

/// The layers into `dir/layers/<sha256>.qcow2`: a file already there with the right SHA-256
/// stays, any other is replaced; each copy is written under a temporary name, synced, hashed
/// (what reads back is what the name promises), made 0440 and renamed.
fn copy_layers(home: &Home, dir: &Path, layers: &[LayerEntry], report: &mut BackupReport) -> Result<()> {
    let to = dir.join(LAYERS);
    private_dir(&to)?;
    remove_dead_leftovers(&to);
    for l in layers {
        let dest = to.join(home::layer_file_name(&l.digest));
        if dest.exists() {
            if sha256(&dest)? == l.digest {
                report.layers_present += 1;
                continue;
            }
            fs::remove_file(&dest).map_err(io("remove", &dest))?;
            report.layers_replaced += 1;
        }
        let src = home.layer(&l.digest);
        let mut tmp = TmpFile(Some(Home::tmp_path(&to, &home::layer_file_name(&l.digest))));
        let (found, len) = copy_hashed(&src, tmp.path())?;
        if found != l.digest {
            return Err(BackupError::StoreLayerDamaged {
                image: l.image.clone(),
                version: l.version,
                digest: l.digest.clone(),
                path: src.display().to_string(),
                found,
            });
        }
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(home::LAYER_MODE))
            .map_err(io("set mode of", tmp.path()))?;
        fs::rename(tmp.path(), &dest).map_err(io("rename", tmp.path()))?;
        tmp.disarm();
        report.layers_copied += 1;
        report.bytes_copied += len;
    }
    Ok(store::fsync_dir(&to)?)
}

/// Every `*.toml` of the profiles directory into `dir/profiles/`.
fn copy_profiles(profiles: &Path, dir: &Path) -> Result<Vec<ProfileEntry>> {
    let entries = match fs::read_dir(profiles) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io("list", profiles)(e)),
    };
    let mut found: Vec<(String, PathBuf)> = vec![];
    for e in entries {
        let e = e.map_err(io("list", profiles))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".toml").filter(|s| !s.is_empty() && !s.starts_with('.')) {
            if e.file_type().map_err(io("read", &path))?.is_file() {
                found.push((stem.to_string(), path));
            }
        }
    }
    found.sort();
    let to = dir.join(PROFILES);
    if !found.is_empty() {
        private_dir(&to)?;
        remove_dead_leftovers(&to);
    }
    let mut out = vec![];
    for (name, path) in found {
        let bytes = fs::read(&path).map_err(io("read", &path))?;
        write_atomic(&to, &format!("{name}.toml"), &bytes)?;
        out.push(ProfileEntry { name, sha256: digest_of(&bytes) });
    }
    Ok(out)
}

fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

// ---- restore ------------------------------------------------------------------------------

/// What a restore changes in the catalog it brings back, because the desktops' overlays and
/// domains stayed with the old machine.
#[derive(Debug, Default, Serialize)]
pub struct AfterRestore {
    pub sessions_ended: usize,
    /// Every desktop: a fresh overlay and domain on its version at the next pool command.
    pub desktops_reset: usize,
    /// Persistent desktops: their disks are not in a backup, they start afresh too.
    pub persistent_desktops: Vec<String>,
    /// Images whose draft was dropped (drafts are not in a backup).
    pub drafts_dropped: Vec<String>,
    /// Running rollouts: their vdim is gone; the next command halts them.
    pub rollouts_interrupted: usize,
    pub pools: Vec<String>,
    /// Pools that ran: booted again by `boot`.
    pub running_pools: Vec<String>,
}

/// Ends every session, marks every desktop for reset (a non-persistent one given back,
/// moving to where it was to go at logoff), drops drafts and orphans running rollouts.
pub fn after_restore(tx: &Tx) -> std::result::Result<AfterRestore, CatalogError> {
    let mut a = AfterRestore::default();
    for s in tx.open_sessions(None)? {
        if tx.end_session(&s.id)? {
            a.sessions_ended += 1;
        }
    }
    for s in tx.unreleased_sessions()? {
        tx.mark_released(&s.id)?;
    }
    for p in tx.pools()? {
        for d in tx.desktops(p.id)? {
            if p.persistent {
                a.persistent_desktops.push(d.name.clone());
            } else if d.assigned_to.is_some() {
                tx.unassign(d.id)?;
            }
            tx.mark_reset(d.id, d.target.unwrap_or(d.version))?;
            a.desktops_reset += 1;
        }
        if p.running {
            a.running_pools.push(p.name.clone());
        }
        a.pools.push(p.name);
    }
    let images = tx.images()?;
    for d in tx.drafts()? {
        if let Some(image) = images.iter().find(|i| i.id == d.image_id) {
            tx.delete_draft(image)?;
            a.drafts_dropped.push(image.name.clone());
        }
    }
    for r in tx.running_rollouts()? {
        tx.forget_rollout_driver(r.id)?;
        a.rollouts_interrupted += 1;
    }
    Ok(a)
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub home: PathBuf,
    pub from: PathBuf,
    /// When the backup was taken, and by which vdim.
    pub backup_created: String,
    pub backup_vdim_version: String,
    pub counts: Counts,
    /// Distinct layers verified (SHA-256) before the catalog was put in place.
    pub layers: usize,
    /// Of those, copied from the backup; the others were in the home already.
    pub layers_copied: usize,
    pub layers_in_home: usize,
    pub bytes_copied: u64,
    pub profiles_restored: Vec<String>,
    /// Profiles the home had already (kept as they are).
    pub profiles_kept: Vec<String>,
    #[serde(flatten)]
    pub after: AfterRestore,
    /// Filled by [`boot`]: each running pool's `pool start`.
    pub started: Vec<PoolOutcome>,
    pub not_started: Vec<NotStarted>,
    pub not_included: &'static [&'static str],
}

/// A pool that was running and could not be started again (the restore itself stands).
#[derive(Debug, Serialize)]
pub struct NotStarted {
    pub pool: String,
    pub error: String,
}

/// What is verified and waiting in the staging directory.
struct Staged {
    layers: Vec<(String, PathBuf)>,
    layers_in_home: usize,
    bytes_copied: u64,
    profiles: Vec<(String, Vec<u8>)>,
}

/// `vdim restore DIR`: the backup's catalog, layers and profiles onto an empty home. Nothing
/// is put in place before every layer the catalog names is verified; the catalog comes last,
/// so an interrupted restore leaves a home without objects (at most verified layers no
/// catalog row names, which `image gc` removes) and can simply be run again.
pub fn restore(settings: &Settings, dir: &Path, actor: &Actor) -> Result<RestoreReport> {
    let (manifest, copy) = open_backup(dir)?;
    let home = &settings.home;
    let location = settings.catalog()?;
    refuse_unless_empty_home(home, &location)?;
    for d in home.dirs() {
        home::create_private_dir(&d).map_err(io("create directory", &d))?;
    }
    let store_lock = lock::acquire(
        &home.locks(),
        names::STORE_LOCK,
        "the image store (another command is using it)",
        Mode::Exclusive,
        Duration::from_secs(2),
    )?;
    refuse_unless_empty_home(home, &location)?;
    let staging = PrivateDir::create(Home::tmp_path(&home.layers(), "restore"))?;
    let (mut catalog, staged_db, counts) = stage_catalog(&manifest, dir, &copy, staging.path())?;
    let staged = stage(&manifest, dir, home, staging.path())?;

    let after = catalog.write(|tx| -> Result<AfterRestore> {
        let after = after_restore(tx)?;
        tx.audit(Audit {
            actor: &actor.0,
            action: "catalog.restore",
            detail: json!({
                "from": dir.display().to_string(),
                "backup_created": manifest.created,
                "backup_vdim_version": manifest.vdim_version,
                "layers_copied": staged.layers.len(),
                "sessions_ended": after.sessions_ended,
                "desktops_reset": after.desktops_reset,
                "drafts_dropped": after.drafts_dropped,
            }),
            ..Default::default()
        })?;
        Ok(after)
    })?;
    let (profiles_restored, profiles_kept) = put_in_place(settings, &after, &staged)?;
    match &location {
        Location::Sqlite(db) => {
            catalog.close_as_one_file()?;
            put_catalog_file(&staged_db, db)?;
            store::fsync_dir(home.root())?;
        }
        // One transaction: every row, or none (a restore run again finds it empty).
        Location::Postgres(url) => {
            Catalog::connect(&location, true)?.fill_from(&mut catalog)?;
            crate::context::remember_catalog_url(home, url)?;
        }
    }
    drop(staging);
    drop(store_lock);

    Ok(RestoreReport {
        home: home.root().to_path_buf(),
        from: dir.to_path_buf(),
        backup_created: manifest.created.clone(),
        backup_vdim_version: manifest.vdim_version.clone(),
        counts,
        layers: staged.layers.len() + staged.layers_in_home,
        layers_copied: staged.layers.len(),
        layers_in_home: staged.layers_in_home,
        bytes_copied: staged.bytes_copied,
        profiles_restored,
        profiles_kept,
        after,
        started: vec![],
        not_started: vec![],
        not_included: NOT_INCLUDED,
    })
}

/// The manifest of the backup in `dir` and its catalog copy, whose SHA-256 must be the
/// manifest's and whose schema this vdim must know.
fn open_backup(dir: &Path) -> Result<(Manifest, PathBuf)> {
    let manifest = read_manifest(dir)?;
    let copy = dir.join(&manifest.catalog.file);
    check_sha(&copy, &manifest.catalog.sha256)?;
    let known = Catalog::known_schema_version();
    if manifest.catalog.schema_version > known {
        return Err(BackupError::TooNew {
            dir: dir.display().to_string(),
            what: format!("catalog schema {}, this vdim knows up to {known}", manifest.catalog.schema_version),
        });
    }
    Ok((manifest, copy))
}

/// The catalog copy as it will be, in the staging directory: checked again once copied,
/// opened (migrated to this vdim's schema), sound, naming no layer the manifest does not.
fn stage_catalog(manifest: &Manifest, dir: &Path, copy: &Path, staging: &Path) -> Result<(Catalog, PathBuf, Counts)> {
    let staged_db = staging.join("catalog.db");
    let (found, _) = copy_hashed(copy, &staged_db)?;
    if found != manifest.catalog.sha256 {
        return Err(BackupError::CatalogDiffers {
            path: copy.display().to_string(),
            expected: manifest.catalog.sha256.clone(),
            found,
        });
    }
    let damaged = |why: String| BackupError::CatalogDamaged { path: copy.display().to_string(), why };
    let mut catalog = Catalog::open(&staged_db, false).map_err(|e| damaged(crate::error::message(&e)))?;
    let problems = catalog.integrity_problems()?;
    if !problems.is_empty() {
        return Err(damaged(problems.join("; ")));
    }
    let (counts, named) = catalog.read(|tx| -> Result<_> { Ok((tx.counts()?, tx.live_versions()?)) })?;
    let listed: BTreeSet<&str> = manifest.layers.iter().map(|l| l.digest.as_str()).collect();
    if let Some((image, v)) = named.iter().find(|(_, v)| !listed.contains(v.digest.as_str())) {
        return Err(BackupError::BadManifest {
            path: dir.join(MANIFEST).display().to_string(),
            why: format!(
                "the catalog names layer {} (image '{image}' version {}), the manifest does not",
                v.digest, v.number
            ),
        });
    }
    Ok((catalog, staged_db, counts))
}

/// Everything staged into the home: the pools' directories, the layers, the profiles (the
/// catalog comes after). Returns the profiles (restored, kept).
fn put_in_place(settings: &Settings, after: &AfterRestore, staged: &Staged) -> Result<(Vec<String>, Vec<String>)> {
    let home = &settings.home;
    for p in &after.pools {
        for d in [home.pool_dir(p), home.pool_run(p)] {
            home::create_private_dir(&d).map_err(io("create directory", &d))?;
        }
    }
    for (digest, path) in &staged.layers {
        fs::set_permissions(path, fs::Permissions::from_mode(home::LAYER_MODE)).map_err(io("set mode of", path))?;
        fs::rename(path, home.layer(digest)).map_err(io("rename", path))?;
    }
    store::fsync_dir(&home.layers())?;
    put_profiles(&settings.profiles, &staged.profiles)
}

/// The staged SQLite catalog renamed into the home.
fn put_catalog_file(staged_db: &Path, db: &Path) -> Result<()> {
    for suffix in ["-wal", "-shm"] {
        // The empty catalog's own WAL must never be read as the new one's.
        let mut side = db.as_os_str().to_owned();
        side.push(suffix);
        match fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", Path::new(&side))(e)),
        }
    }
    fs::rename(staged_db, db).map_err(io("rename", staged_db))?;
    Ok(())
}

/// Boots the pools that were running, each by its `pool start` (its heal makes every
/// desktop's overlay and domain afresh, then boots them). A pool that cannot start is
/// reported; the restore stands.
pub fn boot(ctx: &mut crate::context::Context, report: &mut RestoreReport, actor: &Actor) {
    for pool in report.after.running_pools.clone() {
        let outcome = match ctx.pools() {
            Ok(mut pools) => pools.start(&pool, actor).map_err(|e| crate::error::message(&e)),
            Err(e) => Err(crate::error::message(&e)),
        };
        match outcome {
            Ok(o) => report.started.push(o),
            Err(error) => report.not_started.push(NotStarted { pool, error }),
        }
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    match fs::read_to_string(&path) {
        Ok(text) => Manifest::parse(&text, dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(BackupError::NoBackup { dir: dir.display().to_string() })
        }
        Err(e) => Err(BackupError::Dir { path: path.display().to_string(), source: e }),
    }
}

fn check_sha(copy: &Path, expected: &str) -> Result<()> {
    if !copy.is_file() {
        return Err(BackupError::Missing { what: "its catalog copy".into(), path: copy.display().to_string() });
    }
    let found = sha256(copy)?;
    if found != expected {
        return Err(BackupError::CatalogDiffers { path: copy.display().to_string(), expected: expected.into(), found });
    }
    Ok(())
}

fn refuse_unless_empty_home(home: &Home, location: &Location) -> Result<()> {
    if let Location::Sqlite(db) = location {
        if !db.exists() {
            return Ok(());
        }
    }
    refuse_unless_empty(home.root(), &Catalog::peek_counts(location)?)
}

/// Every layer verified into the staging directory (or found right in the home), and the
/// profiles checked.
fn stage(manifest: &Manifest, dir: &Path, home: &Home, staging: &Path) -> Result<Staged> {
    let mut staged = Staged { layers: vec![], layers_in_home: 0, bytes_copied: 0, profiles: vec![] };
    for l in manifest.distinct_layers() {
        let at_home = home.layer(&l.digest);
        if at_home.is_file() && sha256(&at_home)? == l.digest {
            staged.layers_in_home += 1;
            continue;
        }
        let src = dir.join(LAYERS).join(home::layer_file_name(&l.digest));
        if !src.is_file() {
            return Err(BackupError::LayerMissing {
                image: l.image.clone(),
                version: l.version,
                digest: l.digest.clone(),
                backup: dir.join(LAYERS).display().to_string(),
                home: home.layers().display().to_string(),
            });
        }
        let to = staging.join(home::layer_file_name(&l.digest));
        let (found, len) = copy_hashed(&src, &to)?;
        if found != l.digest {
            return Err(BackupError::LayerDiffers {
                image: l.image.clone(),
                version: l.version,
                digest: l.digest.clone(),
                path: src.display().to_string(),
                found,
            });
        }
        staged.bytes_copied += len;
        staged.layers.push((l.digest.clone(), to));
    }
    for p in &manifest.profiles {
        let path = dir.join(PROFILES).join(format!("{}.toml", p.name));
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                BackupError::Missing { what: format!("profile '{}'", p.name), path: path.display().to_string() }
            }
            _ => io("read", &path)(e),
        })?;
        let found = digest_of(&bytes);
        if found != p.sha256 {
            return Err(BackupError::ProfileDiffers {
                path: path.display().to_string(),
                expected: p.sha256.clone(),
                found,
            });
        }
        staged.profiles.push((p.name.clone(), bytes));
    }
    Ok(staged)
}

/// The backup's profiles where the home has none of that name (one it has is kept), then
/// any shipped profile still missing (as `vdim init`). Returns (restored, kept).
fn put_profiles(dir: &Path, profiles: &[(String, Vec<u8>)]) -> Result<(Vec<String>, Vec<String>)> {
    home::create_private_dir(dir).map_err(io("create directory", dir))?;
    let (mut restored, mut kept) = (vec![], vec![]);
    for (name, bytes) in profiles {
        let file = format!("{name}.toml");
        if dir.join(&file).exists() {
            kept.push(name.clone());
        } else {
            write_atomic(dir, &file, bytes)?;
            restored.push(name.clone());
        }
    }
    crate::profile::install_shipped(dir).map_err(io("install profiles into", dir))?;
    Ok((restored, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Channel;
    use crate::error::{ErrorKind, Kind};

    fn manifest() -> Manifest {
        let layer = |image: &str, version, d: char| LayerEntry {
            image: image.into(),
            version,
            digest: d.to_string().repeat(64),
            size: 4096,
        };
        Manifest {
            format: FORMAT,
            vdim_version: "0.1.0".into(),
            created: "2026-12-01T00:00:00Z".into(),
            home: "/var/lib/vdim".into(),
            catalog: CatalogCopy {
                engine: Engine::Sqlite,
                taken_from: crate::catalog::sql::Engine::Sqlite,
                file: "catalog.db".into(),
                sha256: "c".repeat(64),
                bytes: 8192,
                schema_version: 9,
            },
            counts: Counts { images: 2, versions: 3, ..Default::default() },
            layers_included: true,
            layers: vec![layer("a", 1, 'a'), layer("a", 2, 'b'), layer("b", 1, 'a')],
            profiles: vec![ProfileEntry { name: "test-linux".into(), sha256: "d".repeat(64) }],
            not_included: vec![],
        }
    }

    #[test]
    fn a_manifest_reads_back_as_it_was_written() {
        let m = manifest();
        let text = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(Manifest::parse(&text, Path::new("/b")).unwrap(), m);
        assert!(text.contains("\"engine\": \"sqlite\""), "{text}");
    }

    #[test]
    fn a_newer_format_is_refused_as_such_before_its_fields_are_read() {
        let text = json!({"format": FORMAT + 1, "something": "new"}).to_string();
        let e = Manifest::parse(&text, Path::new("/b")).unwrap_err();
        assert!(matches!(e, BackupError::TooNew { .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains("newer vdim"), "{e}");
    }

    #[test]
    fn a_manifest_with_unknown_fields_an_unknown_engine_or_no_json_is_refused() {
        let mut v = serde_json::to_value(manifest()).unwrap();
        v["extra"] = json!(1);
        let unknown_engine = {
            let mut v = serde_json::to_value(manifest()).unwrap();
            v["catalog"]["engine"] = json!("oracle");
            v
        };
        for text in [v.to_string(), unknown_engine.to_string(), "{".into(), "{}".into()] {
            let e = Manifest::parse(&text, Path::new("/b")).unwrap_err();
            assert!(matches!(e, BackupError::BadManifest { .. }), "{text}: {e}");
            assert!(e.to_string().contains("/b/manifest.json"), "{e}");
        }
    }

    #[test]
    fn the_checks_refuse_paths_and_digests_that_are_not_what_they_claim() {
        type Change = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|m| m.catalog.file = "../../etc/shadow".into()), "catalog file"),
            (Box::new(|m| m.catalog.sha256 = "C".repeat(64)), "SHA-256"),
            (Box::new(|m| m.layers[1].digest = "../x".into()), "version 2"),
            (Box::new(|m| m.profiles[0].name = "../evil".into()), "plain file name"),
            (Box::new(|m| m.profiles[0].name = ".hidden".into()), "plain file name"),
            (Box::new(|m| m.profiles[0].sha256 = String::new()), "no SHA-256"),
        ];
        for (change, why) in cases {
            let mut m = manifest();
            change(&mut m);
            let e = m.check().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        manifest().check().unwrap();
    }

    #[test]
    fn a_layer_two_versions_share_is_one_file() {
        let m = manifest();
        let d: Vec<(&str, u32)> = m.distinct_layers().iter().map(|l| (l.image.as_str(), l.version)).collect();
        assert_eq!(d, [("a", 1), ("a", 2)]);
    }

    #[test]
    fn only_a_home_without_images_pools_users_or_hosts_takes_a_restore() {
        let home = Path::new("/h");
        refuse_unless_empty(home, &Counts::default()).unwrap();
        let e = refuse_unless_empty(home, &Counts { images: 2, users: 1, ..Default::default() }).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.to_string().contains("/h is not empty: its catalog holds 2 images, 1 user"), "{e}");
        for c in [Counts { pools: 1, ..Default::default() }, Counts { hosts: 1, ..Default::default() }] {
            assert!(refuse_unless_empty(home, &c).is_err(), "{c:?}");
        }
    }

    /// A catalog with image `img` v1 (and its draft), a running pool `p` of two desktops (one
    /// in use with a target), a persistent pool `q`, user alice with a session, and a running
    /// rollout.
    fn populated() -> (tempfile::TempDir, Catalog) {
        use crate::catalog::pools::{NewDesktop, NewPool};
        use crate::catalog::users::NewSession;
        let (d, mut c) = crate::catalog::tests::cat();
        c.write(|tx| -> std::result::Result<(), CatalogError> {
            let img = tx.insert_image("img", 1)?;
            tx.insert_version(&img, None, &"1".repeat(64), 1, 1, "t", "")?;
            tx.insert_version(&img, Some(1), &"2".repeat(64), 1, 1, "t", "")?;
            for ch in Channel::ALL {
                tx.set_channel(&img, ch, 1)?;
            }
            tx.insert_draft(&img, 2, "drafts/img-v2-1.qcow2", "t")?;
            for (name, persistent) in [("p", false), ("q", true)] {
                let id = tx.insert_pool(&NewPool {
                    name,
                    image_id: img.id,
                    channel: Channel::Prod,
                    version: 1,
                    size: 2,
                    profile: "test-linux",
                    persistent,
                    virt_type: "qemu",
                    display_listen: "127.0.0.1",
                    insecure_display: false,
                    identity: None,
                })?;
                tx.set_pool_running(id, name == "p")?;
                for i in 1..=2u32 {
                    let dn = format!("vdim-{name}-00{i}");
                    let overlay = format!("desktops/{name}/{dn}.qcow2");
                    let nd =
                        NewDesktop { index: i, name: &dn, overlay: &overlay, version: 1, uuid: "u", host_id: None };
                    tx.insert_desktop(id, &nd)?;
                }
            }
            let alice = tx.insert_user("alice", false, &"a".repeat(64), None)?;
            let d1 = tx.desktop("vdim-p-001")?.expect("desktop");
            tx.assign(d1.id, "alice")?;
            tx.set_target(d1.id, Some(2))?;
            let q1 = tx.desktop("vdim-q-001")?.expect("desktop");
            tx.assign(q1.id, "alice")?;
            for (id, pool, desktop) in [("s".repeat(32), "p", "vdim-p-001"), ("t".repeat(32), "q", "vdim-q-001")] {
                tx.insert_session(&NewSession {
                    id: &id,
                    user_id: alice.id,
                    pool,
                    desktop,
                    expires_at: "2999-01-01T00:00:00Z",
                    console_token_hash: &"b".repeat(64),
                })?;
            }
            tx.sql().execute(
                "INSERT INTO rollouts (image_id, version, channel, from_version, state, waves, soak_ms, actor,
                                       owner_pid, created, updated)
                 VALUES (?1, 2, 'prod', 1, 'running', '1', 1, 't', ?2, 'then', 'then')",
                crate::catalog::sql::params![img.id, std::process::id()],
            )?;
            Ok(())
        })
        .unwrap();
        (d, c)
    }

    #[test]
    fn after_a_restore_no_session_is_open_and_every_desktop_is_due_for_a_fresh_start() {
        let (_d, mut c) = populated();
        let a = c.write(after_restore).unwrap();
        assert_eq!((a.sessions_ended, a.desktops_reset, a.rollouts_interrupted), (2, 4, 1));
        assert_eq!(a.persistent_desktops, ["vdim-q-001", "vdim-q-002"]);
        assert_eq!(a.drafts_dropped, ["img"]);
        assert_eq!(
            (a.pools.as_slice(), a.running_pools.as_slice()),
            (&["p".to_string(), "q".into()][..], &["p".to_string()][..])
        );
        c.read(|tx| -> std::result::Result<(), CatalogError> {
            assert!(tx.open_sessions(None)?.is_empty());
            assert!(tx.unreleased_sessions()?.is_empty(), "no logoff is left to finish: the desktops are reset anyway");
            assert!(tx.drafts()?.is_empty());
            for p in tx.pools()? {
                for d in tx.desktops(p.id)? {
                    assert!(d.needs_reset && d.target.is_none(), "{d:?}");
                    let owner = (p.persistent && d.index == 1).then(|| "alice".to_string());
                    assert_eq!(d.assigned_to, owner, "a persistent desktop keeps its owner: {d:?}");
                }
            }
            let moved = tx.desktop("vdim-p-001")?.expect("desktop");
            assert_eq!(moved.version, 2, "the in-use desktop goes where it was to go at logoff");
            let r = tx.running_rollouts()?;
            assert_eq!((r.len(), r[0].owner_pid), (1, None), "its vdim is on the old machine");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_snapshot_taken_while_another_connection_writes_is_one_sound_state() {
        let (d, mut c) = crate::catalog::tests::cat();
        let path = d.path().join("c.db");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut w = Catalog::open(&path, false).unwrap();
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    w.write(|tx| -> std::result::Result<(), CatalogError> {
                        let img = tx.insert_image(&format!("i{n}"), 1)?;
                        tx.insert_version(&img, None, &format!("{n:064}"), 1, 1, "t", "")?;
                        Ok(())
                    })
                    .unwrap();
                    n += 1;
                }
                n
            })
        };
        for k in 0..5 {
            let copy = d.path().join(format!("copy{k}.db"));
            c.snapshot_to(&copy).unwrap();
            assert!(!d.path().join(format!("copy{k}.db-wal")).exists(), "the copy is one file");
            let (counts, versions) = Catalog::read_copy(&copy, |tx| -> std::result::Result<_, CatalogError> {
                Ok((tx.counts()?, tx.live_versions()?))
            })
            .unwrap();
            assert_eq!(counts.images, counts.versions, "every image with its version, none half-written");
            assert_eq!(versions.len() as u64, counts.versions);
            let opened = Catalog::open(&copy, false).unwrap();
            assert!(opened.integrity_problems().unwrap().is_empty());
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(writer.join().unwrap() > 0);
    }
}
