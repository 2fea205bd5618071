//! A zTOC made by soci-snapshotter's own code, read by regfs.
//!
//! testdata/layer.tar.gz is a PAX tar written by Python's tarfile (a root directory
//! `./`, directories, files up to 150 KB, a name longer than 100 bytes, xattrs, a
//! symlink, a hardlink, a fifo, a char device) compressed by zlib (level 6).
//! testdata/layer.ztoc is what soci-snapshotter's `ztoc` package (commit 77fb4266,
//! built with Debian's golang-go 1.19 in GOPATH mode against Debian's Go packages and
//! google/flatbuffers' Go runtime) wrote for it: `ztoc.NewBuilder(...).BuildZtoc(layer,
//! 32768)` then `ztoc.Marshal`.

use super::header::check_headers;
use super::layer::from_ztoc;
use super::spans;
use super::tests::read_with;
use super::ztoc::{FileType, Zinfo, Ztoc};
use crate::image::codec::Codec;
use crate::image::entry::{DataRef, EntryKind};
use crate::image::pass::index_pass;
use crate::registry::Digest;

const LAYER: &[u8] = include_bytes!("testdata/layer.tar.gz");
const ZTOC: &[u8] = include_bytes!("testdata/layer.ztoc");

fn tar() -> Vec<u8> {
    let mut tar = Vec::new();
    let mut d =
        crate::image::codec::Decoder::at(Codec::Gzip, &crate::image::codec::Checkpoint::START)
            .expect("decoder");
    let (mut buf, mut input) = (vec![0u8; 1 << 16], LAYER);
    loop {
        let step = d.decode(input, &mut buf).expect("gzip");
        input = &input[step.consumed..];
        tar.extend_from_slice(&buf[..step.produced]);
        if input.is_empty() && step.produced == 0 && step.consumed == 0 && !step.boundary {
            return tar;
        }
    }
}

#[test]
fn the_fields_soci_wrote() {
    let z = Ztoc::decode(ZTOC).expect("regfs reads soci's zTOC");
    assert_eq!(
        (z.version.as_str(), z.build_tool.as_str()),
        ("0.9", "soci-snapshotter ztoc package")
    );
    assert_eq!(z.compressed_size, LAYER.len() as u64);
    // Up to the two zero blocks that end the archive (the padding after is not counted).
    let last = z.files.last().expect("files");
    assert_eq!(
        z.uncompressed_size,
        (last.offset + last.size).div_ceil(512) * 512 + 1024
    );
    assert!(z.uncompressed_size <= tar().len() as u64);
    let Zinfo::Gzip(g) = &z.zinfo else {
        panic!("gzip")
    };
    assert_eq!(
        (g.span_size, g.checkpoints.len(), z.span_digests.len()),
        (32768, 4, 4)
    );
    assert_eq!(
        g.checkpoints[0].input, 10,
        "the first deflate byte, after a 10-byte header"
    );
    let names: Vec<String> = z
        .files
        .iter()
        .map(|f| String::from_utf8_lossy(&f.name).into())
        .collect();
    assert_eq!(names[..3], ["./", "./etc/", "./etc/hostname"]);
    let by = |suffix: &str| {
        z.files
            .iter()
            .find(|f| f.name.ends_with(suffix.as_bytes()))
            .expect(suffix)
    };
    assert_eq!(by("/caps").pax.len(), 2, "every PAX record is kept");
    assert_eq!(by("-.txt").pax[0].0.as_ref(), b"path");
    assert_eq!(
        (by("/null").kind, by("/null").devmajor, by("/null").devminor),
        (FileType::Char, 1, 3)
    );
    assert_eq!(by("/hard").linkname.as_ref(), b"./etc/hostname");
    assert_eq!(by("/more.txt").mtime, (1_600_000_000, 0));
    assert_eq!(by("/words.txt").uid, 1000);
    // soci's span digests are exactly regfs's definition over soci's checkpoints.
    let soci = from_ztoc(&z, LAYER.len() as u64).expect("a layer");
    let ranges = spans::checkpoint_ranges(&soci.checkpoints, LAYER.len() as u64).expect("ranges");
    assert_eq!(
        spans::digests(LAYER, &ranges).expect("digests"),
        z.span_digests
    );
    // And regfs writes the same zTOC back.
    assert_eq!(Ztoc::decode(&z.encode()).expect("round trip"), z);
}

#[test]
fn regfs_reads_the_layer_through_socis_ztoc() {
    let z = Ztoc::decode(ZTOC).expect("decodes");
    let layer = from_ztoc(&z, LAYER.len() as u64).expect("a layer");
    assert!(layer.refused.is_empty(), "{:?}", layer.refused);
    let pieces = std::iter::once(Ok(bytes::Bytes::from_static(LAYER)));
    let digest = Digest::sha256_of(LAYER);
    let pass = index_pass(&digest, Codec::Gzip, LAYER.len() as u64, pieces).expect("pass");
    assert_eq!(layer.entries.len(), pass.entries.len());
    for (ours, theirs) in layer.entries.iter().zip(&pass.entries) {
        let mut theirs = theirs.clone();
        theirs.xattrs.sort(); // a zTOC keeps PAX records sorted by key
        assert_eq!(ours, &theirs, "the same files as regfs's own pass finds");
    }
    let tar = tar();
    let mut files = 0;
    for (entry, place) in layer.entries.iter().zip(&layer.places) {
        let headers = &tar[place.header as usize..place.data as usize];
        check_headers(headers, entry, place).expect("soci's header offsets are right");
        let DataRef::Stream(at) = entry.data else {
            continue;
        };
        let got = read_with(&layer, LAYER, at, at + entry.size).expect("decodes");
        assert!(
            got == tar[at as usize..(at + entry.size) as usize],
            "{:?}",
            entry.path
        );
        files += 1;
    }
    assert_eq!(files, 6);
    let kinds: Vec<EntryKind> = layer.entries.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EntryKind::Hardlink) && kinds.contains(&EntryKind::Fifo));
}
