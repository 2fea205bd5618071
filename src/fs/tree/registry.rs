//! The registry's own directories (docs/SEMANTICS.md, "The tree"): the root and
//! namespaces, each repository's `tags/`, `manifests/`, `blobs/` and `uploads/`, with
//! what the write side shows in them (files being written, the overlay of made
//! directories and links, held indexes).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::images::root_node;
use super::warming::{REPO_WARMING_MAX, warm_repos, warm_tag_manifests};
use crate::fs::attr::{self, Attr, IMMUTABLE_TTL, Kind};
use crate::fs::blob::BlobReads;
use crate::fs::errno::{Errno, fail};
use crate::fs::images::Images;
use crate::fs::tree::node::{
    BLOBS, CONTROL, ControlPath, IMAGES, ImagePath, LAYER_STORE, LAYERS, MANIFEST_JSON, MANIFESTS,
    Node, OCI, OciPath, REFERRERS, ROOTFS, RefPath, StorePath, TAGS, UPLOADS,
};
use crate::fs::tree::open_file::{OpenFile, Opening};
use crate::fs::view::RegistryView;
use crate::fs::write::{HeldIndexes, Overlay, WrittenFiles, final_node};
use crate::registry::types::is_path_component;
use crate::registry::{Digest, Error, RepoName, Tag};

/// What the registry directories show, and where they get it.
pub struct RegistryDirs {
    pub view: Arc<RegistryView>,
    pub written: Arc<WrittenFiles>,
    pub overlay: Arc<Overlay>,
    pub held: Arc<HeldIndexes>,
    /// For `tags/<tag>/rootfs`.
    pub images: Arc<Images>,
    pub blobs: Arc<BlobReads>,
    /// `--tag-ttl`.
    pub tag_ttl: Duration,
}

/// Where `uploads/<name>` points once committed.
fn link_target(digest: &Digest) -> String {
    format!("../{BLOBS}/{digest}")
}

