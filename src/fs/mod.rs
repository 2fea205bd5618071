//! Filesystem semantics in plain Rust: lookup, getattr, readdir, open and read over the
//! registry tree of DESIGN §1. Every operation returns `Result<_, Errno>`; nothing here
//! knows of FUSE, so it can be driven by tests or another front end.

pub mod blob;
pub mod deadline;
mod handles;
pub mod images;
pub mod tree;
pub mod view;
pub mod write;

use std::ffi::OsStr;
use std::fmt::Display;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tracing::{debug, warn};

use crate::cache::{BlockCache, DiskCache};
use crate::image::manifest::Platform;
use crate::image::tree::ROOT as VIEW_ROOT;
use crate::registry::types::is_path_component;
use crate::registry::{Digest, Error, RegistryClient, RepoName, Tag};
use blob::fetch::BlockSource;
use blob::reads::{BlobReads, OpenBlob};
use handles::Handles;
use images::trees::{ImageTree, Images, View, ViewRoot};
use tree::node::{
    self, BLOBS, CONTROL, IMAGES, InodeTable, LAYERS, MANIFEST_JSON, MANIFESTS, Node, OCI,
    REFERRERS, ROOTFS, STATS, TAGS, UPLOADS,
};
use tree::oci_layout::{self, OciPath};
use view::referrers::{self, RefPath};
use view::registry_view::RegistryView;
use write::deletes::Deletes;
use write::files::{Writes, WrittenFile, final_node};

pub use tree::node::{Kind, ROOT_INO};

/// How long the kernel may keep entries and attributes of content-addressed files,
/// which never change.
const IMMUTABLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an operation in an image view may wait for layers to be indexed.
const VIEW_DEADLINE: Duration = Duration::from_secs(3600);
/// Tag manifests fetched at once when a `tags/` directory is listed (people grep them next),
/// and the most tags of one listing warmed that way (a repository of 50,000 tags is
/// read on demand beyond them, not all fetched because someone typed `ls`).
const TAG_MANIFEST_WARMING: usize = 16;
const TAG_MANIFEST_WARMING_MAX: usize = 1024;
/// Repositories of one listed directory whose tag lists, and first tag manifests, are
/// fetched in the background, this many at once: `grep -r` and `rsync -a` walk into
/// them next, one after the other, and over a distant link each would pay its round
/// trips in turn. At most the first REPO_WARMING_MAX of a listing, with
/// REPO_TAG_WARMING_MAX tags each (a plain `ls` must stay cheap).
const REPO_WARMING: usize = 8;
const REPO_WARMING_MAX: usize = 64;
const REPO_TAG_WARMING_MAX: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
}

/// Logs a registry error against the path it happened on, and gives its errno.
fn fail(path: &dyn Display, e: Error) -> Errno {
    match e {
        Error::NotFound(_) => debug!(%path, "{e}"),
        _ => warn!(%path, "{e}"),
    }
    Errno(e.errno())
}

#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Permission bits.
    pub perm: u16,
    /// How long the kernel may trust this answer.
    pub ttl: Duration,
    /// Owner and group; `None`: the user who mounted (registry objects have none).
    pub owner: Option<(u32, u32)>,
    /// Names of the file; 0: the usual (1, or 2 for a directory).
    pub nlink: u32,
    /// Device number of a char or block device.
    pub rdev: u32,
}

