//! What the proxy's parts share: the rules as they stand now (flipped by [`super::Proxy`]'s
//! setters, read by the connections being served), held requests, and what was seen.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::rules::{LocationRewrite, ProxyRules, Tamper};

/// The longest a held request or a stalled answer waits.
pub(super) const STALL_LIMIT: Duration = Duration::from_secs(60);

/// A request the proxy saw.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    /// "GET /v2/team/app/blobs/sha256:…"
    pub(super) line: String,
    pub(super) range: Option<String>,
    pub(super) authorization: bool,
}

#[derive(Default)]
pub(super) struct StallState {
    /// Bumped by each `release_stalls`; a held request waits for it to change.
    pub(super) generation: u64,
    pub(super) held: usize,
}

pub(super) struct ProxyShared {
    pub(super) upstream: SocketAddr,
    pub(super) refuse_catalog: AtomicBool,
    pub(super) stall_blob_gets: AtomicBool,
    pub(super) paginate_tags: AtomicBool,
    pub(super) cut_blob_gets: AtomicUsize,
    pub(super) fail_blob_gets: AtomicUsize,
    pub(super) throttle_blob_gets: AtomicUsize,
    pub(super) corrupt_blob_gets: AtomicBool,
    pub(super) redirect_blob_gets_to: Option<String>,
    pub(super) cut_patches: AtomicUsize,
    pub(super) cut_patch_forward: usize,
    pub(super) cut_patch_after: AtomicUsize,
    pub(super) fail_patches: AtomicUsize,
    pub(super) decline_mounts: AtomicBool,
    pub(super) upload_locations: Option<LocationRewrite>,
    /// Every request answers 502, as a reverse proxy does when its registry is down.
    pub(super) upstream_down: AtomicBool,
    /// The registry stops answering: new requests are held, and answers being sent
    /// stop in the middle of their bodies, until turned off (or 60 s).
    pub(super) stall_all: AtomicBool,
    /// A stall planned at a point of the traffic: how many more body bytes go before
    /// `stall_all` turns itself on, and when it did.
    pub(super) stall_after: Mutex<Option<u64>>,
    pub(super) stalled_at: Mutex<Option<Instant>>,
    pub(super) trickle_bytes_per_sec: AtomicUsize,
    pub(super) tamper: Option<Tamper>,
    pub(super) stopping: AtomicBool,
    pub(super) stall: Mutex<StallState>,
    pub(super) stall_changed: Condvar,
    pub(super) seen: Mutex<Vec<Seen>>,
    /// Open client connections, to shut them down when the proxy is dropped.
    pub(super) clients: Mutex<HashMap<u64, TcpStream>>,
    pub(super) next_client: AtomicU64,
}

impl ProxyShared {
    pub(super) fn new(upstream: SocketAddr, rules: ProxyRules) -> ProxyShared {
        ProxyShared {
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
        }
    }
}
