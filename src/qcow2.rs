//! Native qcow2 header reading and the thin-overlay writer.
//!
//! vdim creates hundreds of desktop overlays at once, and spawning `qemu-img create` costs
//! about 7 ms of process start per file, so the (tiny, fixed-shape) overlay is written here
//! directly. Reading headers natively also lets `verify` check backing paths without running
//! QEMU. Layout follows QEMU's docs/interop/qcow2.txt; all integers are big-endian.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";

const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
/// What QEMU >= 5.1 writes: the 104-byte v3 header, the compression-type byte, padding.
const OVERLAY_HEADER_LEN: usize = 112;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Dirty, corrupt, external data file, compression type, extended L2.
pub(crate) const INCOMPAT_KNOWN: u64 = 0x1f;

pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's QCOW_MAX_L1_SIZE and QCOW_MAX_REFTABLE_SIZE.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: usize = 1023;
/// QEMU keeps the backing format in a 16-byte C string.
const MAX_FORMAT_NAME: usize = 15;

const OVERLAY_CLUSTER_BITS: u32 = 16;
const OVERLAY_CLUSTER: u64 = 1 << OVERLAY_CLUSTER_BITS;
/// Clusters before the L1 table: header, refcount table, refcount block.
const OVERLAY_META_CLUSTERS: u64 = 3;

/// Feature name table QEMU 7.2 writes into every v3 image; copied so our overlays carry the
/// same self-description as qemu-img's.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
const FEATURE_ENTRY_LEN: usize = 48;

/// What vdim needs to know about a qcow2 file's header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderInfo {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_bits: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub corrupt: bool,
    pub external_data_file: bool,
    pub dirty: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("Cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a qcow2 image (no 'QFI\\xfb' magic at offset 0)", .path.display())]
    NotQcow2 { path: PathBuf },
    #[error("{} is a qcow2 version {version} image; only versions 2 and 3 are supported", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{} has a malformed qcow2 header: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{} uses qcow2 incompatible features vdim does not understand (bits {bits:#x}); \
         convert it with 'qemu-img convert -O qcow2' first",
        .path.display()
    )]
    UnknownFeatures { path: PathBuf, bits: u64 },
    #[error("{} already exists; refusing to overwrite it with a new overlay", .path.display())]
    Exists { path: PathBuf },
    #[error("Invalid backing file name {name:?} for {}: {reason}", .path.display())]
    InvalidBacking { path: PathBuf, name: String, reason: &'static str },
    #[error("Invalid backing format {format:?} for {}: {reason}", .path.display())]
    InvalidBackingFormat { path: PathBuf, format: String, reason: &'static str },
    #[error("Invalid virtual size {size} for {}: {reason}", .path.display())]
    InvalidSize { path: PathBuf, size: u64, reason: String },
    #[error(
        "The new backing file name does not fit in the header cluster of {} \
         ({needed} bytes needed, {available} available); use a shorter (relative) name",
        .path.display()
    )]
    HeaderFull { path: PathBuf, needed: u64, available: u64 },
}

impl crate::error::Kind for Qcow2Error {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        // Only vdim's own layers, drafts and overlays are read or written here (imports go
        // through imgfmt): a bad one is vdim's or the disk's fault, never the caller's.
        match self {
            Qcow2Error::Io { .. }
            | Qcow2Error::NotQcow2 { .. }
            | Qcow2Error::UnsupportedVersion { .. }
            | Qcow2Error::Malformed { .. }
            | Qcow2Error::UnknownFeatures { .. }
            | Qcow2Error::Exists { .. }
            | Qcow2Error::InvalidBacking { .. }
            | Qcow2Error::InvalidBackingFormat { .. }
            | Qcow2Error::InvalidSize { .. }
            | Qcow2Error::HeaderFull { .. } => K::Internal,
        }
    }
}

/// Why a header buffer could not be parsed; callers attach the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderError {
    NotQcow2,
    Version(u32),
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed first cluster of a qcow2 file (v2 fields absent from the file are defaulted
/// the way QEMU does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// In file order, without the end marker.
    pub extensions: Vec<Extension>,
    pub backing_file: Option<Vec<u8>>,
}

