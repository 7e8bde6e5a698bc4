//! Recipe files (YAML, format version 1): models, merge and save nodes.
//!
//! The serde types below are the single source of truth: they parse recipes (with
//! serde-saphyr, which keeps line/column spans) and generate the JSON Schema in
//! `schema/recipe.v1.json` for editors. [`load`] parses a file, checks every reference and
//! option, and returns either a [`Recipe`] or all the errors found, each pointing at its
//! place in the file.

pub mod diagnostics;
pub mod import;
pub mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::dtype::FloatType;
use crate::lora::extract::ExtractOptions;
use crate::lora::merge::{MergeMode, MergeOptions};
use crate::merge::select::FilterMode;
use crate::merge::{CalcMode, FilterSpec, MergeSpec, Mode, Presets, Ratio};
pub use diagnostics::{RecipeError, RecipeErrors};

/// The newest recipe format version.
pub const VERSION: u32 = 1;

/// A recipe file as written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "mergesmith recipe",
    description = "Stable Diffusion merges as a reproducible build"
)]
pub struct RecipeFile {
    /// Format version: 1.
    #[schemars(with = "u32")]
    pub version: Spanned<u32>,
    /// Input checkpoints by name.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ModelDecl>")]
    pub models: BTreeMap<String, Spanned<ModelDecl>>,
    /// Named build steps.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, NodeDecl>")]
    pub nodes: BTreeMap<String, Spanned<NodeDecl>>,
    /// Extra MBW preset files (`NAME<TAB>v1,...` per line), relative to the recipe.
    #[serde(default)]
    pub presets: Vec<String>,
    /// Other recipe files whose models, vars, presets and nodes join this one (paths relative
    /// to this file; names must not repeat).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub include: Vec<Spanned<String>>,
    /// Named ratios (a number, a preset name, "v1,v2,..." or a list) that `alpha` and `beta`
    /// refer to as `$name`; `mergesmith build --set name=value` overrides one.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, RatioDecl>")]
    pub vars: BTreeMap<String, Spanned<RatioDecl>>,
    /// The CLIP `tokenizer.json` generate nodes use (relative to the recipe); default:
    /// `--tokenizer`, `$MERGESMITH_TOKENIZER`, or the Hugging Face hub cache.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

/// An input checkpoint.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// Path of the file, relative to the recipe.
    pub path: String,
    /// Expected SHA-256 of the file (checked before building).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Expected AUTOMATIC1111 short hash (first 10 hex digits of the SHA-256; checked).
    #[serde(default)]
    pub autov2: Option<String>,
}

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
    /// Merge mode: weight_sum, add_difference, triple_sum or sum_twice.
    #[serde(default)]
    #[schemars(with = "Option<Mode>")]
    pub merge: Option<Spanned<Mode>>,
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
    /// Read SDXL elemental block names as SuperMerger's old shifted names.
    #[serde(default)]
    pub xl_elemental_shift: bool,
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
    #[schemars(with = "Option<sweep::XyDecl>")]
    pub xy: Option<Spanned<sweep::XyDecl>>,
}

/// A `generate` node's parameters (the web UI's txt2img settings).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateDecl {
    /// The checkpoint: a model or node.
    #[schemars(with = "String")]
    pub model: Spanned<String>,
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    #[serde(default)]
    pub negative: String,
    /// Sampling steps (default 20).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub steps: Option<Spanned<usize>>,
    /// Guidance scale (default 7).
    #[serde(default)]
    pub cfg: Option<f64>,
    /// Sampler: euler_a (default), euler, ddim, dpmpp_2m.
    #[serde(default)]
    pub sampler: Option<crate::gen::sampler::Sampler>,
    /// Seed of the first image (default 0).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Images, of seeds seed, seed + 1, ... (default 1).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub batch: Option<Spanned<usize>>,
    /// Width in pixels, a multiple of 8 (default: the model's native size).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub width: Option<Spanned<usize>>,
    /// Height in pixels, a multiple of 8 (default: the width).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub height: Option<Spanned<usize>>,
    /// CLIP skip (SD1; default 1).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub clip_skip: Option<Spanned<usize>>,
    /// Hires fix: `{scale, steps, strength}`.
    #[serde(default)]
    #[schemars(with = "Option<crate::gen::png::Hires>")]
    pub hires: Option<Spanned<crate::gen::png::Hires>>,
    /// What the model predicts: epsilon or v (default: guessed from the file).
    #[serde(default)]
    pub prediction: Option<crate::gen::pipeline::Prediction>,
}

/// An `extract_lora` node's options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractDecl {
    /// The tuned checkpoint: a model or node.
    #[schemars(with = "String")]
    pub a: Spanned<String>,
    /// The base checkpoint: a model or node.
    #[schemars(with = "String")]
    pub b: Spanned<String>,
    /// Weight of A in the difference (default 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Weight of B in the difference (default 1).
    #[serde(default)]
    pub beta: Option<f64>,
    /// Rank of linear and 1x1 modules (default 128).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub rank: Option<Spanned<usize>>,
    /// Rank of 3x3 convolutions (LoCon); without it convolutions are left out.
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub conv_rank: Option<Spanned<usize>>,
    /// Text encoders whose largest change is at most this are left out (default 0.01).
    #[serde(default)]
    pub min_diff: Option<f64>,
    /// Quantile at which the factors are clamped (default 0.99; 1: no clamp).
    #[serde(default)]
    #[schemars(with = "Option<f64>")]
    pub clamp_quantile: Option<Spanned<f64>>,
    /// Float type of the LoRA's tensors (default fp32).
    #[serde(default)]
    pub dtype: Option<FloatType>,
}

