//! `merge: METHOD` with `inputs:`: a list method (linear, slerp, task_arithmetic, ties,
//! dare, dare_ties, della, della_linear, model_stock, geometric_median) over N models or
//! deltas, with a base where the method takes one. Fields and parameters come from the
//! method's declaration ([`crate::merge::method`]).

use std::collections::BTreeMap;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::{Keep, NodeDecl, RatioDecl};
use super::run::Opened;
use super::{preimage_value, tensors, InputKey, ALGORITHM_VERSION};
use super::{
    CheckCx, Header, Input, KeyCx, Kind, Makes, Node, NodeKind, Outcome, ParseCx, RunCx, Want,
};
use crate::error::Result;
use crate::merge::method::{self, Method, ParamKind, Takes, Term, Written};
use crate::merge::multi::{self, ListInputs, ListSpec, TermCk};
use crate::merge::Ratio;

/// The list-merge kind.
pub static KIND: Kind = Kind {
    name: "merge",
    usage: "`merge: METHOD` with `inputs:`",
    fields: &[
        "base",
        "inputs",
        "parameters",
        "dtype",
        "block_list",
        "cache",
    ],
    hint: Some("list methods take `base`, `inputs` and `parameters`; `mergesmith methods` lists each method's"),
    makes: Makes::Checkpoint,
    declared: |d| {
        d.merge
            .as_ref()
            .is_some_and(|m| method::find(&m.value).is_some_and(Method::is_list))
    },
    parse,
};

/// One input: a model, or a model minus another (a delta).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TermInput {
    /// The model.
    pub x: Input,
    /// What is subtracted (a delta).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minus: Option<Input>,
}

/// A list merge.
#[derive(Debug, Clone)]
pub struct ListNode {
    /// The base.
    pub base: Option<Input>,
    /// The inputs.
    pub terms: Vec<TermInput>,
    /// Method, parameters, weights, dtype.
    pub spec: Box<ListSpec>,
    /// Every checkpoint it reads, in order (for the graph and reports).
    pub read: Vec<Input>,
    /// Keep the result in memory only.
    pub memory: bool,
}

