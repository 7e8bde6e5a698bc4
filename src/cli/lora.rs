//! `mergesmith lora ...`: bake, extract, merge and synthesise LoRAs.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use mergesmith::dtype::FloatType;
use mergesmith::error::Result;
use mergesmith::lora::extract::{extract, ExtractOptions};
use mergesmith::lora::merge::{MergeMode, MetadataMode};

use super::{choice, print_json, OutputArgs};

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
    #[arg(long, value_parser = choice::<FloatType>(), default_value = "fp32")]
    pub dtype: FloatType,
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
    /// concat (exact, LoRA/LoCon), svd (any type, new rank), kohya (ups and downs summed, as
    /// sd-scripts and SuperMerger do) or extract (SuperMerger's extract from two LoRAs).
    #[arg(long, value_parser = choice::<MergeMode>(), default_value = "concat")]
    pub mode: MergeMode,
    /// kohya / extract / svd: SuperMerger's "same to Strength" (√|ratio| on both factors, the
    /// sign on lora_down).
    #[arg(long)]
    pub same_to_strength: bool,
    /// extract: 0 keeps the first LoRA's factors, 1 the second's [default: 0.5].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// extract: 0 keeps what the two share, 1 where they differ [default: 0.5].
    #[arg(long)]
    pub beta: Option<f64>,
    /// extract: sharpness of the similarity weighting [default: 1].
    #[arg(long)]
    pub gamma: Option<f64>,
    /// What the file's metadata holds: new, new_without_name, merge (tags of all files),
    /// all, first (SuperMerger's choices).
    #[arg(long, value_parser = choice::<MetadataMode>(), default_value = "new")]
    pub metadata: MetadataMode,
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
    #[arg(long, value_parser = choice::<FloatType>(), default_value = "fp32")]
    pub dtype: FloatType,
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
    use mergesmith::lora::bake::{bake_file, Application};
    let family =
        mergesmith::arch::detect(mergesmith::checkpoint::Checkpoint::open(&a.model)?.tensors())
            .family;
    let mut apps = Vec::new();
    let mut record = Vec::new();
    for spec in &a.loras {
        let (path, strength, blocks) = lora_spec(spec)?;
        let file = mergesmith::lora::LoraFile::open(&path)?;
        let app = Application::new(file, strength, blocks.as_deref(), Some(family), a.fill)?;
        let hashes = super::memo(None).hashes(&path)?.0;
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

/// Runs `lora apply|extract|merge|synth`.
pub fn run(cmd: LoraCommand) -> Result<()> {
    match cmd {
        LoraCommand::Apply(a) => lora_apply(a),
        LoraCommand::Extract(a) => lora_extract(a),
        LoraCommand::Merge(a) => lora_merge(a),
        LoraCommand::Synth {
            model,
            rank,
            conv_rank,
            seed,
            output,
            overwrite,
        } => {
            let started = std::time::Instant::now();
            let n = mergesmith::lora::synth::synthesize(
                &model, rank, conv_rank, seed, &output, overwrite,
            )?;
            println!(
                "wrote {} ({n} modules) in {:.1} s",
                output.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn lora_extract(a: LoraExtractArgs) -> Result<()> {
    let opts = ExtractOptions {
        rank: a.rank,
        conv_rank: a.conv_rank,
        alpha: a.alpha,
        beta: a.beta,
        min_diff: a.min_diff,
        clamp_quantile: a.clamp_quantile,
        dtype: a.dtype,
    };
    let started = std::time::Instant::now();
    let r = extract(
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

fn lora_merge(a: LoraMergeArgs) -> Result<()> {
    use mergesmith::lora::bake::Application;
    use mergesmith::lora::merge::{merge, ExtractWeights, MergeOptions};
    let mut sources = Vec::new();
    for spec in &a.loras {
        let (path, ratio, blocks) = lora_spec(spec)?;
        let file = mergesmith::lora::LoraFile::open(&path)?;
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
        same_to_strength: a.same_to_strength,
        extract: ExtractWeights::given(a.mode, a.alpha, a.beta, a.gamma),
        metadata: a.metadata,
    };
    let r = merge(&sources, &opts, &a.out.output, a.out.overwrite)?;
    for w in &r.warnings {
        if !a.out.json {
            eprintln!("warning: {w}");
        }
    }
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
