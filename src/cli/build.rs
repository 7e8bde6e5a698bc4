//! `mergesmith build`, `plan` and `report`: a recipe built incrementally, its plan, its site.

use std::path::{Path, PathBuf};

use clap::Args;
use mergesmith::error::{Error, Result};
use mergesmith::store::Cache;

use super::{load_recipe, parse_set, print_json, recipe_cache};

/// Arguments of `build` and `plan`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe and how it is built.
    #[command(flatten)]
    pub common: RecipeArgs,
    /// Nodes to build (with what they need); all nodes when none are given.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Show what would be built (like `plan`) without building.
    #[arg(long)]
    pub dry_run: bool,
    /// Build everything that does not depend on a failed node (a sweep draws failed cells
    /// grey); report the failures and exit with an error at the end.
    #[arg(long)]
    pub keep_going: bool,
    /// A remote cache shared with other machines: s3://BUCKET[/PREFIX] (credentials from
    /// the AWS environment or profile), file:///DIR or a directory. Local misses it holds are
    /// downloaded (verified) when needed; what is built is uploaded in the background.
    #[arg(long, env = "MERGESMITH_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Build slice I of N (0 <= I < N): sweep cells and independent targets, balanced by
    /// estimated cost; the same on every machine. Sweep grids and saves are left to a final
    /// build or report.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<mergesmith::build::shard::Shard>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `build`, `plan`, `report`, `watch` and `serve` share: the recipe and how its nodes
/// are built.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file.
    #[arg(default_value = "mergesmith.yaml", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside the recipe].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Where merge arithmetic runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: mergesmith::device::ComputeDevice,
    /// Nodes built at the same time (each merge also uses every thread of `--threads`).
    #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
    pub jobs: usize,
    /// The CLIP tokenizer.json of generate nodes [default: the recipe's `tokenizer:`, else
    /// $MERGESMITH_TOKENIZER, else the Hugging Face cache, else the bundled CLIP vocabulary].
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Override a var of the recipe (repeatable), e.g. `--set strength=0.4`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
}

/// `mergesmith report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The build (recipe, targets, cache, device...).
    #[command(flatten)]
    pub build: BuildArgs,
    /// The folder the site is written to (created; pages are replaced, images kept).
    #[arg(long, short = 'o', default_value = "site", value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `build` (`plan` with `--dry-run`).
pub fn build(a: BuildArgs) -> Result<()> {
    let dry = a.dry_run;
    run(a, dry, None)
}

/// Runs `plan`.
pub fn plan(a: BuildArgs) -> Result<()> {
    run(a, true, None)
}

/// Runs `report`: a build, then the site.
pub fn report(a: ReportArgs) -> Result<()> {
    run(a.build, false, Some(&a.out))
}

/// A build, a plan (`plan_only`) or a build and its site (`report`), then the remote's
/// summary.
fn run(a: BuildArgs, plan_only: bool, report: Option<&Path>) -> Result<()> {
    let cache = recipe_cache(
        &a.common.recipe,
        a.common.cache.as_deref(),
        a.remote.as_deref(),
    )?;
    let json = a.json;
    let result = build_with(a, &cache, plan_only, report);
    if let Some(remote) = cache.remote() {
        let summary = remote.finish();
        let moved = summary.uploaded_objects + summary.downloaded_objects + summary.discarded;
        if !json && (moved > 0 || !summary.errors.is_empty()) {
            eprintln!("{}", summary.line());
        }
    }
    result
}

fn build_with(
    mut a: BuildArgs,
    cache: &Cache,
    plan_only: bool,
    report: Option<&Path>,
) -> Result<()> {
    use mergesmith::build::Status;
    let mut recipe = load_recipe(&a.common.recipe, &a.common.set)?;
    if a.common.tokenizer.is_some() {
        recipe.tokenizer = a.common.tokenizer.clone();
    }
    if let Some(shard) = a.shard {
        a.targets = mergesmith::build::shard::targets(&recipe, &a.targets, shard)?;
        if !a.json {
            eprintln!(
                "shard {}/{}: {}",
                shard.index,
                shard.count,
                match a.targets.is_empty() {
                    true => "nothing to build".to_string(),
                    false => a.targets.join(", "),
                }
            );
        }
        if a.targets.is_empty() {
            return match a.json {
                true => print_json(&Vec::<()>::new()),
                false => Ok(()),
            };
        }
    }
    if plan_only {
        let plan = mergesmith::build::plan(&recipe, cache, &a.targets)?;
        if a.json {
            return print_json(&plan);
        }
        for p in &plan {
            match &p.status {
                Status::Hit => println!("HIT   {}  ({})", p.name, &p.key[..12]),
                Status::Miss(why) => {
                    println!("MISS  {}  ({}): {}", p.name, &p.key[..12], why.join("; "))
                }
                Status::Skip(why) => println!("SKIP  {}  ({}): {why}", p.name, &p.key[..12]),
            }
        }
        return Ok(());
    }
    let opts = mergesmith::build::BuildOptions {
        run: mergesmith::merge::RunOptions {
            overwrite: true,
            progress: !a.json,
            device: a.common.device,
        },
        jobs: a.common.jobs,
        keep_going: a.keep_going,
    };
    let started = std::time::Instant::now();
    let reports = mergesmith::build::build(&recipe, cache, &a.targets, &opts)?;
    let lock = mergesmith::build::lock::write(&recipe, &cache.memo())?;
    let id = cache.append_log(&a.common.recipe, &reports)?;
    let site = report
        .map(|out| mergesmith::report::write(&recipe, cache, &reports, out))
        .transpose()?;
    let failures: Vec<&String> = reports.iter().filter_map(|r| r.error.as_ref()).collect();
    let failed = || -> Result<()> {
        match failures.len() {
            0 => Ok(()),
            n => Err(Error::Failed(format!("{n} node(s) failed"))),
        }
    };
    if a.json {
        match site {
            Some(site) => print_json(&serde_json::json!({ "nodes": reports, "site": site }))?,
            None => print_json(&reports)?,
        };
        return failed();
    }
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if let Some(site) = &site {
        println!(
            "report: {} ({} pages, {} new images)",
            site.index.display(),
            site.pages.len(),
            site.images_copied
        );
    }
    let built = reports
        .iter()
        .filter(|r| matches!(r.plan.status, Status::Miss(_)))
        .count();
    for r in &reports {
        match &r.plan.status {
            Status::Hit => println!("cached  {}", r.plan.name),
            Status::Skip(why) => println!("skipped {}  ({why})", r.plan.name),
            Status::Miss(_) => println!(
                "built   {}  {:.1} s{}{}",
                r.plan.name,
                r.seconds,
                match (r.stored, r.reused) {
                    (Some(c), Some(u)) => {
                        format!("  ({})", recipe.nodes[&r.plan.name].describe(c, u))
                    }
                    _ => String::new(),
                },
                r.output
                    .as_ref()
                    .map(|o| format!("  -> {}", o.display()))
                    .unwrap_or_default()
            ),
        }
    }
    let cached = reports
        .iter()
        .filter(|r| r.plan.status == Status::Hit)
        .count();
    println!(
        "build #{id}: {} nodes, {built} built, {cached} cached, {} skipped, in {:.1} s; hashes in {}",
        reports.len(),
        reports.len() - built - cached,
        started.elapsed().as_secs_f64(),
        lock.display()
    );
    failed()
}
