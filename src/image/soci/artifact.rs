//! The SOCI index: an OCI image manifest whose config media type names it, whose
//! layers are the image's zTOCs (each annotated with the layer it indexes), and, in
//! version 1, whose `subject` is the image manifest, so it is found as a referrer.
//! Version 2 has no subject: the image manifest names it instead, in its
//! `com.amazon.soci.index-digest` annotation.
//!
//! Written byte for byte as soci-snapshotter writes it (Go's `encoding/json` of the
//! OCI manifest struct: fields in struct order, empty ones left out, annotation keys
//! sorted, `<`, `>`, `&` escaped), so an index regfs publishes has the digest
//! soci-snapshotter would give the same content. Read leniently but checked: an index
//! is untrusted (docs/SEMANTICS.md, "Trust").

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ztoc::MAX_ZTOC_BYTES;
use crate::registry::{Descriptor, Digest};

pub const ARTIFACT_TYPE_V1: &str = "application/vnd.amazon.soci.index.v1+json";
pub const ARTIFACT_TYPE_V2: &str = "application/vnd.amazon.soci.index.v2+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The media type of a zTOC in an index.
pub const ZTOC_MEDIA_TYPE: &str = "application/octet-stream";
/// Prefetch lists (span ranges to fetch first): listed among the zTOCs, not used.
pub const PREFETCH_MEDIA_TYPE: &str = "application/vnd.amazon.soci.prefetch.v1+json";
pub const ANNOTATION_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
/// Note the capital T: soci's spelling.
pub const ANNOTATION_LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
pub const ANNOTATION_SPAN_SIZE: &str = "com.amazon.soci.span-size";
pub const ANNOTATION_DISABLE_XATTRS: &str = "com.amazon.soci.disable-xattrs";
pub const ANNOTATION_BUILD_TOOL: &str = "com.amazon.soci.build-tool-identifier";
/// On an image manifest: the digest of its v2 SOCI index.
pub const ANNOTATION_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
/// On a v2 index's descriptor in an OCI index: the image manifest it is for.
pub const ANNOTATION_IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
/// The config blob of every SOCI index: `{}`.
pub const EMPTY_CONFIG: &[u8] = b"{}";
pub const EMPTY_CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// soci's defaults: layers smaller than this get no zTOC; uncompressed bytes between
/// checkpoints.
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;
/// Largest index manifest read.
pub const MAX_INDEX_BYTES: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexVersion {
    V1,
    V2,
}

impl IndexVersion {
    pub fn artifact_type(self) -> &'static str {
        match self {
            IndexVersion::V1 => ARTIFACT_TYPE_V1,
            IndexVersion::V2 => ARTIFACT_TYPE_V2,
        }
    }
}

/// One zTOC of an index, and the layer it indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtocRef {
    /// The zTOC blob (its media type is [`ZTOC_MEDIA_TYPE`]).
    pub digest: Digest,
    pub size: u64,
    pub layer_digest: Digest,
    pub layer_media_type: String,
    /// The span size its builder used (informational: the zTOC has the checkpoints).
    pub span_size: Option<u64>,
    /// The builder saw no xattrs in the layer.
    pub disable_xattrs: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SociIndex {
    pub version: IndexVersion,
    /// In the image's layer order.
    pub ztocs: Vec<ZtocRef>,
    /// The image manifest (version 1).
    pub subject: Option<Descriptor>,
    pub build_tool: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIndex {
    #[serde(default)]
    media_type: Option<String>,
    config: RawDescriptor,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    subject: Option<RawDescriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn digest(text: &str, what: &str) -> Result<Digest, String> {
    Digest::parse(text).ok_or_else(|| format!("SOCI index: {what} {text:?} is not a digest"))
}

fn size(v: i64, what: &str) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("SOCI index: {what} has size {v}"))
}

