//! The image area of the tree (docs/SEMANTICS.md, "Image contents"): `.images/`,
//! `.layers/`, and the files under a root (`tags/<tag>/rootfs/`,
//! `.images/<digest>/rootfs/`, `.layers/<digest>/`, `.images/<digest>/layers/<digest>/`,
//! the layer store's `diff/`), as images/ builds them.

use std::sync::Arc;
use std::time::Duration;

use crate::fs::attr::{Attr, IMMUTABLE_TTL, Kind};
use crate::fs::errno::{Errno, fail};
use crate::fs::images::{ImageTree, Images};
use crate::fs::tree::node::{IMAGE_LAYERS, ImagePath, ImageRoot, Node, ROOTFS, RootOf};
use crate::fs::tree::open_file::{OpenFile, Opening};
use crate::fs::view::RegistryView;
use crate::image::entry::Xattrs;
use crate::image::tree::ROOT as TREE_ROOT;
use crate::registry::{Digest, RepoName};

/// The node of a root's top directory.
pub fn root_node(root: Arc<ImageRoot>) -> Node {
    Node::Image(ImagePath::Inside(root, TREE_ROOT, Kind::Dir))
}

pub struct ImageDirs {
    images: Arc<Images>,
    view: Arc<RegistryView>,
    tag_ttl: Duration,
}

impl ImageDirs {
    pub fn new(images: Arc<Images>, view: Arc<RegistryView>, tag_ttl: Duration) -> ImageDirs {
        ImageDirs {
            images,
            view,
            tag_ttl,
        }
    }

    /// The top node of the root `of` in `repo`.
    fn root_of(&self, repo: &RepoName, of: RootOf) -> Node {
        root_node(self.images.root(repo, of))
    }

    /// The files under `root`.
    async fn tree(&self, root: &ImageRoot) -> Result<Arc<ImageTree>, Errno> {
        // Boxed: building a tree (layer indexes, passes, the disk cache) is a deep future,
        // and without the box every operation that may reach an image carries its layout
        // (rustc's layout query overflowed its depth limit in crates awaiting `Fs`).
        Box::pin(self.images.tree(root)).await.map_err(|e| {
            let top = ImagePath::Inside(Arc::new(root.clone()), TREE_ROOT, Kind::Dir);
            fail(&top, e)
        })
    }

    /// The node called `name` in `path` (names inside images need not be UTF-8; the
    /// directories above them are named by digests).
    pub async fn child(&self, path: &ImagePath, name: &[u8]) -> Result<Node, Errno> {
        if let ImagePath::Inside(root, dir, _) = path {
            let tree = self.tree(root).await?;
            let (id, kind) = tree.child(*dir, name).ok_or(Errno::ENOENT)?;
            return Ok(Node::Image(ImagePath::Inside(root.clone(), id, kind)));
        }
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        match path {
            ImagePath::ImagesDir(repo) => {
                let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
                let node = Node::Image(ImagePath::ImageDir(repo.clone(), digest.clone()));
                self.view
                    .manifest(repo, &digest)
                    .await
                    .map_err(|e| fail(&node, e))?;
                Ok(node)
            }
            ImagePath::ImageDir(repo, digest) if name == ROOTFS => {
                Ok(self.root_of(repo, RootOf::Image(digest.clone())))
            }
            ImagePath::ImageDir(repo, digest) if name == IMAGE_LAYERS => Ok(Node::Image(
                ImagePath::ImageLayers(repo.clone(), digest.clone()),
            )),
            ImagePath::ImageDir(..) => Err(Errno::ENOENT),
            ImagePath::LayersDir(repo) => {
                let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
                Ok(self.root_of(repo, RootOf::Layer(digest)))
            }
            ImagePath::ImageLayers(repo, manifest) => {
                // Only a layer that manifest lists, described as it describes it.
                let layer = Digest::parse(name).ok_or(Errno::ENOENT)?;
                self.images
                    .manifest_layer(repo, manifest, &layer)
                    .await
                    .map_err(|e| fail(path, e))?;
                Ok(self.root_of(repo, RootOf::ImageLayer(manifest.clone(), layer)))
            }
            ImagePath::Inside(..) => Err(Errno::ENOENT),
        }
    }