/// A `merge_loras` node's options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeLorasDecl {
    /// The LoRAs (files under `models`, or LoRA nodes) with ratio (`strength`) and block
    /// weights.
    pub loras: Vec<LoraUseDecl>,
    /// `concat` (default: exact, LoRA / LoCon only) or `svd` (any type, re-factored at `rank`).
    #[serde(default)]
    pub mode: Option<MergeMode>,
    /// svd: rank of linear and 1x1 modules (default 64).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub rank: Option<Spanned<usize>>,
    /// svd: rank of 3x3 convolutions (default: `rank`).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub conv_rank: Option<Spanned<usize>>,
    /// svd: quantile at which the factors are clamped (default 0.99; 1: no clamp).
    #[serde(default)]
    #[schemars(with = "Option<f64>")]
    pub clamp_quantile: Option<Spanned<f64>>,
    /// Weight of blocks a short block-weight vector leaves out (default 0).
    #[serde(default)]
    pub fill: Option<f64>,
    /// Float type of the LoRA's tensors (default fp32).
    #[serde(default)]
    pub dtype: Option<FloatType>,
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

/// One LoRA baked by a `lora` node or merged by a `merge_loras` node.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraUse {
    /// The LoRA: a model (file) or a LoRA node.
    pub source: Input,
    /// Strength (merge_loras: ratio).
    pub strength: f64,
    /// Block weights as written (parsed against the checkpoint's family when built).
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

/// What a node reads: a model file or another node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// A declared model.
    Model(String),
    /// Another node.
    Node(String),
}

/// A validated node.
#[derive(Debug, Clone)]
pub enum Node {
    /// A merge.
    Merge {
        /// Inputs A, B and optionally C.
        inputs: Vec<Input>,
        /// The merge, ready for the engine (`bake_vae` unset: see `vae`).
        spec: Box<MergeSpec>,
        /// VAE model to bake in.
        vae: Option<String>,
        /// Keep the result in memory only (`cache: memory`).
        memory: bool,
    },
    /// LoRAs baked into a checkpoint.
    Lora {
        /// The checkpoint.
        input: Input,
        /// The LoRAs, in order.
        loras: Vec<LoraUse>,
        /// Weight of blocks a short vector leaves out.
        fill: f64,
        /// Skip modules that match nothing.
        allow_unmatched: bool,
        /// Keep the result in memory only (`cache: memory`).
        memory: bool,
    },
    /// A LoRA extracted from two checkpoints.
    ExtractLora {
        /// The tuned checkpoint (A).
        a: Input,
        /// The base checkpoint (B).
        b: Input,
        /// How it is extracted.
        options: ExtractOptions,
        /// Keep the result in memory only (`cache: memory`).
        memory: bool,
    },
    /// LoRAs merged into one.
    MergeLoras {
        /// The LoRAs, in order.
        loras: Vec<LoraUse>,
        /// How they are merged.
        options: MergeOptions,
        /// Weight of blocks a short vector leaves out.
        fill: f64,
        /// Keep the result in memory only (`cache: memory`).
        memory: bool,
    },
    /// Images generated from a checkpoint.
    Generate {
        /// The checkpoint.
        model: Input,
        /// What to generate.
        job: crate::gen::job::Job,
        /// A directory the images are also written to (absolute), as `NODE-SEED.png`.
        to: Option<PathBuf>,
        /// Replace files there that mergesmith did not write.
        overwrite: bool,
    },
    /// An XY(Z) sweep: comparison grids over its cells' generate nodes.
    Xy {
        /// Its grids (one per part and Z value), cells row-major.
        grids: Vec<sweep::Grid>,
        /// A directory the grids are also written to (absolute), as `GRID-bN.png`.
        to: Option<PathBuf>,
        /// Replace files there that mergesmith did not write.
        overwrite: bool,
    },
    /// Writing a node's result to a file.
    Save {
        /// The node saved.
        from: String,
        /// Destination (absolute, resolved against the recipe directory).
        to: PathBuf,
        /// Replace a file mergesmith did not write.
        overwrite: bool,
        /// How the file is made.
        link: Link,
    },
}

impl Node {
    /// The nodes this node reads.
    pub fn node_inputs(&self) -> Vec<&str> {
        match self {
            Node::Merge { inputs, .. } => inputs
                .iter()
                .filter_map(|i| match i {
                    Input::Node(n) => Some(n.as_str()),
                    Input::Model(_) => None,
                })
                .collect(),
            Node::Lora { input, loras, .. } => std::iter::once(input)
                .chain(loras.iter().map(|l| &l.source))
                .filter_map(Input::node)
                .collect(),
            Node::ExtractLora { a, b, .. } => [a, b].into_iter().filter_map(Input::node).collect(),
            Node::MergeLoras { loras, .. } => {
                loras.iter().filter_map(|l| l.source.node()).collect()
            }
            Node::Save { from, .. } => vec![from.as_str()],
            Node::Generate { model, .. } => model.node().into_iter().collect(),
            Node::Xy { grids, .. } => grids
                .iter()
                .flat_map(|g| g.cells.iter().map(String::as_str))
                .collect(),
        }
    }

    /// Renames the nodes it reads (for sweep cells, which copy nodes under a prefix).
    pub fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        let input = |i: &mut Input| {
            if let Input::Node(n) = i {
                *n = f(n);
            }
        };
        match self {
            Node::Merge { inputs, .. } => inputs.iter_mut().for_each(input),
            Node::Lora {
                input: i, loras, ..
            } => {
                input(i);
                loras.iter_mut().for_each(|l| input(&mut l.source));
            }
            Node::ExtractLora { a, b, .. } => {
                input(a);
                input(b);
            }
            Node::MergeLoras { loras, .. } => loras.iter_mut().for_each(|l| input(&mut l.source)),
            Node::Generate { model, .. } => input(model),
            Node::Xy { grids, .. } => grids
                .iter_mut()
                .for_each(|g| g.cells.iter_mut().for_each(|c| *c = f(c))),
            Node::Save { from, .. } => *from = f(from),
        }
    }

    /// Whether the node keeps its result in memory only.
    pub fn in_memory(&self) -> bool {
        matches!(
            self,
            Node::Merge { memory: true, .. }
                | Node::Lora { memory: true, .. }
                | Node::ExtractLora { memory: true, .. }
                | Node::MergeLoras { memory: true, .. }
        )
    }

    /// Whether the node's result is a LoRA (not a checkpoint).
    pub fn makes_lora(&self) -> bool {
        matches!(self, Node::ExtractLora { .. } | Node::MergeLoras { .. })
    }
}

