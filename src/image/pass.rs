//! The index pass of a plain layer (tar, tar+gzip, tar+zstd): one streaming read of the
//! whole blob that decodes it, records every tar entry, takes a decoder checkpoint every
//! few MiB of output and a digest of every span of the blob, and checks the blob against
//! its digest at the end. Nothing of a layer is shown before its pass has succeeded, so
//! an index never describes bytes that were not verified.

use bytes::Bytes;
use tracing::warn;

use super::codec::{Checkpoint, Codec, Decoder};
use super::entry::{Entry, TarPlace};
use super::index::{
    Content, IndexSource, LayerIndex, MAX_ENTRIES, MAX_INDEX_BYTES, StreamMap, unreadable,
};
use super::soci::spans::SpanHasher;
use super::tar::{MAX_HELD as TAR_HELD, TarItem, TarParser};
use crate::registry::{Digest, Error, Result};

/// Blob bytes per span digest of tar and zstd layers (gzip layers have one span per
/// checkpoint, as SOCI defines them): what a read of a small file fetches at least.
pub const SPAN_SIZE: u64 = 1 << 20;
/// Uncompressed bytes between checkpoints, at least: a read decodes at most this much
/// before the bytes it wants. Larger for large blobs, so a layer has at most a few
/// hundred checkpoints (each holds a 32 KiB window for gzip).
const MIN_CHECKPOINT_SPACING: u64 = 4 << 20;
const MAX_CHECKPOINTS: u64 = 256;
/// A layer may expand to at most this many times its compressed size (beyond the
/// first GiB): deflate cannot exceed ~1032:1, so only a zstd bomb is stopped, early.
const MAX_EXPANSION: u64 = 2048;
const EXPANSION_FLOOR: u64 = 1 << 30;
/// Refused entries logged one by one per layer; the rest are counted.
const LOGGED_REFUSALS: usize = 20;
/// Decoder output buffer.
const OUT_BUF: usize = 256 << 10;

/// The memory a pass holds while it runs, counted in the memory budget (cache/limit.rs):
/// its decoder, output buffer and tar parser, and `pieces` stream pieces of
/// `piece` bytes (queued, being fed, and the one fetched next).
pub fn working_bytes(codec: Codec, pieces: u64, piece: u64) -> u64 {
    Decoder::working_bytes(codec) + OUT_BUF as u64 + TAR_HELD + pieces * piece
}

/// Uncompressed bytes between the checkpoints of a blob this large, at least.
pub fn checkpoint_spacing(blob_size: u64) -> u64 {
    MIN_CHECKPOINT_SPACING.max(blob_size.saturating_mul(3) / MAX_CHECKPOINTS)
}

/// Collects entries (and where their headers are) within the limits.
struct Entries<'a> {
    digest: &'a Digest,
    list: Vec<Entry>,
    places: Vec<TarPlace>,
    bytes: usize,
    refused: usize,
    over: Option<String>,
}

impl Entries<'_> {
    fn add(&mut self, item: TarItem) {
        match item {
            TarItem::Entry(entry, place) => {
                self.bytes += entry.heap_bytes() + place.heap_bytes();
                self.list.push(entry);
                self.places.push(place);
                if self.list.len() > MAX_ENTRIES || self.bytes > MAX_INDEX_BYTES {
                    self.over.get_or_insert_with(|| {
                        format!(
                            "more than {MAX_ENTRIES} entries or {} MiB of index",
                            MAX_INDEX_BYTES >> 20
                        )
                    });
                }
            }
            TarItem::Refused { offset, reason } => {
                self.refused += 1;
                if self.refused <= LOGGED_REFUSALS {
                    warn!(layer = %self.digest, offset, "entry not shown: {reason}");
                }
            }
        }
    }
}

/// Indexes a plain layer from its bytes, fed in order by `pieces` (blocking: run it on
/// a blocking thread). `size` is the blob's size from its descriptor.
pub fn index_pass(
    digest: &Digest,
    codec: Codec,
    size: u64,
    pieces: impl Iterator<Item = Result<Bytes>>,
) -> Result<LayerIndex> {
    let mut blob_hash = digest.hasher();
    let mut pass = Pass::new(digest, codec, size)?;
    let mut received = 0u64;
    for piece in pieces {
        let piece = piece?;
        received += piece.len() as u64;
        if received > size {
            return Err(unreadable(
                digest,
                format!("the registry sent more than its {size} bytes"),
            ));
        }
        blob_hash.update(&piece);
        pass.feed(&piece)?;
    }
    if received != size {
        return Err(Error::Unavailable(format!(
            "layer {digest}: the stream ended after {received} of {size} bytes"
        )));
    }
    pass.feed(&[])?;
    if !blob_hash.matches(digest) {
        return Err(unreadable(digest, "content does not match its digest"));
    }
    pass.finish()
}

