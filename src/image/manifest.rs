//! What an image is made of: an image manifest's layers (with the annotations that
//! announce a TOC), and for an index the image matching a platform.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::registry::Digest;

/// A layer as its image manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest's layers, lowest first, or an index's children by platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageManifest {
    Image {
        layers: Vec<Layer>,
    },
    Index {
        children: Vec<(Digest, Option<Platform>)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    layers: Vec<RawLayer>,
    #[serde(default)]
    manifests: Option<Vec<RawChild>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLayer {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawChild {
    digest: String,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

impl ImageManifest {
    pub fn parse(body: &[u8], content_type: &str) -> Result<ImageManifest, String> {
        let raw: Raw =
            serde_json::from_slice(body).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
        let media_type = raw.media_type.as_deref().unwrap_or(content_type);
        let digest = |d: &str| Digest::parse(d).ok_or_else(|| format!("invalid digest {d:?}"));
        if INDEX_TYPES.contains(&media_type) || (raw.config.is_none() && raw.manifests.is_some()) {
            let children = raw
                .manifests
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    let platform = c.platform.map(|p| Platform {
                        os: p.os,
                        architecture: p.architecture,
                        variant: p.variant.filter(|v| !v.is_empty()),
                    });
                    Ok((digest(&c.digest)?, platform))
                })
                .collect::<Result<_, String>>()?;
            return Ok(ImageManifest::Index { children });
        }
        if raw.config.is_none() {
            return Err("not an image manifest (no config)".into());
        }
        let layers = raw
            .layers
            .into_iter()
            .map(|l| {
                Ok(Layer {
                    digest: digest(&l.digest)?,
                    media_type: l.media_type,
                    size: l.size,
                    annotations: l.annotations,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ImageManifest::Image { layers })
    }
}

impl Platform {
    /// The platform of this machine, as images name it (`linux/amd64`, `linux/arm64/v8`).
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// `os/arch[/variant]`, as `docker pull --platform` takes it.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid =
            |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(format!(
                "{s:?} is not os/arch or os/arch/variant (e.g. linux/arm64)"
            )),
        }
    }

    /// Whether an index child of platform `other` is this platform. A missing variant
    /// matches the architecture's usual one (arm64 means v8), as containerd does.
    pub fn matches(&self, other: &Platform) -> bool {
        let default_variant = |p: &Platform| match (p.architecture.as_str(), &p.variant) {
            (_, Some(v)) => Some(v.clone()),
            ("arm64", None) => Some("v8".to_owned()),
            _ => None,
        };
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || default_variant(self) == default_variant(other))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The child of an index that is `want`'s image.
pub fn select<'a>(
    children: &'a [(Digest, Option<Platform>)],
    want: &Platform,
) -> Option<&'a Digest> {
    children
        .iter()
        .find(|(_, p)| p.as_ref().is_some_and(|p| want.matches(p)))
        .map(|(d, _)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn image_layers_with_annotations() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"sha256:{HEX}","size":1}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{HEX}","size":5,
            "annotations":{{"containerd.io/snapshot/stargz/toc.digest":"sha256:{HEX}"}}}}]}}"#
        );
        let ImageManifest::Image { layers } =
            ImageManifest::parse(body.as_bytes(), "").expect("parses")
        else {
            panic!("an image");
        };
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].size, 5);
        assert!(
            layers[0]
                .annotations
                .contains_key("containerd.io/snapshot/stargz/toc.digest")
        );
    }

    #[test]
    fn platforms() {
        let body = format!(
            r#"{{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {{"digest":"sha256:{}","platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"digest":"sha256:{}","platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"digest":"sha256:{}","platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            HEX.replace('0', "1"),
            HEX.replace('0', "2"),
            HEX.replace('0', "3")
        );
        let ImageManifest::Index { children } =
            ImageManifest::parse(body.as_bytes(), "").expect("index")
        else {
            panic!("an index");
        };
        let pick = |p: &str| {
            select(&children, &Platform::parse(p).expect("platform")).map(|d| d.to_string())
        };
        assert_eq!(
            pick("linux/amd64"),
            Some(format!("sha256:{}", HEX.replace('0', "2")))
        );
        assert_eq!(
            pick("linux/arm64/v8"),
            Some(format!("sha256:{}", HEX.replace('0', "1")))
        );
        assert_eq!(pick("linux/arm64/v9"), None);
        assert_eq!(pick("linux/s390x"), None);
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/v1/x").is_err());
    }
}
