//! Baking LoRAs into a checkpoint: `W' = W + Σ strength · block weight · ΔW` for every weight
//! a module resolves to, in f32, rounded once to W's stored dtype (lora.md §2.2). Every delta
//! is computed from the original W (IA3 reads it), so the order of the LoRAs does not matter.
//! Untouched tensors are copied byte for byte; a zero factor leaves W bit-identical. Plain
//! LoRA / LoCon contributions are applied a band of rows at a time (large transformer weights
//! are never held whole in f32); the other types need the whole weight. fp8
//! weights are changed in f32 and rounded back to nearest even; scaled-fp8 weights are
//! dequantized with their scale first and stored with a fresh scale (`X.scale_weight`).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::arch::{self, Family};
use crate::checkpoint::quant::{self, Quant};
use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use crate::checkpoint::Checkpoint;
use crate::convert;
use crate::error::{Error, Result};
use crate::lora::blocks::BlockWeights;
use crate::lora::delta::{delta, dora_change, Factors};
use crate::lora::names::Targets;
use crate::lora::{Kind, LoraFile};

/// One LoRA to bake, with its strength and optional block weights.
#[derive(Debug)]
pub struct Application {
    /// The LoRA file.
    pub file: LoraFile,
    /// Strength (A1111's multiplier).
    pub strength: f64,
    /// Per-block weights (none: 1 everywhere).
    pub blocks: Option<BlockWeights>,
}

impl Application {
    /// `file` at `strength`, with block weights `blocks` (as written: values or a preset) read
    /// for `family`, or for the family the file's names point to when `None` (SD1 when they
    /// do not say); `fill` weights the blocks a short vector leaves out.
    pub fn new(
        file: LoraFile,
        strength: f64,
        blocks: Option<&str>,
        family: Option<Family>,
        fill: f64,
    ) -> Result<Self> {
        let family = family
            .or_else(|| file.family_or_resolved())
            .unwrap_or_else(|| Family::builtin("sd1"));
        let blocks = blocks
            .map(|b| BlockWeights::parse(b, family, fill))
            .transpose()?;
        Ok(Application {
            file,
            strength,
            blocks,
        })
    }
}

/// The part holding a module's bias change: a full difference's `diff_b`, a norm module's
/// `b_norm`.
fn bias_part(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Full => Some("diff_b"),
        Kind::Norm => Some("b_norm"),
        _ => None,
    }
}

/// One module's share of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Contribution {
    /// Index of the LoRA in the list baked.
    pub lora: usize,
    /// Index of the module in that file.
    pub module: usize,
    /// Rows of the tensor it changes (a q/k/v slice), or all of it.
    pub rows: Option<(usize, usize)>,
    /// strength × block weight.
    pub factor: f64,
    /// The LoRA's strength (DoRA applies it after normalising).
    pub strength: f64,
    /// The block weight (DoRA applies it to ΔW before normalising).
    pub block: f64,
    /// The bias of a full-difference or norm module (`diff_b`, `b_norm`), not its weight.
    pub bias: bool,
    /// The module's rows are the tensor's with the two halves swapped.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub swap_halves: bool,
}

/// What baking will do.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BakePlan {
    /// Checkpoint key -> the contributions it receives (only keys with a non-zero factor).
    pub changes: BTreeMap<String, Vec<Contribution>>,
    /// Modules that match no weight of the checkpoint: (LoRA index, module name).
    pub unmatched: Vec<(usize, String)>,
    /// Modules applied (matched, all factors counted).
    pub applied: usize,
    /// Scaled fp8: changed weight key -> its scale key (rewritten with a fresh scale).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rescaled: BTreeMap<String, String>,
    /// Scaled fp8: weight key -> the scale it is stored with.
    #[serde(skip)]
    pub scales: BTreeMap<String, f32>,
}

