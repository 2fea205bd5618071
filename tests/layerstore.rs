//! regfs as podman's layer store (docs/SEMANTICS.md, "Container runtimes"):
//! `/.layerstore/` as a containers/storage Additional Layer Store for Debian's podman 4.3
//! (its own root, runroot and storage.conf; overlay driver) pulling from a real
//! registry, and `.images/<m>/layers/<l>/`, a layer as the manifest it is reached
//! through describes it.
//!
//! podman reaches the registry through the harness's proxy, configured as a mirror in
//! a registries.conf of the test's own (the reference still names the registry, which
//! regfs mounts directly), so the proxy counts podman's requests and no one else's.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use common::images::{
    Containerd, assert_same_tree, build_rich_image, require_commands, require_image_tools, snapshot,
};
use common::{
    Layout, Mount, OCI_MANIFEST, Proxy, ProxyRules, Registry, get_manifest, put_manifest,
    require_tools,
};

/// The large file of the zstd:chunked test image's first layer.
const BIG: usize = 32 << 20;
/// What a podman command may take at most.
const PODMAN_TIMEOUT_SECS: &str = "180";
/// What podman 4.3 logs when a layer store answers `use` or `rmdir` with anything but
/// ENOENT.
const STORE_COMPLAINT: &str = "Unexpected error by Additional Layer Store";
/// Options every `podman run` here needs on this machine, and no network.
const RUN: [&str; 8] = [
    "run",
    "--rm",
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn setup() {
    require_tools();
    require_image_tools();
    require_commands(&["podman", "runc", "conmon", "fuse-overlayfs", "newuidmap"]);
    // SAFETY: no arguments, no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the podman tests run podman as root (overlay driver): run them as root"
    );
}

/// A podman with its own storage (root, runroot, storage.conf) and registries.conf,
/// pulling the registry's images through `mirror`, with regfs's layer store or without.
struct Podman {
    dir: tempfile::TempDir,
    layer_store: Option<PathBuf>,
}

impl Podman {
    fn new(registry: SocketAddr, mirror: SocketAddr, layer_store: Option<PathBuf>) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("regfs-podman-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let stores = match &layer_store {
            Some(store) => format!("additionallayerstores = [\"{}:ref\"]\n", store.display()),
            None => String::new(),
        };
        let storage = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\
             [storage.options]\n{stores}",
            d.join("root").display(),
            d.join("run").display(),
        );
        fs::write(d.join("storage.conf"), storage).expect("storage.conf");
        let registries = format!(
            "unqualified-search-registries = []\n\
             [[registry]]\nlocation = \"{registry}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        );
        fs::write(d.join("registries.conf"), registries).expect("registries.conf");
        fs::create_dir(d.join("tmp")).expect("tmp");
        Podman { dir, layer_store }
    }

    /// `podman <args>` with this storage, within PODMAN_TIMEOUT_SECS. `--root` and
    /// `--runroot` on the command line make podman drop the driver options of
    /// storage.conf, so the layer store is given again as `--storage-opt`.
    fn command(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("timeout");
        cmd.args([PODMAN_TIMEOUT_SECS, "podman", "--root"])
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"));
        if let Some(store) = &self.layer_store {
            cmd.arg("--storage-opt").arg(format!(
                "overlay.additionallayerstore={}:ref",
                store.display()
            ));
        }
        cmd.args(args)
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("TMPDIR", d.join("tmp"))
            .stdin(Stdio::null())
            .output()
            .expect("run podman")
    }

    /// `podman <args>`, which must succeed without the layer store being blamed for
    /// anything; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        common::assert_success(&out, &format!("podman {args:?}"));
        assert!(
            !stderr.contains(STORE_COMPLAINT),
            "podman {args:?} complained about the layer store:\n{stderr}"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The layers of podman's storage that are the layer store's (their `diff` a
    /// link into it).
    fn layers_from_store(&self) -> usize {
        let overlay = self.dir.path().join("root/overlay");
        fs::read_dir(&overlay)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.path().join("additionallayer").exists())
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers and images first: their overlay mounts go with them.
        let _ = self.command(&["rm", "--all", "--force"]);
        let _ = self.command(&["rmi", "--all", "--force"]);
    }
}

