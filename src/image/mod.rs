//! Image contents (docs/SEMANTICS.md, "Image contents"): the files of layers and of
//! whole images, read lazily.
//!
//! - [`manifest`]: an image's layers, an index's image for a platform; [`config`]: the
//!   config a manifest names, and its layers' diff_ids;
//! - [`codec`]: decoders that start at a layer's beginning or
//!   at a checkpoint; [`tar`]: tar entries from the decoded stream ([`tar_pax`]: PAX
//!   records);
//! - [`pass`]: the one streaming pass that indexes a plain layer; [`toc`]: the index of
//!   eStargz and zstd:chunked layers from their TOC; [`index`]: what an index holds;
//! - [`content`]: one file's bytes from an indexed layer ([`chunks`]: from a TOC
//!   layer; [`flights`]: its chunks being fetched; [`kept`]: decoded files kept on
//!   disk for the next mount); [`tree`]: layers merged into an
//!   image's files, or one layer as an overlayfs lowerdir.
//!
//! Nothing here knows of FUSE: bytes come through [`source::BlobSource`], which the
//! filesystem layer implements over its block cache.

pub mod chunks;
pub mod codec;
pub mod config;
pub mod content;
pub mod entry;
pub mod flights;
pub mod index;
pub mod kept;
pub mod manifest;
pub mod pass;
pub mod soci;
pub mod source;
pub mod tar;
pub mod tar_pax;
pub mod toc;
pub mod tree;

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::registry::{Error, Result};
use codec::Codec;
use index::LayerIndex;
use manifest::Layer;
use source::BlobSource;
use toc::TocRef;

/// Pieces of the blob queued for the pass's decoding thread.
const PASS_QUEUE: usize = 4;

/// Indexes a layer: from its TOC when it announces a valid one, else by the pass.
pub async fn index_layer(source: Arc<dyn BlobSource>, layer: &Layer) -> Result<LayerIndex> {
    let digest = &layer.digest;
    let codec = Codec::of_media_type(&layer.media_type).ok_or_else(|| {
        index::unreadable(
            digest,
            format!(
                "media type {:?} is not a layer format regfs reads",
                layer.media_type
            ),
        )
    })?;
    let mut toc_unused = None;
    if let Some(toc) = TocRef::from_annotations(codec, &layer.annotations) {
        match toc::toc_index(&*source, &toc).await {
            Ok(index) => return Ok(index),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                // Lazy became a full read: said loudly, and counted by the caller
                // (`images.toc_unused`).
                warn!(layer = %digest, "TOC unusable, so the layer is read whole instead: {e}");
                toc_unused = Some(e.to_string());
            }
        }
    }
    info!(layer = %digest, codec = codec.name(), size = layer.size, "indexing layer (one pass)");
    let mut index = index_by_pass(source, codec).await?;
    index.toc_unused = toc_unused;
    Ok(index)
}

/// Runs the pass on a blocking thread, fed from the source's stream.
async fn index_by_pass(source: Arc<dyn BlobSource>, codec: Codec) -> Result<LayerIndex> {
    let (tx, mut rx) = mpsc::channel(PASS_QUEUE);
    let (digest, size) = (source.digest().clone(), source.size());
    let worker = tokio::task::spawn_blocking(move || {
        pass::index_pass(
            &digest,
            codec,
            size,
            std::iter::from_fn(|| rx.blocking_recv()),
        )
    });
    let mut pieces = source.stream();
    while let Some(piece) = pieces.next().await {
        let failed = piece.is_err();
        if tx.send(piece).await.is_err() || failed {
            break; // the pass stopped (it reports why), or the read failed (passed on)
        }
    }
    drop(tx);
    worker
        .await
        .map_err(|e| Error::Unavailable(format!("index pass task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::codec::gzip::tests::gzip;
    use crate::image::pass::tests::tar_of;
    use crate::image::source::mem::MemSource;

    #[tokio::test]
    async fn a_toc_that_cannot_be_used_is_read_whole_and_says_why() {
        let blob = gzip(&tar_of(&[("etc/file", b"plain gzip")]), usize::MAX);
        let source = Arc::new(MemSource::new(blob));
        let mut layer = Layer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: source.digest.clone(),
            size: source.bytes.len() as u64,
            annotations: Default::default(),
        };
        let index = index_layer(source.clone(), &layer).await.expect("plain");
        assert_eq!(index.toc_unused, None, "no TOC announced, none missed");
        layer.annotations.insert(
            toc::ESTARGZ_TOC_DIGEST.into(),
            format!("sha256:{}", "0".repeat(64)),
        );
        let index = index_layer(source, &layer).await.expect("read whole");
        assert_eq!(index.source, index::IndexSource::Pass);
        let why = index.toc_unused.unwrap_or_default();
        assert!(why.contains("no eStargz footer"), "{why}");
    }
}
