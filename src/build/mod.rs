//! Building a recipe: content keys, the node store, and incremental execution.
//!
//! Every node gets a key: blake3 over a canonical JSON "preimage" of what determines its
//! result (operation, normalized parameters, the keys of its inputs, the algorithm version).
//! A model's key is the blake3 of its file contents (memoized on path, size, mtime, inode),
//! so renaming a file changes nothing and editing its bytes changes exactly its dependents.
//! A merge node's result is stored as a manifest over tensor packs (see [`crate::store`]); a save
//! node writes it to its destination. The last build's keys and preimages are kept per
//! recipe, so `plan` can say why a node must be rebuilt.
//!
//! Work is pulled from the targets: a node runs only when it is out of date and something
//! demanded needs it, so a node whose dependents are all up to date is skipped (that is how
//! `cache: memory` nodes cost nothing once what they feed exists).
//!
//! Where the cache is and how it is laid out: [`crate::store`].

pub mod diff;
mod keys;
pub mod lock;
pub mod log;
pub mod merges;
mod plan;
mod schedule;
pub mod shard;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::merge::RunOptions;
use crate::nodes::RunCx;
use crate::recipe::Recipe;
use crate::store::{Cache, Store};
pub(crate) use plan::{default_targets, needed};
pub use plan::{plan, plan_checked};

/// Whether a node must run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "why")]
pub enum Status {
    /// The result is in the cache (or the output file is up to date).
    Hit,
    /// It must be (re)built, and why.
    Miss(Vec<String>),
    /// Not up to date, but nothing demanded needs it now, and why.
    Skip(String),
}

/// One node of a plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodePlan {
    /// Node name.
    pub name: String,
    /// Its key.
    pub key: String,
    /// Hit, miss or skip.
    #[serde(flatten)]
    pub status: Status,
    /// What the key was computed from.
    #[serde(skip)]
    pub preimage: Value,
}

/// What a build did for one node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeReport {
    /// The node's plan entry.
    #[serde(flatten)]
    pub plan: NodePlan,
    /// Seconds spent building it (0 for hits).
    pub seconds: f64,
    /// The file it wrote, for save nodes; the directory, for generate nodes with `to`.
    pub output: Option<PathBuf>,
    /// Merge nodes built: tensors written to the store (computed, or copied from an input
    /// file because no stored pack held them yet); generate nodes: images made.
    pub stored: Option<usize>,
    /// Merge nodes built: tensors an earlier result already held (referred to, not stored);
    /// generate nodes: images found in the cache.
    pub reused: Option<usize>,
    /// Why it failed (`--keep-going` builds; otherwise the build stops with the error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeReport {
    /// The report of a node that did not run (a hit or a skip), and the starting point of one
    /// that does.
    fn nothing_done(p: &NodePlan) -> Self {
        NodeReport {
            plan: p.clone(),
            seconds: 0.0,
            output: None,
            stored: None,
            reused: None,
            error: None,
        }
    }
}

/// How a build runs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// How merges run (device, progress).
    pub run: RunOptions,
    /// Nodes built at the same time (each merge is parallel inside as well).
    pub jobs: usize,
    /// Build everything that does not depend on a failed node (failures in the reports).
    pub keep_going: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            run: RunOptions::default(),
            jobs: 1,
            keep_going: false,
        }
    }
}

/// Builds the nodes needed for `targets` (all when empty): misses run (up to `jobs` at a
/// time, each once its inputs are done), hits and skips do not. Reports come in plan order.
///
/// With a remote, a result planned as a remote hit may turn out corrupt when it is
/// downloaded: it is discarded, and the build is planned and run again (what was built
/// meanwhile is a hit then), so that the result is rebuilt instead of used.
pub fn build(
    recipe: &Recipe,
    cache: &Cache,
    targets: &[String],
    opts: &BuildOptions,
) -> Result<Vec<NodeReport>> {
    let discarded = || cache.remote().map_or(0, |r| r.discarded());
    let mut attempt = 0;
    loop {
        let before = discarded();
        let result = build_once(recipe, cache, targets, opts);
        let failed = match &result {
            Ok(reports) => reports.iter().any(|r| r.error.is_some()),
            Err(_) => true,
        };
        attempt += 1;
        if !(failed && discarded() > before && attempt < 4) {
            return result;
        }
        eprintln!("note: remote objects were discarded; planning again to rebuild them");
    }
}

