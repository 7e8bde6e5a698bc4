//! tensor / tensor2: swap slices of A and B instead of blending.
//!
//! With `n` the size of the sliced dimension: if `alpha + beta <= 1` the result is A with
//! the slices `[n*beta, n*(alpha+beta))` taken from B; otherwise it is B with the slices
//! `[n*(alpha+beta-1), n*beta)` taken from A (B's window wraps around). `tensor` slices
//! dimension 0. `tensor2` slices dimension 1 of tensors with more than one dimension,
//! computing the bounds from `shape[1]` when it exceeds 100 and from `shape[0]` otherwise,
//! clamped to `shape[1]` (SuperMerger's rule, kept for identical results).

/// Merges one tensor (`a` holds A, `b` B).
pub fn tensor(
    alpha: f64,
    beta: f64,
    shape: &[usize],
    a: Vec<f32>,
    b: &[f32],
    dim1: bool,
) -> Vec<f32> {
    let on_dim1 = dim1 && shape.len() > 1;
    let axis_len = if on_dim1 { shape[1] } else { shape[0] };
    let n = if on_dim1 && shape[1] <= 100 {
        shape[0]
    } else {
        axis_len
    } as f64;
    let (base_is_a, lo, hi) = if alpha + beta <= 1.0 {
        (true, n * beta, n * (alpha + beta))
    } else {
        (false, n * (alpha + beta - 1.0), n * beta)
    };
    let clamp = |x: f64| (x.trunc().max(0.0) as usize).min(axis_len);
    let (lo, hi) = (clamp(lo), clamp(hi));
    let (mut out, other): (Vec<f32>, &[f32]) = if base_is_a {
        (a, b)
    } else {
        (b.to_vec(), &a[..])
    };
    if lo < hi {
        let inner: usize = shape[if on_dim1 { 2 } else { 1 }..].iter().product();
        let outer = if on_dim1 { shape[0] } else { 1 };
        for o in 0..outer {
            let start = (o * axis_len + lo) * inner;
            let end = (o * axis_len + hi) * inner;
            out[start..end].copy_from_slice(&other[start..end]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_rows() {
        // supermerger.md §11.5: alpha 0.5, beta 0.75 on 8 rows: rows 2..5 from A, the rest B.
        let a = vec![0f32; 8];
        let b = vec![1f32; 8];
        let out = tensor(0.5, 0.75, &[8], a, &b, false);
        assert_eq!(out, vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
        // alpha + beta <= 1: A with rows [n*beta, n*(alpha+beta)) from B.
        let out = tensor(0.25, 0.25, &[8], vec![0f32; 8], &b, false);
        assert_eq!(out, vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn tensor2_slices_dimension_one() {
        // shape [2, 4]: shape[1] <= 100, so bounds come from shape[0] = 2: beta 0.5 -> 1,
        // alpha+beta 1.0 -> 2: columns 1..2 of every row from B.
        let a = vec![0f32; 8];
        let b = vec![1f32; 8];
        let out = tensor(0.5, 0.5, &[2, 4], a, &b, true);
        assert_eq!(out, vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    }
}
