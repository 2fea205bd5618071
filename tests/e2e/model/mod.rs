//! A reference model of the tree and its write and delete semantics (docs/SEMANTICS.md,
//! "The tree", "Writes", "Deletes") in plain Rust, and random sequences of operations run against
//! regfs and the model side by side, compared after every step:
//!
//! - without a kernel: `regfs::fs::Fs` driven directly (as the FUSE adapter drives it,
//!   `--timeout` backstop included), many sequences;
//! - through a real mount: the same kind of sequences with `std::fs`, fewer of them and
//!   without faults (what the kernel retries and caches after an EIO is its own
//!   business, and the test would depend on it).
//!
//! Each sequence runs with `--allow-delete` or without it (then every delete is EPERM).
//! The registry is the real one; failures are injected between regfs and it by the
//! harness's proxy (every request answered 502 while an operation runs). Under a fault
//! an operation may fail with EIO (never ENOENT for what exists, never wrong bytes, and
//! a failed write or delete changes nothing in the registry); right after one, regfs may
//! still answer EIO for what it failed to fetch a moment ago (cache/memo.rs,
//! FAILURE_MEMORY); then everything must be as the model says again.
//!
//! `reference.rs` is the model, `generators.rs` the operations and their strategies,
//! `trees.rs` the two ways of driving regfs, `harness.rs` (with `writes.rs` and
//! `deletes.rs`) runs a sequence on both. `REGFS_MODEL_CASES` /
//! `REGFS_MODEL_KERNEL_CASES` set how many sequences run.

mod deletes;
mod generators;
mod harness;
mod reference;
mod trees;
mod writes;

use std::path::Path;

use generators::{Op, op, plain_op, sequence};
use harness::{AFTER_FAULT, Run, registry_behind_a_proxy, runner};
use reference::{Entry, Model, RepoModel};
use trees::{Kernel, direct_fs};

use crate::common::{Mount, Proxy, Registry, sha256_digest};

