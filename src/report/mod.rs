//! Static HTML reports of a built recipe (`mergesmith report`): an index (images, sweeps,
//! where the models differ per block, the recipe graph as SVG, every node's status, time, key
//! and definition, the models' hashes) and a page per sweep (its grids and a table of cell
//! thumbnails linking to the full images). minijinja templates with HTML autoescaping
//! (prompts are user text); relative links only, so the folder works from `file://` and on
//! any static host. Images are named by their content key (`img/<key>.png`, thumbnails
//! `img/<key>.thumb.png`) and never rewritten once there, so re-publishing uploads only what
//! changed.

pub mod similarity;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::build::{NodeReport, Status};
use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};
use crate::nodes::images;
use crate::nodes::Input;
use crate::recipe::Recipe;
use crate::store::Cache;

/// Thumbnails fit in a square of this many pixels.
const THUMB: u32 = 256;

/// What a written site holds.
#[derive(Debug, Clone, Serialize)]
pub struct Site {
    /// The index page.
    pub index: PathBuf,
    /// Every page.
    pub pages: Vec<PathBuf>,
    /// Images copied in this run (others were there already).
    pub images_copied: usize,
}

#[derive(Serialize)]
struct NodeRow {
    name: String,
    kind: &'static str,
    key: String,
    status: String,
    class: &'static str,
    seconds: f64,
    fragment: String,
}

#[derive(Serialize)]
struct ImageRef {
    seed: u64,
    src: String,
    thumb: String,
}

#[derive(Serialize)]
struct CellRef {
    node: String,
    key: String,
    src: String,
    thumb: String,
}

#[derive(Serialize)]
struct Row {
    label: String,
    cells: Vec<CellRef>,
}

#[derive(Serialize)]
struct GridRef {
    file: String,
    src: String,
    z_label: Option<String>,
    x_labels: Vec<String>,
    rows: Vec<Row>,
}

#[derive(Serialize)]
struct SweepPage {
    name: String,
    page: String,
    header: String,
    generate: String,
    job: Option<crate::gen::job::Job>,
    cells: usize,
    grids: Vec<GridRef>,
    fragment: String,
}

/// Copies stored images into `img/` under their keys (with thumbnails), once.
struct Images<'a> {
    cache: &'a Cache,
    dir: PathBuf,
    copied: usize,
}

impl Images<'_> {
    /// The page-relative paths of the image of `key` and of its thumbnail.
    fn add(&mut self, key: &str) -> Result<(String, String)> {
        let (full, thumb) = (format!("img/{key}.png"), format!("img/{key}.thumb.png"));
        let dest = self.dir.join(&full);
        if !dest.is_file() {
            let src = self
                .cache
                .image(key)
                .ok_or_else(|| Error::Invalid(format!("image {key} is not in the cache")))?;
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_file_atomic(&dest, &bytes, true)?;
            self.copied += 1;
        }
        let thumb_path = self.dir.join(&thumb);
        if !thumb_path.is_file() {
            let img = crate::gen::grid::read_png(&dest)?;
            let small = match img.width() > THUMB || img.height() > THUMB {
                true => image::imageops::thumbnail(&img, THUMB, THUMB),
                false => img,
            };
            let png = crate::gen::png::encode(small.as_raw(), small.width(), small.height(), &[])?;
            write_file_atomic(&thumb_path, &png, true)?;
        }
        Ok((full, thumb))
    }
}

/// Whether a node is a sweep cell (a copy named `SWEEP.N.NODE`), which pages show through
/// their sweep rather than one by one.
fn is_cell(recipe: &Recipe, name: &str) -> bool {
    name.split_once('.')
        .is_some_and(|(sweep, _)| recipe.nodes.get(sweep).is_some_and(|n| n.grids().is_some()))
}

