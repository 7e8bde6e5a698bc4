//! `lora: MODEL`: LoRAs (every LyCORIS kind, with block weights) baked into a checkpoint.

use serde_json::{json, Value};
use serde_saphyr::Spanned;

use super::decl::{Keep, NodeDecl};
use super::run::lora_applications;
use super::{preimage_value, InputKey, LoraKey};
use super::{
    CheckCx, Header, Input, KeyCx, Kind, LoraUse, Makes, Node, NodeKind, Outcome, ParseCx, RunCx,
    Want, ALGORITHM_VERSION,
};
use crate::error::Result;

/// The `lora` kind.
pub static KIND: Kind = Kind {
    name: "lora",
    usage: "`lora: MODEL`",
    fields: &["apply", "fill", "allow_unmatched", "cache"],
    hint: None,
    makes: Makes::Checkpoint,
    declared: |d| d.lora.is_some(),
    parse,
};

/// LoRAs baked into a checkpoint.
#[derive(Debug, Clone)]
pub struct LoraNode {
    /// The checkpoint.
    pub input: Input,
    /// The LoRAs, in order.
    pub loras: Vec<LoraUse>,
    /// Weight of blocks a short vector leaves out.
    pub fill: f64,
    /// Skip modules that match nothing.
    pub allow_unmatched: bool,
    /// Keep the result in memory only (`cache: memory`).
    pub memory: bool,
}

/// The checkpoint, then each LoRA with its strength and block weights.
fn parse(name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let d = &decl.value;
    let base = d.lora.as_ref()?;
    let input = cx.resolve(base, Want::Checkpoint);
    if d.apply.is_empty() {
        cx.error(
            &base.referenced,
            format!("lora node `{name}` needs `apply: [{{ file: LORA, strength: 1 }}]`"),
            None,
        );
        return None;
    }
    let loras = super::lora_uses(&d.apply, cx);
    Some(Node::Lora(LoraNode {
        input: input?,
        loras: loras?,
        fill: d.fill.unwrap_or(0.0),
        allow_unmatched: d.allow_unmatched,
        memory: d.cache == Some(Keep::Memory),
    }))
}

/// What a LoRA bake's key is computed from.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    algorithm: u32,
    input: InputKey<'a>,
    loras: Vec<LoraKey<'a>>,
    fill: f64,
    allow_unmatched: bool,
}

impl NodeKind for LoraNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        std::iter::once(&self.input)
            .chain(self.loras.iter().map(|l| &l.source))
            .filter_map(Input::node)
            .collect()
    }

    fn reads(&self) -> Vec<&str> {
        std::iter::once(&self.input)
            .chain(self.loras.iter().map(|l| &l.source))
            .map(Input::name)
            .collect()
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.input.rename(f);
        self.loras.iter_mut().for_each(|l| l.source.rename(f));
    }

    fn in_memory(&self) -> bool {
        self.memory
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        preimage_value(Preimage {
            op: "lora",
            algorithm: ALGORITHM_VERSION,
            input: cx.input(&self.input),
            loras: cx.loras(&self.loras),
            fill: self.fill,
            allow_unmatched: self.allow_unmatched,
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let base = (cx.open)(&self.input)?;
        let family = crate::arch::detect(base.tensors()).family;
        let apps = lora_applications(&self.loras, Some(family), self.fill, &|i| cx.open_lora(i))?;
        crate::lora::bake::plan(&base, &apps, self.allow_unmatched)?;
        Ok(Some(
            base.tensors()
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect(),
        ))
    }

    /// Bakes its LoRAs into its input. Tensors no module touches keep their input's tensor
    /// key (so a stored input is referred to, not copied); changed ones are keyed by their
    /// input key and every contribution (LoRA content, module, factor).
    fn run(&self, _name: &str, key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.result(key, self.memory, |place| {
            let base = cx.open(&self.input, false)?;
            let family = crate::arch::detect(base.ck.tensors()).family;
            let apps =
                lora_applications(&self.loras, Some(family), self.fill, &|i| cx.open_lora(i))?;
            let (record, contents) = cx.lora_record(&self.loras, &apps)?;
            let plan = crate::lora::bake::plan(&base.ck, &apps, self.allow_unmatched)?;
            let mut md = base.ck.metadata().clone();
            md.insert("mergesmith_loras".into(), record.to_string());
            let mut keys: std::collections::BTreeMap<&str, String> = Default::default();
            for t in base.ck.tensors() {
                let input_key = base.keys.get(&t.name).cloned().unwrap_or_default();
                let tk = match plan.changes.get(&t.name) {
                    None => input_key,
                    Some(cs) => {
                        let changes: Vec<Value> = cs
                            .iter()
                            .map(|c| {
                                json!({
                                    "lora": contents[c.lora],
                                    "module": apps[c.lora].file.modules[c.module].name,
                                    "rows": c.rows,
                                    "strength": c.strength,
                                    "block": c.block,
                                    "bias": c.bias,
                                })
                            })
                            .collect();
                        let pre = json!({
                            "algorithm": ALGORITHM_VERSION,
                            "op": "lora",
                            "name": t.name,
                            "input": input_key,
                            "changes": changes,
                        });
                        blake3::hash(pre.to_string().as_bytes())
                            .to_hex()
                            .to_string()
                    }
                };
                keys.insert(&t.name, tk);
            }
            // A rescaled weight's scale (scaled fp8) is recomputed with it.
            for (weight, scale) in &plan.rescaled {
                let pre = json!({ "op": "lora_scale", "of": keys.get(weight.as_str()) });
                let tk = blake3::hash(pre.to_string().as_bytes())
                    .to_hex()
                    .to_string();
                keys.insert(scale, tk);
            }
            let tensors = base
                .ck
                .tensors()
                .iter()
                .map(|t| {
                    let tk = keys.get(t.name.as_str()).cloned().unwrap_or_default();
                    (t.name.clone(), t.dtype, t.shape.clone(), tk)
                })
                .collect();
            cx.put(key, place, tensors, md, |w| {
                crate::lora::bake::write(&base.ck, &apps, &plan, w, cx.run.progress)
            })
        })
    }

    fn summary(&self) -> String {
        format!("LoRA x{}", self.loras.len())
    }

    fn cost(&self) -> f64 {
        1.0
    }
}
