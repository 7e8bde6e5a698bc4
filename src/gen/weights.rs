//! candle weights read straight from a checkpoint: a `VarBuilder` backend that serves one
//! model part by diffusers name through a [`WeightMap`], so a merged model in the cache (or in
//! memory) is never converted or written out to generate from it.
//!
//! Each tensor is uploaded from the checkpoint's bytes in its stored dtype (fp8 widened to f32
//! first; straight to f32, in parallel, for f32 models on the CPU), then sliced (q / k
//! / v rows of a fused projection), transposed (OpenCLIP's text projection), reshaped to what
//! the model asks for when only trailing 1x1 dimensions differ (the VAE's attention), and
//! converted to the model's dtype on its device.

use std::sync::Arc;

use candle_core::{DType as CDType, Device, Shape, Tensor};

use crate::arch::names::{Part, WeightMap};
use crate::checkpoint::Checkpoint;
use crate::device::candle_dtype;

/// Where a model's weight names lead in the checkpoint.
enum Names {
    /// One part by diffusers name, through the map (SD's LDM and OpenCLIP keys).
    Mapped(Arc<WeightMap>, Part),
    /// The keys under a prefix, named as stored (Flux, MMDiT, T5 and HF CLIP keys, which
    /// candle's models use as they are).
    Prefix(String),
}

/// One model part of a checkpoint, as candle weights.
pub struct CheckpointWeights {
    ck: Arc<Checkpoint>,
    names: Names,
}

impl CheckpointWeights {
    /// The weights of `part` in `ck` (`map` is `WeightMap::of(ck)`).
    pub fn new(ck: Arc<Checkpoint>, map: Arc<WeightMap>, part: Part) -> Self {
        CheckpointWeights {
            ck,
            names: Names::Mapped(map, part),
        }
    }

    /// The weights stored under `prefix` in `ck`, by their names after it.
    pub fn prefixed(ck: Arc<Checkpoint>, prefix: &str) -> Self {
        CheckpointWeights {
            ck,
            names: Names::Prefix(prefix.to_string()),
        }
    }

    /// What the weights are, for messages.
    fn what(&self) -> String {
        match &self.names {
            Names::Mapped(_, part) => format!("{part:?}"),
            Names::Prefix(p) => format!("`{p}`"),
        }
    }

    /// Where `name` is stored: its key, rows and transposition.
    fn source(&self, name: &str) -> Option<crate::arch::names::Source> {
        match &self.names {
            Names::Mapped(map, part) => map.get(*part, name).cloned(),
            Names::Prefix(p) => {
                let key = format!("{p}{name}");
                self.ck.get(&key)?;
                Some(crate::arch::names::Source {
                    key,
                    rows: None,
                    transpose: false,
                })
            }
        }
    }

    /// A `VarBuilder` over these weights, producing tensors of `dtype` on `dev`.
    pub fn var_builder(self, dtype: CDType, dev: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    /// The tensor named `name`, as stored (sliced and transposed as mapped); in f32 already
    /// when `dtype` is f32 and `dev` the CPU (decoded once, in parallel: not copied into a
    /// candle tensor and converted on one thread).
    fn load(&self, name: &str, dtype: CDType, dev: &Device) -> candle_core::Result<Tensor> {
        let missing = || {
            candle_core::Error::Msg(format!(
                "{}: no tensor for the {} weight `{name}`",
                self.ck.path().display(),
                self.what()
            ))
        };
        let src = self.source(name).ok_or_else(missing)?;
        let info = self.ck.get(&src.key).ok_or_else(missing)?;
        let bytes = self.ck.data(info);
        let f32_on_cpu = dev.is_cpu() && dtype == CDType::F32 && info.dtype.is_float();
        let mut t = match candle_dtype(info.dtype) {
            Ok(stored) if !f32_on_cpu => Tensor::from_raw_buffer(&bytes, stored, &info.shape, dev)?,
            // f32 wanted on the CPU, or fp8 storage (Flux and T5 files often ship so), which
            // candle lacks: decoded to f32 on the CPU, on every core.
            _ => {
                let values = crate::convert::to_f32_par(info.dtype, &bytes)
                    .map_err(|e| candle_core::Error::Msg(format!("`{}`: {e}", src.key)))?;
                Tensor::from_vec(values, info.shape.as_slice(), dev)?
            }
        };
        drop(bytes);
        self.ck.release(info);
        if let Some((a, b)) = src.rows {
            t = t.narrow(0, a, b - a)?;
        }
        if src.transpose {
            t = t.t()?;
        }
        Ok(t)
    }
}

/// How many `{head}N.{tail}` tensors `ck` has.
pub fn count_indexed(ck: &Checkpoint, head: &str, tail: &str) -> usize {
    ck.tensors()
        .iter()
        .filter(|t| {
            t.name
                .strip_prefix(head)
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(n, rest)| n.parse::<usize>().is_ok() && rest == tail)
        })
        .count()
}

/// Whether two shapes differ only by trailing 1s.
fn same_but_trailing_ones(a: &[usize], b: &[usize]) -> bool {
    let trim = |s: &[usize]| -> Vec<usize> {
        let mut v = s.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    trim(a) == trim(b)
}

impl candle_nn::var_builder::SimpleBackend for CheckpointWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: CDType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        let t = if t.dims() == s.dims() {
            t
        } else if same_but_trailing_ones(t.dims(), s.dims()) {
            t.reshape(s.clone())?
        } else {
            return Err(candle_core::Error::Msg(format!(
                "{}: the {} weight `{name}` is {:?}, the model expects {:?}",
                self.ck.path().display(),
                self.what(),
                t.dims(),
                s.dims()
            )));
        };
        t.contiguous()?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: CDType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)?.contiguous()?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source(name).is_some()
    }
}
