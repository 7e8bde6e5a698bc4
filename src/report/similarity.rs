//! Where two models differ, per merge block, without generating anything: the cosine
//! similarity of their weights and the relative L2 distance `‖A − B‖ / ‖A‖`, accumulated in
//! f64 over every U-Net and text-encoder tensor the two share (text encoders count as `BASE`,
//! as in SuperMerger; the VAE and EMA copies are left out). Tensors are read one at a time in
//! parallel, so memory stays at a few tensors. Reports compare the two models of each merge,
//! and each of them with the merge's result when the cache holds it.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::arch::{Component, Family};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::recipe::Recipe;

/// One block's comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockRow {
    /// Block name.
    pub block: String,
    /// Cosine similarity of the block's weights.
    pub cosine: f64,
    /// ‖A − B‖ / ‖A‖ over the block.
    pub distance: f64,
    /// A CSS background colour: darker where the block differs more (relative to the table).
    pub color: String,
}

/// A comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// What is compared.
    pub title: String,
    /// Blocks in merge order.
    pub rows: Vec<BlockRow>,
}

/// The merge block of a key, if it takes part in the comparison.
fn block_of(family: Family, key: &str) -> Option<String> {
    match family.component(key) {
        Component::TextEncoder1 | Component::TextEncoder2 | Component::TextEncoder3 => Some(
            family
                .block_in(0, key)
                .unwrap_or_else(|| family.blocks()[0].clone()),
        ),
        Component::Unet => family.block_in(0, key),
        _ => None,
    }
}

/// Per-block cosine similarity and relative distance of `a` and `b`, blocks in the family's
/// merge order.
pub fn compare(a: &Checkpoint, b: &Checkpoint) -> Result<Vec<BlockRow>> {
    let family = crate::arch::detect(a.tensors()).family;
    // Per block: Σ a·b, Σ a², Σ b², Σ (a − b)².
    type Sums = [f64; 4];
    let per_tensor: Vec<Result<Option<(String, Sums)>>> = a
        .tensors()
        .par_iter()
        .map(|ta| {
            let Some(block) = block_of(family, &ta.name) else {
                return Ok(None);
            };
            let Some(tb) = b.get(&ta.name).filter(|tb| tb.shape == ta.shape) else {
                return Ok(None);
            };
            if !ta.dtype.is_float() || !tb.dtype.is_float() {
                return Ok(None);
            }
            let x = crate::convert::to_f32(ta.dtype, &a.data(ta))?;
            let y = crate::convert::to_f32(tb.dtype, &b.data(tb))?;
            a.release(ta);
            b.release(tb);
            let mut s = [0f64; 4];
            for (p, q) in x.iter().zip(&y) {
                let (p, q) = (*p as f64, *q as f64);
                s[0] += p * q;
                s[1] += p * p;
                s[2] += q * q;
                s[3] += (p - q) * (p - q);
            }
            Ok(Some((block, s)))
        })
        .collect();
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    for r in per_tensor {
        if let Some((block, s)) = r? {
            let e = sums.entry(block).or_insert([0.0; 4]);
            for i in 0..4 {
                e[i] += s[i];
            }
        }
    }
    let order = crate::merge::select::block_list(family);
    let mut rows: Vec<BlockRow> = order
        .iter()
        .filter_map(|b| sums.get(b).map(|s| (b, s)))
        .map(|(b, s)| BlockRow {
            block: b.clone(),
            cosine: match s[1] * s[2] {
                d if d > 0.0 => s[0] / d.sqrt(),
                _ => 1.0,
            },
            distance: match s[1] {
                n if n > 0.0 => (s[3] / n).sqrt(),
                _ => 0.0,
            },
            color: String::new(),
        })
        .collect();
    let max = rows.iter().map(|r| r.distance).fold(0.0, f64::max);
    for r in &mut rows {
        let shade = if max > 0.0 { r.distance / max } else { 0.0 };
        r.color = format!("hsl(25, 85%, {:.0}%)", 97.0 - 45.0 * shade);
    }
    Ok(rows)
}

/// Tables per merge node (sweep cells aside): where the models A and B it blends differ (when
/// both are files), and, when its result is stored in `cache` (key from `keys`), how far the
/// result moved from A and from B.
pub fn tables(
    recipe: &Recipe,
    cache: &crate::store::Cache,
    keys: &BTreeMap<&str, &str>,
) -> Result<Vec<Table>> {
    let store = crate::store::Store::new(cache);
    let mut out = Vec::new();
    for (name, node) in &recipe.nodes {
        let Some(inputs) = node.blends() else {
            continue;
        };
        if super::is_cell(recipe, name) {
            continue;
        }
        let models: Vec<&str> = inputs.iter().take(2).filter_map(super::model_of).collect();
        let [a, b] = models[..] else { continue };
        let open = |m: &str| Checkpoint::open(&recipe.models[m].0);
        let (ca, cb) = (open(a)?, open(b)?);
        out.push(Table {
            title: format!("{name}: A = {a} vs B = {b}"),
            rows: compare(&ca, &cb)?,
        });
        let stored = keys.get(name.as_str()).filter(|k| cache.has_result(k));
        if let Some(key) = stored {
            let result = store.open_result(key, std::path::Path::new(name))?;
            for (label, input) in [(a, &ca), (b, &cb)] {
                out.push(Table {
                    title: format!("{name}: {label} vs the result"),
                    rows: compare(input, &result)?,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_keys() {
        assert_eq!(
            block_of(
                Family::named("sd1").unwrap(),
                "model.diffusion_model.input_blocks.4.1.proj_in.weight"
            )
            .as_deref(),
            Some("IN04")
        );
        assert_eq!(
            block_of(
                Family::named("sd1").unwrap(),
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
            )
            .as_deref(),
            Some("BASE")
        );
        assert_eq!(
            block_of(
                Family::named("sd1").unwrap(),
                "first_stage_model.decoder.conv_in.weight"
            ),
            None
        );
    }
}
