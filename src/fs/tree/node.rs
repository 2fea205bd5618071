//! What each path in the tree stands for (docs/SEMANTICS.md, "The tree"): [`Node`],
//! and the paths of each area below a repository ([`OciPath`], [`RefPath`],
//! [`ImagePath`]) or the root ([`StorePath`]), with the names they are made of.

use std::fmt;
use std::sync::Arc;

use crate::fs::attr::Kind;
use crate::registry::{Digest, Reference, RepoName, Tag};

/// The names of a repository's own directories. They shadow a child repository of the
/// same name (`a/tags` under `a`), which stays reachable through its full name nowhere
/// else; registries with such names are rare enough to accept that.
pub const TAGS: &str = "tags";
pub const MANIFESTS: &str = "manifests";
pub const BLOBS: &str = "blobs";
pub const UPLOADS: &str = "uploads";
pub const MANIFEST_JSON: &str = "manifest.json";
/// regfs's own directory at the root. A leading dot cannot start a repository name, so
/// it never hides one.
pub const CONTROL: &str = ".regfs";
pub const STATS: &str = "stats";
/// An image's files (docs/SEMANTICS.md, "Image contents"). They open by name and are
/// never listed, so `grep -r`, `find` and `rsync -a` of a repository see its objects
/// once, not every image unpacked again. A dot cannot start a repository name, so they
/// hide none.
pub const IMAGES: &str = ".images";
pub const LAYERS: &str = ".layers";
pub const ROOTFS: &str = "rootfs";
/// `.images/<digest>/layers/`: the image's layers as its manifest describes them.
pub const IMAGE_LAYERS: &str = "layers";
/// The layer store for containers/storage at the root (docs/SEMANTICS.md, "Container
/// runtimes"), opened by name only like `/.regfs`, and the names in a layer's
/// directory there (containers/storage's).
pub const LAYER_STORE: &str = ".layerstore";
pub const STORE_DIFF: &str = "diff";
pub const STORE_BLOB: &str = "blob";
pub const STORE_INFO: &str = "info";
/// The repository as an OCI image layout (oci_layout.rs), and the referrers of its
/// manifests (referrers.rs): opened by name only too.
pub const OCI: &str = ".oci";
pub const REFERRERS: &str = ".referrers";
/// Names inside `.oci/`.
pub const OCI_LAYOUT: &str = "oci-layout";
pub const OCI_INDEX_JSON: &str = "index.json";
pub const OCI_BLOBS: &str = "blobs";
/// The referrers index in `.referrers/<digest>/`.
pub const REFERRERS_INDEX_JSON: &str = "index.json";
/// Digest algorithms a layout can hold a directory for.
pub const ALGORITHMS: [&str; 2] = ["sha256", "sha512"];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The root (empty path) or a namespace and/or repository path such as `team/app`.
    Dir(String),
    Tags(RepoName),
    TagDir(RepoName, Tag),
    TagManifest(RepoName, Tag),
    Manifests(RepoName),
    Manifest(RepoName, Digest),
    Blobs(RepoName),
    Blob(RepoName, Digest),
    Uploads(RepoName),
    /// `uploads/<name>` while it is being written.
    Upload(RepoName, String),
    /// `uploads/<name>` once committed: a symlink to `../blobs/<digest>`. A node of its
    /// own, so the kernel sees a new inode rather than a file that turned into a link.
    UploadLink(RepoName, String),
    /// A temp file in a writable directory (rsync's `.name.XXXXXX`), waiting for the
    /// rename onto its final name.
    Scratch(Box<Node>, String),
    /// `/.regfs` and its files (control.rs).
    Control(ControlPath),
    /// `.images/`, `.layers/` and the files of images (images.rs).
    Image(ImagePath),
    /// Under `<repo>/.oci` (see oci_layout.rs).
    Oci(RepoName, OciPath),
    /// Under `<repo>/.referrers` (see referrers.rs).
    Referrers(RepoName, RefPath),
    /// Under `/.layerstore` (see layer_store.rs).
    Store(StorePath),
}

/// Where in `/.regfs` a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ControlPath {
    /// `/.regfs`, regfs's own files.
    Dir,
    /// `/.regfs/stats`: counters as JSON, made fresh at every open.
    Stats,
}

/// Where among a repository's image files a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ImagePath {
    /// `<repo>/.images`: image manifests by digest (not listed).
    ImagesDir(RepoName),
    /// `<repo>/.images/<digest>`: holds that image's `rootfs`.
    ImageDir(RepoName, Digest),
    /// `<repo>/.layers`: layers by digest (not listed).
    LayersDir(RepoName),
    /// `<repo>/.images/<digest>/layers`: that image's layers by digest (not listed).
    ImageLayers(RepoName, Digest),
    /// A file or directory of an image: node `id` of its tree, and its kind (fixed for
    /// a given root and id: trees are built the same way every time).
    Inside(Arc<ImageRoot>, u32, Kind),
}