/// The layer digests and config diff_ids of `repo:reference` at the registry.
fn layers_of(registry: &Registry, repo: &str, reference: &str) -> (Vec<String>, Vec<String>) {
    let (_, _, body) = get_manifest(registry, repo, reference);
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config: serde_json::Value =
        serde_json::from_slice(&common::get_blob(registry, repo, config)).expect("config JSON");
    (
        digests(&manifest["layers"], |l| &l["digest"]),
        digests(&config["rootfs"]["diff_ids"], |d| d),
    )
}

/// The strings `field` picks from each element of the JSON array `list`.
fn digests(
    list: &serde_json::Value,
    field: fn(&serde_json::Value) -> &serde_json::Value,
) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| field(v).as_str().map(str::to_owned))
        .collect()
}

/// The layer store directory of an image reference.
fn store_dir(mnt: &Mount, reference: &str) -> PathBuf {
    let name = base64::engine::general_purpose::STANDARD.encode(reference);
    mnt.path(&format!(".layerstore/{name}"))
}

fn errno_of(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// GETs of `/blobs/<digest>` of any of `digests` that the proxy passed on.
fn blob_gets(proxy: &Proxy, digests: &[String]) -> usize {
    digests
        .iter()
        .map(|d| proxy.requests_matching(&format!("GET /v2/team/app/blobs/{d}")))
        .sum()
}

#[test]
fn podman_pulls_and_runs_from_the_layer_store() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    build_rich_image(&layout, "rich", 1 << 20);
    layout.push("rich", &registry, "team/app:v1");
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&registry.url(), &[]);
    let image = format!("{}/team/app:v1", registry.addr);
    let (layers, diff_ids) = layers_of(&registry, "team/app", "v1");
    assert_eq!(layers.len(), 3);

    let podman = Podman::new(registry.addr, proxy.addr, Some(mnt.path(".layerstore")));
    podman.ok(&["pull", &image]);
    // podman asked the registry (through the mirror) for the manifest and config, and
    // for no layer: each is regfs's.
    assert!(proxy.requests_matching("GET /v2/team/app/manifests/v1") > 0);
    assert_eq!(blob_gets(&proxy, &layers), 0, "{:#?}", proxy.requests());
    assert_eq!(podman.layers_from_store(), layers.len());
    let images = podman.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.contains(&image), "podman images: {images}");

    // The container sees the image's tree: files of the first and second layers, the
    // second's whiteout, the third's opaque directory.
    let script = "cat /etc/hello.txt /etc/added-later.txt; ls /opt; \
                  test -e /etc/gone.txt || echo gone; wc -c < /data/large.bin";
    let mut run = RUN.to_vec();
    run.extend([image.as_str(), "/bin/sh", "-c", script]);
    let out = podman.ok(&run);
    assert_eq!(
        out,
        "hello from the image\nfrom the second layer\nfresh.txt\ngone\n1048576\n"
    );
    assert_eq!(blob_gets(&proxy, &layers), 0);
    podman.ok(&["rmi", &image]);

    // The layer records say what containers/storage keeps for a layer it downloaded.
    let store = store_dir(&mnt, &image);
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        let info = fs::read(store.join(layer).join("info")).expect("info");
        let info: serde_json::Value = serde_json::from_slice(&info).expect("info is JSON");
        assert_eq!(info["compressed-diff-digest"], layer.as_str());
        assert_eq!(info["diff-digest"], diff_id.as_str());
        assert_eq!(info["compression"], 2);
        let blob = fs::read(store.join(layer).join("blob")).expect("blob");
        assert_eq!(info["compressed-size"], blob.len());
        assert_eq!(common::sha256_digest(&blob), *layer);
    }

    // Through the manifest, each layer is what `.layers/` shows.
    let (manifest, _, _) = get_manifest(&registry, "team/app", "v1");
    for layer in &layers {
        assert_same_tree(
            &snapshot(&mnt.path(&format!("team/app/.layers/{layer}"))),
            &snapshot(&mnt.path(&format!("team/app/.images/{manifest}/layers/{layer}"))),
            &format!("layer {layer} through its manifest"),
        );
    }

    // Without the layer store, the same pull downloads every layer: the count above
    // counts what it says.
    let plain = Podman::new(registry.addr, proxy.addr, None);
    plain.ok(&["pull", &image]);
    assert_eq!(blob_gets(&proxy, &layers), layers.len());
    assert_eq!(plain.layers_from_store(), 0);
}

