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
//! Checked pieces (spans, decoded chunks) are kept in a small shared cache; decoded
//! file blocks too, and in the disk cache for the next mount (kept.rs).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use super::chunks::ChunkReader;
use super::codec::{Codec, Decoder};
use super::entry::{DataRef, Entry};
use super::flights::Flights;
use super::index::unreadable;
use super::index::{Content, LayerIndex, StreamMap};
use super::kept::KeptFiles;
use super::source::BlobSource;
use crate::cache::BlockCache;
use crate::registry::{Digest, Error, Result};
use crate::stats::Stats;

/// Cursors kept per layer.
const CURSORS: usize = 4;
/// Decoder output buffer of a cursor.
const SCRATCH: usize = 128 << 10;

/// Checked pieces of layers, shared by every layer of a mount.
pub type PieceCache = BlockCache;

/// A decoder somewhere in a layer's tar stream, with the input it has not used yet.
struct Cursor {
    decoder: Decoder,
    /// Checked blob bytes from `decoder.input_pos()` on.
    input: Bytes,
    scratch: Vec<u8>,
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

/// What a mount needs to read layer contents.
#[derive(Clone)]
pub struct Readers {
    pub pieces: Arc<PieceCache>,
    pub stats: Arc<Stats>,
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
        LayerContent {
            index,
            source,
            readers,
            cursors: Mutex::new(Vec::new()),
            flights: Flights::default(),
            kept: None,
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
        self.kept.as_ref()?.local_file(entry).await
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    fn digest(&self) -> &Digest {
        self.source.digest()
    }

    /// Up to `len` bytes of `entry`'s content at `offset` (short only at its end).
    pub async fn read(&self, entry: &Entry, offset: u64, len: u64) -> Result<Bytes> {
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
                    stats: &self.readers.stats,
                    flights: &self.flights,
                    codec: map.codec,
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
        let mut cursor = self.cursor(map, start)?;
        let mut out = BytesMut::with_capacity((end - start) as usize);
        let result = loop {
            if cursor.decoder.output_pos() >= end {
                break Ok(());
            }
            if cursor.input.is_empty() {
                let pos = cursor.decoder.input_pos();
                if pos >= map.blob_size {
                    break Err(unreadable(
                        self.digest(),
                        "the layer ends before the file does",
                    ));
                }
                let k = pos / map.span_size;
                let span = self.span(map, k).await?;
                let skip = (pos - map.span(k).start) as usize;
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

    /// A cursor at or before `start` that is no worse than the nearest checkpoint.
    fn cursor(&self, map: &StreamMap, start: u64) -> Result<Cursor> {
        let point = map.checkpoint_before(start);
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        let best = cursors
            .iter()
            .enumerate()
            .filter(|(_, c)| (point.out..=start).contains(&c.decoder.output_pos()))
            .max_by_key(|(_, c)| c.decoder.output_pos())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(cursors.swap_remove(i));
        }
        drop(cursors);
        Stats::add(&self.readers.stats.content_decodes, 1);
        let decoder = Decoder::at(map.codec, point).map_err(|e| unreadable(self.digest(), e))?;
        Ok(Cursor {
            decoder,
            input: Bytes::new(),
            scratch: vec![0; SCRATCH],
        })
    }

    fn keep_cursor(&self, cursor: Cursor) {
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        if cursors.len() >= CURSORS {
            // Drop the one furthest behind: the others are likelier to be continued.
            if let Some(i) = (0..cursors.len()).min_by_key(|&i| cursors[i].decoder.output_pos()) {
                cursors.swap_remove(i);
            }
        }
        cursors.push(cursor);
    }

    /// Blob bytes `start..end` of an uncompressed layer, from checked spans.
    async fn blob_range(&self, map: &StreamMap, start: u64, end: u64) -> Result<Bytes> {
        let (first, last) = (start / map.span_size, (end - 1) / map.span_size);
        let mut out = BytesMut::new();
        for k in first..=last {
            let span = self.span(map, k).await?;
            let range = map.span(k);
            let from = (start.max(range.start) - range.start) as usize;
            let to = ((end.min(range.end) - range.start) as usize).min(span.len());
            let Some(piece) = span.get(from..to) else {
                return Err(unreadable(
                    self.digest(),
                    "a file beyond the end of the layer",
                ));
            };
            if first == last {
                return Ok(span.slice(from..to));
            }
            out.extend_from_slice(piece);
        }
        Ok(out.freeze())
    }

    /// Span `k` of the blob, checked against its recorded digest.
    async fn span(&self, map: &StreamMap, k: u64) -> Result<Bytes> {
        let expected = *map
            .spans
            .get(k as usize)
            .ok_or_else(|| unreadable(self.digest(), "read beyond the indexed blob"))?;
        let key = (self.digest().clone(), k);
        self.readers
            .pieces
            .get(&key, || async {
                let range = map.span(k);
                let bytes = self
                    .source
                    .read(range.start, range.end - range.start)
                    .await?;
                Stats::add(
                    &self.readers.stats.content_fetched_bytes,
                    bytes.len() as u64,
                );
                if sha256(&bytes) != expected {
                    self.source.distrust();
                    return Err(unreadable(
                        self.digest(),
                        format!(
                            "span {k} differs from what was verified when the layer was indexed"
                        ),
                    ));
                }
                Ok(bytes)
            })
            .await
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(bytes).into()
}
