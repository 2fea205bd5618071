//! Where a blob block comes from when the memory cache does not have it: the disk cache
//! (`--cache-dir`), else the registry, whose answer then goes to the disk cache too.
//! Every fetch below the memory cache (a reader's, prefetch, a stream's) goes through
//! here, so a blob on disk is never fetched again. A small blob a mirror may serve is
//! fetched from it whole and checked first (mirror_whole.rs). A block of which a
//! random reader got pieces (pieces.rs) is completed from them with one request for
//! the rest.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::blocks::BlobAt;
use super::mirror_whole::MirrorWhole;
use super::pieces::Pieces;
use crate::cache::{BlockCache, DiskCache};
use crate::registry::{RegistryClient, Result};

#[derive(Clone)]
pub struct BlockFetcher {
    client: RegistryClient,
    cache: Arc<BlockCache>,
    disk: Option<DiskCache>,
    mirror_whole: Arc<MirrorWhole>,
    /// Pieces of blocks random readers got (the blob read path's fetcher only).
    pieces: Option<Arc<Pieces>>,
}

impl BlockFetcher {
    pub fn new(client: RegistryClient, cache: Arc<BlockCache>, disk: Option<DiskCache>) -> Self {
        BlockFetcher {
            client,
            cache,
            disk,
            mirror_whole: Arc::default(),
            pieces: None,
        }
    }

    /// Blocks of which pieces are held are completed from them.
    pub fn with_pieces(self, pieces: Arc<Pieces>) -> Self {
        BlockFetcher {
            pieces: Some(pieces),
            ..self
        }
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_ref()
    }

    /// Where block `index` starts and how long it is (the last may be short).
    pub fn span(&self, size: u64, index: u64) -> (u64, u64) {
        let bs = self.cache.block_size();
        let start = index * bs;
        (start, bs.min(size.saturating_sub(start)))
    }

    /// Whether the disk cache has block `index` (a stream need not fetch it).
    pub fn on_disk(&self, blob: BlobAt<'_>, index: u64) -> bool {
        self.disk
            .as_ref()
            .is_some_and(|d| d.has_block(blob.digest, blob.size, self.cache.block_size(), index))
    }

    /// Whether this blob's blocks come from a mirror that is checked whole first
    /// (mirror_whole.rs): a stream of it would only fetch it a second time.
    pub fn checks_whole(&self, blob: BlobAt<'_>) -> bool {
        self.mirror_whole
            .checks_whole(&self.client, &self.cache, blob)
    }

    /// Block `index` by a range request (for what pieces held of it do not cover),
    /// unless the disk has it.
    pub async fn fetch(&self, blob: BlobAt<'_>, index: u64) -> Result<Bytes> {
        let (start, len) = self.span(blob.size, index);
        self.fetch_with(blob, index, || async {
            if let Some(pieces) = &self.pieces
                && let Some(block) = pieces
                    .complete(&self.client, &self.cache, blob, index)
                    .await
            {
                return block;
            }
            self.client
                .get_blob_range(blob.repo, blob.digest, start, len)
                .await
        })
        .await
    }

    /// Block `index` from the disk, else from `fetch` (a range request, or the body of
    /// a stream), which is then written to the disk.
    pub async fn fetch_with<F, Fut>(&self, blob: BlobAt<'_>, index: u64, fetch: F) -> Result<Bytes>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        let bs = self.cache.block_size();
        // Asked first (cheap), so a miss does not take a recycled buffer for nothing.
        if let Some(disk) = self.disk.as_ref().filter(|_| self.on_disk(blob, index)) {
            let (_, len) = self.span(blob.size, index);
            let buffer = self.cache.buffer(len as usize);
            if let Some(block) = disk.block(blob.digest, blob.size, bs, index, buffer).await {
                self.drop_pieces(blob, index);
                return Ok(block);
            }
        }
        if self.checks_whole(blob)
            && let Some(block) = self
                .mirror_whole
                .block(&self.client, &self.cache, self.disk.as_ref(), blob, index)
                .await
        {
            // On the disk already, with the rest of the blob.
            return Ok(block);
        }
        let block = fetch().await?;
        self.drop_pieces(blob, index);
        if let Some(disk) = &self.disk {
            disk.store_block(blob.digest, blob.size, bs, index, block.clone())
                .await;
        }
        Ok(block)
    }

    /// Pieces of a block fetched whole are not needed any more.
    fn drop_pieces(&self, blob: BlobAt<'_>, index: u64) {
        if let Some(pieces) = &self.pieces {
            pieces.drop_block(blob.digest, blob.size, index);
        }
    }
}
