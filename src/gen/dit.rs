//! Text to image for the rectified-flow transformers: Flux.1 (dev, schnell) and SD3 / SD3.5
//! (Medium, Large) from ComfyUI all-in-one checkpoints or a bare transformer with text-encoder
//! and VAE files, with candle-transformers' Flux, T5 and 16-channel autoencoder, our MMDiT
//! ([`crate::gen::mmdit`]) and CLIP encoders, and our samplers on ComfyUI's flow schedules.
//! Shapes are read from the files, so `synth --size small` models run too.
//!
//! What follows ComfyUI (`comfy/supported_models.py`, `model_sampling.py`,
//! `text_encoders/flux.py`, `sd3_clip.py`):
//! - Flux: T5 (last layer, at least 256 tokens) is the context; CLIP-L's pooled end token
//!   (no projection) the vector; dev's guidance embedding gets `guidance` (default 3.5);
//!   dev samples on `ModelSamplingFlux` (μ = 1.15, 10000 steps, the timestep is σ), schnell on
//!   an unshifted flow (timestep σ).
//! - SD3: CLIP-L and CLIP-G penultimate layers (no final norm) side by side, zero-padded to
//!   T5's width, then T5's tokens (at least 77); pooled = CLIP-L's (unprojected) and CLIP-G's
//!   (projected) end tokens; flow shift 3.0, timestep σ · 1000.
//! - Both: the model predicts the velocity, the clean estimate is `x − σ·v`; sampling starts
//!   at `σ₀·noise + (1 − σ₀)·latent` with the empty latent `(0 − shift)·scale`; `cfg` 1 runs
//!   the prompt alone (ComfyUI's shortcut); the default schedule is `simple`.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux;
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::mmdit;

use crate::arch::{Component, Family};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gen::clip::{ClipConfig, ClipTextModel};
use crate::gen::embedding::Slot;
use crate::gen::job::{Components, Job};
use crate::gen::pipeline::{cerr, clip_encode, weigh, ClipPass};
use crate::gen::prompt::{self, Emphasis};
use crate::gen::sampler::{sample, Schedule, ScheduleKind};
use crate::gen::t5::{self, T5Encoder};
use crate::gen::textmemo::TextIdentity;
use crate::gen::timing::{Clock, Phase};
use crate::gen::tokenizer::{ClipTokenizer, Pad};
use crate::gen::weights::{count_indexed, CheckpointWeights};

/// Flux dev's distilled guidance when a job names none (ComfyUI's and Forge's default).
pub const DEFAULT_GUIDANCE: f64 = 3.5;

/// Which transformer pipeline a family's `generation` hook names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flux.1.
    Flux,
    /// SD3 / SD3.5 (MMDiT).
    Sd3,
}

impl Kind {
    /// The pipeline of `family`, if it is a flow transformer this module runs.
    pub fn of(family: Family) -> Option<Kind> {
        match family.code().generation.as_deref()? {
            "flux" => Some(Kind::Flux),
            "sd3" => Some(Kind::Sd3),
            _ => None,
        }
    }

    /// The variants it runs (ids of the family's variants).
    pub fn variants(self) -> &'static [&'static str] {
        match self {
            Kind::Flux => &["dev", "schnell"],
            Kind::Sd3 => &["medium", "sd35_large", "sd35_medium"],
        }
    }

    /// T5 tokens a prompt is padded to.
    fn t5_min_tokens(self) -> usize {
        match self {
            Kind::Flux => 256,
            Kind::Sd3 => 77,
        }
    }
}

/// The denoiser.
enum Transformer {
    Flux(Box<flux::model::Flux>),
    Mmdit(Box<SharedMmdit>),
}

/// The MMDiT, shareable between the build's threads.
struct SharedMmdit(crate::gen::mmdit::Mmdit);

// SAFETY: `Mmdit` is not `Send`/`Sync` only because candle's blocks keep their modulation as
// `candle_nn::Sequential` (`Box<dyn Module>`) trait objects without those bounds. Every
// concrete type behind them (candle-nn 0.11's `Activation` and `Linear`) holds only tensors
// (`Arc`-shared, `Send + Sync`) and plain values, and `forward` takes `&self` with no interior
// mutability, so moving it to or reading it from another thread is sound.
unsafe impl Send for SharedMmdit {}
// SAFETY: as for `Send` above.
unsafe impl Sync for SharedMmdit {}

