//! `merge: MODE`: a merge of two or three checkpoints (every SuperMerger mode and calcmode,
//! block weights, elemental, Include/Exclude, Adjust, a baked VAE).

use std::path::PathBuf;

use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::{Keep, NodeDecl, RatioDecl};
use super::run::Opened;
use super::{preimage_value, tensors, InputKey, ALGORITHM_VERSION};
use super::{
    CheckCx, Header, Input, KeyCx, Kind, Makes, Node, NodeKind, Outcome, ParseCx, RunCx, Want,
};
use crate::error::{Error, Result};
use crate::hashing::FileHashes;
use crate::merge::dice;
use crate::merge::metadata::{self, InputRecord};
use crate::merge::method::supermerger::GAMMA_DEFAULT;
use crate::merge::method::Engine;
use crate::merge::select::FilterMode;
use crate::merge::{engine, FilterSpec, MergeSpec, Prepared, Ratio};

/// The `merge` kind.
pub static KIND: Kind = Kind {
    name: "merge",
    usage: "`merge: METHOD`",
    fields: &[
        "a",
        "b",
        "c",
        "alpha",
        "beta",
        "calcmode",
        "gamma",
        "seed",
        "elemental",
        "xl_elemental_shift",
        "numerics",
        "dice",
        "block_list",
        "include",
        "exclude",
        "adjust",
        "dtype",
        "rounding",
        "scaled",
        "prune",
        "reset_position_ids",
        "bake_vae",
        "cache",
    ],
    hint: Some("saving takes its own node: `save: NODE`, `to: PATH`"),
    makes: Makes::Checkpoint,
    // Every `merge:` that is not a list method (unknown names are reported here).
    declared: |d| {
        d.merge
            .as_ref()
            .is_some_and(|m| !crate::merge::method::find(&m.value).is_some_and(|m| m.is_list()))
    },
    parse,
};

/// A merge.
#[derive(Debug, Clone)]
pub struct MergeNode {
    /// Inputs A, B and optionally C.
    pub inputs: Vec<Input>,
    /// The merge, ready for the engine (`bake_vae` unset: see `vae`).
    pub spec: Box<MergeSpec>,
    /// VAE model to bake in.
    pub vae: Option<String>,
    /// Keep the result in memory only (`cache: memory`).
    pub memory: bool,
}

