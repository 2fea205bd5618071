//! Where decoding can start (a checkpoint) and what one decoding step did: shared by
//! every decoder.

use serde::{Deserialize, Serialize};

/// Where decoding can start: the blob's first byte, or a place the index pass found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Bit offset in the blob (a multiple of 8 except inside a deflate stream).
    pub in_bit: u64,
    /// Offset in the uncompressed tar stream.
    pub out: u64,
    /// Inside a deflate stream: the window before this point (up to 32 KiB). `None` at
    /// a point that needs no history: the start, a gzip member or zstd frame start.
    pub window: Option<Box<[u8]>>,
}

impl Checkpoint {
    pub const START: Checkpoint = Checkpoint {
        in_bit: 0,
        out: 0,
        window: None,
    };

    /// The first blob byte decoding from here reads.
    pub fn in_byte(&self) -> u64 {
        self.in_bit / 8
    }
}

/// What one [`Decoder::decode`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// Stopped where a checkpoint can be taken ([`Decoder::checkpoint`]).
    pub boundary: bool,
}
