//! The denoising U-Net of SD1, SD2 and SDXL with its shape read from the checkpoint: our
//! convolutional blocks ([`crate::gen::blocks`]) and spatial transformers
//! ([`crate::gen::attention`]), plus what candle's own `UNet2DConditionModel` lacks for SDXL: the "added"
//! conditioning (`label_emb`, diffusers' `add_embedding`) that feeds the pooled text embedding
//! and the size / crop time ids into the time embedding.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::Timesteps;

use crate::gen::attention::SpatialTransformer;
use crate::gen::bf16::Precision;
use crate::gen::blocks::{downsampler, linear, Conv2d, Linear, Resnet, Upsampler, GROUPS};
use crate::gen::norm::Norm;

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

/// One down level: ResNets (each followed by a transformer where the level has attention),
/// then a stride-2 convolution on all but the innermost level.
struct Down {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

/// One up level: ResNets over the input joined with a skip connection (each followed by a
/// transformer where the level has attention), then an upsampler on all but the outermost.
struct Up {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsampler>,
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
    /// The middle block: ResNet, transformer, ResNet.
    mid: (Resnet, SpatialTransformer, Resnet),
    up: Vec<Up>,
    norm_out: Norm,
    conv_out: Conv2d,
}

/// GroupNorm epsilon of every SD U-Net.
const EPS: f64 = 1e-5;

/// diffusers' `TimestepEmbedding`: linear, SiLU, linear (f32 in every precision).
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, input: usize, width: usize) -> Result<TimestepEmbedding> {
        let f32 = Precision::F32;
        Ok(TimestepEmbedding {
            linear_1: linear(vb.pp("linear_1"), (input, width), true, f32)?,
            linear_2: linear(vb.pp("linear_2"), (width, width), true, f32)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

impl Unet {
    /// Builds the U-Net of `config` from `vb` (diffusers names), its products in `p`.
    pub fn new(vb: VarBuilder, config: UnetConfig, p: Precision) -> Result<Unet> {
        let levels = &config.levels;
        let n = levels.len();
        let c0 = levels[0].channels;
        let temb = 4 * c0;
        let conv_in = Conv2d::new(vb.pp("conv_in"), (config.latent_channels, c0, 3), 1, 1, p)?;
        let time_proj = Timesteps::new(c0, true, 0.);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), c0, temb)?;
        let added = match config.added {
            None => None,
            Some((width, per_id)) => Some((
                Timesteps::new(per_id, true, 0.),
                TimestepEmbedding::new(vb.pp("add_embedding"), width, temb)?,
            )),
        };
        // `count` transformers of `depth` blocks over level `l`.
        let transformers = |vb: VarBuilder, l: &Level, depth: usize, count: usize| {
            let vb = vb.pp("attentions");
            (0..count)
                .map(|j| {
                    let (c, linear) = (l.channels, config.linear_projection);
                    SpatialTransformer::new(vb.pp(j), c, l.heads, depth, config.context, linear, p)
                })
                .collect::<Result<Vec<_>>>()
        };
        let layers = config.layers_per_block;
        let mut down = Vec::with_capacity(n);
        for (i, l) in levels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let input = if i == 0 { c0 } else { levels[i - 1].channels };
            let resnets = (0..layers)
                .map(|j| {
                    let c_in = if j == 0 { input } else { l.channels };
                    let vb = vb.pp("resnets").pp(j);
                    Resnet::new(vb, c_in, l.channels, Some(temb), EPS, p)
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = match l.depth {
                0 => Vec::new(),
                d => transformers(vb.clone(), l, d, layers)?,
            };
            let downsampler = match i + 1 < n {
                true => Some(downsampler(vb.pp("downsamplers").pp(0), l.channels, p)?),
                false => None,
            };
            down.push(Down {
                resnets,
                attentions,
                downsampler,
            });
        }
        let last = &levels[n - 1];
        let m = vb.pp("mid_block");
        let mid_resnet = |j: usize| {
            let c = last.channels;
            Resnet::new(m.pp("resnets").pp(j), c, c, Some(temb), EPS, p)
        };
        let mut mid_attention = transformers(m.clone(), last, config.mid_depth, 1)?;
        let mid = (mid_resnet(0)?, mid_attention.remove(0), mid_resnet(1)?);
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
            let resnets = (0..=layers)
                .map(|j| {
                    let from = if j == 0 { prev } else { l.channels };
                    let joined = if j == layers { skip } else { l.channels };
                    let vb = vb.pp("resnets").pp(j);
                    Resnet::new(vb, from + joined, l.channels, Some(temb), EPS, p)
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = match l.depth {
                0 => Vec::new(),
                d => transformers(vb.clone(), l, d, layers + 1)?,
            };
            let upsampler = match i + 1 < n {
                true => Some(Upsampler::new(vb.pp("upsamplers").pp(0), l.channels, p)?),
                false => None,
            };
            up.push(Up {
                resnets,
                attentions,
                upsampler,
            });
        }
        let norm_out = Norm::new(vb.pp("conv_norm_out"), GROUPS, c0, EPS, true)?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), (c0, config.latent_channels, 3), 1, 1, p)?;
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
            for (j, r) in d.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&emb))?;
                if let Some(a) = d.attentions.get(j) {
                    x = a.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &d.downsampler {
                x = ds.forward(&x)?;
                skips.push(x.clone());
            }
        }
        let (r1, attn, r2) = &self.mid;
        x = r1.forward(&x, Some(&emb))?;
        x = r2.forward(&attn.forward(&x, context)?, Some(&emb))?;
        for u in &self.up {
            for (j, r) in u.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("U-Net: a skip is missing".into()))?;
                x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb))?;
                if let Some(a) = u.attentions.get(j) {
                    x = a.forward(&x, context)?;
                }
            }
            if let Some(us) = &u.upsampler {
                // Upsample to the size of the next skip connection, so sizes that are not a
                // multiple of 2^levels come back exactly.
                let size = match skips.last() {
                    Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                    None => None,
                };
                x = us.forward(&x, size)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?)
    }
}
