//! The merge engine against an independent f64 reference, on tiny models with the real layouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::{self, Family};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::{DType, FloatType};
use mergesmith::merge::{merge_files, MergeFiles, MergeSpec, Mode, Presets, Ratio, RunOptions};
use mergesmith::synth::SynthVariant;

fn models(family: Family) -> Models {
    related_models(family, mergesmith::dtype::FloatType::Fp16, 1, 0.5, 2)
}

fn run(m: &Models, spec: &MergeSpec, c: bool, out: &str) -> PathBuf {
    let out = m.dir.path().join(out);
    let files = MergeFiles {
        a: &m.a,
        b: &m.b,
        c: c.then_some(m.c.as_path()),
    };
    merge_files(
        &files,
        spec,
        &out,
        &mergesmith::store::memo(&m.dir.path().join("cache")),
        &RunOptions::default(),
    )
    .unwrap();
    out
}

/// Merges A and B (no C) without progress output.
fn merge_ab(
    a: &Path,
    b: &Path,
    spec: &MergeSpec,
    out: &Path,
    memo: &mergesmith::hashing::HashMemo,
) -> mergesmith::Result<(
    mergesmith::merge::Plan,
    mergesmith::merge::engine::MergeReport,
)> {
    merge_files(
        &MergeFiles { a, b, c: None },
        spec,
        out,
        memo,
        &RunOptions::default(),
    )
}

/// The `sd_merge_recipe` metadata of a merged file.
fn recipe_of(p: &Path) -> serde_json::Value {
    serde_json::from_str(&Checkpoint::open(p).unwrap().metadata()["sd_merge_recipe"]).unwrap()
}

