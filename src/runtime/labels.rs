//! Which image layer a Prepare names, from the labels containerd passes with it
//! (docs/SEMANTICS.md, "Container runtimes"): `ctr-remote image rpull` sets
//! `containerd.io/snapshot/remote/stargz.*`, CRI and nerdctl set
//! `containerd.io/snapshot/cri.*`. Everything here is outside data: checked, never
//! trusted to be well formed.

use std::collections::BTreeMap;

use crate::registry::{Digest, RepoName, Tag};

/// The label containerd's unpacker sets on a layer's Prepare: the name (chain ID) the
/// layer's snapshot will be committed under.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";

const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// Docker Hub as image references name it, and where its repositories of one
/// component live.
const DOCKER_HUB: &str = "docker.io";

/// An image layer named by a Prepare's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// The registry host ("host[:port]"), as the image reference names it.
    pub host: String,
    pub repo: RepoName,
    pub layer: Digest,
    /// The image manifest, where the labels name it (CRI does, and a reference by
    /// digest); else the tag the reference names, to resolve at the registry.
    pub manifest: Option<Digest>,
    pub tag: Option<Tag>,
}

/// The layer (chain ID) an unpack's key names: containerd's metadata store hands a
/// snapshotter `<namespace>/<n>/extract-<unique> <chain ID>` for each layer it unpacks,
/// with or without labels (`ctr image pull` sets none).
pub fn unpack_target(key: &str) -> Option<&str> {
    let own = match key.splitn(3, '/').collect::<Vec<_>>().as_slice() {
        [_, n, rest] if n.bytes().all(|b| b.is_ascii_digit()) => *rest,
        _ => key,
    };
    let (unique, chain) = own.strip_prefix("extract-")?.split_once(' ')?;
    (!unique.is_empty() && !chain.is_empty()).then_some(chain)
}

/// Whether the labels try to name a layer at all (then a failure to parse them is a
/// fallback worth reporting).
pub fn names_a_layer(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(STARGZ_REFERENCE) || labels.contains_key(CRI_IMAGE_REF)
}

/// The layer the labels name, or why they name none.
pub fn layer_ref(labels: &BTreeMap<String, String>) -> Result<LayerRef, String> {
    let (reference, layer, manifest) = if let Some(r) = labels.get(CRI_IMAGE_REF) {
        let layer = labels
            .get(CRI_LAYER_DIGEST)
            .ok_or("cri.image-ref without cri.layer-digest")?;
        (r, layer, labels.get(CRI_MANIFEST_DIGEST))
    } else if let Some(r) = labels.get(STARGZ_REFERENCE) {
        let layer = labels
            .get(STARGZ_DIGEST)
            .ok_or("stargz.reference without stargz.digest")?;
        (r, layer, None)
    } else {
        return Err("no labels name an image layer".into());
    };
    let (host, repo) = split_reference(reference)?;
    let layer = Digest::parse(layer).ok_or_else(|| format!("layer digest {layer:?} is invalid"))?;
    let manifest = manifest
        .map(|m| Digest::parse(m).ok_or_else(|| format!("manifest digest {m:?} is invalid")))
        .transpose()?;
    let (tag, pinned) = reference_pin(reference);
    Ok(LayerRef {
        host,
        repo,
        layer,
        manifest: manifest.or(pinned),
        tag,
    })
}

