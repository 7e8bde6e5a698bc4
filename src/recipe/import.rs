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
    field(&mut out, "numerics", m.get("numerics"));
    // The alpha recorded is the drawn vector; random elemental ratios still need the dice.
    field(&mut out, "dice", m.get("dice"));
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
    let mode = Mode::from_label(label)
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
    let calc_uses_beta = sm["calcmode"]
        .as_str()
        .and_then(CalcMode::from_label)
        .is_some_and(|c| c.uses_beta());
    if mode.uses_beta() || calc_uses_beta {
        field(
            &mut out,
            "beta",
            ratio("weights_beta_orig", "base_beta").as_ref(),
        );
    }
    if let Some(label) = sm["calcmode"].as_str().filter(|c| *c != "normal") {
        let calc = CalcMode::from_label(label).ok_or_else(|| {
            Error::Invalid(format!("{name}: unknown SuperMerger calcmode `{label}`"))
        })?;
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
            compatible_elemental(&mut out);
        }
        _ => {}
    }
    compatible_numerics(&mut out);
    let _ = writeln!(
        out,
        "  save:\n    save: merged\n    to: {}",
        y(&format!("{stem}.rebuilt.safetensors").into())
    );
    Ok(out)
}

/// SuperMerger reads SDXL elemental block names shifted (its issue #468); an imported
/// elemental text means what it meant there (the switch only acts on SDXL models).
fn compatible_elemental(out: &mut String) {
    let _ = writeln!(out, "    xl_elemental_shift: true");
}

/// An imported SuperMerger merge is rebuilt with SuperMerger's arithmetic, bit for bit.
fn compatible_numerics(out: &mut String) {
    let _ = writeln!(
        out,
        "    numerics: supermerger   # SuperMerger's roundings; drop for f32 (more accurate)"
    );
}

/// Parses Python's list repr (`['IN01', 'IN02']`) as SuperMerger writes it into its history.
fn py_list(text: &str) -> Vec<String> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A recipe with one merge node per row of SuperMerger's `mergehistory.csv` (or only the row
/// with ID `id`). Models are named by their short (AutoV2) hash, the only thing the history
/// records; point their paths at your files.
pub fn from_supermerger_history(csv_path: &Path, id: Option<u64>) -> Result<String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(csv_path)
        .map_err(|e| Error::Invalid(format!("{}: {e}", csv_path.display())))?;
    let mut models: std::collections::BTreeMap<String, ()> = Default::default();
    let mut nodes = String::new();
    let mut count = 0;
    for (line, row) in reader.records().enumerate() {
        let row = row.map_err(|e| {
            Error::Invalid(format!("{}: row {}: {e}", csv_path.display(), line + 2))
        })?;
        let col = |i: usize| row.get(i).unwrap_or("").trim();
        let row_id: u64 = col(0).parse().unwrap_or(0);
        if id.is_some_and(|want| want != row_id) {
            continue;
        }
        let at = format!("{}: history ID {row_id}", csv_path.display());
        let label = col(10).split(':').next().unwrap_or("");
        let mode = Mode::from_label(label)
            .ok_or_else(|| Error::Invalid(format!("{at}: unknown mode `{}`", col(10))))?;
        let _ = writeln!(
            nodes,
            "  merge_{row_id}:    # {}",
            col(2).replace('\n', " ")
        );
        let _ = writeln!(
            nodes,
            "    merge: {}",
            y(&serde_json::to_value(mode).unwrap_or_default())
        );
        let slots: &[(&str, usize)] = if mode.uses_c() {
            &[("a", 5), ("b", 6), ("c", 7)]
        } else {
            &[("a", 5), ("b", 6)]
        };
        for (slot, i) in slots {
            let hash = col(*i);
            if hash.is_empty() {
                return Err(Error::Invalid(format!("{at}: model {slot} has no hash")));
            }
            models.insert(hash.to_string(), ());
            let _ = writeln!(nodes, "    {slot}: model_{hash}");
        }
        let mbw = col(11).eq_ignore_ascii_case("true");
        let ratio = |weights: usize, scalar: usize| -> Value {
            if mbw && !col(weights).is_empty() {
                col(weights).into()
            } else {
                col(scalar)
                    .parse::<f64>()
                    .map(Value::from)
                    .unwrap_or(Value::Null)
            }
        };
        field(&mut nodes, "alpha", Some(&ratio(3, 8)));
        let calc_label = col(16);
        let calc = CalcMode::from_label(calc_label);
        if mode.uses_beta() || calc.is_some_and(|c| c.uses_beta()) {
            field(&mut nodes, "beta", Some(&ratio(4, 9)));
        }
        match calc {
            Some(c) => {
                field(
                    &mut nodes,
                    "calcmode",
                    serde_json::to_value(c).ok().as_ref(),
                );
                if c == CalcMode::Extract {
                    field(
                        &mut nodes,
                        "gamma",
                        col(19).parse::<f64>().ok().map(Value::from).as_ref(),
                    );
                }
                if let Ok(seed) = col(17).parse::<u64>() {
                    field(&mut nodes, "seed", Some(&seed.into()));
                }
            }
            None if calc_label.is_empty() || calc_label == "normal" => {}
            None => {
                return Err(Error::Invalid(format!(
                    "{at}: unknown calcmode `{calc_label}`"
                )))
            }
        }
        if !col(15).is_empty() {
            field(&mut nodes, "elemental", Some(&col(15).into()));
            compatible_elemental(&mut nodes);
        }
        let adjust: Vec<f64> = col(18)
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        if adjust.len() == 8 && adjust.iter().any(|v| *v != 0.0) {
            field(&mut nodes, "adjust", Some(&adjust.into()));
        }
        let filter = col(20).to_ascii_lowercase();
        if filter == "include" || filter == "exclude" {
            let blocks = py_list(col(21)).join(" ");
            let elements = py_list(col(22)).join(",");
            let _ = writeln!(
                nodes,
                "    {filter}: {{ blocks: {}, elements: {} }}",
                y(&blocks.into()),
                y(&elements.into())
            );
        }
        compatible_numerics(&mut nodes);
        count += 1;
    }
    if count == 0 {
        return Err(Error::Invalid(match id {
            Some(i) => format!("{}: no history row with ID {i}", csv_path.display()),
            None => format!("{}: no history rows", csv_path.display()),
        }));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from SuperMerger's {} by mergesmith.",
        csv_path.display()
    );
    let _ = writeln!(
        out,
        "# The history only records short (AutoV2) model hashes: set each model's path."
    );
    let _ = writeln!(out, "version: 1\nmodels:");
    for hash in models.keys() {
        let _ = writeln!(
            out,
            "  model_{hash}: {{ path: {}, autov2: {} }}",
            y(&format!("{hash}.safetensors").into()),
            y(&hash.as_str().into())
        );
    }
    let _ = writeln!(out, "nodes:");
    out.push_str(&nodes);
    Ok(out)
}
