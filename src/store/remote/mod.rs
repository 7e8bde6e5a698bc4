//! Remote caches: a shared copy of the local cache on S3-compatible storage or in a plain
//! directory (an NFS share), through the `object_store` crate.
//!
//! Layout under the remote's URL (`s3://BUCKET/PREFIX`, `file:///DIR` or a plain path):
//!
//! - `v2/cas/ab/<blake3>`: content objects (packs, pack key lists, manifests, images), named by
//!   the blake3 of their bytes, so a name always means the same bytes and racing writers
//!   write the same thing;
//! - `v2/ac/ab/<key>.json`: action entries, one per node result or image key: the local cache
//!   files that make it up (path relative to the cache's `v2/`, blake3, size). An entry is put
//!   after its content objects, with a create-only put: the first writer wins, and a reader
//!   that sees an entry finds everything it names.
//!
//! Every object fetched is checked against its blake3 and size before it is moved into the
//! local cache; a corrupt, truncated or missing one is deleted from the remote together with
//! the entry naming it (so it is rebuilt, then uploaded again), never used.
//!
//! Credentials come from the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, web
//! identity, container credentials...) or, when those are unset, the profile of
//! `~/.aws/credentials` and `~/.aws/config` named by `AWS_PROFILE`. They are never taken from a
//! URL or a recipe, and every message leaving this module has them blanked out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::error::{Error, Result};
use credentials::{env_secrets, profile_settings, redact};
use uploader::Uploader;

mod credentials;
mod transfer;
mod uploader;

/// The remote layout version (the top folder under the URL), as the local cache's.
const LAYOUT: &str = super::LAYOUT;

/// Objects larger than this go up in parts of this size.
const PART: usize = 16 << 20;

/// Parts of one object in flight at a time.
const PARTS_IN_FLIGHT: usize = 8;

/// Objects transferred at a time within one entry, and entries looked up at a time.
const CONCURRENCY: usize = 8;

/// What an action entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A merge node's result: its packs, their key lists, its manifest.
    Result,
    /// One image (a generated picture or a grid).
    Image,
}

/// One local cache file of an entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRef {
    /// Path relative to the cache's layout folder, e.g. `packs/ab/<name>.safetensors`.
    pub path: String,
    /// blake3 of its bytes (the name of its content object).
    pub blake3: String,
    /// Its length in bytes.
    pub size: u64,
}

/// An action entry: what a key's result is made of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Entry format version.
    pub format: u32,
    /// The node or image key.
    pub key: String,
    /// What it stands for.
    pub kind: Kind,
    /// Its files, in the order they are installed (the one that makes it visible last).
    pub files: Vec<FileRef>,
}

/// A local file to upload: its path relative to the cache's layout folder, and the blake3
/// recorded for it when it was written, if one was.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Path relative to the cache's layout folder.
    pub path: String,
    /// The digest recorded when the file was written (checked before uploading).
    pub recorded: Option<String>,
}

/// Transfer counters of one remote.
#[derive(Debug, Default)]
struct Counters {
    up_objects: AtomicU64,
    up_bytes: AtomicU64,
    up_entries: AtomicU64,
    up_micros: AtomicU64,
    down_objects: AtomicU64,
    down_bytes: AtomicU64,
    down_micros: AtomicU64,
    discarded: AtomicU64,
}

/// What a remote did in one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// The remote (URL without credentials).
    pub remote: String,
    /// Content objects uploaded (those the remote already had are not counted).
    pub uploaded_objects: u64,
    /// Their bytes.
    pub uploaded_bytes: u64,
    /// Action entries created.
    pub uploaded_entries: u64,
    /// Seconds spent uploading (summed over upload jobs).
    pub upload_seconds: f64,
    /// Content objects downloaded (and verified).
    pub downloaded_objects: u64,
    /// Their bytes.
    pub downloaded_bytes: u64,
    /// Seconds spent downloading.
    pub download_seconds: f64,
    /// Entries discarded because an object failed verification or was missing.
    pub discarded: u64,
    /// Uploads that failed (the build itself is not affected).
    pub errors: Vec<String>,
}

/// A remote cache.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// `[PREFIX/]v2`.
    root: String,
    runtime: tokio::runtime::Runtime,
    /// Values that must never be printed (credentials found in the environment or profile).
    secrets: Vec<String>,
    entries: Mutex<HashMap<String, Option<Entry>>>,
    counters: Counters,
    uploader: Mutex<Option<Uploader>>,
    errors: Mutex<Vec<String>>,
    /// Set by the first failure to reach the remote (after object_store's retries): the rest
    /// of the run works locally instead of failing request after request.
    unreachable: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// How requests are retried (each part of a multipart upload on its own).
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: Duration::from_secs(180),
    }
}

