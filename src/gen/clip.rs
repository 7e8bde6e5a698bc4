//! The CLIP text encoders of Stable Diffusion (CLIP-L; OpenCLIP ViT-H and ViT-bigG in HF
//! layout), written on candle-nn so that every variant the web UI uses is reachable: the
//! hidden state of any layer (clip skip; SD2 and SDXL condition on the penultimate one), with
//! or without the final layer norm, and the pooled, projected end-token output SDXL adds to
//! its time embedding. Weights load by the HF names of `arch::names` (`text_model.*`,
//! `text_projection.weight`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::gen::bf16::Precision;
use crate::gen::blocks::{linear, Linear};
use crate::gen::product::matmul;

/// The shape of a text encoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClipConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the hidden states.
    pub dim: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Positions (77).
    pub positions: usize,
    /// OpenAI's `quick_gelu` (CLIP-L) rather than erf GELU (OpenCLIP).
    pub quick_gelu: bool,
}

impl ClipConfig {
    /// An encoder's shape read from its weights: `shape` gives a tensor's shape by HF name
    /// (`text_model.…`), `layers` is how many layers it has.
    pub fn read(
        shape: impl Fn(&str) -> crate::error::Result<Vec<usize>>,
        layers: usize,
        quick_gelu: bool,
    ) -> crate::error::Result<ClipConfig> {
        let token = shape("text_model.embeddings.token_embedding.weight")?;
        Ok(ClipConfig {
            vocab: token[0],
            dim: token[1],
            layers,
            heads: (token[1] / 64).max(1),
            intermediate: shape("text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            positions: shape("text_model.embeddings.position_embedding.weight")?[0],
            quick_gelu,
        })
    }

    /// CLIP ViT-L/14 (SD1, SDXL's first encoder).
    pub fn clip_l() -> Self {
        ClipConfig {
            vocab: 49408,
            dim: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            positions: 77,
            quick_gelu: true,
        }
    }

    /// OpenCLIP ViT-H/14 (SD2).
    pub fn open_clip_h() -> Self {
        ClipConfig {
            dim: 1024,
            layers: 24,
            heads: 16,
            intermediate: 4096,
            quick_gelu: false,
            ..Self::clip_l()
        }
    }

    /// OpenCLIP ViT-bigG/14 (SDXL's second encoder).
    pub fn open_clip_bigg() -> Self {
        ClipConfig {
            dim: 1280,
            layers: 32,
            heads: 20,
            intermediate: 5120,
            quick_gelu: false,
            ..Self::clip_l()
        }
    }
}

/// One pre-norm transformer layer.
struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A CLIP text encoder.
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: candle_nn::Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    /// Whether to give the pooled output without a projection (Flux's and SD3's CLIP-L).
    pool_raw: bool,
}

