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

use crate::fs::tree::node::{self, Kind, Node, OCI};
use crate::fs::view::registry_view::{RegistryView, bounded};
use crate::fs::{Attr, Errno, fail};
use crate::registry::types::media_type;
use crate::registry::{Digest, Error, RepoName, Tag};

pub const OCI_LAYOUT: &str = "oci-layout";
pub const INDEX_JSON: &str = "index.json";
pub const BLOBS: &str = "blobs";
/// The layout's `oci-layout` file: the version of the layout format.
const LAYOUT_VERSION: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}\n";
/// The annotation that names a tag in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Digest algorithms a layout can hold a directory for.
const ALGORITHMS: [&str; 2] = ["sha256", "sha512"];

/// Where in `.oci/` a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OciPath {
    Root,
    Layout,
    Index,
    Blobs,
    /// `blobs/<alg>/`.
    Algorithm(&'static str),
    /// `blobs/<alg>/<hex>`: a manifest or a blob of the repository.
    Object(Digest, Object),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Object {
    Manifest,
    Blob,
}

impl OciPath {
    pub fn kind(&self) -> Kind {
        match self {
            OciPath::Root | OciPath::Blobs | OciPath::Algorithm(_) => Kind::Dir,
            OciPath::Layout | OciPath::Index | OciPath::Object(..) => Kind::File,
        }
    }

    pub fn parent(&self, repo: &RepoName) -> Node {
        let at = |p| Node::Oci(repo.clone(), p);
        match self {
            OciPath::Root => Node::Dir(repo.as_str().to_owned()),
            OciPath::Layout | OciPath::Index | OciPath::Blobs => at(OciPath::Root),
            OciPath::Algorithm(_) => at(OciPath::Blobs),
            OciPath::Object(d, _) => at(OciPath::Algorithm(algorithm(d))),
        }
    }

    /// The path below the repository, for log lines.
    pub fn show(&self) -> String {
        match self {
            OciPath::Root => OCI.to_owned(),
            OciPath::Layout => format!("{OCI}/{OCI_LAYOUT}"),
            OciPath::Index => format!("{OCI}/{INDEX_JSON}"),
            OciPath::Blobs => format!("{OCI}/{BLOBS}"),
            OciPath::Algorithm(a) => format!("{OCI}/{BLOBS}/{a}"),
            OciPath::Object(d, _) => format!("{OCI}/{BLOBS}/{}/{}", d.algorithm(), d.encoded()),
        }
    }
}

/// The directory name of a digest's algorithm (one of [`ALGORITHMS`]).
fn algorithm(d: &Digest) -> &'static str {
    ALGORITHMS
        .into_iter()
        .find(|a| *a == d.algorithm())
        .unwrap_or(ALGORITHMS[0])
}

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
pub async fn index_json(view: &RegistryView, repo: &RepoName) -> Result<Bytes, Errno> {
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

/// The bytes of a file of the layout made here (not a registry object).
pub async fn file_bytes(
    view: &RegistryView,
    repo: &RepoName,
    path: &OciPath,
) -> Result<Bytes, Errno> {
    match path {
        OciPath::Layout => Ok(Bytes::from_static(LAYOUT_VERSION)),
        OciPath::Index => index_json(view, repo).await,
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
            node::epoch(),
            0o444,
            crate::fs::IMMUTABLE_TTL,
        ),
        OciPath::Index => {
            let bytes = index_json(view, repo).await?;
            let mtime = node::content_mtime(&Digest::sha256_of(&bytes));
            Attr::plain(ino, Kind::File, bytes.len() as u64, mtime, 0o444, ttl)
        }
        _ => Attr::plain(ino, Kind::Dir, 0, node::epoch(), 0o555, ttl),
    })
}
