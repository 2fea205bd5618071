//! Referrers in the tree (DESIGN §2): `<repo>/.referrers/<digest>/` holds a symlink
//! per manifest whose `subject` is `<digest>` (to `../../manifests/<d>`), and
//! `index.json`, the referrers index as the API gives it, where each descriptor's
//! `artifactType` and `annotations` say what the referrer is.
//!
//! The list comes from `GET /v2/<name>/referrers/<digest>`, or, where the registry has
//! no such API (it answers 404, as distribution 2.8 does), from the referrers tag
//! schema: the index tagged `sha256-<hex>`. Whether the registry has the API is learnt
//! from its first answer and kept for the mount. Pushing a manifest with a `subject`
//! through the mount adds it to that index, and deleting one removes it, as oras-go
//! does, so a registry without the API finds them just the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use crate::cache::Memo;
use crate::fs::tree::node::{self, Kind, MANIFESTS, Node, REFERRERS};
use crate::fs::view::registry_view::{RegistryView, bounded};
use crate::fs::{Attr, Errno, fail};
use crate::registry::referrers::{Referrer, describe, fallback_tag, index_bytes, parse_index};
use crate::registry::{Digest, Error, Reference, RepoName, Result};

/// The referrers index in `.referrers/<digest>/`.
pub const INDEX_JSON: &str = "index.json";
/// Referrers lists kept (each is a few descriptors).
const KEPT_LISTS: usize = 4096;

/// Where in `.referrers/` a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RefPath {
    /// `.referrers` itself: lists nothing, opens any digest.
    Root,
    /// `.referrers/<subject>/`.
    Subject(Digest),
    /// `.referrers/<subject>/index.json`.
    Index(Digest),
    /// `.referrers/<subject>/<digest>`: a symlink to the referrer's manifest.
    Link(Digest, Digest),
}

impl RefPath {
    pub fn kind(&self) -> Kind {
        match self {
            RefPath::Root | RefPath::Subject(_) => Kind::Dir,
            RefPath::Index(_) => Kind::File,
            RefPath::Link(..) => Kind::Symlink,
        }
    }

    pub fn parent(&self, repo: &RepoName) -> Node {
        let at = |p| Node::Referrers(repo.clone(), p);
        match self {
            RefPath::Root => Node::Dir(repo.as_str().to_owned()),
            RefPath::Subject(_) => at(RefPath::Root),
            RefPath::Index(s) | RefPath::Link(s, _) => at(RefPath::Subject(s.clone())),
        }
    }

    /// The path below the repository, for log lines.
    pub fn show(&self) -> String {
        match self {
            RefPath::Root => REFERRERS.to_owned(),
            RefPath::Subject(s) => format!("{REFERRERS}/{s}"),
            RefPath::Index(s) => format!("{REFERRERS}/{s}/{INDEX_JSON}"),
            RefPath::Link(s, d) => format!("{REFERRERS}/{s}/{d}"),
        }
    }
}

/// Whether the registry has the referrers API, as far as it has said.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Unknown = 0,
    Offered = 1,
    Missing = 2,
}

/// What the registry view keeps of referrers: the lists, and whether the API exists.
pub struct ReferrersState {
    api: AtomicU8,
    lists: Memo<(RepoName, Digest), Arc<Vec<Referrer>>>,
    /// Held across each read-change-push of a fallback index: two pushes at once
    /// (parallel `cp` of signatures) would otherwise each push the index without the
    /// other's referrer. Such pushes are rare, so one lock for all is enough.
    fallback_updates: tokio::sync::Mutex<()>,
}

impl ReferrersState {
    pub fn new(ttl: Duration) -> ReferrersState {
        ReferrersState {
            api: AtomicU8::new(Api::Unknown as u8),
            lists: Memo::new(KEPT_LISTS, Some(ttl)).keeping_failures(Error::is_transient),
            fallback_updates: tokio::sync::Mutex::new(()),
        }
    }

    fn api(&self) -> Api {
        match self.api.load(Ordering::Relaxed) {
            1 => Api::Offered,
            2 => Api::Missing,
            _ => Api::Unknown,
        }
    }

