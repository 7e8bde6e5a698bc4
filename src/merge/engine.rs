//! Executing a merge plan: parallel, chunked, streaming into the output file.
//!
//! Tensors are processed largest first; large tensors are split into chunks of
//! [`CHUNK`] elements, each decoded to f32, combined, rounded once and written straight to
//! its place in the output file. Memory in flight is a few chunks per worker, whatever the
//! model size; copied tensors go from the input map to the file without conversion when the
//! dtype is unchanged. Chunk boundaries and thread count do not change any result byte.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::quant;
use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::convert;
use crate::device;
use crate::dtype::{DType, Rounding};
use crate::error::{Error, Result};
use crate::merge::calc::{self, cosine, CalcMode, ChunkCtx, Kind, WholeParams};
use crate::merge::candle_ops;
use crate::merge::numerics::{self, Numerics, Prec, Precs};
use crate::merge::plan::Inputs;
use crate::merge::plan::Stored;
use crate::merge::select::{apply_adjust, AdjustOp};
use crate::merge::{KeyPlan, MergeSpec, Mode, Op, Plan, RunOptions, Source};

/// Elements per work unit (also the unit of seeded random streams: fixed, so results do
/// not depend on threads).
pub const CHUNK: usize = 1 << 18;

/// What a finished merge wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    /// Output file.
    pub path: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors blended (the rest were copied).
    pub blended: usize,
    /// File size in bytes.
    pub bytes: u64,
}

#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's chunk buffers, so a merge allocates (and the kernel zeroes)
/// them once per thread rather than once per chunk; a nested call gets fresh ones.
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// One input tensor of a blend.
pub struct Operand<'a> {
    /// Its stored bytes.
    pub data: Cow<'a, [u8]>,
    /// Its stored type.
    pub dtype: DType,
    /// Its shape.
    pub shape: &'a [usize],
    /// Scaled fp8: the value is the stored one times this.
    pub scale: Option<f32>,
}

impl Operand<'_> {
    /// Decodes elements `lo..hi` into `out` (dequantized).
    pub fn decode(&self, lo: usize, hi: usize, out: &mut Vec<f32>) -> Result<()> {
        convert::decode_range(self.dtype, &self.data, lo, hi, out)?;
        if let Some(s) = self.scale {
            out.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    /// Every element (dequantized).
    fn to_f32(&self) -> Result<Vec<f32>> {
        let mut v = convert::to_f32(self.dtype, &self.data)?;
        if let Some(s) = self.scale {
            v.iter_mut().for_each(|x| *x *= s);
        }
        Ok(v)
    }

    /// Whether candle can take it as is.
    fn plain_device_type(&self) -> bool {
        self.scale.is_none() && !matches!(self.dtype, DType::F8E4M3 | DType::F8E5M2)
    }
}

fn operand<'a>(plan: &Plan, inputs: &Inputs<'a>, s: Source, name: &str) -> Result<Operand<'a>> {
    let (ck, t) = source(inputs, s, name)?;
    Ok(Operand {
        data: ck.data(t),
        dtype: t.dtype,
        shape: &t.shape,
        scale: plan.scale(s, name),
    })
}

fn source<'a>(
    inputs: &Inputs<'a>,
    s: Source,
    name: &str,
) -> Result<(&'a Checkpoint, &'a TensorInfo)> {
    let ck = match s {
        Source::A => inputs.a,
        Source::B => inputs.b,
        Source::C => inputs
            .c
            .ok_or_else(|| Error::Invalid("model C missing".into()))?,
        Source::Vae => inputs
            .vae
            .ok_or_else(|| Error::Invalid("VAE missing".into()))?,
    };
    let t = match s {
        Source::Vae => name
            .strip_prefix("first_stage_model.")
            .and_then(|n| ck.get(n))
            .or_else(|| ck.get(name)),
        _ => ck.get(name),
    };
    let t = t.ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: name.to_string(),
    })?;
    Ok((ck, t))
}

/// What every tensor of a merge shares.
struct Ctx {
    mode: Mode,
    calc: CalcMode,
    gamma: f64,
    seed: u64,
    rounding: Rounding,
    cosine: Option<cosine::Range>,
    numerics: Numerics,
    /// A candle device for element-wise formulas (`None`: mergesmith's CPU kernels).
    device: Option<candle_core::Device>,
}

