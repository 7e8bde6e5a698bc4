//! Recipe files (YAML, format version 1): models, merge and save nodes.
//!
//! The serde types below are the single source of truth: they parse recipes (with
//! serde-saphyr, which keeps line/column spans) and generate the JSON Schema in
//! `schema/recipe.v1.json` for editors. [`load`] parses a file, checks every reference and
//! option, and returns either a [`Recipe`] or all the errors found, each pointing at its
//! place in the file.

mod dag;
pub mod diagnostics;
pub mod import;
pub mod png_info;
pub mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::merge::{Presets, Ratio};
use crate::nodes::decl::{set_fields, NodeDecl, RatioDecl};
use crate::nodes::{Input, Makes, Node, ParseCx, Want, KINDS};
pub use dag::DagFormat;
pub use diagnostics::{RecipeError, RecipeErrors};

/// The newest recipe format version.
pub const VERSION: u32 = 1;

/// A recipe file as written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "mergesmith recipe",
    description = "Stable Diffusion merges as a reproducible build"
)]
pub struct RecipeFile {
    /// Format version: 1.
    #[schemars(with = "u32")]
    pub version: Spanned<u32>,
    /// Input checkpoints by name.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ModelDecl>")]
    pub models: BTreeMap<String, Spanned<ModelDecl>>,
    /// Named build steps.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, NodeDecl>")]
    pub nodes: BTreeMap<String, Spanned<NodeDecl>>,
    /// Extra MBW preset files (`NAME<TAB>v1,...` per line), relative to the recipe.
    #[serde(default)]
    pub presets: Vec<String>,
    /// Other recipe files whose models, vars, presets and nodes join this one (paths relative
    /// to this file; names must not repeat).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub include: Vec<Spanned<String>>,
    /// Named ratios (a number, a preset name, "v1,v2,..." or a list) that `alpha` and `beta`
    /// refer to as `$name`; `mergesmith build --set name=value` overrides one.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, RatioDecl>")]
    pub vars: BTreeMap<String, Spanned<RatioDecl>>,
    /// The CLIP `tokenizer.json` generate nodes use (relative to the recipe); default:
    /// `--tokenizer`, `$MERGESMITH_TOKENIZER`, or the Hugging Face hub cache.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

/// An input checkpoint.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// Path of the file, relative to the recipe.
    pub path: String,
    /// Expected SHA-256 of the file (checked before building).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Expected AUTOMATIC1111 short hash (first 10 hex digits of the SHA-256; checked).
    #[serde(default)]
    pub autov2: Option<String>,
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Models by name, paths resolved against the recipe directory.
    pub models: BTreeMap<String, (PathBuf, Option<String>)>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Nodes in dependency order.
    pub order: Vec<String>,
    /// The tokenizer generate nodes use (`tokenizer:`, resolved), if the recipe names one.
    pub tokenizer: Option<PathBuf>,
    /// The recipe file and the files it includes.
    pub sources: Vec<PathBuf>,
}

/// Reads and validates a recipe file.
pub fn load(path: &Path) -> Result<Recipe, RecipeErrors> {
    load_with(path, &[])
}

/// Reads and validates a recipe file, with `vars` overridden by `sets` (name, value).
pub fn load_with(path: &Path, sets: &[(String, String)]) -> Result<Recipe, RecipeErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeErrors::io(path, &e))?;
    parse_with(path, &text, sets)
}

/// Parses and validates recipe text (`path` names it in errors and anchors relative paths).
pub fn parse(path: &Path, text: &str) -> Result<Recipe, RecipeErrors> {
    parse_with(path, text, &[])
}

/// One parsed file of a recipe (the recipe itself or an include).
struct Part {
    file: RecipeFile,
    dir: PathBuf,
}

