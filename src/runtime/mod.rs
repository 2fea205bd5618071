//! `regfs snapshotter`: containerd's snapshots API over gRPC on a unix socket, for
//! `[proxy_plugins.regfs] type = "snapshot"` (docs/SEMANTICS.md, "Container
//! runtimes"; ARCHITECTURE.md, "The containerd snapshotter"). The filesystem knows
//! nothing of containerd: remote snapshots are directories of regfs mounts that this
//! module starts, one per registry host, and finds again after a restart.

mod api;
mod filter;
mod host_mounts;
mod hosts_toml;
pub mod labels;
mod overlay;
mod remote;
mod service;
mod snapshots;
mod stats;
mod store;

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::mount::daemon::Readiness;
use api::snapshots::snapshots_server::SnapshotsServer;
use host_mounts::HostMounts;
use overlay::Layout;
use remote::Remote;
use service::Service;
use snapshots::Snapshotter;
use stats::RuntimeStats;
use store::Store;

pub struct SnapshotterConfig {
    /// The unix socket containerd connects to.
    pub address: PathBuf,
    /// Metadata, snapshot directories, the per-host mounts and stats.
    pub root: PathBuf,
    /// containerd's hosts directory (`<host>/hosts.toml`).
    pub hosts_dir: PathBuf,
    /// Options every per-host `regfs mount` gets.
    pub mount_args: Vec<OsString>,
}

/// Serves until SIGINT or SIGTERM. The per-host mounts stay (running containers use
/// them); the next start adopts them. Errors are one-line messages for the user.
pub fn run(config: SnapshotterConfig) -> Result<(), String> {
    let snapshotter = open(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("regfs-grpc")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(&config.address, snapshotter))
}

/// The root's directories and store, the mounts found, remote snapshots bound.
fn open(config: &SnapshotterConfig) -> Result<Arc<Snapshotter>, String> {
    let made = |dir: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))
    };
    made(&config.root)?;
    let root = config
        .root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", config.root.display()))?;
    let layout = Layout::new(&root);
    made(&layout.snapshots_dir())?;
    made(&layout.mounts_dir())?;
    let store = Store::open(&layout.metadata_file())?;
    let exe = std::env::current_exe().map_err(|e| format!("where is regfs itself? {e}"))?;
    let mounts = HostMounts::new(
        layout.mounts_dir(),
        config.hosts_dir.clone(),
        exe,
        config.mount_args.clone(),
    );
    let live = mounts.live_hosts();
    if !live.is_empty() {
        info!("regfs mounts found running, adopted: {}", live.join(", "));
    }
    let stats = RuntimeStats::load(layout.stats_file());
    let snapshotter = Arc::new(Snapshotter::new(layout, store, Remote::new(mounts, stats)));
    snapshotter.bind_remote_snapshots();
    info!("snapshotter root {}", root.display());
    Ok(snapshotter)
}

/// Takes the socket over from a snapshotter that is gone; refuses one that answers. The
/// socket is made under a temporary name and renamed into place once it listens, so
/// whoever sees the path can connect.
fn listen(address: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(address).is_ok() {
        return Err(format!(
            "{} is served by another process",
            address.display()
        ));
    }
    match std::fs::remove_file(address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", address.display())),
    }
    let mut temporary = address.as_os_str().to_owned();
    temporary.push(format!(".{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)
        .map_err(|e| format!("cannot listen on {}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, address)
        .map_err(|e| format!("cannot move {} into place: {e}", temporary.display()))?;
    Ok(listener)
}

async fn serve(address: &Path, snapshotter: Arc<Snapshotter>) -> Result<(), String> {
    // Before the socket appears: a SIGTERM right after must stop us cleanly.
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let listener = listen(address)?;
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("stopping; the regfs mounts keep serving running containers");
    };
    info!(
        "serving containerd's snapshots API on {}",
        address.display()
    );
    Readiness::foreground().ready();
    let served = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(snapshotter)))
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    if let Err(e) = std::fs::remove_file(address) {
        warn!("cannot remove {}: {e}", address.display());
    }
    served.map_err(|e| format!("gRPC server: {e}"))
}
