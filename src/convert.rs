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
            Cow::Owned(bytes.chunks_exact(size).map(bytemuck::pod_read_unaligned).collect())
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
    let mut out = vec![0u8; dtype.byte_len(values.len()).ok_or_else(|| not_float(dtype))?];
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

fn encode_half<T: bytemuck::Pod + Default>(values: &[f32], out: &mut [u8], f: impl Fn(&[f32], &mut [T])) {
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
        // Round once, straight from f64, to avoid double rounding through f32.
        let src = cast::<f64>(bytes);
        let es = to.bits() / 8;
        for (c, v) in out.chunks_exact_mut(es).zip(src.iter()) {
            match to {
                DType::F32 => c.copy_from_slice(&(*v as f32).to_le_bytes()),
                DType::F16 => c.copy_from_slice(&f16::from_f64(*v).to_le_bytes()),
                DType::BF16 => c.copy_from_slice(&bf16::from_f64(*v).to_le_bytes()),
                other => return Err(not_float(other)),
            }
        }
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

fn elements(dtype: DType, len: usize) -> Result<usize> {
    if !dtype.is_float() {
        return Err(not_float(dtype));
    }
    let es = dtype.bits() / 8;
    if len % es != 0 {
        return Err(Error::Invalid(format!("{len} bytes is not a whole number of {dtype} values")));
    }
    Ok(len / es)
}

fn not_float(dtype: DType) -> Error {
    Error::Invalid(format!("{dtype} is not a floating-point type mergesmith converts"))
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
        let v = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-11) + 2f32.powi(-20), 65520.0];
        let out = convert(&f32_bytes(&v), DType::F32, DType::F16).unwrap();
        let h: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(h, vec![0x3C00, 0x3C02, 0x3C01, 0x7C00]); // 65520 rounds to +inf
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // bf16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even);
        // 1 + 3*2^-8 -> 1 + 2^-6 (even).
        let v = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)];
        let out = convert(&f32_bytes(&v), DType::F32, DType::BF16).unwrap();
        let h: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(h, vec![0x3F80, 0x3F82]);
    }

    #[test]
    fn f64_rounds_once() {
        // 1 + 2^-11 + 2^-40 in f64 rounds up in f16, but through f32 (which drops 2^-40) it
        // would be a tie and round down.
        let v: f64 = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        let out = convert(&v.to_le_bytes(), DType::F64, DType::F16).unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3C01);
    }

    #[test]
    fn integers_are_refused() {
        assert!(convert(&[0u8; 8], DType::I64, DType::F16).is_err());
        assert!(matches!(convert(&[0u8; 8], DType::I64, DType::I64).unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn misaligned_input_decodes() {
        let mut bytes = vec![0u8];
        bytes.extend(f32_bytes(&[1.5, -2.0]));
        assert_eq!(to_f32(DType::F32, &bytes[1..]).unwrap(), vec![1.5, -2.0]);
    }
}
