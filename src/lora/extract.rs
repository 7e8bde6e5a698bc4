//! Extracting a LoRA from two checkpoints (lora.md §3): for every module sd-scripts trains by
//! default, `ΔW = alpha · A − beta · B` is factored at the requested rank by a truncated SVD
//! (`svd`, in f64; the factors are stored in f32), clamped at the 0.99 quantile, and written in kohya format with
//! `alpha = rank` and kohya / modelspec metadata. Text encoders are left out when they do not
//! differ (max |ΔW| over all of them ≤ `min_diff`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::arch::{self, Family};
use crate::checkpoint::quant::Quant;
use crate::checkpoint::Checkpoint;
use crate::convert;
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::lora::names::Targets;
use crate::lora::{svd, Factored, KohyaLora};

/// Options of an extraction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExtractOptions {
    /// Rank of linear and 1x1 modules (sd-scripts `--dim`).
    pub rank: usize,
    /// Rank of 3x3 convolutions; `None` leaves convolutions out (no LoCon).
    pub conv_rank: Option<usize>,
    /// Weight of model A (the tuned model).
    pub alpha: f64,
    /// Weight of model B (the base).
    pub beta: f64,
    /// Text encoders whose largest change is at most this are left out.
    pub min_diff: f64,
    /// Quantile at which factors are clamped (1 = no clamp).
    pub clamp_quantile: f64,
    /// Output dtype.
    pub dtype: FloatType,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 128,
            conv_rank: None,
            alpha: 1.0,
            beta: 1.0,
            min_diff: 0.01,
            clamp_quantile: 0.99,
            dtype: FloatType::Fp32,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractReport {
    /// Modules written.
    pub modules: usize,
    /// Whether the text encoders were included.
    pub text_encoder: bool,
    /// Largest |ΔW| over the text-encoder modules.
    pub text_encoder_max_diff: f64,
    /// ‖ΔW − up·down‖_F / ‖ΔW‖_F over all modules written (clamp included).
    pub relative_error: f64,
    /// The same for the best rank-r approximations (Eckart–Young, no clamp).
    pub optimal_relative_error: f64,
}

fn is_text_encoder(module: &str) -> bool {
    module.starts_with("lora_te")
}

/// One module to extract: name, checkpoint key, row slice, target shape.
#[derive(Debug)]
struct Job {
    name: String,
    key: String,
    rows: Option<(usize, usize)>,
    shape: Vec<usize>,
}

/// The f32 values of `key` (dequantized with `scale`, the scaled-fp8 scale it is stored
/// with), or rows of it.
fn weight_rows(
    ck: &Checkpoint,
    key: &str,
    rows: Option<(usize, usize)>,
    scale: Option<f32>,
) -> Result<Vec<f32>> {
    let t = ck.get(key).ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: key.to_string(),
    })?;
    let mut v = convert::to_f32(t.dtype, &ck.data(t))?;
    if let Some(s) = scale {
        v.iter_mut().for_each(|x| *x *= s);
    }
    ck.release(t);
    Ok(match rows {
        None => v,
        Some((a, b)) => {
            let cols = t.numel() / t.shape[0].max(1);
            v[a * cols..b * cols].to_vec()
        }
    })
}

/// The modules an extraction factors, checked against both checkpoints.
#[derive(Debug)]
pub struct ExtractPlan {
    family: Family,
    jobs: Vec<Job>,
    /// Scaled-fp8 scales of A's and B's weights.
    scales: [Quant; 2],
}

/// Plans the extraction of a LoRA of `a` (tuned) relative to `b` (base) on their headers:
/// same family, every module resolves, the same shapes in both.
pub fn plan(a: &Checkpoint, b: &Checkpoint, opts: &ExtractOptions) -> Result<ExtractPlan> {
    let scales = [Quant::of(a)?, Quant::of(b)?];
    let family = arch::detect(a.tensors()).family;
    let other = arch::detect(b.tensors()).family;
    if family != other {
        return Err(Error::Invalid(format!(
            "cannot extract a LoRA between {} ({}) and {} ({})",
            family.label(),
            a.path().display(),
            other.label(),
            b.path().display()
        )));
    }
    let targets = Targets::of(a);
    let mut jobs = Vec::new();
    for (name, shape) in crate::lora::synth::modules_of(a, opts.conv_rank.is_some()) {
        let t = targets
            .get(&name)
            .ok_or_else(|| Error::Invalid(format!("module `{name}` does not resolve")))?;
        let (ta, tb) = (a.get(&t.key), b.get(&t.key));
        if ta.map(|t| &t.shape) != tb.map(|t| &t.shape) {
            return Err(Error::Invalid(format!(
                "`{}` has different shapes in {} and {}",
                t.key,
                a.path().display(),
                b.path().display()
            )));
        }
        jobs.push(Job {
            name,
            key: t.key.clone(),
            rows: t.rows,
            shape,
        });
    }
    if jobs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no weight a LoRA for {} targets",
            a.path().display(),
            family.label()
        )));
    }
    Ok(ExtractPlan {
        family,
        jobs,
        scales,
    })
}

