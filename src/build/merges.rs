//! Merge IDs and the merge history: every merge a build ran, numbered in build order, with
//! its full settings (the merge's recorded preimage), as `mergesmith log --merges` shows it
//! and as SuperMerger's `mergehistory.csv` writes it.
//!
//! IDs are derived from the build log (`v1/log.jsonl`) and the preimages the cache keeps:
//! the first merge node ever built in a cache is ID 1, the next built one 2, and so on (a
//! cache hit runs nothing and gets no ID), so nothing new is stored and IDs never change.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use crate::hashing::FileHashes;
use crate::merge::{CalcMode, Mode};
use crate::store::Cache;

/// One merge a build ran.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeRecord {
    /// Merge ID: 1 for the first merge built in this cache, then increasing.
    pub id: u64,
    /// The build that ran it.
    pub build: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The recipe.
    pub recipe: PathBuf,
    /// The merge node's name.
    pub node: String,
    /// Its key.
    pub key: String,
    /// Its settings (the merge of its preimage: mode, alpha, beta, calcmode, ...).
    pub merge: Value,
    /// Its inputs A, B (and C): a model by name and blake3, or a node by name and key.
    pub inputs: Value,
}

impl MergeRecord {
    /// One line: the ID, time, node, mode and ratios.
    pub fn line(&self) -> String {
        let m = &self.merge;
        let names: Vec<String> = self
            .inputs
            .as_array()
            .map(|v| v.iter().map(input_name).collect())
            .unwrap_or_default();
        let mut s = format!(
            "M{:<4} {}  {}  {}: {} [{}] alpha={}",
            self.id,
            super::log::utc(self.time),
            self.recipe.display(),
            self.node,
            m["mode"].as_str().unwrap_or("?"),
            names.join(", "),
            m["alpha"]
        );
        if !m["beta"].is_null() {
            let _ = write!(s, " beta={}", m["beta"]);
        }
        if m["calcmode"].as_str().is_some_and(|c| c != "normal") {
            let _ = write!(s, " calcmode={}", m["calcmode"].as_str().unwrap_or(""));
        }
        s
    }

    /// Whether `text` occurs (case-insensitively) in its line or its settings.
    pub fn matches(&self, text: &str) -> bool {
        let t = text.to_lowercase();
        self.line().to_lowercase().contains(&t)
            || self.merge.to_string().to_lowercase().contains(&t)
            || self.inputs.to_string().to_lowercase().contains(&t)
    }
}

fn input_name(v: &Value) -> String {
    v["model"]
        .as_str()
        .or_else(|| v["node"].as_str())
        .unwrap_or("?")
        .to_string()
}

impl Cache {
    /// Every merge built in this cache, oldest first, with its merge ID.
    pub fn merges(&self) -> Vec<MergeRecord> {
        let mut out = Vec::new();
        for e in self.log() {
            for (node, key) in &e.built {
                let Some(p) = self.preimage(key) else {
                    continue;
                };
                if p["op"] != "merge" {
                    continue;
                }
                out.push(MergeRecord {
                    id: out.len() as u64 + 1,
                    build: e.id,
                    time: e.time,
                    recipe: e.recipe.clone(),
                    node: node.clone(),
                    key: key.clone(),
                    merge: p["merge"].clone(),
                    inputs: p["inputs"].clone(),
                });
            }
        }
        out
    }

    /// The merge behind an image: the generate node whose images include `image_key` (the
    /// key a mergesmith PNG carries in its `mergesmith` text), its checkpoint, through `lora`
    /// nodes, to the merge that made it. `None` when no build here made the image, or it was
    /// made from a model file or a list merge.
    pub fn merge_of_image(&self, image_key: &str) -> Option<MergeRecord> {
        let generate = self
            .log()
            .iter()
            .flat_map(|e| e.built.iter().map(|(_, k)| k.clone()))
            .filter_map(|k| self.preimage(&k))
            .find(|p| {
                p["op"] == "generate"
                    && crate::nodes::images::image_keys(p)
                        .iter()
                        .any(|(_, k)| k == image_key)
            })?;
        let records = self.merges();
        let mut input = generate["model"].clone();
        // A chain of lora nodes is finite; the bound only guards a corrupt cache.
        for _ in 0..64 {
            let key = input["key"].as_str()?;
            if let Some(r) = records.iter().find(|r| r.key == key) {
                return Some(r.clone());
            }
            let p = self.preimage(key)?;
            input = match p["op"].as_str()? {
                "lora" => p["input"].clone(),
                _ => return None,
            };
        }
        None
    }
}

