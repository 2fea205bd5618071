//! The index of one layer: every entry, and how to reach any file's bytes without
//! reading the layer from its start (ARCHITECTURE.md, "A file inside an image").

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::codec::{Checkpoint, Codec};
use super::entry::{Entry, TarPlace};
use super::soci::spans::Span;
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexSource {
    /// One streaming pass over the whole (verified) blob.
    Pass,
    /// The eStargz table of contents (verified against the TOC digest annotation).
    Estargz,
    /// The zstd:chunked manifest (verified against its checksum annotation).
    ZstdChunked,
    /// A zTOC of a SOCI index (docs/SEMANTICS.md, "Shared indexes").
    Soci {
        /// The SOCI index manifest, and the zTOC blob it lists for this layer.
        index: Digest,
        ztoc: Digest,
        /// The image manifest names the index (SOCI v2's `com.amazon.soci.index-digest`),
        /// so the image's digest vouches for it; else only its pusher does.
        vouched: bool,
        /// The whole layer was checked against the zTOC and its own digest.
        checked: bool,
    },
}

impl IndexSource {
    /// A zTOC's, not yet checked whole: it may still be refused.
    pub fn may_be_refused(&self) -> bool {
        matches!(self, IndexSource::Soci { checked: false, .. })
    }

    /// A zTOC nothing vouches for yet: its checkpoints' windows are proven before use,
    /// and the whole layer is checked in the background.
    pub fn unproven(&self) -> bool {
        matches!(
            self,
            IndexSource::Soci {
                vouched: false,
                checked: false,
                ..
            }
        )
    }
}

#[derive(Serialize, Deserialize)]
pub struct LayerIndex {
    /// In layer order; later entries for the same path replace earlier ones.
    pub entries: Vec<Entry>,
    /// Where each entry's headers are, one per entry: for an index from a zTOC (each
    /// file's header is checked there before its bytes are served), and for a gzip
    /// layer the pass may publish a zTOC of. Empty otherwise.
    pub places: Vec<TarPlace>,
    pub content: Content,
    pub source: IndexSource,
    /// Why the layer was read whole although it announced a TOC (`None`: it did not,
    /// or its TOC was used). Shown in `/.regfs/stats` as `images.toc_unused`.
    pub toc_unused: Option<String>,
    /// Why the layer was read whole although a SOCI index had a zTOC for it (`None`:
    /// there was none, or it was used). Not kept on disk: the index is remembered bad.
    #[serde(skip)]
    pub soci_unused: Option<String>,
    /// The uncompressed tar stream's size (0 where unknown: TOC layers).
    pub tar_size: u64,
    /// A zTOC can describe this layer exactly: one gzip member, every tar header an
    /// entry regfs shows, checkpoints and spans as SOCI defines them.
    pub publishable: bool,
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
    /// Sorted by `out`. gzip: the first is the first deflate byte with an empty window
    /// (SOCI's first checkpoint); tar and zstd: [`Checkpoint::START`].
    pub checkpoints: Vec<Checkpoint>,
    /// The blob's spans in order, each with the SHA-256 of its bytes: for gzip one per
    /// checkpoint as SOCI defines them (src/image/soci/spans.rs; neighbours share a
    /// byte where a block starts inside it), else fixed ranges from byte 0.
    pub spans: Vec<Span>,
    pub blob_size: u64,
}

impl StreamMap {
    /// The number of the last checkpoint at or before uncompressed offset `out`.
    pub fn checkpoint_before(&self, out: u64) -> usize {
        self.checkpoints
            .partition_point(|c| c.out <= out)
            .saturating_sub(1)
    }

    /// The span a decoder whose next input byte is `pos` reads next: the last one
    /// starting at or before `pos` (of two sharing the byte, the later), if it holds
    /// `pos`.
    pub fn span_at(&self, pos: u64) -> Option<usize> {
        let k = self
            .spans
            .partition_point(|s| s.range.start <= pos)
            .checked_sub(1)?;
        self.spans[k].range.contains(&pos).then_some(k)
    }

