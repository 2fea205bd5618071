//! Reading blobs through the block cache: a read becomes the blocks it touches (or,
//! for a reader that jumps about, the pieces of them it touches: pieces.rs), a
//! sequential reader earns prefetch and then a stream, and a reader that goes from the
//! first byte to the last has the content checked against the digest on the way.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::try_join_all;
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::blocks::{BlobAt, join_blocks};
use super::fetch::BlockFetcher;
use super::link_speed::LinkSpeed;
use super::pieces::Pieces;
use super::readahead::{REORDER_SLACK, ReadAhead};
use super::stream::{StreamPlan, stream_blocks};
use super::verify::{ContentCheck, Verifier};
use crate::cache::memo::FAILURE_MEMORY;
use crate::cache::{BlockCache, DiskCache};
use crate::registry::{Digest, Error, RegistryClient, RepoName, Result};
use crate::stats::RecentObject;

/// Prefetch fetches in flight at once, over all open files. Reads a program is waiting
/// for do not queue here. A registry spends milliseconds per range request (distribution
/// 2.8: 2-5 ms on loopback), so many must be in flight to keep a sequential reader fed.
const PREFETCH_CONCURRENCY: usize = 16;
/// The read-ahead window never exceeds this many blocks, nor a quarter of the cache
/// (prefetched blocks must not push out what is being read).
const MAX_WINDOW_BLOCKS: u64 = 32;
/// A reader whose window has grown this far (a few sequential reads) gets one streaming
/// GET instead of a range request per block.
const STREAM_AFTER_WINDOW: u64 = 4;
/// Streams that broke off before a reader stops getting new ones (it still gets
/// per-block prefetch, which retries).
const MAX_STREAM_FAILURES: u32 = 3;
/// A reader waiting for its stream to deliver a block gives up after this long (or half
/// of `--timeout`, if less) and fetches the block itself (a stream answers in
/// milliseconds unless the network fails).
const STREAM_STALL: Duration = Duration::from_secs(10);

pub struct BlobReads {
    cache: Arc<BlockCache>,
    verifier: Verifier,
    fetcher: BlockFetcher,
    /// Pieces of blocks for random readers.
    pieces: Arc<Pieces>,
    prefetch_slots: Arc<Semaphore>,
    max_window: u64,
    /// Streams running now: they share the window (see stream.rs).
    streams: Arc<std::sync::atomic::AtomicU64>,
    /// Whether streams are rate-bound here, so that readers fetch in parallel
    /// (link_speed.rs).
    link_speed: Arc<LinkSpeed>,
    /// Blobs this mount has served through the kernel's page cache: their pages are
    /// likely there (`keep_cache`), so later opens keep using them instead of going to
    /// the disk cache file by passthrough.
    served: Mutex<lru::LruCache<Digest, ()>>,
}

/// Blobs remembered in `BlobReads::served`.
const SERVED_BLOBS: usize = 16_384;

/// One open blob: where to fetch it, and the reader's state.
pub struct OpenBlob {
    repo: RepoName,
    digest: Digest,
    size: u64,
    readahead: Mutex<ReadAhead>,
    check: ContentCheck,
    /// The block index the reader has reached, watched by its stream.
    reader_at: watch::Sender<u64>,
    stream: Mutex<Option<ActiveStream>>,
    stream_failures: Arc<AtomicU32>,
    /// The last read that failed for want of an answer, and when: later reads of this
    /// file fail at once for [`FAILURE_MEMORY`], as the kernel retries a failed
    /// read-ahead with a read of its own, and a reader must get its EIO within
    /// `--timeout`, not after one per retry.
    last_failure: Mutex<Option<(Instant, Error)>>,
    /// What its reads are counted as in the stats' recent objects.
    object: Arc<RecentObject>,
}

/// The stream feeding an open file: the task, and the next block it will deliver (the
/// channel closes when the stream ends).
struct ActiveStream {
    task: AbortHandle,
    progress: watch::Receiver<u64>,
}

