//! Text to image for SD1 checkpoints (SD2 and SDXL to come): our CLIP text encoder, candle's
//! U-Net and VAE, all loading straight from the checkpoint through [`CheckpointWeights`],
//! driven by [`sampler`](crate::gen::sampler) with classifier-free guidance. Model shapes are
//! read from the checkpoint, so full-size and `synth --size small` models load alike.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::{unet_2d, vae};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gen::clip::{ClipConfig, ClipTextModel};
use crate::gen::names::{Part, WeightMap};
use crate::gen::sampler::{sample, Sampler, Schedule};
use crate::gen::tokenizer::{ClipTokenizer, Pad};
use crate::gen::weights::CheckpointWeights;

/// The VAE's latent scale for SD1 / SD2.
const LATENT_SCALE: f64 = 0.18215;

/// What to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Request {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative: String,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale.
    pub cfg: f64,
    /// Sampler.
    pub sampler: Sampler,
    /// Seed (image `i` of a batch uses seed + `i`, as the web UI does).
    pub seed: u64,
    /// Width in pixels (a multiple of 8).
    pub width: usize,
    /// Height in pixels (a multiple of 8).
    pub height: usize,
    /// Images.
    pub batch: usize,
    /// CLIP skip (1: the last layer).
    pub clip_skip: usize,
}

/// A loaded SD1 model: text encoder, U-Net and VAE, reused for every image.
pub struct Models {
    clip: ClipTextModel,
    unet: unet_2d::UNet2DConditionModel,
    vae: vae::AutoEncoderKL,
    device: Device,
    dtype: DType,
    schedule: Schedule,
}

fn cerr(e: candle_core::Error) -> Error {
    Error::Invalid(format!("generation: {e}"))
}

/// The shape of a mapped tensor, or an error naming it.
fn shape(ck: &Checkpoint, map: &WeightMap, part: Part, name: &str) -> Result<Vec<usize>> {
    map.get(part, name)
        .and_then(|s| ck.get(&s.key))
        .map(|t| t.shape.clone())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no {part:?} weight `{name}`: not a Stable Diffusion checkpoint?",
                ck.path().display()
            ))
        })
}

