//! Fetches started by a listing, in the background: whoever lists a directory usually
//! reads into it next (`grep -r`, `rsync -a`), and over a distant link each step would
//! pay its round trips in turn. Bounded, so that a plain `ls` stays cheap.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tracing::debug;

use crate::fs::view::RegistryView;
use crate::registry::{RepoName, Tag};

/// Tag manifests fetched at once when a `tags/` directory is listed (people grep them next),
/// and the most tags of one listing warmed that way (a repository of 50,000 tags is
/// read on demand beyond them, not all fetched because someone typed `ls`).
const TAG_MANIFEST_WARMING: usize = 16;
const TAG_MANIFEST_WARMING_MAX: usize = 1024;
/// Repositories of one listed directory whose tag lists, and first tag manifests, are
/// fetched in the background, this many at once: `grep -r` and `rsync -a` walk into
/// them next, one after the other, and over a distant link each would pay its round
/// trips in turn. At most the first REPO_WARMING_MAX of a listing, with
/// REPO_TAG_WARMING_MAX tags each (a plain `ls` must stay cheap).
const REPO_WARMING: usize = 8;
pub const REPO_WARMING_MAX: usize = 64;
const REPO_TAG_WARMING_MAX: usize = 64;

/// Fetches the manifests of `tags` in the background, a few at a time: whoever
/// lists `tags/` usually reads the manifests next (`grep -r`), and then finds them
/// in the memo instead of paying one round trip per file.
pub fn warm_tag_manifests(view: &Arc<RegistryView>, repo: &RepoName, tags: &Arc<Vec<Tag>>) {
    let (view, repo, tags) = (view.clone(), repo.clone(), tags.clone());
    tokio::spawn(
        async move { warm_manifests(&view, &repo, &tags, TAG_MANIFEST_WARMING_MAX).await },
    );
}

/// Fetches the tag lists of `repos` in the background, then their first tag
/// manifests (see [`REPO_WARMING`]).
pub fn warm_repos(view: &Arc<RegistryView>, repos: Vec<RepoName>) {
    if repos.is_empty() {
        return;
    }
    let view = view.clone();
    tokio::spawn(async move {
        stream::iter(repos)
            .for_each_concurrent(REPO_WARMING, |repo| {
                let view = &view;
                async move {
                    match view.tags(&repo).await {
                        Ok(tags) => warm_manifests(view, &repo, &tags, REPO_TAG_WARMING_MAX).await,
                        Err(e) => debug!(%repo, "warming the tag list failed: {e}"),
                    }
                }
            })
            .await;
    });
}

/// The manifests of the first `most` of `tags`, a few at a time, into the view's memo.
async fn warm_manifests(view: &RegistryView, repo: &RepoName, tags: &[Tag], most: usize) {
    stream::iter(tags.iter().take(most))
        .for_each_concurrent(TAG_MANIFEST_WARMING, |tag| async move {
            if let Err(e) = view.tag_manifest(repo, tag).await {
                debug!(%repo, %tag, "warming the manifest failed: {e}");
            }
        })
        .await;
}
