//! Samplers over the Stable Diffusion noise schedule, in k-diffusion's form (as A1111 and
//! ComfyUI run them): a denoiser maps a noisy latent `x` at noise level `σ` to its estimate of
//! the clean latent, and a sampler walks a decreasing list of sigmas down to 0.
//!
//! - The schedule is SD's training schedule: 1000 "scaled linear" betas from 0.00085 to 0.012,
//!   `σ_t = √((1 − ᾱ_t) / ᾱ_t)`.
//! - Sigma lists ([`ScheduleKind`]), as k-diffusion / ComfyUI define them: `normal` (A1111's
//!   "Uniform" and "Normal": timesteps evenly spaced from 999 to 0, σ interpolated in log
//!   space), `karras` (ρ = 7 between the model's σ_min and σ_max), `exponential` (evenly in
//!   log σ), `sgm_uniform` (`normal` over `steps + 1` points without the last), `simple`
//!   (every `1000 / steps`-th training sigma from the top), `beta` (timesteps at the quantiles
//!   of a Beta(0.6, 0.6) distribution, repeats dropped), `ddim_uniform` (timesteps
//!   `1, 1 + c, ...` with `c = 1000 / steps`). Each sampler has A1111's "Automatic" default.
//! - Steps: k-diffusion's Euler, Euler ancestral, Heun, DPM2, LMS (order 4), DPM++ 2S
//!   ancestral, DPM++ 2M, DPM++ SDE and DPM++ 2M SDE (η = 1, s_noise = 1, no churn), and
//!   A1111's DDIM (η = 0: timesteps `1, 1 + c, ...` for `c = 1000 / steps`, one model call
//!   fewer than timesteps, starting from unit noise in the model's own units and ending at
//!   timestep 1, not 0).
//!
//! Everything runs on candle tensors, so the same code serves the CPU and the GPU; noise comes
//! from the caller ([`crate::gen::noise`]: the UIs' generators).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A sampler, by its web UI name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Euler ancestral ("Euler a").
    #[serde(alias = "euler_ancestral")]
    EulerA,
    /// Euler.
    Euler,
    /// Heun (second order, two model calls a step).
    Heun,
    /// DPM2 (second order, A1111's default drops the next-to-last sigma).
    #[serde(rename = "dpm_2", alias = "dpm2")]
    Dpm2,
    /// Linear multistep (order 4).
    Lms,
    /// DPM++ 2S ancestral.
    #[serde(rename = "dpmpp_2s_a", alias = "dpmpp_2s_ancestral")]
    DpmPp2sA,
    /// DPM++ 2M (multistep, second order).
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    /// DPM++ SDE (stochastic, two model calls a step).
    #[serde(rename = "dpmpp_sde")]
    DpmPpSde,
    /// DPM++ 2M SDE (stochastic multistep, midpoint).
    #[serde(rename = "dpmpp_2m_sde")]
    DpmPp2mSde,
    /// A1111's DDIM (η = 0).
    Ddim,
    /// UniPC, B(h) = h (ComfyUI's `uni_pc`; A1111's "UniPC" variant bh1).
    #[serde(rename = "uni_pc", alias = "unipc")]
    UniPc,
    /// UniPC, B(h) = eʰ − 1 (ComfyUI's `uni_pc_bh2`).
    #[serde(rename = "uni_pc_bh2")]
    UniPcBh2,
}

impl crate::text::Named for Sampler {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("euler_a", Sampler::EulerA),
        ("euler", Sampler::Euler),
        ("heun", Sampler::Heun),
        ("dpm_2", Sampler::Dpm2),
        ("lms", Sampler::Lms),
        ("dpmpp_2s_a", Sampler::DpmPp2sA),
        ("dpmpp_2m", Sampler::DpmPp2m),
        ("dpmpp_sde", Sampler::DpmPpSde),
        ("dpmpp_2m_sde", Sampler::DpmPp2mSde),
        ("ddim", Sampler::Ddim),
        ("uni_pc", Sampler::UniPc),
        ("uni_pc_bh2", Sampler::UniPcBh2),
        // Earlier command-line spellings, ComfyUI's names and A1111's labels.
        ("euler-a", Sampler::EulerA),
        ("dpm-2", Sampler::Dpm2),
        ("dpmpp-2s-a", Sampler::DpmPp2sA),
        ("dpmpp-2m", Sampler::DpmPp2m),
        ("dpmpp-sde", Sampler::DpmPpSde),
        ("dpmpp-2m-sde", Sampler::DpmPp2mSde),
        ("euler_ancestral", Sampler::EulerA),
        ("dpmpp_2s_ancestral", Sampler::DpmPp2sA),
        ("Euler a", Sampler::EulerA),
        ("Euler", Sampler::Euler),
        ("Heun", Sampler::Heun),
        ("DPM2", Sampler::Dpm2),
        ("LMS", Sampler::Lms),
        ("DPM++ 2S a", Sampler::DpmPp2sA),
        ("DPM++ 2M", Sampler::DpmPp2m),
        ("DPM++ SDE", Sampler::DpmPpSde),
        ("DPM++ 2M SDE", Sampler::DpmPp2mSde),
        ("DDIM", Sampler::Ddim),
        ("UniPC", Sampler::UniPc),
        ("unipc", Sampler::UniPc),
    ];
}

