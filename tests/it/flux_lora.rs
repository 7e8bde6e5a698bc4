//! LoRAs on the transformer families (Flux; SD3 at the end): kohya (`lora_unet_double_blocks_0_img_attn_qkv`), diffusers / PEFT /
//! AI-Toolkit (`transformer.transformer_blocks.0.attn.to_q`, a row slice of the fused `qkv`),
//! SimpleTuner LyCORIS and OneTrainer spellings baked into bf16/f32, plain fp8 and scaled fp8
//! checkpoints with Flux block weights, checked against an f64 reference written here;
//! extraction, merging and `inspect` of Flux LoRAs; refusals across families.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::convert;
use mergesmith::dtype::DType;
use mergesmith::lora::bake::{self, Application};
use mergesmith::lora::names::Targets;
use mergesmith::lora::LoraFile;

const H: usize = 4;

/// The weights of a tiny BFL Flux transformer: (key, shape). `h` = 4, MLP ratio 4.
fn flux_keys() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("double_blocks.0.img_attn.qkv.weight", vec![3 * H, H]),
        ("double_blocks.0.txt_attn.qkv.weight", vec![3 * H, H]),
        ("double_blocks.0.img_mod.lin.weight", vec![6 * H, H]),
        ("double_blocks.1.img_attn.proj.weight", vec![H, H]),
        ("single_blocks.0.linear1.weight", vec![7 * H, H]),
        ("single_blocks.0.linear2.weight", vec![H, 5 * H]),
        ("final_layer.adaLN_modulation.1.weight", vec![2 * H, H]),
        ("final_layer.linear.weight", vec![2 * H, H]),
    ]
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 2000;
            x as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn write(path: &Path, tensors: &[(String, DType, Vec<usize>, Vec<u8>)]) -> PathBuf {
    let specs = tensors
        .iter()
        .map(|(n, d, s, _)| TensorSpec {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let w = SafetensorsWriter::create(path, specs, &BTreeMap::new(), true).unwrap();
    for (n, _, _, b) in tensors {
        w.write(n, b).unwrap();
    }
    w.finish().unwrap();
    path.to_path_buf()
}

fn f32_tensor(name: &str, shape: Vec<usize>, v: &[f32]) -> (String, DType, Vec<usize>, Vec<u8>) {
    (name.to_string(), DType::F32, shape, f32_bytes(v))
}

/// How the base model stores its weights.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Storage {
    F32,
    Fp8,
    /// fp8 times a per-weight scale (ComfyUI's scaled fp8).
    ScaledFp8,
}

/// Writes the tiny Flux model; returns each weight's exact (dequantized) values.
fn flux_model(path: &Path, storage: Storage) -> Weights {
    let mut tensors = Vec::new();
    let mut exact = BTreeMap::new();
    for (i, (key, shape)) in flux_keys().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let v = values(n, i as u32 + 1);
        match storage {
            Storage::F32 => {
                exact.insert(key.to_string(), v.iter().map(|x| *x as f64).collect());
                tensors.push(f32_tensor(key, shape, &v));
            }
            Storage::Fp8 | Storage::ScaledFp8 => {
                let bytes = convert::from_f32(&v, DType::F8E4M3).unwrap();
                let scale = if storage == Storage::ScaledFp8 {
                    0.01 * (i + 1) as f32
                } else {
                    1.0
                };
                let stored = convert::to_f32(DType::F8E4M3, &bytes).unwrap();
                exact.insert(
                    key.to_string(),
                    stored.iter().map(|x| (x * scale) as f64).collect(),
                );
                tensors.push((key.to_string(), DType::F8E4M3, shape, bytes));
                if storage == Storage::ScaledFp8 {
                    let layer = key.strip_suffix(".weight").unwrap();
                    tensors.push(f32_tensor(
                        &format!("{layer}.scale_weight"),
                        vec![],
                        &[scale],
                    ));
                }
            }
        }
    }
    // A norm scale no LoRA touches, and the scaled-fp8 marker.
    tensors.push(f32_tensor(
        "double_blocks.0.img_attn.norm.key_norm.scale",
        vec![2],
        &[1.0, 0.5],
    ));
    if storage == Storage::ScaledFp8 {
        tensors.push(("scaled_fp8".into(), DType::F8E4M3, vec![0], vec![]));
    }
    write(path, &tensors);
    exact
}

/// One LoRA module: name, up `[out, r]`, down `[r, in]`, alpha (none: scale 1).
struct Lr {
    name: &'static str,
    out: usize,
    inp: usize,
    alpha: Option<f32>,
    peft: bool,
    seed: u32,
}

const R: usize = 2;

