//! Caches: the metadata memo (names, manifests, sizes) and the block cache (blob bytes).

pub mod blocks;
pub mod memo;

pub use blocks::BlockCache;
pub use memo::Memo;