/// Parses `text` and, depth first, the files it includes, into `parts` (source index =
/// part index). `stack` holds the canonical paths being read, to report include cycles.
fn read_parts(
    path: &Path,
    text: &str,
    parts: &mut Vec<Option<Part>>,
    errs: &mut RecipeErrors,
    stack: &mut Vec<PathBuf>,
) {
    let me = parts.len();
    parts.push(None);
    let file: RecipeFile = match serde_saphyr::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            errs.extend(RecipeErrors::yaml(path, text, &e));
            return;
        }
    };
    if file.version.value != VERSION {
        errs.at(me).push(
            &file.version.referenced,
            format!(
                "unsupported recipe version {}; this mergesmith reads version {VERSION}",
                file.version.value
            ),
            None,
        );
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    stack.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
    for inc in &file.include {
        let target = dir.join(&inc.value);
        let canon = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
        if stack.contains(&canon) {
            let chain: Vec<String> = stack
                .iter()
                .chain(std::iter::once(&canon))
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            errs.at(me).push(
                &inc.referenced,
                format!("include cycle: {}", chain.join(" -> ")),
                None,
            );
            continue;
        }
        match std::fs::read_to_string(&target) {
            Ok(t) => {
                errs.add_source(&target, &t);
                read_parts(&target, &t, parts, errs, stack);
            }
            Err(e) => errs.at(me).push(
                &inc.referenced,
                format!("cannot read included recipe {}: {e}", target.display()),
                None,
            ),
        }
    }
    stack.pop();
    parts[me] = Some(Part { file, dir });
}

/// A declaration and the part (file) it comes from.
struct Declared<'a, T> {
    part: usize,
    decl: &'a Spanned<T>,
}

/// What ratio fields can refer to: presets, and vars (as declared or set on the command line).
struct RatioScope<'a> {
    presets: Presets,
    vars: BTreeMap<String, Declared<'a, RatioDecl>>,
    sets: BTreeMap<String, String>,
}

