//! The task-arithmetic family (task arithmetic, TIES, DARE, DARE-TIES, DELLA): each
//! delta is sparsified (kept whole, trimmed to its largest magnitudes, or dropped at random),
//! rescaled, weighted; a sign may be elected; the agreeing weighted deltas are summed,
//! optionally normalized by their weights, scaled by `lambda` and added to the base. The
//! steps and their defaults are mergekit's "generalized task arithmetic"; each method's file
//! picks the steps.

use super::job::{sum_in_order, Chunk, Job, Out};
use super::sparse::{della_dims, della_probabilities, top_k, TopK};
use super::Kernel;
use crate::error::Result;

/// How deltas are thinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sparsify {
    /// Kept whole.
    None,
    /// The `density` fraction of largest magnitudes (TIES).
    Magnitude,
    /// Each element kept with probability `density` (DARE).
    Random,
    /// Kept with a probability that grows with the magnitude's rank in its row (DELLA).
    Ranked,
}

/// One configuration of the pipeline.
pub(super) struct Gta {
    /// How deltas are thinned.
    pub sparsify: Sparsify,
    /// Whether a sign is elected (the weighted sum's) and only agreeing deltas count.
    pub vote: bool,
    /// Domain of the method's random streams.
    pub domain: &'static str,
}

enum Masks {
    All,
    Top(Vec<TopK>),
    Random(f64),
    Ranked(f64, f64),
}

impl Masks {
    fn keep(&self, job: &Job, domain: &str, t: usize, c: &Chunk) -> Option<Vec<bool>> {
        let xs = &c.x[t];
        match self {
            Masks::All => None,
            Masks::Top(k) => Some(k[t].keep(c, xs)),
            Masks::Random(d) => Some(job.uniform(domain, t, c).iter().map(|u| u < d).collect()),
            Masks::Ranked(d, e) => {
                let p = della_probabilities(job.shape, *d, *e, xs);
                let u = job.uniform(domain, t, c);
                Some(u.iter().zip(p).map(|(u, p)| *u < p).collect())
            }
        }
    }
}

impl Kernel for Gta {
    fn merge(&self, job: &Job, out: &Out) -> Result<()> {
        let p = job.params;
        let density = match self.sparsify {
            Sparsify::None => 1.0,
            _ => p.num("density"),
        };
        let group = match self.sparsify {
            Sparsify::Ranked => {
                let (rows, inner) = della_dims(job.shape);
                rows * inner
            }
            _ => 1,
        };
        let masks = match self.sparsify {
            _ if density >= 1.0 => Masks::All,
            Sparsify::None => Masks::All,
            Sparsify::Magnitude => Masks::Top(top_k(job, group, density)?),
            Sparsify::Random => Masks::Random(density),
            Sparsify::Ranked => Masks::Ranked(density, p.num("epsilon")),
        };
        let terms = job.terms.len();
        // Rescale factors of the thinned deltas.
        let factors: Vec<f64> = match (&masks, p.choice("rescale")) {
            (Masks::All, _) | (_, "none" | "") => vec![1.0; terms],
            (_, "inverse") => vec![1.0 / density; terms],
            _ => {
                // L1: ‖δ‖₁ / ‖m⊙δ‖₁, untouched when either is below 1e-7.
                let parts = job.map(group, |c| {
                    let mut s = Vec::with_capacity(2 * terms);
                    for t in 0..terms {
                        let xs = &c.x[t];
                        let keep = masks.keep(job, self.domain, t, c);
                        let all: f64 = xs.iter().map(|x| x.abs() as f64).sum();
                        let kept: f64 = match &keep {
                            Some(k) => xs
                                .iter()
                                .zip(k)
                                .filter(|(_, k)| **k)
                                .map(|(x, _)| x.abs() as f64)
                                .sum(),
                            None => all,
                        };
                        s.push(all);
                        s.push(kept);
                    }
                    s
                })?;
                let sums = sum_in_order(parts, 2 * terms);
                (0..terms)
                    .map(|t| {
                        let (before, after) = (sums[2 * t], sums[2 * t + 1]);
                        if before < 1e-7 || after < 1e-7 {
                            1.0
                        } else {
                            before / after
                        }
                    })
                    .collect()
            }
        };
        let (lambda, normalize) = (p.num("lambda"), p.flag("normalize"));
        let w = &job.weights;
        job.emit(
            group,
            |c, vals| {
                let keeps: Vec<Option<Vec<bool>>> = (0..terms)
                    .map(|t| masks.keep(job, self.domain, t, c))
                    .collect();
                let mut wd = vec![0f64; terms];
                for (e, v) in vals.iter_mut().enumerate() {
                    for t in 0..terms {
                        let kept = keeps[t].as_ref().is_none_or(|k| k[e]);
                        wd[t] = if kept {
                            c.x[t][e] as f64 * factors[t] * w[t]
                        } else {
                            0.0
                        };
                    }
                    let (num, den) = if self.vote {
                        let s = if wd.iter().sum::<f64>() >= 0.0 {
                            1.0
                        } else {
                            -1.0
                        };
                        let mut num = 0.0;
                        let mut den = 0.0;
                        for t in 0..terms {
                            if wd[t] != 0.0 && wd[t].signum() == s {
                                num += wd[t];
                                den += w[t];
                            }
                        }
                        (num, den)
                    } else {
                        (wd.iter().sum::<f64>(), w.iter().sum::<f64>())
                    };
                    // mergekit's divisors: an exact 0 after a vote, below 1e-8 without one.
                    let degenerate = if self.vote {
                        den == 0.0
                    } else {
                        den.abs() < 1e-8
                    };
                    let mixed = match (normalize, degenerate) {
                        (false, _) | (true, true) => num,
                        (true, false) => num / den,
                    };
                    *v = (c.base[e] as f64 + lambda * mixed) as f32;
                }
            },
            out,
        )
    }
}