/// The decoding half of a pass: blob bytes in, entries, checkpoints and spans out.
struct Pass<'a> {
    digest: &'a Digest,
    codec: Codec,
    size: u64,
    decoder: Decoder,
    tar: TarParser,
    entries: Entries<'a>,
    checkpoints: Vec<Checkpoint>,
    /// Span digests, cut at each checkpoint (gzip) or every [`SPAN_SIZE`] bytes.
    spans: SpanHasher,
    /// gzip: whether the first span (at the first deflate byte) has begun.
    begun: bool,
    spacing: u64,
    /// Output beyond this is a decompression bomb.
    max_out: u64,
    buf: Vec<u8>,
}

impl<'a> Pass<'a> {
    fn new(digest: &'a Digest, codec: Codec, size: u64) -> Result<Pass<'a>> {
        let decoder = Decoder::at(codec, &Checkpoint::START)
            .map_err(|e| unreadable(digest, format!("{} layer: {e}", codec.name())))?;
        let mut spans = SpanHasher::new();
        if codec != Codec::Gzip {
            spans.begin(0);
            (1..size.div_ceil(SPAN_SIZE)).for_each(|k| spans.cut(k * SPAN_SIZE * 8));
        }
        Ok(Pass {
            digest,
            codec,
            size,
            decoder,
            tar: TarParser::default(),
            entries: Entries {
                digest,
                list: Vec::new(),
                places: Vec::new(),
                bytes: 0,
                refused: 0,
                over: None,
            },
            checkpoints: vec![Checkpoint::START],
            spans,
            begun: codec != Codec::Gzip,
            spacing: checkpoint_spacing(size),
            max_out: EXPANSION_FLOOR.max(size.saturating_mul(MAX_EXPANSION)),
            buf: vec![0u8; OUT_BUF],
        })
    }

    fn bad(&self, what: impl std::fmt::Display) -> Error {
        unreadable(self.digest, format!("{} layer: {what}", self.codec.name()))
    }

    /// Decodes the next blob bytes (none: the end), then hashes them into the spans
    /// the checkpoints they held delimit.
    fn feed(&mut self, input: &[u8]) -> Result<()> {
        let known = self.checkpoints.len();
        self.decode(input)?;
        if !self.begun {
            if let Some(first) = self.decoder.first_deflate_byte() {
                // SOCI's first checkpoint: the first deflate byte, nothing before it.
                self.checkpoints[0] = Checkpoint {
                    in_bit: first * 8,
                    out: 0,
                    window: Some(Box::default()),
                };
                self.spans.begin(first);
                self.begun = true;
            }
        }
        if self.codec == Codec::Gzip {
            for c in &self.checkpoints[known..] {
                self.spans.cut(c.in_bit);
            }
        }
        self.spans.update(input);
        Ok(())
    }

    /// Decodes `input`, parsing what comes out and taking checkpoints.
    fn decode(&mut self, mut input: &[u8]) -> Result<()> {
        loop {
            let step = self
                .decoder
                .decode(input, &mut self.buf)
                .map_err(|e| self.bad(e))?;
            input = &input[step.consumed..];
            if step.produced > 0 {
                let entries = &mut self.entries;
                let parsed = self
                    .tar
                    .feed(&self.buf[..step.produced], &mut |item| entries.add(item));
                parsed.map_err(|e| self.bad(e))?;
            }
            if let Some(over) = &self.entries.over {
                return Err(self.bad(over));
            }
            let out = self.decoder.output_pos();
            if out > self.max_out {
                return Err(self.bad(format_args!(
                    "expands to more than {} bytes ({MAX_EXPANSION} times its size): refused as a decompression bomb",
                    self.max_out
                )));
            }
            let last = self.checkpoints.last().map_or(0, |c| c.out);
            let ended = self.tar.ended();
            if step.boundary && self.codec != Codec::Tar && !ended && out >= last + self.spacing {
                self.checkpoints.push(self.decoder.checkpoint());
            }
            if input.is_empty() && step.produced == 0 && step.consumed == 0 && !step.boundary {
                return Ok(());
            }
        }
    }

    /// The index, once every byte was fed and the blob matched its digest.
    fn finish(mut self) -> Result<LayerIndex> {
        self.decoder.finish().map_err(|e| self.bad(e))?;
        self.tar.finish().map_err(|e| self.bad(e))?;
        let spans = std::mem::take(&mut self.spans);
        let spans = spans.finish().map_err(|e| self.bad(e))?;
        let refused = self.entries.refused;
        if refused > LOGGED_REFUSALS {
            warn!(layer = %self.digest, "{refused} entries not shown in all");
        }
        let (mut list, mut places) = (self.entries.list, self.entries.places);
        let listed = list.len();
        if self.codec == Codec::Gzip {
            super::entry::drop_estargz_metadata(&mut list);
        }
        let publishable = self.codec == Codec::Gzip
            && self.decoder.gzip_members() == 1
            && refused == 0
            && self.tar.skipped() == 0
            && list.len() == listed;
        if !publishable {
            places = Vec::new(); // only a zTOC needs them
        }
        Ok(LayerIndex {
            entries: list,
            places,
            content: Content::Stream(StreamMap {
                codec: self.codec,
                checkpoints: self.checkpoints,
                spans,
                blob_size: self.size,
            }),
            source: IndexSource::Pass,
            toc_unused: None,
            soci_unused: None,
            tar_size: self.decoder.output_pos(),
            publishable,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::codec::gzip::tests::{gzip, sample};
    use crate::image::entry::{DataRef, EntryKind};
    use crate::image::soci::spans;

    /// A tar stream of `files` (path, content), as `tar` crate's builder writes it.
    pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).expect("append");
        }
        b.into_inner().expect("finish tar")
    }

    fn pieces(blob: &[u8], n: usize) -> impl Iterator<Item = Result<Bytes>> + '_ {
        blob.chunks(n).map(|c| Ok(Bytes::copy_from_slice(c)))
    }

