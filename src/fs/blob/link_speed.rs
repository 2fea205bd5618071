//! What the network to the registry is like, as sequential readers' streams find it.
//!
//! On loopback or a LAN one streaming GET per reader is fastest: a registry spends
//! milliseconds on each request, and one connection carries a gigabyte a second. Over a
//! distant link one TCP connection is held to a rate by its window and the path (25 MB/s
//! at 40 ms is common) while the link as a whole carries far more; there a reader is
//! fastest with many block requests in flight at once, as prefetch sends them. So a
//! stream is measured while it runs: one that took a distant round trip to open and then
//! delivers slowly is stopped, and for a while this mount's sequential readers use
//! parallel block fetches instead of streams. A body that ignored `Range` (a cold
//! pull-through cache answering with the whole blob) is not judged: block requests would
//! each get the whole blob too. "Distant" is judged by the fastest open the mount has
//! seen lately, not this stream's alone: on a busy machine one loopback open can take
//! tens of milliseconds, but a distant registry never answers faster than its round trip.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Opening a stream slower than this means a distant registry (loopback and LANs answer
/// within a millisecond or two; a busy machine within a few).
const DISTANT: Duration = Duration::from_millis(15);
/// A stream delivering less than this (bytes per second of waiting for its body) is
/// rate-bound; parallel fetches would do better.
const SLOW_STREAM: f64 = 64.0 * 1024.0 * 1024.0;
/// Body bytes a stream delivers before it is judged.
const JUDGED_AFTER: u64 = 8 << 20;
/// How long the finding holds before streams are tried again (the network may change).
const FINDING_HOLDS: Duration = Duration::from_secs(300);

/// The finding for one mount.
#[derive(Default)]
pub struct LinkSpeed {
    rate_bound_since: Mutex<Option<Instant>>,
    /// The fastest stream open seen, and since when it counts (it is forgotten after
    /// FINDING_HOLDS, as the network may change).
    fastest_open: Mutex<Option<(Duration, Instant)>>,
}

/// One stream's measurements.
pub struct StreamMeter {
    opened_in: Duration,
    range_ignored: bool,
    bytes: u64,
    waited: Duration,
}

impl StreamMeter {
    pub fn new(opened_in: Duration, range_ignored: bool) -> StreamMeter {
        StreamMeter {
            opened_in,
            range_ignored,
            bytes: 0,
            waited: Duration::ZERO,
        }
    }

    /// `bytes` of body arrived after waiting `waited` for them.
    pub fn add(&mut self, bytes: u64, waited: Duration) {
        self.bytes += bytes;
        self.waited += waited;
    }

    /// Whether this stream shows a rate-bound connection on a link that took
    /// `fastest_open` to open a stream at best.
    fn rate_bound(&self, fastest_open: Duration) -> bool {
        !self.range_ignored
            && fastest_open >= DISTANT
            && self.bytes >= JUDGED_AFTER
            && (self.bytes as f64) < SLOW_STREAM * self.waited.as_secs_f64()
    }
}

impl LinkSpeed {
    /// Whether sequential readers should fetch blocks in parallel rather than stream.
    pub fn parallel(&self) -> bool {
        self.lock()
            .is_some_and(|since| since.elapsed() < FINDING_HOLDS)
    }

    /// Notes how long a stream took to open; every stream is noted once, when it opens.
    pub fn opened(&self, opened_in: Duration) {
        let mut fastest = self
            .fastest_open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let replace = fastest.is_none_or(|(d, at)| at.elapsed() >= FINDING_HOLDS || opened_in < d);
        if replace {
            *fastest = Some((opened_in, Instant::now()));
        }
    }

    /// The fastest stream open noted lately (this stream's, if it is the only one).
    fn fastest_open(&self, meter: &StreamMeter) -> Duration {
        let fastest = *self
            .fastest_open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        fastest.map_or(meter.opened_in, |(d, _)| d.min(meter.opened_in))
    }

    /// Judges a running stream; true if it should stop (parallel fetches from now on).
    pub fn judge(&self, meter: &StreamMeter) -> bool {
        if !meter.rate_bound(self.fastest_open(meter)) {
            return false;
        }
        let mut since = self.lock();
        if since.is_none_or(|s| s.elapsed() >= FINDING_HOLDS) {
            tracing::info!(
                opened_ms = meter.opened_in.as_millis() as u64,
                mib_per_s =
                    (meter.bytes as f64 / meter.waited.as_secs_f64().max(1e-9) / 1048576.0) as u64,
                "one connection is rate-bound on a distant link: sequential reads fetch blocks in parallel"
            );
        }
        *since = Some(Instant::now());
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.rate_bound_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(opened_ms: u64, mib: u64, secs: f64, ignored: bool) -> StreamMeter {
        let mut m = StreamMeter::new(Duration::from_millis(opened_ms), ignored);
        m.add(mib << 20, Duration::from_secs_f64(secs));
        m
    }

    #[test]
    fn only_distant_slow_streams_that_honour_range_are_rate_bound() {
        let link = LinkSpeed::default();
        // Loopback, however slow (a busy machine, a trickling registry): keep streaming.
        assert!(!link.judge(&meter(1, 16, 2.0, false)));
        // Distant but fast: one connection is enough.
        assert!(!link.judge(&meter(40, 64, 0.5, false)));
        // Too early to tell.
        assert!(!link.judge(&meter(40, 2, 1.0, false)));
        // A cold pull-through cache sending the whole blob: blocks would not help.
        assert!(!link.judge(&meter(40, 16, 1.0, true)));
        assert!(!link.parallel());
        // 40 ms away, 24 MiB/s: parallel.
        assert!(link.judge(&meter(40, 24, 1.0, false)));
        assert!(link.parallel());
    }

    #[test]
    fn one_slow_open_on_a_link_that_opened_fast_before_is_not_distance() {
        let link = LinkSpeed::default();
        link.opened(Duration::from_millis(1));
        // A loopback stream that took 30 ms to open on a busy machine, then was slow.
        link.opened(Duration::from_millis(30));
        assert!(!link.judge(&meter(30, 16, 1.0, false)));
        assert!(!link.parallel());
        // Every open slow: distant.
        let far = LinkSpeed::default();
        far.opened(Duration::from_millis(45));
        far.opened(Duration::from_millis(40));
        assert!(far.judge(&meter(45, 16, 1.0, false)));
    }
}
