//! Seeds as the web UIs make them: the initial latent noise and the ancestral / SDE step noise
//! drawn bit for bit like ComfyUI and A1111, so a seed shows the image the user's own UI shows.
//!
//! Sources ([`NoiseSource`]):
//! - `cpu` (default): torch's CPU generator, which ComfyUI always uses and A1111 offers as
//!   "CPU". `torch.manual_seed(s)` seeds MT19937 with the low 32 bits of `s` (the standard
//!   initialisation); a float tensor of `n >= 16` elements is filled with uniforms
//!   `(u32 & (2^24 − 1)) · 2^-24`, then each block of 16 becomes normals by Box-Muller
//!   (`u1 = 1 − d[j]`, `u2 = d[j + 8]`, `d[j] = √(−2 ln u1) cos 2πu2`, `d[j + 8] = … sin`); when
//!   `n % 16 != 0` the last 16 uniforms are drawn again and that block recomputed. On x86 torch
//!   evaluates ln, sin and cos with the Cephes polynomials of its `avx_mathfun.h`, fused
//!   multiply-adds where the compiler contracts them; [`cephes_ln`] and [`cephes_sincos`] do the
//!   same arithmetic in the same order, which makes every value bit-exact (checked against
//!   torch 2.15 on 64 seeds × 16 384 values; with the platform's libm only 61 % are). Tensors of
//!   fewer than 16 elements take torch's scalar f64 path (pairs from 53-bit uniforms, the second
//!   of each pair kept for the next draw).
//!   Batches and step noise follow A1111: image `i` of a batch has its own generator seeded
//!   `seed + i`, and each ancestral step draws the next tensor from that generator.
//! - `nv`: A1111's "NV" source, its NumPy emulation of torch's CUDA Philox4×32-10 noise: the
//!   generator's `k`-th draw runs Philox with counter `(k, 0, i, 0)` and key `seed` for element
//!   `i`, and keeps the sine half of a Box-Muller pair in f64. Batches and steps as `cpu`.
//! - `comfyui`: ComfyUI's convention on torch's CPU generator: a batch is one tensor
//!   `[batch, 4, h, w]` drawn from `seed` (image `i` is not image 0 of seed `seed + i`), and the
//!   ancestral steps draw from a second generator seeded with the same seed (as its
//!   `default_noise_sampler` does when the model runs on the CPU; on a GPU ComfyUI draws those
//!   from the CUDA generator instead, which `nv` approximates).
//!
//! The SDE samplers' noise is drawn the same way; the UIs draw theirs from torchsde's
//! Brownian tree, which is not reproduced (said in the docs).

use crate::noise::Mt19937;

/// Where a generation's noise comes from (see the module docs).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NoiseSource {
    /// torch's CPU generator, per image `seed + i` (A1111's "CPU"; ComfyUI's for one image).
    #[default]
    Cpu,
    /// A1111's "NV": its emulation of torch's CUDA Philox generator.
    Nv,
    /// torch's CPU generator with ComfyUI's batch and step-noise convention.
    Comfyui,
}

impl crate::text::Named for NoiseSource {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("cpu", NoiseSource::Cpu),
        ("nv", NoiseSource::Nv),
        ("comfyui", NoiseSource::Comfyui),
    ];
}

