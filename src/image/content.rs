//! Reading one file's bytes out of a layer, fetching only what that file needs.
//!
//! - Plain layers: the file is a range of the uncompressed tar stream. Decoding starts
//!   at the nearest checkpoint before it (or carries on from a cursor a previous read
//!   left there), fed span by span, each span checked against the digest the index
//!   pass recorded before a byte of it is decoded. Cursors are shared by all readers
//!   of a layer, so a file read front to back, or many files read in layer order (`tar
//!   -c`, `cp -a`), decode the stream once; a single-frame zstd layer, whose only
//!   checkpoint is its start, relies on that.
//! - TOC layers: the file's chunks are fetched by their own ranges and decoded on their
//!   own, each checked against its chunk digest before any of it is returned
//!   (chunks.rs).
//!
//! - Layers indexed by a zTOC (docs/SEMANTICS.md, "Shared indexes"): the same, and
//!   before a file's bytes are served its tar header is checked where the index says
//!   it is (soci/header.rs); a checkpoint the image does not vouch for is used only once
//!   decoding the span before it proved its offsets and window (soci/window.rs). Any
//!   lie found refuses the index: every read through it fails from then on, and the
//!   mount is told ([`Readers::refused`]) so the layer is read by a pass instead.
//!
//! Checked pieces (spans, decoded chunks) are kept in a small shared cache; decoded
//! file blocks too, and in the disk cache for the next mount (kept.rs).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tracing::warn;

use super::chunks::ChunkReader;
use super::codec::{Codec, Decoder, gzip};
use super::entry::{DataRef, Entry, shown};
use super::flights::Flights;
use super::index::{Content, IndexSource, LayerIndex, StreamMap, unreadable};
use super::kept::KeptFiles;
use super::soci::header::check_headers;
use super::soci::trust::Trust;
use super::soci::window::{Proof, prove_next};
use super::source::BlobSource;
use crate::cache::{BlockCache, Idle};
use crate::registry::{Digest, Error, Result};
use crate::stats::Stats;

/// Cursors kept per layer.
const CURSORS: usize = 4;
/// Decoder output buffer of a cursor.
const SCRATCH: usize = 128 << 10;
/// Piece cache keys of spans: a hash of the span (range and digest) with this bit set,
/// so spans of two indexes of one layer never meet (chunks.rs's keys have the top bit).
const SPAN_KEY: u64 = 1 << 62;
/// Longest gzip header before a zTOC's first checkpoint that is believed.
const MAX_GZIP_HEADER: u64 = 64 << 10;

/// Checked pieces of layers, shared by every layer of a mount.
pub type PieceCache = BlockCache;

/// A decoder somewhere in a layer's tar stream, with the input it has not used yet.
/// Kept idle between reads without its input and scratch (the span is read again from
/// the piece cache), counted beside the block cache (cache/limit.rs).
struct Cursor {
    decoder: Decoder,
    /// Checked blob bytes from `decoder.input_pos()` on.
    input: Bytes,
    scratch: Vec<u8>,
    /// While idle: its decoder's memory in the budget.
    _idle: Option<Idle>,
}

impl Cursor {
    /// Decodes the input it holds until it is used up or the output reaches `end`;
    /// the part of the output inside `start..end` is appended to `out`.
    fn advance(
        &mut self,
        start: u64,
        end: u64,
        out: &mut BytesMut,
    ) -> std::result::Result<(), String> {
        while self.decoder.output_pos() < end {
            let before = self.decoder.output_pos();
            let step = self.decoder.decode(&self.input, &mut self.scratch)?;
            let _ = self.input.split_to(step.consumed);
            let made = &self.scratch[..step.produced];
            let from = start.saturating_sub(before).min(made.len() as u64) as usize;
            let to = end.saturating_sub(before).min(made.len() as u64) as usize;
            if from < to {
                out.extend_from_slice(&made[from..to]);
            }
            if step.consumed == 0 && step.produced == 0 && !step.boundary {
                break; // needs input
            }
        }
        Ok(())
    }
}

