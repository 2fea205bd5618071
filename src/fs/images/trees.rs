//! The files of images (docs/SEMANTICS.md, "Image contents"): `tags/<tag>/rootfs/`,
//! `.images/<digest>/rootfs/` (an image's files, its layers merged), and one layer as an
//! overlayfs lowerdir: `.layers/<digest>/`, `.images/<m>/layers/<digest>/` and the layer
//! store's `diff` (described by that manifest, described.rs).
//!
//! A root is named by what it shows (a manifest digest, or a layer digest), so the
//! files under `tags/<tag>/rootfs/` are content-addressed too: when the tag moves, the
//! next lookup of `rootfs` gives a new root with new inodes, and the old one stays
//! right for programs still inside it. Layer indexes (layers.rs) and merged trees are
//! kept in memory within bounds and rebuilt on demand (the same layers give the same
//! node numbers, so inodes the kernel holds stay valid).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::try_join_all;

use super::generations::Generations;
use super::image_tree::ImageTree;
use super::layers::{IndexKey, LayerIndexes};
use super::publish::Publisher;
use crate::cache::Memo;
use crate::fs::blob::BlockFetcher;
use crate::fs::tree::node::{ImageRoot, RootOf};
use crate::fs::view::RegistryView;
use crate::image::entry::Entry;
use crate::image::manifest::{Layer, Platform};
use crate::image::tree::Tree;
use crate::registry::{Digest, Error, FetchedManifest, RepoName, Result, Tag};

/// Merged trees kept in memory, at most, and their memory.
const KEPT_TREES: usize = 64;
const TREE_MEMORY: usize = 128 << 20;
/// Image configs whose diff_ids are kept (the layer store's records).
const KEPT_CONFIGS: usize = 1024;
/// Images remembered as opened (their layers told so once); forgotten all at once.
const OPENED_IMAGES: usize = 4096;

/// Trees depend only on content, not on how they were reached: an image's on its
/// manifest, a layer's on its index (the blob, and the TOC its descriptor announces).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TreeKey {
    Image(Digest, u32),
    Layer(IndexKey, u32),
}

pub struct Images {
    pub(super) view: Arc<RegistryView>,
    pub(super) platform: Platform,
    pub(super) layers: LayerIndexes,
    /// `--publish-indexes`.
    publisher: Option<Publisher>,
    trees: Memo<TreeKey, Arc<ImageTree>>,
    /// Which trees are current (a refused SOCI index makes those that used it stale).
    generations: Arc<Generations>,
    /// The diff_ids of image configs, by repository and config digest.
    pub(super) diff_ids: Memo<(RepoName, Digest), Arc<Vec<Digest>>>,
    /// Image manifests a file was opened in, through one of their layers.
    opened: Mutex<HashSet<(RepoName, Digest)>>,
}

/// What the command line decides about shared (SOCI) indexes (docs/SEMANTICS.md,
/// "Shared indexes").
#[derive(Clone, Copy, Debug, Default)]
pub struct IndexOptions {
    /// `--verify-before-serving`: no shared index; nothing of a plain layer is shown
    /// before its pass.
    pub verify_before_serving: bool,
    /// `--publish-indexes`: push the index a pass built for every other machine.
    pub publish: bool,
}

impl Images {
    /// `background_fetch`: TOC layers are fetched whole in the background once used.
    pub fn new(
        view: Arc<RegistryView>,
        fetcher: BlockFetcher,
        platform: Platform,
        indexes: IndexOptions,
        background_fetch: bool,
    ) -> Images {
        let generations = Arc::new(Generations::default());
        let shared = !indexes.verify_before_serving;
        let layers = LayerIndexes::new(
            view.clone(),
            fetcher,
            shared,
            background_fetch,
            generations.clone(),
        );
        Images {
            layers,
            generations,
            publisher: indexes.publish.then(|| Publisher::new(view.clone())),
            view,
            platform,
            trees: Memo::new(KEPT_TREES, None).weighing(|t| t.tree.heap_bytes(), TREE_MEMORY),
            diff_ids: Memo::new(KEPT_CONFIGS, None),
            opened: Mutex::default(),
        }
    }

    /// A file under `root` was opened: a container started from its image. Its layers
    /// (the image's, for a layer reached through its manifest) fetch the rest of their
    /// blobs in the background (background.rs).
    pub async fn opened(&self, root: &ImageRoot, tree: &ImageTree) {
        tree.opened();
        let manifest = match &root.of {
            RootOf::ImageLayer(m, _) => m,
            RootOf::StoreLayer(l) => &l.manifest,
            RootOf::Tag(..) | RootOf::Image(_) | RootOf::Layer(_) => return,
        };
        let first = {
            let mut opened = self.opened.lock().unwrap_or_else(PoisonError::into_inner);
            if opened.len() >= OPENED_IMAGES {
                opened.clear();
            }
            opened.insert((root.repo.clone(), manifest.clone()))
        };
        if !first {
            return;
        }
        if let Ok(image) = self.resolve_image(&root.repo, manifest).await {
            for layer in &image.layers {
                if let Some(indexed) = self.layers.peek(layer) {
                    indexed.opened();
                }
            }
        }
    }

