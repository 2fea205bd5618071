//! The image views of DESIGN §7 over the registry: `tags/<tag>/rootfs/`,
//! `.images/<digest>/rootfs/` (an image's files, its layers merged) and
//! `.layers/<digest>/` (one layer as an overlayfs lowerdir).
//!
//! A view is named by what it shows (a manifest digest, or a layer digest), so the
//! files under `tags/<tag>/rootfs/` are content-addressed too: when the tag moves, the
//! next lookup of `rootfs` gives a new view with new inodes, and the old one stays
//! right for programs still inside it. Layer indexes and merged trees are kept in
//! memory within bounds and rebuilt on demand (the same layers give the same node
//! numbers, so inodes the kernel holds stay valid).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, try_join_all};

use crate::cache::{BlockCache, Memo};
use crate::fs::blob::fetch::BlockSource;
use crate::fs::images::layer_blob::LayerSource;
use crate::fs::tree::node::{self, Kind, Node};
use crate::fs::view::registry_view::RegistryView;
use crate::image::codec::Codec;
use crate::image::content::{LayerContent, PieceCache, Readers};
use crate::image::entry::{Entry, EntryKind, Xattrs};
use crate::image::index::{DISK_KIND, IndexSource, LayerIndex};
use crate::image::manifest::{ImageManifest, Layer, Platform, select};
use crate::image::source::BlobSource;
use crate::image::toc::TocRef;
use crate::image::tree::{self, Origin, Tree};
use crate::image::{self as image_mod};
use crate::registry::{Digest, Error, RepoName, Result, Tag};
use crate::stats::Stats;

/// Layer indexes kept in memory (each holds its entries, checkpoints and span digests),
/// at most, and the memory they may hold together; least recently used go first (a
/// later look finds them in the disk cache, or indexes again).
const KEPT_LAYERS: usize = 256;
const INDEX_MEMORY: usize = 256 << 20;
/// Merged trees kept in memory, at most, and their memory.
const KEPT_TREES: usize = 64;
const TREE_MEMORY: usize = 128 << 20;
/// Layers an image may have (docker stops at 127).
const MAX_LAYERS: usize = 1000;
/// Memory for checked layer pieces (spans, decoded chunks), from the cache budget.
const PIECES_SHARE: u64 = 8;
const MIN_PIECES: u64 = 8 << 20;
const MAX_PIECES: u64 = 64 << 20;

/// Where a view is reached from and what it shows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct View {
    pub repo: RepoName,
    pub root: ViewRoot,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ViewRoot {
    /// `tags/<tag>/rootfs`: the manifest (image or index) the tag named at lookup.
    Tag(Tag, Digest),
    /// `.images/<digest>/rootfs`.
    Image(Digest),
    /// `.layers/<digest>`.
    Layer(Digest),
}

impl View {
    /// The directory the view's root is in.
    pub fn holder(&self) -> Node {
        match &self.root {
            ViewRoot::Tag(t, _) => Node::TagDir(self.repo.clone(), t.clone()),
            ViewRoot::Image(d) => Node::ImageDir(self.repo.clone(), d.clone()),
            ViewRoot::Layer(_) => Node::LayersDir(self.repo.clone()),
        }
    }

    fn key(&self) -> TreeKey {
        match &self.root {
            ViewRoot::Tag(_, d) | ViewRoot::Image(d) => TreeKey::Image(d.clone()),
            ViewRoot::Layer(d) => TreeKey::Layer(d.clone()),
        }
    }
}

/// What a layer index is of: the layer, and the TOC its manifest announced. A TOC is
/// only as trustworthy as the manifest naming it, so the same blob announced with
/// another TOC is another index (one registry's manifest cannot change the files that
/// another registry's manifest shows for the same layer through the shared disk cache).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IndexKey {
    layer: Digest,
    toc: Option<Digest>,
}