fn values(ck: &Checkpoint, name: &str) -> Vec<f64> {
    let v = ck.view(name).unwrap();
    mergesmith::convert::to_f32(v.dtype, &v.data)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// One unit in the last place of an f16 near `x` (subnormal spacing below 2^-14).
fn f16_ulp(x: f64) -> f64 {
    let e = x.abs().max(2f64.powi(-14)).log2().floor() as i32;
    2f64.powi(e - 10)
}

fn reference(mode: Mode, a: f64, b: f64, c: f64, alpha: f64, beta: f64) -> f64 {
    match mode {
        Mode::WeightSum => (1.0 - alpha) * a + alpha * b,
        Mode::AddDifference => a + alpha * (b - c),
        Mode::TripleSum => (1.0 - alpha - beta) * a + alpha * b + beta * c,
        Mode::SumTwice => (1.0 - beta) * ((1.0 - alpha) * a + alpha * b) + beta * c,
    }
}

/// Checks every tensor of `out` against the f64 reference: blended keys within one f16 ulp,
/// everything else bit-identical to A.
fn check_against_reference(
    m: &Models,
    out: &Path,
    mode: Mode,
    alpha: &dyn Fn(&str) -> f64,
    beta: f64,
) -> usize {
    let (ca, cb, cc, co) = (
        Checkpoint::open(&m.a).unwrap(),
        Checkpoint::open(&m.b).unwrap(),
        Checkpoint::open(&m.c).unwrap(),
        Checkpoint::open(out).unwrap(),
    );
    assert_eq!(co.tensors().len(), ca.tensors().len());
    let family = arch::detect(ca.tensors()).family;
    let mut blended = 0;
    for t in ca.tensors() {
        let class = arch::classify(family, &t.name);
        let o = co.view(&t.name).unwrap();
        if !class.mergeable || !t.dtype.is_float() {
            assert_eq!(
                o.data,
                ca.view(&t.name).unwrap().data,
                "{} must stay A",
                t.name
            );
            continue;
        }
        let (va, vb, vc, vo) = (
            values(&ca, &t.name),
            values(&cb, &t.name),
            values(&cc, &t.name),
            values(&co, &t.name),
        );
        let al = alpha(&t.name);
        for i in 0..va.len() {
            let r = reference(mode, va[i], vb[i], vc[i], al, beta);
            assert!(
                (vo[i] - r).abs() <= f16_ulp(r),
                "{} [{i}]: got {} want {r} (a {} b {} c {})",
                t.name,
                vo[i],
                va[i],
                vb[i],
                vc[i]
            );
        }
        if vo != va {
            blended += 1;
        }
    }
    blended
}

#[test]
fn every_mode_matches_the_f64_reference() {
    let m = models(Family::builtin("sd1"));
    let cases = [
        (Mode::WeightSum, 0.3, None),
        (Mode::AddDifference, 0.7, None),
        (Mode::TripleSum, 0.3, Some(0.45)),
        (Mode::SumTwice, 0.6, Some(0.25)),
        (Mode::AddDifference, -0.5, None),
        (Mode::WeightSum, 1.5, None),
    ];
    for (i, (mode, alpha, beta)) in cases.into_iter().enumerate() {
        let spec = MergeSpec::new(mode, Ratio::Scalar(alpha), beta.map(Ratio::Scalar));
        let out = run(&m, &spec, mode.uses_c(), &format!("out{i}.safetensors"));
        let blended = check_against_reference(&m, &out, mode, &|_| alpha, beta.unwrap_or(0.0));
        assert!(blended > 1000, "{mode:?}: {blended} tensors changed");
    }
}

#[test]
fn golden_exact_cases() {
    let m = models(Family::builtin("sd1"));
    let bytes = |p: &Path, k: &str| {
        Checkpoint::open(p)
            .unwrap()
            .view(k)
            .unwrap()
            .data
            .into_owned()
    };
    let k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight";
    // weight_sum alpha 0 = A and alpha 1 = B, bit for bit.
    let out = run(
        &m,
        &MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.0), None),
        false,
        "w0.safetensors",
    );
    assert!(bytes(&out, k) == bytes(&m.a, k));
    let out = run(
        &m,
        &MergeSpec::new(Mode::WeightSum, Ratio::Scalar(1.0), None),
        false,
        "w1.safetensors",
    );
    assert!(bytes(&out, k) == bytes(&m.b, k));
    // add_difference with B == C keeps A exactly, whatever alpha.
    let files = MergeFiles {
        a: &m.a,
        b: &m.b,
        c: Some(&m.b),
    };
    let out = m.dir.path().join("bc.safetensors");
    let spec = MergeSpec::new(Mode::AddDifference, Ratio::Scalar(0.8), None);
    merge_files(
        &files,
        &spec,
        &out,
        &mergesmith::store::memo(m.dir.path()),
        &RunOptions::default(),
    )
    .unwrap();
    // Equal values (IEEE: -0 + 0 = +0, so a negative zero of A may come back as +0).
    let (ca, co) = (
        Checkpoint::open(&m.a).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    for t in ca.tensors().iter().filter(|t| t.dtype.is_float()) {
        assert!(
            values(&co, &t.name) == values(&ca, &t.name),
            "{} differs from A",
            t.name
        );
    }
    // triple_sum with alpha + beta = 0: (1-0)A + 0.4B - 0.4C, not a shortcut.
    let spec = MergeSpec::new(
        Mode::TripleSum,
        Ratio::Scalar(0.4),
        Some(Ratio::Scalar(-0.4)),
    );
    let out = run(&m, &spec, true, "t0.safetensors");
    check_against_reference(&m, &out, Mode::TripleSum, &|_| 0.4, -0.4);
}