use super::{Param, ParamKind};

/// `lambda`: the scale of the mixed delta.
pub(super) const LAMBDA: Param = Param {
    name: "lambda",
    doc: "scale of the combined delta before it is added to the base",
    kind: ParamKind::Number {
        default: Some(1.0),
        min: -10.0,
        open_min: false,
        max: 10.0,
        per_block: true,
    },
};

/// `normalize`, default off (task arithmetic, DARE, DARE-TIES, DELLA-linear).
pub(super) const NORMALIZE_OFF: Param = Param {
    name: "normalize",
    doc: "divide the sum of (agreeing) weighted deltas by the sum of their weights",
    kind: ParamKind::Flag { default: false },
};

/// `normalize`, default on (TIES, DELLA).
pub(super) const NORMALIZE_ON: Param = Param {
    name: "normalize",
    doc: "divide the sum of agreeing weighted deltas by the sum of their weights",
    kind: ParamKind::Flag { default: true },
};

/// `density` with a default (TIES: 1 keeps everything).
pub(super) const DENSITY_ALL: Param = Param {
    name: "density",
    doc: "fraction of each delta's elements kept (its largest magnitudes)",
    kind: ParamKind::Number {
        default: Some(1.0),
        min: 0.0,
        open_min: true,
        max: 1.0,
        per_block: true,
    },
};

/// `density` without a default (the dropout methods: there is no neutral value).
pub(super) const DENSITY: Param = Param {
    name: "density",
    doc: "fraction of each delta's elements kept (the drop rate is 1 - density)",
    kind: ParamKind::Number {
        default: None,
        min: 0.0,
        open_min: true,
        max: 1.0,
        per_block: true,
    },
};

/// The rescale options.
pub(super) const RESCALE_OPTIONS: &[&str] = &["l1", "inverse", "none"];

/// `rescale`, default L1 (the dropout methods, as mergekit).
pub(super) const RESCALE_L1: Param = Param {
    name: "rescale",
    doc: "how kept elements are scaled up: l1 (match the delta's L1 norm, mergekit), inverse (1/density, the DARE paper), none",
    kind: ParamKind::Choice {
        default: "l1",
        options: RESCALE_OPTIONS,
    },
};

/// `rescale`, default none (TIES).
pub(super) const RESCALE_NONE: Param = Param {
    name: "rescale",
    doc:
        "how kept elements are scaled up: none, l1 (match the delta's L1 norm), inverse (1/density)",
    kind: ParamKind::Choice {
        default: "none",
        options: RESCALE_OPTIONS,
    },
};

/// `seed` of the random drops.
pub(super) const SEED: Param = Param {
    name: "seed",
    doc: "seed of the drop masks (one stream per tensor, input and chunk)",
    kind: ParamKind::Seed,
};

/// `epsilon` of DELLA.
pub(super) const EPSILON: Param = Param {
    name: "epsilon",
    doc: "half-width of DELLA's keep probabilities around density (needs 0 < density - epsilon and density + epsilon <= 1)",
    kind: ParamKind::Number {
        default: Some(0.15),
        min: 0.0,
        open_min: false,
        max: 0.5,
        per_block: false,
    },
};

/// A list of deltas over a base, weighted.
pub(super) const DELTAS: super::Takes = super::Takes::List {
    base: true,
    term: super::Term::Delta,
    min: 1,
    max: None,
    weighted: true,
};

/// DELLA's keep probabilities stay inside (0, 1): density − ε > 0 and density + ε < 1 for
/// every block's density (mergekit refuses the rest too).
pub(super) fn della_check(p: &super::Params) -> std::result::Result<(), String> {
    use super::Value;
    let eps = match p.get("epsilon") {
        Some(Value::Number(r)) => r.base(),
        _ => return Ok(()),
    };
    let densities = match p.get("density") {
        Some(Value::Number(crate::merge::Ratio::Scalar(d))) => vec![*d],
        Some(Value::Number(crate::merge::Ratio::Blocks(v))) => v.clone(),
        _ => return Ok(()),
    };
    match densities
        .iter()
        .find(|d| **d < 1.0 && (*d - eps <= 0.0 || *d + eps >= 1.0))
    {
        Some(d) => Err(format!(
            "density {d} ± epsilon {eps} must stay inside (0, 1) (density 1 keeps everything)"
        )),
        None => Ok(()),
    }
}
