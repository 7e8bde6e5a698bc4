//! SD's spatial transformer (diffusers' `Transformer2DModel`: GroupNorm, projection in,
//! `BasicTransformerBlock`s of self-attention, cross-attention and a GEGLU feed-forward,
//! projection out, plus the input) with our own CPU attention kernel.
//!
//! candle computes attention as two batched products around a softmax over the whole
//! `[batch · heads, queries, keys]` score tensor: 1 GiB per self-attention at SD1's outer level
//! (4096 tokens, 8 heads, batch 2), written, read and written again, on freshly faulted pages.
//! [`Attend`] instead walks blocks of [`QUERY_BLOCK`] queries of one head: their scores
//! (`QUERY_BLOCK × keys`, in cache) from one product, the softmax in place with a vectorised
//! exponential, and the output rows from a second product written straight into
//! `[batch, queries, heads · dim]`: no head transposes and no score tensor. Blocks run in
//! parallel; each block's arithmetic is the same whatever the thread count.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use rayon::prelude::*;

use crate::gen::bf16::{self, Lhs, Precision, Rhs, Start};
use crate::gen::blocks::{linear, Conv2d, Linear, GROUPS};
use crate::gen::cpu::{f32_slice, vectorized, with_scratch, SharedOut};
use crate::gen::norm::Norm;
use crate::gen::product::{product, Land, Operand};

/// Queries per block of [`Attend`]: their scores against 4096 keys fill 2 MiB, a core's L2
/// (64 and 256 measured the same within noise).
pub const QUERY_BLOCK: usize = 128;

/// Scaled dot-product attention over `heads` heads: `q [batch, queries, heads · dim]`,
/// `k` and `v` `[batch, keys, heads · dim]`, out `[batch, queries, heads · dim]` (f32, CPU).
#[derive(Debug, Clone, Copy)]
pub struct Attend {
    /// Attention heads.
    pub heads: usize,
    /// Products of bf16 operands ([`crate::gen::bf16`]): the softmax stays f32.
    pub bf16: bool,
}

impl CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "mergesmith-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, nq, width) = ql.shape().dims3()?;
        let (kb, nk, kw) = kl.shape().dims3()?;
        if kb != b || kw != width || vl.shape() != kl.shape() || width % self.heads.max(1) != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} over {} heads do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.heads
            );
        }
        let (q, k, v) = (
            f32_slice(qs, ql, "attention", "q")?,
            f32_slice(ks, kl, "attention", "k")?,
            f32_slice(vs, vl, "attention", "v")?,
        );
        let heads = self.heads;
        let d = width / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let blocks = nq.div_ceil(QUERY_BLOCK);
        if self.bf16 {
            let mut out = Vec::with_capacity(b * nq * width);
            // SAFETY: the blocks write every output (each head's columns of each query).
            unsafe {
                self.bf16_blocks((q, k, v), (b, nq, nk, width), SharedOut::spare(&mut out));
                out.set_len(b * nq * width);
            }
            return Ok((CpuStorage::F32(out), Shape::from((b, nq, width))));
        }
        let mut out = vec![0f32; b * nq * width];
        let dst = SharedOut::new(&mut out);
        (0..b * heads * blocks).into_par_iter().for_each(|job| {
            let (bh, block) = (job / blocks, job % blocks);
            let (batch, head) = (bh / heads, bh % heads);
            let r0 = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(nq - r0);
            let q = &q[(batch * nq + r0) * width + head * d..];
            let k = &k[batch * nk * width + head * d..];
            let v = &v[batch * nk * width + head * d..];
            with_scratch(rows * nk, |s| {
                // SAFETY: `q` rows `r0..r0 + rows` of one head (row stride `width`) times `k`'s
                // rows of that head transposed, into `s [rows, nk]`; then `s` times `v`'s rows
                // into output rows `r0..` of batch `batch`, columns `head · d ..+ d`, which no
                // other block writes. Every index stays inside the slices' `[.., n, width]`.
                unsafe {
                    let (q, k) = (Operand::rows(q, width), Operand::transposed(k, width));
                    let land = Land::Replace(scale);
                    product((rows, nk, d), s.as_mut_ptr(), nk, q, k, land, false);
                }
                for row in s.chunks_exact_mut(nk) {
                    softmax(row);
                }
                unsafe {
                    let out = dst.ptr().add((batch * nq + r0) * width + head * d);
                    let (p, v) = (Operand::rows(s, nk), Operand::rows(v, width));
                    product((rows, d, nk), out, width, p, v, Land::Replace(1.0), false);
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, nq, width))))
    }
}

