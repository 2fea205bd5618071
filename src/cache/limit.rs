//! One memory budget for blob bytes (README "Memory"): `--cache-size` bounds what the
//! block cache holds, what the caches beside it hold (pieces of blocks for random
//! readers, checked pieces of layers, each within a share of the budget), decoders kept
//! idle for the next read (within a share), every fetch in flight, and the working
//! memory of image decoding (a layer's index pass, a file read decoding from a
//! checkpoint: the decoder, its buffers and the blob pieces it holds) together. A fetch
//! or a decoder reserves its bytes before it starts and waits while the reservations
//! already fill the budget; the block cache keeps what is left
//! ([`MemoryLimit::room_for_cache`]), evicting as the others grow. Waiting for memory
//! is allowed (counted in `memory.waits`); exceeding the budget is not.
//!
//! Working memory is held for longer than a fetch (a pass lasts as long as its layer
//! takes to read) and needs fetches to finish (the blocks it decodes), so it may take at
//! most half the budget: the other half is always there for fetches, and a decoder
//! waiting for its next block never waits behind its own kind. A fetch reserves at most
//! that other half (only a budget of less than two blocks makes a fetch larger), and a
//! decoder at most its half (a pass holds about four blocks and a few hundred KiB: only a
//! budget under ten blocks makes it larger).
//!
//! The allocator is told to hand block-sized allocations straight to the kernel and back
//! ([`hand_large_allocations_to_the_kernel`]): otherwise glibc's moving mmap threshold
//! puts them in per-thread arenas after the first one is freed, and memory the budget no
//! longer counts stays resident (a 16-reader soak held 232 MiB with a 64 MiB budget).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stats::Stats;

/// Allocations this large or larger are mapped from the kernel and unmapped when freed.
const MMAP_THRESHOLD: usize = 256 << 10;

pub struct MemoryLimit {
    limit: u64,
    /// Units not reserved by fetches in flight or working memory.
    free: Arc<Semaphore>,
    units: u32,
    /// Units working memory has not taken of its half (see the module comment).
    working: Arc<Semaphore>,
    working_units: u32,
    /// Bytes per unit: the fewest that count the whole budget in a u32.
    unit: u64,
    /// Bytes held by the caches beside the block cache (the pieces of blocks,
    /// fs/blob/pieces.rs; checked pieces of layers, image/content.rs) and by idle
    /// decoders.
    beside: AtomicU64,
    /// Bytes held by idle decoders (a share of the budget).
    idle: AtomicU64,
    stats: Arc<Stats>,
}

/// Which kind of reservation, for `/.regfs/stats`.
#[derive(Clone, Copy)]
enum Kind {
    Fetch,
    Working,
}

/// Bytes reserved for one fetch or one decoder's work, given back when dropped.
pub struct Reservation {
    /// Of the budget, and of working memory's half.
    _permits: [Option<OwnedSemaphorePermit>; 2],
    bytes: u64,
    kind: Kind,
    stats: Arc<Stats>,
}

