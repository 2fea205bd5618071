//! The block cache for blob bytes: fixed-size blocks keyed by (digest, block index), kept
//! in LRU order within a byte budget.
//!
//! - One fetch per block however many readers want it: later readers wait for the fetch
//!   in flight instead of starting their own, and share its outcome, a failure too (a
//!   stalled registry costs the readers of a block one `--timeout`, not one each).
//! - No lock is held across network I/O: the map lock only guards bookkeeping.
//! - A failed fetch leaves nothing behind: the next reader to come simply fetches again.
//! - Only finished blocks count against the budget and can be evicted; a block being
//!   fetched is owned by its fetch.
//!
//! Blocks are keyed by digest alone, not repository: the same content in two
//! repositories is cached once.
//!
//! A block a sequential reader has read through, in a blob larger than the whole cache,
//! is *used once* (as the kernel calls such pages): under plain LRU such a pass pushes
//! everything else out and no block of it is there when the pass comes round again. So
//! it goes first, and its buffer serves the next block when the pool has none: a
//! gigabyte read through a 256 MiB cache keeps the other files' blocks, and touches a
//! window's worth of memory instead of faulting in the whole budget.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::OnceCell;

use super::limit::{MemoryLimit, Reservation};
use crate::buf::{BlockBuf, BufferPool};
use crate::registry::{Digest, Error};
use crate::stats::Stats;

pub type BlockKey = (Digest, u64);

/// Free block buffers kept for the next blocks (see buffer.rs), so a long read recycles
/// its memory instead of faulting in fresh pages for every block.
const POOLED_BUFFERS: usize = 8;

/// `E`: the error a fetch fails with (the registry's, but for tests).
pub struct BlockCache<E = Error> {
    block_size: u64,
    budget: u64,
    stats: Arc<Stats>,
    buffers: Arc<BufferPool>,
    /// The memory budget this cache counts in (cache/limit.rs), if any.
    limit: Option<Arc<MemoryLimit>>,
    /// Whether this is the budget's main cache (its fetches reserve their block, and it
    /// holds what the others leave), or a cache beside it that reports what it holds.
    main: bool,
    /// What a cache beside the main one last reported to the budget.
    reported: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner<E>>,
}

/// The outcome of one fetch, shared by everyone who waited for it.
type Flight<E> = Arc<OnceCell<Result<Bytes, E>>>;

struct Inner<E> {
    /// Finished blocks, least recently used first out.
    ready: LruCache<BlockKey, Bytes>,
    /// Bytes held in `ready`.
    bytes: u64,
    /// Blocks being fetched; readers of the same block share the flight.
    pending: HashMap<BlockKey, Flight<E>>,
    /// Blocks in `ready` read through once, put at the LRU end (see the module comment).
    used_once: HashSet<BlockKey>,
}

impl<E: Clone> BlockCache<E> {
    /// `block_size` must be non-zero; a budget smaller than one block caches nothing.
    /// Its fetches reserve their block in the budget before they start, and what the
    /// cache holds shrinks by what they reserved (cache/limit.rs).
    pub fn new(block_size: u64, budget: u64, stats: Arc<Stats>) -> BlockCache<E> {
        let limit = MemoryLimit::new(budget, stats.clone());
        BlockCache {
            main: true,
            ..Self::beside(block_size, budget, stats, Some(limit))
        }
    }

