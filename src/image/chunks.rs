//! A file's bytes from a TOC layer (eStargz, zstd:chunked): the chunks a read touches
//! are fetched by their own blob ranges (never the cache blocks around them, never a
//! stream to the layer's end), decoded on the blocking pool, and checked against their
//! chunk digests before a byte of them is returned. Checked chunks are kept in the
//! piece cache, so a file read in small pieces fetches and decodes each chunk once.

use bytes::{Bytes, BytesMut};
use sha2::Digest as _;

use super::codec::{Checkpoint, Codec, Decoder};
use super::flights::Flights;
use super::index::{Chunk, unreadable};
use super::source::BlobSource;
use crate::cache::BlockCache;
use crate::cache::blocks::BlockKey;
use crate::registry::{Digest, Error, Result};
use crate::stats::Stats;

/// Chunks up to this size are decoded whole and kept in the piece cache; larger ones
/// (writers cut files into chunks of 4 MiB or less) are decoded for each read, in
/// bounded memory.
const MAX_CACHED_CHUNK: u64 = 16 << 20;
/// Compressed bytes fetched at a time while decoding a chunk too large to cache.
const FETCH_PIECE: u64 = 1 << 20;
/// Compressed bytes a miss of a reader going through a file in order fetches at once:
/// the chunk it needs and the file's next ones, in one range request (podman cuts files
/// into chunks of tens of KiB: a request each would make a file a chain of round trips).
const READ_AHEAD: u64 = 1 << 20;
/// Compressed bytes between two chunks a run fetches along (a hole's frame of zeros,
/// a tar header): fetched with them rather than cutting the run in two.
const MAX_GAP: u64 = 16 << 10;
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
    /// The layer's chunks being fetched right now.
    pub flights: &'a Flights,
}

