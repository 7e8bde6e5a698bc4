//! Command-line interface. Exit codes: 0 success, 1 failure, 2 usage error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::arch::{Component, Family, Variant};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::hashing::{default_cache_dir, HashMemo};
use crate::synth::{CopyComponents, Perturb, Size, SynthOptions};

/// Stable Diffusion model merging as a reproducible, incremental build.
#[derive(Debug, Parser)]
#[command(name = "mergesmith", version, about, propagate_version = true)]
pub struct Cli {
    /// Worker threads (default: one per CPU). Results do not depend on it.
    #[arg(long, global = true, env = "MERGESMITH_THREADS")]
    pub threads: Option<usize>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a synthetic checkpoint with the real key layout of an architecture.
    Synth(SynthArgs),
    /// Show a checkpoint's architecture, contents per block, metadata and hashes.
    Inspect(InspectArgs),
    /// Merge two or three checkpoints (one-shot, without a recipe).
    Merge(Box<MergeArgs>),
    /// Build a recipe's nodes (only what changed since the last build).
    Build(BuildArgs),
    /// Show what `build` would do for each node, and why.
    Plan(BuildArgs),
    /// Build a recipe, then write a static HTML report of it (sweeps' grids, images, where the
    /// models differ per block, the graph, every node's status) into a folder.
    Report(ReportArgs),
    /// Show a node's key, status, and what its key is computed from.
    Explain(ExplainArgs),
    /// Print the recipe graph (mermaid or dot).
    Dag(DagArgs),
    /// Upload a recipe's stored results and images to a remote cache.
    Push(SyncArgs),
    /// Download a recipe's results and images from a remote cache (verified).
    Pull(SyncArgs),
    /// Cache statistics (`stats`), or check every stored file and remove corrupt ones
    /// (`verify`).
    Cache(CacheArgs),
    /// Delete least recently used cache packs until the cache fits a size budget.
    Gc(GcArgs),
    /// Delete every cached result (the file-hash memo is kept).
    Clean(CacheArgs),
    /// Recipe tools.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// List recorded builds (newest last).
    Log(LogArgs),
    /// Check that the inputs and outputs on disk match the recipe's lockfile.
    Verify(VerifyArgs),
    /// Print the JSON Schema of recipe files.
    Schema,
    /// LoRA tools.
    #[command(subcommand)]
    Lora(LoraCommand),
    /// Generate images from an SD1, SD2 or SDXL checkpoint into PNGs carrying AUTOMATIC1111's
    /// generation parameters.
    Gen(GenArgs),
}

/// Arguments of `gen`.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// The checkpoint.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// The negative prompt.
    #[arg(short = 'n', long, default_value = "")]
    pub negative: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// Sampler.
    #[arg(long, value_enum, default_value = "euler-a")]
    pub sampler: crate::gen::sampler::Sampler,
    /// Seed (image i of a batch uses seed + i, as the web UI does).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Width in pixels, a multiple of 8 [default: the model's native size: 512 for SD1 and
    /// SD2-base, 768 for SD2 768-v, 1024 for SDXL].
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels, a multiple of 8 [default: as the width].
    #[arg(long)]
    pub height: Option<usize>,
    /// Images to make (a batch writes NAME-1.png, NAME-2.png, ... for `-o NAME.png`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// CLIP skip (1: the last layer; 2: the penultimate). SD1 only: SD2 and SDXL always use
    /// the penultimate layer, as the web UI does.
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Hires fix: upscale the latent by this factor (1 to 8), then denoise again.
    #[arg(long, value_name = "FACTOR")]
    pub hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass (0: as many as --steps).
    #[arg(long, default_value_t = 0, requires = "hires_scale")]
    pub hires_steps: u32,
    /// Hires fix: denoising strength of the second pass, in (0, 1].
    #[arg(long, default_value_t = 0.7, requires = "hires_scale")]
    pub hires_strength: f64,
    /// What the model predicts [default: guessed from the file: `v` for a `v_pred` marker
    /// or an SD2 768-v model, else `epsilon`].
    #[arg(long, value_enum)]
    pub prediction: Option<crate::gen::pipeline::Prediction>,
    /// The CLIP tokenizer.json [default: $MERGESMITH_TOKENIZER, else the Hugging Face cache,
    /// else the bundled CLIP vocabulary].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Where the models run: cpu, cuda or cuda:N (f16 on CUDA, f32 on the CPU).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: crate::device::ComputeDevice,
    /// Where the PNG goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `mergesmith lora ...`