/// The working memory of a read of `len` bytes decoded from a plain layer: the
/// decoder, its scratch, the span it holds (at most the largest) and the output.
fn working_bytes(map: &StreamMap, len: u64) -> u64 {
    let span = map.spans.iter().map(|s| s.range.end - s.range.start).max();
    Decoder::working_bytes(map.codec) + SCRATCH as u64 + span.unwrap_or(0) + len
}

/// Told once when an index from a zTOC is refused: the layer's digest, the index's
/// source, and why.
pub type RefusalHook = Arc<dyn Fn(&Digest, &IndexSource, &str) + Send + Sync>;

/// What a mount needs to read layer contents.
#[derive(Clone)]
pub struct Readers {
    pub pieces: Arc<PieceCache>,
    /// TOC chunks fetched along with another file's, compressed (image/chunks.rs).
    pub ahead: Arc<PieceCache>,
    pub stats: Arc<Stats>,
    pub refused: Option<RefusalHook>,
}

/// The files of one indexed layer, readable.
pub struct LayerContent {
    index: Arc<LayerIndex>,
    source: Arc<dyn BlobSource>,
    readers: Readers,
    cursors: Mutex<Vec<Cursor>>,
    /// TOC chunks being fetched.
    flights: Flights,
    /// Decoded files in the disk cache (None: no disk cache).
    kept: Option<KeptFiles>,
    /// An index from a zTOC not yet checked whole: what is proven of it.
    trust: Option<Trust>,
}

impl LayerContent {
    pub fn new(
        index: Arc<LayerIndex>,
        source: Arc<dyn BlobSource>,
        readers: Readers,
    ) -> LayerContent {
        if let Some(why) = &index.toc_unused {
            readers.stats.toc_unused(&source.digest().to_string(), why);
        }
        let trust = match (&index.source, &index.content) {
            (IndexSource::Soci { checked: false, .. }, Content::Stream(map)) => {
                Some(Trust::new(map.checkpoints.len(), index.source.unproven()))
            }
            _ => None,
        };
        LayerContent {
            index,
            source,
            readers,
            cursors: Mutex::new(Vec::new()),
            flights: Flights::default(),
            kept: None,
            trust,
        }
    }

    /// Why the layer's index was refused, if it was.
    pub fn refusal(&self) -> Option<String> {
        self.trust.as_ref().and_then(Trust::refused)
    }

    /// The index lied (a read, or the background check of the whole layer, found it
    /// out): nothing is read through it again; logged, and the mount told, once.
    pub fn refuse(&self, why: &str) {
        let Some(trust) = &self.trust else {
            return;
        };
        if !trust.refuse(why) {
            return;
        }
        if let IndexSource::Soci { index, ztoc, .. } = &self.index.source {
            warn!(layer = %self.digest(), %index, %ztoc, "SOCI index refused, never used again: {why}");
        }
        if let Some(hook) = &self.readers.refused {
            hook(self.digest(), &self.index.source, why);
        }
    }

    /// The background check found the whole layer to be what its zTOC says.
    pub fn set_checked(&self) {
        if let Some(trust) = &self.trust {
            trust.set_checked();
        }
    }

    /// Keeps what is decoded in the disk cache, and reads from there first.
    pub fn keeping(mut self, kept: Option<KeptFiles>) -> LayerContent {
        self.kept = kept;
        self
    }

