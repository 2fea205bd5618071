//! A file's bytes from a TOC layer (eStargz, zstd:chunked): the chunks a read touches
//! are fetched by their own blob ranges (never the cache blocks around them, never a
//! stream to the layer's end), decoded on the blocking pool, and checked against their
//! chunk digests before a byte of them is returned. Checked chunks are kept in the
//! piece cache, so a file read in small pieces fetches and decodes each chunk once.
//!
//! A file fetched to its end brings along, in the same request, the files that follow
//! it in the blob (up to [`NEIGHBOURS`] in all): writers put a directory's files next
//! to each other, and a program starting up opens many of them one after another, each
//! a round trip otherwise (a Python start: 104 requests, about 30 with this). Their
//! compressed bytes wait in a cache of their own and are decoded and checked only when
//! read (ARCHITECTURE.md, "A file inside an image").

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
/// Compressed bytes a request that reaches a file's end may take in all, counted from
/// its first chunk, with the chunks of the next files in the blob.
pub const NEIGHBOURS: u64 = 512 << 10;
/// Decoder output buffer.
const SCRATCH: usize = 128 << 10;
/// Piece cache keys of decoded chunks: the chunk's index with this bit set (spans of
/// plain layers use the plain index).
pub const CHUNK_KEY: u64 = 1 << 63;
/// Piece cache keys of chunks fetched along with another file's, still compressed.
const AHEAD_KEY: u64 = CHUNK_KEY | 1 << 62;

