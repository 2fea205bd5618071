//! The mount fixture: the regfs binary mounted on a temp directory through the kernel
//! (`regfs mount` in the foreground, stopped on drop), and what tests ask of a mount.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Instant;

use tempfile::TempDir;

use super::process::{POLL, STARTUP_TIMEOUT, die_with_parent, send_signal, wait_timeout};

/// `regfs mount` running in the foreground on a temp mountpoint, stopped on drop.
pub struct Mount {
    /// The mountpoint (canonical path, as /proc/self/mountinfo shows it).
    pub dir: PathBuf,
    tmp: Option<TempDir>,
    child: Option<Child>,
    log_path: PathBuf,
}

/// What [`Mount::start_with`] gives the regfs process besides its arguments.
#[derive(Debug, Clone, Default)]
pub struct MountInput {
    /// Written to its stdin (then closed), e.g. the password for `--password-stdin`.
    pub stdin: Option<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The umask it starts with (else the test's).
    pub umask: Option<libc::mode_t>,
}

impl Mount {
    /// Runs `regfs mount [extra_args] REGISTRY_URL MOUNTPOINT` and waits until it is mounted.
    pub fn start(registry_url: &str, extra_args: &[&str]) -> Mount {
        Mount::start_with(registry_url, extra_args, &MountInput::default())
            .unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// Like [`Mount::start`], with stdin and environment; `Err` (with the log) when regfs
    /// exits without mounting.
    pub fn start_with(
        registry_url: &str,
        extra_args: &[&str],
        input: &MountInput,
    ) -> Result<Mount, String> {
        let tmp = tempfile::Builder::new()
            .prefix("regfs-mount-")
            .tempdir()
            .expect("create temp dir for a mount");
        // Canonical before mounting: afterwards a stat would go through FUSE.
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        let dir = root.join("mnt");
        fs::create_dir(&dir).expect("create mountpoint");
        let log_path = root.join("regfs.log");
        Mount::spawn(Some(tmp), dir, log_path, registry_url, extra_args, input)
    }

    /// Another `regfs mount` on the directory of `self` (whose regfs has exited or was
    /// killed), logging to `<dir>/../regfs-<n>.log`. The directory stays `self`'s.
    pub fn start_again(&self, registry_url: &str, extra_args: &[&str]) -> Result<Mount, String> {
        let parent = self.dir.parent().expect("mountpoint has a parent");
        let n = fs::read_dir(parent).map_or(0, |d| d.count());
        let log_path = parent.join(format!("regfs-{n}.log"));
        Mount::spawn(
            None,
            self.dir.clone(),
            log_path,
            registry_url,
            extra_args,
            &MountInput::default(),
        )
    }

    fn spawn(
        tmp: Option<TempDir>,
        dir: PathBuf,
        log_path: PathBuf,
        registry_url: &str,
        extra_args: &[&str],
        input: &MountInput,
    ) -> Result<Mount, String> {
        let log = File::create(&log_path).expect("create regfs log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regfs"));
        cmd.arg("mount").args(extra_args);
        // Every mount gets a disk cache of its own unless the test says otherwise, so
        // tests never share one (nor use the machine's).
        if !extra_args
            .iter()
            .any(|a| *a == "--cache-dir" || *a == "--no-disk-cache")
        {
            // Next to the mountpoint: a mount started again there finds it, as a
            // restarted daemon does.
            let root = dir.parent().expect("mountpoint has a parent");
            cmd.arg("--cache-dir").arg(root.join("cache"));
        }
        cmd.arg(registry_url)
            .arg(&dir)
            .env("RUST_LOG", "regfs=debug")
            .envs(input.env.iter().map(|(k, v)| (k, v)))
            .stdin(if input.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(log.try_clone().expect("clone log file handle"))
            .stderr(log);
        // SIGTERM, not SIGKILL: regfs unmounts on SIGTERM.
        die_with_parent(&mut cmd, libc::SIGTERM);
        if let Some(mask) = input.umask {
            // SAFETY: umask(2) is async-signal-safe and cannot fail.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn the regfs binary");
        if let (Some(text), Some(mut stdin)) = (&input.stdin, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).expect("write regfs stdin");
        }
        let mut mount = Mount {
            dir,
            tmp,
            child: Some(child),
            log_path,
        };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        // Mounted and answering: a dead mount left at the directory is listed in
        // mountinfo too, but fails with ENOTCONN until regfs has replaced it. The stats
        // file asks the daemon every time (no cached attributes) and not the registry.
        let answers = |dir: &Path| fs::metadata(dir.join(".regfs/stats")).is_ok();
        while !(is_mounted(&mount.dir) && answers(&mount.dir)) {
            let child = mount.child.as_mut().expect("child present while starting");
            let failure = match child.try_wait() {
                Ok(Some(status)) => Some(format!("regfs exited with {status} before mounting")),
                _ if Instant::now() > deadline => {
                    Some(format!("regfs did not mount within {STARTUP_TIMEOUT:?}"))
                }
                _ => None,
            };
            if let Some(failure) = failure {
                // Clean up before reporting, so that Drop does not print the log a second time.
                let (dir, log) = (mount.dir.clone(), mount.log());
                drop(mount);
                return Err(format!("{failure} {}:\n{log}", dir.display()));
            }
            thread::sleep(POLL);
        }
        Ok(mount)
    }

    /// `/.regfs/stats`, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let path = self.dir.join(".regfs/stats");
        let text = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&text).expect("/.regfs/stats is JSON")
    }