fn parse(_name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let d = &decl.value;
    let at = d.merge.as_ref()?;
    let m = method::find(&at.value)?;
    let Takes::List {
        term: want_term,
        weighted,
        ..
    } = m.takes
    else {
        return None;
    };
    let mut ok = true;
    let base = match &d.base {
        Some(b) => {
            let r = cx.resolve(b, Want::Checkpoint);
            ok &= r.is_some();
            r
        }
        None => None,
    };
    let mut terms = Vec::new();
    let mut kinds = Vec::new();
    let mut weights = Vec::new();
    for (index, i) in d.inputs.iter().enumerate() {
        let v = &i.value;
        let (x, term) = match (&v.model, &v.delta) {
            (Some(x), None) => (x, Term::Weight),
            (None, Some(x)) => (x, Term::Delta),
            _ => {
                cx.error(
                    &i.referenced,
                    "an input is `model: NAME` (a full model) or `delta: NAME` (NAME - base)"
                        .into(),
                    None,
                );
                ok = false;
                continue;
            }
        };
        if term != want_term {
            cx.error(&x.referenced, multi::term_error(m, index), None);
            ok = false;
            continue;
        }
        let xi = cx.resolve(x, Want::Checkpoint);
        let minus = match (&v.minus, term) {
            (Some(mi), Term::Delta) => cx.resolve(mi, Want::Checkpoint),
            (Some(mi), Term::Weight) => {
                cx.error(&mi.referenced, "`minus` goes with `delta`".into(), None);
                ok = false;
                None
            }
            (None, Term::Delta) => match &base {
                Some(b) => Some(b.clone()),
                None => {
                    if d.base.is_none() {
                        cx.error(
                            &x.referenced,
                            "a delta without `minus` is taken from the base; this node has no `base`".into(),
                            None,
                        );
                    }
                    ok = false;
                    None
                }
            },
            (None, Term::Weight) => None,
        };
        let weight = match (&v.weight, weighted) {
            (Some(w), true) => cx.ratio(w),
            (Some(w), false) => {
                cx.error(
                    &w.referenced,
                    format!(
                        "{} takes no per-input weight; its parameters are {}",
                        m.name,
                        m.params
                            .iter()
                            .map(|p| p.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None,
                );
                None
            }
            (None, _) => Some(Ratio::Scalar(1.0)),
        };
        match (xi, weight) {
            (Some(x), Some(w)) if term == Term::Weight || minus.is_some() => {
                terms.push(TermInput { x, minus });
                kinds.push(term);
                weights.push(w);
            }
            _ => ok = false,
        }
    }
    if ok {
        if let Err(e) = multi::check_inputs(m, base.is_some(), &kinds) {
            cx.error(&at.referenced, e, None);
            ok = false;
        }
    }
    // Parameters: numbers go through the recipe's vars and presets like any ratio.
    let mut params: BTreeMap<String, Written> = BTreeMap::new();
    for (k, v) in &d.parameters {
        let number = matches!(m.param(k).map(|p| p.kind), Some(ParamKind::Number { .. }));
        let w = match (&v.value, number) {
            (Written::Flag(_), _) | (_, false) => Some(v.value.clone()),
            (w, true) => {
                let decl = match w {
                    Written::Number(x) => RatioDecl::Number(*x),
                    Written::List(l) => RatioDecl::List(l.clone()),
                    Written::Text(t) => RatioDecl::Text(t.clone()),
                    Written::Flag(_) => unreachable!("matched above"),
                };
                cx.ratio(&Spanned {
                    value: decl,
                    referenced: v.referenced,
                    defined: v.defined,
                })
                .map(|r| match r {
                    Ratio::Scalar(x) => Written::Number(x),
                    Ratio::Blocks(b) => Written::List(b),
                })
            }
        };
        match w {
            Some(w) => {
                params.insert(k.clone(), w);
            }
            None => ok = false,
        }
    }
    let params = match m.params_of(&params, &crate::merge::Presets::default()) {
        Ok(p) => Some(p),
        Err((param, msg)) => {
            let loc = param
                .and_then(|p| d.parameters.get(&p))
                .map(|s| &s.referenced)
                .unwrap_or(&at.referenced);
            cx.error(loc, msg, None);
            None
        }
    };
    if !ok {
        return None;
    }
    let mut read: Vec<Input> = base.iter().cloned().collect();
    for t in &terms {
        read.push(t.x.clone());
        if let Some(mi) = &t.minus {
            if !read.contains(mi) {
                read.push(mi.clone());
            }
        }
    }
    let spec = ListSpec {
        method: m,
        params: params?,
        weights,
        dtype: d.dtype,
        block_list: d.block_list.clone(),
    };
    Some(Node::MergeList(ListNode {
        base,
        terms,
        spec: Box::new(spec),
        read,
        memory: d.cache == Some(Keep::Memory),
    }))
}

/// The base, and each input with its minus, opened.
type Opened3<T> = (Option<T>, Vec<(T, Option<T>)>);

/// What a list merge's key is computed from.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    algorithm: u32,
    merge: &'a ListSpec,
    base: Option<InputKey<'a>>,
    inputs: Vec<TermKey<'a>>,
}

#[derive(serde::Serialize)]
struct TermKey<'a> {
    x: InputKey<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    minus: Option<InputKey<'a>>,
}

