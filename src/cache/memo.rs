//! A small async memo: one fetch per key however many callers ask at once, an optional
//! time-to-live, and an LRU bound on the number of entries.
//!
//! Used for the registry's metadata (catalog, tag lists, manifests, sizes). A failed
//! fetch stores nothing, so the next caller simply tries again.

use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::OnceCell;

struct Slot<V> {
    born: Instant,
    cell: OnceCell<V>,
}

pub struct Memo<K: Hash + Eq, V> {
    slots: Mutex<LruCache<K, Arc<Slot<V>>>>,
    ttl: Option<Duration>,
}

impl<K: Hash + Eq + Clone, V: Clone> Memo<K, V> {
    /// `ttl` None: values never go stale (content-addressed data); they only age out of
    /// the LRU once `capacity` entries are held.
    pub fn new(capacity: usize, ttl: Option<Duration>) -> Memo<K, V> {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Memo {
            slots: Mutex::new(LruCache::new(capacity)),
            ttl,
        }
    }

    fn is_fresh(&self, slot: &Slot<V>) -> bool {
        self.ttl.is_none_or(|ttl| slot.born.elapsed() < ttl)
    }

    /// The slot for `key`: the live one, or a new empty one if there is none or it is stale.
    fn slot(&self, key: &K) -> Arc<Slot<V>> {
        // The lock is never held across an await: poisoning cannot leave a half-made state.
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(key) {
            if self.is_fresh(slot) {
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
    pub async fn get_or_fetch<E, F, Fut>(&self, key: &K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = self.slot(key);
        slot.cell.get_or_try_init(fetch).await.cloned()
    }

    /// The value for `key` if it is present and fresh; never fetches.
    pub fn peek(&self, key: &K) -> Option<V> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.get(key)?;
        if !self.is_fresh(slot) {
            return None;
        }
        slot.cell.get().cloned()
    }

    /// Drops what is known for `key` (it changed: something was pushed through regfs).
    pub fn forget(&self, key: &K) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.pop(key);
    }

    /// Stores a value learned some other way (e.g. a manifest fetched by tag is also
    /// the manifest for its digest).
    pub fn insert(&self, key: K, value: V) {
        let cell = OnceCell::new_with(Some(value));
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
        let memo: Arc<Memo<u32, u32>> = Arc::new(Memo::new(8, None));
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
        let memo: Memo<u32, u32> = Memo::new(8, Some(Duration::from_millis(30)));
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

    #[tokio::test]
    async fn lru_bound() {
        let memo: Memo<u32, u32> = Memo::new(2, None);
        for k in 0..3 {
            memo.insert(k, k);
        }
        assert_eq!(memo.peek(&0), None);
        assert_eq!(memo.peek(&2), Some(2));
    }
}
