//! One decoder over tar (none), gzip and zstd that can start at the blob's beginning or
//! at a checkpoint.

use super::gzip::GzipDecoder;
use super::media_type::Codec;
use super::position::{Checkpoint, Step};
use super::zstd_frames::ZstdDecoder;

pub enum Decoder {
    /// Uncompressed: the output is the input.
    Tar {
        pos: u64,
    },
    Gzip(Box<GzipDecoder>),
    Zstd(Box<ZstdDecoder>),
}

/// What a zstd decoder's window is counted at in the memory budget: the largest window
/// of zstd's levels up to 19 and of the Go encoders container tools use (8 MiB).
pub const ZSTD_WINDOW_COUNTED: u64 = 8 << 20;

impl Decoder {
    /// The memory a decoder of `codec` holds (counted in the memory budget while it
    /// works, cache/limit.rs): for gzip, the inflate state, its 32 KiB window and a
    /// member header; for zstd, the window and libzstd's block buffers.
    pub fn working_bytes(codec: Codec) -> u64 {
        match codec {
            Codec::Tar => 0,
            Codec::Gzip => 128 << 10,
            Codec::Zstd => ZSTD_WINDOW_COUNTED + (256 << 10),
        }
    }

    /// The memory this decoder holds now (a zstd context as large as its frames'
    /// windows made it; gzip's and tar's are fixed).
    pub fn held_bytes(&self) -> u64 {
        match self {
            Decoder::Tar { .. } => 0,
            Decoder::Gzip(_) => Self::working_bytes(Codec::Gzip),
            Decoder::Zstd(d) => d.held_bytes(),
        }
    }

    /// A decoder starting at `point` of a blob with this codec.
    pub fn at(codec: Codec, point: &Checkpoint) -> Result<Decoder, String> {
        Ok(match (codec, &point.window) {
            (Codec::Tar, _) => Decoder::Tar {
                pos: point.in_byte(),
            },
            (Codec::Gzip, None) => {
                Decoder::Gzip(Box::new(GzipDecoder::start(point.in_byte(), point.out)?))
            }
            (Codec::Gzip, Some(window)) => Decoder::Gzip(Box::new(GzipDecoder::resume(
                point.in_bit,
                point.out,
                window,
            )?)),
            (Codec::Zstd, _) => {
                Decoder::Zstd(Box::new(ZstdDecoder::at(point.in_byte(), point.out)?))
            }
        })
    }

    /// Blob offset of the next byte to feed.
    pub fn input_pos(&self) -> u64 {
        match self {
            Decoder::Tar { pos } => *pos,
            Decoder::Gzip(d) => d.input_pos(),
            Decoder::Zstd(d) => d.input_pos(),
        }
    }

    /// Uncompressed offset of the next byte to come out.
    pub fn output_pos(&self) -> u64 {
        match self {
            Decoder::Tar { pos } => *pos,
            Decoder::Gzip(d) => d.output_pos(),
            Decoder::Zstd(d) => d.output_pos(),
        }
    }

    /// Decodes from `input` (blob bytes from [`Self::input_pos`]) into `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<Step, String> {
        match self {
            Decoder::Tar { pos } => {
                let n = input.len().min(out.len());
                out[..n].copy_from_slice(&input[..n]);
                *pos += n as u64;
                // Every offset is a place to start; no checkpoints are needed.
                Ok(Step {
                    consumed: n,
                    produced: n,
                    boundary: false,
                })
            }
            Decoder::Gzip(d) => d.decode(input, out),
            Decoder::Zstd(d) => d.decode(input, out),
        }
    }

    /// The checkpoint here; only meaningful right after a step that reported a boundary.
    pub fn checkpoint(&self) -> Checkpoint {
        match self {
            Decoder::Tar { pos } => Checkpoint {
                in_bit: pos * 8,
                out: *pos,
                window: None,
            },
            Decoder::Gzip(d) => {
                let (in_bit, out, window) = d.resume_point();
                Checkpoint {
                    in_bit,
                    out,
                    window: Some(window),
                }
            }
            Decoder::Zstd(d) => Checkpoint {
                in_bit: d.input_pos() * 8,
                out: d.output_pos(),
                window: None,
            },
        }
    }

    /// gzip: where the first member's deflate data starts, once its header was read.
    pub fn first_deflate_byte(&self) -> Option<u64> {
        match self {
            Decoder::Gzip(d) => d.first_deflate_byte(),
            _ => None,
        }
    }

    /// gzip: members read whole so far.
    pub fn gzip_members(&self) -> u64 {
        match self {
            Decoder::Gzip(d) => d.members(),
            _ => 0,
        }
    }

    /// The input ended; an error unless the stream ended cleanly.
    pub fn finish(&self) -> Result<(), String> {
        match self {
            Decoder::Tar { .. } => Ok(()),
            Decoder::Gzip(d) => d.finish(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

/// Decodes `input`, the blob's bytes from a member or frame start, and returns output
/// bytes `skip .. skip + want` (for a TOC chunk, or a TOC itself). Stops decoding as
/// soon as it has them; too little output is an error.
pub fn decode_range(codec: Codec, input: &[u8], skip: u64, want: usize) -> Result<Vec<u8>, String> {
    let mut decoder = Decoder::at(codec, &Checkpoint::START)?;
    let mut out = Vec::with_capacity(want);
    let mut buf = vec![0u8; (64 << 10).min(want.max(4096) + 4096)];
    let mut rest = input;
    let end = skip.saturating_add(want as u64);
    while (out.len() as u64) < want as u64 {
        let before = decoder.output_pos();
        let step = decoder.decode(rest, &mut buf)?;
        rest = &rest[step.consumed..];
        let produced = &buf[..step.produced];
        // The part of this output that falls in skip..end.
        let from = skip.saturating_sub(before).min(produced.len() as u64) as usize;
        let to = end.saturating_sub(before).min(produced.len() as u64) as usize;
        if from < to {
            out.extend_from_slice(&produced[from..to]);
        }
        if rest.is_empty() && step.produced == 0 && step.consumed == 0 && !step.boundary {
            return Err(format!(
                "compressed data ends after {} of {} bytes",
                out.len(),
                want
            ));
        }
    }
    Ok(out)
}
