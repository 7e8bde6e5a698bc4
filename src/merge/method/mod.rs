//! Merge methods, one declaration each: the registry every surface reads.
//!
//! A method is a file in this directory holding one [`Method`]: its name, what it takes
//! (SuperMerger's fixed A/B/C, or a list of weights or deltas with or without a base), its
//! parameters (kind, range, default, whether per block) and its kernel. The recipe's
//! `merge: NAME` and `parameters:` fields, the CLI's `--mode NAME --param K=V`, the JSON
//! Schema, `path: NODE.PARAM` sweep axes, validation messages, per-tensor cache keys and
//! the README's table (`mergesmith methods --markdown`) all come from these declarations.
//! A new method is one file and one line in [`REGISTRY`].
//!
//! The SuperMerger modes declare themselves here too ([`supermerger`]); their kernels are the
//! element-wise and whole-tensor calcmodes of [`crate::merge::calc`], run by
//! [`crate::merge::engine`]. The list methods run on [`job`]'s streaming chunks.

pub mod dare;
pub mod dare_ties;
pub mod della;
pub mod della_linear;
pub mod geometric_median;
mod gta;
pub mod job;
pub mod linear;
pub mod model_stock;
pub mod slerp;
mod sparse;
pub mod supermerger;
pub mod task_arithmetic;
#[cfg(test)]
mod tests;
pub mod ties;

use std::collections::BTreeMap;

use crate::error::Result;
use crate::merge::{Mode, Ratio};
pub use job::{Job, Out};

/// Every method, in the order docs list them.
pub static REGISTRY: &[&Method] = &[
    &supermerger::WEIGHT_SUM,
    &supermerger::ADD_DIFFERENCE,
    &supermerger::TRIPLE_SUM,
    &supermerger::SUM_TWICE,
    &linear::METHOD,
    &slerp::METHOD,
    &task_arithmetic::METHOD,
    &ties::METHOD,
    &dare::METHOD,
    &dare_ties::METHOD,
    &della::METHOD,
    &della_linear::METHOD,
    &model_stock::METHOD,
    &geometric_median::METHOD,
];

/// A merge method as declared.
pub struct Method {
    /// Its name (`merge: NAME`).
    pub name: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// The formula, as the docs print it.
    pub formula: &'static str,
    /// Whose definition it follows, and where it differs from other peers.
    pub source: &'static str,
    /// What it takes.
    pub takes: Takes,
    /// Its parameters.
    pub params: &'static [Param],
    /// What computes it.
    pub engine: Engine,
    /// A check across parameters (beyond each one's range).
    pub check: Option<Check>,
}

/// What a method takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// SuperMerger's models `a`, `b` and (when the mode reads it) `c`.
    Fixed,
    /// A list of inputs (`inputs:`), each a full weight or a delta, with a base or not.
    List {
        /// Whether a `base:` is required.
        base: bool,
        /// What every input must be.
        term: Term,
        /// Fewest inputs.
        min: usize,
        /// Most inputs (`None`: any number).
        max: Option<usize>,
        /// Whether each input takes a `weight:` (scalar or per block).
        weighted: bool,
    },
}

/// What an input of a list method is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// A full model (`model:` or `node:`).
    Weight,
    /// A difference of two models (`delta: X`, minus `base` or `minus: Y`).
    Delta,
}

impl Term {
    /// How the docs name it.
    pub fn label(self) -> &'static str {
        match self {
            Term::Weight => "models",
            Term::Delta => "deltas",
        }
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Method({})", self.name)
    }
}

