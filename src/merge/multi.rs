//! List merges: the methods of [`crate::merge::method`] that take a list of models or deltas
//! (with a base or not), planned key by key and streamed chunk by chunk into the output.
//!
//! Planning checks the family and the shapes of every input and decides, for every tensor of
//! the reference model (the base, else the first input), whether it is merged (with its
//! weights and parameters resolved for its block) or copied, and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::arch::{self, Arch};
use crate::checkpoint::quant::Quant;
use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use crate::checkpoint::Checkpoint;
use crate::convert;
use crate::dtype::{DType, FloatType};
use crate::error::{Error, Result};
use crate::merge::engine::{Operand, CHUNK};
use crate::merge::method::job::{Minus, TermOps};
use crate::merge::method::{Engine, Job, KeyParams, Method, Params, Takes, Term};
use crate::merge::{BlockRatio, Ratio, RunOptions};

/// A list merge besides its input files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListSpec {
    /// The method.
    #[serde(serialize_with = "method_name")]
    pub method: &'static Method,
    /// Its parameters, validated, defaults filled in.
    pub params: Params,
    /// Each input's weight (1 for unweighted methods).
    pub weights: Vec<Ratio>,
    /// Output type of float tensors (default: the reference model's).
    pub dtype: Option<FloatType>,
    /// The block list vectors name (default: told by their length).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_list: Option<String>,
}

fn method_name<S: serde::Serializer>(
    m: &&'static Method,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(m.name)
}

/// One input of a list merge, opened.
pub struct TermCk<'a> {
    /// The model.
    pub x: &'a Checkpoint,
    /// What is subtracted (a delta), if anything.
    pub minus: Option<&'a Checkpoint>,
}

/// The opened models of a list merge.
pub struct ListInputs<'a> {
    /// The base, when the method has one.
    pub base: Option<&'a Checkpoint>,
    /// The inputs.
    pub terms: Vec<TermCk<'a>>,
}

impl<'a> ListInputs<'a> {
    /// The model whose tensors, names and types the output follows: the base, else the
    /// first input.
    pub fn reference(&self) -> &'a Checkpoint {
        self.base.unwrap_or(self.terms[0].x)
    }

    /// Every model read, with how reports name it (`base`, `inputs[0]`, `inputs[0].minus`).
    pub fn all(&self) -> Vec<(String, &'a Checkpoint)> {
        let mut v: Vec<(String, &Checkpoint)> =
            self.base.map(|b| ("base".into(), b)).into_iter().collect();
        for (i, t) in self.terms.iter().enumerate() {
            v.push((format!("inputs[{i}]"), t.x));
            if let Some(m) = t.minus {
                v.push((format!("inputs[{i}].minus"), m));
            }
        }
        v
    }
}

/// What produces one output tensor of a list merge.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListOp {
    /// The reference model's tensor (converted to the output type when asked).
    Copy,
    /// The method, with this tensor's weights and parameters.
    Merge {
        /// Each input's weight.
        weights: Vec<f64>,
        /// The parameters it sees.
        params: KeyParams,
    },
}

/// One output tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListKey {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Output type.
    pub dtype: DType,
    /// How it is made.
    pub op: ListOp,
}

/// A planned list merge.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListPlan {
    /// The reference model's architecture.
    pub arch: Arch,
    /// Output tensors, in the reference model's order.
    pub keys: Vec<ListKey>,
    /// Tensors copied from the reference model instead of merged, by reason.
    pub kept: BTreeMap<String, Vec<String>>,
    /// Tensors of other inputs that the reference model lacks (not in the output), by input.
    pub left_out: BTreeMap<String, Vec<String>>,
    /// Scaled-fp8 facts of each model of [`ListInputs::all`].
    #[serde(skip)]
    pub quant: Vec<Quant>,
}

impl ListPlan {
    /// Tensors merged.
    pub fn merged(&self) -> usize {
        self.keys.iter().filter(|k| k.op != ListOp::Copy).count()
    }

    /// What a user should hear: tensors copied instead of merged, by reason.
    pub fn notes(&self) -> Vec<String> {
        let kept = self.kept.iter().map(|(why, keys)| {
            format!(
                "{} tensor(s) copied unmerged from the reference model (the base, else the first input): {why} (e.g. `{}`)",
                keys.len(),
                keys[0]
            )
        });
        let left = self.left_out.iter().map(|(input, keys)| {
            format!(
                "{} tensor(s) only {input} has are not in the output: the reference model lacks them (e.g. `{}`)",
                keys.len(),
                keys[0]
            )
        });
        kept.chain(left).collect()
    }
}

