//! Tensor element types as named in safetensors headers and PyTorch storages.

use std::fmt;
use std::str::FromStr;

/// Element type of a stored tensor.
///
/// The names follow the safetensors header spelling (`F16`, `BF16`, ...). Sub-byte
/// types are sized in bits so that byte lengths can still be validated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum DType {
    /// Boolean, one byte per element.
    #[serde(rename = "BOOL")]
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits.
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits.
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    /// 8-bit exponent-only scale type.
    #[serde(rename = "F8_E8M0")]
    F8E8M0,
    /// 6-bit float (2 exponent, 3 mantissa bits).
    #[serde(rename = "F6_E2M3")]
    F6E2M3,
    /// 6-bit float (3 exponent, 2 mantissa bits).
    #[serde(rename = "F6_E3M2")]
    F6E3M2,
    /// 4-bit float.
    F4,
    /// complex64 (two f32).
    C64,
}

impl DType {
    /// Every type, in the order used for display.
    pub const ALL: [DType; 20] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::F8E8M0,
        DType::F6E2M3,
        DType::F6E3M2,
        DType::F4,
        DType::C64,
    ];

    /// The safetensors header name.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::F4 => "F4",
            DType::C64 => "C64",
        }
    }

    /// Size of one element in bits.
    pub fn bits(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 8,
            DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::I64 | DType::U64 | DType::F64 | DType::C64 => 64,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::F4 => 4,
        }
    }

    /// Alignment in bytes that a naturally aligned element of this type needs.
    pub fn align(self) -> usize {
        self.bits().div_ceil(8).max(1)
    }

    /// Byte length of `elements` values, or `None` on overflow or when the bit count is not
    /// a whole number of bytes.
    pub fn byte_len(self, elements: usize) -> Option<usize> {
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// True for the floating-point types mergesmith computes with (f16, bf16, f32, f64, fp8).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// Parses a safetensors header name (`F16`) or a user spelling (`fp16`, `float16`, `bf16`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(d) = DType::ALL.iter().find(|d| d.name() == s) {
            return Ok(*d);
        }
        match s.to_ascii_lowercase().as_str() {
            "fp16" | "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "fp32" | "f32" | "float32" | "float" => Ok(DType::F32),
            "fp64" | "f64" | "float64" | "double" => Ok(DType::F64),
            _ => Err(format!("unknown dtype `{s}`")),
        }
    }
}

/// Output precision a user can ask for when writing a checkpoint.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    /// IEEE half precision (the usual distribution format).
    Fp16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    Fp32,
    /// 8-bit float, 4 exponent and 3 mantissa bits (torch `float8_e4m3fn`, Flux fp8 files).
    #[serde(rename = "fp8_e4m3")]
    Fp8E4m3,
    /// 8-bit float, 5 exponent and 2 mantissa bits.
    #[serde(rename = "fp8_e5m2")]
    Fp8E5m2,
}

/// How values are rounded to a narrower float type.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Round to nearest, ties to even (deterministic; the default).
    #[default]
    Nearest,
    /// fp8 outputs: round up or down at random with the probabilities that keep the expected
    /// value, drawn from the merge's `seed` per (tensor, element): the same bytes whatever the
    /// thread count. Wider types still round to nearest.
    Stochastic,
}

impl Rounding {
    /// Whether this is the default, round to nearest even.
    pub fn is_nearest(&self) -> bool {
        *self == Rounding::Nearest
    }
}

impl crate::text::Named for Rounding {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("nearest", Rounding::Nearest),
        ("stochastic", Rounding::Stochastic),
    ];
}

impl crate::text::Named for FloatType {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("fp16", FloatType::Fp16),
        ("bf16", FloatType::Bf16),
        ("fp32", FloatType::Fp32),
        ("fp8_e4m3", FloatType::Fp8E4m3),
        ("fp8_e5m2", FloatType::Fp8E5m2),
    ];
}

impl FloatType {
    /// The corresponding tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            FloatType::Fp16 => DType::F16,
            FloatType::Bf16 => DType::BF16,
            FloatType::Fp32 => DType::F32,
            FloatType::Fp8E4m3 => DType::F8E4M3,
            FloatType::Fp8E5m2 => DType::F8E5M2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert_eq!("fp16".parse::<DType>().unwrap(), DType::F16);
        assert!("F17".parse::<DType>().is_err());
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(DType::F16.byte_len(3), Some(6));
        assert_eq!(DType::F4.byte_len(3), None);
        assert_eq!(DType::F4.byte_len(4), Some(2));
        assert_eq!(DType::F64.byte_len(usize::MAX), None);
    }
}
