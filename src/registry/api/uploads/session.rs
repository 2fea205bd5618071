//! One blob upload session's requests (docs/SEMANTICS.md, "Writes"): opened by POST
//! (maybe as a cross-repository mount), filled by one PATCH per chunk, committed by PUT
//! `?digest=` or cancelled by DELETE.
//!
//! Resume, not restart: after a reset, a 5xx or a 429 the registry is asked where the
//! upload stands (GET on the session URL, `Range: 0-<last>`) and the upload goes on from
//! there with the bytes still held in the chunk being sent. Nothing that changes a
//! session is sent again without asking first.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use tracing::{info, warn};
use url::Url;

use crate::registry::error::{Error, Result};
use crate::registry::host::headers::{digest_header, header_str};
use crate::registry::host::{Host, Retries, answer};
use crate::registry::types::{Digest, RepoName};
use crate::stats::{RequestKind, Stats};

const OCTET_STREAM: &str = "application/octet-stream";

/// Where an upload session stands, as the registry last said.
#[derive(Clone, Debug)]
pub(super) struct Session {
    /// Where the next request goes: the registry's latest `Location`, query kept
    /// (distribution keeps the session's state in `_state=`).
    pub(super) url: Url,
    /// Bytes the registry has acknowledged.
    pub(super) confirmed: u64,
}

/// What a POST to `/blobs/uploads/` did.
pub(super) enum Opened {
    /// 201: the blob is in the repository (a mount); the digest the registry named.
    Created(Option<Digest>),
    /// 202: a session, and the registry's `OCI-Chunk-Min-Length` if it sent one.
    Session(Session, Option<usize>),
}

