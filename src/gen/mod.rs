//! Image generation from single-file checkpoints (issue #6, in progress): so far the mapping
//! of LDM / SGM checkpoint keys to the diffusers names generation models are built with
//! ([`names`]) and a candle weight backend that serves them from a checkpoint ([`weights`]).

pub mod names;
pub mod weights;
