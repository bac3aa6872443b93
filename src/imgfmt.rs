//! Inspection of UNTRUSTED image files before qemu-img ever opens them.
//!
//! Imported images are hostile input. Image formats can name other files (qcow2 backing and
//! external data files, VMDK extents and parents, VHDX parents), and QEMU's format probing
//! lets a file choose how it is read: OpenStack shipped host-file disclosures through exactly
//! this (CVE-2015-5163: a qcow2 backing file; CVE-2022-47951: VMDK extents naming host files;
//! CVE-2024-32498: a qcow2 external data file). So vdim never lets QEMU probe a format or
//! follow a file reference: [`inspect`] detects the format from the bytes itself, refuses
//! anything ambiguous, disguised, unsupported or referencing another file, and callers then
//! pass the detected format explicitly (`-f`) to qemu-img.
//!
//! Every read is bounded by the file size and a fixed cap; no length taken from the file is
//! trusted before it is checked.
//!
//! ## Sparse VMDK: refuse whatever QEMU could read differently
//!
//! QEMU 7.2's block/vmdk.c and vdim must agree on every byte that decides which files are
//! opened and how large the disk is. Where they could disagree, vdim refuses; the store then
//! checks `qemu-img info` of the same bytes (create type, one extent that is the file
//! itself, the virtual size found here). "oslo" is openstack/oslo.utils'
//! `imageutils/format_inspector.py` (`VMDKInspector`).
//!
//! | check | attack it stops | follows |
//! |---|---|---|
//! | capacity 0 refused | QEMU re-reads the embedded text (up to 1 MiB) as a descriptor *file* whose extents name host files (`vmdk_open_vmdk4`) | QEMU (stricter) |
//! | descriptor at sector 1, within 64 KiB, before the grain tables | text vdim checks is not the text QEMU searches at its fixed 0x200 | oslo |
//! | text NUL-terminated inside its region, only NULs after | QEMU's `strstr` stops at the first NUL: text hidden behind it or running past the region | QEMU |
//! | ASCII only (printable, tab, LF; CR only before LF) | parsers splitting lines differently; sscanf treating VT/FF/CR as blanks | oslo (stricter) |
//! | each line: blank, `#` comment, known `key=value`, `ddb.k = "v"`, or the extent | any line vdim does not understand | oslo (stricter: known keys) |
//! | keys version, CID, parentCID (= ffffffff), createType, encoding, isNativeSnapshot, each once | duplicates where QEMU takes the first; a parent CID of a differencing disk | QEMU |
//! | `createType`, `CID` occur only as their keys; `parentFileNameHint` nowhere | QEMU finds them as substrings anywhere, comments and ddb values included | QEMU |
//! | createType matches the header (compressed: streamOptimized) | a descriptor claiming one kind while QEMU reads another | QEMU |
//! | exactly one extent `RW <capacity> SPARSE "<name>"`, name without `/`, `\` | an extent naming a host path, or read across newlines by sscanf (`RW` / `2048 FLAT "/etc/shadow" 0`) | oslo (stricter) |
//! | grain directory at end: footer marker, magic and end-of-stream valid; footer = header except the grain directory | QEMU takes capacity and every other field from the footer | oslo + QEMU (stricter: all fields) |
//! | parent hint searched in QEMU's 10 KiB at sector 1 | a backing VMDK named outside the declared descriptor | QEMU |

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::qcow2;

/// Largest virtual size vdim accepts (also the VHDX format's own limit).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Bytes read from the start of every file for signature detection.
const PROBE_LEN: u64 = 64 * 1024;
/// No single read of metadata is larger (a qcow2 cluster is at most 2 MiB).
const MAX_READ: u64 = 4 << 20;
const SECTOR: u64 = 512;
const KIB: u64 = 1024;

/// The image formats vdim imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
    Vmdk,
    Vhdx,
    Vdi,
}

impl Format {
    /// The name qemu-img knows the format by (for `-f`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
        }
    }

    /// Parse a format name as an admin would type it for `--format`.
    pub fn parse(s: &str) -> Result<Format, ImgFmtError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "qcow2" => Ok(Format::Qcow2),
            "raw" | "img" => Ok(Format::Raw),
            "vmdk" => Ok(Format::Vmdk),
            "vhdx" => Ok(Format::Vhdx),
            "vdi" => Ok(Format::Vdi),
            _ => Err(ImgFmtError::UnknownFormatName { name: s.to_string() }),
        }
    }

    /// The format a file name's extension claims, if it names one.
    fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "qcow2" | "qcow" => Some(Format::Qcow2),
            "raw" | "img" => Some(Format::Raw),
            "vmdk" => Some(Format::Vmdk),
            "vhdx" => Some(Format::Vhdx),
            "vdi" => Some(Format::Vdi),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// What [`inspect`] found out about an acceptable image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub format: Format,
    /// Guest-visible size in bytes, from the format's header (the file size for raw).
    pub virtual_size: Option<u64>,
    pub file_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImgFmtError {
    #[error("Cannot read {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is {kind}, not a regular file; point vdim at the image file itself", .path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{} is empty (0 bytes), so it is not a disk image", .path.display())]
    Empty { path: PathBuf },
    #[error("Unknown image format '{name}'; vdim imports qcow2, raw (or img), vmdk, vhdx and vdi")]
    UnknownFormatName { name: String },
    #[error(
        "{} carries the signatures of several image formats ({formats}); such a file is \
         crafted or damaged and QEMU could read it either way: re-export it from its source",
        .path.display()
    )]
    Ambiguous { path: PathBuf, formats: String },
    #[error(
        "{} is a {format} image; vdim imports only qcow2, raw, vmdk, vhdx and vdi: convert it \
         on a trusted machine with 'qemu-img convert -O qcow2'",
        .path.display()
    )]
    Unsupported { path: PathBuf, format: &'static str },
    #[error(
        "{} claims {claimed} ({via}) but {found}; vdim refuses images whose contents disagree \
         with their declared format: check where the file came from, and if the contents are \
         right pass the matching --format",
        .path.display()
    )]
    FormatMismatch { path: PathBuf, claimed: Format, via: &'static str, found: String },
    #[error(
        "{} is a {format} image with a backing file ('{backing}'); vdim imports only \
         standalone images: flatten it first with 'qemu-img convert -O qcow2'",
        .path.display()
    )]
    BackingFile { path: PathBuf, format: &'static str, backing: String },
    #[error(
        "{} is a qcow2 image with an external data file ('{data_file}'); vdim imports only \
         self-contained images: convert it first with 'qemu-img convert -O qcow2'",
        .path.display()
    )]
    ExternalDataFile { path: PathBuf, data_file: String },
    #[error(
        "{} is a qcow2 image that QEMU has marked corrupt; repair a trusted copy with \
         'qemu-img check -r all' or re-export it",
        .path.display()
    )]
    Corrupt { path: PathBuf },
    #[error(
        "{} is an encrypted {format} image; vdim cannot import encrypted images: decrypt it \
         first with 'qemu-img convert'",
        .path.display()
    )]
    Encrypted { path: PathBuf, format: &'static str },
    #[error(
        "{} uses qcow2 incompatible features vdim does not know (bits {bits:#x}); convert it \
         with a current 'qemu-img convert -O qcow2' first",
        .path.display()
    )]
    UnknownFeatures { path: PathBuf, bits: u64 },
    #[error(
        "{} is a {format} image of version {version}, which vdim does not support; convert it \
         with 'qemu-img convert -O qcow2' first",
        .path.display()
    )]
    UnsupportedVersion { path: PathBuf, format: &'static str, version: String },
    #[error(
        "{} is a {format} image of an unsupported kind ({detail}); convert it with \
         'qemu-img convert -O qcow2' first",
        .path.display()
    )]
    UnsupportedVariant { path: PathBuf, format: &'static str, detail: String },
    #[error(
        "{} declares a virtual size of {size} bytes, above vdim's limit of 64 TiB; the header \
         is probably crafted or damaged",
        .path.display()
    )]
    TooLarge { path: PathBuf, format: &'static str, size: u64 },
    #[error(
        "{} is a plain-text VMDK descriptor that references other files ('{extent}'); vdim \
         imports only single-file images: convert it first with \
         'qemu-img convert -O vmdk -o subformat=streamOptimized' or '-O qcow2'",
        .path.display()
    )]
    VmdkDescriptor { path: PathBuf, extent: String },
    #[error(
        "{} is not a self-contained VMDK ({detail}); vdim imports only monolithicSparse and \
         streamOptimized files: convert it first with \
         'qemu-img convert -O vmdk -o subformat=streamOptimized'",
        .path.display()
    )]
    VmdkNotMonolithic { path: PathBuf, detail: String },
    #[error(
        "{} is a VMDK whose header declares a capacity of 0 sectors: QEMU would then read its \
         embedded text as a descriptor file, which can name any file on this host; vdim refuses \
         it: re-export the disk from its source",
        .path.display()
    )]
    VmdkCapacityZero { path: PathBuf },
    #[error(
        "{} is a VMDK whose embedded descriptor vdim refuses ({}{detail}): QEMU could read \
         it differently from vdim; re-export it with \
         'qemu-img convert -O vmdk -o subformat=streamOptimized' on a trusted machine",
        .path.display(),
        if *.line > 0 { format!("line {}: ", .line) } else { String::new() }
    )]
    VmdkDescriptorRefused { path: PathBuf, line: usize, detail: String },
    #[error(
        "{} is a differencing {format} image ({detail}); vdim imports only standalone images: \
         merge it into its parent first",
        .path.display()
    )]
    ParentImage { path: PathBuf, format: &'static str, detail: String },
    #[error(
        "{} is a VHDX image with a log that has not been replayed; open and cleanly close it \
         (for example attach it in Hyper-V) and export it again",
        .path.display()
    )]
    VhdxLog { path: PathBuf },
    #[error("{} is not a valid {format} image: {reason}", .path.display())]
    Malformed { path: PathBuf, format: &'static str, reason: String },
}

