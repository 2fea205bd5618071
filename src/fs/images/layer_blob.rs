//! A layer blob's bytes for the image code (`image::source::BlobSource`), read through the
//! block cache like any blob: what the index pass streams stays cached for the file
//! reads that follow, and a layer read as a blob and as files is fetched once.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, try_join_all};
use futures_util::stream::{self, BoxStream};
use tracing::debug;

use super::priority::Foreground;
use crate::cache::{BlockCache, Reservation};
use crate::fs::blob::{BlobAt, BlockFetcher, BodyCursor, join_blocks};
use crate::image::source::BlobSource;
use crate::registry::{Digest, Error, RepoName, Result};

#[derive(Clone)]
pub struct LayerBlob {
    pub repo: RepoName,
    pub digest: Digest,
    pub size: u64,
    pub cache: Arc<BlockCache>,
    /// Below the memory cache: the disk cache, then the registry.
    pub fetcher: BlockFetcher,
    /// Marked busy while this blob is fetched for a reader, so background reads wait.
    pub foreground: Arc<Foreground>,
}

impl LayerBlob {
    fn blob(&self) -> BlobAt<'_> {
        BlobAt {
            repo: &self.repo,
            digest: &self.digest,
            size: self.size,
        }
    }

    async fn block(&self, index: u64) -> Result<Bytes> {
        self.cache
            .get(&(self.digest.clone(), index), || async {
                let _busy = self.foreground.busy();
                self.fetcher.fetch(self.blob(), index).await
            })
            .await
    }

    /// Block `index` for a reader going through the blob in order: from the cache, or
    /// from `cursor`, a streaming GET opened at the first block that was not cached (a
    /// stream that breaks off is replaced by a range request, which retries).
    async fn next_block(&self, index: u64, cursor: &mut Option<BodyCursor>) -> Result<Bytes> {
        let key = (self.digest.clone(), index);
        if let Some(block) = self.cache.peek(&key) {
            return Ok(block);
        }
        let _busy = self.foreground.busy();
        if self.fetcher.on_disk(self.blob(), index) || self.fetcher.checks_whole(self.blob()) {
            return self.block(index).await;
        }
        let (start, len) = self.fetcher.span(self.size, index);
        let client = self.fetcher.client();
        self.cache
            .get(&key, || {
                self.fetcher.fetch_with(self.blob(), index, || async {
                    // Behind, or far ahead of what is cached: a new stream from here.
                    let far = 4 * self.cache.block_size();
                    if cursor.as_ref().is_none_or(|c| c.at() > start || start - c.at() > far) {
                        *cursor = Some(BodyCursor::open(client, &self.repo, &self.digest, start).await?);
                    }
                    let streamed = match cursor.as_mut() {
                        Some(c) => c.block(&self.cache, start, len).await,
                        None => Err(Error::Unavailable("no stream".into())),
                    };
                    match streamed {
                        Ok(block) => Ok(block),
                        Err(e) => {
                            debug!(digest = %self.digest, block = index, "layer stream broke off ({e}); asking for the block");
                            *cursor = None;
                            client.get_blob_range(&self.repo, &self.digest, start, len).await
                        }
                    }
                })
            })
            .await
    }
}

impl BlobSource for LayerBlob {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            if len == 0 || end > self.size {
                return if len == 0 {
                    Ok(Bytes::new())
                } else {
                    Err(Error::BadAnswer(format!(
                        "layer {}: bytes {offset}..{end} are beyond its {} bytes",
                        self.digest, self.size
                    )))
                };
            }
            let bs = self.cache.block_size();
            let (first, last) = (offset / bs, (end - 1) / bs);
            let blocks = try_join_all((first..=last).map(|i| self.block(i))).await?;
            Ok(join_blocks(&blocks, first * bs, offset, end))
        })
    }

    /// TOC chunks: the exact range, not the blocks around it (image/source.rs says why).
    fn fetch_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            if len == 0 || end > self.size {
                return self.read(offset, len).await; // its answer for these
            }
            let bs = self.cache.block_size();
            let (first, last) = (offset / bs, (end - 1) / bs);
            let held: Option<Vec<Bytes>> = (first..=last)
                .map(|i| self.cache.peek(&(self.digest.clone(), i)))
                .collect();
            if let Some(blocks) = held {
                return Ok(join_blocks(&blocks, first * bs, offset, end));
            }
            let _busy = self.foreground.busy();
            let blob = self.blob();
            let on_disk = (first..=last).all(|i| self.fetcher.on_disk(blob, i));
            if on_disk || self.fetcher.checks_whole(blob) {
                return self.read(offset, len).await;
            }
            // Held in memory until its reader has checked and kept it: a fetch in the
            // budget like any other.
            let _reserved = self.cache.reserve_bytes(len).await;
            let client = self.fetcher.client();
            client
                .get_blob_range(&self.repo, &self.digest, offset, len)
                .await
        })
    }

    fn stream(&self) -> BoxStream<'_, Result<Bytes>> {
        let blocks = self.size.div_ceil(self.cache.block_size());
        Box::pin(stream::unfold(
            (0u64, None::<BodyCursor>),
            move |(index, mut cursor)| async move {
                if index >= blocks {
                    return None;
                }
                let block = self.next_block(index, &mut cursor).await;
                let next = if block.is_ok() { index + 1 } else { blocks };
                Some((block, (next, cursor)))
            },
        ))
    }

    fn stream_piece(&self) -> u64 {
        self.cache.block_size()
    }

    fn working_memory(&self, bytes: u64) -> BoxFuture<'_, Option<Reservation>> {
        Box::pin(self.cache.reserve_working(bytes))
    }

    fn distrust(&self) {
        self.fetcher.client().distrust_mirrors(&self.digest);
        self.cache.forget(&self.digest);
        if let Some(disk) = self.fetcher.disk() {
            disk.forget(&self.digest, self.cache.block_size());
        }
    }
}
