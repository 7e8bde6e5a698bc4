//! The lockfile: `<recipe>.lock` beside the recipe (`mergesmith.lock` for `mergesmith.yaml`),
//! meant for git. It records each input's and each output's hashes, so a teammate can prove
//! they have the same inputs and reproduced the same outputs (`mergesmith verify`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::writer::write_file_atomic;
use crate::error::{Error, Result};
use crate::hashing::{hash_file, HashMemo};
use crate::recipe::Recipe;

/// One file in the lock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockedFile {
    /// Path relative to the recipe.
    pub path: PathBuf,
    /// SHA-256 (the AUTOMATIC1111 / civitai model hash).
    pub sha256: String,
    /// blake3 (mergesmith's content key).
    pub blake3: String,
}

/// The lockfile contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lock {
    /// Lock format version.
    pub version: u32,
    /// Inputs by model name.
    pub inputs: BTreeMap<String, LockedFile>,
    /// Outputs by save-node name.
    pub outputs: BTreeMap<String, LockedFile>,
}

/// Where the lock of a recipe lives.
pub fn lock_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

fn relative(recipe: &Path, p: &Path) -> PathBuf {
    let dir = recipe.parent().unwrap_or(Path::new(""));
    p.strip_prefix(dir)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Writes the lock for a recipe whose outputs were just built (hashes come from the memo).
pub fn write(recipe: &Recipe, memo: &HashMemo) -> Result<PathBuf> {
    let path = lock_path(&recipe.path);
    let mut lock: Lock = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    lock.version = 1;
    let entry = |p: &Path| -> Result<LockedFile> {
        let (h, _) = memo.hashes(p)?;
        Ok(LockedFile {
            path: relative(&recipe.path, p),
            sha256: h.sha256,
            blake3: h.blake3,
        })
    };
    lock.inputs = recipe
        .models
        .iter()
        .map(|(n, (p, _))| Ok((n.clone(), entry(p)?)))
        .collect::<Result<_>>()?;
    lock.outputs.retain(|n, _| {
        recipe
            .nodes
            .get(n)
            .is_some_and(|n| n.output_file().is_some())
    });
    for (name, node) in &recipe.nodes {
        if let Some(to) = node.output_file() {
            if to.exists() {
                lock.outputs.insert(name.clone(), entry(to)?);
            }
        }
    }
    let mut text =
        serde_json::to_string_pretty(&lock).map_err(|e| Error::Invalid(e.to_string()))?;
    text.push('\n');
    write_file_atomic(&path, text.as_bytes(), true)?;
    Ok(path)
}

/// One difference found by `verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Input or output name.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// What differs.
    pub problem: String,
}

/// Re-reads every input and output listed in the lock (no memo: the bytes are hashed now)
/// and reports each difference.
pub fn verify(recipe_path: &Path) -> Result<Vec<Mismatch>> {
    let path = lock_path(recipe_path);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let lock: Lock = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let dir = recipe_path.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (kind, entries) in [("input", &lock.inputs), ("output", &lock.outputs)] {
        for (name, f) in entries {
            let file = dir.join(&f.path);
            let problem = match hash_file(&file) {
                Err(e) => Some(format!("{kind} cannot be read: {e}")),
                Ok(h) if h.sha256 != f.sha256 => Some(format!(
                    "{kind} differs: SHA-256 {} (lock: {})",
                    h.sha256, f.sha256
                )),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                out.push(Mismatch {
                    name: name.clone(),
                    path: f.path.clone(),
                    problem,
                });
            }
        }
    }
    Ok(out)
}

/// Rebuilds every output of the recipe from its inputs in a fresh cache (a temporary
/// directory beside the recipe, removed afterwards), then compares the inputs and the
/// rebuilt outputs with the lock. Nothing outside the temporary directory is written.
pub fn verify_rebuild(recipe: &Recipe, opts: &crate::build::BuildOptions) -> Result<Vec<Mismatch>> {
    let path = lock_path(&recipe.path);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let lock: Lock = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let dir = recipe.path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".mergesmith-verify.")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let mut fresh = recipe.clone();
    for (name, node) in fresh.nodes.iter_mut() {
        if let Some(to) = node.output_file_mut() {
            *to = tmp.path().join("out").join(format!("{name}.safetensors"));
        }
    }
    let cache = crate::store::Cache::new(&tmp.path().join("cache"));
    crate::build::build(&fresh, &cache, &[], opts)?;
    let memo = cache.memo();
    let mut out = Vec::new();
    let mut compare = |kind: &str, name: &str, f: &LockedFile, file: &Path| {
        let problem = match memo.hashes(file) {
            Err(e) => Some(format!("{kind} cannot be read: {e}")),
            Ok((h, _)) if h.sha256 != f.sha256 => Some(format!(
                "{kind} differs: SHA-256 {} (lock: {})",
                h.sha256, f.sha256
            )),
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            out.push(Mismatch {
                name: name.to_string(),
                path: f.path.clone(),
                problem,
            });
        }
    };
    for (name, f) in &lock.inputs {
        compare("input", name, f, &dir.join(&f.path));
    }
    for (name, f) in &lock.outputs {
        let rebuilt = match fresh.nodes.get(name).and_then(|n| n.output_file()) {
            Some(to) => to.to_path_buf(),
            None => tmp.path().join("missing"),
        };
        compare("rebuilt output", name, f, &rebuilt);
    }
    Ok(out)
}
