//! Where the registry credentials come from, in this order: `--username` with
//! `--password-stdin`, then `REGFS_USERNAME`/`REGFS_PASSWORD`, then the user's docker
//! config (`auths`, `credsStore`, `credHelpers`). Secrets never appear in `Debug` output.

use std::fmt;
use std::path::PathBuf;

use docker_credential::{CredentialRetrievalError, DockerCredential};
use serde::Deserialize;
use url::Url;

use super::address::is_docker_hub;

/// The secret itself. Deliberately no `Debug`/`Display` that could print it.
#[derive(Clone)]
pub enum Secret {
    Password {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token realm.
    IdentityToken(String),
}

/// The credentials for one registry, and a description of where they came from (or of
/// every place that was looked at), for the log line of a refusal.
#[derive(Clone)]
pub struct Credentials {
    secret: Option<Secret>,
    source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.secret {
            None => "none",
            Some(Secret::Password { .. }) => "password",
            Some(Secret::IdentityToken(_)) => "identity token",
        };
        write!(f, "Credentials({kind} from {})", self.source)
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials::anonymous("none configured")
    }
}

impl Credentials {
    pub fn anonymous(why: &str) -> Credentials {
        Credentials {
            secret: None,
            source: why.to_owned(),
        }
    }

    pub fn password(username: String, password: String, source: &str) -> Credentials {
        Credentials {
            secret: Some(Secret::Password { username, password }),
            source: source.to_owned(),
        }
    }

    pub fn secret(&self) -> Option<&Secret> {
        self.secret.as_ref()
    }

    /// "credentials from REGFS_USERNAME (user alice)" or "no credentials (looked at …)":
    /// says what was tried without saying the secret.
    pub fn describe(&self) -> String {
        match &self.secret {
            None => format!("no credentials ({})", self.source),
            Some(Secret::Password { username, .. }) => {
                format!("credentials from {} (user {username:?})", self.source)
            }
            Some(Secret::IdentityToken(_)) => {
                format!("identity token from {}", self.source)
            }
        }
    }

    /// Finds the credentials for `registry`. `flags` are `--username` and the password read
    /// from stdin. Docker config problems are not fatal: they are described and the mount
    /// goes on anonymously.
    pub fn find(flags: Option<(String, String)>, registry: &Url) -> Credentials {
        if let Some((username, password)) = flags {
            return Credentials::password(username, password, "--username/--password-stdin");
        }
        if let (Ok(username), Ok(password)) = (
            std::env::var("REGFS_USERNAME"),
            std::env::var("REGFS_PASSWORD"),
        ) {
            return Credentials::password(username, password, "REGFS_USERNAME/REGFS_PASSWORD");
        }
        from_docker_config(&docker_server_key(registry))
    }

    /// A mirror's credentials: only what the docker config names for the mirror's own
    /// host. `--username` and `REGFS_*` are the registry's and never go to a mirror.
    pub fn for_mirror(mirror: &Url) -> Credentials {
        from_docker_config(&docker_server_key(mirror))
    }
}

/// The key docker uses for a registry in config.json and with credential helpers:
/// `host[:port]`, and the historical index URL for Docker Hub.
pub fn docker_server_key(registry: &Url) -> String {
    let host = registry.host_str().unwrap_or_default();
    if is_docker_hub(host) {
        return "https://index.docker.io/v1/".to_owned();
    }
    match registry.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

fn docker_config_path() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|home| home.join(".docker")))?;
    Some(dir.join("config.json"))
}

/// $HOME, else the user's home from the password database: mount(8) runs helpers (an
/// fstab mount) with an environment that has no HOME.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|user| user.dir)
    })
}

/// Only the fields that say which helper docker would ask, to name it in the log.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct HelperNames {
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: std::collections::HashMap<String, String>,
}

fn from_docker_config(server: &str) -> Credentials {
    let Some(path) = docker_config_path() else {
        return Credentials::anonymous("no --username, no REGFS_USERNAME, no home directory");
    };
    let shown = path.display();
    let helpers: HelperNames = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let source = match helpers
        .cred_helpers
        .get(server)
        .filter(|h| !h.is_empty())
        .or(helpers.creds_store.as_ref())
    {
        Some(helper) => format!("docker-credential-{helper} (via {shown}, {server})"),
        None => format!("{shown} auths[{server:?}]"),
    };
    match docker_credential::get_credential(server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            Credentials::password(username, password, &source)
        }
        Ok(DockerCredential::IdentityToken(token)) => Credentials {
            secret: Some(Secret::IdentityToken(token)),
            source,
        },
        Err(e) => {
            let why = match e {
                CredentialRetrievalError::ConfigNotFound
                | CredentialRetrievalError::ConfigReadError => format!("no readable {shown}"),
                CredentialRetrievalError::NoCredentialConfigured => {
                    format!("nothing for {server} in {shown}")
                }
                // The helper's own output may be long; its first line says enough.
                CredentialRetrievalError::HelperFailure { helper, stderr, .. } => {
                    let first = stderr.lines().next().unwrap_or_default();
                    format!("{helper} failed for {server}: {}", first.escape_debug())
                }
                other => format!("{source}: {other}"),
            };
            Credentials::anonymous(&format!("no --username, no REGFS_USERNAME, {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_keys() {
        let key = |s: &str| docker_server_key(&Url::parse(s).expect("url"));
        assert_eq!(
            key("https://registry-1.docker.io/"),
            "https://index.docker.io/v1/"
        );
        assert_eq!(key("https://ghcr.io/"), "ghcr.io");
        assert_eq!(key("http://127.0.0.1:5000/"), "127.0.0.1:5000");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credentials::password("alice".into(), "hunter2".into(), "test");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.describe().contains("hunter2"));
        assert!(c.describe().contains("alice"));
    }
}
