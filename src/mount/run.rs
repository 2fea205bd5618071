//! The life of one mount: check the mountpoint and the registry, mount, serve until
//! unmounted or signalled, unmount cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};
use url::Url;

use super::daemon::Readiness;
use super::kernel::KernelMount;
use super::mountinfo::{is_mount_point, mount_device};
use super::unmount::{self, Watchdog};
use crate::cache::{BlockCache, DiskCache, disk};
use crate::fs::{Fs, FsOptions, IndexOptions};
use crate::fuse::FuseAdapter;
use crate::image::manifest::Platform;
use crate::registry::{ClientOptions, Credentials, MirrorSpec, RegistryClient, RepoName};
use crate::stats::Stats;

/// How long the registry gets to answer `/v2/` before the mount is refused.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Threads reading kernel requests (each hands the work to the tokio runtime).
const FUSE_THREADS: usize = 2;
/// Kernel read-ahead for the mount, in KiB (see `raise_kernel_readahead`).
const KERNEL_READAHEAD_KB: u32 = 1024;
/// How long an unmount waits for the disk cache's queued writes to be done.
const DISK_SETTLE: Duration = Duration::from_secs(5);

pub struct MountConfig {
    pub registry: Url,
    /// `--mirror`s, in order: content-addressed reads try them first.
    pub mirrors: Vec<MirrorSpec>,
    pub mountpoint: PathBuf,
    pub repos: Vec<RepoName>,
    pub tag_ttl: Duration,
    pub page_size: u32,
    pub read_only: bool,
    /// `rm` deletes tags, manifests and blobs from the registry.
    pub allow_delete: bool,
    pub allow_other: bool,
    /// Byte budget of the block cache, and its block size.
    pub cache_size: u64,
    pub block_size: u64,
    /// Bytes per upload PATCH.
    pub chunk_size: u64,
    pub credentials: Credentials,
    /// Extra CA certificates (PEM) to trust, and whether to verify certificates at all.
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
    /// Per operation (retries included) and per silence within a request.
    pub timeout: Duration,
    /// Which image of a multi-platform index `tags/<tag>/rootfs` shows.
    pub platform: Platform,
    /// TOC layers fetched whole in the background once used (`--no-background-fetch`).
    pub background_fetch: bool,
    /// The disk cache: its directory and budget (None: `--no-disk-cache`).
    pub disk_cache: Option<DiskCacheConfig>,
    /// Shared (SOCI) indexes: `--verify-before-serving`, `--publish-indexes`.
    pub indexes: IndexOptions,
}

pub struct DiskCacheConfig {
    /// None: the default directory (`disk::default_dir`).
    pub dir: Option<PathBuf>,
    /// None: the default size (`disk::default_budget`).
    pub size: Option<u64>,
}

/// Mounts and serves until the filesystem is unmounted. `readiness` is told once the
/// mount is usable, or why it failed. Errors are one-line messages for the user.
pub fn run(config: MountConfig, readiness: Readiness) -> Result<(), String> {
    match prepare(&config, readiness.is_daemon()) {
        Ok(prepared) => {
            readiness.ready();
            serve(config, prepared)
        }
        Err(msg) => {
            readiness.failed(&msg);
            Err(msg)
        }
    }
}

/// A mounted session, ready to serve.
struct Prepared {
    runtime: tokio::runtime::Runtime,
    session: Session<FuseAdapter>,
    mountpoint: PathBuf,
    watchdog: Watchdog,
    /// Mounted by regfs itself (mount/kernel.rs), not by fuser, which would unmount it
    /// when its session ends.
    own_mount: bool,
    /// Its writes are let finish after the unmount.
    disk: Option<DiskCache>,
}

/// `daemon`: running detached (`--daemon`), so the watchdog must let go of stderr.
fn prepare(config: &MountConfig, daemon: bool) -> Result<Prepared, String> {
    let canonical_mountpoint = check_mountpoint(&config.mountpoint)?;
    // Before any thread starts: both fork.
    let mut watchdog = Watchdog::start(&canonical_mountpoint, !daemon)?;
    one_malloc_arena();
    // One TLS provider for the process; an error only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = io_runtime()?;
    let stats = Arc::new(Stats::default());
    let client = connect(config, &runtime, &stats)?;

    let disk = config
        .disk_cache
        .as_ref()
        .and_then(|c| open_disk_cache(c, &config.registry, &stats));
    crate::cache::limit::hand_large_allocations_to_the_kernel();
    let cache = Arc::new(BlockCache::new(config.block_size, config.cache_size, stats));
    let options = FsOptions {
        repos: config.repos.clone(),
        tag_ttl: config.tag_ttl,
        read_only: config.read_only,
        allow_delete: config.allow_delete,
        platform: config.platform.clone(),
        background_fetch: config.background_fetch,
        indexes: config.indexes,
    };
    let fs = Arc::new(Fs::new(client, cache, disk.clone(), options));
    let resuming = fs.clone();
    runtime.spawn(async move { resuming.resume_held().await });
    let warming = fs.clone();
    runtime.spawn(async move { warming.warm_up().await });
    let adapter = FuseAdapter::new(fs, runtime.handle().clone());
    let (session, own_mount) = mount_session(config, &canonical_mountpoint, adapter)?;
    match mount_device(&canonical_mountpoint) {
        Some(device) => watchdog.watch(&device),
        None => warn!("cannot find the new mount in mountinfo; no watchdog for it"),
    }
    raise_kernel_readahead(&canonical_mountpoint);
    Ok(Prepared {
        runtime,
        session,
        mountpoint: canonical_mountpoint,
        watchdog,
        own_mount,
        disk,
    })
}

