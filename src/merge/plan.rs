//! Planning a merge: what every output tensor is, decided and validated before any math.

use crate::arch::{self, Arch, Family, KeyClass, Variant};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::merge::calc::{CalcMode, Kind};
use crate::merge::select::{self, AdjustOp, BlockNames, KeyFilter};
use crate::merge::{BlockRatio, MergeSpec, Mode, Ratio};

/// Where a copied tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Model A.
    A,
    /// Model B.
    B,
    /// Model C.
    C,
    /// The VAE file of `bake_vae` (under the key without `first_stage_model.`).
    Vae,
}

/// What produces one output tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The tensor of a source, converted to the output dtype if needed.
    Copy(Source),
    /// The mode's formula with this key's ratios. `channels` is set when A has more input
    /// channels than B (inpainting / instruct-pix2pix A): only the first `channels` of
    /// dimension 1 are blended, the rest keep A.
    Blend {
        /// Weight of B.
        alpha: f64,
        /// Beta of this key (triple_sum / sum_twice, and the calcmodes that read it).
        beta: f64,
        /// Blended channel count of dimension 1, when smaller than A's.
        channels: Option<usize>,
        /// Adjust applied to the merged values.
        adjust: Option<AdjustOp>,
    },
    /// int64 `0..n` along the last axis (reset CLIP position ids).
    PositionIds,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyPlan {
    /// Tensor name.
    pub name: String,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Output dtype.
    pub dtype: DType,
    /// How it is produced.
    pub op: Op,
    /// MBW block (for reports).
    pub block: Option<String>,
}

/// The whole merge, tensor by tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// Architecture of model A.
    pub arch: Arch,
    /// Output tensors, sorted by name.
    pub keys: Vec<KeyPlan>,
    /// Mergeable keys of A absent from B (kept from A).
    pub missing_in_b: Vec<String>,
    /// Mergeable keys of A absent from C (kept from A).
    pub missing_in_c: Vec<String>,
    /// Keys only B has (added from B).
    pub added_from_b: Vec<String>,
    /// Alpha per key, resolved (for metadata).
    #[serde(skip)]
    pub alpha: BlockRatio,
    /// Beta per key, resolved (for metadata).
    #[serde(skip)]
    pub beta: Option<BlockRatio>,
}

impl Plan {
    /// Number of blended tensors.
    pub fn blended(&self) -> usize {
        self.keys
            .iter()
            .filter(|k| matches!(k.op, Op::Blend { .. }))
            .count()
    }
}

/// The models of a merge.
pub struct Inputs<'a> {
    /// Model A (the base: its keys, dtypes and extra channels are kept).
    pub a: &'a Checkpoint,
    /// Model B.
    pub b: &'a Checkpoint,
    /// Model C (add_difference, triple_sum, sum_twice).
    pub c: Option<&'a Checkpoint>,
    /// VAE to bake in.
    pub vae: Option<&'a Checkpoint>,
}

fn check_family(a: &Arch, other: &Checkpoint, which: &str) -> Result<()> {
    let o = arch::detect(other.tensors());
    if a.family != o.family && a.family != Family::Unknown && o.family != Family::Unknown {
        return Err(Error::Invalid(format!(
            "cannot merge {} (model A) with {} (model {which}: {})",
            a.family.label(),
            o.family.label(),
            other.path().display()
        )));
    }
    if a.variant == Variant::Standard && o.variant != Variant::Standard {
        return Err(Error::Invalid(format!(
            "model {which} ({}) is {o} but model A is not: A must be the inpainting / instruct-pix2pix model",
            other.path().display()
        )));
    }
    Ok(())
}

/// How a key of A combines with the same key of another model, by shape.
fn shape_fit(
    name: &str,
    a: &[usize],
    o: &[usize],
    which: &str,
    path: &Checkpoint,
) -> Result<Option<usize>> {
    if a == o {
        return Ok(None);
    }
    let channel_subset = a.len() == o.len()
        && a.len() >= 2
        && a[0] == o[0]
        && o[1] < a[1]
        && a[2..] == o[2..]
        && name == arch::UNET_CONV_IN;
    if channel_subset {
        return Ok(Some(o[1]));
    }
    Err(Error::Invalid(format!(
        "shape mismatch for `{name}`: model A has {a:?}, model {which} ({}) has {o:?}",
        path.path().display()
    )))
}

