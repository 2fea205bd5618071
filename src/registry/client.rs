//! The Distribution API client: catalog and tag lists (paginated), manifests, blob HEAD
//! and ranged blob GET. It knows nothing of FUSE; every answer is checked before use.

use std::collections::HashSet;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use lru::LruCache;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tracing::{debug, info, warn};
use url::Url;

use super::auth::Auth;
use super::credentials::Credentials;
use super::error::{Error, Result};
use super::hosts::{HostShape, Hosts};
use super::ssrf::Guard;
use super::types::{Digest, Reference, RepoName, Tag, media_type};
use crate::stats::{HostCounters, RequestKind, Stats};

/// Manifests larger than this are refused: the distribution spec lets registries cap
/// them at 4 MiB, and nothing legitimate comes close.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// A list that needs more pages than this is treated as a broken `Link` loop.
const MAX_PAGES: usize = 100_000;
/// Redirect hops followed for one blob request (registry → CDN → signed URL ...).
pub(super) const MAX_REDIRECTS: usize = 5;
/// What regfs calls itself in every request.
pub(super) const USER_AGENT: &str = concat!("regfs/", env!("CARGO_PKG_VERSION"));
/// A `Retry-After` longer than this is not waited for in full: a reader is blocked.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Upload chunk size unless told otherwise: see README, "Performance", for the measurement.
pub const DEFAULT_CHUNK_SIZE: usize = 16 << 20;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `n=` for catalog and tag-list pages.
    pub page_size: u32,
    pub connect_timeout: Duration,
    /// Longest silence while waiting for any part of an answer.
    pub read_timeout: Duration,
    /// Retries of an idempotent request after a transient failure (connect error,
    /// reset, 5xx, 429), with exponential backoff and jitter from `retry_delay`.
    pub max_retries: usize,
    pub retry_delay: Duration,
    /// Total time for one idempotent operation, retries included (`--timeout`).
    pub total_timeout: Duration,
    /// Extra trusted roots (PEM) besides the system's (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Skip certificate verification (`--insecure`).
    pub insecure: bool,
    pub credentials: Credentials,
    /// Bytes per PATCH of a blob upload (raised to the registry's
    /// `OCI-Chunk-Min-Length` if it asks for more). An upload holds about two.
    pub chunk_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            page_size: 1000,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_retries: 5,
            retry_delay: Duration::from_millis(100),
            total_timeout: Duration::from_secs(60),
            ca_file: None,
            insecure: false,
            credentials: Credentials::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }
}

/// A manifest as served, with the digest it was verified against.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

#[derive(Clone)]
pub struct RegistryClient {
    pub(super) http: reqwest::Client,
    /// For blob GETs: follows no redirects by itself, so that regfs can remember where
    /// a blob lives and decide what is sent to another host.
    pub(super) blob_http: reqwest::Client,
    base: Url,
    options: ClientOptions,
    stats: Arc<Stats>,
    /// Where a blob's GET was redirected to, reused for its later ranges.
    pub(super) resolved: Arc<Mutex<LruCache<Digest, (Url, Instant)>>>,
    /// Every request goes through it (see `send`).
    auth: Arc<Auth>,
    /// Where the registry may send us (redirects, realms): see ssrf.rs.
    pub(super) guard: Arc<Guard>,
    /// The mirrors content-addressed reads try first (hosts.rs); none for a mirror's
    /// own client.
    pub(super) hosts: Arc<Hosts>,
    /// How this host is addressed (a mirror's path prefix and `ns=`), and its counters.
    shape: HostShape,
    host: Arc<HostCounters>,
    /// Streams may be read from a connection of their own (socket_body.rs).
    socket_streams: bool,
}

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
    let with_scheme = if s.contains("://") {
        s.to_owned()
    } else {
        format!("https://{s}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("invalid registry {s:?}: {e}"))?;
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

/// The `rel="next"` target of a `Link` header, e.g.
/// `</v2/_catalog?last=b&n=2>; rel="next"`. Returns None when there is no next page.
pub fn next_link(header: &str) -> Option<&str> {
    let mut rest = header;
    loop {
        let start = rest.find('<')?;
        let end = start + rest[start..].find('>')?;
        let target = &rest[start + 1..end];
        // Parameters run up to the next link (the next '<'), or the end.
        let after = &rest[end + 1..];
        let params_end = after.find('<').unwrap_or(after.len());
        let is_next = after[..params_end].split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.strip_prefix("rel=")
                .map(|v| v.trim_matches('"').split_whitespace().any(|r| r == "next"))
                .unwrap_or(false)
        });
        if is_next {
            return Some(target);
        }
        rest = &after[params_end..];
    }
}

