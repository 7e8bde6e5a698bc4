//! Image generation from single-file checkpoints (issue #6, in progress): so far the mapping
//! of LDM / SGM checkpoint keys to the diffusers names generation models are built with.

pub mod names;
