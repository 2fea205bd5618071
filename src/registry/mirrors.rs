//! The mirrors of a registry, and what is remembered of each (docs/SEMANTICS.md,
//! "Mirrors"). The client (client.rs) asks them first for content-addressed reads.
//!
//! `--mirror URL` (repeatable, tried in order) names hosts that keep copies of the
//! origin's content: distribution in `proxy:` mode, a Harbor proxy project, Spegel or
//! Dragonfly on the node. What is named by its digest may come from any of them, because
//! it is checked against the digest: manifests by digest, blobs, and the HEADs of both
//! go to each mirror in turn and then to the origin. Tag lists and tag resolution (their
//! answers change) and every write (a cache refuses pushes) go to the origin only.
//!
//! A mirror gets one try per read, with no retries and a bounded wait for its answer:
//! any error or 404 passes the read on to the next host; the origin, last, retries as
//! usual. A mirror that fails for want of an answer (down, 5xx, too slow) rests for
//! [`MIRROR_REST`] before it is asked again, so a dead mirror costs one failed connect
//! per half minute, not one per read. A mirror that lacks a digest, or sent wrong bytes
//! for it, is not asked for that digest again.
//!
//! Each mirror is a [`Host`] of its own: its own challenges and tokens, its own redirect
//! guard, its own counters (`hosts` in `/.regfs/stats`). A mirror gets credentials only
//! when the docker config names its host. Requests to a mirror carry `ns=<origin>`, as
//! containerd sends them, so a mirror in front of several registries (Spegel, Dragonfly)
//! knows which one is meant; a path in the mirror's URL goes before repository names
//! (a Harbor proxy project: `--mirror https://harbor.example/hub` reads `library/alpine`
//! as `hub/library/alpine`). `--insecure-mirror HOST` skips verifying one mirror's TLS
//! certificate (containerd's `skip_verify` for a `[host]`): its answers are checked
//! against their digests all the same; what is at stake is the credentials sent to it.

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use tracing::{debug, info, warn};
use url::Url;

use super::error::{Error, Result};
use super::host::{
    ClientOptions, Credentials, Host, HostShape, is_docker_hub, parse_registry_url, with_scheme,
};
use super::types::{Digest, RepoName};
use crate::stats::Stats;

/// How long a mirror that failed for want of an answer is left alone.
pub const MIRROR_REST: Duration = Duration::from_secs(30);
/// Digests per mirror remembered as not to be asked for (lacking, or wrong).
const SKIPPED_DIGESTS: usize = 4096;
/// The longest a mirror may take to start answering before a read moves on (less when
/// `--timeout` is short: a quarter of it).
const MAX_PATIENCE: Duration = Duration::from_secs(10);

/// A `--mirror`: where it is and what to log in with.
#[derive(Clone, Debug)]
pub struct MirrorSpec {
    /// Scheme, host and port.
    pub base: Url,
    /// A path in the URL: put before every repository name.
    pub prefix: Option<String>,
    pub credentials: Credentials,
    /// Its TLS certificate is not verified (`--insecure-mirror`; a hosts.toml
    /// `skip_verify`). What it serves is still checked against its digest.
    pub insecure: bool,
}

impl MirrorSpec {
    /// `http://host:port`, `https://host[:port][/prefix]` or a bare `host[:port]`
    /// (https). Credentials come from the docker config for the mirror's host only.
    pub fn parse(s: &str) -> std::result::Result<MirrorSpec, String> {
        let url = Url::parse(&with_scheme(s)).map_err(|e| format!("invalid mirror {s:?}: {e}"))?;
        let path = url.path().trim_matches('/');
        // containerd's hosts.toml writes a Harbor project as `/v2/<project>`.
        let path = path
            .strip_prefix("v2")
            .map_or(path, |p| p.trim_start_matches('/'));
        let prefix = match path {
            "" => None,
            p if RepoName::parse(p).is_some() => Some(p.to_owned()),
            p => {
                return Err(format!(
                    "mirror {s:?}: the path {p:?} is not a repository name prefix"
                ));
            }
        };
        let mut bare = url.clone();
        bare.set_path("/");
        bare.set_query(None);
        let base = parse_registry_url(bare.as_str()).map_err(|e| format!("mirror: {e}"))?;
        Ok(MirrorSpec {
            credentials: Credentials::for_mirror(&base),
            base,
            prefix,
            insecure: false,
        })
    }
}

/// Marks the mirrors at each of `hosts` (`host[:port]` or a URL) as not verified
/// (`--insecure-mirror`); a host that names no mirror is an error, not a silent no-op.
pub fn mark_insecure(
    mirrors: &mut [MirrorSpec],
    hosts: &[String],
) -> std::result::Result<(), String> {
    for host in hosts {
        let url = Url::parse(&with_scheme(host))
            .map_err(|e| format!("--insecure-mirror {host:?}: {e}"))?;
        let same = |m: &MirrorSpec| {
            m.base.host_str() == url.host_str()
                && m.base.port_or_known_default() == url.port_or_known_default()
        };
        let mut found = false;
        for mirror in mirrors.iter_mut().filter(|m| same(m)) {
            mirror.insecure = true;
            found = true;
        }
        if !found {
            return Err(format!(
                "--insecure-mirror {host:?} names no --mirror (give the mirror with --mirror too)"
            ));
        }
    }
    Ok(())
}

/// The mirrors of a client (none for writes, or without `--mirror`).
#[derive(Default)]
pub struct Mirrors {
    mirrors: Vec<Mirror>,
    /// How long a mirror may take to start answering.
    patience: Duration,
}

