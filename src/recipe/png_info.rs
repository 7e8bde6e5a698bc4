//! `recipe from-png`: a recipe with one `generate` node from the generation parameters an
//! image carries (A1111's and Forge's `parameters` text, as mergesmith writes it too).
//!
//! Read as A1111's `parse_generation_parameters` reads them: the prompt, an optional
//! `Negative prompt:` part, and a last line of `Key: value` pairs (values JSON-quoted when they
//! hold commas or colons). Every key that becomes part of the node is named in the node; every
//! other key is listed in a comment at the top, never dropped silently.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gen::noise::NoiseSource;
use crate::gen::prompt::Emphasis;
use crate::gen::sampler::{Sampler, ScheduleKind};
use crate::text::Named;

/// A1111's parameters text split into prompt, negative prompt and its `Key: value` pairs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative: String,
    /// The pairs of the last line, in order (quoted values unquoted).
    pub pairs: Vec<(String, String)>,
}

/// Splits A1111's `parameters` text.
pub fn parse(text: &str) -> Parsed {
    let text = text.trim();
    let mut lines: Vec<&str> = text.split('\n').collect();
    let last = lines.pop().unwrap_or_default();
    let pairs = pairs(last);
    let mut out = Parsed::default();
    if pairs.len() < 3 {
        lines.push(last);
    } else {
        out.pairs = pairs;
    }
    let mut in_negative = false;
    for line in lines {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            out.negative = rest.trim_start().to_string();
            continue;
        }
        let target = if in_negative {
            &mut out.negative
        } else {
            &mut out.prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    out
}

/// The `Key: value` pairs of A1111's last line (`\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`).
fn pairs(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        let word = |c: char| c.is_alphanumeric() || c == '_';
        if i >= chars.len() || !word(chars[i]) {
            break;
        }
        while i < chars.len() && (word(chars[i]) || " -/".contains(chars[i])) {
            i += 1;
        }
        if i >= chars.len() || chars[i] != ':' {
            break;
        }
        let key: String = chars[start..i].iter().collect();
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let value = if i < chars.len() && chars[i] == '"' {
            let from = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(chars.len());
            let quoted: String = chars[from..i].iter().collect();
            serde_json::from_str::<String>(&quoted).unwrap_or(quoted)
        } else {
            let from = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            chars[from..i].iter().collect::<String>().trim().to_string()
        };
        out.push((key.trim().to_string(), value));
        // The separating comma.
        while i < chars.len() && chars[i] != ',' {
            i += 1;
        }
        i += 1;
    }
    out
}

/// Adds `yaml: value` to the node, marking A1111's `key` as carried over.
fn field(
    node: &mut String,
    used: &mut Vec<&'static str>,
    key: &'static str,
    yaml: &str,
    value: String,
) {
    used.push(key);
    let _ = writeln!(node, "      {yaml}: {value}");
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The recipe for the image at `path`.
pub fn from_png(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = crate::gen::png::read_text(&bytes)?
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no `parameters` text (A1111 / Forge generation parameters)",
                path.display()
            ))
        })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    recipe(&parse(&text), &name)
}

