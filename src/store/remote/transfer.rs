//! Transfers: verified downloads into the local cache (temp file, blake3 and size checked,
//! fsync, rename; a bad object is discarded with its entry), and uploads of content objects
//! (multipart for large ones) before their entry.

use super::*;

/// Why a download failed: the remote's object is bad (discard it), or something else.
enum Fault {
    Bad(FileRef, String),
    Io(Error),
}

impl Remote {
    /// Downloads `key`'s files into the cache folder `root` (those not there already), each
    /// verified against its blake3 and size before it is moved into place. Returns whether
    /// the remote had the key. A file failing verification discards the entry (see the
    /// module docs) and is an error.
    pub fn fetch(&self, root: &Path, key: &str, kind: Kind) -> Result<bool> {
        let Some(entry) = self.entry(key, kind) else {
            return Ok(false);
        };
        let started = Instant::now();
        let (last, rest) = entry.files.split_last().expect("entries name files");
        let fetched = self.runtime.block_on(async {
            futures::stream::iter(rest)
                .map(|f| self.download(root, f))
                .buffer_unordered(CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            self.download(root, last).await
        });
        self.counters
            .down_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match fetched {
            Ok(()) => Ok(true),
            Err(Fault::Io(e)) => Err(e),
            Err(Fault::Bad(file, why)) => {
                self.runtime.block_on(async {
                    let _ = self.store.delete(&self.cas(&file.blake3)).await;
                    let _ = self.store.delete(&self.ac(key)).await;
                });
                self.entries
                    .lock()
                    .expect("remote entries")
                    .insert(key.to_string(), None);
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                Err(self.error(
                    &format!("{} of {key}", file.path),
                    format!("{why}; discarded from the remote, to be rebuilt"),
                ))
            }
        }
    }

    /// Downloads one file unless present, verifying it.
    async fn download(&self, root: &Path, f: &FileRef) -> std::result::Result<(), Fault> {
        let dest = root.join(&f.path);
        if dest.is_file() {
            return Ok(());
        }
        let got = match self.store.get(&self.cas(&f.blake3)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Fault::Bad(f.clone(), "its object is missing".to_string()))
            }
            Err(e) => return Err(Fault::Io(self.error(&format!("downloading {}", f.path), e))),
        };
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Fault::Io(Error::io(dir, e)))?;
        }
        let mut tmp = crate::checkpoint::writer::temp_beside(&dest).map_err(Fault::Io)?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| Fault::Io(self.error(&format!("downloading {}", f.path), e)))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if size > f.size {
                break;
            }
            std::io::Write::write_all(&mut tmp, &chunk)
                .map_err(|e| Fault::Io(Error::io(&dest, e)))?;
        }
        if size != f.size {
            return Err(Fault::Bad(
                f.clone(),
                format!("{size} bytes where {} were expected (truncated?)", f.size),
            ));
        }
        let digest = hasher.finalize().to_hex().to_string();
        if digest != f.blake3 {
            return Err(Fault::Bad(
                f.clone(),
                format!("blake3 {digest} where {} was expected (corrupt)", f.blake3),
            ));
        }
        crate::checkpoint::writer::persist(tmp, &dest, true).map_err(Fault::Io)?;
        self.counters.down_objects.fetch_add(1, Ordering::Relaxed);
        self.counters.down_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Uploads `key`'s files from the cache folder `root` (content objects the remote lacks,
    /// then the entry, create-only). Returns whether this call created the entry.
    pub fn upload(&self, root: &Path, key: &str, kind: Kind, files: &[LocalFile]) -> Result<bool> {
        let started = Instant::now();
        // `buffered` runs several at a time and yields them in the caller's order.
        let refs = self.runtime.block_on(
            futures::stream::iter(files)
                .map(|f| self.upload_file(root, f))
                .buffered(CONCURRENCY)
                .try_collect::<Vec<FileRef>>(),
        )?;
        let entry = Entry {
            format: 1,
            key: key.to_string(),
            kind,
            files: refs,
        };
        let body = serde_json::to_vec_pretty(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let created = match self.runtime.block_on(self.store.put_opts(
            &self.ac(key),
            PutPayload::from(body),
            opts,
        )) {
            Ok(_) => true,
            Err(object_store::Error::AlreadyExists { .. }) => false,
            Err(e) => return Err(self.error(&format!("writing the entry of {key}"), e)),
        };
        if created {
            self.counters.up_entries.fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .up_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.entries
            .lock()
            .expect("remote entries")
            .insert(key.to_string(), Some(entry));
        Ok(created)
    }

    /// Uploads one file as a content object unless the remote has it; checks it against the
    /// digest recorded when it was written first (a file corrupted since is not uploaded).
    async fn upload_file(&self, root: &Path, f: &LocalFile) -> Result<FileRef> {
        let path = root.join(&f.path);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: cache files are written once (temp file, rename) and never modified.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let digest = if map.len() > PART {
            let mut h = blake3::Hasher::new();
            h.update_rayon(&map);
            h.finalize()
        } else {
            blake3::hash(&map)
        }
        .to_hex()
        .to_string();
        if f.recorded.as_ref().is_some_and(|r| *r != digest) {
            return Err(Error::Failed(format!(
                "{}: its blake3 is not the one recorded when it was written (corrupt); run \
                 `mergesmith cache verify` to discard it",
                path.display()
            )));
        }
        let size = map.len() as u64;
        let location = self.cas(&digest);
        let what = || format!("uploading {}", f.path);
        match self.store.head(&location).await {
            Ok(meta) if meta.size == size => {
                return Ok(FileRef {
                    path: f.path.clone(),
                    blake3: digest,
                    size,
                })
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(&what(), e)),
        }
        let bytes = Bytes::from_owner(map);
        if bytes.len() <= PART {
            self.store
                .put(&location, PutPayload::from(bytes))
                .await
                .map_err(|e| self.error(&what(), e))?;
        } else {
            let upload = self
                .store
                .put_multipart(&location)
                .await
                .map_err(|e| self.error(&what(), e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            for start in (0..bytes.len()).step_by(PART) {
                if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    // Aborting may fail too (the part already failed after its retries).
                    let _ = w.abort().await;
                    return Err(self.error(&what(), e));
                }
                w.put(bytes.slice(start..(start + PART).min(bytes.len())));
            }
            w.finish().await.map_err(|e| self.error(&what(), e))?;
        }
        self.counters.up_objects.fetch_add(1, Ordering::Relaxed);
        self.counters.up_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(FileRef {
            path: f.path.clone(),
            blake3: digest,
            size,
        })
    }
}