#[derive(Debug, Subcommand)]
pub enum LoraCommand {
    /// Bake LoRAs into a checkpoint (as AUTOMATIC1111 / ComfyUI apply them at that strength).
    Apply(LoraApplyArgs),
    /// Extract a LoRA from the difference of two checkpoints (alpha*A - beta*B), by SVD.
    Extract(LoraExtractArgs),
    /// Merge LoRAs into one: exact concatenation, or sum then SVD at a new rank.
    Merge(LoraMergeArgs),
    /// Write a synthetic kohya LoRA for a checkpoint (every default target; for tests and
    /// benchmarks).
    Synth {
        /// The checkpoint the LoRA is for.
        #[arg(short = 'm', long = "model", value_name = "FILE")]
        model: PathBuf,
        /// Rank of linear (and 1x1) modules.
        #[arg(long, default_value_t = 32)]
        rank: usize,
        /// Rank of 3x3 convolutions (LoCon); 0 leaves them out.
        #[arg(long, default_value_t = 0)]
        conv_rank: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output file.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Arguments of `lora extract`.
#[derive(Debug, Args)]
pub struct LoraExtractArgs {
    /// The tuned model (A).
    #[arg(short = 'a', long = "model-a", value_name = "FILE")]
    pub a: PathBuf,
    /// The base model (B).
    #[arg(short = 'b', long = "model-b", value_name = "FILE")]
    pub b: PathBuf,
    /// Weight of A in the difference.
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Weight of B in the difference.
    #[arg(long, default_value_t = 1.0)]
    pub beta: f64,
    /// Rank of linear and 1x1 modules.
    #[arg(long, default_value_t = 128)]
    pub rank: usize,
    /// Rank of 3x3 convolutions (LoCon); without it convolutions are left out.
    #[arg(long)]
    pub conv_rank: Option<usize>,
    /// Text encoders whose largest change is at most this are left out.
    #[arg(long, default_value_t = 0.01)]
    pub min_diff: f64,
    /// Quantile at which the factors are clamped (1: no clamp).
    #[arg(long, default_value_t = 0.99)]
    pub clamp_quantile: f64,
    /// Output dtype.
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: crate::dtype::FloatType,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `lora merge`.
#[derive(Debug, Args)]
pub struct LoraMergeArgs {
    /// A LoRA with its ratio and block weights: `FILE[:RATIO[:BLOCKS]]` (repeatable).
    #[arg(
        short = 'l',
        long = "lora",
        value_name = "FILE[:RATIO[:BLOCKS]]",
        required = true
    )]
    pub loras: Vec<String>,
    /// concat (exact, LoRA/LoCon) or svd (any type, new rank).
    #[arg(long, value_enum, default_value = "concat")]
    pub mode: crate::lora::merge::MergeMode,
    /// svd: rank of linear and 1x1 modules.
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    /// svd: rank of 3x3 convolutions (default: --rank).
    #[arg(long)]
    pub conv_rank: Option<usize>,
    /// svd: quantile at which the factors are clamped (1: no clamp).
    #[arg(long, default_value_t = 0.99)]
    pub clamp_quantile: f64,
    /// Weight of blocks a short block-weight vector leaves out.
    #[arg(long, default_value_t = 0.0)]
    pub fill: f64,
    /// Output dtype.
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: crate::dtype::FloatType,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `lora apply`.
#[derive(Debug, Args)]
pub struct LoraApplyArgs {
    /// The checkpoint.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// A LoRA to bake, optionally with its strength and block weights:
    /// `FILE`, `FILE:0.8`, `FILE:0.8:OUTD` or `FILE:1:1,0,0,...` (repeatable).
    #[arg(
        short = 'l',
        long = "lora",
        value_name = "FILE[:STRENGTH[:BLOCKS]]",
        required = true
    )]
    pub loras: Vec<String>,
    /// Weight of blocks a short block-weight vector leaves out.
    #[arg(long, default_value_t = 0.0)]
    pub fill: f64,
    /// Skip LoRA modules that match no weight of the checkpoint (default: error).
    #[arg(long)]
    pub allow_unmatched: bool,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `mergesmith recipe ...`
#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Write a recipe that rebuilds a merged model, from its metadata (mergesmith's own, or
    /// SuperMerger's sd_merge_recipe).
    FromModel {
        /// The merged model.
        file: PathBuf,
        /// Write the recipe here instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Import SuperMerger's merge history (mergehistory.csv) as a recipe.
    FromSupermerger {
        /// The history file.
        csv: PathBuf,
        /// Only this history ID (default: every row).
        #[arg(long)]
        id: Option<u64>,
        /// Write the recipe here instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Arguments of `log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Show the last N builds.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub count: usize,
    /// Cache directory [default: $MERGESMITH_CACHE, else ./cache].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The recipe file (its lock is `<recipe>.lock` beside it).
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Rebuild every output from the inputs in a fresh temporary cache (beside the recipe)
    /// and compare its hashes with the lock, instead of re-hashing the files on disk.
    #[arg(long)]
    pub rebuild: bool,
    /// Nodes built at the same time with `--rebuild`.
    #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// The node.
    pub node: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Arguments of `dag`.
#[derive(Debug, Args)]
pub struct DagArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "mermaid")]
    pub format: crate::recipe::DagFormat,
}