    #[test]
    fn gzip_pass_records_entries_checkpoints_and_spans() {
        let big = sample(20 << 20);
        let tar = tar_of(&[("a/small", b"hello"), ("a/big", &big), ("z", b"end")]);
        let gz = gzip(&tar, usize::MAX);
        let digest = Digest::sha256_of(&gz);
        let index =
            index_pass(&digest, Codec::Gzip, gz.len() as u64, pieces(&gz, 100_000)).expect("valid");
        let names: Vec<&[u8]> = index.entries.iter().map(|e| &*e.path).collect();
        assert_eq!(names, [&b"a/small"[..], b"a/big", b"z"]);
        assert_eq!(index.entries[1].kind, EntryKind::File);
        let Content::Stream(map) = &index.content else {
            panic!("a plain layer maps a stream");
        };
        assert!(
            map.checkpoints.len() >= 4,
            "every ~4 MiB of 20 MiB: {}",
            map.checkpoints.len()
        );
        // SOCI's spans: one per checkpoint, the first at the first deflate byte.
        let header = crate::image::codec::gzip::parse_member_header(&gz).expect("gzip");
        assert_eq!(map.checkpoints[0].in_bit, header.expect("whole") as u64 * 8);
        let ranges = spans::checkpoint_ranges(&map.checkpoints, gz.len() as u64).expect("ok");
        let digests = spans::digests(&gz, &ranges).expect("in range");
        let got: Vec<_> = map
            .spans
            .iter()
            .map(|s| (s.range.clone(), s.digest))
            .collect();
        assert_eq!(got, ranges.into_iter().zip(digests).collect::<Vec<_>>());
        let DataRef::Stream(at) = index.entries[2].data else {
            panic!("z has data");
        };
        assert_eq!(&tar[at as usize..at as usize + 3], b"end");
        assert_eq!(index.tar_size, tar.len() as u64);
        assert!(index.publishable, "one member, every header an entry");
        let headers: Vec<u64> = index.places.iter().map(|p| p.header).collect();
        assert_eq!(headers[..2], [0, 1024]);
    }

