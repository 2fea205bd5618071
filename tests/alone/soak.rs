//! A bounded soak: 32 readers at random offsets across several blobs, listers, and
//! uploads, all at once through one mount, with a block cache and a disk cache both
//! smaller than the blobs (so both evict all the time). Every byte read is checked,
//! every upload is committed or fails loudly, the daemon's memory stays within the
//! cache budget plus a fixed margin, and when it is over nothing is left waiting in
//! the kernel's FUSE connection.
//!
//! `REGFS_SOAK_SECS` sets the length (default 30 s; the README's figures come from a
//! 60 s run).

use crate::common;

use std::fs::{self, File};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, Registry, RssSampler, blob_status, ls, noise, push_image, sha256_digest};

const READERS: usize = 32;
const LISTERS: usize = 2;
const UPLOADERS: usize = 2;
const BLOBS: usize = 6;
const BLOB_SIZE: usize = 24 << 20;
const CACHE_MIB: u64 = 32;
/// What the daemon may hold besides its block cache: 32 readers each waiting on up to
/// two 2 MiB blocks of their own (128 MiB), the hash checks' stash of out-of-order
/// pieces (at most 32 MiB), the disk cache's write queue, two upload chunks per
/// writer, the runtime.
const MARGIN_MIB: u64 = 160;

/// A small xorshift, so each thread's choices differ and a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    bytes_read: AtomicU64,
    listings: AtomicU64,
    uploads: AtomicU64,
    bytes_uploaded: AtomicU64,
}

/// The FUSE connection of the mount at `dir`: its number is the minor of the mount's
/// device ("0:NN" in mountinfo).
fn connection_waiting(dir: &Path) -> Option<u64> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = dir.to_string_lossy();
    let device = info.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        (regfs::mount::unescape_mountinfo(mount_point) == wanted).then(|| device.to_owned())
    })?;
    let minor = device.split_once(':')?.1;
    fs::read_to_string(format!("/sys/fs/fuse/connections/{minor}/waiting"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads of `shortest..longest` bytes at random places of random `files` (each with
/// the bytes it must hold) until `stop`, every byte checked; `done(len)` after each.
/// `who` names the reader in a failure.
fn read_at_random(
    who: &str,
    rng: &mut Rng,
    files: &[(File, &[u8])],
    (shortest, longest): (usize, usize),
    stop: &AtomicBool,
    mut done: impl FnMut(usize),
) {
    while !stop.load(Ordering::Relaxed) {
        let which = rng.below(files.len() as u64) as usize;
        let (file, content) = &files[which];
        let len = shortest + rng.below((longest - shortest) as u64) as usize;
        let offset = rng.below((content.len() - len) as u64) as usize;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset as u64)
            .unwrap_or_else(|e| panic!("{who}: file {which} at {offset}+{len}: {e}"));
        assert!(
            buf == content[offset..offset + len],
            "{who}: wrong bytes in file {which} at {offset}+{len}"
        );
        done(len);
    }
}

/// The blobs opened, each with its content.
fn opened(blobs: &[(PathBuf, Vec<u8>)]) -> Vec<(File, &[u8])> {
    blobs
        .iter()
        .map(|(p, c)| (File::open(p).expect("open a blob"), &c[..]))
        .collect()
}

/// One of the readers: reads of 1 byte-256 KiB at random places of the blobs.
fn reader(r: usize, blobs: &[(PathBuf, Vec<u8>)], tally: &Tally, stop: &AtomicBool) {
    let mut rng = Rng(0x5eed_0000 + r as u64);
    let who = format!("reader {r}");
    read_at_random(
        &who,
        &mut rng,
        &opened(blobs),
        (1, 1 + (256 << 10)),
        stop,
        |len| {
            tally.reads.fetch_add(1, Ordering::Relaxed);
            tally.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        },
    );
}

/// One of the listers: the tags, the blobs, the manifest and a blob's size, again and
/// again.
fn lister(
    l: usize,
    root: &Path,
    manifest: &[u8],
    digests: &[String],
    tally: &Tally,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        assert_eq!(ls(&root.join("soak/app/tags")), ["v1"], "lister {l}");
        let listed = ls(&root.join("soak/app/blobs"));
        assert!(
            digests.iter().all(|d| listed.contains(d)),
            "lister {l}: {listed:?}"
        );
        let read = fs::read(root.join("soak/app/tags/v1/manifest.json")).expect("manifest");
        assert_eq!(read, manifest, "lister {l}");
        let size = fs::metadata(root.join(format!("soak/app/blobs/{}", digests[l])))
            .expect("stat")
            .len();
        assert_eq!(size, BLOB_SIZE as u64, "lister {l}");
        tally.listings.fetch_add(1, Ordering::Relaxed);
    }
}

/// One of the uploaders: uploads of odd sizes, each committed (checked at the registry)
/// or a loud failure.
fn uploader(u: usize, uploads: &Path, addr: SocketAddr, tally: &Tally, stop: &AtomicBool) {
    let mut rng = Rng(0xfeed_0000 + u as u64);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let len = (64 << 10) + rng.below(3 << 20) as usize;
        let content = noise(len, (u * 100_000 + n) as u32);
        let digest = sha256_digest(&content);
        let path = uploads.join(format!("u{u}-{n}.bin"));
        let mut file = File::create(&path).expect("create an upload");
        // Written in pieces of odd sizes, as programs do.
        for piece in content.chunks(100_000 + u * 7) {
            file.write_all(piece).expect("write an upload");
        }
        match common::close(file) {
            Ok(()) => assert_eq!(
                blob_status(addr, "soak/app", &digest),
                200,
                "upload {u}-{n}"
            ),
            // A healthy registry: any failure is a bug, and it is loud.
            Err(e) => panic!("upload {u}-{n} failed: {e}"),
        }
        tally.uploads.fetch_add(1, Ordering::Relaxed);
        tally
            .bytes_uploaded
            .fetch_add(len as u64, Ordering::Relaxed);
        n += 1;
    }
}

