//! A daemon that dies without unmounting (SIGKILL) leaves no dead mount behind: its
//! watchdog unmounts at once, and when the watchdog is gone too, the next
//! `regfs mount` on the directory clears the dead mount itself. SIGTERM stays a clean
//! unmount (mount.rs).

use crate::common;

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{Mount, Registry, is_mounted, ls, push_tiny_image};

/// Waits (bounded) until nothing is mounted at `dir`.
fn wait_unmounted(dir: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while is_mounted(dir) {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

fn registry_with_a_tag() -> Registry {
    common::require_tools();
    let registry = Registry::start();
    push_tiny_image(&registry, "team/app", "v1", 1);
    registry
}

#[test]
fn after_sigkill_the_mountpoint_is_usable_at_once_and_mounts_again() {
    let registry = registry_with_a_tag();
    let mut mount = Mount::start(&registry.url(), &[]);
    assert_eq!(ls(&mount.path("team/app/tags")), ["v1"]);
    let dir = mount.dir.clone();

    assert!(mount.kill().is_some(), "regfs did not die from SIGKILL");
    assert!(
        wait_unmounted(&dir, Duration::from_secs(5)),
        "a dead mount stayed at {} after SIGKILL",
        dir.display()
    );
    // The directory is what it was before the mount: empty, and no ENOTCONN.
    assert!(ls(&dir).is_empty());

    let again = mount
        .start_again(&registry.url(), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ls(&again.path("team/app/tags")), ["v1"]);
    let (status, left_mounted) = again.terminate_checked();
    assert!(status.success() && !left_mounted, "{status}");
}

#[test]
fn a_dead_mount_whose_watchdog_died_too_is_cleared_by_the_next_mount() {
    let registry = registry_with_a_tag();
    let mut mount = Mount::start(&registry.url(), &[]);
    // Serving (the mount shows in mountinfo a moment before regfs has its end of it).
    assert_eq!(ls(&mount.path("team/app/tags")), ["v1"]);
    let dir = mount.dir.clone();
    // As when a whole process group is killed: the watchdog first, then the daemon.
    let watchdogs = mount.children();
    assert_eq!(watchdogs.len(), 1, "one watchdog under regfs");
    for pid in watchdogs {
        // SAFETY: kill(2) on a process this test's child started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    thread::sleep(Duration::from_millis(100));
    assert!(mount.kill().is_some(), "regfs did not die from SIGKILL");
    thread::sleep(Duration::from_millis(200));
    let dead = fs::read_dir(&dir).err().and_then(|e| e.raw_os_error());
    assert_eq!(
        dead,
        Some(libc::ENOTCONN),
        "expected a dead mount (nothing left to unmount it)"
    );

    let again = mount
        .start_again(&registry.url(), &[])
        .unwrap_or_else(|e| panic!("regfs refused the dead mount: {e}"));
    assert!(
        again.log().contains("cleared a dead regfs mount"),
        "{}",
        again.log()
    );
    assert_eq!(ls(&again.path("team/app/tags")), ["v1"]);
    let (status, left_mounted) = again.terminate_checked();
    assert!(status.success(), "{status}");
    assert!(!left_mounted);
    assert!(ls(&dir).is_empty(), "the dead mount came back");
}
