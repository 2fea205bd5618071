//! The reference model: what the tree of one run's namespace should be, by
//! docs/SEMANTICS.md ("The tree", "Writes", "Deletes"), in plain Rust and nothing of regfs.

use std::collections::{BTreeMap, BTreeSet};

use crate::common::sha256_digest;

/// What `ls` of a repository shows (its hidden directories open by name only).
pub const REPO_DIRS: [&str; 4] = ["blobs", "manifests", "tags", "uploads"];

pub type Res<T> = Result<T, i32>;

/// One repository the registry holds.
#[derive(Clone, Debug, Default)]
pub struct RepoModel {
    /// tag → manifest bytes (images only: the model pushes no indexes)
    pub tags: BTreeMap<String, Vec<u8>>,
    /// digest → bytes, of every blob the registry holds in this repository
    pub contents: BTreeMap<String, Vec<u8>>,
    /// Blobs pushed into it through this mount (uploads, `ln`): listed in `blobs/` even
    /// when no tag reaches them.
    pub pushed: BTreeSet<String>,
    /// uploads/<name> → the digest it links to
    pub links: BTreeMap<String, String>,
    /// uploads/<name> of temp files written and closed, waiting for a rename: size
    pub temps: BTreeMap<String, u64>,
    /// tags/<tag> made with mkdir and not pushed to, or left by an untag (empty)
    pub tag_dirs: BTreeSet<String>,
}

impl RepoModel {
    /// digest → bytes, of the manifests its tags name.
    pub fn manifests(&self) -> BTreeMap<String, Vec<u8>> {
        self.tags
            .values()
            .map(|m| (sha256_digest(m), m.clone()))
            .collect()
    }

    /// The blobs (config and layers) the manifests of its tags name.
    pub fn reached_blobs(&self) -> BTreeSet<String> {
        self.tags.values().flat_map(|m| blobs_of(m)).collect()
    }

    /// digest → bytes, of what `blobs/` lists: what tags reach, what was pushed through
    /// the mount and what `uploads/` links name, as far as the registry holds them
    /// (a deleted blob is not listed, whatever named it).
    pub fn blobs(&self) -> BTreeMap<String, Vec<u8>> {
        let named: BTreeSet<String> = self
            .reached_blobs()
            .into_iter()
            .chain(self.pushed.iter().cloned())
            .chain(self.links.values().cloned())
            .collect();
        named
            .into_iter()
            .filter_map(|d| Some((d.clone(), self.contents.get(&d)?.clone())))
            .collect()
    }
}

/// The config and layer digests of an image manifest.
fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let layers = json["layers"].as_array().cloned().unwrap_or_default();
    std::iter::once(&json["config"])
        .chain(layers.iter())
        .filter_map(|d| d["digest"].as_str().map(String::from))
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File(Vec<u8>),
    /// A file being written: only its size is known.
    Written(u64),
    Link(String),
}

#[derive(Clone, Debug)]
pub struct Model {
    /// The namespace of this run: `<ns>/app`, `<ns>/db`, and what mkdir makes.
    pub ns: String,
    /// The repositories the registry holds, by their path below `ns` (`app`, `new0/sub1`).
    pub repos: BTreeMap<String, RepoModel>,
    /// Paths below `ns` made with mkdir, and every path leading to them (`mkdir -p a/b`
    /// makes `a` and `a/b`), until a manifest is pushed into that path or below it.
    /// One with nothing made below it is a repository to be; one with something below
    /// is a namespace.
    pub made: BTreeSet<String>,
}

impl Model {
    pub fn new(ns: &str) -> Model {
        Model {
            ns: ns.to_owned(),
            repos: BTreeMap::new(),
            made: BTreeSet::new(),
        }
    }

    /// Whether the directory at `rel` (below `ns`) is a repository.
    fn is_repo(&self, rel: &str) -> bool {
        let below = format!("{rel}/");
        self.repos.contains_key(rel)
            || (self.made.contains(rel) && !self.made.iter().any(|m| m.starts_with(&below)))
    }

