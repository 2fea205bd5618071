//! What a container sees of an image served by regfs, for every format `ctr-remote`
//! pulls lazily: a two-layer gzip image with a whiteout, an opaque directory, a
//! hardlink, symlinks, xattrs and a file of several chunks and a remainder, and its
//! eStargz and zstd:chunked conversions (`ctr-remote image convert`). Each is pulled
//! with `ctr-remote image rpull` (containerd downloads no layer) and listed from inside
//! a container (modes, owners, sizes, link counts and targets, SHA-256 of every file)
//! as `umoci unpack` of the original makes it; xattrs are read through the container's
//! root filesystem. A TOC image's start moves a small part of its bytes.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::common::images::{
    Containerd as Converter, GZIP_LAYER, add_layer, set_xattr, umoci_unpack, xattrs,
};
use super::common::{Layout, Registry, get_manifest, noise, run};
use super::containerd::Rig;
use super::harness::wait_until;

const REPO: &str = "t/rich";
/// The chunk size ctr-remote cuts files into.
const CHUNK: usize = 4 << 20;

/// Lists the tree under the working directory with busybox alone (so the same
/// command runs on the host and in the image): each path with its mode (hex, type
/// included) and owner; a file's size, link count and SHA-256; a symlink's target. The
/// mount points runc makes (/proc, /sys, /dev, /run) are left out.
const LISTING: &str = r#"busybox find . -mindepth 1 \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \) -prune -o -print | busybox sort | while IFS= read -r p; do
  if [ -L "$p" ]; then echo "$p $(busybox stat -c '%f %u:%g' "$p") -> $(busybox readlink "$p")"
  elif [ -d "$p" ]; then echo "$p $(busybox stat -c '%f %u:%g' "$p")"
  else echo "$p $(busybox stat -c '%f %u:%g %s %h' "$p") $(busybox sha256sum "$p" | busybox cut -d' ' -f1)"
  fi
done"#;

fn write(root: &Path, rel: &str, data: &[u8]) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).unwrap();
    std::fs::write(&path, data).unwrap();
    path
}

/// The first layer's files: busybox (and the applets a container starts with), the
/// files the second layer deletes or hides, and one of each kind the issue names.
fn first_layer(root: &Path) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static (scripts/setup.sh)");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "cat"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let hello = write(root, "etc/hello.txt", b"hello from the image\n");
    set_xattr(&hello, "user.note", b"kept by PAX");
    set_xattr(&hello, "user.binary", &[0, 1, 2, 255]);
    write(root, "etc/gone.txt", b"deleted by the second layer\n");
    write(root, "opt/old/one", b"hidden by the opaque directory\n");
    write(root, "opt/old/two", b"hidden too\n");
    // Three chunks and a remainder.
    let several = write(root, "data/several", &noise(3 * CHUNK + 12_345, 7));
    std::fs::set_permissions(&several, std::fs::Permissions::from_mode(0o640)).unwrap();
    let one = write(root, "data/hard1", b"one inode, two names\n");
    std::fs::hard_link(&one, root.join("data/hard2")).unwrap();
    write(root, "data/empty", b"");
    std::fs::create_dir_all(root.join("links")).unwrap();
    symlink("../etc/hello.txt", root.join("links/relative")).unwrap();
    symlink("/etc/hello.txt", root.join("links/absolute")).unwrap();
    symlink("/nowhere/at/all", root.join("links/dangling")).unwrap();
    let secret = write(root, "home/user/secret", b"owned by 1000\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::lchown(&secret, Some(1000), Some(1000)).unwrap();
}

/// The second layer, written by Python's tarfile (umoci writes no opaque whiteouts):
/// `etc/gone.txt` deleted, `opt/` made opaque with one new file, a file added.
fn second_layer(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let script = r#"
import io, sys, tarfile, gzip
entries = [("etc/.wh.gone.txt", b""), ("opt/.wh..wh..opq", b""),
           ("opt/fresh.txt", b"after the opaque whiteout\n"), ("etc/added.txt", b"from the second layer\n")]
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for name, data in entries:
        info = tarfile.TarInfo(name); info.size = len(data); info.mode = 0o644; info.mtime = 1700000000
        tar.addfile(info, io.BytesIO(data))
open(sys.argv[1] + "/second.tar", "wb").write(buf.getvalue())
open(sys.argv[1] + "/second.tar.gz", "wb").write(gzip.compress(buf.getvalue()))
"#;
    run(Command::new("python3").args(["-c", script]).arg(dir));
    (
        std::fs::read(dir.join("second.tar")).unwrap(),
        std::fs::read(dir.join("second.tar.gz")).unwrap(),
    )
}

