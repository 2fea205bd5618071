//! Layers as one image manifest describes them (docs/SEMANTICS.md, "Image contents" and
//! "Container runtimes"). A layer's media type and TOC annotations are only in the
//! manifests that list it (a zstd:chunked TOC's position is nowhere else), so
//! `.images/<m>/layers/<l>/` and the layer store take them from the manifest they are
//! reached through, never from a walk of the repository's tags; and the layer store's
//! record takes the layer's diff_id from that manifest's config.

use std::sync::Arc;

use bytes::Bytes;

use super::layer_record::LayerRecord;
use super::trees::Images;
use crate::image::codec::Codec;
use crate::image::config::{self, MAX_CONFIG};
use crate::image::manifest::{ImageManifest, Layer, select};
use crate::image::source::BlobSource;
use crate::image::toc::TocRef;
use crate::registry::{Digest, Error, FetchedManifest, Reference, RepoName, Result};

/// Layers an image may have (docker stops at 127).
const MAX_LAYERS: usize = 1000;
/// Images of an index searched for a layer the layer store is asked for (the platform's
/// first): an index of more platforms than this is searched only that far.
const MAX_CHILDREN_SEARCHED: usize = 64;

/// An image manifest and its layers, lowest first.
pub struct ResolvedImage {
    /// The image manifest's digest (for an index, its child's).
    pub digest: Digest,
    pub manifest: Arc<FetchedManifest>,
    pub layers: Vec<Layer>,
}

