//! Metadata written into merged files: AUTOMATIC1111 / SuperMerger's `sd_merge_recipe` and
//! `sd_merge_models` (so existing tools recognize the merge) and mergesmith's own record.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::hashing::FileHashes;
use crate::merge::{MergeSpec, Plan};

/// One input model as recorded in the metadata.
pub struct InputRecord<'a> {
    /// File path.
    pub path: &'a Path,
    /// Its hashes.
    pub hashes: &'a FileHashes,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn vector_text(v: &[f64]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `__metadata__` map of a merged file.
pub fn build(
    spec: &MergeSpec,
    plan: &Plan,
    a: InputRecord,
    b: InputRecord,
    c: Option<InputRecord>,
    vae: Option<InputRecord>,
) -> BTreeMap<String, String> {
    let alpha_full = spec_vector(&spec.alpha);
    let beta_full = spec.beta.as_ref().and_then(spec_vector);
    let mbw = alpha_full.is_some() || beta_full.is_some();
    let elemental: Value = match spec.elemental.as_deref().map(str::trim) {
        Some(t) if !t.is_empty() => t
            .replace('\n', ",")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect::<Vec<_>>()
            .into(),
        _ => "".into(),
    };
    let (filter_key, filter_value) = match &spec.filter {
        Some(f) => (
            match f.mode {
                crate::merge::FilterMode::Include => "Include",
                crate::merge::FilterMode::Exclude => "Exclude",
            },
            json!([f.blocks, f.elements]),
        ),
        None => ("Off", json!("")),
    };
    let mut recipe = json!({
        "type": "sd-webui-supermerger",
        "weights_alpha": plan.alpha.without_base(),
        "weights_beta": plan.beta.as_ref().and_then(|b| b.without_base()),
        "weights_alpha_orig": alpha_full.as_deref().map(vector_text),
        "weights_beta_orig": beta_full.as_deref().map(vector_text),
        "model_a": a.hashes.sha256,
        "model_b": b.hashes.sha256,
        "model_c": c.as_ref().map(|c| c.hashes.sha256.clone()),
        "base_alpha": spec.alpha.base(),
        "base_beta": spec.beta.as_ref().map(|b| b.base()),
        "mode": spec.mode.label(),
        "mbw": mbw,
        "elemental_merge": elemental,
        "calcmode": spec.calcmode.label(),
    });
    recipe[filter_key] = filter_value;
    let mut models = serde_json::Map::new();
    for r in [Some(&a), Some(&b), c.as_ref()].into_iter().flatten() {
        models.insert(
            r.hashes.sha256.clone(),
            json!({ "name": file_name(r.path), "legacy_hash": r.hashes.legacy }),
        );
    }
    let input = |r: &InputRecord| json!({ "file": file_name(r.path), "sha256": r.hashes.sha256, "blake3": r.hashes.blake3 });
    let own = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "merge": spec,
        "architecture": plan.arch.family,
        "inputs": {
            "a": input(&a),
            "b": input(&b),
            "c": c.as_ref().map(input),
            "vae": vae.as_ref().map(input),
        },
    });
    let text = |v: &Value| serde_json::to_string(v).expect("JSON values serialize");
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("sd_merge_recipe".to_string(), text(&recipe)),
        ("sd_merge_models".to_string(), text(&Value::Object(models))),
        ("mergesmith".to_string(), text(&own)),
    ])
}

fn spec_vector(r: &crate::merge::Ratio) -> Option<Vec<f64>> {
    match r {
        crate::merge::Ratio::Scalar(_) => None,
        crate::merge::Ratio::Blocks(v) => Some(v.clone()),
    }
}
