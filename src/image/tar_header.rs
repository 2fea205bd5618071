//! The fields of one tar header as regfs reads them (src/image/tar.rs sequences the
//! headers): what kind of file it is, its link, owner, mode and time, numbers as Go's
//! `archive/tar` reads them, and the header checksum.

use tar::{EntryType, Header};

use super::entry::{EntryKind, normalise, shown};
use super::tar_pax::Pax;

/// What kind of file a header describes (`None`: no file, a volume label).
pub(super) fn kind_of(header: &Header, raw_path: &[u8]) -> Result<Option<EntryKind>, String> {
    Ok(Some(match header.entry_type() {
        EntryType::Regular | EntryType::Continuous if raw_path.ends_with(b"/") => {
            // Old (V7) archives mark directories by a trailing slash only.
            EntryKind::Dir
        }
        EntryType::Regular | EntryType::Continuous => EntryKind::File,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Char => EntryKind::CharDev,
        EntryType::Block => EntryKind::BlockDev,
        EntryType::Directory => EntryKind::Dir,
        // GNU dump directories ('D'): a directory with a listing as data.
        other if other.as_byte() == b'D' => EntryKind::Dir,
        EntryType::Fifo => EntryKind::Fifo,
        // A GNU volume label ('V') names no file.
        other if other.as_byte() == b'V' => return Ok(None),
        other => {
            return Err(format!(
                "{}: entry type {:?} is not supported",
                shown(raw_path),
                other.as_byte() as char
            ));
        }
    }))
}

/// A symlink's target as written, a hardlink's normalised; `None` for other kinds.
pub(super) fn link_of(
    kind: EntryKind,
    raw_link: Option<Vec<u8>>,
    path: &[u8],
) -> Result<Option<Box<[u8]>>, String> {
    Ok(match kind {
        EntryKind::Symlink => {
            let target = raw_link.unwrap_or_default();
            if target.contains(&0) || target.is_empty() {
                return Err(format!("{}: bad symlink target", shown(path)));
            }
            Some(target.into_boxed_slice())
        }
        EntryKind::Hardlink => {
            let target = raw_link.unwrap_or_default();
            let normal =
                normalise(&target).map_err(|e| format!("{}: hardlink target: {e}", shown(path)))?;
            if normal.is_empty() {
                return Err(format!("{}: hardlink to the root", shown(path)));
            }
            Some(normal)
        }
        _ => None,
    })
}

/// Owner, permission bits and mtime: PAX records first, else the header's fields.
pub(super) fn owner_mode_time(
    header: &Header,
    pax: &Pax,
    path: &[u8],
) -> Result<(u32, u32, u32, (i64, u32)), String> {
    let old = header.as_old();
    let field = |what: &str, raw: &[u8], v: std::io::Result<u64>| -> Result<u32, String> {
        numeric(raw, v)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("{}: bad {what}", shown(path)))
    };
    let uid = match pax.uid {
        Some(uid) => uid,
        None => field("uid", &old.uid, header.uid())?,
    };
    let gid = match pax.gid {
        Some(gid) => gid,
        None => field("gid", &old.gid, header.gid())?,
    };
    let mode = field("mode", &old.mode, header.mode().map(u64::from))? & 0o7777;
    let mtime = match pax.mtime {
        Some(t) => t,
        None => {
            let secs = numeric(&old.mtime, header.mtime())
                .ok_or_else(|| format!("{}: bad mtime", shown(path)))?;
            (i64::try_from(secs).unwrap_or(i64::MAX), 0)
        }
    };
    Ok((uid, gid, mode, mtime))
}

/// Whether the data of a header the parser does not show still follows it (it must be
/// skipped to find the next header).
pub(super) fn data_after(kind: EntryType) -> bool {
    !matches!(
        kind,
        EntryType::Link
            | EntryType::Symlink
            | EntryType::Char
            | EntryType::Block
            | EntryType::Directory
            | EntryType::Fifo
    )
}

/// A numeric header field: what the crate parsed, or 0 for a field left empty (all NULs
/// or spaces), as Go's archive/tar reads it.
pub(super) fn numeric(raw: &[u8], parsed: std::io::Result<u64>) -> Option<u64> {
    match parsed {
        Ok(v) => Some(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Some(0),
        Err(_) => None,
    }
}

pub(super) fn trim_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &bytes[..end]
}

/// The header checksum: the sum of its bytes with the checksum field read as spaces.
pub(super) fn check_checksum(header: &Header) -> Result<(), String> {
    let bytes = header.as_bytes();
    let sum: u32 = bytes[..148]
        .iter()
        .chain(&[b' '; 8])
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum();
    match header.cksum() {
        Ok(stored) if stored == sum => Ok(()),
        Ok(stored) => Err(format!(
            "header checksum {stored} does not match {sum} (not a tar stream, or corrupt)"
        )),
        Err(e) => Err(format!("bad header checksum field: {e}")),
    }
}
