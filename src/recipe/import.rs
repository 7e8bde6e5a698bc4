//! Turning a merged model back into a recipe: from mergesmith's own metadata (exact), or from
//! SuperMerger's `sd_merge_recipe` / `sd_merge_models` (what SuperMerger records).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merge::{CalcMode, Mode};

/// YAML for a JSON value (JSON scalars and flow sequences are valid YAML).
fn y(v: &Value) -> String {
    v.to_string()
}

fn field(out: &mut String, name: &str, v: Option<&Value>) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        let _ = writeln!(out, "    {name}: {}", y(v));
    }
}

/// A recipe (YAML text) that rebuilds the merge recorded in `path`'s metadata.
pub fn from_model(path: &Path) -> Result<String> {
    let ck = Checkpoint::open(path)?;
    let md = ck.metadata();
    let parse = |k: &str| {
        md.get(k)
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(own) = parse("mergesmith") {
        return Ok(from_mergesmith(&own, &name, &stem));
    }
    if let Some(sm) = parse("sd_merge_recipe") {
        return from_supermerger(&sm, parse("sd_merge_models").as_ref(), &name, &stem);
    }
    Err(Error::Invalid(format!(
        "{}: no merge recipe in its metadata (neither mergesmith's nor SuperMerger's sd_merge_recipe)",
        path.display()
    )))
}

fn header(out: &mut String, name: &str) {
    let _ = writeln!(
        out,
        "# Recreated from the metadata of {name} by mergesmith."
    );
    let _ = writeln!(out, "# Check the model paths before building.");
    let _ = writeln!(out, "version: 1\nmodels:");
}

fn from_mergesmith(own: &Value, name: &str, stem: &str) -> String {
    let mut out = String::new();
    header(&mut out, name);
    let inputs = &own["inputs"];
    for slot in ["a", "b", "c", "vae"] {
        let i = &inputs[slot];
        if let Some(file) = i["file"].as_str() {
            let _ = writeln!(
                out,
                "  {slot}: {{ path: {}, sha256: {} }}",
                y(&file.into()),
                y(&i["sha256"])
            );
        }
    }
    let m = &own["merge"];
    let _ = writeln!(out, "nodes:\n  merged:");
    field(&mut out, "merge", m.get("mode"));
    let _ = writeln!(out, "    a: a\n    b: b");
    if inputs["c"].is_object() {
        let _ = writeln!(out, "    c: c");
    }
    for f in ["alpha", "beta"] {
        field(&mut out, f, m.get(f));
    }
    if m["calcmode"] != "normal" {
        for f in ["calcmode", "gamma", "seed"] {
            field(&mut out, f, m.get(f));
        }
    }
    field(&mut out, "elemental", m.get("elemental"));
    if m["xl_elemental_shift"] == true {
        let _ = writeln!(out, "    xl_elemental_shift: true");
    }
    if let Some(f) = m.get("filter").filter(|f| f.is_object()) {
        let _ = writeln!(
            out,
            "    {}: {{ blocks: {}, elements: {} }}",
            f["mode"].as_str().unwrap_or("exclude"),
            y(&f["blocks"]),
            y(&f["elements"])
        );
    }
    field(&mut out, "adjust", m.get("adjust"));
    field(&mut out, "dtype", m.get("dtype"));
    for f in ["prune", "reset_position_ids"] {
        if m[f] == true {
            let _ = writeln!(out, "    {f}: true");
        }
    }
    if inputs["vae"].is_object() {
        let _ = writeln!(out, "    bake_vae: vae");
    }
    let _ = writeln!(
        out,
        "  save:\n    save: merged\n    to: {}",
        y(&format!("{stem}.rebuilt.safetensors").into())
    );
    out
}

fn from_supermerger(sm: &Value, models: Option<&Value>, name: &str, stem: &str) -> Result<String> {
    let label = sm["mode"].as_str().unwrap_or_default();
    let mode = [
        Mode::WeightSum,
        Mode::AddDifference,
        Mode::TripleSum,
        Mode::SumTwice,
    ]
    .into_iter()
    .find(|m| m.label() == label)
    .ok_or_else(|| Error::Invalid(format!("{name}: unknown SuperMerger mode `{label}`")))?;
    let mut out = String::new();
    header(&mut out, name);
    let slots: Vec<&str> = if mode.uses_c() {
        vec!["a", "b", "c"]
    } else {
        vec!["a", "b"]
    };
    for slot in &slots {
        let sha = sm[format!("model_{slot}")].as_str().unwrap_or_default();
        let file = models
            .and_then(|m| m[sha]["name"].as_str())
            .map(String::from)
            .unwrap_or_else(|| format!("model_{slot}.safetensors"));
        let _ = writeln!(
            out,
            "  {slot}: {{ path: {}, sha256: {} }}",
            y(&file.into()),
            y(&sha.into())
        );
    }
    let _ = writeln!(
        out,
        "nodes:\n  merged:\n    merge: {}",
        y(&serde_json::to_value(mode).unwrap_or_default())
    );
    for slot in &slots {
        let _ = writeln!(out, "    {slot}: {slot}");
    }
    // With MBW the full vectors are in weights_*_orig; otherwise the base values.
    let ratio = |orig: &str, base: &str| -> Option<Value> {
        match sm
            .get(orig)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
        {
            Some(text) if sm["mbw"] == true => Some(text.into()),
            _ => sm.get(base).filter(|v| v.is_number()).cloned(),
        }
    };
    field(
        &mut out,
        "alpha",
        ratio("weights_alpha_orig", "base_alpha").as_ref(),
    );
    if mode.uses_beta()
        || sm["calcmode"] == "tensor"
        || sm["calcmode"] == "tensor2"
        || sm["calcmode"] == "extract"
    {
        field(
            &mut out,
            "beta",
            ratio("weights_beta_orig", "base_beta").as_ref(),
        );
    }
    if let Some(label) = sm["calcmode"].as_str().filter(|c| *c != "normal") {
        let calc = [
            CalcMode::CosineA,
            CalcMode::CosineB,
            CalcMode::TrainDifference,
            CalcMode::SmoothAdd,
            CalcMode::SmoothAddMt,
            CalcMode::Extract,
            CalcMode::Tensor,
            CalcMode::Tensor2,
            CalcMode::SelfScale,
            CalcMode::PlusRandom,
        ]
        .into_iter()
        .find(|c| c.label() == label)
        .ok_or_else(|| Error::Invalid(format!("{name}: unknown SuperMerger calcmode `{label}`")))?;
        field(
            &mut out,
            "calcmode",
            serde_json::to_value(calc).ok().as_ref(),
        );
    }
    match &sm["elemental_merge"] {
        Value::Array(items) if !items.is_empty() => {
            let text: Vec<&str> = items.iter().filter_map(|v| v.as_str()).collect();
            field(&mut out, "elemental", Some(&text.join(",").into()));
        }
        _ => {}
    }
    let _ = writeln!(
        out,
        "  save:\n    save: merged\n    to: {}",
        y(&format!("{stem}.rebuilt.safetensors").into())
    );
    Ok(out)
}