impl RawHeader {
    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub(crate) fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }

    /// Guest bytes one L1 entry covers, as a shift.
    fn l1_entry_shift(&self) -> u32 {
        let entry_bits = if self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 { 4 } else { 3 };
        self.cluster_bits + (self.cluster_bits - entry_bits)
    }
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// Walk the header extensions from `start` up to `ext_end`. Without a backing file the
/// list must close with an end marker.
fn read_extensions(
    buf: &[u8],
    start: u64,
    ext_end: u64,
    backing_file_offset: u64,
) -> Result<Vec<Extension>, HeaderError> {
    let malformed = |s: String| Err(HeaderError::Malformed(s));
    let mut extensions = Vec::new();
    let mut off = start;
    let mut saw_end = false;
    while off < ext_end {
        if off + 8 > ext_end || off + 8 > buf.len() as u64 {
            return malformed(format!("header extension at offset {off} runs past the first cluster or the file"));
        }
        let kind = be32(buf, off as usize);
        let len = u64::from(be32(buf, off as usize + 4));
        let data_start = off + 8;
        let data_end = data_start + len;
        if data_end > ext_end || data_end > buf.len() as u64 {
            return malformed(format!(
                "header extension {kind:#010x} at offset {off} ({len} bytes) runs past the \
                 first cluster or the file"
            ));
        }
        if kind == EXT_END {
            saw_end = true;
            break;
        }
        extensions.push(Extension { kind, data: buf[data_start as usize..data_end as usize].to_vec() });
        off = data_start + align8(len);
    }
    if !saw_end && backing_file_offset == 0 {
        return malformed("the header extensions have no end marker".to_string());
    }
    Ok(extensions)
}

/// The backing file name the header points at; it must lie inside the first cluster and the file.
fn read_backing_name(buf: &[u8], offset: u64, size: u32, cluster_size: u64) -> Result<Vec<u8>, HeaderError> {
    let malformed = |s: String| Err(HeaderError::Malformed(s));
    let len = u64::from(size);
    if offset > cluster_size || len > (MAX_BACKING_NAME as u64).min(cluster_size - offset) {
        return malformed(format!(
            "backing file name at offset {offset} ({len} bytes) does not fit \
             in the first cluster or exceeds {MAX_BACKING_NAME} bytes"
        ));
    }
    let end = offset + len;
    if end > buf.len() as u64 {
        return malformed("the backing file name lies beyond the end of the file".into());
    }
    Ok(buf[offset as usize..end as usize].to_vec())
}

/// Parse the header, its extensions and the backing file name from the start of the file
/// (`buf` should hold the whole first cluster, or the whole file if shorter).
pub(crate) fn parse_header(buf: &[u8]) -> Result<RawHeader, HeaderError> {
    let malformed = |s: String| Err(HeaderError::Malformed(s));
    if buf.len() < 4 || &buf[..4] != MAGIC {
        return Err(HeaderError::NotQcow2);
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Version(version));
    }
    let fixed_len = if version == 2 { V2_HEADER_LEN } else { V3_MIN_HEADER_LEN };
    if (buf.len() as u64) < u64::from(fixed_len) {
        return malformed(format!(
            "the file is {} bytes, shorter than the {fixed_len}-byte version {version} header",
            buf.len()
        ));
    }
    let cluster_bits = be32(buf, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return malformed(format!("cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"));
    }
    let cluster_size = 1u64 << cluster_bits;
    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
        (0, 0, 0, 4, V2_HEADER_LEN)
    } else {
        (be64(buf, 72), be64(buf, 80), be64(buf, 88), be32(buf, 96), be32(buf, 100))
    };
    if version == 3 {
        if header_length < V3_MIN_HEADER_LEN || !header_length.is_multiple_of(8) {
            return malformed(format!(
                "header_length {header_length} is not a multiple of 8 of at least {V3_MIN_HEADER_LEN}"
            ));
        }
        if u64::from(header_length) > cluster_size || header_length as usize > buf.len() {
            return malformed(format!("header_length {header_length} exceeds the first cluster or the file"));
        }
        if refcount_order > 6 {
            return malformed(format!("refcount_order {refcount_order} is above 6"));
        }
    }
    let backing_file_offset = be64(buf, 8);
    let backing_file_size = be32(buf, 16);

    // QEMU reads extensions up to the backing file name, or to the end of the first cluster.
    let ext_end = if backing_file_offset != 0 { backing_file_offset.min(cluster_size) } else { cluster_size };
    let extensions = read_extensions(buf, u64::from(header_length), ext_end, backing_file_offset)?;
    if let Some(e) = extensions.iter().find(|e| e.kind == EXT_BACKING_FORMAT) {
        if e.data.len() > MAX_FORMAT_NAME {
            return malformed(format!("the backing format extension is {} bytes long", e.data.len()));
        }
    }

    let backing_file = if backing_file_offset != 0 {
        Some(read_backing_name(buf, backing_file_offset, backing_file_size, cluster_size)?)
    } else {
        None
    };

    Ok(RawHeader {
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size: be64(buf, 24),
        crypt_method: be32(buf, 32),
        l1_size: be32(buf, 36),
        l1_table_offset: be64(buf, 40),
        refcount_table_offset: be64(buf, 48),
        refcount_table_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        snapshots_offset: be64(buf, 64),
        incompatible_features: incompatible,
        compatible_features: compatible,
        autoclear_features: autoclear,
        refcount_order,
        header_length,
        extensions,
        backing_file,
    })
}

