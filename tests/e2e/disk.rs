//! The disk cache (docs/SEMANTICS.md, "Disk cache") against the real registry, through the
//! kernel: what a second mount and a restarted daemon read without the network, sharing,
//! kills, the size bound, a full disk, a hostile registry, passthrough, and `regfs cache`.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, Proxy, ProxyRules, Registry, layers, stat};

/// Blob bytes that came over the network.
fn blob_traffic(mnt: &Mount) -> (u64, u64) {
    let requests = stat(mnt, &["requests", "blob_range"]) + stat(mnt, &["requests", "blob_stream"]);
    (requests, stat(mnt, &["fetched_bytes"]))
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn cache_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("regfs-disk-")
        .tempdir()
        .expect("temp cache dir")
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// `du -s -B1 DIR`: what the directory takes on disk.
fn du(dir: &Path) -> u64 {
    let out = common::run(Command::new("du").args(["-s", "-B1"]).arg(dir));
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du output: {out}"))
}

fn regfs_cache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_regfs"))
        .arg("cache")
        .args(args)
        .output()
        .expect("run regfs cache")
}

#[test]
fn a_second_mount_and_a_restarted_daemon_read_from_disk_without_the_network() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/warm", 5 << 20, 11)]).remove(0);
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path()), "--block-size", "256KiB"];

    let first = Mount::start(&registry.url(), &args);
    layer.read_through(&first);
    assert!(blob_traffic(&first).1 >= layer.bytes.len() as u64);
    eventually("the blob kept whole and verified", || {
        stat(&first, &["disk", "verified_blobs"]) == 1
    });
    // A second mount at the same time, then a restart: no blob bytes over the network.
    let second = Mount::start(&registry.url(), &args);
    layer.read_through(&second);
    assert_eq!(
        blob_traffic(&second),
        (0, 0),
        "second mount fetched blob bytes"
    );
    drop(second);
    drop(first);
    let restarted = Mount::start(&registry.url(), &args);
    layer.read_through(&restarted);
    assert_eq!(
        blob_traffic(&restarted),
        (0, 0),
        "restarted daemon fetched blob bytes"
    );
    // Root on Linux ≥ 6.9: the whole verified blob is opened with FUSE passthrough.
    assert!(
        stat(&restarted, &["disk", "passthrough_opens"]) >= 1,
        "no passthrough open: {}",
        restarted.log()
    );
    // And a random read through passthrough gives the right bytes.
    let file = fs::File::open(layer.path(&restarted)).expect("open");
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 3_000_001).expect("pread");
    assert!(buf == layer.bytes[3_000_001..3_000_001 + 4096]);
}

#[test]
fn blocks_read_before_a_restart_are_not_fetched_again() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/partial", 4 << 20, 12)]).remove(0);
    // Both mounts go through one proxy (the disk keeps unverified blocks per origin),
    // which shows the ranges the second one asks for.
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path()), "--block-size", "64KiB"];
    let head = 1 << 20;
    let read_head = |mnt: &Mount| {
        let file = fs::File::open(layer.path(mnt)).expect("open");
        let mut buf = vec![0u8; head];
        file.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf == layer.bytes[..head], "wrong bytes");
    };
    let first = Mount::start(&proxy.url(), &args);
    read_head(&first);
    let fetched = blob_traffic(&first).1;
    assert!(fetched >= head as u64);
    // The writer may still be busy with the last blocks: wait until what the disk
    // holds stops growing.
    let on_disk = || stat(&first, &["disk", "bytes"]);
    let mut last = on_disk();
    eventually("the disk writer is done", || {
        thread::sleep(Duration::from_millis(300));
        let now = on_disk();
        std::mem::replace(&mut last, now) == now && now >= head as u64
    });
    assert_eq!(stat(&first, &["disk", "dropped_writes"]), 0);
    first.terminate();
    proxy.reset_counters();
    let again = Mount::start(&proxy.url(), &args);
    read_head(&again);
    // Read-ahead may fetch past what was read before; nothing of the head again.
    let starts: Vec<u64> = proxy
        .ranges_seen()
        .iter()
        .filter_map(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse().ok())
        .collect();
    assert!(
        starts.iter().all(|&s| s >= head as u64),
        "what was on disk was fetched again: ranges {:?}",
        proxy.ranges_seen()
    );
    // The rest still comes from the registry, and the whole blob is right.
    layer.read_through(&again);
    assert!(blob_traffic(&again).1 > 0);
}