#[test]
fn changing_one_block_changes_exactly_that_block() {
    let m = models(Family::builtin("sd1"));
    let mut v = vec![0.5; 26];
    let first = run(
        &m,
        &MergeSpec::new(Mode::WeightSum, Ratio::Blocks(v.clone()), None),
        false,
        "v1.safetensors",
    );
    v[5] = 0.9; // IN04
    let second = run(
        &m,
        &MergeSpec::new(Mode::WeightSum, Ratio::Blocks(v.clone()), None),
        false,
        "v2.safetensors",
    );
    let (c1, c2) = (
        Checkpoint::open(&first).unwrap(),
        Checkpoint::open(&second).unwrap(),
    );
    let mut changed = Vec::new();
    for t in c1.tensors() {
        if c1.view(&t.name).unwrap().data != c2.view(&t.name).unwrap().data {
            changed.push(t.name.clone());
        }
    }
    let expected: Vec<String> = c1
        .tensors()
        .iter()
        .filter(|t| {
            let c = arch::classify(Family::builtin("sd1"), &t.name);
            c.mergeable && c.block.as_deref() == Some("IN04")
        })
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(changed, expected);
    assert_eq!(changed.len(), 38);
    // And each block's tensors follow that block's weight.
    let idx = |k: &str| {
        let b = arch::classify(Family::builtin("sd1"), k).block.unwrap();
        Family::builtin("sd1")
            .blocks()
            .iter()
            .position(|n| *n == b)
            .unwrap()
    };
    check_against_reference(&m, &second, Mode::WeightSum, &|k| v[idx(k)], 0.0);
}

#[test]
fn presets_and_sdxl_block_vectors() {
    let m = models(Family::builtin("sdxl"));
    let p = Presets::default();
    let grad = Ratio::parse("GRAD_V", &p).unwrap(); // 26 values, converted for SDXL
    let out = run(
        &m,
        &MergeSpec::new(Mode::WeightSum, grad.clone(), None),
        false,
        "xl.safetensors",
    );
    let Ratio::Blocks(v26) = grad else {
        unreachable!()
    };
    let xl_index = |k: &str| {
        let b = arch::classify(Family::builtin("sdxl"), k).block.unwrap();
        let i = Family::builtin("sdxl")
            .blocks()
            .iter()
            .position(|n| *n == b)
            .unwrap();
        // SDXL block i -> 26-list index: BASE, IN00-IN08 keep; M00 and OUT0x shift by 3.
        if i <= 9 {
            i
        } else {
            i + 3
        }
    };
    check_against_reference(&m, &out, Mode::WeightSum, &|k| v26[xl_index(k)], 0.0);
    let md = Checkpoint::open(&out).unwrap().metadata().clone();
    let recipe: serde_json::Value = serde_json::from_str(&md["sd_merge_recipe"]).unwrap();
    assert_eq!(recipe["mbw"], true);
    assert_eq!(recipe["weights_alpha"].as_array().unwrap().len(), 19);
}

#[test]
fn same_bytes_whatever_the_thread_count() {
    let m = models(Family::builtin("sd1"));
    let spec = MergeSpec::new(Mode::SumTwice, Ratio::Scalar(0.3), Some(Ratio::Scalar(0.2)));
    let mut files = Vec::new();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        files.push(pool.install(|| {
            std::fs::read(run(&m, &spec, true, &format!("t{threads}.safetensors"))).unwrap()
        }));
    }
    assert_eq!(files[0], files[1]);
    assert_eq!(files[0], files[2]);
}