/// Waits (bounded) until nothing is left in the kernel's queue for the daemon.
fn assert_fuse_queue_empties(mount: &Mount) {
    let settled = Instant::now() + Duration::from_secs(10);
    let mut waiting = connection_waiting(&mount.dir);
    while waiting != Some(0) && Instant::now() < settled {
        thread::sleep(Duration::from_millis(50));
        waiting = connection_waiting(&mount.dir);
    }
    assert_eq!(
        waiting,
        Some(0),
        "requests left waiting in the FUSE connection"
    );
}

/// The registry with `soak/app:v1` over the blobs, and a mount of it whose caches are
/// both smaller than the blobs.
fn start() -> (Registry, Mount, Vec<Vec<u8>>, Vec<String>) {
    let registry = Registry::start();
    let contents: Vec<Vec<u8>> = (0..BLOBS)
        .map(|i| noise(BLOB_SIZE, 100 + i as u32))
        .collect();
    let layers: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let (_, digests) = push_image(&registry, "soak/app", "v1", &layers);
    let mount = Mount::start(
        &registry.url(),
        &[
            "--cache-size",
            &format!("{CACHE_MIB}MiB"),
            "--disk-cache-size",
            "64MiB",
            "--chunk-size",
            "1MiB",
            "--timeout",
            "30s",
        ],
    );
    (registry, mount, contents, digests)
}

