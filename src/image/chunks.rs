//! A file's bytes from a TOC layer (eStargz, zstd:chunked): the chunks a read touches
//! are fetched by their own blob ranges (never the cache blocks around them, never a
//! stream to the layer's end), decoded on the blocking pool, and checked against their
//! chunk digests before a byte of them is returned. Checked chunks are kept in the
//! piece cache, so a file read in small pieces fetches and decodes each chunk once.

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;
use sha2::Digest as _;

use super::codec::{Checkpoint, Codec, Decoder};
use super::index::{Chunk, unreadable};
use super::source::BlobSource;
use crate::cache::BlockCache;
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
    /// Checked pieces of layers (content.rs's piece cache).
    pub pieces: &'a BlockCache,
    pub stats: &'a Stats,
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
            .pieces
            .get(&key, || self.decode(chunk, 0, chunk.size))
            .await?;
        let to = (to as usize).min(whole.len());
        Ok(whole.slice((from as usize).min(to)..to))
    }

    /// Decodes a whole chunk, checks it, and returns bytes `from..to` of it.
    async fn decode(&self, chunk: &Chunk, from: u64, to: u64) -> Result<Bytes> {
        // The TOC was checked: bytes that do not decode, or decode to something else,
        // are wrong bytes from the registry or a mirror.
        let bad = |e: String| {
            self.source.distrust();
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
            Stats::add(&self.stats.content_fetched_bytes, n);
            pos += n;
            state = blocking(move || {
                let r = state.feed(&input);
                (state, r)
            })
            .await?
            .map_err(bad)?;
        }
        if !state.matches(chunk) {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::BlockCache;
    use crate::image::codec::gzip::tests::{gzip, sample};
    use crate::image::source::mem::MemSource;

    fn sha(bytes: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(bytes).into()
    }

    fn readers() -> (BlockCache, Stats) {
        let stats = Arc::new(Stats::default());
        (BlockCache::new(1 << 20, 64 << 20, stats), Stats::default())
    }

    /// A blob as eStargz lays it out: a member of tar headers, a file of two chunks
    /// (one member each), then one member holding two small files between headers.
    fn layer() -> (Vec<u8>, Vec<Chunk>, Vec<u8>, [Vec<u8>; 2]) {
        let big = sample(300_000);
        let small = [b"tiny".to_vec(), sample(999)];
        let mut blob = gzip(&[7u8; 512], usize::MAX);
        let mut chunks = Vec::new();
        for (i, piece) in big.chunks(200_000).enumerate() {
            let start = blob.len() as u64;
            blob.extend(gzip(piece, usize::MAX));
            chunks.push(Chunk {
                compressed: start..blob.len() as u64,
                inner_offset: 0,
                file_offset: i as u64 * 200_000,
                size: piece.len() as u64,
                digest: Some(sha(piece)),
                hole: false,
            });
        }
        let mut merged = vec![1u8; 512];
        let start = blob.len() as u64;
        for s in &small {
            chunks.push(Chunk {
                compressed: start..0, // set below
                inner_offset: merged.len() as u64,
                file_offset: 0,
                size: s.len() as u64,
                digest: Some(sha(s)),
                hole: false,
            });
            merged.extend_from_slice(s);
            merged.extend_from_slice(&[2u8; 512]);
        }
        blob.extend(gzip(&merged, usize::MAX));
        for c in &mut chunks[2..] {
            c.compressed.end = blob.len() as u64;
        }
        blob.extend(gzip(b"the TOC would be here", usize::MAX));
        (blob, chunks, big, small)
    }

    #[tokio::test]
    async fn a_read_fetches_the_chunks_it_touches_by_their_own_ranges() {
        let (blob, chunks, big, small) = layer();
        let source = MemSource::new(blob);
        let readers = readers();
        let reader = ChunkReader {
            layer: &source.digest.clone(),
            source: &source,
            pieces: &readers.0,
            stats: &readers.1,
            codec: Codec::Gzip,
        };
        let got = reader
            .read(0, &chunks[..2], 199_990, 200_010)
            .await
            .expect("read");
        assert_eq!(&got[..], &big[199_990..200_010]);
        let fetched = source.fetched.lock().expect("lock").clone();
        let ranges: Vec<(u64, u64)> = chunks[..2]
            .iter()
            .map(|c| (c.compressed.start, c.compressed.end - c.compressed.start))
            .collect();
        let mut sorted = fetched.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ranges, "each touched chunk, exactly its range");
        // Read again: the checked chunks are cached.
        let again = reader
            .read(0, &chunks[..2], 0, 300_000)
            .await
            .expect("read");
        assert_eq!(&again[..], &big[..]);
        assert_eq!(source.fetched.lock().expect("lock").len(), 2);
        assert_eq!(
            *source.block_reads.lock().expect("lock"),
            0,
            "no block reads"
        );
        // Small files packed in one member, found by their inner offsets.
        for (i, s) in small.iter().enumerate() {
            let got = reader.read(2 + i as u32, &chunks[2 + i..3 + i], 0, s.len() as u64);
            assert_eq!(&got.await.expect("small")[..], &s[..]);
        }
    }

    #[tokio::test]
    async fn holes_are_zeros_and_wrong_bytes_are_refused() {
        let (mut blob, chunks, _, _) = layer();
        let hole = Chunk {
            compressed: 0..0,
            inner_offset: 0,
            file_offset: 0,
            size: 70_000,
            digest: Some(sha(&[0u8; 70_000])),
            hole: true,
        };
        let readers = readers();
        let source = MemSource::new(blob.clone());
        let reader = ChunkReader {
            layer: &source.digest.clone(),
            source: &source,
            pieces: &readers.0,
            stats: &readers.1,
            codec: Codec::Gzip,
        };
        let zeros = reader.read(9, std::slice::from_ref(&hole), 5, 69_000).await;
        assert!(zeros.expect("a hole").iter().all(|&b| b == 0));
        assert!(source.fetched.lock().expect("lock").is_empty());
        let lying = Chunk {
            digest: Some([9; 32]),
            ..hole
        };
        assert!(reader.read(10, &[lying], 0, 10).await.is_err());

        // A byte of the first chunk's deflate data flipped: its digest catches it.
        let at = (chunks[0].compressed.start + chunks[0].compressed.end) / 2;
        blob[at as usize] ^= 0x10;
        let source = MemSource::new(blob);
        let reader = ChunkReader {
            layer: &source.digest.clone(),
            source: &source,
            pieces: &readers.0,
            stats: &readers.1,
            codec: Codec::Gzip,
        };
        let err = reader.read(0, &chunks[..1], 0, 10).await.err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("chunk at byte"), "{err}");
        assert!(
            *source.distrusted.lock().expect("lock"),
            "cached bytes dropped"
        );
    }

    #[tokio::test]
    async fn zstd_chunks_decode_the_same() {
        let data = sample(50_000);
        let mut blob = vec![0u8; 40];
        let start = blob.len() as u64;
        blob.extend(zstd::bulk::compress(&data, 3).expect("compress"));
        let chunk = Chunk {
            compressed: start..blob.len() as u64,
            inner_offset: 0,
            file_offset: 0,
            size: data.len() as u64,
            digest: Some(sha(&data)),
            hole: false,
        };
        blob.extend_from_slice(b"after");
        let readers = readers();
        let source = MemSource::new(blob);
        let reader = ChunkReader {
            layer: &source.digest.clone(),
            source: &source,
            pieces: &readers.0,
            stats: &readers.1,
            codec: Codec::Zstd,
        };
        let got = reader.read(0, &[chunk], 100, 49_000).await.expect("read");
        assert_eq!(&got[..], &data[100..49_000]);
    }
}
