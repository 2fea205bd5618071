//! Deleting through the kernel (docs/SEMANTICS.md, "Deletes"; issue 13): `rm -r
//! tags/<tag>`, `rm tags/<tag>/manifest.json`, `rm manifests/<digest>`, `rm blobs/<digest>`
//! with `--allow-delete`; EPERM without it; EBUSY where the registry (distribution 2.8 can
//! only untag by deleting the digest) would take more than was named; EPERM with the
//! registry's text where it refuses deletes. Checked as a user would: errno, `ls`, `skopeo
//! list-tags`, and what the registry serves afterwards.

use crate::common;

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use common::{
    Mount, Proxy, ProxyRules, Registry, RegistryOptions, Response, Tamper, blob_status, ls,
    manifest_status, noise, push_blob, push_tiny_image, push_untagged_image, put_manifest, run,
};

fn assert_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, what: &str) {
    match result {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {errno}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: got {e}"),
    }
}

/// `rm -r path`, as a user types it; its exit status and stderr.
fn rm_r(path: &Path) -> std::process::Output {
    Command::new("timeout")
        .args(["-k", "5", "120", "rm", "-r"])
        .arg(path)
        .output()
        .expect("run rm -r")
}

/// `skopeo list-tags`: the tags as skopeo sees them.
fn skopeo_tags(registry: &Registry, repo: &str) -> Vec<String> {
    let out = run(Command::new("skopeo").args([
        "--command-timeout",
        "60s",
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/{repo}", registry.addr),
    ]));
    let value: serde_json::Value = serde_json::from_str(&out).expect("skopeo list-tags is JSON");
    let mut tags: Vec<String> = value["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    tags.sort();
    tags
}

/// team/app with v1 (its own image), v2 and shared (one image under two tags), an
/// untagged manifest and a blob nothing uses. Returns (v1, v2, untagged, v2's config,
/// stray blob).
fn populated(registry: &Registry) -> (String, String, String, String, String) {
    let (v1, _) = push_tiny_image(registry, "team/app", "v1", 1);
    let (v2, v2_config) = push_tiny_image(registry, "team/app", "v2", 2);
    let (_, _, body) = common::get_manifest(registry, "team/app", "v2");
    put_manifest(registry, "team/app", "shared", common::OCI_MANIFEST, &body);
    let (untagged, _) = push_untagged_image(registry, "team/app", "loose", &[]);
    let stray = push_blob(registry.addr, "team/app", &noise(4096, 5));
    (v1, v2, untagged, v2_config, stray)
}

#[test]
fn without_allow_delete_every_delete_is_eperm() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, _, untagged, _, stray) = populated(&registry);
    let mnt = Mount::start(&registry.url(), &[]);
    for rel in [
        "team/app/tags/v1/manifest.json".to_string(),
        format!("team/app/manifests/{untagged}"),
        format!("team/app/blobs/{stray}"),
    ] {
        assert_errno(
            fs::remove_file(mnt.path(&rel)),
            libc::EPERM,
            &format!("rm {rel}"),
        );
    }
    let out = rm_r(&mnt.path("team/app/tags/v1"));
    assert!(
        !out.status.success(),
        "rm -r tags/v1 without --allow-delete"
    );
    assert_eq!(manifest_status(registry.addr, "team/app", "v1"), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", &v1), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", &untagged), 200);
    assert_eq!(blob_status(registry.addr, "team/app", &stray), 200);
    assert!(ls(&mnt.path("team/app/tags")).contains(&"v1".to_string()));
}

/// What the deleting tests hold: the registry, its `team/app` (see [`populated`]) and a
/// mount of it with `--allow-delete`.
struct Deleting {
    registry: Registry,
    mnt: Mount,
    /// `team/app/tags` in the mount.
    tags: std::path::PathBuf,
    v1: String,
    v2: String,
    untagged: String,
    v2_config: String,
    stray: String,
}

#[test]
fn each_form_of_delete_and_what_it_refuses() {
    common::require_tools();
    let registry = Registry::start();
    let (v1, v2, untagged, v2_config, stray) = populated(&registry);
    let mnt = Mount::start(&registry.url(), &["--allow-delete"]);
    let tags = mnt.path("team/app/tags");
    assert_eq!(ls(&tags), ["shared", "v1", "v2"]);
    assert!(ls(&mnt.path("team/app/manifests")).contains(&v1));
    let d = Deleting {
        registry,
        mnt,
        tags,
        v1,
        v2,
        untagged,
        v2_config,
        stray,
    };
    untag_with_rm_r(&d);
    refused_what_would_take_more(&d);
    unused_manifests_and_blobs_go(&d);
    an_index_holds_its_children(&d);
    a_manifest_goes_with_its_tags(&d);
    an_uploads_link_goes_its_blob_stays(&d);
}

