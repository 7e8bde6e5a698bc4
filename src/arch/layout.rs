//! Reference key layouts of real checkpoints (every key with its dtype and shape).
//!
//! SD1.x, SDXL, Flux.1 (ComfyUI all-in-one) and SD3 Medium (ComfyUI single file) come from
//! the tables in `data/layouts/` (facts gathered from the public model configs). SD2.x is derived from SD1.x: OpenCLIP ViT-H text encoder (1024 wide,
//! 24 layers), 1024-dim cross-attention context and linear `proj_in`/`proj_out`.

use crate::arch::Family;
use crate::dtype::DType;
use crate::error::{Error, Result};

const SD1_TABLE: &str = include_str!("../../data/layouts/sd1-ldm.tsv");
const SDXL_TABLE: &str = include_str!("../../data/layouts/sdxl-sgm.tsv");
const FLUX_TABLE: &str = include_str!("../../data/layouts/flux-comfy.tsv");
const SD3_TABLE: &str = include_str!("../../data/layouts/sd3-medium-comfy.tsv");

/// One tensor of a reference layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutEntry {
    /// Component label from the table (`diffuser`, `vae`, `clip_l`, `clip_g`, `ema`, ...).
    pub component: String,
    /// Tensor name.
    pub key: String,
    /// Element type in the reference fp32 release.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Legitimately absent from many real files (EMA, schedule buffers, position ids).
    pub optional: bool,
}

fn parse_table(table: &str) -> Vec<LayoutEntry> {
    table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            let dtype = match cols[2] {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                "int64" => DType::I64,
                "int32" => DType::I32,
                other => panic!("layout table: unexpected dtype {other}"),
            };
            let shape = if cols[3].is_empty() {
                vec![]
            } else {
                cols[3]
                    .split('x')
                    .map(|d| d.parse().expect("layout table: bad shape"))
                    .collect()
            };
            LayoutEntry {
                component: cols[0].to_string(),
                key: cols[1].to_string(),
                dtype,
                shape,
                optional: cols[4] == "optional",
            }
        })
        .collect()
}

/// OpenCLIP text-transformer keys as stored in LDM/SGM checkpoints.
pub fn open_clip_keys(
    component: &str,
    prefix: &str,
    width: usize,
    layers: usize,
) -> Vec<LayoutEntry> {
    let e = |key: String, shape: Vec<usize>| LayoutEntry {
        component: component.to_string(),
        key,
        dtype: DType::F32,
        shape,
        optional: false,
    };
    let mut v = vec![
        e(format!("{prefix}positional_embedding"), vec![77, width]),
        e(
            format!("{prefix}token_embedding.weight"),
            vec![49408, width],
        ),
        e(format!("{prefix}ln_final.weight"), vec![width]),
        e(format!("{prefix}ln_final.bias"), vec![width]),
        e(format!("{prefix}text_projection"), vec![width, width]),
        e(format!("{prefix}logit_scale"), vec![]),
    ];
    for n in 0..layers {
        let p = format!("{prefix}transformer.resblocks.{n}.");
        v.extend([
            e(format!("{p}ln_1.weight"), vec![width]),
            e(format!("{p}ln_1.bias"), vec![width]),
            e(format!("{p}attn.in_proj_weight"), vec![3 * width, width]),
            e(format!("{p}attn.in_proj_bias"), vec![3 * width]),
            e(format!("{p}attn.out_proj.weight"), vec![width, width]),
            e(format!("{p}attn.out_proj.bias"), vec![width]),
            e(format!("{p}ln_2.weight"), vec![width]),
            e(format!("{p}ln_2.bias"), vec![width]),
            e(format!("{p}mlp.c_fc.weight"), vec![4 * width, width]),
            e(format!("{p}mlp.c_fc.bias"), vec![4 * width]),
            e(format!("{p}mlp.c_proj.weight"), vec![width, 4 * width]),
            e(format!("{p}mlp.c_proj.bias"), vec![width]),
        ]);
    }
    v
}

fn sd2_from_sd1(sd1: Vec<LayoutEntry>) -> Vec<LayoutEntry> {
    let mut out: Vec<LayoutEntry> = sd1
        .into_iter()
        .filter(|e| e.component != "clip_l" && e.component != "ema")
        .map(|mut e| {
            if e.key.ends_with("attn2.to_k.weight") || e.key.ends_with("attn2.to_v.weight") {
                e.shape[1] = 1024;
            }
            if (e.key.ends_with("proj_in.weight") || e.key.ends_with("proj_out.weight"))
                && e.shape.len() == 4
            {
                e.shape.truncate(2);
            }
            e
        })
        .collect();
    out.extend(open_clip_keys(
        "clip_h",
        "cond_stage_model.model.",
        1024,
        24,
    ));
    out
}

