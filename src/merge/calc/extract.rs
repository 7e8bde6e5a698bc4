//! extract: add the part of B-A and C-A that the two share (beta 0) or do not share (beta 1).
//!
//! Per row of the last axis (a 1-D tensor is one row): `a = B - A`, `b = C - A`,
//! `c = clamp(cos_sim(a, b), -1, 1)`, `d = ((c + 1) / 2)^gamma`, and the result is
//! `A + lerp(a, b, alpha) * lerp(d, 1 - d, beta)`. Zero rows have similarity 0.

use super::cos_sim;

/// Merges one tensor (`a` holds A, `b` B and `c` C).
pub fn merge(
    alpha: f64,
    beta: f64,
    gamma: f64,
    shape: &[usize],
    a: Vec<f32>,
    b: &[f32],
    c: &[f32],
) -> Vec<f32> {
    let row = shape.last().copied().filter(|&n| n > 0).unwrap_or(1);
    let mut out = a;
    for (i, o) in out.chunks_mut(row).enumerate() {
        let range = i * row..i * row + o.len();
        let da: Vec<f64> = o
            .iter()
            .zip(&b[range.clone()])
            .map(|(x, y)| (*y - *x) as f64)
            .collect();
        let db: Vec<f64> = o
            .iter()
            .zip(&c[range])
            .map(|(x, z)| (*z - *x) as f64)
            .collect();
        let sim = cos_sim(da.iter().copied(), db.iter().copied()).clamp(-1.0, 1.0);
        let d = ((sim + 1.0) / 2.0).powf(gamma);
        let w = d + beta * (1.0 - 2.0 * d);
        for ((x, p), q) in o.iter_mut().zip(&da).zip(&db) {
            *x = (*x as f64 + (p + alpha * (q - p)) * w) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_differences_keep_the_lerp() {
        // a = B - A and b = C - A point the same way: c = 1, d = 1; beta 0 keeps lerp(a, b, alpha).
        let a = vec![1.0f32, 1.0];
        let b = vec![2.0f32, 3.0]; // a = (1, 2)
        let c = vec![3.0f32, 5.0]; // b = (2, 4)
        let out = merge(0.5, 0.0, 1.0, &[2], a, &b, &c);
        assert_eq!(out, vec![1.0 + 1.5, 1.0 + 3.0]);
        // beta 1 weights by 1 - d = 0: A unchanged.
        let out = merge(0.5, 1.0, 1.0, &[2], vec![1.0, 1.0], &b, &c);
        assert_eq!(out, vec![1.0, 1.0]);
    }
}
