//! What a file written under a repository becomes (docs/SEMANTICS.md, "Writes"): its
//! final name decides (a blob, a manifest by digest or by tag, an upload); a temp name
//! in a writable directory waits for the rename onto a final name.

use crate::fs::tree::node::{MANIFEST_JSON, Node};
use crate::registry::{Digest, Reference, RepoName};

/// What a file becomes once committed, decided by its final name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A blob; its content must hash to `expected` when the name is a digest.
    /// `upload_name` is set for `uploads/<name>`, which becomes a symlink to the blob.
    Blob {
        repo: RepoName,
        expected: Option<Digest>,
        upload_name: Option<String>,
    },
    Manifest {
        repo: RepoName,
        reference: Reference,
    },
}

impl Target {
    /// The target of a file at `node`, if a file there can be committed at all.
    pub fn of(node: &Node) -> Option<Target> {
        match node {
            Node::Blob(repo, digest) => Some(Target::Blob {
                repo: repo.clone(),
                expected: Some(digest.clone()),
                upload_name: None,
            }),
            Node::Upload(repo, name) => Some(Target::Blob {
                repo: repo.clone(),
                expected: Digest::parse(name),
                upload_name: Some(name.clone()),
            }),
            Node::Manifest(repo, digest) => Some(Target::Manifest {
                repo: repo.clone(),
                reference: Reference::Digest(digest.clone()),
            }),
            Node::TagManifest(repo, tag) => Some(Target::Manifest {
                repo: repo.clone(),
                reference: Reference::Tag(tag.clone()),
            }),
            _ => None,
        }
    }
}

/// The final node a name stands for in a writable directory, or None for a temp name
/// (a leading dot, or anything that is not a final name there).
pub fn final_node(dir: &Node, name: &str) -> Option<Node> {
    if name.starts_with('.') {
        return None;
    }
    match dir {
        Node::Blobs(repo) => Digest::parse(name).map(|d| Node::Blob(repo.clone(), d)),
        Node::Manifests(repo) => Digest::parse(name).map(|d| Node::Manifest(repo.clone(), d)),
        Node::TagDir(repo, tag) if name == MANIFEST_JSON => {
            Some(Node::TagManifest(repo.clone(), tag.clone()))
        }
        Node::Uploads(repo) if !name.contains('/') && !name.is_empty() => {
            Some(Node::Upload(repo.clone(), name.to_owned()))
        }
        _ => None,
    }
}

/// The node a file created as `name` in `dir` is: its final name there, or a temp file
/// in a directory that takes writes; None where nothing can be written.
pub fn writable_node(dir: &Node, name: &str) -> Option<Node> {
    final_node(dir, name).or_else(|| {
        let scratch = Node::Scratch(Box::new(dir.clone()), name.to_owned());
        destination(&scratch).is_some().then_some(scratch)
    })
}

/// The repository a file at `node` goes to, and whether it holds blob bytes (else a
/// manifest); None where nothing can be written.
pub fn destination(node: &Node) -> Option<(RepoName, bool)> {
    match node {
        Node::Scratch(dir, _) => match &**dir {
            Node::Blobs(r) | Node::Uploads(r) => Some((r.clone(), true)),
            Node::Manifests(r) | Node::TagDir(r, _) => Some((r.clone(), false)),
            _ => None,
        },
        other => match Target::of(other)? {
            Target::Blob { repo, .. } => Some((repo, true)),
            Target::Manifest { repo, .. } => Some((repo, false)),
        },
    }
}

/// The name of a file node within its directory.
pub fn node_name(node: &Node) -> String {
    match node {
        Node::Blob(_, d) | Node::Manifest(_, d) => d.to_string(),
        Node::TagManifest(..) => MANIFEST_JSON.to_owned(),
        Node::Upload(_, name) | Node::UploadLink(_, name) | Node::Scratch(_, name) => name.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Tag;

    fn repo() -> RepoName {
        RepoName::parse("team/app").expect("valid")
    }

    #[test]
    fn final_names_and_temp_names() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            final_node(&Node::Blobs(repo()), d.as_str()),
            Some(Node::Blob(repo(), d.clone()))
        );
        assert_eq!(final_node(&Node::Blobs(repo()), "notadigest"), None);
        let rsync_temp = format!(".{d}.Ab12Cd");
        assert_eq!(final_node(&Node::Blobs(repo()), &rsync_temp), None);
        assert_eq!(
            final_node(&Node::Uploads(repo()), "layer.tar"),
            Some(Node::Upload(repo(), "layer.tar".into()))
        );
        assert_eq!(final_node(&Node::Uploads(repo()), ".layer.tar.XyZ"), None);
        let tag = Tag::parse("v1").expect("valid");
        assert_eq!(
            final_node(&Node::TagDir(repo(), tag.clone()), MANIFEST_JSON),
            Some(Node::TagManifest(repo(), tag.clone()))
        );
        assert_eq!(final_node(&Node::TagDir(repo(), tag), "other.json"), None);
    }

    #[test]
    fn targets() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            Target::of(&Node::Upload(repo(), d.to_string())),
            Some(Target::Blob {
                repo: repo(),
                expected: Some(d.clone()),
                upload_name: Some(d.to_string()),
            })
        );
        assert_eq!(
            Target::of(&Node::Upload(repo(), "layer.tar".into())),
            Some(Target::Blob {
                repo: repo(),
                expected: None,
                upload_name: Some("layer.tar".into()),
            })
        );
        assert!(Target::of(&Node::Blobs(repo())).is_none());
    }
}
