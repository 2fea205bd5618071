//! Images with real contents for the image-view tests: a rich rootfs built with `umoci`
//! (busybox, a large file, hardlinks, symlinks, a fifo, a device, xattrs, odd names,
//! owners and modes) over three layers (whiteouts, an opaque directory), the same image
//! converted by `ctr-remote` (eStargz, zstd:chunked) and `skopeo` (zstd), hostile layers
//! from `hostile_layers.py`, and a comparison of directory trees as `stat` sees them.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use super::{Layout, Registry, noise, push_blob, put_manifest, run, sha256_digest};

pub const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A name longer than tar's 100-byte field, and a path longer than 255 bytes.
pub const LONG_NAME: &str = "a-file-name-that-is-much-longer-than-the-hundred-bytes-of-a-classic-tar-header-name-field-so-it-needs-gnu-or-pax-help.txt";
pub const UTF8_DIR: &str = "names/ünïcødé ファイル";

/// Fails with a message naming setup.sh unless the tools of the image tests exist.
pub fn require_image_tools() {
    require_commands(&[
        "umoci",
        "skopeo",
        "python3",
        "unshare",
        "containerd",
        "ctr-remote",
        "busybox",
    ]);
}

/// Fails with a message naming setup.sh unless every one of `tools` is a command.
pub fn require_commands(tools: &[&str]) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: run scripts/setup.sh (installs it with apt-get)"
        );
    }
}

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox-static is installed (scripts/setup.sh)")
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let n = CString::new(name).expect("name without NUL");
    // SAFETY: valid C strings and a live buffer.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// The extended attributes of a path (not following symlinks).
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: valid C string and buffer of the given size.
    let len = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return BTreeMap::new();
    }
    names.truncate(len as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let n = CString::new(name).expect("xattr name");
        let mut value = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let vlen = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen >= 0 {
            value.truncate(vlen as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}

fn mkfifo(path: &Path) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mkfifo(p.as_ptr(), 0o640) },
        0,
        "mkfifo {}",
        path.display()
    );
}

