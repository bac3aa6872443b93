//! SHA-256 of layer files: the only integrity check a qcow2 layer has (qcow2 keeps no data
//! checksums). `sha2` picks the CPU's SHA instructions at run time where they exist.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

const BUF: usize = 1 << 20;

/// Hex SHA-256 of the whole file; `on_progress` gets the bytes hashed so far.
pub fn sha256_file(path: &Path, mut on_progress: impl FnMut(u64)) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut done = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        on_progress(done);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A SHA-256 over a file's bytes in order, fed as they stream by: data as read, a sparse
/// file's holes as the zeros they read as. A layer read back from a host is hashed this way
/// as it arrives, never stored.
#[derive(Default)]
pub struct Running {
    hasher: Sha256,
    bytes: u64,
}

impl Running {
    pub fn new() -> Running {
        Running::default()
    }

    pub fn data(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    /// `n` zero bytes: a hole.
    pub fn zeros(&mut self, mut n: u64) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        while n > 0 {
            let take = n.min(ZEROS.len() as u64) as usize;
            self.data(&ZEROS[..take]);
            n -= take as u64;
        }
    }

    /// Bytes hashed so far, holes included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

/// A [`Running`] hash on a thread of its own, fed through a bounded queue, so the caller's
/// I/O (a stream's send or receive) and the hashing overlap: on these machines hashing a 1 GiB
/// sparse layer's holes costs as long as sending its data.
pub struct Background {
    tx: Option<SyncSender<Piece>>,
    hasher: Option<JoinHandle<String>>,
}

enum Piece {
    Data(Vec<u8>),
    Zeros(u64),
}

/// Pieces queued at most: 64 stream chunks, about 16 MiB.
const QUEUED: usize = 64;

impl Background {
    pub fn start() -> Background {
        let (tx, rx) = sync_channel::<Piece>(QUEUED);
        let hasher = std::thread::Builder::new()
            .name("vdim-sha256".into())
            .spawn(move || {
                let mut r = Running::new();
                for piece in rx {
                    match piece {
                        Piece::Data(d) => r.data(&d),
                        Piece::Zeros(n) => r.zeros(n),
                    }
                }
                r.finish()
            })
            .expect("the OS starts a thread");
        Background { tx: Some(tx), hasher: Some(hasher) }
    }

    fn send(&self, piece: Piece) {
        // The hasher only ends when the queue closes, so it is there to receive.
        let _ = self.tx.as_ref().map(|tx| tx.send(piece));
    }

    pub fn data(&self, bytes: Vec<u8>) {
        self.send(Piece::Data(bytes));
    }

    pub fn zeros(&self, n: u64) {
        self.send(Piece::Zeros(n));
    }

    /// The hex digest of everything fed, once the hasher has caught up.
    pub fn finish(mut self) -> String {
        self.tx.take();
        self.hasher.take().map(|h| h.join().expect("the hasher does not panic")).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Abandoned (an I/O error): close the queue; the thread ends on its own.
        self.tx.take();
    }
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_known_vector_and_sees_one_flipped_bit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let d = sha256_file(&p, |_| {}).unwrap();
        assert_eq!(d, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(is_digest(&d));
        std::fs::write(&p, b"abb").unwrap();
        assert_ne!(sha256_file(&p, |_| {}).unwrap(), d);
    }

    #[test]
    fn a_running_hash_with_holes_as_zeros_equals_the_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut bytes = vec![0u8; 200_000];
        bytes[..3].copy_from_slice(b"abc");
        bytes[199_999] = 7;
        std::fs::write(&p, &bytes).unwrap();
        let mut r = Running::new();
        r.data(b"abc");
        r.zeros(199_996);
        r.data(&[7]);
        assert_eq!(r.bytes(), 200_000);
        assert_eq!(r.finish(), sha256_file(&p, |_| {}).unwrap());
        let b = Background::start();
        b.data(b"abc".to_vec());
        b.zeros(199_996);
        b.data(vec![7]);
        assert_eq!(b.finish(), sha256_file(&p, |_| {}).unwrap());
    }
}
