//! cosineA / cosineB: blend A and B per input column by how similar they are.
//!
//! For a tensor viewed as `[rows, columns]` (dimension 0 against the rest; a 1-D tensor is
//! one column), the similarity of a column is the mean of its cosine similarity and the
//! cosine similarity of the whole flattened tensors. A pre-pass over every key gives the
//! range of similarities (1st..99th percentile, numpy "midpoint" rule); each column's
//! similarity is mapped into 0..1 by that range, shifted by alpha and clamped to `k`, and the
//! result is `k*A + (1-k)*B`. cosineA normalizes each column first; cosineB uses raw weights.
//!
//! Where a norm is zero the flattened term is taken as 0 (SuperMerger gets 0/0 = NaN), and a
//! zero-width range maps every column to 0.5.

use super::cos_sim;

/// Similarity range from the pre-pass.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Range {
    /// Smallest kept similarity.
    pub min: f64,
    /// Largest kept similarity.
    pub max: f64,
}

fn dims(shape: &[usize], len: usize) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, 1),
        [n, ..] => (*n, len / n.max(&1)),
    }
}

fn normalize_columns(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut norms = vec![0f64; cols];
    for r in 0..rows {
        for (j, n) in norms.iter_mut().enumerate() {
            let v = x[r * cols + j] as f64;
            *n += v * v;
        }
    }
    let norms: Vec<f64> = norms.into_iter().map(|n| n.sqrt().max(1e-12)).collect();
    x.iter()
        .enumerate()
        .map(|(i, v)| *v as f64 / norms[i % cols])
        .collect()
}

fn flat_term(x: &[f64], y: &[f64]) -> f64 {
    let (mut dot, mut nx, mut ny) = (0.0, 0.0, 0.0);
    for (p, q) in x.iter().zip(y) {
        dot += p * q;
        nx += p * p;
        ny += q * q;
    }
    let den = nx.sqrt() * ny.sqrt();
    if den > 0.0 {
        dot / den
    } else {
        0.0
    }
}

fn column_sims(x: &[f64], y: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .map(|j| {
            let col = |v: &'_ [f64]| {
                (0..rows)
                    .map(move |r| v[r * cols + j])
                    .collect::<Vec<f64>>()
            };
            let (cx, cy) = (col(x), col(y));
            cos_sim(cx.into_iter(), cy.into_iter())
        })
        .collect()
}

fn inputs(
    normalized: bool,
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
) -> (Vec<f64>, Vec<f64>) {
    if normalized {
        (
            normalize_columns(a, rows, cols),
            normalize_columns(b, rows, cols),
        )
    } else {
        (
            a.iter().map(|v| *v as f64).collect(),
            b.iter().map(|v| *v as f64).collect(),
        )
    }
}

/// Pre-pass samples of one key.
pub fn samples(cosine_a: bool, shape: &[usize], a: &[f32], b: &[f32]) -> Vec<f64> {
    let (rows, cols) = dims(shape, a.len());
    let (x, y) = inputs(cosine_a, a, b, rows, cols);
    let sims = column_sims(&x, &y, rows, cols);
    if cosine_a {
        sims
    } else {
        let flat = flat_term(&x, &y);
        sims.into_iter().map(|s| (s + flat) / 2.0).collect()
    }
}

/// numpy `percentile(v, q, method="midpoint")` of sorted values: the element at an integral
/// index, else numpy's `_lerp` halfway between the two neighbours (`b - (b - a)·0.5`).
fn percentile_midpoint(sorted: &[f64], q: f64) -> f64 {
    let idx = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (idx.floor() as usize, idx.ceil() as usize);
    if lo == hi {
        return sorted[lo];
    }
    let (a, b) = (sorted[lo], sorted[hi]);
    b - (b - a) * 0.5
}

/// The kept range of all samples, as SuperMerger's pre-pass takes it: NaNs dropped, then
/// the values under the 1st percentile, then the values over the 99th percentile of what is
/// left. `None` when there is no sample.
pub fn range(mut all: Vec<f64>) -> Option<Range> {
    all.retain(|v| !v.is_nan());
    if all.is_empty() {
        return None;
    }
    all.sort_by(f64::total_cmp);
    let lo = percentile_midpoint(&all, 1.0);
    all.retain(|v| *v >= lo);
    let hi = percentile_midpoint(&all, 99.0);
    all.retain(|v| *v <= hi);
    Some(Range {
        min: *all.first()?,
        max: *all.last()?,
    })
}

