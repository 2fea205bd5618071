//! Validated names (Digest, RepoName, Tag) and the parts of manifests regfs reads.
//!
//! Every name here comes from outside (a path a program asked for, or a registry answer),
//! so each newtype can only be built by a parser that checks the grammar of the
//! distribution spec. Code that holds a `Digest` never has to re-check it.

use std::fmt;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// A content digest `algorithm:encoded`. Only sha256 and sha512 are accepted: those are
/// the algorithms registries serve, and the only ones regfs can verify.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Option<Digest> {
        let (algorithm, hex) = s.split_once(':')?;
        let expected_len = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            _ => return None,
        };
        let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        (hex.len() == expected_len && hex.chars().all(lower_hex)).then(|| Digest(s.to_owned()))
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::sha256();
        hasher.update(bytes);
        hasher.digest()
    }

    /// Whether `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        hasher.matches(self)
    }

    /// An incremental hasher for this digest's algorithm, for content that arrives in
    /// pieces (blob reads, uploads).
    pub fn hasher(&self) -> DigestHasher {
        match self.algorithm() {
            "sha256" => DigestHasher::Sha256(Sha256::new()),
            _ => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    pub fn encoded(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, e)| e)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 bytes of a sha256 digest (`None` for another algorithm).
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        if self.algorithm() != "sha256" {
            return None;
        }
        let hex = self.encoded().as_bytes();
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(out)
    }
}

/// Hashes content piece by piece with the algorithm of a [`Digest`].
#[derive(Clone)]
pub enum DigestHasher {
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// Whether everything hashed so far is the content named by `digest`.
    pub fn matches(self, digest: &Digest) -> bool {
        digest == &self.digest()
    }

    /// The digest of everything hashed so far.
    pub fn digest(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest(format!("sha256:{}", hex(&h.finalize()))),
            DigestHasher::Sha512(h) => Digest(format!("sha512:{}", hex(&h.finalize()))),
        }
    }

    pub fn sha256() -> DigestHasher {
        DigestHasher::Sha256(Sha256::new())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A repository name: `/`-separated components of lowercase alphanumerics joined by
/// `.`, `_`, `__` or runs of `-` (distribution spec). At most 255 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub const MAX_LEN: usize = 255;

    pub fn parse(s: &str) -> Option<RepoName> {
        (s.len() <= Self::MAX_LEN && s.split('/').all(is_path_component))
            .then(|| RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Sorted sets of names can be searched by `&str` (see fs/known_repos.rs).
impl std::borrow::Borrow<str> for RepoName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Whether `s` can be one `/`-separated component of a repository name.
pub fn is_path_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Separators between alphanumeric runs: a single '.', '_' or "__", or any run of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let valid = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Tag> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        (first_ok && rest_ok && s.len() <= 128).then(|| Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    )*};
}
display_as_str!(Digest, RepoName, Tag);

/// A digest is written as its string (`sha256:<hex>`) in JSON regfs makes.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Read back from what regfs wrote (the disk cache); checked like any digest.
impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).ok_or_else(|| serde::de::Error::custom("not a digest"))
    }
}

/// What a manifest is fetched by: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A digest if it parses as one, else a tag.
    pub fn parse(s: &str) -> Option<Reference> {
        match Digest::parse(s) {
            Some(d) => Some(Reference::Digest(d)),
            None => Tag::parse(s).map(Reference::Tag),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

pub mod media_type {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Every manifest type regfs asks for, as one Accept header value.
    pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
        application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.list.v2+json";

    /// The Content-Type a manifest is pushed with: its own `mediaType`, or, when it has none
    /// (the field is optional in OCI), the kind its shape and its descriptors' types say.
    pub fn of_manifest(body: &[u8]) -> Result<String, String> {
        let raw: super::RawManifest =
            serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
        if let Some(declared) = raw.media_type {
            return if is_media_type(&declared) {
                Ok(declared)
            } else {
                Err(format!("mediaType {declared:?} is not a media type"))
            };
        }
        let docker = |d: &super::RawDescriptor| d.media_type.starts_with("application/vnd.docker.");
        let detected = match (raw.manifests, raw.config) {
            (Some(children), _) if !children.is_empty() && children.iter().all(docker) => {
                DOCKER_MANIFEST_LIST
            }
            (Some(_), _) => OCI_INDEX,
            (None, Some(config)) if docker(&config) => DOCKER_MANIFEST,
            (None, Some(_)) => OCI_MANIFEST,
            (None, None) => {
                return Err("neither an image manifest (config) nor an index (manifests)".into());
            }
        };
        Ok(detected.to_owned())
    }

    /// `type/subtype` with the characters RFC 6838 allows (suffixes such as `+json` included).
    fn is_media_type(s: &str) -> bool {
        let token = |t: &str| {
            !t.is_empty()
                && t.len() <= 127
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
        };
        s.split_once('/')
            .is_some_and(|(kind, sub)| token(kind) && token(sub))
    }
}

/// A content descriptor that has passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// What regfs needs to know of a manifest: the objects it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestLinks {
    /// An image manifest: config and layers are blobs.
    Image { blobs: Vec<Descriptor> },
    /// An index or manifest list: children are manifests.
    Index { manifests: Vec<Descriptor> },
}

/// The JSON shape shared by OCI and Docker manifests, read leniently: unknown fields
/// are ignored, missing lists are empty. Descriptors are validated after parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
}

