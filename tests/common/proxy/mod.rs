//! The fault proxy: a small HTTP/1.1 proxy on loopback in front of a registry that
//! injects faults (errors, cuts, stalls, trickles, lies) and counts what it is asked.
//! [`ProxyRules`] say what it does from the start; [`Proxy`]'s setters change it while a
//! test runs. How it serves a connection is `serve.rs`.

mod serve;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use super::http::ANNOUNCE_LENGTH;
use super::http::Response;
use serve::accept_loop;

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
/// client gets instead. A response with header [`ANNOUNCE_LENGTH`] is framed by that
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

/// A request the proxy saw.
#[derive(Debug, Clone)]
struct Seen {
    /// "GET /v2/team/app/blobs/sha256:…"
    line: String,
    range: Option<String>,
    authorization: bool,
}

#[derive(Default)]
struct StallState {
    /// Bumped by each `release_stalls`; a held request waits for it to change.
    generation: u64,
    held: usize,
}

struct ProxyShared {
    upstream: SocketAddr,
    refuse_catalog: AtomicBool,
    stall_blob_gets: AtomicBool,
    paginate_tags: AtomicBool,
    cut_blob_gets: AtomicUsize,
    fail_blob_gets: AtomicUsize,
    throttle_blob_gets: AtomicUsize,
    corrupt_blob_gets: AtomicBool,
    redirect_blob_gets_to: Option<String>,
    cut_patches: AtomicUsize,
    cut_patch_forward: usize,
    cut_patch_after: AtomicUsize,
    fail_patches: AtomicUsize,
    decline_mounts: AtomicBool,
    upload_locations: Option<LocationRewrite>,
    /// Every request answers 502, as a reverse proxy does when its registry is down.
    upstream_down: AtomicBool,
    /// The registry stops answering: new requests are held, and answers being sent
    /// stop in the middle of their bodies, until turned off (or 60 s).
    stall_all: AtomicBool,
    /// A stall planned at a point of the traffic: how many more body bytes go before
    /// `stall_all` turns itself on, and when it did.
    stall_after: Mutex<Option<u64>>,
    stalled_at: Mutex<Option<Instant>>,
    trickle_bytes_per_sec: AtomicUsize,
    tamper: Option<Tamper>,
    stopping: AtomicBool,
    stall: Mutex<StallState>,
    stall_changed: Condvar,
    seen: Mutex<Vec<Seen>>,
    /// Open client connections, to shut them down when the proxy is dropped.
    clients: Mutex<HashMap<u64, TcpStream>>,
    next_client: AtomicU64,
}

/// An HTTP/1.1 proxy on loopback in front of `upstream` (std threads, one per connection).
/// Requests are forwarded one at a time over a fresh upstream connection each; responses are
/// buffered and re-framed with Content-Length, and client connections are kept alive.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

const STALL_LIMIT: Duration = Duration::from_secs(60);

impl Proxy {
    pub fn start(upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        Proxy::start_on("127.0.0.1", upstream, rules)
    }

