//! How a host is named and addressed: registry URLs as users write them, Docker Hub's
//! names, and a mirror's path prefix and `ns=` (docs/SEMANTICS.md, "Mirrors").

use url::Url;

/// Docker Hub's names; the API itself is served by `registry-1.docker.io`.
pub fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// Parses `http://host:port`, `https://host[:port]` or a bare `host[:port]` (https).
/// `docker.io` and `index.docker.io` mean `registry-1.docker.io`.
pub fn parse_registry_url(s: &str) -> std::result::Result<Url, String> {
    let url = Url::parse(&with_scheme(s)).map_err(|e| format!("invalid registry {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "registry {s:?}: only http:// and https:// are supported"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("registry {s:?} has no host"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!(
            "registry {s:?}: give only scheme, host and port (no path)"
        ));
    }
    if url.host_str().is_some_and(is_docker_hub) && url.port().is_none() {
        return Url::parse("https://registry-1.docker.io/").map_err(|e| e.to_string());
    }
    Ok(url)
}

/// `s` with `https://` in front unless it names its scheme.
pub fn with_scheme(s: &str) -> String {
    if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    }
}

/// How one host is addressed: the origin as it is; a mirror with its prefix and `ns=`.
#[derive(Clone, Debug, Default)]
pub struct HostShape {
    mirror: bool,
    prefix: Option<String>,
    /// The origin's name, sent to a mirror as `ns=`.
    ns: Option<String>,
}

impl HostShape {
    pub fn origin() -> HostShape {
        HostShape::default()
    }

    /// A mirror of the origin called `ns`, with `prefix` before every repository name.
    pub fn mirror(prefix: Option<String>, ns: String) -> HostShape {
        HostShape {
            mirror: true,
            prefix,
            ns: Some(ns),
        }
    }

    pub fn role(&self) -> &'static str {
        if self.mirror { "mirror" } else { "origin" }
    }

    /// The host as stats and logs name it.
    pub fn shown(&self, base: &Url) -> String {
        let origin = base.origin().ascii_serialization();
        match &self.prefix {
            Some(prefix) => format!("{origin}/{prefix}"),
            None => origin,
        }
    }

    /// `path` as this host is asked for it: `/v2/<name>/…` with the prefix before the
    /// name (`/v2/` itself unchanged).
    pub fn path(&self, path: &str) -> String {
        match (&self.prefix, path.strip_prefix("/v2/")) {
            (Some(prefix), Some(rest)) if !rest.is_empty() => format!("/v2/{prefix}/{rest}"),
            _ => path.to_owned(),
        }
    }

    pub fn add_query(&self, url: &mut Url) {
        if let Some(ns) = &self.ns
            && url.path() != "/v2/"
        {
            url.query_pairs_mut().append_pair("ns", ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls() {
        assert_eq!(
            parse_registry_url("localhost:5000")
                .expect("valid")
                .as_str(),
            "https://localhost:5000/"
        );
        assert_eq!(
            parse_registry_url("http://127.0.0.1:5000")
                .expect("valid")
                .scheme(),
            "http"
        );
        assert_eq!(
            parse_registry_url("ghcr.io").expect("valid").as_str(),
            "https://ghcr.io/"
        );
        assert!(parse_registry_url("ftp://x").is_err());
        assert!(parse_registry_url("http://x/some/path").is_err());
        assert!(parse_registry_url("http://").is_err());
    }

    #[test]
    fn a_mirror_path_prefixes_repository_names() {
        let shape = HostShape::mirror(Some("hub".into()), "docker.io".into());
        assert_eq!(
            shape.path("/v2/library/alpine/blobs/sha256:ab"),
            "/v2/hub/library/alpine/blobs/sha256:ab"
        );
        assert_eq!(shape.path("/v2/"), "/v2/");
        let mut url = Url::parse("https://m.example/v2/hub/a/manifests/sha256:ab").expect("url");
        shape.add_query(&mut url);
        assert_eq!(url.query(), Some("ns=docker.io"));
        let mut ping = Url::parse("https://m.example/v2/").expect("url");
        shape.add_query(&mut ping);
        assert_eq!(ping.query(), None);
        assert_eq!(
            HostShape::origin().path("/v2/a/tags/list"),
            "/v2/a/tags/list"
        );
    }
}
