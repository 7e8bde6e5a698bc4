//! fp8 checkpoints: plain F8_E4M3 / F8_E5M2 in and out, ComfyUI's scaled fp8 (dequantized
//! before any arithmetic, re-quantized with a fresh per-tensor scale), refusals of the
//! quantized layouts not read yet. References: an f64 blend and a brute-force nearest-even
//! fp8 rounding written here from the bit layout.

use std::path::Path;

use crate::common::*;
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::{DType, FloatType};
use mergesmith::merge::{merge_files, MergeFiles, MergeSpec, Mode, Plan, Ratio, RunOptions};

/// Every finite E4M3 (torch `float8_e4m3fn`) value with its byte: bias 7, 3 mantissa bits,
/// subnormals at exponent 0, only S.1111.111 is NaN.
fn e4m3_table() -> Vec<(u8, f64)> {
    (0u16..256)
        .map(|b| b as u8)
        .filter(|b| b & 0x7F != 0x7F)
        .map(|b| {
            let e = ((b & 0x7F) >> 3) as i32;
            let m = (b & 7) as f64;
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            (b, if b & 0x80 != 0 { -mag } else { mag })
        })
        .collect()
}

fn e4m3_value(b: u8) -> f64 {
    e4m3_table().into_iter().find(|(x, _)| *x == b).unwrap().1
}

/// Nearest E4M3 byte, ties to the even mantissa, saturating at +-448.
fn e4m3_nearest(table: &[(u8, f64)], v: f64) -> u8 {
    let v = v.clamp(-448.0, 448.0);
    let mut best = table[0];
    for &(b, x) in table {
        let (d, db) = ((x - v).abs(), (best.1 - v).abs());
        if d < db
            || (d == db && b & 1 == 0 && best.0 & 1 == 1)
            || (d == db && x == 0.0 && v.is_sign_negative() == (b & 0x80 != 0))
        {
            best = (b, x);
        }
    }
    best.0
}

struct T<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn write(path: &Path, tensors: &[T]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for t in tensors {
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [data.len(), data.len() + t.bytes.len()]}),
        );
        data.extend(&t.bytes);
    }
    raw_safetensors(path, &serde_json::Value::Object(header).to_string(), &data);
}

/// Deterministic fp8 bytes (finite values only).
fn fp8_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let b = (i as u8)
                .wrapping_mul(37)
                .wrapping_add(seed.wrapping_mul(11));
            if b & 0x7F == 0x7F {
                b ^ 1
            } else {
                b
            }
        })
        .map(|b| b & 0xBF) // keep magnitudes below 2 (exponent field < 8)
        .collect()
}

/// A Flux-shaped (BFL keys) file: two fp8 weights, a bf16 norm scale.
fn flux_fp8(path: &Path, seed: u8, scaled: Option<[f32; 2]>) {
    let mut t = vec![
        T {
            name: "double_blocks.0.img_attn.qkv.weight",
            dtype: "F8_E4M3",
            shape: vec![6, 4],
            bytes: fp8_bytes(24, seed),
        },
        T {
            name: "single_blocks.0.linear1.weight",
            dtype: "F8_E4M3",
            shape: vec![8, 4],
            bytes: fp8_bytes(32, seed + 1),
        },
        T {
            name: "double_blocks.0.img_attn.norm.key_norm.scale",
            dtype: "BF16",
            shape: vec![2],
            bytes: [1.0f32, 0.5]
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v + seed as f32 / 8.0).to_le_bytes())
                .collect(),
        },
    ];
    if let Some([s0, s1]) = scaled {
        t.push(T {
            name: "scaled_fp8",
            dtype: "F8_E4M3",
            shape: vec![0],
            bytes: vec![],
        });
        t.push(T {
            name: "double_blocks.0.img_attn.qkv.scale_weight",
            dtype: "F32",
            shape: vec![],
            bytes: s0.to_le_bytes().to_vec(),
        });
        t.push(T {
            name: "single_blocks.0.linear1.scale_weight",
            dtype: "F32",
            shape: vec![],
            bytes: s1.to_le_bytes().to_vec(),
        });
        t.push(T {
            name: "single_blocks.0.linear1.scale_input",
            dtype: "F32",
            shape: vec![],
            bytes: 1.0f32.to_le_bytes().to_vec(),
        });
    }
    write(path, &t);
}