#[test]
fn two_mounts_share_one_cache_directory_concurrently() {
    common::require_tools();
    let registry = Registry::start();
    let ls = layers(
        &registry,
        &[
            ("disk/shared", 6 << 20, 21),
            ("disk/only-a", 2 << 20, 22),
            ("disk/only-b", 2 << 20, 23),
        ],
    );
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path()), "--block-size", "128KiB"];
    let a = Mount::start(&registry.url(), &args);
    let b = Mount::start(&registry.url(), &args);
    thread::scope(|s| {
        for (mnt, own) in [(&a, &ls[1]), (&b, &ls[2])] {
            let shared = &ls[0];
            s.spawn(move || shared.read_through(mnt));
            s.spawn(move || shared.read_through(mnt));
            s.spawn(move || own.read_through(mnt));
        }
    });
    let total = |m: &Mount| stat(m, &["disk", "verified_blobs"]);
    eventually("all three blobs whole on disk", || {
        total(&a) + total(&b) >= 3
    });
    drop((a, b));
    let c = Mount::start(&registry.url(), &args);
    for layer in &ls {
        layer.read_through(&c);
    }
    assert_eq!(blob_traffic(&c), (0, 0));
    let out = regfs_cache(&["verify", arg(cache.path())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_daemon_killed_mid_read_leaves_nothing_a_new_mount_trusts_wrongly() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/killed", 24 << 20, 31)]).remove(0);
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path()), "--block-size", "64KiB"];
    let victim = Mount::start(&registry.url(), &args);
    let pid = victim.pid();
    let path = layer.path(&victim);
    let reader = thread::spawn(move || {
        // Reads until the mount dies under it.
        let Ok(file) = fs::File::open(&path) else {
            return 0;
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while let Ok(n) = file.read_at(&mut buf, at) {
            if n == 0 {
                break;
            }
            at += n as u64;
        }
        at
    });
    eventually("some of the blob read", || {
        stat(&victim, &["fetched_bytes"]) > 4 << 20
    });
    // SAFETY: kill(2) on the child we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let read = reader.join().expect("reader");
    assert!(read < layer.bytes.len() as u64, "killed before the end");
    drop(victim); // clears the dead mount
    let fresh = Mount::start(&registry.url(), &args);
    layer.read_through(&fresh);
    assert!(
        blob_traffic(&fresh).1 < layer.bytes.len() as u64,
        "nothing of the killed daemon's blocks was used"
    );
    let out = regfs_cache(&["verify", arg(cache.path())]);
    assert!(
        out.status.success(),
        "damage after a kill: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_size_bound_holds_while_reading_more_than_it() {
    common::require_tools();
    let registry = Registry::start();
    let specs: Vec<(String, usize, u32)> = (0..5)
        .map(|i| (format!("disk/bound{i}"), 3 << 20, 40 + i))
        .collect();
    let specs: Vec<(&str, usize, u32)> =
        specs.iter().map(|(r, s, n)| (r.as_str(), *s, *n)).collect();
    let ls = layers(&registry, &specs);
    let cache = cache_dir();
    let (budget, block) = (8u64 << 20, 256u64 << 10);
    let args = [
        "--cache-dir",
        arg(cache.path()),
        "--disk-cache-size",
        "8MiB",
        "--block-size",
        "256KiB",
    ];
    let mnt = Mount::start(&registry.url(), &args);
    for layer in &ls {
        layer.read_through(&mnt);
        thread::sleep(Duration::from_millis(200));
        let used = du(cache.path());
        assert!(
            used <= budget + block,
            "du {used} > budget {budget} + a block"
        );
    }
    assert!(stat(&mnt, &["disk", "evictions"]) > 0);
    // The most recently read blob is still there.
    let last = ls.last().expect("layers");
    let before = blob_traffic(&mnt).1;
    drop(mnt);
    let again = Mount::start(&registry.url(), &args);
    last.read_through(&again);
    assert_eq!(blob_traffic(&again).1, 0, "the newest blob was evicted");
    assert!(before > 0);
}

#[test]
fn a_full_disk_does_not_fail_reads() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/full", 6 << 20, 51)]).remove(0);
    let small = cache_dir();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(small.path())
        .status()
        .expect("mount tmpfs");
    assert!(status.success(), "mount a 2 MiB tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.path().to_owned());
    let args = [
        "--cache-dir",
        arg(small.path()),
        "--disk-cache-size",
        "64MiB",
        "--block-size",
        "256KiB",
    ];
    let mnt = Mount::start(&registry.url(), &args);
    layer.read_through(&mnt);
    layer.read_through(&mnt);
    eventually("the full disk logged", || {
        mnt.log().contains("no space left")
    });
    assert!(stat(&mnt, &["disk", "dropped_writes"]) > 0);
}

#[test]
fn a_registry_serving_wrong_bytes_cannot_poison_another_registrys_reads() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/poison", 3 << 20, 61)]).remove(0);
    // The hostile one: same content names, every blob answer has its first byte changed.
    let hostile = Proxy::start(
        registry.addr,
        ProxyRules {
            corrupt_blob_gets: true,
            ..ProxyRules::default()
        },
    );
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path()), "--block-size", "64KiB"];
    let bad = Mount::start(&hostile.url(), &args);
    let path = layer.path(&bad);
    // A partial read (no digest check yet) caches the wrong first block for that origin.
    let mut head = vec![0u8; 4096];
    fs::File::open(&path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .expect("partial read through the hostile registry");
    assert_ne!(head[0], layer.bytes[0], "the proxy corrupts");
    let whole = fs::read(&path);
    assert!(whole.is_err(), "a wrong blob read to the end fails (EIO)");
    thread::sleep(Duration::from_millis(300));
    let good = Mount::start(&registry.url(), &args);
    layer.read_through(&good);
    assert!(
        blob_traffic(&good).1 >= layer.bytes.len() as u64,
        "the honest registry's mount used bytes another registry served"
    );
    assert!(
        !cache.path().join("blobs").join(&layer.digest).exists() || {
            // Kept whole only from the honest registry's verified read.
            let kept = fs::read(cache.path().join("blobs").join(&layer.digest)).expect("read");
            kept == layer.bytes
        }
    );
}

