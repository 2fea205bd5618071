//! A small async memo: one fetch per key however many callers ask at once, an optional
//! time-to-live, and an LRU bound on the number of entries and, where values can be
//! weighed, on their bytes.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::OnceCell;

use crate::registry::Error;

/// How long a failure for want of an answer is kept, where it is kept at all.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(2);

struct Slot<V, E> {
    born: Instant,
    cell: OnceCell<Result<V, E>>,
    /// What the value weighs, once there is one (counted in `Slots::bytes`).
    weight: AtomicUsize,
}

impl<V, E> Slot<V, E> {
    fn new(result: Option<Result<V, E>>) -> Arc<Slot<V, E>> {
        Arc::new(Slot {
            born: Instant::now(),
            cell: OnceCell::new_with(result),
            weight: AtomicUsize::new(0),
        })
    }
}

struct Slots<K: Hash + Eq, V, E> {
    lru: LruCache<K, Arc<Slot<V, E>>>,
    /// The weight of the values held.
    bytes: usize,
}

impl<K: Hash + Eq + Clone, V, E> Slots<K, V, E> {
    /// Puts `slot` under `key`, counting out what it replaces or pushes out.
    fn put(&mut self, key: K, slot: Arc<Slot<V, E>>) {
        if let Some((_, old)) = self.lru.push(key, slot) {
            self.bytes -= old.weight.load(Ordering::Relaxed);
        }
    }

    fn pop(&mut self, key: &K) {
        if let Some(old) = self.lru.pop(key) {
            self.bytes -= old.weight.load(Ordering::Relaxed);
        }
    }
}

/// How a memo weighs its values, and the most they may weigh together.
struct Weights<V> {
    weigh: fn(&V) -> usize,
    budget: usize,
}

/// `E`: the error a fetch fails with (the registry's, but for tests).
pub struct Memo<K: Hash + Eq, V, E = Error> {
    slots: Mutex<Slots<K, V, E>>,
    ttl: Option<Duration>,
    /// Which failures are kept for [`FAILURE_MEMORY`] (none unless told).
    keeps_failure: fn(&E) -> bool,
    weights: Option<Weights<V>>,
}

impl<K: Hash + Eq + Clone, V: Clone, E: Clone> Memo<K, V, E> {
    /// `ttl` None: values never go stale (content-addressed data); they only age out of
    /// the LRU once `capacity` entries are held.
    pub fn new(capacity: usize, ttl: Option<Duration>) -> Memo<K, V, E> {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Memo {
            slots: Mutex::new(Slots {
                lru: LruCache::new(capacity),
                bytes: 0,
            }),
            ttl,
            keeps_failure: |_| false,
            weights: None,
        }
    }

    /// Keeps the failures `keep` picks for [`FAILURE_MEMORY`] after they happened.
    pub fn keeping_failures(mut self, keep: fn(&E) -> bool) -> Memo<K, V, E> {
        self.keeps_failure = keep;
        self
    }

    /// Also bounds the values by what `weigh` says they weigh together: least recently
    /// used ones go first once `budget` bytes are held (the last one stays, however
    /// large).
    pub fn weighing(mut self, weigh: fn(&V) -> usize, budget: usize) -> Memo<K, V, E> {
        self.weights = Some(Weights { weigh, budget });
        self
    }