/// Redirects reqwest follows by itself (manifests, HEADs, lists): at most
/// [`MAX_REDIRECTS`], never from https to http, never into the machine's own network
/// (ssrf.rs). reqwest drops `Authorization` when a redirect leaves the origin.
fn guarded_redirects(guard: Arc<Guard>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let from_https = attempt
            .previous()
            .first()
            .is_some_and(|u| u.scheme() == "https");
        let what = attempt
            .previous()
            .last()
            .map_or_else(String::new, |u| format!("request to {}", u.path()));
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if from_https && attempt.url().scheme() == "http" {
            let to = attempt.url().origin().ascii_serialization();
            attempt.error(format!("redirected from https to {to}"))
        } else if let Err(e) = guard.check(&what, "redirect", attempt.url()) {
            attempt.error(e.to_string())
        } else {
            attempt.follow()
        }
    })
}

/// A transport error in a few words: what failed and its root cause ("cannot connect:
/// Connection refused (os error 111)"), not reqwest's whole chain with the URL repeated.
fn describe(e: &reqwest::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(inner) = root.source() {
        root = inner;
    }
    let stage = if e.is_timeout() {
        "timed out (--timeout)"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "reading the body"
    } else {
        "request failed"
    };
    if std::ptr::addr_eq(root, e) {
        format!("{stage}: {e}")
    } else {
        format!("{stage}: {root}")
    }
}

pub(super) fn transport(what: &str, e: &reqwest::Error) -> Error {
    Error::Unavailable(format!("{what}: {}", describe(e)))
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse().ok())
}

#[derive(Deserialize)]
struct ListPage {
    #[serde(default)]
    repositories: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

impl RegistryClient {
    pub fn new(base: Url, options: ClientOptions, stats: Arc<Stats>) -> Result<RegistryClient> {
        Self::build(base, options, stats, HostShape::origin())
    }

    /// A client of one host: the origin, or a mirror (`shape`).
    pub(super) fn build(
        base: Url,
        options: ClientOptions,
        stats: Arc<Stats>,
        shape: HostShape,
    ) -> Result<RegistryClient> {
        // One TLS provider for the process (reqwest panics without one); an error only
        // means one is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra_roots = extra_roots(&options)?;
        let builder = || {
            reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(options.connect_timeout.min(options.read_timeout))
                .read_timeout(options.read_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                // Blocks are requested in parallel; Nagle would only add latency.
                .tcp_nodelay(true)
                // The system's roots (platform verifier) plus --ca-file's.
                .tls_certs_merge(extra_roots.clone())
                .tls_danger_accept_invalid_certs(options.insecure)
        };
        let set_up =
            |e: reqwest::Error| Error::Unavailable(format!("HTTP client set-up: {}", describe(&e)));
        let guard = Arc::new(Guard::new(&base));
        let http = builder()
            .redirect(guarded_redirects(guard.clone()))
            .build()
            .map_err(set_up)?;
        let blob_http = builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(set_up)?;
        let auth = Auth::new(
            &base,
            options.credentials.clone(),
            blob_http.clone(),
            guard.clone(),
        );
        let resolved = LruCache::new(NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN));
        let host = stats.host(&shape.shown(&base), shape.role());
        let socket_streams = super::socket_body::usable_for(&base);
        Ok(RegistryClient {
            http,
            blob_http,
            base,
            options,
            stats,
            resolved: Arc::new(Mutex::new(resolved)),
            auth: Arc::new(auth),
            guard,
            hosts: Arc::new(Hosts::none()),
            shape,
            host,
            socket_streams,
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn backoff_builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.options.retry_delay)
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(self.options.max_retries)
            .with_jitter()
    }

    /// The waits between the attempts of one operation that fails transiently
    /// (`max_retries` of them), for callers that cannot use [`Self::retrying`].
    pub(super) fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        self.backoff_builder().build()
    }

