//! An image's files: the merged tree (src/image/tree.rs) and the indexed layers its
//! files come from; what each node looks like, lists, links to and holds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::layers::Indexed;
use crate::fs::attr::{self, Kind};
use crate::image::entry::{Entry, EntryKind, Xattrs};
use crate::image::tree::{self, Origin, Tree};
use crate::registry::{Error, Result};

/// An image's files: the tree, and the layers its nodes come from.
pub struct ImageTree {
    pub tree: Tree,
    pub(super) layers: Vec<Arc<Indexed>>,
}

/// A directory's children: name, node, kind.
pub type Children = Vec<(Box<[u8]>, u32, Kind)>;

/// What a node of an image's tree looks like.
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

impl ImageTree {
    fn node(&self, id: u32) -> Result<&tree::Node> {
        self.tree
            .node(id)
            .ok_or_else(|| Error::NotFound(format!("node {id} is not in this image")))
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
                mtime: attr::epoch(),
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

    /// The node's extended attributes; under `.layers/<digest>`, an opaque directory also has
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

    /// A file of this tree was opened: its layers may fetch the rest in the background.
    pub fn opened(&self) {
        for layer in &self.layers {
            layer.opened();
        }
    }

    /// File `id`'s content as a local file the kernel may read directly, if its decoded
    /// bytes are kept whole in the disk cache.
    pub async fn local_file(&self, id: u32) -> Option<std::fs::File> {
        let node = self.node(id).ok()?;
        let Origin::Entry { layer, .. } = node.origin else {
            return None;
        };
        let entry = self.entry(node)?;
        let layer = self.layers.get(usize::from(layer))?;
        layer.content.local_file(entry).await
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
