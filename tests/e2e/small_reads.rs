//! Small reads over a distant link (common/shaper.rs: 40 ms round trip, 25 MB/s per
//! connection), through the kernel, with the requests counted by the harness proxy
//! between the shaper and the registry: the first 4 KiB of a blob on a fresh mount
//! costs a HEAD and one piece (the catalog and a connection were asked for while it
//! mounted), cold random reads cost one sub-block range request each, and a reader that
//! goes on from its first look gets the rest of that block, then whole blocks and a
//! stream. How fast is for scripts/bench.sh.

use crate::common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::thread;
use std::time::Duration;

use common::shaper::{Shape, Shaper};
use common::{Mount, Proxy, ProxyRules, Registry, noise, push_image, sha256_digest};

const MIB: usize = 1 << 20;
/// What regfs fetches for a small random read (src/fs/blob/pieces.rs).
const PIECE: u64 = 128 << 10;
const BLOCK: u64 = 2 << 20;

/// A registry behind the proxy (which logs every request) behind a distant link.
struct Distant {
    _registry: Registry,
    proxy: Proxy,
    link: Shaper,
    blob: Vec<u8>,
    digest: String,
}

fn distant(blob_mib: usize, seed: u32) -> Distant {
    common::require_tools();
    let registry = Registry::start();
    let blob = noise(blob_mib * MIB, seed);
    let (_, digests) = push_image(&registry, "team/app", "v1", &[&blob]);
    let proxy = Proxy::start(registry.addr, ProxyRules::default());
    let link = Shaper::start(
        proxy.addr,
        Shape {
            rtt: Duration::from_millis(40),
            per_connection: Some(25_000_000),
            total: None,
        },
    )
    .expect("shaper");
    Distant {
        _registry: registry,
        proxy,
        link,
        blob,
        digest: digests[0].clone(),
    }
}

impl Distant {
    fn blob_path(&self) -> String {
        format!("team/app/blobs/{}", self.digest)
    }

    /// The blob GETs seen so far, with their ranges (only blob GETs send `Range`).
    fn blob_gets(&self) -> Vec<String> {
        let gets = self
            .proxy
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("GET ") && r.contains("/blobs/sha256:"))
            .count();
        let ranges = self.proxy.ranges_seen();
        assert_eq!(gets, ranges.len(), "every blob GET asks for a range");
        ranges
    }
}

/// `bytes=A-B` → (A, B + 1); `bytes=A-` → (A, u64::MAX).
fn range_of(header: &str) -> (u64, u64) {
    let spec = header.strip_prefix("bytes=").expect("a byte range");
    let (a, b) = spec.split_once('-').expect("first-last");
    let a = a.parse().expect("first byte");
    let b = if b.is_empty() {
        u64::MAX
    } else {
        b.parse::<u64>().expect("last byte") + 1
    };
    (a, b)
}

/// Waits (bounded) until the mount's own requests are answered: the probe, the
/// catalog and the connection for blob reads (seen by the proxy, then a round trip).
fn warmed_up(proxy: &Proxy) {
    for _ in 0..100 {
        let pings = proxy.requests().iter().filter(|r| *r == "GET /v2/").count();
        if proxy.requests_matching("GET /v2/_catalog") == 1 && pings >= 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(200));
}

/// Background work a read may have started would show by then.
fn settle() {
    thread::sleep(Duration::from_millis(500));
}

#[test]
fn the_first_4_kib_of_a_blob_on_a_fresh_mount_cost_a_head_and_one_piece() {
    let d = distant(8, 41);
    let mount = Mount::start(&d.link.url(), &[]);
    // A program that comes a moment after the mount: what the mount asked for meanwhile
    // (the catalog, a connection for blob reads) has been answered.
    warmed_up(&d.proxy);
    let file = File::open(mount.path(&d.blob_path())).expect("open");
    let mut first = [0u8; 4096];
    file.read_exact_at(&mut first, 0).expect("read");
    assert_eq!(&first[..], &d.blob[..4096], "the first 4 KiB");
    drop(file);
    settle();

    let mut seen = d.proxy.requests();
    seen.sort();
    let blob = format!("/v2/team/app/blobs/{}", d.digest);
    let mut expected = [
        "GET /v2/".to_owned(),
        "GET /v2/".to_owned(), // the mount's probe, and a connection for blob reads
        "GET /v2/_catalog?n=1000".to_owned(),
        format!("HEAD {blob}"),
        format!("GET {blob}"),
    ];
    expected.sort();
    assert_eq!(seen, expected, "every request since the mount started");
    assert_eq!(d.blob_gets(), [format!("bytes=0-{}", PIECE - 1)]);
    assert_eq!(d.link.connections(), 2, "no connection opened for the read");
    let stats = mount.stats();
    assert_eq!(stats["pieces"]["fetches"], 1, "{stats:#}");
    mount.terminate();
}

