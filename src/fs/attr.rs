//! What the filesystem says about a file, shared by every part of the tree: its kind,
//! its attributes, directory entries, and the times content carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::registry::Digest;

/// How long the kernel may keep entries and attributes of content-addressed files,
/// which never change.
pub const IMMUTABLE_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Permission bits.
    pub perm: u16,
    /// How long the kernel may trust this answer.
    pub ttl: Duration,
    /// Owner and group; `None`: the user who mounted (registry objects have none).
    pub owner: Option<(u32, u32)>,
    /// Names of the file; 0: the usual (1, or 2 for a directory).
    pub nlink: u32,
    /// Device number of a char or block device.
    pub rdev: u32,
}

impl Attr {
    /// An attribute of a registry object: owned by whoever mounted, one name.
    pub fn plain(
        ino: u64,
        kind: Kind,
        size: u64,
        mtime: SystemTime,
        perm: u16,
        ttl: Duration,
    ) -> Attr {
        Attr {
            ino,
            kind,
            size,
            mtime,
            perm,
            ttl,
            owner: None,
            nlink: 0,
            rdev: 0,
        }
    }

    /// A directory regfs makes (not from an image): it changes as tags do.
    pub fn dir(ino: u64, ttl: Duration) -> Attr {
        Attr::plain(ino, Kind::Dir, 0, epoch(), 0o755, ttl)
    }
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    /// Bytes: names inside images need not be UTF-8.
    pub name: Box<[u8]>,
}

/// Directories, and anything without content of its own, carry this time.
pub fn epoch() -> SystemTime {
    // 2000-01-01T00:00:00Z: a fixed, plausible date, the same on every mount.
    UNIX_EPOCH + Duration::from_secs(946_684_800)
}

/// The mtime of content with this digest: the same on every mount (so rsync's
/// size+mtime check sees nothing changed), and different for different content (so a
/// tag that moves gets a new mtime). Derived from 28 bits of the digest: a date between
/// 2000 and 2008, with the nanoseconds from 30 more bits.
pub fn content_mtime(digest: &Digest) -> SystemTime {
    let hex = digest.encoded();
    let bits = |range: std::ops::Range<usize>| {
        hex.get(range)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
    };
    let secs = bits(0..7); // 28 bits
    let nanos = (bits(7..15) % 1_000_000_000) as u32;
    epoch() + Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtimes_are_stable_and_differ() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        assert_eq!(content_mtime(&a), content_mtime(&a.clone()));
        assert_ne!(content_mtime(&a), content_mtime(&b));
        assert!(content_mtime(&a) >= epoch());
    }
}
