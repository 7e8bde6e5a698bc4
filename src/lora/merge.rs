//! Merging LoRAs into one (lora.md §2.3, §4), module by module. Modules are matched by the
//! weight they change (resolved through the family's reference layout), so files in different
//! spellings merge together; the result is always written with kohya names.
//!
//! - `concat` (exact): each file's factors are scaled by `√|c|` (the sign on `up`) with
//!   `c = ratio · block weight · alpha / rank`, then concatenated along the rank; the result
//!   has `alpha = total rank` (scale 1) and equals `Σ c · up · down` exactly, for any ranks.
//!   LoRA / LoCon modules without `lora_mid` only.
//! - `svd`: `M = Σ ratio · block weight · ΔW` for any adapter type, refactored at a new rank
//!   by truncated SVD (optimal in Frobenius norm), clamped at a quantile, `alpha = rank`.
//!   SuperMerger's "remake dimension" merge.
//! - `kohya`: sd-scripts' and SuperMerger's default ("same dims"): ups and downs are summed
//!   separately, each scaled by `ratio · √(alpha / alpha₀)` (`alpha₀` the first file's), and
//!   the first file's alpha is kept. Cross terms between files enter the result and the ratio
//!   acts squared with its sign lost; with `same_to_strength` (SuperMerger's option) both
//!   factors get `√|ratio|` and `lora_down` the sign, which is exact for one file. Every
//!   file must have the module at the same rank.
//! - `extract`: SuperMerger's "extract from two LoRAs": each factor of the first LoRA (`a`)
//!   and of the second (`b`, rescaled to the first's alpha) is merged by the extract formula
//!   of the checkpoint calcmode with base 0, row by row of its last axis:
//!   `lerp(a, b, alpha) · lerp(d, 1 − d, beta)`, `d = ((cos(a, b) + 1) / 2)^gamma`.
//!
//! The merged file's metadata follows one of SuperMerger's five choices ([`MetadataMode`]);
//! every mode records `sshs_model_hash` and `sshs_legacy_hash` (the hashes the
//! additional-networks extension identifies a LoRA by), computed from the bytes written.

use std::collections::BTreeMap;
use std::path::Path;

use crate::arch::Family;
use crate::checkpoint::Checkpoint;
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::lora::bake::Application;
use crate::lora::delta::{delta, natural_shape};
use crate::lora::names::Targets;
use crate::lora::{svd, Factored, Kind, KohyaLora};

/// How LoRAs are combined.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    /// Exact concatenation along the rank (LoRA / LoCon without lora_mid).
    Concat,
    /// Sum of the deltas refactored by truncated SVD (any adapter type).
    Svd,
    /// Ups and downs summed separately (sd-scripts' and SuperMerger's default; same ranks).
    Kohya,
    /// SuperMerger's "extract from two LoRAs" (exactly two files, same ranks).
    Extract,
}

impl crate::text::Named for MergeMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("concat", MergeMode::Concat),
        ("svd", MergeMode::Svd),
        ("kohya", MergeMode::Kohya),
        ("extract", MergeMode::Extract),
    ];
}

/// What the merged LoRA's metadata holds: SuperMerger's five choices. Every mode sets
/// `ss_network_module` (the first file's), `ss_mixed_precision` (the saved dtype),
/// `ss_network_dim` / `ss_network_alpha` (the result's, when every module agrees; otherwise
/// left out) and the additional-networks hashes `sshs_model_hash` / `sshs_legacy_hash`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MetadataMode {
    /// "create new": the first file's `ss_v2`, `ss_sd_model_name`, `ss_base_model_version`,
    /// the output name and the list of files merged.
    #[default]
    New,
    /// "create new without output_name".
    NewWithoutName,
    /// "merge": the first file's metadata, every file's as `sshs_cpN` (JSON), and the tag
    /// frequencies of all files (a dataset folder the first file lacks is added).
    Merge,
    /// "save all": as `merge`, tags left as the first file has them.
    All,
    /// "use first lora": the first file's metadata.
    First,
}

