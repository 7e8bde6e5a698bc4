//! `mergesmith watch`: rebuild what an edit made stale, every time the recipe, a file it
//! includes or an input is saved.

use std::time::Duration;

use clap::Args;
use mergesmith::build::watch::{Event, WatchOptions};
use mergesmith::error::Result;

use super::build::RecipeArgs;
use super::recipe_cache;

/// Arguments of `watch` (and of `serve`).
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The recipe and how it is built.
    #[command(flatten)]
    pub common: RecipeArgs,
    /// Build `save` nodes too (by default they, and what only they read, wait for `build`).
    #[arg(long)]
    pub with_saves: bool,
    /// How often files are checked, in milliseconds.
    #[arg(long, default_value_t = 250, value_name = "MS")]
    pub interval: u64,
    /// Stop after N builds (for scripts and tests) [default: run until interrupted].
    #[arg(long, value_name = "N")]
    pub builds: Option<u64>,
    /// Print one JSON object per event (changed, planned, built, cancelled, error).
    #[arg(long)]
    pub json: bool,
}

impl WatchArgs {
    /// The loop's options.
    pub fn options(&self) -> WatchOptions {
        WatchOptions {
            build: mergesmith::build::BuildOptions {
                run: mergesmith::merge::RunOptions {
                    overwrite: true,
                    progress: !self.json,
                    device: self.common.device,
                },
                jobs: self.common.jobs,
                keep_going: true,
            },
            sets: self.common.set.clone(),
            tokenizer: self.common.tokenizer.clone(),
            with_saves: self.with_saves,
            interval: Duration::from_millis(self.interval.max(10)),
            builds: self.builds,
        }
    }
}

/// Prints an event: a JSON line, or text for a person.
pub fn print(e: &Event, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    match e {
        Event::Changed { files } => {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            println!("changed: {}", names.join(", "));
        }
        Event::Planned { number, runs } if runs.is_empty() => {
            println!("build {number}: up to date")
        }
        Event::Planned { number, runs } => {
            println!("build {number}:");
            for (node, why) in runs {
                println!("  {node}: {}", why.join("; "));
            }
        }
        Event::Built {
            number,
            built,
            cached,
            failures,
            seconds,
        } => {
            for f in failures {
                println!("  failed: {f}");
            }
            println!(
                "build {number}: {} built, {cached} cached, {} failed in {seconds:.1} s; waiting for changes",
                built.len(),
                failures.len()
            );
        }
        Event::Cancelled { number } => println!("build {number}: cancelled by a newer edit"),
        Event::Error { message } => println!("{message}\nwaiting for changes"),
    }
}

/// Runs `watch`.
pub fn run(a: WatchArgs) -> Result<()> {
    let cache = recipe_cache(&a.common.recipe, a.common.cache.as_deref(), None)?;
    let json = a.json;
    mergesmith::build::watch::watch(
        &a.common.recipe,
        &cache,
        &a.options(),
        &|e| print(e, json),
        &|_, _| Ok(()),
    )
}
