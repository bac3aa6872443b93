//! Advisory locks so two admin commands never interleave on one image or pool.
//!
//! Each image and pool has a lock file; a command that changes it holds an exclusive `flock`.
//! Commands also hold the store lock shared, and `gc` holds it exclusive, so gc never sees
//! half-finished work. The kernel drops a flock when its process dies, so a killed vdim
//! never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("{what} is busy: another vdim command (pid {holder}) is changing it; try again when it has finished")]
    Busy { what: String, holder: String },
    #[error("cannot open lock file {path}")]
    Open { path: String, source: std::io::Error },
}

impl crate::error::Kind for LockError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            LockError::Busy { .. } => K::Busy,
            LockError::Open { .. } => K::Internal,
        }
    }
}

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Take the lock `locks/<key>.lock`, waiting at most `wait` for another holder to finish.
pub fn acquire(locks_dir: &Path, key: &str, what: &str, mode: Mode, wait: Duration) -> Result<Lock, LockError> {
    let path = locks_dir.join(format!("{key}.lock"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| LockError::Open { path: path.display().to_string(), source })?;
    let op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    let deadline = Instant::now() + wait;
    loop {
        // SAFETY: the fd is valid for the lifetime of `file`.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Busy {
                what: what.to_string(),
                holder: if holder.is_empty() { "unknown".into() } else { holder.to_string() },
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if mode == Mode::Exclusive {
        // Best effort: tells a waiting command who holds the lock.
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id()));
    }
    Ok(Lock { _file: file })
}

/// What every command that changes one object (image, pool) holds: the store lock shared,
/// so gc waits for it, and the object's own lock exclusive, so no other command interleaves.
pub fn for_change(locks_dir: &Path, key: &str, what: &str, wait: Duration) -> Result<(Lock, Lock), LockError> {
    let store = acquire(
        locks_dir,
        crate::names::STORE_LOCK,
        "the image store (gc is running)",
        Mode::Shared,
        Duration::from_secs(2),
    )?;
    let object = acquire(locks_dir, key, what, Mode::Exclusive, wait)?;
    Ok((store, object))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_exclusive_holder_is_told_busy_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path(), "image-a", "image 'a'", Mode::Exclusive, Duration::ZERO).unwrap();
        // flock locks belong to the open file description, so a second open conflicts even in-process.
        let err = acquire(dir.path(), "image-a", "image 'a'", Mode::Exclusive, Duration::from_millis(100)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("image 'a' is busy"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(held);
        // Not zero: a process another test thread forks holds a copy of every descriptor (the
        // lock's too) from fork until its exec closes them (O_CLOEXEC), so the lock may outlive
        // the drop by that moment.
        acquire(dir.path(), "image-a", "image 'a'", Mode::Exclusive, Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn shared_holders_coexist_and_block_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let a = acquire(dir.path(), "store", "the store", Mode::Shared, Duration::ZERO).unwrap();
        let _b = acquire(dir.path(), "store", "the store", Mode::Shared, Duration::ZERO).unwrap();
        assert!(acquire(dir.path(), "store", "the store", Mode::Exclusive, Duration::ZERO).is_err());
        drop(a);
    }
}