/// Check the metadata tables the header points at against QEMU's limits and the file size.
pub(crate) fn check_layout(h: &RawHeader, file_size: u64) -> Result<(), String> {
    let cluster = h.cluster_size();
    let table = |what: &str, offset: u64, bytes: u64| -> Result<(), String> {
        if offset == 0 || !offset.is_multiple_of(cluster) {
            return Err(format!("{what} offset {offset} is not a non-zero multiple of the cluster size"));
        }
        match offset.checked_add(bytes) {
            Some(end) if end <= file_size => Ok(()),
            _ => Err(format!(
                "{what} at offset {offset} ({bytes} bytes) lies beyond the end of the file \
                 ({file_size} bytes)"
            )),
        }
    };

    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(format!("L1 table of {} entries is too large", h.l1_size));
    }
    let needed = (u128::from(h.size) + (1u128 << h.l1_entry_shift()) - 1) >> h.l1_entry_shift();
    if u128::from(h.l1_size) < needed {
        return Err(format!(
            "L1 table has {} entries but a virtual size of {} bytes needs {needed}",
            h.l1_size, h.size
        ));
    }
    if h.l1_size > 0 {
        table("L1 table", h.l1_table_offset, l1_bytes)?;
    }

    let reftable_bytes = u64::from(h.refcount_table_clusters) * cluster;
    if h.refcount_table_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(format!("refcount table size of {} clusters is invalid", h.refcount_table_clusters));
    }
    table("refcount table", h.refcount_table_offset, reftable_bytes)?;

    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(format!("{} internal snapshots is too many", h.nb_snapshots));
    }
    if h.nb_snapshots > 0 {
        table("snapshot table", h.snapshots_offset, 0)?;
    }
    Ok(())
}

/// Read the start of a qcow2 file: its whole first cluster when the header's cluster_bits is
/// sane, else a small prefix (which the parser will then reject).
pub(crate) fn read_header_bytes(file: &File, file_size: u64) -> io::Result<Vec<u8>> {
    let prefix_len = file_size.min(512);
    let mut buf = vec![0u8; prefix_len as usize];
    file.read_exact_at(&mut buf, 0)?;
    let cluster_bits = be32(&buf, 20);
    if buf.len() >= 24 && (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        let len = file_size.min(1u64 << cluster_bits);
        if len > prefix_len {
            buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, 0)?;
        }
    }
    Ok(buf)
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Qcow2Error + 'a {
    move |source| Qcow2Error::Io { op, path: path.to_path_buf(), source }
}

fn header_err(path: &Path, e: HeaderError) -> Qcow2Error {
    let path = path.to_path_buf();
    match e {
        HeaderError::NotQcow2 => Qcow2Error::NotQcow2 { path },
        HeaderError::Version(version) => Qcow2Error::UnsupportedVersion { path, version },
        HeaderError::Malformed(reason) => Qcow2Error::Malformed { path, reason },
    }
}

/// Open, read and parse; refuses images with incompatible features we cannot interpret.
fn load(path: &Path, file: &File) -> Result<(RawHeader, u64), Qcow2Error> {
    let file_size = file.metadata().map_err(io_err("stat", path))?.len();
    let buf = read_header_bytes(file, file_size).map_err(io_err("read", path))?;
    let h = parse_header(&buf).map_err(|e| header_err(path, e))?;
    let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Qcow2Error::UnknownFeatures { path: path.to_path_buf(), bits: unknown });
    }
    Ok((h, file_size))
}

fn utf8(path: &Path, bytes: &[u8], what: &str) -> Result<String, Qcow2Error> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Qcow2Error::Malformed {
        path: path.to_path_buf(),
        reason: format!("the {what} is not valid UTF-8"),
    })
}

pub fn read_header(path: &Path) -> Result<HeaderInfo, Qcow2Error> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let (h, _) = load(path, &file)?;
    let backing_file = match &h.backing_file {
        Some(b) => Some(utf8(path, b, "backing file name")?),
        None => None,
    };
    let backing_format = match h.extension(EXT_BACKING_FORMAT) {
        Some(e) => Some(utf8(path, &e.data, "backing format")?),
        None => None,
    };
    Ok(HeaderInfo {
        version: h.version,
        virtual_size: h.size,
        cluster_bits: h.cluster_bits,
        backing_file,
        backing_format,
        corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
        external_data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
        dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
    })
}

