//! Reading blobs through the block cache: a read becomes the blocks it touches, a
//! sequential reader earns prefetch, and a reader that goes from the first byte to the
//! last has the content checked against the digest on the way.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use tokio::sync::Semaphore;
use tracing::{debug, error};

use super::readahead::ReadAhead;
use crate::cache::BlockCache;
use crate::registry::{Digest, DigestHasher, Error, RegistryClient, RepoName, Result};
use crate::stats::Stats;

/// Prefetch fetches in flight at once, over all open files. Reads a program is waiting
/// for do not queue here. A registry spends milliseconds per range request (distribution
/// 2.8: 2-5 ms on loopback), so many must be in flight to keep a sequential reader fed.
const PREFETCH_CONCURRENCY: usize = 16;
/// The read-ahead window never exceeds this many blocks, nor a quarter of the cache
/// (prefetched blocks must not push out what is being read).
const MAX_WINDOW_BLOCKS: u64 = 32;

pub struct BlobReads {
    cache: Arc<BlockCache>,
    /// Blobs whose content failed the digest check: the kernel must not keep their
    /// pages between opens until a full read has passed the check again.
    suspect: Mutex<HashSet<Digest>>,
    client: RegistryClient,
    prefetch_slots: Arc<Semaphore>,
    max_window: u64,
}

/// One open blob: where to fetch it, and the reader's state.
pub struct OpenBlob {
    repo: RepoName,
    digest: Digest,
    size: u64,
    readahead: Mutex<ReadAhead>,
    check: Mutex<Check>,
}

/// The running hash of the bytes read so far from the start of the blob.
struct Check {
    /// None once the verdict is in.
    hasher: Option<DigestHasher>,
    /// Bytes `[0, hashed)` have been hashed.
    hashed: u64,
    /// The content did not match: every later read of this open file fails too (the
    /// kernel retries a failed read-ahead page with a read of its own, which must not
    /// get the same wrong bytes without an error).
    mismatch: bool,
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
}

impl BlobReads {
    pub fn new(cache: Arc<BlockCache>, client: RegistryClient) -> BlobReads {
        let blocks_in_budget = cache.budget() / cache.block_size();
        BlobReads {
            max_window: MAX_WINDOW_BLOCKS.min(blocks_in_budget / 4),
            prefetch_slots: Arc::new(Semaphore::new(PREFETCH_CONCURRENCY)),
            suspect: Mutex::new(HashSet::new()),
            cache,
            client,
        }
    }

    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// Whether the kernel may keep this blob's pages from an earlier open: yes, it is
    /// immutable, unless its content failed the digest check.
    pub fn may_keep_pages(&self, digest: &Digest) -> bool {
        !lock(&self.suspect).contains(digest)
    }

    pub fn open(&self, repo: RepoName, digest: Digest, size: u64) -> OpenBlob {
        OpenBlob {
            check: Mutex::new(Check {
                hasher: Some(digest.hasher()),
                hashed: 0,
                mismatch: false,
            }),
            readahead: Mutex::new(ReadAhead::new(self.cache.block_size(), self.max_window)),
            repo,
            digest,
            size,
        }
    }

    /// Reads up to `len` bytes at `offset` (short only at the end of the blob).
    pub async fn read(&self, blob: &OpenBlob, offset: u64, len: u64) -> Result<Bytes> {
        if offset >= blob.size || len == 0 {
            return Ok(Bytes::new());
        }
        if lock(&blob.check).mismatch {
            // Do not fetch (and cache) more of a blob already known to come back wrong.
            return Err(Self::mismatch_error(blob));
        }
        let end = offset.saturating_add(len).min(blob.size);
        let bs = self.cache.block_size();
        let ahead = lock(&blob.readahead).on_read(offset, end - offset, blob.size);
        for index in ahead {
            self.prefetch(blob, index);
        }
        let (first, last) = (offset / bs, (end - 1) / bs);
        let blocks = try_join_all((first..=last).map(|i| self.block(blob, i))).await?;
        let data = if let [block] = blocks.as_slice() {
            let start = (offset - first * bs) as usize;
            block.slice(start..start + (end - offset) as usize)
        } else {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for (i, block) in (first..).zip(&blocks) {
                let block_start = i * bs;
                let from = offset.saturating_sub(block_start) as usize;
                let to = (end - block_start).min(block.len() as u64) as usize;
                out.extend_from_slice(&block[from..to]);
            }
            out.freeze()
        };
        self.check(blob, offset, &data)?;
        Ok(data)
    }

