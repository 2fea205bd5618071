//! Blob uploads, manifest pushes and cross-repository mounts through the registry client
//! (no FUSE), against a real docker-registry, with faults from the test proxy.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    LocationRewrite, OCI_INDEX, OCI_MANIFEST, Proxy, ProxyRules, Registry, blob_status, get_blob,
    get_manifest, http, noise, sha256_digest,
};
use regfs::registry::{
    ClientOptions, Digest, Error, MountOutcome, Reference, RegistryClient, RepoName, Tag,
    parse_registry_url,
};
use regfs::stats::Stats;

const MIB: usize = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A client of `url` with `chunk_size`, and quick retries so that faults end fast.
fn client(url: &str, chunk_size: usize) -> RegistryClient {
    let options = ClientOptions {
        chunk_size,
        max_retries: 3,
        retry_delay: Duration::from_millis(20),
        ..ClientOptions::default()
    };
    let base = parse_registry_url(url).expect("registry URL");
    RegistryClient::new(base, options, Arc::new(Stats::default())).expect("client")
}

fn repo(name: &str) -> RepoName {
    RepoName::parse(name).expect("valid repository name")
}

fn digest(s: &str) -> Digest {
    Digest::parse(s).expect("valid digest")
}

/// Uploads `data` to `repo` in writes of `write` bytes, as a program writing a file would.
async fn upload(client: &RegistryClient, repo: &RepoName, data: &[u8], write: usize) -> Digest {
    let mut upload = client.start_upload(repo).await.expect("start upload");
    for piece in data.chunks(write) {
        upload.append(piece).await.expect("append");
    }
    assert_eq!(upload.len(), data.len() as u64);
    upload.commit(None).await.expect("commit")
}

#[test]
fn uploads_are_served_with_their_digest() {
    common::require_tools();
    let registry = Registry::start();
    let client = client(&registry.url(), 256 << 10);
    let app = repo("team/app");
    let small = noise(MIB, 1);
    let big = noise(300 * MIB, 2);
    let rt = runtime();

    let small_digest = rt.block_on(upload(&client, &app, &small, 100_000));
    assert_eq!(small_digest.as_str(), sha256_digest(&small));
    assert_eq!(
        get_blob(&registry, "team/app", small_digest.as_str()),
        small
    );
    let requests = client.stats().snapshot(0, 0).requests;
    assert_eq!(
        (
            requests.upload_start,
            requests.upload_chunk,
            requests.upload_commit
        ),
        (1, 4, 1),
        "1 MiB in 256 KiB chunks: one POST, four PATCHes, one PUT"
    );

    let client = self::client(&registry.url(), 4 * MIB);
    let big_digest = rt.block_on(upload(&client, &app, &big, MIB));
    assert_eq!(big_digest.as_str(), sha256_digest(&big));
    let head = http(
        registry.addr,
        "HEAD",
        &format!("/v2/team/app/blobs/{big_digest}"),
        &[],
        &[],
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("314572800"));
    assert_eq!(
        head.header("docker-content-digest"),
        Some(big_digest.as_str())
    );
    assert_eq!(client.stats().snapshot(0, 0).requests.upload_chunk, 75);
}

#[test]
fn empty_upload_and_relative_locations() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            upload_locations: Some(LocationRewrite::Relative),
            ..ProxyRules::default()
        },
    );
    let client = client(&proxy.url(), 64 << 10);
    let rt = runtime();
    let data = noise(200_000, 3);
    let digest = rt.block_on(upload(&client, &repo("team/app"), &data, 50_000));
    assert_eq!(get_blob(&registry, "team/app", digest.as_str()), data);
    let empty = rt.block_on(upload(&client, &repo("team/app"), &[], 1));
    assert_eq!(empty.as_str(), sha256_digest(b""));
    assert_eq!(blob_status(registry.addr, "team/app", empty.as_str()), 200);
}

#[test]
fn an_upload_location_on_another_host_is_refused() {
    common::require_tools();
    let registry = Registry::start();
    let elsewhere = Proxy::start_on("127.0.0.2", registry.addr, ProxyRules::default());
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            upload_locations: Some(LocationRewrite::OtherOrigin(elsewhere.url())),
            ..ProxyRules::default()
        },
    );
    let client = client(&proxy.url(), MIB);
    let err = match runtime().block_on(client.start_upload(&repo("team/app"))) {
        Ok(_) => panic!("an upload Location on another host was followed"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("another host"), "{err}");
    assert!(
        elsewhere.requests().is_empty(),
        "nothing may be sent to the other host: {:?}",
        elsewhere.requests()
    );
}

#[test]
fn a_wrong_expected_digest_fails_and_commits_nothing() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let client = client(&proxy.url(), 256 << 10);
    let data = noise(MIB, 4);
    let actual = sha256_digest(&data);
    let claimed = sha256_digest(b"something else");
    let result = runtime().block_on(async {
        let mut upload = client.start_upload(&repo("team/app")).await?;
        upload.append(&data).await?;
        upload.commit(Some(&digest(&claimed))).await
    });
    match result {
        Err(e @ Error::Mismatch(_)) => assert!(e.to_string().contains(&actual), "{e}"),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(blob_status(registry.addr, "team/app", &actual), 404);
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);
    assert_eq!(
        proxy.requests_matching("PUT "),
        0,
        "no commit was attempted"
    );
    assert_eq!(
        proxy.requests_matching("DELETE /v2/team/app/blobs/uploads/"),
        1
    );
}