/// Plans a merge; every validation happens here, before any tensor is read.
pub fn plan(inputs: &Inputs, spec: &MergeSpec) -> Result<Plan> {
    let mode = spec.mode;
    match (mode.uses_c(), inputs.c.is_some()) {
        (true, false) => return Err(Error::Invalid(format!("{} needs model C", mode.label()))),
        (false, true) => {
            return Err(Error::Invalid(format!(
                "model C is not used by {}; remove it",
                mode.label()
            )));
        }
        _ => {}
    }
    let calc = spec.calcmode;
    if !calc.modes().contains(&mode) {
        let modes: Vec<&str> = calc.modes().iter().map(|m| m.label()).collect();
        return Err(Error::Invalid(format!(
            "calcmode {} applies to {} only, not {}",
            calc.label(),
            modes.join(" / "),
            mode.label()
        )));
    }
    let beta_used = mode.uses_beta() || calc.uses_beta();
    match (beta_used, spec.beta.is_some()) {
        (true, false) => {
            return Err(Error::Invalid(format!(
                "{} with calcmode {} needs beta",
                mode.label(),
                calc.label()
            )))
        }
        (false, true) => {
            return Err(Error::Invalid(format!(
                "beta is not used by {} with calcmode {}",
                mode.label(),
                calc.label()
            )))
        }
        _ => {}
    }
    check_calc_params(spec)?;
    let arch = arch::detect(inputs.a.tensors());
    check_family(&arch, inputs.b, "B")?;
    if let Some(c) = inputs.c {
        check_family(&arch, c, "C")?;
    }
    let family = arch.family;
    let alpha = BlockRatio::resolve(&spec.alpha, family, "alpha")?;
    let beta = spec
        .beta
        .as_ref()
        .map(|b| BlockRatio::resolve(b, family, "beta"))
        .transpose()?;
    let block_names = match alpha {
        BlockRatio::Extended(_) => BlockNames::Extended,
        _ if spec.xl_elemental_shift && family == Family::Sdxl => BlockNames::ShiftedXl,
        _ => BlockNames::Standard,
    };
    let elemental = spec
        .elemental
        .as_deref()
        .map(|t| select::parse_elemental(t, family, block_names))
        .transpose()?
        .unwrap_or_default();
    let filter = spec
        .filter
        .as_ref()
        .map(|f| KeyFilter::parse(f.mode, &f.blocks, &f.elements, family))
        .transpose()?;
    let out_dtype = |d: DType| match spec.dtype {
        Some(f) if d.is_float() => f.dtype(),
        _ => d,
    };

    let ctx = KeyCtx {
        inputs,
        spec,
        family,
        alpha: &alpha,
        beta: beta.as_ref(),
        block_names,
        elemental: &elemental,
        filter: filter.as_ref(),
    };
    let mut keys = Vec::with_capacity(inputs.a.tensors().len());
    let mut missing = Missing::default();
    let mut errors = Vec::new();
    for t in inputs.a.tensors() {
        let class = arch::classify(family, &t.name);
        let mut op = key_op(&ctx, t, &class, &mut missing).unwrap_or_else(|e| {
            errors.push(e);
            Op::Copy(Source::A)
        });
        if spec.reset_position_ids && t.name.ends_with("text_model.embeddings.position_ids") {
            op = Op::PositionIds;
        }
        let dtype = if op == Op::PositionIds {
            DType::I64
        } else {
            out_dtype(t.dtype)
        };
        keys.push(KeyPlan {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype,
            op,
            block: class.block,
        });
    }
    if !errors.is_empty() {
        let n = errors.len();
        errors.truncate(5);
        let more = if n > 5 {
            format!("\n  ... and {} more", n - 5)
        } else {
            String::new()
        };
        return Err(Error::Invalid(format!(
            "cannot merge:\n  {}{more}",
            errors.join("\n  ")
        )));
    }

    // Keys only B has are added (SuperMerger skips the SD1 CLIP position ids).
    let mut added_from_b = Vec::new();
    for t in inputs.b.tensors() {
        if !inputs.a.contains(&t.name)
            && t.name != "cond_stage_model.transformer.text_model.embeddings.position_ids"
        {
            added_from_b.push(t.name.clone());
            keys.push(KeyPlan {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: out_dtype(t.dtype),
                op: Op::Copy(Source::B),
                block: arch::classify(family, &t.name).block,
            });
        }
    }

    if let Some(vae) = inputs.vae {
        bake_vae(&mut keys, vae)?;
    }
    if spec.prune {
        keys.retain(|k| {
            [
                "diffusion_model.",
                "first_stage_model.",
                "cond_stage_model.",
                "conditioner.",
            ]
            .iter()
            .any(|p| k.name.contains(p))
        });
    }
    keys.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(Plan {
        arch,
        keys,
        missing_in_b: missing.b,
        missing_in_c: missing.c,
        added_from_b,
        alpha,
        beta,
    })
}

