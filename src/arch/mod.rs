//! Model architectures: detection from key names and shapes, key classification into
//! components and MBW blocks, and the reference key layouts.

pub mod blocks;
pub mod layout;
pub mod names;

use std::fmt;

use crate::checkpoint::TensorInfo;

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Stable Diffusion 1.x (CLIP ViT-L text encoder, 768-dim context).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 1024-dim context).
    Sd2,
    /// SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG text encoders).
    Sdxl,
    /// SDXL refiner (OpenCLIP ViT-bigG text encoder only).
    SdxlRefiner,
    /// Not recognized; still mergeable key by key.
    Unknown,
}

impl crate::text::Named for Family {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("sd1", Family::Sd1),
        ("sd2", Family::Sd2),
        ("sdxl", Family::Sdxl),
        ("sdxl-refiner", Family::SdxlRefiner),
        ("unknown", Family::Unknown),
    ];
}

impl Family {
    /// Human-readable name.
    pub fn label(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1.x",
            Family::Sd2 => "SD2.x",
            Family::Sdxl => "SDXL base",
            Family::SdxlRefiner => "SDXL refiner",
            Family::Unknown => "unknown",
        }
    }

    /// The MBW block list used for this family.
    pub fn blocks(self) -> &'static [String] {
        match self {
            Family::Sdxl => &blocks::SDXL_BLOCKS,
            Family::Unknown => &blocks::SD_BLOCKS[..1],
            _ => &blocks::SD_BLOCKS,
        }
    }
}

/// UNet input variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// 4 latent input channels.
    Standard,
    /// 9 input channels (latent + mask + masked image).
    Inpainting,
    /// 8 input channels (latent + image latent).
    InstructPix2Pix,
}

/// The detected architecture and the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Arch {
    /// Model family.
    pub family: Family,
    /// Input variant.
    pub variant: Variant,
    /// Why: the rule that matched, with the evidence.
    pub rule: String,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.family.label())?;
        match self.variant {
            Variant::Standard => Ok(()),
            Variant::Inpainting => f.write_str(" (inpainting)"),
            Variant::InstructPix2Pix => f.write_str(" (instruct-pix2pix)"),
        }
    }
}

/// First UNet convolution; its input-channel count identifies inpainting models.
pub const UNET_CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";
/// The key SuperMerger uses to recognize SDXL.
pub const SDXL_MARKER: &str =
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight";
const UNET_PROJ_IN: &str = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
const UNET_ATTN2_K: &str =
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";

/// Detects the architecture of a set of tensors (sorted by name or not).
pub fn detect(tensors: &[TensorInfo]) -> Arch {
    let find = |name: &str| tensors.iter().find(|t| t.name == name);
    let any_prefix = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let has_unet = any_prefix("model.diffusion_model.");
    let shape_of = |name: &str| find(name).map(|t| t.shape.clone());
    let context = shape_of(UNET_ATTN2_K).and_then(|s| s.get(1).copied());
    let ctx_note = context
        .map(|c| format!(", cross-attention context {c}"))
        .unwrap_or_default();

    let (family, rule) =
        if find(SDXL_MARKER).is_some() || any_prefix("conditioner.embedders.1.model.") {
            let first = if find(SDXL_MARKER).is_some() {
                SDXL_MARKER
            } else {
                "conditioner.embedders.1.model.*"
            };
            (
                Family::Sdxl,
                format!("second text encoder (OpenCLIP bigG) present: `{first}`{ctx_note}"),
            )
        } else if any_prefix("conditioner.embedders.0.model.") {
            (
                Family::SdxlRefiner,
                format!(
                "only text encoder is OpenCLIP bigG at `conditioner.embedders.0.model.*`{ctx_note}"
            ),
            )
        } else if any_prefix("cond_stage_model.model.") {
            let width = shape_of("cond_stage_model.model.token_embedding.weight")
                .and_then(|s| s.get(1).copied());
            let w = width.map(|w| format!(" (width {w})")).unwrap_or_default();
            (
                Family::Sd2,
                format!("OpenCLIP text encoder `cond_stage_model.model.*`{w}{ctx_note}"),
            )
        } else if any_prefix("cond_stage_model.transformer.") {
            (
                Family::Sd1,
                format!("CLIP text encoder `cond_stage_model.transformer.*`{ctx_note}"),
            )
        } else if has_unet {
            // UNet-only file: SD1 uses 1x1 conv proj_in, SD2 a linear one, SDXL has label_emb.
            match shape_of(UNET_PROJ_IN).map(|s| s.len()) {
                _ if any_prefix("model.diffusion_model.label_emb.") => (
                    Family::Sdxl,
                    "UNet only, with `label_emb` (SDXL size conditioning)".to_string(),
                ),
                Some(4) => (
                    Family::Sd1,
                    format!("UNet only, 1x1-conv proj_in (SD1 style){ctx_note}"),
                ),
                Some(2) => (
                    Family::Sd2,
                    format!("UNet only, linear proj_in (SD2 style){ctx_note}"),
                ),
                _ => (
                    Family::Unknown,
                    "UNet keys without a recognizable transformer layout".to_string(),
                ),
            }
        } else {
            (
                Family::Unknown,
                "no Stable Diffusion UNet or text-encoder keys found".to_string(),
            )
        };

    let in_ch = shape_of(UNET_CONV_IN).and_then(|s| s.get(1).copied());
    let (variant, rule) = match in_ch {
        Some(9) => (
            Variant::Inpainting,
            format!("{rule}; `{UNET_CONV_IN}` has 9 input channels"),
        ),
        Some(8) => (
            Variant::InstructPix2Pix,
            format!("{rule}; `{UNET_CONV_IN}` has 8 input channels"),
        ),
        _ => (Variant::Standard, rule),
    };
    Arch {
        family,
        variant,
        rule,
    }
}

