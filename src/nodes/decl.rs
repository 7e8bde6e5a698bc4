//! What a node is as written: the fields of a recipe's `nodes:` entries (the serde types
//! behind both parsing and the JSON Schema). Each kind reads its own fields from a
//! [`NodeDecl`]; the nested ones (`extract_lora:`, `merge_loras:`, `generate:`, `xy:`)
//! declare theirs in their kind's file.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::dtype::{FloatType, Rounding};
use crate::merge::CalcMode;

use super::extract_lora::ExtractDecl;
use super::generate::GenerateDecl;
use super::merge_loras::MergeLorasDecl;
use super::xy::XyDecl;

/// A ratio: a number, a preset name, a comma-separated string or a list of per-block values.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RatioDecl {
    /// One value for every block.
    Number(f64),
    /// Per-block values (26 for SD1/SD2, 20 or 110 for SDXL).
    List(Vec<f64>),
    /// A preset name (`GRAD_V`) or comma-separated values.
    Text(String),
}

/// Include / Exclude of blocks and key substrings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterDecl {
    /// Block names and ranges (`IN00-IN05`), `VAE`, `Adjust`.
    #[serde(default)]
    pub blocks: String,
    /// Key substrings, comma or space separated.
    #[serde(default)]
    pub elements: String,
}

/// A build step: a merge (`merge: MODE`) or a save (`save: NODE`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeDecl {
    /// Merge method: SuperMerger's weight_sum, add_difference, triple_sum, sum_twice (with
    /// `a`, `b`, `c`), or a list method (linear, slerp, task_arithmetic, ties, dare, ...,
    /// with `inputs`); `mergesmith methods` lists them.
    #[serde(default)]
    #[schemars(with = "Option<crate::merge::method::MethodNames>")]
    pub merge: Option<Spanned<String>>,
    /// List methods: the base model the deltas are taken from (a model or node name).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub base: Option<Spanned<String>>,
    /// List methods: the inputs, each `model: NAME` (a full model) or `delta: NAME`
    /// (NAME - base, or NAME - `minus`), with a `weight` where the method takes one.
    #[serde(default)]
    #[schemars(with = "Vec<InputDecl>")]
    pub inputs: Vec<Spanned<InputDecl>>,
    /// List methods: the method's parameters (`mergesmith methods` lists them).
    #[serde(default)]
    #[schemars(with = "Option<crate::merge::method::ParameterMap>")]
    pub parameters: BTreeMap<String, Spanned<crate::merge::method::Written>>,
    /// Model A: a model or node name.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub a: Option<Spanned<String>>,
    /// Model B.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub b: Option<Spanned<String>>,
    /// Model C (add_difference, triple_sum, sum_twice).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub c: Option<Spanned<String>>,
    /// Weight of B.
    #[serde(default)]
    #[schemars(with = "Option<RatioDecl>")]
    pub alpha: Option<Spanned<RatioDecl>>,
    /// Weight of C (triple_sum, sum_twice; tensor, tensor2, extract).
    #[serde(default)]
    #[schemars(with = "Option<RatioDecl>")]
    pub beta: Option<Spanned<RatioDecl>>,
    /// SuperMerger calcmode (normal, cosineA, ..., plus random).
    #[serde(default)]
    #[schemars(with = "Option<CalcMode>")]
    pub calcmode: Option<Spanned<CalcMode>>,
    /// extract's gamma (default 0.3).
    #[serde(default)]
    pub gamma: Option<f64>,
    /// Seed of random calcmodes.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Elemental merge entries `blocks:elements:ratio`.
    #[serde(default)]
    pub elemental: Option<String>,
    /// Read SDXL elemental block names shifted, as SuperMerger reads them (M00 as IN09,
    /// OUT00 as IN10, OUT03 as OUT00...).
    #[serde(default)]
    pub xl_elemental_shift: bool,
    /// The arithmetic: `f32` (default: f32, rounded once) or `supermerger` (SuperMerger's
    /// own roundings and output dtypes, so its merges are rebuilt bit for bit).
    #[serde(default)]
    pub numerics: Option<crate::merge::numerics::Numerics>,
    /// SuperMerger's dice ("Let the dice roll"): the seed and limits that draw the `R`, `U`,
    /// `X`, `D`, `ER`, `EU`, `EX` tokens of alpha / beta vectors (`ALL_R`...) and `R`/`U`/`X`
    /// elemental ratios, as SuperMerger draws them.
    #[serde(default)]
    pub dice: Option<crate::merge::dice::Dice>,
    /// The block list that per-block weights name (`supermerger`, `comfyui`, `extended`...);
    /// default: the one whose length the vector has.
    #[serde(default)]
    pub block_list: Option<String>,
    /// Merge only these blocks / keys.
    #[serde(default)]
    pub include: Option<FilterDecl>,
    /// Never merge these blocks / keys.
    #[serde(default)]
    pub exclude: Option<FilterDecl>,
    /// Adjust: IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3.
    #[serde(default)]
    #[schemars(with = "Option<Vec<f64>>")]
    pub adjust: Option<Spanned<Vec<f64>>>,
    /// Output type of float tensors.
    #[serde(default)]
    pub dtype: Option<FloatType>,
    /// How fp8 outputs round: `nearest` (even; default) or `stochastic` (seeded by `seed`).
    #[serde(default)]
    pub rounding: Option<Rounding>,
    /// Write scaled fp8 (ComfyUI's `scaled_fp8` + per-layer `scale_weight`), also from a
    /// plain input: the diffusion model's linear weights in the fp8 type, the rest as A.
    #[serde(default)]
    pub scaled: bool,
    /// Keep only UNet, VAE and text-encoder tensors.
    #[serde(default)]
    pub prune: bool,
    /// Rewrite CLIP position_ids as 0..76.
    #[serde(default)]
    pub reset_position_ids: bool,
    /// Replace the VAE with this model's tensors (a model name).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub bake_vae: Option<Spanned<String>>,
    /// Save: the node whose result is written.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub save: Option<Spanned<String>>,
    /// Save: destination file, relative to the recipe.
    #[serde(default)]
    pub to: Option<String>,
    /// Save: replace a file that mergesmith did not write itself.
    #[serde(default)]
    pub overwrite: bool,
    /// Save: how the file is made from the cached result: `copy` (default; a reflink where
    /// the filesystem supports it) or `hardlink` (shares the cache's read-only file).
    #[serde(default)]
    pub link: Option<Link>,
    /// Merge or LoRA: where the result is kept: `disk` (default, in the cache) or `memory`
    /// (only for this build, when something that needs it is out of date; never on disk).
    #[serde(default)]
    pub cache: Option<Keep>,
    /// LoRA: the checkpoint (a model or node) the LoRAs of `apply` are baked into.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub lora: Option<Spanned<String>>,
    /// LoRA: the LoRA files (declared under `models`) with strength and block weights.
    #[serde(default)]
    pub apply: Vec<LoraUseDecl>,
    /// LoRA: weight of blocks a short block-weight vector leaves out (default 0).
    #[serde(default)]
    pub fill: Option<f64>,
    /// LoRA: skip modules that match no weight of the checkpoint instead of failing.
    #[serde(default)]
    pub allow_unmatched: bool,
    /// Extract a LoRA from the difference `alpha·A − beta·B` of two checkpoints.
    #[serde(default)]
    #[schemars(with = "Option<ExtractDecl>")]
    pub extract_lora: Option<Spanned<ExtractDecl>>,
    /// Merge LoRAs into one.
    #[serde(default)]
    #[schemars(with = "Option<MergeLorasDecl>")]
    pub merge_loras: Option<Spanned<MergeLorasDecl>>,
    /// Generate images from a checkpoint (a model or node); `to: DIR` also writes them there.
    #[serde(default)]
    #[schemars(with = "Option<GenerateDecl>")]
    pub generate: Option<Spanned<GenerateDecl>>,
    /// An XY(Z) sweep of a generate node: comparison grids; `to: DIR` also writes them there.
    #[serde(default)]
    #[schemars(with = "Option<XyDecl>")]
    pub xy: Option<Spanned<XyDecl>>,
}