/// Resolves every module of every LoRA against the checkpoint. Modules that match nothing are
/// an error naming them, unless `allow_unmatched` (then they are listed in the plan).
pub fn plan(ck: &Checkpoint, loras: &[Application], allow_unmatched: bool) -> Result<BakePlan> {
    let quant = Quant::of(ck)?;
    let family = arch::detect(ck.tensors()).family;
    let targets = Targets::of(ck);
    let mut out = BakePlan {
        scales: quant.scales.clone(),
        ..BakePlan::default()
    };
    for (li, app) in loras.iter().enumerate() {
        let f = &app.file;
        let made_for = f.family();
        if !family.has_lora() {
            return Err(Error::Invalid(format!(
                "baking LoRAs into {} checkpoints is not supported yet ({})",
                family.label(),
                f.path.display()
            )));
        }
        if let Some(m) = made_for.filter(|m| m.lora_group() != family.lora_group()) {
            return Err(Error::Invalid(format!(
                "{} is a LoRA for {}, the checkpoint is {}",
                f.path.display(),
                match m.lora() {
                    Some(_) => m.label(),
                    None if m.xl_lora() => "SDXL",
                    None => "SD1.x/SD2.x",
                },
                family.label()
            )));
        }
        for (mi, m) in f.modules.iter().enumerate() {
            let Some(t) = targets.get(&m.name) else {
                out.unmatched.push((li, m.name.clone()));
                continue;
            };
            out.applied += 1;
            let block_weight = app
                .blocks
                .as_ref()
                .map_or(1.0, |b| b.weight_of_key(family, &t.key));
            let factor = app.strength * block_weight;
            if factor == 0.0 {
                continue;
            }
            let mut add = |key: String, rows, bias| {
                out.changes.entry(key).or_default().push(Contribution {
                    lora: li,
                    module: mi,
                    rows,
                    factor,
                    strength: app.strength,
                    block: block_weight,
                    bias,
                    swap_halves: t.swap_halves && !bias,
                })
            };
            if m.kind != Kind::Full || m.parts.contains_key("diff") {
                add(t.key.clone(), t.rows, false);
            }
            if bias_part(m.kind).is_some_and(|p| m.parts.contains_key(p)) {
                let bias = t.key.strip_suffix(".weight").unwrap_or(&t.key).to_string() + ".bias";
                if ck.get(&bias).is_none() {
                    return Err(Error::Invalid(format!(
                        "{}: module `{}` changes a bias, but the checkpoint has no `{bias}`",
                        f.path.display(),
                        m.name
                    )));
                }
                add(bias, None, true);
            }
        }
    }
    for key in out.changes.keys() {
        if let (Some(_), Some(scale)) = (quant.scale(key), Quant::scale_key(key)) {
            out.rescaled.insert(key.clone(), scale);
        }
    }
    if !out.unmatched.is_empty() && !allow_unmatched {
        let names: Vec<String> = out
            .unmatched
            .iter()
            .take(8)
            .map(|(li, n)| format!("{} ({})", n, loras[*li].file.path.display()))
            .collect();
        return Err(Error::Invalid(format!(
            "{} LoRA modules match no weight of the checkpoint ({}): {}{}; \
             pass --allow-unmatched to skip them",
            out.unmatched.len(),
            family.label(),
            names.join(", "),
            if out.unmatched.len() > 8 { ", ..." } else { "" }
        )));
    }
    Ok(out)
}

/// The writer specs of a baked checkpoint: the same tensors as the input.
pub fn specs(ck: &Checkpoint) -> Vec<TensorSpec> {
    ck.tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
}

