//! Generation's `precision: bf16` on the CPU: matrix products of bf16 operands accumulated in
//! f32 on Intel AMX (Xeon 4th generation, "Sapphire Rapids", and later).
//!
//! A [`Lhs`] (left operand, `rows × k`) and a [`Rhs`] (right operand, `k × cols`) hold their
//! values rounded to bf16 (to nearest, ties to even) in the order AMX's tiles load them:
//! the left one in `16 × 32` blocks, the right one in `16`-column blocks of value pairs
//! along `k` (the "VNNI" order `TDPBF16PS` reads). Weights are packed once when a model
//! loads; activations are packed when a product needs them. [`product`] writes `start + A · B`
//! (`start`: zero or a bias per row or column) into an f32 output in blocks of `32 × 32` (four
//! accumulator tiles), each block's whole sum over
//! `k` made by one sequence of tile products on one thread: the result does not depend on
//! the number of threads. How AMX rounds within one tile product is the hardware's (it is not
//! a sequence of f32 additions: measured on this project's machine, 16 of 256 sums differ
//! from every sequential order by an ulp or more), so there is no bit-exact fallback: where
//! the CPU has no AMX, `precision: bf16` is an error rather than different bytes.
//!
//! Everything else (normalisation, softmax, GELU, the sampler) stays f32; only the operands of
//! the convolutions', linear layers' and attention's products are rounded to bf16.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::gen::cpu::{with_scratch, SharedOut};

/// The arithmetic of generation's matrix products.
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
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 throughout (the default: the UIs' CPU images).
    #[default]
    F32,
    /// bf16 operands with f32 accumulation on AMX (the CPU only; about twice as fast, pixels
    /// within a few 255ths of f32's).
    Bf16,
}

impl crate::text::Named for Precision {
    const NAMES: &'static [(&'static str, Self)] =
        &[("f32", Precision::F32), ("bf16", Precision::Bf16)];
}

impl Precision {
    /// Whether it is the default (left out of image keys, so f32 keys stay as they were).
    pub fn is_default(&self) -> bool {
        *self == Precision::F32
    }

    /// Whether products run in bf16 on this machine's CPU; an error naming what is missing
    /// when bf16 is asked for and the CPU has no AMX.
    pub fn bf16_on_cpu(self) -> Result<bool, String> {
        match self {
            Precision::F32 => Ok(false),
            Precision::Bf16 if available() => Ok(true),
            Precision::Bf16 => Err(
                "precision bf16 needs a CPU with AMX (Intel Xeon 4th generation or later) \
                 and an OS that enables it (Linux 5.16+); this machine has none: use \
                 precision f32"
                    .into(),
            ),
        }
    }
}

/// Whether this CPU and OS run AMX bf16 tile products (checked once; on Linux this also asks
/// the kernel for permission to use the tile data, once per process).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): Linux enables the tile data state
    // per process on request.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `x` rounded to bf16, to nearest with ties to even (NaN stays a NaN).
#[inline(always)]
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + (b >> 16 & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn widen(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Two values rounded to bf16 in one `u32`, `lo` in the low half (the first in memory).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

/// Rows and columns of the output block one kernel call makes.
const BLOCK: usize = 32;
/// Rows of a tile; its row holds 16 pairs (32 bf16, 64 bytes) along `k`.
const TILE_ROWS: usize = 16;
const TILE_K: usize = 32;
/// `u32` pairs in one tile (16 rows × 16 pairs).
const TILE_PAIRS: usize = TILE_ROWS * TILE_K / 2;

/// A packed operand's storage: bf16 pairs, from a per-thread pool so that activations packed
/// at every layer do not fault fresh pages in each time.
#[derive(Debug, Default)]
struct Pairs(Vec<u32>);

thread_local! {
    /// Buffers of dropped operands, reused by the next ones packed on this thread.
    static POOL: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept per thread, and the largest kept (in pairs: 16 MiB, more than any packed
/// activation but a VAE's full-resolution 1×1 convolution input).
const POOL_BUFFERS: usize = 4;
const POOL_LARGEST: usize = 4 << 20;

impl Pairs {
    /// `len` values left from earlier use: the packing writes every one, zeros included.
    fn reused(len: usize) -> Pairs {
        let mut v = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let at = p.iter().position(|b| b.capacity() >= len);
            at.map(|i| p.swap_remove(i)).unwrap_or_default()
        });
        v.resize(len.max(v.len()), 0);
        v.truncate(len);
        Pairs(v)
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() <= POOL_LARGEST {
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_BUFFERS {
                    p.push(v);
                }
            });
        }
    }
}

