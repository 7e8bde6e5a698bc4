//! LoRA merges as SuperMerger makes them (issue 18, item 5): the kohya factor sum with and
//! without "same to Strength", "extract from two LoRAs", the svd merge's root weighting, the
//! five metadata choices with the additional-networks hashes checked against the bytes
//! written, and SuperMerger's LoRA text imported as a recipe that builds. References are f64
//! computations written here from SuperMerger's formulas (scripts/mergers/pluslora.py).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::build::{self, BuildOptions};
use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use mergesmith::dtype::{DType, FloatType};
use mergesmith::lora::bake::Application;
use mergesmith::lora::merge::{merge, ExtractWeights, MergeMode, MergeOptions, MetadataMode};
use mergesmith::lora::LoraFile;
use mergesmith::store::Cache;
use sha2::{Digest, Sha256};

type Tensor = (String, Vec<usize>, Vec<f32>);

/// Deterministic values in (-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One kohya module: up `[out, r(,1,1)]`, down `[r, in(, kh, kw)]`, alpha.
fn module(name: &str, up: &[usize], down: &[usize], alpha: f32, seed: u64) -> Vec<Tensor> {
    let n = |s: &[usize]| s.iter().product::<usize>();
    vec![
        (
            format!("{name}.lora_up.weight"),
            up.to_vec(),
            values(n(up), seed),
        ),
        (
            format!("{name}.lora_down.weight"),
            down.to_vec(),
            values(n(down), seed + 100),
        ),
        (format!("{name}.alpha"), vec![], vec![alpha]),
    ]
}

fn write(path: &Path, tensors: &[Tensor], metadata: &[(&str, &str)]) -> PathBuf {
    let specs = tensors
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n.clone(),
            dtype: DType::F32,
            shape: s.clone(),
        })
        .collect();
    let md: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let w = SafetensorsWriter::create(path, specs, &md, true).unwrap();
    for (n, _, v) in tensors {
        w.write(n, &f32_bytes(v)).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

fn app(path: &Path, strength: f64) -> Application {
    Application {
        file: LoraFile::open(path).unwrap(),
        strength,
        blocks: None,
    }
}

/// A tensor of a written LoRA, as f32.
fn part(path: &Path, name: &str) -> Vec<f32> {
    let ck = mergesmith::checkpoint::Checkpoint::open(path).unwrap();
    let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
    mergesmith::convert::any_to_f32(t.dtype, &ck.data(t)).unwrap()
}

fn metadata(path: &Path) -> BTreeMap<String, String> {
    mergesmith::checkpoint::Checkpoint::open(path)
        .unwrap()
        .metadata()
        .clone()
}

fn close64(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "element {i}: {g} vs {w}"
        );
    }
}

fn scaled(v: &[f32], k: f64) -> Vec<f64> {
    v.iter().map(|x| *x as f64 * k).collect()
}

fn add(a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.into_iter().zip(b).map(|(x, y)| x + y).collect()
}

fn opts(mode: MergeMode) -> MergeOptions {
    MergeOptions {
        mode,
        clamp_quantile: 1.0,
        ..Default::default()
    }
}