/// Which sub-model a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The denoising UNet (`model.diffusion_model.*`).
    Unet,
    /// The (first) text encoder.
    TextEncoder1,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
    /// The VAE (`first_stage_model.*`).
    Vae,
    /// EMA copies of the UNet (`model_ema.*`).
    Ema,
    /// Anything else (diffusion-schedule buffers, markers).
    Other,
}

impl Component {
    /// Classifies a key by its prefix.
    pub fn of(key: &str) -> Component {
        if key.starts_with("model.diffusion_model.") {
            Component::Unet
        } else if key.starts_with("cond_stage_model.")
            || key.starts_with("conditioner.embedders.0.")
        {
            Component::TextEncoder1
        } else if key.starts_with("conditioner.embedders.1.") {
            Component::TextEncoder2
        } else if key.starts_with("first_stage_model.") {
            Component::Vae
        } else if key.starts_with("model_ema.") {
            Component::Ema
        } else {
            Component::Other
        }
    }

    /// Short name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder1 => "te1",
            Component::TextEncoder2 => "te2",
            Component::Vae => "vae",
            Component::Ema => "ema",
            Component::Other => "other",
        }
    }
}

/// Everything the merge engine needs to know about one key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyClass {
    /// Sub-model.
    pub component: Component,
    /// MBW block of the family's list (`None`: the key is never merged and has no block).
    pub block: Option<String>,
    /// Fine-grained SDXL block name (supermerger.md §3.3), SDXL only.
    pub fine: Option<String>,
    /// Whether SuperMerger's key filter (§3.1) lets this key be blended at all:
    /// the name contains `model` and `weight` or `bias`. Buffers such as `position_ids`,
    /// `logit_scale` or `text_projection` are never blended.
    pub mergeable: bool,
}

/// Classifies a key for the given family.
pub fn classify(family: Family, key: &str) -> KeyClass {
    let component = Component::of(key);
    let mergeable = key.contains("model") && (key.contains("weight") || key.contains("bias"));
    let (block, fine) = match family {
        Family::Sdxl => match blocks::sdxl_block(key) {
            Some((fine, block)) => (Some(block), Some(fine)),
            None => (None, None),
        },
        Family::Unknown => (Some("BASE".to_string()), None),
        _ => (Some(blocks::sd_block(key)), None),
    };
    KeyClass {
        component,
        block,
        fine,
        mergeable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mergeable_rule() {
        assert!(
            !classify(
                Family::Sd1,
                "cond_stage_model.transformer.text_model.embeddings.position_ids"
            )
            .mergeable
        );
        assert!(
            !classify(
                Family::Sdxl,
                "conditioner.embedders.1.model.text_projection"
            )
            .mergeable
        );
        assert!(!classify(Family::Sd1, "alphas_cumprod").mergeable);
        assert!(classify(Family::Sd1, "first_stage_model.encoder.conv_in.weight").mergeable);
    }

    #[test]
    fn components() {
        assert_eq!(
            Component::of("conditioner.embedders.1.model.ln_final.bias"),
            Component::TextEncoder2
        );
        assert_eq!(Component::of("model_ema.decay"), Component::Ema);
        assert_eq!(Component::of("betas"), Component::Other);
    }
}
