//! What the proxy does: the rules it starts with, the lies it tells, how it rewrites
//! upload locations.

use std::sync::Arc;

use crate::common::http::Response;

/// Initial rules of a [`Proxy`]; each can be flipped later through the proxy's setters.
#[derive(Debug, Clone, Default)]
pub struct ProxyRules {
    /// `GET /v2/_catalog…` answers 401 UNAUTHORIZED, like most public registries.
    pub refuse_catalog: bool,
    /// Blob downloads (`GET …/blobs/<digest>`) are held until [`Proxy::release_stalls`]
    /// (or 60 s). Upload URLs (`/blobs/uploads/`) are never held.
    pub stall_blob_gets: bool,
    /// Emulates tag-list pagination (`?n=&last=` with a `Link: <…>; rel="next"` header),
    /// which distribution 2.8 ignores: it always returns every tag.
    pub paginate_tags: bool,
    /// The next this-many blob downloads send their headers and half their body, then
    /// the connection is cut (a reset in the middle of a transfer).
    pub cut_blob_gets: usize,
    /// The next this-many blob downloads answer 503 with `Retry-After: 1`.
    pub fail_blob_gets: usize,
    /// The next this-many blob downloads answer 429 Too Many Requests with `Retry-After: 1`.
    pub throttle_blob_gets: usize,
    /// Blob downloads come back with their first byte changed (a corrupting middlebox).
    pub corrupt_blob_gets: bool,
    /// Blob downloads answer `307` to this base URL with the same path and query,
    /// like a registry that sends clients to object storage.
    pub redirect_blob_gets_to: Option<String>,
    /// The next this-many `PATCH` requests (upload chunks) are cut in the middle of their
    /// body: the proxy reads half of it from the client, forwards the head and the first
    /// [`ProxyRules::cut_patch_forward`] body bytes upstream, then drops both connections.
    pub cut_patches: usize,
    /// How many body bytes of a cut `PATCH` reach the registry (0: only the head).
    pub cut_patch_forward: usize,
    /// How many `PATCH` requests go through untouched before [`ProxyRules::cut_patches`]
    /// starts cutting (0: the very first one is cut), so that a cut lands mid-upload.
    pub cut_patch_after: usize,
    /// The next this-many `PATCH` requests answer 503 with `Retry-After: 1`, unforwarded.
    pub fail_patches: usize,
    /// Blob mounts (`POST …/blobs/uploads/?mount=&from=`) are forwarded without their
    /// query, so the registry opens a plain upload session (202): a declined mount.
    pub decline_mounts: bool,
    /// Rewrites the `Location` of upload answers (`/blobs/uploads/`).
    pub upload_locations: Option<LocationRewrite>,
    /// Answer bodies are sent at this many bytes per second (0: at full speed), like a
    /// registry behind a link that barely moves.
    pub trickle_bytes_per_sec: usize,
    /// Rewrites answers, last of all rules: a registry that lies.
    pub tamper: Option<Tamper>,
}

/// A registry that lies: gets each request's method and target ("/v2/…?q") and the
/// answer the registry gave (or the proxy's other rules made), and returns what the
/// client gets instead. A response with header [`super::ANNOUNCE_LENGTH`] is framed by that
/// length whatever its body, and the connection is closed after it.
#[derive(Clone)]
pub struct Tamper(pub Arc<TamperFn>);

/// (method, target, the registry's answer) → the answer the client gets.
pub type TamperFn = dyn Fn(&str, &str, Response) -> Response + Send + Sync;

impl Tamper {
    pub fn new(f: impl Fn(&str, &str, Response) -> Response + Send + Sync + 'static) -> Tamper {
        Tamper(Arc::new(f))
    }
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tamper(..)")
    }
}

/// How [`ProxyRules::upload_locations`] rewrites an upload answer's `Location`.
#[derive(Debug, Clone)]
pub enum LocationRewrite {
    /// Path and query only, as registries may send.
    Relative,
    /// The same path and query on another origin, e.g. "http://127.0.0.2:1".
    OtherOrigin(String),
}