impl Input {
    /// The node name, when this is a node.
    pub fn node(&self) -> Option<&str> {
        match self {
            Input::Node(n) => Some(n),
            Input::Model(_) => None,
        }
    }

    /// The model or node name.
    pub fn name(&self) -> &str {
        let (Input::Model(n) | Input::Node(n)) = self;
        n
    }
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Models by name, paths resolved against the recipe directory.
    pub models: BTreeMap<String, (PathBuf, Option<String>)>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Nodes in dependency order.
    pub order: Vec<String>,
    /// The tokenizer generate nodes use (`tokenizer:`, resolved), if the recipe names one.
    pub tokenizer: Option<PathBuf>,
}

/// Reads and validates a recipe file.
pub fn load(path: &Path) -> Result<Recipe, RecipeErrors> {
    load_with(path, &[])
}

/// Reads and validates a recipe file, with `vars` overridden by `sets` (name, value).
pub fn load_with(path: &Path, sets: &[(String, String)]) -> Result<Recipe, RecipeErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeErrors::io(path, &e))?;
    parse_with(path, &text, sets)
}

/// Parses and validates recipe text (`path` names it in errors and anchors relative paths).
pub fn parse(path: &Path, text: &str) -> Result<Recipe, RecipeErrors> {
    parse_with(path, text, &[])
}

/// One parsed file of a recipe (the recipe itself or an include).
struct Part {
    file: RecipeFile,
    dir: PathBuf,
}

/// Parses `text` and, depth first, the files it includes, into `parts` (source index =
/// part index). `stack` holds the canonical paths being read, to report include cycles.
fn read_parts(
    path: &Path,
    text: &str,
    parts: &mut Vec<Option<Part>>,
    errs: &mut RecipeErrors,
    stack: &mut Vec<PathBuf>,
) {
    let me = parts.len();
    parts.push(None);
    let file: RecipeFile = match serde_saphyr::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            errs.extend(RecipeErrors::yaml(path, text, &e));
            return;
        }
    };
    if file.version.value != VERSION {
        errs.at(me).push(
            &file.version.referenced,
            format!(
                "unsupported recipe version {}; this mergesmith reads version {VERSION}",
                file.version.value
            ),
            None,
        );
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    stack.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
    for inc in &file.include {
        let target = dir.join(&inc.value);
        let canon = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
        if stack.contains(&canon) {
            let chain: Vec<String> = stack
                .iter()
                .chain(std::iter::once(&canon))
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            errs.at(me).push(
                &inc.referenced,
                format!("include cycle: {}", chain.join(" -> ")),
                None,
            );
            continue;
        }
        match std::fs::read_to_string(&target) {
            Ok(t) => {
                errs.add_source(&target, &t);
                read_parts(&target, &t, parts, errs, stack);
            }
            Err(e) => errs.at(me).push(
                &inc.referenced,
                format!("cannot read included recipe {}: {e}", target.display()),
                None,
            ),
        }
    }
    stack.pop();
    parts[me] = Some(Part { file, dir });
}

/// A declaration and the part (file) it comes from.
struct Declared<'a, T> {
    part: usize,
    decl: &'a Spanned<T>,
}

/// What ratio fields can refer to: presets, and vars (as declared or set on the command line).
struct RatioScope<'a> {
    presets: Presets,
    vars: BTreeMap<String, Declared<'a, RatioDecl>>,
    sets: BTreeMap<String, String>,
}

