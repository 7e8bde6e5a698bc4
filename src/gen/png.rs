//! PNG output with AUTOMATIC1111's generation parameters, so image browsers, the web UI's
//! "PNG Info" tab, civitai and ComfyUI's loaders read how an image was made: a `parameters`
//! text chunk in A1111's layout (prompt, `Negative prompt: ...`, then `Key: value` pairs),
//! plus a `mergesmith` chunk with the node key. Text that Latin-1 cannot hold goes into an
//! iTXt (UTF-8) chunk, as the web UI's PIL does. Files are written atomically.

use std::path::Path;

use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};

/// Hires fix: the latent upscaled by `scale`, then denoised again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hires {
    /// Upscale factor.
    pub scale: f64,
    /// Steps of the second pass (0: as many as the first).
    #[serde(default)]
    pub steps: u32,
    /// Denoising strength of the second pass.
    pub strength: f64,
}

/// What made an image, as A1111 writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Parameters {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (left out when empty).
    pub negative: String,
    /// Sampling steps.
    pub steps: u32,
    /// The sampler's A1111 label (`Euler a`, `Euler`, `DDIM`, `DPM++ 2M`).
    pub sampler: String,
    /// Classifier-free guidance scale.
    pub cfg: f64,
    /// Seed.
    pub seed: u64,
    /// Width in pixels (before any hires fix, as A1111 writes it).
    pub width: u32,
    /// Height in pixels (before any hires fix).
    pub height: u32,
    /// A1111's short model hash (the first 10 hex digits of the SHA-256).
    pub model_hash: String,
    /// Model name.
    pub model: String,
    /// CLIP skip (written when above 1, as A1111 does).
    pub clip_skip: u32,
    /// Hires fix, if any.
    pub hires: Option<Hires>,
    /// A1111's "Schedule type" label, when the job names a schedule.
    pub schedule: Option<String>,
    /// A1111's "RNG" (the noise source), when not its default.
    pub rng: Option<String>,
    /// A1111's "Emphasis", when not its default.
    pub emphasis: Option<String>,
    /// ComfyUI-convention batches: (batch size, position); the seed is then the batch's.
    pub batch: Option<(usize, usize)>,
    /// Flux dev's distilled guidance (Forge's "Distilled CFG Scale").
    pub guidance: Option<f64>,
}

impl Parameters {
    /// The parameters of `job`'s image of `seed`, made with the model named `model`
    /// (A1111's short hash `model_hash`) whose native size is `native`.
    pub fn of(
        job: &crate::gen::job::Job,
        seed: u64,
        native: usize,
        model: &str,
        model_hash: &str,
    ) -> Self {
        // A1111 writes the first pass' size; the hires fix's factor says the rest.
        let (width, height) = job.size(native);
        let comfy = job.noise == crate::gen::noise::NoiseSource::Comfyui;
        Parameters {
            prompt: job.prompt.clone(),
            negative: job.negative.clone(),
            steps: job.steps as u32,
            sampler: job.sampler.label().to_string(),
            cfg: job.cfg,
            seed: if comfy { job.seed } else { seed },
            width: width as u32,
            height: height as u32,
            model_hash: model_hash.to_string(),
            model: model.to_string(),
            clip_skip: job.clip_skip as u32,
            hires: job.hires.clone(),
            schedule: job.schedule.map(|s| s.label().to_string()),
            rng: job.noise.a1111_label().map(str::to_string),
            emphasis: job.emphasis.a1111_label().map(str::to_string),
            batch: (comfy && job.batch > 1).then(|| (job.batch, job.index_of(seed))),
            guidance: None,
        }
    }
}

/// A value as A1111 quotes it: JSON-quoted (non-ASCII kept) when it holds a comma, colon or
/// newline.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// Formats a float the way Python prints it (`7.0` → `7`, `0.5` → `0.5`).
fn num(v: f64) -> String {
    let s = format!("{v}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

impl Parameters {
    /// The `parameters` text in A1111's layout.
    pub fn text(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
        ];
        if let Some(s) = &self.schedule {
            pairs.push(("Schedule type", s.clone()));
        }
        pairs.push(("CFG scale", num(self.cfg)));
        if let Some(g) = self.guidance {
            pairs.push(("Distilled CFG Scale", num(g)));
        }
        pairs.extend([
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model hash", self.model_hash.clone()),
            ("Model", self.model.clone()),
        ]);
        if let Some((size, pos)) = self.batch {
            pairs.push(("Batch size", size.to_string()));
            pairs.push(("Batch pos", pos.to_string()));
        }
        if let Some(h) = &self.hires {
            pairs.push(("Denoising strength", num(h.strength)));
        }
        if self.clip_skip > 1 {
            pairs.push(("Clip skip", self.clip_skip.to_string()));
        }
        if let Some(rng) = &self.rng {
            pairs.push(("RNG", rng.clone()));
        }
        if let Some(e) = &self.emphasis {
            pairs.push(("Emphasis", e.clone()));
        }
        if let Some(h) = &self.hires {
            pairs.push(("Hires upscale", num(h.scale)));
            pairs.push(("Hires steps", h.steps.to_string()));
            pairs.push(("Hires upscaler", "Latent".to_string()));
        }
        let pairs: Vec<String> = pairs
            .into_iter()
            .map(|(k, v)| format!("{k}: {}", quote(&v)))
            .collect();
        let mut out = self.prompt.clone();
        if !self.negative.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&self.negative);
        }
        out.push('\n');
        out.push_str(&pairs.join(", "));
        out
    }
}

fn latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// Encodes 8-bit RGB pixels (`width × height × 3`) as PNG bytes with text chunks
/// (keyword, text).
pub fn encode(rgb: &[u8], width: u32, height: u32, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(Error::Invalid(format!(
            "{} bytes of pixels for a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let fail = |e: png::EncodingError| Error::Invalid(format!("PNG encoding failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            match latin1(v) {
                true => enc.add_text_chunk(k.to_string(), v.to_string()),
                false => enc.add_itxt_chunk(k.to_string(), v.to_string()),
            }
            .map_err(fail)?;
        }
        let mut w = enc.write_header().map_err(fail)?;
        w.write_image_data(rgb).map_err(fail)?;
        w.finish().map_err(fail)?;
    }
    Ok(out)
}

/// Writes an image with its parameters and node key to `path` (temp file, fsync, rename).
pub fn write(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    params: &Parameters,
    node_key: &str,
    overwrite: bool,
) -> Result<()> {
    let parameters = params.text();
    let bytes = encode(
        rgb,
        width,
        height,
        &[("parameters", &parameters), ("mergesmith", node_key)],
    )?;
    write_file_atomic(path, &bytes, overwrite)
}

/// The text chunks of a PNG file (tEXt, zTXt and iTXt), as (keyword, text).
pub fn read_text(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let fail = |e: png::DecodingError| Error::Invalid(format!("not a readable PNG: {e}"));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .map_err(fail)?;
    // Text after the image data is only seen once the whole file is read.
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buf).map_err(fail)?;
    reader.finish().map_err(fail)?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        out.push((t.keyword.clone(), t.get_text().map_err(fail)?));
    }
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().map_err(fail)?));
    }
    Ok(out)
}
