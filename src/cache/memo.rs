//! A small async memo: one fetch per key however many callers ask at once, an optional
//! time-to-live, and an LRU bound on the number of entries.
//!
//! Used for the registry's metadata (catalog, tag lists, manifests, sizes). Callers that
//! ask while a fetch is in flight share its outcome, a failure too (a stalled registry
//! costs them one `--timeout` together, not one each). A failure is not kept, so the
//! next caller simply tries again; except, if the memo is told so, a failure for want
//! of an answer, for [`FAILURE_MEMORY`]: the kernel retries a failed lookup once per
//! process that waited for it, one after the other, and each would wait again.

use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::OnceCell;

use crate::registry::Error;

/// How long a failure for want of an answer is kept, where it is kept at all.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(2);

struct Slot<V, E> {
    born: Instant,
    cell: OnceCell<Result<V, E>>,
}

/// `E`: the error a fetch fails with (the registry's, but for tests).
pub struct Memo<K: Hash + Eq, V, E = Error> {
    slots: Mutex<LruCache<K, Arc<Slot<V, E>>>>,
    ttl: Option<Duration>,
    /// Which failures are kept for [`FAILURE_MEMORY`] (none unless told).
    keeps_failure: fn(&E) -> bool,
}

impl<K: Hash + Eq + Clone, V: Clone, E: Clone> Memo<K, V, E> {
    /// `ttl` None: values never go stale (content-addressed data); they only age out of
    /// the LRU once `capacity` entries are held.
    pub fn new(capacity: usize, ttl: Option<Duration>) -> Memo<K, V, E> {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Memo {
            slots: Mutex::new(LruCache::new(capacity)),
            ttl,
            keeps_failure: |_| false,
        }
    }

    /// Keeps the failures `keep` picks for [`FAILURE_MEMORY`] after they happened.
    pub fn keeping_failures(mut self, keep: fn(&E) -> bool) -> Memo<K, V, E> {
        self.keeps_failure = keep;
        self
    }

    fn is_fresh(&self, slot: &Slot<V, E>) -> bool {
        self.ttl.is_none_or(|ttl| slot.born.elapsed() < ttl)
    }

    /// The slot for `key`: the live one, or a new empty one if there is none or it is stale.
    fn slot(&self, key: &K) -> Arc<Slot<V, E>> {
        // The lock is never held across an await: poisoning cannot leave a half-made state.
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(key) {
            // A kept failure is in a slot of its own, born when it failed.
            let fresh = match slot.cell.get() {
                Some(Err(_)) => slot.born.elapsed() < FAILURE_MEMORY,
                _ => self.is_fresh(slot),
            };
            if fresh {
                return slot.clone();
            }
        }
        let slot = Arc::new(Slot {
            born: Instant::now(),
            cell: OnceCell::new(),
        });
        slots.put(key.clone(), slot.clone());
        slot
    }

    /// The value for `key`, fetching it once if it is missing or stale.
    pub async fn get_or_fetch<F, Fut>(&self, key: &K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = self.slot(key);
        let result = slot.cell.get_or_init(fetch).await.clone();
        if let Err(e) = &result {
            // Forget the failed slot (unless it was replaced meanwhile); keep the
            // failure a moment in a new one if it is of the kind to keep.
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            if slots.peek(key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.pop(key);
                if (self.keeps_failure)(e) {
                    let failed = Slot {
                        born: Instant::now(),
                        cell: OnceCell::new_with(Some(result.clone())),
                    };
                    slots.put(key.clone(), Arc::new(failed));
                }
            }
        }
        result
    }

    /// The value for `key` if it is present and fresh; never fetches.
    pub fn peek(&self, key: &K) -> Option<V> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.get(key)?;
        if !self.is_fresh(slot) {
            return None;
        }
        slot.cell.get()?.as_ref().ok().cloned()
    }

    /// Drops what is known for `key` (it changed: something was pushed through regfs).
    pub fn forget(&self, key: &K) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.pop(key);
    }

    /// Stores a value learned some other way (e.g. a manifest fetched by tag is also
    /// the manifest for its digest).
    pub fn insert(&self, key: K, value: V) {
        let cell = OnceCell::new_with(Some(Ok(value)));
        let slot = Arc::new(Slot {
            born: Instant::now(),
            cell,
        });
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.put(key, slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_fetch_for_concurrent_callers() {
        let memo: Arc<Memo<u32, u32, ()>> = Arc::new(Memo::new(8, None));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (memo, fetches) = (memo.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                memo.get_or_fetch(&1, || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, ()>(42)
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(42));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failure_is_not_stored_and_ttl_expires() {
        let memo: Memo<u32, u32, &str> = Memo::new(8, Some(Duration::from_millis(30)));
        assert_eq!(
            memo.get_or_fetch(&1, || async { Err("down") }).await,
            Err("down")
        );
        assert_eq!(
            memo.get_or_fetch(&1, || async { Ok::<_, &str>(1) }).await,
            Ok(1)
        );
        assert_eq!(memo.peek(&1), Some(1));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(memo.peek(&1), None);
        assert_eq!(
            memo.get_or_fetch(&1, || async { Ok::<_, &str>(2) }).await,
            Ok(2)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_a_failure() {
        let memo: Arc<Memo<u32, u32, &str>> = Arc::new(Memo::new(8, None));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (memo, fetches) = (memo.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                memo.get_or_fetch(&1, || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Err("stalled")
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), Err("stalled"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(memo.peek(&1), None);
        assert_eq!(memo.get_or_fetch(&1, || async { Ok(7) }).await, Ok(7));
    }

    #[tokio::test]
    async fn kept_failures_answer_for_a_moment_others_not_at_all() {
        let memo: Memo<u32, u32, &str> =
            Memo::new(8, None).keeping_failures(|e: &&str| *e == "stalled");
        assert_eq!(
            memo.get_or_fetch(&1, || async { Err("stalled") }).await,
            Err("stalled")
        );
        // Asked again at once (as the kernel does, one waiter after the other): the
        // same failure, without a fetch.
        assert_eq!(
            memo.get_or_fetch(&1, || async { Ok(1) }).await,
            Err("stalled")
        );
        assert_eq!(
            memo.get_or_fetch(&2, || async { Err("gone") }).await,
            Err("gone")
        );
        assert_eq!(memo.get_or_fetch(&2, || async { Ok(2) }).await, Ok(2));
        assert_eq!(memo.peek(&1), None);
    }

    #[tokio::test]
    async fn lru_bound() {
        let memo: Memo<u32, u32, ()> = Memo::new(2, None);
        for k in 0..3 {
            memo.insert(k, k);
        }
        assert_eq!(memo.peek(&0), None);
        assert_eq!(memo.peek(&2), Some(2));
    }
}