/// How long a soak runs: `REGFS_SOAK_SECS`, else 30 s.
fn soak_secs() -> u64 {
    std::env::var("REGFS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// Lets `workers` run until `deadline` (or until one of them ends, a failure), then
/// stops them and passes a worker's panic on.
fn run_until(deadline: Instant, workers: Vec<thread::JoinHandle<()>>, stop: &AtomicBool) {
    while Instant::now() < deadline && !workers.iter().any(|w| w.is_finished()) {
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        if let Err(panic) = w.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn readers_listers_and_uploads_at_once_for_a_bounded_time() {
    let _alone = crate::alone();
    common::require_tools();
    assert!(
        fs::read_to_string("/proc/mounts")
            .is_ok_and(|m| m.contains(" /sys/fs/fuse/connections fusectl ")),
        "fusectl is not mounted on /sys/fs/fuse/connections: run scripts/setup.sh"
    );
    let secs = soak_secs();
    let (registry, mount, contents, digests) = start();
    let blobs: Blobs = Arc::new(
        digests
            .iter()
            .zip(contents)
            .map(|(d, bytes)| (mount.path(&format!("soak/app/blobs/{d}")), bytes))
            .collect(),
    );
    let manifest = common::get_manifest(&registry, "soak/app", "v1").2;
    let rss = RssSampler::start(mount.pid());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();

    for r in 0..READERS {
        let (blobs, tally, stop) = (blobs.clone(), tally.clone(), stop.clone());
        workers.push(thread::spawn(move || reader(r, &blobs, &tally, &stop)));
    }
    for l in 0..LISTERS {
        let (tally, stop) = (tally.clone(), stop.clone());
        let (root, manifest, digests) = (mount.dir.clone(), manifest.clone(), digests.clone());
        workers.push(thread::spawn(move || {
            lister(l, &root, &manifest, &digests, &tally, &stop);
        }));
    }
    for u in 0..UPLOADERS {
        let (tally, stop) = (tally.clone(), stop.clone());
        let (uploads, addr) = (mount.path("soak/app/uploads"), registry.addr);
        workers.push(thread::spawn(move || {
            uploader(u, &uploads, addr, &tally, &stop);
        }));
    }

    run_until(deadline, workers, &stop);
    let peak = rss.stop();

    assert_fuse_queue_empties(&mount);

    let stats = mount.stats();
    eprintln!(
        "soak ({secs} s): {} reads, {} MiB read and checked, {} listings, {} uploads ({} MiB), \
         peak RSS {} MiB (cache {CACHE_MIB} MiB), fetched {} MiB, disk cache hits {}",
        tally.reads.load(Ordering::Relaxed),
        tally.bytes_read.load(Ordering::Relaxed) >> 20,
        tally.listings.load(Ordering::Relaxed),
        tally.uploads.load(Ordering::Relaxed),
        tally.bytes_uploaded.load(Ordering::Relaxed) >> 20,
        peak.peak_mib(),
        stats["fetched_bytes"].as_u64().unwrap_or(0) >> 20,
        stats["disk"]["hits"],
    );
    assert!(tally.reads.load(Ordering::Relaxed) > 0 && tally.uploads.load(Ordering::Relaxed) > 0);
    assert!(
        peak.peak_mib() < CACHE_MIB + MARGIN_MIB,
        "peak RSS {} MiB with a {CACHE_MIB} MiB cache",
        peak.peak_mib()
    );
    assert!(!mount.log().contains("panicked"), "{}", mount.log());
}

/// The memory bound (README "Memory"): with `--cache-size 64MiB`, 16 readers at random
/// offsets (4 KiB to 1 MiB) across four 128 MiB blobs and two listers, for
/// `REGFS_SOAK_SECS`: the daemon's peak RSS (VmHWM) stays within the cache plus
/// [`FIXED_OVERHEAD_MIB`] (in a release build: `cargo test --release --test alone`; a
/// debug build's larger code gets [`DEBUG_BUILD_MIB`] more), every byte read is right,
/// and no read fails.
const RANDOM_READERS: usize = 16;
const BIG_BLOBS: usize = 4;
const BIG_BLOB: usize = 128 << 20;
const BUDGET_MIB: u64 = 64;
/// The fixed overhead the README documents beside `--cache-size` (code, runtime,
/// metadata memos, FUSE request buffers), for a release build.
const FIXED_OVERHEAD_MIB: u64 = 32;
/// What an unoptimised build adds: its code alone is resident at 18-19 MiB during the
/// soak (RssFile; the release binary is a tenth of the size), and its tasks are larger.
const DEBUG_BUILD_MIB: u64 = 16;

/// Reads of 4 KiB-1 MiB at random places of the blobs until `stop`, each checked.
fn random_reader(r: usize, blobs: &[(PathBuf, Vec<u8>)], reads: &AtomicU64, stop: &AtomicBool) {
    let mut rng = Rng(0xb16_0000 + r as u64);
    let who = format!("reader {r}");
    read_at_random(
        &who,
        &mut rng,
        &opened(blobs),
        (4096, 1 << 20),
        stop,
        |_| {
            reads.fetch_add(1, Ordering::Relaxed);
        },
    );
}

/// Lists the repository of the big blobs and reads its manifest until `stop`.
fn big_lister(l: usize, root: &Path, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        assert_eq!(ls(&root.join("soak/big/tags")), ["v1"], "lister {l}");
        assert_eq!(ls(&root.join("soak/big/blobs")).len(), BIG_BLOBS + 1);
        fs::read(root.join("soak/big/tags/v1/manifest.json")).expect("manifest");
    }
}

/// Blobs as a mount shows them, and their contents.
type Blobs = Arc<Vec<(PathBuf, Vec<u8>)>>;

/// The registry with `soak/big:v1` over four blobs of noise, a mount of it, and the
/// blobs as the mount shows them with their contents.
fn start_big() -> (Registry, Mount, Blobs) {
    let registry = Registry::start();
    let contents: Vec<Vec<u8>> = (0..BIG_BLOBS)
        .map(|i| noise(BIG_BLOB, 200 + i as u32))
        .collect();
    let layers: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let (_, digests) = push_image(&registry, "soak/big", "v1", &layers);
    let named: Vec<(PathBuf, Vec<u8>)> = digests
        .iter()
        .zip(contents)
        .map(|(d, bytes)| (PathBuf::from(format!("soak/big/blobs/{d}")), bytes))
        .collect();
    let (mount, blobs) = mount_big(&registry, named);
    (registry, mount, blobs)
}

/// A fresh mount of `registry` with `--cache-size 64MiB`, and `blobs` (contents, by
/// their path under `soak/big/blobs/`) as it shows them.
fn mount_big(registry: &Registry, blobs: Vec<(PathBuf, Vec<u8>)>) -> (Mount, Blobs) {
    let mount = Mount::start(
        &registry.url(),
        &["--cache-size", &format!("{BUDGET_MIB}MiB")],
    );
    let shown = blobs
        .into_iter()
        .map(|(p, bytes)| {
            let name = p.file_name().map(PathBuf::from).unwrap_or_default();
            (mount.path("soak/big/blobs").join(name), bytes)
        })
        .collect();
    (mount, Arc::new(shown))
}

/// Runs the random readers and the listers (and `more` workers beside them) on `mount`
/// for `secs`, then asserts the memory bound and that nothing failed; the reads done.
fn random_soak(
    what: &str,
    secs: u64,
    mount: &Mount,
    blobs: &Blobs,
    more: Vec<thread::JoinHandle<()>>,
    stop: &Arc<AtomicBool>,
) -> u64 {
    let rss = RssSampler::start(mount.pid());
    let reads = Arc::new(AtomicU64::new(0));
    let mut workers = more;
    for r in 0..RANDOM_READERS {
        let (blobs, reads, stop) = (blobs.clone(), reads.clone(), stop.clone());
        workers.push(thread::spawn(move || {
            random_reader(r, &blobs, &reads, &stop)
        }));
    }
    for l in 0..LISTERS {
        let (root, stop) = (mount.dir.clone(), stop.clone());
        workers.push(thread::spawn(move || big_lister(l, &root, &stop)));
    }
    run_until(Instant::now() + Duration::from_secs(secs), workers, stop);
    let peak = rss.stop();
    let stats = mount.stats();
    let reads = reads.load(Ordering::Relaxed);
    eprintln!(
        "{what} ({secs} s): {reads} reads, peak RSS {} MiB (VmHWM {} KiB, cache {BUDGET_MIB} MiB), \
         waits for memory {}, layers indexed {}",
        peak.peak_mib(),
        peak.hwm_kib,
        stats["memory"]["waits"],
        stats["images"]["layers_indexed"],
    );
    assert!(reads > 0);
    // The daemon is built with the same profile as this test (CARGO_BIN_EXE_regfs).
    let overhead = FIXED_OVERHEAD_MIB
        + if cfg!(debug_assertions) {
            DEBUG_BUILD_MIB
        } else {
            0
        };
    assert!(
        peak.peak_mib() <= BUDGET_MIB + overhead,
        "{what}: peak RSS {} MiB with --cache-size {BUDGET_MIB}MiB: more than {overhead} MiB beyond it",
        peak.peak_mib()
    );
    assert!(!mount.log().contains("panicked"), "{}", mount.log());
    reads
}

/// A plain gzip image built by umoci: [`IMAGE_FILE`] of noise and a small file.
const IMAGE_FILE: usize = 64 << 20;
const SMALL_FILE: &[u8] = b"read from a layer being indexed\n";

/// Reads the small file of the cold image (its layer's index pass runs meanwhile),
/// then ranges of 4 KiB-1 MiB of its large file (decoded from the checkpoints the pass
/// recorded) until `stop`, each checked; `indexed` once the first read is back.
fn image_reader(rootfs: &Path, big: &[u8], indexed: &AtomicBool, stop: &AtomicBool) {
    let small = fs::read(rootfs.join("etc/small.txt")).expect("read a file of the image");
    assert_eq!(small, SMALL_FILE, "the small file of the image");
    indexed.store(true, Ordering::Relaxed);
    let file = File::open(rootfs.join("data/big.bin")).expect("open the image's large file");
    let who = "the image's large file";
    let mut rng = Rng(0x91_0000);
    read_at_random(who, &mut rng, &[(file, big)], (4096, 1 << 20), stop, |_| {});
}

/// The memory bound (README "Memory"), twice on one registry (pushing the blobs is
/// most of the setup): a mount with the random readers and the listers for
/// `REGFS_SOAK_SECS`; then a fresh mount with the same, and a cold plain-gzip image
/// (built by umoci, pushed by skopeo) indexed meanwhile by a read of one of its files,
/// its large file read at random places after, for half as long. Each mount's peak RSS
/// within the same bound, every byte right, no read failed.
#[test]
fn random_readers_and_listers_stay_within_the_cache_and_a_fixed_overhead() {
    let _alone = crate::alone();
    common::require_tools();
    common::images::require_image_tools();
    let (registry, mount, blobs) = start_big();
    let stop = Arc::new(AtomicBool::new(false));
    let what = "random soak";
    random_soak(what, soak_secs(), &mount, &blobs, Vec::new(), &stop);
    drop(mount);
    let blobs = Arc::try_unwrap(blobs).unwrap_or_else(|_| panic!("the readers are done"));

    let layout = common::Layout::new();
    let big = Arc::new(noise(IMAGE_FILE, 77));
    let files: [(&str, &[u8]); 2] = [("data/big.bin", &big), ("etc/small.txt", SMALL_FILE)];
    layout.new_image("v1", "amd64", &files);
    layout.push("v1", &registry, "soak/img:v1");
    let (mount, blobs) = mount_big(&registry, blobs);
    let stop = Arc::new(AtomicBool::new(false));
    let indexed = Arc::new(AtomicBool::new(false));
    let image = {
        let (rootfs, big) = (mount.path("soak/img/tags/v1/rootfs"), big.clone());
        let (indexed, stop) = (indexed.clone(), stop.clone());
        thread::spawn(move || image_reader(&rootfs, &big, &indexed, &stop))
    };
    // What this adds is the pass (a few seconds) and the reads after it.
    let secs = soak_secs().div_ceil(2);
    let what = "random soak with a gzip layer indexed";
    random_soak(what, secs, &mount, &blobs, vec![image], &stop);
    assert!(indexed.load(Ordering::Relaxed), "the image was read");
    assert_eq!(mount.stats()["images"]["layers_indexed"], 1, "by one pass");
}
