//! Architecture detection and block assignment on synthetic files with the real layouts.
//! Expected per-block counts are derived independently from the diffusers-name tables.

use std::collections::BTreeMap;

use crate::common::*;
use mergesmith::arch::{self, Component, Family, Variant};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::synth::SynthVariant;

/// Block of a diffusers-named SD1 key, from the diffusers UNet structure
/// (4 levels, 2 resnets per down level, 3 per up level).
fn sd1_block_from_diffusers(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    if parts[0] != "unet" {
        return "BASE".into();
    }
    let num = |i: usize| parts[i].parse::<usize>().unwrap();
    match parts[1] {
        "conv_in" | "time_embedding" => "IN00".into(),
        "conv_norm_out" | "conv_out" => "OUT11".into(),
        "mid_block" => "M00".into(),
        "down_blocks" => {
            let level = num(2);
            match parts[3] {
                "downsamplers" => format!("IN{:02}", 3 * level + 3),
                _ => format!("IN{:02}", 3 * level + num(4) + 1),
            }
        }
        "up_blocks" => {
            let level = num(2);
            match parts[3] {
                "upsamplers" => format!("OUT{:02}", 3 * level + 2),
                _ => format!("OUT{:02}", 3 * level + num(4)),
            }
        }
        other => panic!("unexpected diffusers key {other}"),
    }
}

fn table_keys(tsv: &str) -> impl Iterator<Item = &str> {
    tsv.lines().skip(1).map(|l| l.split('\t').nth(1).unwrap())
}

fn counts(ck: &Checkpoint, family: Family, keep: impl Fn(&str) -> bool) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in ck.tensors().iter().filter(|t| keep(&t.name)) {
        if let Some(b) = arch::classify(family, &t.name).block {
            *m.entry(b).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn sd1_blocks_match_diffusers_structure() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(
        dir.path(),
        "sd1.safetensors",
        &tiny(Family::builtin("sd1"), 3),
    );
    let ck = Checkpoint::open(&path).unwrap();
    let a = arch::detect(ck.tensors());
    assert_eq!(
        (a.family, a.variant),
        (Family::builtin("sd1"), Variant::STANDARD)
    );
    assert!(
        a.rule.contains("cond_stage_model.transformer"),
        "{}",
        a.rule
    );

    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for key in table_keys(include_str!("../../data/layouts/sd1-diffusers-names.tsv")) {
        *expected.entry(sd1_block_from_diffusers(key)).or_insert(0) += 1;
    }
    // The diffusers table has no position_ids and no schedule buffers.
    let fam = Family::builtin("sd1");
    let got = counts(&ck, fam, |k| {
        !k.ends_with("position_ids") && fam.component(k) != Component::Other
    });
    assert_eq!(got, expected);
    assert_eq!(got.len(), 26);
}

#[test]
fn sdxl_blocks_match_table_structure() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(
        dir.path(),
        "xl.safetensors",
        &tiny(Family::builtin("sdxl"), 4),
    );
    let ck = Checkpoint::open(&path).unwrap();
    let a = arch::detect(ck.tensors());
    assert_eq!(a.family, Family::builtin("sdxl"));

    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for key in table_keys(include_str!("../../data/layouts/sdxl-diffusers-names.tsv")) {
        if !(key.contains("weight") || key.contains("bias")) || key.starts_with("te2.") {
            continue; // never merged (no block); te2 is counted below, its HF names split q/k/v
        }
        let parts: Vec<&str> = key.split('.').collect();
        let block = match (parts[0], parts.get(1).copied()) {
            ("unet", Some("input_blocks")) => {
                format!("IN{:02}", parts[2].parse::<usize>().unwrap())
            }
            ("unet", Some("middle_block")) => "M00".into(),
            ("unet", Some("output_blocks")) => {
                format!("OUT{:02}", parts[2].parse::<usize>().unwrap())
            }
            ("unet", Some("time_embed" | "label_emb")) => "IN00".into(),
            ("unet", Some("out")) => "OUT08".into(),
            _ => "BASE".into(),
        };
        *expected.entry(block).or_insert(0) += 1;
    }
    // OpenCLIP bigG in SGM form: 32 resblocks x 12 weight/bias tensors, plus
    // token_embedding.weight and ln_final.{weight,bias}; all in BASE.
    *expected.get_mut("BASE").unwrap() += 32 * 12 + 3;
    let fam = Family::builtin("sdxl");
    let got = counts(&ck, fam, |k| {
        !k.ends_with("position_ids") && fam.component(k) != Component::Other
    });
    assert_eq!(got, expected);
    assert_eq!(got.len(), 20);
    // Keys without weight/bias (logit_scale, text_projection, positional_embedding...) have no block.
    let unblocked: Vec<&str> = ck
        .tensors()
        .iter()
        .filter(|t| {
            arch::classify(Family::builtin("sdxl"), &t.name)
                .block
                .is_none()
        })
        .map(|t| t.name.as_str())
        .collect();
    assert!(unblocked.contains(&"conditioner.embedders.1.model.logit_scale"));
    assert!(unblocked
        .iter()
        .all(|k| !k.contains("weight") && !k.contains("bias")));
}

