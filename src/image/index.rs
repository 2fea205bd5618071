//! The index of one layer: every entry, and how to reach any file's bytes without
//! reading the layer from its start (ARCHITECTURE.md, "A file inside an image").

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::codec::{Checkpoint, Codec};
use super::entry::Entry;
use crate::registry::{Digest, Error};

/// Entries and index memory one layer may have.
pub const MAX_ENTRIES: usize = 1_000_000;
pub const MAX_INDEX_BYTES: usize = 256 << 20;
/// Largest TOC accepted, compressed and uncompressed.
pub const MAX_TOC: u64 = 64 << 20;
pub const MAX_TOC_JSON: usize = 256 << 20;

/// The error for a layer that cannot be read as what it says it is.
pub fn unreadable(digest: &Digest, what: impl std::fmt::Display) -> Error {
    Error::BadAnswer(format!("layer {digest}: {what}"))
}

/// How a layer's index was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexSource {
    /// One streaming pass over the whole (verified) blob.
    Pass,
    /// The eStargz table of contents (verified against the TOC digest annotation).
    Estargz,
    /// The zstd:chunked manifest (verified against its checksum annotation).
    ZstdChunked,
}

#[derive(Serialize, Deserialize)]
pub struct LayerIndex {
    /// In layer order; later entries for the same path replace earlier ones.
    pub entries: Vec<Entry>,
    pub content: Content,
    pub source: IndexSource,
    /// Why the layer was read whole although it announced a TOC (`None`: it did not,
    /// or its TOC was used). Shown in `/.regfs/stats` as `images.toc_unused`.
    pub toc_unused: Option<String>,
}

/// Where file bytes are.
#[derive(Serialize, Deserialize)]
pub enum Content {
    /// Plain layers: offsets in the uncompressed tar stream, reached by decoding from
    /// the nearest checkpoint; every span of the blob is checked against the digest it
    /// had when the pass verified the whole blob.
    Stream(StreamMap),
    /// TOC layers: each chunk is compressed on its own and has its own digest.
    Chunks(ChunkMap),
}

#[derive(Serialize, Deserialize)]
pub struct StreamMap {
    pub codec: Codec,
    /// Sorted by `out`; the first is [`Checkpoint::START`].
    pub checkpoints: Vec<Checkpoint>,
    /// Blob bytes per span digest; span `k` is `k * span_size ..` (the last is short).
    pub span_size: u64,
    /// SHA-256 of each span of the blob.
    pub spans: Vec<[u8; 32]>,
    pub blob_size: u64,
}

impl StreamMap {
    /// The last checkpoint at or before uncompressed offset `out`.
    pub fn checkpoint_before(&self, out: u64) -> &Checkpoint {
        let i = self.checkpoints.partition_point(|c| c.out <= out);
        &self.checkpoints[i.saturating_sub(1)]
    }

    /// The blob range of span `k`.
    pub fn span(&self, k: u64) -> Range<u64> {
        let start = k.saturating_mul(self.span_size).min(self.blob_size);
        start..start.saturating_add(self.span_size).min(self.blob_size)
    }
}

#[derive(Serialize, Deserialize)]
pub struct ChunkMap {
    pub codec: Codec,
    pub chunks: Vec<Chunk>,
    /// eStargz's `.prefetch.landmark`: the blob bytes before it hold the files its
    /// writer put first (those a container reads at start), fetched at once when the
    /// layer is first used. `None`: no landmark, or `.no.prefetch.landmark`.
    pub prefetch_end: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The blob range holding the chunk's gzip member or zstd frame(s); may end later
    /// than the member (it is bounded by the next thing the TOC names). Empty for a hole.
    pub compressed: Range<u64>,
    /// Decoded bytes to skip before the chunk (eStargz `innerOffset`).
    pub inner_offset: u64,
    /// Where the chunk starts in its file, and its length.
    pub file_offset: u64,
    pub size: u64,
    /// SHA-256 of the chunk's bytes; `None` only for a hole the TOC gives no digest.
    pub digest: Option<[u8; 32]>,
    /// A run of zeros (zstd:chunked `chunkType: zeros`): nothing to fetch.
    pub hole: bool,
}

