//! `/.layerstore/` lookups that find no layer to serve, through the kernel: a digest
//! the image does not have, and a layer of a media type regfs cannot read (offered, its
//! `diff` would fail a container; not offered, podman or CRI-O download it themselves).
//! Each is ENOENT, counted once in `/.regfs/stats` (`layer_store`) with its reason,
//! and logged once however often it is looked up; a readable layer of the same image
//! is served, and lookups that are not this registry's business count nothing
//! (docs/SEMANTICS.md, "Container runtimes").

use std::fs;
use std::path::PathBuf;

use base64::Engine as _;

use crate::common::images::add_layer;
use crate::common::{Layout, Mount, Registry, noise};

/// A media type no runtime's image library knows.
const SEALED: &str = "application/vnd.example.sealed.layer.v1+tar";

fn store_dir(mnt: &Mount, reference: &str) -> PathBuf {
    let name = base64::engine::general_purpose::STANDARD.encode(reference);
    mnt.path(&format!(".layerstore/{name}"))
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// The digests of the image's layers, from the layout.
fn layer_digests(layout: &Layout, tag: &str) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.blob(&layout.manifest_digest(tag))).unwrap();
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}

#[test]
fn failed_layer_store_lookups_are_counted_and_logged_once() {
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("app", "amd64", &[("hello.txt", b"hello\n")]);
    let sealed = noise(1000, 4);
    add_layer(&layout, "app", &sealed, &sealed, SEALED);
    layout.push("app", &registry, "team/app:v1");
    let layers = layer_digests(&layout, "app");
    assert_eq!(layers.len(), 2, "{layers:?}");

    let mnt = Mount::start(&registry.url(), &[]);
    let image = store_dir(&mnt, &format!("{}/team/app:v1", registry.addr));
    let missing = format!("sha256:{}", "0".repeat(64));
    let enoent = Some(libc::ENOENT);
    for _ in 0..3 {
        assert_eq!(errno_of(fs::metadata(image.join(&missing))), enoent);
        assert_eq!(errno_of(fs::metadata(image.join(&layers[1]))), enoent);
        assert_eq!(errno_of(fs::read_dir(image.join(&layers[1]))), enoent);
    }
    // The readable layer is served.
    let readable = image.join(&layers[0]);
    assert_eq!(
        fs::read(readable.join("diff/hello.txt")).unwrap(),
        b"hello\n"
    );
    // Not this registry's business: another registry's image, a name that is not a
    // reference, a name that is not a digest.
    let other = format!("127.0.0.2:{}/team/app:v1", registry.addr.port());
    assert_eq!(errno_of(fs::metadata(store_dir(&mnt, &other))), enoent);
    assert_eq!(errno_of(fs::metadata(mnt.path(".layerstore/x!"))), enoent);
    assert_eq!(errno_of(fs::metadata(image.join("not-a-digest"))), enoent);

    let stats = mnt.stats();
    let store = &stats["layer_store"];
    assert_eq!(store["failed_lookups"], 2, "{stats}");
    let failed = store["failed"].as_object().expect("failed layers");
    let why = |digest: &str| {
        let key = format!("team/app:v1/{digest}");
        failed
            .get(&key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{key} in {store}"))
            .to_owned()
    };
    assert!(why(&missing).contains("no layer"), "{store}");
    assert!(why(&layers[1]).contains(SEALED), "{store}");
    let log = mnt.log();
    for digest in [&missing, &layers[1]] {
        let line = format!("layer store: team/app:v1/{digest} not served (");
        assert_eq!(log.matches(&line).count(), 1, "{line}:\n{log}");
    }
}
