//! Node kinds: one file per kind (merge, lora, extract_lora, merge_loras, generate, xy,
//! save), each holding its declaration (which fields it reads, what it makes), its
//! validation, its inputs, its key preimage, its check against its inputs' headers, its
//! execution, its cost and its labels. Planning, keys, scheduling, sharding, the graph and
//! the report go through [`NodeKind`] and the registry ([`Node`] and [`KINDS`], made by the
//! `kinds!` list in this file): a new kind is a file and a line there (plus its YAML field in
//! [`decl::NodeDecl`]).

pub mod decl;
pub mod extract_lora;
pub mod generate;
pub mod images;
pub mod lora;
pub mod merge;
pub mod merge_list;
pub mod merge_loras;
mod run;
pub mod save;
pub mod tensors;
pub mod xy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
use crate::error::Result;
use crate::merge::Ratio;
use crate::store::remote::Kind as Stored;
use crate::store::{Cache, State};
use decl::{NodeDecl, RatioDecl};
pub use run::{Generation, RunCx};

/// Bumped whenever a change to the merge code changes results for the same inputs.
pub const ALGORITHM_VERSION: u32 = 1;

/// What a node reads: a model file or another node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// A declared model.
    Model(String),
    /// Another node.
    Node(String),
}

impl Input {
    /// The node name, when this is a node.
    pub fn node(&self) -> Option<&str> {
        match self {
            Input::Node(n) => Some(n),
            Input::Model(_) => None,
        }
    }

    /// The model or node name.
    pub fn name(&self) -> &str {
        let (Input::Model(n) | Input::Node(n)) = self;
        n
    }

    /// Renames it, when it is a node (sweep cells copy nodes under a prefix).
    pub fn rename(&mut self, f: &dyn Fn(&str) -> String) {
        if let Input::Node(n) = self {
            *n = f(n);
        }
    }
}

/// One LoRA baked by a `lora` node or merged by a `merge_loras` node.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraUse {
    /// The LoRA: a model (file) or a LoRA node.
    pub source: Input,
    /// Strength (merge_loras: ratio).
    pub strength: f64,
    /// Block weights as written (parsed against the checkpoint's family when built).
    pub blocks: Option<String>,
}

/// What a node's result is, which decides what may read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Makes {
    /// A checkpoint (merges and LoRA bakes read it).
    Checkpoint,
    /// A LoRA (`lora` and `merge_loras` nodes read it).
    Lora,
    /// Images (nothing reads them; sweeps read their cells' keys).
    Images,
    /// A file outside the cache (nothing reads it).
    File,
}

/// What a reference must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A checkpoint: a model file or a checkpoint-making node.
    Checkpoint,
    /// A LoRA: a model file or a LoRA-making node.
    Lora,
    /// Any node or model.
    Any,
}

/// What a kind's validation can ask of the recipe being read: references, ratios (with vars
/// and presets), paths, and a place to put errors (pointing at the recipe's text).
pub trait ParseCx {
    /// Records an error at `at`.
    fn error(&mut self, at: &Location, message: String, help: Option<String>);
    /// The model or node `r` names, checked against `want` (an error when it does not fit).
    fn resolve(&mut self, r: &Spanned<String>, want: Want) -> Option<Input>;
    /// A ratio field's value (a number, a preset, a vector, or a `$var`).
    fn ratio(&mut self, r: &Spanned<RatioDecl>) -> Option<Ratio>;
    /// A path written in the declaring file, resolved against that file's directory.
    fn path(&self, written: &str) -> PathBuf;
}