/// The disk cache's name for layer indexes; a new format gets a new number.
pub const DISK_KIND: &str = "layer-index-v3";

impl LayerIndex {
    /// The index as bytes for the disk cache.
    pub fn encode(&self) -> Option<Vec<u8>> {
        postcard::to_allocvec(self).ok()
    }

    /// An index the disk cache kept (it checksums its entries; a damaged one never
    /// gets here, and one that does not decode is ignored).
    pub fn decode(bytes: &[u8]) -> Option<LayerIndex> {
        postcard::from_bytes(bytes).ok()
    }

    /// Approximate memory held, for the budget and `/.regfs/stats`.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.entries.iter().map(Entry::heap_bytes).sum();
        let content = match &self.content {
            Content::Stream(m) => {
                m.spans.len() * 32
                    + m.checkpoints
                        .iter()
                        .map(|c| {
                            std::mem::size_of::<Checkpoint>()
                                + c.window.as_ref().map_or(0, |w| w.len())
                        })
                        .sum::<usize>()
            }
            Content::Chunks(m) => m.chunks.len() * std::mem::size_of::<Chunk>(),
        };
        std::mem::size_of::<LayerIndex>() + entries + content
    }

    /// The chunks of an entry whose data is `DataRef::Chunks`.
    pub fn chunks(&self, range: &Range<u32>) -> &[Chunk] {
        match &self.content {
            Content::Chunks(m) => m
                .chunks
                .get(range.start as usize..range.end as usize)
                .unwrap_or(&[]),
            Content::Stream(_) => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_through_bytes() {
        use crate::image::entry::{DataRef, Entry, EntryKind};
        let entry = Entry {
            path: b"etc/f\xff"[..].into(),
            kind: EntryKind::File,
            mode: 0o4755,
            uid: 1,
            gid: 2,
            mtime: -5,
            mtime_nsec: 7,
            size: 9,
            link: None,
            rdev: (0, 0),
            xattrs: vec![(b"user.a"[..].into(), b"\0v"[..].into())],
            data: DataRef::Stream(512),
        };
        let index = LayerIndex {
            entries: vec![entry.clone()],
            content: Content::Stream(StreamMap {
                codec: Codec::Gzip,
                checkpoints: vec![
                    Checkpoint::START,
                    Checkpoint {
                        in_bit: 8003,
                        out: 1 << 22,
                        window: Some(vec![1u8; 100].into()),
                    },
                ],
                span_size: 1 << 20,
                spans: vec![[3; 32]],
                blob_size: 77,
            }),
            source: IndexSource::Pass,
            toc_unused: Some("why".into()),
        };
        let back = LayerIndex::decode(&index.encode().expect("encodes")).expect("decodes");
        assert_eq!(back.entries, vec![entry]);
        let (Content::Stream(a), Content::Stream(b)) = (&index.content, &back.content) else {
            panic!("a stream map");
        };
        assert_eq!(
            (&a.checkpoints, &a.spans, a.blob_size),
            (&b.checkpoints, &b.spans, b.blob_size)
        );
        assert!(LayerIndex::decode(b"garbage").is_none());
    }

    #[test]
    fn checkpoint_and_span_lookup() {
        let cp = |out| Checkpoint {
            in_bit: out * 2,
            out,
            window: None,
        };
        let map = StreamMap {
            codec: Codec::Zstd,
            checkpoints: vec![Checkpoint::START, cp(100), cp(250)],
            span_size: 10,
            spans: vec![[0; 32]; 4],
            blob_size: 35,
        };
        assert_eq!(map.checkpoint_before(0).out, 0);
        assert_eq!(map.checkpoint_before(99).out, 0);
        assert_eq!(map.checkpoint_before(100).out, 100);
        assert_eq!(map.checkpoint_before(10_000).out, 250);
        assert_eq!(map.span(0), 0..10);
        assert_eq!(map.span(3), 30..35);
        assert_eq!(map.span(9), 35..35);
    }
}
