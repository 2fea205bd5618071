//! Many hosts for one registry: mirrors for content-addressed reads, the origin for the
//! rest (DESIGN §9).
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
//! Each host has a client of its own: its own challenges and tokens, its own redirect
//! guard, its own counters (`hosts` in `/.regfs/stats`). A mirror gets credentials only
//! when the docker config names its host. Requests to a mirror carry `ns=<origin>`, as
//! containerd sends them, so a mirror in front of several registries (Spegel, Dragonfly)
//! knows which one is meant; a path in the mirror's URL goes before repository names
//! (a Harbor proxy project: `--mirror https://harbor.example/hub` reads `library/alpine`
//! as `hub/library/alpine`).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use lru::LruCache;
use tracing::{debug, info, warn};
use url::Url;

use super::client::{ClientOptions, RegistryClient, is_docker_hub, parse_registry_url};
use super::credentials::Credentials;
use super::error::{Error, Result};
use super::types::{Digest, Reference, RepoName};
use crate::stats::{RequestKind, Stats};

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
}

impl MirrorSpec {
    /// `http://host:port`, `https://host[:port][/prefix]` or a bare `host[:port]`
    /// (https). Credentials come from the docker config for the mirror's host only.
    pub fn parse(s: &str) -> std::result::Result<MirrorSpec, String> {
        let with_scheme = if s.contains("://") {
            s.to_owned()
        } else {
            format!("https://{s}")
        };
        let url = Url::parse(&with_scheme).map_err(|e| format!("invalid mirror {s:?}: {e}"))?;
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
        })
    }
}

/// How one host is addressed: the origin as it is; a mirror with its prefix and `ns=`.
#[derive(Clone, Debug, Default)]
pub(super) struct HostShape {
    mirror: bool,
    prefix: Option<String>,
    /// The origin's name, sent to a mirror as `ns=`.
    ns: Option<String>,
}

impl HostShape {
    pub(super) fn origin() -> HostShape {
        HostShape::default()
    }

    pub(super) fn role(&self) -> &'static str {
        if self.mirror { "mirror" } else { "origin" }
    }

    /// The host as stats and logs name it.
    pub(super) fn shown(&self, base: &Url) -> String {
        let origin = base.origin().ascii_serialization();
        match &self.prefix {
            Some(prefix) => format!("{origin}/{prefix}"),
            None => origin,
        }
    }

    /// `path` as this host is asked for it: `/v2/<name>/…` with the prefix before the
    /// name (`/v2/` itself unchanged).
    pub(super) fn path(&self, path: &str) -> String {
        match (&self.prefix, path.strip_prefix("/v2/")) {
            (Some(prefix), Some(rest)) if !rest.is_empty() => format!("/v2/{prefix}/{rest}"),
            _ => path.to_owned(),
        }
    }

    pub(super) fn add_query(&self, url: &mut Url) {
        if let Some(ns) = &self.ns
            && url.path() != "/v2/"
        {
            url.query_pairs_mut().append_pair("ns", ns);
        }
    }
}

/// The mirrors of a client (none for a mirror's own client, or without `--mirror`).
#[derive(Default)]
pub(super) struct Hosts {
    mirrors: Vec<Mirror>,
    /// How long a mirror may take to start answering.
    patience: Duration,
}

impl Hosts {
    pub(super) fn none() -> Hosts {
        Hosts::default()
    }

    /// The mirrors that may be asked for `digest` now, in order.
    fn usable<'a, 'd>(
        &'a self,
        digest: &'d Digest,
    ) -> impl Iterator<Item = &'a Mirror> + use<'a, 'd> {
        self.mirrors.iter().filter(move |m| m.may_ask(digest))
    }
}