fn merge(a: &Path, b: &Path, spec: &MergeSpec, out: &Path) -> mergesmith::error::Result<Plan> {
    merge_files(
        &MergeFiles { a, b, c: None },
        spec,
        out,
        &mergesmith::store::memo(&out.parent().unwrap().join("memo")),
        &RunOptions::default(),
    )
    .map(|(p, _)| p)
}

fn raw(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.data(ck.get(name).unwrap_or_else(|| panic!("{name}")))
        .to_vec()
}

fn f32_at(ck: &Checkpoint, name: &str) -> f32 {
    f32::from_le_bytes(raw(ck, name)[..4].try_into().unwrap())
}

const W: [&str; 2] = [
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
];

#[test]
fn plain_fp8_flux_files_merge_and_stay_fp8() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("m.safetensors"),
    );
    flux_fp8(&a, 1, None);
    flux_fp8(&b, 2, None);
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None);
    let plan = merge(&a, &b, &spec, &out).unwrap();
    assert_eq!(plan.blended(), 3, "every tensor, none silently copied");
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let table = e4m3_table();
    for w in W {
        assert_eq!(
            cm.get(w).unwrap().dtype,
            DType::F8E4M3,
            "keeps the input's storage"
        );
        let (x, y, m) = (raw(&ca, w), raw(&cb, w), raw(&cm, w));
        for i in 0..x.len() {
            // f32 arithmetic (as the merge does), rounded once to the nearest E4M3.
            let v = (0.7f32 * e4m3_value(x[i]) as f32 + 0.3f32 * e4m3_value(y[i]) as f32) as f64;
            assert_eq!(m[i], e4m3_nearest(&table, v), "{w}[{i}]: {v}");
        }
    }
    // An explicit output type: E5M2.
    let mut spec = spec;
    spec.dtype = Some(FloatType::Fp8E5m2);
    let out2 = d.join("m2.safetensors");
    merge(&a, &b, &spec, &out2).unwrap();
    assert_eq!(
        Checkpoint::open(&out2).unwrap().get(W[0]).unwrap().dtype,
        DType::F8E5M2
    );
}

#[test]
fn scaled_fp8_is_dequantized_then_requantized_with_a_fresh_scale() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("m.safetensors"),
    );
    let (sa, sb) = ([0.01f32, 0.002], [0.03f32, 0.0005]);
    flux_fp8(&a, 1, Some(sa));
    flux_fp8(&b, 2, Some(sb));
    let report = mergesmith::inspect::inspect(&a, None, false).unwrap();
    assert_eq!(
        report.quantization.as_deref(),
        Some("scaled fp8: 2 weights with per-tensor scales (`scaled_fp8`)")
    );
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    let plan = merge(&a, &b, &spec, &out).unwrap();
    assert_eq!(plan.blended(), 3);
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert!(cm.get("scaled_fp8").is_some(), "marker kept");
    assert_eq!(
        f32_at(&cm, "single_blocks.0.linear1.scale_input"),
        1.0,
        "input scale carried"
    );
    let table = e4m3_table();
    for (j, w) in W.iter().enumerate() {
        let (x, y, m) = (raw(&ca, w), raw(&cb, w), raw(&cm, w));
        let merged: Vec<f32> = (0..x.len())
            .map(|i| {
                0.5f32 * (e4m3_value(x[i]) as f32 * sa[j])
                    + 0.5f32 * (e4m3_value(y[i]) as f32 * sb[j])
            })
            .collect();
        let amax = merged.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 448.0;
        let sk = w.replace(".weight", ".scale_weight");
        assert_eq!(f32_at(&cm, &sk), scale, "{sk}");
        for i in 0..x.len() {
            assert_eq!(
                m[i],
                e4m3_nearest(&table, (merged[i] / scale) as f64),
                "{w}[{i}]"
            );
        }
        // The largest magnitude lands on 448 exactly.
        assert!(m.iter().any(|b| b & 0x7F == 0x7E));
    }
    // Dequantized output when a plain dtype is asked for: no scales, no marker.
    let mut plain = spec.clone();
    plain.dtype = Some(FloatType::Fp32);
    let out2 = d.join("plain.safetensors");
    let plan = merge(&a, &b, &plain, &out2).unwrap();
    assert_eq!(plan.dequantized, 2);
    let cp = Checkpoint::open(&out2).unwrap();
    assert!(cp.tensors().iter().all(|t| !t.name.contains("scale_weight")
        && t.name != "scaled_fp8"
        && !t.name.ends_with("scale_input")));
    let got = f32::from_le_bytes(raw(&cp, W[1])[..4].try_into().unwrap());
    let want = 0.5f32 * (e4m3_value(raw(&ca, W[1])[0]) as f32 * sa[1])
        + 0.5f32 * (e4m3_value(raw(&cb, W[1])[0]) as f32 * sb[1]);
    assert_eq!(got, want);
}

