//! `mergesmith verify`: inputs and outputs on disk against the recipe's lockfile.

use std::path::PathBuf;

use clap::Args;
use mergesmith::error::{Error, Result};

use super::print_json;

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The recipe file (its lock is `<recipe>.lock` beside it).
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Rebuild every output from the inputs in a fresh temporary cache (beside the recipe)
    /// and compare its hashes with the lock, instead of re-hashing the files on disk.
    #[arg(long)]
    pub rebuild: bool,
    /// Nodes built at the same time with `--rebuild`.
    #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `verify`.
pub fn run(a: VerifyArgs) -> Result<()> {
    use mergesmith::build::lock;
    let problems = if a.rebuild {
        let opts = mergesmith::build::BuildOptions {
            run: mergesmith::merge::RunOptions {
                overwrite: true,
                progress: !a.json,
                device: Default::default(),
            },
            jobs: a.jobs,
            keep_going: false,
        };
        lock::verify_rebuild(&super::load_recipe(&a.recipe, &[])?, &opts)?
    } else {
        lock::verify(&a.recipe)?
    };
    if a.json {
        print_json(&problems)?;
    } else if problems.is_empty() {
        println!(
            "all inputs and outputs match {}",
            lock::lock_path(&a.recipe).display()
        );
    } else {
        for p in &problems {
            println!("{} ({}): {}", p.name, p.path.display(), p.problem);
        }
    }
    match problems.len() {
        0 => Ok(()),
        n => Err(Error::Failed(format!("{n} differences from the lockfile"))),
    }
}