/// Writes the merged model described by `plan` to `out`.
pub fn execute(
    plan: &Plan,
    inputs: &Inputs,
    spec: &MergeSpec,
    out: &Path,
    metadata: &BTreeMap<String, String>,
    run: &RunOptions,
) -> Result<MergeReport> {
    let writer = SafetensorsWriter::create(out, specs(plan.keys.iter()), metadata, run.overwrite)?;
    write(plan, inputs, spec, &writer, run)?;
    let (path, bytes) = writer.finish()?;
    Ok(MergeReport {
        path,
        tensors: plan.keys.len(),
        blended: plan.blended(),
        bytes,
    })
}

/// The writer specs of some planned keys.
pub fn specs<'a>(keys: impl Iterator<Item = &'a KeyPlan>) -> Vec<TensorSpec> {
    keys.map(|k| TensorSpec {
        name: k.name.clone(),
        dtype: k.dtype,
        shape: k.shape.clone(),
    })
    .collect()
}

/// Computes every key of `plan` that `writer` expects (a writer may take a subset: the
/// rest are already stored elsewhere) and writes it. Global statistics (cosine calcmodes)
/// are still taken over the whole plan. The caller finishes the writer.
pub fn write(
    plan: &Plan,
    inputs: &Inputs,
    spec: &MergeSpec,
    writer: &SafetensorsWriter,
    run: &RunOptions,
) -> Result<()> {
    let cosine = match spec.calcmode {
        CalcMode::CosineA | CalcMode::CosineB => {
            cosine_range(plan, inputs, spec.calcmode == CalcMode::CosineA)?
        }
        _ => None,
    };
    let ctx = Ctx {
        mode: spec.mode,
        calc: spec.calcmode,
        gamma: spec.gamma,
        seed: spec.seed,
        rounding: spec.rounding,
        cosine,
        numerics: spec.numerics,
        device: run.device.candle()?,
    };
    let mut order: Vec<&KeyPlan> = plan
        .keys
        .iter()
        .filter(|k| match &k.stored {
            // A recomputed scale is written by its weight's job.
            Stored::Scaled(scale) => writer.expects(&k.name) || writer.expects(scale),
            _ => writer.expects(&k.name) && !matches!(k.op, Op::ScaleOf(_)),
        })
        .collect();
    let total: u64 = order
        .iter()
        .map(|k| k.dtype.byte_len(numel(k)).unwrap_or(0) as u64)
        .sum();
    let bar = crate::progress::tensors(total, order.len() as u64, "merge", run.progress);
    for ck in [Some(inputs.a), Some(inputs.b), inputs.c, inputs.vae]
        .into_iter()
        .flatten()
    {
        ck.advise_sequential();
    }
    // File order, a window of about WINDOW bytes at a time (the threads share a window, a
    // large tensor by chunks): the output is written front to back, so its writeback streams
    // like a copy's while the merge computes, and inputs laid out alike are read the same way.
    let at = |k: &KeyPlan| match &k.stored {
        Stored::Scaled(scale) if !writer.expects(&k.name) => writer.offset(scale),
        _ => writer.offset(&k.name),
    };
    order.sort_by_key(|k| (at(k).unwrap_or(usize::MAX), k.name.clone()));
    const WINDOW: u64 = 64 << 20;
    let mut windows: Vec<Vec<&KeyPlan>> = vec![Vec::new()];
    let mut filled = 0u64;
    for k in order {
        let len = k.dtype.byte_len(numel(k)).unwrap_or(0) as u64;
        if filled > 0 && filled + len > WINDOW {
            windows.push(Vec::new());
            filled = 0;
        }
        filled += len;
        windows.last_mut().expect("one window at least").push(k);
    }
    // Crash-safety tests set this to kill the process in the middle of writing an output.
    let abort_after: Option<usize> = std::env::var("MERGESMITH_TEST_ABORT_AFTER_TENSORS")
        .ok()
        .and_then(|v| v.parse().ok());
    let done = std::sync::atomic::AtomicUsize::new(0);
    for window in &windows {
        window.par_iter().try_for_each(|k| {
            crate::progress::check_cancel()?;
            let written = key(k, plan, inputs, &ctx, writer)?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if abort_after.is_some_and(|limit| n >= limit) {
                std::process::abort();
            }
            release(inputs, k);
            bar.tensor_done(written as u64);
            Ok::<_, Error>(())
        })?;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Drops a finished tensor's input pages from the resident set.
fn release(inputs: &Inputs, k: &KeyPlan) {
    let fixed = [
        (Some(inputs.a), Source::A),
        (Some(inputs.b), Source::B),
        (inputs.c, Source::C),
    ];
    for (ck, s) in fixed {
        if let Some((ck, t)) = ck.and_then(|ck| ck.get(k.name_in(s)).map(|t| (ck, t))) {
            ck.release(t);
        }
    }
}

/// cosineA/B pre-pass: the similarity range over every key of A that contains `model`, is
/// present in B with the same shape, and is not part of the VAE (integer tensors included).
/// Streams key by key; only the samples (one per column) are kept.
fn cosine_range(plan: &Plan, inputs: &Inputs, cosine_a: bool) -> Result<Option<cosine::Range>> {
    let per_key: Vec<Vec<f64>> = plan
        .keys
        .par_iter()
        .map(|k| {
            let (Some(ta), Some(tb)) = (inputs.a.get(&k.name), inputs.b.get(k.name_in(Source::B)))
            else {
                return Ok(Vec::new());
            };
            // As SuperMerger's pre-pass: every key with `model` in its name that B has,
            // integer ones too (CLIP's `position_ids`), taken as f32.
            let eligible = k.name.contains("model")
                && !k.name.contains("first_stage_model")
                && ta.shape == tb.shape
                && ta.dtype.bits() > 0
                && tb.dtype.bits() > 0;
            if !eligible {
                return Ok(Vec::new());
            }
            let a = convert::any_to_f32(ta.dtype, &inputs.a.data(ta))?;
            let b = convert::any_to_f32(tb.dtype, &inputs.b.data(tb))?;
            release(inputs, k);
            Ok(cosine::samples(cosine_a, &ta.shape, &a, &b))
        })
        .collect::<Result<_>>()?;
    Ok(cosine::range(per_key.concat()))
}

fn numel(k: &KeyPlan) -> usize {
    k.shape.iter().product()
}

/// Adjust on a piece of a tensor starting at element `lo`.
fn adjust_part(adjust: &Option<AdjustOp>, lo: usize, values: &mut [f32]) {
    match adjust {
        // A per-channel add touches the first 4 elements: only the first chunk.
        Some(op @ AdjustOp::Add(_)) if lo == 0 => apply_adjust(*op, values),
        Some(op @ AdjustOp::Scale(_)) => apply_adjust(*op, values),
        _ => {}
    }
}

/// Produces one output tensor; returns the bytes written.
fn key(
    k: &KeyPlan,
    plan: &Plan,
    inputs: &Inputs,
    ctx: &Ctx,
    w: &SafetensorsWriter,
) -> Result<usize> {
    let n = numel(k);
    let out_len = k.dtype.byte_len(n).unwrap_or(0);
    if let Stored::Scaled(scale_key) = &k.stored {
        // Scaled fp8: the whole tensor in f32, then a fresh per-tensor scale.
        let values = values_of(k, plan, inputs, ctx)?;
        let scale = quant::scale_for(&values, k.dtype);
        let stored: Vec<f32> = values.iter().map(|v| v / scale).collect();
        if w.expects(&k.name) {
            let mut bytes = vec![0u8; out_len];
            encode(ctx, k, 0, &stored, &mut bytes)?;
            w.write(&k.name, &bytes)?;
        }
        if w.expects(scale_key) {
            let spec = plan.keys.iter().find(|s| s.name == *scale_key);
            let count: usize = spec.map_or(1, |s| s.shape.iter().product());
            let bytes: Vec<u8> = (0..count.max(1))
                .flat_map(|_| scale.to_le_bytes())
                .collect();
            w.write(scale_key, &bytes)?;
        }
        return Ok(out_len);
    }
    match &k.op {
        Op::ScaleOf(_) => {
            return Err(Error::Invalid(format!(
                "`{}` is written with its weight",
                k.name
            )))
        }
        Op::Marker => w.write(&k.name, &[])?,
        Op::PositionIds => {
            let last = (*k.shape.last().unwrap_or(&1)).max(1);
            let bytes: Vec<u8> = (0..n)
                .flat_map(|i| ((i % last) as i64).to_le_bytes())
                .collect();
            w.write(&k.name, &bytes)?;
        }
        Op::Copy(s) => {
            let o = operand(plan, inputs, *s, k.name_in(*s))?;
            if o.dtype == k.dtype && (o.scale.is_none() || k.stored == Stored::AsSource) {
                w.write(&k.name, &o.data)?;
            } else {
                chunks(n).into_par_iter().try_for_each(|(lo, hi)| {
                    with_scratch(|s| {
                        o.decode(lo, hi, &mut s.a)?;
                        let es = k.dtype.bits() / 8;
                        let mut out = w.part_buffer(s.a.len() * es);
                        encode(ctx, k, lo, &s.a, &mut out)?;
                        w.write_part_owned(&k.name, lo * es, out)
                    })
                })?;
            }
        }
        Op::Blend {
            channels, adjust, ..
        } => {
            let ops = Operands::of(k, plan, inputs)?;
            let on_device = ctx.device.as_ref().filter(|_| {
                channels.is_none()
                    && adjust.is_none()
                    && ops.all().all(Operand::plain_device_type)
                    && !matches!(k.dtype, DType::F8E4M3 | DType::F8E5M2)
                    && ctx.calc.kind() == Kind::Elementwise
                    && ctx.calc != CalcMode::PlusRandom
                    && ctx.numerics == Numerics::F32
            });
            if let Some(dev) = on_device {
                let (alpha, beta) = k.op.ratios();
                let up = |o: &Operand| device::upload_f32(&o.data, o.dtype, dev);
                let (ta, tb) = (up(&ops.a)?, up(&ops.b)?);
                let tc = ops.c.as_ref().map(up).transpose()?;
                let r = candle_ops::blend(
                    ctx.calc,
                    ctx.mode,
                    alpha as f32,
                    beta as f32,
                    &ta,
                    &tb,
                    tc.as_ref(),
                )
                .map_err(device::candle_err)?;
                w.write(&k.name, &device::download(&r, k.dtype)?)?;
                return Ok(out_len);
            }
            blend(k, &ops, ctx, Sink::Writer(w))?;
        }
    }
    Ok(out_len)
}

/// The inputs of a blended key.
struct Operands<'a> {
    a: Operand<'a>,
    b: Operand<'a>,
    c: Option<Operand<'a>>,
}

impl<'a> Operands<'a> {
    fn of(k: &KeyPlan, plan: &Plan, inputs: &Inputs<'a>) -> Result<Operands<'a>> {
        Ok(Operands {
            a: operand(plan, inputs, Source::A, &k.name)?,
            b: operand(plan, inputs, Source::B, k.name_in(Source::B))?,
            c: inputs
                .c
                .map(|_| operand(plan, inputs, Source::C, k.name_in(Source::C)))
                .transpose()?,
        })
    }

    fn all(&self) -> impl Iterator<Item = &Operand<'a>> {
        [Some(&self.a), Some(&self.b), self.c.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// Where a blend's results go.
#[derive(Clone, Copy)]
enum Sink<'e> {
    /// Encoded in the key's type as the merge rounds, into the output file.
    Writer(&'e SafetensorsWriter),
    /// As f32 values, into the whole tensor's buffer.
    Values(&'e std::sync::Mutex<Vec<f32>>),
}

/// Copies the values of elements `lo..` into a [`Sink::Values`] buffer.
fn store(out: &std::sync::Mutex<Vec<f32>>, lo: usize, values: &[f32]) -> Result<()> {
    let mut o = out
        .lock()
        .map_err(|_| Error::Invalid("merge worker panicked".into()))?;
    o[lo..lo + values.len()].copy_from_slice(values);
    Ok(())
}

/// Elements a chunk's inputs are decoded and blended by at a time, so the f32 buffers of up
/// to three inputs stay in the core's cache between the decode and the blend.
const STRIP: usize = 8192;

/// Blends one key on the CPU, handing the results to `sink` piece by piece (element-wise
/// calcmodes, in chunks) or whole (whole-tensor calcmodes, channel subsets).
fn blend(k: &KeyPlan, ops: &Operands, ctx: &Ctx, sink: Sink) -> Result<()> {
    let Op::Blend {
        alpha,
        beta,
        channels,
        adjust,
    } = &k.op
    else {
        return Err(Error::Invalid(format!("`{}` is not blended", k.name)));
    };
    let (a, b, c) = (&ops.a, &ops.b, &ops.c);
    let n = numel(k);
    let (alpha32, beta32) = (*alpha as f32, *beta as f32);
    let chunk_ctx = |chunk: u64| ChunkCtx {
        key: &k.name,
        chunk,
        seed: ctx.seed,
    };
    let sm = (ctx.numerics == Numerics::Supermerger).then(|| SmKey {
        precs: Precs {
            a: Prec::of(a.dtype),
            b: Prec::of(b.dtype),
            c: c.as_ref().map_or(Prec::F32, |c| Prec::of(c.dtype)),
        },
        merged: Prec::of(numerics::merged_dtype(ctx.mode, ctx.calc, a.dtype, b.dtype)),
    });
    let per_element = |a: &mut [f32], b: &[f32], c: &[f32], cc: &ChunkCtx| match &sm {
        Some(sm) if matches!(ctx.calc, CalcMode::Normal | CalcMode::TrainDifference) => {
            numerics::elementwise(ctx.calc, ctx.mode, *alpha, *beta, sm.precs, a, b, c)
        }
        _ => calc::elementwise(ctx.calc, ctx.mode, alpha32, beta32, a, b, c, cc),
    };
    // The merged values, Adjust and (SuperMerger's numerics) the roundings around it.
    let finish = |lo: usize, values: &mut [f32]| match &sm {
        Some(sm) => sm.finish(adjust, lo, values),
        None => adjust_part(adjust, lo, values),
    };
    match (channels, ctx.calc.kind()) {
        (None, Kind::Elementwise) => {
            chunks(n).into_par_iter().try_for_each(|(lo, hi)| {
                with_scratch(|s| {
                    let es = k.dtype.bits() / 8;
                    let mut out = match sink {
                        Sink::Writer(w) => w.part_buffer((hi - lo) * es),
                        Sink::Values(_) => Vec::new(),
                    };
                    let cc = chunk_ctx((lo / CHUNK) as u64);
                    // A chunk's noise is drawn for the whole chunk at once.
                    let strip = match ctx.calc {
                        CalcMode::PlusRandom => hi - lo,
                        _ => STRIP,
                    };
                    for at in (lo..hi).step_by(strip) {
                        let end = (at + strip).min(hi);
                        a.decode(at, end, &mut s.a)?;
                        b.decode(at, end, &mut s.b)?;
                        if let Some(c) = c {
                            c.decode(at, end, &mut s.c)?;
                        }
                        per_element(&mut s.a, &s.b, &s.c, &cc);
                        finish(at, &mut s.a);
                        match sink {
                            Sink::Writer(_) => {
                                let bytes = &mut out[(at - lo) * es..(end - lo) * es];
                                encode(ctx, k, at, &s.a, bytes)?
                            }
                            Sink::Values(values) => store(values, at, &s.a)?,
                        }
                    }
                    match sink {
                        Sink::Writer(w) => w.write_part_owned(&k.name, lo * es, out),
                        Sink::Values(_) => Ok(()),
                    }
                })
            })
        }
        (channels, kind) => {
            // Whole-tensor calcmodes, and keys where A has more input channels than B
            // (and C): decode each input once.
            let mut va = a.to_f32()?;
            let vb = b.to_f32()?;
            let vc = c.as_ref().map(Operand::to_f32).transpose()?;
            // SuperMerger's smoothAdd MT adds the filtered difference after the loop that
            // applies Adjust, so Adjust acts on A (in A's type) before the add.
            let adjust_first = sm.is_some() && ctx.calc == CalcMode::SmoothAddMt;
            if let (true, Some(sm)) = (adjust_first, &sm) {
                SmKey {
                    merged: sm.precs.a,
                    ..*sm
                }
                .finish(adjust, 0, &mut va);
            }
            let mut out = match channels {
                None => {
                    debug_assert_eq!(kind, Kind::Whole);
                    let params = WholeParams {
                        alpha: *alpha,
                        beta: *beta,
                        gamma: ctx.gamma,
                        cosine: ctx.cosine,
                        supermerger: sm.map(|sm| sm.precs.b),
                    };
                    let vc = vc.as_deref().unwrap_or(&[]);
                    calc::whole(ctx.calc, &params, a.shape, va, &vb, vc)
                }
                Some(ch) => {
                    // Merge the first `ch` channels of dim 1 (element-wise calcmodes only;
                    // the plan refuses the others).
                    let inner: usize = a.shape[2..].iter().product();
                    let seg = ch * inner;
                    for i in 0..a.shape[0] {
                        let at = |shape: &[usize]| i * shape[1] * inner;
                        let (a_at, b_at) = (at(a.shape), at(b.shape));
                        let c_seg = match (&vc, c) {
                            (Some(vc), Some(c)) => &vc[at(c.shape)..at(c.shape) + seg],
                            _ => &[][..],
                        };
                        per_element(
                            &mut va[a_at..a_at + seg],
                            &vb[b_at..b_at + seg],
                            c_seg,
                            &chunk_ctx(i as u64),
                        );
                    }
                    va
                }
            };
            if adjust_first {
                if let Some(sm) = &sm {
                    sm.finish(&None, 0, &mut out);
                }
            } else {
                finish(0, &mut out);
            }
            match sink {
                Sink::Writer(w) => {
                    let mut bytes = vec![0u8; out.len() * (k.dtype.bits() / 8)];
                    encode(ctx, k, 0, &out, &mut bytes)?;
                    w.write(&k.name, &bytes)
                }
                Sink::Values(o) => store(o, 0, &out),
            }
        }
    }
}

/// SuperMerger's numerics for one key: its inputs' precisions and the type its merged
/// tensor has before Adjust.
#[derive(Clone, Copy)]
struct SmKey {
    precs: Precs,
    merged: Prec,
}

impl SmKey {
    /// Rounds the merged values to the merged tensor's type, then applies Adjust as torch
    /// does on it: a scale in that type, the `out.2.bias` add promoted to f32.
    fn finish(&self, adjust: &Option<AdjustOp>, lo: usize, values: &mut [f32]) {
        values.iter_mut().for_each(|x| *x = self.merged.round(*x));
        match adjust {
            Some(AdjustOp::Scale(s)) => values
                .iter_mut()
                .for_each(|x| *x = self.merged.round(*x * s)),
            Some(op @ AdjustOp::Add(_)) if lo == 0 => apply_adjust(*op, values),
            _ => {}
        }
    }
}

/// The f32 values of an output tensor (copied or blended), dequantized.
fn values_of(k: &KeyPlan, plan: &Plan, inputs: &Inputs, ctx: &Ctx) -> Result<Vec<f32>> {
    match &k.op {
        Op::Copy(s) => operand(plan, inputs, *s, k.name_in(*s))?.to_f32(),
        Op::Blend { .. } => {
            let ops = Operands::of(k, plan, inputs)?;
            let out = std::sync::Mutex::new(vec![0f32; numel(k)]);
            blend(k, &ops, ctx, Sink::Values(&out))?;
            out.into_inner()
                .map_err(|_| Error::Invalid("merge worker panicked".into()))
        }
        _ => Err(Error::Invalid(format!(
            "`{}` cannot be stored as scaled fp8",
            k.name
        ))),
    }
}

fn chunks(n: usize) -> Vec<(usize, usize)> {
    (0..n.div_ceil(CHUNK))
        .map(|i| (i * CHUNK, ((i + 1) * CHUNK).min(n)))
        .collect()
}

/// Encodes elements `first..` of key `k` in its output dtype, rounded as the merge asks.
fn encode(ctx: &Ctx, k: &KeyPlan, first: usize, vals: &[f32], out: &mut [u8]) -> Result<()> {
    match ctx.rounding {
        Rounding::Nearest => convert::encode_into(vals, k.dtype, out),
        Rounding::Stochastic => convert::encode_stochastic_into(
            vals,
            k.dtype,
            out,
            ctx.seed,
            convert::stream_of(&k.name),
            first as u64,
        ),
    }
}