/// What a reference pins the image by: its tag ("latest" when it names neither) and
/// its digest, when it has one ("host/repo:tag@sha256:…").
pub fn reference_pin(reference: &str) -> (Option<Tag>, Option<Digest>) {
    let (name, digest) = match reference.split_once('@') {
        Some((name, d)) => (name, Digest::parse(d)),
        None => (reference, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    let tag = match last.rsplit_once(':') {
        Some((_, t)) => Tag::parse(t),
        None if digest.is_none() => Tag::parse("latest"),
        None => None,
    };
    (tag, digest)
}

/// "host[:port]/repo[:tag][@digest]" → (host, repo), as containerd's reference
/// parser reads it: the first component is a host if it has a '.' or ':' or is
/// "localhost", else the image is on Docker Hub (where "name" means "library/name").
pub fn split_reference(reference: &str) -> Result<(String, RepoName), String> {
    let without_digest = reference.split_once('@').map_or(reference, |(r, _)| r);
    let (first, rest) = without_digest
        .split_once('/')
        .unwrap_or(("", without_digest));
    let is_host = first.contains(['.', ':']) || first == "localhost";
    let (host, path) = if is_host {
        (first.to_owned(), rest)
    } else {
        (DOCKER_HUB.to_owned(), without_digest)
    };
    // A tag follows the last ':' after the last '/'.
    let last = path.rsplit('/').next().unwrap_or(path);
    let path = match last.rfind(':') {
        Some(i) => &path[..path.len() - (last.len() - i)],
        None => path,
    };
    let path = if host == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    if !valid_host(&host) {
        return Err(format!("reference {reference:?}: invalid registry host"));
    }
    let repo = RepoName::parse(&path)
        .ok_or_else(|| format!("reference {reference:?}: invalid repository name"))?;
    Ok((host, repo))
}

/// A host usable as one directory name: letters, digits, '.', '-', ':', '[' ']'.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && !host.starts_with('.')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn reference_pins() {
        let pin = |r: &str| {
            let (t, d) = reference_pin(r);
            (
                t.map(|t| t.as_str().to_owned()),
                d.map(|d| d.as_str().to_owned()),
            )
        };
        assert_eq!(pin("127.0.0.1:5000/t/app:v1"), (Some("v1".into()), None));
        assert_eq!(pin("127.0.0.1:5000/t/app"), (Some("latest".into()), None));
        assert_eq!(pin(&format!("h:1/app@{D1}")), (None, Some(D1.into())));
        assert_eq!(
            pin(&format!("h:1/app:v2@{D1}")),
            (Some("v2".into()), Some(D1.into()))
        );
    }

    #[test]
    fn references() {
        let split = |r: &str| split_reference(r).map(|(h, p)| format!("{h} {p}"));
        assert_eq!(
            split("127.0.0.1:5000/t/app:v1").unwrap(),
            "127.0.0.1:5000 t/app"
        );
        assert_eq!(split("busybox").unwrap(), "docker.io library/busybox");
        assert_eq!(split("me/app:1").unwrap(), "docker.io me/app");
        assert_eq!(split(&format!("localhost/a@{D1}")).unwrap(), "localhost a");
        assert_eq!(
            split(&format!("r.io:5000/a/b:t@{D1}")).unwrap(),
            "r.io:5000 a/b"
        );
        assert!(split("r.io/../x").is_err());
        assert!(split("a:b/../../x").is_err());
        assert!(split("bad/host/x\u{0}").is_err());
    }

    #[test]
    fn unpack_keys() {
        assert_eq!(
            unpack_target("default/12/extract-1-abc sha256:9"),
            Some("sha256:9")
        );
        assert_eq!(unpack_target("extract-1-abc sha256:9"), Some("sha256:9"));
        assert_eq!(unpack_target("default/12/my-container"), None);
        assert_eq!(unpack_target("default/x/extract-1 sha256:9"), None);
        assert_eq!(unpack_target("extract- sha256:9"), None);
    }

    #[test]
    fn labels_of_both_kinds() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let stargz = labels(&[(STARGZ_REFERENCE, "r.io/a:v1"), (STARGZ_DIGEST, D1)]);
        let got = layer_ref(&stargz).unwrap();
        assert_eq!(
            (got.host.as_str(), got.layer.as_str(), got.manifest),
            ("r.io", D1, None)
        );
        let cri = labels(&[
            (CRI_IMAGE_REF, "r.io/a:v1"),
            (CRI_LAYER_DIGEST, D1),
            (CRI_MANIFEST_DIGEST, D2),
        ]);
        assert_eq!(layer_ref(&cri).unwrap().manifest.unwrap().as_str(), D2);
        assert!(names_a_layer(&cri));
        assert!(layer_ref(&labels(&[(STARGZ_REFERENCE, "r.io/a")])).is_err());
        assert!(
            layer_ref(&labels(&[
                (CRI_IMAGE_REF, "r.io/a"),
                (CRI_LAYER_DIGEST, "x")
            ]))
            .is_err()
        );
        assert!(!names_a_layer(&labels(&[(
            "containerd.io/snapshot.ref",
            "x"
        )])));
    }
}
