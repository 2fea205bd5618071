//! Pieces of blocks, for readers that jump about.
//!
//! A block is the unit of the cache and of the disk cache (2 MiB by default): right for
//! a reader going through a blob, which needs all of it soon. But a random 4 KiB read
//! that waits for its whole block waits, on a link of 25 MB/s, 84 ms beyond the round
//! trip. So a read that is not part of a sequential pass (readahead.rs), in a block that
//! nobody has (memory, disk, a fetch in flight), and touching less than half of it, gets
//! only the pieces it touches: [`PIECE_SIZE`] ranges aligned within the block, fetched
//! with one range request and kept in a cache of their own. When the reader goes on and
//! the block is wanted after all, its fetch (fetch.rs) joins the pieces held with one
//! request for the rest: a read at the start of a blob that then goes on fetches no
//! byte twice.
//!
//! Pieces live within `--cache-size` (cache/limit.rs): what they hold counts in it
//! (within their share), and a fetch of pieces reserves its bytes like a block's.
//!
//! What the caches hold stays simple: the block cache and the disk cache hold whole
//! blocks only (the disk's records are per block, with a CRC each: partial.rs), so
//! pieces are never written to disk; they live in memory beside the blocks and are
//! dropped once their block is there. They pass the same checks on the way in as blocks
//! (the answer's Content-Range and exact length, in the registry client), and a blob
//! whose digest check fails forgets its pieces with its blocks (verify.rs).

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::blocks::{BlobAt, join_blocks};
use crate::cache::blocks::BlockKey;
use crate::cache::{BlockCache, MemoryLimit};
use crate::registry::{Digest, Error, RegistryClient, Result};
use crate::stats::Stats;

/// The size of a piece. A 4 KiB read then costs a round trip plus 5 ms at 25 MB/s,
/// and 128 KiB is what `cat` and the kernel's first read-ahead ask for at once.
pub const PIECE_SIZE: u64 = 128 << 10;
/// Pieces may hold this share of the memory budget, within bounds (and at most a
/// quarter of it: MemoryLimit::share).
const PIECES_SHARE: u64 = 8;
const MIN_BUDGET: u64 = 2 << 20;
const MAX_BUDGET: u64 = 32 << 20;

pub struct Pieces {
    /// Keyed by digest and piece number: the block index × pieces per block + the
    /// piece within the block.
    cache: BlockCache,
    block_size: u64,
    per_block: u64,
    stats: Arc<Stats>,
    /// The budget their fetches reserve in, if any.
    limit: Option<Arc<MemoryLimit>>,
    /// The piece cache's own counters (what it holds), apart from the blocks'.
    own: Arc<Stats>,
}

impl Pieces {
    /// Pieces of `block_size` blocks, within a share of `cache_budget`, counted in
    /// `limit`.
    pub fn new(
        block_size: u64,
        cache_budget: u64,
        limit: Option<Arc<MemoryLimit>>,
        stats: Arc<Stats>,
    ) -> Pieces {
        let mut budget = (cache_budget / PIECES_SHARE).clamp(MIN_BUDGET, MAX_BUDGET);
        if let Some(limit) = &limit {
            budget = limit.share(budget);
        }
        let block_size = block_size.max(1);
        stats.piece_size.store(PIECE_SIZE, Ordering::Relaxed);
        stats.piece_budget.store(budget, Ordering::Relaxed);
        let own = Arc::new(Stats::default());
        Pieces {
            cache: BlockCache::beside(PIECE_SIZE, budget, own.clone(), limit.clone()),
            block_size,
            per_block: block_size.div_ceil(PIECE_SIZE),
            stats,
            limit,
            own,
        }
    }

    fn key(&self, digest: &Digest, index: u64, piece: u64) -> BlockKey {
        (digest.clone(), index * self.per_block + piece)
    }

    /// Where piece `piece` of block `index` starts in the blob, and how long it is
    /// (the last piece of a block, and of the blob, may be short).
    fn span(&self, size: u64, index: u64, piece: u64) -> (u64, u64) {
        let block_start = index * self.block_size;
        let block_end = block_start.saturating_add(self.block_size).min(size);
        let start = block_start + piece * PIECE_SIZE;
        let end = start.saturating_add(PIECE_SIZE).min(block_end);
        (start, end.saturating_sub(start))
    }