    /// A cache held to `budget` beside the main cache of `limit`: what it holds counts
    /// in that budget, and its fetches reserve nothing here (their owner reserves for
    /// them: fs/blob/pieces.rs; or they read the main cache: image/content.rs).
    pub fn beside(
        block_size: u64,
        budget: u64,
        stats: Arc<Stats>,
        limit: Option<Arc<MemoryLimit>>,
    ) -> BlockCache<E> {
        BlockCache {
            limit,
            main: false,
            reported: std::sync::atomic::AtomicU64::new(0),
            block_size: block_size.max(1),
            budget,
            stats,
            buffers: BufferPool::new(block_size, POOLED_BUFFERS),
            inner: Mutex::new(Inner {
                ready: LruCache::unbounded(),
                bytes: 0,
                pending: HashMap::new(),
                used_once: HashSet::new(),
            }),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The memory budget this cache counts in, if any.
    pub fn limit(&self) -> Option<&Arc<MemoryLimit>> {
        self.limit.as_ref()
    }

    /// What the cache may hold now: its budget, and for the main cache no more than
    /// the caches beside it and the fetches in flight leave.
    fn bound(&self) -> u64 {
        match &self.limit {
            Some(limit) if self.main => limit.room_for_cache().min(self.budget),
            _ => self.budget,
        }
    }

    /// Reserves `bytes` in the memory budget for a fetch that does not go through the
    /// cache (background reads into the disk cache, exact ranges of layers), waiting
    /// while fetches in flight hold it.
    pub async fn reserve_bytes(&self, bytes: u64) -> Option<Reservation> {
        let reservation = self.limit.as_ref()?.reserve(bytes).await;
        self.shrink();
        Some(reservation)
    }

    /// Reserves `bytes` of working memory for image decoding (cache/limit.rs), waiting
    /// for room, and evicts what no longer fits beside it.
    pub async fn reserve_working(&self, bytes: u64) -> Option<Reservation> {
        let reservation = self.limit.as_ref()?.reserve_working(bytes).await;
        self.shrink();
        Some(reservation)
    }

    /// Reserves a block's memory for a fetch (waiting while fetches in flight hold the
    /// budget), and evicts what no longer fits beside it.
    async fn reserve(&self) -> Option<Reservation> {
        let limit = self.limit.as_ref().filter(|_| self.main)?;
        let reservation = limit.reserve(self.block_size).await;
        self.shrink();
        Some(reservation)
    }

    /// Evicts what no longer fits in what the budget leaves the cache.
    fn shrink(&self) {
        let mut evicted = Vec::new();
        {
            let mut inner = self.lock();
            while inner.bytes > self.bound() {
                match Self::evict_lru(&mut inner, &self.stats) {
                    Some(block) => evicted.push(block),
                    None => break,
                }
            }
            self.publish_bytes(&inner);
        }
        drop(evicted); // after unlocking: its memory may go back to the pool
    }

    fn lock(&self) -> MutexGuard<'_, Inner<E>> {
        // Nothing panics while holding the lock; recover the state if something did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The block for `key`: from the cache, from a fetch already in flight (whose
    /// outcome, success or failure, is this caller's too), or from `fetch`, which runs
    /// only when neither exists. If the caller running a fetch gives up on it (its
    /// read was cancelled), one of those waiting runs its own.
    pub async fn get<F, Fut>(&self, key: &BlockKey, fetch: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let flight = {
            let mut inner = self.lock();
            if let Some(block) = inner.ready.get(key).cloned() {
                Stats::add(&self.stats.cache_hits, 1);
                // Wanted again after all: an ordinary block from now on.
                inner.used_once.remove(key);
                return Ok(block);
            }
            inner.pending.entry(key.clone()).or_default().clone()
        };
        let mut fetched_here = false;
        let result = flight
            .get_or_init(|| {
                fetched_here = true;
                async {
                    // Held until the block is fetched; then the cache counts it.
                    let _reserved = self.reserve().await;
                    fetch().await
                }
            })
            .await
            .clone();
        if !fetched_here {
            Stats::add(&self.stats.cache_joined, 1);
            return result;
        }
        Stats::add(&self.stats.cache_misses, 1);
        let mut inner = self.lock();
        if inner
            .pending
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            inner.pending.remove(key);
        }
        if let Ok(block) = &result {
            self.store(&mut inner, key.clone(), block.clone());
        }
        result
    }

    fn store(&self, inner: &mut Inner<E>, key: BlockKey, block: Bytes) {
        let len = block.len() as u64;
        if len > self.budget {
            return;
        }
        if let Some(old) = inner.ready.put(key, block) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        while inner.bytes > self.bound() {
            if Self::evict_lru(inner, &self.stats).is_none() {
                break;
            }
        }
        self.publish_bytes(inner);
    }

    /// The bytes held, for /.regfs/stats.
    fn publish_bytes(&self, inner: &Inner<E>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.cache_bytes.store(inner.bytes, Relaxed);
        if let Some(limit) = self.limit.as_ref().filter(|_| !self.main) {
            let before = self.reported.swap(inner.bytes, Relaxed);
            limit.held_beside(before, inner.bytes);
        }
    }

    /// Evicts the least recently used block (the caller drops it, best after unlocking:
    /// its memory may go back to the pool).
    fn evict_lru(inner: &mut Inner<E>, stats: &Stats) -> Option<Bytes> {
        let (key, evicted) = inner.ready.pop_lru()?;
        inner.used_once.remove(&key);
        inner.bytes -= evicted.len() as u64;
        Stats::add(&stats.cache_evictions, 1);
        Some(evicted)
    }

    /// An empty buffer for a block of up to `capacity` bytes: a recycled one if there is
    /// one (its memory goes back to the pool when the block is dropped, wherever), else
    /// the memory of a used-once block, else fresh memory.
    pub fn buffer(&self, capacity: usize) -> BlockBuf {
        if self.buffers.free_buffers() == 0 {
            let evicted = {
                let mut inner = self.lock();
                let oldest_used_once = inner
                    .ready
                    .peek_lru()
                    .is_some_and(|(key, _)| inner.used_once.contains(key));
                let evicted = oldest_used_once
                    .then(|| Self::evict_lru(&mut inner, &self.stats))
                    .flatten();
                self.publish_bytes(&inner);
                evicted
            };
            drop(evicted); // back to the pool, unless a reply or the disk writer holds it
        }
        self.buffers.take(capacity)
    }

    /// Marks a cached block as read through once (see the module comment): it goes
    /// first, unless someone reads it again before.
    pub fn read_through(&self, key: &BlockKey) {
        let mut inner = self.lock();
        if inner.ready.demote(key) {
            inner.used_once.insert(key.clone());
        }
    }

    /// Puts in a block fetched along with another (a whole blob checked at once), unless
    /// it is cached or being fetched already.
    pub fn insert(&self, key: BlockKey, block: Bytes) {
        let mut inner = self.lock();
        if !inner.ready.contains(&key) && !inner.pending.contains_key(&key) {
            self.store(&mut inner, key, block);
        }
    }

    /// Whether the block is cached or being fetched.
    pub fn contains(&self, key: &BlockKey) -> bool {
        let inner = self.lock();
        inner.ready.contains(key) || inner.pending.contains_key(key)
    }

    /// The cached block, without fetching and without counting a hit or refreshing its
    /// place in the LRU order (used by the integrity check, not by readers).
    pub fn peek(&self, key: &BlockKey) -> Option<Bytes> {
        self.lock().ready.peek(key).cloned()
    }

    /// Drops one cached block (what it held is kept elsewhere now).
    pub fn remove(&self, key: &BlockKey) {
        let removed = {
            let mut inner = self.lock();
            let removed = inner.ready.pop(key);
            if let Some(block) = &removed {
                inner.bytes -= block.len() as u64;
                inner.used_once.remove(key);
                self.publish_bytes(&inner);
            }
            removed
        };
        drop(removed); // after unlocking: its memory may go back to the pool
    }

    /// Drops every cached block of `digest` (its content turned out to be wrong).
    pub fn forget(&self, digest: &Digest) {
        let mut inner = self.lock();
        let keys: Vec<BlockKey> = inner
            .ready
            .iter()
            .filter(|((d, _), _)| d == digest)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(block) = inner.ready.pop(&key) {
                inner.bytes -= block.len() as u64;
            }
            inner.used_once.remove(&key);
        }
        self.publish_bytes(&inner);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    /// Fetches in these tests fail with a plain message.
    type TestCache = BlockCache<&'static str>;

    fn cache(budget: u64) -> (Arc<TestCache>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (Arc::new(BlockCache::new(4, budget, stats.clone())), stats)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_fetch_for_many_readers() {
        let (cache, stats) = cache(64);
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&(digest(1), 0), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, &str>(Bytes::from_static(b"abcd"))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(
                t.await.ok().and_then(Result::ok).as_deref(),
                Some(&b"abcd"[..])
            );
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let s = stats.snapshot(64, 4);
        assert_eq!((s.cache.misses, s.cache.hits + s.cache.joined), (1, 15));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failure_is_shared_by_everyone_waiting_and_not_kept() {
        let (cache, _) = cache(64);
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&(digest(4), 0), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err::<Bytes, _>("stalled")
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.ok(), Some(Err("stalled")));
        }
        // One fetch failed for all eight; the next reader tries again.
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let again = cache
            .get(&(digest(4), 0), || async {
                Ok::<_, &str>(Bytes::from_static(b"ok"))
            })
            .await;
        assert_eq!(again.as_deref(), Ok(&b"ok"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_takes_over_when_the_fetching_reader_gives_up() {
        let (cache, _) = cache(64);
        let key = (digest(5), 0);
        let slow = {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let fetch = cache.get(&key, || async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok::<_, &str>(Bytes::from_static(b"late"))
                });
                // This reader's deadline: it gives up, dropping its fetch.
                tokio::time::timeout(Duration::from_millis(50), fetch)
                    .await
                    .is_err()
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = cache
            .get(&key, || async {
                Ok::<_, &str>(Bytes::from_static(b"mine"))
            })
            .await;
        assert_eq!(slow.await.ok(), Some(true));
        assert_eq!(waiter.as_deref(), Ok(&b"mine"[..]));
    }

    #[tokio::test]
    async fn budget_is_kept_by_evicting_least_recent() {
        let (cache, stats) = cache(8);
        for i in 0..3 {
            let got = cache
                .get(&(digest(1), i), || async {
                    Ok::<_, &str>(Bytes::from_static(b"wxyz"))
                })
                .await;
            assert!(got.is_ok());
            assert!(stats.snapshot(8, 4).cache.bytes <= 8);
        }
        assert!(
            !cache.contains(&(digest(1), 0)),
            "the oldest block was evicted"
        );
        assert!(cache.contains(&(digest(1), 1)) && cache.contains(&(digest(1), 2)));
        assert_eq!(stats.snapshot(8, 4).cache.evictions, 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_does_not_poison_the_block() {
        let (cache, _) = cache(8);
        let key = (digest(2), 0);
        let first = cache.get(&key, || async { Err::<Bytes, _>("reset") }).await;
        assert_eq!(first, Err("reset"));
        assert!(!cache.contains(&key));
        let second = cache
            .get(&key, || async { Ok::<_, &str>(Bytes::from_static(b"ok")) })
            .await;
        assert_eq!(second.as_deref(), Ok(&b"ok"[..]));
    }

    #[tokio::test]
    async fn evicted_buffers_are_recycled_once_nobody_holds_them() {
        let (cache, _) = cache(8);
        let block = |b: &[u8]| {
            let mut buf = cache.buffer(4);
            buf.extend_from_slice(b);
            buf.freeze()
        };
        let first = block(b"aaaa");
        let held = first.clone();
        let (a, b) = (block(b"bbbb"), block(b"cccc"));
        for (i, bytes) in [first, a, b].into_iter().enumerate() {
            let got = cache
                .get(&(digest(3), i as u64), || async { Ok::<_, &str>(bytes) })
                .await;
            assert!(got.is_ok());
        }
        // Block 0 was evicted while `held` still pointed into it: not back yet.
        assert_eq!(cache.buffers.free_buffers(), 0);
        drop(held);
        assert_eq!(
            cache.buffers.free_buffers(),
            1,
            "back when the last holder let go"
        );
        let reused = cache.buffer(4);
        assert!(reused.is_empty());
        assert_eq!(cache.buffers.free_buffers(), 0);
    }

    #[tokio::test]
    async fn a_block_read_through_once_goes_first_and_lends_its_memory() {
        let (cache, _) = cache(12); // three blocks of 4 bytes
        let key = |i: u64| (digest(4), i);
        let put = |i: u64| {
            let cache = cache.clone();
            async move {
                let mut buf = cache.buffer(4);
                buf.extend_from_slice(&[i as u8; 4]);
                let block = buf.freeze();
                let got = cache.get(&key(i), || async { Ok::<_, &str>(block) }).await;
                assert!(got.is_ok());
            }
        };
        for i in 0..3 {
            put(i).await;
        }
        cache.read_through(&key(1));
        put(3).await;
        assert!(
            cache.peek(&key(1)).is_none(),
            "the used-once block went first"
        );
        assert!(cache.peek(&key(0)).is_some(), "not the least recent one");

        // With no free buffer, a used-once block's memory serves the next block.
        let pooled = cache.buffer(4);
        assert_eq!(cache.buffers.free_buffers(), 0);
        cache.read_through(&key(2));
        let lent = cache.buffer(4);
        assert!(cache.peek(&key(2)).is_none());
        assert_eq!(
            cache.buffers.free_buffers(),
            0,
            "its buffer was taken at once"
        );
        drop((pooled, lent));

        // Read again before it went: an ordinary block again, even as the oldest.
        cache.read_through(&key(0));
        assert!(cache.get(&key(0), || async { Err("cached") }).await.is_ok());
        assert!(cache.get(&key(3), || async { Err("cached") }).await.is_ok());
        let drained = (cache.buffer(4), cache.buffer(4));
        assert_eq!(cache.buffers.free_buffers(), 0);
        let _next = cache.buffer(4);
        assert!(cache.peek(&key(0)).is_some(), "a re-read block is kept");
        drop(drained);
    }

    #[tokio::test]
    async fn forget_drops_only_that_digest() {
        let (cache, stats) = cache(64);
        for d in [1, 2] {
            let got = cache
                .get(&(digest(d), 0), || async {
                    Ok::<_, &str>(Bytes::from_static(b"abcd"))
                })
                .await;
            assert!(got.is_ok());
        }
        cache.forget(&digest(1));
        assert!(!cache.contains(&(digest(1), 0)));
        assert!(cache.contains(&(digest(2), 0)));
        assert_eq!(stats.snapshot(64, 4).cache.bytes, 4);
    }
}
