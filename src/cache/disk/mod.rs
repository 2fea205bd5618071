//! The disk cache (docs/SEMANTICS.md, "Disk cache"): the level under the memory block
//! cache, in a directory that every mount (and every restart) shares.
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
//! Reads from disk run on the blocking pool; writes go to one writer thread (store.rs)
//! through a short queue, and are dropped (counted) rather than making a reader wait.

pub mod admin;
mod budget;
mod entry;
mod files;
mod held;
pub mod layout;
mod partial;
pub mod private;
mod store;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::buf::BlockBuf;
use crate::registry::Digest;
use crate::stats::Stats;
use files::{Scope, WAITING_BLOCKS};
use held::{decode_held, encode_held};
use store::{Job, Store};

pub use files::FILE_BLOCK;
pub use held::HeldIndex;

/// Writes waiting for the writer thread. A fetch whose block finds the queue full
/// waits for room (the disk is normally faster than the network), but not longer than
/// `QUEUE_WAIT`: then the block is not cached, and the reader goes on.
const QUEUED_WRITES: usize = 8;
const QUEUE_WAIT: Duration = Duration::from_millis(500);
/// How often a background write looks for room in the queue.
const BELOW_POLL: Duration = Duration::from_millis(10);

/// The disk cache of one mount (one registry origin) in a shared directory.
#[derive(Clone)]
pub struct DiskCache {
    store: Arc<Store>,
    jobs: mpsc::Sender<Job>,
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
        let store = Arc::new(Store::open(root, budget, origin, stats)?);
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
        self.store.root()
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
        if !self.store.may_write(size) {
            return;
        }
        let job = Job::Block {
            digest: digest.clone(),
            size,
            block_size,
            index,
            bytes,
            epoch: self.store.epoch(),
        };
        let queued = tokio::time::timeout(QUEUE_WAIT, self.jobs.send(job)).await;
        if !matches!(queued, Ok(Ok(()))) {
            Stats::add(&self.store.stats().disk_dropped, 1);
        }
    }

    /// Queues a block fetched in the background, once the writer's queue is at most half
    /// full: blocks that readers wait on never queue behind these.
    pub async fn store_block_below(
        &self,
        digest: &Digest,
        size: u64,
        block_size: u64,
        index: u64,
        bytes: Bytes,
    ) {
        if !self.store.may_write(size) {
            return;
        }
        while self.jobs.capacity() <= QUEUED_WRITES / 2 {
            tokio::time::sleep(BELOW_POLL).await;
        }
        let job = Job::Block {
            digest: digest.clone(),
            size,
            block_size,
            index,
            bytes,
            epoch: self.store.epoch(),
        };
        if self.jobs.send(job).await.is_err() {
            Stats::add(&self.store.stats().disk_dropped, 1);
        }
    }

    /// A full read of the blob matched its digest: keep it whole, if the bytes read are
    /// the partial file's. Queued after the blocks it covers.
    pub fn verified(&self, digest: &Digest, size: u64, block_size: u64) {
        let job = Job::Verified {
            digest: digest.clone(),
            size,
            block_size,
            epoch: self.store.epoch(),
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
        budget::touch(&layout::blob_path(self.store.root(), digest));
        Some(file)
    }

    /// A metadata entry of `kind` (a short lowercase word, e.g. `layer-index-v1`) for
    /// content `key`, if one is on disk and intact. Content-addressed: never stale.
    pub async fn get_meta(&self, kind: &str, key: &Digest) -> Option<Bytes> {
        if !valid_kind(kind) {
            return None;
        }
        let path = layout::meta_path(self.store.root(), kind, key);
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
        let body = self.get_meta(layout::MANIFEST_KIND, digest).await?;
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
        self.put_meta(layout::MANIFEST_KIND, digest, Bytes::from(body));
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
        let dir = self.store.held_dir();
        let Ok(read) = fs::read_dir(dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter_map(|e| decode_held(entry::read(&e.path())?))
            .collect()
    }

    /// Waits (at most `within`) until the writes queued so far are done: an unmount
    /// leaves on disk what its reads fetched and decoded, for the next mount.
    pub async fn settle(&self, within: Duration) {
        let (done, finished) = tokio::sync::oneshot::channel();
        let flushed = async {
            if self.jobs.send(Job::Flushed(done)).await.is_ok() {
                let _ = finished.await;
            }
        };
        if tokio::time::timeout(within, flushed).await.is_err() {
            warn!(
                "the disk cache's last writes were not done in time; the next mount fetches them again"
            );
        }
    }

    /// Block `index` (of [`FILE_BLOCK`] bytes) of the decoded file `key` of `size` bytes,
    /// if it is kept (for every registry, or this one) and intact.
    pub async fn file_block(
        &self,
        key: &Digest,
        size: u64,
        index: u64,
        buffer: BlockBuf,
    ) -> Option<Bytes> {
        let (store, key) = (self.store.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.files().read(&*store, &key, size, index, buffer))
            .await
            .ok()
            .flatten()
    }

    /// Keeps block `index` of the decoded file `key`, for every registry if `shared`
    /// (its layer was verified whole). Queued; the caller never waits for it.
    pub fn store_file_block(&self, key: &Digest, index: u64, bytes: Bytes, shared: bool) {
        if self.store.writing_off() {
            return;
        }
        let scope = if shared { Scope::Shared } else { Scope::Origin };
        let job = Job::FileBlock {
            scope,
            key: key.clone(),
            index,
            bytes,
        };
        let job = match self.jobs.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(job)) => job,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        let waiting = self.store.files().waiting.clone();
        if waiting.fetch_add(1, Ordering::AcqRel) >= WAITING_BLOCKS {
            waiting.fetch_sub(1, Ordering::AcqRel);
            Stats::add(&self.store.stats().disk_dropped, 1);
            return;
        }
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let _ = jobs.send(job).await;
            waiting.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// The decoded file `key` of `size` bytes, if it is kept whole and intact: a local
    /// file the kernel may read directly.
    pub async fn whole_file(&self, key: &Digest, size: u64) -> Option<File> {
        let (store, key) = (self.store.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.files().whole(&*store, &key, size))
            .await
            .ok()
            .flatten()
    }

    /// Counts a lookup as a hit or a miss.
    fn count<T>(&self, found: Option<T>) -> Option<T> {
        let stats = self.store.stats();
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
            Stats::add(&self.store.stats().disk_dropped, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Reference, RepoName};
    use std::os::unix::fs::FileExt;

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

    fn file_buf() -> BlockBuf {
        crate::buf::BufferPool::new(FILE_BLOCK, 1).take(FILE_BLOCK as usize)
    }

    #[tokio::test]
    async fn decoded_files_stay_with_their_registry_until_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (
            cache(dir.path(), "http://a:5000").0,
            cache(dir.path(), "http://b:5000").0,
        );
        let (mine, ours) = (Digest::sha256_of(b"mine"), Digest::sha256_of(b"ours"));
        a.store_file_block(&mine, 0, Bytes::from_static(b"unverified"), false);
        a.store_file_block(&ours, 0, Bytes::from_static(b"verified"), true);
        a.settle(Duration::from_secs(5)).await;
        let got = |c: &DiskCache, key: &Digest, size| {
            let (c, key) = (c.clone(), key.clone());
            async move { c.file_block(&key, size, 0, file_buf()).await }
        };
        assert_eq!(
            got(&a, &mine, 10).await.as_deref(),
            Some(&b"unverified"[..])
        );
        assert_eq!(got(&b, &mine, 10).await, None, "another registry's");
        assert_eq!(got(&b, &ours, 8).await.as_deref(), Some(&b"verified"[..]));
        assert_eq!(
            got(&a, &mine, 11).await,
            None,
            "another size, another block"
        );
    }

    #[tokio::test]
    async fn a_whole_file_is_the_file_itself_once_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cache(dir.path(), "http://a:5000").0;
        let key = Digest::sha256_of(b"file");
        let content: Vec<u8> = (0..FILE_BLOCK + 100).map(|i| (i % 251) as u8).collect();
        let size = content.len() as u64;
        a.store_file_block(
            &key,
            1,
            Bytes::copy_from_slice(&content[FILE_BLOCK as usize..]),
            true,
        );
        a.settle(Duration::from_secs(5)).await;
        assert!(a.whole_file(&key, size).await.is_none(), "block 0 missing");
        a.store_file_block(
            &key,
            0,
            Bytes::copy_from_slice(&content[..FILE_BLOCK as usize]),
            true,
        );
        a.settle(Duration::from_secs(5)).await;
        let file = a.whole_file(&key, size).await.expect("whole");
        let mut back = vec![0u8; content.len()];
        file.read_exact_at(&mut back, 0).expect("read");
        assert!(back == content);
        // A flipped byte: a fresh mount neither passes the file on nor reads the block.
        let path = layout::file_path(dir.path(), layout::SHARED, &key, FILE_BLOCK);
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        data.write_all_at(b"X", 7).expect("flip");
        let fresh = cache(dir.path(), "http://a:5000").0;
        assert!(fresh.whole_file(&key, size).await.is_none());
        assert_eq!(fresh.file_block(&key, size, 0, file_buf()).await, None);
        assert!(fresh.file_block(&key, size, 1, file_buf()).await.is_some());
    }
}
