//! Reading /proc/self/mountinfo: what is mounted where, without asking the mounted
//! filesystem (which may be dead).

use std::path::Path;

/// Whether `path` (canonical) is listed as a mount point in /proc/self/mountinfo.
pub fn is_mount_point(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// The topmost mount on a path, as /proc/self/mountinfo lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// "major:minor"; for FUSE the minor is the connection's number in
    /// /sys/fs/fuse/connections/.
    pub device: String,
    /// e.g. "fuse", "fuse.regfs", "ext4".
    pub fs_type: String,
    /// What was mounted: "regfs:<registry host>" for regfs.
    pub source: String,
}

/// The topmost mount on `path` (canonical), from /proc/self/mountinfo: unlike `stat`,
/// this does not ask the mounted filesystem (which may be dead).
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_string_lossy();
    info.lines().rev().find_map(|line| {
        // "36 35 0:45 / /mnt/x rw,relatime shared:1 - fuse.regfs regfs:host rw,..."
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let device = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        let mut after = after.split(' ');
        let (fs_type, source) = (after.next()?, after.next()?);
        (unescape_mountinfo(mount_point) == wanted).then(|| MountEntry {
            device: device.to_owned(),
            fs_type: fs_type.to_owned(),
            source: unescape_mountinfo(source),
        })
    })
}

/// Every regfs mount listed in /proc/self/mountinfo, by mount point (FUSE, `fuse` or
/// `fuse.regfs`, with a `regfs:` source), in the order they were mounted.
pub fn regfs_mounts() -> Vec<(std::path::PathBuf, MountEntry)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ');
            let device = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            let mut after = after.split(' ');
            let entry = MountEntry {
                device: device.to_owned(),
                fs_type: after.next()?.to_owned(),
                source: unescape_mountinfo(after.next()?),
            };
            is_regfs(&entry).then(|| (unescape_mountinfo(mount_point).into(), entry))
        })
        .collect()
}

/// What regfs mounts show as their source in /proc/self/mountinfo (`--fsname`).
pub const SOURCE_PREFIX: &str = "regfs:";

/// Whether a mount is one of regfs's: FUSE (`fuse`, or `fuse.regfs` when mounted by
/// fusermount3) with a `regfs:` source.
pub fn is_regfs(entry: &MountEntry) -> bool {
    entry.fs_type.starts_with("fuse") && entry.source.starts_with(SOURCE_PREFIX)
}

/// The device ("major:minor") of the topmost mount on `path` (canonical).
pub fn mount_device(path: &Path) -> Option<String> {
    mount_entry(path).map(|e| e.device)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok());
        if bytes[i] == b'\\' {
            if let Some(Ok(code)) = octal.map(|o| u8::from_str_radix(o, 8)) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/odd\04"), r"/odd\04");
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\011c\134d"),
            "/tmp/a b\tc\\d"
        );
        assert_eq!(unescape_mountinfo(r"/plain\x"), r"/plain\x");
    }
}