fn mknod_char(path: &Path, major: u32, minor: u32) {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid C string; we are root.
    let r = unsafe {
        libc::mknod(
            p.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn write(root: &Path, rel: &str, data: &[u8]) -> PathBuf {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The first layer's files.
fn populate(root: &Path, big: usize) {
    let bb = busybox();
    fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    fs::copy(&bb, root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "cat", "ls", "wc", "stat", "readlink", "echo"] {
        symlink("busybox", root.join("bin").join(applet)).expect("applet symlink");
    }
    write(root, "etc/os-release", b"NAME=regfs-test\nID=regfs\n");
    let hello = write(root, "etc/hello.txt", b"hello from the image\n");
    set_xattr(&hello, "user.note", b"kept by PAX");
    set_xattr(&hello, "user.binary", &[0, 1, 2, 255]);
    write(root, "etc/gone.txt", b"deleted by the second layer\n");
    write(root, "opt/old/one", b"hidden by the opaque layer\n");
    write(root, "opt/old/two", b"hidden too\n");
    let large = write(root, "data/large.bin", &noise(big, 42));
    chmod(&large, 0o640);
    let h1 = write(root, "data/hard1", b"one inode, two names\n");
    fs::hard_link(&h1, root.join("data/hard2")).expect("hardlink");
    write(root, "data/empty", b"");
    fs::create_dir_all(root.join("links")).expect("mkdir links");
    symlink("../etc/hello.txt", root.join("links/relative")).expect("symlink");
    symlink("/etc/hello.txt", root.join("links/absolute")).expect("symlink");
    symlink("/nowhere/at/all", root.join("links/dangling")).expect("symlink");
    fs::create_dir_all(root.join("dev")).expect("mkdir dev");
    mkfifo(&root.join("dev/fifo"));
    mknod_char(&root.join("dev/null"), 1, 3);
    let suid = write(root, "bin/suid-tool", b"#!/bin/sh\n");
    chmod(&suid, 0o4755);
    fs::create_dir_all(root.join("tmp")).expect("mkdir tmp");
    chmod(&root.join("tmp"), 0o1777);
    let owned = write(root, "home/user/secret", b"owned by 1000\n");
    chmod(&owned, 0o600);
    chown(&owned, 1000, 1000);
    chown(&root.join("home/user"), 1000, 1000);
    write(
        root,
        &format!("{UTF8_DIR}/ファイル.txt"),
        "ünïcødé\n".as_bytes(),
    );
    let deep = format!("names/{}/{}", "d".repeat(150), LONG_NAME);
    write(root, &deep, b"deep and long\n");
}

/// Appends a layer (its blob bytes) to the image `tag` of the layout: new config
/// (diff_ids), new manifest, tag moved.
pub fn add_layer(layout: &Layout, tag: &str, tar: &[u8], compressed: &[u8], media_type: &str) {
    let desc = layout.descriptor(tag);
    let digest = desc["digest"].as_str().expect("manifest digest");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&layout.blob(digest)).expect("manifest JSON");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_owned();
    let mut config: serde_json::Value =
        serde_json::from_slice(&layout.blob(&config_digest)).expect("config JSON");
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids")
        .push(sha256_digest(tar).into());
    let config_bytes = serde_json::to_vec(&config).expect("config");
    let new_config = layout.write_blob(&config_bytes);
    let layer = layout.write_blob(compressed);
    manifest["config"]["digest"] = new_config.into();
    manifest["config"]["size"] = config_bytes.len().into();
    manifest["layers"].as_array_mut().expect("layers").push(
        serde_json::json!({ "mediaType": media_type, "digest": layer, "size": compressed.len() }),
    );
    let bytes = serde_json::to_vec(&manifest).expect("manifest");
    let new_digest = layout.write_blob(&bytes);
    layout.set_ref(tag, super::OCI_MANIFEST, &new_digest, bytes.len());
}

/// A gzip layer written by Python's tarfile: `opt/` made opaque (hiding what lower
/// layers had there), a new file in it. umoci writes per-file whiteouts only.
fn opaque_layer(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    fs::create_dir_all(dir).expect("mkdir for the opaque layer");
    let script = r#"
import io, sys, tarfile, gzip
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for name, data in [("opt/.wh..wh..opq", b""), ("opt/fresh.txt", b"after the opaque whiteout\n")]:
        info = tarfile.TarInfo(name); info.size = len(data); info.mode = 0o644; info.mtime = 1700000000
        tar.addfile(info, io.BytesIO(data))
open(sys.argv[1] + "/opq.tar", "wb").write(buf.getvalue())
open(sys.argv[1] + "/opq.tar.gz", "wb").write(gzip.compress(buf.getvalue()))
"#;
    run(Command::new("python3").args(["-c", script]).arg(dir));
    (
        fs::read(dir.join("opq.tar")).expect("opq.tar"),
        fs::read(dir.join("opq.tar.gz")).expect("opq.tar.gz"),
    )
}

/// Builds the rich image `tag` in `layout`: layer 1 the files of [`populate`] (with a
/// `big`-byte file), layer 2 (umoci) deletes and adds, layer 3 (Python) makes `opt/`
/// opaque.
pub fn build_rich_image(layout: &Layout, tag: &str, big: usize) {
    let image = layout.image(tag);
    let bundle = layout.scratch(&format!("bundle-{tag}"));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    populate(&rootfs, big);
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &image])
        .arg(&bundle));
    fs::remove_file(rootfs.join("etc/gone.txt")).expect("rm gone");
    write(&rootfs, "etc/added-later.txt", b"from the second layer\n");
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout.set_platform(tag, "amd64");
    let (tar, gz) = opaque_layer(&layout.scratch("opq"));
    add_layer(layout, tag, &tar, &gz, GZIP_LAYER);
    fs::remove_dir_all(&bundle).expect("remove bundle");
}

/// `umoci unpack` of `tag` (as root: owners, devices and xattrs as the layers say);
/// returns the rootfs.
pub fn umoci_unpack(layout: &Layout, tag: &str, dest: &Path) -> PathBuf {
    run(Command::new("umoci")
        .args(["unpack", "--image", &layout.image(tag)])
        .arg(dest));
    dest.join("rootfs")
}

/// What `stat`, `readlink`, `getfattr` and `sha256sum` say of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub rdev: u64,
    pub mtime: i64,
    pub link: Option<PathBuf>,
    pub sha256: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every path under `root` (relative), as [`Seen`], plus which paths share an inode.
pub struct Snapshot {
    pub paths: BTreeMap<PathBuf, Seen>,
    pub hardlinks: Vec<Vec<PathBuf>>,
}

