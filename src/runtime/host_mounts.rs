//! One regfs mount per registry host at `<root>/mounts/<host>`, shared by all of that
//! host's remote snapshots. Each is `regfs mount --daemon` in a process of its own,
//! outside the snapshotter's cgroup (a systemd scope where systemd runs; else a
//! cgroup of its own where cgroup v2 is writable; always a session of its own), so a
//! restart or upgrade of the snapshotter (`KillMode=control-group`) leaves running
//! containers their files. A restarted snapshotter finds its mounts again in
//! /proc/self/mountinfo (fuse.regfs, source `regfs:…`, under `<root>/mounts/`).

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::hosts_toml::host_config;
use crate::mount::mountinfo::mount_entry;
use crate::mount::unmount::{SOURCE_PREFIX, is_dead};

/// How long a host whose mount failed is not tried again: the other layers of the pull
/// fall back at once instead of each waiting for the registry's probe.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

/// The names of the mounts' cgroups (beside the cgroup v2 root's others).
const CGROUP_PREFIX: &str = "regfs-mount-";

/// Where systemd says it runs (sd_booted(3)).
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

pub struct HostMounts {
    /// `<root>/mounts`.
    dir: PathBuf,
    hosts_dir: PathBuf,
    /// The regfs binary.
    exe: PathBuf,
    /// Options every mount gets (caches, --timeout, --platform, -v).
    mount_args: Vec<OsString>,
    /// One lock per host: concurrent Prepares of one host make one mount.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Hosts whose mount failed lately: when, and why.
    failed: Mutex<HashMap<String, (Instant, String)>>,
}

impl HostMounts {
    pub fn new(
        dir: PathBuf,
        hosts_dir: PathBuf,
        exe: PathBuf,
        mount_args: Vec<OsString>,
    ) -> HostMounts {
        HostMounts {
            dir,
            hosts_dir,
            exe,
            mount_args,
            locks: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The hosts whose mounts are up (left by an earlier snapshotter, or made by this
    /// one), from mountinfo.
    pub fn live_hosts(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut hosts: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|host| self.is_live(&self.dir.join(host)))
            .collect();
        hosts.sort();
        hosts
    }

    fn is_live(&self, mountpoint: &Path) -> bool {
        mount_entry(mountpoint)
            .is_some_and(|e| e.fs_type.starts_with("fuse") && e.source.starts_with(SOURCE_PREFIX))
            && !is_dead(mountpoint)
    }

    /// The mount of `host`, made if it is not up. `host` was checked to be one plain
    /// directory name (labels.rs).
    pub fn ensure(&self, host: &str) -> Result<PathBuf, String> {
        let lock = {
            let mut locks = self.locks.lock().map_err(|_| "host lock poisoned")?;
            locks.entry(host.to_owned()).or_default().clone()
        };
        let _held = lock.lock().map_err(|_| "host lock poisoned")?;
        let mountpoint = self.dir.join(host);
        if self.is_live(&mountpoint) {
            return Ok(mountpoint);
        }
        if let Some((when, why)) = self.failed.lock().ok().and_then(|f| f.get(host).cloned()) {
            if when.elapsed() < FAILURE_MEMORY {
                return Err(why);
            }
        }
        let made = self.make(host, &mountpoint);
        if let (Err(why), Ok(mut failed)) = (&made, self.failed.lock()) {
            failed.insert(host.to_owned(), (Instant::now(), why.clone()));
        }
        made
    }

    /// Starts the mount of `host` at `mountpoint`.
    fn make(&self, host: &str, mountpoint: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| format!("cannot make {}: {e}", mountpoint.display()))?;
        let config = host_config(&self.hosts_dir, host)?;
        let mut args: Vec<OsString> = vec![
            "mount".into(),
            "--daemon".into(),
            "--read-only".into(),
            // Containers run as any user.
            "--allow-other".into(),
        ];
        let logs = self.dir.with_file_name("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|e| format!("cannot make {}: {e}", logs.display()))?;
        args.push("--log-file".into());
        args.push(logs.join(format!("{host}.log")).into());
        args.extend(self.mount_args.iter().cloned());
        args.extend(config.mount_args());
        args.push(mountpoint.into());
        self.spawn(host, &args)?;
        if !self.is_live(mountpoint) {
            return Err(format!(
                "{}: regfs said it mounted, but nothing is there",
                mountpoint.display()
            ));
        }
        info!(
            "{host}: mounted {} at {}",
            config.server,
            mountpoint.display()
        );
        Ok(mountpoint.to_owned())
    }

    /// Runs `regfs mount --daemon …` outside this process's cgroup and waits for its
    /// verdict (the daemon's parent exits once the mount is ready, or says why not).
    fn spawn(&self, host: &str, args: &[OsString]) -> Result<(), String> {
        let mut command = if Path::new(SYSTEMD_RUNNING).exists() {
            let mut c = Command::new("systemd-run");
            c.args(["--scope", "--collect", "--quiet", "--unit"])
                .arg(unit_name(host))
                .arg("--")
                .arg(&self.exe);
            c
        } else {
            let mut c = Command::new(&self.exe);
            if let Some(procs) = own_cgroup(host) {
                // SAFETY: between fork and exec only async-signal-safe calls are made
                // (open, write, close on a path prepared before the fork).
                unsafe { c.pre_exec(move || join_cgroup(&procs)) };
            }
            c
        };
        // One user's REGFS_* credentials must not go to every registry an image names;
        // a mount finds its host's own in the docker config.
        command
            .args(args)
            .env_remove("REGFS_USERNAME")
            .env_remove("REGFS_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let output = command
            .output()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr);
        Err(format!("regfs mount of {host} failed: {}", said.trim()))
    }
}

/// A systemd unit name for the mount of `host` (unique: a scope of a mount that
/// ended may linger until collected).
fn unit_name(host: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{CGROUP_PREFIX}{}-{now}.scope", safe_name(host))
}

/// Removes the cgroups of mounts that ended (rmdir refuses a cgroup that holds a
/// process, so a live mount's stays).
fn sweep_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(CGROUP_PREFIX)
        {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// `host` with anything but letters, digits and '.' as '-': a unit or cgroup name.
fn safe_name(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A cgroup v2 of the mount's own beside this process's, if cgroup v2 is mounted and
/// writable: its `cgroup.procs`, to join between fork and exec.
fn own_cgroup(host: &str) -> Option<CString> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        (after.split(' ').next()? == "cgroup2")
            .then(|| before.split(' ').nth(4).map(str::to_owned))?
    })?;
    sweep_cgroups(Path::new(&root));
    let dir = Path::new(&root).join(format!("{CGROUP_PREFIX}{}", safe_name(host)));
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            warn!(
                "{host}: no cgroup of its own for the mount ({}: {e}); it runs in a session of its own",
                dir.display()
            );
            return None;
        }
    }
    CString::new(
        dir.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .ok()
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: a valid NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        // Not fatal: the mount still runs in a session of its own.
        return Ok(());
    }
    // "0" means the writing process.
    // SAFETY: writes one byte from a static buffer to an open descriptor.
    unsafe {
        libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_safe() {
        let name = unit_name("[::1]:5000");
        assert!(name.starts_with("regfs-mount----1--5000-"));
        assert!(name.ends_with(".scope"));
    }
}
