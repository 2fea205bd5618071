//! The disk cache (DESIGN §8): the level under the memory block cache, in a directory
//! that every mount (and every restart) shares.
//!
//! - Blob blocks from a registry go into that registry's partial file (partial.rs),
//!   keyed by its origin: until the whole blob has matched its digest, nothing one
//!   registry served is read for another.
//! - A full read whose digest check passed, over blocks that are exactly what the
//!   partial file holds, promotes the file to `blobs/<digest>`: shared by every
//!   registry, read at any block size, and opened with FUSE passthrough.
//! - Manifests, layer indexes and other content-addressed metadata are checksummed
//!   entries (`get_meta` / `put_meta`); indexes held for their children are kept too,
//!   so an unmount does not lose them.
//! - The directory stays within its budget (budget.rs), counted as `du` does; a full
//!   disk turns writing off for a while (logged), never a read into an error.
//!
//! Reads from disk run on the blocking pool; writes go to one writer thread through a
//! short queue, and are dropped (counted) rather than making a reader wait.

mod budget;
mod entry;
pub mod layout;
mod partial;

pub mod admin;

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
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::buf::BlockBuf;
use crate::registry::{Digest, Reference, RepoName};
use crate::stats::Stats;
use budget::{Budget, allocated};
use partial::{Partial, Written, with_lock};

/// Writes waiting for the writer thread. A fetch whose block finds the queue full
/// waits for room (the disk is normally faster than the network), but not longer than
/// `QUEUE_WAIT`: then the block is not cached, and the reader goes on.
const QUEUED_WRITES: usize = 8;
const QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Partial files kept open.
const OPEN_PARTIALS: usize = 64;
/// How long writing stays off after the disk was found full.
const FULL_BACKOFF: Duration = Duration::from_secs(30);
/// The metadata kind manifests are stored under.
const MANIFEST_KIND: &str = "manifest";

/// The disk cache of one mount (one registry origin) in a shared directory.
#[derive(Clone)]
pub struct DiskCache {
    store: Arc<Store>,
    jobs: mpsc::Sender<Job>,
}

struct Store {
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
}

enum Job {
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
    /// Answered once every job queued before it is done (tests wait on it).
    #[cfg(test)]
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// An index held until its children are pushed, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldIndex {
    pub repo: RepoName,
    pub reference: Reference,
    pub body: Bytes,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `--cache-dir`'s default: `/var/cache/regfs` for root, else `$XDG_CACHE_HOME/regfs`
/// (`~/.cache/regfs`).
pub fn default_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/var/cache/regfs"));
    }
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let home = || std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
    Some(xdg.or_else(home)?.join("regfs"))
}

/// `--disk-cache-size`'s default: the smaller of 10 GiB and a tenth of the filesystem
/// the directory is on.
pub fn default_budget(dir: &Path) -> u64 {
    const TEN_GIB: u64 = 10 << 30;
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    match nix::sys::statvfs::statvfs(existing) {
        Ok(fs) => TEN_GIB.min(fs.blocks().saturating_mul(fs.fragment_size()) / 10),
        Err(_) => TEN_GIB,
    }
}

/// A short, stable name for a registry origin (`scheme://host:port`).
pub fn origin_id(origin: &str) -> String {
    Digest::sha256_of(origin.as_bytes()).encoded()[..16].to_owned()
}

/// Whether a metadata kind can name a directory: a short lowercase word.
fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !kind.starts_with('.')
}