/// Why input `i` of a list method is the wrong kind (a model where a delta is expected, or the
/// reverse).
pub fn term_error(method: &Method, i: usize) -> String {
    match method.takes {
        Takes::List {
            term: Term::Delta, ..
        } => format!(
            "{} takes deltas: input {i} is a full model; write `delta: NAME` (NAME - base, or NAME - `minus: OTHER`)",
            method.name
        ),
        _ => format!(
            "{} takes full models: input {i} is a delta; write `model: NAME`",
            method.name
        ),
    }
}

/// Checks the inputs against the method's declaration (counts, base, terms).
pub fn check_inputs(
    method: &Method,
    has_base: bool,
    terms: &[Term],
) -> std::result::Result<(), String> {
    let Takes::List {
        base,
        term,
        min,
        max,
        ..
    } = method.takes
    else {
        return Err(format!(
            "{} takes `a`, `b` (and `c`), not a list",
            method.name
        ));
    };
    if base && !has_base {
        return Err(format!("{} needs a `base`", method.name));
    }
    if !base && has_base {
        return Err(format!("{} takes no `base`", method.name));
    }
    if let Some(i) = terms.iter().position(|t| *t != term) {
        return Err(term_error(method, i));
    }
    if terms.len() < min || max.is_some_and(|m| terms.len() > m) {
        return Err(format!(
            "{} takes {} input(s), got {}",
            method.name,
            match max {
                Some(m) if m == min => format!("{min}"),
                Some(m) => format!("{min} to {m}"),
                None => format!("at least {min}"),
            },
            terms.len()
        ));
    }
    Ok(())
}

/// Plans a list merge; every check happens here, before any tensor is read.
pub fn plan(inputs: &ListInputs, spec: &ListSpec) -> Result<ListPlan> {
    let terms: Vec<Term> = inputs
        .terms
        .iter()
        .map(|t| {
            if t.minus.is_some() {
                Term::Delta
            } else {
                Term::Weight
            }
        })
        .collect();
    check_inputs(spec.method, inputs.base.is_some(), &terms).map_err(Error::Invalid)?;
    if spec.weights.len() != inputs.terms.len() {
        return Err(Error::Invalid(format!(
            "{} weights for {} inputs",
            spec.weights.len(),
            inputs.terms.len()
        )));
    }
    let reference = inputs.reference();
    let arch = arch::detect(reference.tensors());
    let family = arch.family;
    let all = inputs.all();
    for (label, ck) in &all {
        let o = arch::detect(ck.tensors());
        if o.family != family && !family.is_generic() && !o.family.is_generic() {
            return Err(Error::Invalid(format!(
                "cannot merge {} ({}) with {} ({label}: {})",
                family.label(),
                reference.path().display(),
                o.family.label(),
                ck.path().display()
            )));
        }
        if o.family == family && o.layout != arch.layout {
            return Err(Error::Invalid(format!(
                "{label} ({}) uses the {} layout and {} the {} layout; list methods need one layout: convert one of them",
                ck.path().display(),
                o.layout,
                reference.path().display(),
                arch.layout
            )));
        }
    }
    let quant = all
        .iter()
        .map(|(_, ck)| Quant::of(ck))
        .collect::<Result<Vec<_>>>()?;
    if spec.dtype.is_none() && quant.iter().any(Quant::is_scaled) {
        return Err(Error::Invalid(
            "scaled-fp8 inputs: set `dtype` (bf16, fp16, fp32...) for the merged model; list methods do not write scaled fp8".into(),
        ));
    }
    let list = spec.block_list.as_deref();
    let weights = spec
        .weights
        .iter()
        .enumerate()
        .map(|(i, w)| BlockRatio::resolve_in(w, family, &format!("inputs[{i}].weight"), list))
        .collect::<Result<Vec<_>>>()?;
    let mut resolved: BTreeMap<&str, BlockRatio> = BTreeMap::new();
    for (name, v) in &spec.params {
        if let crate::merge::method::Value::Number(r) = v {
            resolved.insert(
                name,
                BlockRatio::resolve_in(r, family, &format!("{}.{name}", spec.method.name), list)?,
            );
        }
    }
    let mut keys = Vec::new();
    let mut kept: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in reference.tensors() {
        if Quant::is_bookkeeping(&t.name) {
            continue;
        }
        let class = arch::classify(family, &t.name);
        let dtype = match spec.dtype {
            Some(f) if t.dtype.is_float() => f.dtype(),
            _ => t.dtype,
        };
        let mut why: Option<String> = None;
        if !t.dtype.is_float() {
            why = Some("not a floating-point tensor".into());
        } else if !class.mergeable {
            why = Some("never blended by the family's merge rule".into());
        }
        for (label, ck) in &all {
            if why.is_some() {
                break;
            }
            match ck.get(&t.name) {
                None => why = Some(format!("missing from {label}")),
                Some(o) if o.shape != t.shape => {
                    return Err(Error::Invalid(format!(
                        "shape mismatch for `{}`: {} has {:?}, {label} ({}) has {:?}",
                        t.name,
                        reference.path().display(),
                        t.shape,
                        ck.path().display(),
                        o.shape
                    )))
                }
                Some(o) if !o.dtype.is_float() => {
                    why = Some(format!("not a floating-point tensor in {label}"))
                }
                Some(_) => {}
            }
        }
        let op = match why {
            Some(w) => {
                kept.entry(w).or_default().push(t.name.clone());
                ListOp::Copy
            }
            None => {
                let w: Option<Vec<f64>> = weights.iter().map(|w| w.value(family, &class)).collect();
                let value = |name: &str, _: &Ratio| -> Result<Option<f64>> {
                    Ok(resolved.get(name).and_then(|r| r.value(family, &class)))
                };
                match (w, spec.method.resolve(&spec.params, &value)?) {
                    (Some(weights), Some(params)) => ListOp::Merge { weights, params },
                    _ => {
                        kept.entry("outside the block vector's list".into())
                            .or_default()
                            .push(t.name.clone());
                        ListOp::Copy
                    }
                }
            }
        };
        keys.push(ListKey {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype,
            op,
        });
    }
    // Tensors the reference model lacks are not in the output: said, not dropped silently.
    let mut left_out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (label, ck) in all.iter().skip(1) {
        for t in ck.tensors() {
            if reference.get(&t.name).is_none() && !Quant::is_bookkeeping(&t.name) {
                left_out
                    .entry(label.clone())
                    .or_default()
                    .push(t.name.clone());
            }
        }
    }
    Ok(ListPlan {
        arch,
        keys,
        kept,
        left_out,
        quant,
    })
}

