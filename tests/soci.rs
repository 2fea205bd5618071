//! Shared indexes (docs/SEMANTICS.md, "Shared indexes"; issue 20): a mount with
//! `--publish-indexes` pushes the SOCI index its pass built for a plain gzip image (a
//! umoci image pushed by skopeo), as a referrer of the image; its zTOCs read back as
//! what regfs holds, also through the decoder flatc generates from ztoc.fbs; a fresh
//! mount without a disk cache then reads a file of the image moving a few spans and the
//! zTOC (counted at a proxy, less the background check's bytes) and lists every file;
//! zTOCs that lie (a span digest, a checkpoint's window, a file's place) never give a
//! wrong byte, and the layer is then read by a pass. Registries with and without the
//! referrers API (distribution 2.8 has none; the proxy plays one that has it).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use regfs::image::codec::Codec;
use regfs::image::entry::DataRef;
use regfs::image::index::{Content, LayerIndex};
use regfs::image::pass::index_pass;
use regfs::image::soci::artifact::{SociIndex, ZtocRef};
use regfs::image::soci::layer::from_ztoc;
use regfs::image::soci::layer_index::ztoc_of_index;
use regfs::image::soci::ztoc::{Zinfo, Ztoc};
use regfs::registry::{Descriptor, Digest};

use common::{
    Layout, Mount, OCI_INDEX, OCI_MANIFEST, Proxy, ProxyRules, Registry, Response, Tamper,
    get_blob, get_manifest, get_manifest_at, manifest_status, noise, push_blob, put_manifest,
    require_tools,
};

const MIB: usize = 1 << 20;
const SOCI_V1: &str = "application/vnd.amazon.soci.index.v1+json";

/// An image of one gzip layer (umoci): `n` files of 2 MiB of noise, each followed in
/// the tar by a small text file, so small files sit all along the layer. Returns the
/// files of the layer.
fn image_of(layout: &Layout, tag: &str, n: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..n {
        files.insert(format!("data/f{i:02}"), noise(2 * MIB, i as u32));
        files.insert(
            format!("data/f{i:02}.txt"),
            format!("small file {i:02}\n").into_bytes(),
        );
    }
    let list: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), &d[..])).collect();
    layout.new_image(tag, "amd64", &list);
    files
}

/// The image's one layer: (digest, its bytes).
fn layer_of(layout: &Layout, tag: &str) -> (String, Vec<u8>) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.blob(&layout.manifest_digest(tag))).expect("manifest");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    let digest = layers[0]["digest"].as_str().expect("digest").to_owned();
    let blob = layout.blob(&digest);
    (digest, blob)
}

/// The index regfs's pass makes of a layer (what a mount holds after its pass).
fn pass_of(blob: &[u8]) -> LayerIndex {
    let digest = Digest::sha256_of(blob);
    let pieces = blob.chunks(MIB).map(|c| Ok(Bytes::copy_from_slice(c)));
    index_pass(&digest, Codec::Gzip, blob.len() as u64, pieces).expect("the pass")
}

/// The Python flatc's code runs with (Debian's python3-flatbuffers is for it).
const PYTHON: &str = "/usr/bin/python3";

fn setup() {
    require_tools();
    common::images::require_commands(&["flatc"]);
    let probe = Command::new(PYTHON)
        .args(["-c", "import flatbuffers"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "{PYTHON} cannot import flatbuffers: run scripts/setup.sh (python3-flatbuffers)"
    );
}

/// Waits until `images.<counter>` of `mnt`'s stats reaches `at_least`.
fn wait_for(mnt: &Mount, counter: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = mnt.stats();
        if stats["images"][counter].as_u64().unwrap_or(0) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "images.{counter} stayed below {at_least}: {stats}\n{}",
            mnt.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn image_counter(mnt: &Mount, counter: &str) -> u64 {
    mnt.stats()["images"][counter].as_u64().unwrap_or(0)
}

/// The SOCI v1 indexes `.referrers/<image>/index.json` lists.
fn soci_referrers(mnt: &Mount, repo: &str, image: &str) -> Vec<String> {
    let path = mnt.path(&format!("{repo}/.referrers/{image}/index.json"));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("read index.json")).expect("JSON");
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["artifactType"] == SOCI_V1)
        .map(|d| d["digest"].as_str().expect("digest").to_owned())
        .collect()
}

