//! Tests of image/chunks.rs: reads of TOC layer files from a blob in memory, what they
//! fetch, and wrong bytes refused.

use std::sync::Arc;

use sha2::Digest as _;

use super::chunks::{ChunkReader, NEIGHBOURS};
use super::codec::Codec;
use super::codec::gzip::tests::{gzip, sample};
use super::flights::Flights;
use super::index::Chunk;
use super::source::mem::MemSource;
use crate::cache::BlockCache;
use crate::stats::Stats;

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
            ahead: &self.pieces,
            stats: &self.stats,
            codec,
            flights: &self.flights,
            layer_chunks: &[],
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
async fn a_file_read_to_its_end_brings_the_next_files_along() {
    // Forty small files of 30 KB (incompressible), one member each, as a directory
    // of Python modules lies in an eStargz layer.
    let files: Vec<Vec<u8>> = (0..40).map(|i| sample(30_000 + i)).collect();
    let mut blob = vec![0u8; 64];
    let mut chunks = Vec::new();
    for f in &files {
        chunks.extend(gzip_chunks(&mut blob, f, f.len()));
    }
    let layer = Layer::new(blob);
    let reader = ChunkReader {
        layer_chunks: &chunks,
        ..layer.reader(Codec::Gzip)
    };
    let read = |i: usize| reader.read(i as u32, &chunks[i..=i], 0, files[i].len() as u64);
    assert_eq!(&read(0).await.expect("file 0")[..], &files[0][..]);
    let fetched = layer.fetched();
    assert_eq!(fetched.len(), 1, "one request");
    let (from, len) = fetched[0];
    let along = chunks
        .iter()
        .filter(|c| c.compressed.end <= from + len)
        .count();
    assert!(
        (2..40).contains(&along) && len <= NEIGHBOURS,
        "{along} files in {len} bytes"
    );
    // The files brought along are read without a request, each checked.
    for (i, file) in files.iter().enumerate().take(along).skip(1) {
        assert_eq!(&read(i).await.expect("a file along")[..], &file[..]);
    }
    assert_eq!(layer.fetched(), []);
    let used = layer
        .stats
        .read_ahead_used
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(used, (along - 1) as u64);
    // A read in the middle of a file is no reason to fetch its neighbours.
    let last = chunks.len() - 1;
    let got = reader.read(last as u32, &chunks[last..], 100, 200).await;
    assert_eq!(&got.expect("middle")[..], &files[last][100..200]);
    assert_eq!(layer.fetched(), [span(&chunks[last..])]);
}

#[tokio::test]
async fn a_wrong_file_brought_along_is_refused_when_read() {
    let files: Vec<Vec<u8>> = (0..3).map(|i| sample(10_000 + i)).collect();
    let mut blob = vec![0u8; 64];
    let mut chunks = Vec::new();
    for f in &files {
        chunks.extend(gzip_chunks(&mut blob, f, f.len()));
    }
    chunks[1].digest = Some([3; 32]); // the TOC says otherwise
    let layer = Layer::new(blob);
    let reader = ChunkReader {
        layer_chunks: &chunks,
        ..layer.reader(Codec::Gzip)
    };
    let first = reader.read(0, &chunks[..1], 0, 10_000).await;
    assert_eq!(&first.expect("file 0")[..], &files[0][..]);
    assert!(reader.read(1, &chunks[1..2], 0, 10).await.is_err());
    let third = reader.read(2, &chunks[2..3], 0, 10_002).await;
    assert_eq!(&third.expect("file 2")[..], &files[2][..]);
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