/// The tokio runtime that answers the kernel's requests and talks to the registry.
fn io_runtime() -> Result<tokio::runtime::Runtime, String> {
    // One worker per core: nothing a worker runs blocks for long (disk reads, image
    // indexing and unmounting go to the blocking pool). Four on two cores only traded
    // the same work between threads: a cold 1 GiB read took 1.41 -> 1.30 s of daemon
    // CPU (medians of 5 alternated runs, 2026-12-02), a third of the context switches.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
        .thread_name("regfs-io")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the I/O runtime: {e}"))
}

/// The registry client (and its mirrors), once the registry answers `/v2/`.
fn connect(
    config: &MountConfig,
    runtime: &tokio::runtime::Runtime,
    stats: &Arc<Stats>,
) -> Result<RegistryClient, String> {
    if config.insecure {
        warn!("--insecure: the registry's TLS certificate is not verified");
    }
    info!("registry credentials: {}", config.credentials.describe());
    let options = ClientOptions {
        page_size: config.page_size,
        read_timeout: config.timeout,
        total_timeout: config.timeout,
        ca_file: config.ca_file.clone(),
        insecure: config.insecure,
        credentials: config.credentials.clone(),
        chunk_size: usize::try_from(config.chunk_size).unwrap_or(usize::MAX),
        ..ClientOptions::default()
    };
    let client = RegistryClient::new(config.registry.clone(), options, stats.clone())
        .and_then(|client| client.with_mirrors(config.mirrors.clone()))
        .map_err(|e| e.to_string())?;
    let registry = config.registry.as_str().trim_end_matches('/');
    runtime.block_on(async {
        match tokio::time::timeout(PROBE_TIMEOUT, client.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "registry {registry} does not answer /v2/: {e}{}",
                tls_hint(&e.to_string())
            )),
            Err(_) => Err(format!(
                "registry {registry} does not answer /v2/ within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    })?;
    Ok(client)
}

/// The kernel mount and its FUSE session; true when regfs mounted the device itself.
fn mount_session(
    config: &MountConfig,
    canonical_mountpoint: &Path,
    adapter: FuseAdapter,
) -> Result<(Session<FuseAdapter>, bool), String> {
    let mut fuse_config = Config::default();
    // Requests are answered from tokio tasks; a second thread reading /dev/fuse (on its
    // own cloned fd) keeps the queue moving while the first copies a large reply.
    fuse_config.n_threads = Some(FUSE_THREADS);
    fuse_config.clone_fd = true;
    let source = format!(
        "{}{}",
        unmount::SOURCE_PREFIX,
        config.registry.host_str().unwrap_or("registry")
    );
    fuse_config.mount_options = vec![
        MountOption::FSName(source.clone()),
        MountOption::Subtype("regfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if config.read_only {
        fuse_config.mount_options.push(MountOption::RO);
    }
    if config.allow_other {
        fuse_config.acl = SessionACL::All;
    }
    // As root regfs mounts the device itself, to be listed as fuse.regfs (mount/kernel.rs).
    let own_device = KernelMount {
        source: &source,
        read_only: config.read_only,
        allow_other: config.allow_other,
    }
    .mount(canonical_mountpoint)?;
    let own_mount = own_device.is_some();
    let session = match own_device {
        Some(device) => Session::from_fd(adapter, device, fuse_config.acl, fuse_config.clone())
            .inspect_err(|_| {
                let _ = unmount::detach(canonical_mountpoint);
            }),
        None => Session::new(adapter, &config.mountpoint, &fuse_config),
    }
    .map_err(|e| format!("cannot mount at {}: {e}", config.mountpoint.display()))?;
    Ok((session, own_mount))
}

/// The disk cache, or none (with a warning) when its directory cannot be used: a mount
/// without a disk cache still works.
fn open_disk_cache(
    config: &DiskCacheConfig,
    registry: &Url,
    stats: &Arc<Stats>,
) -> Option<DiskCache> {
    let Some(dir) = config.dir.clone().or_else(disk::default_dir) else {
        warn!("no disk cache: no --cache-dir, and neither XDG_CACHE_HOME nor HOME is set");
        return None;
    };
    let budget = config.size.unwrap_or_else(|| disk::default_budget(&dir));
    let origin = registry.origin().ascii_serialization();
    match DiskCache::open(&dir, budget, &origin, stats.clone()) {
        Ok(disk) => Some(disk),
        Err(e) => {
            warn!(dir = %dir.display(), "no disk cache: {e}");
            None
        }
    }
}

/// Blob blocks are allocated on one thread and freed on another; with glibc's default
/// of an arena per thread, each arena keeps what was freed into it, and the daemon's
/// memory grew to twice `--cache-size` during a long read. One arena keeps it near the
/// budget (measured: 131 MiB → 77 MiB peak for a 512 MiB read with a 64 MiB cache), at no
/// measurable cost: blocks are few and large. Must run before any thread starts.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The kernel reads ahead only 128 KiB on a new FUSE mount, so a sequential reader
/// costs a request (and two context switches) per 128 KiB. Raising the mount's
/// read-ahead lets it ask for the largest request FUSE allows, 1 MiB, several at a
/// time. Needs root (sysfs); without it reads still work, in smaller requests.
fn raise_kernel_readahead(mountpoint: &Path) {
    let Some(device) = mount_device(mountpoint) else {
        debug!("cannot find {} in mountinfo", mountpoint.display());
        return;
    };
    let bdi = format!("/sys/class/bdi/{device}/read_ahead_kb");
    match std::fs::write(&bdi, KERNEL_READAHEAD_KB.to_string()) {
        Ok(()) => debug!("kernel read-ahead set to {KERNEL_READAHEAD_KB} KiB ({bdi})"),
        Err(e) => debug!("cannot raise kernel read-ahead ({bdi}): {e}"),
    }
}

fn serve(config: MountConfig, prepared: Prepared) -> Result<(), String> {
    let Prepared {
        runtime,
        session,
        mountpoint,
        watchdog,
        own_mount,
        disk,
    } = prepared;
    let served = mountpoint.clone();
    info!(
        registry = %config.registry,
        mountpoint = %config.mountpoint.display(),
        "mounted"
    );
    runtime.spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot listen for SIGTERM/SIGINT; unmount with `fusermount3 -u`");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: unmounting"),
            _ = int.recv() => info!("SIGINT: unmounting"),
        }
        let path = mountpoint.clone();
        let result = tokio::task::spawn_blocking(move || unmount::unmount(&path)).await;
        match result {
            // The session ends by itself once the kernel has let go.
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // Busy (a program holds a file open): detach now, so the name is free
                // at once; the kernel ends the mount when the last file is closed.
                warn!("{} is busy; detaching it lazily", mountpoint.display());
                if let Err(e) = unmount::detach(&mountpoint) {
                    warn!("lazy unmount of {} failed: {e}", mountpoint.display());
                }
                std::process::exit(0);
            }
            Ok(Err(e)) => warn!("{e}; unmount with `fusermount3 -u`"),
            Err(e) => warn!("unmount task failed: {e}"),
        }
    });
    let result = session.run();
    if own_mount && result.is_err() {
        // The session broke while still mounted: leave no dead mount behind.
        let _ = unmount::detach(&served);
    }
    watchdog.disarm();
    if let Some(disk) = &disk {
        runtime.block_on(disk.settle(DISK_SETTLE));
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => {
            info!(mountpoint = %config.mountpoint.display(), "unmounted");
            Ok(())
        }
        Err(e) => Err(format!("FUSE session ended with an error: {e}")),
    }
}