impl SociIndex {
    /// Reads an index manifest (untrusted). zTOC descriptors without a layer digest,
    /// prefetch lists and anything else are skipped, as soci-snapshotter does; for a
    /// layer named twice the first zTOC counts.
    pub fn parse(body: &[u8]) -> Result<SociIndex, String> {
        if body.len() > MAX_INDEX_BYTES {
            return Err(format!("SOCI index of {} bytes: too large", body.len()));
        }
        let raw: RawIndex = serde_json::from_slice(body)
            .map_err(|e| format!("SOCI index is not a manifest: {e}"))?;
        if raw
            .media_type
            .as_deref()
            .is_some_and(|m| m != MANIFEST_MEDIA_TYPE)
        {
            return Err(format!("SOCI index with media type {:?}", raw.media_type));
        }
        let version = match raw.config.media_type.as_str() {
            ARTIFACT_TYPE_V1 => IndexVersion::V1,
            ARTIFACT_TYPE_V2 => IndexVersion::V2,
            other => return Err(format!("not a SOCI index (config media type {other:?})")),
        };
        let subject = raw
            .subject
            .map(|s| -> Result<Descriptor, String> {
                Ok(Descriptor {
                    media_type: s.media_type,
                    digest: digest(&s.digest, "subject")?,
                    size: size(s.size, "subject")?,
                })
            })
            .transpose()?;
        let mut ztocs: Vec<ZtocRef> = Vec::new();
        for layer in raw.layers {
            if let Some(z) = ztoc_ref(layer)? {
                if !ztocs.iter().any(|o| o.layer_digest == z.layer_digest) {
                    ztocs.push(z);
                }
            }
        }
        Ok(SociIndex {
            version,
            ztocs,
            subject,
            build_tool: raw.annotations.get(ANNOTATION_BUILD_TOOL).cloned(),
        })
    }

    /// A v1 index of an image manifest's zTOCs (in layer order), as regfs publishes it.
    pub fn v1(subject: Descriptor, ztocs: Vec<ZtocRef>, build_tool: &str) -> SociIndex {
        SociIndex {
            version: IndexVersion::V1,
            ztocs,
            subject: Some(subject),
            build_tool: Some(build_tool.into()),
        }
    }

    /// The zTOC for a layer, if the index has one.
    pub fn ztoc_for(&self, layer: &Digest) -> Option<&ZtocRef> {
        self.ztocs.iter().find(|z| &z.layer_digest == layer)
    }

