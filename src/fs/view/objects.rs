//! The registry's objects as regfs asks for them: manifests by tag (for `--tag-ttl`)
//! and by digest (content-addressed, for as long as the LRU keeps them, and on disk),
//! and blob sizes: from the descriptors of the manifests fetched, else by HEAD.

use std::sync::Arc;
use std::time::Duration;

use super::bounds::ENTRY_OVERHEAD;
use crate::cache::{DiskCache, Memo};
use crate::registry::{
    Digest, Error, FetchedManifest, ManifestLinks, Reference, RegistryClient, RepoName, Result, Tag,
};

/// The most bytes the memos of manifests (by tag, and by digest) hold each: metadata is
/// bounded by bytes, not by count, so large indexes cannot take the daemon's memory.
const MANIFEST_MEMO_BYTES: usize = 16 << 20;

pub struct Objects {
    client: RegistryClient,
    tag_manifests: Memo<(RepoName, Tag), Arc<FetchedManifest>>,
    manifests: Memo<(RepoName, Digest), Arc<FetchedManifest>>,
    blob_sizes: Memo<(RepoName, Digest), u64>,
    /// Blob sizes the descriptors of the manifests fetched gave: a blob reached through
    /// a manifest read before needs no HEAD.
    described: Memo<(RepoName, Digest), u64>,
    /// Manifests by digest are kept on disk too (checked against the digest on read).
    disk: Option<DiskCache>,
}

impl Objects {
    pub fn new(client: RegistryClient, tag_ttl: Duration, disk: Option<DiskCache>) -> Objects {
        // A registry that did not answer is not asked again at once for the same
        // thing: the kernel retries a failed lookup once per waiting process.
        let unanswered = Error::is_transient;
        Objects {
            client,
            tag_manifests: Memo::new(65_536, Some(tag_ttl))
                .keeping_failures(unanswered)
                .weighing(weigh_manifest, MANIFEST_MEMO_BYTES),
            manifests: Memo::new(65_536, None)
                .keeping_failures(unanswered)
                .weighing(weigh_manifest, MANIFEST_MEMO_BYTES),
            blob_sizes: Memo::new(65_536, None).keeping_failures(unanswered),
            described: Memo::new(65_536, None),
            disk,
        }
    }

    /// The manifest a tag points at now (as of at most `--tag-ttl` ago).
    pub async fn tag_manifest(&self, repo: &RepoName, tag: &Tag) -> Result<Arc<FetchedManifest>> {
        let key = (repo.clone(), tag.clone());
        self.tag_manifests
            .get_or_fetch(&key, || async {
                let reference = Reference::Tag(tag.clone());
                let fetched = Arc::new(self.client.get_manifest(repo, &reference).await?);
                self.keep_on_disk(&fetched);
                self.note_sizes(repo, &fetched);
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
                self.note_sizes(repo, &fetched);
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
    pub async fn index_child(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<FetchedManifest>> {
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
                self.note_sizes(repo, &fetched);
                self.manifests.insert(key, fetched.clone());
                return Ok(fetched);
            }
        }
        self.manifest(repo, digest).await
    }

    /// Remembers the sizes of the blobs an image manifest of `repo` describes.
    fn note_sizes(&self, repo: &RepoName, m: &FetchedManifest) {
        if let Ok(ManifestLinks::Image { blobs }) = ManifestLinks::parse(&m.bytes, &m.media_type) {
            for blob in blobs {
                self.described
                    .insert((repo.clone(), blob.digest), blob.size);
            }
        }
    }

    /// The exact size of a blob: from a manifest's descriptor, else by HEAD
    /// (remembered).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let key = (repo.clone(), digest.clone());
        if let Some(size) = self.described.peek(&key) {
            return Ok(size);
        }
        self.blob_sizes
            .get_or_fetch(&key, || self.client.head_blob(repo, digest))
            .await
    }

    /// Forgets what tag `tag` of `repo` named (a push or a delete changed it).
    pub fn forget_tag(&self, repo: &RepoName, tag: &Tag) {
        self.tag_manifests.forget(&(repo.clone(), tag.clone()));
    }

    /// Forgets what is known of `digest` in `repo` (it was deleted).
    pub fn forget_digest(&self, repo: &RepoName, digest: &Digest) {
        let key = (repo.clone(), digest.clone());
        self.manifests.forget(&key);
        self.blob_sizes.forget(&key);
        self.described.forget(&key);
    }
}

fn weigh_manifest(m: &Arc<FetchedManifest>) -> usize {
    m.bytes.len() + m.media_type.len() + m.digest.as_str().len() + ENTRY_OVERHEAD
}
