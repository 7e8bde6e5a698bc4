//! Per-tensor keys: each output tensor of a merge node is keyed by exactly what reaches it
//! (its input tensors' keys and this node's own ratios), so a rebuild refers to every tensor
//! whose key the store already holds and computes only the others. Changing one block's
//! weight therefore recomputes that block's tensors, here and in every node downstream.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::ALGORITHM_VERSION;
use crate::checkpoint::quant::Quant;
use crate::checkpoint::Checkpoint;
use crate::dtype::{DType, Rounding};
use crate::merge::calc::CalcMode;
use crate::merge::method::supermerger::reaches;
use crate::merge::multi::{ListOp, ListPlan, ListSpec};
use crate::merge::plan::Stored;
use crate::merge::{KeyPlan, MergeSpec, Op, Plan, Source};

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
    // Scaled-fp8 inputs: the keys of the scales that reach a weight (none for plain inputs,
    // so plain merges keep their keys).
    let scales = |k: &KeyPlan| -> Option<Value> {
        let sources = [
            (Source::A, Some(inputs.a)),
            (Source::B, Some(inputs.b)),
            (Source::C, inputs.c),
        ];
        let any = sources
            .iter()
            .any(|(s, _)| plan.scale(*s, k.name_in(*s)).is_some());
        any.then(|| {
            json!(sources
                .iter()
                .map(|(s, m)| Quant::scale_key(k.name_in(*s))
                    .map(|sk| get(*m, &sk))
                    .unwrap_or_default())
                .collect::<Vec<_>>())
        })
    };
    let op_of = |k: &KeyPlan| -> Value {
        let mut op = match &k.op {
            Op::Copy(s) => {
                let src = match s {
                    Source::A => get(Some(inputs.a), &k.name),
                    Source::B => get(Some(inputs.b), k.name_in(Source::B)),
                    Source::C => get(inputs.c, k.name_in(Source::C)),
                    Source::Vae => {
                        let short = k.name.strip_prefix("first_stage_model.").unwrap_or(&k.name);
                        inputs
                            .vae
                            .and_then(|m| m.get(short).or_else(|| m.get(&k.name)))
                            .cloned()
                            .unwrap_or_default()
                    }
                };
                json!({ "copy": src })
            }
            Op::PositionIds => json!({ "position_ids": true }),
            Op::Marker => json!({ "marker": k.dtype.name() }),
            Op::ScaleOf(_) => Value::Null,
            Op::Blend {
                alpha,
                beta,
                channels,
                adjust,
            } => {
                let mut blend = json!({
                    "mode": spec.mode,
                    "calcmode": spec.calcmode,
                    "alpha": alpha,
                    "beta": beta,
                    "channels": channels,
                    "adjust": adjust,
                });
                // Only the parameters the calcmode reads reach the tensor.
                let (gamma, seed) = reaches(spec.calcmode);
                if let Value::Object(b) = &mut blend {
                    if gamma {
                        b.insert("gamma".into(), json!(spec.gamma));
                    }
                    if seed {
                        b.insert("seed".into(), json!(spec.seed));
                    }
                }
                json!({
                    "blend": blend,
                    "inputs": [get(Some(inputs.a), &k.name), get(Some(inputs.b), k.name_in(Source::B)), get(inputs.c, k.name_in(Source::C))],
                    // cosine calcmodes depend on statistics of the whole model.
                    "global": matches!(spec.calcmode, CalcMode::CosineA | CalcMode::CosineB).then_some(node_key),
                })
            }
        };
        if let (Some(s), Value::Object(m)) = (scales(k), &mut op) {
            m.insert("scales".into(), s);
        }
        if let (false, Value::Object(m)) = (k.stored == Stored::Plain, &mut op) {
            m.insert("stored".into(), json!(k.stored));
        }
        let fp8 = matches!(k.dtype, DType::F8E4M3 | DType::F8E5M2);
        if let (Rounding::Stochastic, true, Value::Object(m)) = (spec.rounding, fp8, &mut op) {
            m.insert("rounding".into(), json!({ "stochastic": spec.seed }));
        }
        op
    };
    let by_name: BTreeMap<&str, &KeyPlan> =
        plan.keys.iter().map(|k| (k.name.as_str(), k)).collect();
    plan.keys
        .iter()
        .map(|k| {
            let op = match &k.op {
                // A recomputed scale depends on exactly what its weight does.
                Op::ScaleOf(w) => json!({ "scale_of": by_name.get(w.as_str()).map(|w| op_of(w)) }),
                _ => op_of(k),
            };
            envelope(&k.name, k.dtype, &k.shape, op)
        })
        .collect()
}

/// A tensor's key: what makes it (`op`) and its name, type and shape.
fn envelope(name: &str, dtype: DType, shape: &[usize], op: Value) -> String {
    hash(&json!({
        "algorithm": ALGORITHM_VERSION,
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "op": op,
    }))
}

/// The key of every output tensor of a list merge, in plan order. `inputs` are the tensor
/// key maps of the models in [`crate::merge::multi::ListInputs::all`] order (the base first
/// when there is one, then each input and its minus). A merged tensor's key holds only what
/// reaches it: the method, the parameters it declares (resolved for the tensor's block), the
/// weights, and the keys of the input tensors.
pub fn list_keys(plan: &ListPlan, spec: &ListSpec, inputs: &[&KeyMap]) -> Vec<String> {
    let get = |m: &KeyMap, n: &str| m.get(n).cloned().unwrap_or_default();
    plan.keys
        .iter()
        .map(|k| {
            let mut op = match &k.op {
                ListOp::Copy => json!({ "copy": get(inputs[0], &k.name) }),
                ListOp::Merge { weights, params } => json!({
                    "method": spec.method.name,
                    "parameters": params,
                    "weights": weights,
                    "inputs": inputs.iter().map(|m| get(m, &k.name)).collect::<Vec<_>>(),
                }),
            };
            // Scaled-fp8 inputs: the keys of the scales that dequantize them.
            if plan.quant.iter().any(|q| q.scale(&k.name).is_some()) {
                let sk = Quant::scale_key(&k.name).unwrap_or_default();
                if let Value::Object(m) = &mut op {
                    let scales: Vec<String> = inputs.iter().map(|m| get(m, &sk)).collect();
                    m.insert("scales".into(), json!(scales));
                }
            }
            envelope(&k.name, k.dtype, &k.shape, op)
        })
        .collect()
}
