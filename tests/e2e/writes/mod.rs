//! Writes through the kernel (docs/SEMANTICS.md, "Writes"; issue 4): blob uploads,
//! digest-named blobs, manifest pushes, rsync backup and restore, cross-repository links,
//! --read-only.
//!
//! Everything is checked as a user would see it: exit codes of cp/rsync/skopeo, errno of
//! system calls, symlinks, and what the registry itself serves afterwards (plain HTTP, or
//! skopeo). Each test starts its own registry.

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{
    Layout, Mount, Proxy, ProxyRules, Registry, RssSampler, assert_success, blob_status, close,
    get_blob, get_manifest, ls, manifest_status, noise, oci_manifest, push_blob, push_tiny_image,
    sha256_digest, skopeo_copy_to_oci, skopeo_raw_manifest,
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

const MIB: usize = 1 << 20;
/// The longest any one cp/rsync may take before the test calls it hung.
const TOOL_TIMEOUT_SECS: &str = "600";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `tool args…`, killed after [`TOOL_TIMEOUT_SECS`] (a hung mount fails the test, not CI).
fn tool<I, S>(name: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", TOOL_TIMEOUT_SECS, name])
        .args(args)
        .stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e} (run scripts/setup.sh?)"))
}

fn cp(from: &Path, to: &Path) -> Output {
    tool("cp", [from.as_os_str(), to.as_os_str()])
}

/// A failed tool run whose stderr says `message` (e.g. "Input/output error").
fn assert_failure(out: &Output, what: &str, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} should have failed:\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(message),
        "{what} failed ({}) without saying {message:?}:\n{stderr}",
        out.status
    );
}

/// create + write + close, each step's error returned.
fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    close(file)
}

/// Asserts that `result` failed with `errno`.
fn assert_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, what: &str) {
    match result {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {}", errno_name(errno)),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {}, got {e}",
            errno_name(errno)
        ),
    }
}

fn errno_name(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// A local file (outside the mount) holding `bytes`.
fn local_file(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("regfs-writes-")
        .tempdir()
        .expect("create a temp dir")
}

/// After a commit, `uploads/<name>` is a symlink to `../blobs/<digest>`.
fn assert_linked(mnt: &Mount, uploads_entry: &str, digest: &str) {
    let path = mnt.path(uploads_entry);
    let target =
        fs::read_link(&path).unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()));
    assert_eq!(
        target,
        PathBuf::from(format!("../blobs/{digest}")),
        "{uploads_entry}"
    );
}

/// Nothing was committed under `uploads_entry`: it is not a symlink (missing is fine).
fn assert_not_linked(mnt: &Mount, uploads_entry: &str) {
    if let Ok(meta) = fs::symlink_metadata(mnt.path(uploads_entry)) {
        assert!(
            !meta.file_type().is_symlink(),
            "{uploads_entry} became a symlink to {:?} although its upload failed",
            fs::read_link(mnt.path(uploads_entry))
        );
    }
}

/// `sha256:<hex>` of a file, streamed.
fn sha256_of_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0; MIB];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A registry whose `team/app` exists (one tiny tagged image), and a mount of it.
fn app_registry(mount_args: &[&str]) -> (Registry, Mount) {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "base", 1);
    let mnt = Mount::start(&registry.url(), mount_args);
    (registry, mnt)
}

mod backup;
mod names;
mod uploads;
