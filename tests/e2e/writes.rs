//! Writes through the kernel (DESIGN §2, issue 4): blob uploads, digest-named blobs,
//! manifest pushes, rsync backup and restore, cross-repository links, --read-only.
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

// ---------------------------------------------------------------------------------------------
// uploads/
// ---------------------------------------------------------------------------------------------

#[test]
fn cp_into_uploads_commits_blobs_with_bounded_memory() {
    const CACHE_MIB: u64 = 32;
    const CHUNK_MIB: u64 = 8;
    let (registry, mnt) = app_registry(&["--cache-size", "32MiB", "--chunk-size", "8MiB"]);
    let local = scratch();

    let small = noise(MIB, 11);
    let small_digest = sha256_digest(&small);
    let out = cp(
        &local_file(&local, "small.bin", &small),
        &mnt.path("team/app/uploads/small.bin"),
    );
    assert_success(&out, "cp of 1 MiB into uploads/");
    assert_linked(&mnt, "team/app/uploads/small.bin", &small_digest);
    assert_eq!(get_blob(&registry, "team/app", &small_digest), small);
    // Through the symlink, i.e. blobs/<digest> of the mount.
    assert_eq!(
        fs::read(mnt.path("team/app/uploads/small.bin")).unwrap(),
        small
    );

    // cp -p also sets mode, owner and times on the file it wrote: all accepted.
    let out = tool(
        "cp",
        [
            OsStr::new("-p"),
            local.path().join("small.bin").as_os_str(),
            mnt.path("team/app/uploads/small-again.bin").as_os_str(),
        ],
    );
    assert_success(&out, "cp -p into uploads/");
    assert_linked(&mnt, "team/app/uploads/small-again.bin", &small_digest);

    let big_path = {
        let big = noise(300 * MIB, 12);
        local_file(&local, "big.bin", &big)
    };
    let big_digest = sha256_of_file(&big_path);
    let sampler = RssSampler::start(mnt.pid());
    let out = cp(&big_path, &mnt.path("team/app/uploads/big.bin"));
    let peak = sampler.stop();
    eprintln!("regfs during the 300 MiB cp: {peak:?}");
    assert_success(&out, "cp of 300 MiB into uploads/");
    assert_linked(&mnt, "team/app/uploads/big.bin", &big_digest);
    let head = common::http(
        registry.addr,
        "HEAD",
        &format!("/v2/team/app/blobs/{big_digest}"),
        &[],
        &[],
    );
    assert_eq!(head.status, 200, "the registry has the 300 MiB blob");
    assert_eq!(head.header("content-length"), Some("314572800"));
    assert_eq!(
        head.header("docker-content-digest"),
        Some(big_digest.as_str())
    );
    assert_eq!(
        sha256_of_file(&mnt.path(&format!("team/app/blobs/{big_digest}"))),
        big_digest,
        "reading the blob back through the mount"
    );

    let bound_mib = CACHE_MIB + 4 * CHUNK_MIB + 64;
    assert!(peak.samples > 0, "no RSS sample of pid {}", mnt.pid());
    assert!(
        peak.peak_mib() <= bound_mib,
        "regfs peaked at {} MiB (VmRSS max {} KiB over {} samples, VmHWM {} KiB) while cp wrote \
         300 MiB; bound: cache 32 MiB + 4 chunks of 8 MiB + 64 MiB = {bound_mib} MiB",
        peak.peak_mib(),
        peak.max_rss_kib,
        peak.samples,
        peak.hwm_kib
    );
}