impl Attr {
    /// An attribute of a registry object: owned by whoever mounted, one name.
    fn plain(ino: u64, kind: Kind, size: u64, mtime: SystemTime, perm: u16, ttl: Duration) -> Attr {
        Attr {
            ino,
            kind,
            size,
            mtime,
            perm,
            ttl,
            owner: None,
            nlink: 0,
            rdev: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    /// Bytes: names inside images need not be UTF-8.
    pub name: Box<[u8]>,
}

/// An open file: its bytes, fixed at open (a tag that moves does not change an open
/// file), or the blob it reads from.
#[derive(Clone)]
enum OpenFile {
    Bytes(Bytes),
    Blob(Arc<OpenBlob>),
    /// A file being written (DESIGN §2).
    Write(Arc<WrittenFile>),
    /// A file of an image view: node `id` of the tree.
    Image(Arc<ImageTree>, u32),
}

pub struct Opened {
    pub fh: u64,
    /// Whether the kernel may keep cached pages from an earlier open (immutable content).
    pub keep_cache: bool,
    /// Whether every read must come here, past the kernel's page cache and its idea of
    /// the file size (files made fresh at each open, like `/.regfs/stats`).
    pub direct_io: bool,
    /// The content as a local file (a verified blob in the disk cache): the kernel may
    /// read it directly (FUSE passthrough) instead of asking here.
    pub local_file: Option<std::fs::File>,
}

pub struct Fs {
    view: Arc<RegistryView>,
    blobs: BlobReads,
    images: Images,
    writes: Writes,
    deletes: Deletes,
    read_only: bool,
    /// `--allow-delete`: `rm` deletes from the registry (else EPERM).
    allow_delete: bool,
    inodes: Mutex<InodeTable>,
    dirs: Handles<Arc<Vec<DirEntry>>>,
    files: Handles<OpenFile>,
    tag_ttl: Duration,
}

/// What the command line decides about the tree.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Repositories to show even when the catalog is refused (`--repo`).
    pub repos: Vec<RepoName>,
    /// How long tag lists and tag → manifest answers are trusted (`--tag-ttl`).
    pub tag_ttl: Duration,
    /// Every write is EROFS (`--read-only`).
    pub read_only: bool,
    /// `rm` deletes from the registry (`--allow-delete`; else EPERM).
    pub allow_delete: bool,
    /// Which image of an index `rootfs` shows (`--platform`).
    pub platform: Platform,
}

impl Fs {
    pub fn new(
        client: RegistryClient,
        cache: Arc<BlockCache>,
        disk: Option<DiskCache>,
        options: FsOptions,
    ) -> Fs {
        let view = Arc::new(RegistryView::new(
            client.clone(),
            options.repos,
            options.tag_ttl,
            disk.clone(),
        ));
        Fs {
            images: Images::new(
                view.clone(),
                BlockSource::new(client.clone(), cache.clone(), disk.clone()),
                options.platform,
            ),
            blobs: BlobReads::new(cache, client.clone(), disk.clone()),
            // Writes and deletes, and the reads that decide them, must see the origin.
            deletes: Deletes::new(client.origin_only(), view.clone()),
            writes: Writes::new(client.origin_only(), view.clone(), disk),
            read_only: options.read_only,
            allow_delete: options.allow_delete,
            view,
            inodes: Mutex::new(InodeTable::default()),
            dirs: Handles::new(),
            files: Handles::new(),
            tag_ttl: options.tag_ttl,
        }
    }

    /// The disk cache, for content-addressed metadata (`get_meta` / `put_meta`).
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.blobs.disk()
    }

    /// Pushes the indexes an earlier mount of this registry held (see `Writes`).
    pub async fn resume_held(&self) {
        self.writes.resume_held().await;
    }

    /// An open was answered with FUSE passthrough (counted in `/.regfs/stats`).
    pub fn passthrough_opened(&self) {
        crate::stats::Stats::add(&self.view.client().stats().passthrough_opens, 1);
    }

    /// `/.regfs/stats`: the counters as pretty JSON.
    fn stats_json(&self) -> Bytes {
        let cache = self.blobs.cache();
        let snapshot = self
            .view
            .client()
            .stats()
            .snapshot(cache.budget(), cache.block_size());
        let mut json = serde_json::to_vec_pretty(&snapshot).unwrap_or_default();
        json.push(b'\n');
        Bytes::from(json)
    }

    fn inodes(&self) -> std::sync::MutexGuard<'_, InodeTable> {
        self.inodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn node(&self, ino: u64) -> Result<Node, Errno> {
        // An inode the kernel holds but we do not know would be a bug; ENOENT is the
        // honest answer for "that object is not here".
        self.inodes().node(ino).cloned().ok_or(Errno::ENOENT)
    }

    fn ino(&self, node: &Node) -> u64 {
        self.inodes().ino_of(node)
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let parent = self.node(parent)?;
        if let Node::InImage(view, dir, _) = &parent {
            // Files in images may have any name, UTF-8 or not.
            let child = self.image_child(view, *dir, name.as_bytes()).await?;
            return self.attr(&child).await;
        }
        // Names that are not UTF-8 can name nothing in a registry.
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let child = self.child(&parent, name).await?;
        self.attr(&child).await
    }

    /// The node called `name` in directory `dir` of an image view.
    async fn image_child(&self, view: &Arc<View>, dir: u32, name: &[u8]) -> Result<Node, Errno> {
        let tree = self.view_tree(view).await?;
        let (id, kind) = tree.child(dir, name).ok_or(Errno::ENOENT)?;
        Ok(Node::InImage(view.clone(), id, kind))
    }

