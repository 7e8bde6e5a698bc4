//! `xy: {generate, x, y, z}`: an XY(Z) sweep of a generate node, as SuperMerger plots them.
//! Its cells are expanded into ordinary nodes when the recipe is read (`recipe::sweep`); the
//! node itself depends on every cell and composes the comparison grids from their images;
//! `to: DIR` also writes them there.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::NodeDecl;
use super::{images, preimage_value};
use super::{CheckCx, Header, KeyCx, Kind, Makes, Node, NodeKind, Outcome, ParseCx, RunCx};
use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};

/// The `xy` kind (its declarations are expanded into cells after every other node is read).
pub static KIND: Kind = Kind {
    name: "xy",
    usage: "`xy: {generate, x}`",
    fields: &["to", "overwrite"],
    hint: Some("options go under `xy:`"),
    makes: Makes::Images,
    declared: |d| d.xy.is_some(),
    parse,
};

/// Sweeps are expanded once every other node is validated (`recipe::sweep`).
fn parse(_name: &str, _decl: &Spanned<NodeDecl>, _cx: &mut dyn ParseCx) -> Option<Node> {
    None
}

/// An `xy` node's declaration.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XyDecl {
    /// The generate node every cell runs again with its axis values.
    #[schemars(with = "String")]
    pub generate: Spanned<String>,
    /// The merge node that merge axes change (default: the generate node's model).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub merge: Option<Spanned<String>>,
    /// Columns.
    #[schemars(with = "AxisDecl")]
    pub x: Spanned<AxisDecl>,
    /// Rows.
    #[serde(default)]
    #[schemars(with = "Option<AxisDecl>")]
    pub y: Option<Spanned<AxisDecl>>,
    /// One grid per value.
    #[serde(default)]
    #[schemars(with = "Option<AxisDecl>")]
    pub z: Option<Spanned<AxisDecl>>,
}

/// One axis.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AxisDecl {
    /// What it sweeps.
    #[serde(default, rename = "type")]
    pub kind: Option<AxisKind>,
    /// Instead of `type`: a node's parameter as `NODE.FIELD` (`blend.beta`, `look.cfg`,
    /// `second_merge.alpha`, `styled.strength`), sweeping that node.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// The node it changes (default: the merge node / `lora` node the sweep changes, or the
    /// swept generate node for generation parameters).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub node: Option<Spanned<String>>,
    /// Its values: a list, or SuperMerger's text (`|` splits it into parts).
    pub values: AxisValues,
    /// `random`: the seed of the random weights (default 0).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What an axis sweeps (SuperMerger's axis types, plus generation parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AxisKind {
    /// The merge's alpha (a number, vector or preset per value).
    Alpha,
    /// The merge's beta (a mode without beta runs as sum twice, as SuperMerger's XY plot).
    Beta,
    /// Alpha and beta: `a b` pairs (one number sets both).
    AlphaAndBeta,
    /// Per-block alpha vectors or preset names (one per line in text).
    MbwAlpha,
    /// Per-block beta vectors or preset names.
    MbwBeta,
    /// Alpha and beta vectors (or presets): lines taken in pairs, alpha first.
    MbwAlphaAndBeta,
    /// Model A of the merge.
    ModelA,
    /// Model B.
    ModelB,
    /// Model C.
    ModelC,
    /// Blocks that get the alpha axis' value (`IN00 IN03-IN05`, `NOT M00`, `ALL`); the merge's
    /// own alpha stays elsewhere.
    PinpointBlocks,
    /// Merge only these blocks.
    IncludeBlocks,
    /// Never merge these blocks.
    ExcludeBlocks,
    /// Blocks added to the merge's own Include list (the merge becomes Include).
    AddInclude,
    /// Blocks added to the merge's own Exclude list (the merge becomes Exclude).
    AddExclude,
    /// Elemental text (replaces the merge's).
    Elemental,
    /// `blocks:elements` items (no ratio) added to the merge's elemental text with the alpha
    /// axis' value as their ratio; the merge's alpha stays.
    PinpointElement,
    /// SuperMerger's "pinpoint element ext": as `pinpoint_element`, with the blocks named
    /// from SDXL's extended list (`IN410`, `OUT019`, ...; the merge's `block_list` becomes
    /// `extended`).
    PinpointElementExt,
    /// SuperMerger's "effective elemental checker": as `pinpoint_element`, after a baseline
    /// without any, and the grid adds a row showing what changed against the baseline.
    Effective,
    /// Adjust slots (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3, or ALL) set to the alpha
    /// axis' value.
    PinpointAdjust,
    /// SuperMerger's random merge ("R"): `values` is a count N; cell i gets per-block alpha
    /// weights drawn as SuperMerger's dice draws "R" with seed `seed + i` (the merge's `dice`
    /// limits and rounding, else SuperMerger's defaults: 3 decimals in [0, 1]).
    Random,
    /// Strength of the LoRAs of the `lora` node the generate node reads.
    LoraStrength,
    /// Block weights of those LoRAs.
    LoraBlocks,
    /// Elemental text added to the merge's.
    AddElemental,
    /// Adjust vectors (8 values).
    Adjust,
    /// Calculation mode (trainDifference / extract cells run as add difference, as
    /// SuperMerger; model A stands in for a missing C).
    Calcmode,
    /// The checkpoint the generate node reads: models or checkpoint nodes (say, merges
    /// imported from a history, one per merge ID: SuperMerger's "merge ID" axis).
    Model,
    /// Generation seed.
    Seed,
    /// Prompt (one per line in text).
    Prompt,
    /// Prompts of several lines (separated by blank lines in text).
    Prompt2,
    /// The whole text as one prompt (SuperMerger's prompt3).
    Prompt3,
    /// Negative prompt.
    Negative,
    /// Sampling steps.
    Steps,
    /// Guidance scale.
    Cfg,
    /// Flux dev's distilled guidance.
    Guidance,
    /// Sampler.
    Sampler,
    /// Schedule.
    Schedule,
    /// Noise source.
    Noise,
    /// Prompt syntax.
    Emphasis,
    /// CLIP skip.
    ClipSkip,
    /// Width.
    Width,
    /// Height.
    Height,
    /// A parameter of a list method (`path: NODE.PARAM` or `NODE.parameters.PARAM`: density,
    /// lambda, t, seed...), checked against the method's declaration.
    Parameter,
}

