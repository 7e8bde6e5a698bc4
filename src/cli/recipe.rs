//! `mergesmith recipe ...`: recipes from merged models, images' generation parameters and
//! SuperMerger's history.

use std::path::PathBuf;

use clap::Subcommand;
use mergesmith::error::{Error, Result};
use mergesmith::lora::merge::MetadataMode;

/// `mergesmith recipe ...` (every way in is a `from-*`, as the command line spells them).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Write a recipe that rebuilds a merged model, from its metadata (mergesmith's own, or
    /// SuperMerger's sd_merge_recipe).
    FromModel {
        /// The merged model.
        file: PathBuf,
        /// Write the recipe here instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a recipe with one `generate` node from the generation parameters an image
    /// carries (A1111 / Forge `parameters`, as mergesmith writes them too).
    FromPng {
        /// The image.
        image: PathBuf,
        /// Write the recipe here instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Import SuperMerger's merge history (mergehistory.csv), or the text of its LoRA merge
    /// (`--loras`), as a recipe.
    FromSupermerger {
        /// The history file.
        #[arg(required_unless_present = "loras", conflicts_with = "loras")]
        csv: Option<PathBuf>,
        /// Only this history ID (default: every row).
        #[arg(long, conflicts_with = "loras")]
        id: Option<u64>,
        /// SuperMerger's LoRA merge text, `NAME:RATIO[:PRESET | :v1,v2,...],...`, read as
        /// SuperMerger reads it (explicit block weights ignore the ratio).
        #[arg(long, value_name = "TEXT")]
        loras: Option<String>,
        /// --loras: SuperMerger's block-weight presets file (`NAME:v1,...` lines; default its
        /// built-in presets).
        #[arg(long, value_name = "FILE", requires = "loras")]
        lora_presets: Option<PathBuf>,
        /// --loras: "remake dimension": no (sum of factors), auto, or a rank (SVD).
        #[arg(long, value_name = "no|auto|RANK", requires = "loras")]
        dim: Option<String>,
        /// --loras: "same to Strength".
        #[arg(long, requires = "loras")]
        same_to_strength: bool,
        /// --loras: the metadata choice (new, new_without_name, merge, all, first).
        #[arg(long, value_parser = super::choice::<MetadataMode>(), requires = "loras")]
        metadata: Option<MetadataMode>,
        /// --loras: save precision (float, fp16, bf16; SuperMerger's default fp16).
        #[arg(long, requires = "loras")]
        precision: Option<String>,
        /// --loras: "Extract from two LoRAs" with this alpha, beta and gamma (smooth).
        #[arg(
            long,
            value_name = "ALPHA,BETA,GAMMA",
            value_delimiter = ',',
            requires = "loras"
        )]
        extract: Option<Vec<f64>>,
        /// Write the recipe here instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Runs `recipe from-model` / `recipe from-png` / `recipe from-supermerger`.
pub fn run(cmd: RecipeCommand) -> Result<()> {
    use mergesmith::recipe::import;
    let (yaml, output, overwrite) = match cmd {
        RecipeCommand::FromModel {
            file,
            output,
            overwrite,
        } => (import::from_model(&file)?, output, overwrite),
        RecipeCommand::FromPng {
            image,
            output,
            overwrite,
        } => (
            mergesmith::recipe::png_info::from_png(&image)?,
            output,
            overwrite,
        ),
        RecipeCommand::FromSupermerger {
            csv,
            id,
            loras,
            lora_presets,
            dim,
            same_to_strength,
            metadata,
            precision,
            extract,
            output,
            overwrite,
        } => {
            let yaml = match (csv, loras) {
                (_, Some(text)) => {
                    let presets = lora_presets
                        .map(|p| std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e)))
                        .transpose()?;
                    let set = import::SupermergerLoras {
                        presets,
                        dim,
                        same_to_strength,
                        metadata,
                        precision,
                        extract: extract
                            .map(|v| {
                                <[f64; 3]>::try_from(v.as_slice()).map_err(|_| {
                                    Error::Invalid(format!(
                                        "--extract takes ALPHA,BETA,GAMMA, got {} values",
                                        v.len()
                                    ))
                                })
                            })
                            .transpose()?,
                    };
                    import::from_supermerger_loras(&text, &set)?
                }
                (Some(csv), None) => import::from_supermerger_history(&csv, id)?,
                (None, None) => {
                    return Err(Error::Invalid(
                        "give SuperMerger's mergehistory.csv or --loras TEXT".into(),
                    ))
                }
            };
            (yaml, output, overwrite)
        }
    };
    match output {
        Some(o) => {
            mergesmith::checkpoint::writer::write_file_atomic(&o, yaml.as_bytes(), overwrite)
        }
        None => {
            print!("{yaml}");
            Ok(())
        }
    }
}