#[test]
fn no_disk_cache_writes_nothing() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/none", 2 << 20, 71)]).remove(0);
    let default_dir = Path::new("/var/cache/regfs");
    let blob_there = || {
        default_dir.join("blobs").join(&layer.digest).exists()
            || fs::read_dir(default_dir.join("partial"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|o| {
                    fs::read_dir(o.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(&layer.digest))
                })
    };
    let mnt = Mount::start(&registry.url(), &["--no-disk-cache"]);
    layer.read_through(&mnt);
    assert_eq!(stat(&mnt, &["disk", "budget"]), 0);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !blob_there(),
        "--no-disk-cache wrote the blob to the default cache"
    );
    drop(mnt);
    let again = Mount::start(&registry.url(), &["--no-disk-cache"]);
    layer.read_through(&again);
    assert!(blob_traffic(&again).1 >= layer.bytes.len() as u64);
}

#[test]
fn cache_verify_catches_a_flipped_byte_and_the_entry_is_fetched_again() {
    common::require_tools();
    let registry = Registry::start();
    let layer = layers(&registry, &[("disk/flip", 2 << 20, 81)]).remove(0);
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path())];
    let mnt = Mount::start(&registry.url(), &args);
    layer.read_through(&mnt);
    eventually("kept whole", || {
        stat(&mnt, &["disk", "verified_blobs"]) == 1
    });
    drop(mnt);
    let kept = cache.path().join("blobs").join(&layer.digest);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&kept)
        .expect("open entry");
    let flipped = [layer.bytes[1000] ^ 0x40];
    file.write_all_at(&flipped, 1000).expect("flip a byte");
    drop(file);

    let out = regfs_cache(&["verify", arg(cache.path())]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify found nothing: {report}");
    assert!(report.contains(&layer.digest), "{report}");
    assert!(!kept.exists(), "the damaged entry is removed");
    let again = Mount::start(&registry.url(), &args);
    layer.read_through(&again);
    assert!(
        blob_traffic(&again).1 >= layer.bytes.len() as u64,
        "refetched"
    );
    let out = regfs_cache(&["verify", arg(cache.path())]);
    assert!(out.status.success());
}