/// A prompt's conditioning: the context tokens and the pooled vector.
struct Cond {
    context: Tensor,
    pooled: Tensor,
}

/// A loaded Flux or SD3 model, reused for every image.
pub struct DitModels {
    family: Family,
    kind: Kind,
    clip_l: ClipTextModel,
    clip_g: Option<ClipTextModel>,
    t5: T5Encoder,
    transformer: Transformer,
    vae: flux::autoencoder::AutoEncoder,
    schedule: Schedule,
    guidance_embed: bool,
    /// The width the SD3 context embedder takes (CLIP features are padded to it).
    context_width: usize,
    latent_channels: usize,
    /// The empty latent in the model's units: `(0 − shift) · scale`.
    empty_latent: f64,
    device: Device,
    /// The text encoders' dtype.
    dtype: DType,
    /// The transformer's: `dtype` for Flux; f16 for MMDiT, whose candle implementation fixes
    /// its timestep embedding to f16.
    dit_dtype: DType,
    /// The keys of the checkpoint's own text encoders (not those of separate files).
    text_keys: Vec<String>,
    pub(crate) text_id: TextIdentity,
    pub(crate) clock: Clock,
}

/// The key prefix of a family component's role, or an error naming what is missing.
fn component_prefix(family: Family, role: Component) -> Result<&'static str> {
    family
        .data()
        .def
        .components
        .iter()
        .find(|c| c.role == role)
        .map(|c| c.prefix.as_str())
        .ok_or_else(|| Error::Invalid(format!("{} has no {role:?} component", family.label())))
}

/// One model of the pipeline besides the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    ClipL,
    ClipG,
    T5,
    Vae,
}

impl Role {
    /// The tensor (after the part's prefix) that shows the part is there.
    fn marker(self) -> &'static str {
        match self {
            Role::ClipL | Role::ClipG => "text_model.final_layer_norm.weight",
            Role::T5 => "encoder.final_layer_norm.weight",
            Role::Vae => "decoder.conv_in.weight",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::ClipL => "CLIP-L",
            Role::ClipG => "CLIP-G",
            Role::T5 => "T5-XXL",
            Role::Vae => "a VAE",
        }
    }
}

/// Where one model is read from: a checkpoint and the key prefix of its tensors.
#[derive(Clone)]
struct Part {
    ck: Arc<Checkpoint>,
    prefix: String,
}

impl Part {
    fn has(&self, name: &str) -> bool {
        self.ck.get(&format!("{}{name}", self.prefix)).is_some()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let key = format!("{}{name}", self.prefix);
        self.ck.get(&key).map(|t| t.shape.clone()).ok_or_else(|| {
            Error::Invalid(format!("{}: no tensor `{key}`", self.ck.path().display()))
        })
    }

    fn count(&self, head: &str, tail: &str) -> usize {
        count_indexed(&self.ck, &format!("{}{head}", self.prefix), tail)
    }

    fn weights(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        CheckpointWeights::prefixed(self.ck.clone(), &self.prefix).var_builder(dtype, device)
    }

    /// What a separate file holds (as ComfyUI's loaders tell: CLIP-G has a 31st layer), and
    /// where in it.
    fn recognise(ck: Arc<Checkpoint>) -> Result<(Role, Part)> {
        let found = |role: Role| {
            let marker = role.marker();
            ck.tensors()
                .iter()
                .find_map(|t| t.name.strip_suffix(marker).map(str::to_string))
        };
        let part = |prefix: String| Part {
            ck: ck.clone(),
            prefix,
        };
        if let Some(p) = found(Role::ClipL) {
            let role = match ck
                .get(&format!("{p}text_model.encoder.layers.30.mlp.fc1.weight"))
                .is_some()
            {
                true => Role::ClipG,
                false => Role::ClipL,
            };
            return Ok((role, part(p)));
        }
        for role in [Role::T5, Role::Vae] {
            if let Some(p) = found(role) {
                return Ok((role, part(p)));
            }
        }
        Err(Error::Invalid(format!(
            "{}: not a CLIP, T5 or VAE file (no `text_model.final_layer_norm.weight`, \
             `encoder.final_layer_norm.weight` or `decoder.conv_in.weight`)",
            ck.path().display()
        )))
    }
}

