//! The WAN shaper of the benchmarks (common/shaper.rs) does what it is configured to:
//! a request through it waits at least a round trip, a new connection one more, and
//! bytes come no faster than the per-connection and total rates. Only lower bounds are
//! asserted (a loaded machine makes everything slower, never faster).

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::shaper::{Shape, Shaper};

/// A server that answers each line `N\n` with N bytes, on every connection.
fn sizer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let n: usize = line.trim().parse().unwrap_or(0);
                    if conn.write_all(&vec![7u8; n]).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// Asks for `n` bytes on `conn` and reads them all.
fn fetch(conn: &mut TcpStream, n: usize) {
    conn.write_all(format!("{n}\n").as_bytes()).expect("ask");
    let mut got = vec![0; n];
    conn.read_exact(&mut got).expect("read the answer");
    assert!(got.iter().all(|&b| b == 7));
}

#[test]
fn it_adds_the_round_trip_and_the_handshake() {
    let rtt = Duration::from_millis(150);
    let shaper = Shaper::start(
        sizer(),
        Shape {
            rtt,
            ..Shape::default()
        },
    )
    .expect("shaper");
    let started = Instant::now();
    let mut conn = TcpStream::connect(shaper.addr).expect("connect");
    fetch(&mut conn, 10);
    // The handshake's round trip, then the request's.
    assert!(started.elapsed() >= 2 * rtt, "{:?}", started.elapsed());
    let again = Instant::now();
    fetch(&mut conn, 10);
    assert!(again.elapsed() >= rtt, "{:?}", again.elapsed());
    assert_eq!(shaper.connections(), 1);
}

#[test]
fn it_caps_each_connection_and_all_of_them() {
    const MB: u64 = 1_000_000;
    let shaper = Shaper::start(
        sizer(),
        Shape {
            rtt: Duration::ZERO,
            per_connection: Some(4 * MB),
            total: Some(6 * MB),
        },
    )
    .expect("shaper");
    // One connection: 4 MB at 4 MB/s takes a second at least (the first piece may go
    // at once, so a little less).
    let started = Instant::now();
    let mut conn = TcpStream::connect(shaper.addr).expect("connect");
    fetch(&mut conn, 4 * MB as usize);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Three at once: 9 MB share the 6 MB/s link, 1.5 s at least (each alone could do it
    // in 0.75 s).
    let started = Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let addr = shaper.addr;
            thread::spawn(move || {
                let mut conn = TcpStream::connect(addr).expect("connect");
                fetch(&mut conn, 3 * MB as usize);
            })
        })
        .collect();
    for r in readers {
        r.join().expect("reader");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(shaper.delivered() >= 13 * MB);
}