/// Pushes `bytes` as a blob of `repo`; returns its OCI descriptor.
async fn push_blob(
    client: &RegistryClient,
    repo: &RepoName,
    media_type: &str,
    bytes: &[u8],
) -> serde_json::Value {
    let digest = upload(client, repo, bytes, bytes.len().max(1)).await;
    serde_json::json!({ "mediaType": media_type, "digest": digest.as_str(), "size": bytes.len() })
}

fn tag(s: &str) -> Reference {
    Reference::Tag(Tag::parse(s).expect("valid tag"))
}

#[test]
fn manifests_and_indexes_are_pushed_with_their_media_type() {
    common::require_tools();
    let registry = Registry::start();
    let client = client(&registry.url(), MIB);
    let app = repo("team/app");
    let rt = runtime();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let (config_desc, layer_desc) = rt.block_on(async {
        (
            push_blob(
                &client,
                &app,
                "application/vnd.oci.image.config.v1+json",
                config,
            )
            .await,
            push_blob(
                &client,
                &app,
                "application/vnd.oci.image.layer.v1.tar",
                &noise(3000, 5),
            )
            .await,
        )
    });
    // No mediaType in the body: the kind is detected from its shape.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": config_desc,
        "layers": [layer_desc],
    }))
    .expect("manifest JSON");
    let pushed = rt
        .block_on(client.put_manifest(&app, &tag("v1"), Bytes::from(manifest.clone())))
        .expect("push manifest");
    assert_eq!(pushed.as_str(), sha256_digest(&manifest));
    let (served, media_type, body) = get_manifest(&registry, "team/app", "v1");
    assert_eq!(
        (served.as_str(), media_type.as_str(), &body),
        (pushed.as_str(), OCI_MANIFEST, &manifest)
    );

    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": pushed.as_str(),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
        }],
    }))
    .expect("index JSON");
    let index_digest = digest(&sha256_digest(&index));
    // By digest, then tagged.
    let by_digest = rt
        .block_on(client.put_manifest(
            &app,
            &Reference::Digest(index_digest.clone()),
            Bytes::from(index.clone()),
        ))
        .expect("push index by digest");
    assert_eq!(by_digest, index_digest);
    rt.block_on(client.put_manifest(&app, &tag("multi"), Bytes::from(index.clone())))
        .expect("tag the index");
    let (served, media_type, body) = get_manifest(&registry, "team/app", "multi");
    assert_eq!(
        (served.as_str(), media_type.as_str(), &body),
        (index_digest.as_str(), OCI_INDEX, &index)
    );
    assert_eq!(client.stats().snapshot(0, 0).requests.manifest_put, 3);
}

#[test]
fn a_refused_manifest_carries_the_registry_message() {
    common::require_tools();
    let registry = Registry::start();
    let client = client(&registry.url(), MIB);
    let app = repo("team/app");
    let rt = runtime();
    let config = rt.block_on(push_blob(
        &client,
        &app,
        "application/vnd.oci.image.config.v1+json",
        b"{}",
    ));
    let missing = sha256_digest(b"a layer nobody pushed");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": missing, "size": 21 }],
    }))
    .expect("manifest JSON");
    let err = rt
        .block_on(client.put_manifest(&app, &tag("broken"), Bytes::from(manifest.clone())))
        .expect_err("a manifest naming a missing blob must be refused");
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{err}");
    assert_eq!(
        http(
            registry.addr,
            "GET",
            "/v2/team/app/manifests/broken",
            &[],
            &[]
        )
        .status,
        404
    );
    // A digest reference the body does not hash to: refused before any request.
    let wrong = Reference::Digest(digest(&sha256_digest(b"other")));
    let err = rt
        .block_on(client.put_manifest(&app, &wrong, Bytes::from(manifest)))
        .expect_err("a manifest pushed under another digest");
    assert!(matches!(err, Error::Mismatch(_)), "{err:?}");
    let err = rt
        .block_on(client.put_manifest(&app, &tag("x"), Bytes::from_static(b"not json")))
        .expect_err("not a manifest");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
}

