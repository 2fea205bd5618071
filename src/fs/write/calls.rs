//! The write calls of [`Fs`] (docs/SEMANTICS.md, "Writes" and "Deletes"): open for
//! writing, create, write, close, setattr, mkdir, rename, link, symlink, unlink and
//! rmdir, each checked against the mount's mode and the tree (the files of images,
//! `.oci/` and `.referrers/` are read-only), then handed to the files being written
//! (files.rs), the overlay (overlay.rs) or the deleter (deletes.rs). The layer store's
//! create and rmdir are containers/storage's notes of use, answered there.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use tracing::debug;

use super::deletes::Deletion;
use super::files::WrittenFile;
use super::targets::{final_node, writable_node};
use crate::fs::Fs;
use crate::fs::attr::Attr;
use crate::fs::errno::Errno;
use crate::fs::tree::node::{BLOBS, Node};
use crate::fs::tree::{OpenFile, Opened};
use crate::registry::types::is_path_component;
use crate::registry::{Digest, RepoName, Tag};

impl Fs {
    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    /// Like [`Self::writable`], for a change in directory (or of node) `ino`: the files
    /// of images, `.oci/` and `.referrers/` are read-only.
    fn writable_at(&self, ino: u64) -> Result<Node, Errno> {
        self.writable()?;
        let node = self.node(ino)?;
        if node.is_read_only() {
            return Err(Errno::EROFS);
        }
        Ok(node)
    }

    /// An open for writing starts the file over: uploads are written whole.
    pub(in crate::fs) fn open_to_write(&self, node: Node, pid: u32) -> Result<Opened, Errno> {
        if self.read_only || node.is_read_only() {
            return Err(Errno::EROFS);
        }
        let file = self.written.create(node, pid)?;
        Ok(self.opened_for_writing(file))
    }

    fn opened_for_writing(&self, file: Arc<WrittenFile>) -> Opened {
        Opened {
            fh: self.open_files.insert(OpenFile::Write(file)),
            keep_cache: false,
            direct_io: true,
            local_file: None,
        }
    }

