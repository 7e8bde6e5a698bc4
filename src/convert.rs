//! Conversions between the floating-point storage types (f16, bf16, f32, f64 and the 8-bit
//! floats F8_E4M3 / F8_E5M2).
//!
//! Narrowing rounds to nearest, ties to even (the `half` crate, hardware F16C where the CPU
//! has it), like torch's `.half()` / `.bfloat16()`. f64 sources are rounded once, directly
//! to the target type. The 8-bit floats are torch's `float8_e4m3fn` (no infinities, NaN
//! 0x7F, largest 448) and `float8_e5m2` (IEEE-like, largest finite 57344); values beyond
//! the largest finite one saturate to it (as ComfyUI clamps before its fp8 casts) instead
//! of becoming NaN / infinity. Integer tensors are never converted. Data is little-endian,
//! as in safetensors and torch files; byte slices need not be aligned.

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

/// [`to_f32`] on every core: the bytes decoded in parallel slices of 256 Ki values (for whole
/// tensors decoded at once, as generation's weight loading does).
pub fn to_f32_par(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    /// Values per parallel slice.
    const SLICE: usize = 1 << 18;
    let n = elements(dtype, bytes.len())?;
    let mut out = vec![0f32; n];
    let width = dtype.bits() / 8;
    out.par_chunks_mut(SLICE)
        .zip(bytes.par_chunks(SLICE * width))
        .try_for_each(|(o, b)| decode_into(dtype, b, o))?;
    Ok(out)
}

/// The values of a tensor of any numeric type as f32 (`tensor.to(torch.float32)`: integers
/// rounded to the nearest f32, booleans 0 or 1).
pub fn any_to_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    fn ints<T: bytemuck::Pod>(bytes: &[u8], f: impl Fn(T) -> f32) -> Vec<f32> {
        cast::<T>(bytes).iter().map(|v| f(*v)).collect()
    }
    Ok(match dtype {
        DType::Bool | DType::U8 => bytes.iter().map(|v| *v as f32).collect(),
        DType::I8 => bytes.iter().map(|v| *v as i8 as f32).collect(),
        DType::I16 => ints::<i16>(bytes, |v| v as f32),
        DType::U16 => ints::<u16>(bytes, |v| v as f32),
        DType::I32 => ints::<i32>(bytes, |v| v as f32),
        DType::U32 => ints::<u32>(bytes, |v| v as f32),
        DType::I64 => ints::<i64>(bytes, |v| v as f32),
        DType::U64 => ints::<u64>(bytes, |v| v as f32),
        _ => to_f32(dtype, bytes)?,
    })
}

/// Decodes elements `lo..hi` of a float tensor's bytes into `out` (resized to fit).
pub fn decode_range(
    dtype: DType,
    bytes: &[u8],
    lo: usize,
    hi: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    let es = dtype.bits() / 8;
    out.resize(hi - lo, 0.0);
    decode_into(dtype, &bytes[lo * es..hi * es], out)
}

/// Decodes `bytes` (of `dtype`) into `out`, which must have the matching length.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        DType::F32 => out.copy_from_slice(&cast::<f32>(bytes)),
        DType::F16 => f16_bytes_to_f32(bytes, out),
        DType::BF16 => cast::<bf16>(bytes).convert_to_f32_slice(out),
        DType::F64 => {
            for (o, v) in out.iter_mut().zip(cast::<f64>(bytes).iter()) {
                *o = *v as f32;
            }
        }
        DType::F8E4M3 => {
            let lut = &*E4M3_VALUES;
            for (o, b) in out.iter_mut().zip(bytes) {
                *o = lut[*b as usize];
            }
        }
        DType::F8E5M2 => {
            let lut = &*E5M2_VALUES;
            for (o, b) in out.iter_mut().zip(bytes) {
                *o = lut[*b as usize];
            }
        }
        other => return Err(not_float(other)),
    }
    Ok(())
}

/// An 8-bit float format: exponent and mantissa widths, and whether the all-ones exponent
/// holds infinities and NaNs (E5M2) or ordinary values with only all-ones-mantissa NaN
/// (E4M3 "fn").
#[derive(Debug, Clone, Copy)]
struct F8 {
    exp: u32,
    man: u32,
    ieee: bool,
}

const E4M3: F8 = F8 {
    exp: 4,
    man: 3,
    ieee: false,
};
const E5M2: F8 = F8 {
    exp: 5,
    man: 2,
    ieee: true,
};

