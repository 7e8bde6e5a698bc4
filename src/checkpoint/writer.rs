//! A streaming, deterministic, crash-safe safetensors writer.
//!
//! The header is computed up front from names, dtypes and shapes, so tensors can be written
//! one at a time (from several threads, in any order) straight to their final offsets: peak
//! memory is one tensor, not a model. The file is built under a temporary name in the
//! destination directory, fsynced and renamed into place, so an interrupted write never
//! leaves a partial file under the final name.
//!
//! Layout rules (the same inputs always give the same bytes):
//! - header JSON keys are sorted, `__metadata__` first with its keys sorted, no spaces,
//!   padded with spaces to a multiple of 8 bytes;
//! - tensor data is ordered by descending element alignment, then by name, so every
//!   tensor starts at an offset aligned for its dtype.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use tempfile::NamedTempFile;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Name, dtype and shape of a tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Byte length of the tensor's data.
    pub fn byte_len(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| self.dtype.byte_len(n))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "tensor `{}`: shape {:?} is too large",
                    self.name, self.shape
                ))
            })
    }
}

/// The canonical header of a file and where each tensor's data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLayout {
    /// Header bytes, the 8-byte length prefix included.
    pub header: Vec<u8>,
    /// Data range of each tensor (relative to the data section), in the order of the specs.
    pub ranges: Vec<(usize, usize)>,
}

/// Computes the canonical header bytes and each tensor's data range.
pub fn layout(specs: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Result<FileLayout> {
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&specs[a], &specs[b]);
        y.dtype
            .align()
            .cmp(&x.dtype.align())
            .then_with(|| x.name.cmp(&y.name))
    });
    let mut ranges = vec![(0usize, 0usize); specs.len()];
    let mut pos = 0usize;
    for &i in &order {
        let len = specs[i].byte_len()?;
        ranges[i] = (pos, pos + len);
        pos += len;
    }
    let mut by_name: Vec<usize> = (0..specs.len()).collect();
    by_name.sort_by(|&a, &b| specs[a].name.cmp(&specs[b].name));
    for w in by_name.windows(2) {
        if specs[w[0]].name == specs[w[1]].name {
            return Err(Error::Invalid(format!(
                "tensor `{}` given twice",
                specs[w[0]].name
            )));
        }
    }
    let q = |s: &str| serde_json::to_string(s).expect("strings always serialize");
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        let items: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", q(k), q(v)))
            .collect();
        json.push_str(&items.join(","));
        json.push('}');
    }
    for &i in &by_name {
        let s = &specs[i];
        if s.name == "__metadata__" {
            return Err(Error::Invalid(
                "a tensor cannot be named `__metadata__`".into(),
            ));
        }
        if json.len() > 1 {
            json.push(',');
        }
        let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            q(&s.name),
            s.dtype.name(),
            shape.join(","),
            ranges[i].0,
            ranges[i].1
        ));
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    Ok(FileLayout { header, ranges })
}

/// Where a writer's bytes go.
enum Target {
    /// A temporary file renamed to `dest` by [`SafetensorsWriter::finish`].
    Disk {
        dest: PathBuf,
        tmp: NamedTempFile,
        overwrite: bool,
    },
    /// An anonymous file handed back by [`SafetensorsWriter::finish_file`]; `label` names it
    /// in messages.
    Anonymous { file: File, label: PathBuf },
}

impl Target {
    fn file(&self) -> (&File, &Path) {
        match self {
            Target::Disk { tmp, .. } => (tmp.as_file(), tmp.path()),
            Target::Anonymous { file, label } => (file, label),
        }
    }
}

/// A part handed to the I/O thread: its bytes and where they go.
struct Part {
    at: u64,
    data: Vec<u8>,
    writeback: bool,
}

/// Parts handed over by [`SafetensorsWriter::write_part_owned`], written by one I/O thread in
/// the order they come, so the computing threads go on while the kernel copies their bytes
/// into the page cache. Written buffers come back through `free` for reuse.
struct Background {
    parts: Option<SyncSender<Part>>,
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    failed: Arc<Mutex<Option<Error>>>,
    thread: Option<JoinHandle<()>>,
}