/// Reads files of one TOC layer.
pub struct ChunkReader<'a> {
    pub layer: &'a Digest,
    pub source: &'a dyn BlobSource,
    /// Checked pieces of layers (content.rs's piece cache).
    pub pieces: &'a BlockCache,
    /// Chunks fetched along with another file's, still compressed: beside the decoded
    /// pieces, so that neither pushes the other out.
    pub ahead: &'a BlockCache,
    pub stats: &'a Stats,
    pub codec: Codec,
    /// The layer's chunks being fetched right now.
    pub flights: &'a Flights,
    /// All the layer's chunks, by index, for fetching a file's neighbours along;
    /// empty: none.
    pub layer_chunks: &'a [Chunk],
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
                let index = file.first + i as u32;
                self.flights.wait(index).await;
                if let Some(fetched) = self.pieces.peek(&self.key(file, i)) {
                    return Ok(fetched); // by the run it waited for
                }
                match self.ahead.peek(&ahead_key(self.layer, index)) {
                    Some(compressed) => self.decode_ahead(chunk, index, compressed).await,
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

    /// Whether chunk `i` is cached (decoded or not) or being fetched.
    fn has(&self, file: &FileChunks<'_>, i: usize) -> bool {
        self.has_index(file.first + i as u32)
    }

    fn has_index(&self, index: u32) -> bool {
        let decoded = (self.layer.clone(), CHUNK_KEY | u64::from(index));
        self.pieces.contains(&decoded)
            || self.ahead.contains(&ahead_key(self.layer, index))
            || self.flights.holds(index)
    }

    /// The chunks of the files after `file` in the layer fetched along with its run
    /// (which started at blob byte `start`, ends at `end` and reaches the file's last
    /// chunk): the next ones by index as long as each starts within what is fetched or
    /// just after it, none is cached or being fetched, and all end within [`NEIGHBOURS`]
    /// of `start`. Their indexes follow the file's last chunk's.
    fn neighbours(&self, file: &FileChunks<'_>, start: u64, mut end: u64) -> (Vec<Chunk>, u64) {
        let next = file.first as usize + file.chunks.len();
        let mut ahead = Vec::new();
        for (index, c) in self.layer_chunks.iter().enumerate().skip(next) {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            let near = (start..=end.saturating_add(MAX_GAP)).contains(&c.compressed.start);
            let ends = fetch_end(c);
            let fits = ends.saturating_sub(start) <= NEIGHBOURS && c.size <= MAX_CACHED_CHUNK;
            if !(c.hole || near && fits) || self.has_index(index) {
                break;
            }
            if !c.hole {
                end = end.max(ends);
            }
            ahead.push(c.clone());
        }
        (ahead, end)
    }

    /// Chunk `index`, fetched along with another file's run and kept compressed,
    /// decoded and checked now that it is read.
    async fn decode_ahead(&self, chunk: &Chunk, index: u32, compressed: Bytes) -> Result<Bytes> {
        Stats::add(&self.stats.content_decodes, 1);
        let (codec, c) = (self.codec, chunk.clone());
        let decoded = tokio::task::spawn_blocking(move || decode_whole(codec, &c, &compressed))
            .await
            .map_err(|e| Error::Unavailable(format!("decoder task failed: {e}")))?;
        self.ahead.remove(&ahead_key(self.layer, index));
        let bytes = decoded.map_err(|e| self.bad(chunk, e))?;
        Stats::add(&self.stats.read_ahead_used, 1);
        Ok(bytes)
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
        let members: Vec<Chunk> = run.iter().map(|&k| file.chunks[k].clone()).collect();
        let start = members[0].compressed.start;
        let own_end = members.last().map_or(start, fetch_end);
        let to_file_end = last + 1 == file.chunks.len() && (i == 0 || self.has(file, i - 1));
        let (ahead, end) = match to_file_end {
            true => self.neighbours(file, start, own_end),
            false => (Vec::new(), own_end),
        };
        let indexes = file.first + first as u32..file.first + (last + 1 + ahead.len()) as u32;
        let _held = self.flights.hold(indexes);
        let (own, along) = (own_end - start, ahead.len());
        tracing::debug!(layer = %self.layer, start, end, own, along, "fetching a run of chunks");
        let input = self.source.fetch_range(start, end - start).await?;
        Stats::add(&self.stats.content_fetched_bytes, end - start);
        Stats::add(&self.stats.read_ahead_bytes, end - own_end);
        self.keep_ahead(file.first + last as u32 + 1, &ahead, &input, start);
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

    /// Keeps the compressed bytes of `ahead` (chunks from index `first` on, in `input`,
    /// fetched from blob byte `start`) until they are read.
    fn keep_ahead(&self, first: u32, ahead: &[Chunk], input: &Bytes, start: u64) {
        for (index, c) in (first..).zip(ahead).filter(|(_, c)| !c.hole) {
            if let Some(at) = place_in(c, start, input) {
                self.ahead
                    .insert(ahead_key(self.layer, index), input.slice(at));
            }
        }
    }

    /// The TOC was checked: bytes that do not decode, or decode to something else, are
    /// wrong bytes from the registry or a mirror.
    fn bad(&self, chunk: &Chunk, e: String) -> Error {
        self.source.distrust();
        // What was fetched with it may be as wrong.
        self.pieces.forget(self.layer);
        self.ahead.forget(self.layer);
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

/// The piece cache's key of chunk `index` of `layer` kept compressed.
fn ahead_key(layer: &Digest, index: u32) -> BlockKey {
    (layer.clone(), AHEAD_KEY | u64::from(index))
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
    chunks
        .iter()
        .map(|c| match place_in(c, start, input) {
            Some(at) => decode_whole(codec, c, &input[at]),
            None => Err("the range fetched is short".into()),
        })
        .collect()
}

/// Where chunk `c`'s compressed bytes lie in `input`, bytes fetched from blob byte
/// `start`; `None` if they are not all in it.
fn place_in(c: &Chunk, start: u64, input: &[u8]) -> Option<std::ops::Range<usize>> {
    let from = usize::try_from(c.compressed.start.checked_sub(start)?).ok()?;
    let to = usize::try_from(fetch_end(c).checked_sub(start)?).ok()?;
    (from <= to && to <= input.len()).then_some(from..to)
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
