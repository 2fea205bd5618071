//! An upload of one blob, as the filesystem drives it: bytes appended, sent a chunk at
//! a time in the background, committed or cancelled; and a cross-repository mount,
//! which may come back as an upload when the registry declines it.

use std::mem;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::session::{Opened, Session};
use crate::registry::error::{Error, Result};
use crate::registry::host::Host;
use crate::registry::types::{Digest, DigestHasher, RepoName};
use crate::stats::RequestKind;

/// The most a registry can make one upload hold per chunk with `OCI-Chunk-Min-Length`
/// (an upload holds about two chunks).
const MAX_CHUNK_SIZE: usize = 256 << 20;

/// Outcome of a cross-repository mount (`RegistryClient::mount_blob`).
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
    /// The origin: every request of a session goes there.
    host: Arc<Host>,
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

impl Host {
    /// Opens an upload session in `repo` (POST, 202 + `Location`).
    pub async fn start_upload(self: &Arc<Self>, repo: &RepoName) -> Result<Upload> {
        let what = format!("POST /v2/{repo}/blobs/uploads/");
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let opened = self
            .open_session(&what, RequestKind::UploadStart, &url)
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
        self: &Arc<Self>,
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
            .open_session(&what, RequestKind::BlobMount, &url)
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

    fn upload(
        self: &Arc<Self>,
        repo: &RepoName,
        session: Session,
        min_chunk: Option<usize>,
    ) -> Upload {
        let asked = self.options().chunk_size.max(1);
        let mut chunk_size = min_chunk.map_or(asked, |min| asked.max(min));
        if chunk_size > MAX_CHUNK_SIZE {
            warn!(%repo, asked = chunk_size, "chunk size capped at {MAX_CHUNK_SIZE} bytes");
            chunk_size = MAX_CHUNK_SIZE;
        }
        info!(%repo, chunk_size, "upload started");
        Upload {
            host: self.clone(),
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
            self.host
                .send_chunk(&self.repo, &mut self.session, &last, start)
                .await?;
        }
        self.host
            .commit_session(&self.repo, &mut self.session, &digest, self.appended)
            .await?;
        Ok(digest)
    }

    /// Waits for the previous chunk's PATCH (one in flight at most), then sends `chunk`.
    async fn send_in_background(&mut self, chunk: Bytes) -> Result<()> {
        self.wait_sent().await?;
        let host = self.host.clone();
        let repo = self.repo.clone();
        let mut session = self.session.clone();
        let start = session.confirmed;
        self.sending = Some(tokio::spawn(async move {
            let result = host.send_chunk(&repo, &mut session, &chunk, start).await;
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
        self.host.delete_session(&self.repo, &self.session).await;
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
        let host = self.host.clone();
        let repo = self.repo.clone();
        let session = self.session.clone();
        runtime.spawn(async move { host.delete_session(&repo, &session).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filesystem keeps uploads in handles and drives them from tokio tasks.
    #[allow(dead_code)]
    fn uploads_can_move_between_tasks(mut upload: Upload, host: Arc<Host>, d: Digest) {
        fn send<T: Send>(_: &T) {}
        fn shared<T: Send + Sync>(_: &T) {}
        shared(&upload);
        send(&upload.append(b""));
        send(&host.mount_blob(upload.repo(), &d, upload.repo()));
        send(&upload.commit(Some(&d)));
    }
}