impl DitModels {
    /// Loads a Flux or SD3 checkpoint's models on `device` in `dtype` (the autoencoder in
    /// f32): the transformer from `ck`, the text encoders and VAE from `components` where
    /// given, else from `ck` (a ComfyUI all-in-one file).
    pub fn load(
        ck: Arc<Checkpoint>,
        components: &Components,
        device: &Device,
        dtype: DType,
    ) -> Result<DitModels> {
        let arch = crate::arch::detect(ck.tensors());
        let family = arch.family;
        let kind = Kind::of(family).ok_or_else(|| {
            Error::Invalid(format!("{}: not a Flux or SD3 model", ck.path().display()))
        })?;
        let path = ck.path().display().to_string();
        let layout = family.layout(arch.layout).and_then(|l| l.prefix.clone());
        let Some(prefix) = layout else {
            return Err(Error::Invalid(format!(
                "{path}: generation reads {} in the ComfyUI or original layout; this file's \
                 keys are the {} layout",
                family.label(),
                arch.layout
            )));
        };
        // The checkpoint's own text encoders and VAE, then the separate files over them.
        let mut parts: BTreeMap<Role, Part> = BTreeMap::new();
        let roles = match kind {
            Kind::Flux => vec![
                (Role::ClipL, Component::TextEncoder1),
                (Role::T5, Component::TextEncoder2),
                (Role::Vae, Component::Vae),
            ],
            Kind::Sd3 => vec![
                (Role::ClipL, Component::TextEncoder1),
                (Role::ClipG, Component::TextEncoder2),
                (Role::T5, Component::TextEncoder3),
                (Role::Vae, Component::Vae),
            ],
        };
        for (role, component) in &roles {
            let p = component_prefix(family, *component)?;
            let p = match role {
                Role::Vae => p.to_string(),
                _ => format!("{p}transformer."),
            };
            let part = Part {
                ck: ck.clone(),
                prefix: p,
            };
            if part.has(role.marker()) {
                parts.insert(*role, part);
            }
        }
        for f in &components.files {
            let file = Checkpoint::open(&f.path)?;
            crate::checkpoint::quant::Quant::require_plain(&file, "generation")?;
            let (role, part) = Part::recognise(Arc::new(file))?;
            parts.insert(role, part);
        }
        let missing: Vec<&str> = roles
            .iter()
            .filter(|(r, _)| !parts.contains_key(r))
            .map(|(r, _)| r.label())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "{path}: {} generation needs {}: this file has no {}; give them as files \
                 of their own (`text_encoders:` / `vae:` in a recipe, `--text-encoder` / \
                 `--vae` to `gen`)",
                family.label(),
                roles
                    .iter()
                    .map(|(r, _)| r.label())
                    .collect::<Vec<_>>()
                    .join(", "),
                missing.join(", ")
            )));
        }
        let text_keys = parts
            .iter()
            .filter(|(r, p)| **r != Role::Vae && Arc::ptr_eq(&p.ck, &ck))
            .flat_map(|(_, p)| {
                ck.tensors()
                    .iter()
                    .filter(|t| t.name.starts_with(&p.prefix))
                    .map(|t| t.name.clone())
            })
            .collect();
        let part = |r: Role| parts[&r].clone();
        let clip = |p: Part, quick_gelu: bool, projection: bool| -> Result<ClipTextModel> {
            let layers = p.count("text_model.encoder.layers.", "layer_norm1.weight");
            let config = ClipConfig::read(|n| p.shape(n), layers, quick_gelu)?;
            ClipTextModel::new(p.weights(dtype, device), &config, projection).map_err(cerr)
        };
        let clip_l = clip(part(Role::ClipL), true, false)?.pooling();
        let clip_g = match kind {
            Kind::Sd3 => Some(clip(part(Role::ClipG), false, true)?),
            Kind::Flux => None,
        };
        let t5p = part(Role::T5);
        let t5 = T5Encoder::load(t5p.ck.clone(), &t5p.prefix, dtype, device)?;
        let has = |key: &str| ck.get(key).is_some();
        let shape = |key: &str| -> Result<Vec<usize>> {
            ck.get(key)
                .map(|t| t.shape.clone())
                .ok_or_else(|| Error::Invalid(format!("{path}: no tensor `{key}`")))
        };
        let count = |head: &str, tail: &str| count_indexed(&ck, head, tail);
        let dm = |name: &str| format!("{prefix}{name}");
        let dit_dtype = match kind {
            Kind::Flux => dtype,
            Kind::Sd3 => DType::F16,
        };
        let vb = CheckpointWeights::prefixed(ck.clone(), &prefix).var_builder(dit_dtype, device);
        let (transformer, schedule, guidance_embed, context_width, latent_channels) = match kind {
            Kind::Flux => {
                let img_in = shape(&dm("img_in.weight"))?;
                let (hidden, in_channels) = (img_in[0], img_in[1]);
                if in_channels != 64 {
                    return Err(Error::Invalid(format!(
                        "{path}: Flux with {in_channels} input features (Fill / Depth / Canny) \
                         takes an image input; text to image runs dev and schnell (64)"
                    )));
                }
                let head = shape(&dm("double_blocks.0.img_attn.norm.query_norm.scale"))?[0];
                let axes = vec![head / 8, head * 7 / 16, head * 7 / 16];
                if head % 16 != 0 || axes.iter().any(|a| a % 2 != 0) {
                    return Err(Error::Invalid(format!(
                        "{path}: Flux attention heads {head} wide cannot be split into \
                         rotary axes like Flux's 16/56/56 of 128"
                    )));
                }
                let guidance = has(&dm("guidance_in.in_layer.weight"));
                let config = flux::model::Config {
                    in_channels,
                    vec_in_dim: shape(&dm("vector_in.in_layer.weight"))?[1],
                    context_in_dim: shape(&dm("txt_in.weight"))?[1],
                    hidden_size: hidden,
                    mlp_ratio: shape(&dm("double_blocks.0.img_mlp.0.weight"))?[0] as f64
                        / hidden as f64,
                    num_heads: hidden / head,
                    depth: count(&dm("double_blocks."), "img_attn.qkv.weight"),
                    depth_single_blocks: count(&dm("single_blocks."), "linear1.weight"),
                    axes_dim: axes,
                    theta: 10_000,
                    qkv_bias: has(&dm("double_blocks.0.img_attn.qkv.bias")),
                    guidance_embed: guidance,
                };
                let model = flux::model::Flux::new(&config, vb).map_err(cerr)?;
                // ComfyUI: dev on ModelSamplingFlux (shift 1.15); schnell a plain flow.
                let schedule = match guidance {
                    true => Schedule::flux(1.15),
                    false => Schedule::flow(1.0, 1.0),
                };
                (
                    Transformer::Flux(Box::new(model)),
                    schedule,
                    guidance,
                    0,
                    16,
                )
            }
            Kind::Sd3 => {
                let x = shape(&dm("x_embedder.proj.weight"))?;
                let depth = count(&dm("joint_blocks."), "x_block.attn.qkv.weight");
                let hidden = x[0];
                if depth == 0 || hidden % depth != 0 {
                    return Err(Error::Invalid(format!(
                        "{path}: MMDiT width {hidden} is not a multiple of its {depth} blocks"
                    )));
                }
                let pos = shape(&dm("pos_embed"))?;
                let side = (pos[1] as f64).sqrt().round() as usize;
                let context = shape(&dm("context_embedder.weight"))?[1];
                let config = mmdit::model::Config {
                    patch_size: x[2],
                    in_channels: x[1],
                    out_channels: shape(&dm("final_layer.linear.weight"))?[0] / (x[2] * x[3]),
                    depth,
                    head_size: hidden / depth,
                    adm_in_channels: shape(&dm("y_embedder.mlp.0.weight"))?[1],
                    pos_embed_max_size: side,
                    context_embed_size: context,
                    frequency_embedding_size: shape(&dm("t_embedder.mlp.0.weight"))?[1],
                };
                let model = crate::gen::mmdit::Mmdit::new(&config, vb).map_err(cerr)?;
                (
                    Transformer::Mmdit(Box::new(SharedMmdit(model))),
                    Schedule::flow(3.0, 1000.0),
                    false,
                    context,
                    x[1],
                )
            }
        };
        let vae = part(Role::Vae);
        let ch = vae.shape("encoder.conv_in.weight")?[0];
        let levels = vae.count("decoder.up.", "block.0.conv1.weight");
        let top = vae.shape("decoder.conv_in.weight")?;
        let facts = family.facts();
        let (scale, shift) = (
            facts.latent_scale.unwrap_or(1.0),
            facts.latent_shift.unwrap_or(0.0),
        );
        let vae_config = flux::autoencoder::Config {
            resolution: 256,
            in_channels: 3,
            ch,
            out_ch: 3,
            ch_mult: match levels {
                4 => vec![1, 2, 4, 4],
                n => (0..n).map(|i| 1 << i.min(2)).collect(),
            },
            num_res_blocks: 2,
            z_channels: top[1],
            scale_factor: scale,
            shift_factor: shift,
        };
        let vae = flux::autoencoder::AutoEncoder::new(&vae_config, vae.weights(DType::F32, device))
            .map_err(cerr)?;
        Ok(DitModels {
            family,
            kind,
            clip_l,
            clip_g,
            t5,
            transformer,
            vae,
            schedule,
            guidance_embed,
            context_width,
            latent_channels,
            empty_latent: -shift * scale,
            device: device.clone(),
            dtype,
            dit_dtype,
            text_keys,
            text_id: TextIdentity::unique(),
            clock: Clock::default(),
        })
    }

    /// The keys of the checkpoint's own text encoders.
    pub fn text_keys(&self) -> Vec<String> {
        self.text_keys.clone()
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Whether the model takes Flux dev's distilled guidance.
    pub fn takes_guidance(&self) -> bool {
        self.guidance_embed
    }

    /// The size the family was trained at.
    pub fn native_size(&self) -> usize {
        self.family.facts().resolution.unwrap_or(1024)
    }

    /// Generates the images of `job`, its prompts encoded once: 8-bit RGB, row-major
    /// `height × width × 3` each.
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

    /// The job checked, and its prompt's and (with guidance above 1) negative prompt's
    /// conditioning.
    fn conditioning(&self, tok: &ClipTokenizer, job: &Job) -> Result<Arc<(Cond, Option<Cond>)>> {
        let (width, height) = job.size(self.native_size());
        self.check(job, width, height)?;
        let negative = match job.cfg == 1.0 {
            true => None,
            false => Some(job.negative.as_str()),
        };
        let key = self.text_id.key(
            "dit-v1",
            &[
                &job.prompt,
                &format!("{negative:?}"),
                &format!("{:?}", job.emphasis),
                &format!(
                    "{:?} {:?} {:?}",
                    self.kind,
                    self.dtype,
                    self.device.location()
                ),
            ],
        );
        let encode = || self.clock.time(Phase::Text, || self.encode_both(tok, job));
        self.text_id.memo.get_or(key, encode)
    }

    /// [`Self::conditioning`], encoded.
    fn encode_both(&self, tok: &ClipTokenizer, job: &Job) -> Result<(Cond, Option<Cond>)> {
        let cond = self.encode(tok, &job.prompt, job.emphasis)?;
        let uncond = match job.cfg == 1.0 {
            true => None,
            false => Some(self.encode(tok, &job.negative, job.emphasis)?),
        };
        Ok((cond, uncond))
    }

    /// Image `index` of `job`'s batch from its conditioning.
    fn render(
        &self,
        job: &Job,
        (cond, uncond): &(Cond, Option<Cond>),
        index: usize,
    ) -> Result<Vec<u8>> {
        let (width, height) = job.size(self.native_size());
        let (lw, lh) = (width / 8, height / 8);
        let kind = job.schedule.unwrap_or(ScheduleKind::Simple);
        let sigmas = job.sampler.sigmas(&self.schedule, Some(kind), job.steps)?;
        let c = self.latent_channels;
        let mut noise = job.noise.image(job.seed, index, job.batch, c * lw * lh);
        let s0 = sigmas[0];
        let x = Tensor::from_vec(noise.initial(), (1, c, lh, lw), &self.device)
            .and_then(|n| (n * s0)? + (1.0 - s0) * self.empty_latent)
            .map_err(cerr)?;
        let guidance = job.guidance.unwrap_or(DEFAULT_GUIDANCE);
        let step = |x: &Tensor, sigma: f64| -> Result<Tensor> {
            crate::progress::sampling_step()?;
            let t = self.schedule.timestep(sigma);
            let v = |c: &Cond| self.velocity(x, t, c, guidance);
            let vc = v(cond)?;
            let guided = match uncond {
                None => vc,
                Some(u) => {
                    let vu = v(u)?;
                    (&vu + ((vc - &vu).map_err(cerr)? * job.cfg).map_err(cerr)?).map_err(cerr)?
                }
            };
            (x - (guided * sigma).map_err(cerr)?).map_err(cerr)
        };
        let denoise = |x: &Tensor, sigma: f64| self.clock.time(Phase::Step, || step(x, sigma));
        let shape = (1, c, lh, lw);
        let draw = || Tensor::from_vec(noise.step(), shape, &self.device).map_err(cerr);
        let latent = sample(job.sampler, x, &sigmas, denoise, draw)?;
        self.clock.time(Phase::Decode, || {
            let img = latent
                .to_dtype(DType::F32)
                .and_then(|l| self.vae.decode(&l))
                .map_err(cerr)?;
            crate::gen::pipeline::to_rgb(&img)
        })
    }

    /// The model's velocity for latent `x` at model timestep `t`, in f32.
    fn velocity(&self, x: &Tensor, t: f64, c: &Cond, guidance: f64) -> Result<Tensor> {
        let dev = &self.device;
        let dtype = self.dit_dtype;
        let x = x.to_dtype(dtype).map_err(cerr)?;
        let (context, pooled) = (
            c.context.to_dtype(dtype).map_err(cerr)?,
            c.pooled.to_dtype(dtype).map_err(cerr)?,
        );
        // MMDiT takes its timestep in f32 whatever its dtype.
        let ts_dtype = match &self.transformer {
            Transformer::Flux(_) => dtype,
            Transformer::Mmdit(_) => DType::F32,
        };
        let ts = Tensor::full(t as f32, 1, dev)
            .and_then(|t| t.to_dtype(ts_dtype))
            .map_err(cerr)?;
        let out = match &self.transformer {
            Transformer::Flux(model) => {
                let (_, _, h, w) = x.dims4().map_err(cerr)?;
                let state = flux::sampling::State::new(&context, &pooled, &x).map_err(cerr)?;
                let g = match self.guidance_embed {
                    true => Some(
                        Tensor::full(guidance as f32, 1, dev)
                            .and_then(|g| g.to_dtype(dtype))
                            .map_err(cerr)?,
                    ),
                    false => None,
                };
                let packed = model
                    .forward(
                        &state.img,
                        &state.img_ids,
                        &state.txt,
                        &state.txt_ids,
                        &ts,
                        &state.vec,
                        g.as_ref(),
                    )
                    .map_err(cerr)?;
                flux::sampling::unpack(&packed, h * 8, w * 8).map_err(cerr)?
            }
            Transformer::Mmdit(m) => m.0.forward(&x, &ts, &pooled, &context).map_err(cerr)?,
        };
        out.to_dtype(DType::F32).map_err(cerr)
    }

    /// Encodes a prompt with the family's text encoders.
    fn encode(&self, tok: &ClipTokenizer, text: &str, emphasis: Emphasis) -> Result<Cond> {
        let pieces = prompt::parse(text, emphasis)?;
        let dev = &self.device;
        let clip = |model: &ClipTextModel, pad: Pad, skip: usize, norm: bool, slot: Slot| {
            let how = ClipPass {
                pad,
                skip,
                norm,
                slot,
                emphasis,
            };
            clip_encode(dev, tok, model, &pieces, (&[], &[]), how)
        };
        let t5_hidden = {
            let min = self.kind.t5_min_tokens();
            let (ids, weights) = t5::encode(&pieces, min)?;
            let z = self.t5.forward(&ids)?;
            let empty = match emphasis {
                Emphasis::Comfyui if weights.iter().any(|&w| w != 1.0) => {
                    let (e, _) = t5::encode(&[], ids.len())?;
                    Some(self.t5.forward(&e)?)
                }
                _ => None,
            };
            weigh(z, &weights, emphasis, empty.as_ref())?
        };
        let missing = || Error::Invalid("CLIP gave no pooled output".into());
        let cond = match (&self.kind, &self.clip_g) {
            (Kind::Flux, _) => {
                let (_, pooled) = clip(&self.clip_l, Pad::EndOfText, 1, true, Slot::ClipL)?;
                Cond {
                    context: t5_hidden,
                    pooled: pooled.ok_or_else(missing)?,
                }
            }
            (Kind::Sd3, Some(g)) => {
                let (hl, pl) = clip(&self.clip_l, Pad::EndOfText, 2, false, Slot::ClipL)?;
                let (hg, pg) = clip(g, Pad::Zero, 2, false, Slot::ClipG)?;
                let cut = hl.dim(1).map_err(cerr)?.min(hg.dim(1).map_err(cerr)?);
                let lg = Tensor::cat(
                    &[
                        hl.narrow(1, 0, cut).map_err(cerr)?,
                        hg.narrow(1, 0, cut).map_err(cerr)?,
                    ],
                    2,
                )
                .map_err(cerr)?;
                let wide = lg.dim(2).map_err(cerr)?;
                let lg = match self.context_width.checked_sub(wide) {
                    Some(0) => lg,
                    Some(pad) => lg.pad_with_zeros(2, 0, pad).map_err(cerr)?,
                    None => {
                        return Err(Error::Invalid(format!(
                            "SD3: CLIP features {wide} wide exceed the context width {}",
                            self.context_width
                        )))
                    }
                };
                Cond {
                    context: Tensor::cat(&[lg, t5_hidden], 1).map_err(cerr)?,
                    pooled: Tensor::cat(&[pl.ok_or_else(missing)?, pg.ok_or_else(missing)?], 1)
                        .map_err(cerr)?,
                }
            }
            (Kind::Sd3, None) => return Err(Error::Invalid("SD3 without CLIP-G".into())),
        };
        Ok(Cond {
            context: cond.context.to_dtype(self.dtype).map_err(cerr)?,
            pooled: cond.pooled.to_dtype(self.dtype).map_err(cerr)?,
        })
    }

    /// Rejects requests this pipeline cannot run, saying why.
    fn check(&self, job: &Job, width: usize, height: usize) -> Result<()> {
        let label = self.family.label();
        let ok = |d: usize| d > 0 && d.is_multiple_of(16);
        if !ok(width) || !ok(height) {
            return Err(Error::Invalid(format!(
                "{label}: image size {width}x{height} is not a multiple of 16"
            )));
        }
        if job.steps == 0 {
            return Err(Error::Invalid("steps must be at least 1".into()));
        }
        job.sampler.check_flow()?;
        if job.hires.is_some() {
            return Err(Error::Invalid(format!(
                "{label}: the hires fix runs on SD models only (not yet on flow transformers)"
            )));
        }
        if !job.embeddings.is_empty() {
            return Err(Error::Invalid(format!(
                "{label}: textual-inversion embeddings apply to SD models only"
            )));
        }
        if job.prediction.is_some() {
            return Err(Error::Invalid(format!(
                "{label}: `prediction` applies to SD models; {label} predicts the flow velocity"
            )));
        }
        Ok(())
    }
}