/// Merges one tensor. `torch`: blend as SuperMerger's `torch.lerp(B, A, k)` does (f32 `k`,
/// fused from the nearer end) instead of in f64.
pub fn merge(
    cosine_a: bool,
    alpha: f64,
    range: Range,
    shape: &[usize],
    a: Vec<f32>,
    b: &[f32],
    torch: bool,
) -> Vec<f32> {
    let (rows, cols) = dims(shape, a.len());
    let (x, y) = inputs(cosine_a, &a, b, rows, cols);
    let flat = flat_term(&x, &y);
    let width = range.max - range.min;
    let k: Vec<f64> = column_sims(&x, &y, rows, cols)
        .into_iter()
        .map(|s| {
            let c = (s + flat) / 2.0;
            let k = if width > 0.0 {
                (c - range.min) / width
            } else {
                0.5
            };
            let k = if cosine_a { k - alpha.abs() } else { k - alpha };
            k.clamp(0.0, 1.0)
        })
        .collect();
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| {
            let k = k[i % cols];
            if torch {
                crate::merge::numerics::lerp(*y, *x, k as f32)
            } else {
                ((1.0 - k) * *y as f64 + k * *x as f64) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_midpoint() {
        // numpy.percentile(range(11), 1, interpolation="midpoint") == 0.5; 99 -> 9.5
        let v: Vec<f64> = (0..11).map(f64::from).collect();
        assert_eq!(percentile_midpoint(&v, 1.0), 0.5);
        assert_eq!(percentile_midpoint(&v, 99.0), 9.5);
        assert_eq!(range(v), Some(Range { min: 1.0, max: 9.0 }));
        assert_eq!(range(vec![f64::NAN]), None);
        // numpy's midpoint is b - (b - a) * 0.5, not (a + b) / 2: they differ here
        // (numpy 2.4: percentile([0.04, 0.24], 50, method="midpoint") == 0.14).
        let (a, b) = (0.04f64, 0.24f64);
        assert_ne!(b - (b - a) * 0.5, (a + b) / 2.0);
        assert_eq!(percentile_midpoint(&[a, b], 50.0), 0.14);
    }

    #[test]
    fn range_takes_the_99th_percentile_of_what_is_left() {
        // 0, 1, ..., 101 worked out by hand. 1st percentile: index 0.01·101 = 1.01, halfway
        // between 1 and 2 = 1.5, so 0 and 1 go. 99th percentile of the 100 values left
        // (2..101): index 0.99·99 = 98.01, halfway between 100 and 101 = 100.5, so 101 goes:
        // [2, 100]. (Percentiles of the full array would give 99.99 -> 99.5 -> [2, 99].)
        let v: Vec<f64> = (0..102).map(f64::from).collect();
        assert_eq!(
            range(v),
            Some(Range {
                min: 2.0,
                max: 100.0
            })
        );
    }

    #[test]
    fn position_ids_sample_as_supermerger_does() {
        // int64 position ids [1, 77] taken as f32: cosineA normalises each column (one
        // element: 0 stays 0, the rest become 1), so column 0 gives 0 and the others 1;
        // cosineB adds the flat term (identical tensors: 1), halving: 0.5 and 1.
        let ids: Vec<f32> = (0..77).map(|i| i as f32).collect();
        let a = samples(true, &[1, 77], &ids, &ids);
        assert_eq!(a.len(), 77);
        assert_eq!(a[0], 0.0);
        assert!(a[1..].iter().all(|v| (v - 1.0).abs() < 1e-12), "{a:?}");
        let b = samples(false, &[1, 77], &ids, &ids);
        assert!((b[0] - 0.5).abs() < 1e-12, "{}", b[0]);
        assert!(b[1..].iter().all(|v| (v - 1.0).abs() < 1e-12), "{b:?}");
    }

    #[test]
    fn identical_models_stay_put_and_opposite_ones_take_b() {
        let a = vec![1.0f32, 2.0, 3.0, 4.0];
        let r = Range {
            min: -1.0,
            max: 1.0,
        };
        // A == B: every k is 1 at alpha 0, so the result is A (= B).
        assert_eq!(merge(true, 0.0, r, &[2, 2], a.clone(), &a, false), a);
        // B = -A: similarity -1, k = 0, the result is B.
        let b: Vec<f32> = a.iter().map(|x| -x).collect();
        assert_eq!(merge(false, 0.0, r, &[2, 2], a.clone(), &b, false), b);
        // alpha >= 1 always gives B.
        assert_eq!(merge(true, 1.0, r, &[2, 2], a.clone(), &b, true), b);
    }

    #[test]
    fn zero_tensors_give_finite_results() {
        // SuperMerger's 0/0 would be NaN; here the flattened term is 0 and the result finite.
        let r = Range {
            min: -1.0,
            max: 1.0,
        };
        let out = merge(
            false,
            0.0,
            r,
            &[2, 2],
            vec![0.0; 4],
            &[1.0, 2.0, 3.0, 4.0],
            false,
        );
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        assert!(samples(true, &[3], &[0.0; 3], &[0.0; 3])
            .iter()
            .all(|v| v.is_finite()));
    }
}
