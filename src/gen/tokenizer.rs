//! The CLIP tokenizer (the `tokenizers` crate does the BPE): a Hugging Face `tokenizer.json`
//! the user names or that sits in the usual local caches, else the CLIP vocabulary bundled in
//! the binary (`assets/clip/`, MIT-licensed, as open-clip-torch ships it), set up as
//! HF's CLIP tokenizer is: NFC, whitespace runs to one space, lowercase, CLIP's word regex,
//! byte-level characters, BPE with the `</w>` end-of-word suffix.
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
    /// Where it was read from (`<bundled>` for the built-in vocabulary).
    pub path: PathBuf,
    /// Content key: blake3 of the file (or of the bundled vocabulary), which image keys
    /// include.
    pub key: String,
}

/// CLIP's BPE merges, gzipped, as OpenAI published them.
const BUNDLED_VOCAB: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// The merges CLIP uses: lines 1 to 48894 of the vocabulary file (line 0 is a header).
const MERGES: usize = 49152 - 256 - 2;

/// The content key of the bundled vocabulary.
fn bundled_key() -> String {
    format!("bundled-{}", blake3::hash(BUNDLED_VOCAB).to_hex())
}

/// Where [`ClipTokenizer::find_with`] looks, in order: `explicit`, `$MERGESMITH_TOKENIZER`,
/// CLIP's `tokenizer.json` in a Hugging Face hub cache; `None`: use the bundled vocabulary.
fn locate(explicit: Option<&Path>, env: &dyn Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env("MERGESMITH_TOKENIZER") {
        return Some(p);
    }
    let hubs = [
        env("HF_HUB_CACHE"),
        env("HF_HOME").map(|h| h.join("hub")),
        env("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")),
        env("HOME").map(|h| h.join(".cache/huggingface/hub")),
    ];
    for hub in hubs.iter().flatten() {
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
            if let Some(p) = found.into_iter().next() {
                return Some(p);
            }
        }
    }
    None
}

