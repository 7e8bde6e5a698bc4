//! Building a recipe: content keys, the node cache, and incremental execution.
//!
//! Every node gets a key: blake3 over a canonical JSON "preimage" of what determines its
//! result (operation, normalized parameters, the keys of its inputs, the algorithm version).
//! A model's key is the blake3 of its file contents (memoized on path, size, mtime, inode),
//! so renaming a file changes nothing and editing its bytes changes exactly its dependents.
//! A merge node's result is stored once in the cache as a safetensors object named by its
//! key; a save node copies that object to its destination. The last build's keys and
//! preimages are kept per recipe, so `plan` can say why a node must be rebuilt.
//!
//! Cache layout (version 1), under `--cache` (default `cache/` beside the recipe):
//! `v1/objects/ab/<key>.safetensors`, `v1/nodes/<key>.json` (preimages),
//! `v1/state/<recipe>.json` (last build), `v1/file-hashes/` (hash memo).

pub mod diff;
pub mod lock;
pub mod log;
pub mod maintenance;
pub mod tensors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::checkpoint::writer::{copy_file_atomic, write_file_atomic};
use crate::error::{Error, Result};
use crate::hashing::{HashMemo, Stamp};
use crate::merge::{MergeFiles, Prepared, RunOptions};
use crate::recipe::{Input, Node, Recipe};

/// Bumped whenever a change to the merge code changes results for the same inputs.
pub const ALGORITHM_VERSION: u32 = 1;

/// A content-addressed node cache.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Takes the build lock of a node key (waits while another build holds it).
    pub fn lock(&self, key: &str) -> Result<std::fs::File> {
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("{key}.lock"));
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.lock().map_err(|e| Error::io(&path, e))?;
        Ok(f)
    }

    /// The cache rooted at `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Cache {
            root: dir.join("v1"),
        }
    }

    /// The cache directory for a recipe: `$MERGESMITH_CACHE`, else `cache/` beside it.
    pub fn default_for(recipe: &Path) -> PathBuf {
        crate::hashing::env_cache_dir()
            .unwrap_or_else(|| recipe.parent().unwrap_or(Path::new(".")).join("cache"))
    }

    /// The hash memo kept in this cache.
    pub fn memo(&self) -> HashMemo {
        HashMemo::new(self.root.parent().unwrap_or(&self.root))
    }

    /// Where the object of a node key lives.
    pub fn object(&self, key: &str) -> PathBuf {
        self.root
            .join("objects")
            .join(&key[..2])
            .join(format!("{key}.safetensors"))
    }

    fn preimage_path(&self, key: &str) -> PathBuf {
        self.root.join("nodes").join(format!("{key}.json"))
    }

    /// Whether a merge result is complete in the cache: its object and its tensor keys
    /// (keys are written first, so an object without keys is never trusted).
    pub fn has_result(&self, key: &str) -> bool {
        self.object(key).exists() && self.tensor_keys(key).is_ok()
    }

    /// The preimage recorded for a key, if any.
    pub fn preimage(&self, key: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.preimage_path(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn state_path(&self, recipe: &Path) -> PathBuf {
        let canon = std::fs::canonicalize(recipe).unwrap_or_else(|_| recipe.to_path_buf());
        let id = blake3::hash(canon.to_string_lossy().as_bytes()).to_hex();
        self.root.join("state").join(format!("{}.json", &id[..32]))
    }

    fn load_state(&self, recipe: &Path) -> State {
        std::fs::read_to_string(self.state_path(recipe))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save_state(&self, recipe: &Path, state: &State) -> Result<()> {
        let path = self.state_path(recipe);
        let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
        write_file_atomic(&path, &text, true)
    }
}

/// What the last build of a recipe produced.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// Node name -> key.
    nodes: BTreeMap<String, String>,
    /// Output file -> what mergesmith wrote there.
    outputs: BTreeMap<PathBuf, Written>,
}

/// A file a save node wrote: which object, and the file's stamp right after writing.
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
}

/// One node of a plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodePlan {
    /// Node name.
    pub name: String,
    /// Its key.
    pub key: String,
    /// Hit or miss.
    #[serde(flatten)]
    pub status: Status,
    /// What the key was computed from.
    #[serde(skip)]
    pub preimage: Value,
}

