//! Model families declared in `data/families/`: detection of every layout and variant, block
//! maps against the tools' lists (written out here independently), Flux merges against an f64
//! reference, mixed layouts, refusals and the no-silent-copy rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::{self, Family};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::convert;
use mergesmith::dtype::FloatType;
use mergesmith::merge::{merge_files, MergeFiles, MergeSpec, Ratio, RunOptions};
use mergesmith::synth::{Perturb, SynthVariant};

/// Writes a safetensors file of `(name, dtype, shape)` tensors, float ones filled with
/// `value(name, i)`, integer ones with zeros.
fn write(path: &Path, tensors: &[(&str, &str, Vec<usize>)], value: impl Fn(&str, usize) -> f32) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape) in tensors {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = match *dtype {
            "F32" => f32_bytes(&(0..n).map(|i| value(name, i)).collect::<Vec<_>>()),
            "BF16" => (0..n)
                .flat_map(|i| half::bf16::from_f32(value(name, i)).to_le_bytes())
                .collect(),
            "I64" => vec![0; 8 * n],
            other => panic!("test writer: {other}"),
        };
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend(bytes);
    }
    raw_safetensors(path, &serde_json::Value::Object(header).to_string(), &data);
}

fn detect(path: &Path) -> arch::Arch {
    arch::detect(Checkpoint::open(path).unwrap().tensors())
}

fn flux(dir: &Path, name: &str, seed: u64, layout: Option<&str>, variant: SynthVariant) -> PathBuf {
    let mut o = tiny(Family::builtin("flux"), seed);
    o.layout = layout.map(String::from);
    o.variant = variant;
    synth(dir, name, &o)
}

#[test]
fn flux_layouts_and_variants_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (None, SynthVariant::Standard, "comfyui", "dev"),
        (Some("bfl"), SynthVariant::Standard, "bfl", "dev"),
        (Some("bfl"), SynthVariant::Schnell, "bfl", "schnell"),
        (None, SynthVariant::Fill, "comfyui", "fill"),
        (Some("bfl"), SynthVariant::Fill, "bfl", "fill"),
    ];
    for (i, (layout, variant, want_layout, want_variant)) in cases.into_iter().enumerate() {
        let p = flux(d, &format!("f{i}.safetensors"), i as u64, layout, variant);
        let a = detect(&p);
        assert_eq!(
            (a.family.id(), a.layout, a.variant.id),
            ("flux", want_layout, want_variant),
            "{p:?}: {}",
            a.rule
        );
    }
    // Chroma: Flux keys with a distilled guidance network instead of vector_in / guidance_in.
    let chroma = d.join("chroma.safetensors");
    write(
        &chroma,
        &[
            ("double_blocks.0.img_attn.qkv.weight", "BF16", vec![6, 2]),
            (
                "distilled_guidance_layer.in_proj.weight",
                "BF16",
                vec![2, 2],
            ),
        ],
        |_, _| 0.5,
    );
    let a = detect(&chroma);
    assert_eq!(
        (a.family.id(), a.layout, a.variant.id),
        ("flux", "bfl", "chroma")
    );
    // diffusers: split q/k/v under `transformer_blocks` / `single_transformer_blocks`.
    let diffusers = d.join("diffusers.safetensors");
    write(
        &diffusers,
        &[
            ("transformer_blocks.0.attn.to_q.weight", "BF16", vec![2, 2]),
            (
                "single_transformer_blocks.0.proj_mlp.weight",
                "BF16",
                vec![8, 2],
            ),
        ],
        |_, _| 0.5,
    );
    let a = detect(&diffusers);
    assert_eq!((a.family.id(), a.layout), ("flux", "diffusers"));
}