#[test]
fn a_blob_a_read_manifest_describes_needs_no_head() {
    let d = distant(4, 42);
    // At once, as a program run right after mounting would: its lookups join what the
    // mount is asking for meanwhile.
    let mount = Mount::start(&d.link.url(), &[]);
    let manifest = std::fs::read(mount.path("team/app/tags/v1/manifest.json")).expect("manifest");
    assert!(String::from_utf8_lossy(&manifest).contains(&d.digest));
    let file = File::open(mount.path(&d.blob_path())).expect("open");
    let mut buf = [0u8; 4096];
    file.read_exact_at(&mut buf, 1 << 20).expect("read");
    assert_eq!(&buf[..], &d.blob[MIB..MIB + 4096]);
    assert_eq!(
        d.proxy.requests_matching("HEAD "),
        0,
        "the manifest's descriptor gave the size: {:?}",
        d.proxy.requests()
    );
    assert_eq!(
        d.proxy.requests_matching("/_catalog"),
        1,
        "asked once, at mount"
    );
    mount.terminate();
}

#[test]
fn cold_random_reads_at_distinct_blocks_cost_one_piece_each() {
    let d = distant(32, 43);
    let mount = Mount::start(&d.link.url(), &[]);
    let file = File::open(mount.path(&d.blob_path())).expect("open");
    // Blocks far enough apart that no read continues the one before it.
    let blocks = [1u64, 6, 11, 15, 3, 8, 13, 0];
    for (i, block) in blocks.iter().enumerate() {
        let offset = block * BLOCK + (700 << 10) + i as u64 * 4096;
        let mut buf = [0u8; 4096];
        file.read_exact_at(&mut buf, offset).expect("read");
        let at = offset as usize;
        assert_eq!(&buf[..], &d.blob[at..at + 4096], "4 KiB at {offset}");
    }
    drop(file);
    settle();
    let ranges = d.blob_gets();
    assert_eq!(
        ranges.len(),
        blocks.len(),
        "one request per read: {ranges:?}"
    );
    for (header, (i, block)) in ranges.iter().zip(blocks.iter().enumerate()) {
        let (start, end) = range_of(header);
        let offset = block * BLOCK + (700 << 10) + i as u64 * 4096;
        assert_eq!(end - start, PIECE, "a piece, not a block: {header}");
        assert!(
            start <= offset && offset + 4096 <= end,
            "{header} holds {offset}"
        );
        assert_eq!(start % PIECE, 0, "aligned: {header}");
    }
    let stats = mount.stats();
    assert_eq!(stats["pieces"]["fetches"], blocks.len(), "{stats:#}");
    assert_eq!(stats["requests"]["blob_range"], blocks.len(), "{stats:#}");
    mount.terminate();
}

#[test]
fn a_reader_that_goes_on_gets_the_rest_of_its_block_then_whole_blocks_and_a_stream() {
    let d = distant(24, 44);
    let mount = Mount::start(&d.link.url(), &[]);
    let mut file = File::open(mount.path(&d.blob_path())).expect("open");
    // A look at the first bytes (a piece), then on through the whole blob.
    let mut head = [0u8; 4096];
    file.read_exact_at(&mut head, 0).expect("read");
    assert_eq!(&head[..], &d.blob[..4096]);
    let mut read = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buf[..n]);
    }
    assert_eq!(read.len(), d.blob.len());
    assert_eq!(sha256_digest(&read), d.digest, "the whole blob, right");
    drop(file);
    let stats = mount.stats();
    assert_eq!(stats["verified_blobs"], 1, "checked on the way: {stats:#}");
    assert!(
        stats["requests"]["blob_stream"].as_u64() >= Some(1),
        "a stream: {stats:#}"
    );
    assert_eq!(stats["pieces"]["fetches"], 1, "the first look: {stats:#}");
    assert_eq!(
        stats["pieces"]["blocks_completed"], 1,
        "the first block is completed from its piece, not fetched again: {stats:#}"
    );
    // Besides the first piece, every request is the rest of the first block, a whole
    // block, or a stream to the end.
    let size = d.blob.len() as u64;
    let ranges = d.blob_gets();
    assert_eq!(ranges[0], format!("bytes=0-{}", PIECE - 1));
    for header in &ranges[1..] {
        let (start, end) = range_of(header);
        let whole = start % BLOCK == 0 && (end - start == BLOCK || end == size);
        let rest = start == PIECE && end == BLOCK;
        assert!(
            whole || rest || end == u64::MAX,
            "only whole blocks after the first look: {header} in {ranges:?}"
        );
    }
    mount.terminate();
}

#[test]
fn a_sequential_reader_gets_whole_blocks_and_a_stream_from_its_first_read() {
    let d = distant(16, 45);
    let mount = Mount::start(&d.link.url(), &[]);
    let read = std::fs::read(mount.path(&d.blob_path())).expect("read");
    assert_eq!(sha256_digest(&read), d.digest, "the whole blob, right");
    let stats = mount.stats();
    assert_eq!(stats["pieces"]["fetches"], 0, "no pieces: {stats:#}");
    assert_eq!(stats["verified_blobs"], 1, "{stats:#}");
    assert!(
        stats["requests"]["blob_stream"].as_u64() >= Some(1),
        "a stream: {stats:#}"
    );
    let size = d.blob.len() as u64;
    for header in d.blob_gets() {
        let (start, end) = range_of(&header);
        let whole = start % BLOCK == 0 && (end - start == BLOCK || end == size);
        assert!(whole || end == u64::MAX, "whole blocks only: {header}");
    }
    mount.terminate();
}