/// An axis' values as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AxisValues {
    /// One value per item.
    List(Vec<AxisValue>),
    /// One number (`random`'s count).
    Number(f64),
    /// SuperMerger's text.
    Text(String),
}

/// One value of a list.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AxisValue {
    /// A number.
    Number(f64),
    /// A vector.
    List(Vec<f64>),
    /// Text.
    Text(String),
}

/// One grid of a sweep.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Grid {
    /// File stem of its images (`SWEEP`, `SWEEP-z1`, `SWEEP-part2-z0`, ...).
    pub name: String,
    /// The header: the merge formula with swept parameters named X / Y.
    pub header: String,
    /// Column labels.
    pub x_labels: Vec<String>,
    /// Row labels (one empty label without a Y axis).
    pub y_labels: Vec<String>,
    /// The Z value of this grid, if any.
    pub z_label: Option<String>,
    /// The cells' generate nodes, row-major.
    pub cells: Vec<String>,
    /// An effective-elemental-checker grid: a row of differences against the first cell.
    pub effective: bool,
}

/// An XY(Z) sweep: comparison grids over its cells' generate nodes.
#[derive(Debug, Clone)]
pub struct XyNode {
    /// Its grids (one per part and Z value), cells row-major.
    pub grids: Vec<Grid>,
    /// A directory the grids are also written to (absolute), as `GRID-bN.png`.
    pub to: Option<PathBuf>,
    /// Replace files there that mergesmith did not write.
    pub overwrite: bool,
}

/// What a sweep's key is computed from: its grid images and the files they become.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    outputs: Vec<images::Output<'a>>,
    grids: &'a [StoredGrid<'a>],
}

/// One grid image: what its key is computed from (its cells' images, its labels and layout,
/// the grid code's version).
#[derive(serde::Serialize)]
struct GridImage<'a> {
    grid: &'a str,
    batch: usize,
    header: &'a str,
    x_labels: &'a [String],
    y_labels: &'a [String],
    z_label: &'a Option<String>,
    effective: bool,
    cells: Vec<String>,
    version: u32,
}

/// A grid image with its key and file name, as a sweep's preimage lists it (and `run`
/// reads it back).
#[derive(serde::Serialize)]
struct StoredGrid<'a> {
    #[serde(flatten)]
    image: GridImage<'a>,
    key: String,
    file: String,
}