/// A module, the weight it changes, the rows it covers, whether its halves are swapped.
type Placed = (Lr, &'static str, (usize, usize), bool);

/// Weight key -> values.
type Weights = BTreeMap<String, Vec<f64>>;

impl Lr {
    fn up(&self) -> Vec<f32> {
        values(self.out * R, self.seed)
    }
    fn down(&self) -> Vec<f32> {
        values(R * self.inp, self.seed + 100)
    }
    fn scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a as f64 / R as f64)
    }
    /// ΔW = scale · up · down in f64.
    fn delta(&self) -> Vec<f64> {
        let (u, d) = (self.up(), self.down());
        let mut out = vec![0f64; self.out * self.inp];
        for i in 0..self.out {
            for j in 0..self.inp {
                out[i * self.inp + j] = (0..R)
                    .map(|k| u[i * R + k] as f64 * d[k * self.inp + j] as f64)
                    .sum::<f64>()
                    * self.scale();
            }
        }
        out
    }
    fn tensors(&self) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
        let (up, down) = match self.peft {
            true => ("lora_B.weight", "lora_A.weight"),
            false => ("lora_up.weight", "lora_down.weight"),
        };
        let mut t = vec![
            f32_tensor(
                &format!("{}.{up}", self.name),
                vec![self.out, R],
                &self.up(),
            ),
            f32_tensor(
                &format!("{}.{down}", self.name),
                vec![R, self.inp],
                &self.down(),
            ),
        ];
        if let Some(a) = self.alpha {
            t.push(f32_tensor(&format!("{}.alpha", self.name), vec![], &[a]));
        }
        t
    }
}

/// AI-Toolkit / diffusers PEFT names: q/k/v and the MLP input are row slices of fused
/// weights; `norm_out.linear` stores scale and shift in the other order.
fn peft_modules() -> Vec<Placed> {
    let m = |name, out, inp, seed| Lr {
        name,
        out,
        inp,
        alpha: None,
        peft: true,
        seed,
    };
    vec![
        (
            m("transformer.transformer_blocks.0.attn.to_k", H, H, 1),
            "double_blocks.0.img_attn.qkv.weight",
            (H, 2 * H),
            false,
        ),
        (
            m("transformer.transformer_blocks.0.attn.add_v_proj", H, H, 2),
            "double_blocks.0.txt_attn.qkv.weight",
            (2 * H, 3 * H),
            false,
        ),
        (
            m(
                "transformer.single_transformer_blocks.0.proj_mlp",
                4 * H,
                H,
                3,
            ),
            "single_blocks.0.linear1.weight",
            (3 * H, 7 * H),
            false,
        ),
        (
            m("transformer.norm_out.linear", 2 * H, H, 4),
            "final_layer.adaLN_modulation.1.weight",
            (0, 2 * H),
            true,
        ),
    ]
}

/// kohya names (with alpha), and OneTrainer's spelling of a diffusers path.
fn kohya_modules() -> Vec<Placed> {
    let m = |name, out, inp, seed| Lr {
        name,
        out,
        inp,
        alpha: Some(1.0),
        peft: false,
        seed,
    };
    vec![
        (
            m("lora_unet_double_blocks_1_img_attn_proj", H, H, 5),
            "double_blocks.1.img_attn.proj.weight",
            (0, H),
            false,
        ),
        (
            m("lora_unet_double_blocks_0_img_mod_lin", 6 * H, H, 6),
            "double_blocks.0.img_mod.lin.weight",
            (0, 6 * H),
            false,
        ),
        (
            m(
                "lora_transformer_single_transformer_blocks_0_attn_to_q",
                H,
                H,
                7,
            ),
            "single_blocks.0.linear1.weight",
            (0, H),
            false,
        ),
    ]
}

fn lora_file(path: &Path, modules: &[Placed]) -> PathBuf {
    let tensors: Vec<_> = modules.iter().flat_map(|(m, ..)| m.tensors()).collect();
    write(path, &tensors)
}