/// The root of an image's files: where it is reached from and what it shows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRoot {
    pub repo: RepoName,
    pub of: RootOf,
    /// The generation of what it shows when it was looked up (images/generations.rs).
    pub generation: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RootOf {
    /// `tags/<tag>/rootfs`: the manifest (image or index) the tag named at lookup.
    Tag(Tag, Digest),
    /// `.images/<digest>/rootfs`.
    Image(Digest),
    /// `.layers/<digest>`.
    Layer(Digest),
    /// `.images/<manifest>/layers/<layer>`: a layer as that manifest describes it.
    ImageLayer(Digest, Digest),
    /// `/.layerstore/<ref>/<digest>/diff`: the same, reached through the layer store.
    StoreLayer(Arc<StoreLayer>),
}

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

/// Where in `/.layerstore` a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StorePath {
    /// `/.layerstore`: lists nothing, opens any image reference of this registry.
    Root,
    /// `/.layerstore/<base64 of an image reference>`.
    Image(Arc<StoreImage>),
    /// `/.layerstore/<ref>/<digest>`: a layer of that image, by blob or TOC digest.
    Layer(Arc<StoreLayer>),
    /// `<layer>/info`: the layer record containers/storage reads.
    Info(Arc<StoreLayer>),
    /// `<layer>/blob`: the layer blob (`blobs/<digest>` under another name).
    Blob(Arc<StoreLayer>),
}

/// An image reference of this registry, as the layer store is asked for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreImage {
    /// The directory's name as given (the reference in base64).
    pub name: String,
    pub repo: RepoName,
    pub reference: Reference,
}

/// A layer of an image in the layer store, found at lookup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreLayer {
    pub image: Arc<StoreImage>,
    /// The digest it was looked up by: its blob digest, or the digest of its TOC.
    pub name: Digest,
    /// The image manifest that lists it (for an index, the child that does), so that
    /// its descriptor and config come from there and nodes below are content-addressed.
    pub manifest: Digest,
    /// The layer blob's digest.
    pub layer: Digest,
}

impl StoreLayer {
    /// Whether it was looked up by the digest of its TOC.
    pub fn by_toc(&self) -> bool {
        self.name != self.layer
    }
}

/// Where in `.referrers/` a node is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RefPath {
    /// `.referrers` itself: lists nothing, opens any digest.
    Root,
    /// `.referrers/<subject>/`.
    Subject(Digest),
    /// `.referrers/<subject>/index.json`.
    Index(Digest),
    /// `.referrers/<subject>/<digest>`: a symlink to the referrer's manifest.
    Link(Digest, Digest),
}

impl Node {
    pub fn root() -> Node {
        Node::Dir(String::new())
    }

    pub fn kind(&self) -> Kind {
        match self {
            Node::TagManifest(..)
            | Node::Manifest(..)
            | Node::Blob(..)
            | Node::Upload(..)
            | Node::Scratch(..)
            | Node::Control(ControlPath::Stats) => Kind::File,
            Node::UploadLink(..) => Kind::Symlink,
            Node::Image(ImagePath::Inside(_, _, kind)) => *kind,
            Node::Oci(_, p) => p.kind(),
            Node::Referrers(_, p) => p.kind(),
            Node::Store(StorePath::Info(_) | StorePath::Blob(_)) => Kind::File,
            _ => Kind::Dir,
        }
    }

    /// Whether the node is in an area that is read-only whatever the mount: an image's
    /// files, `.oci/`, `.referrers/` and `/.layerstore`.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Node::Image(_) | Node::Oci(..) | Node::Referrers(..) | Node::Store(_)
        )
    }

    /// The directory that holds this node (the root is its own parent).
    pub fn parent(&self) -> Node {
        let repo_dir = |r: &RepoName| Node::Dir(r.as_str().to_owned());
        match self {
            Node::Dir(path) => Node::Dir(path.rsplit_once('/').map_or("", |(p, _)| p).to_owned()),
            Node::Tags(r) | Node::Manifests(r) | Node::Blobs(r) | Node::Uploads(r) => repo_dir(r),
            Node::TagDir(r, _) => Node::Tags(r.clone()),
            Node::TagManifest(r, t) => Node::TagDir(r.clone(), t.clone()),
            Node::Manifest(r, _) => Node::Manifests(r.clone()),
            Node::Blob(r, _) => Node::Blobs(r.clone()),
            Node::Upload(r, _) | Node::UploadLink(r, _) => Node::Uploads(r.clone()),
            Node::Scratch(dir, _) => (**dir).clone(),
            Node::Control(ControlPath::Dir) => Node::root(),
            Node::Control(ControlPath::Stats) => Node::Control(ControlPath::Dir),
            Node::Image(p) => p.parent(),
            Node::Oci(r, p) => p.parent(r),
            Node::Referrers(r, p) => p.parent(r),
            Node::Store(p) => p.parent(),
        }
    }
}

