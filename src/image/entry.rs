//! One file of a layer as its tar header (or TOC entry) describes it, and the checks
//! that make an untrusted name safe to show.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// What kind of file an entry is. Hardlinks are resolved to the file they name when
/// layers are merged; they keep their own kind here so the merge can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// Where a regular file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataRef {
    /// No bytes (not a regular file, or empty).
    None,
    /// At this offset of the layer's uncompressed tar stream (plain layers).
    Stream(u64),
    /// These chunks of the layer's TOC, in file order (eStargz, zstd:chunked).
    Chunks(Range<u32>),
}

/// Extended attributes: (name, value) pairs.
pub type Xattrs = Vec<(Box<[u8]>, Box<[u8]>)>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised path inside the layer: components joined by `/`, no leading `/`, no
    /// `.` or `..`, never empty except for the layer's root directory.
    pub path: Box<[u8]>,
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (negative before 1970) and nanoseconds.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Bytes of a regular file's content.
    pub size: u64,
    /// A symlink's target, as written; a hardlink's target, normalised like `path`.
    pub link: Option<Box<[u8]>>,
    /// Device numbers of a char or block device.
    pub rdev: (u32, u32),
    /// Extended attributes (PAX `SCHILY.xattr.*`, or a TOC's `xattrs`).
    pub xattrs: Xattrs,
    pub data: DataRef,
}

/// Where an entry is in the tar stream, beyond what [`Entry`] says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarPlace {
    /// Where its first header (PAX or GNU long-name headers included) starts.
    pub header: u64,
    /// Where its data starts: right after its headers.
    pub data: u64,
    /// The name as written in the header, when it differs from the entry's path
    /// (soci-snapshotter compares a file's header with this name).
    pub raw_name: Option<Box<[u8]>>,
}

impl TarPlace {
    /// The bytes of the entry's headers.
    pub fn headers(&self) -> Range<u64> {
        self.header..self.data
    }

    /// Bytes of memory it takes, roughly.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<TarPlace>() + self.raw_name.as_ref().map_or(0, |n| n.len())
    }
}

impl Entry {
    /// The last component of the path (empty for the root).
    pub fn name(&self) -> &[u8] {
        split_last(&self.path).1
    }

    /// The directory that holds this entry (empty for top-level entries and the root).
    pub fn parent(&self) -> &[u8] {
        split_last(&self.path).0
    }

    /// Bytes of memory this entry takes, roughly (for the index's budget and stats).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Entry>()
            + self.path.len()
            + self.link.as_ref().map_or(0, |l| l.len())
            + self
                .xattrs
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<Box<[u8]>>())
                .sum::<usize>()
    }
}

/// `(parent, name)` of a normalised path.
pub fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Longest name of one path component Linux accepts.
pub const NAME_MAX: usize = 255;
/// Longest path accepted from a layer.
pub const PATH_MAX: usize = 4096;

/// Why a name from a layer was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadName {
    Nul,
    DotDot,
    TooLong,
}

impl std::fmt::Display for BadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadName::Nul => "a NUL byte in the name",
            BadName::DotDot => "a `..` component",
            BadName::TooLong => "a name longer than Linux allows",
        })
    }
}

/// Normalises a path from a tar header or TOC: a leading `/` and `.` or empty
/// components are dropped (as tar and container runtimes do); `..` is refused rather
/// than resolved, so no name can climb out of the view, and so are NULs and names
/// Linux could not show.
pub fn normalise(raw: &[u8]) -> Result<Box<[u8]>, BadName> {
    if raw.contains(&0) {
        return Err(BadName::Nul);
    }
    let mut out = Vec::with_capacity(raw.len());
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err(BadName::DotDot),
            c if c.len() > NAME_MAX => return Err(BadName::TooLong),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    if out.len() > PATH_MAX {
        return Err(BadName::TooLong);
    }
    Ok(out.into_boxed_slice())
}

/// A name for log lines: lossy UTF-8, quoted.
pub fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Files an eStargz writer adds that are not part of the image.
const ESTARGZ_NAMES: [&[u8]; 3] = [
    b".prefetch.landmark",
    b".no.prefetch.landmark",
    b"stargz.index.json",
];

/// Removes the files an eStargz writer adds at the layer's root (landmarks, and the
/// TOC itself when the layer is read as plain gzip, where it is the last entry).
pub fn drop_estargz_metadata(entries: &mut Vec<Entry>) {
    let is_estargz = entries
        .last()
        .is_some_and(|e| &*e.path == b"stargz.index.json")
        || entries
            .first()
            .is_some_and(|e| ESTARGZ_NAMES[..2].contains(&&*e.path));
    if is_estargz {
        entries.retain(|e| !ESTARGZ_NAMES.contains(&&*e.path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_or_refused() {
        let ok = |raw: &[u8]| normalise(raw).map(|p| p.to_vec());
        assert_eq!(ok(b"./etc/passwd"), Ok(b"etc/passwd".to_vec()));
        assert_eq!(ok(b"/usr//bin/./sh"), Ok(b"usr/bin/sh".to_vec()));
        assert_eq!(ok(b"dir/"), Ok(b"dir".to_vec()));
        assert_eq!(ok(b"./"), Ok(Vec::new()));
        assert_eq!(ok(b"a/../../etc"), Err(BadName::DotDot));
        assert_eq!(ok(b".."), Err(BadName::DotDot));
        assert_eq!(ok(b"a\0b"), Err(BadName::Nul));
        assert_eq!(ok(&[b'x'; 256]), Err(BadName::TooLong));
        assert!(ok(&[b'x'; 255]).is_ok());
        // Bytes that are not UTF-8 are names like any other.
        assert_eq!(ok(b"caf\xe9"), Ok(b"caf\xe9".to_vec()));
    }

    #[test]
    fn parent_and_name() {
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"top"), (&b""[..], &b"top"[..]));
        assert_eq!(split_last(b""), (&b""[..], &b""[..]));
    }
}
