//! How the image code reads a layer's bytes: through this trait, which the filesystem
//! layer implements over the block cache and the registry client (so layer bytes are
//! cached and counted like any blob read, and this module knows nothing of either).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::cache::Reservation;
use crate::registry::{Digest, Result};

pub trait BlobSource: Send + Sync {
    fn digest(&self) -> &Digest;

    /// The blob's exact size.
    fn size(&self) -> u64;

    /// Exactly `len` bytes from `offset` (within the blob), through the block cache:
    /// the blocks around them are fetched whole and kept.
    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>>;

    /// Exactly `len` bytes from `offset`, and no more: from the caches if they hold
    /// them, else one range request for just these bytes, not kept as blocks. For
    /// pieces the caller checks and keeps itself: TOC chunks (a 2 MiB block around a
    /// 20 KiB chunk would move a hundred times the bytes) and spans of plain layers.
    fn fetch_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>>;

    /// The whole blob from its first byte, in order, in pieces of any size.
    fn stream(&self) -> BoxStream<'_, Result<Bytes>>;

    /// Bytes read from this blob turned out wrong: drop whatever is cached of it.
    fn distrust(&self);

    /// The most bytes one piece of [`Self::stream`] holds.
    fn stream_piece(&self) -> u64;

    /// Reserves `bytes` of working memory (a decoder, its buffers, the pieces it holds)
    /// in the mount's memory budget until dropped, waiting for room (cache/limit.rs);
    /// `None` where there is no budget.
    fn working_memory(&self, bytes: u64) -> BoxFuture<'_, Option<Reservation>>;
}

/// A blob held in memory, for tests: records what was asked of it.
#[cfg(test)]
pub mod mem {
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use futures_util::stream::BoxStream;

    use super::BlobSource;
    use crate::cache::Reservation;
    use crate::registry::{Digest, Error, Result};

    pub struct MemSource {
        pub digest: Digest,
        pub bytes: Bytes,
        /// `(offset, len)` of every `fetch_range`, and how many `read`s and streams.
        pub fetched: Mutex<Vec<(u64, u64)>>,
        pub block_reads: Mutex<usize>,
        pub distrusted: Mutex<bool>,
    }

    impl MemSource {
        pub fn new(bytes: Vec<u8>) -> MemSource {
            MemSource {
                digest: Digest::sha256_of(&bytes),
                bytes: bytes.into(),
                fetched: Mutex::default(),
                block_reads: Mutex::default(),
                distrusted: Mutex::default(),
            }
        }

        fn slice(&self, offset: u64, len: u64) -> Result<Bytes> {
            let end = offset.saturating_add(len);
            if end > self.bytes.len() as u64 {
                return Err(Error::BadAnswer(format!("{offset}+{len} beyond the blob")));
            }
            Ok(self.bytes.slice(offset as usize..end as usize))
        }
    }

    impl BlobSource for MemSource {
        fn digest(&self) -> &Digest {
            &self.digest
        }

        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }

        fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
            *self.block_reads.lock().expect("lock") += 1;
            Box::pin(async move { self.slice(offset, len) })
        }

        fn fetch_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
            self.fetched.lock().expect("lock").push((offset, len));
            Box::pin(async move { self.slice(offset, len) })
        }

        fn stream(&self) -> BoxStream<'_, Result<Bytes>> {
            *self.block_reads.lock().expect("lock") += 1;
            let pieces: Vec<Result<Bytes>> = self
                .bytes
                .chunks(1 << 20)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Box::pin(futures_util::stream::iter(pieces))
        }

        fn distrust(&self) {
            *self.distrusted.lock().expect("lock") = true;
        }

        fn stream_piece(&self) -> u64 {
            1 << 20
        }

        fn working_memory(&self, _: u64) -> BoxFuture<'_, Option<Reservation>> {
            Box::pin(async { None })
        }
    }
}