/// One changed tensor: its bytes, and for a scaled-fp8 weight the fresh scale it is stored
/// with (the weight is dequantized with its old scale, changed in f32, and requantized with a
/// scale that fits the new values).
pub fn changed_tensor(
    ck: &Checkpoint,
    loras: &[Application],
    plan: &BakePlan,
    key: &str,
    contributions: &[Contribution],
) -> Result<(Vec<u8>, Option<f32>)> {
    let t = ck.get(key).ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: key.to_string(),
    })?;
    let mut original = convert::to_f32(t.dtype, &ck.data(t))?;
    let stored_scale = plan.scales.get(key).copied();
    if let Some(scale) = stored_scale {
        original.iter_mut().for_each(|v| *v *= scale);
    }
    let mut w = original.clone();
    let cols = t.numel() / t.shape.first().copied().unwrap_or(1).max(1);
    for c in contributions {
        let f = &loras[c.lora].file;
        let m = &f.modules[c.module];
        let (lo, hi) = c.rows.map_or((0, w.len()), |(a, b)| (a * cols, b * cols));
        let d = if c.bias {
            let part = bias_part(m.kind).unwrap_or("diff_b");
            f.part(m, part)?.map(|(v, _)| v).unwrap_or_default()
        } else {
            let mut shape = t.shape.clone();
            if let (Some((a, b)), Some(first)) = (c.rows, shape.first_mut()) {
                *first = b - a;
            }
            let region = &original[lo..hi];
            let mut d = if c.swap_halves {
                let mut swapped = region.to_vec();
                swapped.rotate_left(region.len() / 2);
                delta(f, m, hi - lo, Some(&swapped), &shape)?
            } else {
                delta(f, m, hi - lo, Some(region), &shape)?
            };
            if c.swap_halves && d.len() == hi - lo {
                let half = (hi - lo) / 2;
                d.rotate_left(half);
            }
            d
        };
        if d.len() != hi - lo {
            return Err(Error::Invalid(format!(
                "{}: module `{}` changes {} values of `{key}`, which has {}",
                f.path.display(),
                m.name,
                d.len(),
                hi - lo
            )));
        }
        if let (false, Some((scale, scale_shape))) = (c.bias, f.part(m, "dora_scale")?) {
            if c.rows.is_some() || c.swap_halves {
                return Err(Error::Invalid(format!(
                    "{}: module `{}`: DoRA on a slice of a fused projection is not supported",
                    f.path.display(),
                    m.name
                )));
            }
            let change = dora_change(
                &original,
                &t.shape,
                &d,
                c.block as f32,
                &scale,
                &scale_shape,
                c.strength as f32,
            )?;
            for (x, dv) in w.iter_mut().zip(&change) {
                *x += dv;
            }
            continue;
        }
        let k = c.factor as f32;
        for (x, dv) in w[lo..hi].iter_mut().zip(&d) {
            *x += k * dv;
        }
    }
    if stored_scale.is_none() {
        return Ok((convert::from_f32(&w, t.dtype)?, None));
    }
    let scale = quant::scale_for(&w, t.dtype);
    w.iter_mut().for_each(|v| *v /= scale);
    Ok((convert::from_f32(&w, t.dtype)?, Some(scale)))
}

/// Writes every tensor of `ck` to `writer`: changed ones recomputed, the rest copied.
pub fn write(
    ck: &Checkpoint,
    loras: &[Application],
    plan: &BakePlan,
    writer: &SafetensorsWriter,
    progress: bool,
) -> Result<()> {
    let total: u64 = ck.tensors().iter().map(|t| t.byte_len() as u64).sum();
    let bar = crate::progress::bytes(total, "bake", progress);
    // A rescaled weight's scale is written by the weight's job.
    let rewritten: std::collections::BTreeSet<&String> = plan.rescaled.values().collect();
    let scale_expected = |w: &str| plan.rescaled.get(w).is_some_and(|s| writer.expects(s));
    ck.tensors()
        .par_iter()
        .filter(|t| {
            (writer.expects(&t.name) || scale_expected(&t.name)) && !rewritten.contains(&t.name)
        })
        .try_for_each(|t| {
            match plan.changes.get(&t.name) {
                Some(c)
                    if writer.expects(&t.name) && write_banded(ck, loras, plan, t, c, writer)? => {}
                Some(c) => {
                    let (bytes, scale) = changed_tensor(ck, loras, plan, &t.name, c)?;
                    if writer.expects(&t.name) {
                        writer.write(&t.name, &bytes)?;
                    }
                    if let (Some(scale), Some(key)) = (scale, plan.rescaled.get(&t.name)) {
                        if writer.expects(key) {
                            write_scale(ck, writer, key, scale)?;
                        }
                    }
                }
                None => writer.write(&t.name, &ck.data(t))?,
            }
            ck.release(t);
            bar.inc(t.byte_len() as u64);
            Ok::<_, Error>(())
        })?;
    bar.finish_and_clear();
    Ok(())
}

