//! Layer indexes (docs/SEMANTICS.md, "Image contents"): made once per layer, from the
//! disk cache, else the layer's TOC or one pass over it, shared by every image that
//! has the layer, and kept in memory within bounds (the disk cache keeps them too).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::layer_blob::LayerBlob;
use super::watched::Watched;
use crate::cache::{BlockCache, Memo};
use crate::fs::blob::BlockFetcher;
use crate::fs::view::RegistryView;
use crate::image::codec::Codec;
use crate::image::content::{LayerContent, PieceCache, Readers};
use crate::image::index::{DISK_KIND, IndexSource, LayerIndex};
use crate::image::manifest::{ImageManifest, Layer};
use crate::image::source::BlobSource;
use crate::image::toc::TocRef;
use crate::image::{self as image_mod};
use crate::registry::{Digest, Error, RepoName, Result};
use crate::stats::Stats;

/// Layer indexes kept in memory (each holds its entries, checkpoints and span digests),
/// at most, and the memory they may hold together; least recently used go first (a
/// later look finds them in the disk cache, or indexes again).
const KEPT_LAYERS: usize = 256;
const INDEX_MEMORY: usize = 256 << 20;
/// Memory for checked layer pieces (spans, decoded chunks), from the cache budget.
const PIECES_SHARE: u64 = 8;
const MIN_PIECES: u64 = 8 << 20;
const MAX_PIECES: u64 = 64 << 20;

/// What a layer index is of: the layer, and the TOC its manifest announced. A TOC is
/// only as trustworthy as the manifest naming it, so the same blob announced with
/// another TOC is another index (one registry's manifest cannot change the files that
/// another registry's manifest shows for the same layer through the shared disk cache).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IndexKey {
    layer: Digest,
    toc: Option<Digest>,
}

impl IndexKey {
    pub fn of(layer: &Layer) -> IndexKey {
        let toc = Codec::of_media_type(&layer.media_type)
            .and_then(|codec| TocRef::from_annotations(codec, &layer.annotations))
            .map(|t| t.digest().clone());
        IndexKey {
            layer: layer.digest.clone(),
            toc,
        }
    }

    /// Its name in the disk cache.
    fn disk_key(&self) -> Digest {
        match &self.toc {
            None => self.layer.clone(),
            Some(toc) => Digest::sha256_of(format!("{} {toc}", self.layer).as_bytes()),
        }
    }
}

/// The layer's bytes with the pass's progress listed in the stats.
fn watched(source: &Arc<dyn BlobSource>, stats: &Arc<Stats>) -> Arc<dyn BlobSource> {
    Arc::new(Watched {
        inner: source.clone(),
        stats: stats.clone(),
    })
}

/// An indexed layer, counted in `index_bytes` while it is kept.
pub struct Indexed {
    pub content: LayerContent,
    bytes: u64,
    stats: Arc<Stats>,
}

