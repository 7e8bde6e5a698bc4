//! Image generation from single-file checkpoints: a candle weight backend that serves a
//! checkpoint's tensors by their diffusers names ([`weights`], names from
//! [`crate::arch::names`]), the CLIP text encoders ([`clip`]), the U-Net ([`unet`]) and the VAE
//! decoder ([`vae`]) over our convolution, normalisation and attention kernels ([`blocks`],
//! [`conv`], [`norm`], [`attention`]), the
//! samplers ([`sampler`]), the CLIP tokenizer ([`tokenizer`]), SD1 / SD2 / SDXL text to
//! image with the hires fix ([`pipeline`]), Flux and SD3 with T5 ([`dit`], [`mmdit`], [`t5`]), `generate` jobs and image keys ([`job`]), prompt encodings
//! kept for reuse ([`textmemo`]), where the time goes ([`timing`]), and PNG files with AUTOMATIC1111's generation parameters
//! ([`png`]).

pub mod attention;
pub mod bf16;
pub mod blocks;
pub mod clip;
pub mod conv;
mod cpu;
pub mod dit;
pub mod embedding;
pub mod grid;
pub mod job;
pub mod mmdit;
pub mod noise;
pub mod norm;
pub mod pipeline;
pub mod png;
pub mod product;
pub mod prompt;
pub mod sampler;
pub mod t5;
pub mod textmemo;
pub mod timing;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
