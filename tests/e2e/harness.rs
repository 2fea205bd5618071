//! Self-tests of the end-to-end harness (tests/common): the parts that do not need regfs.
//! They also pin down the registry behaviour the other tests rely on.

use crate::common;

use std::io::{BufReader, Cursor, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn registry_starts_and_answers_v2() {
    require_tools();
    let registry = Registry::start();
    let (status, headers, body) = http_get(registry.addr, "/v2/");
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "Docker-Distribution-Api-Version"),
        Some("registry/2.0")
    );
    assert_eq!(body, b"{}");
    assert!(registry.url().starts_with("http://127.0.0.1:"));
}

#[test]
fn chunked_bodies_are_decoded() {
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
    let mut reader = Cursor::new(&raw[..]);
    let response = read_response(&mut reader, false).expect("parse chunked response");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello, world");
    // The parser stops exactly at the end of the message (keep-alive safe).
    assert_eq!(&raw[reader.position() as usize..], b"NEXT");
}

#[test]
fn is_mounted_is_false_for_a_plain_path() {
    assert!(!is_mounted(std::path::Path::new("/definitely/not/mounted")));
}

#[test]
fn image_built_with_umoci_and_pushed_with_skopeo_can_be_fetched() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();

    let started = Instant::now();
    layout.new_image(
        "v1",
        "amd64",
        &[
            ("etc/hello.txt", b"hello\n"),
            ("/data/blob.bin", &[7u8; 4096]),
        ],
    );
    let built = started.elapsed();
    layout.push("v1", &registry, "team/app:v1");
    eprintln!(
        "new_image: {built:?}, push: {:?}",
        started.elapsed() - built
    );

    let (digest, media_type, bytes) = get_manifest(&registry, "team/app", "v1");
    assert_eq!(media_type, OCI_MANIFEST);
    assert_eq!(
        digest,
        sha256_digest(&bytes),
        "Docker-Content-Digest is the hash of the bytes"
    );
    assert_eq!(
        digest,
        layout.manifest_digest("v1"),
        "skopeo kept the digest"
    );

    let manifest: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest is JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config: serde_json::Value =
        serde_json::from_slice(&get_blob(&registry, "team/app", config_digest))
            .expect("config JSON");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1);
    let layer_digest = layers[0]["digest"].as_str().expect("layer digest");
    let layer = get_blob(&registry, "team/app", layer_digest);
    assert_eq!(sha256_digest(&layer), layer_digest);
    assert_eq!(layers[0]["size"].as_u64(), Some(layer.len() as u64));

    assert_eq!(catalog(&registry), vec!["team/app".to_string()]);
    assert_eq!(tags(&registry, "team/app"), vec!["v1".to_string()]);
}

#[test]
fn index_push_yields_an_index_with_untagged_children() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("amd", "amd64", &[("arch", b"amd64\n")]);
    layout.new_image("arm", "arm64", &[("arch", b"arm64\n")]);

    let digest = layout.push_index(&["amd", "arm"], &registry, "team/app:multi");

    let (served, media_type, bytes) = get_manifest(&registry, "team/app", "multi");
    assert_eq!(
        (served.as_str(), media_type.as_str()),
        (digest.as_str(), OCI_INDEX)
    );
    let index: serde_json::Value = serde_json::from_slice(&bytes).expect("index is JSON");
    let children = index["manifests"].as_array().expect("index manifests");
    assert_eq!(children.len(), 2);
    let platforms: Vec<String> = children
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["platform"]["os"].as_str().unwrap_or("?"),
                c["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for child in children {
        let child_digest = child["digest"].as_str().expect("child digest");
        let (d, t, _) = get_manifest(&registry, "team/app", child_digest);
        assert_eq!((d.as_str(), t.as_str()), (child_digest, OCI_MANIFEST));
    }
    // Only the index is tagged; the children are reachable by digest only.
    assert_eq!(tags(&registry, "team/app"), vec!["multi".to_string()]);
}