#[test]
fn layer_store_names_only_layers_of_this_registrys_images() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    layout.new_image("one", "amd64", &[("hello.txt", b"hello\n")]);
    layout.push("one", &registry, "team/app:v1");
    let mnt = Mount::start(&registry.url(), &[]);
    let (layers, _) = layers_of(&registry, "team/app", "v1");
    let image = format!("{}/team/app:v1", registry.addr);
    let layer = store_dir(&mnt, &image).join(&layers[0]);
    assert_eq!(
        fs::read(layer.join("diff/hello.txt")).expect("read"),
        b"hello\n"
    );
    // Nothing is listed: the store opens by name.
    assert!(common::ls(&mnt.path(".layerstore")).is_empty());
    assert!(!common::ls(&mnt.dir).contains(&".layerstore".to_owned()));
    assert_eq!(
        common::ls(&layer),
        ["blob", "diff", "info"].map(str::to_owned)
    );
    let enoent = Some(libc::ENOENT);
    // Another registry's reference, one that is not base64, a layer the image does not
    // have, a tag that does not exist.
    let other = format!("127.0.0.2:{}/team/app:v1", registry.addr.port());
    assert_eq!(errno_of(fs::metadata(store_dir(&mnt, &other))), enoent);
    assert_eq!(
        errno_of(fs::metadata(mnt.path(".layerstore/not-base64!"))),
        enoent
    );
    let missing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        errno_of(fs::metadata(store_dir(&mnt, &image).join(&missing))),
        enoent
    );
    let no_tag = format!("{}/team/app:v2", registry.addr);
    assert_eq!(
        errno_of(fs::metadata(store_dir(&mnt, &no_tag).join(&layers[0]))),
        enoent
    );
    // containers/storage's notes of use: ENOENT, as it expects of a store without counts.
    assert_eq!(errno_of(fs::File::create(layer.join("use"))), enoent);
    assert_eq!(errno_of(fs::remove_dir(&layer)), enoent);
    // Read-only otherwise.
    assert_eq!(
        errno_of(fs::create_dir(layer.join("diff/new"))),
        Some(libc::EROFS)
    );
    // `.images/<m>/layers/` opens only that manifest's layers.
    let (manifest, _, _) = get_manifest(&registry, "team/app", "v1");
    let in_image = mnt.path(&format!("team/app/.images/{manifest}/layers"));
    assert_eq!(
        fs::read(in_image.join(&layers[0]).join("hello.txt")).expect("read"),
        b"hello\n"
    );
    assert_eq!(errno_of(fs::metadata(in_image.join(&missing))), enoent);
    assert!(common::ls(&in_image).is_empty());
}

/// A zstd:chunked conversion of the rich image whose manifest no tag names.
struct UntaggedZstdChunked {
    digest: String,
    manifest: serde_json::Value,
    /// Its first layer: digest, size, and the digest of its TOC.
    layer: String,
    size: u64,
    toc: String,
}

/// The rich image as `team/app:v1`, and its zstd:chunked conversion (ctr-remote),
/// pushed as `team/app:zchunk`, a tag then moved to `v1`'s manifest.
fn untagged_zstd_chunked(registry: &Registry) -> UntaggedZstdChunked {
    let layout = Layout::new();
    build_rich_image(&layout, "rich", BIG);
    layout.push("rich", registry, "team/app:v1");
    let host = registry.addr.to_string();
    let containerd = Containerd::start();
    containerd.convert(
        &format!("{host}/team/app:v1"),
        &format!("{host}/team/app:zchunk"),
        "--zstdchunked",
    );
    drop(containerd);
    let (digest, _, body) = get_manifest(registry, "team/app", "zchunk");
    let manifest: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let first = &manifest["layers"][0];
    // Under the name containers/storage uses now, or the one older writers used.
    let toc = ["io.github.containers", "io.containers"]
        .iter()
        .find_map(|ns| {
            first["annotations"][format!("{ns}.zstd-chunked.manifest-checksum")].as_str()
        })
        .unwrap_or_else(|| panic!("a zstd:chunked layer names its TOC: {first}"))
        .to_owned();
    let (_, _, v1) = get_manifest(registry, "team/app", "v1");
    put_manifest(registry, "team/app", "zchunk", OCI_MANIFEST, &v1);
    UntaggedZstdChunked {
        layer: first["digest"].as_str().expect("digest").to_owned(),
        size: first["size"].as_u64().expect("size"),
        toc,
        digest,
        manifest,
    }
}

