//! `della_linear`: DELLA's magnitude-ranked drop without a sign election.

use super::gta::{
    Gta, Sparsify, DELTAS, DENSITY, EPSILON, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED,
};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::Ranked,
    vote: false,
    domain: "mergesmith della_linear v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "della_linear",
    summary: "DELLA's ranked drop and rescale, summed without a vote",
    formula: "δ̃ᵢ as della; base + λ·Σ wᵢδ̃ᵢ",
    source: "mergekit `della_linear`",
    takes: DELTAS,
    params: &[DENSITY, EPSILON, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED],
    engine: Engine::Streamed(&KERNEL),
    check: Some(super::gta::della_check),
};
