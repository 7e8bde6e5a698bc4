//! Image generation from single-file checkpoints (issue #6, in progress): so far the mapping
//! of LDM / SGM checkpoint keys to the diffusers names generation models are built with
//! ([`names`]), a candle weight backend that serves them from a checkpoint ([`weights`]), and
//! PNG files with AUTOMATIC1111's generation parameters ([`png`]), the samplers
//! ([`sampler`]) and the CLIP tokenizer ([`tokenizer`]). Not yet: the pipeline (text
//! encoding, the U-Net loop, VAE decoding), the `generate` node and `mergesmith gen`.

pub mod names;
pub mod png;
pub mod sampler;
pub mod tokenizer;
pub mod weights;
