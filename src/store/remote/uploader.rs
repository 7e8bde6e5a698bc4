//! The background uploader: what a build stores is queued and uploaded on a thread of its
//! own while the build goes on; the command waits for it at the end.

use super::*;

/// The background uploader: a queue and the thread draining it.
pub(super) struct Uploader {
    queue: std::sync::mpsc::Sender<(PathBuf, String, Kind, Vec<LocalFile>)>,
    thread: std::thread::JoinHandle<()>,
}

impl Remote {
    /// Queues an upload of `key`'s files (from the cache folder `root`) on the background
    /// uploader, which runs while the build goes on; [`Remote::finish`] waits for it.
    pub fn publish(self: &Arc<Self>, root: &Path, key: &str, kind: Kind, files: Vec<LocalFile>) {
        let mut slot = self.uploader.lock().expect("uploader");
        let uploader = slot.get_or_insert_with(|| {
            let (queue, jobs) =
                std::sync::mpsc::channel::<(PathBuf, String, Kind, Vec<LocalFile>)>();
            let remote = Arc::clone(self);
            let thread = std::thread::spawn(move || {
                for (root, key, kind, files) in jobs {
                    if remote.is_unreachable() {
                        continue;
                    }
                    match remote.upload(&root, &key, kind, &files) {
                        // The remote failed (after retries): stop trying for this run.
                        Err(e @ Error::Remote { .. }) => remote.give_up(&e),
                        Err(e) => remote.warn(&format!("not uploaded: {e}")),
                        Ok(_) => {}
                    }
                }
            });
            Uploader { queue, thread }
        });
        let _ = uploader
            .queue
            .send((root.to_path_buf(), key.to_string(), kind, files));
    }

    /// Waits for the queued uploads, then says what this run transferred.
    pub fn finish(&self) -> Summary {
        let uploader = self.uploader.lock().expect("uploader").take();
        if let Some(Uploader { queue, thread }) = uploader {
            drop(queue);
            let _ = thread.join();
        }
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Summary {
            remote: self.url.clone(),
            uploaded_objects: get(&c.up_objects),
            uploaded_bytes: get(&c.up_bytes),
            uploaded_entries: get(&c.up_entries),
            upload_seconds: get(&c.up_micros) as f64 / 1e6,
            downloaded_objects: get(&c.down_objects),
            downloaded_bytes: get(&c.down_bytes),
            download_seconds: get(&c.down_micros) as f64 / 1e6,
            discarded: get(&c.discarded),
            errors: self.errors.lock().expect("remote errors").clone(),
        }
    }
}
