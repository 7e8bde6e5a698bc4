//! Text to image for SD1, SD2 and SDXL checkpoints: our CLIP text encoders, our U-Net on
//! candle's blocks ([`Unet`]) and candle's VAE, all loading straight from the checkpoint
//! through [`CheckpointWeights`], driven by [`sampler`](crate::gen::sampler) with
//! classifier-free guidance, plus A1111's hires fix (the latent upscaled bilinearly, then
//! denoised again from part way down the schedule). Model shapes are read from the checkpoint,
//! so full-size and `synth --size small` models load alike.
//!
//! Text conditioning follows the web UI per family:
//! - SD1: CLIP-L, the hidden state `clip_skip` layers from the end, through the final norm.
//! - SD2: OpenCLIP ViT-H, always the penultimate layer through the final norm (A1111 ignores
//!   clip skip for SD2).
//! - SDXL: CLIP-L and OpenCLIP bigG, both penultimate without the final norm, concatenated
//!   (768 + 1280 = 2048 wide); bigG's pooled, projected end token of the first chunk and the
//!   time ids (size, crop 0, target size = the pass's image size) feed the U-Net's added
//!   embedding.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::gen::bf16::Precision;

use crate::arch::names::{Part, WeightMap};
use crate::arch::Family;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gen::clip::{ClipConfig, ClipTextModel};
use crate::gen::dit::DitModels;
use crate::gen::embedding::{Embedding, Slot};
use crate::gen::job::Job;
use crate::gen::noise::ImageNoise;
use crate::gen::prompt::{self, Emphasis};
use crate::gen::sampler::{sample, Schedule};
use crate::gen::textmemo::TextIdentity;
use crate::gen::timing::{Clock, Phase, Timings};
use crate::gen::tokenizer::{ClipTokenizer, Pad};
use crate::gen::unet::{Unet, UnetConfig, TIME_IDS};
use crate::gen::vae::VaeDecoder;
use crate::gen::weights::CheckpointWeights;

/// What the model's output predicts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise (SD1, SD2-base, SDXL).
    Epsilon,
    /// The "velocity" (SD2 768-v, v-prediction fine-tunes).
    V,
}

impl crate::text::Named for Prediction {
    const NAMES: &'static [(&'static str, Self)] =
        &[("epsilon", Prediction::Epsilon), ("v", Prediction::V)];
}

/// The text encoders of a family.
enum TextEncoders {
    /// SD1: CLIP-L.
    Sd1(ClipTextModel),
    /// SD2: OpenCLIP ViT-H.
    Sd2(ClipTextModel),
    /// SDXL: CLIP-L and OpenCLIP bigG (with its projection).
    Sdxl(ClipTextModel, ClipTextModel),
}

/// A prompt's conditioning: `[1, tokens, width]` hidden states, and SDXL's pooled embedding.
struct Cond {
    context: Tensor,
    pooled: Option<Tensor>,
}

/// A loaded model of any family generation runs: SD's U-Net pipelines or the flow
/// transformers ([`DitModels`]: Flux, SD3).
pub enum Models {
    /// SD1, SD2, SDXL.
    Unet(Box<UnetModels>),
    /// Flux, SD3 / SD3.5.
    Dit(Box<DitModels>),
}

impl Models {
    /// Loads a checkpoint's models where `device` says (the CPU unless it names CUDA): on the
    /// CPU in f32, with bf16 products on AMX under `precision` bf16 (SD1, SD2, SDXL); on a GPU
    /// f16 for SD (bf16 under `precision` bf16), bf16 for the flow transformers (Flux overflows
    /// f16).
    pub fn load_on(
        ck: Arc<Checkpoint>,
        components: &crate::gen::job::Components,
        device: crate::device::ComputeDevice,
        precision: Precision,
    ) -> Result<Models> {
        let device = device.candle()?.unwrap_or(Device::Cpu);
        let family = crate::arch::detect(ck.tensors()).family;
        let dit = crate::gen::dit::Kind::of(family).is_some();
        let (dtype, precision) = match (device.is_cuda(), dit, precision) {
            (false, _, p) => (DType::F32, p),
            (true, false, Precision::F32) => (DType::F16, Precision::F32),
            (true, _, _) => (DType::BF16, Precision::F32),
        };
        Self::load_with(ck, components, &device, dtype, precision)
    }

