//! The node store: tensor packs and result manifests.
//!
//! A merge node's result is a *manifest* (`results/ab/<node key>.json`): the metadata of the
//! result file and, for every tensor, its name, dtype, shape, tensor key and the *pack* that
//! holds its bytes. A pack (`packs/ab/<pack>.safetensors`, with `<pack>.keys.json` listing the
//! tensor keys it holds) is an ordinary safetensors file holding the tensors that no earlier
//! pack held when its node was built; its name is the blake3 of those tensor keys, so a name
//! always means the same bytes.
//!
//! A cold build therefore writes one pack with every tensor, written with the full metadata
//! so that it *is* the result file: saving it is a copy (a reflink where the filesystem can)
//! or, on request, a hard link. A rebuild after changing one block writes a pack with just
//! that block's tensors; saving assembles the file from the packs in one sequential pass that
//! also hashes it, so the output is never read back to fill in the lock.
//!
//! Nodes marked `cache: memory` keep their packs and manifest in RAM-backed anonymous files
//! for the duration of one build: nothing of them reaches the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::remote::{Kind, LocalFile};
use super::{relative, Area, Cache};
use crate::checkpoint::writer::{self, SafetensorsWriter, TensorSpec};
use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::hashing::{FileHashes, HashMemo, Hashers};

/// One tensor of a node result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Tensor key (what determines its bytes).
    pub key: String,
    /// The pack holding its bytes.
    pub pack: String,
}

/// A node result: its tensors and the metadata of its file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The `__metadata__` of the result file.
    pub metadata: BTreeMap<String, String>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<Entry>,
    /// A pack whose bytes are exactly the result file, when there is one.
    pub file: Option<String>,
    /// Hashes of the result file, once known.
    pub hashes: Option<FileHashes>,
}

impl Manifest {
    /// The packs this result reads from.
    pub fn packs(&self) -> BTreeSet<&str> {
        self.tensors.iter().map(|e| e.pack.as_str()).collect()
    }

    fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|e| TensorSpec {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })
            .collect()
    }

    /// Tensor name -> tensor key.
    pub fn keys(&self) -> BTreeMap<String, String> {
        self.tensors
            .iter()
            .map(|e| (e.name.clone(), e.key.clone()))
            .collect()
    }
}

/// The name of a pack holding exactly these tensor keys (and, for a pack that is a whole
/// result file, this metadata).
fn pack_name(keys: &BTreeSet<&str>, metadata: &BTreeMap<String, String>) -> String {
    let mut h = blake3::Hasher::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"\n");
    }
    h.update(
        serde_json::to_string(metadata)
            .unwrap_or_default()
            .as_bytes(),
    );
    h.finalize().to_hex().to_string()
}

/// What a pack's `<name>.keys.json` records: the tensor keys it holds and the blake3 and
/// size of the pack (files written before digests were recorded hold just the key list).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct PackKeys {
    pub keys: Vec<String>,
    pub blake3: Option<String>,
    pub size: Option<u64>,
}

/// Reads a pack's key file (either format).
pub(crate) fn read_pack_keys(path: &Path) -> Option<PackKeys> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        Record(PackKeys),
        List(Vec<String>),
    }
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text).ok()? {
        Either::Record(r) => Some(r),
        Either::List(keys) => Some(PackKeys {
            keys,
            blake3: None,
            size: None,
        }),
    }
}