/// The writer specs of a list plan.
pub fn specs(plan: &ListPlan) -> Vec<TensorSpec> {
    plan.keys
        .iter()
        .map(|k| TensorSpec {
            name: k.name.clone(),
            dtype: k.dtype,
            shape: k.shape.clone(),
        })
        .collect()
}

fn operand<'a>(
    plan: &ListPlan,
    all: &[(String, &'a Checkpoint)],
    i: usize,
    name: &str,
) -> Result<Operand<'a>> {
    let ck = all[i].1;
    let t = ck.get(name).ok_or_else(|| Error::MissingTensor {
        path: ck.path().to_path_buf(),
        name: name.to_string(),
    })?;
    Ok(Operand {
        data: ck.data(t),
        dtype: t.dtype,
        shape: &t.shape,
        scale: plan.quant[i].scale(name),
    })
}

/// Computes every tensor of `plan` that `writer` expects and writes it; the caller finishes
/// the writer.
pub fn write(
    plan: &ListPlan,
    inputs: &ListInputs,
    spec: &ListSpec,
    writer: &SafetensorsWriter,
    run: &RunOptions,
) -> Result<()> {
    let Engine::Streamed(kernel) = spec.method.engine else {
        return Err(Error::Invalid(format!(
            "{} is not a list method",
            spec.method.name
        )));
    };
    let all = inputs.all();
    let mut order: Vec<&ListKey> = plan
        .keys
        .iter()
        .filter(|k| writer.expects(&k.name))
        .collect();
    order.sort_by_key(|k| std::cmp::Reverse(k.shape.iter().product::<usize>()));
    let total: u64 = order
        .iter()
        .map(|k| k.dtype.byte_len(k.shape.iter().product()).unwrap_or(0) as u64)
        .sum();
    let bar = crate::progress::tensors(total, order.len() as u64, spec.method.name, run.progress);
    for (_, ck) in &all {
        ck.advise_sequential();
    }
    let base_at = usize::from(inputs.base.is_some());
    order.par_iter().try_for_each(|k| {
        let n: usize = k.shape.iter().product();
        let es = k.dtype.bits() / 8;
        let emit = |lo: usize, vals: &[f32]| -> Result<()> {
            let mut bytes = writer.part_buffer(vals.len() * es);
            convert::encode_into(vals, k.dtype, &mut bytes)?;
            writer.write_part_owned(&k.name, lo * es, bytes)
        };
        match &k.op {
            ListOp::Copy => {
                let o = operand(plan, &all, 0, &k.name)?;
                if o.dtype == k.dtype && o.scale.is_none() {
                    writer.write(&k.name, &o.data)?;
                } else {
                    (0..n.div_ceil(CHUNK)).into_par_iter().try_for_each(|i| {
                        let (lo, hi) = (i * CHUNK, ((i + 1) * CHUNK).min(n));
                        let mut v = Vec::new();
                        o.decode(lo, hi, &mut v)?;
                        emit(lo, &v)
                    })?;
                }
            }
            ListOp::Merge { weights, params } => {
                // Indices into `all`: base first, then each input and its minus.
                let mut at = base_at;
                let mut terms = Vec::new();
                for t in &inputs.terms {
                    let x = operand(plan, &all, at, &k.name)?;
                    at += 1;
                    let minus = match t.minus {
                        Some(m) => {
                            at += 1;
                            Some(match inputs.base {
                                Some(b) if std::ptr::eq(m, b) => Minus::Base,
                                _ => Minus::Other(operand(plan, &all, at - 1, &k.name)?),
                            })
                        }
                        None => None,
                    };
                    terms.push(TermOps { x, minus });
                }
                let job = Job {
                    name: &k.name,
                    shape: &k.shape,
                    base: inputs
                        .base
                        .map(|_| operand(plan, &all, 0, &k.name))
                        .transpose()?,
                    terms,
                    weights: weights.clone(),
                    params,
                };
                kernel.merge(&job, &emit)?;
            }
        }
        for (_, ck) in &all {
            if let Some(t) = ck.get(&k.name) {
                ck.release(t);
            }
        }
        bar.tensor_done(k.dtype.byte_len(n).unwrap_or(0) as u64);
        Ok::<_, Error>(())
    })?;
    bar.finish_and_clear();
    Ok(())
}