    /// The blob range of span `k`.
    pub fn span(&self, k: usize) -> Option<Range<u64>> {
        self.spans.get(k).map(|s| s.range.clone())
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
pub const DISK_KIND: &str = "layer-index-v4";

/// A [`LayerIndex`] by reference, field for field as it is written, with another
/// source (a zTOC's index, once the whole layer was checked against it).
#[derive(Serialize)]
struct IndexAs<'a> {
    entries: &'a [Entry],
    places: &'a [TarPlace],
    content: &'a Content,
    source: &'a IndexSource,
    toc_unused: &'a Option<String>,
    tar_size: u64,
    publishable: bool,
}

impl LayerIndex {
    /// The index as bytes for the disk cache.
    pub fn encode(&self) -> Option<Vec<u8>> {
        self.encode_as(&self.source)
    }

    /// The index as bytes for the disk cache, as made by `source`.
    pub fn encode_as(&self, source: &IndexSource) -> Option<Vec<u8>> {
        postcard::to_allocvec(&IndexAs {
            entries: &self.entries,
            places: &self.places,
            content: &self.content,
            source,
            toc_unused: &self.toc_unused,
            tar_size: self.tar_size,
            publishable: self.publishable,
        })
        .ok()
    }

    /// An index the disk cache kept (it checksums its entries; a damaged one never
    /// gets here, and one that does not decode is ignored).
    pub fn decode(bytes: &[u8]) -> Option<LayerIndex> {
        postcard::from_bytes(bytes).ok()
    }

    /// Approximate memory held, for the budget and `/.regfs/stats`.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.entries.iter().map(Entry::heap_bytes).sum();
        let places: usize = self.places.iter().map(TarPlace::heap_bytes).sum();
        let content = match &self.content {
            Content::Stream(m) => {
                m.spans.len() * std::mem::size_of::<Span>()
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
        std::mem::size_of::<LayerIndex>() + entries + places + content
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

    fn span(range: Range<u64>) -> Span {
        Span {
            range,
            digest: [3; 32],
        }
    }

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
        let place = TarPlace {
            header: 0,
            data: 512,
            raw_name: Some(b"./etc/f\xff"[..].into()),
        };
        let source = IndexSource::Soci {
            index: Digest::sha256_of(b"index"),
            ztoc: Digest::sha256_of(b"ztoc"),
            vouched: false,
            checked: false,
        };
        let index = LayerIndex {
            entries: vec![entry.clone()],
            places: vec![place.clone()],
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
                spans: vec![span(0..1001), span(1000..1077)],
                blob_size: 1077,
            }),
            source: source.clone(),
            toc_unused: Some("why".into()),
            soci_unused: None,
            tar_size: 1 << 23,
            publishable: true,
        };
        let back = LayerIndex::decode(&index.encode().expect("encodes")).expect("decodes");
        assert_eq!(back.entries, vec![entry]);
        assert_eq!(back.places, vec![place]);
        assert_eq!(back.source, source);
        assert_eq!((back.tar_size, back.publishable), (1 << 23, true));
        let checked = IndexSource::Soci {
            index: Digest::sha256_of(b"index"),
            ztoc: Digest::sha256_of(b"ztoc"),
            vouched: false,
            checked: true,
        };
        let again = LayerIndex::decode(&index.encode_as(&checked).expect("encodes"));
        assert_eq!(again.map(|i| i.source), Some(checked));
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
        // Spans as SOCI's: the second and third share byte 20.
        let map = StreamMap {
            codec: Codec::Gzip,
            checkpoints: vec![Checkpoint::START, cp(100), cp(250)],
            spans: vec![span(2..10), span(10..21), span(20..35)],
            blob_size: 35,
        };
        assert_eq!(map.checkpoint_before(0), 0);
        assert_eq!(map.checkpoint_before(99), 0);
        assert_eq!(map.checkpoint_before(100), 1);
        assert_eq!(map.checkpoint_before(10_000), 2);
        assert_eq!(map.span_at(0), None, "the gzip header is in no span");
        assert_eq!(map.span_at(2), Some(0));
        assert_eq!(map.span_at(10), Some(1));
        assert_eq!(map.span_at(19), Some(1));
        assert_eq!(
            map.span_at(20),
            Some(2),
            "the shared byte starts the later span"
        );
        assert_eq!(map.span_at(34), Some(2));
        assert_eq!(map.span_at(35), None);
        assert_eq!(map.span(2), Some(20..35));
        assert_eq!(map.span(3), None);
    }
}
