//! The merge engine: SuperMerger's merge modes with per-block weights, planned key by key
//! and executed as a stream over memory-mapped inputs (supermerger.md §1, §3, §6.2).
//!
//! [`plan`] decides, before any tensor math, what each output tensor is (copied from A, B,
//! C or a VAE file, or blended with its block's alpha/beta) and rejects architecture or
//! shape mismatches with the key and both shapes. [`engine::execute`] then computes the
//! tensors in parallel chunks and streams them into the output file.

pub mod calc;
pub mod candle_ops;
pub mod dice;
pub mod engine;
pub mod kernels;
pub mod metadata;
pub mod method;
pub mod multi;
pub mod numerics;
pub mod plan;
pub mod select;
pub mod weights;

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::dtype::{FloatType, Rounding};
use crate::error::Result;
use crate::hashing::HashMemo;
use crate::merge::metadata::InputRecord;
use crate::merge::plan::Inputs;
pub use calc::CalcMode;
pub use plan::{plan, KeyPlan, Op, Plan, Source};
pub use select::FilterMode;
pub use weights::{BlockRatio, Presets, Ratio};

/// How the models are combined. `alpha` is always the weight of model B.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `(1-alpha)*A + alpha*B`.
    WeightSum,
    /// `A + alpha*(B - C)`.
    AddDifference,
    /// `(1-alpha-beta)*A + alpha*B + beta*C`.
    TripleSum,
    /// `(1-beta)*((1-alpha)*A + alpha*B) + beta*C`.
    SumTwice,
}

impl crate::text::Named for Mode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("weight_sum", Mode::WeightSum),
        ("weight-sum", Mode::WeightSum),
        ("add_difference", Mode::AddDifference),
        ("add-difference", Mode::AddDifference),
        ("triple_sum", Mode::TripleSum),
        ("triple-sum", Mode::TripleSum),
        ("sum_twice", Mode::SumTwice),
        ("sum-twice", Mode::SumTwice),
    ];
}

impl Mode {
    /// The mode with SuperMerger's UI label (`Weight sum`, `Add difference`, ...).
    pub fn from_label(label: &str) -> Option<Mode> {
        <Mode as crate::text::Named>::NAMES
            .iter()
            .map(|(_, m)| *m)
            .find(|m| m.label() == label)
    }

    /// Whether the mode reads model C.
    pub fn uses_c(self) -> bool {
        !matches!(self, Mode::WeightSum)
    }

    /// Whether the mode has a beta ratio.
    pub fn uses_beta(self) -> bool {
        matches!(self, Mode::TripleSum | Mode::SumTwice)
    }

    /// SuperMerger's UI label (written to `sd_merge_recipe`).
    pub fn label(self) -> &'static str {
        match self {
            Mode::WeightSum => "Weight sum",
            Mode::AddDifference => "Add difference",
            Mode::TripleSum => "Triple sum",
            Mode::SumTwice => "sum Twice",
        }
    }

    /// The formula as SuperMerger's history writes it.
    pub fn formula(self) -> &'static str {
        match self {
            Mode::WeightSum => "A*(1-alpha)+B*alpha",
            Mode::AddDifference => "A+(B-C)*alpha",
            Mode::TripleSum => "A*(1-alpha-beta)+B*alpha+C*beta",
            Mode::SumTwice => "(A*(1-alpha)+B*alpha)*(1-beta)+C*beta",
        }
    }
}

/// Everything that defines a merge besides its input files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSpec {
    /// Merge mode.
    pub mode: Mode,
    /// Weight of model B: scalar or per block.
    pub alpha: Ratio,
    /// Weight of model C for triple_sum / sum_twice.
    pub beta: Option<Ratio>,
    /// Per-element calculation.
    pub calcmode: CalcMode,
    /// extract's gamma (sharpness of the similarity weighting; SuperMerger's default 0.3).
    pub gamma: f64,
    /// Seed of random calcmodes (`plus random`) and of stochastic rounding.
    pub seed: u64,
    /// Output type of float tensors (default: each tensor keeps model A's type).
    pub dtype: Option<FloatType>,
    /// How fp8 outputs are rounded (nearest even, or stochastic from `seed`); written into
    /// keys and metadata only when not the default, so older keys stay valid.
    #[serde(skip_serializing_if = "Rounding::is_nearest")]
    pub rounding: Rounding,
    /// Write scaled fp8 (ComfyUI's `scaled_fp8` + per-layer `scale_weight`) even from a plain
    /// input: the diffusion model's linear weights in the fp8 type, the rest as A stores it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub scaled: bool,
    /// Keep only UNet, VAE and text-encoder keys (drops EMA and schedule buffers).
    pub prune: bool,
    /// Rewrite CLIP `position_ids` as int64 `0..n` (fixes files with broken ids).
    pub reset_position_ids: bool,
    /// Elemental merge text: `blocks:elements:ratio` entries overriding alpha per key.
    pub elemental: Option<String>,
    /// Compatibility: address SDXL blocks in elemental entries with SuperMerger's shifted
    /// names (XL M00 as "IN09", OUT03 as "OUT00", ...).
    pub xl_elemental_shift: bool,
    /// The block list per-block vectors, elemental entries and Include/Exclude use
    /// (`supermerger`, `comfyui`, `extended`...; none: told by the vector's length).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_list: Option<String>,
    /// Include / Exclude filter.
    pub filter: Option<FilterSpec>,
    /// Adjust vector (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3).
    pub adjust: Option<[f64; 8]>,
    /// SuperMerger's dice: the seed and limits that random elemental ratios (`R`, `U`, `X`)
    /// are drawn with (block-vector tokens are resolved when the merge is read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dice: Option<dice::Dice>,
    /// The arithmetic: f32 rounded once (default) or SuperMerger's, bit for bit.
    #[serde(skip_serializing_if = "numerics::Numerics::is_default")]
    pub numerics: numerics::Numerics,
    /// Replace the VAE with the tensors of this file (recorded by name and hash, not path).
    #[serde(skip)]
    pub bake_vae: Option<PathBuf>,
}

