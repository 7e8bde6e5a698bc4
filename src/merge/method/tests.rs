//! Known answers of every list method, worked out by hand, on tensors built here.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

use super::job::{Minus, TermOps};
use super::{find, Engine, Job, Written};
use crate::dtype::DType;
use crate::merge::engine::Operand;
use crate::merge::Presets;

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn op<'a>(b: &'a [u8], shape: &'a [usize]) -> Operand<'a> {
    Operand {
        data: Cow::Borrowed(b),
        dtype: DType::F32,
        shape,
        scale: None,
    }
}

/// Runs `method` on one tensor: `base` (if any) and inputs `xs` (deltas when `deltas`: each
/// is given as its value, and the base is subtracted back out by building x = base + δ).
fn run(
    method: &str,
    shape: &[usize],
    base: Option<&[f32]>,
    xs: &[&[f32]],
    deltas: bool,
    weights: &[f64],
    params: &[(&str, Written)],
) -> Vec<f32> {
    let m = find(method).unwrap();
    let Engine::Streamed(kernel) = m.engine else {
        panic!("{method} is not a list method")
    };
    let written: BTreeMap<String, Written> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let p = m.params_of(&written, &Presets::default()).unwrap();
    let kp = m.resolve(&p, &|_, r| Ok(Some(r.base()))).unwrap().unwrap();
    let base_b = base.map(bytes);
    // Deltas are given as values: store x = base + δ and subtract the base again (exact in
    // f32 for the small integers and halves used here).
    let xb: Vec<Vec<u8>> = xs
        .iter()
        .map(|x| match (deltas, base) {
            (true, Some(b)) => bytes(&x.iter().zip(b).map(|(d, b)| d + b).collect::<Vec<_>>()),
            _ => bytes(x),
        })
        .collect();
    let job = Job {
        name: "t",
        shape,
        base: base_b.as_deref().map(|b| op(b, shape)),
        terms: xb
            .iter()
            .map(|x| TermOps {
                x: op(x, shape),
                minus: deltas.then_some(Minus::Base),
            })
            .collect(),
        weights: weights.to_vec(),
        params: &kp,
    };
    let n: usize = shape.iter().product();
    let out = Mutex::new(vec![f32::NAN; n]);
    kernel
        .merge(&job, &|lo, v| {
            out.lock().unwrap()[lo..lo + v.len()].copy_from_slice(v);
            Ok(())
        })
        .unwrap();
    out.into_inner().unwrap()
}

fn close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "[{i}]: got {g}, want {w} (all: {got:?})"
        );
    }
}

const D1: [f32; 4] = [1.0, -2.0, 3.0, 0.0];
const D2: [f32; 4] = [2.0, 1.0, -1.0, 0.5];
const D3: [f32; 4] = [-1.0, -1.0, 2.0, -0.5];

#[test]
fn ties_on_three_hand_made_vectors() {
    let base = [0.0f32; 4];
    // No trim: elected signs +, -, +, + (a zero sum elects +); disjoint means.
    let got = run(
        "ties",
        &[4],
        Some(&base),
        &[&D1, &D2, &D3],
        true,
        &[1.0; 3],
        &[],
    );
    close(&got, &[1.5, -1.5, 2.5, 0.5], 0.0);
    // density 0.5 keeps 2 of 4 per input; equal magnitudes go to the lower index:
    // δ1 -> [0,-2,3,0], δ2 -> [2,1,0,0] (|1| at 1 before |-1| at 2), δ3 -> [-1,0,2,0].
    let got = run(
        "ties",
        &[4],
        Some(&base),
        &[&D1, &D2, &D3],
        true,
        &[1.0; 3],
        &[("density", Written::Number(0.5))],
    );
    close(&got, &[2.0, -2.0, 2.5, 0.0], 0.0);
    // Weights enter the vote and the mean; lambda scales; a base is added back.
    let base = [10.0f32; 4];
    let got = run(
        "ties",
        &[4],
        Some(&base),
        &[&D1, &D2, &D3],
        true,
        &[1.0, 1.0, 4.0],
        &[("lambda", Written::Number(0.5))],
    );
    // element 0: wd = [1, 2, -4], sum -1 -> -; agree: -4 (w 4) -> -1; ×0.5 -> -0.5
    // element 1: [-2, 1, -4] -> -; (-2-4)/(1+4) = -1.2 -> -0.6
    // element 2: [3, -1, 8] -> +; (3+8)/5 = 2.2 -> 1.1
    // element 3: [0, 0.5, -2] -> -; -2/4 = -0.5 -> -0.25
    close(&got, &[9.5, 9.4, 11.1, 9.75], 1e-6);
    // normalize off sums the agreeing weighted deltas.
    let got = run(
        "ties",
        &[4],
        Some(&[0.0; 4]),
        &[&D1, &D2, &D3],
        true,
        &[1.0; 3],
        &[("normalize", Written::Flag(false))],
    );
    close(&got, &[3.0, -3.0, 5.0, 0.5], 0.0);
}

