//! Checking blob content against its digest while it is read.
//!
//! A reader that goes from the first byte of a blob to the last has the bytes hashed on
//! the way, by a hasher task of its own that runs beside the reads (at 1 GB/s, hashing
//! in front of each read would cost a third of its time). Reads hand their bytes over
//! in the order they finish; pieces that arrive ahead of the hash wait in a bounded
//! stash (the kernel's read-ahead finishes out of order). The read that delivers the
//! last byte waits for the verdict and fails if the content is wrong, so a wrong blob is
//! never read to the end without an error.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use super::pieces::Pieces;
use crate::cache::{BlockCache, DiskCache};
use crate::registry::{Digest, DigestHasher, Error, RepoName, Result};
use crate::stats::Stats;

/// Read pieces queued for a hasher; reads wait (briefly) when it falls this far behind.
/// A queued piece is a slice of its block and keeps the whole block's memory from the
/// pool even after the cache has let it go, so the queue is memory outside --cache-size:
/// 16 reads of 1 MiB hold about 16 MiB (64 held up to 64 MiB, and a cold read through
/// a 64 MiB cache peaked at 145 MiB). Shorter than 16 stalls the reads behind the hash.
const QUEUED_PIECES: usize = 16;
/// Bytes of out-of-order pieces a hasher keeps, and all hashers together (at most the
/// memory budget, in which the stash counts beside the block cache: cache/limit.rs);
/// beyond that a hasher gives up on its open file (the blob is then
/// read without a check, and the log says so). Stashed pieces are copies: a slice of a
/// cached block would keep the whole block alive (a 1-byte read pinning 2 MiB), however
/// small the stash looked.
const MAX_STASH: u64 = 8 << 20;
const MAX_STASH_ALL: u64 = 32 << 20;
/// A piece that starts further than this ahead of the hash is not a read-ahead finishing
/// out of order but a reader that is not going from first byte to last (a random one):
/// its check is given up at once rather than stashed for nothing.
const STASH_REACH: u64 = 8 << 20;
/// When the last byte is read while at most this much before it is still on its way
/// (read-ahead finishing out of order), its read waits for those bytes, so the verdict
/// comes with it. A reader with larger gaps (a random one) does not wait.
const LAST_READ_GAP: u64 = 8 << 20;
/// The longest the read of the last byte waits for the bytes before it.
const LAST_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What all open files share: where to find bytes that were read before (to fill gaps),
/// and where to record blobs whose content failed.
#[derive(Clone)]
pub struct Verifier {
    cache: Arc<BlockCache>,
    stats: Arc<Stats>,
    /// Told of every verdict: a verified blob may be kept whole, a wrong one is dropped.
    disk: Option<DiskCache>,
    /// Blobs whose content failed the check: the kernel must not keep their pages
    /// between opens until a full read has passed the check again.
    suspect: Arc<Mutex<HashSet<Digest>>>,
    /// Bytes stashed by all hashers (MAX_STASH_ALL).
    stashed: Arc<std::sync::atomic::AtomicU64>,
    /// Pieces of blocks random readers got: a wrong blob's go with its blocks.
    pieces: Option<Arc<Pieces>>,
}

/// The check of one open file: a line to its hasher task.
pub struct ContentCheck {
    shared: Arc<CheckShared>,
    pieces: mpsc::Sender<Piece>,
}

struct CheckShared {
    repo: RepoName,
    digest: Digest,
    size: u64,
    /// The content did not match: every later read of this open file fails too (the
    /// kernel retries a failed read-ahead page with a read of its own, which must not
    /// get the same wrong bytes without an error).
    mismatch: AtomicBool,
    /// The verdict is in, or the check was given up: reads need not hand over bytes.
    done: AtomicBool,
}

struct Piece {
    offset: u64,
    data: Bytes,
    /// For the read of the last byte: where the verdict goes.
    verdict: Option<oneshot::Sender<()>>,
}

