//! What regfs knows of the registry's names: repositories, tags, manifests and the
//! objects reachable from them, fetched on demand and cached (tags for `--tag-ttl`,
//! content-addressed answers for as long as the LRU keeps them).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tracing::{info, warn};

use crate::cache::{DiskCache, Memo};
use crate::fs::view::known_repos::KnownRepos;
use crate::fs::view::referrers::ReferrersState;
use crate::registry::{
    Digest, Error, FetchedManifest, ManifestLinks, Reference, RegistryClient, RepoName, Result, Tag,
};

/// Requests in flight at once when walking a repository's manifests.
const WALK_CONCURRENCY: usize = 8;
/// A repository that reaches more manifests than this is not walked further.
const MAX_REACHABLE_MANIFESTS: usize = 100_000;
/// The most bytes the memos of manifests (by tag, and by digest) hold each, and of tag
/// lists and walks: metadata is bounded by bytes, not by count, so a repository of
/// 50,000 tags or large indexes cannot take the daemon's memory.
const MANIFEST_MEMO_BYTES: usize = 16 << 20;
const TAG_LIST_MEMO_BYTES: usize = 8 << 20;
const REACHABLE_MEMO_BYTES: usize = 8 << 20;
/// Roughly what an entry costs besides its own bytes (key, slot, map node).
const ENTRY_OVERHEAD: usize = 128;

/// Indexes nested deeper than this below a tag are not walked further: real images
/// nest one or two levels (an index of platform manifests, their referrers), and a
/// hostile registry must not be able to send the walk down an endless chain.
const MAX_INDEX_DEPTH: usize = 8;

#[derive(Clone, Debug)]
pub enum Catalog {
    Listed(Arc<BTreeSet<RepoName>>),
    /// The registry refuses `/v2/_catalog` (401/403/404): only names given with `--repo`
    /// or found by lookup are known, and lookups of other names must ask the registry.
    Refused,
}

/// Manifests and blobs reachable from a repository's tags, with their exact sizes.
#[derive(Debug, Default)]
pub struct Reachable {
    pub manifests: BTreeMap<Digest, u64>,
    pub blobs: BTreeMap<Digest, u64>,
}

pub struct RegistryView {
    client: RegistryClient,
    /// Repositories named with `--repo`, plus those found by lookups.
    extra_repos: Mutex<Arc<BTreeSet<RepoName>>>,
    catalog: Memo<(), Catalog>,
    tags: Memo<RepoName, Arc<Vec<Tag>>>,
    tag_manifests: Memo<(RepoName, Tag), Arc<FetchedManifest>>,
    manifests: Memo<(RepoName, Digest), Arc<FetchedManifest>>,
    blob_sizes: Memo<(RepoName, Digest), u64>,
    reachable: Memo<RepoName, Arc<Reachable>>,
    /// Manifests by digest are kept on disk too (checked against the digest on read).
    disk: Option<DiskCache>,
    /// Referrers lists, and whether the registry has the referrers API (referrers.rs).
    pub(crate) referrers: ReferrersState,
}