#[test]
fn digest_names_must_match_the_content() {
    let (registry, mnt) = app_registry(&[]);
    let local = scratch();

    // uploads/<right digest>: committed, and linked like any upload.
    let right = noise(3 * MIB + 5, 21);
    let right_digest = sha256_digest(&right);
    let name = format!("team/app/uploads/{right_digest}");
    let out = cp(&local_file(&local, "right", &right), &mnt.path(&name));
    assert_success(&out, "cp into uploads/<its digest>");
    assert_linked(&mnt, &name, &right_digest);
    assert_eq!(get_blob(&registry, "team/app", &right_digest), right);

    // uploads/<wrong digest>: cp fails on close, nothing is committed under either digest.
    let wrong = noise(2 * MIB, 22);
    let claimed = sha256_digest(b"not the content");
    let name = format!("team/app/uploads/{claimed}");
    let out = cp(&local_file(&local, "wrong", &wrong), &mnt.path(&name));
    assert_failure(
        &out,
        "cp into uploads/<another digest>",
        "Input/output error",
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&wrong)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);
    assert_not_linked(&mnt, &name);

    // blobs/<right digest> written directly: uploaded and served.
    let blob = noise(MIB + 3, 23);
    let blob_digest = sha256_digest(&blob);
    let path = mnt.path(&format!("team/app/blobs/{blob_digest}"));
    let out = cp(&local_file(&local, "blob", &blob), &path);
    assert_success(&out, "cp into blobs/<its digest>");
    assert_eq!(get_blob(&registry, "team/app", &blob_digest), blob);
    assert_eq!(fs::read(&path).unwrap(), blob);

    // blobs/<wrong digest>: fails, nothing committed.
    let other = noise(MIB, 24);
    let claimed = sha256_digest(b"something else");
    let out = cp(
        &local_file(&local, "other", &other),
        &mnt.path(&format!("team/app/blobs/{claimed}")),
    );
    assert_failure(&out, "cp into blobs/<another digest>", "Input/output error");
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&other)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);

    // rsync's way: a temp file, then rename onto the name; the rename reports the outcome.
    let good = noise(MIB / 2, 25);
    let good_digest = sha256_digest(&good);
    let temp = mnt.path(&format!("team/app/blobs/.{good_digest}.Xa81Qz"));
    write_file(&temp, &good).expect("write a temp file in blobs/");
    fs::rename(&temp, mnt.path(&format!("team/app/blobs/{good_digest}")))
        .expect("rename the temp file onto its digest");
    assert_eq!(get_blob(&registry, "team/app", &good_digest), good);

    let bad = noise(MIB / 2, 26);
    let claimed = sha256_digest(b"yet another thing");
    let temp = mnt.path("team/app/blobs/.bad.Yb72Rw");
    write_file(&temp, &bad).expect("write a temp file in blobs/");
    assert_errno(
        fs::rename(&temp, mnt.path(&format!("team/app/blobs/{claimed}"))),
        libc::EIO,
        "rename of a temp file onto a digest it does not have",
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&bad)),
        404
    );
    assert_eq!(blob_status(registry.addr, "team/app", &claimed), 404);
}

#[test]
fn out_of_order_writes_fail_with_einval() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(256 << 10, 31);
    let (first, second) = data.split_at(128 << 10);
    let file = File::create(mnt.path("team/app/uploads/gappy")).expect("create in uploads/");
    file.write_all_at(first, 0).expect("write at 0");
    file.write_all_at(second, first.len() as u64)
        .expect("pwrite where the previous write ended");
    let end = data.len() as u64;
    assert_errno(
        file.write_at(b"after a gap", end + MIB as u64),
        libc::EINVAL,
        "pwrite past the end (a gap)",
    );
    assert_errno(
        file.write_at(b"rewrite", 0),
        libc::EINVAL,
        "pwrite over bytes already written",
    );
    assert_errno(
        file.write_at(b"rewrite", end - 7),
        libc::EINVAL,
        "pwrite over the last bytes written",
    );
    // What the writer meant is not what was streamed: never committed, and the log says why.
    let closed = close(file);
    assert!(
        closed.is_err(),
        "close after out-of-order writes: {closed:?}"
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
    assert_not_linked(&mnt, "team/app/uploads/gappy");
    let log = mnt.log();
    assert!(
        log.contains("sequential"),
        "the log does not say the writes must be sequential:\n{log}"
    );
}

