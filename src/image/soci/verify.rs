//! The background check of a layer served from a zTOC (docs/SEMANTICS.md, "Trust"):
//! one streaming read of the whole blob that proves the zTOC told the truth.
//!
//! Span digests prove each span's compressed bytes, and the header check proves where
//! a file is, but nothing in a zTOC vouches for a checkpoint's window or bit offset:
//! a changed window decodes the right bytes into wrong ones. So the blob is decoded
//! from its start (the truth, once the blob matches its digest) and, alongside, each
//! span from its own checkpoint exactly as a reader would; every byte must agree, each
//! span must end where the next checkpoint begins, the span digests must be the
//! blob's, and the tar entries must be the zTOC's.

use std::collections::VecDeque;

use bytes::Bytes;

use super::layer::SociLayer;
use super::spans::{Span, SpanHasher};
use crate::image::codec::{Checkpoint, Codec, Decoder};
use crate::image::entry::Entry;
use crate::image::tar::{TarItem, TarParser};
use crate::registry::{Digest, DigestHasher};

/// Decoder output buffer.
const OUT: usize = 128 << 10;

/// One span decoded from its own checkpoint, and where it must end.
struct SpanRead {
    k: usize,
    decoder: Decoder,
    /// The blob byte after the span's last.
    end: u64,
}

/// What an index says of a layer: what the check holds against the blob.
#[derive(Clone, Copy)]
pub struct Claims<'a> {
    pub codec: Codec,
    /// Every entry the index shows, in tar order.
    pub entries: &'a [Entry],
    pub checkpoints: &'a [Checkpoint],
    pub spans: &'a [Span],
    pub blob_size: u64,
}

impl<'a> From<&'a SociLayer> for Claims<'a> {
    fn from(l: &'a SociLayer) -> Claims<'a> {
        Claims {
            codec: l.codec,
            entries: &l.entries,
            checkpoints: &l.checkpoints,
            spans: &l.spans,
            blob_size: l.blob_size,
        }
    }
}

struct Check<'a> {
    layer: Claims<'a>,
    blob: DigestHasher,
    spans: SpanHasher,
    truth: Decoder,
    tar: TarParser,
    entries: Vec<Entry>,
    /// Output of the decode from the start not yet compared, from `pending_at`.
    pending: VecDeque<u8>,
    pending_at: u64,
    span: Option<SpanRead>,
    /// The span to start next.
    next_k: usize,
    /// Blob offset of the next byte, and the byte before it.
    pos: u64,
    last: u8,
    buf: Vec<u8>,
}

/// Checks `layer` (what a zTOC says) against the blob `digest`, fed in order.
pub fn verify_layer(
    digest: &Digest,
    layer: Claims<'_>,
    pieces: impl Iterator<Item = crate::registry::Result<Bytes>>,
) -> Result<(), String> {
    let mut check = Check::new(digest, layer)?;
    for piece in pieces {
        let piece = piece.map_err(|e| e.to_string())?;
        if check.pos + piece.len() as u64 > layer.blob_size {
            return Err(format!(
                "the blob is longer than its {} bytes",
                layer.blob_size
            ));
        }
        check.feed(&piece)?;
    }
    check.finish(digest)
}

