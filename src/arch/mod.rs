//! Model architectures: detection from key names and shapes, key classification into
//! components and MBW blocks, and the reference key layouts.

pub mod blocks;
pub mod family;
pub mod layout;
pub mod names;

use std::fmt;

use crate::checkpoint::TensorInfo;
pub use family::{Family, Variant};

/// The detected architecture and the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Arch {
    /// Model family.
    pub family: Family,
    /// On-disk layout (an id of the family's `layouts`).
    pub layout: &'static str,
    /// Variant.
    pub variant: Variant,
    /// Why: the rule that matched, with the evidence.
    pub rule: String,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.family.label())?;
        match self.variant.label {
            Some(l) => write!(f, " ({l})"),
            None => Ok(()),
        }
    }
}

/// First UNet convolution; its input-channel count identifies inpainting models.
pub const UNET_CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// Detects the architecture of a set of tensors (sorted by name or not) from the family
/// declarations (`data/families/`).
pub fn detect(tensors: &[TensorInfo]) -> Arch {
    family::detect(tensors)
}

/// Which sub-model a key belongs to (by the family's prefixes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Component {
    /// The denoiser: UNet or diffusion transformer.
    #[serde(rename = "unet")]
    Unet,
    /// The (first) text encoder.
    #[serde(rename = "te1")]
    TextEncoder1,
    /// The second text encoder (SDXL's OpenCLIP bigG, Flux's T5-XXL, SD3's CLIP-G).
    #[serde(rename = "te2")]
    TextEncoder2,
    /// The third text encoder (SD3's T5-XXL).
    #[serde(rename = "te3")]
    TextEncoder3,
    /// The VAE.
    #[serde(rename = "vae")]
    Vae,
    /// EMA copies of the UNet (`model_ema.*`).
    #[serde(rename = "ema")]
    Ema,
    /// Anything else (diffusion-schedule buffers, markers).
    #[serde(rename = "other")]
    Other,
}

impl Component {
    /// Short name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder1 => "te1",
            Component::TextEncoder2 => "te2",
            Component::TextEncoder3 => "te3",
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
    /// Block in the family's default list (`None`: the key has no block there).
    pub block: Option<String>,
    /// Block in the family's second list, if it has one (SDXL's 110 fine names, Flux's
    /// ComfyUI prefixes).
    pub fine: Option<String>,
    /// Whether the family's merge rule lets this key be blended at all (SD families:
    /// SuperMerger's filter, supermerger.md §3.1: the name contains `model` and `weight` or
    /// `bias`, so buffers such as `position_ids`, `logit_scale` or `text_projection` are never
    /// blended; the transformer families: every float tensor except the VAE).
    pub mergeable: bool,
}

/// Classifies a key for the given family.
pub fn classify(family: Family, key: &str) -> KeyClass {
    KeyClass {
        component: family.component(key),
        block: family.block_in(0, key),
        fine: family.block_in(1, key),
        mergeable: family.mergeable(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1() -> Family {
        Family::named("sd1").unwrap()
    }

    #[test]
    fn mergeable_rule() {
        assert!(
            !classify(
                sd1(),
                "cond_stage_model.transformer.text_model.embeddings.position_ids"
            )
            .mergeable
        );
        assert!(
            !classify(
                Family::named("sdxl").unwrap(),
                "conditioner.embedders.1.model.text_projection"
            )
            .mergeable
        );
        assert!(!classify(sd1(), "alphas_cumprod").mergeable);
        assert!(classify(sd1(), "first_stage_model.encoder.conv_in.weight").mergeable);
    }

    #[test]
    fn components() {
        let xl = Family::named("sdxl").unwrap();
        assert_eq!(
            xl.component("conditioner.embedders.1.model.ln_final.bias"),
            Component::TextEncoder2
        );
        assert_eq!(xl.component("model_ema.decay"), Component::Ema);
        assert_eq!(xl.component("betas"), Component::Other);
    }
}
