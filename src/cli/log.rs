//! `mergesmith log`: recorded builds.

use clap::Args;
use mergesmith::error::Result;

use super::{print_json, CacheLocation};

/// Arguments of `log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Show the last N builds.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub count: usize,
    /// Which cache.
    #[command(flatten)]
    pub location: CacheLocation,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `log`.
pub fn run(a: LogArgs) -> Result<()> {
    let log = a.location.open().log();
    let tail = &log[log.len().saturating_sub(a.count)..];
    if a.json {
        return print_json(&tail);
    }
    for e in tail {
        let names: Vec<&str> = e.built.iter().map(|(n, _)| n.as_str()).collect();
        println!(
            "#{:<4} {}  {}  built: {}  cached: {}",
            e.id,
            mergesmith::build::log::utc(e.time),
            e.recipe.display(),
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(", ")
            },
            e.cached
        );
    }
    Ok(())
}