fn parse(name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let d = &decl.value;
    let mode = d.merge.as_ref()?;
    let mode_v = match crate::merge::method::find(&mode.value).map(|m| &m.engine) {
        Some(Engine::SuperMerger(m)) => *m,
        _ => {
            cx.error(
                &mode.referenced,
                crate::merge::method::unknown(&mode.value),
                None,
            );
            return None;
        }
    };
    let mut inputs = Vec::new();
    for (field, r) in [("a", &d.a), ("b", &d.b), ("c", &d.c)] {
        match r {
            Some(r) => inputs.extend(cx.resolve(r, Want::Checkpoint)),
            None if field == "c" && !mode_v.uses_c() => {}
            None => {
                cx.error(
                    &mode.referenced,
                    format!("{} node `{name}` needs `{field}`", mode_v.label()),
                    None,
                );
            }
        }
    }
    if let (Some(c), false) = (&d.c, mode_v.uses_c()) {
        cx.error(
            &c.referenced,
            format!("{} does not use model C", mode_v.label()),
            None,
        );
    }
    // Dice tokens in alpha / beta are drawn now (alpha first, as SuperMerger draws them).
    let mut roller = dice::Roller::new(d.dice.as_ref(), d.xl_elemental_shift);
    let mut ratio = |r: &Spanned<RatioDecl>, beta: bool, cx: &mut dyn ParseCx| -> Option<Ratio> {
        let RatioDecl::Text(text) = &r.value else {
            return cx.ratio(r);
        };
        match roller.roll(text, beta) {
            Ok(Some(values)) => Some(Ratio::Blocks(values)),
            Ok(None) => cx.ratio(r),
            Err(e) => {
                cx.error(&r.referenced, e.to_string(), None);
                None
            }
        }
    };
    let alpha = match &d.alpha {
        Some(a) => ratio(a, false, cx),
        None => {
            cx.error(
                &mode.referenced,
                format!("merge node `{name}` needs `alpha`"),
                None,
            );
            None
        }
    };
    let beta = d.beta.as_ref().map(|b| ratio(b, true, cx));
    let elemental = roller.elemental(d.elemental.clone());
    let adjust = match &d.adjust {
        Some(v) => match <[f64; 8]>::try_from(v.value.as_slice()) {
            Ok(a) => Some(a),
            Err(_) => {
                cx.error(&v.referenced, format!("adjust takes 8 values (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3), got {}", v.value.len()), None);
                None
            }
        },
        None => None,
    };
    let filter = match (&d.include, &d.exclude) {
        (Some(_), Some(_)) => {
            cx.error(
                &mode.referenced,
                format!("node `{name}` has both include and exclude"),
                None,
            );
            None
        }
        (Some(f), None) => Some(FilterSpec {
            mode: FilterMode::Include,
            blocks: f.blocks.clone(),
            elements: f.elements.clone(),
        }),
        (None, Some(f)) => Some(FilterSpec {
            mode: FilterMode::Exclude,
            blocks: f.blocks.clone(),
            elements: f.elements.clone(),
        }),
        (None, None) => None,
    };
    let vae = d
        .bake_vae
        .as_ref()
        .and_then(|v| match cx.resolve(v, Want::Checkpoint) {
            Some(Input::Model(m)) => Some(m),
            Some(Input::Node(_)) => {
                cx.error(
                    &v.referenced,
                    "bake_vae takes a model (a VAE file)".to_string(),
                    None,
                );
                None
            }
            None => None,
        });
    let calcmode = d.calcmode.as_ref().map(|c| c.value).unwrap_or_default();
    if !calcmode.modes().contains(&mode_v) {
        let at = d
            .calcmode
            .as_ref()
            .map(|c| &c.referenced)
            .unwrap_or(&mode.referenced);
        cx.error(
            at,
            format!(
                "calcmode {} applies to {} only",
                calcmode.label(),
                calcmode
                    .modes()
                    .iter()
                    .map(|m| m.label())
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
            None,
        );
    }
    let beta = match beta {
        Some(Some(b)) => Some(b),
        Some(None) => return None,
        None => None,
    };
    let spec = MergeSpec {
        mode: mode_v,
        alpha: alpha?,
        beta,
        calcmode,
        gamma: d.gamma.unwrap_or(GAMMA_DEFAULT),
        seed: d.seed.unwrap_or(0),
        dtype: d.dtype,
        rounding: d.rounding.unwrap_or_default(),
        scaled: d.scaled,
        prune: d.prune,
        reset_position_ids: d.reset_position_ids,
        elemental,
        xl_elemental_shift: d.xl_elemental_shift,
        block_list: d.block_list.clone(),
        filter,
        adjust,
        dice: d.dice.clone(),
        numerics: d.numerics.unwrap_or_default(),
        bake_vae: None,
    };
    (inputs.len() == if mode_v.uses_c() { 3 } else { 2 }).then_some(Node::Merge(MergeNode {
        inputs,
        spec: Box::new(spec),
        vae,
        memory: d.cache == Some(Keep::Memory),
    }))
}

/// What a merge's key is computed from (where its result is kept is not part of it).
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    algorithm: u32,
    merge: &'a MergeSpec,
    inputs: Vec<InputKey<'a>>,
    vae: Option<InputKey<'a>>,
}

