//! What running nodes share: opening inputs, storing results, writing files the recipe owns,
//! and (for generation) the tokenizer and the last model loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{Input, LoraUse, Outcome};
use crate::checkpoint::writer::{write_file_atomic, SafetensorsWriter};
use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gen::pipeline::Models;
use crate::gen::tokenizer::ClipTokenizer;
use crate::hashing::{FileHashes, Stamp};
use crate::lora::bake::Application;
use crate::lora::LoraFile;
use crate::merge::RunOptions;
use crate::store::{Entry, Manifest, Place, State, Store, Written};

/// What every node of one build shares while it runs.
pub struct RunCx<'a> {
    /// Model name -> (file, expected hash).
    pub models: &'a BTreeMap<String, (PathBuf, Option<String>)>,
    /// Node name -> key.
    pub keys: &'a BTreeMap<String, String>,
    /// The store (disk cache and this build's memory results).
    pub store: &'a Store<'a>,
    /// The recipe's build state (the files it wrote).
    pub state: &'a Mutex<State>,
    /// How merges run (device, progress).
    pub run: &'a RunOptions,
    /// The tokenizer file generate nodes use, if the recipe names one.
    pub tokenizer: Option<&'a Path>,
    /// The tokenizer and model generation keeps loaded.
    pub generation: Generation,
}

/// An opened checkpoint input.
pub(crate) struct Opened {
    /// The checkpoint.
    pub ck: Checkpoint,
    /// Tensor name -> tensor key.
    pub keys: super::tensors::KeyMap,
    /// Its file hashes (when asked for, for merge metadata).
    pub hashes: Option<FileHashes>,
    /// How it is named in metadata and errors.
    pub label: PathBuf,
}

/// What generate nodes of one build share: the tokenizer, the last model loaded (kept
/// while consecutive nodes generate from the same checkpoint), and the prompt encodings of
/// every model, by the content of its text encoders.
#[derive(Default)]
pub struct Generation {
    tokenizer: Mutex<Option<Arc<ClipTokenizer>>>,
    models: Mutex<Option<(String, Arc<Models>)>>,
    texts: Arc<crate::gen::textmemo::TextMemo>,
}

/// The text identity of a cached result's model: the components it was loaded with and the
/// tensor keys (content hashes) of the tensors its text encoders read, so results that share
/// those tensors (a sweep of U-Net block weights) share their prompt encodings. `None` when a
/// text tensor has no key.
pub(crate) fn text_identity(
    components: &str,
    text_keys: &[String],
    keys: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    let mut parts = vec![components];
    for name in text_keys {
        parts.extend([name.as_str(), keys.get(name)?.as_str()]);
    }
    let h = crate::gen::textmemo::hash_parts(parts);
    Some(format!("tensors-{}", h.to_hex()))
}