#[test]
fn cache_du_ls_and_prune() {
    common::require_tools();
    let registry = Registry::start();
    let ls = layers(
        &registry,
        &[("disk/a", 2 << 20, 91), ("disk/b", 1 << 20, 92)],
    );
    let cache = cache_dir();
    let mnt = Mount::start(&registry.url(), &["--cache-dir", arg(cache.path())]);
    for layer in &ls {
        layer.read_through(&mnt);
    }
    eventually("both kept", || stat(&mnt, &["disk", "verified_blobs"]) == 2);
    drop(mnt);
    let text = |args: &[&str]| {
        let out = regfs_cache(args);
        assert!(out.status.success(), "regfs cache {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = text(&["ls", arg(cache.path())]);
    for layer in &ls {
        assert!(listing.contains(&layer.digest), "{listing}");
    }
    assert!(text(&["du", arg(cache.path())]).contains("2 verified blobs"));
    let before = du(cache.path());
    text(&["prune", "--max", "2MiB", arg(cache.path())]);
    let after = du(cache.path());
    assert!(after <= 2 << 20 && after < before, "{before} -> {after}");
    let listing = text(&["ls", arg(cache.path())]);
    assert!(
        !listing.contains(&ls[0].digest),
        "the older entry went first: {listing}"
    );
    text(&["prune", arg(cache.path())]);
    assert!(text(&["ls", arg(cache.path())]).trim().is_empty());
    let not_ours = cache_dir();
    assert!(
        !regfs_cache(&["prune", arg(not_ours.path())])
            .status
            .success()
    );
}

#[test]
fn an_index_held_at_unmount_is_pushed_by_the_next_mount() {
    common::require_tools();
    let registry = Registry::start();
    let layout = common::Layout::new();
    layout.new_image("one", "amd64", &[("a.txt", b"held index child")]);
    let index = layout.add_index("multi", &["one"]);
    let body = layout.blob(&index);
    let cache = cache_dir();
    let args = ["--cache-dir", arg(cache.path())];

    let first = Mount::start(&registry.url(), &args);
    fs::create_dir_all(first.path("team/dest")).expect("mkdir -p team/dest");
    // Its child is not in team/dest yet: the index is held, and the write succeeds.
    fs::write(first.path(&format!("team/dest/manifests/{index}")), &body).expect("write index");
    assert_eq!(stat(&first, &["pending_manifests"]), 1);
    first.terminate();
    assert_eq!(
        common::manifest_status(registry.addr, "team/dest", &index),
        404
    );
    let du_line = || {
        let out = regfs_cache(&["du", arg(cache.path())]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(du_line().contains("1 held indexes"), "{}", du_line());

    // The child arrives by another way; the next mount of this registry pushes the index.
    layout.push("one", &registry, "team/dest:one");
    let second = Mount::start(&registry.url(), &args);
    eventually("the held index pushed", || {
        common::manifest_status(registry.addr, "team/dest", &index) == 200
    });
    assert_eq!(stat(&second, &["pending_manifests"]), 0);
    assert!(du_line().contains("0 held indexes"), "{}", du_line());
}