#[test]
fn several_uploads_at_once_are_independent() {
    let (registry, mnt) = app_registry(&["--chunk-size", "1MiB"]);
    let contents = [
        noise(5 * MIB, 41),
        noise(3 * MIB + 1, 42),
        noise(7 * MIB - 9, 43),
    ];
    let mut files: Vec<File> = (0..contents.len())
        .map(|i| {
            File::create(mnt.path(&format!("team/app/uploads/part-{i}")))
                .expect("create in uploads/")
        })
        .collect();
    // Round robin, 256 KiB at a time: every upload has chunks in flight at once.
    let piece = 256 << 10;
    for offset in (0..7 * MIB).step_by(piece) {
        for (file, content) in files.iter_mut().zip(&contents) {
            if offset < content.len() {
                let end = content.len().min(offset + piece);
                file.write_all(&content[offset..end]).expect("write");
            }
        }
    }
    for file in files.drain(..).rev() {
        close(file).expect("close commits the upload");
    }
    for (i, content) in contents.iter().enumerate() {
        let digest = sha256_digest(content);
        assert_linked(&mnt, &format!("team/app/uploads/part-{i}"), &digest);
        assert_eq!(
            &get_blob(&registry, "team/app", &digest),
            content,
            "part-{i}"
        );
    }
}

/// A program that starts another process while it writes (any multi-threaded writer whose
/// other threads spawn, e.g. this test harness) hands the child a copy of the descriptor,
/// which the child closes at exec: the kernel sends FUSE a flush for that close too. Only
/// the writer's own close may commit.
#[test]
fn a_child_closing_an_inherited_descriptor_does_not_commit() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(2 * MIB, 45);
    let (first, second) = data.split_at(MIB);
    let mut file = File::create(mnt.path("team/app/uploads/forked")).expect("create");
    file.write_all(first).expect("write the first half");
    // fork + exec: the child's copy of the (close-on-exec) descriptor is closed at exec.
    let status = Command::new("true").status().expect("run true");
    assert!(status.success());
    file.write_all(second)
        .expect("write the second half after a child process started");
    close(file).expect("close commits the whole file");
    let digest = sha256_digest(&data);
    assert_linked(&mnt, "team/app/uploads/forked", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(first)),
        404,
        "the first half alone was committed"
    );
}

/// The same before the first write: a child started right after the file was created
/// closes its copy while nothing is written yet (what made uploads of other tests' files
/// commit empty when they ran beside tests that spawn). Only the opener's close commits.
#[test]
fn a_child_closing_its_copy_before_the_first_write_does_not_commit() {
    let (registry, mnt) = app_registry(&[]);
    let data = noise(MIB, 46);
    let mut file = File::create(mnt.path("team/app/uploads/early-fork")).expect("create");
    let status = Command::new("true").status().expect("run true");
    assert!(status.success());
    file.write_all(&data)
        .expect("write after a child closed its copy of the descriptor");
    close(file).expect("close commits the file");
    let digest = sha256_digest(&data);
    assert_linked(&mnt, "team/app/uploads/early-fork", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    let empty = sha256_digest(b"");
    assert_eq!(
        blob_status(registry.addr, "team/app", &empty),
        404,
        "an empty blob was committed"
    );
}

// ---------------------------------------------------------------------------------------------
// Faults (through the test proxy)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_patch_cut_mid_upload_is_resumed() {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "base", 1);
    // The third PATCH (at 2 MiB) loses its connection after the registry saw its head only:
    // distribution 2.8 can resume that (README, "Uploads (registry side)").
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            cut_patches: 1,
            cut_patch_forward: 0,
            cut_patch_after: 2,
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &["--chunk-size", "1MiB"]);
    let local = scratch();
    let data = noise(5 * MIB + 777, 51);
    let digest = sha256_digest(&data);
    let out = cp(
        &local_file(&local, "data", &data),
        &mnt.path("team/app/uploads/resumed.bin"),
    );
    assert_success(&out, "cp through a cut PATCH");
    assert_eq!(
        proxy.faults_left(),
        0,
        "the PATCH was cut: {:#?}",
        proxy.requests()
    );
    assert_linked(&mnt, "team/app/uploads/resumed.bin", &digest);
    assert_eq!(get_blob(&registry, "team/app", &digest), data);
    assert_eq!(
        proxy.requests_matching("POST /v2/team/app/blobs/uploads/"),
        1,
        "resumed, not restarted: {:#?}",
        proxy.requests()
    );
}

