//! Fused per-element merge kernels: decode to f32, combine, round once to the output type.
//!
//! Every mode is one pass over the chunk with f32 arithmetic (SuperMerger's default "new"
//! calculation casts to fp32 the same way), so each element is rounded exactly once. The
//! operations per element are fixed, so results do not depend on chunking or threads.

use crate::merge::Mode;

/// Combines `a` (updated in place) with `b` and `c` per the mode.
///
/// - weight_sum:     `a + alpha*(b - a)`
/// - add_difference: `a + alpha*(b - c)`
/// - triple_sum:     `a + alpha*(b - a) + beta*(c - a)` (= `(1-alpha-beta)a + alpha b + beta c`)
/// - sum_twice:      `t + beta*(c - t)` with `t = a + alpha*(b - a)`
///
/// NaN and infinity propagate as IEEE arithmetic makes them (for example `inf - inf` is NaN).
pub fn blend(mode: Mode, alpha: f32, beta: f32, a: &mut [f32], b: &[f32], c: &[f32]) {
    match mode {
        Mode::WeightSum => {
            for (x, y) in a.iter_mut().zip(b) {
                *x += alpha * (y - *x);
            }
        }
        Mode::AddDifference => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                *x += alpha * (y - z);
            }
        }
        Mode::TripleSum => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                *x += alpha * (y - *x) + beta * (z - *x);
            }
        }
        Mode::SumTwice => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                let t = *x + alpha * (y - *x);
                *x = t + beta * (z - t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        let mut a = vec![1.0, 2.0];
        blend(Mode::WeightSum, 0.25, 0.0, &mut a, &[5.0, -2.0], &[]);
        assert_eq!(a, vec![2.0, 1.0]);
        let mut a = vec![1.0];
        blend(Mode::AddDifference, 0.5, 0.0, &mut a, &[4.0], &[2.0]);
        assert_eq!(a, vec![2.0]);
        let mut a = vec![1.0];
        blend(Mode::TripleSum, 0.25, 0.5, &mut a, &[5.0], &[3.0]);
        assert_eq!(a, vec![0.25 + 1.25 + 1.5]);
        let mut a = vec![0.0];
        blend(Mode::SumTwice, 0.5, 0.5, &mut a, &[4.0], &[8.0]);
        assert_eq!(a, vec![5.0]);
    }
}
