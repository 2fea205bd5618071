//! A layer indexed by regfs's pass, written as a zTOC, read back, and used to read a
//! file the way a reader with only the zTOC would; and what a tampered zTOC does.

use proptest::prelude::*;

use super::header::check_headers;
use super::layer::{LayerForZtoc, SociLayer, TarPlace, from_ztoc, soci_checkpoints, to_ztoc};
use super::spans::{self, Span};
use super::ztoc::Ztoc;
use crate::image::codec::gzip::parse_member_header;
use crate::image::codec::gzip::tests::{gzip, sample};
use crate::image::codec::{Checkpoint, Codec, Decoder};
use crate::image::entry::DataRef;
use crate::image::index::{Content, LayerIndex};
use crate::image::pass::index_pass;
use crate::image::pass::tests::tar_of;
use crate::registry::Digest;

/// A layer as the pass indexed it, plus what a zTOC needs that the pass does not keep
/// yet (tar places, SOCI's first checkpoint and spans).
pub(crate) struct Indexed {
    pub blob: Vec<u8>,
    pub index: LayerIndex,
    pub places: Vec<TarPlace>,
    pub checkpoints: Vec<Checkpoint>,
    pub spans: Vec<Span>,
    pub tar_size: u64,
}

/// Where each entry's header and data are, for a tar whose entries have one header
/// block each (as `tar_of` writes them).
fn simple_places(index: &LayerIndex) -> Vec<TarPlace> {
    let mut at = 0u64;
    index
        .entries
        .iter()
        .map(|e| {
            let p = TarPlace {
                header: at,
                data: at + 512,
                raw_name: None,
            };
            at = (p.data + e.size).div_ceil(512) * 512;
            p
        })
        .collect()
}

pub(crate) fn index_gzip(
    blob: Vec<u8>,
    places: impl Fn(&LayerIndex) -> Vec<TarPlace>,
    tar_size: u64,
) -> Indexed {
    let digest = Digest::sha256_of(&blob);
    let pieces = blob
        .chunks(100_000)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)));
    let index = index_pass(&digest, Codec::Gzip, blob.len() as u64, pieces).expect("pass");
    let Content::Stream(map) = &index.content else {
        panic!("a plain layer");
    };
    let header = parse_member_header(&blob)
        .expect("gzip")
        .expect("whole header");
    let checkpoints = soci_checkpoints(&map.checkpoints, header as u64);
    let ranges = spans::checkpoint_ranges(&checkpoints, blob.len() as u64).expect("ranges");
    let digests = spans::digests(&blob, &ranges).expect("digests");
    let spans = ranges
        .into_iter()
        .zip(digests)
        .map(|(range, digest)| Span { range, digest })
        .collect();
    let places = places(&index);
    Indexed {
        blob,
        index,
        places,
        checkpoints,
        spans,
        tar_size,
    }
}

pub(crate) fn ztoc_of(l: &Indexed) -> Ztoc {
    to_ztoc(&LayerForZtoc {
        codec: Codec::Gzip,
        entries: &l.index.entries,
        places: &l.places,
        checkpoints: &l.checkpoints,
        spans: &l.spans,
        blob_size: l.blob.len() as u64,
        tar_size: l.tar_size,
        span_size: 4 << 20,
        build_tool: "regfs test",
    })
    .expect("a zTOC")
}

pub(crate) fn sample_layer() -> (Vec<u8>, Indexed) {
    let big = sample(14 << 20);
    let tar = tar_of(&[
        ("etc/small", b"hello"),
        ("usr/big", &big),
        ("usr/end", b"the end"),
    ]);
    let gz = gzip(&tar, usize::MAX);
    let l = index_gzip(gz, simple_places, tar.len() as u64);
    (tar, l)
}

