//! Reading and writing checkpoint files.
//!
//! [`Checkpoint::open`] memory-maps a safetensors file or a PyTorch zip checkpoint and
//! validates its structure; tensor data is then borrowed straight from the map.
//! [`writer::SafetensorsWriter`] writes safetensors files one tensor at a time.

pub mod header;
pub mod pickle;
pub mod quant;
pub mod writer;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::atomic::Ordering;

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Error, HeaderError, Result};

/// Process-wide I/O counters, so tests can prove that an up-to-date build reads nothing.
pub mod counters {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(crate) static FILES_OPENED: AtomicU64 = AtomicU64::new(0);
    pub(crate) static TENSOR_BYTES: AtomicU64 = AtomicU64::new(0);
    pub(crate) static FILES_HASHED: AtomicU64 = AtomicU64::new(0);

    /// What this process has read so far.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Counters {
        /// Checkpoint files opened (headers parsed).
        pub files_opened: u64,
        /// Bytes of tensor data handed out by [`super::Checkpoint::data`].
        pub tensor_bytes: u64,
        /// Files read in full to hash them (memo misses).
        pub files_hashed: u64,
    }

    /// The counters now.
    pub fn snapshot() -> Counters {
        Counters {
            files_opened: FILES_OPENED.load(Ordering::Relaxed),
            tensor_bytes: TENSOR_BYTES.load(Ordering::Relaxed),
            files_hashed: FILES_HASHED.load(Ordering::Relaxed),
        }
    }
}

/// The on-disk format of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A safetensors file.
    Safetensors,
    /// A PyTorch zip archive with a pickled state dict (`.ckpt`, `.pt`, `.pth`).
    TorchZip,
}

/// Where a tensor's bytes live in the mapped file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// `start..end` holds the elements in row-major order.
    Contiguous { start: usize, end: usize },
    /// Element `idx` lives at `start + dot(idx, strides) * element size`.
    Strided { start: usize, strides: Vec<usize> },
}

/// Name, type and shape of one tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (state-dict key).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for scalars).
    pub shape: Vec<usize>,
    location: Location,
    /// Which mapped file holds the data (composed checkpoints have several).
    part: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.dtype.byte_len(self.numel()).unwrap_or(0)
    }
}

/// A borrowed tensor: type, shape and little-endian row-major bytes.
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// Row-major data (borrowed from the map when the file stores it contiguously).
    pub data: Cow<'a, [u8]>,
}

