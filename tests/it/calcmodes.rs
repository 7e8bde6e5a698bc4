//! Calcmodes against straightforward f64 references written here, on tiny fp32 models.

use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::FloatType;
use mergesmith::merge::{merge_files, CalcMode, MergeFiles, MergeSpec, Mode, Ratio, RunOptions};

fn models() -> Models {
    related_models(Family::builtin("sd1"), FloatType::Fp32, 21, 0.4, 0)
}

fn spec(mode: Mode, calc: CalcMode, alpha: f64, beta: Option<f64>) -> MergeSpec {
    let mut s = MergeSpec::new(mode, Ratio::Scalar(alpha), beta.map(Ratio::Scalar));
    s.calcmode = calc;
    s
}

fn run(m: &Models, s: &MergeSpec, out: &str) -> mergesmith::Result<PathBuf> {
    let out = m.dir.path().join(out);
    let c = s.mode.uses_c().then_some(m.c.as_path());
    merge_files(
        &MergeFiles {
            a: &m.a,
            b: &m.b,
            c,
        },
        s,
        &out,
        &mergesmith::store::memo(m.dir.path()),
        &RunOptions::default(),
    )?;
    Ok(out)
}

fn vals(p: &Path, k: &str) -> Vec<f64> {
    let ck = Checkpoint::open(p).unwrap();
    let v = ck.view(k).unwrap();
    mergesmith::convert::any_to_f32(v.dtype, &v.data)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn shape(p: &Path, k: &str) -> Vec<usize> {
    Checkpoint::open(p).unwrap().get(k).unwrap().shape.clone()
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

const K2: &str = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
const K4: &str = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
const K1: &str = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias";
const NORM: &str = "model.diffusion_model.input_blocks.1.1.norm.weight";

#[test]
fn train_difference() {
    let m = models();
    let out = run(
        &m,
        &spec(Mode::AddDifference, CalcMode::TrainDifference, 0.7, None),
        "td.safetensors",
    )
    .unwrap();
    for k in [K1, K2, K4] {
        let (a, b, c) = (vals(&m.a, k), vals(&m.b, k), vals(&m.c, k));
        let want: Vec<f64> = (0..a.len())
            .map(|i| {
                let den = (b[i] - c[i]).abs() + (b[i] - a[i]).abs();
                if den == 0.0 {
                    a[i]
                } else {
                    a[i] + 1.8 * 0.7 * (b[i] - c[i]) * (b[i] - a[i]).abs() / den
                }
            })
            .collect();
        close(&vals(&out, k), &want, 1e-5, k);
    }
}

#[test]
fn self_and_plus_random() {
    let m = models();
    let out = run(
        &m,
        &spec(Mode::WeightSum, CalcMode::SelfScale, 0.6, None),
        "self.safetensors",
    )
    .unwrap();
    let want: Vec<f64> = vals(&m.a, K2).iter().map(|x| 0.6 * x).collect();
    close(&vals(&out, K2), &want, 1e-6, K2);
    assert_eq!(
        vals(&out, NORM),
        vals(&m.a, NORM),
        "norm keys are left alone"
    );

    let mut s = spec(Mode::WeightSum, CalcMode::PlusRandom, 0.5, None);
    s.seed = 7;
    let r1 = run(&m, &s, "r1.safetensors").unwrap();
    let r2 = run(&m, &s, "r2.safetensors").unwrap();
    s.seed = 8;
    let r3 = run(&m, &s, "r3.safetensors").unwrap();
    assert_eq!(
        std::fs::read(&r1).unwrap()[..],
        std::fs::read(&r2).unwrap()[..],
        "seeded: same bytes"
    );
    assert_ne!(vals(&r1, K4), vals(&r3, K4));
    // (out - A) / alpha is standard normal noise.
    let big = "model.diffusion_model.middle_block.0.in_layers.2.weight";
    let noise: Vec<f64> = vals(&r1, big)
        .iter()
        .zip(vals(&m.a, big))
        .map(|(o, a)| (o - a) / 0.5)
        .collect();
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        n > 1000.0 && mean.abs() < 0.1 && (sd - 1.0).abs() < 0.1,
        "mean {mean} sd {sd} over {n}"
    );
    assert_eq!(vals(&r1, NORM), vals(&m.a, NORM));
}

fn slice_reference(
    a: &[f64],
    b: &[f64],
    shape: &[usize],
    alpha: f64,
    beta: f64,
    dim1: bool,
) -> Vec<f64> {
    // Straight transcription of SuperMerger's slicing with Python slice clamping.
    let on1 = dim1 && shape.len() > 1;
    let (outer, len, inner) = if on1 {
        (shape[0], shape[1], shape[2..].iter().product::<usize>())
    } else {
        (1, shape[0], shape[1..].iter().product::<usize>())
    };
    let n = if on1 && shape[1] <= 100 {
        shape[0]
    } else {
        len
    } as f64;
    let (mut out, other, lo, hi) = if alpha + beta <= 1.0 {
        (
            a.to_vec(),
            b,
            (n * beta) as usize,
            (n * (alpha + beta)) as usize,
        )
    } else {
        (
            b.to_vec(),
            a,
            (n * (alpha + beta - 1.0)) as usize,
            (n * beta) as usize,
        )
    };
    for o in 0..outer {
        for j in lo.min(len)..hi.min(len) {
            for x in 0..inner {
                let i = (o * len + j) * inner + x;
                out[i] = other[i];
            }
        }
    }
    out
}

#[test]
fn tensor_and_tensor2() {
    let m = models();
    for (calc, dim1) in [(CalcMode::Tensor, false), (CalcMode::Tensor2, true)] {
        for (alpha, beta) in [(0.5, 0.75), (0.3, 0.2)] {
            let out = run(
                &m,
                &spec(Mode::WeightSum, calc, alpha, Some(beta)),
                &format!("{calc:?}{alpha}.safetensors"),
            )
            .unwrap();
            for k in [K1, K2, K4] {
                let want = slice_reference(
                    &vals(&m.a, k),
                    &vals(&m.b, k),
                    &shape(&m.a, k),
                    alpha,
                    beta,
                    dim1,
                );
                assert!(vals(&out, k) == want, "{calc:?} {alpha} {beta} {k}");
            }
        }
    }
    assert!(
        run(
            &m,
            &spec(Mode::WeightSum, CalcMode::Tensor, 0.5, None),
            "x.safetensors"
        )
        .is_err(),
        "needs beta"
    );
}

fn cos(x: &[f64], y: &[f64]) -> f64 {
    let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
    let nx = x.iter().map(|p| p * p).sum::<f64>().sqrt().max(1e-8);
    let ny = y.iter().map(|q| q * q).sum::<f64>().sqrt().max(1e-8);
    dot / (nx * ny)
}

#[test]
fn extract() {
    let m = models();
    let (alpha, beta, gamma) = (0.3, 0.4, 2.0);
    let mut s = spec(Mode::AddDifference, CalcMode::Extract, alpha, Some(beta));
    s.gamma = gamma;
    let out = run(&m, &s, "ex.safetensors").unwrap();
    for k in [K1, K2, K4] {
        let (a, b, c, sh) = (vals(&m.a, k), vals(&m.b, k), vals(&m.c, k), shape(&m.a, k));
        let row = *sh.last().unwrap();
        let mut want = Vec::new();
        for r in 0..a.len() / row {
            let s = r * row..(r + 1) * row;
            let da: Vec<f64> = s.clone().map(|i| b[i] - a[i]).collect();
            let db: Vec<f64> = s.clone().map(|i| c[i] - a[i]).collect();
            let d = ((cos(&da, &db).clamp(-1.0, 1.0) + 1.0) / 2.0).powf(gamma);
            let w = d * (1.0 - beta) + (1.0 - d) * beta;
            for (j, i) in s.enumerate() {
                want.push(a[i] + (da[j] * (1.0 - alpha) + db[j] * alpha) * w);
            }
        }
        close(&vals(&out, k), &want, 1e-5, k);
    }
    s.alpha = Ratio::Scalar(1.5);
    assert!(run(&m, &s, "bad.safetensors")
        .unwrap_err()
        .to_string()
        .contains("0 <= alpha <= 1"));
}

fn reflect(i: i64, n: i64) -> usize {
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// Direct N-D median-3 and Gaussian (sigma 1, radius 4, full N-D product kernel).
fn smooth_reference(x: &[f64], shape: &[usize]) -> Vec<f64> {
    let nd = shape.len();
    let strides: Vec<usize> = (0..nd).map(|d| shape[d + 1..].iter().product()).collect();
    let index = |f: usize| -> Vec<i64> {
        (0..nd)
            .map(|d| (f / strides[d] % shape[d]) as i64)
            .collect()
    };
    let at = |idx: &[i64]| -> usize {
        (0..nd)
            .map(|d| reflect(idx[d], shape[d] as i64) * strides[d])
            .sum()
    };
    let offsets = |r: i64| -> Vec<Vec<i64>> {
        let mut all = vec![vec![]];
        for _ in 0..nd {
            all = all
                .into_iter()
                .flat_map(|p: Vec<i64>| (-r..=r).map(move |o| [p.clone(), vec![o]].concat()))
                .collect();
        }
        all
    };
    let med: Vec<f64> = (0..x.len())
        .map(|f| {
            let i = index(f);
            let mut w: Vec<f64> = offsets(1)
                .iter()
                .map(|o| x[at(&i.iter().zip(o).map(|(a, b)| a + b).collect::<Vec<_>>())])
                .collect();
            w.sort_by(f64::total_cmp);
            w[w.len() / 2]
        })
        .collect();
    let g: Vec<f64> = (-4..=4)
        .map(|i: i64| (-0.5 * (i * i) as f64).exp())
        .collect();
    let gs: f64 = g.iter().sum();
    let offs = offsets(4);
    (0..x.len())
        .map(|f| {
            let i = index(f);
            offs.iter()
                .map(|o| {
                    let w: f64 = o.iter().map(|d| g[(d + 4) as usize] / gs).product();
                    w * med[at(&i.iter().zip(o).map(|(a, b)| a + b).collect::<Vec<_>>())]
                })
                .sum()
        })
        .collect()
}

#[test]
fn smooth_add_and_mt_agree_with_direct_filters() {
    let m = models();
    let out = run(
        &m,
        &spec(Mode::AddDifference, CalcMode::SmoothAdd, 0.8, None),
        "sm.safetensors",
    )
    .unwrap();
    let mt = run(
        &m,
        &spec(Mode::AddDifference, CalcMode::SmoothAddMt, 0.8, None),
        "mt.safetensors",
    )
    .unwrap();
    let (ca, cb) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&mt).unwrap(),
    );
    for t in ca.tensors() {
        assert!(
            ca.view(&t.name).unwrap().data == cb.view(&t.name).unwrap().data,
            "MT differs at {}",
            t.name
        );
    }
    // 1-D, 2-D (10x10) and 4-D (10x20x3x3 is 1800 elements: the 9^4 direct kernel is fine).
    for k in [
        K1,
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
    ] {
        let (a, b, c, sh) = (vals(&m.a, k), vals(&m.b, k), vals(&m.c, k), shape(&m.a, k));
        if a.len() > 4000 {
            continue;
        }
        let diff: Vec<f64> = b.iter().zip(&c).map(|(x, y)| x - y).collect();
        let f = smooth_reference(&diff, &sh);
        let want: Vec<f64> = a.iter().zip(f).map(|(x, f)| x + 0.8 * f).collect();
        close(&vals(&out, k), &want, 1e-5, k);
    }
}

