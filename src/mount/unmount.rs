//! Getting a mount out of the way: the clean unmount at SIGTERM/SIGINT, and what a
//! daemon that dies without unmounting (SIGKILL, the OOM killer, a crash) leaves
//! behind, so that nobody has to clean it up by hand.
//!
//! After a crash, two layers:
//! - **A watchdog**: a small process forked at start (before any thread) that waits
//!   for the daemon to end. If it ends without unmounting, the kernel's connection
//!   dies with it, and the watchdog detaches the mount at once: the directory is an
//!   empty directory again, not "Transport endpoint is not connected".
//!   (fusermount3's `auto_unmount` does the same job but races: it looks while the
//!   dying daemon's FUSE descriptors are still closing, sees ECONNABORTED instead of
//!   ENOTCONN, and leaves the mount; it also needs `allow_other`.)
//! - **Clearing a dead mount**: when the watchdog is gone too (the whole process group
//!   was killed), the mountpoint answers ENOTCONN. `regfs mount` on it detaches such a
//!   dead *regfs* mount (never another filesystem's) and mounts again.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, fork, pipe2};
use tracing::{debug, warn};

pub use super::mountinfo::SOURCE_PREFIX;
use super::mountinfo::{MountEntry, is_regfs, mount_entry};

/// How long the watchdog waits for a dead daemon's connection to be torn down.
const DEAD_WITHIN: Duration = Duration::from_secs(10);

/// The daemon's end of the line to its watchdog. Dropping it (the daemon exits, however
/// it exits) is what wakes the watchdog.
pub struct Watchdog {
    line: std::fs::File,
}

impl Watchdog {
    /// Forks the watchdog for `mountpoint` (canonical). Must be called before any
    /// thread is started. `keep_stderr`: the watchdog may log on the daemon's stderr
    /// (not for `--daemon`, whose caller waits for stderr to close).
    pub fn start(mountpoint: &Path, keep_stderr: bool) -> Result<Watchdog, String> {
        // Close-on-exec, so no program the daemon starts keeps the line open.
        let (read_end, write_end) =
            pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
        // SAFETY: no other thread exists yet (the caller's contract), so the child owns
        // a consistent copy of the process; it only reads, polls and unmounts.
        match unsafe { fork() }.map_err(|e| format!("cannot fork the watchdog: {e}"))? {
            ForkResult::Parent { .. } => {
                drop(read_end);
                Ok(Watchdog {
                    line: std::fs::File::from(write_end),
                })
            }
            ForkResult::Child => {
                drop(write_end);
                watch(read_end, mountpoint, keep_stderr)
            }
        }
    }

    /// The mount is made: watch it (its device, so a later mount at the same place
    /// is never taken for it).
    pub fn watch(&mut self, device: &str) {
        let _ = writeln!(self.line, "watch {device}");
    }

    /// A clean unmount: nothing left to do.
    pub fn disarm(mut self) {
        let _ = writeln!(self.line, "done");
    }
}

/// The watchdog's life: read the daemon's messages until the line closes; then, if the
/// daemon left its mount behind and the mount is dead, detach it.
fn watch(line: OwnedFd, mountpoint: &Path, keep_stderr: bool) -> ! {
    quiet_stdio(keep_stderr);
    // Ctrl-C and SIGTERM are for the daemon, which unmounts; the watchdog waits.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: installs the "ignore" disposition, no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let mut device = None;
    for message in BufReader::new(std::fs::File::from(line)).lines() {
        match message.as_deref().map(str::trim) {
            Ok("done") => std::process::exit(0),
            Ok(m) => {
                if let Some(d) = m.strip_prefix("watch ") {
                    device = Some(d.to_owned());
                }
            }
            Err(_) => break,
        }
    }
    if let Some(device) = device {
        clear_after_crash(mountpoint, &device);
    }
    std::process::exit(0)
}

