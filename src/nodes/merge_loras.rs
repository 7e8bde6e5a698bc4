//! `merge_loras: {loras, ...}`: LoRAs merged into one (exact concatenation, SVD at a new
//! rank, SuperMerger's / sd-scripts' factor sum, or SuperMerger's extract from two LoRAs).

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::{Keep, LoraUseDecl, NodeDecl};
use super::run::lora_applications;
use super::{
    lora_header, quantile, rank, CheckCx, Header, KeyCx, Kind, LoraUse, Makes, Node, NodeKind,
    Outcome, ParseCx, RunCx, ALGORITHM_VERSION,
};
use super::{preimage_value, LoraKey};
use crate::dtype::FloatType;
use crate::error::Result;
use crate::lora::merge::{ExtractWeights, MergeMode, MergeOptions, MetadataMode};

/// The `merge_loras` kind.
pub static KIND: Kind = Kind {
    name: "merge_loras",
    usage: "`merge_loras: {loras}`",
    fields: &["cache"],
    hint: Some("options go under `merge_loras:`"),
    makes: Makes::Lora,
    declared: |d| d.merge_loras.is_some(),
    parse,
};

/// A `merge_loras` node's options.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeLorasDecl {
    /// The LoRAs (files under `models`, or LoRA nodes) with ratio (`strength`) and block
    /// weights.
    pub loras: Vec<LoraUseDecl>,
    /// `concat` (default: exact, LoRA / LoCon only), `svd` (any type, re-factored at `rank`),
    /// `kohya` (ups and downs summed, as sd-scripts and SuperMerger do; same ranks) or
    /// `extract` (SuperMerger's extract from two LoRAs).
    #[serde(default)]
    pub mode: Option<MergeMode>,
    /// svd: rank of linear and 1x1 modules (default 64).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub rank: Option<Spanned<usize>>,
    /// svd: rank of 3x3 convolutions (default: `rank`).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub conv_rank: Option<Spanned<usize>>,
    /// svd: quantile at which the factors are clamped (default 0.99; 1: no clamp).
    #[serde(default)]
    #[schemars(with = "Option<f64>")]
    pub clamp_quantile: Option<Spanned<f64>>,
    /// Weight of blocks a short block-weight vector leaves out (default 0).
    #[serde(default)]
    pub fill: Option<f64>,
    /// Float type of the LoRA's tensors (default fp32).
    #[serde(default)]
    pub dtype: Option<FloatType>,
    /// kohya / extract / svd: SuperMerger's "same to Strength" (√|ratio| on both factors, the
    /// sign on lora_down).
    #[serde(default)]
    pub same_to_strength: bool,
    /// extract: 0 keeps the first LoRA's factors, 1 the second's (default 0.5).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// extract: 0 keeps what the two share, 1 where they differ (default 0.5).
    #[serde(default)]
    pub beta: Option<f64>,
    /// extract: sharpness of the similarity weighting (default 1).
    #[serde(default)]
    pub gamma: Option<f64>,
    /// What the file's metadata holds: `new` (default), `new_without_name`, `merge`, `all`,
    /// `first` (SuperMerger's five choices).
    #[serde(default)]
    pub metadata: Option<MetadataMode>,
}

/// LoRAs merged into one.
#[derive(Debug, Clone)]
pub struct MergeLorasNode {
    /// The LoRAs, in order.
    pub loras: Vec<LoraUse>,
    /// How they are merged.
    pub options: MergeOptions,
    /// Weight of blocks a short vector leaves out.
    pub fill: f64,
    /// Keep the result in memory only (`cache: memory`).
    pub memory: bool,
}

fn parse(_name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let m = decl.value.merge_loras.as_ref()?;
    let v = &m.value;
    if v.loras.is_empty() {
        cx.error(
            &m.referenced,
            "merge_loras needs `loras: [{ file: LORA, strength: 1 }, ...]`".into(),
            None,
        );
        return None;
    }
    let loras = super::lora_uses(&v.loras, cx);
    let (rank, conv_rank) = (rank(&v.rank, cx), rank(&v.conv_rank, cx));
    let clamp_quantile = quantile(&v.clamp_quantile, cx);
    let mode = v.mode.unwrap_or(MergeMode::Concat);
    let extract = ExtractWeights::given(mode, v.alpha, v.beta, v.gamma);
    let options = MergeOptions {
        mode,
        rank: rank?.unwrap_or(64),
        conv_rank: conv_rank?,
        clamp_quantile: clamp_quantile?,
        dtype: v.dtype.unwrap_or(FloatType::Fp32),
        same_to_strength: v.same_to_strength,
        extract,
        metadata: v.metadata.unwrap_or_default(),
    };
    if let Err(e) = crate::lora::merge::check_options(v.loras.len(), &options) {
        cx.error(&m.referenced, e.to_string(), None);
        return None;
    }
    Some(Node::MergeLoras(MergeLorasNode {
        loras: loras?,
        options,
        fill: v.fill.unwrap_or(0.0),
        memory: decl.value.cache == Some(Keep::Memory),
    }))
}

/// What a LoRA merge's key is computed from.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    algorithm: u32,
    loras: Vec<LoraKey<'a>>,
    options: &'a MergeOptions,
    fill: f64,
}

impl NodeKind for MergeLorasNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        self.loras.iter().filter_map(|l| l.source.node()).collect()
    }

    fn reads(&self) -> Vec<&str> {
        self.loras.iter().map(|l| l.source.name()).collect()
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.loras.iter_mut().for_each(|l| l.source.rename(f));
    }

    fn in_memory(&self) -> bool {
        self.memory
    }

    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        preimage_value(Preimage {
            op: "merge_loras",
            algorithm: ALGORITHM_VERSION,
            loras: cx.loras(&self.loras),
            options: &self.options,
            fill: self.fill,
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let sources = lora_applications(&self.loras, None, self.fill, &|i| cx.open_lora(i))?;
        let plan = crate::lora::merge::plan(&sources, &self.options)?;
        Ok(Some(lora_header(
            crate::lora::merge::layout(&plan),
            self.options.dtype,
        )))
    }

    /// Merges the LoRAs in memory, then stores the result as one new pack.
    fn run(&self, name: &str, key: &str, _preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        cx.result(key, self.memory, |place| {
            let sources = lora_applications(&self.loras, None, self.fill, &|i| cx.open_lora(i))?;
            let plan = crate::lora::merge::plan(&sources, &self.options)?;
            let (lora, _) = crate::lora::merge::run(&sources, &plan, &self.options, name)?;
            cx.put_lora(key, place, &lora, self.options.dtype.dtype())
        })
    }

    fn summary(&self) -> String {
        format!("merge {} LoRAs", self.loras.len())
    }

    fn cost(&self) -> f64 {
        1.0
    }
}
