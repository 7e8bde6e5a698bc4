//! `mergesmith log`: recorded builds.

use std::path::PathBuf;

use clap::Args;
use mergesmith::error::{Error, Result};

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
    /// List the merges built, with their merge IDs and settings, instead of the builds.
    #[arg(long)]
    pub merges: bool,
    /// With --merges: only merges whose node, recipe, models or settings contain TEXT.
    #[arg(long, value_name = "TEXT", requires = "merges")]
    pub search: Option<String>,
    /// With --merges: the merge behind this image (a PNG a build here generated; its merge ID
    /// and settings).
    #[arg(
        long,
        value_name = "PNG",
        requires = "merges",
        conflicts_with = "search"
    )]
    pub image: Option<PathBuf>,
    /// Write every merge built as SuperMerger's mergehistory.csv (read back by `recipe
    /// from-supermerger`).
    #[arg(long, value_name = "FILE")]
    pub mergehistory: Option<PathBuf>,
    /// Replace an existing --mergehistory file.
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `log`.
pub fn run(a: LogArgs) -> Result<()> {
    if a.merges || a.mergehistory.is_some() {
        return merges(&a);
    }
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

/// `log --merges` and `log --mergehistory FILE`.
fn merges(a: &LogArgs) -> Result<()> {
    let cache = a.location.open();
    let all = cache.merges();
    if let Some(path) = &a.mergehistory {
        let csv = mergesmith::build::merges::mergehistory_csv(&all, &cache.memo().by_blake3());
        mergesmith::checkpoint::writer::write_file_atomic(path, csv.as_bytes(), a.overwrite)?;
        eprintln!("wrote {} ({} merges)", path.display(), all.len());
        if !a.merges {
            return Ok(());
        }
    }
    let found;
    let shown: Vec<_> = match &a.image {
        Some(png) => {
            let bytes = std::fs::read(png).map_err(|e| Error::io(png, e))?;
            let text = mergesmith::gen::png::read_text(&bytes)?;
            let key = text
                .iter()
                .find(|(k, _)| k == "mergesmith")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: no mergesmith key in its PNG info (not an image mergesmith made)",
                        png.display()
                    ))
                })?;
            found = cache.merge_of_image(&key).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no merge built in the cache {} made it (image {key}: generated \
                     elsewhere, from a model file, or from a list merge; --recipe or --cache \
                     picks another cache)",
                    png.display(),
                    cache.root().display()
                ))
            })?;
            vec![&found]
        }
        None => all
            .iter()
            .filter(|m| a.search.as_deref().is_none_or(|t| m.matches(t)))
            .collect(),
    };
    let tail = &shown[shown.len().saturating_sub(a.count)..];
    if a.json {
        return print_json(&tail);
    }
    for m in tail {
        println!("{}", m.line());
    }
    Ok(())
}