/// What every key's planning shares.
struct KeyCtx<'a> {
    inputs: &'a Inputs<'a>,
    spec: &'a MergeSpec,
    family: Family,
    alpha: &'a BlockRatio,
    beta: Option<&'a BlockRatio>,
    block_names: BlockNames,
    elemental: &'a [select::ElementalEntry],
    filter: Option<&'a KeyFilter>,
}

/// Mergeable keys of A that B or C lack.
#[derive(Default)]
struct Missing {
    b: Vec<String>,
    c: Vec<String>,
}

/// What one key of A becomes. `Err` is a message for the combined planning error.
fn key_op(
    ctx: &KeyCtx,
    t: &TensorInfo,
    class: &KeyClass,
    missing: &mut Missing,
) -> std::result::Result<Op, String> {
    let keep_a = Ok(Op::Copy(Source::A));
    let (spec, calc) = (ctx.spec, ctx.spec.calcmode);
    let allowed =
        ctx.filter.is_none_or(|f| f.allows(class, &t.name)) && !calc.skips(&t.name, t.shape.len());
    if !(class.mergeable && t.dtype.is_float() && allowed) {
        return keep_a;
    }
    let Some(b) = ctx.inputs.b.get(&t.name) else {
        missing.b.push(t.name.clone());
        return keep_a;
    };
    let c = match ctx.inputs.c {
        Some(ck) => match ck.get(&t.name) {
            Some(ct) => Some((ck, ct)),
            None => {
                missing.c.push(t.name.clone());
                return keep_a;
            }
        },
        None => None,
    };
    if !b.dtype.is_float() || c.is_some_and(|(_, ct)| !ct.dtype.is_float()) {
        return keep_a;
    }
    let fit = |o: &TensorInfo, which, ck| {
        shape_fit(&t.name, &t.shape, &o.shape, which, ck).map_err(|e| e.to_string())
    };
    let ch_b = fit(b, "B", ctx.inputs.b)?;
    let ch_c = c.map(|(ck, ct)| fit(ct, "C", ck)).transpose()?.flatten();
    if ch_b.is_some() && ch_c.is_some() && ch_b != ch_c {
        return Err(format!(
            "`{}`: models B and C have different channel counts",
            t.name
        ));
    }
    let channels = ch_b.or(ch_c);
    if channels.is_some() && calc.kind() == Kind::Whole {
        return Err(format!(
            "`{}`: calcmode {} cannot merge models with different input channels; use normal",
            t.name,
            calc.label()
        ));
    }
    let alpha = select::elemental_alpha(ctx.elemental, ctx.block_names, class, &t.name)
        .unwrap_or_else(|| ctx.alpha.value(ctx.family, class));
    let beta = ctx.beta.map(|r| r.value(ctx.family, class)).unwrap_or(0.0);
    if calc == CalcMode::Extract && !(0.0..=1.0).contains(&alpha) {
        return Err(format!(
            "`{}`: extract needs 0 <= alpha <= 1, got {alpha}",
            t.name
        ));
    }
    let adjust = spec
        .adjust
        .as_ref()
        .and_then(|v| select::adjust_op(v, ctx.family, &t.name));
    Ok(if calc == CalcMode::Normal {
        blend_op(spec.mode, alpha, beta, channels, adjust)
    } else {
        Op::Blend {
            alpha,
            beta,
            channels,
            adjust,
        }
    })
}

