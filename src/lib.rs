//! mergesmith: Stable Diffusion model merging as a reproducible, incremental build.
//!
//! The library is organized in layers, each importing only its own layer and those below
//! (`docs/architecture.md`; a test checks it); the `mergesmith` binary (`src/cli/`, clap) is
//! a thin shell over it:
//! - vocabulary: [`dtype`], [`error`], [`progress`], [`noise`], [`text`];
//! - checkpoint I/O: [`checkpoint`] (memory-mapped reading, a streaming crash-safe writer),
//!   [`convert`] (float storage conversions), [`hashing`] (blake3 / SHA-256 / A1111 hashes),
//!   [`device`];
//! - [`arch`]: architecture detection, key classification into components and blocks;
//! - engines: [`merge`], [`lora`], [`gen`], [`synth`], [`inspect`];
//! - [`recipe`]: YAML recipes, validated, with sweeps;
//! - [`store`]: the content-addressed cache (every cache path), packs, remote caches;
//! - [`build`]: node keys, planning and incremental execution;
//! - [`report`]: static HTML reports.

#![warn(missing_docs)]

pub mod arch;
pub mod build;
pub mod checkpoint;
pub mod convert;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gen;
pub mod hashing;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod nodes;
pub mod noise;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod store;
pub mod synth;
pub mod text;

pub use error::{Error, Result};