#[test]
fn metadata_and_options() {
    let m = models(Family::builtin("sd1"));
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.25), None);
    spec.dtype = Some(FloatType::Bf16);
    spec.prune = true;
    spec.reset_position_ids = true;
    let out = run(&m, &spec, false, "opts.safetensors");
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck
        .tensors()
        .iter()
        .all(|t| t.dtype == DType::BF16 || t.dtype == DType::I64));
    assert!(ck.get("alphas_cumprod").is_none(), "pruned");
    let ids = ck
        .view("cond_stage_model.transformer.text_model.embeddings.position_ids")
        .unwrap();
    let ids: Vec<i64> = ids
        .data
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids, (0..77).collect::<Vec<_>>());

    let md = ck.metadata();
    assert_eq!(md["format"], "pt");
    let recipe: serde_json::Value = serde_json::from_str(&md["sd_merge_recipe"]).unwrap();
    let sha_a = mergesmith::hashing::hash_file(&m.a).unwrap().sha256;
    assert_eq!(recipe["type"], "sd-webui-supermerger");
    assert_eq!(recipe["mode"], "Weight sum");
    assert_eq!(recipe["model_a"], sha_a);
    assert_eq!(recipe["base_alpha"], 0.25);
    assert_eq!(recipe["mbw"], false);
    let models: serde_json::Value = serde_json::from_str(&md["sd_merge_models"]).unwrap();
    assert_eq!(models[&sha_a]["name"], "a.safetensors");
    assert_eq!(models[&sha_a]["legacy_hash"].as_str().unwrap().len(), 8);
}

#[test]
fn bake_vae_from_a_vae_file() {
    let m = models(Family::builtin("sd1"));
    // A VAE file with A1111-style keys (no first_stage_model. prefix), taken from C.
    let cc = Checkpoint::open(&m.c).unwrap();
    let vae_path = m.dir.path().join("vae.safetensors");
    let specs: Vec<_> = cc
        .tensors()
        .iter()
        .filter_map(|t| {
            t.name.strip_prefix("first_stage_model.").map(|n| {
                mergesmith::checkpoint::writer::TensorSpec {
                    name: n.to_string(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                }
            })
        })
        .collect();
    let w = mergesmith::checkpoint::writer::SafetensorsWriter::create(
        &vae_path,
        specs.clone(),
        &BTreeMap::new(),
        false,
    )
    .unwrap();
    for s in &specs {
        w.write(
            &s.name,
            &cc.view(&format!("first_stage_model.{}", s.name))
                .unwrap()
                .data,
        )
        .unwrap();
    }
    w.finish().unwrap();
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    spec.bake_vae = Some(vae_path);
    let out = Checkpoint::open(run(&m, &spec, false, "baked.safetensors")).unwrap();
    let k = "first_stage_model.decoder.conv_in.weight";
    assert_eq!(out.view(k).unwrap().data, cc.view(k).unwrap().data);
}

#[test]
fn inpainting_a_merges_its_first_four_channels() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = tiny(Family::builtin("sd1"), 11);
    o.variant = SynthVariant::Inpainting;
    o.dtype = FloatType::Fp32;
    let a = synth(dir.path(), "inpaint.safetensors", &o);
    let mut ob = tiny(Family::builtin("sd1"), 12);
    ob.dtype = FloatType::Fp32;
    let b = synth(dir.path(), "b.safetensors", &ob);
    let out = dir.path().join("out.safetensors");
    let memo = mergesmith::store::memo(dir.path());
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    merge_ab(&a, &b, &spec, &out, &memo).unwrap();
    let (ca, cb, co) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let k = arch::UNET_CONV_IN;
    let (va, vb, vo) = (values(&ca, k), values(&cb, k), values(&co, k));
    let shape = ca.get(k).unwrap().shape.clone();
    assert_eq!(shape[1], 9);
    let inner = shape[2] * shape[3];
    for o_ in 0..shape[0] {
        for ch in 0..9 {
            for x in 0..inner {
                let ia = (o_ * 9 + ch) * inner + x;
                let want = if ch < 4 {
                    0.5 * va[ia] + 0.5 * vb[(o_ * 4 + ch) * inner + x]
                } else {
                    va[ia]
                };
                assert!(
                    (vo[ia] - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "[{o_},{ch},{x}]"
                );
            }
        }
    }
    // The other way round is refused.
    let err = merge_files(
        &MergeFiles {
            a: &b,
            b: &a,
            c: None,
        },
        &spec,
        &dir.path().join("x.safetensors"),
        &memo,
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("A must be the inpainting"), "{err}");
}

#[test]
fn mismatches_are_refused_before_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = synth(
        dir.path(),
        "sd1.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let xl = synth(
        dir.path(),
        "xl.safetensors",
        &tiny(Family::builtin("sdxl"), 1),
    );
    let memo = mergesmith::store::memo(dir.path());
    let out = dir.path().join("out.safetensors");
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    let err = merge_ab(&sd1, &xl, &spec, &out, &memo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("SD1.x") && err.contains("SDXL"), "{err}");
    assert!(!out.exists());

    // Same names, different shapes.
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    raw_safetensors(
        &a,
        r#"{"model.x.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    raw_safetensors(
        &b,
        r#"{"model.x.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let err = merge_ab(&a, &b, &spec, &out, &memo)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`model.x.weight`") && err.contains("[2]") && err.contains("[1, 2]"),
        "{err}"
    );
    assert!(!out.exists());

    // Mode / model C / beta consistency.
    let bad = MergeSpec::new(Mode::AddDifference, Ratio::Scalar(0.5), None);
    assert!(merge_ab(&a, &a, &bad, &out, &memo).is_err());
    let bad = MergeSpec::new(
        Mode::WeightSum,
        Ratio::Scalar(0.5),
        Some(Ratio::Scalar(0.1)),
    );
    assert!(merge_ab(&a, &a, &bad, &out, &memo).is_err());
    let bad = MergeSpec::new(Mode::WeightSum, Ratio::Blocks(vec![0.1; 25]), None);
    let err = merge_ab(&sd1, &sd1, &bad, &out, &memo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("26 block weights"), "{err}");
}

