//! A file's bytes from a TOC layer (eStargz, zstd:chunked): the chunks a read touches
//! are fetched by their own blob ranges (never the cache blocks around them, never a
//! stream to the layer's end), decoded on the blocking pool, and checked against their
//! chunk digests before a byte of them is returned. Checked chunks are kept in the
//! piece cache, so a file read in small pieces fetches and decodes each chunk once.

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use sha2::Digest as _;

use super::codec::{Checkpoint, Codec, Decoder};
use super::content::Readers;
use super::index::{Chunk, unreadable};
use super::source::BlobSource;
use crate::registry::{Digest, Error, Result};
use crate::stats::Stats;

/// Chunks up to this size are decoded whole and kept in the piece cache; larger ones
/// (writers cut files into chunks of 4 MiB or less) are decoded for each read, in
/// bounded memory.
const MAX_CACHED_CHUNK: u64 = 16 << 20;
/// Compressed bytes fetched at a time while decoding a chunk too large to cache.
const FETCH_PIECE: u64 = 1 << 20;
/// Decoder output buffer.
const SCRATCH: usize = 128 << 10;
/// Piece cache keys of decoded chunks: the chunk's index with this bit set (spans of
/// plain layers use the plain index).
pub const CHUNK_KEY: u64 = 1 << 63;

/// Reads files of one TOC layer.
pub struct ChunkReader<'a> {
    pub layer: &'a Digest,
    pub source: &'a dyn BlobSource,
    pub readers: &'a Readers,
    pub codec: Codec,
}

impl ChunkReader<'_> {
    /// Bytes `start..end` of a file made of `chunks`; `first` is the index of its first
    /// chunk. The chunks the range touches are fetched at once.
    pub async fn read(&self, first: u32, chunks: &[Chunk], start: u64, end: u64) -> Result<Bytes> {
        let touched = chunks.iter().zip(first..).filter_map(|(chunk, index)| {
            let c_end = chunk.file_offset + chunk.size;
            (c_end > start && chunk.file_offset < end).then(|| {
                let from = start.max(chunk.file_offset) - chunk.file_offset;
                (index, chunk, from, end.min(c_end) - chunk.file_offset)
            })
        });
        let mut pieces =
            try_join_all(touched.map(|(i, chunk, from, to)| self.piece(i, chunk, from, to)))
                .await?;
        if pieces.len() == 1 {
            return Ok(pieces.remove(0));
        }
        let mut out = BytesMut::with_capacity((end - start) as usize);
        for piece in pieces {
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    /// Bytes `from..to` of chunk `index`, out of the whole chunk, checked.
    async fn piece(&self, index: u32, chunk: &Chunk, from: u64, to: u64) -> Result<Bytes> {
        if chunk.size > MAX_CACHED_CHUNK {
            return self.decode(chunk, from, to).await;
        }
        let key = (self.layer.clone(), CHUNK_KEY | u64::from(index));
        let whole = self
            .readers
            .pieces
            .get(&key, || self.decode(chunk, 0, chunk.size))
            .await?;
        let to = (to as usize).min(whole.len());
        Ok(whole.slice((from as usize).min(to)..to))
    }

    /// Decodes a whole chunk, checks it, and returns bytes `from..to` of it.
    async fn decode(&self, chunk: &Chunk, from: u64, to: u64) -> Result<Bytes> {
        let bad = |e: String| {
            let at = chunk.compressed.start;
            unreadable(self.layer, format!("chunk at byte {at}: {e}"))
        };
        let mut state = Decoding::new(self.codec, chunk, from, to).map_err(bad)?;
        let end = chunk.compressed.end.min(state.input_limit(chunk));
        let piece = if chunk.size > MAX_CACHED_CHUNK {
            FETCH_PIECE
        } else {
            u64::MAX
        };
        if chunk.hole {
            state = blocking(move || {
                let r = state.feed(&[]);
                (state, r)
            })
            .await?
            .map_err(bad)?;
        }
        let mut pos = chunk.compressed.start;
        while !state.done() {
            if pos >= end {
                return Err(bad("compressed data ends before the chunk does".into()));
            }
            let n = piece.min(end - pos);
            let input = self.source.fetch_range(pos, n).await?;
            Stats::add(&self.readers.stats.content_fetched_bytes, n);
            pos += n;
            state = blocking(move || {
                let r = state.feed(&input);
                (state, r)
            })
            .await?
            .map_err(bad)?;
        }
        if !state.matches(chunk) {
            self.source.distrust();
            return Err(bad("content does not match its chunk digest".into()));
        }
        Ok(state.out.freeze())
    }
}

/// Runs `f` on the blocking pool; the second half of its answer is its result.
async fn blocking<S: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> (S, std::result::Result<(), E>) + Send + 'static,
) -> Result<std::result::Result<S, E>> {
    let (state, r) = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable(format!("decoder task failed: {e}")))?;
    Ok(r.map(|()| state))
}

