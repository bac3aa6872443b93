//! The image store: golden images as chains of immutable, verified qcow2 layers.
//!
//! ```text
//!  import ──► v1 (standalone qcow2) ◄── v2 (delta) ◄── v3 (delta)      layers/<sha256>.qcow2, 0440
//!                                                   ▲
//!                                 edit ──► draft ───┘  seal ──► v4      drafts/<image>-*.qcow2
//! ```
//! Every command that changes things follows one order: write the file under a temporary
//! name, fsync, rename to its final name, fsync the directory, and only then commit the
//! catalog row that names it; deletions go the other way (row first, file after). A crash
//! at any point leaves the old state or the new one plus, at worst, an unnamed file that
//! `verify` reports and `gc` removes.

use crate::catalog::{self, Audit, Catalog, CatalogError, Channel, Image, Tx, Version};
use crate::digest;
use crate::home::{self, Home};
use crate::imgfmt::{self, Format, ImgFmtError};
use crate::lock::{self, Lock, LockError, Mode};
use crate::names::{self, NameError};
use crate::qcow2::{self, Qcow2Error};
use crate::qemu_img::{self, QemuImgError};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// How many distinct versions each channel has held that gc keeps for rollback.
pub const ROLLBACK_WINDOW: usize = 3;
use crate::home::LAYER_MODE;
/// Room left free after any write, so the catalog's own WAL can still commit.
const SPACE_MARGIN: u64 = 64 << 20;
/// Added to `qemu-img measure`'s prediction (and 1/64 of it) for an import's output cap.
const OUTPUT_SLACK: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Format(#[from] ImgFmtError),
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("not enough free space in {path}: {what} needs about {need} MiB, {free} MiB are free; free some space (try 'vdim image gc') and run the command again")]
    NoSpace { path: String, what: String, need: u64, free: u64 },
    #[error("image '{0}' has no draft: start one with 'vdim image edit {0}'")]
    NoDraft(String),
    #[error("the draft of image '{image}' has no changes since version {base}: nothing to seal (discard it with 'vdim image discard {image}')")]
    NoChanges { image: String, base: u32 },
    #[error("the draft of image '{image}' was written to while it was being sealed: {why}; nothing was sealed")]
    DraftInUse { image: String, why: String },
    #[error("the draft of image '{image}' at {path} is damaged or missing: {why}; discard it with 'vdim image discard {image}'")]
    BadDraft { image: String, path: String, why: String },
    #[error("image '{image}' already has a draft on version {base}: seal or discard it first")]
    DraftElsewhere { image: String, base: u32 },
    #[error("version {version} of image '{image}' was removed by gc on {removed}")]
    Removed { image: String, version: u32, removed: String },
    #[error("{0} already exists: choose another path or remove it first")]
    Exists(String),
    #[error(
        "importing {image} needs {need} bytes in {store} once converted (measured by qemu-img, \
         with margin), but only {free} bytes are free; free some space (try 'vdim image gc') or \
         check whether the image is an expansion bomb"
    )]
    WouldNotFit { image: String, store: String, need: u64, free: u64 },
    #[error("{path} reads differently in qemu-img than in vdim's inspection ({why}); vdim refuses such files: re-export the image from its source")]
    QemuDisagrees { path: String, why: String },
    #[error("the import of {path} produced an image vdim did not expect: {why}")]
    Unexpected { path: String, why: String },
}

impl crate::error::Kind for StoreError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            StoreError::Name(e) => e.kind(),
            StoreError::Catalog(e) => e.kind(),
            StoreError::Lock(e) => e.kind(),
            StoreError::Format(e) => e.kind(),
            StoreError::Qcow2(e) => e.kind(),
            StoreError::QemuImg(e) => e.kind(),
            StoreError::NoDraft(_) => K::NotFound,
            StoreError::QemuDisagrees { .. } => K::Invalid,
            StoreError::NoChanges { .. }
            | StoreError::DraftInUse { .. }
            | StoreError::BadDraft { .. }
            | StoreError::DraftElsewhere { .. }
            | StoreError::Removed { .. }
            | StoreError::Exists(_) => K::Conflict,
            StoreError::NoSpace { .. } | StoreError::WouldNotFit { .. } => K::Exhausted,
            StoreError::Io { .. } | StoreError::Unexpected { .. } => K::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.display().to_string(), source }
}

/// Who is doing it, for the version record and the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl Actor {
    /// `--author` when given, else `$USER`, else the uid.
    pub fn resolve(explicit: Option<&str>) -> Actor {
        if let Some(a) = explicit.filter(|a| !a.trim().is_empty()) {
            return Actor(a.trim().to_string());
        }
        match std::env::var("USER") {
            Ok(u) if !u.is_empty() => Actor(u),
            // SAFETY: getuid cannot fail.
            _ => Actor(format!("uid:{}", unsafe { libc::getuid() })),
        }
    }
}

/// The image store: layers, drafts and exports, over the catalog rows that name them.
/// A view borrowed from the [`crate::context::Context`], which owns the home and catalog.
pub struct Store<'a> {
    home: &'a Home,
    catalog: &'a mut Catalog,
}

