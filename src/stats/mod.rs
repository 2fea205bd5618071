//! Counters of what the mount did, shown as JSON in `/.regfs/stats` so users and
//! benchmarks can see cache behaviour and traffic without a debugger.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

mod progress;
mod recent;
mod store_failures;

pub use progress::{Progress, TaskSnapshot, Tracked};
pub use recent::{Recent, RecentObject, RecentSnapshot};
pub use store_failures::{StoreFailures, StoreFailuresSnapshot};

/// The kinds of registry request that are counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Ping,
    Catalog,
    Tags,
    Manifest,
    BlobHead,
    BlobRange,
    /// One GET that streams a blob from an offset to its end, for a sequential reader.
    BlobStream,
    /// POST that opens a blob upload session.
    UploadStart,
    /// PATCH with one chunk of a blob upload.
    UploadChunk,
    /// GET of an upload's status (where to resume).
    UploadStatus,
    /// PUT `?digest=` that commits a blob upload.
    UploadCommit,
    /// DELETE that cancels a blob upload.
    UploadCancel,
    /// POST `?mount=&from=`: a cross-repository blob mount.
    BlobMount,
    ManifestPut,
    /// DELETE of a manifest (by tag or digest) or a blob (`--allow-delete`).
    Delete,
    /// GET of the referrers API (`/v2/<name>/referrers/<digest>`).
    Referrers,
}

tokio::task_local! {
    /// Set around work done in the background (fs/images/background.rs): the blob bytes
    /// it receives count in `background_bytes` too, at the moment they arrive.
    static BACKGROUND: ();
}

const REQUEST_KINDS: usize = RequestKind::Referrers as usize + 1;
/// Layers whose unused TOC `/.regfs/stats` names, with the reason.
const TOC_UNUSED_SHOWN: usize = 32;