impl RegistryDirs {
    /// The node called `name` inside `parent`, if it exists. Files (and nodes of the
    /// other areas, which never come here) are not directories.
    pub async fn child(&self, parent: &Node, name: &str) -> Result<Node, Errno> {
        match parent {
            Node::Dir(path) if path.is_empty() && name == CONTROL => {
                Ok(Node::Control(ControlPath::Dir))
            }
            Node::Dir(path) if path.is_empty() && name == LAYER_STORE => {
                Ok(Node::Store(StorePath::Root))
            }
            Node::Dir(path) => self.dir_child(path, name).await,
            Node::Tags(repo) => self.tag_child(repo, name).await,
            Node::TagDir(repo, tag) if name == MANIFEST_JSON => {
                Ok(Node::TagManifest(repo.clone(), tag.clone()))
            }
            Node::TagDir(repo, tag) if name == ROOTFS && !self.overlay.has_tag_dir(repo, tag) => {
                let root = self
                    .images
                    .tag_root(repo, tag)
                    .await
                    .map_err(|e| fail(parent, e))?;
                Ok(root_node(root))
            }
            Node::Uploads(repo) => {
                let written = Node::Upload(repo.clone(), name.to_owned());
                if self.written.file(&written).is_some() {
                    Ok(written)
                } else if self.overlay.link(repo, name).is_some() {
                    Ok(Node::UploadLink(repo.clone(), name.to_owned()))
                } else {
                    self.scratch(parent, name)
                }
            }
            Node::Manifests(_) | Node::Blobs(_) | Node::TagDir(..) => {
                match final_node(parent, name) {
                    Some(node) => Ok(node),
                    None => self.scratch(parent, name),
                }
            }
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// A temp file being written in `dir`, if there is one called `name`.
    fn scratch(&self, dir: &Node, name: &str) -> Result<Node, Errno> {
        let node = Node::Scratch(Box::new(dir.clone()), name.to_owned());
        match self.written.file(&node) {
            Some(_) => Ok(node),
            None => Err(Errno::ENOENT),
        }
    }

    async fn tag_child(&self, repo: &RepoName, name: &str) -> Result<Node, Errno> {
        let tag = Tag::parse(name).ok_or(Errno::ENOENT)?;
        let node = Node::TagDir(repo.clone(), tag.clone());
        if self.overlay.has_tag_dir(repo, &tag) {
            return Ok(node);
        }
        if let Some(tags) = self.view.tags_known(repo) {
            if tags.contains(&tag) {
                return Ok(node);
            }
            // Maybe pushed since the list was fetched: ask for it directly.
            self.view
                .tag_manifest(repo, &tag)
                .await
                .map_err(|e| fail(&node, e))?;
            return Ok(node);
        }
        // The list and the manifest together: the manifest is what a lookup of a tag
        // leads to (manifest.json, rootfs), and a tag missing from the list may have
        // been pushed since.
        let (tags, manifest) =
            tokio::join!(self.view.tags(repo), self.view.tag_manifest(repo, &tag));
        if tags.is_ok_and(|tags| tags.contains(&tag)) {
            return Ok(node);
        }
        manifest.map_err(|e| fail(&node, e))?;
        Ok(node)
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
                    IMAGES => Node::Image(ImagePath::ImagesDir(repo)),
                    LAYERS => Node::Image(ImagePath::LayersDir(repo)),
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
        if self.overlay.has_dir(&full) {
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
            return Ok(Node::Dir(full));
        }
        // Not a repository with tags: maybe a namespace, or a repository of untagged
        // manifests, pushed since the catalog was read.
        let fresh = self
            .view
            .known_repos_after_miss()
            .await
            .map_err(|e| fail(&"/", e))?;
        if fresh.contains(&repo) || fresh.any_below(&full) {
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
        if self.overlay.has_dir(path) && self.overlay.dirs_below(path).is_empty() {
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
        if exists {
            return Ok(Some(repo));
        }
        let fresh = self
            .view
            .known_repos_after_miss()
            .await
            .map_err(|e| fail(&"/", e))?;
        Ok(fresh.contains(&repo).then_some(repo))
    }

    pub async fn attr(&self, node: &Node, ino: u64) -> Result<Attr, Errno> {
        if let Some(file) = self.written.file(node) {
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
        let file = |size, digest: &Digest, ttl| {
            Attr::plain(
                ino,
                Kind::File,
                size,
                attr::content_mtime(digest),
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
                if let Some(held) = self.held.held_manifest(repo, digest) {
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
                let digest = self.overlay.link(repo, name).ok_or(Errno::ENOENT)?;
                let size = link_target(&digest).len() as u64;
                let mtime = attr::content_mtime(&digest);
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
            _ => Attr::dir(ino, self.tag_ttl),
        };
        Ok(attr)
    }

    pub async fn children(&self, node: &Node) -> Result<Vec<(String, Node)>, Errno> {
        let out = match node {
            Node::Dir(path) => self.dir_children(node, path).await?,
            Node::Tags(repo) => {
                let tags = match self.view.tags(repo).await {
                    Ok(tags) => tags,
                    // A repository whose tags were all deleted answers 404 here.
                    Err(Error::NotFound(_)) => Arc::new(Vec::new()),
                    Err(e) => return Err(fail(node, e)),
                };
                warm_tag_manifests(&self.view, repo, &tags);
                tags.iter()
                    .chain(self.overlay.tag_dirs_in(repo).iter())
                    .map(|t| (t.to_string(), Node::TagDir(repo.clone(), t.clone())))
                    .collect()
            }
            Node::TagDir(repo, tag) => {
                let mut out = self.written.files_in(node);
                // A tag directory made with mkdir has no manifest until one is pushed.
                if !self.overlay.has_tag_dir(repo, tag) {
                    out.push((
                        MANIFEST_JSON.to_owned(),
                        Node::TagManifest(repo.clone(), tag.clone()),
                    ));
                }
                out
            }
            Node::Manifests(repo) | Node::Blobs(repo) => self.object_children(node, repo).await?,
            Node::Uploads(repo) => {
                let mut out = self.written.files_in(node);
                out.extend(self.overlay.links_in(repo).into_iter().map(|name| {
                    let link = Node::UploadLink(repo.clone(), name.clone());
                    (name, link)
                }));
                out
            }
            _ => return Err(Errno::ENOTDIR),
        };
        Ok(out)
    }

    /// The entries of the root or a namespace or repository directory.
    async fn dir_children(&self, node: &Node, path: &str) -> Result<Vec<(String, Node)>, Errno> {
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
        let warm = out
            .iter()
            .filter_map(|(_, child)| match child {
                Node::Dir(full) => RepoName::parse(full),
                _ => None,
            })
            .filter(|repo| known.contains(repo))
            .take(REPO_WARMING_MAX)
            .collect();
        warm_repos(&self.view, warm);
        out.extend(self.overlay.dirs_below(path).into_iter().map(|name| {
            let full = format!("{prefix}{name}");
            (name, Node::Dir(full))
        }));
        // `/.regfs` and `/.layerstore` are not listed: `rsync -a` and `grep -r` of the
        // whole mount must not pick up regfs's own counters, nor every image's layers
        // again. They open by name.
        if let Some(repo) = self.repo_at(path).await? {
            out.extend([
                (TAGS.to_owned(), Node::Tags(repo.clone())),
                (MANIFESTS.to_owned(), Node::Manifests(repo.clone())),
                (BLOBS.to_owned(), Node::Blobs(repo.clone())),
                (UPLOADS.to_owned(), Node::Uploads(repo)),
            ]);
        }
        Ok(out)
    }

    /// The entries of `manifests/` or `blobs/`: what the tags reach, and what is being
    /// written there (and, in `blobs/`, what was pushed or linked through this mount).
    async fn object_children(
        &self,
        node: &Node,
        repo: &RepoName,
    ) -> Result<Vec<(String, Node)>, Errno> {
        let reach = self.view.reachable(repo).await.map_err(|e| fail(node, e))?;
        let mut out: Vec<(String, Node)> = if matches!(node, Node::Manifests(_)) {
            reach
                .manifests
                .keys()
                .map(|d| (d.to_string(), Node::Manifest(repo.clone(), d.clone())))
                .collect()
        } else {
            reach
                .blobs
                .keys()
                .cloned()
                .chain(self.overlay.linked_blobs(repo))
                .map(|d| (d.to_string(), Node::Blob(repo.clone(), d)))
                .collect()
        };
        out.extend(self.written.files_in(node));
        Ok(out)
    }

    /// Opens a file read-only; one being written cannot be read until committed.
    pub async fn open(&self, node: &Node) -> Result<Opening, Errno> {
        if self.written.file(node).is_some() {
            // Its bytes are on their way to the registry, not kept here to be read.
            debug!(path = %node, "a file being written cannot be read until it is committed");
            return Err(Errno::EINVAL);
        }
        self.open_object(node).await
    }

    /// Opens a registry object (under its own name, or another: `.oci/blobs/`).
    pub async fn open_object(&self, node: &Node) -> Result<Opening, Errno> {
        match node {
            Node::TagManifest(repo, tag) => {
                let m = self
                    .view
                    .tag_manifest(repo, tag)
                    .await
                    .map_err(|e| fail(node, e))?;
                // A tag can move, so the kernel must not serve pages cached from an older open.
                Ok(Opening::bytes(m.bytes.clone(), false))
            }
            Node::Manifest(repo, digest) => match self.held.held_manifest(repo, digest) {
                Some(held) => Ok(Opening::bytes(held, false)),
                None => {
                    let m = self
                        .view
                        .manifest(repo, digest)
                        .await
                        .map_err(|e| fail(node, e))?;
                    Ok(Opening::bytes(m.bytes.clone(), true))
                }
            },
            Node::Blob(repo, digest) => {
                let size = self
                    .view
                    .blob_size(repo, digest)
                    .await
                    .map_err(|e| fail(node, e))?;
                let blob = self.blobs.open(repo.clone(), digest.clone(), size);
                let keep = self.blobs.may_keep_pages(digest);
                Ok(Opening {
                    local_file: self.blobs.local_file(digest, size),
                    ..Opening::of(OpenFile::Blob(Arc::new(blob)), keep)
                })
            }
            _ => Err(Errno::EISDIR),
        }
    }

    pub fn readlink(&self, node: &Node) -> Result<Vec<u8>, Errno> {
        match node {
            Node::UploadLink(repo, name) => self
                .overlay
                .link(repo, name)
                .map(|d| link_target(&d).into_bytes())
                .ok_or(Errno::ENOENT),
            _ => Err(Errno::EINVAL),
        }
    }
}
