//! What a `generate` recipe node asks for ([`Job`]), and the content keys of its images.
//!
//! Each image is keyed on its own: blake3 over the model's content key, the tokenizer file's
//! key, the job's parameters with that image's seed (a batch is `batch` images of seeds
//! `seed, seed + 1, ...`, as A1111 makes them: image `i` is seed `seed + i` alone; under
//! ComfyUI's noise convention an image also depends on its batch, so its key holds the batch
//! and its place in it) and [`VERSION`]. So an image is shared by every node, sweep cell or
//! batch that asks for the same picture, and is never made twice. The device is not part of
//! the key: an image made on a GPU is reused on the CPU.

use std::path::Path;

use crate::error::Result;
use crate::gen::bf16::Precision;
use crate::gen::embedding::EmbeddingFile;
use crate::gen::noise::NoiseSource;
use crate::gen::pipeline::{Models, Prediction};
use crate::gen::png::Hires;
use crate::gen::prompt::Emphasis;
use crate::gen::sampler::{Sampler, ScheduleKind};
use crate::gen::tokenizer::ClipTokenizer;

/// Bumped whenever a change to the generation code changes images for the same parameters.
/// 2: the UIs' noise sources, k-diffusion's schedules and samplers, A1111's DDIM, A1111's
/// prompt syntax and chunking, separate U-Net calls for prompts of different lengths.
/// 3: our own CPU convolution, attention and GroupNorm kernels and AVX-512 matrix products
/// (different rounding: pixels move by at most 1/255), GEGLU's exact (erf) GELU as diffusers.
/// 4: softmax and GroupNorm statistics summed over vector lanes (pixels move by at most 1/255).
/// 5: f32 products on the CPU summed in a fixed order on every machine (`gen::product`: the
/// U-Net's, VAE's and CLIP's linear layers, convolutions and attention).
pub const VERSION: u32 = 5;

/// Bumped whenever a change to [`crate::gen::grid`] changes grid images.
pub const GRID_VERSION: u32 = 1;

/// A `generate` node's parameters, defaults filled in.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Job {
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
    /// Schedule; `None`: the sampler's default (A1111's "Automatic").
    pub schedule: Option<ScheduleKind>,
    /// Where the noise comes from.
    pub noise: NoiseSource,
    /// How prompt weights are read and applied.
    pub emphasis: Emphasis,
    /// Textual-inversion embeddings the prompts may name (by file stem).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<EmbeddingFile>,
    /// Seed of the first image.
    pub seed: u64,
    /// Images (seeds `seed .. seed + batch`).
    pub batch: usize,
    /// Width in pixels; `None`: the model's native size.
    pub width: Option<usize>,
    /// Height in pixels; `None`: as the width.
    pub height: Option<usize>,
    /// CLIP skip (SD1).
    pub clip_skip: usize,
    /// Hires fix.
    pub hires: Option<Hires>,
    /// What the model predicts; `None`: guessed from the file.
    pub prediction: Option<Prediction>,
    /// Flux dev's distilled guidance (Forge's "Distilled CFG Scale"); `None`: 3.5. Models
    /// without a guidance embedding ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// Text encoders and a VAE given as files of their own (Flux, SD3: ComfyUI's separate
    /// CLIP and VAE loaders); they replace the checkpoint's.
    #[serde(default, skip_serializing_if = "Components::is_empty")]
    pub components: Components,
    /// The CPU's arithmetic: f32, or bf16 products on AMX (left out of the key when f32, so
    /// f32 images keep their keys).
    #[serde(default, skip_serializing_if = "Precision::is_default")]
    pub precision: Precision,
}

/// A model file named in a job: where it is and its content key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ComponentFile {
    /// The file.
    #[serde(skip)]
    pub path: std::path::PathBuf,
    /// blake3 of the file.
    pub key: String,
}

impl ComponentFile {
    /// Hashes the file at `path`.
    pub fn open(path: &Path) -> Result<ComponentFile> {
        let (key, _) = crate::hashing::blake3_file(path)?;
        Ok(ComponentFile {
            path: path.to_path_buf(),
            key,
        })
    }
}