impl Attend {
    /// [`Attend`]'s blocks with bf16 products: each head's keys and values packed once, then
    /// per block of queries the scores from one product, scaled and softmaxed in f32, and the
    /// output rows from a second product written into `dst`.
    ///
    /// # Safety
    /// `dst` must have room for `b · nq · width` f32 that nothing else accesses.
    unsafe fn bf16_blocks(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (b, nq, nk, width): (usize, usize, usize, usize),
        dst: SharedOut,
    ) {
        let heads = self.heads;
        let d = width / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let blocks = nq.div_ceil(QUERY_BLOCK);
        // Keys as the right operand `[d, nk]`, values as `[nk, d]`, per batch and head.
        let packed: Vec<(Rhs, Rhs)> = (0..b * heads)
            .into_par_iter()
            .map(|bh| {
                let (batch, head) = (bh / heads, bh % heads);
                let at = batch * nk * width + head * d;
                (
                    Rhs::pack_cols(&k[at..], d, nk, width),
                    Rhs::pack_rows(&v[at..], nk, d, width),
                )
            })
            .collect();
        (0..b * heads * blocks).into_par_iter().for_each(|job| {
            let (bh, block) = (job / blocks, job % blocks);
            let (batch, head) = (bh / heads, bh % heads);
            let r0 = block * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(nq - r0);
            let at = (batch * nq + r0) * width + head * d;
            let (keys, values) = &packed[bh];
            let lhs = Lhs::pack(&q[at..], rows, d, width);
            with_scratch(rows * nk, |s| {
                // SAFETY: `s` is `rows × nk` (written over); the output rows `r0..r0 + rows` of
                // batch `batch`, columns `head · d ..+ d` (row stride `width`) are this
                // block's alone. Attend runs bf16 only where AMX is available.
                unsafe { bf16::product(&lhs, keys, SharedOut::new(s), nk, Start::Zero) };
                // Softmax's numerators go into the packed operand; the output rows are divided
                // by their sums afterwards (d values a row instead of nk).
                let (p, inverse) = Lhs::pack_map(s, rows, nk, nk, |row, out| {
                    let mut sum = 0.0;
                    out.copy_from_slice(row);
                    numerators(out, scale, &mut sum);
                    1.0 / sum
                });
                let out = dst.offset(at);
                unsafe {
                    bf16::product(&p, values, out, width, Start::Zero);
                    for (r, &inv) in inverse.iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(out.ptr().add(r * width), d);
                        row.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            });
        });
    }
}

vectorized! {
    /// `row ← e^(scale · (row − max))`, softmax's numerators of `scale · row`, and their `sum`:
    /// the maximum and the sum over 16 lanes (element `i` in lane `i % 16`, lanes summed in
    /// order), so it vectorises and does not depend on the CPU.
    fn numerators(row: &mut [f32], scale: f32, sum: &mut f32) {
        const LANES: usize = 16;
        let (whole, tail) = row.split_at_mut(row.len() / LANES * LANES);
        let mut max = [f32::NEG_INFINITY; LANES];
        for chunk in whole.chunks_exact(LANES) {
            for (m, &v) in max.iter_mut().zip(chunk) {
                *m = m.max(v);
            }
        }
        let max = max.iter().chain(tail.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; LANES];
        for chunk in whole.chunks_exact_mut(LANES) {
            for (s, v) in lanes.iter_mut().zip(chunk) {
                *v = exp(scale * (*v - max));
                *s += *v;
            }
        }
        let mut total = lanes.iter().sum::<f32>();
        for v in tail.iter_mut() {
            *v = exp(scale * (*v - max));
            total += *v;
        }
        *sum = total;
    }
}

vectorized! {
    /// `row` replaced by its softmax ([`numerators`], then divided by their sum).
    fn softmax(row: &mut [f32]) {
        let mut sum = 0.0;
        numerators(row, 1.0, &mut sum);
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// e^x within 2 ulp of the correctly rounded value for x in [−87, 88] (x is clamped to
/// that range: e^−87 ≈ 1.6e−38 is as good as 0 next to a softmax row's maximum's 1): e^x = 2^n · e^r with n = round(x / ln 2), r = x − n · ln 2
/// (ln 2 in two parts), e^r by its degree-7 Taylor polynomial on |r| ≤ ln 2 / 2, 2^n built
/// in the exponent bits. Branch-free, so it vectorises.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = r.mul_add(1.0 / 5040.0, 1.0 / 720.0);
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    // n (in −126..=127) from t's bits, moved into the exponent: 2^n, with no float-to-int
    // conversion (which would not vectorise).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// One attention layer (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    bf16: bool,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context: usize,
        heads: usize,
        p: Precision,
    ) -> Result<Attention> {
        Ok(Attention {
            to_q: linear(vb.pp("to_q"), (dim, dim), false, p)?,
            to_k: linear(vb.pp("to_k"), (context, dim), false, p)?,
            to_v: linear(vb.pp("to_v"), (context, dim), false, p)?,
            to_out: linear(vb.pp("to_out").pp(0), (dim, dim), true, p)?,
            heads,
            bf16: p == Precision::Bf16,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = if x.device().is_cpu() && q.dtype() == DType::F32 {
            let op = Attend {
                heads: self.heads,
                bf16: self.bf16,
            };
            q.contiguous()?
                .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?
        } else {
            reference_attention(&q, &k, &v, self.heads)?
        };
        self.to_out.forward(&out)
    }
}

/// Attention by candle's tensor ops (devices other than the CPU, other dtypes), softmax in
/// f32: `softmax(q kᵀ / √d) v` per head.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, w) = t.dims3()?;
        t.reshape((b, n, heads, w / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (b, nq, w) = q.dims3()?;
    let dtype = q.dtype();
    let scale = 1.0 / ((w / heads) as f64).sqrt();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, w))
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward,
/// each after a LayerNorm and added to its input.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    geglu: Linear,
    ff_out: Linear,
}

impl Block {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context: usize,
        heads: usize,
        p: Precision,
    ) -> Result<Block> {
        let ff = vb.pp("ff").pp("net");
        Ok(Block {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, p)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context, heads, p)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            geglu: linear(ff.pp(0).pp("proj"), (dim, 8 * dim), true, p)?,
            ff_out: linear(ff.pp(2), (4 * dim, dim), true, p)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, &h)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + x)?;
        let ff = geglu(&self.geglu.forward(&self.norm3.forward(&x)?)?)?;
        self.ff_out.forward(&ff)? + x
    }
}

