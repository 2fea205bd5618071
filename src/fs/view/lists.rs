//! The registry's lists: its catalog, the repository names known besides (`--repo`,
//! found by lookups), and each repository's tags, trusted for `--tag-ttl`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::info;

use super::bounds::ENTRY_OVERHEAD;
use super::known_repos::KnownRepos;
use crate::cache::Memo;
use crate::registry::{Error, RegistryClient, RepoName, Result, Tag};

/// How often a name missing from the catalog makes regfs ask for the catalog again: a
/// repository pushed since it was read shows at once, a typo does not cost a catalog
/// each time.
const CATALOG_AFTER_MISS: Duration = Duration::from_secs(1);

/// The most bytes the memo of tag lists holds: metadata is bounded by bytes, not by
/// count, so a repository of 50,000 tags cannot take the daemon's memory.
const TAG_LIST_MEMO_BYTES: usize = 8 << 20;

#[derive(Clone, Debug)]
pub enum Catalog {
    Listed(Arc<BTreeSet<RepoName>>),
    /// The registry refuses `/v2/_catalog` (401/403/404): only names given with `--repo`
    /// or found by lookup are known, and lookups of other names must ask the registry.
    Refused,
}

pub struct Lists {
    client: RegistryClient,
    /// Repositories named with `--repo`, plus those found by lookups.
    extra_repos: Mutex<Arc<BTreeSet<RepoName>>>,
    catalog: Memo<(), Catalog>,
    /// When a missing name last made the catalog be asked for again.
    catalog_after_miss: Mutex<Option<Instant>>,
    tags: Memo<RepoName, Arc<Vec<Tag>>>,
}

impl Lists {
    pub fn new(client: RegistryClient, repos: Vec<RepoName>, tag_ttl: Duration) -> Lists {
        let ttl = Some(tag_ttl);
        // A registry that did not answer is not asked again at once for the same
        // thing: the kernel retries a failed lookup once per waiting process.
        let unanswered = Error::is_transient;
        Lists {
            client,
            extra_repos: Mutex::new(Arc::new(repos.into_iter().collect())),
            catalog: Memo::new(1, ttl).keeping_failures(unanswered),
            catalog_after_miss: Mutex::new(None),
            tags: Memo::new(4096, ttl)
                .keeping_failures(unanswered)
                .weighing(weigh_tags, TAG_LIST_MEMO_BYTES),
        }
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

    /// [`Lists::known_repos`] after a name was missing from them: the catalog is asked
    /// for again (read while the mount started, it may predate a push), at most once
    /// per [`CATALOG_AFTER_MISS`].
    pub async fn known_repos_after_miss(&self) -> Result<KnownRepos> {
        let ask_again = {
            let mut last = self
                .catalog_after_miss
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|at| at.elapsed() >= CATALOG_AFTER_MISS);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if ask_again {
            self.catalog.forget(&());
        }
        self.known_repos().await
    }

    /// Remembers that `repo` exists (copy on write: readers hold the old set).
    pub fn found(&self, repo: &RepoName) {
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

    /// `repo`'s tag list if it is known and fresh; never asks.
    pub fn tags_known(&self, repo: &RepoName) -> Option<Arc<Vec<Tag>>> {
        self.tags.peek(repo)
    }

    /// Forgets `repo`'s tag list (a push or a delete changed it).
    pub fn forget_tags(&self, repo: &RepoName) {
        self.tags.forget(repo);
    }
}

fn weigh_tags(tags: &Arc<Vec<Tag>>) -> usize {
    tags.iter()
        .map(|t| t.as_str().len() + std::mem::size_of::<Tag>())
        .sum::<usize>()
        + ENTRY_OVERHEAD
}
