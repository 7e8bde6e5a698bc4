//! `mergesmith dag`: the recipe graph as mermaid or dot.

use std::path::PathBuf;

use clap::Args;
use mergesmith::error::Result;
use mergesmith::recipe::DagFormat;

use super::choice;

/// Arguments of `dag`.
#[derive(Debug, Args)]
pub struct DagArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Output format.
    #[arg(long, value_parser = choice::<DagFormat>(), default_value = "mermaid")]
    pub format: DagFormat,
}

/// Runs `dag`.
pub fn run(a: DagArgs) -> Result<()> {
    let recipe = super::load_recipe(&a.recipe, &[])?;
    print!("{}", recipe.dag(a.format));
    Ok(())
}
