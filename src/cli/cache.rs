//! `mergesmith cache`, `gc` and `clean`: statistics, verification, garbage collection.

use clap::Args;
use mergesmith::error::{Error, Result};
use mergesmith::inspect::human_bytes;

use super::{print_json, CacheLocation};

/// Arguments of `cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// `stats` (the default), or `verify`: check packs against their recorded blake3,
    /// images and manifests by decoding them, and remove what fails.
    #[arg(default_value = "stats", value_parser = ["stats", "verify"])]
    pub action: String,
    /// Which cache.
    #[command(flatten)]
    pub location: CacheLocation,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Size budget, e.g. 50G or 500M.
    #[arg(long, value_name = "SIZE")]
    pub max_size: String,
    /// Which cache.
    #[command(flatten)]
    pub location: CacheLocation,
}

/// Arguments of `clean`.
#[derive(Debug, Args)]
pub struct CleanArgs {
    /// Which cache.
    #[command(flatten)]
    pub location: CacheLocation,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cache stats` / `cache verify`.
pub fn run(a: CacheArgs) -> Result<()> {
    let cache = a.location.open();
    if a.action == "verify" {
        let v = cache.verify()?;
        if a.json {
            print_json(&v)?;
        } else {
            println!(
                "checked {} files ({}): {} corrupt, removed{}",
                v.checked,
                human_bytes(v.bytes),
                v.removed.len(),
                match v.unrecorded {
                    0 => String::new(),
                    n => format!("; {n} packs predate recorded digests (headers checked)"),
                }
            );
        }
        return match v.removed.len() {
            0 => Ok(()),
            n => Err(Error::Failed(format!("{n} corrupt file(s) removed"))),
        };
    }
    let stats = cache.stats();
    if a.json {
        return print_json(&stats);
    }
    println!(
        "{}: {} results in {} packs, {}",
        stats.path.display(),
        stats.results,
        stats.packs,
        human_bytes(stats.bytes)
    );
    Ok(())
}

/// Runs `gc`.
pub fn gc(a: GcArgs) -> Result<()> {
    let max = mergesmith::store::maintenance::parse_size(&a.max_size)?;
    let (n, freed) = a.location.open().gc(max)?;
    println!("removed {n} packs, freed {}", human_bytes(freed));
    Ok(())
}

/// Runs `clean`.
pub fn clean(a: CleanArgs) -> Result<()> {
    let before = a.location.open().clean()?;
    if a.json {
        return print_json(&before);
    }
    println!(
        "removed {} results, {} packs ({})",
        before.results,
        before.packs,
        human_bytes(before.bytes)
    );
    Ok(())
}
