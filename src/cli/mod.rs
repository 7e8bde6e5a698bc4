//! The command line: one module per command, each a translation from arguments to a library
//! call and back to printing. Exit codes: 0 success, 1 failure, 2 usage or recipe error.

mod build;
mod cache;
mod dag;
mod explain;
mod families;
mod gen;
mod inspect;
mod log;
mod lora;
mod merge;
mod methods;
mod recipe;
mod serve;
mod sync;
mod synth;
mod verify;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use mergesmith::error::{Error, Result};
use mergesmith::store::Cache;
use mergesmith::text::Named;

/// Stable Diffusion model merging as a reproducible, incremental build.
#[derive(Debug, Parser)]
#[command(name = "mergesmith", version, about, propagate_version = true)]
struct Cli {
    /// Computing threads (default: one per CPU); a model being written has one more for its
    /// I/O. Results do not depend on it.
    #[arg(long, global = true, env = "MERGESMITH_THREADS")]
    threads: Option<usize>,
    /// The command.
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a synthetic checkpoint with the real key layout of an architecture.
    Synth(synth::SynthArgs),
    /// Show a checkpoint's architecture, contents per block, metadata and hashes.
    Inspect(inspect::InspectArgs),
    /// Merge checkpoints (one-shot, without a recipe): SuperMerger's modes on two or three
    /// files, or a list method (ties, dare, slerp, ...) on N files.
    Merge(Box<merge::MergeArgs>),
    /// List the merge methods, what they take and their parameters.
    Methods(methods::MethodsArgs),
    /// Build a recipe's nodes (only what changed since the last build).
    Build(build::BuildArgs),
    /// Show what `build` would do for each node, and why.
    Plan(build::BuildArgs),
    /// Build a recipe, then write a static HTML report of it (sweeps' grids, images, where the
    /// models differ per block, the graph, every node's status) into a folder.
    Report(build::ReportArgs),
    /// Rebuild what an edit made stale whenever the recipe, a file it includes or an input
    /// model is saved (save nodes wait for `build` unless --with-saves).
    Watch(watch::WatchArgs),
    /// `watch`, with the HTML report served on localhost; open pages reload after each build.
    Serve(serve::ServeArgs),
    /// Show a node's key, status, and what its key is computed from.
    Explain(explain::ExplainArgs),
    /// Print the recipe graph (mermaid or dot).
    Dag(dag::DagArgs),
    /// Upload a recipe's stored results and images to a remote cache.
    Push(sync::SyncArgs),
    /// Download a recipe's results and images from a remote cache (verified).
    Pull(sync::SyncArgs),
    /// Cache statistics (`stats`), or check every stored file and remove corrupt ones
    /// (`verify`).
    Cache(cache::CacheArgs),
    /// Delete least recently used cache packs until the cache fits a size budget.
    Gc(cache::GcArgs),
    /// Delete every cached result (the file-hash memo is kept).
    Clean(cache::CleanArgs),
    /// Recipe tools.
    #[command(subcommand)]
    Recipe(recipe::RecipeCommand),
    /// List recorded builds (newest last).
    Log(log::LogArgs),
    /// Check that the inputs and outputs on disk match the recipe's lockfile.
    Verify(verify::VerifyArgs),
    /// Print the JSON Schema of recipe files.
    Schema,
    /// List the model families (layouts, variants, block lists, what each supports).
    Families(families::FamiliesArgs),
    /// LoRA tools.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
    /// Generate images from an SD1, SD2 or SDXL checkpoint into PNGs carrying AUTOMATIC1111's
    /// generation parameters.
    Gen(gen::GenArgs),
}

/// Parses the command line, runs, prints errors, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot start {n} threads: {e}");
            return ExitCode::from(1);
        }
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Recipe(errs)) => {
            eprint!("{}", errs.render());
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                Error::Invalid(_) => 2,
                _ => 1,
            })
        }
    }
}

/// Runs one command.
fn run(command: Command) -> Result<()> {
    match command {
        Command::Synth(a) => synth::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(*a),
        Command::Build(a) => build::build(a),
        Command::Plan(a) => build::plan(a),
        Command::Report(a) => build::report(a),
        Command::Watch(a) => watch::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Explain(a) => explain::run(a),
        Command::Dag(a) => dag::run(a),
        Command::Push(a) => sync::run(a, true),
        Command::Pull(a) => sync::run(a, false),
        Command::Cache(a) => cache::run(a),
        Command::Gc(a) => cache::gc(a),
        Command::Clean(a) => cache::clean(a),
        Command::Recipe(c) => recipe::run(c),
        Command::Log(a) => log::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Schema => {
            print!("{}", mergesmith::recipe::schema_json());
            Ok(())
        }
        Command::Families(a) => families::run(a),
        Command::Methods(a) => methods::run(a),
        Command::Lora(c) => lora::run(c),
        Command::Gen(a) => gen::run(a),
    }
}

/// A value parser for a library enum that lists its names ([`Named`]): its first names are
/// the possible values (aliases accepted, not listed).
fn choice<T: Named + Send + Sync>() -> impl TypedValueParser<Value = T> {
    let values: Vec<PossibleValue> = T::NAMES
        .iter()
        .filter(|(n, _)| T::is_primary(n))
        .map(|(name, v)| {
            let aliases = T::NAMES
                .iter()
                .filter(|(a, w)| w == v && a != name)
                .map(|(a, _)| *a);
            PossibleValue::new(*name).aliases(aliases)
        })
        .collect();
    PossibleValuesParser::new(values)
        .map(|s: String| T::from_name(&s).expect("clap accepts only listed names"))
}

/// Where a command writes its file and how it reports.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Output file.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a JSON report instead of text.
    #[arg(long)]
    json: bool,
}

/// Which cache a command that reads no recipe works on: by `store::locate`'s rule, the one
/// `build` uses for the same recipe.
#[derive(Debug, Args)]
struct CacheLocation {
    /// Cache directory [default: $MERGESMITH_CACHE, else cache/ beside --recipe].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// The recipe whose cache this is (its `cache/` folder) [default: ./mergesmith.yaml,
    /// i.e. ./cache].
    #[arg(long, value_name = "RECIPE", default_value = mergesmith::store::DEFAULT_RECIPE)]
    recipe: PathBuf,
}

impl CacheLocation {
    /// The cache.
    fn open(&self) -> Cache {
        Cache::new(&mergesmith::store::locate(
            self.cache.as_deref(),
            Some(&self.recipe),
        ))
    }
}

/// `NAME=VALUE` of `--set`.
fn parse_set(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("`{text}`: expected NAME=VALUE")),
    }
}

/// Prints a value as pretty JSON.
fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// Reads a recipe, with `--set` overrides.
fn load_recipe(path: &Path, sets: &[(String, String)]) -> Result<mergesmith::recipe::Recipe> {
    mergesmith::recipe::load_with(path, sets).map_err(|e| Error::Recipe(Box::new(e)))
}

/// The cache of a recipe command (`store::locate`), reading through to `remote` if given.
fn recipe_cache(recipe: &Path, dir: Option<&Path>, remote: Option<&str>) -> Result<Cache> {
    let cache = Cache::new(&mergesmith::store::locate(dir, Some(recipe)));
    Ok(match remote {
        Some(url) => cache.with_remote(mergesmith::store::remote::Remote::open(url)?),
        None => cache,
    })
}

/// The hash memo of a command that reads no recipe (`store::locate`).
fn memo(dir: Option<&Path>) -> mergesmith::hashing::HashMemo {
    mergesmith::store::memo(&mergesmith::store::locate(dir, None))
}
