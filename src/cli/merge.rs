//! `mergesmith merge`: a one-shot merge: SuperMerger's modes on two or three files, or a
//! list method of the registry on N files (`--model` / `--delta`, `--param NAME=VALUE`).

use std::path::PathBuf;

use clap::Args;
use mergesmith::dtype::{FloatType, Rounding};
use mergesmith::error::{Error, Result};
use mergesmith::merge::method::Method;
use mergesmith::merge::numerics::Numerics;
use mergesmith::merge::{CalcMode, Mode};

use super::{choice, print_json, OutputArgs};

/// Arguments of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Merge method: weight_sum, add_difference, triple_sum, sum_twice (with -a/-b/-c), or a
    /// list method (linear, slerp, task_arithmetic, ties, dare, dare_ties, della,
    /// della_linear, model_stock, geometric_median) with --model/--delta; `mergesmith
    /// methods` lists them.
    #[arg(long, default_value = "weight_sum", value_name = "METHOD")]
    pub mode: String,
    /// Model A (the base).
    #[arg(short = 'a', long = "model-a", value_name = "FILE")]
    pub a: Option<PathBuf>,
    /// Model B.
    #[arg(short = 'b', long = "model-b", value_name = "FILE")]
    pub b: Option<PathBuf>,
    /// List methods: the base model (task arithmetic, TIES, DARE, DELLA, model stock).
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// List methods: a full model input (repeat for each).
    #[arg(long = "model", value_name = "FILE")]
    pub models: Vec<PathBuf>,
    /// List methods: a delta input, FILE minus the base (repeat for each).
    #[arg(long = "delta", value_name = "FILE")]
    pub deltas: Vec<PathBuf>,
    /// List methods: each input's weight, in input order (a number, preset or block vector;
    /// default 1).
    #[arg(long = "weight", allow_hyphen_values = true, value_name = "W")]
    pub weights: Vec<String>,
    /// List methods: a parameter, NAME=VALUE (e.g. density=0.3, rescale=l1, t=0.5).
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
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
    #[arg(long, value_parser = choice::<CalcMode>(), default_value = "normal")]
    pub calcmode: CalcMode,
    /// extract's gamma: how sharply similarity selects features.
    #[arg(long, default_value_t = mergesmith::merge::method::supermerger::GAMMA_DEFAULT)]
    pub gamma: f64,
    /// Seed of random calcmodes (plusRandom) and of --rounding stochastic.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output type of float tensors [default: keep model A's].
    #[arg(long, value_parser = choice::<FloatType>())]
    pub dtype: Option<FloatType>,
    /// How fp8 outputs round: nearest (even) or stochastic (seeded by --seed; the same bytes
    /// whatever the thread count).
    #[arg(long, value_parser = choice::<Rounding>(), default_value = "nearest")]
    pub rounding: Rounding,
    /// Write scaled fp8 (ComfyUI's `scaled_fp8` marker + per-layer `scale_weight`), also from
    /// a plain input: the diffusion model's linear weights in the fp8 type (--dtype, or A's),
    /// every other tensor as A stores it.
    #[arg(long)]
    pub scaled: bool,
    /// Elemental merge: `blocks:elements:ratio` entries (comma or newline separated) that
    /// override alpha per key, e.g. "OUT03 OUT04:attn2:0.5,NOT IN00-IN05:ff:0".
    #[arg(long, value_name = "TEXT")]
    pub elemental: Option<String>,
    /// Compatibility: read SDXL block names in --elemental shifted, as SuperMerger reads them
    /// (M00 as IN09, OUT00 as IN10, OUT03 as OUT00, ...).
    #[arg(long)]
    pub xl_elemental_shift: bool,
    /// Dice seed (SuperMerger's "Let the dice roll"): draws the R, U, X, D, ER, EU, EX tokens of
    /// --alpha/--beta (or ALL_R, ALL_U, ALL_X) and R/U/X elemental ratios as SuperMerger does.
    #[arg(long, value_name = "SEED")]
    pub dice_seed: Option<u32>,
    /// Dice: decimals kept.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub dice_round: u32,
    /// Dice: X's upper limit and D's middle (one value, or one per block) [default: 1].
    #[arg(long, allow_hyphen_values = true, value_name = "V|v1,...")]
    pub dice_upper: Option<String>,
    /// Dice: X's lower limit and D's width (one value, or one per block) [default: 0].
    #[arg(long, allow_hyphen_values = true, value_name = "V|v1,...")]
    pub dice_lower: Option<String>,
    /// Dice: upper clamp of drawn block values [default: 1].
    #[arg(long, allow_hyphen_values = true, value_name = "V|v1,...")]
    pub dice_max: Option<String>,
    /// Dice: lower clamp of drawn block values [default: 0].
    #[arg(long, allow_hyphen_values = true, value_name = "V|v1,...")]
    pub dice_min: Option<String>,
    /// The arithmetic: f32 (one rounding; more accurate) or supermerger (SuperMerger's own
    /// roundings and output dtypes, to rebuild its merges bit for bit).
    #[arg(long, value_parser = choice::<Numerics>(), default_value = "f32")]
    pub numerics: Numerics,
    /// The block list that --alpha/--beta vectors and --elemental name: supermerger, comfyui
    /// (Flux, ...), extended (SDXL); default: the list whose length the vector has
    /// (`mergesmith families` lists them).
    #[arg(long, value_name = "LIST")]
    pub block_list: Option<String>,
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
    pub device: mergesmith::device::ComputeDevice,
}