    /// The pieces that bytes `offset..end` of block `index` touch (`end > offset`).
    fn touched(&self, index: u64, offset: u64, end: u64) -> RangeInclusive<u64> {
        let block_start = index * self.block_size;
        (offset - block_start) / PIECE_SIZE..=(end - 1 - block_start) / PIECE_SIZE
    }

    fn pieces_in_block(&self, size: u64, index: u64) -> u64 {
        let block_start = index * self.block_size;
        self.block_size
            .min(size.saturating_sub(block_start))
            .div_ceil(PIECE_SIZE)
    }

    /// Whether bytes `offset..end` (within one block) are better read as pieces than
    /// as their block: they touch less than half of it.
    pub fn worth(&self, size: u64, offset: u64, end: u64) -> bool {
        if end <= offset {
            return false;
        }
        let index = offset / self.block_size;
        let block_len = self
            .block_size
            .min(size.saturating_sub(index * self.block_size));
        let touched = self.touched(index, offset, end);
        let pieces = touched.end() - touched.start() + 1;
        pieces * PIECE_SIZE * 2 < block_len
    }

    /// Bytes `offset..end` of the blob, all within one block: from the pieces held,
    /// else with one range request for the pieces from the first missing one to the
    /// last (fewer when another reader is fetching some of them).
    pub async fn read(
        &self,
        client: &RegistryClient,
        blob: BlobAt<'_>,
        offset: u64,
        end: u64,
    ) -> Result<Bytes> {
        let index = offset / self.block_size;
        let touched = self.touched(index, offset, end);
        let (first, last) = (*touched.start(), *touched.end());
        let mut parts = Vec::with_capacity((last - first + 1) as usize);
        let mut fetched = false;
        let mut piece = first;
        while piece <= last {
            let upto = (piece..=last)
                .rev()
                .find(|&p| !self.cache.contains(&self.key(blob.digest, index, p)))
                .unwrap_or(piece);
            let mut rest = Vec::new();
            let got = self
                .cache
                .get(&self.key(blob.digest, index, piece), || async {
                    fetched = true;
                    Stats::add(&self.stats.piece_fetches, 1);
                    let _reserved = self.reserve(blob.size, index, piece..=upto).await;
                    let mut run = self.fetch(client, blob, index, piece..=upto).await?;
                    rest = run.split_off(1);
                    run.pop()
                        .ok_or_else(|| Error::BadAnswer("an empty run of pieces".into()))
                })
                .await?;
            parts.push(got);
            for part in rest {
                piece += 1;
                self.cache
                    .insert(self.key(blob.digest, index, piece), part.clone());
                parts.push(part);
            }
            piece += 1;
        }
        if !fetched {
            Stats::add(&self.stats.piece_hits, 1);
        }
        self.publish_bytes();
        let (start, _) = self.span(blob.size, index, first);
        Ok(join_blocks(&parts, start, offset, end))
    }

    /// Reserves the memory of pieces `run` of block `index` for their fetch. Not for a
    /// block completed from its pieces: its fetch has reserved the whole block.
    async fn reserve(
        &self,
        size: u64,
        index: u64,
        run: RangeInclusive<u64>,
    ) -> Option<crate::cache::limit::Reservation> {
        let (start, _) = self.span(size, index, *run.start());
        let (last_start, last_len) = self.span(size, index, *run.end());
        Some(
            self.limit
                .as_ref()?
                .reserve(last_start + last_len - start)
                .await,
        )
    }

    /// Pieces `run` of block `index`, with one range request.
    async fn fetch(
        &self,
        client: &RegistryClient,
        blob: BlobAt<'_>,
        index: u64,
        run: RangeInclusive<u64>,
    ) -> Result<Vec<Bytes>> {
        let (start, _) = self.span(blob.size, index, *run.start());
        let (last_start, last_len) = self.span(blob.size, index, *run.end());
        let len = last_start + last_len - start;
        let bytes = client
            .get_blob_range(blob.repo, blob.digest, start, len)
            .await?;
        Ok(run
            .map(|p| {
                let (at, len) = self.span(blob.size, index, p);
                let from = (at - start) as usize;
                bytes.slice(from..from + len as usize)
            })
            .collect())
    }

