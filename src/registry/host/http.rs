//! The HTTP clients of one host (reqwest, rustls with the system's roots and
//! `--ca-file`'s), the redirects they may follow, and a transport error told in a few
//! words.

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::options::ClientOptions;
use super::ssrf::Guard;
use crate::registry::error::{Error, Result};

/// Redirect hops followed for one request (registry → CDN → signed URL ...).
pub const MAX_REDIRECTS: usize = 5;
/// What regfs calls itself in every request.
pub const USER_AGENT: &str = concat!("regfs/", env!("CARGO_PKG_VERSION"));

/// Proxy settings reqwest honours on this platform: with any of them set, every request
/// goes through the client, which applies them.
const PROXY_VARIABLES: [&str; 4] = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];

/// A host's two clients: one that follows redirects within `guard`, and one that follows
/// none (for blob GETs, whose redirects are followed by hand).
pub struct Clients {
    pub guarded: reqwest::Client,
    pub unredirected: reqwest::Client,
}

impl Clients {
    pub fn new(options: &ClientOptions, guard: Arc<Guard>) -> Result<Clients> {
        // One TLS provider for the process (reqwest panics without one); an error only
        // means one is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra_roots = extra_roots(options)?;
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
        Ok(Clients {
            guarded: builder()
                .redirect(guarded_redirects(guard))
                .build()
                .map_err(set_up)?,
            unredirected: builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(set_up)?,
        })
    }
}

/// Whether requests to the host at `base` may go out on a connection of regfs's own
/// rather than through the client: plain HTTP, and no proxy for the client to apply.
pub fn own_sockets_allowed(base: &Url) -> bool {
    base.scheme() == "http"
        && PROXY_VARIABLES
            .iter()
            .all(|v| std::env::var_os(v).is_none_or(|value| value.is_empty()))
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

/// The error for a request `what` that failed in transport (no answer, or a broken one).
pub fn transport(what: &str, e: &reqwest::Error) -> Error {
    Error::Unavailable(format!("{what}: {}", describe(e)))
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
