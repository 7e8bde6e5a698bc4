//! How a SuperMerger-style merge does its arithmetic.
//!
//! The default ([`Numerics::F32`]) decodes every input to f32, computes the mode's formula
//! and rounds once to the output type. [`Numerics::Supermerger`] repeats SuperMerger's own
//! torch arithmetic instead, so that a merge made there is rebuilt bit for bit: torch
//! computes each operation on half-precision tensors in f32 and rounds its result back to
//! the tensor's type, so every intermediate that SuperMerger keeps in a model's dtype is
//! rounded here too (B − C in B's type, `alpha·(B − C)` and the sum in the promoted type,
//! the triple sum's inner lerp), `torch.lerp` is its CPU kernel (a fused multiply-add on the
//! side of the weight nearer its end), and each key leaves the merge in the dtype torch's
//! type promotion gives it (fp32 after trainDifference and smoothAdd, and for `out.2.bias`
//! under Adjust). supermerger.md §1-§2 and SuperMerger's `scripts/mergers/mergers.py` are
//! the reference; `docs/supermerger.md` lists what remains different.

use crate::dtype::DType;
use crate::merge::{CalcMode, Mode};

/// How a SuperMerger-style merge rounds.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// f32 arithmetic, one rounding to the output type (more accurate; the default).
    #[default]
    F32,
    /// SuperMerger's arithmetic and output dtypes, bit for bit.
    Supermerger,
}

impl crate::text::Named for Numerics {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("f32", Numerics::F32),
        ("supermerger", Numerics::Supermerger),
    ];
}

impl Numerics {
    /// Whether this is the default (left out of cache keys and metadata).
    pub fn is_default(&self) -> bool {
        *self == Numerics::F32
    }
}

/// The precision a tensor type rounds each operation's result to (torch computes f16 and
/// bf16 operations in f32 and rounds the result; other types are taken as f32 here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prec {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// f32 (no rounding of f32 results).
    F32,
}

impl Prec {
    /// The rounding of a stored type.
    pub fn of(d: DType) -> Prec {
        match d {
            DType::F16 => Prec::F16,
            DType::BF16 => Prec::Bf16,
            _ => Prec::F32,
        }
    }

    /// `x` rounded to this precision (nearest even), as an f32.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Prec::F16 => half::f16::from_f32(x).to_f32(),
            Prec::Bf16 => half::bf16::from_f32(x).to_f32(),
            Prec::F32 => x,
        }
    }

    /// The precision of an operation between two tensors (torch's type promotion).
    pub fn join(self, other: Prec) -> Prec {
        if self == other {
            self
        } else {
            Prec::F32
        }
    }
}

/// torch's result type of an operation between tensors of two float types (f16 with bf16
/// gives f32; f64 wins; fp8 and other storage types are taken as f32).
pub fn promote(a: DType, b: DType) -> DType {
    match (a, b) {
        _ if a == b && matches!(a, DType::F16 | DType::BF16 | DType::F32 | DType::F64) => a,
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        _ => DType::F32,
    }
}

/// The dtype SuperMerger's merged tensor has (before Adjust and before a save-time
/// conversion): A's, except add difference (A's promoted with B's, since B − C is kept in
/// B's type) and the calcmodes whose result torch promotes to f32.
pub fn merged_dtype(mode: Mode, calc: CalcMode, a: DType, b: DType) -> DType {
    match calc {
        CalcMode::TrainDifference | CalcMode::SmoothAdd | CalcMode::SmoothAddMt => {
            promote(a, DType::F32)
        }
        CalcMode::Normal if mode == Mode::AddDifference => promote(a, b),
        _ => a,
    }
}

/// `torch.lerp(start, end, weight)` on f32 as its vectorised CPU kernel computes it: a fused
/// multiply-add from the nearer end (`|weight| < 0.5`: from `start`, else from `end`).
#[inline]
pub fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        weight.mul_add(end - start, start)
    } else {
        (weight - 1.0).mul_add(end - start, end)
    }
}

/// The precisions of a blend's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Precs {
    /// Model A's.
    pub a: Prec,
    /// Model B's.
    pub b: Prec,
    /// Model C's.
    pub c: Prec,
}