/// The recipe for parsed parameters, naming the image `source` in its header.
pub fn recipe(p: &Parsed, source: &str) -> Result<String> {
    let get = |k: &str| {
        p.pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let mut used: Vec<&'static str> = Vec::new();
    let mut node = String::new();
    let mut notes: Vec<String> = Vec::new();
    let bad = |k: &str, v: &str| Error::Invalid(format!("`{k}: {v}` is not understood"));
    let (_, tags) = crate::gen::prompt::extra_networks(&p.prompt);
    let _ = writeln!(node, "      prompt: {}", quote(&p.prompt));
    if !p.negative.is_empty() {
        let _ = writeln!(node, "      negative: {}", quote(&p.negative));
    }
    if let Some(v) = get("Steps") {
        let n: usize = v.parse().map_err(|_| bad("Steps", v))?;
        field(&mut node, &mut used, "Steps", "steps", n.to_string());
    }
    if let Some(v) = get("Sampler") {
        // Before A1111 1.9 the schedule was part of the sampler's name.
        let (label, suffix) = match v.rsplit_once(' ') {
            Some((l, s))
                if ScheduleKind::from_name(s).is_some() && Sampler::from_name(l).is_some() =>
            {
                (l, ScheduleKind::from_name(s))
            }
            _ => (v, None),
        };
        let s = Sampler::from_name(label)
            .ok_or_else(|| Error::Invalid(format!("sampler `{v}` is not one mergesmith has")))?;
        field(
            &mut node,
            &mut used,
            "Sampler",
            "sampler",
            s.name().to_string(),
        );
        if let (Some(k), None) = (suffix, get("Schedule type")) {
            let _ = writeln!(node, "      schedule: {}", k.name());
        }
    }
    if let Some(v) = get("Schedule type") {
        used.push("Schedule type");
        if v != "Automatic" {
            let k = ScheduleKind::from_name(v).ok_or_else(|| {
                Error::Invalid(format!("schedule type `{v}` is not one mergesmith has"))
            })?;
            let _ = writeln!(node, "      schedule: {}", k.name());
        }
    }
    if let Some(v) = get("CFG scale") {
        let c: f64 = v.parse().map_err(|_| bad("CFG scale", v))?;
        field(&mut node, &mut used, "CFG scale", "cfg", c.to_string());
    }
    if let Some(v) = get("Distilled CFG Scale") {
        let g: f64 = v.parse().map_err(|_| bad("Distilled CFG Scale", v))?;
        field(
            &mut node,
            &mut used,
            "Distilled CFG Scale",
            "guidance",
            g.to_string(),
        );
    }
    if let Some(v) = get("Seed") {
        let s: u64 = v.parse().map_err(|_| bad("Seed", v))?;
        field(&mut node, &mut used, "Seed", "seed", s.to_string());
    }
    if let Some(v) = get("Size") {
        let (w, h) = v
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
            .ok_or_else(|| bad("Size", v))?;
        used.push("Size");
        let _ = writeln!(node, "      width: {w}\n      height: {h}");
    }
    if let Some(v) = get("Clip skip") {
        let n: usize = v.parse().map_err(|_| bad("Clip skip", v))?;
        field(
            &mut node,
            &mut used,
            "Clip skip",
            "clip_skip",
            n.to_string(),
        );
    }
    if let Some(v) = get("RNG") {
        let source = match v {
            "NV" => NoiseSource::Nv,
            "CPU" => NoiseSource::Cpu,
            _ => {
                return Err(Error::Invalid(format!(
                    "RNG `{v}`: mergesmith draws torch's CPU noise (`CPU`) or A1111's NV \
                     emulation (`NV`), not the GPU's own"
                )))
            }
        };
        field(
            &mut node,
            &mut used,
            "RNG",
            "noise",
            source.name().to_string(),
        );
    }
    if let Some(v) = get("Emphasis") {
        let e = Emphasis::from_name(v).ok_or_else(|| bad("Emphasis", v))?;
        field(
            &mut node,
            &mut used,
            "Emphasis",
            "emphasis",
            e.name().to_string(),
        );
    }
    if let Some(v) = get("Hires upscale") {
        let scale: f64 = v.parse().map_err(|_| bad("Hires upscale", v))?;
        let steps: u32 = match get("Hires steps") {
            Some(s) => s.parse().map_err(|_| bad("Hires steps", s))?,
            None => 0,
        };
        let strength: f64 = match get("Denoising strength") {
            Some(s) => s.parse().map_err(|_| bad("Denoising strength", s))?,
            None => 0.7,
        };
        if let Some(u) = get("Hires upscaler").filter(|u| !u.starts_with("Latent")) {
            notes.push(format!(
                "the hires pass upscaled with `{u}`; mergesmith's hires fix upscales the latent"
            ));
        }
        used.extend([
            "Hires upscale",
            "Hires steps",
            "Denoising strength",
            "Hires upscaler",
        ]);
        let _ = writeln!(
            node,
            "      hires: {{ scale: {scale}, steps: {steps}, strength: {strength} }}"
        );
    }
    let model = get("Model").unwrap_or("model");
    let hash = get("Model hash");
    used.extend(["Model", "Model hash"]);
    let left: Vec<String> = p
        .pairs
        .iter()
        .filter(|(k, _)| !used.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Recreated from the generation parameters of {source} by mergesmith."
    );
    let _ = writeln!(out, "# Point the model paths at your files.");
    for n in &notes {
        let _ = writeln!(out, "# Note: {n}.");
    }
    if !left.is_empty() {
        let _ = writeln!(out, "# Not carried over: {}.", left.join("; "));
    }
    let _ = writeln!(out, "version: 1\nmodels:");
    let _ = write!(
        out,
        "  model: {{ path: {} }}",
        quote(&format!("{model}.safetensors"))
    );
    match hash {
        Some(h) => {
            let _ = writeln!(out, "  # A1111 model hash {h}");
        }
        None => out.push('\n'),
    }
    let mut seen = Vec::new();
    for t in tags.iter().filter(|t| t.kind == "lora" || t.kind == "lyco") {
        if seen.contains(&t.name) {
            continue;
        }
        seen.push(t.name.clone());
        let _ = writeln!(
            out,
            "  {}: {{ path: {} }}",
            quote(&t.name),
            quote(&format!("{}.safetensors", t.name))
        );
    }
    let _ = writeln!(out, "nodes:\n  image:\n    generate:\n      model: model");
    out.push_str(&node);
    let _ = writeln!(out, "    to: out");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A1111's layout, including quoted values and a multi-line prompt.
    #[test]
    fn parses_a1111_parameters() {
        let p = parse(
            "a cat,\nmasterpiece\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc, Model: \"my: model\", Lora hashes: \"x: 1, y: 2\"",
        );
        assert_eq!(p.prompt, "a cat,\nmasterpiece");
        assert_eq!(p.negative, "blurry");
        assert_eq!(p.pairs[1], ("Sampler".into(), "DPM++ 2M Karras".into()));
        assert_eq!(p.pairs[6], ("Model".into(), "my: model".into()));
        assert_eq!(p.pairs[7], ("Lora hashes".into(), "x: 1, y: 2".into()));
        // A last line that is not parameters belongs to the prompt.
        let p = parse("just a prompt\nsecond line");
        assert_eq!(p.prompt, "just a prompt\nsecond line");
        assert!(p.pairs.is_empty());
    }
}