impl NoiseSource {
    /// A1111's name for the source in `parameters` ("RNG: ..."), `None` for its default (CPU)
    /// and for ComfyUI's, which A1111 does not name.
    pub fn a1111_label(self) -> Option<&'static str> {
        match self {
            NoiseSource::Nv => Some("NV"),
            NoiseSource::Cpu | NoiseSource::Comfyui => None,
        }
    }

    /// The noise stream of image `index` of a batch of `images` whose first seed is `seed`,
    /// each latent `per_image` values long.
    pub fn image(self, seed: u64, index: usize, images: usize, per_image: usize) -> ImageNoise {
        let (gen_seed, batch) = match self {
            NoiseSource::Cpu | NoiseSource::Nv => (seed.wrapping_add(index as u64), 1),
            NoiseSource::Comfyui => (seed, images.max(1)),
        };
        ImageNoise {
            source: self,
            per_image,
            at: match self {
                NoiseSource::Comfyui => index,
                NoiseSource::Cpu | NoiseSource::Nv => 0,
            },
            batch,
            gen: Gen::new(self, gen_seed),
            steps: None,
            seed: gen_seed,
        }
    }

    /// What the initial noise is multiplied by for a first sigma `sigma0` on a schedule whose
    /// largest is `sigma_max`: `σ₀` (k-diffusion, A1111), `√(1 + σ₀²)` where ComfyUI's
    /// `max_denoise` holds (σ₀ within 1e-5 of σ_max, or above) or the sampler starts from unit
    /// noise (A1111's DDIM).
    pub fn start_scale(self, unit_noise: bool, sigma0: f64, sigma_max: f64) -> f64 {
        let max_denoise = self == NoiseSource::Comfyui
            && (sigma0 >= sigma_max || (sigma0 - sigma_max).abs() <= 1e-5 * sigma_max);
        match unit_noise || max_denoise {
            true => (1.0 + sigma0 * sigma0).sqrt(),
            false => sigma0,
        }
    }
}

/// One generator of a source.
enum Gen {
    Torch(Box<TorchCpu>),
    Philox(Philox),
}

impl Gen {
    fn new(source: NoiseSource, seed: u64) -> Gen {
        match source {
            NoiseSource::Nv => Gen::Philox(Philox::new(seed)),
            NoiseSource::Cpu | NoiseSource::Comfyui => Gen::Torch(Box::new(TorchCpu::new(seed))),
        }
    }

    fn randn(&mut self, n: usize) -> Vec<f32> {
        match self {
            Gen::Torch(g) => g.randn(n),
            Gen::Philox(g) => g.randn(n),
        }
    }
}

/// The noise stream of one image: [`Self::initial`] once, then [`Self::step`] per draw of a
/// stochastic sampler.
pub struct ImageNoise {
    source: NoiseSource,
    per_image: usize,
    /// The image's place in the tensors drawn (ComfyUI draws the whole batch at once).
    at: usize,
    /// Images per draw.
    batch: usize,
    gen: Gen,
    /// ComfyUI's step-noise generator, made on first use.
    steps: Option<Gen>,
    seed: u64,
}

impl ImageNoise {
    /// The initial latent noise (unit variance).
    pub fn initial(&mut self) -> Vec<f32> {
        let all = self.gen.randn(self.per_image * self.batch);
        self.mine(all)
    }

    /// The next step's noise.
    pub fn step(&mut self) -> Vec<f32> {
        let n = self.per_image * self.batch;
        let all = match self.source {
            NoiseSource::Comfyui => {
                let (source, seed) = (self.source, self.seed);
                self.steps
                    .get_or_insert_with(|| Gen::new(source, seed))
                    .randn(n)
            }
            NoiseSource::Cpu | NoiseSource::Nv => self.gen.randn(n),
        };
        self.mine(all)
    }

    fn mine(&self, mut all: Vec<f32>) -> Vec<f32> {
        if self.batch == 1 {
            return all;
        }
        all.drain(self.at * self.per_image..(self.at + 1) * self.per_image)
            .collect()
    }
}

/// A seed as written: `-1` picks 32 random bits (as A1111 does), other negatives are refused.
pub fn resolve_seed(seed: i64) -> std::result::Result<u64, String> {
    match seed {
        -1 => Ok(rand::random::<u32>() as u64),
        s if s < 0 => Err(format!(
            "seed {s} is not a seed (0 or more, or -1 for a random one)"
        )),
        s => Ok(s as u64),
    }
}

/// torch's CPU generator (`at::CPUGeneratorImpl`): MT19937 plus the cached second value of
/// its last f64 normal pair.
pub struct TorchCpu {
    mt: Mt19937,
    next_normal: Option<f64>,
}

impl TorchCpu {
    /// `torch.manual_seed(seed)`.
    pub fn new(seed: u64) -> TorchCpu {
        TorchCpu {
            mt: Mt19937::new(seed as u32),
            next_normal: None,
        }
    }

