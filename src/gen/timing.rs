//! Where a loaded model's generation time goes: text encoding, sampling steps and VAE
//! decoding, summed over every image it made. `gen` prints them (and `--json` carries
//! them) and `benches/gen_vs_diffusers.py` compares them with diffusers'.

use std::sync::Mutex;
use std::time::Instant;

/// Seconds per phase, summed over images.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Loading the model (set by the caller that loaded it).
    pub load: f64,
    /// Encoding prompts (encodings found in the text memo cost nothing).
    pub text: f64,
    /// Sampling steps taken (one model evaluation each, both CFG halves included).
    pub steps: u64,
    /// Seconds in those steps.
    pub denoise: f64,
    /// Decoding latents to pixels.
    pub decode: f64,
}

/// A phase of [`Timings`].
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Text encoding.
    Text,
    /// One sampling step.
    Step,
    /// VAE decoding.
    Decode,
}

/// A model's running [`Timings`].
#[derive(Debug, Default)]
pub struct Clock(Mutex<Timings>);

impl Clock {
    /// Runs `f`, adding its wall time to `phase`.
    pub fn time<T>(&self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let s = start.elapsed().as_secs_f64();
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Phase::Text => t.text += s,
            Phase::Step => {
                t.steps += 1;
                t.denoise += s;
            }
            Phase::Decode => t.decode += s,
        }
        out
    }

    /// The totals so far.
    pub fn totals(&self) -> Timings {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "load {:.1} s, text {:.1} s, ", self.load, self.text)?;
        match self.steps {
            0 => write!(f, "no steps")?,
            n => write!(
                f,
                "{n} step(s) {:.1} s ({:.2} s/step)",
                self.denoise,
                self.denoise / n as f64
            )?,
        }
        write!(f, ", decode {:.1} s", self.decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_steps_count() {
        let c = Clock::default();
        let v = c.time(Phase::Step, || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            7
        });
        assert_eq!(v, 7);
        c.time(Phase::Step, || ());
        c.time(Phase::Decode, || ());
        let t = c.totals();
        assert_eq!(t.steps, 2);
        assert!(t.denoise >= 0.02, "{t:?}");
        assert_eq!(t.text, 0.0);
        let shown = Timings { load: 1.0, ..t }.to_string();
        assert!(
            shown.starts_with("load 1.0 s, text 0.0 s, 2 step(s) "),
            "{shown}"
        );
        assert!(shown.contains(" s/step), decode "), "{shown}");
    }
}
