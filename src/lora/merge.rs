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
//!
//! Where the others differ: sd-scripts' default merge sums ups and downs separately (cross
//! terms between files, and the ratio acts squared with its sign); its `--concat` keeps the
//! first file's alpha (right directions, wrong magnitudes). SuperMerger's "same to strength"
//! puts `√|ratio|` on both factors and the sign on `lora_down`, which is exact for one file;
//! `concat` here is exact for any number of files, so it needs no such option.

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
}

impl crate::text::Named for MergeMode {
    const NAMES: &'static [(&'static str, Self)] =
        &[("concat", MergeMode::Concat), ("svd", MergeMode::Svd)];
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
}

/// What a merge did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MergeReport {
    /// Modules written.
    pub modules: usize,
    /// SVD: ‖M − up·down‖_F / ‖M‖_F over all modules (clamp included); 0 for concat.
    pub relative_error: f64,
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

/// Plans a merge on the files' headers: groups modules by the weight they change (so
/// kohya, diffusers and PEFT spellings of one module are merged together, under its kohya
/// name), checks that a module has one shape in every file (and, for concat, is plain LoRA /
/// LoCon), and works out each rank.
pub fn plan(sources: &[Application], opts: &MergeOptions) -> Result<Vec<PlannedModule>> {
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
            if opts.mode == MergeMode::Concat {
                if m.kind != Kind::Lora || m.parts.contains_key("mid") {
                    return Err(Error::Invalid(format!(
                        "{}: module `{name}` is {}{}: concat merges plain LoRA / LoCon only; use mode svd",
                        f.path.display(),
                        m.kind.label(),
                        if m.parts.contains_key("mid") { " with lora_mid" } else { "" }
                    )));
                }
                rank += m
                    .parts
                    .get("down")
                    .and_then(|n| f.ck.get(n))
                    .map_or(0, |t| t.shape[0]);
            }
        }
        if opts.mode == MergeMode::Svd {
            rank = svd::rank_for(&shape, opts.rank, opts.conv_rank);
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

/// Runs a planned merge.
pub fn run(
    sources: &[Application],
    plan: &[PlannedModule],
    opts: &MergeOptions,
) -> Result<(KohyaLora, MergeReport)> {
    let mut modules = Vec::new();
    let (mut err2, mut norm2) = (0f64, 0f64);
    for pm in plan {
        let (name, shape) = (pm.name.as_str(), &pm.shape);
        let out_ch = shape[0];
        let cols: usize = shape[1..].iter().product();
        let (up, down, rank) = match opts.mode {
            MergeMode::Concat => {
                let mut ups: Vec<Vec<f32>> = Vec::new();
                let mut downs: Vec<f32> = Vec::new();
                let mut total = 0;
                for &(si, mi) in &pm.uses {
                    let s = &sources[si];
                    let m = &s.file.modules[mi];
                    let (u, _) = s.file.part(m, "up")?.unwrap_or_default();
                    let (d, ds) = s.file.part(m, "down")?.unwrap_or_default();
                    let r = ds[0];
                    let alpha = s
                        .file
                        .part(m, "alpha")?
                        .and_then(|(v, _)| v.first().copied());
                    let c = factor(s, name) * alpha.map_or(1.0, |a| a as f64 / r as f64);
                    let root = c.abs().sqrt() as f32;
                    let sign = if c < 0.0 { -root } else { root };
                    ups.push(u.iter().map(|x| x * sign).collect());
                    downs.extend(d.iter().map(|x| x * root));
                    total += r;
                }
                // Interleave the ups row by row: up is [out, total].
                let mut up = Vec::with_capacity(out_ch * total);
                for o in 0..out_ch {
                    for u in &ups {
                        let r = u.len() / out_ch;
                        up.extend_from_slice(&u[o * r..(o + 1) * r]);
                    }
                }
                (up, downs, total)
            }
            MergeMode::Svd => {
                let mut sum = vec![0f32; out_ch * cols];
                for &(si, mi) in &pm.uses {
                    let s = &sources[si];
                    let m = &s.file.modules[mi];
                    let d = delta(&s.file, m, out_ch * cols, None, shape)?;
                    let k = factor(s, name) as f32;
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
                (f.up, f.down, f.rank)
            }
        };
        modules.push(Factored {
            name: name.to_string(),
            shape: shape.clone(),
            up,
            down,
            rank,
            alpha: rank as f32,
        });
    }
    let mut md = BTreeMap::new();
    md.insert("ss_network_module".to_string(), "networks.lora".to_string());
    if opts.mode == MergeMode::Svd {
        md.insert("ss_network_dim".to_string(), opts.rank.to_string());
        md.insert(
            "ss_network_alpha".to_string(),
            format!("{:.1}", opts.rank as f64),
        );
    }
    let merged: Vec<String> = sources
        .iter()
        .map(|s| {
            s.file
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    md.insert("modelspec.merged_from".to_string(), merged.join(", "));
    let report = MergeReport {
        modules: plan.len(),
        relative_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
    };
    Ok((
        KohyaLora {
            modules,
            metadata: md,
        },
        report,
    ))
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
    let (lora, report) = run(sources, &planned, opts)?;
    lora.write(out, opts.dtype.dtype(), overwrite)?;
    Ok(report)
}
