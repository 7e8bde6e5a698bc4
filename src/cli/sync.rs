//! `mergesmith push` / `pull`: a recipe's results and images to and from a remote cache.

use std::path::PathBuf;

use clap::Args;
use mergesmith::error::{Error, Result};

use mergesmith::store::remote::Kind;

use super::{load_recipe, parse_set, print_json, recipe_cache};

/// `mergesmith push` / `pull`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The recipe file.
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Nodes to sync (with what they need); all nodes when none are given.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// The remote cache: s3://BUCKET[/PREFIX] (credentials from the AWS environment or
    /// profile), file:///DIR or a directory.
    #[arg(long, env = "MERGESMITH_REMOTE", value_name = "URL")]
    pub remote: String,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Override a var of the recipe (repeatable), e.g. `--set strength=0.4`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `push` / `pull`: every result and image the recipe's plan names.
pub fn run(a: SyncArgs, push: bool) -> Result<()> {
    let recipe = load_recipe(&a.recipe, &a.set)?;
    let cache = recipe_cache(&a.recipe, a.cache.as_deref(), Some(&a.remote))?;
    let plan = mergesmith::build::plan(&recipe, &cache, &a.targets)?;
    let items: Vec<(String, Kind)> = plan
        .iter()
        .flat_map(|p| recipe.nodes[&p.name].stored_objects(&p.key, &p.preimage))
        .collect();
    let verb = if push { "push" } else { "pull" };
    let bar = mergesmith::progress::count(items.len() as u64, verb, !a.json);
    let (mut here, mut created) = (0usize, 0usize);
    let mut failures = Vec::new();
    for (key, kind) in &items {
        let done = match push {
            true => cache.push(key, *kind).map(|(stored, new)| {
                created += usize::from(new);
                stored
            }),
            false => cache.pull(key, *kind),
        };
        match done {
            Ok(present) => here += usize::from(present),
            Err(e) => failures.push(e.to_string()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summary = cache.remote().expect("sync has a remote").finish();
    if a.json {
        print_json(&serde_json::json!({
            "items": items.len(),
            "present": here,
            "entries_created": created,
            "failures": failures,
            "remote": summary,
        }))?;
    } else {
        for f in &failures {
            eprintln!("failed: {f}");
        }
        match push {
            true => println!(
                "{here} of {} results and images are stored here; {created} new on the remote",
                items.len()
            ),
            false => println!("{here} of {} results and images are here now", items.len()),
        }
        println!("{}", summary.line());
    }
    match failures.len() {
        0 => Ok(()),
        n => Err(Error::Failed(format!(
            "{n} of {} failed to {verb}",
            items.len()
        ))),
    }
}
