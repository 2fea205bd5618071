//! The registry API by hand (plain HTTP, no regfs code): what the tests push before a
//! mount, and what they check in the registry after one.

use std::net::SocketAddr;

use super::Registry;
use crate::common::http::{header, http, http_get};
use crate::common::{MANIFEST_ACCEPT, OCI_MANIFEST, sha256_digest};

/// GET a manifest → (digest from Docker-Content-Digest, media type, bytes). Panics unless 200.
pub fn get_manifest(registry: &Registry, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    get_manifest_at(registry.addr, repo, reference)
}

/// [`get_manifest`] against any address (a registry or a [`Proxy`]).
pub fn get_manifest_at(addr: SocketAddr, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = http(addr, "GET", &path, &[("Accept", MANIFEST_ACCEPT)], &[]);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    let digest = r
        .header("docker-content-digest")
        .unwrap_or_else(|| panic!("GET {path}: no Docker-Content-Digest"))
        .to_string();
    let media_type = r.header("content-type").unwrap_or("").to_string();
    (digest, media_type, r.body)
}

/// PUT a manifest under a tag or digest; returns the digest the registry computed.
pub fn put_manifest(
    registry: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let r = http(
        registry.addr,
        "PUT",
        &path,
        &[("Content-Type", media_type)],
        body,
    );
    assert_eq!(r.status, 201, "PUT {path}: {}", r.text());
    r.header("docker-content-digest")
        .unwrap_or_else(|| panic!("PUT {path}: no Docker-Content-Digest"))
        .to_string()
}

/// Status of `HEAD /v2/<repo>/blobs/<digest>` at `addr` (a registry or a [`Proxy`]).
pub fn blob_status(addr: SocketAddr, repo: &str, digest: &str) -> u16 {
    http(
        addr,
        "HEAD",
        &format!("/v2/{repo}/blobs/{digest}"),
        &[],
        &[],
    )
    .status
}

/// Status of `HEAD /v2/<repo>/manifests/<reference>` at `addr`.
pub fn manifest_status(addr: SocketAddr, repo: &str, reference: &str) -> u16 {
    let path = format!("/v2/{repo}/manifests/{reference}");
    http(addr, "HEAD", &path, &[("Accept", MANIFEST_ACCEPT)], &[]).status
}

/// Monolithic blob upload (POST, then PUT `?digest=` with the whole body), as `curl -T`
/// would do it; returns the digest. Panics unless the registry answers 201.
pub fn push_blob(addr: SocketAddr, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let start = http(
        addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        &[],
    );
    assert_eq!(start.status, 202, "POST upload to {repo}: {}", start.text());
    let location = start
        .header("location")
        .unwrap_or_else(|| panic!("POST upload to {repo}: no Location"));
    // Absolute (distribution 2.8) or relative: keep the path and query only.
    let target = match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_string(),
        None => location.to_string(),
    };
    let separator = if target.contains('?') { '&' } else { '?' };
    let put = http(
        addr,
        "PUT",
        &format!("{target}{separator}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    );
    assert_eq!(
        put.status,
        201,
        "PUT blob {digest} to {repo}: {}",
        put.text()
    );
    digest
}

/// A one-config image (no layers) pushed with plain HTTP: enough to make `repo` exist with
/// a tag. Returns (manifest digest, config digest); `seed` makes the config unique.
pub fn push_tiny_image(registry: &Registry, repo: &str, tag: &str, seed: u32) -> (String, String) {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": { "Labels": { "seed": seed.to_string() } },
    });
    let config = serde_json::to_vec(&config).expect("serialize config");
    let config_digest = push_blob(registry.addr, repo, &config);
    let manifest = oci_manifest(&config_digest, config.len(), &[]);
    let digest = put_manifest(registry, repo, tag, OCI_MANIFEST, &manifest);
    (digest, config_digest)
}