impl Drop for OpenBlob {
    fn drop(&mut self) {
        self.stop_stream();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OpenBlob {
    pub fn repo(&self) -> &RepoName {
        &self.repo
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    fn at(&self) -> BlobAt<'_> {
        BlobAt {
            repo: &self.repo,
            digest: &self.digest,
            size: self.size,
        }
    }

    /// Where the stream stands, if one is running.
    fn stream_progress(&self) -> Option<watch::Receiver<u64>> {
        lock(&self.stream)
            .as_ref()
            .filter(|s| !s.task.is_finished())
            .map(|s| s.progress.clone())
    }

    /// The error of a read that failed for want of an answer moments ago, if any.
    fn recent_failure(&self) -> Result<()> {
        match &*lock(&self.last_failure) {
            Some((at, e)) if at.elapsed() < FAILURE_MEMORY => Err(e.clone()),
            _ => Ok(()),
        }
    }

    fn remember_failure(&self, e: &Error) {
        if e.is_transient() {
            *lock(&self.last_failure) = Some((Instant::now(), e.clone()));
        }
    }

    fn stop_stream(&self) {
        if let Some(stream) = lock(&self.stream).take() {
            stream.task.abort();
        }
    }
}

impl BlobReads {
    pub fn new(
        cache: Arc<BlockCache>,
        client: RegistryClient,
        disk: Option<DiskCache>,
    ) -> BlobReads {
        let blocks_in_budget = cache.budget() / cache.block_size();
        let stats = client.stats().clone();
        let pieces = Arc::new(Pieces::new(
            cache.block_size(),
            cache.budget(),
            cache.limit().cloned(),
            stats.clone(),
        ));
        let verifier =
            Verifier::new(cache.clone(), stats, disk.clone()).with_pieces(pieces.clone());
        BlobReads {
            max_window: MAX_WINDOW_BLOCKS.min(blocks_in_budget / 4),
            prefetch_slots: Arc::new(Semaphore::new(PREFETCH_CONCURRENCY)),
            streams: Arc::default(),
            link_speed: Arc::default(),
            verifier,
            fetcher: BlockFetcher::new(client, cache.clone(), disk).with_pieces(pieces.clone()),
            pieces,
            served: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(SERVED_BLOBS).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            cache,
        }
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.fetcher.disk()
    }

    /// The whole blob as a local file, for FUSE passthrough: only once it is on disk
    /// whole and verified, its content has not failed a check since, and this mount has
    /// not read it through the page cache already (see `served`).
    pub fn local_file(&self, digest: &Digest, size: u64) -> Option<std::fs::File> {
        let mut served = lock(&self.served);
        if served.get(digest).is_some() || !self.verifier.trusted(digest) {
            return None;
        }
        let file = self.disk().and_then(|d| d.whole_blob(digest, size));
        if file.is_none() {
            served.put(digest.clone(), ());
        }
        file
    }

    /// Whether the kernel may keep this blob's pages from an earlier open: yes, it is
    /// immutable, unless its content failed the digest check.
    pub fn may_keep_pages(&self, digest: &Digest) -> bool {
        self.verifier.trusted(digest)
    }

    pub fn open(&self, repo: RepoName, digest: Digest, size: u64) -> OpenBlob {
        let object = Arc::new(RecentObject {
            kind: "blob",
            name: format!("{repo}@{digest}"),
            size,
            blobs: vec![digest.to_string()],
        });
        OpenBlob {
            object,
            check: self.verifier.start(repo.clone(), digest.clone(), size),
            readahead: Mutex::new(ReadAhead::new(self.cache.block_size(), self.max_window)),
            reader_at: watch::Sender::new(0),
            stream: Mutex::new(None),
            stream_failures: Arc::new(AtomicU32::new(0)),
            last_failure: Mutex::new(None),
            repo,
            digest,
            size,
        }
    }

    /// Reads up to `len` bytes at `offset` (short only at the end of the blob), or
    /// fails within `--timeout`: however many blocks it waits for, and whoever is
    /// fetching them, the read gives up when its time is out (the fetches go on for the
    /// readers that share them, each within its own time).
    pub async fn read(&self, blob: &OpenBlob, offset: u64, len: u64) -> Result<Bytes> {
        if offset >= blob.size || len == 0 {
            return Ok(Bytes::new());
        }
        blob.recent_failure()?;
        let limit = self.fetcher.client().options().total_timeout;
        let result = match tokio::time::timeout(limit, self.read_blocks(blob, offset, len)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "GET /v2/{}/blobs/{} at byte {offset}: no answer within {} (--timeout)",
                blob.repo,
                blob.digest,
                humantime::format_duration(limit)
            ))),
        };
        if let Ok(bytes) = &result {
            self.fetcher
                .client()
                .stats()
                .recent
                .read(&blob.object, bytes.len() as u64);
        }
        if let Err(e) = &result {
            blob.remember_failure(e);
            if blob.check.failed().is_err() {
                // Wrong bytes, maybe a mirror's: the next open reads from the origin.
                self.fetcher.client().distrust_mirrors(&blob.digest);
            }
        }
        result
    }

    async fn read_blocks(&self, blob: &OpenBlob, offset: u64, len: u64) -> Result<Bytes> {
        // Do not fetch (and cache) more of a blob already known to come back wrong.
        blob.check.failed()?;
        let end = offset.saturating_add(len).min(blob.size);
        let bs = self.cache.block_size();
        let (ahead, window) = {
            let mut readahead = lock(&blob.readahead);
            let ahead = readahead.on_read(offset, end - offset, blob.size);
            (ahead, readahead.window())
        };
        // How far the reader has got: the furthest read end, as the kernel may deliver
        // its read-ahead out of order (a jump starts over, and stops the stream below).
        let reached = end / bs;
        blob.reader_at.send_if_modified(|at| {
            let furthest = if window == 0 {
                reached
            } else {
                reached.max(*at)
            };
            std::mem::replace(at, furthest) != furthest
        });
        if window == 0 {
            blob.stop_stream(); // a random reader: fetch only what it touches
        } else if !ahead.is_empty() && !self.stream_ahead(blob, &ahead, window) {
            // A stream stopped for parallel fetches (link_speed.rs) leaves the window's earlier
            // blocks to fetch as well, not one by one as the reader reaches them.
            let from = if self.link_speed.parallel() {
                reached.min(ahead.start)
            } else {
                ahead.start
            };
            for index in from..ahead.end {
                self.prefetch(blob, index);
            }
        }
        let (first, last) = (offset / bs, (end - 1) / bs);
        let parts = (first..=last)
            .map(|i| self.part(blob, i, offset.max(i * bs), end.min((i + 1) * bs), window));
        let parts = try_join_all(parts).await?;
        let data = join_blocks(&parts, offset, offset, end);
        // The read of the last byte waits for the verdict; others only hand over.
        blob.check.offer(offset, data.clone()).await?;
        // A sequential pass over a blob larger than the cache: the block it left behind,
        // further back than the kernel reorders its read-ahead, was used once.
        if window > 0 && blob.size > self.cache.budget() {
            let behind = (REORDER_SLACK / bs).max(1);
            if let Some(done) = first.checked_sub(behind) {
                self.cache.read_through(&(blob.digest.clone(), done));
            }
        }
        Ok(data)
    }

    /// Bytes `from..to` of block `index`: from the block, or for a random reader
    /// (`window` 0) from pieces of it if nobody has the block (memory, disk, a fetch in
    /// flight, a mirror's whole blob) and the read touches less than half of it.
    async fn part(
        &self,
        blob: &OpenBlob,
        index: u64,
        from: u64,
        to: u64,
        window: u64,
    ) -> Result<Bytes> {
        let by_pieces = window == 0
            && self.pieces.worth(blob.size, from, to)
            && !self.cache.contains(&(blob.digest.clone(), index))
            && !self.fetcher.on_disk(blob.at(), index)
            && !self.fetcher.checks_whole(blob.at());
        if by_pieces {
            return self
                .pieces
                .read(self.fetcher.client(), blob.at(), from, to)
                .await;
        }
        let block = self.block(blob, index).await?;
        let start = index * self.cache.block_size();
        Ok(join_blocks(&[block], start, from, to))
    }

    /// Block `index` of the blob, from the cache or the registry.
    async fn block(&self, blob: &OpenBlob, index: u64) -> Result<Bytes> {
        if let Some(mut progress) = blob.stream_progress() {
            // The stream will deliver this block: wait for it rather than ask the
            // registry again. It will get there: the read asking for it has moved the
            // reader's position past it, and the stream may run that far and beyond. If the stream ends first (or, against
            // all reason, stalls), fetch it here.
            let delivered = async {
                loop {
                    let next = *progress.borrow_and_update();
                    if index < next {
                        break;
                    }
                    if progress.changed().await.is_err() {
                        break;
                    }
                }
            };
            let patience = STREAM_STALL.min(self.fetcher.client().options().total_timeout / 2);
            if tokio::time::timeout(patience, delivered).await.is_err() {
                warn!(digest = %blob.digest, block = index, "stream stalled; fetching the block directly");
            }
        }
        self.cache
            .get(&(blob.digest.clone(), index), || {
                self.fetcher.fetch(blob.at(), index)
            })
            .await
    }

    /// Whether a stream feeds the reader: one already running, or one started now with a
    /// streaming GET from the first block of `ahead` for a reader that has earned it.
    /// False if it has not (or the block is already cached or on its way, as on a warm
    /// re-read, where a stream would only download what is there).
    fn stream_ahead(&self, blob: &OpenBlob, ahead: &std::ops::Range<u64>, window: u64) -> bool {
        // Checked and started under one lock: the kernel's read-ahead requests come in
        // several at once, and two streams of one reader would each find the other's
        // blocks cached, end, and leave the reader to ranges.
        let mut stream = lock(&blob.stream);
        if stream.as_ref().is_some_and(|s| !s.task.is_finished()) {
            return true;
        }
        if window < STREAM_AFTER_WINDOW.min(self.max_window)
            || blob.stream_failures.load(Ordering::Relaxed) >= MAX_STREAM_FAILURES
            || self.cache.contains(&(blob.digest.clone(), ahead.start))
            || self.fetcher.on_disk(blob.at(), ahead.start)
            || self.fetcher.checks_whole(blob.at())
            || self.link_speed.parallel()
        {
            return false;
        }
        let plan = StreamPlan {
            repo: blob.repo.clone(),
            digest: blob.digest.clone(),
            size: blob.size,
            from_block: ahead.start,
            lead: self.max_window,
            running: self.streams.clone(),
            link_speed: self.link_speed.clone(),
        };
        let (cache, fetcher) = (self.cache.clone(), self.fetcher.clone());
        let (reader_at, failures) = (blob.reader_at.subscribe(), blob.stream_failures.clone());
        let (progress, progress_rx) = watch::channel(plan.from_block);
        let task = tokio::spawn(async move {
            let (digest, from) = (plan.digest.clone(), plan.from_block);
            if let Err(e) = stream_blocks(cache, fetcher, plan, reader_at, progress).await {
                // Readers fetch what the stream did not deliver themselves, with retries.
                failures.fetch_add(1, Ordering::Relaxed);
                debug!(%digest, from_block = from, "stream ended early: {e}");
            }
        });
        *stream = Some(ActiveStream {
            task: task.abort_handle(),
            progress: progress_rx,
        });
        true
    }

    /// Starts fetching block `index` in the background, if nobody has it yet.
    fn prefetch(&self, blob: &OpenBlob, index: u64) {
        let key = (blob.digest.clone(), index);
        if self.cache.contains(&key) {
            return;
        }
        let (cache, fetcher, slots) = (
            self.cache.clone(),
            self.fetcher.clone(),
            self.prefetch_slots.clone(),
        );
        let (repo, size) = (blob.repo.clone(), blob.size);
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            // A reader may have fetched it while this task waited for a slot.
            if cache.contains(&key) {
                return;
            }
            let digest = key.0.clone();
            let at = BlobAt {
                repo: &repo,
                digest: &digest,
                size,
            };
            let fetched = cache.get(&key, || fetcher.fetch(at, key.1)).await;
            if let Err(e) = fetched {
                // The reader that needs this block will fetch it (and report) itself.
                debug!(%digest, block = key.1, "prefetch failed: {e}");
            }
        });
    }
}
