//! The body of a blob GET, paced: a body that trickles slower than [`TRICKLE_FLOOR`]
//! over a whole `--timeout` counts as stalled, like one that is silent. Its bytes come
//! from the HTTP client's answer, or from a connection of its own (socket.rs).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;

use super::socket::SocketBody;
use crate::buf::BlockBuf;
use crate::registry::error::{Error, Result};
use crate::registry::host::{Host, transport};
use crate::stats::{HostCounters, InFlight, Stats};

/// A blob body that delivers less than this many bytes per second, averaged over a
/// whole `--timeout`, counts as stalled (a registry that trickles is no better than one
/// that is silent, and would otherwise hold a reader for ever).
const TRICKLE_FLOOR: u64 = 1024;

/// The body of a blob GET, positioned at the offset that was asked for. Holds the
/// request's place in the in-flight count until dropped.
pub struct BlobBody {
    source: Source,
    /// The server answered 200 with the whole blob to a Range request.
    range_ignored: bool,
    what: String,
    stats: Arc<Stats>,
    host: Arc<HostCounters>,
    pace: Pace,
    _in_flight: InFlight,
}

/// Where a body's bytes come from.
enum Source {
    /// The HTTP client's answer, in the chunks it hands out.
    Client {
        resp: reqwest::Response,
        /// Bytes still to drop before the asked-for offset (a server that ignored Range).
        skip: u64,
        /// Bytes of the last chunk not taken yet.
        carry: Bytes,
    },
    /// A stream's own connection, read into the caller's buffers (socket.rs).
    Socket {
        body: SocketBody,
        /// Where skipped bytes are read to.
        scratch: Vec<u8>,
    },
}

/// Bytes read at a time from a socket body by [`BlobBody::chunk`] and when skipping.
const SOCKET_CHUNK: usize = 256 << 10;

/// Bytes received while waiting, per window of `--timeout` spent waiting, held to
/// [`TRICKLE_FLOOR`]. Only time spent waiting for the body counts: a stream that
/// pauses because its reader is slow is not a registry that trickles.
struct Pace {
    window: Duration,
    waited: Duration,
    bytes: u64,
}

impl Pace {
    fn new(window: Duration) -> Pace {
        Pace {
            window,
            waited: Duration::ZERO,
            bytes: 0,
        }
    }

    /// How long the next wait may last before the window must be judged.
    fn left(&self) -> Duration {
        self.window.saturating_sub(self.waited)
    }

    /// After a wait of `waited` that brought `bytes`: at the end of a window, an error
    /// if it brought too few, else a new window.
    fn add(&mut self, waited: Duration, bytes: u64, what: &str) -> Result<()> {
        self.waited += waited;
        self.bytes += bytes;
        if self.waited < self.window {
            return Ok(());
        }
        let floor = TRICKLE_FLOOR.saturating_mul(self.window.as_secs().max(1));
        if self.bytes < floor {
            return Err(Error::Unavailable(format!(
                "{what}: {} bytes in {}, slower than {TRICKLE_FLOOR} bytes/s (--timeout)",
                self.bytes,
                humantime::format_duration(self.window)
            )));
        }
        *self = Pace::new(self.window);
        Ok(())
    }
}

impl BlobBody {
    /// The HTTP client's answer `resp` from `host`, `skip` bytes before the offset that
    /// was asked for (a server that ignored Range).
    pub(super) fn from_answer(
        host: &Host,
        resp: reqwest::Response,
        skip: u64,
        what: String,
        in_flight: InFlight,
    ) -> BlobBody {
        let source = Source::Client {
            resp,
            skip,
            carry: Bytes::new(),
        };
        BlobBody::new(host, source, what, in_flight)
    }

    /// A `206` body read from its own connection to `host`.
    pub(super) fn from_socket(
        host: &Host,
        body: SocketBody,
        what: String,
        in_flight: InFlight,
    ) -> BlobBody {
        let source = Source::Socket {
            body,
            scratch: Vec::new(),
        };
        BlobBody::new(host, source, what, in_flight)
    }

    fn new(host: &Host, source: Source, what: String, in_flight: InFlight) -> BlobBody {
        BlobBody {
            stats: in_flight.stats().clone(),
            host: host.counters().clone(),
            // Every blob GET asks for a Range.
            range_ignored: matches!(&source, Source::Client { resp, .. } if resp.status() == StatusCode::OK),
            source,
            what,
            pace: Pace::new(host.options().read_timeout),
            _in_flight: in_flight,
        }
    }

    /// Whether the server sent the whole blob instead of the range asked for.
    pub fn range_ignored(&self) -> bool {
        self.range_ignored
    }

