//! Span digests as SOCI defines them: one SHA-256 per span, over the span's
//! compressed bytes, so a reader can check a span before decoding a byte of it.
//!
//! - gzip layers: span `k` is every blob byte decoding from checkpoint `k` up to
//!   checkpoint `k + 1` reads: from the byte holding checkpoint `k`'s first bit
//!   (`in_bit / 8`, i.e. SOCI's `in - 1` when `bits > 0`) to the byte before checkpoint
//!   `k + 1`'s first whole byte (`ceil(in_bit / 8)`, SOCI's `in`); the last span ends at
//!   the blob's end. When a block starts mid-byte that byte is in both spans. Bytes
//!   before the first checkpoint (the gzip header) are in no span.
//! - uncompressed layers: fixed `span_size` ranges from byte 0, the last one short.
//!
//! [`SpanHasher`] computes them while a blob streams past (the index pass), and
//! [`digests`] from a whole blob in memory.

use std::collections::VecDeque;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::image::codec::Checkpoint;

/// A range of the blob and the SHA-256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub range: Range<u64>,
    pub digest: [u8; 32],
}

/// SOCI's span ranges for a layer with these checkpoints (sorted, strictly increasing
/// `in_bit`) and this size.
pub fn checkpoint_ranges(
    checkpoints: &[Checkpoint],
    blob_size: u64,
) -> Result<Vec<Range<u64>>, String> {
    let mut ranges = Vec::with_capacity(checkpoints.len());
    for (k, c) in checkpoints.iter().enumerate() {
        let end = match checkpoints.get(k + 1) {
            Some(next) => next.in_bit.div_ceil(8),
            None => blob_size,
        };
        let start = c.in_byte();
        if start >= end || end > blob_size {
            return Err(format!(
                "span {k} would be bytes {start}..{end} of a {blob_size}-byte layer"
            ));
        }
        ranges.push(start..end);
    }
    Ok(ranges)
}

/// Fixed ranges of `span_size` bytes covering `blob_size` bytes.
pub fn fixed_ranges(span_size: u64, blob_size: u64) -> Vec<Range<u64>> {
    let span_size = span_size.max(1);
    (0..blob_size.div_ceil(span_size))
        .map(|k| k * span_size..((k + 1) * span_size).min(blob_size))
        .collect()
}

/// The digest of each range of `blob`.
pub fn digests(blob: &[u8], ranges: &[Range<u64>]) -> Result<Vec<[u8; 32]>, String> {
    ranges
        .iter()
        .map(|r| {
            let bytes = usize::try_from(r.start)
                .ok()
                .zip(usize::try_from(r.end).ok())
                .and_then(|(s, e)| blob.get(s..e))
                .ok_or_else(|| format!("span {r:?} is outside the {}-byte blob", blob.len()))?;
            Ok(Sha256::digest(bytes).into())
        })
        .collect()
}

/// Span digests of a blob fed in order, with span boundaries announced as checkpoints
/// are found: [`SpanHasher::begin`] where the first span starts, [`SpanHasher::cut`]
/// at each later checkpoint, before any byte past it is fed.
#[derive(Default)]
pub struct SpanHasher {
    /// Blob offset of the next byte fed.
    pos: u64,
    /// Where the current span starts; `None` before [`SpanHasher::begin`].
    start: Option<u64>,
    current: Sha256,
    /// The byte before `pos`: the first byte of the next span when a checkpoint
    /// starts mid-byte.
    last: u8,
    /// Pending boundaries: (end of the current span, start of the next).
    cuts: VecDeque<(u64, u64)>,
    done: Vec<Span>,
    error: Option<String>,
}

impl SpanHasher {
    pub fn new() -> SpanHasher {
        SpanHasher::default()
    }

    /// The first span starts at blob byte `start` (0, or a gzip layer's first deflate
    /// byte). Bytes fed before this call must lie before `start`.
    pub fn begin(&mut self, start: u64) {
        if self.start.is_some() || start < self.pos {
            self.fail(format!(
                "the first span starts at {start}, after byte {} was fed",
                self.pos
            ));
        }
        self.start = Some(start);
    }

    /// A checkpoint at bit `in_bit`: the current span ends and the next begins.
    pub fn cut(&mut self, in_bit: u64) {
        let (end, next) = (in_bit.div_ceil(8), in_bit / 8);
        let last_end = self.cuts.back().map_or(self.pos, |c| c.0);
        let current = self.cuts.back().map(|c| c.1).or(self.start);
        if end < last_end || current.is_none_or(|s| next < s) {
            self.fail(format!(
                "a checkpoint at bit {in_bit} comes too late or out of order"
            ));
            return;
        }
        self.cuts.push_back((end, next));
        self.take_cuts();
    }

    fn fail(&mut self, why: String) {
        self.error.get_or_insert(why);
    }