/// GEGLU's gating of `h [.., 2n]`: `h[.., :n] · GELU(h[.., n:])` with the exact (erf)
/// GELU, as diffusers. On the CPU in f32 one pass over contiguous rows ([`Geglu`]); elsewhere
/// candle's ops.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        return h.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let gates = h.chunk(2, candle_core::D::Minus1)?;
    &gates[0] * gates[1].gelu_erf()?
}

/// The CPU kernel of [`geglu`].
#[derive(Debug, Clone, Copy)]
pub struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "mergesmith-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l, "geglu", "input")?;
        let mut dims = l.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("geglu: an odd last dimension in {:?}", l.shape());
        }
        let n = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let mut out = vec![0f32; h.len() / 2];
        if n > 0 {
            out.par_chunks_mut(n)
                .zip(h.par_chunks(width))
                .for_each(|(o, row)| gate(o, &row[..n], &row[n..]));
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

vectorized! {
    /// `out = a · GELU(g)`.
    fn gate(out: &mut [f32], a: &[f32], g: &[f32]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            *o = a * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2)));
        }
    }
}

/// erf(x) within 6e-7 (absolute; Abramowitz and Stegun's 7.1.26 is within 1.5e-7, the rest
/// is f32 rounding, measured 5.6e-7 on [−3, 3]): 1 − t·P(t)·e^(−x²)
/// with t = 1 / (1 + p·|x|), sign restored; branch-free with [`exp`], so it vectorises.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / P.mul_add(ax, 1.0);
    let poly = A[4].mul_add(t, A[3]);
    let poly = poly.mul_add(t, A[2]);
    let poly = poly.mul_add(t, A[1]);
    let poly = poly.mul_add(t, A[0]) * t;
    let y = 1.0 - poly * exp(-ax * ax);
    y.copysign(x)
}