impl crate::error::Kind for ImgFmtError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            // The source file is the caller's: a missing one is not found.
            ImgFmtError::Unreadable { source, .. } => K::of_io(source),
            ImgFmtError::NotRegularFile { .. }
            | ImgFmtError::Empty { .. }
            | ImgFmtError::UnknownFormatName { .. }
            | ImgFmtError::Ambiguous { .. }
            | ImgFmtError::Unsupported { .. }
            | ImgFmtError::FormatMismatch { .. }
            | ImgFmtError::BackingFile { .. }
            | ImgFmtError::ExternalDataFile { .. }
            | ImgFmtError::Corrupt { .. }
            | ImgFmtError::Encrypted { .. }
            | ImgFmtError::UnknownFeatures { .. }
            | ImgFmtError::UnsupportedVersion { .. }
            | ImgFmtError::UnsupportedVariant { .. }
            | ImgFmtError::TooLarge { .. }
            | ImgFmtError::VmdkDescriptor { .. }
            | ImgFmtError::VmdkNotMonolithic { .. }
            | ImgFmtError::VmdkCapacityZero { .. }
            | ImgFmtError::VmdkDescriptorRefused { .. }
            | ImgFmtError::ParentImage { .. }
            | ImgFmtError::VhdxLog { .. }
            | ImgFmtError::Malformed { .. } => K::Invalid,
        }
    }
}

/// Every format signature vdim recognises, supported or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Qcow2,
    Qcow1,
    Qed,
    VmdkSparse,
    VmdkCowd,
    VmdkText,
    Vhdx,
    Vdi,
    Vpc,
    Luks,
    Parallels,
    Dmg,
    Bochs,
    Cloop,
}

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Sig::Qcow2 => "qcow2",
            Sig::Qcow1 => "qcow (version 1)",
            Sig::Qed => "qed",
            Sig::VmdkSparse => "vmdk",
            Sig::VmdkCowd => "vmdk version 3 (COWD)",
            Sig::VmdkText => "vmdk descriptor",
            Sig::Vhdx => "vhdx",
            Sig::Vdi => "vdi",
            Sig::Vpc => "vpc (vhd)",
            Sig::Luks => "luks",
            Sig::Parallels => "parallels",
            Sig::Dmg => "dmg",
            Sig::Bochs => "bochs",
            Sig::Cloop => "cloop",
        }
    }

    fn format(self) -> Option<Format> {
        match self {
            Sig::Qcow2 => Some(Format::Qcow2),
            Sig::VmdkSparse | Sig::VmdkText => Some(Format::Vmdk),
            Sig::Vhdx => Some(Format::Vhdx),
            Sig::Vdi => Some(Format::Vdi),
            _ => None,
        }
    }
}

const CLOOP_MAGIC: &[u8] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
const VDI_SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// QEMU's own VMDK text probe (block/vmdk.c): comment and blank lines, then `version=N`.
fn qemu_vmdk_text_probe(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p >= buf.len() || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                return [b"version=1", b"version=2", b"version=3"].iter().any(|v| {
                    rest.starts_with(*v) && (rest[v.len()..].starts_with(b"\n") || rest[v.len()..].starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

fn is_vmdk_text(head: &[u8]) -> bool {
    let first_kib = &head[..head.len().min(KIB as usize)];
    first_kib.starts_with(b"# Disk DescriptorFile")
        || contains(first_kib, b"createType")
        || qemu_vmdk_text_probe(&head[..head.len().min(2048)])
}

/// All signatures present in the file (`head`: its start, `tail`: its last 512 bytes).
fn detect(head: &[u8], tail: &[u8], path: &Path) -> Vec<Sig> {
    let mut found = Vec::new();
    if head.starts_with(qcow2::MAGIC) {
        if qcow2::be32(head, 4) == 1 {
            found.push(Sig::Qcow1);
        } else {
            found.push(Sig::Qcow2);
        }
    }
    if head.starts_with(b"QED\0") {
        found.push(Sig::Qed);
    }
    if head.starts_with(b"KDMV") {
        found.push(Sig::VmdkSparse);
    } else if head.starts_with(b"COWD") {
        found.push(Sig::VmdkCowd);
    } else if is_vmdk_text(head) {
        // A sparse VMDK embeds its descriptor text near the start; only count text alone.
        found.push(Sig::VmdkText);
    }
    if head.starts_with(b"vhdxfile") {
        found.push(Sig::Vhdx);
    }
    if head.get(0x40..0x44) == Some(&VDI_SIGNATURE[..]) {
        found.push(Sig::Vdi);
    }
    // Dynamic VHDs start with a footer copy; fixed ones only have it at the end.
    if head.starts_with(b"conectix") || tail.starts_with(b"conectix") {
        found.push(Sig::Vpc);
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        found.push(Sig::Luks);
    }
    if head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt") {
        found.push(Sig::Parallels);
    }
    // QEMU's dmg driver probes by file name alone.
    let dmg_name = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("dmg"));
    if tail.starts_with(b"koly") || dmg_name {
        found.push(Sig::Dmg);
    }
    if head.starts_with(b"Bochs Virtual HD Image") {
        found.push(Sig::Bochs);
    }
    // Like QEMU, a file shorter than the cloop magic matches if it is a prefix of it.
    let n = head.len().min(CLOOP_MAGIC.len());
    if n > 0 && head[..n] == CLOOP_MAGIC[..n] {
        found.push(Sig::Cloop);
    }
    found
}

fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// An opened, regular, non-empty candidate image with bounded reads.
struct Image<'a> {
    path: &'a Path,
    file: &'a File,
    size: u64,
}

impl Image<'_> {
    fn unreadable(&self, source: io::Error) -> ImgFmtError {
        ImgFmtError::Unreadable { path: self.path.to_path_buf(), source }
    }

    fn malformed(&self, format: &'static str, reason: String) -> ImgFmtError {
        ImgFmtError::Malformed { path: self.path.to_path_buf(), format, reason }
    }

    /// Read exactly `len` bytes at `offset`; a range past EOF or above the cap is malformed.
    fn read(&self, format: &'static str, what: &str, offset: u64, len: u64) -> Result<Vec<u8>, ImgFmtError> {
        let end = offset.checked_add(len);
        if len > MAX_READ || end.is_none_or(|e| e > self.size) {
            return Err(self.malformed(
                format,
                format!(
                    "its {what} at offset {offset} ({len} bytes) lies beyond the end of the \
                     file ({} bytes)",
                    self.size
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| self.unreadable(e))?;
        Ok(buf)
    }

    /// Read up to `len` bytes at `offset`, fewer if the file ends first.
    fn read_clamped(&self, offset: u64, len: u64) -> Result<Vec<u8>, ImgFmtError> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let len = len.min(self.size - offset).min(MAX_READ);
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| self.unreadable(e))?;
        Ok(buf)
    }

    fn check_size(&self, format: &'static str, size: u64) -> Result<u64, ImgFmtError> {
        if size > MAX_VIRTUAL_SIZE {
            return Err(ImgFmtError::TooLarge { path: self.path.to_path_buf(), format, size });
        }
        Ok(size)
    }
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), ImgFmtError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(ImgFmtError::NotRegularFile { path: path.to_path_buf(), kind })
}

/// Inspect an untrusted image before anything else reads it.
///
/// `claimed`: the format the admin named with --format, if any. Without it, a file name
/// extension that names a format (.qcow2, .qcow, .vmdk, .vhdx, .vdi, .raw, .img) is the
/// claim; an explicit --format that matches the contents takes precedence over the name, so
/// qcow2 cloud images named `.img` can still be imported deliberately.
pub fn inspect(path: &Path, claimed: Option<Format>) -> Result<Probe, ImgFmtError> {
    let (file, _) = open_source(path)?;
    inspect_file(&file, path, claimed)
}

/// Open an untrusted source once: a regular, non-empty file (never a FIFO, device or
/// directory). Returns the file and its size at the moment it was opened.
pub fn open_source(path: &Path) -> Result<(File, u64), ImgFmtError> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |source| ImgFmtError::Unreadable { path: path.to_path_buf(), source };
    // Stat first for the clearer message; O_NONBLOCK so a FIFO swapped in meanwhile cannot
    // block the open, and fstat of what was really opened decides.
    check_regular(path, &fs::metadata(path).map_err(unreadable)?)?;
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    check_regular(path, &meta)?;
    if meta.len() == 0 {
        return Err(ImgFmtError::Empty { path: path.to_path_buf() });
    }
    Ok((file, meta.len()))
}

/// Inspect the bytes of an already opened `file`; `name` is what messages and the extension
/// claim refer to (the admin's source path when `file` is a private copy of it).
pub fn inspect_file(file: &File, name: &Path, claimed: Option<Format>) -> Result<Probe, ImgFmtError> {
    let path = name;
    let unreadable = |source| ImgFmtError::Unreadable { path: path.to_path_buf(), source };
    let meta = file.metadata().map_err(unreadable)?;
    check_regular(path, &meta)?;
    let img = Image { path, file, size: meta.len() };
    if img.size == 0 {
        return Err(ImgFmtError::Empty { path: path.to_path_buf() });
    }

    let head = img.read_clamped(0, PROBE_LEN)?;
    let tail = if img.size >= SECTOR { img.read_clamped(img.size - SECTOR, SECTOR)? } else { Vec::new() };
    let sigs = detect(&head, &tail, path);
    let (sig, format) = match sigs.as_slice() {
        [] => (None, Format::Raw),
        [one] => match one.format() {
            Some(f) => (Some(*one), f),
            None => return Err(ImgFmtError::Unsupported { path: path.to_path_buf(), format: one.name() }),
        },
        many => {
            let names: Vec<&str> = many.iter().map(|s| s.name()).collect();
            return Err(ImgFmtError::Ambiguous { path: path.to_path_buf(), formats: names.join(", ") });
        }
    };

    let claim = match claimed {
        Some(c) => Some((c, "--format")),
        None => Format::from_extension(path).map(|c| (c, "by its file name extension")),
    };
    if let Some((claimed, via)) = claim {
        if claimed != format {
            let found = match sig {
                Some(s) => format!("carries a {} header", s.name()),
                None => "carries no image header (it is raw data)".to_string(),
            };
            return Err(ImgFmtError::FormatMismatch { path: path.to_path_buf(), claimed, via, found });
        }
    }

    let virtual_size = match sig {
        None => img.check_size("raw", img.size)?,
        Some(Sig::Qcow2) => check_qcow2(&img)?,
        Some(Sig::VmdkSparse) => check_vmdk_sparse(&img, &head)?,
        Some(Sig::VmdkText) => return Err(vmdk_text_error(path, &head)),
        Some(Sig::Vhdx) => check_vhdx(&img)?,
        Some(Sig::Vdi) => check_vdi(&img, &head)?,
        Some(other) => return Err(ImgFmtError::Unsupported { path: path.to_path_buf(), format: other.name() }),
    };
    Ok(Probe { format, virtual_size: Some(virtual_size), file_size: img.size })
}

