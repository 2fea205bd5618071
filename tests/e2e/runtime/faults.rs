//! A registry that stops answering while containers run from it, one eStargz and one
//! zstd:chunked (the harness's proxy between the snapshotter's mount and the registry
//! holds every request): a container's read of a file not read before fails with EIO
//! within `--timeout`, the snapshotter goes on answering from its metadata, and a pull
//! in that moment falls back to containerd's own download, counted. Once the registry
//! answers again, the same read succeeds.

use std::process::Output;
use std::time::{Duration, Instant};

use super::containerd::{Containerd, Rig, Setup, prerequisites};
use super::remote::{counter, push_image_with};
use crate::common::{Proxy, ProxyRules, Registry, noise};

/// The mounts' `--timeout`.
const TIMEOUT: Duration = Duration::from_secs(3);
/// What a container's failed read may take past `--timeout` before the test calls it
/// hung: `ctr task exec` and the shim on a busy machine (the proxy holds a stalled
/// request for 60 s).
const SLACK: Duration = Duration::from_secs(20);
/// A file of the second layer big enough that no part of it comes with the layer's
/// TOC (read from the blob's last 64 KiB).
const UNREAD: &str = "data/unread";
const UNREAD_LEN: usize = 1 << 20;

fn exec(ctr: &Containerd, id: &str, exec_id: &str, script: &str) -> Output {
    ctr.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The two-layer image (gzip) and its eStargz and zstd:chunked conversions, whose files
/// are fetched when read; containerd keeps none of them.
fn images(rig: &Rig) -> (String, [String; 2]) {
    let (gzip, _) = push_image_with(&rig.registry, &[(UNREAD, noise(UNREAD_LEN, 9))]);
    let ctr = rig.ctr();
    ctr.ctr_ok(&["image", "pull", "--plain-http", &gzip]);
    let converted = [("esgz", "--estargz"), ("zchunk", "--zstdchunked")].map(|(tag, flag)| {
        let to = format!("{}/t/app:{tag}", rig.host());
        ctr.ctr_ok(&["image", "convert", flag, "--oci", &gzip, &to]);
        ctr.ctr_ok(&["image", "push", "--plain-http", &to]);
        ctr.ctr_ok(&["image", "rm", "--sync", &to]);
        to
    });
    ctr.ctr_ok(&["image", "rm", "--sync", &gzip]);
    (gzip, converted)
}

/// A container's read of [`UNREAD`] while the registry is silent: EIO, well before a
/// hang (busybox's `time` says how long inside the container; printed).
fn assert_read_fails(ctr: &Containerd, id: &str, what: &str) {
    let started = Instant::now();
    let out = exec(
        ctr,
        id,
        "e2",
        &format!("busybox time cat /{UNREAD} > /dev/null"),
    );
    let took = started.elapsed();
    eprintln!(
        "{what}: a read from a silent registry failed after {took:?}: {}",
        said(&out).trim()
    );
    assert!(!out.status.success(), "{what}: read from a silent registry");
    assert!(
        said(&out).contains("I/O error") || said(&out).contains("Input/output error"),
        "{what}: EIO: {}",
        said(&out)
    );
    assert!(
        took < TIMEOUT + SLACK,
        "{what}: the read failed after {took:?}; --timeout is {TIMEOUT:?}"
    );
}

/// While the registry is silent the snapshotter answers Walk, Stat and Usage from
/// its metadata, and a pull falls back to containerd's download, counted and logged.
fn snapshotter_stays_up(rig: &mut Rig, gzip: &str) {
    let ctr = rig.ctr();
    let listed = ctr.ctr_ok(&["snapshots", "--snapshotter", "regfs", "ls"]);
    let key = listed
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no snapshot listed: {listed}"));
    ctr.ctr_ok(&["snapshots", "--snapshotter", "regfs", "info", key]);
    ctr.ctr_ok(&["snapshots", "--snapshotter", "regfs", "usage"]);
    ctr.rpull(gzip);
    let stats = rig.snapshotter.stats();
    eprintln!("while the registry was silent: {stats}");
    // Two layers of each TOC image before.
    assert_eq!(counter(rig, &["remote_snapshots"]), 4, "{stats}");
    assert_eq!(counter(rig, &["fallbacks"]), 2, "{stats}");
    let log = rig.snapshotter.log();
    assert_eq!(log.matches("not served by regfs").count(), 2, "{log}");
    assert!(rig.snapshotter.is_running(), "{log}");
}

#[test]
fn a_silent_registry_fails_reads_with_eio_and_not_the_snapshotter() {
    prerequisites();
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let setup = Setup {
        hosts_toml: format!("server = \"{}\"\n", proxy.url()),
        timeout: "3s",
        flags: &["--no-background-fetch"],
    };
    let mut rig = Rig::start_for(registry, setup);
    let (gzip, converted) = images(&rig);
    let ctr = rig.ctr();
    let mut ids = Vec::new();
    for image in &converted {
        ctr.rpull(image);
        let id = rig.id(&format!("f{}", ids.len()));
        ctr.start_sleeper(image, &id);
        assert_eq!(said(&exec(ctr, &id, "e1", "cat /data/one")), "one\n");
        ids.push(id);
    }

    proxy.set_stall_all(true);
    for (id, image) in ids.iter().zip(&converted) {
        assert_read_fails(ctr, id, image);
    }
    snapshotter_stays_up(&mut rig, &gzip);

    proxy.set_stall_all(false);
    let ctr = rig.ctr();
    for id in &ids {
        let out = exec(ctr, id, "e3", &format!("busybox wc -c < /{UNREAD}"));
        assert_eq!(said(&out).trim(), UNREAD_LEN.to_string());
        ctr.kill_task(id);
    }
    // The image that fell back runs from containerd's own snapshots, the first time.
    let id = rig.id("f2");
    let args = [
        "run",
        "--rm",
        "--snapshotter",
        "regfs",
        &gzip,
        &id,
        "cat",
        "/data/two",
    ];
    let out = rig.ctr().ctr(&args);
    assert!(
        out.status.success(),
        "the image that fell back does not run: {}\nthe snapshotter's log:\n{}",
        said(&out),
        rig.snapshotter.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n");
    // containerd's garbage collection calls Cleanup as the kills above are collected,
    // beside this run's Prepare; no directory here is left over, so none may go.
    let log = rig.snapshotter.log();
    assert!(!log.contains("cleanup: removing"), "{log}");
}