    /// How long to wait after `e` when the backoff says `planned`: the registry's
    /// `Retry-After` if it sent one, capped.
    pub(super) fn retry_wait(e: &Error, planned: Duration) -> Duration {
        e.retry_after()
            .map_or(planned, |asked| asked.min(MAX_RETRY_AFTER))
    }

    /// Runs `op` again after transient failures, with exponential backoff and jitter,
    /// honouring `Retry-After`. Only for idempotent requests.
    pub(super) async fn retrying<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let backoff = self.backoff_builder();
        let total = self.options.total_timeout;
        let deadline = tokio::time::Instant::now() + total;
        let last_error = Mutex::new(None::<String>);
        // Each attempt gets what is left of `total`, so a registry that stays silent
        // fails the operation within --timeout, naming the last thing that went wrong.
        let mut op = op;
        let attempt = || {
            let fut = op();
            let last_error = &last_error;
            async move {
                match tokio::time::timeout_at(deadline, fut).await {
                    Ok(result) => result,
                    Err(_) => {
                        let last = last_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take()
                            .map_or_else(String::new, |e| format!("; last error: {e}"));
                        Err(Error::Unavailable(format!(
                            "no answer within {} (--timeout){last}",
                            humantime::format_duration(total)
                        )))
                    }
                }
            }
        };
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(Error::is_transient)
            .adjust(|e: &Error, delay| {
                let delay = delay.map(|d| Self::retry_wait(e, d))?;
                // No retry that could not start before the deadline.
                (tokio::time::Instant::now() + delay < deadline).then_some(delay)
            })
            .notify(|e, delay| {
                *last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                Stats::add(&self.stats.retries, 1);
                warn!("{e}; retrying in {} ms", delay.as_millis());
            })
            .await
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// This host as stats and logs name it (a mirror's prefix included).
    pub fn host_name(&self) -> String {
        self.shape.shown(&self.base)
    }

    pub(super) fn host_counters(&self) -> &Arc<HostCounters> {
        &self.host
    }

    pub(super) fn auth(&self) -> &Auth {
        &self.auth
    }

    pub(super) fn socket_streams(&self) -> bool {
        self.socket_streams
    }

    pub(super) fn url(&self, path: &str) -> Result<Url> {
        let mut url = self
            .base
            .join(&self.shape.path(path))
            .map_err(|e| Error::BadAnswer(format!("cannot build URL for {path}: {e}")))?;
        self.shape.add_query(&mut url);
        Ok(url)
    }

