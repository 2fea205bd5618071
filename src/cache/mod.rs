//! Caches: the metadata memo (names, manifests, sizes), the block cache (blob bytes in
//! memory) and the disk cache under it (shared by mounts and restarts).

pub mod blocks;
pub mod disk;
pub mod limit;
pub mod memo;

pub use blocks::BlockCache;
pub use disk::DiskCache;
pub use limit::{Idle, MemoryLimit, Reservation};
pub use memo::Memo;