    /// Where block `index` starts in the blob, and its length (the last may be short).
    fn block_span(&self, blob: &OpenBlob, index: u64) -> (u64, u64) {
        let bs = self.cache.block_size();
        let start = index * bs;
        (start, bs.min(blob.size - start))
    }

    /// Block `index` of the blob, from the cache or the registry.
    async fn block(&self, blob: &OpenBlob, index: u64) -> Result<Bytes> {
        let (start, len) = self.block_span(blob, index);
        self.cache
            .get(&(blob.digest.clone(), index), || {
                self.client
                    .get_blob_range(&blob.repo, &blob.digest, start, len)
            })
            .await
    }

    /// Starts fetching block `index` in the background, if nobody has it yet.
    fn prefetch(&self, blob: &OpenBlob, index: u64) {
        let key = (blob.digest.clone(), index);
        if self.cache.contains(&key) {
            return;
        }
        let (start, len) = self.block_span(blob, index);
        let (cache, client, slots) = (
            self.cache.clone(),
            self.client.clone(),
            self.prefetch_slots.clone(),
        );
        let repo = blob.repo.clone();
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            // A reader may have fetched it while this task waited for a slot.
            if cache.contains(&key) {
                return;
            }
            let digest = key.0.clone();
            let fetched = cache
                .get(&key, || client.get_blob_range(&repo, &digest, start, len))
                .await;
            if let Err(e) = fetched {
                // The reader that needs this block will fetch it (and report) itself.
                debug!(%digest, block = key.1, "prefetch failed: {e}");
            }
        });
    }

    /// Advances the blob's running hash over `data` (read at `offset`) and over any
    /// cached bytes between what was hashed and `offset` (the kernel may deliver
    /// sequential reads out of order). When the hash reaches the end of the blob it must
    /// equal the digest; otherwise this read fails, so a wrong blob is never read to
    /// the end without an error.
    fn check(&self, blob: &OpenBlob, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut check = lock(&blob.check);
        let Check {
            hasher,
            hashed,
            mismatch,
        } = &mut *check;
        if *mismatch {
            return Err(Self::mismatch_error(blob));
        }
        let Some(h) = hasher.as_mut() else {
            return Ok(());
        };
        let bs = self.cache.block_size();
        while *hashed < end {
            if *hashed >= offset {
                h.update(&data[(*hashed - offset) as usize..]);
                *hashed = end;
                break;
            }
            // The gap before this read: take it from the cache, block by block.
            let index = *hashed / bs;
            let Some(block) = self.cache.peek(&(blob.digest.clone(), index)) else {
                return Ok(()); // not read yet (or evicted): the hash waits
            };
            let from = (*hashed - index * bs) as usize;
            let to = (offset - index * bs).min(block.len() as u64) as usize;
            if from >= to {
                return Ok(());
            }
            h.update(&block[from..to]);
            *hashed = index * bs + to as u64;
        }
        if *hashed < blob.size {
            return Ok(());
        }
        let Some(done) = hasher.take() else {
            return Ok(());
        };
        if done.matches(&blob.digest) {
            lock(&self.suspect).remove(&blob.digest);
            Stats::add(&self.client.stats().verified, 1);
            debug!(digest = %blob.digest, "read to the end; content matches the digest");
            return Ok(());
        }
        *mismatch = true;
        Stats::add(&self.client.stats().verify_failures, 1);
        self.cache.forget(&blob.digest);
        lock(&self.suspect).insert(blob.digest.clone());
        error!(
            digest = %blob.digest,
            repo = %blob.repo,
            "blob content does not match its digest; reads of this open file fail with EIO"
        );
        Err(Self::mismatch_error(blob))
    }

    fn mismatch_error(blob: &OpenBlob) -> Error {
        Error::BadAnswer(format!(
            "blob {} from {}: content does not match its digest",
            blob.digest, blob.repo
        ))
    }
}