/// A kind as the recipe format knows it: the key that declares it, the flat fields it
/// takes, what it makes, and how its declaration becomes a [`Node`].
pub struct Kind {
    /// Its name, which is also the key that declares it (`merge: MODE`, `save: NODE`...).
    pub name: &'static str,
    /// How it is declared, for the error listing the kinds.
    pub usage: &'static str,
    /// The flat fields beside its key that it reads (nested kinds: only `cache`, `to`...).
    pub fields: &'static [&'static str],
    /// A hint for a declaration with other fields.
    pub hint: Option<&'static str>,
    /// What its result is.
    pub makes: Makes,
    /// Whether a declaration declares this kind (its key is set).
    pub declared: fn(&NodeDecl) -> bool,
    /// Validates a declaration of this kind into a node (`None` after reporting errors, and
    /// for kinds expanded later: sweeps).
    pub parse: fn(&str, &Spanned<NodeDecl>, &mut dyn ParseCx) -> Option<Node>,
}

/// The kind a declaration declares.
pub fn kind_of(d: &NodeDecl) -> Vec<&'static Kind> {
    KINDS.iter().copied().filter(|k| (k.declared)(d)).collect()
}

/// The tensors of a result as planned: (name, dtype, shape).
pub type Header = Vec<(String, DType, Vec<usize>)>;

/// What keys are computed from: every model's content key, the keys and preimages of the
/// nodes before this one, and the tokenizer's key.
pub struct KeyCx<'a> {
    /// Model name -> blake3 of its content.
    pub models: &'a BTreeMap<&'a str, String>,
    /// Node name -> (key, preimage), for the nodes before this one.
    pub nodes: &'a BTreeMap<String, (String, Value)>,
    /// The tokenizer's key ("" when no node uses it).
    pub tokenizer: &'a str,
}

/// An input as it enters a preimage: a model by name and content, a node by name and key.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum InputKey<'a> {
    /// A model file.
    Model {
        /// Its name in the recipe.
        model: &'a str,
        /// The blake3 of its content.
        content: &'a str,
    },
    /// A node's result.
    Node {
        /// Its name.
        node: &'a str,
        /// Its key.
        key: &'a str,
    },
}

/// A LoRA use as it enters a preimage.
#[derive(Debug, serde::Serialize)]
pub struct LoraKey<'a> {
    /// The LoRA file or node.
    pub lora: InputKey<'a>,
    /// Its strength.
    pub strength: f64,
    /// Its block weights as written.
    pub blocks: &'a Option<String>,
}

/// A typed preimage as the JSON value keys are computed from (and diffs shown of).
pub(crate) fn preimage_value(p: impl serde::Serialize) -> Value {
    serde_json::to_value(p).expect("preimages serialize")
}

impl<'c> KeyCx<'c> {
    /// An input as it enters a preimage.
    pub fn input<'a>(&'a self, i: &'a Input) -> InputKey<'a> {
        match i {
            Input::Model(m) => InputKey::Model {
                model: m,
                content: &self.models[m.as_str()],
            },
            Input::Node(n) => InputKey::Node {
                node: n,
                key: &self.nodes[n].0,
            },
        }
    }

    /// The content key of an input (a model's blake3, a node's key).
    pub fn content(&self, i: &Input) -> String {
        match i {
            Input::Model(m) => self.models[m.as_str()].clone(),
            Input::Node(n) => self.nodes[n].0.clone(),
        }
    }

    /// The key of a node before this one.
    pub fn key(&self, node: &str) -> &str {
        &self.nodes[node].0
    }

    /// The preimage of a node before this one.
    pub fn preimage(&self, node: &str) -> &Value {
        &self.nodes[node].1
    }

    /// LoRA uses as they enter a preimage.
    pub fn loras<'a>(&'a self, loras: &'a [LoraUse]) -> Vec<LoraKey<'a>> {
        loras
            .iter()
            .map(|l| LoraKey {
                lora: self.input(&l.source),
                strength: l.strength,
                blocks: &l.blocks,
            })
            .collect()
    }
}

/// What a node's check against its inputs' headers can open: model files, stored results,
/// or the planned header of a node that runs first (no tensor data is read).
pub struct CheckCx<'a> {
    /// Opens an input's header.
    pub open: &'a dyn Fn(&Input) -> Result<Checkpoint>,
}

