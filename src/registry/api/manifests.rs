//! Manifests: GET and HEAD by tag or digest (one attempt each: the client routes and
//! retries them), PUT by tag or digest. Every manifest is checked against its digest.

use bytes::Bytes;
use reqwest::header;
use reqwest::{Method, StatusCode};
use tracing::info;

use crate::registry::error::{Error, Result};
use crate::registry::host::headers::{content_length, digest_header, header_str};
use crate::registry::host::{Host, answer};
use crate::registry::types::{Digest, Reference, RepoName, media_type};
use crate::stats::RequestKind;

/// Manifests larger than this are refused: the distribution spec lets registries cap
/// them at 4 MiB, and nothing legitimate comes close.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A manifest as served, with the digest it was verified against.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

impl Host {
    fn manifest_request(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<reqwest::RequestBuilder> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        Ok(self
            .request(method, url)
            .header(header::ACCEPT, media_type::ACCEPT_MANIFESTS))
    }

    /// One GET of a manifest. The bytes are checked: against the digest asked for, and
    /// against `Docker-Content-Digest` when the registry sends one.
    pub async fn get_manifest_once(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<FetchedManifest> {
        let what = format!("GET /v2/{repo}/manifests/{reference}");
        let _in_flight = self.stats().request(RequestKind::Manifest);
        let req = self.manifest_request(Method::GET, repo, reference)?;
        let resp = self.send(&what, req).await?;
        if !resp.status().is_success() {
            return Err(answer::error(&what, resp).await);
        }
        let media_type = header_str(resp.headers(), "content-type")
            .unwrap_or_default()
            .to_owned();
        let header_digest = digest_header(&what, resp.headers())?;
        let bytes = answer::body(&what, resp, MAX_MANIFEST_BYTES).await?;
        let digest = match (reference, header_digest) {
            (Reference::Digest(d), _) => d.clone(),
            (Reference::Tag(_), Some(d)) => d,
            // Without the header, the canonical digest is the sha256 of what was served.
            (Reference::Tag(_), None) => Digest::sha256_of(&bytes),
        };
        if !digest.matches(&bytes) {
            return Err(Error::BadAnswer(format!(
                "{what}: body does not hash to {digest}"
            )));
        }
        Ok(FetchedManifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// One HEAD of a manifest: its digest and size without the body.
    pub async fn head_manifest_once(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, u64)> {
        let what = format!("HEAD /v2/{repo}/manifests/{reference}");
        let _in_flight = self.stats().request(RequestKind::Manifest);
        let req = self.manifest_request(Method::HEAD, repo, reference)?;
        let resp = self.send(&what, req).await?;
        if !resp.status().is_success() {
            return Err(answer::head_error(&what, &resp));
        }
        let size = content_length(resp.headers())
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Content-Length")))?;
        let digest = match (digest_header(&what, resp.headers())?, reference) {
            (Some(d), Reference::Digest(asked)) if d != *asked => {
                return Err(Error::BadAnswer(format!(
                    "{what}: registry answered for {d}"
                )));
            }
            (Some(d), _) => d,
            (None, Reference::Digest(asked)) => asked.clone(),
            (None, Reference::Tag(_)) => {
                return Err(Error::BadAnswer(format!(
                    "{what}: no Docker-Content-Digest"
                )));
            }
        };
        Ok((digest, size))
    }

    /// PUT a manifest by tag or digest. The Content-Type is the manifest's `mediaType`,
    /// or its detected kind; the body must hash to a digest reference. Returns the
    /// digest the registry stored it under, checked against the body. A PUT of the same
    /// bytes to the same reference is idempotent, so transient failures are retried.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: Bytes,
    ) -> Result<Digest> {
        let what = format!("PUT /v2/{repo}/manifests/{reference}");
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(Error::Invalid(format!(
                "{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let content_type =
            media_type::of_manifest(&body).map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
        let digest = match reference {
            Reference::Digest(d) if d.matches(&body) => d.clone(),
            Reference::Digest(_) => {
                return Err(Error::Mismatch(format!(
                    "{what}: the manifest's content has digest {}",
                    Digest::sha256_of(&body)
                )));
            }
            Reference::Tag(_) => Digest::sha256_of(&body),
        };
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        self.retrying(|| async {
            let _in_flight = self.stats().request(RequestKind::ManifestPut);
            let req = self
                .request(Method::PUT, url.clone())
                .header(header::CONTENT_TYPE, content_type.as_str())
                .body(body.clone());
            let resp = self.send(&what, req).await?;
            if resp.status() != StatusCode::CREATED {
                return Err(answer::write_error(&what, resp).await);
            }
            match digest_header(&what, resp.headers())? {
                Some(stored) if stored != digest => Err(Error::Mismatch(format!(
                    "{what}: the registry stored it as {stored}, its content is {digest}"
                ))),
                _ => Ok(()),
            }
        })
        .await?;
        info!(%repo, %reference, %digest, bytes = body.len(), "manifest pushed");
        Ok(digest)
    }
}
