//! File hashes in the conventions users already know, memoized so big files are read once.
//!
//! - blake3 of the whole file (mergesmith's content key);
//! - SHA-256 of the whole file (civitai, AUTOMATIC1111 "sha256");
//! - AUTOMATIC1111 short hash "AutoV2": the first 10 hex digits of the SHA-256;
//! - AUTOMATIC1111 legacy hash "AutoV1": SHA-256 of the 0x10000 bytes at offset 0x100000,
//!   first 8 hex digits.
//!
//! The memo is keyed by (canonical path, size, mtime, inode, device): an unchanged file is
//! never re-read; any change to those recomputes.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::io::Read;

use sha2::{Digest, Sha256};

use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};

/// The hashes of one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileHashes {
    /// blake3 of the whole file, hex.
    pub blake3: String,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// AUTOMATIC1111 short hash (AutoV2): first 10 hex digits of `sha256`.
    pub autov2: String,
    /// AUTOMATIC1111 legacy hash (AutoV1).
    pub legacy: String,
}

/// Bytes read per step when hashing a file.
const HASH_CHUNK: usize = 8 << 20;

/// The A1111 legacy-hash window: 0x10000 bytes at offset 0x100000.
const LEGACY_WINDOW: std::ops::Range<u64> = 0x100000..0x110000;

/// Incremental state of all hashes, fed a file's bytes in order.
pub struct Hashers {
    blake3: blake3::Hasher,
    sha256: Sha256,
    legacy: Sha256,
    pos: u64,
}

impl Default for Hashers {
    fn default() -> Self {
        Self::new()
    }
}

impl Hashers {
    /// Hashers at the start of a file.
    pub fn new() -> Self {
        Hashers {
            blake3: blake3::Hasher::new(),
            sha256: Sha256::new(),
            legacy: Sha256::new(),
            pos: 0,
        }
    }

    /// Feeds the next bytes of the file; SHA-256 and blake3 run in parallel.
    pub fn update(&mut self, chunk: &[u8]) {
        let (b3, sha) = (&mut self.blake3, &mut self.sha256);
        rayon::join(|| b3.update(chunk), || sha.update(chunk));
        let end = self.pos + chunk.len() as u64;
        let (lo, hi) = (
            self.pos.max(LEGACY_WINDOW.start),
            end.min(LEGACY_WINDOW.end),
        );
        if lo < hi {
            self.legacy
                .update(&chunk[(lo - self.pos) as usize..(hi - self.pos) as usize]);
        }
        self.pos = end;
    }

    /// The hashes of everything fed so far.
    pub fn finish(self) -> FileHashes {
        let sha = hex(&self.sha256.finalize());
        FileHashes {
            blake3: self.blake3.finalize().to_hex().to_string(),
            autov2: sha[..10].to_string(),
            sha256: sha,
            legacy: hex(&self.legacy.finalize())[..8].to_string(),
        }
    }
}

/// Hashes an in-memory file image.
pub fn hash_bytes(bytes: &[u8]) -> FileHashes {
    let mut h = Hashers::new();
    for chunk in bytes.chunks(HASH_CHUNK) {
        h.update(chunk);
    }
    h.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The blake3 (hex) and length of a file, hashed from a memory map on every thread.
pub fn blake3_file(path: &Path) -> Result<(String, u64)> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).map_err(|e| Error::io(path, e))?;
    Ok((h.finalize().to_hex().to_string(), h.count()))
}

/// Hashes a file in one streaming pass: a reader thread fills buffers while the hashes
/// consume the previous one, so memory stays at a few buffers whatever the file size.
pub fn hash_file(path: &Path) -> Result<FileHashes> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    crate::checkpoint::counters::FILES_HASHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(2);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut h = Hashers::new();
    std::thread::scope(|s| {
        s.spawn(move || loop {
            let mut buf = empty_rx
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; HASH_CHUNK]);
            buf.resize(HASH_CHUNK, 0);
            let mut n = 0;
            let res = loop {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break Ok(()),
                    Ok(k) => {
                        n += k;
                        if n == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(n);
            let done = n == 0 || res.is_err();
            if full_tx.send(res.map(|_| buf)).is_err() || done {
                return;
            }
        });
        for msg in full_rx {
            let buf = msg.map_err(|e| Error::io(path, e))?;
            if buf.is_empty() {
                break;
            }
            h.update(&buf);
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })?;
    Ok(h.finish())
}