/// A projection in or out of the transformer: a 1×1 convolution (SD1) or a linear layer
/// (SD2, SDXL).
#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` as SD's U-Net uses it.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: Norm,
    proj_in: Proj,
    blocks: Vec<Block>,
    proj_out: Proj,
}

impl SpatialTransformer {
    /// Loads a transformer over `channels` with `depth` blocks of `heads` heads attending to
    /// a context `context` wide; `linear_projection`: linear projections rather than 1×1
    /// convolutions; products in bf16 under `p` bf16.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context: usize,
        linear_projection: bool,
        p: Precision,
    ) -> Result<SpatialTransformer> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(match linear_projection {
                true => Proj::Linear(linear(vb.pp(name), (channels, channels), true, p)?),
                false => Proj::Conv(Conv2d::new(vb.pp(name), (channels, channels, 1), 1, 0, p)?),
            })
        };
        let tb = vb.pp("transformer_blocks");
        Ok(SpatialTransformer {
            norm: Norm::new(vb.pp("norm"), GROUPS, channels, 1e-6, false)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| Block::new(tb.pp(i), channels, context, heads, p))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// The transformer's output for `x [batch, channels, h, w]` attending to `context
    /// [batch, tokens, width]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // [b, c, h, w] <-> [b, h·w, c]
        let tokens = |t: &Tensor| t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let image = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let mut t = match &self.proj_in {
            Proj::Conv(p) => tokens(&p.forward(&normed)?)?,
            Proj::Linear(p) => p.forward(&tokens(&normed)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&image(&t)?)?,
            Proj::Linear(p) => image(&p.forward(&t)?)?,
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::cpu::testing::{flat, values};
    use candle_core::Device;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            let ulp = (want as f32).to_bits();
            let ulp = f32::from_bits(ulp + 1) as f64 - f32::from_bits(ulp) as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(-200.0), exp(-87.0));
        assert_eq!(exp(0.0), 1.0);
    }

    /// erf in f64 by its Taylor series: for |x| ≤ 3 its largest term is ~3e3, so f64 keeps
    /// ~1e-12 absolute.
    fn erf64(x: f64) -> f64 {
        assert!(x.abs() <= 3.0);
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_6e7_of_f64_and_geglu_gates_the_first_half() {
        let mut worst = 0f64;
        let mut x = -3.0f32;
        while x <= 3.0 {
            worst = worst.max((erf(x) as f64 - erf64(x as f64)).abs());
            x += 0.001_3;
        }
        eprintln!("worst erf error on [-3, 3]: {worst:e}");
        assert!(worst < 6e-7, "worst erf error {worst}");
        // Beyond 3, 1 − erf(x) < 2.3e-5: the tail is 1 within that, and odd.
        for x in [3.5f32, 4.0, 5.0, 9.0, 40.0] {
            assert!(
                (erf(x) - 1.0).abs() < 2.3e-5 && erf(-x) == -erf(x),
                "erf({x})"
            );
        }
        // [1, 2, 2·3]: rows (a | g); out = a · g/2 · (1 + erf(g/√2)).
        let h: Vec<f32> = vec![
            1.0, -2.0, 0.5, 0.3, 1.7, -4.0, 3.0, 0.0, -1.0, 2.5, -0.2, 9.0,
        ];
        let t = Tensor::from_vec(h.clone(), (1, 2, 6), &Device::Cpu).unwrap();
        let got = geglu(&t).unwrap();
        assert_eq!(got.dims(), &[1, 2, 3]);
        let got = flat(&got);
        for (i, row) in h.chunks(6).enumerate() {
            for j in 0..3 {
                let (a, g) = (row[j] as f64, row[3 + j] as f64);
                let e = match g.abs() > 3.0 * 2f64.sqrt() {
                    true => g.signum(),
                    false => erf64(g / 2f64.sqrt()),
                };
                let want = a * g / 2.0 * (1.0 + e);
                let g = got[i * 3 + j] as f64;
                assert!(
                    (g - want).abs() < 1e-6 * want.abs().max(1.0),
                    "{i},{j}: {g} vs {want}"
                );
            }
        }
    }

    /// Attention in f64, head by head.
    fn reference(q: &[f32], k: &[f32], v: &[f32], dims: (usize, usize, usize, usize)) -> Vec<f64> {
        let (b, nq, nk, heads) = dims;
        let w = q.len() / (b * nq);
        let d = w / heads;
        let mut out = vec![0f64; b * nq * w];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    let s: Vec<f64> = (0..nk)
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    q[(bi * nq + i) * w + h * d + e] as f64
                                        * k[(bi * nk + j) * w + h * d + e] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        out[(bi * nq + i) * w + h * d + c] = (0..nk)
                            .map(|j| e[j] / z * v[(bi * nk + j) * w + h * d + c] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_an_f64_reference_and_candles_ops() {
        // Self-attention over more queries than a block (a short last block) and
        // cross-attention to 77 tokens; scores up to ±8 so the softmax is far from uniform.
        for (i, &(b, nq, nk, heads, d)) in
            [(2, 150, 150, 3, 8), (1, 70, 77, 2, 16)].iter().enumerate()
        {
            let w = heads * d;
            // Scores Σ q·k / √d reach √d · s² = 8.
            let s = (8.0 / (d as f32).sqrt()).sqrt();
            let (qv, kv, vv) = (
                values(b * nq * w, 10 * i as u32 + 1, s),
                values(b * nk * w, 10 * i as u32 + 2, s),
                values(b * nk * w, 10 * i as u32 + 3, 1.0),
            );
            let dev = Device::Cpu;
            let q = Tensor::from_vec(qv.clone(), (b, nq, w), &dev).unwrap();
            let k = Tensor::from_vec(kv.clone(), (b, nk, w), &dev).unwrap();
            let v = Tensor::from_vec(vv.clone(), (b, nk, w), &dev).unwrap();
            let got = q
                .apply_op3_no_bwd(&k, &v, &Attend { heads, bf16: false })
                .unwrap();
            assert_eq!(got.dims(), &[b, nq, w]);
            let got = flat(&got);
            let want = reference(&qv, &kv, &vv, (b, nq, nk, heads));
            for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                // Outputs are weighted means of values in [-1, 1]: 1e-5 absolute.
                assert!(
                    (*g as f64 - r).abs() < 1e-5,
                    "case {i} value {j}: {g} vs {r}"
                );
            }
            let theirs = flat(&reference_attention(&q, &k, &v, heads).unwrap());
            for (g, t) in got.iter().zip(&theirs) {
                assert!((g - t).abs() < 1e-5, "case {i}: {g} vs candle {t}");
            }
        }
    }
}
