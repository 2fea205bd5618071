//! The command line and logging set-up; everything else lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use regfs::cache::disk::{self, admin};
use regfs::fs::IndexOptions;
use regfs::image::manifest::Platform;
use regfs::mount::daemon::{self, Readiness};
use regfs::mount::{self, DiskCacheConfig, MountConfig, helper};

use regfs::registry::{Credentials, MirrorSpec, RepoName, parse_registry_url};
use regfs::runtime::{self, SnapshotterConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "regfs",
    version,
    about = "Mount a container registry as a folder",
    long_about = "regfs mounts an OCI / Docker registry (Distribution API v2) as a folder: \
ls, grep, cat and rsync see repositories, tags, manifests and blobs as files. Blob reads \
are lazy: a read fetches only the byte range it touches. The files of every image are \
under tags/<tag>/rootfs/, read lazily from its layers. Files written under a \
repository become blob uploads and manifest pushes, committed when closed.",
    after_help = "\
TREE:
  MOUNTPOINT/<namespace>/.../<repo>/
      tags/<tag>/manifest.json   the manifest the tag points at, byte for byte
      manifests/<digest>         every manifest reachable from the tags (index children
                                 and referrers too)
      blobs/<digest>             configs and layers of those manifests; others by lookup
      uploads/<name>             write area: a file written here becomes a blob upload,
                                 then a symlink to ../blobs/<digest>
      tags/<tag>/rootfs/         the image's files, its layers applied (not listed;
                                 open it by name; --platform picks from an index)
      .images/<digest>/rootfs/   the same for any image manifest by digest
      .layers/<digest>/          one layer, as an overlayfs lowerdir
      .referrers/<digest>/       manifests whose subject is <digest> (links), and
                                 index.json with their artifactType
      .oci/                      the repository as a read-only OCI image layout
                                 (skopeo copy oci:MNT/<repo>/.oci:<tag> ...)
  MOUNTPOINT/.regfs/stats        counters as JSON (not listed; open it by name)

WRITING:
  Writing blobs/<digest>, manifests/<digest> or tags/<tag>/manifest.json pushes it;
  close (or the rename of a temp file, as rsync does) is the commit and returns its
  result. mkdir makes repositories and tag directories; ln across repositories mounts
  a blob. A manifest with a subject (a signature) is added to its subject's
  sha256-<hex> referrers index where the registry has no referrers API.
  --read-only refuses every write (EROFS).

DELETING (only with --allow-delete; else EPERM):
  rm tags/<tag>/manifest.json, or rm -r tags/<tag>, untags; rm manifests/<digest>
  deletes a manifest (and the tags naming it); rm blobs/<digest> a blob. A delete
  never takes more than it names: EBUSY while another tag still reaches the object
  (a registry that can only untag by deleting the digest, an index naming a child,
  an image using a blob); the log names the tags. A registry refusal is EPERM.

SHARED INDEXES (SOCI):
  A plain gzip layer has no index of its files: the first look at it reads it whole.
  Where the image has a SOCI index (v2, named by the image manifest, or v1, a
  referrer of it), its files come from the first look, each span checked against the
  index's digest and each file's tar header against the index, and the whole layer is
  checked against its digest in the background (a lie: EIO from then on, and the
  layer is read whole instead). --publish-indexes pushes the index regfs built for an
  image that has none, so other machines are lazy from their first look;
  --verify-before-serving uses no index (nothing before the whole layer matched).

DISK CACHE:
  What a mount fetches is kept in --cache-dir (root: /var/cache/regfs, else
  $XDG_CACHE_HOME/regfs), shared by every mount and restart, within --disk-cache-size
  (least recently used first). Blobs that matched their digest serve every registry
  and, as root on Linux >= 6.9, are read by the kernel directly (FUSE passthrough);
  until then blocks are kept per registry. --no-disk-cache writes nothing.
  regfs cache du|ls|prune [--max SIZE]|verify [DIR] look after it.