/// What identifies a file version without reading it: canonical path, size, mtime, inode,
/// device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
    inode: u64,
    device: u64,
}

impl Stamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> Result<Stamp> {
        let path = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let md = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        let mtime_ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        #[cfg(unix)]
        let (inode, device) = {
            use std::os::unix::fs::MetadataExt;
            (md.ino(), md.dev())
        };
        #[cfg(not(unix))]
        let (inode, device) = (0, 0);
        Ok(Stamp {
            path,
            size: md.len(),
            mtime_ns,
            inode,
            device,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MemoEntry {
    stamp: Stamp,
    hashes: FileHashes,
}

/// A memo of file hashes, one small JSON file per file stamp in a directory (the cache's:
/// [`crate::store::memo`]).
#[derive(Debug, Clone)]
pub struct HashMemo {
    dir: PathBuf,
}

/// Whether a hash came from the memo or was computed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashSource {
    /// Read from the memo; the file was not read.
    Memo,
    /// Computed by reading the file.
    Computed,
}

impl HashMemo {
    /// A memo kept in the directory `dir`.
    pub fn at(dir: &Path) -> Self {
        HashMemo {
            dir: dir.to_path_buf(),
        }
    }

    /// Records hashes computed while writing `path` (so it is never read just to hash it).
    pub fn record(&self, path: &Path, hashes: &FileHashes) -> Result<()> {
        let stamp = Stamp::of(path)?;
        let entry_path = self.entry_path(&stamp);
        let entry = MemoEntry {
            stamp,
            hashes: hashes.clone(),
        };
        let json = serde_json::to_vec_pretty(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        write_file_atomic(&entry_path, &json, true)
    }

    fn entry_path(&self, stamp: &Stamp) -> PathBuf {
        self.dir.join(format!(
            "{}.json",
            blake3::hash(stamp.path.to_string_lossy().as_bytes()).to_hex()
        ))
    }

    /// Every file the memo knows, by blake3 (to name a recorded content hash by its
    /// AutoV2 / SHA-256).
    pub fn by_blake3(&self) -> std::collections::BTreeMap<String, FileHashes> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Default::default();
        };
        dir.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<MemoEntry>(&t).ok())
            .map(|e| (e.hashes.blake3.clone(), e.hashes))
            .collect()
    }

    /// Returns the file's hashes, reading the file only if the memo has no entry for
    /// its current (path, size, mtime, inode, device).
    pub fn hashes(&self, path: &Path) -> Result<(FileHashes, HashSource)> {
        let stamp = Stamp::of(path)?;
        let entry_path = self.entry_path(&stamp);
        if let Ok(text) = std::fs::read_to_string(&entry_path) {
            if let Ok(entry) = serde_json::from_str::<MemoEntry>(&text) {
                if entry.stamp == stamp {
                    return Ok((entry.hashes, HashSource::Memo));
                }
            }
        }
        let hashes = hash_file(&stamp.path)?;
        // The file may have changed while it was read: only memoize a stable stamp.
        if Stamp::of(path)? == stamp {
            let entry = MemoEntry {
                stamp,
                hashes: hashes.clone(),
            };
            let json =
                serde_json::to_vec_pretty(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
            write_file_atomic(&entry_path, &json, true)?;
        }
        Ok((hashes, HashSource::Computed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        let h = hash_bytes(b"abc");
        assert_eq!(
            h.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(h.autov2, "ba7816bf8f");
        assert_eq!(
            h.blake3,
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        // Shorter than 1 MiB: the legacy window is empty, SHA-256 of nothing.
        assert_eq!(h.legacy, "e3b0c442");
    }

    #[test]
    fn legacy_window() {
        let mut bytes = vec![0u8; 0x100000];
        bytes.extend(std::iter::repeat_n(7u8, 0x10000));
        bytes.extend(std::iter::repeat_n(9u8, 100)); // outside the window
        let expect = hex(&Sha256::digest(vec![7u8; 0x10000]))[..8].to_string();
        assert_eq!(hash_bytes(&bytes).legacy, expect);
    }
}
