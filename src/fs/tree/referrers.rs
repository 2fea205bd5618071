//! `<repo>/.referrers/<digest>/` (docs/SEMANTICS.md, "Referrers"): a symlink per
//! manifest whose `subject` is `<digest>` (to `../../manifests/<d>`), and `index.json`,
//! the referrers index as the API gives it, where each descriptor's `artifactType` and
//! `annotations` say what the referrer is. The lists come from the registry view
//! (view/referrers.rs).

use std::time::Duration;

use bytes::Bytes;

use crate::fs::attr::{self, Attr, Kind};
use crate::fs::errno::{Errno, fail};
use crate::fs::tree::node::{MANIFESTS, Node, REFERRERS_INDEX_JSON as INDEX_JSON, RefPath};
use crate::fs::tree::open_file::Opening;
use crate::fs::view::RegistryView;
use crate::registry::referrers::index_bytes;
use crate::registry::{Digest, RepoName};

/// The node called `name` in `.referrers` directory `path`.
pub async fn child(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
    name: &str,
) -> Result<Node, Errno> {
    let at = |p| Node::Referrers(repo.clone(), p);
    match path {
        RefPath::Root => Digest::parse(name)
            .map(|d| at(RefPath::Subject(d)))
            .ok_or(Errno::ENOENT),
        RefPath::Subject(s) if name == INDEX_JSON => Ok(at(RefPath::Index(s.clone()))),
        RefPath::Subject(s) => {
            let digest = Digest::parse(name).ok_or(Errno::ENOENT)?;
            let node = at(RefPath::Link(s.clone(), digest.clone()));
            let list = view.referrers(repo, s).await.map_err(|e| fail(&node, e))?;
            if list.iter().any(|r| r.digest == digest) {
                Ok(node)
            } else {
                Err(Errno::ENOENT)
            }
        }
        RefPath::Index(_) | RefPath::Link(..) => Err(Errno::ENOTDIR),
    }
}

/// The entries of `.referrers` directory `path`.
pub async fn children(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
) -> Result<Vec<(String, Node)>, Errno> {
    let at = |p| Node::Referrers(repo.clone(), p);
    match path {
        // Any digest opens; listing them all would mean asking about every manifest.
        RefPath::Root => Ok(Vec::new()),
        RefPath::Subject(s) => {
            let node = at(path.clone());
            let list = view.referrers(repo, s).await.map_err(|e| fail(&node, e))?;
            let mut out = vec![(INDEX_JSON.to_owned(), at(RefPath::Index(s.clone())))];
            out.extend(list.iter().map(|r| {
                (
                    r.digest.to_string(),
                    at(RefPath::Link(s.clone(), r.digest.clone())),
                )
            }));
            Ok(out)
        }
        RefPath::Index(_) | RefPath::Link(..) => Err(Errno::ENOTDIR),
    }
}

/// The bytes of `.referrers/<subject>/index.json`.
async fn index_json(
    view: &RegistryView,
    repo: &RepoName,
    subject: &Digest,
) -> Result<Bytes, Errno> {
    let node = Node::Referrers(repo.clone(), RefPath::Index(subject.clone()));
    let list = view
        .referrers(repo, subject)
        .await
        .map_err(|e| fail(&node, e))?;
    Ok(Bytes::from(index_bytes(&list)))
}

/// Opens `.referrers/<subject>/index.json`.
pub async fn open(view: &RegistryView, repo: &RepoName, path: &RefPath) -> Result<Opening, Errno> {
    match path {
        RefPath::Index(subject) => Ok(Opening::bytes(
            index_json(view, repo, subject).await?,
            false,
        )),
        _ => Err(Errno::EISDIR),
    }
}

/// Where `.referrers/<subject>/<digest>` points.
fn link_target(digest: &Digest) -> String {
    format!("../../{MANIFESTS}/{digest}")
}

/// The target of a `.referrers` symlink.
pub fn readlink(path: &RefPath) -> Result<Vec<u8>, Errno> {
    match path {
        RefPath::Link(_, digest) => Ok(link_target(digest).into_bytes()),
        _ => Err(Errno::EINVAL),
    }
}

/// The attributes of a `.referrers` node (`ttl`: the mount's `--tag-ttl`; lists change).
pub async fn attr(
    view: &RegistryView,
    repo: &RepoName,
    path: &RefPath,
    ino: u64,
    ttl: Duration,
) -> Result<Attr, Errno> {
    Ok(match path {
        RefPath::Root | RefPath::Subject(_) => {
            Attr::plain(ino, Kind::Dir, 0, attr::epoch(), 0o555, ttl)
        }
        RefPath::Index(s) => {
            let bytes = index_json(view, repo, s).await?;
            let mtime = attr::content_mtime(&Digest::sha256_of(&bytes));
            Attr::plain(ino, Kind::File, bytes.len() as u64, mtime, 0o444, ttl)
        }
        RefPath::Link(_, d) => {
            let size = link_target(d).len() as u64;
            Attr::plain(ino, Kind::Symlink, size, attr::content_mtime(d), 0o777, ttl)
        }
    })
}
