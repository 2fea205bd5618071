//! A registry that lies: one real registry holds a repository per case, and the
//! harness's proxy in front of it rewrites that case's answers (sizes, ranges, digests,
//! lengths, JSON, links, redirects, media types, index cycles and depth). Case by case
//! the test asserts what a program sees (the errno, or the right bytes), that the log
//! names the problem, and at the end that the daemon is alive, still reads right bytes
//! and stayed within bounded memory.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{
    ANNOUNCE_LENGTH, Mount, OCI_INDEX, OCI_MANIFEST, Proxy, ProxyRules, Registry, Response, Tamper,
    ls, noise, proc_status_kib, push_image, push_tiny_image, push_untagged_image, put_manifest,
    sha256_digest,
};

/// What the proxy does to the answers of one case.
#[derive(Clone)]
enum Lie {
    /// HEAD of this blob says it is this much larger.
    HeadSize(String, u64),
    /// 206 answers to GETs of this blob say they start 5 bytes further on.
    ContentRange(String),
    /// GETs of this manifest reference name another (valid) digest.
    DigestHeader(String),
    /// GETs of this blob announce their length, then send half and hang up.
    ShortBody(String),
    /// The tag list of this repository is this body (status 200).
    TagList(Vec<u8>),
    /// The tag list of this repository links its next page to this URL.
    NextPage(String),
    /// GETs of this blob are redirected to this URL.
    Redirect(String, String),
    /// GETs of this manifest reference are redirected to this URL.
    ManifestRedirect(String, String),
    /// GETs of this manifest reference come with this Content-Type.
    ContentType(String, String),
    /// GETs of this manifest reference are answered with these bytes.
    ManifestBody(String, Vec<u8>),
}

/// Which lie applies to a request: the case whose key its path contains.
fn tamper(lies: Arc<HashMap<&'static str, Lie>>) -> Tamper {
    Tamper::new(move |method, target, mut response| {
        let path = target.split('?').next().unwrap_or("");
        let Some(lie) = lies
            .iter()
            .find(|(repo, _)| path.starts_with(&format!("/v2/{repo}/")))
            .map(|(_, lie)| lie)
        else {
            return response;
        };
        match lie {
            Lie::HeadSize(digest, extra) if method == "HEAD" && path.ends_with(digest) => {
                let real: u64 = response
                    .header("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                response.set_header("Content-Length", &(real + extra).to_string());
            }
            Lie::ContentRange(digest) if path.ends_with(digest) && response.status == 206 => {
                let answered = response.header("content-range").unwrap_or("").to_string();
                let shifted = answered
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(start, rest)| {
                        Some(format!("bytes {}-{rest}", start.parse::<u64>().ok()? + 5))
                    })
                    .unwrap_or(answered);
                response.set_header("Content-Range", &shifted);
            }
            Lie::DigestHeader(reference) if path.ends_with(&format!("/manifests/{reference}")) => {
                response.set_header("Docker-Content-Digest", &sha256_digest(b"another manifest"));
            }
            Lie::ShortBody(digest) if method == "GET" && path.ends_with(digest) => {
                let full = response.body.len();
                response.body.truncate(full / 2);
                response.set_header(ANNOUNCE_LENGTH, &full.to_string());
            }
            Lie::TagList(body) if path.ends_with("/tags/list") => {
                response =
                    Response::new(200, &[("Content-Type", "application/json")], body.clone());
            }
            Lie::NextPage(next) if path.ends_with("/tags/list") => {
                response.set_header("Link", &format!("<{next}>; rel=\"next\""));
            }
            Lie::Redirect(digest, to) if method == "GET" && path.ends_with(digest) => {
                response = Response::new(307, &[("Location", to)], Vec::new());
            }
            Lie::ManifestRedirect(reference, to)
                if path.ends_with(&format!("/manifests/{reference}")) =>
            {
                response = Response::new(307, &[("Location", to)], Vec::new());
            }
            Lie::ContentType(reference, kind)
                if path.ends_with(&format!("/manifests/{reference}")) =>
            {
                response.set_header("Content-Type", kind);
            }
            Lie::ManifestBody(reference, body)
                if path.ends_with(&format!("/manifests/{reference}")) =>
            {
                response.body = body.clone();
                response.set_header("Docker-Content-Digest", &sha256_digest(body));
            }
            _ => {}
        }
        response
    })
}

