//! regfs mounted through the kernel on a real docker-registry filled by umoci + skopeo.
//!
//! Each test starts its own registry (they are cheap: well under a second) so tests
//! stay independent and run in parallel.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{Layout, Mount, Proxy, ProxyRules, Registry, ls, sha256_digest};

/// A registry holding:
/// - `team/app:v1` (amd64), `team/app:v2` (arm64), `team/app:multi` (an OCI index over two
///   more images whose manifests are not tagged anywhere);
/// - `hello:latest`, the same image as `team/app:v1`.
struct Fixture {
    registry: Registry,
    /// The OCI layout the images came from (its temp dir lives as long as the test).
    layout: Layout,
    index_children: Vec<String>,
}

fn fixture() -> Fixture {
    common::require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("v1", "amd64", &[("etc/motd", b"v1 on amd64\n")]);
    layout.new_image("v2", "arm64", &[("etc/motd", b"v2 on arm64\n")]);
    layout.new_image("multi-amd64", "amd64", &[("bin/tool", b"tool for amd64\n")]);
    layout.new_image("multi-arm64", "arm64", &[("bin/tool", b"tool for arm64\n")]);
    layout.push("v1", &registry, "team/app:v1");
    layout.push("v2", &registry, "team/app:v2");
    layout.push("v1", &registry, "hello:latest");
    layout.push_index(&["multi-amd64", "multi-arm64"], &registry, "team/app:multi");
    let index_children = vec![
        layout.manifest_digest("multi-amd64"),
        layout.manifest_digest("multi-arm64"),
    ];
    Fixture {
        registry,
        layout,
        index_children,
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn errno_of_stat(path: &Path) -> Option<i32> {
    fs::metadata(path).err().and_then(|e| e.raw_os_error())
}

/// What the registry itself says a repository's tags reach: manifests (by digest, with
/// their sizes) and blobs (by digest, with descriptor sizes). Walked with plain HTTP.
fn reachable_per_registry(
    registry: &Registry,
    repo: &str,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut manifests = BTreeMap::new();
    let mut blobs = BTreeMap::new();
    let mut pending: Vec<String> = common::tags(registry, repo);
    while let Some(reference) = pending.pop() {
        let (digest, _, bytes) = common::get_manifest(registry, repo, &reference);
        if manifests.insert(digest, bytes.len() as u64).is_some() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest JSON");
        for child in json["manifests"].as_array().into_iter().flatten() {
            pending.push(child["digest"].as_str().expect("digest").to_owned());
        }
        let config = json.get("config").into_iter();
        let layers = json["layers"].as_array().into_iter().flatten();
        for d in config.chain(layers) {
            let digest = d["digest"].as_str().expect("digest").to_owned();
            blobs.insert(digest, d["size"].as_u64().expect("size"));
        }
    }
    (manifests, blobs)
}

#[test]
fn tree_lists_namespaces_repositories_and_tags() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    assert_eq!(ls(&mnt.dir), ["hello", "team"]);
    assert_eq!(ls(&mnt.path("team")), ["app"]);
    assert_eq!(
        ls(&mnt.path("team/app")),
        ["blobs", "manifests", "tags", "uploads"]
    );
    assert_eq!(ls(&mnt.path("team/app/tags")), ["multi", "v1", "v2"]);
    assert_eq!(ls(&mnt.path("team/app/tags/v2")), ["manifest.json"]);
    assert_eq!(ls(&mnt.path("hello/tags")), ["latest"]);
    assert!(ls(&mnt.path("hello/uploads")).is_empty());
    assert!(mnt.path("team").is_dir() && mnt.path("team/app/tags/v1").is_dir());
    // A namespace that is not a repository has no tags/.
    assert_eq!(errno_of_stat(&mnt.path("team/tags")), Some(libc::ENOENT));
}

#[test]
fn tag_manifests_are_the_registry_bytes() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    for (repo, tag) in [
        ("team/app", "v1"),
        ("team/app", "v2"),
        ("team/app", "multi"),
        ("hello", "latest"),
    ] {
        let (digest, _, served) = common::get_manifest(&f.registry, repo, tag);
        let path = mnt.path(&format!("{repo}/tags/{tag}/manifest.json"));
        let bytes = read(&path);
        assert_eq!(bytes, served, "{repo}:{tag}");
        assert_eq!(sha256_digest(&bytes), digest, "{repo}:{tag}");
        let meta = fs::metadata(&path).expect("stat manifest.json");
        assert_eq!(meta.len(), served.len() as u64, "stat size of {repo}:{tag}");
        assert!(meta.is_file());
    }
}