impl CheckShared {
    fn mismatch_error(&self) -> Error {
        Error::BadAnswer(format!(
            "blob {} from {}: content does not match its digest",
            self.digest, self.repo
        ))
    }
}

impl ContentCheck {
    /// Err once the content is known to be wrong.
    pub fn failed(&self) -> Result<()> {
        if self.shared.mismatch.load(Ordering::Acquire) {
            return Err(self.shared.mismatch_error());
        }
        Ok(())
    }

    /// Hands the bytes of a read at `offset` to the hasher. The read that ends at the
    /// end of the blob waits for the verdict, and fails if the content is wrong.
    pub async fn offer(&self, offset: u64, data: Bytes) -> Result<()> {
        let last = offset + data.len() as u64 >= self.shared.size;
        if self.shared.done.load(Ordering::Acquire) {
            return self.failed();
        }
        let (verdict, answered) = if last {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let piece = Piece {
            offset,
            data,
            verdict,
        };
        if self.pieces.send(piece).await.is_err() {
            // The hasher has finished: its verdict is in `mismatch`.
            return self.failed();
        }
        if let Some(answered) = answered {
            // Dropped unanswered only if the hasher stopped: the flag says why. Not
            // answered in time: the bytes before it did not come; the read goes unchecked.
            let _ = tokio::time::timeout(LAST_READ_WAIT, answered).await;
        }
        self.failed()
    }
}

impl Verifier {
    pub fn new(cache: Arc<BlockCache>, stats: Arc<Stats>, disk: Option<DiskCache>) -> Verifier {
        Verifier {
            cache,
            stats,
            disk,
            suspect: Arc::new(Mutex::new(HashSet::new())),
            stashed: Arc::default(),
            pieces: None,
        }
    }

    /// What all hashers may stash together: MAX_STASH_ALL, and no more than the whole
    /// budget, of which the cache gives way. Not a quarter like the other caches beside
    /// it: a check given up for want of room leaves a blob read unchecked, and a small
    /// budget read by several sequential readers at once needs a few MiB here (six
    /// readers in 8 MiB gave up two checks in three runs with a quarter).
    fn stash_share(&self) -> u64 {
        self.cache
            .limit()
            .map_or(MAX_STASH_ALL, |limit| MAX_STASH_ALL.min(limit.limit()))
    }

    /// The stash went from `before` bytes to `now`: counted beside the block cache.
    fn held_beside(&self, before: u64, now: u64) {
        if let Some(limit) = self.cache.limit() {
            limit.held_beside(before, now);
        }
    }

    /// A wrong blob's pieces are forgotten with its blocks.
    pub fn with_pieces(self, pieces: Arc<Pieces>) -> Verifier {
        Verifier {
            pieces: Some(pieces),
            ..self
        }
    }

    /// Whether the kernel may keep this blob's pages from an earlier open: yes, it is
    /// immutable, unless its content failed the check.
    pub fn trusted(&self, digest: &Digest) -> bool {
        !lock(&self.suspect).contains(digest)
    }