    /// The root under `tags/<tag>/rootfs`: the image the tag names now.
    pub async fn tag_root(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<ImageRoot>> {
        let manifest = self.view.tag_manifest(repo, tag).await?;
        let of = RootOf::Tag(tag.clone(), manifest.digest.clone());
        Ok(self.root(repo, of))
    }

    /// The root `of` in `repo`, in the current generation of what it shows.
    pub fn root(&self, repo: &RepoName, of: RootOf) -> Arc<ImageRoot> {
        let generation = self.generations.of(of.shows());
        Arc::new(ImageRoot {
            repo: repo.clone(),
            of,
            generation,
        })
    }

    /// The files under a root (built, or kept from before); an error for a root of a
    /// generation gone by (images/generations.rs).
    pub async fn tree(&self, root: &ImageRoot) -> Result<Arc<ImageTree>> {
        let repo = &root.repo;
        let generation = root.generation;
        if generation != self.generations.of(root.of.shows()) {
            return Err(stale());
        }
        let (layer, image) = match &root.of {
            RootOf::Tag(_, d) | RootOf::Image(d) => {
                return self.image_tree(repo, d, generation).await;
            }
            RootOf::Layer(d) => (self.layers.descriptor(repo, d).await?, None),
            RootOf::ImageLayer(m, d) => {
                let (layer, image) = self.image_layer(repo, m, d).await?;
                (layer, Some(image))
            }
            RootOf::StoreLayer(l) => {
                let (layer, image) = self.image_layer(repo, &l.manifest, &l.layer).await?;
                (layer, Some(image))
            }
        };
        self.layer_tree(repo, layer, image, generation).await
    }

    /// A tree kept in memory, else made; never one with a layer whose index was
    /// refused (its generation is gone by then).
    async fn kept_tree<F, Fut>(&self, key: TreeKey, make: F) -> Result<Arc<ImageTree>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<ImageTree>>>,
    {
        let tree = self.trees.get_or_fetch(&key, make).await?;
        if tree.layers.iter().any(|l| l.content.refusal().is_some()) {
            self.trees.forget(&key);
            return Err(stale());
        }
        Ok(tree)
    }

    /// An image's files: its layers merged.
    async fn image_tree(
        &self,
        repo: &RepoName,
        digest: &Digest,
        generation: u32,
    ) -> Result<Arc<ImageTree>> {
        let key = TreeKey::Image(digest.clone(), generation);
        self.kept_tree(key, || async {
            let image = self.resolve_image(repo, digest).await?;
            let manifest = Some(&image.manifest);
            let layers = image
                .layers
                .iter()
                .map(|l| self.layers.get(repo, l, manifest));
            let layers = try_join_all(layers).await?;
            for (layer, indexed) in image.layers.iter().zip(&layers) {
                if indexed.content.index().source.may_be_refused() {
                    self.generations.uses(digest, &layer.digest);
                }
            }
            if let Some(publisher) = &self.publisher {
                publisher.consider(repo, &image.manifest, &image.layers, &layers);
            }
            build(layers, Tree::merge).await
        })
        .await
    }

    /// One layer as an overlayfs lowerdir (as the image manifest `image` lists it, if
    /// it is reached through one).
    async fn layer_tree(
        &self,
        repo: &RepoName,
        layer: Layer,
        image: Option<Arc<FetchedManifest>>,
        generation: u32,
    ) -> Result<Arc<ImageTree>> {
        let key = TreeKey::Layer(IndexKey::of(&layer), generation);
        self.kept_tree(key, || async {
            let indexed = self.layers.get(repo, &layer, image.as_ref()).await?;
            build(vec![indexed], |entries| {
                Tree::overlay(entries.first().copied().unwrap_or_default())
            })
            .await
        })
        .await
    }
}

/// A root of a generation gone by: its files were shown from a SOCI index refused since.
fn stale() -> Error {
    Error::BadAnswer(
        "these files were shown from a SOCI index that was refused since; look them up again"
            .into(),
    )
}

/// The tree of indexed layers, made on a blocking thread.
async fn build(
    layers: Vec<Arc<super::layers::Indexed>>,
    make: fn(&[&[Entry]]) -> Tree,
) -> Result<Arc<ImageTree>> {
    let tree = tokio::task::spawn_blocking(move || {
        let entries: Vec<&[Entry]> = layers
            .iter()
            .map(|l| &l.content.index().entries[..])
            .collect();
        let tree = make(&entries);
        ImageTree { tree, layers }
    })
    .await
    .map_err(|e| Error::Unavailable(format!("merging layers failed: {e}")))?;
    Ok(Arc::new(tree))
}