#[test]
fn blobs_mount_across_repositories_or_are_copied() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let client = client(&proxy.url(), 256 << 10);
    let rt = runtime();
    let data = noise(MIB + 12_345, 6);
    let d = rt.block_on(upload(&client, &repo("team/a"), &data, 65_536));

    // The registry mounts what the source repository has: 201.
    let mounted = rt
        .block_on(client.mount_blob(&repo("team/b"), &d, &repo("team/a")))
        .expect("mount");
    assert!(matches!(mounted, MountOutcome::Mounted));
    assert_eq!(blob_status(registry.addr, "team/b", d.as_str()), 200);

    // From a repository without the blob it opens an upload instead: 202, then a copy.
    let declined = rt
        .block_on(client.mount_blob(&repo("team/c"), &d, &repo("team/empty")))
        .expect("mount request");
    let MountOutcome::NotMounted(upload) = declined else {
        panic!("team/empty has no such blob, yet the registry mounted it");
    };
    assert_eq!(blob_status(registry.addr, "team/c", d.as_str()), 404);
    rt.block_on(client.copy_blob(&repo("team/a"), &d, upload))
        .expect("copy");
    assert_eq!(get_blob(&registry, "team/c", d.as_str()), data);

    // A registry that declines mounts altogether: the copy comes from the source.
    proxy.reset_counters();
    let declining = Proxy::start(
        registry.addr,
        ProxyRules {
            decline_mounts: true,
            ..ProxyRules::default()
        },
    );
    let client = self::client(&declining.url(), 256 << 10);
    let outcome = rt
        .block_on(client.mount_blob(&repo("team/d"), &d, &repo("team/a")))
        .expect("mount request");
    let MountOutcome::NotMounted(upload) = outcome else {
        panic!("the proxy declines mounts");
    };
    rt.block_on(client.copy_blob(&repo("team/a"), &d, upload))
        .expect("copy");
    assert_eq!(get_blob(&registry, "team/d", d.as_str()), data);
    let requests = client.stats().snapshot(0, 0).requests;
    assert_eq!((requests.blob_mount, requests.upload_commit), (1, 1));
}

/// Uploads `data` through `proxy` in 1 MiB chunks; returns the outcome and the client.
fn upload_through(proxy: &Proxy, data: &[u8]) -> (regfs::registry::Result<Digest>, RegistryClient) {
    let client = client(&proxy.url(), MIB);
    let result = runtime().block_on(async {
        let mut upload = client.start_upload(&repo("team/app")).await?;
        for piece in data.chunks(128 << 10) {
            upload.append(piece).await?;
        }
        upload.commit(None).await
    });
    (result, client)
}

#[test]
fn patches_cut_in_the_middle_resume_from_the_registry_offset() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            cut_patches: 2,
            ..ProxyRules::default()
        },
    );
    let data = noise(5 * MIB + 777, 7);
    let (result, client) = upload_through(&proxy, &data);
    let d = result.expect("the upload survives two cut PATCHes");
    assert_eq!(d.as_str(), sha256_digest(&data));
    assert_eq!(get_blob(&registry, "team/app", d.as_str()), data);
    assert_eq!(proxy.faults_left(), 0, "both cuts happened");
    assert_eq!(
        proxy.requests_matching("GET /v2/team/app/blobs/uploads/"),
        2,
        "each cut is followed by a status request: {:#?}",
        proxy.requests()
    );
    let stats = client.stats().snapshot(0, 0);
    assert_eq!(stats.requests.upload_status, 2);
    // Resumed, not restarted: only the two cut chunks were sent twice.
    assert_eq!(stats.uploaded_bytes, data.len() as u64 + 2 * MIB as u64);
}

#[test]
fn patches_answered_503_are_resumed_after_retry_after() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            fail_patches: 2,
            ..ProxyRules::default()
        },
    );
    let data = noise(3 * MIB, 8);
    let (result, client) = upload_through(&proxy, &data);
    let d = result.expect("the upload survives two 503s");
    assert_eq!(get_blob(&registry, "team/app", d.as_str()), data);
    assert_eq!(proxy.faults_left(), 0);
    assert_eq!(
        proxy.requests_matching("GET /v2/team/app/blobs/uploads/"),
        2
    );
    assert_eq!(client.stats().snapshot(0, 0).retries, 2);
}

/// Distribution drops an upload session whose stored length moved without the client
/// learning the new `_state` (part of a cut PATCH reached it): that cannot be resumed,
/// and must fail loudly with nothing committed.
#[test]
fn a_session_the_registry_dropped_fails_loudly() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            cut_patches: 1,
            cut_patch_forward: 64 << 10,
            ..ProxyRules::default()
        },
    );
    let data = noise(3 * MIB, 9);
    let (result, _) = upload_through(&proxy, &data);
    let err = result.expect_err("the registry dropped the session");
    assert!(
        err.to_string()
            .contains("no longer knows this upload session"),
        "{err}"
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
}

#[test]
fn a_registry_that_stays_down_fails_the_commit_and_commits_nothing() {
    common::require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let client = client(&proxy.url(), MIB);
    let data = noise(4 * MIB, 10);
    let result = runtime().block_on(async {
        let mut upload = client.start_upload(&repo("team/app")).await?;
        upload.append(&data[..2 * MIB]).await?;
        proxy.set_upstream_down(true);
        // Whichever call meets the failure first reports it; commit surely does.
        upload.append(&data[2 * MIB..]).await?;
        upload.commit(None).await
    });
    let err = result.expect_err("the registry is down");
    assert!(err.to_string().contains("gave up after 3 retries"), "{err}");
    proxy.set_upstream_down(false);
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
    assert_eq!(proxy.requests_matching("PUT "), 0, "no commit was sent");
}
