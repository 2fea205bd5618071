//! AWS SOCI indexes (ARCHITECTURE.md, src/image/soci/): the formats, and what reading
//! files through a zTOC needs (docs/SEMANTICS.md, "Shared indexes"); finding indexes
//! through referrers and publishing them is src/fs/images/'s.
//!
//! - [`flatbuf`]: the FlatBuffers layout the zTOC uses, read and written by hand;
//! - [`ztoc`]: a zTOC (files, span digests, checkpoints), decoded and encoded;
//! - [`zinfo`]: the checkpoints inside it (SOCI's `gzip_zinfo` blob, or `TarZinfo`);
//! - [`mtime`]: its `mod_time` text;
//! - [`spans`]: span digests as SOCI defines them, from a whole blob or streaming;
//! - [`layer`]: a zTOC as regfs entries, checkpoints and spans, and back;
//!   [`layer_index`]: a zTOC as a layer index, and a pass's index as a zTOC;
//! - [`header`]: the check of a file's tar header before its bytes are served;
//! - [`verify`]: the background check that a whole layer is what its zTOC says;
//! - [`window`]: which decoded bytes depend on a checkpoint's (unvouched) window, and
//!   the proof of a checkpoint from the span before it; [`trust`]: what a reader has
//!   proven of a zTOC so far;
//! - [`artifact`]: the SOCI index manifest (v1 and v2) that lists the zTOCs.

pub mod artifact;
pub mod flatbuf;
pub mod header;
pub mod layer;
pub mod layer_index;
pub mod mtime;
pub mod spans;
pub mod trust;
pub mod verify;
pub mod window;
pub mod zinfo;
pub mod ztoc;

#[cfg(test)]
mod fbs_check;
#[cfg(test)]
mod serve_tests;
#[cfg(test)]
mod soci_fixture;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod umoci_check;
