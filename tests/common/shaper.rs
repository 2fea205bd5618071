//! A wide-area network between a client and a loopback server, in userspace (the
//! kernel here has no `netem`): every byte is delayed by half the round trip in each
//! direction, a new connection costs one round trip before its first byte goes out
//! (the TCP handshake), each connection is held to a rate (as one TCP connection is,
//! by its window and the path), and all of them together to a total (the link).
//!
//! It relays bytes, not HTTP, so anything can sit behind it: a registry, nginx. It
//! counts connections (each a handshake's round trip) and requests: on a connection, a
//! client that starts sending after it got an answer is making its next request (one
//! more round trip, for HTTP/1.1). Used by
//! tests (`tests/e2e/shaper.rs`) and, through `examples/wan_proxy.rs`, by `scripts/bench.sh`.
//! Plain threads: four per connection, which is plenty for the tens a client opens.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// What the network looks like.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// Round-trip time: half of it each way.
    pub rtt: Duration,
    /// Bytes per second one connection carries in each direction (None: unlimited).
    pub per_connection: Option<u64>,
    /// Bytes per second all connections together carry in each direction.
    pub total: Option<u64>,
}

/// Bytes read from one side in one go, and how many such pieces may wait to be
/// delivered (beyond that the reading stops and TCP flow control holds the sender).
const PIECE: usize = 64 << 10;
const PIECES_IN_FLIGHT: usize = 64;

/// A running shaper: connections to `addr` are relayed to the upstream.
pub struct Shaper {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    shape: Shape,
    /// Upstream to client, and client to upstream.
    total_down: Option<Mutex<Pacer>>,
    total_up: Option<Mutex<Pacer>>,
    stopping: AtomicBool,
    connections: AtomicU64,
    /// Requests: turns of the clients' to talk (see the module comment).
    requests: AtomicU64,
    /// Bytes delivered to clients.
    delivered: AtomicU64,
    /// Every socket, to close them when the shaper stops.
    sockets: Mutex<Vec<TcpStream>>,
}

/// Holds a stream of writes to a rate: each write may start no earlier than the
/// previous one's bytes would have taken at that rate (no credit for idle time).
struct Pacer {
    seconds_per_byte: f64,
    next: Instant,
}

impl Pacer {
    fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            seconds_per_byte: 1.0 / bytes_per_sec.max(1) as f64,
            next: Instant::now(),
        }
    }

    /// When `n` bytes may be written, and books them.
    fn reserve(&mut self, n: usize) -> Instant {
        let start = self.next.max(Instant::now());
        self.next = start + Duration::from_secs_f64(n as f64 * self.seconds_per_byte);
        start
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

impl Shaper {
    /// Listens on 127.0.0.1 (an ephemeral port) and relays to `upstream`.
    pub fn start(upstream: SocketAddr, shape: Shape) -> io::Result<Shaper> {
        Shaper::start_on("127.0.0.1:0", upstream, shape)
    }

    pub fn start_on(listen: &str, upstream: SocketAddr, shape: Shape) -> io::Result<Shaper> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            shape,
            total_down: shape.total.map(|r| Mutex::new(Pacer::new(r))),
            total_up: shape.total.map(|r| Mutex::new(Pacer::new(r))),
            stopping: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        thread::Builder::new()
            .name("shaper-accept".into())
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(Shaper { addr, shared })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests seen so far: times a client started sending on a connection, at first
    /// or after an answer had come back on it. Reported by examples/wan_proxy.rs (the
    /// tests count requests at the harness proxy, which sees them as HTTP).
    #[allow(dead_code)]
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Bytes delivered to clients so far.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::SeqCst)
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let sockets = self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for s in sockets.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        let _ = thread::Builder::new()
            .name("shaper-conn".into())
            .spawn(move || relay(client, &shared));
    }
}

/// One connection: a reader and a writer per direction.
fn relay(client: TcpStream, shared: &Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect(shared.upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Ok(mut sockets) = shared.sockets.lock() {
        sockets.retain(|s| s.peer_addr().is_ok());
        for s in [&client, &upstream] {
            if let Ok(s) = s.try_clone() {
                sockets.push(s);
            }
        }
    }
    // Nothing the client sent goes out before the handshake's round trip is over.
    let established = Instant::now() + shared.shape.rtt;
    let turn = Arc::new(Turn {
        talking: AtomicBool::new(false),
        shared: shared.clone(),
    });
    let directions = [
        (client.try_clone(), upstream.try_clone(), false),
        (upstream.try_clone(), client.try_clone(), true),
    ];
    for (from, to, down) in directions {
        let (Ok(from), Ok(to)) = (from, to) else {
            return;
        };
        let (tx, rx) = sync_channel(PIECES_IN_FLIGHT);
        let one_way = shared.shape.rtt / 2;
        let (reading, writing) = (turn.clone(), turn.clone());
        let _ = thread::Builder::new()
            .name("shaper-read".into())
            .spawn(move || {
                read_side(
                    from,
                    &tx,
                    established,
                    one_way,
                    (!down).then_some(&*reading),
                )
            });
        let shared = shared.clone();
        let _ = thread::Builder::new()
            .name("shaper-write".into())
            .spawn(move || write_side(to, &rx, &shared, down.then_some(&*writing)));
    }
}

/// One connection's turns: whether the client is talking (a request is open: set when
/// it sends, cleared when an answer reaches it), and where requests are counted.
struct Turn {
    talking: AtomicBool,
    shared: Arc<Shared>,
}

impl Turn {
    /// The client sent something: a new request unless it was talking already.
    fn client_sent(&self) {
        if !self.talking.swap(true, Ordering::SeqCst) {
            self.shared.requests.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An answer reached the client: what it sends next is another request.
    fn answered(&self) {
        self.talking.store(false, Ordering::SeqCst);
    }
}

/// A piece of data and when it reaches the other end; None: the sender closed.
type Piece = (Instant, Option<Vec<u8>>);

fn read_side(
    mut from: TcpStream,
    tx: &SyncSender<Piece>,
    established: Instant,
    one_way: Duration,
    client: Option<&Turn>,
) {
    loop {
        let mut buf = vec![0; PIECE];
        let n = from.read(&mut buf).unwrap_or(0);
        if let (Some(turn), true) = (client, n > 0) {
            turn.client_sent();
        }
        let due = Instant::now().max(established) + one_way;
        if n == 0 {
            let _ = tx.send((due, None));
            return;
        }
        buf.truncate(n);
        if tx.send((due, Some(buf))).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            return;
        }
    }
}

/// `answers`: for the direction towards the client, its turns (which it ends).
fn write_side(mut to: TcpStream, rx: &Receiver<Piece>, shared: &Shared, answers: Option<&Turn>) {
    let down = answers.is_some();
    let mut own = shared.shape.per_connection.map(Pacer::new);
    let total = if down {
        &shared.total_down
    } else {
        &shared.total_up
    };
    while let Ok((due, piece)) = rx.recv() {
        sleep_until(due);
        let Some(piece) = piece else {
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        if let Some(pacer) = own.as_mut() {
            sleep_until(pacer.reserve(piece.len()));
        }
        if let Some(total) = total {
            let at = total
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve(piece.len());
            sleep_until(at);
        }
        if to.write_all(&piece).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if let Some(turn) = answers {
            turn.answered();
            shared
                .delivered
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