/// SuperMerger's / LBW's 61 Flux blocks: CLIP, T5, IN, D00-D18, S00-S37, OUT.
fn flux_blocks(set: &[(&str, f64)]) -> String {
    let mut names = vec!["CLIP".to_string(), "T5".into(), "IN".into()];
    names.extend((0..19).map(|i| format!("D{i:02}")));
    names.extend((0..38).map(|i| format!("S{i:02}")));
    names.push("OUT".into());
    names
        .iter()
        .map(|n| {
            set.iter()
                .find(|(b, _)| b == n)
                .map_or(1.0, |(_, w)| *w)
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The f64 reference: `W + Σ strength · block weight · ΔW` on each module's rows.
fn expected(
    base: &Weights,
    files: &[(&[Placed], f64)],
    block_weight: impl Fn(&str) -> f64,
) -> Weights {
    let mut out = base.clone();
    for (modules, strength) in files {
        for (m, key, (lo, hi), swap) in modules.iter() {
            let w = out.get_mut(*key).unwrap();
            let cols = m.inp;
            let mut d = m.delta();
            if *swap {
                let half = d.len() / 2;
                d.rotate_left(half);
            }
            let k = strength * block_weight(key);
            for (i, dv) in d.iter().enumerate() {
                w[lo * cols + i] += k * dv;
            }
            assert_eq!(d.len(), (hi - lo) * cols);
        }
    }
    out
}

fn bake_into(dir: &Path, storage: Storage) -> (Weights, Weights, PathBuf) {
    let model = dir.join(format!("flux-{storage:?}.safetensors"));
    let base = flux_model(&model, storage);
    let (peft, kohya) = (peft_modules(), kohya_modules());
    let lp = lora_file(&dir.join("peft.safetensors"), &peft);
    let lk = lora_file(&dir.join("kohya.safetensors"), &kohya);
    let flux = Family::builtin("flux");
    let blocks = flux_blocks(&[("D01", 0.25), ("S00", 0.5)]);
    let apps = [
        Application::new(LoraFile::open(&lp).unwrap(), 0.8, None, Some(flux), 0.0).unwrap(),
        Application::new(
            LoraFile::open(&lk).unwrap(),
            -1.5,
            Some(&blocks),
            Some(flux),
            0.0,
        )
        .unwrap(),
    ];
    let out = dir.join(format!("baked-{storage:?}.safetensors"));
    let plan = bake::bake_file(&model, &apps, &out, &BTreeMap::new(), false, false, false).unwrap();
    assert_eq!(plan.applied, 7);
    assert!(plan.unmatched.is_empty());
    // The second file's block weights: D01 = 0.25, S00 = 0.5, everything else 1.
    let bw = |key: &str| {
        if key.starts_with("double_blocks.1.") {
            0.25
        } else if key.starts_with("single_blocks.0.") {
            0.5
        } else {
            1.0
        }
    };
    let first = expected(&base, &[(&peft, 0.8)], |_| 1.0);
    let want = expected(&first, &[(&kohya, -1.5)], bw);
    (base, want, out)
}

fn read(ck: &Checkpoint, key: &str) -> Vec<f64> {
    let t = ck.get(key).unwrap();
    let mut v = convert::to_f32(t.dtype, &ck.data(t)).unwrap();
    let layer = key.strip_suffix(".weight").unwrap_or(key);
    if let Some(s) = ck.get(&format!("{layer}.scale_weight")) {
        let s = convert::to_f32(s.dtype, &ck.data(s)).unwrap()[0];
        v.iter_mut().for_each(|x| *x *= s);
    }
    v.into_iter().map(|x| x as f64).collect()
}

#[test]
fn every_spelling_bakes_into_flux_with_block_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (base, want, out) = bake_into(dir.path(), Storage::F32);
    let ck = Checkpoint::open(&out).unwrap();
    for (key, w) in &want {
        let got = read(&ck, key);
        for (i, (g, e)) in got.iter().zip(w).enumerate() {
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                "{key}[{i}]: {g} vs {e}"
            );
        }
        // Every weight but two is touched by some module here.
        let untouched = [
            "final_layer.linear.weight",
            "single_blocks.0.linear2.weight",
        ];
        assert_eq!(&base[key] == w, untouched.contains(&key.as_str()), "{key}");
    }
    // Rows of a fused weight outside the module's slice are untouched, bit for bit.
    let qkv = read(&ck, "double_blocks.0.img_attn.qkv.weight");
    assert_eq!(
        &qkv[..H * H],
        &base["double_blocks.0.img_attn.qkv.weight"][..H * H]
    );
    assert_eq!(
        read(&ck, "double_blocks.0.img_attn.norm.key_norm.scale"),
        vec![1.0, 0.5]
    );
}

/// Half the spacing of E4M3 values around `v` (normal: 3 mantissa bits; subnormal: 2^-9).
fn e4m3_half_ulp(v: f64) -> f64 {
    let e = v.abs().max(2f64.powi(-6)).log2().floor() as i32;
    2f64.powi(e - 4)
}

#[test]
fn fp8_and_scaled_fp8_flux_models_are_dequantized_changed_and_requantized() {
    let dir = tempfile::tempdir().unwrap();
    for storage in [Storage::Fp8, Storage::ScaledFp8] {
        let (base, want, out) = bake_into(dir.path(), storage);
        let ck = Checkpoint::open(&out).unwrap();
        for (key, w) in &want {
            let t = ck.get(key).unwrap();
            assert_eq!(t.dtype, DType::F8E4M3, "{key} stays fp8");
            if &base[key] == w {
                // Untouched: the same bytes and (scaled) the same scale.
                assert_eq!(&read(&ck, key), w, "{key}");
                continue;
            }
            let scale = if storage == Storage::ScaledFp8 {
                // A fresh scale: the largest magnitude maps to E4M3's largest value, 448.
                let amax = w.iter().fold(0f64, |m, x| m.max(x.abs()));
                let layer = key.strip_suffix(".weight").unwrap();
                let s = read(&ck, &format!("{layer}.scale_weight"))[0];
                assert!((s - amax / 448.0).abs() <= 1e-6 * s, "{key}: scale {s}");
                s
            } else {
                1.0
            };
            for (i, (g, e)) in read(&ck, key).iter().zip(w).enumerate() {
                let tol = e4m3_half_ulp(e / scale) * scale * (1.0 + 1e-4) + 1e-9;
                assert!((g - e).abs() <= tol, "{storage:?} {key}[{i}]: {g} vs {e}");
            }
        }
        if storage == Storage::ScaledFp8 {
            assert!(ck.get("scaled_fp8").is_some(), "the marker is kept");
        }
    }
}

#[test]
fn lycoris_modules_resolve_to_flux_row_slices() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("flux.safetensors");
    let base = flux_model(&model, Storage::F32);
    // SimpleTuner's LyCORIS LoHa on the single block's `to_v` (rows 2h..3h of linear1), and a
    // LoKr with full factors on kohya's `linear2`.
    let (w1a, w1b, w2a, w2b) = (
        values(H * R, 11),
        values(R * H, 12),
        values(H * R, 13),
        values(R * H, 14),
    );
    let (k1, k2) = (values(4, 15), values(2 * 10, 16));
    let lora = write(
        &dir.path().join("lyco.safetensors"),
        &[
            f32_tensor(
                "lycoris_single_transformer_blocks_0_attn_to_v.hada_w1_a",
                vec![H, R],
                &w1a,
            ),
            f32_tensor(
                "lycoris_single_transformer_blocks_0_attn_to_v.hada_w1_b",
                vec![R, H],
                &w1b,
            ),
            f32_tensor(
                "lycoris_single_transformer_blocks_0_attn_to_v.hada_w2_a",
                vec![H, R],
                &w2a,
            ),
            f32_tensor(
                "lycoris_single_transformer_blocks_0_attn_to_v.hada_w2_b",
                vec![R, H],
                &w2b,
            ),
            f32_tensor(
                "lycoris_single_transformer_blocks_0_attn_to_v.alpha",
                vec![],
                &[R as f32],
            ),
            f32_tensor("lora_unet_single_blocks_0_linear2.lokr_w1", vec![2, 2], &k1),
            f32_tensor(
                "lora_unet_single_blocks_0_linear2.lokr_w2",
                vec![2, 10],
                &k2,
            ),
        ],
    );
    let file = LoraFile::open(&lora).unwrap();
    assert_eq!(file.family(), Some(Family::builtin("flux")));
    let app = Application::new(file, 1.0, None, None, 0.0).unwrap();
    let out = dir.path().join("out.safetensors");
    bake::bake_file(&model, &[app], &out, &BTreeMap::new(), false, false, false).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let mm = |a: &[f32], b: &[f32], i: usize, j: usize| -> f64 {
        (0..R)
            .map(|k| a[i * R + k] as f64 * b[k * H + j] as f64)
            .sum()
    };
    let l1 = read(&ck, "single_blocks.0.linear1.weight");
    let b1 = &base["single_blocks.0.linear1.weight"];
    for i in 0..H {
        for j in 0..H {
            // LoHa: (w1a·w1b) ⊙ (w2a·w2b), alpha = rank: scale 1.
            let d = mm(&w1a, &w1b, i, j) * mm(&w2a, &w2b, i, j);
            let at = (2 * H + i) * H + j;
            assert!((l1[at] - b1[at] - d).abs() < 1e-5, "to_v[{i}][{j}]");
        }
    }
    assert_eq!(&l1[..2 * H * H], &b1[..2 * H * H], "q and k rows untouched");
    let l2 = read(&ck, "single_blocks.0.linear2.weight");
    let b2 = &base["single_blocks.0.linear2.weight"];
    for i in 0..H {
        for j in 0..5 * H {
            // Kronecker product: w1[i / 2][j / 10] · w2[i % 2][j % 10].
            let d = k1[(i / 2) * 2 + j / 10] as f64 * k2[(i % 2) * 10 + j % 10] as f64;
            let at = i * 5 * H + j;
            assert!((l2[at] - b2[at] - d).abs() < 1e-5, "linear2[{i}][{j}]");
        }
    }
}