/// What distribution 2.8 does with `n`/`last`: the catalog is paginated with a relative Link
/// header, the tag list is not paginated at all (every tag, unsorted, no Link). Large lists
/// come back chunked. Tests of regfs's tag pagination use `ProxyRules::paginate_tags`.
#[test]
fn registry_pagination_behaviour() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("x", "amd64", &[("x", b"x")]);
    for repo in ["a/one", "b/two", "c/three"] {
        layout.push("x", &registry, &format!("{repo}:t0"));
    }

    let (status, headers, body) = http_get(registry.addr, "/v2/_catalog?n=2");
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{"repositories":["a/one","b/two"]}"#.to_owned() + "\n"
    );
    assert_eq!(
        header(&headers, "link"),
        Some(r#"</v2/_catalog?last=b%2Ftwo&n=2>; rel="next""#)
    );
    let (_, headers, body) = http_get(registry.addr, "/v2/_catalog?last=b%2Ftwo&n=2");
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{"repositories":["c/three"]}"#.to_owned() + "\n"
    );
    assert_eq!(header(&headers, "link"), None, "last page has no Link");

    // Many tags, cheaply: the same manifest bytes PUT under new names.
    let (_, media_type, manifest) = get_manifest(&registry, "a/one", "t0");
    let started = Instant::now();
    for i in 1..=300 {
        put_manifest(
            &registry,
            "a/one",
            &format!("tag-with-a-long-name-{i:04}"),
            &media_type,
            &manifest,
        );
    }
    eprintln!("300 manifest PUTs: {:?}", started.elapsed());

    let response = http(registry.addr, "GET", "/v2/a/one/tags/list?n=2", &[], &[]);
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("link"),
        None,
        "distribution 2.8 does not paginate tags"
    );
    assert_eq!(
        response.header("transfer-encoding"),
        Some("chunked"),
        "large lists are chunked"
    );
    let all = tags(&registry, "a/one");
    assert_eq!(all.len(), 301);
}

fn raw_request(stream: &mut TcpStream, request: &str) {
    stream
        .write_all(request.as_bytes())
        .expect("write request to proxy");
}

#[test]
fn proxy_refuses_catalog_forwards_the_rest_and_keeps_alive() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("v1", "amd64", &[("f", &noise(100_000, 1))]);
    layout.push("v1", &registry, "team/app:v1");
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            refuse_catalog: true,
            ..Default::default()
        },
    );

    let (status, _, body) = http_get(proxy.addr, "/v2/_catalog?n=10");
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("UNAUTHORIZED"));
    let (status, _, body) = http_get(proxy.addr, "/v2/team/app/tags/list");
    assert_eq!(status, 200);
    assert_eq!(body, b"{\"name\":\"team/app\",\"tags\":[\"v1\"]}\n");
    proxy.set_refuse_catalog(false);
    assert_eq!(http_get(proxy.addr, "/v2/_catalog").0, 200);

    // Several requests on one client connection: HEAD keeps Content-Length, ranges pass.
    let (_, _, manifest) = get_manifest_at(proxy.addr, "team/app", "v1");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();
    let size = manifest["layers"][0]["size"].as_u64().expect("layer size");
    let mut stream = TcpStream::connect(proxy.addr).expect("connect to proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let blob_path = format!("/v2/team/app/blobs/{layer}");
    raw_request(
        &mut stream,
        &format!("HEAD {blob_path} HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    let head = read_response(&mut reader, true).expect("HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str())
    );
    raw_request(
        &mut stream,
        &format!("GET {blob_path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-4095\r\n\r\n"),
    );
    let part = read_response(&mut reader, false).expect("ranged GET response");
    assert_eq!(part.status, 206);
    assert_eq!(part.body.len(), 4096);
    raw_request(
        &mut stream,
        &format!("GET {blob_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    );
    let whole = read_response(&mut reader, false).expect("full GET response");
    assert_eq!(sha256_digest(&whole.body), layer);
    assert_eq!(&whole.body[..4096], &part.body[..]);

    assert_eq!(proxy.requests_matching("/_catalog"), 2);
    assert_eq!(proxy.requests_matching(&format!("GET {blob_path}")), 2);
    assert_eq!(proxy.ranges_seen(), vec!["bytes=0-4095".to_string()]);
    proxy.reset_counters();
    assert!(proxy.requests().is_empty());
}

#[test]
fn proxy_paginates_tags_when_asked() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("v1", "amd64", &[("f", b"f")]);
    layout.push("v1", &registry, "team/app:c");
    let (_, media_type, manifest) = get_manifest(&registry, "team/app", "c");
    for tag in ["a", "e", "b", "d"] {
        put_manifest(&registry, "team/app", tag, &media_type, &manifest);
    }
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            paginate_tags: true,
            ..Default::default()
        },
    );

    let mut pages = Vec::new();
    let mut next = Some("/v2/team/app/tags/list?n=2".to_string());
    while let Some(path) = next {
        let (status, headers, body) = http_get(proxy.addr, &path);
        assert_eq!(status, 200);
        let list: serde_json::Value = serde_json::from_slice(&body).expect("tag list JSON");
        pages.push(list["tags"].clone());
        next = header(&headers, "link").and_then(next_link);
    }
    assert_eq!(
        pages,
        [
            serde_json::json!(["a", "b"]),
            serde_json::json!(["c", "d"]),
            serde_json::json!(["e"])
        ]
    );
}

