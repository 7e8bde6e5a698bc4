//! The convolutional blocks of SD's U-Net and VAE (diffusers' `ResnetBlock2D`, up- and
//! down-samplers) over [`Conv2d`] and [`Norm`], which runs our own CPU convolution ([`crate::gen::conv`])
//! for f32 on the CPU and candle's elsewhere. Attention blocks are candle-transformers'.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::VarBuilder;

use crate::gen::bf16::{self, ColBias, Lhs, Precision, Rhs, Start};
use crate::gen::conv::{Conv, ConvBf16};
use crate::gen::cpu::{f32_slice, SharedOut};
use crate::gen::norm::Norm;
use crate::gen::product::{product, Land, Operand};

/// A square-kernel 2-D convolution with bias.
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// f32 weight and bias: our kernel on the CPU, candle's elsewhere.
    F32(Tensor, Tensor, Conv),
    /// Packed for bf16 products.
    Bf16(ConvBf16),
}

impl Conv2d {
    /// Loads `weight [c_out, c_in, k, k]` and `bias [c_out]` from `vb`, packed for bf16
    /// products under `precision` bf16.
    pub fn new(
        vb: VarBuilder,
        (c_in, c_out, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
        precision: Precision,
    ) -> Result<Conv2d> {
        let weight = vb.get((c_out, c_in, k, k), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let conv = Conv { stride, padding };
        Ok(match precision {
            Precision::F32 => Conv2d::F32(weight, bias, conv),
            Precision::Bf16 => Conv2d::Bf16(ConvBf16::new(conv, &weight, &bias)?),
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias, conv) = match self {
            Conv2d::Bf16(op) => return op.forward(&x.contiguous()?),
            Conv2d::F32(weight, bias, conv) => (weight, bias, conv),
        };
        if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            return conv.forward(&x.contiguous()?, weight, bias);
        }
        let c_out = bias.dim(0)?;
        x.conv2d(weight, conv.padding, conv.stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)
    }
}

/// A linear layer: on the CPU in f32 with machine-independent sums ([`LinearF32`]) or bf16
/// products ([`LinearBf16`]); elsewhere candle's.
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's layer (a GPU, or weights not in f32).
    Candle(candle_nn::Linear),
    /// f32 on the CPU: candle's layer's tensors, multiplied by [`LinearF32`].
    F32(candle_nn::Linear),
    /// Packed weight `[in, out]` and bias.
    Bf16(LinearBf16),
}

/// Loads a linear layer `input → output` (with a bias when `bias`) from `vb`, packed for bf16
/// products under `precision` bf16.
pub fn linear(
    vb: VarBuilder,
    (input, output): (usize, usize),
    bias: bool,
    precision: Precision,
) -> Result<Linear> {
    let cpu = vb.device().is_cpu() && vb.dtype() == DType::F32;
    let layer = match bias {
        true => candle_nn::linear(input, output, vb)?,
        false => candle_nn::linear_no_bias(input, output, vb)?,
    };
    Ok(match (cpu, precision) {
        (false, _) => Linear::Candle(layer),
        (true, Precision::F32) => Linear::F32(layer),
        (true, Precision::Bf16) => {
            let w = layer.weight().flatten_all()?.to_vec1::<f32>()?;
            let bias = match layer.bias() {
                Some(b) => Some(ColBias::new(&b.to_vec1::<f32>()?)),
                None => None,
            };
            Linear::Bf16(LinearBf16 {
                weight: Arc::new(Rhs::pack_cols(&w, input, output, input)),
                bias: bias.map(Arc::new),
            })
        }
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(l) => l.forward(x),
            Linear::F32(l) => {
                let (x, w) = (x.contiguous()?, l.weight().contiguous()?);
                match l.bias() {
                    Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &LinearF32),
                    None => x.apply_op2_no_bwd(&w, &LinearF32),
                }
            }
            Linear::Bf16(l) => x.contiguous()?.apply_op1_no_bwd(l),
        }
    }
}

