//! Error types: every error names the file (or key) it concerns and what was expected.

use std::path::{Path, PathBuf};

use crate::dtype::DType;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mergesmith's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed safetensors file.
    #[error("{}: not a valid safetensors file: {kind}", path.display())]
    Safetensors {
        /// The offending file.
        path: PathBuf,
        /// What exactly is wrong.
        kind: HeaderError,
    },
    /// A PyTorch pickle checkpoint that cannot be read safely.
    #[error("{}: cannot read PyTorch checkpoint: {msg}", path.display())]
    Pickle {
        /// The offending file.
        path: PathBuf,
        /// What exactly is wrong.
        msg: String,
    },
    /// Refusing to replace a file the user did not ask to overwrite.
    #[error("{}: already exists (pass --overwrite to replace it)", path.display())]
    OutputExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A tensor name that a file does not contain.
    #[error("{}: no tensor named `{name}`", path.display())]
    MissingTensor {
        /// The file searched.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The build was stopped (by `watch`, after a newer edit).
    #[error("cancelled: a newer edit replaces this build")]
    Cancelled,
    /// Invalid input that is not tied to a file (bad option values, inconsistent requests).
    #[error("{0}")]
    Invalid(String),
    /// A build step or a check failed (exit code 1).
    #[error("{0}")]
    Failed(String),
    /// A remote cache failed (credentials never appear in the message).
    #[error("remote {url}: {msg}")]
    Remote {
        /// The remote (without credentials).
        url: String,
        /// What went wrong.
        msg: String,
    },
    /// Errors in an input file (a recipe), each with its position.
    #[error("{0}")]
    Recipe(Box<dyn Located>),
}

/// Errors found at positions of an input file, which can show themselves with the lines
/// they point at (recipe errors are).
pub trait Located: std::fmt::Display + std::fmt::Debug + Send + Sync {
    /// Every error with its file:line:column, the lines around it and what was expected.
    fn render(&self) -> String;
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The precise fault found in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes: not even the header length is there.
    #[error("file is {len} bytes long, too short for the 8-byte header length (truncated?)")]
    TooShort {
        /// File length in bytes.
        len: u64,
    },
    /// The header length is beyond the sanity limit; refusing to allocate it.
    #[error("header length {header_len} exceeds the {limit}-byte limit")]
    HeaderTooLarge {
        /// Declared header length.
        header_len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header length points past the end of the file.
    #[error("header length {header_len} is larger than the {available} bytes that follow it (truncated?)")]
    HeaderBeyondFile {
        /// Declared header length.
        header_len: u64,
        /// Bytes after the 8-byte prefix.
        available: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not valid UTF-8")]
    InvalidUtf8,
    /// The header is not valid JSON.
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    /// The header JSON is not an object.
    #[error("header JSON must be an object mapping tensor names to entries")]
    NotAnObject,
    /// A tensor name appears twice.
    #[error("tensor `{0}` appears twice in the header")]
    DuplicateKey(String),
    /// A tensor entry lacks a field or has the wrong type.
    #[error("tensor `{name}`: {reason}")]
    BadEntry {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A dtype name that safetensors does not define.
    #[error("tensor `{name}`: unknown dtype `{dtype}`")]
    UnknownDtype {
        /// Tensor name.
        name: String,
        /// The dtype string found.
        dtype: String,
    },
    /// `__metadata__` is not a map of strings.
    #[error("`__metadata__`: {0}")]
    BadMetadata(String),
    /// The element count times the dtype size does not fit in memory sizes.
    #[error("tensor `{name}`: shape {shape:?} is too large")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
    },
    /// The byte range does not match dtype x shape.
    #[error(
        "tensor `{name}`: {dtype} {shape:?} needs {expected} bytes but data_offsets span {actual}"
    )]
    SizeMismatch {
        /// Tensor name.
        name: String,
        /// Declared dtype.
        dtype: DType,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype and shape.
        expected: usize,
        /// Bytes covered by data_offsets.
        actual: usize,
    },
    /// `data_offsets` with begin > end.
    #[error("tensor `{name}`: data_offsets [{begin}, {end}] are reversed")]
    InvertedRange {
        /// Tensor name.
        name: String,
        /// Start offset.
        begin: usize,
        /// End offset.
        end: usize,
    },
    /// A tensor starts beyond the end of the data section.
    #[error("tensor `{name}`: data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section")]
    OutOfBounds {
        /// Tensor name.
        name: String,
        /// Start offset.
        begin: usize,
        /// End offset.
        end: usize,
        /// Length of the data section.
        data_len: usize,
    },
    /// The last tensor runs past the end of the file: the file was cut short.
    #[error("file is truncated: tensor `{name}` ends at data byte {end} but the data section has only {data_len} bytes")]
    Truncated {
        /// The tensor that is cut.
        name: String,
        /// Where it should end.
        end: usize,
        /// Length of the data section.
        data_len: usize,
    },
    /// Two tensors share bytes.
    #[error("tensors `{first}` and `{second}` have overlapping data ranges")]
    Overlap {
        /// The earlier tensor.
        first: String,
        /// The tensor overlapping it.
        second: String,
    },
    /// Unused bytes between tensors (the format forbids holes).
    #[error("unused bytes {from}..{to} in the data section before tensor `{next}`")]
    Gap {
        /// Start of the hole.
        from: usize,
        /// End of the hole.
        to: usize,
        /// The tensor after the hole.
        next: String,
    },
    /// Bytes after the last tensor.
    #[error("{extra} unused bytes after the last tensor")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
}
