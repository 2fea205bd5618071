//! Image contents through the kernel (DESIGN §7): `tags/<tag>/rootfs/`,
//! `.images/<digest>/rootfs/` and `.layers/<digest>/` against a real registry, with
//! images built by umoci, converted by ctr-remote and skopeo, compared with what
//! `umoci unpack` makes, run with chroot and stacked with overlayfs.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::images::{
    Containerd, GZIP_LAYER, LONG_NAME, UTF8_DIR, assert_same_tree, build_rich_image,
    hostile_layers, push_layer_image, require_image_tools, snapshot, umoci_unpack, xattrs,
};
use common::{Layout, Mount, Registry, RssSampler, get_manifest, ls, require_tools, run};

const BIG: usize = 64 << 20;

fn setup() {
    require_tools();
    require_image_tools();
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

fn requests(mnt: &Mount) -> u64 {
    let s = mnt.stats();
    ["blob_range", "blob_stream"]
        .iter()
        .map(|k| s["requests"][k].as_u64().unwrap_or(0))
        .sum()
}

/// The rich image, pushed as `team/app:v1`, and `umoci unpack` of it.
fn rich(registry: &Registry, big: usize) -> (Layout, tempfile::TempDir, PathBuf) {
    let layout = Layout::new();
    build_rich_image(&layout, "rich", big);
    layout.push("rich", registry, "team/app:v1");
    let unpacked = tempfile::Builder::new()
        .prefix("regfs-umoci-")
        .tempdir()
        .expect("temp dir");
    let rootfs = umoci_unpack(&layout, "rich", &unpacked.path().join("bundle"));
    (layout, unpacked, rootfs)
}

#[test]
fn rootfs_is_what_umoci_unpack_makes() {
    setup();
    let registry = Registry::start();
    let (_layout, _unpacked, rootfs) = rich(&registry, BIG);
    let expected = snapshot(&rootfs);
    // The fixture has what this test is about.
    for path in [
        "dev/fifo",
        "dev/null",
        "data/large.bin",
        "links/dangling",
        "opt/fresh.txt",
        "etc/added-later.txt",
    ] {
        assert!(
            expected.paths.contains_key(Path::new(path)),
            "umoci unpack has {path}"
        );
    }
    for gone in ["etc/gone.txt", "opt/old"] {
        assert!(
            !expected.paths.contains_key(Path::new(gone)),
            "{gone} is whited out"
        );
    }
    assert_eq!(expected.hardlinks.len(), 1, "one hardlink pair");

    let mnt = Mount::start(&registry.url(), &[]);
    let view = mnt.path("team/app/tags/v1/rootfs");
    assert_same_tree(
        &expected,
        &snapshot(&view),
        "tags/v1/rootfs vs umoci unpack",
    );
    let (digest, _, _) = get_manifest(&registry, "team/app", "v1");
    let by_digest = mnt.path(&format!("team/app/.images/{digest}/rootfs"));
    assert_same_tree(
        &expected,
        &snapshot(&by_digest),
        ".images/<digest>/rootfs vs umoci unpack",
    );

    // What a user checks by hand.
    assert_eq!(
        fs::read_to_string(view.join("etc/os-release")).expect("read"),
        "NAME=regfs-test\nID=regfs\n"
    );
    assert_eq!(
        xattrs(&view.join("etc/hello.txt"))
            .get("user.note")
            .map(Vec::as_slice),
        Some(&b"kept by PAX"[..])
    );
    assert_eq!(
        fs::read_link(view.join("links/relative")).expect("readlink"),
        Path::new("../etc/hello.txt")
    );
    let deep = view.join(format!("names/{}/{LONG_NAME}", "d".repeat(150)));
    assert_eq!(
        fs::read_to_string(deep).expect("long names"),
        "deep and long\n"
    );
    assert_eq!(ls(&view.join(UTF8_DIR)), ["ファイル.txt"]);
    let mut large = fs::File::open(view.join("data/large.bin")).expect("open large");
    large.seek(SeekFrom::Start(40 << 20)).expect("seek");
    let mut piece = vec![0u8; 4096];
    large.read_exact(&mut piece).expect("read in the middle");
    assert_eq!(piece, common::noise(BIG, 42)[40 << 20..(40 << 20) + 4096]);

    // The views are not listed: grep -r, find and rsync -a see the registry's objects once.
    assert_eq!(
        ls(&mnt.path("team/app")),
        ["blobs", "manifests", "tags", "uploads"]
    );
    assert_eq!(ls(&mnt.path("team/app/tags/v1")), ["manifest.json"]);
    let backup = tempfile::tempdir().expect("temp dir");
    run(Command::new("rsync")
        .arg("-a")
        .arg(mnt.path("team/app/"))
        .arg(backup.path()));
    let found = run(Command::new("find").arg(backup.path()));
    assert!(
        !found.contains("rootfs") && !found.contains(".layers") && !found.contains(".images"),
        "{found}"
    );

    // Read-only: an image is not a place to write.
    let err = fs::write(view.join("etc/new"), b"x")
        .err()
        .and_then(|e| e.raw_os_error());
    assert_eq!(err, Some(libc::EROFS));
}

#[test]
fn a_second_read_costs_one_or_two_range_requests_and_a_new_mount_needs_no_pass() {
    setup();
    let registry = Registry::start();
    let (_layout, _unpacked, _) = rich(&registry, 16 << 20);
    let disk = tempfile::tempdir().expect("temp dir");
    let cache_dir = disk.path().to_str().expect("UTF-8 path");
    // A memory cache smaller than the layer: what the pass streamed is gone from memory.
    let args = ["--cache-size", "4MiB", "--cache-dir", cache_dir];
    let mnt = Mount::start(&registry.url(), &args);
    let view = mnt.path("team/app/tags/v1/rootfs");
    assert_eq!(
        fs::read_to_string(view.join("etc/hello.txt")).expect("first read"),
        "hello from the image\n"
    );
    assert_eq!(mnt.stats()["images"]["layers_indexed"].as_u64(), Some(3));
    let before = requests(&mnt);
    assert_eq!(
        fs::read_to_string(view.join("etc/os-release")).expect("second read"),
        "NAME=regfs-test\nID=regfs\n"
    );
    let used = requests(&mnt) - before;
    assert!(used <= 2, "a second file cost {used} blob requests");
    drop(mnt);

    // A new mount on the same disk cache finds the indexes there: no pass.
    let mnt = Mount::start(&registry.url(), &args);
    let view = mnt.path("team/app/tags/v1/rootfs");
    assert_eq!(
        fs::read_to_string(view.join("etc/os-release")).expect("read"),
        "NAME=regfs-test\nID=regfs\n"
    );
    let images = &mnt.stats()["images"];
    assert_eq!(images["layers_indexed"].as_u64(), Some(0), "{images}");
    assert_eq!(images["indexes_from_disk"].as_u64(), Some(3), "{images}");
    assert!(requests(&mnt) <= 2, "{}", mnt.stats());
}

#[test]
fn every_layer_format_shows_the_same_files_and_toc_layers_fetch_little() {
    setup();
    let registry = Registry::start();
    let (layout, _unpacked, rootfs) = rich(&registry, BIG);
    let expected = snapshot(&rootfs);
    let host = registry.addr.to_string();
    let containerd = Containerd::start();
    containerd.convert(
        &format!("{host}/team/app:v1"),
        &format!("{host}/team/app:esgz"),
        "--estargz",
    );
    containerd.convert(
        &format!("{host}/team/app:v1"),
        &format!("{host}/team/app:zchunk"),
        "--zstdchunked",
    );
    drop(containerd);
    // Plain zstd, as skopeo writes it (one frame).
    let zstd_dir = layout.scratch("zstd-oci");
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-compress-format",
            "zstd",
            "--dest-compress",
        ])
        .arg(format!("oci:{}:rich", layout.oci_dir().display()))
        .arg(format!("oci:{}:z", zstd_dir.display())));
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:z", zstd_dir.display()))
        .arg(format!("docker://{host}/team/app:zstd")));
    for (tag, media_type) in [
        ("esgz", "tar+gzip"),
        ("zchunk", "tar+zstd"),
        ("zstd", "tar+zstd"),
    ] {
        let manifest: serde_json::Value =
            serde_json::from_slice(&get_manifest(&registry, "team/app", tag).2).expect("JSON");
        let first = manifest["layers"][0]["mediaType"]
            .as_str()
            .unwrap_or_default();
        assert!(
            first.ends_with(media_type),
            "{tag} has {media_type} layers: {first}"
        );
    }

    // A TOC layer: one small file from a fresh mount costs a few MiB, not the image
    // (what reads need: the rest of the layers is not fetched in the background).
    for tag in ["esgz", "zchunk"] {
        let mnt = Mount::start(&registry.url(), &["--no-background-fetch"]);
        let hello = mnt.path(&format!("team/app/tags/{tag}/rootfs/etc/hello.txt"));
        assert_eq!(
            fs::read_to_string(&hello).expect("read"),
            "hello from the image\n",
            "{tag}"
        );
        let fetched = mnt.stats()["fetched_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(
            fetched < 12 << 20,
            "{tag}: {fetched} bytes fetched for one small file of a {BIG}-byte image"
        );
    }

    let mnt = Mount::start(&registry.url(), &[]);
    for tag in ["esgz", "zchunk", "zstd"] {
        let view = mnt.path(&format!("team/app/tags/{tag}/rootfs"));
        assert_same_tree(
            &expected,
            &snapshot(&view),
            &format!("{tag} vs umoci unpack of the original"),
        );
    }
    drop(mnt);

    // Wrong bytes from the registry: a flipped byte inside large.bin's chunk of the
    // eStargz layer is EIO for that file (chunk digest), while other files still read.
    let manifest: serde_json::Value =
        serde_json::from_slice(&get_manifest(&registry, "team/app", "esgz").2).expect("JSON");
    let first_layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let hex = first_layer.trim_start_matches("sha256:");
    let data = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut blob = fs::read(&data).expect("registry blob");
    let middle = blob.len() / 2;
    blob[middle] ^= 0xff;
    fs::write(&data, &blob).expect("corrupt the stored blob");
    let mnt = Mount::start(&registry.url(), &[]);
    let view = mnt.path("team/app/tags/esgz/rootfs");
    assert_eq!(
        errno_of(fs::read(view.join("data/large.bin"))),
        Some(libc::EIO)
    );
    assert_eq!(
        fs::read_to_string(view.join("etc/hello.txt")).expect("other files read"),
        "hello from the image\n"
    );
    assert!(
        mnt.log().contains("chunk at byte"),
        "the log says which chunk failed"
    );
}