#[test]
fn transformer_families_are_detected_by_their_markers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sd3 = synth(d, "sd3.safetensors", &tiny(Family::builtin("sd3"), 1));
    let a = detect(&sd3);
    assert_eq!(
        (a.family.id(), a.layout, a.variant.id),
        ("sd3", "comfyui", "medium")
    );
    let cases: [(&[&str], &str, &str, &str); 6] = [
        (
            &[
                "joint_blocks.0.x_block.attn.qkv.weight",
                "joint_blocks.37.x_block.attn.qkv.weight",
            ],
            "sd3",
            "bare",
            "sd35_large",
        ),
        (
            &[
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
            ],
            "sd3",
            "comfyui",
            "sd35_medium",
        ),
        (
            &["cond_seq_linear.weight", "double_layers.0.attn.w1q.weight"],
            "auraflow",
            "bare",
            "standard",
        ),
        (
            &[
                "model.diffusion_model.patch_embedding.weight",
                "model.diffusion_model.img_emb.proj.0.weight",
            ],
            "wan",
            "comfyui",
            "i2v_14b",
        ),
        (
            &["patch_embedding.weight", "blocks.29.self_attn.q.weight"],
            "wan",
            "bare",
            "t2v_1_3b",
        ),
        (
            &["txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"],
            "qwen_image",
            "bare",
            "standard",
        ),
    ];
    for (i, (keys, family, layout, variant)) in cases.into_iter().enumerate() {
        let p = d.join(format!("m{i}.safetensors"));
        let tensors: Vec<(&str, &str, Vec<usize>)> =
            keys.iter().map(|k| (*k, "BF16", vec![2, 2])).collect();
        write(&p, &tensors, |_, _| 1.0);
        let a = detect(&p);
        assert_eq!(
            (a.family.id(), a.layout, a.variant.id),
            (family, layout, variant),
            "{keys:?}"
        );
    }
    // Anything else is generic, and says which rules it tried.
    let p = d.join("other.safetensors");
    write(&p, &[("encoder.layer.0.weight", "F32", vec![2])], |_, _| {
        1.0
    });
    let a = detect(&p);
    assert!(a.family.is_generic());
    assert!(
        a.rule.contains("flux") && a.rule.contains("sdxl"),
        "{}",
        a.rule
    );
}

/// SuperMerger's Flux rule (61 slots) written from the blocks README, independently of the
/// data file: `vae` never; t5xxl -> T5; text_encoders.clip -> CLIP; double_blocks.N -> DNN;
/// single_blocks.N -> SNN; `*_in.` -> IN; final_layer -> OUT.
fn supermerger_flux_block(key: &str) -> Option<String> {
    let num = |section: &str| {
        let rest = key.split(section).nth(1)?;
        rest.split('.').next()?.parse::<usize>().ok()
    };
    if key.contains("vae") {
        None
    } else if key.contains("t5xxl") {
        Some("T5".into())
    } else if key.contains("text_encoders.clip") {
        Some("CLIP".into())
    } else if let Some(n) = num("double_blocks.") {
        Some(format!("D{n:02}"))
    } else if let Some(n) = num("single_blocks.") {
        Some(format!("S{n:02}"))
    } else if [
        "img_in.",
        "txt_in.",
        "time_in.",
        "vector_in.",
        "guidance_in.",
    ]
    .iter()
    .any(|p| key.contains(p))
    {
        Some("IN".into())
    } else if key.contains("final_layer") {
        Some("OUT".into())
    } else {
        None
    }
}

/// ComfyUI's ModelMergeFlux1 sliders, longest matching prefix of the diffusion-model key.
fn comfy_flux_block(key: &str) -> Option<String> {
    let rest = key.strip_prefix("model.diffusion_model.")?;
    let mut prefixes: Vec<String> = [
        "img_in.",
        "time_in.",
        "guidance_in",
        "vector_in.",
        "txt_in.",
    ]
    .map(String::from)
    .to_vec();
    prefixes.extend((0..19).map(|i| format!("double_blocks.{i}.")));
    prefixes.extend((0..38).map(|i| format!("single_blocks.{i}.")));
    prefixes.push("final_layer.".into());
    Some(
        prefixes
            .iter()
            .filter(|p| rest.starts_with(p.as_str()))
            .max_by_key(|p| p.len())
            .unwrap_or(&prefixes[0])
            .clone(),
    )
}

