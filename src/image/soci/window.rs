//! Which decoded bytes depend on a checkpoint's window, which no digest vouches for
//! (docs/SEMANTICS.md, "Trust").
//!
//! Where deflate puts literals and where it copies, and from how far back, is fixed by
//! the compressed bits alone; only the copied values come from the window. So each
//! output byte is either independent of the window or equal to one window byte.
//! Decoding twice, once with the window and once with every window byte inverted,
//! tells exactly which: the bytes that come out the same both ways cannot depend on
//! the window, and are right whenever the compressed bytes are (span digests). Bytes
//! that differ need the window proven first (by decoding the span before it).

use super::zinfo::WINDOW;
use crate::image::codec::{Checkpoint, Codec, Decoder};

/// Output `start..end` of decoding `input` (blob bytes from `point.in_byte()`) from
/// `point`.
fn decode(
    codec: Codec,
    point: &Checkpoint,
    input: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<u8>, String> {
    let mut decoder = Decoder::at(codec, point)?;
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut buf = vec![0u8; 64 << 10];
    let mut rest = input;
    while decoder.output_pos() < end {
        let before = decoder.output_pos();
        let step = decoder.decode(rest, &mut buf)?;
        rest = &rest[step.consumed..];
        let made = &buf[..step.produced];
        let from = start.saturating_sub(before).min(made.len() as u64) as usize;
        let to = end.saturating_sub(before).min(made.len() as u64) as usize;
        out.extend_from_slice(&made[from..to.max(from)]);
        if step.consumed == 0 && step.produced == 0 && !step.boundary {
            return Err(format!(
                "the span ends at output {}, before {end}",
                decoder.output_pos()
            ));
        }
    }
    Ok(out)
}

/// Output `start..end` decoded from `point` over `input`, if none of it depends on
/// the checkpoint's window; `None` if some byte does.
pub fn decode_window_free(
    codec: Codec,
    point: &Checkpoint,
    input: &[u8],
    start: u64,
    end: u64,
) -> Result<Option<Vec<u8>>, String> {
    if start < point.out || end < start {
        return Err(format!(
            "output {start}..{end} is not after the checkpoint at {}",
            point.out
        ));
    }
    let window = point.window.as_deref().unwrap_or_default();
    let got = decode(codec, point, input, start, end)?;
    if window.is_empty() {
        return Ok(Some(got)); // nothing to depend on
    }
    let inverted: Box<[u8]> = window.iter().map(|b| !b).collect();
    debug_assert!(inverted.len() <= WINDOW);
    let other = Checkpoint {
        window: Some(inverted),
        ..point.clone()
    };
    let again = decode(codec, &other, input, start, end)?;
    Ok((got == again).then_some(got))
}

/// What decoding the span before a checkpoint showed of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Its bit and output offsets and its window are what decoding reaches.
    Proven,
    /// They are, if the checkpoint before is right: some of the window's bytes depend on
    /// that checkpoint's window, which must be proven first.
    NeedsPrevious,
}

/// Proves checkpoint `next` from the one before it, `prev`, and `input`: the blob bytes
/// from `prev.in_byte()` to `next`'s (the span between them, already checked against
/// its digest). Decoding from `prev` must stop at a block boundary exactly at `next`'s
/// bit and output offsets, and the output before it must be `next`'s window. Unless
/// `prev` is proven, only window bytes that do not depend on `prev`'s own window count
/// (see the top of this file); otherwise the answer is [`Proof::NeedsPrevious`].
pub fn prove_next(
    codec: Codec,
    prev: &Checkpoint,
    input: &[u8],
    next: &Checkpoint,
    prev_proven: bool,
) -> Result<Proof, String> {
    let window = next.window.as_deref().unwrap_or_default();
    let before = prev.window.as_deref().unwrap_or_default();
    let span_out = next.out.checked_sub(prev.out).filter(|&n| n > 0);
    let Some(span_out) = span_out else {
        return Err(format!(
            "a checkpoint at output {} follows one at {}",
            next.out, prev.out
        ));
    };
    let from_span = (window.len() as u64).min(span_out);
    let from_before = window.len() - from_span as usize;
    if from_before > before.len() {
        return Err(format!(
            "a window of {} bytes at output {}, more than decoding gives",
            window.len(),
            next.out
        ));
    }
    let tail = reach(codec, prev, input, next, next.out - from_span)?;
    let carried = &before[before.len() - from_before..];
    if window[..from_before] != *carried || window[from_before..] != tail[..] {
        return Err(format!(
            "the window at output {} is not what decoding gives",
            next.out
        ));
    }
    if prev_proven || before.is_empty() {
        return Ok(Proof::Proven);
    }
    if from_before > 0 {
        return Ok(Proof::NeedsPrevious);
    }
    let inverted: Box<[u8]> = before.iter().map(|b| !b).collect();
    let other = Checkpoint {
        window: Some(inverted),
        ..prev.clone()
    };
    let again = reach(codec, &other, input, next, next.out - from_span)?;
    Ok(if again == tail {
        Proof::Proven
    } else {
        Proof::NeedsPrevious
    })
}