    /// Block `index` made of the pieces held and one range request for the rest (from
    /// the first piece missing to the last), its buffer from `blocks`; None when no
    /// piece of it is held. The pieces are dropped: the block holds them now.
    pub async fn complete(
        &self,
        client: &RegistryClient,
        blocks: &BlockCache,
        blob: BlobAt<'_>,
        index: u64,
    ) -> Option<Result<Bytes>> {
        let count = self.pieces_in_block(blob.size, index);
        let held: Vec<Option<Bytes>> = (0..count)
            .map(|p| self.cache.peek(&self.key(blob.digest, index, p)))
            .collect();
        if held.iter().all(Option::is_none) {
            return None;
        }
        let missing = (0..count).filter(|&p| held[p as usize].is_none());
        let (from, run) = match (missing.clone().next(), missing.clone().next_back()) {
            (Some(a), Some(b)) => match self.fetch(client, blob, index, a..=b).await {
                Ok(run) => (a, run),
                Err(e) => return Some(Err(e)),
            },
            _ => (count, Vec::new()),
        };
        let block_len: u64 = (0..count).map(|p| self.span(blob.size, index, p).1).sum();
        let mut out = blocks.buffer(block_len as usize);
        for (p, held) in (0..count).zip(&held) {
            let fetched = p.checked_sub(from).and_then(|i| run.get(i as usize));
            let Some(part) = fetched.or(held.as_ref()) else {
                return Some(Err(Error::BadAnswer("a piece went missing".into())));
            };
            out.extend_from_slice(part);
        }
        Stats::add(&self.stats.blocks_from_pieces, 1);
        self.drop_block(blob.digest, blob.size, index);
        Some(Ok(out.freeze()))
    }

    /// Forgets the pieces of block `index`: the block is cached now.
    pub fn drop_block(&self, digest: &Digest, size: u64, index: u64) {
        if self.own.cache_bytes.load(Ordering::Relaxed) == 0 {
            return;
        }
        for p in 0..self.pieces_in_block(size, index) {
            self.cache.remove(&self.key(digest, index, p));
        }
        self.publish_bytes();
    }

    /// Forgets every piece of `digest` (its content turned out to be wrong).
    pub fn forget(&self, digest: &Digest) {
        self.cache.forget(digest);
        self.publish_bytes();
    }

    fn publish_bytes(&self) {
        let held = self.own.cache_bytes.load(Ordering::Relaxed);
        self.stats.piece_bytes.store(held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pieces() -> Pieces {
        Pieces::new(2 * MIB, 256 * MIB, None, Arc::default())
    }

    #[test]
    fn small_reads_are_worth_pieces_and_large_ones_their_block() {
        let p = pieces();
        let size = 64 * MIB;
        assert!(p.worth(size, 3 * MIB + 4096, 3 * MIB + 8192));
        assert!(p.worth(size, 2 * MIB, 2 * MIB + 7 * PIECE_SIZE));
        assert!(!p.worth(size, 2 * MIB, 3 * MIB), "half a block: the block");
        // A blob of one small block: the block, however small the read.
        assert!(!p.worth(100 << 10, 0, 4096));
        // The short last block of a blob: half of what it holds.
        assert!(p.worth(64 * MIB + MIB, 64 * MIB, 64 * MIB + 4096));
        assert!(!p.worth(64 * MIB + (200 << 10), 64 * MIB, 64 * MIB + 4096));
    }

    #[test]
    fn pieces_are_aligned_within_their_block_and_end_with_it() {
        let p = Pieces::new(300 << 10, 256 * MIB, None, Arc::default());
        assert_eq!(p.per_block, 3);
        let size = 1000 << 10;
        assert_eq!(p.span(size, 1, 0), (300 << 10, PIECE_SIZE));
        assert_eq!(p.span(size, 1, 2), ((300 << 10) + 2 * PIECE_SIZE, 44 << 10));
        assert_eq!(p.span(size, 3, 0), (900 << 10, 100 << 10));
        assert_eq!(p.pieces_in_block(size, 3), 1);
        assert_eq!(p.touched(1, 400 << 10, 600 << 10), 0..=2);
    }
}