/// A certificate problem gets the two ways out named.
fn tls_hint(error: &str) -> &'static str {
    let lower = error.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("unknownissuer") {
        " (a registry with a private CA: --ca-file CA.pem; --insecure skips verification)"
    } else {
        ""
    }
}

/// Refuses, with a clear message, a mountpoint that is missing, not a directory,
/// already mounted on, or a dead FUSE mount that is not regfs's (a dead regfs mount
/// is cleared, see crash.rs).
/// Returns its canonical path.
fn check_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(format!("mountpoint {shown} is not a directory")),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "mountpoint {shown} does not exist (create it with mkdir)"
            ));
        }
        // A daemon that died without unmounting (and without its auto-unmount watcher).
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return unmount::clear_dead_mount(path).and_then(|_| check_mountpoint(path));
        }
        Err(e) => return Err(format!("mountpoint {shown}: {e}")),
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("mountpoint {shown}: {e}"))?;
    if is_mount_point(&canonical) && unmount::is_dead(&canonical) {
        // A stat may have been answered from attributes the kernel cached.
        return unmount::clear_dead_mount(path).and_then(|_| check_mountpoint(path));
    }
    if is_mount_point(&canonical) {
        return Err(format!(
            "mountpoint {shown} is busy: something is already mounted there"
        ));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_mountpoint_is_a_clear_error() {
        let err = check_mountpoint(Path::new("/nonexistent/regfs-test")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }
}