impl Cache {
    /// The manifest of a node key, if stored here.
    pub(crate) fn local_manifest(&self, key: &str) -> Option<Manifest> {
        let text = std::fs::read(self.manifest_path(key)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The manifest of a node key, if stored: here, else fetched (with its packs) from the
    /// remote. A fetch that fails verification is reported, and the result counts as absent.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        self.local_manifest(key).or_else(|| {
            self.fetch(key, Kind::Result)
                .then(|| self.local_manifest(key))?
        })
    }

    /// Whether a merge result is complete in the cache: its manifest and every pack it
    /// reads from (packs are written before manifests, and `gc` may remove packs).
    pub(crate) fn has_local_result(&self, key: &str) -> bool {
        self.local_manifest(key)
            .is_some_and(|m| m.packs().iter().all(|p| self.pack_path(p).exists()))
    }

    /// Whether a merge result is stored: complete here, or in the remote.
    pub fn has_result(&self, key: &str) -> bool {
        self.has_local_result(key) || self.in_remote(key, Kind::Result)
    }

    fn write_manifest(&self, key: &str, m: &Manifest) -> Result<()> {
        let text = serde_json::to_vec(m).map_err(|e| Error::Invalid(e.to_string()))?;
        writer::write_file_atomic(&self.manifest_path(key), &text, true)
    }

    /// The local files of a stored result, for the remote: its packs with their key lists
    /// (and the digests recorded for them), then the manifest, which makes it visible.
    pub(crate) fn result_files(&self, key: &str) -> Option<Vec<LocalFile>> {
        let m = self.local_manifest(key)?;
        let mut files = Vec::new();
        for p in m.packs() {
            let keys = self.pack_keys_path(p);
            let recorded = read_pack_keys(&keys).and_then(|k| k.blake3);
            files.push(LocalFile {
                path: relative(Area::Packs, p, "safetensors"),
                recorded,
            });
            if keys.is_file() {
                files.push(LocalFile {
                    path: relative(Area::Packs, p, "keys.json"),
                    recorded: None,
                });
            }
        }
        files.push(LocalFile {
            path: relative(Area::Results, key, "json"),
            recorded: None,
        });
        Some(files)
    }

    /// Tensor key -> pack, over every pack present in the cache.
    pub fn tensor_index(&self) -> HashMap<String, String> {
        let mut index = HashMap::new();
        let Ok(shards) = std::fs::read_dir(self.area(Area::Packs)) else {
            return index;
        };
        for file in shards
            .flatten()
            .filter_map(|s| std::fs::read_dir(s.path()).ok())
            .flatten()
            .flatten()
        {
            let path = file.path();
            let Some(pack) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".keys.json"))
            else {
                continue;
            };
            if !self.pack_path(pack).exists() {
                continue;
            }
            let keys = read_pack_keys(&path).map(|k| k.keys).unwrap_or_default();
            for k in keys {
                index.insert(k, pack.to_string());
            }
        }
        index
    }

    /// Marks a result as just used: its manifest's modification time orders `gc` (packs
    /// are never touched, since a save may share a pack's inode by hard link).
    pub fn touch(&self, key: &str) {
        if let Ok(f) = File::options().append(true).open(self.manifest_path(key)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// Packs and results kept in memory for one build (`cache: memory` nodes).
#[derive(Default)]
struct Memory {
    packs: Mutex<HashMap<String, Arc<File>>>,
    results: Mutex<HashMap<String, Manifest>>,
}

/// Where a new pack goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The cache directory.
    Disk,
    /// A RAM-backed anonymous file that lives as long as the build.
    Memory,
}

/// What a build reads and writes: the disk cache plus this build's in-memory results.
pub struct Store<'a> {
    /// The disk cache.
    pub cache: &'a Cache,
    /// The hash memo.
    pub memo: HashMemo,
    memory: Memory,
    /// Tensor key -> pack: read from the cache on first use, then kept current by `put`
    /// (packs other processes write meanwhile are simply not shared with this build).
    index: Mutex<Option<HashMap<String, String>>>,
}

/// An anonymous file in RAM (memfd on Linux; an unlinked temporary file elsewhere).
fn anonymous_file(name: &str) -> Result<File> {
    #[cfg(target_os = "linux")]
    {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Error::io(Path::new(name), e.into()))?;
        Ok(File::from(fd))
    }
    #[cfg(not(target_os = "linux"))]
    {
        tempfile::tempfile().map_err(|e| Error::io(Path::new(name), e))
    }
}

