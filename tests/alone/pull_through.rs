//! regfs in front of a pull-through cache: distribution in `proxy:` mode, whose origin
//! is another registry behind a slower link. A blob the cache does not hold yet is
//! answered with 200 and the whole body whatever Range asked for; regfs must read it
//! right, and as a stream, not a whole blob per block.

use crate::common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{Mount, ProxyRules, PullThrough, noise, sha256_digest};

/// The origin's link to the cache: slow enough that the cache is still fetching a
/// blob while regfs reads it (distribution then answers every GET of it whole).
const LINK_BYTES_PER_SEC: usize = 16 << 20;

fn pull_through() -> PullThrough {
    let layers = vec![noise(40 << 20, 21), noise(24 << 20, 22)];
    let link = ProxyRules {
        trickle_bytes_per_sec: LINK_BYTES_PER_SEC,
        ..ProxyRules::default()
    };
    PullThrough::start(layers, link)
}

/// What reading `ranges` (`bytes=A-B`, `bytes=A-`) of a blob of `size` costs at most
/// when every answer starts at byte 0: each up to its last byte (or the end), and a
/// chunk more, as a body arrives in chunks of the transport's choosing.
fn needed_from_byte_0(ranges: &[String], size: u64) -> u64 {
    const CHUNK_SLACK: u64 = 1 << 20;
    ranges
        .iter()
        .map(|r| {
            let end = r
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .and_then(|(_, last)| last.parse::<u64>().ok())
                .map_or(size, |last| (last + 1).min(size));
            end + CHUNK_SLACK
        })
        .sum()
}

fn fetched_bytes(mount: &Mount) -> u64 {
    mount.stats()["fetched_bytes"]
        .as_u64()
        .expect("fetched_bytes")
}

/// Whether regfs's log shows a ranged GET of `digest` answered 200 (the whole blob).
fn answered_whole(mount: &Mount, digest: &str) -> bool {
    mount.log().lines().any(|l| {
        l.contains(&format!("GET /v2/team/app/blobs/{digest} bytes=")) && l.contains("status=200")
    })
}

#[test]
fn a_cold_pull_through_cache_is_read_right_and_once_per_reader() {
    let _alone = crate::alone();
    let p = pull_through();
    // A pull-through cache lists only what it holds: name the repository. No disk
    // cache: every byte regfs reads comes over the network and is counted.
    let args = [
        "--repo",
        "team/app",
        "--no-disk-cache",
        "--cache-size",
        "64MiB",
    ];
    let mount = Mount::start(&p.cache_front.url(), &args);
    // Listing gives the sizes from the manifest (a HEAD would make distribution pull
    // the whole blob into the cache before answering, warming it).
    let listed = common::ls(&mount.path("team/app/blobs"));
    let (digest, bytes) = &p.layers[0];
    assert!(listed.contains(digest), "{listed:?}");
    let path = mount.path(&format!("team/app/blobs/{digest}"));
    let size = bytes.len() as u64;
    assert_eq!(fs::metadata(&path).expect("stat").len(), size);

    // A sequential reader, while the cache is still pulling the blob from its origin.
    let before = fetched_bytes(&mount);
    let out = Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("sha256sum");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = String::from_utf8_lossy(&out.stdout);
    assert_eq!(format!("sha256:{}", &hex[..64]), *digest);
    assert!(
        answered_whole(&mount, digest),
        "the cache was warm already:\n{}",
        mount.log()
    );
    let fetched = fetched_bytes(&mount) - before;
    let gets = p
        .cache_front
        .requests_matching(&format!("GET /v2/team/app/blobs/{digest}"));
    // One stream, plus the first blocks the kernel asked for at once (how many is its
    // timing: 13 were seen on a loaded machine), each of which the cache answered from
    // byte 0: regfs reads each body only up to the bytes it asked for, and never asks
    // block by block (20 of them).
    let ranges = p.cache_front.ranges_seen();
    let needed = needed_from_byte_0(&ranges, size);
    assert!(
        fetched <= needed && gets <= 15,
        "a sequential read of {size} bytes fetched {fetched} (at most {needed} needed) \
         in {gets} GETs: {ranges:?}"
    );

    // A reader at random places in the other blob, also cold: right bytes, and no body
    // read past the bytes asked for (while the cache is still pulling the blob, it
    // answers each from byte 0; once it holds it, with the range).
    let (digest, bytes) = &p.layers[1];
    let before = fetched_bytes(&mount);
    let ranges_before = p.cache_front.ranges_seen().len();
    let file = File::open(mount.path(&format!("team/app/blobs/{digest}"))).expect("open");
    let mut seed = 0x9e37_79b9_u64;
    for _ in 0..12 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = seed % (bytes.len() as u64 - 4096);
        let mut piece = vec![0; 4096];
        file.read_exact_at(&mut piece, offset).expect("random read");
        let at = offset as usize;
        assert_eq!(piece, bytes[at..at + 4096], "bytes at {offset}");
    }
    assert!(answered_whole(&mount, digest), "the cache was warm already");
    let fetched = fetched_bytes(&mount) - before;
    let ranges = p.cache_front.ranges_seen().split_off(ranges_before);
    let needed = needed_from_byte_0(&ranges, bytes.len() as u64);
    assert!(
        fetched <= needed,
        "12 random reads of a {} byte blob fetched {fetched} (at most {needed} needed): \
         {ranges:?}",
        bytes.len(),
    );
    // And whole, once warm (the cache has it by now and answers ranges).
    let again = fs::read(mount.path(&format!("team/app/blobs/{digest}"))).expect("read");
    assert_eq!(sha256_digest(&again), *digest);
}
