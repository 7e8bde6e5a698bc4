//! Quantized storage in checkpoint files: ComfyUI's "scaled fp8" (a `scaled_fp8` marker
//! tensor and a per-layer `X.scale_weight`; the weight is the stored fp8 value times the
//! scale), and the quantized layouts mergesmith recognises but does not read yet (refused
//! with the keys that show them, never merged as if they were plain weights).

use std::collections::BTreeMap;

use crate::checkpoint::Checkpoint;
use crate::convert;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Suffix of ComfyUI's per-layer weight scale.
pub const SCALE_WEIGHT: &str = ".scale_weight";
/// Suffix of ComfyUI's per-layer input scale (fp8 matmul; carried, never merged).
pub const SCALE_INPUT: &str = ".scale_input";
/// Name (after a model prefix) of ComfyUI's scaled-fp8 marker.
pub const MARKER: &str = "scaled_fp8";

/// Key patterns of quantized layouts that are not read yet, with their names.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        ".comfy_quant",
        "ComfyUI mixed-precision quantization (`.comfy_quant`)",
    ),
    (".absmax", "bitsandbytes (NF4 / int8 `absmax`)"),
    (".quant_map", "bitsandbytes (`quant_map`)"),
    (".quant_state.", "bitsandbytes (`quant_state`)"),
    (".weight_scale", "per-channel fp8 (`weight_scale`)"),
    (".qweight", "GPTQ / AWQ (`qweight`)"),
    (".weight_scale_2", "NVFP4 (`weight_scale_2`)"),
];

/// The scaled-fp8 facts of one checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Quant {
    /// Weight key -> its scale (`X.weight` -> value of `X.scale_weight`).
    pub scales: BTreeMap<String, f32>,
    /// The marker tensors (`scaled_fp8`, under each model prefix).
    pub markers: Vec<String>,
}

impl Quant {
    /// Reads the scaled-fp8 facts of `ck`; refuses quantized layouts it cannot read.
    pub fn of(ck: &Checkpoint) -> Result<Quant> {
        if ck.metadata().contains_key("_quantization_metadata") {
            return Err(unsupported(
                ck,
                "ComfyUI mixed-precision quantization (`_quantization_metadata`)",
                "metadata",
            ));
        }
        for t in ck.tensors() {
            if let Some((_, what)) = UNSUPPORTED.iter().find(|(p, _)| t.name.contains(p)) {
                return Err(unsupported(ck, what, &t.name));
            }
        }
        let markers: Vec<String> = ck
            .tensors()
            .iter()
            .filter(|t| t.name == MARKER || t.name.ends_with(&format!(".{MARKER}")))
            .map(|t| t.name.clone())
            .collect();
        let mut scales = BTreeMap::new();
        for t in ck.tensors() {
            let Some(layer) = t.name.strip_suffix(SCALE_WEIGHT) else {
                continue;
            };
            if markers.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: `{}` is a weight scale but the file has no `scaled_fp8` marker; mergesmith does not know how to read it",
                    ck.path().display(),
                    t.name
                )));
            }
            let data = ck.data(t);
            if data.is_empty() && t.byte_len() > 0 {
                // A header-only checkpoint (the planned output of a node not built yet): plans
                // made on it are checks, never executed, so the scale's value does not matter.
                scales.insert(format!("{layer}.weight"), 1.0);
                continue;
            }
            let values = convert::to_f32(t.dtype, &data)?;
            let [scale] = values[..] else {
                return Err(Error::Invalid(format!(
                    "{}: `{}` has {} values; per-tensor scales (one value) are supported, per-channel ones are not yet",
                    ck.path().display(),
                    t.name,
                    values.len()
                )));
            };
            scales.insert(format!("{layer}.weight"), scale);
        }
        Ok(Quant { scales, markers })
    }

    /// Refuses a quantized (or scaled-fp8) checkpoint for a job that reads weights as stored:
    /// `what` says which (LoRA baking, extraction, generation).
    pub fn require_plain(ck: &Checkpoint, what: &str) -> Result<()> {
        if Quant::of(ck)?.is_scaled() {
            return Err(Error::Invalid(format!(
                "{}: {what} does not read scaled fp8 yet; merge it with `--dtype bf16` (or fp16) first",
                ck.path().display()
            )));
        }
        Ok(())
    }

    /// Whether the file is scaled fp8.
    pub fn is_scaled(&self) -> bool {
        !self.markers.is_empty()
    }

    /// The scale of a weight (none: stored as is).
    pub fn scale(&self, key: &str) -> Option<f32> {
        self.scales.get(key).copied()
    }

    /// Whether `key` is part of the quantization bookkeeping (marker, scales), not a weight.
    pub fn is_bookkeeping(key: &str) -> bool {
        key == MARKER
            || key.ends_with(&format!(".{MARKER}"))
            || key.ends_with(SCALE_WEIGHT)
            || key.ends_with(SCALE_INPUT)
    }

    /// The scale key of a weight key (`X.weight` -> `X.scale_weight`).
    pub fn scale_key(weight: &str) -> Option<String> {
        weight
            .strip_suffix(".weight")
            .map(|l| format!("{l}{SCALE_WEIGHT}"))
    }
}

/// The scale that stores `values` in an 8-bit type: the largest magnitude maps to the
/// type's largest finite value (1 for an all-zero tensor).
pub fn scale_for(values: &[f32], dtype: DType) -> f32 {
    let max = convert::f8_max(dtype).unwrap_or(1.0);
    let amax = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        1.0
    } else {
        amax / max
    }
}

fn unsupported(ck: &Checkpoint, what: &str, evidence: &str) -> Error {
    Error::Invalid(format!(
        "{}: stored with {what} (`{evidence}`), which mergesmith does not read yet; convert it to bf16 or (scaled) fp8 first",
        ck.path().display()
    ))
}
