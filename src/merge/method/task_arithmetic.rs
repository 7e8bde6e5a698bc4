//! `task_arithmetic`: the base plus the weighted sum of the deltas.

use super::gta::{Gta, Sparsify, DELTAS, LAMBDA, NORMALIZE_OFF};
use super::{Engine, Method};

static KERNEL: Gta = Gta {
    sparsify: Sparsify::None,
    vote: false,
    domain: "mergesmith task_arithmetic v1",
};

/// The declaration.
pub static METHOD: Method = Method {
    name: "task_arithmetic",
    summary: "add weighted task vectors (fine-tune minus base) to the base",
    formula: "base + λ·Σ wᵢδᵢ (÷Σwᵢ with normalize)",
    source: "mergekit `task_arithmetic` (sd-mecha: `base + (ft - base) * w + ...`, identical)",
    takes: DELTAS,
    params: &[LAMBDA, NORMALIZE_OFF],
    engine: Engine::Streamed(&KERNEL),
    check: None,
};
