//! SD's VAE decoder (diffusers' `AutoencoderKL.decode`: the post-quant 1×1 convolution, then
//! the decoder), built from [`crate::gen::blocks`]. Only the decoder is loaded: generation
//! never encodes an image.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::attention::{
    AttentionBlock, AttentionBlockConfig,
};

use crate::gen::bf16::Precision;
use crate::gen::blocks::{Conv2d, Resnet, Upsampler, GROUPS};
use crate::gen::norm::Norm;

/// The VAE's GroupNorm epsilon.
const EPS: f64 = 1e-6;

/// One decoder level: three ResNets, then (all but the last) an upsampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<Resnet>,
    upsampler: Option<Upsampler>,
}

/// The decoder of an SD / SDXL VAE, latents to an image in [−1, 1].
#[derive(Debug)]
pub struct VaeDecoder {
    post_quant: Conv2d,
    conv_in: Conv2d,
    mid: (Resnet, AttentionBlock, Resnet),
    levels: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads the decoder from `vb` (diffusers names: `post_quant_conv`, `decoder.*`).
    /// `channels`: each level's width, outermost first (SD: 128, 256, 512, 512);
    /// `latent`: latent channels; `p`: the convolutions' products.
    pub fn new(
        vb: VarBuilder,
        channels: &[usize],
        latent: usize,
        p: Precision,
    ) -> Result<VaeDecoder> {
        let Some(&inner) = channels.last() else {
            candle_core::bail!("a VAE without levels");
        };
        let post_quant = Conv2d::new(vb.pp("post_quant_conv"), (latent, latent, 1), 1, 0, p)?;
        let vb = vb.pp("decoder");
        let conv_in = Conv2d::new(vb.pp("conv_in"), (latent, inner, 3), 1, 1, p)?;
        let m = vb.pp("mid_block");
        let attention = AttentionBlockConfig {
            num_head_channels: None,
            num_groups: GROUPS,
            rescale_output_factor: 1.0,
            eps: EPS,
        };
        let mid = (
            Resnet::new(m.pp("resnets").pp(0), inner, inner, None, EPS, p)?,
            AttentionBlock::new(m.pp("attentions").pp(0), inner, attention)?,
            Resnet::new(m.pp("resnets").pp(1), inner, inner, None, EPS, p)?,
        );
        let n = channels.len();
        let mut levels = Vec::with_capacity(n);
        let mut width = inner;
        for (i, &out) in channels.iter().rev().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = (0..3)
                .map(|j| {
                    let c_in = if j == 0 { width } else { out };
                    Resnet::new(vb.pp("resnets").pp(j), c_in, out, None, EPS, p)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = match i + 1 < n {
                true => Some(Upsampler::new(vb.pp("upsamplers").pp(0), out, p)?),
                false => None,
            };
            levels.push(Level { resnets, upsampler });
            width = out;
        }
        Ok(VaeDecoder {
            post_quant,
            conv_in,
            mid,
            levels,
            norm_out: Norm::new(vb.pp("conv_norm_out"), GROUPS, channels[0], EPS, true)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), (channels[0], 3, 3), 1, 1, p)?,
        })
    }

    /// The image `[batch, 3, 8h, 8w]` of latents `[batch, latent, h, w]` (already divided by
    /// the family's scaling factor).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(&self.post_quant.forward(z)?)?;
        let (r1, attn, r2) = &self.mid;
        let mut x = r2.forward(&attn.forward(&r1.forward(&x, None)?)?, None)?;
        for level in &self.levels {
            for r in &level.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &level.upsampler {
                x = u.forward(&x, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?)
    }
}