impl Drop for Indexed {
    fn drop(&mut self) {
        self.stats
            .index_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A layer indexed, or the reason it cannot be (kept too: a corrupt layer is not
/// fetched again at every lookup).
pub type LayerOutcome = std::result::Result<Arc<Indexed>, Error>;

/// An indexing task, awaited by every lookup that needs the layer; an `Err` is a
/// failure worth trying again (the registry was down), and is not kept.
type IndexJob = Shared<BoxFuture<'static, Result<LayerOutcome>>>;

/// The layer indexes of a mount: made once per layer and shared by every image.
pub struct LayerIndexes {
    view: Arc<RegistryView>,
    cache: Arc<BlockCache>,
    fetcher: BlockFetcher,
    readers: Readers,
    kept: Arc<Memo<IndexKey, LayerOutcome>>,
    /// Layers being indexed. Indexing runs as a task of its own, so a pass goes on when
    /// the lookup that started it gives up (`--timeout`, an interrupted `ls`); later
    /// lookups wait for the same pass instead of starting another.
    indexing: Arc<Mutex<HashMap<IndexKey, IndexJob>>>,
    descriptors: Memo<(RepoName, Digest), Layer>,
}

impl LayerIndexes {
    pub fn new(view: Arc<RegistryView>, fetcher: BlockFetcher) -> LayerIndexes {
        let stats = view.client().stats().clone();
        let cache = fetcher.cache().clone();
        let budget = (cache.budget() / PIECES_SHARE).clamp(MIN_PIECES, MAX_PIECES);
        // The piece cache counts its hits apart from the block cache's.
        let pieces = Arc::new(PieceCache::new(
            image_mod::pass::SPAN_SIZE,
            budget,
            Arc::default(),
        ));
        LayerIndexes {
            view,
            cache,
            fetcher,
            readers: Readers { pieces, stats },
            kept: Arc::new(Memo::new(KEPT_LAYERS, None).weighing(outcome_bytes, INDEX_MEMORY)),
            indexing: Arc::default(),
            descriptors: Memo::new(4096, None),
        }
    }

    /// A layer's index, made once (a pass or its TOC) and shared by every image; kept
    /// in the disk cache too, so a later mount reads files without a pass.
    pub async fn get(&self, repo: &RepoName, layer: &Layer) -> Result<Arc<Indexed>> {
        let key = IndexKey::of(layer);
        if let Some(outcome) = self.kept.peek(&key) {
            return outcome;
        }
        self.job(repo, layer, key).await?
    }

    /// Starts indexing a layer in the background, unless it is indexed or being indexed.
    pub fn start(&self, repo: &RepoName, layer: &Layer) {
        let key = IndexKey::of(layer);
        if self.kept.peek(&key).is_none() {
            // The job runs as a task of its own, awaited or not.
            drop(self.job(repo, layer, key));
        }
    }

    /// The indexing job of a layer: the one running, or a new one.
    fn job(&self, repo: &RepoName, layer: &Layer, key: IndexKey) -> IndexJob {
        let mut indexing = self.indexing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = indexing.get(&key) {
            return job.clone();
        }
        let job = tokio::spawn(self.index_job(repo, layer, key.clone()))
            .map(|done| {
                done.unwrap_or_else(|e| {
                    Err(Error::Unavailable(format!("indexing task failed: {e}")))
                })
            })
            .boxed()
            .shared();
        indexing.insert(key, job.clone());
        job
    }

    /// The task that indexes a layer: from the disk cache, else its TOC or a pass;
    /// what it finds is kept (memory, disk) before the task ends.
    fn index_job(
        &self,
        repo: &RepoName,
        layer: &Layer,
        key: IndexKey,
    ) -> impl std::future::Future<Output = Result<LayerOutcome>> + Send + 'static {
        let source: Arc<dyn BlobSource> = Arc::new(self.blob(repo, &layer.digest, layer.size));
        let (layer, readers) = (layer.clone(), self.readers.clone());
        let disk = self.fetcher.disk().cloned();
        let (kept, indexing) = (self.kept.clone(), self.indexing.clone());
        let block_size = self.cache.block_size();
        async move {
            let stats = readers.stats.clone();
            let found = match &disk {
                Some(disk) => disk.get_meta(DISK_KIND, &key.disk_key()).await,
                None => None,
            };
            let result = match found.as_deref().and_then(LayerIndex::decode) {
                Some(index) => {
                    Stats::add(&stats.indexes_from_disk, 1);
                    Ok(Ok(indexed(index, source, &readers)))
                }
                None => match image_mod::index_layer(watched(&source, &stats), &layer).await {
                    Ok(index) => {
                        Stats::add(&stats.layers_indexed, 1);
                        if let Some(disk) = &disk {
                            if let Some(bytes) = index.encode() {
                                disk.put_meta(DISK_KIND, &key.disk_key(), bytes.into());
                            }
                            if index.source == IndexSource::Pass {
                                // The pass read the whole blob and it matched its digest.
                                disk.verified(&layer.digest, layer.size, block_size);
                            }
                        }
                        Ok(Ok(indexed(index, source, &readers)))
                    }
                    // Worth trying again later: the registry was down, or said no.
                    Err(e)
                        if e.is_transient()
                            || matches!(e, Error::NotFound(_) | Error::Denied(_)) =>
                    {
                        Err(e)
                    }
                    Err(e) => Ok(Err(e)),
                },
            };
            if let Ok(outcome) = &result {
                kept.insert(key.clone(), outcome.clone());
            }
            indexing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
            result
        }
    }

    /// A blob's bytes through the block cache, for the image code.
    pub(super) fn blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> LayerBlob {
        LayerBlob {
            repo: repo.clone(),
            digest: digest.clone(),
            size,
            cache: self.cache.clone(),
            fetcher: self.fetcher.clone(),
        }
    }

    /// The descriptor of a layer by digest: from a manifest of the repository that
    /// names it (media type and TOC annotations), else from its first bytes.
    pub async fn descriptor(&self, repo: &RepoName, digest: &Digest) -> Result<Layer> {
        let key = (repo.clone(), digest.clone());
        self.descriptors
            .get_or_fetch(&key, || async {
                if let Ok(reach) = self.view.reachable(repo).await {
                    for manifest in reach.manifests.keys() {
                        let Ok(m) = self.view.manifest(repo, manifest).await else {
                            continue;
                        };
                        if let Ok(ImageManifest::Image { layers }) =
                            ImageManifest::parse(&m.bytes, &m.media_type)
                        {
                            if let Some(layer) = layers.into_iter().find(|l| &l.digest == digest) {
                                return Ok(layer);
                            }
                        }
                    }
                }
                self.sniffed(repo, digest).await
            })
            .await
    }

    /// A layer no manifest describes: its codec from its magic bytes.
    async fn sniffed(&self, repo: &RepoName, digest: &Digest) -> Result<Layer> {
        let size = self.view.blob_size(repo, digest).await?;
        let source = self.blob(repo, digest, size);
        let head = source.read(0, size.min(4)).await?;
        let codec = match &head[..] {
            [0x1f, 0x8b, ..] => Codec::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Codec::Zstd,
            _ => Codec::Tar,
        };
        let media_type = match codec {
            Codec::Tar => "application/vnd.oci.image.layer.v1.tar",
            Codec::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Codec::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        Ok(Layer {
            media_type: media_type.to_owned(),
            digest: digest.clone(),
            size,
            annotations: Default::default(),
        })
    }
}

fn outcome_bytes(outcome: &LayerOutcome) -> usize {
    outcome.as_ref().map_or(0, |i| i.bytes as usize)
}

/// An index made ready for reads, counted in `index_bytes` while kept.
fn indexed(index: LayerIndex, source: Arc<dyn BlobSource>, readers: &Readers) -> Arc<Indexed> {
    let bytes = index.heap_bytes() as u64;
    Stats::add(&readers.stats.index_bytes, bytes);
    Arc::new(Indexed {
        content: LayerContent::new(Arc::new(index), source, readers.clone()),
        bytes,
        stats: readers.stats.clone(),
    })
}
