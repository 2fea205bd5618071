//! Where a host's blob GETs were redirected to (object storage, a CDN), remembered so
//! that a blob's later ranges go there directly.

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use url::Url;

use crate::registry::types::Digest;

/// How long a blob's resolved (redirected) URL is reused before asking the registry
/// again. Signed URLs typically live 10 to 60 minutes; a failure also drops it early.
const RESOLVED_URL_TTL: Duration = Duration::from_secs(600);
/// Blobs whose resolved URL is remembered.
const REMEMBERED: usize = 1024;

pub struct ResolvedUrls(Mutex<LruCache<Digest, (Url, Instant)>>);

impl ResolvedUrls {
    pub fn new() -> ResolvedUrls {
        ResolvedUrls(Mutex::new(LruCache::new(
            NonZeroUsize::new(REMEMBERED).unwrap_or(NonZeroUsize::MIN),
        )))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Digest, (Url, Instant)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where `digest` was sent to, unless that was longer ago than `RESOLVED_URL_TTL`.
    pub fn get(&self, digest: &Digest) -> Option<Url> {
        match self.lock().get(digest) {
            Some((url, at)) if at.elapsed() < RESOLVED_URL_TTL => Some(url.clone()),
            _ => None,
        }
    }

    pub fn remember(&self, digest: &Digest, url: Url) {
        self.lock().put(digest.clone(), (url, Instant::now()));
    }

    pub fn forget(&self, digest: &Digest) {
        self.lock().pop(digest);
    }
}
