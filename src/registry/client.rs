//! RegistryClient: the Distribution API of one registry as the rest of regfs sees it,
//! and the router over its hosts. Content-addressed reads (blobs, manifests by digest,
//! and their HEADs) go to each mirror that may serve them, once, then to the origin with
//! retries; tag reads, lists and every write go to the origin only (docs/SEMANTICS.md,
//! "Mirrors"). What each call sends is in api/, one host's connection in host/.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tracing::warn;
use url::Url;

use super::api::blobs::BlobBody;
use super::api::manifests::FetchedManifest;
use super::api::referrers::Referrer;
use super::api::uploads::{MountOutcome, Upload};
use super::error::{Error, Result};
use super::host::{ClientOptions, Host, HostShape};
use super::mirrors::{MirrorSpec, Mirrors};
use super::types::{Digest, Reference, RepoName, Tag};
use crate::stats::Stats;

/// Where src/fs reads the manifest size bound from.
pub use super::api::manifests::MAX_MANIFEST_BYTES;

/// `copy_blob` reads the source blob in pieces of this size.
const COPY_PIECE: u64 = 4 << 20;

#[derive(Clone)]
pub struct RegistryClient {
    origin: Arc<Host>,
    /// The mirrors content-addressed reads try first (none for writes).
    mirrors: Arc<Mirrors>,
}

impl RegistryClient {
    pub fn new(base: Url, options: ClientOptions, stats: Arc<Stats>) -> Result<RegistryClient> {
        let origin = Host::new(base, options, stats, HostShape::origin())?;
        Ok(RegistryClient {
            origin: Arc::new(origin),
            mirrors: Arc::new(Mirrors::none()),
        })
    }

    /// This client with `mirrors` in front of it for content-addressed reads.
    pub fn with_mirrors(self, mirrors: Vec<MirrorSpec>) -> Result<RegistryClient> {
        let mirrors = Mirrors::new(&self.origin, mirrors)?;
        Ok(RegistryClient {
            origin: self.origin,
            mirrors: Arc::new(mirrors),
        })
    }

    /// The same registry without its mirrors: for writes, and the reads that decide
    /// them, which must see the origin.
    pub fn origin_only(&self) -> RegistryClient {
        RegistryClient {
            origin: self.origin.clone(),
            mirrors: Arc::new(Mirrors::none()),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        self.origin.stats()
    }

    pub fn options(&self) -> &ClientOptions {
        self.origin.options()
    }

    pub fn base(&self) -> &Url {
        self.origin.base()
    }

    /// The origin as stats and logs name it.
    pub fn host_name(&self) -> String {
        self.origin.name()
    }

    /// Whether some mirror may still be asked for `digest`.
    pub fn mirrors_may_serve(&self, digest: &Digest) -> bool {
        self.mirrors.usable(digest).next().is_some()
    }

    /// The content of `digest` turned out wrong, and may have come from a mirror: no
    /// mirror is asked for it again. True if one could have served it (so reading it
    /// again, from the origin, may give other bytes).
    pub fn distrust_mirrors(&self, digest: &Digest) -> bool {
        let mut any = false;
        for mirror in self.mirrors.usable(digest) {
            warn!(
                "{digest}: content does not match its digest; it is read from the origin from now on (mirror {})",
                mirror.name()
            );
            mirror.skip(digest);
            any = true;
        }
        any
    }

    /// `op` on each mirror that may serve `digest`, in order, then on the origin (with
    /// retries). Only for reads of content named by `digest`, which `op` checks.
    async fn content_read<'a, T>(
        &'a self,
        digest: &Digest,
        op: impl Fn(&'a Host) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        let patience = self.mirrors.patience();
        for mirror in self.mirrors.usable(digest) {
            let answer = tokio::time::timeout(patience, op(mirror.host())).await;
            let e = match answer {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => e,
                Err(_) => {
                    Error::Unavailable(format!("no answer within {} ms", patience.as_millis()))
                }
            };
            mirror.passed_on(digest, &e);
        }
        let origin: &'a Host = &self.origin;
        origin.retrying(|| op(origin)).await
    }

    /// A read of what `reference` names: by digest like [`Self::content_read`] (a mirror
    /// may answer); by tag from the origin only, retried (a tag's answer changes).
    async fn reference_read<'a, T>(
        &'a self,
        reference: &Reference,
        op: impl Fn(&'a Host) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        match reference {
            Reference::Digest(digest) => self.content_read(digest, op).await,
            Reference::Tag(_) => {
                let origin: &'a Host = &self.origin;
                origin.retrying(|| op(origin)).await
            }
        }
    }