impl ExtractPlan {
    /// The tensors (name, shape) the LoRA has, text encoders included (they are left out
    /// when they do not differ, which only the weights tell).
    pub fn layout(&self, opts: &ExtractOptions) -> Vec<(String, Vec<usize>)> {
        crate::lora::kohya_layout(self.jobs.iter().map(|j| {
            (
                j.name.as_str(),
                j.shape.as_slice(),
                svd::rank_for(&j.shape, opts.rank, opts.conv_rank),
            )
        }))
    }
}

/// Runs a planned extraction; `title` names the LoRA in its metadata.
pub fn run(
    a: &Checkpoint,
    b: &Checkpoint,
    plan: ExtractPlan,
    opts: &ExtractOptions,
    title: &str,
    progress: bool,
) -> Result<(KohyaLora, ExtractReport)> {
    let delta = |j: &Job| -> Result<Vec<f32>> {
        let wa = weight_rows(a, &j.key, j.rows, plan.scales[0].scale(&j.key))?;
        let wb = weight_rows(b, &j.key, j.rows, plan.scales[1].scale(&j.key))?;
        let (ka, kb) = (opts.alpha as f32, opts.beta as f32);
        Ok(wa.iter().zip(&wb).map(|(x, y)| ka * x - kb * y).collect())
    };
    // The text-encoder gate needs every TE delta first.
    let mut te_max = 0f64;
    for j in plan.jobs.iter().filter(|j| is_text_encoder(&j.name)) {
        let d = delta(j)?;
        te_max = d.iter().fold(te_max, |m, x| m.max(x.abs() as f64));
    }
    let with_te = te_max > opts.min_diff;
    let jobs: Vec<&Job> = plan
        .jobs
        .iter()
        .filter(|j| with_te || !is_text_encoder(&j.name))
        .collect();
    let bar = crate::progress::count(jobs.len() as u64, "extract", progress);
    let (mut err2, mut opt2, mut norm2) = (0f64, 0f64, 0f64);
    let mut modules = Vec::new();
    for j in jobs.iter().copied() {
        let m = svd::factor_module(
            &delta(j)?,
            &j.shape,
            opts.rank,
            opts.conv_rank,
            opts.clamp_quantile,
        )?;
        let f = m.factors;
        err2 += m.error2;
        opt2 += f.optimal_error.powi(2);
        norm2 += m.norm2;
        modules.push(Factored {
            name: j.name.clone(),
            shape: j.shape.clone(),
            alpha: f.rank as f32,
            rank: f.rank,
            up: f.up,
            down: f.down,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rel = |x: f64| if norm2 > 0.0 { (x / norm2).sqrt() } else { 0.0 };
    let report = ExtractReport {
        modules: jobs.len(),
        text_encoder: with_te,
        text_encoder_max_diff: te_max,
        relative_error: rel(err2),
        optimal_relative_error: rel(opt2),
    };
    let lora = KohyaLora {
        modules,
        metadata: metadata(plan.family, opts, title),
    };
    Ok((lora, report))
}

/// Extracts a LoRA of `tuned` relative to `base` into `out`.
pub fn extract(
    tuned: &Path,
    base: &Path,
    opts: &ExtractOptions,
    out: &Path,
    overwrite: bool,
    progress: bool,
) -> Result<ExtractReport> {
    if !overwrite && out.exists() {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let (a, b) = (Checkpoint::open(tuned)?, Checkpoint::open(base)?);
    let plan = plan(&a, &b, opts)?;
    let title = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (lora, report) = run(&a, &b, plan, opts, &title, progress)?;
    lora.write(out, opts.dtype.dtype(), overwrite)?;
    Ok(report)
}

/// kohya (`ss_*`) and modelspec metadata of an extracted LoRA.
fn metadata(family: Family, opts: &ExtractOptions, title: &str) -> BTreeMap<String, String> {
    let facts = family.facts();
    let sd1 = Family::builtin("sd1").facts();
    let fact = |f: &'static Option<String>, d: &'static Option<String>| {
        f.as_deref().or(d.as_deref()).unwrap_or_default()
    };
    let base = fact(&facts.ss_base_model_version, &sd1.ss_base_model_version);
    let arch = format!(
        "{}/lora",
        fact(&facts.modelspec_architecture, &sd1.modelspec_architecture)
    );
    let res = facts.resolution.or(sd1.resolution).unwrap_or(512);
    let res = format!("{res}x{res}");
    let args = match opts.conv_rank {
        Some(c) => format!(
            "{{\"conv_dim\": \"{c}\", \"conv_alpha\": \"{:.1}\"}}",
            c as f64
        ),
        None => "{}".to_string(),
    };
    let implementation = fact(
        &facts.modelspec_implementation,
        &sd1.modelspec_implementation,
    );
    [
        (
            "ss_network_module",
            fact(&facts.ss_network_module, &sd1.ss_network_module).to_string(),
        ),
        ("ss_network_dim", opts.rank.to_string()),
        ("ss_network_alpha", format!("{:.1}", opts.rank as f64)),
        ("ss_network_args", args),
        (
            "ss_v2",
            if facts.ss_v2 { "True" } else { "False" }.to_string(),
        ),
        ("ss_base_model_version", base.to_string()),
        ("modelspec.sai_model_spec", "1.0.1".to_string()),
        ("modelspec.architecture", arch.to_string()),
        ("modelspec.implementation", implementation.to_string()),
        ("modelspec.title", title.to_string()),
        ("modelspec.resolution", res.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}
