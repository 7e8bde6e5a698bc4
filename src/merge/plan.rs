//! Planning a merge: what every output tensor is, decided and validated before any math.

use std::collections::BTreeMap;

use crate::arch::{self, Arch, Component, Family, KeyClass};
use crate::checkpoint::quant::Quant;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::merge::calc::{CalcMode, Kind};
use crate::merge::dice::Draw;
use crate::merge::numerics::{self, Numerics};
use crate::merge::select::{self, AdjustOp, BlockNames, EntryRatio, KeyFilter};
use crate::merge::{BlockRatio, MergeSpec, Mode, Ratio};

/// Where a copied tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
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
    /// The per-tensor scale of the scaled-fp8 weight named here, recomputed when that
    /// weight is written (an f32 scalar).
    ScaleOf(String),
    /// An empty tensor of the key's dtype (ComfyUI's `scaled_fp8` marker: only its dtype
    /// is read).
    Marker,
}

impl Op {
    /// `(alpha, beta)` of a blend (zeros otherwise).
    pub fn ratios(&self) -> (f64, f64) {
        match self {
            Op::Blend { alpha, beta, .. } => (*alpha, *beta),
            _ => (0.0, 0.0),
        }
    }
}

/// How an output tensor is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stored {
    /// As its dtype says (a scaled-fp8 source is dequantized first).
    #[default]
    Plain,
    /// Scaled fp8 with a scale recomputed from the tensor's values, written to this key.
    Scaled(String),
    /// The source's scaled-fp8 bytes unchanged (its scale key is copied beside it).
    AsSource,
}

impl Stored {
    fn is_plain(&self) -> bool {
        *self == Stored::Plain
    }
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
    /// The key's name in model B when B's layout names it differently (mixed layouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_b: Option<String>,
    /// The key's name in model C when C's layout names it differently.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_c: Option<String>,
    /// Scaled-fp8 storage of the output tensor.
    #[serde(skip_serializing_if = "Stored::is_plain")]
    pub stored: Stored,
}

impl KeyPlan {
    /// The name of this key in a source model.
    pub fn name_in(&self, source: Source) -> &str {
        match source {
            Source::B => self.name_b.as_deref().unwrap_or(&self.name),
            Source::C => self.name_c.as_deref().unwrap_or(&self.name),
            _ => &self.name,
        }
    }
}

/// Why a tensor of A that a merge could blend was kept from A instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// The family's merge rule never blends it (buffers, the Flux VAE, ...).
    FamilyRule,
    /// Not a floating-point tensor in A, B or C (integers, or a storage type not read yet).
    Dtype,
    /// Include / Exclude left it out.
    Filter,
    /// The calcmode skips it (e.g. 1-D tensors for the SVD calcmodes).
    Calcmode,
    /// The block vector's list has no block for it.
    OutsideBlocks,
    /// Model B has no such key.
    MissingInB,
    /// Model C has no such key.
    MissingInC,
}

impl Kept {
    /// Description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Kept::FamilyRule => "never blended by the family's merge rule",
            Kept::Dtype => "not a floating-point tensor in every input",
            Kept::Filter => "left out by Include/Exclude",
            Kept::Calcmode => "skipped by the calcmode",
            Kept::OutsideBlocks => "outside the block vector's list",
            Kept::MissingInB => "missing from B",
            Kept::MissingInC => "missing from C",
        }
    }
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
    /// Keys of A kept from A although the merge could have blended them, by reason.
    pub kept: BTreeMap<Kept, Vec<String>>,
    /// Marker tensors (v-prediction, zero-terminal-SNR) in the output, with their source.
    pub markers: Vec<(String, Source)>,
    /// Layout of each input (A, B, C), when they differ.
    pub layouts: Option<Vec<&'static str>>,
    /// Scaled-fp8 weights of the inputs that were dequantized (output not scaled), counted.
    pub dequantized: usize,
    /// The scaled-fp8 facts of A, B and C (weights are their stored values times these).
    #[serde(skip)]
    pub quant: [Quant; 3],
    /// Alpha per key, resolved (for metadata).
    #[serde(skip)]
    pub alpha: BlockRatio,
    /// Beta per key, resolved (for metadata).
    #[serde(skip)]
    pub beta: Option<BlockRatio>,
}

impl Plan {
    /// The scale of a source's tensor (none: stored as is).
    pub fn scale(&self, source: Source, name: &str) -> Option<f32> {
        let i = match source {
            Source::A => 0,
            Source::B => 1,
            Source::C => 2,
            Source::Vae => return None,
        };
        self.quant[i].scale(name)
    }

