//! 2-D convolution on the CPU for generation: the U-Net's and the VAE's 3×3 and 1×1
//! convolutions as matrix products over an im2col tile, written straight into the output.
//!
//! candle's CPU `conv2d` gathers its im2col tiles one scalar at a time in a strided scatter
//! and copies every product back out, which took more time than the products themselves
//! (`perf` of a full-size SD1 image: 70 % of it in `conv2d_tiled`). Here a tile is a band of
//! whole output rows: each of its `c_in · k_h · k_w` im2col rows is built from contiguous row
//! copies of the input (for stride 1), the product `weight [c_out, K] · tile [K, pixels]`
//! accumulates onto the bias already in the output, and bands run in parallel. The tile size depends on the shapes
//! alone, so results do not depend on the number of threads.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gen::bf16::{self, Lhs, Rhs, RowBias, Start};
use crate::gen::cpu::{f32_slice, with_scratch, SharedOut};
use crate::gen::product::{product, Land, Operand};

/// The im2col tile's size (`K × pixels` f32), at most: whole output rows up to 8 MiB, so the
/// weights are packed once per few hundred pixels rather than per row.
const TILE_BYTES: usize = 8 << 20;

/// A convolution's geometry (square kernels, equal stride and padding in both directions,
/// no dilation, one group: every convolution of SD's U-Net and VAE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Conv {
    /// `x [n, c_in, h, w]` convolved with `weight [c_out, c_in, k, k]` plus `bias [c_out]`,
    /// all f32 on the CPU.
    pub fn forward(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        x.apply_op3_no_bwd(weight, bias, self)
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "mergesmith-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c_in, h, w) = xl.shape().dims4()?;
        let (c_out, w_in, kh, kw) = wl.shape().dims4()?;
        if w_in != c_in || kh != kw || bl.shape().dims1()? != c_out {
            candle_core::bail!(
                "conv: input {:?}, weight {:?}, bias {:?} do not fit",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        let (x, weight, bias) = (
            f32_slice(xs, xl, "conv", "input")?,
            f32_slice(ws, wl, "conv", "weight")?,
            f32_slice(bs, bl, "conv", "bias")?,
        );
        let (out, shape) = self.run(x, (n, c_in, h, w), Weight::F32(weight, bias), kh)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// A convolution's weight `[c_out, c_in · k · k]` and bias: f32 values, or packed for bf16
/// products with the bias as their starting table.
#[derive(Clone, Copy)]
enum Weight<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a Lhs, &'a RowBias),
}

impl Conv {
    /// Runs over `x [n, c_in, h, w]` with a square `kernel`: the output and its shape.
    fn run(
        &self,
        x: &[f32],
        (n, c_in, h, w): (usize, usize, usize, usize),
        weight: Weight,
        kernel: usize,
    ) -> Result<(Vec<f32>, Shape)> {
        let c_out = match weight {
            Weight::F32(_, bias) => bias.len(),
            Weight::Bf16(lhs, _) => lhs.rows(),
        };
        let (kh, kw) = (kernel, kernel);
        let (s, p) = (self.stride.max(1), self.padding);
        if h + 2 * p < kh || w + 2 * p < kw {
            candle_core::bail!("conv: a {kh}x{kw} kernel does not fit a {h}x{w} input");
        }
        let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
        let (k, hw) = (c_in * kh * kw, oh * ow);
        if let Weight::Bf16(lhs, _) = weight {
            if lhs.k() != k {
                candle_core::bail!("conv: a packed weight of {} values for {k}", lhs.k());
            }
        }
        // f32: the bias in every output, the products added onto it; bf16: the products start
        // from the bias table and write every output.
        let mut out = Vec::with_capacity(n * c_out * hw);
        if let Weight::F32(_, bias) = weight {
            for _ in 0..n {
                for &b in bias {
                    out.extend(std::iter::repeat_n(b, hw));
                }
            }
        }
        let direct = kh == 1 && kw == 1 && s == 1 && p == 0;
        // Whole output rows per tile; a 1×1 convolution reads the input itself.
        let rows = match direct {
            true => oh,
            false => (TILE_BYTES / 4 / k / ow).clamp(1, oh),
        };
        let bands = oh.div_ceil(rows);
        let dst = SharedOut::spare(&mut out);
        let geometry = Geometry {
            c_in,
            h,
            w,
            kh,
            kw,
            s,
            p,
            ow,
        };
        (0..n * bands).into_par_iter().for_each(|job| {
            let (b, band) = (job / bands, job % bands);
            let y0 = band * rows;
            let y1 = (y0 + rows).min(oh);
            let pixels = (y1 - y0) * ow;
            let input = &x[b * c_in * h * w..(b + 1) * c_in * h * w];
            let at = dst.offset(b * c_out * hw + y0 * ow);
            // SAFETY: `dst` points at `n · c_out · hw` initialised f32; this tile writes
            // rows `c_out` of batch `b`, columns `y0 · ow .. y1 · ow`, which no other tile
            // touches, with row stride `hw`; `weight` is `[c_out, k]` and the right-hand
            // side `[k, pixels]`, both with the strides given. bf16 weights exist only
            // where AMX is available.
            let weight = match weight {
                Weight::F32(weight, _) => weight,
                Weight::Bf16(lhs, bias) => {
                    // The im2col rows go straight into the packed operand, two at a time.
                    let rhs = match direct {
                        true => Rhs::pack_rows(input, k, pixels, hw),
                        false => Rhs::pack_row_pairs(k, pixels, |r, row| {
                            geometry.im2col_row(input, y0, y1, r, row)
                        }),
                    };
                    return unsafe { bf16::product(lhs, &rhs, at, hw, Start::Rows(bias)) };
                }
            };
            let multiply = |rhs: &[f32], rhs_rs: usize| unsafe {
                let (lhs, rhs) = (Operand::rows(weight, k), Operand::rows(rhs, rhs_rs));
                product((c_out, pixels, k), at.ptr(), hw, lhs, rhs, Land::Add, true)
            };
            if direct {
                return multiply(input, hw);
            }
            with_scratch(k * pixels, |tile| {
                geometry.im2col(input, y0, y1, tile);
                multiply(tile, pixels);
            });
        });
        // SAFETY: the bands wrote every output (f32: it was initialised with the bias).
        unsafe { out.set_len(n * c_out * hw) };
        Ok((out, Shape::from((n, c_out, oh, ow))))
    }
}

/// [`Conv`] with its weight and bias packed for bf16 products ([`crate::gen::bf16`]): `x`
/// f32 on the CPU.
#[derive(Debug, Clone)]
pub struct ConvBf16 {
    /// The geometry.
    pub conv: Conv,
    /// The weight `[c_out, c_in · k · k]`.
    pub weight: Arc<Lhs>,
    /// The bias, as the products' starting table.
    pub bias: Arc<RowBias>,
    /// The kernel's size.
    pub kernel: usize,
}

impl ConvBf16 {
    /// Packs `weight [c_out, c_in, k, k]` and `bias [c_out]` (f32 on the CPU).
    pub fn new(conv: Conv, weight: &Tensor, bias: &Tensor) -> Result<ConvBf16> {
        let (c_out, c_in, kernel, _) = weight.dims4()?;
        let k = c_in * kernel * kernel;
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias.to_vec1::<f32>()?;
        if bias.len() != c_out {
            candle_core::bail!("conv: {} biases for {c_out} outputs", bias.len());
        }
        Ok(ConvBf16 {
            conv,
            weight: Arc::new(Lhs::pack(&values, c_out, k, k)),
            bias: Arc::new(RowBias::new(&bias)),
            kernel,
        })
    }

    /// `x [n, c_in, h, w]` convolved, plus the bias.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for ConvBf16 {
    fn name(&self) -> &'static str {
        "mergesmith-conv2d-bf16"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims4()?;
        let x = f32_slice(xs, xl, "conv", "input")?;
        if self.weight.k() != dims.1 * self.kernel * self.kernel {
            candle_core::bail!(
                "conv: input {:?} for a {}-value kernel",
                xl.shape(),
                self.weight.k()
            );
        }
        let weight = Weight::Bf16(&self.weight, &self.bias);
        let (out, shape) = self.conv.run(x, dims, weight, self.kernel)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The shapes im2col needs.
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ow: usize,
}

impl Geometry {
    /// Fills `tile` (`[c_in · kh · kw, (y1 - y0) · ow]`) with the input patches of output
    /// rows `y0..y1`: row `(c · kh + ky) · kw + kx`, column `(y - y0) · ow + ox` holds
    /// `input[c, y · s + ky − p, ox · s + kx − p]`, zero outside the input.
    fn im2col(&self, input: &[f32], y0: usize, y1: usize, tile: &mut [f32]) {
        let pixels = (y1 - y0) * self.ow;
        let rows = self.c_in * self.kh * self.kw;
        for (r, row) in tile.chunks_exact_mut(pixels).enumerate().take(rows) {
            self.im2col_row(input, y0, y1, r, row);
        }
    }

    /// Row `r` of [`Self::im2col`]'s tile into `row`, every element written (zeros outside
    /// the input).
    fn im2col_row(&self, input: &[f32], y0: usize, y1: usize, r: usize, row: &mut [f32]) {
        let &Geometry {
            c_in: _,
            h,
            w,
            kh,
            kw,
            s,
            p,
            ow,
        } = self;
        let (c, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
        let plane = &input[c * h * w..(c + 1) * h * w];
        // Output columns whose input column `ox · s + kx − p` lies in `0..w`.
        let first = p.saturating_sub(kx).div_ceil(s).min(ow);
        let end = ((w + p).saturating_sub(kx)).div_ceil(s).min(ow).max(first);
        for y in y0..y1 {
            let dst = &mut row[(y - y0) * ow..(y - y0 + 1) * ow];
            let iy = (y * s + ky).checked_sub(p).filter(|&iy| iy < h);
            let Some(iy) = iy.filter(|_| first < end) else {
                dst.fill(0.0);
                continue;
            };
            let src = &plane[iy * w..(iy + 1) * w];
            let start = first * s + kx - p;
            dst[..first].fill(0.0);
            dst[end..].fill(0.0);
            if s == 1 {
                dst[first..end].copy_from_slice(&src[start..start + end - first]);
            } else {
                for (d, v) in dst[first..end]
                    .iter_mut()
                    .zip(src[start..].iter().step_by(s))
                {
                    *d = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::cpu::testing::{flat, values};
    use candle_core::Device;

    /// A straightforward f64 convolution: out[b, o, y, x] = bias[o] + Σ w[o, c, ky, kx] ·
    /// in[b, c, y·s + ky − p, x·s + kx − p].
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        (o, k): (usize, usize),
        bias: &[f32],
        s: usize,
        p: usize,
    ) -> Vec<f64> {
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut out = vec![0f64; n * o * oh * ow];
        for b in 0..n {
            for oc in 0..o {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = bias[oc] as f64;
                        for ic in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (y * s + ky) as isize - p as isize;
                                    let ix = (xx * s + kx) as isize - p as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let v = x[((b * c + ic) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((oc * c + ic) * k + ky) * k + kx];
                                    acc += v as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * o + oc) * oh + y) * ow + xx] = acc;
                    }
                }
            }
        }
        out
    }

    /// Case `i`'s input, weight and bias values (seeds from `seed`), as tensors too, and its
    /// geometry: `(batch, c_in, h, w, c_out, kernel, stride, padding)`.
    #[allow(clippy::type_complexity)]
    fn case(
        (n, c, h, w, o, k, s, p): (usize, usize, usize, usize, usize, usize, usize, usize),
        seed: u32,
    ) -> ([Vec<f32>; 3], [Tensor; 3], Conv) {
        let (xv, wv, bv) = (
            values(n * c * h * w, seed, 1.0),
            values(o * c * k * k, seed + 1, 1.0),
            values(o, seed + 2, 1.0),
        );
        let dev = Device::Cpu;
        let x = Tensor::from_vec(xv.clone(), (n, c, h, w), &dev).unwrap();
        let wt = Tensor::from_vec(wv.clone(), (o, c, k, k), &dev).unwrap();
        let b = Tensor::from_vec(bv.clone(), o, &dev).unwrap();
        let conv = Conv {
            stride: s,
            padding: p,
        };
        ([xv, wv, bv], [x, wt, b], conv)
    }

    #[test]
    fn matches_an_f64_convolution_for_every_geometry_sd_uses() {
        // (batch, c_in, h, w, c_out, kernel, stride, padding): 3×3 same-size, the strided
        // downsampler (odd and even sizes), 1×1 projections and shortcuts, a kernel-sized
        // input, and a padded 1×1.
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 3, 8, 8, 4, 3, 2, 1),
            (1, 3, 9, 11, 4, 3, 2, 1),
            (2, 7, 5, 6, 3, 1, 1, 0),
            (1, 2, 3, 3, 2, 3, 1, 0),
            (1, 2, 4, 5, 3, 1, 1, 1),
            (1, 4, 10, 3, 5, 3, 2, 0),
        ];
        for (i, &(n, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
            let ([xv, wv, bv], [x, wt, b], conv) = case(cases[i], 3 * i as u32);
            let got = conv.forward(&x, &wt, &b).unwrap();
            let want = reference(&xv, (n, c, h, w), &wv, (o, k), &bv, s, p);
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            assert_eq!(got.dims(), &[n, o, oh, ow], "case {i}");
            let got = flat(&got);
            // f32 products over at most c·k² = 45 terms of size ≤ 1: 1e-5 absolute.
            for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - r).abs() < 1e-5,
                    "case {i} value {j}: {g} vs {r}"
                );
            }
            // candle's own convolution agrees as well.
            let cfg = (p, s, 1, 1);
            let theirs = x
                .conv2d(&wt, cfg.0, cfg.1, cfg.2, cfg.3)
                .and_then(|t| t.broadcast_add(&b.reshape((1, o, 1, 1))?))
                .unwrap();
            let theirs = flat(&theirs);
            for (g, t) in got.iter().zip(&theirs) {
                assert!((g - t).abs() < 1e-5, "case {i}: {g} vs candle {t}");
            }
        }
    }

    #[test]
    fn bf16_convolutions_match_f64_sums_of_the_rounded_operands() {
        if !crate::gen::bf16::available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        let r = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| crate::gen::bf16::widen(crate::gen::bf16::round(x)))
                .collect()
        };
        // 3×3 same-size (odd k = 45: a padded pair and tile), strided, 1×1 direct, and a
        // larger map (edge blocks of 33 outputs and 2304 pixels).
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 3, 9, 11, 4, 3, 2, 1),
            (2, 7, 5, 6, 3, 1, 1, 0),
            (1, 40, 48, 48, 33, 3, 1, 1),
        ];
        for (i, &(n, c, h, w, o, k, s, p)) in cases.iter().enumerate() {
            let ([xv, wv, bv], [x, wt, b], conv) = case(cases[i], 5 * i as u32);
            let got = flat(&ConvBf16::new(conv, &wt, &b).unwrap().forward(&x).unwrap());
            let want = reference(&r(&xv), (n, c, h, w), &r(&wv), (o, k), &bv, s, p);
            assert_eq!(got.len(), want.len(), "case {i}");
            // f32 accumulation of ≤ 360 exact products of size ≤ 1: 2e-4 absolute.
            for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - r).abs() < 2e-4,
                    "case {i} value {j}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn large_maps_split_into_bands_and_give_the_same_values() {
        // 96 channels × 9 = 864 rows: an 8 MiB tile holds 2427 pixels, i.e. 37 rows of 64:
        // several bands, the last one short.
        let (n, c, h, w, o) = (1, 96, 64, 64, 8);
        let ([xv, wv, bv], [x, wt, b], conv) = case((n, c, h, w, o, 3, 1, 1), 7);
        let got = conv.forward(&x, &wt, &b).unwrap();
        let got = flat(&got);
        let want = reference(&xv, (n, c, h, w), &wv, (o, 3), &bv, 1, 1);
        // 864 terms of size ≤ 1 in f32: 1e-4 absolute.
        for (j, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - r).abs() < 1e-4, "value {j}: {g} vs {r}");
        }
    }
}