/// Decodes `input` from `point` up to `next`, which must be a block boundary at its
/// bit offset; returns the output from `tail_from` on.
fn reach(
    codec: Codec,
    point: &Checkpoint,
    input: &[u8],
    next: &Checkpoint,
    tail_from: u64,
) -> Result<Vec<u8>, String> {
    let mut decoder = Decoder::at(codec, point)?;
    let mut tail = Vec::with_capacity((next.out - tail_from) as usize);
    let mut buf = vec![0u8; 64 << 10];
    let mut rest = input;
    loop {
        let at = decoder.output_pos();
        // Never past `next`: one byte more shows there is no block end there.
        let room = (next.out.saturating_sub(at) as usize).clamp(1, buf.len());
        let step = decoder.decode(rest, &mut buf[..room])?;
        rest = &rest[step.consumed..];
        let made = &buf[..step.produced];
        let skip = tail_from.saturating_sub(at).min(made.len() as u64) as usize;
        tail.extend_from_slice(&made[skip..]);
        let out = decoder.output_pos();
        if out > next.out {
            return Err(format!("no block boundary at output {}", next.out));
        }
        if step.boundary && out == next.out {
            let here = decoder.checkpoint().in_bit;
            if here != next.in_bit {
                return Err(format!(
                    "the block boundary at output {out} is at bit {here}, not {}",
                    next.in_bit
                ));
            }
            return Ok(tail);
        }
        if step.consumed == 0 && step.produced == 0 && !step.boundary {
            return Err(format!(
                "the span ends at output {out}, before {}",
                next.out
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::soci::tests::sample_layer;

    #[test]
    fn a_checkpoint_is_proven_by_the_span_before_it() {
        let (_, l) = sample_layer();
        let cps = &l.checkpoints;
        let span =
            |k: usize| &l.blob[l.spans[k].range.start as usize..l.spans[k].range.end as usize];
        // The first deflate byte with an empty window needs nothing before it.
        assert_eq!(
            prove_next(Codec::Gzip, &cps[0], span(0), &cps[1], false),
            Ok(Proof::Proven)
        );
        for k in 2..cps.len() {
            assert_eq!(
                prove_next(Codec::Gzip, &cps[k - 1], span(k - 1), &cps[k], false),
                Ok(Proof::Proven),
                "the last 32 KiB of a span do not depend on its window"
            );
        }
        let mut lie = cps[2].clone();
        lie.window = Some(vec![b'#'; WINDOW].into());
        assert!(prove_next(Codec::Gzip, &cps[1], span(1), &lie, true).is_err());
        let mut moved = cps[2].clone();
        moved.in_bit += 1;
        assert!(prove_next(Codec::Gzip, &cps[1], span(1), &moved, true).is_err());
        let mut later = cps[2].clone();
        later.out += 1;
        assert!(prove_next(Codec::Gzip, &cps[1], span(1), &later, true).is_err());
    }

    #[test]
    fn a_window_copied_from_the_one_before_needs_that_one_proven() {
        use crate::image::index::Content;
        use crate::image::pass::{index_pass, tests::tar_of};
        use crate::registry::Digest;
        // A run of one pattern: after the first few bytes everything is a copy, and
        // copies of copies lead back into the first checkpoint's window.
        let run = b"abcdefgh".repeat(3 << 20);
        let blob = crate::image::codec::gzip::tests::gzip(&tar_of(&[("run", &run)]), usize::MAX);
        let pieces = blob
            .chunks(1 << 20)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)));
        let digest = Digest::sha256_of(&blob);
        let index = index_pass(&digest, Codec::Gzip, blob.len() as u64, pieces).expect("pass");
        let Content::Stream(map) = index.content else {
            panic!("a stream");
        };
        assert!(
            map.checkpoints.len() >= 3,
            "{} checkpoints",
            map.checkpoints.len()
        );
        let r = map.spans[1].range.clone();
        let span = &blob[r.start as usize..r.end as usize];
        let (a, b) = (&map.checkpoints[1], &map.checkpoints[2]);
        assert_eq!(
            prove_next(Codec::Gzip, a, span, b, false),
            Ok(Proof::NeedsPrevious)
        );
        assert_eq!(prove_next(Codec::Gzip, a, span, b, true), Ok(Proof::Proven));
    }

    #[test]
    fn bytes_near_a_checkpoint_depend_on_its_window_far_ones_do_not() {
        let (tar, l) = sample_layer();
        let point = &l.checkpoints[2];
        let next = l.checkpoints[3].out;
        let input = &l.blob[point.in_byte() as usize..];
        let near = decode_window_free(Codec::Gzip, point, input, point.out, point.out + 4096);
        assert_eq!(
            near,
            Ok(None),
            "text just after a checkpoint copies from its window"
        );
        let (start, end) = (next - 8192, next);
        let far = decode_window_free(Codec::Gzip, point, input, start, end).expect("decodes");
        assert_eq!(
            far.as_deref(),
            Some(&tar[start as usize..end as usize]),
            "megabytes later"
        );
        // With a lying window, the far bytes are still right and the near ones refused.
        let mut lie = point.clone();
        lie.window = Some(vec![b'#'; WINDOW].into());
        let far = decode_window_free(Codec::Gzip, &lie, input, start, end).expect("decodes");
        assert_eq!(far.as_deref(), Some(&tar[start as usize..end as usize]));
        let near = decode_window_free(Codec::Gzip, &lie, input, point.out, point.out + 4096);
        assert_eq!(near, Ok(None));
    }
}
