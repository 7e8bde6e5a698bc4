//! Cache maintenance: statistics, garbage collection to a size budget, cleaning.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::build::Cache;
use crate::error::{Error, Result};

/// What the cache holds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Cache directory.
    pub path: PathBuf,
    /// Stored node results.
    pub objects: usize,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// One stored object with its size and last use.
struct Entry {
    key: String,
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

impl Cache {
    fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(self.root.join("objects")) else {
            return out;
        };
        for shard in shards.flatten() {
            let Ok(files) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let (Some(key), Ok(md)) = (
                    path.file_stem().and_then(|s| s.to_str()).map(String::from),
                    f.metadata(),
                ) else {
                    continue;
                };
                if path.extension().is_some_and(|e| e == "safetensors") {
                    let used = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push(Entry {
                        key,
                        path,
                        bytes: md.len(),
                        used,
                    });
                }
            }
        }
        out
    }

    /// Object count and size.
    pub fn stats(&self) -> Stats {
        let e = self.entries();
        Stats {
            path: self.root.clone(),
            objects: e.len(),
            bytes: e.iter().map(|e| e.bytes).sum(),
        }
    }

    /// Marks an object as just used (its modification time orders garbage collection).
    pub fn touch(&self, key: &str) {
        if let Ok(f) = std::fs::File::options().append(true).open(self.object(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Deletes least recently used objects (with their tensor keys and preimages) until the
    /// cache holds at most `max_bytes`. Returns (objects removed, bytes freed).
    pub fn gc(&self, max_bytes: u64) -> Result<(usize, u64)> {
        self.remove_stale_partials();
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by_key(|e| e.used);
        let (mut removed, mut freed) = (0, 0);
        for e in entries {
            if total <= max_bytes {
                break;
            }
            std::fs::remove_file(&e.path).map_err(|err| Error::io(&e.path, err))?;
            for side in [
                self.root
                    .join("tensor-keys")
                    .join(format!("{}.json", e.key)),
                self.root.join("nodes").join(format!("{}.json", e.key)),
            ] {
                let _ = std::fs::remove_file(side);
            }
            total -= e.bytes;
            freed += e.bytes;
            removed += 1;
        }
        Ok((removed, freed))
    }

    /// Deletes temporary files left by builds killed mid-write more than an hour ago.
    fn remove_stale_partials(&self) {
        let Ok(shards) = std::fs::read_dir(self.root.join("objects")) else {
            return;
        };
        for f in shards
            .flatten()
            .filter_map(|s| std::fs::read_dir(s.path()).ok())
            .flatten()
            .flatten()
        {
            let path = f.path();
            let old = f
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old && path.extension().is_some_and(|e| e == "partial") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Removes everything this cache version stores (the hash memo is kept).
    pub fn clean(&self) -> Result<Stats> {
        let before = self.stats();
        for sub in ["objects", "tensor-keys", "nodes", "state"] {
            let p = self.root.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(before)
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

/// A cache directory given on the command line, else `$MERGESMITH_CACHE`, else `./cache`.
pub fn cache_dir(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or_else(crate::hashing::env_cache_dir)
        .unwrap_or_else(|| PathBuf::from("cache"))
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