#[test]
fn kept_scaled_weights_keep_their_bytes_and_scale() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("m.safetensors"),
    );
    flux_fp8(&a, 1, Some([0.01, 0.002]));
    flux_fp8(&b, 2, Some([0.03, 0.0005]));
    // D00 at 0 (kept from A), S00 at 0.5; 61 SuperMerger slots.
    let mut v = vec![0.5; 61];
    v[3] = 0.0;
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Blocks(v), None);
    merge(&a, &b, &spec, &out).unwrap();
    let (ca, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert_eq!(raw(&cm, W[0]), raw(&ca, W[0]));
    assert_eq!(
        f32_at(&cm, "double_blocks.0.img_attn.qkv.scale_weight"),
        0.01
    );
    assert_ne!(f32_at(&cm, "single_blocks.0.linear1.scale_weight"), 0.002);
}

#[test]
fn fp8_results_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    flux_fp8(&a, 3, Some([0.02, 0.004]));
    flux_fp8(&b, 4, Some([0.01, 0.001]));
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.37), None);
    let run = |threads: usize, name: &str| {
        let out = d.join(name);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| merge(&a, &b, &spec, &out).unwrap());
        std::fs::read(out).unwrap()
    };
    assert_eq!(run(1, "t1.safetensors"), run(2, "t2.safetensors"));
}

#[test]
fn quantized_layouts_not_read_yet_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.safetensors");
    flux_fp8(&a, 1, None);
    let nf4 = d.join("nf4.safetensors");
    write(
        &nf4,
        &[
            T {
                name: "double_blocks.0.img_attn.qkv.weight",
                dtype: "U8",
                shape: vec![12],
                bytes: vec![0; 12],
            },
            T {
                name: "double_blocks.0.img_attn.qkv.weight.absmax",
                dtype: "F32",
                shape: vec![1],
                bytes: vec![0; 4],
            },
        ],
    );
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    let err = merge(&a, &nf4, &spec, &d.join("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bitsandbytes") && err.contains(".absmax"),
        "{err}"
    );
    // A weight scale without the scaled_fp8 marker is a layout mergesmith does not know.
    let odd = d.join("odd.safetensors");
    write(
        &odd,
        &[
            T {
                name: "double_blocks.0.img_attn.qkv.weight",
                dtype: "F8_E4M3",
                shape: vec![6, 4],
                bytes: fp8_bytes(24, 1),
            },
            T {
                name: "double_blocks.0.img_attn.qkv.scale_weight",
                dtype: "F32",
                shape: vec![],
                bytes: 0.5f32.to_le_bytes().to_vec(),
            },
        ],
    );
    let err = merge(&a, &odd, &spec, &d.join("y.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `scaled_fp8` marker"), "{err}");
}

