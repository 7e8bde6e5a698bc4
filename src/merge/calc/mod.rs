//! Calculation modes (SuperMerger's "calcmode", supermerger.md §2).
//!
//! Each calcmode declares the merge modes it applies to, whether it reads beta, and whether
//! it works element by element (computed in chunks, like `normal`) or needs the whole
//! tensor (rows, slices, neighbourhoods or statistics of the tensor). A wrong combination of
//! mode and calcmode is refused at planning time.

pub mod cosine;
pub mod extract;
pub mod slices;
pub mod smooth;

use crate::merge::kernels::blend;
use crate::merge::Mode;

/// Per-element calculation.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum CalcMode {
    /// The mode's formula in f32, rounded once (all modes).
    #[default]
    #[serde(rename = "normal")]
    Normal,
    /// Blend A and B per input column by how similar they are, after normalization (weight_sum).
    #[serde(rename = "cosineA")]
    CosineA,
    /// Like cosineA on the raw weights (weight_sum).
    #[serde(rename = "cosineB")]
    CosineB,
    /// `A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|)` (add_difference).
    #[serde(rename = "trainDifference")]
    TrainDifference,
    /// `A + alpha*gaussian(median3(B-C))` (add_difference).
    #[serde(rename = "smoothAdd")]
    SmoothAdd,
    /// smoothAdd computed with more parallelism; identical results (add_difference).
    #[serde(rename = "smoothAdd MT")]
    SmoothAddMt,
    /// Keep the features B and C share (beta 0) or differ in (beta 1) (add_difference).
    #[serde(rename = "extract")]
    Extract,
    /// Swap row slices of A and B instead of blending (weight_sum, uses beta).
    #[serde(rename = "tensor")]
    Tensor,
    /// Like tensor, slicing dimension 1 (weight_sum, uses beta).
    #[serde(rename = "tensor2")]
    Tensor2,
    /// `alpha * A` for keys other than to_out / proj_out / norm (weight_sum).
    #[serde(rename = "self")]
    SelfScale,
    /// `A + alpha * N(0, 1)`, seeded, for keys other than to_out / proj_out / norm (weight_sum).
    #[serde(rename = "plus random")]
    PlusRandom,
}

/// How a calcmode reads its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Each output element depends on the same element of the inputs.
    Elementwise,
    /// The output depends on the whole tensor.
    Whole,
}

impl crate::text::Named for CalcMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("normal", CalcMode::Normal),
        ("cosineA", CalcMode::CosineA),
        ("cosine_a", CalcMode::CosineA),
        ("cosineB", CalcMode::CosineB),
        ("cosine_b", CalcMode::CosineB),
        ("trainDifference", CalcMode::TrainDifference),
        ("train_difference", CalcMode::TrainDifference),
        ("smoothAdd", CalcMode::SmoothAdd),
        ("smooth_add", CalcMode::SmoothAdd),
        ("smoothAddMT", CalcMode::SmoothAddMt),
        ("smooth_add_mt", CalcMode::SmoothAddMt),
        ("extract", CalcMode::Extract),
        ("tensor", CalcMode::Tensor),
        ("tensor2", CalcMode::Tensor2),
        ("self", CalcMode::SelfScale),
        ("plusRandom", CalcMode::PlusRandom),
        ("plus_random", CalcMode::PlusRandom),
    ];
}

impl CalcMode {
    /// The calcmode with SuperMerger's name `label` (`cosineA`, `smoothAdd MT`, `plus random`...).
    pub fn from_label(label: &str) -> Option<CalcMode> {
        <CalcMode as crate::text::Named>::NAMES
            .iter()
            .map(|(_, c)| *c)
            .find(|c| c.label() == label)
    }

    /// SuperMerger's name.
    pub fn label(self) -> &'static str {
        match self {
            CalcMode::Normal => "normal",
            CalcMode::CosineA => "cosineA",
            CalcMode::CosineB => "cosineB",
            CalcMode::TrainDifference => "trainDifference",
            CalcMode::SmoothAdd => "smoothAdd",
            CalcMode::SmoothAddMt => "smoothAdd MT",
            CalcMode::Extract => "extract",
            CalcMode::Tensor => "tensor",
            CalcMode::Tensor2 => "tensor2",
            CalcMode::SelfScale => "self",
            CalcMode::PlusRandom => "plus random",
        }
    }

    /// The merge modes this calcmode applies to.
    pub fn modes(self) -> &'static [Mode] {
        match self {
            CalcMode::Normal => &[
                Mode::WeightSum,
                Mode::AddDifference,
                Mode::TripleSum,
                Mode::SumTwice,
            ],
            CalcMode::CosineA | CalcMode::CosineB => &[Mode::WeightSum],
            CalcMode::TrainDifference
            | CalcMode::SmoothAdd
            | CalcMode::SmoothAddMt
            | CalcMode::Extract => &[Mode::AddDifference],
            CalcMode::Tensor | CalcMode::Tensor2 | CalcMode::SelfScale | CalcMode::PlusRandom => {
                &[Mode::WeightSum]
            }
        }
    }

    /// Whether beta is read even when the mode itself has none.
    pub fn uses_beta(self) -> bool {
        matches!(
            self,
            CalcMode::Tensor | CalcMode::Tensor2 | CalcMode::Extract
        )
    }

    /// Element-wise or whole-tensor.
    pub fn kind(self) -> Kind {
        match self {
            CalcMode::Normal
            | CalcMode::TrainDifference
            | CalcMode::SelfScale
            | CalcMode::PlusRandom => Kind::Elementwise,
            _ => Kind::Whole,
        }
    }

    /// Whether the calcmode leaves this key as model A (SuperMerger's per-calcmode key filters).
    pub fn skips(self, key: &str, rank: usize) -> bool {
        match self {
            CalcMode::CosineA | CalcMode::CosineB => key.contains("first_stage_model"),
            CalcMode::SelfScale | CalcMode::PlusRandom => ["to_out", "proj_out", "norm"]
                .iter()
                .any(|s| key.contains(s)),
            CalcMode::Tensor | CalcMode::Tensor2 => rank == 0 || rank > 4,
            _ => false,
        }
    }
}

