//! podman 4.3 with `/.layerstore/` as its Additional Layer Store, for every format: the
//! rich image of rich_image.rs in gzip and its eStargz and zstd:chunked conversions.
//! podman downloads no layer blob itself (it reaches the registry through the
//! harness's proxy, which counts), every layer is the store's, no lookup fails, and a
//! container lists (modes, owners, sizes, link counts and targets, SHA-256 of every
//! file) what `umoci unpack` of the original makes.

use super::contents::{LISTING, REPO, assert_lines_eq, layers_of, listing_of};
use super::rich_image;
use crate::common::images::{Containerd as Converter, umoci_unpack};
use crate::common::podman::{Podman, RUN, require_podman};
use crate::common::{Layout, Mount, Proxy, ProxyRules};

/// What podman adds to every container's /etc (its bind mounts, and /etc/mtab).
const PODMAN_FILES: [&str; 4] = [
    "./etc/hosts",
    "./etc/hostname",
    "./etc/resolv.conf",
    "./etc/mtab",
];

/// The listing without the files podman puts in every container, unless the image has
/// them.
fn without_podman_files(listing: &str, expected: &str) -> String {
    listing
        .lines()
        .filter(|l| {
            let path = l.split(' ').next().unwrap_or_default();
            !PODMAN_FILES.contains(&path) || expected.contains(&format!("{path} "))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn podman_runs_every_format_from_the_layer_store_as_umoci_unpacks_it() {
    require_podman();
    let registry = crate::common::Registry::start();
    let layout = Layout::new();
    rich_image::build(&layout, "rich");
    layout.push("rich", &registry, &format!("{REPO}:gzip"));
    let converter = Converter::start();
    for (tag, flag) in [("esgz", "--estargz"), ("zchunk", "--zstdchunked")] {
        let from = format!("{}/{REPO}:gzip", registry.addr);
        converter.convert(&from, &format!("{}/{REPO}:{tag}", registry.addr), flag);
    }
    drop(converter);
    let unpacked = tempfile::tempdir().unwrap();
    let expected_root = umoci_unpack(&layout, "rich", &unpacked.path().join("bundle"));
    let expected = listing_of(&expected_root);
    rich_image::assert_cases_present(&expected);

    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let mnt = Mount::start(&registry.url(), &["--allow-other"]);
    let podman = Podman::new(registry.addr, proxy.addr, Some(mnt.path(".layerstore")));
    let script = format!("cd / && {LISTING}");
    let mut from_store = 0;
    for tag in ["esgz", "zchunk", "gzip"] {
        let image = format!("{}/{REPO}:{tag}", registry.addr);
        podman.ok(&["pull", &image]);
        let layers = layers_of(&registry, tag);
        for (layer, _) in &layers {
            let gets = proxy.requests_matching(&format!("GET /v2/{REPO}/blobs/{layer}"));
            assert_eq!(gets, 0, "{tag}: podman downloaded layer {layer}");
        }
        from_store += layers.len();
        assert_eq!(podman.layers_from_store(), from_store, "{tag}");
        let mut run = RUN.to_vec();
        run.extend([image.as_str(), "/bin/busybox", "sh", "-c", &script]);
        let seen = without_podman_files(&podman.ok(&run), &expected);
        assert_lines_eq(&expected, &seen, &format!("{tag} (podman)"));
    }
    let stats = mnt.stats();
    assert_eq!(stats["layer_store"]["failed_lookups"], 0, "{stats}");
    assert_eq!(stats["images"]["toc_unused"], 0, "{stats}");
}
