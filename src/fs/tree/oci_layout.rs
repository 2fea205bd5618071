//! `<repo>/.oci/`: the repository as a read-only OCI image layout (image-spec
//! `image-layout.md`), so that every OCI tool (`skopeo oci:`, `umoci`, `crane`,
//! `oras --oci-layout`) reads a registry with no download step:
//!
//! ```text
//! .oci/oci-layout               {"imageLayoutVersion":"1.0.0"}
//! .oci/index.json               one descriptor per tag (org.opencontainers.image.ref.name)
//! .oci/blobs/sha256/<hex>       manifests and blobs, regular files of their exact size
//! ```
//!
//! A file under `blobs/` is the same object as `manifests/<digest>` or `blobs/<digest>`
//! under another name ([`object`]): it is read through the same block cache, disk cache,
//! digest check and passthrough. `blobs/<alg>/` lists what `manifests/` and `blobs/`
//! list, so `cp -a .oci/ dir/` makes a complete layout.
//!
//! Writing a layout through the mount is not offered: a layout says which of its blobs
//! are manifests only in `index.json`, which writers (skopeo) write last and whole, so
//! every manifest would have to be uploaded as a blob and pushed again from the
//! registry at that point, and a tag missing from the new `index.json` would mean a
//! delete. Push with `skopeo copy oci:DIR:TAG docker://…`, or rsync into `tags/`,
//! `manifests/` and `blobs/`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tracing::debug;

use crate::fs::attr::{self, Attr, IMMUTABLE_TTL, Kind};
use crate::fs::errno::{Errno, fail};
use crate::fs::tree::node::{
    ALGORITHMS, Node, OCI_BLOBS as BLOBS, OCI_INDEX_JSON as INDEX_JSON, OCI_LAYOUT, Object, OciPath,
};
use crate::fs::tree::open_file::Opening;
use crate::fs::view::{RegistryView, bounded};
use crate::registry::types::media_type;
use crate::registry::{Digest, Error, RepoName, Tag};

/// The layout's `oci-layout` file: the version of the layout format.
const LAYOUT_VERSION: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}\n";
/// The annotation that names a tag in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The registry object a layout file is, under its usual name.
pub fn object(node: &Node) -> Option<Node> {
    match node {
        Node::Oci(repo, OciPath::Object(d, Object::Manifest)) => {
            Some(Node::Manifest(repo.clone(), d.clone()))
        }
        Node::Oci(repo, OciPath::Object(d, Object::Blob)) => {
            Some(Node::Blob(repo.clone(), d.clone()))
        }
        _ => None,
    }
}

/// The node called `name` in `.oci` directory `path`.
pub async fn child(
    view: &RegistryView,
    repo: &RepoName,
    path: &OciPath,
    name: &str,
) -> Result<Node, Errno> {
    let at = |p| Node::Oci(repo.clone(), p);
    let found = match (path, name) {
        (OciPath::Root, OCI_LAYOUT) => OciPath::Layout,
        (OciPath::Root, INDEX_JSON) => OciPath::Index,
        (OciPath::Root, BLOBS) => OciPath::Blobs,
        (OciPath::Blobs, _) => OciPath::Algorithm(
            ALGORITHMS
                .into_iter()
                .find(|a| *a == name)
                .ok_or(Errno::ENOENT)?,
        ),
        (OciPath::Algorithm(alg), hex) => {
            let digest = Digest::parse(&format!("{alg}:{hex}")).ok_or(Errno::ENOENT)?;
            let kind = object_kind(view, repo, &digest)
                .await
                .map_err(|e| fail(&at(path.clone()), e))?
                .ok_or(Errno::ENOENT)?;
            OciPath::Object(digest, kind)
        }
        (OciPath::Layout | OciPath::Index | OciPath::Object(..), _) => {
            return Err(Errno::ENOTDIR);
        }
        _ => return Err(Errno::ENOENT),
    };
    Ok(at(found))
}