/// Keys and statuses of the nodes needed for `targets` (all nodes when empty).
pub fn plan(recipe: &Recipe, cache: &Cache, targets: &[String]) -> Result<Vec<NodePlan>> {
    let keys = keys(recipe, cache)?;
    let state = cache.load_state(&recipe.path);
    let needed = needed(recipe, targets)?;
    let mut out = Vec::new();
    for name in recipe.order.iter().filter(|n| needed.contains(*n)) {
        let (key, preimage) = &keys[name];
        let hit = match &recipe.nodes[name] {
            Node::Merge { .. } => cache.has_result(key),
            Node::Save { to, from, .. } => output_current(&state, to, &keys[from].0),
        };
        let status = if hit {
            Status::Hit
        } else {
            let reasons = match state.nodes.get(name) {
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
            name: name.clone(),
            key: key.clone(),
            status,
            preimage: preimage.clone(),
        });
    }
    Ok(out)
}

/// Whether the file at `to` is still exactly what the last build wrote from object `key`
/// (checked by stamp, without reading it).
fn output_current(state: &State, to: &Path, key: &str) -> bool {
    state
        .outputs
        .get(to)
        .is_some_and(|w| w.object == key && Stamp::of(to).is_ok_and(|s| s == w.stamp))
}

/// The nodes needed for `targets` (every node when empty), or an error for an unknown target.
fn needed(recipe: &Recipe, targets: &[String]) -> Result<BTreeSet<String>> {
    if targets.is_empty() {
        return Ok(recipe.nodes.keys().cloned().collect());
    }
    let mut set = BTreeSet::new();
    let mut stack: Vec<String> = Vec::new();
    for t in targets {
        if !recipe.nodes.contains_key(t) {
            let near = crate::merge::weights::nearest(t, recipe.nodes.keys().map(|s| s.as_str()));
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
    let mut out: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for name in &recipe.order {
        let input_key = |i: &Input| match i {
            Input::Model(m) => json!({ "model": m, "content": model_keys[m.as_str()] }),
            Input::Node(n) => json!({ "node": n, "key": out[n].0 }),
        };
        let preimage = match &recipe.nodes[name] {
            Node::Merge { inputs, spec, vae } => json!({
                "op": "merge",
                "algorithm": ALGORITHM_VERSION,
                "merge": spec,
                "inputs": inputs.iter().map(input_key).collect::<Vec<_>>(),
                "vae": vae.as_ref().map(|v| input_key(&Input::Model(v.clone()))),
            }),
            Node::Save { from, .. } => {
                json!({ "op": "save", "from": { "node": from, "key": out[from].0 } })
            }
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
    /// The file it wrote, for save nodes and built merges.
    pub output: Option<PathBuf>,
    /// Merge nodes built: tensors computed.
    pub computed: Option<usize>,
    /// Merge nodes built: tensors copied from earlier results instead of computed.
    pub reused: Option<usize>,
}

/// Builds the nodes needed for `targets` (all when empty): misses run, hits are skipped.
pub fn build(
    recipe: &Recipe,
    cache: &Cache,
    targets: &[String],
    run: &RunOptions,
) -> Result<Vec<NodeReport>> {
    let plans = plan(recipe, cache, targets)?;
    let keys: BTreeMap<String, String> = plans
        .iter()
        .map(|p| (p.name.clone(), p.key.clone()))
        .collect();
    let mut state = cache.load_state(&recipe.path);
    let memo = cache.memo();
    let mut reports = Vec::new();
    for p in plans {
        let started = std::time::Instant::now();
        let mut output = None;
        let (mut computed, mut reused) = (None, None);
        // One build at a time per node: a concurrent build of the same node waits here, then
        // finds the result the other one made.
        let _lock = match p.status {
            Status::Miss(_) => Some(cache.lock(&p.key)?),
            Status::Hit => None,
        };
        let done_meanwhile =
            matches!(recipe.nodes[&p.name], Node::Merge { .. }) && cache.has_result(&p.key);
        if let (Status::Miss(_), false) = (&p.status, done_meanwhile) {
            match &recipe.nodes[&p.name] {
                Node::Merge { inputs, spec, vae } => {
                    let file = |i: &Input| match i {
                        Input::Model(m) => recipe.models[m].0.clone(),
                        Input::Node(n) => cache.object(&keys[n]),
                    };
                    let paths: Vec<PathBuf> = inputs.iter().map(file).collect();
                    let files = MergeFiles {
                        a: &paths[0],
                        b: &paths[1],
                        c: paths.get(2).map(|p| p.as_path()),
                    };
                    let mut spec = (**spec).clone();
                    spec.bake_vae = vae.as_ref().map(|v| recipe.models[v].0.clone());
                    let object = cache.object(&p.key);
                    let opts = RunOptions {
                        overwrite: true,
                        ..run.clone()
                    };
                    let job = MergeJob {
                        inputs,
                        paths: &paths,
                        files: &files,
                        spec: &spec,
                        object: &object,
                        key: &p.key,
                    };
                    let (c, r) = build_merge(cache, &memo, &keys, &job, &opts)
                        .map_err(|e| Error::Failed(format!("node `{}`: {e}", p.name)))?;
                    (computed, reused) = (Some(c), Some(r));
                    output = Some(object);
                }
                Node::Save {
                    from,
                    to,
                    overwrite,
                } => {
                    let object = cache.object(&keys[from]);
                    save(&memo, &mut state, &keys[from], &object, to, *overwrite)
                        .map_err(|e| Error::Failed(format!("node `{}`: {e}", p.name)))?;
                    output = Some(to.clone());
                }
            }
            let path = cache.preimage_path(&p.key);
            let text = serde_json::to_vec_pretty(&p.preimage)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            write_file_atomic(&path, &text, true)?;
        }
        if let (Status::Hit, Node::Merge { .. }) = (&p.status, &recipe.nodes[&p.name]) {
            cache.touch(&p.key);
        }
        state.nodes.insert(p.name.clone(), p.key.clone());
        cache.save_state(&recipe.path, &state)?;
        reports.push(NodeReport {
            seconds: started.elapsed().as_secs_f64(),
            plan: p,
            output,
            computed,
            reused,
        });
    }
    Ok(reports)
}

/// One merge node to run.
struct MergeJob<'a> {
    inputs: &'a [Input],
    paths: &'a [PathBuf],
    files: &'a MergeFiles<'a>,
    spec: &'a crate::merge::MergeSpec,
    object: &'a Path,
    key: &'a str,
}

/// Runs one merge node: keys every output tensor, copies those an earlier result holds,
/// computes the rest. Returns (computed, reused) tensor counts.
fn build_merge(
    cache: &Cache,
    memo: &HashMemo,
    node_keys: &BTreeMap<String, String>,
    job: &MergeJob,
    run: &RunOptions,
) -> Result<(usize, usize)> {
    let content = |p: &Path| memo.hashes(p).map(|(h, _)| h.blake3);
    let maps: Vec<tensors::KeyMap> = job
        .inputs
        .iter()
        .zip(job.paths)
        .map(|(i, p)| match i {
            Input::Model(_) => tensors::keys_of(cache, p, None, &content(p)?),
            Input::Node(n) => tensors::keys_of(cache, p, Some(&node_keys[n]), ""),
        })
        .collect::<Result<_>>()?;
    let vae_map = match &job.spec.bake_vae {
        Some(v) => Some(tensors::keys_of(cache, v, None, &content(v)?)?),
        None => None,
    };
    let mut prepared = Prepared::new(job.files, job.spec)?;
    let in_keys = tensors::InputKeys {
        a: &maps[0],
        b: &maps[1],
        c: maps.get(2),
        vae: vae_map.as_ref(),
    };
    let out_keys = tensors::output_keys(&prepared.plan, job.spec, &in_keys, job.key);
    let names: tensors::KeyMap = prepared
        .plan
        .keys
        .iter()
        .map(|k| k.name.clone())
        .zip(out_keys.iter().cloned())
        .collect();
    let (cached, reused) = tensors::reuse(&mut prepared.plan, &out_keys, cache, job.key);
    let computed = prepared.plan.blended();
    // Keys first: an object without keys is never trusted, keys without an object are harmless.
    cache.record_tensor_keys(job.key, &names)?;
    prepared.execute(job.files, job.spec, job.object, memo, run, &cached)?;
    Ok((computed, reused))
}

/// Copies a node object to its destination (temp file, fsync, rename), refusing to replace a
/// file mergesmith did not write unless `overwrite`.
fn save(
    memo: &HashMemo,
    state: &mut State,
    object_key: &str,
    object: &Path,
    to: &Path,
    overwrite: bool,
) -> Result<()> {
    let record = |state: &mut State| -> Result<()> {
        let written = Written {
            object: object_key.to_string(),
            stamp: Stamp::of(to)?,
        };
        state.outputs.insert(to.to_path_buf(), written);
        Ok(())
    };
    if to.exists() {
        let recorded = state
            .outputs
            .get(to)
            .is_some_and(|w| Stamp::of(to).is_ok_and(|s| s == w.stamp));
        if !recorded && memo.hashes(to)?.0.blake3 == memo.hashes(object)?.0.blake3 {
            // Already these very bytes (say, written by a concurrent build): keep the file.
            return record(state);
        }
        if !recorded && !overwrite {
            return Err(Error::Invalid(format!(
                "{} exists and was not written by this recipe; add `overwrite: true` to replace it",
                to.display()
            )));
        }
    }
    copy_file_atomic(object, to, true)?;
    record(state)
}
