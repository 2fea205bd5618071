//! Blob reads: HEAD for the size, ranged GETs with retries, and streaming GETs to the
//! end of a blob, whose body is paced (a trickle counts as a stall). A redirected GET
//! (object storage, a CDN) is followed here, not by reqwest, so its resolved URL can be
//! reused for the blob's later ranges and nothing of the registry's goes to the other host.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header;
use tracing::debug;
use url::Url;

use super::client::{
    MAX_REDIRECTS, RegistryClient, USER_AGENT, content_length, header_str, transport,
};
use super::error::{Error, Result};
use super::socket_body::SocketBody;
use super::types::{Digest, RepoName};
use crate::buf::BlockBuf;
use crate::stats::{HostCounters, InFlight, RequestKind, Stats};

/// How long a blob's resolved (redirected) URL is reused before asking the registry
/// again. Signed URLs typically live 10 to 60 minutes; a failure also drops it early.
const RESOLVED_URL_TTL: Duration = Duration::from_secs(600);
/// A blob body that delivers less than this many bytes per second, averaged over a
/// whole `--timeout`, counts as stalled (a registry that trickles is no better than one
/// that is silent, and would otherwise hold a reader for ever).
pub(super) const TRICKLE_FLOOR: u64 = 1024;

/// What one blob GET produced: an answer (and how many leading bytes to drop, for a
/// server that ignored Range), or a redirect to follow.
enum Opened {
    Body(reqwest::Response, u64),
    Redirect(Url),
}

