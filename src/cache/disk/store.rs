//! One registry's view of the cache directory, and the writer thread's work: blocks into
//! this registry's partial files, promotion of a verified blob to `blobs/<digest>`,
//! metadata entries, forgetting what turned out wrong, and the budget kept throughout.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, info, warn};

use super::admin;
use super::budget::{self, Budget, allocated};
use super::entry;
use super::files::{Directory, Files, Scope};
use super::held::{HeldIndex, encode_held};
use super::layout;
use super::partial::{self, Partial, Written, with_lock};
use super::private::{self, Exposure};
use crate::buf::BlockBuf;
use crate::registry::Digest;
use crate::stats::Stats;

/// Partial files kept open.
const OPEN_PARTIALS: usize = 64;
/// How long writing stays off after the disk was found full.
const FULL_BACKOFF: Duration = Duration::from_secs(30);

pub struct Store {
    root: PathBuf,
    /// A hash of the registry's origin: the partial files of this registry.
    origin_id: String,
    /// Names this process in partial records (see partial.rs).
    writer_id: u64,
    budget: Budget,
    stats: Arc<Stats>,
    partials: Mutex<LruCache<(Digest, u64), Arc<Partial>>>,
    /// Writing is off until then (the disk was full).
    full_until: Mutex<Option<Instant>>,
    temp_names: AtomicU64,
    /// Blobs whose content turned out wrong, with the count of forgets when it did: a
    /// block or promotion queued before that (the wrong bytes on their way to disk) is
    /// dropped by the writer instead of landing after the forget.
    forgotten: Mutex<HashMap<Digest, u64>>,
    forgets: AtomicU64,
    /// Decoded file contents (files.rs).
    files: Files,
}