impl F8 {
    fn bias(self) -> i32 {
        (1 << (self.exp - 1)) - 1
    }

    /// The value of a byte.
    fn decode(self, b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> self.man) as u32) & ((1 << self.exp) - 1);
        let m = (b as u32) & ((1 << self.man) - 1);
        let top = (1 << self.exp) - 1;
        if self.ieee && e == top {
            return if m == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            };
        }
        if !self.ieee && e == top && m == (1 << self.man) - 1 {
            return f32::NAN;
        }
        let frac = m as f32 / (1 << self.man) as f32;
        if e == 0 {
            sign * frac * 2f32.powi(1 - self.bias())
        } else {
            sign * (1.0 + frac) * 2f32.powi(e as i32 - self.bias())
        }
    }

    /// The largest finite value's byte (positive).
    fn max_byte(self) -> u8 {
        if self.ieee {
            (((1u32 << self.exp) - 2) << self.man | ((1 << self.man) - 1)) as u8
        } else {
            0x7E
        }
    }

    /// Rounds to nearest, ties to even; saturates beyond the largest finite value (`max`,
    /// passed in so that the hot loop does not recompute it).
    #[inline]
    fn encode(self, v: f32, max: f32) -> u8 {
        // Adding and taking away 2^23 rounds to an integer, ties to even, in the default
        // rounding mode.
        const ROUND: f32 = 8_388_608.0;
        self.encode_with(v, max, |t| ((t + ROUND) - ROUND) as u32)
    }

    /// Stochastic rounding: down or up to the two neighbouring values with probabilities
    /// proportional to the distance to the other (`u` uniform in [0, 1): up when `u` is below
    /// the fraction), so the expected stored value is `v`; saturates like [`F8::encode`].
    #[inline]
    fn encode_stochastic(self, v: f32, max: f32, u: f32) -> u8 {
        self.encode_with(v, max, |t| {
            let low = t.floor();
            low as u32 + u32::from(u < t - low)
        })
    }

    /// Encodes with `round` mapping `|v| / spacing` (exact, below 2^(man + 2)) to an integer.
    #[inline]
    fn encode_with(self, v: f32, max: f32, round: impl Fn(f32) -> u32) -> u8 {
        if v.is_nan() {
            return 0x7F;
        }
        let sign = if v.is_sign_negative() { 0x80 } else { 0 };
        let a = v.abs();
        if a >= max {
            return sign | self.max_byte();
        }
        // The spacing of representable values around `a`: 2^(e - man) for normal `a`
        // (exponent e), the subnormal spacing below the smallest normal.
        let min_normal_exp = 1 - self.bias();
        let e = if a == 0.0 {
            min_normal_exp
        } else {
            (a.to_bits() >> 23) as i32 - 127
        }
        .max(min_normal_exp);
        // a / 2^(e - man) is exact (a power-of-two scaling of a normal f32 in range), and
        // below 2^(man + 1).
        let inv_step = f32::from_bits(((127 - (e - self.man as i32)) as u32) << 23);
        let q = round(a * inv_step);
        // q * step, as (exponent, mantissa) fields; q may have carried into the next binade.
        let (field_e, field_m) = if e == min_normal_exp && q < (1 << self.man) {
            (0, q)
        } else if q >= (2 << self.man) {
            ((e + 1 + self.bias()) as u32, 0)
        } else {
            ((e + self.bias()) as u32, q - (1 << self.man))
        };
        let b = (field_e << self.man | field_m) as u8;
        // Rounding up to max + 1 step cannot happen: `a < max` rounds to at most max.
        sign | b
    }
}

static E4M3_VALUES: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|b| E4M3.decode(b as u8)));
static E5M2_VALUES: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|b| E5M2.decode(b as u8)));

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
        DType::F16 => f32_to_f16_bytes(values, out),
        DType::BF16 => encode_half::<bf16>(values, out, |v, o| o.convert_from_f32_slice(v)),
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(values) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::F8E4M3 | DType::F8E5M2 => {
            let f8 = if dtype == DType::F8E4M3 { E4M3 } else { E5M2 };
            let max = f8.decode(f8.max_byte());
            for (o, v) in out.iter_mut().zip(values) {
                *o = f8.encode(*v, max);
            }
        }
        other => return Err(not_float(other)),
    }
    Ok(())
}

