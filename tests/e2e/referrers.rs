//! Referrers through the kernel (docs/SEMANTICS.md, "Referrers"; issue 13):
//! `<repo>/.referrers/<digest>/` against docker-registry 2.8, which has no referrers API,
//! so the referrers tag schema (`sha256-<hex>`) is the way; artifacts pushed with plain
//! HTTP as oras does (the manifest, then the fallback index), or written through the mount,
//! which keeps that index current; an rsync backup restored into an empty registry keeps
//! the signature findable; and the API path, with the fault proxy answering as the spec
//! shapes it.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    Mount, OCI_INDEX, OCI_MANIFEST, Proxy, ProxyRules, Registry, Response, Tamper, assert_success,
    get_manifest, get_manifest_at, http, ls, manifest_status, push_blob, push_tiny_image,
    put_manifest, sha256_digest,
};

const SIGNATURE: &str = "application/vnd.example.signature.v1+json";
const SBOM: &str = "application/spdx+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// An artifact whose `subject` is a manifest: its blobs, its manifest bytes, its digest.
struct Artifact {
    payload: Vec<u8>,
    manifest: Vec<u8>,
    digest: String,
    artifact_type: &'static str,
}

impl Artifact {
    /// An artifact of `artifact_type` carrying `payload`, about `subject` (digest, size).
    fn new(artifact_type: &'static str, payload: &[u8], subject: (&str, usize)) -> Artifact {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": { "mediaType": EMPTY, "digest": sha256_digest(b"{}"), "size": 2 },
            "layers": [{
                "mediaType": "application/octet-stream",
                "digest": sha256_digest(payload),
                "size": payload.len(),
            }],
            "subject": { "mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1 },
            "annotations": { "org.opencontainers.image.created": "2026-12-02T00:00:00Z" },
        });
        let manifest = serde_json::to_vec(&manifest).expect("serialize artifact");
        Artifact {
            payload: payload.to_vec(),
            digest: sha256_digest(&manifest),
            manifest,
            artifact_type,
        }
    }

    /// Its descriptor in a referrers index.
    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.digest,
            "size": self.manifest.len(),
            "artifactType": self.artifact_type,
        })
    }

    /// Writes its blobs (the empty config, the payload) through the mount into `repo`.
    fn write_blobs(&self, mnt: &Mount, repo: &str) {
        for blob in [&b"{}"[..], &self.payload] {
            let name = format!("{repo}/blobs/{}", sha256_digest(blob));
            write_through(&mnt.path(&name), blob);
        }
    }

    /// Pushes its blobs and manifest (by digest) with plain HTTP, as oras does.
    fn push(&self, addr: SocketAddr, repo: &str) {
        push_blob(addr, repo, b"{}");
        push_blob(addr, repo, &self.payload);
        let path = format!("/v2/{repo}/manifests/{}", self.digest);
        let r = http(
            addr,
            "PUT",
            &path,
            &[("Content-Type", OCI_MANIFEST)],
            &self.manifest,
        );
        assert_eq!(r.status, 201, "PUT {path}: {}", r.text());
    }
}

/// The referrers index over `artifacts`, as the API answers and the fallback tag holds.
fn referrers_index(artifacts: &[&Artifact]) -> Vec<u8> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": artifacts.iter().map(|a| a.descriptor()).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&index).expect("serialize referrers index")
}

/// digest → artifactType of `artifacts`, as a listing shows them.
fn by_type(artifacts: &[&Artifact]) -> BTreeMap<String, String> {
    artifacts
        .iter()
        .map(|a| (a.digest.clone(), a.artifact_type.to_string()))
        .collect()
}

/// The referrers tag schema's tag for `digest`.
fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// What the fallback index of `subject` lists at the registry: digest → artifactType.
fn fallback_listing(addr: SocketAddr, repo: &str, subject: &str) -> BTreeMap<String, String> {
    if manifest_status(addr, repo, &fallback_tag(subject)) == 404 {
        return BTreeMap::new();
    }
    let (_, media_type, body) = get_manifest_at(addr, repo, &fallback_tag(subject));
    assert_eq!(media_type, OCI_INDEX, "the fallback tag is an OCI index");
    listing(&body)
}

