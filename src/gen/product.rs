//! f32 matrix products on the CPU whose sums are the same on every machine.
//!
//! The `gemm` crate sizes its depth blocks from the CPU's L1 cache (1024 terms on a 48 KiB
//! 12-way L1 with AVX-512, 512 on a 32 KiB 8-way one) and, for a single row or column or a
//! tiny output with both operands contiguous along the depth, takes dot-product paths that
//! sum SIMD lanes (8 or 16 wide, whatever the CPU has). Either changes the rounding, so the
//! same image came out a few ulps apart on different CPUs. [`product`] fixes the order: each
//! output is a sequence of fused multiply-adds from zero over depth chunks of [`DEPTH`] terms
//! taken in order, each chunk's sum added to the output. It runs `gemm`'s general kernel
//! (which sums exactly so) one chunk at a time, and a scalar loop with the same operations
//! where `gemm` would take another path. Tested bit for bit against that definition.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use crate::gen::cpu::f32_slice;

/// Terms per depth chunk: `gemm` sums a chunk this long in one pass on every CPU (its depth
/// blocks are never shorter than 512).
pub const DEPTH: usize = 512;

/// A matrix operand: where it starts and its row and column strides, in f32.
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    /// The first element.
    pub ptr: *const f32,
    /// Stride between rows.
    pub rs: isize,
    /// Stride between columns.
    pub cs: isize,
}

impl Operand {
    /// A row-major matrix with `cols` columns.
    pub fn rows(v: &[f32], cols: usize) -> Operand {
        Operand {
            ptr: v.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns (a linear layer's `[out, in]`
    /// weight read as `[in, out]`).
    pub fn transposed(v: &[f32], cols: usize) -> Operand {
        Operand {
            ptr: v.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }

    /// Element `(r, c)`.
    ///
    /// # Safety
    /// It must be inside the operand's memory.
    unsafe fn at(self, r: usize, c: usize) -> f32 {
        *self.ptr.offset(r as isize * self.rs + c as isize * self.cs)
    }

    /// The operand from column `c` on.
    fn skip_cols(self, c: usize) -> Operand {
        Operand {
            ptr: self.ptr.wrapping_offset(c as isize * self.cs),
            ..self
        }
    }

    /// The operand from row `r` on.
    fn skip_rows(self, r: usize) -> Operand {
        Operand {
            ptr: self.ptr.wrapping_offset(r as isize * self.rs),
            ..self
        }
    }
}

/// How a product's sums land in its output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Land {
    /// The output becomes `scale ·` the sum: within one chunk the scale multiplies its sum;
    /// deeper, the chunks' sums are added up first and the total is scaled.
    Replace(f32),
    /// Each chunk's sum is added to what the output holds (a bias, say).
    Add,
}

/// `dst[i, j] (row stride dst_rs) ← Σ_kk a[i, kk] · b[kk, j]` for `i < m`, `j < n`, landing as
/// `land` says, summed as the module says. `parallel`: `gemm` may split the output over
/// rayon's threads (the sums stay the same).
///
/// # Safety
/// `a` must cover `m × k`, `b` `k × n` and `dst` `m` rows of `n` with stride `dst_rs`, which
/// nothing else accesses during the call (it may hold anything under `Land::Replace`).
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    a: Operand,
    b: Operand,
    land: Land,
    parallel: bool,
) {
    if let Land::Replace(scale) = land {
        if scale != 1.0 && k > DEPTH {
            // Deeper than a chunk: the whole sum first, then the scale.
            product((m, n, k), dst, dst_rs, a, b, Land::Replace(1.0), parallel);
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) *= scale;
                }
            }
            return;
        }
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if let Land::Replace(_) = land {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    let threads = match parallel {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    for (c, k0) in (0..k).step_by(DEPTH).enumerate() {
        let kc = DEPTH.min(k - k0);
        let (a, b) = (a.skip_cols(k0), b.skip_rows(k0));
        let (read, scale) = match (land, c) {
            (Land::Replace(scale), 0) => (false, scale),
            _ => (true, 1.0),
        };
        // `gemm` would sum lanes for one row or column, a depth of 1 or 2, or a small output
        // with both operands contiguous along the depth.
        let other_path = m <= 1 || n <= 1 || kc <= 2 || (a.cs == 1 && b.rs == 1 && m * n <= 256);
        if other_path {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f32;
                    for kk in 0..kc {
                        s = a.at(i, kk).mul_add(b.at(kk, j), s);
                    }
                    let d = dst.add(i * dst_rs + j);
                    *d = match read {
                        true => *d + s,
                        false => scale * s,
                    };
                }
            }
            continue;
        }
        gemm::gemm(
            m,
            n,
            kc,
            dst,
            1,
            dst_rs as isize,
            read,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            scale,
            false,
            false,
            false,
            threads,
        );
    }
}

/// `a [.., m, k] · b` for CPU f32 tensors with the same leading dimensions, `b` being
/// `[.., k, n]`, or `[.., n, k]` read transposed when `transpose_b`; other tensors go to
/// candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    let cpu = a.device().is_cpu() && a.dtype() == candle_core::DType::F32;
    if !cpu {
        return match transpose_b {
            true => a.matmul(&b.t()?),
            false => a.matmul(b),
        };
    }
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &Matmul { transpose_b })
}

/// The CPU kernel of [`matmul`].
#[derive(Debug, Clone, Copy)]
struct Matmul {
    transpose_b: bool,
}

