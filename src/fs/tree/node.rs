//! What each path in the tree stands for (DESIGN §1), and the inode table that numbers them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fs::images::trees::{View, ViewRoot};
use crate::fs::tree::oci_layout::OciPath;
use crate::fs::view::referrers::RefPath;
use crate::registry::{Digest, RepoName, Tag};

/// The names of a repository's own directories. They shadow a child repository of the
/// same name (`a/tags` under `a`), which stays reachable through its full name nowhere
/// else; registries with such names are rare enough to accept that.
pub const TAGS: &str = "tags";
pub const MANIFESTS: &str = "manifests";
pub const BLOBS: &str = "blobs";
pub const UPLOADS: &str = "uploads";
pub const MANIFEST_JSON: &str = "manifest.json";
/// regfs's own directory at the root. A leading dot cannot start a repository name, so
/// it never hides one.
pub const CONTROL: &str = ".regfs";
pub const STATS: &str = "stats";
/// Views of image contents (DESIGN §7). They open by name and are never listed, so
/// `grep -r`, `find` and `rsync -a` of a repository see its objects once, not every
/// image unpacked again. A dot cannot start a repository name, so they hide none.
pub const IMAGES: &str = ".images";
pub const LAYERS: &str = ".layers";
pub const ROOTFS: &str = "rootfs";
/// The repository as an OCI image layout (oci_layout.rs), and the referrers of its
/// manifests (referrers.rs): views too, opened by name only.
pub const OCI: &str = ".oci";
pub const REFERRERS: &str = ".referrers";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The root (empty path) or a namespace and/or repository path such as `team/app`.
    Dir(String),
    Tags(RepoName),
    TagDir(RepoName, Tag),
    TagManifest(RepoName, Tag),
    Manifests(RepoName),
    Manifest(RepoName, Digest),
    Blobs(RepoName),
    Blob(RepoName, Digest),
    Uploads(RepoName),
    /// `uploads/<name>` while it is being written.
    Upload(RepoName, String),
    /// `uploads/<name>` once committed: a symlink to `../blobs/<digest>`. A node of its
    /// own, so the kernel sees a new inode rather than a file that turned into a link.
    UploadLink(RepoName, String),
    /// A temp file in a writable directory (rsync's `.name.XXXXXX`), waiting for the
    /// rename onto its final name.
    Scratch(Box<Node>, String),
    /// `/.regfs`, regfs's own files.
    Control,
    /// `/.regfs/stats`: counters as JSON, made fresh at every open.
    Stats,
    /// `<repo>/.images`: image manifests by digest (not listed).
    ImagesDir(RepoName),
    /// `<repo>/.images/<digest>`: holds that image's `rootfs`.
    ImageDir(RepoName, Digest),
    /// `<repo>/.layers`: layers by digest (not listed).
    LayersDir(RepoName),
    /// A file or directory inside an image view: node `id` of the view's tree, and its
    /// kind (fixed for a given view and id: trees are built the same way every time).
    InImage(Arc<View>, u32, Kind),
    /// Under `<repo>/.oci` (see oci_layout.rs).
    Oci(RepoName, OciPath),
    /// Under `<repo>/.referrers` (see referrers.rs).
    Referrers(RepoName, RefPath),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

impl Node {
    pub fn root() -> Node {
        Node::Dir(String::new())
    }

    pub fn kind(&self) -> Kind {
        match self {
            Node::TagManifest(..)
            | Node::Manifest(..)
            | Node::Blob(..)
            | Node::Upload(..)
            | Node::Scratch(..)
            | Node::Stats => Kind::File,
            Node::UploadLink(..) => Kind::Symlink,
            Node::InImage(_, _, kind) => *kind,
            Node::Oci(_, p) => p.kind(),
            Node::Referrers(_, p) => p.kind(),
            _ => Kind::Dir,
        }
    }

    /// The directory that holds this node (the root is its own parent).
    pub fn parent(&self) -> Node {
        let repo_dir = |r: &RepoName| Node::Dir(r.as_str().to_owned());
        match self {
            Node::Dir(path) => Node::Dir(path.rsplit_once('/').map_or("", |(p, _)| p).to_owned()),
            Node::Tags(r) | Node::Manifests(r) | Node::Blobs(r) | Node::Uploads(r) => repo_dir(r),
            Node::TagDir(r, _) => Node::Tags(r.clone()),
            Node::TagManifest(r, t) => Node::TagDir(r.clone(), t.clone()),
            Node::Manifest(r, _) => Node::Manifests(r.clone()),
            Node::Blob(r, _) => Node::Blobs(r.clone()),
            Node::Upload(r, _) | Node::UploadLink(r, _) => Node::Uploads(r.clone()),
            Node::Scratch(dir, _) => (**dir).clone(),
            Node::Control => Node::root(),
            Node::Stats => Node::Control,
            Node::ImagesDir(r) | Node::LayersDir(r) => repo_dir(r),
            Node::ImageDir(r, _) => Node::ImagesDir(r.clone()),
            // Only a view's root has its parent here; the tree knows the others'.
            Node::InImage(view, _, _) => view.holder(),
            Node::Oci(r, p) => p.parent(r),
            Node::Referrers(r, p) => p.parent(r),
        }
    }
}

