//! candle weights read straight from a checkpoint: a `VarBuilder` backend that serves one
//! model part by diffusers name through a [`WeightMap`], so a merged model in the cache (or in
//! memory) is never converted or written out to generate from it.
//!
//! Each tensor is uploaded from the checkpoint's bytes in its stored dtype, then sliced (q / k
//! / v rows of a fused projection), transposed (OpenCLIP's text projection), reshaped to what
//! the model asks for when only trailing 1x1 dimensions differ (the VAE's attention), and
//! converted to the model's dtype on its device.

use std::sync::Arc;

use candle_core::{DType as CDType, Device, Shape, Tensor};

use crate::arch::names::{Part, WeightMap};
use crate::checkpoint::Checkpoint;
use crate::device::candle_dtype;

/// One model part of a checkpoint, as candle weights.
pub struct CheckpointWeights {
    ck: Arc<Checkpoint>,
    map: Arc<WeightMap>,
    part: Part,
}

impl CheckpointWeights {
    /// The weights of `part` in `ck` (`map` is `WeightMap::of(ck)`).
    pub fn new(ck: Arc<Checkpoint>, map: Arc<WeightMap>, part: Part) -> Self {
        CheckpointWeights { ck, map, part }
    }

    /// A `VarBuilder` over these weights, producing tensors of `dtype` on `dev`.
    pub fn var_builder(self, dtype: CDType, dev: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    /// The tensor named `name`, as stored (sliced and transposed as mapped).
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let missing = || {
            candle_core::Error::Msg(format!(
                "{}: no tensor for the {:?} weight `{name}`",
                self.ck.path().display(),
                self.part
            ))
        };
        let src = self.map.get(self.part, name).ok_or_else(missing)?;
        let info = self.ck.get(&src.key).ok_or_else(missing)?;
        let dtype = candle_dtype(info.dtype)
            .map_err(|e| candle_core::Error::Msg(format!("`{}`: {e}", src.key)))?;
        let mut t = Tensor::from_raw_buffer(&self.ck.data(info), dtype, &info.shape, dev)?;
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
        let t = self.load(name, dev)?;
        let t = if t.dims() == s.dims() {
            t
        } else if same_but_trailing_ones(t.dims(), s.dims()) {
            t.reshape(s.clone())?
        } else {
            return Err(candle_core::Error::Msg(format!(
                "{}: the {:?} weight `{name}` is {:?}, the model expects {:?}",
                self.ck.path().display(),
                self.part,
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
        self.load(name, dev)?.contiguous()?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.get(self.part, name).is_some()
    }
}