impl Mirrors {
    pub fn none() -> Mirrors {
        Mirrors::default()
    }

    /// A host for each of `specs`, in order, addressed as a mirror of `origin`.
    pub fn new(origin: &Host, specs: Vec<MirrorSpec>) -> Result<Mirrors> {
        let origin_host = origin.base().host_str().unwrap_or_default();
        let ns = if is_docker_hub(origin_host) {
            "docker.io".to_owned()
        } else {
            match origin.base().port() {
                Some(port) => format!("{origin_host}:{port}"),
                None => origin_host.to_owned(),
            }
        };
        let patience = (origin.options().total_timeout / 4).min(MAX_PATIENCE);
        let mut mirrors = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.insecure {
                warn!(
                    "mirror {}: its TLS certificate is not verified (--insecure-mirror); what it \
                     serves is still checked against its digest",
                    spec.base
                );
            }
            let options = ClientOptions {
                credentials: spec.credentials.clone(),
                insecure: origin.options().insecure || spec.insecure,
                ..origin.options().clone()
            };
            let shape = HostShape::mirror(spec.prefix.clone(), ns.clone());
            let host = Host::new(spec.base.clone(), options, origin.stats().clone(), shape)?;
            info!("mirror {}: {}", host.name(), spec.credentials.describe());
            mirrors.push(Mirror {
                host,
                resting_until: Mutex::new(None),
                skipped: Mutex::new(LruCache::new(
                    NonZeroUsize::new(SKIPPED_DIGESTS).unwrap_or(NonZeroUsize::MIN),
                )),
            });
        }
        Ok(Mirrors { mirrors, patience })
    }

    /// How long a mirror may take to start answering before a read moves on.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// The mirrors that may be asked for `digest` now, in order.
    pub fn usable<'a, 'd>(
        &'a self,
        digest: &'d Digest,
    ) -> impl Iterator<Item = &'a Mirror> + use<'a, 'd> {
        self.mirrors.iter().filter(move |m| m.may_ask(digest))
    }
}

pub struct Mirror {
    host: Host,
    /// Not asked before then: it failed for want of an answer.
    resting_until: Mutex<Option<Instant>>,
    /// Digests it lacked or got wrong.
    skipped: Mutex<LruCache<Digest, ()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mirror {
    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn name(&self) -> String {
        self.host.name()
    }

    fn may_ask(&self, digest: &Digest) -> bool {
        let resting = lock(&self.resting_until).is_some_and(|until| Instant::now() < until);
        !resting && !lock(&self.skipped).contains(digest)
    }

    /// Not to be asked for `digest` again.
    pub fn skip(&self, digest: &Digest) {
        lock(&self.skipped).put(digest.clone(), ());
    }

    /// A read this mirror could not serve goes on to the next host; `e` says why, and
    /// whether to leave the mirror alone for a while or only for this digest.
    pub fn passed_on(&self, digest: &Digest, e: &Error) {
        Stats::add(&self.host.counters().passed_on, 1);
        match e {
            Error::Unavailable(_) | Error::Busy { .. } => {
                let started = {
                    let mut until = lock(&self.resting_until);
                    let was_resting = until.is_some_and(|u| Instant::now() < u);
                    *until = Some(Instant::now() + MIRROR_REST);
                    !was_resting
                };
                if started {
                    warn!(
                        "mirror {}: {e}; reading from the next host for {} s",
                        self.name(),
                        MIRROR_REST.as_secs()
                    );
                }
            }
            Error::NotFound(_) => {
                debug!("mirror {} does not have {digest}: {e}", self.name());
                self.skip(digest);
            }
            Error::Denied(_) => {
                debug!("mirror {} refuses {digest}: {e}", self.name());
                self.skip(digest);
            }
            _ => {
                warn!(
                    "mirror {}: {e}; {digest} is read from the next host from now on",
                    self.name()
                );
                self.skip(digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_urls() {
        let spec = MirrorSpec::parse("http://127.0.0.1:5001").expect("valid");
        assert_eq!(spec.base.as_str(), "http://127.0.0.1:5001/");
        assert_eq!(spec.prefix, None);
        let spec = MirrorSpec::parse("harbor.example/hub-proxy/").expect("valid");
        assert_eq!(spec.base.as_str(), "https://harbor.example/");
        assert_eq!(spec.prefix.as_deref(), Some("hub-proxy"));
        let spec = MirrorSpec::parse("https://harbor.example/v2/team/proxy").expect("valid");
        assert_eq!(spec.prefix.as_deref(), Some("team/proxy"));
        assert!(MirrorSpec::parse("ftp://x").is_err());
        assert!(MirrorSpec::parse("https://h/Not..Valid").is_err());
    }

    #[test]
    fn insecure_mirrors_are_marked_by_host() {
        let mut mirrors: Vec<MirrorSpec> = ["https://a.example:5000/hub", "https://b.example"]
            .iter()
            .map(|m| MirrorSpec::parse(m).expect("valid"))
            .collect();
        mark_insecure(&mut mirrors, &["b.example:443".into()]).expect("b is a mirror");
        assert_eq!(
            mirrors.iter().map(|m| m.insecure).collect::<Vec<_>>(),
            [false, true]
        );
        mark_insecure(&mut mirrors, &["https://a.example:5000".into()]).expect("a is a mirror");
        assert!(mirrors[0].insecure);
        assert!(mark_insecure(&mut mirrors, &["a.example".into()]).is_err());
    }
}