impl CheckCx<'_> {
    /// Opens a LoRA input (a file, or a LoRA node's planned result).
    pub fn open_lora(&self, i: &Input) -> Result<crate::lora::LoraFile> {
        crate::lora::LoraFile::from_checkpoint((self.open)(i)?)
    }
}

/// Whether a node is up to date: the cache, the last build's state, and every node's key.
pub struct HitCx<'a> {
    /// The cache.
    pub cache: &'a Cache,
    /// The recipe's last build.
    pub state: &'a State,
    /// Node name -> (key, preimage).
    pub keys: &'a BTreeMap<String, (String, Value)>,
}

/// What running a node did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Tensors stored (results), images or grids made.
    pub stored: Option<usize>,
    /// Tensors referred to, images or grids found.
    pub reused: Option<usize>,
    /// The file or directory it wrote.
    pub output: Option<PathBuf>,
}

/// What every node kind does. Planning, keys, scheduling, sharding, the graph and the report
/// call these; only the kind's own file knows its fields.
pub trait NodeKind: std::fmt::Debug + Send + Sync {
    /// Its declaration: name, fields, what it makes.
    fn kind(&self) -> &'static Kind;

    /// The nodes it reads, by name.
    fn node_inputs(&self) -> Vec<&str>;

    /// Every model and node it reads, by name, in order (the graph's edges).
    fn reads(&self) -> Vec<&str>;

    /// Renames the nodes it reads (sweep cells copy nodes under a prefix).
    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String);

    /// Whether its result is kept in memory for one build only (`cache: memory`).
    fn in_memory(&self) -> bool {
        false
    }

    /// Whether its key depends on the tokenizer (generation).
    fn uses_tokenizer(&self) -> bool {
        false
    }

    /// What its key is computed from (where a result is kept is not part of it).
    fn preimage(&self, name: &str, cx: &KeyCx) -> Value;

    /// Checks it against its inputs' headers before anything runs; the header of its result,
    /// or `None` when it reads no checkpoint.
    fn check(&self, cx: &CheckCx) -> Result<Option<Header>>;

    /// The directory a kind that makes images also copies them to (`to: DIR`).
    fn copies_to(&self) -> Option<&Path> {
        None
    }

    /// The cache objects its result is made of: the images it lists (a kind that makes
    /// images), nothing (a file, or a result kept in memory), else its stored result.
    fn stored_objects(&self, key: &str, preimage: &Value) -> Vec<(String, Stored)> {
        match self.kind().makes {
            Makes::Images => images::stored_objects(preimage),
            Makes::File => Vec::new(),
            _ if self.in_memory() => Vec::new(),
            _ => vec![(key.to_string(), Stored::Result)],
        }
    }

    /// Whether the images it makes are all stored (then it reads none of its inputs).
    fn images_stored(&self, preimage: &Value, cache: &Cache) -> bool {
        self.kind().makes == Makes::Images && images::all_stored(cache, preimage)
    }

    /// Whether it is up to date: its images stored and their copies the files the last build
    /// wrote, or its result stored (never for a result kept in memory).
    fn is_current(&self, key: &str, preimage: &Value, cx: &HitCx) -> bool {
        match self.kind().makes {
            Makes::Images => {
                images::all_stored(cx.cache, preimage)
                    && images::copies_current(cx.state, self.copies_to(), preimage)
            }
            _ => !self.in_memory() && cx.cache.has_result(key),
        }
    }

    /// Runs it (it is out of date and its inputs are done).
    fn run(&self, name: &str, key: &str, preimage: &Value, cx: &RunCx) -> Result<Outcome>;

    /// A few words on what it does, for the graph (`weight_sum`, `LoRA x2`, `1 image(s)`).
    fn summary(&self) -> String;

    /// Its estimated cost, in units of one SD1 merge, for balancing shards.
    fn cost(&self) -> f64;

    /// What a shard builds for it as a target: the nodes whose results make it up (a sweep:
    /// its cells; a save: what it saves; else itself).
    fn shard_units<'a>(&'a self, name: &'a str) -> Vec<&'a str> {
        vec![name]
    }

    /// The file it writes outside the cache, recorded in the lockfile.
    fn output_file(&self) -> Option<&Path> {
        None
    }

    /// The same, to redirect it (`verify --rebuild` writes into a temporary folder).
    fn output_file_mut(&mut self) -> Option<&mut PathBuf> {
        None
    }

    /// What `build` prints for a run of it: "(N tensors stored, M reused)" and the like.
    fn describe(&self, stored: usize, reused: usize) -> String {
        format!("{stored} tensors stored, {reused} reused")
    }

    /// Whether it runs although an input failed (a sweep draws the cells that exist, grey
    /// where one failed); other nodes fail without running.
    fn runs_with_failed_inputs(&self) -> bool {
        false
    }

    /// The checkpoints a merge blends (the report compares its result with them).
    fn blends(&self) -> Option<&[Input]> {
        None
    }

    /// A generate node's checkpoint and job (the report's image pages).
    fn generation(&self) -> Option<(&Input, &crate::gen::job::Job)> {
        None
    }

    /// A sweep's grids (the report's sweep pages).
    fn grids(&self) -> Option<&[xy::Grid]> {
        None
    }
}