#[test]
fn missing_and_extra_keys_and_non_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let f32s = |v: &[f32]| f32_bytes(v);
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    let mut data = f32s(&[1.0, f32::NAN, f32::INFINITY, 4.0]);
    data.extend(f32s(&[5.0]));
    raw_safetensors(
        &a,
        r#"{"model.k.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"model.only_a.bias":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#,
        &data,
    );
    let mut data = f32s(&[3.0, 2.0, f32::INFINITY, f32::NAN]);
    data.extend(f32s(&[7.0]));
    raw_safetensors(
        &b,
        r#"{"model.k.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"model.only_b.weight":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}}"#,
        &data,
    );
    let memo = mergesmith::store::memo(dir.path());
    let out = dir.path().join("out.safetensors");
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    let (plan, _) = merge_ab(&a, &b, &spec, &out, &memo).unwrap();
    assert_eq!(plan.missing_in_b, vec!["model.only_a.bias".to_string()]);
    assert_eq!(plan.added_from_b, vec!["model.only_b.weight".to_string()]);
    let ck = Checkpoint::open(&out).unwrap();
    let v = values(&ck, "model.k.weight");
    // IEEE propagation: NaN in either input gives NaN; inf + 0.5*(inf - inf) is NaN too.
    assert_eq!(v[0], 2.0);
    assert!(v[1].is_nan() && v[2].is_nan() && v[3].is_nan());
    assert_eq!(values(&ck, "model.only_a.bias"), vec![5.0]);
    assert_eq!(values(&ck, "model.only_b.weight"), vec![7.0]);

    // alpha 0 keeps A exactly, including its non-finite values; B's NaN does not leak.
    let out0 = dir.path().join("out0.safetensors");
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.0), None);
    merge_ab(&a, &b, &spec, &out0, &memo).unwrap();
    let v = values(&Checkpoint::open(&out0).unwrap(), "model.k.weight");
    assert_eq!((v[0], v[2], v[3]), (1.0, f64::INFINITY, 4.0));
    assert!(v[1].is_nan());
}