fn parse_with(path: &Path, text: &str, sets: &[(String, String)]) -> Result<Recipe, RecipeErrors> {
    let mut errs = RecipeErrors::new(path, text);
    let mut parts = Vec::new();
    read_parts(path, text, &mut parts, &mut errs, &mut Vec::new());
    if parts[0].is_none() {
        return Err(errs.finish().expect_err("the recipe did not parse"));
    }
    let parts: Vec<(usize, Part)> = parts
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
        .collect();
    let mut presets = Presets::default();
    let mut models_decl: BTreeMap<String, Declared<ModelDecl>> = BTreeMap::new();
    let mut nodes_decl: BTreeMap<String, Declared<NodeDecl>> = BTreeMap::new();
    let mut vars: BTreeMap<String, Declared<RatioDecl>> = BTreeMap::new();
    let mut defined_in: BTreeMap<String, usize> = BTreeMap::new();
    for (i, part) in &parts {
        for p in &part.file.presets {
            if let Err(e) = presets.add_file(&part.dir.join(p)) {
                errs.at(*i).push_plain(e.to_string());
            }
        }
        let mut declare =
            |name: &String, loc: &serde_saphyr::Location, errs: &mut RecipeErrors| match defined_in
                .get(name)
            {
                Some(j) if j != i => {
                    let first = errs.source_path(*j).display().to_string();
                    errs.at(*i).push(
                        loc,
                        format!("`{name}` is already declared in {first}"),
                        None,
                    );
                    false
                }
                _ => {
                    defined_in.insert(name.clone(), *i);
                    true
                }
            };
        for (name, m) in &part.file.models {
            if declare(name, &m.referenced, &mut errs) {
                models_decl.insert(name.clone(), Declared { part: *i, decl: m });
            }
        }
        for (name, n) in &part.file.nodes {
            if declare(name, &n.referenced, &mut errs) {
                nodes_decl.insert(name.clone(), Declared { part: *i, decl: n });
            }
        }
        for (name, v) in &part.file.vars {
            match vars.get(name) {
                Some(prev) if prev.part != *i => {
                    let prev_path = errs.source_path(prev.part).to_path_buf();
                    errs.at(*i).push(
                        &v.referenced,
                        format!(
                            "var `{name}` is already declared in {}",
                            prev_path.display()
                        ),
                        None,
                    );
                }
                _ => {
                    vars.insert(name.clone(), Declared { part: *i, decl: v });
                }
            }
        }
    }
    errs.at(0);
    let mut set_map = BTreeMap::new();
    for (name, value) in sets {
        if vars.contains_key(name) {
            set_map.insert(name.clone(), value.clone());
        } else {
            let near = crate::text::nearest(name, vars.keys().map(|s| s.as_str()));
            errs.push_plain(format!(
                "--set {name}=...: the recipe declares no var `{name}`{}",
                near.map(|n| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default()
            ));
        }
    }
    let scope = RatioScope {
        presets,
        vars,
        sets: set_map,
    };
    let dir_of = |i: usize| -> &Path {
        parts
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, p)| p.dir.as_path())
            .unwrap_or(Path::new(""))
    };
    let models: BTreeMap<String, (PathBuf, Option<String>)> = models_decl
        .iter()
        .map(|(name, m)| {
            let v = &m.decl.value;
            (
                name.clone(),
                (
                    dir_of(m.part).join(&v.path),
                    v.sha256.clone().or_else(|| v.autov2.clone()),
                ),
            )
        })
        .collect();
    for name in models_decl.keys().filter(|n| nodes_decl.contains_key(*n)) {
        let n = &nodes_decl[name];
        errs.at(n.part).push(
            &n.decl.referenced,
            format!("`{name}` is both a model and a node"),
            None,
        );
    }
    let names: Vec<&str> = models_decl
        .keys()
        .chain(nodes_decl.keys())
        .map(|s| s.as_str())
        .collect();
    let lora_nodes: BTreeSet<&str> = nodes_decl
        .iter()
        .filter(|(_, n)| n.decl.value.extract_lora.is_some() || n.decl.value.merge_loras.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    let image_nodes: BTreeSet<&str> = nodes_decl
        .iter()
        .filter(|(_, n)| n.decl.value.generate.is_some() || n.decl.value.xy.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    let resolve = |r: &Spanned<String>, want: Want, errs: &mut RecipeErrors| -> Option<Input> {
        let found = if models_decl.contains_key(&r.value) {
            Input::Model(r.value.clone())
        } else if nodes_decl.contains_key(&r.value) {
            Input::Node(r.value.clone())
        } else {
            let near = crate::text::nearest(&r.value, names.iter().copied());
            errs.push(
                &r.referenced,
                format!("`{}` is not a model or node of this recipe", r.value),
                near.map(|n| format!("did you mean `{n}`?")),
            );
            return None;
        };
        let is_lora = found.node().is_some_and(|n| lora_nodes.contains(n));
        let wrong = match want {
            _ if found.node().is_some_and(|n| image_nodes.contains(n)) => Some(format!(
                "`{}` makes images, which nothing reads (its `to:` writes them out)",
                r.value
            )),
            Want::Any => None,
            Want::Checkpoint if is_lora => Some(format!(
                "`{}` makes a LoRA, not a checkpoint; bake it into one with a `lora` node",
                r.value
            )),
            Want::Lora if found.node().is_some() && !is_lora => Some(format!(
                "`{}` is a checkpoint node; this takes a LoRA: a file under `models`, or an \
                 `extract_lora` / `merge_loras` node",
                r.value
            )),
            _ => None,
        };
        match wrong {
            Some(msg) => {
                errs.push(&r.referenced, msg, None);
                None
            }
            None => Some(found),
        }
    };
    let mut nodes = BTreeMap::new();
    let mut sweeps = BTreeMap::new();
    for (name, declared) in &nodes_decl {
        let (decl, dir) = (declared.decl, dir_of(declared.part));
        errs.at(declared.part);
        let node = node(name, decl, dir, &scope, &resolve, &mut errs);
        if let Some(n) = node {
            nodes.insert(name.clone(), n);
        } else if let Some(xy) = &decl.value.xy {
            let to = decl.value.to.as_ref().map(|t| dir.join(t));
            sweeps.insert(name.clone(), (declared.part, xy, to, decl.value.overwrite));
        }
    }
    // Sweeps copy validated nodes into their cells.
    sweep::expand_all(&sweeps, &mut nodes, &scope, &resolve, &mut errs);
    let order = match topo_order(&nodes) {
        Ok(o) => o,
        Err(cycle) => {
            let first = &nodes_decl[&cycle[0]];
            errs.at(first.part).push(
                &first.decl.referenced,
                format!("nodes form a cycle: {}", cycle.join(" -> ")),
                None,
            );
            Vec::new()
        }
    };
    errs.finish()?;
    let tokenizer = parts
        .iter()
        .find_map(|(i, p)| p.file.tokenizer.as_ref().map(|t| dir_of(*i).join(t)));
    Ok(Recipe {
        path: path.to_path_buf(),
        models,
        nodes,
        order,
        tokenizer,
    })
}

/// Validates one node declaration: exactly one kind key, only the fields that kind takes,
/// then the kind's own checks.
fn node(
    name: &str,
    decl: &Spanned<NodeDecl>,
    dir: &Path,
    scope: &RatioScope,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let d = &decl.value;
    let kinds: Vec<&str> = [
        ("merge", d.merge.is_some()),
        ("save", d.save.is_some()),
        ("lora", d.lora.is_some()),
        ("extract_lora", d.extract_lora.is_some()),
        ("merge_loras", d.merge_loras.is_some()),
        ("generate", d.generate.is_some()),
        ("xy", d.xy.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    let Some(&kind) = kinds.first() else {
        errs.push(
            &decl.referenced,
            format!(
                "node `{name}` needs one of `merge: MODE`, `lora: MODEL`, `save: NODE`, \
                 `extract_lora: {{a, b}}`, `merge_loras: {{loras}}`, \
                 `generate: {{model, prompt}}` or `xy: {{generate, x}}`"
            ),
            None,
        );
        return None;
    };
    if kinds.len() > 1 {
        errs.push(
            &decl.referenced,
            format!(
                "node `{name}` is more than one of {}; split it",
                kinds.join(", ")
            ),
            None,
        );
        return None;
    }
    let allowed: &[&str] = match kind {
        "merge" => &[
            "a",
            "b",
            "c",
            "alpha",
            "beta",
            "calcmode",
            "gamma",
            "seed",
            "elemental",
            "xl_elemental_shift",
            "include",
            "exclude",
            "adjust",
            "dtype",
            "prune",
            "reset_position_ids",
            "bake_vae",
            "cache",
        ],
        "save" => &["to", "overwrite", "link"],
        "lora" => &["apply", "fill", "allow_unmatched", "cache"],
        "generate" | "xy" => &["to", "overwrite"],
        _ => &["cache"],
    };
    let stray: Vec<&str> = set_fields(d)
        .into_iter()
        .filter(|f| !allowed.contains(f))
        .collect();
    if !stray.is_empty() {
        let hint = match kind {
            "merge" => Some("saving takes its own node: `save: NODE`, `to: PATH`".to_string()),
            "extract_lora" | "merge_loras" | "generate" | "xy" => {
                Some(format!("options go under `{kind}:`"))
            }
            _ => None,
        };
        errs.push(
            &decl.referenced,
            format!("{kind} node `{name}` takes no `{}`", stray.join("`, `")),
            hint,
        );
    }
    let memory = d.cache == Some(Keep::Memory);
    if let Some(mode) = &d.merge {
        merge_node(name, d, mode, scope, resolve, errs)
    } else if let Some(x) = &d.extract_lora {
        extract_node(x, memory, resolve, errs)
    } else if let Some(m) = &d.merge_loras {
        merge_loras_node(m, memory, scope, resolve, errs)
    } else if let Some(g) = &d.generate {
        generate_node(g, d, dir, resolve, errs)
    } else if d.xy.is_some() {
        None // expanded once every other node is validated
    } else if d.lora.is_some() {
        lora_node(name, d, scope, resolve, errs)
    } else {
        save_node(name, decl, dir, resolve, errs)
    }
}

/// What a reference must name.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// A checkpoint: a model file or a checkpoint-making node.
    Checkpoint,
    /// A LoRA: a model file or a LoRA-making node.
    Lora,
    /// Any node or model.
    Any,
}

type Resolver<'a> = dyn Fn(&Spanned<String>, Want, &mut RecipeErrors) -> Option<Input> + 'a;

/// The flat node fields a declaration sets (the kind keys aside).
fn set_fields(d: &NodeDecl) -> Vec<&'static str> {
    [
        ("a", d.a.is_some()),
        ("b", d.b.is_some()),
        ("c", d.c.is_some()),
        ("alpha", d.alpha.is_some()),
        ("beta", d.beta.is_some()),
        ("calcmode", d.calcmode.is_some()),
        ("gamma", d.gamma.is_some()),
        ("seed", d.seed.is_some()),
        ("elemental", d.elemental.is_some()),
        ("xl_elemental_shift", d.xl_elemental_shift),
        ("include", d.include.is_some()),
        ("exclude", d.exclude.is_some()),
        ("adjust", d.adjust.is_some()),
        ("dtype", d.dtype.is_some()),
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

/// A `save` node.
fn save_node(
    name: &str,
    decl: &Spanned<NodeDecl>,
    dir: &Path,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let d = &decl.value;
    let from = resolve(d.save.as_ref()?, Want::Any, errs);
    let from = match from? {
        Input::Node(n) => n,
        Input::Model(m) => {
            errs.push(
                &d.save.as_ref()?.referenced,
                format!("`{m}` is a model: `save` takes a node"),
                None,
            );
            return None;
        }
    };
    let Some(to) = &d.to else {
        errs.push(
            &decl.referenced,
            format!("save node `{name}` needs `to: PATH`"),
            None,
        );
        return None;
    };
    Some(Node::Save {
        from,
        to: dir.join(to),
        overwrite: d.overwrite,
        link: d.link.unwrap_or_default(),
    })
}

/// A `generate` node.
fn generate_node(
    g: &Spanned<GenerateDecl>,
    d: &NodeDecl,
    dir: &Path,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let v = &g.value;
    let model = resolve(&v.model, Want::Checkpoint, errs);
    let mut ok = true;
    let mut check = |field: &Option<Spanned<usize>>, good: fn(usize) -> bool, what: &str| {
        if let Some(f) = field.as_ref().filter(|f| !good(f.value)) {
            errs.push(&f.referenced, format!("{} is not {what}", f.value), None);
            ok = false;
        }
    };
    let positive = |n: usize| n >= 1;
    check(&v.steps, positive, "a number of steps (at least 1)");
    check(&v.batch, positive, "a batch size (at least 1)");
    check(&v.clip_skip, positive, "a clip skip (at least 1)");
    for size in [&v.width, &v.height] {
        check(
            size,
            |n| n > 0 && n % 8 == 0,
            "an image size (a multiple of 8)",
        );
    }
    if let Some(h) = &v.hires {
        let (scale, strength) = (h.value.scale, h.value.strength);
        if !(1.0..=8.0).contains(&scale) {
            errs.push(
                &h.referenced,
                format!("hires scale {scale} is outside 1..=8"),
                None,
            );
            ok = false;
        }
        if !(strength > 0.0 && strength <= 1.0) {
            errs.push(
                &h.referenced,
                format!("hires strength {strength} is outside (0, 1]"),
                None,
            );
            ok = false;
        }
    }
    if v.cfg.is_some_and(|c| !c.is_finite()) {
        errs.push(&g.referenced, "cfg must be a finite number".into(), None);
        ok = false;
    }
    let defaults = crate::gen::job::Job::default();
    let value = |f: &Option<Spanned<usize>>| f.as_ref().map(|f| f.value);
    let job = crate::gen::job::Job {
        prompt: v.prompt.clone(),
        negative: v.negative.clone(),
        steps: value(&v.steps).unwrap_or(defaults.steps),
        cfg: v.cfg.unwrap_or(defaults.cfg),
        sampler: v.sampler.unwrap_or(defaults.sampler),
        seed: v.seed.unwrap_or(defaults.seed),
        batch: value(&v.batch).unwrap_or(defaults.batch),
        width: value(&v.width),
        height: value(&v.height),
        clip_skip: value(&v.clip_skip).unwrap_or(defaults.clip_skip),
        hires: v.hires.as_ref().map(|h| h.value.clone()),
        prediction: v.prediction,
    };
    let model = model?;
    ok.then_some(Node::Generate {
        model,
        job,
        to: d.to.as_ref().map(|t| dir.join(t)),
        overwrite: d.overwrite,
    })
}

/// A rank option: at least 1.
fn rank(r: &Option<Spanned<usize>>, errs: &mut RecipeErrors) -> Option<Option<usize>> {
    match r {
        Some(r) if r.value == 0 => {
            errs.push(&r.referenced, "a rank is at least 1".into(), None);
            None
        }
        r => Some(r.as_ref().map(|r| r.value)),
    }
}

/// A clamp quantile: above 0, at most 1.
fn quantile(q: &Option<Spanned<f64>>, errs: &mut RecipeErrors) -> Option<f64> {
    match q {
        None => Some(0.99),
        Some(q) if q.value > 0.0 && q.value <= 1.0 => Some(q.value),
        Some(q) => {
            errs.push(
                &q.referenced,
                format!("clamp_quantile {} is not in (0, 1]", q.value),
                Some("1 turns the clamp off".into()),
            );
            None
        }
    }
}

/// An `extract_lora` node.
fn extract_node(
    x: &Spanned<ExtractDecl>,
    memory: bool,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let v = &x.value;
    let a = resolve(&v.a, Want::Checkpoint, errs);
    let b = resolve(&v.b, Want::Checkpoint, errs);
    let defaults = ExtractOptions::default();
    let (rank, conv_rank) = (rank(&v.rank, errs), rank(&v.conv_rank, errs));
    let clamp_quantile = quantile(&v.clamp_quantile, errs);
    if v.min_diff.is_some_and(|m| m < 0.0) {
        errs.push(&x.referenced, "min_diff must be 0 or more".into(), None);
        return None;
    }
    Some(Node::ExtractLora {
        a: a?,
        b: b?,
        options: ExtractOptions {
            rank: rank?.unwrap_or(defaults.rank),
            conv_rank: conv_rank?,
            alpha: v.alpha.unwrap_or(defaults.alpha),
            beta: v.beta.unwrap_or(defaults.beta),
            min_diff: v.min_diff.unwrap_or(defaults.min_diff),
            clamp_quantile: clamp_quantile?,
            dtype: v.dtype.unwrap_or(defaults.dtype),
        },
        memory,
    })
}

/// A `merge_loras` node.
fn merge_loras_node(
    m: &Spanned<MergeLorasDecl>,
    memory: bool,
    scope: &RatioScope,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let v = &m.value;
    if v.loras.is_empty() {
        errs.push(
            &m.referenced,
            "merge_loras needs `loras: [{ file: LORA, strength: 1 }, ...]`".into(),
            None,
        );
        return None;
    }
    let loras = lora_uses(&v.loras, scope, resolve, errs);
    let (rank, conv_rank) = (rank(&v.rank, errs), rank(&v.conv_rank, errs));
    let clamp_quantile = quantile(&v.clamp_quantile, errs);
    Some(Node::MergeLoras {
        loras: loras?,
        options: MergeOptions {
            mode: v.mode.unwrap_or(MergeMode::Concat),
            rank: rank?.unwrap_or(64),
            conv_rank: conv_rank?,
            clamp_quantile: clamp_quantile?,
            dtype: v.dtype.unwrap_or(FloatType::Fp32),
        },
        fill: v.fill.unwrap_or(0.0),
        memory,
    })
}

/// The LoRAs of a `lora` or `merge_loras` node, with strengths resolved (all of them, or
/// `None` after reporting what is wrong).
fn lora_uses(
    uses: &[LoraUseDecl],
    scope: &RatioScope,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Vec<LoraUse>> {
    let mut out = Vec::new();
    for u in uses {
        let strength = match &u.strength {
            None => Some(1.0),
            Some(s) => match ratio(s, scope, errs) {
                Some(Ratio::Scalar(v)) => Some(v),
                Some(_) => {
                    errs.push(
                        &s.referenced,
                        "a LoRA strength is one number; per-block values go in `blocks`".into(),
                        None,
                    );
                    None
                }
                None => None,
            },
        };
        if let (Some(source), Some(strength)) = (resolve(&u.file, Want::Lora, errs), strength) {
            out.push(LoraUse {
                source,
                strength,
                blocks: u.blocks.clone(),
            });
        }
    }
    (out.len() == uses.len()).then_some(out)
}

/// Resolves a ratio field: a value, or `$name` for a var (declared, or set on the command
/// line); errors point at the field, or at the var's own value when that is what is wrong.
fn ratio(r: &Spanned<RatioDecl>, scope: &RatioScope, errs: &mut RecipeErrors) -> Option<Ratio> {
    if let RatioDecl::Text(t) = &r.value {
        if let Some(name) = t.trim().strip_prefix('$') {
            if let Some(value) = scope.sets.get(name) {
                return match Ratio::parse(value, &scope.presets) {
                    Ok(ratio) => Some(ratio),
                    Err(e) => {
                        errs.push_plain(format!("--set {name}={value}: {e}"));
                        None
                    }
                };
            }
            let Some(var) = scope.vars.get(name) else {
                let near = crate::text::nearest(name, scope.vars.keys().map(|s| s.as_str()));
                errs.push(
                    &r.referenced,
                    format!("no var `{name}` in this recipe"),
                    near.map(|n| format!("did you mean `${n}`?")),
                );
                return None;
            };
            if matches!(&var.decl.value, RatioDecl::Text(v) if v.trim().starts_with('$')) {
                errs.push(
                    &r.referenced,
                    format!("var `{name}` refers to another var; give it a value"),
                    None,
                );
                return None;
            }
            let back = errs.current();
            let resolved = ratio(var.decl, scope, errs.at(var.part));
            errs.at(back);
            return resolved;
        }
    }
    let parsed = match &r.value {
        RatioDecl::Number(v) => Ok(Ratio::Scalar(*v)),
        RatioDecl::List(v) => Ok(Ratio::Blocks(v.clone())),
        RatioDecl::Text(t) => Ratio::parse(t, &scope.presets),
    };
    match parsed {
        Ok(Ratio::Scalar(v)) if !(-10.0..=10.0).contains(&v) => {
            errs.push(
                &r.referenced,
                format!("ratio {v} is out of range (-10 to 10)"),
                None,
            );
            None
        }
        Ok(ratio) => Some(ratio),
        Err(e) => {
            errs.push(&r.referenced, e.to_string(), None);
            None
        }
    }
}

/// A `lora` node: the checkpoint, then each LoRA with its strength and block weights.
fn lora_node(
    name: &str,
    d: &NodeDecl,
    scope: &RatioScope,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let base = d.lora.as_ref()?;
    let input = resolve(base, Want::Checkpoint, errs);
    if d.apply.is_empty() {
        errs.push(
            &base.referenced,
            format!("lora node `{name}` needs `apply: [{{ file: LORA, strength: 1 }}]`"),
            None,
        );
        return None;
    }
    let loras = lora_uses(&d.apply, scope, resolve, errs);
    Some(Node::Lora {
        input: input?,
        loras: loras?,
        fill: d.fill.unwrap_or(0.0),
        allow_unmatched: d.allow_unmatched,
        memory: d.cache == Some(Keep::Memory),
    })
}

fn merge_node(
    name: &str,
    d: &NodeDecl,
    mode: &Spanned<Mode>,
    scope: &RatioScope,
    resolve: &Resolver,
    errs: &mut RecipeErrors,
) -> Option<Node> {
    let mode_v = mode.value;
    let mut inputs = Vec::new();
    for (field, r) in [("a", &d.a), ("b", &d.b), ("c", &d.c)] {
        match r {
            Some(r) => inputs.extend(resolve(r, Want::Checkpoint, errs)),
            None if field == "c" && !mode_v.uses_c() => {}
            None => {
                errs.push(
                    &mode.referenced,
                    format!("{} node `{name}` needs `{field}`", mode_v.label()),
                    None,
                );
            }
        }
    }
    if let (Some(c), false) = (&d.c, mode_v.uses_c()) {
        errs.push(
            &c.referenced,
            format!("{} does not use model C", mode_v.label()),
            None,
        );
    }
    let alpha = match &d.alpha {
        Some(a) => ratio(a, scope, errs),
        None => {
            errs.push(
                &mode.referenced,
                format!("merge node `{name}` needs `alpha`"),
                None,
            );
            None
        }
    };
    let beta = d.beta.as_ref().map(|b| ratio(b, scope, errs));
    let adjust = match &d.adjust {
        Some(v) => match <[f64; 8]>::try_from(v.value.as_slice()) {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(&v.referenced, format!("adjust takes 8 values (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3), got {}", v.value.len()), None);
                None
            }
        },
        None => None,
    };
    let filter = match (&d.include, &d.exclude) {
        (Some(_), Some(_)) => {
            errs.push(
                &mode.referenced,
                format!("node `{name}` has both include and exclude"),
                None,
            );
            None
        }
        (Some(f), None) => Some(FilterSpec {
            mode: FilterMode::Include,
            blocks: f.blocks.clone(),
            elements: f.elements.clone(),
        }),
        (None, Some(f)) => Some(FilterSpec {
            mode: FilterMode::Exclude,
            blocks: f.blocks.clone(),
            elements: f.elements.clone(),
        }),
        (None, None) => None,
    };
    let vae = d
        .bake_vae
        .as_ref()
        .and_then(|v| match resolve(v, Want::Checkpoint, errs) {
            Some(Input::Model(m)) => Some(m),
            Some(Input::Node(_)) => {
                errs.push(
                    &v.referenced,
                    "bake_vae takes a model (a VAE file)".to_string(),
                    None,
                );
                None
            }
            None => None,
        });
    let calcmode = d.calcmode.as_ref().map(|c| c.value).unwrap_or_default();
    if !calcmode.modes().contains(&mode_v) {
        let at = d
            .calcmode
            .as_ref()
            .map(|c| &c.referenced)
            .unwrap_or(&mode.referenced);
        errs.push(
            at,
            format!(
                "calcmode {} applies to {} only",
                calcmode.label(),
                calcmode
                    .modes()
                    .iter()
                    .map(|m| m.label())
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
            None,
        );
    }
    let beta = match beta {
        Some(Some(b)) => Some(b),
        Some(None) => return None,
        None => None,
    };
    let spec = MergeSpec {
        mode: mode_v,
        alpha: alpha?,
        beta,
        calcmode,
        gamma: d.gamma.unwrap_or(0.3),
        seed: d.seed.unwrap_or(0),
        dtype: d.dtype,
        prune: d.prune,
        reset_position_ids: d.reset_position_ids,
        elemental: d.elemental.clone(),
        xl_elemental_shift: d.xl_elemental_shift,
        filter,
        adjust,
        bake_vae: None,
    };
    (inputs.len() == if mode_v.uses_c() { 3 } else { 2 }).then_some(Node::Merge {
        inputs,
        spec: Box::new(spec),
        vae,
        memory: d.cache == Some(Keep::Memory),
    })
}

/// Dependency order, or the nodes of a cycle.
fn topo_order(nodes: &BTreeMap<String, Node>) -> Result<Vec<String>, Vec<String>> {
    use petgraph::stable_graph::StableDiGraph;
    let mut g: StableDiGraph<&str, ()> = StableDiGraph::new();
    let idx: BTreeMap<&str, _> = nodes
        .keys()
        .map(|n| (n.as_str(), g.add_node(n.as_str())))
        .collect();
    for (name, node) in nodes {
        for dep in node.node_inputs() {
            if let Some(&d) = idx.get(dep) {
                g.add_edge(d, idx[name.as_str()], ());
            }
        }
    }
    match petgraph::algo::toposort(&g, None) {
        Ok(order) => Ok(order.into_iter().map(|i| g[i].to_string()).collect()),
        Err(cycle) => {
            // Walk back from the reported node to list the cycle.
            let start = cycle.node_id();
            let mut path = vec![g[start].to_string()];
            let mut cur = start;
            for _ in 0..nodes.len() {
                let next = g
                    .neighbors_directed(cur, petgraph::Direction::Outgoing)
                    .find(|n| petgraph::algo::has_path_connecting(&g, *n, start, None));
                match next {
                    Some(n) if n == start => break,
                    Some(n) => {
                        path.push(g[n].to_string());
                        cur = n;
                    }
                    None => break,
                }
            }
            // Start the cycle at its alphabetically first node, so the report is stable.
            let first = (0..path.len()).min_by_key(|&i| &path[i]).unwrap_or(0);
            path.rotate_left(first);
            path.push(path[0].clone());
            Err(path)
        }
    }
}

/// The JSON Schema of recipe files, as written to `schema/recipe.v1.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(RecipeFile);
    serde_json::to_string_pretty(&schema).expect("schemas serialize") + "\n"
}

/// Graph output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    /// Mermaid flowchart (renders in GitHub, GitLab and many editors).
    Mermaid,
    /// Graphviz dot.
    Dot,
}

impl crate::text::Named for DagFormat {
    const NAMES: &'static [(&'static str, Self)] =
        &[("mermaid", DagFormat::Mermaid), ("dot", DagFormat::Dot)];
}

