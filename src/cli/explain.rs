//! `mergesmith explain`: a node's key, status and preimage.

use std::path::PathBuf;

use clap::Args;
use mergesmith::build::Status;
use mergesmith::error::{Error, Result};

use super::{load_recipe, recipe_cache};

/// Arguments of `explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// The node.
    pub node: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Runs `explain`.
pub fn run(a: ExplainArgs) -> Result<()> {
    let recipe = load_recipe(&a.recipe, &[])?;
    let cache = recipe_cache(&a.recipe, a.cache.as_deref(), None)?;
    let plan = mergesmith::build::plan(&recipe, &cache, std::slice::from_ref(&a.node))?;
    let node = plan
        .iter()
        .find(|p| p.name == a.node)
        .expect("the target is planned");
    println!("node:  {}", node.name);
    println!("key:   {}", node.key);
    match &node.status {
        Status::Hit => println!("state: up to date"),
        Status::Miss(why) => println!("state: stale: {}", why.join("; ")),
        Status::Skip(why) => println!("state: skipped: {why}"),
    }
    let pretty =
        serde_json::to_string_pretty(&node.preimage).map_err(|e| Error::Invalid(e.to_string()))?;
    println!("key computed from:\n{pretty}");
    Ok(())
}
