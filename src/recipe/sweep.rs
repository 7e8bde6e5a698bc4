//! `xy` nodes: XY(Z) sweeps as SuperMerger plots them (supermerger.md §5), expanded at parse
//! time into ordinary nodes. Every cell is a copy of the swept `generate` node (and of the
//! nodes between it and the merge node that merge axes change) with the cell's axis values
//! applied, named `SWEEP.N.NODE`; cells share cached results through their content keys like
//! any other node, so a seed axis merges once and a pinpoint-blocks axis recomputes one block
//! per cell. The `xy` node itself depends on every cell and assembles the grids.
//!
//! Values are a YAML list (one value per item) or SuperMerger's text: comma-separated, or one
//! per line for vectors, prompts and adjust, blank-line-separated for elemental. A `|` in a
//! text splits the axis into parts; every combination of parts is its own set of grids.

use std::collections::{BTreeMap, BTreeSet};

use serde_saphyr::Spanned;

use super::{RatioScope, RecipeErrors, Resolver};
use crate::arch::Family;
use crate::merge::dice::{Dice, Draw};
use crate::merge::select::sd_list;
use crate::merge::{FilterSpec, Ratio};
use crate::nodes::generate::GenerateNode;
use crate::nodes::lora::LoraNode;
use crate::nodes::merge::MergeNode;
use crate::nodes::merge_list::ListNode;
use crate::nodes::xy::{AxisDecl, AxisKind, AxisValue, AxisValues, Grid, XyDecl, XyNode};
use crate::nodes::{Input, Node, Want};

