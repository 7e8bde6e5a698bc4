//! `mergesmith families`: the model families mergesmith knows (from `data/families/`).

use clap::Args;
use mergesmith::arch::Family;
use mergesmith::error::Result;

use super::print_json;

/// Arguments of `families`.
#[derive(Debug, Args)]
pub struct FamiliesArgs {
    /// Print JSON instead of the Markdown table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `families`.
pub fn run(a: FamiliesArgs) -> Result<()> {
    if a.json {
        let all: Vec<_> = Family::all().map(Family::summary).collect();
        return print_json(&all);
    }
    print!("{}", mergesmith::arch::family::markdown_table());
    Ok(())
}