/// Writes the site of `recipe` into `out` from a build's `reports` (every image they name
/// must be in `cache`).
pub fn write(recipe: &Recipe, cache: &Cache, reports: &[NodeReport], out: &Path) -> Result<Site> {
    let plans: BTreeMap<&str, &NodeReport> =
        reports.iter().map(|r| (r.plan.name.as_str(), r)).collect();
    let mut imgs = Images {
        cache,
        dir: out.to_path_buf(),
        copied: 0,
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut nodes = Vec::new();
    let (mut built, mut cached, mut skipped, mut seconds) = (0, 0, 0, 0.0);
    for r in reports {
        match r.plan.status {
            Status::Hit => cached += 1,
            Status::Miss(_) => built += 1,
            Status::Skip(_) => skipped += 1,
        }
        seconds += r.seconds;
        if is_cell(recipe, &r.plan.name) {
            continue;
        }
        let (status, class) = match (&r.plan.status, &r.error) {
            (_, Some(e)) => (format!("failed: {e}"), "miss"),
            (Status::Hit, _) => ("cached".to_string(), "hit"),
            (Status::Miss(why), _) => (format!("built: {}", why.join("; ")), "miss"),
            (Status::Skip(why), _) => (format!("skipped: {why}"), "skip"),
        };
        nodes.push(NodeRow {
            name: r.plan.name.clone(),
            kind: recipe.nodes[&r.plan.name].kind().name,
            key: r.plan.key[..16].to_string(),
            status,
            class,
            seconds: r.seconds,
            fragment: pretty(&r.plan.preimage),
        });
    }
    let mut generates = Vec::new();
    let mut sweeps = Vec::new();
    for (name, node) in &recipe.nodes {
        let Some(report) = plans.get(name.as_str()) else {
            continue;
        };
        if let Some((model, job)) = node.generation().filter(|_| !is_cell(recipe, name)) {
            let mut images = Vec::new();
            for (seed, key) in images::image_keys(&report.plan.preimage) {
                let (src, thumb) = imgs.add(&key)?;
                images.push(ImageRef { seed, src, thumb });
            }
            generates.push(serde_json::json!({
                "name": name, "model": model.name(), "job": job, "images": images,
            }));
        }
        if let Some(grids) = node.grids() {
            sweeps.push(sweep_page(recipe, name, grids, report, &plans, &mut imgs)?);
        }
    }
    let memo = cache.memo();
    let mut models = Vec::new();
    for (name, (path, _)) in &recipe.models {
        let h = memo.hashes(path)?.0;
        models.push(serde_json::json!({
            "name": name,
            "file": path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            "sha256": h.sha256, "autov2": h.autov2,
        }));
    }
    let keys: BTreeMap<&str, &str> = reports
        .iter()
        .map(|r| (r.plan.name.as_str(), r.plan.key.as_str()))
        .collect();
    let similarity = similarity::tables(recipe, cache, &keys)?;
    let mut env = minijinja::Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("index.html", include_str!("templates/index.html")),
        ("sweep.html", include_str!("templates/sweep.html")),
    ] {
        env.add_template(name, text)
            .map_err(|e| Error::Invalid(format!("report template {name}: {e}")))?;
    }
    let title = recipe
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recipe".into());
    let common = serde_json::json!({
        "title": title,
        "recipe": recipe.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let render = |template: &str, ctx: Value| -> Result<String> {
        let mut ctx = ctx;
        for (k, v) in common.as_object().into_iter().flatten() {
            ctx[k] = v.clone();
        }
        env.get_template(template)
            .and_then(|t| t.render(minijinja::value::Serde(&ctx)))
            .map_err(|e| Error::Invalid(format!("rendering {template}: {e}")))
    };
    let mut pages = Vec::new();
    for s in &sweeps {
        let path = out.join(&s.page);
        write_file_atomic(
            &path,
            render("sweep.html", serde_json::json!({ "sweep": s }))?.as_bytes(),
            true,
        )?;
        pages.push(path);
    }
    let index = out.join("index.html");
    let html = render(
        "index.html",
        serde_json::json!({
            "nodes": nodes, "built": built, "cached": cached, "skipped": skipped,
            "seconds": seconds, "sweeps": sweeps, "generates": generates, "models": models,
            "similarity": similarity, "dag": dag_svg(recipe),
        }),
    )?;
    write_file_atomic(&index, html.as_bytes(), true)?;
    pages.push(index.clone());
    Ok(Site {
        index,
        pages,
        images_copied: imgs.copied,
    })
}

fn sweep_page(
    recipe: &Recipe,
    name: &str,
    grids: &[crate::nodes::xy::Grid],
    report: &NodeReport,
    plans: &BTreeMap<&str, &NodeReport>,
    imgs: &mut Images,
) -> Result<SweepPage> {
    let stored = report.plan.preimage["grids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for entry in &stored {
        let key = entry["key"].as_str().unwrap_or_default();
        let grid = grids
            .iter()
            .find(|g| Some(g.name.as_str()) == entry["grid"].as_str());
        let Some(grid) = grid else { continue };
        let batch = entry["batch"].as_u64().unwrap_or(0) as usize;
        let stored = match imgs.cache.has_image(key) {
            true => key.to_string(),
            false => images::incomplete_key(key),
        };
        let (src, _) = imgs.add(&stored)?;
        let cols = grid.x_labels.len().max(1);
        let mut rows = Vec::new();
        for (r, label) in grid.y_labels.iter().enumerate() {
            let mut cells = Vec::new();
            for cell in &grid.cells[r * cols..(r + 1) * cols] {
                let keys = plans
                    .get(cell.as_str())
                    .map(|p| images::image_keys(&p.plan.preimage))
                    .unwrap_or_default();
                let made = |k: &String| imgs.cache.has_image(k);
                match keys.get(batch).filter(|(_, k)| made(k)) {
                    Some((_, k)) => {
                        let (src, thumb) = imgs.add(k)?;
                        cells.push(CellRef {
                            node: cell.clone(),
                            key: k[..12].to_string(),
                            src,
                            thumb,
                        });
                    }
                    // A failed cell (`--keep-going`): an empty slot saying so.
                    None => cells.push(CellRef {
                        node: cell.clone(),
                        key: String::new(),
                        src: String::new(),
                        thumb: String::new(),
                    }),
                }
            }
            rows.push(Row {
                label: label.clone(),
                cells,
            });
        }
        out.push(GridRef {
            file: entry["file"].as_str().unwrap_or_default().to_string(),
            src,
            z_label: grid.z_label.clone(),
            x_labels: grid.x_labels.clone(),
            rows,
        });
    }
    let first = grids.first();
    let generate = first
        .and_then(|g| g.cells.first())
        .and_then(|c| c.rsplit('.').next())
        .unwrap_or_default()
        .to_string();
    let job = recipe
        .nodes
        .get(&generate)
        .and_then(|n| n.generation())
        .map(|(_, job)| job.clone());
    Ok(SweepPage {
        name: name.to_string(),
        page: format!("sweep-{name}.html"),
        header: first.map(|g| g.header.clone()).unwrap_or_default(),
        generate,
        job,
        cells: grids.iter().map(|g| g.cells.len()).sum(),
        grids: out,
        fragment: serde_json::to_string_pretty(&grids).unwrap_or_default(),
    })
}

/// Escapes text for SVG.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The recipe graph as an inline SVG: models and nodes in columns by depth (a sweep's cells
/// drawn as the sweep), edges as lines.
pub fn dag_svg(recipe: &Recipe) -> String {
    let shown = |n: &str| !is_cell(recipe, n);
    let mut depth: BTreeMap<String, usize> = recipe.models.keys().map(|m| (m.clone(), 0)).collect();
    let mut edges = Vec::new();
    for name in recipe.order.iter().filter(|n| shown(n)) {
        let node = &recipe.nodes[name];
        let mut inputs: Vec<String> = match node.grids() {
            Some(grids) => {
                // A sweep reads what its swept generate node reads.
                let generate = grids
                    .first()
                    .and_then(|g| g.cells.first())
                    .and_then(|c| c.rsplit('.').next())
                    .map(String::from);
                generate.into_iter().collect()
            }
            None => Vec::new(),
        };
        inputs.extend(
            recipe
                .edges()
                .into_iter()
                .filter(|(_, to)| to == name)
                .map(|(from, _)| from)
                .filter(|f| shown(f)),
        );
        let d = inputs
            .iter()
            .map(|i| depth.get(i).copied().unwrap_or(0) + 1)
            .max()
            .unwrap_or(1);
        depth.insert(name.clone(), d);
        for i in inputs {
            edges.push((i, name.clone()));
        }
    }
    let mut columns: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (n, d) in &depth {
        columns.entry(*d).or_default().push(n.clone());
    }
    let (bw, bh, gx, gy) = (150.0, 36.0, 60.0, 16.0);
    let mut pos: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (d, names) in &columns {
        for (i, n) in names.iter().enumerate() {
            pos.insert(
                n.clone(),
                (10.0 + *d as f64 * (bw + gx), 10.0 + i as f64 * (bh + gy)),
            );
        }
    }
    let width = 20.0 + columns.len() as f64 * (bw + gx);
    let height = 20.0 + columns.values().map(Vec::len).max().unwrap_or(1) as f64 * (bh + gy);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    for (a, b) in &edges {
        if let (Some(p), Some(q)) = (pos.get(a), pos.get(b)) {
            svg.push_str(&format!(
                "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\n",
                p.0 + bw,
                p.1 + bh / 2.0,
                q.0,
                q.1 + bh / 2.0
            ));
        }
    }
    for (n, (x, y)) in &pos {
        let (fill, label) = match recipe.nodes.get(n) {
            None => ("#e8f0ff", format!("{n} (model)")),
            Some(node) => ("#fff4e0", format!("{n} ({})", node.kind().name)),
        };
        svg.push_str(&format!(
            "<g><rect x=\"{x}\" y=\"{y}\" width=\"{bw}\" height=\"{bh}\" rx=\"6\" fill=\"{fill}\" stroke=\"#666\"/><text x=\"{}\" y=\"{}\">{}</text></g>\n",
            x + 6.0,
            y + bh / 2.0 + 4.0,
            xml(&label)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// Whether an input is a model file (its name), for the similarity tables.
pub(crate) fn model_of(input: &Input) -> Option<&str> {
    match input {
        Input::Model(m) => Some(m),
        Input::Node(_) => None,
    }
}