/// Whether `digest` is a manifest or a blob of `repo` (None: neither). What the walk
/// of the repository found, if it has been done; else a blob HEAD (what tools read
/// most: configs and layers), then the manifest. Either way the bytes are the same.
async fn object_kind(
    view: &RegistryView,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<Object>, Error> {
    if let Some(reach) = view.reachable_known(repo) {
        if reach.manifests.contains_key(digest) {
            return Ok(Some(Object::Manifest));
        }
        if reach.blobs.contains_key(digest) {
            return Ok(Some(Object::Blob));
        }
    }
    match view.blob_size(repo, digest).await {
        Ok(_) => return Ok(Some(Object::Blob)),
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    match view.manifest(repo, digest).await {
        Ok(_) => Ok(Some(Object::Manifest)),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The entries of `.oci` directory `path`.
pub async fn children(
    view: &RegistryView,
    repo: &RepoName,
    path: &OciPath,
) -> Result<Vec<(String, Node)>, Errno> {
    let at = |p| Node::Oci(repo.clone(), p);
    let out = match path {
        OciPath::Root => vec![
            (OCI_LAYOUT.to_owned(), at(OciPath::Layout)),
            (INDEX_JSON.to_owned(), at(OciPath::Index)),
            (BLOBS.to_owned(), at(OciPath::Blobs)),
        ],
        OciPath::Blobs => {
            let reach = view
                .reachable(repo)
                .await
                .map_err(|e| fail(&at(path.clone()), e))?;
            let used = |alg: &str| {
                reach
                    .manifests
                    .keys()
                    .chain(reach.blobs.keys())
                    .any(|d| d.algorithm() == alg)
            };
            ALGORITHMS
                .into_iter()
                .filter(|a| *a == ALGORITHMS[0] || used(a))
                .map(|a| (a.to_owned(), at(OciPath::Algorithm(a))))
                .collect()
        }
        OciPath::Algorithm(alg) => {
            let reach = view
                .reachable(repo)
                .await
                .map_err(|e| fail(&at(path.clone()), e))?;
            let manifests = reach.manifests.keys().map(|d| (d, Object::Manifest));
            let blobs = reach.blobs.keys().map(|d| (d, Object::Blob));
            manifests
                .chain(blobs)
                .filter(|(d, _)| d.algorithm() == *alg)
                .map(|(d, kind)| (d.encoded().to_owned(), at(OciPath::Object(d.clone(), kind))))
                .collect()
        }
        OciPath::Layout | OciPath::Index | OciPath::Object(..) => return Err(Errno::ENOTDIR),
    };
    Ok(out)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TagDescriptor<'a> {
    media_type: &'a str,
    digest: &'a Digest,
    size: u64,
    annotations: BTreeMap<&'static str, &'a str>,
}

/// `index.json`: one descriptor per tag whose manifest a layout can hold, by tag name.
async fn index_json(view: &RegistryView, repo: &RepoName) -> Result<Bytes, Errno> {
    let node = Node::Oci(repo.clone(), OciPath::Index);
    let tags = match view.tags(repo).await {
        Ok(tags) => tags,
        Err(Error::NotFound(_)) => Default::default(),
        Err(e) => return Err(fail(&node, e)),
    };
    let mut fetched: Vec<(Tag, _)> = bounded(
        tags.iter()
            .map(|tag| async move { (tag.clone(), view.tag_manifest(repo, tag).await) }),
    )
    .await;
    fetched.sort_by(|a, b| a.0.cmp(&b.0));
    let mut manifests = Vec::with_capacity(fetched.len());
    for (tag, result) in &fetched {
        let manifest = match result {
            Ok(m) => m,
            // Untagged since the list was fetched.
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(fail(&node, e.clone())),
        };
        let kind = manifest.media_type.split(';').next().unwrap_or("").trim();
        if !is_manifest_type(kind) {
            debug!(%repo, %tag, media_type = kind, "not in index.json: not a manifest type a layout holds");
            continue;
        }
        manifests.push(TagDescriptor {
            media_type: kind,
            digest: &manifest.digest,
            size: manifest.bytes.len() as u64,
            annotations: BTreeMap::from([(REF_NAME, tag.as_str())]),
        });
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": manifests,
    });
    let mut bytes = serde_json::to_vec_pretty(&index).map_err(|_| Errno::EIO)?;
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

fn is_manifest_type(t: &str) -> bool {
    [
        media_type::OCI_MANIFEST,
        media_type::OCI_INDEX,
        media_type::DOCKER_MANIFEST,
        media_type::DOCKER_MANIFEST_LIST,
    ]
    .contains(&t)
}

/// Opens a file of the layout made here (not a registry object: see [`object`]).
pub async fn open(view: &RegistryView, repo: &RepoName, path: &OciPath) -> Result<Opening, Errno> {
    match path {
        OciPath::Layout => Ok(Opening::bytes(Bytes::from_static(LAYOUT_VERSION), true)),
        OciPath::Index => Ok(Opening::bytes(index_json(view, repo).await?, false)),
        _ => Err(Errno::EISDIR),
    }
}

/// The attributes of a `.oci` node that is not a registry object (see [`object`]).
/// `ttl`: `--tag-ttl`, for what moves with the tags.
pub async fn attr(
    view: &RegistryView,
    repo: &RepoName,
    path: &OciPath,
    ino: u64,
    ttl: Duration,
) -> Result<Attr, Errno> {
    Ok(match path {
        OciPath::Layout => Attr::plain(
            ino,
            Kind::File,
            LAYOUT_VERSION.len() as u64,
            attr::epoch(),
            0o444,
            IMMUTABLE_TTL,
        ),
        OciPath::Index => {
            let bytes = index_json(view, repo).await?;
            let mtime = attr::content_mtime(&Digest::sha256_of(&bytes));
            Attr::plain(ino, Kind::File, bytes.len() as u64, mtime, 0o444, ttl)
        }
        _ => Attr::plain(ino, Kind::Dir, 0, attr::epoch(), 0o555, ttl),
    })
}
