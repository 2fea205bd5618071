//! What a repository's tags reach: every manifest and blob, with their exact sizes,
//! found by walking tags → manifests → index children and referrers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tracing::warn;

use super::bounds::{ENTRY_OVERHEAD, bounded};
use super::lists::Lists;
use super::objects::Objects;
use super::referrers::Referrers;
use crate::registry::{Digest, Error, FetchedManifest, ManifestLinks, RepoName, Result};

/// A repository that reaches more manifests than this is not walked further.
const MAX_REACHABLE_MANIFESTS: usize = 100_000;
/// The most bytes the memo of walks holds (metadata is bounded by bytes, not count).
pub const REACHABLE_MEMO_BYTES: usize = 8 << 20;
/// Indexes nested deeper than this below a tag are not walked further: real images
/// nest one or two levels (an index of platform manifests, their referrers), and a
/// hostile registry must not be able to send the walk down an endless chain.
const MAX_INDEX_DEPTH: usize = 8;

/// Manifests and blobs reachable from a repository's tags, with their exact sizes.
#[derive(Debug, Default)]
pub struct Reachable {
    pub manifests: BTreeMap<Digest, u64>,
    pub blobs: BTreeMap<Digest, u64>,
}

/// What the walk reads from.
pub struct Walk<'a> {
    pub lists: &'a Lists,
    pub objects: &'a Objects,
    pub referrers: &'a Referrers,
}

impl Walk<'_> {
    /// Walks tags → manifests → index children and referrers, collecting every manifest
    /// and blob. (Referrers come from the API where the registry has it; elsewhere
    /// their fallback indexes are tags, walked like any other.)
    /// A manifest that vanished or is malformed is skipped with a warning; a registry
    /// that fails is an error (a silently partial listing would mislead a backup).
    pub async fn run(&self, repo: &RepoName) -> Result<Reachable> {
        let tags = match self.lists.tags(repo).await {
            Ok(tags) => tags,
            Err(Error::NotFound(_)) => Arc::new(Vec::new()),
            Err(e) => return Err(e),
        };
        let top = bounded(tags.iter().map(|tag| self.objects.tag_manifest(repo, tag))).await;
        let mut reach = Reachable::default();
        let mut pending = usable(repo, top)?;
        let mut depth = 0;
        while !pending.is_empty() {
            if depth > MAX_INDEX_DEPTH {
                warn!(%repo, "indexes nest deeper than {MAX_INDEX_DEPTH} levels; listing stops there");
                break;
            }
            depth += 1;
            let level: Vec<Digest> = pending
                .iter()
                .map(|m| m.digest.clone())
                .filter(|d| !reach.manifests.contains_key(d))
                .collect();
            let mut children: BTreeSet<Digest> = self
                .referrers
                .api_referrers(self.objects, repo, &level)
                .await?
                .into_iter()
                .map(|r| r.digest)
                .collect();
            record(repo, &mut reach, pending.drain(..), &mut children);
            children.retain(|d| !reach.manifests.contains_key(d));
            if reach.manifests.len() + children.len() > MAX_REACHABLE_MANIFESTS {
                warn!(%repo, "more than {MAX_REACHABLE_MANIFESTS} manifests reachable; listing stops there");
                break;
            }
            let fetched = bounded(
                children
                    .iter()
                    .map(|digest| self.objects.index_child(repo, digest)),
            )
            .await;
            pending = usable(repo, fetched)?;
        }
        Ok(reach)
    }
}

/// Records one level of manifests: their sizes and blobs into `reach`, the children
/// of indexes into `children`.
fn record(
    repo: &RepoName,
    reach: &mut Reachable,
    level: impl Iterator<Item = Arc<FetchedManifest>>,
    children: &mut BTreeSet<Digest>,
) {
    for manifest in level {
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
}

pub fn weigh_reachable(r: &Arc<Reachable>) -> usize {
    (r.manifests.len() + r.blobs.len()) * ENTRY_OVERHEAD + ENTRY_OVERHEAD
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