/// Bytes `start..end` of the tar stream, decoded from the nearest checkpoint with only
/// what the layer's zTOC says, every span used checked first.
pub(crate) fn read_with(
    layer: &SociLayer,
    blob: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<u8>, String> {
    let k = layer
        .checkpoints
        .partition_point(|c| c.out <= start)
        .saturating_sub(1);
    let point = &layer.checkpoints[k];
    let mut decoder = Decoder::at(layer.codec, point)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    for span in &layer.spans[k..] {
        let bytes = &blob[span.range.start as usize..span.range.end as usize];
        if <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(bytes)) != span.digest {
            return Err(format!("span {:?} does not match its digest", span.range));
        }
        // Spans overlap by a byte where a block starts mid-byte.
        let mut input = &blob[decoder.input_pos() as usize..span.range.end as usize];
        while decoder.output_pos() < end {
            let before = decoder.output_pos();
            let step = decoder.decode(input, &mut buf)?;
            input = &input[step.consumed..];
            let made = &buf[..step.produced];
            let from = start.saturating_sub(before).min(made.len() as u64) as usize;
            let to = end.saturating_sub(before).min(made.len() as u64) as usize;
            out.extend_from_slice(&made[from..to.max(from)]);
            if step.consumed == 0 && step.produced == 0 && !step.boundary {
                break;
            }
        }
        if decoder.output_pos() >= end {
            return Ok(out);
        }
    }
    Err("the layer ended first".into())
}

#[test]
fn a_pass_index_round_trips_through_a_ztoc_and_reads_files() {
    let (tar, l) = sample_layer();
    let z = ztoc_of(&l);
    assert!(
        z.span_digests.len() >= 3,
        "several spans: {}",
        z.span_digests.len()
    );
    let bytes = z.encode();
    let back = Ztoc::decode(&bytes).expect("decodes");
    assert!(back.encode() == bytes, "reads back as written");
    assert!(back.files == z.files && back.span_digests == z.span_digests);
    let layer = from_ztoc(&back, l.blob.len() as u64).expect("a layer");
    assert!(layer.refused.is_empty());
    assert_eq!(layer.entries, l.index.entries);
    assert_eq!(layer.places, l.places);
    assert_eq!(layer.checkpoints, l.checkpoints);
    assert_eq!(layer.spans, l.spans);
    for (entry, place) in layer.entries.iter().zip(&layer.places) {
        let h = &tar[place.header as usize..place.data as usize];
        check_headers(h, entry, place).expect("the header is the entry's");
        let DataRef::Stream(at) = entry.data else {
            continue;
        };
        let got = read_with(&layer, &l.blob, at, at + entry.size).expect("reads");
        assert!(
            got == tar[at as usize..(at + entry.size) as usize],
            "{:?}",
            entry.path
        );
    }
    // The last span, from the last checkpoint alone.
    let last = layer.checkpoints.last().expect("checkpoints").out;
    let got = read_with(&layer, &l.blob, last + 10, last + 5000).expect("reads");
    assert!(got == tar[last as usize + 10..last as usize + 5000]);
    assert!(
        from_ztoc(&back, l.blob.len() as u64 + 1).is_err(),
        "another layer's size"
    );
}

#[test]
fn a_tampered_ztoc_never_gives_wrong_bytes_silently() {
    let (tar, l) = sample_layer();
    let z = ztoc_of(&l);
    let big = &l.index.entries[1];
    let DataRef::Stream(at) = big.data else {
        panic!("data")
    };
    let (start, end) = (at + (9 << 20), at + (9 << 20) + 1000);

    let mut bad = z.clone();
    bad.span_digests[2][0] ^= 1;
    let layer = from_ztoc(&bad, l.blob.len() as u64).expect("parses");
    let k = layer.checkpoints.partition_point(|c| c.out <= start) - 1;
    assert_eq!(k, 2, "the read starts in span 2");
    assert!(
        read_with(&layer, &l.blob, start, end).is_err(),
        "span digest"
    );

    // A file moved onto another file's genuine bytes: its header says otherwise.
    let mut moved = z.clone();
    moved.files[2].offset = moved.files[1].offset;
    let layer = from_ztoc(&moved, l.blob.len() as u64);
    if let Ok(layer) = layer {
        let (e, p) = (&layer.entries[2], &layer.places[2]);
        let h = tar
            .get(p.header as usize..p.data as usize)
            .unwrap_or_default();
        assert!(check_headers(h, e, p).is_err());
    }

    // A window changed: the span digests still match, the bytes decoded from that
    // checkpoint differ; only the header check or the layer's own digest can tell
    // (ARCHITECTURE.md: the background check of the whole layer).
    let mut win = z.clone();
    if let super::ztoc::Zinfo::Gzip(g) = &mut win.zinfo {
        g.checkpoints[2].window.iter_mut().for_each(|b| *b = b'#');
    }
    let layer = from_ztoc(&win, l.blob.len() as u64).expect("parses");
    let from = layer.checkpoints[2].out;
    // Or the deflate data no longer decodes: an error, which is fine too.
    if let Ok(got) = read_with(&layer, &l.blob, from, from + 1000) {
        assert!(
            got != tar[from as usize..from as usize + 1000],
            "the window mattered"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = Ztoc::decode(&bytes);
    }

    #[test]
    fn decoding_a_damaged_ztoc_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let bytes = small_ztoc();
        let mut b = bytes.clone();
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        if let Ok(z) = Ztoc::decode(&b) {
            let _ = from_ztoc(&z, z.compressed_size);
        }
        let _ = Ztoc::decode(&bytes[..cut.index(bytes.len())]);
    }
}