/// Every key of the reference layout of `family` (optional keys included).
pub fn reference(family: Family) -> Result<Vec<LayoutEntry>> {
    match family.code().synth.as_deref() {
        Some("sd1") => Ok(parse_table(SD1_TABLE)),
        Some("sd2") => Ok(sd2_from_sd1(parse_table(SD1_TABLE))),
        Some("sdxl") => Ok(parse_table(SDXL_TABLE)),
        Some("flux") => Ok(parse_table(FLUX_TABLE)),
        Some("sd3") => Ok(parse_table(SD3_TABLE)),
        _ => Err(Error::Invalid(format!(
            "no reference layout for {}",
            family.label()
        ))),
    }
}

/// The keys a typical released file has: everything except EMA copies (unless `ema`) and
/// the v-prediction marker tensors.
pub fn release_keys(family: Family, ema: bool) -> Result<Vec<LayoutEntry>> {
    Ok(reference(family)?
        .into_iter()
        .filter(|e| (ema || e.component != "ema") && !(e.component == "diffuser" && e.optional))
        .collect())
}

/// Shrinks a dimension for `tiny` models: channel-like sizes (multiples of 32, at least 64)
/// are divided by 32; small structural sizes (kernel 3, 4 latent channels, 77 tokens, 1000
/// timesteps) are kept. The map is the same for every tensor, so shapes stay consistent.
pub fn tiny_dim(d: usize) -> usize {
    if d >= 64 && d.is_multiple_of(32) {
        d / 32
    } else {
        d
    }
}

/// Shrinks a dimension of an SD1 / SD2 / SDXL tensor of `component` for `small` models, which
/// must still run: U-Net widths (multiples of 320) / 10; every text encoder 32 wide with a
/// 128-wide MLP, so the U-Net's context becomes 32 (SD1, SD2) or 64 (SDXL: two encoders) and
/// SDXL's added conditioning 32 + 6 × 256 (pooled text, time ids); VAE widths / 4 (128, 256,
/// 512 → 32, 64, 128), so every GroupNorm still has 32 groups. Vocabulary, positions,
/// kernels, latent channels and the time ids' 256-wide embedding are kept.
pub fn small_dim(component: &str, d: usize) -> usize {
    const CLIP: usize = 32;
    match component {
        "diffuser" | "ema" => match d {
            _ if d.is_multiple_of(320) => d / 10,
            768 | 1024 => CLIP,
            2048 => 2 * CLIP,
            2816 => CLIP + 6 * 256,
            _ => d,
        },
        // Width, MLP width and (OpenCLIP) the fused q/k/v projection's 3 × width.
        "clip_l" => match d {
            768 => CLIP,
            3072 => 4 * CLIP,
            _ => d,
        },
        "clip_h" => match d {
            1024 => CLIP,
            4096 => 4 * CLIP,
            3072 => 3 * CLIP,
            _ => d,
        },
        "clip_g" => match d {
            1280 => CLIP,
            5120 => 4 * CLIP,
            3840 => 3 * CLIP,
            _ => d,
        },
        "vae" if matches!(d, 128 | 256 | 512) => d / 4,
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn tables_parse() {
        let sd1 = reference(Family::builtin("sd1")).unwrap();
        assert_eq!(sd1.len(), 1831);
        let sdxl = reference(Family::builtin("sdxl")).unwrap();
        assert_eq!(sdxl.len(), 2531);
        assert_eq!(reference(Family::builtin("flux")).unwrap().len(), 1439);
        assert_eq!(reference(Family::builtin("sd3")).unwrap().len(), 1672);
    }

    #[test]
    fn open_clip_generator_matches_sdxl_table() {
        let table: BTreeSet<(String, Vec<usize>)> = reference(Family::builtin("sdxl"))
            .unwrap()
            .into_iter()
            .filter(|e| e.component == "clip_g")
            .map(|e| (e.key, e.shape))
            .collect();
        let generated: BTreeSet<(String, Vec<usize>)> =
            open_clip_keys("clip_g", "conditioner.embedders.1.model.", 1280, 32)
                .into_iter()
                .map(|e| (e.key, e.shape))
                .collect();
        assert_eq!(table, generated);
    }

    #[test]
    fn sd2_shapes() {
        let sd2 = reference(Family::builtin("sd2")).unwrap();
        let get = |k: &str| sd2.iter().find(|e| e.key == k).unwrap().shape.clone();
        assert_eq!(
            get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
            vec![320, 1024]
        );
        assert_eq!(
            get("model.diffusion_model.input_blocks.1.1.proj_in.weight"),
            vec![320, 320]
        );
        assert!(!sd2
            .iter()
            .any(|e| e.key.starts_with("cond_stage_model.transformer.")));
    }

    #[test]
    fn tiny_dims() {
        assert_eq!(tiny_dim(320), 10);
        assert_eq!(tiny_dim(49408), 1544);
        assert_eq!(tiny_dim(77), 77);
        assert_eq!(tiny_dim(1000), 1000);
        assert_eq!(tiny_dim(3), 3);
    }
}
