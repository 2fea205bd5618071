//! The referrers of manifests (docs/SEMANTICS.md, "Referrers"): the list for a subject
//! comes from `GET /v2/<name>/referrers/<digest>`, or, where the registry has no such
//! API (it answers 404, as distribution 2.8 does), from the referrers tag schema: the
//! index tagged `sha256-<hex>`. Whether the registry has the API is learnt from its
//! first answer and kept for the mount. Pushing a manifest with a `subject` through the
//! mount adds it to that index, and deleting one removes it, as oras-go does, so a
//! registry without the API finds them just the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use super::bounds::bounded;
use super::objects::Objects;
use crate::cache::Memo;
use crate::registry::referrers::{Referrer, describe, fallback_tag, index_bytes, parse_index};
use crate::registry::{Digest, Error, Reference, RegistryClient, RepoName, Result, Tag};

/// Referrers lists kept (each is a few descriptors).
const KEPT_LISTS: usize = 4096;

/// Whether the registry has the referrers API, as far as it has said.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Unknown = 0,
    Offered = 1,
    Missing = 2,
}

/// What the registry view keeps of referrers: the lists, and whether the API exists.
pub struct Referrers {
    client: RegistryClient,
    api: AtomicU8,
    lists: Memo<(RepoName, Digest), Arc<Vec<Referrer>>>,
    /// Held across each read-change-push of a fallback index: two pushes at once
    /// (parallel `cp` of signatures) would otherwise each push the index without the
    /// other's referrer. Such pushes are rare, so one lock for all is enough.
    fallback_updates: tokio::sync::Mutex<()>,
}

impl Referrers {
    pub fn new(client: RegistryClient, ttl: Duration) -> Referrers {
        Referrers {
            client,
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

    /// The referrers of `subject` in `repo`, as of at most `--tag-ttl` ago.
    pub async fn list(
        &self,
        objects: &Objects,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Arc<Vec<Referrer>>> {
        let key = (repo.clone(), subject.clone());
        self.lists
            .get_or_fetch(&key, || async {
                if self.api() != Api::Missing {
                    match self.client.referrers(repo, subject).await? {
                        Some(list) => {
                            self.learn(true);
                            return Ok(Arc::new(list));
                        }
                        None => self.learn(false),
                    }
                }
                fallback_referrers(objects, repo, subject)
                    .await
                    .map(Arc::new)
            })
            .await
    }

    /// Whether the registry has the referrers API, asking about `subject` if that is
    /// not known yet.
    async fn has_api(&self, objects: &Objects, repo: &RepoName, subject: &Digest) -> Result<bool> {
        if self.api() == Api::Unknown {
            self.forget(repo, subject);
            self.list(objects, repo, subject).await?;
        }
        Ok(self.api() == Api::Offered)
    }

    fn forget(&self, repo: &RepoName, subject: &Digest) {
        self.lists.forget(&(repo.clone(), subject.clone()));
    }

    /// The referrers of `digests` that the API lists, for the walk of a repository; a
    /// registry without the API has fallback tags instead, which the walk reaches as
    /// tags, so this asks nothing of it.
    pub async fn api_referrers(
        &self,
        objects: &Objects,
        repo: &RepoName,
        digests: &[Digest],
    ) -> Result<Vec<Referrer>> {
        let Some(first) = digests.first() else {
            return Ok(Vec::new());
        };
        if !self.has_api(objects, repo, first).await? {
            return Ok(Vec::new());
        }
        let lists = bounded(digests.iter().map(|d| self.list(objects, repo, d))).await;
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
    /// `pushed` is told of the fallback tag when it was pushed.
    pub async fn add(
        &self,
        objects: &Objects,
        repo: &RepoName,
        (body, digest): (&[u8], &Digest),
        pushed: impl FnOnce(&Tag),
    ) -> Result<()> {
        let Some((subject, referrer)) = describe(body, digest) else {
            return Ok(());
        };
        if self.has_api(objects, repo, &subject).await? {
            self.forget(repo, &subject);
            return Ok(());
        }
        let change = |list: &mut Vec<Referrer>| {
            if list.iter().any(|r| r.digest == referrer.digest) {
                return false;
            }
            list.push(referrer);
            true
        };
        self.update_fallback(repo, &subject, change, pushed).await
    }

    /// After the delete of referrer `digest` of `subject`: it leaves the fallback index.
    /// (The old index stays in the registry, untagged, for its garbage collection:
    /// deleting it by digest could take another tag with the same bytes along.)
    pub async fn remove(
        &self,
        objects: &Objects,
        repo: &RepoName,
        (subject, digest): (&Digest, &Digest),
        pushed: impl FnOnce(&Tag),
    ) -> Result<()> {
        if self.has_api(objects, repo, subject).await? {
            self.forget(repo, subject);
            return Ok(());
        }
        let change = |list: &mut Vec<Referrer>| {
            let before = list.len();
            list.retain(|r| r.digest != *digest);
            list.len() != before
        };
        self.update_fallback(repo, subject, change, pushed).await
    }

    /// Reads the fallback index of `subject` afresh, applies `change`, and pushes the
    /// result if `change` says it changed anything (telling `pushed`).
    async fn update_fallback(
        &self,
        repo: &RepoName,
        subject: &Digest,
        change: impl FnOnce(&mut Vec<Referrer>) -> bool,
        pushed: impl FnOnce(&Tag),
    ) -> Result<()> {
        let Some(tag) = fallback_tag(subject) else {
            return Ok(());
        };
        let _one_at_a_time = self.fallback_updates.lock().await;
        let reference = Reference::Tag(tag.clone());
        let mut list = match self.client.get_manifest(repo, &reference).await {
            Ok(index) => parse_index(&index.bytes)
                .map_err(|e| Error::BadAnswer(format!("{repo}:{tag}: {e}")))?,
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        if !change(&mut list) {
            return Ok(());
        }
        self.client
            .put_manifest(repo, &reference, Bytes::from(index_bytes(&list)))
            .await?;
        info!(%repo, %subject, referrers = list.len(), "referrers tag {tag} updated");
        pushed(&tag);
        self.forget(repo, subject);
        Ok(())
    }
}

/// The referrers the fallback tag of `subject` lists (none if there is no tag).
async fn fallback_referrers(
    objects: &Objects,
    repo: &RepoName,
    subject: &Digest,
) -> Result<Vec<Referrer>> {
    let Some(tag) = fallback_tag(subject) else {
        return Ok(Vec::new());
    };
    match objects.tag_manifest(repo, &tag).await {
        Ok(index) => {
            parse_index(&index.bytes).map_err(|e| Error::BadAnswer(format!("{repo}:{tag}: {e}")))
        }
        Err(Error::NotFound(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
