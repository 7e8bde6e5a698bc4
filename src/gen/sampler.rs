//! Samplers over the Stable Diffusion noise schedule, in k-diffusion's form (as the web UI
//! runs them): a denoiser maps a noisy latent `x` at noise level `σ` to its estimate of the
//! clean latent, and a sampler walks a decreasing list of sigmas down to 0.
//!
//! - The schedule is SD's training schedule: 1000 "scaled linear" betas from 0.00085 to 0.012,
//!   `σ_t = √((1 − ᾱ_t) / ᾱ_t)`.
//! - Sigma lists: `normal` (k-diffusion's discrete schedule: timesteps evenly spaced from 999
//!   to 0, σ interpolated in log space), `karras` (ρ = 7 between the model's σ_min and σ_max),
//!   `ddim` (the timesteps of CompVis' DDIM, `0, c, 2c, ... + 1` with `c = 1000 / steps`,
//!   ending at ᾱ_0 instead of 0, as DDIM does).
//! - Steps: Euler, Euler ancestral (η = 1), DPM++ 2M (multistep, second order), and DDIM
//!   (η = 0, which in this form is an Euler step on the DDIM sigmas).
//!
//! Everything runs on candle tensors, so the same code serves the CPU and the GPU; noise comes
//! from the caller (seeded streams, so a seed gives the same image on the same device).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A sampler, by its web UI name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Euler ancestral ("Euler a").
    EulerA,
    /// Euler.
    Euler,
    /// DDIM (η = 0).
    Ddim,
    /// DPM++ 2M (with Karras sigmas, as the web UI's default for it).
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
}

impl crate::text::Named for Sampler {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("euler-a", Sampler::EulerA),
        ("euler", Sampler::Euler),
        ("ddim", Sampler::Ddim),
        ("dpmpp-2m", Sampler::DpmPp2m),
    ];
}

impl Sampler {
    /// The name the web UI writes in `parameters`.
    pub fn label(self) -> &'static str {
        match self {
            Sampler::EulerA => "Euler a",
            Sampler::Euler => "Euler",
            Sampler::Ddim => "DDIM",
            Sampler::DpmPp2m => "DPM++ 2M",
        }
    }

    /// The sigmas it walks for `steps` steps (ending at 0, or at ᾱ_0's σ for DDIM).
    pub fn sigmas(self, schedule: &Schedule, steps: usize) -> Vec<f64> {
        match self {
            Sampler::EulerA | Sampler::Euler => schedule.normal(steps),
            Sampler::Ddim => schedule.ddim(steps),
            Sampler::DpmPp2m => schedule.karras(steps),
        }
    }
}

/// SD's noise schedule: σ for each of the 1000 training timesteps.
#[derive(Debug, Clone)]
pub struct Schedule {
    sigmas: Vec<f64>,
}

impl Default for Schedule {
    fn default() -> Self {
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut cumprod = 1.0;
        let sigmas = (0..1000)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
                cumprod *= 1.0 - beta;
                ((1.0 - cumprod) / cumprod).sqrt()
            })
            .collect();
        Schedule { sigmas }
    }
}

