//! Images in the cache: one PNG per image key (see [`crate::gen::job`]; a grid's key covers
//! its cells' keys, labels and layout). A generate or xy node's preimage lists its outputs
//! (file name, image key); it is up to date when all are stored (and, with `to: DIR`, its
//! copies there are the files the last build wrote), so a rebuild whose images exist loads no
//! model and builds none of the nodes upstream: a sweep whose grids exist does not even look
//! at its cells.

use std::path::Path;

use serde_json::Value;

use crate::store::remote::Kind as Stored;
use crate::store::{Cache, State};

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

/// One output of a generate or xy node as its preimage lists it: the file name it gets in
/// `to: DIR` and its image key.
#[derive(Debug, serde::Serialize)]
pub struct Output<'a> {
    /// The file name.
    pub file: String,
    /// The image key.
    pub key: &'a str,
}

/// The cache objects of a generate or xy node: its output images.
pub(crate) fn stored_objects(preimage: &Value) -> Vec<(String, Stored)> {
    outputs(preimage)
        .into_iter()
        .map(|(_, k)| (k, Stored::Image))
        .collect()
}

/// Whether every output of a generate or xy node (by its preimage) is stored.
pub(crate) fn all_stored(cache: &Cache, preimage: &Value) -> bool {
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
pub(crate) fn copies_current(state: &State, to: Option<&Path>, preimage: &Value) -> bool {
    outputs(preimage)
        .iter()
        .all(|(file, key)| to.is_none_or(|dir| state.wrote(&dir.join(file), key)))
}
