//! `geometric_median`: the geometric median of N models, tensor by tensor (Weiszfeld).

use super::job::{sum_in_order, Job, Out};
use super::{Engine, Kernel, Method, Param, ParamKind, Takes, Term};
use crate::error::Result;

struct GeometricMedian;

impl Kernel for GeometricMedian {
    /// The iterate is Σ cᵢxᵢ with Σ cᵢ = 1, so only the N coefficients are kept between
    /// passes: each iteration is one pass computing ‖xᵢ − m‖ for every input.
    fn merge(&self, job: &Job, out: &Out) -> Result<()> {
        let n = job.terms.len();
        let p = job.params;
        let (iterations, eps) = (p.count("iterations"), p.num("epsilon"));
        let ftol = p.num("ftol");
        let mut coef = vec![1.0 / n as f64; n];
        let mut last: Option<f64> = None;
        for _ in 0..iterations {
            let parts = job.map(1, |c| {
                let mut d = vec![0f64; n];
                for e in 0..c.len() {
                    let m: f64 = c.x.iter().zip(&coef).map(|(x, k)| x[e] as f64 * k).sum();
                    for (i, x) in c.x.iter().enumerate() {
                        let r = x[e] as f64 - m;
                        d[i] += r * r;
                    }
                }
                d
            })?;
            let dist: Vec<f64> = sum_in_order(parts, n).iter().map(|s| s.sqrt()).collect();
            let objective = dist.iter().sum::<f64>() / n as f64;
            if last.is_some_and(|l| (l - objective).abs() <= ftol * objective) {
                break;
            }
            last = Some(objective);
            let w: Vec<f64> = dist.iter().map(|d| 1.0 / d.max(eps)).collect();
            let total: f64 = w.iter().sum();
            coef = w.iter().map(|w| w / total).collect();
        }
        job.emit(
            1,
            |c, vals| {
                for (e, v) in vals.iter_mut().enumerate() {
                    *v =
                        c.x.iter()
                            .zip(&coef)
                            .map(|(x, k)| x[e] as f64 * k)
                            .sum::<f64>() as f32;
                }
            },
            out,
        )
    }
}

/// The declaration.
pub static METHOD: Method = Method {
    name: "geometric_median",
    summary: "the point minimizing the sum of distances to the models, per tensor",
    formula: "Weiszfeld from the mean: wᵢ = 1/max(‖xᵢ − m‖, ε), m = Σwᵢxᵢ/Σwᵢ, until the mean distance changes by ≤ ftol·itself or after `iterations` steps",
    source: "sd-mecha `geometric_median` (mergekit has none), computed in f64, so it runs to the converged median where sd-mecha's f32 stops early",
    takes: Takes::List {
        base: false,
        term: Term::Weight,
        min: 2,
        max: None,
        weighted: false,
    },
    params: &[
        Param {
            name: "iterations",
            doc: "most Weiszfeld steps",
            kind: ParamKind::Count {
                default: 100,
                min: 1,
                max: 10_000,
            },
        },
        Param {
            name: "epsilon",
            doc: "smallest distance a weight divides by",
            kind: ParamKind::Number {
                default: Some(1e-6),
                min: 0.0,
                open_min: true,
                max: 1.0,
                per_block: false,
            },
        },
        Param {
            name: "ftol",
            doc: "stop when the mean distance changes by at most ftol times itself",
            kind: ParamKind::Number {
                default: Some(1e-20),
                min: 0.0,
                open_min: false,
                max: 1.0,
                per_block: false,
            },
        },
    ],
    engine: Engine::Streamed(&GeometricMedian),
    check: None,
};