    async fn view_tree(&self, view: &View) -> Result<Arc<ImageTree>, Errno> {
        // Boxed: building a tree (layer indexes, passes, the disk cache) is a deep future,
        // and without the box every operation that may reach a view carries its layout
        // (rustc's layout query overflowed its depth limit in crates awaiting `Fs`).
        Box::pin(self.images.tree(view)).await.map_err(|e| {
            let root = Node::InImage(Arc::new(view.clone()), VIEW_ROOT, Kind::Dir);
            fail(&root, e)
        })
    }

    /// The root of an image view.
    fn view_root(repo: &RepoName, root: ViewRoot) -> Node {
        let view = View {
            repo: repo.clone(),
            root,
        };
        Node::InImage(Arc::new(view), VIEW_ROOT, Kind::Dir)
    }

    /// The node called `name` inside `parent`, if it exists.
    async fn child(&self, parent: &Node, name: &str) -> Result<Node, Errno> {
        let node = match parent {
            Node::Dir(path) if path.is_empty() && name == CONTROL => Node::Control,
            Node::Control if name == STATS => Node::Stats,
            Node::Control => return Err(Errno::ENOENT),
            Node::Dir(path) => return self.dir_child(path, name).await,
            Node::Tags(repo) => {
                let tag = Tag::parse(name).ok_or(Errno::ENOENT)?;
                if self.writes.has_tag_dir(repo, &tag) {
                    return Ok(Node::TagDir(repo.clone(), tag));
                }
                let listed = self
                    .view
                    .tags(repo)
                    .await
                    .is_ok_and(|tags| tags.contains(&tag));
                if !listed {
                    // Maybe pushed since the list was fetched: ask for it directly.
                    let path = Node::TagDir(repo.clone(), tag.clone());
                    self.view
                        .tag_manifest(repo, &tag)
                        .await
                        .map_err(|e| fail(&path, e))?;
                }
                Node::TagDir(repo.clone(), tag)
            }
            Node::TagDir(repo, tag) if name == MANIFEST_JSON => {
                Node::TagManifest(repo.clone(), tag.clone())
            }
            Node::TagDir(repo, tag) if name == ROOTFS && !self.writes.has_tag_dir(repo, tag) => {
                let view = self
                    .images
                    .tag_view(repo, tag)
                    .await
                    .map_err(|e| fail(parent, e))?;
                Node::InImage(view, VIEW_ROOT, Kind::Dir)
            }
            Node::ImagesDir(repo) => {
                let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
                let node = Node::ImageDir(repo.clone(), digest.clone());
                self.view
                    .manifest(repo, &digest)
                    .await
                    .map_err(|e| fail(&node, e))?;
                node
            }
            Node::ImageDir(repo, digest) if name == ROOTFS => {
                Self::view_root(repo, ViewRoot::Image(digest.clone()))
            }
            Node::LayersDir(repo) => {
                let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
                Self::view_root(repo, ViewRoot::Layer(digest))
            }
            Node::InImage(view, dir, _) => {
                return self.image_child(view, *dir, name.as_bytes()).await;
            }
            Node::Oci(repo, path) => return oci_layout::child(&self.view, repo, path, name).await,
            Node::Referrers(repo, path) => {
                return referrers::child(&self.view, repo, path, name).await;
            }
            Node::ImageDir(..) => return Err(Errno::ENOENT),
            Node::Uploads(repo) => {
                let written = Node::Upload(repo.clone(), name.to_owned());
                if self.writes.file(&written).is_some() {
                    written
                } else if self.writes.link(repo, name).is_some() {
                    Node::UploadLink(repo.clone(), name.to_owned())
                } else {
                    return self.scratch(parent, name);
                }
            }
            Node::Manifests(_) | Node::Blobs(_) | Node::TagDir(..) => {
                match final_node(parent, name) {
                    Some(node) => node,
                    None => return self.scratch(parent, name),
                }
            }
            Node::TagManifest(..)
            | Node::Manifest(..)
            | Node::Blob(..)
            | Node::Upload(..)
            | Node::UploadLink(..)
            | Node::Scratch(..)
            | Node::Stats => {
                return Err(Errno::ENOTDIR);
            }
        };
        Ok(node)
    }