impl MergeSpec {
    /// A plain merge: normal calcmode, A's dtypes, nothing pruned or replaced.
    pub fn new(mode: Mode, alpha: Ratio, beta: Option<Ratio>) -> Self {
        MergeSpec {
            mode,
            alpha,
            beta,
            calcmode: CalcMode::Normal,
            gamma: method::supermerger::GAMMA_DEFAULT,
            seed: 0,
            dtype: None,
            rounding: Rounding::Nearest,
            scaled: false,
            prune: false,
            reset_position_ids: false,
            elemental: None,
            xl_elemental_shift: false,
            block_list: None,
            filter: None,
            adjust: None,
            dice: None,
            numerics: numerics::Numerics::F32,
            bake_vae: None,
        }
    }
}

/// Include / Exclude as written by the user (parsed against the model's block list).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FilterSpec {
    /// Include or Exclude.
    pub mode: select::FilterMode,
    /// Block names, ranges, `VAE`, `Adjust`.
    pub blocks: String,
    /// Element substrings.
    pub elements: String,
}

/// How a merge runs (nothing here changes which tensors it computes).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace the output file if it exists.
    pub overwrite: bool,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Where the arithmetic runs.
    pub device: crate::device::ComputeDevice,
}

/// Input files of a merge.
#[derive(Debug, Clone)]
pub struct MergeFiles<'a> {
    /// Model A.
    pub a: &'a Path,
    /// Model B.
    pub b: &'a Path,
    /// Model C.
    pub c: Option<&'a Path>,
}

/// A planned merge with its inputs open. Nothing is written until [`Prepared::execute`]
/// (or [`engine::write`] with a writer of the caller's choice).
pub struct Prepared {
    a: Checkpoint,
    b: Checkpoint,
    c: Option<Checkpoint>,
    vae: Option<Checkpoint>,
    /// What each output tensor will be.
    pub plan: Plan,
}

impl Prepared {
    /// Opens the inputs and plans the merge. Nothing is written.
    pub fn new(files: &MergeFiles, spec: &MergeSpec) -> Result<Prepared> {
        let a = Checkpoint::open(files.a)?;
        let b = Checkpoint::open(files.b)?;
        let c = files.c.map(Checkpoint::open).transpose()?;
        let vae = spec.bake_vae.as_deref().map(Checkpoint::open).transpose()?;
        Prepared::from_checkpoints(a, b, c, vae, spec)
    }

    /// Plans the merge of inputs that are already open (files or composed results).
    pub fn from_checkpoints(
        a: Checkpoint,
        b: Checkpoint,
        c: Option<Checkpoint>,
        vae: Option<Checkpoint>,
        spec: &MergeSpec,
    ) -> Result<Prepared> {
        let inputs = Inputs {
            a: &a,
            b: &b,
            c: c.as_ref(),
            vae: vae.as_ref(),
        };
        let plan = plan::plan(&inputs, spec)?;
        Ok(Prepared { a, b, c, vae, plan })
    }

    /// The opened inputs.
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            a: &self.a,
            b: &self.b,
            c: self.c.as_ref(),
            vae: self.vae.as_ref(),
        }
    }

    /// Hashes the inputs (through the memo) for the metadata and writes the merged model.
    pub fn execute(
        &self,
        files: &MergeFiles,
        spec: &MergeSpec,
        out: &Path,
        memo: &HashMemo,
        run: &RunOptions,
    ) -> Result<engine::MergeReport> {
        let hash = |p: &Path| memo.hashes(p).map(|(h, _)| h);
        let (ha, hb) = (hash(files.a)?, hash(files.b)?);
        let hc = files.c.map(hash).transpose()?;
        let hv = spec.bake_vae.as_deref().map(hash).transpose()?;
        let record = |path, hashes| InputRecord { path, hashes };
        let md = metadata::build(
            spec,
            &self.plan,
            record(files.a, &ha),
            record(files.b, &hb),
            files.c.zip(hc.as_ref()).map(|(p, h)| record(p, h)),
            spec.bake_vae
                .as_deref()
                .zip(hv.as_ref())
                .map(|(p, h)| record(p, h)),
        );
        engine::execute(&self.plan, &self.inputs(), spec, out, &md, run)
    }
}

/// Opens the inputs, plans, hashes them (through the memo) for the metadata, and writes the
/// merged model to `out`. Nothing is written if planning fails.
pub fn merge_files(
    files: &MergeFiles,
    spec: &MergeSpec,
    out: &Path,
    memo: &HashMemo,
    run: &RunOptions,
) -> Result<(Plan, engine::MergeReport)> {
    let prepared = Prepared::new(files, spec)?;
    let report = prepared.execute(files, spec, out, memo, run)?;
    Ok((prepared.plan, report))
}
