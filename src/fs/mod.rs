//! Filesystem semantics in plain Rust (docs/SEMANTICS.md, "The tree"): every operation
//! returns `Result<_, Errno>`; nothing here knows of FUSE, so it can be driven by tests
//! or another front end.
//!
//! `Fs` composes the parts and hands each request to the one it concerns: the tree
//! (tree/: what a path is, and each area's children, attributes and opens), what the
//! registry holds (view/), the blob read path (blob/), the files of images (images/)
//! and the write side (write/, whose calls.rs holds `Fs`'s write calls).

mod attr;
mod blob;
pub mod deadline;
mod errno;
mod handles;
mod images;
mod read_failures;
mod tree;
mod view;
mod write;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use crate::cache::{BlockCache, DiskCache};
use crate::image::manifest::Platform;
use crate::registry::{RegistryClient, RepoName};
use blob::{BlobReads, BlockFetcher};
use handles::Handles;
use images::Images;
pub use images::IndexOptions;
use read_failures::ReadFailures;
use tree::node::StorePath;
use tree::{
    ControlFiles, ImageDirs, InodeTable, LayerStore, Node, OpenFile, Opening, RegistryDirs,
    RegistryDomain, layer_store, oci_layout, referrers,
};
use view::RegistryView;
use write::{Deletes, HeldIndexes, Overlay, WrittenFiles};

pub use attr::{Attr, DirEntry, Kind};
pub use errno::Errno;
pub use tree::{Opened, ROOT_INO};

/// How long an operation in the files of an image may wait for layers to be indexed.
const IMAGE_DEADLINE: Duration = Duration::from_secs(3600);

pub struct Fs {
    view: Arc<RegistryView>,
    blobs: Arc<BlobReads>,
    /// The areas of the tree.
    registry: RegistryDirs,
    images: ImageDirs,
    control: ControlFiles,
    store: LayerStore,
    /// The write side.
    written: Arc<WrittenFiles>,
    overlay: Arc<Overlay>,
    held: Arc<HeldIndexes>,
    deletes: Deletes,
    read_only: bool,
    /// `--allow-delete`: `rm` deletes from the registry (else EPERM).
    allow_delete: bool,
    tag_ttl: Duration,
    inodes: Mutex<InodeTable>,
    open_dirs: Handles<Arc<Vec<DirEntry>>>,
    open_files: Handles<OpenFile>,
    /// Open image files whose last read found the registry silent.
    read_failures: ReadFailures,
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
    /// TOC layers are fetched whole in the background once their files are opened
    /// (`--no-background-fetch` turns it off).
    pub background_fetch: bool,
    /// Shared (SOCI) indexes: used, and published (docs/SEMANTICS.md, "Shared indexes").
    pub indexes: IndexOptions,
}

impl Fs {
    pub fn new(
        client: RegistryClient,
        cache: Arc<BlockCache>,
        disk: Option<DiskCache>,
        options: FsOptions,
    ) -> Fs {
        let tag_ttl = options.tag_ttl;
        let view = Arc::new(RegistryView::new(
            client.clone(),
            options.repos,
            tag_ttl,
            disk.clone(),
        ));
        let fetcher = BlockFetcher::new(client.clone(), cache.clone(), disk.clone());
        let images = Arc::new(Images::new(
            view.clone(),
            fetcher,
            options.platform,
            options.indexes,
            options.background_fetch,
        ));
        let blobs = Arc::new(BlobReads::new(cache.clone(), client.clone(), disk.clone()));
        // Writes and deletes, and the reads that decide them, must see the origin.
        let origin = client.origin_only();
        let overlay = Arc::new(Overlay::default());
        let held = Arc::new(HeldIndexes::new(
            origin.clone(),
            view.clone(),
            overlay.clone(),
            disk,
        ));
        let written = Arc::new(WrittenFiles::new(
            origin.clone(),
            view.clone(),
            overlay.clone(),
            held.clone(),
        ));
        Fs {
            registry: RegistryDirs {
                view: view.clone(),
                written: written.clone(),
                overlay: overlay.clone(),
                held: held.clone(),
                images: images.clone(),
                blobs: blobs.clone(),
                tag_ttl,
            },
            store: LayerStore::new(
                images.clone(),
                client.stats().clone(),
                RegistryDomain::of(client.base()),
                tag_ttl,
            ),
            images: ImageDirs::new(images, view.clone(), tag_ttl),
            control: ControlFiles::new(client.stats().clone(), cache),
            deletes: Deletes::new(origin, view.clone()),
            written,
            overlay,
            held,
            blobs,
            view,
            read_only: options.read_only,
            allow_delete: options.allow_delete,
            tag_ttl,
            inodes: Mutex::new(InodeTable::default()),
            open_dirs: Handles::new(),
            open_files: Handles::new(),
            read_failures: ReadFailures::default(),
        }
    }