    /// What a user should hear about the plan besides the counts: keys kept from A and why,
    /// keys added from B, markers carried through, mixed layouts, a generic family.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.arch.family.is_generic() {
            out.push(format!(
                "architecture not recognized ({}): keys matching in name and shape were merged with scalar ratios",
                self.arch.rule
            ));
        }
        let eg = |keys: &[String]| {
            let shown: Vec<String> = keys.iter().take(3).map(|k| format!("`{k}`")).collect();
            let more = if keys.len() > 3 { ", ..." } else { "" };
            format!("{}{more}", shown.join(", "))
        };
        for (what, keys) in [
            ("missing from B (kept from A)", &self.missing_in_b),
            ("missing from C (kept from A)", &self.missing_in_c),
            ("only in B (added)", &self.added_from_b),
        ] {
            if !keys.is_empty() {
                out.push(format!("{} keys {what}: {}", keys.len(), eg(keys)));
            }
        }
        for (why, keys) in &self.kept {
            out.push(format!(
                "{} keys kept from A, {}: {}",
                keys.len(),
                why.describe(),
                eg(keys)
            ));
        }
        for (m, s) in &self.markers {
            out.push(format!("marker `{m}` carried through from model {s:?}"));
        }
        if self.dequantized > 0 {
            out.push(format!(
                "{} scaled-fp8 weights were dequantized (the output is not scaled fp8)",
                self.dequantized
            ));
        }
        if let Some(l) = &self.layouts {
            out.push(format!(
                "inputs have different layouts ({}): keys were mapped, the output keeps A's ({})",
                l.join(", "),
                self.arch.layout
            ));
        }
        out
    }

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

fn check_family(a: &Arch, other: &Checkpoint, which: &str) -> Result<Arch> {
    let o = arch::detect(other.tensors());
    if a.family != o.family && !a.family.is_generic() && !o.family.is_generic() {
        return Err(Error::Invalid(format!(
            "cannot merge {} (model A) with {} (model {which}: {})",
            a.family.label(),
            o.family.label(),
            other.path().display()
        )));
    }
    if !a.variant.subset_channels && o.variant.subset_channels {
        return Err(Error::Invalid(format!(
            "model {which} ({}) is {o} but model A is not: A must be the inpainting / instruct-pix2pix model",
            other.path().display()
        )));
    }
    if a.family == o.family && a.layout != o.layout {
        let map = |l: &str| a.family.layout(l).and_then(|l| l.prefix.as_deref());
        if map(a.layout).is_none() || map(o.layout).is_none() {
            return Err(Error::Invalid(format!(
                "model A ({} layout) and model {which} ({}: {} layout) name their keys differently and mergesmith cannot map them yet; convert one of them",
                a.layout,
                other.path().display(),
                o.layout
            )));
        }
    }
    Ok(o)
}