#[test]
fn proxy_stalls_blob_gets_until_released() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("v1", "amd64", &[("f", b"stalled")]);
    layout.push("v1", &registry, "team/app:v1");
    let (_, _, manifest) = get_manifest(&registry, "team/app", "v1");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();

    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            stall_blob_gets: true,
            ..Default::default()
        },
    );
    let (done_tx, done_rx) = mpsc::channel();
    let addr = proxy.addr;
    let path = format!("/v2/team/app/blobs/{layer}");
    let getter = thread::spawn(move || {
        let result = http_get(addr, &path);
        let _ = done_tx.send(());
        result
    });

    assert!(
        proxy.wait_stalled(1, Duration::from_secs(10)),
        "the blob GET was not held"
    );
    // Manifests and HEADs still go through while a blob GET is held.
    assert_eq!(
        http(
            proxy.addr,
            "HEAD",
            &format!("/v2/team/app/blobs/{layer}"),
            &[],
            &[]
        )
        .status,
        200
    );
    assert_eq!(
        get_manifest_at(proxy.addr, "team/app", "v1").1,
        OCI_MANIFEST
    );
    assert!(
        done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "held GET answered early"
    );
    assert_eq!(proxy.stalled_count(), 1);

    proxy.release_stalls();
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("released GET did not finish");
    let (status, _, body) = getter.join().expect("getter thread");
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), layer);
    assert_eq!(proxy.stalled_count(), 0);
}

#[test]
fn proxy_answers_502_when_upstream_is_gone() {
    let upstream = {
        let registry_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
        registry_port.local_addr().expect("probe addr")
    };
    let proxy = Proxy::start(upstream, ProxyRules::default());
    assert_eq!(http_get(proxy.addr, "/v2/").0, 502);
}

#[test]
fn tiny_images_pushed_by_http_are_what_skopeo_sees() {
    require_tools();
    let registry = Registry::start();
    let (manifest, config) = push_tiny_image(&registry, "team/app", "v1", 7);
    assert_eq!(blob_status(registry.addr, "team/app", &config), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", "v1"), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", &manifest), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", "v2"), 404);
    assert_eq!(catalog(&registry), ["team/app"]);
    let raw = skopeo_raw_manifest(registry.addr, "team/app:v1");
    assert_eq!(
        sha256_digest(&raw),
        manifest,
        "skopeo --raw gives the bytes as served"
    );
    let out = tempfile::tempdir().expect("temp dir");
    let dir = out.path().join("oci");
    skopeo_copy_to_oci(registry.addr, "team/app:v1", &dir, "v1");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("read index.json"))
            .expect("index.json is JSON");
    assert_eq!(index["manifests"][0]["digest"], manifest.as_str());
}

#[test]
fn proxy_cuts_a_patch_after_letting_some_through() {
    require_tools();
    let registry = Registry::start();
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            cut_patches: 1,
            cut_patch_after: 1,
            ..ProxyRules::default()
        },
    );
    let start = http(proxy.addr, "POST", "/v2/team/app/blobs/uploads/", &[], &[]);
    assert_eq!(start.status, 202);
    let location = start.header("location").expect("Location");
    let target = &location[location.find("/v2/").expect("path in Location")..];
    let first = http(
        proxy.addr,
        "PATCH",
        target,
        &[("Content-Range", "0-3")],
        b"abcd",
    );
    assert_eq!(first.status, 202, "{}", first.text());
    let next = first.header("location").expect("Location");
    let next = &next[next.find("/v2/").expect("path in Location")..];
    let second = try_http(
        proxy.addr,
        "PATCH",
        next,
        &[("Content-Range", "4-7")],
        b"efgh",
    );
    assert!(second.is_err(), "the second PATCH is cut: {second:?}");
    assert_eq!(proxy.faults_left(), 0);
    assert_eq!(proxy.requests_matching("PATCH "), 2);
}

#[test]
fn rss_sampler_sees_a_process_grow() {
    let sampler = RssSampler::start(std::process::id());
    let block = vec![1u8; 96 << 20];
    thread::sleep(Duration::from_millis(300));
    let peak = sampler.stop();
    assert!(block.iter().all(|b| *b == 1));
    assert!(peak.samples >= 2, "{peak:?}");
    assert!(peak.max_rss_kib >= 96 << 10, "{peak:?}");
    assert!(peak.hwm_kib >= peak.max_rss_kib, "{peak:?}");
    assert!(peak.peak_mib() >= 96, "{peak:?}");
}
