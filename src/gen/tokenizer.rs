//! The CLIP tokenizer, from a Hugging Face `tokenizer.json` (the `tokenizers` crate does the
//! BPE). mergesmith ships no vocabulary: it uses the file the user names, or finds one in the
//! usual local caches, and says exactly how to get one when there is none.
//!
//! Prompts are encoded the way the web UI does: tokens in chunks of 75, each framed as
//! `<|startoftext|> ... <|endoftext|>` and padded to 77, with `<|endoftext|>` (CLIP-L: SD1,
//! SDXL's first encoder) or id 0, `!` (OpenCLIP: SD2, SDXL's second encoder).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Tokens per text-encoder pass, start and end tokens included.
pub const CONTEXT: usize = 77;

/// How a chunk is padded to [`CONTEXT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    /// With `<|endoftext|>` (CLIP-L).
    EndOfText,
    /// With id 0 (OpenCLIP).
    Zero,
}

/// A CLIP tokenizer.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    /// Where it was read from.
    pub path: PathBuf,
}

/// The Hugging Face repositories whose `tokenizer.json` is CLIP's BPE, in the order they are
/// looked for in the hub cache.
const HUB_REPOS: &[&str] = &[
    "models--openai--clip-vit-large-patch14",
    "models--openai--clip-vit-base-patch32",
    "models--laion--CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K",
];

impl ClipTokenizer {
    /// Reads a `tokenizer.json` (or the one in a directory).
    pub fn open(path: &Path) -> Result<ClipTokenizer> {
        let file = match path.is_dir() {
            true => path.join("tokenizer.json"),
            false => path.to_path_buf(),
        };
        let bad =
            |e: String| Error::Invalid(format!("{}: not a usable tokenizer: {e}", file.display()));
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| bad(e.to_string()))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| bad(format!("it has no `{t}` token, so it is not CLIP's")))
        };
        Ok(ClipTokenizer {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            inner,
            path: file,
        })
    }

    /// The tokenizer at `explicit` when given, else the first found of `$MERGESMITH_TOKENIZER`
    /// and CLIP's `tokenizer.json` in the Hugging Face hub cache (`$HF_HUB_CACHE`,
    /// `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`).
    pub fn find(explicit: Option<&Path>) -> Result<ClipTokenizer> {
        Self::find_with(explicit, &|k| std::env::var_os(k).map(PathBuf::from))
    }

    /// [`Self::find`] with the environment given as a function (for tests).
    pub fn find_with(
        explicit: Option<&Path>,
        env: &dyn Fn(&str) -> Option<PathBuf>,
    ) -> Result<ClipTokenizer> {
        if let Some(p) = explicit {
            return Self::open(p);
        }
        if let Some(p) = env("MERGESMITH_TOKENIZER") {
            return Self::open(&p);
        }
        let hubs: Vec<PathBuf> = [
            env("HF_HUB_CACHE"),
            env("HF_HOME").map(|h| h.join("hub")),
            env("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")),
            env("HOME").map(|h| h.join(".cache/huggingface/hub")),
        ]
        .into_iter()
        .flatten()
        .collect();
        for hub in &hubs {
            for repo in HUB_REPOS {
                let Ok(snapshots) = std::fs::read_dir(hub.join(repo).join("snapshots")) else {
                    continue;
                };
                let mut found: Vec<PathBuf> = snapshots
                    .flatten()
                    .map(|e| e.path().join("tokenizer.json"))
                    .filter(|p| p.is_file())
                    .collect();
                found.sort();
                if let Some(p) = found.first() {
                    return Self::open(p);
                }
            }
        }
        let searched: Vec<String> = hubs.iter().map(|h| h.display().to_string()).collect();
        Err(Error::Invalid(format!(
            "no CLIP tokenizer found (searched the Hugging Face hub cache{}{}). Provide one: \
             pass --tokenizer PATH/tokenizer.json (or `tokenizer:` in the recipe), set \
             MERGESMITH_TOKENIZER, or fetch it into the cache with \
             `huggingface-cli download openai/clip-vit-large-patch14 tokenizer.json`",
            if searched.is_empty() { "" } else { " in " },
            searched.join(", ")
        )))
    }

    /// The prompt's tokens in chunks of 75, each framed and padded to [`CONTEXT`] (an empty
    /// prompt is one chunk).
    pub fn encode(&self, text: &str, pad: Pad) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("tokenizing the prompt failed: {e}")))?;
        let ids = enc.get_ids();
        let pad_id = match pad {
            Pad::EndOfText => self.eos,
            Pad::Zero => 0,
        };
        let body = CONTEXT - 2;
        let chunks: Vec<&[u32]> = match ids.is_empty() {
            true => vec![&[]],
            false => ids.chunks(body).collect(),
        };
        Ok(chunks
            .into_iter()
            .map(|c| {
                let mut v = Vec::with_capacity(CONTEXT);
                v.push(self.bos);
                v.extend_from_slice(c);
                v.push(self.eos);
                v.resize(CONTEXT, pad_id);
                v
            })
            .collect())
    }
}