#[test]
fn a_recipe_chains_scaled_fp8_merges() {
    use mergesmith::build::{self, BuildOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    for (name, seed, scales) in [
        ("a", 1, [0.01f32, 0.002]),
        ("b", 2, [0.03, 0.0005]),
        ("c", 3, [0.02, 0.001]),
    ] {
        flux_fp8(
            &d.join(format!("models/{name}.safetensors")),
            seed,
            Some(scales),
        );
    }
    let nodes = "  ab:\n    merge: weight_sum\n    a: a\n    b: b\n    alpha: 0.5\n    cache: memory\n  abc:\n    merge: weight_sum\n    a: ab\n    b: c\n    alpha: 0.25\n  out:\n    save: abc\n    to: out/abc.safetensors\n";
    let path = d.join("recipe.yaml");
    std::fs::write(&path, recipe_yaml("models/", &["a", "b", "c"], nodes)).unwrap();
    let cache = mergesmith::store::Cache::new(&d.join("cache"));
    let recipe = mergesmith::recipe::load(&path).unwrap();
    build::build(&recipe, &cache, &[], &BuildOptions::default()).unwrap();
    let out = Checkpoint::open(d.join("out/abc.safetensors")).unwrap();
    assert!(out.get("scaled_fp8").is_some());
    assert_eq!(out.get(W[0]).unwrap().dtype, DType::F8E4M3);
    // The same result as the two merges one after the other from the CLI API.
    let (ab, abc) = (d.join("ab.safetensors"), d.join("abc.safetensors"));
    let spec = |al| MergeSpec::new(Mode::WeightSum, Ratio::Scalar(al), None);
    merge(
        &d.join("models/a.safetensors"),
        &d.join("models/b.safetensors"),
        &spec(0.5),
        &ab,
    )
    .unwrap();
    merge(&ab, &d.join("models/c.safetensors"), &spec(0.25), &abc).unwrap();
    let direct = Checkpoint::open(&abc).unwrap();
    for t in direct.tensors() {
        assert_eq!(raw(&out, &t.name), raw(&direct, &t.name), "{}", t.name);
    }
}

#[test]
fn generation_refuses_scaled_fp8_which_lora_jobs_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    flux_fp8(&a, 1, Some([0.01, 0.002]));
    flux_fp8(&b, 2, None);
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let err = mergesmith::checkpoint::quant::Quant::require_plain(&ca, "text to image")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text to image does not read scaled fp8"),
        "{err}"
    );
    // A plain fp8 file passes this check (and meets the family's own limits later).
    assert!(mergesmith::checkpoint::quant::Quant::require_plain(&cb, "x").is_ok());
    // LoRA baking and extraction read scaled fp8 (tests/it/flux_lora.rs checks the values).
    let opts = mergesmith::lora::extract::ExtractOptions::default();
    assert!(mergesmith::lora::extract::plan(&cb, &ca, &opts).is_ok());
    assert!(mergesmith::lora::bake::plan(&ca, &[], false).is_ok());
}

/// The two E4M3 values around `v` (equal when `v` is one), by brute force over the table.
fn e4m3_neighbours(table: &[(u8, f64)], v: f64) -> (f64, f64) {
    let below = table
        .iter()
        .map(|x| x.1)
        .filter(|x| *x <= v)
        .fold(f64::NEG_INFINITY, f64::max);
    let above = table
        .iter()
        .map(|x| x.1)
        .filter(|x| *x >= v)
        .fold(f64::INFINITY, f64::min);
    (below, above)
}