fn parse_with(path: &Path, text: &str, sets: &[(String, String)]) -> Result<Recipe, RecipeErrors> {
    let mut errs = RecipeErrors::new(path, text);
    let mut parts = Vec::new();
    read_parts(path, text, &mut parts, &mut errs, &mut Vec::new());
    if parts[0].is_none() {
        return Err(errs.finish().expect_err("the recipe did not parse"));
    }
    let parts: Vec<(usize, Part)> = parts
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
        .collect();
    let mut presets = Presets::default();
    let mut models_decl: BTreeMap<String, Declared<ModelDecl>> = BTreeMap::new();
    let mut nodes_decl: BTreeMap<String, Declared<NodeDecl>> = BTreeMap::new();
    let mut vars: BTreeMap<String, Declared<RatioDecl>> = BTreeMap::new();
    let mut defined_in: BTreeMap<String, usize> = BTreeMap::new();
    for (i, part) in &parts {
        for p in &part.file.presets {
            if let Err(e) = presets.add_file(&part.dir.join(p)) {
                errs.at(*i).push_plain(e.to_string());
            }
        }
        let mut declare =
            |name: &String, loc: &serde_saphyr::Location, errs: &mut RecipeErrors| match defined_in
                .get(name)
            {
                Some(j) if j != i => {
                    let first = errs.source_path(*j).display().to_string();
                    errs.at(*i).push(
                        loc,
                        format!("`{name}` is already declared in {first}"),
                        None,
                    );
                    false
                }
                _ => {
                    defined_in.insert(name.clone(), *i);
                    true
                }
            };
        for (name, m) in &part.file.models {
            if declare(name, &m.referenced, &mut errs) {
                models_decl.insert(name.clone(), Declared { part: *i, decl: m });
            }
        }
        for (name, n) in &part.file.nodes {
            if declare(name, &n.referenced, &mut errs) {
                nodes_decl.insert(name.clone(), Declared { part: *i, decl: n });
            }
        }
        for (name, v) in &part.file.vars {
            match vars.get(name) {
                Some(prev) if prev.part != *i => {
                    let prev_path = errs.source_path(prev.part).to_path_buf();
                    errs.at(*i).push(
                        &v.referenced,
                        format!(
                            "var `{name}` is already declared in {}",
                            prev_path.display()
                        ),
                        None,
                    );
                }
                _ => {
                    vars.insert(name.clone(), Declared { part: *i, decl: v });
                }
            }
        }
    }
    errs.at(0);
    let mut set_map = BTreeMap::new();
    for (name, value) in sets {
        if vars.contains_key(name) {
            set_map.insert(name.clone(), value.clone());
        } else {
            let near = crate::text::nearest(name, vars.keys().map(|s| s.as_str()));
            errs.push_plain(format!(
                "--set {name}=...: the recipe declares no var `{name}`{}",
                near.map(|n| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default()
            ));
        }
    }
    let scope = RatioScope {
        presets,
        vars,
        sets: set_map,
    };
    let dir_of = |i: usize| -> &Path {
        parts
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, p)| p.dir.as_path())
            .unwrap_or(Path::new(""))
    };
    let models: BTreeMap<String, (PathBuf, Option<String>)> = models_decl
        .iter()
        .map(|(name, m)| {
            let v = &m.decl.value;
            (
                name.clone(),
                (
                    dir_of(m.part).join(&v.path),
                    v.sha256.clone().or_else(|| v.autov2.clone()),
                ),
            )
        })
        .collect();
    for name in models_decl.keys().filter(|n| nodes_decl.contains_key(*n)) {
        let n = &nodes_decl[name];
        errs.at(n.part).push(
            &n.decl.referenced,
            format!("`{name}` is both a model and a node"),
            None,
        );
    }
    let names: Vec<&str> = models_decl
        .keys()
        .chain(nodes_decl.keys())
        .map(|s| s.as_str())
        .collect();
    let making = |what: Makes| -> BTreeSet<&str> {
        nodes_decl
            .iter()
            .filter(|(_, n)| {
                crate::nodes::kind_of(&n.decl.value)
                    .first()
                    .is_some_and(|k| k.makes == what)
            })
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let (lora_nodes, image_nodes) = (making(Makes::Lora), making(Makes::Images));
    let resolve = |r: &Spanned<String>, want: Want, errs: &mut RecipeErrors| -> Option<Input> {
        let found = if models_decl.contains_key(&r.value) {
            Input::Model(r.value.clone())
        } else if nodes_decl.contains_key(&r.value) {
            Input::Node(r.value.clone())
        } else {
            let near = crate::text::nearest(&r.value, names.iter().copied());
            errs.push(
                &r.referenced,
                format!("`{}` is not a model or node of this recipe", r.value),
                near.map(|n| format!("did you mean `{n}`?")),
            );
            return None;
        };
        let is_lora = found.node().is_some_and(|n| lora_nodes.contains(n));
        let wrong = match want {
            _ if found.node().is_some_and(|n| image_nodes.contains(n)) => Some(format!(
                "`{}` makes images, which nothing reads (its `to:` writes them out)",
                r.value
            )),
            Want::Any => None,
            Want::Checkpoint if is_lora => Some(format!(
                "`{}` makes a LoRA, not a checkpoint; bake it into one with a `lora` node",
                r.value
            )),
            Want::Lora if found.node().is_some() && !is_lora => Some(format!(
                "`{}` is a checkpoint node; this takes a LoRA: a file under `models`, or an \
                 `extract_lora` / `merge_loras` node",
                r.value
            )),
            _ => None,
        };
        match wrong {
            Some(msg) => {
                errs.push(&r.referenced, msg, None);
                None
            }
            None => Some(found),
        }
    };
    let mut nodes = BTreeMap::new();
    let mut sweeps = BTreeMap::new();
    for (name, declared) in &nodes_decl {
        let (decl, dir) = (declared.decl, dir_of(declared.part));
        errs.at(declared.part);
        let mut cx = Cx {
            errs: &mut errs,
            resolve: &resolve,
            scope: &scope,
            dir,
        };
        let node = node(name, decl, &mut cx);
        if let Some(n) = node {
            nodes.insert(name.clone(), n);
        } else if let Some(xy) = &decl.value.xy {
            let to = decl.value.to.as_ref().map(|t| dir.join(t));
            sweeps.insert(name.clone(), (declared.part, xy, to, decl.value.overwrite));
        }
    }
    bake_prompt_loras(&mut nodes);
    // Sweeps copy validated nodes into their cells.
    // A sweep's `pinpoint_blocks: ALL` names the blocks of its merge's family, read from the
    // header of model A where that is a safetensors file already there.
    let family_of = |model: &str| -> Option<crate::arch::Family> {
        let (path, _) = models.get(model)?;
        let safetensors = path.extension().is_some_and(|e| e == "safetensors");
        (safetensors && path.is_file())
            .then(|| crate::checkpoint::Checkpoint::open(path).ok())
            .flatten()
            .map(|ck| crate::arch::detect(ck.tensors()).family)
    };
    sweep::expand_all(&sweeps, &mut nodes, &scope, &resolve, &family_of, &mut errs);
    let order = match topo_order(&nodes) {
        Ok(o) => o,
        Err(cycle) => {
            let first = &nodes_decl[&cycle[0]];
            errs.at(first.part).push(
                &first.decl.referenced,
                format!("nodes form a cycle: {}", cycle.join(" -> ")),
                None,
            );
            Vec::new()
        }
    };
    let errs_files = errs.files();
    errs.finish()?;
    let tokenizer = parts
        .iter()
        .find_map(|(i, p)| p.file.tokenizer.as_ref().map(|t| dir_of(*i).join(t)));
    Ok(Recipe {
        path: path.to_path_buf(),
        models,
        nodes,
        order,
        tokenizer,
        sources: errs_files,
    })
}