/// The input files of a one-shot list merge.
pub struct ListFiles {
    /// The base.
    pub base: Option<PathBuf>,
    /// Each input: the model and what is subtracted from it.
    pub terms: Vec<(PathBuf, Option<PathBuf>)>,
}

/// What a one-shot list merge wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListReport {
    /// Output file.
    pub path: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors merged.
    pub merged: usize,
    /// File size.
    pub bytes: u64,
}

/// The metadata of a list merge's output: the method, its parameters and weights, and each
/// input by file name and sha256 (never a path).
pub fn metadata(spec: &ListSpec, inputs: &[(String, String, String)]) -> BTreeMap<String, String> {
    let record = serde_json::json!({
        "method": spec.method.name,
        "parameters": spec.params,
        "weights": spec.weights,
        "dtype": spec.dtype,
        "inputs": inputs.iter().map(|(role, name, sha)| serde_json::json!({ "role": role, "file": name, "sha256": sha })).collect::<Vec<_>>(),
    });
    [
        ("format".to_string(), "pt".to_string()),
        ("mergesmith_merge".to_string(), record.to_string()),
    ]
    .into()
}

/// Opens, plans and writes a list merge to `out` (nothing is written when planning fails).
pub fn merge_files(
    files: &ListFiles,
    spec: &ListSpec,
    out: &Path,
    memo: &crate::hashing::HashMemo,
    run: &RunOptions,
) -> Result<(ListPlan, ListReport)> {
    let base = files.base.as_deref().map(Checkpoint::open).transpose()?;
    let opened = files
        .terms
        .iter()
        .map(|(x, m)| {
            Ok((
                Checkpoint::open(x)?,
                m.as_deref().map(Checkpoint::open).transpose()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // A delta taken from the base reads the base's tensors (decoded once per chunk).
    let inputs = ListInputs {
        base: base.as_ref(),
        terms: opened
            .iter()
            .zip(&files.terms)
            .map(|((x, m), (_, mp))| TermCk {
                x,
                minus: match (&base, mp) {
                    (Some(b), Some(mp)) if Some(mp) == files.base.as_ref() => Some(b),
                    _ => m.as_ref(),
                },
            })
            .collect(),
    };
    let plan = plan(&inputs, spec)?;
    let mut records = Vec::new();
    for (role, ck) in inputs.all() {
        let (h, _) = memo.hashes(ck.path())?;
        let name = ck
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        records.push((role, name, h.sha256.clone()));
    }
    let md = metadata(spec, &records);
    let writer = SafetensorsWriter::create(out, specs(&plan), &md, run.overwrite)?;
    write(&plan, &inputs, spec, &writer, run)?;
    let (path, bytes) = writer.finish()?;
    let report = ListReport {
        path,
        tensors: plan.keys.len(),
        merged: plan.merged(),
        bytes,
    };
    Ok((plan, report))
}