#[derive(Default)]
pub struct Stats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Readers that found their block already being fetched and waited for that fetch.
    pub cache_joined: AtomicU64,
    pub cache_evictions: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub retries: AtomicU64,
    /// Blob streams read from a connection of their own, not through the HTTP client.
    pub socket_streams: AtomicU64,
    pub in_flight: AtomicU64,
    /// Whole-blob hash checks that passed / failed, and those given up (reads too far
    /// out of order to hash on the way: a random reader's open file).
    pub verified: AtomicU64,
    pub verify_failures: AtomicU64,
    pub verify_given_up: AtomicU64,
    /// Indexes written through the mount and held until their child manifests arrive.
    pub pending_manifests: AtomicU64,
    /// Blob bytes sent in upload chunks (resent bytes count again).
    pub uploaded_bytes: AtomicU64,
    /// Image contents: layers indexed (by a pass or a TOC), memory their indexes hold,
    /// decodes started from a checkpoint, decoders not kept for the next read for want
    /// of room in the memory budget, and layer bytes fetched to read files.
    pub layers_indexed: AtomicU64,
    pub indexes_from_disk: AtomicU64,
    pub index_bytes: AtomicU64,
    pub content_decodes: AtomicU64,
    pub cursors_dropped: AtomicU64,
    pub content_fetched_bytes: AtomicU64,
    /// TOC layers: compressed bytes of the files that follow a file in its blob, fetched
    /// with it (image/chunks.rs), and chunks of them read later without a request.
    pub read_ahead_bytes: AtomicU64,
    pub read_ahead_used: AtomicU64,
    /// Layers that announce a TOC yet were indexed by reading them whole, because the
    /// TOC could not be used: how many, and why (by layer digest, the first few).
    pub toc_unused: AtomicU64,
    toc_unused_why: Mutex<BTreeMap<String, String>>,
    /// Layer bytes fetched in the background (fs/images/background.rs), not for a read
    /// a program waits on; TOC layers filled whole that way; decoded file bytes read
    /// back from the disk cache (image/kept.rs) instead of decoded again.
    pub background_bytes: AtomicU64,
    pub background_layers: AtomicU64,
    pub decoded_from_disk: AtomicU64,
    /// Shared indexes (SOCI): indexes found for images, published by this mount, layers
    /// whose files come from a zTOC, indexes refused (a lie found, or a zTOC that cannot
    /// be used), background checks of whole layers done and failed (their bytes are
    /// `background_bytes`).
    pub soci_indexes_found: AtomicU64,
    pub soci_indexes_published: AtomicU64,
    pub layers_from_index: AtomicU64,
    pub soci_indexes_refused: AtomicU64,
    pub background_checks: AtomicU64,
    pub background_checks_failed: AtomicU64,
    /// Layers being read whole by the index pass, with how far each got.
    pub indexing: Arc<Progress>,
    /// Bytes fetched against bytes read, for the blobs and images read last.
    pub recent: Recent,
    /// The disk cache (cache/disk): blocks and entries found / not found there, bytes
    /// the directory holds (all mounts sharing it) and may hold (0: no disk cache),
    /// entries evicted, blobs kept whole after their digest check, writes not done
    /// (disk full, queue full, no room), opens answered with FUSE passthrough.
    pub disk_hits: AtomicU64,
    pub disk_misses: AtomicU64,
    pub disk_bytes: AtomicU64,
    pub disk_budget: AtomicU64,
    pub disk_evictions: AtomicU64,
    pub disk_verified: AtomicU64,
    pub disk_dropped: AtomicU64,
    pub passthrough_opens: AtomicU64,
    /// `/.layerstore/` lookups that found no layer to serve.
    pub store_failures: StoreFailures,
    /// Pieces of blocks for random reads (fs/blob/pieces.rs): their range requests,
    /// reads that found their pieces held, blocks completed from pieces by one request
    /// for the rest, bytes held now, and the size of a piece and the bytes they may hold.
    pub piece_fetches: AtomicU64,
    pub piece_hits: AtomicU64,
    pub blocks_from_pieces: AtomicU64,
    pub piece_bytes: AtomicU64,
    pub piece_size: AtomicU64,
    pub piece_budget: AtomicU64,
    /// The one memory budget (cache/limit.rs): `--cache-size`, bytes reserved by
    /// fetches in flight now and by image decoding's working memory, and reservations
    /// that waited for memory.
    pub memory_limit: AtomicU64,
    pub memory_in_flight: AtomicU64,
    pub memory_working: AtomicU64,
    pub memory_waits: AtomicU64,
    requests: [AtomicU64; REQUEST_KINDS],
    /// Traffic per registry host (the origin and each `--mirror`), in the order added.
    hosts: Mutex<Vec<Arc<HostCounters>>>,
}

/// What one host was asked and how it answered.
#[derive(Default)]
pub struct HostCounters {
    url: String,
    role: &'static str,
    /// Requests sent to it (token requests to an auth realm are not counted).
    pub requests: AtomicU64,
    /// Requests that got no answer, or a 5xx / 429.
    pub failures: AtomicU64,
    /// Blob bytes it sent.
    pub fetched_bytes: AtomicU64,
    /// Reads it could not serve (error, 404, wrong bytes, resting) that went on to the
    /// next host.
    pub passed_on: AtomicU64,
}

/// Holds one request's place in `in_flight` until dropped.
pub struct InFlight(Arc<Stats>);

