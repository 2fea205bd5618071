//! Files being written (docs/SEMANTICS.md, "Writes"): a file written under a
//! repository becomes a blob upload or a manifest push, committed when it is closed
//! under its final name, or when a temp file is renamed onto one (how rsync and
//! `cp -p` write). What each name becomes is targets.rs's; manifests go through
//! held_indexes.rs, which may hold an index until its children arrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::BytesMut;
use tracing::{info, warn};

use super::held_indexes::HeldIndexes;
use super::overlay::Overlay;
use super::targets::{Target, destination, node_name};
use crate::fs::errno::Errno;
use crate::fs::tree::node::Node;
use crate::fs::view::RegistryView;
use crate::registry::client::MAX_MANIFEST_BYTES;
use crate::registry::upload::{MountOutcome, Upload};
use crate::registry::{Digest, Error, RegistryClient, RepoName};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A file being written, or written and waiting for the rename that names it.
pub struct WrittenFile {
    node: Node,
    repo: RepoName,
    created: SystemTime,
    /// Bytes written so far. Changed only under `state`'s lock; an atomic so that
    /// getattr need not wait for a write in progress.
    written: AtomicU64,
    /// The kernel's lock owner (one per process's file table) of the first write: only
    /// that process's close commits the file.
    writer: Mutex<Option<u64>>,
    /// The process (thread group) that opened it, for a close before any write: a
    /// child that inherited the descriptor closes it at exec, possibly before the
    /// opener's first write, and that must not commit an empty file.
    opener: Option<u32>,
    state: tokio::sync::Mutex<WriteState>,
}

struct WriteState {
    content: Content,
    /// The first failure; every later write, flush and rename of this file reports it.
    failed: Option<Errno>,
    /// Committed (or handed over): nothing more may be written.
    done: bool,
}

enum Content {
    /// Blob bytes go straight into an upload session, opened at the first write.
    Blob(Option<Box<Upload>>),
    /// A manifest is small (at most 4 MiB) and pushed whole.
    Manifest(BytesMut),
}

impl WrittenFile {
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// The files being written in this mount, and their commits.
pub struct WrittenFiles {
    client: RegistryClient,
    view: Arc<RegistryView>,
    overlay: Arc<Overlay>,
    held: Arc<HeldIndexes>,
    /// Files being written or waiting for their rename, by where they are.
    files: Mutex<HashMap<Node, Arc<WrittenFile>>>,
}

impl WrittenFiles {
    pub fn new(
        client: RegistryClient,
        view: Arc<RegistryView>,
        overlay: Arc<Overlay>,
        held: Arc<HeldIndexes>,
    ) -> WrittenFiles {
        WrittenFiles {
            client,
            view,
            overlay,
            held,
            files: Mutex::new(HashMap::new()),
        }
    }

    pub fn file(&self, node: &Node) -> Option<Arc<WrittenFile>> {
        lock(&self.files).get(node).cloned()
    }

