//! Deleting from the registry (docs/SEMANTICS.md, "Deletes"), behind `--allow-delete`: what `rm` of each
//! path deletes, and the rule that a delete never takes more than it names.
//!
//! - `rm tags/<tag>/manifest.json` untags: `DELETE /v2/<name>/manifests/<tag>` where
//!   the registry supports it. Where it does not (distribution 2.8 answers 400), the
//!   only way is to delete the manifest by digest, which also removes every tag naming
//!   it: that is done only when no other tag reaches the digest, else EBUSY.
//! - `rm manifests/<digest>` deletes a manifest, and with it the tags that name it
//!   (the registry drops them; on such a registry that is the only way to remove two
//!   tags of one manifest). EBUSY while an index a tag reaches names it: that index
//!   would name a missing child.
//! - `rm blobs/<digest>` unlinks a blob no tagged image uses (EBUSY otherwise).
//!
//! "Reaches" is the walk of `manifests/`: tags, then index children. A manifest with a
//! `subject` is reached by its subject's referrers fallback tag too; that one does not
//! hold it (oras-go deletes such a manifest and updates the index, and so do we).
//! A refusal by the registry (405 where deleting is disabled) is EPERM, its text
//! logged.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::fs::errno::{Errno, fail};
use crate::fs::tree::node::Node;
use crate::fs::view::{RegistryView, bounded};
use crate::registry::referrers::{fallback_tag, subject_of};
use crate::registry::{Digest, Error, ManifestLinks, Reference, RegistryClient, RepoName, Tag};

/// Index levels followed below a tag (as the walk of `manifests/` does).
const MAX_DEPTH: usize = 8;

/// What `rm` of a path asks the registry to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    Untag(RepoName, Tag),
    Manifest(RepoName, Digest),
    Blob(RepoName, Digest),
}

impl Deletion {
    /// The deletion `rm` of `node` means, if any.
    pub fn of(node: &Node) -> Option<Deletion> {
        match node {
            Node::TagManifest(r, t) => Some(Deletion::Untag(r.clone(), t.clone())),
            Node::Manifest(r, d) => Some(Deletion::Manifest(r.clone(), d.clone())),
            Node::Blob(r, d) => Some(Deletion::Blob(r.clone(), d.clone())),
            _ => None,
        }
    }
}

/// An object that tags may reach.
#[derive(Clone, Copy)]
enum Target<'a> {
    Manifest(&'a Digest),
    Blob(&'a Digest),
}

/// What a tag names now: a HEAD's digest and size.
type Resolved = Result<(Digest, u64), Error>;

/// How a tag reaches an object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The tag names it.
    Tag,
    /// Through the manifests the tag names (an index's child, an image's blob).
    Contents,
}

pub struct Deletes {
    client: RegistryClient,
    view: Arc<RegistryView>,
}

impl Deletes {
    pub fn new(client: RegistryClient, view: Arc<RegistryView>) -> Deletes {
        Deletes { client, view }
    }

    /// Deletes what `rm` of `node` names; `node` is only for log lines.
    pub async fn delete(&self, node: &Node, what: &Deletion) -> Result<(), Errno> {
        match what {
            Deletion::Untag(repo, tag) => self.untag(node, repo, tag).await,
            Deletion::Manifest(repo, digest) => self.delete_manifest(node, repo, digest).await,
            Deletion::Blob(repo, digest) => {
                let holders = self.holders(repo, Target::Blob(digest), &[]).await;
                refuse_if_held(node, holders.map_err(|e| fail(node, e))?)?;
                let result = self.client.delete_blob(repo, digest).await;
                self.view.deleted(repo, None, Some(digest));
                result.map_err(|e| fail(node, e))
            }
        }
    }

    async fn untag(&self, node: &Node, repo: &RepoName, tag: &Tag) -> Result<(), Errno> {
        match self
            .client
            .delete_manifest(repo, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(()) => {
                self.view.deleted(repo, Some(tag), None);
                return Ok(());
            }
            Err(Error::NotPermitted(msg)) => {
                debug!(path = %node, "the registry does not delete by tag ({msg}); by digest if no other tag needs it")
            }
            Err(e) => return Err(fail(node, e)),
        }
        let (digest, _) = self
            .client
            .head_manifest(repo, &Reference::Tag(tag.clone()))
            .await
            .map_err(|e| fail(node, e))?;
        let holders = self
            .holders(repo, Target::Manifest(&digest), std::slice::from_ref(tag))
            .await
            .map_err(|e| fail(node, e))?;
        if !holders.is_empty() {
            warn!(
                path = %node, %digest,
                "not untagged: this registry can only untag by deleting the manifest, and {} also reach it (rm manifests/{digest} deletes it with all its tags)",
                names(&holders)
            );
            return Err(Errno::EBUSY);
        }
        let result = self
            .client
            .delete_manifest(repo, &Reference::Digest(digest.clone()))
            .await;
        self.view.deleted(repo, Some(tag), Some(&digest));
        result.map_err(|e| fail(node, e))
    }