/// The path below the mountpoint, for log lines.
impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Dir(p) => write!(f, "/{p}"),
            Node::Tags(r) => write!(f, "/{r}/{TAGS}"),
            Node::TagDir(r, t) => write!(f, "/{r}/{TAGS}/{t}"),
            Node::TagManifest(r, t) => write!(f, "/{r}/{TAGS}/{t}/{MANIFEST_JSON}"),
            Node::Manifests(r) => write!(f, "/{r}/{MANIFESTS}"),
            Node::Manifest(r, d) => write!(f, "/{r}/{MANIFESTS}/{d}"),
            Node::Blobs(r) => write!(f, "/{r}/{BLOBS}"),
            Node::Blob(r, d) => write!(f, "/{r}/{BLOBS}/{d}"),
            Node::Uploads(r) => write!(f, "/{r}/{UPLOADS}"),
            Node::Upload(r, name) | Node::UploadLink(r, name) => {
                write!(f, "/{r}/{UPLOADS}/{name}")
            }
            Node::Scratch(dir, name) => write!(f, "{dir}/{name}"),
            Node::Control => write!(f, "/{CONTROL}"),
            Node::Stats => write!(f, "/{CONTROL}/{STATS}"),
            Node::ImagesDir(r) => write!(f, "/{r}/{IMAGES}"),
            Node::ImageDir(r, d) => write!(f, "/{r}/{IMAGES}/{d}"),
            Node::LayersDir(r) => write!(f, "/{r}/{LAYERS}"),
            Node::Oci(r, p) => write!(f, "/{r}/{}", p.show()),
            Node::Referrers(r, p) => write!(f, "/{r}/{}", p.show()),
            Node::InImage(view, id, _) => {
                let r = &view.repo;
                match &view.root {
                    ViewRoot::Tag(t, _) => write!(f, "/{r}/{TAGS}/{t}/{ROOTFS}")?,
                    ViewRoot::Image(d) => write!(f, "/{r}/{IMAGES}/{d}/{ROOTFS}")?,
                    ViewRoot::Layer(d) => write!(f, "/{r}/{LAYERS}/{d}")?,
                }
                // Paths inside a view are not kept (hardlinks have several).
                if *id != 0 {
                    write!(f, " (node {id})")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Directories, and anything without content of its own, carry this time.
pub fn epoch() -> SystemTime {
    // 2000-01-01T00:00:00Z: a fixed, plausible date, the same on every mount.
    UNIX_EPOCH + Duration::from_secs(946_684_800)
}

/// The mtime of content with this digest: the same on every mount (so rsync's
/// size+mtime check sees nothing changed), and different for different content (so a
/// tag that moves gets a new mtime). Derived from 28 bits of the digest: a date between
/// 2000 and 2008, with the nanoseconds from 30 more bits.
pub fn content_mtime(digest: &Digest) -> SystemTime {
    let hex = digest.encoded();
    let bits = |range: std::ops::Range<usize>| {
        hex.get(range)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
    };
    let secs = bits(0..7); // 28 bits
    let nanos = (bits(7..15) % 1_000_000_000) as u32;
    epoch() + Duration::new(secs, nanos)
}

/// Numbers nodes. A node keeps its number for the life of the mount, so the kernel's
/// cached entries always mean the same thing.
pub struct InodeTable {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
    next: u64,
}

pub const ROOT_INO: u64 = 1;

impl Default for InodeTable {
    fn default() -> Self {
        let mut table = InodeTable {
            by_node: HashMap::new(),
            by_ino: HashMap::new(),
            next: ROOT_INO,
        };
        table.ino_of(&Node::root());
        table
    }
}

impl InodeTable {
    pub fn ino_of(&mut self, node: &Node) -> u64 {
        if let Some(&ino) = self.by_node.get(node) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(ino, node.clone());
        ino
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        let repo = RepoName::parse("team/app").expect("valid");
        let tag = Tag::parse("v1").expect("valid");
        assert_eq!(
            Node::Dir("team/app".into()).parent(),
            Node::Dir("team".into())
        );
        assert_eq!(Node::Dir("team".into()).parent(), Node::root());
        assert_eq!(Node::root().parent(), Node::root());
        assert_eq!(
            Node::TagManifest(repo.clone(), tag.clone()).parent(),
            Node::TagDir(repo.clone(), tag)
        );
        assert_eq!(Node::Blobs(repo).parent(), Node::Dir("team/app".into()));
    }

    #[test]
    fn mtimes_are_stable_and_differ() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        assert_eq!(content_mtime(&a), content_mtime(&a.clone()));
        assert_ne!(content_mtime(&a), content_mtime(&b));
        assert!(content_mtime(&a) >= epoch());
    }

    #[test]
    fn inodes_are_stable() {
        let mut t = InodeTable::default();
        assert_eq!(t.ino_of(&Node::root()), ROOT_INO);
        let n = Node::Dir("x".into());
        let i = t.ino_of(&n);
        assert_eq!(t.ino_of(&n), i);
        assert_eq!(t.node(i), Some(&n));
        assert_ne!(i, ROOT_INO);
    }
}