fn validate_backing(path: &Path, backing: &str, format: &str) -> Result<(), Qcow2Error> {
    let bad = |reason| Err(Qcow2Error::InvalidBacking { path: path.to_path_buf(), name: backing.to_string(), reason });
    if backing.is_empty() {
        return bad("it is empty");
    }
    if backing.len() > MAX_BACKING_NAME {
        return bad("it is longer than 1023 bytes");
    }
    if backing.contains('\0') {
        return bad("it contains a NUL byte");
    }
    // QEMU treats "proto:..." before any '/' as a protocol prefix (json:, nbd:, ...).
    if backing.find([':', '/']).is_some_and(|i| backing.as_bytes()[i] == b':') {
        return bad("QEMU would parse the part before ':' as a protocol; prefix it with './'");
    }
    let bad_fmt =
        |reason| Err(Qcow2Error::InvalidBackingFormat { path: path.to_path_buf(), format: format.to_string(), reason });
    if format.is_empty() || format.len() > MAX_FORMAT_NAME {
        return bad_fmt("it must be 1 to 15 bytes long");
    }
    if !format.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
        return bad_fmt("it may contain only ASCII letters, digits, '-' and '_'");
    }
    Ok(())
}

fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(align8(out.len() as u64) as usize, 0);
}

fn feature_table() -> Vec<u8> {
    let mut t = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY_LEN);
    for (kind, bit, name) in FEATURE_NAMES {
        let start = t.len();
        t.push(kind);
        t.push(bit);
        t.extend_from_slice(name.as_bytes());
        t.resize(start + FEATURE_ENTRY_LEN, 0);
    }
    t
}

/// Number of L1 entries an overlay of `virtual_size` needs, or why it cannot be made.
fn overlay_l1_size(virtual_size: u64) -> Result<u64, String> {
    if virtual_size == 0 {
        return Err("it must be greater than zero".into());
    }
    if !virtual_size.is_multiple_of(512) {
        return Err("it must be a multiple of 512 bytes".into());
    }
    let l1_shift = OVERLAY_CLUSTER_BITS * 2 - 3;
    let l1_size = virtual_size.div_ceil(1u64 << l1_shift);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err("its L1 table would exceed QEMU's 32 MiB limit".into());
    }
    Ok(l1_size)
}

/// Everything before the end of the backing file name: header, extensions, name.
fn overlay_header(virtual_size: u64, l1_size: u64, backing: &str, backing_format: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(1024 + backing.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
    h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    h.extend_from_slice(&OVERLAY_CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&virtual_size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&(OVERLAY_META_CLUSTERS * OVERLAY_CLUSTER).to_be_bytes());
    h.extend_from_slice(&OVERLAY_CLUSTER.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    h.extend_from_slice(&(OVERLAY_HEADER_LEN as u32).to_be_bytes());
    h.resize(OVERLAY_HEADER_LEN, 0); // compression_type zlib + padding
    push_extension(&mut h, EXT_BACKING_FORMAT, backing_format.as_bytes());
    push_extension(&mut h, EXT_FEATURE_TABLE, &feature_table());
    push_extension(&mut h, EXT_END, &[]);
    let name_offset = h.len() as u64;
    h[8..16].copy_from_slice(&name_offset.to_be_bytes());
    h.extend_from_slice(backing.as_bytes());
    h
}

/// Create a new qcow2 v3 overlay at `path` (must not exist: O_EXCL, mode 0600, fsync'd file)
/// whose backing file is the string `backing` (normally a RELATIVE path) with backing format
/// `backing_format` (header extension 0xe2792aca), virtual size `virtual_size`, 64 KiB
/// clusters, no data allocated. QEMU cannot tell it from
/// `qemu-img create -f qcow2 -b <backing> -F <fmt> <path> <size>`. The parent directory is not
/// fsync'd; callers creating many overlays sync it once.
pub fn create_overlay(path: &Path, backing: &str, backing_format: &str, virtual_size: u64) -> Result<(), Qcow2Error> {
    write_overlay(path, backing, backing_format, virtual_size, true)
}

/// [`create_overlay`] without the fsync: for callers that write hundreds of overlays and
/// make them durable together (one `syncfs`) before renaming them into place.
pub fn create_overlay_unsynced(
    path: &Path,
    backing: &str,
    backing_format: &str,
    virtual_size: u64,
) -> Result<(), Qcow2Error> {
    write_overlay(path, backing, backing_format, virtual_size, false)
}

fn write_overlay(
    path: &Path,
    backing: &str,
    backing_format: &str,
    virtual_size: u64,
    sync: bool,
) -> Result<(), Qcow2Error> {
    validate_backing(path, backing, backing_format)?;
    let l1_size = overlay_l1_size(virtual_size).map_err(|reason| Qcow2Error::InvalidSize {
        path: path.to_path_buf(),
        size: virtual_size,
        reason,
    })?;
    let header = overlay_header(virtual_size, l1_size, backing, backing_format);
    let l1_clusters = (l1_size * 8).div_ceil(OVERLAY_CLUSTER);
    let refcounts: Vec<u8> = (0..OVERLAY_META_CLUSTERS + l1_clusters).flat_map(|_| 1u16.to_be_bytes()).collect();
    let file_len = OVERLAY_META_CLUSTERS * OVERLAY_CLUSTER + l1_size * 8;

    let file = OpenOptions::new().write(true).create_new(true).mode(crate::home::PRIVATE_FILE).open(path).map_err(
        |source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                Qcow2Error::Exists { path: path.to_path_buf() }
            } else {
                io_err("create", path)(source)
            }
        },
    )?;
    // Zero clusters (the rest of the tables, the L1) are left as holes: they read as zeros.
    let written = (|| {
        file.set_permissions(Permissions::from_mode(crate::home::PRIVATE_FILE))?;
        file.set_len(file_len)?;
        file.write_all_at(&header, 0)?;
        file.write_all_at(&(2 * OVERLAY_CLUSTER).to_be_bytes(), OVERLAY_CLUSTER)?;
        file.write_all_at(&refcounts, 2 * OVERLAY_CLUSTER)?;
        if sync {
            file.sync_all()?;
        }
        Ok(())
    })();
    if let Err(source) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err("write", path)(source));
    }
    Ok(())
}

