//! SD3 / SD3.5's MMDiT, assembled from candle-transformers' public MMDiT parts (embedders,
//! joint blocks, final layer) with its last block built here: candle's own last block
//! projects the text stream's q, k, v without SD3.5's RMS q/k norms, which SAI's reference,
//! ComfyUI and diffusers apply (on a small SD3.5-shaped model that alone moved pixels by up
//! to 15/255). Runs in f16: candle's timestep embedder gives f16.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::mmdit::blocks::{
    DiTBlock, JointBlock, MMDiTJointBlock, MMDiTXJointBlock, QkvOnlyDiTBlock,
};
use candle_transformers::models::mmdit::embedding::{
    PatchEmbedder, PositionEmbedder, TimestepEmbedder, Unpatchifier, VectorEmbedder,
};
use candle_transformers::models::mmdit::model::Config;
use candle_transformers::models::mmdit::projections::Qkv;

/// The last joint block: the image stream in full, the text stream's q, k, v only (its
/// output is not used), with the text stream's q/k norms when the model has them.
struct LastBlock {
    x_block: DiTBlock,
    context_block: QkvOnlyDiTBlock,
    norms: Option<(candle_nn::RmsNorm, candle_nn::RmsNorm)>,
    heads: usize,
}

impl LastBlock {
    fn forward(&self, context: &Tensor, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let mut ctx = self.context_block.pre_attention(context, c)?;
        if let Some((ln_q, ln_k)) = &self.norms {
            let per_head = |t: &Tensor, n: &candle_nn::RmsNorm| -> Result<Tensor> {
                let (b, s, h) = t.dims3()?;
                n.forward(&t.reshape((b, s, self.heads, h / self.heads))?)?
                    .reshape((b, s, h))
            };
            ctx = Qkv {
                q: per_head(&ctx.q, ln_q)?,
                k: per_head(&ctx.k, ln_k)?,
                v: ctx.v,
            };
        }
        let (x_qkv, interm) = self.x_block.pre_attention(x, c)?;
        let n_ctx = ctx.q.dim(1)?;
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
        let joint = Qkv {
            q: cat(&ctx.q, &x_qkv.q)?,
            k: cat(&ctx.k, &x_qkv.k)?,
            v: cat(&ctx.v, &x_qkv.v)?,
        };
        let out = attention(&joint, self.heads)?;
        let x_attn = out.narrow(1, n_ctx, out.dim(1)? - n_ctx)?;
        self.x_block.post_attention(&x_attn, x, &interm)
    }
}

/// Multi-head softmax attention over `[batch, tokens, heads · dim]` q, k, v.
fn attention(qkv: &Qkv, heads: usize) -> Result<Tensor> {
    let (b, s, h) = qkv.q.dims3()?;
    let split = |t: &Tensor| {
        t.reshape((b, s, heads, h / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(&qkv.q)?, split(&qkv.k)?, split(&qkv.v)?);
    let scale = 1.0 / ((h / heads) as f64).sqrt();
    let w = (q.matmul(&k.t()?)? * scale)?;
    let w = candle_nn::ops::softmax_last_dim(&w)?;
    w.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
}

/// A joint block before the last: plain, or MMDiT-X (SD3.5 Medium's second image attention).
enum Block {
    Plain(MMDiTJointBlock),
    X(MMDiTXJointBlock),
}

/// The MMDiT denoiser.
pub struct Mmdit {
    patch: PatchEmbedder,
    position: PositionEmbedder,
    time: TimestepEmbedder,
    vector: VectorEmbedder,
    context: candle_nn::Linear,
    blocks: Vec<Block>,
    last: LastBlock,
    final_layer: candle_transformers::models::mmdit::blocks::FinalLayer,
    unpatch: Unpatchifier,
}

impl Mmdit {
    /// Loads it from `vb` (SAI / ComfyUI names) with `config`'s shape.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Mmdit> {
        let hidden = cfg.head_size * cfg.depth;
        let heads = cfg.depth;
        let blocks = (0..cfg.depth - 1)
            .map(|i| {
                let b = vb.pp(format!("joint_blocks.{i}"));
                Ok(match b.contains_tensor("x_block.attn2.qkv.weight") {
                    true => Block::X(MMDiTXJointBlock::new(hidden, heads, false, b)?),
                    false => Block::Plain(MMDiTJointBlock::new(hidden, heads, false, b)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lb = vb.pp(format!("joint_blocks.{}", cfg.depth - 1));
        let attn = lb.pp("context_block.attn");
        let norms = match attn.contains_tensor("ln_q.weight") {
            true => Some((
                candle_nn::rms_norm(cfg.head_size, 1e-6, attn.pp("ln_q"))?,
                candle_nn::rms_norm(cfg.head_size, 1e-6, attn.pp("ln_k"))?,
            )),
            false => None,
        };
        let last = LastBlock {
            x_block: DiTBlock::new(hidden, heads, lb.pp("x_block"))?,
            context_block: QkvOnlyDiTBlock::new(hidden, heads, lb.pp("context_block"))?,
            norms,
            heads,
        };
        Ok(Mmdit {
            patch: PatchEmbedder::new(
                cfg.patch_size,
                cfg.in_channels,
                hidden,
                vb.pp("x_embedder"),
            )?,
            position: PositionEmbedder::new(
                hidden,
                cfg.patch_size,
                cfg.pos_embed_max_size,
                vb.clone(),
            )?,
            time: TimestepEmbedder::new(hidden, cfg.frequency_embedding_size, vb.pp("t_embedder"))?,
            vector: VectorEmbedder::new(cfg.adm_in_channels, hidden, vb.pp("y_embedder"))?,
            context: candle_nn::linear(cfg.context_embed_size, hidden, vb.pp("context_embedder"))?,
            blocks,
            last,
            final_layer: candle_transformers::models::mmdit::blocks::FinalLayer::new(
                hidden,
                cfg.patch_size,
                cfg.out_channels,
                vb.pp("final_layer"),
            )?,
            unpatch: Unpatchifier::new(cfg.patch_size, cfg.out_channels)?,
        })
    }

    /// The model's output for latent `x` (`[1, c, h, w]`) at timestep `t` (f32, σ · 1000),
    /// pooled text `y` and context tokens `context`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let pos = self.position.get_cropped_pos_embed(h, w)?;
        let mut x = self.patch.forward(x)?.broadcast_add(&pos)?;
        let c = (self.time.forward(t)? + self.vector.forward(y)?)?;
        let mut ctx = self.context.forward(context)?;
        for block in &self.blocks {
            (ctx, x) = match block {
                Block::Plain(b) => b.forward(&ctx, &x, &c)?,
                Block::X(b) => b.forward(&ctx, &x, &c)?,
            };
        }
        let x = self.last.forward(&ctx, &x, &c)?;
        let x = self.final_layer.forward(&x, &c)?;
        let x = self.unpatch.unpatchify(&x, h, w)?;
        x.narrow(2, 0, h)?.narrow(3, 0, w)
    }
}