#[test]
fn every_reachable_blob_and_manifest_is_listed_sized_and_named_by_its_hash() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    let (manifests, blobs) = reachable_per_registry(&f.registry, "team/app");
    // The index children are reachable only through the index, and still listed.
    for child in &f.index_children {
        assert!(
            manifests.contains_key(child),
            "registry walk missed {child}"
        );
    }
    let listed_manifests = ls(&mnt.path("team/app/manifests"));
    let listed_blobs = ls(&mnt.path("team/app/blobs"));
    assert_eq!(
        listed_manifests,
        manifests.keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(listed_blobs, blobs.keys().cloned().collect::<Vec<_>>());
    for (dir, expected) in [("manifests", &manifests), ("blobs", &blobs)] {
        for (digest, size) in expected {
            let path = mnt.path(&format!("team/app/{dir}/{digest}"));
            assert_eq!(
                fs::metadata(&path).expect("stat").len(),
                *size,
                "size of {dir}/{digest}"
            );
            assert_eq!(
                &sha256_digest(&read(&path)),
                digest,
                "content of {dir}/{digest}"
            );
        }
    }
}

#[test]
fn blobs_outside_the_listing_open_by_digest() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    // hello:latest is v1's image, so hello's blobs are also in team/app: look one up in
    // team/app by name before team/app's blobs/ was ever listed (HEAD, not the walk).
    let (_, _, bytes) = common::get_manifest(&f.registry, "hello", "latest");
    let json: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    let layer = json["layers"][0]["digest"].as_str().expect("layer digest");
    let path = mnt.path(&format!("team/app/blobs/{layer}"));
    assert_eq!(sha256_digest(&read(&path)), layer);
}

#[test]
fn grep_over_tag_manifests_finds_the_multi_arch_index() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    let out = Command::new("sh")
        .arg("-c")
        .arg("grep -l arm64 */tags/*/manifest.json */*/tags/*/manifest.json")
        .current_dir(&mnt.dir)
        .output()
        .expect("run grep");
    assert!(
        out.status.success(),
        "grep failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "team/app/tags/multi/manifest.json\n"
    );
    // And grep -r over a whole tags/ tree reads every manifest without error.
    let out = Command::new("grep")
        .args(["-rc", "schemaVersion", "team/app/tags"])
        .current_dir(&mnt.dir)
        .output()
        .expect("run grep -r");
    assert!(
        out.status.success(),
        "grep -r failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn unknown_and_malformed_names_are_enoent_without_a_request() {
    let f = fixture();
    let proxy = Proxy::start(f.registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &[]);
    ls(&mnt.path("team/app/tags")); // warm the catalog and tag list
    let absent = format!("sha256:{}", "ab".repeat(32));
    for rel in [
        "nosuch".to_owned(),
        "team/nosuch".to_owned(),
        "team/app/tags/nosuch".to_owned(),
        "team/app/tags/v1/other.json".to_owned(),
        format!("team/app/blobs/{absent}"),
        format!("team/app/manifests/{absent}"),
    ] {
        assert_eq!(errno_of_stat(&mnt.path(&rel)), Some(libc::ENOENT), "{rel}");
    }
    let before = proxy.requests().len();
    for rel in [
        "UPPER",
        ".hidden",
        "team/-dash",
        "team/app/tags/.x",
        "team/app/tags/-x",
        "team/app/blobs/not-a-digest",
        "team/app/blobs/sha256:ABCDEF",
        "team/app/blobs/md5:0123",
        "team/app/manifests/sha256:short",
        "team/app/uploads/nothing",
    ] {
        assert_eq!(errno_of_stat(&mnt.path(rel)), Some(libc::ENOENT), "{rel}");
    }
    assert_eq!(
        proxy.requests()[before..],
        [] as [String; 0],
        "malformed names must not reach the registry"
    );
}