    /// Files being written in directory `dir`, by name.
    pub fn files_in(&self, dir: &Node) -> Vec<(String, Node)> {
        lock(&self.files)
            .keys()
            .filter_map(|node| match node {
                Node::Scratch(parent, name) if **parent == *dir => {
                    Some((name.clone(), node.clone()))
                }
                Node::Upload(repo, name) if *dir == Node::Uploads(repo.clone()) => {
                    Some((name.clone(), node.clone()))
                }
                Node::Blob(..) | Node::Manifest(..) | Node::TagManifest(..)
                    if node.parent() == *dir =>
                {
                    Some((node_name(node), node.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether a file is being written into repository `path` or one below it.
    pub fn writing_under(&self, path: &str) -> bool {
        lock(&self.files)
            .values()
            .any(|f| f.repo.as_str() == path || f.repo.as_str().starts_with(&format!("{path}/")))
    }

    /// Starts a file at `node` (a final name, or `Node::Scratch` in a writable
    /// directory). Whatever was being written there before is dropped.
    /// `pid`: the process opening it (as FUSE names it).
    pub fn create(&self, node: Node, pid: u32) -> Result<Arc<WrittenFile>, Errno> {
        let (repo, blob) = destination(&node).ok_or(Errno::EPERM)?;
        let file = Arc::new(WrittenFile {
            node: node.clone(),
            repo,
            created: SystemTime::now(),
            written: AtomicU64::new(0),
            writer: Mutex::new(None),
            opener: process_of(pid),
            state: tokio::sync::Mutex::new(WriteState {
                content: if blob {
                    Content::Blob(None)
                } else {
                    Content::Manifest(BytesMut::new())
                },
                failed: None,
                done: false,
            }),
        });
        // A file replaced here has its upload, if any, cancelled when the last handle
        // lets go of it.
        lock(&self.files).insert(node, file.clone());
        Ok(file)
    }

    /// Appends `data` at `offset`, which must be where the file ends: uploads are
    /// streams, so writing elsewhere is EINVAL.
    pub async fn write(
        &self,
        file: &WrittenFile,
        offset: u64,
        data: &[u8],
        owner: Option<u64>,
    ) -> Result<(), Errno> {
        if let Some(owner) = owner {
            lock(&file.writer).get_or_insert(owner);
        }
        let mut state = file.state.lock().await;
        if let Some(e) = state.failed {
            return Err(e);
        }
        if state.done {
            warn!(path = %file.node, "write after the file was committed");
            return Err(Errno::EINVAL);
        }
        let len = file.written();
        if offset != len {
            warn!(
                path = %file.node,
                offset,
                expected = len,
                "writes here must be sequential (an upload is a stream); the file will not be committed"
            );
            // What was written is not what the writer meant: never commit it.
            state.failed = Some(Errno::EINVAL);
            return Err(Errno::EINVAL);
        }
        let result = match &mut state.content {
            Content::Manifest(buf) => {
                if buf.len() + data.len() > MAX_MANIFEST_BYTES {
                    warn!(path = %file.node, "a manifest may not exceed {MAX_MANIFEST_BYTES} bytes");
                    Err(Errno(libc::EFBIG))
                } else {
                    buf.extend_from_slice(data);
                    Ok(())
                }
            }
            Content::Blob(upload) => {
                let appended = match upload {
                    Some(up) => up.append(data).await,
                    None => match self.client.start_upload(&file.repo).await {
                        Ok(up) => {
                            let mut up = Box::new(up);
                            let r = up.append(data).await;
                            *upload = Some(up);
                            r
                        }
                        Err(e) => Err(e),
                    },
                };
                appended.map_err(|e| errno_of(&file.node, e))
            }
        };
        match result {
            Ok(()) => {
                file.written
                    .store(len + data.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                state.failed = Some(e);
                Err(e)
            }
        }
    }

    /// Close of a file under its final name: commit it. A temp file waits for its
    /// rename; a file already committed (a second close of a dup'ed descriptor) is done.
    pub async fn flush(&self, file: &Arc<WrittenFile>, owner: u64, pid: u32) -> Result<(), Errno> {
        let Some(target) = Target::of(&file.node) else {
            return file.state.lock().await.failed.map_or(Ok(()), Err);
        };
        let another = match *lock(&file.writer) {
            Some(writer) => writer != owner,
            // Nothing written yet: only the opener's close is the end.
            None => file.opener.is_some() && process_of(pid) != file.opener,
        };
        if another {
            // Another process's copy of the descriptor (a child at exec): not the end.
            return Ok(());
        }
        self.commit(file, &target).await
    }

    /// Renames a written file onto `to`: the push happens now, under that name.
    pub async fn rename(&self, file: &Arc<WrittenFile>, to: &Node) -> Result<(), Errno> {
        let target = Target::of(to).ok_or(Errno::EPERM)?;
        if destination(&file.node) != destination(to) {
            // Blob bytes cannot become a manifest, nor move to another repository by
            // rename: EXDEV makes mv and rsync copy instead.
            return Err(Errno(libc::EXDEV));
        }
        let result = self.commit(file, &target).await;
        lock(&self.files).remove(&file.node);
        result
    }

    /// Drops a file that is being written (rsync removes its temp file after a failure).
    pub async fn discard(&self, node: &Node) -> Result<(), Errno> {
        let file = lock(&self.files).remove(node).ok_or(Errno::ENOENT)?;
        let mut state = file.state.lock().await;
        state.done = true;
        if let Content::Blob(upload) = &mut state.content {
            if let Some(up) = upload.take() {
                up.cancel().await;
            }
        }
        Ok(())
    }

    async fn commit(&self, file: &Arc<WrittenFile>, target: &Target) -> Result<(), Errno> {
        let mut state = file.state.lock().await;
        if let Some(e) = state.failed {
            // A write failed (out of order, or the upload did): never committed, and
            // not left behind under its final name either.
            self.let_go(file);
            return Err(e);
        }
        if state.done {
            return Ok(());
        }
        state.done = true;
        let result = match (&mut state.content, target) {
            (
                Content::Blob(upload),
                Target::Blob {
                    repo,
                    expected,
                    upload_name,
                },
            ) => {
                let upload = match upload.take() {
                    Some(up) => Ok(*up),
                    // Nothing was written: an empty blob still needs a session.
                    None => self.client.start_upload(repo).await,
                };
                match upload {
                    Ok(up) => match up.commit(expected.as_ref()).await {
                        Ok(digest) => {
                            self.overlay.blob_pushed(repo, &digest);
                            if let Some(name) = upload_name {
                                self.overlay.add_link(repo, name, digest);
                            }
                            self.view.pushed(repo, None);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            (Content::Manifest(buf), Target::Manifest { repo, reference }) => {
                let body = std::mem::take(buf).freeze();
                self.held.push(repo, reference, body).await
            }
            _ => Err(Error::Invalid(format!(
                "{}: blob bytes cannot become a manifest, nor a manifest a blob",
                file.node
            ))),
        };
        // Under its final name, the file is the registry's now (a temp file is
        // removed by its rename).
        self.let_go(file);
        result.map_err(|e| {
            let errno = errno_of(&file.node, e);
            state.failed = Some(errno);
            errno
        })
    }

    /// Forgets `file` under its name (unless another file took the name meanwhile).
    fn let_go(&self, file: &Arc<WrittenFile>) {
        let mut files = lock(&self.files);
        if files.get(&file.node).is_some_and(|f| Arc::ptr_eq(f, file)) {
            files.remove(&file.node);
        }
    }

    /// `ln a/blobs/<d> b/blobs/<d>`: mounts the blob into `to` (or copies it when the
    /// registry declines).
    pub async fn link_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
    ) -> Result<(), Errno> {
        let node = Node::Blob(to.clone(), digest.clone());
        let result = match self.client.mount_blob(to, digest, from).await {
            Ok(MountOutcome::Mounted) => Ok(()),
            Ok(MountOutcome::NotMounted(upload)) => {
                info!(%from, %to, %digest, "the registry declined the mount; copying the blob");
                self.client.copy_blob(from, digest, upload).await
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| errno_of(&node, e))?;
        self.overlay.blob_pushed(to, digest);
        self.view.pushed(to, None);
        Ok(())
    }
}

/// Logs why a write failed, against its path, and gives the errno.
fn errno_of(node: &Node, e: Error) -> Errno {
    warn!(path = %node, "{e}");
    Errno(e.errno())
}

/// The thread group (process) of a thread FUSE names by its id: `Tgid` in procfs.
fn process_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}