#[test]
fn dare_and_della_without_drops_are_task_arithmetic() {
    let base = [1.0f32, 2.0, 3.0, 4.0];
    let ta = run(
        "task_arithmetic",
        &[4],
        Some(&base),
        &[&D1, &D2],
        true,
        &[0.5, 0.25],
        &[],
    );
    close(&ta, &[2.0, 1.25, 4.25, 4.125], 0.0);
    let dare = run(
        "dare",
        &[4],
        Some(&base),
        &[&D1, &D2],
        true,
        &[0.5, 0.25],
        &[("density", Written::Number(1.0))],
    );
    assert_eq!(dare, ta);
    // With the vote, density 1 is TIES without trim (normalize off: sums).
    let dt = run(
        "dare_ties",
        &[4],
        Some(&[0.0; 4]),
        &[&D1, &D2, &D3],
        true,
        &[1.0; 3],
        &[("density", Written::Number(1.0))],
    );
    close(&dt, &[3.0, -3.0, 5.0, 0.5], 0.0);
}

#[test]
fn dare_keeps_or_drops_each_element_and_rescales() {
    let n = 20_000;
    let base = vec![0.0f32; n];
    let d: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 7.0).collect();
    for (rescale, density) in [("inverse", 0.3), ("none", 0.7)] {
        let got = run(
            "dare",
            &[n],
            Some(&base),
            &[&d],
            true,
            &[1.0],
            &[
                ("density", Written::Number(density)),
                ("rescale", Written::Text(rescale.into())),
                ("seed", Written::Number(7.0)),
            ],
        );
        let r = if rescale == "inverse" {
            1.0 / density
        } else {
            1.0
        };
        let mut kept = 0;
        for (g, x) in got.iter().zip(&d) {
            if *g != 0.0 {
                assert_eq!(*g, (*x as f64 * r) as f32);
                kept += 1;
            } else {
                assert!(*x == 0.0 || *g == 0.0);
            }
        }
        let nonzero = d.iter().filter(|x| **x != 0.0).count() as f64;
        let frac = kept as f64 / nonzero;
        // Binomial: 5 standard deviations.
        let sd = (density * (1.0 - density) / nonzero).sqrt();
        assert!((frac - density).abs() < 5.0 * sd, "{rescale}: kept {frac}");
    }
}

#[test]
fn slerp_ends_parallel_and_orthogonal() {
    let a = [1.0f32, 2.0, 3.0];
    let b = [0.5f32, -1.0, 4.0];
    let t = |v: f64| [("t", Written::Number(v))];
    assert_eq!(
        run("slerp", &[3], None, &[&a, &b], false, &[1.0; 2], &t(0.0)),
        a
    );
    assert_eq!(
        run("slerp", &[3], None, &[&a, &b], false, &[1.0; 2], &t(1.0)),
        b
    );
    // Parallel (and antiparallel) inputs: the linear blend.
    let b2 = [2.0f32, 4.0, 6.0];
    let got = run("slerp", &[3], None, &[&a, &b2], false, &[1.0; 2], &t(0.25));
    close(&got, &[1.25, 2.5, 3.75], 1e-6);
    let got = run(
        "slerp",
        &[2],
        None,
        &[&[1.0, 0.0], &[-1.0, 0.0]],
        false,
        &[1.0; 2],
        &t(0.5),
    );
    close(&got, &[0.0, 0.0], 1e-7);
    // Orthogonal unit vectors at t = 0.5: both coefficients sin(π/4)/sin(π/2).
    let got = run(
        "slerp",
        &[2],
        None,
        &[&[1.0, 0.0], &[0.0, 1.0]],
        false,
        &[1.0; 2],
        &t(0.5),
    );
    let h = std::f64::consts::FRAC_1_SQRT_2;
    close(&got, &[h, h], 1e-7);
}