/// A key of A under another model's layout (same key when the layouts agree).
fn name_under(family: Family, from: &str, to: &str, key: &str) -> Option<String> {
    if from == to {
        return None;
    }
    let prefix = |l: &str| family.layout(l).and_then(|l| l.prefix.as_deref());
    let (pa, po) = (prefix(from)?, prefix(to)?);
    if family.component(key) != Component::Unet || !key.starts_with(pa) {
        return None;
    }
    Some(format!("{po}{}", &key[pa.len()..]))
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
    let arch_b = check_family(&arch, inputs.b, "B")?;
    let arch_c = inputs.c.map(|c| check_family(&arch, c, "C")).transpose()?;
    let quant = [
        Quant::of(inputs.a)?,
        Quant::of(inputs.b)?,
        inputs.c.map(Quant::of).transpose()?.unwrap_or_default(),
    ];
    // Output keeps A's scaled-fp8 storage unless a dtype is asked for; `scaled` asks for it.
    let scaled_out = spec.scaled || quant[0].is_scaled() && spec.dtype.is_none();
    let family = arch.family;
    if spec.adjust.is_some() && family.code().adjust.is_none() {
        return Err(Error::Invalid(format!(
            "adjust acts on the SD UNet's first and last convolutions; {} has none",
            family.label()
        )));
    }
    let list = spec.block_list.as_deref();
    let alpha = BlockRatio::resolve_in(&spec.alpha, family, "alpha", list)?;
    let beta = spec
        .beta
        .as_ref()
        .map(|b| BlockRatio::resolve_in(b, family, "beta", list))
        .transpose()?;
    let second = family.lists().get(1).map(|l| l.id());
    let block_names = match alpha {
        BlockRatio::Extended(_) => BlockNames::Extended,
        _ if list.is_some() && list == second => BlockNames::Extended,
        _ if spec.xl_elemental_shift && family.id() == "sdxl" => BlockNames::ShiftedXl,
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

    let draw = spec.dice.as_ref().map(Draw::new);
    let mut sorted: Vec<&str> = inputs.a.tensors().iter().map(|t| t.name.as_str()).collect();
    sorted.sort_unstable();
    let ctx = KeyCtx {
        inputs,
        spec,
        family,
        alpha: &alpha,
        beta: beta.as_ref(),
        block_names,
        elemental: &elemental,
        filter: filter.as_ref(),
        draw: draw.as_ref(),
        sorted: &sorted,
    };
    let mut keys = Vec::with_capacity(inputs.a.tensors().len());
    let mut kept: BTreeMap<Kept, Vec<String>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut eligible = 0;
    for t in inputs.a.tensors() {
        if Quant::is_bookkeeping(&t.name) {
            // Markers and scales: kept with scaled output (scales fixed below), dropped with
            // a plain one.
            if scaled_out {
                keys.push(KeyPlan {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                    op: Op::Copy(Source::A),
                    block: None,
                    name_b: None,
                    name_c: None,
                    stored: Stored::Plain,
                });
            }
            continue;
        }
        let class = arch::classify(family, &t.name);
        let names = Names {
            b: name_under(family, arch.layout, arch_b.layout, &t.name),
            c: arch_c
                .as_ref()
                .and_then(|c| name_under(family, arch.layout, c.layout, &t.name)),
        };
        let mut op = match key_op(&ctx, t, &class, &names) {
            Ok(Ok(op)) => {
                eligible += 1;
                op
            }
            Ok(Err(why)) => {
                kept.entry(why).or_default().push(t.name.clone());
                Op::Copy(Source::A)
            }
            Err(e) => {
                errors.push(e);
                Op::Copy(Source::A)
            }
        };
        if spec.reset_position_ids && t.name.ends_with("text_model.embeddings.position_ids") {
            op = Op::PositionIds;
        }
        let dtype = if op == Op::PositionIds {
            DType::I64
        } else if spec.numerics == Numerics::Supermerger {
            out_dtype(supermerger_dtype(&ctx, t, &names, &op))
        } else {
            out_dtype(t.dtype)
        };
        let stored = match (scaled_out, quant[0].scale(&t.name), &op) {
            (true, Some(_), Op::Copy(Source::A)) => Stored::AsSource,
            (true, Some(_), _) => Stored::Scaled(Quant::scale_key(&t.name).unwrap_or_default()),
            _ => Stored::Plain,
        };
        keys.push(KeyPlan {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype,
            op,
            block: class.block,
            name_b: names.b,
            name_c: names.c,
            stored,
        });
    }
    if spec.scaled {
        scale_plain_weights(&mut keys, inputs.a, spec, family, arch.layout)?;
    }
    // Scales of re-quantized weights are written with them.
    let recomputed: BTreeMap<String, String> = keys
        .iter()
        .filter_map(|k| match &k.stored {
            Stored::Scaled(s) => Some((s.clone(), k.name.clone())),
            _ => None,
        })
        .collect();
    for k in keys.iter_mut() {
        if let Some(w) = recomputed.get(&k.name) {
            k.op = Op::ScaleOf(w.clone());
            k.dtype = DType::F32;
        }
    }
    let dequantized = [Source::A, Source::B, Source::C]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            keys.iter()
                .filter(|k| k.stored.is_plain() && quant[i].scale(k.name_in(*s)).is_some())
                .count()
        })
        .max()
        .unwrap_or(0);
    if !errors.is_empty() {
        let n = errors.len();
        errors.truncate(5);
        let more = if n > 5 {
            format!("\n  ... and {} more", n - 5)
        } else {
            String::new()
        };
        let variants = if arch.variant != arch_b.variant {
            format!("\n  (model A is {arch}, model B is {arch_b}: these variants differ in shape)")
        } else {
            String::new()
        };
        return Err(Error::Invalid(format!(
            "cannot merge:\n  {}{more}{variants}",
            errors.join("\n  ")
        )));
    }
    if eligible == 0 {
        return Err(nothing_to_blend(&arch, inputs, &kept));
    }

    // Keys only B has are added (SuperMerger skips the SD1 CLIP position ids); under mixed
    // layouts, B's diffusion-model keys are renamed to A's layout and its other parts are
    // left out (the output keeps A's layout).
    let mut added_from_b = Vec::new();
    let mut markers = Vec::new();
    let has_a = |n: &str| inputs.a.contains(n);
    for t in inputs.b.tensors() {
        if Quant::is_bookkeeping(&t.name) {
            continue;
        }
        let name = match name_under(family, arch_b.layout, arch.layout, &t.name) {
            Some(n) => n,
            None if arch_b.layout != arch.layout
                && family.component(&t.name) != Component::Other =>
            {
                continue
            }
            None => t.name.clone(),
        };
        if !has_a(&name)
            && name != "cond_stage_model.transformer.text_model.embeddings.position_ids"
        {
            if family.markers().contains(&name) {
                markers.push((name.clone(), Source::B));
            } else {
                added_from_b.push(name.clone());
            }
            keys.push(KeyPlan {
                name: name.clone(),
                shape: t.shape.clone(),
                dtype: out_dtype(t.dtype),
                op: Op::Copy(Source::B),
                block: arch::classify(family, &name).block,
                name_b: (name != t.name).then(|| t.name.clone()),
                name_c: None,
                stored: Stored::Plain,
            });
        }
    }
    for m in family.markers() {
        if has_a(m) {
            markers.push((m.clone(), Source::A));
        } else if let Some(t) = inputs
            .c
            .and_then(|c| c.get(m))
            .filter(|_| !inputs.b.contains(m))
        {
            markers.push((m.clone(), Source::C));
            keys.push(KeyPlan {
                name: m.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype,
                op: Op::Copy(Source::C),
                block: None,
                name_b: None,
                name_c: None,
                stored: Stored::Plain,
            });
        }
    }
    markers.sort();

    if let Some(vae) = inputs.vae {
        bake_vae(&mut keys, vae)?;
    }
    if spec.prune {
        keys.retain(|k| {
            !matches!(family.component(&k.name), Component::Ema | Component::Other)
                || family.markers().contains(&k.name)
        });
    }
    keys.sort_by(|x, y| x.name.cmp(&y.name));
    let layouts = [Some(&arch), Some(&arch_b), arch_c.as_ref()]
        .into_iter()
        .flatten()
        .map(|a| a.layout)
        .collect::<Vec<_>>();
    let layouts = layouts.iter().any(|l| *l != arch.layout).then_some(layouts);
    let missing_in_b = kept.remove(&Kept::MissingInB).unwrap_or_default();
    let missing_in_c = kept.remove(&Kept::MissingInC).unwrap_or_default();
    Ok(Plan {
        arch,
        keys,
        missing_in_b,
        missing_in_c,
        added_from_b,
        kept,
        markers,
        layouts,
        dequantized,
        quant,
        alpha,
        beta,
    })
}

