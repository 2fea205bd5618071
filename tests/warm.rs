//! Starts after the first (docs/SEMANTICS.md, "Disk cache" and "Image contents"), through
//! the kernel against a real registry: a second mount over the same disk cache reads the
//! files the first one read without the registry and without decoding (plain gzip and
//! eStargz); eStargz layers are fetched whole in the background once a file is opened,
//! counted apart from what reads needed, while reads go on; the files an eStargz
//! prefetch landmark names come first, at once; `--no-background-fetch` fetches nothing
//! in the background.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::images::{
    Containerd, assert_same_tree, build_rich_image, require_image_tools, snapshot, umoci_unpack,
};
use common::{Layout, Mount, Proxy, ProxyRules, Registry, get_manifest, require_tools, stat};

const MIB: u64 = 1 << 20;
/// The large file of the rich image: most of its first layer.
const BIG: usize = 24 << 20;
/// Small files of the rich image, read as a program starting would.
/// What a program reads of the large file.
const HEAD: usize = 1 << 20;
const SMALL_FILES: [&str; 6] = [
    "etc/os-release",
    "etc/hello.txt",
    "etc/added-later.txt",
    "data/hard1",
    "home/user/secret",
    "opt/fresh.txt",
];

fn setup() {
    require_tools();
    require_image_tools();
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The rich image pushed as `team/app:v1` (plain gzip), converted by ctr-remote to
/// eStargz as `team/app:<tag>` with `flags`; the rootfs `umoci unpack` makes of it.
fn rich_image(registry: &Registry, tag: &str, flags: &[&str]) -> (Layout, tempfile::TempDir) {
    let layout = Layout::new();
    build_rich_image(&layout, "rich", BIG);
    layout.push("rich", registry, "team/app:v1");
    let host = registry.addr.to_string();
    let containerd = Containerd::start();
    let mut all = vec!["--estargz"];
    all.extend_from_slice(flags);
    containerd.convert_with(
        &format!("{host}/team/app:v1"),
        &format!("{host}/team/app:{tag}"),
        &all,
    );
    let unpacked = temp_dir("regfs-umoci-");
    umoci_unpack(&layout, "rich", &unpacked.path().join("bundle"));
    (layout, unpacked)
}

fn rootfs(unpacked: &tempfile::TempDir) -> PathBuf {
    unpacked.path().join("bundle/rootfs")
}

/// The layers of `team/app:<tag>`: (digest, size).
fn layers_of(registry: &Registry, tag: &str) -> Vec<(String, u64)> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&get_manifest(registry, "team/app", tag).2).expect("JSON");
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().expect("digest").to_owned();
            (digest, l["size"].as_u64().expect("size"))
        })
        .collect()
}

/// Blob requests a mount made, and the blob bytes it received.
fn blob_traffic(mnt: &Mount) -> (u64, u64) {
    let requests = stat(mnt, &["requests", "blob_range"]) + stat(mnt, &["requests", "blob_stream"]);
    (requests, stat(mnt, &["fetched_bytes"]))
}

