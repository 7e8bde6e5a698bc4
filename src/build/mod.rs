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
pub mod images;
pub mod lock;
pub mod log;
pub mod shard;
pub mod tensors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::checkpoint::writer::write_file_atomic;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::hashing::{FileHashes, Stamp};
use crate::merge::metadata::{self, InputRecord};
use crate::merge::{engine, Prepared, RunOptions};
use crate::recipe::{Input, Link, Node, Recipe};
use crate::store::remote::Kind;
use crate::store::{Cache, Entry, Manifest, Place, Store};

/// Bumped whenever a change to the merge code changes results for the same inputs.
pub const ALGORITHM_VERSION: u32 = 1;

/// What the last build of `recipe` produced (nothing when it was never built here).
fn load_state(cache: &Cache, recipe: &Path) -> State {
    std::fs::read_to_string(cache.state_path(recipe))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Records what this build of `recipe` produced.
fn save_state(cache: &Cache, recipe: &Path, state: &State) -> Result<()> {
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    write_file_atomic(&cache.state_path(recipe), &text, true)
}

/// What the last build of a recipe produced.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Node name -> key.
    nodes: BTreeMap<String, String>,
    /// Output file -> what mergesmith wrote there.
    outputs: BTreeMap<PathBuf, Written>,
}

/// A file a save node wrote: which result, and the file's stamp right after writing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Written {
    object: String,
    stamp: Stamp,
}

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
    let state = load_state(cache, &recipe.path);
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
        .filter(|n| matches!(recipe.nodes[*n], Node::Generate { .. } | Node::Xy { .. }))
        .filter(|n| images::all_stored(cache, &keys[*n].1))
        .collect();
    let hit = |n: &str| match &recipe.nodes[n] {
        Node::Save { to, from, .. } => output_current(&state, to, &keys[from].0),
        Node::Generate { to, .. } | Node::Xy { to, .. } => {
            images_stored.contains(n) && images::copies_current(&state, to.as_deref(), &keys[n].1)
        }
        node => !node.in_memory() && cache.has_result(&keys[n].0),
    };
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
    type Header = Vec<(String, crate::dtype::DType, Vec<usize>)>;
    let store = Store::new(cache);
    let mut planned: BTreeMap<&str, Header> = BTreeMap::new();
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    let mut errors = BTreeMap::new();
    let header = |ck: &Checkpoint| -> Header {
        ck.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect()
    };
    for &name in order.iter().filter(|n| runs.contains(*n)) {
        let node = &recipe.nodes[name];
        // Saves, sweeps and generate nodes that only copy stored images read no checkpoint.
        if matches!(node, Node::Save { .. } | Node::Xy { .. }) || images_stored.contains(name) {
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
        let open_lora = &|i: &Input| crate::lora::LoraFile::from_checkpoint(open(i)?);
        let checked = (|| -> Result<Header> {
            match node {
                Node::Merge {
                    inputs, spec, vae, ..
                } => {
                    let opened = inputs.iter().map(open).collect::<Result<Vec<_>>>()?;
                    let v = vae
                        .as_ref()
                        .map(|v| open(&Input::Model(v.clone())))
                        .transpose()?;
                    let inputs = crate::merge::plan::Inputs {
                        a: &opened[0],
                        b: &opened[1],
                        c: opened.get(2),
                        vae: v.as_ref(),
                    };
                    let plan = crate::merge::plan(&inputs, spec)?;
                    Ok(plan
                        .keys
                        .iter()
                        .map(|k| (k.name.clone(), k.dtype, k.shape.clone()))
                        .collect())
                }
                Node::Lora {
                    input,
                    loras,
                    fill,
                    allow_unmatched,
                    ..
                } => {
                    let base = open(input)?;
                    let family = crate::arch::detect(base.tensors()).family;
                    let apps = lora_applications(loras, Some(family), *fill, open_lora)?;
                    crate::lora::bake::plan(&base, &apps, *allow_unmatched)?;
                    Ok(header(&base))
                }
                Node::ExtractLora { a, b, options, .. } => {
                    let plan = crate::lora::extract::plan(&open(a)?, &open(b)?, options)?;
                    Ok(lora_header(plan.layout(options), options.dtype))
                }
                Node::MergeLoras {
                    loras,
                    options,
                    fill,
                    ..
                } => {
                    let sources = lora_applications(loras, None, *fill, open_lora)?;
                    let plan = crate::lora::merge::plan(&sources, options)?;
                    Ok(lora_header(
                        crate::lora::merge::layout(&plan),
                        options.dtype,
                    ))
                }
                Node::Generate { model, .. } => {
                    let ck = open(model)?;
                    crate::gen::pipeline::check_arch(&crate::arch::detect(ck.tensors()))
                        .map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
                    Ok(Vec::new())
                }
                Node::Save { .. } | Node::Xy { .. } => {
                    unreachable!("saves and sweeps are skipped above")
                }
            }
        })();
        match checked {
            Ok(h) => {
                planned.insert(name, h);
            }
            Err(e) => {
                failed.insert(name);
                errors.insert(name.to_string(), format!("node `{name}`: {e}"));
            }
        }
    }
    errors
}