#[test]
fn flux_block_maps_match_supermerger_and_comfyui_on_every_reference_key() {
    let flux = Family::builtin("flux");
    let lists = flux.lists();
    assert_eq!((lists[0].id(), lists[0].slots.len()), ("supermerger", 61));
    assert_eq!((lists[1].id(), lists[1].slots.len()), ("comfyui", 63));
    let table = layout_table(include_str!("../../data/layouts/flux-comfy.tsv"));
    assert_eq!(table.len(), 1439);
    let mut per_block: BTreeMap<String, usize> = BTreeMap::new();
    for (key, _) in &table {
        let class = arch::classify(flux, key);
        assert_eq!(class.block, supermerger_flux_block(key), "{key}");
        assert_eq!(class.fine, comfy_flux_block(key), "{key}");
        // The bare BFL spelling maps to the same blocks.
        if let Some(bare) = key.strip_prefix("model.diffusion_model.") {
            assert_eq!(arch::classify(flux, bare).block, class.block, "{bare}");
            assert_eq!(arch::classify(flux, bare).fine, class.fine, "{bare}");
        }
        assert_eq!(class.mergeable, !key.starts_with("vae."), "{key}");
        if let Some(b) = class.block {
            *per_block.entry(b).or_default() += 1;
        }
    }
    // Every slot is used; a double block has 24 tensors, a single block 8 (counted in the table).
    assert_eq!(per_block.len(), 61);
    assert_eq!((per_block["D00"], per_block["S37"]), (24, 8));
    assert_eq!(per_block["CLIP"], 196);
    assert_eq!(per_block["T5"], 219);
}

#[test]
fn sd3_and_prefix_families_map_blocks_by_comfyui_prefixes() {
    let sd3 = Family::builtin("sd3");
    for (key, _) in layout_table(include_str!("../../data/layouts/sd3-medium-comfy.tsv")) {
        let c = arch::classify(sd3, &key);
        let want = key.strip_prefix("model.diffusion_model.").map(|rest| {
            // ComfyUI's ModelMergeSD3_2B sliders, longest prefix.
            match rest.strip_prefix("joint_blocks.") {
                Some(r) => format!("joint_blocks.{}.", r.split('.').next().unwrap()),
                None => [
                    "pos_embed.",
                    "x_embedder.",
                    "context_embedder.",
                    "y_embedder.",
                    "t_embedder.",
                    "final_layer.",
                ]
                .into_iter()
                .find(|p| rest.starts_with(p))
                .unwrap_or("pos_embed.")
                .to_string(),
            }
        });
        assert_eq!(c.block, want, "{key}");
        let buffer = key.starts_with("first_stage_model.") || key.contains("model_sampling");
        assert_eq!(c.mergeable, !buffer, "{key}");
    }
    let wan = Family::builtin("wan");
    assert_eq!(wan.blocks().len(), 5 + 40 + 1);
    assert_eq!(
        wan.block_in(0, "blocks.12.ffn.0.weight").as_deref(),
        Some("blocks.12.")
    );
    assert_eq!(
        wan.block_in(0, "blocks.1.ffn.0.weight").as_deref(),
        Some("blocks.1.")
    );
    let qwen = Family::builtin("qwen_image");
    assert_eq!(qwen.blocks().len(), 5 + 60 + 1);
    assert_eq!(
        qwen.block_in(
            0,
            "model.diffusion_model.transformer_blocks.59.attn.to_q.weight"
        )
        .as_deref(),
        Some("transformer_blocks.59.")
    );
    assert_eq!(Family::builtin("auraflow").blocks().len(), 5 + 4 + 32 + 2);
}

fn spec(alpha: Ratio) -> MergeSpec {
    MergeSpec::new(mergesmith::merge::Mode::WeightSum, alpha, None)
}

fn merge(
    a: &Path,
    b: &Path,
    alpha: Ratio,
    out: &Path,
) -> mergesmith::error::Result<mergesmith::merge::Plan> {
    merge_files(
        &MergeFiles { a, b, c: None },
        &spec(alpha),
        out,
        &mergesmith::store::memo(&out.parent().unwrap().join("memo")),
        &RunOptions::default(),
    )
    .map(|(plan, _)| plan)
}

