//! The tree's overlay (docs/SEMANTICS.md, "Writes"): what this mount shows that the
//! registry does not hold. Directories made with `mkdir` (until the first push makes
//! them real), tag directories left empty, the `uploads/` links, and the blobs pushed
//! through the mount (the registry cannot list a repository's blobs).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::fs::errno::Errno;
use crate::registry::{Digest, RepoName, Tag};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
pub struct Overlay {
    /// `uploads/<name>` committed in this mount → the blob it became.
    links: Mutex<HashMap<(RepoName, String), Digest>>,
    /// Blobs pushed into a repository through this mount (uploads, `blobs/<digest>`,
    /// `ln`): the registry cannot list a repository's blobs, so these are listed in
    /// `blobs/` from here.
    pushed_blobs: Mutex<HashSet<(RepoName, Digest)>>,
    /// Blobs deleted through this mount (`rm blobs/<digest>`) and not pushed since: no
    /// longer listed, whatever `uploads/` link still names them (docs/SEMANTICS.md,
    /// "Deletes").
    deleted_blobs: Mutex<HashSet<(RepoName, Digest)>>,
    /// Repository (and namespace) paths made with mkdir, not yet pushed to.
    dirs: Mutex<BTreeSet<String>>,
    tag_dirs: Mutex<HashSet<(RepoName, Tag)>>,
}

impl Overlay {
    /// What `uploads/<name>` became, if it was committed in this mount.
    pub fn link(&self, repo: &RepoName, name: &str) -> Option<Digest> {
        lock(&self.links)
            .get(&(repo.clone(), name.to_owned()))
            .cloned()
    }

    /// Names blob `digest` of `repo` as `uploads/<name>` (a commit of that name, or a
    /// restored backup recreating the link).
    pub fn add_link(&self, repo: &RepoName, name: &str, digest: Digest) {
        lock(&self.deleted_blobs).remove(&(repo.clone(), digest.clone()));
        lock(&self.links).insert((repo.clone(), name.to_owned()), digest);
    }

    /// Forgets `uploads/<name>`; the blob it named stays.
    pub fn remove_link(&self, repo: &RepoName, name: &str) {
        lock(&self.links).remove(&(repo.clone(), name.to_owned()));
    }

    pub fn links_in(&self, repo: &RepoName) -> Vec<String> {
        lock(&self.links)
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// The blobs pushed into `repo` through this mount, and those its `uploads/` links
    /// point at: listed in `blobs/` too, so that a backup of the repository holds what
    /// was put there and what its links point at. Not those deleted since.
    pub fn linked_blobs(&self, repo: &RepoName) -> Vec<Digest> {
        let deleted = lock(&self.deleted_blobs);
        let mut blobs: Vec<Digest> = lock(&self.links)
            .iter()
            .filter(|((r, _), d)| r == repo && !deleted.contains(&(r.clone(), (*d).clone())))
            .map(|(_, d)| d.clone())
            .collect();
        blobs.extend(
            lock(&self.pushed_blobs)
                .iter()
                .filter(|(r, _)| r == repo)
                .map(|(_, d)| d.clone()),
        );
        blobs
    }

    pub fn blob_pushed(&self, repo: &RepoName, digest: &Digest) {
        lock(&self.deleted_blobs).remove(&(repo.clone(), digest.clone()));
        lock(&self.pushed_blobs).insert((repo.clone(), digest.clone()));
    }

    /// `rm blobs/<digest>` deleted the blob from the registry: `blobs/` stops listing it.
    pub fn blob_deleted(&self, repo: &RepoName, digest: &Digest) {
        lock(&self.pushed_blobs).remove(&(repo.clone(), digest.clone()));
        lock(&self.deleted_blobs).insert((repo.clone(), digest.clone()));
    }

    pub fn has_dir(&self, path: &str) -> bool {
        lock(&self.dirs).contains(path)
    }

    /// Names of the directories made with mkdir right below `path`.
    pub fn dirs_below(&self, path: &str) -> Vec<String> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        lock(&self.dirs)
            .iter()
            .filter_map(|d| d.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('/').next())
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Records a repository (or namespace) directory made with mkdir. Every leading
    /// path is recorded too, so `mkdir -p a/b/c` shows `a` and `a/b`.
    pub fn make_dir(&self, path: &str) {
        let mut dirs = lock(&self.dirs);
        let mut end = 0;
        for part in path.split('/') {
            end += part.len();
            dirs.insert(path[..end].to_owned());
            end += 1;
        }
    }

    /// Removes a directory made with mkdir; ENOTEMPTY while it has one below it.
    pub fn remove_dir(&self, path: &str) -> Result<(), Errno> {
        if !self.dirs_below(path).is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        lock(&self.dirs).remove(path);
        Ok(())
    }

    pub fn has_tag_dir(&self, repo: &RepoName, tag: &Tag) -> bool {
        lock(&self.tag_dirs).contains(&(repo.clone(), tag.clone()))
    }

    pub fn tag_dirs_in(&self, repo: &RepoName) -> Vec<Tag> {
        lock(&self.tag_dirs)
            .iter()
            .filter(|(r, _)| r == repo)
            .map(|(_, t)| t.clone())
            .collect()
    }

    pub fn make_tag_dir(&self, repo: &RepoName, tag: &Tag) {
        lock(&self.tag_dirs).insert((repo.clone(), tag.clone()));
    }

    pub fn remove_tag_dir(&self, repo: &RepoName, tag: &Tag) {
        lock(&self.tag_dirs).remove(&(repo.clone(), tag.clone()));
    }

    /// A manifest was pushed into `repo` (by `tag`, if any): the tag's directory and
    /// the repository's mkdir'd path are real now, no longer needed here.
    pub fn manifest_pushed(&self, repo: &RepoName, tag: Option<&Tag>) {
        if let Some(tag) = tag {
            self.remove_tag_dir(repo, tag);
        }
        let mut dirs = lock(&self.dirs);
        let path = repo.as_str();
        dirs.retain(|d| !(path == d || path.starts_with(&format!("{d}/"))));
    }
}
