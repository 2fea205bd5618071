//! Image contents (DESIGN §7): the files of layers and of whole images, read lazily.
//!
//! - [`manifest`]: an image's layers, an index's image for a platform; [`config`]: the
//!   config a manifest names, and its layers' diff_ids;
//! - [`codec`]: decoders that start at a layer's beginning or
//!   at a checkpoint; [`tar`]: tar entries from the decoded stream;
//! - [`pass`]: the one streaming pass that indexes a plain layer; [`toc`]: the index of
//!   eStargz and zstd:chunked layers from their TOC; [`index`]: what an index holds;
//! - [`content`]: one file's bytes from an indexed layer; [`tree`]: layers merged into
//!   an image's files, or one layer as an overlayfs lowerdir.
//!
//! Nothing here knows of FUSE: bytes come through [`source::BlobSource`], which the
//! filesystem layer implements over its block cache.

pub mod codec;
pub mod config;
pub mod content;
pub mod entry;
pub mod index;
pub mod manifest;
pub mod pass;
pub mod soci;
pub mod source;
pub mod tar;
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
    if let Some(toc) = TocRef::from_annotations(codec, &layer.annotations) {
        match toc::toc_index(&*source, &toc).await {
            Ok(index) => return Ok(index),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => warn!(layer = %digest, "{e}; indexing it by reading it whole instead"),
        }
    }
    info!(layer = %digest, codec = codec.name(), size = layer.size, "indexing layer (one pass)");
    index_by_pass(source, codec).await
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