    /// A path inside the mount: `mount.path("team/app/tags/v1/manifest.json")`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    /// What regfs logged so far (stdout and stderr, RUST_LOG=regfs=debug).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: the daemon dies without unmounting (as after a crash or the OOM
    /// killer). Waits for it to be gone.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        send_signal(child, libc::SIGKILL);
        wait_timeout(child, STARTUP_TIMEOUT)
    }

    /// The processes regfs started (e.g. fusermount3 watching the mount).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| {
                // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
                fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                        == Some(pid)
                })
            })
            .collect()
    }

    /// SIGTERM, then waits up to 20 s for regfs to unmount and exit; then cleans up by force.
    pub fn terminate(mut self) -> ExitStatus {
        let (status, left_mounted) = self.stop();
        if left_mounted {
            eprintln!(
                "regfs exited ({status}) but left {} mounted; unmounted lazily",
                self.dir.display()
            );
        }
        status
    }

    /// Like [`Mount::terminate`], and also tells whether regfs left its mount behind
    /// (the harness unmounts it anyway).
    pub fn terminate_checked(mut self) -> (ExitStatus, bool) {
        self.stop()
    }

    fn stop(&mut self) -> (ExitStatus, bool) {
        let Some(mut child) = self.child.take() else {
            return (ExitStatus::from_raw(0), false);
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            _ => {
                send_signal(&child, libc::SIGTERM);
                wait_timeout(&mut child, STARTUP_TIMEOUT).unwrap_or_else(|| {
                    eprintln!("regfs ignored SIGTERM for {STARTUP_TIMEOUT:?}; killing it");
                    let _ = child.kill();
                    child.wait().expect("wait for killed regfs")
                })
            }
        };
        let left_mounted = is_mounted(&self.dir);
        if left_mounted {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        (status, left_mounted)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("--- regfs log ({}) ---\n{}", self.dir.display(), self.log());
        }
        // Never let TempDir's cleanup walk into a mount that is still there: it would try to
        // delete a registry's content. Leak the directory instead.
        if is_mounted(&self.dir)
            && let Some(tmp) = self.tmp.take()
        {
            std::mem::forget(tmp);
        }
    }
}

/// Sorted names in a directory (of a mount, typically).
pub fn ls(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap_or_else(|e| panic!("ls {}: {e}", path.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect();
    names.sort();
    names
}

/// Whether a FUSE filesystem is mounted exactly at `path` (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mountinfo.lines().any(|line| {
        // "36 35 0:45 / /tmp/x\040y rw,relatime shared:1 - fuse.regfs regfs rw,…"
        let Some((before, after)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = before
            .split(' ')
            .nth(4)
            .map(regfs::mount::unescape_mountinfo);
        let fs_type = after.split(' ').next().unwrap_or("");
        fs_type.starts_with("fuse") && mount_point.is_some_and(|p| Path::new(&p) == path)
    })
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first: what a test's
/// containerd, snapshotter and regfs mounts leave when it fails half-way.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(regfs::mount::unescape_mountinfo)
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A number in `/.regfs/stats`, by its path of keys.
pub fn stat(mnt: &Mount, key: &[&str]) -> u64 {
    let mut v = mnt.stats();
    for k in key {
        v = v[*k].clone();
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("stats {key:?} missing: {}", mnt.stats()))
}

/// close(2) of a file, with its error (dropping a `File` ignores it): for a file
/// written into a mount, this is the commit.
pub fn close(file: File) -> io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just released by `file`, so it is open and closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