/// The f32 CPU kernel of a [`Linear`]: `x [.., in] · weightᵀ (+ bias)` with the weight
/// `[out, in]`, each output starting from its bias, summed by [`crate::gen::product`].
#[derive(Debug, Clone, Copy)]
pub struct LinearF32;

impl LinearF32 {
    fn run(
        x: &[f32],
        xl: &Layout,
        w: &[f32],
        wl: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let &[output, input] = wl.shape().dims() else {
            candle_core::bail!("linear: a weight of shape {:?}", wl.shape());
        };
        let mut dims = xl.shape().dims().to_vec();
        if dims.last() != Some(&input) || bias.is_some_and(|b| b.len() != output) {
            candle_core::bail!("linear: input {:?} for weight {:?}", xl.shape(), wl.shape());
        }
        if let Some(last) = dims.last_mut() {
            *last = output;
        }
        let rows = x.len() / input.max(1);
        // With a bias the sums land on it; without, they replace what the buffer holds, so it
        // is left uninitialised.
        let (mut out, land) = match bias {
            Some(b) => (b.repeat(rows), Land::Add),
            None => (Vec::with_capacity(rows * output), Land::Replace(1.0)),
        };
        let (a, w) = (Operand::rows(x, input), Operand::transposed(w, input));
        // SAFETY: `x` is `rows × input`, the weight `output × input` read transposed, `out`
        // has room for `rows × output`, every one of which the product writes.
        unsafe {
            product(
                (rows, output, input),
                out.as_mut_ptr(),
                output,
                a,
                w,
                land,
                true,
            );
            out.set_len(rows * output);
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl CustomOp2 for LinearF32 {
    fn name(&self) -> &'static str {
        "mergesmith-linear"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "linear", "input")?;
        LinearF32::run(x, l, f32_slice(ws, wl, "linear", "weight")?, wl, None)
    }
}

impl CustomOp3 for LinearF32 {
    fn name(&self) -> &'static str {
        "mergesmith-linear"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "linear", "input")?;
        let bias = f32_slice(bs, bl, "linear", "bias")?;
        LinearF32::run(x, l, f32_slice(ws, wl, "linear", "weight")?, wl, Some(bias))
    }
}

/// The CPU kernel of a bf16 [`Linear`]: `x [.., in] · weight + bias`.
#[derive(Debug, Clone)]
pub struct LinearBf16 {
    weight: Arc<Rhs>,
    bias: Option<Arc<ColBias>>,
}

impl CustomOp1 for LinearBf16 {
    fn name(&self) -> &'static str {
        "mergesmith-linear-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "linear", "input")?;
        let (input, output) = (self.weight.k(), self.weight.cols());
        let mut dims = l.shape().dims().to_vec();
        if dims.last() != Some(&input) {
            candle_core::bail!("linear: input {:?} for {input} features", l.shape());
        }
        if let Some(last) = dims.last_mut() {
            *last = output;
        }
        let rows = x.len() / input.max(1);
        let start = match &self.bias {
            Some(b) => Start::Cols(b),
            None => Start::Zero,
        };
        let lhs = Lhs::pack(x, rows, input, input);
        let mut out = Vec::with_capacity(rows * output);
        // SAFETY: `out` has room for `rows × output`, which the product writes in full; bf16
        // layers exist only where AMX is available.
        unsafe {
            bf16::product(
                &lhs,
                &self.weight,
                SharedOut::spare(&mut out),
                output,
                start,
            );
            out.set_len(rows * output);
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// diffusers' `ResnetBlock2D` (32 groups, output scale 1): GroupNorm, SiLU, 3×3 convolution,
/// plus the projected time embedding; again; plus the input (through a 1×1 convolution when
/// the width changes).
#[derive(Debug, Clone)]
pub struct Resnet {
    norm1: Norm,
    conv1: Conv2d,
    time: Option<Linear>,
    norm2: Norm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

/// GroupNorm groups of every SD U-Net and VAE block.
pub const GROUPS: usize = 32;

impl Resnet {
    /// Loads a block from `c_in` to `c_out` channels; `temb`: the width of the time
    /// embedding it adds (`None` in the VAE).
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        eps: f64,
        precision: Precision,
    ) -> Result<Resnet> {
        let p = precision;
        Ok(Resnet {
            norm1: Norm::new(vb.pp("norm1"), GROUPS, c_in, eps, true)?,
            conv1: Conv2d::new(vb.pp("conv1"), (c_in, c_out, 3), 1, 1, p)?,
            time: match temb {
                Some(t) => Some(linear(
                    vb.pp("time_emb_proj"),
                    (t, c_out),
                    true,
                    Precision::F32,
                )?),
                None => None,
            },
            norm2: Norm::new(vb.pp("norm2"), GROUPS, c_out, eps, true)?,
            conv2: Conv2d::new(vb.pp("conv2"), (c_out, c_out, 3), 1, 1, p)?,
            shortcut: match c_in == c_out {
                true => None,
                false => Some(Conv2d::new(
                    vb.pp("conv_shortcut"),
                    (c_in, c_out, 1),
                    1,
                    0,
                    p,
                )?),
            },
        })
    }

    /// The block's output for `x`, with the time embedding `temb` when it takes one.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let mut h = self.conv1.forward(&self.norm1.forward(x)?)?;
        if let (Some(temb), Some(proj)) = (temb, &self.time) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = t.unsqueeze(2)?.unsqueeze(3)?.broadcast_add(&h)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?)?;
        skip + h
    }
}