/// Runs `merge`.
pub fn run(a: MergeArgs) -> Result<()> {
    use mergesmith::merge::method::{self, Engine};
    use mergesmith::merge::{MergeFiles, MergeSpec, Presets, Ratio};
    let mut presets = Presets::default();
    for p in &a.presets {
        presets.add_file(p)?;
    }
    let m = method::find(&a.mode).ok_or_else(|| Error::Invalid(method::unknown(&a.mode)))?;
    let mode: Mode = match m.engine {
        Engine::SuperMerger(mode) => mode,
        Engine::Streamed(_) => return run_list(&a, m, &presets),
    };
    let list_flags = a.base.is_some()
        || !a.models.is_empty()
        || !a.deltas.is_empty()
        || !a.weights.is_empty()
        || !a.params.is_empty();
    if list_flags {
        return Err(Error::Invalid(format!(
            "--base/--model/--delta/--weight/--param go with list methods; {} takes -a, -b (and -c)",
            m.name
        )));
    }
    let (Some(model_a), Some(model_b)) = (&a.a, &a.b) else {
        return Err(Error::Invalid(format!("{} needs -a and -b", m.name)));
    };
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
    let dice = a.dice_seed.map(|seed| mergesmith::merge::dice::Dice {
        seed,
        round: a.dice_round,
        upper: a.dice_upper.clone(),
        lower: a.dice_lower.clone(),
        max: a.dice_max.clone(),
        min: a.dice_min.clone(),
    });
    let mut roller = mergesmith::merge::dice::Roller::new(dice.as_ref(), a.xl_elemental_shift);
    let mut ratio = |text: &str, beta: bool| -> Result<Ratio> {
        match roller.roll(text, beta)? {
            Some(values) => Ok(Ratio::Blocks(values)),
            None => Ratio::parse(text, &presets),
        }
    };
    let alpha = ratio(alpha_text, false)?;
    let beta = a.beta.as_deref().map(|b| ratio(b, true)).transpose()?;
    let elemental = roller.elemental(a.elemental.clone());
    let spec = MergeSpec {
        mode,
        alpha,
        beta,
        calcmode: a.calcmode,
        gamma: a.gamma,
        seed: a.seed,
        dtype: a.dtype,
        rounding: a.rounding,
        scaled: a.scaled,
        prune: a.prune,
        reset_position_ids: a.reset_position_ids,
        elemental,
        xl_elemental_shift: a.xl_elemental_shift,
        block_list: a.block_list.clone(),
        filter: match (a.include, a.exclude) {
            (true, _) => Some(mergesmith::merge::FilterMode::Include),
            (_, true) => Some(mergesmith::merge::FilterMode::Exclude),
            _ => None,
        }
        .map(|mode| mergesmith::merge::FilterSpec {
            mode,
            blocks: a.blocks.clone(),
            elements: a.elements.clone(),
        }),
        adjust: a
            .adjust
            .as_deref()
            .map(mergesmith::merge::select::parse_adjust)
            .transpose()?
            .flatten(),
        dice,
        numerics: a.numerics,
        bake_vae: a.bake_vae.clone(),
    };
    if spec.filter.is_none() && !(a.blocks.is_empty() && a.elements.is_empty()) {
        return Err(Error::Invalid(
            "--blocks/--elements need --include or --exclude".into(),
        ));
    }
    let files = MergeFiles {
        a: model_a,
        b: model_b,
        c: a.c.as_deref(),
    };
    let memo = super::memo(a.cache.as_deref());
    let started = std::time::Instant::now();
    let (plan, report) = mergesmith::merge::merge_files(
        &files,
        &spec,
        &a.out.output,
        &memo,
        &mergesmith::merge::RunOptions {
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
            "kept": plan.kept,
            "markers": plan.markers,
            "layouts": plan.layouts,
        }}));
    }
    for line in plan.notes() {
        eprintln!("note: {line}");
    }
    println!(
        "wrote {} ({}: {} tensors, {} blended, {}) in {:.1} s",
        report.path.display(),
        plan.arch,
        report.tensors,
        report.blended,
        mergesmith::inspect::human_bytes(report.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs a list method.
fn run_list(a: &MergeArgs, m: &'static Method, presets: &mergesmith::merge::Presets) -> Result<()> {
    use mergesmith::merge::method::parse_cli_param;
    use mergesmith::merge::multi::{self, ListFiles, ListSpec};
    use mergesmith::merge::Ratio;
    if a.a.is_some() || a.b.is_some() || a.c.is_some() {
        return Err(Error::Invalid(format!(
            "{} is a list method: give --model/--delta (and --base), not -a/-b/-c",
            m.name
        )));
    }
    let supermerger_only = [
        ("--alpha", a.alpha != "0.5"),
        ("--mbw", a.mbw.is_some()),
        ("--beta", a.beta.is_some()),
        ("--calcmode", a.calcmode != CalcMode::Normal),
        (
            "--gamma",
            a.gamma != mergesmith::merge::method::supermerger::GAMMA_DEFAULT,
        ),
        ("--seed (list methods: -p seed=N)", a.seed != 0),
        ("--rounding", a.rounding != Rounding::Nearest),
        ("--scaled", a.scaled),
        ("--elemental", a.elemental.is_some()),
        ("--xl-elemental-shift", a.xl_elemental_shift),
        ("--numerics", a.numerics != Numerics::F32),
        ("--dice-seed", a.dice_seed.is_some()),
        ("--include/--exclude", a.include || a.exclude),
        ("--adjust", a.adjust.is_some()),
        ("--prune", a.prune),
        ("--reset-position-ids", a.reset_position_ids),
        ("--bake-vae", a.bake_vae.is_some()),
    ];
    let set: Vec<&str> = supermerger_only
        .iter()
        .filter_map(|(f, on)| on.then_some(*f))
        .collect();
    if !set.is_empty() {
        return Err(Error::Invalid(format!(
            "{} is a list method: SuperMerger's {} does not apply (its parameters, given with -p NAME=VALUE: {})",
            m.name,
            set.join(", "),
            m.params
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if a.device != mergesmith::device::ComputeDevice::Cpu {
        return Err(Error::Invalid(format!(
            "{} runs on the CPU only (its kernels are mergesmith's streamed CPU kernels); drop --device {}",
            m.name, a.device
        )));
    }
    if !a.models.is_empty() && !a.deltas.is_empty() {
        return Err(Error::Invalid(format!(
            "{} takes either full models (--model) or deltas (--delta), not both",
            m.name
        )));
    }
    let terms: Vec<(std::path::PathBuf, Option<std::path::PathBuf>)> = if a.deltas.is_empty() {
        a.models.iter().map(|p| (p.clone(), None)).collect()
    } else {
        let base = a.base.clone().ok_or_else(|| {
            Error::Invalid("--delta inputs are taken from --base; give --base".into())
        })?;
        a.deltas
            .iter()
            .map(|p| (p.clone(), Some(base.clone())))
            .collect()
    };
    let weights = match a.weights.len() {
        0 => vec![Ratio::Scalar(1.0); terms.len()],
        n if n == terms.len() => a
            .weights
            .iter()
            .map(|w| Ratio::parse(w, presets))
            .collect::<Result<Vec<_>>>()?,
        n => {
            return Err(Error::Invalid(format!(
                "{n} --weight values for {} inputs (give one per input, or none)",
                terms.len()
            )))
        }
    };
    if !a.weights.is_empty()
        && !matches!(
            m.takes,
            mergesmith::merge::method::Takes::List { weighted: true, .. }
        )
    {
        return Err(Error::Invalid(format!(
            "{} takes no per-input weight",
            m.name
        )));
    }
    let mut written = std::collections::BTreeMap::new();
    for p in &a.params {
        let (k, v) = parse_cli_param(p).map_err(Error::Invalid)?;
        written.insert(k, v);
    }
    let params = m
        .params_of(&written, presets)
        .map_err(|(_, e)| Error::Invalid(e))?;
    let spec = ListSpec {
        method: m,
        params,
        weights,
        dtype: a.dtype,
        block_list: a.block_list.clone(),
    };
    let files = ListFiles {
        base: a.base.clone(),
        terms,
    };
    let memo = super::memo(a.cache.as_deref());
    let started = std::time::Instant::now();
    let (plan, report) = multi::merge_files(
        &files,
        &spec,
        &a.out.output,
        &memo,
        &mergesmith::merge::RunOptions {
            overwrite: a.out.overwrite,
            progress: !a.out.json,
            device: a.device,
        },
    )?;
    if a.out.json {
        return print_json(&serde_json::json!({ "report": report, "plan": {
            "architecture": plan.arch,
            "method": m.name,
            "merged": plan.merged(),
            "kept": plan.kept,
            "left_out": plan.left_out,
        }}));
    }
    for line in plan.notes() {
        eprintln!("note: {line}");
    }
    println!(
        "wrote {} ({} of {} inputs, {}: {} tensors, {} merged, {}) in {:.1} s",
        report.path.display(),
        m.name,
        files.terms.len(),
        plan.arch,
        report.tensors,
        report.merged,
        mergesmith::inspect::human_bytes(report.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