/// What computes a method.
pub enum Engine {
    /// SuperMerger's merge engine with this mode (and the node's calcmode).
    SuperMerger(Mode),
    /// A streamed kernel over the list of inputs.
    Streamed(&'static (dyn Kernel + Sync)),
}

/// A list method's computation: reads one tensor's inputs through the job (in chunks, as
/// many passes as it needs) and hands the merged values to `out` chunk by chunk.
pub trait Kernel {
    /// Merges one tensor.
    fn merge(&self, job: &Job, out: &Out) -> Result<()>;
}

/// One parameter of a method.
#[derive(Debug)]
pub struct Param {
    /// Its name (`parameters: {NAME: ...}`, `--param NAME=...`, `path: NODE.NAME`).
    pub name: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// Its kind, range and default.
    pub kind: ParamKind,
}

/// A parameter's kind.
#[derive(Debug, Clone, Copy)]
pub enum ParamKind {
    /// A real number in `min..=max` (`min` excluded when `open_min`), one value or (when
    /// `per_block`) one per block. No default: required.
    Number {
        /// Default value.
        default: Option<f64>,
        /// Smallest value.
        min: f64,
        /// Whether `min` itself is refused.
        open_min: bool,
        /// Largest value.
        max: f64,
        /// Whether a block vector is accepted.
        per_block: bool,
    },
    /// true / false.
    Flag {
        /// Default.
        default: bool,
    },
    /// One of some names.
    Choice {
        /// Default.
        default: &'static str,
        /// The names.
        options: &'static [&'static str],
    },
    /// A whole number in `min..=max`.
    Count {
        /// Default.
        default: u64,
        /// Smallest.
        min: u64,
        /// Largest.
        max: u64,
    },
    /// The seed of the method's random draws (only methods that draw declare one, so only
    /// their tensors' keys carry it).
    Seed,
}

impl Param {
    /// Default as the docs print it (`required` when none).
    pub fn default_text(&self) -> String {
        match self.kind {
            ParamKind::Number { default: None, .. } => "required".into(),
            ParamKind::Number {
                default: Some(d), ..
            } => fmt_num(d),
            ParamKind::Flag { default } => default.to_string(),
            ParamKind::Choice { default, .. } => default.to_string(),
            ParamKind::Count { default, .. } => default.to_string(),
            ParamKind::Seed => "0".into(),
        }
    }

    /// Range or options as the docs print them.
    pub fn range_text(&self) -> String {
        match self.kind {
            ParamKind::Number {
                min,
                open_min,
                max,
                per_block,
                ..
            } => format!(
                "{}{}, {}]{}",
                if open_min { "(" } else { "[" },
                fmt_num(min),
                fmt_num(max),
                if per_block { ", per block" } else { "" }
            ),
            ParamKind::Flag { .. } => "true/false".into(),
            ParamKind::Choice { options, .. } => options.join(" / "),
            ParamKind::Count { min, max, .. } => format!("{min}..{max}"),
            ParamKind::Seed => "0..2^64".into(),
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v == f64::INFINITY {
        "inf".into()
    } else if v == f64::NEG_INFINITY {
        "-inf".into()
    } else if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// A parameter's value as written (before per-block resolution).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A number or a block vector.
    Number(Ratio),
    /// A flag.
    Flag(bool),
    /// An option name.
    Text(String),
    /// A count or a seed.
    Count(u64),
}

/// A parameter value as written in a recipe or on the command line.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Written {
    /// true / false.
    Flag(bool),
    /// A number.
    Number(f64),
    /// A block vector.
    List(Vec<f64>),
    /// An option name, a preset, or comma-separated block values.
    Text(String),
}

/// A check across a method's parameters: what is wrong, if anything.
pub type Check = fn(&Params) -> std::result::Result<(), String>;

/// Every parameter of a method, validated and with defaults filled in.
pub type Params = BTreeMap<&'static str, Value>;

/// A parameter value resolved for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Resolved {
    /// A number.
    Number(f64),
    /// A flag.
    Flag(bool),
    /// An option name.
    Choice(&'static str),
    /// A count or seed.
    Count(u64),
}

/// The parameters one tensor sees (per-block values resolved for its block).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct KeyParams(pub BTreeMap<&'static str, Resolved>);

impl KeyParams {
    /// A number parameter (0 when missing: the declaration guarantees presence).
    pub fn num(&self, name: &str) -> f64 {
        match self.0.get(name) {
            Some(Resolved::Number(v)) => *v,
            Some(Resolved::Count(v)) => *v as f64,
            _ => 0.0,
        }
    }

    /// A flag.
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.0.get(name), Some(Resolved::Flag(true)))
    }

    /// An option.
    pub fn choice(&self, name: &str) -> &'static str {
        match self.0.get(name) {
            Some(Resolved::Choice(c)) => c,
            _ => "",
        }
    }

    /// A count or seed.
    pub fn count(&self, name: &str) -> u64 {
        match self.0.get(name) {
            Some(Resolved::Count(v)) => *v,
            _ => 0,
        }
    }
}

