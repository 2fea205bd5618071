//! Remote snapshots through a real containerd: `ctr-remote image rpull` downloads no
//! layer, containers run from regfs's layer directories, writes stay in the container,
//! removal leaves no mount but the host's, a plain pull falls back visibly, and a
//! running container outlives a restart of the snapshotter.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::containerd::{Rig, cgroup_of, cgroup2_root};
use super::go::{GoBuild, go_build};
use crate::common::process::wait_until;
use crate::common::{Layout, Registry, run};

const REPO: &str = "t/app";

/// Two gzip layers built by umoci: busybox-static and /data/one, then /data/two and
/// /data/later (read only after a restart). Returns the image reference and its layer
/// digests.
pub fn push_two_layer_image(registry: &Registry) -> (String, Vec<String>) {
    push_image_with(registry, &[])
}

/// [`push_two_layer_image`] with `more` files (path, contents) in its second layer.
pub fn push_image_with(registry: &Registry, more: &[(&str, Vec<u8>)]) -> (String, Vec<String>) {
    let layout = Layout::new();
    let image = format!("{}:app", layout.oci_dir().display());
    run(Command::new("umoci").args(["new", "--image", &image]));
    let layer = |files: &dyn Fn(&Path)| {
        let bundle = layout.scratch("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle));
        files(&bundle.join("rootfs"));
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
        std::fs::remove_dir_all(&bundle).unwrap();
    };
    layer(&|rootfs| {
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("data")).unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static (scripts/setup.sh)");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        for tool in ["sh", "cat", "ls", "sleep", "echo"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).unwrap();
        }
        std::fs::write(rootfs.join("data/one"), "one\n").unwrap();
    });
    layer(&|rootfs| {
        std::fs::write(rootfs.join("data/two"), "two\n").unwrap();
        std::fs::write(rootfs.join("data/later"), "read after a restart\n").unwrap();
        for (path, bytes) in more {
            std::fs::write(rootfs.join(path), bytes).unwrap();
        }
    });
    layout.push("app", registry, &format!("{REPO}:v1"));
    // From the layout (pushed with its digests kept): the registry may be on TLS.
    let bytes = layout.blob(&layout.manifest_digest("app"));
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    (format!("{}/{REPO}:v1", registry.addr), layers)
}

pub fn counter(rig: &Rig, path: &[&str]) -> u64 {
    let mut value = rig.snapshotter.stats();
    for key in path {
        value = value[*key].clone();
    }
    value.as_u64().unwrap_or(0)
}

/// containerd downloaded none of `layers` (its content store holds the manifest and
/// config only), and the snapshotter served both of them, with no fallback.
fn assert_served_remotely(rig: &Rig, layers: &[String]) {
    let content = rig.ctr().ctr_ok(&["content", "ls", "-q"]);
    for layer in layers {
        assert!(
            !content.contains(layer.as_str()),
            "layer {layer} was downloaded:\n{content}"
        );
    }
    let log = rig.snapshotter.log();
    assert_eq!(counter(rig, &["remote_snapshots"]), 2, "{log}");
    assert_eq!(counter(rig, &["fallbacks"]), 0, "{log}");
}

#[test]
fn rpull_serves_layers_from_regfs_and_runs_containers() {
    let rig = Rig::start();
    let (image, layers) = push_two_layer_image(&rig.registry);
    let ctr = rig.ctr();
    ctr.rpull(&image);

    // containerd downloaded no layer: its content store has the manifest and config only.
    assert_served_remotely(&rig, &layers);

    // A program of the image runs and sees both layers; its writes stay its own.
    let out = ctr.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "regfs",
        &image,
        &rig.id("c1"),
        "sh",
        "-c",
        "cat /data/one /data/two && echo mine > /data/one && cat /data/one",
    ]);
    assert_eq!(out, "one\ntwo\nmine\n");
    let out = rig.cat(&image, "c2", "/data/one");
    assert_eq!(out, "one\n", "a write of another container leaked");

    // Two containers of the image at once.
    ctr.start_sleeper(&image, &rig.id("s1"));
    ctr.start_sleeper(&image, &rig.id("s2"));
    for id in [rig.id("s1"), rig.id("s2")] {
        let out = ctr.ctr_ok(&["task", "exec", "--exec-id", "e", &id, "cat", "/data/two"]);
        assert_eq!(out, "two\n");
    }
    ctr.kill_task(&rig.id("s1"));
    ctr.kill_task(&rig.id("s2"));

    // Removing the image removes its snapshots' mounts; the host's mount stays.
    ctr.ctr_ok(&["image", "rm", "--sync", &image]);
    assert_eq!(
        rig.snapshotter.mounts(),
        [format!("mounts/{}", rig.registry.addr)]
    );
}

#[test]
fn cri_labels_serve_layers_from_regfs() {
    // containerd's CRI puts containerd.io/snapshot/cri.* on each layer; cri-pull pulls
    // with containerd's own handler for them (Debian has no crictl or nerdctl).
    let cri_pull = go_build("cri_pull", GoBuild::Program);
    let rig = Rig::start();
    let (image, layers) = push_two_layer_image(&rig.registry);
    let ctr = rig.ctr();
    run(Command::new("timeout")
        .arg("120")
        .arg(&cri_pull)
        .arg(ctr.address())
        .arg("regfs")
        .arg(&image));
    assert_served_remotely(&rig, &layers);
    let out = rig.cat(&image, "c1", "/data/two");
    assert_eq!(out, "two\n");
}

