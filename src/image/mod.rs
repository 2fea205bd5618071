//! Image contents (docs/SEMANTICS.md, "Image contents"): the files of layers and of
//! whole images, read lazily.
//!
//! - [`manifest`]: an image's layers, an index's image for a platform; [`config`]: the
//!   config a manifest names, and its layers' diff_ids;
//! - [`codec`]: decoders that start at a layer's beginning or
//!   at a checkpoint; [`tar`]: tar entries from the decoded stream ([`tar_header`]: one
//!   header's fields; [`tar_pax`]: PAX records);
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
#[cfg(test)]
mod chunks_tests;
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
pub mod tar_header;
pub mod tar_pax;
pub mod toc;
pub mod tree;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::registry::{Digest, Error, Result};
use codec::Codec;
use index::{IndexSource, LayerIndex};
use manifest::Layer;
use source::BlobSource;
use toc::TocRef;

/// Pieces of the blob queued for the pass's decoding thread: besides them the pass
/// holds the piece it decodes and the one fetched next, all counted in its working
/// memory (pass::working_bytes).
const PASS_QUEUE: usize = 2;

/// A layer's zTOC in a SOCI index (docs/SEMANTICS.md, "Shared indexes").
pub struct ZtocSource {
    /// The zTOC blob (its digest and size from the index).
    pub blob: Arc<dyn BlobSource>,
    /// The SOCI index manifest that lists it.
    pub index: Digest,
    /// The image manifest names the index.
    pub vouched: bool,
}

/// Indexes a layer: from its TOC when it announces a valid one, else from its zTOC if
/// it has one, else by the pass.
pub async fn index_layer(
    source: Arc<dyn BlobSource>,
    layer: &Layer,
    ztoc: Option<&ZtocSource>,
) -> Result<LayerIndex> {
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
    let mut soci_unused = None;
    if let Some(ztoc) = ztoc {
        match ztoc_index(ztoc, codec, layer).await {
            Ok(index) => return Ok(index),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                warn!(layer = %digest, index = %ztoc.index, ztoc = %ztoc.blob.digest(), "zTOC unusable, so the layer is read whole instead: {e}");
                soci_unused = Some(e.to_string());
            }
        }
    }
    info!(layer = %digest, codec = codec.name(), size = layer.size, "indexing layer (one pass)");
    let mut index = index_by_pass(source, codec).await?;
    index.toc_unused = toc_unused;
    index.soci_unused = soci_unused;
    Ok(index)
}

/// A layer's index from its zTOC: fetched whole, checked against its digest, read.
async fn ztoc_index(ztoc: &ZtocSource, codec: Codec, layer: &Layer) -> Result<LayerIndex> {
    let (digest, size) = (ztoc.blob.digest(), ztoc.blob.size());
    let bad = |what: String| index::unreadable(&layer.digest, format!("zTOC {digest}: {what}"));
    if size > soci::ztoc::MAX_ZTOC_BYTES as u64 {
        return Err(bad(format!("{size} bytes is too large")));
    }
    let bytes = ztoc.blob.fetch_range(0, size).await?;
    if !digest.matches(&bytes) {
        ztoc.blob.distrust();
        return Err(bad("does not match its digest".into()));
    }
    let source = IndexSource::Soci {
        index: ztoc.index.clone(),
        ztoc: digest.clone(),
        vouched: ztoc.vouched,
        checked: false,
    };
    let layer_size = layer.size;
    let (index, refused) = tokio::task::spawn_blocking(move || {
        soci::layer_index::index_from_ztoc(&bytes, codec, layer_size, source)
    })
    .await
    .map_err(|e| Error::Unavailable(format!("zTOC task failed: {e}")))?
    .map_err(bad)?;
    for why in refused.iter().take(20) {
        warn!(layer = %layer.digest, "entry of the zTOC not shown: {why}");
    }
    info!(layer = %layer.digest, ztoc = %digest, files = index.entries.len(), "layer indexed by its zTOC");
    Ok(index)
}

/// Runs the pass on a blocking thread, fed from the source's stream, once its working
/// memory is reserved in the budget (README "Memory"): before the stream holds any
/// piece, so it waits holding nothing.
async fn index_by_pass(source: Arc<dyn BlobSource>, codec: Codec) -> Result<LayerIndex> {
    let (digest, size) = (source.digest().clone(), source.size());
    let held = PASS_QUEUE as u64 + 2;
    let working = pass::working_bytes(codec, held, source.stream_piece());
    let _working = source.working_memory(working).await;
    consume_blocking(source.stream(), move |pieces| {
        pass::index_pass(&digest, codec, size, pieces)
    })
    .await?
}

/// The working memory of [`check_layer`] fed in pieces of `piece` bytes, `ahead` of
/// them fetched before they are wanted: a pass's, and the decoder of the span it
/// compares.
pub fn check_working_bytes(codec: Codec, piece: u64, ahead: u64) -> u64 {
    let held = PASS_QUEUE as u64 + 2 + ahead;
    pass::working_bytes(codec, held, piece) + codec::Decoder::working_bytes(codec)
}

/// Checks a layer whose index came from a zTOC against the whole blob, fed by
/// `pieces` (soci/verify.rs): the blob's digest, and everything the index says. An
/// error is a read that failed (worth trying again); `Ok(Err(why))` is an index that
/// lied.
pub async fn check_layer(
    pieces: BoxStream<'_, Result<Bytes>>,
    digest: &Digest,
    index: Arc<LayerIndex>,
) -> Result<std::result::Result<(), String>> {
    let digest = digest.clone();
    consume_blocking(pieces, move |pieces| {
        let index::Content::Stream(map) = &index.content else {
            return Err("not a plain layer".to_owned());
        };
        let claims = soci::verify::Claims {
            codec: map.codec,
            entries: &index.entries,
            checkpoints: &map.checkpoints,
            spans: &map.spans,
            blob_size: map.blob_size,
        };
        soci::verify::verify_layer(&digest, claims, pieces)
    })
    .await
}

/// Runs `consume` on a blocking thread over the pieces of `stream`, a few queued at a
/// time. A piece that fails ends the stream, and its error is the answer.
async fn consume_blocking<T: Send + 'static>(
    mut stream: BoxStream<'_, Result<Bytes>>,
    consume: impl FnOnce(&mut dyn Iterator<Item = Result<Bytes>>) -> T + Send + 'static,
) -> Result<T> {
    let (tx, mut rx) = mpsc::channel(PASS_QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        consume(&mut std::iter::from_fn(|| rx.blocking_recv()))
    });
    let mut failed = None;
    while let Some(piece) = stream.next().await {
        if let Err(e) = &piece {
            failed = Some(e.clone());
        }
        if tx.send(piece).await.is_err() || failed.is_some() {
            break; // the consumer stopped (it says why), or the read failed
        }
    }
    drop(tx);
    let made = worker
        .await
        .map_err(|e| Error::Unavailable(format!("decoding task failed: {e}")))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(made),
    }
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
        let index = index_layer(source.clone(), &layer, None)
            .await
            .expect("plain");
        assert_eq!(index.toc_unused, None, "no TOC announced, none missed");
        layer.annotations.insert(
            toc::ESTARGZ_TOC_DIGEST.into(),
            format!("sha256:{}", "0".repeat(64)),
        );
        let index = index_layer(source, &layer, None).await.expect("read whole");
        assert_eq!(index.source, index::IndexSource::Pass);
        let why = index.toc_unused.unwrap_or_default();
        assert!(why.contains("no eStargz footer"), "{why}");
    }
}
