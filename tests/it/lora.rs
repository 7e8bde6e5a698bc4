//! LoRA: module-name resolution against the real layouts, the weight-change math against
//! hand-worked answers (lora.md §7), and baking into tiny synthetic checkpoints checked
//! against an f64 reference written here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::DType;
use mergesmith::lora::bake::{self, Application};
use mergesmith::lora::blocks::BlockWeights;
use mergesmith::lora::delta::delta;
use mergesmith::lora::names::{ldm_to_diffusers, Targets};
use mergesmith::lora::LoraFile;

/// Writes f32 tensors (name, shape, values) as a safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let specs = tensors
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n.to_string(),
            dtype: DType::F32,
            shape: s.clone(),
        })
        .collect();
    let w = SafetensorsWriter::create(path, specs, &BTreeMap::new(), true).unwrap();
    for (n, _, v) in tensors {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write(n, &bytes).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

/// The weight change of the single module of a LoRA file, for a target of `shape`.
fn delta_of(
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    shape: &[usize],
    w: Option<&[f32]>,
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let f = LoraFile::open(&write_f32(&dir.path().join("l.safetensors"), tensors)).unwrap();
    assert_eq!(f.modules.len(), 1, "{:?}", f.modules);
    delta(&f, &f.modules[0], shape.iter().product(), w, shape).unwrap()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn known_answers_of_lora_md() {
    let m = "lora_unet_x";
    let t = |p: &str, s: Vec<usize>, v: Vec<f32>| {
        (Box::leak(format!("{m}.{p}").into_boxed_str()) as &str, s, v)
    };
    // 1. linear, alpha 0.5, rank 1 (ratio 2 applied by hand).
    let d = delta_of(
        &[
            t("lora_up.weight", vec![2, 1], vec![1., 2.]),
            t("lora_down.weight", vec![1, 3], vec![3., 4., 5.]),
            t("alpha", vec![], vec![0.5]),
        ],
        &[2, 3],
        None,
    );
    close(
        &d.iter().map(|x| 2. * x).collect::<Vec<_>>(),
        &[3., 4., 5., 6., 8., 10.],
    );
    // 2. rank 2, alpha 1.
    let d = delta_of(
        &[
            t("lora_up.weight", vec![3, 2], vec![1., 0., 0., 1., 1., 1.]),
            t("lora_down.weight", vec![2, 2], vec![1., 2., 3., 4.]),
            t("alpha", vec![], vec![1.]),
        ],
        &[3, 2],
        None,
    );
    close(&d, &[0.5, 1., 1.5, 2., 2., 3.]);
    // 3. conv 3x3.
    let k: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let d = delta_of(
        &[
            t("lora_up.weight", vec![2, 1, 1, 1], vec![1., -1.]),
            t("lora_down.weight", vec![1, 1, 3, 3], k.clone()),
            t("alpha", vec![], vec![1.]),
        ],
        &[2, 1, 3, 3],
        None,
    );
    let neg: Vec<f32> = k.iter().map(|v| -v).collect();
    close(&d, &[k.clone(), neg].concat());
    // 4. Tucker (1x2 kernel), scale 1 (alpha = rank 2).
    let d = delta_of(
        &[
            t("lora_up.weight", vec![2, 2, 1, 1], vec![1., 0., 1., 1.]),
            t("lora_down.weight", vec![2, 2, 1, 1], vec![1., 2., 0., 1.]),
            t(
                "lora_mid.weight",
                vec![2, 2, 1, 2],
                vec![1., 0., 0., 1., 2., 0., 0., 0.],
            ),
            t("alpha", vec![], vec![2.]),
        ],
        &[2, 2, 1, 2],
        None,
    );
    close(&d, &[1., 0., 2., 1., 3., 0., 6., 1.]);
    // 5. LoHa, alpha 1, rank 1.
    let d = delta_of(
        &[
            t("hada_w1_a", vec![2, 1], vec![1., 2.]),
            t("hada_w1_b", vec![1, 2], vec![3., 4.]),
            t("hada_w2_a", vec![2, 1], vec![1., 1.]),
            t("hada_w2_b", vec![1, 2], vec![1., 2.]),
            t("alpha", vec![], vec![1.]),
        ],
        &[2, 2],
        None,
    );
    close(&d, &[3., 8., 6., 16.]);
    // 6. LoKr with full factors (alpha ignored), then with a decomposed w2 (alpha 0.5, rank 1).
    let d = delta_of(
        &[
            t("lokr_w1", vec![2, 2], vec![1., 2., 3., 4.]),
            t("lokr_w2", vec![2, 2], vec![0., 1., 1., 0.]),
            t("alpha", vec![], vec![7.]),
        ],
        &[4, 4],
        None,
    );
    close(
        &d,
        &[
            0., 1., 0., 2., 1., 0., 2., 0., 0., 3., 0., 4., 3., 0., 4., 0.,
        ],
    );
    let d = delta_of(
        &[
            t("lokr_w1", vec![2, 2], vec![1., 2., 3., 4.]),
            t("lokr_w2_a", vec![2, 1], vec![1., 0.]),
            t("lokr_w2_b", vec![1, 2], vec![1., 1.]),
            t("alpha", vec![], vec![0.5]),
        ],
        &[4, 4],
        None,
    );
    close(
        &d,
        &[
            0.5, 0.5, 1., 1., 0., 0., 0., 0., 1.5, 1.5, 2., 2., 0., 0., 0., 0.,
        ],
    );
    // 6b. LoKr with a Tucker w2 (1x2 kernel, rank 1, alpha 0.5): w2[p, 0, 0, x] =
    // t2[x] · w2_a[p] · w2_b = [[2, 4], [6, 12]]; kron with w1 = [1, -1]ᵀ; scale 0.5.
    let d = delta_of(
        &[
            t("lokr_w1", vec![2, 1], vec![1., -1.]),
            t("lokr_t2", vec![1, 1, 1, 2], vec![1., 2.]),
            t("lokr_w2_a", vec![1, 2], vec![1., 3.]),
            t("lokr_w2_b", vec![1, 1], vec![2.]),
            t("alpha", vec![], vec![0.5]),
        ],
        &[4, 1, 1, 2],
        None,
    );
    close(&d, &[1., 2., 3., 6., -1., -2., -3., -6.]);
    // Rank 2 with an asymmetric core (a swapped index would give [5, 2]):
    // w2[p] = Σ_ij t2[i, j] · w2_a[i, p] · w2_b[j] = [7, 2]; alpha = rank, scale 1.
    let d = delta_of(
        &[
            t("lokr_w1", vec![1, 1], vec![1.]),
            t("lokr_t2", vec![2, 2, 1, 1], vec![1., 2., 0., 1.]),
            t("lokr_w2_a", vec![2, 2], vec![1., 0., 1., 1.]),
            t("lokr_w2_b", vec![2, 1], vec![1., 2.]),
            t("alpha", vec![], vec![2.]),
        ],
        &[2, 1, 1, 1],
        None,
    );
    close(&d, &[7., 2.]);
    // 7. IA3 on the output and on the input axis.
    let w = [1f32, 2., 3., 4.];
    let ia3 = |on_input: f32| {
        delta_of(
            &[
                t("weight", vec![2], vec![0.5, -1.]),
                t("on_input", vec![], vec![on_input]),
            ],
            &[2, 2],
            Some(&w),
        )
    };
    close(&ia3(0.), &[0.5, 1., -3., -4.]);
    close(&ia3(1.), &[0.5, -2., 1.5, -4.]);
    // 8. GLoRA, current layout, then the 2023 layout of the same factors; scale 1.
    let w = [1f32, 0., 0., 2.];
    let glora = |parts: [(&str, Vec<usize>, Vec<f32>); 4]| {
        let mut tensors: Vec<_> = parts
            .into_iter()
            .map(|(p, s, v)| t(&format!("{p}.weight"), s, v))
            .collect();
        tensors.push(t("alpha", vec![], vec![1.]));
        delta_of(&tensors, &[2, 2], Some(&w))
    };
    let current = glora([
        ("b1", vec![2, 1], vec![1., 0.]),
        ("b2", vec![1, 2], vec![0., 1.]),
        ("a1", vec![2, 1], vec![1., 1.]),
        ("a2", vec![1, 2], vec![1., 0.]),
    ]);
    close(&current, &[1., 1., 2., 0.]);
    let old = glora([
        ("b2", vec![2, 1], vec![1., 0.]),
        ("b1", vec![1, 2], vec![0., 1.]),
        ("a2", vec![2, 1], vec![1., 1.]),
        ("a1", vec![1, 2], vec![1., 0.]),
    ]);
    close(&old, &[1., 1., 2., 0.]);
    // OFT, one 2x2 block: Q = [[0, .5], [-.5, 0]], Cayley R = [[.6, .8], [-.8, .6]];
    // W = (1, 2)ᵀ becomes Rᵀ·W = (-1, 2), so ΔW = (-2, 0). With alpha 0.1 the constraint
    // 0.1 · 2 rows scales Q to norm 0.2 (t = 0.141421): R = [[.960784, .277297], [-.277297,
    // .960784]], ΔW = (-0.593810, 0.198866). A rescale of (2, 1) doubles row 0 of Rᵀ·W.
    let w = [1f32, 2.];
    let oft = |alpha: f32, rescale: bool| {
        let mut parts = vec![
            t("oft_blocks", vec![1, 2, 2], vec![0., 0.5, 0., 0.]),
            t("alpha", vec![], vec![alpha]),
        ];
        if rescale {
            parts.push(t("rescale", vec![2, 1], vec![2., 1.]));
        }
        delta_of(&parts, &[2, 1], Some(&w))
    };
    close(&oft(1.0, false), &[-2., 0.]);
    let clamped = oft(0.1, false);
    assert!(
        (clamped[0] + 0.593810).abs() < 1e-5 && (clamped[1] - 0.198866).abs() < 1e-5,
        "{clamped:?}"
    );
    close(&oft(1.0, true), &[-3., 0.]);
    // alpha 0 (LyCORIS' default for diag-OFT) is "no constraint": the full rotation, as
    // without alpha, not a no-op.
    close(&oft(0.0, false), &[-2., 0.]);
}

#[test]
fn ia3_flag_stored_as_an_integer_tensor_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ia3.safetensors");
    let m = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let specs = vec![
        TensorSpec {
            name: format!("{m}.weight"),
            dtype: DType::F32,
            shape: vec![2],
        },
        TensorSpec {
            name: format!("{m}.on_input"),
            dtype: DType::I64,
            shape: vec![],
        },
    ];
    let w = SafetensorsWriter::create(&path, specs, &BTreeMap::new(), true).unwrap();
    w.write(
        &format!("{m}.weight"),
        &[0.5f32, -1.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    w.write(&format!("{m}.on_input"), &1i64.to_le_bytes())
        .unwrap();
    w.finish().unwrap();
    let f = LoraFile::open(&path).unwrap();
    let d = delta(&f, &f.modules[0], 4, Some(&[1., 2., 3., 4.]), &[2, 2]).unwrap();
    // The same answer as the float flag: scales per input column.
    close(&d, &[0.5, -2., 1.5, -4.]);
}

#[test]
fn dora_known_answers() {
    use mergesmith::lora::delta::dora_change;
    // Output axis: V row norms (5, 2) => W_dora [[6,8],[0,2]]; strength 0.5 blends halfway.
    let w = [3f32, 4., 0., 1.];
    let d = [0f32, 0., 0., 1.];
    let full = dora_change(&w, &[2, 2], &d, 1.0, &[10., 2.], &[2, 1], 1.0).unwrap();
    let baked: Vec<f32> = w.iter().zip(&full).map(|(a, b)| a + b).collect();
    close(&baked, &[6., 8., 0., 2.]);
    let half = dora_change(&w, &[2, 2], &d, 1.0, &[10., 2.], &[2, 1], 0.5).unwrap();
    let baked: Vec<f32> = w.iter().zip(&half).map(|(a, b)| a + b).collect();
    close(&baked, &[4.5, 6., 0., 1.5]);
    // Input axis (one scale per input column).
    let w = [3f32, 0., 4., 1.];
    let c = dora_change(&w, &[2, 2], &[0.; 4], 1.0, &[10., 2.], &[1, 2], 1.0).unwrap();
    let baked: Vec<f32> = w.iter().zip(&c).map(|(a, b)| a + b).collect();
    close(&baked, &[6., 0., 8., 2.]);
    // A scale that fits neither axis is refused.
    assert!(dora_change(&w, &[2, 2], &[0.; 4], 1.0, &[1., 2., 3.], &[3, 1], 1.0).is_err());
}

fn header_only(text: &str) -> Checkpoint {
    Checkpoint::header_only(
        Path::new("layout"),
        layout_table(text)
            .into_iter()
            .map(|(k, s)| (k, DType::F16, s)),
    )
}

/// kohya's default targets (lora.md §1.2): transformer children and TE attention/MLP.
fn kohya_target(path: &str) -> bool {
    let unet = path.contains("transformer_blocks")
        && ["attn1.to_", "attn2.to_", "ff.net.0.proj", "ff.net.2"]
            .iter()
            .any(|p| path.contains(p))
        && !path.contains("norm")
        || path.ends_with("proj_in")
        || path.ends_with("proj_out");
    let te = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ]
    .iter()
    .any(|p| path.ends_with(p));
    unet || te
}

#[test]
fn sd1_module_names_resolve_like_sd_scripts_writes_them() {
    let ck = header_only(include_str!("../../data/layouts/sd1-ldm.tsv"));
    let targets = Targets::of(&ck);
    let shapes: BTreeMap<String, Vec<usize>> =
        layout_table(include_str!("../../data/layouts/sd1-ldm.tsv"))
            .into_iter()
            .collect();
    let numel = |k: &str| shapes[k].iter().product::<usize>();
    // sd-scripts names SD1 modules by their diffusers paths.
    let (mut unet, mut te) = (0, 0);
    for (key, shape) in layout_table(include_str!("../../data/layouts/sd1-diffusers-names.tsv")) {
        let Some(path) = key.strip_suffix(".weight") else {
            continue;
        };
        if !kohya_target(path) || !(shape.len() == 2 || shape.len() == 4) {
            continue;
        }
        let (name, count) = match (path.strip_prefix("unet."), path.strip_prefix("te.")) {
            (Some(p), _) => (format!("lora_unet_{}", p.replace('.', "_")), &mut unet),
            (_, Some(p)) => (format!("lora_te_{}", p.replace('.', "_")), &mut te),
            _ => continue,
        };
        let t = targets
            .get(&name)
            .unwrap_or_else(|| panic!("{name} does not resolve"));
        assert_eq!(
            numel(&t.key),
            shape.iter().product::<usize>(),
            "{name} -> {}",
            t.key
        );
        // The block read from the module name is the block of the weight it changes.
        assert_eq!(
            mergesmith::lora::names::module_block(&name),
            mergesmith::arch::classify(Family::builtin("sd1"), &t.key).block,
            "{name}"
        );
        *count += 1;
    }
    assert_eq!((te, unet), (72, 192));
}

#[test]
fn ldm_paths_map_to_the_diffusers_table() {
    // Every SD1 U-Net weight of the LDM table maps to a diffusers name of the same shape.
    let d: BTreeMap<String, Vec<usize>> =
        layout_table(include_str!("../../data/layouts/sd1-diffusers-names.tsv"))
            .into_iter()
            .collect();
    let mut n = 0;
    for (key, shape) in layout_table(include_str!("../../data/layouts/sd1-ldm.tsv")) {
        let Some(p) = key
            .strip_prefix("model.diffusion_model.")
            .and_then(|p| p.strip_suffix(".weight"))
        else {
            continue;
        };
        let mapped = ldm_to_diffusers(p).unwrap_or_else(|| panic!("no diffusers name for {p}"));
        let dk = format!("unet.{mapped}.weight");
        assert_eq!(d.get(&dk), Some(&shape), "{key} -> {dk}");
        n += 1;
    }
    assert_eq!(n, 391);
    // The worked examples of lora.md §1.3, SD1 and SDXL.
    let sd1 = Targets::of(&header_only(include_str!("../../data/layouts/sd1-ldm.tsv")));
    let xl = Targets::of(&header_only(include_str!(
        "../../data/layouts/sdxl-sgm.tsv"
    )));
    for (t, name, key) in [
        (
            &sd1,
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "input_blocks.1.1.proj_in",
        ),
        (
            &sd1,
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
            "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
        ),
        (
            &sd1,
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "input_blocks.4.0.skip_connection",
        ),
        (
            &sd1,
            "lora_unet_up_blocks_0_upsamplers_0_conv",
            "output_blocks.2.1.conv",
        ),
        (
            &xl,
            "lora_unet_output_blocks_5_2_conv",
            "output_blocks.5.2.conv",
        ),
        (
            &xl,
            "lora_unet_up_blocks_1_upsamplers_0_conv",
            "output_blocks.5.2.conv",
        ),
        (
            &xl,
            "lora_unet_middle_block_1_proj_in",
            "middle_block.1.proj_in",
        ),
        (
            &sd1,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        ),
        (
            &sd1,
            "lycoris_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
            "middle_block.1.transformer_blocks.0.ff.net.2",
        ),
    ] {
        let want = format!("model.diffusion_model.{key}.weight");
        assert_eq!(
            t.get(name).map(|t| t.key.as_str()),
            Some(want.as_str()),
            "{name}"
        );
    }
}

#[test]
fn sdxl_module_names_resolve_with_fused_qkv_slices() {
    let ck = header_only(include_str!("../../data/layouts/sdxl-sgm.tsv"));
    let targets = Targets::of(&ck);
    // sd-scripts names SDXL U-Net modules by their LDM paths.
    let mut unet = 0;
    for (key, shape) in layout_table(include_str!("../../data/layouts/sdxl-sgm.tsv")) {
        let Some(p) = key
            .strip_prefix("model.diffusion_model.")
            .and_then(|p| p.strip_suffix(".weight"))
        else {
            continue;
        };
        if kohya_target(p) && (shape.len() == 2 || shape.len() == 4) {
            let name = format!("lora_unet_{}", p.replace('.', "_"));
            assert_eq!(
                targets.get(&name).map(|t| t.key.as_str()),
                Some(key.as_str())
            );
            assert_eq!(
                mergesmith::lora::names::module_block(&name),
                mergesmith::arch::classify(Family::builtin("sdxl"), &key).block,
                "{name}"
            );
            unet += 1;
        }
    }
    let mut te = [0, 0];
    for (i, prefix, layers) in [(0, "lora_te1_", 12), (1, "lora_te2_", 32)] {
        for l in 0..layers {
            for part in [
                "self_attn_q_proj",
                "self_attn_k_proj",
                "self_attn_v_proj",
                "self_attn_out_proj",
                "mlp_fc1",
                "mlp_fc2",
            ] {
                let name = format!("{prefix}text_model_encoder_layers_{l}_{part}");
                assert!(targets.get(&name).is_some(), "{name}");
                te[i] += 1;
            }
        }
    }
    assert_eq!((te[0], te[1], unet), (72, 192, 722));
    // q, k and v of a bigG layer are the three row thirds of one fused weight.
    let slices: Vec<_> = ["q", "k", "v"]
        .iter()
        .map(|x| {
            targets
                .get(&format!(
                    "lora_te2_text_model_encoder_layers_31_self_attn_{x}_proj"
                ))
                .unwrap()
                .clone()
        })
        .collect();
    assert!(slices
        .iter()
        .all(|t| t.key
            == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"));
    let rows: Vec<_> = slices.iter().map(|t| t.rows.unwrap()).collect();
    assert_eq!(rows, vec![(0, 1280), (1280, 2560), (2560, 3840)]);
    // The diffusers spelling of an SDXL module resolves to the same weight.
    let a = targets
        .get("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
        .unwrap();
    let b = targets
        .get("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
        .unwrap();
    assert_eq!(a, b);
}

/// Deterministic small values.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503));
            ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

struct Case {
    /// kohya module name, PEFT module name, checkpoint key.
    kohya: &'static str,
    peft: &'static str,
    key: &'static str,
}

const CASES: &[Case] = &[
    Case {
        kohya: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        peft: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        key: "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    },
    Case {
        kohya: "lora_unet_down_blocks_1_resnets_0_conv1",
        peft: "unet.down_blocks.1.resnets.0.conv1",
        key: "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
    },
    Case {
        kohya: "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        peft: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        key: "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    },
];

const RANK: usize = 2;
const ALPHA: f32 = 1.0;

/// (up, down) of case `i` for a target of `shape`: up [out, r(,1,1)], down [r, in(,kh,kw)].
/// A tensor as (shape, values).
type Factor = (Vec<usize>, Vec<f32>);

fn factors(shape: &[usize], i: usize) -> (Factor, Factor) {
    let out = shape[0];
    let rest: usize = shape[1..].iter().product();
    let mut up_s = vec![out, RANK];
    let mut down_s = vec![RANK];
    down_s.extend_from_slice(&shape[1..]);
    if shape.len() == 4 {
        up_s.extend([1, 1]);
    }
    (
        (up_s, values(out * RANK, 2 * i as u32 + 1)),
        (down_s, values(RANK * rest, 2 * i as u32 + 2)),
    )
}

fn lora_files(dir: &Path, ck: &Checkpoint) -> (PathBuf, PathBuf) {
    let mut kohya = Vec::new();
    let mut peft = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let shape = ck.get(c.key).unwrap().shape.clone();
        let ((us, u), (ds, d)) = factors(&shape, i);
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        kohya.push((
            leak(format!("{}.lora_up.weight", c.kohya)),
            us.clone(),
            u.clone(),
        ));
        kohya.push((
            leak(format!("{}.lora_down.weight", c.kohya)),
            ds.clone(),
            d.clone(),
        ));
        kohya.push((leak(format!("{}.alpha", c.kohya)), vec![], vec![ALPHA]));
        // PEFT: no alpha in the file (scale 1), so the scale is folded into B.
        let scaled: Vec<f32> = u.iter().map(|x| x * ALPHA / RANK as f32).collect();
        peft.push((
            leak(format!("base_model.model.{}.lora_B.weight", c.peft)),
            us,
            scaled,
        ));
        peft.push((
            leak(format!("base_model.model.{}.lora_A.weight", c.peft)),
            ds,
            d,
        ));
    }
    (
        write_f32(&dir.join("kohya.safetensors"), &kohya),
        write_f32(&dir.join("peft.safetensors"), &peft),
    )
}

fn bake_with(model: &Path, lora: &Path, strength: f64, blocks: Option<&str>, out: &Path) {
    let app = Application {
        file: LoraFile::open(lora).unwrap(),
        strength,
        blocks: blocks.map(|b| BlockWeights::parse(b, Family::builtin("sd1"), 0.0).unwrap()),
    };
    bake::bake_file(model, &[app], out, &BTreeMap::new(), false, true, false).unwrap();
}

fn tensor_bytes(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let ck = Checkpoint::open(path).unwrap();
    ck.tensors()
        .iter()
        .map(|t| (t.name.clone(), ck.data(t).into_owned()))
        .collect()
}

fn f16s(bytes: &[u8]) -> Vec<half::f16> {
    bytes
        .chunks(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[test]
fn baking_matches_an_f64_reference_and_spellings_agree() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let ck = Checkpoint::open(&model).unwrap();
    let (kohya, peft) = lora_files(dir.path(), &ck);
    let strength = 0.7;
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    bake_with(&model, &kohya, strength, None, &a);
    bake_with(&model, &peft, strength, None, &b);
    let (before, baked, other) = (tensor_bytes(&model), tensor_bytes(&a), tensor_bytes(&b));
    assert!(
        baked == other,
        "kohya and PEFT spellings bake to the same bytes"
    );
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != baked[*k]).collect();
    let mut expected: Vec<&str> = CASES.iter().map(|c| c.key).collect();
    expected.sort();
    assert_eq!(changed, expected);
    for (i, c) in CASES.iter().enumerate() {
        let shape = &ck.get(c.key).unwrap().shape;
        let ((_, up), (_, down)) = factors(shape, i);
        let out = shape[0];
        let cols: usize = shape[1..].iter().product();
        let w = f16s(&before[c.key]);
        let got = f16s(&baked[c.key]);
        for o in 0..out {
            for j in 0..cols {
                let dw: f64 = (0..RANK)
                    .map(|r| up[o * RANK + r] as f64 * down[r * cols + j] as f64)
                    .sum::<f64>()
                    * (ALPHA as f64 / RANK as f64);
                let want = half::f16::from_f64(w[o * cols + j].to_f64() + strength * dw);
                let g = got[o * cols + j];
                // f32 arithmetic, one rounding to f16: at most one f16 step from the f64 result.
                let step = (want.to_f64().abs() * 2f64.powi(-10)).max(2f64.powi(-24));
                assert!(
                    (g.to_f64() - want.to_f64()).abs() <= step,
                    "{} [{o},{j}]: {g} vs {want}",
                    c.key
                );
            }
        }
    }
}

#[test]
fn block_weights_zero_exactly_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let ck = Checkpoint::open(&model).unwrap();
    let (kohya, _) = lora_files(dir.path(), &ck);
    let before = tensor_bytes(&model);
    let out = dir.path().join("out.safetensors");
    // NONE: nothing changes, bit for bit.
    bake_with(&model, &kohya, 1.0, Some("NONE"), &out);
    assert!(tensor_bytes(&out) == before);
    // Strength 0 as well.
    bake_with(&model, &kohya, 0.0, None, &out);
    assert!(tensor_bytes(&out) == before);
    // IN01 at 0 (17-value form: BASE, IN01, IN02, IN04, ...): the attention module of
    // input_blocks.1 keeps its weights, the text encoder (BASE) and IN04's conv change.
    bake_with(
        &model,
        &kohya,
        1.0,
        Some("1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
        &out,
    );
    let after = tensor_bytes(&out);
    let changed: Vec<&str> = CASES
        .iter()
        .filter(|c| after[c.key] != before[c.key])
        .map(|c| c.key)
        .collect();
    assert_eq!(changed, vec![CASES[1].key, CASES[2].key]);
    // All ones is the same as no block weights.
    let plain = dir.path().join("plain.safetensors");
    bake_with(&model, &kohya, 1.0, None, &plain);
    bake_with(&model, &kohya, 1.0, Some("ALL"), &out);
    assert!(tensor_bytes(&out) == tensor_bytes(&plain));
    // Bad vectors say what is expected.
    let e = BlockWeights::parse("1,0,1", Family::builtin("sd1"), 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 values; SD1.x takes 17 or 26"), "{e}");
    let e = BlockWeights::parse("OUTDD", Family::builtin("sd1"), 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `OUTD`?"), "{e}");
}

#[test]
fn unmatched_modules_and_wrong_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let odd = write_f32(
        &dir.path().join("odd.safetensors"),
        &[
            (
                "lora_unet_no_such_layer.lora_up.weight",
                vec![2, 1],
                vec![1., 1.],
            ),
            (
                "lora_unet_no_such_layer.lora_down.weight",
                vec![1, 2],
                vec![1., 1.],
            ),
        ],
    );
    let app = || Application {
        file: LoraFile::open(&odd).unwrap(),
        strength: 1.0,
        blocks: None,
    };
    let out = dir.path().join("out.safetensors");
    let e = bake::bake_file(&model, &[app()], &out, &BTreeMap::new(), false, true, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 LoRA modules match no weight") && e.contains("lora_unet_no_such_layer"),
        "{e}"
    );
    assert!(!out.exists());
    let plan =
        bake::bake_file(&model, &[app()], &out, &BTreeMap::new(), true, true, false).unwrap();
    assert_eq!((plan.applied, plan.unmatched.len()), (0, 1));
    let xl = write_f32(
        &dir.path().join("xl.safetensors"),
        &[
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                vec![2, 1],
                vec![1., 1.],
            ),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                vec![1, 2],
                vec![1., 1.],
            ),
        ],
    );
    let app = Application {
        file: LoraFile::open(&xl).unwrap(),
        strength: 1.0,
        blocks: None,
    };
    let e = bake::bake_file(&model, &[app], &out, &BTreeMap::new(), true, true, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a LoRA for SDXL, the checkpoint is SD1.x"),
        "{e}"
    );
}

#[test]
fn cli_synthesizes_and_bakes_loras() {
    let dir = tempfile::tempdir().unwrap();
    synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let bin = env!("CARGO_BIN_EXE_mergesmith");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    // sd-scripts' default targets of SD1: 264 modules, 86 more with LoCon.
    for (file, conv, modules) in [("l.safetensors", "0", 264), ("lc.safetensors", "2", 350)] {
        let out = run(&[
            "lora",
            "synth",
            "-m",
            "model.safetensors",
            "--rank",
            "4",
            "--conv-rank",
            conv,
            "-o",
            file,
        ]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("({modules} modules)")),
            "{out:?}"
        );
    }
    let bake = |spec: &str, file: &str| {
        let o = run(&[
            "lora",
            "apply",
            "-m",
            "model.safetensors",
            "-l",
            spec,
            "-o",
            file,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    // `inspect` says what the LoRA is.
    let o = run(&["inspect", "lc.safetensors", "--no-hash", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["lora"]["types"]["LoRA"], 350);
    assert_eq!(r["lora"]["ranks"]["4"], 300);
    assert_eq!(r["lora"]["conv_modules"], 50);
    assert_eq!(r["lora"]["blocks"]["BASE"], 72);
    assert_eq!(r["lora"]["architecture"], "SD1.x / SD2.x");
    let all = bake("lc.safetensors:0.8", "a.safetensors");
    assert_eq!(
        (
            all["modules_applied"].as_u64(),
            all["tensors_changed"].as_u64()
        ),
        (Some(350), Some(350))
    );
    // OUTD keeps BASE, OUT03-OUT06 only (and no LoCon block outside the 17 gets the fill 0).
    let outd = bake("lc.safetensors:0.8:OUTD", "b.safetensors");
    assert!(outd["tensors_changed"].as_u64().unwrap() < 350);
    // The baked file records what went in, by hash.
    let ck = Checkpoint::open(dir.path().join("a.safetensors")).unwrap();
    assert!(ck.metadata()["mergesmith_loras"].contains("\"strength\":0.8"));
    // A second write needs --overwrite.
    let again = run(&[
        "lora",
        "apply",
        "-m",
        "model.safetensors",
        "-l",
        "lc.safetensors",
        "-o",
        "a.safetensors",
    ]);
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn dora_bakes_rows_to_their_magnitudes() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let ck = Checkpoint::open(&model).unwrap();
    let c = &CASES[0];
    let shape = ck.get(c.key).unwrap().shape.clone();
    let ((us, u), (ds, d)) = factors(&shape, 0);
    let magnitudes: Vec<f32> = (0..shape[0]).map(|o| 0.5 + o as f32 / 10.0).collect();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let lora = write_f32(
        &dir.path().join("dora.safetensors"),
        &[
            (leak(format!("{}.lora_up.weight", c.kohya)), us, u),
            (leak(format!("{}.lora_down.weight", c.kohya)), ds, d),
            (
                leak(format!("{}.dora_scale", c.kohya)),
                vec![shape[0], 1],
                magnitudes.clone(),
            ),
        ],
    );
    let out = dir.path().join("out.safetensors");
    bake_with(&model, &lora, 1.0, None, &out);
    let baked = f16s(&tensor_bytes(&out)[c.key]);
    let cols = shape[1];
    for (o, m) in magnitudes.iter().enumerate() {
        let norm: f64 = baked[o * cols..(o + 1) * cols]
            .iter()
            .map(|x| x.to_f64().powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - *m as f64).abs() < 2e-3 * (*m as f64),
            "row {o}: {norm} vs {m}"
        );
    }
}

fn product(path: &Path, module: &str) -> Vec<f32> {
    let f = LoraFile::open(path).unwrap();
    let m = f.modules.iter().find(|m| m.name == module).unwrap();
    let shape = mergesmith::lora::delta::natural_shape(&f, m).unwrap();
    delta(&f, m, shape.iter().product(), None, &shape).unwrap()
}

#[test]
fn quantile_and_svd_merge_known_answers() {
    use mergesmith::lora::merge::{merge, MergeMode, MergeOptions};
    // 10. torch-style quantile.
    let q = mergesmith::lora::svd::quantile(&[0., 4., 0., 1.], 0.99);
    assert!((q - 3.91).abs() < 1e-6, "{q}");
    // 11. M = [[1,0],[1,1]] from two LoRAs; rank 2 reproduces it, rank 1 is the optimum.
    let dir = tempfile::tempdir().unwrap();
    let m = "lora_unet_x";
    let a = write_f32(
        &dir.path().join("a.safetensors"),
        &[
            ("lora_unet_x.lora_up.weight", vec![2, 1], vec![1., 1.]),
            ("lora_unet_x.lora_down.weight", vec![1, 2], vec![1., 0.]),
            ("lora_unet_x.alpha", vec![], vec![1.]),
        ],
    );
    let b = write_f32(
        &dir.path().join("b.safetensors"),
        &[
            (
                "lora_unet_x.lora_up.weight",
                vec![2, 2],
                vec![1., 0., 0., 1.],
            ),
            (
                "lora_unet_x.lora_down.weight",
                vec![2, 2],
                vec![0., 0., 0., 2.],
            ),
            ("lora_unet_x.alpha", vec![], vec![1.]),
        ],
    );
    let sources = |ra: f64, rb: f64| {
        vec![
            Application {
                file: LoraFile::open(&a).unwrap(),
                strength: ra,
                blocks: None,
            },
            Application {
                file: LoraFile::open(&b).unwrap(),
                strength: rb,
                blocks: None,
            },
        ]
    };
    let opts = |mode, rank| MergeOptions {
        mode,
        rank,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    let out = dir.path().join("m.safetensors");
    merge(&sources(1., 1.), &opts(MergeMode::Svd, 2), &out, true).unwrap();
    close(&product(&out, m), &[1., 0., 1., 1.]);
    let r = merge(&sources(1., 1.), &opts(MergeMode::Svd, 1), &out, true).unwrap();
    let p = product(&out, m);
    for (x, y) in p.iter().zip([0.723607f32, 0.447214, 1.17082, 0.723607]) {
        assert!((x - y).abs() < 1e-5, "{p:?}");
    }
    // Frobenius error 0.618034 of ‖M‖ = √3.
    assert!(
        (r.relative_error - 0.618034 / 3f64.sqrt()).abs() < 1e-5,
        "{}",
        r.relative_error
    );
    // 12. Exact concat of (1, 0.5): diag(1, 0.5), alpha = total rank.
    let c = write_f32(
        &dir.path().join("c.safetensors"),
        &[
            ("lora_unet_x.lora_up.weight", vec![2, 1], vec![1., 0.]),
            ("lora_unet_x.lora_down.weight", vec![1, 2], vec![1., 0.]),
            ("lora_unet_x.alpha", vec![], vec![1.]),
        ],
    );
    let d = write_f32(
        &dir.path().join("d.safetensors"),
        &[
            ("lora_unet_x.lora_up.weight", vec![2, 1], vec![0., 1.]),
            ("lora_unet_x.lora_down.weight", vec![1, 2], vec![0., 1.]),
            ("lora_unet_x.alpha", vec![], vec![1.]),
        ],
    );
    let pair = vec![
        Application {
            file: LoraFile::open(&c).unwrap(),
            strength: 1.0,
            blocks: None,
        },
        Application {
            file: LoraFile::open(&d).unwrap(),
            strength: 0.5,
            blocks: None,
        },
    ];
    merge(&pair, &opts(MergeMode::Concat, 0), &out, true).unwrap();
    close(&product(&out, m), &[1., 0., 0., 0.5]);
    let f = LoraFile::open(&out).unwrap();
    let (alpha, _) = f.part(&f.modules[0], "alpha").unwrap().unwrap();
    assert_eq!(alpha, vec![2.0]);
    // Negative ratios keep their sign (no squaring).
    let neg = vec![
        Application {
            file: LoraFile::open(&c).unwrap(),
            strength: -2.0,
            blocks: None,
        },
        Application {
            file: LoraFile::open(&d).unwrap(),
            strength: 0.5,
            blocks: None,
        },
    ];
    merge(&neg, &opts(MergeMode::Concat, 0), &out, true).unwrap();
    close(&product(&out, m), &[-2., 0., 0., 0.5]);
}

#[test]
fn extraction_recovers_a_baked_lora_and_is_optimal_when_truncated() {
    use mergesmith::lora::extract::{extract, ExtractOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut opts = tiny(Family::builtin("sd1"), 1);
    opts.dtype = mergesmith::dtype::FloatType::Fp32;
    let base = synth(dir.path(), "base.safetensors", &opts);
    let lora = dir.path().join("l.safetensors");
    mergesmith::lora::synth::synthesize(&base, 3, 0, 5, &lora, false).unwrap();
    let tuned = dir.path().join("tuned.safetensors");
    bake_with(&base, &lora, 1.0, None, &tuned);
    // Rank >= 3 and no clamp: the difference comes back, up to f32 rounding.
    let full = ExtractOptions {
        rank: 4,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    let extracted = dir.path().join("e.safetensors");
    let r = extract(&tuned, &base, &full, &extracted, false, false).unwrap();
    assert_eq!((r.modules, r.text_encoder), (264, true));
    assert!(r.relative_error < 1e-4, "{r:?}");
    let again = dir.path().join("again.safetensors");
    bake_with(&base, &extracted, 1.0, None, &again);
    let (want, got) = (tensor_bytes(&tuned), tensor_bytes(&again));
    // Per tensor, ‖again − tuned‖ / ‖tuned‖ (Frobenius), f32 SVD.
    let mut worst = 0f64;
    for (k, w) in &want {
        let as_f32 = |b: &[u8]| -> Vec<f64> {
            b.chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect()
        };
        if k.ends_with("position_ids") {
            continue;
        }
        let (x, y) = (as_f32(w), as_f32(&got[k]));
        let diff: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 0.0 {
            worst = worst.max(diff / norm);
        }
    }
    assert!(worst < 1e-5, "worst relative difference {worst}");
    // Rank 1 < 3: the error is the Eckart–Young optimum (no clamp).
    let low = ExtractOptions {
        rank: 1,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    let r = extract(&tuned, &base, &low, &extracted, true, false).unwrap();
    assert!(r.relative_error > 0.1);
    assert!(
        (r.relative_error - r.optimal_relative_error).abs() < 1e-4 * r.relative_error,
        "{r:?}"
    );
    // Identical text encoders are left out.
    let unet_only = dir.path().join("unet-only.safetensors");
    let r = extract(&base, &base, &full, &unet_only, false, false).unwrap();
    assert_eq!((r.modules, r.text_encoder), (192, false));
}

#[test]
fn lora_merge_matches_modules_across_spellings() {
    use mergesmith::lora::merge::{merge, MergeMode, MergeOptions};
    let dir = tempfile::tempdir().unwrap();
    let model = synth(
        dir.path(),
        "model.safetensors",
        &tiny(Family::builtin("sd1"), 1),
    );
    let (kohya, peft) = lora_files(dir.path(), &Checkpoint::open(&model).unwrap());
    let mut names: Vec<&str> = CASES.iter().map(|c| c.kohya).collect();
    names.sort();
    for mode in [MergeMode::Concat, MergeMode::Svd] {
        let out = dir.path().join(format!("{mode:?}.safetensors"));
        let sources = [
            Application {
                file: LoraFile::open(&kohya).unwrap(),
                strength: 0.5,
                blocks: None,
            },
            Application {
                file: LoraFile::open(&peft).unwrap(),
                strength: 0.25,
                blocks: None,
            },
        ];
        let opts = MergeOptions {
            mode,
            rank: RANK,
            conv_rank: None,
            clamp_quantile: 1.0,
            ..Default::default()
        };
        merge(&sources, &opts, &out, false).unwrap();
        // One module per weight, under its kohya name, holding both files' changes: the
        // same ΔW, so 0.5 + 0.25 of it (rank 2 holds it exactly in svd mode too).
        let merged = LoraFile::open(&out).unwrap();
        let got: Vec<&str> = merged.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(got, names, "{mode:?}");
        for name in &names {
            let want: Vec<f32> = product(&kohya, name).iter().map(|x| 0.75 * x).collect();
            let have = product(&out, name);
            assert_eq!(want.len(), have.len());
            for (w, h) in want.iter().zip(&have) {
                assert!(
                    (w - h).abs() <= 1e-5 * w.abs().max(1.0),
                    "{mode:?} {name}: {w} vs {h}"
                );
            }
        }
    }
    // Files for different families are refused, naming both.
    let module = |prefix: &str| {
        let name = format!("{prefix}text_model_encoder_layers_0_self_attn_q_proj");
        write_f32(
            &dir.path().join(format!("{prefix}.safetensors")),
            &[
                (
                    Box::leak(format!("{name}.lora_up.weight").into_boxed_str()),
                    vec![2, 1],
                    vec![1., 2.],
                ),
                (
                    Box::leak(format!("{name}.lora_down.weight").into_boxed_str()),
                    vec![1, 2],
                    vec![1., 0.],
                ),
            ],
        )
    };
    let sources = ["lora_te_", "lora_te2_"].map(|p| Application {
        file: LoraFile::open(&module(p)).unwrap(),
        strength: 1.0,
        blocks: None,
    });
    let opts = MergeOptions {
        mode: MergeMode::Concat,
        rank: 4,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    let err = merge(&sources, &opts, &dir.path().join("x.safetensors"), false)
        .unwrap_err()
        .to_string();
    // DoRA depends on the weight: merging it is refused (in svd mode too), not approximated.
    let dora = write_f32(
        &dir.path().join("dora.safetensors"),
        &[
            ("lora_unet_x.lora_up.weight", vec![2, 1], vec![1., 2.]),
            ("lora_unet_x.lora_down.weight", vec![1, 2], vec![1., 0.]),
            ("lora_unet_x.dora_scale", vec![2, 1], vec![1., 1.]),
        ],
    );
    for mode in [MergeMode::Concat, MergeMode::Svd] {
        let one = [Application {
            file: LoraFile::open(&dora).unwrap(),
            strength: 1.0,
            blocks: None,
        }];
        let opts = MergeOptions {
            mode,
            ..opts.clone()
        };
        let e = merge(&one, &opts, &dir.path().join("d.safetensors"), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("is DoRA, whose change depends on the weight"),
            "{e}"
        );
    }
    assert!(
        err.contains("lora_te_.safetensors is a LoRA for SD1.x")
            && err.contains("lora_te2_.safetensors for SDXL base: they cannot be merged"),
        "{err}"
    );
}

#[test]
fn glora_matches_an_f64_reference() {
    let (out, inp, r) = (3usize, 4usize, 2usize);
    let (w, a1, a2, b1, b2) = (
        values(out * inp, 1),
        values(inp * r, 2),
        values(r * inp, 3),
        values(out * r, 4),
        values(r * inp, 5),
    );
    let alpha = 1.5f64;
    let mm = |a: &[f32], m: usize, k: usize, b: &[f32], n: usize| -> Vec<f64> {
        let mut o = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|x| a[i * k + x] as f64 * b[x * n + j] as f64)
                    .sum();
            }
        }
        o
    };
    let a: Vec<f32> = mm(&a1, inp, r, &a2, inp)
        .iter()
        .map(|x| *x as f32)
        .collect();
    let (bb, wa) = (mm(&b1, out, r, &b2, inp), mm(&w, out, inp, &a, inp));
    let want: Vec<f32> = bb
        .iter()
        .zip(&wa)
        .map(|(x, y)| ((x + y) * alpha / r as f64) as f32)
        .collect();
    let m = "lora_unet_x";
    let t = |p: &str, s: Vec<usize>, v: Vec<f32>| {
        (Box::leak(format!("{m}.{p}").into_boxed_str()) as &str, s, v)
    };
    let got = delta_of(
        &[
            t("a1.weight", vec![inp, r], a1.clone()),
            t("a2.weight", vec![r, inp], a2.clone()),
            t("b1.weight", vec![out, r], b1.clone()),
            t("b2.weight", vec![r, inp], b2.clone()),
            t("alpha", vec![], vec![alpha as f32]),
        ],
        &[out, inp],
        Some(&w),
    );
    for (g, e) in got.iter().zip(&want) {
        assert!(
            (g - e).abs() <= 1e-5 * e.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn convolutional_glora_mixes_input_channels_at_every_kernel_position() {
    // LyCORIS / ComfyUI: a1 [in, r, 1, 1] and a2 [r, in, 1, 1] act on the input channels of
    // W [out, in, kh, kw] at each kernel position (einsum `o i ..., i j -> o j ...` twice);
    // b1 [out, r, 1, 1] · b2 [r, in, kh, kw] is a LoCon-style product. Scale alpha / rank.
    let (out, inp, kh, kw, r) = (2usize, 3usize, 2usize, 2usize, 2usize);
    let ksz = kh * kw;
    let (w, a1, a2, b1, b2) = (
        values(out * inp * ksz, 21),
        values(inp * r, 22),
        values(r * inp, 23),
        values(out * r, 24),
        values(r * inp * ksz, 25),
    );
    let alpha = 3.0f64;
    let mut want = vec![0f64; out * inp * ksz];
    for o in 0..out {
        for i2 in 0..inp {
            for p in 0..ksz {
                let mut a = 0f64;
                for j in 0..r {
                    let wa1: f64 = (0..inp)
                        .map(|i| w[(o * inp + i) * ksz + p] as f64 * a1[i * r + j] as f64)
                        .sum();
                    a += wa1 * a2[j * inp + i2] as f64;
                }
                let b: f64 = (0..r)
                    .map(|j| b1[o * r + j] as f64 * b2[(j * inp + i2) * ksz + p] as f64)
                    .sum();
                want[(o * inp + i2) * ksz + p] = (a + b) * alpha / r as f64;
            }
        }
    }
    let m = "lora_unet_down_blocks_0_resnets_0_conv1";
    let t = |p: &str, s: Vec<usize>, v: Vec<f32>| {
        (Box::leak(format!("{m}.{p}").into_boxed_str()) as &str, s, v)
    };
    let got = delta_of(
        &[
            t("a1.weight", vec![inp, r, 1, 1], a1),
            t("a2.weight", vec![r, inp, 1, 1], a2),
            t("b1.weight", vec![out, r, 1, 1], b1),
            t("b2.weight", vec![r, inp, kh, kw], b2),
            t("alpha", vec![], vec![alpha as f32]),
        ],
        &[out, inp, kh, kw],
        Some(&w),
    );
    for (g, e) in got.iter().zip(&want) {
        assert!(
            (*g as f64 - e).abs() <= 1e-5 * e.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

/// The Cayley rotation of one 2x2 block `[[a, b], [c, d]]` in closed form: with
/// `q = b − c`, `R = [[1 − q², 2q], [−2q, 1 − q²]] / (1 + q²)`.
fn cayley2(b: &[f32], scale: f64) -> [f64; 4] {
    let q = (b[1] as f64 - b[2] as f64) * scale;
    let n = 1.0 + q * q;
    [
        (1.0 - q * q) / n,
        2.0 * q / n,
        -2.0 * q / n,
        (1.0 - q * q) / n,
    ]
}

#[test]
fn boft_rotates_rows_in_butterfly_pairs() {
    // LyCORIS BOFT with 2 levels of 2 blocks of 2x2 on a [4, 3] weight: level 0 rotates row
    // pairs (0, 1) and (2, 3); level 1 (k = 2) pairs (0, 2) and (1, 3); W' = rescale · R₁R₀W
    // (rows: x' = R[0][0]·x + R[0][1]·y, y' = R[1][0]·x + R[1][1]·y).
    let (out, cols) = (4usize, 3usize);
    let w = values(out * cols, 31);
    let blocks = values(2 * 2 * 2 * 2, 32);
    let rescale = [1.5f32, 1.0, 0.5, 2.0];
    let reference = |scale: f64, rescaled: bool| -> Vec<f64> {
        let mut x: Vec<f64> = w.iter().map(|v| *v as f64).collect();
        let pairs = [[(0, 1), (2, 3)], [(0, 2), (1, 3)]];
        for (level, level_pairs) in pairs.iter().enumerate() {
            for (blk, &(a, b)) in level_pairs.iter().enumerate() {
                let o = (level * 2 + blk) * 4;
                let r = cayley2(&blocks[o..o + 4], scale);
                for c in 0..cols {
                    let (xa, xb) = (x[a * cols + c], x[b * cols + c]);
                    x[a * cols + c] = r[0] * xa + r[1] * xb;
                    x[b * cols + c] = r[2] * xa + r[3] * xb;
                }
            }
        }
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let s = if rescaled {
                    rescale[i / cols] as f64
                } else {
                    1.0
                };
                s * v - w[i] as f64
            })
            .collect()
    };
    let m = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let t = |p: &str, s: Vec<usize>, v: Vec<f32>| {
        (Box::leak(format!("{m}.{p}").into_boxed_str()) as &str, s, v)
    };
    let got = |alpha: f32, rescaled: bool| {
        let mut parts = vec![
            t("oft_blocks", vec![2, 2, 2, 2], blocks.clone()),
            t("alpha", vec![], vec![alpha]),
        ];
        if rescaled {
            parts.push(t("rescale", vec![4, 1], rescale.to_vec()));
        }
        delta_of(&parts, &[out, cols], Some(&w))
    };
    let check = |got: Vec<f32>, want: Vec<f64>| {
        for (g, e) in got.iter().zip(&want) {
            assert!((*g as f64 - e).abs() <= 1e-5, "{got:?} vs {want:?}");
        }
    };
    check(got(0.0, false), reference(1.0, false));
    check(got(0.0, true), reference(1.0, true));
    // A constraint below ‖Q‖ (alpha · 4 rows) scales every Q by c / (‖Q‖ + 1e-8).
    let norm: f64 = (0..4)
        .map(|k| {
            let q = blocks[k * 4 + 1] as f64 - blocks[k * 4 + 2] as f64;
            2.0 * q * q
        })
        .sum::<f64>()
        .sqrt()
        + 1e-8;
    let c = 0.05 * 4.0;
    assert!(norm > c);
    check(got(0.05, false), reference(c / norm, false));
    // Kind and label.
    let dir = tempfile::tempdir().unwrap();
    let f = write_f32(
        &dir.path().join("boft.safetensors"),
        &[t("oft_blocks", vec![2, 2, 2, 2], blocks.clone())],
    );
    let file = LoraFile::open(&f).unwrap();
    assert_eq!(file.modules[0].kind, mergesmith::lora::Kind::Boft);
    assert_eq!(file.summary().types["BOFT"], 1);
}

#[test]
fn lycoris_norm_modules_change_norm_weights_and_biases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = synth(d, "sd1.safetensors", &tiny(Family::builtin("sd1"), 1));
    let ck = Checkpoint::open(&model).unwrap();
    let keys = [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1",
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_norm1",
            "model.diffusion_model.input_blocks.1.0.in_layers.0",
        ),
        (
            "lora_te_text_model_encoder_layers_0_layer_norm1",
            "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1",
        ),
    ];
    let mut tensors = Vec::new();
    let mut want = BTreeMap::new();
    for (i, (module, layer)) in keys.iter().enumerate() {
        for (part, suffix, seed) in [("w_norm", "weight", 40), ("b_norm", "bias", 50)] {
            let key = format!("{layer}.{suffix}");
            let t = ck.get(&key).unwrap_or_else(|| panic!("{key}"));
            let base = mergesmith::convert::to_f32(t.dtype, &ck.data(t)).unwrap();
            let diff = values(t.numel(), seed + i as u32);
            let expected: Vec<f64> = base
                .iter()
                .zip(&diff)
                .map(|(b, x)| *b as f64 + 0.5 * *x as f64)
                .collect();
            want.insert(key, expected);
            let name: &str = Box::leak(format!("{module}.{part}").into_boxed_str());
            tensors.push((name, t.shape.clone(), diff));
        }
    }
    let lora = write_f32(&d.join("norm.safetensors"), &tensors);
    let file = LoraFile::open(&lora).unwrap();
    assert!(file
        .modules
        .iter()
        .all(|m| m.kind == mergesmith::lora::Kind::Norm));
    let app = Application {
        file,
        strength: 0.5,
        blocks: None,
    };
    let out = d.join("out.safetensors");
    let plan =
        bake::bake_file(&model, &[app], &out, &BTreeMap::new(), false, false, false).unwrap();
    assert_eq!(plan.changes.len(), 6);
    let baked = Checkpoint::open(&out).unwrap();
    for (key, w) in &want {
        let t = baked.get(key).unwrap();
        let got = mergesmith::convert::to_f32(t.dtype, &baked.data(t)).unwrap();
        for (g, e) in got.iter().zip(w) {
            // fp16 storage: within half an fp16 ulp (2^-11 relative) of the f64 sum.
            assert!(
                (*g as f64 - e).abs() <= e.abs() * 2f64.powi(-11) + 1e-7,
                "{key}"
            );
        }
    }
}
