//! `--mirror` (docs/SEMANTICS.md, "Mirrors"; issue 14): content-addressed reads from
//! mirrors first, tags and writes to the origin. The mirrors are real: distribution in
//! `proxy:` mode (a pull-through cache), and the harness proxy in front of the origin for a
//! mirror that is down, silent or lies. What a user sees is checked: the bytes, the errors
//! (none), and what each registry was asked.

use crate::common;

use std::fs;
use std::net::TcpListener;

use common::{
    Mount, Proxy, ProxyRules, PullThrough, Registry, blob_status, manifest_status, noise,
    push_image, sha256_digest,
};

/// The memory cache of these mounts: blobs up to a quarter of it (8 MiB) are fetched
/// from a mirror whole and checked before they are served; larger ones by ranges.
const CACHE: &str = "32MiB";
const SMALL: usize = 3 << 20;
const LARGE: usize = 20 << 20;

/// The counters of `host` (its URL without a trailing slash) in `/.regfs/stats`.
fn host_stat(mount: &Mount, host: &str, counter: &str) -> u64 {
    let stats = mount.stats();
    stats["hosts"][host][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no {counter} for {host} in {stats:#}"))
}

/// Reads `team/app/blobs/<digest>` whole through the mount and checks it.
fn read_blob(mount: &Mount, digest: &str, expected: &[u8]) {
    let bytes = fs::read(mount.path(&format!("team/app/blobs/{digest}")))
        .unwrap_or_else(|e| panic!("read blob {digest}: {e}\n{}", mount.log()));
    assert_eq!(bytes.len(), expected.len(), "size of {digest}");
    assert!(bytes == expected, "content of {digest}");
}

/// An origin with `team/app:v1` (a small and a large layer), a counting proxy in front
/// of it, and distribution in `proxy:` mode pulling from that proxy.
fn pull_through() -> PullThrough {
    let layers = vec![noise(SMALL, 141), noise(LARGE, 142)];
    PullThrough::start(layers, ProxyRules::default())
}

fn mirrored_mount(origin: &str, mirrors: &[String]) -> Mount {
    let mut args = vec!["--no-disk-cache", "--cache-size", CACHE, "--timeout", "8s"];
    for m in mirrors {
        args.extend(["--mirror", m.as_str()]);
    }
    Mount::start(origin, &args)
}

#[test]
fn a_pull_through_cache_serves_many_mounts_and_the_origin_each_blob_once() {
    let p = pull_through();
    let origin_gets = |digest: &str| {
        p.origin_front
            .requests_matching(&format!("GET /v2/team/app/blobs/{digest}"))
    };
    let (small, large) = (&p.layers[0], &p.layers[1]);
    let mut after_first = None;
    for round in 0..3 {
        // One mount after the other, as hosts of a fleet come up: the cache answers
        // what it has pulled once.
        let mount = mirrored_mount(&p.origin_front.url(), &[p.cache_front.url()]);
        let manifest = fs::read(mount.path("team/app/tags/v1/manifest.json")).expect("manifest");
        assert!(!manifest.is_empty());
        for (digest, bytes) in [small, large] {
            read_blob(&mount, digest, bytes);
        }
        let origin = p.origin_front.url();
        let mirror = p.cache_front.url();
        // Every blob byte came from the mirror.
        assert_eq!(
            host_stat(&mount, &origin, "fetched_bytes"),
            0,
            "round {round}: the origin sent blob bytes\n{}",
            mount.log()
        );
        assert!(host_stat(&mount, &mirror, "fetched_bytes") >= (SMALL + LARGE) as u64);
        if round == 0 {
            after_first = Some((origin_gets(&small.0), origin_gets(&large.0)));
        }
        mount.terminate();
    }
    // regfs fetched the small blob whole, once per mount; a cold distribution 2.8
    // cache pulls a blob from its origin a few times itself (to store it and to answer
    // each request that came while it was pulling), but only while it is cold: the
    // origin served nothing to the second and third mount.
    let mirror_gets = p
        .cache_front
        .requests_matching(&format!("GET /v2/team/app/blobs/{}", small.0));
    assert_eq!(mirror_gets, 3, "{:?}", p.cache_front.requests());
    let (small_gets, large_gets) = after_first.expect("a first round");
    assert!(small_gets >= 1 && large_gets >= 1);
    assert_eq!(
        (origin_gets(&small.0), origin_gets(&large.0)),
        (small_gets, large_gets),
        "{:?}",
        p.origin_front.requests()
    );
    // Tags were resolved at the origin, not the cache.
    assert!(
        p.origin_front
            .requests_matching("/v2/team/app/manifests/v1")
            >= 3
    );
    assert_eq!(p.cache_front.requests_matching("/manifests/v1"), 0);
    drop(p.origin);
}

#[test]
fn writes_through_a_mirrored_mount_land_in_the_origin() {
    let p = pull_through();
    let mount = mirrored_mount(&p.origin_front.url(), &[p.cache_front.url()]);
    read_blob(&mount, &p.layers[0].0, &p.layers[0].1);

    // A new blob, and a new tag for the image: both pushed.
    let data = noise(5 << 20, 143);
    let digest = sha256_digest(&data);
    fs::write(mount.path("team/app/uploads/new.bin"), &data).expect("upload a blob");
    let manifest = fs::read(mount.path("team/app/tags/v1/manifest.json")).expect("manifest");
    fs::create_dir(mount.path("team/app/tags/v2")).expect("mkdir tags/v2");
    fs::write(mount.path("team/app/tags/v2/manifest.json"), &manifest).expect("push a tag");

    assert_eq!(blob_status(p.origin.addr, "team/app", &digest), 200);
    assert_eq!(manifest_status(p.origin.addr, "team/app", "v2"), 200);
    for method in ["POST ", "PATCH ", "PUT "] {
        assert_eq!(
            p.cache_front.requests_matching(method),
            0,
            "a write went to the mirror: {:?}",
            p.cache_front.requests()
        );
    }
    // And the mount reads back what it pushed.
    read_blob(&mount, &digest, &data);
    mount.terminate();
}

/// An origin with `team/app:v1` and a proxy in front of it that serves as a mirror
/// (its faults are the mirror's).
fn origin_and_mirror(rules: ProxyRules) -> (Registry, Proxy, Vec<(String, Vec<u8>)>) {
    common::require_tools();
    let origin = Registry::start();
    let (small, large) = (noise(SMALL, 151), noise(LARGE, 152));
    let (_, digests) = push_image(&origin, "team/app", "v1", &[&small, &large]);
    let mirror = Proxy::start_on("127.0.0.2", origin.addr, rules);
    (
        origin,
        mirror,
        digests.into_iter().zip([small, large]).collect(),
    )
}

#[test]
fn mirrors_that_are_down_or_silent_cost_the_reader_no_errors() {
    let (origin, silent, layers) = origin_and_mirror(ProxyRules::default());
    silent.set_stall_all(true);
    // Nothing listens on this port any more: connections are refused.
    let down = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let mount = mirrored_mount(&origin.url(), &[down.clone(), silent.url()]);
    let (small, large) = (&layers[0], &layers[1]);
    read_blob(&mount, &small.0, &small.1);
    let origin_url = origin.url();
    assert!(host_stat(&mount, &down, "passed_on") >= 1);
    assert!(host_stat(&mount, &silent.url(), "passed_on") >= 1);
    assert_eq!(
        host_stat(&mount, &origin_url, "fetched_bytes"),
        SMALL as u64
    );

    // Both now rest: the next blob goes straight to the origin.
    let asked = (
        host_stat(&mount, &down, "requests"),
        host_stat(&mount, &silent.url(), "requests"),
    );
    read_blob(&mount, &large.0, &large.1);
    assert_eq!(
        (
            host_stat(&mount, &down, "requests"),
            host_stat(&mount, &silent.url(), "requests"),
        ),
        asked,
        "a resting mirror was asked again"
    );
    silent.set_stall_all(false);
    mount.terminate();
}

#[test]
fn a_mirror_serving_wrong_bytes_is_never_believed() {
    let (origin, liar, layers) = origin_and_mirror(ProxyRules {
        corrupt_blob_gets: true,
        ..ProxyRules::default()
    });
    let mount = mirrored_mount(&origin.url(), &[liar.url()]);
    let (small, large) = (&layers[0], &layers[1]);
    // A blob small enough to check whole before serving: the reader gets the origin's
    // bytes and never an error.
    read_blob(&mount, &small.0, &small.1);
    assert!(host_stat(&mount, &liar.url(), "passed_on") >= 1);
    assert_eq!(mount.stats()["verify_failures"].as_u64(), Some(0));

    // A large blob is read from the mirror lazily, by ranges: its wrong bytes are found
    // when the read reaches the end, which fails (EIO), never returning them as right.
    // From then on the blob comes from the origin.
    let path = mount.path(&format!("team/app/blobs/{}", large.0));
    let first = fs::read(&path);
    let e = first.expect_err("a blob with wrong bytes was read to the end without an error");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    read_blob(&mount, &large.0, &large.1);
    mount.terminate();
}
