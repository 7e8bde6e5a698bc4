//! `mergesmith gen`: text to image into PNGs with AUTOMATIC1111's parameters.

use std::path::PathBuf;

use clap::Args;
use mergesmith::error::{Error, Result};
use mergesmith::gen::bf16::Precision;
use mergesmith::gen::noise::NoiseSource;
use mergesmith::gen::pipeline::Prediction;
use mergesmith::gen::prompt::Emphasis;
use mergesmith::gen::sampler::{Sampler, ScheduleKind};

use super::{choice, print_json, OutputArgs};

/// Arguments of `gen`.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// The checkpoint.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// The negative prompt.
    #[arg(short = 'n', long, default_value = "")]
    pub negative: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// Sampler.
    #[arg(long, value_parser = choice::<Sampler>(), default_value = "euler_a")]
    pub sampler: Sampler,
    /// Schedule: normal, karras, exponential, sgm_uniform, simple, beta, ddim_uniform
    /// [default: the sampler's, as A1111's "Automatic"].
    #[arg(long, value_parser = choice::<ScheduleKind>())]
    pub schedule: Option<ScheduleKind>,
    /// Seed; -1 picks one (written in the PNG info). Image i of a batch uses seed + i, as
    /// A1111 does (see --noise).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: i64,
    /// Noise source: cpu (torch's CPU generator, A1111's "CPU"), nv (A1111's "NV"), comfyui
    /// (torch's CPU generator the way ComfyUI draws batches and step noise).
    #[arg(long, value_parser = choice::<NoiseSource>(), default_value = "cpu")]
    pub noise: NoiseSource,
    /// Prompt syntax: a1111 (`(a:1.2)`, `[a]`, BREAK; weights with the mean restored),
    /// no_norm, none (syntax read, nothing weighted), comfyui (ComfyUI's reading and weighting).
    #[arg(long, value_parser = choice::<Emphasis>(), default_value = "a1111")]
    pub emphasis: Emphasis,
    /// A textual-inversion embedding (.safetensors, .pt) the prompts name by its file stem,
    /// as in A1111's embeddings folder; repeat for several.
    #[arg(long = "embedding", value_name = "FILE")]
    pub embeddings: Vec<PathBuf>,
    /// Width in pixels, a multiple of 8 [default: the model's native size: 512 for SD1 and
    /// SD2-base, 768 for SD2 768-v, 1024 for SDXL].
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels, a multiple of 8 [default: as the width].
    #[arg(long)]
    pub height: Option<usize>,
    /// Images to make (a batch writes NAME-1.png, NAME-2.png, ... for `-o NAME.png`).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// CLIP skip (1: the last layer; 2: the penultimate). SD1 only: SD2 and SDXL always use
    /// the penultimate layer, as the web UI does.
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Hires fix: upscale the latent by this factor (1 to 8), then denoise again.
    #[arg(long, value_name = "FACTOR")]
    pub hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass (0: as many as --steps).
    #[arg(long, default_value_t = 0, requires = "hires_scale")]
    pub hires_steps: u32,
    /// Hires fix: denoising strength of the second pass, in (0, 1].
    #[arg(long, default_value_t = 0.7, requires = "hires_scale")]
    pub hires_strength: f64,
    /// What the model predicts [default: guessed from the file: `v` for a `v_pred` marker
    /// or an SD2 768-v model, else `epsilon`].
    #[arg(long, value_parser = choice::<Prediction>())]
    pub prediction: Option<Prediction>,
    /// Flux dev's distilled guidance [default: 3.5]; models without one ignore it. (Flux
    /// runs with `--cfg 1`, as ComfyUI's workflows do: the negative prompt is then unused.)
    #[arg(long)]
    pub guidance: Option<f64>,
    /// A text-encoder file (Flux, SD3: CLIP-L, CLIP-G or T5-XXL, each recognised by its
    /// tensors; repeat for each), replacing the checkpoint's: for a bare transformer file.
    #[arg(long = "text-encoder", value_name = "FILE")]
    pub text_encoders: Vec<PathBuf>,
    /// A VAE file (Flux's ae.safetensors, SD3's VAE), replacing the checkpoint's.
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// The CLIP tokenizer.json [default: $MERGESMITH_TOKENIZER, else the Hugging Face cache,
    /// else the bundled CLIP vocabulary].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Where the models run: cpu, cuda or cuda:N (f16 on CUDA, f32 on the CPU).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: mergesmith::device::ComputeDevice,
    /// The CPU's arithmetic: f32, or bf16 (SD1 / SD2 / SDXL: U-Net and VAE products with bf16
    /// operands accumulated in f32 on AMX, Intel Xeon 4th generation and later; about twice as
    /// fast, images a few 255ths from f32's). On CUDA, bf16 loads the model in bf16.
    #[arg(long, value_parser = choice::<Precision>(), default_value = "f32")]
    pub precision: Precision,
    /// Where the PNG goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `mergesmith gen`.
