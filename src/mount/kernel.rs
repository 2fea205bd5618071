//! Mounting `/dev/fuse` ourselves, as root, with the file system type `fuse.regfs`.
//!
//! fuser mounts as root by calling mount(2) with the type `fuse`, whatever subtype it is
//! given, so `/proc/self/mountinfo`, `findmnt -t fuse.regfs`, `umount -a -t fuse.regfs`
//! and `df -t` could not tell a regfs mount from any other FUSE one. The kernel takes
//! `fuse.<subtype>` as the type and records the subtype, so as root regfs opens the
//! device and mounts it the way fuser would, with that type, then hands the device to
//! `fuser::Session::from_fd`. Without root (or if the kernel refuses), fuser mounts it
//! through `fusermount3`, which sets the subtype by itself.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::mount::MsFlags;

/// The type regfs mounts are listed under.
pub const FS_TYPE: &str = "fuse.regfs";

/// How to mount.
pub struct KernelMount<'a> {
    /// Shown as the mount's source ("regfs:host").
    pub source: &'a str,
    pub read_only: bool,
    /// Let every user in (`allow_other`), not only the one who mounted.
    pub allow_other: bool,
}

impl KernelMount<'_> {
    /// The open device of a new mount at `mountpoint`; None if this process is not root
    /// (fuser then mounts through `fusermount3`). Err if the kernel refused.
    pub fn mount(&self, mountpoint: &Path) -> Result<Option<OwnedFd>, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("cannot mount at {}: {what}: {e}", mountpoint.display())
        };
        let root_mode = std::fs::metadata(mountpoint)
            .map_err(|e| fail("stat", &e))?
            .permissions()
            .mode();
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/fuse")
            .map_err(|e| fail("/dev/fuse", &e))?;
        let data = self.data(
            device.as_raw_fd(),
            root_mode,
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if self.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(
            Some(self.source),
            mountpoint,
            Some(FS_TYPE),
            flags,
            Some(data.as_str()),
        )
        .map_err(|e| fail("mount(2)", &e))?;
        Ok(Some(OwnedFd::from(device)))
    }

    /// The FUSE mount data: the device, the root's mode, who mounted, and the checks the
    /// kernel makes (permission bits always; other users only with `allow_other`).
    fn data(&self, fd: i32, root_mode: u32, uid: u32, gid: u32) -> String {
        let mut data = format!(
            "fd={fd},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions"
        );
        if self.allow_other {
            data.push_str(",allow_other");
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_data_names_the_device_the_root_and_the_checks() {
        let private = KernelMount {
            source: "regfs:r",
            read_only: true,
            allow_other: false,
        };
        assert_eq!(
            private.data(7, 0o40755, 0, 0),
            "fd=7,rootmode=40755,user_id=0,group_id=0,default_permissions"
        );
        let shared = KernelMount {
            allow_other: true,
            ..private
        };
        assert!(shared.data(7, 0o40755, 0, 0).ends_with(",allow_other"));
    }
}