impl Reservation {
    fn counter(stats: &Stats, kind: Kind) -> &AtomicU64 {
        match kind {
            Kind::Fetch => &stats.memory_in_flight,
            Kind::Working => &stats.memory_working,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        Self::counter(&self.stats, self.kind).fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Bytes an idle decoder holds, counted beside the cache until dropped.
pub struct Idle {
    limit: Arc<MemoryLimit>,
    bytes: u64,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.limit.idle.fetch_sub(self.bytes, Ordering::Relaxed);
        self.limit.held_beside(self.bytes, 0);
    }
}

impl MemoryLimit {
    pub fn new(limit: u64, stats: Arc<Stats>) -> Arc<MemoryLimit> {
        let unit = limit.div_ceil(u64::from(u32::MAX)).max(1);
        let units = u32::try_from(limit / unit).unwrap_or(u32::MAX).max(1);
        let working_units = units / 2;
        stats.memory_limit.store(limit, Ordering::Relaxed);
        Arc::new(MemoryLimit {
            limit,
            free: Arc::new(Semaphore::new(units as usize)),
            units,
            working: Arc::new(Semaphore::new(working_units as usize)),
            working_units,
            unit,
            beside: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            stats,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most a cache beside the block cache may hold: `bytes`, and at most a
    /// quarter of the budget.
    pub fn share(&self, bytes: u64) -> u64 {
        bytes.min(self.limit / 4)
    }

    /// A cache beside the block cache went from holding `before` bytes to `now`.
    pub fn held_beside(&self, before: u64, now: u64) {
        if now >= before {
            self.beside.fetch_add(now - before, Ordering::Relaxed);
        } else {
            let _ = self
                .beside
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    Some(held.saturating_sub(before - now))
                });
        }
    }

    /// Counts `bytes` of a decoder kept idle for the next read, beside the cache, if
    /// the idle decoders' share (a quarter of the budget) has room; else `None`, and
    /// the caller drops the decoder rather than hold memory the budget does not count.
    pub fn keep_idle(self: &Arc<Self>, bytes: u64) -> Option<Idle> {
        let share = self.share(u64::MAX);
        self.idle
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + bytes <= share).then_some(held + bytes)
            })
            .ok()?;
        self.held_beside(0, bytes);
        Some(Idle {
            limit: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved by fetches in flight and working memory now.
    pub fn in_flight(&self) -> u64 {
        let free = u32::try_from(self.free.available_permits()).unwrap_or(self.units);
        u64::from(self.units.saturating_sub(free)) * self.unit
    }

    /// What the block cache may hold now: the budget less what the caches beside it
    /// hold and what fetches in flight and working memory have reserved.
    pub fn room_for_cache(&self) -> u64 {
        self.limit
            .saturating_sub(self.beside.load(Ordering::Relaxed))
            .saturating_sub(self.in_flight())
    }

    fn units_of(&self, bytes: u64, most: u32) -> u32 {
        u32::try_from(bytes.div_ceil(self.unit))
            .unwrap_or(u32::MAX)
            .min(most)
    }

    /// Takes `units` of `semaphore`, counting a wait if there is one.
    async fn take(&self, semaphore: &Arc<Semaphore>, units: u32) -> Option<OwnedSemaphorePermit> {
        match semaphore.clone().try_acquire_many_owned(units) {
            Ok(permit) => Some(permit),
            Err(_) => {
                Stats::add(&self.stats.memory_waits, 1);
                // The semaphores are never closed: Err cannot happen.
                semaphore.clone().acquire_many_owned(units).await.ok()
            }
        }
    }

    /// Reserves `bytes` for a fetch, waiting while fetches in flight and working memory
    /// hold the budget (a fetch larger than what working memory leaves waits for all
    /// of that).
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let most = self.units - self.working_units;
        let units = self.units_of(bytes, most).max(1);
        let permit = self.take(&self.free, units).await;
        self.reserved(Kind::Fetch, bytes, [permit, None])
    }

    /// Reserves `bytes` of working memory for a decoder, its buffers and the blob
    /// pieces it holds, until the reservation is dropped: it waits for working memory's
    /// half of the budget, then for the budget (see the module comment). Take it before
    /// anything else a decoder needs, never while holding another reservation.
    pub async fn reserve_working(&self, bytes: u64) -> Reservation {
        let units = self.units_of(bytes, self.working_units);
        let working = self.take(&self.working, units).await;
        let permit = self.take(&self.free, units).await;
        self.reserved(Kind::Working, bytes, [permit, working])
    }

    /// The reservation of `bytes` holding `permits`, counted in the stats until dropped.
    fn reserved(
        &self,
        kind: Kind,
        bytes: u64,
        permits: [Option<OwnedSemaphorePermit>; 2],
    ) -> Reservation {
        Stats::add(Reservation::counter(&self.stats, kind), bytes);
        Reservation {
            _permits: permits,
            bytes,
            kind,
            stats: self.stats.clone(),
        }
    }
}

/// Makes glibc map block-sized allocations (HTTP bodies of range requests, decoder
/// windows) from the kernel and unmap them when freed, rather than keep them in its
/// arenas (see the module comment). Elsewhere the allocator is left as it is.
pub fn hand_large_allocations_to_the_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetches_wait_while_reservations_fill_the_budget() {
        let stats = Arc::new(Stats::default());
        let limit = MemoryLimit::new(4 << 20, stats.clone());
        assert_eq!(limit.share(8 << 20), 1 << 20, "a quarter at most");
        limit.held_beside(0, 512 << 10);
        let a = limit.reserve(2 << 20).await;
        assert_eq!(limit.room_for_cache(), (4 << 20) - (512 << 10) - (2 << 20));
        let b = limit.reserve(2 << 20).await;
        assert_eq!(limit.room_for_cache(), 0);
        let third = tokio::spawn({
            let limit = Arc::new(limit);
            async move {
                let _c = limit.reserve(1 << 20).await;
                limit.in_flight()
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "waits for memory");
        drop(a);
        assert_eq!(third.await.expect("task"), (3 << 20));
        assert_eq!(stats.memory_waits.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(stats.memory_in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_fetch_larger_than_the_budget_takes_what_working_memory_leaves() {
        let limit = MemoryLimit::new(1 << 20, Arc::default());
        let big = limit.reserve(8 << 20).await;
        assert_eq!(limit.in_flight(), 512 << 10);
        drop(big);
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn working_memory_takes_half_the_budget_at_most_and_fetches_still_go() {
        let stats = Arc::new(Stats::default());
        let limit = Arc::new(MemoryLimit::new(8 << 20, stats.clone()));
        let pass = limit.reserve_working(3 << 20).await;
        assert_eq!(limit.room_for_cache(), 5 << 20, "the cache gives way");
        assert_eq!(stats.memory_working.load(Ordering::Relaxed), 3 << 20);
        let second = tokio::spawn({
            let limit = limit.clone();
            async move { limit.reserve_working(2 << 20).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "beyond working memory's half: waits");
        // A decoder waiting for memory does not stop the fetches the others need.
        let fetch = limit.reserve(2 << 20).await;
        assert_eq!(limit.in_flight(), 5 << 20);
        drop((pass, fetch));
        let second = second.await.expect("task");
        assert_eq!(limit.in_flight(), 2 << 20);
        drop(second);
        assert_eq!(stats.memory_working.load(Ordering::Relaxed), 0);
        assert_eq!(stats.memory_waits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn idle_decoders_count_beside_the_cache_within_their_share() {
        let limit = Arc::new(MemoryLimit::new(8 << 20, Arc::default()));
        let kept = limit.keep_idle(1200 << 10).expect("room");
        assert_eq!(limit.room_for_cache(), (8 << 20) - (1200 << 10));
        assert!(limit.keep_idle(1200 << 10).is_none(), "a quarter at most");
        drop(kept);
        assert_eq!(limit.room_for_cache(), 8 << 20);
        assert!(limit.keep_idle(2 << 20).is_some());
    }
}