    /// `torch.randn(n)` in f32, bit for bit.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut d: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in d.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut d[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        d
    }

    /// A float uniform in [0, 1): 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1): 53 bits of two draws (the first the high word).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's scalar `normal_distribution<double>`: a Box-Muller pair, the sine half kept.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// Box-Muller on 16 uniforms in place, in torch's x86 arithmetic.
fn box_muller_16(d: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * cephes_ln(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        d[j] = radius * cos;
        d[j + 8] = radius * sin;
    }
}

/// ln x for x in (0, 1] as torch's `log256_ps` computes it (Cephes' logf: mantissa in
/// [√½, √2), a degree-8 polynomial by Horner with fused multiply-adds).
pub fn cephes_ln(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if small { m } else { 0.0 };
    m -= 1.0;
    if small {
        e -= 1.0;
    }
    m += tmp;
    let z = m * m;
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(m, *p);
    }
    y *= m;
    // The compiler fuses `y · z` into the add of `e · q1`; `z · 0.5` and `e · q2` are exact.
    y = y.mul_add(z, e * -2.121_944_4e-4);
    y -= z * 0.5;
    (m + y) + e * 0.693_359_4
}

/// (sin x, cos x) for x in [0, 2π) as torch's `sincos256_ps` computes them (Cephes' sinf and
/// cosf: reduction by π/4 in three parts, two polynomials, fused multiply-adds in the
/// polynomials only).
pub fn cephes_sincos(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let j = (((x * 1.273_239_5) as i32) + 1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let sin_poly_first = (j & 2) == 0;
    x += y * -0.785_156_25;
    x += y * -2.418_756_5e-4;
    x += y * -3.774_895e-8;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sin;
    let z = x * x;
    let mut c = 2.443_315_7e-5f32;
    c = c.mul_add(z, -1.388_731_6e-3);
    c = c.mul_add(z, 4.166_664_6e-2);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = -1.951_529_6e-4f32;
    s = s.mul_add(z, 8.332_161e-3);
    s = s.mul_add(z, -1.666_665_5e-1);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if sin_poly_first { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// A1111's NV source: its NumPy emulation of torch's CUDA Philox noise.
pub struct Philox {
    seed: u64,
    offset: u32,
}

impl Philox {
    /// A generator for `seed`, at its first draw.
    pub fn new(seed: u64) -> Philox {
        Philox { seed, offset: 0 }
    }

    /// The next draw of `n` normals.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        const M: [u64; 2] = [0xD251_1F53, 0xCD9E_8D57];
        const W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
        let inv = 2.328_306_4e-10f32;
        let inv_2pi = (2.328_306_4e-10f64 * 6.283_185_5f64) as f32;
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                let mut c = [offset, 0, i as u32, 0];
                let mut k = [self.seed as u32, (self.seed >> 32) as u32];
                for round in 0..10 {
                    let v1 = c[0] as u64 * M[0];
                    let v2 = c[2] as u64 * M[1];
                    c = [
                        (v2 >> 32) as u32 ^ c[1] ^ k[0],
                        v2 as u32,
                        (v1 >> 32) as u32 ^ c[3] ^ k[1],
                        v1 as u32,
                    ];
                    if round < 9 {
                        k = [k[0].wrapping_add(W[0]), k[1].wrapping_add(W[1])];
                    }
                }
                let u = c[0] as f64 * inv as f64 + (inv / 2.0) as f64;
                let v = c[1] as f64 * inv_2pi as f64 + (inv_2pi / 2.0) as f64;
                ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First values of `torch.manual_seed(s); torch.randn(n)` (torch 2.15, x86), pasted.
    #[test]
    fn torch_cpu_randn_known_answers() {
        let cases: &[(u64, usize, &[f32], f32)] = &[
            (
                0,
                16,
                &[-1.125_839_8, -1.152_360_2, -0.250_578_58, -0.433_878_8],
                -0.247_278_15,
            ),
            (
                1,
                17,
                &[-1.525_595_9, -1.160_761_5, 0.699_542_4, 0.199_081_63],
                -0.798_439_8,
            ),
            (
                42,
                4 * 64 * 64,
                &[1.926_915_3, 1.487_284_1, 0.900_717_2, -2.105_521],
                -0.293_406_1,
            ),
        ];
        for &(seed, n, first, last) in cases {
            let v = TorchCpu::new(seed).randn(n);
            assert_eq!(v.len(), n);
            for (got, want) in v.iter().zip(first) {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "seed {seed} n {n}: {got} {want}"
                );
            }
            assert_eq!(v[n - 1].to_bits(), last.to_bits(), "seed {seed} n {n} last");
        }
    }

    /// `torch.manual_seed(7); torch.randn(5)` (the f64 path) and a seed over 32 bits
    /// (`torch.manual_seed(2**40 + 3); torch.randn(32)` keeps only the low 32 bits).
    #[test]
    fn torch_cpu_small_and_wide_seeds() {
        let v = TorchCpu::new(7).randn(5);
        let five: [f32; 5] = [
            -0.146_795_1,
            0.786_141_3,
            0.946_821_63,
            -1.114_344,
            1.690_790_2,
        ];
        for (got, want) in v.iter().zip(five) {
            assert_eq!(got.to_bits(), want.to_bits(), "{got} {want}");
        }
        // `torch.manual_seed(7); torch.rand(3); torch.randn(3)`: the f64 path after three
        // float uniforms.
        let want: [f32; 3] = [-0.032_551_974, 1.011_054_4, 1.771_493_8];
        let mut g = TorchCpu::new(7);
        let _ = (0..3).map(|_| g.uniform_f32()).count();
        let after = g.randn(3);
        for (a, b) in after.iter().zip(want) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} {b}");
        }
        assert_eq!(
            TorchCpu::new((1u64 << 40) + 3).randn(32),
            TorchCpu::new(3).randn(32)
        );
    }

    /// `torch.manual_seed(7); torch.randn(17)`: the last block of 16 is drawn again.
    #[test]
    fn torch_cpu_redraws_the_last_block() {
        let want: [f32; 17] = [
            -0.820_134_5,
            -0.324_566_63,
            1.926_368_1,
            -0.330_011_73,
            0.198_445_05,
            0.782_072_66,
            1.039_107_7,
            -0.724_510_7,
            -0.848_908_6,
            -0.215_341_52,
            -1.815_728_7,
            -0.345_241_96,
            -2.061_478,
            0.674_100_7,
            -1.323_345_8,
            -1.359_769,
            -0.866_701_6,
        ];
        let got = TorchCpu::new(7).randn(17);
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.to_bits(), w.to_bits(), "{g} {w}");
        }
    }

    /// Every value of 64 seeds × 16 384 against a dump from torch, when the developer has one
    /// (`MERGESMITH_TORCH_RANDN=file`: f32 little-endian, `torch.manual_seed(s);
    /// torch.randn(4*64*64)` for s in 0..64).
    #[test]
    fn torch_cpu_against_a_dump() {
        let Ok(path) = std::env::var("MERGESMITH_TORCH_RANDN") else {
            return;
        };
        let raw = std::fs::read(path).expect("the dump");
        let n = 4 * 64 * 64;
        let mut exact = 0usize;
        for (s, want) in raw.chunks_exact(n * 4).enumerate() {
            let got = TorchCpu::new(s as u64).randn(n);
            for (g, w) in got.iter().zip(want.chunks_exact(4)) {
                exact += usize::from(g.to_le_bytes() == w);
            }
        }
        assert_eq!(exact, raw.len() / 4);
    }

    /// Mean and variance of a long draw (a sanity check on the transform, tolerance 1 %).
    #[test]
    fn torch_cpu_moments() {
        let v = TorchCpu::new(123).randn(1 << 18);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.01, "{var}");
    }

    /// The Cephes kernels against f64 ln / sin / cos: within 2 f32 ulp over their range.
    #[test]
    fn cephes_kernels_are_accurate() {
        for i in 1..=100_000u32 {
            let x = i as f32 / 100_000.0;
            let got = cephes_ln(x) as f64;
            let want = (x as f64).ln();
            assert!((got - want).abs() <= 2.0 * f32::EPSILON as f64 * want.abs().max(1e-3));
            let t = x * std::f32::consts::TAU;
            let (s, c) = cephes_sincos(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 3e-7, "sin {t}");
            assert!((c as f64 - (t as f64).cos()).abs() < 3e-7, "cos {t}");
        }
    }

    /// A1111's own docstring: `Generator(seed=0).randn(shape=(3, 4))`, as printed by torch on
    /// CUDA (8 significant digits; the emulation agrees to 1e-6), and the emulation's values
    /// bit for bit (produced once with A1111's `rng_philox.py` under NumPy 2, pasted).
    #[test]
    fn nv_known_answers() {
        let doc = [
            -0.924_662_59,
            -0.425_344_15,
            -2.643_845_7,
            0.145_183_88,
            -0.120_866_47,
            -0.579_725_64,
            -0.622_851_22,
            -0.328_387_09,
            -1.074_542_31,
            -0.363_144_07,
            -1.671_050_67,
            2.265_504_97,
        ];
        let v = Philox::new(0).randn(12);
        for (got, want) in v.iter().zip(doc) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} {want}");
        }
        let exact: [f32; 4] = [-0.924_662_4, -0.425_343_96, -2.643_845_8, 0.145_183_88];
        for (got, want) in v.iter().zip(exact) {
            assert_eq!(got.to_bits(), want.to_bits(), "{got} {want}");
        }
        let mut g = Philox::new(12345);
        let a = g.randn(256);
        let b = g.randn(256);
        let first_a: [f32; 4] = [0.578_641_3, -0.524_755_5, -0.291_903_73, 0.014_013_895];
        let first_b: [f32; 4] = [2.701_285_1, -0.710_389_6, -1.375_463_2, -1.519_984_7];
        for (got, want) in a.iter().zip(first_a).chain(b.iter().zip(first_b)) {
            assert_eq!(got.to_bits(), want.to_bits(), "{got} {want}");
        }
        assert_eq!(a[255].to_bits(), 0.053_509_984f32.to_bits());
        assert_eq!(b[255].to_bits(), (-1.186_336f32).to_bits());
        let wide = Philox::new((1u64 << 33) + 7).randn(3);
        let want: [f32; 3] = [-0.283_731_34, -1.421_323_1, 0.721_331_54];
        for (got, want) in wide.iter().zip(want) {
            assert_eq!(got.to_bits(), want.to_bits(), "{got} {want}");
        }
    }

    /// Batches: A1111's image `i` is seed `seed + i` alone; ComfyUI's batch is one draw.
    #[test]
    fn batch_conventions() {
        let per = 64;
        let a1111 = NoiseSource::Cpu.image(10, 1, 2, per).initial();
        assert_eq!(a1111, TorchCpu::new(11).randn(per));
        let comfy = NoiseSource::Comfyui.image(10, 1, 2, per).initial();
        assert_eq!(comfy, TorchCpu::new(10).randn(2 * per)[per..]);
        // Step noise: A1111 continues the image's generator; ComfyUI restarts from the seed.
        let mut b = NoiseSource::Cpu.image(10, 0, 1, per);
        let _ = b.initial();
        let mut g = TorchCpu::new(10);
        let _ = g.randn(per);
        assert_eq!(b.step(), g.randn(per));
        let mut c = NoiseSource::Comfyui.image(10, 0, 1, per);
        let first = c.initial();
        assert_eq!(c.step(), first);
        let mut nv = NoiseSource::Nv.image(5, 0, 1, per);
        let _ = nv.initial();
        let mut p = Philox::new(5);
        let _ = p.randn(per);
        assert_eq!(nv.step(), p.randn(per));
        // ComfyUI's max_denoise scaling at the top of the schedule only.
        let (s0, max) = (14.614_642, 14.614_642);
        assert_eq!(NoiseSource::Cpu.start_scale(false, s0, max), s0);
        let full = (1.0f64 + s0 * s0).sqrt();
        assert_eq!(NoiseSource::Comfyui.start_scale(false, s0, max), full);
        assert_eq!(NoiseSource::Comfyui.start_scale(false, 7.0, max), 7.0);
        assert_eq!(NoiseSource::Cpu.start_scale(true, s0, max), full);
    }
}
