//! Registries found as containerd finds them: `<hosts-dir>/<host>/hosts.toml` (else
//! `<hosts-dir>/_default/hosts.toml`), containerd's format: `server`, `ca`,
//! `skip_verify`, and `[host."URL"]` tables tried in order before the server. Turned
//! into the arguments of that host's `regfs mount`: the server (plain HTTP only where
//! its URL says http://), `[host]`s with the pull capability as `--mirror`s (with
//! `--insecure-mirror` where they say `skip_verify`), every `ca` in one PEM bundle for
//! `--ca-file`, the server's `skip_verify` as `--insecure` (docs/SEMANTICS.md, "Container
//! runtimes").

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
    client: Option<toml::Value>,
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    client: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn all(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A `[host]` with the pull capability: a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorHost {
    pub url: String,
    /// Its TLS certificate is not verified.
    pub skip_verify: bool,
}

/// How one registry host is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The registry URL for `regfs mount` (scheme, host, port).
    pub server: String,
    pub mirrors: Vec<MirrorHost>,
    /// Every CA file the hosts.toml names (the server's and each host's), each once, in
    /// order. The mount trusts them all for all of its hosts: it takes one bundle.
    pub ca_files: Vec<PathBuf>,
    pub insecure: bool,
}

impl HostConfig {
    /// The arguments of `regfs mount` that say how to reach the host, REGISTRY last;
    /// `ca_bundle` is the file [`HostConfig::ca_files`] were put together in.
    pub fn mount_args(&self, ca_bundle: Option<&Path>) -> Vec<OsString> {
        let mut args = Vec::new();
        for mirror in &self.mirrors {
            args.push("--mirror".into());
            args.push(mirror.url.clone().into());
            if mirror.skip_verify {
                args.push("--insecure-mirror".into());
                args.push(mirror.url.clone().into());
            }
        }
        if let Some(ca) = ca_bundle {
            args.push("--ca-file".into());
            args.push(ca.into());
        }
        if self.insecure {
            args.push("--insecure".into());
        }
        args.push(self.server.clone().into());
        args
    }

    fn add_cas(&mut self, dir: &Path, cas: Option<&OneOrMany>) {
        for ca in cas.map(OneOrMany::all).unwrap_or_default() {
            let path = relative(dir, ca);
            if !self.ca_files.contains(&path) {
                self.ca_files.push(path);
            }
        }
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
        ca_files: Vec::new(),
        insecure: file.skip_verify.unwrap_or(false),
    };
    config.add_cas(dir, file.ca.as_ref());
    if file.client.is_some() {
        warn!("{host}: hosts.toml's client certificate is not supported; the mount presents none");
    }
    for (url, value) in file.host {
        let entry: HostEntry = value
            .try_into()
            .map_err(|e| format!("[host.{url:?}]: {e}"))?;
        if entry.client.is_some() {
            warn!(
                "{host}: [host.{url:?}]'s client certificate is not supported; the mount presents none"
            );
        }
        let skip_verify = entry.skip_verify.unwrap_or(false);
        // A [host] of the server itself only says how to reach it (a common way to
        // write skip_verify or a CA for a private registry).
        if origin(&url)? == server {
            config.insecure |= skip_verify;
            config.add_cas(dir, entry.ca.as_ref());
            continue;
        }
        let pulls = entry
            .capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == "pull"));
        if !pulls {
            continue;
        }
        config.add_cas(dir, entry.ca.as_ref());
        config.mirrors.push(MirrorHost {
            url: mirror_url(&url)?,
            skip_verify,
        });
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
        parse(
            host,
            toml::from_str(text).expect("in a test"),
            Path::new("/certs.d/h"),
        )
        .expect("in a test")
    }

    fn mirror(url: &str, skip_verify: bool) -> MirrorHost {
        MirrorHost {
            url: url.into(),
            skip_verify,
        }
    }

    fn args(config: &HostConfig, bundle: Option<&str>) -> Vec<String> {
        config
            .mount_args(bundle.map(Path::new))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn containerd_hosts_files() {
        let plain = config("127.0.0.1:5000", r#"server = "http://127.0.0.1:5000""#);
        assert_eq!(plain.server, "http://127.0.0.1:5000/");
        assert!(plain.mirrors.is_empty() && plain.ca_files.is_empty());
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
            [
                mirror("http://cache.local:5000", false),
                mirror("https://harbor.local/v2/hub", false)
            ]
        );
        assert_eq!(hub.ca_files, [Path::new("/certs.d/h/harbor.pem")]);
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
        assert_eq!(args(&config("reg.local", ""), None), ["https://reg.local/"]);
    }

    #[test]
    fn every_ca_is_kept_in_order_once() {
        let c = config(
            "reg.local",
            r#"
            ca = ["/etc/pki/one.pem", "two.pem"]
            [host."https://reg.local"]
              ca = "three.pem"
            [host."https://mirror.local"]
              capabilities = ["pull"]
              ca = ["two.pem", "/abs/four.pem"]
            [host."https://push.local"]
              capabilities = ["push"]
              ca = "not-used-for-pulls.pem"
            "#,
        );
        assert_eq!(
            c.ca_files,
            [
                "/etc/pki/one.pem",
                "/certs.d/h/two.pem",
                "/certs.d/h/three.pem",
                "/abs/four.pem"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            args(&c, Some("/root/certs/reg.local.pem")),
            [
                "--mirror",
                "https://mirror.local",
                "--ca-file",
                "/root/certs/reg.local.pem",
                "https://reg.local/"
            ]
        );
    }

    #[test]
    fn a_mirrors_skip_verify_is_its_own() {
        let c = config(
            "reg.local:5000",
            r#"
            server = "https://reg.local:5000"
            [host."https://spegel.local:30020"]
              capabilities = ["pull", "resolve"]
              skip_verify = true
            [host."https://cache.local"]
              capabilities = ["pull"]
            "#,
        );
        assert!(!c.insecure, "a mirror's skip_verify is not the server's");
        assert_eq!(
            c.mirrors,
            [
                mirror("https://spegel.local:30020", true),
                mirror("https://cache.local", false)
            ]
        );
        assert_eq!(
            args(&c, None),
            [
                "--mirror",
                "https://spegel.local:30020",
                "--insecure-mirror",
                "https://spegel.local:30020",
                "--mirror",
                "https://cache.local",
                "https://reg.local:5000/"
            ]
        );
        // What the mount makes of those arguments: only the first mirror unverified.
        let mut specs: Vec<crate::registry::MirrorSpec> = c
            .mirrors
            .iter()
            .map(|m| crate::registry::MirrorSpec::parse(&m.url).expect("in a test"))
            .collect();
        let insecure: Vec<String> = c
            .mirrors
            .iter()
            .filter(|m| m.skip_verify)
            .map(|m| m.url.clone())
            .collect();
        crate::registry::mark_insecure(&mut specs, &insecure).expect("in a test");
        assert_eq!(
            specs.iter().map(|m| m.insecure).collect::<Vec<_>>(),
            [true, false]
        );
    }

    #[test]
    fn missing_file_means_https() {
        let dir = tempfile::tempdir().expect("in a test");
        let c = host_config(dir.path(), "r.io:443").expect("in a test");
        assert_eq!(c.server, "https://r.io/");
        std::fs::create_dir(dir.path().join("_default")).expect("in a test");
        std::fs::write(dir.path().join("_default/hosts.toml"), "skip_verify = true")
            .expect("in a test");
        assert!(host_config(dir.path(), "r.io").expect("in a test").insecure);
    }
}