// ---- reports (what commands print; stable JSON for scripts) --------------------------------

#[derive(Debug, Serialize)]
pub struct VersionReport {
    pub image: String,
    #[serde(flatten)]
    pub version: Version,
    pub channels: Vec<Channel>,
    pub path: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct DraftReport {
    pub image: String,
    pub draft: PathBuf,
    pub base_version: u32,
    pub created: String,
    /// False when `edit` found the draft already there and handed it back.
    pub new: bool,
}

#[derive(Debug, Serialize)]
pub struct HistoryEntry {
    #[serde(flatten)]
    pub version: Version,
    pub channels: Vec<Channel>,
}

#[derive(Debug, Serialize)]
pub struct History {
    pub image: String,
    pub virtual_size: u64,
    pub versions: Vec<HistoryEntry>,
    pub draft: Option<catalog::Draft>,
}

#[derive(Debug, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub versions: usize,
    pub newest: u32,
    pub channels: BTreeMap<Channel, u32>,
    pub virtual_size: u64,
    /// Bytes of all live layers of this image.
    pub stored: u64,
    pub draft: bool,
}

#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Problem {
    pub image: Option<String>,
    pub version: Option<u32>,
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub layers: usize,
    pub bytes_hashed: u64,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct GcItem {
    pub image: Option<String>,
    pub version: Option<u32>,
    pub path: String,
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed: Vec<GcItem>,
    pub bytes_freed: u64,
    pub kept_versions: usize,
}

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub image: String,
    pub version: u32,
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Debug, Default)]
pub struct ImportOptions<'a> {
    pub format: Option<Format>,
    pub note: &'a str,
}

// ---- helpers -------------------------------------------------------------------------------

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io("sync", dir))
}

pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io("sync", path))
}

pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs only writes into the struct we hand it; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn ensure_space(dir: &Path, need: u64, what: &str) -> Result<()> {
    let free = free_bytes(dir).map_err(io("check free space of", dir))?;
    if free < need.saturating_add(SPACE_MARGIN) {
        return Err(StoreError::NoSpace {
            path: dir.display().to_string(),
            what: what.to_string(),
            need: (need + SPACE_MARGIN).div_ceil(1 << 20),
            free: free / (1 << 20),
        });
    }
    Ok(())
}

/// Bytes a (possibly sparse) file really occupies.
fn allocated_bytes(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

/// Removes a temporary file unless disarmed: no half-written layer survives an error.
pub(crate) struct TmpFile(pub(crate) Option<PathBuf>);
impl TmpFile {
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().expect("armed")
    }
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}
impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// A private (0700) work directory in the store, removed with everything in it on drop.
pub(crate) struct PrivateDir(PathBuf);
impl PrivateDir {
    pub(crate) fn create(path: PathBuf) -> Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(io("create directory", &path))?;
        Ok(PrivateDir(path))
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copy the first `len` bytes of `src` to a new 0600 file at `dst`, leaving holes where the
/// source has holes (SEEK_DATA/SEEK_HOLE) or all-zero blocks.
pub(crate) fn copy_sparse(src: &fs::File, len: u64, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BLOCK: usize = 64 << 10;
    let out = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst)?;
    let seek = |from: u64, whence| {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let r = unsafe { libc::lseek(src.as_raw_fd(), from as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut buf = vec![0u8; 16 * BLOCK];
    let mut pos = 0;
    while pos < len {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => pos,
            Err(e) => return Err(e),
        };
        if data >= len {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut at = data;
        while at < hole {
            let n = buf.len().min((hole - at) as usize);
            src.read_exact_at(&mut buf[..n], at)?;
            for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, at + (i * BLOCK) as u64)?;
                }
            }
            at += n as u64;
        }
        pos = hole.max(data + 1);
    }
    out.set_len(len)?;
    Ok(())
}

/// What `qemu-img info` says of the private copy must be what the inspection found: a
/// format that reads differently in QEMU than in vdim is refused before conversion.
fn check_info(info: &serde_json::Value, probe: &imgfmt::Probe, src: &Path, copy: &Path) -> Result<()> {
    let disagree = |why: String| StoreError::QemuDisagrees { path: src.display().to_string(), why };
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(b) = info.get(key) {
            return Err(disagree(format!("qemu-img reports a backing file {b}")));
        }
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(disagree("qemu-img reports an external data file".into()));
    }
    // QEMU presents every size in whole 512-byte sectors.
    let expected = probe.virtual_size.map(|s| s.next_multiple_of(512));
    let seen = info.get("virtual-size").and_then(serde_json::Value::as_u64);
    if seen != expected {
        return Err(disagree(format!(
            "qemu-img reads a virtual size of {seen:?} bytes, the inspection found {expected:?}"
        )));
    }
    if probe.format == Format::Vmdk {
        let data = info.pointer("/format-specific/data");
        let create_type = data.and_then(|d| d.get("create-type")).and_then(serde_json::Value::as_str);
        if !matches!(create_type, Some("monolithicSparse" | "streamOptimized")) {
            return Err(disagree(format!("qemu-img reads create type {create_type:?}")));
        }
        let extents: Vec<&str> = data
            .and_then(|d| d.get("extents"))
            .and_then(serde_json::Value::as_array)
            .map(|a| a.iter().map(|e| e.get("filename").and_then(serde_json::Value::as_str).unwrap_or("?")).collect())
            .unwrap_or_default();
        if extents != [copy.to_string_lossy()] {
            return Err(disagree(format!("qemu-img reads the extents {extents:?}, not the file itself")));
        }
    }
    Ok(())
}

