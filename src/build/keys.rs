//! Node keys: blake3 over a canonical JSON preimage of what determines a result (each kind's
//! typed preimage, with its inputs' content keys), in dependency order.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::nodes::KeyCx;
use crate::recipe::Recipe;
use crate::store::Cache;

/// Every node's key and preimage, in dependency order.
pub(super) fn keys(recipe: &Recipe, cache: &Cache) -> Result<BTreeMap<String, (String, Value)>> {
    let memo = cache.memo();
    let mut model_keys: BTreeMap<&str, String> = BTreeMap::new();
    for (name, (path, sha)) in &recipe.models {
        let (h, _) = memo
            .hashes(path)
            .map_err(|e| Error::Invalid(format!("model `{name}`: {e}")))?;
        if let Some(expected) = sha {
            // A full SHA-256, or a prefix such as the 10-digit AUTOMATIC1111 short hash.
            let matches = expected.len() >= 8
                && h.sha256
                    .get(..expected.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(expected));
            if !matches {
                return Err(Error::Invalid(format!(
                    "model `{name}` ({}): SHA-256 is {}, the recipe expects {expected}",
                    path.display(),
                    h.sha256
                )));
            }
        }
        model_keys.insert(name, h.blake3);
    }
    // Generate nodes' images depend on the tokenizer's vocabulary: key it by content.
    let tokenizer = match recipe.nodes.values().any(|n| n.uses_tokenizer()) {
        true => crate::gen::tokenizer::ClipTokenizer::find_key(recipe.tokenizer.as_deref())?,
        false => String::new(),
    };
    let mut out: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for name in &recipe.order {
        let cx = KeyCx {
            models: &model_keys,
            nodes: &out,
            tokenizer: &tokenizer,
        };
        let preimage = recipe.nodes[name].preimage(name, &cx);
        let text = serde_json::to_string(&preimage).map_err(|e| Error::Invalid(e.to_string()))?;
        out.insert(
            name.clone(),
            (blake3::hash(text.as_bytes()).to_hex().to_string(), preimage),
        );
    }
    Ok(out)
}
