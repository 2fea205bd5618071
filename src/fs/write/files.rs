//! The write side of the tree (DESIGN §2): a file written under a repository becomes a
//! blob upload or a manifest push, committed when it is closed under its final name, or
//! when a temp file is renamed onto one (how rsync and `cp -p` write). Directories made
//! with `mkdir` are held here until the first push makes them real.
//!
//! Nothing is reported as done before the registry confirmed it, with one exception an
//! rsync restore needs: rsync writes `manifests/` in name order, so an index may arrive
//! before its child manifests. Such an index is held and pushed as soon as the children
//! have been pushed through this mount (`pending_manifests` in `/.regfs/stats` counts
//! what is still held). Held indexes are kept in the disk cache too: a later mount of
//! the same registry pushes them once their children are there.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use crate::cache::DiskCache;
use crate::cache::disk::HeldIndex as KeptIndex;
use crate::fs::Errno;
use crate::fs::tree::node::{MANIFEST_JSON, Node};
use crate::fs::view::registry_view::RegistryView;
use crate::registry::client::MAX_MANIFEST_BYTES;
use crate::registry::upload::{MountOutcome, Upload};
use crate::registry::{Digest, Error, ManifestLinks, Reference, RegistryClient, RepoName, Tag};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a file becomes once committed, decided by its final name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A blob; its content must hash to `expected` when the name is a digest.
    /// `upload_name` is set for `uploads/<name>`, which becomes a symlink to the blob.
    Blob {
        repo: RepoName,
        expected: Option<Digest>,
        upload_name: Option<String>,
    },
    Manifest {
        repo: RepoName,
        reference: Reference,
    },
}

impl Target {
    /// The target of a file at `node`, if a file there can be committed at all.
    pub fn of(node: &Node) -> Option<Target> {
        match node {
            Node::Blob(repo, digest) => Some(Target::Blob {
                repo: repo.clone(),
                expected: Some(digest.clone()),
                upload_name: None,
            }),
            Node::Upload(repo, name) => Some(Target::Blob {
                repo: repo.clone(),
                expected: Digest::parse(name),
                upload_name: Some(name.clone()),
            }),
            Node::Manifest(repo, digest) => Some(Target::Manifest {
                repo: repo.clone(),
                reference: Reference::Digest(digest.clone()),
            }),
            Node::TagManifest(repo, tag) => Some(Target::Manifest {
                repo: repo.clone(),
                reference: Reference::Tag(tag.clone()),
            }),
            _ => None,
        }
    }
}

/// The final node a name stands for in a writable directory, or None for a temp name
/// (a leading dot, or anything that is not a final name there).
pub fn final_node(dir: &Node, name: &str) -> Option<Node> {
    if name.starts_with('.') {
        return None;
    }
    match dir {
        Node::Blobs(repo) => Digest::parse(name).map(|d| Node::Blob(repo.clone(), d)),
        Node::Manifests(repo) => Digest::parse(name).map(|d| Node::Manifest(repo.clone(), d)),
        Node::TagDir(repo, tag) if name == MANIFEST_JSON => {
            Some(Node::TagManifest(repo.clone(), tag.clone()))
        }
        Node::Uploads(repo) if !name.contains('/') && !name.is_empty() => {
            Some(Node::Upload(repo.clone(), name.to_owned()))
        }
        _ => None,
    }
}

/// The node a file created as `name` in `dir` is: its final name there, or a temp file
/// in a directory that takes writes; None where nothing can be written.
pub fn writable_node(dir: &Node, name: &str) -> Option<Node> {
    final_node(dir, name).or_else(|| {
        let scratch = Node::Scratch(Box::new(dir.clone()), name.to_owned());
        destination(&scratch).is_some().then_some(scratch)
    })
}

