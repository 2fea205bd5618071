//! `--timeout` as a promise to programs: with a registry that stops answering (or only
//! trickles), a read, a stat, a listing and a close return EIO within `--timeout` plus
//! a little, however many blocks were queued, and the rest of the mount keeps
//! answering meanwhile. Faults come from the harness's proxy in front of a real
//! registry.

use crate::common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Mount, Proxy, ProxyRules, Registry, blob_status, ls, noise, push_image, sha256_digest,
};

/// The mounts' `--timeout`.
const TIMEOUT: Duration = Duration::from_secs(3);
/// What "a little" more than `--timeout` may be, on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(2500);

struct Setup {
    registry: Registry,
    proxy: Proxy,
    /// `team/app:v1`: one large layer.
    big: (String, Vec<u8>),
    /// `team/other:v1`: two small layers, never read before a stall.
    small: Vec<String>,
}

fn setup() -> Setup {
    common::require_tools();
    let registry = Registry::start();
    let big = noise(48 << 20, 7);
    let (_, layers) = push_image(&registry, "team/app", "v1", &[&big]);
    let (a, b) = (noise(300 << 10, 8), noise(200 << 10, 9));
    let (_, small) = push_image(&registry, "team/other", "v1", &[&a, &b]);
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    Setup {
        registry,
        proxy,
        big: (layers[0].clone(), big),
        small,
    }
}

fn timeout_arg() -> String {
    format!("{}s", TIMEOUT.as_secs())
}

fn mount(proxy: &Proxy, extra: &[&str]) -> Mount {
    let timeout = timeout_arg();
    let mut args = vec!["--timeout", &timeout];
    args.extend_from_slice(extra);
    Mount::start(&proxy.url(), &args)
}

fn assert_in_time(what: &str, took: Duration) {
    assert!(
        took < TIMEOUT + SLACK,
        "{what} took {took:?}; --timeout is {TIMEOUT:?}"
    );
}

fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Bytes the process has read so far (`rchar` of /proc/<pid>/io).
fn bytes_read_by(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines().find_map(|l| {
                l.strip_prefix("rchar: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

#[test]
fn sha256sum_of_a_blob_whose_registry_stops_midway_fails_within_the_timeout() {
    let s = setup();
    // The tag list and manifest read below stay known for the whole test.
    let m = mount(&s.proxy, &["--cache-size", "16MiB", "--tag-ttl", "1h"]);
    let (digest, bytes) = &s.big;
    let blob = m.path(&format!("team/app/blobs/{digest}"));
    assert_eq!(
        fs::metadata(&blob).expect("stat the blob").len(),
        bytes.len() as u64
    );
    assert_eq!(ls(&m.path("team/app/tags")), ["v1"]);
    let manifest_path = m.path("team/app/tags/v1/manifest.json");
    let manifest = fs::read(&manifest_path).expect("read the manifest");

    // The registry stops answering in the middle of the blob: after 16 of its 48 MiB,
    // however fast sha256sum happens to read, so it cannot have finished.
    s.proxy.stall_after_bytes(16 << 20);
    let sum = Command::new("sha256sum")
        .arg(&blob)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stalled = loop {
        if let Some(at) = s.proxy.stalled_at() {
            break at;
        }
        assert!(Instant::now() < deadline, "sha256sum did not get going");
        thread::sleep(Duration::from_millis(5));
    };
    assert!(bytes_read_by(sum.id()) < bytes.len() as u64);

    // The rest of the mount answers meanwhile, from what it knows.
    assert_eq!(ls(&m.path("team/app/tags")), ["v1"]);
    assert_eq!(
        fs::read(&manifest_path).expect("read the manifest"),
        manifest
    );
    assert!(
        stalled.elapsed() < TIMEOUT,
        "the tree waited on the stalled blob"
    );

    let out = sum.wait_with_output().expect("wait for sha256sum");
    let took = stalled.elapsed();
    assert!(
        !out.status.success(),
        "sha256sum succeeded against a stalled registry"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    assert_in_time("sha256sum's EIO", took);
    assert!(m.log().contains("--timeout"), "{}", m.log());

    // The registry comes back: the same mount reads the whole blob right.
    s.proxy.set_stall_all(false);
    let again = Command::new("sha256sum")
        .arg(&blob)
        .output()
        .expect("sha256sum");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let hex = String::from_utf8_lossy(&again.stdout);
    assert_eq!(format!("sha256:{}", &hex[..64]), sha256_digest(bytes));
}

#[test]
fn stat_listing_and_many_readers_of_a_stalled_registry_fail_within_the_timeout() {
    let s = setup();
    let m = mount(&s.proxy, &[]);
    // Known before the stall: the repository exists (the catalog). Not its tags: a
    // listing of tags/ warms their manifests in the background, and with those the
    // walk below could finish without the registry, or not, as the timing falls.
    assert_eq!(
        ls(&m.path("team/other")),
        ["blobs", "manifests", "tags", "uploads"]
    );
    s.proxy.set_stall_all(true);

    // A blob nobody has sized yet: its stat needs a HEAD.
    let blob = m.path(&format!("team/other/blobs/{}", s.small[0]));
    let started = Instant::now();
    let err = fs::metadata(&blob).expect_err("stat through a stalled registry");
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert_in_time("a stat", started.elapsed());

    // A listing that needs the registry (the walk of what the tags reach).
    let started = Instant::now();
    let err = fs::read_dir(m.path("team/other/blobs")).expect_err("ls through a stall");
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert_in_time("a listing", started.elapsed());

    // Eight programs reading the same unread blob at once: one wait for all of them.
    let other = m.path(&format!("team/other/blobs/{}", s.small[1]));
    let started = Instant::now();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let path = other.clone();
            thread::spawn(move || fs::read(path).map(|b| b.len()))
        })
        .collect();
    for reader in readers {
        let result = reader.join().expect("reader thread");
        let err = result.expect_err("read through a stalled registry");
        assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    }
    assert_in_time("eight readers", started.elapsed());

    // The daemon is alive and well once the registry is back (after the moment for
    // which a failure is remembered, so the kernel's retries do not wait again).
    s.proxy.set_stall_all(false);
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        fs::read(&other).expect("read after the stall").len(),
        200 << 10
    );
}

#[test]
fn a_registry_that_trickles_counts_as_stalled_and_a_slow_one_does_not() {
    let s = setup();
    // Small blocks, so that a slow but steady registry can answer one in time.
    let m = mount(&s.proxy, &["--block-size", "64KiB"]);
    let (digest, bytes) = &s.big;
    let blob = m.path(&format!("team/app/blobs/{digest}"));
    let file = File::open(&blob).expect("open the blob");

    // 64 KiB/s: slow, far above the floor of 1 KiB/s. A block arrives in about a second.
    s.proxy.set_trickle(64 << 10);
    let mut piece = vec![0; 4096];
    file.read_exact_at(&mut piece, 10 << 20)
        .expect("read from a slow registry");
    assert_eq!(piece, bytes[10 << 20..(10 << 20) + 4096]);

    // 200 bytes/s: a registry that only pretends to answer.
    s.proxy.set_trickle(200);
    let started = Instant::now();
    let err = file
        .read_exact_at(&mut piece, 30 << 20)
        .expect_err("read from a trickling registry");
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert_in_time("a read from a trickling registry", started.elapsed());

    // Back to full speed: a new open reads at once (the failed one keeps failing
    // for a moment, see blob.rs).
    s.proxy.set_trickle(0);
    let file = File::open(&blob).expect("open the blob again");
    file.read_exact_at(&mut piece, 30 << 20)
        .expect("read once the registry is back");
    assert_eq!(piece, bytes[30 << 20..(30 << 20) + 4096]);
}

#[test]
fn close_of_an_upload_to_a_stalled_registry_fails_within_the_timeout() {
    let s = setup();
    let m = mount(&s.proxy, &[]);
    let content = noise(3 << 20, 11);
    let path = m.path("team/app/uploads/stalled.bin");
    let mut file = File::create(&path).expect("create in uploads/");
    file.write_all(&content)
        .expect("write (buffered until close)");
    s.proxy.set_stall_all(true);
    let started = Instant::now();
    let err = common::close(file).expect_err("close through a stalled registry");
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert_in_time("close", started.elapsed());

    // Nothing was committed, and the mount still works.
    s.proxy.set_stall_all(false);
    assert_eq!(
        blob_status(s.registry.addr, "team/app", &sha256_digest(&content)),
        404
    );
    let mut again = Vec::new();
    File::open(m.path("team/app/tags/v1/manifest.json"))
        .and_then(|mut f| f.read_to_end(&mut again))
        .expect("read after the stall");
    assert!(!again.is_empty());
    assert!(!Path::new(&path).exists());
}