    /// The disk cache, for content-addressed metadata (`get_meta` / `put_meta`).
    pub fn disk_cache(&self) -> Option<&DiskCache> {
        self.blobs.disk()
    }

    /// What the first reads of a fresh mount need, asked while it mounts: the catalog,
    /// which every lookup at the root consults, and a connection for blob reads (their
    /// client keeps connections of its own). A failure is the first lookup's to report.
    pub async fn warm_up(&self) {
        let view = &self.registry.view;
        let _ = tokio::join!(view.known_repos(), view.client().warm_blob_client());
    }

    /// Pushes the indexes an earlier mount of this registry held (see `HeldIndexes`).
    pub async fn resume_held(&self) {
        self.held.resume().await;
    }

    /// An open was answered with FUSE passthrough (counted in `/.regfs/stats`).
    pub fn passthrough_opened(&self) {
        crate::stats::Stats::add(&self.view.client().stats().passthrough_opens, 1);
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

    // ---- the areas of the tree, each asked about its own nodes ---------------------------

    /// The node called `name` inside `parent`, if it exists.
    async fn child(&self, parent: &Node, name: &str) -> Result<Node, Errno> {
        match parent {
            Node::Control(path) => self.control.child(*path, name),
            Node::Image(path) => self.images.child(path, name.as_bytes()).await,
            Node::Oci(repo, path) => oci_layout::child(&self.view, repo, path, name).await,
            Node::Referrers(repo, path) => referrers::child(&self.view, repo, path, name).await,
            Node::Store(path) => self.store.child(path, name).await,
            _ => self.registry.child(parent, name).await,
        }
    }

    async fn attr(&self, node: &Node) -> Result<Attr, Errno> {
        let ino = self.ino(node);
        let ttl = self.tag_ttl;
        match node {
            Node::Control(path) => Ok(self.control.attr(*path, ino, ttl)),
            Node::Image(path) => self.images.attr(path, ino).await,
            Node::Oci(repo, path) => match oci_layout::object(node) {
                // A layout file is a registry object under another name.
                Some(object) => Ok(Attr {
                    ino,
                    ..Box::pin(self.attr(&object)).await?
                }),
                None => oci_layout::attr(&self.view, repo, path, ino, ttl).await,
            },
            Node::Referrers(repo, path) => referrers::attr(&self.view, repo, path, ino, ttl).await,
            Node::Store(path) => match layer_store::object(path) {
                // `blob` is the registry's object under another name.
                Some(object) => Ok(Attr {
                    ino,
                    ..Box::pin(self.attr(&object)).await?
                }),
                None => self.store.attr(path, ino).await,
            },
            _ => self.registry.attr(node, ino).await,
        }
    }

    /// The entries of a directory outside images (unsorted; names may repeat).
    async fn children(&self, node: &Node) -> Result<Vec<(String, Node)>, Errno> {
        match node {
            Node::Control(path) => self.control.children(*path),
            Node::Oci(repo, path) => oci_layout::children(&self.view, repo, path).await,
            Node::Referrers(repo, path) => referrers::children(&self.view, repo, path).await,
            Node::Store(path) => self.store.children(path),
            _ => self.registry.children(node).await,
        }
    }

    /// Opens a file for reading.
    async fn open_node(&self, node: &Node) -> Result<Opening, Errno> {
        match node {
            Node::Control(path) => self.control.open(*path),
            Node::Image(path) => self.images.open(path).await,
            Node::Oci(repo, path) => match oci_layout::object(node) {
                Some(object) => self.registry.open_object(&object).await,
                None => oci_layout::open(&self.view, repo, path).await,
            },
            Node::Referrers(repo, path) => referrers::open(&self.view, repo, path).await,
            Node::Store(path) => match layer_store::object(path) {
                Some(object) => self.registry.open_object(&object).await,
                None => self.store.open(path).await,
            },
            _ => self.registry.open(node).await,
        }
    }

    // ---- the calls of the front end (the write calls are in write/calls.rs) ---------------

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let parent = self.node(parent)?;
        let child = match &parent {
            // Files in images may have any name, UTF-8 or not.
            Node::Image(path) => self.images.child(path, name.as_bytes()).await?,
            // Names that are not UTF-8 can name nothing in a registry.
            _ => {
                let name = name.to_str().ok_or(Errno::ENOENT)?;
                self.child(&parent, name).await?
            }
        };
        self.attr(&child).await
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        self.attr(&node).await
    }