/// Every file and directory under `root`, relative.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = e.expect("entry").path();
            let rel = path.strip_prefix(root).expect("under root");
            out.insert(rel.display().to_string());
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    out
}

/// What a walk of the image's rootfs shows: its files and their directories.
fn expected_walk(files: &BTreeMap<String, Vec<u8>>) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = files.keys().cloned().collect();
    out.insert("data".into());
    out
}

/// The published index, read from the registry: its zTOC matches regfs's own pass of
/// the layer field for field, and the decoder flatc generates from ztoc.fbs reads it.
fn check_published(registry: &Registry, repo: &str, image: &str, index: &str, blob: &[u8]) {
    let (_, media_type, body) = get_manifest(registry, repo, index);
    assert_eq!(media_type, OCI_MANIFEST);
    let soci = SociIndex::parse(&body).expect("a SOCI index");
    let subject = soci.subject.as_ref().expect("a subject");
    assert_eq!(subject.digest.to_string(), image);
    assert_eq!(soci.ztocs.len(), 1, "one zTOC for the one layer");
    let z = &soci.ztocs[0];
    assert_eq!(z.layer_digest, Digest::sha256_of(blob));
    let bytes = get_blob(registry, repo, &z.digest.to_string());
    let ztoc = Ztoc::decode(&bytes).expect("the zTOC decodes");
    let layer = from_ztoc(&ztoc, blob.len() as u64).expect("describes the layer");
    let pass = pass_of(blob);
    let Content::Stream(map) = &pass.content else {
        panic!("a stream");
    };
    assert_eq!(layer.entries, pass.entries, "the same files");
    assert_eq!(layer.places, pass.places, "the same tar headers");
    assert_eq!(layer.checkpoints, map.checkpoints, "the same checkpoints");
    assert_eq!(layer.spans, map.spans, "the same span digests");
    assert_eq!(ztoc_of_index(&pass).expect("publishable"), bytes);
    generated_decoder_reads(&bytes, &ztoc);
}

/// `flatc --python ztoc.fbs`, and its decoder's reading of `bytes` agrees with regfs's.
fn generated_decoder_reads(bytes: &[u8], ztoc: &Ztoc) {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/image/soci");
    common::run(
        Command::new("flatc")
            .args(["--python", "-o"])
            .arg(dir.path().join("gen"))
            .arg(src.join("ztoc.fbs")),
    );
    let path = dir.path().join("ztoc");
    fs::write(&path, bytes).expect("write the zTOC");
    let out = common::run_bytes(
        Command::new(PYTHON)
            .arg(src.join("ztoc_fields.py"))
            .arg("dump")
            .arg(dir.path().join("gen"))
            .arg(&path),
    );
    let fields: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let names: Vec<String> = ztoc.files.iter().map(|f| hex(&f.name)).collect();
    let seen: Vec<String> = fields["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(seen, names);
    assert_eq!(
        fields["span_digests"].as_array().map(Vec::len),
        Some(ztoc.span_digests.len())
    );
    assert_eq!(fields["compressed_size"], ztoc.compressed_size);
}

/// Bytes the proxy saw asked for in blob range requests, all bounded.
fn ranged_bytes(proxy: &Proxy) -> u64 {
    proxy
        .ranges_seen()
        .iter()
        .map(|r| {
            let (a, b) = r
                .trim_start_matches("bytes=")
                .split_once('-')
                .unwrap_or_else(|| panic!("a range: {r}"));
            let a: u64 = a.parse().expect("range start");
            let b: u64 = b
                .parse()
                .unwrap_or_else(|_| panic!("a bounded range (a full read?): {r}"));
            b - a + 1
        })
        .sum()
}

#[test]
fn a_published_index_makes_a_fresh_mount_lazy() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    let files = image_of(&layout, "v1", 34);
    layout.push("v1", &registry, "team/big:v1");
    let image = layout.manifest_digest("v1");
    let (_, blob) = layer_of(&layout, "v1");
    assert!(blob.len() >= 64 * MIB, "a layer of {} bytes", blob.len());

    let a = Mount::start(&registry.url(), &["--publish-indexes"]);
    let small = "team/big/tags/v1/rootfs/data/f05.txt";
    assert_eq!(
        fs::read(a.path(small)).expect("read"),
        files["data/f05.txt"]
    );
    wait_for(&a, "indexes_published", 1);
    let listed = soci_referrers(&a, "team/big", &image);
    assert_eq!(listed.len(), 1, "one SOCI index: {listed:?}");
    drop(a);
    check_published(&registry, "team/big", &image, &listed[0], &blob);

    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let b = Mount::start(&proxy.url(), &["--no-disk-cache"]);
    let other = "team/big/tags/v1/rootfs/data/f25.txt";
    assert_eq!(
        fs::read(b.path(other)).expect("read"),
        files["data/f25.txt"]
    );
    assert_eq!(image_counter(&b, "indexes_found"), 1);
    assert_eq!(image_counter(&b, "layers_from_index"), 1);
    assert_eq!(image_counter(&b, "layers_indexed"), 0, "no pass");
    let root = b.path("team/big/tags/v1/rootfs");
    assert_eq!(walk(&root), expected_walk(&files), "every file listed");
    foreground_bytes_are_a_few_spans(&b, &proxy, &blob);
    drop(b);

    // --verify-before-serving: no index; the pass as before.
    let c = Mount::start(
        &registry.url(),
        &["--no-disk-cache", "--verify-before-serving"],
    );
    assert_eq!(
        fs::read(c.path(other)).expect("read"),
        files["data/f25.txt"]
    );
    assert_eq!(image_counter(&c, "layers_from_index"), 0);
    assert_eq!(image_counter(&c, "layers_indexed"), 1);
}

