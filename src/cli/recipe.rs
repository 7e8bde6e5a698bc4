//! `mergesmith recipe ...`: recipes from merged models, images' generation parameters and
//! SuperMerger's history.

use std::path::PathBuf;

use clap::Subcommand;
use mergesmith::error::Result;

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
    /// Import SuperMerger's merge history (mergehistory.csv) as a recipe.
    FromSupermerger {
        /// The history file.
        csv: PathBuf,
        /// Only this history ID (default: every row).
        #[arg(long)]
        id: Option<u64>,
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
            output,
            overwrite,
        } => (
            import::from_supermerger_history(&csv, id)?,
            output,
            overwrite,
        ),
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