/// `ab/<name>`: objects sharded by the first two characters of their name.
fn sharded(name: &str) -> String {
    format!("{}/{name}", &name[..2.min(name.len())])
}

/// Whether `path` is a file an entry may name: `packs|results|images/<ab>/<name>` with a
/// plain name (no way out of the cache folder).
fn valid_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let [dir, shard, name] = parts[..] else {
        return false;
    };
    matches!(dir, "packs" | "results" | "images")
        && shard.len() == 2
        && name.starts_with(shard)
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Remote {
    /// Opens the remote at `url`: `s3://BUCKET[/PREFIX]` (credentials, region and endpoint
    /// from the AWS environment or profile), `file:///DIR`, or a directory path.
    pub fn open(url: &str) -> Result<Arc<Remote>> {
        let invalid = |msg: String| Error::Remote {
            url: String::new(),
            msg,
        };
        // Credential values, to blank out of messages: the environment's, and the profile's
        // when one is read.
        let mut secrets = env_secrets();
        let (store, shown, prefix): (Arc<dyn ObjectStore>, String, String) = match url
            .split_once("://")
        {
            Some((scheme, rest)) => {
                let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if authority.contains('@') {
                    return Err(invalid(
                        "credentials in the remote URL are not accepted (and not shown): \
                             use the AWS environment variables or a profile"
                            .to_string(),
                    ));
                }
                match scheme {
                    "s3" | "s3a" => {
                        if authority.is_empty() {
                            return Err(invalid(format!("`{url}`: expected s3://BUCKET[/PREFIX]")));
                        }
                        let mut b = AmazonS3Builder::from_env()
                            .with_bucket_name(authority)
                            .with_retry(retry());
                        for (k, v) in profile_settings() {
                            if matches!(
                                k,
                                AmazonS3ConfigKey::AccessKeyId
                                    | AmazonS3ConfigKey::SecretAccessKey
                                    | AmazonS3ConfigKey::Token
                            ) {
                                secrets.push(v.clone());
                            }
                            b = b.with_config(k, v);
                        }
                        let s3 = b.build().map_err(|e| Error::Remote {
                            url: format!("s3://{authority}"),
                            msg: redact(&e.to_string(), &secrets),
                        })?;
                        (
                            Arc::new(s3),
                            format!("s3://{authority}/{prefix}"),
                            prefix.to_string(),
                        )
                    }
                    "file" => Self::directory(Path::new(&format!("/{prefix}")))?,
                    other => {
                        return Err(invalid(format!(
                            "unsupported remote `{other}://`: expected s3://BUCKET[/PREFIX], \
                                 file:///DIR or a directory"
                        )))
                    }
                }
            }
            None => Self::directory(Path::new(url))?,
        };
        let root = match prefix.trim_matches('/') {
            "" => LAYOUT.to_string(),
            p => format!("{p}/{LAYOUT}"),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("mergesmith-remote")
            .enable_all()
            .build()
            .map_err(|e| Error::io(Path::new("tokio runtime"), e))?;
        Ok(Arc::new(Remote {
            store,
            url: shown,
            root,
            runtime,
            secrets,
            entries: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            uploader: Mutex::new(None),
            errors: Mutex::new(Vec::new()),
            unreachable: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A directory remote (created if missing).
    fn directory(dir: &Path) -> Result<(Arc<dyn ObjectStore>, String, String)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map(|fs| fs.with_fsync(true))
            .map_err(|e| Error::Remote {
                url: dir.display().to_string(),
                msg: e.to_string(),
            })?;
        Ok((Arc::new(fs), dir.display().to_string(), String::new()))
    }

    /// The remote's URL (never with credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An error about this remote, with credentials blanked out.
    fn error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Remote {
            url: self.url.clone(),
            msg: redact(&format!("{what}: {e}"), &self.secrets),
        }
    }

    fn cas(&self, digest: &str) -> ObjectPath {
        ObjectPath::from(format!("{}/cas/{}", self.root, sharded(digest)))
    }

    fn ac(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}/ac/{}.json", self.root, sharded(key)))
    }

    /// Reads an action entry from the remote (`None` when there is none or it is unusable).
    async fn read_entry(&self, key: &str, kind: Kind) -> Result<Option<Entry>> {
        let got = match self.store.get(&self.ac(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(&format!("reading the entry of {key}"), e)),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.error(&format!("reading the entry of {key}"), e))?;
        let entry: Option<Entry> = serde_json::from_slice(&bytes).ok();
        Ok(entry.filter(|e| {
            e.format == 1
                && e.key == key
                && e.kind == kind
                && !e.files.is_empty()
                && e.files.iter().all(|f| {
                    valid_path(&f.path)
                        && f.blake3.len() == 64
                        && f.blake3.chars().all(|c| c.is_ascii_hexdigit())
                })
        }))
    }

    /// Looks the entries of `keys` up (several at a time) and remembers them. A remote that
    /// cannot be reached is reported once and treated as empty for the rest of the run.
    pub fn lookup(&self, keys: &[(String, Kind)]) {
        if self.is_unreachable() {
            return;
        }
        let todo: Vec<&(String, Kind)> = {
            let known = self.entries.lock().expect("remote entries");
            keys.iter()
                .filter(|(k, _)| !known.contains_key(k))
                .collect()
        };
        let found: Result<Vec<(String, Option<Entry>)>> = self.runtime.block_on(
            futures::stream::iter(todo)
                .map(|(key, kind)| async move {
                    Ok::<_, Error>((key.clone(), self.read_entry(key, *kind).await?))
                })
                .buffer_unordered(CONCURRENCY * 4)
                .try_collect(),
        );
        match found {
            Ok(found) => self.entries.lock().expect("remote entries").extend(found),
            Err(e) => self.give_up(&e),
        }
    }

    /// The entry of `key`, looked up once per run (`None` once the remote is unreachable).
    fn entry(&self, key: &str, kind: Kind) -> Option<Entry> {
        if let Some(e) = self.entries.lock().expect("remote entries").get(key) {
            return e.clone();
        }
        if self.is_unreachable() {
            return None;
        }
        match self.runtime.block_on(self.read_entry(key, kind)) {
            Ok(e) => {
                self.entries
                    .lock()
                    .expect("remote entries")
                    .insert(key.to_string(), e.clone());
                e
            }
            Err(e) => {
                self.give_up(&e);
                None
            }
        }
    }

    /// Whether the remote holds `key`'s result.
    pub fn contains(&self, key: &str, kind: Kind) -> bool {
        self.entry(key, kind).is_some()
    }

    fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// Reports a failure to reach the remote (once) and stops using it for this run.
    fn give_up(&self, e: &Error) {
        if !self.unreachable.swap(true, Ordering::Relaxed) {
            self.warn(&format!("{e}; going on without the remote"));
        }
    }

    fn warn(&self, msg: &str) {
        let mut errors = self.errors.lock().expect("remote errors");
        if !errors.iter().any(|e| e == msg) {
            eprintln!("warning: {msg}");
            errors.push(msg.to_string());
        }
    }

    /// Entries discarded so far (objects that failed verification or were missing).
    pub fn discarded(&self) -> u64 {
        self.counters.discarded.load(Ordering::Relaxed)
    }
}

impl Summary {
    /// One line for people: what moved, how fast.
    pub fn line(&self) -> String {
        let rate = |bytes: u64, s: f64| match s > 0.0 {
            true => format!(", {:.0} MB/s", bytes as f64 / 1e6 / s),
            false => String::new(),
        };
        format!(
            "remote {}: uploaded {} objects ({:.1} MB{}) and {} entries; downloaded {} objects \
             ({:.1} MB{}){}",
            self.remote,
            self.uploaded_objects,
            self.uploaded_bytes as f64 / 1e6,
            rate(self.uploaded_bytes, self.upload_seconds),
            self.uploaded_entries,
            self.downloaded_objects,
            self.downloaded_bytes as f64 / 1e6,
            rate(self.downloaded_bytes, self.download_seconds),
            match self.discarded {
                0 => String::new(),
                n => format!("; {n} corrupt or missing entries discarded"),
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_inside_the_cache() {
        assert!(valid_path("packs/ab/abcdef.safetensors"));
        assert!(valid_path("packs/wh/whole-0123.safetensors"));
        assert!(valid_path("images/0f/0f12.png"));
        assert!(!valid_path("packs/ab/../../etc/passwd"));
        assert!(!valid_path("../ab/abc.png"));
        assert!(!valid_path("state/ab/ab.json"));
        assert!(!valid_path("images/ab/cd.png"));
        assert!(!valid_path("images/ab/ab/c.png"));
        assert!(!valid_path("/images/ab/ab.png"));
    }

    #[test]
    fn secrets_are_blanked() {
        let s = vec!["AKIAEXAMPLE".to_string(), "s3cr3t/key+value".to_string()];
        assert_eq!(
            redact("id AKIAEXAMPLE key s3cr3t/key+value.", &s),
            "id *** key ***."
        );
    }

    #[test]
    fn urls_with_credentials_are_refused_without_echoing_them() {
        let e = Remote::open("s3://AKIAXYZ:topsecret@bucket/p").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("not accepted"), "{msg}");
        assert!(
            !msg.contains("topsecret") && !msg.contains("AKIAXYZ"),
            "{msg}"
        );
    }
}