impl ManifestLinks {
    /// Parses a manifest body. An index is recognised by its media type, or by a
    /// `manifests` list when the body does not say (the OCI spec makes it optional).
    pub fn parse(body: &[u8], content_type: &str) -> Result<ManifestLinks, String> {
        let raw: RawManifest =
            serde_json::from_slice(body).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
        let media_type = raw.media_type.as_deref().unwrap_or(content_type);
        let is_index = media_type == media_type::OCI_INDEX
            || media_type == media_type::DOCKER_MANIFEST_LIST
            || (raw.config.is_none() && raw.manifests.is_some());
        if is_index {
            let manifests = raw.manifests.unwrap_or_default();
            Ok(ManifestLinks::Index {
                manifests: validate(manifests)?,
            })
        } else {
            let blobs = raw.config.into_iter().chain(raw.layers).collect();
            Ok(ManifestLinks::Image {
                blobs: validate(blobs)?,
            })
        }
    }
}

fn validate(raw: Vec<RawDescriptor>) -> Result<Vec<Descriptor>, String> {
    raw.into_iter()
        .map(|d| {
            let digest = Digest::parse(&d.digest)
                .ok_or_else(|| format!("descriptor has an invalid digest {:?}", d.digest))?;
            Ok(Descriptor {
                media_type: d.media_type,
                digest,
                size: d.size,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digest_grammar() {
        assert!(Digest::parse(&format!("sha256:{HEX64}")).is_some());
        assert!(Digest::parse(&format!("sha512:{HEX64}{HEX64}")).is_some());
        assert!(Digest::parse(&format!("sha256:{}", HEX64.to_uppercase())).is_none());
        assert!(Digest::parse(&format!("sha256:{}", &HEX64[1..])).is_none());
        assert!(Digest::parse(&format!("md5:{HEX64}")).is_none());
        assert!(Digest::parse(HEX64).is_none());
        assert!(Digest::parse("sha256:").is_none());
        assert!(Digest::parse(&format!("sha256:{}g", &HEX64[1..])).is_none());
    }

    #[test]
    fn digest_of_bytes_matches() {
        let d = Digest::sha256_of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(d.matches(b""));
        assert!(!d.matches(b"x"));
        assert_eq!(d.algorithm(), "sha256");
    }

    #[test]
    fn repo_name_grammar() {
        for ok in [
            "a",
            "team/app",
            "a.b_c__d--e/f-g",
            "library/alpine",
            "x9/0y",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "a/.hidden",
            "a b",
            "..",
            "a/../b",
            "ä",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn tag_grammar() {
        for ok in ["latest", "v1.0", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"t".repeat(129)] {
            assert!(Tag::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parses_image_and_index() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"c","digest":"sha256:{HEX64}","size":7}},
               "layers":[{{"mediaType":"l","digest":"sha256:{HEX64}","size":9}}]}}"#,
            media_type::OCI_MANIFEST
        );
        match ManifestLinks::parse(image.as_bytes(), "").expect("parses") {
            ManifestLinks::Image { blobs } => {
                assert_eq!(blobs.iter().map(|b| b.size).collect::<Vec<_>>(), [7, 9])
            }
            other => panic!("{other:?}"),
        }
        // An index without mediaType is still an index.
        let index = format!(r#"{{"manifests":[{{"digest":"sha256:{HEX64}","size":3}}]}}"#);
        assert!(matches!(
            ManifestLinks::parse(index.as_bytes(), "").expect("parses"),
            ManifestLinks::Index { manifests } if manifests.len() == 1
        ));
    }

    #[test]
    fn manifest_media_type_declared_or_detected() {
        let desc =
            |mt: &str| format!(r#"{{"mediaType":"{mt}","digest":"sha256:{HEX64}","size":1}}"#);
        let declared = format!(
            r#"{{"mediaType":"{}","manifests":[]}}"#,
            media_type::OCI_INDEX
        );
        assert_eq!(
            media_type::of_manifest(declared.as_bytes()).as_deref(),
            Ok(media_type::OCI_INDEX)
        );
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{},"layers":[]}}"#,
            desc("c")
        );
        assert_eq!(
            media_type::of_manifest(oci.as_bytes()).as_deref(),
            Ok(media_type::OCI_MANIFEST)
        );
        let docker = format!(
            r#"{{"config":{},"layers":[]}}"#,
            desc("application/vnd.docker.container.image.v1+json")
        );
        assert_eq!(
            media_type::of_manifest(docker.as_bytes()).as_deref(),
            Ok(media_type::DOCKER_MANIFEST)
        );
        let list = format!(r#"{{"manifests":[{}]}}"#, desc(media_type::DOCKER_MANIFEST));
        assert_eq!(
            media_type::of_manifest(list.as_bytes()).as_deref(),
            Ok(media_type::DOCKER_MANIFEST_LIST)
        );
        let index = format!(r#"{{"manifests":[{}]}}"#, desc(media_type::OCI_MANIFEST));
        assert_eq!(
            media_type::of_manifest(index.as_bytes()).as_deref(),
            Ok(media_type::OCI_INDEX)
        );
        assert!(media_type::of_manifest(b"{}").is_err());
        assert!(media_type::of_manifest(b"not json").is_err());
        assert!(
            media_type::of_manifest(
                br#"{"mediaType":"x
Evil: 1","manifests":[]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(ManifestLinks::parse(b"not json", "").is_err());
        let bad_digest = r#"{"layers":[{"digest":"sha256:zz","size":1}]}"#;
        assert!(ManifestLinks::parse(bad_digest.as_bytes(), "").is_err());
        let negative = format!(r#"{{"layers":[{{"digest":"sha256:{HEX64}","size":-1}}]}}"#);
        assert!(ManifestLinks::parse(negative.as_bytes(), "").is_err());
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// The distribution spec's grammar of a repository path component.
        const COMPONENT: &str = "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,3}";

        proptest! {
            #[test]
            fn parsers_never_panic_and_keep_what_they_accept(s in any::<String>()) {
                let kept = |parsed: Option<&str>| parsed.is_none_or(|p| p == s);
                prop_assert!(kept(Digest::parse(&s).as_ref().map(Digest::as_str)));
                prop_assert!(kept(Tag::parse(&s).as_ref().map(Tag::as_str)));
                prop_assert!(kept(RepoName::parse(&s).as_ref().map(RepoName::as_str)));
            }

            #[test]
            fn digests_are_sha256_or_sha512_in_lowercase_hex(hex in "[0-9a-f]{64}", long in "[0-9a-f]{128}", at in 0usize..64) {
                let parses = |s: String| Digest::parse(&s).is_some();
                let mut upper = hex.clone().into_bytes();
                upper[at] = b'G';
                let upper = String::from_utf8_lossy(&upper).into_owned();
                let (short, wrong_length) = (format!("sha256:{}", &hex[1..]), format!("sha512:{hex}"));
                prop_assert!(parses("sha256:".to_owned() + &hex));
                prop_assert!(parses("sha512:".to_owned() + &long));
                prop_assert!(!parses(wrong_length));
                prop_assert!(!parses(short));
                prop_assert!(!parses("md5:".to_owned() + &hex));
                prop_assert!(!parses("sha256:".to_owned() + &upper));
            }

            #[test]
            fn a_digest_matches_exactly_its_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), flip in any::<prop::sample::Index>()) {
                let digest = Digest::sha256_of(&bytes);
                prop_assert!(Digest::parse(digest.as_str()).is_some());
                prop_assert!(digest.matches(&bytes));
                if !bytes.is_empty() {
                    let mut other = bytes.clone();
                    other[flip.index(bytes.len())] ^= 1;
                    prop_assert!(!digest.matches(&other));
                }
            }

            #[test]
            fn tags_follow_the_grammar(tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", bad in "[^A-Za-z0-9._-]") {
                let parses = |s: String| Tag::parse(&s).is_some();
                let too_long = tag.clone() + &"x".repeat(129 - tag.len());
                prop_assert!(parses(tag.clone()));
                prop_assert!(!parses(tag.clone() + &bad));
                prop_assert!(!parses(".".to_owned() + &tag));
                prop_assert!(!parses(too_long));
            }

            #[test]
            fn repository_names_follow_the_grammar(
                parts in prop::collection::vec(COMPONENT, 1..4),
                bad in prop::sample::select(vec!["", ".", "..", "-a", "a-", "A", "a..b", "a___b", "a b"]),
                at in any::<prop::sample::Index>(),
            ) {
                let name = parts.join("/");
                prop_assume!(name.len() <= RepoName::MAX_LEN);
                prop_assert!(RepoName::parse(&name).is_some(), "{}", name);
                let mut broken = parts.clone();
                broken[at.index(parts.len())] = bad.to_owned();
                prop_assert!(RepoName::parse(&broken.join("/")).is_none(), "{:?}", broken);
                let (leading, trailing) = ("/".to_owned() + &name, name.clone() + "/");
                prop_assert!(RepoName::parse(&leading).is_none());
                prop_assert!(RepoName::parse(&trailing).is_none());
            }
        }
    }
}
