//! Blob uploads (DESIGN §2): a session opened by POST, filled by one PATCH per chunk,
//! committed by PUT `?digest=` or cancelled by DELETE; cross-repository mounts, and the
//! copy that replaces a mount the registry declines.
//!
//! Resume, not restart: after a reset, a 5xx or a 429 the registry is asked where the
//! upload stands (GET on the session URL, `Range: 0-<last>`) and the upload goes on from
//! there with the bytes still held in the chunk being sent. Nothing that changes a
//! session is sent again without asking first.

use std::mem;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use url::Url;

use super::client::{RegistryClient, header_str};
use super::error::{Error, Result};
use super::types::{Digest, DigestHasher, RepoName};
use crate::stats::{RequestKind, Stats};

/// The most a registry can make one upload hold per chunk with `OCI-Chunk-Min-Length`
/// (an upload holds about two chunks).
const MAX_CHUNK_SIZE: usize = 256 << 20;
/// `copy_blob` reads the source blob in pieces of this size.
const COPY_PIECE: u64 = 4 << 20;
const OCTET_STREAM: &str = "application/octet-stream";

/// Where an upload session stands, as the registry last said.
#[derive(Clone, Debug)]
struct Session {
    /// Where the next request goes: the registry's latest `Location`, query kept
    /// (distribution keeps the session's state in `_state=`).
    url: Url,
    /// Bytes the registry has acknowledged.
    confirmed: u64,
}

/// What a POST to `/blobs/uploads/` did.
enum Opened {
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

/// Outcome of [`RegistryClient::mount_blob`].
// Returned once per mount and moved straight on: boxing the Upload would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum MountOutcome {
    /// 201: the repository has the blob now.
    Mounted,
    /// 202: the registry declined and opened an upload session instead.
    NotMounted(Upload),
}

/// One blob upload session. Bytes go in with [`Upload::append`]; each full chunk is sent
/// by a background PATCH while the next one fills, so an upload holds about two chunks
/// whatever the blob's size. [`Upload::commit`] or [`Upload::cancel`] ends it; an upload
/// dropped without either is cancelled in the background.
pub struct Upload {
    client: RegistryClient,
    repo: RepoName,
    chunk_size: usize,
    hasher: DigestHasher,
    appended: u64,
    /// Appended bytes not yet handed to a PATCH: less than a chunk between calls.
    filling: BytesMut,
    /// The session as of the last PATCH that finished.
    session: Session,
    /// The PATCH in flight, if any; it hands the session back when it ends.
    sending: Option<JoinHandle<(Session, Result<()>)>>,
    /// The first failure: every later call reports it.
    failed: Option<Error>,
    /// Committed or cancelled: nothing left for Drop to clean up.
    finished: bool,
}

impl RegistryClient {
    /// Opens an upload session in `repo` (POST, 202 + `Location`).
    pub async fn start_upload(&self, repo: &RepoName) -> Result<Upload> {
        let what = format!("POST /v2/{repo}/blobs/uploads/");
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        // Opening a session sends no blob bytes: a retry after a lost answer at worst
        // leaves an empty session behind, which the registry expires.
        let opened = self
            .retrying(|| self.open_session(&what, RequestKind::UploadStart, &url))
            .await?;
        match opened {
            Opened::Session(session, min_chunk) => Ok(self.upload(repo, session, min_chunk)),
            Opened::Created(_) => Err(Error::BadAnswer(format!(
                "{what}: 201 Created for a new upload"
            ))),
        }
    }