#[test]
fn kohya_mode_sums_factors_as_sd_scripts_and_supermerger_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = "lora_unet_x";
    let a_t = module(x, &[3, 2], &[2, 4], 2.0, 1);
    let mut b_t = module(x, &[3, 2], &[2, 4], 8.0, 2);
    b_t.extend(module("lora_unet_y", &[2, 1], &[1, 2], 0.5, 3));
    let a = write(&d.join("a.safetensors"), &a_t, &[]);
    let b = write(&d.join("b.safetensors"), &b_t, &[]);
    let out = d.join("m.safetensors");
    let (ra, rb) = (0.7, -1.3);
    // Without "same to Strength": each factor scaled by ratio · √(alpha / alpha of A).
    merge(
        &[app(&a, ra), app(&b, rb)],
        &opts(MergeMode::Kohya),
        &out,
        false,
    )
    .unwrap();
    let k = (8.0f64 / 2.0).sqrt();
    for (i, suffix) in ["lora_up.weight", "lora_down.weight"].iter().enumerate() {
        let want = add(scaled(&a_t[i].2, ra), scaled(&b_t[i].2, rb * k));
        close64(&part(&out, &format!("{x}.{suffix}")), &want, 1e-6);
    }
    assert_eq!(
        part(&out, &format!("{x}.alpha")),
        vec![2.0],
        "A's alpha kept"
    );
    // A module only B has keeps B's factors scaled by its ratio, and B's alpha.
    close64(
        &part(&out, "lora_unet_y.lora_up.weight"),
        &scaled(&b_t[3].2, rb),
        1e-6,
    );
    assert_eq!(part(&out, "lora_unet_y.alpha"), vec![0.5]);

    // "same to Strength": √|ratio| on both, the sign on lora_down.
    let sts = MergeOptions {
        same_to_strength: true,
        ..opts(MergeMode::Kohya)
    };
    merge(&[app(&a, ra), app(&b, rb)], &sts, &out, true).unwrap();
    let (qa, qb) = (ra.sqrt(), (-rb).sqrt());
    close64(
        &part(&out, &format!("{x}.lora_up.weight")),
        &add(scaled(&a_t[0].2, qa), scaled(&b_t[0].2, qb * k)),
        1e-6,
    );
    close64(
        &part(&out, &format!("{x}.lora_down.weight")),
        &add(scaled(&a_t[1].2, qa), scaled(&b_t[1].2, -qb * k)),
        1e-6,
    );
    // For one file it is exact: the product is ratio · ΔW, sign included.
    merge(&[app(&b, rb)], &sts, &out, true).unwrap();
    let (up, down) = (
        part(&out, &format!("{x}.lora_up.weight")),
        part(&out, &format!("{x}.lora_down.weight")),
    );
    for o in 0..3 {
        for i in 0..4 {
            let got: f64 = (0..2)
                .map(|r| up[o * 2 + r] as f64 * down[r * 4 + i] as f64)
                .sum();
            let want: f64 = (0..2)
                .map(|r| b_t[0].2[o * 2 + r] as f64 * b_t[1].2[r * 4 + i] as f64)
                .sum::<f64>()
                * rb;
            assert!((got - want).abs() < 1e-5, "{o},{i}: {got} vs {want}");
        }
    }

    // Different ranks cannot be summed factor by factor.
    let c = write(
        &d.join("c.safetensors"),
        &module(x, &[3, 1], &[1, 4], 1.0, 4),
        &[],
    );
    let e = merge(
        &[app(&a, 1.0), app(&c, 1.0)],
        &opts(MergeMode::Kohya),
        &d.join("e.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank 2") && e.contains("1 in") && e.contains("concat"),
        "{e}"
    );
    // Concat has no "same to Strength".
    let e = merge(
        &[app(&a, 1.0)],
        &MergeOptions {
            same_to_strength: true,
            ..opts(MergeMode::Concat)
        },
        &d.join("e.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("same_to_strength"), "{e}");
}

/// SuperMerger's extract per row of the last axis, base 0, in f64.
fn extract_ref(a: &[f64], b: &[f64], row: usize, w: ExtractWeights) -> Vec<f64> {
    let mut out = Vec::new();
    for (x, y) in a.chunks(row).zip(b.chunks(row)) {
        let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let nx = x.iter().map(|p| p * p).sum::<f64>().sqrt();
        let ny = y.iter().map(|q| q * q).sum::<f64>().sqrt();
        let c = (dot / (nx.max(1e-8) * ny.max(1e-8))).clamp(-1.0, 1.0);
        let d = ((c + 1.0) / 2.0).powf(w.gamma);
        let m = d + w.beta * (1.0 - 2.0 * d);
        out.extend(x.iter().zip(y).map(|(p, q)| (p + w.alpha * (q - p)) * m));
    }
    out
}

#[test]
fn extract_from_two_loras_matches_an_f64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (x, z) = ("lora_unet_x", "lora_unet_z");
    let mut a_t = module(x, &[3, 2], &[2, 5], 2.0, 11);
    a_t.extend(module(z, &[3, 2, 1, 1], &[2, 2, 3, 3], 2.0, 12));
    let mut b_t = module(x, &[3, 2], &[2, 5], 8.0, 13);
    b_t.extend(module(z, &[3, 2, 1, 1], &[2, 2, 3, 3], 8.0, 14));
    let a = write(&d.join("a.safetensors"), &a_t, &[]);
    let b = write(&d.join("b.safetensors"), &b_t, &[]);
    let w = ExtractWeights {
        alpha: 0.3,
        beta: 0.2,
        gamma: 1.5,
    };
    let o = MergeOptions {
        extract: Some(w),
        ..opts(MergeMode::Extract)
    };
    let out = d.join("x.safetensors");
    let (ra, rb) = (1.0, 0.5);
    merge(&[app(&a, ra), app(&b, rb)], &o, &out, false).unwrap();
    // B's factors are taken to A's alpha (√(8/2)); rows run along each tensor's last axis
    // (a 3x3 down: its kernel rows; a conv up: single values).
    let k = 2.0;
    for (t, row) in [(0, 2), (1, 5), (3, 1), (4, 3)] {
        let want = extract_ref(&scaled(&a_t[t].2, ra), &scaled(&b_t[t].2, rb * k), row, w);
        close64(&part(&out, &a_t[t].0), &want, 1e-5);
    }
    assert_eq!(part(&out, &format!("{z}.alpha")), vec![2.0]);

    // Two files exactly, each with every module, and weights only in this mode.
    let e = merge(&[app(&a, 1.0)], &o, &d.join("e.safetensors"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("two LoRAs, got 1"), "{e}");
    let only_x = write(
        &d.join("only_x.safetensors"),
        &module(x, &[3, 2], &[2, 5], 2.0, 15),
        &[],
    );
    let e = merge(
        &[app(&a, 1.0), app(&only_x, 1.0)],
        &o,
        &d.join("e.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("lora_unet_z") && e.contains("only_x.safetensors lacks it"),
        "{e}"
    );
    let e = merge(
        &[app(&a, 1.0), app(&b, 1.0)],
        &MergeOptions {
            extract: Some(w),
            ..opts(MergeMode::Svd)
        },
        &d.join("e.safetensors"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("belong to the extract mode"), "{e}");
}

#[test]
fn svd_with_same_to_strength_weights_by_the_signed_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = module("lora_unet_x", &[3, 2], &[2, 4], 2.0, 21);
    let a = write(&d.join("a.safetensors"), &t, &[]);
    let out = d.join("s.safetensors");
    let o = MergeOptions {
        rank: 2,
        same_to_strength: true,
        ..opts(MergeMode::Svd)
    };
    merge(&[app(&a, -0.25)], &o, &out, false).unwrap();
    // SuperMerger's remake-dimension merge with the option: ΔW · sign(r) · √|r| = −0.5 ΔW.
    let f = LoraFile::open(&out).unwrap();
    let m = &f.modules[0];
    let got = mergesmith::lora::delta::delta(&f, m, 12, None, &[3, 4]).unwrap();
    let scale = 2.0 / 2.0;
    let want: Vec<f64> = (0..12)
        .map(|e| {
            let (o, i) = (e / 4, e % 4);
            (0..2)
                .map(|r| t[0].2[o * 2 + r] as f64 * t[1].2[r * 4 + i] as f64)
                .sum::<f64>()
                * scale
                * -0.5
        })
        .collect();
    close64(&got, &want, 1e-5);
}

/// Checks the additional-networks hashes a LoRA file carries against its bytes.
fn check_addnet_hashes(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let md = metadata(path);
    let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
    assert_eq!(
        md["sshs_model_hash"],
        hex(&Sha256::digest(&bytes[8 + n..])),
        "{}",
        path.display()
    );
    let window = &bytes[bytes.len().min(0x100000)..bytes.len().min(0x110000)];
    assert_eq!(md["sshs_legacy_hash"], hex(&Sha256::digest(window))[..8]);
}

#[test]
fn metadata_choices_and_hashes_of_the_bytes_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Big enough (about 1.2 MB) that the legacy window holds tensor data.
    let x = "lora_unet_x";
    let a = write(
        &d.join("first.safetensors"),
        &module(x, &[600, 2], &[2, 150_000], 2.0, 31),
        &[
            ("ss_network_module", "lycoris.kohya"),
            ("ss_sd_model_name", "base.ckpt"),
            ("ss_v2", "False"),
            ("ss_training_comment", "hi"),
            ("ss_network_dim", "99"),
            ("ss_tag_frequency", r#"{"1_a": {"x": 1}}"#),
        ],
    );
    let b = write(
        &d.join("second.safetensors"),
        &module(x, &[600, 2], &[2, 150_000], 4.0, 32),
        &[
            ("ss_sd_model_name", "other.ckpt"),
            ("ss_tag_frequency", r#"{"1_a": {"y": 2}, "2_b": {"z": 3}}"#),
        ],
    );
    let run = |mode: MetadataMode, dtype: FloatType| {
        let out = d.join("merged.safetensors");
        let o = MergeOptions {
            metadata: mode,
            dtype,
            ..opts(MergeMode::Kohya)
        };
        merge(&[app(&a, 1.0), app(&b, 0.5)], &o, &out, true).unwrap();
        check_addnet_hashes(&out);
        metadata(&out)
    };
    let md = run(MetadataMode::New, FloatType::Fp32);
    let keys: Vec<&str> = md.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "modelspec.merged_from",
            "ss_mixed_precision",
            "ss_network_alpha",
            "ss_network_dim",
            "ss_network_module",
            "ss_output_name",
            "ss_sd_model_name",
            "ss_v2",
            "sshs_legacy_hash",
            "sshs_model_hash"
        ]
    );
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(
        md["ss_network_dim"], "2",
        "the result's rank, not the first file's 99"
    );
    assert_eq!(md["ss_network_alpha"], "2.0");
    assert_eq!(md["ss_output_name"], "merged");
    assert_eq!(md["ss_mixed_precision"], "float");
    assert_eq!(md["ss_sd_model_name"], "base.ckpt");
    assert_ne!(md["sshs_legacy_hash"], "e3b0c442", "the window holds data");

    let md = run(MetadataMode::NewWithoutName, FloatType::Fp16);
    assert!(!md.contains_key("ss_output_name"));
    assert_eq!(md["ss_mixed_precision"], "fp16");

    let md = run(MetadataMode::First, FloatType::Fp32);
    assert_eq!(md["ss_training_comment"], "hi");
    assert_eq!(md["sshs_ratio"], "1");
    assert_eq!(md["ss_tag_frequency"], r#"{"1_a": {"x": 1}}"#);
    assert_eq!(md["ss_network_dim"], "2");
    assert_eq!(md["ss_output_name"], "merged");

    let md = run(MetadataMode::All, FloatType::Bf16);
    let cp1: serde_json::Value = serde_json::from_str(&md["sshs_cp1"]).unwrap();
    assert_eq!(
        cp1["ss_tag_frequency"]["2_b"]["z"], 3,
        "nested as an object"
    );
    assert_eq!(cp1["sshs_ratio"], "0.5");
    assert_eq!(cp1["ss_output_name"], "second");
    let blocks: Vec<&str> = cp1["sshs_blocks"].as_str().unwrap().split(',').collect();
    assert_eq!(blocks.len(), 26);
    assert!(blocks.iter().all(|b| *b == "0.5"), "{blocks:?}");
    assert_eq!(
        md["ss_tag_frequency"], r#"{"1_a": {"x": 1}}"#,
        "tags untouched"
    );

    let md = run(MetadataMode::Merge, FloatType::Fp32);
    let tags: serde_json::Value = serde_json::from_str(&md["ss_tag_frequency"]).unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"1_a": {"x": 1}, "2_b": {"z": 3}}),
        "a folder the first lacks is added; the first's own stay"
    );
}

