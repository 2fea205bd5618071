//! What regfs knows of the registry: its lists (lists.rs), its objects (objects.rs),
//! what each repository's tags reach (reachable.rs) and the referrers of manifests
//! (referrers.rs), fetched on demand and cached (tags for `--tag-ttl`,
//! content-addressed answers for as long as the LRU keeps them). Every part of the
//! tree asks here; a push or a delete through the mount tells it what to forget.

use std::sync::Arc;
use std::time::Duration;

use super::known_repos::KnownRepos;
use super::lists::Lists;
use super::objects::Objects;
use super::reachable::{REACHABLE_MEMO_BYTES, Reachable, Walk, weigh_reachable};
use super::referrers::Referrers;
use crate::cache::{DiskCache, Memo};
use crate::registry::referrers::Referrer;
use crate::registry::{Digest, Error, FetchedManifest, RegistryClient, RepoName, Result, Tag};

pub struct RegistryView {
    client: RegistryClient,
    lists: Lists,
    objects: Objects,
    reachable: Memo<RepoName, Arc<Reachable>>,
    /// Referrers lists, and whether the registry has the referrers API.
    referrers: Referrers,
}

impl RegistryView {
    pub fn new(
        client: RegistryClient,
        repos: Vec<RepoName>,
        tag_ttl: Duration,
        disk: Option<DiskCache>,
    ) -> RegistryView {
        RegistryView {
            lists: Lists::new(client.clone(), repos, tag_ttl),
            objects: Objects::new(client.clone(), tag_ttl, disk),
            // A registry that did not answer is not asked again at once.
            reachable: Memo::new(1024, Some(tag_ttl))
                .keeping_failures(Error::is_transient)
                .weighing(weigh_reachable, REACHABLE_MEMO_BYTES),
            referrers: Referrers::new(client.clone(), tag_ttl),
            client,
        }
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// Every repository name regfs knows of, and whether that list is the registry's
    /// whole catalog (so a name missing from it does not exist).
    pub async fn known_repos(&self) -> Result<KnownRepos> {
        self.lists.known_repos().await
    }

    /// The same after a name was missing: the catalog asked for again (at most once a
    /// second), as it may predate a push.
    pub async fn known_repos_after_miss(&self) -> Result<KnownRepos> {
        self.lists.known_repos_after_miss().await
    }

    /// Asks the registry whether `repo` exists (its tag list answers), and remembers it.
    pub async fn probe_repo(&self, repo: &RepoName) -> Result<bool> {
        self.lists.probe_repo(repo).await
    }

    pub async fn tags(&self, repo: &RepoName) -> Result<Arc<Vec<Tag>>> {
        self.lists.tags(repo).await
    }

    /// `repo`'s tag list if it is known and fresh; never asks.
    pub fn tags_known(&self, repo: &RepoName) -> Option<Arc<Vec<Tag>>> {
        self.lists.tags_known(repo)
    }

    /// The manifest a tag points at now (as of at most `--tag-ttl` ago).
    pub async fn tag_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<FetchedManifest>> {
        self.objects.tag_manifest(repo, tag).await
    }

    pub async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Arc<FetchedManifest>> {
        self.objects.manifest(repo, digest).await
    }

    /// The exact size of a manifest by digest: from the walk if it has been done,
    /// else by fetching it (manifests are small, and reading it is what comes next).
    pub async fn manifest_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        if let Some(size) = self
            .reachable
            .peek(repo)
            .and_then(|r| r.manifests.get(digest).copied())
        {
            return Ok(size);
        }
        Ok(self.manifest(repo, digest).await?.bytes.len() as u64)
    }

    /// The exact size of a blob: from a descriptor if the walk has seen it, else HEAD.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        if let Some(size) = self
            .reachable
            .peek(repo)
            .and_then(|r| r.blobs.get(digest).copied())
        {
            return Ok(size);
        }
        self.objects.blob_size(repo, digest).await
    }

    /// Forgets what a push through regfs changed in `repo`: its tags (and the one
    /// pushed), what they reach, and whether the repository exists.
    pub fn pushed(&self, repo: &RepoName, tag: Option<&Tag>) {
        self.lists.found(repo);
        self.lists.forget_tags(repo);
        self.reachable.forget(repo);
        if let Some(tag) = tag {
            self.objects.forget_tag(repo, tag);
        }
    }

    /// Forgets what a delete through regfs changed in `repo`: its tags (and the one
    /// untagged), what they reach, and what is known of the deleted digest.
    pub fn deleted(&self, repo: &RepoName, tag: Option<&Tag>, digest: Option<&Digest>) {
        self.lists.forget_tags(repo);
        self.reachable.forget(repo);
        if let Some(tag) = tag {
            self.objects.forget_tag(repo, tag);
        }
        if let Some(digest) = digest {
            self.objects.forget_digest(repo, digest);
        }
    }

    /// What `repo`'s tags reach, if the walk has been done and is fresh; never walks.
    pub fn reachable_known(&self, repo: &RepoName) -> Option<Arc<Reachable>> {
        self.reachable.peek(repo)
    }

    pub async fn reachable(&self, repo: &RepoName) -> Result<Arc<Reachable>> {
        let walk = Walk {
            lists: &self.lists,
            objects: &self.objects,
            referrers: &self.referrers,
        };
        self.reachable
            .get_or_fetch(repo, || async { walk.run(repo).await.map(Arc::new) })
            .await
    }

    /// The referrers of `subject` in `repo`, as of at most `--tag-ttl` ago.
    pub async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Arc<Vec<Referrer>>> {
        self.referrers.list(&self.objects, repo, subject).await
    }

    /// After a push of manifest `body` (`digest`) into `repo`: one with a `subject` is
    /// added to its subject's fallback index where the registry lacks the API.
    pub async fn add_referrer(&self, repo: &RepoName, body: &[u8], digest: &Digest) -> Result<()> {
        let pushed = |tag: &Tag| self.pushed(repo, Some(tag));
        self.referrers
            .add(&self.objects, repo, (body, digest), pushed)
            .await
    }

    /// After the delete of referrer `digest` of `subject`: it leaves the fallback index.
    pub async fn remove_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: &Digest,
    ) -> Result<()> {
        let pushed = |tag: &Tag| self.pushed(repo, Some(tag));
        self.referrers
            .remove(&self.objects, repo, (subject, digest), pushed)
            .await
    }
}
