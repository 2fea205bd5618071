//! `<repo>/.oci/` through the kernel (docs/SEMANTICS.md, "The tree"; issue 13): the
//! repository as an OCI image layout, read by skopeo's `oci:` transport and by `umoci
//! unpack`, and compared with what the registry serves over `docker://`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::images::{assert_same_tree, snapshot, umoci_unpack};
use common::{
    Layout, Mount, Registry, get_manifest, ls, noise, require_tools, run, sha256_digest,
    skopeo_copy,
};

/// `skopeo inspect [--raw] <reference>` (any transport) as JSON.
fn skopeo_inspect(reference: &str, raw: bool) -> serde_json::Value {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--command-timeout", "60s", "inspect", "--tls-verify=false"]);
    if raw {
        cmd.arg("--raw");
    }
    let out = run(cmd.arg(reference));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("skopeo inspect {reference}: {e}"))
}

/// Every file of a directory (not recursive): name → sha256 of its bytes.
fn contents(dir: &Path) -> BTreeMap<String, String> {
    ls(dir)
        .into_iter()
        .map(|name| {
            let bytes = fs::read(dir.join(&name)).expect("read a file skopeo wrote");
            (name, sha256_digest(&bytes))
        })
        .collect()
}

fn fetched_bytes(mnt: &Mount) -> u64 {
    mnt.stats()["fetched_bytes"].as_u64().unwrap_or(0)
}

/// The layout of `team/app` in a mount, and the registry it shows.
struct View<'a> {
    registry: &'a Registry,
    mnt: &'a Mount,
    /// `team/app/.oci` in the mount.
    oci: PathBuf,
}

impl View<'_> {
    fn docker(&self, tag: &str) -> String {
        format!("docker://{}/team/app:{tag}", self.registry.addr)
    }

    fn oci_ref(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.oci.display())
    }
}

/// `.oci/` itself, and its index.json: one descriptor per tag, as the registry has it.
fn assert_layout_and_index(v: &View, multi: &str) {
    let (registry, mnt, oci) = (v.registry, v.mnt, &v.oci);
    // A view: it opens, but `ls`, `find` and `rsync` of the repository do not see it.
    let listed = ls(&mnt.path("team/app"));
    assert!(!listed.contains(&".oci".to_string()), "listed: {listed:?}");
    assert!(oci.is_dir());
    assert_eq!(ls(oci), ["blobs", "index.json", "oci-layout"]);
    let version: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.join("oci-layout")).expect("read oci-layout"))
            .expect("oci-layout is JSON");
    assert_eq!(version["imageLayoutVersion"], "1.0.0");

    // index.json: one descriptor per tag, named as the spec says, as the registry has it.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.join("index.json")).expect("read index.json"))
            .expect("index.json is JSON");
    let mut by_tag = BTreeMap::new();
    for d in index["manifests"].as_array().expect("manifests") {
        let tag = d["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .expect("each descriptor names its tag");
        by_tag.insert(tag.to_string(), d.clone());
    }
    assert_eq!(
        by_tag.keys().collect::<Vec<_>>(),
        ["multi", "v1"],
        "{index}"
    );
    for (tag, d) in &by_tag {
        let (digest, media_type, body) = get_manifest(registry, "team/app", tag);
        assert_eq!(d["digest"], digest.as_str(), "{tag}");
        assert_eq!(d["size"], body.len(), "{tag}");
        assert_eq!(d["mediaType"], media_type.as_str(), "{tag}");
    }
    assert_eq!(by_tag["multi"]["digest"], multi);
}

/// blobs/sha256/: every manifest and blob of the repository.
fn assert_blobs(v: &View) {
    let (mnt, oci) = (v.mnt, &v.oci);
    // blobs/sha256/: every manifest and blob of the repository, regular files of their
    // exact size (umoci checks with fstat; crane refuses symlinks).
    let hexes = |dir: &str| -> BTreeSet<String> {
        ls(&mnt.path(dir))
            .into_iter()
            .map(|d| d.trim_start_matches("sha256:").to_string())
            .collect()
    };
    let objects = hexes("team/app/.oci/blobs/sha256");
    let mut expected = hexes("team/app/manifests");
    expected.extend(hexes("team/app/blobs"));
    assert_eq!(objects, expected);
    for hex in &objects {
        let meta = fs::symlink_metadata(oci.join("blobs/sha256").join(hex)).expect("lstat");
        assert!(meta.is_file(), "{hex} is not a regular file");
        let mut registry_object = mnt.path(&format!("team/app/blobs/sha256:{hex}"));
        if !registry_object.exists() {
            registry_object = mnt.path(&format!("team/app/manifests/sha256:{hex}"));
        }
        let size = fs::metadata(&registry_object).expect("stat").len();
        assert_eq!(meta.len(), size, "size of {hex}");
    }
}