/// Parts queued for the I/O thread at most (a few MiB in flight).
const QUEUED_PARTS: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Background {
    fn start(file: File, path: PathBuf) -> std::io::Result<Self> {
        let (parts, queue) = sync_channel::<Part>(QUEUED_PARTS);
        let free = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let (free2, failed2) = (free.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("mergesmith-writer".into())
            .spawn(move || {
                for part in queue {
                    if let Err(e) = put(&file, &path, &part.data, part.at, part.writeback) {
                        *lock(&failed2) = Some(e);
                        return;
                    }
                    lock(&free2).push(part.data);
                }
            })?;
        Ok(Background {
            parts: Some(parts),
            free,
            failed,
            thread: Some(thread),
        })
    }

    fn send(&self, part: Part) -> Result<()> {
        let sent = self.parts.as_ref().map(|p| p.send(part));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.error()),
        }
    }

    /// The I/O thread's error (the first caller to ask gets it).
    fn error(&self) -> Error {
        lock(&self.failed).take().unwrap_or_else(|| {
            Error::Invalid("the output's writer thread stopped after an earlier error".into())
        })
    }

    /// Waits until every part is written; the first write error, if any.
    fn finish(mut self) -> Result<()> {
        self.stop();
        lock(&self.failed).take().map_or(Ok(()), Err)
    }

    fn stop(&mut self) {
        self.parts = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                lock(&self.failed).get_or_insert_with(|| {
                    Error::Invalid("the output's writer thread panicked".into())
                });
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes one safetensors file; see the module docs.
pub struct SafetensorsWriter {
    /// Declared first so it is dropped (its thread joined) before the file is.
    background: OnceLock<std::result::Result<Background, String>>,
    target: Target,
    data_start: u64,
    specs: Vec<TensorSpec>,
    ranges: Vec<(usize, usize)>,
    index: HashMap<String, usize>,
    written: Vec<AtomicUsize>,
}

impl SafetensorsWriter {
    /// Prepares `dest` for the given tensors and metadata. Fails at once if `dest` exists
    /// and `overwrite` is false.
    pub fn create(
        dest: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
        overwrite: bool,
    ) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        if !overwrite && dest.exists() {
            return Err(Error::OutputExists { path: dest });
        }
        let tmp = temp_beside(&dest)?;
        let target = Target::Disk {
            dest,
            tmp,
            overwrite,
        };
        Self::start(target, specs, metadata)
    }

    /// Like [`SafetensorsWriter::create`], but into an anonymous file (say, a memfd) that
    /// [`SafetensorsWriter::finish_file`] hands back; `label` names it in messages.
    pub fn create_anonymous(
        file: File,
        label: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let target = Target::Anonymous {
            file,
            label: label.to_path_buf(),
        };
        Self::start(target, specs, metadata)
    }

    fn start(
        target: Target,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let FileLayout { header, ranges } = layout(&specs, metadata)?;
        let total = header.len() as u64 + ranges.iter().map(|r| r.1).max().unwrap_or(0) as u64;
        let (file, path) = target.file();
        file.set_len(total).map_err(|e| Error::io(path, e))?;
        write_at(file, path, &header, 0)?;
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let written = specs.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(SafetensorsWriter {
            background: OnceLock::new(),
            target,
            data_start: header.len() as u64,
            specs,
            ranges,
            index,
            written,
        })
    }

    /// The tensors this writer expects.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Writes the whole data of the tensor `name`. Safe to call from several threads at once.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let (begin, end) = self.ranges[self.index_of(name)?];
        if data.len() != end - begin {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: got {} bytes, the header declares {}",
                data.len(),
                end - begin
            )));
        }
        self.write_part(name, 0, data)
    }

    /// Writes `data` at byte `offset` within the tensor `name`, so a large tensor can be
    /// produced in chunks by several threads. Every byte must be written exactly once.
    pub fn write_part(&self, name: &str, offset: usize, data: &[u8]) -> Result<()> {
        let (at, writeback) = self.claim(name, offset, data.len())?;
        let (file, path) = self.target.file();
        put(file, path, data, at, writeback)
    }

    /// Like [`SafetensorsWriter::write_part`], but the bytes are written by the writer's I/O
    /// thread while the caller goes on; a failed write is reported by a later call or by
    /// `finish`. Take `data` from [`SafetensorsWriter::part_buffer`] to reuse written buffers.
    pub fn write_part_owned(&self, name: &str, offset: usize, data: Vec<u8>) -> Result<()> {
        let (at, writeback) = self.claim(name, offset, data.len())?;
        let background = self.background.get_or_init(|| {
            let (file, path) = self.target.file();
            file.try_clone()
                .and_then(|f| Background::start(f, path.to_path_buf()))
                .map_err(|e| format!("{}: cannot start its writer thread: {e}", path.display()))
        });
        match background {
            Ok(b) => b.send(Part {
                at,
                data,
                writeback,
            }),
            Err(e) => Err(Error::Invalid(e.clone())),
        }
    }

    /// A buffer of `len` bytes for [`SafetensorsWriter::write_part_owned`]: one the I/O
    /// thread has written already where there is one (its contents are stale).
    pub fn part_buffer(&self, len: usize) -> Vec<u8> {
        let reused = match self.background.get() {
            Some(Ok(b)) => lock(&b.free).pop(),
            _ => None,
        };
        let mut v = reused.unwrap_or_default();
        v.resize(len, 0);
        v
    }

    /// Checks and counts a write of `len` bytes at `offset` within tensor `name`; returns
    /// the file offset and whether the part should start its writeback once written.
    fn claim(&self, name: &str, offset: usize, len: usize) -> Result<(u64, bool)> {
        let i = self.index_of(name)?;
        let (begin, end) = self.ranges[i];
        if offset + len > end - begin {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: write of {len} bytes at {offset} overruns its {} bytes",
                end - begin
            )));
        }
        let total = end - begin;
        let counted = self.written[i].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
            (w + len <= total).then_some(w + len)
        });
        if counted.is_err() {
            return Err(Error::Invalid(format!("tensor `{name}` written twice")));
        }
        // Each part of a large tensor starts its own writeback once written.
        let writeback = matches!(self.target, Target::Disk { .. }) && total >= WRITEBACK_MIN;
        Ok((self.data_start + (begin + offset) as u64, writeback))
    }

    /// Waits for the I/O thread's writes; the first that failed, if any.
    fn drain(&mut self) -> Result<()> {
        match self.background.take() {
            Some(Ok(b)) => b.finish(),
            _ => Ok(()),
        }
    }

    /// Where tensor `name`'s data starts in the file's data section.
    pub fn offset(&self, name: &str) -> Option<usize> {
        self.index.get(name).map(|&i| self.ranges[i].0)
    }

    /// Whether `name` is one of the tensors this writer expects.
    pub fn expects(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| {
            Error::Invalid(format!("tensor `{name}` is not part of the output header"))
        })
    }

    /// Checks every tensor was written, fsyncs, and renames the file into place; returns
    /// the final path and the file size.
    pub fn finish(mut self) -> Result<(PathBuf, u64)> {
        self.drain()?;
        let size = self.check_complete()?;
        match self.target {
            Target::Disk {
                dest,
                tmp,
                overwrite,
            } => {
                persist(tmp, &dest, overwrite)?;
                Ok((dest, size))
            }
            Target::Anonymous { label, .. } => Ok((label, size)),
        }
    }

    /// Checks every tensor was written and hands back the anonymous file of a writer made
    /// by [`SafetensorsWriter::create_anonymous`].
    pub fn finish_file(mut self) -> Result<File> {
        self.drain()?;
        self.check_complete()?;
        match self.target {
            Target::Anonymous { file, .. } => Ok(file),
            Target::Disk { dest, .. } => Err(Error::Invalid(format!(
                "{}: a file on disk is finished with `finish`",
                dest.display()
            ))),
        }
    }

    /// The file size once every tensor is written, or an error naming a missing tensor.
    fn check_complete(&self) -> Result<u64> {
        let incomplete = |(i, w): (usize, &AtomicUsize)| {
            w.load(Ordering::SeqCst) != self.ranges[i].1 - self.ranges[i].0
        };
        if let Some(i) = self.written.iter().enumerate().position(incomplete) {
            return Err(Error::Invalid(format!(
                "tensor `{}` was never written; {} left unfinished",
                self.specs[i].name,
                self.target.file().1.display()
            )));
        }
        Ok(self.data_start + self.ranges.iter().map(|r| r.1).max().unwrap_or(0) as u64)
    }
}

