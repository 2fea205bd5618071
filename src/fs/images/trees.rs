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

use super::image_tree::ImageTree;
use super::layers::{IndexKey, LayerIndexes};
use crate::cache::Memo;
use crate::fs::blob::BlockFetcher;
use crate::fs::tree::node::{ImageRoot, RootOf};
use crate::fs::view::RegistryView;
use crate::image::entry::Entry;
use crate::image::manifest::{Layer, Platform};
use crate::image::tree::Tree;
use crate::registry::{Digest, Error, RepoName, Result, Tag};

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
    Image(Digest),
    Layer(IndexKey),
}

pub struct Images {
    pub(super) view: Arc<RegistryView>,
    pub(super) platform: Platform,
    pub(super) layers: LayerIndexes,
    trees: Memo<TreeKey, Arc<ImageTree>>,
    /// The diff_ids of image configs, by repository and config digest.
    pub(super) diff_ids: Memo<(RepoName, Digest), Arc<Vec<Digest>>>,
    /// Image manifests a file was opened in, through one of their layers.
    opened: Mutex<HashSet<(RepoName, Digest)>>,
}

impl Images {
    /// `background_fetch`: TOC layers are fetched whole in the background once used.
    pub fn new(
        view: Arc<RegistryView>,
        fetcher: BlockFetcher,
        platform: Platform,
        background_fetch: bool,
    ) -> Images {
        Images {
            layers: LayerIndexes::new(view.clone(), fetcher, background_fetch),
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
        Ok(Arc::new(ImageRoot {
            repo: repo.clone(),
            of: RootOf::Tag(tag.clone(), manifest.digest.clone()),
        }))
    }

    /// The files under a root (built, or kept from before).
    pub async fn tree(&self, root: &ImageRoot) -> Result<Arc<ImageTree>> {
        let repo = &root.repo;
        let layer = match &root.of {
            RootOf::Tag(_, d) | RootOf::Image(d) => return self.image_tree(repo, d).await,
            RootOf::Layer(d) => self.layers.descriptor(repo, d).await?,
            RootOf::ImageLayer(m, d) => self.manifest_layer(repo, m, d).await?,
            RootOf::StoreLayer(l) => self.manifest_layer(repo, &l.manifest, &l.layer).await?,
        };
        self.layer_tree(repo, layer).await
    }

    /// An image's files: its layers merged.
    async fn image_tree(&self, repo: &RepoName, digest: &Digest) -> Result<Arc<ImageTree>> {
        let key = TreeKey::Image(digest.clone());
        self.trees
            .get_or_fetch(&key, || async {
                let image = self.resolve_image(repo, digest).await?;
                let layers = image.layers.iter().map(|l| self.layers.get(repo, l));
                let layers = try_join_all(layers).await?;
                build(layers, Tree::merge).await
            })
            .await
    }

    /// One layer as an overlayfs lowerdir.
    async fn layer_tree(&self, repo: &RepoName, layer: Layer) -> Result<Arc<ImageTree>> {
        let key = TreeKey::Layer(IndexKey::of(&layer));
        self.trees
            .get_or_fetch(&key, || async {
                let indexed = self.layers.get(repo, &layer).await?;
                build(vec![indexed], |entries| {
                    Tree::overlay(entries.first().copied().unwrap_or_default())
                })
                .await
            })
            .await
    }
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