impl candle_core::CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "mergesmith-matmul"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            f32_slice(sa, la, "matmul", "a")?,
            f32_slice(sb, lb, "matmul", "b")?,
        );
        let (da, db) = (la.shape().dims(), lb.shape().dims());
        fn split(d: &[usize]) -> Option<(&[usize], usize, usize)> {
            match d.len() {
                0 | 1 => None,
                n => Some((&d[..n - 2], d[n - 2], d[n - 1])),
            }
        }
        let (Some((lead, m, k)), Some((lead_b, r, c))) = (split(da), split(db)) else {
            candle_core::bail!("matmul: operands of shapes {da:?} and {db:?}");
        };
        let (kb, n) = match self.transpose_b {
            true => (c, r),
            false => (r, c),
        };
        if lead != lead_b || k != kb {
            candle_core::bail!(
                "matmul: shapes {da:?} and {db:?} do not multiply (transposed: {})",
                self.transpose_b
            );
        }
        let batches: usize = lead.iter().product();
        // Left uninitialised: the products replace every output.
        let mut out: Vec<f32> = Vec::with_capacity(batches * m * n);
        for i in 0..batches {
            let a = Operand::rows(&a[i * m * k..], k);
            let b = &b[i * k * n..];
            let b = match self.transpose_b {
                true => Operand::transposed(b, k),
                false => Operand::rows(b, n),
            };
            let o = out.as_mut_ptr().wrapping_add(i * m * n);
            // SAFETY: `a` is `m × k`, `b` `k × n` (or `n × k` transposed); `o` has room for
            // `m × n`, which the product writes in full.
            unsafe { product((m, n, k), o, n, a, b, Land::Replace(1.0), true) };
        }
        // SAFETY: every batch's `m × n` outputs were written above.
        unsafe { out.set_len(batches * m * n) };
        let mut dims = lead.to_vec();
        dims.extend([m, n]);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::cpu::testing::{on_threads, values};

    /// The definition, written out: per output, fused multiply-adds from zero over each chunk
    /// of `DEPTH` terms in order, each chunk's sum added to the start (or the first replacing
    /// it), the scale applied to a one-chunk sum or else to the total.
    fn reference(
        a: &[f32],
        b: &[f32],
        start: Option<&[f32]>,
        (m, n, k): (usize, usize, usize),
        b_transposed: bool,
        scale: f32,
    ) -> Vec<f32> {
        let bv = |kk: usize, j: usize| match b_transposed {
            true => b[j * k + kk],
            false => b[kk * n + j],
        };
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut d = start.map_or(0.0, |s| s[i * n + j]);
                for (c, k0) in (0..k).step_by(DEPTH).enumerate() {
                    let mut s = 0f32;
                    for kk in k0..(k0 + DEPTH).min(k) {
                        s = a[i * k + kk].mul_add(bv(kk, j), s);
                    }
                    d = match (start, c) {
                        (None, 0) if k <= DEPTH => scale * s,
                        (None, 0) => s,
                        _ => d + s,
                    };
                }
                out[i * n + j] = match (start, k <= DEPTH) {
                    (None, false) => d * scale,
                    _ => d,
                };
            }
        }
        out
    }

    #[test]
    fn products_follow_the_definition_bit_for_bit_on_every_path() {
        // One row (gemm's dot products), a small output with both operands contiguous along
        // the depth (its horizontal kernel), depths of 1, 2, one chunk plus 1 and several
        // chunks, odd edges, and the large general case.
        let shapes = [
            (1, 1280, 1280),
            (2, 1280, 1280),
            (1, 1, 700),
            (3, 77, 64),
            (7, 5, 2),
            (9, 33, 1),
            (5, 7, 513),
            (77, 768, 768),
            (64, 64, 1300),
            (130, 77, 40),
            (300, 200, 1030),
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let seed = 7 * i as u32;
            let (a, b, start) = (
                values(m * k, seed, 1.0),
                values(k * n, seed + 1, 1.0),
                values(m * n, seed + 2, 1.0),
            );
            for transposed in [false, true] {
                let op_b = match transposed {
                    true => Operand::transposed(&b, k),
                    false => Operand::rows(&b, n),
                };
                let cases = [
                    (Land::Replace(1.0), None),
                    (Land::Add, Some(&start[..])),
                    (Land::Replace(0.3), None),
                ];
                for (land, init) in cases {
                    let scale = match land {
                        Land::Replace(s) => s,
                        Land::Add => 1.0,
                    };
                    let want = reference(&a, &b, init, (m, n, k), transposed, scale);
                    let mut got = init.map_or(values(m * n, 99, 9.0), |s| s.to_vec());
                    // SAFETY: the operands and the output have the sizes given.
                    unsafe {
                        product(
                            (m, n, k),
                            got.as_mut_ptr(),
                            n,
                            Operand::rows(&a, k),
                            op_b,
                            land,
                            true,
                        )
                    };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&got) == bits(&want),
                        "{m}x{n}x{k} transposed {transposed} {land:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (200, 300, 1100);
        let (a, b) = (values(m * k, 1, 1.0), values(k * n, 2, 1.0));
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut c = vec![0f32; m * n];
                let (a, b) = (Operand::rows(&a, k), Operand::transposed(&b, k));
                // SAFETY: as above.
                unsafe { product((m, n, k), c.as_mut_ptr(), n, a, b, Land::Replace(1.0), true) };
                c
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn matmul_multiplies_batches_and_reads_b_transposed() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_vec(values(2 * 3 * 4, 1, 1.0), (2, 3, 4), &dev).unwrap();
        let b = Tensor::from_vec(values(2 * 4 * 5, 2, 1.0), (2, 4, 5), &dev).unwrap();
        let ours = matmul(&a, &b, false).unwrap();
        let theirs = a.matmul(&b).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5]);
        let diff = (ours - &theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        let bt = b.transpose(1, 2).unwrap().contiguous().unwrap();
        let again = matmul(&a, &bt, true).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            matmul(&a, &b, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert!(matmul(&a, &a, false).is_err());
    }
}