/// Which cache a maintenance command works on.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// `stats` (the default), or `verify`: check packs against their recorded blake3,
    /// images and manifests by decoding them, and remove what fails.
    #[arg(default_value = "stats", value_parser = ["stats", "verify"])]
    pub action: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else ./cache].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Size budget, e.g. 50G or 500M.
    #[arg(long, value_name = "SIZE")]
    pub max_size: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else ./cache].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Arguments of `build` and `plan`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe file.
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Nodes to build (with what they need); all nodes when none are given.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Show what would be built (like `plan`) without building.
    #[arg(long)]
    pub dry_run: bool,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Where merge arithmetic runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: crate::device::ComputeDevice,
    /// Nodes built at the same time (each merge also uses every thread of `--threads`).
    #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Build everything that does not depend on a failed node (a sweep draws failed cells
    /// grey); report the failures and exit with an error at the end.
    #[arg(long)]
    pub keep_going: bool,
    /// The CLIP tokenizer.json of generate nodes [default: the recipe's `tokenizer:`, else
    /// $MERGESMITH_TOKENIZER, else the Hugging Face cache, else the bundled CLIP vocabulary].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Override a var of the recipe (repeatable), e.g. `--set strength=0.4`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// A remote cache shared with other machines: s3://BUCKET[/PREFIX] (credentials from
    /// the AWS environment or profile), file:///DIR or a directory. Local misses it holds are
    /// downloaded (verified) when needed; what is built is uploaded in the background.
    #[arg(long, env = "MERGESMITH_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Build slice I of N (0 <= I < N): sweep cells and independent targets, balanced by
    /// estimated cost; the same on every machine. Sweep grids and saves are left to a final
    /// build or report.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::build::shard::Shard>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `mergesmith push` / `pull`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The recipe file.
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Nodes to sync (with what they need); all nodes when none are given.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// The remote cache: s3://BUCKET[/PREFIX] (credentials from the AWS environment or
    /// profile), file:///DIR or a directory.
    #[arg(long, env = "MERGESMITH_REMOTE", value_name = "URL")]
    pub remote: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Override a var of the recipe (repeatable), e.g. `--set strength=0.4`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `mergesmith report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The build (recipe, targets, cache, device...).
    #[command(flatten)]
    pub build: BuildArgs,
    /// The folder the site is written to (created; pages are replaced, images kept).
    #[arg(long, short = 'o', default_value = "site", value_name = "DIR")]
    pub out: PathBuf,
}

fn parse_set(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("`{text}`: expected NAME=VALUE")),
    }
}

/// Arguments of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Merge mode.
    #[arg(long, value_enum, default_value = "weight_sum")]
    pub mode: crate::merge::Mode,
    /// Model A (the base).
    #[arg(short = 'a', long = "model-a", value_name = "FILE")]
    pub a: PathBuf,
    /// Model B.
    #[arg(short = 'b', long = "model-b", value_name = "FILE")]
    pub b: PathBuf,
    /// Model C (add_difference, triple_sum, sum_twice).
    #[arg(short = 'c', long = "model-c", value_name = "FILE")]
    pub c: Option<PathBuf>,
    /// Weight of B: a number, a preset name (GRAD_V...) or one value per block
    /// (26 for SD1/SD2: BASE,IN00-IN11,M00,OUT00-OUT11; 20 or 110 for SDXL).
    #[arg(long, allow_hyphen_values = true, default_value = "0.5")]
    pub alpha: String,
    /// Per-block weights of B (same as --alpha with a vector or preset).
    #[arg(long, allow_hyphen_values = true, value_name = "PRESET|v1,...")]
    pub mbw: Option<String>,
    /// Weight of C (triple_sum, sum_twice): number, preset or per-block vector.
    #[arg(long, allow_hyphen_values = true)]
    pub beta: Option<String>,
    /// Per-element calculation (SuperMerger's calcmode).
    #[arg(long, value_enum, default_value = "normal")]
    pub calcmode: crate::merge::CalcMode,
    /// extract's gamma: how sharply similarity selects features.
    #[arg(long, default_value_t = 0.3)]
    pub gamma: f64,
    /// Seed of random calcmodes (plusRandom).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output type of float tensors [default: keep model A's].
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
    /// Elemental merge: `blocks:elements:ratio` entries (comma or newline separated) that
    /// override alpha per key, e.g. "OUT03 OUT04:attn2:0.5,NOT IN00-IN05:ff:0".
    #[arg(long, value_name = "TEXT")]
    pub elemental: Option<String>,
    /// Compatibility: read SDXL block names in --elemental the way SuperMerger did before its
    /// fix (M00 as IN09, OUT00 as IN10, OUT03 as OUT00, ...).
    #[arg(long)]
    pub xl_elemental_shift: bool,
    /// Merge only the matched keys (blocks/elements given by --blocks/--elements).
    #[arg(long, conflicts_with = "exclude")]
    pub include: bool,
    /// Keep model A for the matched keys (blocks/elements given by --blocks/--elements).
    #[arg(long)]
    pub exclude: bool,
    /// Blocks for --include/--exclude: IDs and ranges (IN00-IN05), VAE, Adjust.
    #[arg(long, default_value = "", value_name = "BLOCKS")]
    pub blocks: String,
    /// Key substrings for --include/--exclude (comma separated).
    #[arg(long, default_value = "", value_name = "SUBSTRINGS")]
    pub elements: String,
    /// Adjust: 8 values IN,OUT,OUT2,CONT,BRI,COL1,COL2,COL3 (detail, contrast, brightness, colour).
    #[arg(long, allow_hyphen_values = true, value_name = "v1,...,v8")]
    pub adjust: Option<String>,
    /// Keep only UNet, VAE and text-encoder tensors.
    #[arg(long)]
    pub prune: bool,
    /// Rewrite CLIP position_ids as 0..76.
    #[arg(long)]
    pub reset_position_ids: bool,
    /// Replace the VAE with this VAE file.
    #[arg(long, value_name = "FILE")]
    pub bake_vae: Option<PathBuf>,
    /// Extra MBW preset files (`NAME<TAB>v1,...` per line).
    #[arg(long, value_name = "FILE")]
    pub presets: Vec<PathBuf>,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
    /// Cache directory for the input-hash memo.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Where the arithmetic runs: cpu (mergesmith's kernels), cuda or cuda:N (a build with
    /// the `cuda` feature). Element-wise formulas run there; the rest stays on the CPU.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: crate::device::ComputeDevice,
}

/// Where a command writes its file and how it reports.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output file.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Architectures `synth` can produce.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SynthArch {
    /// Stable Diffusion 1.x.
    Sd1,
    /// Stable Diffusion 2.x.
    Sd2,
    /// SDXL base.
    Sdxl,
}

/// UNet input variants `synth` can produce.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SynthVariant {
    /// 4 input channels.
    Standard,
    /// 9 input channels.
    Inpainting,
    /// 8 input channels.
    Pix2pix,
}

/// Components that `--copy` accepts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ComponentArg {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    Te1,
    /// SDXL's second text encoder.
    Te2,
    /// The VAE.
    Vae,
}

/// Arguments of `synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Architecture of a fresh model.
    #[arg(long, value_enum, default_value = "sd1")]
    pub arch: SynthArch,
    /// `tiny` keeps every key with dimensions / 32 (tests); `full` has the real shapes.
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: Size,
    /// Seed of all pseudo-random values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage type of float tensors.
    #[arg(long, value_enum, default_value = "fp16")]
    pub dtype: FloatType,
    /// UNet input variant.
    #[arg(long, value_enum, default_value = "standard")]
    pub variant: SynthVariant,
    /// Include EMA copies of the UNet (SD1).
    #[arg(long)]
    pub ema: bool,
    /// Start from this model and add a LoRA-like perturbation (a related model).
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// Size of the perturbation relative to each tensor's RMS (with --base).
    #[arg(long, default_value_t = 0.05, requires = "base")]
    pub strength: f32,
    /// Rank of the perturbation of 2-D/4-D weights; 0 for full-rank noise (with --base).
    #[arg(long, default_value_t = 4, requires = "base")]
    pub rank: usize,
    /// Take the components named by --copy verbatim from this file.
    #[arg(long, value_name = "FILE", requires = "copy")]
    pub copy_from: Option<PathBuf>,
    /// Components to copy from --copy-from.
    #[arg(long, value_enum, value_delimiter = ',', requires = "copy_from")]
    pub copy: Vec<ComponentArg>,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint files (.safetensors, .ckpt, .pt).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print JSON (one object, or an array for several files).
    #[arg(long)]
    pub json: bool,
    /// Skip hashing (no full read of the file).
    #[arg(long)]
    pub no_hash: bool,
    /// List every key with its component and block.
    #[arg(long)]
    pub keys: bool,
    /// Cache directory for the hash memo [default: $MERGESMITH_CACHE, else the user cache dir].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Parses the command line, runs, prints errors, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::from(1);
        }
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Recipe(errs)) => {
            eprint!("{}", errs.render());
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                Error::Invalid(_) => 2,
                _ => 1,
            })
        }
    }
}