/// Encodes f32 values as fp8 `dtype` with seeded stochastic rounding: value `i` of the slice
/// is element `first + i` of the tensor whose name hashes to `stream`, and its uniform draw
/// depends on (`seed`, `stream`, index) only, so the bytes do not depend on how the tensor is
/// split among threads. Other dtypes round to nearest even.
pub fn encode_stochastic_into(
    values: &[f32],
    dtype: DType,
    out: &mut [u8],
    seed: u64,
    stream: u64,
    first: u64,
) -> Result<()> {
    let f8 = match dtype {
        DType::F8E4M3 => E4M3,
        DType::F8E5M2 => E5M2,
        _ => return encode_into(values, dtype, out),
    };
    let max = f8.decode(f8.max_byte());
    let key = splitmix64(seed ^ splitmix64(stream));
    for (i, (o, v)) in out.iter_mut().zip(values).enumerate() {
        let r = splitmix64(key ^ (first + i as u64));
        let u = (r >> 40) as f32 * (1.0 / 16_777_216.0);
        *o = f8.encode_stochastic(*v, max, u);
    }
    Ok(())
}

/// The stream of a tensor for [`encode_stochastic_into`]: a hash of its name.
pub fn stream_of(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// SplitMix64's output function of `x + golden` (a counter-based generator).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The largest finite value of an 8-bit float type (448 for F8_E4M3, 57344 for F8_E5M2).
pub fn f8_max(dtype: DType) -> Option<f32> {
    match dtype {
        DType::F8E4M3 => Some(E4M3.decode(E4M3.max_byte())),
        DType::F8E5M2 => Some(E5M2.decode(E5M2.max_byte())),
        _ => None,
    }
}

/// f16 bytes (little-endian, any alignment) to f32: exact, with the CPU's conversion
/// instruction eight at a time where it has one (the same values as `half`'s, which uses that
/// instruction too, without a call per eight elements).
fn f16_bytes_to_f32(bytes: &[u8], out: &mut [f32]) {
    let n = out.len().min(bytes.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features the function is compiled for; it reads
        // `bytes[..2n]` and writes `out[..n]`, both in bounds.
        done = unsafe { x86::f16_to_f32(bytes.as_ptr(), out.as_mut_ptr(), n) };
    }
    for (o, b) in out[done..n]
        .iter_mut()
        .zip(bytes[2 * done..].chunks_exact(2))
    {
        *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// f32 to f16 bytes, rounding to nearest even (as [`f16_bytes_to_f32`], eight at a time).
fn f32_to_f16_bytes(values: &[f32], out: &mut [u8]) {
    let n = values.len().min(out.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: as in `f16_bytes_to_f32`: reads `values[..n]`, writes `out[..2n]`.
        done = unsafe { x86::f32_to_f16(values.as_ptr(), out.as_mut_ptr(), n) };
    }
    for (v, o) in values[done..n]
        .iter()
        .zip(out[2 * done..].chunks_exact_mut(2))
    {
        o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
        _mm_loadu_si128, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    /// Whether the CPU has what the conversions below are compiled for.
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
    }

    /// Converts the first multiple of eight of `n` f16 values at `src` (bytes, unaligned)
    /// into f32s at `dst`; returns how many it converted.
    ///
    /// # Safety
    /// The CPU has AVX and F16C; `src` holds `2n` readable bytes, `dst` `n` writable f32s.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32(src: *const u8, dst: *mut f32, n: usize) -> usize {
        let whole = n - n % 8;
        let mut i = 0;
        while i < whole {
            // SAFETY: i + 8 <= n: in bounds of both, per the caller's contract.
            unsafe {
                let h = _mm_loadu_si128(src.add(2 * i) as *const __m128i);
                _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        whole
    }

    /// Converts the first multiple of eight of `n` f32s at `src` into f16 bytes at `dst`
    /// (unaligned), rounding to nearest even; returns how many it converted.
    ///
    /// # Safety
    /// The CPU has AVX and F16C; `src` holds `n` readable f32s, `dst` `2n` writable bytes.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f32_to_f16(src: *const f32, dst: *mut u8, n: usize) -> usize {
        let whole = n - n % 8;
        let mut i = 0;
        while i < whole {
            // SAFETY: i + 8 <= n: in bounds of both, per the caller's contract.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.add(i)));
                _mm_storeu_si128(dst.add(2 * i) as *mut __m128i, h);
            }
            i += 8;
        }
        whole
    }
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
    fn parallel_decoding_gives_the_serial_values() {
        // Longer than one parallel slice (256 Ki values) and not a multiple of it.
        let n = 600_001;
        for dtype in [DType::F16, DType::BF16, DType::F8E4M3, DType::F32] {
            let width = dtype.bits() / 8;
            let bytes: Vec<u8> = (0..n * width).map(|i| (i * 7 + i / 3) as u8).collect();
            let par = to_f32_par(dtype, &bytes).unwrap();
            let serial = to_f32(dtype, &bytes).unwrap();
            assert_eq!(par.len(), n);
            // Bit for bit (NaN patterns included).
            assert!(
                par.iter()
                    .zip(&serial)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype}"
            );
        }
        assert!(to_f32_par(DType::F16, &[0u8; 3]).is_err());
    }

    #[test]
    fn f16_decoding_of_every_value_matches_its_fields() {
        // Every f16 bit pattern, read at an odd byte offset and with a length that is not a
        // multiple of eight, against sign * mantissa * 2^exponent worked out in f64.
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let mut bytes = vec![0u8];
        bytes.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
        let n = bits.len() - 3;
        let mut out = vec![0f32; n];
        decode_into(DType::F16, &bytes[1..1 + 2 * n], &mut out).unwrap();
        for (b, v) in bits.iter().zip(&out) {
            let (sign, exp, man) = (b >> 15, (b >> 10) & 0x1f, (b & 0x3ff) as f64);
            let s = if sign == 1 { -1.0 } else { 1.0 };
            match exp {
                0x1f if man != 0.0 => assert!(v.is_nan(), "{b:#06x}"),
                0x1f => assert_eq!(*v as f64, s * f64::INFINITY, "{b:#06x}"),
                0 => assert_eq!(*v as f64, s * man * 2f64.powi(-24), "{b:#06x}"),
                e => assert_eq!(
                    *v as f64,
                    s * (1.0 + man / 1024.0) * 2f64.powi(e as i32 - 15),
                    "{b:#06x}"
                ),
            }
            assert_eq!(v.is_sign_negative(), sign == 1, "{b:#06x}");
        }
    }

    #[test]
    fn f16_encoding_matches_a_software_rounding() {
        // Every f16 value, the midpoints between neighbours and points just either side of
        // them, and a spread of large and tiny values: the slice encoder (eight at a time
        // where the CPU can) against `half`'s const, software-only conversion.
        let mut v: Vec<f32> = Vec::new();
        for b in 0..0x7c00u16 {
            let x = f16::from_bits(b).to_f64();
            let next = f16::from_bits(b + 1).to_f64();
            let mid = (x + next) / 2.0;
            for y in [x, mid, mid * (1.0 + 1e-7), mid * (1.0 - 1e-7)] {
                v.push(y as f32);
                v.push(-y as f32);
            }
        }
        v.extend([
            65520.0,
            1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
        ]);
        v.push(1.5); // a length that is not a multiple of eight
        let mut out = vec![0u8; 2 * v.len() + 1];
        encode_into(&v, DType::F16, &mut out[1..]).unwrap();
        for (i, x) in v.iter().enumerate() {
            let got = u16::from_le_bytes([out[1 + 2 * i], out[2 + 2 * i]]);
            let want = f16::from_f32_const(*x).to_bits();
            if x.is_nan() {
                assert!(f16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want, "{x:e}");
            }
        }
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
        let nearest = |v: f64| nearest_even(&finite, v).0;
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

    /// The code nearest to `v` by brute force over `(code, value)` pairs, ties to the even code.
    fn nearest_even<C: Copy + Into<u32>>(table: &[(C, f64)], v: f64) -> (C, f64) {
        let mut best = table[0];
        for &(b, x) in table {
            let (d, db) = ((x - v).abs(), (best.1 - v).abs());
            if d < db || (d == db && b.into() & 1 == 0 && best.0.into() & 1 == 1) {
                best = (b, x);
            }
        }
        best
    }

    /// Every finite value of an 8-bit type with its byte, from the bit layout written out
    /// independently of the codec (sign, exponent, mantissa; E4M3: bias 7, only S.1111.111
    /// is NaN; E5M2: bias 15, exponent 31 is inf/NaN).
    fn f8_table(dtype: DType) -> Vec<(u8, f64)> {
        let (man, bias, ieee) = match dtype {
            DType::F8E4M3 => (3, 7, false),
            _ => (2, 15, true),
        };
        (0u16..256)
            .filter_map(|b| {
                let b = b as u8;
                let e = ((b & 0x7F) >> man) as i32;
                let m = (b & ((1 << man) - 1)) as f64;
                let top: i32 = 0x7F >> man;
                if (ieee && e == top) || (!ieee && b & 0x7F == 0x7F) {
                    return None;
                }
                let mag = if e == 0 {
                    m / (1 << man) as f64 * 2f64.powi(1 - bias)
                } else {
                    (1.0 + m / (1 << man) as f64) * 2f64.powi(e - bias)
                };
                Some((b, if b & 0x80 != 0 { -mag } else { mag }))
            })
            .collect()
    }

    #[test]
    fn f8_known_values() {
        let enc = |d: DType, v: f32| from_f32(&[v], d).unwrap()[0];
        let dec = |d: DType, b: u8| to_f32(d, &[b]).unwrap()[0];
        let e4 = DType::F8E4M3;
        assert_eq!((dec(e4, 0x7E), dec(e4, 0xFE)), (448.0, -448.0));
        assert!(dec(e4, 0x7F).is_nan() && dec(e4, 0xFF).is_nan());
        assert_eq!(dec(e4, 0x01), 2f32.powi(-9), "smallest subnormal");
        assert_eq!(dec(e4, 0x08), 2f32.powi(-6), "smallest normal");
        assert_eq!(dec(e4, 0x38), 1.0);
        assert_eq!(enc(e4, 1.0), 0x38);
        assert_eq!(
            enc(e4, 1.0625),
            0x38,
            "halfway 1 .. 1.125: ties to even (1.0)"
        );
        assert_eq!(
            enc(e4, 1.1875),
            0x3A,
            "halfway 1.125 .. 1.25: ties to even (1.25)"
        );
        assert_eq!(
            enc(e4, 2f32.powi(-10)),
            0x00,
            "half the smallest subnormal: to even (0)"
        );
        assert_eq!(
            enc(e4, 3.0 * 2f32.powi(-10)),
            0x02,
            "1.5 subnormal steps: to even (2)"
        );
        assert_eq!((enc(e4, 500.0), enc(e4, -1e9)), (0x7E, 0xFE), "saturates");
        assert_eq!(enc(e4, f32::INFINITY), 0x7E);
        assert_eq!(enc(e4, f32::NAN) & 0x7F, 0x7F);
        assert_eq!(enc(e4, -0.0), 0x80);
        let e5 = DType::F8E5M2;
        assert_eq!(dec(e5, 0x7B), 57344.0);
        assert_eq!(dec(e5, 0x7C), f32::INFINITY);
        assert!(dec(e5, 0x7D).is_nan());
        assert_eq!(dec(e5, 0x01), 2f32.powi(-16));
        assert_eq!(enc(e5, 60000.0), 0x7B);
        assert_eq!(
            enc(e5, 1.125),
            0x3C,
            "halfway 1 .. 1.25: ties to even (1.0)"
        );
        assert_eq!(f8_max(e4), Some(448.0));
        assert_eq!(f8_max(e5), Some(57344.0));
    }

    #[test]
    fn f8_decoding_matches_the_bit_layout_and_round_trips() {
        for d in [DType::F8E4M3, DType::F8E5M2] {
            for (b, v) in f8_table(d) {
                assert_eq!(to_f32(d, &[b]).unwrap()[0] as f64, v, "{d} {b:#x}");
                let back = from_f32(&[v as f32], d).unwrap()[0];
                assert!(
                    back == b || (v == 0.0 && back & 0x7F == 0),
                    "{d} {b:#x} -> {back:#x}"
                );
            }
        }
    }

    #[test]
    fn f8_encoding_is_nearest_even_against_brute_force() {
        for d in [DType::F8E4M3, DType::F8E5M2] {
            let table = f8_table(d);
            let max = table.iter().map(|(_, v)| *v).fold(0.0, f64::max);
            let nearest = |v: f64| nearest_even(&table, v.clamp(-max, max)).1;
            let mut x: u64 = 0x2545F4914F6CDD1D;
            for i in 0..4000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // log-uniform magnitudes over the whole range and a bit beyond
                let mag = 2f64.powf((x >> 11) as f64 / (1u64 << 53) as f64 * 40.0 - 22.0);
                let v = if i % 2 == 0 { mag } else { -mag } as f32;
                let got = to_f32(d, &from_f32(&[v], d).unwrap()).unwrap()[0] as f64;
                let want = nearest(v as f64);
                assert!(
                    got == want || (got == 0.0 && want == 0.0),
                    "{d} {v}: got {got}, want {want}"
                );
            }
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
