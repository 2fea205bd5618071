//! A gzip layer written by a real image tool (umoci, installed by scripts/setup.sh),
//! indexed by regfs's pass, turned into a zTOC (checkpoints as SOCI's gzip_zinfo),
//! read back, and every file decoded from its nearest checkpoint with only what the
//! zTOC says: the same bytes as the layer's tar.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::header::check_headers;
use super::layer::{TarPlace, from_ztoc};
use super::tests::{index_gzip, read_with, ztoc_of};
use super::ztoc::Ztoc;
use crate::image::codec::gzip::tests::sample;
use crate::image::codec::{Checkpoint, Codec, Decoder};
use crate::image::entry::{DataRef, normalise};
use crate::image::index::LayerIndex;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}: run scripts/setup.sh (installs umoci)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The top layer of `image` in the OCI layout `oci` (blob bytes).
fn top_layer(oci: &Path) -> Vec<u8> {
    let blob = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        fs::read(oci.join("blobs/sha256").join(hex)).expect("blob")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci.join("index.json")).expect("index.json"))
            .expect("JSON");
    let manifest: serde_json::Value = serde_json::from_slice(&blob(
        index["manifests"][0]["digest"].as_str().expect("digest"),
    ))
    .expect("JSON");
    let layers = manifest["layers"].as_array().expect("layers");
    let top = layers.last().expect("a layer");
    assert_eq!(
        top["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    blob(top["digest"].as_str().expect("digest"))
}

/// An image whose layer holds a large file (so the pass takes checkpoints) and small
/// ones, a symlink and directories, written by umoci.
fn umoci_layer(dir: &Path) -> Vec<u8> {
    let oci = dir.join("oci");
    let image = format!("{}:t", oci.display());
    let bundle = dir.join("bundle");
    run(Command::new("umoci").arg("init").arg("--layout").arg(&oci));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    fs::create_dir_all(root.join("usr/share/data")).expect("mkdir");
    fs::write(root.join("usr/share/data/big.bin"), sample(12 << 20)).expect("big");
    fs::write(
        root.join("usr/share/data/after.txt"),
        b"written after the big file\n",
    )
    .expect("after");
    fs::create_dir_all(root.join("etc")).expect("mkdir");
    fs::write(root.join("etc/hostname"), b"soci\n").expect("hostname");
    std::os::unix::fs::symlink("../usr/share/data/after.txt", root.join("etc/after"))
        .expect("symlink");
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    top_layer(&oci)
}

/// The whole tar stream of a gzip blob.
fn gunzip(blob: &[u8]) -> Vec<u8> {
    let mut d = Decoder::at(Codec::Gzip, &Checkpoint::START).expect("decoder");
    let (mut out, mut buf, mut input) = (Vec::new(), vec![0u8; 1 << 16], blob);
    loop {
        let step = d.decode(input, &mut buf).expect("valid gzip");
        input = &input[step.consumed..];
        out.extend_from_slice(&buf[..step.produced]);
        if input.is_empty() && step.produced == 0 && step.consumed == 0 && !step.boundary {
            break;
        }
    }
    d.finish().expect("a whole gzip stream");
    out
}

/// Where each entry's headers and data are, as the `tar` crate walks the stream, and
/// the names as written.
fn tar_places(tar: &[u8], index: &LayerIndex) -> Vec<TarPlace> {
    let mut archive = tar::Archive::new(tar);
    let mut places = Vec::new();
    let mut next = 0u64;
    for entry in archive.entries().expect("a tar") {
        let entry = entry.expect("an entry");
        let data = entry.raw_file_position();
        let raw = entry.path_bytes().into_owned();
        let size = entry.header().entry_size().expect("size");
        let path = normalise(&raw).expect("a fine name");
        let raw_name = (*raw != *path).then(|| raw.into_boxed_slice());
        places.push(TarPlace {
            header: next,
            data,
            raw_name,
        });
        next = (data + size).div_ceil(512) * 512;
    }
    assert_eq!(
        places.len(),
        index.entries.len(),
        "the pass kept every entry"
    );
    places
}

#[test]
fn a_umoci_layer_through_a_ztoc_reads_the_same_bytes_as_its_tar() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blob = umoci_layer(dir.path());
    let tar = gunzip(&blob);
    let tar_size = tar.len() as u64;
    let layer = index_gzip(blob, |index| tar_places(&tar, index), tar_size);
    assert!(
        layer.checkpoints.len() >= 3,
        "checkpoints: {}",
        layer.checkpoints.len()
    );
    let z = Ztoc::decode(&ztoc_of(&layer).encode()).expect("decodes");
    let soci = from_ztoc(&z, layer.blob.len() as u64).expect("a layer");
    assert_eq!(soci.entries, layer.index.entries);
    assert_eq!(
        soci.checkpoints, layer.checkpoints,
        "checkpoints through gzip_zinfo and back"
    );
    let mut files = 0;
    for (entry, place) in soci.entries.iter().zip(&soci.places) {
        let headers = &tar[place.header as usize..place.data as usize];
        check_headers(headers, entry, place).expect("each header is its entry's");
        let DataRef::Stream(at) = entry.data else {
            continue;
        };
        let got = read_with(&soci, &layer.blob, at, at + entry.size).expect("decodes");
        assert!(
            got == tar[at as usize..(at + entry.size) as usize],
            "{:?}",
            entry.path
        );
        files += 1;
    }
    assert!(files >= 3);
    // And the background check of the whole layer agrees.
    let digest = crate::registry::Digest::sha256_of(&layer.blob);
    let pieces = layer
        .blob
        .chunks(1 << 20)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)));
    super::verify::verify_layer(&digest, (&soci).into(), pieces).expect("the zTOC is the layer's");
    // A read that starts past the first checkpoint decodes from a later one.
    let big = soci
        .entries
        .iter()
        .find(|e| e.path.ends_with(b"big.bin"))
        .expect("big.bin");
    let DataRef::Stream(at) = big.data else {
        panic!("data")
    };
    let start = at + (10 << 20);
    assert!(soci.checkpoints.partition_point(|c| c.out <= start) > 1);
    let got = read_with(&soci, &layer.blob, start, start + 4096).expect("decodes");
    assert!(got == tar[start as usize..start as usize + 4096]);
}