impl Sampler {
    /// Every sampler.
    pub const ALL: [Sampler; 12] = [
        Sampler::EulerA,
        Sampler::Euler,
        Sampler::Heun,
        Sampler::Dpm2,
        Sampler::Lms,
        Sampler::DpmPp2sA,
        Sampler::DpmPp2m,
        Sampler::DpmPpSde,
        Sampler::DpmPp2mSde,
        Sampler::Ddim,
        Sampler::UniPc,
        Sampler::UniPcBh2,
    ];

    /// The name the web UI writes in `parameters`.
    pub fn label(self) -> &'static str {
        match self {
            Sampler::EulerA => "Euler a",
            Sampler::Euler => "Euler",
            Sampler::Heun => "Heun",
            Sampler::Dpm2 => "DPM2",
            Sampler::Lms => "LMS",
            Sampler::DpmPp2sA => "DPM++ 2S a",
            Sampler::DpmPp2m => "DPM++ 2M",
            Sampler::DpmPpSde => "DPM++ SDE",
            Sampler::DpmPp2mSde => "DPM++ 2M SDE",
            Sampler::Ddim => "DDIM",
            Sampler::UniPc => "UniPC",
            Sampler::UniPcBh2 => "UniPC bh2",
        }
    }

    /// Its name in ComfyUI (and k-diffusion's `sample_*`).
    pub fn comfyui_name(self) -> &'static str {
        match self {
            Sampler::EulerA => "euler_ancestral",
            Sampler::Euler => "euler",
            Sampler::Heun => "heun",
            Sampler::Dpm2 => "dpm_2",
            Sampler::Lms => "lms",
            Sampler::DpmPp2sA => "dpmpp_2s_ancestral",
            Sampler::DpmPp2m => "dpmpp_2m",
            Sampler::DpmPpSde => "dpmpp_sde",
            Sampler::DpmPp2mSde => "dpmpp_2m_sde",
            Sampler::Ddim => "ddim",
            Sampler::UniPc => "uni_pc",
            Sampler::UniPcBh2 => "uni_pc_bh2",
        }
    }

    /// U-Net evaluations per step (each a pair with guidance); the last step of the
    /// two-call samplers makes one.
    pub fn calls_per_step(self) -> usize {
        match self {
            Sampler::Heun | Sampler::Dpm2 | Sampler::DpmPp2sA | Sampler::DpmPpSde => 2,
            _ => 1,
        }
    }

    /// A1111's "Automatic" schedule for it; `None` for DDIM, which walks its own timesteps.
    pub fn default_schedule(self) -> Option<ScheduleKind> {
        match self {
            Sampler::EulerA
            | Sampler::Euler
            | Sampler::Heun
            | Sampler::Lms
            | Sampler::UniPc
            | Sampler::UniPcBh2 => Some(ScheduleKind::Normal),
            Sampler::Dpm2 | Sampler::DpmPp2sA | Sampler::DpmPp2m | Sampler::DpmPpSde => {
                Some(ScheduleKind::Karras)
            }
            Sampler::DpmPp2mSde => Some(ScheduleKind::Exponential),
            Sampler::Ddim => None,
        }
    }

    /// Whether it draws noise during sampling.
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            Sampler::EulerA | Sampler::DpmPp2sA | Sampler::DpmPpSde | Sampler::DpmPp2mSde
        )
    }

    /// Whether it runs on a rectified-flow model (Flux, SD3): the k-diffusion ODE samplers
    /// do; the ancestral and SDE ones add noise in SD's variance-exploding form, which ComfyUI
    /// replaces with a flow-specific renoising mergesmith does not have yet, and A1111's DDIM
    /// and UniPC's variance-preserving conversion are SD's alone.
    pub fn check_flow(self) -> Result<()> {
        let sd_only = |s: Sampler| {
            s.is_stochastic() || matches!(s, Sampler::Ddim | Sampler::UniPc | Sampler::UniPcBh2)
        };
        if sd_only(self) {
            let ok: Vec<&str> = Sampler::ALL
                .iter()
                .filter(|s| !sd_only(**s))
                .map(|s| crate::text::Named::name(*s))
                .collect();
            return Err(Error::Invalid(format!(
                "sampler `{}` does not run on flow models (Flux, SD3) yet; these do: {}",
                crate::text::Named::name(self),
                ok.join(", ")
            )));
        }
        Ok(())
    }

    /// Whether it starts from unit noise in the model's units (`noise · √(1 + σ₀²)` in
    /// sigma units) rather than from `noise · σ₀`: A1111's DDIM.
    pub fn starts_from_unit_noise(self) -> bool {
        self == Sampler::Ddim
    }

    /// Whether it can walk schedule `kind` (`None`: its own): A1111's DDIM takes none.
    pub fn check_schedule(self, kind: Option<ScheduleKind>) -> Result<()> {
        match (self, kind) {
            (Sampler::Ddim, Some(kind)) => Err(Error::Invalid(format!(
                "A1111's DDIM walks its own timesteps and takes no schedule (asked for `{}`); \
                 ComfyUI's ddim is Euler: write `sampler: euler, schedule: {}`",
                crate::text::Named::name(kind),
                crate::text::Named::name(kind),
            ))),
            _ => Ok(()),
        }
    }

    /// The sigmas it walks for `steps` steps on schedule `kind` (`None`: its default). DPM2
    /// drops the next-to-last sigma of a `steps + 1` schedule, as A1111 does. DDIM's end at
    /// timestep 1's σ, the others at 0.
    pub fn sigmas(
        self,
        schedule: &Schedule,
        kind: Option<ScheduleKind>,
        steps: usize,
    ) -> Result<Vec<f64>> {
        self.check_schedule(kind)?;
        let Some(kind) = kind.or(self.default_schedule()) else {
            return Ok(schedule.ddim(steps));
        };
        if self == Sampler::Dpm2 {
            let mut s = schedule.of(kind, steps + 1);
            let n = s.len();
            if n >= 3 {
                s.remove(n - 2);
            }
            return Ok(s);
        }
        Ok(schedule.of(kind, steps))
    }
}