impl DiskCache {
    /// Opens (creating it if needed) the cache directory `root` for a mount of the
    /// registry at `origin`, within `budget` bytes.
    pub fn open(root: &Path, budget: u64, origin: &str, stats: Arc<Stats>) -> io::Result<Self> {
        layout::create(root)?;
        let origin_id = origin_id(origin);
        let partial_dir = root.join(layout::PARTIAL).join(&origin_id);
        fs::create_dir_all(&partial_dir)?;
        fs::create_dir_all(layout::held_dir(root, &origin_id))?;
        let origin_file = partial_dir.join(layout::ORIGIN);
        if !origin_file.exists() {
            fs::write(origin_file, format!("{origin}\n"))?;
        }
        layout::clean_tmp(root);
        let budget = Budget::open(root, budget)?;
        let used = budget.recount()?;
        stats.disk_budget.store(budget.limit(), Ordering::Relaxed);
        stats.disk_bytes.store(used, Ordering::Relaxed);
        info!(dir = %root.display(), used, budget = budget.limit(), "disk cache");
        let store = Arc::new(Store {
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
        });
        let (jobs, mut queue) = mpsc::channel(QUEUED_WRITES);
        let writer = store.clone();
        std::thread::Builder::new()
            .name("regfs-disk".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    writer.run(job);
                }
            })?;
        Ok(DiskCache { store, jobs })
    }

    pub fn root(&self) -> &Path {
        &self.store.root
    }

    /// Block `index` of a blob of `size` bytes cached in blocks of `block_size`: from the
    /// whole verified blob, or from this registry's partial file. `buffer` is filled
    /// (a recycled block buffer).
    pub async fn block(
        &self,
        digest: &Digest,
        size: u64,
        block_size: u64,
        index: u64,
        buffer: BlockBuf,
    ) -> Option<Bytes> {
        let (store, digest) = (self.store.clone(), digest.clone());
        let found = tokio::task::spawn_blocking(move || {
            store.read_block(&digest, size, block_size, index, buffer)
        })
        .await
        .ok()
        .flatten();
        self.count(found)
    }

    /// Whether block `index` is on disk (without reading it).
    pub fn has_block(&self, digest: &Digest, size: u64, block_size: u64, index: u64) -> bool {
        self.store.whole_blob(digest, size).is_some()
            || self
                .store
                .partial(digest, block_size, false)
                .is_some_and(|p| p.has(index))
    }

    /// Queues a block fetched from the registry for writing (see `QUEUE_WAIT`). Not
    /// cached when the blob can never fit or the disk is full.
    pub async fn store_block(
        &self,
        digest: &Digest,
        size: u64,
        block_size: u64,
        index: u64,
        bytes: Bytes,
    ) {
        if size > self.store.budget.limit() || self.store.writing_off() {
            return;
        }
        let job = Job::Block {
            digest: digest.clone(),
            size,
            block_size,
            index,
            bytes,
            epoch: self.store.forgets.load(Ordering::Acquire),
        };
        let queued = tokio::time::timeout(QUEUE_WAIT, self.jobs.send(job)).await;
        if !matches!(queued, Ok(Ok(()))) {
            Stats::add(&self.store.stats.disk_dropped, 1);
        }
    }

    /// A full read of the blob matched its digest: keep it whole, if the bytes read are
    /// the partial file's. Queued after the blocks it covers.
    pub fn verified(&self, digest: &Digest, size: u64, block_size: u64) {
        let job = Job::Verified {
            digest: digest.clone(),
            size,
            block_size,
            epoch: self.store.forgets.load(Ordering::Acquire),
        };
        if let Err(mpsc::error::TrySendError::Full(job)) = self.jobs.try_send(job) {
            // Not to be dropped like a block: wait for room, off the reader's path.
            let jobs = self.jobs.clone();
            tokio::spawn(async move {
                let _ = jobs.send(job).await;
            });
        }
    }

    /// The content of this blob turned out wrong: drop what the disk has of it (this
    /// registry's blocks, and the whole blob if it was that).
    pub fn forget(&self, digest: &Digest, block_size: u64) {
        self.store.forget(digest, block_size);
    }

    /// The whole verified blob, opened for reading, if it is on disk with this size.
    pub fn whole_blob(&self, digest: &Digest, size: u64) -> Option<File> {
        let file = self.store.whole_blob(digest, size)?;
        budget::touch(&layout::blob_path(&self.store.root, digest));
        Some(file)
    }

    /// A metadata entry of `kind` (a short lowercase word, e.g. `layer-index-v1`) for
    /// content `key`, if one is on disk and intact. Content-addressed: never stale.
    pub async fn get_meta(&self, kind: &str, key: &Digest) -> Option<Bytes> {
        if !valid_kind(kind) {
            return None;
        }
        let path = layout::meta_path(&self.store.root, kind, key);
        let found = tokio::task::spawn_blocking(move || {
            let body = entry::read(&path)?;
            budget::touch(&path);
            Some(body)
        })
        .await
        .ok()
        .flatten();
        self.count(found)
    }

    /// Stores a metadata entry (queued; dropped if the disk is full or busy).
    pub fn put_meta(&self, kind: &str, key: &Digest, body: Bytes) {
        if !valid_kind(kind) {
            debug!(kind, "not a metadata kind; not cached");
            return;
        }
        self.queue(Job::Meta {
            kind: kind.to_owned(),
            key: key.clone(),
            body,
        });
    }

    /// A manifest by digest: its media type and bytes, checked against the digest.
    pub async fn manifest(&self, digest: &Digest) -> Option<(String, Bytes)> {
        let body = self.get_meta(MANIFEST_KIND, digest).await?;
        let split = body.iter().position(|&b| b == b'\n')?;
        let media_type = std::str::from_utf8(&body[..split]).ok()?.to_owned();
        let bytes = body.slice(split + 1..);
        digest.matches(&bytes).then_some((media_type, bytes))
    }

    pub fn put_manifest(&self, digest: &Digest, media_type: &str, bytes: &[u8]) {
        if media_type.contains('\n') || !digest.matches(bytes) {
            return;
        }
        let mut body = Vec::with_capacity(media_type.len() + 1 + bytes.len());
        body.extend_from_slice(media_type.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(bytes);
        self.put_meta(MANIFEST_KIND, digest, Bytes::from(body));
    }

    /// Keeps an index held for its children, so a later mount of this registry can push
    /// it. Written at once (it is a write the user made, not a cache entry).
    pub fn hold(&self, held: &HeldIndex) {
        let path = self.store.held_path(held);
        let temp = self.store.temp_path();
        if let Err(e) = entry::write(&path, &temp, &encode_held(held)) {
            warn!(repo = %held.repo, reference = %held.reference, "cannot keep the held index on disk ({e}); it lasts only as long as this mount");
        }
    }

    /// The held index was pushed (or given up): forget it.
    pub fn unhold(&self, held: &HeldIndex) {
        let _ = fs::remove_file(self.store.held_path(held));
    }

    /// The indexes of this registry that earlier mounts held and did not push.
    pub fn held(&self) -> Vec<HeldIndex> {
        let dir = layout::held_dir(&self.store.root, &self.store.origin_id);
        let Ok(read) = fs::read_dir(dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter_map(|e| decode_held(entry::read(&e.path())?))
            .collect()
    }

    /// Counts a lookup as a hit or a miss.
    fn count<T>(&self, found: Option<T>) -> Option<T> {
        let stats = &self.store.stats;
        Stats::add(
            if found.is_some() {
                &stats.disk_hits
            } else {
                &stats.disk_misses
            },
            1,
        );
        found
    }

    fn queue(&self, job: Job) {
        if self.store.writing_off() || self.jobs.try_send(job).is_err() {
            Stats::add(&self.store.stats.disk_dropped, 1);
        }
    }
}

fn encode_held(held: &HeldIndex) -> Vec<u8> {
    let mut body = format!("{}\n{}\n", held.repo, held.reference).into_bytes();
    body.extend_from_slice(&held.body);
    body
}

fn decode_held(body: Bytes) -> Option<HeldIndex> {
    let mut parts = body.splitn(3, |&b| b == b'\n');
    let repo = RepoName::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let reference = Reference::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let rest = parts.next()?.len();
    Some(HeldIndex {
        repo,
        reference,
        body: body.slice(body.len() - rest..),
    })
}

/// A number unlikely to be another live process's (pid and time mixed).
fn rand_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let hash = Digest::sha256_of(format!("{}-{nanos}", std::process::id()).as_bytes());
    u64::from_str_radix(&hash.encoded()[..16], 16).unwrap_or(nanos)
}