/// The op for a blended key, with the exact shortcuts of SuperMerger's "normal" calcmode:
/// a zero weight keeps A, weight_sum at alpha 1 is B (sum_twice at beta 1 is C).
/// Keys with an Adjust op are always blended (Adjust acts on the merged values).
fn blend_op(
    mode: Mode,
    alpha: f64,
    beta: f64,
    channels: Option<usize>,
    adjust: Option<AdjustOp>,
) -> Op {
    let whole = channels.is_none() && adjust.is_none();
    let keep_a = adjust.is_none();
    match mode {
        Mode::WeightSum | Mode::AddDifference if alpha == 0.0 && keep_a => Op::Copy(Source::A),
        Mode::TripleSum | Mode::SumTwice if alpha == 0.0 && beta == 0.0 && keep_a => {
            Op::Copy(Source::A)
        }
        Mode::WeightSum if alpha == 1.0 && whole => Op::Copy(Source::B),
        Mode::SumTwice if beta == 1.0 && whole => Op::Copy(Source::C),
        _ => Op::Blend {
            alpha,
            beta,
            channels,
            adjust,
        },
    }
}

/// Checks the parameters that calcmodes constrain.
fn check_calc_params(spec: &MergeSpec) -> Result<()> {
    let nonneg = |r: &Ratio| match r {
        Ratio::Scalar(v) => *v >= 0.0,
        Ratio::Blocks(v) => v.iter().all(|x| *x >= 0.0),
    };
    match spec.calcmode {
        CalcMode::Extract => {
            match &spec.beta {
                Some(Ratio::Scalar(b)) if (0.0..=1.0).contains(b) => {}
                Some(Ratio::Scalar(b)) => {
                    return Err(Error::Invalid(format!(
                        "extract needs 0 <= beta <= 1, got {b}"
                    )))
                }
                _ => {
                    return Err(Error::Invalid(
                        "extract takes a single beta value, not per-block weights".into(),
                    ))
                }
            }
            if !(spec.gamma >= 0.0 && spec.gamma.is_finite()) {
                return Err(Error::Invalid(format!(
                    "extract needs gamma >= 0, got {}",
                    spec.gamma
                )));
            }
        }
        CalcMode::Tensor | CalcMode::Tensor2
            if !nonneg(&spec.alpha) || !spec.beta.as_ref().is_some_and(nonneg) =>
        {
            return Err(Error::Invalid(format!(
                "calcmode {} needs alpha >= 0 and beta >= 0 (they select slices)",
                spec.calcmode.label()
            )));
        }
        _ => {}
    }
    Ok(())
}

/// Replaces `first_stage_model.*` tensors by those of a VAE file (keys with or without
/// the prefix).
fn bake_vae(keys: &mut [KeyPlan], vae: &Checkpoint) -> Result<()> {
    let mut used = 0;
    for k in keys.iter_mut() {
        let Some(rest) = k.name.strip_prefix("first_stage_model.") else {
            continue;
        };
        let t = vae.get(rest).or_else(|| vae.get(&k.name));
        if let Some(t) = t {
            if t.shape != k.shape {
                return Err(Error::Invalid(format!(
                    "VAE {}: `{}` has shape {:?}, the model has {:?}",
                    vae.path().display(),
                    t.name,
                    t.shape,
                    k.shape
                )));
            }
            k.op = Op::Copy(Source::Vae);
            used += 1;
        }
    }
    if used == 0 {
        return Err(Error::Invalid(format!(
            "VAE {}: none of its {} tensors matches a `first_stage_model.*` key",
            vae.path().display(),
            vae.tensors().len()
        )));
    }
    Ok(())
}
