//! smoothAdd's filters, with scipy.ndimage semantics: N-D filters over every axis of the
//! tensor, boundary mode "reflect" (`d c b a | a b c d | d c b a`).

use rayon::prelude::*;

/// scipy "reflect" index mapping (period 2n, so radii larger than the axis work too).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// A tensor's shape for the filters (a scalar is one element).
fn dims(shape: &[usize]) -> Vec<usize> {
    if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    }
}

/// A separable filter, scipy's way: along each axis in turn, every element becomes
/// `line(at, i)` (in f64, rounded to f32), where `i` is its index on that axis and `at(k)`
/// reads the line at index `k` with "reflect" boundaries.
fn along_axes(
    x: &[f32],
    shape: &[usize],
    line: impl Fn(&dyn Fn(isize) -> f64, isize) -> f64 + Sync,
) -> Vec<f32> {
    let st = strides(shape);
    let mut cur = x.to_vec();
    for d in 0..shape.len() {
        let (n, s) = (shape[d], st[d]);
        let src = cur.clone();
        cur.par_iter_mut().enumerate().for_each(|(flat, o)| {
            let i = flat / s % n;
            let base = flat - i * s;
            let at = |k: isize| src[base + reflect(k, n) * s] as f64;
            *o = line(&at, i as isize) as f32;
        });
    }
    cur
}

/// `scipy.ndimage.median_filter(x, size=3, mode="reflect")`.
pub fn median3(x: &[f32], shape: &[usize]) -> Vec<f32> {
    let shape = dims(shape);
    let st = strides(&shape);
    let nd = shape.len();
    let window = 3usize.pow(nd as u32);
    let mut out = vec![0f32; x.len()];
    out.par_iter_mut()
        .enumerate()
        .for_each_init(Vec::new, |buf, (flat, o)| {
            buf.clear();
            let idx: Vec<usize> = (0..nd).map(|d| flat / st[d] % shape[d]).collect();
            for w in 0..window {
                let mut at = 0;
                let mut rest = w;
                for d in 0..nd {
                    let off = (rest % 3) as isize - 1;
                    rest /= 3;
                    at += reflect(idx[d] as isize + off, shape[d]) * st[d];
                }
                buf.push(x[at]);
            }
            let mid = buf.len() / 2;
            let (_, m, _) = buf.select_nth_unstable_by(mid, f32::total_cmp);
            *o = *m;
        });
    out
}

/// `scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=4.0)`: a normalized
/// 1-D kernel of radius `round(4*sigma)` applied along each axis in turn.
pub fn gaussian(x: &[f32], shape: &[usize], sigma: f64) -> Vec<f32> {
    let shape = dims(shape);
    let radius = (4.0 * sigma + 0.5) as isize;
    let mut w: Vec<f64> = (-radius..=radius)
        .map(|i| (-0.5 * (i * i) as f64 / (sigma * sigma)).exp())
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    along_axes(x, &shape, |at, i| {
        w.iter()
            .enumerate()
            .map(|(k, wk)| wk * at(i + k as isize - radius))
            .sum()
    })
}

/// scipy's normalised σ = 1 kernel (`_gaussian_kernel1d(1, 0, 4)`), as numpy computes it
/// (pasted bit for bit from numpy 2.4: its `exp` and pairwise sum).
const SCIPY_SIGMA1: [f64; 5] = [
    0.000_133_830_624_614_741_75, // |x| = 4
    0.004_431_861_620_031_265_5,  // 3
    0.053_991_127_420_704_41,     // 2
    0.241_971_445_656_600_73,     // 1
    0.398_943_469_356_097_76,     // 0
];