/// A list of sigmas over the training schedule, by its ComfyUI name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Timesteps evenly spaced from 999 to 0 (A1111's "Uniform" and "Normal").
    #[serde(alias = "uniform")]
    Normal,
    /// Karras et al., ρ = 7.
    Karras,
    /// Evenly spaced in log σ.
    Exponential,
    /// SGM's: `normal` over `steps + 1` timesteps without the last.
    SgmUniform,
    /// Every `1000 / steps`-th training sigma from the top.
    Simple,
    /// Timesteps at Beta(0.6, 0.6) quantiles.
    Beta,
    /// Timesteps `1, 1 + c, ...`, `c = 1000 / steps` (ComfyUI's ddim_uniform).
    DdimUniform,
}

impl crate::text::Named for ScheduleKind {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("normal", ScheduleKind::Normal),
        ("karras", ScheduleKind::Karras),
        ("exponential", ScheduleKind::Exponential),
        ("sgm_uniform", ScheduleKind::SgmUniform),
        ("simple", ScheduleKind::Simple),
        ("beta", ScheduleKind::Beta),
        ("ddim_uniform", ScheduleKind::DdimUniform),
        ("uniform", ScheduleKind::Normal),
        ("Uniform", ScheduleKind::Normal),
        ("Normal", ScheduleKind::Normal),
        ("Karras", ScheduleKind::Karras),
        ("Exponential", ScheduleKind::Exponential),
        ("SGM Uniform", ScheduleKind::SgmUniform),
        ("Simple", ScheduleKind::Simple),
        ("Beta", ScheduleKind::Beta),
        ("sgm-uniform", ScheduleKind::SgmUniform),
        ("ddim-uniform", ScheduleKind::DdimUniform),
    ];
}

impl ScheduleKind {
    /// Every schedule.
    pub const ALL: [ScheduleKind; 7] = [
        ScheduleKind::Normal,
        ScheduleKind::Karras,
        ScheduleKind::Exponential,
        ScheduleKind::SgmUniform,
        ScheduleKind::Simple,
        ScheduleKind::Beta,
        ScheduleKind::DdimUniform,
    ];

    /// What it is, in a line.
    pub fn summary(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "timesteps evenly spaced from 999 to 0, σ interpolated in log σ (A1111's Uniform and Normal, ComfyUI's normal)",
            ScheduleKind::Karras => "Karras et al., ρ = 7, from σ_max to σ_min",
            ScheduleKind::Exponential => "evenly spaced in log σ from σ_max to σ_min",
            ScheduleKind::SgmUniform => "`normal` over steps + 1 timesteps, the last dropped",
            ScheduleKind::Simple => "every (1000 / steps)-th training σ from the top",
            ScheduleKind::Beta => "timesteps at the quantiles 1 − i/steps of Beta(0.6, 0.6), rounded, repeats dropped",
            ScheduleKind::DdimUniform => "timesteps 1, 1 + c, 1 + 2c, … (c = 1000 / steps), from the top",
        }
    }

    /// The label A1111 writes as "Schedule type" (ComfyUI's name where A1111 has none).
    pub fn label(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "Normal",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
            ScheduleKind::SgmUniform => "SGM Uniform",
            ScheduleKind::Simple => "Simple",
            ScheduleKind::Beta => "Beta",
            ScheduleKind::DdimUniform => "ddim_uniform",
        }
    }
}

/// The samplers and schedules as Markdown tables (the docs' tables; a test keeps them current).
pub fn markdown() -> String {
    use crate::text::Named;
    let mut s = String::from(
        "| sampler | A1111 | ComfyUI | schedule by default | U-Net calls a step | draws noise |\n|---|---|---|---|---|---|\n",
    );
    for x in Sampler::ALL {
        s.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} | {} |\n",
            x.name(),
            x.label(),
            x.comfyui_name(),
            match x.default_schedule() {
                Some(k) => format!("`{}`", k.name()),
                None => "its own timesteps".into(),
            },
            x.calls_per_step(),
            if x.is_stochastic() { "yes" } else { "no" },
        ));
    }
    s.push_str("\n| schedule | A1111 label | sigmas |\n|---|---|---|\n");
    for k in ScheduleKind::ALL {
        s.push_str(&format!(
            "| `{}` | {} | {} |\n",
            k.name(),
            k.label(),
            k.summary()
        ));
    }
    s
}

/// A model's noise schedule: σ for each of its training timesteps, and how a continuous
/// timestep maps to σ and back (ComfyUI's `model_sampling`).
#[derive(Debug, Clone)]
pub struct Schedule {
    sigmas: Vec<f64>,
    curve: Curve,
}

