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

use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::convert;
use crate::device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::merge::calc::{self, cosine, CalcMode, ChunkCtx, Kind, WholeParams};
use crate::merge::candle_ops;
use crate::merge::plan::Inputs;
use crate::merge::select::{apply_adjust, AdjustOp};
use crate::merge::{KeyPlan, MergeSpec, Mode, Op, Plan, RunOptions, Source};

/// Elements per work unit.
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
    out: Vec<u8>,
}

/// One input tensor of a blend.
struct Operand<'a> {
    data: Cow<'a, [u8]>,
    dtype: DType,
    shape: &'a [usize],
}

fn operand<'a>(inputs: &Inputs<'a>, s: Source, name: &str) -> Result<Operand<'a>> {
    let (ck, t) = source(inputs, s, name)?;
    Ok(Operand {
        data: ck.data(t),
        dtype: t.dtype,
        shape: &t.shape,
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

/// Decodes elements `lo..hi` of a float tensor's bytes into `out`.
fn decode(dtype: DType, data: &[u8], lo: usize, hi: usize, out: &mut Vec<f32>) -> Result<()> {
    let es = dtype.bits() / 8;
    out.resize(hi - lo, 0.0);
    convert::decode_into(dtype, &data[lo * es..hi * es], out)
}

/// What every tensor of a merge shares.
struct Ctx {
    mode: Mode,
    calc: CalcMode,
    gamma: f64,
    seed: u64,
    cosine: Option<cosine::Range>,
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
        cosine,
        device: run.device.candle()?,
    };
    let mut order: Vec<&KeyPlan> = plan
        .keys
        .iter()
        .filter(|k| writer.expects(&k.name))
        .collect();
    let total: u64 = order
        .iter()
        .map(|k| k.dtype.byte_len(numel(k)).unwrap_or(0) as u64)
        .sum();
    let bar = crate::progress::bytes(total, "merge", run.progress);
    for ck in [Some(inputs.a), Some(inputs.b), inputs.c, inputs.vae]
        .into_iter()
        .flatten()
    {
        ck.advise_sequential();
    }
    order.sort_by_key(|k| std::cmp::Reverse(numel(k)));
    // Crash-safety tests set this to kill the process in the middle of writing an output.
    let abort_after: Option<usize> = std::env::var("MERGESMITH_TEST_ABORT_AFTER_TENSORS")
        .ok()
        .and_then(|v| v.parse().ok());
    let done = std::sync::atomic::AtomicUsize::new(0);
    order.par_iter().try_for_each(|k| {
        let written = key(k, inputs, &ctx, writer)?;
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if abort_after.is_some_and(|limit| n >= limit) {
            std::process::abort();
        }
        release(inputs, k);
        bar.inc(written as u64);
        Ok::<_, Error>(())
    })?;
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
/// present in B with the same shape, and is not part of the VAE. Streams key by key; only
/// the samples (one per column) are kept.
fn cosine_range(plan: &Plan, inputs: &Inputs, cosine_a: bool) -> Result<Option<cosine::Range>> {
    let per_key: Vec<Vec<f64>> = plan
        .keys
        .par_iter()
        .map(|k| {
            let (Some(ta), Some(tb)) = (inputs.a.get(&k.name), inputs.b.get(k.name_in(Source::B)))
            else {
                return Ok(Vec::new());
            };
            let eligible = k.name.contains("model")
                && !k.name.contains("first_stage_model")
                && ta.shape == tb.shape
                && ta.dtype.is_float()
                && tb.dtype.is_float();
            if !eligible {
                return Ok(Vec::new());
            }
            let a = convert::to_f32(ta.dtype, &inputs.a.data(ta))?;
            let b = convert::to_f32(tb.dtype, &inputs.b.data(tb))?;
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
fn key(k: &KeyPlan, inputs: &Inputs, ctx: &Ctx, w: &SafetensorsWriter) -> Result<usize> {
    let n = numel(k);
    let out_len = k.dtype.byte_len(n).unwrap_or(0);
    match &k.op {
        Op::PositionIds => {
            let last = (*k.shape.last().unwrap_or(&1)).max(1);
            let bytes: Vec<u8> = (0..n)
                .flat_map(|i| ((i % last) as i64).to_le_bytes())
                .collect();
            w.write(&k.name, &bytes)?;
        }
        Op::Copy(s) => {
            let (ck, t) = source(inputs, *s, k.name_in(*s))?;
            let data = ck.data(t);
            if t.dtype == k.dtype {
                w.write(&k.name, &data)?;
            } else {
                chunks(n)
                    .into_par_iter()
                    .try_for_each_init(Scratch::default, |s, (lo, hi)| {
                        decode(t.dtype, &data, lo, hi, &mut s.a)?;
                        encode_part(w, k, lo, &s.a, &mut s.out)
                    })?;
            }
        }
        Op::Blend {
            alpha,
            beta,
            channels,
            adjust,
        } => {
            let a = operand(inputs, Source::A, &k.name)?;
            let b = operand(inputs, Source::B, k.name_in(Source::B))?;
            let c = inputs
                .c
                .map(|_| operand(inputs, Source::C, k.name_in(Source::C)))
                .transpose()?;
            let (alpha32, beta32) = (*alpha as f32, *beta as f32);
            let chunk_ctx = |chunk: u64| ChunkCtx {
                key: &k.name,
                chunk,
                seed: ctx.seed,
            };
            let on_device = ctx.device.as_ref().filter(|_| {
                channels.is_none()
                    && adjust.is_none()
                    && ctx.calc.kind() == Kind::Elementwise
                    && ctx.calc != CalcMode::PlusRandom
            });
            if let Some(dev) = on_device {
                let up = |o: &Operand| device::upload_f32(&o.data, o.dtype, dev);
                let (ta, tb) = (up(&a)?, up(&b)?);
                let tc = c.as_ref().map(up).transpose()?;
                let r =
                    candle_ops::blend(ctx.calc, ctx.mode, alpha32, beta32, &ta, &tb, tc.as_ref())
                        .map_err(device::candle_err)?;
                w.write(&k.name, &device::download(&r, k.dtype)?)?;
                return Ok(out_len);
            }
            match (channels, ctx.calc.kind()) {
                (None, Kind::Elementwise) => chunks(n).into_par_iter().try_for_each_init(
                    Scratch::default,
                    |s, (lo, hi)| {
                        decode(a.dtype, &a.data, lo, hi, &mut s.a)?;
                        decode(b.dtype, &b.data, lo, hi, &mut s.b)?;
                        if let Some(c) = &c {
                            decode(c.dtype, &c.data, lo, hi, &mut s.c)?;
                        }
                        let cc = chunk_ctx((lo / CHUNK) as u64);
                        calc::elementwise(
                            ctx.calc, ctx.mode, alpha32, beta32, &mut s.a, &s.b, &s.c, &cc,
                        );
                        adjust_part(adjust, lo, &mut s.a);
                        encode_part(w, k, lo, &s.a, &mut s.out)
                    },
                )?,
                (channels, kind) => {
                    // Whole-tensor calcmodes, and keys where A has more input channels than B
                    // (and C): decode each input once.
                    let mut va = convert::to_f32(a.dtype, &a.data)?;
                    let vb = convert::to_f32(b.dtype, &b.data)?;
                    let vc = c
                        .as_ref()
                        .map(|c| convert::to_f32(c.dtype, &c.data))
                        .transpose()?;
                    let mut out = match channels {
                        None => {
                            debug_assert_eq!(kind, Kind::Whole);
                            let params = WholeParams {
                                alpha: *alpha,
                                beta: *beta,
                                gamma: ctx.gamma,
                                cosine: ctx.cosine,
                            };
                            let vc = vc.as_deref().unwrap_or(&[]);
                            calc::whole(ctx.calc, &params, a.shape, va, &vb, vc)
                        }
                        Some(ch) => {
                            // Merge the first `ch` channels of dim 1 (element-wise calcmodes
                            // only; the plan refuses the others).
                            let inner: usize = a.shape[2..].iter().product();
                            let seg = ch * inner;
                            for i in 0..a.shape[0] {
                                let at = |shape: &[usize]| i * shape[1] * inner;
                                let (a_at, b_at) = (at(a.shape), at(b.shape));
                                let c_seg = match (&vc, &c) {
                                    (Some(vc), Some(c)) => &vc[at(c.shape)..at(c.shape) + seg],
                                    _ => &[][..],
                                };
                                calc::elementwise(
                                    ctx.calc,
                                    ctx.mode,
                                    alpha32,
                                    beta32,
                                    &mut va[a_at..a_at + seg],
                                    &vb[b_at..b_at + seg],
                                    c_seg,
                                    &chunk_ctx(i as u64),
                                );
                            }
                            va
                        }
                    };
                    adjust_part(adjust, 0, &mut out);
                    w.write(&k.name, &convert::from_f32(&out, k.dtype)?)?;
                }
            }
        }
    }
    Ok(out_len)
}

fn chunks(n: usize) -> Vec<(usize, usize)> {
    (0..n.div_ceil(CHUNK))
        .map(|i| (i * CHUNK, ((i + 1) * CHUNK).min(n)))
        .collect()
}

fn encode_part(
    w: &SafetensorsWriter,
    k: &KeyPlan,
    lo: usize,
    vals: &[f32],
    out: &mut Vec<u8>,
) -> Result<()> {
    let es = k.dtype.bits() / 8;
    out.resize(vals.len() * es, 0);
    convert::encode_into(vals, k.dtype, out)?;
    w.write_part(&k.name, lo * es, out)
}