/// The error of a merge in which no tensor can be blended, with the reasons.
fn nothing_to_blend(arch: &Arch, inputs: &Inputs, kept: &BTreeMap<Kept, Vec<String>>) -> Error {
    let mut why: Vec<String> = kept
        .iter()
        .map(|(k, names)| format!("{} {} (e.g. `{}`)", names.len(), k.describe(), names[0]))
        .collect();
    if why.is_empty() {
        why.push("model A has no tensors".into());
    }
    Error::Invalid(format!(
        "nothing to merge: no tensor of model A ({}, {}: {}) can be blended with model B; the output would be a copy of A.\n  {}",
        inputs.a.path().display(),
        arch,
        arch.rule,
        why.join("\n  ")
    ))
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
    /// The dice's numbers (random elemental ratios).
    draw: Option<&'a Draw>,
    /// A's key names, sorted (a key's position picks its elemental dice number).
    sorted: &'a [&'a str],
}

/// A key's names in B and C under their layouts (`None`: the same name).
struct Names {
    b: Option<String>,
    c: Option<String>,
}

/// What one key of A becomes: `Ok(Ok(op))` when it can be blended (`op` may still be a copy
/// where the ratios make it one), `Ok(Err(why))` when it is kept from A, `Err` a message for
/// the combined planning error.
fn key_op(
    ctx: &KeyCtx,
    t: &TensorInfo,
    class: &KeyClass,
    names: &Names,
) -> std::result::Result<std::result::Result<Op, Kept>, String> {
    let (spec, calc) = (ctx.spec, ctx.spec.calcmode);
    if !class.mergeable {
        return Ok(Err(Kept::FamilyRule));
    }
    if !t.dtype.is_float() {
        return Ok(Err(Kept::Dtype));
    }
    if !ctx.filter.is_none_or(|f| f.allows(class, &t.name)) {
        return Ok(Err(Kept::Filter));
    }
    if calc.skips(&t.name, t.shape.len()) {
        return Ok(Err(Kept::Calcmode));
    }
    let Some(b) = ctx.inputs.b.get(names.b.as_deref().unwrap_or(&t.name)) else {
        return Ok(Err(Kept::MissingInB));
    };
    let c = match ctx.inputs.c {
        Some(ck) => match ck.get(names.c.as_deref().unwrap_or(&t.name)) {
            Some(ct) => Some((ck, ct)),
            None => return Ok(Err(Kept::MissingInC)),
        },
        None => None,
    };
    if !b.dtype.is_float() || c.is_some_and(|(_, ct)| !ct.dtype.is_float()) {
        return Ok(Err(Kept::Dtype));
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
    let elemental =
        match select::elemental_alpha(ctx.elemental, ctx.family, ctx.block_names, class, &t.name) {
            Some(EntryRatio::Value(v)) => Some(v),
            Some(EntryRatio::Dice(token)) => Some(dice_ratio(ctx, class, &t.name, token)?),
            None => None,
        };
    let Some(alpha) = elemental.or_else(|| ctx.alpha.value(ctx.family, class)) else {
        return Ok(Err(Kept::OutsideBlocks));
    };
    let beta = match ctx.beta.map(|r| r.value(ctx.family, class)) {
        None => 0.0,
        Some(Some(b)) => b,
        Some(None) => return Ok(Err(Kept::OutsideBlocks)),
    };
    if calc == CalcMode::Extract && !(0.0..=1.0).contains(&alpha) {
        return Err(format!(
            "`{}`: extract needs 0 <= alpha <= 1, got {alpha}",
            t.name
        ));
    }
    if spec.numerics == Numerics::Supermerger && calc == CalcMode::TrainDifference {
        // SuperMerger leaves a key whose B and C are equal untouched (no Adjust either).
        if let Some((ck, ct)) = c {
            if same_values((ctx.inputs.b, b), (ck, ct)).map_err(|e| e.to_string())? {
                return Ok(Ok(Op::Copy(Source::A)));
            }
        }
    }
    let adjust = spec
        .adjust
        .as_ref()
        .and_then(|v| select::adjust_op(v, ctx.family, &t.name, spec.numerics));
    Ok(Ok(if calc == CalcMode::Normal {
        blend_op(spec.mode, alpha, beta, channels, adjust)
    } else {
        Op::Blend {
            alpha,
            beta,
            channels,
            adjust,
        }
    }))
}

/// An elemental dice ratio (`R`, `U`, `X`) for a key: drawn from the merge's dice at the
/// key's position among A's sorted keys, as SuperMerger does.
fn dice_ratio(
    ctx: &KeyCtx,
    class: &KeyClass,
    key: &str,
    token: char,
) -> std::result::Result<f64, String> {
    let Some(draw) = ctx.draw else {
        return Err(format!(
            "elemental ratio `{token}` is drawn by the dice: give the merge a dice seed (`dice: {{ seed: N }}`, `--dice-seed N`)"
        ));
    };
    let index = ctx.sorted.binary_search(&key).unwrap_or(0);
    let block = class
        .block
        .as_deref()
        .and_then(|b| ctx.family.blocks().iter().position(|n| n == b))
        .unwrap_or(0);
    draw.elemental(token, index, block)
        .map_err(|e| e.to_string())
}

/// Whether two tensors hold the same values (`torch.allclose` with no tolerance: 0 equals
/// −0, NaN equals nothing).
fn same_values(b: (&Checkpoint, &TensorInfo), c: (&Checkpoint, &TensorInfo)) -> Result<bool> {
    if b.1.shape != c.1.shape {
        return Ok(false);
    }
    let (db, dc) = (b.0.data(b.1), c.0.data(c.1));
    let n: usize = b.1.shape.iter().product();
    let (mut vb, mut vc) = (Vec::new(), Vec::new());
    for lo in (0..n).step_by(1 << 16) {
        let hi = (lo + (1 << 16)).min(n);
        crate::convert::decode_range(b.1.dtype, &db, lo, hi, &mut vb)?;
        crate::convert::decode_range(c.1.dtype, &dc, lo, hi, &mut vc)?;
        if vb.iter().zip(&vc).any(|(x, y)| x != y) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The dtype a key leaves a merge in under SuperMerger's numerics, before a requested
/// output type: B's for a verbatim B (weight sum at alpha 1), the promoted type of the
/// calculation for a blend (f32 where Adjust adds to it), A's otherwise.
fn supermerger_dtype(ctx: &KeyCtx, t: &TensorInfo, names: &Names, op: &Op) -> DType {
    let b = ctx
        .inputs
        .b
        .get(names.b.as_deref().unwrap_or(&t.name))
        .map_or(t.dtype, |b| b.dtype);
    match op {
        Op::Copy(Source::B) => b,
        Op::Blend { adjust, .. } => {
            let merged = numerics::merged_dtype(ctx.spec.mode, ctx.spec.calcmode, t.dtype, b);
            match adjust {
                Some(AdjustOp::Add(_)) => numerics::promote(merged, DType::F32),
                _ => merged,
            }
        }
        _ => t.dtype,
    }
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

/// Makes a scaled-fp8 output from weights A stores plainly (`scaled: true`): every 2-D
/// diffusion-model `.weight` (the linear layers ComfyUI's scaled-fp8 ops read with a scale)
/// is stored in the fp8 type with a fresh per-tensor scale `X.scale_weight`; every other
/// tensor keeps A's dtype, as in the scaled files ComfyUI users have; the family's marker
/// (`scaled_fp8` under the layout's prefix) is added when A has none.
fn scale_plain_weights(
    keys: &mut Vec<KeyPlan>,
    a: &Checkpoint,
    spec: &MergeSpec,
    family: Family,
    layout: &str,
) -> Result<()> {
    let is_f8 = |d: DType| matches!(d, DType::F8E4M3 | DType::F8E5M2);
    let f8 = spec
        .dtype
        .map(|d| d.dtype())
        .or_else(|| a.tensors().iter().map(|t| t.dtype).find(|d| is_f8(*d)))
        .filter(|d| is_f8(*d))
        .ok_or_else(|| {
            Error::Invalid(
                "`scaled` writes scaled fp8: give an fp8 output type (`--dtype fp8_e4m3` or \
                 `fp8_e5m2`); model A stores no fp8"
                    .into(),
            )
        })?;
    let existing: std::collections::BTreeSet<String> =
        keys.iter().map(|k| k.name.clone()).collect();
    let mut out = Vec::with_capacity(keys.len() * 2);
    for mut k in std::mem::take(keys) {
        let a_dtype = a.get(&k.name).map_or(k.dtype, |t| t.dtype);
        let weight = k.shape.len() == 2
            && k.name.ends_with(".weight")
            && a_dtype.is_float()
            && family.component(&k.name) == Component::Unet
            && !Quant::is_bookkeeping(&k.name);
        if !weight || !k.stored.is_plain() {
            if k.stored.is_plain() && !matches!(k.op, Op::ScaleOf(_)) && a_dtype.is_float() {
                k.dtype = a_dtype;
            }
            out.push(k);
            continue;
        }
        let scale = Quant::scale_key(&k.name).unwrap_or_default();
        k.dtype = f8;
        k.stored = Stored::Scaled(scale.clone());
        let name = k.name.clone();
        out.push(k);
        if !existing.contains(&scale) {
            out.push(KeyPlan {
                name: scale,
                shape: vec![],
                dtype: DType::F32,
                op: Op::ScaleOf(name),
                block: None,
                name_b: None,
                name_c: None,
                stored: Stored::Plain,
            });
        }
    }
    let prefix = family
        .layout(layout)
        .and_then(|l| l.prefix.as_deref())
        .unwrap_or("");
    let marker = format!("{prefix}{}", crate::checkpoint::quant::MARKER);
    if !out.iter().any(|k| {
        Quant::is_bookkeeping(&k.name) && k.name.ends_with(crate::checkpoint::quant::MARKER)
    }) {
        out.push(KeyPlan {
            name: marker,
            shape: vec![0],
            dtype: f8,
            op: Op::Marker,
            block: None,
            name_b: None,
            name_c: None,
            stored: Stored::Plain,
        });
    }
    *keys = out;
    Ok(())
}
