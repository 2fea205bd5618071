//! TOC layers stay lazy (docs/SEMANTICS.md, "Image contents"): an image with files of
//! odd sizes, converted by the real tools — `ctr-remote image convert` to eStargz and
//! zstd:chunked, `podman push --compression-format zstd:chunked` — is read through the
//! kernel. One small file moves only the TOCs and its chunk (counted at a proxy in
//! front of the registry: every blob request is a bounded range, none a stream), every
//! file reads as `umoci unpack` of the original has it, and no layer is read whole.

use crate::common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use common::images::{
    Containerd, GZIP_LAYER, assert_same_tree, push_layer_image, require_image_tools, snapshot,
    umoci_unpack,
};
use common::{Layout, Mount, Proxy, ProxyRules, Registry, noise, require_tools, run};

const MIB: usize = 1 << 20;
/// The chunk size ctr-remote cuts files into.
const CHUNK: usize = 4 * MIB;
const SMALL: &str = "etc/small.txt";
const SMALL_TEXT: &str = "one small file in a large image\n";

fn setup() {
    require_tools();
    require_image_tools();
    let podman = Command::new("podman").arg("--version").output();
    assert!(
        podman.is_ok_and(|o| o.status.success()),
        "podman is missing: run scripts/setup.sh (installs it with apt-get)"
    );
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Files of every size that trips a chunked reader: 1 byte, empty, a chunk ± 1, several
/// chunks and a remainder, compressible text, a run of zeros, many small files, links.
fn odd_files(root: &Path) {
    write(root, SMALL, SMALL_TEXT.as_bytes());
    write(root, "odd/one", b"x");
    write(root, "odd/empty", b"");
    write(root, "odd/chunk-1", &noise(CHUNK - 1, 1));
    write(root, "odd/chunk", &noise(CHUNK, 2));
    write(root, "odd/chunk+1", &noise(CHUNK + 1, 3));
    write(root, "odd/several", &noise(3 * CHUNK + 12_345, 4));
    let text: Vec<u8> = b"a line of text that compresses well\n"
        .iter()
        .copied()
        .cycle()
        .take(9 * MIB + 17)
        .collect();
    write(root, "odd/text", &text);
    let mut sparse = noise(100_000, 5);
    sparse.extend(vec![0u8; MIB]);
    sparse.extend(noise(100_001, 6));
    write(root, "odd/zeros", &sparse);
    fs::hard_link(root.join("odd/chunk+1"), root.join("odd/hardlink")).expect("hardlink");
    symlink("chunk+1", root.join("odd/symlink")).expect("symlink");
    for i in 0..40u32 {
        let len = (i as usize * 7919) % 20_000;
        write(root, &format!("small/f{i}"), &noise(len, 100 + i));
    }
    write(root, "big/noise.bin", &noise(16 * MIB, 7));
}

/// The odd image, tagged `odd` in `layout`: the files above, then a second layer that
/// adds one file and deletes another.
fn build_odd_image(layout: &Layout) {
    let image = format!("{}:odd", layout.oci_dir().display());
    let bundle = layout.scratch("bundle-odd");
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    odd_files(&rootfs);
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &image])
        .arg(&bundle));
    write(&rootfs, "etc/second-layer.txt", b"from the second layer\n");
    fs::remove_file(rootfs.join("odd/one")).expect("rm");
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout.set_platform("odd", "amd64");
    fs::remove_dir_all(&bundle).expect("remove bundle");
}