/// One chunk being decoded: the bytes it holds are `skip .. skip + want` of what its
/// member (or frame) decodes to; all are hashed, `from..to` of them kept.
struct Decoding {
    /// `None` for a hole: its bytes are zeros.
    decoder: Option<Decoder>,
    hasher: sha2::Sha256,
    scratch: Vec<u8>,
    skip: u64,
    want: u64,
    /// Chunk bytes hashed so far.
    got: u64,
    from: u64,
    to: u64,
    out: BytesMut,
}

impl Decoding {
    fn new(codec: Codec, chunk: &Chunk, from: u64, to: u64) -> std::result::Result<Self, String> {
        let decoder = if chunk.hole {
            None
        } else {
            let start = Checkpoint {
                in_bit: chunk.compressed.start * 8,
                out: 0,
                window: None,
            };
            Some(Decoder::at(codec, &start)?)
        };
        Ok(Decoding {
            decoder,
            hasher: sha2::Sha256::new(),
            scratch: vec![0; SCRATCH],
            skip: chunk.inner_offset,
            want: chunk.size,
            got: 0,
            from,
            to,
            out: BytesMut::with_capacity((to - from) as usize),
        })
    }

    /// The most compressed bytes the chunk can take: incompressible data grows a little
    /// in gzip and zstd; more than this is not a chunk.
    fn input_limit(&self, chunk: &Chunk) -> u64 {
        let decoded = self.skip.saturating_add(self.want);
        let limit = decoded
            .saturating_add(decoded / 16)
            .saturating_add(64 << 10);
        chunk.compressed.start.saturating_add(limit)
    }

    fn done(&self) -> bool {
        self.got >= self.want
    }

    /// Decodes `input`, the next compressed bytes (a hole needs none).
    fn feed(&mut self, mut input: &[u8]) -> std::result::Result<(), String> {
        let Some(mut decoder) = self.decoder.take() else {
            while self.got < self.want {
                let n = (self.want - self.got).min(SCRATCH as u64) as usize;
                self.scratch[..n].fill(0);
                let at = self.got;
                self.take(at, n);
            }
            return Ok(());
        };
        while self.got < self.want {
            let before = decoder.output_pos();
            let step = decoder.decode(input, &mut self.scratch)?;
            input = &input[step.consumed..];
            // Output positions count from the member start; the chunk is skip.. of it.
            let made = step.produced as u64;
            let lo = self.skip.saturating_sub(before).min(made);
            let hi = (self.skip + self.want).saturating_sub(before).min(made);
            if lo < hi {
                let at = self.got;
                self.scratch.copy_within(lo as usize..hi as usize, 0);
                self.take(at, (hi - lo) as usize);
            }
            if step.produced == 0 && !step.boundary {
                if input.is_empty() {
                    break; // needs more input
                }
                if step.consumed == 0 {
                    return Err("the decoder makes no progress".into());
                }
            }
        }
        self.decoder = Some(decoder);
        Ok(())
    }

    /// Hashes `scratch[..n]`, chunk bytes from `at`, and keeps what `from..to` wants.
    fn take(&mut self, at: u64, n: usize) {
        let piece = &self.scratch[..n];
        self.hasher.update(piece);
        self.got = at + n as u64;
        let (a, b) = (self.from.max(at), self.to.min(self.got));
        if a < b {
            self.out
                .extend_from_slice(&piece[(a - at) as usize..(b - at) as usize]);
        }
    }

    /// Whether what was decoded is what the TOC says the chunk holds.
    fn matches(&self, chunk: &Chunk) -> bool {
        let digest: [u8; 32] = self.hasher.clone().finalize().into();
        match chunk.digest {
            Some(expected) => expected == digest,
            None => chunk.hole, // the TOC gives zeros no digest: they are what it says
        }
    }
}
