//! Textual-inversion embeddings, as A1111 uses them: a file's vectors take the place of its
//! name's tokens in the prompt (the name is the file's stem, as in A1111's `embeddings/`
//! folder).
//!
//! Files: `.safetensors` with `emb_params` (A1111's training output, SD1 / SD2), `clip_l` and
//! `clip_g` (SDXL), or a single tensor; `.pt` / `.bin` with A1111's `string_to_param: {'*':
//! tensor}` or `emb_params`. Vectors are `[n, width]`; an encoder takes the matrix of its own
//! width (SDXL: `clip_l` for CLIP-L, `clip_g` for bigG), and a prompt that names an embedding
//! no encoder of the model can take is an error.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An embedding file named in a job: its prompt name, where it is, its content key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EmbeddingFile {
    /// The word that stands for it in prompts (the file's stem).
    pub name: String,
    /// The file.
    #[serde(skip)]
    pub path: PathBuf,
    /// blake3 of the file.
    pub key: String,
}

impl EmbeddingFile {
    /// Names and hashes the file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddingFile> {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no file name to call the embedding",
                    path.display()
                ))
            })?
            .to_string();
        let (key, _) = crate::hashing::blake3_file(path)?;
        Ok(EmbeddingFile {
            name,
            path: path.to_path_buf(),
            key,
        })
    }
}

/// Which encoder a matrix is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Any encoder of its width (SD1, SD2 files).
    Any,
    /// SDXL's CLIP-L.
    ClipL,
    /// SDXL's OpenCLIP bigG.
    ClipG,
}

/// A loaded embedding.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// Its prompt name.
    pub name: String,
    /// Its matrices: (slot, rows, width, row-major values).
    pub parts: Vec<(Slot, usize, usize, Vec<f32>)>,
}

impl Embedding {
    /// Reads `file`.
    pub fn load(file: &EmbeddingFile) -> Result<Embedding> {
        let path = &file.path;
        let bad = |m: String| Error::Invalid(format!("{}: {m}", path.display()));
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let tensors: Vec<(String, candle_core::Tensor)> = match ext.as_str() {
            "safetensors" => candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .map_err(|e| bad(e.to_string()))?
                .into_iter()
                .collect(),
            "pt" | "bin" => {
                match candle_core::pickle::read_all_with_key(path, Some("string_to_param")) {
                    Ok(t) if !t.is_empty() => t,
                    _ => candle_core::pickle::read_all(path).map_err(|e| bad(e.to_string()))?,
                }
            }
            _ => {
                return Err(bad(
                    "an embedding is a .safetensors, .pt or .bin file".to_string()
                ))
            }
        };
        let slot = |name: &str| match name {
            "clip_l" => Slot::ClipL,
            "clip_g" => Slot::ClipG,
            _ => Slot::Any,
        };
        let wanted: Vec<&(String, candle_core::Tensor)> =
            match tensors.iter().any(|(n, _)| n == "clip_l" || n == "clip_g") {
                true => tensors
                    .iter()
                    .filter(|(n, _)| n == "clip_l" || n == "clip_g")
                    .collect(),
                false => match tensors.iter().find(|(n, _)| n == "emb_params" || n == "*") {
                    Some(t) => vec![t],
                    None if tensors.len() == 1 => vec![&tensors[0]],
                    None => {
                        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
                        return Err(bad(format!(
                            "not a textual-inversion embedding (tensors: {})",
                            names.join(", ")
                        )));
                    }
                },
            };
        let mut parts = Vec::new();
        for (name, t) in wanted {
            let t = t
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| bad(e.to_string()))?;
            let t = match t.rank() {
                1 => t.unsqueeze(0).map_err(|e| bad(e.to_string()))?,
                2 => t,
                r => return Err(bad(format!("`{name}` has rank {r}, not [vectors, width]"))),
            };
            let (rows, width) = t.dims2().map_err(|e| bad(e.to_string()))?;
            let values = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| bad(e.to_string()))?;
            parts.push((slot(name), rows, width, values));
        }
        Ok(Embedding {
            name: file.name.clone(),
            parts,
        })
    }

    /// Its matrix for an encoder of `width` in `slot` (SDXL's encoders name theirs), if any.
    pub fn for_encoder(&self, slot: Slot, width: usize) -> Option<(usize, &[f32])> {
        self.parts
            .iter()
            .find(|(s, _, w, _)| *w == width && (*s == slot || *s == Slot::Any))
            .map(|(_, rows, _, v)| (*rows, v.as_slice()))
    }
}