    /// The next bytes of the blob; `None` at the end of the answer. A connection that
    /// breaks, or that trickles slower than [`TRICKLE_FLOOR`], is a transient error.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        let (source, mut meter) = self.parts();
        match source {
            Source::Socket { body, .. } => {
                let mut buf = BytesMut::zeroed(SOCKET_CHUNK);
                let n = meter.read_socket(body, &mut buf).await?;
                buf.truncate(n);
                Ok((n > 0).then(|| buf.freeze()))
            }
            Source::Client { .. } => take(source, &mut meter, usize::MAX).await,
        }
    }

    /// Fills `out` to `want` bytes from the body, read straight into it from a socket.
    /// Err if the answer ends first.
    pub async fn fill(&mut self, out: &mut BlockBuf, want: usize) -> Result<()> {
        let (source, mut meter) = self.parts();
        while out.len() < want {
            let n = match source {
                Source::Socket { body, .. } => {
                    let n = meter.read_socket(body, out.unfilled(want)).await?;
                    out.filled(n);
                    n
                }
                Source::Client { .. } => {
                    let chunk = take(source, &mut meter, want - out.len()).await?;
                    let chunk = chunk.unwrap_or_default();
                    out.extend_from_slice(&chunk);
                    chunk.len()
                }
            };
            if n == 0 {
                return Err(meter.ended());
            }
        }
        Ok(())
    }

    /// Reads past the next `n` bytes of the body. Err if the answer ends first.
    pub async fn skip(&mut self, mut n: u64) -> Result<()> {
        let (source, mut meter) = self.parts();
        while n > 0 {
            let limit = usize::try_from(n).unwrap_or(usize::MAX);
            let got = match source {
                Source::Socket { body, scratch } => {
                    scratch.resize(SOCKET_CHUNK, 0);
                    let len = limit.min(scratch.len());
                    meter.read_socket(body, &mut scratch[..len]).await?
                }
                Source::Client { .. } => take(source, &mut meter, limit)
                    .await?
                    .map_or(0, |chunk| chunk.len()),
            };
            if got == 0 {
                return Err(meter.ended());
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// The body's source, and what paces and counts its bytes: borrowed apart, so that
    /// a read can go into the source's own buffers.
    fn parts(&mut self) -> (&mut Source, Meter<'_>) {
        let meter = Meter {
            pace: &mut self.pace,
            what: &self.what,
            stats: &self.stats,
            host: &self.host,
        };
        (&mut self.source, meter)
    }

    /// What this request was, for error messages ("GET /v2/... bytes=0-").
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// Paces a body's waits ([`Pace`]) and counts the bytes it brings.
struct Meter<'a> {
    pace: &'a mut Pace,
    what: &'a str,
    stats: &'a Stats,
    host: &'a HostCounters,
}

impl Meter<'_> {
    /// Waits for `next` (the body's next bytes), judging the pace at the end of every
    /// window that passes without them; then counts the `len` bytes they brought (None:
    /// nothing to count, a failure or the end, left to the caller).
    async fn wait<T>(
        &mut self,
        next: impl std::future::Future<Output = T>,
        len: impl Fn(&T) -> Option<u64>,
    ) -> Result<T> {
        tokio::pin!(next);
        loop {
            let started = tokio::time::Instant::now();
            let arrived = tokio::time::timeout(self.pace.left(), &mut next).await;
            let waited = started.elapsed();
            let Ok(arrived) = arrived else {
                // The window is over without a byte in this wait: judge it.
                self.pace.add(waited, 0, self.what)?;
                continue;
            };
            if let Some(n) = len(&arrived) {
                self.pace.add(waited, n, self.what)?;
                self.stats.received(n);
                Stats::add(&self.host.fetched_bytes, n);
            }
            return Ok(arrived);
        }
    }

    /// Reads from a socket body into `buf`: how many bytes (0 at the end of the answer).
    async fn read_socket(&mut self, body: &mut SocketBody, buf: &mut [u8]) -> Result<usize> {
        let read = self
            .wait(body.read(buf), |r| r.as_ref().ok().map(|&n| n as u64))
            .await?;
        read.map_err(|e| Error::Unavailable(format!("{}: connection failed: {e}", self.what)))
    }

    fn ended(&self) -> Error {
        Error::Unavailable(format!("{}: answer ended early", self.what))
    }
}

/// Up to `limit` bytes from the client's answer: what is left of the last chunk, else
/// the next one (None at the end, and for a socket body).
async fn take(source: &mut Source, meter: &mut Meter<'_>, limit: usize) -> Result<Option<Bytes>> {
    let Source::Client { resp, skip, carry } = source else {
        return Ok(None);
    };
    loop {
        if !carry.is_empty() {
            let n = limit.min(carry.len());
            return Ok(Some(carry.split_to(n)));
        }
        let next = meter
            .wait(resp.chunk(), |c| {
                // The end of the answer is not a delivery (and not paced).
                c.as_ref().ok()?.as_ref().map(|c| c.len() as u64)
            })
            .await?;
        let Some(mut chunk) = next.map_err(|e| transport(meter.what, &e))? else {
            return Ok(None);
        };
        if *skip > 0 {
            let n = (*skip).min(chunk.len() as u64);
            *skip -= n;
            let _ = chunk.split_to(n as usize);
        }
        *carry = chunk;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_below_the_floor_for_a_whole_window_is_stalled() {
        let window = Duration::from_secs(10);
        let mut pace = Pace::new(window);
        // Half a window of waiting is not judged yet.
        assert!(pace.add(window / 2, 100, "GET x").is_ok());
        let stalled = pace
            .add(window / 2, 100, "GET x")
            .expect_err("200 bytes in 10 s");
        assert!(stalled.is_transient(), "{stalled}");
        assert!(stalled.to_string().contains("slower than"), "{stalled}");
        // 2 KiB/s is slow but above the floor: a new window starts.
        let mut pace = Pace::new(window);
        assert!(pace.add(window, 20 << 10, "GET x").is_ok());
        assert_eq!((pace.waited, pace.bytes), (Duration::ZERO, 0));
        assert_eq!(pace.left(), window);
    }
}