/// A 3×3 convolution of stride 2 (diffusers' `Downsample2D`, padding 1).
pub fn downsampler(vb: VarBuilder, channels: usize, precision: Precision) -> Result<Conv2d> {
    Conv2d::new(vb.pp("conv"), (channels, channels, 3), 2, 1, precision)
}

/// diffusers' `Upsample2D`: nearest-neighbour upsampling, then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsampler(Conv2d);

impl Upsampler {
    /// Loads the convolution of a `channels`-wide upsampler.
    pub fn new(vb: VarBuilder, channels: usize, precision: Precision) -> Result<Upsampler> {
        Ok(Upsampler(Conv2d::new(
            vb.pp("conv"),
            (channels, channels, 3),
            1,
            1,
            precision,
        )?))
    }

    /// `x` upsampled to `size` (height, width), twice its size when `None`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (h, w) = match size {
            Some(s) => s,
            None => (2 * x.dim(2)?, 2 * x.dim(3)?),
        };
        self.0.forward(&x.upsample_nearest2d(h, w)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::bf16::{round, widen};
    use crate::gen::cpu::testing::{flat, values};
    use candle_core::Device;

    #[test]
    fn bf16_linear_matches_f64_sums_of_the_rounded_operands() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        let (rows, input, output) = (37, 70, 45);
        let dev = Device::Cpu;
        let (w, b, x) = (
            values(output * input, 1, 1.0),
            values(output, 2, 1.0),
            values(rows * input, 3, 1.0),
        );
        let mut tensors = std::collections::HashMap::new();
        tensors.insert(
            "weight".to_string(),
            Tensor::from_vec(w.clone(), (output, input), &dev).unwrap(),
        );
        tensors.insert(
            "bias".to_string(),
            Tensor::from_vec(b.clone(), output, &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let layer = linear(vb, (input, output), true, Precision::Bf16).unwrap();
        let xt = Tensor::from_vec(x.clone(), (1, rows, input), &dev).unwrap();
        let got = layer.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[1, rows, output]);
        let r = |v: f32| widen(round(v)) as f64;
        for (i, g) in flat(&got).iter().enumerate() {
            let (row, o) = (i / output, i % output);
            let want = b[o] as f64
                + (0..input)
                    .map(|k| r(x[row * input + k]) * r(w[o * input + k]))
                    .sum::<f64>();
            // f32 accumulation of 70 exact products of size ≤ 1: 1e-4 absolute.
            assert!((*g as f64 - want).abs() < 1e-4, "{i}: {g} vs {want}");
        }
    }
}
