//! Layer indexes (docs/SEMANTICS.md, "Image contents" and "Shared indexes"): made once
//! per layer, from the disk cache, else the layer's TOC, else its zTOC in the SOCI
//! index of the image it is looked at through (unless `--verify-before-serving`), else
//! one pass over it; shared by every image that has the layer, and kept in memory
//! within bounds (the disk cache keeps them too, a zTOC's once checked whole).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::background::{Background, Fill};
use super::generations::Generations;
use super::index_check::Checks;
use super::layer_blob::LayerBlob;
use super::soci_found::{SociIndexes, ZtocHint};
use super::watched::Watched;
use crate::cache::{BlockCache, Memo};
use crate::fs::blob::BlockFetcher;
use crate::fs::view::RegistryView;
use crate::image::codec::Codec;
use crate::image::content::{LayerContent, PieceCache, Readers, RefusalHook};
use crate::image::index::{Content, DISK_KIND, IndexSource, LayerIndex};
use crate::image::kept::KeptFiles;
use crate::image::manifest::{ImageManifest, Layer};
use crate::image::source::BlobSource;
use crate::image::toc::TocRef;
use crate::image::{self as image_mod, ZtocSource};
use crate::registry::{Digest, Error, FetchedManifest, RepoName, Result};
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
    /// A TOC layer's blob being fetched in the background (background.rs).
    fill: Option<Fill>,
}

impl Indexed {
    /// A file of this layer, or of an image it is in, was opened.
    pub fn opened(&self) {
        if let Some(fill) = &self.fill {
            fill.opened();
        }
    }
}

impl AsRef<LayerContent> for Indexed {
    fn as_ref(&self) -> &LayerContent {
        &self.content
    }
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
    /// SOCI indexes of images; `None` with `--verify-before-serving`.
    pub(super) soci: Option<Arc<SociIndexes>>,
    checks: Checks,
    generations: Arc<Generations>,
    background: Arc<Background>,
}

/// What an indexing task needs, apart from the layer.
#[derive(Clone)]
struct JobParts {
    readers: Readers,
    disk: Option<crate::cache::DiskCache>,
    kept: Arc<Memo<IndexKey, LayerOutcome>>,
    indexing: Arc<Mutex<HashMap<IndexKey, IndexJob>>>,
    soci: Option<Arc<SociIndexes>>,
    checks: Checks,
    generations: Arc<Generations>,
    background: Arc<Background>,
    block_size: u64,
}

impl LayerIndexes {
    /// `shared_indexes`: use SOCI indexes (else `--verify-before-serving`); a refused
    /// one moves the trees that used it to a new generation. `background_fetch`: TOC
    /// layers are fetched whole in the background once used.
    pub fn new(
        view: Arc<RegistryView>,
        fetcher: BlockFetcher,
        shared_indexes: bool,
        background_fetch: bool,
        generations: Arc<Generations>,
    ) -> LayerIndexes {
        let stats = view.client().stats().clone();
        let cache = fetcher.cache().clone();
        let mut budget = (cache.budget() / PIECES_SHARE).clamp(MIN_PIECES, MAX_PIECES);
        // Within --cache-size: what it holds counts there (cache/limit.rs).
        if let Some(limit) = cache.limit() {
            budget = limit.share(budget);
        }
        // The piece cache counts its hits apart from the block cache's.
        let pieces = Arc::new(PieceCache::beside(
            image_mod::pass::SPAN_SIZE,
            budget,
            Arc::default(),
            cache.limit().cloned(),
        ));
        // TOC chunks fetched along with a file, compressed, in a cache of the same size
        // beside it (image/chunks.rs): neither pushes the other's out.
        let ahead = Arc::new(PieceCache::beside(
            image_mod::pass::SPAN_SIZE,
            budget,
            Arc::default(),
            cache.limit().cloned(),
        ));
        let disk = fetcher.disk().cloned();
        let soci = shared_indexes.then(|| Arc::new(SociIndexes::new(view.clone(), disk.clone())));
        let background = Arc::new(Background::new(stats.clone(), background_fetch));
        LayerIndexes {
            checks: Checks::new(disk, stats.clone(), background.clone()),
            background,
            view,
            cache,
            fetcher,
            readers: Readers {
                pieces,
                ahead,
                stats,
                refused: None,
            },
            kept: Arc::new(Memo::new(KEPT_LAYERS, None).weighing(outcome_bytes, INDEX_MEMORY)),
            indexing: Arc::default(),
            descriptors: Memo::new(4096, None),
            soci,
            generations,
        }
    }