/// fsyncs `tmp`, renames it to `dest` (refusing to replace a file unless `overwrite`), and
/// fsyncs the directory.
pub(crate) fn persist(tmp: NamedTempFile, dest: &Path, overwrite: bool) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    let persisted = if overwrite {
        tmp.persist(dest)
    } else {
        tmp.persist_noclobber(dest)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            Error::OutputExists {
                path: dest.to_path_buf(),
            }
        } else {
            Error::io(dest, e.error)
        }
    })?;
    sync_parent(dest);
    Ok(())
}

/// Writes a whole file atomically: temp file in the same directory, fsync, rename.
pub fn write_file_atomic(dest: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && dest.exists() {
        return Err(Error::OutputExists {
            path: dest.to_path_buf(),
        });
    }
    let mut tmp = temp_beside(dest)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| Error::io(dest, e))?;
    persist(tmp, dest, overwrite)
}

/// Copies `src` to `dest` atomically (temp file beside `dest`, fsync, rename). `fs::copy`
/// uses copy_file_range, which reflinks on filesystems that support it.
pub fn copy_file_atomic(src: &Path, dest: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && dest.exists() {
        return Err(Error::OutputExists {
            path: dest.to_path_buf(),
        });
    }
    let tmp = temp_beside(dest)?;
    std::fs::copy(src, tmp.path()).map_err(|e| Error::io(src, e))?;
    persist(tmp, dest, overwrite)
}

