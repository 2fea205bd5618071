//! The index pass of a plain layer (tar, tar+gzip, tar+zstd): one streaming read of the
//! whole blob that decodes it, records every tar entry, takes a decoder checkpoint every
//! few MiB of output and a digest of every span of the blob, and checks the blob against
//! its digest at the end. Nothing of a layer is shown before its pass has succeeded, so
//! an index never describes bytes that were not verified.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tracing::warn;

use super::codec::{Checkpoint, Codec, Decoder};
use super::entry::Entry;
use super::index::{
    Content, IndexSource, LayerIndex, MAX_ENTRIES, MAX_INDEX_BYTES, StreamMap, unreadable,
};
use super::tar::{TarItem, TarParser};
use crate::registry::{Digest, Error, Result};

/// Blob bytes per span digest: what a read of a small file fetches at least.
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

fn spacing(blob_size: u64) -> u64 {
    MIN_CHECKPOINT_SPACING.max(blob_size.saturating_mul(3) / MAX_CHECKPOINTS)
}

/// SHA-256 of each fixed-size span of a byte stream.
struct SpanHasher {
    size: u64,
    current: Sha256,
    filled: u64,
    done: Vec<[u8; 32]>,
}

impl SpanHasher {
    fn new(size: u64) -> SpanHasher {
        SpanHasher {
            size,
            current: Sha256::new(),
            filled: 0,
            done: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = ((self.size - self.filled) as usize).min(bytes.len());
            self.current.update(&bytes[..n]);
            self.filled += n as u64;
            bytes = &bytes[n..];
            if self.filled == self.size {
                self.done
                    .push(std::mem::take(&mut self.current).finalize().into());
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<[u8; 32]> {
        if self.filled > 0 {
            self.done.push(self.current.finalize().into());
        }
        self.done
    }
}

/// Collects entries within the limits.
struct Entries<'a> {
    digest: &'a Digest,
    list: Vec<Entry>,
    bytes: usize,
    refused: usize,
    over: Option<String>,
}

impl Entries<'_> {
    fn add(&mut self, item: TarItem) {
        match item {
            TarItem::Entry(entry) => {
                self.bytes += entry.heap_bytes();
                self.list.push(entry);
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
    let mut spans = SpanHasher::new(SPAN_SIZE);
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
        spans.update(&piece);
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
    pass.finish(spans.finish())
}

/// The decoding half of a pass: blob bytes in, entries and checkpoints out.
struct Pass<'a> {
    digest: &'a Digest,
    codec: Codec,
    size: u64,
    decoder: Decoder,
    tar: TarParser,
    entries: Entries<'a>,
    checkpoints: Vec<Checkpoint>,
    spacing: u64,
    /// Output beyond this is a decompression bomb.
    max_out: u64,
    buf: Vec<u8>,
}

impl<'a> Pass<'a> {
    fn new(digest: &'a Digest, codec: Codec, size: u64) -> Result<Pass<'a>> {
        let decoder = Decoder::at(codec, &Checkpoint::START)
            .map_err(|e| unreadable(digest, format!("{} layer: {e}", codec.name())))?;
        Ok(Pass {
            digest,
            codec,
            size,
            decoder,
            tar: TarParser::default(),
            entries: Entries {
                digest,
                list: Vec::new(),
                bytes: 0,
                refused: 0,
                over: None,
            },
            checkpoints: vec![Checkpoint::START],
            spacing: spacing(size),
            max_out: EXPANSION_FLOOR.max(size.saturating_mul(MAX_EXPANSION)),
            buf: vec![0u8; OUT_BUF],
        })
    }

    fn bad(&self, what: impl std::fmt::Display) -> Error {
        unreadable(self.digest, format!("{} layer: {what}", self.codec.name()))
    }

    /// Decodes the next blob bytes (none: the end), parsing what comes out.
    fn feed(&mut self, mut input: &[u8]) -> Result<()> {
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
    fn finish(self, spans: Vec<[u8; 32]>) -> Result<LayerIndex> {
        self.decoder.finish().map_err(|e| self.bad(e))?;
        self.tar.finish().map_err(|e| self.bad(e))?;
        if self.entries.refused > LOGGED_REFUSALS {
            warn!(layer = %self.digest, "{} entries not shown in all", self.entries.refused);
        }
        let mut list = self.entries.list;
        if self.codec == Codec::Gzip {
            super::entry::drop_estargz_metadata(&mut list);
        }
        Ok(LayerIndex {
            entries: list,
            content: Content::Stream(StreamMap {
                codec: self.codec,
                checkpoints: self.checkpoints,
                span_size: SPAN_SIZE,
                spans,
                blob_size: self.size,
            }),
            source: IndexSource::Pass,
            toc_unused: None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::codec::gzip::tests::{gzip, sample};
    use crate::image::entry::{DataRef, EntryKind};

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
        assert_eq!(
            map.spans.len() as u64,
            (gz.len() as u64).div_ceil(SPAN_SIZE)
        );
        let DataRef::Stream(at) = index.entries[2].data else {
            panic!("z has data");
        };
        assert_eq!(&tar[at as usize..at as usize + 3], b"end");
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