impl InFlight {
    pub fn stats(&self) -> &Arc<Stats> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` blob bytes received (`fetched_bytes`; `background_bytes` too when received
    /// for work run by [`Stats::in_background`]).
    pub fn received(&self, blob: &str, n: u64) {
        Self::add(&self.fetched_bytes, n);
        self.recent.fetched(blob, n);
        if BACKGROUND.try_with(|_| ()).is_ok() {
            Self::add(&self.background_bytes, n);
        }
    }

    /// Runs `work` as background work: the blob bytes it receives are counted apart.
    pub async fn in_background<F: std::future::Future>(work: F) -> F::Output {
        BACKGROUND.scope((), work).await
    }

    /// Counts a request of `kind` and marks it in flight until the guard is dropped.
    pub fn request(self: &Arc<Self>, kind: RequestKind) -> InFlight {
        Self::add(&self.requests[kind as usize], 1);
        Self::add(&self.in_flight, 1);
        InFlight(self.clone())
    }

    /// A layer with a TOC that had to be read whole instead (never silent).
    pub fn toc_unused(&self, layer: &str, why: &str) {
        Self::add(&self.toc_unused, 1);
        let mut shown = self
            .toc_unused_why
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shown.len() < TOC_UNUSED_SHOWN {
            shown.insert(layer.to_owned(), why.to_owned());
        }
    }

    /// The counters of a host (`role`: "origin" or "mirror"), shown under `hosts`.
    pub fn host(&self, url: &str, role: &'static str) -> Arc<HostCounters> {
        let counters = Arc::new(HostCounters {
            url: url.to_owned(),
            role,
            ..HostCounters::default()
        });
        self.hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(counters.clone());
        counters
    }

    fn hosts_snapshot(&self) -> BTreeMap<String, HostSnapshot> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut shown: BTreeMap<String, HostSnapshot> = BTreeMap::new();
        for h in hosts.iter() {
            // The same host twice (a mirror that is also the origin): one entry.
            let entry = shown.entry(h.url.clone()).or_insert_with(|| HostSnapshot {
                role: h.role,
                ..HostSnapshot::default()
            });
            entry.requests += get(&h.requests);
            entry.failures += get(&h.failures);
            entry.fetched_bytes += get(&h.fetched_bytes);
            entry.passed_on += get(&h.passed_on);
        }
        shown
    }

    pub fn snapshot(&self, budget: u64, block_size: u64) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            cache: CacheSnapshot {
                hits: get(&self.cache_hits),
                misses: get(&self.cache_misses),
                joined: get(&self.cache_joined),
                evictions: get(&self.cache_evictions),
                bytes: get(&self.cache_bytes),
                budget,
                block_size,
            },
            disk: DiskSnapshot {
                hits: get(&self.disk_hits),
                misses: get(&self.disk_misses),
                bytes: get(&self.disk_bytes),
                budget: get(&self.disk_budget),
                evictions: get(&self.disk_evictions),
                verified_blobs: get(&self.disk_verified),
                dropped_writes: get(&self.disk_dropped),
                passthrough_opens: get(&self.passthrough_opens),
            },
            memory: MemorySnapshot {
                limit: get(&self.memory_limit),
                in_flight: get(&self.memory_in_flight),
                working: get(&self.memory_working),
                waits: get(&self.memory_waits),
            },
            pieces: PiecesSnapshot {
                fetches: get(&self.piece_fetches),
                hits: get(&self.piece_hits),
                blocks_completed: get(&self.blocks_from_pieces),
                bytes: get(&self.piece_bytes),
                budget: get(&self.piece_budget),
                piece_size: get(&self.piece_size),
            },
            fetched_bytes: get(&self.fetched_bytes),
            requests: self.requests_snapshot(),
            uploaded_bytes: get(&self.uploaded_bytes),
            retries: get(&self.retries),
            socket_streams: get(&self.socket_streams),
            in_flight: get(&self.in_flight),
            verified_blobs: get(&self.verified),
            verify_failures: get(&self.verify_failures),
            verify_given_up: get(&self.verify_given_up),
            pending_manifests: get(&self.pending_manifests),
            images: self.images_snapshot(),
            recent: self.recent.snapshot(),
            layer_store: self.store_failures.snapshot(),
            hosts: self.hosts_snapshot(),
        }
    }

    fn requests_snapshot(&self) -> RequestsSnapshot {
        let req = |k: RequestKind| self.requests[k as usize].load(Ordering::Relaxed);
        RequestsSnapshot {
            ping: req(RequestKind::Ping),
            catalog: req(RequestKind::Catalog),
            tags: req(RequestKind::Tags),
            manifest: req(RequestKind::Manifest),
            blob_head: req(RequestKind::BlobHead),
            blob_range: req(RequestKind::BlobRange),
            blob_stream: req(RequestKind::BlobStream),
            upload_start: req(RequestKind::UploadStart),
            upload_chunk: req(RequestKind::UploadChunk),
            upload_status: req(RequestKind::UploadStatus),
            upload_commit: req(RequestKind::UploadCommit),
            upload_cancel: req(RequestKind::UploadCancel),
            blob_mount: req(RequestKind::BlobMount),
            manifest_put: req(RequestKind::ManifestPut),
            delete: req(RequestKind::Delete),
            referrers: req(RequestKind::Referrers),
        }
    }

    fn images_snapshot(&self) -> ImagesSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ImagesSnapshot {
            layers_indexed: get(&self.layers_indexed),
            indexes_from_disk: get(&self.indexes_from_disk),
            index_bytes: get(&self.index_bytes),
            decodes: get(&self.content_decodes),
            cursors_dropped: get(&self.cursors_dropped),
            fetched_bytes: get(&self.content_fetched_bytes),
            read_ahead_bytes: get(&self.read_ahead_bytes),
            read_ahead_used: get(&self.read_ahead_used),
            background_bytes: get(&self.background_bytes),
            background_layers: get(&self.background_layers),
            decoded_from_disk: get(&self.decoded_from_disk),
            toc_unused: get(&self.toc_unused),
            toc_unused_why: self
                .toc_unused_why
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            indexes_found: get(&self.soci_indexes_found),
            indexes_published: get(&self.soci_indexes_published),
            layers_from_index: get(&self.layers_from_index),
            indexes_refused: get(&self.soci_indexes_refused),
            background_checks: get(&self.background_checks),
            background_checks_failed: get(&self.background_checks_failed),
            indexing: self.indexing.snapshot(),
        }
    }
}

#[derive(Serialize, Debug)]
pub struct Snapshot {
    pub cache: CacheSnapshot,
    pub memory: MemorySnapshot,
    pub pieces: PiecesSnapshot,
    pub disk: DiskSnapshot,
    /// Blob bytes received from the registry (or the host it redirected to).
    pub fetched_bytes: u64,
    /// Blob bytes sent in upload chunks (resent bytes count again).
    pub uploaded_bytes: u64,
    pub requests: RequestsSnapshot,
    pub retries: u64,
    pub socket_streams: u64,
    pub in_flight: u64,
    pub verified_blobs: u64,
    pub verify_failures: u64,
    pub verify_given_up: u64,
    pub pending_manifests: u64,
    pub images: ImagesSnapshot,
    /// The blob files and images read most recently, the latest first: their size,
    /// the bytes fetched of them (by anything) and read by programs.
    pub recent: Vec<RecentSnapshot>,
    pub layer_store: StoreFailuresSnapshot,
    /// Per registry host, by URL: the origin and each mirror.
    pub hosts: BTreeMap<String, HostSnapshot>,
}

#[derive(Serialize, Debug, Default)]
pub struct HostSnapshot {
    /// "origin" or "mirror".
    pub role: &'static str,
    pub requests: u64,
    pub failures: u64,
    pub fetched_bytes: u64,
    pub passed_on: u64,
}

#[derive(Serialize, Debug)]
pub struct ImagesSnapshot {
    /// Layers indexed since the mount (a pass or a TOC each).
    pub layers_indexed: u64,
    /// Layer indexes found in the disk cache instead.
    pub indexes_from_disk: u64,
    /// Memory held by the layer indexes kept now.
    pub index_bytes: u64,
    /// Decodes started: of plain layers from a checkpoint, of TOC layers a run of
    /// chunks.
    pub decodes: u64,
    /// Decoders of plain layers not kept for the next read: idle decoders' share of the
    /// memory budget was full (README "Memory"); the next read there decodes from a
    /// checkpoint again.
    pub cursors_dropped: u64,
    /// Layer bytes fetched (or taken from the block cache) to read files.
    pub fetched_bytes: u64,
    /// TOC layers: compressed bytes of the next files in the blob fetched along with a
    /// file's own chunks (in `fetched_bytes`: a start waits for them), and chunks of
    /// them that reads then found without a request of their own.
    pub read_ahead_bytes: u64,
    pub read_ahead_used: u64,
    /// Layer bytes fetched in the background (the rest of a TOC layer once its files
    /// are read, what its prefetch landmark names, and the whole-layer checks of
    /// layers served from a zTOC), apart from what reads waited
    /// for: `fetched_bytes` minus these is what a start needed.
    pub background_bytes: u64,
    /// TOC layers fetched whole in the background and verified (kept on disk).
    pub background_layers: u64,
    /// Decoded file bytes read from the disk cache rather than decoded again.
    pub decoded_from_disk: u64,
    /// Layers that announce a TOC but are read whole (the pass), since the TOC could
    /// not be used; and why, by layer digest.
    pub toc_unused: u64,
    pub toc_unused_why: BTreeMap<String, String>,
    /// SOCI indexes found for images looked at (docs/SEMANTICS.md, "Shared indexes").
    pub indexes_found: u64,
    /// SOCI indexes this mount pushed (`--publish-indexes`).
    pub indexes_published: u64,
    /// Layers whose files come from a zTOC (no pass before the first file).
    pub layers_from_index: u64,
    /// Indexes refused: a lie found by a read or a background check, or a zTOC that
    /// cannot be used (the layer is read by a pass instead).
    pub indexes_refused: u64,
    /// Background checks of whole layers served from a zTOC: done (passed) and failed.
    pub background_checks: u64,
    pub background_checks_failed: u64,
    /// Layers being read whole by the index pass now: bytes done of their size.
    pub indexing: Vec<TaskSnapshot>,
}

#[derive(Serialize, Debug)]
pub struct CacheSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub joined: u64,
    pub evictions: u64,
    /// Bytes held now; never above `budget`.
    pub bytes: u64,
    pub budget: u64,
    pub block_size: u64,
}

/// The one memory budget for blob bytes (cache/limit.rs).
#[derive(Serialize, Debug)]
pub struct MemorySnapshot {
    /// `--cache-size`: the cache, the pieces' shares, idle decoders, fetches in flight
    /// and image decoding's working memory together.
    pub limit: u64,
    /// Bytes reserved by fetches in flight.
    pub in_flight: u64,
    /// Bytes reserved by index passes and file reads of plain layers as they decode.
    pub working: u64,
    /// Fetches and decoders that waited for memory.
    pub waits: u64,
}

/// Pieces of blocks fetched for random reads (a share of `--cache-size`).
#[derive(Serialize, Debug)]
pub struct PiecesSnapshot {
    /// Range requests for pieces (counted in `requests.blob_range` too).
    pub fetches: u64,
    /// Reads that found the pieces they touch held already.
    pub hits: u64,
    /// Blocks completed from the pieces held with one request for the rest.
    pub blocks_completed: u64,
    pub bytes: u64,
    pub budget: u64,
    pub piece_size: u64,
}

/// The disk cache; `budget` 0 means there is none (`--no-disk-cache`).
#[derive(Serialize, Debug)]
pub struct DiskSnapshot {
    pub hits: u64,
    pub misses: u64,
    /// What the cache directory holds now (every mount sharing it), as `du` counts.
    pub bytes: u64,
    pub budget: u64,
    pub evictions: u64,
    /// Blobs kept whole on disk after a read matched their digest.
    pub verified_blobs: u64,
    pub dropped_writes: u64,
    pub passthrough_opens: u64,
}

#[derive(Serialize, Debug)]
pub struct RequestsSnapshot {
    pub ping: u64,
    pub catalog: u64,
    pub tags: u64,
    pub manifest: u64,
    pub blob_head: u64,
    pub blob_range: u64,
    pub blob_stream: u64,
    pub upload_start: u64,
    pub upload_chunk: u64,
    pub upload_status: u64,
    pub upload_commit: u64,
    pub upload_cancel: u64,
    pub blob_mount: u64,
    pub manifest_put: u64,
    pub delete: u64,
    pub referrers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_received_in_the_background_are_counted_apart() {
        let stats = Stats::default();
        stats.received("a", 3);
        Stats::in_background(async { stats.received("a", 5) }).await;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(get(&stats.fetched_bytes), 8);
        assert_eq!(get(&stats.background_bytes), 5);
    }
}
