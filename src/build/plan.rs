//! Planning: every node's status (hit, miss with reasons, or skip) for a set of targets,
//! and every node that will run checked against its inputs' headers before anything runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use super::{diff, keys::keys, NodePlan, Status};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::nodes::{CheckCx, Header, HitCx, Input};
use crate::recipe::Recipe;
use crate::store::{Cache, Store};

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
            .flat_map(|n| recipe.nodes[*n].stored_objects(&keys[*n].0, &keys[*n].1)),
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
        let checked = node.check(&CheckCx { open: &open });
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
