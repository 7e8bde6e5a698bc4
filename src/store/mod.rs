//! The content-addressed store: where every cache path is decided, and what lives there.
//!
//! This module is the one owner of the cache's location and layout: the default cache
//! directory ([`locate`]), the layout version ([`LAYOUT`]), the areas under it ([`Area`]) and
//! every file path in them (methods of [`Cache`]). Layout (version 2), under the cache
//! directory:
//!
//! ```text
//! v2/packs/ab/<pack>.safetensors + <pack>.keys.json   tensor packs and their key lists
//! v2/results/ab/<key>.json                          result manifests
//! v2/images/ab/<key>.png                            generated images and grids
//! v2/nodes/<key>.json                               key preimages (for `plan`'s reasons)
//! v2/state/<recipe id>.json                         what a recipe's last build produced
//! v2/locks/<key>.lock                               build locks
//! v2/file-hashes/                                   the hash memo
//! v2/log.jsonl                                      the build log
//! ```
//!
//! [`packs`] stores node results as manifests over tensor packs, [`remote`] reads through to
//! and writes back to a remote copy of the same layout, [`maintenance`] gives statistics,
//! garbage collection, cleaning and verification.

pub mod maintenance;
pub mod packs;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};
use crate::hashing::{HashMemo, Stamp};
use remote::{Kind, LocalFile, Remote};

pub use packs::{Entry, Manifest, Place, Store};

/// The cache layout version: the name of the cache's top directory (also under a remote's
/// URL).
pub const LAYOUT: &str = "v2";

/// The environment variable naming the cache directory.
pub const CACHE_ENV: &str = "MERGESMITH_CACHE";

/// The recipe a command reads when it is given none.
pub const DEFAULT_RECIPE: &str = "mergesmith.yaml";

/// The cache directory, by the one rule every command follows: the directory given
/// (`--cache`), else `$MERGESMITH_CACHE`, else `cache/` beside the recipe (`recipe`, or
/// [`DEFAULT_RECIPE`] in the working directory, i.e. `./cache`). Commands that read no recipe
/// (`merge`, `inspect`, `lora`, `gen`) only keep their hash memo in a cache and pass `None`:
/// theirs is the user cache directory (`$XDG_CACHE_HOME/mergesmith`, else
/// `~/.cache/mergesmith`), so the memo serves files anywhere on disk.
pub fn locate(given: Option<&Path>, recipe: Option<&Path>) -> PathBuf {
    if let Some(d) = given {
        return d.to_path_buf();
    }
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match recipe {
        Some(r) => beside(r),
        None => user_cache_dir().unwrap_or_else(|| beside(Path::new(DEFAULT_RECIPE))),
    }
}

/// `cache/` beside a recipe file.
fn beside(recipe: &Path) -> PathBuf {
    match recipe.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("cache"),
        _ => PathBuf::from("cache"),
    }
}

/// `$XDG_CACHE_HOME/mergesmith`, else `~/.cache/mergesmith`.
fn user_cache_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|d| !d.is_empty());
    nonempty("XDG_CACHE_HOME")
        .map(|d| PathBuf::from(d).join("mergesmith"))
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cache").join("mergesmith")))
}

/// The hash memo kept in the cache directory `dir`.
pub fn memo(dir: &Path) -> HashMemo {
    HashMemo::at(&dir.join(LAYOUT).join(Area::FileHashes.dir()))
}

/// The areas of the layout, each a directory under [`LAYOUT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Tensor packs and their key lists (sharded).
    Packs,
    /// Result manifests (sharded).
    Results,
    /// Images and grids (sharded).
    Images,
    /// Key preimages.
    Nodes,
    /// Each recipe's last build.
    State,
    /// Build locks.
    Locks,
    /// The hash memo.
    FileHashes,
}

impl Area {
    /// The directory name.
    pub fn dir(self) -> &'static str {
        match self {
            Area::Packs => "packs",
            Area::Results => "results",
            Area::Images => "images",
            Area::Nodes => "nodes",
            Area::State => "state",
            Area::Locks => "locks",
            Area::FileHashes => "file-hashes",
        }
    }

    /// What `clean` removes: everything but the hash memo.
    pub const CLEANED: [Area; 6] = [
        Area::Packs,
        Area::Results,
        Area::Images,
        Area::Nodes,
        Area::State,
        Area::Locks,
    ];
}

/// `area/ab/name.ext`, relative to the layout directory: objects sharded by the first two
/// characters of their name (the same relative paths locally and on a remote).
pub fn relative(area: Area, name: &str, ext: &str) -> String {
    format!("{}/{}/{name}.{ext}", area.dir(), &name[..2.min(name.len())])
}