/// Gives each generate node whose prompt names LoRAs (`<lora:NAME:W>`) a `NODE.loras` node
/// that bakes them into its model (kept in memory, like A1111 applying them for the image), and
/// makes the generate node read it.
fn bake_prompt_loras(nodes: &mut BTreeMap<String, Node>) {
    let names: Vec<String> = nodes
        .iter()
        .filter(|(_, n)| matches!(n, Node::Generate(g) if !g.loras.is_empty()))
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let baked = format!("{name}.loras");
        let Some(Node::Generate(g)) = nodes.get_mut(&name) else {
            continue;
        };
        let node = crate::nodes::lora::LoraNode {
            input: std::mem::replace(&mut g.model, Input::Node(baked.clone())),
            loras: std::mem::take(&mut g.loras),
            fill: 0.0,
            allow_unmatched: false,
            memory: true,
        };
        nodes.insert(baked, Node::Lora(node));
    }
}

/// Validates one node declaration: exactly one kind key, only the fields that kind takes,
/// then the kind's own checks.
fn node(name: &str, decl: &Spanned<NodeDecl>, cx: &mut Cx) -> Option<Node> {
    let d = &decl.value;
    let kinds = crate::nodes::kind_of(d);
    let Some(&kind) = kinds.first() else {
        let usages: Vec<&str> = KINDS.iter().map(|k| k.usage).collect();
        let (last, rest) = usages.split_last().expect("kinds are registered");
        cx.error(
            &decl.referenced,
            format!("node `{name}` needs one of {} or {last}", rest.join(", ")),
            None,
        );
        return None;
    };
    if kinds.len() > 1 {
        let names: Vec<&str> = kinds.iter().map(|k| k.name).collect();
        cx.error(
            &decl.referenced,
            format!(
                "node `{name}` is more than one of {}; split it",
                names.join(", ")
            ),
            None,
        );
        return None;
    }
    let stray: Vec<&str> = set_fields(d)
        .into_iter()
        .filter(|f| !kind.fields.contains(f))
        .collect();
    if !stray.is_empty() {
        cx.error(
            &decl.referenced,
            format!(
                "{} node `{name}` takes no `{}`",
                kind.name,
                stray.join("`, `")
            ),
            kind.hint.map(String::from),
        );
    }
    (kind.parse)(name, decl, cx)
}

/// What a reference resolves against (with the errors it reports).
type Resolver<'a> = dyn Fn(&Spanned<String>, Want, &mut RecipeErrors) -> Option<Input> + 'a;

/// What node kinds validate through while the recipe is read: its references, ratios (vars,
/// presets) and paths, and its errors.
struct Cx<'a, 'e> {
    errs: &'e mut RecipeErrors,
    resolve: &'a Resolver<'a>,
    scope: &'a RatioScope<'a>,
    dir: &'a Path,
}

impl ParseCx for Cx<'_, '_> {
    fn error(&mut self, at: &serde_saphyr::Location, message: String, help: Option<String>) {
        self.errs.push(at, message, help);
    }

    fn resolve(&mut self, r: &Spanned<String>, want: Want) -> Option<Input> {
        (self.resolve)(r, want, self.errs)
    }