impl crate::text::Named for MetadataMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("new", MetadataMode::New),
        ("new_without_name", MetadataMode::NewWithoutName),
        ("merge", MetadataMode::Merge),
        ("all", MetadataMode::All),
        ("first", MetadataMode::First),
    ];
}

/// The extract mode's weights (SuperMerger's defaults: alpha 0.5, beta 0.5, gamma 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ExtractWeights {
    /// 0: the first LoRA's factors, 1: the second's.
    pub alpha: f64,
    /// 0: keep what the two share, 1: keep where they differ.
    pub beta: f64,
    /// Sharpness of the similarity weighting.
    pub gamma: f64,
}

impl ExtractWeights {
    /// The weights of a merge in `mode` given these (defaults filled in): `None` unless the
    /// mode is extract or one was given (which [`check_options`] then refuses).
    pub fn given(
        mode: MergeMode,
        alpha: Option<f64>,
        beta: Option<f64>,
        gamma: Option<f64>,
    ) -> Option<Self> {
        let any = alpha.or(beta).or(gamma).is_some();
        (mode == MergeMode::Extract || any).then(|| {
            let d = ExtractWeights::default();
            ExtractWeights {
                alpha: alpha.unwrap_or(d.alpha),
                beta: beta.unwrap_or(d.beta),
                gamma: gamma.unwrap_or(d.gamma),
            }
        })
    }
}

impl Default for ExtractWeights {
    fn default() -> Self {
        ExtractWeights {
            alpha: 0.5,
            beta: 0.5,
            gamma: 1.0,
        }
    }
}

/// The weight of a LoRA's module in a merge: ratio × block weight.
fn factor(source: &Application, module: &str) -> f64 {
    let b = source
        .blocks
        .as_ref()
        .map_or(1.0, |b| b.weight_of_module(module));
    source.strength * b
}

/// Options of a merge.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MergeOptions {
    /// Concat or SVD.
    pub mode: MergeMode,
    /// SVD: rank of linear and 1x1 modules.
    pub rank: usize,
    /// SVD: rank of 3x3 convolutions (default: `rank`).
    pub conv_rank: Option<usize>,
    /// SVD: clamp quantile (1 = none).
    pub clamp_quantile: f64,
    /// Output dtype.
    pub dtype: FloatType,
    /// kohya / extract / svd: SuperMerger's "same to Strength" (`√|ratio|` on both factors,
    /// the sign on `lora_down`; in svd mode the sum is weighted by `sign(ratio)·√|ratio|`, as
    /// there).
    pub same_to_strength: bool,
    /// extract: the weights (`None` in the other modes).
    pub extract: Option<ExtractWeights>,
    /// What the file's metadata holds.
    pub metadata: MetadataMode,
}

