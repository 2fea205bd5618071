//! The read path of blobs, stage by stage (as mountpoint-s3's prefetch/): a read
//! becomes blocks (reads.rs) in a window earned by reading in order (readahead.rs),
//! then one stream per sequential reader (stream.rs) unless the link is better used by
//! parallel fetches (link_speed.rs); a block the memory cache lacks comes from the disk
//! cache, a mirror checked whole (mirror_whole.rs) or the registry (fetch.rs); a read
//! from first byte to last is checked against the digest (verify.rs). A reader that
//! jumps about gets the pieces of blocks it touches, not whole blocks (pieces.rs).

mod blocks;
mod fetch;
mod link_speed;
mod mirror_whole;
mod pieces;
mod readahead;
mod reads;
mod stream;
mod verify;

pub use blocks::{BlobAt, join_blocks};
pub use fetch::BlockFetcher;
pub use reads::{BlobReads, OpenBlob};
pub use stream::BodyCursor;