    /// A proxy listening on another loopback address (127.0.0.2 is "another host").
    pub fn start_on(ip: &str, upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).expect("bind the proxy on loopback");
        let addr = listener.local_addr().expect("proxy local addr");
        let shared = Arc::new(ProxyShared {
            upstream,
            refuse_catalog: AtomicBool::new(rules.refuse_catalog),
            stall_blob_gets: AtomicBool::new(rules.stall_blob_gets),
            paginate_tags: AtomicBool::new(rules.paginate_tags),
            cut_blob_gets: AtomicUsize::new(rules.cut_blob_gets),
            fail_blob_gets: AtomicUsize::new(rules.fail_blob_gets),
            throttle_blob_gets: AtomicUsize::new(rules.throttle_blob_gets),
            corrupt_blob_gets: AtomicBool::new(rules.corrupt_blob_gets),
            redirect_blob_gets_to: rules.redirect_blob_gets_to,
            cut_patches: AtomicUsize::new(rules.cut_patches),
            cut_patch_forward: rules.cut_patch_forward,
            cut_patch_after: AtomicUsize::new(rules.cut_patch_after),
            fail_patches: AtomicUsize::new(rules.fail_patches),
            decline_mounts: AtomicBool::new(rules.decline_mounts),
            upload_locations: rules.upload_locations,
            upstream_down: AtomicBool::new(false),
            stall_all: AtomicBool::new(false),
            stall_after: Mutex::new(None),
            stalled_at: Mutex::new(None),
            trickle_bytes_per_sec: AtomicUsize::new(rules.trickle_bytes_per_sec),
            tamper: rules.tamper,
            stopping: AtomicBool::new(false),
            stall: Mutex::new(StallState::default()),
            stall_changed: Condvar::new(),
            seen: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("test-proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn proxy accept thread")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// "http://127.0.0.1:PORT" of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_refuse_catalog(&self, on: bool) {
        self.shared.refuse_catalog.store(on, Ordering::SeqCst);
    }

    /// Turning stalls off also lets the held requests go.
    pub fn set_stall_blob_gets(&self, on: bool) {
        self.shared.stall_blob_gets.store(on, Ordering::SeqCst);
        let _guard = self.shared.stall.lock().expect("proxy stall lock");
        self.shared.stall_changed.notify_all();
    }

    /// Lets every request held so far go on (new blob GETs are still held if the rule is on).
    pub fn release_stalls(&self) {
        let mut stall = self.shared.stall.lock().expect("proxy stall lock");
        stall.generation += 1;
        self.shared.stall_changed.notify_all();
    }

    /// How many requests are held right now.
    pub fn stalled_count(&self) -> usize {
        self.shared.stall.lock().expect("proxy stall lock").held
    }

    /// Waits (bounded) until at least `n` requests are held; false on timeout.
    pub fn wait_stalled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.stalled_count() < n {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// How many requests seen so far have `substr` in "METHOD /path?query",
    /// e.g. `requests_matching("GET /v2/team/app/blobs/")` or `requests_matching("/_catalog")`.
    pub fn requests_matching(&self, substr: &str) -> usize {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter(|s| s.line.contains(substr)).count()
    }

    /// Every request seen so far, as "METHOD /path?query".
    pub fn requests(&self) -> Vec<String> {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().map(|s| s.line.clone()).collect()
    }

    /// How many requests seen so far carried an `Authorization` header.
    pub fn requests_with_authorization(&self) -> usize {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter(|s| s.authorization).count()
    }

    /// The `Range` header values seen so far, in order.
    pub fn ranges_seen(&self) -> Vec<String> {
        let seen = self.shared.seen.lock().expect("proxy log lock");
        seen.iter().filter_map(|s| s.range.clone()).collect()
    }

    /// How many of the `fail_blob_gets` / `cut_blob_gets` / `fail_patches` /
    /// `cut_patches` faults are still to come.
    pub fn faults_left(&self) -> usize {
        self.shared.fail_blob_gets.load(Ordering::SeqCst)
            + self.shared.throttle_blob_gets.load(Ordering::SeqCst)
            + self.shared.cut_blob_gets.load(Ordering::SeqCst)
            + self.shared.fail_patches.load(Ordering::SeqCst)
            + self.shared.cut_patches.load(Ordering::SeqCst)
    }

    /// While on, every request answers 502 Bad Gateway without reaching the registry.
    pub fn set_upstream_down(&self, on: bool) {
        self.shared.upstream_down.store(on, Ordering::SeqCst);
    }

    /// While on, the registry stops answering altogether: requests are held and bodies
    /// being sent stop where they are (a registry that hangs mid-transfer). Off lets
    /// everything go on.
    pub fn set_stall_all(&self, on: bool) {
        self.shared.stall_all.store(on, Ordering::SeqCst);
    }

    /// Stalls as [`Proxy::set_stall_all`] does once `bytes` more bytes of answer bodies
    /// have been sent: a registry that hangs at a known point of a transfer, however
    /// fast the client happens to read. [`Proxy::stalled_at`] says when.
    pub fn stall_after_bytes(&self, bytes: u64) {
        *self.shared.stalled_at.lock().expect("stall lock") = None;
        *self.shared.stall_after.lock().expect("stall lock") = Some(bytes);
    }

    /// When the stall planned by [`Proxy::stall_after_bytes`] began.
    pub fn stalled_at(&self) -> Option<Instant> {
        *self.shared.stalled_at.lock().expect("stall lock")
    }

    /// Bodies from now on go at this many bytes per second (0: full speed).
    pub fn set_trickle(&self, bytes_per_sec: usize) {
        self.shared
            .trickle_bytes_per_sec
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn set_corrupt_blob_gets(&self, on: bool) {
        self.shared.corrupt_blob_gets.store(on, Ordering::SeqCst);
    }

    /// Forgets the requests seen so far.
    pub fn reset_counters(&self) {
        self.shared.seen.lock().expect("proxy log lock").clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.stall.lock();
            self.shared.stall_changed.notify_all();
        }
        // Unblock accept() with a connection of our own, then end the client connections.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        if let Ok(clients) = self.shared.clients.lock() {
            for stream in clients.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
