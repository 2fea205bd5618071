//! zstd layers: a sequence of frames, decoded with libzstd (the `zstd` crate), noting
//! where each frame ends. A frame start is the only place decoding can resume without
//! the decoder's history, so those are the checkpoints of a zstd layer: many in a
//! zstd:chunked layer (a frame per chunk), one in a plain single-frame layer (the
//! reader's shared cursors make sequential reading of those cheap; see content.rs).

use super::position::Step;
use zstd::zstd_safe::{DCtx, DParameter, ErrorCode, InBuffer, OutBuffer, get_error_name};

/// Largest window accepted (2^27 = 128 MiB, libzstd's own default limit): a frame that
/// asks for more is refused rather than allocated.
const WINDOW_LOG_MAX: u32 = 27;

/// libzstd's streaming context, used directly (rather than through `zstd`'s raw
/// decoder) so that what it holds can be asked ([`ZstdDecoder::held_bytes`]).
pub struct ZstdDecoder {
    d: DCtx<'static>,
    pos: u64,
    out: u64,
    /// Inside a frame (some of it consumed, not all of it flushed).
    in_frame: bool,
    frames: u64,
}

fn error(code: ErrorCode) -> String {
    format!("corrupt zstd data: {}", get_error_name(code))
}

impl ZstdDecoder {
    /// A decoder at a frame start: blob offset `pos`, uncompressed offset `out`.
    pub fn at(pos: u64, out: u64) -> Result<ZstdDecoder, String> {
        let mut d = DCtx::try_create().ok_or("cannot start a zstd decoder")?;
        d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(error)?;
        Ok(ZstdDecoder {
            d,
            pos,
            out,
            in_frame: false,
            frames: 0,
        })
    }

    /// The memory the context holds now (its window and buffers, as large as the
    /// frames it decoded asked for).
    pub fn held_bytes(&self) -> u64 {
        self.d.sizeof() as u64
    }

    pub fn input_pos(&self) -> u64 {
        self.pos
    }

    pub fn output_pos(&self) -> u64 {
        self.out
    }

    /// Decodes from `input` (the blob's bytes from [`Self::input_pos`]) into `out`;
    /// stops when the input is used up, `out` is full, or a frame ends.
    pub fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<Step, String> {
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        let hint = self
            .d
            .decompress_stream(&mut outb, &mut inb)
            .map_err(error)?;
        let (consumed, produced) = (inb.pos(), outb.pos());
        self.pos += consumed as u64;
        self.out += produced as u64;
        if consumed > 0 {
            self.in_frame = true;
        }
        let boundary = hint == 0 && self.in_frame;
        if boundary {
            self.in_frame = false;
            self.frames += 1;
        }
        Ok(Step {
            consumed,
            produced,
            boundary,
        })
    }

    /// The input ended: fine only between frames, after at least one.
    pub fn finish(&self) -> Result<(), String> {
        if !self.in_frame && self.frames > 0 {
            Ok(())
        } else {
            Err(format!(
                "the zstd stream ends in the middle of a frame (byte {})",
                self.pos
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|p| zstd::bulk::compress(p, 3).expect("compress"))
            .collect()
    }

    fn decode_all(
        mut d: ZstdDecoder,
        blob: &[u8],
        piece: usize,
    ) -> Result<super::super::gzip::tests::Decoded<(u64, u64)>, String> {
        let (mut out, mut starts) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 1000];
        let mut at = d.input_pos() as usize;
        loop {
            let end = (at + piece).min(blob.len());
            let step = d.decode(&blob[at..end], &mut buf)?;
            out.extend_from_slice(&buf[..step.produced]);
            at += step.consumed;
            if step.boundary {
                starts.push((d.input_pos(), d.output_pos()));
            }
            if at == blob.len() && step.produced == 0 && !step.boundary {
                break;
            }
        }
        d.finish()?;
        Ok((out, starts))
    }

    #[test]
    fn frames_are_found_and_resumable() {
        let (a, b, c) = (vec![1u8; 5000], b"second frame".to_vec(), vec![7u8; 70_000]);
        let blob = frames(&[&a, &b, &c]);
        let all: Vec<u8> = [a.clone(), b.clone(), c.clone()].concat();
        for piece in [1, 13, 1 << 20] {
            let (out, starts) =
                decode_all(ZstdDecoder::at(0, 0).expect("dctx"), &blob, piece).expect("valid");
            assert_eq!(out, all);
            assert_eq!(starts.len(), 3, "piece {piece}");
            let (pos, produced) = starts[0];
            let (rest, _) = decode_all(ZstdDecoder::at(pos, produced).expect("dctx"), &blob, piece)
                .expect("resumed at a frame start");
            assert_eq!(rest, &all[produced as usize..]);
        }
    }

    #[test]
    fn corrupt_or_truncated_is_an_error() {
        let blob = frames(&[&vec![3u8; 100_000]]);
        assert!(
            decode_all(
                ZstdDecoder::at(0, 0).expect("dctx"),
                &blob[..blob.len() - 2],
                64
            )
            .is_err()
        );
        assert!(
            decode_all(
                ZstdDecoder::at(0, 0).expect("dctx"),
                b"definitely not zstd",
                64
            )
            .is_err()
        );
    }
}