impl IndexKey {
    fn of(layer: &Layer) -> IndexKey {
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

/// Trees depend only on content, not on how they were reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TreeKey {
    Image(Digest),
    Layer(Digest),
}

/// A view's files: the tree, and the layers its nodes come from.
pub struct ImageTree {
    pub tree: Tree,
    layers: Vec<Arc<Indexed>>,
}

/// An indexed layer, counted in `index_bytes` while it is kept.
struct Indexed {
    content: LayerContent,
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
type LayerOutcome = std::result::Result<Arc<Indexed>, Error>;

/// An indexing task, awaited by every lookup that needs the layer; an `Err` is a
/// failure worth trying again (the registry was down), and is not kept.
type IndexJob = Shared<BoxFuture<'static, Result<LayerOutcome>>>;

/// A directory's children: name, node, kind.
pub type Children = Vec<(Box<[u8]>, u32, Kind)>;

/// What a node of a view looks like.
pub struct NodeAttr {
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
}

pub struct Images {
    view: Arc<RegistryView>,
    cache: Arc<BlockCache>,
    blocks: BlockSource,
    readers: Readers,
    platform: Platform,
    layers: Arc<Memo<IndexKey, LayerOutcome>>,
    /// Layers being indexed. Indexing runs as a task of its own, so a pass goes on when
    /// the lookup that started it gives up (`--timeout`, an interrupted `ls`); later
    /// lookups wait for the same pass instead of starting another.
    indexing: Arc<Mutex<HashMap<IndexKey, IndexJob>>>,
    trees: Memo<TreeKey, Arc<ImageTree>>,
    descriptors: Memo<(RepoName, Digest), Layer>,
}

impl ImageTree {
    fn node(&self, id: u32) -> Result<&tree::Node> {
        self.tree
            .node(id)
            .ok_or_else(|| Error::NotFound(format!("node {id} is not in this view")))
    }

    fn entry(&self, node: &tree::Node) -> Option<&Entry> {
        match node.origin {
            Origin::Implicit => None,
            Origin::Entry { layer, index } => self
                .layers
                .get(usize::from(layer))?
                .content
                .index()
                .entries
                .get(index as usize),
        }
    }

    pub fn kind(&self, id: u32) -> Result<Kind> {
        Ok(kind_of(self.node(id)?))
    }

    /// The child called `name` of directory `dir`, with its kind.
    pub fn child(&self, dir: u32, name: &[u8]) -> Option<(u32, Kind)> {
        let id = self.tree.child(dir, name)?;
        Some((id, kind_of(self.tree.node(id)?)))
    }

    /// The parent of directory `dir`, and its children (sorted by name).
    pub fn list(&self, dir: u32) -> Result<(u32, Children)> {
        let node = self.node(dir)?;
        let children = node
            .children
            .iter()
            .filter_map(|(name, &id)| Some((name.clone(), id, kind_of(self.tree.node(id)?))))
            .collect();
        Ok((node.parent, children))
    }

    pub fn attr(&self, id: u32) -> Result<NodeAttr> {
        let node = self.node(id)?;
        let kind = kind_of(node);
        let Some(entry) = self.entry(node) else {
            // A directory no entry declared: what extraction would make.
            return Ok(NodeAttr {
                kind,
                size: 0,
                mtime: node::epoch(),
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: node.nlink,
                rdev: 0,
            });
        };
        let size = match kind {
            Kind::File => entry.size,
            Kind::Symlink => entry.link.as_ref().map_or(0, |l| l.len() as u64),
            _ => 0,
        };
        let rdev = match kind {
            Kind::CharDev | Kind::BlockDev if !node.whiteout => encode_dev(entry.rdev),
            _ => 0,
        };
        Ok(NodeAttr {
            kind,
            size,
            mtime: to_system_time(entry.mtime, entry.mtime_nsec),
            perm: (entry.mode & 0o7777) as u16,
            uid: entry.uid,
            gid: entry.gid,
            nlink: node.nlink,
            rdev,
        })
    }