impl<'a> Check<'a> {
    fn new(digest: &Digest, layer: Claims<'a>) -> Result<Check<'a>, String> {
        let mut spans = SpanHasher::new();
        spans.begin(layer.spans.first().map_or(0, |s| s.range.start));
        if layer.codec == Codec::Gzip {
            layer
                .checkpoints
                .iter()
                .skip(1)
                .for_each(|c| spans.cut(c.in_bit));
        } else {
            layer
                .spans
                .iter()
                .skip(1)
                .for_each(|s| spans.cut(s.range.start * 8));
        }
        Ok(Check {
            layer,
            blob: digest.hasher(),
            spans,
            truth: Decoder::at(layer.codec, &Checkpoint::START)?,
            tar: TarParser::default(),
            entries: Vec::new(),
            pending: VecDeque::new(),
            pending_at: 0,
            span: None,
            next_k: 0,
            pos: 0,
            last: 0,
            buf: vec![0; OUT],
        })
    }

    fn feed(&mut self, piece: &[u8]) -> Result<(), String> {
        self.blob.update(piece);
        self.spans.update(piece);
        self.decode_truth(piece)?;
        if self.layer.codec == Codec::Gzip {
            self.decode_spans(piece)?;
        }
        if let Some(&b) = piece.last() {
            self.last = b;
        }
        self.pos += piece.len() as u64;
        Ok(())
    }

    /// The decode from the start: its output is what every span must produce.
    fn decode_truth(&mut self, mut input: &[u8]) -> Result<(), String> {
        loop {
            let step = self.truth.decode(input, &mut self.buf)?;
            input = &input[step.consumed..];
            let made = &self.buf[..step.produced];
            let (entries, tar) = (&mut self.entries, &mut self.tar);
            tar.feed(made, &mut |item| {
                if let TarItem::Entry(e, _) = item {
                    entries.push(e);
                }
            })
            .map_err(|e| e.to_string())?;
            if self.layer.codec == Codec::Gzip {
                self.pending.extend(made);
            }
            if input.is_empty() && step.consumed == 0 && step.produced == 0 && !step.boundary {
                return Ok(());
            }
        }
    }

    /// Each span from its checkpoint, over the part of `piece` it covers.
    fn decode_spans(&mut self, piece: &[u8]) -> Result<(), String> {
        let piece_end = self.pos + piece.len() as u64;
        loop {
            if self.span.is_none() && !self.start_span(piece_end)? {
                return Ok(());
            }
            let Some(span) = self.span.as_ref() else {
                return Ok(());
            };
            let from = span.decoder.input_pos().max(self.pos);
            let (to, end) = (span.end.min(piece_end), span.end);
            if from < to {
                self.run_span(&piece[(from - self.pos) as usize..(to - self.pos) as usize])?;
            }
            if end > piece_end {
                return Ok(()); // the span goes on in the next piece
            }
            self.end_span()?;
        }
    }

    /// Starts the decoder of the next span if its first byte has arrived.
    fn start_span(&mut self, piece_end: u64) -> Result<bool, String> {
        let (k, layer) = (self.next_k, self.layer);
        let (Some(point), Some(span)) = (layer.checkpoints.get(k), layer.spans.get(k)) else {
            return Ok(false);
        };
        let start = point.in_byte();
        if start >= piece_end {
            return Ok(false);
        }
        let decoder = Decoder::at(layer.codec, point).map_err(|e| format!("span {k}: {e}"))?;
        self.next_k += 1;
        self.span = Some(SpanRead {
            k,
            decoder,
            end: span.range.end,
        });
        if start < self.pos {
            // The span starts with the byte it shares with the span before.
            if start + 1 != self.pos {
                return Err(format!(
                    "span {k} starts at {start}, before byte {}",
                    self.pos - 1
                ));
            }
            self.run_span(&[self.last])?;
        }
        Ok(true)
    }

    /// Feeds the current span's decoder and compares what it makes with the truth.
    fn run_span(&mut self, mut input: &[u8]) -> Result<(), String> {
        let Some(span) = self.span.as_mut() else {
            return Ok(());
        };
        loop {
            let at = span.decoder.output_pos();
            let step = span
                .decoder
                .decode(input, &mut self.buf)
                .map_err(|e| format!("span {} from its checkpoint: {e}", span.k))?;
            input = &input[step.consumed..];
            compare(
                &mut self.pending,
                &mut self.pending_at,
                at,
                &self.buf[..step.produced],
                span.k,
            )?;
            if step.consumed == 0 && step.produced == 0 && !step.boundary {
                return Ok(());
            }
        }
    }

    /// The span's bytes are all in: it must have decoded up to the next checkpoint.
    fn end_span(&mut self) -> Result<(), String> {
        self.run_span(&[])?;
        let Some(span) = self.span.take() else {
            return Ok(());
        };
        let expected = match self.layer.checkpoints.get(span.k + 1) {
            Some(next) => next.out,
            None => self.truth.output_pos(),
        };
        if span.decoder.output_pos() != expected {
            return Err(format!(
                "span {} decodes to output {}, but the next checkpoint is at {expected}",
                span.k,
                span.decoder.output_pos()
            ));
        }
        Ok(())
    }

    fn finish(mut self, digest: &Digest) -> Result<(), String> {
        if self.pos != self.layer.blob_size {
            return Err(format!(
                "the blob ended after {} of {} bytes",
                self.pos, self.layer.blob_size
            ));
        }
        if !self.blob.matches(digest) {
            return Err("the layer does not match its digest".into());
        }
        self.truth.finish()?;
        self.tar.finish().map_err(|e| e.to_string())?;
        if self.layer.codec == Codec::Gzip
            && (self.span.is_some() || self.next_k != self.layer.checkpoints.len())
        {
            return Err(format!("spans {}.. were never reached", self.next_k));
        }
        let spans = std::mem::take(&mut self.spans).finish()?;
        if spans != self.layer.spans {
            return Err("the span digests are not the layer's".into());
        }
        let sorted = |list: &[Entry]| -> Vec<Entry> {
            let mut list = list.to_vec();
            list.iter_mut().for_each(|e| e.xattrs.sort());
            list
        };
        if sorted(&self.entries) != sorted(self.layer.entries) {
            return Err("the zTOC's files are not the layer's".into());
        }
        Ok(())
    }
}

/// Compares `made`, span `k`'s output at `at`, with the truth's, and drops what no
/// later span needs.
fn compare(
    pending: &mut VecDeque<u8>,
    pending_at: &mut u64,
    at: u64,
    made: &[u8],
    k: usize,
) -> Result<(), String> {
    if made.is_empty() {
        return Ok(());
    }
    let skip = at.checked_sub(*pending_at).map(|s| s as usize);
    let same = skip.is_some_and(|s| {
        s + made.len() <= pending.len() && pending.range(s..s + made.len()).eq(made.iter())
    });
    if !same {
        return Err(format!(
            "span {k} decodes bytes at {at} differently from the layer"
        ));
    }
    let done = skip.unwrap_or(0) + made.len();
    pending.drain(..done);
    *pending_at += done as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::soci::layer::from_ztoc;
    use crate::image::soci::tests::{sample_layer, ztoc_of};
    use crate::image::soci::ztoc::{Zinfo, Ztoc};

    fn pieces(blob: &[u8]) -> impl Iterator<Item = crate::registry::Result<Bytes>> + '_ {
        blob.chunks(77_777).map(|c| Ok(Bytes::copy_from_slice(c)))
    }