/// A content-addressed node cache, optionally backed by a remote one.
#[derive(Debug, Clone)]
pub struct Cache {
    /// The layout directory (`<cache>/v2`).
    root: PathBuf,
    remote: Option<Arc<Remote>>,
}

impl Cache {
    /// The cache rooted at `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Cache {
            root: dir.join(LAYOUT),
            remote: None,
        }
    }

    /// The layout directory (`<cache>/v2`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an area.
    pub fn area(&self, area: Area) -> PathBuf {
        self.root.join(area.dir())
    }

    /// `root/area/ab/name.ext` (see [`relative`]).
    fn sharded(&self, area: Area, name: &str, ext: &str) -> PathBuf {
        self.root.join(relative(area, name, ext))
    }

    /// Where a pack's tensors live.
    pub fn pack_path(&self, pack: &str) -> PathBuf {
        self.sharded(Area::Packs, pack, "safetensors")
    }

    /// Where a pack's key list lives.
    pub fn pack_keys_path(&self, pack: &str) -> PathBuf {
        self.sharded(Area::Packs, pack, "keys.json")
    }

    /// Where the manifest of a node key lives.
    pub fn manifest_path(&self, key: &str) -> PathBuf {
        self.sharded(Area::Results, key, "json")
    }

    /// Where the image of a key lives.
    pub fn image_path(&self, key: &str) -> PathBuf {
        self.sharded(Area::Images, key, "png")
    }

    /// Where the preimage of a node key lives.
    fn preimage_path(&self, key: &str) -> PathBuf {
        self.area(Area::Nodes).join(format!("{key}.json"))
    }

    /// Where the state of a recipe's last build lives (named by its canonical path).
    pub fn state_path(&self, recipe: &Path) -> PathBuf {
        let canon = std::fs::canonicalize(recipe).unwrap_or_else(|_| recipe.to_path_buf());
        let id = blake3::hash(canon.to_string_lossy().as_bytes()).to_hex();
        self.area(Area::State).join(format!("{}.json", &id[..32]))
    }

    /// Where the build log lives.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("log.jsonl")
    }

    /// The hash memo kept in this cache.
    pub fn memo(&self) -> HashMemo {
        HashMemo::at(&self.area(Area::FileHashes))
    }

    /// This cache reading through to `remote` (a local miss that the remote holds is
    /// downloaded when it is read) and writing back to it (in the background) what it stores.
    pub fn with_remote(mut self, remote: Arc<Remote>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The remote behind this cache, if any.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// Whether the remote holds `key`.
    fn in_remote(&self, key: &str, kind: Kind) -> bool {
        self.remote.as_ref().is_some_and(|r| r.contains(key, kind))
    }

    /// Asks the remote, several at a time, whether it holds these results and images (those
    /// not stored here), so that planning a large sweep does not wait on one request each.
    pub fn look_up_remote(&self, wanted: impl IntoIterator<Item = (String, Kind)>) {
        let Some(remote) = &self.remote else { return };
        let wanted: Vec<(String, Kind)> = wanted
            .into_iter()
            .filter(|(key, kind)| !self.is_local(key, *kind))
            .collect();
        remote.lookup(&wanted);
    }

    /// Downloads `key` from the remote into this cache; whether it is here now. A failure
    /// (a corrupt object among others) is reported and leaves it absent.
    fn fetch(&self, key: &str, kind: Kind) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        match remote.fetch(&self.root, key, kind) {
            Ok(found) => found,
            Err(e) => {
                eprintln!("warning: {e}");
                false
            }
        }
    }

    /// Whether a result or image is (completely) stored here.
    fn is_local(&self, key: &str, kind: Kind) -> bool {
        match kind {
            Kind::Result => self.has_local_result(key),
            Kind::Image => self.image_path(key).is_file(),
        }
    }

    /// The local files of a stored result or image, in upload order; `None` when it is not
    /// (completely) stored here.
    fn local_files(&self, key: &str, kind: Kind) -> Option<Vec<LocalFile>> {
        if !self.is_local(key, kind) {
            return None;
        }
        match kind {
            Kind::Result => self.result_files(key),
            Kind::Image => Some(vec![LocalFile {
                path: relative(Area::Images, key, "png"),
                recorded: None,
            }]),
        }
    }

    /// Queues the upload of a stored result or image to the remote, if there is one.
    pub fn publish(&self, key: &str, kind: Kind) {
        if let (Some(remote), Some(files)) = (&self.remote, self.local_files(key, kind)) {
            remote.publish(&self.root, key, kind, files);
        }
    }

    /// Uploads the stored `key` now (`mergesmith push`) unless the remote has it; whether it
    /// is stored here, and whether this call created its remote entry.
    pub fn push(&self, key: &str, kind: Kind) -> Result<(bool, bool)> {
        let files = self.local_files(key, kind);
        match (&self.remote, files) {
            (Some(remote), Some(files)) if !remote.contains(key, kind) => {
                Ok((true, remote.upload(&self.root, key, kind, &files)?))
            }
            (_, files) => Ok((files.is_some(), false)),
        }
    }

    /// Downloads `key` now (`mergesmith pull`) unless it is here; whether it is here now.
    pub fn pull(&self, key: &str, kind: Kind) -> Result<bool> {
        match (&self.remote, self.is_local(key, kind)) {
            (_, true) => Ok(true),
            (None, false) => Ok(false),
            (Some(remote), false) => remote.fetch(&self.root, key, kind),
        }
    }

    /// Takes the build lock of a node key (waits while another build holds it).
    pub fn lock(&self, key: &str) -> Result<std::fs::File> {
        let dir = self.area(Area::Locks);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("{key}.lock"));
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.lock().map_err(|e| Error::io(&path, e))?;
        Ok(f)
    }

    /// The preimage recorded for a key, if any.
    pub fn preimage(&self, key: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.preimage_path(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records the preimage of a key.
    pub fn put_preimage(&self, key: &str, preimage: &serde_json::Value) -> Result<()> {
        let text =
            serde_json::to_vec_pretty(preimage).map_err(|e| Error::Invalid(e.to_string()))?;
        write_file_atomic(&self.preimage_path(key), &text, true)
    }

    /// Whether the image of a key is stored: here, or in the remote.
    pub fn has_image(&self, key: &str) -> bool {
        self.image_path(key).is_file() || self.in_remote(key, Kind::Image)
    }

    /// The file of a stored image: here, else downloaded from the remote (and verified).
    pub fn image(&self, key: &str) -> Option<PathBuf> {
        let path = self.image_path(key);
        (path.is_file() || self.fetch(key, Kind::Image)).then_some(path)
    }

    /// Stores an image (temp file, fsync, rename) and queues it for the remote.
    pub fn put_image(&self, key: &str, png: &[u8]) -> Result<()> {
        write_file_atomic(&self.image_path(key), png, true)?;
        self.publish(key, Kind::Image);
        Ok(())
    }
}

/// What the last build of a recipe produced: each node's key and the files it wrote.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Node name -> key.
    pub nodes: BTreeMap<String, String>,
    /// Output file -> what mergesmith wrote there.
    pub outputs: BTreeMap<PathBuf, Written>,
}