/// The header of a LoRA laid out as (name, shape) in `dtype` (alphas are scalars).
fn lora_header(
    layout: Vec<(String, Vec<usize>)>,
    dtype: crate::dtype::FloatType,
) -> Vec<(String, crate::dtype::DType, Vec<usize>)> {
    layout
        .into_iter()
        .map(|(n, s)| (n, dtype.dtype(), s))
        .collect()
}

/// Whether the file at `to` is still exactly what the last build wrote from result `key`
/// (checked by stamp, without reading it).
fn output_current(state: &State, to: &Path, key: &str) -> bool {
    state
        .outputs
        .get(to)
        .is_some_and(|w| w.object == key && Stamp::of(to).is_ok_and(|s| s == w.stamp))
}

/// The nodes needed for `targets` (every node when empty), or an error for an unknown target.
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

/// The cache objects a node's result is made of: its merge result (unless kept in memory),
/// or the images a generate or xy node outputs; none for a save.
pub fn stored_objects(node: &Node, key: &str, preimage: &Value) -> Vec<(String, Kind)> {
    match node {
        Node::Generate { .. } | Node::Xy { .. } => images::outputs(preimage)
            .into_iter()
            .map(|(_, k)| (k, Kind::Image))
            .collect(),
        Node::Save { .. } => Vec::new(),
        node if node.in_memory() => Vec::new(),
        _ => vec![(key.to_string(), Kind::Result)],
    }
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
    let generates = recipe
        .nodes
        .values()
        .any(|n| matches!(n, Node::Generate { .. }));
    let tokenizer = match generates {
        true => crate::gen::tokenizer::ClipTokenizer::find_key(recipe.tokenizer.as_deref())?,
        false => String::new(),
    };
    let mut out: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for name in &recipe.order {
        let input_key = |i: &Input| match i {
            Input::Model(m) => json!({ "model": m, "content": model_keys[m.as_str()] }),
            Input::Node(n) => json!({ "node": n, "key": out[n].0 }),
        };
        let lora_keys = |loras: &[crate::recipe::LoraUse]| -> Vec<Value> {
            loras
                .iter()
                .map(|l| {
                    json!({
                        "lora": input_key(&l.source),
                        "strength": l.strength,
                        "blocks": l.blocks,
                    })
                })
                .collect()
        };
        // Where a result is kept (`cache: memory`) is not part of what it is.
        let preimage = match &recipe.nodes[name] {
            Node::Merge {
                inputs, spec, vae, ..
            } => json!({
                "op": "merge",
                "algorithm": ALGORITHM_VERSION,
                "merge": spec,
                "inputs": inputs.iter().map(input_key).collect::<Vec<_>>(),
                "vae": vae.as_ref().map(|v| input_key(&Input::Model(v.clone()))),
            }),
            Node::Lora {
                input,
                loras,
                fill,
                allow_unmatched,
                ..
            } => json!({
                "op": "lora",
                "algorithm": ALGORITHM_VERSION,
                "input": input_key(input),
                "loras": lora_keys(loras),
                "fill": fill,
                "allow_unmatched": allow_unmatched,
            }),
            Node::ExtractLora { a, b, options, .. } => json!({
                "op": "extract_lora",
                "algorithm": ALGORITHM_VERSION,
                "a": input_key(a),
                "b": input_key(b),
                "options": options,
            }),
            Node::MergeLoras {
                loras,
                options,
                fill,
                ..
            } => json!({
                "op": "merge_loras",
                "algorithm": ALGORITHM_VERSION,
                "loras": lora_keys(loras),
                "options": options,
                "fill": fill,
            }),
            Node::Generate { model, job, .. } => {
                let content = match model {
                    Input::Model(m) => model_keys[m.as_str()].clone(),
                    Input::Node(n) => out[n].0.clone(),
                };
                let images: Vec<(u64, String)> = job
                    .seeds()
                    .map(|seed| (seed, job.image_key(&content, &tokenizer, seed)))
                    .collect();
                json!({
                    "op": "generate",
                    "version": crate::gen::job::VERSION,
                    "model": input_key(model),
                    "tokenizer": tokenizer,
                    "job": job,
                    "images": images.iter().map(|(seed, key)| json!({ "seed": seed, "key": key })).collect::<Vec<_>>(),
                    "outputs": images.iter().map(|(seed, key)| json!({ "file": images::file_name(name, *seed), "key": key })).collect::<Vec<_>>(),
                })
            }
            Node::Xy { grids, .. } => {
                // One grid image per grid and batch index, keyed by its cells' images, its
                // labels and the grid code's version.
                let mut entries = Vec::new();
                for g in grids {
                    let cell_images: Vec<Vec<String>> = g
                        .cells
                        .iter()
                        .map(|c| {
                            images::image_keys(&out[c].1)
                                .into_iter()
                                .map(|(_, k)| k)
                                .collect()
                        })
                        .collect();
                    let batch = cell_images.iter().map(Vec::len).min().unwrap_or(0);
                    for b in 0..batch {
                        let cells: Vec<&String> = cell_images.iter().map(|c| &c[b]).collect();
                        let mut entry = json!({
                            "grid": g.name,
                            "batch": b,
                            "header": g.header,
                            "x_labels": g.x_labels,
                            "y_labels": g.y_labels,
                            "z_label": g.z_label,
                            "effective": g.effective,
                            "cells": cells,
                            "version": crate::gen::job::GRID_VERSION,
                        });
                        let key = blake3::hash(entry.to_string().as_bytes())
                            .to_hex()
                            .to_string();
                        entry["key"] = json!(key);
                        entry["file"] = json!(match batch {
                            1 => format!("{}.png", g.name),
                            _ => format!("{}-b{b}.png", g.name),
                        });
                        entries.push(entry);
                    }
                }
                json!({
                    "op": "xy",
                    "outputs": entries.iter().map(|e| json!({ "file": e["file"], "key": e["key"] })).collect::<Vec<_>>(),
                    "grids": entries,
                })
            }
            Node::Save { from, link, .. } => json!({
                "op": "save",
                "from": { "node": from, "key": out[from].0 },
                "link": link,
            }),
        };
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
    let state = Mutex::new(load_state(cache, &recipe.path));
    let ctx = Ctx {
        recipe,
        keys: &keys,
        store: &store,
        state: &state,
        run: &opts.run,
        generation: images::Generation::default(),
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
        |p| ctx.run_node(p),
    )?;
    let mut st = state.into_inner().expect("state lock");
    let mut reports = Vec::new();
    for p in &plans {
        if p.status == Status::Hit && !matches!(recipe.nodes[&p.name], Node::Save { .. }) {
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
    save_state(cache, &recipe.path, &st)?;
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
                if let (Some(input), false) = (broken, matches!(node, Node::Xy { .. })) {
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

/// What every node of one build shares.
struct Ctx<'a> {
    recipe: &'a Recipe,
    keys: &'a BTreeMap<String, String>,
    store: &'a Store<'a>,
    state: &'a Mutex<State>,
    run: &'a RunOptions,
    generation: images::Generation,
}

impl Ctx<'_> {
    /// Builds one node that is out of date and records it in the recipe's state.
    fn run_node(&self, p: &NodePlan) -> Result<NodeReport> {
        let started = std::time::Instant::now();
        let cache = self.store.cache;
        let mut report = NodeReport::nothing_done(p);
        let failed = |e: Error| Error::Failed(format!("node `{}`: {e}", p.name));
        match &self.recipe.nodes[&p.name] {
            Node::Save {
                from,
                to,
                overwrite,
                link,
            } => {
                let _lock = cache.lock(&p.key)?;
                self.save(&self.keys[from], to, *overwrite, *link == Link::Hardlink)
                    .map_err(failed)?;
                report.output = Some(to.clone());
            }
            Node::Generate { to, .. } | Node::Xy { to, .. } => {
                let _lock = cache.lock(&p.key)?;
                let done = match self.recipe.nodes[&p.name] {
                    Node::Xy { .. } => self.grids(&p.name, &p.preimage),
                    _ => self.generate(&p.name, &p.preimage),
                };
                let (made, found) = done.map_err(failed)?;
                (report.stored, report.reused) = (Some(made), Some(found));
                report.output = to.clone();
            }
            node => {
                let place = if node.in_memory() {
                    Place::Memory
                } else {
                    Place::Disk
                };
                // One build at a time per result: a concurrent build of the same node waits
                // here, then finds the result the other one stored.
                let _lock = match place {
                    Place::Disk => Some(cache.lock(&p.key)?),
                    Place::Memory => None,
                };
                // Sweep cells repeat nodes: one with the same key may have run already.
                if !self.store.has_result(&p.key) {
                    let built = match node {
                        Node::Merge { .. } => self.merge(&p.name, &p.key, place),
                        Node::Lora { .. } => self.lora(&p.name, &p.key, place),
                        _ => self.make_lora(&p.name, &p.key, place),
                    };
                    let (c, r) = built.map_err(failed)?;
                    (report.stored, report.reused) = (Some(c), Some(r));
                }
            }
        }
        cache.put_preimage(&p.key, &p.preimage)?;
        let mut state = self.state.lock().expect("state lock");
        state.nodes.insert(p.name.clone(), p.key.clone());
        save_state(cache, &self.recipe.path, &state)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Opens an input: the file of a model, or the stored result of a node; with its tensor
    /// keys and (when `hashed`, for merge metadata) its file hashes.
    fn open(&self, input: &Input, hashed: bool) -> Result<Opened> {
        match input {
            Input::Model(m) => {
                let path = &self.recipe.models[m].0;
                let (hashes, _) = self.store.memo.hashes(path)?;
                let ck = Checkpoint::open(path)?;
                let keys = tensors::model_keys(&hashes.blake3, &ck);
                Ok(Opened {
                    ck,
                    keys,
                    hashes: Some(hashes),
                    label: path.clone(),
                })
            }
            Input::Node(n) => {
                let key = &self.keys[n];
                let label = PathBuf::from(format!("{n}.safetensors"));
                let keys = self
                    .store
                    .manifest(key)
                    .ok_or_else(|| Error::Invalid(format!("node `{n}` has no stored result")))?
                    .keys();
                Ok(Opened {
                    ck: self.store.open_result(key, &label)?,
                    keys,
                    hashes: hashed.then(|| self.store.result_hashes(key)).transpose()?,
                    label,
                })
            }
        }
    }

    /// Runs one merge node: keys every output tensor, refers to those the store already
    /// holds, computes and stores the rest. Returns (stored, reused) tensor counts.
    fn merge(&self, name: &str, key: &str, place: Place) -> Result<(usize, usize)> {
        let Node::Merge {
            inputs, spec, vae, ..
        } = &self.recipe.nodes[name]
        else {
            unreachable!("merge nodes only");
        };
        let mut spec = (**spec).clone();
        spec.bake_vae = vae.as_ref().map(|v| self.recipe.models[v].0.clone());
        let mut opened = inputs
            .iter()
            .map(|i| self.open(i, true))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let (a, b, c) = (
            opened.next().expect("A"),
            opened.next().expect("B"),
            opened.next(),
        );
        let v = vae
            .as_ref()
            .map(|v| self.open(&Input::Model(v.clone()), true))
            .transpose()?;
        let record = |o: &Opened| -> Result<(PathBuf, FileHashes, tensors::KeyMap)> {
            let hashes = o.hashes.clone().ok_or_else(|| {
                Error::Invalid(format!("{}: hashes not computed", o.label.display()))
            })?;
            Ok((o.label.clone(), hashes, o.keys.clone()))
        };
        let (ra, rb, rc, rv) = (
            record(&a)?,
            record(&b)?,
            c.as_ref().map(record).transpose()?,
            v.as_ref().map(record).transpose()?,
        );
        let prepared =
            Prepared::from_checkpoints(a.ck, b.ck, c.map(|o| o.ck), v.map(|o| o.ck), &spec)?;
        let in_keys = tensors::InputKeys {
            a: &ra.2,
            b: &rb.2,
            c: rc.as_ref().map(|r| &r.2),
            vae: rv.as_ref().map(|r| &r.2),
        };
        let out_keys = tensors::output_keys(&prepared.plan, &spec, &in_keys, key);
        fn rec(r: &(PathBuf, FileHashes, tensors::KeyMap)) -> InputRecord<'_> {
            InputRecord {
                path: &r.0,
                hashes: &r.1,
            }
        }
        let md = metadata::build(
            &spec,
            &prepared.plan,
            rec(&ra),
            rec(&rb),
            rc.as_ref().map(rec),
            rv.as_ref().map(rec),
        );
        let tensors = prepared
            .plan
            .keys
            .iter()
            .zip(out_keys)
            .map(|(k, tk)| (k.name.clone(), k.dtype, k.shape.clone(), tk))
            .collect();
        self.put(key, place, tensors, md, |w| {
            engine::write(&prepared.plan, &prepared.inputs(), &spec, w, self.run)
        })
    }

    /// Stores a result whose tensors are (name, dtype, shape, tensor key): those the store
    /// holds are referred to, `write` computes the rest into a new pack. Returns (stored,
    /// reused) tensor counts.
    fn put(
        &self,
        key: &str,
        place: Place,
        tensors: Vec<(String, crate::dtype::DType, Vec<usize>, String)>,
        metadata: BTreeMap<String, String>,
        write: impl FnOnce(&crate::checkpoint::writer::SafetensorsWriter) -> Result<()>,
    ) -> Result<(usize, usize)> {
        let packs = self.store.packs_of(tensors.iter().map(|t| t.3.as_str()));
        let tensors: Vec<Entry> = tensors
            .into_iter()
            .zip(packs)
            .map(|((name, dtype, shape, tk), pack)| Entry {
                name,
                dtype,
                shape,
                pack: pack.unwrap_or_default(),
                key: tk,
            })
            .collect();
        let stored = tensors.iter().filter(|e| e.pack.is_empty()).count();
        let reused = tensors.len() - stored;
        let manifest = Manifest {
            metadata,
            tensors,
            file: None,
            hashes: None,
        };
        self.store.put(key, manifest, place, write)?;
        Ok((stored, reused))
    }

    /// Runs one LoRA node: bakes its LoRAs into its input. Tensors no module touches keep
    /// their input's tensor key (so a stored input is referred to, not copied); changed ones
    /// are keyed by their input key and every contribution (LoRA content, module, factor).
    fn lora(&self, name: &str, key: &str, place: Place) -> Result<(usize, usize)> {
        let Node::Lora {
            input,
            loras,
            fill,
            allow_unmatched,
            ..
        } = &self.recipe.nodes[name]
        else {
            unreachable!("lora nodes only");
        };
        let base = self.open(input, false)?;
        let family = crate::arch::detect(base.ck.tensors()).family;
        let apps = lora_applications(loras, Some(family), *fill, &|i| self.open_lora(i))?;
        let (record, contents) = self.lora_record(loras, &apps)?;
        let plan = crate::lora::bake::plan(&base.ck, &apps, *allow_unmatched)?;
        let mut md = base.ck.metadata().clone();
        md.insert("mergesmith_loras".into(), record.to_string());
        let tensors = base
            .ck
            .tensors()
            .iter()
            .map(|t| {
                let input_key = base.keys.get(&t.name).cloned().unwrap_or_default();
                let tk = match plan.changes.get(&t.name) {
                    None => input_key,
                    Some(cs) => {
                        let changes: Vec<Value> = cs
                            .iter()
                            .map(|c| {
                                json!({
                                    "lora": contents[c.lora],
                                    "module": apps[c.lora].file.modules[c.module].name,
                                    "rows": c.rows,
                                    "strength": c.strength,
                                    "block": c.block,
                                    "bias": c.bias,
                                })
                            })
                            .collect();
                        let pre = json!({
                            "algorithm": ALGORITHM_VERSION,
                            "op": "lora",
                            "name": t.name,
                            "input": input_key,
                            "changes": changes,
                        });
                        blake3::hash(pre.to_string().as_bytes())
                            .to_hex()
                            .to_string()
                    }
                };
                (t.name.clone(), t.dtype, t.shape.clone(), tk)
            })
            .collect();
        self.put(key, place, tensors, md, |w| {
            crate::lora::bake::write(&base.ck, &apps, &plan, w, self.run.progress)
        })
    }

    /// The metadata record of a node's LoRA files and each file's content key.
    fn lora_record(
        &self,
        loras: &[crate::recipe::LoraUse],
        apps: &[crate::lora::bake::Application],
    ) -> Result<(Value, Vec<String>)> {
        let mut record = Vec::new();
        let mut contents = Vec::new();
        for (u, app) in loras.iter().zip(apps) {
            let (sha256, content) = match &u.source {
                Input::Model(m) => {
                    let (h, _) = self.store.memo.hashes(&self.recipe.models[m].0)?;
                    (h.sha256, h.blake3)
                }
                Input::Node(n) => {
                    let key = &self.keys[n];
                    (self.store.result_hashes(key)?.sha256, key.clone())
                }
            };
            record.push(json!({
                "file": u.source.name(),
                "sha256": sha256,
                "strength": u.strength,
                "blocks": app.blocks,
            }));
            contents.push(content);
        }
        Ok((Value::Array(record), contents))
    }

    /// Opens a LoRA: a model file, or the stored result of a LoRA node.
    fn open_lora(&self, source: &Input) -> Result<crate::lora::LoraFile> {
        match source {
            Input::Model(m) => crate::lora::LoraFile::open(&self.recipe.models[m].0),
            Input::Node(_) => crate::lora::LoraFile::from_checkpoint(self.open(source, false)?.ck),
        }
    }

    /// Runs an `extract_lora` or `merge_loras` node: makes the LoRA in memory (a few hundred
    /// MB at most), then stores it as one new pack.
    fn make_lora(&self, name: &str, key: &str, place: Place) -> Result<(usize, usize)> {
        let (lora, dtype) = match &self.recipe.nodes[name] {
            Node::ExtractLora { a, b, options, .. } => {
                let (a, b) = (self.open(a, false)?.ck, self.open(b, false)?.ck);
                let plan = crate::lora::extract::plan(&a, &b, options)?;
                let progress = self.run.progress;
                let (lora, _) = crate::lora::extract::run(&a, &b, plan, options, name, progress)?;
                (lora, options.dtype.dtype())
            }
            Node::MergeLoras {
                loras,
                options,
                fill,
                ..
            } => {
                let sources = lora_applications(loras, None, *fill, &|i| self.open_lora(i))?;
                let plan = crate::lora::merge::plan(&sources, options)?;
                let (lora, _) = crate::lora::merge::run(&sources, &plan, options)?;
                (lora, options.dtype.dtype())
            }
            _ => unreachable!("LoRA-making nodes only"),
        };
        let tensors = lora
            .specs(dtype)
            .into_iter()
            .map(|t| {
                let tk = blake3::hash(
                    json!({ "result": key, "tensor": t.name })
                        .to_string()
                        .as_bytes(),
                );
                (t.name, t.dtype, t.shape, tk.to_hex().to_string())
            })
            .collect();
        self.put(key, place, tensors, lora.metadata.clone(), |w| {
            lora.write_into(w, dtype)
        })
    }

    /// Writes a stored result to `to`, refusing to replace a file mergesmith did not write
    /// unless `overwrite`.
    fn save(&self, key: &str, to: &Path, overwrite: bool, hardlink: bool) -> Result<()> {
        let record = || -> Result<()> {
            let written = Written {
                object: key.to_string(),
                stamp: Stamp::of(to)?,
            };
            let mut state = self.state.lock().expect("state lock");
            state.outputs.insert(to.to_path_buf(), written);
            Ok(())
        };
        if to.exists() {
            let recorded = self
                .state
                .lock()
                .expect("state lock")
                .outputs
                .get(to)
                .is_some_and(|w| Stamp::of(to).is_ok_and(|s| s == w.stamp));
            if !recorded {
                let there = self.store.memo.hashes(to)?.0.blake3;
                if there == self.store.result_hashes(key)?.blake3 {
                    // Already these very bytes (say, written by a concurrent build).
                    return record();
                }
                if !overwrite {
                    return Err(Error::Invalid(format!(
                        "{} exists and was not written by this recipe; add `overwrite: true` to replace it",
                        to.display()
                    )));
                }
            }
        }
        self.store
            .materialize(key, to, hardlink, self.run.progress)?;
        record()
    }
}

/// Opens the LoRAs of a `lora` or `merge_loras` node (through `open`), with block weights
/// read for `family` (the checkpoint's, when baking), else for the family each file was made
/// for.
fn lora_applications(
    loras: &[crate::recipe::LoraUse],
    family: Option<crate::arch::Family>,
    fill: f64,
    open: &dyn Fn(&Input) -> Result<crate::lora::LoraFile>,
) -> Result<Vec<crate::lora::bake::Application>> {
    loras
        .iter()
        .map(|u| {
            crate::lora::bake::Application::new(
                open(&u.source)?,
                u.strength,
                u.blocks.as_deref(),
                family,
                fill,
            )
        })
        .collect()
}

/// An opened merge input.
struct Opened {
    ck: Checkpoint,
    keys: tensors::KeyMap,
    hashes: Option<FileHashes>,
    label: PathBuf,
}
