//! Layers that carry a table of contents: eStargz (gzip, TOC found through a footer)
//! and zstd:chunked (zstd, TOC position in the descriptor's annotations). Both TOCs
//! are the same JSON: entries with tar metadata, and for file data the compressed
//! offset of a gzip member / zstd frame holding each chunk, with the chunk's digest.
//!
//! - [`estargz`], [`zstd_chunked`]: where each format keeps its TOC;
//! - [`build`]: the TOC's entries made into a layer index (every case writers use).
//!
//! Trust: the TOC is used only if it matches the digest the layer descriptor names
//! (`containerd.io/snapshot/stargz/toc.digest`, or the zstd:chunked manifest
//! checksum); then every chunk is checked against its `chunkDigest` when read. A layer
//! whose TOC is missing, unreadable or does not match is indexed by the plain pass
//! instead, which verifies the whole blob; that is logged and counted
//! (`images.toc_unused` in `/.regfs/stats`), never silent.

pub mod build;
#[cfg(test)]
mod build_tests;
pub mod estargz;
pub mod rfc3339;
pub mod zstd_chunked;

use std::collections::BTreeMap;

use super::codec::Codec;
use super::index::{IndexSource, LayerIndex, unreadable};
use super::source::BlobSource;
use crate::registry::{Digest, Result};
use build::{Toc, build};
use zstd_chunked::Position;

pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// zstd:chunked annotations, under the name containers/storage uses now and the one
/// older writers (podman 4, stargz-snapshotter 0.12) used.
const ZSTD_CHUNKED_CHECKSUM: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
const ZSTD_CHUNKED_POSITION: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];

/// How a layer with a TOC says where it is and what it must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TocRef {
    Estargz { toc_digest: Digest },
    ZstdChunked { checksum: Digest, at: Position },
}

impl TocRef {
    /// The digest the TOC must match: what identifies this TOC.
    pub fn digest(&self) -> &Digest {
        match self {
            TocRef::Estargz { toc_digest } => toc_digest,
            TocRef::ZstdChunked { checksum, .. } => checksum,
        }
    }

    /// The TOC a layer descriptor announces, if any (and if its codec fits).
    pub fn from_annotations(
        codec: Codec,
        annotations: &BTreeMap<String, String>,
    ) -> Option<TocRef> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| annotations.get(*k));
        match codec {
            Codec::Gzip => {
                let toc_digest = Digest::parse(annotations.get(ESTARGZ_TOC_DIGEST)?)?;
                Some(TocRef::Estargz { toc_digest })
            }
            Codec::Zstd => Some(TocRef::ZstdChunked {
                checksum: Digest::parse(get(&ZSTD_CHUNKED_CHECKSUM)?)?,
                at: Position::parse(get(&ZSTD_CHUNKED_POSITION)?)?,
            }),
            Codec::Tar => None,
        }
    }
}

/// Reads and checks the TOC of a layer and makes its index.
pub async fn toc_index(source: &dyn BlobSource, toc: &TocRef) -> Result<LayerIndex> {
    let digest = source.digest().clone();
    let (codec, json, data_end, kind) = match toc {
        TocRef::Estargz { toc_digest } => {
            let (json, toc_offset) = estargz::read_toc(source).await?;
            if !toc_digest.matches(&json) {
                return Err(unreadable(
                    &digest,
                    "its eStargz TOC does not match the TOC digest annotation",
                ));
            }
            (Codec::Gzip, json, toc_offset, IndexSource::Estargz)
        }
        TocRef::ZstdChunked { checksum, at } => {
            let json = zstd_chunked::read_toc(source, checksum, at).await?;
            (Codec::Zstd, json, at.offset, IndexSource::ZstdChunked)
        }
    };
    // Parsing and building walk every entry: on the blocking pool, not a reactor thread.
    tokio::task::spawn_blocking(move || {
        let parsed: Toc = serde_json::from_slice(&json)
            .map_err(|e| unreadable(&digest, format!("TOC is not valid JSON: {e}")))?;
        build(&digest, codec, &parsed, data_end, kind)
    })
    .await
    .map_err(|e| crate::registry::Error::Unavailable(format!("TOC task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_annotations() {
        let mut a = BTreeMap::new();
        a.insert(
            ZSTD_CHUNKED_POSITION[1].to_owned(),
            "4090171:500:1708:1".to_owned(),
        );
        a.insert(
            ZSTD_CHUNKED_CHECKSUM[1].to_owned(),
            format!("sha256:{}", "a".repeat(64)),
        );
        assert_eq!(
            TocRef::from_annotations(Codec::Zstd, &a),
            Some(TocRef::ZstdChunked {
                checksum: Digest::parse(&format!("sha256:{}", "a".repeat(64))).expect("digest"),
                at: Position {
                    offset: 4_090_171,
                    len: 500,
                    json_len: 1708
                }
            })
        );
        assert_eq!(TocRef::from_annotations(Codec::Gzip, &a), None);
    }
}
