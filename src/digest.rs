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
}