    /// The whole blob from the first mirror that serves it right, in pieces of `piece`
    /// bytes, hashed before anything of it is handed out; None when no mirror did
    /// (each that failed is passed over as in [`Self::content_read`]). For blobs small
    /// enough to hold whole: nothing from a mirror is served unchecked.
    pub async fn verified_from_mirror(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        piece: usize,
    ) -> Option<Vec<Bytes>> {
        // The whole transfer, not only its start, is bounded: a reader waits for it.
        let limit = self.options().total_timeout / 2;
        for mirror in self.mirrors.usable(digest) {
            let fetch =
                mirror
                    .host()
                    .verified_blob(repo, digest, size, piece, self.mirrors.patience());
            let fetched = tokio::time::timeout(limit, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Unavailable("the blob did not arrive in time".into()))
                });
            match fetched {
                Ok(pieces) => return Some(pieces),
                Err(e) => mirror.passed_on(digest, &e),
            }
        }
        None
    }

    /// `GET /v2/` on the origin: does it look like a registry? 401 counts: it answers,
    /// and wants auth. Not retried: a mount should fail fast when nothing answers.
    pub async fn ping(&self) -> Result<()> {
        self.origin.ping().await
    }

    /// Opens a connection for blob reads on the origin before the first read needs it.
    pub async fn warm_blob_client(&self) {
        self.origin.warm_blob_client().await;
    }

    /// All repositories in the catalog, in the registry's order.
    pub async fn catalog(&self) -> Result<Vec<RepoName>> {
        self.origin.catalog().await
    }

    /// All tags of a repository.
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        self.origin.tags(repo).await
    }

    /// GET a manifest by tag or digest. The bytes are checked: against the digest asked
    /// for, and against `Docker-Content-Digest` when the registry sends one.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<FetchedManifest> {
        self.reference_read(reference, |host| {
            Box::pin(host.get_manifest_once(repo, reference))
        })
        .await
    }

    /// HEAD a manifest: its digest and size without the body.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, u64)> {
        self.reference_read(reference, |host| {
            Box::pin(host.head_manifest_once(repo, reference))
        })
        .await
    }

    /// PUT a manifest by tag or digest to the origin (api/manifests.rs): the digest it
    /// was stored under, checked against the body.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: Bytes,
    ) -> Result<Digest> {
        self.origin.put_manifest(repo, reference, body).await
    }

    /// HEAD a blob: its exact size.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.content_read(digest, |host| Box::pin(host.head_blob_once(repo, digest)))
            .await
    }

    /// Reads exactly `len` bytes of a blob from `offset`, retrying transient failures
    /// (a dropped connection mid-body included). A GET the registry redirects (to
    /// object storage or a CDN) is followed, and the resolved URL is reused for later
    /// ranges of the same blob until it fails or expires.
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
            Box::pin(host.stream_blob_once(repo, digest, offset))
        })
        .await
    }

    /// Opens an upload session in `repo` on the origin (POST, 202 + `Location`).
    pub async fn start_upload(&self, repo: &RepoName) -> Result<Upload> {
        self.origin.start_upload(repo).await
    }

    /// Mounts blob `digest` of repository `from` into `repo` (POST `?mount=&from=`).
    /// When the registry declines (202), the session it opened instead comes back.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: &RepoName,
    ) -> Result<MountOutcome> {
        self.origin.mount_blob(repo, digest, from).await
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

    /// Deletes a manifest by digest, or a tag, on the origin (api/deletes.rs).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        self.origin.delete_manifest(repo, reference).await
    }

    /// Unlinks a blob from a repository on the origin.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.origin.delete_blob(repo, digest).await
    }

    /// `GET /v2/<name>/referrers/<digest>` on the origin, every page: the referrers, or
    /// None when the registry has no referrers API (404).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Option<Vec<Referrer>>> {
        self.origin.referrers(repo, subject).await
    }
}
