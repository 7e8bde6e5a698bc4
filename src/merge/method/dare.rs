//! `dare`: DARE (drop and rescale) over task arithmetic.

use super::gta::{Gta, Sparsify, DELTAS, DENSITY, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::Random,
    vote: false,
    domain: "mergesmith dare v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "dare",
    summary: "drop each delta element with probability 1 - density, rescale the survivors, add to the base",
    formula: "δ̃ᵢ = mᵢ⊙δᵢ·rᵢ, mᵢ ~ Bernoulli(density); base + λ·Σ wᵢδ̃ᵢ",
    source: "mergekit `dare_linear` (rescale l1 by default, as mergekit; `inverse` is the paper's 1/density). sd-mecha has no DARE without a vote",
    takes: DELTAS,
    params: &[DENSITY, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED],
    engine: Engine::Streamed(&KERNEL),
    check: None,
};