    #[test]
    fn only_single_member_gzip_with_every_entry_is_publishable() {
        let tar = tar_of(&[("a", b"x"), ("b", b"y")]);
        let index_of = |codec, blob: &[u8]| {
            let d = Digest::sha256_of(blob);
            index_pass(&d, codec, blob.len() as u64, pieces(blob, 7)).expect("valid")
        };
        let two = [
            gzip(&tar[..1024], usize::MAX),
            gzip(&tar[1024..], usize::MAX),
        ]
        .concat();
        let multi = index_of(Codec::Gzip, &two);
        assert_eq!(multi.entries.len(), 2);
        assert!(!multi.publishable && multi.places.is_empty(), "two members");
        let z = zstd::bulk::compress(&tar, 3).expect("compress");
        assert!(!index_of(Codec::Zstd, &z).publishable);
        let mut dotdot = tar_of(&[("a", b"x")]);
        dotdot[..4].copy_from_slice(b"../a");
        let mut h = tar::Header::from_byte_slice(&dotdot[..512]).clone();
        h.set_cksum();
        dotdot[..512].copy_from_slice(h.as_bytes());
        let refused = index_of(Codec::Gzip, &gzip(&dotdot, usize::MAX));
        assert!(refused.entries.is_empty() && !refused.publishable);
    }

    #[test]
    fn fixed_spans_for_tar_and_zstd() {
        let tar = tar_of(&[("w", &sample(3 << 20))]);
        let d = Digest::sha256_of(&tar);
        let index =
            index_pass(&d, Codec::Tar, tar.len() as u64, pieces(&tar, 77_777)).expect("tar");
        let Content::Stream(map) = &index.content else {
            panic!("a stream");
        };
        let ranges = spans::fixed_ranges(SPAN_SIZE, tar.len() as u64);
        let got: Vec<_> = map.spans.iter().map(|s| s.range.clone()).collect();
        assert_eq!(got, ranges);
        assert_eq!(map.spans, {
            let digests = spans::digests(&tar, &ranges).expect("in range");
            ranges
                .iter()
                .cloned()
                .zip(digests)
                .map(|(range, digest)| spans::Span { range, digest })
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn wrong_digest_truncation_and_bombs_fail() {
        let tar = tar_of(&[("f", b"content")]);
        let gz = gzip(&tar, usize::MAX);
        let other = Digest::sha256_of(b"something else");
        assert!(index_pass(&other, Codec::Gzip, gz.len() as u64, pieces(&gz, 64)).is_err());
        let digest = Digest::sha256_of(&gz);
        let short = &gz[..gz.len() - 10];
        assert!(index_pass(&digest, Codec::Gzip, gz.len() as u64, pieces(short, 64)).is_err());
        // Media type says gzip, bytes are plain tar.
        let d = Digest::sha256_of(&tar);
        assert!(index_pass(&d, Codec::Gzip, tar.len() as u64, pieces(&tar, 512)).is_err());
        // A zstd layer of zeros far beyond the expansion limit for its size.
        let zeros = vec![0u8; 64 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_size(8 << 30);
        h.set_path("bomb").expect("path");
        h.set_cksum();
        let mut stream = h.as_bytes().to_vec();
        stream.extend_from_slice(&zeros);
        let z = zstd::bulk::compress(&stream, 1).expect("compress");
        // More zeros, frame after frame: gigabytes from a few kilobytes.
        let zero_frame = zstd::bulk::compress(&zeros, 1).expect("compress");
        let mut blob = z;
        for _ in 0..40 {
            blob.extend_from_slice(&zero_frame);
        }
        let d = Digest::sha256_of(&blob);
        let err = index_pass(&d, Codec::Zstd, blob.len() as u64, pieces(&blob, 1 << 20))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("bomb"), "{err}");
    }

    #[test]
    fn tar_and_zstd_layers() {
        let tar = tar_of(&[("x/y", b"why"), ("w", &sample(3 << 20))]);
        let d = Digest::sha256_of(&tar);
        let index = index_pass(&d, Codec::Tar, tar.len() as u64, pieces(&tar, 4096)).expect("tar");
        assert_eq!(index.entries.len(), 2);
        let z = zstd::bulk::compress(&tar, 3).expect("compress");
        let d = Digest::sha256_of(&z);
        let index = index_pass(&d, Codec::Zstd, z.len() as u64, pieces(&z, 4096)).expect("zstd");
        assert_eq!(&*index.entries[0].path, b"x/y");
    }
}