impl Recipe {
    /// Every edge of the recipe graph, (from, to), in a stable order.
    pub fn edges(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in &self.order {
            match &self.nodes[name] {
                Node::Merge { inputs, vae, .. } => {
                    for i in inputs {
                        let (Input::Model(f) | Input::Node(f)) = i;
                        out.push((f.clone(), name.clone()));
                    }
                    if let Some(v) = vae {
                        out.push((v.clone(), name.clone()));
                    }
                }
                Node::Lora { input, loras, .. } => {
                    for i in std::iter::once(input).chain(loras.iter().map(|l| &l.source)) {
                        out.push((i.name().to_string(), name.clone()));
                    }
                }
                Node::MergeLoras { loras, .. } => {
                    for l in loras {
                        out.push((l.source.name().to_string(), name.clone()));
                    }
                }
                Node::ExtractLora { a, b, .. } => {
                    for i in [a, b] {
                        out.push((i.name().to_string(), name.clone()));
                    }
                }
                Node::Save { from, .. } => out.push((from.clone(), name.clone())),
                Node::Generate { model, .. } => out.push((model.name().to_string(), name.clone())),
                Node::Xy { .. } => {
                    for cell in self.nodes[name].node_inputs() {
                        out.push((cell.to_string(), name.clone()));
                    }
                }
            }
        }
        out
    }