pub enum Job {
    Block {
        digest: Digest,
        size: u64,
        block_size: u64,
        index: u64,
        bytes: Bytes,
        /// `Store::forgets` when queued.
        epoch: u64,
    },
    Verified {
        digest: Digest,
        size: u64,
        block_size: u64,
        epoch: u64,
    },
    Meta {
        kind: String,
        key: Digest,
        body: Bytes,
    },
    /// A block of a decoded file (files.rs).
    FileBlock {
        scope: Scope,
        key: Digest,
        index: u64,
        bytes: Bytes,
    },
    /// Answered once every job queued before it is done (an unmount waits on it).
    Flushed(tokio::sync::oneshot::Sender<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A short, stable name for a registry origin (`scheme://host:port`).
fn origin_id(origin: &str) -> String {
    Digest::sha256_of(origin.as_bytes()).encoded()[..16].to_owned()
}

fn rand_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let hash = Digest::sha256_of(format!("{}-{nanos}", std::process::id()).as_bytes());
    u64::from_str_radix(&hash.encoded()[..16], 16).unwrap_or(nanos)
}

impl Store {
    /// Opens (creating it if needed) the cache directory `root` for a mount of the
    /// registry at `origin`, within `budget` bytes.
    pub fn open(root: &Path, budget: u64, origin: &str, stats: Arc<Stats>) -> io::Result<Store> {
        layout::create(root)?;
        match private::secure(root, layout::is_cache_dir(root))? {
            Exposure::Private => {}
            Exposure::Tightened(n) => {
                info!(dir = %root.display(), entries = n, "disk cache made private (0700/0600)")
            }
            Exposure::Exposed(why) => warn!("{why}"),
        }
        let origin_id = origin_id(origin);
        let partial_dir = root.join(layout::PARTIAL).join(&origin_id);
        private::create_dir_all(&partial_dir)?;
        private::create_dir_all(&layout::held_dir(root, &origin_id))?;
        let origin_file = partial_dir.join(layout::ORIGIN);
        if !origin_file.exists() {
            private::write(&origin_file, format!("{origin}\n").as_bytes())?;
        }
        layout::clean_tmp(root);
        let budget = Budget::open(root, budget)?;
        let used = budget.recount()?;
        stats.disk_budget.store(budget.limit(), Ordering::Relaxed);
        stats.disk_bytes.store(used, Ordering::Relaxed);
        info!(dir = %root.display(), used, budget = budget.limit(), "disk cache");
        Ok(Store {
            root: root.to_owned(),
            origin_id,
            writer_id: rand_id(),
            budget,
            stats,
            partials: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(OPEN_PARTIALS).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            full_until: Mutex::new(None),
            temp_names: AtomicU64::new(0),
            forgotten: Mutex::new(HashMap::new()),
            forgets: AtomicU64::new(0),
            files: Files::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Where this registry's held indexes are kept.
    pub fn held_dir(&self) -> PathBuf {
        layout::held_dir(&self.root, &self.origin_id)
    }

    /// Whether a blob of `size` bytes may be written now: it fits the budget at all,
    /// and writing is not off.
    pub fn may_write(&self, size: u64) -> bool {
        size <= self.budget.limit() && !self.writing_off()
    }

    /// What a job queued now carries, so that the writer can drop it if its blob is
    /// forgotten before it runs (`unless_forgotten`).
    pub fn epoch(&self) -> u64 {
        self.forgets.load(Ordering::Acquire)
    }

    pub fn whole_blob(&self, digest: &Digest, size: u64) -> Option<File> {
        let file = File::open(layout::blob_path(&self.root, digest)).ok()?;
        (file.metadata().ok()?.len() == size).then_some(file)
    }

    /// This registry's partial file of the blob, opened (and created if `create`).
    pub fn partial(&self, digest: &Digest, block_size: u64, create: bool) -> Option<Arc<Partial>> {
        let key = (digest.clone(), block_size);
        // Not `if let Some(p) = lock(..)..`: the guard would live through the block,
        // and the `pop` below would wait for this thread's own lock forever.
        let known = lock(&self.partials).get(&key).cloned();
        if let Some(p) = known {
            if p.linked() {
                return Some(p);
            }
            // Evicted or promoted by someone: what we knew of it is void.
            lock(&self.partials).pop(&key);
        }
        let path = layout::partial_path(&self.root, &self.origin_id, digest, block_size);
        match Partial::open(&path, block_size, create) {
            Ok(Some(p)) => {
                let p = Arc::new(p);
                lock(&self.partials).put(key, p.clone());
                Some(p)
            }
            Ok(None) => None,
            Err(e) => {
                if create {
                    self.write_failed(&e, "opening a partial blob");
                }
                None
            }
        }
    }

    pub fn read_block(
        &self,
        digest: &Digest,
        size: u64,
        block_size: u64,
        index: u64,
        mut buffer: BlockBuf,
    ) -> Option<Bytes> {
        let start = index.checked_mul(block_size)?;
        if start >= size {
            return None;
        }
        let len = block_size.min(size - start);
        if let Some(file) = self.whole_blob(digest, size) {
            file.read_exact_at(buffer.fill(usize::try_from(len).ok()?), start)
                .ok()?;
            budget::touch(&layout::blob_path(&self.root, digest));
            return Some(buffer.freeze());
        }
        let partial = self.partial(digest, block_size, false)?;
        let block = partial.read(index, len, buffer)?;
        budget::touch(&partial.data_path);
        Some(block)
    }

    pub fn writing_off(&self) -> bool {
        let mut full = lock(&self.full_until);
        match *full {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *full = None;
                false
            }
            None => false,
        }
    }

    /// A write failed: a full disk turns writing off for a while, with a log line.
    fn write_failed(&self, e: &io::Error, what: &str) {
        Stats::add(&self.stats.disk_dropped, 1);
        let no_space = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        if no_space {
            let mut full = lock(&self.full_until);
            if full.is_none() {
                warn!(
                    dir = %self.root.display(),
                    "disk cache: no space left ({what}); not caching for {}s (reads go on from the registry)",
                    FULL_BACKOFF.as_secs()
                );
            }
            *full = Some(Instant::now() + FULL_BACKOFF);
        } else {
            debug!(dir = %self.root.display(), "disk cache: {what} failed: {e}");
        }
    }

    pub fn temp_path(&self) -> PathBuf {
        let n = self.temp_names.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(layout::TMP)
            .join(format!("{}-{:x}-{n}", std::process::id(), self.writer_id))
    }

    pub fn held_path(&self, held: &HeldIndex) -> PathBuf {
        let key = Digest::sha256_of(&encode_held(held));
        layout::held_dir(&self.root, &self.origin_id).join(key.as_str())
    }

    /// Reserves `bytes` in the budget; false (and nothing reserved) if there is no room.
    fn reserve(&self, bytes: u64, keep: Option<&Path>) -> bool {
        match self.budget.reserve(bytes, keep) {
            Ok(r) => {
                self.stats.disk_bytes.store(r.used, Ordering::Relaxed);
                Stats::add(&self.stats.disk_evictions, r.evicted);
                if !r.granted {
                    Stats::add(&self.stats.disk_dropped, 1);
                }
                r.granted
            }
            Err(e) => {
                self.write_failed(&e, "counting the cache's size");
                false
            }
        }
    }

    fn release(&self, bytes: u64) {
        if let Ok(used) = self.budget.release(bytes) {
            self.stats.disk_bytes.store(used, Ordering::Relaxed);
        }
    }

    pub fn run(&self, job: Job) {
        if let Job::Flushed(done) = job {
            let _ = done.send(());
            return;
        }
        if self.writing_off() {
            Stats::add(&self.stats.disk_dropped, 1);
            return;
        }
        match job {
            Job::Block {
                digest,
                size,
                block_size,
                index,
                bytes,
                epoch,
            } => self.unless_forgotten(&digest, epoch, || {
                self.write_block(&digest, size, block_size, index, &bytes)
            }),
            Job::Verified {
                digest,
                size,
                block_size,
                epoch,
            } => self.unless_forgotten(&digest, epoch, || self.promote(&digest, size, block_size)),
            Job::Meta { kind, key, body } => self.write_meta(&kind, &key, &body),
            Job::FileBlock {
                scope,
                key,
                index,
                bytes,
            } => self.files.write(self, scope, &key, index, &bytes),
            Job::Flushed(_) => {} // answered above, writing or not
        }
    }

    fn write_block(&self, digest: &Digest, size: u64, block_size: u64, index: u64, bytes: &[u8]) {
        if self.whole_blob(digest, size).is_some() {
            return;
        }
        let path = layout::partial_path(&self.root, &self.origin_id, digest, block_size);
        let new_file = !path.exists();
        // The block, its record, and the first blocks of two new files.
        let cost = allocated(bytes.len() as u64) + 32 + if new_file { 8192 } else { 0 };
        if !self.reserve(cost, Some(&path)) {
            return;
        }
        let Some(partial) = self.partial(digest, block_size, true) else {
            self.release(cost);
            return;
        };
        match partial.write(index, bytes, self.writer_id) {
            Ok(Written::Stored(_)) => {}
            Ok(Written::AlreadyThere) => self.release(cost),
            Err(e) => {
                self.release(cost);
                self.write_failed(&e, "writing a block");
            }
        }
    }

    /// Makes the partial file the whole blob, if every block of it is what the verified
    /// read saw (partial.rs, `consistent`): durable first, then renamed into place.
    fn promote(&self, digest: &Digest, size: u64, block_size: u64) {
        if self.whole_blob(digest, size).is_some() {
            // Kept whole already (from another registry's read): this one's blocks of
            // it are not needed any more.
            self.drop_partial(digest, block_size);
            return;
        }
        let Some(partial) = self.partial(digest, block_size, false) else {
            return;
        };
        match partial.completeness(size.div_ceil(block_size)) {
            (true, true) => {}
            // Another daemon wrote some blocks: what this one verified need not be what
            // the file holds, so the file itself must match the digest.
            (true, false) if admin::file_matches(partial.data_file(), digest) => {}
            _ => {
                debug!(%digest, "verified, but the disk does not hold exactly what was read; not kept whole");
                return;
            }
        }
        let target = layout::blob_path(&self.root, digest);
        let result = with_lock(partial.log_file(), || {
            if partial.data_file().metadata()?.len() != size {
                return Err(io::Error::other("partial file has the wrong length"));
            }
            partial.data_file().sync_data()?;
            fs::rename(&partial.data_path, &target)?;
            let log_bytes = fs::metadata(&partial.log_path).map_or(0, |m| allocated(m.len()));
            fs::remove_file(&partial.log_path)?;
            Ok(log_bytes)
        })
        .and_then(|r| r);
        lock(&self.partials).pop(&(digest.clone(), block_size));
        match result {
            Ok(freed) => {
                self.release(freed);
                Stats::add(&self.stats.disk_verified, 1);
                debug!(%digest, "blob whole and verified on disk");
            }
            Err(e) => self.write_failed(&e, "keeping a verified blob"),
        }
    }

    /// Runs the write of a job queued at `epoch`, unless `digest` was forgotten since.
    /// Under the lock `forget` holds while it removes files: a write that checked
    /// before the forget would otherwise land after it, in a new partial file, and the
    /// next reader would get the wrong bytes back from the disk.
    fn unless_forgotten(&self, digest: &Digest, epoch: u64, write: impl FnOnce()) {
        let forgotten = lock(&self.forgotten);
        if forgotten.get(digest).is_some_and(|&at| at > epoch) {
            return;
        }
        write();
    }

    pub fn forget(&self, digest: &Digest, block_size: u64) {
        let mut forgotten = lock(&self.forgotten);
        let at = self.forgets.fetch_add(1, Ordering::AcqRel) + 1;
        forgotten.insert(digest.clone(), at);
        let whole = self.remove(&[layout::blob_path(&self.root, digest)]);
        if whole + self.drop_partial(digest, block_size) > 0 {
            warn!(%digest, "dropped from the disk cache: its content did not match the digest");
        }
    }

    /// Removes this registry's partial file of the blob; the bytes freed.
    fn drop_partial(&self, digest: &Digest, block_size: u64) -> u64 {
        let data = layout::partial_path(&self.root, &self.origin_id, digest, block_size);
        lock(&self.partials).pop(&(digest.clone(), block_size));
        self.remove(&[partial::log_path(&data), data])
    }

    /// Removes files and gives their bytes back to the budget; the bytes freed.
    fn remove(&self, paths: &[PathBuf]) -> u64 {
        let freed = budget::remove_files(paths);
        if freed > 0 {
            self.release(freed);
        }
        freed
    }

    fn write_meta(&self, kind: &str, key: &Digest, body: &[u8]) {
        let path = layout::meta_path(&self.root, kind, key);
        if path.exists() {
            return; // content-addressed: what is there is the same
        }
        let cost = allocated(body.len() as u64 + 24);
        if !self.reserve(cost, None) {
            return;
        }
        let result = path
            .parent()
            .map_or(Ok(()), private::create_dir_all)
            .and_then(|()| entry::write(&path, &self.temp_path(), body));
        if let Err(e) = result {
            self.release(cost);
            self.write_failed(&e, "writing a metadata entry");
        }
    }
}

impl Directory for Store {
    fn root(&self) -> &Path {
        &self.root
    }

    fn origin_id(&self) -> &str {
        &self.origin_id
    }

    fn writer_id(&self) -> u64 {
        self.writer_id
    }

    fn reserve(&self, bytes: u64, keep: Option<&Path>) -> bool {
        Store::reserve(self, bytes, keep)
    }

    fn release(&self, bytes: u64) {
        Store::release(self, bytes)
    }

    fn write_failed(&self, e: &io::Error, what: &str) {
        Store::write_failed(self, e, what)
    }
}
