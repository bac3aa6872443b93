//! Where a local file holds data and where it has holes (`SEEK_DATA` / `SEEK_HOLE`): a
//! sparse upload sends the data and only the length of each hole, so a 1 GiB layer holding
//! a few MiB costs a few MiB on the wire. A filesystem that cannot tell reports one data extent.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// One run of a file, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    Data { offset: u64, len: u64 },
    Hole { len: u64 },
}

/// The runs of `file` from `start` to `end`, covering that range exactly.
pub(crate) fn extents(file: &File, start: u64, end: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.min(end),
            // No data after `pos`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                out.push(Extent::Data { offset: pos, len: end - pos });
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push(Extent::Hole { len: data - pos });
            pos = data;
        }
        if pos >= end {
            break;
        }
        let hole = seek(file, pos, libc::SEEK_HOLE)?.min(end);
        out.push(Extent::Data { offset: pos, len: hole - pos });
        pos = hole;
    }
    Ok(out)
}

/// The bytes a sparse upload of the whole file sends.
pub(crate) fn data_bytes(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    Ok(extents(&file, 0, len)?
        .iter()
        .map(|e| match e {
            Extent::Data { len, .. } => *len,
            Extent::Hole { .. } => 0,
        })
        .sum())
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a file descriptor `file` keeps open; reads use pread, so moving the
    // descriptor's position disturbs nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_and_data_cover_the_range_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 6 << 20).unwrap();
        let f = File::open(&p).unwrap();
        let runs = extents(&f, 0, 8 << 20).unwrap();
        let covered: u64 = runs
            .iter()
            .map(|e| match e {
                Extent::Data { len, .. } | Extent::Hole { len } => *len,
            })
            .sum();
        assert_eq!(covered, 8 << 20, "{runs:?}");
        // tmpfs and ext4 both see the two blocks; a filesystem without SEEK_DATA sees one extent.
        let data = data_bytes(&p).unwrap();
        assert!(data == 8192 || data == 8 << 20, "{runs:?}");
        if data == 8192 {
            assert_eq!(runs[0], Extent::Hole { len: 1 << 20 });
            assert_eq!(runs[1], Extent::Data { offset: 1 << 20, len: 4096 });
            assert_eq!(runs.last(), Some(&Extent::Hole { len: (2 << 20) - 4096 }));
        }
        assert_eq!(extents(&f, 8 << 20, 8 << 20).unwrap(), vec![]);
        assert_eq!(extents(&f, (1 << 20) + 100, (1 << 20) + 200).unwrap().len(), 1);
    }
}