fn read_small_files(root: &Path, expected: &Path) {
    for file in SMALL_FILES {
        let got = fs::read(root.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        let want = fs::read(expected.join(file)).expect("the unpacked file");
        assert!(got == want, "{file}: wrong bytes");
    }
}

/// What a program starting reads: the small files, and the head of the large one.
fn start_program(root: &Path, expected: &Path) {
    read_small_files(root, expected);
    let mut head = vec![0u8; HEAD];
    let large = fs::File::open(root.join("data/large.bin")).expect("open large.bin");
    large.read_exact_at(&mut head, 0).expect("read its head");
    let mut want = vec![0u8; HEAD];
    let unpacked = fs::File::open(expected.join("data/large.bin")).expect("unpacked");
    unpacked.read_exact_at(&mut want, 0).expect("read");
    assert!(head == want, "large.bin: wrong bytes");
}

#[test]
fn a_second_mount_reads_what_the_first_read_without_the_registry_or_decoding() {
    setup();
    let registry = Registry::start();
    let (_layout, unpacked) = rich_image(&registry, "esgz", &[]);
    let expected = rootfs(&unpacked);
    for tag in ["v1", "esgz"] {
        let cache = temp_dir("regfs-warm-");
        let args = ["--cache-dir", arg(cache.path()), "--no-background-fetch"];
        let view = format!("team/app/tags/{tag}/rootfs");

        let first = Mount::start(&registry.url(), &args);
        start_program(&first.path(&view), &expected);
        assert!(stat(&first, &["images", "decodes"]) > 0, "{tag}: decoded");
        // --no-background-fetch: nothing but what the reads needed.
        thread::sleep(Duration::from_millis(800));
        assert_eq!(stat(&first, &["images", "background_bytes"]), 0, "{tag}");
        first.terminate();

        let second = Mount::start(&registry.url(), &args);
        start_program(&second.path(&view), &expected);
        let stats = second.stats();
        assert_eq!(blob_traffic(&second), (0, 0), "{tag}: {stats}");
        assert_eq!(stat(&second, &["images", "decodes"]), 0, "{tag}: {stats}");
        // The head of the large file read back from the disk (the file is not whole
        // there); the small ones read by the kernel itself where it can (FUSE
        // passthrough: root, Linux ≥ 6.9), else from the disk too.
        let from_disk = stat(&second, &["images", "decoded_from_disk"]);
        let passthrough = stat(&second, &["disk", "passthrough_opens"]);
        eprintln!("{tag}: {from_disk} decoded bytes from disk, {passthrough} passthrough opens");
        assert!(from_disk >= HEAD as u64, "{tag}: {stats}");
        if is_root() {
            assert!(passthrough >= SMALL_FILES.len() as u64, "{tag}: {stats}");
        }
        // And everything else as umoci unpack has it.
        let all = snapshot(&second.path(&view));
        assert_same_tree(&snapshot(&expected), &all, tag);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn estargz_layers_are_fetched_whole_in_the_background_once_a_file_is_opened() {
    setup();
    let registry = Registry::start();
    let (_layout, unpacked) = rich_image(&registry, "esgz", &[]);
    let expected = rootfs(&unpacked);
    let layers = layers_of(&registry, "esgz");
    let image: u64 = layers.iter().map(|l| l.1).sum();
    let mnt = Mount::start(&registry.url(), &[]);
    let root = mnt.path("team/app/tags/esgz/rootfs");

    // Looked up, nothing opened: nothing in the background (no landmark names files).
    assert!(fs::read_dir(&root).expect("ls").count() > 3);
    thread::sleep(Duration::from_millis(800));
    assert_eq!(stat(&mnt, &["images", "background_bytes"]), 0);

    // One file opened: the rest of every layer follows, below the reads that go on.
    read_small_files(&root, &expected);
    let mut during = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stat(&mnt, &["images", "background_layers"]) < layers.len() as u64 {
        assert!(Instant::now() < deadline, "not filled: {}", mnt.stats());
        read_small_files(&root, &expected);
        let busy = stat(&mnt, &["images", "background_bytes"]) > 0;
        during += usize::from(busy);
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("small files read {during} times while the background fetch ran");
    let (fetched, background) = (
        stat(&mnt, &["fetched_bytes"]),
        stat(&mnt, &["images", "background_bytes"]),
    );
    // Fetched once each: what reads needed (the TOCs, small files' chunks) plus the
    // rest in the background, never a layer twice.
    let foreground = fetched - background;
    assert!(foreground < 12 * MIB, "{foreground} bytes for small files");
    assert!(
        background <= image && background + foreground >= image,
        "background {background} + foreground {foreground} bytes of a {image}-byte image"
    );
    eventually("the layers kept whole on disk", || {
        stat(&mnt, &["disk", "verified_blobs"]) >= layers.len() as u64
    });

    // The large file was never read: it comes from the disk now, not the registry.
    let large = fs::read(root.join("data/large.bin")).expect("read large.bin");
    assert!(large == fs::read(expected.join("data/large.bin")).expect("unpacked"));
    assert_eq!(stat(&mnt, &["fetched_bytes"]), fetched, "read from disk");
    drop(mnt);

    // Layer by layer through their manifest, as a runtime stacks them: a file opened
    // in one layer fills the image's other layers too.
    let mnt = Mount::start(&registry.url(), &[]);
    let (digest, _, _) = get_manifest(&registry, "team/app", "esgz");
    let layer_dir = |l: &str| mnt.path(&format!("team/app/.images/{digest}/layers/{l}"));
    for (layer, _) in &layers {
        fs::read_dir(layer_dir(layer))
            .expect("ls a layer")
            .for_each(drop);
    }
    let added = fs::read(layer_dir(&layers[1].0).join("etc/added-later.txt"));
    assert_eq!(added.expect("read"), b"from the second layer\n");
    eventually("every layer filled", || {
        stat(&mnt, &["images", "background_layers"]) == layers.len() as u64
    });
}

#[test]
fn the_files_a_prefetch_landmark_names_come_first_and_no_background_fetch_means_none() {
    setup();
    let registry = Registry::start();
    let record = temp_dir("regfs-record-");
    let record_file = record.path().join("record.json");
    let wanted = ["etc/hello.txt", "bin/busybox"];
    let lines: Vec<String> = wanted
        .iter()
        .map(|p| format!("{{\"path\":\"{p}\"}}"))
        .collect();
    fs::write(&record_file, lines.join("\n")).expect("record file");
    let flags = ["--estargz-record-in", arg(&record_file)];
    let (_layout, unpacked) = rich_image(&registry, "prio", &flags);
    let expected = rootfs(&unpacked);
    let (digest, _, _) = get_manifest(&registry, "team/app", "prio");
    let (first_digest, first_layer) = layers_of(&registry, "prio").remove(0);
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let cache = temp_dir("regfs-landmark-");
    let args = ["--cache-dir", arg(cache.path())];
    let view = format!("team/app/.images/{digest}/rootfs");

    // --no-background-fetch: not even what the landmark names.
    let off_cache = temp_dir("regfs-off-");
    let off_args = [
        "--cache-dir",
        arg(off_cache.path()),
        "--no-background-fetch",
    ];
    let off = Mount::start(&proxy.url(), &off_args);
    assert!(fs::read_dir(off.path(&view)).expect("ls").count() > 3);
    thread::sleep(Duration::from_millis(800));
    assert_eq!(stat(&off, &["images", "background_bytes"]), 0);
    drop(off);

    // Looked up, nothing opened: what the landmark names is fetched at once, the rest
    // of the layer waits for a file to be opened.
    let first = Mount::start(&proxy.url(), &args);
    assert!(fs::read_dir(first.path(&view)).expect("ls").count() > 3);
    let mut last = 0;
    eventually("the prefetch done", || {
        thread::sleep(Duration::from_millis(300));
        let now = stat(&first, &["images", "background_bytes"]);
        std::mem::replace(&mut last, now) == now && now > 0
    });
    // (A layer smaller than a block is whole with its first block.)
    let whole = cache.path().join("blobs").join(&first_digest);
    assert!(!whole.exists(), "the first layer was fetched whole");
    assert!(
        last < first_layer / 2,
        "{last} of a {first_layer}-byte layer"
    );
    first.terminate();

    // The next mount (fetching nothing in the background itself) opens files, then
    // loses the registry: the files the landmark named read from the disk, a file
    // after it needs the registry.
    let second_args = [&args[..], &["--timeout", "2s", "--no-background-fetch"]].concat();
    let second = Mount::start(&proxy.url(), &second_args);
    let open = |file: &str| fs::File::open(second.path(&view).join(file)).expect("open");
    let opened: Vec<fs::File> = wanted.iter().map(|f| open(f)).collect();
    let mut large = open("data/large.bin");
    proxy.set_upstream_down(true);
    for (file, mut handle) in wanted.iter().zip(opened) {
        let mut got = Vec::new();
        let read = handle.read_to_end(&mut got);
        read.unwrap_or_else(|e| panic!("{file} without the registry: {e}"));
        assert!(
            got == fs::read(expected.join(file)).expect("unpacked"),
            "{file}"
        );
    }
    let mut got = Vec::new();
    assert!(
        large.read_to_end(&mut got).is_err(),
        "large.bin was not prefetched"
    );
}