/// True when the image itself has any data or zero cluster allocated (its L1/L2 tables map
/// anything): a draft with no changes has none. Reads only L1 and the referenced L2 tables,
/// so it costs O(metadata), not O(virtual size).
pub fn has_allocated_clusters(path: &Path) -> Result<bool, Qcow2Error> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let (h, file_size) = load(path, &file)?;
    let malformed = |reason: String| Qcow2Error::Malformed { path: path.to_path_buf(), reason };
    check_layout(&h, file_size).map_err(malformed)?;
    let cluster = h.cluster_size();
    // Offset bits 9-55 of L1 entries; the rest are flags or reserved.
    const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    const CHUNK_ENTRIES: u64 = 1 << 17;
    let mut l2 = vec![0u8; cluster as usize];
    let mut index = 0u64;
    while index < u64::from(h.l1_size) {
        let n = CHUNK_ENTRIES.min(u64::from(h.l1_size) - index);
        let mut l1 = vec![0u8; (n * 8) as usize];
        file.read_exact_at(&mut l1, h.l1_table_offset + index * 8).map_err(io_err("read", path))?;
        for entry in l1.chunks_exact(8) {
            let l2_offset = be64(entry, 0) & L1_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if !l2_offset.is_multiple_of(cluster) || l2_offset.saturating_add(cluster) > file_size {
                return Err(malformed(format!(
                    "L1 entry points at L2 table offset {l2_offset}, which is misaligned or \
                     beyond the end of the file"
                )));
            }
            file.read_exact_at(&mut l2, l2_offset).map_err(io_err("read", path))?;
            // Any set bit means data, a zero flag, compression or (extended L2) subclusters.
            if l2.iter().any(|&b| b != 0) {
                return Ok(true);
            }
        }
        index += n;
    }
    Ok(false)
}

