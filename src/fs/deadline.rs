//! `--timeout` as a promise to programs: an operation that waits on the registry for
//! an answer (lookup, stat, opendir, open, read) gets one within `--timeout`, or EIO.
//!
//! The layers below bound their own requests (retries within `--timeout`, a floor on
//! how slowly a body may trickle, a read's own deadline); this is the backstop for an
//! operation that chains several of them, so their waits never add up.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tracing::warn;

use super::Errno;

/// Added to `--timeout` for the backstop, so the layers below, which know what they
/// were waiting for, report first.
pub const SLACK: Duration = Duration::from_secs(1);

/// `work`, or EIO if it has not finished within `limit`; `what` names it in the log.
pub async fn within<T, D: Display>(
    limit: Duration,
    what: impl FnOnce() -> D,
    work: impl Future<Output = Result<T, Errno>>,
) -> Result<T, Errno> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => {
            warn!(
                "{}: no answer from the registry within {} (--timeout); EIO",
                what(),
                humantime::format_duration(limit.saturating_sub(SLACK))
            );
            Err(Errno::EIO)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slow_work_is_eio_in_time_and_quick_work_passes() {
        let limit = Duration::from_millis(50);
        let slow = within(limit, || "stat x", async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(1)
        });
        let started = std::time::Instant::now();
        assert_eq!(slow.await, Err(Errno::EIO));
        assert!(started.elapsed() < Duration::from_secs(5));
        let quick = within(limit, || "stat y", async { Ok(2) });
        assert_eq!(quick.await, Ok(2));
    }
}