#[test]
fn sd2_and_variants_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let sd2 = synth(
        dir.path(),
        "sd2.safetensors",
        &tiny(Family::builtin("sd2"), 5),
    );
    let a = arch::detect(Checkpoint::open(&sd2).unwrap().tensors());
    assert_eq!(a.family, Family::builtin("sd2"));
    assert!(a.rule.contains("OpenCLIP"), "{}", a.rule);

    for (variant, channels, id) in [
        (SynthVariant::Inpainting, 9, "inpainting"),
        (SynthVariant::InstructPix2Pix, 8, "instruct_pix2pix"),
    ] {
        let mut o = tiny(Family::builtin("sd1"), 6);
        o.variant = variant;
        let p = synth(dir.path(), &format!("v{channels}.safetensors"), &o);
        let ck = Checkpoint::open(&p).unwrap();
        assert_eq!(ck.get(arch::UNET_CONV_IN).unwrap().shape[1], channels);
        let a = arch::detect(ck.tensors());
        assert_eq!((a.family, a.variant.id), (Family::builtin("sd1"), id));
        assert!(a.rule.contains(&format!("{channels} input channels")));
    }

    let mut o = tiny(Family::builtin("sdxl"), 7);
    o.variant = SynthVariant::Inpainting;
    let p = synth(dir.path(), "xl-inpaint.safetensors", &o);
    let a = arch::detect(Checkpoint::open(&p).unwrap().tensors());
    assert_eq!(
        (a.family, a.variant.id),
        (Family::builtin("sdxl"), "inpainting")
    );
}

#[test]
fn unknown_and_unet_only_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    raw_safetensors(
        &path,
        r#"{"foo.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let a = arch::detect(Checkpoint::open(&path).unwrap().tensors());
    assert_eq!(a.family, Family::generic());
    assert_eq!(
        arch::classify(a.family, "foo.weight").block.as_deref(),
        Some("BASE")
    );

    // A UNet-only SD2 file: linear proj_in tells it apart from SD1.
    let base = synth(
        dir.path(),
        "sd2.safetensors",
        &tiny(Family::builtin("sd2"), 8),
    );
    let ck = Checkpoint::open(&base).unwrap();
    let unet: Vec<_> = ck
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("model.diffusion_model."))
        .cloned()
        .collect();
    let a = arch::detect(&unet);
    assert_eq!(a.family, Family::builtin("sd2"), "{}", a.rule);
    assert!(a.rule.contains("linear proj_in"));
}

#[test]
fn sdxl_refiner_is_recognized_by_its_single_openclip_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refiner.safetensors");
    let h = r#"{"conditioner.embedders.0.model.ln_final.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"model.diffusion_model.input_blocks.0.0.weight":{"dtype":"F32","shape":[1,4,1,1],"data_offsets":[4,20]}}"#;
    raw_safetensors(&path, h, &[0; 20]);
    let a = arch::detect(Checkpoint::open(&path).unwrap().tensors());
    assert_eq!(
        (a.family, a.variant),
        (Family::builtin("sdxl_refiner"), Variant::STANDARD)
    );
    assert_eq!(a.family.blocks().len(), 26);
    assert_eq!(
        arch::classify(
            a.family,
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
        )
        .block
        .as_deref(),
        Some("OUT11")
    );
}
