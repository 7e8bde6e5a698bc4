//! The convolutional blocks of SD's U-Net and VAE (diffusers' `ResnetBlock2D`, up- and
//! down-samplers) over [`Conv2d`] and [`Norm`], which runs our own CPU convolution ([`crate::gen::conv`])
//! for f32 on the CPU and candle's elsewhere. Attention blocks are candle-transformers'.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::gen::conv::Conv;
use crate::gen::norm::Norm;

/// A square-kernel 2-D convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    conv: Conv,
}

impl Conv2d {
    /// Loads `weight [c_out, c_in, k, k]` and `bias [c_out]` from `vb`.
    pub fn new(
        vb: VarBuilder,
        (c_in, c_out, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: vb.get((c_out, c_in, k, k), "weight")?,
            bias: vb.get(c_out, "bias")?,
            conv: Conv { stride, padding },
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Conv { stride, padding } = self.conv;
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            return self
                .conv
                .forward(&x.contiguous()?, &self.weight, &self.bias);
        }
        let c_out = self.bias.dim(0)?;
        x.conv2d(&self.weight, padding, stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, c_out, 1, 1))?)
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
    ) -> Result<Resnet> {
        Ok(Resnet {
            norm1: Norm::new(vb.pp("norm1"), GROUPS, c_in, eps, true)?,
            conv1: Conv2d::new(vb.pp("conv1"), (c_in, c_out, 3), 1, 1)?,
            time: match temb {
                Some(t) => Some(candle_nn::linear(t, c_out, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: Norm::new(vb.pp("norm2"), GROUPS, c_out, eps, true)?,
            conv2: Conv2d::new(vb.pp("conv2"), (c_out, c_out, 3), 1, 1)?,
            shortcut: match c_in == c_out {
                true => None,
                false => Some(Conv2d::new(vb.pp("conv_shortcut"), (c_in, c_out, 1), 1, 0)?),
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
pub fn downsampler(vb: VarBuilder, channels: usize) -> Result<Conv2d> {
    Conv2d::new(vb.pp("conv"), (channels, channels, 3), 2, 1)
}

/// diffusers' `Upsample2D`: nearest-neighbour upsampling, then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsampler(Conv2d);

impl Upsampler {
    /// Loads the convolution of a `channels`-wide upsampler.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Upsampler> {
        Ok(Upsampler(Conv2d::new(
            vb.pp("conv"),
            (channels, channels, 3),
            1,
            1,
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
