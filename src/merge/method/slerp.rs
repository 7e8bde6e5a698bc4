//! `slerp`: spherical interpolation of two models, tensor by tensor.

use super::job::{sum_in_order, Job, Out};
use super::{Engine, Kernel, Method, Param, ParamKind, Takes, Term};
use crate::error::Result;

/// Above this |cos|, the tensors count as parallel and are blended linearly.
pub const PARALLEL: f64 = 0.9995;

/// Norms at or below this count as 1 when taking the angle.
const EPS: f64 = 1e-8;

struct Slerp;

/// The coefficients `(s0, s1)` of `v0` and `v1` for `t`, from ⟨v0,v1⟩, ‖v0‖², ‖v1‖².
pub fn coefficients(t: f64, dot: f64, n0sq: f64, n1sq: f64) -> (f64, f64) {
    let norm = |sq: f64| {
        let n = sq.sqrt();
        if n > EPS {
            n
        } else {
            1.0
        }
    };
    let c = (dot / (norm(n0sq) * norm(n1sq))).clamp(-1.0, 1.0);
    if c.abs() > PARALLEL {
        return (1.0 - t, t);
    }
    let theta = c.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

impl Kernel for Slerp {
    fn merge(&self, job: &Job, out: &Out) -> Result<()> {
        let parts = job.map(1, |c| {
            let (a, b) = (&c.x[0], &c.x[1]);
            let mut s = vec![0f64; 3];
            for (x, y) in a.iter().zip(b) {
                let (x, y) = (*x as f64, *y as f64);
                s[0] += x * y;
                s[1] += x * x;
                s[2] += y * y;
            }
            s
        })?;
        let s = sum_in_order(parts, 3);
        let (s0, s1) = coefficients(job.params.num("t"), s[0], s[1], s[2]);
        job.emit(
            1,
            |c, vals| {
                for (e, v) in vals.iter_mut().enumerate() {
                    *v = (s0 * c.x[0][e] as f64 + s1 * c.x[1][e] as f64) as f32;
                }
            },
            out,
        )
    }
}

/// The declaration.
pub static METHOD: Method = Method {
    name: "slerp",
    summary: "spherical interpolation between two models, per tensor",
    formula: "θ = acos(⟨a,b⟩/‖a‖‖b‖); sin((1−t)θ)/sinθ·a + sin(tθ)/sinθ·b; (1−t)a + tb when |cos θ| > 0.9995",
    source: "mergekit `slerp` (coefficients on the raw tensors). sd-mecha slerps the unit directions and rescales to the lerp of the norms; the two agree when the norms do",
    takes: Takes::List {
        base: false,
        term: Term::Weight,
        min: 2,
        max: Some(2),
        weighted: false,
    },
    params: &[Param {
        name: "t",
        doc: "position between the first (0) and second (1) model",
        kind: ParamKind::Number {
            default: Some(0.5),
            min: 0.0,
            open_min: false,
            max: 1.0,
            per_block: true,
        },
    }],
    engine: Engine::Streamed(&Slerp),
    check: None,
};
