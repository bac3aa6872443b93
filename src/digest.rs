//! SHA-256 of layer files: the only integrity check a qcow2 layer has (qcow2 keeps no data
//! checksums). `sha2` picks the CPU's SHA instructions at run time where they exist.

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::Path;

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
/// file's holes as the zeros they read as. What a layer's upload sends and its read-back
/// receives are hashed this way, so neither reads the file twice.
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
    }
}
