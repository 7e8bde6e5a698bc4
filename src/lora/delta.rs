//! The weight change of one module (lora.md §2.1, §5), in f32, scaled by alpha / dim (or the
//! module's `scale`), before strength and block weight.
//!
//! Products are plain row-parallel loops with a fixed summation order, so results do not
//! depend on the thread count.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::lora::{Kind, LoraFile, Module};

/// `a [m, k] · b [k, n]`.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for kk in 0..k {
                let x = a[i * k + kk];
                let b_row = &b[kk * n..(kk + 1) * n];
                for (o, y) in row.iter_mut().zip(b_row) {
                    *o += x * y;
                }
            }
        });
    out
}

fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// `ΔW[o, i, y, x] = Σ_n Σ_m up[o, n] · mid[n, m, y, x] · down[m, i]` (Tucker form), with
/// `up [out, r]`, `mid [r, r', kh, kw]`, `down [r', in]`; returns `[out, in, kh, kw]`.
fn tucker(
    up: &[f32],
    out: usize,
    mid: &[f32],
    mid_shape: &[usize],
    down: &[f32],
    inp: usize,
) -> Vec<f32> {
    let (r, r2) = (mid_shape[0], mid_shape[1]);
    let k: usize = mid_shape[2..].iter().product::<usize>().max(1);
    let mut result = vec![0f32; out * inp * k];
    for yx in 0..k {
        let m: Vec<f32> = (0..r * r2).map(|nm| mid[nm * k + yx]).collect();
        let t = matmul(up, out, r, &m, r2);
        let d = matmul(&t, out, r2, down, inp);
        for (oi, v) in d.into_iter().enumerate() {
            result[oi * k + yx] = v;
        }
    }
    result
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Shape as a matrix: first dimension by the rest.
fn as_matrix(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    (rows, numel(shape) / rows.max(1))
}

/// The scale of a module's product: its explicit `scale`, else `alpha / dim`, else 1.
fn scale_rule(explicit: Option<f32>, alpha: Option<f32>, dim: Option<usize>) -> f32 {
    match (explicit, alpha, dim) {
        (Some(s), _, _) => s,
        (None, Some(a), Some(d)) if d > 0 => a / d as f32,
        _ => 1.0,
    }
}

/// A plain LoRA module's factors (`up [out, rank]`, `down [rank, cols]`) and the scale
/// [`delta`] applies: rows `a..b` of its ΔW are `up[a..b] · down × scale`, computed in the
/// same order as [`delta`], so a weight can be changed a band of rows at a time.
#[derive(Debug)]
pub struct Factors {
    /// `[out, rank]`.
    pub up: Vec<f32>,
    /// `[rank, cols]`.
    pub down: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// Output rows.
    pub out: usize,
    /// Columns (everything after the first dimension).
    pub cols: usize,
    /// alpha / rank (or the explicit scale).
    pub scale: f32,
}

impl Factors {
    /// The factors of `m` when it is a plain LoRA / LoCon module (no Tucker `mid`, no DoRA).
    pub fn of(f: &LoraFile, m: &Module) -> Result<Option<Factors>> {
        if m.kind != Kind::Lora || m.parts.contains_key("mid") || m.parts.contains_key("dora_scale")
        {
            return Ok(None);
        }
        let (Some((up, up_s)), Some((down, down_s))) = (f.part(m, "up")?, f.part(m, "down")?)
        else {
            return Ok(None);
        };
        let (rank, cols) = as_matrix(&down_s);
        let out = up_s.first().copied().unwrap_or(0);
        if numel(&up_s) != out * rank {
            return Ok(None);
        }
        let alpha = f.part(m, "alpha")?.and_then(|(v, _)| v.first().copied());
        let explicit = f.part(m, "scale")?.and_then(|(v, _)| v.first().copied());
        Ok(Some(Factors {
            up,
            down,
            rank,
            out,
            cols,
            scale: scale_rule(explicit, alpha, Some(rank)),
        }))
    }

    /// Rows `a..b` of ΔW, row-major.
    pub fn rows(&self, a: usize, b: usize) -> Vec<f32> {
        let v = matmul(
            &self.up[a * self.rank..b * self.rank],
            b - a,
            self.rank,
            &self.down,
            self.cols,
        );
        if self.scale == 1.0 {
            v
        } else {
            v.into_iter().map(|x| x * self.scale).collect()
        }
    }
}

/// A module's weight change for a target region of `target_numel` elements (`weight`: the
/// target's current values, needed by IA3). The result has the target's element order.
pub fn delta(
    f: &LoraFile,
    m: &Module,
    target_numel: usize,
    weight: Option<&[f32]>,
    target_shape: &[usize],
) -> Result<Vec<f32>> {
    let err =
        |msg: String| Error::Invalid(format!("{}: module `{}`: {msg}", f.path.display(), m.name));
    let need = |p: &str| -> Result<(Vec<f32>, Vec<usize>)> {
        f.part(m, p)?
            .ok_or_else(|| err(format!("missing part `{p}`")))
    };
    let alpha = f.part(m, "alpha")?.and_then(|(v, _)| v.first().copied());
    let explicit_scale = f.part(m, "scale")?.and_then(|(v, _)| v.first().copied());
    let scale_for = |dim: Option<usize>| scale_rule(explicit_scale, alpha, dim);
    let (values, scale) = match m.kind {
        Kind::Lora => {
            let (up, up_s) = need("up")?;
            let (down, down_s) = need("down")?;
            let rank = down_s[0];
            let out = up_s[0];
            let v = match f.part(m, "mid")? {
                Some((mid, mid_s)) => {
                    let inp = down_s.get(1).copied().unwrap_or(0);
                    tucker(&up, out, &mid, &mid_s, &down, inp)
                }
                None => {
                    let (_, cols) = as_matrix(&down_s);
                    if numel(&up_s) != out * rank {
                        return Err(err(format!(
                            "lora_up {up_s:?} does not match lora_down {down_s:?}"
                        )));
                    }
                    matmul(&up, out, rank, &down, cols)
                }
            };
            (v, scale_for(Some(rank)))
        }
        Kind::Loha => {
            if m.parts.contains_key("hada_t1") {
                let product = |a: &str, b: &str, t: &str| -> Result<Vec<f32>> {
                    let (wa, wa_s) = need(a)?;
                    let (wb, wb_s) = need(b)?;
                    let (tt, t_s) = need(t)?;
                    let out = wa_s[1];
                    let up = transpose(&wa, wa_s[0], out);
                    Ok(tucker(&up, out, &tt, &t_s, &wb, wb_s[1]))
                };
                let p1 = product("hada_w1_a", "hada_w1_b", "hada_t1")?;
                let p2 = product("hada_w2_a", "hada_w2_b", "hada_t2")?;
                let rank = need("hada_w1_b")?.1[0];
                (
                    p1.iter().zip(&p2).map(|(a, b)| a * b).collect(),
                    scale_for(Some(rank)),
                )
            } else {
                let product = |a: &str, b: &str| -> Result<(Vec<f32>, usize)> {
                    let (wa, wa_s) = need(a)?;
                    let (wb, wb_s) = need(b)?;
                    let (r, cols) = as_matrix(&wb_s);
                    Ok((matmul(&wa, wa_s[0], r, &wb, cols), r))
                };
                let (p1, rank) = product("hada_w1_a", "hada_w1_b")?;
                let (p2, _) = product("hada_w2_a", "hada_w2_b")?;
                if p1.len() != p2.len() {
                    return Err(err("the two LoHa products differ in size".into()));
                }
                (
                    p1.iter().zip(&p2).map(|(a, b)| a * b).collect(),
                    scale_for(Some(rank)),
                )
            }
        }
        Kind::Lokr => {
            let factor =
                |full: &str, a: &str, b: &str| -> Result<(Vec<f32>, usize, usize, Option<usize>)> {
                    match f.part(m, full)? {
                        Some((w, s)) => {
                            let (r, c) = as_matrix(&s);
                            Ok((w, r, c, None))
                        }
                        None => {
                            let (wa, wa_s) = need(a)?;
                            let (wb, wb_s) = need(b)?;
                            let (r, c) = as_matrix(&wb_s);
                            Ok((matmul(&wa, wa_s[0], r, &wb, c), wa_s[0], c, Some(r)))
                        }
                    }
                };
            let (w1, a, c, dim1) = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
            let (w2, b, dk, dim2) = match f.part(m, "lokr_t2")? {
                // Tucker: w2[p, q, y, x] = Σ_i Σ_j t2[i, j, y, x] · w2_a[i, p] · w2_b[j, q].
                Some((t2, t2_s)) => {
                    let (wa, wa_s) = need("lokr_w2_a")?;
                    let (wb, wb_s) = need("lokr_w2_b")?;
                    let b = wa_s[1];
                    let up = transpose(&wa, wa_s[0], b);
                    let w2 = tucker(&up, b, &t2, &t2_s, &wb, wb_s[1]);
                    let dk = w2.len() / b.max(1);
                    (w2, b, dk, Some(wb_s[0]))
                }
                None => factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
            };
            let mut v = vec![0f32; a * b * c * dk];
            let cols = c * dk;
            for p in 0..a {
                for q in 0..b {
                    let row = &mut v[(p * b + q) * cols..(p * b + q + 1) * cols];
                    for s in 0..c {
                        let x = w1[p * c + s];
                        for t in 0..dk {
                            row[s * dk + t] = x * w2[q * dk + t];
                        }
                    }
                }
            }
            let scale = match dim2.or(dim1) {
                Some(d) => scale_for(Some(d)),
                None => explicit_scale.unwrap_or(1.0),
            };
            (v, scale)
        }
        Kind::Ia3 => {
            let w = weight.ok_or_else(|| err("IA3 needs the target weight".into()))?;
            let (scale, _) = need("weight")?;
            let on_input = need("on_input")?.0.first().copied().unwrap_or(0.0) != 0.0;
            let out = target_shape.first().copied().unwrap_or(1);
            let per_row = w.len() / out.max(1);
            let inner: usize = target_shape.get(2..).map(numel).unwrap_or(1).max(1);
            let v = w
                .iter()
                .enumerate()
                .map(|(idx, x)| {
                    let channel = if on_input {
                        (idx % per_row) / inner
                    } else {
                        idx / per_row
                    };
                    x * scale.get(channel).copied().unwrap_or(0.0)
                })
                .collect();
            (v, 1.0)
        }
        Kind::Glora => {
            let w = weight.ok_or_else(|| err("GLoRA needs the target weight".into()))?;
            let out = target_shape.first().copied().unwrap_or(1);
            let cols = target_numel / out.max(1);
            let (a1, a2, b1, b2) = (need("a1")?, need("a2")?, need("b1")?, need("b2")?);
            // The current layout (b1 [out, r], b2 [r, in], a1 [in, r], a2 [r, in]) computes
            // b1·b2 + W·a1·a2; the 2023 one stores each pair the other way round (b2 [out, r],
            // a2 [in, r]) and computes b2·b1 + W·a2·a1. Told apart by shapes.
            let current = b1.1[0] == out && as_matrix(&b1.1).1 == b2.1[0];
            let ((bu, bu_s), (bd, bd_s), (au, au_s), (ad, ad_s)) = match current {
                true => (b1, b2, a1, a2),
                false => (b2, b1, a2, a1),
            };
            let (r, ra) = (as_matrix(&bu_s).1, as_matrix(&au_s).1);
            // A convolution's a1 / a2 mix input channels only (`[in, r, 1, 1]`,
            // `[r, in, 1, 1]`): `einsum(o i ..., i j -> o j ...)` at every kernel position.
            let inp = target_shape.get(1).copied().unwrap_or(cols);
            let a_rows = match as_matrix(&au_s).0 {
                n if n == cols => cols,
                n if n == inp && target_shape.len() > 2 => inp,
                _ => 0,
            };
            if as_matrix(&bu_s).0 != out
                || as_matrix(&bd_s) != (r, cols)
                || a_rows == 0
                || as_matrix(&ad_s) != (ra, a_rows)
            {
                return Err(err(format!(
                    "GLoRA parts a1 {:?}, a2 {:?}, b1 {:?}, b2 {:?} do not fit a weight of {target_shape:?}",
                    need("a1")?.1,
                    need("a2")?.1,
                    need("b1")?.1,
                    need("b2")?.1
                )));
            }
            let b = matmul(&bu, out, r, &bd, cols);
            // (W·a_up)·a_down: never the [in, in] product.
            let wa = if a_rows == cols {
                matmul(&matmul(w, out, cols, &au, ra), out, ra, &ad, cols)
            } else {
                // Rows (o, kernel position) by input channel, then back.
                let ksz = cols / inp;
                let mut wt = vec![0f32; out * cols];
                for o in 0..out {
                    for i in 0..inp {
                        for p in 0..ksz {
                            wt[(o * ksz + p) * inp + i] = w[o * cols + i * ksz + p];
                        }
                    }
                }
                let t = matmul(
                    &matmul(&wt, out * ksz, inp, &au, ra),
                    out * ksz,
                    ra,
                    &ad,
                    inp,
                );
                let mut back = vec![0f32; out * cols];
                for o in 0..out {
                    for i in 0..inp {
                        for p in 0..ksz {
                            back[o * cols + i * ksz + p] = t[(o * ksz + p) * inp + i];
                        }
                    }
                }
                back
            };
            (
                b.iter().zip(&wa).map(|(x, y)| x + y).collect(),
                scale_for(Some(r)),
            )
        }
        Kind::Oft => {
            let w = weight.ok_or_else(|| err("OFT needs the target weight".into()))?;
            let (blocks, b_s) = need("oft_blocks")?;
            let out = target_shape.first().copied().unwrap_or(1);
            let cols = target_numel / out.max(1);
            let (nb, bs) = (b_s[0], b_s.get(1).copied().unwrap_or(0));
            if b_s.len() != 3 || b_s[2] != bs || nb * bs != out {
                return Err(err(format!(
                    "oft_blocks {b_s:?} do not split the weight's {out} output rows"
                )));
            }
            // alpha 0 (LyCORIS' default) means no norm constraint, as in every reference.
            let constraint = alpha.filter(|a| *a != 0.0).map(|a| a as f64 * out as f64);
            let rotations = oft_rotations(&blocks, nb, bs, constraint)?;
            let rescale = f.part(m, "rescale")?.map(|(v, _)| v);
            // W'[p] = rescale[p] · Σ_o R[o, p] · W[o] within each block; ΔW = W' − W.
            let mut v = vec![0f32; out * cols];
            for (p, row) in v.chunks_mut(cols.max(1)).enumerate() {
                let (k, pp) = (p / bs, p % bs);
                let r = &rotations[k * bs * bs..(k + 1) * bs * bs];
                let mut acc = vec![0f64; cols];
                for o in 0..bs {
                    let c = r[o * bs + pp];
                    let src = &w[(k * bs + o) * cols..(k * bs + o + 1) * cols];
                    acc.iter_mut()
                        .zip(src)
                        .for_each(|(a, x)| *a += c * *x as f64);
                }
                let s = rescale
                    .as_ref()
                    .and_then(|r| r.get(p))
                    .map_or(1.0, |s| *s as f64);
                let orig = &w[p * cols..(p + 1) * cols];
                for ((d, a), x) in row.iter_mut().zip(&acc).zip(orig) {
                    *d = (s * a - *x as f64) as f32;
                }
            }
            (v, 1.0)
        }
        Kind::Boft => {
            let w = weight.ok_or_else(|| err("BOFT needs the target weight".into()))?;
            let (blocks, b_s) = need("oft_blocks")?;
            let out = target_shape.first().copied().unwrap_or(1);
            let cols = target_numel / out.max(1);
            let [levels, nb, bs, bs2] = b_s[..] else {
                return Err(err(format!("BOFT oft_blocks {b_s:?} are not 4-D")));
            };
            if bs2 != bs || bs % 2 != 0 || nb * bs != out {
                return Err(err(format!(
                    "BOFT oft_blocks {b_s:?} do not split the weight's {out} output rows"
                )));
            }
            // The constraint (LyCORIS' `alpha` times the output size) clamps ‖Q‖ over every
            // level; alpha 0 means none.
            let constraint = alpha.filter(|a| *a > 0.0).map(|a| a as f64 * out as f64);
            let rotations = boft_rotations(&blocks, levels * nb, bs, constraint)?;
            let mut acc: Vec<f64> = w.iter().map(|x| *x as f64).collect();
            for level in 0..levels {
                let r = &rotations[level * nb * bs * bs..(level + 1) * nb * bs * bs];
                acc = butterfly_level(&acc, out, cols, bs, level, r)?;
            }
            let rescale = f.part(m, "rescale")?.map(|(v, _)| v);
            let v = acc
                .chunks(cols.max(1))
                .zip(w.chunks(cols.max(1)))
                .enumerate()
                .flat_map(|(p, (row, orig))| {
                    let s = rescale
                        .as_ref()
                        .and_then(|r| r.get(p))
                        .map_or(1.0, |s| *s as f64);
                    row.iter()
                        .zip(orig)
                        .map(move |(a, x)| (s * a - *x as f64) as f32)
                })
                .collect();
            (v, 1.0)
        }
        Kind::Norm => {
            let (d, _) = need("w_norm")?;
            (d, 1.0)
        }
        Kind::Full => match f.part(m, "diff")? {
            Some((d, _)) => (d, 1.0),
            None => (vec![0.0; target_numel], 1.0),
        },
    };
    if values.len() != target_numel {
        return Err(err(format!(
            "its change has {} elements, the checkpoint weight {target_numel}",
            values.len()
        )));
    }
    Ok(if scale == 1.0 {
        values
    } else {
        values.into_iter().map(|v| v * scale).collect()
    })
}

/// The Cayley rotations of BOFT blocks (`n` blocks of `bs` x `bs`, every level together), as
/// LyCORIS computes them: `Q = B − Bᵀ`, scaled to norm `c` when ‖Q‖ + 1e-8 exceeds the
/// constraint `c`, then `R = (I + Q)(I − Q)⁻¹`.
fn boft_rotations(
    blocks: &[f32],
    n: usize,
    bs: usize,
    constraint: Option<f64>,
) -> Result<Vec<f64>> {
    let mut q = skew(blocks, n, bs);
    let norm = q.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-8;
    if let Some(c) = constraint.filter(|c| norm > *c) {
        q.iter_mut().for_each(|x| *x *= c / norm);
    }
    cayley(&q, n, bs)
}

/// One level of a butterfly: rows are permuted (within groups of `2k` rows, `k = 2^level ·
/// bs / 2`, row `g·k + j` moves to `j·2 + g`), each run of `bs` permuted rows is rotated by
/// its block (`row_i ← Σ_j R[i, j] · row_j`), and the permutation is undone.
fn butterfly_level(
    w: &[f64],
    out: usize,
    cols: usize,
    bs: usize,
    level: usize,
    rotations: &[f64],
) -> Result<Vec<f64>> {
    let k = (1usize << level) * (bs / 2);
    if k == 0 || !out.is_multiple_of(2 * k) {
        return Err(Error::Invalid(format!(
            "BOFT level {level}: {out} output rows do not split into groups of {}",
            2 * k
        )));
    }
    // perm[new] = old.
    let perm: Vec<usize> = (0..out)
        .map(|new| {
            let (a, rest) = (new / (2 * k), new % (2 * k));
            let (j, g) = (rest / 2, rest % 2);
            a * 2 * k + g * k + j
        })
        .collect();
    let mut result = vec![0f64; out * cols];
    for (new, &old) in perm.iter().enumerate() {
        let (blk, i) = (new / bs, new % bs);
        let r = &rotations[blk * bs * bs..(blk + 1) * bs * bs];
        let dst = &mut result[old * cols..(old + 1) * cols];
        for j in 0..bs {
            let c = r[i * bs + j];
            let src_row = perm[blk * bs + j];
            let src = &w[src_row * cols..(src_row + 1) * cols];
            dst.iter_mut().zip(src).for_each(|(d, x)| *d += c * x);
        }
    }
    Ok(result)
}

/// `B − Bᵀ` of each of `n` square blocks of size `bs`, in f64.
fn skew(blocks: &[f32], n: usize, bs: usize) -> Vec<f64> {
    let mut q: Vec<f64> = Vec::with_capacity(n * bs * bs);
    for k in 0..n {
        let b = &blocks[k * bs * bs..(k + 1) * bs * bs];
        for i in 0..bs {
            for j in 0..bs {
                q.push(b[i * bs + j] as f64 - b[j * bs + i] as f64);
            }
        }
    }
    q
}

/// The Cayley transform `R = (I + Q)(I − Q)⁻¹` of each of `n` skew blocks.
fn cayley(q: &[f64], n: usize, bs: usize) -> Result<Vec<f64>> {
    use faer::prelude::Solve;
    let mut out = Vec::with_capacity(q.len());
    for k in 0..n {
        let qk = &q[k * bs * bs..(k + 1) * bs * bs];
        let eye = |i: usize, j: usize| if i == j { 1.0 } else { 0.0 };
        let minus = faer::Mat::<f64>::from_fn(bs, bs, |i, j| eye(i, j) - qk[i * bs + j]);
        let plus = faer::Mat::<f64>::from_fn(bs, bs, |i, j| eye(i, j) + qk[i * bs + j]);
        // (I + Q) and (I − Q) commute, so R = (I − Q)⁻¹ (I + Q).
        let r = minus.partial_piv_lu().solve(&plus);
        if r.col_iter().flat_map(|c| c.iter()).any(|x| !x.is_finite()) {
            return Err(Error::Invalid("an OFT block is singular".into()));
        }
        for i in 0..bs {
            for j in 0..bs {
                out.push(r[(i, j)]);
            }
        }
    }
    Ok(out)
}

/// The rotations of OFT blocks `B` (`[nb, bs, bs]`, row-major), as sd-scripts computes them:
/// `Q = B − Bᵀ`, scaled down so that ‖Q‖_F over all blocks is at most `constraint` (when
/// given), then the Cayley transform `R = (I + Q)(I − Q)⁻¹` per block (in f64).
fn oft_rotations(
    blocks: &[f32],
    nb: usize,
    bs: usize,
    constraint: Option<f64>,
) -> Result<Vec<f64>> {
    let mut q = skew(blocks, nb, bs);
    let norm = q.iter().map(|x| x * x).sum::<f64>().sqrt();
    if let Some(c) = constraint {
        let factor = (norm.min(c) + 1e-8) / (norm + 1e-8);
        q.iter_mut().for_each(|x| *x *= factor);
    }
    cayley(&q, nb, bs)
}

/// DoRA (lora.md §5): with `V = W + block · ΔW` (ΔW already scaled by alpha / dim), the
/// weight becomes `V · dora_scale / ‖V‖`: norms per output row when `dora_scale` is shaped
/// `[out, 1, ...]` (or is PEFT's 1-D magnitude vector), per input column when it is shaped
/// `[1, in, ...]`; plus f32 epsilon. The strength
/// blends it in as AUTOMATIC1111 and ComfyUI do: the returned change is `strength · (W_dora − W)`.
pub fn dora_change(
    w: &[f32],
    shape: &[usize],
    delta: &[f32],
    block: f32,
    scale: &[f32],
    scale_shape: &[usize],
    strength: f32,
) -> Result<Vec<f32>> {
    let out = shape.first().copied().unwrap_or(1);
    let inp = shape.get(1).copied().unwrap_or(1);
    let inner: usize = shape.get(2..).map(numel).unwrap_or(1).max(1);
    let v: Vec<f32> = w.iter().zip(delta).map(|(a, d)| a + block * d).collect();
    let per_row = inp * inner;
    let column = |idx: usize| (idx % per_row) / inner;
    let by_row = scale.len() == out && scale_shape.first() == Some(&out);
    let by_column = !by_row && scale.len() == inp && scale_shape.get(1) == Some(&inp);
    let norms: Vec<f32> = if by_row {
        (0..out)
            .map(|o| {
                let row = &v[o * per_row..(o + 1) * per_row];
                row.iter().map(|x| x * x).sum::<f32>().sqrt() + f32::EPSILON
            })
            .collect()
    } else if by_column {
        let mut sq = vec![0f32; inp];
        for (idx, x) in v.iter().enumerate() {
            sq[column(idx)] += x * x;
        }
        sq.into_iter().map(|s| s.sqrt() + f32::EPSILON).collect()
    } else {
        return Err(Error::Invalid(format!(
            "dora_scale {scale_shape:?} fits neither axis of the weight {shape:?}"
        )));
    };
    Ok(v.iter()
        .zip(w)
        .enumerate()
        .map(|(idx, (x, orig))| {
            let c = if by_row { idx / per_row } else { column(idx) };
            strength * (x * scale[c] / norms[c] - orig)
        })
        .collect())
}

/// The shape of the weight a module changes, read from its own parts (for merging LoRAs
/// without a checkpoint). IA3 scales an existing weight and has none.
pub fn natural_shape(f: &LoraFile, m: &Module) -> Result<Vec<usize>> {
    let shape = |p: &str| -> Result<Vec<usize>> {
        let name = m.parts.get(p).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: module `{}`: missing part `{p}`",
                f.path.display(),
                m.name
            ))
        })?;
        Ok(f.ck.get(name).map(|t| t.shape.clone()).unwrap_or_default())
    };
    Ok(match m.kind {
        Kind::Lora => {
            let (up, down) = (shape("up")?, shape("down")?);
            match m.parts.contains_key("mid") {
                true => {
                    let mid = shape("mid")?;
                    vec![up[0], down[1], mid[2], mid[3]]
                }
                false => [&up[..1], &down[1..]].concat(),
            }
        }
        Kind::Loha if m.parts.contains_key("hada_t1") => {
            let (a, b, t) = (shape("hada_w1_a")?, shape("hada_w1_b")?, shape("hada_t1")?);
            vec![a[1], b[1], t[2], t[3]]
        }
        Kind::Loha => [&shape("hada_w1_a")?[..1], &shape("hada_w1_b")?[1..]].concat(),
        Kind::Lokr => {
            let w1 = shape("lokr_w1").or_else(|_| {
                Ok::<_, Error>(vec![shape("lokr_w1_a")?[0], shape("lokr_w1_b")?[1]])
            })?;
            if m.parts.contains_key("lokr_t2") {
                let (a, b, t) = (shape("lokr_w2_a")?, shape("lokr_w2_b")?, shape("lokr_t2")?);
                let mut s = vec![w1[0] * a[1], w1[1] * b[1]];
                s.extend_from_slice(&t[2..]);
                return Ok(s);
            }
            match shape("lokr_w2") {
                Ok(w2) => {
                    let mut s = vec![w1[0] * w2[0], w1[1] * w2[1]];
                    s.extend_from_slice(&w2[2..]);
                    s
                }
                Err(_) => {
                    let (a, b) = (shape("lokr_w2_a")?, shape("lokr_w2_b")?);
                    vec![w1[0] * a[0], w1[1] * b[1..].iter().product::<usize>()]
                }
            }
        }
        Kind::Full => shape("diff")?,
        Kind::Norm => {
            return Err(Error::Invalid(format!(
                "{}: module `{}` changes a norm layer, which a LoRA cannot hold: bake it instead",
                f.path.display(),
                m.name
            )))
        }
        Kind::Ia3 | Kind::Glora | Kind::Oft | Kind::Boft => {
            return Err(Error::Invalid(format!(
                "{}: module `{}` is {}, whose change depends on the weight: bake it instead",
                f.path.display(),
                m.name,
                m.kind.label()
            )))
        }
    })
}