/// An opened, validated checkpoint backed by a read-only memory map.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    maps: Vec<Mmap>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens and validates a checkpoint; the format is chosen from the file's first bytes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        counters::FILES_OPENED.fetch_add(1, Ordering::Relaxed);
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                kind: HeaderError::TooShort { len },
            });
        }
        // SAFETY: the map is read-only. A file truncated by another process while mapped
        // would fault on access; that is the accepted contract of memory-mapped readers.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if mmap.starts_with(b"PK\x03\x04") {
            Self::from_torch_zip(path, mmap)
        } else if mmap[0] == 0x80 && mmap[1] <= 5 && !looks_like_safetensors(&mmap) {
            Err(Error::Pickle {
                path: path.to_path_buf(),
                msg: "legacy (pre-1.6, non-zip) torch serialization is not supported; \
                      re-save the file with torch >= 1.6 or as safetensors"
                    .into(),
            })
        } else {
            Self::from_safetensors(path, mmap)
        }
    }

    /// Opens a safetensors file that is already open (say, an anonymous in-memory file);
    /// `label` names it in messages.
    pub fn open_file(file: &File, label: &Path) -> Result<Self> {
        counters::FILES_OPENED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `open`; the file is only ever read through this map.
        let mmap = unsafe { Mmap::map(file) }.map_err(|e| Error::io(label, e))?;
        Self::from_safetensors(label, mmap)
    }

    fn from_safetensors(path: &Path, mmap: Mmap) -> Result<Self> {
        let header = header::parse(&mmap).map_err(|kind| Error::Safetensors {
            path: path.to_path_buf(),
            kind,
        })?;
        let base = header.data_start();
        let tensors = header
            .entries
            .into_iter()
            .map(|e| TensorInfo {
                name: e.name,
                dtype: e.dtype,
                shape: e.shape,
                location: Location::Contiguous {
                    start: base + e.begin,
                    end: base + e.end,
                },
                part: 0,
            })
            .collect();
        Ok(Self::assemble(
            path,
            Format::Safetensors,
            vec![mmap],
            tensors,
            header.metadata,
        ))
    }

    fn from_torch_zip(path: &Path, mmap: Mmap) -> Result<Self> {
        let found = pickle::read_tensors(&mmap).map_err(|msg| Error::Pickle {
            path: path.to_path_buf(),
            msg,
        })?;
        let mut tensors = Vec::with_capacity(found.len());
        let mut seen = std::collections::HashSet::new();
        for t in found {
            if !seen.insert(t.name.clone()) {
                return Err(Error::Pickle {
                    path: path.to_path_buf(),
                    msg: format!("tensor `{}` appears twice", t.name),
                });
            }
            let location = if is_contiguous(&t.shape, &t.strides) {
                let len = t.dtype.byte_len(t.shape.iter().product()).unwrap_or(0);
                Location::Contiguous {
                    start: t.start,
                    end: t.start + len,
                }
            } else {
                Location::Strided {
                    start: t.start,
                    strides: t.strides,
                }
            };
            tensors.push(TensorInfo {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                location,
                part: 0,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self::assemble(
            path,
            Format::TorchZip,
            vec![mmap],
            tensors,
            BTreeMap::new(),
        ))
    }

    fn assemble(
        path: &Path,
        format: Format,
        maps: Vec<Mmap>,
        tensors: Vec<TensorInfo>,
        metadata: BTreeMap<String, String>,
    ) -> Self {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Checkpoint {
            path: path.to_path_buf(),
            format,
            maps,
            tensors,
            index,
            metadata,
        }
    }

    /// A checkpoint whose tensors come from several opened files: `tensors` names, for each
    /// tensor, the part that holds it. `path` names the whole in messages. Errors if a part
    /// lacks a tensor it is said to hold.
    pub fn compose(
        path: &Path,
        parts: Vec<Checkpoint>,
        tensors: &[(String, usize)],
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut infos = Vec::with_capacity(tensors.len());
        for (name, part) in tensors {
            let ck = parts.get(*part).ok_or_else(|| {
                Error::Invalid(format!("{}: part {part} missing", path.display()))
            })?;
            let mut info = ck.get(name).cloned().ok_or_else(|| Error::MissingTensor {
                path: ck.path.clone(),
                name: name.clone(),
            })?;
            info.part = *part;
            infos.push(info);
        }
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        // Parts are single files, so part i's data is map i.
        let maps = parts
            .into_iter()
            .filter_map(|ck| ck.maps.into_iter().next())
            .collect();
        Ok(Self::assemble(
            path,
            Format::Safetensors,
            maps,
            infos,
            metadata,
        ))
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// True if the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The safetensors `__metadata__` map (empty for pickles).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Row-major bytes of a tensor: borrowed when stored contiguously, gathered otherwise.
    pub fn data(&self, t: &TensorInfo) -> Cow<'_, [u8]> {
        counters::TENSOR_BYTES.fetch_add(t.byte_len() as u64, Ordering::Relaxed);
        let Some(map) = self.maps.get(t.part) else {
            return Cow::Borrowed(&[]); // a header-only checkpoint
        };
        match &t.location {
            Location::Contiguous { start, end } => Cow::Borrowed(&map[*start..*end]),
            Location::Strided { start, strides } => {
                Cow::Owned(gather(map, *start, &t.shape, strides, t.dtype.bits() / 8))
            }
        }
    }

    /// A checkpoint with names, types and shapes but no data (say, the planned output of a
    /// merge not built yet), for checking a plan. Its tensors read as empty.
    pub fn header_only(
        label: &Path,
        tensors: impl IntoIterator<Item = (String, DType, Vec<usize>)>,
    ) -> Self {
        let mut infos: Vec<TensorInfo> = tensors
            .into_iter()
            .map(|(name, dtype, shape)| TensorInfo {
                name,
                dtype,
                shape,
                location: Location::Contiguous { start: 0, end: 0 },
                part: 0,
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        Self::assemble(
            label,
            Format::Safetensors,
            Vec::new(),
            infos,
            BTreeMap::new(),
        )
    }

    /// Where a contiguously stored tensor lies: (part, byte offset in that part's file).
    /// Parts are numbered as given to [`Checkpoint::compose`] (0 for a plain file).
    pub fn file_offset(&self, t: &TensorInfo) -> Option<(usize, u64)> {
        match t.location {
            Location::Contiguous { start, .. } => Some((t.part, start as u64)),
            Location::Strided { .. } => None,
        }
    }

    /// A view of the named tensor, or an error naming the file and the tensor.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let t = self.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        Ok(TensorView {
            dtype: t.dtype,
            shape: &t.shape,
            data: self.data(t),
        })
    }

    /// Drops the tensor's pages from this process's resident set once it has been used, so
    /// streaming a model through never makes the process look like it holds the whole file.
    /// The data stays in the page cache and is simply faulted in again if read later.
    pub fn release(&self, t: &TensorInfo) {
        #[cfg(unix)]
        if let Location::Contiguous { start, end } = t.location {
            if end > start {
                // SAFETY: the map is a shared, read-only file mapping: MADV_DONTNEED only drops
                // the process's page-table entries, and later reads fault the same file bytes
                // back in, so borrowed slices keep their contents.
                let Some(map) = self.maps.get(t.part) else {
                    return;
                };
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }

    /// Tells the kernel the whole file will be read front to back (a hint; errors are ignored).
    pub fn advise_sequential(&self) {
        #[cfg(unix)]
        for m in &self.maps {
            let _ = m.advise(memmap2::Advice::Sequential);
        }
    }
}

/// A safetensors header starts with a small little-endian length followed by `{`.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let mut p = [0u8; 8];
    p.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(p);
    n < header::MAX_HEADER_LEN && bytes.get(8) == Some(&b'{')
}

fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

fn gather(bytes: &[u8], start: usize, shape: &[usize], strides: &[usize], es: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n * es);
    if n == 0 {
        return out;
    }
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let off: usize = idx.iter().zip(strides).map(|(i, s)| i * s).sum();
        let at = start + off * es;
        out.extend_from_slice(&bytes[at..at + es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn gather_transpose() {
        // storage [0,1,2,3,4,5] as u8, viewed as the transpose of a 2x3 matrix.
        let bytes = [0u8, 1, 2, 3, 4, 5];
        assert_eq!(
            gather(&bytes, 0, &[3, 2], &[1, 3], 1),
            vec![0, 3, 1, 4, 2, 5]
        );
    }
}
