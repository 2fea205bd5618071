//! One streaming GET per sequential reader, feeding the block cache.
//!
//! A registry spends milliseconds on every range request (distribution 2.8 resolves the
//! blob link and opens the file each time), so a reader that goes through a blob block
//! by block is limited by request overhead, not bandwidth. Once a reader has shown it is
//! sequential, one GET from the next block to the end of the blob delivers the blocks in
//! order, each put into the cache as soon as it is complete, where the reader's own
//! lookups find it (or wait for it: the stream fetches a block the same way any other
//! fetch does, so readers join it instead of requesting it again).
//!
//! The stream stays at most a lead of blocks ahead of its reader (the window, shared
//! out among the streams running at once, so that several readers together never push
//! unread blocks out of the cache); beyond that it stops
//! reading the body and TCP flow control holds the registry. It publishes the next
//! block it will deliver, so a reader that needs a block the stream is about to deliver
//! waits for it instead of requesting it again. It ends at the end of the blob, when the
//! reader closes the file or jumps elsewhere (the task is aborted), when a whole window
//! of the next blocks is already cached (a re-read: reading them again from the body
//! would be waste), or when the body breaks off; its progress channel closes with it, and readers then fetch
//! what is missing themselves, with retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use super::blocks::BlobAt;
use super::fetch::BlockFetcher;
use super::link_speed::{LinkSpeed, StreamMeter};
use crate::cache::BlockCache;
use crate::registry::{BlobBody, Digest, Error, RegistryClient, RepoName, Result};

/// What a stream reads and where it starts.
pub struct StreamPlan {
    pub repo: RepoName,
    pub digest: Digest,
    pub size: u64,
    /// The first block to deliver.
    pub from_block: u64,
    /// How many blocks all streams together may run ahead of their readers.
    pub lead: u64,
    /// Streams running now (this one included once it starts).
    pub running: Arc<AtomicU64>,
    /// Judges the stream: one that is rate-bound on a distant link stops
    /// (link_speed.rs).
    pub link_speed: Arc<LinkSpeed>,
}

/// Counts a stream as running for as long as it lives (aborted ones included).
struct Running(Arc<AtomicU64>);

impl Running {
    fn start(counter: &Arc<AtomicU64>) -> Running {
        counter.fetch_add(1, Ordering::Relaxed);
        Running(counter.clone())
    }

    /// This stream's share of `lead` blocks: at least two.
    fn share(&self, lead: u64) -> u64 {
        (lead / self.0.load(Ordering::Relaxed).max(1)).max(2)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Delivers blocks `from_block..` of the blob into the cache, in order, publishing the
/// next one in `progress`. `reader_at` is the block index the reader has reached; the
/// stream ends when its sender is dropped.
pub async fn stream_blocks(
    cache: Arc<BlockCache>,
    fetcher: BlockFetcher,
    plan: StreamPlan,
    mut reader_at: watch::Receiver<u64>,
    progress: watch::Sender<u64>,
) -> Result<()> {
    let running = Running::start(&plan.running);
    let bs = cache.block_size();
    let blocks = plan.size.div_ceil(bs);
    let start = plan.from_block.saturating_mul(bs);
    if start >= plan.size {
        return Ok(());
    }
    let opening = Instant::now();
    let mut cursor = BodyCursor::open(fetcher.client(), &plan.repo, &plan.digest, start).await?;
    let opened_in = opening.elapsed();
    plan.link_speed.opened(opened_in);
    let mut meter = StreamMeter::new(opened_in, cursor.body.range_ignored());
    let mut cached_in_a_row = 0;
    for index in plan.from_block..blocks {
        loop {
            let reader = *reader_at.borrow_and_update();
            if index < reader.saturating_add(running.share(plan.lead)) {
                break;
            }
            if reader_at.changed().await.is_err() {
                return Ok(()); // the file was closed
            }
        }
        let key = (plan.digest.clone(), index);
        if cache.peek(&key).is_some() {
            // Cached already (a reader got there first): skip its bytes in the body. A
            // whole window of them means the rest is likely cached too: stop.
            cached_in_a_row += 1;
            if cached_in_a_row >= running.share(plan.lead) {
                return Ok(());
            }
            progress.send_replace(index + 1);
            continue;
        }
        cached_in_a_row = 0;
        let block_start = index * bs;
        let len = bs.min(plan.size - block_start);
        // A block someone else is fetching is joined, and one on disk read from there;
        // either way its bytes are skipped in the body.
        let at = BlobAt {
            repo: &plan.repo,
            digest: &plan.digest,
            size: plan.size,
        };
        cache
            .get(&key, || {
                fetcher.fetch_with(at, index, || async {
                    let waiting = Instant::now();
                    let block = cursor.block(&cache, block_start, len).await;
                    meter.add(len, waiting.elapsed());
                    block
                })
            })
            .await?;
        progress.send_replace(index + 1);
        if plan.link_speed.judge(&meter) {
            // Its reader fetches the rest in parallel (reads.rs).
            return Ok(());
        }
    }
    Ok(())
}

/// Reads a body that starts at blob offset `at`, block by block.
pub struct BodyCursor {
    body: BlobBody,
    /// The blob offset of the next byte of the body.
    at: u64,
}

impl BodyCursor {
    /// One GET of the blob from `start` to its end.
    pub async fn open(
        client: &RegistryClient,
        repo: &RepoName,
        digest: &Digest,
        start: u64,
    ) -> Result<BodyCursor> {
        Ok(BodyCursor {
            body: client.stream_blob(repo, digest, start).await?,
            at: start,
        })
    }

    /// The blob offset of the next byte it would deliver.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// The `len` bytes at blob offset `start` (at or after the cursor: any bytes before
    /// it are skipped), read into a block buffer. After an error the cursor is spent.
    pub async fn block(&mut self, cache: &BlockCache, start: u64, len: u64) -> Result<Bytes> {
        let want = usize::try_from(len)
            .map_err(|_| Error::BadAnswer(format!("{}: block too large", self.body.what())))?;
        if self.at < start {
            self.body.skip(start - self.at).await?;
            self.at = start;
        }
        let mut out = cache.buffer(want);
        self.body.fill(&mut out, want).await?;
        self.at += len;
        Ok(out.freeze())
    }
}
