//! A private containerd 1.6 (own root, state, socket; CRI off) with `regfs snapshotter`
//! as its proxy plugin `regfs`, runc, and a real registry: what `ctr` and `ctr-remote`
//! users do, checked as they would check it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::common::process::{die_with_parent, wait_until};
use crate::common::{Registry, require_commands, require_tools, unmount_below};

/// `regfs snapshotter` on a root of its own.
pub struct Snapshotter {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    /// Its `--hosts-dir`.
    pub hosts: PathBuf,
    cache: PathBuf,
    log: PathBuf,
    timeout: &'static str,
    flags: &'static [&'static str],
}

/// How a test's snapshotter reaches its registry.
pub struct Setup {
    /// The hosts.toml of the registry's host.
    pub hosts_toml: String,
    /// `--timeout` of its mounts.
    pub timeout: &'static str,
    /// Other `regfs snapshotter` flags.
    pub flags: &'static [&'static str],
}

impl Setup {
    /// hosts.toml says only `server`.
    pub fn server(url: &str) -> Setup {
        Setup {
            hosts_toml: format!("server = \"{url}\"\n"),
            timeout: "10s",
            flags: &[],
        }
    }
}

impl Snapshotter {
    /// Root, hosts dir (with `setup`'s hosts.toml for `host`) and disk cache under `dir`.
    pub fn start(dir: &Path, host: &str, setup: &Setup) -> Snapshotter {
        let hosts = dir.join("certs.d");
        let host_dir = hosts.join(host);
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(host_dir.join("hosts.toml"), &setup.hosts_toml).unwrap();
        let mut s = Snapshotter {
            child: None,
            root: dir.join("root"),
            socket: dir.join("snapshotter.sock"),
            hosts,
            cache: dir.join("cache"),
            log: dir.join("snapshotter.log"),
            timeout: setup.timeout,
            flags: setup.flags,
        };
        s.restart();
        s
    }