EXAMPLES:
  regfs mount http://127.0.0.1:5000 /mnt/reg
  grep -rl linux/arm64 /mnt/reg/*/*/tags/*/manifest.json
  cat /mnt/reg/team/app/tags/v1/rootfs/etc/os-release   (a file inside the image)
  rsync -a /mnt/reg/team/app/ /backup/app/        (back up; again later: only changes)
  mkdir -p /mnt/other/team/app && rsync -a /backup/app/ /mnt/other/team/app/   (restore)
  cp layer.tar /mnt/reg/team/app/uploads/
  regfs mount --repo library/alpine --daemon registry.example.com /mnt/reg
  regfs mount --repo library/alpine docker.io /mnt/hub
  regfs mount --mirror http://cache.internal:5000 reg.example /mnt/reg   (pull-through cache)
  echo \"$TOKEN\" | regfs mount --username me --password-stdin ghcr.io /mnt/ghcr
  fusermount3 -u /mnt/reg        (or Ctrl-C / SIGTERM on the regfs process)
  regfs cache prune --max 2GiB   (trim the disk cache; regfs cache verify checks it)

EXIT STATUS:
  0 after a clean unmount; 1 when the mount could not be made (the message says why).

CREDENTIALS (first found wins):
  --username NAME --password-stdin, then REGFS_USERNAME/REGFS_PASSWORD, then the docker
  config ($DOCKER_CONFIG/config.json or ~/.docker/config.json: auths, credsStore,
  credHelpers). Without any, regfs reads anonymously.

ENVIRONMENT:
  RUST_LOG         log filter, e.g. RUST_LOG=regfs=debug (overrides -v)
  REGFS_USERNAME, REGFS_PASSWORD   credentials (see above)
  DOCKER_CONFIG    directory of the docker config.json"
)]
struct Cli {
    /// More log output on stderr: -v for debug, -vv for trace
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount REGISTRY at MOUNTPOINT and serve it until unmounted or sent SIGINT/SIGTERM
    Mount(Box<MountArgs>),
    /// Look after the disk cache: what it holds, trim it, check it
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Serve containerd's snapshots API (a proxy snapshotter): image layers are
    /// served lazily from regfs mounts instead of being downloaded and unpacked
    #[command(after_help = SNAPSHOTTER_HELP)]
    Snapshotter(Box<SnapshotterArgs>),
    /// What a mount (or every regfs mount) is doing: registry, cache and disk use
    /// against their budgets, bytes fetched vs read, layers being indexed, fallbacks,
    /// errors. Exit status 1 when a mount is dead or does not answer
    Status(StatusArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// The mount to show (default: every regfs mount)
    mountpoint: Option<PathBuf>,
    /// Show it again every SECS seconds (default 2) until interrupted
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
    /// The raw counters of /.regfs/stats as JSON, keyed by mount point
    #[arg(long)]
    json: bool,
}

const SNAPSHOTTER_HELP: &str = "\
CONTAINERD (config.toml):
  [proxy_plugins.regfs]
    type = \"snapshot\"
    address = \"/run/regfs/snapshotter.sock\"
  # CRI (Kubernetes): the snapshotter, and the labels that name each layer
  [plugins.\"io.containerd.grpc.v1.cri\".containerd]
    snapshotter = \"regfs\"
    disable_snapshot_annotations = false

WHAT IS LAZY:
  An unpack whose labels name the image and layer (ctr-remote image rpull:
  containerd.io/snapshot/remote/stargz.*; CRI, nerdctl: containerd.io/snapshot/cri.*)
  is served from the regfs mount of the registry host at ROOT/mounts/<host>, and
  containerd downloads no layer. Anything else (a plain ctr image pull, a layer
  that cannot be served) is an ordinary overlay snapshot that containerd fills; each
  such fallback is logged once per layer and counted in ROOT/stats.json.

REGISTRIES:
  As containerd finds them: HOSTS_DIR/<host>/hosts.toml (else HOSTS_DIR/_default/):
  server (plain HTTP only where it says http://), [host.\"URL\"] entries with the pull
  capability as mirrors, ca, skip_verify. Without one: https://<host>.
  Credentials: the docker config ($DOCKER_CONFIG/config.json or ~/.docker/config.json,
  per host); REGFS_USERNAME/REGFS_PASSWORD are not passed on (they would go to every
  registry an image names).

RESTARTS:
  Each host's mount runs in a process of its own (a systemd scope where systemd runs,
  else its own session and cgroup), so stopping or upgrading the snapshotter leaves
  running containers their files; the next start adopts the mounts. Its log is
  ROOT/logs/<host>.log.";

#[derive(Args)]
struct SnapshotterArgs {
    /// The unix socket containerd connects to
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/regfs/snapshotter.sock"
    )]
    address: PathBuf,
    /// Snapshot metadata and directories, the per-host mounts, logs and stats.json
    #[arg(long, value_name = "DIR", default_value = "/var/lib/regfs/snapshotter")]
    root: PathBuf,
    /// containerd's registry hosts directory (<host>/hosts.toml)
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    hosts_dir: PathBuf,
    /// Memory for cached blob blocks, per registry host's mount
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = checked(parse_bytes))]
    cache_size: String,
    /// Blobs are fetched and cached in blocks of this size
    #[arg(long, value_name = "SIZE", default_value = "2MiB", value_parser = checked(parse_block_size))]
    block_size: String,
    /// What a container's read waits at most for a registry that does not answer
    /// before it fails with EIO
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = checked(parse_timeout))]
    timeout: String,
    /// The image of a multi-platform index to serve, as os/arch[/variant] (default:
    /// this machine's)
    #[arg(long, value_name = "OS/ARCH", value_parser = checked(Platform::parse))]
    platform: Option<String>,
    /// The disk cache directory, shared by the mounts and kept across restarts
    /// [default: /var/cache/regfs for root]
    #[arg(long, value_name = "DIR", conflicts_with = "no_disk_cache")]
    cache_dir: Option<PathBuf>,
    /// Most the disk cache may take [default: the smaller of 10GiB and 10% of its
    /// filesystem]
    #[arg(long, value_name = "SIZE", value_parser = checked(parse_bytes), conflicts_with = "no_disk_cache")]
    disk_cache_size: Option<String>,
    /// No disk cache: every mount starts cold
    #[arg(long)]
    no_disk_cache: bool,
}

/// A value parser that checks like `parse` but keeps the text, to hand on to the
/// per-host `regfs mount`s.
fn checked<T>(
    parse: impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s| parse(s).map(|_| s.to_owned())
}

fn snapshotter_config(args: SnapshotterArgs, verbose: u8) -> SnapshotterConfig {
    let mut mount_args: Vec<std::ffi::OsString> = vec![
        "--cache-size".into(),
        args.cache_size.into(),
        "--block-size".into(),
        args.block_size.into(),
        "--timeout".into(),
        args.timeout.into(),
    ];
    let optional = [
        ("--platform", args.platform.map(Into::into)),
        ("--cache-dir", args.cache_dir.map(Into::into)),
        ("--disk-cache-size", args.disk_cache_size.map(Into::into)),
    ];
    for (flag, value) in optional {
        if let Some(value) = value {
            mount_args.push(flag.into());
            mount_args.push(value);
        }
    }
    if args.no_disk_cache {
        mount_args.push("--no-disk-cache".into());
    }
    if verbose > 0 {
        mount_args.push(format!("-{}", "v".repeat(verbose.into())).into());
    }
    SnapshotterConfig {
        address: args.address,
        root: args.root,
        hosts_dir: args.hosts_dir,
        mount_args,
    }
}

#[derive(Subcommand)]
enum CacheCommand {
    /// How much the cache directory takes on disk, and of what
    Du(CacheDir),
    /// Every entry, least recently used first: size, last use, kind, digest
    Ls(CacheDir),
    /// Remove least recently used entries until the cache takes at most --max
    Prune {
        /// What may remain (e.g. 1GiB); 0, the default, empties the cache
        #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_bytes)]
        max: u64,
        #[command(flatten)]
        dir: CacheDir,
    },
    /// Check every entry against its digest or checksum, and remove the damaged ones
    /// (mounts fetch them again); exit status 1 if any was damaged
    Verify(CacheDir),
}

#[derive(Args)]
struct CacheDir {
    /// The cache directory [default: /var/cache/regfs for root, else
    /// $XDG_CACHE_HOME/regfs]
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl CacheDir {
    fn path(&self) -> Result<PathBuf, String> {
        self.dir.clone().or_else(disk::default_dir).ok_or_else(|| {
            "no cache directory: name one (neither XDG_CACHE_HOME nor HOME is set)".into()
        })
    }
}

#[derive(Args)]
struct MountArgs {
    /// The registry: http://host:port, https://host[:port], or host[:port] (means https)
    registry: String,
    /// An existing, empty directory to mount on
    mountpoint: PathBuf,
    /// A repository to show even when the registry refuses to list its catalog
    /// (repeatable); other names can still be opened by path
    #[arg(long = "repo", value_name = "NAME")]
    repos: Vec<String>,
    /// How long tag lists and tag→manifest answers are trusted before asking again
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    tag_ttl: Duration,
    /// Entries per page when listing the catalog and tags (the n= parameter)
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    page_size: u32,
    /// Mount read-only: every write fails with EROFS
    #[arg(long)]
    read_only: bool,
    /// Let rm delete from the registry: rm tags/<tag>/manifest.json (or rm -r
    /// tags/<tag>) untags, rm manifests/<digest> and rm blobs/<digest> delete. Without
    /// it every delete is EPERM
    #[arg(long, conflicts_with = "read_only")]
    allow_delete: bool,
    /// Let other users see the mount (needs user_allow_other in /etc/fuse.conf unless root)
    #[arg(long)]
    allow_other: bool,
    /// Memory for cached blob blocks (e.g. 64MiB, 1GiB); least recently used blocks go first
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_bytes)]
    cache_size: u64,
    /// Blobs are fetched and cached in blocks of this size (range requests)
    #[arg(long, value_name = "SIZE", default_value = "2MiB", value_parser = parse_block_size)]
    block_size: u64,
    /// Blob uploads are sent in PATCH requests of this size (raised to what the
    /// registry asks for); each file being written holds about two
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_chunk_size)]
    chunk_size: u64,
    /// Detach into the background once the mount is ready; the exit status tells
    /// whether it worked. The daemon's log is discarded unless --log-file is given
    #[arg(long)]
    daemon: bool,
    /// Append the log to FILE instead of writing it to stderr
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// User name for the registry; the password is read from stdin (--password-stdin)
    #[arg(long, value_name = "NAME", requires = "password_stdin")]
    username: Option<String>,
    /// Read the password (or access token) for --username as one line from stdin
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// Also trust the CA certificates in this PEM file (a private registry's CA)
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Do not verify the registry's TLS certificate (only for testing: anyone on the
    /// path can read the credentials)
    #[arg(long)]
    insecure: bool,
    /// What a program waits at most for a registry that does not answer: a stat,
    /// listing, read or close that cannot be answered fails with EIO within it (one
    /// registry operation, retries included; a body slower than 1 KiB/s counts as silent)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    timeout: Duration,
    /// The image of a multi-platform index that tags/<tag>/rootfs and
    /// .images/<digest>/rootfs show, as os/arch[/variant] (default: this machine's)
    #[arg(long, value_name = "OS/ARCH", value_parser = Platform::parse)]
    platform: Option<Platform>,
    /// The disk cache directory, shared by every mount and kept across restarts
    /// [default: /var/cache/regfs for root, else $XDG_CACHE_HOME/regfs]
    #[arg(long, value_name = "DIR", conflicts_with = "no_disk_cache")]
    cache_dir: Option<PathBuf>,
    /// Most the disk cache may take (least recently used entries go first)
    /// [default: the smaller of 10GiB and 10% of its filesystem]
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, conflicts_with = "no_disk_cache")]
    disk_cache_size: Option<u64>,
    /// No disk cache: nothing is written to disk, every new mount starts cold
    #[arg(long)]
    no_disk_cache: bool,
    /// A mirror of the registry (a pull-through cache, Harbor proxy project, Spegel,
    /// Dragonfly), repeatable, tried in order: blobs and manifests by digest are read
    /// from it first, checked, and from the registry if it fails; tags and writes
    /// always go to the registry. A path in the URL goes before repository names
    #[arg(long = "mirror", value_name = "URL", value_parser = MirrorSpec::parse)]
    mirrors: Vec<MirrorSpec>,
    /// Do not fetch eStargz and zstd:chunked layers whole in the background. By default,
    /// once a file of such a layer (or of its image) is opened, the rest of the layer is
    /// fetched into the disk cache below the reads programs wait on, so later reads do
    /// not wait for the network; and the files an eStargz prefetch landmark names are
    /// fetched as soon as the layer is looked up. That costs each such layer's whole
    /// size in network traffic and disk cache space (counted apart in /.regfs/stats as
    /// images.background_bytes). Without a disk cache nothing is fetched in the background
    #[arg(long)]
    no_background_fetch: bool,
    /// After the first look at a plain gzip image with no SOCI index, push the index
    /// regfs's pass built (a SOCI v1 index as a referrer of the image manifest), so
    /// other machines read it lazily from their first look. Needs push rights
    #[arg(long)]
    publish_indexes: bool,
    /// Use no SOCI index: nothing of a plain layer is shown before it was read whole
    /// and matched its digest (the first look at an image moves all of it)
    #[arg(long)]
    verify_before_serving: bool,
}

fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), String> {
    let default = match verbose {
        0 => "regfs=info",
        1 => "regfs=debug",
        _ => "regfs=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logger = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            logger
                .with_writer(std::sync::Arc::new(file))
                .with_ansi(false)
                .init();
        }
        None => logger
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
    Ok(())
}

/// "64MiB", "1G", "4096": sizes as people write them (binary and decimal units).
fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{e} (try e.g. 64MiB)"))
}

fn parse_block_size(s: &str) -> Result<u64, String> {
    let size = parse_bytes(s)?;
    if !(4096..=64 << 20).contains(&size) {
        return Err("must be between 4KiB and 64MiB".into());
    }
    Ok(size)
}

fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let size = parse_bytes(s)?;
    if !(64 << 10..=256 << 20).contains(&size) {
        return Err("must be between 64KiB and 256MiB".into());
    }
    Ok(size)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

/// One line from stdin, without its line ending. Read before the daemon forks.
fn password_from_stdin() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("--password-stdin: cannot read stdin: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err("--password-stdin: stdin gave an empty password".into());
    }
    Ok(password)
}

fn mount_config(args: MountArgs) -> Result<MountConfig, String> {
    let registry = parse_registry_url(&args.registry)?;
    let flags = match args.username {
        Some(username) if args.password_stdin => Some((username, password_from_stdin()?)),
        _ => None,
    };
    let credentials = Credentials::find(flags, &registry);
    let repos = args
        .repos
        .iter()
        .map(|r| {
            RepoName::parse(r).ok_or_else(|| format!("--repo {r:?} is not a valid repository name"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MountConfig {
        registry,
        mirrors: args.mirrors,
        mountpoint: args.mountpoint,
        repos,
        tag_ttl: args.tag_ttl,
        page_size: args.page_size,
        read_only: args.read_only,
        allow_delete: args.allow_delete,
        allow_other: args.allow_other,
        cache_size: args.cache_size,
        block_size: args.block_size,
        chunk_size: args.chunk_size,
        credentials,
        ca_file: args.ca_file,
        insecure: args.insecure,
        timeout: args.timeout,
        platform: args.platform.unwrap_or_else(Platform::host),
        background_fetch: !args.no_background_fetch,
        disk_cache: (!args.no_disk_cache).then_some(DiskCacheConfig {
            dir: args.cache_dir,
            size: args.disk_cache_size,
        }),
        indexes: IndexOptions {
            verify_before_serving: args.verify_before_serving,
            publish: args.publish_indexes,
        },
    })
}

/// `regfs cache …`: prints its report; Ok(false) when `verify` found damage.
fn cache_command(command: CacheCommand) -> Result<bool, String> {
    match command {
        CacheCommand::Du(dir) => println!("{}", admin::du(&dir.path()?)?),
        CacheCommand::Ls(dir) => {
            for line in admin::ls(&dir.path()?)? {
                println!("{line}");
            }
        }
        CacheCommand::Prune { max, dir } => {
            let path = dir.path()?;
            let (removed, used) = admin::prune(&path, max)?;
            println!(
                "removed {removed} entries; {} now takes {}",
                path.display(),
                admin::human(used)
            );
        }
        CacheCommand::Verify(dir) => {
            let (checked, damaged) = admin::verify(&dir.path()?)?;
            for line in &damaged {
                println!("{line}");
            }
            println!("{checked} entries checked, {} damaged", damaged.len());
            return Ok(damaged.is_empty());
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match helper::translate(&args) {
        None => Cli::parse_from(args),
        Some(Ok(translated)) => Cli::parse_from(translated),
        Some(Err(msg)) => {
            eprintln!("regfs: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let args = match cli.command {
        Command::Mount(args) => *args,
        Command::Snapshotter(args) => {
            let result = init_logging(cli.verbose, None)
                .and_then(|()| runtime::run(snapshotter_config(*args, cli.verbose)));
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("regfs: {msg}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Status(args) => {
            let every = args.watch.map(|s| Duration::from_secs(s.max(1)));
            return match regfs::status::run(args.mountpoint.as_deref(), args.json, every) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(msg) => {
                    eprintln!("regfs: {msg}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Cache(command) => {
            return match cache_command(command) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(msg) => {
                    eprintln!("regfs: {msg}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let daemonize = args.daemon;
    let result = init_logging(cli.verbose, args.log_file.as_deref())
        .and_then(|()| mount_config(args))
        .and_then(|config| {
            let readiness = if daemonize {
                daemon::detach()?
            } else {
                Readiness::foreground()
            };
            mount::run(config, readiness)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("regfs: {msg}");
            ExitCode::FAILURE
        }
    }
}