impl RunCx<'_> {
    /// The file of a model.
    pub(crate) fn model_path(&self, m: &str) -> &Path {
        &self.models[m].0
    }

    /// Opens an input: the file of a model, or the stored result of a node; with its tensor
    /// keys and (when `hashed`, for merge metadata) its file hashes.
    pub(crate) fn open(&self, input: &Input, hashed: bool) -> Result<Opened> {
        match input {
            Input::Model(m) => {
                let path = self.model_path(m);
                let (hashes, _) = self.store.memo.hashes(path)?;
                let ck = Checkpoint::open(path)?;
                let keys = super::tensors::model_keys(&hashes.blake3, &ck);
                Ok(Opened {
                    ck,
                    keys,
                    hashes: Some(hashes),
                    label: path.to_path_buf(),
                })
            }
            Input::Node(n) => {
                let key = &self.keys[n];
                let label = PathBuf::from(format!("{n}.safetensors"));
                let keys = self
                    .store
                    .manifest(key)
                    .ok_or_else(|| Error::Invalid(format!("node `{n}` has no stored result")))?
                    .keys();
                Ok(Opened {
                    ck: self.store.open_result(key, &label)?,
                    keys,
                    hashes: hashed.then(|| self.store.result_hashes(key)).transpose()?,
                    label,
                })
            }
        }
    }

    /// Opens a LoRA: a model file, or the stored result of a LoRA node.
    pub(crate) fn open_lora(&self, source: &Input) -> Result<LoraFile> {
        match source {
            Input::Model(m) => LoraFile::open(self.model_path(m)),
            Input::Node(_) => LoraFile::from_checkpoint(self.open(source, false)?.ck),
        }
    }

    /// Runs a node whose result is stored (a checkpoint or a LoRA): unless a node with the
    /// same key stored it already (sweep cells repeat nodes), `build` makes it in `place`
    /// and returns (stored, reused) tensor counts.
    pub(crate) fn result(
        &self,
        key: &str,
        memory: bool,
        build: impl FnOnce(Place) -> Result<(usize, usize)>,
    ) -> Result<Outcome> {
        let place = match memory {
            true => Place::Memory,
            false => Place::Disk,
        };
        if self.store.has_result(key) {
            return Ok(Outcome::default());
        }
        let (stored, reused) = build(place)?;
        Ok(Outcome {
            stored: Some(stored),
            reused: Some(reused),
            output: None,
        })
    }

    /// Stores a result whose tensors are (name, dtype, shape, tensor key): those the store
    /// holds are referred to, `write` computes the rest into a new pack. Returns (stored,
    /// reused) tensor counts.
    pub(crate) fn put(
        &self,
        key: &str,
        place: Place,
        tensors: Vec<(String, DType, Vec<usize>, String)>,
        metadata: BTreeMap<String, String>,
        write: impl FnOnce(&SafetensorsWriter) -> Result<()>,
    ) -> Result<(usize, usize)> {
        let packs = self.store.packs_of(tensors.iter().map(|t| t.3.as_str()));
        let tensors: Vec<Entry> = tensors
            .into_iter()
            .zip(packs)
            .map(|((name, dtype, shape, tk), pack)| Entry {
                name,
                dtype,
                shape,
                pack: pack.unwrap_or_default(),
                key: tk,
            })
            .collect();
        let stored = tensors.iter().filter(|e| e.pack.is_empty()).count();
        let reused = tensors.len() - stored;
        let manifest = Manifest {
            metadata,
            tensors,
            file: None,
            hashes: None,
        };
        self.store.put(key, manifest, place, write)?;
        Ok((stored, reused))
    }

    /// The metadata record of a node's LoRA files and each file's content key.
    pub(crate) fn lora_record(
        &self,
        loras: &[LoraUse],
        apps: &[Application],
    ) -> Result<(Value, Vec<String>)> {
        let mut record = Vec::new();
        let mut contents = Vec::new();
        for (u, app) in loras.iter().zip(apps) {
            let (sha256, content) = match &u.source {
                Input::Model(m) => {
                    let (h, _) = self.store.memo.hashes(self.model_path(m))?;
                    (h.sha256, h.blake3)
                }
                Input::Node(n) => {
                    let key = &self.keys[n];
                    (self.store.result_hashes(key)?.sha256, key.clone())
                }
            };
            record.push(json!({
                "file": u.source.name(),
                "sha256": sha256,
                "strength": u.strength,
                "blocks": app.blocks,
            }));
            contents.push(content);
        }
        Ok((Value::Array(record), contents))
    }

    /// Whether `to` holds the file this recipe's last build wrote there (by stamp).
    fn ours(state: &State, to: &Path) -> bool {
        state
            .outputs
            .get(to)
            .is_some_and(|w| Stamp::of(to).is_ok_and(|s| s == w.stamp))
    }

    /// Records that this build wrote `to` from the object `key`.
    fn record(state: &mut State, to: &Path, key: &str) -> Result<()> {
        let written = Written {
            object: key.to_string(),
            stamp: Stamp::of(to)?,
        };
        state.outputs.insert(to.to_path_buf(), written);
        Ok(())
    }

    /// Writes a stored result to `to`, refusing to replace a file mergesmith did not write
    /// unless `overwrite`.
    pub(crate) fn save(&self, key: &str, to: &Path, overwrite: bool, hardlink: bool) -> Result<()> {
        let record = || Self::record(&mut self.state.lock().expect("state lock"), to, key);
        if to.exists() && !Self::ours(&self.state.lock().expect("state lock"), to) {
            let there = self.store.memo.hashes(to)?.0.blake3;
            if there == self.store.result_hashes(key)?.blake3 {
                // Already these very bytes (say, written by a concurrent build).
                return record();
            }
            if !overwrite {
                return Err(Error::Invalid(format!(
                    "{} exists and was not written by this recipe; add `overwrite: true` to replace it",
                    to.display()
                )));
            }
        }
        self.store
            .materialize(key, to, hardlink, self.run.progress)?;
        record()
    }

    /// Copies a stored image to `to`, refusing to replace a file this recipe did not write
    /// there unless `overwrite` (or it already holds these bytes).
    pub(crate) fn copy_out(&self, key: &str, to: &Path, overwrite: bool) -> Result<()> {
        let from = self
            .store
            .cache
            .image(key)
            .ok_or_else(|| Error::Invalid(format!("image {key} is no longer in the cache")))?;
        let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
        let mut state = self.state.lock().expect("state lock");
        if to.exists() && !overwrite {
            let same = std::fs::read(to).is_ok_and(|b| b == bytes);
            if !Self::ours(&state, to) && !same {
                return Err(Error::Invalid(format!(
                    "{} exists and was not written by this recipe; add `overwrite: true` to replace it",
                    to.display()
                )));
            }
        }
        write_file_atomic(to, &bytes, true)?;
        Self::record(&mut state, to, key)
    }

    /// Copies a node's stored outputs to `to`, if it has one.
    pub(crate) fn copy_outputs(
        &self,
        to: Option<&Path>,
        overwrite: bool,
        preimage: &Value,
    ) -> Result<()> {
        if let Some(dir) = to {
            for (file, key) in super::images::outputs(preimage) {
                self.copy_out(&key, &dir.join(file), overwrite)?;
            }
        }
        Ok(())
    }

    /// The loaded models of a checkpoint input, its name for the PNGs, and its A1111 hash.
    /// The checkpoint is opened only when it is not the model already loaded.
    pub(crate) fn models_for(
        &self,
        input: &Input,
        job: &crate::gen::job::Job,
    ) -> Result<(Arc<Models>, String, String)> {
        let components = &job.components;
        let (content, autov2) = match input {
            Input::Model(m) => {
                let h = self.store.memo.hashes(self.model_path(m))?.0;
                (h.blake3, h.autov2)
            }
            Input::Node(n) => {
                let key = &self.keys[n];
                (key.clone(), self.store.result_hashes(key)?.autov2)
            }
        };
        let name = input.name().to_string();
        let loaded = format!("{content}+{}+{:?}", components.key(), job.precision);
        let mut slot = self.generation.models.lock().expect("models lock");
        if let Some((k, m)) = slot.as_ref() {
            if *k == loaded {
                return Ok((m.clone(), name, autov2));
            }
        }
        *slot = None; // free the previous model before loading the next
        let ck = match input {
            Input::Model(m) => Checkpoint::open(self.model_path(m))?,
            Input::Node(n) => self
                .store
                .open_result(&content, &PathBuf::from(format!("{n}.safetensors")))?,
        };
        let mut models = Models::load_on(Arc::new(ck), components, self.run.device, job.precision)?;
        let id = match input {
            // The file's content names its text encoders (with the components).
            Input::Model(_) => Some(loaded.clone()),
            Input::Node(_) => self
                .store
                .manifest(&content)
                .and_then(|m| text_identity(&components.key(), &models.text_keys(), &m.keys())),
        };
        if let Some(id) = id {
            let memo = self.generation.texts.clone();
            models.set_text_identity(crate::gen::textmemo::TextIdentity::shared(memo, id));
        }
        let models = Arc::new(models);
        *slot = Some((loaded, models.clone()));
        Ok((models, name, autov2))
    }

    /// The build's tokenizer, loaded once.
    pub(crate) fn tokenizer(&self) -> Result<Arc<ClipTokenizer>> {
        let mut slot = self.generation.tokenizer.lock().expect("tokenizer lock");
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(ClipTokenizer::find(self.tokenizer)?);
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// Opens the LoRAs of a `lora` or `merge_loras` node (through `open`), with block weights
/// read for `family` (the checkpoint's, when baking), else for the family each file was made
/// for.
pub(crate) fn lora_applications(
    loras: &[LoraUse],
    family: Option<crate::arch::Family>,
    fill: f64,
    open: &dyn Fn(&Input) -> Result<LoraFile>,
) -> Result<Vec<Application>> {
    loras
        .iter()
        .map(|u| {
            Application::new(
                open(&u.source)?,
                u.strength,
                u.blocks.as_deref(),
                family,
                fill,
            )
        })
        .collect()
}

impl RunCx<'_> {
    /// Stores a LoRA made in memory (a few hundred MB at most) as the result `key`, in one
    /// new pack; each tensor keyed by the result and its name. Returns (stored, reused).
    pub(crate) fn put_lora(
        &self,
        key: &str,
        place: Place,
        lora: &crate::lora::KohyaLora,
        dtype: DType,
    ) -> Result<(usize, usize)> {
        let tensors = lora
            .specs(dtype)
            .into_iter()
            .map(|t| {
                let tk = blake3::hash(
                    json!({ "result": key, "tensor": t.name })
                        .to_string()
                        .as_bytes(),
                );
                (t.name, t.dtype, t.shape, tk.to_hex().to_string())
            })
            .collect();
        self.put(key, place, tensors, lora.metadata.clone(), |w| {
            lora.write_into(w, dtype)
        })
    }
}

#[cfg(test)]
mod text_identity_tests {
    use super::text_identity;
    use std::collections::BTreeMap;

    #[test]
    fn follows_the_text_tensors_keys_only() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let text = vec!["te.w".to_string(), "te.b".to_string()];
        let a = map(&[("te.w", "k1"), ("te.b", "k2"), ("unet.w", "u1")]);
        let b = map(&[("te.w", "k1"), ("te.b", "k2"), ("unet.w", "u2")]);
        let c = map(&[("te.w", "k1"), ("te.b", "k3"), ("unet.w", "u1")]);
        let id = |m| text_identity("", &text, m);
        assert!(id(&a).is_some());
        assert_eq!(id(&a), id(&b), "another U-Net, the same text encoder");
        assert_ne!(id(&a), id(&c), "another text tensor");
        assert_ne!(
            id(&a),
            text_identity("t5.safetensors", &text, &a),
            "other components"
        );
        assert_eq!(
            id(&map(&[("te.w", "k1")])),
            None,
            "a text tensor without a key"
        );
    }
}
