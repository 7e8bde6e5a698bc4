//! Synthetic kohya-format LoRAs for a checkpoint: every module sd-scripts targets by default
//! (transformer linears, `proj_in`/`proj_out`, text-encoder attention and MLP; LoCon convs
//! with `conv_rank`), named as sd-scripts names them (SD1/SD2: diffusers paths, SDXL: LDM
//! paths; families whose LoRA names are data: their declared targets under their first
//! spelling, e.g. Flux's `lora_unet_double_blocks_0_img_attn_qkv`), filled with seeded
//! normal values. For tests and benchmarks.

use std::collections::BTreeMap;
use std::path::Path;

use crate::arch;
use crate::arch::family::LoraDef;
use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::lora::names::{declared_module, fill, ldm_to_diffusers};
use crate::lora::{Factored, KohyaLora};

const DOMAIN: &str = "mergesmith synth-lora v1";

/// Whether an LDM U-Net module path is a default LoRA target (or, with `conv`, a LoCon one).
fn unet_target(p: &str, conv: bool) -> bool {
    let linear = p.contains("transformer_blocks")
        && ["attn1.to_", "attn2.to_", "ff.net.0.proj", "ff.net.2"]
            .iter()
            .any(|t| p.contains(t))
        || p.ends_with("proj_in")
        || p.ends_with("proj_out");
    let locon = [
        "in_layers.2",
        "out_layers.3",
        "emb_layers.1",
        "skip_connection",
        ".op",
        ".conv",
    ]
    .iter()
    .any(|t| p.ends_with(t))
        && (p.starts_with("input_blocks.")
            || p.starts_with("middle_block.")
            || p.starts_with("output_blocks."));
    linear || conv && locon
}

/// (module name, target shape) of every default target of a family whose LoRA names are
/// data: the declared `targets` of the diffusion model and of each text encoder, named with
/// the first spelling (kohya's).
fn declared_modules(
    ck: &Checkpoint,
    arch: &arch::Arch,
    def: &LoraDef,
) -> Vec<(String, Vec<usize>)> {
    ck.tensors()
        .iter()
        .filter_map(|t| {
            let m = declared_module(t, arch.family, arch.layout, def)?;
            let targeted = m.targets.iter().any(|x| m.path.starts_with(x.as_str()));
            let name = m.names.first().filter(|_| targeted)?;
            Some((fill(name, m.path, m.var), t.shape.clone()))
        })
        .collect()
}

/// (kohya module name, target shape) of every default target of `ck`.
pub fn modules_of(ck: &Checkpoint, conv: bool) -> Vec<(String, Vec<usize>)> {
    let arch = arch::detect(ck.tensors());
    if let Some(def) = arch.family.lora() {
        return declared_modules(ck, &arch, def);
    }
    let family = arch.family;
    let xl = family.xl_lora();
    let mut out = Vec::new();
    for t in ck.tensors() {
        if let Some(p) = t
            .name
            .strip_prefix("model.diffusion_model.")
            .and_then(|p| p.strip_suffix(".weight"))
        {
            if (t.shape.len() == 2 || t.shape.len() == 4) && unet_target(p, conv) {
                let path = if xl {
                    Some(p.to_string())
                } else {
                    ldm_to_diffusers(p)
                };
                if let Some(path) = path {
                    out.push((
                        format!("lora_unet_{}", path.replace('.', "_")),
                        t.shape.clone(),
                    ));
                }
            }
            continue;
        }
        for (part, name, src) in crate::arch::names::map_key(&t.name, &t.shape) {
            if let Some((module, kohya, _)) = crate::lora::names::te_module(&t.name, part, &name) {
                let mut shape = t.shape.clone();
                if let Some((a, b)) = src.rows {
                    shape[0] = b - a;
                }
                out.push((format!("{}{}", kohya[0], module.replace('.', "_")), shape));
            }
        }
    }
    out
}

/// Writes a LoRA for `model` with rank `rank` (LoCon convs too when `conv_rank` > 0),
/// alpha = rank / 2, up and down ~ N(0, 1/rank) in fp16, to `out`. Returns the module count.
pub fn synthesize(
    model: &Path,
    rank: usize,
    conv_rank: usize,
    seed: u64,
    out: &Path,
    overwrite: bool,
) -> Result<usize> {
    if rank == 0 {
        return Err(Error::Invalid("--rank must be at least 1".into()));
    }
    let ck = Checkpoint::open(model)?;
    let normal = |name: &str, n: usize, r: usize| {
        let mut v = vec![0f32; n];
        crate::noise::fill_normal(DOMAIN, seed, name, 0, &mut v);
        let sd = 1.0 / (r as f32).sqrt();
        v.iter_mut().for_each(|x| *x *= sd);
        v
    };
    let mut modules = Vec::new();
    for (name, shape) in modules_of(&ck, conv_rank > 0) {
        let r = crate::lora::svd::rank_for(&shape, rank, Some(conv_rank));
        let rest: usize = shape[1..].iter().product();
        modules.push(Factored {
            up: normal(&format!("{name}.lora_up.weight"), shape[0] * r, r),
            down: normal(&format!("{name}.lora_down.weight"), r * rest, r),
            alpha: r as f32 / 2.0,
            rank: r,
            name,
            shape,
        });
    }
    let mut md = BTreeMap::new();
    let family = arch::detect(ck.tensors()).family;
    md.insert(
        "ss_network_module".to_string(),
        family
            .facts()
            .ss_network_module
            .clone()
            .unwrap_or_else(|| "networks.lora".to_string()),
    );
    md.insert("ss_network_dim".to_string(), rank.to_string());
    md.insert(
        "ss_network_alpha".to_string(),
        format!("{:.1}", rank as f64 / 2.0),
    );
    let count = modules.len();
    KohyaLora {
        modules,
        metadata: md,
    }
    .write(out, DType::F16, overwrite)?;
    Ok(count)
}