/// What a resumable step of an upload does.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// Send blob bytes `start..start + chunk.len()`.
    Chunk { chunk: &'a Bytes, start: u64 },
    /// Commit the session, which holds `len` bytes, as `digest`.
    Commit { digest: &'a Digest, len: u64 },
}

impl Host {
    /// POST to `url` (`/blobs/uploads/`, maybe with `?mount=`), retried: opening a
    /// session or mounting sends no blob bytes, so a retry after a lost answer at worst
    /// leaves an empty session behind, which the registry expires.
    pub(super) async fn open_session(
        &self,
        what: &str,
        kind: RequestKind,
        url: &Url,
    ) -> Result<Opened> {
        self.retrying(|| self.open_session_once(what, kind, url))
            .await
    }

    /// One POST to `url` (`/blobs/uploads/`, maybe with `?mount=`).
    async fn open_session_once(&self, what: &str, kind: RequestKind, url: &Url) -> Result<Opened> {
        let _in_flight = self.stats().request(kind);
        let req = self.request(Method::POST, url.clone()).body(Bytes::new());
        let resp = self.send(what, req).await?;
        match resp.status() {
            StatusCode::CREATED => Ok(Opened::Created(digest_header(what, resp.headers())?)),
            StatusCode::ACCEPTED => {
                let session = Session {
                    url: self.session_url(what, url, resp.headers())?,
                    confirmed: 0,
                };
                let min_chunk = header_str(resp.headers(), "oci-chunk-min-length")
                    .and_then(|v| v.trim().parse().ok());
                Ok(Opened::Session(session, min_chunk))
            }
            _ => Err(answer::write_error(what, resp).await),
        }
    }

    /// The `Location` of an upload answer, resolved against the request's URL. It must
    /// stay on the registry's origin: credentials never go to another host.
    fn session_url(&self, what: &str, request: &Url, headers: &HeaderMap) -> Result<Url> {
        let location = header_str(headers, "location")
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Location")))?;
        let url = request
            .join(location.trim())
            .map_err(|e| Error::BadAnswer(format!("{what}: invalid Location {location:?}: {e}")))?;
        if url.origin() != self.base().origin() {
            return Err(Error::BadAnswer(format!(
                "{what}: upload Location points to another host ({}); refused",
                url.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }

    /// Sends blob bytes `start..` held in `chunk`. After a transient failure it asks
    /// where the upload stands and goes on from there; the bytes the registry lacks are
    /// still in `chunk`.
    pub(super) async fn send_chunk(
        &self,
        repo: &RepoName,
        session: &mut Session,
        chunk: &Bytes,
        start: u64,
    ) -> Result<()> {
        self.resuming(repo, session, Step::Chunk { chunk, start })
            .await
    }

    /// One attempt at sending the rest of a chunk; `resuming`: ask where the upload
    /// stands first.
    async fn chunk_attempt(
        &self,
        repo: &RepoName,
        session: &mut Session,
        chunk: &Bytes,
        start: u64,
        resuming: bool,
    ) -> Result<()> {
        let end = start + chunk.len() as u64;
        if resuming {
            self.ask_status(repo, session).await?;
            if !(start..=end).contains(&session.confirmed) {
                return Err(Error::BadAnswer(format!(
                    "upload to {repo}: the registry reports {} bytes stored, but {start} \
                     were acknowledged and {end} sent",
                    session.confirmed
                )));
            }
            warn!(%repo, offset = session.confirmed, "resuming the upload");
        }
        while session.confirmed < end {
            // `confirmed - start` is within the chunk: checked above, and PATCH answers
            // are held to `first < stored <= end`.
            let from = usize::try_from(session.confirmed - start).unwrap_or(0);
            self.patch(repo, session, chunk.slice(from..), end).await?;
        }
        Ok(())
    }

    /// Runs `step` until it succeeds, fails for good, the retries are spent, or the
    /// registry has let `--timeout` pass without taking a byte more (a stalled registry
    /// fails close(2) within `--timeout`; a slow one that keeps taking bytes does not).
    /// After a transient failure it waits (backoff, or the registry's `Retry-After`)
    /// and the next attempt asks where the upload stands first.
    async fn resuming(&self, repo: &RepoName, session: &mut Session, step: Step<'_>) -> Result<()> {
        let mut waits = self.retries().backoff();
        let mut resuming = false;
        let patience = self.options().total_timeout;
        let (mut progressed, mut confirmed) = (tokio::time::Instant::now(), session.confirmed);
        loop {
            let attempt = match step {
                Step::Chunk { chunk, start } => {
                    self.chunk_attempt(repo, session, chunk, start, resuming)
                        .await
                }
                Step::Commit { digest, len } => {
                    self.commit_attempt(repo, session, digest, len, resuming)
                        .await
                }
            };
            let e = match attempt {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            let Some(planned) = waits.next() else {
                let retries = self.options().max_retries;
                return Err(e.with_note(&format!("gave up after {retries} retries")));
            };
            let wait = Retries::wait_after(&e, planned);
            if session.confirmed > confirmed {
                (progressed, confirmed) = (tokio::time::Instant::now(), session.confirmed);
            }
            if tokio::time::Instant::now() + wait >= progressed + patience {
                return Err(e.with_note(&format!(
                    "no progress within {} (--timeout)",
                    humantime::format_duration(patience)
                )));
            }
            Stats::add(&self.stats().retries, 1);
            warn!(
                "{e}; asking where the upload stands in {} ms",
                wait.as_millis()
            );
            tokio::time::sleep(wait).await;
            resuming = true;
        }
    }

    /// One PATCH of `bytes`, the blob from `session.confirmed` to `end`; on success the
    /// session moves to the registry's new `Location` and acknowledged length.
    async fn patch(
        &self,
        repo: &RepoName,
        session: &mut Session,
        bytes: Bytes,
        end: u64,
    ) -> Result<()> {
        let first = session.confirmed;
        let last = end - 1;
        let what = format!("PATCH /v2/{repo}/blobs/uploads/ bytes {first}-{last}");
        let _in_flight = self.stats().request(RequestKind::UploadChunk);
        Stats::add(&self.stats().uploaded_bytes, bytes.len() as u64);
        let req = self
            .request(Method::PATCH, session.url.clone())
            .header(header::CONTENT_TYPE, OCTET_STREAM)
            .header(header::CONTENT_RANGE, format!("{first}-{last}"))
            .body(bytes);
        let resp = self.send(&what, req).await?;
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            // The registry holds another length than we think: ask it, then go on.
            return Err(Error::Unavailable(format!(
                "{what}: the registry's offset differs (416)"
            )));
        }
        if !resp.status().is_success() {
            return Err(answer::write_error(&what, resp).await);
        }
        let stored = match header_str(resp.headers(), "range") {
            None => end,
            Some(range) => stored_length(range, end)
                .ok_or_else(|| Error::BadAnswer(format!("{what}: invalid Range {range:?}")))?,
        };
        if stored <= first || stored > end {
            return Err(Error::BadAnswer(format!(
                "{what}: the registry reports {stored} bytes stored"
            )));
        }
        session.url = self.session_url(&what, &session.url, resp.headers())?;
        session.confirmed = stored;
        Ok(())
    }

    /// GET on the session: how many bytes the registry holds, and the URL to go on with.
    async fn ask_status(&self, repo: &RepoName, session: &mut Session) -> Result<()> {
        let what = format!("GET /v2/{repo}/blobs/uploads/ (upload status)");
        let _in_flight = self.stats().request(RequestKind::UploadStatus);
        let req = self.request(Method::GET, session.url.clone());
        let resp = self.send(&what, req).await?;
        if !resp.status().is_success() {
            return Err(match answer::write_error(&what, resp).await {
                // Distribution drops a session whose stored length moved without the
                // client learning its new Location (a PATCH cut after part of its body).
                Error::NotFound(m) => Error::Refused(format!(
                    "{m}: the registry no longer knows this upload session"
                )),
                e => e,
            });
        }
        let range = header_str(resp.headers(), "range")
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Range")))?;
        let stored = stored_length(range, session.confirmed)
            .ok_or_else(|| Error::BadAnswer(format!("{what}: invalid Range {range:?}")))?;
        if header_str(resp.headers(), "location").is_some() {
            session.url = self.session_url(&what, &session.url, resp.headers())?;
        }
        session.confirmed = stored;
        Ok(())
    }

    /// PUT `?digest=` on a session that holds all `len` bytes. After a transient failure
    /// it asks first: the session may still be open (PUT again), or gone because the
    /// lost PUT did commit (the blob is there).
    pub(super) async fn commit_session(
        &self,
        repo: &RepoName,
        session: &mut Session,
        digest: &Digest,
        len: u64,
    ) -> Result<()> {
        self.resuming(repo, session, Step::Commit { digest, len })
            .await
    }

    async fn commit_attempt(
        &self,
        repo: &RepoName,
        session: &mut Session,
        digest: &Digest,
        len: u64,
        resuming: bool,
    ) -> Result<()> {
        if resuming && !self.still_open(repo, session, digest, len).await? {
            return Ok(());
        }
        self.put_session(repo, session, digest).await
    }

    /// After a PUT whose answer was lost: true if the session is open with every byte
    /// (PUT again); false if it is gone and the repository has the blob (the PUT did it).
    async fn still_open(
        &self,
        repo: &RepoName,
        session: &mut Session,
        digest: &Digest,
        len: u64,
    ) -> Result<bool> {
        match self.ask_status(repo, session).await {
            Ok(()) if session.confirmed == len => Ok(true),
            Ok(()) => Err(Error::BadAnswer(format!(
                "upload to {repo}: the registry holds {} of {len} bytes before the commit",
                session.confirmed
            ))),
            // The origin is asked, with retries: a mirror's copy would say nothing of
            // this repository.
            Err(lost) if !lost.is_transient() => {
                match self.retrying(|| self.head_blob_once(repo, digest)).await {
                    Ok(_) => {
                        info!(%repo, %digest, "the interrupted commit had gone through");
                        Ok(false)
                    }
                    Err(_) => Err(lost),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn put_session(&self, repo: &RepoName, session: &Session, digest: &Digest) -> Result<()> {
        let what = format!("PUT /v2/{repo}/blobs/uploads/?digest={digest}");
        let _in_flight = self.stats().request(RequestKind::UploadCommit);
        let mut url = session.url.clone();
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let req = self
            .request(Method::PUT, url)
            .header(header::CONTENT_TYPE, OCTET_STREAM)
            .body(Bytes::new());
        let resp = self.send(&what, req).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(answer::write_error(&what, resp).await);
        }
        match digest_header(&what, resp.headers())? {
            Some(stored) if stored != *digest => Err(Error::Mismatch(format!(
                "{what}: the registry stored {stored}"
            ))),
            _ => Ok(()),
        }
    }

    /// DELETE on the session, best effort: a failure is logged (the registry expires
    /// abandoned sessions by itself).
    pub(super) async fn delete_session(&self, repo: &RepoName, session: &Session) {
        let what = format!("DELETE /v2/{repo}/blobs/uploads/");
        let _in_flight = self.stats().request(RequestKind::UploadCancel);
        match self
            .send(&what, self.request(Method::DELETE, session.url.clone()))
            .await
        {
            Ok(resp) if resp.status().is_success() => info!(%repo, "upload cancelled"),
            Ok(resp) => {
                let e = answer::error(&what, resp).await;
                warn!(%repo, "could not cancel the upload: {e}");
            }
            Err(e) => warn!(%repo, "could not cancel the upload: {e}"),
        }
    }
}

/// The length a `Range: 0-<last>` header says the registry holds (`bytes=` tolerated).
/// Distribution writes `0-0` both for nothing and for one byte; `hint` (the length we
/// believe it holds) decides that case.
fn stored_length(range: &str, hint: u64) -> Option<u64> {
    let range = range.trim();
    let range = range.strip_prefix("bytes=").unwrap_or(range);
    let (first, last) = range.split_once('-')?;
    if first.trim() != "0" {
        return None;
    }
    let last: u64 = last.trim().parse().ok()?;
    if last == 0 {
        return Some(hint.min(1));
    }
    last.checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_header_is_the_stored_length() {
        assert_eq!(stored_length("0-1048575", 0), Some(1 << 20));
        assert_eq!(stored_length("bytes=0-9", 0), Some(10));
        assert_eq!(stored_length(" 0-9 ", 0), Some(10));
        // "0-0": nothing, unless we believe at least one byte is there.
        assert_eq!(stored_length("0-0", 0), Some(0));
        assert_eq!(stored_length("0-0", 1), Some(1));
        assert_eq!(stored_length("5-9", 0), None);
        assert_eq!(stored_length("0-", 0), None);
        assert_eq!(stored_length("0--1", 0), None);
        assert_eq!(stored_length(&format!("0-{}", u64::MAX), 0), None);
        assert_eq!(stored_length("garbage", 0), None);
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn range_headers_never_panic(range in any::<String>(), hint in any::<u64>()) {
                let _ = stored_length(&range, hint);
            }

            #[test]
            fn a_range_from_zero_is_its_length(last in 1..u64::MAX, prefix in any::<bool>(), hint in any::<u64>()) {
                let range = if prefix { format!("bytes=0-{last}") } else { format!("0-{last}") };
                prop_assert_eq!(stored_length(&range, hint), Some(last + 1));
                prop_assert_eq!(stored_length(&format!("1-{last}"), hint), None);
            }
        }
    }
}
