//! `numerics: supermerger` against SuperMerger's roundings, written out per element here with
//! the `half` crate (each torch op on fp16 tensors: f32 arithmetic, one rounding to fp16),
//! on tiny fp16 SD1 models. tools/parity_supermerger.py runs SuperMerger's own code.

use std::path::{Path, PathBuf};

use crate::common::*;
use half::f16;
use mergesmith::arch::Family;
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::{DType, FloatType};
use mergesmith::merge::numerics::Numerics;
use mergesmith::merge::{merge_files, CalcMode, MergeFiles, MergeSpec, Mode, Ratio, RunOptions};

const K2: &str = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
const IN_W: &str = "model.diffusion_model.input_blocks.0.0.weight";
const OUT_B: &str = "model.diffusion_model.out.2.bias";

fn models() -> Models {
    related_models(Family::builtin("sd1"), FloatType::Fp16, 31, 0.3, 0)
}

fn spec(mode: Mode, calc: CalcMode, alpha: f64, beta: Option<f64>, n: Numerics) -> MergeSpec {
    let mut s = MergeSpec::new(mode, Ratio::Scalar(alpha), beta.map(Ratio::Scalar));
    s.calcmode = calc;
    s.numerics = n;
    s
}

fn run(m: &Models, c: &Path, s: &MergeSpec, out: &str) -> PathBuf {
    let out = m.dir.path().join(out);
    merge_files(
        &MergeFiles {
            a: &m.a,
            b: &m.b,
            c: s.mode.uses_c().then_some(c),
        },
        s,
        &out,
        &mergesmith::store::memo(m.dir.path()),
        &RunOptions {
            overwrite: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    out
}

/// A key's values (as f32) and stored dtype.
fn key(p: &Path, k: &str) -> (Vec<f32>, DType) {
    let ck = Checkpoint::open(p).unwrap();
    let v = ck.view(k).unwrap();
    (
        mergesmith::convert::to_f32(v.dtype, &v.data).unwrap(),
        v.dtype,
    )
}

fn h(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// torch's f32 lerp kernel: `a + w(b - a)` for |w| < 0.5, else `b - (1 - w)(b - a)`, each
/// with one rounding (a fused multiply-add; the product is exact in f64).
fn lerp(s: f32, e: f32, w: f32) -> f32 {
    let d = (e - s) as f64; // rounded to f32 first, as the kernel does
    if w.abs() < 0.5 {
        (s as f64 + w as f64 * d) as f32
    } else {
        (e as f64 + (w as f64 - 1.0) * d) as f32
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn add_difference_in_fp16_steps() {
    let m = models();
    let alpha = 0.37;
    let sm = run(
        &m,
        &m.c,
        &spec(
            Mode::AddDifference,
            CalcMode::Normal,
            alpha,
            None,
            Numerics::Supermerger,
        ),
        "sm.safetensors",
    );
    let f32n = run(
        &m,
        &m.c,
        &spec(
            Mode::AddDifference,
            CalcMode::Normal,
            alpha,
            None,
            Numerics::F32,
        ),
        "f32.safetensors",
    );
    let ((a, _), (b, _), (c, _)) = (key(&m.a, K2), key(&m.b, K2), key(&m.c, K2));
    // theta_1 = (B - C).half(); A + alpha * theta_1, both ops in fp16.
    let want: Vec<f32> = (0..a.len())
        .map(|i| h(a[i] + h(h(b[i] - c[i]) * alpha as f32)))
        .collect();
    let (got, dt) = key(&sm, K2);
    assert_eq!(dt, DType::F16);
    assert_eq!(bits(&got), bits(&want));
    // f32 numerics round once: some elements differ (the test can tell the two apart).
    let (once, _) = key(&f32n, K2);
    assert!(bits(&once) != bits(&got));
    let once_want: Vec<u32> = (0..a.len())
        .map(|i| h(a[i] + alpha as f32 * (b[i] - c[i])).to_bits())
        .collect();
    assert_eq!(bits(&once), once_want);
}

#[test]
fn triple_sum_lerps_in_fp16() {
    let m = models();
    let (alpha, beta) = (0.3, 0.45);
    let out = run(
        &m,
        &m.c,
        &spec(
            Mode::TripleSum,
            CalcMode::Normal,
            alpha,
            Some(beta),
            Numerics::Supermerger,
        ),
        "t.safetensors",
    );
    let ((a, _), (b, _), (c, _)) = (key(&m.a, K2), key(&m.b, K2), key(&m.c, K2));
    // lerp(A, lerp(B, C, beta/(alpha+beta)), alpha+beta) on fp16 tensors.
    let (wi, wo) = ((beta / (alpha + beta)) as f32, (alpha + beta) as f32);
    let want: Vec<f32> = (0..a.len())
        .map(|i| h(lerp(a[i], h(lerp(b[i], c[i], wi)), wo)))
        .collect();
    let (got, dt) = key(&out, K2);
    assert_eq!(dt, DType::F16);
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn train_difference_and_smooth_add_write_fp32_keys() {
    let m = models();
    for calc in [
        CalcMode::TrainDifference,
        CalcMode::SmoothAdd,
        CalcMode::SmoothAddMt,
    ] {
        let sm = run(
            &m,
            &m.c,
            &spec(Mode::AddDifference, calc, 0.5, None, Numerics::Supermerger),
            "sm.safetensors",
        );
        let f32n = run(
            &m,
            &m.c,
            &spec(Mode::AddDifference, calc, 0.5, None, Numerics::F32),
            "f32.safetensors",
        );
        assert_eq!(key(&sm, K2).1, DType::F32, "{calc:?}");
        assert_eq!(key(&f32n, K2).1, DType::F16, "{calc:?}");
        // Keys SuperMerger does not merge keep A's type.
        let pid = "cond_stage_model.transformer.text_model.embeddings.position_ids";
        let dtype = |p: &Path| Checkpoint::open(p).unwrap().get(pid).unwrap().dtype;
        assert_eq!(dtype(&sm), dtype(&m.a));
    }
    // trainDifference with B = C: SuperMerger leaves every key as A (and in A's type).
    let same = run(
        &m,
        &m.b,
        &spec(
            Mode::AddDifference,
            CalcMode::TrainDifference,
            0.5,
            None,
            Numerics::Supermerger,
        ),
        "same.safetensors",
    );
    let (got, dt) = key(&same, K2);
    assert_eq!(dt, DType::F16);
    assert_eq!(bits(&got), bits(&key(&m.a, K2).0));
}

#[test]
fn adjust_rounds_in_fp16_and_promotes_the_bias_add() {
    let m = models();
    let adjust = [2.0, 1.0, 3.0, 4.0, 1.0, 0.5, -1.0, 2.0];
    let mut s = spec(
        Mode::WeightSum,
        CalcMode::Normal,
        0.4,
        None,
        Numerics::Supermerger,
    );
    s.adjust = Some(adjust);
    let out = run(&m, &m.c, &s, "adj.safetensors");
    let ((a, _), (b, _)) = (key(&m.a, IN_W), key(&m.b, IN_W));
    // lerp in f32 -> fp16 (A's type), then * (1 - IN*0.01) in fp16.
    let scale = (1.0 - adjust[0] * 0.01) as f32;
    let want: Vec<f32> = (0..a.len())
        .map(|i| h(h(lerp(a[i], b[i], 0.4)) * scale))
        .collect();
    let (got, dt) = key(&out, IN_W);
    assert_eq!(dt, DType::F16);
    assert_eq!(bits(&got), bits(&want));
    // out.2.bias: + torch.tensor([CONT*0.02, colours...]) promotes to fp32.
    let (bias, dt) = key(&out, OUT_B);
    assert_eq!(dt, DType::F32);
    let ((ab, _), (bb, _)) = (key(&m.a, OUT_B), key(&m.b, OUT_B));
    let merged = |i: usize| h(lerp(ab[i], bb[i], 0.4));
    // SD colour terms: per channel j, sum_i COLS[i][j] * v[4+i] * 0.02.
    let cols = [
        [-1.0, 1.0 / 3.0, 2.0 / 3.0],
        [1.0, 1.0, 0.0],
        [0.0, -1.0, -1.0],
        [1.0, 0.0, 1.0],
    ];
    let add: Vec<f32> = std::iter::once(adjust[3] * 0.02)
        .chain((0..3).map(|j| {
            (0..4)
                .map(|i| cols[i][j] * adjust[4 + i] * 0.02)
                .sum::<f64>()
        }))
        .map(|v| v as f32)
        .collect();
    for (i, v) in bias.iter().enumerate() {
        assert_eq!(*v, merged(i) + add[i], "{i}");
    }
    // f32 numerics keep A's type.
    s.numerics = Numerics::F32;
    let plain = run(&m, &m.c, &s, "adj32.safetensors");
    assert_eq!(key(&plain, OUT_B).1, DType::F16);
}

#[test]
fn smooth_add_mt_adjusts_a_before_the_add() {
    let m = models();
    let adjust = [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let scale = (1.0 - adjust[0] * 0.01) as f32;
    let with = |calc, adjust: Option<[f64; 8]>| {
        let mut s = spec(Mode::AddDifference, calc, 0.5, None, Numerics::Supermerger);
        s.adjust = adjust;
        key(&run(&m, &m.c, &s, "x.safetensors"), IN_W).0
    };
    let plain = with(CalcMode::SmoothAdd, None);
    let mt = with(CalcMode::SmoothAddMt, Some(adjust));
    let st = with(CalcMode::SmoothAdd, Some(adjust));
    let (a, _) = key(&m.a, IN_W);
    for i in 0..a.len() {
        let t = plain[i] - a[i]; // alpha * filtered difference (to an f32 rounding)
                                 // MT: fp16(A * s) + t; smoothAdd: (A + t) * s in f32.
        let want_mt = h(a[i] * scale) + t;
        let want_st = plain[i] * scale;
        let tol = 4.0 * f32::EPSILON * a[i].abs().max(t.abs()).max(1e-3);
        assert!(
            (mt[i] - want_mt).abs() <= tol,
            "MT {i}: {} vs {want_mt}",
            mt[i]
        );
        assert!(
            (st[i] - want_st).abs() <= tol,
            "smoothAdd {i}: {} vs {want_st}",
            st[i]
        );
    }
}

#[test]
fn elemental_dice_ratios_are_drawn_per_key() {
    use mergesmith::merge::dice::{Dice, LegacyRandom};
    let m = models();
    let k = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight";
    let mut s = spec(Mode::WeightSum, CalcMode::Normal, 0.5, None, Numerics::F32);
    s.elemental = Some("OUT03::R".into());
    // Without a dice seed the token is an error that says what to add.
    let e = merge_files(
        &MergeFiles {
            a: &m.a,
            b: &m.b,
            c: None,
        },
        &s,
        &m.dir.path().join("x.safetensors"),
        &mergesmith::store::memo(m.dir.path()),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dice seed"), "{e}");
    s.dice = Some(Dice::new(7));
    let out = run(&m, &m.c, &s, "dice.safetensors");
    // SuperMerger: the key's position n among A's keys (sorted), ratio round(r[n + 100], 3).
    let mut names: Vec<String> = Checkpoint::open(&m.a)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    names.sort();
    let n = names.iter().position(|n| n == k).unwrap();
    let mut rng = LegacyRandom::new(7);
    let r = (0..=n + 100).map(|_| rng.random_sample()).last().unwrap();
    let ratio = ((r * 1000.0).round_ties_even() / 1000.0) as f32;
    let ((a, _), (b, _), (got, _)) = (key(&m.a, k), key(&m.b, k), key(&out, k));
    for i in 0..a.len() {
        assert_eq!(got[i], h(a[i] + ratio * (b[i] - a[i])), "{i}");
    }
}