    /// Loads a checkpoint's models on `device` in `dtype` (VAEs in f32).
    pub fn load(ck: Arc<Checkpoint>, device: &Device, dtype: DType) -> Result<Models> {
        Self::load_with(ck, &Default::default(), device, dtype, Precision::F32)
    }

    /// [`Self::load`] with text encoders and a VAE from files of their own (Flux, SD3), and
    /// the CPU's `precision` (bf16: SD's U-Net and VAE products on AMX).
    pub fn load_with(
        ck: Arc<Checkpoint>,
        components: &crate::gen::job::Components,
        device: &Device,
        dtype: DType,
        precision: Precision,
    ) -> Result<Models> {
        let arch = crate::arch::detect(ck.tensors());
        check_arch(&arch).map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
        crate::checkpoint::quant::Quant::require_plain(&ck, "generation")?;
        let bf16 = precision.bf16_on_cpu().map_err(Error::Invalid)?;
        crate::gen::cpu::keep_freed_memory();
        if bf16 && !device.is_cpu() {
            return Err(Error::Invalid(
                "precision bf16 with our kernels runs on the CPU; on a GPU load the model in \
                 bf16 instead"
                    .into(),
            ));
        }
        Ok(match crate::gen::dit::Kind::of(arch.family) {
            Some(_) if bf16 => {
                return Err(Error::Invalid(format!(
                    "{}: precision bf16 on the CPU serves SD1, SD2 and SDXL; Flux and SD3 run \
                     in f32 there (precision f32)",
                    ck.path().display()
                )))
            }
            Some(_) => Models::Dit(Box::new(DitModels::load(ck, components, device, dtype)?)),
            None if !components.is_empty() => {
                return Err(Error::Invalid(format!(
                    "{}: separate text-encoder and VAE files apply to Flux and SD3 models",
                    ck.path().display()
                )))
            }
            None => Models::Unet(Box::new(UnetModels::load(ck, device, dtype, precision)?)),
        })
    }

    /// The model family.
    pub fn family(&self) -> Family {
        match self {
            Models::Unet(m) => m.family(),
            Models::Dit(m) => m.family(),
        }
    }

    /// What an SD model predicts (see [`UnetModels::prediction`]); flow transformers give
    /// `None` (they predict the velocity).
    pub fn prediction(&self) -> Option<Prediction> {
        match self {
            Models::Unet(m) => Some(m.prediction()),
            Models::Dit(_) => None,
        }
    }

    /// Whether the model takes a distilled guidance (Flux dev), which PNG info records.
    pub fn takes_guidance(&self) -> bool {
        matches!(self, Models::Dit(m) if m.takes_guidance())
    }

    /// The size the family was trained at.
    pub fn native_size(&self) -> usize {
        match self {
            Models::Unet(m) => m.native_size(),
            Models::Dit(m) => m.native_size(),
        }
    }

    /// Generates the images of `job` (one per seed): 8-bit RGB pixels, row-major
    /// `height × width × 3` each, at [`Job::output_size`].
    pub fn generate(&self, tok: &ClipTokenizer, job: &Job) -> Result<Vec<Vec<u8>>> {
        match self {
            Models::Unet(m) => m.generate(tok, job),
            Models::Dit(m) => m.generate(tok, job),
        }
    }

    /// Generates image `index` of `job`'s batch alone.
    pub fn generate_image(&self, tok: &ClipTokenizer, job: &Job, index: usize) -> Result<Vec<u8>> {
        match self {
            Models::Unet(m) => m.generate_image(tok, job, index),
            Models::Dit(m) => m.generate_image(tok, job, index),
        }
    }

    /// Where the model's prompt encodings are kept, and under which text identity (one of
    /// its own unless set).
    pub fn set_text_identity(&mut self, text: TextIdentity) {
        match self {
            Models::Unet(m) => m.text_id = text,
            Models::Dit(m) => m.text_id = text,
        }
    }

    /// Where its generation time went so far (`load` left at 0: the caller times loading).
    pub fn timings(&self) -> Timings {
        match self {
            Models::Unet(m) => m.clock.totals(),
            Models::Dit(m) => m.clock.totals(),
        }
    }

    /// The checkpoint keys the model's text encoders read (those in separate files not
    /// included: they are part of the components).
    pub fn text_keys(&self) -> Vec<String> {
        match self {
            Models::Unet(m) => m.text_keys.clone(),
            Models::Dit(m) => m.text_keys(),
        }
    }
}