struct Mirror {
    client: RegistryClient,
    /// Not asked before then: it failed for want of an answer.
    resting_until: Mutex<Option<Instant>>,
    /// Digests it lacked or got wrong.
    skipped: Mutex<LruCache<Digest, ()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mirror {
    fn name(&self) -> String {
        self.client.host_name()
    }

    fn may_ask(&self, digest: &Digest) -> bool {
        let resting = lock(&self.resting_until).is_some_and(|until| Instant::now() < until);
        !resting && !lock(&self.skipped).contains(digest)
    }

    fn skip(&self, digest: &Digest) {
        lock(&self.skipped).put(digest.clone(), ());
    }

    /// A read this mirror could not serve goes on to the next host; `e` says why, and
    /// whether to leave the mirror alone for a while or only for this digest.
    fn passed_on(&self, digest: &Digest, e: &Error) {
        Stats::add(&self.client.host_counters().passed_on, 1);
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

impl RegistryClient {
    /// This client with `mirrors` in front of it for content-addressed reads.
    pub fn with_mirrors(mut self, mirrors: Vec<MirrorSpec>) -> Result<RegistryClient> {
        let origin_host = self.base().host_str().unwrap_or_default();
        let ns = if is_docker_hub(origin_host) {
            "docker.io".to_owned()
        } else {
            match self.base().port() {
                Some(port) => format!("{origin_host}:{port}"),
                None => origin_host.to_owned(),
            }
        };
        let patience = (self.options().total_timeout / 4).min(MAX_PATIENCE);
        let mut built = Vec::with_capacity(mirrors.len());
        for spec in mirrors {
            let options = ClientOptions {
                credentials: spec.credentials.clone(),
                ..self.options().clone()
            };
            let shape = HostShape {
                mirror: true,
                prefix: spec.prefix.clone(),
                ns: Some(ns.clone()),
            };
            let client =
                RegistryClient::build(spec.base.clone(), options, self.stats().clone(), shape)?;
            info!(
                "mirror {}: {}",
                client.host_name(),
                spec.credentials.describe()
            );
            built.push(Mirror {
                client,
                resting_until: Mutex::new(None),
                skipped: Mutex::new(LruCache::new(
                    NonZeroUsize::new(SKIPPED_DIGESTS).unwrap_or(NonZeroUsize::MIN),
                )),
            });
        }
        self.hosts = Arc::new(Hosts {
            mirrors: built,
            patience,
        });
        Ok(self)
    }

    /// The same registry without its mirrors: for writes, and the reads that decide
    /// them, which must see the origin.
    pub fn origin_only(&self) -> RegistryClient {
        let mut origin = self.clone();
        origin.hosts = Arc::new(Hosts::none());
        origin
    }

    /// Whether some mirror may still be asked for `digest`.
    pub fn mirrors_may_serve(&self, digest: &Digest) -> bool {
        self.hosts.usable(digest).next().is_some()
    }

    /// The content of `digest` turned out wrong, and may have come from a mirror: no
    /// mirror is asked for it again. True if one could have served it (so reading it
    /// again, from the origin, may give other bytes).
    pub fn distrust_mirrors(&self, digest: &Digest) -> bool {
        let mut any = false;
        for mirror in self.hosts.usable(digest) {
            warn!(
                "{digest}: content does not match its digest; it is read from the origin from now on (mirror {})",
                mirror.name()
            );
            mirror.skip(digest);
            any = true;
        }
        any
    }

    /// `op` on each mirror that may serve `digest`, in order, then on the origin (with
    /// retries). Only for reads of content named by `digest`, which `op` checks.
    pub(super) async fn content_read<'a, T>(
        &'a self,
        digest: &Digest,
        op: impl Fn(&'a RegistryClient) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        for mirror in self.hosts.usable(digest) {
            let answer = tokio::time::timeout(self.hosts.patience, op(&mirror.client)).await;
            let e = match answer {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => e,
                Err(_) => Error::Unavailable(format!(
                    "no answer within {} ms",
                    self.hosts.patience.as_millis()
                )),
            };
            mirror.passed_on(digest, &e);
        }
        self.retrying(|| op(self)).await
    }

    /// A read of what `reference` names: by digest like [`Self::content_read`] (a mirror
    /// may answer); by tag from the origin only, retried (a tag's answer changes).
    pub(super) async fn reference_read<'a, T>(
        &'a self,
        reference: &Reference,
        op: impl Fn(&'a RegistryClient) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        match reference {
            Reference::Digest(digest) => self.content_read(digest, op).await,
            Reference::Tag(_) => self.retrying(|| op(self)).await,
        }
    }

    /// The whole blob from the first mirror that serves it right, in pieces of `piece`
    /// bytes, hashed before anything of it is handed out; None when no mirror did
    /// (each that failed is passed over as in [`Self::content_read`]). For blobs small
    /// enough to hold whole: nothing from a mirror is served unchecked.
    pub async fn verified_from_mirror(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        piece: usize,
    ) -> Option<Vec<Bytes>> {
        let piece = piece.max(1);
        // The whole transfer, not only its start, is bounded: a reader waits for it.
        let limit = self.options().total_timeout / 2;
        for mirror in self.hosts.usable(digest) {
            let host = &mirror.client;
            let fetched = tokio::time::timeout(limit, async {
                let in_flight = host.stats().request(RequestKind::BlobStream);
                let opened = host.open_blob(repo, digest, 0, None, in_flight);
                let mut body = tokio::time::timeout(self.hosts.patience, opened)
                    .await
                    .map_err(|_| Error::Unavailable("no answer in time".into()))??;
                let mut hasher = digest.hasher();
                let mut pieces = Vec::new();
                let mut current =
                    BytesMut::with_capacity(usize::try_from(size).unwrap_or(piece).min(piece));
                let mut received = 0u64;
                while let Some(mut chunk) = body.chunk().await? {
                    received += chunk.len() as u64;
                    if received > size {
                        return Err(Error::BadAnswer(format!(
                            "{}: more than the blob's {size} bytes",
                            body.what()
                        )));
                    }
                    hasher.update(&chunk);
                    while !chunk.is_empty() {
                        let take = chunk.len().min(piece - current.len());
                        current.extend_from_slice(&chunk.split_to(take));
                        if current.len() == piece {
                            pieces.push(
                                std::mem::replace(&mut current, BytesMut::with_capacity(piece))
                                    .freeze(),
                            );
                        }
                    }
                }
                if received != size {
                    return Err(Error::Unavailable(format!(
                        "{}: answer ended after {received} of {size} bytes",
                        body.what()
                    )));
                }
                if !hasher.matches(digest) {
                    return Err(Error::Mismatch(format!(
                        "{}: content does not match its digest",
                        body.what()
                    )));
                }
                if !current.is_empty() {
                    pieces.push(current.freeze());
                }
                Ok(pieces)
            })
            .await
            .unwrap_or_else(|_| Err(Error::Unavailable("the blob did not arrive in time".into())));
            match fetched {
                Ok(pieces) => return Some(pieces),
                Err(e) => mirror.passed_on(digest, &e),
            }
        }
        None
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
    fn a_mirror_path_prefixes_repository_names() {
        let shape = HostShape {
            mirror: true,
            prefix: Some("hub".into()),
            ns: Some("docker.io".into()),
        };
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
