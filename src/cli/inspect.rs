//! `mergesmith inspect`: a checkpoint's architecture, blocks, metadata and hashes.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use mergesmith::error::Result;

use super::print_json;

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint files (.safetensors, .ckpt, .pt).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print JSON (one object, or an array for several files).
    #[arg(long)]
    pub json: bool,
    /// Skip hashing (no full read of the file).
    #[arg(long)]
    pub no_hash: bool,
    /// List every key with its component and block.
    #[arg(long)]
    pub keys: bool,
    /// Cache directory for the hash memo [default: $MERGESMITH_CACHE, else the user cache dir].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Runs `inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    let memo = super::memo(a.cache.as_deref());
    let memo = (!a.no_hash).then_some(&memo);
    let mut reports = Vec::with_capacity(a.files.len());
    for f in &a.files {
        if !a.json && std::io::stderr().is_terminal() && memo.is_some() {
            eprintln!("inspecting {} ...", f.display());
        }
        reports.push(mergesmith::inspect::inspect(f, memo, a.keys)?);
    }
    if a.json {
        match &reports[..] {
            [one] => print_json(one),
            many => print_json(&many),
        }
    } else {
        let text: Vec<String> = reports.iter().map(mergesmith::inspect::render).collect();
        print!("{}", text.join("\n"));
        Ok(())
    }
}
