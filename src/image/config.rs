//! An image's config, as far as regfs reads it: which blob it is (the manifest's
//! `config` descriptor), and the digest of each layer's uncompressed tar (`rootfs.diff_ids`,
//! in layer order), which container runtimes record for the layers they use.

use serde::Deserialize;

use crate::registry::Digest;

/// Largest config accepted (real ones are a few KiB; a manifest may be 4 MiB).
pub const MAX_CONFIG: u64 = 4 << 20;

/// The config an image manifest names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigRef {
    pub digest: Digest,
    pub size: u64,
}

#[derive(Deserialize)]
struct RawManifest {
    config: RawDescriptor,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The config descriptor of an image manifest's body.
pub fn config_ref(manifest: &[u8]) -> Result<ConfigRef, String> {
    let raw: RawManifest = serde_json::from_slice(manifest)
        .map_err(|e| format!("manifest names no config descriptor: {e}"))?;
    let digest = Digest::parse(&raw.config.digest)
        .ok_or_else(|| format!("invalid config digest {:?}", raw.config.digest))?;
    Ok(ConfigRef {
        digest,
        size: raw.config.size,
    })
}

/// The config's `rootfs.diff_ids`, lowest layer first.
pub fn diff_ids(config: &[u8]) -> Result<Vec<Digest>, String> {
    let raw: RawConfig =
        serde_json::from_slice(config).map_err(|e| format!("config is not valid JSON: {e}"))?;
    raw.rootfs
        .map(|r| r.diff_ids)
        .unwrap_or_default()
        .iter()
        .map(|d| Digest::parse(d).ok_or_else(|| format!("invalid diff_id {d:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn config_descriptor_of_a_manifest() {
        let m =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{A}","size":12}},"layers":[]}}"#);
        let c = config_ref(m.as_bytes()).expect("has a config");
        assert_eq!((c.digest.as_str(), c.size), (A, 12));
        assert!(config_ref(br#"{"manifests":[]}"#).is_err());
        assert!(config_ref(br#"{"config":{"digest":"sha256:zz","size":1}}"#).is_err());
    }

    #[test]
    fn diff_ids_in_layer_order() {
        let c = format!(
            r#"{{"architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}}}}"#
        );
        let ids = diff_ids(c.as_bytes()).expect("valid");
        assert_eq!(ids.iter().map(Digest::as_str).collect::<Vec<_>>(), [A, B]);
        assert_eq!(diff_ids(b"{}").expect("valid"), Vec::<Digest>::new());
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["nope"]}}"#).is_err());
    }
}