#[test]
fn elemental_include_exclude_and_adjust() {
    use mergesmith::merge::{FilterMode, FilterSpec};
    let m = models(Family::builtin("sd1"));
    let block = |k: &str| {
        arch::classify(Family::builtin("sd1"), k)
            .block
            .unwrap_or_default()
    };

    // Elemental: OUT06 attention keys get 0.9, the rest the scalar 0.3; later entries win.
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.3), None);
    spec.elemental = Some("OUT06:attn:0.9\nOUT06:attn2.to_k:0.1".into());
    let out = run(&m, &spec, false, "el.safetensors");
    let el = |k: &str| match (
        block(k) == "OUT06",
        k.contains("attn2.to_k"),
        k.contains("attn"),
    ) {
        (true, true, _) => 0.1,
        (true, false, true) => 0.9,
        _ => 0.3,
    };
    check_against_reference(&m, &out, Mode::WeightSum, &el, 0.0);
    let recipe = recipe_of(&out);
    assert_eq!(
        recipe["elemental_merge"],
        serde_json::json!(["OUT06:attn:0.9", "OUT06:attn2.to_k:0.1"])
    );

    // Exclude IN01-IN02, the VAE and every attn2 key: those keep A (alpha 0 in the reference).
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.6), None);
    spec.filter = Some(FilterSpec {
        mode: FilterMode::Exclude,
        blocks: "IN01-IN02 VAE".into(),
        elements: "attn2".into(),
    });
    let out = run(&m, &spec, false, "ex.safetensors");
    let ex = |k: &str| {
        let skip = ["IN01", "IN02"].contains(&block(k).as_str())
            || k.starts_with("first_stage_model.")
            || k.contains("attn2");
        if skip {
            0.0
        } else {
            0.6
        }
    };
    check_against_reference(&m, &out, Mode::WeightSum, &ex, 0.0);
    let recipe = recipe_of(&out);
    assert_eq!(
        recipe["Exclude"],
        serde_json::json!(["IN01-IN02 VAE", "attn2"])
    );

    // Include only OUT11: everything else keeps A.
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.6), None);
    spec.filter = Some(FilterSpec {
        mode: FilterMode::Include,
        blocks: "OUT11".into(),
        elements: String::new(),
    });
    let out = run(&m, &spec, false, "in.safetensors");
    check_against_reference(
        &m,
        &out,
        Mode::WeightSum,
        &|k| if block(k) == "OUT11" { 0.6 } else { 0.0 },
        0.0,
    );

    // Adjust acts on the merged values of its six keys, even at alpha 0.
    let v = [2.0, -1.0, 3.0, 1.0, -2.0, 0.5, 1.5, -0.5];
    let mut spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.0), None);
    spec.adjust = Some(v);
    let out = run(&m, &spec, false, "adj.safetensors");
    let (ca, co) = (
        Checkpoint::open(&m.a).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let scale = [
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            1.0 - 0.01 * v[0],
        ),
        (
            "model.diffusion_model.input_blocks.0.0.bias",
            1.0 + 0.02 * v[0],
        ),
        ("model.diffusion_model.out.0.weight", 1.0 - 0.01 * v[1]),
        ("model.diffusion_model.out.0.bias", 1.0 + 0.02 * v[1]),
        ("model.diffusion_model.out.2.weight", 1.0 - 0.01 * v[2]),
    ];
    for (k, s) in scale {
        for (x, y) in values(&ca, k).iter().zip(values(&co, k)) {
            assert!((x * s - y).abs() <= f16_ulp(x * s), "{k}: {x} * {s} vs {y}");
        }
    }
    let add = [
        0.02 * v[3],
        0.02 * (-v[4] + v[5] + v[7]),
        0.02 * (v[4] / 3.0 + v[5] - v[6]),
        0.02 * (2.0 * v[4] / 3.0 - v[6] + v[7]),
    ];
    let k = "model.diffusion_model.out.2.bias";
    for ((x, y), d) in values(&ca, k).iter().zip(values(&co, k)).zip(add) {
        assert!((x + d - y).abs() <= f16_ulp(x + d), "{k}: {x} + {d} vs {y}");
    }
}