/// SuperMerger's `mergehistory.csv` header. Its rows differ from it: after `use MBW` come the
/// custom name, save settings, ID settings, elemental, calcmode, seed, adjust, gamma,
/// Include/Exclude, blocks and elements (23 fields).
const HEADER: &str = "\"ID\",\"time\",\"name\",\"weights alpha\",\"weights beta\",\"model A\",\"model B\",\"model C\",\"alpha\",\"beta\",\"mode\",\"use MBW\",\"plus lora\",\"custum name\",\"save setting\",\"use ID\"";

/// The merges as SuperMerger's `mergehistory.csv` (its columns, `recipe from-supermerger`
/// reads it back). Models are named by their AutoV2 hash where `hashes` (blake3 → hashes,
/// from the cache's hash memo) knows the file, else by their recipe name; a node input by
/// `node:NAME`.
pub fn mergehistory_csv(records: &[MergeRecord], hashes: &BTreeMap<String, FileHashes>) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    for r in records {
        let m = &r.merge;
        let inputs = r.inputs.as_array().cloned().unwrap_or_default();
        let model = |i: usize| -> String {
            let Some(v) = inputs.get(i) else {
                return String::new();
            };
            if let Some(n) = v["node"].as_str() {
                return format!("node:{n}");
            }
            v["content"]
                .as_str()
                .and_then(|b| hashes.get(b))
                .map(|h| h.autov2.clone())
                .unwrap_or_else(|| input_name(v))
        };
        let ratio = |v: &Value| -> (String, String, bool) {
            match v {
                Value::Array(a) => {
                    let text: Vec<String> = a.iter().map(|x| x.to_string()).collect();
                    let base = text.first().cloned().unwrap_or_default();
                    (text.join(","), base, true)
                }
                Value::Null => (String::new(), "0".into(), false),
                other => (String::new(), other.to_string(), false),
            }
        };
        let (wa, alpha, mbw_a) = ratio(&m["alpha"]);
        let (wb, beta, mbw_b) = ratio(&m["beta"]);
        let mode = m["mode"]
            .as_str()
            .and_then(<Mode as crate::text::Named>::from_name)
            .map(|md| format!("{}:{}", md.label(), md.formula()))
            .unwrap_or_default();
        let calc = m["calcmode"]
            .as_str()
            .and_then(<CalcMode as crate::text::Named>::from_name)
            .map(|c| c.label().to_string())
            .unwrap_or_else(|| "normal".into());
        let adjust = match &m["adjust"] {
            Value::Array(a) => a
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        let (inex, blocks, elements) = match &m["filter"] {
            Value::Object(f) => {
                let words = |k: &str| -> String {
                    let items: Vec<String> = f
                        .get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .split([',', ' '])
                        .filter(|w| !w.is_empty())
                        .map(|w| format!("'{w}'"))
                        .collect();
                    format!("[{}]", items.join(", "))
                };
                let mode = f.get("mode").and_then(|v| v.as_str()).unwrap_or("");
                let mut c = mode.chars();
                let mode = c
                    .next()
                    .map(|h| h.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default();
                (mode, words("blocks"), words("elements"))
            }
            _ => ("Off".into(), "[]".into(), String::new()),
        };
        let fields: Vec<String> = vec![
            r.id.to_string(),
            super::log::utc(r.time).replace(['-', ':'], "."),
            format!("{} ({})", r.node, r.recipe.display()),
            wa,
            wb,
            model(0),
            model(1),
            model(2),
            alpha,
            beta,
            mode,
            if mbw_a || mbw_b { "True" } else { "False" }.into(),
            String::new(), // custom name
            "[]".into(),   // save settings
            "[]".into(),   // ID settings
            m["elemental"].as_str().unwrap_or("").to_string(),
            calc,
            m["seed"].as_u64().unwrap_or(0).to_string(),
            adjust,
            m["gamma"].as_f64().unwrap_or(0.3).to_string(),
            inex,
            blocks,
            elements,
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}