/// A run of bytes to copy from an open file: `data` is those bytes (as mapped), found at
/// `offset` in `file`.
pub struct Piece<'a> {
    /// The file holding the bytes.
    pub file: &'a File,
    /// Where they start in it.
    pub offset: u64,
    /// The bytes themselves.
    pub data: &'a [u8],
}

/// Writes a file atomically from a header and pieces of other files, in order. On Linux the
/// pieces are copied in the kernel (`copy_file_range`: no trip through user memory, and a
/// shared extent on filesystems that can reflink); elsewhere, or when the kernel declines,
/// the mapped bytes are written. `done` is told each piece's length.
pub fn assemble_file(
    dest: &Path,
    header: &[u8],
    pieces: &[Piece],
    done: impl Fn(u64),
) -> Result<()> {
    let tmp = temp_beside(dest)?;
    let (out, path) = (tmp.as_file(), tmp.path());
    write_at(out, path, header, 0)?;
    let mut pos = header.len() as u64;
    let mut in_kernel = cfg!(target_os = "linux");
    for p in pieces {
        let len = p.data.len() as u64;
        if in_kernel {
            in_kernel = copy_in_kernel(p, out, pos).map_err(|e| Error::io(path, e))?;
        }
        if !in_kernel {
            write_at(out, path, p.data, pos)?;
        }
        pos += len;
        done(len);
    }
    persist(tmp, dest, true)
}

/// Copies a piece with `copy_file_range`; `Ok(false)` when the kernel cannot (the caller
/// then writes the bytes itself).
#[cfg(target_os = "linux")]
fn copy_in_kernel(p: &Piece, out: &File, at: u64) -> std::io::Result<bool> {
    let (mut src, mut dst) = (p.offset, at);
    let mut left = p.data.len();
    while left > 0 {
        match rustix::fs::copy_file_range(p.file, Some(&mut src), out, Some(&mut dst), left) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n,
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS)
            | Err(rustix::io::Errno::OPNOTSUPP)
                if left == p.data.len() =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn copy_in_kernel(_: &Piece, _: &File, _: u64) -> std::io::Result<bool> {
    Ok(false)
}

/// Makes `dest` a hard link to `src`, replacing `dest` atomically (link under a temporary
/// name beside it, then rename).
pub fn link_atomic(src: &Path, dest: &Path) -> Result<()> {
    let dir = dest_dir(dest)?;
    let tmp = tempfile::Builder::new()
        .prefix(".mergesmith-link.")
        .make_in(dir, |p| std::fs::hard_link(src, p))
        .map_err(|e| Error::io(dest, e))?;
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    sync_parent(dest);
    Ok(())
}

/// The directory `dest` goes in (created if missing); temporary files go there too, so the
/// final rename is atomic.
fn dest_dir(dest: &Path) -> Result<&Path> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    Ok(dir)
}

/// A temporary file in `dest`'s directory (created if missing; the same directory makes the
/// final rename atomic), named
/// `.<name>.<random>.partial`, with ordinary file permissions (0644 before umask).
pub(crate) fn temp_beside(dest: &Path) -> Result<NamedTempFile> {
    let dir = dest_dir(dest)?;
    let file_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    let prefix = format!(".{file_name}.");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o644));
    }
    b.tempfile_in(dir).map_err(|e| Error::io(dir, e))
}