/// GPT-2's byte-to-character table, in CLIP's vocabulary order: the printable bytes map to
/// themselves, the others to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut chars: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let others = (0..256u32).filter(|&b| !printable(b));
    chars.extend(
        others
            .enumerate()
            .filter_map(|(n, _)| char::from_u32(256 + n as u32)),
    );
    chars
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
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        let key = blake3::hash(&bytes).to_hex().to_string();
        Self::new(inner, file.clone(), key).map_err(bad)
    }

    fn new(
        inner: tokenizers::Tokenizer,
        path: PathBuf,
        key: String,
    ) -> std::result::Result<Self, String> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| format!("it has no `{t}` token, so it is not CLIP's"))
        };
        Ok(ClipTokenizer {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            inner,
            path,
            key,
        })
    }

    /// The tokenizer of the CLIP vocabulary bundled in the binary.
    pub fn bundled() -> Result<ClipTokenizer> {
        let bad = |e: String| Error::Invalid(format!("the bundled CLIP vocabulary: {e}"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(BUNDLED_VOCAB), &mut text)
            .map_err(|e| bad(e.to_string()))?;
        let merges: Vec<&str> = text.lines().skip(1).take(MERGES).collect();
        let bytes: Vec<String> = byte_chars().into_iter().map(String::from).collect();
        let mut vocab: Vec<String> = bytes.clone();
        vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
        vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
        vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        let ids: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i.into()))
            .collect();
        let special = |id: usize, content: &str| {
            serde_json::json!({ "id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": true, "special": true })
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(vocab.len() - 2, "<|startoftext|>"), special(vocab.len() - 1, "<|endoftext|>")],
            "normalizer": { "type": "Sequence", "normalizers": [
                { "type": "NFC" },
                { "type": "Replace", "pattern": { "Regex": "\\s+" }, "content": " " },
                { "type": "Lowercase" },
            ]},
            "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
                { "type": "Split", "behavior": "Removed", "invert": true, "pattern": { "Regex":
                  "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+" } },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
            ]},
            "post_processor": null,
            "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false,
                "vocab": ids, "merges": merges,
            },
        });
        let bytes = serde_json::to_vec(&json).map_err(|e| bad(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        Self::new(inner, PathBuf::from("<bundled>"), bundled_key()).map_err(bad)
    }

    /// The tokenizer at `explicit` when given, else the first found of `$MERGESMITH_TOKENIZER`
    /// and CLIP's `tokenizer.json` in the Hugging Face hub cache (`$HF_HUB_CACHE`,
    /// `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`), else
    /// the bundled vocabulary.
    pub fn find(explicit: Option<&Path>) -> Result<ClipTokenizer> {
        Self::find_with(explicit, &|k| std::env::var_os(k).map(PathBuf::from))
    }

    /// [`Self::find`] with the environment given as a function (for tests).
    pub fn find_with(
        explicit: Option<&Path>,
        env: &dyn Fn(&str) -> Option<PathBuf>,
    ) -> Result<ClipTokenizer> {
        match locate(explicit, env) {
            Some(p) => Self::open(&p),
            None => Self::bundled(),
        }
    }

    /// The content key of the tokenizer [`Self::find`] gives, without building the bundled
    /// one (a file is opened, so a file that is not CLIP's tokenizer is still an error).
    pub fn find_key(explicit: Option<&Path>) -> Result<String> {
        match locate(explicit, &|k| std::env::var_os(k).map(PathBuf::from)) {
            Some(p) => Ok(Self::open(&p)?.key),
            None => Ok(bundled_key()),
        }
    }

    /// The prompt's tokens in chunks of 75, each framed and padded to [`CONTEXT`] (an empty
    /// prompt is one chunk), the text read literally (no weights; A1111's chunking).
    pub fn encode(&self, text: &str, pad: Pad) -> Result<Vec<Vec<u32>>> {
        let piece = [crate::gen::prompt::Piece::Text(text.to_string(), 1.0)];
        Ok(self
            .encode_weighted(&piece, pad, &[])?
            .into_iter()
            .map(|c| c.ids)
            .collect())
    }

    /// The token ids of `text` (no framing).
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("tokenizing the prompt failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A parsed prompt's tokens with their weights, in A1111's chunks (each piece tokenized on
    /// its own; `BREAK` starts a chunk; a full chunk moves the tokens after a comma at most 20
    /// tokens back to the next), each framed and padded to [`CONTEXT`]; `embeddings` as
    /// [`crate::gen::prompt::chunks`] takes them (their names' ids and vector counts).
    pub fn encode_weighted(
        &self,
        pieces: &[crate::gen::prompt::Piece],
        pad: Pad,
        embeddings: &[(Vec<u32>, usize)],
    ) -> Result<Vec<crate::gen::prompt::Chunk>> {
        use crate::gen::prompt::Piece;
        let mut tokens = Vec::with_capacity(pieces.len());
        let mut breaks = Vec::with_capacity(pieces.len());
        for p in pieces {
            match p {
                Piece::Break => {
                    tokens.push((Vec::new(), 1.0));
                    breaks.push(true);
                }
                Piece::Text(text, weight) => {
                    tokens.push((self.ids(text)?, *weight));
                    breaks.push(false);
                }
            }
        }
        let pad_id = match pad {
            Pad::EndOfText => self.eos,
            Pad::Zero => 0,
        };
        let comma = self.inner.token_to_id(",</w>");
        Ok(crate::gen::prompt::chunks(
            &tokens,
            &breaks,
            comma,
            COMMA_BACKTRACK,
            (self.bos, self.eos, pad_id),
            embeddings,
        ))
    }
}

/// How far back (in tokens) a comma may be for A1111 to move a full chunk's tail after it to
/// the next chunk (its "comma padding backtrack" default).
pub const COMMA_BACKTRACK: usize = 20;