impl ImagePath {
    fn parent(&self) -> Node {
        let at = Node::Image;
        match self {
            ImagePath::ImagesDir(r) | ImagePath::LayersDir(r) => Node::Dir(r.as_str().to_owned()),
            ImagePath::ImageDir(r, _) => at(ImagePath::ImagesDir(r.clone())),
            ImagePath::ImageLayers(r, d) => at(ImagePath::ImageDir(r.clone(), d.clone())),
            // Only a root has its parent here; the image's tree knows the others'.
            ImagePath::Inside(root, _, _) => root.holder(),
        }
    }
}

impl RootOf {
    /// What the root shows: an image manifest (or index), or a layer blob.
    pub fn shows(&self) -> &Digest {
        match self {
            RootOf::Tag(_, d) | RootOf::Image(d) | RootOf::Layer(d) | RootOf::ImageLayer(_, d) => d,
            RootOf::StoreLayer(l) => &l.layer,
        }
    }
}

impl ImageRoot {
    /// The directory the root is in.
    pub fn holder(&self) -> Node {
        let repo = self.repo.clone();
        match &self.of {
            RootOf::Tag(t, _) => Node::TagDir(repo, t.clone()),
            RootOf::Image(d) => Node::Image(ImagePath::ImageDir(repo, d.clone())),
            RootOf::Layer(_) => Node::Image(ImagePath::LayersDir(repo)),
            RootOf::ImageLayer(m, _) => Node::Image(ImagePath::ImageLayers(repo, m.clone())),
            RootOf::StoreLayer(l) => Node::Store(StorePath::Layer(l.clone())),
        }
    }
}

impl StorePath {
    fn parent(&self) -> Node {
        let at = Node::Store;
        match self {
            StorePath::Root => Node::root(),
            StorePath::Image(_) => at(StorePath::Root),
            StorePath::Layer(l) => at(StorePath::Image(l.image.clone())),
            StorePath::Info(l) | StorePath::Blob(l) => at(StorePath::Layer(l.clone())),
        }
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layer = |l: &StoreLayer| format!("/{LAYER_STORE}/{}/{}", l.image.name, l.name);
        match self {
            StorePath::Root => write!(f, "/{LAYER_STORE}"),
            StorePath::Image(i) => write!(f, "/{LAYER_STORE}/{}", i.name),
            StorePath::Layer(l) => f.write_str(&layer(l)),
            StorePath::Info(l) => write!(f, "{}/{STORE_INFO}", layer(l)),
            StorePath::Blob(l) => write!(f, "{}/{STORE_BLOB}", layer(l)),
        }
    }
}

impl OciPath {
    pub fn kind(&self) -> Kind {
        match self {
            OciPath::Root | OciPath::Blobs | OciPath::Algorithm(_) => Kind::Dir,
            OciPath::Layout | OciPath::Index | OciPath::Object(..) => Kind::File,
        }
    }

    fn parent(&self, repo: &RepoName) -> Node {
        let at = |p| Node::Oci(repo.clone(), p);
        match self {
            OciPath::Root => Node::Dir(repo.as_str().to_owned()),
            OciPath::Layout | OciPath::Index | OciPath::Blobs => at(OciPath::Root),
            OciPath::Algorithm(_) => at(OciPath::Blobs),
            OciPath::Object(d, _) => at(OciPath::Algorithm(algorithm(d))),
        }
    }

    /// The path below the repository, for log lines.
    fn show(&self) -> String {
        match self {
            OciPath::Root => OCI.to_owned(),
            OciPath::Layout => format!("{OCI}/{OCI_LAYOUT}"),
            OciPath::Index => format!("{OCI}/{OCI_INDEX_JSON}"),
            OciPath::Blobs => format!("{OCI}/{OCI_BLOBS}"),
            OciPath::Algorithm(a) => format!("{OCI}/{OCI_BLOBS}/{a}"),
            OciPath::Object(d, _) => {
                format!("{OCI}/{OCI_BLOBS}/{}/{}", d.algorithm(), d.encoded())
            }
        }
    }
}

/// The directory name of a digest's algorithm (one of [`ALGORITHMS`]).
pub fn algorithm(d: &Digest) -> &'static str {
    ALGORITHMS
        .into_iter()
        .find(|a| *a == d.algorithm())
        .unwrap_or(ALGORITHMS[0])
}

