//! The record of a layer that containers/storage reads from the `info` file of an
//! Additional Layer Store (docs/SEMANTICS.md, "Container runtimes"): its `Layer` type
//! as JSON, with the field names of containers/storage's `layers.go`. Unknown fields
//! are ignored there, so one record serves old readers (podman 4.3 looks layers up by
//! blob digest) and new ones (which look up eStargz and zstd:chunked layers by TOC
//! digest and want `toc-digest` to say so).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::image::codec::Codec;
use crate::image::manifest::Layer;
use crate::image::toc::TocRef;
use crate::registry::Digest;

/// The uncompressed size of a layer, as `ctr-remote` and containers/storage write it on
/// eStargz and zstd:chunked descriptors.
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// The flag that carries a diff_id nobody has checked against the layer's tar stream
/// (containers/image reads it for layers known by their TOC).
const EXPECTED_DIFF_ID: &str = "expected-layer-diffid";

#[derive(Serialize, Debug, PartialEq)]
pub struct LayerRecord {
    #[serde(rename = "compressed-diff-digest")]
    compressed_digest: String,
    #[serde(rename = "compressed-size")]
    compressed_size: u64,
    #[serde(rename = "diff-digest", skip_serializing_if = "Option::is_none")]
    diff_digest: Option<String>,
    /// Omitted when unknown for a layer found by blob digest (0, as stargz-store
    /// leaves it); -1 when unknown for one found by TOC (what containers/storage
    /// expects then).
    #[serde(rename = "diff-size", skip_serializing_if = "is_zero")]
    diff_size: i64,
    /// containers/storage's `archive.Compression`: 0 none, 2 gzip, 4 zstd.
    #[serde(skip_serializing_if = "is_zero")]
    compression: i64,
    #[serde(rename = "toc-digest", skip_serializing_if = "Option::is_none")]
    toc_digest: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    flags: BTreeMap<&'static str, String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl LayerRecord {
    /// The record of `layer`, whose diff_id the image config gives, as found by blob
    /// digest or (`by_toc`) by the digest of its TOC.
    ///
    /// Found by TOC, the files are the TOC's, which nothing checked against the tar
    /// stream the diff_id names: the diff_id goes in the flag that says so, as
    /// containers/storage does for its own partial pulls, not in `diff-digest`.
    pub fn new(layer: &Layer, diff_id: &Digest, by_toc: bool) -> LayerRecord {
        let codec = Codec::of_media_type(&layer.media_type);
        let toc = codec.and_then(|c| TocRef::from_annotations(c, &layer.annotations));
        let size = layer
            .annotations
            .get(UNCOMPRESSED_SIZE)
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|&n| n > 0);
        let compression = match codec {
            Some(Codec::Gzip) => 2,
            Some(Codec::Zstd) => 4,
            Some(Codec::Tar) | None => 0,
        };
        let mut record = LayerRecord {
            compressed_digest: layer.digest.to_string(),
            compressed_size: layer.size,
            diff_digest: Some(diff_id.to_string()),
            diff_size: size.unwrap_or(0),
            compression,
            toc_digest: toc.map(|t| t.digest().to_string()),
            flags: BTreeMap::new(),
        };
        if by_toc {
            record.diff_digest = None;
            record.diff_size = size.unwrap_or(-1);
            record.flags.insert(EXPECTED_DIFF_ID, diff_id.to_string());
        }
        record
    }

    /// The `info` file: the record as one line of JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec(self).unwrap_or_default();
        json.push(b'\n');
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("valid")
    }

    fn layer(media_type: &str, annotations: &[(&str, String)]) -> Layer {
        Layer {
            media_type: media_type.to_owned(),
            digest: digest('a'),
            size: 1234,
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    fn json(record: &LayerRecord) -> serde_json::Value {
        serde_json::from_slice(&record.to_json()).expect("valid JSON")
    }

    #[test]
    fn gzip_layer_by_blob_digest() {
        let l = layer("application/vnd.oci.image.layer.v1.tar+gzip", &[]);
        let got = json(&LayerRecord::new(&l, &digest('d'), false));
        assert_eq!(
            got,
            serde_json::json!({
                "compressed-diff-digest": digest('a').to_string(),
                "compressed-size": 1234,
                "diff-digest": digest('d').to_string(),
                "compression": 2,
            })
        );
    }

    #[test]
    fn zstd_chunked_layer_by_toc_digest() {
        let toc = digest('c').to_string();
        let l = layer(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            &[
                (
                    "io.github.containers.zstd-chunked.manifest-checksum",
                    toc.clone(),
                ),
                (
                    "io.github.containers.zstd-chunked.manifest-position",
                    "10:20:30:1".into(),
                ),
                (UNCOMPRESSED_SIZE, "4096".into()),
            ],
        );
        let got = json(&LayerRecord::new(&l, &digest('d'), true));
        assert_eq!(
            got,
            serde_json::json!({
                "compressed-diff-digest": digest('a').to_string(),
                "compressed-size": 1234,
                "diff-size": 4096,
                "compression": 4,
                "toc-digest": toc,
                "flags": {"expected-layer-diffid": digest('d').to_string()},
            })
        );
    }

    #[test]
    fn unknown_size_by_toc_is_minus_one() {
        let toc = digest('c').to_string();
        let l = layer(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &[("containerd.io/snapshot/stargz/toc.digest", toc.clone())],
        );
        let by_toc = json(&LayerRecord::new(&l, &digest('d'), true));
        assert_eq!(by_toc["diff-size"], -1);
        assert_eq!(by_toc["toc-digest"], toc);
        // By blob digest the TOC is still named, and the size left out.
        let by_blob = json(&LayerRecord::new(&l, &digest('d'), false));
        assert_eq!(by_blob["toc-digest"], toc);
        assert!(by_blob.get("diff-size").is_none());
    }
}