#[test]
fn the_tree_and_its_writes_follow_the_model_without_a_kernel() {
    let (registry, proxy) = registry_behind_a_proxy();
    let mut runner = runner("REGFS_MODEL_CASES", 6, 32);
    let result = runner.run(&sequence(op(), 1..12), |s| {
        // A fresh daemon state and namespace for each sequence.
        let mut tree = direct_fs(&proxy.url(), s.allow_delete);
        Run::new(&registry, &proxy, "d", s.allow_delete).run(&mut tree, &s.ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Sequences this test found failing once, as proptest shrank them, with what was wrong;
/// they run every time whatever the strategy generates (`model.regressions` keeps
/// proptest's seeds too, which stop meaning the same cases when the strategy changes).
#[test]
fn sequences_that_failed_once_stay_fixed() {
    let (registry, proxy) = registry_behind_a_proxy();
    let found = [
        (
            "a failed (out-of-order) write stayed listed in uploads/ for good",
            vec![Op::OutOfOrder { repo: 375 }],
        ),
        (
            "a temp file whose write fails under a fault: nothing pushed, rm works after",
            vec![
                Op::TempAndRename {
                    repo: 4431,
                    size: 10114,
                },
                Op::Faulty(Box::new(Op::TempAndRename {
                    repo: 8074435216774512162,
                    size: 38845,
                })),
            ],
        ),
        (
            "a temp file and its rename right after a fault (EIO allowed for a moment)",
            vec![
                Op::Faulty(Box::new(Op::Stat(5288))),
                Op::TempAndRename {
                    repo: 6014972199733434285,
                    size: 24842,
                },
            ],
        ),
        (
            "a blob ln'ed into another repository was missing from its blobs/",
            vec![Op::Link {
                from: 9888537340979241141,
                blob: 14108628907079134215,
                to: 18154380268464774164,
            }],
        ),
        (
            "ln onto a blob that exists (the same repository) said yes, not EEXIST",
            vec![Op::Link {
                from: 0,
                blob: 0,
                to: 0,
            }],
        ),
    ];
    let failed = failures(&registry, &proxy, false, found.into_iter());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The same for sequences with `--allow-delete`.
#[test]
fn deletes_that_failed_once_stay_fixed() {
    let (registry, proxy) = registry_behind_a_proxy();
    let upload = Op::Upload {
        repo: 0,
        size: 1000,
        piece: 1000,
    };
    // Which of the listed blobs was pushed through the mount depends on the digests:
    // each is deleted in turn (the others are EBUSY).
    let pushed = (0..4).map(|blob| {
        let ops = vec![
            upload.clone(),
            Op::RmLink { repo: 0, link: 0 },
            Op::RmBlob { repo: 0, blob },
        ];
        (
            "a blob pushed through the mount stayed listed in blobs/ once deleted",
            ops,
        )
    });
    let linked = (0..2).map(|blob| {
        let ops = vec![
            Op::RmTag {
                repo: 0,
                tag: 0,
                recursive: true,
            },
            Op::Link {
                from: 1,
                blob,
                to: 0,
            },
            Op::RmBlob { repo: 0, blob },
        ];
        (
            "a blob ln'ed from another repository stayed listed once deleted",
            ops,
        )
    });
    let failed = failures(&registry, &proxy, true, pushed.chain(linked));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Runs each sequence on a fresh `Fs`; what failed, with what was wrong once.
fn failures<'a>(
    registry: &Registry,
    proxy: &Proxy,
    allow_delete: bool,
    found: impl Iterator<Item = (&'a str, Vec<Op>)>,
) -> Vec<String> {
    found
        .filter_map(|(what, ops)| {
            let mut tree = direct_fs(&proxy.url(), allow_delete);
            let outcome = Run::new(registry, proxy, "r", allow_delete).run(&mut tree, &ops);
            outcome.err().map(|e| format!("{what} ({ops:?}): {e}"))
        })
        .collect()
}

#[test]
fn the_same_through_a_real_mount() {
    let (registry, proxy) = registry_behind_a_proxy();
    let mut runner = runner("REGFS_MODEL_KERNEL_CASES", 4, 16);
    let args = [
        "--timeout",
        "5s",
        "--tag-ttl",
        "1h",
        "--no-disk-cache",
        "--chunk-size",
        "64KiB",
        "--block-size",
        "64KiB",
    ];
    let result = runner.run(&sequence(plain_op(), 1..8), |s| {
        let mut args = args.to_vec();
        if s.allow_delete {
            args.push("--allow-delete");
        }
        let mount = Mount::start(&proxy.url(), &args);
        let mut tree = Kernel { mount: &mount };
        let outcome = Run::new(&registry, &proxy, "k", s.allow_delete).run(&mut tree, &s.ops);
        if outcome.is_err() {
            eprintln!("--- regfs log ---\n{}", mount.log());
        }
        outcome
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn model_paths_are_what_the_readme_shows() {
    // The model itself: a sanity check of its own answers, without regfs.
    let mut model = Model::new("m");
    model.repos.insert("app".into(), RepoModel::default());
    model.pushed_blob("app", Some("f1"), b"x".to_vec());
    let d = sha256_digest(b"x");
    assert_eq!(model.list("m"), Some(vec!["app".to_owned()]));
    assert_eq!(model.list("m/app/uploads"), Some(vec!["f1".to_owned()]));
    assert_eq!(
        model.entry("m/app/uploads/f1"),
        Some(Entry::Link(format!("../blobs/{d}")))
    );
    assert_eq!(
        model.entry(&format!("m/app/blobs/{d}")),
        Some(Entry::File(b"x".to_vec()))
    );
    assert_eq!(model.entry("m/app/nothing"), None);
    assert!(Path::new("m/app").is_relative());
}

#[test]
fn model_nests_and_deletes_as_the_readme_shows() {
    // `mkdir -p m/new0/sub1`: a namespace, and a repository to be below it.
    let mut model = Model::new("m");
    model.made_dir("new0/sub1");
    assert_eq!(model.list("m"), Some(vec!["new0".to_owned()]));
    assert_eq!(model.list("m/new0"), Some(vec!["sub1".to_owned()]));
    let repo_dirs = ["blobs", "manifests", "tags", "uploads"].map(String::from);
    assert_eq!(model.list("m/new0/sub1"), Some(repo_dirs.to_vec()));
    assert_eq!(model.repo_names(), vec!["new0/sub1".to_owned()]);
    assert!(model.exists("new0") && !model.exists("new0/sub2"));

    // A tag over a pushed blob: the blob is EBUSY while the tag uses it; the untag
    // leaves the tag's directory, empty; then the blob goes, its link stays.
    model.pushed_blob("new0/sub1", Some("f1"), b"x".to_vec());
    let d = sha256_digest(b"x");
    let manifest = crate::common::oci_manifest(&d, 1, &[(&d, 1)]);
    model.pushed_tag("new0/sub1", "t1", manifest.clone());
    assert!(
        model.made.is_empty(),
        "a manifest push makes the path the registry's"
    );
    assert_eq!(model.delete_blob("new0/sub1", &d), Err(libc::EBUSY));
    assert_eq!(model.untag("new0/sub1", "t1"), Ok(()));
    model.untagged("new0/sub1", "t1");
    assert_eq!(model.list("m/new0/sub1/tags/t1"), Some(vec![]));
    assert_eq!(model.list("m/new0/sub1/manifests"), Some(vec![]));
    assert_eq!(model.delete_blob("new0/sub1", &d), Ok(()));
    model.deleted_blob("new0/sub1", &d);
    assert_eq!(model.list("m/new0/sub1/blobs"), Some(vec![]));
    assert_eq!(
        model.entry("m/new0/sub1/uploads/f1"),
        Some(Entry::Link(format!("../blobs/{d}")))
    );
    assert_eq!(model.entry(&format!("m/new0/sub1/blobs/{d}")), None);

    // Two tags of one manifest: untagging either would take both.
    model.pushed_tag("new0/sub1", "a", manifest.clone());
    model.pushed_tag("new0/sub1", "b", manifest);
    assert_eq!(model.untag("new0/sub1", "a"), Err(libc::EBUSY));
}