    /// Every directory path below `ns` that exists: repositories, what was made, and
    /// the namespaces leading to them.
    fn dir_paths(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for path in self.repos.keys().chain(self.made.iter()) {
            let mut end = 0;
            for part in path.split('/') {
                end += part.len();
                out.insert(path[..end].to_owned());
                end += 1;
            }
        }
        out
    }

    /// Whether anything (a repository, a namespace) is at `rel`: mkdir there is EEXIST.
    pub fn exists(&self, rel: &str) -> bool {
        self.dir_paths().contains(rel)
    }

    /// The repositories, for operations to pick from.
    pub fn repo_names(&self) -> Vec<String> {
        let dirs = self.dir_paths();
        dirs.into_iter().filter(|d| self.is_repo(d)).collect()
    }

    /// The names of the directories right below `rel` ("" for `ns` itself).
    fn children(&self, rel: &str) -> Vec<String> {
        let prefix = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        let dirs = self.dir_paths();
        dirs.iter()
            .filter_map(|d| d.strip_prefix(&prefix))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(String::from)
            .collect()
    }

    /// A path inside a repository's own directories: (the repository, the path's parts
    /// from `tags`/`manifests`/`blobs`/`uploads` on).
    fn locate<'a>(&'a self, rel: &'a str) -> Option<(&'a str, Vec<&'a str>)> {
        let parts: Vec<&str> = rel.split('/').collect();
        let at = parts.iter().position(|p| REPO_DIRS.contains(p))?;
        if at == 0 {
            return None;
        }
        let repo = &rel[..parts[..at].iter().map(|p| p.len() + 1).sum::<usize>() - 1];
        self.is_repo(repo).then(|| (repo, parts[at..].to_vec()))
    }

    /// Directories and their children's names, sorted (as `ls` shows them).
    pub fn list(&self, path: &str) -> Option<Vec<String>> {
        let rel = path.strip_prefix(&self.ns)?.trim_start_matches('/');
        let mut names = if rel.is_empty() || self.exists(rel) {
            let mut names = self.children(rel);
            if !rel.is_empty() && self.is_repo(rel) {
                names.extend(REPO_DIRS.map(String::from));
            }
            names
        } else {
            self.list_in_repo(rel)?
        };
        names.sort();
        names.dedup();
        Some(names)
    }

    fn list_in_repo(&self, rel: &str) -> Option<Vec<String>> {
        let (repo, parts) = self.locate(rel)?;
        let empty = RepoModel::default();
        let r = self.repos.get(repo).unwrap_or(&empty);
        Some(match parts.as_slice() {
            ["tags"] => r.tags.keys().chain(r.tag_dirs.iter()).cloned().collect(),
            ["manifests"] => r.manifests().into_keys().collect(),
            ["blobs"] => r.blobs().into_keys().collect(),
            ["uploads"] => r.links.keys().chain(r.temps.keys()).cloned().collect(),
            ["tags", tag] if r.tags.contains_key(*tag) => vec!["manifest.json".to_owned()],
            ["tags", tag] if r.tag_dirs.contains(*tag) => vec![],
            _ => return None,
        })
    }

    pub fn entry(&self, path: &str) -> Option<Entry> {
        if self.list(path).is_some() {
            return Some(Entry::Dir);
        }
        let rel = path.strip_prefix(&self.ns)?.trim_start_matches('/');
        let (repo, parts) = self.locate(rel)?;
        let r = self.repos.get(repo)?;
        match parts.as_slice() {
            ["tags", tag, "manifest.json"] => r.tags.get(*tag).cloned().map(Entry::File),
            ["manifests", d] => r.manifests().remove(*d).map(Entry::File),
            // Any blob the registry holds opens by name, listed or not.
            ["blobs", d] => r.contents.get(*d).cloned().map(Entry::File),
            ["uploads", name] => match (r.links.get(*name), r.temps.get(*name)) {
                (Some(d), _) => Some(Entry::Link(format!("../blobs/{d}"))),
                (None, Some(size)) => Some(Entry::Written(*size)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every file of the model (for reads and stats to pick from).
    pub fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, r) in &self.repos {
            let base = format!("{}/{name}", self.ns);
            out.extend(
                r.tags
                    .keys()
                    .map(|t| format!("{base}/tags/{t}/manifest.json")),
            );
            out.extend(
                r.manifests()
                    .keys()
                    .map(|d| format!("{base}/manifests/{d}")),
            );
            out.extend(r.blobs().keys().map(|d| format!("{base}/blobs/{d}")));
            out.extend(r.links.keys().map(|n| format!("{base}/uploads/{n}")));
        }
        out
    }

    pub fn dirs(&self) -> Vec<String> {
        let mut out = vec![self.ns.clone()];
        for rel in self.dir_paths() {
            let base = format!("{}/{rel}", self.ns);
            out.push(base.clone());
            if !self.is_repo(&rel) {
                continue;
            }
            out.extend(REPO_DIRS.map(|d| format!("{base}/{d}")));
            if let Some(r) = self.repos.get(&rel) {
                let tags = r.tags.keys().chain(r.tag_dirs.iter());
                out.extend(tags.map(|t| format!("{base}/tags/{t}")));
            }
        }
        out
    }

    /// `mkdir` (or `mkdir -p`) of `rel` and the paths leading to it.
    pub fn made_dir(&mut self, rel: &str) {
        let mut end = 0;
        for part in rel.split('/') {
            end += part.len();
            self.made.insert(rel[..end].to_owned());
            end += 1;
        }
    }

    /// A blob pushed into `repo` (made by mkdir, or existing), named `uploads/<link>`.
    pub fn pushed_blob(&mut self, repo: &str, link: Option<&str>, content: Vec<u8>) {
        let r = self.repos.entry(repo.to_owned()).or_default();
        let digest = sha256_digest(&content);
        if let Some(name) = link {
            r.links.insert(name.to_owned(), digest.clone());
        }
        r.pushed.insert(digest.clone());
        r.contents.insert(digest, content);
    }

    /// A manifest pushed as `repo:tag`: the repository is the registry's now, and what
    /// mkdir made on the way to it is no longer held.
    pub fn pushed_tag(&mut self, repo: &str, tag: &str, manifest: Vec<u8>) {
        let r = self.repos.entry(repo.to_owned()).or_default();
        r.tag_dirs.remove(tag);
        r.tags.insert(tag.to_owned(), manifest);
        self.made
            .retain(|d| !(repo == d || repo.starts_with(&format!("{d}/"))));
    }

    /// What `rm tags/<tag>/manifest.json` gives: the registry (distribution 2.8) can
    /// only untag by deleting the manifest, which would take the tags sharing it too.
    pub fn untag(&self, repo: &str, tag: &str) -> Res<()> {
        let r = &self.repos[repo];
        let digest = sha256_digest(&r.tags[tag]);
        let shared = r
            .tags
            .iter()
            .any(|(t, m)| t != tag && sha256_digest(m) == digest);
        if shared { Err(libc::EBUSY) } else { Ok(()) }
    }

    /// After an untag, the tag's directory stays, empty, until rmdir.
    pub fn untagged(&mut self, repo: &str, tag: &str) {
        let r = self.repos.get_mut(repo).expect("repository of the tag");
        r.tags.remove(tag);
        r.tag_dirs.insert(tag.to_owned());
    }

    /// `rm manifests/<digest>` deletes it with every tag naming it.
    pub fn deleted_manifest(&mut self, repo: &str, digest: &str) {
        let r = self
            .repos
            .get_mut(repo)
            .expect("repository of the manifest");
        r.tags.retain(|_, m| sha256_digest(m) != digest);
    }

    /// What `rm blobs/<digest>` gives: EBUSY while a tagged image uses it.
    pub fn delete_blob(&self, repo: &str, digest: &str) -> Res<()> {
        if self.repos[repo].reached_blobs().contains(digest) {
            Err(libc::EBUSY)
        } else {
            Ok(())
        }
    }

    pub fn deleted_blob(&mut self, repo: &str, digest: &str) {
        let r = self.repos.get_mut(repo).expect("repository of the blob");
        r.contents.remove(digest);
        r.pushed.remove(digest);
    }
}