#[test]
fn every_spelling_resolves_on_every_flux_layout() {
    let dir = tempfile::tempdir().unwrap();
    let flux = Family::builtin("flux");
    // ComfyUI all-in-one (with CLIP-L and T5) from the reference table, and BFL.
    let comfy = synth(dir.path(), "comfy.safetensors", &tiny(flux, 1));
    let mut o = tiny(flux, 1);
    o.layout = Some("bfl".into());
    let bfl = synth(dir.path(), "bfl.safetensors", &o);
    for (path, prefix) in [(&comfy, "model.diffusion_model."), (&bfl, "")] {
        let ck = Checkpoint::open(path).unwrap();
        let t = Targets::of(&ck);
        let qkv = format!("{prefix}double_blocks.3.img_attn.qkv.weight");
        let linear1 = format!("{prefix}single_blocks.7.linear1.weight");
        let rows = |k: &str| ck.get(k).unwrap().shape[1];
        let h = rows(&qkv);
        for (module, key, r) in [
            ("lora_unet_double_blocks_3_img_attn_qkv", &qkv, None),
            ("diffusion_model.double_blocks.3.img_attn.qkv", &qkv, None),
            ("double_blocks.3.img_attn.qkv", &qkv, None),
            (
                "transformer.transformer_blocks.3.attn.to_q",
                &qkv,
                Some((0, h)),
            ),
            (
                "lycoris_transformer_blocks_3_attn_to_v",
                &qkv,
                Some((2 * h, 3 * h)),
            ),
            (
                "transformer.single_transformer_blocks.7.attn.to_k",
                &linear1,
                Some((h, 2 * h)),
            ),
            (
                "lora_transformer_single_transformer_blocks_7_proj_mlp",
                &linear1,
                Some((3 * h, 7 * h)),
            ),
        ] {
            let got = t
                .get(module)
                .unwrap_or_else(|| panic!("{module} in {path:?}"));
            assert_eq!((&got.key, got.rows), (key, r), "{module}");
        }
    }
    // The text encoders of the all-in-one file: kohya's `lora_te1_` for CLIP-L, `lora_te3_`
    // (kohya / OneTrainer SD3) and `lora_te2_` (OneTrainer Flux) for T5.
    let t = Targets::of(&Checkpoint::open(&comfy).unwrap());
    assert_eq!(
        t.get("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
            .unwrap()
            .key,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    );
    for m in [
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
    ] {
        assert_eq!(
            t.get(m).unwrap().key,
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
        );
    }
    assert!(t.get("lora_unet_vae_encoder_conv_in").is_none());
}

#[test]
fn flux_loras_are_extracted_merged_and_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flux = Family::builtin("flux");
    let mut o = tiny(flux, 1);
    o.dtype = mergesmith::dtype::FloatType::Fp32;
    let base = synth(d, "base.safetensors", &o);
    let lora = d.join("l.safetensors");
    mergesmith::lora::synth::synthesize(&base, 4, 0, 3, &lora, false).unwrap();
    let tuned = d.join("tuned.safetensors");
    let app = Application::new(LoraFile::open(&lora).unwrap(), 1.0, None, None, 0.0).unwrap();
    bake::bake_file(&base, &[app], &tuned, &BTreeMap::new(), false, false, false).unwrap();

    // Extraction at the LoRA's rank recovers ΔW (f32 weights: only rounding noise left).
    let opts = mergesmith::lora::extract::ExtractOptions {
        rank: 4,
        clamp_quantile: 1.0,
        min_diff: 0.0,
        ..Default::default()
    };
    let ex = d.join("ex.safetensors");
    let report =
        mergesmith::lora::extract::extract(&tuned, &base, &opts, &ex, false, false).unwrap();
    assert!(report.relative_error < 1e-4, "{report:?}");
    assert!(report.text_encoder);
    let ef = LoraFile::open(&ex).unwrap();
    assert_eq!(ef.family(), Some(flux));
    let md = ef.ck.metadata();
    assert_eq!(md["ss_base_model_version"], "flux1");
    assert_eq!(md["ss_network_module"], "networks.lora_flux");
    assert_eq!(md["modelspec.architecture"], "flux-1-dev/lora");
    let names: Vec<&str> = ef.modules.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"lora_unet_double_blocks_0_img_attn_qkv"));
    assert!(names.contains(&"lora_unet_single_blocks_37_linear2"));
    assert!(names.contains(&"lora_te1_text_model_encoder_layers_0_self_attn_q_proj"));
    assert!(!names
        .iter()
        .any(|n| n.contains("t5") || n.contains("encoder_block")));

    // The summary names Flux and its blocks.
    let s = ef.summary();
    assert_eq!(s.architecture, "Flux.1");
    assert_eq!(s.blocks["D00"], 10, "{:?}", s.blocks);
    assert_eq!(s.blocks["S37"], 3);
    assert_eq!(s.blocks["CLIP"], 72);

    // Merging the synthetic LoRA with its extraction by concatenation is exact: baking the
    // merge at 0.5 + 0.5 equals baking the original.
    let merged = d.join("merged.safetensors");
    let sources = [
        Application::new(LoraFile::open(&lora).unwrap(), 0.5, None, None, 0.0).unwrap(),
        Application::new(LoraFile::open(&ex).unwrap(), 0.5, None, None, 0.0).unwrap(),
    ];
    let mo = mergesmith::lora::merge::MergeOptions {
        mode: mergesmith::lora::merge::MergeMode::Concat,
        rank: 8,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    mergesmith::lora::merge::merge(&sources, &mo, &merged, false).unwrap();
    let again = d.join("again.safetensors");
    let app = Application::new(LoraFile::open(&merged).unwrap(), 1.0, None, None, 0.0).unwrap();
    bake::bake_file(&base, &[app], &again, &BTreeMap::new(), false, false, false).unwrap();
    let (a, b) = (
        Checkpoint::open(&tuned).unwrap(),
        Checkpoint::open(&again).unwrap(),
    );
    for t in a.tensors() {
        let (x, y) = (read(&a, &t.name), read(&b, &t.name));
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0), "{}", t.name);
        }
    }
}