pub fn run(a: GenArgs) -> Result<()> {
    use mergesmith::gen::job::Job;
    use mergesmith::gen::pipeline::Models;
    let started = std::time::Instant::now();
    let tok = mergesmith::gen::tokenizer::ClipTokenizer::find(a.tokenizer.as_deref())?;
    // A precision this CPU cannot run is said before the model is read and hashed.
    if !matches!(a.device, mergesmith::device::ComputeDevice::Cuda(_)) {
        a.precision.bf16_on_cpu().map_err(Error::Invalid)?;
    }
    let memo = super::memo(None);
    let hashes = memo.hashes(&a.model)?.0;
    let job = Job {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler: a.sampler,
        schedule: a.schedule,
        noise: a.noise,
        emphasis: a.emphasis,
        embeddings: a
            .embeddings
            .iter()
            .map(|p| mergesmith::gen::embedding::EmbeddingFile::open(p))
            .collect::<Result<_>>()?,
        seed: mergesmith::gen::noise::resolve_seed(a.seed).map_err(Error::Invalid)?,
        batch: a.batch.max(1),
        width: a.width,
        height: a.height,
        clip_skip: a.clip_skip.max(1),
        hires: a.hires_scale.map(|scale| mergesmith::gen::png::Hires {
            scale,
            steps: a.hires_steps,
            strength: a.hires_strength,
        }),
        prediction: a.prediction,
        guidance: a.guidance,
        components: mergesmith::gen::job::Components {
            files: a
                .text_encoders
                .iter()
                .chain(&a.vae)
                .map(|p| mergesmith::gen::job::ComponentFile::open(p))
                .collect::<Result<_>>()?,
        },
        precision: a.precision,
    };
    let outputs: Vec<PathBuf> = match job.batch {
        1 => vec![a.out.output.clone()],
        n => (1..=n)
            .map(|i| {
                let stem = a
                    .out
                    .output
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy();
                a.out.output.with_file_name(format!("{stem}-{i}.png"))
            })
            .collect(),
    };
    if !a.out.overwrite {
        if let Some(p) = outputs.iter().find(|p| p.exists()) {
            return Err(Error::OutputExists { path: p.clone() });
        }
    }
    let ck = std::sync::Arc::new(mergesmith::checkpoint::Checkpoint::open(&a.model)?);
    let loading = std::time::Instant::now();
    let models = Models::load_on(ck, &job.components, a.device, job.precision)?;
    let load = loading.elapsed().as_secs_f64();
    let model = a
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (seed, out) in job.seeds().zip(&outputs) {
        let key = job.image_key(&hashes.blake3, &tok.key, seed);
        let name = (model.as_str(), hashes.autov2.as_str());
        job.write_image(&models, &tok, seed, &key, name, out, a.out.overwrite)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let timings = mergesmith::gen::timing::Timings {
        load,
        ..models.timings()
    };
    if a.out.json {
        return print_json(&serde_json::json!({
            "outputs": outputs,
            "seed": job.seed,
            "seconds": seconds,
            "timings": timings,
        }));
    }
    for (o, seed) in outputs.iter().zip(job.seeds()) {
        println!("wrote {} (seed {seed})", o.display());
    }
    println!("{} image(s) in {seconds:.1} s ({timings})", outputs.len());
    Ok(())
}
