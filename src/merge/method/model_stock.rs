//! `model_stock`: Model Stock's interpolation between the fine-tunes' mean and the base.

use super::job::{sum_in_order, Job, Out};
use super::{Engine, Kernel, Method, Takes, Term};
use crate::error::Result;

struct ModelStock;

/// Model Stock's t for N models whose deltas have mean pairwise cosine `cos`.
pub fn ratio(n: usize, cos: f64) -> f64 {
    let n = n as f64;
    let den = 1.0 + (n - 1.0) * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        n * cos / den
    }
}

impl Kernel for ModelStock {
    fn merge(&self, job: &Job, out: &Out) -> Result<()> {
        let n = job.terms.len();
        // Gram matrix of the deltas xᵢ − base, upper triangle with the diagonal.
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect();
        let parts = job.map(1, |c| {
            let mut g = vec![0f64; pairs.len()];
            for e in 0..c.len() {
                let b = c.base[e] as f64;
                for (p, &(i, j)) in pairs.iter().enumerate() {
                    g[p] += (c.x[i][e] as f64 - b) * (c.x[j][e] as f64 - b);
                }
            }
            g
        })?;
        let g = sum_in_order(parts, pairs.len());
        let at = |i: usize, j: usize| g[pairs.iter().position(|p| *p == (i, j)).unwrap_or(0)];
        let mut cos = 0.0;
        let mut count = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                let den = (at(i, i).sqrt() * at(j, j).sqrt()).max(1e-6);
                cos += (at(i, j) / den).clamp(-1.0, 1.0);
                count += 1.0;
            }
        }
        let t = ratio(n, cos / count);
        job.emit(
            1,
            |c, vals| {
                for (e, v) in vals.iter_mut().enumerate() {
                    let mean: f64 = c.x.iter().map(|x| x[e] as f64).sum::<f64>() / n as f64;
                    *v = (t * mean + (1.0 - t) * c.base[e] as f64) as f32;
                }
            },
            out,
        )
    }
}

/// The declaration.
pub static METHOD: Method = Method {
    name: "model_stock",
    summary: "interpolate between the base and the fine-tunes' mean by how aligned their deltas are",
    formula: "cos = mean over pairs of cos(δᵢ, δⱼ); t = N·cos/(1+(N−1)·cos) (0 when the denominator is below 1e-6); t·mean(xᵢ) + (1−t)·base",
    source: "mergekit `model_stock` (whole-tensor cosine over all pairs). sd-mecha takes cosines per last-dim row over consecutive pairs and writes ±inf on 1×1 convolutions",
    takes: Takes::List {
        base: true,
        term: Term::Weight,
        min: 2,
        max: None,
        weighted: false,
    },
    params: &[],
    engine: Engine::Streamed(&ModelStock),
    check: None,
};