fn progress_bar(len: u64, msg: &str, bytes: bool) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(len);
    let tpl = if bytes {
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})"
    } else {
        "{msg} [{bar:30}] {pos}%"
    };
    pb.set_style(ProgressStyle::with_template(tpl).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_message(msg.to_string());
    Some(pb)
}

/// Hash a file, with a progress bar on a TTY for large ones.
fn hash_file(path: &Path, what: &str) -> Result<String> {
    let len = fs::metadata(path).map_err(io("read", path))?.len();
    let pb = if len > (256 << 20) { progress_bar(len, what, true) } else { None };
    let d = digest::sha256_file(path, |n| {
        if let Some(pb) = &pb {
            pb.set_position(n)
        }
    })
    .map_err(io("read", path))?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(d)
}

/// The backing string a layer of `parent_digest` carries (same directory).
fn layer_backing(parent_digest: &str) -> String {
    home::layer_file_name(parent_digest)
}

/// The backing string a draft or desktop `depth` directories below the home carries.
pub fn backing_from(depth: usize, digest: &str) -> String {
    format!("{}layers/{}", "../".repeat(depth), home::layer_file_name(digest))
}

impl<'a> Store<'a> {
    pub fn new(home: &'a Home, catalog: &'a mut Catalog) -> Store<'a> {
        Store { home, catalog }
    }

    pub fn home(&self) -> &Home {
        self.home
    }

    /// Shared store lock + exclusive image lock: what every command changing an image holds.
    pub fn lock_image(&self, image: &str) -> Result<(Lock, Lock)> {
        Ok(lock::for_change(
            &self.home.locks(),
            &names::image_lock(image),
            &format!("image '{image}'"),
            Duration::from_secs(2),
        )?)
    }

    pub fn layer_path(&self, v: &Version) -> PathBuf {
        self.home.layer(&v.digest)
    }

    // ---- import --------------------------------------------------------------------------

    pub fn import(&mut self, name: &str, src: &Path, opts: &ImportOptions, actor: &Actor) -> Result<VersionReport> {
        names::validate("image", name)?;
        let _locks = self.lock_image(name)?;
        // Refuse early, before any work, when the name is taken.
        self.catalog.read(|tx| match tx.image(name) {
            Ok(_) => Err(StoreError::Catalog(CatalogError::ImageExists(name.to_string()))),
            Err(CatalogError::ImageNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        })?;

        // Open the source once and work only on a private copy of those bytes: a file
        // swapped in at `src` afterwards (a drop folder, a share) is never read.
        let (source, len) = imgfmt::open_source(src)?;
        let allocated = allocated_bytes(&source.metadata().map_err(io("read", src))?);
        ensure_space(
            &self.home.layers(),
            allocated + allocated / 100,
            &format!("copying {} into the store", src.display()),
        )?;
        let work = PrivateDir::create(Home::tmp_path(&self.home.layers(), &format!("import-{name}")))?;
        // Named after the source so qemu-img's messages say which file they are about.
        let mut copy_name = std::ffi::OsString::from("source-");
        copy_name.push(src.file_name().unwrap_or("image".as_ref()));
        let copy = work.path().join(copy_name);
        copy_sparse(&source, len, &copy).map_err(|e| StoreError::Io {
            what: "copy",
            path: format!("{} to {}", src.display(), copy.display()),
            source: e,
        })?;
        drop(source);
        let copied = fs::File::open(&copy).map_err(io("open", &copy))?;

        // Our own header inspection first: qemu-img never sees a file we have not vetted.
        let probe = imgfmt::inspect_file(&copied, src, opts.format)?;
        let fmt = probe.format.qemu_name();
        let info = qemu_img::info(&copy, fmt)?;
        check_info(&info, &probe, src, &copy)?;

        // Expansion bombs: measure first, refuse what cannot fit, and cap the output there.
        let required = qemu_img::measure_qcow2(&copy, fmt)?;
        let cap = required.saturating_add(required / 64).saturating_add(OUTPUT_SLACK);
        let free = free_bytes(&self.home.layers()).map_err(io("check free space of", &self.home.layers()))?;
        if free < cap.saturating_add(SPACE_MARGIN) {
            return Err(StoreError::WouldNotFit {
                image: src.display().to_string(),
                store: self.home.layers().display().to_string(),
                need: cap.saturating_add(SPACE_MARGIN),
                free,
            });
        }

        let mut tmp = TmpFile(Some(work.path().join("layer.qcow2")));
        let pb = progress_bar(100, &format!("importing {}", src.display()), false);
        qemu_img::convert_to_qcow2(&copy, fmt, tmp.path(), Some(cap), pb.as_ref())?;
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        fs::remove_file(&copy).map_err(io("remove", &copy))?;
        let header = qcow2::read_header(tmp.path())?;
        if header.backing_file.is_some() || header.external_data_file {
            return Err(StoreError::Unexpected {
                path: src.display().to_string(),
                why: "the converted layer refers to another file".into(),
            });
        }
        let (digest, size) = self.seal_file(&mut tmp, "hashing the new layer")?;

        let version = self.catalog.write(|tx| -> Result<Version> {
            let image = tx.insert_image(name, header.virtual_size)?;
            let v = tx.insert_version(&image, None, &digest, size, header.virtual_size, &actor.0, opts.note)?;
            for ch in Channel::ALL {
                tx.set_channel(&image, ch, v.number)?;
            }
            tx.audit(Audit {
                actor: &actor.0,
                action: "image.import",
                image: Some(name),
                version: Some(v.number),
                detail: json!({"source": src.display().to_string(), "format": fmt, "digest": digest, "size": size}),
                ..Default::default()
            })?;
            Ok(v)
        })?;
        self.report(name, version)
    }

    /// Make a finished temporary file a sealed layer: fsync, hash, chmod 0440, rename to
    /// `<sha256>.qcow2`, fsync the directory. Returns (digest, size).
    fn seal_file(&self, tmp: &mut TmpFile, what: &str) -> Result<(String, u64)> {
        let path = tmp.path().to_path_buf();
        fsync_file(&path)?;
        let digest = hash_file(&path, what)?;
        let size = fs::metadata(&path).map_err(io("read", &path))?.len();
        fs::set_permissions(&path, fs::Permissions::from_mode(LAYER_MODE)).map_err(io("set mode of", &path))?;
        let final_path = self.home.layer(&digest);
        if final_path.exists() {
            // Same bytes already stored (content-addressed): keep the existing file;
            // the temporary copy goes when its guard drops.
        } else {
            fs::rename(&path, &final_path).map_err(io("rename", &path))?;
            tmp.disarm();
        }
        fsync_dir(&self.home.layers())?;
        Ok((digest, size))
    }

    fn report(&mut self, image: &str, version: Version) -> Result<VersionReport> {
        let channels = self.catalog.read(|tx| -> Result<_> {
            let img = tx.image(image)?;
            Ok(tx.channels(&img)?.into_iter().filter(|(_, v)| *v == version.number).map(|(c, _)| c).collect())
        })?;
        let path = self.layer_path(&version);
        Ok(VersionReport { image: image.to_string(), version, channels, path })
    }

    // ---- edit / discard / seal -------------------------------------------------------------

    /// Start (or hand back) the draft of `name`, on version `from` or the newest one.
    pub fn edit(&mut self, name: &str, from: Option<u32>, actor: &Actor) -> Result<DraftReport> {
        names::validate("image", name)?;
        let locks = self.lock_image(name)?;
        self.edit_locked(&locks, name, from, actor)
    }

    /// `edit` for a caller that holds the image lock (`lock_image`) and keeps it for more.
    pub fn edit_locked(
        &mut self,
        _held: &(Lock, Lock),
        name: &str,
        from: Option<u32>,
        actor: &Actor,
    ) -> Result<DraftReport> {
        names::validate("image", name)?;
        let (image, existing, base) = self.catalog.read(|tx| -> Result<_> {
            let image = tx.image(name)?;
            let draft = tx.draft(&image)?;
            let base = match from {
                Some(n) => tx.version(&image, n)?,
                None => tx.newest_version(&image)?,
            };
            Ok((image, draft, base))
        })?;
        if let Some(d) = existing {
            if from.is_some_and(|n| n != d.base_version) {
                return Err(StoreError::DraftElsewhere { image: name.into(), base: d.base_version });
            }
            return Ok(DraftReport {
                image: name.to_string(),
                draft: self.home.root().join(&d.path),
                base_version: d.base_version,
                created: d.created,
                new: false,
            });
        }
        if let Some(removed) = &base.removed {
            return Err(StoreError::Removed { image: name.into(), version: base.number, removed: removed.clone() });
        }
        let rel = format!("drafts/{name}-v{}-{}.qcow2", base.number, std::process::id());
        let path = self.home.root().join(&rel);
        let mut tmp = TmpFile(Some(Home::tmp_path(&self.home.drafts(), &format!("draft-{name}.qcow2"))));
        qcow2::create_overlay(tmp.path(), &backing_from(1, &base.digest), "qcow2", base.virtual_size)?;
        fs::rename(tmp.path(), &path).map_err(io("rename", tmp.path()))?;
        tmp.disarm();
        fsync_dir(&self.home.drafts())?;
        let created = self.catalog.write(|tx| -> Result<String> {
            tx.insert_draft(&image, base.number, &rel, &actor.0)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "image.edit",
                image: Some(name),
                version: Some(base.number),
                detail: json!({"draft": rel}),
                ..Default::default()
            })?;
            Ok(tx.draft(&image)?.map(|d| d.created).unwrap_or_default())
        });
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(DraftReport { image: name.to_string(), draft: path, base_version: base.number, created, new: true })
    }

    pub fn discard(&mut self, name: &str, actor: &Actor) -> Result<()> {
        names::validate("image", name)?;
        let _locks = self.lock_image(name)?;
        let draft = self.catalog.write(|tx| -> Result<_> {
            let image = tx.image(name)?;
            let draft = tx.draft(&image)?.ok_or_else(|| StoreError::NoDraft(name.into()))?;
            tx.delete_draft(&image)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "image.discard",
                image: Some(name),
                version: Some(draft.base_version),
                detail: json!({"draft": draft.path}),
                ..Default::default()
            })?;
            Ok(draft)
        })?;
        let path = self.home.root().join(&draft.path);
        fs::remove_file(&path)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(io("remove", &path))
    }

    /// Seal the draft as a new version: costs O(changed data): only the draft's own
    /// clusters are copied and hashed, never the virtual disk.
    pub fn seal(&mut self, name: &str, note: &str, actor: &Actor) -> Result<VersionReport> {
        names::validate("image", name)?;
        let locks = self.lock_image(name)?;
        self.seal_locked(&locks, name, note, actor, || Ok(()))
    }

    /// `seal` for a caller that holds the image lock; `after_copy` runs once the draft is
    /// copied and can still refuse (nothing is recorded then): the dev desktop's re-check.
    pub fn seal_locked(
        &mut self,
        _held: &(Lock, Lock),
        name: &str,
        note: &str,
        actor: &Actor,
        after_copy: impl FnOnce() -> Result<()>,
    ) -> Result<VersionReport> {
        names::validate("image", name)?;
        let (image, draft, base) = self.catalog.read(|tx| -> Result<_> {
            let image = tx.image(name)?;
            let draft = tx.draft(&image)?.ok_or_else(|| StoreError::NoDraft(name.into()))?;
            let base = tx.version(&image, draft.base_version)?;
            Ok((image, draft, base))
        })?;
        let draft_path = self.home.root().join(&draft.path);
        let bad =
            |why: String| StoreError::BadDraft { image: name.into(), path: draft_path.display().to_string(), why };
        let header = qcow2::read_header(&draft_path).map_err(|e| bad(e.to_string()))?;
        let want = backing_from(1, &base.digest);
        if header.backing_file.as_deref() != Some(want.as_str()) {
            return Err(bad(format!("its backing file is {:?}, expected '{want}'", header.backing_file)));
        }
        if header.corrupt || header.external_data_file {
            return Err(bad("its header is marked corrupt or names a data file".into()));
        }
        if !qcow2::has_allocated_clusters(&draft_path)? {
            return Err(StoreError::NoChanges { image: name.into(), base: base.number });
        }
        let draft_size = fs::metadata(&draft_path).map_err(io("read", &draft_path))?.len();
        ensure_space(&self.home.layers(), draft_size, &format!("sealing the draft of '{name}'"))?;

        let mut tmp = TmpFile(Some(Home::tmp_path(&self.home.layers(), &format!("seal-{name}.qcow2"))));
        fs::copy(&draft_path, tmp.path()).map_err(io("copy", &draft_path))?;
        after_copy()?;
        // The layer lives next to its parent: same-directory backing name, format stated.
        qcow2::set_backing(tmp.path(), &layer_backing(&base.digest), "qcow2")?;
        let (digest, size) = self.seal_file(&mut tmp, "hashing the sealed layer")?;

        let version = self.catalog.write(|tx| -> Result<Version> {
            let v = tx.insert_version(&image, Some(base.number), &digest, size, header.virtual_size, &actor.0, note)?;
            tx.set_channel(&image, Channel::Dev, v.number)?;
            tx.delete_draft(&image)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "image.seal",
                image: Some(name),
                version: Some(v.number),
                detail: json!({"parent": base.number, "digest": digest, "size": size, "note": note}),
                ..Default::default()
            })?;
            Ok(v)
        })?;
        // After the commit: a crash here leaves an unnamed draft file that gc removes.
        let _ = fs::remove_file(&draft_path);
        self.report(name, version)
    }

    // ---- history / list --------------------------------------------------------------------

    pub fn history(&mut self, name: &str) -> Result<History> {
        names::validate("image", name)?;
        self.catalog.read(|tx| -> Result<History> {
            let image = tx.image(name)?;
            let channels = tx.channels(&image)?;
            let versions = tx
                .versions(&image)?
                .into_iter()
                .map(|v| HistoryEntry {
                    channels: channels.iter().filter(|(_, n)| *n == v.number).map(|(c, _)| *c).collect(),
                    version: v,
                })
                .collect();
            Ok(History {
                image: image.name.clone(),
                virtual_size: image.virtual_size,
                versions,
                draft: tx.draft(&image)?,
            })
        })
    }

    pub fn list(&mut self) -> Result<Vec<ImageSummary>> {
        self.catalog.read(|tx| -> Result<_> {
            let mut out = Vec::new();
            for image in tx.images()? {
                let versions = tx.versions(&image)?;
                out.push(ImageSummary {
                    name: image.name.clone(),
                    versions: versions.len(),
                    newest: versions.last().map(|v| v.number).unwrap_or(0),
                    channels: tx.channels(&image)?.into_iter().collect(),
                    virtual_size: image.virtual_size,
                    stored: versions.iter().filter(|v| v.removed.is_none()).map(|v| v.size).sum(),
                    draft: tx.draft(&image)?.is_some(),
                });
            }
            Ok(out)
        })
    }

    // ---- verify ----------------------------------------------------------------------------

    /// Re-hash every layer and check mode, backing file and format against the catalog, and
    /// `qemu-img check` each; report unnamed files left by interrupted commands.
    pub fn verify(&mut self, only: Option<&str>) -> Result<VerifyReport> {
        if let Some(n) = only {
            names::validate("image", n)?;
        }
        let (versions, drafts, images) = self.catalog.read(|tx| -> Result<_> {
            if let Some(n) = only {
                tx.image(n)?;
            }
            Ok((tx.live_versions()?, tx.drafts()?, tx.images()?))
        })?;
        let by_number: BTreeMap<(String, u32), &Version> =
            versions.iter().map(|(i, v)| ((i.clone(), v.number), v)).collect();
        let mut problems = Vec::new();
        let mut bytes = 0u64;
        let mut layers = 0usize;
        for (image, v) in versions.iter().filter(|(i, _)| only.is_none_or(|n| n == i)) {
            layers += 1;
            let path = self.layer_path(v);
            let (found, hashed) = self.verify_layer(image, v, &path, &by_number);
            bytes += hashed;
            problems.extend(found.into_iter().map(|problem| Problem {
                image: Some(image.clone()),
                version: Some(v.number),
                path: path.display().to_string(),
                problem,
            }));
        }
        // Drafts: their file must exist and sit on the version they say.
        for d in &drafts {
            let Some(image) = images.iter().find(|i| i.id == d.image_id) else { continue };
            if only.is_some_and(|n| n != image.name) {
                continue;
            }
            let path = self.home.root().join(&d.path);
            if let Err(e) = qcow2::read_header(&path) {
                problems.push(Problem {
                    image: Some(image.name.clone()),
                    version: Some(d.base_version),
                    path: path.display().to_string(),
                    problem: format!("draft unreadable: {e}"),
                });
            }
        }
        if only.is_none() {
            for (path, _, why) in self.unnamed_files(&versions, &drafts)? {
                problems.push(Problem {
                    image: None,
                    version: None,
                    path: path.display().to_string(),
                    problem: format!("{why}; 'vdim image gc' removes it"),
                });
            }
        }
        Ok(VerifyReport { ok: problems.is_empty(), layers, bytes_hashed: bytes, problems })
    }

    /// Problems with one sealed layer (mode, content, size, backing file, format, `qemu-img
    /// check`), and the bytes read to hash it.
    fn verify_layer(
        &self,
        image: &str,
        v: &Version,
        path: &Path,
        by_number: &BTreeMap<(String, u32), &Version>,
    ) -> (Vec<String>, u64) {
        let mut found = Vec::new();
        let mut report = |problem: String| found.push(problem);
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                report(format!("layer file is missing or unreadable ({e})"));
                return (found, 0);
            }
        };
        if !meta.file_type().is_file() {
            report("layer is not a regular file".into());
            return (found, 0);
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & !LAYER_MODE != 0 {
            report(format!("mode is {mode:04o}, sealed layers must be 0440 or stricter (read-only, private)"));
        }
        match hash_file(path, &format!("verifying {image} v{}", v.number)) {
            Ok(d) if d == v.digest => {}
            Ok(d) => report(format!("content changed: SHA-256 is {d}, the catalog recorded {}", v.digest)),
            Err(e) => report(format!("cannot read: {e}")),
        }
        if meta.len() != v.size {
            report(format!("size is {} bytes, the catalog recorded {}", meta.len(), v.size));
        }
        let expected_backing = match v.parent {
            None => None,
            Some(p) => match by_number.get(&(image.to_string(), p)) {
                Some(pv) => Some(layer_backing(&pv.digest)),
                None => {
                    report(format!("its parent version {p} has no layer"));
                    return (found, meta.len());
                }
            },
        };
        match qcow2::read_header(path) {
            Err(e) => report(format!("qcow2 header unreadable: {e}")),
            Ok(h) => {
                if h.backing_file != expected_backing {
                    report(format!("backing file is {:?}, the catalog expects {:?}", h.backing_file, expected_backing));
                }
                if expected_backing.is_some() && h.backing_format.as_deref() != Some("qcow2") {
                    report(format!("backing format is {:?}, expected \"qcow2\"", h.backing_format));
                }
                if h.corrupt {
                    report("qcow2 corrupt bit is set".into());
                }
                if h.external_data_file {
                    report("layer names an external data file".into());
                }
            }
        }
        match qemu_img::check(path) {
            Ok(issues) => issues.into_iter().for_each(|i| report(format!("qemu-img check: {i}"))),
            Err(e) => report(e.to_string()),
        }
        (found, meta.len())
    }

    /// Files in layers/ and drafts/ that no catalog row names (left by a crash), except
    /// temporary files of commands still running. Returns (path, bytes, why).
    fn unnamed_files(
        &self,
        versions: &[(String, Version)],
        drafts: &[catalog::Draft],
    ) -> Result<Vec<(PathBuf, u64, String)>> {
        let live: BTreeSet<String> = versions.iter().map(|(_, v)| home::layer_file_name(&v.digest)).collect();
        let draft_files: BTreeSet<PathBuf> = drafts.iter().map(|d| self.home.root().join(&d.path)).collect();
        let mut out = Vec::new();
        for (dir, kind) in [(self.home.layers(), "layer"), (self.home.drafts(), "draft")] {
            let entries = fs::read_dir(&dir).map_err(io("list", &dir))?;
            for e in entries {
                let e = e.map_err(io("list", &dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                if let Some(pid) = home::tmp_owner(&name) {
                    if !home::pid_alive(pid) || pid == std::process::id() as i32 {
                        out.push((path, len, format!("temporary file of an interrupted command (pid {pid})")));
                    }
                    continue;
                }
                let named = match kind {
                    "layer" => live.contains(&name),
                    _ => draft_files.contains(&path),
                };
                if !named {
                    out.push((path, len, format!("{kind} file that no catalog entry names")));
                }
            }
        }
        Ok(out)
    }

    // ---- gc --------------------------------------------------------------------------------

    /// Versions that someone can still need: what channels, drafts, pools and the rollback
    /// window point at, and every ancestor of those.
    fn needed_versions(tx: &Tx, image: &Image) -> Result<BTreeSet<u32>> {
        let versions = tx.versions(image)?;
        let parent: BTreeMap<u32, Option<u32>> = versions.iter().map(|v| (v.number, v.parent)).collect();
        let mut roots: Vec<u32> = tx.channels(image)?.into_iter().map(|(_, v)| v).collect();
        roots.extend(tx.rollback_window(image, ROLLBACK_WINDOW)?);
        if let Some(d) = tx.draft(image)? {
            roots.push(d.base_version);
        }
        roots.extend(tx.versions_used_by_pools(image.id, ROLLBACK_WINDOW)?);
        let mut keep = BTreeSet::new();
        for mut v in roots {
            while keep.insert(v) {
                match parent.get(&v).copied().flatten() {
                    Some(p) => v = p,
                    None => break,
                }
            }
        }
        Ok(keep)
    }

    /// Remove layers no one can need, and files left by crashes. What channels, drafts, the
    /// rollback window and pools need comes from the catalog itself.
    pub fn gc(&mut self, dry_run: bool, actor: &Actor) -> Result<GcReport> {
        let _store = lock::acquire(
            &self.home.locks(),
            names::STORE_LOCK,
            "the image store",
            Mode::Exclusive,
            Duration::from_secs(2),
        )?;
        let (doomed, kept) = self.catalog.read(|tx| -> Result<_> {
            let mut doomed = Vec::new();
            let mut kept = 0;
            for image in tx.images()? {
                let keep = Self::needed_versions(tx, &image)?;
                for v in tx.versions(&image)? {
                    if v.removed.is_some() {
                        continue;
                    }
                    if keep.contains(&v.number) {
                        kept += 1;
                    } else {
                        doomed.push((image.clone(), v));
                    }
                }
            }
            Ok((doomed, kept))
        })?;
        let mut removed = Vec::new();
        for (image, v) in &doomed {
            let path = self.layer_path(v);
            let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            removed.push(GcItem {
                image: Some(image.name.clone()),
                version: Some(v.number),
                path: path.display().to_string(),
                bytes,
                reason: "no channel, pool, draft or rollback window needs it".into(),
            });
        }
        if !dry_run && !doomed.is_empty() {
            // Rows first, files after: the catalog never names a missing layer.
            self.catalog.write(|tx| -> Result<()> {
                for (image, v) in &doomed {
                    tx.mark_removed(image, v.number)?;
                    tx.audit(Audit {
                        actor: &actor.0,
                        action: "image.gc",
                        image: Some(&image.name),
                        version: Some(v.number),
                        detail: json!({"digest": v.digest}),
                        ..Default::default()
                    })?;
                }
                Ok(())
            })?;
            for (_, v) in &doomed {
                let still_used = self.catalog.read(|tx| tx.digest_in_use(&v.digest))?;
                if !still_used {
                    let p = self.layer_path(v);
                    let _ = fs::remove_file(&p);
                }
            }
        }
        let (versions, drafts) = self.catalog.read(|tx| -> Result<_> { Ok((tx.live_versions()?, tx.drafts()?)) })?;
        for (path, bytes, why) in self.unnamed_files(&versions, &drafts)? {
            if removed.iter().any(|r| r.path == path.display().to_string()) {
                continue;
            }
            if !dry_run {
                // An interrupted import leaves its private work directory.
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                removed.map_err(io("remove", &path))?;
            }
            removed.push(GcItem { image: None, version: None, path: path.display().to_string(), bytes, reason: why });
        }
        if !dry_run {
            let _ = fsync_dir(&self.home.layers());
        }
        let bytes_freed = removed.iter().map(|r| r.bytes).sum();
        Ok(GcReport { dry_run, removed, bytes_freed, kept_versions: kept })
    }

    // ---- export ----------------------------------------------------------------------------

    /// One flattened, standalone qcow2 of a version.
    pub fn export(&mut self, name: &str, number: u32, dest: &Path, actor: &Actor) -> Result<ExportReport> {
        names::validate("image", name)?;
        let (chain_bytes, v) = self.catalog.read(|tx| -> Result<_> {
            let image = tx.image(name)?;
            let v = tx.version(&image, number)?;
            if let Some(r) = &v.removed {
                return Err(StoreError::Removed { image: name.into(), version: number, removed: r.clone() });
            }
            let mut bytes = 0;
            let mut cur = Some(v.clone());
            while let Some(c) = cur {
                bytes += c.size;
                cur = match c.parent {
                    Some(p) => Some(tx.version(&image, p)?),
                    None => None,
                };
            }
            Ok((bytes, v))
        })?;
        if dest.exists() {
            return Err(StoreError::Exists(dest.display().to_string()));
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        ensure_space(&dir, chain_bytes, &format!("exporting '{name}' version {number}"))?;
        let mut tmp = TmpFile(Some(Home::tmp_path(&dir, "export.qcow2")));
        let pb = progress_bar(100, &format!("exporting {name} v{number}"), false);
        qemu_img::convert_to_qcow2(&self.layer_path(&v), "qcow2", tmp.path(), None, pb.as_ref())?;
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        fsync_file(tmp.path())?;
        fs::rename(tmp.path(), dest).map_err(io("rename", tmp.path()))?;
        tmp.disarm();
        let size = fs::metadata(dest).map_err(io("read", dest))?.len();
        self.catalog.write(|tx| {
            tx.audit(Audit {
                actor: &actor.0,
                action: "image.export",
                image: Some(name),
                version: Some(number),
                detail: json!({"path": dest.display().to_string()}),
                ..Default::default()
            })
        })?;
        Ok(ExportReport { image: name.into(), version: number, path: dest.to_path_buf(), size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn copy_sparse_keeps_the_bytes_and_the_holes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        let f = fs::File::create(&src).expect("create");
        f.set_len(64 << 20).expect("size");
        f.write_all_at(b"start", 0).expect("write");
        f.write_all_at(&[0u8; 1 << 20], 8 << 20).expect("allocated zeros");
        f.write_all_at(b"middle", 32 << 20).expect("write");
        f.write_all_at(b"end", (64 << 20) - 3).expect("write");
        let work = PrivateDir::create(tmp.path().join("work")).expect("dir");
        assert_eq!(fs::metadata(work.path()).expect("stat").mode() & 0o777, 0o700);
        let dst = work.path().join("copy");
        copy_sparse(&fs::File::open(&src).expect("open"), 64 << 20, &dst).expect("copy");
        assert_eq!(fs::read(&src).expect("read"), fs::read(&dst).expect("read"));
        let meta = fs::metadata(&dst).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(allocated_bytes(&meta) < 1 << 20, "holes and zero blocks stay holes: {}", allocated_bytes(&meta));
        let dir = work.path().to_path_buf();
        drop(work);
        assert!(!dir.exists(), "the work directory goes with its guard");
    }

    #[test]
    fn qemu_img_info_must_agree_with_the_inspection() {
        let probe = |format, size| imgfmt::Probe { format, virtual_size: Some(size), file_size: 4096 };
        let (src, copy) = (Path::new("/in/a.vmdk"), Path::new("/store/w/a.vmdk"));
        let vmdk = |create: &str, extents: serde_json::Value, size: u64| json!({"virtual-size": size, "format-specific": {"type": "vmdk", "data": {"create-type": create, "extents": extents}}});
        let one = json!([{"filename": "/store/w/a.vmdk"}]);
        check_info(&vmdk("streamOptimized", one.clone(), 1 << 20), &probe(Format::Vmdk, 1 << 20), src, copy)
            .expect("agrees");
        for (info, why) in [
            (vmdk("monolithicFlat", one.clone(), 1 << 20), "create type"),
            (vmdk("monolithicSparse", json!([{"filename": "/etc/shadow"}]), 1 << 20), "extents"),
            (
                vmdk("monolithicSparse", json!([{"filename": "/store/w/a.vmdk"}, {"filename": "/x"}]), 1 << 20),
                "extents",
            ),
            (vmdk("monolithicSparse", one.clone(), 2 << 20), "virtual size"),
            (json!({"virtual-size": 1 << 20, "backing-filename": "/etc/passwd"}), "backing file"),
        ] {
            let e = check_info(&info, &probe(Format::Vmdk, 1 << 20), src, copy).expect_err(why).to_string();
            assert!(e.contains(why) && e.contains("/in/a.vmdk"), "{e}");
        }
        // A raw file of 1000 bytes is a disk of two sectors to QEMU.
        check_info(&json!({"virtual-size": 1024}), &probe(Format::Raw, 1000), src, copy).expect("rounded");
    }
}