/// How timesteps map to σ.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Curve {
    /// SD's discrete schedule: timestep `t` is table index `t`, log σ interpolated between.
    Discrete,
    /// Rectified flow with SD3's shift (ComfyUI's `ModelSamplingDiscreteFlow`): timestep
    /// `t` is σ = shift(t / multiplier), shift(x) = αx / (1 + (α − 1)x); σ's timestep is
    /// σ · multiplier.
    Flow { shift: f64, multiplier: f64 },
    /// Flux dev's exponential shift (ComfyUI's `ModelSamplingFlux`): timestep `t` is
    /// σ = e^μ / (e^μ + 1/t − 1); σ's timestep is σ itself.
    Flux { mu: f64 },
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
        Schedule {
            sigmas,
            curve: Curve::Discrete,
        }
    }
}

impl Schedule {
    /// A rectified-flow schedule of 1000 timesteps with SD3's `shift` and timestep
    /// `multiplier` (SD3 / SD3.5: 3.0 and 1000; Flux schnell: 1.0 and 1.0).
    pub fn flow(shift: f64, multiplier: f64) -> Schedule {
        let curve = Curve::Flow { shift, multiplier };
        Self::of_curve(curve, 1000, multiplier)
    }

    /// Flux dev's schedule: 10000 timesteps shifted by `mu` (ComfyUI: 1.15).
    pub fn flux(mu: f64) -> Schedule {
        Self::of_curve(Curve::Flux { mu }, 10000, 1.0)
    }

    /// The table of `n` timesteps `i / n · scale` (i = 1..=n) under `curve`.
    fn of_curve(curve: Curve, n: usize, scale: f64) -> Schedule {
        let mut s = Schedule {
            sigmas: Vec::new(),
            curve,
        };
        s.sigmas = (1..=n)
            .map(|i| s.sigma_at(i as f64 / n as f64 * scale))
            .collect();
        s
    }

    /// Whether the model is a rectified flow (x = (1 − σ)·x₀ + σ·noise, predicting the
    /// velocity) rather than SD's variance-exploding form.
    pub fn is_flow(&self) -> bool {
        self.curve != Curve::Discrete
    }

    /// The smallest σ of the table.
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    /// The largest σ of the table.
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// σ at table index `t` (clamped to the table).
    pub fn sigma(&self, t: usize) -> f64 {
        self.sigmas[t.min(self.sigmas.len() - 1)]
    }

    /// σ at a fractional timestep: interpolated linearly in log σ (SD), or the flow's shift.
    fn sigma_at(&self, t: f64) -> f64 {
        match self.curve {
            Curve::Discrete => {}
            Curve::Flow { shift, multiplier } => {
                let x = t / multiplier;
                return match shift == 1.0 {
                    true => x,
                    false => shift * x / (1.0 + (shift - 1.0) * x),
                };
            }
            Curve::Flux { mu } => {
                let e = mu.exp();
                return e / (e + (1.0 / t - 1.0));
            }
        }
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
        match self.curve {
            Curve::Discrete => {}
            Curve::Flow { multiplier, .. } => return sigma * multiplier,
            Curve::Flux { .. } => return sigma,
        }
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

    /// The sigmas of `kind` for `steps` steps, ending at 0.
    pub fn of(&self, kind: ScheduleKind, steps: usize) -> Vec<f64> {
        let steps = steps.max(1);
        let n = self.sigmas.len();
        let mut out: Vec<f64> = match kind {
            ScheduleKind::Normal => return self.normal(steps),
            ScheduleKind::Karras => return self.karras(steps),
            ScheduleKind::Exponential => {
                let (hi, lo) = (self.sigma_max().ln(), self.sigma_min().ln());
                linspace(hi, lo, steps).map(f64::exp).collect()
            }
            ScheduleKind::SgmUniform => linspace(self.t_max(), self.t_min(), steps + 1)
                .take(steps)
                .map(|t| self.sigma_at(t))
                .collect(),
            ScheduleKind::Simple => {
                let stride = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| self.sigmas[n - 1 - (i as f64 * stride) as usize])
                    .collect()
            }
            ScheduleKind::Beta => {
                let last = (n - 1) as f64;
                let mut ts: Vec<usize> = (0..steps)
                    .map(|i| {
                        let q = 1.0 - i as f64 / steps as f64;
                        (beta_quantile(q, 0.6, 0.6) * last).round_ties_even() as usize
                    })
                    .collect();
                ts.dedup();
                ts.into_iter().map(|t| self.sigma(t)).collect()
            }
            ScheduleKind::DdimUniform => {
                let stride = (n / steps).max(1);
                let mut v: Vec<f64> = (1..n).step_by(stride).map(|t| self.sigmas[t]).collect();
                v.reverse();
                v
            }
        };
        out.push(0.0);
        out
    }

    /// k-diffusion's discrete schedule: `steps` timesteps evenly spaced from 999 to 0, then 0.
    pub fn normal(&self, steps: usize) -> Vec<f64> {
        let mut out: Vec<f64> = linspace(self.t_max(), self.t_min(), steps)
            .map(|t| self.sigma_at(t))
            .collect();
        out.push(0.0);
        out
    }

    /// The timestep of the largest σ (999 for SD).
    fn t_max(&self) -> f64 {
        self.timestep(self.sigma_max())
    }

    /// The timestep of the smallest σ (0 for SD).
    fn t_min(&self) -> f64 {
        self.timestep(self.sigma_min())
    }