    /// A temp file being written in `dir`, if there is one called `name`.
    fn scratch(&self, dir: &Node, name: &str) -> Result<Node, Errno> {
        let node = Node::Scratch(Box::new(dir.clone()), name.to_owned());
        match self.writes.file(&node) {
            Some(_) => Ok(node),
            None => Err(Errno::ENOENT),
        }
    }

    async fn dir_child(&self, path: &str, name: &str) -> Result<Node, Errno> {
        if matches!(
            name,
            TAGS | MANIFESTS | BLOBS | UPLOADS | IMAGES | LAYERS | OCI | REFERRERS
        ) {
            if let Some(repo) = self.repo_at(path).await? {
                return Ok(match name {
                    TAGS => Node::Tags(repo),
                    MANIFESTS => Node::Manifests(repo),
                    BLOBS => Node::Blobs(repo),
                    IMAGES => Node::ImagesDir(repo),
                    LAYERS => Node::LayersDir(repo),
                    OCI => Node::Oci(repo, OciPath::Root),
                    REFERRERS => Node::Referrers(repo, RefPath::Root),
                    _ => Node::Uploads(repo),
                });
            }
        }
        if !is_path_component(name) {
            return Err(Errno::ENOENT);
        }
        let full = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}/{name}")
        };
        let repo = RepoName::parse(&full).ok_or(Errno::ENOENT)?;
        if self.writes.has_dir(&full) {
            return Ok(Node::Dir(full));
        }
        let known = self.view.known_repos().await.map_err(|e| fail(&"/", e))?;
        if known.contains(&repo) || known.any_below(&full) {
            return Ok(Node::Dir(full));
        }
        // Not in our list: the catalog may be older than the repository, so ask.
        let exists = self
            .view
            .probe_repo(&repo)
            .await
            .map_err(|e| fail(&Node::Dir(full.clone()), e))?;
        if exists || !known.complete() {
            // Without a catalog, any valid name may be a namespace of repositories we
            // cannot list (`library` of `library/alpine`), so it is a directory.
            Ok(Node::Dir(full))
        } else {
            Err(Errno::ENOENT)
        }
    }

    /// The repository at `path`, if there is one there (a path can be a namespace only).
    async fn repo_at(&self, path: &str) -> Result<Option<RepoName>, Errno> {
        let Some(repo) = RepoName::parse(path) else {
            return Ok(None);
        };
        if self.writes.has_dir(path) && self.writes.dirs_below(path).is_empty() {
            // Made with mkdir: a repository to be, until its first push. One with
            // directories made below it is their namespace (`mkdir -p team/app`).
            return Ok(Some(repo));
        }
        let known = self.view.known_repos().await.map_err(|e| fail(&"/", e))?;
        if known.contains(&repo) {
            return Ok(Some(repo));
        }
        let exists = self
            .view
            .probe_repo(&repo)
            .await
            .map_err(|e| fail(&Node::Dir(path.to_owned()), e))?;
        Ok(exists.then_some(repo))
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        self.attr(&node).await
    }

    async fn attr(&self, node: &Node) -> Result<Attr, Errno> {
        let ino = self.ino(node);
        if let Some(object) = oci_layout::object(node) {
            // A layout file is a registry object under another name.
            let attr = Box::pin(self.attr(&object)).await?;
            return Ok(Attr { ino, ..attr });
        }
        if let Some(file) = self.writes.file(node) {
            // Being written: it changes with every write, so the kernel may not keep it.
            let (size, created) = (file.written(), file.created());
            return Ok(Attr::plain(
                ino,
                Kind::File,
                size,
                created,
                0o644,
                Duration::ZERO,
            ));
        }
        let dir = Attr::plain(ino, Kind::Dir, 0, node::epoch(), 0o755, self.tag_ttl);
        let file = |size, digest: &Digest, ttl| {
            Attr::plain(
                ino,
                Kind::File,
                size,
                node::content_mtime(digest),
                0o444,
                ttl,
            )
        };
        let attr = match node {
            Node::TagManifest(repo, tag) => {
                let m = self
                    .view
                    .tag_manifest(repo, tag)
                    .await
                    .map_err(|e| fail(node, e))?;
                file(m.bytes.len() as u64, &m.digest, self.tag_ttl)
            }
            Node::Manifest(repo, digest) => {
                if let Some(held) = self.writes.held_manifest(repo, digest) {
                    return Ok(file(held.len() as u64, digest, Duration::ZERO));
                }
                let size = self
                    .view
                    .manifest_size(repo, digest)
                    .await
                    .map_err(|e| fail(node, e))?;
                file(size, digest, IMMUTABLE_TTL)
            }
            Node::UploadLink(repo, name) => {
                let digest = self.writes.link(repo, name).ok_or(Errno::ENOENT)?;
                let size = link_target(&digest).len() as u64;
                let mtime = node::content_mtime(&digest);
                Attr::plain(ino, Kind::Symlink, size, mtime, 0o777, self.tag_ttl)
            }
            // Not being written (checked above): gone, or never there.
            Node::Upload(..) | Node::Scratch(..) => return Err(Errno::ENOENT),
            Node::Blob(repo, digest) => {
                let size = self
                    .view
                    .blob_size(repo, digest)
                    .await
                    .map_err(|e| fail(node, e))?;
                file(size, digest, IMMUTABLE_TTL)
            }
            Node::Stats => {
                let size = self.stats_json().len() as u64;
                Attr::plain(
                    ino,
                    Kind::File,
                    size,
                    SystemTime::now(),
                    0o444,
                    Duration::ZERO,
                )
            }
            Node::InImage(view, id, _) => {
                let tree = self.view_tree(view).await?;
                let a = tree.attr(*id).map_err(|e| fail(node, e))?;
                // Content-addressed like blobs; only which view `tags/<tag>/rootfs` is
                // moves with the tag.
                let ttl = match (&view.root, *id) {
                    (ViewRoot::Tag(..), VIEW_ROOT) => self.tag_ttl,
                    _ => IMMUTABLE_TTL,
                };
                Attr {
                    ino,
                    kind: a.kind,
                    size: a.size,
                    mtime: a.mtime,
                    perm: a.perm,
                    ttl,
                    owner: Some((a.uid, a.gid)),
                    nlink: a.nlink,
                    rdev: a.rdev,
                }
            }
            Node::Oci(repo, path) => {
                return oci_layout::attr(&self.view, repo, path, ino, self.tag_ttl).await;
            }
            Node::Referrers(repo, path) => {
                return referrers::attr(&self.view, repo, path, ino, self.tag_ttl).await;
            }
            _ => dir,
        };
        Ok(attr)
    }

    /// Lists a directory once, at open; later reads of the handle page through that list.
    pub async fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let node = self.node(ino)?;
        if node.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let (parent, children) = match &node {
            Node::InImage(view, id, _) => self.view_listing(view, *id).await?,
            _ => {
                let mut children = self.children(&node).await?;
                children.sort_by(|a, b| a.0.cmp(&b.0));
                children.dedup_by(|a, b| a.0 == b.0);
                let children = children
                    .into_iter()
                    .map(|(name, child)| (name.into_bytes().into_boxed_slice(), child))
                    .collect();
                (node.parent(), children)
            }
        };
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b"."[..].into(),
            },
            DirEntry {
                ino: self.ino(&parent),
                kind: Kind::Dir,
                name: b".."[..].into(),
            },
        ];
        entries.extend(children.into_iter().map(|(name, child)| DirEntry {
            ino: self.ino(&child),
            kind: child.kind(),
            name,
        }));
        Ok(self.dirs.insert(Arc::new(entries)))
    }

    /// The parent and children of a directory of an image view (names as the layer has
    /// them, UTF-8 or not, sorted).
    async fn view_listing(
        &self,
        view: &Arc<View>,
        id: u32,
    ) -> Result<(Node, Vec<(Box<[u8]>, Node)>), Errno> {
        let tree = self.view_tree(view).await?;
        let node = Node::InImage(view.clone(), id, Kind::Dir);
        let (parent, children) = tree.list(id).map_err(|e| fail(&node, e))?;
        let parent = if id == VIEW_ROOT {
            view.holder()
        } else {
            Node::InImage(view.clone(), parent, Kind::Dir)
        };
        let children = children
            .into_iter()
            .map(|(name, child, kind)| (name, Node::InImage(view.clone(), child, kind)))
            .collect();
        Ok((parent, children))
    }

    /// The entries of a directory handle from position `offset` on.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>, Errno> {
        let entries = self.dirs.get(fh).ok_or(Errno::EBADF)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(entries.len());
        Ok(entries[start..].to_vec())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    async fn children(&self, node: &Node) -> Result<Vec<(String, Node)>, Errno> {
        let out = match node {
            Node::Dir(path) => {
                let known = self.view.known_repos().await.map_err(|e| fail(node, e))?;
                let prefix = if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}/")
                };
                let mut out: Vec<(String, Node)> = known
                    .starting_with(&prefix)
                    .filter_map(|r| r.as_str().strip_prefix(&prefix))
                    .filter(|rest| !rest.is_empty())
                    .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
                    .filter(|name| !matches!(name.as_str(), TAGS | MANIFESTS | BLOBS | UPLOADS))
                    .map(|name| {
                        let full = format!("{prefix}{name}");
                        (name, Node::Dir(full))
                    })
                    .collect();
                self.warm_repos(
                    out.iter()
                        .filter_map(|(_, child)| match child {
                            Node::Dir(full) => RepoName::parse(full),
                            _ => None,
                        })
                        .filter(|repo| known.contains(repo))
                        .take(REPO_WARMING_MAX)
                        .collect(),
                );
                out.extend(self.writes.dirs_below(path).into_iter().map(|name| {
                    let full = format!("{prefix}{name}");
                    (name, Node::Dir(full))
                }));
                // `/.regfs` is not listed: `rsync -a` and `grep -r` of the whole mount
                // must not pick up regfs's own counters. It opens by name.
                if let Some(repo) = self.repo_at(path).await? {
                    out.extend([
                        (TAGS.to_owned(), Node::Tags(repo.clone())),
                        (MANIFESTS.to_owned(), Node::Manifests(repo.clone())),
                        (BLOBS.to_owned(), Node::Blobs(repo.clone())),
                        (UPLOADS.to_owned(), Node::Uploads(repo)),
                    ]);
                }
                out
            }
            Node::Tags(repo) => {
                let tags = match self.view.tags(repo).await {
                    Ok(tags) => tags,
                    // A repository whose tags were all deleted answers 404 here.
                    Err(Error::NotFound(_)) => Arc::new(Vec::new()),
                    Err(e) => return Err(fail(node, e)),
                };
                self.warm_tag_manifests(repo, &tags);
                tags.iter()
                    .chain(self.writes.tag_dirs_in(repo).iter())
                    .map(|t| (t.to_string(), Node::TagDir(repo.clone(), t.clone())))
                    .collect()
            }
            Node::TagDir(repo, tag) => {
                let mut out = self.writes.files_in(node);
                // A tag directory made with mkdir has no manifest until one is pushed.
                if !self.writes.has_tag_dir(repo, tag) {
                    out.push((
                        MANIFEST_JSON.to_owned(),
                        Node::TagManifest(repo.clone(), tag.clone()),
                    ));
                }
                out
            }
            Node::Manifests(repo) => {
                let reach = self.view.reachable(repo).await.map_err(|e| fail(node, e))?;
                let mut out: Vec<(String, Node)> = reach
                    .manifests
                    .keys()
                    .map(|d| (d.to_string(), Node::Manifest(repo.clone(), d.clone())))
                    .collect();
                out.extend(self.writes.files_in(node));
                out
            }
            Node::Blobs(repo) => {
                let reach = self.view.reachable(repo).await.map_err(|e| fail(node, e))?;
                let mut out: Vec<(String, Node)> = reach
                    .blobs
                    .keys()
                    .cloned()
                    .chain(self.writes.linked_blobs(repo))
                    .map(|d| (d.to_string(), Node::Blob(repo.clone(), d)))
                    .collect();
                out.extend(self.writes.files_in(node));
                out
            }
            Node::Uploads(repo) => {
                let mut out = self.writes.files_in(node);
                out.extend(self.writes.links_in(repo).into_iter().map(|name| {
                    let link = Node::UploadLink(repo.clone(), name.clone());
                    (name, link)
                }));
                out
            }
            Node::Control => vec![(STATS.to_owned(), Node::Stats)],
            // Views open by digest and list nothing: listing them would index every
            // layer a `ls --color` stats.
            Node::ImagesDir(_) | Node::LayersDir(_) => Vec::new(),
            Node::ImageDir(repo, digest) => vec![(
                ROOTFS.to_owned(),
                Self::view_root(repo, ViewRoot::Image(digest.clone())),
            )],
            Node::Oci(repo, path) => oci_layout::children(&self.view, repo, path).await?,
            Node::Referrers(repo, path) => referrers::children(&self.view, repo, path).await?,
            Node::TagManifest(..)
            | Node::Manifest(..)
            | Node::Blob(..)
            | Node::Upload(..)
            | Node::UploadLink(..)
            | Node::Scratch(..)
            | Node::Stats
            | Node::InImage(..) => {
                return Err(Errno::ENOTDIR);
            }
        };
        Ok(out)
    }

    /// Fetches the manifests of `tags` in the background, a few at a time: whoever
    /// lists `tags/` usually reads the manifests next (`grep -r`), and then finds them
    /// in the memo instead of paying one round trip per file.
    fn warm_tag_manifests(&self, repo: &RepoName, tags: &Arc<Vec<Tag>>) {
        let (view, repo, tags) = (self.view.clone(), repo.clone(), tags.clone());
        tokio::spawn(
            async move { warm_manifests(&view, &repo, &tags, TAG_MANIFEST_WARMING_MAX).await },
        );
    }

    /// Fetches the tag lists of `repos` in the background, then their first tag
    /// manifests (see [`REPO_WARMING`]).
    fn warm_repos(&self, repos: Vec<RepoName>) {
        if repos.is_empty() {
            return;
        }
        let view = self.view.clone();
        tokio::spawn(async move {
            stream::iter(repos)
                .for_each_concurrent(REPO_WARMING, |repo| {
                    let view = &view;
                    async move {
                        match view.tags(&repo).await {
                            Ok(tags) => {
                                warm_manifests(view, &repo, &tags, REPO_TAG_WARMING_MAX).await
                            }
                            Err(e) => debug!(%repo, "warming the tag list failed: {e}"),
                        }
                    }
                })
                .await;
        });
    }

    /// `pid`: the process opening (as FUSE names it), for files opened for writing.
    pub async fn open(&self, ino: u64, write: bool, pid: u32) -> Result<Opened, Errno> {
        let node = self.node(ino)?;
        if node.kind() == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        if write {
            if self.read_only || in_view(&node) {
                return Err(Errno::EROFS);
            }
            // Opening a file for writing starts it over: uploads are written whole.
            let file = self.writes.create(node, pid)?;
            return Ok(Opened {
                fh: self.files.insert(OpenFile::Write(file)),
                keep_cache: false,
                direct_io: true,
                local_file: None,
            });
        }
        if self.writes.file(&node).is_some() {
            // Its bytes are on their way to the registry, not kept here to be read.
            debug!(path = %node, "a file being written cannot be read until it is committed");
            return Err(Errno::EINVAL);
        }
        let node = oci_layout::object(&node).unwrap_or(node);
        let mut direct_io = false;
        let mut local_file = None;
        let (file, keep_cache) = match &node {
            Node::TagManifest(repo, tag) => {
                let m = self
                    .view
                    .tag_manifest(repo, tag)
                    .await
                    .map_err(|e| fail(&node, e))?;
                // A tag can move, so the kernel must not serve pages cached from an older open.
                (OpenFile::Bytes(m.bytes.clone()), false)
            }
            Node::Manifest(repo, digest) => match self.writes.held_manifest(repo, digest) {
                Some(held) => (OpenFile::Bytes(held), false),
                None => {
                    let m = self
                        .view
                        .manifest(repo, digest)
                        .await
                        .map_err(|e| fail(&node, e))?;
                    (OpenFile::Bytes(m.bytes.clone()), true)
                }
            },
            Node::Blob(repo, digest) => {
                let size = self
                    .view
                    .blob_size(repo, digest)
                    .await
                    .map_err(|e| fail(&node, e))?;
                let blob = self.blobs.open(repo.clone(), digest.clone(), size);
                let keep = self.blobs.may_keep_pages(digest);
                local_file = self.blobs.local_file(digest, size);
                (OpenFile::Blob(Arc::new(blob)), keep)
            }
            Node::Stats => {
                direct_io = true;
                (OpenFile::Bytes(self.stats_json()), false)
            }
            Node::InImage(view, id, Kind::File) => {
                let tree = self.view_tree(view).await?;
                (OpenFile::Image(tree, *id), true)
            }
            Node::InImage(..) => return Err(Errno::EINVAL),
            Node::Oci(repo, path) => {
                let bytes = oci_layout::file_bytes(&self.view, repo, path).await?;
                (OpenFile::Bytes(bytes), *path == OciPath::Layout)
            }
            Node::Referrers(repo, RefPath::Index(subject)) => {
                let bytes = referrers::index_json(&self.view, repo, subject).await?;
                (OpenFile::Bytes(bytes), false)
            }
            _ => return Err(Errno::EISDIR),
        };
        Ok(Opened {
            fh: self.files.insert(file),
            keep_cache,
            direct_io,
            local_file,
        })
    }

    /// Reads up to `size` bytes at `offset`; short only at the end of the file.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, Errno> {
        match self.files.get(fh).ok_or(Errno::EBADF)? {
            OpenFile::Bytes(bytes) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                Ok(bytes.slice(start..end))
            }
            OpenFile::Blob(blob) => self
                .blobs
                .read(&blob, offset, u64::from(size))
                .await
                .map_err(|e| {
                    // The path is only built for the log line of a failed read.
                    let node = Node::Blob(blob.repo().clone(), blob.digest().clone());
                    fail(&node, e)
                }),
            OpenFile::Write(_) => Err(Errno::EINVAL),
            OpenFile::Image(tree, id) => {
                tree.read(id, offset, u64::from(size)).await.map_err(|e| {
                    warn!(
                        offset,
                        size, "read of an image file (node {id}) failed: {e}"
                    );
                    Errno(e.errno())
                })
            }
        }
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(fh);
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match self.node(ino)? {
            Node::UploadLink(repo, name) => self
                .writes
                .link(&repo, &name)
                .map(|d| link_target(&d).into_bytes())
                .ok_or(Errno::ENOENT),
            Node::Referrers(_, RefPath::Link(_, digest)) => {
                Ok(referrers::link_target(&digest).into_bytes())
            }
            Node::InImage(view, id, kind) => {
                let tree = self.view_tree(&view).await?;
                tree.readlink(id)
                    .map(Vec::from)
                    .map_err(|e| fail(&Node::InImage(view, id, kind), e))
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// The extended attributes of a node: those an image file has; none elsewhere.
    async fn xattrs(&self, ino: u64) -> Result<crate::image::entry::Xattrs, Errno> {
        match self.node(ino)? {
            Node::InImage(view, id, kind) => {
                let tree = self.view_tree(&view).await?;
                tree.xattrs(id)
                    .map_err(|e| fail(&Node::InImage(view, id, kind), e))
            }
            _ => Ok(Vec::new()),
        }
    }

    /// getxattr: the value of `name`, or ENODATA.
    pub async fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let all = self.xattrs(ino).await?;
        all.into_iter()
            .find(|(n, _)| &**n == name.as_bytes())
            .map(|(_, v)| v.into_vec())
            .ok_or(Errno::ENODATA)
    }

    /// listxattr: the names, each followed by a NUL.
    pub async fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        for (name, _) in self.xattrs(ino).await? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// How long a program may wait for an operation that asks the registry (see
    /// deadline.rs): `--timeout`, plus a little.
    pub fn deadline(&self) -> Duration {
        self.view.client().options().total_timeout + deadline::SLACK
    }

    /// The backstop for an operation on inode `ino`. In image views the first look
    /// can be an index pass, a long stream that is not waiting on the registry (its
    /// requests keep their own `--timeout` and trickle floor, so a stalled registry
    /// still fails it): that may take as long as the layers take to read.
    pub fn deadline_at(&self, ino: u64) -> Duration {
        match self.node(ino) {
            Ok(node) if in_image(&node) || matches!(node, Node::TagDir(..)) => VIEW_DEADLINE,
            _ => self.deadline(),
        }
    }
}

/// Whether a node is part of a view (read-only, whatever the mount).
fn in_view(node: &Node) -> bool {
    in_image(node) || matches!(node, Node::Oci(..) | Node::Referrers(..))
}

/// Whether a node is part of an image view (DESIGN §7), where a first look may index
/// layers.
fn in_image(node: &Node) -> bool {
    matches!(
        node,
        Node::InImage(..) | Node::ImagesDir(_) | Node::ImageDir(..) | Node::LayersDir(_)
    )
}

/// Where `uploads/<name>` points once committed.
fn link_target(digest: &Digest) -> String {
    format!("../{BLOBS}/{digest}")
}

/// The manifests of the first `most` of `tags`, a few at a time, into the view's memo.
async fn warm_manifests(view: &RegistryView, repo: &RepoName, tags: &[Tag], most: usize) {
    stream::iter(tags.iter().take(most))
        .for_each_concurrent(TAG_MANIFEST_WARMING, |tag| async move {
            if let Err(e) = view.tag_manifest(repo, tag).await {
                debug!(%repo, %tag, "warming the manifest failed: {e}");
            }
        })
        .await;
}