#[test]
fn cosine_a_and_b() {
    let m = models();
    let (ca, cb) = (
        Checkpoint::open(&m.a).unwrap(),
        Checkpoint::open(&m.b).unwrap(),
    );
    for (calc, normalized) in [(CalcMode::CosineA, true), (CalcMode::CosineB, false)] {
        let alpha = 0.2;
        let out = run(
            &m,
            &spec(Mode::WeightSum, calc, alpha, None),
            &format!("{calc:?}.safetensors"),
        )
        .unwrap();
        // Reference: columns over dim 0, per-key samples (integer tensors too, as
        // SuperMerger's pre-pass takes CLIP's position ids), numpy-midpoint percentiles: the
        // 1st of all samples, then the 99th of what is left.
        let prep = |k: &str| {
            let sh = ca.get(k).unwrap().shape.clone();
            let (a, b) = (vals(&m.a, k), vals(&m.b, k));
            let (rows, cols) = if sh.len() >= 2 {
                (sh[0], a.len() / sh[0])
            } else {
                (a.len(), 1)
            };
            let norm = |v: &[f64]| -> Vec<f64> {
                if !normalized {
                    return v.to_vec();
                }
                let n: Vec<f64> = (0..cols)
                    .map(|j| {
                        (0..rows)
                            .map(|r| v[r * cols + j].powi(2))
                            .sum::<f64>()
                            .sqrt()
                            .max(1e-12)
                    })
                    .collect();
                v.iter().enumerate().map(|(i, x)| x / n[i % cols]).collect()
            };
            let (x, y) = (norm(&a), norm(&b));
            let col =
                |v: &[f64], j: usize| (0..rows).map(|r| v[r * cols + j]).collect::<Vec<f64>>();
            let sims: Vec<f64> = (0..cols).map(|j| cos(&col(&x, j), &col(&y, j))).collect();
            let flat = {
                let d: f64 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
                let n = x.iter().map(|p| p * p).sum::<f64>().sqrt()
                    * y.iter().map(|q| q * q).sum::<f64>().sqrt();
                if n > 0.0 {
                    d / n
                } else {
                    0.0
                }
            };
            (a, b, sims, flat, cols)
        };
        let mut samples = Vec::new();
        for t in ca.tensors() {
            let ok = t.name.contains("model")
                && !t.name.contains("first_stage_model")
                && cb.contains(&t.name);
            if ok {
                let (_, _, sims, flat, _) = prep(&t.name);
                samples.extend(
                    sims.into_iter()
                        .map(|s| if normalized { s } else { (s + flat) / 2.0 }),
                );
            }
        }
        assert!(ca
            .tensors()
            .iter()
            .any(|t| !t.dtype.is_float() && t.name.contains("model")));
        samples.sort_by(f64::total_cmp);
        let pct = |v: &[f64], q: f64| {
            let i = q / 100.0 * (v.len() - 1) as f64;
            let (a, b) = (v[i.floor() as usize], v[i.ceil() as usize]);
            if i.fract() == 0.0 {
                a
            } else {
                b - (b - a) * 0.5
            }
        };
        let lo = pct(&samples, 1.0);
        samples.retain(|s| *s >= lo);
        let hi = pct(&samples, 99.0);
        let kept: Vec<f64> = samples.iter().copied().filter(|s| *s <= hi).collect();
        let (smin, smax) = (kept[0], kept[kept.len() - 1]);
        for k in [K1, K2, K4] {
            let (a, b, sims, flat, cols) = prep(k);
            let kcol: Vec<f64> = sims
                .iter()
                .map(|s| (((s + flat) / 2.0 - smin) / (smax - smin) - alpha).clamp(0.0, 1.0))
                .collect();
            let want: Vec<f64> = (0..a.len())
                .map(|i| kcol[i % cols] * a[i] + (1.0 - kcol[i % cols]) * b[i])
                .collect();
            close(&vals(&out, k), &want, 1e-5, &format!("{calc:?} {k}"));
        }
        let vae = "first_stage_model.decoder.conv_in.weight";
        assert_eq!(vals(&out, vae), vals(&m.a, vae), "cosine leaves the VAE");
    }
}

#[test]
fn wrong_combinations_are_refused() {
    let m = models();
    let e = run(
        &m,
        &spec(Mode::AddDifference, CalcMode::CosineA, 0.5, None),
        "x.safetensors",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("applies to Weight sum only"), "{e}");
    let e = run(
        &m,
        &spec(Mode::WeightSum, CalcMode::TrainDifference, 0.5, None),
        "x.safetensors",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Add difference"), "{e}");
    let mut s = spec(Mode::AddDifference, CalcMode::Extract, 0.5, Some(0.5));
    s.beta = Some(Ratio::Blocks(vec![0.5; 26]));
    assert!(run(&m, &s, "x.safetensors").is_err());
}