/// A loaded SD model: text encoder(s), U-Net and VAE, reused for every image.
pub struct UnetModels {
    family: Family,
    text: TextEncoders,
    /// The checkpoint keys `text` was loaded from.
    text_keys: Vec<String>,
    text_id: TextIdentity,
    unet: Unet,
    vae: VaeDecoder,
    device: Device,
    dtype: DType,
    schedule: Schedule,
    prediction: Prediction,
    clock: Clock,
}

/// A candle error as a generation error.
pub(crate) fn cerr(e: candle_core::Error) -> Error {
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

/// Whether text to image can run on a checkpoint of this architecture, or why not.
pub fn check_arch(arch: &crate::arch::Arch) -> std::result::Result<(), String> {
    let supported = match crate::gen::dit::Kind::of(arch.family) {
        Some(kind) => kind.variants().contains(&arch.variant.id),
        None => {
            Pipeline::of(arch.family).is_some() && arch.variant == crate::arch::Variant::STANDARD
        }
    };
    if !supported {
        return Err(format!(
            "generation supports standard (not inpainting / instruct) SD1, SD2 and SDXL, \
             Flux.1 dev and schnell, and SD3 / SD3.5 checkpoints; this is {} {} ({})",
            arch.family.label(),
            arch.variant.label.unwrap_or(""),
            arch.rule
        ));
    }
    Ok(())
}

/// The VAE's latent scale (the family's `latent_scale` fact; SD's when it has none).
fn latent_scale(family: Family) -> f64 {
    family.facts().latent_scale.unwrap_or(0.18215)
}

/// The pipeline a family's `generation` code hook names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipeline {
    /// CLIP-L, 768-dim context.
    Sd1,
    /// OpenCLIP-H, 1024-dim context, v or eps.
    Sd2,
    /// CLIP-L + OpenCLIP-bigG with pooled size conditioning.
    Sdxl,
}

impl Pipeline {
    fn of(family: Family) -> Option<Pipeline> {
        match family.code().generation.as_deref()? {
            "sd1" => Some(Pipeline::Sd1),
            "sd2" => Some(Pipeline::Sd2),
            "sdxl" => Some(Pipeline::Sdxl),
            _ => None,
        }
    }
}

/// SDXL conditions on CLIP-L's 11th layer (the penultimate of 12); some files drop the 12th,
/// which nothing uses.
const SDXL_CLIP_L_LAYER: usize = 11;

/// The spread of this norm bias tells SD2 768-v from SD2-base (ComfyUI's rule: v-prediction
/// when its standard deviation is above 0.09).
const SD2_V_PROBE: &str =
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";

