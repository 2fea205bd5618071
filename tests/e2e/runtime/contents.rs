//! What a container sees of an image served by regfs, for every format it pulls
//! lazily: the three-layer gzip image of rich_image.rs (odd sizes, hardlinks,
//! symlinks, xattrs, whiteouts of a file and of a directory tree, an opaque
//! directory) and its eStargz and zstd:chunked conversions (`ctr-remote image
//! convert`). Each is pulled with `ctr-remote image rpull` and with CRI's labels
//! (containerd's own unpack with `pkg/snapshotters`, as the CRI plugin does it):
//! containerd downloads no layer, and a container lists (modes, owners, sizes, link
//! counts and targets, SHA-256 of every file) what `umoci unpack` of the original
//! makes; xattrs are read through the container's root filesystem. A TOC image's
//! start moves a small part of its bytes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::containerd::Rig;
use super::go::{GoBuild, go_build};
use super::rich_image;
use crate::common::images::{Containerd as Converter, umoci_unpack, xattrs};
use crate::common::process::wait_until;
use crate::common::{Layout, Registry, get_manifest, run};

pub const REPO: &str = "t/rich";

/// How an image comes to the snapshotter.
enum Pull<'a> {
    /// `ctr-remote image rpull`: stargz-snapshotter's labels.
    Rpull,
    /// tests/go/cri_pull (this binary): CRI's `containerd.io/snapshot/cri.*` labels.
    Cri(&'a Path),
}

/// Lists the tree under the working directory with busybox alone (so the same
/// command runs on the host and in the image): each path with its mode (hex, type
/// included) and owner; a file's size, link count and SHA-256; a symlink's target. The
/// mount points runc makes (/proc, /sys, /dev, /run) are left out.
pub const LISTING: &str = r#"busybox find . -mindepth 1 \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \) -prune -o -print | busybox sort | while IFS= read -r p; do
  if [ -L "$p" ]; then echo "$p $(busybox stat -c '%f %u:%g' "$p") -> $(busybox readlink "$p")"
  elif [ -d "$p" ]; then echo "$p $(busybox stat -c '%f %u:%g' "$p")"
  else echo "$p $(busybox stat -c '%f %u:%g %s %h' "$p") $(busybox sha256sum "$p" | busybox cut -d' ' -f1)"
  fi
done"#;

/// [`LISTING`] of `root` on the host.
pub fn listing_of(root: &Path) -> String {
    run(Command::new("busybox")
        .args(["sh", "-c", LISTING])
        .current_dir(root))
}

/// The image's layers (digest, size), from the registry.
pub fn layers_of(registry: &Registry, tag: &str) -> Vec<(String, u64)> {
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

/// Pulls `image` into the snapshotter `how` says; containerd downloads none of
/// `layers`.
fn pull(rig: &Rig, image: &str, how: &Pull, layers: &[(String, u64)]) {
    let ctr = rig.ctr();
    match how {
        Pull::Rpull => {
            ctr.rpull(image);
        }
        Pull::Cri(cri_pull) => {
            run(Command::new("timeout")
                .arg("120")
                .arg(cri_pull)
                .arg(ctr.address())
                .arg("regfs")
                .arg(image));
        }
    }
    let content = ctr.ctr_ok(&["content", "ls", "-q"]);
    for (layer, _) in layers {
        assert!(
            !content.contains(layer.as_str()),
            "{image}: layer {layer} downloaded"
        );
    }
}

/// A TOC image's pull and start moved less than a quarter of its bytes (read from
/// `before`), and every TOC was used.
fn assert_moved_little(rig: &Rig, what: &str, before: u64, image_bytes: u64) {
    // A fetch is counted once done, and the start may not wait for all of one.
    let mut stats = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(30),
        "the start's fetches to end",
        || {
            stats = rig.snapshotter.mount_stats(&rig.host());
            stats["in_flight"] == 0
        },
    );
    let moved = foreground_bytes(&stats) - before;
    eprintln!("{what}: pull and start moved {moved} of {image_bytes} bytes");
    assert!(
        moved < image_bytes / 4,
        "{what}: pull and start moved {moved} bytes of a {image_bytes}-byte image: {stats}"
    );
    assert_eq!(stats["images"]["toc_unused"], 0, "{what}: {stats}");
}

/// A pull of `tag`, then a container: no layer downloaded, the tree as `expected`
/// lists it, and for a TOC image a start that moved little.
fn check_format(rig: &Rig, tag: &str, how: &Pull, expected_root: &Path, expected: &str) {
    let (ctr, host) = (rig.ctr(), rig.host());
    let image = format!("{host}/{REPO}:{tag}");
    let what = match how {
        Pull::Rpull => format!("{tag} (rpull)"),
        Pull::Cri(_) => format!("{tag} (CRI labels)"),
    };
    let layers = layers_of(&rig.registry, tag);
    let image_bytes: u64 = layers.iter().map(|(_, size)| size).sum();
    let before = foreground_bytes(&rig.snapshotter.mount_stats(&host));
    pull(rig, &image, how, &layers);

    let id = rig.id(&format!("{tag}-{}", matches!(how, Pull::Cri(_))));
    ctr.start_sleeper(&image, &id);
    let toc = tag != "gzip";
    if toc {
        assert_moved_little(rig, &what, before, image_bytes);
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
    assert_lines_eq(expected, &seen, &what);
    assert_same_xattrs(expected, expected_root, &ctr.rootfs(&id), &what);
    if toc {
        let stats = rig.snapshotter.mount_stats(&host);
        assert_eq!(stats["images"]["toc_unused"], 0, "{what}: {stats}");
    }
    ctr.kill_task(&id);
    // Its snapshots go with it (the next format's layers could share chain IDs), and
    // so do their mounts; the host's stays.
    ctr.ctr_ok(&["image", "rm", "--sync", &image]);
    assert_eq!(
        rig.snapshotter.mounts(),
        [format!("mounts/{host}")],
        "{what}"
    );
}

/// Equal listings, or the lines that differ.
pub fn assert_lines_eq(expected: &str, seen: &str, what: &str) {
    let missing: Vec<&str> = expected.lines().filter(|l| !seen.contains(l)).collect();
    let extra: Vec<&str> = seen.lines().filter(|l| !expected.contains(l)).collect();
    assert!(
        expected == seen,
        "{what}: the container's tree differs from umoci's:\nonly umoci's: {missing:#?}\nonly the container's: {extra:#?}"
    );
}

#[test]
fn gzip_estargz_and_zstd_chunked_by_rpull_and_cri_show_the_umoci_tree() {
    let cri_pull = go_build("cri_pull", GoBuild::Program);
    let rig = Rig::start();
    let layout = Layout::new();
    rich_image::build(&layout, "rich");
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
    rich_image::assert_cases_present(&expected);

    for how in [Pull::Rpull, Pull::Cri(&cri_pull)] {
        for tag in ["esgz", "zchunk", "gzip"] {
            check_format(&rig, tag, &how, &expected_root, &expected);
        }
    }
    let stats = rig.snapshotter.stats();
    // Three layers, three formats, two ways.
    assert_eq!(stats["remote_snapshots"], 18, "{stats}");
    assert_eq!(stats["fallbacks"], 0, "{stats}");
    rig.snapshotter.assert_private();
}