/// A file a build wrote: from which stored object, and the file's stamp right after writing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    /// The result or image key it was written from.
    pub object: String,
    /// Its stamp right after writing.
    pub stamp: Stamp,
}

impl State {
    /// Whether the file at `to` is still exactly what a build wrote there from `key` (checked
    /// by stamp, without reading it).
    pub fn wrote(&self, to: &Path, key: &str) -> bool {
        self.outputs
            .get(to)
            .is_some_and(|w| w.object == key && Stamp::of(to).is_ok_and(|s| s == w.stamp))
    }
}

impl Cache {
    /// What the last build of `recipe` produced (nothing when it was never built here).
    pub fn load_state(&self, recipe: &Path) -> State {
        std::fs::read_to_string(self.state_path(recipe))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Records what this build of `recipe` produced.
    pub fn save_state(&self, recipe: &Path, state: &State) -> Result<()> {
        let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
        write_file_atomic(&self.state_path(recipe), &text, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_sharded() {
        assert_eq!(
            relative(Area::Packs, "abcd", "safetensors"),
            "packs/ab/abcd.safetensors"
        );
        assert_eq!(relative(Area::Images, "x", "png"), "images/x/x.png");
    }

    #[test]
    fn given_directory_wins() {
        let d = Path::new("/somewhere/cache");
        assert_eq!(locate(Some(d), Some(Path::new("r/x.yaml"))), d);
        assert_eq!(locate(Some(d), None), d);
    }

    #[test]
    fn beside_the_recipe() {
        assert_eq!(beside(Path::new("proj/r.yaml")), Path::new("proj/cache"));
        assert_eq!(beside(Path::new("r.yaml")), Path::new("cache"));
    }
}