/// digest → artifactType of a referrers index.
fn listing(index: &[u8]) -> BTreeMap<String, String> {
    let index: serde_json::Value = serde_json::from_slice(index).expect("a referrers index");
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().expect("digest").to_string(),
                d["artifactType"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// What `.referrers/<subject>/` shows: its links (digest → artifactType from its
/// index.json), after checking that each link leads to the referrer's manifest.
fn referrers_seen(mnt: &Mount, repo: &str, subject: &str) -> BTreeMap<String, String> {
    let dir = mnt.path(&format!("{repo}/.referrers/{subject}"));
    let index = fs::read(dir.join("index.json")).expect("read .referrers/<d>/index.json");
    let listed = listing(&index);
    let mut links = ls(&dir);
    links.retain(|n| n != "index.json");
    assert_eq!(
        links,
        listed.keys().cloned().collect::<Vec<_>>(),
        "links vs index.json"
    );
    for digest in &links {
        let link = dir.join(digest);
        assert_eq!(
            fs::read_link(&link).expect("readlink"),
            PathBuf::from(format!("../../manifests/{digest}"))
        );
        let bytes = fs::read(&link).expect("read through the link");
        assert_eq!(
            &sha256_digest(&bytes),
            digest,
            "the link reads the referrer"
        );
    }
    listed
}

/// Writes `bytes` to `path` in the mount; close(2), the commit, must succeed.
fn write_through(path: &Path, bytes: &[u8]) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(bytes).expect("write");
    common::close(file).unwrap_or_else(|e| panic!("close (commit) of {}: {e}", path.display()));
}

fn rsync(from: &Path, to: &Path) {
    let (mut from, mut to) = (from.as_os_str().to_owned(), to.as_os_str().to_owned());
    from.push("/");
    to.push("/");
    let out = Command::new("timeout")
        .args([OsStr::new("-k"), OsStr::new("5"), OsStr::new("300")])
        .args([OsStr::new("rsync"), OsStr::new("-a"), &from, &to])
        .output()
        .expect("run rsync (scripts/setup.sh installs it)");
    assert_success(&out, &format!("rsync -a {from:?} {to:?}"));
}

/// team/app:v1, an image to sign: its digest and manifest size.
fn subject(registry: &Registry) -> (String, usize) {
    let (v1, _) = push_tiny_image(registry, "team/app", "v1", 1);
    (v1.clone(), get_manifest(registry, "team/app", &v1).2.len())
}

/// team/app:v1 with a signature and an SBOM pushed as oras does on a registry without the
/// referrers API: each manifest, then the fallback index naming both.
fn signed(registry: &Registry) -> (String, Artifact, Artifact) {
    let (v1, size) = subject(registry);
    let sig = Artifact::new(SIGNATURE, b"signature of v1", (&v1, size));
    let sbom = Artifact::new(SBOM, br#"{"spdxVersion":"SPDX-2.3"}"#, (&v1, size));
    sig.push(registry.addr, "team/app");
    sbom.push(registry.addr, "team/app");
    put_manifest(
        registry,
        "team/app",
        &fallback_tag(&v1),
        OCI_INDEX,
        &referrers_index(&[&sig, &sbom]),
    );
    (v1, sig, sbom)
}

#[test]
fn referrers_pushed_as_oras_does_are_listed() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, sig, sbom) = signed(&registry);
    let mnt = Mount::start(&registry.url(), &[]);

    // A view: not listed, opens by name.
    assert!(!ls(&mnt.path("team/app")).contains(&".referrers".to_string()));
    assert_eq!(
        referrers_seen(&mnt, "team/app", &v1),
        by_type(&[&sig, &sbom])
    );
    // A manifest without referrers has an empty list; a name that is no digest is not there.
    let (other, _) = push_tiny_image(&registry, "team/app", "v2", 2);
    assert_eq!(referrers_seen(&mnt, "team/app", &other), BTreeMap::new());
    assert!(!mnt.path("team/app/.referrers/v1").exists());

    // Backups see them: manifests/ and blobs/ list the referrers and what they reach.
    let manifests = ls(&mnt.path("team/app/manifests"));
    let blobs = ls(&mnt.path("team/app/blobs"));
    for artifact in [&sig, &sbom] {
        assert!(manifests.contains(&artifact.digest), "{manifests:?}");
        assert!(
            blobs.contains(&sha256_digest(&artifact.payload)),
            "{blobs:?}"
        );
    }
}

#[test]
fn a_referrer_written_through_the_mount_keeps_the_fallback_index_current() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, size) = subject(&registry);
    let mnt = Mount::start(&registry.url(), &["--allow-delete"]);
    let sig = Artifact::new(SIGNATURE, b"signature of v1", (&v1, size));
    let sbom = Artifact::new(SBOM, br#"{"spdxVersion":"SPDX-2.3"}"#, (&v1, size));
    for artifact in [&sig, &sbom] {
        artifact.write_blobs(&mnt, "team/app");
        write_through(
            &mnt.path(&format!("team/app/manifests/{}", artifact.digest)),
            &artifact.manifest,
        );
    }
    // What oras (or cosign) would find at the registry: the fallback index, by curl.
    let both = by_type(&[&sig, &sbom]);
    assert_eq!(fallback_listing(registry.addr, "team/app", &v1), both);
    assert_eq!(referrers_seen(&mnt, "team/app", &v1), both);

    // Deleting a referrer takes it out of the index; the other stays.
    fs::remove_file(mnt.path(&format!("team/app/manifests/{}", sig.digest)))
        .expect("rm manifests/<signature>");
    assert_eq!(manifest_status(registry.addr, "team/app", &sig.digest), 404);
    let sbom_only = by_type(&[&sbom]);
    assert_eq!(fallback_listing(registry.addr, "team/app", &v1), sbom_only);
    assert_eq!(referrers_seen(&mnt, "team/app", &v1), sbom_only);
    assert_eq!(manifest_status(registry.addr, "team/app", "v1"), 200);
}