    /// Lists a directory once, at open; later reads of the handle page through that list.
    pub async fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let node = self.node(ino)?;
        if node.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let (parent, children) = match &node {
            Node::Image(path) => self.images.list(path).await?,
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
        entries.extend(
            children
                .into_iter()
                .map(|(name, child): (Box<[u8]>, Node)| DirEntry {
                    ino: self.ino(&child),
                    kind: child.kind(),
                    name,
                }),
        );
        Ok(self.open_dirs.insert(Arc::new(entries)))
    }

    /// The entries of a directory handle from position `offset` on.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>, Errno> {
        let entries = self.open_dirs.get(fh).ok_or(Errno::EBADF)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(entries.len());
        Ok(entries[start..].to_vec())
    }

    pub fn releasedir(&self, fh: u64) {
        self.open_dirs.remove(fh);
    }

    /// `pid`: the process opening (as FUSE names it), for files opened for writing.
    pub async fn open(&self, ino: u64, write: bool, pid: u32) -> Result<Opened, Errno> {
        let node = self.node(ino)?;
        if node.kind() == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        if write {
            return self.open_to_write(node, pid);
        }
        let opening = self.open_node(&node).await?;
        Ok(Opened {
            fh: self.open_files.insert(opening.file),
            keep_cache: opening.keep_cache,
            direct_io: opening.direct_io,
            local_file: opening.local_file,
        })
    }

    /// Reads up to `size` bytes at `offset`; short only at the end of the file.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, Errno> {
        match self.open_files.get(fh).ok_or(Errno::EBADF)? {
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
                    errno::fail(&node, e)
                }),
            OpenFile::Write(_) => Err(Errno::EINVAL),
            OpenFile::Image(tree, id, object) => {
                if let Some(errno) = self.read_failures.recent(fh) {
                    return Err(errno);
                }
                let read = tree.read(id, offset, u64::from(size)).await;
                if let Ok(bytes) = &read {
                    self.view
                        .client()
                        .stats()
                        .recent
                        .read(&object, bytes.len() as u64);
                }
                read.map_err(|e| {
                    warn!(
                        offset,
                        size, "read of an image file (node {id}) failed: {e}"
                    );
                    self.read_failures.failed(fh, &e);
                    Errno(e.errno())
                })
            }
        }
    }

    pub fn release(&self, fh: u64) {
        self.open_files.remove(fh);
        self.read_failures.forget(fh);
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match &self.node(ino)? {
            Node::Image(path) => self.images.readlink(path).await,
            Node::Referrers(_, path) => referrers::readlink(path),
            node => self.registry.readlink(node),
        }
    }

    /// The extended attributes of a node: those an image file has; none elsewhere.
    async fn xattrs(&self, ino: u64) -> Result<crate::image::entry::Xattrs, Errno> {
        match self.node(ino)? {
            Node::Image(path) => self.images.xattrs(&path).await,
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

    /// The backstop for an operation on inode `ino`. In the files of images the first
    /// look can be an index pass, a long stream that is not waiting on the registry (its
    /// requests keep their own `--timeout` and trickle floor, so a stalled registry
    /// still fails it): that may take as long as the layers take to read. Looking up
    /// the root of a layer's files (`rootfs` in a tag's directory, a layer store's
    /// `diff`) is such a first look too.
    pub fn deadline_at(&self, ino: u64) -> Duration {
        match self.node(ino) {
            Ok(Node::Image(_) | Node::TagDir(..) | Node::Store(StorePath::Layer(_))) => {
                IMAGE_DEADLINE
            }
            _ => self.deadline(),
        }
    }
}