#[test]
fn a_registry_that_stays_down_fails_close_and_commits_nothing() {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "base", 1);
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &["--chunk-size", "8MiB", "--timeout", "10s"]);

    // Less than a chunk is written while the registry is up; it goes down before close.
    let data = noise(3 * MIB, 61);
    let mut file = File::create(mnt.path("team/app/uploads/down.bin")).expect("create");
    file.write_all(&data)
        .expect("write (buffered in the daemon)");
    proxy.set_upstream_down(true);
    assert_errno(close(file), libc::EIO, "close while the registry is down");

    // cp while it is still down.
    let local = scratch();
    let more = noise(2 * MIB, 62);
    let out = cp(
        &local_file(&local, "more", &more),
        &mnt.path("team/app/uploads/down-too.bin"),
    );
    assert!(!out.status.success(), "cp succeeded with the registry down");

    proxy.set_upstream_down(false);
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&data)),
        404
    );
    assert_eq!(
        blob_status(registry.addr, "team/app", &sha256_digest(&more)),
        404
    );
    assert_not_linked(&mnt, "team/app/uploads/down.bin");
    assert_not_linked(&mnt, "team/app/uploads/down-too.bin");
}

// ---------------------------------------------------------------------------------------------
// Backup and restore with rsync
// ---------------------------------------------------------------------------------------------

fn rsync(args: &[&OsStr]) -> Output {
    tool("rsync", args)
}

#[test]
fn rsync_backup_and_restore_round_trip() {
    common::require_tools();
    let a = Registry::start();
    let layout = Layout::new();
    layout.new_image(
        "v1",
        "amd64",
        &[("etc/motd", b"v1\n"), ("data/blob", &noise(300_000, 71))],
    );
    layout.new_image("v2", "arm64", &[("etc/motd", b"v2\n")]);
    layout.new_image("multi-amd64", "amd64", &[("bin/tool", b"tool for amd64\n")]);
    layout.new_image("multi-arm64", "arm64", &[("bin/tool", b"tool for arm64\n")]);
    layout.push("v1", &a, "team/app:v1");
    layout.push("v1", &a, "team/app:latest");
    layout.push("v2", &a, "team/app:v2");
    let children = [
        layout.manifest_digest("multi-amd64"),
        layout.manifest_digest("multi-arm64"),
    ];
    // rsync writes manifests/ in name order: make the index's name sort before both of its
    // (untagged) children, so that the restore meets the index first.
    let first = children.iter().min().expect("two children").clone();
    let nonce = (0..1000)
        .map(|n| serde_json::json!({ "regfs.test.nonce": n.to_string() }))
        .find(|annotations| layout.add_index_with("probe", &children_tags(), annotations) < first)
        .expect("an index digest that sorts before its children");
    let index = layout.push_index_with(&children_tags(), &a, "team/app:multi", &nonce);
    assert!(index < first);

    let mnt_a = Mount::start(&a.url(), &[]);
    let work = scratch();
    let backup = work.path().join("app");
    let src = mnt_a.path("team/app/");
    let backup_slash = PathBuf::from(format!("{}/", backup.display()));
    let out = rsync(&[OsStr::new("-a"), src.as_os_str(), backup_slash.as_os_str()]);
    assert_success(&out, "rsync -a mntA/team/app/ backup/");
    for child in &children {
        assert!(
            backup.join("manifests").join(child).is_file(),
            "backup lacks {child}"
        );
    }
    assert!(backup.join("tags/multi/manifest.json").is_file());
    // A second backup finds nothing to move: sizes and mtimes are stable.
    drop(mnt_a);
    let mnt_a = Mount::start(&a.url(), &[]);
    let src = mnt_a.path("team/app/");
    let out = rsync(&[
        OsStr::new("-a"),
        OsStr::new("--stats"),
        src.as_os_str(),
        backup_slash.as_os_str(),
    ]);
    assert_success(&out, "second rsync -a --stats mntA/team/app/ backup/");
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        stats.contains("Total transferred file size: 0 bytes"),
        "the second backup moved data:\n{stats}"
    );

    let b = Registry::start();
    let mnt_b = Mount::start(&b.url(), &[]);
    let dest = mnt_b.path("team/app");
    let out = tool("mkdir", [OsStr::new("-p"), dest.as_os_str()]);
    assert_success(&out, "mkdir -p mntB/team/app");
    assert_eq!(ls(&dest), ["blobs", "manifests", "tags", "uploads"]);
    let dest_slash = PathBuf::from(format!("{}/", dest.display()));
    let out = rsync(&[
        OsStr::new("-a"),
        backup_slash.as_os_str(),
        dest_slash.as_os_str(),
    ]);
    assert_success(&out, "rsync -a backup/ mntB/team/app/");

    let mut tags_a = common::tags(&a, "team/app");
    let mut tags_b = common::tags(&b, "team/app");
    tags_a.sort();
    tags_b.sort();
    assert_eq!(tags_b, tags_a, "B has every tag of A");
    for tag in &tags_a {
        let (digest_a, _, _) = get_manifest(&a, "team/app", tag);
        let raw_b = skopeo_raw_manifest(b.addr, &format!("team/app:{tag}"));
        assert_eq!(sha256_digest(&raw_b), digest_a, "team/app:{tag} on B");
    }
    for child in &children {
        assert_eq!(
            manifest_status(b.addr, "team/app", child),
            200,
            "child {child} on B"
        );
    }
    let copies = work.path().join("oci-from-b");
    for tag in &tags_a {
        skopeo_copy_to_oci(b.addr, &format!("team/app:{tag}"), &copies, tag);
    }
    assert_eq!(
        mnt_b.stats()["pending_manifests"].as_u64(),
        Some(0),
        "held indexes on B: {}",
        mnt_b.stats()
    );
}