    /// The manifest bytes, as soci-snapshotter writes them.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::with_capacity(512 + 400 * self.ztocs.len());
        out.push_str(r#"{"schemaVersion":2,"mediaType":"#);
        go_string(&mut out, MANIFEST_MEDIA_TYPE);
        out.push_str(r#","config":"#);
        let config = [
            ("mediaType", self.version.artifact_type()),
            ("digest", EMPTY_CONFIG_DIGEST),
        ];
        descriptor(&mut out, &config, 2, &BTreeMap::new());
        out.push_str(r#","layers":["#);
        for (i, z) in self.ztocs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let fields = [
                ("mediaType", ZTOC_MEDIA_TYPE),
                ("digest", z.digest.as_str()),
            ];
            descriptor(&mut out, &fields, z.size, &z.annotations());
        }
        out.push(']');
        if let Some(s) = &self.subject {
            out.push_str(r#","subject":"#);
            let fields = [
                ("mediaType", s.media_type.as_str()),
                ("digest", s.digest.as_str()),
            ];
            descriptor(&mut out, &fields, s.size, &BTreeMap::new());
        }
        if let Some(tool) = &self.build_tool {
            out.push_str(r#","annotations":"#);
            map(
                &mut out,
                &BTreeMap::from([(ANNOTATION_BUILD_TOOL.to_string(), tool.clone())]),
            );
        }
        out.push('}');
        out.into_bytes()
    }
}

fn ztoc_ref(d: RawDescriptor) -> Result<Option<ZtocRef>, String> {
    if d.media_type != ZTOC_MEDIA_TYPE {
        return Ok(None); // a prefetch list, or something newer
    }
    let Some(layer) = d.annotations.get(ANNOTATION_LAYER_DIGEST) else {
        return Ok(None);
    };
    let size = size(d.size, "a zTOC")?;
    if size > MAX_ZTOC_BYTES as u64 {
        return Err(format!("SOCI index: a zTOC of {size} bytes"));
    }
    Ok(Some(ZtocRef {
        digest: digest(&d.digest, "zTOC")?,
        size,
        layer_digest: digest(layer, "layer")?,
        layer_media_type: d
            .annotations
            .get(ANNOTATION_LAYER_MEDIA_TYPE)
            .cloned()
            .unwrap_or_default(),
        span_size: d
            .annotations
            .get(ANNOTATION_SPAN_SIZE)
            .and_then(|s| s.parse().ok()),
        disable_xattrs: d
            .annotations
            .get(ANNOTATION_DISABLE_XATTRS)
            .is_some_and(|v| v == "true"),
    }))
}

impl ZtocRef {
    /// The entry for a zTOC regfs made of a layer (publishing).
    pub fn for_layer(layer: &Descriptor, ztoc: &[u8], span_size: u64) -> ZtocRef {
        ZtocRef {
            digest: Digest::sha256_of(ztoc),
            size: ztoc.len() as u64,
            layer_digest: layer.digest.clone(),
            layer_media_type: layer.media_type.clone(),
            span_size: Some(span_size),
            disable_xattrs: false,
        }
    }

    fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::from([
            (
                ANNOTATION_LAYER_DIGEST.to_string(),
                self.layer_digest.to_string(),
            ),
            (
                ANNOTATION_LAYER_MEDIA_TYPE.to_string(),
                self.layer_media_type.clone(),
            ),
        ]);
        if let Some(s) = self.span_size {
            a.insert(ANNOTATION_SPAN_SIZE.into(), s.to_string());
        }
        if self.disable_xattrs {
            a.insert(ANNOTATION_DISABLE_XATTRS.into(), "true".into());
        }
        a
    }
}

/// Whether soci would build a zTOC for a layer: a layer media type it can read (tar or
/// gzip; not zstd), at least `min_size` bytes.
pub fn wants_ztoc(media_type: &str, size: u64, min_size: u64) -> bool {
    use crate::image::codec::Codec;
    matches!(
        Codec::of_media_type(media_type),
        Some(Codec::Gzip | Codec::Tar)
    ) && size >= min_size
}

/// Whether a referrer (by its artifact type, or its config media type for registries
/// that report none) is a v1 SOCI index; soci-snapshotter takes the first one listed.
pub fn is_v1_referrer(artifact_type: &str) -> bool {
    artifact_type == ARTIFACT_TYPE_V1
}

/// The v2 index an image manifest names in its annotations.
pub fn v2_index_of(annotations: &BTreeMap<String, String>) -> Option<Digest> {
    annotations
        .get(ANNOTATION_INDEX_DIGEST)
        .and_then(|d| Digest::parse(d))
}

/// A descriptor: string fields in order, then size, then annotations if any.
fn descriptor(
    out: &mut String,
    fields: &[(&str, &str)],
    size: u64,
    annotations: &BTreeMap<String, String>,
) {
    out.push('{');
    for (name, value) in fields {
        go_string(out, name);
        out.push(':');
        go_string(out, value);
        out.push(',');
    }
    out.push_str(&format!(r#""size":{size}"#));
    if !annotations.is_empty() {
        out.push_str(r#","annotations":"#);
        map(out, annotations);
    }
    out.push('}');
}

/// A string map with keys in byte order, as Go writes maps.
fn map(out: &mut String, m: &BTreeMap<String, String>) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        go_string(out, k);
        out.push(':');
        go_string(out, v);
    }
    out.push('}');
}

/// A JSON string as Go's `encoding/json` escapes it (HTML-safe).
fn go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    fn index() -> SociIndex {
        SociIndex {
            version: IndexVersion::V1,
            ztocs: vec![ZtocRef {
                digest: d('a'),
                size: 1234,
                layer_digest: d('b'),
                layer_media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                span_size: Some(DEFAULT_SPAN_SIZE),
                disable_xattrs: false,
            }],
            subject: Some(Descriptor {
                media_type: MANIFEST_MEDIA_TYPE.into(),
                digest: d('c'),
                size: 567,
            }),
            build_tool: Some("AWS SOCI CLI v0.2".into()),
        }
    }

    #[test]
    fn written_as_soci_writes_it() {
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let expected = format!(
            concat!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#,
                r#""config":{{"mediaType":"application/vnd.amazon.soci.index.v1+json","#,
                r#""digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"#,
                r#""layers":[{{"mediaType":"application/octet-stream","digest":"sha256:{a}","size":1234,"#,
                r#""annotations":{{"com.amazon.soci.image-layer-digest":"sha256:{b}","#,
                r#""com.amazon.soci.image-layer-mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","#,
                r#""com.amazon.soci.span-size":"4194304"}}}}],"#,
                r#""subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{c}","size":567}},"#,
                r#""annotations":{{"com.amazon.soci.build-tool-identifier":"AWS SOCI CLI v0.2"}}}}"#
            ),
            a = a,
            b = b,
            c = c
        );
        let json = index().to_json();
        assert_eq!(String::from_utf8_lossy(&json), expected);
        assert_eq!(SociIndex::parse(&json), Ok(index()));
        assert_eq!(
            Digest::sha256_of(EMPTY_CONFIG).as_str(),
            EMPTY_CONFIG_DIGEST
        );
        let mut escaped = String::new();
        go_string(&mut escaped, "a<b>&\"\u{1}");
        assert_eq!(escaped, r#""a\u003cb\u003e\u0026\"\u0001""#);
    }

    #[test]
    fn read_leniently_but_checked() {
        let v2 = SociIndex {
            version: IndexVersion::V2,
            subject: None,
            ..index()
        };
        assert_eq!(SociIndex::parse(&v2.to_json()), Ok(v2.clone()));
        let json = String::from_utf8(index().to_json()).expect("utf-8");
        let parse = |s: String| SociIndex::parse(s.as_bytes());
        assert!(parse(json.replace("soci.index.v1", "soci.index.v9")).is_err());
        assert!(parse(json.replace(r#""size":1234"#, r#""size":-1"#)).is_err());
        assert!(parse(json.replace(&"b".repeat(64), "xyz")).is_err());
        // A prefetch list and a zTOC without its layer are skipped, not errors.
        let skipped = parse(json.replace("image-layer-digest", "other"));
        assert_eq!(skipped.map(|i| i.ztocs.len()), Ok(0));
        let prefetch = parse(json.replace(
            r#""application/octet-stream""#,
            &format!("{PREFETCH_MEDIA_TYPE:?}"),
        ));
        assert_eq!(prefetch.map(|i| i.ztocs.len()), Ok(0));
        let i = index();
        assert_eq!(i.ztoc_for(&d('b')).map(|z| z.size), Some(1234));
        assert!(i.ztoc_for(&d('a')).is_none());
        assert!(wants_ztoc(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            10 << 20,
            DEFAULT_MIN_LAYER_SIZE
        ));
        assert!(!wants_ztoc(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            (10 << 20) - 1,
            DEFAULT_MIN_LAYER_SIZE
        ));
        assert!(!wants_ztoc(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            1 << 30,
            DEFAULT_MIN_LAYER_SIZE
        ));
        let layer = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d('b'),
            size: 99,
        };
        let z = ZtocRef::for_layer(&layer, b"ztoc", DEFAULT_SPAN_SIZE);
        assert_eq!((z.size, z.digest.clone()), (4, Digest::sha256_of(b"ztoc")));
        let built = SociIndex::v1(
            i.subject.clone().expect("subject"),
            vec![z],
            "AWS SOCI CLI v0.2",
        );
        assert_eq!(built.ztocs[0].layer_digest, i.ztocs[0].layer_digest);
        assert!(is_v1_referrer(ARTIFACT_TYPE_V1) && !is_v1_referrer(ARTIFACT_TYPE_V2));
        let ann = BTreeMap::from([(ANNOTATION_INDEX_DIGEST.to_string(), d('e').to_string())]);
        assert_eq!(v2_index_of(&ann), Some(d('e')));
    }
}