fn errno<T>(result: io::Result<T>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// An index over `children` (digest, size, media type), pushed as `repo:tag`, or by
/// its digest when `tag` is None.
fn push_index(
    registry: &Registry,
    repo: &str,
    tag: Option<&str>,
    children: &[(String, usize, &str)],
) -> (String, Vec<u8>) {
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|(digest, size, media_type)| {
            serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("index JSON");
    let reference = tag.map_or_else(|| sha256_digest(&body), str::to_owned);
    let digest = put_manifest(registry, repo, &reference, OCI_INDEX, &body);
    (digest, body)
}

fn manifest_of(registry: &Registry, repo: &str, reference: &str) -> Vec<u8> {
    common::get_manifest(registry, repo, reference).2
}

/// The log lines regfs wrote since `from` (a byte offset into its log).
fn log_since(mount: &Mount, from: usize) -> String {
    mount.log().get(from..).unwrap_or_default().to_string()
}

/// Runs one case: `check` does what a program would and returns what it saw; the log
/// written meanwhile must contain `logged`.
fn case(mount: &Mount, name: &str, logged: &str, check: impl FnOnce(&Path)) {
    let from = mount.log().len();
    check(&mount.dir);
    let log = log_since(mount, from);
    assert!(
        log.contains(logged),
        "case {name}: the log does not say {logged:?}:\n{log}"
    );
    assert!(!log.contains("panicked"), "case {name}:\n{log}");
}

/// What the registry holds for the cases: a repository per case, and the digests and
/// bytes the cases check.
struct Seeded {
    good_layers: Vec<String>,
    orphan: Vec<u8>,
    orphan_blob: String,
    big_layer: String,
    range_blob: String,
    short_blob: String,
    loop_blob: String,
    metadata_blob: String,
    /// The indexes nested twelve deep, from the image (0) to the tagged top (12).
    chain: Vec<String>,
    image_body: Vec<u8>,
    /// `lie/cycle`: the child image, and the index over it.
    child: String,
    index: String,
    index_body: Vec<u8>,
}

/// Pushes a repository per case (images, blobs, an understated descriptor).
fn seed(registry: &Registry) -> Seeded {
    let good = noise(3 << 20, 1);
    let (_, good_layers) = push_image(registry, "ok/app", "v1", &[&good]);

    let layer = noise(3 << 20, 2);
    let (_, layers) = push_image(registry, "lie/range", "v1", &[&layer]);
    let range_blob = layers[0].clone();
    let (_, layers) = push_image(registry, "lie/short", "v1", &[&layer]);
    let short_blob = layers[0].clone();
    let (_, layers) = push_image(registry, "lie/redirect-loop", "v1", &[&layer]);
    let loop_blob = layers[0].clone();
    let (_, layers) = push_image(registry, "lie/metadata", "v1", &[&layer]);
    let metadata_blob = layers[0].clone();
    push_image(registry, "lie/digest", "v1", &[&layer]);
    push_image(registry, "lie/private", "v1", &[&layer]);
    push_image(registry, "lie/media", "v1", &[&layer]);
    for repo in [
        "lie/json",
        "lie/huge",
        "lie/names",
        "lie/link-loop",
        "lie/link-away",
        "lie/big-manifest",
    ] {
        push_tiny_image(registry, repo, "v1", 3);
    }
    // A blob no tag reaches: its size can only come from HEAD.
    push_tiny_image(registry, "lie/head", "v1", 4);
    let orphan = noise(100 << 10, 5);
    let orphan_blob = common::push_blob(registry.addr, "lie/head", &orphan);
    let big_layer = push_understated(registry, &layer);
    let (chain, image_body) = push_deep(registry, &good);
    let (child, index, index_body) = push_cycle(registry, &good);
    Seeded {
        good_layers,
        orphan,
        orphan_blob,
        big_layer,
        range_blob,
        short_blob,
        loop_blob,
        metadata_blob,
        chain,
        image_body,
        child,
        index,
        index_body,
    }
}

/// `lie/descriptor:v1`, a manifest whose descriptor understates its layer; the layer.
fn push_understated(registry: &Registry, layer: &[u8]) -> String {
    let (config, _) = push_tiny_image(registry, "lie/descriptor", "base", 6);
    let _ = config;
    let big_layer = common::push_blob(registry.addr, "lie/descriptor", layer);
    let base = manifest_of(registry, "lie/descriptor", "base");
    let base: serde_json::Value = serde_json::from_slice(&base).expect("manifest JSON");
    let understated = common::oci_manifest(
        base["config"]["digest"].as_str().expect("config"),
        base["config"]["size"].as_u64().expect("size") as usize,
        &[(&big_layer, 1000)],
    );
    put_manifest(registry, "lie/descriptor", "v1", OCI_MANIFEST, &understated);
    big_layer
}

/// Indexes nested twelve deep, each over the one below, over an image; only the top
/// one is tagged. The digests from the image up, and the image's bytes.
fn push_deep(registry: &Registry, good: &[u8]) -> (Vec<String>, Vec<u8>) {
    let (image, image_body) = push_untagged_image(registry, "lie/deep", "image", &[good]);
    let mut below = (image.clone(), image_body.len(), OCI_MANIFEST);
    let mut chain = vec![image];
    for level in 1..=12 {
        let tag = (level == 12).then_some("v1");
        let (digest, body) = push_index(registry, "lie/deep", tag, &[below.clone()]);
        chain.push(digest.clone());
        below = (digest, body.len(), OCI_INDEX);
    }
    (chain, image_body)
}

/// An index over an image, where the registry serves the index again for the image:
/// the closest a registry can come to a cycle (digests make a real one impossible).
/// The child, the index and its bytes.
fn push_cycle(registry: &Registry, good: &[u8]) -> (String, String, Vec<u8>) {
    let (child, child_body) = push_untagged_image(registry, "lie/cycle", "child", &[good]);
    let child_size = child_body.len();
    let (index, index_body) = push_index(
        registry,
        "lie/cycle",
        Some("v1"),
        &[(child.clone(), child_size, OCI_MANIFEST)],
    );

    (child, index, index_body)
}

/// What the proxy says instead, case by case.
fn lies(s: &Seeded) -> HashMap<&'static str, Lie> {
    let huge_tags = {
        let mut body = b"{\"name\":\"lie/huge\",\"tags\":[".to_vec();
        while body.len() < 65 << 20 {
            body.extend_from_slice(b"\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",");
        }
        body.extend_from_slice(b"\"v1\"]}");
        body
    };
    HashMap::from([
        ("lie/head", Lie::HeadSize(s.orphan_blob.clone(), 1000)),
        ("lie/range", Lie::ContentRange(s.range_blob.clone())),
        ("lie/digest", Lie::DigestHeader("v1".into())),
        ("lie/short", Lie::ShortBody(s.short_blob.clone())),
        ("lie/json", Lie::TagList(b"{\"tags\": [\"v1\", ".to_vec())),
        ("lie/huge", Lie::TagList(huge_tags)),
        (
            "lie/names",
            Lie::TagList(br#"{"tags":["v1","../../etc","a/b","","-x","v2.ok_1"]}"#.to_vec()),
        ),
        (
            "lie/link-loop",
            Lie::NextPage("/v2/lie/link-loop/tags/list?n=1000".into()),
        ),
        (
            "lie/link-away",
            Lie::NextPage("http://10.0.0.1/v2/lie/link-away/tags/list?last=v1".into()),
        ),
        (
            "lie/redirect-loop",
            Lie::Redirect(
                s.loop_blob.clone(),
                format!("/v2/lie/redirect-loop/blobs/{}", s.loop_blob),
            ),
        ),
        (
            "lie/metadata",
            Lie::Redirect(
                s.metadata_blob.clone(),
                "http://169.254.169.254/latest/meta-data/".into(),
            ),
        ),
        (
            "lie/private",
            Lie::ManifestRedirect("v1".into(), "http://10.0.0.7:5000/v2/x/manifests/v1".into()),
        ),
        (
            "lie/media",
            Lie::ContentType("v1".into(), "text/html; charset=utf-8".into()),
        ),
        (
            "lie/big-manifest",
            Lie::ManifestBody("v1".into(), vec![b' '; 5 << 20]),
        ),
        (
            "lie/cycle",
            Lie::ManifestBody(s.child.clone(), s.index_body.clone()),
        ),
    ])
}

/// Cases of blob answers that lie: sizes, ranges, digests, lengths.
fn blob_answers(mount: &Mount, s: &Seeded) {
    let p = |rel: &str| mount.path(rel);
    let big_layer = &s.big_layer;
    let orphan_blob = &s.orphan_blob;
    let range_blob = &s.range_blob;
    let short_blob = &s.short_blob;
    case(mount, "HEAD overstates a size", "answer ended", |_| {
        let blob = p(&format!("lie/head/blobs/{orphan_blob}"));
        assert_eq!(
            fs::metadata(&blob).expect("stat").len(),
            s.orphan.len() as u64 + 1000
        );
        assert_eq!(errno(fs::read(&blob)), Some(libc::EIO));
    });
    case(
        mount,
        "a descriptor understates a size",
        "does not match its digest",
        |_| {
            // Listed, the blob has the size its descriptor gives (no HEAD per blob).
            assert!(ls(&p("lie/descriptor/blobs")).contains(&s.big_layer));
            let blob = p(&format!("lie/descriptor/blobs/{big_layer}"));
            assert_eq!(fs::metadata(&blob).expect("stat").len(), 1000);
            assert_eq!(errno(fs::read(&blob)), Some(libc::EIO));
        },
    );
    case(
        mount,
        "Content-Range is not what was asked",
        "Content-Range",
        |_| {
            let blob = p(&format!("lie/range/blobs/{range_blob}"));
            assert_eq!(errno(fs::read(blob)), Some(libc::EIO));
        },
    );
    case(
        mount,
        "Docker-Content-Digest names another manifest",
        "does not hash",
        |_| {
            assert_eq!(
                errno(fs::read(p("lie/digest/tags/v1/manifest.json"))),
                Some(libc::EIO)
            );
        },
    );
    case(
        mount,
        "a body shorter than its Content-Length",
        "lie/short",
        |_| {
            let blob = p(&format!("lie/short/blobs/{short_blob}"));
            assert_eq!(errno(fs::read(blob)), Some(libc::EIO));
        },
    );
}

/// Cases of tag lists that lie: JSON, size, names, links.
fn tag_list_answers(mount: &Mount) {
    let p = |rel: &str| mount.path(rel);
    case(mount, "a tag list that is not JSON", "invalid JSON", |_| {
        assert_eq!(errno(fs::read_dir(p("lie/json/tags"))), Some(libc::EIO));
    });
    case(mount, "a tag list of 65 MiB", "larger than", |_| {
        assert_eq!(errno(fs::read_dir(p("lie/huge/tags"))), Some(libc::EIO));
    });
    case(
        mount,
        "a tag list with invalid names",
        "invalid tag",
        |_| {
            assert_eq!(ls(&p("lie/names/tags")), ["v1", "v2.ok_1"]);
        },
    );
    case(mount, "a Link that loops", "loops", |_| {
        assert_eq!(
            errno(fs::read_dir(p("lie/link-loop/tags"))),
            Some(libc::EIO)
        );
    });
    case(mount, "a Link to another host", "another host", |_| {
        assert_eq!(
            errno(fs::read_dir(p("lie/link-away/tags"))),
            Some(libc::EIO)
        );
    });
}

/// Cases of redirects, and manifests that lie: media type, size, a cycle.
fn redirects_and_manifests(mount: &Mount, s: &Seeded, registry: &Registry) {
    let p = |rel: &str| mount.path(rel);
    let loop_blob = &s.loop_blob;
    let metadata_blob = &s.metadata_blob;
    case(mount, "a redirect loop", "redirects", |_| {
        let blob = p(&format!("lie/redirect-loop/blobs/{loop_blob}"));
        assert_eq!(errno(fs::read(blob)), Some(libc::EIO));
    });
    case(
        mount,
        "a redirect to the cloud metadata address",
        "refused a redirect to http://169.254.169.254",
        |_| {
            let blob = p(&format!("lie/metadata/blobs/{metadata_blob}"));
            assert_eq!(errno(fs::read(blob)), Some(libc::EIO));
        },
    );
    case(
        mount,
        "a manifest redirected into the private network",
        "refused a redirect to http://10.0.0.7:5000",
        |_| {
            assert_eq!(
                errno(fs::read(p("lie/private/tags/v1/manifest.json"))),
                Some(libc::EIO)
            );
        },
    );
    case(mount, "a manifest served as text/html", "lie/media", |_| {
        // Its own mediaType says what it is; the bytes are right, and its blobs listed.
        let served = fs::read(p("lie/media/tags/v1/manifest.json")).expect("read manifest");
        assert_eq!(served, manifest_of(registry, "lie/media", "v1"));
        assert_eq!(ls(&p("lie/media/blobs")).len(), 2);
    });
    case(mount, "a manifest of 5 MiB", "larger than", |_| {
        assert_eq!(
            errno(fs::read(p("lie/big-manifest/tags/v1/manifest.json"))),
            Some(libc::EIO)
        );
    });
    case(
        mount,
        "an index served again for its child",
        "does not hash",
        |_| {
            assert_eq!(
                ls(&p("lie/cycle/manifests")),
                std::slice::from_ref(&s.index)
            );
        },
    );
}

/// Indexes nested deeper than regfs walks.
fn deep_indexes(mount: &Mount, s: &Seeded) {
    let p = |rel: &str| mount.path(rel);
    case(mount, "indexes nested twelve deep", "nest deeper", |_| {
        let listed = ls(&p("lie/deep/manifests"));
        // The walk stops nine levels below the tag: the top of the chain is listed,
        // its bottom (and the image under it) is not.
        assert!(
            listed.contains(&s.chain[12]) && listed.contains(&s.chain[4]),
            "{listed:?}"
        );
        assert!(
            !listed.contains(&s.chain[2]) && !listed.contains(&s.chain[0]),
            "{listed:?}"
        );
        // Still there by name.
        let image = p(&format!("lie/deep/manifests/{}", s.chain[0]));
        assert_eq!(fs::read(image).expect("read the image"), s.image_body);
    });
}

#[test]
fn a_lying_registry_gets_clear_errors_and_never_takes_the_daemon_down() {
    common::require_tools();
    let registry = Registry::start();
    let s = seed(&registry);
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            tamper: Some(tamper(Arc::new(lies(&s)))),
            ..ProxyRules::default()
        },
    );
    let mount = Mount::start(&proxy.url(), &["--timeout", "5s", "--cache-size", "32MiB"]);
    let p = |rel: &str| mount.path(rel);
    blob_answers(&mount, &s);
    tag_list_answers(&mount);
    redirects_and_manifests(&mount, &s, &registry);
    deep_indexes(&mount, &s);

    // Through all of that: alive, right bytes, bounded memory.
    let blob = p(&format!("ok/app/blobs/{}", s.good_layers[0]));
    assert_eq!(
        sha256_digest(&fs::read(blob).expect("read a good blob")),
        s.good_layers[0]
    );
    assert!(mount.stats()["requests"].is_object(), "{}", mount.stats());
    let peak_mib = proc_status_kib(mount.pid(), "VmHWM").unwrap_or(0) / 1024;
    assert!(
        peak_mib < 200,
        "peak RSS {peak_mib} MiB with a 32 MiB cache"
    );
}

#[test]
fn a_token_realm_inside_the_machine_is_refused() {
    common::require_tools();
    let registry = Registry::start();
    let realm = "http://169.254.169.254/token";
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            tamper: Some(Tamper::new(move |_, _, _| {
                let challenge = format!("Bearer realm=\"{realm}\",service=\"registry\"");
                Response::new(
                    401,
                    &[("WWW-Authenticate", challenge.as_str())],
                    b"{}".to_vec(),
                )
            })),
            ..ProxyRules::default()
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_regfs"))
        .args(["mount", "--timeout", "5s", &proxy.url()])
        .arg(dir.path())
        .output()
        .expect("run regfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("token realm") && stderr.contains("169.254.169.254"),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
}
