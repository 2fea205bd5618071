//! Blobs from a mirror, checked before any byte of them is served.
//!
//! A mirror is one more party that could hand out wrong bytes (a cache with a damaged
//! disk, a P2P peer that lies). The origin's bytes are checked as they are read (see
//! verify.rs): a wrong blob read to the end fails its last read. For a mirror that is
//! not enough: the reader should get the origin's right bytes instead, not an error.
//! So a blob small enough to hold is fetched from the mirror whole, hashed, and only
//! then put into the block cache (and the disk cache, as verified); a mirror that sends
//! wrong bytes is not asked for the blob again and the read goes on to the origin.
//! Larger blobs are read from the mirror by ranges and checked like the origin's; a
//! mismatch there fails the read once and then reads go to the origin (see reads.rs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::OnceCell;

use super::blocks::BlobAt;
use crate::cache::{BlockCache, DiskCache};
use crate::registry::{Digest, RegistryClient};

/// The largest blob fetched whole from a mirror (less if the memory cache is small: a
/// quarter of it). Most configs and many layers are below; the blob is held in memory
/// while it is checked.
pub const MAX_WHOLE: u64 = 64 << 20;

/// The blocks of a blob a mirror served right, or None when no mirror did.
type Whole = Option<Arc<Vec<Bytes>>>;

/// Whole-blob fetches in flight, one per blob however many blocks of it are wanted.
#[derive(Default)]
pub struct MirrorWhole {
    in_flight: Mutex<HashMap<Digest, Arc<OnceCell<Whole>>>>,
}

impl MirrorWhole {
    /// Whether blocks of `blob` should come through [`Self::block`]: a mirror may serve
    /// it and it is small enough to check whole first.
    pub fn checks_whole(
        &self,
        client: &RegistryClient,
        cache: &BlockCache,
        blob: BlobAt<'_>,
    ) -> bool {
        blob.size <= MAX_WHOLE.min(cache.budget() / 4) && client.mirrors_may_serve(blob.digest)
    }

    /// Block `index` of `blob` from a mirror, after the whole blob matched its digest;
    /// the other blocks go into the caches. None when no mirror served it right (each
    /// that failed is not asked for it again): then the origin is asked.
    pub async fn block(
        &self,
        client: &RegistryClient,
        cache: &BlockCache,
        disk: Option<&DiskCache>,
        blob: BlobAt<'_>,
        index: u64,
    ) -> Option<Bytes> {
        let flight = self.lock().entry(blob.digest.clone()).or_default().clone();
        let bs = cache.block_size();
        let whole = flight
            .get_or_init(|| async {
                let piece = usize::try_from(bs).unwrap_or(usize::MAX);
                let blocks = client
                    .verified_from_mirror(blob.repo, blob.digest, blob.size, piece)
                    .await?;
                for (i, block) in blocks.iter().enumerate() {
                    let i = i as u64;
                    if i != index {
                        cache.insert((blob.digest.clone(), i), block.clone());
                    }
                    if let Some(disk) = disk {
                        disk.store_block(blob.digest, blob.size, bs, i, block.clone())
                            .await;
                    }
                }
                if let Some(disk) = disk {
                    disk.verified(blob.digest, blob.size, bs);
                }
                Some(Arc::new(blocks))
            })
            .await
            .clone();
        {
            let mut in_flight = self.lock();
            if in_flight
                .get(blob.digest)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                in_flight.remove(blob.digest);
            }
        }
        let index = usize::try_from(index).ok()?;
        whole.and_then(|blocks| blocks.get(index).cloned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<OnceCell<Whole>>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
