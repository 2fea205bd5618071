//! The background check of a layer served from a zTOC (docs/SEMANTICS.md, "Shared
//! indexes"): once the first files are served, the whole blob is read once, at the
//! lowest priority (one check at a time per mount, each block as a background read
//! of background.rs: after a quiet moment of the foreground, kept on disk, not in the
//! memory cache), and held against its digest and everything the zTOC says
//! (`image::check_layer`). Its bytes are counted apart (`images.background_bytes`).
//!
//! Passed: the index is as good as a pass's, and kept in the disk cache. A lie: the
//! index is refused (the layer's files fail from then on, the next look reads the
//! layer by a pass). The registry not answering: tried again later, a few times.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::background::{Background, Signal};
use super::layer_blob::LayerBlob;
use crate::cache::DiskCache;
use crate::image::content::LayerContent;
use crate::image::index::{Content, DISK_KIND, IndexSource};
use crate::image::{check_layer, check_working_bytes};
use crate::registry::{Digest, Result};
use crate::stats::Stats;

/// How long after a layer's index is ready its check starts: the first files first.
const DELAY: Duration = Duration::from_secs(2);
/// Tries of a check the registry kept failing, and the wait between them.
const TRIES: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What a check needs beyond the layer.
#[derive(Clone)]
pub struct Checks {
    /// One check at a time: the lowest priority there is.
    pub one_at_a_time: Arc<Semaphore>,
    pub disk: Option<DiskCache>,
    pub stats: Arc<Stats>,
    /// The mount's background reads, which fetch the blocks.
    pub background: Arc<Background>,
}

impl Checks {
    pub fn new(disk: Option<DiskCache>, stats: Arc<Stats>, background: Arc<Background>) -> Checks {
        Checks {
            one_at_a_time: Arc::new(Semaphore::new(1)),
            disk,
            stats,
            background,
        }
    }

    /// Checks `indexed` (a layer served from a zTOC) in the background; `disk_key` is
    /// where its index goes in the disk cache once checked.
    pub fn start<L>(&self, layer: Arc<L>, blob: LayerBlob, disk_key: Digest)
    where
        L: AsRef<LayerContent> + Send + Sync + 'static,
    {
        let checks = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DELAY).await;
            for attempt in 1..=TRIES {
                let Ok(turn) = checks.one_at_a_time.acquire().await else {
                    return;
                };
                let content = (*layer).as_ref();
                if content.refusal().is_some() {
                    return; // a read found it out first
                }
                match checks.check(content, &blob, &disk_key).await {
                    Ok(()) => return,
                    Err(e) if attempt < TRIES => {
                        warn!(layer = %blob.digest, "background check of the layer not finished ({e}); trying again later");
                    }
                    Err(e) => {
                        warn!(layer = %blob.digest, "background check of the layer given up: {e}");
                        return;
                    }
                }
                drop(turn);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        });
    }

    /// One try: an error is a read that failed.
    async fn check(
        &self,
        content: &LayerContent,
        blob: &LayerBlob,
        disk_key: &Digest,
    ) -> Result<()> {
        let index = content.index().clone();
        let ahead = super::background::AHEAD as u64;
        let working = match &index.content {
            Content::Stream(map) => check_working_bytes(map.codec, blob.cache.block_size(), ahead),
            Content::Chunks(_) => 0, // a zTOC's index is a stream's; check_layer says so
        };
        // Before the first block is fetched: it waits holding nothing (cache/limit.rs).
        let _working = blob.cache.reserve_working(working).await;
        let go = Signal::default();
        go.give();
        let blocks = self.background.blocks(blob, &go, 0);
        let verdict = check_layer(blocks, &blob.digest, index.clone()).await?;
        match verdict {
            Ok(()) => {
                Stats::add(&self.stats.background_checks, 1);
                content.set_checked();
                info!(layer = %blob.digest, "background check passed: the layer is what its zTOC says");
                if let (
                    Some(disk),
                    IndexSource::Soci {
                        index: i,
                        ztoc,
                        vouched,
                        ..
                    },
                ) = (&self.disk, &index.source)
                {
                    let checked = IndexSource::Soci {
                        index: i.clone(),
                        ztoc: ztoc.clone(),
                        vouched: *vouched,
                        checked: true,
                    };
                    if let Some(bytes) = index.encode_as(&checked) {
                        disk.put_meta(DISK_KIND, disk_key, bytes.into());
                    }
                    // The blob matched its digest, read whole through the disk cache.
                    disk.verified(&blob.digest, blob.size, blob.cache.block_size());
                }
            }
            Err(why) => {
                Stats::add(&self.stats.background_checks_failed, 1);
                content.refuse(&format!("the background check of the whole layer: {why}"));
            }
        }
        Ok(())
    }
}
