//! `generate` and `xy` nodes: images in the cache, one PNG per image key (see
//! [`crate::gen::job`]; a grid's key covers its cells' keys, labels and layout), under
//! `v2/images/ab/<key>.png`. A node's preimage lists its outputs (file name, image key); it is
//! up to date when all are stored (and, with `to: DIR`, its copies there are the files the
//! last build wrote), so a rebuild whose images exist loads no model and builds none of the
//! nodes upstream: a sweep whose grids exist does not even look at its cells.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{output_current, Ctx, State, Written};
use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};
use crate::gen::pipeline::Models;
use crate::gen::tokenizer::ClipTokenizer;
use crate::hashing::Stamp;
use crate::recipe::{Input, Node};
use crate::store::remote::Kind;
use crate::store::Cache;

/// The entries of a preimage's array `field` that `f` can read.
fn entries<T>(preimage: &Value, field: &str, f: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    preimage[field]
        .as_array()
        .map(|a| a.iter().filter_map(f).collect())
        .unwrap_or_default()
}

/// The (seed, image key) pairs recorded in a generate node's preimage.
pub fn image_keys(preimage: &Value) -> Vec<(u64, String)> {
    entries(preimage, "images", |e| {
        Some((e["seed"].as_u64()?, e["key"].as_str()?.to_string()))
    })
}

/// The (file name, image key) outputs recorded in a generate or xy node's preimage.
pub fn outputs(preimage: &Value) -> Vec<(String, String)> {
    entries(preimage, "outputs", |e| {
        Some((
            e["file"].as_str()?.to_string(),
            e["key"].as_str()?.to_string(),
        ))
    })
}

/// Whether every output of a generate or xy node (by its preimage) is stored.
pub(super) fn all_stored(cache: &Cache, preimage: &Value) -> bool {
    outputs(preimage)
        .iter()
        .all(|(_, key)| cache.has_image(key))
}

/// Where a grid with failed cells is kept (the complete grid's key stays free, so the grid
/// is made again once its cells exist).
pub fn incomplete_key(key: &str) -> String {
    blake3::hash(format!("incomplete {key}").as_bytes())
        .to_hex()
        .to_string()
}

/// The file name of a generate node's image of `seed` in its `to` directory.
pub fn file_name(node: &str, seed: u64) -> String {
    format!("{node}-{seed}.png")
}

/// Whether the copies of a generate or xy node's outputs in `to` (if any) are the files the
/// last build wrote.
pub(super) fn copies_current(state: &State, to: Option<&Path>, preimage: &Value) -> bool {
    outputs(preimage)
        .iter()
        .all(|(file, key)| to.is_none_or(|dir| output_current(state, &dir.join(file), key)))
}

/// What generate nodes of one build share: the tokenizer, and the last model loaded (kept
/// while consecutive nodes generate from the same checkpoint).
#[derive(Default)]
pub(super) struct Generation {
    tokenizer: Mutex<Option<Arc<ClipTokenizer>>>,
    models: Mutex<Option<(String, Arc<Models>)>>,
}