    /// Karras et al.'s schedule (ρ = 7) from σ_max to σ_min, then 0.
    pub fn karras(&self, steps: usize) -> Vec<f64> {
        let rho = 7.0;
        let (lo, hi) = (
            self.sigma_min().powf(1.0 / rho),
            self.sigma_max().powf(1.0 / rho),
        );
        let mut out: Vec<f64> = linspace(0.0, 1.0, steps)
            .map(|r| (hi + r * (lo - hi)).powf(rho))
            .collect();
        out.push(0.0);
        out
    }

    /// A1111's DDIM timesteps (`1, 1 + c, 1 + 2c, ...` below 1000, `c = 1000 / steps`) as
    /// sigmas from the largest down; the walk ends at timestep 1's σ.
    pub fn ddim(&self, steps: usize) -> Vec<f64> {
        let c = (1000 / steps.max(1)).max(1);
        let mut out: Vec<f64> = (0..1000).step_by(c).map(|t| self.sigma(t + 1)).collect();
        out.reverse();
        out
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (torch's `linspace`; `a` alone for 1).
fn linspace(a: f64, b: f64, n: usize) -> impl Iterator<Item = f64> {
    (0..n).map(move |i| match n {
        1 => a,
        _ => a + (b - a) * i as f64 / (n - 1) as f64,
    })
}

/// The `q` quantile of the Beta(a, b) distribution (scipy's `beta.ppf`), by bisection on the
/// regularized incomplete beta function to double precision.
pub fn beta_quantile(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if incomplete_beta(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The regularized incomplete beta function I_x(a, b) (continued fraction, modified Lentz).
pub fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(1.0 - x, b, a);
    }
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < tiny { tiny } else { d };
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            d = 1.0 / if d.abs() < tiny { tiny } else { d };
            c = 1.0 + num / c;
            if c.abs() < tiny {
                c = tiny;
            }
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    ln_front.exp() * f / a
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9: about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        sum += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

fn err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("sampling: {e}"))
}

/// `a·x + b·y`.
fn lin(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    ((x * a).map_err(err)? + (y * b).map_err(err)?).map_err(err)
}

/// k-diffusion's `to_d`: the ODE's derivative `(x − denoised) / σ`.
fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> Result<Tensor> {
    ((x - denoised).map_err(err)? / sigma).map_err(err)
}

/// `x + d·dt`.
fn step(x: &Tensor, d: &Tensor, dt: f64) -> Result<Tensor> {
    (x + (d * dt).map_err(err)?).map_err(err)
}

/// `x + noise·scale`.
fn add_noise(x: Tensor, noise: Tensor, scale: f64) -> Result<Tensor> {
    (x + (noise * scale).map_err(err)?).map_err(err)
}

/// k-diffusion's `get_ancestral_step` (η = 1): the σ to step down to deterministically and
/// the noise to add, so that the marginal at `to` is right.
pub fn ancestral_step(from: f64, to: f64) -> (f64, f64) {
    let up = (to * to * (from * from - to * to) / (from * from))
        .max(0.0)
        .sqrt()
        .min(to);
    ((to * to - up * up).max(0.0).sqrt(), up)
}

/// The Lagrange integration coefficient `j` of a linear multistep step of `order` from
/// `t[i]` to `t[i + 1]` (k-diffusion integrates it numerically; the integrand is a
/// polynomial of degree `order − 1`, which 8-point Gauss-Legendre integrates exactly).
pub fn lms_coefficient(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    const NODES: [(f64, f64); 4] = [
        (0.183_434_642_495_649_8, 0.362_683_783_378_362),
        (0.525_532_409_916_329, 0.313_706_645_877_887_3),
        (0.796_666_477_413_626_7, 0.222_381_034_453_374_5),
        (0.960_289_856_497_536_3, 0.101_228_536_290_376_3),
    ];
    let f = |tau: f64| {
        (0..order)
            .filter(|&k| k != j)
            .map(|k| (tau - t[i - k]) / (t[i - j] - t[i - k]))
            .product::<f64>()
    };
    let (a, b) = (t[i], t[i + 1]);
    let (mid, half) = (0.5 * (a + b), 0.5 * (b - a));
    NODES
        .iter()
        .map(|&(x, w)| w * (f(mid - half * x) + f(mid + half * x)))
        .sum::<f64>()
        * half
}

/// Runs `sampler` from `x` (already scaled for the first sigma) down `sigmas`.
/// `denoise(x, σ)` returns the clean estimate; `noise()` the next standard normal tensor
/// shaped like `x` (drawn only by the stochastic samplers, when they add noise, in the order
/// k-diffusion draws it).
pub fn sample(
    sampler: Sampler,
    x: Tensor,
    sigmas: &[f64],
    mut denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    mut noise: impl FnMut() -> Result<Tensor>,
) -> Result<Tensor> {
    if let Sampler::UniPc | Sampler::UniPcBh2 = sampler {
        return unipc(x, sigmas, sampler == Sampler::UniPcBh2, denoise);
    }
    let mut x = x;
    let mut old: Option<Tensor> = None;
    let mut h_last: Option<f64> = None;
    let mut ds: Vec<Tensor> = Vec::new();
    let t_of = |sigma: f64| -sigma.ln();
    let sigma_of = |t: f64| (-t).exp();
    for i in 0..sigmas.len().saturating_sub(1) {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoise(&x, s)?;
        x = match sampler {
            Sampler::Euler | Sampler::Ddim => step(&x, &to_d(&x, s, &denoised)?, next - s)?,
            Sampler::UniPc | Sampler::UniPcBh2 => unreachable!("UniPC returned above"),
            Sampler::EulerA => {
                let (down, up) = ancestral_step(s, next);
                let x2 = step(&x, &to_d(&x, s, &denoised)?, down - s)?;
                match next > 0.0 {
                    true => add_noise(x2, noise()?, up)?,
                    false => x2,
                }
            }
            Sampler::Heun | Sampler::Dpm2 if next == 0.0 => {
                step(&x, &to_d(&x, s, &denoised)?, next - s)?
            }
            Sampler::Heun => {
                let d = to_d(&x, s, &denoised)?;
                let x2 = step(&x, &d, next - s)?;
                let d2 = to_d(&x2, next, &denoise(&x2, next)?)?;
                let mean = ((d + d2).map_err(err)? / 2.0).map_err(err)?;
                step(&x, &mean, next - s)?
            }
            Sampler::Dpm2 => {
                let mid = (0.5 * (s.ln() + next.ln())).exp();
                let d = to_d(&x, s, &denoised)?;
                let x2 = step(&x, &d, mid - s)?;
                let d2 = to_d(&x2, mid, &denoise(&x2, mid)?)?;
                step(&x, &d2, next - s)?
            }
            Sampler::Lms => {
                ds.push(to_d(&x, s, &denoised)?);
                if ds.len() > 4 {
                    ds.remove(0);
                }
                let order = (i + 1).min(4);
                let mut acc = x.clone();
                for (j, d) in ds.iter().rev().enumerate() {
                    acc = step(&acc, d, lms_coefficient(order, sigmas, i, j))?;
                }
                acc
            }
            Sampler::DpmPp2sA => {
                let (down, up) = ancestral_step(s, next);
                let x2 = if down == 0.0 {
                    step(&x, &to_d(&x, s, &denoised)?, down - s)?
                } else {
                    let (t, t_next) = (t_of(s), t_of(down));
                    let h = t_next - t;
                    let s_mid = t + 0.5 * h;
                    let xm = lin(sigma_of(s_mid) / s, &x, -(-0.5 * h).exp_m1(), &denoised)?;
                    let d2 = denoise(&xm, sigma_of(s_mid))?;
                    lin(sigma_of(t_next) / s, &x, -(-h).exp_m1(), &d2)?
                };
                match next > 0.0 {
                    true => add_noise(x2, noise()?, up)?,
                    false => x2,
                }
            }
            Sampler::DpmPp2m => {
                let (t, t_next) = (t_of(s), t_of(next));
                let h = t_next - t;
                let d = match (&old, next > 0.0) {
                    (Some(prev), true) => {
                        let r = (t - t_of(sigmas[i - 1])) / h;
                        lin(1.0 + 1.0 / (2.0 * r), &denoised, -1.0 / (2.0 * r), prev)?
                    }
                    _ => denoised.clone(),
                };
                match next > 0.0 {
                    true => lin(next / s, &x, -(-h).exp_m1(), &d)?,
                    false => d,
                }
            }
            Sampler::DpmPpSde if next == 0.0 => step(&x, &to_d(&x, s, &denoised)?, next - s)?,
            Sampler::DpmPpSde => {
                let (t, t_next) = (t_of(s), t_of(next));
                let h = t_next - t;
                let s_mid = t + 0.5 * h;
                // Step 1: to the midpoint, ancestrally.
                let (down, up) = ancestral_step(s, sigma_of(s_mid));
                let s_down = t_of(down);
                let x2 = lin(down / s, &x, -(t - s_down).exp_m1(), &denoised)?;
                let x2 = add_noise(x2, noise()?, up)?;
                let d2 = denoise(&x2, sigma_of(s_mid))?;
                // Step 2: the whole step with the averaged estimate, ancestrally.
                let (down, up) = ancestral_step(s, next);
                let t_down = t_of(down);
                // k-diffusion's `(1 − 1/2r)·denoised + (1/2r)·denoised₂` is denoised₂ at r = ½.
                let x3 = lin(down / s, &x, -(t - t_down).exp_m1(), &d2)?;
                add_noise(x3, noise()?, up)?
            }
            Sampler::DpmPp2mSde => {
                if next == 0.0 {
                    denoised.clone()
                } else {
                    let h = t_of(next) - t_of(s);
                    let mut x2 = lin(next / s * (-h).exp(), &x, -(-2.0 * h).exp_m1(), &denoised)?;
                    if let (Some(prev), Some(hl)) = (&old, h_last) {
                        let r = hl / h;
                        let diff = (&denoised - prev).map_err(err)?;
                        x2 = step(&x2, &diff, 0.5 * -(-2.0 * h).exp_m1() / r)?;
                    }
                    let scale = next * (-(-2.0 * h).exp_m1()).sqrt();
                    h_last = Some(h);
                    add_noise(x2, noise()?, scale)?
                }
            }
        };
        old = Some(denoised);
    }
    Ok(x)
}

/// UniPC as ComfyUI runs it (`sample_unipc`): multistep, data prediction, order
/// min(3, steps − 1) with lower orders for the first and last steps, a corrector on every step
/// but the last, in the variance-preserving form of SD's σ (α = 1/√(1+σ²), λ = −ln σ); a
/// final σ of 0 becomes 0.001, and the result is divided by that σ's α. B(h) = h (`bh1`) or
/// eʰ − 1 (`bh2`). One model call a step.
fn unipc(
    x: Tensor,
    sigmas: &[f64],
    bh2: bool,
    mut denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut ts = sigmas.to_vec();
    if ts.len() < 3 {
        return Err(Error::Invalid(
            "UniPC needs at least 2 steps (ComfyUI's leaves a single step's noise as it is)".into(),
        ));
    }
    if let Some(last) = ts.last_mut().filter(|l| **l == 0.0) {
        *last = 0.001;
    }
    let steps = ts.len() - 1;
    let order = 3.min(ts.len() - 2);
    // SD's σ in UniPC's variance-preserving terms.
    fn alpha(s: f64) -> f64 {
        1.0 / (s * s + 1.0).sqrt()
    }
    fn std(s: f64) -> f64 {
        s / (s * s + 1.0).sqrt()
    }
    fn lambda(s: f64) -> f64 {
        -s.ln()
    }
    // The model in VP units: the denoised estimate of the VE latent x·√(σ² + 1).
    let mut model = |x: &Tensor, s: f64| denoise(&(x * (s * s + 1.0).sqrt()).map_err(err)?, s);
    // One B(h) update from the last points `(tp, ms)` to `t`, of `order`; with the corrector,
    // the model's value at the new point comes back too.
    #[allow(clippy::too_many_arguments)]
    fn update(
        model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
        bh2: bool,
        x: &Tensor,
        ms: &[Tensor],
        tp: &[f64],
        t: f64,
        order: usize,
        corrector: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (t0, m0) = (tp[tp.len() - 1], &ms[ms.len() - 1]);
        let h = lambda(t) - lambda(t0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let rk = (lambda(tp[tp.len() - 1 - i]) - lambda(t0)) / h;
            d1s.push(((&ms[ms.len() - 1 - i] - m0).map_err(err)? / rk).map_err(err)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = Vec::new();
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        // R[i][k] = rks[k]^i.
        let r = |n: usize| -> Vec<Vec<f64>> {
            (0..n)
                .map(|i| rks[..n].iter().map(|rk| rk.powi(i as i32)).collect())
                .collect()
        };
        let weighted = |rhos: &[f64]| -> Result<Option<Tensor>> {
            let mut acc: Option<Tensor> = None;
            for (rho, d) in rhos.iter().zip(&d1s) {
                let term = (d * *rho).map_err(err)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term).map_err(err)?,
                });
            }
            Ok(acc)
        };
        let x_base = lin(std(t) / std(t0), x, -alpha(t) * h_phi_1, m0)?;
        let scale = alpha(t) * b_h;
        let x_t = match d1s.is_empty() {
            true => x_base.clone(),
            false => {
                let rhos_p = match order {
                    2 => vec![0.5],
                    _ => solve(r(order - 1), b[..order - 1].to_vec()),
                };
                match weighted(&rhos_p)? {
                    Some(pred) => lin(1.0, &x_base, -scale, &pred)?,
                    None => x_base.clone(),
                }
            }
        };
        if !corrector {
            return Ok((x_t, None));
        }
        let rhos_c = match order {
            1 => vec![0.5],
            _ => solve(r(order), b.clone()),
        };
        let model_t = model(&x_t, t)?;
        let d1_t = (&model_t - m0).map_err(err)?;
        let last = rhos_c[rhos_c.len() - 1];
        let corr = match weighted(&rhos_c[..rhos_c.len() - 1])? {
            Some(c) => lin(1.0, &c, last, &d1_t)?,
            None => (d1_t * last).map_err(err)?,
        };
        Ok((lin(1.0, &x_base, -scale, &corr)?, Some(model_t)))
    }
    let mut x = (x / (1.0 + ts[0] * ts[0]).sqrt()).map_err(err)?;
    let mut ms: Vec<Tensor> = Vec::new();
    let mut tp: Vec<f64> = Vec::new();
    for index in 0..steps {
        if index == 0 {
            ms.push(model(&x, ts[0])?);
            tp.push(ts[0]);
        } else if index < order {
            let (x2, m) = update(&mut model, bh2, &x, &ms, &tp, ts[index], index, true)?;
            x = x2;
            let m = match m {
                Some(m) => m,
                None => model(&x, ts[index])?,
            };
            ms.push(m);
            tp.push(ts[index]);
        } else {
            let extra = usize::from(index == steps - 1);
            for (step, &t) in ts.iter().enumerate().skip(index).take(1 + extra) {
                let step_order = order.min(steps + 1 - step);
                let corrector = step != steps;
                let (x2, m) = update(&mut model, bh2, &x, &ms, &tp, t, step_order, corrector)?;
                x = x2;
                if step == steps {
                    break; // the last point's model value is never needed
                }
                ms.remove(0);
                tp.remove(0);
                tp.push(t);
                ms.push(match m {
                    Some(m) => m,
                    None => model(&x, t)?,
                });
            }
        }
    }
    (x / alpha(ts[steps])).map_err(err)
}

/// Solves the small system `a · x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (i, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (r, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *r -= f * p;
            }
            b[col + 1 + i] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    /// ComfyUI's flow schedules. `simple` over 4 steps picks the table's timesteps 1, 0.75,
    /// 0.5, 0.25; by hand, SD3's shift 3 maps them to 3x / (1 + 2x) = 1, 0.9, 0.75, 0.5, and
    /// Flux dev's μ = 1.15 to e^μ / (e^μ + 1/x − 1) (values from Python's `math.exp`).
    #[test]
    fn flow_schedules_match_comfyui() {
        let sd3 = Schedule::flow(3.0, 1000.0);
        assert!(sd3.is_flow() && !Schedule::default().is_flow());
        close(
            &sd3.of(ScheduleKind::Simple, 4),
            &[1.0, 0.9, 0.75, 0.5, 0.0],
        );
        assert_eq!(sd3.timestep(0.5), 500.0);
        let schnell = Schedule::flow(1.0, 1.0);
        close(
            &schnell.of(ScheduleKind::Simple, 4),
            &[1.0, 0.75, 0.5, 0.25, 0.0],
        );
        assert_eq!(schnell.timestep(0.25), 0.25);
        let dev = Schedule::flux(1.15);
        close(
            &dev.of(ScheduleKind::Simple, 4),
            &[
                1.0,
                0.9045307667386396,
                0.7595109169491111,
                0.5128441015091338,
                0.0,
            ],
        );
        assert_eq!(dev.timestep(0.3), 0.3);
        // `normal` as ComfyUI computes it: timesteps evenly from σ_max's to σ_min's, through
        // the model's σ(t) (Python, the same formulas in float64).
        close(
            &sd3.of(ScheduleKind::Normal, 4),
            &[
                1.0,
                0.8576923076923075,
                0.6021505376344084,
                0.008928571428571713,
                0.0,
            ],
        );
        // Karras and exponential run between the table's ends.
        let k = sd3.of(ScheduleKind::Karras, 3);
        assert!((k[0] - sd3.sigma_max()).abs() < 1e-12 && (k[2] - sd3.sigma_min()).abs() < 1e-12);
    }

    #[test]
    fn only_k_diffusion_ode_samplers_run_on_flow_models() {
        for s in Sampler::ALL {
            let ok = s.check_flow().is_ok();
            let sd_only = matches!(s, Sampler::Ddim | Sampler::UniPc | Sampler::UniPcBh2);
            assert_eq!(ok, !s.is_stochastic() && !sd_only, "{s:?}");
        }
    }
}