impl Images {
    /// The image `digest` names: that image manifest, or for an index its image for
    /// `--platform`.
    pub(super) async fn resolve_image(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<ResolvedImage> {
        let manifest = self.view.manifest(repo, digest).await?;
        match parse(repo, &manifest)? {
            ImageManifest::Image { layers } => image(repo, manifest, layers),
            ImageManifest::Index { children } => {
                let child = select(&children, &self.platform).ok_or_else(|| {
                    Error::NotFound(format!(
                        "{repo}@{digest}: the index has no {} image (see --platform)",
                        self.platform
                    ))
                })?;
                self.child_image(repo, child).await
            }
        }
    }

    /// An index's child, which must be an image manifest.
    async fn child_image(&self, repo: &RepoName, child: &Digest) -> Result<ResolvedImage> {
        let manifest = self.view.manifest(repo, child).await?;
        match parse(repo, &manifest)? {
            ImageManifest::Image { layers } => image(repo, manifest, layers),
            ImageManifest::Index { .. } => Err(Error::BadAnswer(format!(
                "{repo}@{child}: an index where an image was expected"
            ))),
        }
    }

    /// Layer `layer` as the image `manifest` names describes it (NotFound if that
    /// image does not list it).
    pub async fn manifest_layer(
        &self,
        repo: &RepoName,
        manifest: &Digest,
        layer: &Digest,
    ) -> Result<Layer> {
        Ok(self.image_layer(repo, manifest, layer).await?.0)
    }

    /// The same, with the image manifest it is in (whose SOCI index may have the
    /// layer's zTOC). The image's other layers start indexing too: a runtime looks at
    /// each in turn, each after the one before was served (see `find_layer`).
    pub(super) async fn image_layer(
        &self,
        repo: &RepoName,
        manifest: &Digest,
        layer: &Digest,
    ) -> Result<(Layer, Arc<FetchedManifest>)> {
        let image = self.resolve_image(repo, manifest).await?;
        if image.layers.iter().any(|l| &l.digest == layer) {
            self.index_all(repo, &image.layers, &image.manifest);
        }
        let found = image.layers.into_iter().find(|l| &l.digest == layer);
        found
            .map(|l| (l, image.manifest))
            .ok_or_else(|| Error::NotFound(format!("{repo}@{manifest} has no layer {layer}")))
    }

    /// The layer of the image `reference` names whose blob digest, or TOC digest, is
    /// `name`: the image manifest that lists it, and the layer's blob digest. For an
    /// index, the image for `--platform` is searched first, then the others.
    ///
    /// A runtime asks for every layer of an image in turn, each after the one before
    /// has been served (containers/image holds a lock across its lookups): so the first
    /// one found starts indexing all the image's layers at once, and the next lookups
    /// find them done or under way instead of each waiting for its own pass.
    pub async fn find_layer(
        &self,
        repo: &RepoName,
        reference: &Reference,
        name: &Digest,
    ) -> Result<(Digest, Digest)> {
        let top = match reference {
            Reference::Tag(tag) => self.view.tag_manifest(repo, tag).await?,
            Reference::Digest(digest) => self.view.manifest(repo, digest).await?,
        };
        let not_found = || Error::NotFound(format!("{repo}@{}: no layer {name}", top.digest));
        let children = match parse(repo, &top)? {
            ImageManifest::Image { layers } => {
                let found = find(&layers, name).ok_or_else(not_found)?;
                let found = readable(repo, &top.digest, found)?;
                self.index_all(repo, &layers, &top);
                return Ok((top.digest.clone(), found));
            }
            ImageManifest::Index { children } => children,
        };
        let first = select(&children, &self.platform).cloned();
        let others = children.into_iter().map(|(d, _)| d);
        let order = first
            .iter()
            .cloned()
            .chain(others.filter(|d| Some(d) != first.as_ref()));
        for child in order.take(MAX_CHILDREN_SEARCHED) {
            // A child that is not an image (a nested index, an attestation) holds no
            // layer of a runnable image; another error is worth reporting.
            let image = match self.child_image(repo, &child).await {
                Ok(image) => image,
                Err(Error::BadAnswer(_)) => continue,
                Err(e) => return Err(e),
            };
            if let Some(found) = find(&image.layers, name) {
                let found = readable(repo, &image.digest, found)?;
                self.index_all(repo, &image.layers, &image.manifest);
                return Ok((image.digest, found));
            }
        }
        Err(not_found())
    }

    /// Starts indexing every layer of an image (see `find_layer`).
    fn index_all(&self, repo: &RepoName, layers: &[Layer], image: &Arc<FetchedManifest>) {
        if layers.len() <= MAX_LAYERS {
            for layer in layers {
                self.layers.start(repo, layer, Some(image));
            }
        }
    }

    /// The layer store's `info` for layer `layer` of image manifest `manifest`, found
    /// by TOC digest or by blob digest (see layer_record.rs).
    pub async fn layer_record(
        &self,
        repo: &RepoName,
        manifest: &Digest,
        layer: &Digest,
        by_toc: bool,
    ) -> Result<Bytes> {
        let image = self.resolve_image(repo, manifest).await?;
        let index = image
            .layers
            .iter()
            .position(|l| &l.digest == layer)
            .ok_or_else(|| Error::NotFound(format!("{repo}@{manifest} has no layer {layer}")))?;
        let diff_ids = self.diff_ids(repo, &image).await?;
        let diff_id = diff_ids.get(index).ok_or_else(|| {
            Error::BadAnswer(format!(
                "{repo}@{manifest}: {} layers but {} diff_ids in its config",
                image.layers.len(),
                diff_ids.len()
            ))
        })?;
        let record = LayerRecord::new(&image.layers[index], diff_id, by_toc);
        Ok(Bytes::from(record.to_json()))
    }

    /// The diff_ids of an image's config (read once per config, checked against its
    /// digest).
    async fn diff_ids(&self, repo: &RepoName, image: &ResolvedImage) -> Result<Arc<Vec<Digest>>> {
        let bad = |what: String| Error::BadAnswer(format!("{repo}@{}: {what}", image.digest));
        let config = config::config_ref(&image.manifest.bytes).map_err(bad)?;
        if config.size > MAX_CONFIG {
            return Err(bad(format!("a config of {} bytes", config.size)));
        }
        let key = (repo.clone(), config.digest.clone());
        self.diff_ids
            .get_or_fetch(&key, || async {
                let blob = self.layers.blob(repo, &config.digest, config.size);
                let bytes = blob.read(0, config.size).await?;
                if !config.digest.matches(&bytes) {
                    return Err(bad(format!(
                        "config {} does not match its digest",
                        config.digest
                    )));
                }
                config::diff_ids(&bytes).map(Arc::new).map_err(bad)
            })
            .await
    }
}

fn parse(repo: &RepoName, m: &FetchedManifest) -> Result<ImageManifest> {
    ImageManifest::parse(&m.bytes, &m.media_type)
        .map_err(|e| Error::BadAnswer(format!("{repo}@{}: {e}", m.digest)))
}

fn image(
    repo: &RepoName,
    manifest: Arc<FetchedManifest>,
    layers: Vec<Layer>,
) -> Result<ResolvedImage> {
    if layers.len() > MAX_LAYERS {
        return Err(Error::BadAnswer(format!(
            "{repo}@{}: {} layers (at most {MAX_LAYERS})",
            manifest.digest,
            layers.len()
        )));
    }
    Ok(ResolvedImage {
        digest: manifest.digest.clone(),
        manifest,
        layers,
    })
}

/// The blob digest of the layer whose blob digest, or TOC digest, is `name`.
fn find<'a>(layers: &'a [Layer], name: &Digest) -> Option<&'a Layer> {
    let by_blob = layers.iter().find(|l| &l.digest == name);
    by_blob.or_else(|| layers.iter().find(|l| toc_digest(l).as_ref() == Some(name)))
}