    /// Mounts blob `digest` of repository `from` into `repo` (POST `?mount=&from=`).
    /// When the registry declines (202), the session it opened instead comes back.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<MountOutcome> {
        let what = format!("POST /v2/{repo}/blobs/uploads/?mount={digest}&from={from}");
        let mut url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        url.query_pairs_mut()
            .append_pair("mount", digest.as_str())
            .append_pair("from", from.as_str());
        // Repeating a mount changes nothing, and a session it opens instead is empty.
        let opened = self
            .retrying(|| self.open_session(&what, RequestKind::BlobMount, &url))
            .await?;
        match opened {
            Opened::Created(Some(named)) if named != *digest => Err(Error::BadAnswer(format!(
                "{what}: the registry mounted {named}"
            ))),
            Opened::Created(_) => {
                info!(%repo, %digest, %from, "blob mounted");
                Ok(MountOutcome::Mounted)
            }
            Opened::Session(session, min_chunk) => {
                info!(%repo, %digest, %from, "mount declined; the registry opened an upload");
                Ok(MountOutcome::NotMounted(
                    self.upload(repo, session, min_chunk),
                ))
            }
        }
    }

    /// Copies blob `digest` from repository `from` into `upload`, a piece at a time
    /// (bounded memory), and commits it: the fallback for a declined mount. On any
    /// failure the upload is cancelled.
    pub async fn copy_blob(&self, from: &RepoName, digest: &Digest, upload: Upload) -> Result<()> {
        let mut upload = upload;
        if let Err(e) = self.copy_into(from, digest, &mut upload).await {
            upload.cancel().await;
            return Err(e);
        }
        upload.commit(Some(digest)).await.map(|_| ())
    }

    async fn copy_into(&self, from: &RepoName, digest: &Digest, upload: &mut Upload) -> Result<()> {
        let size = self.head_blob(from, digest).await?;
        let mut offset = 0;
        while offset < size {
            let len = COPY_PIECE.min(size - offset);
            let piece = self.get_blob_range(from, digest, offset, len).await?;
            upload.append(&piece).await?;
            offset += len;
        }
        Ok(())
    }

    fn upload(&self, repo: &RepoName, session: Session, min_chunk: Option<usize>) -> Upload {
        let asked = self.options().chunk_size.max(1);
        let mut chunk_size = min_chunk.map_or(asked, |min| asked.max(min));
        if chunk_size > MAX_CHUNK_SIZE {
            warn!(%repo, asked = chunk_size, "chunk size capped at {MAX_CHUNK_SIZE} bytes");
            chunk_size = MAX_CHUNK_SIZE;
        }
        info!(%repo, chunk_size, "upload started");
        Upload {
            client: self.clone(),
            repo: repo.clone(),
            chunk_size,
            hasher: DigestHasher::sha256(),
            appended: 0,
            filling: BytesMut::new(),
            session,
            sending: None,
            failed: None,
            finished: false,
        }
    }

    /// One POST to `url` (`/blobs/uploads/`, maybe with `?mount=`).
    async fn open_session(&self, what: &str, kind: RequestKind, url: &Url) -> Result<Opened> {
        let _in_flight = self.stats().request(kind);
        let req = self.http.post(url.clone()).body(Bytes::new());
        let resp = self.send(what, req).await?;
        match resp.status() {
            StatusCode::CREATED => Ok(Opened::Created(self.digest_header(what, resp.headers())?)),
            StatusCode::ACCEPTED => {
                let session = Session {
                    url: self.session_url(what, url, resp.headers())?,
                    confirmed: 0,
                };
                let min_chunk = header_str(resp.headers(), "oci-chunk-min-length")
                    .and_then(|v| v.trim().parse().ok());
                Ok(Opened::Session(session, min_chunk))
            }
            _ => Err(Self::refusal(what, resp).await),
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
    async fn send_chunk(
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
        let mut waits = self.backoff();
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
            let wait = Self::retry_wait(&e, planned);
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
            .http
            .patch(session.url.clone())
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
            return Err(Self::refusal(&what, resp).await);
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
        let resp = self.send(&what, self.http.get(session.url.clone())).await?;
        if !resp.status().is_success() {
            return Err(match Self::refusal(&what, resp).await {
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
    async fn commit_session(
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
            Err(lost) if !lost.is_transient() => match self.head_blob(repo, digest).await {
                Ok(_) => {
                    info!(%repo, %digest, "the interrupted commit had gone through");
                    Ok(false)
                }
                Err(_) => Err(lost),
            },
            Err(e) => Err(e),
        }
    }

    async fn put_session(&self, repo: &RepoName, session: &Session, digest: &Digest) -> Result<()> {
        let what = format!("PUT /v2/{repo}/blobs/uploads/?digest={digest}");
        let _in_flight = self.stats().request(RequestKind::UploadCommit);
        let mut url = session.url.clone();
        url.query_pairs_mut().append_pair("digest", digest.as_str());
        let req = self
            .http
            .put(url)
            .header(header::CONTENT_TYPE, OCTET_STREAM)
            .body(Bytes::new());
        let resp = self.send(&what, req).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(Self::refusal(&what, resp).await);
        }
        match self.digest_header(&what, resp.headers())? {
            Some(stored) if stored != *digest => Err(Error::Mismatch(format!(
                "{what}: the registry stored {stored}"
            ))),
            _ => Ok(()),
        }
    }

    /// DELETE on the session, best effort: a failure is logged (the registry expires
    /// abandoned sessions by itself).
    async fn delete_session(&self, repo: &RepoName, session: &Session) {
        let what = format!("DELETE /v2/{repo}/blobs/uploads/");
        let _in_flight = self.stats().request(RequestKind::UploadCancel);
        match self
            .send(&what, self.http.delete(session.url.clone()))
            .await
        {
            Ok(resp) if resp.status().is_success() => info!(%repo, "upload cancelled"),
            Ok(resp) => {
                let e = Self::fail(&what, resp).await;
                warn!(%repo, "could not cancel the upload: {e}");
            }
            Err(e) => warn!(%repo, "could not cancel the upload: {e}"),
        }
    }
}

impl Upload {
    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.appended
    }

    pub fn is_empty(&self) -> bool {
        self.appended == 0
    }

    pub fn repo(&self) -> &RepoName {
        &self.repo
    }

    /// Bytes per PATCH: the client's chunk size, or the registry's minimum if larger.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Appends the next bytes of the blob. Returns once they are buffered; a full chunk
    /// is sent in the background, after the previous one was acknowledged. An error of
    /// an earlier PATCH is returned here.
    pub async fn append(&mut self, data: &[u8]) -> Result<()> {
        self.check()?;
        self.hasher.update(data);
        self.appended += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            if self.filling.capacity() == 0 {
                self.filling.reserve(self.chunk_size);
            }
            let take = (self.chunk_size - self.filling.len()).min(rest.len());
            self.filling.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.filling.len() == self.chunk_size {
                let chunk = mem::take(&mut self.filling).freeze();
                self.send_in_background(chunk).await?;
            }
        }
        Ok(())
    }

    /// Sends what is buffered, then commits with the sha256 of everything appended. If
    /// `expected` is given and differs, or anything fails, the upload is cancelled and
    /// nothing is committed. Returns the digest once the registry answered 201 with it.
    pub async fn commit(mut self, expected: Option<&Digest>) -> Result<Digest> {
        match self.finish(expected).await {
            Ok(digest) => {
                self.finished = true;
                info!(repo = %self.repo, %digest, bytes = self.appended, "upload committed");
                Ok(digest)
            }
            Err(e) => {
                warn!(repo = %self.repo, "upload failed, cancelling it: {e}");
                if e.is_transient() {
                    // In the background: a registry that did not answer the commit will
                    // not answer the DELETE quickly either, and close(2) must not wait.
                    tokio::spawn(async move { self.cancel_now().await });
                } else {
                    self.cancel_now().await;
                }
                Err(e)
            }
        }
    }

    /// Cancels the session (DELETE), best effort.
    pub async fn cancel(mut self) {
        self.cancel_now().await;
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    async fn finish(&mut self, expected: Option<&Digest>) -> Result<Digest> {
        self.check()?;
        let digest = mem::replace(&mut self.hasher, DigestHasher::sha256()).digest();
        if let Some(expected) = expected {
            let what = format!("upload to {}", self.repo);
            if expected.algorithm() != digest.algorithm() {
                return Err(Error::Invalid(format!(
                    "{what}: expected {expected}, but uploads are hashed with {}",
                    digest.algorithm()
                )));
            }
            if *expected != digest {
                return Err(Error::Mismatch(format!(
                    "{what}: {} bytes hash to {digest}, not {expected}",
                    self.appended
                )));
            }
        }
        self.wait_sent().await?;
        let last = mem::take(&mut self.filling).freeze();
        if !last.is_empty() {
            let start = self.session.confirmed;
            self.client
                .send_chunk(&self.repo, &mut self.session, &last, start)
                .await?;
        }
        self.client
            .commit_session(&self.repo, &mut self.session, &digest, self.appended)
            .await?;
        Ok(digest)
    }

    /// Waits for the previous chunk's PATCH (one in flight at most), then sends `chunk`.
    async fn send_in_background(&mut self, chunk: Bytes) -> Result<()> {
        self.wait_sent().await?;
        let client = self.client.clone();
        let repo = self.repo.clone();
        let mut session = self.session.clone();
        let start = session.confirmed;
        self.sending = Some(tokio::spawn(async move {
            let result = client.send_chunk(&repo, &mut session, &chunk, start).await;
            (session, result)
        }));
        Ok(())
    }

    /// Waits for the PATCH in flight, if any, and takes its session and outcome.
    async fn wait_sent(&mut self) -> Result<()> {
        let Some(task) = self.sending.take() else {
            return Ok(());
        };
        let result = match task.await {
            Ok((session, result)) => {
                self.session = session;
                result
            }
            Err(e) => Err(Error::BadAnswer(format!(
                "upload to {}: the chunk sender ended: {e}",
                self.repo
            ))),
        };
        result.inspect_err(|e| self.failed = Some(e.clone()))
    }

    async fn cancel_now(&mut self) {
        self.finished = true;
        if let Some(task) = self.sending.take() {
            task.abort();
            if let Ok((session, _)) = task.await {
                self.session = session;
            }
        }
        self.client.delete_session(&self.repo, &self.session).await;
    }
}

impl Drop for Upload {
    /// An upload dropped without commit or cancel (its writer went away): stop the PATCH
    /// in flight and cancel the session in the background, if a runtime is there.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(task) = self.sending.take() {
            task.abort();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!(repo = %self.repo, "upload dropped outside a runtime; not cancelled");
            return;
        };
        let client = self.client.clone();
        let repo = self.repo.clone();
        let session = self.session.clone();
        runtime.spawn(async move { client.delete_session(&repo, &session).await });
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

    /// The filesystem keeps uploads in handles and drives them from tokio tasks.
    #[allow(dead_code)]
    fn uploads_can_move_between_tasks(mut upload: Upload, client: RegistryClient, d: Digest) {
        fn send<T: Send>(_: &T) {}
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&upload);
        send(&upload.append(b""));
        send(&client.mount_blob(upload.repo(), &d, upload.repo()));
        send(&upload.commit(Some(&d)));
    }

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
