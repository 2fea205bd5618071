//! `/.layerstore/`: a containers/storage Additional Layer Store (docs/SEMANTICS.md,
//! "Container runtimes"), so that podman and CRI-O use an image's layers from the
//! registry instead of downloading them (`additionallayerstores =
//! ["/mnt/reg/.layerstore:ref"]` in storage.conf):
//!
//! ```text
//! .layerstore/<base64 of an image reference>/<layer digest>/
//!     diff     the layer as an overlayfs lowerdir (what .images/<m>/layers/<l>/ shows)
//!     blob     the layer blob (what blobs/<l> is)
//!     info     the layer record containers/storage reads (images/layer_record.rs)
//! ```
//!
//! A layer is looked up by its blob digest (podman 4.3) or by the digest of its TOC
//! (newer containers/storage, for eStargz and zstd:chunked), in the image the reference
//! names now; its descriptor and diff_id come from that image's manifest and config.
//!
//! containers/storage tells a store when it starts and stops using a layer by creating
//! `<layer>/use` and by `rmdir <layer>`; a store that keeps no count answers ENOENT to
//! both, which it takes as "understood" (anything else it logs as an error). Nothing is
//! listed here: like `/.regfs`, the store opens by name only.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::image_ref::{self, RegistryDomain};
use super::images::root_node;
use crate::fs::attr::{self, Attr, IMMUTABLE_TTL, Kind};
use crate::fs::errno::{Errno, fail};
use crate::fs::images::Images;
use crate::fs::tree::node::{
    ImageRoot, Node, RootOf, STORE_BLOB, STORE_DIFF, STORE_INFO, StoreImage, StoreLayer, StorePath,
};
use crate::fs::tree::open_file::Opening;
use crate::registry::Digest;

pub struct LayerStore {
    images: Arc<Images>,
    /// The registry this mount serves: references to another are not here.
    domain: RegistryDomain,
    /// `--tag-ttl`: a reference's tag is resolved again after it.
    tag_ttl: Duration,
}

/// The registry object a layer store file is, under its usual name (`blob`).
pub fn object(path: &StorePath) -> Option<Node> {
    match path {
        StorePath::Blob(l) => Some(Node::Blob(l.image.repo.clone(), l.layer.clone())),
        _ => None,
    }
}

impl LayerStore {
    /// The root of a layer's `diff`.
    fn diff_root(&self, l: &Arc<StoreLayer>) -> Arc<ImageRoot> {
        self.images
            .root(&l.image.repo, RootOf::StoreLayer(l.clone()))
    }

    pub fn new(images: Arc<Images>, domain: RegistryDomain, tag_ttl: Duration) -> LayerStore {
        LayerStore {
            images,
            domain,
            tag_ttl,
        }
    }

    pub async fn child(&self, path: &StorePath, name: &str) -> Result<Node, Errno> {
        let at = |p| Ok(Node::Store(p));
        match path {
            StorePath::Root => {
                let image = self.image(name).ok_or(Errno::ENOENT)?;
                at(StorePath::Image(Arc::new(image)))
            }
            StorePath::Image(image) => {
                let wanted = Digest::parse(name).ok_or(Errno::ENOENT)?;
                let (manifest, layer) = self
                    .images
                    .find_layer(&image.repo, &image.reference, &wanted)
                    .await
                    .map_err(|e| fail(&Node::Store(path.clone()), e))?;
                at(StorePath::Layer(Arc::new(StoreLayer {
                    image: image.clone(),
                    name: wanted,
                    manifest,
                    layer,
                })))
            }
            StorePath::Layer(l) => match name {
                STORE_DIFF => Ok(root_node(self.diff_root(l))),
                STORE_INFO => at(StorePath::Info(l.clone())),
                STORE_BLOB => at(StorePath::Blob(l.clone())),
                // `use` among them: see `create`.
                _ => Err(Errno::ENOENT),
            },
            StorePath::Info(_) | StorePath::Blob(_) => Err(Errno::ENOTDIR),
        }
    }

    /// The image reference a directory at the top is named by, if it is a reference
    /// to this registry.
    fn image(&self, name: &str) -> Option<StoreImage> {
        let Some(parsed) = image_ref::decode(name) else {
            debug!(name, "not an image reference in base64");
            return None;
        };
        if !self.domain.names(&parsed.domain) {
            debug!(domain = parsed.domain, "a reference to another registry");
            return None;
        }
        Some(StoreImage {
            name: name.to_owned(),
            repo: parsed.repo,
            reference: parsed.reference,
        })
    }

    pub fn children(&self, path: &StorePath) -> Result<Vec<(String, Node)>, Errno> {
        match path {
            StorePath::Root | StorePath::Image(_) => Ok(Vec::new()),
            StorePath::Layer(l) => Ok(vec![
                (STORE_DIFF.to_owned(), root_node(self.diff_root(l))),
                (
                    STORE_INFO.to_owned(),
                    Node::Store(StorePath::Info(l.clone())),
                ),
                (
                    STORE_BLOB.to_owned(),
                    Node::Store(StorePath::Blob(l.clone())),
                ),
            ]),
            StorePath::Info(_) | StorePath::Blob(_) => Err(Errno::ENOTDIR),
        }
    }

    /// The attributes of the store's own directories and of `info` (`blob` is the
    /// registry's object, asked there).
    pub async fn attr(&self, path: &StorePath, ino: u64) -> Result<Attr, Errno> {
        match path {
            StorePath::Info(l) => {
                let size = self.info(l).await?.len() as u64;
                let mtime = attr::content_mtime(&l.layer);
                Ok(Attr::plain(
                    ino,
                    Kind::File,
                    size,
                    mtime,
                    0o444,
                    IMMUTABLE_TTL,
                ))
            }
            _ => Ok(Attr::dir(ino, self.tag_ttl)),
        }
    }

    pub async fn open(&self, path: &StorePath) -> Result<Opening, Errno> {
        match path {
            StorePath::Info(l) => Ok(Opening::bytes(self.info(l).await?, true)),
            _ => Err(Errno::EISDIR),
        }
    }

    /// The layer's record: the same for the same manifest, layer and way it was found.
    async fn info(&self, l: &StoreLayer) -> Result<bytes::Bytes, Errno> {
        self.images
            .layer_record(&l.image.repo, &l.manifest, &l.layer, l.by_toc())
            .await
            .map_err(|e| fail(&Node::Store(StorePath::Info(Arc::new(l.clone()))), e))
    }

    /// containers/storage creating `<layer>/use`: "this layer is in use". No count is
    /// kept (the mount serves any layer at any time), so ENOENT, which it expects then.
    pub fn create(&self, dir: &StorePath, name: &str) -> Errno {
        debug!(path = %dir, name, "layer store: create answered ENOENT (no use count kept)");
        Errno::ENOENT
    }

    /// containers/storage's `rmdir <layer>`: "this layer is no longer used". ENOENT, as
    /// for `use`.
    pub fn rmdir(&self, dir: &StorePath, name: &str) -> Errno {
        debug!(path = %dir, name, "layer store: rmdir answered ENOENT (no use count kept)");
        Errno::ENOENT
    }
}