fn values(ck: &Checkpoint, name: &str) -> Vec<f64> {
    let t = ck.get(name).unwrap_or_else(|| panic!("{name} missing"));
    convert::to_f32(t.dtype, &ck.data(t))
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn flux_merge_with_a_supermerger_vector_matches_an_f64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut o = tiny(Family::builtin("flux"), 11);
    o.dtype = FloatType::Fp32;
    let a = synth(d, "a.safetensors", &o);
    o.seed = 12;
    o.perturb = Some(Perturb {
        base: a.clone(),
        strength: 0.5,
        rank: 0,
    });
    let b = synth(d, "b.safetensors", &o);
    // 61 values: CLIP 0.1, T5 0.2, IN 0.3, D00-D18 0.4 + i/100, S00-S37 0.6 + i/1000, OUT 0.9.
    let mut v = vec![0.1, 0.2, 0.3];
    v.extend((0..19).map(|i| 0.4 + i as f64 / 100.0));
    v.extend((0..38).map(|i| 0.6 + i as f64 / 1000.0));
    v.push(0.9);
    let out = d.join("m.safetensors");
    let plan = merge(&a, &b, Ratio::Blocks(v.clone()), &out).unwrap();
    assert_eq!(
        plan.kept.values().map(Vec::len).sum::<usize>(),
        244,
        "the VAE"
    );
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let alpha_of = |key: &str| -> Option<f64> {
        let block = supermerger_flux_block(key)?;
        let slots: Vec<String> = ["CLIP", "T5", "IN"]
            .map(String::from)
            .into_iter()
            .chain((0..19).map(|i| format!("D{i:02}")))
            .chain((0..38).map(|i| format!("S{i:02}")))
            .chain(["OUT".to_string()])
            .collect();
        Some(v[slots.iter().position(|s| *s == block).unwrap()])
    };
    let mut checked = 0;
    for t in ca.tensors() {
        let (x, y, m) = (
            values(&ca, &t.name),
            values(&cb, &t.name),
            values(&cm, &t.name),
        );
        match alpha_of(&t.name) {
            Some(al) => {
                for i in 0..x.len() {
                    let want = (1.0 - al) * x[i] + al * y[i];
                    assert!(
                        (m[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{} [{i}]: {} vs {want}",
                        t.name,
                        m[i]
                    );
                }
                checked += 1;
            }
            None => assert_eq!(m, x, "{} is kept from A", t.name),
        }
    }
    assert_eq!(checked, 1439 - 244);
}

#[test]
fn a_comfyui_vector_weights_only_the_diffusion_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = flux(d, "a.safetensors", 1, None, SynthVariant::Standard);
    let b = flux(d, "b.safetensors", 2, None, SynthVariant::Standard);
    let v: Vec<f64> = (0..63).map(|i| i as f64 / 62.0).collect();
    let out = d.join("m.safetensors");
    let plan = merge(&a, &b, Ratio::Blocks(v.clone()), &out).unwrap();
    let outside = &plan.kept[&mergesmith::merge::plan::Kept::OutsideBlocks];
    assert_eq!(outside.len(), 196 + 219, "both text encoders");
    assert!(outside.iter().all(|k| k.starts_with("text_encoders.")));
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    // `single_blocks.1.` is slider 5 + 19 + 1.
    let key = "model.diffusion_model.single_blocks.1.linear1.weight";
    let al = v[25];
    let (x, y, m) = (values(&ca, key), values(&cb, key), values(&cm, key));
    for i in 0..x.len() {
        let want = (1.0 - al) * x[i] + al * y[i];
        // fp16 storage: half an ulp.
        assert!(
            (m[i] - want).abs() <= 1e-3 * want.abs().max(1e-2),
            "{key}[{i}]: {} vs {want}",
            m[i]
        );
    }
}

#[test]
fn mixed_layouts_merge_by_mapping_keys_and_keep_a_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut o = tiny(Family::builtin("flux"), 3);
    o.dtype = FloatType::Fp32;
    o.layout = Some("bfl".into());
    let a = synth(d, "bfl.safetensors", &o);
    o.layout = None;
    o.seed = 4;
    let b = synth(d, "comfy.safetensors", &o);
    let out = d.join("m.safetensors");
    let plan = merge(&a, &b, Ratio::Scalar(0.25), &out).unwrap();
    assert_eq!(plan.layouts, Some(vec!["bfl", "comfyui"]));
    assert!(
        plan.added_from_b.is_empty(),
        "B's text encoders and VAE are not added"
    );
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    assert_eq!(cm.tensors().len(), ca.tensors().len());
    for t in cm.tensors() {
        assert!(!t.name.starts_with("model."), "{}", t.name);
        let (x, y, m) = (
            values(&ca, &t.name),
            values(&cb, &format!("model.diffusion_model.{}", t.name)),
            values(&cm, &t.name),
        );
        for i in 0..x.len() {
            let want = 0.75 * x[i] + 0.25 * y[i];
            assert!((m[i] - want).abs() <= 1e-6 * (1.0 + want.abs()));
        }
    }
    // The other way round keeps the ComfyUI layout; the parts B lacks are kept from A.
    let out2 = d.join("m2.safetensors");
    let plan = merge(&b, &a, Ratio::Scalar(0.25), &out2).unwrap();
    assert_eq!(plan.missing_in_b.len(), 196 + 219, "text encoders");
    assert!(Checkpoint::open(&out2)
        .unwrap()
        .get("model.diffusion_model.img_in.weight")
        .is_some());
}