#[test]
fn loras_of_another_family_and_bad_block_vectors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flux_model_path = d.join("flux.safetensors");
    flux_model(&flux_model_path, Storage::F32);
    let sd1 = synth(d, "sd1.safetensors", &tiny(Family::builtin("sd1"), 1));
    let sd_lora = d.join("sd.safetensors");
    mergesmith::lora::synth::synthesize(&sd1, 2, 0, 1, &sd_lora, false).unwrap();
    let flux_lora = lora_file(&d.join("k.safetensors"), &kohya_modules());
    let try_bake = |model: &Path, lora: &Path| {
        let app = Application::new(LoraFile::open(lora).unwrap(), 1.0, None, None, 0.0).unwrap();
        let ck = Checkpoint::open(model).unwrap();
        bake::plan(&ck, &[app], false).unwrap_err().to_string()
    };
    let e = try_bake(&flux_model_path, &sd_lora);
    assert!(
        e.contains("is a LoRA for SD1.x/SD2.x, the checkpoint is Flux.1"),
        "{e}"
    );
    let e = try_bake(&sd1, &flux_lora);
    assert!(
        e.contains("is a LoRA for Flux.1, the checkpoint is SD1"),
        "{e}"
    );
    let e = Application::new(
        LoraFile::open(&flux_lora).unwrap(),
        1.0,
        Some("1,0,1"),
        Some(Family::builtin("flux")),
        0.0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("3 values; Flux.1 takes 61 (supermerger) or 63 (comfyui)"),
        "{e}"
    );
    // ComfyUI's 63 prefixes work too: `double_blocks.1.` is slot 6 of img_in, time_in,
    // guidance_in, vector_in, txt_in, double_blocks.0., ...
    let mut v = vec!["1"; 63];
    v[6] = "0";
    let app = Application::new(
        LoraFile::open(&flux_lora).unwrap(),
        1.0,
        Some(&v.join(",")),
        Some(Family::builtin("flux")),
        0.0,
    )
    .unwrap();
    let ck = Checkpoint::open(&flux_model_path).unwrap();
    let plan = bake::plan(&ck, &[app], false).unwrap();
    assert!(!plan
        .changes
        .contains_key("double_blocks.1.img_attn.proj.weight"));
    assert!(plan
        .changes
        .contains_key("double_blocks.0.img_mod.lin.weight"));
}