/// Domain separator of `plus random` noise streams.
pub const NOISE_DOMAIN: &str = "mergesmith plus-random v1";

/// Where an element-wise chunk lies, for seeded noise.
pub struct ChunkCtx<'a> {
    /// Tensor name.
    pub key: &'a str,
    /// Chunk index (chunks have a fixed size, so streams do not depend on threads).
    pub chunk: u64,
    /// Recipe seed.
    pub seed: u64,
}

/// Element-wise calcmodes: combines `a` (in place) with `b` and `c`.
#[allow(clippy::too_many_arguments)]
pub fn elementwise(
    calc: CalcMode,
    mode: Mode,
    alpha: f32,
    beta: f32,
    a: &mut [f32],
    b: &[f32],
    c: &[f32],
    ctx: &ChunkCtx,
) {
    match calc {
        CalcMode::TrainDifference => {
            // A + 1.8 alpha (B - C) |B - A| / (|B - C| + |B - A|), 0 where the denominator is 0.
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                let (d, e) = (y - z, (y - *x).abs());
                let den = d.abs() + e;
                if den != 0.0 {
                    *x += 1.8 * alpha * d * e / den;
                }
            }
        }
        CalcMode::SelfScale => {
            if alpha != 0.0 {
                a.iter_mut().for_each(|x| *x *= alpha);
            }
        }
        CalcMode::PlusRandom => {
            if alpha != 0.0 {
                let mut noise = vec![0f32; a.len()];
                crate::noise::fill_normal(NOISE_DOMAIN, ctx.seed, ctx.key, ctx.chunk, &mut noise);
                for (x, n) in a.iter_mut().zip(noise) {
                    *x += alpha * n;
                }
            }
        }
        _ => blend(mode, alpha, beta, a, b, c),
    }
}

/// Parameters of whole-tensor calcmodes.
#[derive(Debug, Clone, Copy)]
pub struct WholeParams {
    /// Weight of B (this key's).
    pub alpha: f64,
    /// Beta (this key's).
    pub beta: f64,
    /// extract's gamma.
    pub gamma: f64,
    /// cosine's similarity range from the pre-pass.
    pub cosine: Option<cosine::Range>,
    /// SuperMerger's numerics, with model B's precision (B − C is kept in B's type).
    pub supermerger: Option<crate::merge::numerics::Prec>,
}

/// Whole-tensor calcmodes: returns the merged tensor (in f32).
pub fn whole(
    calc: CalcMode,
    p: &WholeParams,
    shape: &[usize],
    a: Vec<f32>,
    b: &[f32],
    c: &[f32],
) -> Vec<f32> {
    match calc {
        CalcMode::CosineA | CalcMode::CosineB => {
            let range = p.cosine.expect("cosine range computed before the merge");
            let torch = p.supermerger.is_some();
            cosine::merge(
                calc == CalcMode::CosineA,
                p.alpha,
                range,
                shape,
                a,
                b,
                torch,
            )
        }
        CalcMode::SmoothAdd | CalcMode::SmoothAddMt => {
            let f = match p.supermerger {
                None => {
                    let diff: Vec<f32> = b.iter().zip(c).map(|(y, z)| y - z).collect();
                    smooth::gaussian(&smooth::median3(&diff, shape), shape, 1.0)
                }
                Some(pb) => {
                    let diff: Vec<f32> = b.iter().zip(c).map(|(y, z)| pb.round(y - z)).collect();
                    smooth::gaussian_scipy(&smooth::median3(&diff, shape), shape)
                }
            };
            a.iter()
                .zip(f)
                .map(|(x, f)| x + p.alpha as f32 * f)
                .collect()
        }
        CalcMode::Extract => extract::merge(p.alpha, p.beta, p.gamma, shape, a, b, c),
        CalcMode::Tensor => slices::tensor(p.alpha, p.beta, shape, a, b, false),
        CalcMode::Tensor2 => slices::tensor(p.alpha, p.beta, shape, a, b, true),
        _ => unreachable!("{} is element-wise", calc.label()),
    }
}

/// `torch.nn.functional.cosine_similarity` of two vectors (eps 1e-8 on each norm).
pub fn cos_sim(x: impl Iterator<Item = f64>, y: impl Iterator<Item = f64>) -> f64 {
    let (mut dot, mut nx, mut ny) = (0.0, 0.0, 0.0);
    for (p, q) in x.zip(y) {
        dot += p * q;
        nx += p * p;
        ny += q * q;
    }
    dot / (nx.sqrt().max(1e-8) * ny.sqrt().max(1e-8))
}
