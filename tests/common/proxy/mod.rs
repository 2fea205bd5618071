//! The fault proxy: a small HTTP/1.1 proxy on loopback in front of a registry that
//! injects faults (errors, cuts, stalls, trickles, lies) and counts what it is asked.
//! [`ProxyRules`] say what it does from the start; [`Proxy`]'s setters change it while a
//! test runs. How it serves a connection is `serve.rs`; `rules.rs` says what it does,
//! `shared.rs` holds what the proxy's parts share.

mod rules;
mod serve;
mod shared;

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use super::http::ANNOUNCE_LENGTH;
pub use rules::{LocationRewrite, ProxyRules, Tamper};
use serve::accept_loop;
use shared::ProxyShared;

/// An HTTP/1.1 proxy on loopback in front of `upstream` (std threads, one per connection).
/// Requests are forwarded one at a time over a fresh upstream connection each; responses are
/// buffered and re-framed with Content-Length, and client connections are kept alive.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        Proxy::start_on("127.0.0.1", upstream, rules)
    }

    /// A proxy listening on another loopback address (127.0.0.2 is "another host").
    pub fn start_on(ip: &str, upstream: SocketAddr, rules: ProxyRules) -> Proxy {
        let listener = TcpListener::bind((ip, 0)).expect("bind the proxy on loopback");
        let addr = listener.local_addr().expect("proxy local addr");
        let shared = Arc::new(ProxyShared::new(upstream, rules));
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