    /// Sends a request, authenticated (see `auth.rs`). A 401/403 that survives
    /// authentication is `Error::Denied`, naming the credentials that were tried.
    pub(super) async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        Stats::add(&self.host.requests, 1);
        let resp = self.auth.send(what, req).await.inspect_err(|_| {
            Stats::add(&self.host.failures, 1);
        })?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Stats::add(&self.host.failures, 1);
        }
        debug!(
            request = what,
            host = %self.base.origin().ascii_serialization(),
            status = status.as_u16(),
            version = ?resp.version(),
            "registry answered"
        );
        if matches!(
            resp.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            let to_registry = resp.url().origin() == self.base.origin();
            return Err(match Self::fail(what, resp).await {
                Error::Denied(msg) if to_registry => {
                    Error::Denied(format!("{msg}; {}", self.auth.tried()))
                }
                other => other,
            });
        }
        Ok(resp)
    }

    /// Reads a whole answer body, refusing more than `limit` bytes.
    pub(super) async fn body(
        what: &str,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes> {
        if content_length(resp.headers()).is_some_and(|n| n > limit as u64) {
            return Err(Error::BadAnswer(format!(
                "{what}: answer larger than {limit} bytes"
            )));
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport(what, &e))? {
            if buf.len() + chunk.len() > limit {
                return Err(Error::BadAnswer(format!(
                    "{what}: answer larger than {limit} bytes"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Turns a non-success answer into an error, reading (a bounded part of) its body.
    pub(super) async fn fail(what: &str, resp: reqwest::Response) -> Error {
        Self::answer_error(what, resp, Error::from_status_with).await
    }

    /// [`Self::fail`] for the answer to a write: a 4xx is the registry's refusal.
    pub(super) async fn refusal(what: &str, resp: reqwest::Response) -> Error {
        Self::answer_error(what, resp, Error::from_write_status).await
    }

    /// [`Self::fail`] for the answer to a DELETE: a 4xx is the registry not permitting it.
    pub(super) async fn delete_refusal(what: &str, resp: reqwest::Response) -> Error {
        Self::answer_error(what, resp, Error::from_delete_status).await
    }

    async fn answer_error(
        what: &str,
        resp: reqwest::Response,
        to_error: fn(&str, u16, Option<&str>, &[u8]) -> Error,
    ) -> Error {
        let status = resp.status().as_u16();
        let retry_after = header_str(resp.headers(), "retry-after").map(str::to_owned);
        let body = Self::body(what, resp, 64 << 10).await.unwrap_or_default();
        to_error(what, status, retry_after.as_deref(), &body)
    }

    /// The error for a non-success answer to a HEAD (which has no body).
    pub(super) fn head_fail(what: &str, resp: &reqwest::Response) -> Error {
        let retry_after = header_str(resp.headers(), "retry-after");
        Error::from_status_with(what, resp.status().as_u16(), retry_after, b"")
    }

    /// `GET /v2/`: does this look like a registry? 401 counts: it answers, and wants auth.
    pub async fn ping(&self) -> Result<()> {
        let what = "GET /v2/";
        // No retries: a mount should fail fast and say so when nothing answers.
        let _in_flight = self.stats.request(RequestKind::Ping);
        let resp = match self.send(what, self.http.get(self.url("/v2/")?)).await {
            Ok(resp) => resp,
            // It answers; whether these credentials open anything shows per repository.
            Err(Error::Denied(msg)) => {
                warn!("{msg}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match resp.status() {
            s if s.is_success() => Ok(()),
            _ => Err(Self::fail(what, resp).await),
        }
    }

    /// All repositories in the catalog, in the registry's order.
    pub async fn catalog(&self) -> Result<Vec<RepoName>> {
        let names = self
            .paginated(RequestKind::Catalog, "GET /v2/_catalog", "/v2/_catalog")
            .await?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let parsed = RepoName::parse(&n);
                if parsed.is_none() {
                    warn!(name = %n.escape_debug(), "catalog lists an invalid repository name; skipped");
                }
                parsed
            })
            .collect())
    }

    /// All tags of a repository.
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        let what = format!("GET /v2/{repo}/tags/list");
        let names = self
            .paginated(RequestKind::Tags, &what, &format!("/v2/{repo}/tags/list"))
            .await?;
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let parsed = Tag::parse(&n);
                if parsed.is_none() {
                    warn!(%repo, tag = %n.escape_debug(), "tag list has an invalid tag; skipped");
                }
                parsed
            })
            .collect())
    }

    /// Follows `Link: <…>; rel="next"` until the last page. Links must stay on the
    /// registry's own origin: credentials are never sent elsewhere.
    async fn paginated(&self, kind: RequestKind, what: &str, path: &str) -> Result<Vec<String>> {
        let mut url = self.url(path)?;
        url.query_pairs_mut()
            .append_pair("n", &self.options.page_size.to_string());
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            if !seen.insert(url.clone()) {
                return Err(Error::BadAnswer(format!(
                    "{what}: Link header loops to {url}"
                )));
            }
            let (next, body) = self.retrying(|| self.page(kind, what, &url)).await?;
            let page: ListPage = serde_json::from_slice(&body)
                .map_err(|e| Error::BadAnswer(format!("{what}: invalid JSON: {e}")))?;
            items.extend(page.repositories.or(page.tags).unwrap_or_default());
            match next {
                None => return Ok(items),
                Some(link) => {
                    let next_url = url.join(&link).map_err(|e| {
                        Error::BadAnswer(format!("{what}: invalid Link {link:?}: {e}"))
                    })?;
                    if next_url.origin() != self.base.origin() {
                        return Err(Error::BadAnswer(format!(
                            "{what}: Link points to another host: {next_url}"
                        )));
                    }
                    url = next_url;
                }
            }
        }
        Err(Error::BadAnswer(format!(
            "{what}: more than {MAX_PAGES} pages"
        )))
    }

    /// One page of a list: its `Link` to the next page, and its body.
    async fn page(
        &self,
        kind: RequestKind,
        what: &str,
        url: &Url,
    ) -> Result<(Option<String>, Bytes)> {
        let _in_flight = self.stats.request(kind);
        let resp = self.send(what, self.http.get(url.clone())).await?;
        if !resp.status().is_success() {
            return Err(Self::fail(what, resp).await);
        }
        let next = header_str(resp.headers(), "link")
            .and_then(next_link)
            .map(str::to_owned);
        Ok((next, Self::body(what, resp, 64 << 20).await?))
    }

    pub(super) fn manifest_request(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<reqwest::RequestBuilder> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        Ok(self
            .http
            .request(method, url)
            .header(header::ACCEPT, media_type::ACCEPT_MANIFESTS))
    }

    /// GET a manifest by tag or digest. The bytes are checked: against the digest asked
    /// for, and against `Docker-Content-Digest` when the registry sends one.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<FetchedManifest> {
        self.reference_read(reference, |host| {
            Box::pin(host.get_manifest_once(repo, reference))
        })
        .await
    }

    async fn get_manifest_once(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<FetchedManifest> {
        let what = format!("GET /v2/{repo}/manifests/{reference}");
        let _in_flight = self.stats.request(RequestKind::Manifest);
        let req = self.manifest_request(Method::GET, repo, reference)?;
        let resp = self.send(&what, req).await?;
        if !resp.status().is_success() {
            return Err(Self::fail(&what, resp).await);
        }
        let media_type = header_str(resp.headers(), "content-type")
            .unwrap_or_default()
            .to_owned();
        let header_digest = self.digest_header(&what, resp.headers())?;
        let bytes = Self::body(&what, resp, MAX_MANIFEST_BYTES).await?;
        let digest = match (reference, header_digest) {
            (Reference::Digest(d), _) => d.clone(),
            (Reference::Tag(_), Some(d)) => d,
            // Without the header, the canonical digest is the sha256 of what was served.
            (Reference::Tag(_), None) => Digest::sha256_of(&bytes),
        };
        if !digest.matches(&bytes) {
            return Err(Error::BadAnswer(format!(
                "{what}: body does not hash to {digest}"
            )));
        }
        Ok(FetchedManifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// HEAD a manifest: its digest and size without the body.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, u64)> {
        self.reference_read(reference, |host| {
            Box::pin(host.head_manifest_once(repo, reference))
        })
        .await
    }

    async fn head_manifest_once(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, u64)> {
        let what = format!("HEAD /v2/{repo}/manifests/{reference}");
        let _in_flight = self.stats.request(RequestKind::Manifest);
        let req = self.manifest_request(Method::HEAD, repo, reference)?;
        let resp = self.send(&what, req).await?;
        if !resp.status().is_success() {
            return Err(Self::head_fail(&what, &resp));
        }
        let size = content_length(resp.headers())
            .ok_or_else(|| Error::BadAnswer(format!("{what}: no Content-Length")))?;
        let digest = match (self.digest_header(&what, resp.headers())?, reference) {
            (Some(d), Reference::Digest(asked)) if d != *asked => {
                return Err(Error::BadAnswer(format!(
                    "{what}: registry answered for {d}"
                )));
            }
            (Some(d), _) => d,
            (None, Reference::Digest(asked)) => asked.clone(),
            (None, Reference::Tag(_)) => {
                return Err(Error::BadAnswer(format!(
                    "{what}: no Docker-Content-Digest"
                )));
            }
        };
        Ok((digest, size))
    }

    /// PUT a manifest by tag or digest. The Content-Type is the manifest's `mediaType`,
    /// or its detected kind; the body must hash to a digest reference. Returns the
    /// digest the registry stored it under, checked against the body. A PUT of the same
    /// bytes to the same reference is idempotent, so transient failures are retried.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: Bytes,
    ) -> Result<Digest> {
        let what = format!("PUT /v2/{repo}/manifests/{reference}");
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(Error::Invalid(format!(
                "{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let content_type =
            media_type::of_manifest(&body).map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
        let digest = match reference {
            Reference::Digest(d) if d.matches(&body) => d.clone(),
            Reference::Digest(_) => {
                return Err(Error::Mismatch(format!(
                    "{what}: the manifest's content has digest {}",
                    Digest::sha256_of(&body)
                )));
            }
            Reference::Tag(_) => Digest::sha256_of(&body),
        };
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        self.retrying(|| async {
            let _in_flight = self.stats.request(RequestKind::ManifestPut);
            let req = self
                .http
                .put(url.clone())
                .header(header::CONTENT_TYPE, content_type.as_str())
                .body(body.clone());
            let resp = self.send(&what, req).await?;
            if resp.status() != StatusCode::CREATED {
                return Err(Self::refusal(&what, resp).await);
            }
            match self.digest_header(&what, resp.headers())? {
                Some(stored) if stored != digest => Err(Error::Mismatch(format!(
                    "{what}: the registry stored it as {stored}, its content is {digest}"
                ))),
                _ => Ok(()),
            }
        })
        .await?;
        info!(%repo, %reference, %digest, bytes = body.len(), "manifest pushed");
        Ok(digest)
    }

    pub(super) fn digest_header(&self, what: &str, headers: &HeaderMap) -> Result<Option<Digest>> {
        match header_str(headers, "docker-content-digest") {
            None => Ok(None),
            Some(v) => Digest::parse(v.trim()).map(Some).ok_or_else(|| {
                Error::BadAnswer(format!("{what}: invalid Docker-Content-Digest {v:?}"))
            }),
        }
    }
}
/// The roots named by `--ca-file`, added to the system's.
fn extra_roots(options: &ClientOptions) -> Result<Vec<reqwest::Certificate>> {
    let Some(path) = &options.ca_file else {
        return Ok(Vec::new());
    };
    let shown = path.display();
    let pem =
        std::fs::read(path).map_err(|e| Error::Unavailable(format!("--ca-file {shown}: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Error::Unavailable(format!("--ca-file {shown}: {}", describe(&e))))?;
    if certs.is_empty() {
        return Err(Error::Unavailable(format!(
            "--ca-file {shown}: no PEM certificate in it"
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.example/v2/x/tags/list?n=1&last=a>; rel=next"#),
            Some("https://r.example/v2/x/tags/list?n=1&last=a")
        );
        // Several links; only the one with rel="next" counts.
        assert_eq!(
            next_link(r#"</prev>; rel="prev", </next?a=1>; title="x"; rel="next""#),
            Some("/next?a=1")
        );
        assert_eq!(next_link(r#"</first>; rel="first""#), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage <unclosed"), None);
    }

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

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// A link target: a path and query, without the characters that end one.
        fn target() -> impl Strategy<Value = String> {
            "/v2/[a-z0-9/_.-]{1,30}(\\?[a-z]=[a-z0-9]{1,8}(&[a-z]=[a-z0-9]{1,8}){0,2})?"
        }

        proptest! {
            #[test]
            fn link_parsing_never_panics(header in any::<String>()) {
                let _ = next_link(&header);
            }

            /// Several links, some `rel="next"`: the first of those is the answer.
            #[test]
            fn the_first_next_link_is_found(
                links in prop::collection::vec((target(), prop::sample::select(vec!["next", "prev", "first", "last"]), any::<bool>()), 0..5)
            ) {
                let header = links
                    .iter()
                    .map(|(url, rel, quoted)| if *quoted {
                        format!("<{url}>; rel=\"{rel}\"")
                    } else {
                        format!("<{url}>; rel={rel}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let expected = links.iter().find(|(_, rel, _)| *rel == "next").map(|(u, _, _)| u.as_str());
                prop_assert_eq!(next_link(&header), expected);
            }

        }
    }
}
