//! The edit loop behind `mergesmith watch` and `serve`: build what the recipe's state makes
//! stale, then wait until a watched file changes (the recipe, a file it includes, an input
//! model or LoRA, the tokenizer) and build again. A change during a build cancels it (it
//! stops between nodes, tensors and sampling steps; what it was writing is dropped) and the
//! next build starts from the new state. A recipe that does not read is reported and waited
//! on like any other state. Files are polled (size and modification time), which works the
//! same on every platform and filesystem, network mounts included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{BuildOptions, NodeReport, Status};
use crate::error::{Error, Result};
use crate::recipe::Recipe;
use crate::store::Cache;

/// What the loop does and sees, in order.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Files changed since the last build started.
    Changed {
        /// The files.
        files: Vec<PathBuf>,
    },
    /// What the next build runs, with the plan's reasons.
    Planned {
        /// The build's number (1, 2, ...).
        number: u64,
        /// (node, why) for every node that runs.
        runs: Vec<(String, Vec<String>)>,
    },
    /// A build finished.
    Built {
        /// Its number.
        number: u64,
        /// Nodes built.
        built: Vec<String>,
        /// Nodes found in the cache.
        cached: usize,
        /// Nodes that failed (the others were built).
        failures: Vec<String>,
        /// Wall seconds.
        seconds: f64,
    },
    /// A build was stopped by a newer edit.
    Cancelled {
        /// Its number.
        number: u64,
    },
    /// The recipe does not read, or the build failed as a whole.
    Error {
        /// What went wrong, as the command line shows it.
        message: String,
    },
}

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How builds run.
    pub build: BuildOptions,
    /// `--set NAME=VALUE` overrides.
    pub sets: Vec<(String, String)>,
    /// The tokenizer of generate nodes, in place of the recipe's.
    pub tokenizer: Option<PathBuf>,
    /// Build save nodes too (by default they and what only they read are left out).
    pub with_saves: bool,
    /// How often files are checked.
    pub interval: Duration,
    /// Stop after this many builds (tests and scripts); `None`: until the process ends.
    pub builds: Option<u64>,
}

/// A file's size and modification time, or nothing when it is missing.
type Stamp = Option<(u64, SystemTime)>;

fn stamps(files: &[PathBuf]) -> BTreeMap<PathBuf, Stamp> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (
                f.clone(),
                m.and_then(|m| Some((m.len(), m.modified().ok()?))),
            )
        })
        .collect()
}

/// The files of `then` whose stamp differs now.
fn changed(then: &BTreeMap<PathBuf, Stamp>) -> Vec<PathBuf> {
    let now = stamps(&then.keys().cloned().collect::<Vec<_>>());
    then.iter()
        .filter(|(f, s)| now.get(*f) != Some(s))
        .map(|(f, _)| f.clone())
        .collect()
}

/// Every file a recipe reads: its sources, models (LoRAs included) and tokenizer.
fn inputs(recipe: &Recipe) -> Vec<PathBuf> {
    let mut files = recipe.sources.clone();
    files.extend(recipe.models.values().map(|(p, _)| p.clone()));
    files.extend(recipe.tokenizer.clone());
    files.sort();
    files.dedup();
    files
}

/// The nodes a watch builds: every node but the `save` nodes and what only they read, unless
/// `with_saves` (then every node); nodes kept in memory are built when those need them. A
/// recipe of merges and saves alone builds its merges.
pub fn targets(recipe: &Recipe, with_saves: bool) -> Vec<String> {
    if with_saves {
        return Vec::new();
    }
    let is_save = |n: &str| recipe.nodes[n].kind().name == "save";
    let mut readers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, node) in &recipe.nodes {
        for i in node.node_inputs() {
            readers.entry(i).or_default().push(name);
        }
    }
    // Dependents come after their inputs in `order`: walk it backwards.
    let mut save_only: BTreeMap<&str, bool> = BTreeMap::new();
    for name in recipe.order.iter().rev() {
        let only = match readers.get(name.as_str()) {
            Some(rs) => rs
                .iter()
                .all(|r| is_save(r) || save_only.get(r).copied().unwrap_or(false)),
            None => false,
        };
        save_only.insert(name, only);
    }
    // Nodes kept in memory are built when a target needs them, not for themselves.
    let wanted: Vec<String> = recipe
        .order
        .iter()
        .filter(|n| !is_save(n) && !save_only[n.as_str()] && !recipe.nodes[*n].in_memory())
        .cloned()
        .collect();
    if wanted.is_empty() {
        // Merges and saves only: build the merges, not the files.
        return recipe
            .order
            .iter()
            .filter(|n| !is_save(n))
            .cloned()
            .collect();
    }
    wanted
}

