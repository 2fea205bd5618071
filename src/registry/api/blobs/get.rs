//! Blob reads on one host: HEAD for the size, ranged GETs, streaming GETs to the end of
//! a blob (body.rs paces them), and a whole blob checked against its digest. Each is one
//! attempt: the client routes and retries them. A redirected GET
//! (object storage, a CDN) is followed here, not by reqwest, so its resolved URL can be
//! reused for the blob's later ranges and nothing of the registry's goes to the other host.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header;
use reqwest::{Method, StatusCode};
use tracing::debug;
use url::Url;

use super::body::BlobBody;
use super::socket::SocketBody;
use crate::registry::error::{Error, Result};
use crate::registry::host::headers::{content_length, content_range_start, header_str};
use crate::registry::host::{Host, MAX_REDIRECTS, USER_AGENT, answer};
use crate::registry::types::{Digest, RepoName};
use crate::stats::{InFlight, RequestKind, Stats};

/// What one blob GET produced: an answer (and how many leading bytes to drop, for a
/// server that ignored Range), or a redirect to follow.
enum Opened {
    Body(reqwest::Response, u64),
    Redirect(Url),
}

impl Host {
    /// HEAD a blob: its exact size.
    pub async fn head_blob_once(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let what = format!("HEAD /v2/{repo}/blobs/{digest}");
        let _in_flight = self.stats().request(RequestKind::BlobHead);
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        // A HEAD that redirects (to object storage) is followed: only the size matters.
        let resp = self.send(&what, self.request(Method::HEAD, url)).await?;
        if !resp.status().is_success() {
            return Err(answer::head_error(&what, &resp));
        }
        content_length(resp.headers())
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Content-Length")))
    }

    /// Exactly `len` bytes of a blob from `offset`, in one GET (see `open_blob`).
    pub async fn get_blob_range_once(
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
            .map_err(|_| Error::BadAnswer(format!("{}: range too large", body.what())))?;
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
                body.what(),
                buf.len()
            )));
        }
        Ok(buf.freeze())
    }

    /// Opens one GET that streams a blob from `offset` to its end, for a sequential
    /// reader: one request instead of one per block (a registry spends milliseconds on
    /// each). The caller handles a body that breaks off later.
    pub async fn stream_blob_once(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody> {
        let in_flight = self.stats().request(RequestKind::BlobStream);
        if let Some((body, what)) = self.socket_stream(repo, digest, offset).await {
            return Ok(BlobBody::from_socket(self, body, (what, digest), in_flight));
        }
        self.open_blob(repo, digest, offset, None, in_flight).await
    }

    /// The whole blob in pieces of `piece` bytes, hashed before anything of it is
    /// handed out; its GET must start answering within `patience`. For blobs small
    /// enough to hold whole, from a mirror: nothing from a mirror is served unchecked.
    pub async fn verified_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        piece: usize,
        patience: Duration,
    ) -> Result<Vec<Bytes>> {
        let piece = piece.max(1);
        let in_flight = self.stats().request(RequestKind::BlobStream);
        let opened = self.open_blob(repo, digest, 0, None, in_flight);
        let mut body = tokio::time::timeout(patience, opened)
            .await
            .map_err(|_| Error::Unavailable("no answer in time".into()))??;
        let mut hasher = digest.hasher();
        let mut pieces = Vec::new();
        let mut current =
            BytesMut::with_capacity(usize::try_from(size).unwrap_or(piece).min(piece));
        let mut received = 0u64;
        while let Some(mut chunk) = body.chunk().await? {
            received += chunk.len() as u64;
            if received > size {
                return Err(Error::BadAnswer(format!(
                    "{}: more than the blob's {size} bytes",
                    body.what()
                )));
            }
            hasher.update(&chunk);
            while !chunk.is_empty() {
                let take = chunk.len().min(piece - current.len());
                current.extend_from_slice(&chunk.split_to(take));
                if current.len() == piece {
                    pieces.push(
                        std::mem::replace(&mut current, BytesMut::with_capacity(piece)).freeze(),
                    );
                }
            }
        }
        if received != size {
            return Err(Error::Unavailable(format!(
                "{}: answer ended after {received} of {size} bytes",
                body.what()
            )));
        }
        if !hasher.matches(digest) {
            return Err(Error::Mismatch(format!(
                "{}: content does not match its digest",
                body.what()
            )));
        }
        if !current.is_empty() {
            pieces.push(current.freeze());
        }
        Ok(pieces)
    }

    /// A stream's GET on a connection of its own, its body read straight into block
    /// buffers (socket.rs): for a registry spoken to in plain HTTP with no proxy, and a
    /// blob not known to redirect. None: the answer was not a plain `206` (or there was
    /// none), and the client asks again.
    async fn socket_stream(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Option<(SocketBody, String)> {
        if !self.socket_streams() || self.resolved().get(digest).is_some() {
            return None;
        }
        let range = format!("bytes={offset}-");
        let what = format!("GET /v2/{repo}/blobs/{digest} {range}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}")).ok()?;
        let mut request = self
            .blob_request(url)
            .header(header::RANGE, &range)
            .build()
            .ok()?;
        self.prepare_own_request(&mut request);
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
    async fn open_blob(
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
        if let Some(url) = self.resolved().get(digest) {
            match self.open_at(&url, &what, &range, offset).await {
                Ok(Opened::Body(resp, skip)) => {
                    return Ok(BlobBody::from_answer(
                        self,
                        resp,
                        skip,
                        (what, digest),
                        in_flight,
                    ));
                }
                Ok(Opened::Redirect(_)) => debug!(%digest, "resolved URL redirects again"),
                Err(e) => debug!(%digest, "resolved URL failed ({e}); asking the registry"),
            }
            self.resolved().forget(digest);
        }
        let mut url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        for _ in 0..=MAX_REDIRECTS {
            match self.open_at(&url, &what, &range, offset).await? {
                Opened::Body(resp, skip) => {
                    if url.origin() != self.base().origin() {
                        self.resolved().remember(digest, url);
                    }
                    return Ok(BlobBody::from_answer(
                        self,
                        resp,
                        skip,
                        (what, digest),
                        in_flight,
                    ));
                }
                Opened::Redirect(next) => {
                    // Never downgrade: an https registry may not send us to plain http.
                    if next.scheme() == "http" && self.base().scheme() == "https" {
                        return Err(Error::BadAnswer(format!(
                            "{what}: redirected from https to {next}"
                        )));
                    }
                    self.check_redirect(&what, &next)?;
                    debug!(%digest, to = %next.origin().ascii_serialization(), "blob redirected");
                    url = next;
                }
            }
        }
        Err(Error::BadAnswer(format!(
            "{what}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// One blob GET with `Range: <range>` to `url` (the registry or where it
    /// redirected). Registry credentials are attached only for the registry's own
    /// origin (`Auth::send`); another host gets a bare request.
    async fn open_at(&self, url: &Url, what: &str, range: &str, offset: u64) -> Result<Opened> {
        let req = self.blob_request(url.clone()).header(header::RANGE, range);
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
            _ => Err(answer::error(what, resp).await),
        }
    }
}