#[test]
fn linear_model_stock_and_median() {
    let got = run(
        "linear",
        &[2],
        None,
        &[&[1.0, 2.0], &[3.0, 4.0]],
        false,
        &[1.0, 3.0],
        &[],
    );
    close(&got, &[2.5, 3.5], 0.0);
    let got = run(
        "linear",
        &[2],
        None,
        &[&[1.0, 2.0], &[3.0, 4.0]],
        false,
        &[1.0, 3.0],
        &[("normalize", Written::Flag(false))],
    );
    close(&got, &[10.0, 14.0], 0.0);
    // Model stock: orthogonal deltas (cos 0) keep the base; equal ones (cos 1) give the mean;
    // at 45° t = 2c/(1+c).
    let base = [0.0f32, 0.0];
    let ms = |x: &[f32], y: &[f32]| {
        run(
            "model_stock",
            &[2],
            Some(&base),
            &[x, y],
            false,
            &[1.0; 2],
            &[],
        )
    };
    close(&ms(&[1.0, 0.0], &[0.0, 1.0]), &[0.0, 0.0], 0.0);
    close(&ms(&[1.0, 1.0], &[1.0, 1.0]), &[1.0, 1.0], 1e-7);
    let c = std::f64::consts::FRAC_1_SQRT_2;
    let t = 2.0 * c / (1.0 + c);
    close(&ms(&[1.0, 0.0], &[1.0, 1.0]), &[t, 0.5 * t], 1e-6);
    // Geometric median of 0, 1 and 3 on a line is the middle point.
    let got = run(
        "geometric_median",
        &[1],
        None,
        &[&[0.0], &[1.0], &[3.0]],
        false,
        &[1.0; 3],
        &[],
    );
    close(&got, &[1.0], 1e-3);
    // Of the corners of a square: its centre (the mean, already a fixed point).
    let got = run(
        "geometric_median",
        &[2],
        None,
        &[&[0.0, 0.0], &[2.0, 0.0], &[0.0, 2.0], &[2.0, 2.0]],
        false,
        &[1.0; 4],
        &[],
    );
    close(&got, &[1.0, 1.0], 1e-6);
}

#[test]
fn della_probabilities_rank_along_dimension_one() {
    use super::sparse::della_probabilities;
    // A row: ranks by |x| 0.1 < 0.5 < 2 < 3 give density − ε + 2ε·(r−1)/3.
    let p = della_probabilities(&[1, 4], 0.5, 0.1, &[0.1, -3.0, 2.0, 0.5]);
    let want = [0.4, 0.6, 0.5 + 0.1 / 3.0, 0.5 - 0.1 / 3.0];
    for (g, w) in p.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{p:?}");
    }
    // A [1, 2, 1, 2] convolution: ranked over the 2 input channels per kernel position.
    let p = della_probabilities(&[1, 2, 1, 2], 0.5, 0.1, &[1.0, -5.0, 3.0, 2.0]);
    let want = [0.4, 0.6, 0.6, 0.4];
    for (g, w) in p.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{p:?}");
    }
}

#[test]
fn dare_masks_are_the_documented_streams() {
    use crate::merge::engine::CHUNK;
    use rand::RngExt;
    // Two chunks and a bit: one stream per (seed, tensor, input, chunk), each element's draw
    // in order; kept where the draw is below density, then the L1 rescale.
    let n = 2 * CHUNK + 1000;
    let base: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.25).collect();
    let d: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let density = 0.35;
    let got = run(
        "dare",
        &[n],
        Some(&base),
        &[&d],
        true,
        &[1.0],
        &[
            ("density", Written::Number(density)),
            ("seed", Written::Number(99.0)),
        ],
    );
    let mut keep = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(CHUNK) {
        let len = CHUNK.min(n - chunk * CHUNK);
        let mut r = crate::noise::rng("mergesmith dare v1", 99, "t", chunk as u64);
        for _ in 0..len {
            let u = (r.random::<u64>() >> 11) as f64 / (1u64 << 53) as f64;
            keep.push(u < density);
        }
    }
    // δ as the kernel sees it: (base + δ) − base in f32.
    let delta: Vec<f64> = d
        .iter()
        .zip(&base)
        .map(|(x, b)| ((x + b) - b) as f64)
        .collect();
    let all: f64 = delta.iter().map(|x| x.abs()).sum();
    let kept: f64 = delta
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(x, _)| x.abs())
        .sum();
    let r = all / kept;
    let want: Vec<f64> = (0..n)
        .map(|e| base[e] as f64 + if keep[e] { delta[e] * r } else { 0.0 })
        .collect();
    close(&got, &want, 1e-6);
    let frac = keep.iter().filter(|k| **k).count() as f64 / n as f64;
    assert!((frac - density).abs() < 0.01, "{frac}");
}