/// Changes a weight a band of rows at a time, when every contribution is a plain LoRA /
/// LoCon product (the common case) and the weight is stored without a scale: the same f32
/// arithmetic in the same order as [`changed_tensor`] (so the same bytes), without holding
/// full-size f32 copies of a large weight. Returns false (nothing written) otherwise.
fn write_banded(
    ck: &Checkpoint,
    loras: &[Application],
    plan: &BakePlan,
    t: &crate::checkpoint::TensorInfo,
    contributions: &[Contribution],
    writer: &SafetensorsWriter,
) -> Result<bool> {
    if plan.scales.contains_key(&t.name) || !t.dtype.is_float() {
        return Ok(false);
    }
    let rows = t.shape.first().copied().unwrap_or(0);
    if rows == 0 {
        return Ok(false);
    }
    let cols = t.numel() / rows;
    // (factors, first row, factor) per contribution, in order.
    let mut parts = Vec::with_capacity(contributions.len());
    for c in contributions {
        let f = &loras[c.lora].file;
        let m = &f.modules[c.module];
        if c.bias || c.swap_halves {
            return Ok(false);
        }
        let (lo, hi) = c.rows.unwrap_or((0, rows));
        match Factors::of(f, m)? {
            Some(fa) if fa.out == hi - lo && fa.cols == cols && hi <= rows => {
                parts.push((fa, lo, c.factor as f32))
            }
            _ => return Ok(false),
        }
    }
    let data = ck.data(t);
    let es = t.dtype.bits() / 8;
    let band = (crate::merge::engine::CHUNK / cols.max(1)).max(1);
    let starts: Vec<usize> = (0..rows).step_by(band).collect();
    starts.into_par_iter().try_for_each_init(
        || (Vec::<f32>::new(), Vec::<u8>::new()),
        |(w, bytes), r0| {
            let r1 = (r0 + band).min(rows);
            w.resize((r1 - r0) * cols, 0.0);
            convert::decode_into(t.dtype, &data[r0 * cols * es..r1 * cols * es], w)?;
            for (fa, lo, k) in &parts {
                let (a, b) = (r0.max(*lo), r1.min(lo + fa.out));
                if a >= b {
                    continue;
                }
                let d = fa.rows(a - lo, b - lo);
                for (x, dv) in w[(a - r0) * cols..(b - r0) * cols].iter_mut().zip(&d) {
                    *x += k * dv;
                }
            }
            bytes.resize(w.len() * es, 0);
            convert::encode_into(w, t.dtype, bytes)?;
            writer.write_part(&t.name, r0 * cols * es, bytes)
        },
    )?;
    Ok(true)
}

/// Writes a recomputed scale into scale tensor `key`, in the tensor's own dtype and shape.
fn write_scale(ck: &Checkpoint, writer: &SafetensorsWriter, key: &str, scale: f32) -> Result<()> {
    let t = ck.get(key).ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: key.to_string(),
    })?;
    let values = vec![scale; t.numel().max(1)];
    writer.write(key, &convert::from_f32(&values, t.dtype)?)?;
    ck.release(t);
    Ok(())
}

/// Bakes `loras` into the checkpoint at `model`, writing `out` (temp file, fsync, rename).
pub fn bake_file(
    model: &Path,
    loras: &[Application],
    out: &Path,
    metadata: &BTreeMap<String, String>,
    allow_unmatched: bool,
    overwrite: bool,
    progress: bool,
) -> Result<BakePlan> {
    let ck = Checkpoint::open(model)?;
    let plan = plan(&ck, loras, allow_unmatched)?;
    let mut md = ck.metadata().clone();
    md.extend(metadata.clone());
    let writer = SafetensorsWriter::create(out, specs(&ck), &md, overwrite)?;
    write(&ck, loras, &plan, &writer, progress)?;
    writer.finish()?;
    Ok(plan)
}
