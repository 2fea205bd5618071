//! The files of images (docs/SEMANTICS.md, "Image contents"): `tags/<tag>/rootfs/`,
//! `.images/<digest>/rootfs/` (an image's files, its layers merged) and
//! `.layers/<digest>/` (one layer as an overlayfs lowerdir).
//!
//! A root is named by what it shows (a manifest digest, or a layer digest), so the
//! files under `tags/<tag>/rootfs/` are content-addressed too: when the tag moves, the
//! next lookup of `rootfs` gives a new root with new inodes, and the old one stays
//! right for programs still inside it. Layer indexes (layers.rs) and merged trees are
//! kept in memory within bounds and rebuilt on demand (the same layers give the same
//! node numbers, so inodes the kernel holds stay valid).

use std::sync::Arc;

use futures_util::future::try_join_all;

use super::image_tree::ImageTree;
use super::layers::LayerIndexes;
use crate::cache::Memo;
use crate::fs::blob::BlockFetcher;
use crate::fs::tree::node::{ImageRoot, RootOf};
use crate::fs::view::RegistryView;
use crate::image::entry::Entry;
use crate::image::manifest::{ImageManifest, Layer, Platform, select};
use crate::image::tree::Tree;
use crate::registry::{Digest, Error, RepoName, Result, Tag};

/// Merged trees kept in memory, at most, and their memory.
const KEPT_TREES: usize = 64;
const TREE_MEMORY: usize = 128 << 20;
/// Layers an image may have (docker stops at 127).
const MAX_LAYERS: usize = 1000;

/// Trees depend only on content, not on how they were reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TreeKey {
    Image(Digest),
    Layer(Digest),
}

impl TreeKey {
    fn of(root: &ImageRoot) -> TreeKey {
        match &root.of {
            RootOf::Tag(_, d) | RootOf::Image(d) => TreeKey::Image(d.clone()),
            RootOf::Layer(d) => TreeKey::Layer(d.clone()),
        }
    }
}

pub struct Images {
    view: Arc<RegistryView>,
    platform: Platform,
    layers: LayerIndexes,
    trees: Memo<TreeKey, Arc<ImageTree>>,
}

impl Images {
    pub fn new(view: Arc<RegistryView>, fetcher: BlockFetcher, platform: Platform) -> Images {
        Images {
            layers: LayerIndexes::new(view.clone(), fetcher),
            view,
            platform,
            trees: Memo::new(KEPT_TREES, None).weighing(|t| t.tree.heap_bytes(), TREE_MEMORY),
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
        let key = TreeKey::of(root);
        let repo = &root.repo;
        self.trees
            .get_or_fetch(&key, || async {
                let layers = match &key {
                    TreeKey::Image(d) => {
                        let layers = self.image_layers(repo, d).await?;
                        try_join_all(layers.iter().map(|l| self.layers.get(repo, l))).await?
                    }
                    TreeKey::Layer(d) => {
                        let layer = self.layers.descriptor(repo, d).await?;
                        vec![self.layers.get(repo, &layer).await?]
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
}