#[test]
fn a_backup_taken_after_an_upload_restores_its_uploads_link() {
    let (registry, mnt) = app_registry(&[]);
    let work = scratch();
    let bytes = noise(300 << 10, 77);
    let digest = sha256_digest(&bytes);
    let file = local_file(&work, "notes.bin", &bytes);
    assert_success(&cp(&file, &mnt.path("team/app/uploads/notes.bin")), "cp");
    let backup = work.path().join("backup");
    let out = rsync(&[
        OsStr::new("-a"),
        mnt.path("team/app/").as_os_str(),
        backup.as_os_str(),
    ]);
    assert_success(&out, "rsync -a mnt/team/app/ backup/");
    // The uploaded blob is listed in blobs/, so the backup holds what the link names.
    assert!(
        backup.join("blobs").join(&digest).is_file(),
        "the backup lacks the uploaded blob"
    );
    fs::create_dir_all(mnt.path("restored/app")).expect("mkdir -p restored/app");
    let mut into = mnt.path("restored/app").into_os_string();
    into.push("/");
    let mut from = backup.into_os_string();
    from.push("/");
    let out = rsync(&[OsStr::new("-a"), &from, &into]);
    assert_success(&out, "rsync -a backup/ mnt/restored/app/");
    assert_linked(&mnt, "restored/app/uploads/notes.bin", &digest);
    assert_eq!(
        sha256_of_file(&mnt.path("restored/app/uploads/notes.bin")),
        digest,
        "the link reads the restored blob"
    );
    assert_eq!(blob_status(registry.addr, "restored/app", &digest), 200);
}

fn children_tags() -> [&'static str; 2] {
    ["multi-amd64", "multi-arm64"]
}

// ---------------------------------------------------------------------------------------------
// Links, manifests, directories, read-only
// ---------------------------------------------------------------------------------------------