    /// Creates `name` in `parent` for writing: a final name (committed on close) or a
    /// temp name in a writable directory (committed when renamed onto a final name).
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        pid: u32,
    ) -> Result<(Attr, Opened), Errno> {
        if let Node::Store(dir) = self.node(parent)? {
            return Err(self.store.create(&dir, &name.to_string_lossy()));
        }
        let dir = self.writable_at(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(Errno::EINVAL);
        }
        let node = writable_node(&dir, name).ok_or_else(|| {
            debug!(%dir, name, "nothing can be written here");
            Errno::EPERM
        })?;
        let file = self.written.create(node.clone(), pid)?;
        let attr = self.attr(&node).await?;
        Ok((attr, self.opened_for_writing(file)))
    }

    /// `owner` is the kernel's lock owner of the writing process (see `flush`).
    pub async fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        owner: Option<u64>,
    ) -> Result<u32, Errno> {
        let OpenFile::Write(file) = self.open_files.get(fh).ok_or(Errno::EBADF)? else {
            return Err(Errno::EBADF);
        };
        self.written.write(&file, offset, data, owner).await?;
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    /// close(2) of a written file: under its final name, this is the commit, and its
    /// result is what close returns. `owner` tells whose close it is: a child process
    /// that inherited the descriptor closes it too (at exec), and that must not commit
    /// a file its parent is still writing.
    pub async fn flush(&self, fh: u64, owner: u64, pid: u32) -> Result<(), Errno> {
        match self.open_files.get(fh) {
            Some(OpenFile::Write(file)) => self.written.flush(&file, owner, pid).await,
            Some(_) => Ok(()),
            None => Err(Errno::EBADF),
        }
    }

    /// chmod, chown, utimes and truncate. Modes, owners and times are accepted and not
    /// kept (`rsync -a` and `cp -p` set them; a registry has nowhere to store them);
    /// a size can only be what the file has (0 for a file just opened for writing).
    pub async fn setattr(&self, ino: u64, size: Option<u64>) -> Result<Attr, Errno> {
        let node = self.writable_at(ino)?;
        let attr = self.attr(&node).await?;
        if let Some(size) = size {
            if size != attr.size {
                debug!(path = %node, size, "truncate refused: registry content is written whole");
                return Err(if self.written.file(&node).is_some() {
                    Errno::EINVAL
                } else {
                    Errno::EPERM
                });
            }
        }
        Ok(attr)
    }

    /// mkdir: a repository (or namespace) directory, or a tag directory, held here until
    /// the first push into it.
    pub async fn mkdir(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let dir = self.writable_at(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if self.child(&dir, name).await.is_ok() {
            return Err(Errno::EEXIST);
        }
        let node = match &dir {
            Node::Dir(path) => {
                let full = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}/{name}")
                };
                if !is_path_component(name) || RepoName::parse(&full).is_none() {
                    debug!(path = full, "mkdir refused: not a valid repository name");
                    return Err(Errno::EINVAL);
                }
                self.overlay.make_dir(&full);
                Node::Dir(full)
            }
            Node::Tags(repo) => {
                let tag = Tag::parse(name).ok_or(Errno::EINVAL)?;
                self.overlay.make_tag_dir(repo, &tag);
                Node::TagDir(repo.clone(), tag)
            }
            _ => return Err(Errno::EPERM),
        };
        self.attr(&node).await
    }

    /// rename of a written file onto its final name: the push happens now, and its
    /// result is what rename returns.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<(), Errno> {
        let (dir, new_dir) = (self.writable_at(parent)?, self.writable_at(new_parent)?);
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let new_name = new_name.to_str().ok_or(Errno::EINVAL)?;
        let from = self.child(&dir, name).await?;
        let Some(file) = self.written.file(&from) else {
            debug!(path = %from, "rename refused: only files being written can be renamed");
            return Err(Errno::EPERM);
        };
        let to = final_node(&new_dir, new_name).ok_or_else(|| {
            debug!(%new_dir, new_name, "rename refused: not a name that can be pushed");
            Errno::EPERM
        })?;
        self.written.rename(&file, &to).await
    }

    /// `ln a/blobs/<d> b/blobs/<d>`: a cross-repository blob mount.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Attr, Errno> {
        let (from, dir) = (self.writable_at(ino)?, self.writable_at(new_parent)?);
        let (Node::Blob(from_repo, digest), Node::Blobs(to_repo)) = (&from, &dir) else {
            return Err(Errno::EPERM);
        };
        if new_name.to_str() != Some(digest.as_str()) {
            debug!(%from, %dir, "a blob keeps its digest as its name");
            return Err(Errno::EPERM);
        }
        // link(2) to a name that exists is EEXIST (the kernel checks first; this is
        // for callers that do not).
        let target = Node::Blob(to_repo.clone(), digest.clone());
        match self.attr(&target).await {
            Ok(_) => return Err(Errno::EEXIST),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        self.written.link_blob(from_repo, to_repo, digest).await?;
        self.attr(&target).await
    }

    /// `uploads/<name> -> ../blobs/<digest>`: how a backup of `uploads/` comes back. Only
    /// such links. The blob need not be there yet: rsync makes links while the files
    /// before them are still being copied, and a link is a name kept by this mount only,
    /// nothing the registry stores.
    pub async fn symlink(&self, parent: u64, name: &OsStr, target: &Path) -> Result<Attr, Errno> {
        let dir = self.writable_at(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        let Node::Uploads(repo) = &dir else {
            return Err(Errno::EPERM);
        };
        let digest = target
            .to_str()
            .and_then(|t| t.strip_prefix(&format!("../{BLOBS}/")))
            .and_then(Digest::parse)
            .ok_or_else(|| {
                debug!(%dir, ?target, "only links to ../blobs/<digest> can be made here");
                Errno::EPERM
            })?;
        if final_node(&dir, name).is_none() || self.child(&dir, name).await.is_ok() {
            return Err(Errno::EEXIST);
        }
        self.overlay.add_link(repo, name, digest);
        self.attr(&Node::UploadLink(repo.clone(), name.to_owned()))
            .await
    }

    /// unlink: a file being written is dropped (rsync removes its temp file after a
    /// failure). Anything else is a delete (deletes.rs), only with `--allow-delete`.
    /// An untagged tag's directory stays, empty, until rmdir (as after mkdir).
    pub async fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let dir = self.writable_at(parent)?;
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let node = self.child(&dir, name).await?;
        if self.written.file(&node).is_some() {
            return self.written.discard(&node).await;
        }
        if !self.allow_delete {
            debug!(path = %node, "deleting from the registry needs --allow-delete");
            return Err(Errno::EPERM);
        }
        if let Node::UploadLink(repo, name) = &node {
            // A name this mount keeps, not a registry object: the blob stays.
            self.overlay.remove_link(repo, name);
            return Ok(());
        }
        let what = Deletion::of(&node).ok_or(Errno::EPERM)?;
        self.deletes.delete(&node, &what).await?;
        match what {
            Deletion::Untag(repo, tag) => self.overlay.make_tag_dir(&repo, &tag),
            Deletion::Blob(repo, digest) => self.overlay.blob_deleted(&repo, &digest),
            Deletion::Manifest(..) => {}
        }
        Ok(())
    }

    /// rmdir: only of an empty tag directory (made with mkdir, or left by an untag) or
    /// a repository directory made with mkdir and not pushed to: names held here.
    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if let Node::Store(dir) = self.node(parent)? {
            return Err(self.store.rmdir(&dir, &name.to_string_lossy()));
        }
        let dir = self.writable_at(parent)?;
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        match self.child(&dir, name).await? {
            Node::TagDir(repo, tag) if self.overlay.has_tag_dir(&repo, &tag) => {
                if !self
                    .written
                    .files_in(&Node::TagDir(repo.clone(), tag.clone()))
                    .is_empty()
                {
                    return Err(Errno::ENOTEMPTY);
                }
                self.overlay.remove_tag_dir(&repo, &tag);
                Ok(())
            }
            // It holds manifest.json.
            Node::TagDir(..) => Err(Errno::ENOTEMPTY),
            Node::Dir(path) if self.overlay.has_dir(&path) => {
                // Not while a file is being written into it.
                if self.written.writing_under(&path) {
                    return Err(Errno::ENOTEMPTY);
                }
                self.overlay.remove_dir(&path)
            }
            _ => Err(Errno::EPERM),
        }
    }
}
