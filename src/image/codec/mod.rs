//! Layer codecs: the compression of a layer from its media type, and one decoder over
//! tar, gzip and zstd that starts at a layer's beginning or at a checkpoint.
//!
//! - [`media_type`]: [`Codec`] from a layer's media type;
//! - [`position`]: [`Checkpoint`] (where decoding can start) and [`Step`];
//! - [`decoder`]: [`Decoder`] over the three, and [`decode_range`];
//! - [`gzip`]: gzip members with resumable deflate (zran-style checkpoints);
//! - [`zstd_frames`]: zstd frames, whose starts are checkpoints.

pub mod decoder;
pub mod gzip;
pub mod media_type;
pub mod position;
pub mod zstd_frames;

pub use decoder::{Decoder, decode_range};
pub use media_type::Codec;
pub use position::{Checkpoint, Step};