    /// The parent and children of a directory (names as the layer has them, UTF-8 or
    /// not, sorted).
    pub async fn list(&self, path: &ImagePath) -> Result<(Node, Vec<(Box<[u8]>, Node)>), Errno> {
        let parent = Node::Image(path.clone()).parent();
        let rootfs = |repo: &RepoName, d: &Digest| self.root_of(repo, RootOf::Image(d.clone()));
        let (root, id) = match path {
            // Opened by digest, never listed: listing them would index every layer a
            // `ls --color` stats.
            ImagePath::ImagesDir(_) | ImagePath::LayersDir(_) | ImagePath::ImageLayers(..) => {
                return Ok((parent, Vec::new()));
            }
            ImagePath::ImageDir(repo, d) => {
                return Ok((parent, vec![(ROOTFS.as_bytes().into(), rootfs(repo, d))]));
            }
            ImagePath::Inside(root, id, _) => (root, *id),
        };
        let tree = self.tree(root).await?;
        let (parent, children) = tree.list(id).map_err(|e| fail(path, e))?;
        let at = |id, kind| Node::Image(ImagePath::Inside(root.clone(), id, kind));
        let parent = if id == TREE_ROOT {
            root.holder()
        } else {
            at(parent, Kind::Dir)
        };
        let children = children
            .into_iter()
            .map(|(name, child, kind)| (name, at(child, kind)))
            .collect();
        Ok((parent, children))
    }

    pub async fn attr(&self, path: &ImagePath, ino: u64) -> Result<Attr, Errno> {
        let ImagePath::Inside(root, id, _) = path else {
            return Ok(Attr::dir(ino, self.tag_ttl));
        };
        let tree = self.tree(root).await?;
        let a = tree.attr(*id).map_err(|e| fail(path, e))?;
        // Content-addressed like blobs; only which root a root directory is moves: with
        // the tag, or to a new generation (a refused SOCI index, images/generations.rs).
        let ttl = match *id {
            TREE_ROOT => self.tag_ttl,
            _ => IMMUTABLE_TTL,
        };
        Ok(Attr {
            ino,
            kind: a.kind,
            size: a.size,
            mtime: a.mtime,
            perm: a.perm,
            ttl,
            owner: Some((a.uid, a.gid)),
            nlink: a.nlink,
            rdev: a.rdev,
        })
    }

    pub async fn open(&self, path: &ImagePath) -> Result<Opening, Errno> {
        match path {
            ImagePath::Inside(root, id, Kind::File) => {
                let tree = self.tree(root).await?;
                self.images.opened(root, &tree).await;
                let local_file = tree.local_file(*id).await;
                let mut opening = Opening::of(OpenFile::Image(tree, *id), true);
                opening.local_file = local_file;
                Ok(opening)
            }
            ImagePath::Inside(..) => Err(Errno::EINVAL),
            _ => Err(Errno::EISDIR),
        }
    }

    pub async fn readlink(&self, path: &ImagePath) -> Result<Vec<u8>, Errno> {
        let ImagePath::Inside(root, id, _) = path else {
            return Err(Errno::EINVAL);
        };
        let tree = self.tree(root).await?;
        tree.readlink(*id).map(Vec::from).map_err(|e| fail(path, e))
    }

    /// The extended attributes a file of an image has.
    pub async fn xattrs(&self, path: &ImagePath) -> Result<Xattrs, Errno> {
        let ImagePath::Inside(root, id, _) = path else {
            return Ok(Vec::new());
        };
        let tree = self.tree(root).await?;
        tree.xattrs(*id).map_err(|e| fail(path, e))
    }
}