/// skopeo reads the layout as it reads the registry, and copies it into another.
fn assert_skopeo_reads_it(v: &View, scratch: &Path, multi: &str) {
    let (docker, oci_ref) = (|tag: &str| v.docker(tag), |tag: &str| v.oci_ref(tag));
    // skopeo reads the layout as it reads the registry: same digests, same bytes.
    let from_layout = skopeo_inspect(&oci_ref("v1"), false);
    let from_registry = skopeo_inspect(&docker("v1"), false);
    assert_eq!(from_layout["Digest"], from_registry["Digest"]);
    assert_eq!(from_layout["Layers"], from_registry["Layers"]);
    assert_eq!(
        skopeo_inspect(&oci_ref("multi"), true),
        skopeo_inspect(&docker("multi"), true)
    );
    for tag in ["v1", "multi"] {
        let (a, b) = (
            scratch.join(format!("{tag}-layout")),
            scratch.join(format!("{tag}-registry")),
        );
        skopeo_copy(&[], &oci_ref(tag), &format!("dir:{}", a.display()));
        skopeo_copy(
            &["--src-tls-verify=false"],
            &docker(tag),
            &format!("dir:{}", b.display()),
        );
        let copied = contents(&a);
        assert!(copied.len() >= 4, "skopeo copied {copied:?}");
        assert_eq!(copied, contents(&b), "skopeo copy of {tag}");
    }

    // The README's recipe: from the mount's layout into another registry, digests kept.
    let other = Registry::start();
    skopeo_copy(
        &["--dest-tls-verify=false"],
        &oci_ref("multi"),
        &format!("docker://{}/backup/app:multi", other.addr),
    );
    assert_eq!(get_manifest(&other, "backup/app", "multi").0, multi);
}

/// Layout files are the repository's objects under other names, read-only.
fn assert_same_objects_read_only(v: &View) {
    let (registry, mnt, oci) = (v.registry, v.mnt, &v.oci);
    // Layout files are the repository's blobs under another name: what was read through
    // .oci/ is not fetched again through blobs/.
    let manifest: serde_json::Value =
        serde_json::from_slice(&get_manifest(registry, "team/app", "v1").2).expect("JSON");
    let layer = manifest["layers"][0]["digest"].as_str().expect("a layer");
    let layer_size = manifest["layers"][0]["size"].as_u64().expect("its size");
    let via_layout = fs::read(oci.join("blobs/sha256").join(&layer["sha256:".len()..]))
        .expect("read the layer through .oci");
    assert_eq!(via_layout.len() as u64, layer_size);
    let before = fetched_bytes(mnt);
    let via_blobs =
        fs::read(mnt.path(&format!("team/app/blobs/{layer}"))).expect("read it through blobs/");
    assert_eq!(via_blobs, via_layout);
    assert_eq!(sha256_digest(&via_blobs), layer);
    assert_eq!(fetched_bytes(mnt), before, "read twice from the registry");

    // Read-only: a layout written here would not reach the registry.
    for name in ["index.json", "blobs/sha256/new", "oci-layout"] {
        let err = fs::write(oci.join(name), b"{}").expect_err("write into .oci/");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "write {name}: {err}");
    }
    assert!(fs::read(oci.join("blobs/sha256").join("0".repeat(64))).is_err());
}

#[test]
fn skopeo_and_umoci_read_a_repository_as_a_layout() {
    require_tools();
    let registry = Registry::start();
    let layout = Layout::new();
    let big = noise(3 << 20, 11);
    layout.new_image(
        "amd",
        "amd64",
        &[("etc/hello", b"hello from amd64\n"), ("big.bin", &big)],
    );
    layout.new_image("arm", "arm64", &[("etc/hello", b"hello from arm64\n")]);
    layout.push("amd", &registry, "team/app:v1");
    let multi = layout.push_index(&["amd", "arm"], &registry, "team/app:multi");
    let mnt = Mount::start(&registry.url(), &[]);
    let v = View {
        registry: &registry,
        mnt: &mnt,
        oci: mnt.path("team/app/.oci"),
    };
    let scratch = tempfile::Builder::new()
        .prefix("regfs-oci-")
        .tempdir()
        .expect("temp dir");
    assert_layout_and_index(&v, &multi);
    assert_blobs(&v);
    assert_skopeo_reads_it(&v, scratch.path(), &multi);

    // umoci unpacks it as it unpacks the original layout.
    let bundle = scratch.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:v1", v.oci.display())])
        .arg(&bundle));
    let original = umoci_unpack(&layout, "amd", &scratch.path().join("original"));
    assert_same_tree(
        &snapshot(&original),
        &snapshot(&bundle.join("rootfs")),
        "umoci unpack of .oci:v1 vs of the original layout",
    );
    assert_eq!(
        fs::read(bundle.join("rootfs/big.bin")).expect("read big.bin"),
        big
    );

    assert_same_objects_read_only(&v);
}