#[test]
fn ln_mounts_a_blob_into_another_repository_or_copies_it() {
    common::require_tools();
    let registry = Registry::start();
    for (i, repo) in ["team/a", "team/b", "team/c"].into_iter().enumerate() {
        push_tiny_image(&registry, repo, "v1", i as u32 + 1);
    }
    let data = noise(2 * MIB + 1, 81);
    let digest = push_blob(registry.addr, "team/a", &data);
    let source = format!("team/a/blobs/{digest}");

    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&proxy.url(), &[]);
    let target = format!("team/b/blobs/{digest}");
    assert_eq!(blob_status(registry.addr, "team/b", &digest), 404);
    let out = tool("ln", [mnt.path(&source), mnt.path(&target)]);
    assert_success(&out, "ln mnt/team/a/blobs/<d> mnt/team/b/blobs/<d>");
    assert_eq!(blob_status(registry.addr, "team/b", &digest), 200);
    assert_eq!(fs::read(mnt.path(&target)).unwrap(), data);
    assert!(
        proxy.requests_matching("mount=") >= 1,
        "{:#?}",
        proxy.requests()
    );
    assert_eq!(
        proxy.requests_matching("PUT /v2/team/b/blobs/uploads/"),
        0,
        "mounted, not copied: {:#?}",
        proxy.requests()
    );
    drop(mnt);

    let declining = Proxy::start(
        registry.addr,
        ProxyRules {
            decline_mounts: true,
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&declining.url(), &[]);
    let target = format!("team/c/blobs/{digest}");
    assert_eq!(blob_status(registry.addr, "team/c", &digest), 404);
    fs::hard_link(mnt.path(&source), mnt.path(&target)).expect("link(2) falls back to a copy");
    assert_eq!(blob_status(registry.addr, "team/c", &digest), 200);
    assert_eq!(get_blob(&registry, "team/c", &digest), data);
    assert_eq!(fs::read(mnt.path(&target)).unwrap(), data);
    assert!(
        declining.requests_matching("PUT /v2/team/c/blobs/uploads/") >= 1,
        "copied: {:#?}",
        declining.requests()
    );
}

#[test]
fn manifests_are_pushed_on_close_and_refusals_fail_it() {
    let (registry, mnt) = app_registry(&[]);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(registry.addr, "team/app", config);
    let layer = noise(1000, 91);
    let layer_digest = push_blob(registry.addr, "team/app", &layer);

    // manifests/<digest>: PUT by digest, served with its media type.
    let good = oci_manifest(
        &config_digest,
        config.len(),
        &[(&layer_digest, layer.len())],
    );
    let good_digest = sha256_digest(&good);
    write_file(
        &mnt.path(&format!("team/app/manifests/{good_digest}")),
        &good,
    )
    .expect("write manifests/<digest>");
    let (served, media_type, bytes) = get_manifest(&registry, "team/app", &good_digest);
    assert_eq!(
        (served.as_str(), media_type.as_str()),
        (good_digest.as_str(), common::OCI_MANIFEST)
    );
    assert_eq!(bytes, good);

    // tags/<new tag>/manifest.json, without mediaType: PUT by tag, kind detected.
    let untyped = serde_json::json!({
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [],
    });
    let untyped = serde_json::to_vec(&untyped).unwrap();
    fs::create_dir(mnt.path("team/app/tags/v9")).expect("mkdir tags/v9");
    write_file(&mnt.path("team/app/tags/v9/manifest.json"), &untyped)
        .expect("write tags/v9/manifest.json");
    let (served, media_type, bytes) = get_manifest(&registry, "team/app", "v9");
    assert_eq!(served, sha256_digest(&untyped));
    assert_eq!(media_type, common::OCI_MANIFEST);
    assert_eq!(bytes, untyped);

    // A manifest naming a blob the repository lacks: close fails, the log says why.
    let missing = sha256_digest(b"never pushed");
    let bad = oci_manifest(&missing, 12, &[]);
    let bad_digest = sha256_digest(&bad);
    assert_errno(
        write_file(&mnt.path(&format!("team/app/manifests/{bad_digest}")), &bad),
        libc::EIO,
        "close of manifests/<digest> naming a missing blob",
    );
    assert_eq!(manifest_status(registry.addr, "team/app", &bad_digest), 404);
    let log = mnt.log();
    assert!(
        log.contains("MANIFEST_BLOB_UNKNOWN"),
        "the log does not say why the push failed:\n{log}"
    );

    fs::create_dir(mnt.path("team/app/tags/broken")).expect("mkdir tags/broken");
    assert_errno(
        write_file(&mnt.path("team/app/tags/broken/manifest.json"), &bad),
        libc::EIO,
        "close of tags/broken/manifest.json naming a missing blob",
    );
    assert_eq!(manifest_status(registry.addr, "team/app", "broken"), 404);

    // The same refusal through rsync's temp file + rename: the rename fails.
    let temp = mnt.path(&format!("team/app/manifests/.{bad_digest}.Zc93Sv"));
    write_file(&temp, &bad).expect("write a temp file in manifests/");
    assert_errno(
        fs::rename(&temp, mnt.path(&format!("team/app/manifests/{bad_digest}"))),
        libc::EIO,
        "rename onto manifests/<digest> naming a missing blob",
    );
    assert_eq!(manifest_status(registry.addr, "team/app", &bad_digest), 404);
}

