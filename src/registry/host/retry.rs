//! Retries of an idempotent operation after transient failures: exponential backoff with
//! jitter, the registry's `Retry-After` honoured, all within `--timeout`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tracing::warn;

use super::options::ClientOptions;
use crate::registry::error::{Error, Result};
use crate::stats::Stats;

/// A `Retry-After` longer than this is not waited for in full: a reader is blocked.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How one host retries (from its [`ClientOptions`]), counting each retry.
pub struct Retries {
    min_delay: Duration,
    max_retries: usize,
    total: Duration,
    stats: Arc<Stats>,
}

impl Retries {
    pub fn new(options: &ClientOptions, stats: Arc<Stats>) -> Retries {
        Retries {
            min_delay: options.retry_delay,
            max_retries: options.max_retries,
            total: options.total_timeout,
            stats,
        }
    }

    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(self.max_retries)
            .with_jitter()
    }

    /// The waits between the attempts of one operation that fails transiently
    /// (`max_retries` of them), for callers that cannot use [`Self::run`].
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        self.builder().build()
    }

    /// How long to wait after `e` when the backoff says `planned`: the registry's
    /// `Retry-After` if it sent one, capped.
    pub fn wait_after(e: &Error, planned: Duration) -> Duration {
        e.retry_after()
            .map_or(planned, |asked| asked.min(MAX_RETRY_AFTER))
    }

    /// Runs `op` again after transient failures, with exponential backoff and jitter,
    /// honouring `Retry-After`. Only for idempotent requests.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let backoff = self.builder();
        let total = self.total;
        let deadline = tokio::time::Instant::now() + total;
        let last_error = Mutex::new(None::<String>);
        // Each attempt gets what is left of `total`, so a registry that stays silent
        // fails the operation within --timeout, naming the last thing that went wrong.
        let mut op = op;
        let attempt = || {
            let fut = op();
            let last_error = &last_error;
            async move {
                match tokio::time::timeout_at(deadline, fut).await {
                    Ok(result) => result,
                    Err(_) => {
                        let last = last_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take()
                            .map_or_else(String::new, |e| format!("; last error: {e}"));
                        Err(Error::Unavailable(format!(
                            "no answer within {} (--timeout){last}",
                            humantime::format_duration(total)
                        )))
                    }
                }
            }
        };
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(Error::is_transient)
            .adjust(|e: &Error, delay| {
                let delay = delay.map(|d| Self::wait_after(e, d))?;
                // No retry that could not start before the deadline.
                (tokio::time::Instant::now() + delay < deadline).then_some(delay)
            })
            .notify(|e, delay| {
                *last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                Stats::add(&self.stats.retries, 1);
                warn!("{e}; retrying in {} ms", delay.as_millis());
            })
            .await
    }
}