impl NodeKind for XyNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        self.grids
            .iter()
            .flat_map(|g| g.cells.iter().map(String::as_str))
            .collect()
    }

    fn reads(&self) -> Vec<&str> {
        self.node_inputs()
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.grids
            .iter_mut()
            .for_each(|g| g.cells.iter_mut().for_each(|c| *c = f(c)));
    }

    /// One grid image per grid and batch index, keyed by its cells' images, its labels and
    /// the grid code's version.
    fn preimage(&self, _name: &str, cx: &KeyCx) -> Value {
        let mut grids = Vec::new();
        for g in &self.grids {
            let cell_images: Vec<Vec<String>> = g
                .cells
                .iter()
                .map(|c| {
                    images::image_keys(cx.preimage(c))
                        .into_iter()
                        .map(|(_, k)| k)
                        .collect()
                })
                .collect();
            let batch = cell_images.iter().map(Vec::len).min().unwrap_or(0);
            for b in 0..batch {
                let image = GridImage {
                    grid: &g.name,
                    batch: b,
                    header: &g.header,
                    x_labels: &g.x_labels,
                    y_labels: &g.y_labels,
                    z_label: &g.z_label,
                    effective: g.effective,
                    cells: cell_images.iter().map(|c| c[b].clone()).collect(),
                    version: crate::gen::job::GRID_VERSION,
                };
                let key = blake3::hash(preimage_value(&image).to_string().as_bytes())
                    .to_hex()
                    .to_string();
                let file = match batch {
                    1 => format!("{}.png", g.name),
                    _ => format!("{}-b{b}.png", g.name),
                };
                grids.push(StoredGrid { image, key, file });
            }
        }
        preimage_value(Preimage {
            op: "xy",
            outputs: grids
                .iter()
                .map(|g| images::Output {
                    file: g.file.clone(),
                    key: &g.key,
                })
                .collect(),
            grids: &grids,
        })
    }

    /// A sweep reads its cells' images, no checkpoint.
    fn check(&self, _cx: &CheckCx) -> Result<Option<Header>> {
        Ok(None)
    }

    fn copies_to(&self) -> Option<&Path> {
        self.to.as_deref()
    }

    /// Composes the grids the cache lacks from its cells' images, copies them to `to`.
    fn run(&self, name: &str, _key: &str, preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        let cache = cx.store.cache;
        let (mut made, mut failed_cells) = (0, 0);
        let grids = preimage["grids"].as_array().cloned().unwrap_or_default();
        for g in &grids {
            let key = g["key"].as_str().unwrap_or_default();
            if cache.has_image(key) {
                continue;
            }
            let labels = |k: &str| -> Vec<String> {
                g[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            // A cell without an image failed (a `--keep-going` build): drawn grey, and the
            // grid is stored only as incomplete, so the next build tries the cell again.
            let mut cells = labels("cells")
                .iter()
                .map(|k| match cache.image(k) {
                    Some(p) => crate::gen::grid::read_png(&p).map(Some),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            let complete = cells.iter().all(Option::is_some);
            let (mut x_labels, mut y_labels) = (labels("x_labels"), labels("y_labels"));
            if g["effective"].as_bool() == Some(true) {
                // The effective checker: a row of differences against the baseline (cell 0).
                let base = cells.first().cloned().flatten();
                let mut diffs = Vec::new();
                for (cell, label) in cells.iter().zip(x_labels.iter_mut()) {
                    if let (Some(b), Some(c)) = (&base, cell) {
                        let (d, share) = crate::gen::grid::difference(b, c);
                        label.push_str(&format!("\nDiff : {share:.3}%"));
                        diffs.push(Some(d));
                    }
                }
                cells.extend(diffs);
                y_labels = vec!["image".into(), "diff".into()];
            }
            let img = crate::gen::grid::compose(&crate::gen::grid::GridSpec {
                header: g["header"].as_str().unwrap_or_default(),
                x_labels: &x_labels,
                y_labels: &y_labels,
                cells: &cells,
            })?;
            let text = [("mergesmith", key)];
            let png = crate::gen::png::encode(img.as_raw(), img.width(), img.height(), &text)?;
            let stored = match complete {
                true => {
                    cache.put_image(key, &png)?;
                    key.to_string()
                }
                false => {
                    // Kept here only: another machine may hold the cells this one lacks.
                    let stored = images::incomplete_key(key);
                    write_file_atomic(&cache.image_path(&stored), &png, true)?;
                    stored
                }
            };
            made += 1;
            if !complete {
                failed_cells += cells.iter().filter(|c| c.is_none()).count();
                if let (Some(dir), Some(file)) = (&self.to, g["file"].as_str()) {
                    cx.copy_out(&stored, &dir.join(file), self.overwrite)?;
                }
            }
        }
        if failed_cells > 0 {
            return Err(Error::Failed(format!(
                "node `{name}`: {failed_cells} cell(s) failed; their grid slots are grey"
            )));
        }
        cx.copy_outputs(self.to.as_deref(), self.overwrite, preimage)?;
        Ok(Outcome {
            stored: Some(made),
            reused: Some(grids.len() - made),
            output: self.to.clone(),
        })
    }

    fn summary(&self) -> String {
        format!("{} grid(s)", self.grids.len())
    }

    fn cost(&self) -> f64 {
        0.0
    }

    fn shard_units<'a>(&'a self, _name: &'a str) -> Vec<&'a str> {
        self.node_inputs()
    }

    fn describe(&self, made: usize, found: usize) -> String {
        format!("{made} grids made, {found} found in the cache")
    }

    fn runs_with_failed_inputs(&self) -> bool {
        true
    }

    fn grids(&self) -> Option<&[Grid]> {
        Some(&self.grids)
    }
}
