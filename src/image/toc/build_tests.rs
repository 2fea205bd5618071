//! The TOCs writers make, as ctr-remote (stargz-snapshotter 0.12, eStargz and
//! zstd:chunked) and podman 4.3 (containers/storage zstd:chunked) wrote them for files
//! of odd sizes, and the cases newer writers add (`innerOffset`, `zeros`).

use proptest::prelude::*;
use serde_json::{Value, json};

use super::build::{Toc, build};
use crate::image::codec::Codec;
use crate::image::entry::{DataRef, EntryKind};
use crate::image::index::{Chunk, Content, IndexSource, LayerIndex};
use crate::registry::Digest;

fn digest(seed: u8) -> String {
    format!("sha256:{}", format!("{seed:02x}").repeat(32))
}

fn index_of(entries: Value, data_end: u64) -> crate::registry::Result<LayerIndex> {
    let toc: Toc =
        serde_json::from_value(json!({ "version": 1, "entries": entries })).expect("a TOC");
    let layer = Digest::sha256_of(b"layer");
    build(&layer, Codec::Gzip, &toc, data_end, IndexSource::Estargz)
}

/// The chunks of the file at `path`, as (file offset, size, compressed range).
fn chunks_of(index: &LayerIndex, path: &str) -> Vec<(u64, u64, std::ops::Range<u64>)> {
    let entry = index
        .entries
        .iter()
        .rev()
        .find(|e| &*e.path == path.as_bytes())
        .expect("the file");
    let DataRef::Chunks(range) = &entry.data else {
        return Vec::new();
    };
    index
        .chunks(range)
        .iter()
        .map(|c| (c.file_offset, c.size, c.compressed.clone()))
        .collect()
}

#[test]
fn ctr_remote_leaves_out_the_size_of_a_last_or_only_chunk() {
    // As ctr-remote 0.12 wrote them (eStargz; its zstd:chunked is the same JSON).
    let m = 4u64 << 20;
    let index = index_of(
        json!([
            { "name": "d/", "type": "dir", "mode": 493 },
            { "name": "d/cm1", "type": "reg", "size": m - 1, "offset": 100,
              "digest": digest(1), "chunkDigest": digest(1) },
            { "name": "d/cp1", "type": "reg", "size": m + 1, "offset": 5000,
              "digest": digest(2), "chunkSize": m, "chunkDigest": digest(3) },
            { "name": "d/cp1", "type": "chunk", "offset": 9000, "chunkOffset": m,
              "chunkDigest": digest(4) },
            { "name": "d/cp1.link", "type": "hardlink", "linkName": "d/cp1" },
            { "name": "d/empty", "type": "reg", "digest": digest(5) },
            { "name": "d/one", "type": "reg", "size": 1, "offset": 9100,
              "digest": digest(6), "chunkDigest": digest(6) },
            { "name": "d/sym", "type": "symlink", "linkName": "cp1" },
            { "name": "d/three", "type": "reg", "size": 3 * m + 12345, "offset": 9200,
              "digest": digest(7), "chunkSize": m, "chunkDigest": digest(8) },
            { "name": "d/three", "type": "chunk", "offset": 9300, "chunkOffset": m,
              "chunkSize": m, "chunkDigest": digest(9) },
            { "name": "d/three", "type": "chunk", "offset": 9400, "chunkOffset": 2 * m,
              "chunkSize": m, "chunkDigest": digest(10) },
            { "name": "d/three", "type": "chunk", "offset": 9500, "chunkOffset": 3 * m,
              "chunkDigest": digest(11) },
        ]),
        10_000,
    )
    .expect("usable");
    assert_eq!(chunks_of(&index, "d/cm1"), [(0, m - 1, 100..5000)]);
    assert_eq!(
        chunks_of(&index, "d/cp1"),
        [(0, m, 5000..9000), (m, 1, 9000..9100)]
    );
    assert_eq!(chunks_of(&index, "d/one"), [(0, 1, 9100..9200)]);
    assert_eq!(
        chunks_of(&index, "d/three"),
        [
            (0, m, 9200..9300),
            (m, m, 9300..9400),
            (2 * m, m, 9400..9500),
            (3 * m, 12345, 9500..10_000)
        ]
    );
    assert_eq!(chunks_of(&index, "d/empty"), []);
    let kinds: Vec<EntryKind> = index.entries.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EntryKind::Hardlink) && kinds.contains(&EntryKind::Symlink));
}