/// Text encoders and a VAE from files of their own (CLIP-L, CLIP-G, T5-XXL, VAE, in any
/// order: each file is recognised by its tensors; a later file of the same kind wins).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Components {
    /// The files.
    pub files: Vec<ComponentFile>,
}

impl Components {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// A key of the files, for caching loaded models.
    pub fn key(&self) -> String {
        let k: Vec<&str> = self.files.iter().map(|f| f.key.as_str()).collect();
        k.join("+")
    }
}

impl Default for Job {
    fn default() -> Self {
        Job {
            prompt: String::new(),
            negative: String::new(),
            steps: 20,
            cfg: 7.0,
            sampler: Sampler::EulerA,
            schedule: None,
            noise: NoiseSource::Cpu,
            emphasis: Emphasis::A1111,
            embeddings: Vec::new(),
            seed: 0,
            batch: 1,
            width: None,
            height: None,
            clip_skip: 1,
            hires: None,
            prediction: None,
            guidance: None,
            components: Components::default(),
            precision: Precision::F32,
        }
    }
}

impl Job {
    /// The seeds of its images, in order.
    pub fn seeds(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.batch as u64).map(|i| self.seed.wrapping_add(i))
    }

    /// Where its image of `seed` sits in its batch.
    pub fn index_of(&self, seed: u64) -> usize {
        seed.wrapping_sub(self.seed) as usize
    }

    /// The job of its image of `seed` alone: batch 1 at that seed, except under ComfyUI's
    /// convention, where an image depends on its batch (one noise tensor for all).
    pub fn one(&self, seed: u64) -> Job {
        match self.noise {
            NoiseSource::Comfyui => self.clone(),
            NoiseSource::Cpu | NoiseSource::Nv => Job {
                seed,
                batch: 1,
                ..self.clone()
            },
        }
    }

    /// The key of its image of `seed`, made from the model of content key `model` with the
    /// tokenizer of content key `tokenizer`.
    pub fn image_key(&self, model: &str, tokenizer: &str, seed: u64) -> String {
        let one = self.one(seed);
        let preimage = serde_json::json!({
            "op": "image",
            "version": VERSION,
            "model": model,
            "tokenizer": tokenizer,
            "job": one,
            "index": one.index_of(seed),
        });
        blake3::hash(preimage.to_string().as_bytes())
            .to_hex()
            .to_string()
    }

    /// Width and height before any hires fix, sizes left open taken as `native` (the height
    /// defaults to the width).
    pub fn size(&self, native: usize) -> (usize, usize) {
        let width = self.width.unwrap_or(native);
        (width, self.height.unwrap_or(width))
    }

    /// The size of the images it makes: [`Self::size`] after the hires fix, if any.
    pub fn output_size(&self, native: usize) -> (usize, usize) {
        let (w, h) = self.size(native);
        match &self.hires {
            None => (w, h),
            Some(hires) => (hires_dim(w, hires.scale), hires_dim(h, hires.scale)),
        }
    }

    /// Generates its image of `seed` and writes it to `path` as a PNG (temp file, fsync,
    /// rename) with A1111's parameters, naming the model `model` (A1111 short hash
    /// `autov2`), and the image key `key`.
    #[allow(clippy::too_many_arguments)]
    pub fn write_image(
        &self,
        models: &Models,
        tok: &ClipTokenizer,
        seed: u64,
        key: &str,
        (model, autov2): (&str, &str),
        path: &Path,
        overwrite: bool,
    ) -> Result<()> {
        let one = self.one(seed);
        let rgb = models.generate_image(tok, &one, one.index_of(seed))?;
        let native = models.native_size();
        let mut params = crate::gen::png::Parameters::of(&one, seed, native, model, autov2);
        if models.takes_guidance() {
            params.guidance = Some(one.guidance.unwrap_or(crate::gen::dit::DEFAULT_GUIDANCE));
        }
        let (w, h) = one.output_size(native);
        crate::gen::png::write(path, &rgb, w as u32, h as u32, &params, key, overwrite)
    }
}

/// A hires-fix dimension: `d · scale` rounded down to a multiple of 8, as A1111 does.
fn hires_dim(d: usize, scale: f64) -> usize {
    ((d as f64 * scale) as usize / 8 * 8).max(8)
}
