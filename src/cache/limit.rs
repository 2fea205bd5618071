//! One memory budget for blob bytes (README "Memory"): `--cache-size` bounds what the
//! block cache holds, what the caches beside it hold (pieces of blocks for random
//! readers, checked pieces of layers, each within a share of the budget), and every
//! fetch in flight together. A fetch reserves its bytes before it starts and waits
//! while the reservations already fill the budget; the block cache keeps what is left
//! ([`MemoryLimit::room_for_cache`]), evicting as the others grow. Waiting for memory
//! is allowed (counted in `memory.waits`); exceeding the budget is not.
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
    /// Units not reserved by fetches in flight.
    free: Arc<Semaphore>,
    units: u32,
    /// Bytes per unit: the fewest that count the whole budget in a u32.
    unit: u64,
    /// Bytes held by the caches beside the block cache (the pieces of blocks,
    /// fs/blob/pieces.rs; checked pieces of layers, image/content.rs).
    beside: AtomicU64,
    stats: Arc<Stats>,
}

/// Bytes reserved for one fetch, given back when dropped.
pub struct Reservation {
    _units: Option<OwnedSemaphorePermit>,
    bytes: u64,
    stats: Arc<Stats>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats
            .memory_in_flight
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryLimit {
    pub fn new(limit: u64, stats: Arc<Stats>) -> Arc<MemoryLimit> {
        let unit = limit.div_ceil(u64::from(u32::MAX)).max(1);
        let units = u32::try_from(limit / unit).unwrap_or(u32::MAX).max(1);
        stats.memory_limit.store(limit, Ordering::Relaxed);
        Arc::new(MemoryLimit {
            limit,
            free: Arc::new(Semaphore::new(units as usize)),
            units,
            unit,
            beside: AtomicU64::new(0),
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

    /// Bytes reserved by fetches in flight now.
    pub fn in_flight(&self) -> u64 {
        let free = u32::try_from(self.free.available_permits()).unwrap_or(self.units);
        u64::from(self.units.saturating_sub(free)) * self.unit
    }

    /// What the block cache may hold now: the budget less what the caches beside it
    /// hold and what fetches in flight have reserved.
    pub fn room_for_cache(&self) -> u64 {
        self.limit
            .saturating_sub(self.beside.load(Ordering::Relaxed))
            .saturating_sub(self.in_flight())
    }

    /// Reserves `bytes` for a fetch, waiting while fetches in flight hold the budget (a
    /// fetch larger than the whole budget waits for all of it).
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let units = u32::try_from(bytes.div_ceil(self.unit))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units);
        let permit = match self.free.clone().try_acquire_many_owned(units) {
            Ok(permit) => Some(permit),
            Err(_) => {
                Stats::add(&self.stats.memory_waits, 1);
                // The semaphore is never closed: Err cannot happen.
                self.free.clone().acquire_many_owned(units).await.ok()
            }
        };
        self.stats
            .memory_in_flight
            .fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            _units: permit,
            bytes,
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
    async fn a_fetch_larger_than_the_budget_takes_all_of_it() {
        let limit = MemoryLimit::new(1 << 20, Arc::default());
        let big = limit.reserve(8 << 20).await;
        assert_eq!(limit.in_flight(), 1 << 20);
        drop(big);
        assert_eq!(limit.in_flight(), 0);
    }
}