impl ChunkReader<'_> {
    /// Bytes `start..end` of a file made of `chunks`; `first` is the index of its first
    /// chunk.
    pub async fn read(&self, first: u32, chunks: &[Chunk], start: u64, end: u64) -> Result<Bytes> {
        // Chunks are in file order and cover the file (toc/build.rs sees to it).
        let from = chunks.partition_point(|c| c.file_offset + c.size <= start);
        let to = from + chunks[from..].partition_point(|c| c.file_offset < end);
        let file = FileChunks {
            first,
            chunks,
            touched_end: to,
        };
        let mut out = BytesMut::new();
        for (i, c) in chunks.iter().enumerate().take(to).skip(from) {
            let lo = start.max(c.file_offset) - c.file_offset;
            let hi = end.min(c.file_offset + c.size) - c.file_offset;
            let piece = self.piece(&file, i, lo, hi).await?;
            if to - from == 1 {
                return Ok(piece);
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    /// Bytes `from..to` of chunk `i` of `file`, out of the whole chunk, checked.
    async fn piece(&self, file: &FileChunks<'_>, i: usize, from: u64, to: u64) -> Result<Bytes> {
        let chunk = &file.chunks[i];
        if chunk.size > MAX_CACHED_CHUNK {
            return self.decode(chunk, from, to).await;
        }
        let whole = self
            .pieces
            .get(&self.key(file, i), || async {
                if chunk.hole {
                    return self.decode(chunk, 0, chunk.size).await;
                }
                self.flights.wait(file.first + i as u32).await;
                match self.pieces.peek(&self.key(file, i)) {
                    Some(fetched) => Ok(fetched), // by the run it waited for
                    None => self.fetch_run(file, i).await,
                }
            })
            .await?;
        let to = (to as usize).min(whole.len());
        Ok(whole.slice((from as usize).min(to)..to))
    }

    fn key(&self, file: &FileChunks<'_>, i: usize) -> BlockKey {
        let index = u64::from(file.first) + i as u64;
        (self.layer.clone(), CHUNK_KEY | index)
    }

    /// Whether chunk `i` is cached or being fetched.
    fn has(&self, file: &FileChunks<'_>, i: usize) -> bool {
        self.pieces.contains(&self.key(file, i)) || self.flights.holds(file.first + i as u32)
    }

    /// The chunks fetched with chunk `i`: the next ones the read touches and, for a
    /// reader going through the file in order, more up to [`READ_AHEAD`]; as long as
    /// each follows the last in the blob (holes, which need no bytes, are passed over
    /// with the few bytes of their frames) and is neither cached nor being fetched.
    fn run(&self, file: &FileChunks<'_>, i: usize) -> Vec<usize> {
        let in_order = i == 0 || self.has(file, i - 1);
        let mut end = fetch_end(&file.chunks[i]);
        let mut run = vec![i];
        for (j, c) in file.chunks.iter().enumerate().skip(i + 1) {
            let bytes = end - file.chunks[i].compressed.start;
            let wanted = j < file.touched_end || (in_order && bytes < READ_AHEAD);
            if !wanted || self.has(file, j) {
                break;
            }
            if c.hole {
                continue;
            }
            let follows = (end..=end.saturating_add(MAX_GAP)).contains(&c.compressed.start);
            if !follows || c.size > MAX_CACHED_CHUNK {
                break;
            }
            end = fetch_end(c);
            run.push(j);
        }
        run
    }

    /// Chunk `i` whole and checked, fetched by one range request with the rest of its
    /// run (see [`Self::run`]), which goes to the piece cache.
    async fn fetch_run(&self, file: &FileChunks<'_>, i: usize) -> Result<Bytes> {
        let run = self.run(file, i);
        let (first, last) = (run[0], run[run.len() - 1]);
        let indexes = file.first + first as u32..file.first + last as u32 + 1;
        let _held = self.flights.hold(indexes);
        let members: Vec<Chunk> = run.iter().map(|&k| file.chunks[k].clone()).collect();
        let start = members[0].compressed.start;
        let end = members.last().map_or(start, fetch_end);
        let input = self.source.fetch_range(start, end - start).await?;
        Stats::add(&self.stats.content_fetched_bytes, end - start);
        Stats::add(&self.stats.content_decodes, 1);
        let codec = self.codec;
        let decoded =
            tokio::task::spawn_blocking(move || decode_run(codec, &members, &input, start))
                .await
                .map_err(|e| Error::Unavailable(format!("decoder task failed: {e}")))?;
        let mut wanted = Err("nothing decoded".to_owned());
        for (&k, result) in run.iter().zip(decoded) {
            match (k == i, result) {
                (true, result) => wanted = result,
                // Kept for the reads to come; one that failed fails its own read.
                (false, Ok(bytes)) => self.pieces.insert(self.key(file, k), bytes),
                (false, Err(_)) => {}
            }
        }
        wanted.map_err(|e| self.bad(&file.chunks[i], e))
    }

    /// The TOC was checked: bytes that do not decode, or decode to something else, are
    /// wrong bytes from the registry or a mirror.
    fn bad(&self, chunk: &Chunk, e: String) -> Error {
        self.source.distrust();
        let at = chunk.compressed.start;
        unreadable(self.layer, format!("chunk at byte {at}: {e}"))
    }

    /// Decodes a whole chunk (a hole, or one too large to cache: fetched a piece at a
    /// time), checks it, and returns bytes `from..to` of it.
    async fn decode(&self, chunk: &Chunk, from: u64, to: u64) -> Result<Bytes> {
        let bad = |e: String| self.bad(chunk, e);
        if !chunk.hole {
            Stats::add(&self.stats.content_decodes, 1);
        }
        let mut state = Decoding::new(self.codec, chunk, from, to).map_err(bad)?;
        if chunk.hole {
            state = blocking(move || {
                let r = state.feed(&[]);
                (state, r)
            })
            .await?
            .map_err(bad)?;
        }
        let end = fetch_end(chunk);
        let mut pos = chunk.compressed.start;
        while !state.done() {
            if pos >= end {
                return Err(bad("compressed data ends before the chunk does".into()));
            }
            let n = FETCH_PIECE.min(end - pos);
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

/// The chunks of one file, and how far the read at hand reaches into them.
struct FileChunks<'a> {
    /// The index of its first chunk in the layer's chunk map.
    first: u32,
    chunks: &'a [Chunk],
    /// One past the last chunk the read touches.
    touched_end: usize,
}

/// Where fetching a chunk stops: its compressed range, but no more than its decoded
/// bytes can take (incompressible data grows a little in gzip and zstd; more than this
/// is not a chunk, whatever the TOC's offsets leave room for).
fn fetch_end(chunk: &Chunk) -> u64 {
    let decoded = chunk.inner_offset.saturating_add(chunk.size);
    let limit = decoded
        .saturating_add(decoded / 16)
        .saturating_add(64 << 10);
    chunk
        .compressed
        .end
        .min(chunk.compressed.start.saturating_add(limit))
}

/// Each of `chunks` (following each other in the blob from `start`) decoded whole out of
/// `input`, their compressed bytes, and checked.
fn decode_run(
    codec: Codec,
    chunks: &[Chunk],
    input: &[u8],
    start: u64,
) -> Vec<std::result::Result<Bytes, String>> {
    let compressed = |c: &Chunk| {
        let from = usize::try_from(c.compressed.start.checked_sub(start)?).ok()?;
        let to = usize::try_from(fetch_end(c).checked_sub(start)?).ok()?;
        input.get(from..to)
    };
    chunks
        .iter()
        .map(|c| match compressed(c) {
            Some(bytes) => decode_whole(codec, c, bytes),
            None => Err("the range fetched is short".into()),
        })
        .collect()
}

/// A chunk decoded whole from `input` (its compressed bytes) and checked.
fn decode_whole(codec: Codec, chunk: &Chunk, input: &[u8]) -> std::result::Result<Bytes, String> {
    let mut state = Decoding::new(codec, chunk, 0, chunk.size)?;
    state.feed(input)?;
    if !state.done() {
        return Err("compressed data ends before the chunk does".into());
    }
    if !state.matches(chunk) {
        return Err("content does not match its chunk digest".into());
    }
    Ok(state.out.freeze())
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

    /// `data` cut into chunks of `size`, appended to `blob` one gzip member each.
    fn gzip_chunks(blob: &mut Vec<u8>, data: &[u8], size: usize) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        for (i, piece) in data.chunks(size).enumerate() {
            let start = blob.len() as u64;
            blob.extend(gzip(piece, usize::MAX));
            chunks.push(Chunk {
                compressed: start..blob.len() as u64,
                inner_offset: 0,
                file_offset: (i * size) as u64,
                size: piece.len() as u64,
                digest: Some(sha(piece)),
                hole: false,
            });
        }
        chunks
    }

    /// A blob and what reading it needs.
    struct Layer {
        source: MemSource,
        pieces: BlockCache,
        stats: Stats,
        flights: Flights,
    }

    impl Layer {
        fn new(blob: Vec<u8>) -> Layer {
            let stats = Arc::new(Stats::default());
            Layer {
                source: MemSource::new(blob),
                pieces: BlockCache::new(1 << 20, 64 << 20, stats),
                stats: Stats::default(),
                flights: Flights::default(),
            }
        }

        fn reader(&self, codec: Codec) -> ChunkReader<'_> {
            ChunkReader {
                layer: &self.source.digest,
                source: &self.source,
                pieces: &self.pieces,
                stats: &self.stats,
                codec,
                flights: &self.flights,
            }
        }

        /// `(offset, len)` of each range fetched since the last call.
        fn fetched(&self) -> Vec<(u64, u64)> {
            std::mem::take(&mut *self.source.fetched.lock().expect("lock"))
        }
    }

    fn span(chunks: &[Chunk]) -> (u64, u64) {
        let (a, b) = (
            chunks[0].compressed.start,
            chunks[chunks.len() - 1].compressed.end,
        );
        (a, b - a)
    }

    /// As eStargz lays a layer out: a member of tar headers, a file of two chunks (one
    /// member each), then one member holding two small files between headers.
    fn estargz_like() -> (Vec<u8>, Vec<Chunk>, Vec<u8>, [Vec<u8>; 2]) {
        let big = sample(300_000);
        let small = [b"tiny".to_vec(), sample(999)];
        let mut blob = gzip(&[7u8; 512], usize::MAX);
        let mut chunks = gzip_chunks(&mut blob, &big, 200_000);
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
        let (blob, chunks, big, small) = estargz_like();
        let layer = Layer::new(blob);
        let reader = layer.reader(Codec::Gzip);
        let got = reader.read(0, &chunks[..2], 199_990, 200_010).await;
        assert_eq!(&got.expect("read")[..], &big[199_990..200_010]);
        assert_eq!(
            layer.fetched(),
            [span(&chunks[..2])],
            "both chunks, one range"
        );
        // Read again: the checked chunks are cached.
        let again = reader.read(0, &chunks[..2], 0, 300_000).await;
        assert_eq!(&again.expect("read")[..], &big[..]);
        assert_eq!(layer.fetched(), []);
        assert_eq!(*layer.source.block_reads.lock().expect("lock"), 0);
        // Small files packed in one member, found by their inner offsets.
        for (i, s) in small.iter().enumerate() {
            let got = reader.read(2 + i as u32, &chunks[2 + i..3 + i], 0, s.len() as u64);
            assert_eq!(&got.await.expect("small")[..], &s[..]);
        }
    }

    #[tokio::test]
    async fn a_file_read_in_order_fetches_its_next_chunks_along() {
        // Twelve chunks of 20 KB, one member each, as podman cuts files.
        let data = sample(240_000);
        let mut blob = vec![0u8; 100];
        let chunks = gzip_chunks(&mut blob, &data, 20_000);
        let layer = Layer::new(blob);
        let reader = layer.reader(Codec::Gzip);
        // A read in the middle fetches what it touches.
        let got = reader.read(0, &chunks, 150_000, 150_100).await;
        assert_eq!(&got.expect("read")[..], &data[150_000..150_100]);
        assert_eq!(layer.fetched(), [span(&chunks[7..8])]);
        // A read from the start fetches the chunks that follow along, in one request,
        // up to the one cached.
        let got = reader.read(0, &chunks, 0, 10).await;
        assert_eq!(&got.expect("read")[..], &data[..10]);
        assert_eq!(layer.fetched(), [span(&chunks[..7])]);
        let all = reader.read(0, &chunks, 0, 240_000).await;
        assert_eq!(&all.expect("read")[..], &data[..]);
        assert_eq!(layer.fetched(), [span(&chunks[8..])]);
    }

    #[tokio::test]
    async fn holes_are_zeros_and_wrong_bytes_are_refused() {
        let (mut blob, chunks, _, _) = estargz_like();
        let hole = Chunk {
            compressed: 0..0,
            inner_offset: 0,
            file_offset: 0,
            size: 70_000,
            digest: Some(sha(&[0u8; 70_000])),
            hole: true,
        };
        let layer = Layer::new(blob.clone());
        let reader = layer.reader(Codec::Gzip);
        let zeros = reader.read(9, std::slice::from_ref(&hole), 5, 69_000).await;
        assert!(zeros.expect("a hole").iter().all(|&b| b == 0));
        assert_eq!(layer.fetched(), []);
        let lying = Chunk {
            digest: Some([9; 32]),
            ..hole
        };
        assert!(reader.read(10, &[lying], 0, 10).await.is_err());

        // A byte of the first chunk's deflate data flipped: refused, naming the chunk.
        let at = (chunks[0].compressed.start + chunks[0].compressed.end) / 2;
        blob[at as usize] ^= 0x10;
        let layer = Layer::new(blob);
        let err = layer.reader(Codec::Gzip).read(0, &chunks[..1], 0, 10).await;
        let err = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("chunk at byte"), "{err}");
        assert!(
            *layer.source.distrusted.lock().expect("lock"),
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
        let layer = Layer::new(blob);
        let got = layer
            .reader(Codec::Zstd)
            .read(0, &[chunk], 100, 49_000)
            .await;
        assert_eq!(&got.expect("read")[..], &data[100..49_000]);
    }

    #[tokio::test]
    async fn a_run_passes_over_holes() {
        // data, a run of zeros (its own small frame), data: as podman writes a binary.
        let (a, b) = (sample(30_000), sample(40_000));
        let mut blob = vec![0u8; 10];
        let mut chunks = gzip_chunks(&mut blob, &a, 30_000);
        blob.extend(gzip(&[0u8; 50_000], usize::MAX));
        chunks.push(Chunk {
            compressed: 0..0,
            inner_offset: 0,
            file_offset: 30_000,
            size: 50_000,
            digest: Some(sha(&[0u8; 50_000])),
            hole: true,
        });
        let mut rest = gzip_chunks(&mut blob, &b, 40_000);
        rest[0].file_offset = 80_000;
        chunks.extend(rest);
        let layer = Layer::new(blob);
        let reader = layer.reader(Codec::Gzip);
        let all = reader.read(0, &chunks, 0, 120_000).await.expect("read");
        assert_eq!(&all[..30_000], &a[..]);
        assert!(all[30_000..80_000].iter().all(|&z| z == 0));
        assert_eq!(&all[80_000..], &b[..]);
        let (from, to) = (chunks[0].compressed.start, chunks[2].compressed.end);
        assert_eq!(
            layer.fetched(),
            [(from, to - from)],
            "one range, the hole's frame too"
        );
    }
}