impl RefPath {
    pub fn kind(&self) -> Kind {
        match self {
            RefPath::Root | RefPath::Subject(_) => Kind::Dir,
            RefPath::Index(_) => Kind::File,
            RefPath::Link(..) => Kind::Symlink,
        }
    }

    fn parent(&self, repo: &RepoName) -> Node {
        let at = |p| Node::Referrers(repo.clone(), p);
        match self {
            RefPath::Root => Node::Dir(repo.as_str().to_owned()),
            RefPath::Subject(_) => at(RefPath::Root),
            RefPath::Index(s) | RefPath::Link(s, _) => at(RefPath::Subject(s.clone())),
        }
    }

    /// The path below the repository, for log lines.
    fn show(&self) -> String {
        match self {
            RefPath::Root => REFERRERS.to_owned(),
            RefPath::Subject(s) => format!("{REFERRERS}/{s}"),
            RefPath::Index(s) => format!("{REFERRERS}/{s}/{REFERRERS_INDEX_JSON}"),
            RefPath::Link(s, d) => format!("{REFERRERS}/{s}/{d}"),
        }
    }
}

/// The path below the mountpoint, for log lines.
impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Dir(p) => write!(f, "/{p}"),
            Node::Tags(r) => write!(f, "/{r}/{TAGS}"),
            Node::TagDir(r, t) => write!(f, "/{r}/{TAGS}/{t}"),
            Node::TagManifest(r, t) => write!(f, "/{r}/{TAGS}/{t}/{MANIFEST_JSON}"),
            Node::Manifests(r) => write!(f, "/{r}/{MANIFESTS}"),
            Node::Manifest(r, d) => write!(f, "/{r}/{MANIFESTS}/{d}"),
            Node::Blobs(r) => write!(f, "/{r}/{BLOBS}"),
            Node::Blob(r, d) => write!(f, "/{r}/{BLOBS}/{d}"),
            Node::Uploads(r) => write!(f, "/{r}/{UPLOADS}"),
            Node::Upload(r, name) | Node::UploadLink(r, name) => {
                write!(f, "/{r}/{UPLOADS}/{name}")
            }
            Node::Scratch(dir, name) => write!(f, "{dir}/{name}"),
            Node::Control(ControlPath::Dir) => write!(f, "/{CONTROL}"),
            Node::Control(ControlPath::Stats) => write!(f, "/{CONTROL}/{STATS}"),
            Node::Image(p) => write!(f, "{p}"),
            Node::Oci(r, p) => write!(f, "/{r}/{}", p.show()),
            Node::Referrers(r, p) => write!(f, "/{r}/{}", p.show()),
            Node::Store(p) => write!(f, "{p}"),
        }
    }
}

impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImagePath::ImagesDir(r) => write!(f, "/{r}/{IMAGES}"),
            ImagePath::ImageDir(r, d) => write!(f, "/{r}/{IMAGES}/{d}"),
            ImagePath::LayersDir(r) => write!(f, "/{r}/{LAYERS}"),
            ImagePath::ImageLayers(r, d) => write!(f, "/{r}/{IMAGES}/{d}/{IMAGE_LAYERS}"),
            ImagePath::Inside(root, id, _) => {
                let r = &root.repo;
                match &root.of {
                    RootOf::Tag(t, _) => write!(f, "/{r}/{TAGS}/{t}/{ROOTFS}")?,
                    RootOf::Image(d) => write!(f, "/{r}/{IMAGES}/{d}/{ROOTFS}")?,
                    RootOf::Layer(d) => write!(f, "/{r}/{LAYERS}/{d}")?,
                    RootOf::ImageLayer(m, d) => write!(f, "/{r}/{IMAGES}/{m}/{IMAGE_LAYERS}/{d}")?,
                    RootOf::StoreLayer(l) => {
                        write!(f, "{}/{STORE_DIFF}", StorePath::Layer(l.clone()))?
                    }
                }
                // Paths inside an image are not kept (hardlinks have several).
                if *id != 0 {
                    write!(f, " (node {id})")
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents() {
        let repo = RepoName::parse("team/app").expect("valid");
        let tag = Tag::parse("v1").expect("valid");
        assert_eq!(
            Node::Dir("team/app".into()).parent(),
            Node::Dir("team".into())
        );
        assert_eq!(Node::Dir("team".into()).parent(), Node::root());
        assert_eq!(Node::root().parent(), Node::root());
        assert_eq!(
            Node::TagManifest(repo.clone(), tag.clone()).parent(),
            Node::TagDir(repo.clone(), tag)
        );
        assert_eq!(Node::Blobs(repo).parent(), Node::Dir("team/app".into()));
    }
}
