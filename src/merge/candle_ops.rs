//! The element-wise merge formulas as candle operations, for `--device cuda` (and
//! `candle-cpu`). Each formula performs the same f32 operations in the same order as
//! [`crate::merge::kernels`] and [`crate::merge::calc::elementwise`], so both paths agree.

use candle_core::{Result, Tensor};

use crate::merge::calc::CalcMode;
use crate::merge::Mode;

fn scale(t: &Tensor, s: f32) -> Result<Tensor> {
    t.broadcast_mul(&Tensor::new(s, t.device())?)
}

/// Merges whole f32 tensors already on the device. `calc` must be element-wise and not
/// random (`normal`, `trainDifference` or `self`).
pub fn blend(
    calc: CalcMode,
    mode: Mode,
    alpha: f32,
    beta: f32,
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
) -> Result<Tensor> {
    let c_or =
        |what: &str| c.ok_or_else(|| candle_core::Error::Msg(format!("{what} needs model C")));
    match calc {
        CalcMode::TrainDifference => {
            let c = c_or("trainDifference")?;
            let d = (b - c)?;
            let e = (b - a)?.abs()?;
            let den = (d.abs()? + &e)?;
            let update = ((scale(&d, 1.8 * alpha)? * &e)? / &den)?;
            den.ne(0f32)?.where_cond(&(a + update)?, a)
        }
        CalcMode::SelfScale if alpha != 0.0 => scale(a, alpha),
        CalcMode::SelfScale => Ok(a.clone()),
        _ => match mode {
            Mode::WeightSum => a + scale(&(b - a)?, alpha)?,
            Mode::AddDifference => a + scale(&(b - c_or("add_difference")?)?, alpha)?,
            Mode::TripleSum => {
                let c = c_or("triple_sum")?;
                a + (scale(&(b - a)?, alpha)? + scale(&(c - a)?, beta)?)?
            }
            Mode::SumTwice => {
                let t = (a + scale(&(b - a)?, alpha)?)?;
                &t + scale(&(c_or("sum_twice")? - &t)?, beta)?
            }
        },
    }
}