/// Runs the loop for `path`, telling `on` everything; `after` runs after each finished build
/// with its recipe and reports (serve writes its site there). Returns after
/// `opts.builds` builds, or never.
pub fn watch(
    path: &Path,
    cache: &Cache,
    opts: &WatchOptions,
    on: &(dyn Fn(&Event) + Sync),
    after: &dyn Fn(&Recipe, &[NodeReport]) -> Result<()>,
) -> Result<()> {
    let mut files = vec![path.to_path_buf()];
    let mut number = 0u64;
    loop {
        crate::progress::clear_cancel();
        let recipe = match crate::recipe::load_with(path, &opts.sets) {
            Ok(mut r) => {
                if opts.tokenizer.is_some() {
                    r.tokenizer = opts.tokenizer.clone();
                }
                files = inputs(&r);
                Some(r)
            }
            Err(errs) => {
                // Keep watching what was read, and what the last good recipe read.
                files.extend(errs.files());
                files.sort();
                files.dedup();
                on(&Event::Error {
                    message: errs.render(),
                });
                None
            }
        };
        let seen = stamps(&files);
        if let Some(recipe) = recipe {
            number += 1;
            run_one(&recipe, path, cache, opts, number, &seen, on, after)?;
            if opts.builds.is_some_and(|n| number >= n) {
                return Ok(());
            }
        }
        // Wait for a change (one already made during the build is seen at once).
        loop {
            let moved = changed(&seen);
            if !moved.is_empty() {
                on(&Event::Changed { files: moved });
                break;
            }
            std::thread::sleep(opts.interval);
        }
    }
}

/// Plans and runs build `number`, cancelling it when a file of `seen` changes meanwhile.
#[allow(clippy::too_many_arguments)]
fn run_one(
    recipe: &Recipe,
    path: &Path,
    cache: &Cache,
    opts: &WatchOptions,
    number: u64,
    seen: &BTreeMap<PathBuf, Stamp>,
    on: &(dyn Fn(&Event) + Sync),
    after: &dyn Fn(&Recipe, &[NodeReport]) -> Result<()>,
) -> Result<()> {
    let targets = targets(recipe, opts.with_saves);
    let plan = match super::plan(recipe, cache, &targets) {
        Ok(p) => p,
        Err(e) => {
            on(&Event::Error {
                message: e.to_string(),
            });
            return Ok(());
        }
    };
    let runs: Vec<(String, Vec<String>)> = plan
        .iter()
        .filter_map(|p| match &p.status {
            Status::Miss(why) => Some((p.name.clone(), why.clone())),
            _ => None,
        })
        .collect();
    on(&Event::Planned { number, runs });
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        let build = s.spawn(|| super::build(recipe, cache, &targets, &opts.build));
        while !build.is_finished() {
            std::thread::sleep(opts.interval);
            if !changed(seen).is_empty() {
                crate::progress::request_cancel();
            }
        }
        build
            .join()
            .unwrap_or_else(|_| Err(Error::Failed("the build panicked".into())))
    });
    // A node stopped by the request fails like any other under keep-going: the build was
    // cancelled all the same (what finished before is in the cache and the log).
    let cancelled = crate::progress::check_cancel().is_err();
    match result {
        Ok(reports) if cancelled => {
            cache.append_log(path, &reports)?;
            on(&Event::Cancelled { number });
        }
        Ok(reports) => {
            cache.append_log(path, &reports)?;
            let failures: Vec<String> = reports.iter().filter_map(|r| r.error.clone()).collect();
            let built = reports
                .iter()
                .filter(|r| matches!(r.plan.status, Status::Miss(_)) && r.error.is_none())
                .map(|r| r.plan.name.clone())
                .collect();
            let cached = reports
                .iter()
                .filter(|r| r.plan.status == Status::Hit)
                .count();
            if let Err(e) = after(recipe, &reports) {
                on(&Event::Error {
                    message: e.to_string(),
                });
            }
            on(&Event::Built {
                number,
                built,
                cached,
                failures,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Err(Error::Cancelled) => on(&Event::Cancelled { number }),
        Err(e) => on(&Event::Error {
            message: e.to_string(),
        }),
    }
    Ok(())
}