#[test]
fn variants_that_differ_in_shape_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dev = flux(d, "dev.safetensors", 1, Some("bfl"), SynthVariant::Standard);
    let fill = flux(d, "fill.safetensors", 2, Some("bfl"), SynthVariant::Fill);
    let err = merge(&dev, &fill, Ratio::Scalar(0.5), &d.join("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`img_in.weight`") && err.contains("Flux.1 (Fill)"),
        "{err}"
    );
    assert!(!d.join("x.safetensors").exists());
    // schnell lacks the guidance embedder: the merge works, and says what it kept.
    let schnell = flux(
        d,
        "schnell.safetensors",
        3,
        Some("bfl"),
        SynthVariant::Schnell,
    );
    let plan = merge(&dev, &schnell, Ratio::Scalar(0.5), &d.join("s.safetensors")).unwrap();
    assert_eq!(plan.missing_in_b.len(), 4);
    assert!(
        plan.notes().iter().any(|n| n.contains("guidance_in")),
        "{:?}",
        plan.notes()
    );
    // A Flux model with an SDXL model.
    let xl = synth(d, "xl.safetensors", &tiny(Family::builtin("sdxl"), 1));
    let err = merge(&dev, &xl, Ratio::Scalar(0.5), &d.join("y.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot merge Flux.1 (model A) with SDXL base"),
        "{err}"
    );
}

#[test]
fn a_merge_that_blends_nothing_is_an_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    write(
        &a,
        &[("step", "I64", vec![1]), ("encoder.weight", "F32", vec![2])],
        |_, _| 1.0,
    );
    write(
        &b,
        &[("step", "I64", vec![1]), ("decoder.weight", "F32", vec![2])],
        |_, _| 2.0,
    );
    let out = d.join("m.safetensors");
    let err = merge(&a, &b, Ratio::Scalar(0.5), &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing to merge"), "{err}");
    assert!(
        err.contains("1 missing from B (e.g. `encoder.weight`)"),
        "{err}"
    );
    assert!(err.contains("1 not a floating-point tensor"), "{err}");
    assert!(!out.exists());
    // Generic files whose keys match merge key by key, and the plan says it was generic.
    write(
        &b,
        &[("step", "I64", vec![1]), ("encoder.weight", "F32", vec![2])],
        |_, _| 3.0,
    );
    let plan = merge(&a, &b, Ratio::Scalar(0.5), &out).unwrap();
    assert_eq!(plan.blended(), 1);
    assert!(
        plan.notes()[0].contains("not recognized"),
        "{:?}",
        plan.notes()
    );
    let m = Checkpoint::open(&out).unwrap();
    assert_eq!(values(&m, "encoder.weight"), vec![2.0, 2.0]);
    // Per-block weights need a family with blocks.
    let err = merge(&a, &b, Ratio::Blocks(vec![0.5; 26]), &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("per-block weights need a recognized architecture"),
        "{err}"
    );
}