/// `podman push --compression-format zstd:chunked` of the layout's `odd` image to
/// `dest`, from a podman store of its own (vfs, in a temp dir).
fn podman_push(layout: &Layout, dest: &str) {
    let store = tempfile::Builder::new()
        .prefix("regfs-podman-")
        .tempdir()
        .expect("temp dir");
    let podman = || {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(store.path().join("root"))
            .arg("--runroot")
            .arg(store.path().join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    };
    // podman names what it pulls after the layout's path, which must be lowercase.
    let lower = std::env::temp_dir().join(format!(
        "regfs-podman-layout-{}",
        store
            .path()
            .display()
            .to_string()
            .to_lowercase()
            .replace('/', "-")
    ));
    symlink(layout.oci_dir(), &lower).expect("symlink the layout");
    let pulled = Command::new("podman")
        .args(["--root"])
        .arg(store.path().join("root"))
        .arg("--runroot")
        .arg(store.path().join("run"))
        .args(["--storage-driver", "vfs", "pull", "-q"])
        .arg(format!("oci:{}:odd", lower.display()))
        .output();
    fs::remove_file(&lower).expect("remove the symlink");
    let pulled = pulled.expect("run podman");
    common::assert_success(&pulled, "podman pull");
    let id = String::from_utf8_lossy(&pulled.stdout).into_owned();
    run(podman()
        .args(["push", "--tls-verify=false", "--format", "oci"])
        .args(["--compression-format", "zstd:chunked", id.trim(), dest]));
}

/// Bytes the proxy saw asked for in blob range requests from `from` on, and whether
/// every blob request since was a bounded range.
fn moved_since(proxy: &Proxy, repo: &str, from: (usize, usize)) -> (u64, usize, bool) {
    let ranges = proxy.ranges_seen();
    let bytes = ranges[from.0..]
        .iter()
        .map(|r| {
            let (a, b) = r
                .trim_start_matches("bytes=")
                .split_once('-')
                .unwrap_or_else(|| panic!("a bounded range: {r}"));
            let a: u64 = a.parse().expect("range start");
            let b: u64 = b.parse().unwrap_or_else(|_| panic!("a bounded range: {r}"));
            b - a + 1
        })
        .sum();
    let gets = proxy.requests_matching(&format!("GET /v2/{repo}/blobs/")) - from.1;
    (bytes, ranges.len() - from.0, gets == ranges.len() - from.0)
}

fn counters(proxy: &Proxy, repo: &str) -> (usize, usize) {
    (
        proxy.ranges_seen().len(),
        proxy.requests_matching(&format!("GET /v2/{repo}/blobs/")),
    )
}

#[test]
fn toc_layers_of_ctr_remote_and_podman_move_only_what_a_file_needs() {
    setup();
    let registry = Registry::start();
    let host = registry.addr.to_string();
    let layout = Layout::new();
    build_odd_image(&layout);
    // podman first: once skopeo has pushed the gzip layers to this registry, podman
    // would reuse them instead of compressing (its blob info cache).
    podman_push(&layout, &format!("{host}/toc/app:podman"));
    layout.push("odd", &registry, "toc/app:v1");
    let containerd = Containerd::start();
    let v1 = format!("{host}/toc/app:v1");
    containerd.convert(&v1, &format!("{host}/toc/app:esgz"), "--estargz");
    containerd.convert(&v1, &format!("{host}/toc/app:zchunk"), "--zstdchunked");
    drop(containerd);
    let unpacked = tempfile::tempdir().expect("temp dir");
    let expected = snapshot(&umoci_unpack(&layout, "odd", &unpacked.path().join("b")));
    assert!(expected.paths.contains_key(Path::new("odd/several")));
    let proxy = Proxy::start(registry.addr, ProxyRules::default());

    for tag in ["esgz", "zchunk", "podman"] {
        let manifest = common::get_manifest(&registry, "toc/app", tag).2;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("JSON");
        let layers = manifest["layers"].as_array().expect("layers");
        let image: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
        assert!(
            layers.iter().all(|l| l["annotations"].is_object()),
            "{tag}: every layer announces a TOC: {manifest}"
        );

        // A cold mount reads one small file: the TOCs and one chunk, by bounded ranges.
        let mnt = Mount::start(&proxy.url(), &["--no-disk-cache"]);
        let start = counters(&proxy, "toc/app");
        let small = mnt.path(&format!("toc/app/tags/{tag}/rootfs/{SMALL}"));
        assert_eq!(
            fs::read_to_string(&small).expect("read"),
            SMALL_TEXT,
            "{tag}"
        );
        let (bytes, requests, all_ranges) = moved_since(&proxy, "toc/app", start);
        eprintln!(
            "{tag}: one small file of a {image}-byte image: {bytes} bytes in {requests} range requests"
        );
        assert!(
            all_ranges,
            "{tag}: a blob request without a range (a stream)"
        );
        // Its request may bring the files after it in the blob along, within 512 KiB.
        let stats = mnt.stats();
        let ahead = stats["images"]["read_ahead_bytes"].as_u64().expect("stats");
        assert!(ahead <= 512 << 10, "{tag}: {ahead} bytes read ahead");
        assert!(
            bytes.saturating_sub(ahead) < 512 << 10 && requests <= 2 * layers.len() + 1,
            "{tag}: one small file of a {image}-byte image moved {bytes} bytes ({ahead} along) in {requests} requests"
        );
        assert_eq!(stats["images"]["toc_unused"], 0, "{tag}: {stats}");
        assert_eq!(stats["requests"]["blob_stream"], 0, "{tag}: {stats}");

        // Every file reads right, and still no layer was read whole.
        let view = mnt.path(&format!("toc/app/tags/{tag}/rootfs"));
        assert_same_tree(
            &expected,
            &snapshot(&view),
            &format!("{tag} vs umoci unpack"),
        );
        let stats = mnt.stats();
        assert_eq!(stats["images"]["toc_unused"], 0, "{tag}: {stats}");
        assert_eq!(stats["requests"]["blob_stream"], 0, "{tag}: {stats}");
        let (bytes, _, all_ranges) = moved_since(&proxy, "toc/app", start);
        assert!(all_ranges, "{tag}: a stream while reading every file");
        assert!(
            bytes < image + image / 8,
            "{tag}: reading every file moved {bytes} bytes of a {image}-byte image"
        );
        assert!(!mnt.log().contains("TOC unusable"), "{tag}: {}", mnt.log());
    }
}

#[test]
fn a_toc_that_cannot_be_used_is_counted_and_its_files_still_read() {
    setup();
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let script = r#"
import io, sys, tarfile, gzip
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
    info = tarfile.TarInfo("etc/file"); data = b"a plain gzip layer\n"; info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
open(sys.argv[1], "wb").write(gzip.compress(buf.getvalue()))
"#;
    let path = dir.path().join("layer.tar.gz");
    run(Command::new("python3").args(["-c", script]).arg(&path));
    let blob = fs::read(&path).expect("layer");
    // Announces an eStargz TOC it does not have.
    let annotations = serde_json::json!({
        "containerd.io/snapshot/stargz/toc.digest": format!("sha256:{}", "0".repeat(64)),
    });
    let layer = push_layer_image(&registry, "fake", "v1", &blob, GZIP_LAYER, annotations);
    let mnt = Mount::start(&registry.url(), &[]);
    assert_eq!(
        fs::read_to_string(mnt.path("fake/tags/v1/rootfs/etc/file")).expect("read"),
        "a plain gzip layer\n"
    );
    let images = &mnt.stats()["images"];
    assert_eq!(images["toc_unused"], 1, "{images}");
    let why = images["toc_unused_why"][&layer]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("no eStargz footer"), "{images}");
    let log = mnt.log();
    assert!(
        log.contains("TOC unusable") && log.contains(&layer),
        "the log says which layer is read whole and why:\n{log}"
    );
}
