//! gzip layers: members one after another, each a header, a raw deflate stream and a
//! CRC trailer, decoded so that decoding can later resume in the middle of a member.
//!
//! Resuming is the zran technique (zlib's examples/zran.c, also used by SOCI): at the
//! end of a deflate block the decoder's whole state is the bit position in the input
//! and the last 32 KiB of output (the window back-references may reach). With zlib's
//! C API that state can be captured (`inflate(Z_BLOCK)` stops at block ends and says
//! how many bits of the last byte are unused; `inflateGetDictionary` gives the window)
//! and restored (`inflatePrime` for the partial byte, `inflateSetDictionary`). zlib-rs
//! implements that API in Rust (`libz-rs-sys`); flate2's safe API has no prime or
//! block stops, so the few calls are made here, behind this module's safe interface.

use std::mem::MaybeUninit;

use super::position::Step;

use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_OK, Z_STREAM_END, inflate, inflateEnd, inflateGetDictionary,
    inflateInit2_, inflatePrime, inflateReset2, inflateSetDictionary, z_stream, zlibVersion,
};

/// The deflate window: how far back a match may reach.
pub const WINDOW: usize = 32 << 10;
/// Longest gzip member header accepted (a name or comment field has no length limit
/// in the format; nothing real is anywhere near this).
const MAX_HEADER: usize = 64 << 10;

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;

/// A raw inflate stream (no zlib or gzip wrapper). Boxed: zlib keeps a pointer to it.
struct Inflate {
    strm: Box<z_stream>,
}

// SAFETY: the stream's pointers are only its own allocations (state, window) and the
// buffers of the call in progress; nothing is shared between threads.
unsafe impl Send for Inflate {}

impl Inflate {
    fn new() -> Result<Inflate, String> {
        let mut strm = Box::new(z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised stream with the library's
        // allocator; the version and size identify the struct this crate was built with.
        let ret = unsafe {
            inflateInit2_(
                &mut *strm,
                -15,
                zlibVersion(),
                std::mem::size_of::<z_stream>() as i32,
            )
        };
        if ret != Z_OK {
            return Err(format!("cannot start inflate (zlib error {ret})"));
        }
        Ok(Inflate { strm })
    }

    /// Back to the start of a fresh raw deflate stream (the next member).
    fn reset(&mut self) -> Result<(), String> {
        // SAFETY: the stream was initialised by `new`.
        let ret = unsafe { inflateReset2(&mut *self.strm, -15) };
        zlib_ok(ret, "reset")
    }

    /// Restores the state at a block boundary: `bits` unused high bits of the byte
    /// before the input, and the window.
    fn prime(&mut self, bits: u32, value: u8, window: &[u8]) -> Result<(), String> {
        if bits > 0 {
            // SAFETY: initialised stream; bits <= 7 as inflatePrime requires (<= 16).
            let ret = unsafe {
                inflatePrime(&mut *self.strm, bits as i32, i32::from(value >> (8 - bits)))
            };
            zlib_ok(ret, "prime")?;
        }
        if !window.is_empty() {
            // SAFETY: initialised raw stream, before any inflate call; the slice is
            // valid for its length (at most 32 KiB, so it fits a u32).
            let ret = unsafe {
                inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32)
            };
            zlib_ok(ret, "set the window")?;
        }
        Ok(())
    }

