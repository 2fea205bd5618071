//! Checking blob content against its digest while it is read.
//!
//! A reader that goes from the first byte of a blob to the last has the bytes hashed on
//! the way. Hashing runs beside the reads, not in front of them (at 1 GB/s it would
//! otherwise be a third of every read's time), except for the read that delivers the
//! last byte: that one waits for the verdict, and fails if the content is wrong, so a
//! wrong blob is never read to the end without an error.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{debug, error};

use crate::cache::BlockCache;
use crate::registry::{Digest, DigestHasher, Error, RepoName, Result};
use crate::stats::Stats;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What all open files share: where to find bytes that were read out of order, and
/// where to record blobs whose content failed.
#[derive(Clone)]
pub struct Verifier {
    cache: Arc<BlockCache>,
    stats: Arc<Stats>,
    /// Blobs whose content failed the check: the kernel must not keep their pages
    /// between opens until a full read has passed the check again.
    suspect: Arc<Mutex<HashSet<Digest>>>,
}

/// The running hash of one open file: bytes `[0, hashed)` have been hashed.
pub struct ContentCheck {
    repo: RepoName,
    digest: Digest,
    size: u64,
    state: Mutex<CheckState>,
}

struct CheckState {
    /// None once the verdict is in.
    hasher: Option<DigestHasher>,
    hashed: u64,
    /// The content did not match: every later read of this open file fails too (the
    /// kernel retries a failed read-ahead page with a read of its own, which must not
    /// get the same wrong bytes without an error).
    mismatch: bool,
}

impl ContentCheck {
    pub fn new(repo: RepoName, digest: Digest, size: u64) -> ContentCheck {
        ContentCheck {
            state: Mutex::new(CheckState {
                hasher: Some(digest.hasher()),
                hashed: 0,
                mismatch: false,
            }),
            repo,
            digest,
            size,
        }
    }

    /// Err once the content is known to be wrong.
    pub fn failed(&self) -> Result<()> {
        if lock(&self.state).mismatch {
            return Err(self.mismatch_error());
        }
        Ok(())
    }

    /// Whether a read of `[offset, end)` still matters to the hash (it is not done yet,
    /// and the read does not lie wholly before what was hashed).
    pub fn wants(&self, end: u64) -> bool {
        let state = lock(&self.state);
        state.hasher.is_some() && end > state.hashed
    }

    fn mismatch_error(&self) -> Error {
        Error::BadAnswer(format!(
            "blob {} from {}: content does not match its digest",
            self.digest, self.repo
        ))
    }
}

impl Verifier {
    pub fn new(cache: Arc<BlockCache>, stats: Arc<Stats>) -> Verifier {
        Verifier {
            cache,
            stats,
            suspect: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Whether the kernel may keep this blob's pages from an earlier open: yes, it is
    /// immutable, unless its content failed the check.
    pub fn trusted(&self, digest: &Digest) -> bool {
        !lock(&self.suspect).contains(digest)
    }

    /// Advances the hash over `data` (read at `offset`) and over any cached bytes
    /// between what was hashed and `offset` (the kernel may deliver sequential reads out
    /// of order). When the hash reaches the end of the blob it must equal the digest;
    /// otherwise this fails.
    pub fn advance(&self, check: &ContentCheck, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut state = lock(&check.state);
        let CheckState {
            hasher,
            hashed,
            mismatch,
        } = &mut *state;
        if *mismatch {
            return Err(check.mismatch_error());
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
            let Some(block) = self.cache.peek(&(check.digest.clone(), index)) else {
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
        if *hashed < check.size {
            return Ok(());
        }
        let Some(done) = hasher.take() else {
            return Ok(());
        };
        if done.matches(&check.digest) {
            lock(&self.suspect).remove(&check.digest);
            Stats::add(&self.stats.verified, 1);
            debug!(digest = %check.digest, "read to the end; content matches the digest");
            return Ok(());
        }
        *mismatch = true;
        Stats::add(&self.stats.verify_failures, 1);
        self.cache.forget(&check.digest);
        lock(&self.suspect).insert(check.digest.clone());
        error!(
            digest = %check.digest,
            repo = %check.repo,
            "blob content does not match its digest; reads of this open file fail with EIO"
        );
        Err(check.mismatch_error())
    }
}
