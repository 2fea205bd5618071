//! Referrers (OCI distribution spec 1.1): manifests whose `subject` names another
//! manifest (signatures, SBOMs, attestations). Found through
//! `GET /v2/<name>/referrers/<digest>`, or, where a registry lacks that API (it
//! answers 404, as distribution 2.8 does), through the referrers tag schema: an index
//! tagged `<alg>-<hex>` that clients keep up to date as they push.

use std::collections::BTreeMap;

use reqwest::header;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::manifests::MAX_MANIFEST_BYTES;
use crate::registry::error::{Error, Result};
use crate::registry::host::headers::{header_str, next_link};
use crate::registry::host::{Host, answer};
use crate::registry::types::{Digest, RepoName, Tag, media_type};
use crate::stats::RequestKind;

/// Pages of one referrers answer followed before it counts as a loop.
const MAX_PAGES: usize = 1000;

/// One referrer, as a descriptor of the referrers index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIndex {
    #[serde(default)]
    manifests: Vec<RawReferrer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReferrer {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// The fields of a manifest that make its referrer descriptor.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    subject: Option<RawSubject>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    media_type: String,
}

#[derive(Deserialize)]
struct RawSubject {
    digest: String,
}

/// The descriptors of a referrers index (the API's answer, or a fallback tag's index).
pub fn parse_index(body: &[u8]) -> std::result::Result<Vec<Referrer>, String> {
    let raw: RawIndex =
        serde_json::from_slice(body).map_err(|e| format!("not a referrers index: {e}"))?;
    raw.manifests
        .into_iter()
        .map(|r| {
            let digest = Digest::parse(&r.digest)
                .ok_or_else(|| format!("referrer with an invalid digest {:?}", r.digest))?;
            Ok(Referrer {
                media_type: r.media_type,
                digest,
                size: r.size,
                artifact_type: r.artifact_type.filter(|t| !t.is_empty()),
                annotations: r.annotations,
            })
        })
        .collect()
}

/// A referrers index over `referrers`, as the API answers and the fallback tag holds.
pub fn index_bytes(referrers: &[Referrer]) -> Vec<u8> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": referrers,
    });
    let mut bytes = serde_json::to_vec_pretty(&index).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// The digest a manifest's `subject` names, if it has a valid one.
pub fn subject_of(body: &[u8]) -> Option<Digest> {
    let raw: RawManifest = serde_json::from_slice(body).ok()?;
    Digest::parse(&raw.subject?.digest)
}

/// A manifest with a `subject` as its subject's referrers list shows it: `artifactType`
/// is the manifest's own, else its config's media type (the spec's rule).
pub fn describe(body: &[u8], digest: &Digest) -> Option<(Digest, Referrer)> {
    let raw: RawManifest = serde_json::from_slice(body).ok()?;
    let subject = Digest::parse(&raw.subject?.digest)?;
    let media_type = media_type::of_manifest(body).ok()?;
    let artifact_type = raw
        .artifact_type
        .filter(|t| !t.is_empty())
        .or_else(|| raw.config.map(|c| c.media_type).filter(|t| !t.is_empty()));
    let referrer = Referrer {
        media_type,
        digest: digest.clone(),
        size: body.len() as u64,
        artifact_type,
        annotations: raw.annotations.filter(|a| !a.is_empty()),
    };
    Some((subject, referrer))
}

/// The referrers tag schema's tag for `subject`: `<alg>-<hex>`, the hex cut to 64
/// characters.
pub fn fallback_tag(subject: &Digest) -> Option<Tag> {
    let hex = subject.encoded();
    let hex = hex.get(..64).unwrap_or(hex);
    Tag::parse(&format!("{}-{hex}", subject.algorithm()))
}

impl Host {
    /// `GET /v2/<name>/referrers/<digest>`, every page: the referrers, or None when the
    /// registry has no referrers API (404).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Option<Vec<Referrer>>> {
        let what = format!("GET /v2/{repo}/referrers/{subject}");
        let mut url = self.url(&format!("/v2/{repo}/referrers/{subject}"))?;
        let mut all = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self
                .retrying(|| async {
                    let _in_flight = self.stats().request(RequestKind::Referrers);
                    let req = self
                        .request(Method::GET, url.clone())
                        .header(header::ACCEPT, media_type::OCI_INDEX);
                    let resp = self.send(&what, req).await?;
                    match resp.status() {
                        StatusCode::NOT_FOUND => Ok(None),
                        s if s.is_success() => {
                            let next = header_str(resp.headers(), "link")
                                .and_then(next_link)
                                .map(str::to_owned);
                            let body = answer::body(&what, resp, MAX_MANIFEST_BYTES).await?;
                            Ok(Some((next, body)))
                        }
                        _ => Err(answer::error(&what, resp).await),
                    }
                })
                .await?;
            let Some((next, body)) = page else {
                return Ok(None);
            };
            all.extend(parse_index(&body).map_err(|e| Error::BadAnswer(format!("{what}: {e}")))?);
            let Some(link) = next else {
                return Ok(Some(all));
            };
            let next_url = url
                .join(&link)
                .map_err(|e| Error::BadAnswer(format!("{what}: invalid Link {link:?}: {e}")))?;
            if next_url.origin() != self.base().origin() || next_url == url {
                return Err(Error::BadAnswer(format!(
                    "{what}: Link points elsewhere or to itself: {next_url}"
                )));
            }
            url = next_url;
        }
        Err(Error::BadAnswer(format!(
            "{what}: more than {MAX_PAGES} pages"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn fallback_tags_follow_the_schema() {
        let d = Digest::parse(&format!("sha256:{HEX}")).expect("valid");
        assert_eq!(
            fallback_tag(&d).map(|t| t.to_string()),
            Some(format!("sha256-{HEX}"))
        );
        let long = Digest::parse(&format!("sha512:{HEX}{HEX}")).expect("valid");
        assert_eq!(
            fallback_tag(&long).map(|t| t.to_string()),
            Some(format!("sha512-{HEX}"))
        );
    }

    #[test]
    fn a_referrer_is_described_as_the_spec_says() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.example.sig","digest":"sha256:{HEX}","size":2}},
               "layers":[],"subject":{{"mediaType":"x","digest":"sha256:{HEX}","size":1}},"annotations":{{"a":"b"}}}}"#,
            media_type::OCI_MANIFEST
        );
        let digest = Digest::sha256_of(body.as_bytes());
        let (subject, r) = describe(body.as_bytes(), &digest).expect("has a subject");
        assert_eq!(subject.encoded(), HEX);
        assert_eq!(
            r.artifact_type.as_deref(),
            Some("application/vnd.example.sig")
        );
        assert_eq!(r.size, body.len() as u64);
        assert_eq!(r.media_type, media_type::OCI_MANIFEST);
        let with_type = body.replacen(
            "{\"schemaVersion\":2,",
            "{\"schemaVersion\":2,\"artifactType\":\"t/x\",",
            1,
        );
        let (_, r) = describe(with_type.as_bytes(), &digest).expect("has a subject");
        assert_eq!(r.artifact_type.as_deref(), Some("t/x"));
        assert!(describe(b"{\"schemaVersion\":2,\"manifests\":[]}", &digest).is_none());
        // What is written can be read back.
        let index = index_bytes(std::slice::from_ref(&r));
        assert_eq!(parse_index(&index), Ok(vec![r]));
        assert!(parse_index(br#"{"manifests":[{"digest":"sha256:zz","size":1}]}"#).is_err());
    }
}
