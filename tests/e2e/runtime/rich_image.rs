//! The rich image the runtime tests compare with `umoci unpack`: three gzip layers.
//! The first (umoci) holds busybox, files of odd sizes (a byte, a page either side, a
//! chunk either side, several chunks and a remainder), hardlinks, symlinks (relative,
//! absolute, dangling), xattrs, a file of another owner and a directory tree. The
//! second (Python's tarfile: umoci writes no opaque whiteouts) deletes a file and that
//! whole directory tree, makes `opt/` opaque and adds files. The third deletes a file
//! of the second, replaces a file of the first by a symlink, and adds a hardlink pair,
//! a directory of its own mode and a file of an odd size.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::images::{GZIP_LAYER, add_layer, set_xattr};
use crate::common::{Layout, noise, run};

/// The chunk size ctr-remote cuts files into.
pub const CHUNK: usize = 4 << 20;
/// Sizes of the files under `data/sizes/`, each named by its size.
const ODD_SIZES: [usize; 7] = [
    1,
    4095,
    4097,
    65_537,
    CHUNK - 1,
    CHUNK + 1,
    3 * CHUNK + 12_345,
];

/// One tar entry of a layer written by Python: a file (its bytes from a file of the
/// test's), a directory, a symlink or a hardlink, and its mode.
struct Entry<'a> {
    name: &'a str,
    kind: &'a str,
    /// A file's contents; a link's target.
    source: String,
    mode: u32,
}

impl<'a> Entry<'a> {
    fn empty(name: &'a str) -> Entry<'a> {
        Entry {
            name,
            kind: "file",
            source: String::new(),
            mode: 0o644,
        }
    }

    fn link(name: &'a str, kind: &'a str, target: &str) -> Entry<'a> {
        Entry {
            name,
            kind,
            source: target.to_owned(),
            mode: 0o777,
        }
    }
}

pub fn write(root: &Path, rel: &str, data: &[u8]) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).unwrap();
    std::fs::write(&path, data).unwrap();
    path
}

fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static (scripts/setup.sh)")
}

/// The first layer's files.
fn first_layer(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "cat"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let hello = write(root, "etc/hello.txt", b"hello from the image\n");
    set_xattr(&hello, "user.note", b"kept by PAX");
    set_xattr(&hello, "user.binary", &[0, 1, 2, 255]);
    write(root, "etc/gone.txt", b"deleted by the second layer\n");
    write(root, "opt/old/one", b"hidden by the opaque directory\n");
    write(root, "opt/old/two", b"hidden too\n");
    write(root, "var/olddir/a", b"the whole directory goes\n");
    write(root, "var/olddir/deeper/b", &noise(70_001, 3));
    write(root, "var/kept", b"beside the deleted directory\n");
    for (i, size) in ODD_SIZES.into_iter().enumerate() {
        write(
            root,
            &format!("data/sizes/{size}"),
            &noise(size, 11 + i as u32),
        );
    }
    let several = root.join(format!("data/sizes/{}", ODD_SIZES[6]));
    std::fs::set_permissions(&several, std::fs::Permissions::from_mode(0o640)).unwrap();
    write(
        root,
        "data/replaced",
        b"a file the third layer makes a symlink\n",
    );
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

/// Writes `entries` as a PAX tar with Python's tarfile, and its gzip; returns both.
fn python_layer(dir: &Path, entries: &[Entry]) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let spec: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::json!([e.name, e.kind, e.source, e.mode]))
        .collect();
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec(&spec).unwrap()).unwrap();
    let script = r#"
import io, json, sys, tarfile, gzip
kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for name, kind, source, mode in json.load(open(sys.argv[1] + "/spec.json")):
        info = tarfile.TarInfo(name); info.type = kinds[kind]; info.mode = mode; info.mtime = 1700000000
        data = b""
        if kind == "file" and source:
            data = open(source, "rb").read()
        elif kind in ("symlink", "hardlink"):
            info.linkname = source
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
open(sys.argv[1] + "/layer.tar", "wb").write(buf.getvalue())
open(sys.argv[1] + "/layer.tar.gz", "wb").write(gzip.compress(buf.getvalue()))
"#;
    run(Command::new("python3").args(["-c", script]).arg(dir));
    (
        std::fs::read(dir.join("layer.tar")).unwrap(),
        std::fs::read(dir.join("layer.tar.gz")).unwrap(),
    )
}

/// A file entry whose bytes are `data`, kept in `dir` for Python to read.
fn file<'a>(dir: &Path, name: &'a str, data: &[u8], mode: u32) -> Entry<'a> {
    let source = write(dir, &format!("src/{}", name.replace('/', "_")), data);
    Entry {
        name,
        kind: "file",
        source: source.display().to_string(),
        mode,
    }
}

/// The second layer: a file and a directory tree deleted, `opt/` made opaque with one
/// new file, a file added.
fn second_layer(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let entries = [
        Entry::empty("etc/.wh.gone.txt"),
        Entry::empty("var/.wh.olddir"),
        Entry::empty("opt/.wh..wh..opq"),
        file(dir, "opt/fresh.txt", b"after the opaque whiteout\n", 0o644),
        file(dir, "etc/added.txt", b"from the second layer\n", 0o644),
        file(
            dir,
            "etc/short-lived",
            b"deleted by the third layer\n",
            0o644,
        ),
    ];
    python_layer(dir, &entries)
}

/// The third layer: a file of the second deleted, a file of the first replaced by a
/// symlink, a hardlink pair, a directory of mode 0750 with a file of an odd size.
fn third_layer(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let entries = [
        Entry::empty("etc/.wh.short-lived"),
        Entry::link("data/replaced", "symlink", "hard1"),
        file(
            dir,
            "srv/pair-a",
            b"a hardlink made in the third layer\n",
            0o600,
        ),
        Entry::link("srv/pair-b", "hardlink", "srv/pair-a"),
        Entry {
            name: "srv/private",
            kind: "dir",
            source: String::new(),
            mode: 0o750,
        },
        file(dir, "srv/private/odd", &noise(1_000_003, 5), 0o755),
    ];
    python_layer(dir, &entries)
}

/// The image, tagged `tag` in `layout`.
pub fn build(layout: &Layout, tag: &str) {
    let image = format!("{}:{tag}", layout.oci_dir().display());
    let bundle = layout.scratch(&format!("bundle-{tag}"));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    first_layer(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout.set_platform(tag, "amd64");
    let (tar, gz) = second_layer(&layout.scratch("second"));
    add_layer(layout, tag, &tar, &gz, GZIP_LAYER);
    let (tar, gz) = third_layer(&layout.scratch("third"));
    add_layer(layout, tag, &tar, &gz, GZIP_LAYER);
    std::fs::remove_dir_all(&bundle).unwrap();
}

/// What `umoci unpack` made of the layers must show each case the image is for.
pub fn assert_cases_present(listing: &str) {
    for gone in [
        "./etc/.wh",
        "./opt/old",
        "./etc/gone.txt",
        "./var/olddir",
        "./etc/short-lived",
    ] {
        assert!(
            !listing.contains(gone),
            "umoci applied the whiteouts ({gone}): {listing}"
        );
    }
    for kept in [
        "./opt/fresh.txt",
        "./data/hard2",
        "./var/kept",
        "./srv/pair-b",
        "./srv/private/odd",
        "./data/replaced a1ff 0:0 -> hard1",
        "./data/sizes/4194305",
    ] {
        assert!(listing.contains(kept), "{kept} in umoci's tree: {listing}");
    }
}