impl Clone for Pairs {
    fn clone(&self) -> Pairs {
        Pairs(self.0.clone())
    }
}

/// A left operand `rows × k` rounded to bf16, in `16 × 32` tiles (rows padded to a multiple
/// of 32, `k` to a multiple of 32, with zeros): row `r`'s pair `i` at
/// `((r / 16) · kp / 32 + i / 16) · 256 + r % 16 · 16 + i % 16`.
#[derive(Debug, Clone)]
pub struct Lhs {
    data: Pairs,
    rows: usize,
    k: usize,
    kp: usize,
}

impl Lhs {
    /// Packs `rows` rows of `k` values, row `r` being `src[r · stride ..][..k]`.
    pub fn pack(src: &[f32], rows: usize, k: usize, stride: usize) -> Lhs {
        let row = |r: usize| &src[r * stride..r * stride + k];
        Self::build(rows, k, |r, band, rr| {
            lhs_row(band, rr, row(r));
            0.0
        })
        .0
    }

    /// Packs `rows` rows of `k` values, row `r` being what `map(src[r · stride ..][..k], out)`
    /// writes into `out` (every element); returns the operand and what `map` returned for
    /// each row.
    pub fn pack_map(
        src: &[f32],
        rows: usize,
        k: usize,
        stride: usize,
        map: impl Fn(&[f32], &mut [f32]) -> f32 + Sync,
    ) -> (Lhs, Vec<f32>) {
        Self::build(rows, k, |r, band, rr| {
            with_scratch(k, |out| {
                let kept = map(&src[r * stride..r * stride + k], out);
                lhs_row(band, rr, out);
                kept
            })
        })
    }

    /// Packs `rows` rows of `k` values, `each(r, band, rr)` writing row `r` as row `rr` of its
    /// 16-row band and returning a value kept per row.
    fn build(
        rows: usize,
        k: usize,
        each: impl Fn(usize, &mut [u32], usize) -> f32 + Sync,
    ) -> (Lhs, Vec<f32>) {
        let kp = k.next_multiple_of(TILE_K);
        let rows_p = rows.next_multiple_of(BLOCK);
        let mut data = Pairs::reused(rows_p * kp / 2);
        let mut kept = vec![0f32; rows_p];
        data.0
            .par_chunks_mut(TILE_ROWS * kp / 2)
            .zip(kept.par_chunks_mut(TILE_ROWS))
            .enumerate()
            .for_each(|(blk, (band, kept))| {
                let valid = TILE_ROWS.min(rows.saturating_sub(blk * TILE_ROWS));
                for (rr, kept) in kept.iter_mut().enumerate().take(valid) {
                    *kept = each(blk * TILE_ROWS + rr, band, rr);
                }
                if valid < TILE_ROWS {
                    // Padding rows.
                    for tile in band.chunks_exact_mut(TILE_PAIRS) {
                        tile[valid * 16..].fill(0);
                    }
                }
            });
        kept.truncate(rows);
        (Lhs { data, rows, k, kp }, kept)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the shared dimension).
    pub fn k(&self) -> usize {
        self.k
    }
}