#[cfg(test)]
mod unipc_tests {
    use super::*;

    /// UniPC against the original UniPC code (wl-zhao/UniPC's `uni_pc.py`) driven the way
    /// ComfyUI's `sample_unipc` drives it (its σ conversion, timesteps = sigmas with the
    /// final 0 as 0.001, order min(3, steps − 1), lower order at the end), in float64, on
    /// Gaussian data of variance ½ (denoised = x · ½ / (½ + σ²)); values produced once and
    /// pasted. Orders 3 (6 steps), 2 (3 steps) and 1 (2 steps), both B(h).
    #[test]
    fn unipc_matches_the_reference_code() {
        let cases: [(&[f64], bool, [f64; 3]); 6] = [
            (
                &[14.6, 8.0, 4.0, 1.5, 0.5, 0.1, 0.0],
                false,
                [
                    9.484034023479235e-01,
                    -1.896806804695847e+00,
                    4.742017011739618e-01,
                ],
            ),
            (
                &[14.6, 8.0, 4.0, 1.5, 0.5, 0.1, 0.0],
                true,
                [
                    7.854698676129541e-01,
                    -1.570939735225908e+00,
                    3.927349338064771e-01,
                ],
            ),
            (
                &[14.6, 3.0, 0.7, 0.0],
                false,
                [
                    4.731313101819587e-01,
                    -9.462626203639174e-01,
                    2.365656550909793e-01,
                ],
            ),
            (
                &[14.6, 3.0, 0.7, 0.0],
                true,
                [
                    4.473104883501566e-01,
                    -8.946209767003132e-01,
                    2.236552441750783e-01,
                ],
            ),
            (
                &[14.6, 2.0, 0.0],
                false,
                [
                    2.264955353170064e-01,
                    -4.529910706340128e-01,
                    1.132477676585032e-01,
                ],
            ),
            (
                &[14.6, 2.0, 0.0],
                true,
                [
                    2.264417298511364e-01,
                    -4.528834597022728e-01,
                    1.132208649255682e-01,
                ],
            ),
        ];
        for (sigmas, bh2, want) in cases {
            let x = Tensor::new(&[14.6f64, -29.2, 7.3], &candle_core::Device::Cpu)
                .unwrap()
                .reshape((1, 3, 1, 1))
                .unwrap();
            let mut calls = 0;
            let denoise = |x: &Tensor, s: f64| {
                calls += 1;
                (x * (0.5 / (0.5 + s * s))).map_err(err)
            };
            let sampler = match bh2 {
                true => Sampler::UniPcBh2,
                false => Sampler::UniPc,
            };
            let out = sample(sampler, x, sigmas, denoise, || unreachable!("no noise"))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (o, w) in out.iter().zip(want) {
                assert!(
                    (o - w).abs() < 1e-10,
                    "{sigmas:?} bh2={bh2}: {out:?} vs {want:?}"
                );
            }
            // One model call a step.
            assert_eq!(calls, sigmas.len() - 1, "{sigmas:?}");
        }
        // A single step is refused, not left as noise.
        let x = Tensor::zeros(
            (1, 3, 1, 1),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let e = sample(
            Sampler::UniPc,
            x,
            &[14.6, 0.0],
            |x: &Tensor, _| Ok(x.clone()),
            || unreachable!(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 2 steps"), "{e}");
    }
}