// ---------------------------------------------------------------------------------------
// qcow2

fn check_qcow2(img: &Image) -> Result<u64, ImgFmtError> {
    const F: &str = "qcow2";
    let path = || img.path.to_path_buf();
    let buf = qcow2::read_header_bytes(img.file, img.size).map_err(|e| img.unreadable(e))?;

    // Checked on the raw field before anything else can fail: the reference is the danger.
    let backing_offset = qcow2::be64(&buf, 8);
    if backing_offset != 0 {
        let len = u64::from(qcow2::be32(&buf, 16)).min(1023);
        let name = backing_offset
            .checked_add(len)
            .and_then(|end| buf.get(backing_offset as usize..end as usize))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "<name beyond the header>".to_string());
        return Err(ImgFmtError::BackingFile { path: path(), format: F, backing: name });
    }

    let h = qcow2::parse_header(&buf).map_err(|e| match e {
        qcow2::HeaderError::NotQcow2 => img.malformed(F, "it has no qcow2 magic".into()),
        qcow2::HeaderError::Version(v) => {
            ImgFmtError::UnsupportedVersion { path: path(), format: F, version: v.to_string() }
        }
        qcow2::HeaderError::Malformed(reason) => img.malformed(F, reason),
    })?;

    let data_file = h.extension(qcow2::EXT_DATA_FILE);
    if data_file.is_some() || h.incompatible_features & qcow2::INCOMPAT_DATA_FILE != 0 {
        return Err(ImgFmtError::ExternalDataFile {
            path: path(),
            data_file: data_file.map_or_else(
                || "<name not recorded in the image>".to_string(),
                |e| String::from_utf8_lossy(&e.data).into_owned(),
            ),
        });
    }
    if h.incompatible_features & qcow2::INCOMPAT_CORRUPT != 0 {
        return Err(ImgFmtError::Corrupt { path: path() });
    }
    if h.crypt_method != 0 {
        return Err(ImgFmtError::Encrypted { path: path(), format: F });
    }
    let unknown = h.incompatible_features & !qcow2::INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(ImgFmtError::UnknownFeatures { path: path(), bits: unknown });
    }
    img.check_size(F, h.size)?;
    qcow2::check_layout(&h, img.size).map_err(|r| img.malformed(F, r))?;
    cross_check_qcow2_rs(&buf, &h).map_err(|r| img.malformed(F, r))?;
    Ok(h.size)
}

/// Second opinion from the qcow2-rs parser. It misreads v2 headers (it reads v3-only fields)
/// and can panic on a feature table whose length is not a multiple of 48, so it is only run
/// on v3 headers our own parser accepted, with the incompatible bits we allow masked (it
/// rejects any).
fn cross_check_qcow2_rs(buf: &[u8], h: &qcow2::RawHeader) -> Result<(), String> {
    if h.version != 3 {
        return Ok(());
    }
    if buf.len() < 112 {
        return Err("the header is truncated".into());
    }
    let odd_table = h.extensions.iter().any(|e| e.kind == qcow2::EXT_FEATURE_TABLE && !e.data.len().is_multiple_of(48));
    if odd_table {
        return Err("its feature name table is not a whole number of 48-byte entries".into());
    }
    let mut copy = buf.to_vec();
    copy[72..80].fill(0);
    let theirs = qcow2_rs::meta::Qcow2Header::from_buf(&copy).map_err(|e| format!("the header does not parse: {e}"))?;
    let agree = theirs.size() == h.size
        && theirs.cluster_bits() == h.cluster_bits
        && theirs.backing_filename().is_none()
        && theirs.l1_table_entries() == h.l1_size as usize
        && theirs.l1_table_offset() == h.l1_table_offset
        && theirs.reftable_offset() == h.refcount_table_offset;
    if !agree {
        return Err("two qcow2 parsers disagree about its header".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// VMDK

/// The file names of extent lines (`RW 20480 FLAT "a-flat.vmdk" 0`), for messages.
fn extent_files(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| matches!(line.split_whitespace().next(), Some("RW" | "RDONLY" | "NOACCESS")))
        .filter_map(|line| line.split_once('"').and_then(|(_, rest)| rest.split_once('"')))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// QEMU finds a VMDK parent with a bare substring search, wherever the text sits.
fn vmdk_parent_hint(bytes: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"parentFileNameHint";
    let at = find(bytes, KEY)?;
    let rest = &bytes[at + KEY.len()..];
    let value = rest.get(2..).unwrap_or_default();
    let end = value.iter().position(|&c| c == b'"' || c == b'\n' || c == 0).unwrap_or(value.len()).min(1024);
    Some(String::from_utf8_lossy(&value[..end]).into_owned())
}

fn text_prefix(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn vmdk_text_error(path: &Path, head: &[u8]) -> ImgFmtError {
    let text = text_prefix(head);
    let extent = extent_files(&text)
        .into_iter()
        .next()
        .or_else(|| vmdk_parent_hint(head))
        .unwrap_or_else(|| "no extent file could be read".to_string());
    ImgFmtError::VmdkDescriptor { path: path.to_path_buf(), extent }
}

/// The hosted sparse extent header (VMDK4Header in QEMU's block/vmdk.c), little-endian,
/// offsets from the start of the file; sizes and offsets in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SparseHeader {
    version: u32,
    flags: u32,
    capacity: u64,
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gd_offset: u64,
    rgd_offset: u64,
    grain_offset: u64,
    compress: u16,
}

/// The header fields after the magic: QEMU replaces all of them with the footer's.
const VMDK_HEADER_FIELDS: std::ops::Range<usize> = 4..79;
/// The grain directory offset inside the header: the one field header and footer differ in.
const VMDK_GD_FIELD: std::ops::Range<usize> = 56..64;
const VMDK_GD_AT_END: u64 = u64::MAX;
const VMDK_FLAG_RGD: u32 = 1 << 1;
const VMDK_COMPRESSION_DEFLATE: u16 = 1;
/// Where QEMU reads the embedded descriptor of a sparse file, whatever the header says,
/// and where oslo.utils requires it to be.
const VMDK_DESC_SECTOR: u64 = 1;
/// QEMU's DESC_SIZE: the bytes from sector 1 it searches for the parent hint and CIDs.
const VMDK_QEMU_DESC_LEN: u64 = 20 * SECTOR;
const VMDK_MAX_DESCRIPTOR: u64 = 64 * KIB;

impl SparseHeader {
    /// `b` starts with the magic.
    fn parse(b: &[u8]) -> SparseHeader {
        SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            grain_offset: le64(b, 64),
            compress: le16(b, 77),
        }
    }

    /// The createType QEMU reports for this header (it never reads the text's own).
    fn create_type(&self) -> &'static str {
        if self.compress == VMDK_COMPRESSION_DEFLATE {
            "streamOptimized"
        } else {
            "monolithicSparse"
        }
    }
}

fn check_vmdk_sparse(img: &Image, head: &[u8]) -> Result<u64, ImgFmtError> {
    const F: &str = "vmdk";
    let path = || img.path.to_path_buf();
    let not_monolithic = |detail: String| ImgFmtError::VmdkNotMonolithic { path: path(), detail };

    if head.len() < SECTOR as usize {
        return Err(img.malformed(F, "its sparse extent header is truncated".into()));
    }
    let h = SparseHeader::parse(head);
    if !(1..=3).contains(&h.version) {
        return Err(ImgFmtError::UnsupportedVersion { path: path(), format: F, version: h.version.to_string() });
    }
    // QEMU reads the parent hint from sector 1 whatever the header says.
    let fixed = img.read_clamped(VMDK_DESC_SECTOR * SECTOR, VMDK_QEMU_DESC_LEN)?;
    if let Some(parent) = vmdk_parent_hint(&fixed) {
        return Err(ImgFmtError::BackingFile { path: path(), format: F, backing: parent });
    }
    if h.capacity == 0 {
        return Err(ImgFmtError::VmdkCapacityZero { path: path() });
    }
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Err(not_monolithic("it has no embedded descriptor, so it is one extent of a multi-file VMDK".into()));
    }
    if h.desc_offset != VMDK_DESC_SECTOR {
        return Err(img.malformed(
            F,
            format!("its embedded descriptor starts at sector {}; QEMU reads it from sector 1", h.desc_offset),
        ));
    }
    let len = h
        .desc_size
        .checked_mul(SECTOR)
        .filter(|&l| l <= VMDK_MAX_DESCRIPTOR)
        .ok_or_else(|| img.malformed(F, format!("its embedded descriptor exceeds {VMDK_MAX_DESCRIPTOR} bytes")))?;
    let desc_end = VMDK_DESC_SECTOR + h.desc_size;
    let mut tables = vec![("grain directory", h.gd_offset), ("first grain", h.grain_offset)];
    if h.flags & VMDK_FLAG_RGD != 0 {
        tables.push(("redundant grain directory", h.rgd_offset));
    }
    if let Some((what, _)) = tables.iter().find(|(_, at)| *at != VMDK_GD_AT_END && *at < desc_end) {
        return Err(img.malformed(F, format!("its {what} overlaps the embedded descriptor")));
    }
    let raw = img.read(F, "embedded descriptor", VMDK_DESC_SECTOR * SECTOR, len)?;
    // QEMU's string searches stop at the first NUL: the text must end inside the region,
    // and nothing may hide after it.
    let end = raw
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| img.malformed(F, "its embedded descriptor is not NUL-terminated inside its region".into()))?;
    if raw[end..].iter().any(|&c| c != 0) {
        return Err(img.malformed(F, "its embedded descriptor has bytes after its terminating NUL".into()));
    }
    if find(&raw[..end], b"createType").is_none() {
        return Err(not_monolithic(
            "its embedded descriptor has no createType, so it is one extent of a multi-file VMDK".into(),
        ));
    }
    check_descriptor(&raw[..end], &h).map_err(|(line, detail)| ImgFmtError::VmdkDescriptorRefused {
        path: path(),
        line,
        detail,
    })?;
    if h.gd_offset == VMDK_GD_AT_END {
        check_vmdk_footer(img, head).map_err(|r| img.malformed(F, r))?;
    }
    if h.grain == 0 {
        return Err(img.malformed(F, "its grain size is zero".into()));
    }
    let size = h.capacity.checked_mul(SECTOR).ok_or_else(|| img.malformed(F, "its capacity overflows".into()))?;
    img.check_size(F, size)
}

