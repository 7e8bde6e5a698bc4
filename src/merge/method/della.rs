//! `della`: DELLA's magnitude-ranked drop with TIES' sign election.

use super::gta::{Gta, Sparsify, DELTAS, DENSITY, EPSILON, LAMBDA, NORMALIZE_ON, RESCALE_L1, SEED};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::Ranked,
    vote: true,
    domain: "mergesmith della v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "della",
    summary: "drop delta elements with probabilities ranked by magnitude in their row, rescale, elect a sign, average the agreeing deltas",
    formula: "pᵣ = density − ε + 2ε·(r−1)/(n₁−1) by |δ| rank r along dim 1; δ̃ᵢ = mᵢ⊙δᵢ·rᵢ; TIES vote; base + λ·mean of agreeing",
    source: "mergekit `della` (ranks along dim 1, L1 rescale). sd-mecha ranks over the whole tensor with della_eps = 2ε and rescales by 1/(1-p)",
    takes: DELTAS,
    params: &[DENSITY, EPSILON, LAMBDA, NORMALIZE_ON, RESCALE_L1, SEED],
    engine: Engine::Streamed(&KERNEL),
    check: Some(super::gta::della_check),
};