/// The daemon is gone without saying "done": once its connection is dead (the kernel
/// tears it down when the last descriptor closes), detach the mount.
fn clear_after_crash(mountpoint: &Path, device: &str) {
    let deadline = Instant::now() + DEAD_WITHIN;
    while Instant::now() < deadline {
        match mount_entry(mountpoint) {
            Some(entry) if entry.device == device => {}
            // Unmounted after all (a lazy unmount finishing), or another mount now.
            _ => return,
        }
        if is_dead(mountpoint) {
            match detach(mountpoint) {
                Ok(()) => warn!(
                    mountpoint = %mountpoint.display(),
                    "the regfs daemon ended without unmounting; the watchdog unmounted it"
                ),
                Err(e) => {
                    warn!(mountpoint = %mountpoint.display(), "cannot clear the dead mount: {e}")
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    debug!(mountpoint = %mountpoint.display(), "the mount outlived its daemon and still answers");
}

/// stdin and stdout to /dev/null, and stderr too unless `keep_stderr`: the watchdog
/// must not hold open what the caller of `regfs mount` waits on.
fn quiet_stdio(keep_stderr: bool) {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let _ = nix::unistd::dup2_stdin(&null);
    let _ = nix::unistd::dup2_stdout(&null);
    if !keep_stderr {
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// `path` failed with ENOTCONN: if that is a dead regfs mount, detach it so the
/// directory can be mounted again. Returns the canonical path of the mountpoint once
/// it is clear, or a one-line message saying why it cannot be.
pub fn clear_dead_mount(path: &Path) -> Result<PathBuf, String> {
    let shown = path.display();
    let manual = format!("clear it with `fusermount3 -u {shown}`");
    // The path itself cannot be resolved (it is the dead mount): resolve its parent.
    let canonical = canonical_through_parent(path)
        .ok_or_else(|| format!("mountpoint {shown} is a dead FUSE mount; {manual}"))?;
    match mount_entry(&canonical) {
        Some(entry) if is_regfs(&entry) => {}
        Some(MountEntry {
            fs_type, source, ..
        }) => {
            return Err(format!(
                "mountpoint {shown} is a dead {fs_type} mount of {source:?} (not regfs's); {manual}"
            ));
        }
        None => return Err(format!("mountpoint {shown} is a dead FUSE mount; {manual}")),
    }
    detach(&canonical)
        .map_err(|e| format!("mountpoint {shown} is a dead regfs mount: {e}; {manual}"))?;
    warn!(
        mountpoint = %canonical.display(),
        "cleared a dead regfs mount left by a daemon that did not unmount"
    );
    Ok(canonical)
}

/// Whether the filesystem mounted at `path` has lost its daemon. statfs always asks
/// the daemon (no cached answer), and regfs answers it without the network.
pub fn is_dead(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).err() == Some(nix::errno::Errno::ENOTCONN)
}

fn canonical_through_parent(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

/// The clean unmount (SIGTERM/SIGINT): unmounts `path` (canonical), which ends the
/// FUSE session. Returns false if it is busy (a program holds a file open or has its
/// working directory inside); the caller then detaches it with [`detach`].
pub fn unmount(path: &Path) -> Result<bool, String> {
    match nix::mount::umount2(path, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EBUSY) => Ok(false),
        // Not root: fusermount3 (setuid) unmounts mounts its user made. fuser's own
        // unmount is no help with auto_unmount: it only closes the watcher's socket,
        // and the watcher leaves a daemon that still answers alone.
        Err(nix::errno::Errno::EPERM) => fusermount3(&["-u"], path),
        Err(e) => Err(format!("cannot unmount {}: {e}", path.display())),
    }
}

/// A lazy unmount: the name is free at once, and the kernel ends the mount when the
/// last file on it is closed (or at once, for a dead mount that nobody can use).
pub fn detach(path: &Path) -> Result<(), String> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => match fusermount3(&["-u", "-z"], path)? {
            true => Ok(()),
            false => Err("fusermount3 -u -z failed".into()),
        },
        Err(e) => Err(format!("cannot detach it: {e}")),
    }
}

/// Runs `fusermount3 ARGS PATH`; whether it succeeded.
fn fusermount3(args: &[&str], path: &Path) -> Result<bool, String> {
    let status = Command::new("fusermount3")
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run fusermount3: {e}"))?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_without_a_mount_is_not_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = clear_dead_mount(&dir.path().join("x")).expect_err("nothing mounted there");
        assert!(err.contains("fusermount3 -u"), "{err}");
    }
}
