//! Image generation from single-file checkpoints (issue #6, in progress). So far: the
//! mapping of LDM / SGM checkpoint keys to the diffusers names generation models load
//! ([`names`]), a candle weight backend that serves them from a checkpoint ([`weights`]), the
//! CLIP text encoders ([`clip`]), the samplers ([`sampler`]), the CLIP tokenizer
//! ([`tokenizer`]), SD1 text to image ([`pipeline`]) and PNG files with AUTOMATIC1111's
//! generation parameters ([`png`]). Not yet: SD2 / SDXL, hires fix, the `generate` node.

pub mod clip;
pub mod job;
pub mod names;
pub mod pipeline;
pub mod png;
pub mod sampler;
pub mod tokenizer;
pub mod unet;
pub mod weights;
