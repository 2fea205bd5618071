//! Publishing shared indexes (`--publish-indexes`; docs/SEMANTICS.md, "Shared indexes"):
//! once the first look at an image has passed each of its gzip layers soci would index
//! (10 MiB and more), and a zTOC can describe each pass exactly, regfs pushes a SOCI v1
//! index of them as a referrer of the image manifest: the zTOCs and the empty config as
//! blobs, then the index manifest with the image as its subject (where the registry
//! lacks the referrers API, the fallback tag is updated as for any referrer pushed
//! through the mount). An image with an index already (a v1 referrer, or a v2 index it
//! names) gets none; a registry that refuses is told so once per repository, and not
//! asked again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::layers::Indexed;
use super::soci_found::annotations;
use crate::fs::view::RegistryView;
use crate::image::codec::Codec;
use crate::image::index::IndexSource;
use crate::image::manifest::Layer;
use crate::image::pass::checkpoint_spacing;
use crate::image::soci::artifact::{
    DEFAULT_MIN_LAYER_SIZE, EMPTY_CONFIG, SociIndex, ZtocRef, is_v1_referrer, v2_index_of,
};
use crate::image::soci::layer_index::{BUILD_TOOL, ztoc_of_index};
use crate::registry::{
    Descriptor, Digest, Error, FetchedManifest, Reference, RegistryClient, RepoName, Result,
};
use crate::stats::Stats;

/// Pushes the SOCI indexes of images this mount passed.
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    view: Arc<RegistryView>,
    /// Pushes go to the registry itself, never a mirror.
    client: RegistryClient,
    stats: Arc<Stats>,
    /// Image manifests considered (one try each per mount).
    tried: Mutex<HashSet<(RepoName, Digest)>>,
    /// Repositories whose registry refused a push.
    refused: Mutex<HashSet<RepoName>>,
}

impl Publisher {
    pub fn new(view: Arc<RegistryView>) -> Publisher {
        let client = view.client().origin_only();
        let stats = client.stats().clone();
        Publisher {
            inner: Arc::new(Inner {
                view,
                client,
                stats,
                tried: Mutex::default(),
                refused: Mutex::default(),
            }),
        }
    }

    /// After the first look at the image `manifest` (its `layers` indexed as
    /// `indexed`): publishes its index in the background if it should have one.
    pub fn consider(
        &self,
        repo: &RepoName,
        manifest: &Arc<FetchedManifest>,
        layers: &[Layer],
        indexed: &[Arc<Indexed>],
    ) {
        let wanted: Vec<(Layer, Arc<Indexed>)> = layers
            .iter()
            .zip(indexed)
            .filter(|(l, _)| {
                Codec::of_media_type(&l.media_type) == Some(Codec::Gzip)
                    && l.size >= DEFAULT_MIN_LAYER_SIZE
            })
            .map(|(l, i)| (l.clone(), i.clone()))
            .collect();
        let described = |i: &Indexed| {
            let index = i.content.index();
            index.source == IndexSource::Pass && index.publishable
        };
        if wanted.is_empty() || !wanted.iter().all(|(_, i)| described(i)) {
            return; // nothing soci would index, or a layer a zTOC cannot describe
        }
        let inner = &self.inner;
        let key = (repo.clone(), manifest.digest.clone());
        if inner.refused_in(repo) || !lock(&inner.tried).insert(key) {
            return;
        }
        let (inner, repo, manifest) = (inner.clone(), repo.clone(), manifest.clone());
        tokio::spawn(async move {
            match inner.publish(&repo, &manifest, wanted).await {
                Ok(()) => {}
                Err(e @ (Error::Denied(_) | Error::Refused(_))) => {
                    if lock(&inner.refused).insert(repo.clone()) {
                        warn!(%repo, "SOCI indexes are not published to this repository: the registry refused ({e})");
                    }
                }
                Err(e) => {
                    warn!(%repo, image = %manifest.digest, "SOCI index not published: {e}");
                }
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn refused_in(&self, repo: &RepoName) -> bool {
        lock(&self.refused).contains(repo)
    }

    async fn publish(
        &self,
        repo: &RepoName,
        manifest: &FetchedManifest,
        wanted: Vec<(Layer, Arc<Indexed>)>,
    ) -> Result<()> {
        if self.has_index(repo, manifest).await? {
            debug!(%repo, image = %manifest.digest, "has a SOCI index already");
            return Ok(());
        }
        let mut ztocs = Vec::with_capacity(wanted.len());
        for (layer, indexed) in wanted {
            let index = indexed.content.index().clone();
            let made = tokio::task::spawn_blocking(move || {
                let bytes = ztoc_of_index(&index)?;
                let plain = index.entries.iter().all(|e| e.xattrs.is_empty());
                Ok::<_, String>((bytes, plain))
            })
            .await
            .map_err(|e| Error::Unavailable(format!("zTOC task failed: {e}")))?;
            let (bytes, plain) = made
                .map_err(|e| Error::BadAnswer(format!("layer {}: no zTOC: {e}", layer.digest)))?;
            let descriptor = Descriptor {
                media_type: layer.media_type.clone(),
                digest: layer.digest.clone(),
                size: layer.size,
            };
            let mut ztoc = ZtocRef::for_layer(&descriptor, &bytes, checkpoint_spacing(layer.size));
            ztoc.disable_xattrs = plain;
            self.push_blob(repo, &ztoc.digest, Bytes::from(bytes))
                .await?;
            ztocs.push(ztoc);
        }
        let config = Digest::sha256_of(EMPTY_CONFIG);
        self.push_blob(repo, &config, Bytes::from_static(EMPTY_CONFIG))
            .await?;
        let subject = Descriptor {
            media_type: manifest.media_type.clone(),
            digest: manifest.digest.clone(),
            size: manifest.bytes.len() as u64,
        };
        let body = Bytes::from(SociIndex::v1(subject, ztocs, BUILD_TOOL).to_json());
        let digest = Digest::sha256_of(&body);
        let reference = Reference::Digest(digest.clone());
        self.client
            .put_manifest(repo, &reference, body.clone())
            .await?;
        self.view.add_referrer(repo, &body, &digest).await?;
        Stats::add(&self.stats.soci_indexes_published, 1);
        info!(%repo, image = %manifest.digest, index = %digest, "SOCI index published");
        Ok(())
    }

    /// Whether the image has an index: a v2 one it names, or any v1 referrer.
    async fn has_index(&self, repo: &RepoName, manifest: &FetchedManifest) -> Result<bool> {
        if v2_index_of(&annotations(&manifest.bytes)).is_some() {
            return Ok(true);
        }
        let referrers = self.view.referrers(repo, &manifest.digest).await?;
        Ok(referrers
            .iter()
            .any(|r| is_v1_referrer(r.artifact_type.as_deref().unwrap_or_default())))
    }

    /// Uploads a blob the repository does not have yet.
    async fn push_blob(&self, repo: &RepoName, digest: &Digest, bytes: Bytes) -> Result<()> {
        match self.client.head_blob(repo, digest).await {
            Ok(_) => return Ok(()),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let mut upload = self.client.start_upload(repo).await?;
        upload.append(&bytes).await?;
        upload.commit(Some(digest)).await?;
        Ok(())
    }
}