#[test]
fn the_cli_bakes_a_flux_lora_with_a_block_vector() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("flux.safetensors");
    let base = flux_model(&model, Storage::F32);
    let lora = lora_file(&d.join("k.safetensors"), &kohya_modules());
    let out = d.join("out.safetensors");
    let spec = format!(
        "{}:2:{}",
        lora.display(),
        flux_blocks(&[("D00", 0.0), ("S00", 0.0)])
    );
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .args(["lora", "apply", "-m"])
        .arg(&model)
        .args(["-l", &spec, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ck = Checkpoint::open(&out).unwrap();
    // D00 and S00 at 0: only `double_blocks.1.img_attn.proj` changes, by 2 · ΔW.
    for (key, w) in &base {
        let got = read(&ck, key);
        if key != "double_blocks.1.img_attn.proj.weight" {
            assert_eq!(&got, w, "{key}");
        }
    }
    let want = expected(&base, &[(&kohya_modules()[..1], 2.0)], |_| 1.0);
    let key = "double_blocks.1.img_attn.proj.weight";
    for (g, e) in read(&ck, key).iter().zip(&want[key]) {
        assert!((g - e).abs() < 1e-5);
    }
}

#[test]
fn loras_whose_names_do_not_state_flux_merge_by_what_they_resolve_to() {
    // SimpleTuner's `lycoris_transformer_blocks_0_attn_to_k` and a bare diffusers
    // `transformer_blocks.0.attn.to_k` name no family by their prefixes; the Flux reference
    // layout resolves both to rows h..2h of `img_attn.qkv`, so concat merges them into one
    // module, exactly: the merged LoRA bakes like the two together.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("flux.safetensors");
    flux_model(&model, Storage::F32);
    let m = |seed, name| Lr {
        name,
        out: H,
        inp: H,
        alpha: Some(1.0),
        peft: false,
        seed,
    };
    let (l1, l2) = (
        lora_file(
            &d.join("1.safetensors"),
            &[(
                m(41, "lycoris_transformer_blocks_0_attn_to_k"),
                "",
                (0, 0),
                false,
            )],
        ),
        lora_file(
            &d.join("2.safetensors"),
            &[(m(42, "transformer_blocks.0.attn.to_k"), "", (0, 0), false)],
        ),
    );
    assert_eq!(LoraFile::open(&l1).unwrap().family(), None);
    assert_eq!(LoraFile::open(&l2).unwrap().family(), None);
    let app =
        |p: &Path, s| Application::new(LoraFile::open(p).unwrap(), s, None, None, 0.0).unwrap();
    let merged = d.join("merged.safetensors");
    let mo = mergesmith::lora::merge::MergeOptions {
        mode: mergesmith::lora::merge::MergeMode::Concat,
        rank: 4,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    mergesmith::lora::merge::merge(&[app(&l1, 0.5), app(&l2, -1.0)], &mo, &merged, false).unwrap();
    let mf = LoraFile::open(&merged).unwrap();
    assert_eq!(mf.modules.len(), 1, "one module: both change the same rows");
    let (x, y) = (d.join("x.safetensors"), d.join("y.safetensors"));
    bake::bake_file(
        &model,
        &[app(&l1, 0.5), app(&l2, -1.0)],
        &x,
        &BTreeMap::new(),
        false,
        false,
        false,
    )
    .unwrap();
    bake::bake_file(
        &model,
        &[app(&merged, 1.0)],
        &y,
        &BTreeMap::new(),
        false,
        false,
        false,
    )
    .unwrap();
    let (cx, cy) = (Checkpoint::open(&x).unwrap(), Checkpoint::open(&y).unwrap());
    let key = "double_blocks.0.img_attn.qkv.weight";
    for (p, q) in read(&cx, key).iter().zip(read(&cy, key)) {
        assert!((p - q).abs() < 1e-5);
    }
}

#[test]
fn sd3_loras_resolve_and_bake_through_the_same_declarations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sd3 = Family::builtin("sd3");
    let mut o = tiny(sd3, 1);
    o.dtype = mergesmith::dtype::FloatType::Fp32;
    let model = synth(d, "sd3.safetensors", &o);
    let ck = Checkpoint::open(&model).unwrap();
    let t = Targets::of(&ck);
    let p = "model.diffusion_model.joint_blocks.";
    let w = ck
        .get(&format!("{p}0.x_block.attn.qkv.weight"))
        .unwrap()
        .shape[1];
    for (module, key, rows, swap) in [
        (
            "lora_unet_joint_blocks_0_x_block_attn_qkv",
            "0.x_block.attn.qkv",
            None,
            false,
        ),
        (
            "transformer.transformer_blocks.0.attn.add_k_proj",
            "0.context_block.attn.qkv",
            Some((w, 2 * w)),
            false,
        ),
        (
            "transformer.transformer_blocks.5.norm1_context.linear",
            "5.context_block.adaLN_modulation.1",
            None,
            false,
        ),
        // The last block's context modulation has 2 chunks: diffusers stores them swapped.
        (
            "transformer.transformer_blocks.23.norm1_context.linear",
            "23.context_block.adaLN_modulation.1",
            None,
            true,
        ),
    ] {
        let got = t.get(module).unwrap_or_else(|| panic!("{module}"));
        assert_eq!(
            (got.key.as_str(), got.rows, got.swap_halves),
            (format!("{p}{key}.weight").as_str(), rows, swap),
            "{module}"
        );
    }
    assert_eq!(
        t.get("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
            .unwrap()
            .key,
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    );
    // Baking the swapped module: W + ΔW with ΔW's halves exchanged, against f64.
    let key = format!("{p}23.context_block.adaLN_modulation.1.weight");
    let shape = ck.get(&key).unwrap().shape.clone();
    assert_eq!(shape, vec![2 * w, w]);
    let m = Lr {
        name: "transformer.transformer_blocks.23.norm1_context.linear",
        out: 2 * w,
        inp: w,
        alpha: None,
        peft: true,
        seed: 61,
    };
    let mut want = read(&ck, &key);
    let mut dlt = m.delta();
    let half = dlt.len() / 2;
    dlt.rotate_left(half);
    want.iter_mut().zip(&dlt).for_each(|(x, dv)| *x += 0.5 * dv);
    let lora = lora_file(&d.join("l.safetensors"), &[(m, "", (0, 0), true)]);
    // Diffusers names are Flux's and SD3's alike: the family is the one whose layout has
    // the weight (Flux has 19 double blocks, no block 23).
    let lf = LoraFile::open(&lora).unwrap();
    assert_eq!((lf.family(), lf.family_or_resolved()), (None, Some(sd3)));
    assert_eq!(lf.summary().architecture, "SD3");
    assert_eq!(lf.summary().blocks["joint_blocks.23."], 1);
    let out = d.join("out.safetensors");
    let app = Application::new(LoraFile::open(&lora).unwrap(), 0.5, None, None, 0.0).unwrap();
    bake::bake_file(&model, &[app], &out, &BTreeMap::new(), false, false, false).unwrap();
    let got = read(&Checkpoint::open(&out).unwrap(), &key);
    for (g, e) in got.iter().zip(&want) {
        assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0));
    }
}