impl ListNode {
    /// Opens every model in [`ListInputs::all`] order: base, then each input and its minus.
    fn open_all<T>(&self, open: &mut dyn FnMut(&Input) -> Result<T>) -> Result<Opened3<T>> {
        let base = self.base.as_ref().map(&mut *open).transpose()?;
        let terms = self
            .terms
            .iter()
            .map(|t| Ok((open(&t.x)?, t.minus.as_ref().map(&mut *open).transpose()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((base, terms))
    }
}

impl NodeKind for ListNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        self.read.iter().filter_map(Input::node).collect()
    }

    fn reads(&self) -> Vec<&str> {
        self.read.iter().map(Input::name).collect()
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.base.iter_mut().for_each(|i| i.rename(f));
        for t in &mut self.terms {
            t.x.rename(f);
            t.minus.iter_mut().for_each(|i| i.rename(f));
        }
        self.read.iter_mut().for_each(|i| i.rename(f));
    }

    fn in_memory(&self) -> bool {
        self.memory
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        preimage_value(Preimage {
            op: "merge_list",
            algorithm: ALGORITHM_VERSION,
            merge: &self.spec,
            base: self.base.as_ref().map(|b| cx.input(b)),
            inputs: self
                .terms
                .iter()
                .map(|t| TermKey {
                    x: cx.input(&t.x),
                    minus: t.minus.as_ref().map(|m| cx.input(m)),
                })
                .collect(),
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let (base, terms) = self.open_all(&mut |i| (cx.open)(i))?;
        let inputs = ListInputs {
            base: base.as_ref(),
            terms: terms
                .iter()
                .map(|(x, m)| TermCk {
                    x,
                    minus: m.as_ref(),
                })
                .collect(),
        };
        let plan = multi::plan(&inputs, &self.spec)?;
        Ok(Some(
            plan.keys
                .iter()
                .map(|k| (k.name.clone(), k.dtype, k.shape.clone()))
                .collect(),
        ))
    }

    fn run(&self, _name: &str, key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.result(key, self.memory, |place| {
            let (base, terms) = self.open_all(&mut |i| cx.open(i, true))?;
            // A delta taken from the base reads the base's tensors (decoded once per chunk).
            let inputs = ListInputs {
                base: base.as_ref().map(|o| &o.ck),
                terms: terms
                    .iter()
                    .zip(&self.terms)
                    .map(|((x, m), t)| TermCk {
                        x: &x.ck,
                        minus: match (&base, &t.minus) {
                            (Some(b), Some(mi)) if Some(mi) == self.base.as_ref() => Some(&b.ck),
                            _ => m.as_ref().map(|o| &o.ck),
                        },
                    })
                    .collect(),
            };
            let plan = multi::plan(&inputs, &self.spec)?;
            let mut opened: Vec<&Opened> = base.iter().collect();
            for (x, m) in &terms {
                opened.push(x);
                opened.extend(m.iter());
            }
            let key_maps: Vec<&tensors::KeyMap> = opened.iter().map(|o| &o.keys).collect();
            let out_keys = tensors::list_keys(&plan, &self.spec, &key_maps);
            let records: Vec<(String, String, String)> = inputs
                .all()
                .into_iter()
                .zip(&opened)
                .map(|((role, _), o)| {
                    let file = o
                        .label
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let sha = o
                        .hashes
                        .as_ref()
                        .map(|h| h.sha256.clone())
                        .unwrap_or_default();
                    (role, file, sha)
                })
                .collect();
            let md = multi::metadata(&self.spec, &records);
            let tensors = plan
                .keys
                .iter()
                .zip(out_keys)
                .map(|(k, tk)| (k.name.clone(), k.dtype, k.shape.clone(), tk))
                .collect();
            cx.put(key, place, tensors, md, |w| {
                multi::write(&plan, &inputs, &self.spec, w, cx.run)
            })
        })
    }

    fn summary(&self) -> String {
        format!("{} ×{}", self.spec.method.name, self.terms.len())
    }

    fn cost(&self) -> f64 {
        (self.read.len() as f64 / 2.0).max(1.0)
    }

    fn blends(&self) -> Option<&[Input]> {
        Some(&self.read)
    }
}