/// A streamOptimized file may keep its real header in a footer (grain directory "at end");
/// QEMU then reads every field from the footer, so the footer must say what the header says.
fn check_vmdk_footer(img: &Image, head: &[u8]) -> Result<(), String> {
    if img.size < 3 * SECTOR + SECTOR {
        return Err("its footer lies beyond the start of the file".into());
    }
    let f = img.read("vmdk", "footer", img.size - 3 * SECTOR, 3 * SECTOR).map_err(|e| e.to_string())?;
    let (marker, footer, eos) = (&f[..512], &f[512..1024], &f[1024..]);
    let pad_zero = |m: &[u8]| m[16..].iter().all(|&b| b == 0);
    if le32(marker, 8) != 0 || le32(marker, 12) != 3 || !pad_zero(marker) {
        return Err("its footer marker is invalid".into());
    }
    if eos.iter().any(|&b| b != 0) {
        return Err("its end-of-stream marker is invalid".into());
    }
    if !footer.starts_with(b"KDMV") {
        return Err("its footer has no KDMV magic".into());
    }
    let (hf, ff) = (SparseHeader::parse(head), SparseHeader::parse(footer));
    let same_except_gd = |b: &[u8]| {
        let mut v = b[VMDK_HEADER_FIELDS].to_vec();
        v[VMDK_GD_FIELD.start - 4..VMDK_GD_FIELD.end - 4].fill(0);
        v
    };
    if same_except_gd(head) != same_except_gd(footer) {
        let field = [
            ("version", hf.version != ff.version),
            ("capacity", hf.capacity != ff.capacity),
            ("descriptor", hf.desc_offset != ff.desc_offset || hf.desc_size != ff.desc_size),
            ("compression", hf.compress != ff.compress),
        ]
        .into_iter()
        .find(|(_, differs)| *differs)
        .map_or("header fields", |(name, _)| name);
        return Err(format!("its footer disagrees with its header ({field})"));
    }
    if ff.gd_offset == VMDK_GD_AT_END || ff.gd_offset.checked_mul(SECTOR).is_none_or(|o| o >= img.size) {
        return Err("its footer's grain directory is missing or lies beyond the end of the file".into());
    }
    Ok(())
}

/// Header keys vdim accepts in an embedded descriptor, each at most once.
const VMDK_KEYS: [&str; 6] = ["version", "CID", "parentCID", "createType", "encoding", "isNativeSnapshot"];
/// Words QEMU finds with a bare `strstr` anywhere in the text, and how often each may occur
/// (always as the key of its own line): the first occurrence wins in QEMU.
const VMDK_SEARCHED: [(&str, usize); 3] = [("createType", 1), ("CID", 2), ("parentFileNameHint", 0)];

/// Whitelist an embedded descriptor line by line; `Err((line, why))`, lines counted from 1.
fn check_descriptor(text: &[u8], h: &SparseHeader) -> Result<(), (usize, String)> {
    for (i, &c) in text.iter().enumerate() {
        let ok = matches!(c, b' '..=b'~' | b'\t' | b'\n') || (c == b'\r' && text.get(i + 1) == Some(&b'\n'));
        if !ok {
            let line = 1 + text[..i].iter().filter(|&&b| b == b'\n').count();
            return Err((line, format!("byte {c:#04x} is not plain ASCII text")));
        }
    }
    let text = std::str::from_utf8(text).map_err(|_| (0, "it is not ASCII".to_string()))?;
    let mut seen: Vec<&str> = Vec::new();
    let mut extents = 0;
    for (n, raw_line) in text.split('\n').enumerate() {
        let n = n + 1;
        let line = raw_line.strip_suffix('\r').unwrap_or(raw_line).trim_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ddb.") {
            ddb_line(rest).map_err(|why| (n, why))?;
            continue;
        }
        if line.starts_with(['R', 'N']) && !line.contains('=') {
            extent_line(line, h.capacity).map_err(|why| (n, why))?;
            extents += 1;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((n, "it is neither a comment, a key=value line, a ddb line nor an extent".into()));
        };
        if !VMDK_KEYS.contains(&key) {
            return Err((n, format!("'{key}' is not a descriptor key vdim knows")));
        }
        if seen.contains(&key) {
            return Err((n, format!("'{key}' appears twice")));
        }
        seen.push(key);
        // QEMU writes CIDs with %x: one to eight hex digits.
        let hex8 = |v: &str| (1..=8).contains(&v.len()) && v.bytes().all(|c| c.is_ascii_hexdigit());
        let quoted = |v: &str| {
            v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).filter(|v| !v.contains('"')).map(str::to_string)
        };
        let valid = match key {
            "version" => matches!(value, "1" | "2" | "3"),
            "CID" => hex8(value),
            // Any other parent CID belongs to a differencing disk.
            "parentCID" => value == "ffffffff",
            "createType" => quoted(value).as_deref() == Some(h.create_type()),
            "encoding" => quoted(value).is_some(),
            _ => matches!(value, "\"no\"" | "\"yes\""),
        };
        if !valid {
            let expected = if key == "createType" {
                format!(" (the header makes it \"{}\")", h.create_type())
            } else {
                String::new()
            };
            return Err((n, format!("'{key}' has the value {value}{expected}")));
        }
    }
    if !seen.contains(&"createType") {
        return Err((0, "it has no createType".into()));
    }
    if !(seen.contains(&"CID") && seen.contains(&"parentCID")) {
        return Err((0, "it lacks CID or parentCID".into()));
    }
    if extents != 1 {
        return Err((0, format!("it lists {extents} extents; a monolithic VMDK has exactly one")));
    }
    for (word, allowed) in VMDK_SEARCHED {
        let count = text.matches(word).count();
        if count != allowed {
            return Err((0, format!("'{word}' occurs {count} times where QEMU searches the whole text for it")));
        }
    }
    Ok(())
}

/// `RW <capacity> SPARSE "<name>"`: the file itself (QEMU opens no other file for it), named
/// without a path.
fn extent_line(line: &str, capacity: u64) -> Result<(), String> {
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let (access, sectors, kind) = (words.next(), words.next(), words.next());
    if access != Some("RW") || kind != Some("SPARSE") {
        return Err(format!("extent '{line}' is not 'RW <sectors> SPARSE \"<file name>\"'"));
    }
    if sectors.and_then(|s| s.parse::<u64>().ok()).filter(|s| s.to_string() == sectors.unwrap_or("")) != Some(capacity)
    {
        return Err(format!("extent '{line}' does not cover the header's {capacity} sectors"));
    }
    let name = words.collect::<Vec<_>>().join(" ");
    let name = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or("");
    if name.is_empty() || name.contains(['"', '/', '\\']) || name == "." || name == ".." {
        return Err(format!("extent '{line}' does not name a plain file name"));
    }
    Ok(())
}

/// `ddb.<key> = "<value>"`: the disk database, which QEMU never interprets.
fn ddb_line(rest: &str) -> Result<(), String> {
    let bad = || format!("'ddb.{rest}' is not a ddb.<key> = \"<value>\" line");
    let (key, value) = rest.split_once('=').ok_or_else(bad)?;
    let key = key.trim_end_matches([' ', '\t']);
    let value = value.trim_start_matches([' ', '\t']);
    let key_ok = !key.is_empty() && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_');
    let value_ok = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).is_some_and(|v| !v.contains('"'));
    if key_ok && value_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

// ---------------------------------------------------------------------------------------
// VHDX (MS-VHDX): headers at 64 and 128 KiB, region table at 192 KiB, metadata region.

/// A GUID as stored on disk: the first three fields little-endian, the rest as written.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