/// The zTOC of a small uncompressed layer with a few files: no windows, so damage
/// lands in the tables.
fn small_ztoc() -> Vec<u8> {
    use std::sync::OnceLock;
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES
        .get_or_init(|| {
            let tar = tar_of(&[("a", b"alpha"), ("dir/b", b"bravo"), ("c", &[7u8; 3000])]);
            let digest = Digest::sha256_of(&tar);
            let pieces = std::iter::once(Ok(bytes::Bytes::copy_from_slice(&tar)));
            let index = index_pass(&digest, Codec::Tar, tar.len() as u64, pieces).expect("pass");
            let ranges = spans::fixed_ranges(1024, tar.len() as u64);
            let digests = spans::digests(&tar, &ranges).expect("digests");
            let spans: Vec<Span> = ranges
                .into_iter()
                .zip(digests)
                .map(|(range, digest)| Span { range, digest })
                .collect();
            let places = simple_places(&index);
            to_ztoc(&LayerForZtoc {
                codec: Codec::Tar,
                entries: &index.entries,
                places: &places,
                checkpoints: &[Checkpoint::START],
                spans: &spans,
                blob_size: tar.len() as u64,
                tar_size: tar.len() as u64,
                span_size: 1024,
                build_tool: "regfs test",
            })
            .expect("a zTOC")
            .encode()
        })
        .clone()
}

#[test]
fn an_uncompressed_layer_round_trips() {
    let bytes = small_ztoc();
    let z = Ztoc::decode(&bytes).expect("decodes");
    assert_eq!(z.encode(), bytes);
    let layer = from_ztoc(&z, z.compressed_size).expect("a layer");
    assert_eq!(layer.codec, Codec::Tar);
    assert_eq!(layer.entries.len(), 3);
    assert_eq!(layer.spans.len() as u64, z.compressed_size.div_ceil(1024));
}

/// Strings shared by many tables cost their length each time they are decoded: a zTOC
/// of a few megabytes must not decode into gigabytes.
#[test]
fn shared_strings_cannot_blow_up_memory() {
    use super::flatbuf::Builder;
    let mut b = Builder::default();
    let name = b.string(&vec![b'x'; 1 << 20]);
    let kind = b.string(b"reg");
    let files: Vec<_> = (0..1000)
        .map(|_| {
            b.start_table();
            b.offset(0, name);
            b.offset(1, kind);
            b.end_table()
        })
        .collect();
    let list = b.offset_vector(&files);
    b.start_table();
    b.offset(0, list);
    let toc = b.end_table();
    let version = b.string(b"0.9");
    b.start_table();
    b.offset(0, version);
    b.i64(3, 1 << 40, 0);
    b.offset(4, toc);
    let root = b.end_table();
    let bytes = b.finish(root);
    assert!(bytes.len() < 2 << 20);
    let err = Ztoc::decode(&bytes).err().unwrap_or_default();
    assert!(err.contains("MiB"), "{err}");
}
