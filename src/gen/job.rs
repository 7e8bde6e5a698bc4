//! What a `generate` recipe node asks for ([`Job`]), and the content keys of its images.
//!
//! Each image is keyed on its own: blake3 over the model's content key, the tokenizer file's
//! key, the job's parameters with that image's seed (a batch is `batch` images of seeds
//! `seed, seed + 1, ...`, as the web UI makes them) and [`VERSION`]. So an image is shared by
//! every node, sweep cell or batch that asks for the same picture, and is never made twice.
//! The device is not part of the key: an image made on a GPU is reused on the CPU.

use std::path::Path;

use crate::error::Result;
use crate::gen::pipeline::{Models, Prediction, Request};
use crate::gen::png::Hires;
use crate::gen::sampler::Sampler;
use crate::gen::tokenizer::ClipTokenizer;

/// Bumped whenever a change to the generation code changes images for the same parameters.
pub const VERSION: u32 = 1;

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
}

impl Default for Job {
    fn default() -> Self {
        Job {
            prompt: String::new(),
            negative: String::new(),
            steps: 20,
            cfg: 7.0,
            sampler: Sampler::EulerA,
            seed: 0,
            batch: 1,
            width: None,
            height: None,
            clip_skip: 1,
            hires: None,
            prediction: None,
        }
    }
}

impl Job {
    /// The seeds of its images, in order.
    pub fn seeds(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.batch as u64).map(|i| self.seed.wrapping_add(i))
    }

    /// The key of its image of `seed`, made from the model of content key `model` with the
    /// tokenizer of content key `tokenizer`.
    pub fn image_key(&self, model: &str, tokenizer: &str, seed: u64) -> String {
        let one = Job {
            seed,
            batch: 1,
            ..self.clone()
        };
        let preimage = serde_json::json!({
            "op": "image",
            "version": VERSION,
            "model": model,
            "tokenizer": tokenizer,
            "job": one,
        });
        blake3::hash(preimage.to_string().as_bytes())
            .to_hex()
            .to_string()
    }

    /// The request for its image of `seed`, with sizes left open taken as `native`.
    pub fn request(&self, seed: u64, native: usize) -> Request {
        let width = self.width.unwrap_or(native);
        Request {
            prompt: self.prompt.clone(),
            negative: self.negative.clone(),
            steps: self.steps,
            cfg: self.cfg,
            sampler: self.sampler,
            seed,
            width,
            height: self.height.unwrap_or(width),
            batch: 1,
            clip_skip: self.clip_skip,
            hires: self.hires.clone(),
            prediction: self.prediction,
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
        let req = self.request(seed, models.native_size());
        let rgb = models.generate(tok, &req)?.remove(0);
        let params = crate::gen::png::Parameters::of(&req, 0, model, autov2);
        let (w, h) = req.output_size();
        crate::gen::png::write(path, &rgb, w as u32, h as u32, &params, key, overwrite)
    }
}