#[test]
fn an_rsync_backup_restored_into_an_empty_registry_keeps_the_signature() {
    common::require_tools();
    let a = Registry::start();
    let (v1, sig, sbom) = signed(&a);
    let mnt_a = Mount::start(&a.url(), &[]);
    let work = tempfile::Builder::new()
        .prefix("regfs-referrers-")
        .tempdir()
        .expect("temp dir");
    let backup = work.path().join("backup");
    rsync(&mnt_a.path("team/app"), &backup);
    assert!(backup.join("manifests").join(&sig.digest).is_file());

    let b = Registry::start();
    let mnt_b = Mount::start(&b.url(), &[]);
    fs::create_dir_all(mnt_b.path("team/app")).expect("mkdir -p mntB/team/app");
    rsync(&backup, &mnt_b.path("team/app"));
    let both = by_type(&[&sig, &sbom]);
    assert_eq!(fallback_listing(b.addr, "team/app", &v1), both);
    assert_eq!(get_manifest(&b, "team/app", &sig.digest).2, sig.manifest);
    let fresh = Mount::start(&b.url(), &[]);
    assert_eq!(referrers_seen(&fresh, "team/app", &v1), both);
}

#[test]
fn the_referrers_api_is_used_where_the_registry_has_it() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, size) = subject(&registry);
    // Pushed without a fallback index: only the API knows of it.
    let sig = Artifact::new(SIGNATURE, b"signature of v1", (&v1, size));
    sig.push(registry.addr, "team/app");
    let answer = referrers_index(&[&sig]);
    let api_path = format!("/v2/team/app/referrers/{v1}");
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            tamper: Some(Tamper::new(move |method, target, response| {
                let path = target.split('?').next().unwrap_or("");
                if method != "GET" || !path.starts_with("/v2/team/app/referrers/") {
                    return response;
                }
                // The spec's answer: an index, empty where nothing refers.
                let body = if path == api_path {
                    answer.clone()
                } else {
                    referrers_index(&[])
                };
                Response::new(200, &[("Content-Type", OCI_INDEX)], body)
            })),
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &[]);
    let expected = by_type(&[&sig]);
    assert_eq!(referrers_seen(&mnt, "team/app", &v1), expected);
    assert!(proxy.requests_matching(&format!("GET /v2/team/app/referrers/{v1}")) >= 1);
    assert_eq!(
        proxy.requests_matching(&format!("/manifests/{}", fallback_tag(&v1))),
        0,
        "a registry with the API is not asked for the fallback tag"
    );
    // The walk asks the API too, so a backup holds the signature and its blob ...
    assert!(ls(&mnt.path("team/app/manifests")).contains(&sig.digest));
    assert!(ls(&mnt.path("team/app/blobs")).contains(&sha256_digest(&sig.payload)));
    let work = tempfile::Builder::new()
        .prefix("regfs-referrers-")
        .tempdir()
        .expect("temp dir");
    let backup = work.path().join("backup");
    rsync(&mnt.path("team/app"), &backup);

    // ... and restoring it into a registry without the API writes the fallback index.
    let b = Registry::start();
    let mnt_b = Mount::start(&b.url(), &[]);
    fs::create_dir_all(mnt_b.path("team/app")).expect("mkdir -p mntB/team/app");
    rsync(&backup, &mnt_b.path("team/app"));
    assert_eq!(fallback_listing(b.addr, "team/app", &v1), expected);
    assert_eq!(referrers_seen(&mnt_b, "team/app", &v1), expected);
}

#[test]
fn referrers_written_at_once_are_all_in_the_fallback_index() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, size) = subject(&registry);
    let mnt = Mount::start(&registry.url(), &[]);
    let artifacts: Vec<Artifact> = (0..6)
        .map(|n| {
            let payload = format!("signature {n} of v1").into_bytes();
            Artifact::new(SIGNATURE, &payload, (&v1, size))
        })
        .collect();
    for artifact in &artifacts {
        artifact.write_blobs(&mnt, "team/app");
    }
    // Several signers at once (parallel cp): each push reads, changes and writes the
    // one fallback index, and none may undo another's.
    std::thread::scope(|s| {
        for artifact in &artifacts {
            let path = mnt.path(&format!("team/app/manifests/{}", artifact.digest));
            s.spawn(move || write_through(&path, &artifact.manifest));
        }
    });
    let all: Vec<&Artifact> = artifacts.iter().collect();
    assert_eq!(
        fallback_listing(registry.addr, "team/app", &v1),
        by_type(&all)
    );
}
