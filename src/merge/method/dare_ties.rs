//! `dare_ties`: DARE's random drop with TIES' sign election.

use super::gta::{Gta, Sparsify, DELTAS, DENSITY, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::Random,
    vote: true,
    domain: "mergesmith dare_ties v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "dare_ties",
    summary: "DARE's random drop and rescale, then TIES' sign election over the weighted deltas",
    formula: "δ̃ᵢ = mᵢ⊙δᵢ·rᵢ; s = sign(Σ wᵢδ̃ᵢ); base + λ·Σ[sign wᵢδ̃ᵢ = s]·wᵢδ̃ᵢ",
    source: "mergekit `dare_ties` (normalize off by default, as mergekit). sd-mecha's `add_ties_with_dare` rescales by 1/(1-p) (`rescale: inverse`) and votes by sign count",
    takes: DELTAS,
    params: &[DENSITY, LAMBDA, NORMALIZE_OFF, RESCALE_L1, SEED],
    engine: Engine::Streamed(&KERNEL),
    check: None,
};