#[test]
fn v_prediction_markers_are_carried_through_from_either_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = synth(d, "a.safetensors", &tiny(Family::builtin("sdxl"), 1));
    let ck = Checkpoint::open(&a).unwrap();
    // B = A plus the two empty marker tensors of a v-prediction zero-terminal-SNR fine-tune.
    let b = d.join("b.safetensors");
    let mut tensors: Vec<(String, String, Vec<usize>)> = ck
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), "F32".to_string(), t.shape.clone()))
        .collect();
    tensors.push(("v_pred".into(), "F32".into(), vec![0]));
    tensors.push(("ztsnr".into(), "F32".into(), vec![0]));
    let refs: Vec<(&str, &str, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t, s)| (n.as_str(), t.as_str(), s.clone()))
        .collect();
    write(&b, &refs, |_, i| (i % 7) as f32 * 0.01);
    let out = d.join("m.safetensors");
    let plan = merge(&a, &b, Ratio::Scalar(0.5), &out).unwrap();
    use mergesmith::merge::Source;
    assert_eq!(
        plan.markers,
        vec![
            ("v_pred".to_string(), Source::B),
            ("ztsnr".to_string(), Source::B)
        ]
    );
    assert!(plan.added_from_b.is_empty());
    let m = Checkpoint::open(&out).unwrap();
    assert!(m.get("v_pred").is_some() && m.get("ztsnr").is_some());
    assert!(plan.notes().iter().any(|n| n.contains("marker `v_pred`")));
    // From A, with pruning too.
    let mut s = spec(Ratio::Scalar(0.5));
    s.prune = true;
    let out2 = d.join("m2.safetensors");
    let (plan, _) = merge_files(
        &MergeFiles {
            a: &b,
            b: &a,
            c: None,
        },
        &s,
        &out2,
        &mergesmith::store::memo(&d.join("memo")),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(plan.markers.len(), 2);
    assert!(Checkpoint::open(&out2).unwrap().get("ztsnr").is_some());
}

#[test]
fn families_table_in_docs_is_current() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/families.md")).unwrap();
    let start = doc.find("<!-- families:begin -->\n").unwrap() + "<!-- families:begin -->\n".len();
    let end = doc.find("<!-- families:end -->").unwrap();
    assert!(
        doc[start..end] == mergesmith::arch::family::markdown_table(),
        "docs/families.md is stale: paste `mergesmith families` between the markers"
    );
}

#[test]
fn a_block_list_can_be_named_and_elemental_uses_its_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut o = tiny(Family::builtin("flux"), 21);
    o.dtype = FloatType::Fp32;
    o.layout = Some("bfl".into());
    let a = synth(d, "a.safetensors", &o);
    o.seed = 22;
    let b = synth(d, "b.safetensors", &o);
    let run = |s: &MergeSpec, name: &str| {
        merge_files(
            &MergeFiles {
                a: &a,
                b: &b,
                c: None,
            },
            s,
            &d.join(name),
            &mergesmith::store::memo(&d.join("memo")),
            &RunOptions::default(),
        )
    };
    let mut s = spec(Ratio::Blocks(vec![0.5; 61]));
    s.block_list = Some("comfyui".into());
    let err = run(&s, "x.safetensors").err().unwrap().to_string();
    assert!(
        err.contains("block list `comfyui` of Flux.1 has 63 slots"),
        "{err}"
    );
    s.block_list = Some("comfy".into());
    let err = run(&s, "x.safetensors").err().unwrap().to_string();
    assert!(err.contains("did you mean `comfyui`"), "{err}");
    // ComfyUI's prefixes in elemental entries (the last matching entry wins).
    let mut s = spec(Ratio::Scalar(0.3));
    s.block_list = Some("comfyui".into());
    s.elemental = Some("double_blocks.3.:img_attn:0.9".into());
    run(&s, "m.safetensors").unwrap();
    let (ca, cb, cm) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(d.join("m.safetensors")).unwrap(),
    );
    for (key, al) in [
        ("double_blocks.3.img_attn.qkv.weight", 0.9),
        ("double_blocks.3.img_mlp.0.weight", 0.3),
        ("double_blocks.13.img_attn.qkv.weight", 0.3),
    ] {
        let (x, y, m) = (values(&ca, key), values(&cb, key), values(&cm, key));
        let want = (1.0 - al) * x[0] + al * y[0];
        assert!((m[0] - want).abs() < 1e-6, "{key}: {} vs {want}", m[0]);
    }
    // SuperMerger's names with the default list.
    let mut s = spec(Ratio::Scalar(0.3));
    s.elemental = Some("D13 S00-S02::0.8".into());
    run(&s, "n.safetensors").unwrap();
    let cn = Checkpoint::open(d.join("n.safetensors")).unwrap();
    for (key, al) in [
        ("double_blocks.13.img_attn.qkv.weight", 0.8),
        ("single_blocks.2.linear1.weight", 0.8),
        ("single_blocks.3.linear1.weight", 0.3),
    ] {
        let (x, y, m) = (values(&ca, key), values(&cb, key), values(&cn, key));
        let want = (1.0 - al) * x[0] + al * y[0];
        assert!((m[0] - want).abs() < 1e-6, "{key}: {} vs {want}", m[0]);
    }
}
