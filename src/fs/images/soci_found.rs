//! Shared indexes of images (docs/SEMANTICS.md, "Shared indexes"): the SOCI index of
//! an image manifest, found once per manifest — a v2 index the manifest itself names
//! (`com.amazon.soci.index-digest`: the image's digest vouches for it), else the first
//! v1 index among the manifest's referrers whose subject is that manifest, as
//! soci-snapshotter picks it — and the indexes found to lie, remembered (in memory and
//! in the disk cache) and never used again.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::cache::Memo;
use crate::cache::disk::DiskCache;
use crate::fs::view::RegistryView;
use crate::image::soci::artifact::{SociIndex, ZtocRef, is_v1_referrer, v2_index_of};
use crate::registry::{Digest, FetchedManifest, RepoName, Result};
use crate::stats::Stats;

/// The disk cache's name for indexes found to lie (the entry holds why).
const REFUSED_KIND: &str = "soci-refused-v1";
/// Image manifests whose index (or lack of one) is kept.
const KEPT: usize = 4096;

/// The SOCI index of an image manifest.
pub struct FoundIndex {
    /// The index manifest's digest.
    pub digest: Digest,
    /// The image manifest names it (v2), so the image's digest vouches for it.
    pub vouched: bool,
    pub index: SociIndex,
}

/// A layer's zTOC, for the layer's indexing (layers.rs).
#[derive(Clone, Debug)]
pub struct ZtocHint {
    pub index: Digest,
    pub vouched: bool,
    pub ztoc: ZtocRef,
}

impl FoundIndex {
    /// What the index has for `layer`.
    pub fn hint(&self, layer: &Digest) -> Option<ZtocHint> {
        Some(ZtocHint {
            index: self.digest.clone(),
            vouched: self.vouched,
            ztoc: self.index.ztoc_for(layer)?.clone(),
        })
    }
}

/// The SOCI indexes of a mount: found per image manifest, and refused ones.
pub struct SociIndexes {
    view: Arc<RegistryView>,
    disk: Option<DiskCache>,
    stats: Arc<Stats>,
    found: Memo<(RepoName, Digest), Option<Arc<FoundIndex>>>,
    refused: Mutex<HashSet<Digest>>,
}

impl SociIndexes {
    pub fn new(view: Arc<RegistryView>, disk: Option<DiskCache>) -> SociIndexes {
        let stats = view.client().stats().clone();
        SociIndexes {
            view,
            disk,
            stats,
            found: Memo::new(KEPT, None),
            refused: Mutex::default(),
        }
    }

    /// The index of `image` in `repo`, if there is a usable one. Not finding one for
    /// want of an answer is not an error: the layers are read by a pass instead.
    pub async fn of_image(
        &self,
        repo: &RepoName,
        image: &FetchedManifest,
    ) -> Option<Arc<FoundIndex>> {
        let key = (repo.clone(), image.digest.clone());
        for _ in 0..2 {
            let found = match self
                .found
                .get_or_fetch(&key, || self.find(repo, image))
                .await
            {
                Ok(found) => found?,
                Err(e) => {
                    debug!(%repo, image = %image.digest, "no SOCI index looked up: {e}");
                    return None;
                }
            };
            if !self.is_refused(&found.digest).await {
                return Some(found);
            }
            // Refused since it was found: another referrer may do.
            self.found.forget(&key);
        }
        None
    }

    /// The v2 index the image names, else its first v1 index referrer.
    async fn find(
        &self,
        repo: &RepoName,
        image: &FetchedManifest,
    ) -> Result<Option<Arc<FoundIndex>>> {
        if let Some(digest) = v2_index_of(&annotations(&image.bytes)) {
            if let Some(found) = self.read(repo, &digest, true, &image.digest).await? {
                return Ok(Some(found));
            }
        }
        let referrers = self.view.referrers(repo, &image.digest).await?;
        let v1 = referrers
            .iter()
            .filter(|r| is_v1_referrer(r.artifact_type.as_deref().unwrap_or_default()));
        for referrer in v1 {
            if let Some(found) = self
                .read(repo, &referrer.digest, false, &image.digest)
                .await?
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The index `digest`, if it is one for the image manifest `image` (a v1 index must
    /// name it as its subject) and not refused before.
    async fn read(
        &self,
        repo: &RepoName,
        digest: &Digest,
        vouched: bool,
        image: &Digest,
    ) -> Result<Option<Arc<FoundIndex>>> {
        if self.is_refused(digest).await {
            return Ok(None);
        }
        let manifest = match self.view.manifest(repo, digest).await {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                warn!(%repo, index = %digest, "SOCI index not read: {e}");
                return Ok(None);
            }
        };
        let index = match SociIndex::parse(&manifest.bytes) {
            Ok(index) => index,
            Err(e) => {
                warn!(%repo, index = %digest, "not used: {e}");
                return Ok(None);
            }
        };
        if !vouched && index.subject.as_ref().is_none_or(|s| &s.digest != image) {
            debug!(%repo, index = %digest, "a SOCI index of another manifest");
            return Ok(None);
        }
        Stats::add(&self.stats.soci_indexes_found, 1);
        info!(%repo, %image, index = %digest, ztocs = index.ztocs.len(), vouched, "SOCI index found");
        Ok(Some(Arc::new(FoundIndex {
            digest: digest.clone(),
            vouched,
            index,
        })))
    }

    /// Whether the index `digest` was refused (by this mount, or one before it that
    /// shared the disk cache).
    pub async fn is_refused(&self, digest: &Digest) -> bool {
        if self.refused_now(digest) {
            return true;
        }
        let Some(disk) = &self.disk else {
            return false;
        };
        let on_disk = disk.get_meta(REFUSED_KIND, digest).await.is_some();
        if on_disk {
            self.lock().insert(digest.clone());
        }
        on_disk
    }

    fn refused_now(&self, digest: &Digest) -> bool {
        self.lock().contains(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Digest>> {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index `digest` lied (or a zTOC of it cannot be used): never used again.
    pub fn refuse(&self, digest: &Digest, why: &str) {
        if !self.lock().insert(digest.clone()) {
            return;
        }
        Stats::add(&self.stats.soci_indexes_refused, 1);
        if let Some(disk) = &self.disk {
            disk.put_meta(REFUSED_KIND, digest, Bytes::from(why.to_owned()));
        }
    }
}

/// The annotations of a manifest (none if it has none, or is not JSON).
pub(super) fn annotations(body: &[u8]) -> BTreeMap<String, String> {
    #[derive(Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    serde_json::from_slice::<Annotated>(body)
        .map(|a| a.annotations)
        .unwrap_or_default()
}
