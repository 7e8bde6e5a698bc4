//! The metadata of a merged LoRA (SuperMerger's five choices, [`MetadataMode`]) and the
//! additional-networks hashes (`sshs_model_hash`, `sshs_legacy_hash`) of the file written.
//!
//! Each source contributes what SuperMerger records of it: its own metadata plus
//! `sshs_ratio` (the strength), `sshs_blocks` (the weight of each of the 26 SD blocks, or of
//! the family's blocks, strength included) and `ss_output_name` (its file name). Values that
//! hold JSON objects (`ss_tag_frequency`, `ss_dataset_dirs`) are read as objects, as
//! AUTOMATIC1111 reads them, so `sshs_cpN` nests them.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::arch::Family;
use crate::lora::bake::Application;
use crate::lora::merge::{MergeOptions, MetadataMode};
use crate::lora::KohyaLora;

/// Keys "create new" keeps from the first file (the network keys are the result's own).
const KEPT_BY_NEW: &[&str] = &["ss_v2", "ss_sd_model_name", "ss_base_model_version"];

/// Python's `repr` of a float (`1.0`, `0.5`), as SuperMerger writes ratios.
fn py_float(v: f64) -> String {
    format!("{v:?}")
}

/// What SuperMerger records of one source LoRA.
fn source_meta(s: &Application) -> BTreeMap<String, String> {
    let mut m = s.file.ck.metadata().clone();
    m.insert("sshs_ratio".into(), s.strength.to_string());
    let ids: Vec<String> = match &s.blocks {
        Some(b) if b.family.lora().is_some() => b
            .family
            .lists()
            .get(b.list)
            .map(|l| l.slots.clone())
            .unwrap_or_default(),
        Some(b) => crate::lora::blocks::block_ids(b.family, 26).unwrap_or_default(),
        None => crate::lora::blocks::block_ids(Family::builtin("sd1"), 26).unwrap_or_default(),
    };
    let blocks: Vec<String> = ids
        .iter()
        .map(|id| {
            let w = s.blocks.as_ref().map_or(1.0, |b| b.weight(Some(id)));
            py_float(s.strength * w)
        })
        .collect();
    m.insert("sshs_blocks".into(), blocks.join(","));
    let stem = s
        .file
        .path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    m.insert("ss_output_name".into(), stem);
    m
}

/// A metadata value as AUTOMATIC1111 reads it: JSON objects parsed, everything else a string.
fn read_value(v: &str) -> Value {
    if v.starts_with('{') {
        if let Ok(o @ Value::Object(_)) = serde_json::from_str(v) {
            return o;
        }
    }
    Value::String(v.to_string())
}

/// The merged LoRA's metadata (without the hashes, which [`KohyaLora::stamp_addnet_hashes`]
/// adds once the bytes are known). What could not be merged goes to `warnings`.
pub fn merged(
    sources: &[Application],
    lora: &KohyaLora,
    opts: &MergeOptions,
    output_name: &str,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let metas: Vec<BTreeMap<String, String>> = sources.iter().map(source_meta).collect();
    let first = metas.first().cloned().unwrap_or_default();
    let mut md = match opts.metadata {
        MetadataMode::New | MetadataMode::NewWithoutName => {
            let mut md: BTreeMap<String, String> = KEPT_BY_NEW
                .iter()
                .filter_map(|k| first.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
            let names: Vec<String> = sources
                .iter()
                .map(|s| {
                    s.file
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect();
            md.insert("modelspec.merged_from".into(), names.join(", "));
            md
        }
        MetadataMode::First => first.clone(),
        MetadataMode::All | MetadataMode::Merge => {
            let mut md = first.clone();
            for (i, m) in metas.iter().enumerate() {
                let obj: Map<String, Value> =
                    m.iter().map(|(k, v)| (k.clone(), read_value(v))).collect();
                md.insert(format!("sshs_cp{i}"), Value::Object(obj).to_string());
            }
            if opts.metadata == MetadataMode::Merge {
                merge_tags(&mut md, &metas, warnings);
            }
            md
        }
    };
    // The result is a plain kohya LoRA whatever the inputs were.
    md.insert("ss_network_module".into(), "networks.lora".into());
    if opts.metadata == MetadataMode::NewWithoutName {
        md.remove("ss_output_name");
    } else {
        md.insert("ss_output_name".into(), output_name.to_string());
    }
    // SuperMerger's spelling of its save precisions: float, fp16, bf16.
    let precision = match opts.dtype {
        crate::dtype::FloatType::Fp32 => "float",
        other => crate::text::Named::name(other),
    };
    md.insert("ss_mixed_precision".into(), precision.into());
    // The network's rank and alpha, when every module has the same (else a reader would be
    // told something false).
    let uniform = |f: &dyn Fn(&crate::lora::Factored) -> String| {
        let mut all = lora.modules.iter().map(f);
        let one = all.next()?;
        all.all(|v| v == one).then_some(one)
    };
    for (key, value) in [
        ("ss_network_dim", uniform(&|m| m.rank.to_string())),
        ("ss_network_alpha", uniform(&|m| py_float(m.alpha as f64))),
    ] {
        match value {
            Some(v) => md.insert(key.into(), v),
            None => md.remove(key),
        };
    }
    md
}

/// "merge": the tag frequencies of every file, a dataset folder the result lacks taken from
/// the first file that has it (SuperMerger keeps the first).
fn merge_tags(
    md: &mut BTreeMap<String, String>,
    metas: &[BTreeMap<String, String>],
    warnings: &mut Vec<String>,
) {
    let mut tags: Option<Map<String, Value>> = None;
    for (i, m) in metas.iter().enumerate() {
        let Some(text) = m.get("ss_tag_frequency") else {
            continue;
        };
        match read_value(text) {
            Value::Object(o) => match &mut tags {
                None => tags = Some(o),
                Some(t) => {
                    for (k, v) in o {
                        t.entry(k).or_insert(v);
                    }
                }
            },
            _ => warnings.push(format!(
                "LoRA {} (#{}): ss_tag_frequency is not a JSON object; its tags were not merged",
                m.get("ss_output_name").map_or("?", String::as_str),
                i + 1
            )),
        }
    }
    if let Some(t) = tags {
        md.insert("ss_tag_frequency".into(), Value::Object(t).to_string());
    }
}