#[test]
fn a_process_runs_from_the_view_and_overlayfs_stacks_the_layers() {
    setup();
    let registry = Registry::start();
    let (_layout, _unpacked, _) = rich(&registry, 1 << 20);
    let mnt = Mount::start(&registry.url(), &[]);
    let view = mnt.path("team/app/tags/v1/rootfs");
    let out = run(Command::new("unshare")
        .args(["-m", "-p", "-f", "chroot"])
        .arg(&view)
        .args([
            "/bin/sh",
            "-c",
            "cat /etc/os-release; ls /data | wc -l; readlink /links/relative; cat /opt/fresh.txt",
        ]));
    assert_eq!(
        out,
        "NAME=regfs-test\nID=regfs\n4\n../etc/hello.txt\nafter the opaque whiteout\n"
    );

    // The layers as overlayfs lowerdirs (top first; `:` in a digest escaped) make the same tree.
    let manifest: serde_json::Value =
        serde_json::from_slice(&get_manifest(&registry, "team/app", "v1").2).expect("JSON");
    let lowers: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .rev()
        .map(|l| {
            let dir = mnt.path(&format!(
                "team/app/.layers/{}",
                l["digest"].as_str().expect("digest")
            ));
            dir.display().to_string().replace(':', "\\:")
        })
        .collect();
    let merged = tempfile::tempdir().expect("temp dir");
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}", lowers.join(":")))
        .arg(merged.path()));
    let stacked = snapshot(merged.path());
    run(Command::new("umount").arg(merged.path()));
    assert_same_tree(&snapshot(&view), &stacked, "overlayfs of .layers vs rootfs");
}

