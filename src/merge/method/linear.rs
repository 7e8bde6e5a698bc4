//! `linear`: the weighted sum (or average) of N models.

use super::job::{Job, Out};
use super::{Engine, Kernel, Method, Param, ParamKind, Takes, Term};
use crate::error::{Error, Result};

struct Linear;

impl Kernel for Linear {
    fn merge(&self, job: &Job, out: &Out) -> Result<()> {
        let w = &job.weights;
        let total: f64 = w.iter().sum();
        let div = if job.params.flag("normalize") {
            if total.abs() < 1e-12 {
                return Err(Error::Invalid(format!(
                    "linear: the weights of `{}` sum to 0 and normalize is on",
                    job.name
                )));
            }
            total
        } else {
            1.0
        };
        job.emit(
            1,
            |c, vals| {
                for (e, v) in vals.iter_mut().enumerate() {
                    let s: f64 = c.x.iter().zip(w).map(|(x, w)| x[e] as f64 * w).sum();
                    *v = (s / div) as f32;
                }
            },
            out,
        )
    }
}

/// The declaration.
pub static METHOD: Method = Method {
    name: "linear",
    summary: "weighted sum of N models (an average when normalized)",
    formula: "Σ wᵢxᵢ / Σ wᵢ (Σ wᵢxᵢ without normalize)",
    source: "mergekit `linear` (sd-mecha: nested `weighted_sum` / `n_average`, equal within 1 ulp)",
    takes: Takes::List {
        base: false,
        term: Term::Weight,
        min: 2,
        max: None,
        weighted: true,
    },
    params: &[Param {
        name: "normalize",
        doc: "divide by the sum of the weights",
        kind: ParamKind::Flag { default: true },
    }],
    engine: Engine::Streamed(&Linear),
    check: None,
};
