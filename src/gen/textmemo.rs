//! Prompt encodings kept for reuse: across the images of a batch, the generate nodes of one
//! model, and the models of a sweep whose text encoders are the same weights (a block-weight
//! sweep of the U-Net changes no text-encoder tensor, so every cell encodes its prompts once).
//!
//! A model's encodings are keyed by its *text identity* — a hash of the content of the
//! tensors its text encoders read, given by whoever loads it ([`TextIdentity::shared`]); a
//! model loaded without one gets an identity of its own, so it shares with nobody. The rest
//! of the key is everything the encoding reads of the job (prompt, negative prompt, CLIP skip,
//! emphasis, embeddings) and the dtype and device of the result. One memo serves one
//! tokenizer (a build has one).

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Result;

/// Encodings kept at most (the oldest go first); a few MB each at most.
const KEEP: usize = 64;

/// Encoded prompts of any model kind, by key.
#[derive(Default)]
pub struct TextMemo {
    entries: Mutex<VecDeque<(blake3::Hash, Arc<dyn Any + Send + Sync>)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl TextMemo {
    /// An empty memo.
    pub fn new() -> Arc<TextMemo> {
        Arc::new(TextMemo::default())
    }

    /// The value kept under `key`, else `make`'s (kept). Two threads asking for the same
    /// key at once may both make it; the values are equal.
    pub fn get_or<T: Any + Send + Sync>(
        &self,
        key: blake3::Hash,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let found = self
            .lock()
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.clone().downcast::<T>().ok());
        if let Some(v) = found {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let v = Arc::new(make()?);
        let mut entries = self.lock();
        if entries.len() == KEEP {
            entries.pop_front();
        }
        entries.push_back((key, v.clone()));
        Ok(v)
    }

    /// How many encodings were reused and how many made.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, VecDeque<(blake3::Hash, Arc<dyn Any + Send + Sync>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A loaded model's text identity and the memo its encodings go to.
#[derive(Clone)]
pub struct TextIdentity {
    /// The memo.
    pub memo: Arc<TextMemo>,
    /// What identifies the model's text encoders' weights.
    pub id: String,
}

impl TextIdentity {
    /// An identity no other model has, with a memo of its own.
    pub fn unique() -> TextIdentity {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TextIdentity {
            memo: TextMemo::new(),
            id: format!("loaded-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The identity `id` (a content hash of the text encoders' tensors), in `memo`.
    pub fn shared(memo: Arc<TextMemo>, id: String) -> TextIdentity {
        TextIdentity { memo, id }
    }

    /// The memo key of an encoding: this identity, a tag for the kind of encoding, and the
    /// `parts` it reads (each length-prefixed, so no two lists hash alike).
    pub fn key(&self, kind: &str, parts: &[&str]) -> blake3::Hash {
        hash_parts(
            [self.id.as_str(), kind]
                .into_iter()
                .chain(parts.iter().copied()),
        )
    }
}

/// A hash of a list of strings, each length-prefixed so no two lists hash alike.
pub fn hash_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_key_and_keeps_a_bounded_number() {
        let memo = TextMemo::new();
        let a = TextIdentity::shared(memo.clone(), "te-1".into());
        let b = TextIdentity::shared(memo.clone(), "te-1".into());
        let other = TextIdentity::shared(memo.clone(), "te-2".into());
        let made = AtomicU64::new(0);
        let make = || {
            made.fetch_add(1, Ordering::Relaxed);
            Ok(vec![1.0f32])
        };
        let k = |t: &TextIdentity, p: &str| t.key("unet", &[p, "neg"]);
        a.memo.get_or(k(&a, "cat"), make).unwrap();
        b.memo.get_or(k(&b, "cat"), make).unwrap(); // same weights: reused
        other.memo.get_or(k(&other, "cat"), make).unwrap(); // other weights: made
        a.memo.get_or(k(&a, "dog"), make).unwrap(); // other prompt: made
        assert_eq!(made.load(Ordering::Relaxed), 3);
        assert_eq!(memo.counts(), (1, 3));
        // Parts are length-prefixed: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(a.key("k", &["ab", "c"]), a.key("k", &["a", "bc"]));
        for i in 0..KEEP {
            memo.get_or(a.key("k", &[&i.to_string()]), make).unwrap();
        }
        assert_eq!(memo.lock().len(), KEEP);
        // Unique identities never meet.
        let (u1, u2) = (TextIdentity::unique(), TextIdentity::unique());
        assert_ne!(u1.key("k", &[]), u2.key("k", &[]));
    }
}