/// Rewrite the backing file name (and format extension) of an existing qcow2 in place, like
/// `qemu-img rebase -u`; the new name must fit in the first cluster after the header
/// extensions.
pub fn set_backing(path: &Path, backing: &str, backing_format: &str) -> Result<(), Qcow2Error> {
    validate_backing(path, backing, backing_format)?;
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open", path))?;
    let (h, file_size) = load(path, &file)?;
    let cluster = h.cluster_size();
    if file_size < cluster {
        return Err(Qcow2Error::Malformed {
            path: path.to_path_buf(),
            reason: format!("the file ({file_size} bytes) is shorter than one cluster"),
        });
    }
    let mut current = vec![0u8; h.header_length as usize];
    file.read_exact_at(&mut current, 0).map_err(io_err("read", path))?;

    // Same order as QEMU's qcow2_update_header: backing format first, others kept as they were.
    let mut out = current;
    push_extension(&mut out, EXT_BACKING_FORMAT, backing_format.as_bytes());
    for e in h.extensions.iter().filter(|e| e.kind != EXT_BACKING_FORMAT) {
        push_extension(&mut out, e.kind, &e.data);
    }
    push_extension(&mut out, EXT_END, &[]);
    let name_offset = out.len() as u64;
    out.extend_from_slice(backing.as_bytes());
    if out.len() as u64 > cluster {
        return Err(Qcow2Error::HeaderFull { path: path.to_path_buf(), needed: out.len() as u64, available: cluster });
    }
    out[8..16].copy_from_slice(&name_offset.to_be_bytes());
    out[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
    // Clear the old name and extensions: QEMU too rewrites the whole first cluster.
    out.resize(cluster as usize, 0);
    file.write_all_at(&out, 0).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Output};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn run(cmd: &str, args: &[&str], dir: &Path) -> Output {
        Command::new(cmd).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
    }

    fn run_ok(cmd: &str, args: &[&str], dir: &Path) -> String {
        let out = run(cmd, args, dir);
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A 1 MiB raw base whose first 64 KiB are 0x41.
    fn make_base(dir: &Path, name: &str, pattern: u8) {
        run_ok("qemu-img", &["create", "-q", "-f", "raw", name, "1M"], dir);
        let cmd = format!("write -P {pattern:#x} 0 64k");
        run_ok("qemu-io", &["-f", "raw", "-c", &cmd, name], dir);
    }

    fn qemu_io_reads(dir: &Path, image: &str, pattern: u8, offset: u64, len: u64) -> bool {
        let cmd = format!("read -P {pattern:#x} {offset} {len}");
        let out = run_ok("qemu-io", &["-f", "qcow2", "-c", &cmd, image], dir);
        out.contains(&format!("read {len}/{len} bytes")) && !out.contains("failed")
    }

    fn header_of(path: &Path) -> RawHeader {
        let file = File::open(path).expect("open");
        let size = file.metadata().expect("stat").len();
        let buf = read_header_bytes(&file, size).expect("read");
        parse_header(&buf).expect("parse")
    }

    fn info_json(dir: &Path, image: &str) -> String {
        let out = run_ok("qemu-img", &["info", "-f", "qcow2", "--output=json", image], dir);
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn overlay_is_equivalent_to_qemu_img_create() {
        for size in [MIB, 10 * GIB, 64 * TIB] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path();
            make_base(dir, "base.raw", 0x41);
            let ours = dir.join("ours.qcow2");
            create_overlay(&ours, "base.raw", "raw", size).expect("create_overlay");
            let size_arg = size.to_string();
            run_ok(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ref.qcow2", &size_arg],
                dir,
            );

            run_ok("qemu-img", &["check", "-f", "qcow2", "ours.qcow2"], dir);
            let info = info_json(dir, "ours.qcow2");
            assert!(info.contains("\"backing-filename\": \"base.raw\""), "{info}");
            assert!(info.contains("\"backing-filename-format\": \"raw\""), "{info}");
            assert!(info.contains(&format!("\"virtual-size\": {size},")), "{info}");

            let map = |img: &str| run_ok("qemu-img", &["map", "-f", "qcow2", "--output=json", img], dir);
            assert_eq!(map("ours.qcow2"), map("ref.qcow2"), "size {size}");

            // Same header fields and extensions (the feature name table is QEMU-version
            // specific), byte-identical metadata clusters.
            let normalized = |p: &Path| {
                let mut h = header_of(p);
                h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
                h.backing_file_offset = 0;
                h
            };
            assert_eq!(normalized(&ours), normalized(&dir.join("ref.qcow2")));
            let (a, b) = (std::fs::read(&ours).expect("read"), std::fs::read(dir.join("ref.qcow2")).expect("read"));
            assert_eq!(a.len(), b.len(), "size {size}");
            assert!(a[OVERLAY_CLUSTER as usize..] == b[OVERLAY_CLUSTER as usize..]);
            if header_of(&dir.join("ref.qcow2")).extension(EXT_FEATURE_TABLE).map(|e| &e.data[..])
                == Some(&feature_table()[..])
            {
                assert!(a == b, "same feature table, so the files must be byte-identical");
            }
            let mode = std::fs::metadata(&ours).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);

            assert!(qemu_io_reads(dir, "ours.qcow2", 0x41, 0, 512));
            assert!(!has_allocated_clusters(&ours).expect("scan"));
            let far = size - 64 * 1024;
            let cmd = format!("write -P 0x42 {far} 4096");
            run_ok("qemu-io", &["-f", "qcow2", "-c", &cmd, "ours.qcow2"], dir);
            assert!(has_allocated_clusters(&ours).expect("scan"));
            assert!(qemu_io_reads(dir, "ours.qcow2", 0x42, far, 4096));
            assert!(qemu_io_reads(dir, "ours.qcow2", 0x41, 0, 512));
            run_ok("qemu-img", &["check", "-f", "qcow2", "ours.qcow2"], dir);
        }
    }

    #[test]
    fn zero_write_counts_as_allocated() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        make_base(dir, "base.raw", 0x41);
        let ours = dir.join("o.qcow2");
        create_overlay(&ours, "base.raw", "raw", MIB).expect("create");
        run_ok("qemu-io", &["-f", "qcow2", "-c", "write -z 0 64k", "o.qcow2"], dir);
        assert!(has_allocated_clusters(&ours).expect("scan"));
        assert!(qemu_io_reads(dir, "o.qcow2", 0, 0, 512));
    }

    #[test]
    fn read_header_on_qemu_img_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        make_base(dir, "base.raw", 0x41);
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "plain.qcow2", "10G"], dir);
        let h = read_header(&dir.join("plain.qcow2")).expect("header");
        assert_eq!(
            h,
            HeaderInfo {
                version: 3,
                virtual_size: 10 * GIB,
                cluster_bits: 16,
                backing_file: None,
                backing_format: None,
                corrupt: false,
                external_data_file: false,
                dirty: false,
            }
        );

        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=4096",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "v2.qcow2",
            ],
            dir,
        );
        let h = read_header(&dir.join("v2.qcow2")).expect("header");
        assert_eq!(h.version, 2);
        assert_eq!(h.cluster_bits, 12);
        assert_eq!(h.virtual_size, MIB);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));

        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "ext.qcow2", "1M"], dir);
        let h = read_header(&dir.join("ext.qcow2")).expect("header");
        assert!(h.external_data_file);
        assert!(!h.corrupt);

        // Incompatible feature bits live in byte 79 (big-endian u64 at 72).
        let mut bytes = std::fs::read(dir.join("plain.qcow2")).expect("read");
        bytes[79] |= 0x03;
        std::fs::write(dir.join("flagged.qcow2"), &bytes).expect("write");
        let h = read_header(&dir.join("flagged.qcow2")).expect("header");
        assert!(h.corrupt && h.dirty && !h.external_data_file);

        bytes[79] = 0x80;
        std::fs::write(dir.join("unknown.qcow2"), &bytes).expect("write");
        assert!(matches!(read_header(&dir.join("unknown.qcow2")), Err(Qcow2Error::UnknownFeatures { bits: 0x80, .. })));

        let ours = dir.join("ours.qcow2");
        create_overlay(&ours, "base.raw", "raw", 64 * TIB).expect("create");
        let h = read_header(&ours).expect("header");
        assert_eq!(h.virtual_size, 64 * TIB);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn set_backing_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        make_base(dir, "base.raw", 0x41);
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        make_base(&dir.join("sub"), "second-base-with-a-longer-name.raw", 0x43);

        let ours = dir.join("ours.qcow2");
        create_overlay(&ours, "base.raw", "raw", MIB).expect("create");
        run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x44 128k 4k", "ours.qcow2"], dir);
        let longer = "sub/second-base-with-a-longer-name.raw";
        set_backing(&ours, longer, "raw").expect("set_backing");
        let h = read_header(&ours).expect("header");
        assert_eq!(h.backing_file.as_deref(), Some(longer));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        let info = info_json(dir, "ours.qcow2");
        assert!(info.contains(&format!("\"backing-filename\": \"{longer}\"")), "{info}");
        run_ok("qemu-img", &["check", "-f", "qcow2", "ours.qcow2"], dir);
        assert!(qemu_io_reads(dir, "ours.qcow2", 0x43, 0, 512));
        assert!(qemu_io_reads(dir, "ours.qcow2", 0x44, 128 * 1024, 4096));

        set_backing(&ours, "base.raw", "raw").expect("set_backing back");
        assert_eq!(header_of(&ours), {
            let fresh = dir.join("fresh.qcow2");
            create_overlay(&fresh, "base.raw", "raw", MIB).expect("create");
            header_of(&fresh)
        });
        assert!(qemu_io_reads(dir, "ours.qcow2", 0x41, 0, 512));

        // On a qemu-img made image with a feature table and no backing format yet.
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "q.qcow2", "1M"], dir);
        set_backing(&dir.join("q.qcow2"), longer, "raw").expect("set_backing");
        let info = info_json(dir, "q.qcow2");
        assert!(info.contains(&format!("\"backing-filename\": \"{longer}\"")), "{info}");
        assert!(info.contains("\"backing-filename-format\": \"raw\""), "{info}");
        run_ok("qemu-img", &["check", "-f", "qcow2", "q.qcow2"], dir);
        assert!(qemu_io_reads(dir, "q.qcow2", 0x43, 0, 512));
        let ext = header_of(&dir.join("q.qcow2"));
        assert!(ext.extension(EXT_FEATURE_TABLE).is_some());

        // A v2 image with 512-byte clusters has no room for a 1000-byte name.
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "small.qcow2", "1M"],
            dir,
        );
        let before = std::fs::read(dir.join("small.qcow2")).expect("read");
        let long = format!("./{}", "x".repeat(1000));
        assert!(matches!(set_backing(&dir.join("small.qcow2"), &long, "raw"), Err(Qcow2Error::HeaderFull { .. })));
        assert_eq!(before, std::fs::read(dir.join("small.qcow2")).expect("read"));
        set_backing(&dir.join("small.qcow2"), "base.raw", "raw").expect("fits");
        run_ok("qemu-img", &["check", "-f", "qcow2", "small.qcow2"], dir);
        let h = read_header(&dir.join("small.qcow2")).expect("header");
        assert_eq!((h.version, h.backing_file.as_deref()), (2, Some("base.raw")));
    }

    #[test]
    fn create_overlay_refuses_existing_path_and_bad_arguments() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("o.qcow2");
        std::fs::write(&path, b"precious").expect("write");
        let err = create_overlay(&path, "base.qcow2", "qcow2", MIB).expect_err("exists");
        assert!(matches!(err, Qcow2Error::Exists { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(std::fs::read(&path).expect("read"), b"precious");

        let fresh = tmp.path().join("new.qcow2");
        let long = "a".repeat(1024);
        for (backing, format) in [
            ("", "qcow2"),
            ("a\0b", "qcow2"),
            (long.as_str(), "qcow2"),
            ("json:{\"file.filename\":\"/etc/shadow\"}", "qcow2"),
            ("nbd://host/x", "qcow2"),
            ("base.qcow2", ""),
            ("base.qcow2", "qcow2\0"),
            ("base.qcow2", "averyveryverylongformat"),
        ] {
            let err = create_overlay(&fresh, backing, format, MIB).expect_err("invalid");
            assert!(
                matches!(err, Qcow2Error::InvalidBacking { .. } | Qcow2Error::InvalidBackingFormat { .. }),
                "{err}"
            );
        }
        for size in [0, 1000, 1 << 62] {
            let err = create_overlay(&fresh, "b.qcow2", "qcow2", size).expect_err("size");
            assert!(matches!(err, Qcow2Error::InvalidSize { .. }), "{err}");
        }
        assert!(!fresh.exists());
        create_overlay(&fresh, "./dir:with:colons/b.qcow2", "qcow2", MIB).expect("./ prefix");
        let max = "b".repeat(1023);
        let fresh2 = tmp.path().join("new2.qcow2");
        create_overlay(&fresh2, &max, "qcow2", MIB).expect("1023 bytes");
        assert_eq!(read_header(&fresh2).expect("header").backing_file.as_deref(), Some(max.as_str()));
    }

    /// xorshift64*, enough to make varied garbage without a dependency.
    pub(crate) fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn garbage_gives_errors_not_panics() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("g.qcow2");
        let exercise = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write");
            let _ = read_header(&path);
            let _ = has_allocated_clusters(&path);
            let _ = set_backing(&path, "b.qcow2", "qcow2");
            let _ = parse_header(bytes).map(|h| check_layout(&h, bytes.len() as u64));
        };
        assert!(read_header(&tmp.path().join("missing")).is_err());
        assert!(matches!(read_header(tmp.path()), Err(Qcow2Error::Io { .. })));

        let mut next = rng(0x5eed);
        for len in [0usize, 3, 4, 71, 72, 103, 104, 512, 4096, 70000] {
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            exercise(&b);
            if len >= 4 {
                b[..4].copy_from_slice(MAGIC);
                exercise(&b);
            }
        }

        let good = tmp.path().join("good.qcow2");
        create_overlay(&good, "base.qcow2", "qcow2", 10 * GIB).expect("create");
        let image = std::fs::read(&good).expect("read");
        for cut in (0..1024).step_by(7).chain([65536, 131072, 196608, 196616]) {
            exercise(&image[..cut.min(image.len())]);
        }
        for _ in 0..400 {
            let mut b = image.clone();
            for _ in 0..1 + next() % 6 {
                let at = (next() % 1024) as usize;
                b[at] = next() as u8;
            }
            if next().is_multiple_of(4) {
                // Point the L1 table at arbitrary places.
                let at = 196608 + (next() % 20) as usize * 8;
                b[at..at + 8].copy_from_slice(&next().to_be_bytes());
            }
            exercise(&b);
        }
    }
}