    fn check(z: &Ztoc, blob: &[u8]) -> Result<(), String> {
        let layer = from_ztoc(z, blob.len() as u64)?;
        verify_layer(&Digest::sha256_of(blob), (&layer).into(), pieces(blob))
    }

    #[test]
    fn an_honest_ztoc_passes_and_every_lie_is_caught() {
        let (_, l) = sample_layer();
        let z = ztoc_of(&l);
        check(&z, &l.blob).expect("the zTOC is the layer's");

        let mut window = z.clone();
        if let Zinfo::Gzip(g) = &mut window.zinfo {
            g.checkpoints[2].window.iter_mut().for_each(|b| *b = b'#');
        }
        let err = check(&window, &l.blob).expect_err("a changed window");
        assert!(err.contains("span 2"), "{err}");

        let mut digest = z.clone();
        digest.span_digests[1][5] ^= 1;
        assert!(check(&digest, &l.blob).is_err(), "a changed span digest");

        let mut moved = z.clone();
        moved.files[2].offset += 512;
        moved.files[2].size -= 1;
        assert!(check(&moved, &l.blob).is_err(), "a file moved");

        let mut shifted = z.clone();
        if let Zinfo::Gzip(g) = &mut shifted.zinfo {
            g.checkpoints[1].out += 1;
        }
        assert!(
            check(&shifted, &l.blob).is_err(),
            "a checkpoint's output offset"
        );

        let mut other = l.blob.clone();
        let last = other.len() - 20;
        other[last] ^= 1;
        assert!(check(&z, &other).is_err(), "another blob");
    }

    #[test]
    fn socis_own_ztoc_passes() {
        let z = Ztoc::decode(include_bytes!("testdata/layer.ztoc")).expect("decodes");
        check(&z, include_bytes!("testdata/layer.tar.gz")).expect("soci's zTOC is right");
    }
}
