//! Scale: a repository with 50,000 tags and a registry with 5,000 repositories, served
//! by the real registry. `ls`, `grep -r` and `rsync -a` work, memory stays bounded, and
//! a walk in flight does not hold up an unrelated `cat`.
//!
//! Pushing 55,000 manifests through the API would take minutes, so one image is pushed
//! (by HTTP, as any client would) and the registry's own storage is then filled with
//! more tags and repositories pointing at it, in distribution's layout: link files
//! naming the same manifest and blobs. The registry serves them like any other.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, Registry, RegistryOptions, RssSampler, ls, noise, push_image, sha256_digest};

const TAGS: usize = 50_000;
/// Repositories `ns<i>/app<j>`: NAMESPACES × PER_NAMESPACE.
const NAMESPACES: usize = 10;
const PER_NAMESPACE: usize = 500;

fn link(path: &Path, digest: &str) {
    fs::create_dir_all(path).expect("create storage directory");
    fs::write(path.join("link"), digest).expect("write link");
}

/// The hex part of `sha256:<hex>`.
fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}

/// Makes `repo` (in the registry's storage under `root`) hold `manifest` under `tags`,
/// with the blobs it names.
fn seed_repository(
    root: &Path,
    repo: &str,
    manifest: &str,
    blobs: &[String],
    tags: impl Iterator<Item = String>,
) {
    let dir = root.join("docker/registry/v2/repositories").join(repo);
    for blob in blobs {
        link(&dir.join("_layers/sha256").join(hex(blob)), blob);
    }
    link(
        &dir.join("_manifests/revisions/sha256").join(hex(manifest)),
        manifest,
    );
    // (distribution also keeps `tags/<tag>/index/`, for untagging; reads need only
    // `current`.)
    for tag in tags {
        link(
            &dir.join("_manifests/tags").join(tag).join("current"),
            manifest,
        );
    }
}

struct Seeded {
    registry: Registry,
    manifest: String,
    /// The layer every repository holds, and its bytes.
    layer: (String, Vec<u8>),
    /// A blob of `other/app` only, for the unrelated reader.
    other: (String, Vec<u8>),
}

fn seeded(storage: &Path) -> Seeded {
    common::require_tools();
    let registry = Registry::start_with(&RegistryOptions {
        storage: Some(storage.to_path_buf()),
        ..RegistryOptions::default()
    });
    let layer = noise(64 << 10, 31);
    let (manifest, layers) = push_image(&registry, "seed/app", "v1", &[&layer]);
    let other = noise(8 << 20, 32);
    let (_, others) = push_image(&registry, "other/app", "v1", &[&other]);
    let config = {
        let (_, _, body) = common::get_manifest(&registry, "seed/app", "v1");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
        json["config"]["digest"]
            .as_str()
            .expect("config digest")
            .to_owned()
    };
    let blobs = [config, layers[0].clone()];
    let root = registry.storage_dir();
    let started = Instant::now();
    seed_repository(
        &root,
        "big/app",
        &manifest,
        &blobs,
        (0..TAGS).map(|i| format!("t{i:05}")),
    );
    for ns in 0..NAMESPACES {
        for app in 0..PER_NAMESPACE {
            let repo = format!("ns{ns}/app{app}");
            seed_repository(
                &root,
                &repo,
                &manifest,
                &blobs,
                std::iter::once("v1".to_owned()),
            );
        }
    }
    eprintln!("scale: storage seeded in {:?}", started.elapsed());
    // The registry serves what was written: the API sees the tags.
    assert_eq!(common::tags(&registry, "big/app").len(), TAGS);
    Seeded {
        registry,
        manifest,
        layer: (layers[0].clone(), layer),
        other: (others[0].clone(), other),
    }
}

/// Peak RSS of regfs so far, MiB.
fn peak_mib(mount: &Mount) -> u64 {
    common::proc_status_kib(mount.pid(), "VmHWM").unwrap_or(0) / 1024
}