#[test]
fn repo_flag_works_when_the_catalog_is_refused() {
    let f = fixture();
    let proxy = Proxy::start(
        f.registry.addr,
        ProxyRules {
            refuse_catalog: true,
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &["--repo", "team/app"]);
    assert_eq!(ls(&mnt.dir), ["team"]);
    assert_eq!(ls(&mnt.path("team")), ["app"]);
    assert_eq!(ls(&mnt.path("team/app/tags")), ["multi", "v1", "v2"]);
    let (digest, _, _) = common::get_manifest(&f.registry, "team/app", "v1");
    assert_eq!(
        sha256_digest(&read(&mnt.path("team/app/tags/v1/manifest.json"))),
        digest
    );
    // A repository not named with --repo still opens by path.
    let (digest, _, _) = common::get_manifest(&f.registry, "hello", "latest");
    assert_eq!(
        sha256_digest(&read(&mnt.path("hello/tags/latest/manifest.json"))),
        digest
    );
    assert!(
        proxy.requests_matching("/v2/_catalog") >= 1,
        "the catalog was never asked for"
    );
}

#[test]
fn catalog_and_tag_lists_follow_pagination() {
    let f = fixture();
    // More repositories and tags than one page of 2.
    for i in 0..5 {
        f.layout.push("v1", &f.registry, &format!("pages/r{i}:t"));
    }
    // Extra tags on hello point at its own manifest, so its blobs are already there.
    let (_, media_type, body) = common::get_manifest(&f.registry, "hello", "latest");
    let mut tags = vec!["latest".to_owned()];
    for i in 0..7 {
        let tag = format!("t{i}");
        common::put_manifest(&f.registry, "hello", &tag, &media_type, &body);
        tags.push(tag);
    }
    tags.sort();
    // distribution 2.8 pages the catalog but not tag lists; the proxy pages those.
    let proxy = Proxy::start(
        f.registry.addr,
        ProxyRules {
            paginate_tags: true,
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &["--page-size", "2"]);
    assert_eq!(ls(&mnt.dir), ["hello", "pages", "team"]);
    assert_eq!(ls(&mnt.path("pages")), ["r0", "r1", "r2", "r3", "r4"]);
    assert_eq!(ls(&mnt.path("hello/tags")), tags);
    assert!(
        proxy.requests_matching("/v2/_catalog?") >= 4,
        "{:?}",
        proxy.requests()
    );
    assert!(
        proxy.requests_matching("last=") >= 4,
        "{:?}",
        proxy.requests()
    );
}

#[test]
fn ls_answers_while_a_blob_read_is_stalled() {
    let f = fixture();
    let proxy = Proxy::start(f.registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &[]);
    let blobs = ls(&mnt.path("team/app/blobs"));
    let blob = mnt.path(&format!("team/app/blobs/{}", blobs[0]));
    let expected = blobs[0].clone();
    proxy.set_stall_blob_gets(true);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        thread::spawn(move || {
            let bytes = fs::read(&blob).expect("read the stalled blob");
            done.store(true, Ordering::SeqCst);
            bytes
        })
    };
    assert!(
        proxy.wait_stalled(1, Duration::from_secs(20)),
        "the blob GET never reached the proxy"
    );
    // The blob read is held by the proxy; the tree must still answer.
    assert_eq!(ls(&mnt.path("team/app/tags")), ["multi", "v1", "v2"]);
    assert_eq!(
        ls(&mnt.path("hello")),
        ["blobs", "manifests", "tags", "uploads"]
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "the read finished before it was released"
    );
    assert!(proxy.stalled_count() >= 1);
    proxy.release_stalls();
    proxy.set_stall_blob_gets(false);
    let bytes = reader.join().expect("reader thread");
    assert_eq!(sha256_digest(&bytes), expected);
}

#[test]
fn a_small_read_fetches_only_a_range() {
    common::require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    // Random bytes do not compress: the layer blob is about 8 MiB.
    let noise = common::noise(8 << 20, 0x2545_f491);
    layout.new_image("big", "amd64", &[("noise.bin", &noise)]);
    layout.push("big", &registry, "big/layer:v1");
    let (_, _, bytes) = common::get_manifest(&registry, "big/layer", "v1");
    let json: serde_json::Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    let layer = json["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_owned();
    let size = json["layers"][0]["size"].as_u64().expect("layer size");
    assert!(size > 6 << 20, "the test layer is too small: {size}");

    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &[]);
    let mut file =
        fs::File::open(mnt.path(&format!("big/layer/blobs/{layer}"))).expect("open layer");
    file.seek(SeekFrom::Start(3 << 20)).expect("seek");
    let mut buf = vec![0u8; 4096];
    file.read_exact(&mut buf).expect("read 4 KiB");
    let whole = common::get_blob(&registry, "big/layer", &layer);
    assert_eq!(buf, whole[3 << 20..(3 << 20) + 4096]);

    let gets = proxy.requests_matching(&format!("GET /v2/big/layer/blobs/{layer}"));
    let ranges = proxy.ranges_seen();
    assert!(gets >= 1);
    assert_eq!(
        ranges.len(),
        gets,
        "every blob GET must carry a Range: {:?}",
        proxy.requests()
    );
    let fetched: u64 = ranges.iter().map(|r| range_len(r)).sum();
    let block = mnt.stats()["cache"]["block_size"]
        .as_u64()
        .expect("block size in /.regfs/stats");
    assert!(
        fetched <= 2 * block,
        "a 4 KiB read fetched {fetched} bytes of {size}: {ranges:?}"
    );
}

/// Length of "bytes=A-B".
fn range_len(range: &str) -> u64 {
    let (a, b) = range
        .trim_start_matches("bytes=")
        .split_once('-')
        .expect("a bytes=A-B range");
    b.parse::<u64>().expect("end") - a.parse::<u64>().expect("start") + 1
}

#[test]
fn mtimes_are_stable_across_mounts_and_change_when_a_tag_moves() {
    let f = fixture();
    let blob_mtime = |mnt: &Mount| {
        let blobs = ls(&mnt.path("hello/blobs"));
        fs::metadata(mnt.path(&format!("hello/blobs/{}", blobs[0])))
            .expect("stat")
            .mtime()
    };
    let tag_mtime = |mnt: &Mount| {
        fs::metadata(mnt.path("hello/tags/latest/manifest.json"))
            .expect("stat")
            .modified()
            .expect("mtime")
    };
    let first = Mount::start(&f.registry.url(), &["--tag-ttl", "1s"]);
    let second = Mount::start(&f.registry.url(), &["--tag-ttl", "1s"]);
    assert_eq!(blob_mtime(&first), blob_mtime(&second));
    let before = tag_mtime(&first);
    assert_eq!(before, tag_mtime(&second));
    // Move hello:latest to v2's manifest (its blobs must be in hello first: copy with skopeo).
    let status = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{}/team/app:v2", f.registry.addr))
        .arg(format!("docker://{}/hello:latest", f.registry.addr))
        .status()
        .expect("run skopeo");
    assert!(status.success());
    thread::sleep(Duration::from_millis(1500)); // let --tag-ttl 1s pass
    let after = tag_mtime(&first);
    assert_ne!(before, after, "a retag must change the mtime");
    let (digest, _, _) = common::get_manifest(&f.registry, "hello", "latest");
    assert_eq!(
        sha256_digest(&read(&first.path("hello/tags/latest/manifest.json"))),
        digest
    );
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &[]);
    let dir = mnt.dir.clone();
    ls(&mnt.path("team/app/tags"));
    let (status, left_mounted) = mnt.terminate_checked();
    assert!(status.success(), "regfs exited with {status}");
    assert!(!left_mounted, "regfs left {} mounted", dir.display());
}