impl Store {
    fn whole_blob(&self, digest: &Digest, size: u64) -> Option<File> {
        let file = File::open(layout::blob_path(&self.root, digest)).ok()?;
        (file.metadata().ok()?.len() == size).then_some(file)
    }

    /// This registry's partial file of the blob, opened (and created if `create`).
    fn partial(&self, digest: &Digest, block_size: u64, create: bool) -> Option<Arc<Partial>> {
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

    fn read_block(
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

    fn writing_off(&self) -> bool {
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

    fn temp_path(&self) -> PathBuf {
        let n = self.temp_names.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(layout::TMP)
            .join(format!("{}-{:x}-{n}", std::process::id(), self.writer_id))
    }

    fn held_path(&self, held: &HeldIndex) -> PathBuf {
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

    fn run(&self, job: Job) {
        #[cfg(test)]
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
            #[cfg(test)]
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

    fn forget(&self, digest: &Digest, block_size: u64) {
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
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| entry::write(&path, &self.temp_path(), body));
        if let Err(e) = result {
            self.release(cost);
            self.write_failed(&e, "writing a metadata entry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf() -> crate::buf::BlockBuf {
        crate::buf::BufferPool::new(4096, 1).take(0)
    }

    fn cache(dir: &Path, origin: &str) -> (DiskCache, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let cache = DiskCache::open(dir, 64 << 20, origin, stats.clone()).expect("open");
        (cache, stats)
    }

    /// Waits for the writer thread to have done what was queued (a job answered after
    /// all before it: a queue seen empty may still have its last job running).
    async fn settle(cache: &DiskCache) {
        let (done, finished) = tokio::sync::oneshot::channel();
        cache
            .jobs
            .send(Job::Flushed(done))
            .await
            .expect("writer running");
        finished.await.expect("writer answered");
    }

    #[tokio::test]
    async fn blocks_are_per_registry_until_verified_then_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = b"0123456789".to_vec();
        let digest = Digest::sha256_of(&content);
        let (a, _) = cache(dir.path(), "http://a:5000");
        let (b, _) = cache(dir.path(), "http://b:5000");
        for (i, block) in content.chunks(4).enumerate() {
            a.store_block(&digest, 10, 4, i as u64, Bytes::copy_from_slice(block))
                .await;
        }
        settle(&a).await;
        assert_eq!(
            a.block(&digest, 10, 4, 1, buf()).await.as_deref(),
            Some(&b"4567"[..])
        );
        assert!(
            b.block(&digest, 10, 4, 1, buf()).await.is_none(),
            "another registry does not see unverified blocks"
        );
        a.verified(&digest, 10, 4);
        settle(&a).await;
        assert!(a.whole_blob(&digest, 10).is_some());
        assert_eq!(
            b.block(&digest, 10, 4, 2, buf()).await.as_deref(),
            Some(&b"89"[..]),
            "verified: shared"
        );
        assert_eq!(
            b.block(&digest, 10, 3, 1, buf()).await.as_deref(),
            Some(&b"345"[..]),
            "at any block size"
        );
    }

    #[tokio::test]
    async fn meta_and_held_entries_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, _) = cache(dir.path(), "http://a:5000");
        let key = Digest::sha256_of(b"layer");
        c.put_meta("layer-index-v1", &key, Bytes::from_static(b"index"));
        c.put_meta("../escape", &key, Bytes::from_static(b"no"));
        settle(&c).await;
        assert_eq!(
            c.get_meta("layer-index-v1", &key).await.as_deref(),
            Some(&b"index"[..])
        );
        assert!(c.get_meta("../escape", &key).await.is_none());
        let held = HeldIndex {
            repo: RepoName::parse("team/app").expect("repo"),
            reference: Reference::parse("v1").expect("tag"),
            body: Bytes::from_static(b"{\"manifests\":[]}"),
        };
        c.hold(&held);
        let (again, _) = cache(dir.path(), "http://a:5000");
        assert_eq!(again.held(), vec![held.clone()]);
        let (other, _) = cache(dir.path(), "http://b:5000");
        assert!(
            other.held().is_empty(),
            "held indexes belong to their registry"
        );
        again.unhold(&held);
        assert!(c.held().is_empty());
    }
}
