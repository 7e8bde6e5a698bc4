//! Diffusers names of single-file checkpoint tensors, per model part (U-Net, VAE, text
//! encoders): what diffusers-layout generation code (candle's Stable Diffusion blocks) loads,
//! and what LoRA files in diffusers / PEFT / kohya spelling name.
//!
//! - U-Net: `model.diffusion_model.*` through [`ldm_to_diffusers`] (SD1, SD2 and SDXL alike).
//! - VAE: `first_stage_model.*`: `down.N.block.M` → `down_blocks.N.resnets.M`, the decoder's
//!   `up.N` → `up_blocks.(3 − N)` (the order is reversed), `mid.attn_1.{q,k,v,proj_out}` →
//!   `mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}` (stored as 1x1 convolutions; the
//!   loader drops the trailing 1x1).
//! - CLIP-L (SD1, SDXL's first encoder): HF names, with `text_model.` added where a file
//!   leaves it out.
//! - OpenCLIP (SD2's encoder, SDXL's second): `resblocks.N` → HF `encoder.layers.N`, the fused
//!   `in_proj_weight` / `in_proj_bias` split into q, k, v row slices, `text_projection`
//!   transposed (OpenCLIP multiplies by it on the right; a linear layer stores its transpose).

use std::collections::BTreeMap;

use crate::checkpoint::Checkpoint;

/// The diffusers name of a ResNet sub-module of the LDM layout.
fn resnet_part(ldm: &str) -> Option<&'static str> {
    Some(match ldm {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "emb_layers.1" => "time_emb_proj",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    })
}