#[test]
fn a_mount_is_listed_as_fuse_regfs_under_its_registry() {
    let f = fixture();
    let mnt = Mount::start(&f.registry.url(), &["--read-only"]);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    // "46 27 0:41 / /mnt/reg ro,nosuid,nodev,relatime - fuse.regfs regfs:127.0.0.1 ro,…"
    let entry = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let point = regfs::mount::unescape_mountinfo(fields.get(4)?);
        (Path::new(&point) == mnt.dir).then(|| {
            let mut rest = after.split(' ');
            let fs_type = rest.next().unwrap_or("").to_owned();
            let source = rest.next().unwrap_or("").to_owned();
            (
                fs_type,
                source,
                fields.get(5).copied().unwrap_or("").to_owned(),
            )
        })
    });
    let (fs_type, source, options) = entry.expect("the mount is in mountinfo");
    assert_eq!(fs_type, "fuse.regfs", "{mountinfo}");
    assert!(source.starts_with("regfs:127.0.0.1"), "source {source}");
    for option in ["ro", "nosuid", "nodev"] {
        assert!(
            options.split(',').any(|o| o == option),
            "{option} in {options}"
        );
    }
    // What a user types to find it.
    let found = Command::new("findmnt")
        .args(["-n", "-t", "fuse.regfs", "-o", "TARGET"])
        .arg(&mnt.dir)
        .output()
        .expect("findmnt (util-linux; scripts/setup.sh installs it)");
    assert!(
        found.status.success(),
        "findmnt -t fuse.regfs found nothing"
    );
    assert_eq!(
        String::from_utf8_lossy(&found.stdout).trim(),
        mnt.dir.display().to_string()
    );
}