crate::gen::cpu::vectorized! {
    /// Row `rr` of a 16-row band of a [`Lhs`]: its pairs, a tile's row of 16 at a time.
    fn lhs_row(band: &mut [u32], rr: usize, row: &[f32]) {
        let (whole, rest) = row.split_at(row.len() / TILE_K * TILE_K);
        for (t, values) in whole.chunks_exact(TILE_K).enumerate() {
            let out = &mut band[t * TILE_PAIRS + rr * 16..][..16];
            for (i, o) in out.iter_mut().enumerate() {
                *o = pair(values[2 * i], values[2 * i + 1]);
            }
        }
        if !rest.is_empty() {
            let t = row.len() / TILE_K;
            let out = &mut band[t * TILE_PAIRS + rr * 16..][..16];
            for (i, o) in out.iter_mut().enumerate() {
                let at = |j: usize| rest.get(j).copied().unwrap_or(0.0);
                *o = pair(at(2 * i), at(2 * i + 1));
            }
        }
    }
}

/// A right operand `k × cols` rounded to bf16, in 16-column blocks of pairs along `k`
/// (columns padded to a multiple of 32, `k` to a multiple of 32, with zeros): rows `2i` and
/// `2i + 1` of column `c` at `(c / 16) · 8 · kp + i · 16 + c % 16`.
#[derive(Debug, Clone)]
pub struct Rhs {
    data: Pairs,
    k: usize,
    cols: usize,
    kp: usize,
}

impl Rhs {
    /// Packs `B[kk, c] = src[kk · stride + c]` (row-major, `k` rows of `cols`): activations
    /// `[k, pixels]` (an im2col tile, an image's channels) and attention's values.
    pub fn pack_rows(src: &[f32], k: usize, cols: usize, stride: usize) -> Rhs {
        Self::pack_with(k, cols, |band, c0, n| {
            rhs_rows(band, src, (k, stride), c0, n)
        })
    }

    /// Packs `B[kk, c] = src[c · stride + kk]` (`cols` rows of `k`): a linear layer's weight
    /// `[out, in]`, attention's keys.
    pub fn pack_cols(src: &[f32], k: usize, cols: usize, stride: usize) -> Rhs {
        Self::pack_with(k, cols, |band, c0, n| {
            for j in 0..n {
                let col = &src[(c0 + j) * stride..(c0 + j) * stride + k];
                for (i, two) in col.chunks(2).enumerate() {
                    band[i * 16 + j] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                }
            }
        })
    }

    /// Packs `k` rows of `cols` values that `fill(r, row)` writes into `row` (every element),
    /// two rows at a time: an im2col tile without the tile.
    pub fn pack_row_pairs(k: usize, cols: usize, mut fill: impl FnMut(usize, &mut [f32])) -> Rhs {
        let kp = k.next_multiple_of(TILE_K);
        let cols_p = cols.next_multiple_of(BLOCK);
        let mut data = Pairs::reused(kp * cols_p / 2);
        if !cols.is_multiple_of(BLOCK) || !k.is_multiple_of(TILE_K) {
            // Padding columns or rows, which the loop below leaves out.
            data.0.fill(0);
        }
        with_scratch(2 * cols, |rows| {
            let (lo, hi) = rows.split_at_mut(cols);
            for i in 0..k.div_ceil(2) {
                fill(2 * i, lo);
                match 2 * i + 1 < k {
                    true => fill(2 * i + 1, hi),
                    false => hi.fill(0.0),
                }
                interleave(&mut data.0, kp, i, lo, hi);
            }
        });
        Rhs { data, k, cols, kp }
    }

    /// Packs with `fill(band, c0, n)` writing columns `c0 .. c0 + n` into their 16-column
    /// band (zeros).
    fn pack_with(k: usize, cols: usize, fill: impl Fn(&mut [u32], usize, usize) + Sync) -> Rhs {
        let kp = k.next_multiple_of(TILE_K);
        let cols_p = cols.next_multiple_of(BLOCK);
        let mut data = Pairs::reused(kp * cols_p / 2);
        data.0
            .par_chunks_mut(TILE_ROWS * kp / 2)
            .enumerate()
            .for_each(|(blk, band)| {
                let c0 = blk * TILE_ROWS;
                let n = TILE_ROWS.min(cols.saturating_sub(c0));
                if n < TILE_ROWS || k < kp {
                    // Padding columns or rows.
                    band.fill(0);
                }
                if n > 0 {
                    fill(band, c0, n);
                }
            });
        Rhs { data, k, cols, kp }
    }