/// Walks `root` without following symlinks. `mtimes` off skips directory mtimes (an
/// extraction touches a directory after its children).
pub fn snapshot(root: &Path) -> Snapshot {
    let mut paths = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let rel = path.strip_prefix(root).expect("below root").to_path_buf();
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else {
                "other"
            };
            let sha256 = ft.is_file().then(|| {
                let bytes =
                    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                format!("{:x}", Sha256::digest(&bytes))
            });
            let link = ft
                .is_symlink()
                .then(|| fs::read_link(&path).expect("readlink"));
            if ft.is_file() && meta.nlink() > 1 {
                inodes.entry(meta.ino()).or_default().push(rel.clone());
            }
            paths.insert(
                rel,
                Seen {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: if ft.is_dir() { 0 } else { meta.size() },
                    nlink: if ft.is_dir() { 0 } else { meta.nlink() },
                    rdev: meta.rdev(),
                    mtime: if ft.is_dir() { 0 } else { meta.mtime() },
                    link,
                    sha256,
                    xattrs: xattrs(&path),
                },
            );
            if ft.is_dir() {
                stack.push(path);
            }
        }
    }
    let mut hardlinks: Vec<Vec<PathBuf>> = inodes.into_values().collect();
    hardlinks.sort();
    Snapshot { paths, hardlinks }
}

/// Asserts two trees are the same as `stat` & co see them, naming the first difference.
pub fn assert_same_tree(expected: &Snapshot, actual: &Snapshot, what: &str) {
    let (e, a): (Vec<_>, Vec<_>) = (
        expected.paths.keys().collect(),
        actual.paths.keys().collect(),
    );
    let missing: Vec<_> = e
        .iter()
        .filter(|p| !actual.paths.contains_key(**p))
        .collect();
    let extra: Vec<_> = a
        .iter()
        .filter(|p| !expected.paths.contains_key(**p))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}"
    );
    for (path, seen) in &expected.paths {
        assert_eq!(
            Some(seen),
            actual.paths.get(path),
            "{what}: {} differs",
            path.display()
        );
    }
    assert_eq!(
        expected.hardlinks, actual.hardlinks,
        "{what}: hardlink groups differ"
    );
}

/// A private containerd (its own root, state and socket) for `ctr-remote image convert`.
pub struct Containerd {
    dir: TempDir,
    child: Child,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("regfs-containerd-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
        );
        fs::write(d.join("config.toml"), config).expect("containerd config");
        let log = fs::File::create(d.join("containerd.log")).expect("log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        super::die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .expect("spawn containerd (scripts/setup.sh installs it)");
        let containerd = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                containerd.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr-remote")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr-remote")
    }

    fn ctr_ok(&self, args: &[&str]) {
        let out = self.ctr(args);
        super::assert_success(&out, &format!("ctr-remote {args:?}"));
    }

    /// Pulls `src` (host:port/repo:tag over plain http), converts it with `flag`
    /// (`--estargz` or `--zstdchunked`) into an OCI image and pushes it as `dst`.
    pub fn convert(&self, src: &str, dst: &str, flag: &str) {
        self.convert_with(src, dst, &[flag]);
    }

    /// The same with more `ctr-remote image convert` flags (e.g.
    /// `--estargz-record-in FILE`).
    pub fn convert_with(&self, src: &str, dst: &str, flags: &[&str]) {
        self.ctr_ok(&["image", "pull", "--plain-http", src]);
        let mut args = vec!["image", "convert"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--oci", src, dst]);
        self.ctr_ok(&args);
        self.ctr_ok(&["image", "push", "--plain-http", dst]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-layer image of `layer` (bytes, media type, annotations) pushed as `repo:tag`.
pub fn push_layer_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layer: &[u8],
    media_type: &str,
    annotations: serde_json::Value,
) -> String {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    let config = serde_json::to_vec(&config).expect("config");
    let config_digest = push_blob(registry.addr, repo, &config);
    let layer_digest = push_blob(registry.addr, repo, layer);
    let mut desc =
        serde_json::json!({ "mediaType": media_type, "digest": layer_digest, "size": layer.len() });
    if !annotations.is_null() {
        desc["annotations"] = annotations;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [desc],
    });
    put_manifest(
        registry,
        repo,
        tag,
        super::OCI_MANIFEST,
        &serde_json::to_vec(&manifest).expect("manifest"),
    );
    layer_digest
}

/// Writes the hostile layers of `hostile_layers.py` into `dir`: (case, media type, blob).
pub fn hostile_layers(dir: &Path) -> Vec<(String, String, Vec<u8>)> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/common/hostile_layers.py"
    );
    run(Command::new("python3").arg(script).arg(dir));
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("hostile dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "layer") {
            let case = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let media_type = fs::read_to_string(path.with_extension("type")).expect("type");
            out.push((case, media_type, fs::read(&path).expect("layer")));
        }
    }
    out.sort();
    out
}