#[test]
fn stochastic_rounding_picks_a_neighbour_with_the_right_odds_whatever_the_split() {
    use mergesmith::convert::{encode_stochastic_into, stream_of};
    let table = e4m3_table();
    // 20 000 copies of 0.3 (between 0.28125 and 0.3125: up with probability 0.6).
    let n = 20_000;
    let x = 0.3f32;
    let encode = |values: &[f32], seed: u64, first: u64| {
        let mut out = vec![0u8; values.len()];
        encode_stochastic_into(values, DType::F8E4M3, &mut out, seed, stream_of("w"), first)
            .unwrap();
        out
    };
    let whole = encode(&vec![x; n], 7, 0);
    let (lo, hi) = e4m3_neighbours(&table, x as f64);
    assert_eq!((lo, hi), (0.28125, 0.3125));
    let ups = whole.iter().filter(|b| e4m3_value(**b) == hi).count();
    assert!(whole.iter().all(|b| [lo, hi].contains(&e4m3_value(*b))));
    let p = (x as f64 - lo) / (hi - lo);
    let sd = (p * (1.0 - p) / n as f64).sqrt();
    let freq = ups as f64 / n as f64;
    assert!((freq - p).abs() < 5.0 * sd, "{freq} vs {p}");
    // The same bytes when the tensor is encoded in two parts (as threads split it).
    let mut parts = encode(&vec![x; 12_345], 7, 0);
    parts.extend(encode(&vec![x; n - 12_345], 7, 12_345));
    assert_eq!(parts, whole);
    // Another seed or another tensor draws differently; representable values and values
    // beyond the range are not randomised (saturation at 448, like nearest).
    assert_ne!(encode(&vec![x; n], 8, 0), whole);
    let mut other = vec![0u8; n];
    encode_stochastic_into(&vec![x; n], DType::F8E4M3, &mut other, 7, stream_of("v"), 0).unwrap();
    assert_ne!(other, whole);
    let fixed = [0.3125f32, -2.0, 0.0, 1000.0, -1000.0, 448.0];
    let bytes = encode(&fixed, 7, 0);
    let back: Vec<f64> = bytes.iter().map(|b| e4m3_value(*b)).collect();
    assert_eq!(back, vec![0.3125, -2.0, 0.0, 448.0, -448.0, 448.0]);
    // Every value of a spread lands on one of its two neighbours (subnormals included).
    let spread: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0371).collect();
    for (v, b) in spread.iter().zip(encode(&spread, 3, 0)) {
        let (lo, hi) = e4m3_neighbours(&table, *v as f64);
        let got = e4m3_value(b);
        assert!(got == lo || got == hi, "{v} -> {got}");
    }
    let tiny: Vec<f32> = (1..500).map(|i| i as f32 * 1.3e-5).collect();
    for (v, b) in tiny.iter().zip(encode(&tiny, 3, 0)) {
        let (lo, hi) = e4m3_neighbours(&table, *v as f64);
        assert!([lo, hi].contains(&e4m3_value(b)), "{v}");
    }
}

#[test]
fn stochastic_rounding_in_a_merge_is_seeded_and_thread_independent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    flux_fp8(&a, 1, None);
    flux_fp8(&b, 2, None);
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None);
    spec.rounding = mergesmith::dtype::Rounding::Stochastic;
    spec.seed = 11;
    let run = |spec: &MergeSpec, threads: usize, name: &str| {
        let out = d.join(name);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| merge(&a, &b, spec, &out).unwrap());
        out
    };
    let (one, two) = (
        run(&spec, 1, "s1.safetensors"),
        run(&spec, 2, "s2.safetensors"),
    );
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());
    let nearest = run(
        &MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None),
        2,
        "n.safetensors",
    );
    let (ca, cb, cs, cn) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&one).unwrap(),
        Checkpoint::open(&nearest).unwrap(),
    );
    let table = e4m3_table();
    let mut differ = 0;
    for w in W {
        let (x, y, s, n) = (raw(&ca, w), raw(&cb, w), raw(&cs, w), raw(&cn, w));
        for i in 0..x.len() {
            let v = (0.7f32 * e4m3_value(x[i]) as f32 + 0.3f32 * e4m3_value(y[i]) as f32) as f64;
            let (lo, hi) = e4m3_neighbours(&table, v);
            assert!([lo, hi].contains(&e4m3_value(s[i])), "{w}[{i}]: {v}");
            differ += usize::from(s[i] != n[i]);
        }
    }
    assert!(differ > 0, "some values round the other way than nearest");
    // Another seed, other bytes.
    spec.seed = 12;
    let other = run(&spec, 1, "s3.safetensors");
    assert_ne!(std::fs::read(&one).unwrap(), std::fs::read(&other).unwrap());
}

