//! T5-XXL text encoding for Flux and SD3: the T5 v1.1 SentencePiece vocabulary bundled in
//! the binary (`assets/t5/`, Apache-2.0) and candle's T5 encoder, its shape read from the
//! checkpoint's tensors.
//!
//! Prompts are tokenized as ComfyUI does: no chunking, weighted runs tokenized one by one,
//! `</s>` at the end, padded with `<pad>` (id 0) to a minimum length (Flux 256, SD3 77).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gen::prompt::Piece;
use crate::gen::weights::{count_indexed, CheckpointWeights};

/// T5's end-of-sequence id (`</s>`).
pub const END: u32 = 1;

/// T5's padding id (`<pad>`).
pub const PAD: u32 = 0;

/// The vocabulary, gzipped `tokenizer.json` as FLUX.1 and SD3 ship it. Image keys do not
/// name it: changing it changes images, so it goes with a bump of [`crate::gen::job::VERSION`].
const BUNDLED: &[u8] = include_bytes!("../../assets/t5/tokenizer.json.gz");

/// The bundled T5 tokenizer (parsed once).
pub fn tokenizer() -> Result<&'static tokenizers::Tokenizer> {
    static CELL: OnceLock<std::result::Result<tokenizers::Tokenizer, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(BUNDLED), &mut json)
            .map_err(|e| e.to_string())?;
        tokenizers::Tokenizer::from_bytes(&json).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Invalid(format!("the bundled T5 tokenizer: {e}")))
}

/// The ids of `text` without `</s>`.
pub fn ids(text: &str) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let enc = tokenizer()?
        .encode(text, false)
        .map_err(|e| Error::Invalid(format!("T5 tokenizer: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// A parsed prompt's ids and per-token weights: each weighted run tokenized on its own,
/// `</s>` (weight 1) at the end, `<pad>` up to `min_len`.
pub fn encode(pieces: &[Piece], min_len: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let (mut ids_out, mut weights) = (Vec::new(), Vec::new());
    for piece in pieces {
        if let Piece::Text(text, w) = piece {
            let run = ids(text)?;
            weights.extend(std::iter::repeat_n(*w as f32, run.len()));
            ids_out.extend(run);
        }
    }
    ids_out.push(END);
    weights.push(1.0);
    while ids_out.len() < min_len {
        ids_out.push(PAD);
        weights.push(1.0);
    }
    Ok((ids_out, weights))
}

/// A T5 encoder (candle's, which takes `&mut self` for its caches: behind a lock).
pub struct T5Encoder {
    model: Mutex<t5::T5EncoderModel>,
    width: usize,
    device: Device,
}

impl T5Encoder {
    /// Loads the T5 encoder stored under `prefix` in `ck` (HF names: `shared.weight`,
    /// `encoder.block.N...`), in `dtype` on `device`.
    pub fn load(ck: Arc<Checkpoint>, prefix: &str, dtype: DType, device: &Device) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.get(&format!("{prefix}{name}"))
                .map(|t| t.shape.clone())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: no T5 weight `{prefix}{name}`",
                        ck.path().display()
                    ))
                })
        };
        let shared = shape("shared.weight")?;
        let (vocab, width) = (shared[0], shared[1]);
        let heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let (buckets, heads) = (heads[0], heads[1]);
        let inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")?[0];
        let ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?[0];
        let layers = count_indexed(
            &ck,
            &format!("{prefix}encoder.block."),
            "layer.0.SelfAttention.q.weight",
        );
        let config = t5::Config {
            vocab_size: vocab,
            d_model: width,
            d_kv: inner / heads.max(1),
            d_ff: ff,
            num_layers: layers,
            num_decoder_layers: None,
            num_heads: heads,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: 128,
            dropout_rate: 0.0,
            layer_norm_epsilon: 1e-6,
            initializer_factor: 1.0,
            // T5 v1.1: gated GELU (tanh approximation).
            feed_forward_proj: t5::ActivationWithOptionalGating {
                gated: true,
                activation: candle_nn::Activation::NewGelu,
            },
            tie_word_embeddings: false,
            is_decoder: false,
            is_encoder_decoder: true,
            use_cache: false,
            pad_token_id: PAD as usize,
            eos_token_id: END as usize,
            decoder_start_token_id: None,
        };
        let vb = CheckpointWeights::prefixed(ck.clone(), prefix).var_builder(dtype, device);
        let model = t5::T5EncoderModel::load(vb, &config)
            .map_err(|e| Error::Invalid(format!("{}: T5: {e}", ck.path().display())))?;
        Ok(T5Encoder {
            model: Mutex::new(model),
            width,
            device: device.clone(),
        })
    }

    /// The width of its output.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The last hidden state (after the final norm) of `ids`: `[1, ids.len(), width]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let cerr = |e: candle_core::Error| Error::Invalid(format!("T5: {e}"));
        let ids = Tensor::new(ids, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(cerr)?;
        let mut model = self
            .model
            .lock()
            .map_err(|_| Error::Invalid("T5: a previous encoding panicked".into()))?;
        model.clear_kv_cache();
        model.forward(&ids).map_err(cerr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids produced once with Hugging Face `tokenizers` 0.22 on FLUX.1's `tokenizer_2`
    /// (`Tokenizer.from_file(...).encode(text).ids`, which appends `</s>`).
    #[test]
    fn ids_match_the_hf_tokenizer() {
        let cases: [(&str, &[u32]); 3] = [
            (
                "a red fox in the snow",
                &[3, 9, 1131, 3, 20400, 16, 8, 2983],
            ),
            (
                "A Photo of  a CAT, 4k!",
                &[71, 5810, 13, 3, 9, 3, 18911, 6, 314, 157, 55],
            ),
            ("masterpiece", &[20975]),
        ];
        for (text, want) in cases {
            assert_eq!(ids(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn encode_weights_ends_and_pads() {
        let pieces = vec![
            Piece::Text("a red fox".into(), 1.0),
            Piece::Text("snow".into(), 1.5),
        ];
        let (ids, weights) = encode(&pieces, 8).unwrap();
        assert_eq!(ids.len(), 8);
        let fox = super::ids("a red fox").unwrap();
        let snow = super::ids("snow").unwrap();
        let n = fox.len() + snow.len();
        assert_eq!(&ids[..fox.len()], fox.as_slice());
        assert_eq!(ids[n], END);
        assert!(ids[n + 1..].iter().all(|&i| i == PAD));
        assert!(weights[fox.len()..n].iter().all(|&w| w == 1.5));
        assert!(weights[..fox.len()].iter().all(|&w| w == 1.0));
        // Longer than the minimum: not cut.
        let (long, _) = encode(&pieces, 2).unwrap();
        assert_eq!(long.len(), n + 1);
    }
}