impl Schedule {
    /// σ at timestep 0 (the smallest).
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    /// σ at timestep 999 (the largest).
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[999]
    }

    /// σ at a fractional timestep, interpolated linearly in log σ.
    fn sigma_at(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, 999.0);
        let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
        let w = t - lo as f64;
        if w == 0.0 {
            return self.sigmas[lo];
        }
        ((1.0 - w) * self.sigmas[lo].ln() + w * self.sigmas[hi].ln()).exp()
    }

    /// The fractional timestep of σ (the inverse of the log-linear interpolation), which the
    /// U-Net is conditioned on.
    pub fn timestep(&self, sigma: f64) -> f64 {
        let ls = sigma.ln();
        if ls <= self.sigmas[0].ln() {
            return 0.0;
        }
        for i in 0..999 {
            let (a, b) = (self.sigmas[i].ln(), self.sigmas[i + 1].ln());
            if ls <= b {
                return i as f64 + (ls - a) / (b - a);
            }
        }
        999.0
    }

    /// k-diffusion's discrete schedule: `steps` timesteps evenly spaced from 999 to 0, then 0.
    pub fn normal(&self, steps: usize) -> Vec<f64> {
        let mut out: Vec<f64> = (0..steps)
            .map(|i| {
                let t = match steps {
                    1 => 999.0,
                    _ => 999.0 * (1.0 - i as f64 / (steps - 1) as f64),
                };
                self.sigma_at(t)
            })
            .collect();
        out.push(0.0);
        out
    }

    /// Karras et al.'s schedule (ρ = 7) from σ_max to σ_min, then 0.
    pub fn karras(&self, steps: usize) -> Vec<f64> {
        let rho = 7.0;
        let (lo, hi) = (
            self.sigma_min().powf(1.0 / rho),
            self.sigma_max().powf(1.0 / rho),
        );
        let mut out: Vec<f64> = (0..steps)
            .map(|i| {
                let r = if steps == 1 {
                    0.0
                } else {
                    i as f64 / (steps - 1) as f64
                };
                (hi + r * (lo - hi)).powf(rho)
            })
            .collect();
        out.push(0.0);
        out
    }

    /// CompVis DDIM's timesteps (`c = 1000 / steps`; `0, c, 2c, ...` plus 1), from the
    /// largest down, ending at timestep 0's σ (DDIM's final ᾱ_prev is ᾱ_0).
    pub fn ddim(&self, steps: usize) -> Vec<f64> {
        let c = (1000 / steps.max(1)).max(1);
        let mut ts: Vec<usize> = (0..1000).step_by(c).map(|t| (t + 1).min(999)).collect();
        ts.reverse();
        let mut out: Vec<f64> = ts.into_iter().map(|t| self.sigmas[t]).collect();
        out.push(self.sigma_min());
        out
    }
}

fn err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("sampling: {e}"))
}

/// Runs `sampler` from `x` (already scaled to the first sigma) down `sigmas`. `denoise(x, σ)`
/// returns the clean estimate; `noise(i)` a standard normal tensor shaped like `x` for
/// ancestral step `i`.
pub fn sample(
    sampler: Sampler,
    x: Tensor,
    sigmas: &[f64],
    mut denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    mut noise: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut x = x;
    let mut old: Option<Tensor> = None;
    for i in 0..sigmas.len().saturating_sub(1) {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoise(&x, s)?;
        x = match sampler {
            Sampler::Euler | Sampler::Ddim => euler(&x, &denoised, s, next)?,
            Sampler::EulerA => {
                let up = if next > 0.0 {
                    (next * next * (s * s - next * next) / (s * s))
                        .sqrt()
                        .min(next)
                } else {
                    0.0
                };
                let down = (next * next - up * up).max(0.0).sqrt();
                let stepped = euler(&x, &denoised, s, down)?;
                match up > 0.0 {
                    true => (stepped + (noise(i)? * up).map_err(err)?).map_err(err)?,
                    false => stepped,
                }
            }
            Sampler::DpmPp2m => {
                let t = |sigma: f64| -sigma.ln();
                // The first and the last step are first order.
                let d = match (&old, next > 0.0, i) {
                    (Some(prev), true, i) if i > 0 => {
                        let h = t(next) - t(s);
                        let h_last = t(s) - t(sigmas[i - 1]);
                        let r = h_last / h;
                        let a = 1.0 + 1.0 / (2.0 * r);
                        let b = 1.0 / (2.0 * r);
                        ((&denoised * a).map_err(err)? - (prev * b).map_err(err)?).map_err(err)?
                    }
                    _ => denoised.clone(),
                };
                if next > 0.0 {
                    let h = t(next) - t(s);
                    let kept = (&x * (next / s)).map_err(err)?;
                    (kept - (d * ((-h).exp() - 1.0)).map_err(err)?).map_err(err)?
                } else {
                    d
                }
            }
        };
        old = Some(denoised);
    }
    Ok(x)
}

/// One Euler step of the probability-flow ODE from σ `s` to `next`.
fn euler(x: &Tensor, denoised: &Tensor, s: f64, next: f64) -> Result<Tensor> {
    let d = ((x - denoised).map_err(err)? / s).map_err(err)?;
    (x + (d * (next - s)).map_err(err)?).map_err(err)
}