#[test]
fn podman_files_end_at_their_end_offset_and_chunks_at_the_next() {
    // As podman 4.3 wrote them: rolling-checksum chunks with every size given, the
    // file's `endOffset` where its last frame ends, one-chunk files with `digest` only.
    let index = index_of(
        json!([
            { "name": "d/c", "type": "reg", "size": 300, "offset": 109, "endOffset": 700,
              "digest": digest(1), "chunkSize": 100, "chunkDigest": digest(2) },
            { "name": "d/c", "type": "chunk", "offset": 300, "chunkSize": 150,
              "chunkOffset": 100, "chunkDigest": digest(3) },
            { "name": "d/c", "type": "chunk", "offset": 500, "chunkSize": 50,
              "chunkOffset": 250, "chunkDigest": digest(4) },
            { "name": "e/f1", "type": "reg", "size": 7330, "offset": 800, "endOffset": 950,
              "digest": digest(5) },
            { "name": "e/f2", "type": "reg", "size": 10, "offset": 1000, "endOffset": 1020,
              "digest": digest(6) },
        ]),
        5000,
    )
    .expect("usable");
    assert_eq!(
        chunks_of(&index, "d/c"),
        [
            (0, 100, 109..300),
            (100, 150, 300..500),
            (250, 50, 500..700)
        ]
    );
    assert_eq!(chunks_of(&index, "e/f1"), [(0, 7330, 800..950)]);
    assert_eq!(chunks_of(&index, "e/f2"), [(0, 10, 1000..1020)]);
    let Content::Chunks(map) = &index.content else {
        panic!("chunks")
    };
    // A one-chunk file is checked against the file's digest.
    let one: Vec<&Chunk> = map.chunks.iter().filter(|c| c.size == 7330).collect();
    assert_eq!(
        one[0].digest,
        Digest::parse(&digest(5)).and_then(|d| d.sha256_bytes())
    );
}

#[test]
fn small_files_share_a_member_by_inner_offset_and_zeros_are_holes() {
    let index = index_of(
        json!([
            { "name": "a", "type": "reg", "size": 10, "offset": 200, "chunkDigest": digest(1) },
            { "name": "b", "type": "reg", "size": 20, "offset": 200, "innerOffset": 522,
              "chunkDigest": digest(2) },
            { "name": "c", "type": "reg", "size": 5, "offset": 200, "innerOffset": 1054,
              "chunkDigest": digest(3) },
            { "name": "sparse", "type": "reg", "size": 3000, "offset": 400,
              "chunkSize": 1000, "chunkDigest": digest(4) },
            { "name": "sparse", "type": "chunk", "offset": 450, "chunkOffset": 1000,
              "chunkSize": 1000, "chunkType": "zeros", "chunkDigest": digest(5) },
            { "name": "sparse", "type": "chunk", "offset": 460, "chunkOffset": 2000,
              "chunkSize": 1000, "chunkDigest": digest(6) },
        ]),
        600,
    )
    .expect("usable");
    assert_eq!(chunks_of(&index, "b"), [(0, 20, 200..400)]);
    let Content::Chunks(map) = &index.content else {
        panic!("chunks")
    };
    let inner: Vec<u64> = map.chunks.iter().map(|c| c.inner_offset).take(3).collect();
    assert_eq!(inner, [0, 522, 1054]);
    let sparse = chunks_of(&index, "sparse");
    assert_eq!(
        sparse[0],
        (0, 1000, 400..450),
        "ends where the next data starts"
    );
    assert_eq!(sparse[1], (1000, 1000, 0..0), "a hole has nothing to fetch");
    assert!(map.chunks.iter().filter(|c| c.hole).count() == 1);
}

