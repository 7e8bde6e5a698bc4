//! Conversions between the floating-point storage types (f16, bf16, f32, f64).
//!
//! Narrowing rounds to nearest, ties to even (the `half` crate, hardware F16C where the CPU
//! has it), like torch's `.half()` / `.bfloat16()`. f64 sources are rounded once, directly
//! to the target type. Integer tensors are never converted. Data is little-endian, as in
//! safetensors and torch files; byte slices need not be aligned.

use std::borrow::Cow;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("mergesmith assumes a little-endian host (safetensors data is little-endian)");

/// Elements per parallel work unit.
const CHUNK: usize = 1 << 16;

/// Reinterprets `bytes` as `T`s, copying only when the slice is misaligned.
pub fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            let size = std::mem::size_of::<T>();
            Cow::Owned(
                bytes
                    .chunks_exact(size)
                    .map(bytemuck::pod_read_unaligned)
                    .collect(),
            )
        }
    }
}

/// Decodes a float tensor's bytes into f32 values.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let n = elements(dtype, bytes.len())?;
    let mut out = vec![0f32; n];
    decode_into(dtype, bytes, &mut out)?;
    Ok(out)
}

/// Decodes `bytes` (of `dtype`) into `out`, which must have the matching length.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        DType::F32 => out.copy_from_slice(&cast::<f32>(bytes)),
        DType::F16 => cast::<f16>(bytes).convert_to_f32_slice(out),
        DType::BF16 => cast::<bf16>(bytes).convert_to_f32_slice(out),
        DType::F64 => {
            for (o, v) in out.iter_mut().zip(cast::<f64>(bytes).iter()) {
                *o = *v as f32;
            }
        }
        other => return Err(not_float(other)),
    }
    Ok(())
}

/// Encodes f32 values as `dtype` (rounding to nearest even when narrowing).
pub fn from_f32(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let mut out = vec![
        0u8;
        dtype
            .byte_len(values.len())
            .ok_or_else(|| not_float(dtype))?
    ];
    encode_into(values, dtype, &mut out)?;
    Ok(out)
}

/// Encodes f32 values into `out` (whose length must match) as `dtype`.
pub fn encode_into(values: &[f32], dtype: DType, out: &mut [u8]) -> Result<()> {
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        DType::F16 => encode_half::<f16>(values, out, |v, o| o.convert_from_f32_slice(v)),
        DType::BF16 => encode_half::<bf16>(values, out, |v, o| o.convert_from_f32_slice(v)),
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(values) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        other => return Err(not_float(other)),
    }
    Ok(())
}

fn encode_half<T: bytemuck::Pod + Default>(
    values: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32], &mut [T]),
) {
    match bytemuck::try_cast_slice_mut::<u8, T>(out) {
        Ok(o) => f(values, o),
        Err(_) => {
            let mut tmp = vec![T::default(); values.len()];
            f(values, &mut tmp);
            out.copy_from_slice(bytemuck::cast_slice(&tmp));
        }
    }
}

/// Converts a float tensor between storage types, in parallel; borrows when `from == to`.
/// Integer and other non-float types are refused: they are never converted.
///
/// ```
/// use mergesmith::{convert::convert, dtype::DType};
///
/// // 1 + 2^-11 is halfway between two f16 values: it rounds to the even one, 1.0.
/// let x = (1.0f32 + 2f32.powi(-11)).to_le_bytes();
/// assert_eq!(&*convert(&x, DType::F32, DType::F16).unwrap(), &0x3C00u16.to_le_bytes());
/// assert!(convert(&[0u8; 8], DType::I64, DType::F16).is_err());
/// ```
pub fn convert(bytes: &[u8], from: DType, to: DType) -> Result<Cow<'_, [u8]>> {
    if from == to {
        return Ok(Cow::Borrowed(bytes));
    }
    if !from.is_float() {
        return Err(not_float(from));
    }
    let n = elements(from, bytes.len())?;
    let mut out = vec![0u8; to.byte_len(n).ok_or_else(|| not_float(to))?];
    if from == DType::F64 {
        // Round once: f64 -> f32 with round-to-odd keeps enough information that the
        // following round-to-nearest-even to f16/bf16 equals a direct rounding of the f64.
        // (`half`'s own f64 conversion drops the low 32 mantissa bits first and can be off.)
        let src = cast::<f64>(bytes);
        let narrow = if to == DType::F32 {
            |v: &f64| *v as f32
        } else {
            |v: &f64| f64_to_f32_round_odd(*v)
        };
        let vals: Vec<f32> = src.iter().map(narrow).collect();
        encode_into(&vals, to, &mut out)?;
        return Ok(Cow::Owned(out));
    }
    let (ies, oes) = (from.bits() / 8, to.bits() / 8);
    out.par_chunks_mut(CHUNK * oes)
        .zip(bytes.par_chunks(CHUNK * ies))
        .try_for_each_init(Vec::new, |buf: &mut Vec<f32>, (o, i)| {
            buf.resize(i.len() / ies, 0.0);
            decode_into(from, i, buf)?;
            encode_into(buf, to, o)
        })?;
    Ok(Cow::Owned(out))
}