const VHDX_REGION_BAT: [u8; 16] = guid(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
const VHDX_REGION_METADATA: [u8; 16] =
    guid(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);
const VHDX_FILE_PARAMETERS: [u8; 16] =
    guid(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
const VHDX_VIRTUAL_DISK_SIZE: [u8; 16] =
    guid(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
const VHDX_PARENT_LOCATOR: [u8; 16] =
    guid(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);

const VHDX_HEADER_SIZE: u64 = 4 * KIB;
const VHDX_REGION_TABLE_OFFSET: u64 = 192 * KIB;
const VHDX_TABLE_SIZE: u64 = 64 * KIB;
const VHDX_MAX_ENTRIES: u64 = 2047;
const VHDX_HAS_PARENT: u32 = 1 << 1;
const VHDX_METADATA_REQUIRED: u32 = 1 << 2;

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

const CRC32C_TABLE: [u32; 256] = crc32c_table();

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// VHDX structures carry a CRC-32C of themselves with the checksum field (at 4) zeroed.
fn vhdx_checksum_ok(block: &[u8]) -> bool {
    if block.len() < 8 {
        return false;
    }
    let mut copy = block.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == le32(block, 4)
}

/// The parent path a parent locator names, best effort (UTF-16LE key/value pairs).
fn vhdx_parent_path(locator: &[u8]) -> Option<String> {
    let utf16 = |off: u32, len: u16| -> Option<String> {
        let bytes = locator.get(off as usize..off as usize + len as usize)?;
        let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        Some(String::from_utf16_lossy(&units))
    };
    let count = le16(locator, 18) as usize;
    let mut found = None;
    for i in 0..count.min(256) {
        let e = 20 + i * 12;
        let entry = locator.get(e..e + 12)?;
        let key = utf16(le32(entry, 0), le16(entry, 8))?;
        let value = utf16(le32(entry, 4), le16(entry, 10))?;
        match key.as_str() {
            "relative_path" => return Some(value),
            "absolute_win32_path" | "volume_path" => found = found.or(Some(value)),
            _ => {}
        }
    }
    found
}

fn check_vhdx(img: &Image) -> Result<u64, ImgFmtError> {
    const F: &str = "vhdx";
    let path = || img.path.to_path_buf();
    let bad = |reason: &str| img.malformed(F, reason.to_string());
    if img.size < VHDX_REGION_TABLE_OFFSET + VHDX_TABLE_SIZE {
        return Err(bad("the file is too short to hold the VHDX headers and region table"));
    }

    // The current header is the valid one with the higher sequence number, as in QEMU.
    let mut current: Option<Vec<u8>> = None;
    for offset in [64 * KIB, 128 * KIB] {
        let h = img.read(F, "header", offset, VHDX_HEADER_SIZE)?;
        if !h.starts_with(b"head") || !vhdx_checksum_ok(&h) {
            continue;
        }
        if current.as_ref().is_none_or(|c| le64(&h, 8) > le64(c, 8)) {
            current = Some(h);
        }
    }
    let header = current.ok_or_else(|| bad("neither of its two headers is valid"))?;
    let version = le16(&header, 66);
    if version != 1 {
        return Err(ImgFmtError::UnsupportedVersion { path: path(), format: F, version: version.to_string() });
    }
    // Replaying the log would rewrite metadata after this inspection (QEMU replays on open).
    if header[48..64].iter().any(|&b| b != 0) {
        return Err(ImgFmtError::VhdxLog { path: path() });
    }

    let rt = img.read(F, "region table", VHDX_REGION_TABLE_OFFSET, VHDX_TABLE_SIZE)?;
    if !rt.starts_with(b"regi") || !vhdx_checksum_ok(&rt) {
        return Err(bad("its region table has a bad signature or checksum"));
    }
    let entries = u64::from(le32(&rt, 8));
    if entries > VHDX_MAX_ENTRIES {
        return Err(bad("its region table has too many entries"));
    }
    let mut metadata = None;
    for i in 0..entries as usize {
        let e = &rt[16 + i * 32..16 + (i + 1) * 32];
        let (id, offset, length, required) = (&e[..16], le64(e, 16), le32(e, 24), le32(e, 28));
        if id == VHDX_REGION_METADATA {
            metadata = Some((offset, u64::from(length)));
        } else if id != VHDX_REGION_BAT && required & 1 != 0 {
            return Err(bad("it has a required region vdim does not know"));
        }
    }
    let (md_offset, md_length) = metadata.ok_or_else(|| bad("it has no metadata region"))?;
    if md_length < VHDX_TABLE_SIZE || md_offset.checked_add(md_length).is_none_or(|e| e > img.size) {
        return Err(bad("its metadata region is too small or lies beyond the end of the file"));
    }
    let mt = img.read(F, "metadata table", md_offset, VHDX_TABLE_SIZE)?;
    if !mt.starts_with(b"metadata") {
        return Err(bad("its metadata table has a bad signature"));
    }
    let items = u64::from(le16(&mt, 10));
    if items > VHDX_MAX_ENTRIES {
        return Err(bad("its metadata table has too many entries"));
    }

    let mut has_parent = None;
    let mut disk_size = None;
    let mut parent_locator = None;
    for i in 0..items as usize {
        let e = &mt[32 + i * 32..32 + (i + 1) * 32];
        let (id, offset, length, flags) = (&e[..16], le32(e, 16), le32(e, 20), le32(e, 24));
        let item = |min_len: u32| -> Result<Vec<u8>, ImgFmtError> {
            let end = u64::from(offset) + u64::from(length);
            if length < min_len || end > md_length {
                return Err(bad("a metadata item lies outside the metadata region"));
            }
            img.read(F, "metadata item", md_offset + u64::from(offset), u64::from(length).min(VHDX_TABLE_SIZE))
        };
        if id == VHDX_FILE_PARAMETERS {
            has_parent = Some(le32(&item(8)?, 4) & VHDX_HAS_PARENT != 0);
        } else if id == VHDX_VIRTUAL_DISK_SIZE {
            disk_size = Some(le64(&item(8)?, 0));
        } else if id == VHDX_PARENT_LOCATOR {
            parent_locator = Some(item(20).ok().and_then(|l| vhdx_parent_path(&l)));
        } else if flags & VHDX_METADATA_REQUIRED != 0 && !is_known_vhdx_item(id) {
            return Err(bad("it has a required metadata item vdim does not know"));
        }
    }
    if let Some(parent) = parent_locator {
        return Err(ImgFmtError::ParentImage {
            path: path(),
            format: F,
            detail: match parent {
                Some(p) => format!("its parent locator names '{p}'"),
                None => "it has a parent locator".to_string(),
            },
        });
    }
    match has_parent {
        Some(true) => {
            return Err(ImgFmtError::ParentImage {
                path: path(),
                format: F,
                detail: "its file parameters have the HasParent flag set".to_string(),
            })
        }
        Some(false) => {}
        None => return Err(bad("it has no file parameters metadata item")),
    }
    let size = disk_size.ok_or_else(|| bad("it has no virtual disk size metadata item"))?;
    img.check_size(F, size)
}

/// Logical/physical sector size and page 83 data: required, harmless, and known.
fn is_known_vhdx_item(id: &[u8]) -> bool {
    const KNOWN: [[u8; 16]; 3] = [
        guid(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]),
        guid(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]),
        guid(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]),
    ];
    KNOWN.iter().any(|k| k == id)
}

// ---------------------------------------------------------------------------------------
// VDI (VirtualBox): a text banner, then the header at 0x40, little-endian.

