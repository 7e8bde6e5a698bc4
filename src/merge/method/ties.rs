//! `ties`: TIES-merging (trim, elect sign, disjoint mean).

use super::gta::{Gta, Sparsify, DELTAS, DENSITY_ALL, LAMBDA, NORMALIZE_ON, RESCALE_NONE};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::Magnitude,
    vote: true,
    domain: "mergesmith ties v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "ties",
    summary: "keep each delta's largest magnitudes, elect a sign per element, average the deltas that agree",
    formula: "δ̃ᵢ = top-k(δᵢ); s = sign(Σ wᵢδ̃ᵢ) (0 → +); base + λ·Σ[sign wᵢδ̃ᵢ = s]·wᵢδ̃ᵢ / Σ[…]·wᵢ",
    source: "mergekit `ties`: exactly k = max(1, ⌊density·n⌋) kept, ties at the threshold by lower index (mergekit leaves them to torch's sort); weighted sum vote. sd-mecha's `ties_sum` votes by sign count and keeps every tie",
    takes: DELTAS,
    params: &[DENSITY_ALL, LAMBDA, NORMALIZE_ON, RESCALE_NONE],
    engine: Engine::Streamed(&KERNEL),
    check: None,
};