/// The method named `name`.
pub fn find(name: &str) -> Option<&'static Method> {
    let norm = name.replace('-', "_");
    REGISTRY
        .iter()
        .copied()
        .find(|m| m.name == norm)
        .or_else(|| {
            // SuperMerger labels and aliases (`Weight sum`, `add-difference`...).
            let mode =
                <Mode as crate::text::Named>::from_name(name).or_else(|| Mode::from_label(name))?;
            REGISTRY
                .iter()
                .copied()
                .find(|m| matches!(m.engine, Engine::SuperMerger(x) if x == mode))
        })
}

/// Every method name.
pub fn names() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|m| m.name)
}

/// "unknown method" with the closest name and the list.
pub fn unknown(name: &str) -> String {
    let near = crate::text::nearest(name, names());
    format!(
        "unknown merge method `{name}`{}; methods: {}",
        near.map(|n| format!(" (did you mean `{n}`?)"))
            .unwrap_or_default(),
        names().collect::<Vec<_>>().join(", ")
    )
}

impl Method {
    /// The parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&'static Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Whether it runs as a list method.
    pub fn is_list(&self) -> bool {
        matches!(self.takes, Takes::List { .. })
    }

    /// What it takes, as the docs print it.
    pub fn takes_text(&self) -> String {
        match self.takes {
            Takes::Fixed => match self.engine {
                Engine::SuperMerger(m) if m.uses_c() => "a, b, c".into(),
                _ => "a, b".into(),
            },
            Takes::List {
                base,
                term,
                min,
                max,
                weighted,
            } => {
                let count = match max {
                    Some(m) if m == min => format!("{min}"),
                    Some(m) => format!("{min}-{m}"),
                    None => format!("{min}+"),
                };
                format!(
                    "{}{count} {}{}",
                    if base { "base + " } else { "" },
                    term.label(),
                    if weighted { " (weighted)" } else { "" }
                )
            }
        }
    }