#[test]
fn mkdir_makes_repositories_and_deleting_is_refused() {
    let (registry, mnt) = app_registry(&[]);
    fs::create_dir_all(mnt.path("org/team/svc")).expect("mkdir -p org/team/svc");
    assert_eq!(
        ls(&mnt.path("org/team/svc")),
        ["blobs", "manifests", "tags", "uploads"]
    );
    assert!(ls(&mnt.dir).contains(&"org".to_string()));
    // The directories above it are its namespace, not repositories.
    assert_eq!(ls(&mnt.path("org")), ["team"]);
    assert_eq!(ls(&mnt.path("org/team")), ["svc"]);
    fs::create_dir(mnt.path("org/team/svc/tags/next")).expect("mkdir tags/next");
    assert!(mnt.path("org/team/svc/tags/next").is_dir());
    let perms = fs::metadata(mnt.path("org/team/svc"))
        .unwrap()
        .permissions();
    fs::set_permissions(mnt.path("org/team/svc"), perms).expect("chmod on a new repository");

    // The first push makes it a repository of the registry.
    let local = scratch();
    let data = noise(MIB, 101);
    let out = cp(
        &local_file(&local, "data", &data),
        &mnt.path("org/team/svc/uploads/data"),
    );
    assert_success(&out, "cp into a new repository's uploads/");
    assert_eq!(
        get_blob(&registry, "org/team/svc", &sha256_digest(&data)),
        data
    );

    let (manifest, config) = push_tiny_image(&registry, "team/app", "v1", 2);
    for rel in [
        format!("team/app/blobs/{config}"),
        format!("team/app/manifests/{manifest}"),
        "team/app/tags/v1/manifest.json".to_string(),
        "org/team/svc/uploads/data".to_string(),
    ] {
        assert_errno(
            fs::remove_file(mnt.path(&rel)),
            libc::EPERM,
            &format!("rm {rel}"),
        );
    }
    assert_eq!(blob_status(registry.addr, "team/app", &config), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", "v1"), 200);
}

#[test]
fn read_only_mounts_refuse_every_write_with_erofs() {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "v1", 1);
    push_tiny_image(&registry, "team/b", "v1", 2);
    let data = noise(MIB, 111);
    let digest = push_blob(registry.addr, "team/app", &data);
    let mnt = Mount::start(&registry.url(), &["--read-only"]);
    let erofs = libc::EROFS;

    assert_errno(
        File::create(mnt.path("team/app/uploads/x")),
        erofs,
        "create in uploads/",
    );
    assert_errno(
        fs::OpenOptions::new()
            .write(true)
            .open(mnt.path("team/app/tags/v1/manifest.json")),
        erofs,
        "open a manifest for writing",
    );
    assert_errno(
        fs::create_dir(mnt.path("team/new")),
        erofs,
        "mkdir of a repository",
    );
    assert_errno(
        fs::create_dir(mnt.path("team/app/tags/v2")),
        erofs,
        "mkdir of a tag",
    );
    assert_errno(
        fs::hard_link(
            mnt.path(&format!("team/app/blobs/{digest}")),
            mnt.path(&format!("team/b/blobs/{digest}")),
        ),
        erofs,
        "ln across repositories",
    );
    assert_errno(
        fs::rename(
            mnt.path("team/app/tags/v1/manifest.json"),
            mnt.path("team/app/tags/v1/renamed.json"),
        ),
        erofs,
        "rename",
    );
    let local = scratch();
    let out = cp(
        &local_file(&local, "data", &data),
        &mnt.path("team/app/uploads/data"),
    );
    assert_failure(&out, "cp on a --read-only mount", "Read-only file system");
    assert_eq!(blob_status(registry.addr, "team/b", &digest), 404);
}