#[test]
fn supermerger_lora_text_imports_as_a_recipe_that_builds() {
    use mergesmith::recipe::import::{from_supermerger_loras, SupermergerLoras};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = synth(d, "model.safetensors", &tiny(Family::builtin("sd1"), 1));
    for (name, seed) in [("style", 1), ("char", 2), ("detail", 3)] {
        mergesmith::lora::synth::synthesize(
            &model,
            2,
            0,
            seed,
            &d.join(format!("{name}.safetensors")),
            false,
        )
        .unwrap();
    }
    let outd17 = "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0";
    let text = format!("style:0.8:OUTD,char:0.5:{outd17},detail:-0.3");
    let set = SupermergerLoras {
        same_to_strength: true,
        metadata: Some(MetadataMode::Merge),
        ..Default::default()
    };
    let yaml = from_supermerger_loras(&text, &set).unwrap();
    // OUTD × 0.8 placed in SuperMerger's 26 slots: BASE and OUT03-OUT06.
    let mut outd26 = vec!["0.0"; 26];
    for i in [0, 17, 18, 19, 20] {
        outd26[i] = "0.8";
    }
    assert!(
        yaml.contains(&format!(
            "{{ file: \"style\", strength: 1.0, blocks: \"{}\" }}",
            outd26.join(",")
        )),
        "{yaml}"
    );
    assert!(
        yaml.contains("SuperMerger ignores the ratio 0.5 before explicit block weights"),
        "{yaml}"
    );
    assert!(
        yaml.contains("mode: kohya") && yaml.contains("dtype: fp16"),
        "{yaml}"
    );
    let recipe_path = d.join("recipe.yaml");
    std::fs::write(&recipe_path, &yaml).unwrap();
    let recipe = mergesmith::recipe::load(&recipe_path).unwrap();
    build::build(
        &recipe,
        &Cache::new(&d.join("cache")),
        &[],
        &BuildOptions::default(),
    )
    .unwrap();
    let saved = d.join(format!(
        "{}.safetensors",
        text.replace(',', "+").replace(':', "_")
    ));
    check_addnet_hashes(&saved);

    // The same merge through the library, LoRAs read as SuperMerger reads them: the explicit
    // vector at strength 1 (its 0.5 ignored). Same bytes, metadata and hashes included (the
    // node is named `merged`, as the file here).
    let family = Family::builtin("sd1");
    let with_blocks = |name: &str, strength: f64, blocks: Option<&str>| {
        Application::new(
            LoraFile::open(&d.join(format!("{name}.safetensors"))).unwrap(),
            strength,
            blocks,
            Some(family),
            0.0,
        )
        .unwrap()
    };
    let o = MergeOptions {
        mode: MergeMode::Kohya,
        same_to_strength: true,
        metadata: MetadataMode::Merge,
        dtype: FloatType::Fp16,
        ..Default::default()
    };
    let lib = d.join("lib").join("merged.safetensors");
    std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
    let sources = [
        with_blocks("style", 1.0, Some(&outd26.join(","))),
        with_blocks("char", 1.0, Some(outd17)),
        with_blocks("detail", -0.3, None),
    ];
    merge(&sources, &o, &lib, false).unwrap();
    assert!(
        std::fs::read(&lib).unwrap() == std::fs::read(&saved).unwrap(),
        "the recipe's file is the library's, byte for byte"
    );
    // mergesmith's own reading (strength × blocks) differs, so the switch matters.
    let ours = d.join("lib").join("ours.safetensors");
    let mine = [
        with_blocks("style", 0.8, Some("OUTD")),
        with_blocks("char", 0.5, Some(outd17)),
        with_blocks("detail", -0.3, None),
    ];
    merge(&mine, &o, &ours, false).unwrap();
    // OUT03 (diffusers spelling): `char` weighs 1 there in SuperMerger's reading, 0.5 in ours.
    let up = "lora_unet_up_blocks_1_attentions_0_proj_in.lora_up.weight";
    assert_ne!(part(&ours, up), part(&lib, up));

    // Errors name the text and what was expected.
    let e = from_supermerger_loras("a:1:1,2", &set)
        .unwrap_err()
        .to_string();
    assert!(e.contains("12, 17, 20, 26 or 61"), "{e}");
    let e = from_supermerger_loras("a:x", &set).unwrap_err().to_string();
    assert!(e.contains("`x` is not a number"), "{e}");
}
