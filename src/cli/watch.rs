//! `mergesmith watch`: rebuild what an edit made stale, every time the recipe, a file it
//! includes or an input is saved.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mergesmith::build::watch::{Event, WatchOptions};
use mergesmith::error::Result;

use super::{parse_set, recipe_cache};

/// Arguments of `watch` (and of `serve`).
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The recipe file.
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Where merge arithmetic runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: mergesmith::device::ComputeDevice,
    /// Nodes built at the same time.
    #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// Override a var of the recipe (repeatable), e.g. `--set strength=0.4`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
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
                    device: self.device,
                },
                jobs: self.jobs,
                keep_going: true,
            },
            sets: self.set.clone(),
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
    let cache = recipe_cache(&a.recipe, a.cache.as_deref(), None)?;
    let json = a.json;
    mergesmith::build::watch::watch(
        &a.recipe,
        &cache,
        &a.options(),
        &|e| print(e, json),
        &|_, _| Ok(()),
    )
}
