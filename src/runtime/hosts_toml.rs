//! Registries found as containerd finds them: `<hosts-dir>/<host>/hosts.toml` (else
//! `<hosts-dir>/_default/hosts.toml`), containerd's format: `server`, `ca`,
//! `skip_verify`, and `[host."URL"]` tables tried in order before the server. Turned
//! into the arguments of that host's `regfs mount`: the server (plain HTTP only where
//! its URL says http://), `[host]`s with the pull capability as `--mirror`s, a CA as
//! `--ca-file`, `skip_verify` as `--insecure` (docs/SEMANTICS.md, "Mirrors").

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::warn;
use url::Url;

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn first(&self) -> Option<&str> {
        match self {
            OneOrMany::One(s) => Some(s),
            OneOrMany::Many(v) => v.first().map(String::as_str),
        }
    }
}

/// How one registry host is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The registry URL for `regfs mount` (scheme, host, port).
    pub server: String,
    pub mirrors: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
}

impl HostConfig {
    /// The arguments of `regfs mount` that say how to reach the host, REGISTRY last.
    pub fn mount_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for mirror in &self.mirrors {
            args.push("--mirror".into());
            args.push(mirror.into());
        }
        if let Some(ca) = &self.ca_file {
            args.push("--ca-file".into());
            args.push(ca.into());
        }
        if self.insecure {
            args.push("--insecure".into());
        }
        args.push(self.server.clone().into());
        args
    }
}

/// The configuration of `host` ("host[:port]") under `hosts_dir`; without a
/// hosts.toml, https://host.
pub fn host_config(hosts_dir: &Path, host: &str) -> Result<HostConfig, String> {
    let own = hosts_dir.join(host).join("hosts.toml");
    let default = hosts_dir.join("_default").join("hosts.toml");
    let (path, text) = match std::fs::read_to_string(&own) {
        Ok(text) => (own, Some(text)),
        Err(_) => match std::fs::read_to_string(&default) {
            Ok(text) => (default, Some(text)),
            Err(_) => (own, None),
        },
    };
    let file: HostsFile = match text {
        Some(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => HostsFile::default(),
    };
    parse(host, file, path.parent().unwrap_or(hosts_dir))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parse(host: &str, file: HostsFile, dir: &Path) -> Result<HostConfig, String> {
    let server = match &file.server {
        Some(s) => origin(s)?,
        None => origin(&format!("https://{host}"))?,
    };
    let mut config = HostConfig {
        server: server.to_string(),
        mirrors: Vec::new(),
        ca_file: file
            .ca
            .as_ref()
            .and_then(OneOrMany::first)
            .map(|c| relative(dir, c)),
        insecure: file.skip_verify.unwrap_or(false),
    };
    for (url, value) in file.host {
        let entry: HostEntry = value
            .try_into()
            .map_err(|e| format!("[host.{url:?}]: {e}"))?;
        let pulls = entry
            .capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == "pull"));
        let ca = entry
            .ca
            .as_ref()
            .and_then(OneOrMany::first)
            .map(|c| relative(dir, c));
        // A [host] of the server itself only says how to reach it (a common way to
        // write skip_verify or a CA for a private registry).
        if origin(&url)? == server {
            config.insecure |= entry.skip_verify.unwrap_or(false);
            config.ca_file = config.ca_file.or(ca);
            continue;
        }
        if !pulls {
            continue;
        }
        if entry.skip_verify == Some(true) {
            warn!("{host}: skip_verify of mirror {url} is not applied: regfs verifies mirrors");
        }
        config.ca_file = config.ca_file.or(ca);
        config.mirrors.push(mirror_url(&url)?);
    }
    Ok(config)
}

/// A URL's scheme, host and port; containerd allows a bare host (https).
fn origin(s: &str) -> Result<Url, String> {
    let with_scheme = if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{s:?} is not an http:// or https:// URL"));
    }
    url.set_path("/");
    url.set_query(None);
    Ok(url)
}

/// A mirror keeps its path (`/v2/<project>` for a Harbor proxy project).
fn mirror_url(s: &str) -> Result<String, String> {
    origin(s)?;
    Ok(if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    })
}

/// containerd reads a relative CA path from the hosts.toml's directory.
fn relative(dir: &Path, path: &str) -> PathBuf {
    dir.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(host: &str, text: &str) -> HostConfig {
        parse(host, toml::from_str(text).unwrap(), Path::new("/certs.d/h")).unwrap()
    }

    #[test]
    fn containerd_hosts_files() {
        let plain = config("127.0.0.1:5000", r#"server = "http://127.0.0.1:5000""#);
        assert_eq!(plain.server, "http://127.0.0.1:5000/");
        assert!(plain.mirrors.is_empty());
        let hub = config(
            "docker.io",
            r#"
            server = "https://registry-1.docker.io"
            [host."http://cache.local:5000"]
              capabilities = ["pull", "resolve"]
            [host."https://harbor.local/v2/hub"]
              capabilities = ["pull"]
              ca = "harbor.pem"
            [host."https://push.local"]
              capabilities = ["push"]
            "#,
        );
        assert_eq!(
            hub.mirrors,
            ["http://cache.local:5000", "https://harbor.local/v2/hub"]
        );
        assert_eq!(hub.ca_file.unwrap(), Path::new("/certs.d/h/harbor.pem"));
        let private = config(
            "reg.local:5000",
            r#"
            server = "https://reg.local:5000"
            [host."https://reg.local:5000"]
              capabilities = ["pull", "resolve"]
              skip_verify = true
            "#,
        );
        assert!(private.insecure && private.mirrors.is_empty());
        assert_eq!(
            config("reg.local", "").mount_args(),
            [OsString::from("https://reg.local/")]
        );
    }

    #[test]
    fn missing_file_means_https() {
        let dir = tempfile::tempdir().unwrap();
        let c = host_config(dir.path(), "r.io:443").unwrap();
        assert_eq!(c.server, "https://r.io/");
        std::fs::create_dir(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "skip_verify = true").unwrap();
        assert!(host_config(dir.path(), "r.io").unwrap().insecure);
    }
}
