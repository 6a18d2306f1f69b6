//! What identifies the bytes of an adapter file, for the programs that keep adapters loaded and
//! must notice when a file changes (`iapt serve --adapter-dir`, libiapt's registry, the
//! converter's provenance key): a cheap [`FileStamp`] (device, inode, size, modification time),
//! which changes when a file is replaced or rewritten, and the SHA-256 of the content
//! ([`sha256_file`]), which says whether the bytes really changed (a `touch` changes the stamp,
//! not the hash). Keeping both, a loader re-reads a file only when its stamp moved and reloads it
//! only when its hash did, so an adapter in memory is always one version of the file, never a mix.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};

use sha2::{Digest, Sha256};

/// The stamp of a file: equal stamps mean the same file not rewritten since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `meta` describes.
    pub fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// SHA-256 of a file's bytes, read in 1 MiB blocks from its start (no copy of the file is held).
pub fn sha256_file(file: &File) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
}

/// Lowercase hexadecimal of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_and_stamp_follows_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let f = File::open(&p).unwrap();
        // FIPS 180-2's test vector for "abc".
        assert_eq!(hex(&sha256_file(&f).unwrap()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let s0 = FileStamp::of(&f.metadata().unwrap());
        assert_eq!(s0, FileStamp::of(&std::fs::metadata(&p).unwrap()));
        std::fs::write(dir.path().join("g"), b"abcd").unwrap();
        std::fs::rename(dir.path().join("g"), &p).unwrap();
        assert_ne!(s0, FileStamp::of(&std::fs::metadata(&p).unwrap()), "a replaced file has another stamp");
    }
}