    async fn delete_manifest(
        &self,
        node: &Node,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), Errno> {
        let manifest = self
            .view
            .manifest(repo, digest)
            .await
            .map_err(|e| fail(node, e))?;
        let subject = subject_of(&manifest.bytes);
        // Its subject's fallback index names it, and is updated below instead.
        let exempt: Vec<Tag> = subject.iter().filter_map(fallback_tag).collect();
        let holders = self
            .holders(repo, Target::Manifest(digest), &exempt)
            .await
            .map_err(|e| fail(node, e))?;
        let (tags, through): (Vec<_>, Vec<_>) =
            holders.into_iter().partition(|(_, via)| *via == Via::Tag);
        refuse_if_held(node, through)?;
        if !tags.is_empty() {
            info!(path = %node, "deleting it removes its tags too: {}", names(&tags));
        }
        let result = self
            .client
            .delete_manifest(repo, &Reference::Digest(digest.clone()))
            .await;
        self.view.deleted(repo, None, Some(digest));
        result.map_err(|e| fail(node, e))?;
        if let Some(subject) = subject {
            if let Err(e) = self.view.remove_referrer(repo, &subject, digest).await {
                warn!(path = %node, %subject, "deleted, but its subject's referrers index still names it: {e}");
            }
        }
        Ok(())
    }

    /// The tags (other than `exempt`) whose manifests reach `target`, as they are now:
    /// tags are resolved afresh (HEAD), not from the memo.
    async fn holders(
        &self,
        repo: &RepoName,
        target: Target<'_>,
        exempt: &[Tag],
    ) -> Result<Vec<(Tag, Via)>, Error> {
        let tags = match self.client.tags(repo).await {
            Ok(tags) => tags,
            Err(Error::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let resolved: Vec<(Tag, Resolved)> = bounded(
            tags.into_iter()
                .filter(|t| !exempt.contains(t))
                .map(|tag| async move {
                    let head = self
                        .client
                        .head_manifest(repo, &Reference::Tag(tag.clone()))
                        .await;
                    (tag, head)
                }),
        )
        .await;
        let mut holders = Vec::new();
        for (tag, head) in resolved {
            let digest = match head {
                Ok((digest, _)) => digest,
                // Untagged meanwhile.
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if let Some(via) = self.reaches(repo, digest, target).await? {
                holders.push((tag, via));
            }
        }
        holders.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(holders)
    }

    /// Whether (and how) the manifest `from`, named by a tag, is `target` or leads to it.
    async fn reaches(
        &self,
        repo: &RepoName,
        from: Digest,
        target: Target<'_>,
    ) -> Result<Option<Via>, Error> {
        if matches!(target, Target::Manifest(t) if *t == from) {
            return Ok(Some(Via::Tag));
        }
        let mut seen = HashSet::new();
        let mut level = vec![from];
        for _ in 0..=MAX_DEPTH {
            let mut next = Vec::new();
            for digest in level {
                if matches!(target, Target::Manifest(t) if *t == digest) {
                    return Ok(Some(Via::Contents));
                }
                if !seen.insert(digest.clone()) {
                    continue;
                }
                let manifest = match self.view.manifest(repo, &digest).await {
                    Ok(m) => m,
                    Err(Error::NotFound(_) | Error::BadAnswer(_)) => continue,
                    Err(e) => return Err(e),
                };
                match ManifestLinks::parse(&manifest.bytes, &manifest.media_type) {
                    Ok(ManifestLinks::Image { blobs }) => {
                        if matches!(target, Target::Blob(t) if blobs.iter().any(|b| b.digest == *t))
                        {
                            return Ok(Some(Via::Contents));
                        }
                    }
                    Ok(ManifestLinks::Index { manifests }) => {
                        next.extend(manifests.into_iter().map(|d| d.digest));
                    }
                    Err(e) => debug!(%repo, %digest, "not a manifest regfs can read: {e}"),
                }
            }
            if next.is_empty() {
                return Ok(None);
            }
            level = next;
        }
        info!(%repo, "indexes nest deeper than {MAX_DEPTH} levels; not followed further");
        Ok(None)
    }
}

/// EBUSY, and a log line naming them, when tags reach what was to be deleted.
fn refuse_if_held(node: &Node, holders: Vec<(Tag, Via)>) -> Result<(), Errno> {
    if holders.is_empty() {
        return Ok(());
    }
    warn!(path = %node, "not deleted: {} still reach it (delete those first)", names(&holders));
    Err(Errno::EBUSY)
}

/// "tag a, tag b" for a log line.
fn names(holders: &[(Tag, Via)]) -> String {
    let names: Vec<String> = holders.iter().map(|(t, _)| format!("tag {t}")).collect();
    names.join(", ")
}