#[test]
fn hostile_layers_get_clear_errors_and_nothing_outside_the_view() {
    setup();
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = hostile_layers(dir.path());
    for (case, media_type, blob) in &cases {
        push_layer_image(
            &registry,
            "hostile",
            case,
            blob,
            media_type,
            serde_json::Value::Null,
        );
    }
    let mnt = Mount::start(&registry.url(), &[]);
    let rss = RssSampler::start(mnt.pid());
    let root = |case: &str| mnt.path(&format!("hostile/tags/{case}/rootfs"));

    // Names: climbing out is refused, absolute names are made relative, the last of
    // duplicates wins, a hardlink to nothing and an entry under a file are not shown.
    let names = root("names");
    assert_eq!(
        ls(&names),
        ["abs", "d", "dup.txt", "ok.txt", "plainfile", "sym"]
    );
    assert_eq!(
        fs::read_to_string(names.join("abs/file.txt")).expect("abs"),
        "absolute"
    );
    assert_eq!(
        fs::read_to_string(names.join("dup.txt")).expect("dup"),
        "second"
    );
    assert_eq!(
        fs::read_link(names.join("sym")).expect("sym"),
        Path::new("/etc/passwd")
    );
    assert!(
        fs::symlink_metadata(names.join("plainfile"))
            .expect("plainfile")
            .is_file()
    );
    assert!(mnt.log().contains("`..`"), "refusals are logged");

    // Unreadable layers are EIO, with the reason in the log.
    for case in [
        "huge-claim",
        "truncated",
        "corrupt",
        "not-gzip",
        "not-tar",
        "unknown-type",
        "zstd-bomb",
    ] {
        assert_eq!(
            errno_of(fs::read_dir(root(case))),
            Some(libc::EIO),
            "{case}"
        );
    }
    let log = mnt.log();
    assert!(
        log.contains("application/vnd.example.not-a-layer"),
        "the log names the media type"
    );
    assert!(
        log.contains("decompression bomb"),
        "the zstd bomb is named as one"
    );

    // Gigabytes of zeros from two MiB: a valid layer, indexed in bounded memory.
    let zeros = root("gzip-bomb").join("zeros");
    assert_eq!(fs::metadata(&zeros).expect("stat").len(), 2 << 30);
    let mut f = fs::File::open(&zeros).expect("open");
    f.seek(SeekFrom::Start(1 << 30)).expect("seek");
    let mut buf = vec![1u8; 1 << 20];
    f.read_exact(&mut buf).expect("read a GiB in");
    assert!(buf.iter().all(|&b| b == 0));
    let peak = rss.stop().peak_mib();
    assert!(
        peak < 200,
        "peak RSS {peak} MiB while indexing hostile layers"
    );

    // The daemon is alive and well.
    assert!(mnt.stats()["images"]["layers_indexed"].as_u64() >= Some(2));
    assert!(ls(&mnt.path("hostile/tags")).contains(&"names".to_owned()));
}

