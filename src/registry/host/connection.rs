//! One host of a registry, the origin or a mirror: its HTTP clients, how it is
//! addressed, its credentials and tokens, its retries and counters. Every request to it
//! goes through [`Host::send`]; what each call sends is in api/.

use std::future::Future;
use std::sync::Arc;

use reqwest::{Method, RequestBuilder, StatusCode};
use tracing::{debug, warn};
use url::Url;

use super::address::HostShape;
use super::answer;
use super::auth::Auth;
use super::http::{Clients, own_sockets_allowed};
use super::options::ClientOptions;
use super::resolved::ResolvedUrls;
use super::retry::Retries;
use super::ssrf::Guard;
use crate::registry::error::{Error, Result};
use crate::stats::{HostCounters, RequestKind, Stats};

/// The most of a warm-up answer's body read (`GET /v2/` answers `{}`).
const WARM_UP_BODY: usize = 64 << 10;

pub struct Host {
    clients: Clients,
    base: Url,
    options: ClientOptions,
    stats: Arc<Stats>,
    retries: Retries,
    /// Where its blob GETs were redirected to.
    resolved: ResolvedUrls,
    /// Every request goes through it (see `send`).
    auth: Auth,
    /// Where the registry may send us (redirects, realms): see ssrf.rs.
    guard: Arc<Guard>,
    /// How this host is addressed (a mirror's path prefix and `ns=`), and its counters.
    shape: HostShape,
    counters: Arc<HostCounters>,
    /// Streams may be read from a connection of their own (api/blobs/socket.rs).
    socket_streams: bool,
}

impl Host {
    /// The host at `base`: the origin, or a mirror (`shape`).
    pub fn new(
        base: Url,
        options: ClientOptions,
        stats: Arc<Stats>,
        shape: HostShape,
    ) -> Result<Host> {
        let guard = Arc::new(Guard::new(&base));
        let clients = Clients::new(&options, guard.clone())?;
        let auth = Auth::new(
            &base,
            options.credentials.clone(),
            clients.unredirected.clone(),
            guard.clone(),
        );
        let counters = stats.host(&shape.shown(&base), shape.role());
        Ok(Host {
            clients,
            socket_streams: own_sockets_allowed(&base),
            retries: Retries::new(&options, stats.clone()),
            base,
            options,
            stats,
            resolved: ResolvedUrls::new(),
            auth,
            guard,
            shape,
            counters,
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// This host's own counters (`hosts` in `/.regfs/stats`).
    pub fn counters(&self) -> &Arc<HostCounters> {
        &self.counters
    }

    /// This host as stats and logs name it (a mirror's prefix included).
    pub fn name(&self) -> String {
        self.shape.shown(&self.base)
    }

    pub fn retries(&self) -> &Retries {
        &self.retries
    }

    /// [`Retries::run`] with this host's retries.
    pub async fn retrying<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.retries.run(op).await
    }

    /// Where blob GETs to this host were redirected.
    pub fn resolved(&self) -> &ResolvedUrls {
        &self.resolved
    }

    /// Whether blob streams may be read from a connection of their own.
    pub fn socket_streams(&self) -> bool {
        self.socket_streams
    }

    /// The URL of `path` (`/v2/…`) on this host, as it is addressed.
    pub fn url(&self, path: &str) -> Result<Url> {
        let mut url = self
            .base
            .join(&self.shape.path(path))
            .map_err(|e| Error::BadAnswer(format!("cannot build URL for {path}: {e}")))?;
        self.shape.add_query(&mut url);
        Ok(url)
    }

    /// A request whose redirects the client follows, within the guard.
    pub fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.clients.guarded.request(method, url)
    }

    /// A blob GET: its redirects are not followed by the client but by the caller, which
    /// checks each with [`Self::check_redirect`].
    pub fn blob_request(&self, url: Url) -> RequestBuilder {
        self.clients.unredirected.get(url)
    }

    /// Whether the registry may send regfs to `url` (ssrf.rs).
    pub fn check_redirect(&self, what: &str, url: &Url) -> Result<()> {
        self.guard.check(what, "redirect", url)
    }

    /// Adds the credentials known to work to a request sent by other means than
    /// [`Self::send`], and counts it.
    pub fn prepare_own_request(&self, request: &mut reqwest::Request) {
        self.auth.attach(request);
        Stats::add(&self.counters.requests, 1);
    }

    /// Sends a request, authenticated (see `auth.rs`). A 401/403 that survives
    /// authentication is `Error::Denied`, naming the credentials that were tried.
    pub async fn send(&self, what: &str, req: RequestBuilder) -> Result<reqwest::Response> {
        Stats::add(&self.counters.requests, 1);
        let resp = self.auth.send(what, req).await.inspect_err(|_| {
            Stats::add(&self.counters.failures, 1);
        })?;
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Stats::add(&self.counters.failures, 1);
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
            return Err(match answer::error(what, resp).await {
                Error::Denied(msg) if to_registry => {
                    Error::Denied(format!("{msg}; {}", self.auth.tried()))
                }
                other => other,
            });
        }
        Ok(resp)
    }

    /// Opens a connection for blob GETs before the first one needs it: `GET /v2/`
    /// through their client, which follows no redirects and so keeps connections of its
    /// own (a first read would otherwise wait for a handshake). The answer is not used.
    pub async fn warm_blob_client(&self) {
        let Ok(url) = self.url("/v2/") else {
            return;
        };
        let _in_flight = self.stats.request(RequestKind::Ping);
        let what = "GET /v2/ (a connection for blob reads)";
        match self.send(what, self.clients.unredirected.get(url)).await {
            // Read to its end (a few bytes; at most WARM_UP_BODY): only then does the
            // connection go back to the pool for the first read, rather than a new one.
            Ok(mut resp) => {
                let mut read = 0;
                while read < WARM_UP_BODY
                    && let Ok(Some(chunk)) = resp.chunk().await
                {
                    read += chunk.len();
                }
            }
            Err(e) => debug!(request = what, "no answer: {e}"),
        }
    }

    /// `GET /v2/`: does this look like a registry? 401 counts: it answers, and wants auth.
    pub async fn ping(&self) -> Result<()> {
        let what = "GET /v2/";
        // No retries: a mount should fail fast and say so when nothing answers.
        let _in_flight = self.stats.request(RequestKind::Ping);
        let req = self.request(Method::GET, self.url("/v2/")?);
        let resp = match self.send(what, req).await {
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
            _ => Err(answer::error(what, resp).await),
        }
    }
}