#[test]
fn a_plain_pull_falls_back_visibly() {
    let rig = Rig::start();
    let (image, layers) = push_two_layer_image(&rig.registry);
    let ctr = rig.ctr();
    // A plain pull carries no labels: containerd downloads and unpacks, and says so.
    ctr.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "regfs",
        &image,
    ]);
    assert_downloaded_by_containerd(&rig, &layers);
    assert_eq!(counter(&rig, &["fallbacks"]), 2);
    assert_eq!(counter(&rig, &["fallback_reasons", "no_labels"]), 2);
    let log = rig.snapshotter.log();
    assert_eq!(
        log.matches("not served by regfs (no_labels)").count(),
        2,
        "{log}"
    );
    let out = rig.cat(&image, "c1", "/data/two");
    assert_eq!(out, "two\n");
    // Ordinary snapshots need no regfs mount at all.
    assert_eq!(rig.snapshotter.mounts(), Vec::<String>::new());
}

#[test]
fn a_layer_regfs_cannot_serve_falls_back_visibly() {
    // The snapshotter's hosts.toml names a registry that is down; containerd's own
    // pull still reaches the real one.
    let rig = Rig::start_with(Some("http://127.0.0.1:1"));
    let (image, layers) = push_two_layer_image(&rig.registry);
    let ctr = rig.ctr();
    ctr.rpull(&image);
    assert_downloaded_by_containerd(&rig, &layers);
    assert_eq!(counter(&rig, &["fallback_reasons", "mount_failed"]), 2);
    let log = rig.snapshotter.log();
    for layer in &layers {
        let line = format!("layer {layer}: not served by regfs (mount_failed)");
        assert_eq!(log.matches(&line).count(), 1, "{log}");
    }
    let out = rig.cat(&image, "c1", "/data/one");
    assert_eq!(out, "one\n");
}

/// A fallback: containerd downloaded every layer itself, and no snapshot is remote.
fn assert_downloaded_by_containerd(rig: &Rig, layers: &[String]) {
    let content = rig.ctr().ctr_ok(&["content", "ls", "-q"]);
    assert!(
        layers.iter().all(|l| content.contains(l.as_str())),
        "{content}"
    );
    assert_eq!(counter(rig, &["remote_snapshots"]), 0);
}

/// What `ctr snapshots ls` and `info` say of every snapshot of the snapshotter: kind,
/// parent, labels and times, which a restart must not change.
fn snapshot_metadata(rig: &Rig) -> Vec<String> {
    let ctr = rig.ctr();
    let listed = ctr.ctr_ok(&["snapshots", "--snapshotter", "regfs", "ls"]);
    let mut seen = vec![listed.clone()];
    for key in listed
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        seen.push(ctr.ctr_ok(&["snapshots", "--snapshotter", "regfs", "info", key]));
    }
    assert!(seen.len() >= 3, "two layers and a container: {listed}");
    seen
}

#[test]
fn a_running_container_outlives_a_snapshotter_restart() {
    let mut rig = Rig::start();
    let (image, _) = push_two_layer_image(&rig.registry);
    rig.ctr().rpull(&image);
    rig.ctr().start_sleeper(&image, &rig.id("r1"));
    let exec = |rig: &Rig, id: &str, file: &str| {
        rig.ctr()
            .ctr_ok(&["task", "exec", "--exec-id", id, &rig.id("r1"), "cat", file])
    };
    assert_eq!(exec(&rig, "e1", "/data/one"), "one\n");

    // The host's mount is served outside the snapshotter's cgroup (its own scope or
    // cgroup), so a service manager stopping the snapshotter's cgroup spares it.
    let mounts = rig.snapshotter.mount_pids();
    assert!(!mounts.is_empty(), "no regfs mount process found");
    let confined = Path::new("/run/systemd/system").exists()
        || cgroup2_root().is_some_and(|r| {
            let probe = r.join(format!("regfs-test-{}", std::process::id()));
            std::fs::create_dir(&probe).is_ok() && std::fs::remove_dir(&probe).is_ok()
        });
    if confined {
        let own = cgroup_of(rig.snapshotter.pid());
        for pid in &mounts {
            assert_ne!(
                cgroup_of(*pid),
                own,
                "mount process {pid} shares the snapshotter's cgroup"
            );
        }
    }

    let metadata = snapshot_metadata(&rig);
    rig.snapshotter.stop();
    // Down: the container still reads a file it had not read.
    assert_eq!(exec(&rig, "e2", "/data/two"), "two\n");
    rig.snapshotter.restart();
    assert!(
        rig.snapshotter.log().contains("adopted"),
        "{}",
        rig.snapshotter.log()
    );
    assert_eq!(exec(&rig, "e3", "/data/later"), "read after a restart\n");
    rig.ctr().wait_for_snapshotter();
    // Its metadata survived: the same snapshots, kinds, parents and labels.
    assert_eq!(snapshot_metadata(&rig), metadata);
    // And the restarted snapshotter serves new containers from the same mount.
    let out = rig.cat(&image, "r2", "/data/later");
    assert_eq!(out, "read after a restart\n");

    // A host's mount process that dies is mounted again by the next call that needs
    // it, and its layers bound anew: a new container runs.
    for pid in rig.snapshotter.mount_pids() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    wait_until(Duration::from_secs(10), "the mount process to end", || {
        rig.snapshotter.mount_pids().is_empty()
    });
    let out = rig.cat(&image, "r3", "/data/two");
    assert_eq!(out, "two\n");
    // The dead mount is cleared either by the snapshotter ("mounting it again") or,
    // first, by the mount's own watchdog; either way the host is mounted anew and the
    // layers bound again.
    let log = rig.snapshotter.log();
    assert!(log.contains("bound again"), "{log}");
    rig.ctr().kill_task(&rig.id("r1"));
}