#[test]
fn a_recipe_lora_node_on_scaled_fp8_rewrites_each_changed_weight_with_its_scale() {
    use mergesmith::build::{self, BuildOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    let model = d.join("models/flux.safetensors");
    flux_model(&model, Storage::ScaledFp8);
    let lora = lora_file(&d.join("models/style.safetensors"), &kohya_modules());
    // The LoRA goes onto a stored merge result, whose untouched tensors the node refers to.
    let nodes = "  merged:\n    merge: weight_sum\n    a: flux\n    b: flux\n    alpha: 0.5\n  styled:\n    lora: merged\n    apply:\n      - { file: style, strength: -1.5 }\n  out:\n    save: styled\n    to: out/styled.safetensors\n";
    let path = d.join("recipe.yaml");
    std::fs::write(&path, recipe_yaml("models/", &["flux", "style"], nodes)).unwrap();
    let cache = mergesmith::store::Cache::new(&d.join("cache"));
    let recipe = mergesmith::recipe::load(&path).unwrap();
    build::build(&recipe, &cache, &[], &BuildOptions::default()).unwrap();
    // The same bytes as the CLI's merge then bake, scales included (not the input's old ones).
    let merged = d.join("merged.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .args(["merge", "--alpha", "0.5", "-a"])
        .arg(&model)
        .arg("-b")
        .arg(&model)
        .arg("-o")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let direct = d.join("direct.safetensors");
    let app = Application::new(LoraFile::open(&lora).unwrap(), -1.5, None, None, 0.0).unwrap();
    bake::bake_file(
        &merged,
        &[app],
        &direct,
        &BTreeMap::new(),
        false,
        false,
        false,
    )
    .unwrap();
    let (a, b, base) = (
        Checkpoint::open(d.join("out/styled.safetensors")).unwrap(),
        Checkpoint::open(&direct).unwrap(),
        Checkpoint::open(&merged).unwrap(),
    );
    let bytes = |ck: &Checkpoint, n: &str| ck.data(ck.get(n).unwrap()).to_vec();
    for t in b.tensors() {
        assert_eq!(bytes(&a, &t.name), bytes(&b, &t.name), "{}", t.name);
    }
    let scale = "double_blocks.1.img_attn.proj.scale_weight";
    assert_ne!(
        bytes(&a, scale),
        bytes(&base, scale),
        "a changed weight gets a fresh scale"
    );
}