/// f64 -> f32 rounding to odd: truncate toward zero, then set the last bit if inexact.
fn f64_to_f32_round_odd(v: f64) -> f32 {
    let f = v as f32;
    if !f.is_finite() || f as f64 == v {
        return f;
    }
    let mut bits = f.to_bits();
    if (f as f64).abs() > v.abs() {
        bits -= 1; // `as` rounded away from zero: step back toward zero
    }
    f32::from_bits(bits | 1)
}

fn elements(dtype: DType, len: usize) -> Result<usize> {
    if !dtype.is_float() {
        return Err(not_float(dtype));
    }
    let es = dtype.bits() / 8;
    if !len.is_multiple_of(es) {
        return Err(Error::Invalid(format!(
            "{len} bytes is not a whole number of {dtype} values"
        )));
    }
    Ok(len / es)
}

fn not_float(dtype: DType) -> Error {
    Error::Invalid(format!(
        "{dtype} is not a floating-point type mergesmith converts"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is exactly halfway between 1 and the next f16 (1 + 2^-10): ties to even -> 1.
        // 1 + 3*2^-11 is halfway between 1+2^-10 and 1+2^-9: ties to even -> 1 + 2^-9.
        // 1 + 2^-11 + 2^-20 is just above halfway -> rounds up to 1 + 2^-10.
        let v = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            1.0 + 2f32.powi(-11) + 2f32.powi(-20),
            65520.0,
        ];
        let bytes = f32_bytes(&v);
        let out = convert(&bytes, DType::F32, DType::F16).unwrap();
        let h: Vec<u16> = out
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(h, vec![0x3C00, 0x3C02, 0x3C01, 0x7C00]); // 65520 rounds to +inf
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // bf16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even);
        // 1 + 3*2^-8 -> 1 + 2^-6 (even).
        let v = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)];
        let bytes = f32_bytes(&v);
        let out = convert(&bytes, DType::F32, DType::BF16).unwrap();
        let h: Vec<u16> = out
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(h, vec![0x3F80, 0x3F82]);
    }

    #[test]
    fn f64_rounds_once() {
        // 1 + 2^-11 + 2^-40 in f64 rounds up in f16, but through f32 (which drops 2^-40) it
        // would be a tie and round down.
        let v: f64 = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let bytes = v.to_le_bytes();
        let out = convert(&bytes, DType::F64, DType::F16).unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3C01);
    }

    #[test]
    fn f64_matches_exact_rounding_reference() {
        // Reference: the exact nearest-even f16 of a dyadic f64, by brute force over all
        // finite f16 values (independent of the conversion code).
        let finite: Vec<(u16, f64)> = (0u16..=0xFFFF)
            .filter(|b| b & 0x7C00 != 0x7C00)
            .map(|b| (b, f16::from_bits(b).to_f64()))
            .collect();
        let nearest = |v: f64| -> u16 {
            let mut best = finite[0];
            for &(b, x) in &finite {
                let (d, db) = ((x - v).abs(), (best.1 - v).abs());
                if d < db || (d == db && b & 1 == 0 && best.0 & 1 == 1) {
                    best = (b, x);
                }
            }
            best.0
        };
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // values in [-60000, 60000] with arbitrary low mantissa bits
            let v = ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 120000.0;
            let bytes = v.to_le_bytes();
            let out = convert(&bytes, DType::F64, DType::F16).unwrap();
            let got = u16::from_le_bytes([out[0], out[1]]);
            let want = nearest(v);
            assert!(
                got == want || (got & 0x7FFF == 0 && want & 0x7FFF == 0),
                "{v}: got {got:#x}, want {want:#x}"
            );
        }
    }

    #[test]
    fn integers_are_refused() {
        assert!(convert(&[0u8; 8], DType::I64, DType::F16).is_err());
        assert!(matches!(
            convert(&[0u8; 8], DType::I64, DType::I64).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn misaligned_input_decodes() {
        let mut bytes = vec![0u8];
        bytes.extend(f32_bytes(&[1.5, -2.0]));
        assert_eq!(to_f32(DType::F32, &bytes[1..]).unwrap(), vec![1.5, -2.0]);
    }
}
