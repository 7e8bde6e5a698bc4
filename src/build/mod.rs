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
pub mod lock;
pub mod log;
pub mod shard;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merge::RunOptions;
use crate::nodes::{CheckCx, Header, HitCx, Input, KeyCx, Node, RunCx};
use crate::recipe::Recipe;
use crate::store::remote::Kind;
use crate::store::{Cache, Store};

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

/// Keys and statuses of the nodes needed for `targets` (every node when empty). A node runs
/// when it is out of date and demanded: named as a target (with no targets, every node that
/// no other node reads is, save `cache: memory` merges), or an input of a node that runs.
pub fn plan(recipe: &Recipe, cache: &Cache, targets: &[String]) -> Result<Vec<NodePlan>> {
    let (plans, errors) = plan_checked(recipe, cache, targets)?;
    match errors.is_empty() {
        true => Ok(plans),
        false => Err(Error::Invalid(
            errors.into_values().collect::<Vec<_>>().join("\n"),
        )),
    }
}

/// [`plan`], with the nodes whose checks on headers failed (by name, with the error) apart
/// instead of failing the plan.
pub fn plan_checked(
    recipe: &Recipe,
    cache: &Cache,
    targets: &[String],
) -> Result<(Vec<NodePlan>, BTreeMap<String, String>)> {
    let keys = keys(recipe, cache)?;
    let state = cache.load_state(&recipe.path);
    let needed = needed(recipe, targets)?;
    let order: Vec<&str> = recipe
        .order
        .iter()
        .map(String::as_str)
        .filter(|n| needed.contains(*n))
        .collect();
    let memory = |n: &str| recipe.nodes[n].in_memory();
    cache.look_up_remote(
        order
            .iter()
            .flat_map(|n| stored_objects(&recipe.nodes[*n], &keys[*n].0, &keys[*n].1)),
    );
    // Generate and xy nodes whose images are all stored: they at most copy them out, and
    // need none of their inputs.
    let images_stored: BTreeSet<&str> = order
        .iter()
        .copied()
        .filter(|n| recipe.nodes[*n].images_stored(&keys[*n].1, cache))
        .collect();
    let hit_cx = HitCx {
        cache,
        state: &state,
        keys: &keys,
    };
    let hit = |n: &str| recipe.nodes[n].is_current(&keys[n].0, &keys[n].1, &hit_cx);
    let hits: BTreeSet<&str> = order.iter().copied().filter(|n| hit(n)).collect();
    let mut demanded: BTreeSet<&str> = if targets.is_empty() {
        default_targets(recipe).into_iter().collect()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let mut runs = BTreeSet::new();
    for n in order.iter().rev() {
        if demanded.contains(n) && !hits.contains(n) {
            runs.insert(*n);
            if !images_stored.contains(n) {
                demanded.extend(recipe.nodes[*n].node_inputs());
            }
        }
    }
    let errors = check_runs(recipe, cache, &keys, &order, &runs, &images_stored);
    let mut out = Vec::new();
    for name in order {
        let (key, preimage) = &keys[name];
        let status = if hits.contains(name) {
            Status::Hit
        } else if !runs.contains(name) {
            Status::Skip(if memory(name) {
                "kept in memory: nothing that uses it is out of date".to_string()
            } else {
                "not needed: what uses it is up to date".to_string()
            })
        } else {
            let reasons = match state.nodes.get(name) {
                _ if memory(name) => vec!["kept in memory: built when needed".to_string()],
                None => vec!["never built".to_string()],
                Some(old) if old == key => vec!["its result is no longer in the cache".to_string()],
                Some(old) => match cache.preimage(old) {
                    Some(before) => diff::reasons(&before, preimage),
                    None => vec!["its inputs or parameters changed".to_string()],
                },
            };
            Status::Miss(reasons)
        };
        out.push(NodePlan {
            name: name.to_string(),
            key: key.clone(),
            status,
            preimage: preimage.clone(),
        });
    }
    Ok((out, errors))
}

/// Plans every merge that will run against the headers of its inputs (model files, stored
/// results, or the planned output of a node that runs before it), so that architecture,
/// shape and parameter errors surface before anything is built or any tensor is read.
/// Returns every failing node's error at once (the nodes that read a failing one are not
/// checked, and not listed).
fn check_runs(
    recipe: &Recipe,
    cache: &Cache,
    keys: &BTreeMap<String, (String, Value)>,
    order: &[&str],
    runs: &BTreeSet<&str>,
    images_stored: &BTreeSet<&str>,
) -> BTreeMap<String, String> {
    let store = Store::new(cache);
    let mut planned: BTreeMap<&str, Header> = BTreeMap::new();
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    let mut errors = BTreeMap::new();
    for &name in order.iter().filter(|n| runs.contains(*n)) {
        let node = &recipe.nodes[name];
        // Generate and xy nodes that only copy stored images read no checkpoint.
        if images_stored.contains(name) {
            continue;
        }
        if node.node_inputs().iter().any(|n| failed.contains(n)) {
            failed.insert(name);
            continue; // its input's error is reported already
        }
        let open = |i: &Input| -> Result<Checkpoint> {
            match i {
                Input::Model(m) => Checkpoint::open(&recipe.models[m].0),
                Input::Node(n) => {
                    let label = PathBuf::from(format!("{n}.safetensors"));
                    match planned.get(n.as_str()) {
                        Some(h) => Ok(Checkpoint::header_only(&label, h.iter().cloned())),
                        None => store.open_result(&keys[n].0, &label),
                    }
                }
            }
        };
        let checked = node.check(&CheckCx {
            open: &open,
            models: &recipe.models,
        });
        match checked {
            Ok(Some(h)) => {
                planned.insert(name, h);
            }
            Ok(None) => {}
            Err(e) => {
                failed.insert(name);
                errors.insert(name.to_string(), format!("node `{name}`: {e}"));
            }
        }
    }
    errors
}

/// The nodes a build without targets builds: every node no other node reads, save
/// `cache: memory` merges (in recipe order).
pub(crate) fn default_targets(recipe: &Recipe) -> Vec<&str> {
    let used: BTreeSet<&str> = recipe
        .nodes
        .values()
        .flat_map(|n| n.node_inputs())
        .collect();
    recipe
        .order
        .iter()
        .map(String::as_str)
        .filter(|n| !recipe.nodes[*n].in_memory() && !used.contains(n))
        .collect()
}

/// The cache objects a node's result is made of: its result (unless kept in memory), or the
/// images it outputs; none for a save.
pub fn stored_objects(node: &Node, key: &str, preimage: &Value) -> Vec<(String, Kind)> {
    node.stored_objects(key, preimage)
}

/// `targets` and every node they read, directly or not (every node when `targets` is empty);
/// an unknown target is an error (with the nearest name).
pub(crate) fn needed(recipe: &Recipe, targets: &[String]) -> Result<BTreeSet<String>> {
    if targets.is_empty() {
        return Ok(recipe.nodes.keys().cloned().collect());
    }
    let mut set = BTreeSet::new();
    let mut stack: Vec<String> = Vec::new();
    for t in targets {
        if !recipe.nodes.contains_key(t) {
            let near = crate::text::nearest(t, recipe.nodes.keys().map(|s| s.as_str()));
            return Err(Error::Invalid(format!(
                "no node `{t}` in {}{}",
                recipe.path.display(),
                near.map(|n| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default()
            )));
        }
        stack.push(t.clone());
    }
    while let Some(n) = stack.pop() {
        if set.insert(n.clone()) {
            stack.extend(recipe.nodes[&n].node_inputs().into_iter().map(String::from));
        }
    }
    Ok(set)
}

/// Every node's key and preimage, in dependency order.
fn keys(recipe: &Recipe, cache: &Cache) -> Result<BTreeMap<String, (String, Value)>> {
    let memo = cache.memo();
    let mut model_keys: BTreeMap<&str, String> = BTreeMap::new();
    for (name, (path, sha)) in &recipe.models {
        let (h, _) = memo
            .hashes(path)
            .map_err(|e| Error::Invalid(format!("model `{name}`: {e}")))?;
        if let Some(expected) = sha {
            // A full SHA-256, or a prefix such as the 10-digit AUTOMATIC1111 short hash.
            let matches = expected.len() >= 8
                && h.sha256
                    .get(..expected.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(expected));
            if !matches {
                return Err(Error::Invalid(format!(
                    "model `{name}` ({}): SHA-256 is {}, the recipe expects {expected}",
                    path.display(),
                    h.sha256
                )));
            }
        }
        model_keys.insert(name, h.blake3);
    }
    // Generate nodes' images depend on the tokenizer's vocabulary: key it by content.
    let tokenizer = match recipe.nodes.values().any(|n| n.uses_tokenizer()) {
        true => crate::gen::tokenizer::ClipTokenizer::find_key(recipe.tokenizer.as_deref())?,
        false => String::new(),
    };
    let mut out: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for name in &recipe.order {
        let cx = KeyCx {
            models: &model_keys,
            nodes: &out,
            tokenizer: &tokenizer,
        };
        let preimage = recipe.nodes[name].preimage(name, &cx);
        let text = serde_json::to_string(&preimage).map_err(|e| Error::Invalid(e.to_string()))?;
        out.insert(
            name.clone(),
            (blake3::hash(text.as_bytes()).to_hex().to_string(), preimage),
        );
    }
    Ok(out)
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
    let mut built = schedule(
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

/// Runs `work` on every node of `nodes` (in dependency order), up to `jobs` at a time, each
/// after the nodes among `nodes` it reads. Without `keep_going`, stops starting nodes after the
/// first failure and returns it once the running ones finish. With it, a failed node's
/// dependents fail without running (sweeps aside: they draw the cells that exist), every
/// other node still runs, and the failures come back in their reports' `error`
/// (`failed_early`: the reports of nodes that failed their checks at plan time).
fn schedule<'p>(
    nodes: &[&'p NodePlan],
    recipe: &Recipe,
    jobs: usize,
    failed_early: BTreeMap<String, NodeReport>,
    keep_going: bool,
    work: impl Fn(&'p NodePlan) -> Result<NodeReport> + Sync,
) -> Result<BTreeMap<String, NodeReport>> {
    let names: BTreeSet<&str> = nodes.iter().map(|p| p.name.as_str()).collect();
    let mut pending: Vec<&NodePlan> = nodes.to_vec();
    let mut done: BTreeMap<String, NodeReport> = failed_early;
    let failed_report = |p: &NodePlan, e: &Error| NodeReport {
        error: Some(e.to_string()),
        ..NodeReport::nothing_done(p)
    };
    let failure = std::thread::scope(|s| {
        let mut failure = None;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0usize;
        loop {
            while failure.is_none() && running < jobs {
                let ready = pending.iter().position(|p| {
                    recipe.nodes[&p.name]
                        .node_inputs()
                        .iter()
                        .all(|i| !names.contains(i) || done.contains_key(*i))
                });
                let Some(i) = ready else { break };
                let p = pending.remove(i);
                let node = &recipe.nodes[&p.name];
                let broken = node
                    .node_inputs()
                    .into_iter()
                    .find(|i| done.get(*i).is_some_and(|r| r.error.is_some()));
                if let (Some(input), false) = (broken, node.runs_with_failed_inputs()) {
                    let e = Error::Failed(format!("node `{}`: its input `{input}` failed", p.name));
                    done.insert(p.name.clone(), failed_report(p, &e));
                    continue;
                }
                let (tx, work) = (tx.clone(), &work);
                running += 1;
                s.spawn(move || {
                    // A panic in one node must not leave the scheduler waiting for its report.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(p)))
                        .unwrap_or_else(|_| {
                            Err(Error::Failed(format!("node `{}`: internal error", p.name)))
                        });
                    let _ = tx.send((p, result));
                });
            }
            if running == 0 {
                break;
            }
            let (p, result) = rx.recv().expect("a running node reports");
            running -= 1;
            match result {
                Ok(r) => {
                    done.insert(p.name.clone(), r);
                }
                Err(e) if keep_going => {
                    done.insert(p.name.clone(), failed_report(p, &e));
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        failure
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(done),
    }
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
