//! Manifest pushes, and the indexes held until their children arrive
//! (docs/SEMANTICS.md, "Writes").
//!
//! Nothing is reported as done before the registry confirmed it, with one exception an
//! rsync restore needs: rsync writes `manifests/` in name order, so an index may arrive
//! before its child manifests. Such an index is held and pushed as soon as the children
//! have been pushed through this mount (`pending_manifests` in `/.regfs/stats` counts
//! what is still held). Held indexes are kept in the disk cache too: a later mount of
//! the same registry pushes them once their children are there.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tracing::{info, warn};

use super::overlay::Overlay;
use crate::cache::DiskCache;
use crate::cache::disk::HeldIndex;
use crate::fs::view::RegistryView;
use crate::registry::{Digest, Error, ManifestLinks, Reference, RegistryClient, RepoName};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An index held, and the children it still waits for.
struct Held {
    index: HeldIndex,
    /// The children not pushed yet.
    missing: HashSet<Digest>,
}

pub struct HeldIndexes {
    client: RegistryClient,
    view: Arc<RegistryView>,
    overlay: Arc<Overlay>,
    held: Mutex<Vec<Held>>,
    disk: Option<DiskCache>,
}

impl HeldIndexes {
    pub fn new(
        client: RegistryClient,
        view: Arc<RegistryView>,
        overlay: Arc<Overlay>,
        disk: Option<DiskCache>,
    ) -> HeldIndexes {
        HeldIndexes {
            client,
            view,
            overlay,
            held: Mutex::new(Vec::new()),
            disk,
        }
    }

    /// The body of a held manifest, so that `manifests/<digest>` shows what was written.
    pub fn held_manifest(&self, repo: &RepoName, digest: &Digest) -> Option<Bytes> {
        lock(&self.held)
            .iter()
            .find(|h| h.index.repo == *repo && digest.matches(&h.index.body))
            .map(|h| h.index.body.clone())
    }

    /// Pushes a manifest; an index whose child manifests are missing is held (see the
    /// module comment). Then retries what is held in the repository.
    pub async fn push(
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
                self.release(repo, digest).await;
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
                };
                if let Some(disk) = &self.disk {
                    disk.hold(&index);
                }
                self.hold(Held { index, missing });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn hold(&self, held: Held) {
        let mut all = lock(&self.held);
        all.push(held);
        self.count_held(all.len());
    }

    fn after_manifest_push(&self, repo: &RepoName, reference: &Reference) {
        let tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        self.view.pushed(repo, tag);
        self.overlay.manifest_pushed(repo, tag);
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

    /// The held indexes of `repo` that waited only for `digest`, taken out of the queue.
    fn ready_after(&self, repo: &RepoName, digest: &Digest) -> Vec<HeldIndex> {
        let mut held = lock(&self.held);
        for h in held.iter_mut().filter(|h| h.index.repo == *repo) {
            h.missing.remove(digest);
        }
        let ready = held
            .iter()
            .filter(|h| h.index.repo == *repo && h.missing.is_empty())
            .map(|h| h.index.clone())
            .collect();
        held.retain(|h| !(h.index.repo == *repo && h.missing.is_empty()));
        self.count_held(held.len());
        ready
    }

    /// Manifest `pushed` is in `repo` now: pushes the held indexes that were waiting
    /// only for it (and, in turn, those waiting for them). One the registry still
    /// refuses stays held, and is tried again after the next push into `repo`.
    async fn release(&self, repo: &RepoName, pushed: Digest) {
        let mut refused = Vec::new();
        let mut arrived = vec![pushed];
        while let Some(digest) = arrived.pop() {
            for index in self.ready_after(repo, &digest) {
                let reference = &index.reference;
                match self
                    .client
                    .put_manifest(repo, reference, index.body.clone())
                    .await
                {
                    Ok(digest) => {
                        info!(%repo, %reference, "held index pushed: its children arrived");
                        if let Some(disk) = &self.disk {
                            disk.unhold(&index);
                        }
                        self.after_manifest_push(repo, reference);
                        arrived.push(digest);
                    }
                    Err(e) => {
                        warn!(%repo, %reference, "held index still refused: {e}");
                        refused.push(Held {
                            index,
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

    /// Takes up the indexes an earlier mount of this registry held: pushes those whose
    /// children are there now, and holds the others again.
    pub async fn resume(&self) {
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
                        self.release(repo, digest).await;
                        continue;
                    }
                    Err(e) => {
                        warn!(%repo, %reference, "an index an earlier mount held is still refused: {e}")
                    }
                }
            } else {
                info!(%repo, %reference, missing = missing.len(), "an index an earlier mount held still waits for its child manifests");
            }
            self.hold(Held {
                index: kept,
                missing,
            });
        }
    }

    fn count_held(&self, n: usize) {
        self.client
            .stats()
            .pending_manifests
            .store(n as u64, Ordering::Relaxed);
    }
}

impl Drop for HeldIndexes {
    fn drop(&mut self) {
        for held in lock(&self.held).iter() {
            let (repo, reference) = (&held.index.repo, &held.index.reference);
            if self.disk.is_some() {
                warn!(
                    %repo, %reference,
                    "unmounted while an index still waited for its child manifests: kept in the disk cache, the next mount of this registry pushes it"
                );
            } else {
                tracing::error!(
                    %repo, %reference,
                    "unmounted while an index still waited for its child manifests: it was not pushed"
                );
            }
        }
    }
}
