//! GroupNorm, optionally followed by SiLU, in one pass over the output on the CPU.
//!
//! candle's `GroupNorm` is eight tensor operations (sum, subtract, square, sum, divide, scale,
//! shift, and the SiLU after it), each writing a new tensor: at the VAE's 512×512 levels that
//! is 128 MiB per operation, on freshly faulted pages. [`Norm`] reads each group twice (mean,
//! then the centred sum of squares, both accumulated in f64) and writes the output once.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{GroupNorm, VarBuilder};
use rayon::prelude::*;

use crate::gen::cpu::{f32_slice, vectorized};

/// GroupNorm over `groups` groups of channels with epsilon `eps`, and SiLU after it when
/// `silu` (diffusers' `GroupNorm` then `SiLU`).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Tensor,
    op: NormOp,
    /// candle's GroupNorm, for tensors other than f32 on the CPU.
    fallback: GroupNorm,
}

/// The kernel's parameters.
#[derive(Debug, Clone, Copy)]
struct NormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl Norm {
    /// Loads the affine `weight` and `bias` of a GroupNorm over `channels`.
    pub fn new(
        vb: VarBuilder,
        groups: usize,
        channels: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Norm> {
        let (weight, bias) = (vb.get(channels, "weight")?, vb.get(channels, "bias")?);
        let fallback = GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Norm {
            weight,
            bias,
            op: NormOp { groups, eps, silu },
            fallback,
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &self.op);
        }
        let y = self.fallback.forward(x)?;
        match self.op.silu {
            true => candle_nn::ops::silu(&y),
            false => Ok(y),
        }
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "mergesmith-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims();
        let c = match dims {
            [_, c, _, ..] => *c,
            _ => candle_core::bail!("group norm: input {:?} is not [batch, channels, ..]", dims),
        };
        let g = self.groups;
        if g == 0 || c % g != 0 || wl.shape().dims1()? != c || bl.shape().dims1()? != c {
            candle_core::bail!("group norm: {c} channels in {g} groups do not fit the weights");
        }
        let (x, w, bias) = (
            f32_slice(xs, xl, "group norm", "input")?,
            f32_slice(ws, wl, "group norm", "weight")?,
            f32_slice(bs, bl, "group norm", "bias")?,
        );
        let plane = dims[2..].iter().product::<usize>();
        let per = c / g;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per * plane)
            .zip(x.par_chunks(per * plane))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let group = i % g;
                let mut moments = [0f64; 2];
                mean_var(x, &mut moments);
                let [mean, var] = moments;
                let rstd = 1.0 / (var + self.eps).sqrt();
                for (j, (o, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                    let ch = group * per + j;
                    let a = (w[ch] as f64 * rstd) as f32;
                    let s = (bias[ch] as f64 - mean * w[ch] as f64 * rstd) as f32;
                    affine(o, x, a, s, self.silu);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

vectorized! {
    /// `moments = [mean, variance]` of `x` (the centred sum of squares), in f64 over 8 lanes
    /// (element `i` in lane `i % 8`, lanes summed in order), so it vectorises and does not
    /// depend on the CPU.
    fn mean_var(x: &[f32], moments: &mut [f64; 2]) {
        const LANES: usize = 8;
        let (whole, tail) = x.split_at(x.len() / LANES * LANES);
        let n = x.len() as f64;
        let mut acc = [0f64; LANES];
        for chunk in whole.chunks_exact(LANES) {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v as f64;
            }
        }
        let mean = (acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()) / n;
        let mut acc = [0f64; LANES];
        for chunk in whole.chunks_exact(LANES) {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += (v as f64 - mean) * (v as f64 - mean);
            }
        }
        let squares = tail.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean));
        let var = (acc.iter().sum::<f64>() + squares.sum::<f64>()) / n;
        *moments = [mean, var];
    }
}

vectorized! {
    /// `out = x · a + s`, through SiLU when `silu`.
    fn affine(out: &mut [f32], x: &[f32], a: f32, s: f32, silu: bool) {
        match silu {
            true => {
                for (o, &v) in out.iter_mut().zip(x) {
                    let y = v.mul_add(a, s);
                    *o = y / (1.0 + crate::gen::attention::exp(-y));
                }
            }
            false => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v.mul_add(a, s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_group_norm_and_silu() {
        let dev = Device::Cpu;
        let (b, c, h, w, g) = (2, 8, 5, 3, 4);
        let n = b * c * h * w;
        // Values with an offset and spread per channel, so mean and variance both matter.
        let xv: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 10.0 - 3.0) * (1.0 + (i / (h * w) % c) as f32))
            .collect();
        let x = Tensor::from_vec(xv, (b, c, h, w), &dev).unwrap();
        let wv: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
        let bv: Vec<f32> = (0..c).map(|i| i as f32 * 0.3 - 1.0).collect();
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_string(), Tensor::new(wv, &dev).unwrap());
        map.insert("bias".to_string(), Tensor::new(bv, &dev).unwrap());
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        for silu in [false, true] {
            let norm = Norm::new(vb.clone(), g, c, 1e-6, silu).unwrap();
            let got = norm.forward(&x).unwrap();
            let mut want = candle_nn::group_norm(g, c, 1e-6, vb.clone())
                .unwrap()
                .forward(&x)
                .unwrap();
            if silu {
                want = candle_nn::ops::silu(&want).unwrap();
            }
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            // Normalised values of size ≲ 4 times weights ≤ 2: 1e-5 absolute.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "silu {silu} value {i}: {g} vs {w}");
            }
        }
    }
}
