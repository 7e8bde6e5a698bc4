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

/// How SuperMerger's LoRA merge was set up, beside its LoRA text.
#[derive(Debug, Clone, Default)]
pub struct SupermergerLoras {
    /// Its block-weight presets (`NAME:v1,v2,...` lines; SuperMerger's own when `None`).
    pub presets: Option<String>,
    /// "remake dimension": `None` or `no` (sum of factors), `auto`, or a rank.
    pub dim: Option<String>,
    /// "same to Strength".
    pub same_to_strength: bool,
    /// "metadata".
    pub metadata: Option<crate::lora::merge::MetadataMode>,
    /// "save precision": float, fp16 (SuperMerger's default) or bf16.
    pub precision: Option<String>,
    /// "Extract from two LoRAs" with these alpha, beta and gamma (smooth).
    pub extract: Option<[f64; 3]>,
}

/// SuperMerger's block ids for a vector of `len` values, in its 26-slot order (its `to26`).
fn sm_to26(values: Vec<f64>) -> Option<Vec<f64>> {
    use crate::arch::Family;
    use crate::lora::blocks::block_ids;
    let n = values.len();
    if n == 26 || n > 40 {
        return Some(values);
    }
    let ids = match n {
        17 => block_ids(Family::builtin("sd1"), 17)?,
        12 | 20 => block_ids(Family::builtin("sdxl"), n)?,
        _ => return None,
    };
    let all = block_ids(Family::builtin("sd1"), 26)?;
    let mut out = vec![0.0; 26];
    for (id, v) in ids.iter().zip(values) {
        out[all.iter().position(|a| a == id)?] = v;
    }
    Some(out)
}

/// Python's `str` of a float, as the recipe writes SuperMerger's ratios.
fn num(v: f64) -> String {
    Value::from(v).to_string()
}