    /// Rows (the shared dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

crate::gen::cpu::vectorized! {
    /// Rows `2i` (`lo`) and `2i + 1` (`hi`) of a [`Rhs`] with `k` padded to `kp`.
    fn interleave(data: &mut [u32], kp: usize, i: usize, lo: &[f32], hi: &[f32]) {
        for ((band, lo), hi) in data.chunks_exact_mut(TILE_ROWS * kp / 2).zip(lo.chunks(16)).zip(hi.chunks(16)) {
            for ((o, &l), &h) in band[i * 16..].iter_mut().zip(lo).zip(hi) {
                *o = pair(l, h);
            }
        }
    }
}

crate::gen::cpu::vectorized! {
    /// Columns `c0 .. c0 + n` (`n ≤ 16`) of row-major `src` (`k` rows, row stride `stride`)
    /// into their band: pair `i` of column `c0 + j` at `i · 16 + j`.
    fn rhs_rows(band: &mut [u32], src: &[f32], shape: (usize, usize), c0: usize, n: usize) {
        let (k, stride) = shape;
        for i in 0..k / 2 {
            let lo = &src[2 * i * stride + c0..][..n];
            let hi = &src[(2 * i + 1) * stride + c0..][..n];
            for ((o, &l), &h) in band[i * 16..i * 16 + n].iter_mut().zip(lo).zip(hi) {
                *o = pair(l, h);
            }
        }
        if k % 2 == 1 {
            let i = k / 2;
            let lo = &src[2 * i * stride + c0..][..n];
            for (o, &l) in band[i * 16..i * 16 + n].iter_mut().zip(lo) {
                *o = pair(l, 0.0);
            }
        }
    }
}

/// A bias per output row (a convolution's per output channel) as [`product`] starts a block
/// from: each value repeated across one tile row (rows padded to a multiple of 32).
#[derive(Debug, Clone)]
pub struct RowBias(Vec<f32>);

impl RowBias {
    /// The table of `bias`.
    pub fn new(bias: &[f32]) -> RowBias {
        let mut t = vec![0f32; bias.len().next_multiple_of(BLOCK) * TILE_ROWS];
        for (row, &b) in t.chunks_exact_mut(TILE_ROWS).zip(bias) {
            row.fill(b);
        }
        RowBias(t)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.0.len() / TILE_ROWS
    }
}

/// A bias per output column (a linear layer's per output feature), padded to a multiple of 32.
#[derive(Debug, Clone)]
pub struct ColBias(Vec<f32>);

impl ColBias {
    /// The padded `bias`.
    pub fn new(bias: &[f32]) -> ColBias {
        let mut t = bias.to_vec();
        t.resize(bias.len().next_multiple_of(BLOCK), 0.0);
        ColBias(t)
    }
}

/// Where [`product`]'s sums start.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a> {
    /// From zero: the output may hold anything, even be uninitialised.
    Zero,
    /// From a bias per row (the output may be uninitialised).
    Rows(&'a RowBias),
    /// From a bias per column (the output may be uninitialised).
    Cols(&'a ColBias),
}

/// `c[r · ldc + j] = start + Σ_kk a[r, kk] · b[kk, j]` for `r < a.rows()`, `j < b.cols()`, on
/// AMX, the sums starting where `start` says. Blocks of the output run in parallel; each
/// block's sum is made on one thread. Every element of the output is written.
///
/// # Safety
/// `c` must point at `a.rows()` rows of `ldc ≥ b.cols()` f32 that nothing else accesses
/// during the call (it may be uninitialised), and [`available`] must be true.
pub(crate) unsafe fn product(a: &Lhs, b: &Rhs, c: SharedOut, ldc: usize, start: Start) {
    assert_eq!(a.k, b.k, "bf16 product: operands of different inner sizes");
    assert!(
        ldc >= b.cols,
        "bf16 product: output rows narrower than the operand"
    );
    match start {
        Start::Rows(t) => assert!(t.rows() >= a.rows, "bf16 product: a short row bias"),
        Start::Cols(t) => assert!(t.0.len() >= b.cols, "bf16 product: a short column bias"),
        Start::Zero => {}
    }
    let (row_blocks, col_blocks) = (a.rows.div_ceil(BLOCK), b.cols.div_ceil(BLOCK));
    if row_blocks == 0 || col_blocks == 0 {
        return;
    }
    // Column-major over blocks: consecutive jobs share the right operand's block (in L2).
    (0..row_blocks * col_blocks)
        .into_par_iter()
        .for_each(|job| {
            let (i, j) = (job % row_blocks, job / row_blocks);
            let (r0, c0) = (i * BLOCK, j * BLOCK);
            let a_at = a.data.0.as_ptr().add(r0 * a.kp / 2);
            let b_at = b.data.0.as_ptr().add(c0 * b.kp / 2);
            let (rows, cols) = (BLOCK.min(a.rows - r0), BLOCK.min(b.cols - c0));
            let out = c.ptr().add(r0 * ldc + c0);
            let full = rows == BLOCK && cols == BLOCK;
            // An edge block goes through a full-size buffer (which the block writes in full).
            let mut buf = std::mem::MaybeUninit::<[f32; BLOCK * BLOCK]>::uninit();
            let (dst, ld) = match full {
                true => (out, ldc),
                false => (buf.as_mut_ptr() as *mut f32, BLOCK),
            };
            let init = match start {
                Start::Zero => amx::Init::Zero,
                Start::Rows(t) => {
                    let (top, bottom) = (
                        t.0.as_ptr().add(r0 * TILE_ROWS),
                        t.0.as_ptr().add((r0 + TILE_ROWS) * TILE_ROWS),
                    );
                    amx::Init::Load([top, top, bottom, bottom], TILE_ROWS)
                }
                Start::Cols(t) => {
                    let (left, right) = (t.0.as_ptr().add(c0), t.0.as_ptr().add(c0 + TILE_ROWS));
                    amx::Init::Load([left, right, left, right], 0)
                }
            };
            amx::block(a_at, b_at, (dst, ld), a.kp, init);
            if !full {
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(dst.add(r * BLOCK), out.add(r * ldc), cols);
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::cell::Cell;

    use super::{TILE_K, TILE_ROWS};

    thread_local! {
        /// Whether this thread has loaded [`configure`]'s tile configuration.
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// The 64-byte tile configuration `LDTILECFG` reads.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Loads, once per thread, palette 1 with eight tiles of 16 rows × 64 bytes: 0-3 the
    /// output block's accumulators, 4-5 the left operand's, 6-7 the right operand's. Nothing
    /// else in the process uses the tiles, so the configuration stays loaded.
    unsafe fn configure() {
        if CONFIGURED.get() {
            return;
        }
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row (u16 little-endian)
            cfg.0[48 + t] = TILE_ROWS as u8;
        }
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(true);
    }

    /// How a block's four accumulator tiles start.
    pub(super) enum Init {
        /// At zero.
        Zero,
        /// Loaded from four places with one row stride in f32 (0: one row repeated).
        Load([*const f32; 4], usize),
    }

    /// `c[32 × 32] = init + A[32 rows at a] · B[32 columns at b]` over `kp`, `c` given with
    /// its row stride in f32.
    pub(super) unsafe fn block(
        a: *const u32,
        b: *const u32,
        (c, ldc): (*mut f32, usize),
        kp: usize,
        init: Init,
    ) {
        configure();
        match init {
            Init::Zero => asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
            Init::Load([t0, t1, t2, t3], stride) => asm!(
                "tileloadd tmm0, [{t0} + {s}*1]",
                "tileloadd tmm1, [{t1} + {s}*1]",
                "tileloadd tmm2, [{t2} + {s}*1]",
                "tileloadd tmm3, [{t3} + {s}*1]",
                t0 = in(reg) t0, t1 = in(reg) t1, t2 = in(reg) t2, t3 = in(reg) t3,
                s = in(reg) stride * 4,
                options(nostack, readonly)
            ),
        }
        let sc = ldc * 4;
        let half = TILE_ROWS * ldc;
        // Pairs: a 16-row band of either operand is `16 · kp / 2`, a tile 256.
        let (a1, b1) = (a.add(TILE_ROWS * kp / 2), b.add(TILE_ROWS * kp / 2));
        let mut k = 0;
        while k < kp {
            let at = k * TILE_ROWS / 2;
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(at), a1 = in(reg) a1.add(at),
                b0 = in(reg) b.add(at), b1 = in(reg) b1.add(at),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
            k += TILE_K;
        }
        asm!(
            "tilestored [{c} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c = in(reg) c, c1 = in(reg) c.add(TILE_ROWS), c2 = in(reg) c.add(half),
            c3 = in(reg) c.add(half + TILE_ROWS), s = in(reg) sc,
            options(nostack)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) unsafe fn block(
        _: *const u32,
        _: *const u32,
        _: *mut f32,
        _: usize,
        _: usize,
        _: bool,
    ) {
        unreachable!("bf16 products run only where `available()` is true (x86-64 with AMX)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::cpu::testing::{on_threads, values};

    /// f64 sums of the bf16-rounded operands.
    fn reference(a: &[f32], b: &[f32], c: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f64> {
        let mut out: Vec<f64> = c.iter().map(|&v| v as f64).collect();
        for r in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    out[r * n + j] +=
                        widen(round(a[r * k + kk])) as f64 * widen(round(b[kk * n + j])) as f64;
                }
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to the even one.
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round(-2.5), 0xc020);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
        for v in values(1000, 3, 100.0) {
            assert_eq!(round(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
    }

    #[test]
    fn products_match_f64_sums_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        // Full blocks, edge blocks in both directions, k not a multiple of 32, one row.
        for (i, &(m, k, n)) in [
            (64, 64, 64),
            (45, 70, 37),
            (1, 5, 3),
            (33, 300, 90),
            (16, 40, 129),
        ]
        .iter()
        .enumerate()
        {
            let seed = 10 * i as u32;
            let (a, b, rows, cols) = (
                values(m * k, seed, 1.0),
                values(k * n, seed + 1, 1.0),
                values(m, seed + 2, 1.0),
                values(n, seed + 3, 1.0),
            );
            let (lhs, rhs) = (Lhs::pack(&a, m, k, k), Rhs::pack_rows(&b, k, n, n));
            let (row_bias, col_bias) = (RowBias::new(&rows), ColBias::new(&cols));
            // Each start, into an output holding garbage: the sums start from zero, a bias
            // per row or a bias per column.
            let garbage = values(m * n, seed + 4, 9.0);
            for (s, start) in [Start::Zero, Start::Rows(&row_bias), Start::Cols(&col_bias)]
                .into_iter()
                .enumerate()
            {
                let init: Vec<f32> = match start {
                    Start::Zero => vec![0.0; m * n],
                    Start::Rows(_) => (0..m * n).map(|x| rows[x / n]).collect(),
                    Start::Cols(_) => (0..m * n).map(|x| cols[x % n]).collect(),
                };
                let want = reference(&a, &b, &init, (m, k, n));
                let mut c = garbage.clone();
                // SAFETY: `c` is `m × n`, AMX is available.
                unsafe { product(&lhs, &rhs, SharedOut::new(&mut c), n, start) };
                // f32 accumulation of ≤ 300 exact products of size ≤ 1: 1e-4 absolute (a
                // start of size ≤ 9: 2e-4).
                for (j, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 2e-4,
                        "case {i} start {s} value {j}: {g} vs {w}"
                    );
                }
            }
            // The transposed packing gives the same operand.
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            assert_eq!(Rhs::pack_cols(&bt, k, n, k).data.0, rhs.data.0, "case {i}");
        }
    }

    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        let (m, k, n) = (96, 200, 160);
        let (a, b) = (values(m * k, 1, 1.0), values(k * n, 2, 1.0));
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut c = vec![0f32; m * n];
                let (lhs, rhs) = (Lhs::pack(&a, m, k, k), Rhs::pack_rows(&b, k, n, n));
                // SAFETY: as above.
                unsafe { product(&lhs, &rhs, SharedOut::new(&mut c), n, Start::Zero) };
                c
            })
        };
        assert_eq!(run(1), run(3));
    }
}