    fn lock(&self) -> MutexGuard<'_, Slots<K, V, E>> {
        // The lock is never held across an await: poisoning cannot leave a half-made state.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes the values held weigh (0 for a memo that does not weigh them).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn is_fresh(&self, slot: &Slot<V, E>) -> bool {
        self.ttl.is_none_or(|ttl| slot.born.elapsed() < ttl)
    }

    /// The slot for `key`: the live one, or a new empty one if there is none or it is stale.
    fn slot(&self, key: &K) -> Arc<Slot<V, E>> {
        let mut slots = self.lock();
        if let Some(slot) = slots.lru.get(key) {
            // A kept failure is in a slot of its own, born when it failed.
            let fresh = match slot.cell.get() {
                Some(Err(_)) => slot.born.elapsed() < FAILURE_MEMORY,
                _ => self.is_fresh(slot),
            };
            if fresh {
                return slot.clone();
            }
        }
        let slot = Slot::new(None);
        slots.put(key.clone(), slot.clone());
        slot
    }

    /// `slot`, just filled with `value`, is weighed, and the least recently used
    /// values are let go until the memo is within its budget again.
    fn weigh(&self, slots: &mut Slots<K, V, E>, key: &K, slot: &Slot<V, E>, value: &V) {
        let Some(weights) = &self.weights else {
            return;
        };
        let weight = (weights.weigh)(value);
        slot.weight.store(weight, Ordering::Relaxed);
        slots.bytes += weight;
        let _ = slots.lru.get(key); // the newest value is the last to go
        while slots.bytes > weights.budget && slots.lru.len() > 1 {
            let Some((_, old)) = slots.lru.pop_lru() else {
                break;
            };
            slots.bytes -= old.weight.load(Ordering::Relaxed);
        }
    }

    /// The value for `key`, fetching it once if it is missing or stale.
    pub async fn get_or_fetch<F, Fut>(&self, key: &K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = self.slot(key);
        let mut fetched_here = false;
        let result = slot
            .cell
            .get_or_init(|| {
                fetched_here = true;
                fetch()
            })
            .await
            .clone();
        let mut slots = self.lock();
        // Unless the slot was replaced or let go meanwhile.
        let current = slots.lru.peek(key).is_some_and(|s| Arc::ptr_eq(s, &slot));
        if !fetched_here || !current {
            return result;
        }
        match &result {
            Ok(value) => self.weigh(&mut slots, key, &slot, value),
            Err(e) => {
                // Forget the failed slot; keep the failure a moment in a new one if it
                // is of the kind to keep.
                slots.pop(key);
                if (self.keeps_failure)(e) {
                    slots.put(key.clone(), Slot::new(Some(result.clone())));
                }
            }
        }
        result
    }

    /// The value for `key` if it is present and fresh; never fetches.
    pub fn peek(&self, key: &K) -> Option<V> {
        let mut slots = self.lock();
        let slot = slots.lru.get(key)?;
        if !self.is_fresh(slot) {
            return None;
        }
        slot.cell.get()?.as_ref().ok().cloned()
    }

    /// Drops what is known for `key` (it changed: something was pushed through regfs).
    pub fn forget(&self, key: &K) {
        self.lock().pop(key);
    }

    /// Stores a value learned some other way (e.g. a manifest fetched by tag is also
    /// the manifest for its digest).
    pub fn insert(&self, key: K, value: V) {
        let slot = Slot::new(Some(Ok(value.clone())));
        let mut slots = self.lock();
        slots.put(key.clone(), slot.clone());
        self.weigh(&mut slots, &key, &slot, &value);
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
    async fn values_are_bounded_by_their_weight() {
        let memo: Memo<u32, Vec<u8>, ()> = Memo::new(1000, None).weighing(Vec::len, 100);
        for k in 0..10 {
            let got = memo.get_or_fetch(&k, || async { Ok(vec![0; 30]) }).await;
            assert_eq!(got.map(|v| v.len()), Ok(30));
            assert!(memo.bytes() <= 100, "{} bytes held", memo.bytes());
        }
        // The oldest went first; the newest are there.
        assert_eq!(memo.peek(&0), None);
        assert_eq!(memo.peek(&9).map(|v| v.len()), Some(30));
        // Replacing and forgetting count out what they drop.
        memo.insert(9, vec![0; 10]);
        memo.forget(&8);
        assert_eq!(memo.bytes(), 40);
        // One value larger than the whole budget is still kept (alone).
        memo.insert(20, vec![0; 500]);
        assert_eq!((memo.bytes(), memo.peek(&9)), (500, None));
        assert!(memo.peek(&20).is_some());
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