fn check_vdi(img: &Image, head: &[u8]) -> Result<u64, ImgFmtError> {
    const F: &str = "vdi";
    const HEADER_END: usize = 0x1c8;
    const VERSION_1_1: u32 = 0x0001_0001;
    const BLOCK_SIZE: u32 = 1 << 20;
    let path = || img.path.to_path_buf();
    if head.len() < HEADER_END {
        return Err(img.malformed(F, "its header is truncated".into()));
    }
    let version = le32(head, 0x44);
    if version != VERSION_1_1 {
        return Err(ImgFmtError::UnsupportedVersion {
            path: path(),
            format: F,
            version: format!("{}.{}", version >> 16, version & 0xffff),
        });
    }
    match le32(head, 0x4c) {
        1 | 2 => {}
        4 => {
            return Err(ImgFmtError::ParentImage {
                path: path(),
                format: F,
                detail: "its image type is 4, differencing".into(),
            })
        }
        t => {
            return Err(ImgFmtError::UnsupportedVariant {
                path: path(),
                format: F,
                detail: format!("image type {t}; only normal and fixed images are supported"),
            })
        }
    }
    for (offset, what) in [(0x1a8, "parent (link) UUID"), (0x1b8, "parent modification UUID")] {
        if head[offset..offset + 16].iter().any(|&b| b != 0) {
            return Err(ImgFmtError::ParentImage { path: path(), format: F, detail: format!("its {what} is set") });
        }
    }
    let bmap_offset = u64::from(le32(head, 0x154));
    let data_offset = u64::from(le32(head, 0x158));
    let sector_size = le32(head, 0x168);
    let disk_size = le64(head, 0x170);
    let block_size = le32(head, 0x178);
    let blocks = u64::from(le32(head, 0x180));
    if sector_size != SECTOR as u32 || block_size != BLOCK_SIZE {
        return Err(
            img.malformed(F, format!("sector size {sector_size} or block size {block_size} is not 512 / 1 MiB"))
        );
    }
    if blocks * u64::from(BLOCK_SIZE) < disk_size {
        return Err(img.malformed(F, "its block map is smaller than its disk size".into()));
    }
    if bmap_offset + blocks * 4 > img.size || data_offset > img.size {
        return Err(img.malformed(F, "its block map or data offset lies beyond the end of the file".into()));
    }
    img.check_size(F, disk_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn qemu_img(dir: &Path, args: &[&str]) {
        let out = Command::new("qemu-img").args(args).current_dir(dir).output().expect("run qemu-img");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn create(dir: &Path, fmt: &str, name: &str, opts: &[&str]) -> PathBuf {
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[name, "10M"]);
        qemu_img(dir, &args);
        dir.join(name)
    }

    fn copy_with(dir: &Path, from: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = fs::read(from).expect("read fixture");
        edit(&mut bytes);
        let to = dir.join(name);
        fs::write(&to, bytes).expect("write fixture");
        to
    }

    fn err(path: &Path, claimed: Option<Format>) -> ImgFmtError {
        let e = inspect(path, claimed).expect_err("inspect should refuse");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "message does not name the path: {text}");
        e
    }

    #[test]
    fn format_names() {
        for f in [Format::Qcow2, Format::Raw, Format::Vmdk, Format::Vhdx, Format::Vdi] {
            assert_eq!(Format::parse(f.qemu_name()).expect("parse"), f);
            assert_eq!(f.to_string(), f.qemu_name());
        }
        assert_eq!(Format::parse("img").expect("img"), Format::Raw);
        assert_eq!(Format::parse("QCOW2").expect("upper"), Format::Qcow2);
        assert!(matches!(Format::parse("vpc"), Err(ImgFmtError::UnknownFormatName { .. })));
    }

    #[test]
    fn accepts_real_images_of_each_supported_format() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let cases = [
            ("qcow2", "a.qcow2", Format::Qcow2, &[][..]),
            ("qcow2", "v2.qcow2", Format::Qcow2, &["-o", "compat=0.10"][..]),
            ("raw", "a.raw", Format::Raw, &[][..]),
            ("raw", "disk", Format::Raw, &[][..]),
            ("vmdk", "a.vmdk", Format::Vmdk, &[][..]),
            ("vmdk", "s.vmdk", Format::Vmdk, &["-o", "subformat=streamOptimized"][..]),
            ("vhdx", "a.vhdx", Format::Vhdx, &[][..]),
            ("vdi", "a.vdi", Format::Vdi, &[][..]),
            ("vdi", "f.vdi", Format::Vdi, &["-o", "static=on"][..]),
        ];
        for (fmt, name, format, opts) in cases {
            let path = create(dir, fmt, name, opts);
            for claimed in [None, Some(format)] {
                let p = inspect(&path, claimed).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(p.format, format, "{name}");
                assert_eq!(p.virtual_size, Some(10 * MIB), "{name}");
                assert_eq!(p.file_size, fs::metadata(&path).expect("stat").len());
            }
        }
    }

    #[test]
    fn refuses_references_to_other_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();

        qemu_img(dir, &["create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", "b.qcow2"]);
        let e = err(&dir.join("b.qcow2"), None);
        assert!(matches!(&e, ImgFmtError::BackingFile { backing, .. } if backing == "/etc/passwd"), "{e}");

        let data = create(dir, "qcow2", "d.qcow2", &["-o", "data_file=d.data"]);
        let e = err(&data, None);
        assert!(matches!(&e, ImgFmtError::ExternalDataFile { data_file, .. } if data_file == "d.data"), "{e}");

        let flat = create(dir, "vmdk", "f.vmdk", &["-o", "subformat=monolithicFlat"]);
        let e = err(&flat, None);
        assert!(matches!(&e, ImgFmtError::VmdkDescriptor { extent, .. } if extent == "f-flat.vmdk"), "{e}");
        // The flat extent itself is raw data wearing a .vmdk name.
        let e = err(&dir.join("f-flat.vmdk"), None);
        assert!(matches!(e, ImgFmtError::FormatMismatch { .. }), "{e}");

        let split = create(dir, "vmdk", "t.vmdk", &["-o", "subformat=twoGbMaxExtentSparse"]);
        assert!(matches!(err(&split, None), ImgFmtError::VmdkDescriptor { .. }));
        let e = err(&dir.join("t-s001.vmdk"), None);
        assert!(matches!(e, ImgFmtError::VmdkNotMonolithic { .. }), "{e}");

        create(dir, "vmdk", "base.vmdk", &[]);
        qemu_img(dir, &["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "snap.vmdk"]);
        let e = err(&dir.join("snap.vmdk"), None);
        assert!(matches!(&e, ImgFmtError::BackingFile { backing, .. } if backing == "base.vmdk"), "{e}");
    }

    #[test]
    fn refuses_flagged_and_disguised_qcow2() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let good = create(dir, "qcow2", "good.qcow2", &[]);

        // Incompatible feature bits: big-endian u64 at 72, so bit 1 is in byte 79.
        let corrupt = copy_with(dir, &good, "corrupt.qcow2", |b| b[79] |= 0x02);
        assert!(matches!(err(&corrupt, None), ImgFmtError::Corrupt { .. }));
        let dirty = copy_with(dir, &good, "dirty.qcow2", |b| b[79] |= 0x01);
        inspect(&dirty, None).expect("the dirty bit alone is fine");
        let data_bit = copy_with(dir, &good, "databit.qcow2", |b| b[79] |= 0x04);
        assert!(matches!(err(&data_bit, None), ImgFmtError::ExternalDataFile { .. }));
        let unknown = copy_with(dir, &good, "unknown.qcow2", |b| b[78] |= 0x01);
        assert!(matches!(err(&unknown, None), ImgFmtError::UnknownFeatures { bits: 0x100, .. }));

        let as_raw = copy_with(dir, &good, "disguised.raw", |_| {});
        let e = err(&as_raw, None);
        let text = e.to_string();
        assert!(text.contains("claims raw") && text.contains("qcow2 header"), "{text}");
        let upload = copy_with(dir, &good, "upload", |_| {});
        let e = err(&upload, Some(Format::Raw));
        assert!(matches!(e, ImgFmtError::FormatMismatch { claimed: Format::Raw, via: "--format", .. }), "{e}");
        // An explicit, truthful --format overrides a misleading extension.
        let p = inspect(&as_raw, Some(Format::Qcow2)).expect("explicit format");
        assert_eq!(p.format, Format::Qcow2);
        let raw = create(dir, "raw", "plain.raw", &[]);
        let named = copy_with(dir, &raw, "plain.qcow2", |_| {});
        let e = err(&named, None);
        assert!(e.to_string().contains("raw data"), "{e}");
        assert!(matches!(err(&raw, Some(Format::Vmdk)), ImgFmtError::FormatMismatch { .. }));

        // qcow2 magic at 0 plus the VDI signature at 0x40.
        let both = copy_with(dir, &good, "both", |b| b[0x40..0x44].copy_from_slice(&VDI_SIGNATURE));
        let e = err(&both, None);
        assert!(matches!(&e, ImgFmtError::Ambiguous { formats, .. } if formats == "qcow2, vdi"), "{e}");
    }

    #[test]
    fn refuses_unsupported_formats() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        for (fmt, name, opts, expected) in [
            ("qed", "a.qed", &[][..], "qed"),
            ("qcow", "a.qcow", &[][..], "qcow (version 1)"),
            ("vpc", "a.vhd", &[][..], "vpc (vhd)"),
            ("vpc", "fixed.vhd", &["-o", "subformat=fixed"][..], "vpc (vhd)"),
            ("parallels", "a.hds", &[][..], "parallels"),
        ] {
            let path = create(dir, fmt, name, opts);
            let e = err(&path, None);
            assert!(matches!(&e, ImgFmtError::Unsupported { format, .. } if *format == expected), "{name}: {e}");
        }
        let mut luks = b"LUKS\xba\xbe\x00\x01".to_vec();
        luks.resize(4096, 0);
        let mut bochs = b"Bochs Virtual HD Image\0".to_vec();
        bochs.resize(512, 0);
        let mut dmg = vec![0u8; 4096];
        dmg[4096 - 512..4096 - 508].copy_from_slice(b"koly");
        let mut cloop = CLOOP_MAGIC.to_vec();
        cloop.resize(4096, 0);
        let mut cowd = b"COWD".to_vec();
        cowd.resize(2048, 0);
        for (name, bytes, expected) in [
            ("luks", luks, "luks"),
            ("bochs", bochs, "bochs"),
            ("dmg", dmg, "dmg"),
            ("cloop", cloop, "cloop"),
            ("cowd", cowd, "vmdk version 3 (COWD)"),
            ("named.dmg", vec![0u8; 4096], "dmg"),
        ] {
            let path = dir.join(name);
            fs::write(&path, bytes).expect("write");
            let e = err(&path, None);
            assert!(matches!(&e, ImgFmtError::Unsupported { format, .. } if *format == expected), "{name}: {e}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_regular_nonempty_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        assert!(matches!(err(&dir.join("missing"), None), ImgFmtError::Unreadable { .. }));
        assert!(matches!(err(dir, None), ImgFmtError::NotRegularFile { kind: "a directory", .. }));
        std::os::unix::fs::symlink(dir, dir.join("link")).expect("symlink");
        assert!(matches!(err(&dir.join("link"), None), ImgFmtError::NotRegularFile { .. }));
        assert!(matches!(
            err(Path::new("/dev/null"), None),
            ImgFmtError::NotRegularFile { kind: "a character device", .. }
        ));
        let fifo = dir.join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        assert!(matches!(err(&fifo, None), ImgFmtError::NotRegularFile { kind: "a FIFO", .. }));
        fs::write(dir.join("empty.raw"), b"").expect("write");
        assert!(matches!(err(&dir.join("empty.raw"), None), ImgFmtError::Empty { .. }));
        fs::write(dir.join("target.raw"), vec![0u8; 4096]).expect("write");
        std::os::unix::fs::symlink(dir.join("target.raw"), dir.join("to-file")).expect("link");
        assert_eq!(inspect(&dir.join("to-file"), None).expect("symlink to a file").format, Format::Raw);
    }

    /// A minimal qcow2 v3 image with 512-byte clusters, byte by byte:
    /// cluster 0 header + end-of-extensions marker, 1 refcount table, 2 refcount block,
    /// 3 L1 table (one entry covers 32 KiB with 512-byte clusters, so 1 MiB needs 32).
    fn tiny_qcow2() -> Vec<u8> {
        let mut b = vec![0u8; 4 * 512];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb"); // magic
        put(4, &3u32.to_be_bytes()); // version
        put(8, &0u64.to_be_bytes()); // backing_file_offset
        put(16, &0u32.to_be_bytes()); // backing_file_size
        put(20, &9u32.to_be_bytes()); // cluster_bits: 512-byte clusters
        put(24, &MIB.to_be_bytes()); // virtual size
        put(32, &0u32.to_be_bytes()); // crypt_method
        put(36, &32u32.to_be_bytes()); // l1_size
        put(40, &1536u64.to_be_bytes()); // l1_table_offset: cluster 3
        put(48, &512u64.to_be_bytes()); // refcount_table_offset: cluster 1
        put(56, &1u32.to_be_bytes()); // refcount_table_clusters
        put(96, &4u32.to_be_bytes()); // refcount_order
        put(100, &104u32.to_be_bytes()); // header_length
        put(104, &[0u8; 8]); // extension: end marker
        put(512, &1024u64.to_be_bytes()); // refcount table -> block at cluster 2
        for i in 0..4 {
            put(1024 + i * 2, &1u16.to_be_bytes()); // clusters 0..=3 in use
        }
        b
    }

    #[test]
    fn qcow2_header_edge_cases() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let write = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = tiny_qcow2();
            edit(&mut b);
            let p = dir.join(name);
            fs::write(&p, b).expect("write");
            p
        };
        let base = write("base.qcow2", &|_| {});
        assert_eq!(inspect(&base, None).expect("tiny image").virtual_size, Some(MIB));
        let qemu =
            Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&base).status().expect("qemu-img check");
        assert!(qemu.success(), "the hand-built fixture is a valid image");

        let p = write("enc.qcow2", &|b| b[35] = 1);
        assert!(matches!(err(&p, None), ImgFmtError::Encrypted { .. }));
        let p = write("v4.qcow2", &|b| b[7] = 4);
        assert!(matches!(err(&p, None), ImgFmtError::UnsupportedVersion { .. }));
        let p = write("v1.qcow", &|b| b[7] = 1);
        assert!(matches!(err(&p, None), ImgFmtError::Unsupported { .. }));
        for bits in [8u8, 22, 30, 63, 200] {
            let p = write("bits.qcow2", &|b| b[23] = bits);
            assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }), "{bits}");
        }
        // 64 TiB + 512 bytes, with an L1 large enough not to be the first complaint.
        let p = write("huge.qcow2", &|b| b[24..32].copy_from_slice(&((64u64 << 40) + 512).to_be_bytes()));
        assert!(matches!(err(&p, None), ImgFmtError::TooLarge { .. }));
        let p = write("l1small.qcow2", &|b| b[36..40].copy_from_slice(&31u32.to_be_bytes()));
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
        let p = write("l1out.qcow2", &|b| b[36..40].copy_from_slice(&1000u32.to_be_bytes()));
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
        for len in [0u32, 96, 105, 4096] {
            let p = write("hlen.qcow2", &|b| b[100..104].copy_from_slice(&len.to_be_bytes()));
            assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }), "{len}");
        }
        // A data-file extension naming /etc/shadow, without the incompatible bit.
        let p = write("dataext.qcow2", &|b| {
            b[104..108].copy_from_slice(&qcow2::EXT_DATA_FILE.to_be_bytes());
            b[108..112].copy_from_slice(&11u32.to_be_bytes());
            b[112..123].copy_from_slice(b"/etc/shadow");
            b[128..136].fill(0); // end marker after padding
        });
        assert!(matches!(err(&p, None), ImgFmtError::ExternalDataFile { data_file, .. } if data_file == "/etc/shadow"));
        // An extension whose length runs past the cluster.
        let p = write("extlen.qcow2", &|b| {
            b[104..108].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        });
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
        // A backing file offset pointing outside the file still names what it can.
        let p = write("backing.qcow2", &|b| b[8..16].copy_from_slice(&u64::MAX.to_be_bytes()));
        assert!(matches!(err(&p, None), ImgFmtError::BackingFile { .. }));
        // A feature table entry of 49 bytes would make qcow2-rs panic; we must not.
        let p = write("feat.qcow2", &|b| {
            b[104..108].copy_from_slice(&qcow2::EXT_FEATURE_TABLE.to_be_bytes());
            b[108..112].copy_from_slice(&49u32.to_be_bytes());
            // The 49th data byte (0: a valid feature type) starts a 1-byte chunk.
            b[160] = 0;
        });
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
    }

    /// Locate a VHDX metadata item's data offset (test-side parsing of qemu-img output).
    fn vhdx_item_offset(bytes: &[u8], id: &[u8; 16]) -> (usize, usize) {
        let rt = 192 * 1024;
        let count = le32(bytes, rt + 8) as usize;
        let md = (0..count)
            .map(|i| rt + 16 + i * 32)
            .find(|&e| bytes[e..e + 16] == VHDX_REGION_METADATA)
            .map(|e| le64(bytes, e + 16) as usize)
            .expect("metadata region");
        let items = le16(bytes, md + 10) as usize;
        let entry = (0..items).map(|i| md + 32 + i * 32).find(|&e| bytes[e..e + 16] == *id).expect("metadata item");
        (entry, md + le32(bytes, entry + 16) as usize)
    }

    fn reseal(block: &mut [u8]) {
        block[4..8].fill(0);
        let c = crc32c(block);
        block[4..8].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn vhdx_and_vdi_edge_cases() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let vhdx = create(dir, "vhdx", "a.vhdx", &[]);

        let p = copy_with(dir, &vhdx, "parent.vhdx", |b| {
            let (_, data) = vhdx_item_offset(b, &VHDX_FILE_PARAMETERS);
            b[data + 4] |= 0x02;
        });
        assert!(matches!(err(&p, None), ImgFmtError::ParentImage { .. }));

        // Turn the virtual disk size item into a parent locator naming a host file.
        let p = copy_with(dir, &vhdx, "locator.vhdx", |b| {
            let (entry, data) = vhdx_item_offset(b, &VHDX_VIRTUAL_DISK_SIZE);
            b[entry..entry + 16].copy_from_slice(&VHDX_PARENT_LOCATOR);
            b[entry + 20..entry + 24].copy_from_slice(&200u32.to_le_bytes());
            let key: Vec<u8> = "relative_path".encode_utf16().flat_map(u16::to_le_bytes).collect();
            let value: Vec<u8> = "..\\secret.vhdx".encode_utf16().flat_map(u16::to_le_bytes).collect();
            b[data..data + 200].fill(0);
            b[data + 18..data + 20].copy_from_slice(&1u16.to_le_bytes());
            b[data + 20..data + 24].copy_from_slice(&32u32.to_le_bytes());
            b[data + 24..data + 28].copy_from_slice(&(32 + key.len() as u32).to_le_bytes());
            b[data + 28..data + 30].copy_from_slice(&(key.len() as u16).to_le_bytes());
            b[data + 30..data + 32].copy_from_slice(&(value.len() as u16).to_le_bytes());
            b[data + 32..data + 32 + key.len()].copy_from_slice(&key);
            b[data + 32 + key.len()..data + 32 + key.len() + value.len()].copy_from_slice(&value);
        });
        let e = err(&p, None);
        assert!(matches!(e, ImgFmtError::ParentImage { .. }), "{e}");
        assert!(e.to_string().contains("..\\secret.vhdx"), "{e}");

        let p = copy_with(dir, &vhdx, "big.vhdx", |b| {
            let (_, data) = vhdx_item_offset(b, &VHDX_VIRTUAL_DISK_SIZE);
            b[data..data + 8].copy_from_slice(&(65u64 << 40).to_le_bytes());
        });
        assert!(matches!(err(&p, None), ImgFmtError::TooLarge { .. }));

        let p = copy_with(dir, &vhdx, "log.vhdx", |b| {
            for h in [64 * 1024, 128 * 1024] {
                b[h + 48] = 1;
                reseal(&mut b[h..h + 4096]);
            }
        });
        assert!(matches!(err(&p, None), ImgFmtError::VhdxLog { .. }));

        let p = copy_with(dir, &vhdx, "regions.vhdx", |b| b[192 * 1024 + 20] ^= 0xff);
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
        // One damaged header is tolerated, as QEMU does; two are not.
        let p = copy_with(dir, &vhdx, "onehead.vhdx", |b| b[64 * 1024 + 40] ^= 0xff);
        inspect(&p, None).expect("one valid header suffices");
        let p = copy_with(dir, &vhdx, "noheads.vhdx", |b| {
            b[64 * 1024 + 40] ^= 0xff;
            b[128 * 1024 + 40] ^= 0xff;
        });
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));

        let vdi = create(dir, "vdi", "a.vdi", &[]);
        let p = copy_with(dir, &vdi, "diff.vdi", |b| b[0x4c] = 4);
        assert!(matches!(err(&p, None), ImgFmtError::ParentImage { .. }));
        let p = copy_with(dir, &vdi, "undo.vdi", |b| b[0x4c] = 3);
        assert!(matches!(err(&p, None), ImgFmtError::UnsupportedVariant { .. }));
        let p = copy_with(dir, &vdi, "link.vdi", |b| b[0x1a8] = 0x42);
        assert!(matches!(err(&p, None), ImgFmtError::ParentImage { .. }));
        let p = copy_with(dir, &vdi, "huge.vdi", |b| {
            b[0x170..0x178].copy_from_slice(&(1u64 << 50).to_le_bytes());
            b[0x180..0x184].copy_from_slice(&u32::MAX.to_le_bytes());
        });
        assert!(matches!(err(&p, None), ImgFmtError::Malformed { .. }));
        let p = copy_with(dir, &vdi, "v2.vdi", |b| b[0x46] = 2);
        assert!(matches!(err(&p, None), ImgFmtError::UnsupportedVersion { .. }));
    }

    /// A monolithicSparse VMDK from qemu-img with its embedded descriptor replaced.
    fn vmdk_with_descriptor(dir: &Path, name: &str, edit: impl FnOnce(&str) -> String) -> PathBuf {
        let base = create(dir, "vmdk", &format!("base-{name}"), &[]);
        copy_with(dir, &base, name, |b| {
            let region = &mut b[512..512 + 20 * 512];
            let text = text_prefix(region);
            let new = edit(&text);
            region.fill(0);
            region[..new.len()].copy_from_slice(new.as_bytes());
        })
    }

    fn refused_line(e: &ImgFmtError) -> Option<usize> {
        match e {
            ImgFmtError::VmdkDescriptorRefused { line, .. } => Some(*line),
            _ => None,
        }
    }

    #[test]
    fn vmdk_descriptor_lines_are_whitelisted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let same = vmdk_with_descriptor(dir, "same.vmdk", str::to_string);
        inspect(&same, None).expect("qemu-img's own descriptor is accepted");
        let vmware = vmdk_with_descriptor(dir, "vmware.vmdk", |t| {
            t.replace("version=1\n", "version=1\r\nencoding=\"UTF-8\"\nisNativeSnapshot=\"no\"\n")
                .replace("ddb.adapterType = \"ide\"", "ddb.adapterType = \"lsilogic\"\nddb.uuid = \"60 00 c2 9b\"")
        });
        inspect(&vmware, None).expect("VMware's keys, CRLF and ddb lines are accepted");

        type Edit<'a> = &'a dyn Fn(&str) -> String;
        let cases: [(&str, Edit); 16] = [
            ("unknown-key", &|t| t.replace("version=1\n", "version=1\nfileName=\"x\"\n")),
            ("key-twice", &|t| t.replace("version=1\n", "version=1\nversion=1\n")),
            ("non-ascii", &|t| t.replace("\"ide\"", "\"id\u{e9}\"")),
            ("control-char", &|t| t.replace("\"ide\"", "\"id\x0be\"")),
            ("lone-cr", &|t| {
                t.replace("ddb.adapterType = \"ide\"\n", "ddb.adapterType = \"ide\"\rRW 8 FLAT \"x\" 0\n")
            }),
            ("absolute-extent", &|t| t.replace("SPARSE \"base-", "SPARSE \"/etc/")),
            ("relative-extent", &|t| t.replace("SPARSE \"base-", "SPARSE \"../base-")),
            ("flat-extent", &|t| t.replace("SPARSE", "FLAT").replace(".vmdk\"\n", ".vmdk\" 0\n")),
            ("two-extents", &|t| t.replace("# The Disk Data Base", "RW 20480 SPARSE \"b.vmdk\"\n# The Disk Data Base")),
            ("rdonly-extent", &|t| t.replace("# The Disk Data Base", "RDONLY 20480 SPARSE \"b.vmdk\"\n#")),
            ("extent-size", &|t| t.replace("RW 20480", "RW 40960")),
            // sscanf reads "RW" on one line and the rest of an extent on the next.
            ("split-extent", &|t| t.replace("# The Disk Data Base", "RW\n2048 FLAT \"/etc/shadow\" 0\n#")),
            // strstr finds the first createType, even inside a comment.
            ("comment-create-type", &|t| format!("#createType=\"monolithicFlat\"\n{t}")),
            ("ddb-create-type", &|t| format!("{t}ddb.note = \"createType=\\\"vmfs\\\"\"\n")),
            ("wrong-create-type", &|t| t.replace("\"monolithicSparse\"", "\"streamOptimized\"")),
            ("parent-cid", &|t| t.replace("parentCID=ffffffff", "parentCID=12345678")),
        ];
        for (name, edit) in cases {
            let p = vmdk_with_descriptor(dir, &format!("{name}.vmdk"), |t| {
                let changed = edit(t);
                assert_ne!(changed, t, "{name}: the edit applies");
                changed
            });
            let e = err(&p, None);
            assert!(refused_line(&e).is_some(), "{name}: {e}");
        }
        // The line number points at the offending line.
        let p = vmdk_with_descriptor(dir, "line.vmdk", |t| t.replace("version=1\n", "version=1\nbogus\n"));
        assert_eq!(refused_line(&err(&p, None)), Some(3));
    }

    #[test]
    fn vmdk_header_fields_qemu_reads_differently_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let good = create(dir, "vmdk", "good.vmdk", &[]);
        let cap0 = copy_with(dir, &good, "cap0.vmdk", |b| b[12..20].fill(0));
        assert!(matches!(err(&cap0, None), ImgFmtError::VmdkCapacityZero { .. }));
        // oslo.utils: the descriptor starts at sector 1, where QEMU reads it.
        let moved = copy_with(dir, &good, "moved.vmdk", |b| {
            b[28..36].copy_from_slice(&2u64.to_le_bytes());
            b.copy_within(512..512 + 20 * 512, 1024);
        });
        assert!(matches!(err(&moved, None), ImgFmtError::Malformed { .. }));
        let overlap = copy_with(dir, &good, "overlap.vmdk", |b| b[56..64].copy_from_slice(&5u64.to_le_bytes()));
        assert!(matches!(err(&overlap, None), ImgFmtError::Malformed { .. }));
        let huge = copy_with(dir, &good, "huge.vmdk", |b| b[36..44].copy_from_slice(&4096u64.to_le_bytes()));
        assert!(matches!(err(&huge, None), ImgFmtError::Malformed { .. }));
        // QEMU's searches stop at the first NUL; nothing may hide behind it or run past the region.
        let hidden =
            copy_with(dir, &good, "hidden.vmdk", |b| b[512 + 19 * 512..512 + 19 * 512 + 5].copy_from_slice(b"CID=1"));
        assert!(matches!(err(&hidden, None), ImgFmtError::Malformed { .. }));
        let unterminated = vmdk_with_descriptor(dir, "unterminated.vmdk", |t| {
            let mut t = t.to_string();
            while t.len() < 20 * 512 {
                t.push_str("# padding\n");
            }
            t.truncate(20 * 512);
            t
        });
        assert!(matches!(err(&unterminated, None), ImgFmtError::Malformed { .. }));
    }

    /// A streamOptimized VMDK with data, rewritten the way VMware writes it: the grain
    /// directory "at end" in the header, and the real header in a footer before the
    /// end-of-stream marker.
    fn vmdk_with_footer(dir: &Path, name: &str, edit_footer: impl FnOnce(&mut [u8])) -> PathBuf {
        let raw = dir.join(format!("{name}.raw"));
        let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&raw, data).expect("write raw");
        let so = dir.join(format!("{name}.so"));
        qemu_img(
            dir,
            &["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
                .iter()
                .copied()
                .chain([raw.to_str().expect("utf-8"), so.to_str().expect("utf-8")])
                .collect::<Vec<_>>(),
        );
        copy_with(dir, &so, name, |b| {
            let mut footer = vec![0u8; 1536];
            footer[12..16].copy_from_slice(&3u32.to_le_bytes()); // marker type: footer
            footer[512..1024].copy_from_slice(&b[..512]); // the header, real grain directory
            edit_footer(&mut footer[512..1024]);
            b[56..64].copy_from_slice(&VMDK_GD_AT_END.to_le_bytes());
            b.extend_from_slice(&footer); // ... and an all-zero end-of-stream marker
        })
    }

    #[test]
    fn vmdk_footer_must_match_its_header() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let good = vmdk_with_footer(dir, "good.vmdk", |_| {});
        assert_eq!(inspect(&good, None).expect("a consistent footer").virtual_size, Some(3 * MIB));
        let raw = dir.join("good.vmdk.raw");
        qemu_img(
            dir,
            &["compare", "-q", "-f", "raw", "-F", "vmdk", raw.to_str().expect("utf-8"), good.to_str().expect("utf-8")],
        );
        for (name, edit) in [
            (
                "capacity",
                &(|f: &mut [u8]| f[12..20].copy_from_slice(&(1u64 << 30 >> 9).to_le_bytes())) as &dyn Fn(&mut [u8]),
            ),
            ("descriptor", &|f: &mut [u8]| f[36..44].copy_from_slice(&1u64.to_le_bytes())),
            ("version", &|f: &mut [u8]| f[4] = 1),
            ("compression", &|f: &mut [u8]| f[77] = 0),
            ("another-footer", &|f: &mut [u8]| f[56..64].copy_from_slice(&VMDK_GD_AT_END.to_le_bytes())),
            ("magic", &|f: &mut [u8]| f[0] = b'X'),
        ] {
            let p = vmdk_with_footer(dir, &format!("{name}.vmdk"), edit);
            let e = err(&p, None);
            assert!(matches!(e, ImgFmtError::Malformed { .. }), "{name}: {e}");
        }
        let eos = copy_with(dir, &good, "eos.vmdk", |b| {
            let n = b.len();
            b[n - 500] = 1;
        });
        assert!(matches!(err(&eos, None), ImgFmtError::Malformed { .. }));
    }

    #[test]
    fn vmdk_text_as_qemu_probes_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        // No "# Disk DescriptorFile", createType far away: QEMU still probes this as VMDK.
        let mut text = b"# hello\n   \nversion=1\n".to_vec();
        text.resize(3000, b'#');
        text.extend_from_slice(b"\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/shadow\" 0\n");
        let p = dir.join("sneaky");
        fs::write(&p, &text).expect("write");
        assert!(matches!(err(&p, None), ImgFmtError::VmdkDescriptor { .. }));
        assert!(qemu_vmdk_text_probe(b"version=2\r\n"));
        assert!(!qemu_vmdk_text_probe(b"\nversion=1\n"));
        assert!(!qemu_vmdk_text_probe(b"version=4\n"));
    }

    use crate::qcow2::tests::rng;

    #[test]
    fn hostile_bytes_never_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let mut next = rng(0xfeed);
        let probe = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            fs::write(&p, bytes).expect("write");
            for claimed in [None, Some(Format::Raw), Some(Format::Qcow2)] {
                let _ = inspect(&p, claimed);
            }
        };
        for len in [1usize, 7, 64, 511, 512, 513, 4096, 70_000, 300_000] {
            let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            probe("random", &b);
        }

        let mut fixtures = vec![tiny_qcow2()];
        for (fmt, name, opts) in [
            ("qcow2", "a.qcow2", &[][..]),
            ("vmdk", "a.vmdk", &[][..]),
            ("vmdk", "s.vmdk", &["-o", "subformat=streamOptimized"][..]),
            ("vhdx", "a.vhdx", &[][..]),
            ("vdi", "a.vdi", &[][..]),
        ] {
            fixtures.push(fs::read(create(dir, fmt, name, opts)).expect("read"));
        }
        for image in &fixtures {
            // Truncated headers and tables of each format.
            let mut cut = 1;
            while cut < image.len().min(400 * 1024) {
                probe("cut", &image[..cut]);
                cut = cut * 5 / 4 + 1 + (next() % 64) as usize;
            }
            // Random damage where the metadata lives.
            let hot = [0usize, 64 * 1024, 128 * 1024, 192 * 1024, 0x300000];
            let image = &image[..image.len().min(4 << 20)];
            for _ in 0..60 {
                let mut b = image.to_vec();
                for _ in 0..1 + next() % 8 {
                    let base = hot[(next() % hot.len() as u64) as usize];
                    let at = base + (next() % 1024) as usize;
                    if at < b.len() {
                        b[at] = next() as u8;
                    }
                }
                probe("mutated", &b);
            }
        }
    }
}