#[test]
fn a_recipe_asks_for_stochastic_rounding() {
    use mergesmith::build::{self, BuildOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    flux_fp8(&d.join("models/a.safetensors"), 1, None);
    flux_fp8(&d.join("models/b.safetensors"), 2, None);
    let nodes = "  ab:\n    merge: weight_sum\n    a: a\n    b: b\n    alpha: 0.3\n    rounding: stochastic\n    seed: 11\n  out:\n    save: ab\n    to: out/ab.safetensors\n";
    let path = d.join("recipe.yaml");
    std::fs::write(&path, recipe_yaml("models/", &["a", "b"], nodes)).unwrap();
    let cache = mergesmith::store::Cache::new(&d.join("cache"));
    let recipe = mergesmith::recipe::load(&path).unwrap();
    build::build(&recipe, &cache, &[], &BuildOptions::default()).unwrap();
    // The same bytes as the merge API with the same rounding and seed.
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None);
    spec.rounding = mergesmith::dtype::Rounding::Stochastic;
    spec.seed = 11;
    let direct = d.join("direct.safetensors");
    merge(
        &d.join("models/a.safetensors"),
        &d.join("models/b.safetensors"),
        &spec,
        &direct,
    )
    .unwrap();
    let (out, direct) = (
        Checkpoint::open(d.join("out/ab.safetensors")).unwrap(),
        Checkpoint::open(&direct).unwrap(),
    );
    for w in W {
        assert_eq!(raw(&out, w), raw(&direct, w), "{w}");
    }
    // A misspelt value is an error naming the choices.
    std::fs::write(
        &path,
        recipe_yaml(
            "models/",
            &["a", "b"],
            &nodes.replace("stochastic", "stochastc"),
        ),
    )
    .unwrap();
    let err = format!("{:#}", mergesmith::recipe::load(&path).unwrap_err());
    assert!(
        err.contains("stochastc") && err.contains("stochastic"),
        "{err}"
    );
}

