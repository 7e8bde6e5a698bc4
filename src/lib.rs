//! mergesmith: Stable Diffusion model merging as a reproducible, incremental build.
//!
//! The library is organized in layers; the `mergesmith` binary is a thin shell over it
//! (see `docs/architecture.md`):
//! - [`checkpoint`]: memory-mapped safetensors / PyTorch checkpoint reading and a streaming,
//!   crash-safe safetensors writer;
//! - [`arch`]: architecture detection, key classification into components and MBW blocks,
//!   reference layouts;
//! - [`convert`]: float storage conversions with correct rounding;
//! - [`merge`]: the merge engine (modes, block weights, planning, streaming execution);
//! - [`lora`]: LoRA files, baking, extraction and merging;
//! - [`gen`]: generation (in progress: SD1 text to image, PNG output);
//! - [`synth`]: synthetic checkpoints with the real layouts, for tests and benchmarks;
//! - [`hashing`]: blake3 / SHA-256 / AUTOMATIC1111 hashes with a memo;
//! - [`inspect`]: the `inspect` report.

#![warn(missing_docs)]

pub mod arch;
pub mod build;
pub mod checkpoint;
pub mod cli;
pub mod convert;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gen;
pub mod hashing;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod noise;
pub mod progress;
pub mod recipe;
pub mod remote;
pub mod report;
pub mod synth;

pub use error::{Error, Result};