impl NodeKind for MergeNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        self.inputs.iter().filter_map(Input::node).collect()
    }

    fn reads(&self) -> Vec<&str> {
        self.inputs
            .iter()
            .map(Input::name)
            .chain(self.vae.as_deref())
            .collect()
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.inputs.iter_mut().for_each(|i| i.rename(f));
    }

    fn in_memory(&self) -> bool {
        self.memory
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        let vae = self.vae.clone().map(Input::Model);
        preimage_value(Preimage {
            op: "merge",
            algorithm: ALGORITHM_VERSION,
            merge: &self.spec,
            inputs: self.inputs.iter().map(|i| cx.input(i)).collect(),
            vae: vae.as_ref().map(|v| cx.input(v)),
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let opened = self
            .inputs
            .iter()
            .map(|i| (cx.open)(i))
            .collect::<Result<Vec<_>>>()?;
        let v = self
            .vae
            .as_ref()
            .map(|v| (cx.open)(&Input::Model(v.clone())))
            .transpose()?;
        let inputs = crate::merge::plan::Inputs {
            a: &opened[0],
            b: &opened[1],
            c: opened.get(2),
            vae: v.as_ref(),
        };
        let plan = crate::merge::plan(&inputs, &self.spec)?;
        Ok(Some(
            plan.keys
                .iter()
                .map(|k| (k.name.clone(), k.dtype, k.shape.clone()))
                .collect(),
        ))
    }

    /// Keys every output tensor, refers to those the store already holds, computes and
    /// stores the rest.
    fn run(&self, _name: &str, key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.result(key, self.memory, |place| {
            let mut spec = (*self.spec).clone();
            spec.bake_vae = self.vae.as_ref().map(|v| cx.model_path(v).to_path_buf());
            let mut opened = self
                .inputs
                .iter()
                .map(|i| cx.open(i, true))
                .collect::<Result<Vec<_>>>()?
                .into_iter();
            let (a, b, c) = (
                opened.next().expect("A"),
                opened.next().expect("B"),
                opened.next(),
            );
            let v = self
                .vae
                .as_ref()
                .map(|v| cx.open(&Input::Model(v.clone()), true))
                .transpose()?;
            type Record = (PathBuf, FileHashes, tensors::KeyMap);
            let record = |o: &Opened| -> Result<Record> {
                let hashes = o.hashes.clone().ok_or_else(|| {
                    Error::Invalid(format!("{}: hashes not computed", o.label.display()))
                })?;
                Ok((o.label.clone(), hashes, o.keys.clone()))
            };
            let (ra, rb, rc, rv) = (
                record(&a)?,
                record(&b)?,
                c.as_ref().map(record).transpose()?,
                v.as_ref().map(record).transpose()?,
            );
            let prepared =
                Prepared::from_checkpoints(a.ck, b.ck, c.map(|o| o.ck), v.map(|o| o.ck), &spec)?;
            let in_keys = tensors::InputKeys {
                a: &ra.2,
                b: &rb.2,
                c: rc.as_ref().map(|r| &r.2),
                vae: rv.as_ref().map(|r| &r.2),
            };
            let out_keys = tensors::output_keys(&prepared.plan, &spec, &in_keys, key);
            fn rec(r: &Record) -> InputRecord<'_> {
                InputRecord {
                    path: &r.0,
                    hashes: &r.1,
                }
            }
            let md = metadata::build(
                &spec,
                &prepared.plan,
                rec(&ra),
                rec(&rb),
                rc.as_ref().map(rec),
                rv.as_ref().map(rec),
            );
            let tensors = prepared
                .plan
                .keys
                .iter()
                .zip(out_keys)
                .map(|(k, tk)| (k.name.clone(), k.dtype, k.shape.clone(), tk))
                .collect();
            cx.put(key, place, tensors, md, |w| {
                engine::write(&prepared.plan, &prepared.inputs(), &spec, w, cx.run)
            })
        })
    }

    fn summary(&self) -> String {
        self.spec.mode.label().to_string()
    }

    fn cost(&self) -> f64 {
        1.0
    }

    fn blends(&self) -> Option<&[Input]> {
        Some(&self.inputs)
    }
}