    /// Starts the check of one open file (its hasher ends when the file is closed).
    pub fn start(&self, repo: RepoName, digest: Digest, size: u64) -> ContentCheck {
        let shared = Arc::new(CheckShared {
            repo,
            digest,
            size,
            mismatch: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let (pieces, queue) = mpsc::channel(QUEUED_PIECES);
        let hasher = Hasher {
            verifier: self.clone(),
            shared: shared.clone(),
            hasher: Some(shared.digest.hasher()),
            hashed: 0,
            stash: BTreeMap::new(),
            stashed: 0,
            last_read: None,
        };
        tokio::spawn(hasher.run(queue));
        ContentCheck { shared, pieces }
    }
}

/// The hasher task of one open file: bytes `[0, hashed)` have been hashed.
struct Hasher {
    verifier: Verifier,
    shared: Arc<CheckShared>,
    /// None once the verdict is in (or the check was given up).
    hasher: Option<DigestHasher>,
    hashed: u64,
    /// Pieces that arrived ahead of `hashed`, by offset.
    stash: BTreeMap<u64, Bytes>,
    stashed: u64,
    /// The read of the last byte, waiting for the verdict.
    last_read: Option<oneshot::Sender<()>>,
}

/// A file closed with pieces still stashed gives their share of MAX_STASH_ALL back.
impl Drop for Hasher {
    fn drop(&mut self) {
        self.clear_stash();
    }
}

impl Hasher {
    async fn run(mut self, mut queue: mpsc::Receiver<Piece>) {
        while let Some(piece) = queue.recv().await {
            if self.hasher.is_some() {
                self.take(piece.offset, piece.data);
            }
            if let Some(verdict) = piece.verdict {
                let missing =
                    (self.shared.size.saturating_sub(self.hashed)).saturating_sub(self.stashed);
                if self.hasher.is_some() && missing <= LAST_READ_GAP {
                    self.last_read = Some(verdict);
                } else {
                    let _ = verdict.send(());
                }
            }
            if self.hasher.is_none() {
                self.shared.done.store(true, Ordering::Release);
                if let Some(waiting) = self.last_read.take() {
                    let _ = waiting.send(());
                }
            }
        }
    }

    /// Hashes `data` (read at `offset`) if it continues the hash, or keeps it until the
    /// bytes before it arrive; then whatever the stash now continues.
    fn take(&mut self, offset: u64, data: Bytes) {
        let end = offset + data.len() as u64;
        if end <= self.hashed {
            return;
        }
        if offset > self.hashed {
            self.fill_from_cache(offset);
        }
        if offset > self.hashed {
            let len = data.len() as u64;
            let all = &self.verifier.stashed;
            if offset - self.hashed > STASH_REACH
                || self.stashed + len > MAX_STASH
                || all.load(Ordering::Relaxed) + len > self.verifier.stash_share()
            {
                debug!(
                    digest = %self.shared.digest,
                    "reads too far out of order to hash on the way; this read is not checked"
                );
                self.give_up();
                return;
            }
            self.stashed += len;
            all.fetch_add(len, Ordering::Relaxed);
            self.verifier.held_beside(0, len);
            self.stash.insert(offset, Bytes::copy_from_slice(&data));
            return;
        }
        self.hash(offset, &data);
        while let Some(entry) = self.stash.first_entry() {
            if *entry.key() > self.hashed {
                break;
            }
            let (at, piece) = entry.remove_entry();
            self.unstash(piece.len() as u64);
            self.hash(at, &piece);
        }
        if self.hashed >= self.shared.size {
            self.verdict();
        }
    }

    /// Hashes the part of `data` (at `offset`, which is at or before `hashed`) that is new.
    fn hash(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if end <= self.hashed {
            return;
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&data[(self.hashed - offset) as usize..]);
            self.hashed = end;
        }
    }

    /// Bytes between `hashed` and `offset` that are still in the block cache (read by
    /// someone before, or served to this file by the kernel's page cache).
    fn fill_from_cache(&mut self, offset: u64) {
        let cache = &self.verifier.cache;
        let bs = cache.block_size();
        while self.hashed < offset {
            let index = self.hashed / bs;
            let Some(block) = cache.peek(&(self.shared.digest.clone(), index)) else {
                return;
            };
            let from = (self.hashed - index * bs) as usize;
            let to = (offset - index * bs).min(block.len() as u64) as usize;
            if from >= to {
                return;
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&block[from..to]);
            }
            self.hashed = index * bs + to as u64;
        }
    }

    fn unstash(&mut self, len: u64) {
        self.stashed -= len;
        self.verifier.stashed.fetch_sub(len, Ordering::Relaxed);
        self.verifier.held_beside(len, 0);
    }

    fn give_up(&mut self) {
        if self.hasher.is_some() {
            Stats::add(&self.verifier.stats.verify_given_up, 1);
        }
        self.hasher = None;
        self.clear_stash();
    }

