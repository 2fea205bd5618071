//! Reads a program waits on come first: layer fetches for them mark the mount busy
//! (`Foreground::busy`), and background fetches start only once it has been quiet for a
//! moment (`Foreground::quiet`), so they never take the place of a foreground read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

// tokio's clock: tests can pause it.
use tokio::time::Instant;

/// How often a background fetch waiting for quiet looks again.
const POLL: Duration = Duration::from_millis(20);

/// Foreground layer fetches in flight, and when the last one ended.
pub struct Foreground {
    busy: AtomicUsize,
    /// Milliseconds since `epoch` when a foreground fetch last ended.
    last_ms: AtomicU64,
    epoch: Instant,
}

/// One foreground fetch, in flight until dropped.
pub struct Busy(Arc<Foreground>);

impl Default for Foreground {
    fn default() -> Self {
        Foreground {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Foreground {
    /// Marks a foreground fetch in flight until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long nothing has been fetched for the foreground; zero while something is.
    fn idle(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Returns once no foreground fetch has been in flight for `period`.
    pub async fn quiet(&self, period: Duration) {
        loop {
            let idle = self.idle();
            if idle >= period {
                return;
            }
            tokio::time::sleep((period - idle).max(POLL)).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        self.0.last_ms.fetch_max(now, Ordering::AcqRel);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_waits_for_a_quiet_moment() {
        let gate = Arc::new(Foreground::default());
        let period = Duration::from_millis(50);
        let busy = gate.busy();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.quiet(period).await })
        };
        tokio::time::sleep(3 * period).await;
        assert!(!waiter.is_finished(), "not while a foreground fetch runs");
        drop(busy);
        let ended = Instant::now();
        waiter.await.expect("waiter");
        assert!(ended.elapsed() >= period, "only after a quiet period");
        // Quiet since: at once.
        gate.quiet(Duration::ZERO).await;
    }
}