    /// One `inflate(Z_BLOCK)` call: (status, consumed, produced, data_type).
    fn run(&mut self, input: &[u8], out: &mut [u8]) -> (i32, usize, usize, i32) {
        let (avail_in, avail_out) = (clamp(input.len()), clamp(out.len()));
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = out.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: next_in/next_out point into live slices of at least avail_in/avail_out
        // bytes for the duration of the call; the pointers are cleared right after.
        let ret = unsafe { inflate(&mut *self.strm, Z_BLOCK) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        (ret, consumed, produced, self.strm.data_type)
    }

    /// The current window (the last output of this member, at most 32 KiB).
    fn window(&self) -> Box<[u8]> {
        let mut buf: Vec<MaybeUninit<u8>> = vec![MaybeUninit::uninit(); WINDOW];
        let mut len: u32 = 0;
        // SAFETY: the buffer holds 32 KiB, the most inflateGetDictionary writes; it
        // sets `len` to the bytes written.
        let ret = unsafe { inflateGetDictionary(&*self.strm, buf.as_mut_ptr().cast(), &mut len) };
        if ret != Z_OK {
            return Box::new([]);
        }
        let len = (len as usize).min(WINDOW);
        // SAFETY: the first `len` bytes were written by inflateGetDictionary.
        buf[..len]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect()
    }

    fn message(&self) -> String {
        if self.strm.msg.is_null() {
            return "invalid deflate data".into();
        }
        // SAFETY: zlib's msg is a NUL-terminated static string when set.
        unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is not used after this.
        unsafe {
            inflateEnd(&mut *self.strm);
        }
    }
}

fn clamp(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn zlib_ok(ret: i32, what: &str) -> Result<(), String> {
    if ret == Z_OK {
        Ok(())
    } else {
        Err(format!("inflate: cannot {what} (zlib error {ret})"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Reading a member header (its bytes collect in `held`).
    Header,
    Deflate,
    /// Reading the 8-byte CRC32 + ISIZE trailer.
    Trailer,
    /// Between members: another member or the end of the blob.
    Between,
}

/// Decodes a gzip stream fed in pieces, from its start or from a resume point.
pub struct GzipDecoder {
    z: Inflate,
    part: Part,
    /// Header or trailer bytes collected so far.
    held: Vec<u8>,
    /// Blob offset of the next input byte.
    pos: u64,
    /// Uncompressed offset of the next output byte.
    out: u64,
    /// CRC32 of this member's output; `None` when decoding started inside the member
    /// (the span digests of the index cover such reads instead).
    crc: Option<u32>,
    /// This member's output length modulo 2^32 (the trailer's ISIZE).
    member_len: u32,
    /// Unused bits of the byte before `pos` at the last boundary (from data_type).
    bits: u32,
    /// A resume that starts inside a byte: its first input byte is split.
    split_first: Option<u32>,
    members: u64,
    /// Blob offset of the first member's first deflate byte, once its header is read.
    first_deflate: Option<u64>,
}

impl GzipDecoder {
    /// A decoder at the start of a gzip member: blob offset `pos`, uncompressed
    /// offset `out`.
    pub fn start(pos: u64, out: u64) -> Result<GzipDecoder, String> {
        Ok(GzipDecoder {
            z: Inflate::new()?,
            part: Part::Header,
            held: Vec::new(),
            pos,
            out,
            crc: None,
            member_len: 0,
            bits: 0,
            split_first: None,
            members: 0,
            first_deflate: None,
        })
    }

    /// A decoder at a block boundary recorded earlier: the input it is fed must start
    /// at blob byte `in_bit / 8`, and the output starts at `out`.
    pub fn resume(in_bit: u64, out: u64, window: &[u8]) -> Result<GzipDecoder, String> {
        let used = (in_bit % 8) as u32;
        let mut z = Inflate::new()?;
        if used == 0 {
            z.prime(0, 0, window)?;
        }
        Ok(GzipDecoder {
            z,
            part: Part::Deflate,
            held: if used == 0 {
                Vec::new()
            } else {
                window.to_vec()
            },
            pos: in_bit / 8,
            out,
            crc: None,
            member_len: 0,
            bits: 0,
            split_first: (used > 0).then_some(used),
            members: 0,
            first_deflate: None,
        })
    }

    /// Blob offset of the next byte to feed.
    pub fn input_pos(&self) -> u64 {
        self.pos
    }

    /// Uncompressed offset of the next byte to come out.
    pub fn output_pos(&self) -> u64 {
        self.out
    }

    /// Where the first member's deflate data starts (SOCI's first checkpoint), once
    /// a decoder that started at the blob's beginning has read its header.
    pub fn first_deflate_byte(&self) -> Option<u64> {
        self.first_deflate
    }

    /// Members whose trailer was read.
    pub fn members(&self) -> u64 {
        self.members
    }

    /// At a boundary: (bit offset in the blob, uncompressed offset, window).
    pub fn resume_point(&self) -> (u64, u64, Box<[u8]>) {
        (
            self.pos * 8 - u64::from(self.bits),
            self.out,
            self.z.window(),
        )
    }

    /// Decodes from `input` (the blob's bytes from [`Self::input_pos`]) into `out`.
    /// Stops when the input is used up, `out` is full, or at a block boundary.
    pub fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<Step, String> {
        let mut step = Step {
            consumed: 0,
            produced: 0,
            boundary: false,
        };
        let mut input = input;
        if let Some(used) = self.split_first {
            // Resuming inside a byte: its high bits belong to the block that follows.
            let Some((&first, rest)) = input.split_first() else {
                return Ok(step);
            };
            let window = std::mem::take(&mut self.held);
            self.z.prime(8 - used, first, &window)?;
            self.split_first = None;
            self.pos += 1;
            step.consumed += 1;
            input = rest;
        }
        while !input.is_empty() || self.part == Part::Deflate {
            let take = match self.part {
                Part::Between => {
                    self.next_member(input[0])?;
                    0
                }
                Part::Header => self.collect_header(input)?,
                Part::Trailer => self.collect_trailer(input)?,
                Part::Deflate => {
                    let (used, stop) = self.inflate(input, out, &mut step)?;
                    if stop {
                        step.consumed += used;
                        return Ok(step);
                    }
                    used
                }
            };
            input = &input[take..];
            step.consumed += take;
        }
        Ok(step)
    }

    /// Between members: `first` must start another.
    fn next_member(&mut self, first: u8) -> Result<(), String> {
        if first != 0x1f {
            return Err(format!(
                "byte {} after gzip member {}: not another member (trailing garbage)",
                self.pos, self.members
            ));
        }
        self.part = Part::Header;
        Ok(())
    }

    /// Takes trailer bytes from `input`; checks the trailer once it is whole.
    fn collect_trailer(&mut self, input: &[u8]) -> Result<usize, String> {
        let take = (8 - self.held.len()).min(input.len());
        self.held.extend_from_slice(&input[..take]);
        self.pos += take as u64;
        if self.held.len() == 8 {
            self.check_trailer()?;
        }
        Ok(take)
    }

    /// Inflates from `input` into what is left of `out`: (input bytes used, whether
    /// `decode` stops here: a block boundary, a full `out`, or more input needed).
    fn inflate(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        step: &mut Step,
    ) -> Result<(usize, bool), String> {
        let room = &mut out[step.produced..];
        if room.is_empty() {
            return Ok((0, true));
        }
        let (ret, used, made, data_type) = self.z.run(input, room);
        if let Some(crc) = &mut self.crc {
            *crc = crc32(*crc, &room[..made]);
        }
        self.member_len = self.member_len.wrapping_add(made as u32);
        self.pos += used as u64;
        self.out += made as u64;
        step.produced += made;
        match ret {
            Z_STREAM_END => {
                self.part = Part::Trailer;
                self.held.clear();
                Ok((used, false))
            }
            // End of a block that is not the last one: resumable here.
            Z_OK | Z_BUF_ERROR if data_type & 128 != 0 && data_type & 64 == 0 => {
                self.bits = (data_type & 7) as u32;
                step.boundary = true;
                Ok((used, true))
            }
            // Needs more input (or more room).
            Z_OK | Z_BUF_ERROR => Ok((used, used == 0 && made == 0)),
            _ => Err(format!(
                "corrupt deflate data near byte {}: {}",
                self.pos,
                self.z.message()
            )),
        }
    }

    /// The input ended: fine only between members, after at least one.
    pub fn finish(&self) -> Result<(), String> {
        if self.part == Part::Between && self.members > 0 {
            Ok(())
        } else {
            Err(format!(
                "the gzip stream ends in the middle of a member (byte {})",
                self.pos
            ))
        }
    }

    /// Collects header bytes from `input`; returns how many it took.
    fn collect_header(&mut self, input: &[u8]) -> Result<usize, String> {
        let before = self.held.len();
        self.held.extend_from_slice(input);
        match parse_member_header(&self.held) {
            Ok(Some(len)) => {
                let take = len - before;
                self.held.clear();
                self.pos += take as u64;
                if self.members == 0 {
                    self.first_deflate.get_or_insert(self.pos);
                }
                self.z.reset()?;
                self.part = Part::Deflate;
                self.crc = Some(0);
                self.member_len = 0;
                Ok(take)
            }
            Ok(None) if self.held.len() > MAX_HEADER => Err(format!(
                "gzip member header at byte {} is too long",
                self.pos
            )),
            Ok(None) => {
                self.pos += input.len() as u64;
                Ok(input.len())
            }
            Err(e) => Err(format!("byte {}: {e}", self.pos)),
        }
    }

    fn check_trailer(&mut self) -> Result<(), String> {
        let word = |i: usize| {
            u32::from_le_bytes([
                self.held[i],
                self.held[i + 1],
                self.held[i + 2],
                self.held[i + 3],
            ])
        };
        let (crc, isize) = (word(0), word(4));
        if let Some(ours) = self.crc {
            if ours != crc || self.member_len != isize {
                return Err(format!(
                    "gzip member {} fails its CRC/length check (corrupt layer)",
                    self.members
                ));
            }
        }
        self.members += 1;
        self.held.clear();
        self.part = Part::Between;
        Ok(())
    }
}

/// The length of the gzip member header at the start of `buf`, `None` if more bytes
/// are needed (RFC 1952 §2.3). A layer's first deflate byte, where SOCI's first
/// checkpoint is (src/image/soci/).
pub fn parse_member_header(buf: &[u8]) -> Result<Option<usize>, String> {
    if buf.len() < 10 {
        if buf.first().is_some_and(|&b| b != 0x1f) || buf.get(1).is_some_and(|&b| b != 0x8b) {
            return Err("not gzip data (bad magic)".into());
        }
        return Ok(None);
    }
    if buf[0] != 0x1f || buf[1] != 0x8b {
        return Err("not gzip data (bad magic)".into());
    }
    if buf[2] != 8 {
        return Err(format!(
            "gzip compression method {} (only deflate exists)",
            buf[2]
        ));
    }
    let flags = buf[3];
    if flags & 0xe0 != 0 {
        return Err("gzip header with reserved flags set".into());
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(len) = buf.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let Some(rest) = buf.get(at..) else {
                return Ok(None);
            };
            match rest.iter().position(|&b| b == 0) {
                Some(nul) => at += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    Ok((buf.len() >= at).then_some(at))
}

/// CRC32 (the gzip trailer's) of `bytes`, continuing from `crc`.
fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut crc = crc;
    for piece in bytes.chunks(u32::MAX as usize) {
        // SAFETY: the pointer and length describe a live slice.
        crc = unsafe { libz_rs_sys::crc32(u64::from(crc) as _, piece.as_ptr(), piece.len() as u32) }
            as u32;
    }
    crc
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// gzip of `data` made with zlib-rs's deflate, in members of `member` bytes.
    pub(crate) fn gzip(data: &[u8], member: usize) -> Vec<u8> {
        use libz_rs_sys::{
            Z_DEFAULT_STRATEGY, Z_DEFLATED, Z_FINISH, deflate, deflateEnd, deflateInit2_,
        };
        let mut out = Vec::new();
        for piece in data.chunks(member.max(1)) {
            let mut strm = Box::new(z_stream::default());
            // SAFETY: test-only use of the C API over live buffers.
            unsafe {
                assert_eq!(
                    deflateInit2_(
                        &mut *strm,
                        6,
                        Z_DEFLATED,
                        31,
                        8,
                        Z_DEFAULT_STRATEGY,
                        zlibVersion(),
                        std::mem::size_of::<z_stream>() as i32
                    ),
                    Z_OK
                );
                let mut buf = vec![0u8; piece.len() + 1024];
                strm.next_in = piece.as_ptr();
                strm.avail_in = piece.len() as u32;
                strm.next_out = buf.as_mut_ptr();
                strm.avail_out = buf.len() as u32;
                assert_eq!(deflate(&mut *strm, Z_FINISH), Z_STREAM_END);
                let len = buf.len() - strm.avail_out as usize;
                out.extend_from_slice(&buf[..len]);
                deflateEnd(&mut *strm);
            }
        }
        out
    }

    /// Text-like bytes that compress about 2:1 (short pseudo-random words, some
    /// repeated far apart), so a deflate stream has many blocks and windows matter.
    pub(crate) fn sample(len: usize) -> Vec<u8> {
        let mut s = 7u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            let r = next();
            if r % 5 == 0 && out.len() > 20_000 {
                // Repeat a word from up to 20 KB back: a back-reference into the window.
                let back = 8 + (r >> 8) as usize % 20_000;
                let from = out.len() - back;
                let word: Vec<u8> = out[from..from + 8].to_vec();
                out.extend_from_slice(&word);
            } else {
                for _ in 0..1 + r % 7 {
                    out.push(b'a' + (next() % 26) as u8);
                }
                out.push(b' ');
            }
        }
        out.truncate(len);
        out
    }

    /// The output of a whole decode, and the resume points found on the way.
    pub(crate) type Decoded<P> = (Vec<u8>, Vec<P>);
    type ResumePoint = (u64, u64, Box<[u8]>);

    /// Decodes all of `gz` from `dec`, feeding `piece` bytes at a time from blob
    /// offset `dec.input_pos()`; returns output and boundaries (bit, out, window).
    fn run_all(
        mut dec: GzipDecoder,
        gz: &[u8],
        piece: usize,
    ) -> Result<Decoded<ResumePoint>, String> {
        let mut out = Vec::new();
        let mut points = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut at = dec.input_pos() as usize;
        while at < gz.len() {
            let end = (at + piece).min(gz.len());
            let step = dec.decode(&gz[at..end], &mut buf)?;
            out.extend_from_slice(&buf[..step.produced]);
            at += step.consumed;
            if step.boundary {
                points.push(dec.resume_point());
            }
        }
        // Drain output still inside the decoder.
        loop {
            let step = dec.decode(&[], &mut buf)?;
            out.extend_from_slice(&buf[..step.produced]);
            if step.produced == 0 && !step.boundary {
                break;
            }
        }
        dec.finish()?;
        Ok((out, points))
    }

    #[test]
    fn decodes_multi_member_streams_in_any_pieces() {
        let data = sample(300_000);
        for member in [1 << 20, 50_000] {
            let gz = gzip(&data, member);
            for piece in [1, 333, 1 << 20] {
                let (out, points) = run_all(GzipDecoder::start(0, 0).expect("inflate"), &gz, piece)
                    .expect("valid gzip");
                assert_eq!(out, data, "member {member} piece {piece}");
                assert!(!points.is_empty());
            }
        }
    }

    #[test]
    fn resumes_at_every_boundary() {
        let data = sample(400_000);
        let gz = gzip(&data, 1 << 20);
        let (_, points) =
            run_all(GzipDecoder::start(0, 0).expect("inflate"), &gz, 1 << 20).expect("valid");
        assert!(points.len() > 3, "several blocks: {}", points.len());
        for (in_bit, out, window) in points {
            let dec = GzipDecoder::resume(in_bit, out, &window).expect("resume");
            let (rest, _) = run_all(dec, &gz, 777).expect("resumed decode");
            assert_eq!(rest, &data[out as usize..], "from bit {in_bit}");
        }
    }

    #[test]
    fn corruption_is_an_error_not_garbage() {
        let data = sample(100_000);
        let mut gz = gzip(&data, 1 << 20);
        let mid = gz.len() / 2;
        gz[mid] ^= 0x55;
        let result = run_all(GzipDecoder::start(0, 0).expect("inflate"), &gz, 4096);
        assert!(
            result.is_err(),
            "a flipped byte is caught (deflate error or CRC)"
        );

        let gz = gzip(&data, 1 << 20);
        let truncated = &gz[..gz.len() - 3];
        assert!(run_all(GzipDecoder::start(0, 0).expect("inflate"), truncated, 4096).is_err());

        let mut garbage = gzip(&data, 1 << 20);
        garbage.extend_from_slice(b"junk");
        assert!(run_all(GzipDecoder::start(0, 0).expect("inflate"), &garbage, 4096).is_err());

        assert!(
            run_all(
                GzipDecoder::start(0, 0).expect("inflate"),
                b"not gzip at all",
                4
            )
            .is_err()
        );
    }

    #[test]
    fn member_headers() {
        assert_eq!(
            parse_member_header(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]),
            Ok(Some(10))
        );
        let mut named = vec![0x1f, 0x8b, 8, FNAME, 0, 0, 0, 0, 0, 3];
        assert_eq!(parse_member_header(&named), Ok(None));
        named.extend_from_slice(b"name\0");
        assert_eq!(parse_member_header(&named), Ok(Some(15)));
        let extra = [0x1f, 0x8b, 8, FEXTRA, 0, 0, 0, 0, 0, 3, 2, 0, b'a', b'b'];
        assert_eq!(parse_member_header(&extra), Ok(Some(14)));
        assert!(parse_member_header(&[0x1f, 0x8c]).is_err());
    }
}