    pub fn readlink(&self, id: u32) -> Result<Box<[u8]>> {
        let node = self.node(id)?;
        match (kind_of(node), self.entry(node).and_then(|e| e.link.clone())) {
            (Kind::Symlink, Some(target)) => Ok(target),
            _ => Err(Error::Invalid("not a symlink".into())),
        }
    }

    /// The node's extended attributes; in a layer view, an opaque directory also has
    /// `trusted.overlay.opaque=y`, as overlayfs looks for.
    pub fn xattrs(&self, id: u32) -> Result<Xattrs> {
        let node = self.node(id)?;
        let mut all = self
            .entry(node)
            .map(|e| e.xattrs.clone())
            .unwrap_or_default();
        if node.opaque {
            all.push((b"trusted.overlay.opaque"[..].into(), b"y"[..].into()));
        }
        Ok(all)
    }

    /// Up to `len` bytes of file `id` at `offset`.
    pub async fn read(&self, id: u32, offset: u64, len: u64) -> Result<Bytes> {
        let node = self.node(id)?;
        let (Origin::Entry { layer, .. }, Some(entry)) = (node.origin, self.entry(node)) else {
            return Ok(Bytes::new());
        };
        let Some(layer) = self.layers.get(usize::from(layer)) else {
            return Ok(Bytes::new());
        };
        layer.content.read(entry, offset, len).await
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

fn kind_of(node: &tree::Node) -> Kind {
    if node.whiteout {
        return Kind::CharDev;
    }
    match node.kind {
        EntryKind::Dir => Kind::Dir,
        EntryKind::File | EntryKind::Hardlink => Kind::File,
        EntryKind::Symlink => Kind::Symlink,
        EntryKind::CharDev => Kind::CharDev,
        EntryKind::BlockDev => Kind::BlockDev,
        EntryKind::Fifo => Kind::Fifo,
    }
}

/// A device number as FUSE carries it (the kernel's `new_encode_dev`).
fn encode_dev((major, minor): (u32, u32)) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn to_system_time(secs: i64, nanos: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

impl Images {
    pub fn new(view: Arc<RegistryView>, blocks: BlockSource, platform: Platform) -> Images {
        let stats = view.client().stats().clone();
        let cache = blocks.cache().clone();
        let budget = (cache.budget() / PIECES_SHARE).clamp(MIN_PIECES, MAX_PIECES);
        // The piece cache counts its hits apart from the block cache's.
        let pieces = Arc::new(PieceCache::new(
            image_mod::pass::SPAN_SIZE,
            budget,
            Arc::default(),
        ));
        Images {
            view,
            cache,
            blocks,
            readers: Readers { pieces, stats },
            platform,
            layers: Arc::new(Memo::new(KEPT_LAYERS, None).weighing(outcome_bytes, INDEX_MEMORY)),
            indexing: Arc::default(),
            trees: Memo::new(KEPT_TREES, None).weighing(|t| t.tree.heap_bytes(), TREE_MEMORY),
            descriptors: Memo::new(4096, None),
        }
    }

    /// The view under `tags/<tag>/rootfs`: the image the tag names now.
    pub async fn tag_view(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<View>> {
        let manifest = self.view.tag_manifest(repo, tag).await?;
        Ok(Arc::new(View {
            repo: repo.clone(),
            root: ViewRoot::Tag(tag.clone(), manifest.digest.clone()),
        }))
    }

    /// The files of a view (built, or kept from before).
    pub async fn tree(&self, view: &View) -> Result<Arc<ImageTree>> {
        let key = view.key();
        self.trees
            .get_or_fetch(&key, || async {
                let layers = match &key {
                    TreeKey::Image(d) => {
                        let layers = self.image_layers(&view.repo, d).await?;
                        try_join_all(layers.iter().map(|l| self.layer(&view.repo, l))).await?
                    }
                    TreeKey::Layer(d) => {
                        let layer = self.descriptor(&view.repo, d).await?;
                        vec![self.layer(&view.repo, &layer).await?]
                    }
                };
                let overlay = matches!(key, TreeKey::Layer(_));
                let tree = tokio::task::spawn_blocking(move || {
                    let entries: Vec<&[Entry]> = layers
                        .iter()
                        .map(|l| &l.content.index().entries[..])
                        .collect();
                    let tree = if overlay {
                        Tree::overlay(entries.first().copied().unwrap_or_default())
                    } else {
                        Tree::merge(&entries)
                    };
                    ImageTree { tree, layers }
                })
                .await
                .map_err(|e| Error::Unavailable(format!("merging layers failed: {e}")))?;
                Ok(Arc::new(tree))
            })
            .await
    }

    /// The layers of the image `digest` names (for an index, the image of the
    /// platform), lowest first.
    async fn image_layers(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Layer>> {
        let parse = |m: &crate::registry::FetchedManifest| {
            ImageManifest::parse(&m.bytes, &m.media_type)
                .map_err(|e| Error::BadAnswer(format!("{repo}@{}: {e}", m.digest)))
        };
        let manifest = self.view.manifest(repo, digest).await?;
        let layers = match parse(&manifest)? {
            ImageManifest::Image { layers } => layers,
            ImageManifest::Index { children } => {
                let child = select(&children, &self.platform).ok_or_else(|| {
                    Error::NotFound(format!(
                        "{repo}@{digest}: the index has no {} image (see --platform)",
                        self.platform
                    ))
                })?;
                match parse(&*self.view.manifest(repo, child).await?)? {
                    ImageManifest::Image { layers } => layers,
                    ImageManifest::Index { .. } => {
                        return Err(Error::BadAnswer(format!(
                            "{repo}@{child}: an index where an image was expected"
                        )));
                    }
                }
            }
        };
        if layers.len() > MAX_LAYERS {
            return Err(Error::BadAnswer(format!(
                "{repo}@{digest}: {} layers (at most {MAX_LAYERS})",
                layers.len()
            )));
        }
        Ok(layers)
    }

    /// A layer's index, made once (a pass or its TOC) and shared by every view; kept
    /// in the disk cache too, so a later mount reads files without a pass.
    async fn layer(&self, repo: &RepoName, layer: &Layer) -> Result<Arc<Indexed>> {
        let key = IndexKey::of(layer);
        if let Some(outcome) = self.layers.peek(&key) {
            return outcome;
        }
        let job = {
            let mut indexing = self.indexing.lock().unwrap_or_else(PoisonError::into_inner);
            match indexing.get(&key) {
                Some(job) => job.clone(),
                None => {
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
            }
        };
        job.await?
    }

    /// The task that indexes a layer: from the disk cache, else its TOC or a pass;
    /// what it finds is kept (memory, disk) before the task ends.
    fn index_job(
        &self,
        repo: &RepoName,
        layer: &Layer,
        key: IndexKey,
    ) -> impl std::future::Future<Output = Result<LayerOutcome>> + Send + 'static {
        let source: Arc<dyn BlobSource> = Arc::new(self.source(repo, &layer.digest, layer.size));
        let (layer, readers) = (layer.clone(), self.readers.clone());
        let disk = self.blocks.disk().cloned();
        let (kept, indexing) = (self.layers.clone(), self.indexing.clone());
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
                None => match image_mod::index_layer(source.clone(), &layer).await {
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
    fn source(&self, repo: &RepoName, digest: &Digest, size: u64) -> LayerSource {
        LayerSource {
            repo: repo.clone(),
            digest: digest.clone(),
            size,
            cache: self.cache.clone(),
            blocks: self.blocks.clone(),
        }
    }

    /// The descriptor of a layer by digest: from a manifest of the repository that
    /// names it (media type and TOC annotations), else from its first bytes.
    async fn descriptor(&self, repo: &RepoName, digest: &Digest) -> Result<Layer> {
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
        let source = self.source(repo, digest, size);
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