/// `scipy.ndimage.gaussian_filter(x, sigma=1, mode="reflect")` operation by operation, as
/// SuperMerger's numerics need it: per axis, scipy's symmetric accumulation in f64
/// (`x[i]·w0`, then `(x[i-j] + x[i+j])·wj` from the outermost pair in), rounded to f32.
pub fn gaussian_scipy(x: &[f32], shape: &[usize]) -> Vec<f32> {
    along_axes(x, &dims(shape), |at, i| {
        let mut acc = at(i) * SCIPY_SIGMA1[4];
        for j in (1..=4isize).rev() {
            acc += (at(i - j) + at(i + j)) * SCIPY_SIGMA1[(4 - j) as usize];
        }
        acc
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scipy_kernel_constants() {
        // numpy's float.hex() of _gaussian_kernel1d(1.0, 0, 4), centre outwards.
        let hex = [
            (0x19884a307594fbu64, -2i32),
            (0x1ef8eb9ad499ba, -3),
            (0x1ba4b99d1799ab, -5),
            (0x122724cb7eb269, -8),
            (0x118a9c4fd536c6, -13),
        ];
        for (k, (m, e)) in hex.iter().enumerate() {
            let v = *m as f64 / (1u64 << 52) as f64 * 2f64.powi(*e);
            assert_eq!(SCIPY_SIGMA1[4 - k], v, "weight {k}");
        }
        // The same as `gaussian`'s own kernel to within an ulp or two.
        let g = gaussian(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], &[9], 1.0);
        let s = gaussian_scipy(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], &[9]);
        for (x, y) in g.iter().zip(&s) {
            assert!((x - y).abs() <= 2.0 * f32::EPSILON * y.abs(), "{x} {y}");
        }
    }

    #[test]
    fn scipy_order_known_answers() {
        // scipy.ndimage.gaussian_filter(np.arange(7, dtype=np.float32) ** 2 - 5, sigma=1)
        // printed by scipy 1.17.1 (float32 output, hex of each value).
        let x: Vec<f32> = (0..7).map(|i| (i * i) as f32 - 5.0).collect();
        let want: [u32; 7] = [
            0xc08daae9, 0xc0445a92, 0xbba0bd17, 0x409ff010, 0x413efe57, 0x41a0ee98, 0x41d39650,
        ];
        let got = gaussian_scipy(&x, &[7]);
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
    }

    #[test]
    fn reflect_mode() {
        // d c b a | a b c d | d c b a
        let n = 4;
        let got: Vec<usize> = (-4..8).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn median_known_answers() {
        // scipy.ndimage.median_filter([1, 5, 2, 8, 3], size=3) == [1, 2, 5, 3, 3]
        assert_eq!(
            median3(&[1.0, 5.0, 2.0, 8.0, 3.0], &[5]),
            vec![1.0, 2.0, 5.0, 3.0, 3.0]
        );
        // A constant image stays constant; an isolated spike disappears in 2-D.
        let mut img = vec![2.0f32; 16];
        img[5] = 100.0;
        assert!(median3(&img, &[4, 4]).iter().all(|v| *v == 2.0));
    }

    #[test]
    fn gaussian_against_direct_reference() {
        // Independent reference: direct 1-D correlation with explicit reflect padding.
        let x: Vec<f32> = (0..7).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let got = gaussian(&x, &[7], 1.0);
        let w: Vec<f64> = (-4..=4)
            .map(|i: i32| (-0.5 * (i * i) as f64).exp())
            .collect();
        let s: f64 = w.iter().sum();
        let pad = |i: i32| -> f64 {
            let j = if i < 0 {
                -i - 1
            } else if i >= 7 {
                13 - i
            } else {
                i
            };
            x[j as usize] as f64
        };
        for i in 0..7 {
            let want: f64 = (-4..=4).map(|k| w[(k + 4) as usize] / s * pad(i + k)).sum();
            assert!(
                (got[i as usize] as f64 - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                got[i as usize]
            );
        }
        // A constant signal is unchanged (normalized kernel).
        assert!(gaussian(&[3.0; 12], &[3, 4], 1.0)
            .iter()
            .all(|v| (v - 3.0).abs() < 1e-6));
    }
}
