//! Image references as containers/storage names them in an Additional Layer Store
//! (docs/SEMANTICS.md, "Container runtimes"): a directory named by the reference in
//! base64 (the standard alphabet, padded: Go's `base64.StdEncoding`), the reference in
//! the full form containers/image gives it, `host[:port]/path[:tag][@digest]`, where
//! Docker Hub is `docker.io` and its one-component names are `library/<name>`.
//!
//! A reference names a registry; only this mount's registry is served here.

use base64::Engine as _;
use url::Url;

use crate::registry::is_docker_hub;
use crate::registry::{Digest, Reference, RepoName, Tag};

/// How references name Docker Hub.
const DOCKER_HUB: &str = "docker.io";

/// An image reference, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry it names, as written (`docker.io` when it names none).
    pub domain: String,
    pub repo: RepoName,
    /// The digest if it has one (a digest wins over a tag), else the tag (`latest` if none).
    pub reference: Reference,
}

/// The reference a layer store directory is named by, if it is one.
pub fn decode(name: &str) -> Option<ImageRef> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(name)
        .ok()?;
    parse(std::str::from_utf8(&bytes).ok()?)
}

/// Splits a reference (distribution's grammar, as containers/image normalises it).
pub fn parse(reference: &str) -> Option<ImageRef> {
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, d)) => (rest, Some(Digest::parse(d)?)),
        None => (reference, None),
    };
    // A tag is after the last ':' that follows the last '/' (a port's ':' precedes it).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_owned(), path.to_owned())
        }
        _ => (DOCKER_HUB.to_owned(), name.to_owned()),
    };
    let path = if is_docker_hub(&domain) && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d),
        (None, Some(t)) => Reference::Tag(Tag::parse(t)?),
        (None, None) => Reference::Tag(Tag::parse("latest")?),
    };
    Some(ImageRef {
        domain,
        repo: RepoName::parse(&path)?,
        reference,
    })
}

/// The registry a mount serves, as references name it.
#[derive(Clone, Debug)]
pub struct RegistryDomain {
    base: Url,
}

impl RegistryDomain {
    pub fn of(base: &Url) -> RegistryDomain {
        RegistryDomain { base: base.clone() }
    }

    /// Whether `domain` (`host[:port]` of a reference) names this registry: the same
    /// host and port (a missing port is the scheme's), or both Docker Hub.
    pub fn names(&self, domain: &str) -> bool {
        let ours = self.base.host_str().unwrap_or_default();
        if is_docker_hub(ours) || is_docker_hub(domain) {
            return is_docker_hub(ours) && is_docker_hub(domain);
        }
        let Ok(theirs) = Url::parse(&format!("{}://{domain}/", self.base.scheme())) else {
            return false;
        };
        let same_place = theirs.path() == "/" && theirs.username().is_empty();
        same_place
            && theirs.host_str() == Some(ours)
            && theirs.port_or_known_default() == self.base.port_or_known_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn split(s: &str) -> (String, String, String) {
        let r = parse(s).unwrap_or_else(|| panic!("{s} parses"));
        let reference = match r.reference {
            Reference::Tag(t) => t.to_string(),
            Reference::Digest(d) => d.to_string(),
        };
        (r.domain, r.repo.as_str().to_owned(), reference)
    }

    fn owned(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.to_owned(), b.to_owned(), c.to_owned())
    }

    #[test]
    fn references_split() {
        assert_eq!(
            split("127.0.0.1:5000/team/app:v1"),
            owned("127.0.0.1:5000", "team/app", "v1")
        );
        let digest = format!("sha256:{HEX}");
        assert_eq!(
            split(&format!("127.0.0.1:5000/team/app:v1@{digest}")),
            owned("127.0.0.1:5000", "team/app", &digest)
        );
        assert_eq!(split("localhost/app"), owned("localhost", "app", "latest"));
        assert_eq!(
            split("docker.io/library/alpine:3"),
            owned("docker.io", "library/alpine", "3")
        );
        assert_eq!(
            split("alpine"),
            owned("docker.io", "library/alpine", "latest")
        );
        assert_eq!(split("me/app:1.0"), owned("docker.io", "me/app", "1.0"));
        assert!(parse("127.0.0.1:5000/Team/app").is_none());
        assert!(parse("127.0.0.1:5000/app@sha256:short").is_none());
        assert!(parse("127.0.0.1:5000/app:bad/tag").is_none());
    }

    #[test]
    fn names_are_base64_of_the_reference() {
        // What containers/storage makes: base64.StdEncoding of the reference.
        let name = base64::engine::general_purpose::STANDARD.encode("127.0.0.1:5000/team/app:v1");
        let r = decode(&name).expect("decodes");
        assert_eq!(r.repo.as_str(), "team/app");
        assert!(decode("not base64!").is_none());
        assert!(decode(&base64::engine::general_purpose::STANDARD.encode("a b")).is_none());
    }

    #[test]
    fn only_this_registry() {
        let local = RegistryDomain::of(&Url::parse("http://127.0.0.1:5000/").expect("url"));
        assert!(local.names("127.0.0.1:5000"));
        assert!(!local.names("127.0.0.1:5001"));
        assert!(!local.names("localhost:5000"));
        assert!(!local.names("docker.io"));
        let tls = RegistryDomain::of(&Url::parse("https://registry.example.com/").expect("url"));
        assert!(tls.names("registry.example.com"));
        assert!(tls.names("registry.example.com:443"));
        assert!(!tls.names("registry.example.com:5000"));
        assert!(!tls.names("user@registry.example.com"));
        let hub = RegistryDomain::of(&Url::parse("https://registry-1.docker.io/").expect("url"));
        assert!(hub.names("docker.io"));
        assert!(hub.names("index.docker.io"));
        assert!(!hub.names("ghcr.io"));
    }
}