/// The registry: every kind, its variant of [`Node`] and its declaration in [`KINDS`].
macro_rules! kinds {
    ($($(#[$doc:meta])* $variant:ident($module:ident::$ty:ident)),* $(,)?) => {
        /// A validated node: one variant per kind, each the kind's own type.
        #[derive(Debug, Clone)]
        pub enum Node {
            $($(#[$doc])* $variant($module::$ty),)*
        }

        impl std::ops::Deref for Node {
            type Target = dyn NodeKind;
            fn deref(&self) -> &(dyn NodeKind + 'static) {
                match self {
                    $(Node::$variant(n) => n,)*
                }
            }
        }

        impl std::ops::DerefMut for Node {
            fn deref_mut(&mut self) -> &mut (dyn NodeKind + 'static) {
                match self {
                    $(Node::$variant(n) => n,)*
                }
            }
        }

        /// Every kind's declaration, in the order the recipe format lists them.
        pub static KINDS: &[&Kind] = &[$(&$module::KIND),*];
    };
}

kinds! {
    /// A merge of checkpoints.
    Merge(merge::MergeNode),
    /// A list merge (N models or deltas).
    MergeList(merge_list::ListNode),
    /// A save of a node's result to a file.
    Save(save::SaveNode),
    /// LoRAs baked into a checkpoint.
    Lora(lora::LoraNode),
    /// A LoRA extracted from two checkpoints.
    ExtractLora(extract_lora::ExtractNode),
    /// LoRAs merged into one.
    MergeLoras(merge_loras::MergeLorasNode),
    /// Images generated from a checkpoint.
    Generate(generate::GenerateNode),
    /// An XY(Z) sweep: comparison grids over its cells' generate nodes.
    Xy(xy::XyNode),
}

/// A rank option: at least 1.
pub(crate) fn rank(r: &Option<Spanned<usize>>, cx: &mut dyn ParseCx) -> Option<Option<usize>> {
    match r {
        Some(r) if r.value == 0 => {
            cx.error(&r.referenced, "a rank is at least 1".into(), None);
            None
        }
        r => Some(r.as_ref().map(|r| r.value)),
    }
}

/// A clamp quantile: above 0, at most 1.
pub(crate) fn quantile(q: &Option<Spanned<f64>>, cx: &mut dyn ParseCx) -> Option<f64> {
    match q {
        None => Some(0.99),
        Some(q) if q.value > 0.0 && q.value <= 1.0 => Some(q.value),
        Some(q) => {
            cx.error(
                &q.referenced,
                format!("clamp_quantile {} is not in (0, 1]", q.value),
                Some("1 turns the clamp off".into()),
            );
            None
        }
    }
}

/// The LoRAs of a `lora` or `merge_loras` node, with strengths resolved (all of them, or
/// `None` after reporting what is wrong).
pub(crate) fn lora_uses(uses: &[decl::LoraUseDecl], cx: &mut dyn ParseCx) -> Option<Vec<LoraUse>> {
    let mut out = Vec::new();
    for u in uses {
        let strength = match &u.strength {
            None => Some(1.0),
            Some(s) => match cx.ratio(s) {
                Some(Ratio::Scalar(v)) => Some(v),
                Some(_) => {
                    cx.error(
                        &s.referenced,
                        "a LoRA strength is one number; per-block values go in `blocks`".into(),
                        None,
                    );
                    None
                }
                None => None,
            },
        };
        if let (Some(source), Some(strength)) = (cx.resolve(&u.file, Want::Lora), strength) {
            out.push(LoraUse {
                source,
                strength,
                blocks: u.blocks.clone(),
            });
        }
    }
    (out.len() == uses.len()).then_some(out)
}

/// The header of a LoRA laid out as (name, shape) in `dtype` (alphas are scalars).
pub(crate) fn lora_header(
    layout: Vec<(String, Vec<usize>)>,
    dtype: crate::dtype::FloatType,
) -> Header {
    layout
        .into_iter()
        .map(|(n, s)| (n, dtype.dtype(), s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{MergeSpec, Mode};

    /// Users' caches stay valid only while preimages keep their exact JSON: the typed
    /// preimages must serialize to the format the keys have always been computed from
    /// (written out here independently, as `json!` literals).
    #[test]
    fn preimages_keep_their_format() {
        let models: BTreeMap<&str, String> =
            [("a", "ka".to_string()), ("b", "kb".to_string())].into();
        let mut nodes = BTreeMap::new();
        nodes.insert("m".to_string(), ("km".to_string(), Value::Null));
        let cx = KeyCx {
            models: &models,
            nodes: &nodes,
            tokenizer: "",
        };
        let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.25), None);
        let merge = merge::MergeNode {
            inputs: vec![Input::Model("a".into()), Input::Node("m".into())],
            spec: Box::new(spec.clone()),
            vae: Some("b".into()),
            memory: true,
        };
        assert_eq!(
            merge.preimage("x", &cx),
            serde_json::json!({
                "op": "merge",
                "algorithm": ALGORITHM_VERSION,
                "merge": spec,
                "inputs": [{ "model": "a", "content": "ka" }, { "node": "m", "key": "km" }],
                "vae": { "model": "b", "content": "kb" },
            })
        );
        let lora = lora::LoraNode {
            input: Input::Node("m".into()),
            loras: vec![LoraUse {
                source: Input::Model("b".into()),
                strength: 0.5,
                blocks: Some("OUTD".into()),
            }],
            fill: 0.0,
            allow_unmatched: false,
            memory: false,
        };
        assert_eq!(
            lora.preimage("x", &cx),
            serde_json::json!({
                "op": "lora",
                "algorithm": ALGORITHM_VERSION,
                "input": { "node": "m", "key": "km" },
                "loras": [{ "lora": { "model": "b", "content": "kb" }, "strength": 0.5, "blocks": "OUTD" }],
                "fill": 0.0,
                "allow_unmatched": false,
            })
        );
        let save = save::SaveNode {
            from: "m".into(),
            to: PathBuf::from("/out/m.safetensors"),
            overwrite: false,
            link: decl::Link::Hardlink,
        };
        assert_eq!(
            save.preimage("s", &cx),
            serde_json::json!({ "op": "save", "from": { "node": "m", "key": "km" }, "link": "hardlink" })
        );
    }
}