/// Runs `regfs ARGS` to completion (bounded by the mount attempt's own timeouts).
fn regfs(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regfs"))
        .args(args)
        .output()
        .expect("run regfs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(stderr: &str, needle: &str) {
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("regfs: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
}

#[test]
fn mount_failures_are_one_clear_line() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("missing");
    let (status, err) = regfs(&["mount", &f.registry.url(), missing.to_str().expect("utf-8")]);
    assert_eq!(status.code(), Some(1));
    assert_one_line_error(&err, "does not exist");

    // Nothing listens on a port we just closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let dir = tmp.path().to_str().expect("utf-8");
    let (status, err) = regfs(&["mount", &format!("http://{addr}"), dir]);
    assert_eq!(status.code(), Some(1));
    assert_one_line_error(&err, "does not answer /v2/");
    assert!(!common::is_mounted(tmp.path()));

    let mnt = Mount::start(&f.registry.url(), &[]);
    let (status, err) = regfs(&["mount", &f.registry.url(), mnt.dir.to_str().expect("utf-8")]);
    assert_eq!(status.code(), Some(1));
    assert_one_line_error(&err, "busy");
    // The first mount is untouched.
    assert_eq!(ls(&mnt.path("team/app/tags")), ["multi", "v1", "v2"]);
}

#[test]
fn daemon_returns_once_mounted() {
    let f = fixture();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().canonicalize().expect("canonical").join("mnt");
    fs::create_dir(&dir).expect("mkdir");
    let log = tmp.path().join("regfs.log");
    // output() waits for the pipes to close: it returns only because the daemon lets go
    // of stdout and stderr once the mount is ready.
    let (status, err) = regfs(&[
        "mount",
        "--daemon",
        "--log-file",
        log.to_str().expect("utf-8"),
        &f.registry.url(),
        dir.to_str().expect("utf-8"),
    ]);
    assert!(status.success(), "{err}");
    // Ready means ready: no waiting here.
    assert!(
        common::is_mounted(&dir),
        "--daemon returned before the mount was ready"
    );
    assert_eq!(ls(&dir.join("team/app/tags")), ["multi", "v1", "v2"]);
    let unmounted = Command::new("fusermount3")
        .arg("-u")
        .arg(&dir)
        .status()
        .expect("fusermount3");
    assert!(unmounted.success());
    assert!(!common::is_mounted(&dir));
    let logged = || fs::read_to_string(&log).unwrap_or_default();
    for _ in 0..100 {
        if logged().contains("unmounted") {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        logged().contains("mounted"),
        "the daemon's log went missing: {}",
        logged()
    );
    assert!(
        logged().contains("unmounted"),
        "the daemon did not log its unmount: {}",
        logged()
    );

    let (status, err) = regfs(&[
        "mount",
        "--daemon",
        "http://127.0.0.1:1",
        dir.to_str().expect("utf-8"),
    ]);
    assert_eq!(status.code(), Some(1));
    assert_one_line_error(&err, "does not answer /v2/");
}