fn sync_parent(dest: &Path) {
    // Make the rename itself durable; failure here (e.g. on filesystems that do not
    // support directory fsync) does not affect the file's contents.
    if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Tensors at least this large start their writeback as their parts are written.
const WRITEBACK_MIN: usize = 1 << 20;

/// Asks the kernel to start writing `len` bytes at `offset` back to disk, without waiting:
/// the final fsync then finds most of the file already on its way, so writing overlaps the
/// computing instead of following it. A hint; failures are ignored (the fsync still syncs).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: usize) {}

/// Writes `data` at `at`, then (when `writeback`) starts its writeback.
fn put(file: &File, path: &Path, data: &[u8], at: u64, writeback: bool) -> Result<()> {
    write_at(file, path, data, at)?;
    if writeback {
        start_writeback(file, at, data.len());
    }
    Ok(())
}

#[cfg(unix)]
fn write_at(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
        .map_err(|e| Error::io(path, e))
}

#[cfg(windows)]
fn write_at(file: &File, path: &Path, mut data: &[u8], mut offset: u64) -> Result<()> {
    use std::os::windows::fs::FileExt;
    while !data.is_empty() {
        let n = file
            .seek_write(data, offset)
            .map_err(|e| Error::io(path, e))?;
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_canonical_and_aligned() {
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: DType::F16,
                shape: vec![3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![1],
            },
            TensorSpec {
                name: "c".into(),
                dtype: DType::I64,
                shape: vec![1],
            },
        ];
        let mut md = BTreeMap::new();
        md.insert("z".to_string(), "1".to_string());
        md.insert("a".to_string(), "\"q\"".to_string());
        let FileLayout { header: h, ranges } = layout(&specs, &md).unwrap();
        assert_eq!(h.len() % 8, 0);
        let json = std::str::from_utf8(&h[8..]).unwrap().trim_end();
        assert_eq!(
            json,
            r#"{"__metadata__":{"a":"\"q\"","z":"1"},"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"b":{"dtype":"F16","shape":[3],"data_offsets":[12,18]},"c":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#
        );
        assert_eq!(ranges, vec![(12, 18), (8, 12), (0, 8)]);
    }

    #[test]
    fn creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/out.safetensors");
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::U8,
            shape: vec![1],
        };
        let w = SafetensorsWriter::create(&dest, vec![spec], &BTreeMap::new(), false).unwrap();
        w.write("x", &[1]).unwrap();
        assert_eq!(w.finish().unwrap().0, dest);
        assert!(dest.exists());
    }

    #[test]
    fn parts_written_by_the_io_thread_land_in_place() {
        // Two tensors of 3 MiB (large enough to start their writeback), written in 64 KiB
        // parts by four threads through the I/O thread, reusing its buffers; read back whole.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.safetensors");
        let n = 3 << 20;
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![n],
        };
        let specs = vec![spec("p"), spec("q")];
        let w = SafetensorsWriter::create(&dest, specs, &BTreeMap::new(), false).unwrap();
        let byte = |name: &str, i: usize| (i * 7 + name.len() * 13 + i / 65536) as u8;
        let part = 1 << 16;
        std::thread::scope(|s| {
            for t in 0..4 {
                let w = &w;
                s.spawn(move || {
                    for (k, name) in ["p", "q"].iter().enumerate() {
                        for lo in (0..n).step_by(part).skip(t).step_by(4) {
                            let mut buf = w.part_buffer(part);
                            buf.iter_mut()
                                .enumerate()
                                .for_each(|(i, b)| *b = byte(name, lo + i) ^ k as u8);
                            w.write_part_owned(name, lo, buf).unwrap();
                        }
                    }
                });
            }
        });
        let err = w.write_part_owned("p", 0, vec![0; 8]).unwrap_err();
        assert!(err.to_string().contains("written twice"), "{err}");
        w.finish().unwrap();
        let bytes = std::fs::read(&dest).unwrap();
        let data = &bytes[bytes.len() - 2 * n..];
        for (k, name) in ["p", "q"].iter().enumerate() {
            let at = layout(&[spec("p"), spec("q")], &BTreeMap::new())
                .unwrap()
                .ranges[k]
                .0;
            for i in (0..n).step_by(4099) {
                assert_eq!(data[at + i], byte(name, i) ^ k as u8, "{name}[{i}]");
            }
        }
    }

    #[test]
    fn duplicate_names_rejected() {
        let s = TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![],
        };
        assert!(layout(&[s.clone(), s], &BTreeMap::new()).is_err());
    }
}