/// A recipe with the `merge_loras` node SuperMerger's LoRA tab makes of `text`
/// (`NAME:RATIO[:PRESET | :v1,v2,...],...`), read as SuperMerger reads it: a preset's values
/// are multiplied by the ratio, an explicit block vector is taken as it is (the ratio before
/// it is ignored), and 12/17/20-value vectors are placed by SuperMerger's block ids.
pub fn from_supermerger_loras(text: &str, set: &SupermergerLoras) -> Result<String> {
    let bad = |what: String| Error::Invalid(format!("SuperMerger LoRA text `{text}`: {what}"));
    // Items with a ':' start a LoRA; the others continue the previous one's block vector.
    let mut entries: Vec<Vec<&str>> = Vec::new();
    for item in text.split(',') {
        if item.contains(':') {
            entries.push(item.split(':').collect());
        } else if let Some(last) = entries.last_mut() {
            last.push(item);
        } else {
            return Err(bad(format!("`{item}` comes before any NAME:RATIO")));
        }
    }
    if entries.is_empty() {
        return Err(bad("no LoRA in it".into()));
    }
    let preset_text = set.presets.clone().unwrap_or_else(|| {
        crate::lora::blocks::PRESETS
            .iter()
            .map(|(n, v)| format!("{n}:{v}\n"))
            .collect()
    });
    let mut presets = std::collections::BTreeMap::new();
    for line in preset_text.lines() {
        let Some((name, values)) = line.split_once(':') else {
            continue;
        };
        // SuperMerger keeps the lines with 12, 17, 20, 26 or 61 values.
        if [12, 17, 20, 26, 61].contains(&(line.matches(',').count() + 1)) {
            presets.insert(name.trim().to_string(), values.to_string());
        }
    }
    let number = |s: &str| -> Result<f64> {
        s.trim()
            .parse::<f64>()
            .map_err(|_| bad(format!("`{s}` is not a number")))
    };
    // (models line, loras line) per LoRA.
    let mut lines: Vec<(String, String)> = Vec::new();
    for e in &entries {
        let name = e[0].trim();
        let ratio = number(e[1])?;
        let (strength, blocks, note) = match e.len() {
            2 => (ratio, None, None),
            3 => match presets.get(e[2].trim()) {
                Some(values) => {
                    let v: Vec<f64> = values
                        .split(',')
                        .map(|x| number(x).map(|x| x * ratio))
                        .collect::<Result<_>>()?;
                    (1.0, sm_to26(v), None)
                }
                None => (
                    ratio,
                    None,
                    Some(format!(
                        "SuperMerger knows no preset `{}` and uses the ratio everywhere",
                        e[2].trim()
                    )),
                ),
            },
            n if [12, 17, 20, 26, 61].contains(&(n - 2)) => {
                let v: Vec<f64> = e[2..].iter().map(|x| number(x)).collect::<Result<_>>()?;
                (
                    1.0,
                    sm_to26(v),
                    (ratio != 1.0).then(|| {
                        format!(
                            "SuperMerger ignores the ratio {} before explicit block weights",
                            e[1].trim()
                        )
                    }),
                )
            }
            n => {
                return Err(bad(format!(
                    "`{name}` has {} block weights; SuperMerger takes 12, 17, 20, 26 or 61",
                    n - 2
                )))
            }
        };
        let model = format!(
            "  {}: {{ path: {} }}\n",
            y(&name.into()),
            y(&format!("{name}.safetensors").into())
        );
        let blocks = blocks
            .map(|b| {
                let v: Vec<String> = b.into_iter().map(num).collect();
                format!(", blocks: {}", y(&v.join(",").into()))
            })
            .unwrap_or_default();
        let lora = format!(
            "        - {{ file: {}, strength: {}{blocks} }}{}\n",
            y(&name.into()),
            num(strength),
            note.map(|n| format!("   # {n}")).unwrap_or_default()
        );
        lines.push((model, lora));
    }
    let mut node = String::new();
    match (set.extract, set.dim.as_deref().unwrap_or("no")) {
        (Some([alpha, beta, gamma]), _) => {
            if entries.len() < 2 {
                return Err(bad("extract from two LoRAs needs two".into()));
            }
            let _ = writeln!(
                node,
                "      mode: extract\n      alpha: {}\n      beta: {}\n      gamma: {}",
                num(alpha),
                num(beta),
                num(gamma)
            );
            if entries.len() > 2 {
                let _ = writeln!(
                    node,
                    "      # SuperMerger extracts from the first two LoRAs; the others are left out here too"
                );
                lines.truncate(2);
            }
        }
        (None, "no") => {
            let _ = writeln!(node, "      mode: kohya");
        }
        (None, "auto") => {
            let _ = writeln!(
                node,
                "      mode: kohya   # SuperMerger's dim auto: where the ranks differ, mode svd at the largest rank"
            );
        }
        (None, dim) => {
            let rank: usize = dim
                .parse()
                .map_err(|_| bad(format!("dimension `{dim}`: expected no, auto or a rank")))?;
            let _ = writeln!(node, "      mode: svd\n      rank: {rank}");
        }
    }
    if set.same_to_strength {
        let _ = writeln!(node, "      same_to_strength: true");
    }
    if let Some(m) = set.metadata {
        let _ = writeln!(node, "      metadata: {}", crate::text::Named::name(m));
    }
    let dtype = match set.precision.as_deref().unwrap_or("fp16") {
        "float" | "fp32" => "fp32",
        "fp16" => "fp16",
        "bf16" => "bf16",
        other => {
            return Err(bad(format!(
                "save precision `{other}`: expected float, fp16 or bf16"
            )))
        }
    };
    let _ = writeln!(node, "      dtype: {dtype}");
    let file = format!("{}.safetensors", text.replace(',', "+").replace(':', "_"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from SuperMerger's LoRA merge text by mergesmith: {}",
        y(&text.into())
    );
    let _ = writeln!(out, "# Point each LoRA's path at your file.");
    let _ = writeln!(out, "version: 1\nmodels:");
    lines.iter().for_each(|(m, _)| out.push_str(m));
    let _ = writeln!(out, "nodes:\n  merged:\n    merge_loras:");
    out.push_str(&node);
    let _ = writeln!(out, "      loras:");
    lines.iter().for_each(|(_, l)| out.push_str(l));
    let _ = writeln!(
        out,
        "  save:\n    save: merged\n    to: {}",
        y(&file.into())
    );
    Ok(out)
}