/// The blob digest of `layer` of image `manifest`, if regfs reads its media type; a
/// layer it cannot read is not in the layer store, so the runtime downloads it itself
/// (docs/SEMANTICS.md, "Container runtimes") instead of finding a `diff` that fails.
fn readable(repo: &RepoName, manifest: &Digest, layer: &Layer) -> Result<Digest> {
    match Codec::of_media_type(&layer.media_type) {
        Some(_) => Ok(layer.digest.clone()),
        None => Err(Error::NotFound(format!(
            "{repo}@{manifest}: layer {} is {:?}, a media type regfs cannot read",
            layer.digest, layer.media_type
        ))),
    }
}

/// The digest of the TOC a layer's descriptor announces, if any.
pub fn toc_digest(layer: &Layer) -> Option<Digest> {
    let codec = Codec::of_media_type(&layer.media_type)?;
    TocRef::from_annotations(codec, &layer.annotations).map(|t| t.digest().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("valid")
    }

    fn layer(d: char, media_type: &str, annotations: &[(&str, String)]) -> Layer {
        Layer {
            media_type: media_type.to_owned(),
            digest: digest(d),
            size: 10,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    /// Newer containers/storage asks for eStargz and zstd:chunked layers by the digest
    /// of their TOC; podman 4.3 by blob digest only.
    #[test]
    fn layers_found_by_blob_or_toc_digest() {
        let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
        let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
        let layers = [
            layer('a', gzip, &[]),
            layer(
                'b',
                gzip,
                &[(
                    "containerd.io/snapshot/stargz/toc.digest",
                    digest('1').to_string(),
                )],
            ),
            layer(
                'c',
                zstd,
                &[
                    (
                        "io.github.containers.zstd-chunked.manifest-checksum",
                        digest('2').to_string(),
                    ),
                    (
                        "io.github.containers.zstd-chunked.manifest-position",
                        "100:20:40:1".into(),
                    ),
                ],
            ),
        ];
        let found = |name| find(&layers, &digest(name)).map(|l| l.digest.clone());
        assert_eq!(found('a'), Some(digest('a')));
        assert_eq!(found('b'), Some(digest('b')));
        assert_eq!(found('1'), Some(digest('b')));
        assert_eq!(found('2'), Some(digest('c')));
        assert_eq!(found('3'), None);
        // An eStargz annotation on a zstd layer announces nothing.
        let odd = [layer(
            'd',
            zstd,
            &[(
                "containerd.io/snapshot/stargz/toc.digest",
                digest('4').to_string(),
            )],
        )];
        assert!(find(&odd, &digest('4')).is_none());
    }

    #[test]
    fn a_layer_of_a_media_type_regfs_cannot_read_is_not_offered() {
        let repo = RepoName::parse("team/app").expect("valid");
        let gzip = layer('a', "application/vnd.oci.image.layer.v1.tar+gzip", &[]);
        let sealed = layer('b', "application/vnd.example.sealed+tar", &[]);
        assert_eq!(readable(&repo, &digest('e'), &gzip).ok(), Some(digest('a')));
        let refused = readable(&repo, &digest('e'), &sealed).expect_err("not readable");
        assert!(matches!(refused, Error::NotFound(ref why) if why.contains("cannot read")));
    }
}