/// The repository a file at `node` goes to, and whether it holds blob bytes (else a
/// manifest); None where nothing can be written.
fn destination(node: &Node) -> Option<(RepoName, bool)> {
    match node {
        Node::Scratch(dir, _) => match &**dir {
            Node::Blobs(r) | Node::Uploads(r) => Some((r.clone(), true)),
            Node::Manifests(r) | Node::TagDir(r, _) => Some((r.clone(), false)),
            _ => None,
        },
        other => match Target::of(other)? {
            Target::Blob { repo, .. } => Some((repo, true)),
            Target::Manifest { repo, .. } => Some((repo, false)),
        },
    }
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
    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// An index held until its child manifests are in the repository.
struct HeldIndex {
    repo: RepoName,
    reference: Reference,
    body: Bytes,
    /// The children not pushed yet.
    missing: HashSet<Digest>,
}

pub struct Writes {
    client: RegistryClient,
    view: Arc<RegistryView>,
    /// Files being written or waiting for their rename, by where they are.
    files: Mutex<HashMap<Node, Arc<WrittenFile>>>,
    /// `uploads/<name>` committed in this mount → the blob it became.
    links: Mutex<HashMap<(RepoName, String), Digest>>,
    /// Blobs pushed into a repository through this mount (uploads, `blobs/<digest>`,
    /// `ln`): the registry cannot list a repository's blobs, so these are listed in
    /// `blobs/` from here.
    pushed_blobs: Mutex<HashSet<(RepoName, Digest)>>,
    /// Repository (and namespace) paths made with mkdir, not yet pushed to.
    dirs: Mutex<BTreeSet<String>>,
    tag_dirs: Mutex<HashSet<(RepoName, Tag)>>,
    held: Mutex<Vec<HeldIndex>>,
    disk: Option<DiskCache>,
}

impl HeldIndex {
    fn kept(&self) -> KeptIndex {
        KeptIndex {
            repo: self.repo.clone(),
            reference: self.reference.clone(),
            body: self.body.clone(),
        }
    }
}

impl Writes {
    pub fn new(client: RegistryClient, view: Arc<RegistryView>, disk: Option<DiskCache>) -> Writes {
        Writes {
            client,
            view,
            disk,
            files: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            pushed_blobs: Mutex::new(HashSet::new()),
            dirs: Mutex::new(BTreeSet::new()),
            tag_dirs: Mutex::new(HashSet::new()),
            held: Mutex::new(Vec::new()),
        }
    }

    // ---- what the tree shows of the write side -------------------------------------------

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

    /// What `uploads/<name>` became, if it was committed in this mount.
    pub fn link(&self, repo: &RepoName, name: &str) -> Option<Digest> {
        lock(&self.links)
            .get(&(repo.clone(), name.to_owned()))
            .cloned()
    }

    /// Names blob `digest` of `repo` as `uploads/<name>` (a restored backup recreates
    /// these links).
    pub fn add_link(&self, repo: &RepoName, name: &str, digest: Digest) {
        lock(&self.links).insert((repo.clone(), name.to_owned()), digest);
    }

    /// The blobs pushed into `repo` through this mount, and those its `uploads/` links
    /// point at: listed in `blobs/` too, so that a backup of the repository holds what
    /// was put there and what its links point at.
    pub fn linked_blobs(&self, repo: &RepoName) -> Vec<Digest> {
        let mut blobs: Vec<Digest> = lock(&self.links)
            .iter()
            .filter(|((r, _), _)| r == repo)
            .map(|(_, d)| d.clone())
            .collect();
        blobs.extend(
            lock(&self.pushed_blobs)
                .iter()
                .filter(|(r, _)| r == repo)
                .map(|(_, d)| d.clone()),
        );
        blobs
    }

    fn blob_pushed(&self, repo: &RepoName, digest: &Digest) {
        lock(&self.pushed_blobs).insert((repo.clone(), digest.clone()));
    }

    pub fn links_in(&self, repo: &RepoName) -> Vec<String> {
        lock(&self.links)
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, name)| name.clone())
            .collect()
    }

    pub fn has_dir(&self, path: &str) -> bool {
        lock(&self.dirs).contains(path)
    }

    /// Names of the directories made with mkdir right below `path`.
    pub fn dirs_below(&self, path: &str) -> Vec<String> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        lock(&self.dirs)
            .iter()
            .filter_map(|d| d.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('/').next())
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn has_tag_dir(&self, repo: &RepoName, tag: &Tag) -> bool {
        lock(&self.tag_dirs).contains(&(repo.clone(), tag.clone()))
    }

    pub fn tag_dirs_in(&self, repo: &RepoName) -> Vec<Tag> {
        lock(&self.tag_dirs)
            .iter()
            .filter(|(r, _)| r == repo)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// The body of a held manifest, so that `manifests/<digest>` shows what was written.
    pub fn held_manifest(&self, repo: &RepoName, digest: &Digest) -> Option<Bytes> {
        lock(&self.held)
            .iter()
            .find(|h| h.repo == *repo && digest.matches(&h.body))
            .map(|h| h.body.clone())
    }

    // ---- making directories ----------------------------------------------------------------

    /// Records a repository (or namespace) directory made with mkdir. Every leading
    /// path is recorded too, so `mkdir -p a/b/c` shows `a` and `a/b`.
    pub fn make_dir(&self, path: &str) {
        let mut dirs = lock(&self.dirs);
        let mut end = 0;
        for part in path.split('/') {
            end += part.len();
            dirs.insert(path[..end].to_owned());
            end += 1;
        }
    }

    pub fn make_tag_dir(&self, repo: &RepoName, tag: &Tag) {
        lock(&self.tag_dirs).insert((repo.clone(), tag.clone()));
    }

    // ---- removing what is held here (rmdir, rm of an uploads/ link) --------------------

    pub fn remove_tag_dir(&self, repo: &RepoName, tag: &Tag) {
        lock(&self.tag_dirs).remove(&(repo.clone(), tag.clone()));
    }

    /// Removes a directory made with mkdir; ENOTEMPTY while it has one below it, or a
    /// file is being written into it.
    pub fn remove_dir(&self, path: &str) -> Result<(), Errno> {
        let writing = lock(&self.files)
            .values()
            .any(|f| f.repo.as_str() == path || f.repo.as_str().starts_with(&format!("{path}/")));
        if writing || !self.dirs_below(path).is_empty() {
            return Err(Errno(libc::ENOTEMPTY));
        }
        lock(&self.dirs).remove(path);
        Ok(())
    }

    /// Forgets `uploads/<name>`; the blob it named stays.
    pub fn remove_link(&self, repo: &RepoName, name: &str) {
        lock(&self.links).remove(&(repo.clone(), name.to_owned()));
    }

    // ---- writing -----------------------------------------------------------------------------

    /// Starts a file at `node` (a final name, or `Node::Scratch` in a writable
    /// directory). Whatever was being written there before is dropped.
    /// `pid`: the process opening it (as FUSE names it).
    pub fn create(&self, node: Node, pid: u32) -> Result<Arc<WrittenFile>, Errno> {
        let (repo, blob) = destination(&node).ok_or(Errno(libc::EPERM))?;
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
            return Err(Errno(libc::EINVAL));
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
            state.failed = Some(Errno(libc::EINVAL));
            return Err(Errno(libc::EINVAL));
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
        let target = Target::of(to).ok_or(Errno(libc::EPERM))?;
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
        let file = lock(&self.files).remove(node).ok_or(Errno(libc::ENOENT))?;
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
                            self.blob_pushed(repo, &digest);
                            if let Some(name) = upload_name {
                                lock(&self.links).insert((repo.clone(), name.clone()), digest);
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
                self.push_manifest(repo, reference, body).await
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

    /// Pushes a manifest; an index whose child manifests are missing is held (see the
    /// module comment). Then retries what is held in the repository.
    async fn push_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: Bytes,
    ) -> Result<(), Error> {
        match self
            .client
            .put_manifest(repo, reference, body.clone())
            .await
        {
            Ok(digest) => {
                self.after_manifest_push(repo, reference);
                // A referrer must be findable before its push counts as done (a restore
                // that lost its signatures would not be a restore).
                self.view.add_referrer(repo, &body, &digest).await?;
                self.release_held(repo, digest).await;
                Ok(())
            }
            Err(e @ Error::Refused(_)) => {
                let missing = self.missing_children(repo, &body).await;
                if missing.is_empty() {
                    return Err(e);
                }
                warn!(
                    %repo, %reference, missing = missing.len(),
                    "index held until its child manifests are pushed ({e})"
                );
                let index = HeldIndex {
                    repo: repo.clone(),
                    reference: reference.clone(),
                    body,
                    missing,
                };
                if let Some(disk) = &self.disk {
                    disk.hold(&index.kept());
                }
                let mut held = lock(&self.held);
                held.push(index);
                self.count_held(held.len());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn after_manifest_push(&self, repo: &RepoName, reference: &Reference) {
        let tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        self.view.pushed(repo, tag);
        if let Some(tag) = tag {
            lock(&self.tag_dirs).remove(&(repo.clone(), tag.clone()));
        }
        self.forget_dirs_of(repo);
    }

    /// A pushed-to repository is real now: its mkdir'd path is no longer needed.
    fn forget_dirs_of(&self, repo: &RepoName) {
        let mut dirs = lock(&self.dirs);
        let path = repo.as_str();
        dirs.retain(|d| !(path == d || path.starts_with(&format!("{d}/"))));
    }

    /// The child manifests an index names that `repo` does not have; empty for
    /// anything that is not an index (or cannot be checked).
    async fn missing_children(&self, repo: &RepoName, body: &[u8]) -> HashSet<Digest> {
        let Ok(ManifestLinks::Index { manifests }) = ManifestLinks::parse(body, "") else {
            return HashSet::new();
        };
        let mut missing = HashSet::new();
        for child in manifests {
            let reference = Reference::Digest(child.digest.clone());
            if let Err(Error::NotFound(_)) = self.client.head_manifest(repo, &reference).await {
                missing.insert(child.digest);
            }
        }
        missing
    }

    /// Manifest `pushed` is in `repo` now: pushes the held indexes that were waiting
    /// only for it (and, in turn, those waiting for them). One the registry still
    /// refuses stays held, and is tried again after the next push into `repo`.
    async fn release_held(&self, repo: &RepoName, pushed: Digest) {
        let mut refused = Vec::new();
        let mut arrived = vec![pushed];
        while let Some(digest) = arrived.pop() {
            let ready: Vec<(Reference, Bytes)> = {
                let mut held = lock(&self.held);
                for h in held.iter_mut().filter(|h| h.repo == *repo) {
                    h.missing.remove(&digest);
                }
                let ready = held
                    .iter()
                    .filter(|h| h.repo == *repo && h.missing.is_empty())
                    .map(|h| (h.reference.clone(), h.body.clone()))
                    .collect();
                held.retain(|h| !(h.repo == *repo && h.missing.is_empty()));
                self.count_held(held.len());
                ready
            };
            for (reference, body) in ready {
                match self
                    .client
                    .put_manifest(repo, &reference, body.clone())
                    .await
                {
                    Ok(digest) => {
                        info!(%repo, %reference, "held index pushed: its children arrived");
                        self.forget_kept(repo, &reference, &body);
                        self.after_manifest_push(repo, &reference);
                        arrived.push(digest);
                    }
                    Err(e) => {
                        warn!(%repo, %reference, "held index still refused: {e}");
                        refused.push(HeldIndex {
                            repo: repo.clone(),
                            reference,
                            body,
                            missing: HashSet::new(),
                        });
                    }
                }
            }
        }
        let mut held = lock(&self.held);
        held.extend(refused);
        self.count_held(held.len());
    }

    fn forget_kept(&self, repo: &RepoName, reference: &Reference, body: &Bytes) {
        if let Some(disk) = &self.disk {
            disk.unhold(&KeptIndex {
                repo: repo.clone(),
                reference: reference.clone(),
                body: body.clone(),
            });
        }
    }

    /// Takes up the indexes an earlier mount of this registry held: pushes those whose
    /// children are there now, and holds the others again.
    pub async fn resume_held(&self) {
        let Some(disk) = &self.disk else {
            return;
        };
        for kept in disk.held() {
            let (repo, reference) = (&kept.repo, &kept.reference);
            let missing = self.missing_children(repo, &kept.body).await;
            if missing.is_empty() {
                match self
                    .client
                    .put_manifest(repo, reference, kept.body.clone())
                    .await
                {
                    Ok(digest) => {
                        info!(%repo, %reference, "pushed an index an earlier mount held");
                        disk.unhold(&kept);
                        self.after_manifest_push(repo, reference);
                        self.release_held(repo, digest).await;
                        continue;
                    }
                    Err(e) => {
                        warn!(%repo, %reference, "an index an earlier mount held is still refused: {e}")
                    }
                }
            } else {
                info!(%repo, %reference, missing = missing.len(), "an index an earlier mount held still waits for its child manifests");
            }
            let mut held = lock(&self.held);
            held.push(HeldIndex {
                repo: kept.repo.clone(),
                reference: kept.reference.clone(),
                body: kept.body.clone(),
                missing,
            });
            self.count_held(held.len());
        }
    }

    fn count_held(&self, n: usize) {
        self.client
            .stats()
            .pending_manifests
            .store(n as u64, Ordering::Relaxed);
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
        self.blob_pushed(to, digest);
        self.view.pushed(to, None);
        Ok(())
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        for held in lock(&self.held).iter() {
            if self.disk.is_some() {
                warn!(
                    repo = %held.repo,
                    reference = %held.reference,
                    "unmounted while an index still waited for its child manifests: kept in the disk cache, the next mount of this registry pushes it"
                );
            } else {
                tracing::error!(
                    repo = %held.repo,
                    reference = %held.reference,
                    "unmounted while an index still waited for its child manifests: it was not pushed"
                );
            }
        }
    }
}

/// The name of a file node within its directory.
fn node_name(node: &Node) -> String {
    match node {
        Node::Blob(_, d) | Node::Manifest(_, d) => d.to_string(),
        Node::TagManifest(..) => MANIFEST_JSON.to_owned(),
        Node::Upload(_, name) | Node::UploadLink(_, name) | Node::Scratch(_, name) => name.clone(),
        other => other.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> RepoName {
        RepoName::parse("team/app").expect("valid")
    }

    #[test]
    fn final_names_and_temp_names() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            final_node(&Node::Blobs(repo()), d.as_str()),
            Some(Node::Blob(repo(), d.clone()))
        );
        assert_eq!(final_node(&Node::Blobs(repo()), "notadigest"), None);
        let rsync_temp = format!(".{d}.Ab12Cd");
        assert_eq!(final_node(&Node::Blobs(repo()), &rsync_temp), None);
        assert_eq!(
            final_node(&Node::Uploads(repo()), "layer.tar"),
            Some(Node::Upload(repo(), "layer.tar".into()))
        );
        assert_eq!(final_node(&Node::Uploads(repo()), ".layer.tar.XyZ"), None);
        let tag = Tag::parse("v1").expect("valid");
        assert_eq!(
            final_node(&Node::TagDir(repo(), tag.clone()), MANIFEST_JSON),
            Some(Node::TagManifest(repo(), tag.clone()))
        );
        assert_eq!(final_node(&Node::TagDir(repo(), tag), "other.json"), None);
    }

    #[test]
    fn targets() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            Target::of(&Node::Upload(repo(), d.to_string())),
            Some(Target::Blob {
                repo: repo(),
                expected: Some(d.clone()),
                upload_name: Some(d.to_string()),
            })
        );
        assert_eq!(
            Target::of(&Node::Upload(repo(), "layer.tar".into())),
            Some(Target::Blob {
                repo: repo(),
                expected: None,
                upload_name: Some("layer.tar".into()),
            })
        );
        assert!(Target::of(&Node::Blobs(repo())).is_none());
    }
}
