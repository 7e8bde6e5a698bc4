//! The denoising U-Net of SD1, SD2 and SDXL, assembled from candle-transformers' diffusers
//! blocks (ResNets, spatial transformers, up/down samplers) with its shape read from the
//! checkpoint, plus what candle's own `UNet2DConditionModel` lacks for SDXL: the "added"
//! conditioning (`label_emb`, diffusers' `add_embedding`) that feeds the pooled text embedding
//! and the size / crop time ids into the time embedding.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};

/// One resolution level of the U-Net.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Level {
    /// Channels.
    pub channels: usize,
    /// Transformer blocks per attention layer (0: a level without attention).
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
}

/// The shape of a U-Net, as read from a checkpoint by [`UnetConfig::read`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UnetConfig {
    /// Resolution levels, outermost first.
    pub levels: Vec<Level>,
    /// ResNets per down level (one more per up level).
    pub layers_per_block: usize,
    /// Transformer blocks of the middle block's attention.
    pub mid_depth: usize,
    /// Width of the text conditioning.
    pub context: usize,
    /// Linear (SD2, SDXL) rather than 1x1 convolution (SD1) projections around attention.
    pub linear_projection: bool,
    /// SDXL's added conditioning: (input width, width of each time id's embedding).
    pub added: Option<(usize, usize)>,
    /// Latent channels in and out.
    pub latent_channels: usize,
}

/// The number of SDXL time ids (original size, crop offset, target size).
pub const TIME_IDS: usize = 6;

impl UnetConfig {
    /// Reads the shape from tensor shapes by diffusers name (`shape(name)`, `None` when
    /// absent). `head_dim`: channels per attention head (64 for SD2 / SDXL), or `None` for
    /// SD1's fixed 8 heads. `pooled`: the width of the pooled text embedding (SDXL).
    pub fn read(
        shape: impl Fn(&str) -> Option<Vec<usize>>,
        head_dim: Option<usize>,
        pooled: Option<usize>,
    ) -> std::result::Result<UnetConfig, String> {
        let need = |name: &str| shape(name).ok_or_else(|| format!("no U-Net weight `{name}`"));
        let conv_in = need("conv_in.weight")?;
        let count =
            |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| shape(&f(i)).is_some()).count();
        let n = count(&|i| format!("down_blocks.{i}.resnets.0.conv1.weight"));
        if n == 0 {
            return Err("no U-Net down blocks".into());
        }
        let mut levels = Vec::with_capacity(n);
        let mut context = None;
        let mut linear_projection = false;
        for i in 0..n {
            let channels = need(&format!("down_blocks.{i}.resnets.0.conv1.weight"))?[0];
            let attn = format!("down_blocks.{i}.attentions.0");
            let depth = count(&|j| format!("{attn}.transformer_blocks.{j}.attn1.to_q.weight"));
            if depth > 0 {
                context.get_or_insert(
                    need(&format!("{attn}.transformer_blocks.0.attn2.to_k.weight"))?[1],
                );
                linear_projection = need(&format!("{attn}.proj_in.weight"))?.len() == 2;
            }
            let heads = match head_dim {
                Some(d) => (channels / d).max(1),
                None => 8,
            };
            levels.push(Level {
                channels,
                depth,
                heads,
            });
        }
        let context = context.ok_or("a U-Net without cross-attention")?;
        let layers_per_block = count(&|j| format!("down_blocks.0.resnets.{j}.conv1.weight"));
        let mid_depth =
            count(&|j| format!("mid_block.attentions.0.transformer_blocks.{j}.attn1.to_q.weight"));
        let added = match (shape("add_embedding.linear_1.weight"), pooled) {
            (None, _) => None,
            (Some(_), None) => return Err("an SDXL U-Net needs a pooled text embedding".into()),
            (Some(s), Some(p)) => {
                let per_id = s[1]
                    .checked_sub(p)
                    .filter(|w| w % TIME_IDS == 0)
                    .ok_or_else(|| {
                        format!(
                            "added conditioning of width {} does not fit a pooled width {p}",
                            s[1]
                        )
                    })?;
                Some((s[1], per_id / TIME_IDS))
            }
        };
        Ok(UnetConfig {
            levels,
            layers_per_block,
            mid_depth,
            context,
            linear_projection,
            added,
            latent_channels: conv_in[1],
        })
    }
}

/// The level, if it has attention.
fn with_attention(l: &Level) -> Option<&Level> {
    (l.depth > 0).then_some(l)
}

enum Down {
    Plain(DownBlock2D),
    Attn(CrossAttnDownBlock2D),
}

enum Up {
    Plain(UpBlock2D),
    Attn(CrossAttnUpBlock2D),
}