/// A zstd:chunked image whose manifest no tag names any more: `.layers/<l>/` can only
/// guess the layer's descriptor (no TOC: a pass over the whole layer), while
/// `.images/<m>/layers/<l>/` and the layer store take it from the manifest and read a
/// file through the TOC. Both show the same files as the gzip original. The layer store
/// finds the layer by TOC digest too, and podman runs the image from it.
#[test]
fn zstd_chunked_layers_carry_their_manifests_toc() {
    setup();
    let registry = Registry::start();
    let host = registry.addr.to_string();
    let zchunk = untagged_zstd_chunked(&registry);
    let (layer, size, toc) = (&zchunk.layer, zchunk.size, &zchunk.toc);
    let (gzip_layers, _) = layers_of(&registry, "team/app", "v1");

    let read_hello = |dir: &str| -> (Vec<u8>, u64) {
        // What the read needs, without the rest of the layer in the background.
        let mnt = Mount::start(&registry.url(), &["--no-background-fetch"]);
        let bytes = fs::read(mnt.path(dir).join("etc/hello.txt")).expect("read hello.txt");
        let fetched = mnt.stats()["fetched_bytes"].as_u64().unwrap_or(u64::MAX);
        (bytes, fetched)
    };
    let described = format!("team/app/.images/{}/layers/{layer}", zchunk.digest);
    let (hello, fetched) = read_hello(&described);
    assert_eq!(hello, b"hello from the image\n");
    assert!(
        fetched < size / 4,
        "{fetched} bytes fetched for one small file of a {size}-byte layer"
    );
    let (hello, fetched) = read_hello(&format!("team/app/.layers/{layer}"));
    assert_eq!(hello, b"hello from the image\n");
    assert!(fetched >= size, "without its TOC the layer is read whole");

    // The same files as the gzip original's first layer.
    let mnt = Mount::start(&registry.url(), &[]);
    let original = snapshot(&mnt.path(&format!("team/app/.layers/{}", gzip_layers[0])));
    assert_same_tree(
        &original,
        &snapshot(&mnt.path(&described)),
        "zstd:chunked layer through its manifest vs the gzip layer",
    );

    // The layer store: by TOC digest (newer containers/storage) and by blob digest.
    let image = format!("{host}/team/app@{}", zchunk.digest);
    let store = store_dir(&mnt, &image);
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join(toc).join("info")).expect("info"))
            .expect("JSON");
    assert_eq!(info["toc-digest"], toc.as_str());
    assert_eq!(info["compressed-diff-digest"], layer.as_str());
    assert_eq!(info["compression"], 4);
    assert!(info["flags"]["expected-layer-diffid"].is_string(), "{info}");
    assert_same_tree(
        &original,
        &snapshot(&store.join(toc).join("diff")),
        "the layer store's diff, found by TOC digest",
    );
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join(layer).join("info")).expect("info"))
            .expect("JSON");
    assert!(info["diff-digest"].is_string(), "{info}");

    // podman 4.3 pulls it by blob digest and runs it.
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let podman = Podman::new(registry.addr, proxy.addr, Some(mnt.path(".layerstore")));
    podman.ok(&["pull", &image]);
    let layers = digests(&zchunk.manifest["layers"], |l| &l["digest"]);
    assert_eq!(blob_gets(&proxy, &layers), 0, "{:#?}", proxy.requests());
    let mut run = RUN.to_vec();
    run.extend([image.as_str(), "/bin/cat", "/etc/hello.txt"]);
    assert_eq!(podman.ok(&run), "hello from the image\n");
}