fn build_once(
    recipe: &Recipe,
    cache: &Cache,
    targets: &[String],
    opts: &BuildOptions,
) -> Result<Vec<NodeReport>> {
    let mut failed_early: BTreeMap<String, NodeReport> = BTreeMap::new();
    let plans = match opts.keep_going {
        false => plan(recipe, cache, targets)?,
        true => {
            let (plans, errors) = plan_checked(recipe, cache, targets)?;
            failed_early = plans
                .iter()
                .filter_map(|p| {
                    let e = errors.get(&p.name)?;
                    let report = NodeReport {
                        error: Some(e.clone()),
                        ..NodeReport::nothing_done(p)
                    };
                    Some((p.name.clone(), report))
                })
                .collect();
            plans
        }
    };
    let keys: BTreeMap<String, String> = plans
        .iter()
        .map(|p| (p.name.clone(), p.key.clone()))
        .collect();
    let store = Store::new(cache);
    let state = Mutex::new(cache.load_state(&recipe.path));
    let cx = RunCx {
        models: &recipe.models,
        keys: &keys,
        store: &store,
        state: &state,
        run: &opts.run,
        tokenizer: recipe.tokenizer.as_deref(),
        generation: Default::default(),
    };
    let misses: Vec<&NodePlan> = plans
        .iter()
        .filter(|p| matches!(p.status, Status::Miss(_)) && !failed_early.contains_key(&p.name))
        .collect();
    let mut built = schedule::schedule(
        &misses,
        recipe,
        opts.jobs.max(1),
        failed_early,
        opts.keep_going,
        |p| run_node(recipe, &cx, p),
    )?;
    let mut st = state.into_inner().expect("state lock");
    let mut reports = Vec::new();
    for p in &plans {
        if p.status == Status::Hit {
            // Orders `gc` (a node without a stored result has nothing to touch).
            cache.touch(&p.key);
        }
        let failed = built.get(&p.name).is_some_and(|r| r.error.is_some());
        if !matches!(p.status, Status::Skip(_)) && !failed {
            st.nodes.insert(p.name.clone(), p.key.clone());
        }
        reports.push(
            built
                .remove(&p.name)
                .unwrap_or_else(|| NodeReport::nothing_done(p)),
        );
    }
    cache.save_state(&recipe.path, &st)?;
    Ok(reports)
}

/// Builds one node that is out of date and records it in the recipe's state.
fn run_node(recipe: &Recipe, cx: &RunCx, p: &NodePlan) -> Result<NodeReport> {
    let started = std::time::Instant::now();
    let cache = cx.store.cache;
    let node = &recipe.nodes[&p.name];
    // One build at a time per result: a concurrent build of the same node waits here, then
    // finds the result the other one stored.
    let _lock = match node.in_memory() {
        true => None,
        false => Some(cache.lock(&p.key)?),
    };
    let outcome = node
        .run(&p.name, &p.key, &p.preimage, cx)
        .map_err(|e| Error::Failed(format!("node `{}`: {e}", p.name)))?;
    cache.put_preimage(&p.key, &p.preimage)?;
    let mut state = cx.state.lock().expect("state lock");
    state.nodes.insert(p.name.clone(), p.key.clone());
    cache.save_state(&recipe.path, &state)?;
    Ok(NodeReport {
        seconds: started.elapsed().as_secs_f64(),
        output: outcome.output,
        stored: outcome.stored,
        reused: outcome.reused,
        ..NodeReport::nothing_done(p)
    })
}