impl Default for MergeOptions {
    /// Exact concatenation, fp32, "create new" metadata (SVD rank 64, clamp at 0.99).
    fn default() -> Self {
        MergeOptions {
            mode: MergeMode::Concat,
            rank: 64,
            conv_rank: None,
            clamp_quantile: 0.99,
            dtype: FloatType::Fp32,
            same_to_strength: false,
            extract: None,
            metadata: MetadataMode::New,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MergeReport {
    /// Modules written.
    pub modules: usize,
    /// SVD: ‖M − up·down‖_F / ‖M‖_F over all modules (clamp included); 0 for concat.
    pub relative_error: f64,
    /// What the metadata could not carry, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One module of the merged LoRA: its name, the weight shape it changes, its rank, and the
/// (source, module) pairs that contribute.
#[derive(Debug)]
pub struct PlannedModule {
    /// Module name.
    pub name: String,
    /// Shape of the weight it changes.
    pub shape: Vec<usize>,
    /// Rank of the merged module.
    pub rank: usize,
    uses: Vec<(usize, usize)>,
}

/// Module names of one family resolved to the weights they change, and the kohya name of
/// each weight sd-scripts targets, from the family's reference layout.
struct Canon {
    targets: Targets,
    kohya: BTreeMap<(String, Option<(usize, usize)>), String>,
}

impl Canon {
    fn of(family: Family) -> Result<Canon> {
        let entries = crate::arch::layout::release_keys(family, false)?;
        let ck = Checkpoint::header_only(
            Path::new("reference layout"),
            entries.into_iter().map(|e| (e.key, e.dtype, e.shape)),
        );
        let targets = Targets::of(&ck);
        let mut kohya = BTreeMap::new();
        for (name, _) in crate::lora::synth::modules_of(&ck, true) {
            if let Some(t) = targets.get(&name) {
                kohya.insert((t.key.clone(), t.rows), name);
            }
        }
        Ok(Canon { targets, kohya })
    }

    /// What a module is grouped by (the weight and rows it changes, or its own name when it
    /// resolves to nothing), and the kohya name of that weight when sd-scripts targets it.
    fn identify(&self, module: &str) -> (String, Option<&str>) {
        match self.targets.get(module) {
            Some(t) => (
                format!("{}{:?}", t.key, t.rows),
                self.kohya.get(&(t.key.clone(), t.rows)).map(String::as_str),
            ),
            None => (format!("name {module}"), None),
        }
    }
}

/// The family the files were made for: what their names say (they must agree), else the
/// family whose reference layout resolves the most of their modules.
fn family_of_all(sources: &[Application]) -> Result<Family> {
    let stated: Vec<Family> = sources.iter().filter_map(|s| s.file.family()).collect();
    if let Some(&first) = stated.first() {
        if let Some(s) = sources
            .iter()
            .find(|s| s.file.family().is_some_and(|f| f != first))
        {
            return Err(Error::Invalid(format!(
                "{} is a LoRA for {}, {} for {}: they cannot be merged",
                sources[0].file.path.display(),
                first.label(),
                s.file.path.display(),
                s.file.family().map_or("another family", |f| f.label())
            )));
        }
        return Ok(first);
    }
    let resolved = |family| -> Result<usize> {
        let canon = Canon::of(family)?;
        Ok(sources
            .iter()
            .flat_map(|s| &s.file.modules)
            .filter(|m| canon.targets.get(&m.name).is_some())
            .count())
    };
    // SD1 unless another family resolves strictly more modules: SDXL, then the families
    // whose LoRA names are data (Flux).
    let mut best = (Family::builtin("sd1"), resolved(Family::builtin("sd1"))?);
    let others = std::iter::once(Family::builtin("sdxl"))
        .chain(Family::all().filter(|f| f.lora().is_some()));
    for f in others {
        let n = resolved(f)?;
        if n > best.1 {
            best = (f, n);
        }
    }
    Ok(best.0)
}

/// Options that do not fit the mode, or the wrong number of files for it.
pub fn check_options(files: usize, opts: &MergeOptions) -> Result<()> {
    let mode = crate::text::Named::name(opts.mode);
    if opts.same_to_strength && opts.mode == MergeMode::Concat {
        return Err(Error::Invalid(format!(
            "same_to_strength is SuperMerger's option of the kohya, svd and extract merges, not of {mode}"
        )));
    }
    match (opts.mode, opts.extract) {
        (MergeMode::Extract, Some(w)) => {
            if files != 2 {
                return Err(Error::Invalid(format!(
                    "extract works on two LoRAs, got {files}"
                )));
            }
            let unit = |v: f64| (0.0..=1.0).contains(&v);
            if !(unit(w.alpha) && unit(w.beta) && w.gamma >= 0.0 && w.gamma.is_finite()) {
                return Err(Error::Invalid(format!(
                    "extract needs 0 <= alpha, beta <= 1 and gamma >= 0, got {}, {}, {}",
                    w.alpha, w.beta, w.gamma
                )));
            }
            Ok(())
        }
        (MergeMode::Extract, None) => Err(Error::Invalid(
            "extract needs its alpha, beta and gamma".into(),
        )),
        (_, Some(_)) => Err(Error::Invalid(format!(
            "alpha, beta and gamma belong to the extract mode, not to {mode}"
        ))),
        _ => Ok(()),
    }
}

/// Plans a merge on the files' headers: groups modules by the weight they change (so
/// kohya, diffusers and PEFT spellings of one module are merged together, under its kohya
/// name), checks that a module has one shape in every file (and, for concat, is plain LoRA /
/// LoCon), and works out each rank.
pub fn plan(sources: &[Application], opts: &MergeOptions) -> Result<Vec<PlannedModule>> {
    check_options(sources.len(), opts)?;
    let canon = Canon::of(family_of_all(sources)?)?;
    let mut groups: BTreeMap<String, (String, Vec<(usize, usize)>)> = BTreeMap::new();
    for (si, s) in sources.iter().enumerate() {
        for (mi, m) in s.file.modules.iter().enumerate() {
            let (id, kohya) = canon.identify(&m.name);
            groups
                .entry(id)
                .or_insert_with(|| (kohya.unwrap_or(&m.name).to_string(), Vec::new()))
                .1
                .push((si, mi));
        }
    }
    let mut names: Vec<(String, Vec<(usize, usize)>)> = groups.into_values().collect();
    names.sort();
    let mut out = Vec::new();
    for (name, uses) in names {
        let (s0, m0) = uses[0];
        let shape = natural_shape(&sources[s0].file, &sources[s0].file.modules[m0])?;
        let mut rank = 0;
        for &(si, mi) in &uses {
            let (f, m) = (&sources[si].file, &sources[si].file.modules[mi]);
            if m.parts.contains_key("dora_scale") {
                return Err(Error::Invalid(format!(
                    "{}: module `{}` is DoRA, whose change depends on the weight: bake it instead",
                    f.path.display(),
                    m.name
                )));
            }
            if natural_shape(f, m)? != shape {
                return Err(Error::Invalid(format!(
                    "module `{name}` has different shapes in the files merged"
                )));
            }
            if opts.mode == MergeMode::Svd {
                continue;
            }
            let mode = crate::text::Named::name(opts.mode);
            if m.kind != Kind::Lora || m.parts.contains_key("mid") {
                return Err(Error::Invalid(format!(
                    "{}: module `{name}` is {}{}: {mode} merges plain LoRA / LoCon only; use mode svd",
                    f.path.display(),
                    m.kind.label(),
                    if m.parts.contains_key("mid") { " with lora_mid" } else { "" }
                )));
            }
            let r = m
                .parts
                .get("down")
                .and_then(|n| f.ck.get(n))
                .map_or(0, |t| t.shape[0]);
            match opts.mode {
                MergeMode::Concat => rank += r,
                _ if rank != 0 && r != rank => {
                    return Err(Error::Invalid(format!(
                        "module `{name}` has rank {rank} in {} and {r} in {}: {mode} sums \
                         factors of one rank; use mode concat (exact) or svd",
                        sources[s0].file.path.display(),
                        f.path.display()
                    )))
                }
                _ => rank = r,
            }
        }
        if opts.mode == MergeMode::Svd {
            rank = svd::rank_for(&shape, opts.rank, opts.conv_rank);
        }
        if opts.mode == MergeMode::Extract {
            let count = |f: usize| uses.iter().filter(|u| u.0 == f).count();
            if let Some((f, n)) = [(0, count(0)), (1, count(1))]
                .into_iter()
                .find(|c| c.1 != 1)
            {
                return Err(Error::Invalid(format!(
                    "extract needs module `{name}` once in each of the two LoRAs; {} {}",
                    sources[f].file.path.display(),
                    if n == 0 {
                        "lacks it"
                    } else {
                        "has it twice (in two spellings)"
                    }
                )));
            }
        }
        out.push(PlannedModule {
            name,
            shape,
            rank,
            uses,
        });
    }
    Ok(out)
}

/// The tensors (name, shape) of the merged LoRA.
pub fn layout(plan: &[PlannedModule]) -> Vec<(String, Vec<usize>)> {
    crate::lora::kohya_layout(
        plan.iter()
            .map(|m| (m.name.as_str(), m.shape.as_slice(), m.rank)),
    )
}

/// One plain LoRA module's factors as stored, with its alpha (the rank when the file has none).
struct Plain {
    up: Vec<f32>,
    down: Vec<f32>,
    rank: usize,
    alpha: f64,
}

fn plain(s: &Application, mi: usize) -> Result<Plain> {
    let m = &s.file.modules[mi];
    let (up, _) = s.file.part(m, "up")?.unwrap_or_default();
    let (down, ds) = s.file.part(m, "down")?.unwrap_or_default();
    let rank = ds.first().copied().unwrap_or(0);
    let alpha = s
        .file
        .part(m, "alpha")?
        .and_then(|(v, _)| v.first().copied())
        .map_or(rank as f64, f64::from);
    Ok(Plain {
        up,
        down,
        rank,
        alpha,
    })
}

/// The factors by which `up` and `down` are scaled for a ratio: `(r, r)`, or with "same to
/// Strength" `(√|r|, sign(r)·√|r|)` (SuperMerger gives ratio 0 the sign −).
fn ratio_pair(r: f64, same_to_strength: bool) -> (f64, f64) {
    if !same_to_strength {
        return (r, r);
    }
    let q = r.abs().sqrt();
    (q, if r > 0.0 { q } else { -q })
}

/// Adds `x · k` into `acc` in f32 as torch does (`acc + x * k`, the first term stored as is).
fn accumulate(acc: &mut Option<Vec<f32>>, x: &[f32], k: f64) {
    let k = k as f32;
    match acc {
        None => *acc = Some(x.iter().map(|v| v * k).collect()),
        Some(a) => a.iter_mut().zip(x).for_each(|(a, v)| *a += v * k),
    }
}

/// Runs a planned merge; `output_name` is the merged LoRA's name for its metadata.
pub fn run(
    sources: &[Application],
    plan: &[PlannedModule],
    opts: &MergeOptions,
    output_name: &str,
) -> Result<(KohyaLora, MergeReport)> {
    let mut modules = Vec::new();
    let (mut err2, mut norm2) = (0f64, 0f64);
    for pm in plan {
        let (name, shape) = (pm.name.as_str(), &pm.shape);
        let out_ch = shape[0];
        let cols: usize = shape[1..].iter().product();
        let (up, down, rank, alpha) = match opts.mode {
            MergeMode::Concat => {
                let mut ups: Vec<Vec<f32>> = Vec::new();
                let mut downs: Vec<f32> = Vec::new();
                let mut total = 0;
                for &(si, mi) in &pm.uses {
                    let s = &sources[si];
                    let p = plain(s, mi)?;
                    let c = factor(s, name) * p.alpha / p.rank as f64;
                    let root = c.abs().sqrt() as f32;
                    let sign = if c < 0.0 { -root } else { root };
                    ups.push(p.up.iter().map(|x| x * sign).collect());
                    downs.extend(p.down.iter().map(|x| x * root));
                    total += p.rank;
                }
                // Interleave the ups row by row: up is [out, total].
                let mut up = Vec::with_capacity(out_ch * total);
                for o in 0..out_ch {
                    for u in &ups {
                        let r = u.len() / out_ch;
                        up.extend_from_slice(&u[o * r..(o + 1) * r]);
                    }
                }
                (up, downs, total, total as f32)
            }
            MergeMode::Kohya => {
                let (mut up, mut down, mut alpha0) = (None, None, None);
                for &(si, mi) in &pm.uses {
                    let s = &sources[si];
                    let p = plain(s, mi)?;
                    let a0 = *alpha0.get_or_insert(p.alpha as f32) as f64;
                    let (ru, rd) = ratio_pair(factor(s, name), opts.same_to_strength);
                    let scale = (p.alpha / a0).sqrt();
                    accumulate(&mut up, &p.up, scale * ru);
                    accumulate(&mut down, &p.down, scale * rd);
                }
                (
                    up.unwrap_or_default(),
                    down.unwrap_or_default(),
                    pm.rank,
                    alpha0.unwrap_or(pm.rank as f32),
                )
            }
            MergeMode::Extract => {
                let w = opts.extract.unwrap_or_default();
                let (a, b) = (&sources[0], &sources[1]);
                let (pa, pb) = (plain(a, pm.uses[0].1)?, plain(b, pm.uses[1].1)?);
                let (ua, da) = ratio_pair(factor(a, name), opts.same_to_strength);
                let (ub, db) = ratio_pair(factor(b, name), opts.same_to_strength);
                // B's factors rescaled to A's alpha, which the result keeps.
                let alpha_a = pa.alpha as f32;
                let to_a = (pb.alpha / pa.alpha).sqrt();
                let scaled = |x: &[f32], r: f64, k: f64| -> Vec<f32> {
                    let (r, k) = (r as f32, k as f32);
                    x.iter().map(|v| v * r * k).collect()
                };
                let layout = crate::lora::kohya_layout([(name, shape.as_slice(), pm.rank)]);
                let mut merged = Vec::new();
                for (i, (x, rx, y, ry)) in [(&pa.up, ua, &pb.up, ub), (&pa.down, da, &pb.down, db)]
                    .into_iter()
                    .enumerate()
                {
                    merged.push(crate::merge::calc::extract::merge(
                        w.alpha,
                        w.beta,
                        w.gamma,
                        &layout[i].1,
                        vec![0.0; x.len()],
                        &scaled(x, rx, 1.0),
                        &scaled(y, ry, to_a),
                    ));
                }
                let down = merged.pop().unwrap_or_default();
                let up = merged.pop().unwrap_or_default();
                (up, down, pm.rank, alpha_a)
            }
            MergeMode::Svd => {
                let mut sum = vec![0f32; out_ch * cols];
                for &(si, mi) in &pm.uses {
                    let s = &sources[si];
                    let m = &s.file.modules[mi];
                    let d = delta(&s.file, m, out_ch * cols, None, shape)?;
                    let r = factor(s, name);
                    let k = if opts.same_to_strength {
                        r.signum() * r.abs().sqrt()
                    } else {
                        r
                    } as f32;
                    for (x, dv) in sum.iter_mut().zip(&d) {
                        *x += k * dv;
                    }
                }
                let m = svd::factor_module(
                    &sum,
                    shape,
                    opts.rank,
                    opts.conv_rank,
                    opts.clamp_quantile,
                )?;
                err2 += m.error2;
                norm2 += m.norm2;
                let f = m.factors;
                (f.up, f.down, f.rank, f.rank as f32)
            }
        };
        modules.push(Factored {
            name: name.to_string(),
            shape: shape.clone(),
            up,
            down,
            rank,
            alpha,
        });
    }
    let mut lora = KohyaLora {
        modules,
        metadata: BTreeMap::new(),
    };
    let mut warnings = Vec::new();
    lora.metadata = crate::lora::meta::merged(sources, &lora, opts, output_name, &mut warnings);
    lora.stamp_addnet_hashes(opts.dtype.dtype(), &mut warnings)?;
    let report = MergeReport {
        modules: plan.len(),
        relative_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
        warnings,
    };
    Ok((lora, report))
}

/// Merges `sources` into one kohya-format LoRA at `out`.
pub fn merge(
    sources: &[Application],
    opts: &MergeOptions,
    out: &Path,
    overwrite: bool,
) -> Result<MergeReport> {
    if !overwrite && out.exists() {
        return Err(Error::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let planned = plan(sources, opts)?;
    let name = out
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (lora, report) = run(sources, &planned, opts, &name)?;
    lora.write(out, opts.dtype.dtype(), overwrite)?;
    Ok(report)
}
