//! `extract_lora: {a, b, ...}`: a LoRA extracted by SVD from the difference of two
//! checkpoints.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::{Keep, NodeDecl};
use super::{
    lora_header, quantile, rank, CheckCx, Header, Input, KeyCx, Kind, Makes, Node, NodeKind,
    Outcome, ParseCx, RunCx, Want, ALGORITHM_VERSION,
};
use super::{preimage_value, InputKey};
use crate::dtype::FloatType;
use crate::error::Result;
use crate::lora::extract::ExtractOptions;

/// The `extract_lora` kind.
pub static KIND: Kind = Kind {
    name: "extract_lora",
    usage: "`extract_lora: {a, b}`",
    fields: &["cache"],
    hint: Some("options go under `extract_lora:`"),
    makes: Makes::Lora,
    declared: |d| d.extract_lora.is_some(),
    parse,
};

/// An `extract_lora` node's options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractDecl {
    /// The tuned checkpoint: a model or node.
    #[schemars(with = "String")]
    pub a: Spanned<String>,
    /// The base checkpoint: a model or node.
    #[schemars(with = "String")]
    pub b: Spanned<String>,
    /// Weight of A in the difference (default 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Weight of B in the difference (default 1).
    #[serde(default)]
    pub beta: Option<f64>,
    /// Rank of linear and 1x1 modules (default 128).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub rank: Option<Spanned<usize>>,
    /// Rank of 3x3 convolutions (LoCon); without it convolutions are left out.
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub conv_rank: Option<Spanned<usize>>,
    /// Text encoders whose largest change is at most this are left out (default 0.01).
    #[serde(default)]
    pub min_diff: Option<f64>,
    /// Quantile at which the factors are clamped (default 0.99; 1: no clamp).
    #[serde(default)]
    #[schemars(with = "Option<f64>")]
    pub clamp_quantile: Option<Spanned<f64>>,
    /// Float type of the LoRA's tensors (default fp32).
    #[serde(default)]
    pub dtype: Option<FloatType>,
}

/// A LoRA extracted from two checkpoints.
#[derive(Debug, Clone)]
pub struct ExtractNode {
    /// The tuned checkpoint (A).
    pub a: Input,
    /// The base checkpoint (B).
    pub b: Input,
    /// How it is extracted.
    pub options: ExtractOptions,
    /// Keep the result in memory only (`cache: memory`).
    pub memory: bool,
}

fn parse(_name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let x = decl.value.extract_lora.as_ref()?;
    let v = &x.value;
    let a = cx.resolve(&v.a, Want::Checkpoint);
    let b = cx.resolve(&v.b, Want::Checkpoint);
    let defaults = ExtractOptions::default();
    let (rank, conv_rank) = (rank(&v.rank, cx), rank(&v.conv_rank, cx));
    let clamp_quantile = quantile(&v.clamp_quantile, cx);
    if v.min_diff.is_some_and(|m| m < 0.0) {
        cx.error(&x.referenced, "min_diff must be 0 or more".into(), None);
        return None;
    }
    Some(Node::ExtractLora(ExtractNode {
        a: a?,
        b: b?,
        options: ExtractOptions {
            rank: rank?.unwrap_or(defaults.rank),
            conv_rank: conv_rank?,
            alpha: v.alpha.unwrap_or(defaults.alpha),
            beta: v.beta.unwrap_or(defaults.beta),
            min_diff: v.min_diff.unwrap_or(defaults.min_diff),
            clamp_quantile: clamp_quantile?,
            dtype: v.dtype.unwrap_or(defaults.dtype),
        },
        memory: decl.value.cache == Some(Keep::Memory),
    }))
}

/// What an extraction's key is computed from.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    algorithm: u32,
    a: InputKey<'a>,
    b: InputKey<'a>,
    options: &'a ExtractOptions,
}

impl NodeKind for ExtractNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        [&self.a, &self.b]
            .into_iter()
            .filter_map(Input::node)
            .collect()
    }

    fn reads(&self) -> Vec<&str> {
        vec![self.a.name(), self.b.name()]
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.a.rename(f);
        self.b.rename(f);
    }

    fn in_memory(&self) -> bool {
        self.memory
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        preimage_value(Preimage {
            op: "extract_lora",
            algorithm: ALGORITHM_VERSION,
            a: cx.input(&self.a),
            b: cx.input(&self.b),
            options: &self.options,
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let plan =
            crate::lora::extract::plan(&(cx.open)(&self.a)?, &(cx.open)(&self.b)?, &self.options)?;
        Ok(Some(lora_header(
            plan.layout(&self.options),
            self.options.dtype,
        )))
    }

    /// Makes the LoRA in memory (a few hundred MB at most), then stores it as one new pack.
    fn run(&self, name: &str, key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.result(key, self.memory, |place| {
            let (a, b) = (cx.open(&self.a, false)?.ck, cx.open(&self.b, false)?.ck);
            let plan = crate::lora::extract::plan(&a, &b, &self.options)?;
            let progress = cx.run.progress;
            let (lora, _) = crate::lora::extract::run(&a, &b, plan, &self.options, name, progress)?;
            cx.put_lora(key, place, &lora, self.options.dtype.dtype())
        })
    }

    fn summary(&self) -> String {
        format!("extract LoRA r{}", self.options.rank)
    }

    fn cost(&self) -> f64 {
        10.0
    }
}