impl Models {
    /// Loads an SD1 checkpoint's models on `device` in `dtype`.
    pub fn load(ck: Arc<Checkpoint>, device: &Device, dtype: DType) -> Result<Models> {
        let family = crate::arch::detect(ck.tensors()).family;
        if family != crate::arch::Family::Sd1 {
            return Err(Error::Invalid(format!(
                "{}: generation supports SD1 checkpoints so far, this is {}",
                ck.path().display(),
                family.label()
            )));
        }
        let map = Arc::new(WeightMap::of(&ck));
        let vb =
            |part| CheckpointWeights::new(ck.clone(), map.clone(), part).var_builder(dtype, device);
        let te = |n: &str| shape(&ck, &map, Part::TextEncoder, n);
        let token = te("text_model.embeddings.token_embedding.weight")?;
        let layers = map
            .names(Part::TextEncoder)
            .filter(|n| n.ends_with(".layer_norm1.weight"))
            .count();
        let clip_config = ClipConfig {
            vocab: token[0],
            dim: token[1],
            layers,
            heads: (token[1] / 64).max(1),
            intermediate: te("text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            positions: te("text_model.embeddings.position_embedding.weight")?[0],
            quick_gelu: true,
        };
        let clip = ClipTextModel::new(vb(Part::TextEncoder), &clip_config, false).map_err(cerr)?;
        let c0 = shape(&ck, &map, Part::Unet, "conv_in.weight")?[0];
        let context = shape(
            &ck,
            &map,
            Part::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        )?[1];
        let block = |mult: usize, attn: bool| unet_2d::BlockConfig {
            out_channels: c0 * mult,
            use_cross_attn: attn.then_some(1),
            attention_head_dim: 8,
        };
        let unet_config = unet_2d::UNet2DConditionModelConfig {
            blocks: vec![
                block(1, true),
                block(2, true),
                block(4, true),
                block(4, false),
            ],
            center_input_sample: false,
            cross_attention_dim: context,
            downsample_padding: 1,
            flip_sin_to_cos: true,
            freq_shift: 0.,
            layers_per_block: 2,
            mid_block_scale_factor: 1.,
            norm_eps: 1e-5,
            norm_num_groups: 32,
            sliced_attention_size: None,
            use_linear_projection: false,
        };
        let unet = unet_2d::UNet2DConditionModel::new(vb(Part::Unet), 4, 4, false, unet_config)
            .map_err(cerr)?;
        let v0 = shape(&ck, &map, Part::Vae, "decoder.conv_norm_out.weight")?[0];
        let vae_config = vae::AutoEncoderKLConfig {
            block_out_channels: vec![v0, 2 * v0, 4 * v0, 4 * v0],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
        };
        let vae = vae::AutoEncoderKL::new(vb(Part::Vae), 3, 3, vae_config).map_err(cerr)?;
        Ok(Models {
            clip,
            unet,
            vae,
            device: device.clone(),
            dtype,
            schedule: Schedule::default(),
        })
    }

    /// Text embeddings of a prompt: its 77-token chunks encoded and joined along the tokens.
    fn embed(&self, tok: &ClipTokenizer, text: &str, clip_skip: usize) -> Result<Tensor> {
        let chunks = tok.encode(text, Pad::EndOfText)?;
        let mut out = Vec::new();
        for c in chunks {
            let ids = Tensor::new(c.as_slice(), &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(cerr)?;
            out.push(
                self.clip
                    .forward(&ids, clip_skip, true)
                    .map_err(cerr)?
                    .hidden,
            );
        }
        Tensor::cat(&out, 1).map_err(cerr)
    }

    /// Generates `req.batch` images: 8-bit RGB pixels, `width × height × 3` each.
    pub fn generate(&self, tok: &ClipTokenizer, req: &Request) -> Result<Vec<Vec<u8>>> {
        let ok = |d: usize| d > 0 && d.is_multiple_of(8);
        if !ok(req.width) || !ok(req.height) {
            return Err(Error::Invalid(format!(
                "image size {}x{} is not a multiple of 8",
                req.width, req.height
            )));
        }
        let (cond, uncond) = (
            self.embed(tok, &req.prompt, req.clip_skip)?,
            self.embed(tok, &req.negative, req.clip_skip)?,
        );
        // Prompt and negative prompt may have different numbers of chunks: repeat the
        // shorter one's last chunk, as the web UI pads with empty chunks.
        let (cond, uncond) = match_chunks(cond, uncond)?;
        let context = Tensor::cat(&[uncond, cond], 0)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(cerr)?;
        let (lh, lw) = (req.height / 8, req.width / 8);
        let sigmas = req.sampler.sigmas(&self.schedule, req.steps.max(1));
        // Image b of a batch uses seed + b, as the web UI does, so it can be made alone.
        let normal = |key: &str, seed: u64| -> Result<Tensor> {
            let mut v = vec![0f32; 4 * lh * lw];
            crate::noise::fill_normal("mergesmith-gen-v1", seed, key, 0, &mut v);
            Tensor::from_vec(v, (1, 4, lh, lw), &self.device).map_err(cerr)
        };
        let mut images = Vec::new();
        for b in 0..req.batch.max(1) {
            let b = req.seed.wrapping_add(b as u64);
            let x = (normal("latent", b)? * sigmas[0]).map_err(cerr)?;
            let denoise = |x: &Tensor, sigma: f64| -> Result<Tensor> {
                let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
                let input = (Tensor::cat(&[x, x], 0).map_err(cerr)? * c_in)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(cerr)?;
                let t = self.schedule.timestep(sigma);
                let eps = self
                    .unet
                    .forward(&input, t, &context)
                    .and_then(|e| e.to_dtype(DType::F32))
                    .map_err(cerr)?;
                let (u, c) = (eps.get(0).map_err(cerr)?, eps.get(1).map_err(cerr)?);
                let guided = (&u + ((c - &u).map_err(cerr)? * req.cfg).map_err(cerr)?)
                    .and_then(|g| g.unsqueeze(0))
                    .map_err(cerr)?;
                (x - (guided * sigma).map_err(cerr)?).map_err(cerr)
            };
            let steps = |i: usize| normal(&format!("step{i}"), b);
            let latent = sample(req.sampler, x, &sigmas, denoise, steps)?;
            images.push(self.decode(&latent)?);
        }
        Ok(images)
    }

    /// Decodes one latent to 8-bit RGB, row-major `height × width × 3`.
    fn decode(&self, latent: &Tensor) -> Result<Vec<u8>> {
        let img = (latent / LATENT_SCALE)
            .and_then(|l| l.to_dtype(self.dtype))
            .and_then(|l| self.vae.decode(&l))
            .and_then(|i| i.to_dtype(DType::F32))
            .and_then(|i| ((i + 1.0)? * 127.5)?.clamp(0f32, 255f32))
            .and_then(|i| i.round())
            .and_then(|i| {
                i.get(0)?
                    .permute((1, 2, 0))?
                    .flatten_all()?
                    .to_vec1::<f32>()
            })
            .map_err(cerr)?;
        Ok(img.into_iter().map(|v| v as u8).collect())
    }
}

/// Pads the embeddings with fewer 77-token chunks by repeating its last chunk.
fn match_chunks(a: Tensor, b: Tensor) -> Result<(Tensor, Tensor)> {
    let pad = |t: Tensor, to: usize| -> candle_core::Result<Tensor> {
        let n = t.dim(1)?;
        if n >= to {
            return Ok(t);
        }
        let last = t.narrow(1, n - 77, 77)?;
        let mut parts = vec![t];
        for _ in 0..(to - n) / 77 {
            parts.push(last.clone());
        }
        Tensor::cat(&parts, 1)
    };
    let to = a.dim(1).map_err(cerr)?.max(b.dim(1).map_err(cerr)?);
    Ok((pad(a, to).map_err(cerr)?, pad(b, to).map_err(cerr)?))
}