/// A U-Net loaded for inference.
pub struct Unet {
    config: UnetConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL: the time ids' sinusoidal embedding and the added embedding's MLP.
    added: Option<(Timesteps, TimestepEmbedding)>,
    down: Vec<Down>,
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// GroupNorm groups and epsilon of every SD U-Net.
const GROUPS: usize = 32;
const EPS: f64 = 1e-5;

impl Unet {
    /// Builds the U-Net of `config` from `vb` (diffusers names).
    pub fn new(vb: VarBuilder, config: UnetConfig) -> Result<Unet> {
        let levels = &config.levels;
        let n = levels.len();
        let c0 = levels[0].channels;
        let temb = 4 * c0;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = candle_nn::conv2d(config.latent_channels, c0, 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(c0, true, 0.);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), c0, temb)?;
        let added = match config.added {
            None => None,
            Some((width, per_id)) => Some((
                Timesteps::new(per_id, true, 0.),
                TimestepEmbedding::new(vb.pp("add_embedding"), width, temb)?,
            )),
        };
        let mut down = Vec::with_capacity(n);
        for (i, l) in levels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let input = if i == 0 { c0 } else { levels[i - 1].channels };
            let plain = DownBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: EPS,
                resnet_groups: GROUPS,
                add_downsample: i + 1 < n,
                downsample_padding: 1,
                ..Default::default()
            };
            down.push(match with_attention(l) {
                None => Down::Plain(DownBlock2D::new(vb, input, l.channels, Some(temb), plain)?),
                Some(l) => Down::Attn(CrossAttnDownBlock2D::new(
                    vb,
                    input,
                    l.channels,
                    Some(temb),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: plain,
                        attn_num_head_channels: l.heads,
                        cross_attention_dim: config.context,
                        sliced_attention_size: None,
                        use_linear_projection: config.linear_projection,
                        transformer_layers_per_block: l.depth,
                    },
                )?),
            });
        }
        let last = &levels[n - 1];
        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.channels,
            Some(temb),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: EPS,
                resnet_groups: Some(GROUPS),
                attn_num_head_channels: last.heads,
                cross_attn_dim: config.context,
                use_linear_projection: config.linear_projection,
                transformer_layers_per_block: config.mid_depth,
                ..Default::default()
            },
        )?;
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            // Up level i mirrors down level n - 1 - i.
            let l = &levels[n - 1 - i];
            let vb = vb.pp("up_blocks").pp(i);
            let prev = if i == 0 {
                last.channels
            } else {
                levels[n - i].channels
            };
            let skip = levels[(n - 1 - i).saturating_sub(1)].channels;
            let plain = UpBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: EPS,
                resnet_groups: GROUPS,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            up.push(match with_attention(l) {
                None => Up::Plain(UpBlock2D::new(
                    vb,
                    skip,
                    prev,
                    l.channels,
                    Some(temb),
                    plain,
                )?),
                Some(l) => Up::Attn(CrossAttnUpBlock2D::new(
                    vb,
                    skip,
                    prev,
                    l.channels,
                    Some(temb),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: plain,
                        attn_num_head_channels: l.heads,
                        cross_attention_dim: config.context,
                        sliced_attention_size: None,
                        use_linear_projection: config.linear_projection,
                        transformer_layers_per_block: l.depth,
                    },
                )?),
            });
        }
        let norm_out = candle_nn::group_norm(GROUPS, c0, EPS, vb.pp("conv_norm_out"))?;
        let conv_out = candle_nn::conv2d(c0, config.latent_channels, 3, pad1, vb.pp("conv_out"))?;
        Ok(Unet {
            config,
            conv_in,
            time_proj,
            time_embedding,
            added,
            down,
            mid,
            up,
            norm_out,
            conv_out,
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// SDXL's added embedding (summed into the time embedding): the time ids `[batch, 6]`
    /// each embedded sinusoidally, after the pooled text `[batch, pooled]`, through the MLP.
    pub fn added_embedding(&self, pooled: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let Some((proj, mlp)) = &self.added else {
            candle_core::bail!("this U-Net takes no added conditioning");
        };
        let batch = ids.dim(0)?;
        let ids = proj
            .forward(&ids.flatten_all()?)?
            .reshape((batch, ()))?
            .to_dtype(pooled.dtype())?;
        mlp.forward(&Tensor::cat(&[pooled, &ids], 1)?)
    }

    /// The model output for latents `x` (`[batch, channels, h, w]`) at `timestep`, with text
    /// conditioning `context` (`[batch, tokens, width]`) and, for SDXL, `added`: the pooled
    /// text embedding `[batch, pooled]` and the time ids `[batch, 6]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let t = (Tensor::ones(batch, x.dtype(), x.device())? * timestep)?;
        let mut emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        if let Some((pooled, ids)) = added {
            emb = (emb + self.added_embedding(pooled, ids)?)?;
        } else if self.added.is_some() {
            candle_core::bail!("this U-Net needs a pooled embedding and time ids");
        }
        let mut x = self.conv_in.forward(x)?;
        let mut skips = vec![x.clone()];
        for d in &self.down {
            let (out, res) = match d {
                Down::Plain(b) => b.forward(&x, Some(&emb))?,
                Down::Attn(b) => b.forward(&x, Some(&emb), Some(context))?,
            };
            skips.extend(res);
            x = out;
        }
        x = self.mid.forward(&x, Some(&emb), Some(context))?;
        let per_level = self.config.layers_per_block + 1;
        for u in &self.up {
            let res = skips.split_off(skips.len() - per_level);
            // Upsample to the size of the next skip connection, so sizes that are not a
            // multiple of 2^levels come back exactly.
            let size = match skips.last() {
                Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                None => None,
            };
            x = match u {
                Up::Plain(b) => b.forward(&x, &res, Some(&emb), size)?,
                Up::Attn(b) => b.forward(&x, &res, Some(&emb), size, Some(context))?,
            };
        }
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}