impl Ctx<'_> {
    /// Runs a generate node: makes the images the cache lacks, copies them to `to`. Returns
    /// (images made, images found in the cache).
    pub(super) fn generate(&self, name: &str, preimage: &Value) -> Result<(usize, usize)> {
        let Node::Generate {
            model,
            job,
            to,
            overwrite,
        } = &self.recipe.nodes[name]
        else {
            unreachable!("generate nodes only");
        };
        let cache = self.store.cache;
        let images = image_keys(preimage);
        let missing: Vec<&(u64, String)> = images
            .iter()
            .filter(|(_, key)| !cache.has_image(key))
            .collect();
        if !missing.is_empty() {
            let (models, label, autov2) = self.models_for(model)?;
            let tok = self.tokenizer()?;
            for (seed, key) in &missing {
                let path = cache.image_path(key);
                job.write_image(&models, &tok, *seed, key, (&label, &autov2), &path, true)?;
                cache.publish(key, Kind::Image);
            }
        }
        self.copy_outputs(to.as_deref(), *overwrite, preimage)?;
        Ok((missing.len(), images.len() - missing.len()))
    }

    /// Copies a node's stored outputs to `to`, if it has one.
    fn copy_outputs(&self, to: Option<&Path>, overwrite: bool, preimage: &Value) -> Result<()> {
        if let Some(dir) = to {
            for (file, key) in outputs(preimage) {
                self.copy_out(&key, &dir.join(file), overwrite)?;
            }
        }
        Ok(())
    }

    /// Runs an xy node: composes the grids the cache lacks from its cells' images, copies
    /// them to `to`. Returns (grids made, grids found in the cache).
    pub(super) fn grids(&self, name: &str, preimage: &Value) -> Result<(usize, usize)> {
        let Node::Xy { to, overwrite, .. } = &self.recipe.nodes[name] else {
            unreachable!("xy nodes only");
        };
        let cache = self.store.cache;
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
                    let stored = incomplete_key(key);
                    write_file_atomic(&cache.image_path(&stored), &png, true)?;
                    stored
                }
            };
            made += 1;
            if !complete {
                failed_cells += cells.iter().filter(|c| c.is_none()).count();
                if let (Some(dir), Some(file)) = (to, g["file"].as_str()) {
                    self.copy_out(&stored, &dir.join(file), *overwrite)?;
                }
            }
        }
        if failed_cells > 0 {
            return Err(Error::Failed(format!(
                "node `{name}`: {failed_cells} cell(s) failed; their grid slots are grey"
            )));
        }
        self.copy_outputs(to.as_deref(), *overwrite, preimage)?;
        Ok((made, grids.len() - made))
    }

    /// The loaded models of a checkpoint input, its name for the PNGs, and its A1111 hash.
    /// The checkpoint is opened only when it is not the model already loaded.
    fn models_for(&self, input: &Input) -> Result<(Arc<Models>, String, String)> {
        let (content, autov2) = match input {
            Input::Model(m) => {
                let h = self.store.memo.hashes(&self.recipe.models[m].0)?.0;
                (h.blake3, h.autov2)
            }
            Input::Node(n) => {
                let key = &self.keys[n];
                (key.clone(), self.store.result_hashes(key)?.autov2)
            }
        };
        let name = input.name().to_string();
        let mut slot = self.generation.models.lock().expect("models lock");
        if let Some((k, m)) = slot.as_ref() {
            if *k == content {
                return Ok((m.clone(), name, autov2));
            }
        }
        *slot = None; // free the previous model before loading the next
        let ck = match input {
            Input::Model(m) => crate::checkpoint::Checkpoint::open(&self.recipe.models[m].0)?,
            Input::Node(n) => self
                .store
                .open_result(&content, &PathBuf::from(format!("{n}.safetensors")))?,
        };
        let models = Arc::new(Models::load_on(Arc::new(ck), self.run.device)?);
        *slot = Some((content, models.clone()));
        Ok((models, name, autov2))
    }

    /// The build's tokenizer, loaded once.
    fn tokenizer(&self) -> Result<Arc<ClipTokenizer>> {
        let mut slot = self.generation.tokenizer.lock().expect("tokenizer lock");
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(ClipTokenizer::find(self.recipe.tokenizer.as_deref())?);
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Copies a stored image to `to`, refusing to replace a file this recipe did not write
    /// there unless `overwrite` (or it already holds these bytes).
    fn copy_out(&self, key: &str, to: &Path, overwrite: bool) -> Result<()> {
        let from = self
            .store
            .cache
            .image(key)
            .ok_or_else(|| Error::Invalid(format!("image {key} is no longer in the cache")))?;
        let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
        let mut state = self.state.lock().expect("state lock");
        if to.exists() && !overwrite {
            let ours = state
                .outputs
                .get(to)
                .is_some_and(|w| Stamp::of(to).is_ok_and(|s| s == w.stamp));
            let same = std::fs::read(to).is_ok_and(|b| b == bytes);
            if !ours && !same {
                return Err(Error::Invalid(format!(
                    "{} exists and was not written by this recipe; add `overwrite: true` to replace it",
                    to.display()
                )));
            }
        }
        write_file_atomic(to, &bytes, true)?;
        state.outputs.insert(
            to.to_path_buf(),
            Written {
                object: key.to_string(),
                stamp: Stamp::of(to)?,
            },
        );
        Ok(())
    }
}