    /// Validates written parameters against the declaration and fills in defaults.
    /// Errors name the parameter and what it takes.
    pub fn params_of(
        &self,
        written: &BTreeMap<String, Written>,
        presets: &crate::merge::Presets,
    ) -> std::result::Result<Params, (Option<String>, String)> {
        for name in written.keys() {
            if self.param(name).is_none() {
                let near = crate::text::nearest(name, self.params.iter().map(|p| p.name));
                let known: Vec<&str> = self.params.iter().map(|p| p.name).collect();
                return Err((
                    Some(name.clone()),
                    format!(
                        "{} has no parameter `{name}`{}; it takes {}",
                        self.name,
                        near.map(|n| format!(" (did you mean `{n}`?)"))
                            .unwrap_or_default(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        let mut out = Params::new();
        for p in self.params {
            let value = self
                .value_of(p, written.get(p.name), presets)
                .map_err(|e| (Some(p.name.to_string()), e))?;
            out.insert(p.name, value);
        }
        if let Some(check) = self.check {
            check(&out).map_err(|e| (None, format!("{}: {e}", self.name)))?;
        }
        Ok(out)
    }

    /// Sets one parameter (a sweep cell's value), checked like [`Method::params_of`].
    pub fn set_param(
        &self,
        params: &mut Params,
        name: &str,
        written: &Written,
        presets: &crate::merge::Presets,
    ) -> std::result::Result<(), String> {
        let p = self.param(name).ok_or_else(|| {
            format!(
                "{} has no parameter `{name}`; it takes {}",
                self.name,
                self.params
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        params.insert(p.name, self.value_of(p, Some(written), presets)?);
        match self.check {
            Some(check) => check(params).map_err(|e| format!("{}: {e}", self.name)),
            None => Ok(()),
        }
    }

    /// One parameter's value: `w` checked against its declaration, or its default.
    fn value_of(
        &self,
        p: &Param,
        v: Option<&Written>,
        presets: &crate::merge::Presets,
    ) -> std::result::Result<Value, String> {
        let bad = |what: String| format!("{}.{}: {what}", self.name, p.name);
        Ok(match (p.kind, v) {
            (ParamKind::Number { default: None, .. }, None) => {
                return Err(bad(format!("required ({}): {}", p.range_text(), p.doc)))
            }
            (
                ParamKind::Number {
                    default: Some(d), ..
                },
                None,
            ) => Value::Number(Ratio::Scalar(d)),
            (
                ParamKind::Number {
                    min,
                    open_min,
                    max,
                    per_block,
                    ..
                },
                Some(w),
            ) => {
                let r = match w {
                    Written::Number(x) => Ratio::Scalar(*x),
                    Written::List(l) => Ratio::Blocks(l.clone()),
                    Written::Text(t) => Ratio::parse(t, presets).map_err(|e| bad(e.to_string()))?,
                    Written::Flag(_) => return Err(bad("takes a number".into())),
                };
                let values: Vec<f64> = match &r {
                    Ratio::Scalar(x) => vec![*x],
                    Ratio::Blocks(_) if !per_block => {
                        return Err(bad("takes one number, not a block vector".into()))
                    }
                    Ratio::Blocks(v) => v.clone(),
                };
                for x in values {
                    let low = if open_min { x <= min } else { x < min };
                    if !x.is_finite() || low || x > max {
                        return Err(bad(format!("{x} is outside {}", p.range_text())));
                    }
                }
                Value::Number(r)
            }
            (ParamKind::Flag { default }, None) => Value::Flag(default),
            (ParamKind::Flag { .. }, Some(Written::Flag(b))) => Value::Flag(*b),
            (ParamKind::Flag { .. }, Some(Written::Text(t))) => match t.trim() {
                "true" => Value::Flag(true),
                "false" => Value::Flag(false),
                _ => return Err(bad(format!("`{t}` is not true or false"))),
            },
            (ParamKind::Flag { .. }, Some(_)) => return Err(bad("takes true or false".into())),
            (ParamKind::Choice { default, .. }, None) => Value::Text(default.into()),
            (ParamKind::Choice { options, .. }, Some(Written::Text(t)))
                if options.contains(&t.trim()) =>
            {
                Value::Text(t.trim().to_string())
            }
            (ParamKind::Choice { options, .. }, Some(_)) => {
                return Err(bad(format!("takes one of {}", options.join(", "))))
            }
            (ParamKind::Count { default, .. }, None) => Value::Count(default),
            (ParamKind::Seed, None) => Value::Count(0),
            (ParamKind::Count { min, max, .. }, Some(w)) => {
                let n = whole(w).ok_or_else(|| bad("takes a whole number".into()))?;
                if n < min || n > max {
                    return Err(bad(format!("{n} is outside {min}..{max}")));
                }
                Value::Count(n)
            }
            (ParamKind::Seed, Some(w)) => {
                Value::Count(whole(w).ok_or_else(|| bad("a seed is a whole number".into()))?)
            }
        })
    }

    /// The parameters a tensor of `block` class sees: per-block numbers resolved by `value`
    /// (`None` when a vector leaves the tensor's block out: then it is not merged).
    pub fn resolve(
        &self,
        params: &Params,
        value: &dyn Fn(&str, &Ratio) -> Result<Option<f64>>,
    ) -> Result<Option<KeyParams>> {
        let mut out = KeyParams::default();
        for p in self.params {
            let Some(v) = params.get(p.name) else {
                continue;
            };
            let r = match (p.kind, v) {
                (_, Value::Number(r)) => match value(p.name, r)? {
                    Some(x) => Resolved::Number(x),
                    None => return Ok(None),
                },
                (_, Value::Flag(b)) => Resolved::Flag(*b),
                (ParamKind::Choice { options, .. }, Value::Text(t)) => {
                    Resolved::Choice(options.iter().copied().find(|o| o == t).unwrap_or_default())
                }
                (_, Value::Text(_)) => continue,
                (_, Value::Count(n)) => Resolved::Count(*n),
            };
            out.0.insert(p.name, r);
        }
        Ok(Some(out))
    }
}

fn whole(w: &Written) -> Option<u64> {
    match w {
        Written::Number(x) if *x >= 0.0 && x.fract() == 0.0 && *x < 1.8e19 => Some(*x as u64),
        Written::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

/// Parses `NAME=VALUE` as the command line writes a parameter.
pub fn parse_cli_param(text: &str) -> std::result::Result<(String, Written), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not NAME=VALUE"))?;
    let v = v.trim();
    let w = match v {
        "true" => Written::Flag(true),
        "false" => Written::Flag(false),
        _ => match v.parse::<f64>() {
            Ok(x) => Written::Number(x),
            Err(_) => Written::Text(v.to_string()),
        },
    };
    Ok((k.trim().to_string(), w))
}

/// The methods as a Markdown table (the README's, between its markers).
pub fn markdown() -> String {
    let mut s = String::from(
        "| method | takes | parameters (default; range) | formula | definition |\n|---|---|---|---|---|\n",
    );
    for m in REGISTRY {
        let params: Vec<String> = m
            .params
            .iter()
            .map(|p| format!("`{}` ({}; {})", p.name, p.default_text(), p.range_text()))
            .collect();
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.takes_text(),
            if params.is_empty() {
                "—".into()
            } else {
                params.join("<br>")
            },
            m.formula.replace('|', "\\|"),
            m.source.replace('|', "\\|")
        ));
    }
    s
}

/// The JSON Schema of `merge:`: every method's name.
pub struct MethodNames;

impl schemars::JsonSchema for MethodNames {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MethodName".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let one_of: Vec<serde_json::Value> = REGISTRY
            .iter()
            .map(|m| {
                serde_json::json!({
                    "const": m.name,
                    "description": format!("{} ({}): {}", m.summary, m.takes_text(), m.formula),
                })
            })
            .collect();
        schemars::json_schema!({ "type": "string", "oneOf": one_of })
    }
}

/// The JSON Schema of `parameters:`: every list method's parameters.
pub struct ParameterMap;

impl schemars::JsonSchema for ParameterMap {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MethodParameters".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut props = serde_json::Map::new();
        for m in REGISTRY.iter().filter(|m| m.is_list()) {
            for p in m.params {
                let entry = props.entry(p.name.to_string()).or_insert_with(|| {
                    let ty = match p.kind {
                        ParamKind::Number {
                            per_block: true, ..
                        } => {
                            serde_json::json!(["number", "array", "string"])
                        }
                        ParamKind::Number { .. } => serde_json::json!("number"),
                        ParamKind::Flag { .. } => serde_json::json!("boolean"),
                        ParamKind::Choice { .. } => serde_json::json!("string"),
                        ParamKind::Count { .. } | ParamKind::Seed => serde_json::json!("integer"),
                    };
                    serde_json::json!({ "type": ty, "description": "" })
                });
                let line = format!(
                    "{}: {} (default {}; {})",
                    m.name,
                    p.doc,
                    p.default_text(),
                    p.range_text()
                );
                if let Some(serde_json::Value::String(d)) = entry.get_mut("description") {
                    if !d.is_empty() {
                        d.push('\n');
                    }
                    d.push_str(&line);
                }
            }
        }
        schemars::json_schema!({
            "type": "object",
            "properties": props,
            "additionalProperties": false,
        })
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let mut seen = std::collections::BTreeSet::new();
        for m in REGISTRY {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert_eq!(find(m.name).map(|f| f.name), Some(m.name));
            let mut ps = std::collections::BTreeSet::new();
            for p in m.params {
                assert!(ps.insert(p.name), "{}.{} twice", m.name, p.name);
            }
        }
        assert_eq!(
            find("Add difference").map(|m| m.name),
            Some("add_difference")
        );
        assert_eq!(find("dare-ties").map(|m| m.name), Some("dare_ties"));
        assert!(unknown("tie").contains("did you mean `ties`"));
    }

    #[test]
    fn parameters_are_checked() {
        let presets = crate::merge::Presets::default();
        let m = find("ties").unwrap();
        let w = |pairs: &[(&str, Written)]| -> BTreeMap<String, Written> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let p = m.params_of(&w(&[]), &presets).unwrap();
        assert_eq!(p["density"], Value::Number(Ratio::Scalar(1.0)));
        assert_eq!(p["normalize"], Value::Flag(true));
        let e = m
            .params_of(&w(&[("densty", Written::Number(0.5))]), &presets)
            .unwrap_err();
        assert!(e.1.contains("did you mean `density`"), "{}", e.1);
        let e = m
            .params_of(&w(&[("density", Written::Number(1.5))]), &presets)
            .unwrap_err();
        assert!(e.1.contains("outside (0, 1]"), "{}", e.1);
        let e = m
            .params_of(&w(&[("density", Written::Number(0.0))]), &presets)
            .unwrap_err();
        assert!(e.1.contains("outside"), "{}", e.1);
        let dare = find("dare").unwrap();
        let e = dare.params_of(&w(&[]), &presets).unwrap_err();
        assert!(e.1.contains("dare.density: required"), "{}", e.1);
        let e = find("geometric_median")
            .unwrap()
            .params_of(&w(&[("iterations", Written::Number(2.5))]), &presets)
            .unwrap_err();
        assert!(e.1.contains("whole number"), "{}", e.1);
    }
}