/// One input of a list merge.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputDecl {
    /// A full model (a model or node name).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub model: Option<Spanned<String>>,
    /// A delta: this model minus the base (or minus `minus`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub delta: Option<Spanned<String>>,
    /// What a delta subtracts (default: the base).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub minus: Option<Spanned<String>>,
    /// Its weight: a number, a preset or one value per block (methods that weight inputs).
    #[serde(default)]
    #[schemars(with = "Option<RatioDecl>")]
    pub weight: Option<Spanned<RatioDecl>>,
}

/// One LoRA of a `lora` or `merge_loras` node.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraUseDecl {
    /// The LoRA: a file under `models`, or an `extract_lora` / `merge_loras` node.
    #[schemars(with = "String")]
    pub file: Spanned<String>,
    /// Strength (default 1): a number or a `$var`.
    #[serde(default)]
    #[schemars(with = "Option<RatioDecl>")]
    pub strength: Option<Spanned<RatioDecl>>,
    /// Block weights: 17/26 values (SD1/SD2), 12/20 (SDXL), or a preset (OUTD, ...).
    #[serde(default)]
    pub blocks: Option<String>,
}

/// How a save node makes its file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// A copy of the cached result (a reflink where the filesystem supports it).
    #[default]
    Copy,
    /// A hard link to the cache's file, made read-only.
    Hardlink,
}

/// Where a merge node's result is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// In the cache, across builds.
    #[default]
    Disk,
    /// In memory, for one build only.
    Memory,
}

/// The flat node fields a declaration sets (the kind keys aside), by name.
pub fn set_fields(d: &NodeDecl) -> Vec<&'static str> {
    [
        ("a", d.a.is_some()),
        ("b", d.b.is_some()),
        ("c", d.c.is_some()),
        ("base", d.base.is_some()),
        ("inputs", !d.inputs.is_empty()),
        ("parameters", !d.parameters.is_empty()),
        ("alpha", d.alpha.is_some()),
        ("beta", d.beta.is_some()),
        ("calcmode", d.calcmode.is_some()),
        ("gamma", d.gamma.is_some()),
        ("seed", d.seed.is_some()),
        ("elemental", d.elemental.is_some()),
        ("xl_elemental_shift", d.xl_elemental_shift),
        ("numerics", d.numerics.is_some()),
        ("dice", d.dice.is_some()),
        ("block_list", d.block_list.is_some()),
        ("include", d.include.is_some()),
        ("exclude", d.exclude.is_some()),
        ("adjust", d.adjust.is_some()),
        ("dtype", d.dtype.is_some()),
        ("rounding", d.rounding.is_some()),
        ("scaled", d.scaled),
        ("prune", d.prune),
        ("reset_position_ids", d.reset_position_ids),
        ("bake_vae", d.bake_vae.is_some()),
        ("to", d.to.is_some()),
        ("overwrite", d.overwrite),
        ("link", d.link.is_some()),
        ("cache", d.cache.is_some()),
        ("apply", !d.apply.is_empty()),
        ("fill", d.fill.is_some()),
        ("allow_unmatched", d.allow_unmatched),
    ]
    .into_iter()
    .filter_map(|(f, set)| set.then_some(f))
    .collect()
}