/// Once the background check is done: what the mount moved, less the check's bytes, is
/// the zTOC and a few spans.
fn foreground_bytes_are_a_few_spans(mnt: &Mount, proxy: &Proxy, blob: &[u8]) {
    wait_for(mnt, "background_checks", 1);
    assert_eq!(image_counter(mnt, "background_checks_failed"), 0);
    let moved = ranged_bytes(proxy);
    let background = image_counter(mnt, "background_bytes");
    let pass = pass_of(blob);
    let Content::Stream(map) = &pass.content else {
        panic!("a stream");
    };
    let span = map
        .spans
        .iter()
        .map(|s| s.range.end - s.range.start)
        .max()
        .unwrap_or(0);
    let ztoc = ztoc_of_index(&pass).expect("publishable").len() as u64;
    let foreground = moved - background;
    eprintln!(
        "layer {} B, moved {moved} B, background {background} B, foreground {foreground} B (zTOC {ztoc} B, largest span {span} B)",
        blob.len()
    );
    assert!(
        foreground <= ztoc + 4 * span,
        "a small file moved {foreground} bytes (zTOC {ztoc}, spans of up to {span})"
    );
}

/// A registry with the referrers API, played by the proxy: manifests pushed with a
/// subject are remembered (read back from the registry) and listed by
/// `GET /v2/<repo>/referrers/<digest>`.
fn proxy_with_referrers_api(registry: SocketAddr) -> Proxy {
    let listed: Arc<Mutex<BTreeMap<String, Vec<serde_json::Value>>>> = Arc::default();
    let tamper = Tamper::new(move |method, target, response| {
        let path = target.split('?').next().unwrap_or("").to_owned();
        let (repo, rest) = match path.strip_prefix("/v2/").and_then(|p| {
            p.find("/manifests/")
                .or_else(|| p.find("/referrers/"))
                .map(|i| (p[..i].to_owned(), p[i..].to_owned()))
        }) {
            Some(split) => split,
            None => return response,
        };
        if method == "PUT" && rest.starts_with("/manifests/") && response.status == 201 {
            let digest = response
                .header("docker-content-digest")
                .unwrap_or("")
                .to_owned();
            let (_, media_type, body) = get_manifest_at(registry, &repo, &digest);
            let m: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(subject) = m["subject"]["digest"].as_str() {
                let kind = m
                    .get("artifactType")
                    .unwrap_or(&m["config"]["mediaType"])
                    .clone();
                let d = serde_json::json!({"mediaType": media_type, "digest": digest,
                    "size": body.len(), "artifactType": kind});
                listed
                    .lock()
                    .expect("lock")
                    .entry(subject.to_owned())
                    .or_default()
                    .push(d);
            }
        }
        if method == "GET" && rest.starts_with("/referrers/") {
            let subject = rest.trim_start_matches("/referrers/");
            let list = listed
                .lock()
                .expect("lock")
                .get(subject)
                .cloned()
                .unwrap_or_default();
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": list});
            let body = serde_json::to_vec(&index).expect("JSON");
            return Response::new(200, &[("Content-Type", OCI_INDEX)], body);
        }
        response
    });
    Proxy::start(
        registry,
        ProxyRules {
            tamper: Some(tamper),
            ..ProxyRules::default()
        },
    )
}

