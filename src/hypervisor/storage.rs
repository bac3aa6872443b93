//! The storage half of [`Libvirt`](super::Libvirt): a host's layer store as a libvirt
//! directory storage pool, volumes uploaded and read back through libvirt streams on the
//! host's own connection (no second credential, nothing installed on the host).
//!
//! virt 0.5 wraps streams without their sparse calls: `virStreamSendHole`,
//! `virStreamRecvFlags` and `virStreamRecvHole` are called through `virt::sys` on the
//! stream's pointer, on a stream opened by `virStorageVolUpload`/`Download` with the
//! `SPARSE_STREAM` flag (libvirt >= 3.4). Holes are found with `SEEK_DATA`/`SEEK_HOLE`
//! ([`super::sparse`]) and sent as their length; the host's fdstream seeks over them, so the
//! copy is as sparse as the original.
//!
//! libvirt cannot rename a volume, and a clone (`virStorageVolCreateXMLFrom`) of a qcow2
//! volume runs `qemu-img convert`, which rewrites the bytes: a copy is uploaded under its final
//! name. Its first 4 KiB go last, so until an upload has finished the volume has no qcow2
//! magic and QEMU refuses it as a qcow2 image; whether it is *good* only its read-back says.

use std::ffi::c_char;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::sparse::{self, Extent};
use super::xml::{self, element_text, find_elements, Writer};
use super::{HypervisorError, StorageRef, Upload, Volume, VolumeDigest};
use crate::digest::Background;

/// Bytes per stream call: libvirt's own (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`, what
/// `virStreamSendAll` uses), which every daemon accepts.
const CHUNK: usize = 262_120;
/// The bytes of a volume uploaded last: a qcow2 header with its magic.
const HEADER: u64 = 4096;
/// The pool's directory: others may pass through to a file (QEMU may run as another user)
/// but not list the layers.
const DIR_MODE: &str = "0711";
/// As in the local store: a layer is never written again.
pub(super) const LAYER_MODE: &str = "0440";
/// A desktop's disk (its overlay): QEMU writes it, nobody else reads it.
pub(super) const DISK_MODE: &str = "0600";

/// Names the host and storage pool in every error.
pub(super) struct Host<'a> {
    pub uri: &'a str,
    pub pool: &'a str,
}

/// A stream step's failure: the local file or libvirt.
enum Fail {
    Local(std::io::Error),
    Libvirt(virt::error::Error),
}

impl From<virt::error::Error> for Fail {
    fn from(e: virt::error::Error) -> Fail {
        Fail::Libvirt(e)
    }
}