    /// `entry`'s content as a local file the kernel may read directly, if it is kept
    /// whole on disk (kept.rs).
    pub async fn local_file(&self, entry: &Entry) -> Option<std::fs::File> {
        if self.refusal().is_some() {
            return None; // reads fail now, and so must the kernel's
        }
        self.kept.as_ref()?.local_file(entry).await
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// The layer blob's digest and size.
    pub fn digest(&self) -> &Digest {
        self.source.digest()
    }

    pub fn blob_size(&self) -> u64 {
        self.source.size()
    }

    /// Up to `len` bytes of `entry` (one of the index's entries) at `offset` (short
    /// only at its end).
    pub async fn read(&self, entry: &Entry, offset: u64, len: u64) -> Result<Bytes> {
        if let Some(why) = self.refusal() {
            return Err(unreadable(
                self.digest(),
                format!("its SOCI index was refused: {why}"),
            ));
        }
        let result = self.read_entry(entry, offset, len).await;
        match &result {
            Err(e) if self.trust.is_some() && !e.is_transient() => self.refuse(&e.to_string()),
            _ => {}
        }
        result
    }

    async fn read_entry(&self, entry: &Entry, offset: u64, len: u64) -> Result<Bytes> {
        if offset >= entry.size || len == 0 {
            return Ok(Bytes::new());
        }
        let len = len.min(entry.size - offset);
        match &self.kept {
            Some(kept) => {
                let decode = |start, len| self.decoded(entry, start, len);
                let (pieces, stats) = (&self.readers.pieces, &self.readers.stats);
                kept.read(pieces, stats, entry, (offset, len), decode).await
            }
            None => self.decoded(entry, offset, len).await,
        }
    }

    /// `len` bytes of `entry`'s content at `offset` (within it), decoded from the layer.
    async fn decoded(&self, entry: &Entry, offset: u64, len: u64) -> Result<Bytes> {
        let data = match (&entry.data, &self.index.content) {
            (DataRef::Stream(at), Content::Stream(map)) => {
                self.check_header(map, entry, *at).await?;
                let start = at
                    .checked_add(offset)
                    .ok_or_else(|| unreadable(self.digest(), "file offset overflows"))?;
                self.read_stream(map, start, start + len).await?
            }
            (DataRef::Chunks(range), Content::Chunks(map)) => {
                let reader = ChunkReader {
                    layer: self.source.digest(),
                    source: &*self.source,
                    pieces: &self.readers.pieces,
                    ahead: &self.readers.ahead,
                    stats: &self.readers.stats,
                    flights: &self.flights,
                    codec: map.codec,
                    layer_chunks: &map.chunks,
                };
                let chunks = self.index.chunks(range);
                reader
                    .read(range.start, chunks, offset, offset + len)
                    .await?
            }
            _ => {
                return Err(unreadable(
                    self.digest(),
                    "a file without content in the index",
                ));
            }
        };
        if data.len() as u64 != len {
            return Err(unreadable(
                self.digest(),
                format!("read {} of {len} bytes", data.len()),
            ));
        }
        Ok(data)
    }

    /// Bytes `start..end` of the uncompressed tar stream.
    async fn read_stream(&self, map: &StreamMap, start: u64, end: u64) -> Result<Bytes> {
        if map.codec == Codec::Tar {
            return self.blob_range(map, start, end).await;
        }
        // Before a cursor is taken or made: it waits holding nothing (cache/limit.rs).
        let _working = self
            .source
            .working_memory(working_bytes(map, end - start))
            .await;
        let mut cursor = match self.take_cursor(map, start) {
            Some(cursor) => cursor,
            None => self.new_cursor(map, start).await?,
        };
        let mut out = BytesMut::with_capacity((end - start) as usize);
        let result = loop {
            if cursor.decoder.output_pos() >= end {
                break Ok(());
            }
            if cursor.input.is_empty() {
                let pos = cursor.decoder.input_pos();
                let Some(k) = map.span_at(pos) else {
                    break Err(unreadable(
                        self.digest(),
                        "the layer ends before the file does",
                    ));
                };
                let span = self.span(map, k).await?;
                let skip = (pos - map.spans[k].range.start) as usize;
                cursor.input = span.slice(skip.min(span.len())..);
            }
            let (c, o, r) = tokio::task::spawn_blocking(move || {
                let r = cursor.advance(start, end, &mut out);
                (cursor, out, r)
            })
            .await
            .map_err(|e| Error::Unavailable(format!("decoder task failed: {e}")))?;
            (cursor, out) = (c, o);
            if let Err(e) = r {
                break Err(unreadable(self.digest(), e));
            }
        };
        result?;
        self.keep_cursor(cursor);
        Ok(out.freeze())
    }

    /// A cursor left at or before `start` that is no worse than the nearest checkpoint.
    fn take_cursor(&self, map: &StreamMap, start: u64) -> Option<Cursor> {
        let point = &map.checkpoints[map.checkpoint_before(start)];
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        let best = cursors
            .iter()
            .enumerate()
            .filter(|(_, c)| (point.out..=start).contains(&c.decoder.output_pos()))
            .max_by_key(|(_, c)| c.decoder.output_pos())
            .map(|(i, _)| i)?;
        let mut cursor = cursors.swap_remove(best);
        cursor.scratch = vec![0; SCRATCH];
        cursor._idle = None; // working memory counts it now
        Some(cursor)
    }

    /// A decoder at the nearest checkpoint before `start`, once it is proven.
    async fn new_cursor(&self, map: &StreamMap, start: u64) -> Result<Cursor> {
        let k = map.checkpoint_before(start);
        self.prove(map, k).await?;
        Stats::add(&self.readers.stats.content_decodes, 1);
        let decoder = Decoder::at(map.codec, &map.checkpoints[k])
            .map_err(|e| unreadable(self.digest(), e))?;
        Ok(Cursor {
            decoder,
            input: Bytes::new(),
            scratch: vec![0; SCRATCH],
            _idle: None,
        })
    }

    /// Keeps `cursor` for the next read, idle: without its input and scratch, and only
    /// if idle decoders' share of the budget has room for it, after this layer's cursor
    /// furthest behind if need be (else it is dropped, counted in
    /// `images.cursors_dropped`).
    fn keep_cursor(&self, mut cursor: Cursor) {
        cursor.input = Bytes::new();
        cursor.scratch = Vec::new();
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        // The one furthest behind goes first: the others are likelier to be continued.
        let behind = |cursors: &Vec<Cursor>| {
            (0..cursors.len()).min_by_key(|&i| cursors[i].decoder.output_pos())
        };
        if cursors.len() >= CURSORS {
            if let Some(i) = behind(&cursors) {
                cursors.swap_remove(i);
            }
        }
        if let Some(limit) = self.readers.pieces.limit() {
            let held = cursor.decoder.held_bytes();
            let mut idle = limit.keep_idle(held);
            if idle.is_none() {
                if let Some(i) = behind(&cursors) {
                    cursors.swap_remove(i);
                    idle = limit.keep_idle(held);
                }
            }
            if idle.is_none() {
                Stats::add(&self.readers.stats.cursors_dropped, 1);
                return;
            }
            cursor._idle = idle;
        }
        cursors.push(cursor);
    }

    /// Blob bytes `start..end` of an uncompressed layer, from checked spans.
    async fn blob_range(&self, map: &StreamMap, start: u64, end: u64) -> Result<Bytes> {
        let mut out = BytesMut::new();
        let mut pos = start;
        while pos < end {
            let Some(k) = map.span_at(pos) else {
                return Err(unreadable(
                    self.digest(),
                    "a file beyond the end of the layer",
                ));
            };
            let span = self.span(map, k).await?;
            let range = &map.spans[k].range;
            let (from, to) = (pos - range.start, end.min(range.end) - range.start);
            let Some(piece) = span.get(from as usize..to as usize) else {
                return Err(unreadable(self.digest(), "a span shorter than its range"));
            };
            if pos == start && to + range.start == end {
                return Ok(span.slice(from as usize..to as usize));
            }
            out.extend_from_slice(piece);
            pos = range.start + to;
        }
        Ok(out.freeze())
    }

    /// Span `k` of the blob, checked against its digest.
    async fn span(&self, map: &StreamMap, k: usize) -> Result<Bytes> {
        let span = map
            .spans
            .get(k)
            .ok_or_else(|| unreadable(self.digest(), "read beyond the indexed blob"))?;
        let (range, expected) = (span.range.clone(), span.digest);
        let name = sha256(
            &[
                &range.start.to_le_bytes()[..],
                &range.end.to_le_bytes(),
                &expected,
            ]
            .concat(),
        );
        let mut id = [0u8; 8];
        id.copy_from_slice(&name[..8]);
        let key = (
            self.digest().clone(),
            SPAN_KEY | (u64::from_le_bytes(id) & (SPAN_KEY - 1)),
        );
        self.readers
            .pieces
            .get(&key, || async {
                // Exactly the span: its digest checks it, and the piece cache keeps it.
                let bytes = self
                    .source
                    .fetch_range(range.start, range.end - range.start)
                    .await?;
                Stats::add(
                    &self.readers.stats.content_fetched_bytes,
                    bytes.len() as u64,
                );
                if sha256(&bytes) != expected {
                    self.source.distrust();
                    return Err(unreadable(
                        self.digest(),
                        format!("span {k} ({range:?}) does not match its digest in the index"),
                    ));
                }
                Ok(bytes)
            })
            .await
    }

    /// A file of a zTOC layer: its tar header must be where the index says, and say
    /// what the index says, before its bytes are served.
    async fn check_header(&self, map: &StreamMap, entry: &Entry, at: u64) -> Result<()> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let (entries, places) = (&self.index.entries, &self.index.places);
        let i = places.partition_point(|p| p.data < at);
        let listed = entries.get(i).is_some_and(|e| std::ptr::eq(e, entry));
        let Some(place) = places.get(i).filter(|p| listed && p.data == at) else {
            return Err(unreadable(
                self.digest(),
                format!(
                    "{}: the index does not say where its header is",
                    shown(&entry.path)
                ),
            ));
        };
        if trust.header_checked(i) {
            return Ok(());
        }
        let headers = self.read_stream(map, place.header, place.data).await?;
        check_headers(&headers, entry, place).map_err(|e| unreadable(self.digest(), e))?;
        trust.set_header_checked(i);
        Ok(())
    }