#[test]
fn with_the_referrers_api_an_index_is_published_and_found_through_it() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    let files = image_of(&layout, "v1", 8);
    layout.push("v1", &registry, "team/app:v1");
    let image = layout.manifest_digest("v1");
    let proxy = proxy_with_referrers_api(registry.addr);

    let a = Mount::start(&proxy.url(), &["--publish-indexes"]);
    let small = "team/app/tags/v1/rootfs/data/f03.txt";
    assert_eq!(
        fs::read(a.path(small)).expect("read"),
        files["data/f03.txt"]
    );
    wait_for(&a, "indexes_published", 1);
    assert_eq!(soci_referrers(&a, "team/app", &image).len(), 1);
    let fallback = image.replacen(':', "-", 1);
    assert_eq!(
        manifest_status(registry.addr, "team/app", &fallback),
        404,
        "a registry with the API gets no fallback tag"
    );
    drop(a);

    let b = Mount::start(&proxy.url(), &["--no-disk-cache"]);
    let other = "team/app/tags/v1/rootfs/data/f06.txt";
    assert_eq!(
        fs::read(b.path(other)).expect("read"),
        files["data/f06.txt"]
    );
    assert_eq!(image_counter(&b, "layers_from_index"), 1);
    assert_eq!(image_counter(&b, "layers_indexed"), 0);
    // Found: not published again.
    let c = Mount::start(&proxy.url(), &["--no-disk-cache", "--publish-indexes"]);
    assert_eq!(
        fs::read(c.path(other)).expect("read"),
        files["data/f06.txt"]
    );
    thread::sleep(Duration::from_secs(1));
    assert_eq!(image_counter(&c, "indexes_published"), 0);
}

/// How a lie is made of the zTOC regfs would publish.
type Lie = fn(&mut Ztoc, &Target);

/// The file a lie is about: its entry's number, and the checkpoint and span its read
/// starts from.
struct Target {
    entry: usize,
    checkpoint: usize,
    other: usize,
}

fn tampered_span(z: &mut Ztoc, t: &Target) {
    z.span_digests[t.checkpoint][0] ^= 1;
}

fn changed_window(z: &mut Ztoc, t: &Target) {
    if let Zinfo::Gzip(g) = &mut z.zinfo {
        g.checkpoints[t.checkpoint]
            .window
            .iter_mut()
            .for_each(|b| *b = b'#');
    }
}

fn moved_file(z: &mut Ztoc, t: &Target) {
    let a = z.files[t.entry].name.clone();
    z.files[t.entry].name = z.files[t.other].name.clone();
    z.files[t.other].name = a;
}