impl RegistryView {
    pub fn new(
        client: RegistryClient,
        repos: Vec<RepoName>,
        tag_ttl: Duration,
        disk: Option<DiskCache>,
    ) -> RegistryView {
        let ttl = Some(tag_ttl);
        // A registry that did not answer is not asked again at once for the same
        // thing: the kernel retries a failed lookup once per waiting process.
        let unanswered = Error::is_transient;
        RegistryView {
            client,
            extra_repos: Mutex::new(Arc::new(repos.into_iter().collect())),
            catalog: Memo::new(1, ttl).keeping_failures(unanswered),
            tags: Memo::new(4096, ttl)
                .keeping_failures(unanswered)
                .weighing(weigh_tags, TAG_LIST_MEMO_BYTES),
            tag_manifests: Memo::new(65_536, ttl)
                .keeping_failures(unanswered)
                .weighing(weigh_manifest, MANIFEST_MEMO_BYTES),
            manifests: Memo::new(65_536, None)
                .keeping_failures(unanswered)
                .weighing(weigh_manifest, MANIFEST_MEMO_BYTES),
            blob_sizes: Memo::new(65_536, None).keeping_failures(unanswered),
            reachable: Memo::new(1024, ttl)
                .keeping_failures(unanswered)
                .weighing(weigh_reachable, REACHABLE_MEMO_BYTES),
            disk,
            referrers: ReferrersState::new(tag_ttl),
        }
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    pub async fn catalog(&self) -> Result<Catalog> {
        self.catalog
            .get_or_fetch(&(), || async {
                match self.client.catalog().await {
                    Ok(names) => Ok(Catalog::Listed(Arc::new(names.into_iter().collect()))),
                    Err(e @ (Error::Denied(_) | Error::NotFound(_))) => {
                        info!("the registry refuses its catalog ({e}); listing only --repo names and names looked up");
                        Ok(Catalog::Refused)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
    }

    /// Every repository name regfs knows of, and whether that list is the registry's
    /// whole catalog (so a name missing from it does not exist).
    pub async fn known_repos(&self) -> Result<KnownRepos> {
        let listed = match self.catalog().await? {
            Catalog::Listed(listed) => Some(listed),
            Catalog::Refused => None,
        };
        let found = self
            .extra_repos
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(KnownRepos::new(listed, found))
    }

    /// Remembers that `repo` exists (copy on write: readers hold the old set).
    fn found(&self, repo: &RepoName) {
        let mut found = self
            .extra_repos
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !found.contains(repo) {
            Arc::make_mut(&mut found).insert(repo.clone());
        }
    }

    /// Asks the registry whether `repo` exists (its tag list answers), and remembers it.
    pub async fn probe_repo(&self, repo: &RepoName) -> Result<bool> {
        match self.tags(repo).await {
            Ok(_) => {
                self.found(repo);
                Ok(true)
            }
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn tags(&self, repo: &RepoName) -> Result<Arc<Vec<Tag>>> {
        self.tags
            .get_or_fetch(repo, || async {
                self.client.tags(repo).await.map(Arc::new)
            })
            .await
    }

    /// The manifest a tag points at now (as of at most `--tag-ttl` ago).
    pub async fn tag_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<FetchedManifest>> {
        let key = (repo.clone(), tag.clone());
        self.tag_manifests
            .get_or_fetch(&key, || async {
                let reference = Reference::Tag(tag.clone());
                let fetched = Arc::new(self.client.get_manifest(repo, &reference).await?);
                self.keep_on_disk(&fetched);
                // Fetched by tag, it is also the manifest for its digest.
                self.manifests
                    .insert((repo.clone(), fetched.digest.clone()), fetched.clone());
                Ok(fetched)
            })
            .await
    }

    pub async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Arc<FetchedManifest>> {
        let key = (repo.clone(), digest.clone());
        self.manifests
            .get_or_fetch(&key, || async {
                let reference = Reference::Digest(digest.clone());
                let fetched = Arc::new(self.client.get_manifest(repo, &reference).await?);
                self.keep_on_disk(&fetched);
                Ok(fetched)
            })
            .await
    }

    fn keep_on_disk(&self, m: &FetchedManifest) {
        if let Some(disk) = &self.disk {
            disk.put_manifest(&m.digest, &m.media_type, &m.bytes);
        }
    }

    /// A child manifest of an index in `repo`: the registry has it (it accepted the
    /// index), so the disk's copy serves without asking; else as `manifest`.
    async fn index_child(&self, repo: &RepoName, digest: &Digest) -> Result<Arc<FetchedManifest>> {
        let key = (repo.clone(), digest.clone());
        if let Some(m) = self.manifests.peek(&key) {
            return Ok(m);
        }
        if let Some(disk) = &self.disk {
            if let Some((media_type, bytes)) = disk.manifest(digest).await {
                let fetched = Arc::new(FetchedManifest {
                    digest: digest.clone(),
                    media_type,
                    bytes,
                });
                self.manifests.insert(key, fetched.clone());
                return Ok(fetched);
            }
        }
        self.manifest(repo, digest).await
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
        let key = (repo.clone(), digest.clone());
        self.blob_sizes
            .get_or_fetch(&key, || self.client.head_blob(repo, digest))
            .await
    }

    /// Forgets what a push through regfs changed in `repo`: its tags (and the one
    /// pushed), what they reach, and whether the repository exists.
    pub fn pushed(&self, repo: &RepoName, tag: Option<&Tag>) {
        self.found(repo);
        self.tags.forget(repo);
        self.reachable.forget(repo);
        if let Some(tag) = tag {
            self.tag_manifests.forget(&(repo.clone(), tag.clone()));
        }
    }

    /// Forgets what a delete through regfs changed in `repo`: its tags (and the one
    /// untagged), what they reach, and what is known of the deleted digest.
    pub fn deleted(&self, repo: &RepoName, tag: Option<&Tag>, digest: Option<&Digest>) {
        self.tags.forget(repo);
        self.reachable.forget(repo);
        if let Some(tag) = tag {
            self.tag_manifests.forget(&(repo.clone(), tag.clone()));
        }
        if let Some(digest) = digest {
            let key = (repo.clone(), digest.clone());
            self.manifests.forget(&key);
            self.blob_sizes.forget(&key);
        }
    }

    /// What `repo`'s tags reach, if the walk has been done and is fresh; never walks.
    pub fn reachable_known(&self, repo: &RepoName) -> Option<Arc<Reachable>> {
        self.reachable.peek(repo)
    }

    pub async fn reachable(&self, repo: &RepoName) -> Result<Arc<Reachable>> {
        self.reachable
            .get_or_fetch(repo, || async { self.walk(repo).await.map(Arc::new) })
            .await
    }

    /// Walks tags → manifests → index children and referrers, collecting every manifest
    /// and blob. (Referrers come from the API where the registry has it; elsewhere
    /// their fallback indexes are tags, walked like any other.)
    /// A manifest that vanished or is malformed is skipped with a warning; a registry
    /// that fails is an error (a silently partial listing would mislead a backup).
    async fn walk(&self, repo: &RepoName) -> Result<Reachable> {
        let tags = match self.tags(repo).await {
            Ok(tags) => tags,
            Err(Error::NotFound(_)) => Arc::new(Vec::new()),
            Err(e) => return Err(e),
        };
        let top = bounded(tags.iter().map(|tag| self.tag_manifest(repo, tag))).await;
        let mut reach = Reachable::default();
        let mut pending = usable(repo, top)?;
        let mut depth = 0;
        while !pending.is_empty() {
            if depth > MAX_INDEX_DEPTH {
                warn!(%repo, "indexes nest deeper than {MAX_INDEX_DEPTH} levels; listing stops there");
                break;
            }
            depth += 1;
            let mut children = BTreeSet::new();
            let level: Vec<Digest> = pending
                .iter()
                .map(|m| m.digest.clone())
                .filter(|d| !reach.manifests.contains_key(d))
                .collect();
            children.extend(
                self.api_referrers(repo, &level)
                    .await?
                    .into_iter()
                    .map(|r| r.digest),
            );
            for manifest in pending.drain(..) {
                let size = manifest.bytes.len() as u64;
                if reach
                    .manifests
                    .insert(manifest.digest.clone(), size)
                    .is_some()
                {
                    continue;
                }
                match ManifestLinks::parse(&manifest.bytes, &manifest.media_type) {
                    Ok(ManifestLinks::Image { blobs }) => {
                        for blob in blobs {
                            reach.blobs.entry(blob.digest).or_insert(blob.size);
                        }
                    }
                    Ok(ManifestLinks::Index { manifests }) => {
                        children.extend(manifests.into_iter().map(|d| d.digest));
                    }
                    Err(e) => warn!(%repo, digest = %manifest.digest, "skipping manifest: {e}"),
                }
            }
            children.retain(|d| !reach.manifests.contains_key(d));
            if reach.manifests.len() + children.len() > MAX_REACHABLE_MANIFESTS {
                warn!(%repo, "more than {MAX_REACHABLE_MANIFESTS} manifests reachable; listing stops there");
                break;
            }
            let fetched =
                bounded(children.iter().map(|digest| self.index_child(repo, digest))).await;
            pending = usable(repo, fetched)?;
        }
        Ok(reach)
    }
}

fn weigh_manifest(m: &Arc<FetchedManifest>) -> usize {
    m.bytes.len() + m.media_type.len() + m.digest.as_str().len() + ENTRY_OVERHEAD
}

fn weigh_tags(tags: &Arc<Vec<Tag>>) -> usize {
    tags.iter()
        .map(|t| t.as_str().len() + std::mem::size_of::<Tag>())
        .sum::<usize>()
        + ENTRY_OVERHEAD
}

fn weigh_reachable(r: &Arc<Reachable>) -> usize {
    (r.manifests.len() + r.blobs.len()) * ENTRY_OVERHEAD + ENTRY_OVERHEAD
}

type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs the futures, at most WALK_CONCURRENCY at once, and gives their outputs (in the
/// order they finish). The futures are boxed so the compiler can see they are Send (a
/// known limit of its inference for closures in stream adapters).
pub(crate) async fn bounded<'a, T, F>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'a,
    T: 'a,
{
    let boxed: Vec<BoxedFuture<'a, T>> =
        futures.map(|f| Box::pin(f) as BoxedFuture<'a, T>).collect();
    stream::iter(boxed)
        .buffer_unordered(WALK_CONCURRENCY)
        .collect()
        .await
}

/// Keeps the manifests that were fetched; skips the ones that are gone or broken,
/// and fails on the first error that says the registry itself is in trouble.
fn usable(
    repo: &RepoName,
    results: Vec<Result<Arc<FetchedManifest>>>,
) -> Result<Vec<Arc<FetchedManifest>>> {
    let mut ok = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(m) => ok.push(m),
            Err(e @ (Error::NotFound(_) | Error::BadAnswer(_))) => {
                warn!(%repo, "skipping unreadable manifest: {e}")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ok)
}