impl UnetModels {
    /// Loads a checkpoint's models on `device`: text encoders and U-Net in `dtype`, the VAE
    /// in f32 (SDXL's VAE overflows in f16); the U-Net's and VAE's products in bf16 on AMX
    /// under `precision` bf16 (f32 CPU models only).
    /// ([`Models::load`] checks the architecture and the storage first.)
    pub fn load(
        ck: Arc<Checkpoint>,
        device: &Device,
        dtype: DType,
        precision: Precision,
    ) -> Result<UnetModels> {
        let arch = crate::arch::detect(ck.tensors());
        let family = arch.family;
        let map = Arc::new(WeightMap::of(&ck));
        let vb = |part, dtype| {
            CheckpointWeights::new(ck.clone(), map.clone(), part).var_builder(dtype, device)
        };
        let clip = |part: Part, quick_gelu: bool, projection: bool| -> Result<ClipTextModel> {
            let config = clip_config(&ck, &map, part, quick_gelu)?;
            ClipTextModel::new(vb(part, dtype), &config, projection).map_err(cerr)
        };
        let pipeline = Pipeline::of(family).unwrap_or(Pipeline::Sdxl);
        let (text, pooled) = match pipeline {
            Pipeline::Sd1 => (
                TextEncoders::Sd1(clip(Part::TextEncoder, true, false)?),
                None,
            ),
            Pipeline::Sd2 => (
                TextEncoders::Sd2(clip(Part::TextEncoder, false, false)?),
                None,
            ),
            _ => {
                let proj = shape(&ck, &map, Part::TextEncoder2, "text_projection.weight")?;
                (
                    TextEncoders::Sdxl(
                        clip(Part::TextEncoder, true, false)?,
                        clip(Part::TextEncoder2, false, true)?,
                    ),
                    Some(proj[0]),
                )
            }
        };
        let unet_shape = |name: &str| {
            map.get(Part::Unet, name)
                .and_then(|s| ck.get(&s.key))
                .map(|t| t.shape.clone())
        };
        let head_dim = (pipeline != Pipeline::Sd1).then_some(64);
        let unet_config = UnetConfig::read(unet_shape, head_dim, pooled)
            .map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
        let unet = Unet::new(vb(Part::Unet, dtype), unet_config, precision).map_err(cerr)?;
        let v0 = shape(&ck, &map, Part::Vae, "decoder.conv_norm_out.weight")?[0];
        let vae = VaeDecoder::new(
            vb(Part::Vae, DType::F32),
            &[v0, 2 * v0, 4 * v0, 4 * v0],
            4,
            precision,
        )
        .map_err(cerr)?;
        let prediction = guess_prediction(&ck, family)?;
        let text_keys = [Part::TextEncoder, Part::TextEncoder2]
            .into_iter()
            .flat_map(|part| {
                map.names(part)
                    .filter_map(|n| map.get(part, n).map(|s| s.key.clone()))
                    .collect::<Vec<_>>()
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(UnetModels {
            family,
            text,
            text_keys,
            text_id: TextIdentity::unique(),
            unet,
            vae,
            device: device.clone(),
            dtype,
            schedule: Schedule::default(),
            prediction,
            clock: Clock::default(),
        })
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// What the file's model predicts, as far as the file tells: v-prediction when it has a
    /// `v_pred` marker tensor (as v-prediction SDXL fine-tunes ship) or is an SD2 768-v model
    /// by ComfyUI's rule; noise otherwise. A request's `prediction` overrides it.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// The size the family was trained at: 512 (SD1, SD2-base), 768 (SD2 768-v), 1024 (SDXL).
    pub fn native_size(&self) -> usize {
        match (Pipeline::of(self.family), self.prediction) {
            (Some(Pipeline::Sdxl), _) => 1024,
            (Some(Pipeline::Sd2), Prediction::V) => 768,
            _ => 512,
        }
    }

    /// Encodes a prompt chunk by chunk (A1111's 75-token chunks, weights applied per
    /// `emphasis`), joining the chunks along the tokens.
    fn encode(
        &self,
        tok: &ClipTokenizer,
        text: &str,
        job: &Job,
        embeddings: &[Embedding],
    ) -> Result<Cond> {
        let (clip_skip, emphasis) = (job.clip_skip, job.emphasis);
        let pieces = prompt::parse(text, emphasis)?;
        let names = embeddings
            .iter()
            .map(|e| {
                let rows = e.parts.first().map_or(0, |p| p.1);
                Ok((tok.ids(&e.name)?, rows))
            })
            .collect::<Result<Vec<_>>>()?;
        let run = |model: &ClipTextModel, pad: Pad, skip: usize, norm: bool, slot: Slot| {
            let how = ClipPass {
                pad,
                skip,
                norm,
                slot,
                emphasis,
            };
            clip_encode(&self.device, tok, model, &pieces, (&names, embeddings), how)
        };
        Ok(match &self.text {
            TextEncoders::Sd1(m) => Cond {
                context: run(m, Pad::EndOfText, clip_skip.max(1), true, Slot::Any)?.0,
                pooled: None,
            },
            TextEncoders::Sd2(m) => Cond {
                context: run(m, Pad::Zero, 2, true, Slot::Any)?.0,
                pooled: None,
            },
            TextEncoders::Sdxl(l, g) => {
                let skip_l = (l.layers() + 1).saturating_sub(SDXL_CLIP_L_LAYER).max(1);
                let (hl, _) = run(l, Pad::EndOfText, skip_l, false, Slot::ClipL)?;
                let (hg, pooled) = run(g, Pad::Zero, 2, false, Slot::ClipG)?;
                Cond {
                    context: Tensor::cat(&[hl, hg], 2).map_err(cerr)?,
                    pooled,
                }
            }
        })
    }

    /// Generates the images of `job` (one per seed): 8-bit RGB pixels, row-major
    /// `height × width × 3` each, at [`Job::output_size`] (sizes left open are the model's
    /// native size).
    pub fn generate(&self, tok: &ClipTokenizer, job: &Job) -> Result<Vec<Vec<u8>>> {
        let conds = self.conditioning(tok, job)?;
        (0..job.batch)
            .map(|i| self.render(job, &conds, i))
            .collect()
    }

    /// Generates image `index` of `job`'s batch alone.
    pub fn generate_image(&self, tok: &ClipTokenizer, job: &Job, index: usize) -> Result<Vec<u8>> {
        let conds = self.conditioning(tok, job)?;
        self.render(job, &conds, index)
    }

    /// The prompt's and the negative prompt's conditioning, in the model's dtype: kept in
    /// the model's text memo under what the encoding reads.
    fn conditioning(&self, tok: &ClipTokenizer, job: &Job) -> Result<Arc<[Cond; 2]>> {
        let (width, height) = job.size(self.native_size());
        check(job, width, height)?;
        let key = self.text_id.key(
            "unet-v1",
            &[
                &job.prompt,
                &job.negative,
                &job.clip_skip.to_string(),
                &format!("{:?}", job.emphasis),
                &format!("{:?}", job.embeddings),
                &format!("{:?} {:?}", self.dtype, self.device.location()),
            ],
        );
        let encode = || self.clock.time(Phase::Text, || self.encode_both(tok, job));
        self.text_id.memo.get_or(key, encode)
    }

    /// [`Self::conditioning`], encoded.
    fn encode_both(&self, tok: &ClipTokenizer, job: &Job) -> Result<[Cond; 2]> {
        let cast = |c: Cond| -> Result<Cond> {
            Ok(Cond {
                context: c.context.to_dtype(self.dtype).map_err(cerr)?,
                pooled: match c.pooled {
                    Some(p) => Some(p.to_dtype(self.dtype).map_err(cerr)?),
                    None => None,
                },
            })
        };
        let embeddings = job
            .embeddings
            .iter()
            .map(Embedding::load)
            .collect::<Result<Vec<_>>>()?;
        Ok([
            cast(self.encode(tok, &job.negative, job, &embeddings)?)?,
            cast(self.encode(tok, &job.prompt, job, &embeddings)?)?,
        ])
    }

    /// Image `index` of `job`'s batch from its conditioning `[negative, positive]`.
    fn render(&self, job: &Job, conds: &[Cond; 2], index: usize) -> Result<Vec<u8>> {
        let (width, height) = job.size(self.native_size());
        let pass = Pass {
            models: self,
            job,
            prediction: job.prediction.unwrap_or(self.prediction),
            conds,
        };
        let (lw, lh) = (width / 8, height / 8);
        let sigmas = job
            .sampler
            .sigmas(&self.schedule, job.schedule, job.steps)?;
        let mut noise = job.noise.image(job.seed, index, job.batch, 4 * lw * lh);
        let scale = job.noise.start_scale(
            job.sampler.starts_from_unit_noise(),
            sigmas[0],
            self.schedule.sigma_max(),
        );
        let x = (self.latent(noise.initial(), lw, lh)? * scale).map_err(cerr)?;
        let mut latent = pass.run(x, &sigmas, &mut noise)?;
        if let Some(h) = &job.hires {
            let (w, h2) = job.output_size(self.native_size());
            let up = upscale_latent(&latent, w / 8, h2 / 8)?;
            let steps = match h.steps {
                0 => job.steps,
                n => n as usize,
            };
            let sigmas = hires_sigmas(job, &self.schedule, steps, h.strength)?;
            // A1111 makes a new generator for the second pass, of the same seed.
            let mut noise = job
                .noise
                .image(job.seed, index, job.batch, 4 * (w / 8) * (h2 / 8));
            let fresh = (self.latent(noise.initial(), w / 8, h2 / 8)? * sigmas[0]).map_err(cerr)?;
            latent = pass.run((up + fresh).map_err(cerr)?, &sigmas, &mut noise)?;
        }
        self.decode(&latent)
    }

    /// A `[1, 4, lh, lw]` latent of `values`.
    fn latent(&self, values: Vec<f32>, lw: usize, lh: usize) -> Result<Tensor> {
        Tensor::from_vec(values, (1, 4, lh, lw), &self.device).map_err(cerr)
    }

    /// Decodes one latent to 8-bit RGB, row-major `height × width × 3`.
    fn decode(&self, latent: &Tensor) -> Result<Vec<u8>> {
        self.clock.time(Phase::Decode, || {
            let img = (latent / latent_scale(self.family))
                .and_then(|l| l.to_dtype(DType::F32))
                .and_then(|l| self.vae.decode(&l))
                .map_err(cerr)?;
            to_rgb(&img)
        })
    }
}

/// A decoded `[1, 3, h, w]` image in [−1, 1] as 8-bit RGB, row-major `h × w × 3`.
pub(crate) fn to_rgb(img: &Tensor) -> Result<Vec<u8>> {
    let img = (img + 1.0)
        .and_then(|i| i * 127.5)
        .and_then(|i| i.clamp(0f32, 255f32))
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

/// One denoising pass's fixed inputs.
struct Pass<'a> {
    models: &'a UnetModels,
    job: &'a Job,
    prediction: Prediction,
    /// The negative and the positive prompt's conditioning.
    conds: &'a [Cond; 2],
}

impl Pass<'_> {
    /// Samples from `x` (noise at `sigmas[0]`) down `sigmas`, drawing step noise from
    /// `noise`. A walk that ends above σ = 0 (A1111's DDIM) returns the latent in the
    /// model's own units (`x / √(1 + σ²)`), as the UI decodes it.
    fn run(&self, x: Tensor, sigmas: &[f64], noise: &mut ImageNoise) -> Result<Tensor> {
        let m = self.models;
        let (lh, lw) = (x.dim(2).map_err(cerr)?, x.dim(3).map_err(cerr)?);
        // SDXL's time ids: original size, crop (0, 0), target size, as (height, width).
        let (h, w) = ((lh * 8) as f32, (lw * 8) as f32);
        let ids =
            Tensor::from_vec(vec![h, w, 0.0, 0.0, h, w], (1, TIME_IDS), &m.device).map_err(cerr)?;
        let [uncond, cond] = self.conds;
        // Both prompts in one batch of two when their token counts agree; otherwise one
        // U-Net call each, as A1111 does (no padding with repeated chunks).
        let same = uncond.context.dims() == cond.context.dims();
        let both = match same {
            true => Some(Cond {
                context: Tensor::cat(&[&uncond.context, &cond.context], 0).map_err(cerr)?,
                pooled: match (&uncond.pooled, &cond.pooled) {
                    (Some(u), Some(c)) => Some(Tensor::cat(&[u, c], 0).map_err(cerr)?),
                    _ => None,
                },
            }),
            false => None,
        };
        let ids2 = Tensor::cat(&[&ids, &ids], 0).map_err(cerr)?;
        let unet = |input: &Tensor, t: f64, c: &Cond, ids: &Tensor| -> Result<Tensor> {
            let added = c.pooled.as_ref().map(|p| (p, ids));
            m.unet
                .forward(input, t, &c.context, added)
                .and_then(|e| e.to_dtype(DType::F32))
                .map_err(cerr)
        };
        let step = |x: &Tensor, sigma: f64| -> Result<Tensor> {
            crate::progress::sampling_step()?;
            let scale = (sigma * sigma + 1.0).sqrt();
            let input = (x / scale)
                .and_then(|t| t.to_dtype(m.dtype))
                .map_err(cerr)?;
            let t = m.schedule.timestep(sigma);
            let (u, c) = match &both {
                Some(b) => {
                    let two = Tensor::cat(&[&input, &input], 0).map_err(cerr)?;
                    let out = unet(&two, t, b, &ids2)?;
                    (
                        out.narrow(0, 0, 1).map_err(cerr)?,
                        out.narrow(0, 1, 1).map_err(cerr)?,
                    )
                }
                None => (unet(&input, t, uncond, &ids)?, unet(&input, t, cond, &ids)?),
            };
            let guided =
                (&u + ((c - &u).map_err(cerr)? * self.job.cfg).map_err(cerr)?).map_err(cerr)?;
            denoised(self.prediction, x, &guided, sigma)
        };
        let denoise = |x: &Tensor, sigma: f64| m.clock.time(Phase::Step, || step(x, sigma));
        let shape = (1, 4, lh, lw);
        let draw = || Tensor::from_vec(noise.step(), shape, &m.device).map_err(cerr);
        let out = sample(self.job.sampler, x, sigmas, denoise, draw)?;
        match sigmas.last() {
            Some(&end) if end > 0.0 => (out / (1.0 + end * end).sqrt()).map_err(cerr),
            _ => Ok(out),
        }
    }
}

/// How one CLIP encoder reads a prompt.
pub(crate) struct ClipPass {
    /// Padding of each chunk.
    pub pad: Pad,
    /// Clip skip (1: the last layer).
    pub skip: usize,
    /// Through the final layer norm.
    pub norm: bool,
    /// Which vectors of an embedding file apply.
    pub slot: Slot,
    /// How weights apply.
    pub emphasis: Emphasis,
}

/// Encodes parsed `pieces` with one CLIP text encoder in A1111's 75-token chunks, weights
/// applied per `how.emphasis`, textual-inversion `embeddings` (with their token-id `names`)
/// placed: the chunks' hidden states joined along the tokens, and the first chunk's pooled
/// output when the model gives one.
pub(crate) fn clip_encode(
    device: &Device,
    tok: &ClipTokenizer,
    model: &ClipTextModel,
    pieces: &[prompt::Piece],
    (names, embeddings): (&[(Vec<u32>, usize)], &[Embedding]),
    how: ClipPass,
) -> Result<(Tensor, Option<Tensor>)> {
    let ClipPass {
        pad,
        skip,
        norm,
        slot,
        emphasis,
    } = how;
    let ids = |chunk: &[u32]| {
        Tensor::new(chunk, device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(cerr)
    };
    let chunks = tok.encode_weighted(pieces, pad, names)?;
    // ComfyUI weighs against the empty prompt's encoding.
    let empty = match emphasis {
        Emphasis::Comfyui => {
            let empty = [prompt::Piece::Text(String::new(), 1.0)];
            let e = tok.encode_weighted(&empty, pad, &[])?;
            Some(
                model
                    .forward(&ids(&e[0].ids)?, skip, norm)
                    .map_err(cerr)?
                    .hidden,
            )
        }
        _ => None,
    };
    let mut hidden = Vec::new();
    let mut pooled = None;
    for chunk in chunks {
        let fixes = chunk
            .fixes
            .iter()
            .map(|&(at, e)| {
                let emb = &embeddings[e];
                let width = model.width();
                let (rows, values) = emb.for_encoder(slot, width).ok_or_else(|| {
                    Error::Invalid(format!(
                        "embedding `{}` has no vectors for this model's {width}-wide text encoder",
                        emb.name
                    ))
                })?;
                let t = Tensor::from_slice(values, (rows, width), device).map_err(cerr)?;
                Ok((at, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = model
            .forward_with(&ids(&chunk.ids)?, skip, norm, &fixes)
            .map_err(cerr)?;
        hidden.push(weigh(out.hidden, &chunk.weights, emphasis, empty.as_ref())?);
        // The web UI takes the pooled embedding of the first chunk.
        pooled = pooled.or(out.pooled);
    }
    let hidden = Tensor::cat(&hidden, 1).map_err(cerr)?;
    Ok((hidden, pooled))
}

/// Applies a chunk's token `weights` to its hidden states `z` (`[1, 77, width]`) per
/// `emphasis`: A1111 multiplies and restores the chunk's mean (or not, for `no_norm`);
/// ComfyUI moves each weighted token away from the empty prompt's encoding `empty`.
pub fn weigh(
    z: Tensor,
    weights: &[f32],
    emphasis: Emphasis,
    empty: Option<&Tensor>,
) -> Result<Tensor> {
    if emphasis == Emphasis::None || weights.iter().all(|&w| w == 1.0) {
        return Ok(z);
    }
    let dev = z.device().clone();
    let n = weights.len();
    let w = Tensor::from_slice(weights, (1, n, 1), &dev)
        .and_then(|w| w.to_dtype(z.dtype()))
        .map_err(cerr)?;
    let scaled = z.broadcast_mul(&w).map_err(cerr)?;
    match (emphasis, empty) {
        (Emphasis::A1111, _) => {
            let mean = |t: &Tensor| {
                t.mean_all()
                    .and_then(|m| m.to_dtype(DType::F32))
                    .and_then(|m| m.to_scalar::<f32>())
                    .map_err(cerr)
            };
            let (before, after) = (mean(&z)?, mean(&scaled)?);
            (scaled * (before / after) as f64).map_err(cerr)
        }
        (Emphasis::Comfyui, Some(e)) => {
            // empty + (z − empty)·w where w ≠ 1; z itself elsewhere.
            let moved = (z.broadcast_sub(e).and_then(|d| d.broadcast_mul(&w)))
                .and_then(|d| d.broadcast_add(e))
                .map_err(cerr)?;
            let mask: Vec<u8> = weights.iter().map(|&w| u8::from(w != 1.0)).collect();
            Tensor::from_vec(mask, (1, n, 1), &dev)
                .and_then(|m| m.broadcast_as(z.shape()))
                .and_then(|m| m.where_cond(&moved, &z))
                .map_err(cerr)
        }
        _ => Ok(scaled),
    }
}

/// The clean-latent estimate from the model's output `out` for `x` at noise level `sigma`
/// (k-diffusion's denoisers): `x − σ·ε` for ε-prediction; `x / (σ² + 1) − v · σ / √(σ² + 1)`
/// for v-prediction.
pub fn denoised(prediction: Prediction, x: &Tensor, out: &Tensor, sigma: f64) -> Result<Tensor> {
    let scale = (sigma * sigma + 1.0).sqrt();
    match prediction {
        Prediction::Epsilon => (x - (out * sigma).map_err(cerr)?).map_err(cerr),
        Prediction::V => ((x / (scale * scale)).map_err(cerr)?
            - (out * (sigma / scale)).map_err(cerr)?)
        .map_err(cerr),
    }
}

/// Rejects requests the pipeline cannot run, saying why.
fn check(job: &Job, width: usize, height: usize) -> Result<()> {
    let ok = |d: usize| d > 0 && d.is_multiple_of(8);
    if !ok(width) || !ok(height) {
        return Err(Error::Invalid(format!(
            "image size {width}x{height} is not a multiple of 8"
        )));
    }
    if job.steps == 0 {
        return Err(Error::Invalid("steps must be at least 1".into()));
    }
    if let Some(h) = &job.hires {
        if !(h.scale >= 1.0 && h.scale <= 8.0) {
            return Err(Error::Invalid(format!(
                "hires scale {} is outside 1..=8",
                h.scale
            )));
        }
        if !(h.strength > 0.0 && h.strength <= 1.0) {
            return Err(Error::Invalid(format!(
                "hires denoising strength {} is outside (0, 1]",
                h.strength
            )));
        }
    }
    Ok(())
}

/// The sigmas of a hires (img2img) pass of `steps` steps at denoising `strength`, as A1111
/// runs them: the job's schedule for `steps / strength` steps, of which the last `steps` are
/// walked.
pub fn hires_sigmas(
    job: &Job,
    schedule: &Schedule,
    steps: usize,
    strength: f64,
) -> Result<Vec<f64>> {
    let total = ((steps as f64 / strength.min(0.999)) as usize).max(steps);
    let all = job.sampler.sigmas(schedule, job.schedule, total)?;
    Ok(all[all.len().saturating_sub(steps + 1)..].to_vec())
}

/// Bilinear resize of a `[1, c, h, w]` latent to `[1, c, to_h, to_w]`, with half-pixel centres
/// (PyTorch's `interpolate(mode="bilinear", align_corners=False)`, A1111's "Latent" upscaler).
pub fn upscale_latent(latent: &Tensor, to_w: usize, to_h: usize) -> Result<Tensor> {
    let (_, c, h, w) = latent.dims4().map_err(cerr)?;
    let dev = latent.device();
    let src = latent
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(cerr)?;
    let taps = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        (0..out)
            .map(|o| {
                let s = ((o as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let (ys, xs) = (taps(to_h, h), taps(to_w, w));
    let mut out = Vec::with_capacity(c * to_h * to_w);
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for &(y0, y1, fy) in &ys {
            for &(x0, x1, fx) in &xs {
                let at = |y: usize, x: usize| plane[y * w + x];
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    Tensor::from_vec(out, (1, c, to_h, to_w), dev).map_err(cerr)
}

/// A text encoder's shape, read from its weights.
fn clip_config(
    ck: &Checkpoint,
    map: &WeightMap,
    part: Part,
    quick_gelu: bool,
) -> Result<ClipConfig> {
    let layers = map
        .names(part)
        .filter(|n| n.ends_with(".layer_norm1.weight"))
        .count();
    ClipConfig::read(|n| shape(ck, map, part, n), layers, quick_gelu)
}

/// Whether a checkpoint's model predicts v: a `v_pred` marker, or an SD2 model whose probe
/// bias is spread out (see [`SD2_V_PROBE`]).
fn guess_prediction(ck: &Checkpoint, family: Family) -> Result<Prediction> {
    if ck.get("v_pred").is_some() {
        return Ok(Prediction::V);
    }
    if Pipeline::of(family) == Some(Pipeline::Sd2) {
        if let Some(info) = ck.get(SD2_V_PROBE) {
            let values = crate::convert::to_f32(info.dtype, &ck.data(info))?;
            ck.release(info);
            let n = values.len().max(1) as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = values
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            if var.sqrt() > 0.09 {
                return Ok(Prediction::V);
            }
        }
    }
    Ok(Prediction::Epsilon)
}
