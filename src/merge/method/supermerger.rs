//! SuperMerger's four merge modes (supermerger.md §1), declared like every other method.
//! Their recipe fields are flat (`a`, `b`, `c`, `alpha`, `beta`, `calcmode`, ...) and their
//! kernels are the calcmodes of [`crate::merge::calc`]; which parameter reaches a tensor
//! depends on the calcmode ([`reaches`]).

use super::{Engine, Method, Param, ParamKind, Takes};
use crate::merge::calc::CalcMode;
use crate::merge::Mode;

/// extract's gamma default (SuperMerger's).
pub const GAMMA_DEFAULT: f64 = 0.3;

const ALPHA: Param = Param {
    name: "alpha",
    doc: "weight of model B (a number, a preset or one value per block)",
    kind: ParamKind::Number {
        default: None,
        min: f64::NEG_INFINITY,
        open_min: false,
        max: f64::INFINITY,
        per_block: true,
    },
};

const BETA: Param = Param {
    name: "beta",
    doc: "weight of model C (triple_sum, sum_twice; the tensor, tensor2 and extract calcmodes)",
    kind: ParamKind::Number {
        default: None,
        min: f64::NEG_INFINITY,
        open_min: false,
        max: f64::INFINITY,
        per_block: true,
    },
};

const CALCMODE: Param = Param {
    name: "calcmode",
    doc: "SuperMerger's calculation: normal, cosineA, cosineB, trainDifference, smoothAdd, smoothAdd MT, extract, tensor, tensor2, self, plus random",
    kind: ParamKind::Choice {
        default: "normal",
        options: &[
            "normal",
            "cosineA",
            "cosineB",
            "trainDifference",
            "smoothAdd",
            "smoothAdd MT",
            "extract",
            "tensor",
            "tensor2",
            "self",
            "plus random",
        ],
    },
};

/// extract's gamma.
pub const GAMMA: Param = Param {
    name: "gamma",
    doc: "extract's sharpness of the similarity weighting",
    kind: ParamKind::Number {
        default: Some(GAMMA_DEFAULT),
        min: f64::NEG_INFINITY,
        open_min: false,
        max: f64::INFINITY,
        per_block: false,
    },
};

/// The seed of `plus random` (and of stochastic fp8 rounding).
pub const SEED: Param = Param {
    name: "seed",
    doc: "seed of plus random's noise (and of `rounding: stochastic`)",
    kind: ParamKind::Seed,
};

/// Which of gamma and seed a calcmode reads (the rest never reach its tensors' keys).
pub fn reaches(calc: CalcMode) -> (bool, bool) {
    (calc == CalcMode::Extract, calc == CalcMode::PlusRandom)
}

const TWO: &[Param] = &[ALPHA, CALCMODE, GAMMA, SEED];
const THREE: &[Param] = &[ALPHA, BETA, CALCMODE, GAMMA, SEED];

/// weight_sum.
pub static WEIGHT_SUM: Method = Method {
    name: "weight_sum",
    summary: "SuperMerger's Weight sum (every calcmode of weight_sum)",
    formula: "A·(1−α) + B·α",
    source: "SuperMerger",
    takes: Takes::Fixed,
    params: TWO,
    engine: Engine::SuperMerger(Mode::WeightSum),
    check: None,
};

/// add_difference.
pub static ADD_DIFFERENCE: Method = Method {
    name: "add_difference",
    summary: "SuperMerger's Add difference",
    formula: "A + (B − C)·α",
    source: "SuperMerger",
    takes: Takes::Fixed,
    params: TWO,
    engine: Engine::SuperMerger(Mode::AddDifference),
    check: None,
};

/// triple_sum.
pub static TRIPLE_SUM: Method = Method {
    name: "triple_sum",
    summary: "SuperMerger's Triple sum",
    formula: "A·(1−α−β) + B·α + C·β",
    source: "SuperMerger",
    takes: Takes::Fixed,
    params: THREE,
    engine: Engine::SuperMerger(Mode::TripleSum),
    check: None,
};

/// sum_twice.
pub static SUM_TWICE: Method = Method {
    name: "sum_twice",
    summary: "SuperMerger's sum Twice",
    formula: "(A·(1−α) + B·α)·(1−β) + C·β",
    source: "SuperMerger",
    takes: Takes::Fixed,
    params: THREE,
    engine: Engine::SuperMerger(Mode::SumTwice),
    check: None,
};