    /// The recipe graph as text: models as cylinders, checkpoint nodes as boxes, LoRA nodes as
    /// hexagons, saves as files.
    pub fn dag(&self, format: DagFormat) -> String {
        let id = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
        let mut out = String::new();
        match format {
            DagFormat::Mermaid => {
                out.push_str("graph LR\n");
                for m in self.models.keys() {
                    out.push_str(&format!("  {}[(\"{m}\")]\n", id(m)));
                }
                for name in &self.order {
                    match &self.nodes[name] {
                        Node::Merge { spec, .. } => out.push_str(&format!(
                            "  {}[\"{name}<br/>{}\"]\n",
                            id(name),
                            spec.mode.label()
                        )),
                        Node::Lora { loras, .. } => out.push_str(&format!(
                            "  {}[\"{name}<br/>LoRA x{}\"]\n",
                            id(name),
                            loras.len()
                        )),
                        Node::ExtractLora { options, .. } => out.push_str(&format!(
                            "  {}{{{{\"{name}<br/>extract LoRA r{}\"}}}}\n",
                            id(name),
                            options.rank
                        )),
                        Node::MergeLoras { loras, .. } => out.push_str(&format!(
                            "  {}{{{{\"{name}<br/>merge {} LoRAs\"}}}}\n",
                            id(name),
                            loras.len()
                        )),
                        Node::Generate { job, .. } => out.push_str(&format!(
                            "  {}[[\"{name}<br/>{} image(s)\"]]\n",
                            id(name),
                            job.batch
                        )),
                        Node::Xy { grids, .. } => out.push_str(&format!(
                            "  {}[[\"{name}<br/>{} grid(s)\"]]\n",
                            id(name),
                            grids.len()
                        )),
                        Node::Save { to, .. } => out.push_str(&format!(
                            "  {}[/\"{name}<br/>{}\"/]\n",
                            id(name),
                            to.file_name()
                                .map(|f| f.to_string_lossy())
                                .unwrap_or_default()
                        )),
                    }
                }
                for (a, b) in self.edges() {
                    out.push_str(&format!("  {} --> {}\n", id(&a), id(&b)));
                }
            }
            DagFormat::Dot => {
                out.push_str("digraph recipe {\n  rankdir=LR;\n");
                for m in self.models.keys() {
                    out.push_str(&format!("  \"{m}\" [shape=cylinder];\n"));
                }
                for name in &self.order {
                    let shape = match self.nodes[name] {
                        Node::Merge { .. } | Node::Lora { .. } => "box",
                        Node::ExtractLora { .. } | Node::MergeLoras { .. } => "hexagon",
                        Node::Save { .. } => "note",
                        Node::Generate { .. } | Node::Xy { .. } => "box3d",
                    };
                    out.push_str(&format!("  \"{name}\" [shape={shape}];\n"));
                }
                for (a, b) in self.edges() {
                    out.push_str(&format!("  \"{a}\" -> \"{b}\";\n"));
                }
                out.push_str("}\n");
            }
        }
        out
    }
}