#[test]
fn a_lying_ztoc_never_gives_a_wrong_byte_and_the_layer_is_then_passed() {
    setup();
    let registry = Registry::start();
    let layout = Layout::new();
    let files = image_of(&layout, "v1", 12);
    layout.push("v1", &registry, "team/lies:v1");
    let (layer, blob) = layer_of(&layout, "v1");
    let pass = pass_of(&blob);
    let name = "data/f09.txt";
    let target = target(&pass, name, "data/f10.txt");
    assert!(target.checkpoint >= 2, "deep in the layer");
    let lies: [(&str, Lie); 3] = [
        ("span", tampered_span),
        ("window", changed_window),
        ("moved", moved_file),
    ];
    for (case, lie) in lies {
        let mut z = Ztoc::decode(&ztoc_of_index(&pass).expect("publishable")).expect("decodes");
        lie(&mut z, &target);
        let tag = format!("lie-{case}");
        let (_, index) = push_lying_index(&registry, &layout, &tag, (&layer, blob.len()), &z);
        let mnt = Mount::start(&registry.url(), &["--no-disk-cache", "--tag-ttl", "1s"]);
        let path = mnt.path(&format!("team/lies/tags/{tag}/rootfs/{name}"));
        let first = fs::read(&path);
        assert!(
            first
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EIO)),
            "{case}: {first:?} (never the wrong bytes)\n{}",
            mnt.log()
        );
        let log = mnt.log();
        assert!(
            log.contains("SOCI index refused") && log.contains(&index),
            "{case}: the log names the index\n{log}"
        );
        assert_eq!(image_counter(&mnt, "indexes_refused"), 1, "{case}");
        // What was shown from the lie stays an error ...
        let again = fs::read(&path);
        assert!(again.is_err(), "{case}: {again:?}");
        // ... and the next look (its root's entry lives --tag-ttl) reads the layer by a
        // pass: every file right.
        thread::sleep(Duration::from_millis(1500));
        for (file, content) in &files {
            let path = mnt.path(&format!("team/lies/tags/{tag}/rootfs/{file}"));
            assert_eq!(
                &fs::read(&path).expect("read after"),
                content,
                "{case}: {file}"
            );
        }
        assert_eq!(image_counter(&mnt, "layers_indexed"), 1, "{case}");
    }
}

/// Where `name` is in the pass's index: its entry, the checkpoint its header's read
/// starts from, and the entry of `other` (a file of the same size).
fn target(pass: &LayerIndex, name: &str, other: &str) -> Target {
    let find = |n: &str| {
        pass.entries
            .iter()
            .position(|e| &*e.path == n.as_bytes())
            .unwrap_or_else(|| panic!("{n} in the layer"))
    };
    let entry = find(name);
    let Content::Stream(map) = &pass.content else {
        panic!("a stream");
    };
    let DataRef::Stream(_) = pass.entries[entry].data else {
        panic!("{name} has data");
    };
    let header = pass.places[entry].header;
    Target {
        entry,
        checkpoint: map.checkpoint_before(header),
        other: find(other),
    }
}

/// Pushes image `tag` (the layout's v1 with an annotation of its own: the same layer)
/// and a SOCI v1 index of it with zTOC `z`, listed in the fallback referrers tag as
/// distribution 2.8 needs. Returns the image's and the index's digests.
fn push_lying_index(
    registry: &Registry,
    layout: &Layout,
    tag: &str,
    (layer, layer_size): (&str, usize),
    z: &Ztoc,
) -> (String, String) {
    let repo = "team/lies";
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&layout.blob(&layout.manifest_digest("v1"))).expect("manifest");
    manifest["annotations"] = serde_json::json!({ "test.case": tag });
    let body = serde_json::to_vec(&manifest).expect("JSON");
    let image = put_manifest(registry, repo, tag, OCI_MANIFEST, &body);
    let bytes = z.encode();
    push_blob(registry.addr, repo, &bytes);
    push_blob(registry.addr, repo, b"{}");
    let layer = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: Digest::parse(layer).expect("digest"),
        size: layer_size as u64,
    };
    let subject = Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest: Digest::parse(&image).expect("digest"),
        size: body.len() as u64,
    };
    let ztoc = ZtocRef::for_layer(&layer, &bytes, 4 << 20);
    let index_body = SociIndex::v1(subject, vec![ztoc], "a liar").to_json();
    let index = put_manifest(
        registry,
        repo,
        &Digest::sha256_of(&index_body).to_string(),
        OCI_MANIFEST,
        &index_body,
    );
    let listing = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": index, "size": index_body.len(), "artifactType": SOCI_V1}
    ]});
    let fallback = image.replacen(':', "-", 1);
    let listing = serde_json::to_vec(&listing).expect("JSON");
    put_manifest(registry, repo, &fallback, OCI_INDEX, &listing);
    (image, index)
}
