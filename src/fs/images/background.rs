//! Layer blobs read whole in the background, below the reads programs wait on
//! (docs/SEMANTICS.md, "Image contents"): a block at a time, each by its own range
//! request once the foreground has been quiet for a moment (priority.rs), a few at once
//! per mount, kept in the disk cache (not the memory cache) and checked against the
//! blob's digest at the end, so the disk then holds the layer whole and verified.
//!
//! [`Background::read_whole`] is the reusable piece (a layer checked whole after its
//! files were served from an index); [`Background::fill`] is its use for TOC layers: the
//! bytes before the eStargz prefetch landmark at once when the layer is indexed, the
//! rest once a file of it (or of its image) has been opened, so later reads hit the
//! disk. Bytes fetched here are counted apart (`images.background_bytes`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::layer_blob::LayerBlob;
use super::priority::Foreground;
use crate::fs::blob::BlobAt;
use crate::image::source::BlobSource;
use crate::registry::{Error, Result};
use crate::stats::Stats;

/// How long the foreground must have fetched nothing before a background block starts.
const QUIET: Duration = Duration::from_millis(200);
/// Background range requests in flight per mount, and blocks ahead per blob.
const SLOTS: usize = 4;
pub const AHEAD: usize = 2;

/// The mount's background reads: the foreground they give way to, and their slots.
pub struct Background {
    foreground: Arc<Foreground>,
    slots: Semaphore,
    stats: Arc<Stats>,
    /// Whether TOC layers are filled (`--no-background-fetch` says no).
    fills: bool,
}

/// A signal set once (a layer's files were opened), waited for by a fill.
#[derive(Default)]
pub struct Signal {
    set: AtomicBool,
    notify: Notify,
}

impl Signal {
    pub fn give(&self) {
        if !self.set.load(Ordering::Acquire) && !self.set.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.set.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// A TOC layer's fill: stopped when the layer's index is dropped.
pub struct Fill {
    opened: Arc<Signal>,
    task: JoinHandle<()>,
}

impl Fill {
    /// A file of the layer (or of an image it is in) was opened: fetch the rest.
    pub fn opened(&self) {
        self.opened.give();
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Background {
    pub fn new(stats: Arc<Stats>, fills: bool) -> Background {
        Background {
            foreground: Arc::default(),
            slots: Semaphore::new(SLOTS),
            stats,
            fills,
        }
    }

    /// What foreground fetches mark themselves busy with.
    pub fn foreground(&self) -> &Arc<Foreground> {
        &self.foreground
    }

    /// Starts filling a TOC layer's blob into the disk cache, unless fills are off,
    /// there is no disk cache, or the blob is whole on disk already (then `whole` is
    /// set: the layer is verified). `prefetch_end`: the landmark's place.
    pub fn fill(
        self: &Arc<Self>,
        blob: LayerBlob,
        prefetch_end: Option<u64>,
        whole: Arc<AtomicBool>,
    ) -> Option<Fill> {
        let disk = blob.fetcher.disk()?;
        if disk.whole_blob(&blob.digest, blob.size).is_some() {
            whole.store(true, Ordering::Release);
            return None;
        }
        if !self.fills {
            return None;
        }
        let opened = Arc::new(Signal::default());
        let (this, signal) = (self.clone(), opened.clone());
        let task = tokio::spawn(async move {
            let urgent = prefetch_end.unwrap_or(0);
            if urgent == 0 {
                signal.wait().await;
            }
            let layer = blob.digest.clone();
            debug!(%layer, urgent, "fetching the layer in the background");
            match this.read_whole(&blob, &signal, urgent).await {
                Ok(true) => {
                    Stats::add(&this.stats.background_layers, 1);
                    whole.store(true, Ordering::Release);
                    info!(%layer, "layer fetched whole in the background and verified");
                }
                Ok(false) => {
                    warn!(%layer, "fetched in the background, the layer does not match its digest; its files are still read chunk by chunk, each checked")
                }
                Err(e) => debug!(%layer, "background fetch stopped: {e}"),
            }
        });
        Some(Fill { opened, task })
    }

    /// Reads `blob` whole in the background ([`Self::blocks`]) and checks it against its
    /// digest; when it matches, the disk cache keeps it whole (shared by every
    /// registry, read by passthrough). Ok(false): it did not match (what is cached of
    /// it is dropped).
    pub async fn read_whole(&self, blob: &LayerBlob, go: &Signal, urgent: u64) -> Result<bool> {
        let mut hasher = blob.digest.hasher();
        let mut blocks = self.blocks(blob, go, urgent);
        while let Some(block) = blocks.next().await {
            let block = block?;
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&block);
                hasher
            })
            .await
            .map_err(|e| Error::Unavailable(format!("hashing task failed: {e}")))?;
        }
        if !hasher.matches(&blob.digest) {
            blob.distrust();
            return Ok(false);
        }
        if let Some(disk) = blob.fetcher.disk() {
            disk.verified(&blob.digest, blob.size, blob.cache.block_size());
        }
        Ok(true)
    }

    /// The blob's blocks in order, from its first: from memory or the disk if there,
    /// else fetched, each kept on disk. Bytes before `urgent` are fetched at once; the
    /// rest wait for `go`, then for each block a quiet moment in the foreground.
    pub fn blocks<'a>(
        &'a self,
        blob: &'a LayerBlob,
        go: &'a Signal,
        urgent: u64,
    ) -> BoxStream<'a, Result<Bytes>> {
        let count = blob.size.div_ceil(blob.cache.block_size());
        let bs = blob.cache.block_size();
        Box::pin(
            stream::iter(0..count)
                .map(move |i| async move {
                    let at_once = i * bs < urgent;
                    if !at_once {
                        go.wait().await;
                    }
                    self.block(blob, i, at_once).await
                })
                .buffered(AHEAD),
        )
    }

    /// Block `index` of `blob`, kept on disk.
    async fn block(&self, blob: &LayerBlob, index: u64, at_once: bool) -> Result<Bytes> {
        let at = BlobAt {
            repo: &blob.repo,
            digest: &blob.digest,
            size: blob.size,
        };
        let (start, len) = blob.fetcher.span(blob.size, index);
        let bs = blob.cache.block_size();
        let disk = blob.fetcher.disk();
        if let Some(block) = blob.cache.peek(&(blob.digest.clone(), index)) {
            if let Some(disk) = disk.filter(|_| !blob.fetcher.on_disk(at, index)) {
                disk.store_block_below(&blob.digest, blob.size, bs, index, block.clone())
                    .await;
            }
            return Ok(block);
        }
        if let Some(disk) = disk.filter(|_| blob.fetcher.on_disk(at, index)) {
            let buffer = blob.cache.buffer(len as usize);
            if let Some(block) = disk.block(&blob.digest, blob.size, bs, index, buffer).await {
                return Ok(block);
            }
        }
        if !at_once {
            self.foreground.quiet(QUIET).await;
        }
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("background reads stopped".into()))?;
        let _reserved = blob.cache.reserve_bytes(len).await; // cache/limit.rs
        let client = blob.fetcher.client();
        let fetch = client.get_blob_range(&blob.repo, &blob.digest, start, len);
        let block = Stats::in_background(fetch).await?;
        if let Some(disk) = disk {
            disk.store_block_below(&blob.digest, blob.size, bs, index, block.clone())
                .await;
        }
        Ok(block)
    }
}