    fn ratio(&mut self, r: &Spanned<RatioDecl>) -> Option<Ratio> {
        ratio(r, self.scope, self.errs)
    }

    fn path(&self, written: &str) -> PathBuf {
        self.dir.join(written)
    }
}

/// Resolves a ratio field: a value, or `$name` for a var (declared, or set on the command
/// line); errors point at the field, or at the var's own value when that is what is wrong.
fn ratio(r: &Spanned<RatioDecl>, scope: &RatioScope, errs: &mut RecipeErrors) -> Option<Ratio> {
    if let RatioDecl::Text(t) = &r.value {
        if let Some(name) = t.trim().strip_prefix('$') {
            if let Some(value) = scope.sets.get(name) {
                return match Ratio::parse(value, &scope.presets) {
                    Ok(ratio) => Some(ratio),
                    Err(e) => {
                        errs.push_plain(format!("--set {name}={value}: {e}"));
                        None
                    }
                };
            }
            let Some(var) = scope.vars.get(name) else {
                let near = crate::text::nearest(name, scope.vars.keys().map(|s| s.as_str()));
                errs.push(
                    &r.referenced,
                    format!("no var `{name}` in this recipe"),
                    near.map(|n| format!("did you mean `${n}`?")),
                );
                return None;
            };
            if matches!(&var.decl.value, RatioDecl::Text(v) if v.trim().starts_with('$')) {
                errs.push(
                    &r.referenced,
                    format!("var `{name}` refers to another var; give it a value"),
                    None,
                );
                return None;
            }
            let back = errs.current();
            let resolved = ratio(var.decl, scope, errs.at(var.part));
            errs.at(back);
            return resolved;
        }
    }
    let parsed = match &r.value {
        RatioDecl::Number(v) => Ok(Ratio::Scalar(*v)),
        RatioDecl::List(v) => Ok(Ratio::Blocks(v.clone())),
        RatioDecl::Text(t) => Ratio::parse(t, &scope.presets),
    };
    match parsed {
        Ok(Ratio::Scalar(v)) if !(-10.0..=10.0).contains(&v) => {
            errs.push(
                &r.referenced,
                format!("ratio {v} is out of range (-10 to 10)"),
                None,
            );
            None
        }
        Ok(ratio) => Some(ratio),
        Err(e) => {
            errs.push(&r.referenced, e.to_string(), None);
            None
        }
    }
}

/// Dependency order, or the nodes of a cycle.
fn topo_order(nodes: &BTreeMap<String, Node>) -> Result<Vec<String>, Vec<String>> {
    use petgraph::stable_graph::StableDiGraph;
    let mut g: StableDiGraph<&str, ()> = StableDiGraph::new();
    let idx: BTreeMap<&str, _> = nodes
        .keys()
        .map(|n| (n.as_str(), g.add_node(n.as_str())))
        .collect();
    for (name, node) in nodes {
        for dep in node.node_inputs() {
            if let Some(&d) = idx.get(dep) {
                g.add_edge(d, idx[name.as_str()], ());
            }
        }
    }
    match petgraph::algo::toposort(&g, None) {
        Ok(order) => Ok(order.into_iter().map(|i| g[i].to_string()).collect()),
        Err(cycle) => {
            // Walk back from the reported node to list the cycle.
            let start = cycle.node_id();
            let mut path = vec![g[start].to_string()];
            let mut cur = start;
            for _ in 0..nodes.len() {
                let next = g
                    .neighbors_directed(cur, petgraph::Direction::Outgoing)
                    .find(|n| petgraph::algo::has_path_connecting(&g, *n, start, None));
                match next {
                    Some(n) if n == start => break,
                    Some(n) => {
                        path.push(g[n].to_string());
                        cur = n;
                    }
                    None => break,
                }
            }
            // Start the cycle at its alphabetically first node, so the report is stable.
            let first = (0..path.len()).min_by_key(|&i| &path[i]).unwrap_or(0);
            path.rotate_left(first);
            path.push(path[0].clone());
            Err(path)
        }
    }
}

/// The JSON Schema of recipe files, as written to `schema/recipe.v1.json`.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(RecipeFile);
    serde_json::to_string_pretty(&schema).expect("schemas serialize") + "\n"
}