/// The diffusers module path of an LDM/SGM U-Net module path (both without the
/// `model.diffusion_model.` prefix and without `.weight`), or `None` when it has no
/// counterpart. The same rule serves SD1/SD2 (4 levels) and SDXL (3 levels).
pub fn ldm_to_diffusers(p: &str) -> Option<String> {
    let fixed = [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ];
    for (l, d) in fixed {
        if p == l {
            return Some(d.to_string());
        }
    }
    let parts: Vec<&str> = p.splitn(4, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        ["input_blocks", n, "0", rest] => {
            let n = num(n)?.checked_sub(1)?;
            let (i, j) = (n / 3, n % 3);
            if j == 2 {
                (*rest == "op").then(|| format!("down_blocks.{i}.downsamplers.0.conv"))
            } else {
                Some(format!(
                    "down_blocks.{i}.resnets.{j}.{}",
                    resnet_part(rest)?
                ))
            }
        }
        ["input_blocks", n, "1", rest] => {
            let n = num(n)?.checked_sub(1)?;
            Some(format!("down_blocks.{}.attentions.{}.{rest}", n / 3, n % 3))
        }
        ["middle_block", k, rest @ ..] => {
            let rest = rest.join(".");
            match *k {
                "0" | "2" => Some(format!(
                    "mid_block.resnets.{}.{}",
                    num(k)? / 2,
                    resnet_part(&rest)?
                )),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                _ => None,
            }
        }
        ["output_blocks", n, k, rest] => {
            let n = num(n)?;
            let (i, j) = (n / 3, n % 3);
            match (*k, *rest) {
                ("0", r) => Some(format!("up_blocks.{i}.resnets.{j}.{}", resnet_part(r)?)),
                (_, "conv") => Some(format!("up_blocks.{i}.upsamplers.0.conv")),
                ("1", r) => Some(format!("up_blocks.{i}.attentions.{j}.{r}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A model of a generation pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The denoising U-Net.
    Unet,
    /// The autoencoder.
    Vae,
    /// The (first) text encoder: CLIP-L for SD1 and SDXL, OpenCLIP ViT-H for SD2.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

/// Where a diffusers-named tensor comes from in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The checkpoint key.
    pub key: String,
    /// Rows `start..end` of it (q, k or v of a fused projection); `None` for all of it.
    pub rows: Option<(usize, usize)>,
    /// Stored transposed (OpenCLIP's `text_projection`).
    pub transpose: bool,
}

/// One diffusers-named tensor: its part, name and source.
pub type Mapped = (Part, String, Source);

/// Every generation tensor of a checkpoint by part and diffusers name.
#[derive(Debug, Default, Clone)]
pub struct WeightMap {
    map: BTreeMap<(Part, String), Source>,
}

impl WeightMap {
    /// Maps every key of `ck` that a generation model uses (EMA copies, schedule buffers and
    /// position ids are left out).
    pub fn of(ck: &Checkpoint) -> WeightMap {
        let mut map = BTreeMap::new();
        for t in ck.tensors() {
            for (part, name, source) in map_key(&t.name, &t.shape) {
                map.insert((part, name), source);
            }
        }
        WeightMap { map }
    }

    /// The source of a part's tensor.
    pub fn get(&self, part: Part, name: &str) -> Option<&Source> {
        self.map.get(&(part, name.to_string()))
    }

    /// The names of a part's tensors, sorted.
    pub fn names(&self, part: Part) -> impl Iterator<Item = &str> {
        self.map
            .keys()
            .filter(move |(p, _)| *p == part)
            .map(|(_, n)| n.as_str())
    }
}

/// An LDM module path to its diffusers path.
type ModuleMap = fn(&str) -> Option<String>;

/// The diffusers name(s) of one checkpoint key of shape `shape` (three for a fused q/k/v
/// projection, none for keys generation does not use).
pub fn map_key(key: &str, shape: &[usize]) -> Vec<Mapped> {
    let whole = |part: Part, name: String| {
        vec![(
            part,
            name,
            Source {
                key: key.to_string(),
                rows: None,
                transpose: false,
            },
        )]
    };
    let modules: [(&str, Part, ModuleMap); 2] = [
        ("model.diffusion_model.", Part::Unet, ldm_to_diffusers),
        ("first_stage_model.", Part::Vae, vae_to_diffusers),
    ];
    for (prefix, part, to_diffusers) in modules {
        if let Some(rest) = key.strip_prefix(prefix) {
            let Some((path, suffix)) = rest.rsplit_once('.') else {
                return vec![];
            };
            return to_diffusers(path)
                .map(|p| whole(part, format!("{p}.{suffix}")))
                .unwrap_or_default();
        }
    }
    for (prefix, part) in [
        ("cond_stage_model.transformer.", Part::TextEncoder),
        ("conditioner.embedders.0.transformer.", Part::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            if rest.ends_with("position_ids") {
                return vec![];
            }
            let rest = match rest.starts_with("text_model.") {
                true => rest.to_string(),
                false => format!("text_model.{rest}"),
            };
            return whole(part, rest);
        }
    }
    for (prefix, part) in [
        ("cond_stage_model.model.", Part::TextEncoder),
        ("conditioner.embedders.1.model.", Part::TextEncoder2),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return open_clip(key, rest, shape, part);
        }
    }
    vec![]
}

/// OpenCLIP text-encoder keys (`rest`: after the `model.` prefix) in HF-CLIP names.
fn open_clip(key: &str, rest: &str, shape: &[usize], part: Part) -> Vec<Mapped> {
    let source = |rows, transpose| Source {
        key: key.to_string(),
        rows,
        transpose,
    };
    let named = |name: String, transpose| vec![(part, name, source(None, transpose))];
    match rest {
        "token_embedding.weight" => {
            return named("text_model.embeddings.token_embedding.weight".into(), false)
        }
        "positional_embedding" => {
            return named(
                "text_model.embeddings.position_embedding.weight".into(),
                false,
            )
        }
        "text_projection" => return named("text_projection.weight".into(), true),
        "ln_final.weight" | "ln_final.bias" => {
            let suffix = rest.rsplit('.').next().unwrap_or_default();
            return named(format!("text_model.final_layer_norm.{suffix}"), false);
        }
        _ => {}
    }
    let Some(layer) = rest.strip_prefix("transformer.resblocks.") else {
        return vec![];
    };
    let Some((n, tail)) = layer.split_once('.') else {
        return vec![];
    };
    let base = format!("text_model.encoder.layers.{n}");
    let fused = match tail {
        "attn.in_proj_weight" => Some("weight"),
        "attn.in_proj_bias" => Some("bias"),
        _ => None,
    };
    if let Some(suffix) = fused {
        let d = shape.first().copied().unwrap_or(0) / 3;
        return ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(i, x)| {
                (
                    part,
                    format!("{base}.self_attn.{x}_proj.{suffix}"),
                    source(Some((i * d, (i + 1) * d)), false),
                )
            })
            .collect();
    }
    let Some((module, suffix)) = tail.rsplit_once('.') else {
        return vec![];
    };
    let hf = match module {
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "attn.out_proj" => "self_attn.out_proj",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        _ => return vec![],
    };
    named(format!("{base}.{hf}.{suffix}"), false)
}

/// The diffusers name of a VAE ResNet sub-module.
fn resnet(x: &str) -> &str {
    if x == "nin_shortcut" {
        "conv_shortcut"
    } else {
        x
    }
}

/// The diffusers module path of an LDM VAE module path (without `first_stage_model.` and
/// the parameter name).
pub fn vae_to_diffusers(p: &str) -> Option<String> {
    match p {
        "quant_conv" | "post_quant_conv" => return Some(p.to_string()),
        _ => {}
    }
    let (side, rest) = p.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    let mapped = match parts.as_slice() {
        ["conv_in"] | ["conv_out"] => rest.to_string(),
        ["norm_out"] => "conv_norm_out".to_string(),
        ["down", n, "block", m, x] => {
            format!("down_blocks.{}.resnets.{}.{}", num(n)?, num(m)?, resnet(x))
        }
        ["down", n, "downsample", "conv"] => format!("down_blocks.{}.downsamplers.0.conv", num(n)?),
        ["up", n, "block", m, x] => format!(
            "up_blocks.{}.resnets.{}.{}",
            3usize.checked_sub(num(n)?)?,
            num(m)?,
            resnet(x)
        ),
        ["up", n, "upsample", "conv"] => {
            format!(
                "up_blocks.{}.upsamplers.0.conv",
                3usize.checked_sub(num(n)?)?
            )
        }
        ["mid", "block_1", x] => format!("mid_block.resnets.0.{}", resnet(x)),
        ["mid", "block_2", x] => format!("mid_block.resnets.1.{}", resnet(x)),
        ["mid", "attn_1", x] => {
            let to = match *x {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{to}")
        }
        _ => return None,
    };
    Some(format!("{side}.{mapped}"))
}