/// rm -r of a tag untags it; the listing and skopeo see it gone at once.
fn untag_with_rm_r(d: &Deleting) {
    let (registry, mnt, tags, v1) = (&d.registry, &d.mnt, &d.tags, &d.v1);
    let out = rm_r(&tags.join("v1"));
    assert!(
        out.status.success(),
        "rm -r tags/v1: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mnt.log()
    );
    assert_eq!(ls(tags), ["shared", "v2"]);
    assert_eq!(skopeo_tags(registry, "team/app"), ["shared", "v2"]);
    assert_eq!(manifest_status(registry.addr, "team/app", "v1"), 404);
    assert!(!ls(&mnt.path("team/app/manifests")).contains(v1));
}

/// distribution 2.8 can only untag by deleting the digest, which v2 shares with
/// `shared`: refused, and the log says which tag shares it.
fn refused_what_would_take_more(d: &Deleting) {
    let (registry, mnt, tags, v2_config) = (&d.registry, &d.mnt, &d.tags, &d.v2_config);
    assert_errno(
        fs::remove_file(tags.join("v2/manifest.json")),
        libc::EBUSY,
        "rm tags/v2/manifest.json while tag shared names the same manifest",
    );
    assert!(mnt.log().contains("tag shared"), "{}", mnt.log());
    assert_errno(
        fs::remove_file(mnt.path(&format!("team/app/blobs/{v2_config}"))),
        libc::EBUSY,
        "rm of a blob a tagged image uses",
    );
    assert_eq!(manifest_status(registry.addr, "team/app", "v2"), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", "shared"), 200);
    assert_eq!(blob_status(registry.addr, "team/app", v2_config), 200);
}

/// Manifests and blobs nothing else needs go.
fn unused_manifests_and_blobs_go(d: &Deleting) {
    let (registry, mnt, untagged, stray) = (&d.registry, &d.mnt, &d.untagged, &d.stray);
    let loose = mnt.path(&format!("team/app/manifests/{untagged}"));
    assert!(loose.is_file());
    fs::remove_file(&loose).expect("rm of an untagged manifest");
    assert_eq!(manifest_status(registry.addr, "team/app", untagged), 404);
    assert_errno(
        fs::metadata(&loose),
        libc::ENOENT,
        "stat of the deleted manifest",
    );
    let stray_path = mnt.path(&format!("team/app/blobs/{stray}"));
    assert_eq!(
        fs::metadata(&stray_path).expect("stat stray blob").len(),
        4096
    );
    fs::remove_file(&stray_path).expect("rm of an unused blob");
    assert_eq!(blob_status(registry.addr, "team/app", stray), 404);
    assert_errno(
        fs::metadata(&stray_path),
        libc::ENOENT,
        "stat of the deleted blob",
    );
    assert_errno(fs::remove_file(&stray_path), libc::ENOENT, "rm of it again");
}

/// An index that includes v2 holds it even against a delete by digest.
fn an_index_holds_its_children(d: &Deleting) {
    let (registry, mnt, tags, v2) = (&d.registry, &d.mnt, &d.tags, &d.v2);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::OCI_INDEX,
        "manifests": [{ "mediaType": common::OCI_MANIFEST, "digest": v2, "size": 1 }],
    });
    let index = serde_json::to_vec(&index).expect("serialize index");
    let (_, _, v2_body) = common::get_manifest(registry, "team/app", "v2");
    let index = String::from_utf8(index)
        .expect("utf-8")
        .replace("\"size\":1", &format!("\"size\":{}", v2_body.len()));
    put_manifest(
        registry,
        "team/app",
        "multi",
        common::OCI_INDEX,
        index.as_bytes(),
    );
    let v2_manifest = mnt.path(&format!("team/app/manifests/{v2}"));
    assert_errno(
        fs::remove_file(&v2_manifest),
        libc::EBUSY,
        "rm of a manifest an index names",
    );
    assert!(mnt.log().contains("tag multi"), "{}", mnt.log());
    let out = rm_r(&tags.join("multi"));
    assert!(
        out.status.success(),
        "rm -r tags/multi: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Now the manifest goes by digest, and its two tags with it.
fn a_manifest_goes_with_its_tags(d: &Deleting) {
    let (registry, mnt, tags, v2, v2_config) = (&d.registry, &d.mnt, &d.tags, &d.v2, &d.v2_config);
    let v2_manifest = mnt.path(&format!("team/app/manifests/{v2}"));
    fs::remove_file(&v2_manifest).expect("rm of a manifest two tags name");
    assert_eq!(skopeo_tags(registry, "team/app"), Vec::<String>::new());
    assert_eq!(manifest_status(registry.addr, "team/app", v2), 404);
    assert_eq!(ls(tags), Vec::<String>::new());
    assert!(ls(&mnt.path("team/app/blobs")).is_empty());
    // Now nothing uses v2's config.
    fs::remove_file(mnt.path(&format!("team/app/blobs/{v2_config}")))
        .expect("rm of a blob no tag uses any more");
    assert_eq!(blob_status(registry.addr, "team/app", v2_config), 404);
}

/// An uploads/ link is the mount's own name, not a registry object: it goes, the
/// blob stays.
fn an_uploads_link_goes_its_blob_stays(d: &Deleting) {
    let (registry, mnt) = (&d.registry, &d.mnt);
    let bytes = noise(2048, 9);
    let link = mnt.path("team/app/uploads/notes.bin");
    let mut file = fs::File::create(&link).expect("create uploads/notes.bin");
    io::Write::write_all(&mut file, &bytes).expect("write");
    common::close(file).expect("close (commit) of uploads/notes.bin");
    let digest = common::sha256_digest(&bytes);
    assert_eq!(
        fs::read_link(&link).expect("readlink"),
        Path::new("../blobs").join(&digest)
    );
    fs::remove_file(&link).expect("rm uploads/notes.bin");
    assert!(!ls(&mnt.path("team/app/uploads")).contains(&"notes.bin".to_string()));
    assert_eq!(blob_status(registry.addr, "team/app", &digest), 200);
}

#[test]
fn a_registry_that_refuses_deletes_gives_eperm_and_its_reason() {
    common::require_tools();
    let registry = Registry::start_with(&RegistryOptions {
        delete_disabled: true,
        ..RegistryOptions::default()
    });
    let (v1, _, untagged, _, stray) = populated(&registry);
    let mnt = Mount::start(&registry.url(), &["--allow-delete"]);
    assert_errno(
        fs::remove_file(mnt.path("team/app/tags/v1/manifest.json")),
        libc::EPERM,
        "untag on a registry with deletes disabled",
    );
    assert_errno(
        fs::remove_file(mnt.path(&format!("team/app/manifests/{untagged}"))),
        libc::EPERM,
        "rm manifests/<digest> there",
    );
    assert_errno(
        fs::remove_file(mnt.path(&format!("team/app/blobs/{stray}"))),
        libc::EPERM,
        "rm blobs/<digest> there",
    );
    assert!(
        mnt.log().contains("UNSUPPORTED"),
        "the log should carry the registry's reason:\n{}",
        mnt.log()
    );
    assert_eq!(manifest_status(registry.addr, "team/app", &v1), 200);
    assert_eq!(blob_status(registry.addr, "team/app", &stray), 200);
    assert_eq!(skopeo_tags(&registry, "team/app"), ["shared", "v1", "v2"]);
}

#[test]
fn a_registry_that_deletes_tags_is_asked_to_untag_only() {
    common::require_tools();
    let registry = Registry::start();
    let (_, v2, _, _, _) = populated(&registry);
    // distribution 2.8 refuses DELETE by tag (400); the proxy makes it a registry that
    // takes it (202), as distribution 3 and most hosted registries do.
    let proxy = Proxy::start(
        registry.addr,
        ProxyRules {
            tamper: Some(Tamper::new(|method, target, response| {
                let by_tag =
                    target.starts_with("/v2/team/app/manifests/") && !target.contains("sha256:");
                if method == "DELETE" && by_tag {
                    Response::new(202, &[], Vec::new())
                } else {
                    response
                }
            })),
            ..ProxyRules::default()
        },
    );
    let mnt = Mount::start(&proxy.url(), &["--allow-delete"]);
    // v2 shares its manifest with `shared`, but only the tag is asked to go.
    fs::remove_file(mnt.path("team/app/tags/v2/manifest.json"))
        .expect("rm tags/v2/manifest.json where the registry deletes by tag");
    assert_eq!(
        proxy.requests_matching("DELETE /v2/team/app/manifests/v2"),
        1
    );
    assert_eq!(
        proxy.requests_matching("DELETE /v2/team/app/manifests/sha256:"),
        0,
        "{:?}",
        proxy.requests()
    );
    assert_eq!(manifest_status(registry.addr, "team/app", &v2), 200);
    assert_eq!(manifest_status(registry.addr, "team/app", "shared"), 200);
}