/// What the encoder gives for a batch of token ids.
#[derive(Debug)]
pub struct TextOutput {
    /// `[batch, tokens, dim]` hidden states of the layer asked for.
    pub hidden: Tensor,
    /// `[batch, projection]`: the final layer norm of the last layer at each end token,
    /// through the text projection (models loaded with one).
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// Loads an encoder from `vb` (HF names: `text_model.*`, and `text_projection.weight` when
    /// `projection`).
    pub fn new(vb: VarBuilder, config: &ClipConfig, projection: bool) -> candle_core::Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab, config.dim, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((config.positions, config.dim), "weight")?;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(config.dim, 1e-5, vb);
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let l = tm.pp("encoder.layers").pp(i);
            let attn = l.pp("self_attn");
            let lin = |n: &str, i: usize, o: usize, vb: &VarBuilder| {
                linear(vb.pp(n), (i, o), true, Precision::F32)
            };
            let (d, m) = (config.dim, config.intermediate);
            layers.push(Layer {
                norm1: ln(l.pp("layer_norm1"))?,
                q: lin("q_proj", d, d, &attn)?,
                k: lin("k_proj", d, d, &attn)?,
                v: lin("v_proj", d, d, &attn)?,
                out: lin("out_proj", d, d, &attn)?,
                norm2: ln(l.pp("layer_norm2"))?,
                fc1: lin("fc1", d, m, &l.pp("mlp"))?,
                fc2: lin("fc2", m, d, &l.pp("mlp"))?,
            });
        }
        let final_norm = ln(tm.pp("final_layer_norm"))?;
        let projection = match projection {
            true => Some(linear(
                vb.pp("text_projection"),
                (config.dim, config.dim),
                false,
                Precision::F32,
            )?),
            false => None,
        };
        Ok(ClipTextModel {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
            pool_raw: false,
        })
    }

    /// Its hidden width.
    pub fn width(&self) -> usize {
        self.config.dim
    }

    /// Its transformer layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// This model giving its pooled output (the final norm at the end token) even without a
    /// projection, as Flux and SD3 use CLIP-L's.
    pub fn pooling(mut self) -> Self {
        self.pool_raw = true;
        self
    }

    /// Encodes `ids` (`[batch, tokens]`, u32): the hidden states after layer `layers − skip`
    /// (`skip` 1 is the last layer, 2 the penultimate: the web UI's "clip skip"), through the
    /// final layer norm when `final_norm`; plus the pooled output when the model has a
    /// projection (which always runs every layer).
    pub fn forward(
        &self,
        ids: &Tensor,
        skip: usize,
        final_norm: bool,
    ) -> candle_core::Result<TextOutput> {
        self.forward_with(ids, skip, final_norm, &[])
    }

    /// [`Self::forward`] with textual-inversion vectors in place of the token embeddings at
    /// `fixes` (position, `[n, dim]` vectors; cut at the end of the sequence, as A1111 does).
    pub fn forward_with(
        &self,
        ids: &Tensor,
        skip: usize,
        final_norm: bool,
        fixes: &[(usize, Tensor)],
    ) -> candle_core::Result<TextOutput> {
        let (batch, tokens) = ids.dims2()?;
        let positions = self.position_embedding.narrow(0, 0, tokens)?;
        let mut x = self.token_embedding.forward(ids)?;
        for (at, rows) in fixes {
            let n = rows.dim(0)?.min(tokens.saturating_sub(*at));
            let rows = rows.narrow(0, 0, n)?.to_dtype(x.dtype())?.unsqueeze(0)?;
            let rows = rows.broadcast_as((batch, n, x.dim(2)?))?;
            let tail = x.narrow(1, at + n, tokens - at - n)?;
            x = Tensor::cat(&[&x.narrow(1, 0, *at)?, &rows, &tail], 1)?;
        }
        let mut x = x.broadcast_add(&positions)?;
        let mask = causal_mask(tokens, x.device())?;
        let keep = self.layers.len() + 1 - skip.clamp(1, self.layers.len());
        let mut hidden = None;
        let run = if self.projection.is_some() || self.pool_raw {
            self.layers.len()
        } else {
            keep
        };
        for (i, layer) in self.layers[..run].iter().enumerate() {
            x = self.layer(layer, &x, &mask, batch, tokens)?;
            if i + 1 == keep {
                hidden = Some(x.clone());
            }
        }
        let hidden = hidden.unwrap_or_else(|| x.clone());
        let hidden = match final_norm {
            true => self.final_norm.forward(&hidden)?,
            false => hidden,
        };
        let pooled = match (&self.projection, self.pool_raw) {
            (None, false) => None,
            (projection, _) => {
                let last = self.final_norm.forward(&x)?;
                // The end token has the largest id of each row: its first occurrence (the
                // padding may repeat it).
                let rows = ids
                    .to_vec2::<u32>()?
                    .iter()
                    .enumerate()
                    .map(|(b, row)| {
                        let max = row.iter().copied().max().unwrap_or(0);
                        let end = row.iter().position(|&t| t == max).unwrap_or(0);
                        last.get(b)?.get(end)?.unsqueeze(0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let rows = Tensor::cat(&rows, 0)?;
                Some(match projection {
                    Some(p) => p.forward(&rows)?,
                    None => rows,
                })
            }
        };
        Ok(TextOutput { hidden, pooled })
    }

    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        mask: &Tensor,
        batch: usize,
        tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let (heads, dim) = (self.config.heads, self.config.dim);
        let head_dim = dim / heads;
        let h = l.norm1.forward(x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, tokens, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((l.q.forward(&h)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(l.k.forward(&h)?)?;
        let v = split(l.v.forward(&h)?)?;
        let scores = matmul(&q.to_dtype(DType::F32)?, &k.to_dtype(DType::F32)?, true)?
            .broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let attn = matmul(&weights, &v, false)?
            .transpose(1, 2)?
            .reshape((batch, tokens, dim))?;
        let x = (x + l.out.forward(&attn)?)?;
        let h = l.fc1.forward(&l.norm2.forward(&x)?)?;
        let h = match self.config.quick_gelu {
            true => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            false => h.gelu_erf()?,
        };
        x + l.fc2.forward(&h)?
    }
}

/// `[tokens, tokens]` in f32: 0 where a token may attend, −∞ above the diagonal.
fn causal_mask(tokens: usize, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..tokens * tokens)
        .map(|i| match i % tokens > i / tokens {
            true => f32::NEG_INFINITY,
            false => 0.0,
        })
        .collect();
    Tensor::from_vec(v, (tokens, tokens), dev)
}
