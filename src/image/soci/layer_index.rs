//! A zTOC as the layer index regfs reads files through, and the index of a layer regfs
//! passed itself as the zTOC it publishes (docs/SEMANTICS.md, "Shared indexes").

use super::layer::{LayerForZtoc, from_ztoc, to_ztoc};
use super::ztoc::Ztoc;
use crate::image::codec::Codec;
use crate::image::index::{Content, IndexSource, LayerIndex, StreamMap};
use crate::image::pass::checkpoint_spacing;

/// What the build tool field of the zTOCs regfs writes says.
pub const BUILD_TOOL: &str = concat!("regfs ", env!("CARGO_PKG_VERSION"));

/// The index of a `codec` layer of `layer_size` bytes from its zTOC `bytes` (already
/// checked against the zTOC's digest), made by `source`; and why entries were left
/// out, for the log.
pub fn index_from_ztoc(
    bytes: &[u8],
    codec: Codec,
    layer_size: u64,
    source: IndexSource,
) -> Result<(LayerIndex, Vec<String>), String> {
    let z = Ztoc::decode(bytes)?;
    let layer = from_ztoc(&z, layer_size)?;
    if layer.codec != codec {
        return Err(format!(
            "the zTOC describes a {} layer, the layer is {}",
            layer.codec.name(),
            codec.name()
        ));
    }
    let mut end = 0u64;
    for (entry, place) in layer.entries.iter().zip(&layer.places) {
        if place.header < end || place.data <= place.header {
            return Err(format!(
                "{:?}: its headers at {}..{} overlap the entry before",
                String::from_utf8_lossy(&entry.path),
                place.header,
                place.data
            ));
        }
        end = place.data.saturating_add(entry.size);
    }
    let index = LayerIndex {
        entries: layer.entries,
        places: layer.places,
        content: Content::Stream(StreamMap {
            codec,
            checkpoints: layer.checkpoints,
            spans: layer.spans,
            blob_size: layer.blob_size,
        }),
        source,
        toc_unused: None,
        soci_unused: None,
        tar_size: layer.tar_size,
        publishable: false,
    };
    Ok((index, layer.refused))
}

/// The zTOC of a layer regfs indexed by a pass, in soci-snapshotter's format; an error
/// when it cannot describe the layer exactly (LayerIndex::publishable).
pub fn ztoc_of_index(index: &LayerIndex) -> Result<Vec<u8>, String> {
    let Content::Stream(map) = &index.content else {
        return Err("a TOC layer".into());
    };
    if !index.publishable || index.source != IndexSource::Pass {
        return Err("not a layer a zTOC can describe exactly".into());
    }
    let z = to_ztoc(&LayerForZtoc {
        codec: map.codec,
        entries: &index.entries,
        places: &index.places,
        checkpoints: &map.checkpoints,
        spans: &map.spans,
        blob_size: map.blob_size,
        tar_size: index.tar_size,
        span_size: checkpoint_spacing(map.blob_size),
        build_tool: BUILD_TOOL,
    })?;
    Ok(z.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::codec::gzip::tests::{gzip, sample};
    use crate::image::pass::{index_pass, tests::tar_of};
    use crate::registry::Digest;

    fn pass(blob: &[u8]) -> LayerIndex {
        let pieces = blob
            .chunks(65_536)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)));
        let digest = Digest::sha256_of(blob);
        index_pass(&digest, Codec::Gzip, blob.len() as u64, pieces).expect("pass")
    }

    #[test]
    fn a_pass_index_through_its_ztoc_is_the_same_index() {
        let tar = tar_of(&[
            ("./etc/a", b"alpha"),
            ("big", &sample(9 << 20)),
            ("z", b"zulu"),
        ]);
        let blob = gzip(&tar, usize::MAX);
        let index = pass(&blob);
        let bytes = ztoc_of_index(&index).expect("publishable");
        let source = IndexSource::Soci {
            index: Digest::sha256_of(b"i"),
            ztoc: Digest::sha256_of(&bytes),
            vouched: false,
            checked: false,
        };
        let (back, refused) =
            index_from_ztoc(&bytes, Codec::Gzip, blob.len() as u64, source).expect("reads");
        assert!(refused.is_empty());
        assert_eq!(back.entries, index.entries);
        assert_eq!(back.places, index.places);
        assert_eq!(back.tar_size, index.tar_size);
        let (Content::Stream(a), Content::Stream(b)) = (&index.content, &back.content) else {
            panic!("streams");
        };
        assert_eq!((&a.checkpoints, &a.spans), (&b.checkpoints, &b.spans));
        assert!(
            index_from_ztoc(&bytes, Codec::Tar, blob.len() as u64, IndexSource::Pass).is_err(),
            "another codec"
        );
        assert!(
            ztoc_of_index(&back).is_err(),
            "only a pass's index is published"
        );
    }
}