    fn learn(&self, offered: bool) {
        let api = if offered { Api::Offered } else { Api::Missing };
        if self.api.swap(api as u8, Ordering::Relaxed) != api as u8 {
            info!(
                "the registry {} the referrers API",
                if offered {
                    "has"
                } else {
                    "lacks (404) — using the referrers tag schema instead of"
                }
            );
        }
    }
}

impl RegistryView {
    /// The referrers of `subject` in `repo`, as of at most `--tag-ttl` ago.
    pub async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Arc<Vec<Referrer>>> {
        let key = (repo.clone(), subject.clone());
        self.referrers
            .lists
            .get_or_fetch(&key, || async {
                if self.referrers.api() != Api::Missing {
                    match self.client().referrers(repo, subject).await? {
                        Some(list) => {
                            self.referrers.learn(true);
                            return Ok(Arc::new(list));
                        }
                        None => self.referrers.learn(false),
                    }
                }
                self.fallback_referrers(repo, subject).await.map(Arc::new)
            })
            .await
    }

    /// The referrers the fallback tag of `subject` lists (none if there is no tag).
    async fn fallback_referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Referrer>> {
        let Some(tag) = fallback_tag(subject) else {
            return Ok(Vec::new());
        };
        match self.tag_manifest(repo, &tag).await {
            Ok(index) => parse_index(&index.bytes)
                .map_err(|e| Error::BadAnswer(format!("{repo}:{tag}: {e}"))),
            Err(Error::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether the registry has the referrers API, asking about `subject` if that is
    /// not known yet.
    async fn has_referrers_api(&self, repo: &RepoName, subject: &Digest) -> Result<bool> {
        if self.referrers.api() == Api::Unknown {
            self.referrers
                .lists
                .forget(&(repo.clone(), subject.clone()));
            self.referrers(repo, subject).await?;
        }
        Ok(self.referrers.api() == Api::Offered)
    }

    /// The referrers of `digests` that the API lists, for the walk of a repository; a
    /// registry without the API has fallback tags instead, which the walk reaches as
    /// tags, so this asks nothing of it.
    pub async fn api_referrers(
        &self,
        repo: &RepoName,
        digests: &[Digest],
    ) -> Result<Vec<Referrer>> {
        let Some(first) = digests.first() else {
            return Ok(Vec::new());
        };
        if !self.has_referrers_api(repo, first).await? {
            return Ok(Vec::new());
        }
        let lists = bounded(digests.iter().map(|d| self.referrers(repo, d))).await;
        let mut all = Vec::new();
        for list in lists {
            match list {
                Ok(list) => all.extend(list.iter().cloned()),
                // One malformed answer does not hide the rest (as with manifests).
                Err(e @ Error::BadAnswer(_)) => warn!(%repo, "skipping a referrers list: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    /// After a push of manifest `body` (`digest`) into `repo`: one with a `subject` is
    /// added to its subject's fallback index where the registry lacks the API.
    pub async fn add_referrer(&self, repo: &RepoName, body: &[u8], digest: &Digest) -> Result<()> {
        let Some((subject, referrer)) = describe(body, digest) else {
            return Ok(());
        };
        if self.has_referrers_api(repo, &subject).await? {
            self.referrers.lists.forget(&(repo.clone(), subject));
            return Ok(());
        }
        self.update_fallback(repo, &subject, |list| {
            if list.iter().any(|r| r.digest == referrer.digest) {
                return false;
            }
            list.push(referrer);
            true
        })
        .await
    }

    /// After the delete of referrer `digest` of `subject`: it leaves the fallback index.
    /// (The old index stays in the registry, untagged, for its garbage collection:
    /// deleting it by digest could take another tag with the same bytes along.)
    pub async fn remove_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: &Digest,
    ) -> Result<()> {
        if self.has_referrers_api(repo, subject).await? {
            self.referrers
                .lists
                .forget(&(repo.clone(), subject.clone()));
            return Ok(());
        }
        self.update_fallback(repo, subject, |list| {
            let before = list.len();
            list.retain(|r| r.digest != *digest);
            list.len() != before
        })
        .await
    }

    /// Reads the fallback index of `subject` afresh, applies `change`, and pushes the
    /// result if `change` says it changed anything.
    async fn update_fallback(
        &self,
        repo: &RepoName,
        subject: &Digest,
        change: impl FnOnce(&mut Vec<Referrer>) -> bool,
    ) -> Result<()> {
        let Some(tag) = fallback_tag(subject) else {
            return Ok(());
        };
        let _one_at_a_time = self.referrers.fallback_updates.lock().await;
        let reference = Reference::Tag(tag.clone());
        let mut list = match self.client().get_manifest(repo, &reference).await {
            Ok(index) => parse_index(&index.bytes)
                .map_err(|e| Error::BadAnswer(format!("{repo}:{tag}: {e}")))?,
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        if !change(&mut list) {
            return Ok(());
        }
        self.client()
            .put_manifest(repo, &reference, Bytes::from(index_bytes(&list)))
            .await?;
        info!(%repo, %subject, referrers = list.len(), "referrers tag {tag} updated");
        self.pushed(repo, Some(&tag));
        self.referrers
            .lists
            .forget(&(repo.clone(), subject.clone()));
        Ok(())
    }
}

/// The node called `name` in `.referrers` directory `path`.
pub async fn child(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
    name: &str,
) -> std::result::Result<Node, Errno> {
    let at = |p| Node::Referrers(repo.clone(), p);
    match path {
        RefPath::Root => Digest::parse(name)
            .map(|d| at(RefPath::Subject(d)))
            .ok_or(Errno::ENOENT),
        RefPath::Subject(s) if name == INDEX_JSON => Ok(at(RefPath::Index(s.clone()))),
        RefPath::Subject(s) => {
            let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
            let node = at(RefPath::Link(s.clone(), digest.clone()));
            let list = view.referrers(repo, s).await.map_err(|e| fail(&node, e))?;
            if list.iter().any(|r| r.digest == digest) {
                Ok(node)
            } else {
                Err(Errno::ENOENT)
            }
        }
        RefPath::Index(_) | RefPath::Link(..) => Err(Errno::ENOTDIR),
    }
}

/// The entries of `.referrers` directory `path`.
pub async fn children(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
) -> std::result::Result<Vec<(String, Node)>, Errno> {
    let at = |p| Node::Referrers(repo.clone(), p);
    match path {
        // Any digest opens; listing them all would mean asking about every manifest.
        RefPath::Root => Ok(Vec::new()),
        RefPath::Subject(s) => {
            let node = at(path.clone());
            let list = view.referrers(repo, s).await.map_err(|e| fail(&node, e))?;
            let mut out = vec![(INDEX_JSON.to_owned(), at(RefPath::Index(s.clone())))];
            out.extend(list.iter().map(|r| {
                (
                    r.digest.to_string(),
                    at(RefPath::Link(s.clone(), r.digest.clone())),
                )
            }));
            Ok(out)
        }
        RefPath::Index(_) | RefPath::Link(..) => Err(Errno::ENOTDIR),
    }
}

/// The bytes of `.referrers/<subject>/index.json`.
pub async fn index_json(
    view: &RegistryView,
    repo: &RepoName,
    subject: &Digest,
) -> std::result::Result<Bytes, Errno> {
    let node = Node::Referrers(repo.clone(), RefPath::Index(subject.clone()));
    let list = view
        .referrers(repo, subject)
        .await
        .map_err(|e| fail(&node, e))?;
    Ok(Bytes::from(index_bytes(&list)))
}

/// Where `.referrers/<subject>/<digest>` points.
pub fn link_target(digest: &Digest) -> String {
    format!("../../{MANIFESTS}/{digest}")
}

/// The attributes of a `.referrers` node (`ttl`: the mount's `--tag-ttl`; lists change).
pub async fn attr(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
    ino: u64,
    ttl: Duration,
) -> std::result::Result<Attr, Errno> {
    Ok(match path {
        RefPath::Root | RefPath::Subject(_) => {
            Attr::plain(ino, Kind::Dir, 0, node::epoch(), 0o555, ttl)
        }
        RefPath::Index(s) => {
            let bytes = index_json(view, repo, s).await?;
            let mtime = node::content_mtime(&Digest::sha256_of(&bytes));
            Attr::plain(ino, Kind::File, bytes.len() as u64, mtime, 0o444, ttl)
        }
        RefPath::Link(_, d) => {
            let size = link_target(d).len() as u64;
            Attr::plain(ino, Kind::Symlink, size, node::content_mtime(d), 0o777, ttl)
        }
    })
}