/// SuperMerger's element-wise formulas (normal calcmode and trainDifference), combining `a`
/// in place with `b` and `c`. The results are f32 values already rounded where SuperMerger
/// rounds, except the final rounding to the key's dtype, which the caller does.
#[allow(clippy::too_many_arguments)]
pub fn elementwise(
    calc: CalcMode,
    mode: Mode,
    alpha: f64,
    beta: f64,
    p: Precs,
    a: &mut [f32],
    b: &[f32],
    c: &[f32],
) {
    if calc == CalcMode::TrainDifference {
        // mergers.py `traindiff`, in f32, operation by operation.
        let k = (alpha * 1.8) as f32;
        for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
            let diff = y - z;
            let (d0, d1) = (diff.abs(), (y - *x).abs());
            let sum = d0 + d1;
            let scale = if sum != 0.0 { d1 / sum } else { 0.0 };
            let signed = torch_sign(diff) * scale.abs();
            *x += signed * diff.abs() * k;
        }
        return;
    }
    let (a32, b32) = (alpha as f32, beta as f32);
    match mode {
        Mode::WeightSum => {
            for (x, y) in a.iter_mut().zip(b) {
                *x = lerp(*x, *y, a32);
            }
        }
        Mode::AddDifference => {
            // B − C rounded to B's type (the pre-pass), alpha·(B − C) in that type, the sum
            // in A's type promoted with it.
            let sum = p.a.join(p.b);
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                let d = p.b.round(y - z);
                *x = sum.round(*x + p.b.round(d * a32));
            }
        }
        Mode::TripleSum if alpha + beta != 0.0 => {
            // lerp(A, lerp(B, C, beta/(alpha+beta)), alpha+beta), each lerp in its type.
            let (inner, outer) = ((beta / (alpha + beta)) as f32, (alpha + beta) as f32);
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                let t = p.b.round(lerp(*y, *z, inner));
                *x = p.a.round(lerp(*x, t, outer));
            }
        }
        Mode::TripleSum => {
            // alpha + beta == 0: (1-alpha-beta)*A + alpha*B + beta*C, operation by operation.
            let wa = (1.0 - alpha - beta) as f32;
            let ab = p.a.join(p.b);
            let abc = ab.join(p.c);
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                let s = ab.round(p.a.round(wa * *x) + p.b.round(a32 * y));
                *x = abc.round(s + p.c.round(b32 * z));
            }
        }
        Mode::SumTwice => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                *x = lerp(lerp(*x, *y, a32), *z, b32);
            }
        }
    }
}

/// `torch.sign`: −1, 0 or 1 (NaN stays NaN).
fn torch_sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else if x.is_nan() {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16(x: f32) -> f32 {
        Prec::F16.round(x)
    }

    const FP16: Precs = Precs {
        a: Prec::F16,
        b: Prec::F16,
        c: Prec::F16,
    };

    #[test]
    fn lerp_takes_the_nearer_end() {
        // weight 1 is exactly the end, weight 0 exactly the start, whatever the values.
        assert_eq!(lerp(3.0, 1e-30, 1.0), 1e-30);
        assert_eq!(lerp(3.0, 1e-30, 0.0), 3.0);
        // Known answer: a fused a + w(b - a) with one rounding.
        let (a, b, w) = (1.0f32, 1.0 + f32::EPSILON, 0.25f32);
        let want = (a as f64 + w as f64 * (b as f64 - a as f64)) as f32;
        assert_eq!(lerp(a, b, w), want);
    }

    #[test]
    fn add_difference_rounds_like_fp16_torch() {
        // Known answer from torch 2.15 on fp16 tensors (SuperMerger's add difference):
        // A = 0.54, B = 1.47, C = 0.09 (fp16: 0.5400390625, 1.4697265625, 0.09002685546875),
        // alpha 0.74. B - C = 1.37969970703125 in f32, 1.3798828125 in fp16; 0.74 * that =
        // 1.021484375 in fp16; A + that = 1.5615234375 in fp16. Rounding once from f32 gives
        // 1.560546875 (one fp16 ulp lower).
        let (a, b, c) = (f16(0.54), f16(1.47), f16(0.09));
        assert_eq!((a, b, c), (0.540_039_06, 1.469_726_6, 0.090_026_855));
        let run = |p: Precs| {
            let mut x = [a];
            elementwise(
                CalcMode::Normal,
                Mode::AddDifference,
                0.74,
                0.0,
                p,
                &mut x,
                &[b],
                &[c],
            );
            f16(x[0])
        };
        assert_eq!(run(FP16), 1.561_523_4);
        let f32s = Precs {
            a: Prec::F32,
            b: Prec::F32,
            c: Prec::F32,
        };
        assert_eq!(run(f32s), 1.560_546_9);
    }

    #[test]
    fn promotion_and_merged_dtypes() {
        assert_eq!(promote(DType::F16, DType::F16), DType::F16);
        assert_eq!(promote(DType::F16, DType::BF16), DType::F32);
        assert_eq!(promote(DType::BF16, DType::F32), DType::F32);
        let m = |mode, calc, a, b| merged_dtype(mode, calc, a, b);
        use CalcMode::*;
        assert_eq!(
            m(Mode::WeightSum, Normal, DType::F16, DType::F32),
            DType::F16
        );
        assert_eq!(
            m(Mode::AddDifference, Normal, DType::F16, DType::F32),
            DType::F32
        );
        assert_eq!(
            m(Mode::AddDifference, TrainDifference, DType::F16, DType::F16),
            DType::F32
        );
        assert_eq!(
            m(Mode::AddDifference, SmoothAddMt, DType::BF16, DType::BF16),
            DType::F32
        );
        assert_eq!(
            m(Mode::AddDifference, Extract, DType::F16, DType::F16),
            DType::F16
        );
    }
}
