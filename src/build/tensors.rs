//! Per-tensor keys: each output tensor of a merge node is keyed by exactly what reaches it
//! (its input tensors' keys and this key's own ratios), so a rebuild copies every tensor whose
//! key is unchanged from an earlier result and computes only the others. Changing one block's
//! weight therefore recomputes that block's tensors, here and in every node downstream.
//!
//! The keys of a built object are kept beside it in `v1/tensor-keys/<object key>.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};

use crate::build::{Cache, ALGORITHM_VERSION};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merge::calc::CalcMode;
use crate::merge::{MergeSpec, Op, Plan, Source};

/// Tensor name -> tensor key.
pub type KeyMap = BTreeMap<String, String>;

fn hash(v: &Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex().to_string()
}

/// Keys of a model file's tensors: its content key and the tensor name.
pub fn model_keys(content: &str, ck: &Checkpoint) -> KeyMap {
    ck.tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                hash(&json!({ "model": content, "name": t.name })),
            )
        })
        .collect()
}

impl Cache {
    fn keys_path(&self, object: &str) -> std::path::PathBuf {
        self.root.join("tensor-keys").join(format!("{object}.json"))
    }

    /// The tensor keys recorded for a built object.
    pub fn tensor_keys(&self, object: &str) -> Result<KeyMap> {
        let path = self.keys_path(object);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// Records the tensor keys of a built object.
    pub fn record_tensor_keys(&self, object: &str, keys: &KeyMap) -> Result<()> {
        let path = self.keys_path(object);
        let text = serde_json::to_vec(keys).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::checkpoint::writer::write_file_atomic(&path, &text, true)
    }

    /// Every recorded tensor key -> (object key, tensor name).
    pub fn tensor_index(&self) -> HashMap<String, (String, String)> {
        let mut index = HashMap::new();
        let Ok(dir) = std::fs::read_dir(self.root.join("tensor-keys")) else {
            return index;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            let Some(object) = path.file_stem().and_then(|s| s.to_str()).map(String::from) else {
                continue;
            };
            if let Ok(keys) = self.tensor_keys(&object) {
                for (name, key) in keys {
                    index.insert(key, (object.clone(), name));
                }
            }
        }
        index
    }
}

/// The input tensor key maps of a merge: A, B, then C and the VAE when present.
pub struct InputKeys<'a> {
    /// Model A's tensor keys.
    pub a: &'a KeyMap,
    /// Model B's.
    pub b: &'a KeyMap,
    /// Model C's.
    pub c: Option<&'a KeyMap>,
    /// The VAE file's.
    pub vae: Option<&'a KeyMap>,
}

/// The key of every output tensor of `plan`, in plan order.
pub fn output_keys(
    plan: &Plan,
    spec: &MergeSpec,
    inputs: &InputKeys,
    node_key: &str,
) -> Vec<String> {
    let get = |m: Option<&KeyMap>, n: &str| m.and_then(|m| m.get(n)).cloned().unwrap_or_default();
    plan.keys
        .iter()
        .map(|k| {
            let op = match &k.op {
                Op::Copy(s) => {
                    let src = match s {
                        Source::A => get(Some(inputs.a), &k.name),
                        Source::B => get(Some(inputs.b), &k.name),
                        Source::C => get(inputs.c, &k.name),
                        Source::Vae => {
                            let short = k.name.strip_prefix("first_stage_model.").unwrap_or(&k.name);
                            inputs.vae.and_then(|m| m.get(short).or_else(|| m.get(&k.name))).cloned().unwrap_or_default()
                        }
                        Source::Cached(_) => unreachable!("plans are keyed before reuse"),
                    };
                    json!({ "copy": src })
                }
                Op::PositionIds => json!({ "position_ids": true }),
                Op::Blend { alpha, beta, channels, adjust } => json!({
                    "blend": {
                        "mode": spec.mode,
                        "calcmode": spec.calcmode,
                        "gamma": spec.gamma,
                        "seed": spec.seed,
                        "alpha": alpha,
                        "beta": beta,
                        "channels": channels,
                        "adjust": adjust,
                    },
                    "inputs": [get(Some(inputs.a), &k.name), get(Some(inputs.b), &k.name), get(inputs.c, &k.name)],
                    // cosine calcmodes depend on statistics of the whole model.
                    "global": matches!(spec.calcmode, CalcMode::CosineA | CalcMode::CosineB).then_some(node_key),
                }),
            };
            hash(&json!({
                "algorithm": ALGORITHM_VERSION,
                "name": k.name,
                "dtype": k.dtype,
                "shape": k.shape,
                "op": op,
            }))
        })
        .collect()
}

/// Points every blended tensor whose key an earlier object already holds at that object.
/// Returns the objects to open (as `Source::Cached` indices refer to them) and the count reused.
pub fn reuse(
    plan: &mut Plan,
    keys: &[String],
    cache: &Cache,
    node_key: &str,
) -> (Vec<Checkpoint>, usize) {
    let index = cache.tensor_index();
    let mut opened: HashMap<String, usize> = HashMap::new();
    let mut objects = Vec::new();
    let mut reused = 0;
    for (k, key) in plan.keys.iter_mut().zip(keys) {
        if !matches!(k.op, Op::Blend { .. }) {
            continue;
        }
        let Some((object, name)) = index.get(key) else {
            continue;
        };
        if object == node_key || *name != k.name {
            continue;
        }
        let slot = match opened.get(object) {
            Some(&i) => i,
            None => match Checkpoint::open(cache.object(object)) {
                Ok(ck) if ck.contains(name) => {
                    objects.push(ck);
                    opened.insert(object.clone(), objects.len() - 1);
                    objects.len() - 1
                }
                _ => continue,
            },
        };
        k.op = Op::Copy(Source::Cached(slot));
        reused += 1;
    }
    (objects, reused)
}

/// Tensor keys of whatever `path` is: a model (by content) or a built object (recorded).
pub fn keys_of(
    cache: &Cache,
    path: &Path,
    object_key: Option<&str>,
    content: &str,
) -> Result<KeyMap> {
    match object_key {
        Some(k) => cache.tensor_keys(k),
        None => Ok(model_keys(content, &Checkpoint::open(path)?)),
    }
}