    /// The blob's next bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let limit = self.cuts.front().map_or(u64::MAX, |c| c.0);
            let n = (limit - self.pos).min(bytes.len() as u64) as usize;
            let (now, rest) = bytes.split_at(n);
            match self.start {
                Some(start) if self.pos + n as u64 > start => {
                    let skip = start.saturating_sub(self.pos) as usize;
                    self.current.update(&now[skip..]);
                }
                _ => {}
            }
            if let Some(&b) = now.last() {
                self.last = b;
            }
            self.pos += n as u64;
            bytes = rest;
            self.take_cuts();
        }
        self.take_cuts();
    }

    /// Closes every span whose end has been reached.
    fn take_cuts(&mut self) {
        while let Some(&(end, next)) = self.cuts.front() {
            if end != self.pos {
                return;
            }
            self.cuts.pop_front();
            let Some(start) = self.start else {
                return self.fail("a checkpoint before the first span began".into());
            };
            let digest = std::mem::take(&mut self.current).finalize().into();
            self.done.push(Span {
                range: start..end,
                digest,
            });
            self.start = Some(next);
            if next < end {
                self.current.update([self.last]);
            }
        }
    }

    /// The spans; the last ends where the blob did.
    pub fn finish(mut self) -> Result<Vec<Span>, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some(&(end, _)) = self.cuts.front() {
            return Err(format!(
                "a span should end at {end}, but the blob ended at {}",
                self.pos
            ));
        }
        match self.start {
            Some(start) if start < self.pos => {
                let digest = self.current.finalize().into();
                self.done.push(Span {
                    range: start..self.pos,
                    digest,
                });
            }
            Some(start) if start > self.pos || !self.done.is_empty() => {
                return Err(format!(
                    "the last span starts at {start}, at or past the end {}",
                    self.pos
                ));
            }
            _ => {}
        }
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(in_bit: u64) -> Checkpoint {
        Checkpoint {
            in_bit,
            out: in_bit,
            window: None,
        }
    }

    #[test]
    fn ranges_follow_soci() {
        // First deflate byte 10; a block at bit 8003 (byte 1000, 3 bits of byte 1000
        // belong to it: SOCI's in = 1001, bits = 5), another on byte 2000 exactly.
        let cps = [point(80), point(8003), point(16000)];
        let r = checkpoint_ranges(&cps, 3000).expect("valid");
        assert_eq!(r, vec![10..1001, 1000..2000, 2000..3000]);
        assert!(checkpoint_ranges(&cps, 2000).is_err(), "last span empty");
        assert_eq!(fixed_ranges(10, 25), vec![0..10, 10..20, 20..25]);
        assert!(fixed_ranges(10, 0).is_empty());
    }

    #[test]
    fn misuse_is_an_error_not_a_wrong_digest() {
        let mut h = SpanHasher::new();
        h.update(&[1; 20]);
        h.begin(10);
        assert!(
            h.finish().is_err(),
            "bytes past the start were fed before begin"
        );
        let mut h = SpanHasher::new();
        h.begin(0);
        h.update(&[1; 20]);
        h.cut(8 * 5);
        assert!(h.finish().is_err(), "a cut behind what was fed");
        let mut h = SpanHasher::new();
        h.begin(0);
        h.cut(8 * 50);
        h.update(&[1; 20]);
        assert!(h.finish().is_err(), "the blob ended before a cut");
    }

    proptest! {
        #[test]
        fn streaming_matches_whole_blob(
            blob in proptest::collection::vec(any::<u8>(), 2..3000),
            header in 0u64..20,
            gaps in proptest::collection::vec(1u64..4000, 0..8),
            pieces in proptest::collection::vec(1usize..500, 1..20),
            early in any::<bool>(),
        ) {
            let size = blob.len() as u64;
            prop_assume!(header < size);
            let mut bits = vec![header * 8];
            for g in gaps {
                let b = bits[bits.len() - 1] + g;
                if b.div_ceil(8) >= size { break; }
                bits.push(b);
            }
            let cps: Vec<Checkpoint> = bits.iter().map(|&b| point(b)).collect();
            let ranges = checkpoint_ranges(&cps, size).expect("valid");
            let whole = digests(&blob, &ranges).expect("in range");

            let mut h = SpanHasher::new();
            let mut fed = 0usize;
            let mut next_cut = 1;
            h.begin(header);
            if early {
                // The pass may announce every checkpoint of a piece before hashing it.
                for &b in &bits[1..] { h.cut(b); }
                next_cut = bits.len();
            }
            for p in pieces.iter().cycle() {
                if fed == blob.len() { break; }
                // Never feed past a checkpoint not yet announced.
                let limit = bits.get(next_cut).map_or(blob.len(), |&b| b.div_ceil(8) as usize);
                let n = (*p).min(limit - fed);
                h.update(&blob[fed..fed + n]);
                fed += n;
                if fed == limit && next_cut < bits.len() {
                    h.cut(bits[next_cut]);
                    next_cut += 1;
                }
            }
            let spans = h.finish().expect("consistent");
            let got: Vec<_> = spans.iter().map(|s| s.digest).collect();
            let got_ranges: Vec<_> = spans.iter().map(|s| s.range.clone()).collect();
            prop_assert_eq!(got_ranges, ranges);
            prop_assert_eq!(got, whole);
        }
    }
}
