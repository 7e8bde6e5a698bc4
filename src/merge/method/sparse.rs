//! Which elements of a delta survive: TIES' magnitude trim, DARE's random drop and DELLA's
//! magnitude-ranked drop. Every mask is a pure function of (tensor, input, chunk), so the
//! rescale pre-pass and the output pass see the same mask.

use super::job::{Chunk, Job};
use crate::error::Result;

/// The bits that order non-negative floats: |x| as an integer.
fn mag_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The `k` largest magnitudes of one input, ties at the threshold broken by lower index.
#[derive(Debug, Clone)]
pub(super) struct TopK {
    /// Everything kept (k ≥ n).
    all: bool,
    /// The k-th largest magnitude, as bits.
    tau: u32,
    /// How many elements equal to `tau` are kept (the first ones).
    need_eq: u64,
    /// Elements equal to `tau` before each chunk.
    eq_before: Vec<u64>,
}

const BINS: usize = 1 << 16;

/// For each input of `job`: its `max(1, floor(density·n))` largest |δ| (a radix select in
/// two histogram passes and one counting pass; no input is held whole).
pub(super) fn top_k(job: &Job, group: usize, density: f64) -> Result<Vec<TopK>> {
    let n = job.numel() as u64;
    let terms = job.terms.len();
    let k = ((density * n as f64).floor() as u64).max(1);
    if k >= n {
        return Ok(vec![
            TopK {
                all: true,
                tau: 0,
                need_eq: 0,
                eq_before: Vec::new(),
            };
            terms
        ]);
    }
    let hist = |select: &(dyn Fn(usize, u32) -> Option<usize> + Sync)| {
        job.fold(
            group,
            || vec![vec![0u64; BINS]; terms],
            |h, c: &Chunk| {
                for (t, xs) in c.x.iter().enumerate() {
                    for &x in xs {
                        if let Some(b) = select(t, mag_bits(x)) {
                            h[t][b] += 1;
                        }
                    }
                }
            },
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                }
                a
            },
        )
    };
    // The bin holding the k-th largest, and how many lie above it.
    let locate = |h: &[u64], above: u64| -> (usize, u64) {
        let mut cum = above;
        for b in (0..BINS).rev() {
            if cum + h[b] >= k {
                return (b, cum);
            }
            cum += h[b];
        }
        (0, cum)
    };
    let high = hist(&|_, bits| Some((bits >> 16) as usize))?;
    let hi: Vec<(usize, u64)> = high.iter().map(|h| locate(h, 0)).collect();
    let low =
        hist(&|t, bits| ((bits >> 16) as usize == hi[t].0).then_some((bits & 0xffff) as usize))?;
    let taus: Vec<(u32, u64)> = low
        .iter()
        .zip(&hi)
        .map(|(h, (b, above))| {
            let (l, gt) = locate(h, *above);
            (((*b as u32) << 16) | l as u32, k - gt)
        })
        .collect();
    let eq: Vec<Vec<u64>> = job.map(group, |c| {
        c.x.iter()
            .zip(&taus)
            .map(|(xs, (tau, _))| xs.iter().filter(|x| mag_bits(**x) == *tau).count() as u64)
            .collect()
    })?;
    Ok(taus
        .iter()
        .enumerate()
        .map(|(t, (tau, need_eq))| {
            let mut before = 0;
            let eq_before = eq
                .iter()
                .map(|c| {
                    let b = before;
                    before += c[t];
                    b
                })
                .collect();
            TopK {
                all: false,
                tau: *tau,
                need_eq: *need_eq,
                eq_before,
            }
        })
        .collect())
}

impl TopK {
    /// Which elements of this input's chunk survive.
    pub(super) fn keep(&self, c: &Chunk, xs: &[f32]) -> Vec<bool> {
        if self.all {
            return vec![true; xs.len()];
        }
        let mut seen = self.eq_before.get(c.index as usize).copied().unwrap_or(0);
        xs.iter()
            .map(|x| {
                let b = mag_bits(*x);
                if b > self.tau {
                    true
                } else if b == self.tau {
                    seen += 1;
                    seen <= self.need_eq
                } else {
                    false
                }
            })
            .collect()
    }
}

/// DELLA's keep probabilities for one chunk of whole groups: elements ranked by |δ| along
/// dimension 1 (per output row of a linear weight; per (o, kh, kw) over the input channels
/// of a convolution; a 1-D tensor is one row), probability `density − ε + 2ε·(r−1)/(n₁−1)`
/// for rank r = 1 (smallest) .. n₁, equal magnitudes ranked by index (mergekit's
/// definition; `density` for rows of one element).
pub(super) fn della_probabilities(shape: &[usize], density: f64, eps: f64, xs: &[f32]) -> Vec<f64> {
    let (rows, inner) = della_dims(shape);
    let group = rows * inner;
    let mut p = vec![density; xs.len()];
    if rows <= 1 {
        return p;
    }
    let mut idx: Vec<usize> = Vec::with_capacity(rows);
    for (g, gx) in xs.chunks(group).enumerate() {
        for t in 0..inner {
            idx.clear();
            idx.extend(0..rows);
            idx.sort_by(|&i, &j| {
                gx[i * inner + t]
                    .abs()
                    .total_cmp(&gx[j * inner + t].abs())
                    .then(i.cmp(&j))
            });
            for (r, &i) in idx.iter().enumerate() {
                p[g * group + i * inner + t] =
                    density - eps + 2.0 * eps * r as f64 / (rows - 1) as f64;
            }
        }
    }
    p
}

/// (elements ranked together, stride between them) of DELLA's ranking for a shape.
pub(super) fn della_dims(shape: &[usize]) -> (usize, usize) {
    match shape.len() {
        0 => (1, 1),
        1 => (shape[0], 1),
        _ => (shape[1], shape[2..].iter().product()),
    }
}