    /// Starts it again after `stop` (or the first time), and waits for its socket.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regfs"));
        cmd.args(["snapshotter", "--timeout", self.timeout, "--root"])
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--hosts-dir")
            .arg(&self.hosts)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd, libc::SIGKILL);
        // The loosest umask: what it keeps under its root must be private all the same.
        // SAFETY: umask is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start regfs snapshotter"));
        let socket = self.socket.clone();
        wait_until(Duration::from_secs(20), "the snapshotter's socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let mut exited = None;
            wait_until(Duration::from_secs(20), "the snapshotter to stop", || {
                exited = child.try_wait().ok().flatten();
                exited.is_some()
            });
            assert!(exited.is_some_and(|s| s.success()), "{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/.regfs/stats` of the mount of `host` (Null before it is mounted).
    pub fn mount_stats(&self, host: &str) -> serde_json::Value {
        let path = self.root.join("mounts").join(host).join(".regfs/stats");
        let bytes = std::fs::read(path).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    }

    /// What it keeps under its root and in its disk cache is root's alone, though it
    /// runs with umask 0: directories 0700 and files 0600, but for the snapshot
    /// directories containers use and the mounts; its socket 0600.
    pub fn assert_private(&self) {
        assert_eq!(mode(&self.socket), 0o600, "the socket");
        let seen = private_below(&self.root, &|rel: &[&OsStr]| {
            matches!(rel, [s, _, _] if *s == "snapshots") || matches!(rel, [m, _] if *m == "mounts")
        });
        assert!(seen >= 5, "stats, metadata, logs, mounts, snapshots");
        let cached = private_below(&self.cache, &|_: &[&OsStr]| false);
        assert!(cached >= 1, "the mounts' disk cache holds something");
    }

    /// Whether its process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// stats.json: served layers and fallbacks.
    pub fn stats(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.root.join("stats.json")).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the snapshotter runs").id()
    }

    /// The processes serving the host mounts under the root (`regfs mount … ROOT/mounts/…`).
    pub fn mount_pids(&self) -> Vec<u32> {
        let mounts = self.root.join("mounts");
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|p| {
                let pid: u32 = p.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                let ours = args.contains(&b"mount".as_slice())
                    && args
                        .iter()
                        .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)).starts_with(&mounts));
                ours.then_some(pid)
            })
            .collect()
    }

    /// Mount points under the root: `snapshots/<id>/fs` binds and `mounts/<host>`.
    pub fn mounts(&self) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(regfs::mount::unescape_mountinfo)
            .filter_map(|p| {
                Path::new(&p)
                    .strip_prefix(&self.root)
                    .ok()
                    .map(|r| r.display().to_string())
            })
            .collect()
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Asserts every directory below `top` (itself included) is 0700 and every file 0600,
/// but for entries `skip` names by their path below `top` (not descended into);
/// returns how many entries were checked.
fn private_below(top: &Path, skip: &dyn Fn(&[&OsStr]) -> bool) -> usize {
    let mut pending = vec![top.to_owned()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel: Vec<&OsStr> = path.strip_prefix(top).unwrap().iter().collect();
            if skip(&rel) {
                continue;
            }
            seen += 1;
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }
    seen
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// containerd with `[proxy_plugins.regfs]` on the snapshotter's socket.
pub struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn start(dir: &Path, snapshotter: &Snapshotter) -> Containerd {
        let dir = dir.join("containerd");
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n\
             [proxy_plugins.regfs]\n  type = \"snapshot\"\n  address = \"{snap}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = dir.join("containerd.sock").display(),
            snap = snapshotter.socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().expect("start containerd (scripts/setup.sh)");
        let containerd = Containerd { dir, child };
        wait_until(Duration::from_secs(30), "containerd to start", || {
            containerd.ctr(&["version"]).status.success()
        });
        containerd
    }

    /// The root filesystem of running container `id`, as its shim mounted it.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id)
            .join("rootfs")
    }

    /// containerd's socket.
    pub fn address(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr-remote` (ctr and its rpull) on this containerd, bounded in time.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("120")
            .arg("ctr-remote")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr-remote")
    }

    /// Its stdout; panics with both outputs and containerd's log unless it succeeded.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed:\n{}\n{}\ncontainerd's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until containerd reaches the snapshotter again after a restart: its gRPC
    /// client fails calls fast while it backs off (at most 3 s in containerd 1.6).
    pub fn wait_for_snapshotter(&self) {
        wait_until(
            Duration::from_secs(20),
            "containerd to reach the snapshotter",
            || {
                self.ctr(&["snapshots", "--snapshotter", "regfs", "ls"])
                    .status
                    .success()
            },
        );
    }

    /// `ctr-remote image rpull --plain-http --snapshotter regfs image`: the pull that
    /// labels each layer for a remote snapshotter.
    pub fn rpull(&self, image: &str) -> String {
        self.ctr_ok(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "regfs",
            image,
        ])
    }

    /// `ctr run -d` of `image` as `id`, running `sleep`; stopped by `kill_task`.
    pub fn start_sleeper(&self, image: &str, id: &str) {
        self.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "regfs",
            image,
            id,
            "sleep",
            "300",
        ]);
    }

    pub fn kill_task(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = self.ctr(&["task", "delete", "-f", id]);
        let _ = self.ctr(&["container", "delete", id]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks a failed test left: their shims outlive containerd otherwise.
        if let Ok(out) = Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["task", "ls", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                self.kill_task(id);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a runtime test runs, torn down in order: containerd, the snapshotter,
/// then every mount left below the temp dir (the per-host regfs mounts included,
/// whose daemons exit once unmounted).
pub struct Rig {
    pub containerd: Option<Containerd>,
    pub snapshotter: Snapshotter,
    pub registry: Registry,
    pub dir: TempDir,
}

impl Rig {
    /// The snapshotter reaches the registry as containerd does.
    pub fn start() -> Rig {
        prerequisites();
        let registry = Registry::start();
        let setup = Setup::server(&registry.url());
        Rig::start_for(registry, setup)
    }

    /// `server`: what the snapshotter's hosts.toml says instead of the registry's URL.
    pub fn start_with(server: Option<&str>) -> Rig {
        prerequisites();
        let registry = Registry::start();
        let setup = Setup::server(server.unwrap_or(&registry.url()));
        Rig::start_for(registry, setup)
    }

    /// The snapshotter set up by `setup` for `registry`'s host.
    pub fn start_for(registry: Registry, setup: Setup) -> Rig {
        prerequisites();
        let dir = tempfile::Builder::new()
            .prefix("regfs-runtime-")
            .tempdir()
            .unwrap();
        let host = registry.addr.to_string();
        let snapshotter = Snapshotter::start(dir.path(), &host, &setup);
        let containerd = Containerd::start(dir.path(), &snapshotter);
        Rig {
            containerd: Some(containerd),
            snapshotter,
            registry,
            dir,
        }
    }

    /// The registry's host, as image references name it.
    pub fn host(&self) -> String {
        self.registry.addr.to_string()
    }

    /// A container ID of this test's own: runc keeps its state per namespace in one
    /// place for every containerd on the machine, so parallel tests must not share IDs.
    pub fn id(&self, name: &str) -> String {
        let dir = self.dir.path().file_name().unwrap_or_default();
        format!(
            "{name}-{}",
            dir.to_string_lossy().trim_start_matches("regfs-runtime-")
        )
    }

    pub fn ctr(&self) -> &Containerd {
        self.containerd.as_ref().expect("containerd runs")
    }

    /// `ctr run --rm` of `image` with this snapshotter, as container `name` (made this
    /// test's own), running `cat file`: its output.
    pub fn cat(&self, image: &str, name: &str, file: &str) -> String {
        self.ctr().ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "regfs",
            image,
            &self.id(name),
            "cat",
            file,
        ])
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.containerd.take();
        if let Some(mut child) = self.snapshotter.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_below(self.dir.path());
        remove_mount_cgroup(&self.registry);
    }
}

/// Fails with a message naming setup.sh unless the tools of the runtime tests exist.
pub fn prerequisites() {
    require_tools();
    require_commands(&["containerd", "ctr-remote", "runc", "busybox"]);
}

/// The cgroup v2 root, where it is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let point = before.split(' ').nth(4)?;
        (after.split(' ').next()? == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The cgroup line of cgroup v2 ("0::/…") of a process.
pub fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default()
        .to_owned()
}

/// The snapshotter gives each host's mount a cgroup of its own (without systemd); once
/// the test unmounted it and its daemon exited, the empty cgroup is removed.
fn remove_mount_cgroup(registry: &Registry) {
    let Some(root) = cgroup2_root() else {
        return;
    };
    let name = format!("regfs-mount-{}", registry.addr).replace(':', "-");
    let dir = root.join(name);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dir.exists() && std::fs::remove_dir(&dir).is_err() && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}
