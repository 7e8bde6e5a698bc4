//! Cache maintenance: statistics, garbage collection to a size budget, cleaning.
//!
//! Space is held by packs; a pack's last use is the latest modification time of the pack and
//! of every manifest that reads from it (builds touch the manifests they hit). `gc` removes
//! least recently used packs until the budget holds, then the manifests left incomplete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{Area, Cache};
use crate::error::{Error, Result};

/// What the cache holds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Cache directory.
    pub path: PathBuf,
    /// Stored node results (manifests).
    pub results: usize,
    /// Tensor packs.
    pub packs: usize,
    /// Total size of the packs in bytes.
    pub bytes: u64,
}

/// One stored pack with its size and last use.
struct PackEntry {
    name: String,
    bytes: u64,
    used: SystemTime,
}

fn files_in(dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flatten()
        .flatten()
        .collect()
}

fn modified(f: &std::fs::DirEntry) -> SystemTime {
    f.metadata()
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Cache {
    /// Manifests: (node key, last use, packs read).
    fn results(&self) -> Vec<(String, SystemTime, Vec<String>)> {
        files_in(&self.area(Area::Results))
            .into_iter()
            .filter_map(|f| {
                let path = f.path();
                let key = path.file_stem()?.to_str()?.to_string();
                let m = self.local_manifest(&key)?;
                let packs = m
                    .packs()
                    .into_iter()
                    .chain(m.file.as_deref())
                    .map(String::from)
                    .collect();
                Some((key, modified(&f), packs))
            })
            .collect()
    }

    fn packs(&self) -> Vec<PackEntry> {
        let mut used: HashMap<String, SystemTime> = HashMap::new();
        for (_, t, packs) in self.results() {
            for p in packs {
                let e = used.entry(p).or_insert(t);
                *e = (*e).max(t);
            }
        }
        files_in(&self.area(Area::Packs))
            .into_iter()
            .filter_map(|f| {
                let path = f.path();
                let name = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".safetensors")?
                    .to_string();
                let own = modified(&f);
                Some(PackEntry {
                    used: used.get(&name).map_or(own, |t| (*t).max(own)),
                    bytes: f.metadata().map(|m| m.len()).unwrap_or(0),
                    name,
                })
            })
            .collect()
    }

    /// Result, pack and byte counts.
    pub fn stats(&self) -> Stats {
        let packs = self.packs();
        Stats {
            path: self.root().to_path_buf(),
            results: self.results().len(),
            packs: packs.len(),
            bytes: packs.iter().map(|e| e.bytes).sum(),
        }
    }

    /// Deletes least recently used packs until the cache holds at most `max_bytes`, then
    /// the results that read from a deleted pack. Returns (packs removed, bytes freed).
    pub fn gc(&self, max_bytes: u64) -> Result<(usize, u64)> {
        self.remove_stale_partials();
        let mut packs = self.packs();
        let mut total: u64 = packs.iter().map(|e| e.bytes).sum();
        packs.sort_by_key(|e| e.used);
        let (mut removed, mut freed) = (0, 0);
        for e in packs {
            if total <= max_bytes {
                break;
            }
            let path = self.pack_path(&e.name);
            std::fs::remove_file(&path).map_err(|err| Error::io(&path, err))?;
            let _ = std::fs::remove_file(path.with_extension("keys.json"));
            total -= e.bytes;
            freed += e.bytes;
            removed += 1;
        }
        for (key, _, packs) in self.results() {
            if packs.iter().any(|p| !self.pack_path(p).exists()) {
                let _ = std::fs::remove_file(self.manifest_path(&key));
            }
        }
        Ok((removed, freed))
    }

    /// Deletes temporary files left by builds killed mid-write more than an hour ago.
    fn remove_stale_partials(&self) {
        for area in [Area::Packs, Area::Results] {
            for f in files_in(&self.area(area)) {
                let path = f.path();
                let old = modified(&f).elapsed().is_ok_and(|age| age.as_secs() > 3600);
                if old && path.extension().is_some_and(|e| e == "partial") {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Removes everything this cache version stores (the hash memo is kept).
    pub fn clean(&self) -> Result<Stats> {
        let before = self.stats();
        for area in Area::CLEANED {
            let p = self.area(area);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(before)
    }
}

/// What `cache verify` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verified {
    /// Files checked: packs against the blake3 recorded when they were written, images
    /// by decoding them (PNG checksums), manifests by parsing them.
    pub checked: usize,
    /// Bytes read to check them.
    pub bytes: u64,
    /// Packs written before digests were recorded (their headers were checked only).
    pub unrecorded: usize,
    /// Files that failed, removed (their results are rebuilt, or fetched again, when needed).
    pub removed: Vec<PathBuf>,
}

impl Cache {
    /// Checks every pack, image and manifest of the cache; removes the ones that fail.
    pub fn verify(&self) -> Result<Verified> {
        use rayon::prelude::*;
        let mut files: Vec<PathBuf> = [Area::Packs, Area::Images, Area::Results]
            .iter()
            .flat_map(|a| files_in(&self.area(*a)))
            .map(|f| f.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                !name.starts_with('.') && !name.ends_with(".keys.json")
            })
            .collect();
        files.sort();
        // (path, bytes read, whether its digest was recorded, fault)
        let checked: Vec<(PathBuf, u64, bool, Option<String>)> = files
            .into_par_iter()
            .map(|path| {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or_default();
                let (recorded, fault) = match ext {
                    "safetensors" => check_pack(&path),
                    "png" => (
                        true,
                        crate::gen::grid::read_png(&path)
                            .err()
                            .map(|e| e.to_string()),
                    ),
                    _ => (
                        true,
                        std::fs::read(&path)
                            .ok()
                            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                            .is_none()
                            .then(|| "not valid JSON".to_string()),
                    ),
                };
                (path, len, recorded, fault)
            })
            .collect();
        let mut out = Verified::default();
        for (path, len, recorded, fault) in checked {
            out.checked += 1;
            out.bytes += len;
            out.unrecorded += usize::from(!recorded);
            if let Some(why) = fault {
                eprintln!("corrupt: {} ({why}); removed", path.display());
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                if path.extension().is_some_and(|e| e == "safetensors") {
                    let _ = std::fs::remove_file(path.with_extension("keys.json"));
                }
                out.removed.push(path);
            }
        }
        Ok(out)
    }
}

/// Checks a pack against the digest in its key list: (whether one was recorded, fault).
fn check_pack(path: &Path) -> (bool, Option<String>) {
    let record = super::packs::read_pack_keys(&path.with_extension("keys.json"));
    match record.and_then(|r| Some((r.blake3?, r.size?))) {
        Some((digest, size)) => match crate::hashing::blake3_file(path) {
            Ok((d, n)) if d == digest && n == size => (true, None),
            Ok((d, n)) => (
                true,
                Some(format!(
                    "blake3 {d} ({n} bytes) where {digest} ({size} bytes) was recorded"
                )),
            ),
            Err(e) => (true, Some(e.to_string())),
        },
        None => (
            false,
            crate::checkpoint::Checkpoint::open(path)
                .err()
                .map(|e| e.to_string()),
        ),
    }
}

/// Parses sizes like `50G`, `512M`, `1.5T`, `1000` (bytes; binary units).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let mult: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(Error::Invalid(format!(
                "size `{text}`: unknown unit `{unit}` (use K, M, G or T)"
            )))
        }
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::Invalid(format!("size `{text}` is not a number with a unit")))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(Error::Invalid(format!("size `{text}` must be positive")));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50G").unwrap(), 50 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("G").is_err());
    }
}