    /// Proves checkpoint `k` before a decoder starts there: each checkpoint from the
    /// span before it, going back as far as its window depends on earlier ones.
    async fn prove(&self, map: &StreamMap, k: usize) -> Result<()> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let mut todo = vec![k];
        while let Some(&j) = todo.last() {
            if trust.is_proven(j) {
                todo.pop();
                continue;
            }
            if j == 0 {
                self.prove_first(map).await?;
                trust.set_proven(0);
                continue;
            }
            let input = self.span(map, j - 1).await?;
            let (prev, next) = (map.checkpoints[j - 1].clone(), map.checkpoints[j].clone());
            let (codec, prev_proven) = (map.codec, trust.is_proven(j - 1));
            let proof = tokio::task::spawn_blocking(move || {
                prove_next(codec, &prev, &input, &next, prev_proven)
            })
            .await
            .map_err(|e| Error::Unavailable(format!("decoder task failed: {e}")))?
            .map_err(|e| unreadable(self.digest(), format!("checkpoint {j}: {e}")))?;
            match proof {
                Proof::Proven => trust.set_proven(j),
                Proof::NeedsPrevious => todo.push(j - 1),
            }
        }
        Ok(())
    }

    /// The first checkpoint: the blob's start, or (gzip) the first deflate byte, right
    /// after the gzip header, with nothing before it.
    async fn prove_first(&self, map: &StreamMap) -> Result<()> {
        let first = &map.checkpoints[0];
        let at = first.in_byte();
        let empty = first.window.as_deref().is_none_or(|w| w.is_empty());
        let ok = match map.codec {
            Codec::Gzip if first.in_bit % 8 == 0 && first.out == 0 && empty => {
                at <= MAX_GZIP_HEADER
                    && gzip::parse_member_header(&self.source.read(0, at).await?)
                        == Ok(Some(at as usize))
            }
            _ => first.in_bit == 0 && first.out == 0,
        };
        if ok {
            Ok(())
        } else {
            Err(unreadable(
                self.digest(),
                "the first checkpoint is not where the layer's data starts",
            ))
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
