//! Links (`ln` between repositories), manifests pushed on close, directories, deletes
//! refused, and read-only mounts.

use super::*;

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
