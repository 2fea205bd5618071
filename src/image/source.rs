//! How the image code reads a layer's bytes: through this trait, which the filesystem
//! layer implements over the block cache and the registry client (so layer bytes are
//! cached and counted like any blob read, and this module knows nothing of either).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::registry::{Digest, Result};

pub trait BlobSource: Send + Sync {
    fn digest(&self) -> &Digest;

    /// The blob's exact size.
    fn size(&self) -> u64;

    /// Exactly `len` bytes from `offset` (within the blob), through the block cache:
    /// the blocks around them are fetched whole and kept.
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>>;

    /// Exactly `len` bytes from `offset`, and no more: from the caches if they hold
    /// them, else one range request for just these bytes, not kept as blocks. For TOC
    /// layers, whose chunks are small, self-contained and cached decoded by the caller:
    /// a 2 MiB block around a 20 KiB chunk would move a hundred times the bytes.
    fn fetch_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>>;

    /// The whole blob from its first byte, in order, in pieces of any size.
    fn stream(&self) -> BoxStream<'_, Result<Bytes>>;

    /// Bytes read from this blob turned out wrong: drop whatever is cached of it.
    fn distrust(&self);
}
