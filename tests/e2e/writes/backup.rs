//! Backup and restore with rsync: a repository round trip, and `uploads/` links.

use super::*;

fn rsync(args: &[&OsStr]) -> Output {
    tool("rsync", args)
}

/// `team/app` in `a`: v1 (also as latest), v2 and multi, an index whose name sorts
/// before both of its (untagged) children; the children.
fn seed_app(a: &Registry) -> [String; 2] {
    let layout = Layout::new();
    layout.new_image(
        "v1",
        "amd64",
        &[("etc/motd", b"v1\n"), ("data/blob", &noise(300_000, 71))],
    );
    layout.new_image("v2", "arm64", &[("etc/motd", b"v2\n")]);
    layout.new_image("multi-amd64", "amd64", &[("bin/tool", b"tool for amd64\n")]);
    layout.new_image("multi-arm64", "arm64", &[("bin/tool", b"tool for arm64\n")]);
    layout.push("v1", a, "team/app:v1");
    layout.push("v1", a, "team/app:latest");
    layout.push("v2", a, "team/app:v2");
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
    let index = layout.push_index_with(&children_tags(), a, "team/app:multi", &nonce);
    assert!(index < first);
    children
}

/// B has every tag of A, with the same digests, and nothing held.
fn assert_restored(a: &Registry, b: &Registry, children: &[String; 2], mnt_b: &Mount, work: &Path) {
    let mut tags_a = common::tags(a, "team/app");
    let mut tags_b = common::tags(b, "team/app");
    tags_a.sort();
    tags_b.sort();
    assert_eq!(tags_b, tags_a, "B has every tag of A");
    for tag in &tags_a {
        let (digest_a, _, _) = get_manifest(a, "team/app", tag);
        let raw_b = skopeo_raw_manifest(b.addr, &format!("team/app:{tag}"));
        assert_eq!(sha256_digest(&raw_b), digest_a, "team/app:{tag} on B");
    }
    for child in children {
        assert_eq!(
            manifest_status(b.addr, "team/app", child),
            200,
            "child {child} on B"
        );
    }
    let copies = work.join("oci-from-b");
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
fn rsync_backup_and_restore_round_trip() {
    common::require_tools();
    let a = Registry::start();
    let children = seed_app(&a);

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

    assert_restored(&a, &b, &children, &mnt_b, work.path());
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