/// 50,000 tags: listed, looked up, read.
fn tags(mount: &Mount, s: &Seeded) {
    let started = Instant::now();
    let tags = ls(&mount.path("big/app/tags"));
    assert_eq!(tags.len(), TAGS);
    assert_eq!(
        (tags[0].as_str(), tags[TAGS - 1].as_str()),
        ("t00000", "t49999")
    );
    for i in (0..TAGS).step_by(997) {
        let path = mount.path(&format!("big/app/tags/t{i:05}/manifest.json"));
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(sha256_digest(&bytes), s.manifest);
    }
    eprintln!(
        "scale: 50,000 tags listed and 51 read in {:?}",
        started.elapsed()
    );
}

/// 5,000 repositories: listed (five catalog pages), every tag manifest grepped.
fn repositories(mount: &Mount, s: &Seeded) {
    let started = Instant::now();
    assert_eq!(ls(&mount.dir).len(), NAMESPACES + 3); // ns0..ns9, big, other, seed
    assert_eq!(ls(&mount.path("ns3")).len(), PER_NAMESPACE);
    // While that walk runs, an unrelated read is not held up behind it.
    let grep = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -rl --include=manifest.json {} {}/ns* | wc -l",
            hex(&s.layer.0),
            mount.dir.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("run grep");
    thread::sleep(Duration::from_millis(300));
    let other = mount.path(&format!("other/app/blobs/{}", s.other.0));
    let read_started = Instant::now();
    let bytes = fs::read(&other).expect("read an unrelated blob during the walk");
    let read_took = read_started.elapsed();
    assert_eq!(bytes, s.other.1);
    let out = grep.wait_with_output().expect("wait for grep");
    let grep_took = started.elapsed();
    let matched: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert_eq!(matched, NAMESPACES * PER_NAMESPACE);
    assert!(
        read_took < grep_took / 2,
        "the unrelated read took {read_took:?}, the walk {grep_took:?}"
    );
    eprintln!(
        "scale: grep over 5,000 repositories in {grep_took:?}; an unrelated 8 MiB read meanwhile {read_took:?}"
    );
}

/// rsync -a of a namespace of 500 repositories: every blob right.
fn rsync_a_namespace(mount: &Mount, s: &Seeded) {
    let started = Instant::now();
    let backup = tempfile::tempdir().expect("tempdir");
    let out = Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", mount.path("ns7").display()))
        .arg(backup.path())
        .output()
        .expect("run rsync");
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied: PathBuf = backup.path().join(format!("app123/blobs/{}", s.layer.0));
    assert_eq!(fs::read(copied).expect("a copied blob"), s.layer.1);
    let copied_repos = fs::read_dir(backup.path()).expect("backup").count();
    assert_eq!(copied_repos, PER_NAMESPACE);
    eprintln!(
        "scale: rsync -a of 500 repositories in {:?}",
        started.elapsed()
    );
}

#[test]
fn fifty_thousand_tags_and_five_thousand_repositories() {
    let _alone = crate::alone();
    // In memory (tmpfs): a quarter of a million small files and directories, which a
    // disk takes tens of seconds to create.
    let storage = tempfile::Builder::new()
        .prefix("regfs-scale-")
        .tempdir_in("/dev/shm")
        .expect("a temp dir in /dev/shm");
    let s = seeded(storage.path());
    let mount = Mount::start(
        &s.registry.url(),
        &["--cache-size", "32MiB", "--no-disk-cache"],
    );
    let rss = RssSampler::start(mount.pid());

    tags(&mount, &s);
    repositories(&mount, &s);
    rsync_a_namespace(&mount, &s);

    let peak = rss.stop();
    eprintln!(
        "scale: peak RSS {} MiB (VmHWM {} MiB)",
        peak.peak_mib(),
        peak_mib(&mount)
    );
    // The block cache (32 MiB), the metadata memos (bounded by bytes), the inode table
    // of what was walked, and the runtime.
    assert!(peak.peak_mib() < 160, "peak RSS {} MiB", peak.peak_mib());
}