    /// A layer's index, made once (a pass, its TOC or its zTOC in the SOCI index of
    /// `image`, the image manifest it is looked at through) and shared by every image;
    /// kept in the disk cache too, so a later mount reads files without a pass.
    pub async fn get(
        &self,
        repo: &RepoName,
        layer: &Layer,
        image: Option<&Arc<FetchedManifest>>,
    ) -> Result<Arc<Indexed>> {
        let key = IndexKey::of(layer);
        if let Some(outcome) = self.kept.peek(&key) {
            return outcome;
        }
        self.job(repo, layer, image, key).await?
    }

    /// Starts indexing a layer in the background, unless it is indexed or being indexed.
    pub fn start(&self, repo: &RepoName, layer: &Layer, image: Option<&Arc<FetchedManifest>>) {
        let key = IndexKey::of(layer);
        if self.kept.peek(&key).is_none() {
            // The job runs as a task of its own, awaited or not.
            drop(self.job(repo, layer, image, key));
        }
    }

    /// The indexing job of a layer: the one running, or a new one.
    fn job(
        &self,
        repo: &RepoName,
        layer: &Layer,
        image: Option<&Arc<FetchedManifest>>,
        key: IndexKey,
    ) -> IndexJob {
        let mut indexing = self.indexing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = indexing.get(&key) {
            return job.clone();
        }
        let parts = JobParts {
            readers: self.readers.clone(),
            disk: self.fetcher.disk().cloned(),
            kept: self.kept.clone(),
            indexing: self.indexing.clone(),
            soci: self.soci.clone(),
            checks: self.checks.clone(),
            generations: self.generations.clone(),
            background: self.background.clone(),
            block_size: self.cache.block_size(),
        };
        let blob = self.blob(repo, &layer.digest, layer.size);
        let ztoc_blob = {
            let (repo, this) = (repo.clone(), self.blob(repo, &layer.digest, 0));
            move |hint: &ZtocHint| LayerBlob {
                digest: hint.ztoc.digest.clone(),
                size: hint.ztoc.size,
                repo,
                ..this
            }
        };
        let task = index_job(
            parts,
            blob,
            ztoc_blob,
            layer.clone(),
            image.cloned(),
            key.clone(),
        );
        let job = tokio::spawn(task)
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

    /// A blob's bytes through the block cache, for the image code.
    pub(super) fn blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> LayerBlob {
        LayerBlob {
            repo: repo.clone(),
            digest: digest.clone(),
            size,
            cache: self.cache.clone(),
            fetcher: self.fetcher.clone(),
            foreground: self.background.foreground().clone(),
        }
    }

    /// The layer's index if it is in memory now (never indexing it).
    pub fn peek(&self, layer: &Layer) -> Option<Arc<Indexed>> {
        self.kept.peek(&IndexKey::of(layer))?.ok()
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

/// The task that indexes a layer: from the disk cache, else its TOC, its zTOC or a
/// pass; what it finds is kept (memory, disk) before the task ends.
async fn index_job(
    parts: JobParts,
    blob: LayerBlob,
    ztoc_blob: impl FnOnce(&ZtocHint) -> LayerBlob,
    layer: Layer,
    image: Option<Arc<FetchedManifest>>,
    key: IndexKey,
) -> Result<LayerOutcome> {
    let result = make(&parts, blob, ztoc_blob, &layer, image, &key).await;
    if let Ok(outcome) = &result {
        parts.kept.insert(key.clone(), outcome.clone());
    }
    parts
        .indexing
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
    result
}

async fn make(
    parts: &JobParts,
    blob: LayerBlob,
    ztoc_blob: impl FnOnce(&ZtocHint) -> LayerBlob,
    layer: &Layer,
    image: Option<Arc<FetchedManifest>>,
    key: &IndexKey,
) -> Result<LayerOutcome> {
    let stats = &parts.readers.stats;
    let source: Arc<dyn BlobSource> = Arc::new(blob.clone());
    let found = match &parts.disk {
        Some(disk) => disk.get_meta(DISK_KIND, &key.disk_key()).await,
        None => None,
    };
    if let Some(index) = found.as_deref().and_then(LayerIndex::decode) {
        Stats::add(&stats.indexes_from_disk, 1);
        return Ok(Ok(indexed(index, blob, parts, key)));
    }
    let hint = match (&parts.soci, &image) {
        (Some(soci), Some(image)) => soci
            .of_image(&blob.repo, image)
            .await
            .and_then(|found| found.hint(&layer.digest)),
        _ => None,
    };
    let ztoc = hint.as_ref().map(|h| ZtocSource {
        blob: Arc::new(ztoc_blob(h)),
        index: h.index.clone(),
        vouched: h.vouched,
    });
    match image_mod::index_layer(watched(&source, &parts.readers.stats), layer, ztoc.as_ref()).await
    {
        Ok(index) => Ok(Ok(ready(parts, index, blob, hint, key))),
        // Worth trying again later: the registry was down, or said no.
        Err(e) if e.is_transient() || matches!(e, Error::NotFound(_) | Error::Denied(_)) => Err(e),
        Err(e) => Ok(Err(e)),
    }
}

/// A layer index just made: counted, kept on disk (a zTOC's once checked whole, which
/// starts here), and made ready for reads.
fn ready(
    parts: &JobParts,
    index: LayerIndex,
    blob: LayerBlob,
    hint: Option<ZtocHint>,
    key: &IndexKey,
) -> Arc<Indexed> {
    let stats = &parts.readers.stats;
    if let (Some(why), Some(soci), Some(hint)) = (&index.soci_unused, &parts.soci, &hint) {
        soci.refuse(&hint.index, why);
    }
    if let IndexSource::Soci { checked, .. } = index.source {
        Stats::add(&stats.layers_from_index, 1);
        let indexed = indexed(index, blob.clone(), parts, key);
        if !checked {
            parts.checks.start(indexed.clone(), blob, key.disk_key());
        }
        return indexed;
    }
    Stats::add(&stats.layers_indexed, 1);
    if let Some(disk) = &parts.disk {
        if let Some(bytes) = index.encode() {
            disk.put_meta(DISK_KIND, &key.disk_key(), bytes.into());
        }
        if index.source == IndexSource::Pass {
            // The pass read the whole blob and it matched its digest.
            disk.verified(&blob.digest, blob.size, parts.block_size);
        }
    }
    indexed(index, blob, parts, key)
}

/// An index made ready for reads, counted in `index_bytes` while kept; its decoded
/// files kept in the disk cache (image/kept.rs), and a TOC layer's background fill
/// started (background.rs). A zTOC's is told how to refuse it: the index is remembered
/// bad and this layer forgotten, so the next look reads the layer by a pass.
fn indexed(index: LayerIndex, blob: LayerBlob, parts: &JobParts, key: &IndexKey) -> Arc<Indexed> {
    let mut readers = parts.readers.clone();
    if let (IndexSource::Soci { .. }, Some(soci)) = (&index.source, &parts.soci) {
        let (soci, kept, key) = (soci.clone(), parts.kept.clone(), key.clone());
        let generations = parts.generations.clone();
        let hook: RefusalHook = Arc::new(move |layer, source: &IndexSource, why: &str| {
            if let IndexSource::Soci { index, .. } = source {
                soci.refuse(index, why);
            }
            kept.forget(&key);
            generations.refused(layer);
        });
        readers.refused = Some(hook);
    }
    let bytes = index.heap_bytes() as u64;
    Stats::add(&readers.stats.index_bytes, bytes);
    // A pass, or the check of a zTOC's layer, held the whole blob against its digest.
    let verified = matches!(
        index.source,
        IndexSource::Pass | IndexSource::Soci { checked: true, .. }
    );
    let whole = Arc::new(AtomicBool::new(verified));
    let kept = parts.disk.as_ref().map(|disk| KeptFiles {
        disk: disk.clone(),
        layer: key.disk_key(),
        whole: whole.clone(),
    });
    let source: Arc<dyn BlobSource> = Arc::new(blob.clone());
    let fill = match &index.content {
        Content::Chunks(map) => parts.background.fill(blob, map.prefetch_end, whole),
        Content::Stream(_) => None,
    };
    Arc::new(Indexed {
        stats: readers.stats.clone(),
        content: LayerContent::new(Arc::new(index), source, readers).keeping(kept),
        bytes,
        fill,
    })
}
