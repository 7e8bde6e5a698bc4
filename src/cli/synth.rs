//! `mergesmith synth`: synthetic checkpoints with the real layouts.

use clap::{Args, ValueEnum};
use mergesmith::arch::{Component, Family};
use mergesmith::dtype::FloatType;
use mergesmith::error::Result;
use mergesmith::synth::{CopyComponents, Perturb, Size, SynthOptions, SynthVariant};
use std::path::PathBuf;

use super::{choice, print_json, OutputArgs};

/// Components that `--copy` accepts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ComponentArg {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    Te1,
    /// SDXL's second text encoder.
    Te2,
    /// The VAE.
    Vae,
}

/// Arguments of `synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Family of a fresh model: one with a reference layout (sd1, sd2, sdxl, flux, sd3).
    #[arg(long, value_parser = family, default_value = "sd1")]
    pub arch: Family,
    /// Layout of a fresh model (e.g. `bfl` for a bare Flux transformer); default: the
    /// reference table's (single file / ComfyUI all-in-one).
    #[arg(long)]
    pub layout: Option<String>,
    /// `tiny` keeps every key with dimensions / 32 (tests); `full` has the real shapes.
    #[arg(long, value_parser = choice::<Size>(), default_value = "tiny")]
    pub size: Size,
    /// Seed of all pseudo-random values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage type of float tensors.
    #[arg(long, value_parser = choice::<FloatType>(), default_value = "fp16")]
    pub dtype: FloatType,
    /// Variant: standard, inpainting or pix2pix (SD), schnell or fill (Flux).
    #[arg(long, value_parser = choice::<SynthVariant>(), default_value = "standard")]
    pub variant: SynthVariant,
    /// Include EMA copies of the UNet (SD1).
    #[arg(long)]
    pub ema: bool,
    /// Start from this model and add a LoRA-like perturbation (a related model).
    #[arg(long, value_name = "FILE")]
    pub base: Option<PathBuf>,
    /// Size of the perturbation relative to each tensor's RMS (with --base).
    #[arg(long, default_value_t = 0.05, requires = "base")]
    pub strength: f32,
    /// Rank of the perturbation of 2-D/4-D weights; 0 for full-rank noise (with --base).
    #[arg(long, default_value_t = 4, requires = "base")]
    pub rank: usize,
    /// Take the components named by --copy verbatim from this file.
    #[arg(long, value_name = "FILE", requires = "copy")]
    pub copy_from: Option<PathBuf>,
    /// Components to copy from --copy-from.
    #[arg(long, value_enum, value_delimiter = ',', requires = "copy_from")]
    pub copy: Vec<ComponentArg>,
    /// Where the file goes and how the command reports.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Parses a family name (`--arch`).
fn family(text: &str) -> std::result::Result<Family, String> {
    Family::parse(text)
}

/// Runs `synth`.
pub fn run(a: SynthArgs) -> Result<()> {
    let opts = SynthOptions {
        family: a.arch,
        size: a.size,
        seed: a.seed,
        dtype: a.dtype,
        variant: a.variant,
        layout: a.layout.clone(),
        ema: a.ema,
        perturb: a.base.map(|base| Perturb {
            base,
            strength: a.strength,
            rank: a.rank,
        }),
        copy: a.copy_from.map(|from| CopyComponents {
            from,
            components: a
                .copy
                .iter()
                .map(|c| match c {
                    ComponentArg::Unet => Component::Unet,
                    ComponentArg::Te1 => Component::TextEncoder1,
                    ComponentArg::Te2 => Component::TextEncoder2,
                    ComponentArg::Vae => Component::Vae,
                })
                .collect(),
        }),
    };
    let started = std::time::Instant::now();
    let report = mergesmith::synth::synthesize(&opts, &a.out.output, a.out.overwrite, !a.out.json)?;
    if a.out.json {
        print_json(&report)
    } else {
        println!(
            "wrote {} ({} tensors, {}) in {:.1} s",
            report.path.display(),
            report.tensors,
            mergesmith::inspect::human_bytes(report.bytes),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