impl Host<'_> {
    fn pool_error(&self, op: &'static str, message: String) -> HypervisorError {
        HypervisorError::Storage { at: StorageRef::pool(self.uri, self.pool), op, message }
    }

    fn volume_error(&self, op: &'static str, volume: &str, message: String) -> HypervisorError {
        HypervisorError::Storage { at: StorageRef::volume(self.uri, self.pool, volume), op, message }
    }

    fn exists(&self, volume: &str) -> HypervisorError {
        HypervisorError::VolumeExists { at: StorageRef::volume(self.uri, self.pool, volume) }
    }

    fn lookup_pool(&self, conn: &Connect) -> Result<StoragePool, HypervisorError> {
        conn.lookup_storage_pool_by_name(self.pool).map_err(|e| self.pool_error("find", e.message().into()))
    }

    fn lookup_volume(&self, pool: &StoragePool, volume: &str, op: &'static str) -> Result<StorageVol, HypervisorError> {
        pool.lookup_storage_vol_by_name(volume).map_err(|e| self.volume_error(op, volume, e.message().into()))
    }

    pub(super) fn ensure_pool(&self, conn: &Connect, path: &Path) -> Result<(), HypervisorError> {
        if let Some(reason) = xml::name_problem(self.pool) {
            return Err(self.pool_error("define", format!("the name is refused: {reason}")));
        }
        if let Some(reason) = xml::path_problem(path) {
            return Err(self.pool_error("define", format!("the path {} is refused: {reason}", path.display())));
        }
        let pool = match conn.lookup_storage_pool_by_name(self.pool) {
            Ok(p) => p,
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_POOL => match self.define_pool(conn, path) {
                Ok(p) => p,
                // Another vdim defined it meanwhile: use theirs, checked below.
                Err(e) => conn.lookup_storage_pool_by_name(self.pool).map_err(|_| e)?,
            },
            Err(e) => return Err(self.pool_error("look up", e.message().into())),
        };
        let desc = pool.xml_desc(0).map_err(|e| self.pool_error("read the XML of", e.message().into()))?;
        let kind = find_elements(&desc, "pool").first().and_then(|p| p.attr("type").map(str::to_string));
        let at = find_elements(&desc, "target").first().and_then(|t| element_text(&t.inner, "path"));
        if kind.as_deref() != Some("dir") || at.as_deref().map(Path::new) != Some(path) {
            let found = format!(
                "a {} pool at {}",
                kind.as_deref().unwrap_or("(unknown type)"),
                at.as_deref().unwrap_or("(no path)")
            );
            let at = StorageRef::pool(self.uri, self.pool);
            return Err(HypervisorError::StoragePoolElsewhere { at, found, wanted: path.to_path_buf() });
        }
        if !pool.is_active().map_err(|e| self.pool_error("read the state of", e.message().into()))? {
            if let Err(e) = pool.create(sys::VIR_STORAGE_POOL_CREATE_WITH_BUILD) {
                // Started by another vdim meanwhile is as good.
                if !pool.is_active().unwrap_or(false) {
                    return Err(self.pool_error("build and start", e.message().into()));
                }
            }
            tracing::info!(uri = %self.uri, pool = %self.pool, path = %path.display(), "storage pool started");
        }
        Ok(())
    }

    fn define_pool(&self, conn: &Connect, path: &Path) -> Result<StoragePool, HypervisorError> {
        let mut w = Writer::default();
        w.open("pool", &[("type", "dir")]);
        w.leaf("name", &[], self.pool);
        w.open("target", &[]);
        w.leaf("path", &[], &path.to_string_lossy());
        w.open("permissions", &[]);
        w.leaf("mode", &[], DIR_MODE);
        w.close("permissions");
        w.close("target");
        w.close("pool");
        let pool =
            conn.define_storage_pool_xml(&w.out, 0).map_err(|e| self.pool_error("define", e.message().into()))?;
        pool.set_autostart(true).map_err(|e| self.pool_error("autostart", e.message().into()))?;
        tracing::info!(uri = %self.uri, pool = %self.pool, path = %path.display(), "storage pool defined");
        Ok(pool)
    }

    pub(super) fn volumes(&self, conn: &Connect) -> Result<Vec<Volume>, HypervisorError> {
        let pool = self.lookup_pool(conn)?;
        // Refused while libvirt builds a volume in the pool: its list is then current anyway.
        if let Err(e) = pool.refresh(0) {
            tracing::debug!(uri = %self.uri, pool = %self.pool, error = %e.message(), "storage pool not refreshed");
        }
        let all = pool.list_all_volumes(0).map_err(|e| self.pool_error("list the volumes of", e.message().into()))?;
        let mut out = Vec::with_capacity(all.len());
        for vol in all {
            let name = vol.name().map_err(|e| self.pool_error("read a volume name of", e.message().into()))?;
            let info = vol.info().and_then(|i| Ok((i, vol.info_flags(sys::VIR_STORAGE_VOL_GET_PHYSICAL)?)));
            match info {
                Ok((i, p)) => {
                    out.push(Volume { name, capacity: i.capacity, allocation: i.allocation, physical: p.allocation })
                }
                // Deleted since the list was made.
                Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_VOL => {}
                Err(e) => return Err(self.volume_error("read the size of", &name, e.message().into())),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub(super) fn upload(
        &self,
        conn: &Connect,
        volume: &str,
        source: &Path,
        mode: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Upload, HypervisorError> {
        if let Some(reason) = xml::name_problem(volume) {
            return Err(self.volume_error("create", volume, format!("the name is refused: {reason}")));
        }
        let local = |source_error: std::io::Error| HypervisorError::LocalFile {
            at: StorageRef::volume(self.uri, self.pool, volume),
            path: source.to_path_buf(),
            source: source_error,
        };
        let file = File::open(source).map_err(local)?;
        let length = file.metadata().map_err(local)?.len();
        let mut head = vec![0u8; length.min(HEADER) as usize];
        file.read_exact_at(&mut head, 0).map_err(local)?;
        let body = sparse::extents(&file, head.len() as u64, length).map_err(local)?;

        let pool = self.lookup_pool(conn)?;
        if pool.lookup_storage_vol_by_name(volume).is_ok() {
            return Err(self.exists(volume));
        }
        let vol = StorageVol::create_xml(&pool, &volume_xml(volume, length, mode), 0).map_err(|e| {
            if e.code().to_raw() == sys::VIR_ERR_STORAGE_VOL_EXIST {
                self.exists(volume)
            } else {
                self.volume_error("create", volume, e.message().into())
            }
        })?;
        let mut sent = 0u64;
        let result = (|| -> Result<(), Fail> {
            if length > head.len() as u64 {
                let body_len = length - head.len() as u64;
                stream_to(conn, &vol, head.len() as u64, body_len, true, |st| {
                    send_extents(st, &file, &body, &mut sent, progress)
                })?;
            }
            if !head.is_empty() {
                stream_to(conn, &vol, 0, head.len() as u64, false, |st| send_all(st, &head).map_err(Fail::from))?;
                sent += head.len() as u64;
                progress(sent);
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(Upload { bytes_sent: sent, length }),
            Err(fail) => {
                // A volume no upload finished is never left behind by a failure vdim sees.
                if let Err(e) = vol.delete(0) {
                    tracing::warn!(uri = %self.uri, pool = %self.pool, %volume, error = %e.message(),
                        "could not delete the volume of a failed upload");
                }
                Err(match fail {
                    Fail::Local(e) => local(e),
                    Fail::Libvirt(e) => self.volume_error("upload", volume, e.message().into()),
                })
            }
        }
    }

    pub(super) fn sha256(
        &self,
        conn: &Connect,
        volume: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeDigest, HypervisorError> {
        let pool = self.lookup_pool(conn)?;
        let vol = self.lookup_volume(&pool, volume, "find")?;
        let fail = |e: virt::error::Error| self.volume_error("read back", volume, e.message().into());
        let st = Stream::new(conn, 0).map_err(fail)?;
        vol.download(&st, 0, 0, sys::VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM).map_err(fail)?;
        let hash = Background::start();
        let (mut length, mut received) = (0u64, 0u64);
        loop {
            let mut buf = vec![0u8; CHUNK];
            match recv(&st, &mut buf) {
                Ok(Received::End) => break,
                Ok(Received::Data(n)) => {
                    buf.truncate(n);
                    hash.data(buf);
                    (length, received) = (length + n as u64, received + n as u64);
                }
                Ok(Received::Hole(len)) => {
                    hash.zeros(len);
                    length += len;
                }
                Err(e) => {
                    let _ = st.abort();
                    return Err(fail(e));
                }
            }
            progress(length);
        }
        st.finish().map_err(fail)?;
        Ok(VolumeDigest { length, sha256: hash.finish(), bytes_received: received })
    }

    pub(super) fn delete(&self, conn: &Connect, volume: &str) -> Result<(), HypervisorError> {
        let pool = self.lookup_pool(conn)?;
        let vol = match pool.lookup_storage_vol_by_name(volume) {
            Ok(v) => v,
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_STORAGE_VOL => return Ok(()),
            Err(e) => return Err(self.volume_error("look up", volume, e.message().into())),
        };
        vol.delete(0).map_err(|e| self.volume_error("delete", volume, e.message().into()))?;
        tracing::info!(uri = %self.uri, pool = %self.pool, %volume, "volume deleted");
        Ok(())
    }
}

/// A raw volume of the file's length: libvirt makes an empty sparse file of it without
/// running qemu-img (a qcow2 volume would be formatted, then overwritten). The directory
/// pool reads the format from the file itself afterwards.
fn volume_xml(name: &str, length: u64, mode: &str) -> String {
    let mut w = Writer::default();
    w.open("volume", &[]);
    w.leaf("name", &[], name);
    w.leaf("capacity", &[("unit", "bytes")], &length.to_string());
    w.leaf("allocation", &[("unit", "bytes")], "0");
    w.open("target", &[]);
    w.empty("format", &[("type", "raw")]);
    w.open("permissions", &[]);
    w.leaf("mode", &[], mode);
    w.close("permissions");
    w.close("target");
    w.close("volume");
    w.out
}

/// One upload stream onto `vol` at `offset` for `length` bytes: finished when `send`
/// succeeds, aborted when it fails.
fn stream_to(
    conn: &Connect,
    vol: &StorageVol,
    offset: u64,
    length: u64,
    sparse: bool,
    send: impl FnOnce(&Stream) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let st = Stream::new(conn, 0)?;
    let flags = if sparse { sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM } else { 0 };
    vol.upload(&st, offset, length, flags)?;
    match send(&st) {
        Ok(()) => Ok(st.finish()?),
        Err(e) => {
            let _ = st.abort();
            Err(e)
        }
    }
}

fn send_extents(
    st: &Stream,
    file: &File,
    extents: &[Extent],
    sent: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), Fail> {
    let mut buf = vec![0u8; CHUNK];
    for extent in extents {
        match *extent {
            Extent::Hole { len } => send_hole(st, len)?,
            Extent::Data { offset, len } => {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    file.read_exact_at(&mut buf[..n], offset + done).map_err(Fail::Local)?;
                    send_all(st, &buf[..n])?;
                    done += n as u64;
                    *sent += n as u64;
                    progress(*sent);
                }
            }
        }
    }
    Ok(())
}

fn send_all(st: &Stream, mut data: &[u8]) -> Result<(), virt::error::Error> {
    while !data.is_empty() {
        // A blocking stream takes at least one byte or fails.
        let n = st.send(data)?;
        data = &data[(n as usize).min(data.len())..];
    }
    Ok(())
}

fn send_hole(st: &Stream, len: u64) -> Result<(), virt::error::Error> {
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    // SAFETY: `st` holds its stream pointer for the duration of the call; libvirt copies
    // nothing from us but the length.
    let r = unsafe { sys::virStreamSendHole(st.as_ptr(), len, 0) };
    if r < 0 {
        Err(virt::error::Error::last_error())
    } else {
        Ok(())
    }
}

enum Received {
    End,
    Data(usize),
    Hole(u64),
}

fn recv(st: &Stream, buf: &mut [u8]) -> Result<Received, virt::error::Error> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `st` holds its pointer.
    let n = unsafe {
        sys::virStreamRecvFlags(
            st.as_ptr(),
            buf.as_mut_ptr() as *mut c_char,
            buf.len(),
            sys::VIR_STREAM_RECV_STOP_AT_HOLE,
        )
    };
    match n {
        0 => Ok(Received::End),
        n if n > 0 => Ok(Received::Data(n as usize)),
        // At a hole: its length comes next.
        -3 => {
            let mut len: i64 = 0;
            // SAFETY: `len` is a valid out-pointer and `st` holds its pointer.
            let r = unsafe { sys::virStreamRecvHole(st.as_ptr(), &mut len, 0) };
            if r < 0 {
                Err(virt::error::Error::last_error())
            } else {
                Ok(Received::Hole(len.max(0) as u64))
            }
        }
        _ => Err(virt::error::Error::last_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_is_raw_of_the_file_length_and_read_only() {
        let x = volume_xml("ab12.qcow2", 1_074_135_040, LAYER_MODE);
        assert!(x.contains("<name>ab12.qcow2</name>"), "{x}");
        assert!(x.contains("<capacity unit='bytes'>1074135040</capacity>"), "{x}");
        assert!(x.contains("<allocation unit='bytes'>0</allocation>"), "{x}");
        assert!(x.contains("<format type='raw'/>") && x.contains("<mode>0440</mode>"), "{x}");
    }
}