#[test]
fn chunks_in_any_order_and_unnamed_chunks_find_their_file() {
    let index = index_of(
        json!([
            { "name": "f", "type": "reg", "size": 30, "offset": 100, "chunkSize": 10,
              "chunkDigest": digest(1) },
            { "name": "f", "type": "chunk", "offset": 300, "chunkOffset": 20,
              "chunkDigest": digest(3) },
            { "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkSize": 10,
              "chunkDigest": digest(2) },
        ]),
        400,
    )
    .expect("usable");
    assert_eq!(
        chunks_of(&index, "f"),
        [(0, 10, 100..200), (10, 10, 200..300), (20, 10, 300..400)]
    );
}

#[test]
fn tocs_that_cannot_be_used_say_why() {
    let why = |entries: Value| {
        index_of(entries, 1000)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let gap = why(json!([
        { "name": "f", "type": "reg", "size": 30, "offset": 100, "chunkSize": 10,
          "chunkDigest": digest(1) },
        { "name": "f", "type": "chunk", "offset": 300, "chunkOffset": 20,
          "chunkDigest": digest(3) },
    ]));
    assert!(gap.contains("\"f\"") && gap.contains("gap"), "{gap}");
    let short = why(json!([
        { "name": "f", "type": "reg", "size": 30, "offset": 100, "chunkSize": 10,
          "chunkDigest": digest(1) },
    ]));
    assert!(short.contains("cover 10 of 30"), "{short}");
    let undigested = why(json!([
        { "name": "f", "type": "reg", "size": 30, "offset": 100, "chunkSize": 10,
          "chunkDigest": digest(1) },
        { "name": "f", "type": "chunk", "offset": 300, "chunkOffset": 10 },
    ]));
    assert!(undigested.contains("no sha256 digest"), "{undigested}");
    let orphan = why(json!([{ "name": "g", "type": "chunk", "offset": 300, "chunkOffset": 10 }]));
    assert!(orphan.contains("no file before it"), "{orphan}");
    let beyond = why(json!([
        { "name": "f", "type": "reg", "size": 3, "offset": 2000, "chunkDigest": digest(1) },
    ]));
    assert!(beyond.contains("no place in the blob"), "{beyond}");
    let huge = why(json!([
        { "name": "f", "type": "reg", "size": 30, "offset": 100, "chunkSize": 10,
          "chunkDigest": digest(1) },
        { "name": "f", "type": "chunk", "offset": u64::MAX, "chunkOffset": 10,
          "chunkSize": u64::MAX, "chunkDigest": digest(2) },
    ]));
    assert!(huge.contains("a chunk at byte 10"), "{huge}");
}

#[test]
fn the_prefetch_landmark_says_where_the_files_wanted_first_end() {
    let prefetch = |landmark: &str| {
        let index = index_of(
            json!([
                { "name": "first", "type": "reg", "size": 3, "offset": 100,
                  "chunkDigest": digest(1) },
                { "name": landmark, "type": "reg", "size": 1, "offset": 300,
                  "chunkDigest": digest(2) },
                { "name": "later", "type": "reg", "size": 3, "offset": 400,
                  "chunkDigest": digest(3) },
            ]),
            1000,
        )
        .expect("an index");
        assert!(
            index
                .entries
                .iter()
                .all(|e| !e.path.ends_with(b".landmark")),
            "landmarks are not files of the image"
        );
        match index.content {
            Content::Chunks(map) => map.prefetch_end,
            Content::Stream(_) => None,
        }
    };
    assert_eq!(prefetch(".prefetch.landmark"), Some(300));
    assert_eq!(prefetch("./.prefetch.landmark"), Some(300));
    assert_eq!(prefetch(".no.prefetch.landmark"), None);
    assert_eq!(prefetch("just-a-file"), None);
}

/// A file cut into chunks as some writer might: sizes, whether each size is written
/// out, the order of the chunk entries, and `innerOffset` merging.
#[derive(Debug, Clone)]
struct Plan {
    files: Vec<(u64, Vec<u64>)>,
    write_sizes: Vec<bool>,
    shuffle: Vec<usize>,
}

fn plans() -> impl Strategy<Value = Plan> {
    let file = (1u64..5000).prop_flat_map(|size| {
        prop::collection::vec(1u64..2000, 0..6).prop_map(move |cuts| {
            let mut cuts: Vec<u64> = cuts.into_iter().filter(|&c| c < size).collect();
            cuts.sort_unstable();
            cuts.dedup();
            (size, cuts)
        })
    });
    (
        prop::collection::vec(file, 1..8),
        prop::collection::vec(any::<bool>(), 64),
        prop::collection::vec(any::<usize>(), 64),
    )
        .prop_map(|(files, write_sizes, shuffle)| Plan {
            files,
            write_sizes,
            shuffle,
        })
}

proptest! {
    #[test]
    fn every_chunk_layout_covers_its_file_exactly(plan in plans()) {
        let mut entries = Vec::new();
        let mut offset = 100u64;
        let mut k = 0usize;
        for (n, (size, cuts)) in plan.files.iter().enumerate() {
            let starts: Vec<u64> = std::iter::once(0).chain(cuts.iter().copied()).collect();
            let mut group = Vec::new();
            for (i, &start) in starts.iter().enumerate() {
                let end = starts.get(i + 1).copied().unwrap_or(*size);
                let mut e = json!({ "offset": offset, "chunkDigest": digest((k % 250) as u8) });
                if plan.write_sizes[k % 64] {
                    e["chunkSize"] = json!(end - start);
                }
                if i == 0 {
                    e["name"] = json!(format!("f{n}"));
                    e["type"] = json!("reg");
                    e["size"] = json!(size);
                } else {
                    e["name"] = json!(format!("f{n}"));
                    e["type"] = json!("chunk");
                    e["chunkOffset"] = json!(start);
                }
                group.push(e);
                offset += 10 + end - start;
                k += 1;
            }
            // Chunk entries after the first in any order.
            let rest = &mut group[1..];
            for i in (1..rest.len()).rev() {
                rest.swap(i, plan.shuffle[(k + i) % 64] % (i + 1));
            }
            entries.extend(group);
        }
        let index = index_of(Value::Array(entries), offset).expect("usable");
        for (n, (size, cuts)) in plan.files.iter().enumerate() {
            let chunks = chunks_of(&index, &format!("f{n}"));
            prop_assert_eq!(chunks.len(), cuts.len() + 1);
            let mut at = 0;
            for (file_offset, len, compressed) in chunks {
                prop_assert_eq!(file_offset, at);
                prop_assert!(compressed.start < compressed.end && compressed.end <= offset);
                prop_assert!(compressed.end - compressed.start >= 10);
                at += len;
            }
            prop_assert_eq!(at, *size);
        }
    }
}

fn any_entry() -> impl Strategy<Value = Value> {
    let num = prop_oneof![0u64..300, Just(u64::MAX), Just(u64::MAX / 2), any::<u64>()];
    (
        prop::sample::select(vec!["reg", "chunk", "dir", "hardlink", "symlink", "x"]),
        prop::sample::select(vec!["a", "b", "", "../c"]),
        (num.clone(), num.clone(), num.clone(), num.clone(), num),
        prop::sample::select(vec!["", "zeros", "data", "odd"]),
        any::<bool>(),
    )
        .prop_map(
            |(kind, name, (size, offset, chunk_offset, chunk_size, inner), chunk_type, dig)| {
                let mut e = json!({
                    "type": kind, "name": name, "size": size, "offset": offset,
                    "chunkOffset": chunk_offset, "chunkSize": chunk_size, "innerOffset": inner,
                    "chunkType": chunk_type, "linkName": "a",
                });
                if dig {
                    e["chunkDigest"] = json!(digest(1));
                }
                e
            },
        )
}

proptest! {
    /// Whatever a TOC says, building its index never panics, and an index it makes
    /// covers every file exactly, inside the blob's data.
    #[test]
    fn any_toc_is_an_index_or_a_reason(entries in prop::collection::vec(any_entry(), 0..12)) {
        let Ok(index) = index_of(Value::Array(entries), 1000) else {
            return Ok(());
        };
        for entry in &index.entries {
            let DataRef::Chunks(range) = &entry.data else { continue };
            let mut at = 0;
            for c in index.chunks(range) {
                prop_assert_eq!(c.file_offset, at);
                prop_assert!(c.hole || c.compressed.start < c.compressed.end && c.compressed.end <= 1000);
                at += c.size;
            }
            prop_assert_eq!(at, entry.size);
        }
    }
}
