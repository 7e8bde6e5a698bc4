//! weight_sum (`a + alpha*(b - a)`) over two f16 arrays, three ways, in one process:
//! mergesmith's chunked kernel (decode to f32, blend, round once), candle on f16 tensors,
//! and candle through f32 (`to_dtype`, blend, `to_dtype`). Prints the median of several
//! runs of each, the ratios to mergesmith, and how many elements differ from mergesmith.
//!
//! Usage: cargo run --release -- [million elements, default 64] [runs, default 5]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::f16;
use mergesmith::dtype::DType as MsDType;
use mergesmith::merge::kernels::blend;
use mergesmith::merge::Mode;
use rayon::prelude::*;

const CHUNK: usize = 1 << 18;

fn ours(a: &[f16], b: &[f16], alpha: f32, out: &mut [f16]) {
    let (ab, bb): (&[u8], &[u8]) = (bytemuck_cast(a), bytemuck_cast(b));
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(fa, fb), (i, o)| {
            let (lo, hi) = (i * CHUNK * 2, i * CHUNK * 2 + o.len() * 2);
            fa.resize(o.len(), 0.0);
            fb.resize(o.len(), 0.0);
            mergesmith::convert::decode_into(MsDType::F16, &ab[lo..hi], fa).unwrap();
            mergesmith::convert::decode_into(MsDType::F16, &bb[lo..hi], fb).unwrap();
            blend(Mode::WeightSum, alpha, 0.0, fa, fb, &[]);
            let ob: &mut [u8] = bytemuck_cast_mut(o);
            mergesmith::convert::encode_into(fa, MsDType::F16, ob).unwrap();
        },
    );
}

fn bytemuck_cast(v: &[f16]) -> &[u8] {
    // SAFETY: f16 is 2 plain bytes; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }
}

fn bytemuck_cast_mut(v: &mut [f16]) -> &mut [u8] {
    // SAFETY: as above, for a mutable view.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 2) }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n = args
        .get(1)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(64)
        << 20;
    let runs = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let alpha = 0.3f32;
    let mut x: u32 = 12345;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f16::from_f32((x as f32 / u32::MAX as f32 - 0.5) * 0.2)
    };
    let a: Vec<f16> = (0..n).map(|_| next()).collect();
    let b: Vec<f16> = (0..n).map(|_| next()).collect();
    let dev = Device::Cpu;
    let ta = Tensor::from_slice(&a, n, &dev)?;
    let tb = Tensor::from_slice(&b, n, &dev)?;

    let mut out = vec![f16::ZERO; n];
    let mut t_ours = Vec::new();
    let mut t_f16 = Vec::new();
    let mut t_f32 = Vec::new();
    let (mut c16, mut c32) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        ours(&a, &b, alpha, &mut out);
        t_ours.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let r = ((tb.sub(&ta)?.affine(alpha as f64, 0.0))? + &ta)?;
        c16 = r.to_vec1::<f16>()?;
        t_f16.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let (fa, fb) = (ta.to_dtype(DType::F32)?, tb.to_dtype(DType::F32)?);
        let r = ((fb.sub(&fa)?.affine(alpha as f64, 0.0))? + &fa)?.to_dtype(DType::F16)?;
        c32 = r.to_vec1::<f16>()?;
        t_f32.push(t.elapsed().as_secs_f64());
    }
    let diff = |c: &[f16]| {
        c.iter()
            .zip(&out)
            .filter(|(p, q)| p.to_bits() != q.to_bits())
            .count()
    };
    let gbs = |t: f64| 3.0 * 2.0 * n as f64 / t / 1e9;
    let (mo, m16, m32) = (median(t_ours), median(t_f16), median(t_f32));
    println!(
        "{} M f16 elements, {runs} runs, {} threads",
        n >> 20,
        rayon::current_num_threads()
    );
    println!("mergesmith kernel     {:8.4} s  {:6.2} GB/s", mo, gbs(mo));
    println!(
        "candle f16 ops        {:8.4} s  {:6.2} GB/s  {:6.1}x slower  {:5.1}% elements differ",
        m16,
        gbs(m16),
        m16 / mo,
        100.0 * diff(&c16) as f64 / n as f64
    );
    println!(
        "candle via f32        {:8.4} s  {:6.2} GB/s  {:6.1}x slower  {:5.1}% elements differ",
        m32,
        gbs(m32),
        m32 / mo,
        100.0 * diff(&c32) as f64 / n as f64
    );
    Ok(())
}
