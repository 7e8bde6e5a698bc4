//! Baking LoRAs into a checkpoint: `W' = W + Σ strength · block weight · ΔW` for every weight
//! a module resolves to, in f32, rounded once to W's stored dtype (lora.md §2.2). Every delta
//! is computed from the original W (IA3 reads it), so the order of the LoRAs does not matter.
//! Untouched tensors are copied byte for byte; a zero factor leaves W bit-identical.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::arch::{self, Family};
use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use crate::checkpoint::Checkpoint;
use crate::convert;
use crate::error::{Error, Result};
use crate::lora::blocks::BlockWeights;
use crate::lora::delta::{delta, dora_change};
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
            .or_else(|| file.family())
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
    /// The bias of a full-difference module (`diff_b`), not its weight.
    pub bias: bool,
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
}

/// Resolves every module of every LoRA against the checkpoint. Modules that match nothing are
/// an error naming them, unless `allow_unmatched` (then they are listed in the plan).
pub fn plan(ck: &Checkpoint, loras: &[Application], allow_unmatched: bool) -> Result<BakePlan> {
    crate::checkpoint::quant::Quant::require_plain(ck, "LoRA baking")?;
    let family = arch::detect(ck.tensors()).family;
    let targets = Targets::of(ck);
    let mut out = BakePlan::default();
    for (li, app) in loras.iter().enumerate() {
        let f = &app.file;
        let made_for = f.family();
        if family.code().lora.is_none() {
            return Err(Error::Invalid(format!(
                "baking LoRAs into {} checkpoints is not supported yet ({})",
                family.label(),
                f.path.display()
            )));
        }
        let xl = family.xl_lora();
        if made_for.is_some_and(|m| m.xl_lora() != xl) {
            return Err(Error::Invalid(format!(
                "{} is a LoRA for {}, the checkpoint is {}",
                f.path.display(),
                if xl { "SD1.x/SD2.x" } else { "SDXL" },
                family.label()
            )));
        }
        for (mi, m) in f.modules.iter().enumerate() {
            let Some(t) = targets.get(&m.name) else {
                out.unmatched.push((li, m.name.clone()));
                continue;
            };
            out.applied += 1;
            let block = arch::classify(family, &t.key).block;
            let block_weight = app
                .blocks
                .as_ref()
                .map_or(1.0, |b| b.weight(block.as_deref()));
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
                })
            };
            if m.kind != Kind::Full || m.parts.contains_key("diff") {
                add(t.key.clone(), t.rows, false);
            }
            if m.kind == Kind::Full && m.parts.contains_key("diff_b") {
                let bias = t.key.strip_suffix(".weight").unwrap_or(&t.key).to_string() + ".bias";
                add(bias, None, true);
            }
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

/// The new values of one changed tensor.
pub fn changed_tensor(
    ck: &Checkpoint,
    loras: &[Application],
    key: &str,
    contributions: &[Contribution],
) -> Result<Vec<u8>> {
    let t = ck.get(key).ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: key.to_string(),
    })?;
    let original = convert::to_f32(t.dtype, &ck.data(t))?;
    let mut w = original.clone();
    let cols = t.numel() / t.shape.first().copied().unwrap_or(1).max(1);
    for c in contributions {
        let f = &loras[c.lora].file;
        let m = &f.modules[c.module];
        let (lo, hi) = c.rows.map_or((0, w.len()), |(a, b)| (a * cols, b * cols));
        let d = if c.bias {
            f.part(m, "diff_b")?.map(|(v, _)| v).unwrap_or_default()
        } else {
            let mut shape = t.shape.clone();
            if let (Some((a, b)), Some(first)) = (c.rows, shape.first_mut()) {
                *first = b - a;
            }
            delta(f, m, hi - lo, Some(&original[lo..hi]), &shape)?
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
            if c.rows.is_some() {
                return Err(Error::Invalid(format!(
                    "{}: module `{}`: DoRA on a fused q/k/v projection is not supported",
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
    convert::from_f32(&w, t.dtype)
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
    ck.tensors()
        .par_iter()
        .filter(|t| writer.expects(&t.name))
        .try_for_each(|t| {
            match plan.changes.get(&t.name) {
                Some(c) => writer.write(&t.name, &changed_tensor(ck, loras, &t.name, c)?)?,
                None => writer.write(&t.name, &ck.data(t))?,
            }
            ck.release(t);
            bar.inc(t.byte_len() as u64);
            Ok::<_, Error>(())
        })?;
    bar.finish_and_clear();
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
