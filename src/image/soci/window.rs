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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::soci::tests::sample_layer;

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