/// An image over `layers` (raw bytes, pushed as they are) pushed with plain HTTP as
/// `repo:tag`. Returns (manifest digest, layer digests).
pub fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[&[u8]],
) -> (String, Vec<String>) {
    let (manifest, digests) = image_manifest(registry, repo, tag, layers);
    let digest = put_manifest(registry, repo, tag, OCI_MANIFEST, &manifest);
    (digest, digests)
}

/// [`push_image`] without a tag (pushed by digest); `label` makes it unique. Returns
/// (manifest digest, manifest bytes).
pub fn push_untagged_image(
    registry: &Registry,
    repo: &str,
    label: &str,
    layers: &[&[u8]],
) -> (String, Vec<u8>) {
    let (manifest, _) = image_manifest(registry, repo, label, layers);
    let digest = put_manifest(
        registry,
        repo,
        &sha256_digest(&manifest),
        OCI_MANIFEST,
        &manifest,
    );
    (digest, manifest)
}

/// Pushes the blobs of an image (a config labelled `label`, and `layers`); returns the
/// manifest over them, and the layer digests.
fn image_manifest(
    registry: &Registry,
    repo: &str,
    label: &str,
    layers: &[&[u8]],
) -> (Vec<u8>, Vec<String>) {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": { "Labels": { "tag": label } },
    });
    let config = serde_json::to_vec(&config).expect("serialize config");
    let config_digest = push_blob(registry.addr, repo, &config);
    let digests: Vec<String> = layers
        .iter()
        .map(|l| push_blob(registry.addr, repo, l))
        .collect();
    let described: Vec<(&str, usize)> = digests
        .iter()
        .zip(layers)
        .map(|(d, l)| (d.as_str(), l.len()))
        .collect();
    (
        oci_manifest(&config_digest, config.len(), &described),
        digests,
    )
}

/// The bytes of an OCI image manifest over a config and layers (digest, size).
pub fn oci_manifest(config_digest: &str, config_size: usize, layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": size,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    });
    serde_json::to_vec(&manifest).expect("serialize manifest")
}

/// GET a whole blob; panics unless 200.
pub fn get_blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let path = format!("/v2/{repo}/blobs/{digest}");
    let r = http(registry.addr, "GET", &path, &[], &[]);
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.body
}

/// Every repository in the catalog, following the `Link: <…>; rel="next"` pages
/// (distribution 2.8 refuses `n` > 1000 with 400 PAGINATION_NUMBER_INVALID).
pub fn catalog(registry: &Registry) -> Vec<String> {
    let mut repositories = Vec::new();
    let mut next = Some("/v2/_catalog?n=1000".to_string());
    while let Some(path) = next {
        let (status, headers, body) = http_get(registry.addr, &path);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        repositories.extend(json_strings(&body, "repositories"));
        next = header(&headers, "link").and_then(next_link);
    }
    repositories
}

/// The URL of a `Link: <URL>; rel="next"` header.
pub fn next_link(link: &str) -> Option<String> {
    let (url, params) = link.trim().strip_prefix('<')?.split_once('>')?;
    params.contains("rel=\"next\"").then(|| url.to_string())
}

/// The tags of a repository (distribution 2.8 returns them all, in no particular order).
pub fn tags(registry: &Registry, repo: &str) -> Vec<String> {
    let path = format!("/v2/{repo}/tags/list");
    let (status, _, body) = http_get(registry.addr, &path);
    assert_eq!(
        status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&body)
    );
    json_strings(&body, "tags")
}

/// The strings in array `key` of a JSON object (a null or missing array is empty).
pub fn json_strings(body: &[u8], key: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    value[key]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Splits "team/app:v1" (or "team/app@sha256:…") into repository and reference.
pub fn split_reference(dest: &str) -> (&str, &str) {
    if let Some((repo, digest)) = dest.split_once('@') {
        return (repo, digest);
    }
    match dest.rfind(':') {
        Some(i) if !dest[i..].contains('/') => (&dest[..i], &dest[i + 1..]),
        _ => (dest, "latest"),
    }
}