impl RegistryClient {
    /// HEAD a blob: its exact size.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.content_read(digest, |host| Box::pin(host.head_blob_once(repo, digest)))
            .await
    }

    async fn head_blob_once(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let what = format!("HEAD /v2/{repo}/blobs/{digest}");
        let _in_flight = self.stats().request(RequestKind::BlobHead);
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        // A HEAD that redirects (to object storage) is followed: only the size matters.
        let resp = self.send(&what, self.http.head(url)).await?;
        if !resp.status().is_success() {
            return Err(Self::head_fail(&what, &resp));
        }
        content_length(resp.headers())
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Content-Length")))
    }

    /// Reads exactly `len` bytes of a blob from `offset`, retrying transient failures
    /// (a dropped connection mid-body included). A GET the registry redirects (to
    /// object storage or a CDN) is followed, and the resolved URL is reused for later
    /// ranges of the same blob until it fails or `RESOLVED_URL_TTL` passes.
    pub async fn get_blob_range(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.content_read(digest, |host| {
            Box::pin(host.get_blob_range_once(repo, digest, offset, len))
        })
        .await
    }

    async fn get_blob_range_once(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        let in_flight = self.stats().request(RequestKind::BlobRange);
        let mut body = self
            .open_blob(repo, digest, offset, Some(len), in_flight)
            .await?;
        let want = usize::try_from(len)
            .map_err(|_| Error::BadAnswer(format!("{}: range too large", body.what)))?;
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            let Some(chunk) = body.chunk().await? else {
                break;
            };
            let take = chunk.len().min(want - buf.len());
            buf.extend_from_slice(&chunk[..take]);
        }
        if buf.len() < want {
            // A connection cut short: transient, the retry asks again.
            return Err(Error::Unavailable(format!(
                "{}: answer ended after {} of {want} bytes",
                body.what,
                buf.len()
            )));
        }
        Ok(buf.freeze())
    }

    /// Opens one GET that streams a blob from `offset` to its end, for a sequential
    /// reader: one request instead of one per block (a registry spends milliseconds on
    /// each). Opening is retried; the caller handles a body that breaks off later.
    pub async fn stream_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody> {
        self.content_read(digest, |host| {
            Box::pin(async move {
                let in_flight = host.stats().request(RequestKind::BlobStream);
                if let Some((body, what)) = host.socket_stream(repo, digest, offset).await {
                    let source = Source::Socket {
                        body,
                        scratch: Vec::new(),
                    };
                    return Ok(host.wrap_body(source, what, in_flight));
                }
                host.open_blob(repo, digest, offset, None, in_flight).await
            })
        })
        .await
    }

    /// A stream's GET on a connection of its own, its body read straight into block
    /// buffers (socket_body.rs): for a registry spoken to in plain HTTP with no proxy,
    /// and a blob not known to redirect. None: the answer was not a plain `206` (or
    /// there was none), and the client asks again.
    async fn socket_stream(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Option<(SocketBody, String)> {
        if !self.socket_streams() || self.resolved_url(digest).is_some() {
            return None;
        }
        let range = format!("bytes={offset}-");
        let what = format!("GET /v2/{repo}/blobs/{digest} {range}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}")).ok()?;
        let mut request = self
            .blob_http
            .get(url)
            .header(header::RANGE, &range)
            .build()
            .ok()?;
        self.auth().attach(&mut request);
        Stats::add(&self.host_counters().requests, 1);
        let options = self.options();
        let connect = options.connect_timeout.min(options.read_timeout);
        match SocketBody::open(&request, offset, USER_AGENT, connect, options.read_timeout).await {
            Ok(body) => {
                Stats::add(&self.stats().socket_streams, 1);
                debug!(request = what, "stream read from its own connection");
                Some((body, what))
            }
            Err(why) => {
                debug!(request = what, "stream through the client: {why}");
                None
            }
        }
    }

    /// A GET of the blob from `offset` (`len` bytes, or to the end), positioned at
    /// `offset`: from the URL it resolved to earlier, else from the registry, following
    /// its redirects.
    pub(super) async fn open_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: Option<u64>,
        in_flight: InFlight,
    ) -> Result<BlobBody> {
        let range = match len {
            Some(len) => format!("bytes={offset}-{}", offset + len.max(1) - 1),
            None => format!("bytes={offset}-"),
        };
        let what = format!("GET /v2/{repo}/blobs/{digest} {range}");
        if let Some(url) = self.resolved_url(digest) {
            match self.open_at(&url, &what, &range, offset).await {
                Ok(Opened::Body(resp, skip)) => {
                    return Ok(self.blob_body(resp, skip, what, in_flight));
                }
                Ok(Opened::Redirect(_)) => debug!(%digest, "resolved URL redirects again"),
                Err(e) => debug!(%digest, "resolved URL failed ({e}); asking the registry"),
            }
            self.forget_resolved(digest);
        }
        let mut url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        for _ in 0..=MAX_REDIRECTS {
            match self.open_at(&url, &what, &range, offset).await? {
                Opened::Body(resp, skip) => {
                    if url.origin() != self.base().origin() {
                        self.remember_resolved(digest, url);
                    }
                    return Ok(self.blob_body(resp, skip, what, in_flight));
                }
                Opened::Redirect(next) => {
                    // Never downgrade: an https registry may not send us to plain http.
                    if next.scheme() == "http" && self.base().scheme() == "https" {
                        return Err(Error::BadAnswer(format!(
                            "{what}: redirected from https to {next}"
                        )));
                    }
                    self.guard.check(&what, "redirect", &next)?;
                    debug!(%digest, to = %next.origin().ascii_serialization(), "blob redirected");
                    url = next;
                }
            }
        }
        Err(Error::BadAnswer(format!(
            "{what}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn blob_body(
        &self,
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
        self.wrap_body(source, what, in_flight)
    }

    fn wrap_body(&self, source: Source, what: String, in_flight: InFlight) -> BlobBody {
        BlobBody::new(
            source,
            what,
            in_flight,
            self.host_counters().clone(),
            self.options().read_timeout,
        )
    }

    fn resolved_url(&self, digest: &Digest) -> Option<Url> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        match resolved.get(digest) {
            Some((url, at)) if at.elapsed() < RESOLVED_URL_TTL => Some(url.clone()),
            _ => None,
        }
    }

    fn remember_resolved(&self, digest: &Digest, url: Url) {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        resolved.put(digest.clone(), (url, Instant::now()));
    }

    fn forget_resolved(&self, digest: &Digest) {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        resolved.pop(digest);
    }

    /// One blob GET with `Range: <range>` to `url` (the registry or where it
    /// redirected). Registry credentials are attached only for the registry's own
    /// origin (`Auth::send`); another host gets a bare request.
    async fn open_at(&self, url: &Url, what: &str, range: &str, offset: u64) -> Result<Opened> {
        let req = self.blob_http.get(url.clone()).header(header::RANGE, range);
        let resp = self.send(what, req).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let answered = header_str(resp.headers(), "content-range").unwrap_or_default();
                if content_range_start(answered) != Some(offset) {
                    return Err(Error::BadAnswer(format!(
                        "{what}: answered Content-Range {answered:?}"
                    )));
                }
                Ok(Opened::Body(resp, 0))
            }
            // The server ignored Range: skip to the offset in the full body.
            StatusCode::OK => Ok(Opened::Body(resp, offset)),
            s if s.is_redirection() => {
                let location = header_str(resp.headers(), "location").unwrap_or_default();
                let next = url.join(location).map_err(|e| {
                    Error::BadAnswer(format!("{what}: invalid Location {location:?}: {e}"))
                })?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(Error::BadAnswer(format!(
                        "{what}: redirected to unsupported {next}"
                    )));
                }
                Ok(Opened::Redirect(next))
            }
            _ => Err(Self::fail(what, resp).await),
        }
    }
}

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
    /// A stream's own connection, read into the caller's buffers (socket_body.rs).
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
    fn new(
        source: Source,
        what: String,
        in_flight: InFlight,
        host: Arc<HostCounters>,
        window: Duration,
    ) -> BlobBody {
        BlobBody {
            stats: in_flight.stats().clone(),
            host,
            // Every blob GET asks for a Range.
            range_ignored: matches!(&source, Source::Client { resp, .. } if resp.status() == StatusCode::OK),
            source,
            what,
            pace: Pace::new(window),
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
                Stats::add(&self.stats.fetched_bytes, n);
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

/// The first byte position of `Content-Range: bytes 100-199/1000`.
pub(super) fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes ")?;
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
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

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn content_range_never_panics(value in any::<String>()) {
                let _ = content_range_start(&value);
            }

            #[test]
            fn content_range_gives_its_first_byte(start in any::<u64>(), len in 0..u64::MAX / 2, total in any::<Option<u64>>()) {
                let end = start.saturating_add(len);
                let total = total.map_or_else(|| "*".to_owned(), |t| t.to_string());
                prop_assert_eq!(content_range_start(&format!("bytes {start}-{end}/{total}")), Some(start));
                prop_assert_eq!(content_range_start(&format!("items {start}-{end}/{total}")), None);
            }
        }
    }
}