#[test]
fn plain_inputs_make_a_scaled_fp8_output_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("m.safetensors"),
    );
    flux_fp8(&a, 1, None);
    flux_fp8(&b, 2, None);
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None);
    spec.scaled = true;
    merge(&a, &b, &spec, &out).unwrap();
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    // The marker ComfyUI reads (its dtype names the fp8 type), a scale per linear weight.
    let marker = cm.get("scaled_fp8").expect("marker added");
    assert_eq!(
        (marker.dtype, marker.shape.clone()),
        (DType::F8E4M3, vec![0])
    );
    let table = e4m3_table();
    for w in W {
        let (x, y, m) = (raw(&ca, w), raw(&cb, w), raw(&cm, w));
        let merged: Vec<f32> = (0..x.len())
            .map(|i| {
                // The kernel's f32 form of A·(1 − α) + B·α: A + α·(B − A).
                let (p, q) = (e4m3_value(x[i]) as f32, e4m3_value(y[i]) as f32);
                p + 0.3f32 * (q - p)
            })
            .collect();
        let scale = merged.iter().fold(0f32, |a, v| a.max(v.abs())) / 448.0;
        let sk = w.replace(".weight", ".scale_weight");
        let st = cm.get(&sk).unwrap();
        assert_eq!((st.dtype, st.shape.clone()), (DType::F32, vec![]));
        assert_eq!(f32_at(&cm, &sk), scale, "{sk}");
        for i in 0..x.len() {
            assert_eq!(
                m[i],
                e4m3_nearest(&table, (merged[i] / scale) as f64),
                "{w}[{i}]"
            );
        }
    }
    // The 1-D norm scale is not a linear weight: it keeps A's bf16.
    let norm = "double_blocks.0.img_attn.norm.key_norm.scale";
    assert_eq!(cm.get(norm).unwrap().dtype, DType::BF16);
    // The output reads back as scaled fp8 and merges again.
    let q = mergesmith::checkpoint::quant::Quant::of(&cm).unwrap();
    assert_eq!(q.scales.len(), 2);
    merge(
        &out,
        &a,
        &MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None),
        &d.join("again.safetensors"),
    )
    .unwrap();
    // From a file with no fp8 at all, `scaled` needs an fp8 type.
    let sd = synth(
        d,
        "sd.safetensors",
        &tiny(mergesmith::arch::Family::builtin("sd1"), 1),
    );
    let sd2 = synth(
        d,
        "sd2.safetensors",
        &tiny(mergesmith::arch::Family::builtin("sd1"), 2),
    );
    let err = merge(&sd, &sd2, &spec, &d.join("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("give an fp8 output type"), "{err}");
    let mut with_type = spec.clone();
    with_type.dtype = Some(FloatType::Fp8E5m2);
    merge(&sd, &sd2, &with_type, &d.join("sd-scaled.safetensors")).unwrap();
    let s = Checkpoint::open(d.join("sd-scaled.safetensors")).unwrap();
    assert_eq!(
        s.get("model.diffusion_model.scaled_fp8").map(|t| t.dtype),
        Some(DType::F8E5M2)
    );
    let q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    let conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    assert_eq!(s.get(q).unwrap().dtype, DType::F8E5M2);
    assert!(s.get(&q.replace(".weight", ".scale_weight")).is_some());
    assert_eq!(
        s.get(conv).unwrap().dtype,
        DType::F16,
        "convolutions keep A's type"
    );
}

#[test]
fn list_methods_dequantize_scaled_fp8_and_need_a_dtype() {
    use mergesmith::merge::method::find;
    use mergesmith::merge::multi::{merge_files as list_merge, ListFiles, ListSpec};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("m.safetensors"),
    );
    let (sa, sb) = ([0.01f32, 0.002], [0.03f32, 0.0005]);
    flux_fp8(&a, 1, Some(sa));
    flux_fp8(&b, 2, Some(sb));
    let m = find("linear").unwrap();
    let mut spec = ListSpec {
        method: m,
        params: m
            .params_of(&Default::default(), &Default::default())
            .unwrap(),
        weights: vec![Ratio::Scalar(1.0), Ratio::Scalar(3.0)],
        dtype: None,
        block_list: None,
    };
    let files = ListFiles {
        base: None,
        terms: vec![(a.clone(), None), (b.clone(), None)],
    };
    let run = |spec: &ListSpec| {
        list_merge(
            &files,
            spec,
            &out,
            &mergesmith::store::memo(d),
            &RunOptions {
                overwrite: true,
                ..Default::default()
            },
        )
    };
    let e = run(&spec).unwrap_err().to_string();
    assert!(e.contains("scaled-fp8 inputs: set `dtype`"), "{e}");
    spec.dtype = Some(FloatType::Fp32);
    run(&spec).unwrap();
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert!(
        cm.get("scaled_fp8").is_none(),
        "the marker goes with plain output"
    );
    for (j, w) in W.iter().enumerate() {
        let (x, y) = (raw(&ca, w), raw(&cb, w));
        assert!(cm.get(&w.replace(".weight", ".scale_weight")).is_none());
        let got = mergesmith::convert::to_f32(DType::F32, &cm.view(w).unwrap().data).unwrap();
        for i in 0..x.len() {
            let want =
                (e4m3_value(x[i]) * sa[j] as f64 + 3.0 * e4m3_value(y[i]) * sb[j] as f64) / 4.0;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{w}[{i}]: {} vs {want}",
                got[i]
            );
        }
    }
}