impl<'a> Store<'a> {
    /// A store over `cache` with nothing in memory yet.
    pub fn new(cache: &'a Cache) -> Self {
        Store {
            cache,
            memo: cache.memo(),
            memory: Memory::default(),
            index: Mutex::new(None),
        }
    }

    /// The manifest of a node key: in memory, else in the cache.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        let mem = self
            .memory
            .results
            .lock()
            .expect("memory store")
            .get(key)
            .cloned();
        mem.or_else(|| self.cache.manifest(key))
    }

    /// Whether a result is available (in memory, or complete in the cache).
    pub fn has_result(&self, key: &str) -> bool {
        self.memory
            .results
            .lock()
            .expect("memory store")
            .contains_key(key)
            || self.cache.has_result(key)
    }

    /// Opens a pack: its file (kept for in-kernel copies) and its tensors.
    fn open_pack(&self, pack: &str) -> Result<(Arc<File>, Checkpoint)> {
        let mem = self
            .memory
            .packs
            .lock()
            .expect("memory store")
            .get(pack)
            .cloned();
        let (file, label) = match mem {
            Some(file) => (file, PathBuf::from(format!("memory:{pack}"))),
            None => {
                let path = self.cache.pack_path(pack);
                let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
                (Arc::new(file), path)
            }
        };
        let ck = Checkpoint::open_file(&file, &label)?;
        Ok((file, ck))
    }

    /// Opens a node result as one checkpoint (its tensors read from their packs); `label`
    /// names it in messages.
    pub fn open_result(&self, key: &str, label: &Path) -> Result<Checkpoint> {
        let m = self.manifest(key).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: result {key} is not in the cache",
                label.display()
            ))
        })?;
        Ok(self.open_manifest(&m, label)?.0)
    }

    /// The result as one checkpoint, and the file of each of its parts.
    fn open_manifest(&self, m: &Manifest, label: &Path) -> Result<(Checkpoint, Vec<Arc<File>>)> {
        let packs: Vec<&str> = m.packs().into_iter().collect();
        let (files, parts): (Vec<_>, Vec<_>) = packs
            .iter()
            .map(|p| self.open_pack(p))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let slot: HashMap<&str, usize> = packs.iter().enumerate().map(|(i, p)| (*p, i)).collect();
        let tensors: Vec<(String, usize)> = m
            .tensors
            .iter()
            .map(|e| (e.name.clone(), slot[e.pack.as_str()]))
            .collect();
        let ck = Checkpoint::compose(label, parts, &tensors, m.metadata.clone())?;
        Ok((ck, files))
    }

    /// The pack holding each of `keys`, if any does (in the cache or this build's memory).
    pub fn packs_of<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Vec<Option<String>> {
        let mut index = self.index.lock().expect("pack index");
        let index = index.get_or_insert_with(|| self.cache.tensor_index());
        keys.map(|k| index.get(k).cloned()).collect()
    }

    /// Stores a result: `write` fills a writer with the tensors of `fresh` (tensor keys of
    /// the entries whose pack is still to be written), then the manifest is recorded.
    /// Entries of fresh tensors are pointed at the new pack. When every tensor is fresh the
    /// pack is written with the metadata and is the result file itself.
    pub fn put(
        &self,
        key: &str,
        mut manifest: Manifest,
        place: Place,
        write: impl FnOnce(&SafetensorsWriter) -> Result<()>,
    ) -> Result<()> {
        let fresh: Vec<&Entry> = manifest
            .tensors
            .iter()
            .filter(|e| e.pack.is_empty())
            .collect();
        if !fresh.is_empty() {
            let keys: BTreeSet<&str> = fresh.iter().map(|e| e.key.as_str()).collect();
            let whole = fresh.len() == manifest.tensors.len();
            let empty = BTreeMap::new();
            let metadata = if whole { &manifest.metadata } else { &empty };
            let pack = pack_name(&keys, metadata);
            let specs: Vec<TensorSpec> = fresh
                .iter()
                .map(|e| TensorSpec {
                    name: e.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                })
                .collect();
            let key_list: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            match place {
                Place::Disk => {
                    let path = self.cache.pack_path(&pack);
                    let w = SafetensorsWriter::create(path.clone(), specs, metadata, true)?;
                    write(&w)?;
                    w.finish()?;
                    // The key list, with the pack's digest, once the pack is complete: the
                    // index only knows packs through their key lists.
                    let (blake3, size) = crate::hashing::blake3_file(&path)?;
                    let record = PackKeys {
                        keys: key_list.clone(),
                        blake3: Some(blake3),
                        size: Some(size),
                    };
                    let text =
                        serde_json::to_vec(&record).map_err(|e| Error::Invalid(e.to_string()))?;
                    writer::write_file_atomic(&self.cache.pack_keys_path(&pack), &text, true)?;
                }
                Place::Memory => {
                    let label = PathBuf::from(format!("memory:{pack}"));
                    let file = anonymous_file(&pack)?;
                    let w = SafetensorsWriter::create_anonymous(file, &label, specs, metadata)?;
                    write(&w)?;
                    let file = w.finish_file()?;
                    self.memory
                        .packs
                        .lock()
                        .expect("memory store")
                        .insert(pack.clone(), Arc::new(file));
                }
            }
            let mut index = self.index.lock().expect("pack index");
            index
                .get_or_insert_with(|| self.cache.tensor_index())
                .extend(key_list.into_iter().map(|k| (k, pack.clone())));
            drop(index);
            for e in manifest.tensors.iter_mut().filter(|e| e.pack.is_empty()) {
                e.pack = pack.clone();
            }
            if whole {
                manifest.file = Some(pack);
            }
        }
        match place {
            Place::Disk => {
                self.cache.write_manifest(key, &manifest)?;
                self.cache.publish(key, Kind::Result);
                Ok(())
            }
            Place::Memory => {
                self.memory
                    .results
                    .lock()
                    .expect("memory store")
                    .insert(key.to_string(), manifest);
                Ok(())
            }
        }
    }

    fn update(&self, key: &str, m: &Manifest) -> Result<()> {
        let mut mem = self.memory.results.lock().expect("memory store");
        match mem.get_mut(key) {
            Some(slot) => {
                *slot = m.clone();
                Ok(())
            }
            None => self.cache.write_manifest(key, m),
        }
    }

    /// The pack that is the whole result file, if it is on disk.
    fn file_pack(&self, m: &Manifest) -> Option<PathBuf> {
        m.file
            .as_deref()
            .map(|p| self.cache.pack_path(p))
            .filter(|p| p.exists())
    }

    /// The hashes of a result's file, computed once (from the whole-file pack through the
    /// memo, or over the assembled bytes) and kept in the manifest.
    pub fn result_hashes(&self, key: &str) -> Result<FileHashes> {
        let mut m = self
            .manifest(key)
            .ok_or_else(|| Error::Invalid(format!("result {key} is not in the cache")))?;
        if let Some(h) = &m.hashes {
            return Ok(h.clone());
        }
        let hashes = match self.file_pack(&m) {
            Some(p) => self.memo.hashes(&p)?.0,
            None => self.assemble(&m, None, false)?,
        };
        m.hashes = Some(hashes.clone());
        self.update(key, &m)?;
        Ok(hashes)
    }

    /// Hashes the result file's bytes (canonical header, then every tensor in layout order)
    /// and, given a destination, writes them there at the same time (temp file, fsync,
    /// rename), the tensors copied in the kernel from their packs where it can.
    fn assemble(&self, m: &Manifest, dest: Option<&Path>, progress: bool) -> Result<FileHashes> {
        let layout = writer::layout(&m.specs(), &m.metadata)?;
        let (ck, files) = self.open_manifest(m, Path::new("result"))?;
        let mut order: Vec<usize> = (0..m.tensors.len()).collect();
        order.sort_by_key(|&i| layout.ranges[i].0);
        let infos = order
            .iter()
            .map(|&i| {
                ck.get(&m.tensors[i].name)
                    .ok_or_else(|| Error::MissingTensor {
                        path: PathBuf::from("result"),
                        name: m.tensors[i].name.clone(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let total = layout.header.len() as u64
            + layout.ranges.iter().map(|r| r.1 as u64).max().unwrap_or(0);
        let bar = crate::progress::bytes(total, "save", progress);
        let hash = || {
            let mut h = Hashers::new();
            h.update(&layout.header);
            for info in &infos {
                for piece in ck.data(info).chunks(8 << 20) {
                    h.update(piece);
                    if dest.is_none() {
                        bar.inc(piece.len() as u64);
                    }
                }
                ck.release(info);
            }
            h.finish()
        };
        let copy = |dest: &Path| -> Result<()> {
            let datas: Vec<_> = infos.iter().map(|i| ck.data(i)).collect();
            let pieces = infos
                .iter()
                .zip(&datas)
                .map(|(info, data)| {
                    let (part, offset) = ck.file_offset(info).ok_or_else(|| {
                        Error::Invalid(format!("tensor `{}` is not stored contiguously", info.name))
                    })?;
                    Ok(writer::Piece {
                        file: &files[part],
                        offset,
                        data,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            writer::assemble_file(dest, &layout.header, &pieces, |n| bar.inc(n))
        };
        let hashes = match dest {
            None => hash(),
            Some(dest) => {
                let (hashes, copied) = rayon::join(hash, || copy(dest));
                copied?;
                hashes
            }
        };
        bar.finish_and_clear();
        Ok(hashes)
    }

    /// Writes a result to `to` (which the caller has cleared for writing): by hard link to
    /// the whole-file pack when `hardlink` and the result is on disk (the pack is assembled
    /// first if the result is stored in pieces), else by copy (a reflink where the filesystem
    /// supports it) or assembly. Returns the file's hashes, which the memo also records.
    pub fn materialize(
        &self,
        key: &str,
        to: &Path,
        hardlink: bool,
        progress: bool,
    ) -> Result<FileHashes> {
        let mut m = self
            .manifest(key)
            .ok_or_else(|| Error::Invalid(format!("result {key} is not in the cache")))?;
        if hardlink && self.cache.has_result(key) && self.file_pack(&m).is_none() {
            let whole = format!("whole-{key}");
            let hashes = self.assemble(&m, Some(&self.cache.pack_path(&whole)), progress)?;
            m.file = Some(whole);
            m.hashes = Some(hashes);
            self.update(key, &m)?;
        }
        let hashes = match self.file_pack(&m) {
            Some(pack) => {
                let linked = hardlink && {
                    make_read_only(&pack);
                    match writer::link_atomic(&pack, to) {
                        Ok(()) => true,
                        Err(e) => {
                            eprintln!(
                                "warning: cannot hard-link {} ({e}); copying instead",
                                to.display()
                            );
                            false
                        }
                    }
                };
                if !linked {
                    writer::copy_file_atomic(&pack, to, true)?;
                }
                self.result_hashes(key)?
            }
            None => {
                let hashes = self.assemble(&m, Some(to), progress)?;
                if m.hashes.is_none() {
                    m.hashes = Some(hashes.clone());
                    self.update(key, &m)?;
                }
                hashes
            }
        };
        self.memo.record(to, &hashes)?;
        Ok(hashes)
    }
}

fn make_read_only(path: &Path) {
    if let Ok(md) = std::fs::metadata(path) {
        let mut perm = md.permissions();
        perm.set_readonly(true);
        let _ = std::fs::set_permissions(path, perm);
    }
}