/// Runs one command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Synth(a) => synth(a),
        Command::Inspect(a) => inspect(a),
        Command::Merge(a) => merge(*a),
        Command::Build(a) => {
            let dry = a.dry_run;
            build(a, dry, None)
        }
        Command::Plan(a) => build(a, true, None),
        Command::Report(a) => build(a.build, false, Some(&a.out)),
        Command::Explain(a) => explain(a),
        Command::Dag(a) => {
            let recipe = load_recipe(&a.recipe)?;
            print!("{}", recipe.dag(a.format));
            Ok(())
        }
        Command::Push(a) => sync(a, true),
        Command::Pull(a) => sync(a, false),
        Command::Cache(a) if a.action == "verify" => {
            let v = cache_of(a.cache.as_deref()).verify()?;
            if a.json {
                print_json(&v)?;
            } else {
                println!(
                    "checked {} files ({}): {} corrupt, removed{}",
                    v.checked,
                    crate::inspect::human_bytes(v.bytes),
                    v.removed.len(),
                    match v.unrecorded {
                        0 => String::new(),
                        n => format!("; {n} packs predate recorded digests (headers checked)"),
                    }
                );
            }
            match v.removed.len() {
                0 => Ok(()),
                n => Err(Error::Failed(format!("{n} corrupt file(s) removed"))),
            }
        }
        Command::Cache(a) => {
            let stats = cache_of(a.cache.as_deref()).stats();
            if a.json {
                return print_json(&stats);
            }
            println!(
                "{}: {} results in {} packs, {}",
                stats.path.display(),
                stats.results,
                stats.packs,
                crate::inspect::human_bytes(stats.bytes)
            );
            Ok(())
        }
        Command::Gc(a) => {
            let max = crate::build::maintenance::parse_size(&a.max_size)?;
            let (n, freed) = cache_of(a.cache.as_deref()).gc(max)?;
            println!(
                "removed {n} packs, freed {}",
                crate::inspect::human_bytes(freed)
            );
            Ok(())
        }
        Command::Clean(a) => {
            let before = cache_of(a.cache.as_deref()).clean()?;
            println!(
                "removed {} results, {} packs ({})",
                before.results,
                before.packs,
                crate::inspect::human_bytes(before.bytes)
            );
            Ok(())
        }
        Command::Lora(LoraCommand::Apply(a)) => lora_apply(a),
        Command::Lora(LoraCommand::Extract(a)) => {
            let opts = crate::lora::extract::ExtractOptions {
                rank: a.rank,
                conv_rank: a.conv_rank,
                alpha: a.alpha,
                beta: a.beta,
                min_diff: a.min_diff,
                clamp_quantile: a.clamp_quantile,
                dtype: a.dtype,
            };
            let started = std::time::Instant::now();
            let r = crate::lora::extract::extract(
                &a.a,
                &a.b,
                &opts,
                &a.out.output,
                a.out.overwrite,
                !a.out.json,
            )?;
            if a.out.json {
                return print_json(&r);
            }
            println!(
                "wrote {} ({} modules{}) in {:.1} s; relative error {:.4} (best possible at this rank {:.4})",
                a.out.output.display(),
                r.modules,
                if r.text_encoder { "" } else { "; text encoders identical, left out" },
                started.elapsed().as_secs_f64(),
                r.relative_error,
                r.optimal_relative_error
            );
            Ok(())
        }
        Command::Lora(LoraCommand::Merge(a)) => {
            use crate::lora::bake::Application;
            use crate::lora::merge::{merge, MergeOptions};
            let mut sources = Vec::new();
            for spec in &a.loras {
                let (path, ratio, blocks) = lora_spec(spec)?;
                let file = crate::lora::LoraFile::open(&path)?;
                sources.push(Application::new(
                    file,
                    ratio,
                    blocks.as_deref(),
                    None,
                    a.fill,
                )?);
            }
            let opts = MergeOptions {
                mode: a.mode,
                rank: a.rank,
                conv_rank: a.conv_rank,
                clamp_quantile: a.clamp_quantile,
                dtype: a.dtype,
            };
            let r = merge(&sources, &opts, &a.out.output, a.out.overwrite)?;
            if a.out.json {
                return print_json(&r);
            }
            println!(
                "wrote {} ({} modules; relative error {:.4})",
                a.out.output.display(),
                r.modules,
                r.relative_error
            );
            Ok(())
        }
        Command::Lora(LoraCommand::Synth {
            model,
            rank,
            conv_rank,
            seed,
            output,
            overwrite,
        }) => {
            let started = std::time::Instant::now();
            let n =
                crate::lora::synth::synthesize(&model, rank, conv_rank, seed, &output, overwrite)?;
            println!(
                "wrote {} ({n} modules) in {:.1} s",
                output.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Recipe(cmd) => {
            let (yaml, output, overwrite) = match cmd {
                RecipeCommand::FromModel {
                    file,
                    output,
                    overwrite,
                } => (crate::recipe::import::from_model(&file)?, output, overwrite),
                RecipeCommand::FromSupermerger {
                    csv,
                    id,
                    output,
                    overwrite,
                } => (
                    crate::recipe::import::from_supermerger_history(&csv, id)?,
                    output,
                    overwrite,
                ),
            };
            match output {
                Some(o) => {
                    crate::checkpoint::writer::write_file_atomic(&o, yaml.as_bytes(), overwrite)
                }
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        Command::Log(a) => {
            let log = cache_of(a.cache.as_deref()).log();
            let tail = &log[log.len().saturating_sub(a.count)..];
            if a.json {
                return print_json(&tail);
            }
            for e in tail {
                let names: Vec<&str> = e.built.iter().map(|(n, _)| n.as_str()).collect();
                println!(
                    "#{:<4} {}  {}  built: {}  cached: {}",
                    e.id,
                    crate::build::log::utc(e.time),
                    e.recipe.display(),
                    if names.is_empty() {
                        "-".to_string()
                    } else {
                        names.join(", ")
                    },
                    e.cached
                );
            }
            Ok(())
        }
        Command::Verify(a) => {
            let problems = if a.rebuild {
                let opts = crate::build::BuildOptions {
                    run: crate::merge::RunOptions {
                        overwrite: true,
                        progress: !a.json,
                        device: Default::default(),
                    },
                    jobs: a.jobs,
                    keep_going: false,
                };
                crate::build::lock::verify_rebuild(&load_recipe(&a.recipe)?, &opts)?
            } else {
                crate::build::lock::verify(&a.recipe)?
            };
            if a.json {
                print_json(&problems)?;
            } else if problems.is_empty() {
                println!(
                    "all inputs and outputs match {}",
                    crate::build::lock::lock_path(&a.recipe).display()
                );
            } else {
                for p in &problems {
                    println!("{} ({}): {}", p.name, p.path.display(), p.problem);
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(Error::Failed(format!(
                    "{} differences from the lockfile",
                    problems.len()
                )))
            }
        }
        Command::Gen(a) => gen(a),
        Command::Schema => {
            print!("{}", crate::recipe::schema_json());
            Ok(())
        }
    }
}

/// Splits `FILE[:STRENGTH[:BLOCKS]]` (a colon inside FILE, as in `C:\\...`, stays in FILE).
fn lora_spec(text: &str) -> Result<(PathBuf, f64, Option<String>)> {
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    let number = |s: &str| s.trim().parse::<f64>().ok();
    match parts.as_slice() {
        [blocks, strength, file] if number(strength).is_some() => Ok((
            PathBuf::from(file),
            number(strength).unwrap_or(1.0),
            Some(blocks.to_string()),
        )),
        [strength, rest @ ..] if number(strength).is_some() => {
            let file: Vec<&str> = rest.iter().rev().copied().collect();
            Ok((
                PathBuf::from(file.join(":")),
                number(strength).unwrap_or(1.0),
                None,
            ))
        }
        _ => Ok((PathBuf::from(text), 1.0, None)),
    }
}

fn lora_apply(a: LoraApplyArgs) -> Result<()> {
    use crate::lora::bake::{bake_file, Application};
    let family =
        crate::arch::detect(crate::checkpoint::Checkpoint::open(&a.model)?.tensors()).family;
    let mut apps = Vec::new();
    let mut record = Vec::new();
    for spec in &a.loras {
        let (path, strength, blocks) = lora_spec(spec)?;
        let file = crate::lora::LoraFile::open(&path)?;
        let app = Application::new(file, strength, blocks.as_deref(), Some(family), a.fill)?;
        let hashes = crate::hashing::HashMemo::new(&crate::hashing::default_cache_dir())
            .hashes(&path)?
            .0;
        record.push(serde_json::json!({
            "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": hashes.sha256,
            "strength": strength,
            "blocks": app.blocks,
        }));
        apps.push(app);
    }
    let mut md = std::collections::BTreeMap::new();
    md.insert(
        "mergesmith_loras".to_string(),
        serde_json::Value::Array(record).to_string(),
    );
    let started = std::time::Instant::now();
    let plan = bake_file(
        &a.model,
        &apps,
        &a.out.output,
        &md,
        a.allow_unmatched,
        a.out.overwrite,
        !a.out.json,
    )?;
    let report = serde_json::json!({
        "output": a.out.output,
        "modules_applied": plan.applied,
        "tensors_changed": plan.changes.len(),
        "unmatched": plan.unmatched.iter().map(|(i, n)| serde_json::json!({"lora": a.loras[*i], "module": n})).collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.out.json {
        return print_json(&report);
    }
    println!(
        "wrote {} ({} modules applied, {} tensors changed{}) in {:.1} s",
        a.out.output.display(),
        plan.applied,
        plan.changes.len(),
        if plan.unmatched.is_empty() {
            String::new()
        } else {
            format!(", {} unmatched modules skipped", plan.unmatched.len())
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn synth(a: SynthArgs) -> Result<()> {
    let family = match a.arch {
        SynthArch::Sd1 => Family::Sd1,
        SynthArch::Sd2 => Family::Sd2,
        SynthArch::Sdxl => Family::Sdxl,
    };
    let variant = match a.variant {
        SynthVariant::Standard => Variant::Standard,
        SynthVariant::Inpainting => Variant::Inpainting,
        SynthVariant::Pix2pix => Variant::InstructPix2Pix,
    };
    let opts = SynthOptions {
        family,
        size: a.size,
        seed: a.seed,
        dtype: a.dtype,
        variant,
        ema: a.ema,
        perturb: a.base.map(|base| Perturb {
            base,
            strength: a.strength,
            rank: a.rank,
        }),
        copy: a.copy_from.map(|from| CopyComponents {
            from,
            components: a
                .copy
                .iter()
                .map(|c| match c {
                    ComponentArg::Unet => Component::Unet,
                    ComponentArg::Te1 => Component::TextEncoder1,
                    ComponentArg::Te2 => Component::TextEncoder2,
                    ComponentArg::Vae => Component::Vae,
                })
                .collect(),
        }),
    };
    let started = std::time::Instant::now();
    let report = crate::synth::synthesize(&opts, &a.out.output, a.out.overwrite, !a.out.json)?;
    if a.out.json {
        print_json(&report)
    } else {
        println!(
            "wrote {} ({} tensors, {}) in {:.1} s",
            report.path.display(),
            report.tensors,
            crate::inspect::human_bytes(report.bytes),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let memo = HashMemo::new(&a.cache.unwrap_or_else(default_cache_dir));
    let memo = (!a.no_hash).then_some(&memo);
    let mut reports = Vec::with_capacity(a.files.len());
    for f in &a.files {
        if !a.json && std::io::stderr().is_terminal() && memo.is_some() {
            eprintln!("inspecting {} ...", f.display());
        }
        reports.push(crate::inspect::inspect(f, memo, a.keys)?);
    }
    if a.json {
        match &reports[..] {
            [one] => print_json(one),
            many => print_json(&many),
        }
    } else {
        let text: Vec<String> = reports.iter().map(crate::inspect::render).collect();
        print!("{}", text.join("\n"));
        Ok(())
    }
}

fn merge(a: MergeArgs) -> Result<()> {
    use crate::merge::{MergeFiles, MergeSpec, Presets, Ratio};
    let mut presets = Presets::default();
    for p in &a.presets {
        presets.add_file(p)?;
    }
    let alpha_text = match &a.mbw {
        Some(m) if a.alpha != "0.5" => {
            return Err(Error::Invalid(format!(
                "give either --alpha {} or --mbw {m}, not both",
                a.alpha
            )));
        }
        Some(m) => m.as_str(),
        None => a.alpha.as_str(),
    };
    let spec = MergeSpec {
        mode: a.mode,
        alpha: Ratio::parse(alpha_text, &presets)?,
        beta: a
            .beta
            .as_deref()
            .map(|b| Ratio::parse(b, &presets))
            .transpose()?,
        calcmode: a.calcmode,
        gamma: a.gamma,
        seed: a.seed,
        dtype: a.dtype,
        prune: a.prune,
        reset_position_ids: a.reset_position_ids,
        elemental: a.elemental.clone(),
        xl_elemental_shift: a.xl_elemental_shift,
        filter: match (a.include, a.exclude) {
            (true, _) => Some(crate::merge::FilterMode::Include),
            (_, true) => Some(crate::merge::FilterMode::Exclude),
            _ => None,
        }
        .map(|mode| crate::merge::FilterSpec {
            mode,
            blocks: a.blocks.clone(),
            elements: a.elements.clone(),
        }),
        adjust: a
            .adjust
            .as_deref()
            .map(crate::merge::select::parse_adjust)
            .transpose()?
            .flatten(),
        bake_vae: a.bake_vae.clone(),
    };
    if spec.filter.is_none() && !(a.blocks.is_empty() && a.elements.is_empty()) {
        return Err(Error::Invalid(
            "--blocks/--elements need --include or --exclude".into(),
        ));
    }
    let files = MergeFiles {
        a: &a.a,
        b: &a.b,
        c: a.c.as_deref(),
    };
    let memo = HashMemo::new(&a.cache.unwrap_or_else(default_cache_dir));
    let started = std::time::Instant::now();
    let (plan, report) = crate::merge::merge_files(
        &files,
        &spec,
        &a.out.output,
        &memo,
        &crate::merge::RunOptions {
            overwrite: a.out.overwrite,
            progress: !a.out.json,
            device: a.device,
        },
    )?;
    if a.out.json {
        return print_json(&serde_json::json!({ "report": report, "plan": {
            "architecture": plan.arch,
            "blended": plan.blended(),
            "missing_in_b": plan.missing_in_b,
            "missing_in_c": plan.missing_in_c,
            "added_from_b": plan.added_from_b,
        }}));
    }
    for (what, keys) in [
        ("missing from B (kept from A)", &plan.missing_in_b),
        ("missing from C (kept from A)", &plan.missing_in_c),
        ("only in B (added)", &plan.added_from_b),
    ] {
        if !keys.is_empty() {
            eprintln!(
                "note: {} mergeable keys {what}, e.g. `{}`",
                keys.len(),
                keys[0]
            );
        }
    }
    println!(
        "wrote {} ({}: {} tensors, {} blended, {}) in {:.1} s",
        report.path.display(),
        plan.arch,
        report.tensors,
        report.blended,
        crate::inspect::human_bytes(report.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn load_recipe(path: &std::path::Path) -> Result<crate::recipe::Recipe> {
    crate::recipe::load(path).map_err(|e| Error::Recipe(Box::new(e)))
}

fn cache_of(dir: Option<&std::path::Path>) -> crate::build::Cache {
    crate::build::Cache::new(&crate::build::maintenance::cache_dir(dir))
}

fn explain(a: ExplainArgs) -> Result<()> {
    use crate::build::{Cache, Status};
    let recipe = load_recipe(&a.recipe)?;
    let cache = Cache::new(
        &a.cache
            .clone()
            .unwrap_or_else(|| Cache::default_for(&a.recipe)),
    );
    let plan = crate::build::plan(&recipe, &cache, std::slice::from_ref(&a.node))?;
    let node = plan
        .iter()
        .find(|p| p.name == a.node)
        .expect("the target is planned");
    println!("node:  {}", node.name);
    println!("key:   {}", node.key);
    match &node.status {
        Status::Hit => println!("state: up to date"),
        Status::Miss(why) => println!("state: stale: {}", why.join("; ")),
        Status::Skip(why) => println!("state: skipped: {why}"),
    }
    let pretty =
        serde_json::to_string_pretty(&node.preimage).map_err(|e| Error::Invalid(e.to_string()))?;
    println!("key computed from:\n{pretty}");
    Ok(())
}

/// `mergesmith build`, `plan` (`plan_only`) and `report` (a build, then the site in `report`).
/// The cache of a recipe command: `--cache`, else the default beside the recipe, reading
/// through to `remote` if given.
fn recipe_cache(
    recipe: &std::path::Path,
    dir: Option<&std::path::Path>,
    remote: Option<&str>,
) -> Result<crate::build::Cache> {
    use crate::build::Cache;
    let cache = Cache::new(&dir.map_or_else(|| Cache::default_for(recipe), Into::into));
    Ok(match remote {
        Some(url) => cache.with_remote(crate::remote::Remote::open(url)?),
        None => cache,
    })
}

/// `push` / `pull`: every result and image the recipe's plan names.
fn sync(a: SyncArgs, push: bool) -> Result<()> {
    use crate::remote::Kind;
    let recipe =
        crate::recipe::load_with(&a.recipe, &a.set).map_err(|e| Error::Recipe(Box::new(e)))?;
    let cache = recipe_cache(&a.recipe, a.cache.as_deref(), Some(&a.remote))?;
    let plan = crate::build::plan(&recipe, &cache, &a.targets)?;
    let items: Vec<(String, Kind)> = plan
        .iter()
        .flat_map(|p| crate::build::stored_objects(&recipe.nodes[&p.name], &p.key, &p.preimage))
        .collect();
    let verb = if push { "push" } else { "pull" };
    let bar = crate::progress::count(items.len() as u64, verb, !a.json);
    let (mut here, mut created) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (key, kind) in &items {
        let done = match push {
            true => cache.push(key, *kind).map(|(stored, new)| {
                created += usize::from(new);
                stored
            }),
            false => cache.pull(key, *kind),
        };
        match done {
            Ok(present) => here += usize::from(present),
            Err(e) => failures.push(e.to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = cache.remote().expect("sync has a remote").finish();
    if a.json {
        print_json(&serde_json::json!({
            "items": items.len(),
            "present": here,
            "entries_created": created,
            "failures": failures,
            "remote": summary,
        }))?;
    } else {
        for f in &failures {
            eprintln!("failed: {f}");
        }
        match push {
            true => println!(
                "{here} of {} results and images are stored here; {created} new on the remote",
                items.len()
            ),
            false => println!("{here} of {} results and images are here now", items.len()),
        }
        println!("{}", summary.line());
    }
    match failures.len() {
        0 => Ok(()),
        n => Err(Error::Failed(format!(
            "{n} of {} failed to {verb}",
            items.len()
        ))),
    }
}

fn build(a: BuildArgs, plan_only: bool, report: Option<&std::path::Path>) -> Result<()> {
    let cache = recipe_cache(&a.recipe, a.cache.as_deref(), a.remote.as_deref())?;
    let json = a.json;
    let result = build_with(a, &cache, plan_only, report);
    if let Some(remote) = cache.remote() {
        let summary = remote.finish();
        let moved = summary.uploaded_objects + summary.downloaded_objects + summary.discarded;
        if !json && (moved > 0 || !summary.errors.is_empty()) {
            eprintln!("{}", summary.line());
        }
    }
    result
}

fn build_with(
    mut a: BuildArgs,
    cache: &crate::build::Cache,
    plan_only: bool,
    report: Option<&std::path::Path>,
) -> Result<()> {
    use crate::build::Status;
    let mut recipe =
        crate::recipe::load_with(&a.recipe, &a.set).map_err(|e| Error::Recipe(Box::new(e)))?;
    if a.tokenizer.is_some() {
        recipe.tokenizer = a.tokenizer.clone();
    }
    if let Some(shard) = a.shard {
        a.targets = crate::build::shard::targets(&recipe, &a.targets, shard)?;
        if !a.json {
            eprintln!(
                "shard {}/{}: {}",
                shard.index,
                shard.count,
                match a.targets.is_empty() {
                    true => "nothing to build".to_string(),
                    false => a.targets.join(", "),
                }
            );
        }
        if a.targets.is_empty() {
            return match a.json {
                true => print_json(&Vec::<()>::new()),
                false => Ok(()),
            };
        }
    }
    if plan_only {
        let plan = crate::build::plan(&recipe, cache, &a.targets)?;
        if a.json {
            return print_json(&plan);
        }
        for p in &plan {
            match &p.status {
                Status::Hit => println!("HIT   {}  ({})", p.name, &p.key[..12]),
                Status::Miss(why) => {
                    println!("MISS  {}  ({}): {}", p.name, &p.key[..12], why.join("; "))
                }
                Status::Skip(why) => println!("SKIP  {}  ({}): {why}", p.name, &p.key[..12]),
            }
        }
        return Ok(());
    }
    let opts = crate::build::BuildOptions {
        run: crate::merge::RunOptions {
            overwrite: true,
            progress: !a.json,
            device: a.device,
        },
        jobs: a.jobs,
        keep_going: a.keep_going,
    };
    let started = std::time::Instant::now();
    let reports = crate::build::build(&recipe, cache, &a.targets, &opts)?;
    let lock = crate::build::lock::write(&recipe, &cache.memo())?;
    let id = cache.append_log(&a.recipe, &reports)?;
    let site = report
        .map(|out| crate::report::write(&recipe, cache, &reports, out))
        .transpose()?;
    let failures: Vec<&String> = reports.iter().filter_map(|r| r.error.as_ref()).collect();
    let failed = || -> Result<()> {
        match failures.len() {
            0 => Ok(()),
            n => Err(Error::Failed(format!("{n} node(s) failed"))),
        }
    };
    if a.json {
        match site {
            Some(site) => print_json(&serde_json::json!({ "nodes": reports, "site": site }))?,
            None => print_json(&reports)?,
        };
        return failed();
    }
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if let Some(site) = &site {
        println!(
            "report: {} ({} pages, {} new images)",
            site.index.display(),
            site.pages.len(),
            site.images_copied
        );
    }
    let built = reports
        .iter()
        .filter(|r| matches!(r.plan.status, Status::Miss(_)))
        .count();
    for r in &reports {
        match &r.plan.status {
            Status::Hit => println!("cached  {}", r.plan.name),
            Status::Skip(why) => println!("skipped {}  ({why})", r.plan.name),
            Status::Miss(_) => println!(
                "built   {}  {:.1} s{}{}",
                r.plan.name,
                r.seconds,
                match (r.stored, r.reused) {
                    (Some(c), Some(u)) => match recipe.nodes[&r.plan.name] {
                        crate::recipe::Node::Generate { .. } => {
                            format!("  ({c} images made, {u} found in the cache)")
                        }
                        crate::recipe::Node::Xy { .. } => {
                            format!("  ({c} grids made, {u} found in the cache)")
                        }
                        _ => format!("  ({c} tensors stored, {u} reused)"),
                    },
                    _ => String::new(),
                },
                r.output
                    .as_ref()
                    .map(|o| format!("  -> {}", o.display()))
                    .unwrap_or_default()
            ),
        }
    }
    let cached = reports
        .iter()
        .filter(|r| r.plan.status == Status::Hit)
        .count();
    println!(
        "build #{id}: {} nodes, {built} built, {cached} cached, {} skipped, in {:.1} s; hashes in {}",
        reports.len(),
        reports.len() - built - cached,
        started.elapsed().as_secs_f64(),
        lock.display()
    );
    failed()
}

/// `mergesmith gen`.
fn gen(a: GenArgs) -> Result<()> {
    use crate::gen::job::Job;
    use crate::gen::pipeline::Models;
    let started = std::time::Instant::now();
    let tok = crate::gen::tokenizer::ClipTokenizer::find(a.tokenizer.as_deref())?;
    let memo = crate::hashing::HashMemo::new(&crate::hashing::default_cache_dir());
    let hashes = memo.hashes(&a.model)?.0;
    let job = Job {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler: a.sampler,
        seed: a.seed,
        batch: a.batch.max(1),
        width: a.width,
        height: a.height,
        clip_skip: a.clip_skip.max(1),
        hires: a.hires_scale.map(|scale| crate::gen::png::Hires {
            scale,
            steps: a.hires_steps,
            strength: a.hires_strength,
        }),
        prediction: a.prediction,
    };
    let outputs: Vec<PathBuf> = match job.batch {
        1 => vec![a.out.output.clone()],
        n => (1..=n)
            .map(|i| {
                let stem = a
                    .out
                    .output
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy();
                a.out.output.with_file_name(format!("{stem}-{i}.png"))
            })
            .collect(),
    };
    if !a.out.overwrite {
        if let Some(p) = outputs.iter().find(|p| p.exists()) {
            return Err(Error::OutputExists { path: p.clone() });
        }
    }
    let ck = std::sync::Arc::new(crate::checkpoint::Checkpoint::open(&a.model)?);
    let models = Models::load_on(ck, a.device)?;
    let model = a
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (seed, out) in job.seeds().zip(&outputs) {
        let key = job.image_key(&hashes.blake3, &tok.key, seed);
        let name = (model.as_str(), hashes.autov2.as_str());
        job.write_image(&models, &tok, seed, &key, name, out, a.out.overwrite)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    if a.out.json {
        return print_json(&serde_json::json!({ "outputs": outputs, "seconds": seconds }));
    }
    for o in &outputs {
        println!("wrote {}", o.display());
    }
    println!("{} image(s) in {seconds:.1} s", outputs.len());
    Ok(())
}