#[test]
fn wrong_bytes_of_a_plain_layer_are_eio() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("v1", "amd64", &[("etc/file", b"the right bytes\n")]);
    layout.push("v1", &registry, "plain/app:v1");
    let manifest: serde_json::Value =
        serde_json::from_slice(&get_manifest(&registry, "plain/app", "v1").2).expect("JSON");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let hex = layer.trim_start_matches("sha256:");
    let data = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut blob = fs::read(&data).expect("registry blob");
    let last = blob.len() - 9; // inside the deflate stream's end: content changes, gzip may not notice
    blob[last] ^= 0x01;
    fs::write(&data, &blob).expect("corrupt the stored blob");
    let mnt = Mount::start(&registry.url(), &[]);
    assert_eq!(
        errno_of(fs::read_dir(mnt.path("plain/app/tags/v1/rootfs"))),
        Some(libc::EIO)
    );
    assert!(mnt.log().contains(&layer), "the log names the layer");
}

#[test]
fn a_layer_of_100000_files_is_indexed_within_bounds() {
    setup();
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let layer = dir.path().join("many.tar.gz");
    let script = r#"
import io, sys, tarfile, gzip
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tar:
    for d in range(100):
        info = tarfile.TarInfo(f"d{d:03}"); info.type = tarfile.DIRTYPE; info.mode = 0o755
        tar.addfile(info)
        for f in range(1000):
            info = tarfile.TarInfo(f"d{d:03}/file-{f:04}"); info.size = 0
            tar.addfile(info)
open(sys.argv[1], "wb").write(gzip.compress(buf.getvalue(), 1))
"#;
    run(Command::new("python3").args(["-c", script]).arg(&layer));
    let blob = fs::read(&layer).expect("layer");
    push_layer_image(
        &registry,
        "many",
        "v1",
        &blob,
        GZIP_LAYER,
        serde_json::Value::Null,
    );
    let mnt = Mount::start(&registry.url(), &[]);
    let root = mnt.path("many/tags/v1/rootfs");
    let dirs = ls(&root);
    assert_eq!(dirs.len(), 100);
    let files: usize = dirs
        .iter()
        .map(|d| fs::read_dir(root.join(d)).expect("read_dir").count())
        .sum();
    assert_eq!(files, 100_000);
    let index = mnt.stats()["images"]["index_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        index < 64 << 20,
        "index of 100,000 files holds {index} bytes"
    );
}

#[test]
fn an_index_shows_the_image_of_the_platform() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("amd", "amd64", &[("arch", b"amd64\n")]);
    layout.new_image("arm", "arm64", &[("arch", b"arm64\n")]);
    layout.push_index(&["amd", "arm"], &registry, "multi/app:v1");
    let host = Mount::start(&registry.url(), &[]);
    let expected = if cfg!(target_arch = "aarch64") {
        "arm64\n"
    } else {
        "amd64\n"
    };
    assert_eq!(
        fs::read_to_string(host.path("multi/app/tags/v1/rootfs/arch")).expect("read"),
        expected
    );
    drop(host);
    let arm = Mount::start(&registry.url(), &["--platform", "linux/arm64"]);
    assert_eq!(
        fs::read_to_string(arm.path("multi/app/tags/v1/rootfs/arch")).expect("read"),
        "arm64\n"
    );
    drop(arm);
    let none = Mount::start(&registry.url(), &["--platform", "linux/s390x"]);
    assert_eq!(
        errno_of(fs::read_dir(none.path("multi/app/tags/v1/rootfs"))),
        Some(libc::ENOENT)
    );
}