    fn clear_stash(&mut self) {
        self.stash.clear();
        let held = std::mem::take(&mut self.stashed);
        self.verifier.stashed.fetch_sub(held, Ordering::Relaxed);
        self.verifier.held_beside(held, 0);
    }

    fn verdict(&mut self) {
        let Some(done) = self.hasher.take() else {
            return;
        };
        self.clear_stash();
        let (shared, verifier) = (&self.shared, &self.verifier);
        if done.matches(&shared.digest) {
            lock(&verifier.suspect).remove(&shared.digest);
            Stats::add(&verifier.stats.verified, 1);
            debug!(digest = %shared.digest, "read to the end; content matches the digest");
            if let Some(disk) = &verifier.disk {
                disk.verified(&shared.digest, shared.size, verifier.cache.block_size());
            }
            return;
        }
        shared.mismatch.store(true, Ordering::Release);
        Stats::add(&verifier.stats.verify_failures, 1);
        verifier.cache.forget(&shared.digest);
        if let Some(pieces) = &verifier.pieces {
            pieces.forget(&shared.digest);
        }
        if let Some(disk) = &verifier.disk {
            disk.forget(&shared.digest, verifier.cache.block_size());
        }
        lock(&verifier.suspect).insert(shared.digest.clone());
        error!(
            digest = %shared.digest,
            repo = %shared.repo,
            "blob content does not match its digest; reads of this open file fail with EIO"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (Verifier, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let cache = Arc::new(BlockCache::new(4, 64, stats.clone()));
        (Verifier::new(cache, stats.clone(), None), stats)
    }

    fn repo() -> RepoName {
        RepoName::parse("team/app").expect("valid")
    }

    #[tokio::test]
    async fn pieces_out_of_order_are_hashed_and_the_last_read_gets_the_verdict() {
        let (verifier, stats) = verifier();
        let content = b"0123456789ab";
        let check = verifier.start(repo(), Digest::sha256_of(content), 12);
        let piece = |a: usize, b: usize| Bytes::copy_from_slice(&content[a..b]);
        // Read-ahead finishing out of order: the middle arrives after the last.
        assert!(check.offer(4, piece(4, 8)).await.is_ok());
        assert!(check.offer(0, piece(0, 4)).await.is_ok());
        let last = tokio::spawn(async move {
            let result = check.offer(8, piece(8, 12)).await;
            (check, result)
        });
        let (_check, result) = last.await.expect("task");
        assert!(result.is_ok());
        assert_eq!(stats.verified.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn the_last_read_waits_for_a_late_piece_and_fails_on_a_mismatch() {
        let (verifier, stats) = verifier();
        let check = Arc::new(verifier.start(repo(), Digest::sha256_of(b"right content"), 13));
        let last = {
            let check = check.clone();
            tokio::spawn(async move { check.offer(8, Bytes::from_static(b"ntent")).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !last.is_finished(),
            "the last read waits for the bytes before it"
        );
        assert!(
            check
                .offer(0, Bytes::from_static(b"WRONG co"))
                .await
                .is_ok()
        );
        assert!(
            last.await.expect("task").is_err(),
            "a wrong blob fails its last read"
        );
        assert!(check.failed().is_err(), "and every read after it");
        assert_eq!(stats.verify_failures.load(Ordering::Relaxed), 1);
        assert!(!verifier.trusted(&Digest::sha256_of(b"right content")));
    }

    #[tokio::test]
    async fn a_random_reader_is_not_held_up() {
        let (verifier, _) = verifier();
        let check = verifier.start(repo(), Digest::sha256_of(b"x"), 64 << 20);
        // Only the last bytes of a large blob: far too much is missing to wait for.
        let answer = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            check.offer((64 << 20) - 4, Bytes::from_static(b"tail")),
        )
        .await;
        assert!(matches!(answer, Ok(Ok(()))));
    }
}
