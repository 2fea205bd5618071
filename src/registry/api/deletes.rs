//! Deletes (`ManifestService.Delete`, `TagStore.Untag`, `BlobDeleter.Delete` of the
//! Distribution API): `DELETE /v2/<name>/manifests/<reference>` and
//! `DELETE /v2/<name>/blobs/<digest>`. What may be deleted is decided by the
//! filesystem (docs/SEMANTICS.md, "Deletes"); this only sends the request and reads the
//! answer.

use std::sync::atomic::{AtomicU32, Ordering};

use reqwest::{Method, StatusCode};
use tracing::info;

use crate::registry::error::Result;
use crate::registry::host::{Host, answer};
use crate::registry::types::{Digest, Reference, RepoName};
use crate::stats::RequestKind;

impl Host {
    /// Deletes a manifest by digest, or a tag (where the registry supports deleting by
    /// tag: distribution 2.8 answers 400 `DIGEST_INVALID`, which is
    /// [`Error::NotPermitted`] like every other refusal).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.delete(&path).await?;
        info!(%repo, %reference, "manifest deleted");
        Ok(())
    }

    /// Unlinks a blob from a repository.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.delete(&format!("/v2/{repo}/blobs/{digest}")).await?;
        info!(%repo, %digest, "blob deleted");
        Ok(())
    }

    /// One DELETE, retried after transient failures. A retry that finds the object
    /// gone is a success: the attempt before it may have deleted it and lost the answer.
    async fn delete(&self, path: &str) -> Result<()> {
        let what = format!("DELETE {path}");
        let url = self.url(path)?;
        let attempts = AtomicU32::new(0);
        self.retrying(|| async {
            let retry = attempts.fetch_add(1, Ordering::Relaxed) > 0;
            let _in_flight = self.stats().request(RequestKind::Delete);
            let req = self.request(Method::DELETE, url.clone());
            let resp = self.send(&what, req).await?;
            match resp.status() {
                StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
                StatusCode::NOT_FOUND if retry => Ok(()),
                _ => Err(answer::delete_error(&what, resp).await),
            }
        })
        .await
    }
}