impl AxisKind {
    /// Its name, as written.
    pub fn label(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn changes_lora(self) -> bool {
        matches!(self, AxisKind::LoraStrength | AxisKind::LoraBlocks)
    }

    /// Whether it gives its value to the alpha axis' target (the alpha axis then does not
    /// change alpha itself).
    fn pinpoints(self) -> bool {
        matches!(
            self,
            AxisKind::PinpointBlocks
                | AxisKind::PinpointElement
                | AxisKind::PinpointElementExt
                | AxisKind::Effective
                | AxisKind::PinpointAdjust
        )
    }

    fn changes_merge(self) -> bool {
        !self.changes_lora()
            && !matches!(
                self,
                AxisKind::Model
                    | AxisKind::Seed
                    | AxisKind::Prompt
                    | AxisKind::Prompt2
                    | AxisKind::Prompt3
                    | AxisKind::Negative
                    | AxisKind::Steps
                    | AxisKind::Cfg
                    | AxisKind::Guidance
                    | AxisKind::Sampler
                    | AxisKind::Schedule
                    | AxisKind::Noise
                    | AxisKind::Emphasis
                    | AxisKind::ClipSkip
                    | AxisKind::Width
                    | AxisKind::Height
            )
    }

    /// How a text value splits into values.
    fn separator(self) -> Sep {
        match self {
            AxisKind::MbwAlpha
            | AxisKind::MbwBeta
            | AxisKind::MbwAlphaAndBeta
            | AxisKind::Prompt
            | AxisKind::Negative
            | AxisKind::Adjust
            | AxisKind::LoraBlocks => Sep::Line,
            AxisKind::Elemental | AxisKind::AddElemental | AxisKind::Prompt2 => Sep::BlankLine,
            AxisKind::Prompt3 => Sep::Whole,
            AxisKind::PinpointElement | AxisKind::PinpointElementExt | AxisKind::Effective => {
                Sep::CommaOrLine
            }
            _ => Sep::Comma,
        }
    }
}

enum Sep {
    Whole,
    Comma,
    CommaOrLine,
    Line,
    BlankLine,
}

/// A parsed axis value.
#[derive(Debug, Clone, PartialEq)]
enum Setting {
    Alpha(Ratio),
    Beta(Ratio),
    AlphaBeta(Ratio, Ratio),
    Model(usize, Input),
    /// The checkpoint the generate node reads.
    GenModel(Input),
    Pinpoint(String),
    Include(String),
    Exclude(String),
    /// Blocks added to the merge's own list, as Include (`true`) or Exclude.
    AddFilter(bool, String),
    Elemental(String),
    AddElemental(String),
    /// A `blocks:elements` item (`true`: blocks named from the extended list); `None`: the
    /// effective checker's baseline.
    PinpointElement(Option<String>, bool),
    PinpointAdjust(Vec<usize>),
    LoraStrength(f64),
    LoraBlocks(String),
    /// Cell `i` of a random axis of seed `seed`.
    Random(u64, u64),
    Adjust([f64; 8]),
    Calcmode(crate::merge::CalcMode),
    Seed(u64),
    Prompt(String),
    Negative(String),
    Steps(usize),
    Cfg(f64),
    Guidance(f64),
    Sampler(crate::gen::sampler::Sampler),
    Schedule(crate::gen::sampler::ScheduleKind),
    Noise(crate::gen::noise::NoiseSource),
    Emphasis(crate::gen::prompt::Emphasis),
    ClipSkip(usize),
    Width(usize),
    Height(usize),
    /// A list method's parameter.
    Param(String, crate::merge::method::Written),
}

/// What `path: NODE.FIELD` axes can change, for errors.
const PATH_FIELDS: &str = "merge: alpha, beta, calcmode, elemental, adjust, a, b, c, include, exclude; list methods: any parameter (density, t, parameters.seed...); lora: strength, blocks; generate: model, seed, prompt, negative, steps, cfg, guidance, sampler, schedule, noise, emphasis, clip_skip, width, height";

/// One parsed axis: its kind, the node it names (if any) and, per part, (label, setting)
/// values.
struct Axis {
    kind: AxisKind,
    node: Option<Spanned<String>>,
    parts: Vec<Vec<(String, Setting)>>,
}

impl Axis {
    /// The list-method parameter a `parameter` axis sets.
    fn param(&self) -> Option<&str> {
        self.parts.iter().flatten().find_map(|(_, s)| match s {
            Setting::Param(p, _) => Some(p.as_str()),
            _ => None,
        })
    }
}

/// Reads the `xy` nodes (after every other node is validated) and adds their cells and the
/// sweep nodes to `nodes`.
/// Sweeps by name: (source part, declaration, `to`, `overwrite`).
pub(super) type SweepDecls<'a> =
    BTreeMap<String, (usize, &'a Spanned<XyDecl>, Option<std::path::PathBuf>, bool)>;

pub(super) fn expand_all(
    decls: &SweepDecls,
    nodes: &mut BTreeMap<String, Node>,
    scope: &RatioScope,
    resolve: &Resolver,
    family_of: &dyn Fn(&str) -> Option<Family>,
    errs: &mut RecipeErrors,
) {
    for (name, (part, decl, to, overwrite)) in decls {
        errs.at(*part);
        if let Some(grids) = expand(name, decl, nodes, scope, resolve, family_of, errs) {
            nodes.insert(
                name.clone(),
                Node::Xy(XyNode {
                    grids,
                    to: to.clone(),
                    overwrite: *overwrite,
                }),
            );
        }
    }
}

/// The family of what a node merges: model A's (through merges and LoRA nodes), when its
/// header can be read.
fn family_through(
    nodes: &BTreeMap<String, Node>,
    mut input: Input,
    family_of: &dyn Fn(&str) -> Option<Family>,
) -> Option<Family> {
    for _ in 0..nodes.len() + 1 {
        input = match input {
            Input::Model(m) => return family_of(&m),
            Input::Node(n) => match nodes.get(&n)? {
                Node::Merge(m) => m.inputs.first()?.clone(),
                Node::MergeList(l) => l.read.first()?.clone(),
                Node::Lora(l) => l.input.clone(),
                _ => return None,
            },
        };
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn expand(
    name: &str,
    decl: &Spanned<XyDecl>,
    nodes: &mut BTreeMap<String, Node>,
    scope: &RatioScope,
    resolve: &Resolver,
    family_of: &dyn Fn(&str) -> Option<Family>,
    errs: &mut RecipeErrors,
) -> Option<Vec<Grid>> {
    let d = &decl.value;
    let gen_name = &d.generate.value;
    if !matches!(nodes.get(gen_name), Some(Node::Generate(_))) {
        errs.push(
            &d.generate.referenced,
            format!("`{gen_name}` is not a generate node of this recipe"),
            None,
        );
        return None;
    }
    let declared: Vec<(&str, &Spanned<AxisDecl>)> =
        [("x", Some(&d.x)), ("y", d.y.as_ref()), ("z", d.z.as_ref())]
            .into_iter()
            .filter_map(|(n, a)| a.map(|a| (n, a)))
            .collect();
    // The family of the merge an axis changes (for `pinpoint_blocks: ALL`).
    let family = |node: Option<&str>| -> Option<Family> {
        let start = match node.or(d.merge.as_ref().map(|m| m.value.as_str())) {
            Some(n) => Input::Node(n.to_string()),
            None => match nodes.get(gen_name) {
                Some(Node::Generate(g)) => g.model.clone(),
                _ => return None,
            },
        };
        family_through(nodes, start, family_of)
    };
    let mut axes = Vec::new();
    for (_, a) in &declared {
        // Only `pinpoint_blocks` asks (a header read).
        let f = (a.value.kind == Some(AxisKind::PinpointBlocks))
            .then(|| family(a.value.node.as_ref().map(|n| n.value.as_str())))
            .flatten();
        axes.push(parse_axis(a, scope, resolve, f, errs)?);
    }
    // Rules: two axes of one type make no grid (add_elemental aside); pinpointing needs an
    // alpha (or beta) axis for the value.
    for i in 0..axes.len() {
        for j in i + 1..axes.len() {
            // Parameter axes are the same only when they name the same node and parameter.
            let node = |a: &Axis| a.node.as_ref().map(|n| n.value.clone());
            let same_param = |a: &Axis, b: &Axis| {
                a.kind != AxisKind::Parameter || (node(a), a.param()) == (node(b), b.param())
            };
            if axes[i].kind == axes[j].kind
                && axes[i].kind != AxisKind::AddElemental
                && same_param(&axes[i], &axes[j])
            {
                errs.push(
                    &declared[j].1.referenced,
                    format!(
                        "axes {} and {} both sweep {}",
                        declared[i].0,
                        declared[j].0,
                        axes[i].kind.label()
                    ),
                    None,
                );
                return None;
            }
        }
    }
    let kinds: Vec<AxisKind> = axes.iter().map(|a| a.kind).collect();
    let pinpointing: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i].pinpoints()).collect();
    if pinpointing.len() > 1 {
        errs.push(
            &declared[pinpointing[1]].1.referenced,
            "one pinpointing axis per sweep".into(),
            None,
        );
        return None;
    }
    if let Some(&p) = pinpointing.first() {
        let value_axis = match kinds[p] {
            AxisKind::PinpointBlocks => kinds
                .iter()
                .position(|k| matches!(k, AxisKind::Alpha | AxisKind::Beta)),
            _ => kinds.iter().position(|k| *k == AxisKind::Alpha),
        };
        let Some(v) = value_axis else {
            let what = match kinds[p] {
                AxisKind::PinpointBlocks => "an alpha (or beta) axis",
                _ => "an alpha axis",
            };
            errs.push(
                &declared[p].1.referenced,
                format!(
                    "{} needs {what} giving the pinpointed value",
                    kinds[p].label()
                ),
                None,
            );
            return None;
        };
        if kinds[p] == AxisKind::Effective && axes[v].parts.iter().any(|part| part.len() != 1) {
            errs.push(
                &declared[v].1.referenced,
                "the effective checker's alpha axis takes one value".into(),
                None,
            );
            return None;
        }
    }
    if kinds.contains(&AxisKind::Effective) && kinds[0] != AxisKind::Effective {
        errs.push(
            &declared[0].1.referenced,
            "the effective checker is the X axis".into(),
            None,
        );
        return None;
    }
    // Each axis changes one node: its `node`, else the sweep's merge node (`merge:`, else
    // the merge the generate node reads) for merge axes, the `lora` node the generate node
    // reads for LoRA axes, the generate node itself for generation parameters.
    let read_by_gen = |want: fn(&Node) -> bool| -> Option<String> {
        match nodes.get(gen_name) {
            Some(Node::Generate(GenerateNode { model, .. })) => model
                .node()
                .filter(|m| nodes.get(*m).is_some_and(want))
                .map(String::from),
            _ => None,
        }
    };
    let is_merge = |n: &Node| matches!(n, Node::Merge(_) | Node::MergeList(_));
    let is_lora = |n: &Node| matches!(n, Node::Lora(_));
    let mut targets = Vec::new();
    for (ax, (_, at)) in axes.iter().zip(&declared) {
        let (what, want, default): (&str, fn(&Node) -> bool, Option<String>) =
            if ax.kind.changes_lora() {
                ("a `lora` node", is_lora, read_by_gen(is_lora))
            } else if ax.kind.changes_merge() {
                let default = match &d.merge {
                    Some(m) => Some(m.value.clone()),
                    None => read_by_gen(is_merge),
                };
                ("a merge node", is_merge, default)
            } else {
                let gen = |n: &Node| matches!(n, Node::Generate(_));
                ("the swept generate node", gen, Some(gen_name.clone()))
            };
        let (target, place) = match &ax.node {
            Some(n) => (Some(n.value.clone()), &n.referenced),
            None => (default, &at.referenced),
        };
        let Some(target) = target.filter(|t| nodes.get(t).is_some_and(want)) else {
            let hint = match &ax.node {
                Some(n) => format!("`{}` is not {what}", n.value),
                None => format!(
                    "{} changes {what}, and `{gen_name}` does not read one directly: name it with `node:` (or `merge:` on the sweep)",
                    ax.kind.label()
                ),
            };
            errs.push(place, hint, None);
            return None;
        };
        // List merges take `path: NODE.PARAM` axes of their method's parameters; SuperMerger
        // merges take the other merge axes.
        let mismatch = match (&nodes[&target], ax.param()) {
            (Node::Merge(_), Some(p)) => Some((
                format!("`{p}` is not a parameter a sweep can change"),
                Some(PATH_FIELDS.to_string()),
            )),
            (Node::MergeList(l), Some(p)) if l.spec.method.param(p).is_none() => Some((
                format!(
                    "`{p}` is not a parameter of {} (it takes {})",
                    l.spec.method.name,
                    l.spec
                        .method
                        .params
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            )),
            (Node::MergeList(l), None) if ax.kind.changes_merge() => Some((
                format!(
                    "`{target}` is a {} merge: sweep its parameters with `path: {target}.PARAM`",
                    l.spec.method.name
                ),
                None,
            )),
            _ => None,
        };
        if let Some((message, help)) = mismatch {
            errs.push(place, message, help);
            return None;
        }
        if !ax.kind.changes_merge() && !ax.kind.changes_lora() && target != *gen_name {
            errs.push(
                place,
                format!(
                    "{} changes the swept generate node `{gen_name}`",
                    ax.kind.label()
                ),
                None,
            );
            return None;
        }
        targets.push(target);
    }
    if let Some(&p) = pinpointing.first() {
        if let Some(v) = kinds
            .iter()
            .position(|k| matches!(k, AxisKind::Alpha | AxisKind::Beta))
        {
            if targets[p] != targets[v] {
                errs.push(
                    &declared[v].1.referenced,
                    format!(
                        "the pinpointed value must go to `{}`, the node {} changes",
                        targets[p],
                        kinds[p].label()
                    ),
                    None,
                );
                return None;
            }
        }
    }
    let roots: Vec<&str> = targets
        .iter()
        .filter(|t| *t != gen_name)
        .map(String::as_str)
        .collect();
    let chain = chain(nodes, gen_name, &roots);
    if let Some(r) = roots.iter().find(|r| !chain.iter().any(|c| c == *r)) {
        errs.push(
            &decl.referenced,
            format!("`{gen_name}` does not read `{r}`, which an axis changes"),
            None,
        );
        return None;
    }
    let merge_name = targets
        .iter()
        .zip(&kinds)
        .find(|(_, k)| k.changes_merge())
        .map(|(t, _)| t.clone())
        .or_else(|| d.merge.as_ref().map(|m| m.value.clone()))
        .or_else(|| read_by_gen(is_merge));
    let header = header(nodes, merge_name.as_deref(), gen_name, &kinds);
    let mut grids = Vec::new();
    let mut cell_index = 0usize;
    let part_counts: Vec<usize> = axes.iter().map(|a| a.parts.len()).collect();
    let combos = combinations(&part_counts);
    let several_parts = combos.len() > 1;
    for (pi, combo) in combos.iter().enumerate() {
        let x = &axes[0].parts[combo[0]];
        let y = axes.get(1).map(|a| &a.parts[combo[1]]);
        let z = axes.get(2).map(|a| &a.parts[combo[2]]);
        let z_values: Vec<Option<&(String, Setting)>> = match z {
            Some(z) => z.iter().map(Some).collect(),
            None => vec![None],
        };
        for (zi, zv) in z_values.iter().enumerate() {
            let mut cells = Vec::new();
            let rows: Vec<Option<&(String, Setting)>> = match y {
                Some(y) => y.iter().map(Some).collect(),
                None => vec![None],
            };
            for yv in &rows {
                for xv in x {
                    let settings: Vec<(&str, &Setting)> = [Some(xv), *yv, *zv]
                        .into_iter()
                        .zip(&targets)
                        .filter_map(|(v, t)| v.map(|(_, s)| (t.as_str(), s)))
                        .collect();
                    let prefix = format!("{name}.{cell_index}.");
                    cell_index += 1;
                    match make_cell(nodes, &chain, &prefix, &settings) {
                        Ok(cell) => cells.push(cell),
                        Err(e) => {
                            errs.push(&decl.referenced, format!("xy node `{name}`: {e}"), None);
                            return None;
                        }
                    }
                }
            }
            let mut grid_name = name.to_string();
            if several_parts {
                grid_name.push_str(&format!("-part{}", pi + 1));
            }
            if z.is_some() {
                grid_name.push_str(&format!("-z{zi}"));
            }
            let first_prefixed = |kind: AxisKind, labels: Vec<String>| -> Vec<String> {
                labels
                    .into_iter()
                    .enumerate()
                    .map(|(i, l)| {
                        if i == 0 {
                            format!("{} = {l}", kind.label())
                        } else {
                            l
                        }
                    })
                    .collect()
            };
            grids.push(Grid {
                name: grid_name,
                header: header.clone(),
                x_labels: first_prefixed(axes[0].kind, x.iter().map(|(l, _)| l.clone()).collect()),
                y_labels: match (y, axes.get(1)) {
                    (Some(y), Some(a)) => {
                        first_prefixed(a.kind, y.iter().map(|(l, _)| l.clone()).collect())
                    }
                    _ => vec![String::new()],
                },
                z_label: zv.map(|(l, _)| format!("{} = {l}", axes[2].kind.label())),
                cells,
                effective: kinds.contains(&AxisKind::Effective),
            });
        }
    }
    Some(grids)
}

/// Every combination of part indices, the first axis fastest.
fn combinations(counts: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &n in counts {
        out = (0..n)
            .flat_map(|i| {
                out.iter().map(move |c| {
                    let mut c = c.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
    }
    out
}

/// The nodes a cell copies: the generate node, plus every node on a path from one of the
/// `roots` (the nodes axes change) to it, in no particular order.
fn chain(nodes: &BTreeMap<String, Node>, gen: &str, roots: &[&str]) -> Vec<String> {
    if roots.is_empty() {
        return vec![gen.to_string()];
    }
    // Whether a node (transitively) reads a root, memoized.
    fn reads(
        nodes: &BTreeMap<String, Node>,
        n: &str,
        roots: &[&str],
        memo: &mut BTreeMap<String, bool>,
    ) -> bool {
        if roots.contains(&n) {
            return true;
        }
        if let Some(&r) = memo.get(n) {
            return r;
        }
        let r = nodes.get(n).is_some_and(|node| {
            node.node_inputs()
                .iter()
                .any(|i| reads(nodes, i, roots, memo))
        });
        memo.insert(n.to_string(), r);
        r
    }
    let mut memo = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut stack = vec![gen.to_string()];
    while let Some(n) = stack.pop() {
        if reads(nodes, &n, roots, &mut memo) && out.insert(n.clone()) {
            if let Some(node) = nodes.get(&n) {
                stack.extend(node.node_inputs().into_iter().map(String::from));
            }
        }
    }
    out.insert(gen.to_string());
    out.into_iter().collect()
}

/// Copies the chain under `prefix` with `settings` (each for its target node) applied;
/// returns the cell's generate node.
fn make_cell(
    nodes: &mut BTreeMap<String, Node>,
    chain: &[String],
    prefix: &str,
    settings: &[(&str, &Setting)],
) -> Result<String, String> {
    let renamed = |n: &str| match chain.iter().any(|c| c == n) {
        true => format!("{prefix}{n}"),
        false => n.to_string(),
    };
    let mut gen_name = String::new();
    let mut copies = Vec::new();
    for n in chain {
        let mut node = nodes[n].clone();
        node.rename_inputs(&renamed);
        let mine: Vec<&Setting> = settings
            .iter()
            .filter(|(t, _)| t == n)
            .map(|(_, s)| *s)
            .collect();
        match &mut node {
            Node::Merge(MergeNode { inputs, spec, .. }) => {
                if let Some(Setting::Param(p, _)) =
                    mine.iter().find(|s| matches!(s, Setting::Param(..)))
                {
                    return Err(format!(
                        "`{n}` is a SuperMerger merge; `{p}` is swept with its own axis type (alpha, beta, calcmode...)"
                    ));
                }
                apply_merge(inputs, spec, &mine)?
            }
            Node::MergeList(ListNode { spec, .. }) => {
                for s in &mine {
                    match s {
                        Setting::Param(p, w) => spec
                            .method
                            .set_param(&mut spec.params, p, w, &crate::merge::Presets::default())
                            .map_err(|e| format!("`{n}`: {e}"))?,
                        _ => {
                            return Err(format!(
                                "`{n}` is a {} merge: sweep its parameters with `path: {n}.PARAM`",
                                spec.method.name
                            ))
                        }
                    }
                }
            }
            Node::Lora(LoraNode { loras, .. }) => {
                for s in &mine {
                    for l in loras.iter_mut() {
                        match s {
                            Setting::LoraStrength(v) => l.strength = *v,
                            Setting::LoraBlocks(b) => l.blocks = Some(b.clone()),
                            _ => {}
                        }
                    }
                }
            }
            Node::Generate(GenerateNode { job, to, model, .. }) => {
                for s in &mine {
                    if let Setting::GenModel(input) = s {
                        *model = input.clone();
                    }
                }
                apply_job(job, &mine);
                *to = None;
                gen_name = renamed(n);
            }
            _ => {}
        }
        copies.push((renamed(n), node));
    }
    nodes.extend(copies);
    Ok(gen_name)
}

fn apply_merge(
    inputs: &mut Vec<Input>,
    spec: &mut crate::merge::MergeSpec,
    settings: &[&Setting],
) -> Result<(), String> {
    let pinpoint = settings.iter().find_map(|s| match s {
        Setting::Pinpoint(p) => Some(p.clone()),
        _ => None,
    });
    let element = settings.iter().find_map(|s| match s {
        Setting::PinpointElement(e, _) => Some(e.clone()),
        _ => None,
    });
    // SuperMerger's "use extended XL": elemental names from SDXL's extended list.
    if settings
        .iter()
        .any(|s| matches!(s, Setting::PinpointElement(_, true)))
    {
        const EXTENDED: &str = "extended";
        match spec.block_list.as_deref() {
            None | Some(EXTENDED) => spec.block_list = Some(EXTENDED.into()),
            Some(other) => {
                return Err(format!(
                    "pinpoint_element_ext names blocks from the extended list; the merge reads block list `{other}`"
                ))
            }
        }
    }
    let adjust_slots = settings.iter().find_map(|s| match s {
        Setting::PinpointAdjust(slots) => Some(slots.clone()),
        _ => None,
    });
    for s in settings {
        match s {
            Setting::Alpha(r) if element.is_some() || adjust_slots.is_some() => {
                let Ratio::Scalar(v) = r else {
                    return Err("a pinpointed value is one number, not a vector".into());
                };
                if let Some(Some(item)) = &element {
                    let base = spec.elemental.take().unwrap_or_default();
                    let entry = format!("{item}:{v}");
                    spec.elemental = Some(match base.trim().is_empty() {
                        true => entry,
                        false => format!("{base}\n{entry}"),
                    });
                }
                if let Some(slots) = &adjust_slots {
                    let mut a = spec.adjust.unwrap_or([0.0; 8]);
                    for &i in slots {
                        a[i] = *v;
                    }
                    spec.adjust = Some(a);
                }
            }
            Setting::Alpha(r) => match &pinpoint {
                Some(p) => spec.alpha = pinpointed(&spec.alpha, p, r)?,
                None => spec.alpha = r.clone(),
            },
            Setting::Beta(r) => match (&pinpoint, &spec.beta) {
                (Some(p), Some(base)) => spec.beta = Some(pinpointed(base, p, r)?),
                (Some(_), None) => return Err("pinpointing beta needs the merge's beta".into()),
                (None, _) => spec.beta = Some(r.clone()),
            },
            Setting::AlphaBeta(a, b) => {
                spec.alpha = a.clone();
                spec.beta = Some(b.clone());
            }
            Setting::Random(i, seed) => {
                spec.alpha = random_alpha(&spec.alpha, spec.dice.as_ref(), *i, *seed)?
            }
            Setting::Model(i, input) => match inputs.get_mut(*i) {
                Some(slot) => *slot = input.clone(),
                None => return Err(format!("the merge has no model {}", ["A", "B", "C"][*i])),
            },
            Setting::Include(b) | Setting::Exclude(b) => {
                spec.filter = Some(FilterSpec {
                    mode: match s {
                        Setting::Include(_) => crate::merge::select::FilterMode::Include,
                        _ => crate::merge::select::FilterMode::Exclude,
                    },
                    blocks: b.clone(),
                    elements: String::new(),
                })
            }
            Setting::AddFilter(include, b) => {
                use crate::merge::select::FilterMode;
                let own = spec.filter.take();
                let blocks = match own.as_ref().map(|f| f.blocks.trim()) {
                    Some(o) if !o.is_empty() => format!("{o} {b}"),
                    _ => b.clone(),
                };
                spec.filter = Some(FilterSpec {
                    mode: if *include {
                        FilterMode::Include
                    } else {
                        FilterMode::Exclude
                    },
                    blocks,
                    elements: own.map(|f| f.elements).unwrap_or_default(),
                });
            }
            Setting::Elemental(e) => spec.elemental = Some(e.clone()),
            Setting::AddElemental(e) => {
                let base = spec.elemental.take().unwrap_or_default();
                spec.elemental = Some(match base.trim().is_empty() {
                    true => e.clone(),
                    false => format!("{base}\n{e}"),
                });
            }
            Setting::Adjust(a) => spec.adjust = Some(*a),
            Setting::Calcmode(c) => spec.calcmode = *c,
            _ => {}
        }
    }
    as_supermerger_plots(inputs, spec, settings);
    Ok(())
}

/// What SuperMerger's XY plot does with a cell its mode cannot take: a swept beta on a mode
/// without one runs as sum twice; trainDifference or extract on a mode other than add
/// difference runs as add difference. A mode that now reads model C takes model A as C when
/// the merge has none (SuperMerger's "substituting empty model_c with model_a").
fn as_supermerger_plots(
    inputs: &mut Vec<Input>,
    spec: &mut crate::merge::MergeSpec,
    settings: &[&Setting],
) {
    use crate::merge::{CalcMode, Mode};
    let beta_swept = settings
        .iter()
        .any(|s| matches!(s, Setting::Beta(_) | Setting::AlphaBeta(..)));
    if beta_swept && !spec.mode.uses_beta() && !spec.calcmode.uses_beta() {
        spec.mode = Mode::SumTwice;
    }
    let calc_swept = settings.iter().any(|s| matches!(s, Setting::Calcmode(_)));
    let needs_add = matches!(spec.calcmode, CalcMode::TrainDifference | CalcMode::Extract);
    if calc_swept && needs_add && spec.mode != Mode::AddDifference {
        spec.mode = Mode::AddDifference;
        if !spec.calcmode.uses_beta() {
            spec.beta = None;
        }
    }
    if spec.mode.uses_c() && inputs.len() == 2 {
        let a = inputs[0].clone();
        inputs.push(a);
    }
}

fn apply_job(job: &mut crate::gen::job::Job, settings: &[&Setting]) {
    for s in settings {
        match s {
            Setting::Seed(v) => job.seed = *v,
            Setting::Prompt(p) => job.prompt = p.clone(),
            Setting::Negative(p) => job.negative = p.clone(),
            Setting::Steps(v) => job.steps = *v,
            Setting::Cfg(v) => job.cfg = *v,
            Setting::Guidance(v) => job.guidance = Some(*v),
            Setting::Sampler(v) => job.sampler = *v,
            Setting::Schedule(v) => job.schedule = Some(*v),
            Setting::Noise(v) => job.noise = *v,
            Setting::Emphasis(v) => job.emphasis = *v,
            Setting::ClipSkip(v) => job.clip_skip = *v,
            Setting::Width(v) => job.width = Some(*v),
            Setting::Height(v) => job.height = Some(*v),
            _ => {}
        }
    }
}

/// Cell `i` of a random axis: SuperMerger's "R" on every block of alpha, drawn with dice seed
/// `seed + i` (mod 2³²) and the merge's dice limits and rounding (SuperMerger's defaults
/// without `dice:`), so SuperMerger given that seed draws the same weights.
fn random_alpha(base: &Ratio, dice: Option<&Dice>, i: u64, seed: u64) -> Result<Ratio, String> {
    let n = match base {
        Ratio::Blocks(b) => b.len(),
        Ratio::Scalar(_) => sd_list().len(),
    };
    let seed = random_seed(seed, i);
    let dice = Dice {
        seed,
        ..dice.cloned().unwrap_or(Dice::new(seed))
    };
    let names = crate::arch::family::list_of_len(n).unwrap_or(sd_list());
    let tokens = vec!["R"; n];
    Draw::new(&dice)
        .vector(&tokens, false, names)
        .map(|(v, _)| Ratio::Blocks(v))
        .map_err(|e| e.to_string())
}

/// The generation seed the `n`th -1 of a seed axis stands for (below 2³², as A1111's).
fn drawn_seed(axis_seed: Option<u64>, n: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"mergesmith seed -1");
    h.update(&axis_seed.unwrap_or(0).to_le_bytes());
    h.update(&n.to_le_bytes());
    let b = h.finalize();
    u32::from_le_bytes([
        b.as_bytes()[0],
        b.as_bytes()[1],
        b.as_bytes()[2],
        b.as_bytes()[3],
    ]) as u64
}

/// The dice seed of cell `i` of a random axis with seed `seed`.
fn random_seed(seed: u64, i: u64) -> u32 {
    (seed.wrapping_add(i) & 0xffff_ffff) as u32
}

/// `base` with the blocks of `which` (`IN00 IN02-IN04`, `NOT ...`, `ALL`) set to `value`'s
/// scalar. The block list is the base vector's (26: SD1/SD2, 20: SDXL), or for a scalar base
/// the one that knows every named block (SD1's when both do).
fn pinpointed(base: &Ratio, which: &str, value: &Ratio) -> Result<Ratio, String> {
    let Ratio::Scalar(v) = value else {
        return Err("a pinpointed block takes one number, not a vector".into());
    };
    let list: &[String] = match base {
        Ratio::Blocks(b) => crate::arch::family::list_of_len(b.len()).ok_or_else(|| {
            format!(
                "pinpointing needs an alpha vector of a family's block list (26 SD, 20 SDXL, 61 Flux), not {} values",
                b.len()
            )
        })?,
        Ratio::Scalar(_) => crate::arch::family::default_lists()
            .find(|l| crate::merge::select::parse_blocks(which, l).is_ok())
            .unwrap_or(sd_list()),
    };
    let set = crate::merge::select::parse_blocks(which, list).map_err(|e| e.to_string())?;
    let mut values = match base {
        Ratio::Scalar(s) => vec![*s; list.len()],
        Ratio::Blocks(b) => b.clone(),
    };
    for (i, b) in list.iter().enumerate() {
        if set.blocks.contains(b) != set.not {
            values[i] = *v;
        }
    }
    Ok(Ratio::Blocks(values))
}

/// The header of a sweep's grids: the merge formula (or the generate node) with the swept
/// parameters as X, Y, Z.
fn header(
    nodes: &BTreeMap<String, Node>,
    merge: Option<&str>,
    gen: &str,
    kinds: &[AxisKind],
) -> String {
    let swept = |k: AxisKind| -> Option<&'static str> {
        kinds
            .iter()
            .position(|x| *x == k)
            .map(|i| ["X", "Y", "Z"][i])
    };
    let sweeps = |ks: &[AxisKind]| ks.iter().find_map(|k| swept(*k));
    let mut parts = Vec::new();
    if let Some(Node::Merge(MergeNode { inputs, spec, .. })) = merge.and_then(|m| nodes.get(m)) {
        let names = ["A", "B", "C"];
        let models: Vec<String> = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let k = [AxisKind::ModelA, AxisKind::ModelB, AxisKind::ModelC][i];
                format!(
                    "{}={}",
                    names[i],
                    swept(k)
                        .map(String::from)
                        .unwrap_or_else(|| input.name().to_string())
                )
            })
            .collect();
        let ratio = |r: &Ratio| match r {
            Ratio::Scalar(v) => format!("{v}"),
            Ratio::Blocks(b) => format!(
                "({})",
                b.iter()
                    .map(|v| format!("{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        let alpha = sweeps(&[
            AxisKind::Alpha,
            AxisKind::MbwAlpha,
            AxisKind::AlphaAndBeta,
            AxisKind::MbwAlphaAndBeta,
            AxisKind::Random,
        ])
        .map(String::from)
        .unwrap_or_else(|| ratio(&spec.alpha));
        parts.push(format!("{} {}", spec.mode.label(), models.join(" ")));
        parts.push(format!("alpha={alpha}"));
        if let Some(b) = &spec.beta {
            let beta = sweeps(&[AxisKind::Beta, AxisKind::MbwBeta, AxisKind::AlphaAndBeta])
                .map(String::from)
                .unwrap_or_else(|| ratio(b));
            parts.push(format!("beta={beta}"));
        }
        for (k, what) in [
            (AxisKind::PinpointBlocks, "blocks"),
            (AxisKind::PinpointElement, "elemental"),
            (AxisKind::PinpointElementExt, "elemental"),
            (AxisKind::Effective, "elemental"),
            (AxisKind::PinpointAdjust, "adjust"),
        ] {
            if let Some(s) = swept(k) {
                parts.push(format!("{what}={s}"));
            }
        }
        let beta_axis = sweeps(&[
            AxisKind::Beta,
            AxisKind::MbwBeta,
            AxisKind::AlphaAndBeta,
            AxisKind::MbwAlphaAndBeta,
        ]);
        if beta_axis.is_some() && !spec.mode.uses_beta() && !spec.calcmode.uses_beta() {
            parts.push("beta swept: run as sum Twice (as SuperMerger's XY plot)".into());
        }
        if let Some(s) = swept(AxisKind::Calcmode) {
            parts.push(format!("calcmode={s}"));
            if spec.mode != crate::merge::Mode::AddDifference {
                parts.push(
                    "trainDifference / extract cells run as Add difference (as SuperMerger)".into(),
                );
            }
        } else if spec.calcmode != crate::merge::CalcMode::Normal {
            parts.push(format!("calcmode={:?}", spec.calcmode));
        }
    }
    if let Some(Node::Generate(GenerateNode { job, .. })) = nodes.get(gen) {
        let seed = swept(AxisKind::Seed)
            .map(String::from)
            .unwrap_or_else(|| job.seed.to_string());
        parts.push(format!("seed={seed}"));
        if let Some(s) = sweeps(&[AxisKind::Prompt, AxisKind::Prompt2, AxisKind::Prompt3]) {
            parts.push(format!("prompt={s}"));
        }
    }
    parts.join(", ")
}

/// Parses an axis: its values, split into parts at `|`, checked per type.
fn parse_axis(
    a: &Spanned<AxisDecl>,
    scope: &RatioScope,
    resolve: &Resolver,
    family: Option<Family>,
    errs: &mut RecipeErrors,
) -> Option<Axis> {
    let (kind, node) = match (&a.value.kind, &a.value.path) {
        (Some(k), None) => (*k, a.value.node.clone()),
        (None, Some(p)) => {
            let Some((node, field)) = p.value.split_once('.') else {
                errs.push(
                    &p.referenced,
                    format!("`{}` is not `NODE.FIELD`", p.value),
                    None,
                );
                return None;
            };
            let Some(kind) = field_kind(field).or_else(|| {
                // Anything else names a list method's parameter (checked per cell against
                // the method's declaration).
                let p = field.strip_prefix("parameters.").unwrap_or(field);
                (!p.is_empty() && !p.contains('.')).then_some(AxisKind::Parameter)
            }) else {
                errs.push(
                    &p.referenced,
                    format!("`{field}` is not a parameter a sweep can change"),
                    Some(PATH_FIELDS.into()),
                );
                return None;
            };
            let node = Spanned {
                value: node.to_string(),
                referenced: p.referenced,
                defined: p.defined,
            };
            (kind, Some(node))
        }
        _ => {
            errs.push(
                &a.referenced,
                "an axis needs either `type` or `path`".into(),
                None,
            );
            return None;
        }
    };
    // `ALL` is what SuperMerger's XY plot makes of it: every block in two parts (BASE to
    // M00, then the OUT blocks) for pinpoint blocks, seven columns (every slot but BRI) for
    // pinpoint adjust. The blocks are the merge's family's (SDXL: IN00-IN08, OUT00-OUT08)
    // where model A's header tells it, else SD's (SuperMerger's own text, also on SDXL).
    let all = |t: &str| -> Option<String> {
        match (t.trim(), kind) {
            ("ALL", AxisKind::PinpointBlocks) => {
                let l = family
                    .map(|f| f.blocks())
                    .filter(|l| l.len() > 1)
                    .unwrap_or(sd_list());
                let m = l.iter().position(|b| b == "M00").map_or(l.len(), |i| i + 1);
                Some(format!("{}|{}", l[..m].join(","), l[m..].join(",")))
            }
            ("ALL", AxisKind::PinpointAdjust) => Some("IN,OUT,OUT2,CONT,COL1,COL2,COL3".into()),
            _ => None,
        }
    };
    let raw: Vec<Vec<AxisValue>> = match &a.value.values {
        AxisValues::List(v) => vec![v.clone()],
        AxisValues::Number(n) => vec![vec![AxisValue::Number(*n)]],
        AxisValues::Text(t) if matches!(kind.separator(), Sep::Whole) => {
            vec![vec![AxisValue::Text(t.clone())]]
        }
        AxisValues::Text(t) => all(t)
            .unwrap_or_else(|| t.clone())
            .split('|')
            .map(|part| {
                split_text(part, kind.separator())
                    .into_iter()
                    .map(AxisValue::Text)
                    .collect()
            })
            .collect(),
    };
    // A seed of -1 (SuperMerger's "random seed") is a seed drawn from the axis' `seed` and
    // the value's position: a different seed per -1, the same ones on every build.
    let mut minus_ones = 0u64;
    let raw: Vec<Vec<AxisValue>> = raw
        .into_iter()
        .map(|values| {
            values
                .into_iter()
                .map(|v| match (&v, kind) {
                    (AxisValue::Number(n), AxisKind::Seed) if *n == -1.0 => {
                        minus_ones += 1;
                        AxisValue::Number(drawn_seed(a.value.seed, minus_ones) as f64)
                    }
                    (AxisValue::Text(t), AxisKind::Seed) if t.trim() == "-1" => {
                        minus_ones += 1;
                        AxisValue::Number(drawn_seed(a.value.seed, minus_ones) as f64)
                    }
                    _ => v,
                })
                .collect()
        })
        .collect();
    let mut parts = Vec::new();
    for values in raw {
        if values.is_empty() {
            errs.push(
                &a.referenced,
                format!("the {} axis has no values", kind.label()),
                None,
            );
            return None;
        }
        let mut part = Vec::new();
        if kind == AxisKind::Effective {
            part.push((
                "baseline".to_string(),
                Setting::PinpointElement(None, false),
            ));
        }
        if kind == AxisKind::Random {
            let count = match values.as_slice() {
                [AxisValue::Number(n)] if n.fract() == 0.0 && (1.0..=1000.0).contains(n) => {
                    *n as u64
                }
                [AxisValue::Text(t)] => match t.trim().parse::<u64>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => 0,
                },
                _ => 0,
            };
            if count == 0 {
                errs.push(
                    &a.referenced,
                    "a random axis takes one count, 1 to 1000 (`values: 8`)".into(),
                    None,
                );
                return None;
            }
            let seed = a.value.seed.unwrap_or(0);
            parts.push(
                (0..count)
                    .map(|i| {
                        let label = format!("#{} (seed {})", i + 1, random_seed(seed, i));
                        (label, Setting::Random(i, seed))
                    })
                    .collect(),
            );
            continue;
        }
        if kind == AxisKind::MbwAlphaAndBeta {
            // Lines in pairs: an alpha vector, then a beta vector.
            if !values.len().is_multiple_of(2) {
                errs.push(
                    &a.referenced,
                    "mbw_alpha_and_beta takes its values in pairs (alpha, then beta)".into(),
                    None,
                );
                return None;
            }
            for pair in values.chunks(2) {
                let x = setting(AxisKind::MbwAlpha, &pair[0], scope, resolve, a, errs);
                let y = setting(AxisKind::MbwAlpha, &pair[1], scope, resolve, a, errs);
                match (x, y) {
                    (Ok(Setting::Alpha(x)), Ok(Setting::Alpha(y))) => part.push((
                        format!("alpha:({}),beta({})", label(&pair[0]), label(&pair[1])),
                        Setting::AlphaBeta(x, y),
                    )),
                    (Err(e), _) | (_, Err(e)) => {
                        errs.push(&a.referenced, format!("{} axis: {e}", kind.label()), None);
                        return None;
                    }
                    _ => unreachable!("mbw values are alphas"),
                }
            }
            parts.push(part);
            continue;
        }
        for v in &values {
            match setting(kind, v, scope, resolve, a, errs) {
                Ok(s) => part.push((label(v), s)),
                Err(e) => {
                    errs.push(&a.referenced, format!("{} axis: {e}", kind.label()), None);
                    return None;
                }
            }
        }
        parts.push(part);
    }
    Some(Axis { kind, node, parts })
}

/// The axis kind of a node field named in a `path` axis.
fn field_kind(field: &str) -> Option<AxisKind> {
    Some(match field {
        "a" => AxisKind::ModelA,
        "b" => AxisKind::ModelB,
        "c" => AxisKind::ModelC,
        "model" => AxisKind::Model,
        "include" => AxisKind::IncludeBlocks,
        "exclude" => AxisKind::ExcludeBlocks,
        "strength" => AxisKind::LoraStrength,
        "blocks" => AxisKind::LoraBlocks,
        "alpha" | "beta" | "calcmode" | "elemental" | "adjust" | "seed" | "prompt" | "negative"
        | "steps" | "cfg" | "guidance" | "sampler" | "schedule" | "noise" | "emphasis"
        | "clip_skip" | "width" | "height" => {
            serde_json::from_value(serde_json::Value::String(field.into())).ok()?
        }
        _ => return None,
    })
}

/// The value of a [`Named`](crate::text::Named) enum called `value` (a JSON string), any of
/// its names or aliases (so A1111's labels such as `DPM++ 2M` work), or an error listing the
/// names.
fn by_name<T: crate::text::Named>(value: &serde_json::Value, what: &str) -> Result<T, String> {
    let text = value.as_str().unwrap_or_default();
    T::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = T::NAMES
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| T::is_primary(n))
            .collect();
        format!("`{text}` is not a {what} ({})", names.join(", "))
    })
}

fn split_text(text: &str, sep: Sep) -> Vec<String> {
    let pieces: Vec<String> = match sep {
        Sep::Whole => vec![text.to_string()],
        Sep::Comma => text.split(',').map(String::from).collect(),
        Sep::CommaOrLine => text.split([',', '\n']).map(String::from).collect(),
        Sep::Line => text.lines().map(String::from).collect(),
        Sep::BlankLine => {
            let mut out = vec![String::new()];
            for line in text.lines() {
                if line.trim().is_empty() {
                    out.push(String::new());
                } else {
                    let last = out.last_mut().expect("one piece");
                    if !last.is_empty() {
                        last.push('\n');
                    }
                    last.push_str(line);
                }
            }
            out
        }
    };
    pieces
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn label(v: &AxisValue) -> String {
    match v {
        AxisValue::Number(n) => format!("{n}"),
        AxisValue::List(l) => l
            .iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(","),
        AxisValue::Text(t) => t.clone(),
    }
}

/// One value of an axis of `kind`.
fn setting(
    kind: AxisKind,
    v: &AxisValue,
    scope: &RatioScope,
    resolve: &Resolver,
    a: &Spanned<AxisDecl>,
    errs: &mut RecipeErrors,
) -> Result<Setting, String> {
    let text = label(v);
    let ratio = |v: &AxisValue| -> Result<Ratio, String> {
        match v {
            AxisValue::Number(n) => Ok(Ratio::Scalar(*n)),
            AxisValue::List(l) => Ok(Ratio::Blocks(l.clone())),
            AxisValue::Text(t) => Ratio::parse(t, &scope.presets).map_err(|e| e.to_string()),
        }
    };
    let int = |what: &str| -> Result<u64, String> {
        match v {
            AxisValue::Number(n) if n.fract() == 0.0 && *n >= 0.0 => Ok(*n as u64),
            AxisValue::Text(t) => t.trim().parse().map_err(|_| format!("`{t}` is not {what}")),
            _ => Err(format!("`{text}` is not {what}")),
        }
    };
    let float = || -> Result<f64, String> {
        match v {
            AxisValue::Number(n) => Ok(*n),
            _ => text
                .trim()
                .parse()
                .map_err(|_| format!("`{text}` is not a number")),
        }
    };
    let named = |what: &str| -> Result<serde_json::Value, String> {
        match v {
            AxisValue::Text(t) => Ok(serde_json::Value::String(t.trim().to_string())),
            _ => Err(format!("`{text}` is not {what}")),
        }
    };
    let at_least_one = |n: u64, what: &str| match n {
        0 => Err(format!("{what} is at least 1")),
        n => Ok(n as usize),
    };
    let size = |n: u64| match n > 0 && n.is_multiple_of(8) {
        true => Ok(n as usize),
        false => Err(format!("{n} is not an image size (a multiple of 8)")),
    };
    Ok(match kind {
        AxisKind::Alpha | AxisKind::MbwAlpha => Setting::Alpha(ratio(v)?),
        AxisKind::Beta | AxisKind::MbwBeta => Setting::Beta(ratio(v)?),
        AxisKind::MbwAlphaAndBeta | AxisKind::Random => unreachable!("parsed before"),
        AxisKind::AlphaAndBeta => {
            let words: Vec<&str> = text.split_whitespace().collect();
            let num = |w: &str| {
                w.parse::<f64>()
                    .map(Ratio::Scalar)
                    .map_err(|_| format!("`{w}` is not a number"))
            };
            match words.as_slice() {
                [one] => Setting::AlphaBeta(num(one)?, num(one)?),
                [x, y] => Setting::AlphaBeta(num(x)?, num(y)?),
                _ => return Err(format!("`{text}` is not `alpha beta`")),
            }
        }
        AxisKind::ModelA | AxisKind::ModelB | AxisKind::ModelC | AxisKind::Model => {
            let name = Spanned {
                value: text.trim().to_string(),
                referenced: a.referenced,
                defined: a.defined,
            };
            let input = resolve(&name, Want::Checkpoint, errs)
                .ok_or_else(|| format!("`{}` is not a checkpoint", name.value))?;
            match kind {
                AxisKind::ModelA => Setting::Model(0, input),
                AxisKind::ModelB => Setting::Model(1, input),
                AxisKind::ModelC => Setting::Model(2, input),
                _ => Setting::GenModel(input),
            }
        }
        AxisKind::PinpointBlocks => {
            let t = text.trim().to_string();
            let known = |list: &[String]| crate::merge::select::parse_blocks(&t, list).is_ok();
            if !crate::arch::family::default_lists().any(known) {
                return Err(crate::merge::select::parse_blocks(&t, sd_list())
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default());
            }
            Setting::Pinpoint(t)
        }
        AxisKind::IncludeBlocks => Setting::Include(text.trim().to_string()),
        AxisKind::AddInclude => Setting::AddFilter(true, text.trim().to_string()),
        AxisKind::AddExclude => Setting::AddFilter(false, text.trim().to_string()),
        AxisKind::ExcludeBlocks => Setting::Exclude(text.trim().to_string()),
        AxisKind::Elemental => Setting::Elemental(text),
        AxisKind::AddElemental => Setting::AddElemental(text),
        AxisKind::PinpointElement | AxisKind::PinpointElementExt | AxisKind::Effective => {
            let item = text.trim().to_string();
            if item.split(':').count() != 2 {
                return Err(format!("`{item}` is not `blocks:elements`"));
            }
            Setting::PinpointElement(Some(item), kind == AxisKind::PinpointElementExt)
        }
        AxisKind::PinpointAdjust => {
            const SLOTS: [&str; 8] = ["IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3"];
            let t = text.trim().to_ascii_uppercase();
            // `ALL` among other values: one column setting every slot but BRI (the axis'
            // whole text `ALL` is seven columns, as SuperMerger's).
            let slots = match t.as_str() {
                "ALL" => (0..8).filter(|&i| i != 4).collect(),
                _ => vec![SLOTS.iter().position(|s| *s == t).ok_or_else(|| {
                    format!("`{t}` is not an adjust slot ({})", SLOTS.join(", "))
                })?],
            };
            Setting::PinpointAdjust(slots)
        }
        AxisKind::LoraStrength => Setting::LoraStrength(float()?),
        AxisKind::LoraBlocks => Setting::LoraBlocks(text.trim().to_string()),
        AxisKind::Adjust => {
            let values: Vec<f64> = match v {
                AxisValue::List(l) => l.clone(),
                _ => text
                    .split(',')
                    .map(|x| {
                        x.trim()
                            .parse::<f64>()
                            .map_err(|_| format!("`{x}` is not a number"))
                    })
                    .collect::<Result<_, _>>()?,
            };
            Setting::Adjust(values.try_into().map_err(|v: Vec<f64>| {
                format!("an adjust vector has 8 values (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3), not {}", v.len())
            })?)
        }
        AxisKind::Calcmode => Setting::Calcmode(
            serde_json::from_value(named("a calcmode")?).map_err(|e| e.to_string())?,
        ),
        AxisKind::Seed => Setting::Seed(int("a seed")?),
        // Syntax no generation can read is an error at the axis, not in a cell at build time
        // (checked with A1111's reading; a node's `emphasis: comfyui` only reads less).
        AxisKind::Prompt | AxisKind::Prompt2 | AxisKind::Prompt3 => {
            crate::gen::prompt::parse(&text, Default::default()).map_err(|e| e.to_string())?;
            Setting::Prompt(text)
        }
        AxisKind::Negative => {
            crate::gen::prompt::parse(&text, Default::default()).map_err(|e| e.to_string())?;
            Setting::Negative(text)
        }
        AxisKind::Steps => Setting::Steps(at_least_one(int("a number of steps")?, "steps")?),
        AxisKind::Cfg => Setting::Cfg(float()?),
        AxisKind::Guidance => Setting::Guidance(float()?),
        AxisKind::Sampler => Setting::Sampler(by_name(&named("a sampler")?, "sampler")?),
        AxisKind::Schedule => Setting::Schedule(by_name(&named("a schedule")?, "schedule")?),
        AxisKind::Noise => Setting::Noise(by_name(&named("a noise source")?, "noise source")?),
        AxisKind::Emphasis => Setting::Emphasis(by_name(&named("an emphasis")?, "emphasis")?),
        AxisKind::ClipSkip => Setting::ClipSkip(at_least_one(int("a clip skip")?, "clip skip")?),
        AxisKind::Width => Setting::Width(size(int("a width")?)?),
        AxisKind::Height => Setting::Height(size(int("a height")?)?),
        AxisKind::Parameter => {
            let field = a
                .value
                .path
                .as_ref()
                .and_then(|p| p.value.split_once('.'))
                .map(|(_, f)| f.strip_prefix("parameters.").unwrap_or(f).to_string())
                .ok_or("a parameter axis is written `path: NODE.PARAM`")?;
            let w = match v {
                AxisValue::Number(n) => crate::merge::method::Written::Number(*n),
                AxisValue::List(l) => crate::merge::method::Written::List(l.clone()),
                AxisValue::Text(t) => {
                    crate::merge::method::parse_cli_param(&format!("x={}", t.trim()))
                        .map(|(_, w)| w)?
                }
            };
            Setting::Param(field, w)
        }
    })
}