/// The image, tagged `rich` in `layout`.
fn build_image(layout: &Layout) {
    let image = format!("{}:rich", layout.oci_dir().display());
    let bundle = layout.scratch("bundle-rich");
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    first_layer(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout.set_platform("rich", "amd64");
    let (tar, gz) = second_layer(&layout.scratch("second"));
    add_layer(layout, "rich", &tar, &gz, GZIP_LAYER);
    std::fs::remove_dir_all(&bundle).unwrap();
}

/// [`LISTING`] of `root` on the host.
fn listing_of(root: &Path) -> String {
    run(Command::new("busybox")
        .args(["sh", "-c", LISTING])
        .current_dir(root))
}

/// The image's layers (digest, size), from the registry.
fn layers_of(registry: &Registry, tag: &str) -> Vec<(String, u64)> {
    let (_, _, bytes) = get_manifest(registry, REPO, tag);
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Blob bytes the mount fetched for readers (not in the background).
fn foreground_bytes(stats: &serde_json::Value) -> u64 {
    let all = stats["fetched_bytes"].as_u64().unwrap_or(0);
    all.saturating_sub(stats["images"]["background_bytes"].as_u64().unwrap_or(0))
}

/// Every path the listing names has the same xattrs in `actual` as in `expected`.
fn assert_same_xattrs(listing: &str, expected: &Path, actual: &Path, what: &str) {
    let hello = xattrs(&expected.join("etc/hello.txt"));
    assert_eq!(hello.len(), 2, "umoci kept the xattrs: {hello:?}");
    for line in listing.lines() {
        let path = line.split(' ').next().expect("a path");
        assert_eq!(
            xattrs(&expected.join(path)),
            xattrs(&actual.join(path)),
            "{what}: xattrs of {path}"
        );
    }
}

/// rpull of `tag`, then a container: no layer downloaded, the tree as `expected`
/// lists it, and for a TOC image a start that moved little.
fn check_format(rig: &Rig, tag: &str, expected_root: &Path, expected: &str) {
    let (ctr, host) = (rig.ctr(), rig.host());
    let image = format!("{host}/{REPO}:{tag}");
    let layers = layers_of(&rig.registry, tag);
    let image_bytes: u64 = layers.iter().map(|(_, size)| size).sum();
    let before = foreground_bytes(&rig.snapshotter.mount_stats(&host));
    ctr.ctr_ok(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "regfs",
        &image,
    ]);
    let content = ctr.ctr_ok(&["content", "ls", "-q"]);
    for (layer, _) in &layers {
        assert!(
            !content.contains(layer.as_str()),
            "{tag}: layer {layer} downloaded"
        );
    }

    let id = rig.id(tag);
    ctr.start_sleeper(&image, &id);
    let toc = tag != "gzip";
    if toc {
        // A fetch is counted once done, and the start may not wait for all of one.
        let mut stats = serde_json::Value::Null;
        wait_until(
            Duration::from_secs(30),
            "the start's fetches to end",
            || {
                stats = rig.snapshotter.mount_stats(&host);
                stats["in_flight"] == 0
            },
        );
        let moved = foreground_bytes(&stats) - before;
        eprintln!("{tag}: pull and start moved {moved} of {image_bytes} bytes");
        assert!(
            moved < image_bytes / 4,
            "{tag}: pull and start moved {moved} bytes of a {image_bytes}-byte image: {stats}"
        );
        assert_eq!(stats["images"]["toc_unused"], 0, "{tag}: {stats}");
    }
    let script = format!("cd / && {LISTING}");
    let seen = ctr.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "list",
        &id,
        "sh",
        "-c",
        &script,
    ]);
    assert_lines_eq(expected, &seen, tag);
    assert_same_xattrs(expected, expected_root, &ctr.rootfs(&id), tag);
    if toc {
        let stats = rig.snapshotter.mount_stats(&host);
        assert_eq!(stats["images"]["toc_unused"], 0, "{tag}: {stats}");
    }
    ctr.kill_task(&id);
    // Its snapshots go with it (the next format's layers could share chain IDs), and
    // so do their mounts; the host's stays.
    ctr.ctr_ok(&["image", "rm", "--sync", &image]);
    assert_eq!(
        rig.snapshotter.mounts(),
        [format!("mounts/{host}")],
        "{tag}"
    );
}

/// Equal listings, or the lines that differ.
fn assert_lines_eq(expected: &str, seen: &str, what: &str) {
    let missing: Vec<&str> = expected.lines().filter(|l| !seen.contains(l)).collect();
    let extra: Vec<&str> = seen.lines().filter(|l| !expected.contains(l)).collect();
    assert!(
        expected == seen,
        "{what}: the container's tree differs from umoci's:\nonly umoci's: {missing:#?}\nonly the container's: {extra:#?}"
    );
}

#[test]
fn rpull_of_gzip_estargz_and_zstd_chunked_shows_the_umoci_tree() {
    let rig = Rig::start();
    let layout = Layout::new();
    build_image(&layout);
    layout.push("rich", &rig.registry, &format!("{REPO}:gzip"));
    let host = rig.host();
    let converter = Converter::start();
    for (tag, flag) in [("esgz", "--estargz"), ("zchunk", "--zstdchunked")] {
        let (from, to) = (
            format!("{host}/{REPO}:gzip"),
            format!("{host}/{REPO}:{tag}"),
        );
        converter.convert(&from, &to, flag);
    }
    drop(converter);
    let unpacked = tempfile::tempdir().unwrap();
    let expected_root = umoci_unpack(&layout, "rich", &unpacked.path().join("bundle"));
    let expected = listing_of(&expected_root);
    for needed in ["./etc/.wh", "./opt/old", "./etc/gone.txt"] {
        assert!(
            !expected.contains(needed),
            "umoci applied the whiteouts: {expected}"
        );
    }
    assert!(expected.contains("./opt/fresh.txt") && expected.contains("./data/hard2"));

    for tag in ["esgz", "zchunk", "gzip"] {
        check_format(&rig, tag, &expected_root, &expected);
    }
    let stats = rig.snapshotter.stats();
    assert_eq!(stats["remote_snapshots"], 6, "{stats}");
    assert_eq!(stats["fallbacks"], 0, "{stats}");
    rig.snapshotter.assert_private();
}
