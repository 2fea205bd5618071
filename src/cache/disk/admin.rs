//! `regfs cache du|ls|prune|verify`: looking after a cache directory from the command
//! line, safely beside running mounts (they notice removed entries and fetch again).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::budget::{Budget, remove_files};
use super::layout::{self, Entry, Kind};
use super::{entry, partial::Partial, private};
use crate::registry::Digest;

/// Refuses a directory that is not a regfs cache (prune and verify delete files).
fn check(root: &Path) -> Result<(), String> {
    if layout::is_cache_dir(root) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a regfs cache directory (no {} from regfs)",
            root.display(),
            layout::TAG
        ))
    }
}

/// 1536 → "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn held_count(root: &Path) -> usize {
    fs::read_dir(root.join(layout::HELD))
        .map(|origins| {
            origins
                .flatten()
                .filter_map(|o| fs::read_dir(o.path()).ok())
                .map(|d| d.count())
                .sum()
        })
        .unwrap_or(0)
}

/// `regfs cache du`: one line, what the directory takes and of what.
pub fn du(root: &Path) -> Result<String, String> {
    check(root)?;
    let entries = layout::entries(root);
    let count = |f: fn(&Kind) -> bool| entries.iter().filter(|e| f(&e.kind)).count();
    Ok(format!(
        "{}\t{} ({} verified blobs, {} partial blobs, {} decoded files, {} metadata entries, {} held indexes)",
        human(layout::disk_usage(root)),
        root.display(),
        count(|k| matches!(k, Kind::Blob(_))),
        count(|k| matches!(k, Kind::Partial { .. })),
        count(|k| matches!(k, Kind::File { .. })),
        count(|k| matches!(k, Kind::Meta { .. })),
        held_count(root),
    ))
    .map(|line| match private::report(root, true) {
        Some(warning) => format!("{line}\nwarning: {warning}"),
        None => line,
    })
}

/// `regfs cache ls`: one line per entry, least recently used first.
pub fn ls(root: &Path) -> Result<Vec<String>, String> {
    check(root)?;
    let mut entries = layout::entries(root);
    entries.sort_by_key(|e| e.last_used);
    Ok(entries
        .iter()
        .map(|e| {
            let used = humantime::format_rfc3339_seconds(e.last_used);
            let what = match &e.kind {
                Kind::Blob(d) => format!("blob\t{d}"),
                Kind::Partial {
                    digest,
                    origin,
                    block_size,
                } => format!(
                    "partial\t{digest}\tfrom {origin}, {} blocks",
                    human(*block_size)
                ),
                Kind::Meta { kind, key } => format!("{kind}\t{key}"),
                Kind::File { key, origin, .. } => format!("file\t{key}\tfrom {origin}"),
            };
            format!("{}\t{used}\t{what}", human(e.bytes))
        })
        .collect())
}

/// `regfs cache prune --max SIZE`: evicts least recently used entries until the
/// directory takes at most `max` bytes. Returns (entries removed, bytes now).
pub fn prune(root: &Path, max: u64) -> Result<(usize, u64), String> {
    check(root)?;
    let before = layout::entries(root).len();
    let used = Budget::open(root, max)
        .and_then(|b| b.recount())
        .map_err(|e| format!("{}: {e}", root.display()))?;
    Ok((before.saturating_sub(layout::entries(root).len()), used))
}

/// Whether a whole blob file hashes to its digest.
fn blob_matches(path: &Path, digest: &Digest) -> bool {
    File::open(path).is_ok_and(|f| file_matches(&f, digest))
}

/// Whether the file's content, from its start, hashes to `digest`.
pub fn file_matches(file: &File, digest: &Digest) -> bool {
    let mut hasher = digest.hasher();
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        match file.read_at(&mut buffer, at) {
            Ok(0) => return hasher.matches(digest),
            Ok(n) => {
                hasher.update(&buffer[..n]);
                at += n as u64;
            }
            Err(_) => return false,
        }
    }
}

/// What is wrong with an entry, if anything.
fn damage(entry: &Entry) -> Option<String> {
    let main = entry.paths.first()?;
    match &entry.kind {
        Kind::Blob(digest) => {
            (!blob_matches(main, digest)).then(|| "content does not match the digest".to_owned())
        }
        Kind::Partial { block_size, .. } | Kind::File { block_size, .. } => {
            match Partial::open(main, *block_size, false) {
                Ok(Some(p)) => {
                    let bad = p.damaged_blocks();
                    (!bad.is_empty())
                        .then(|| format!("blocks {bad:?} do not match their checksums"))
                }
                _ => Some("cannot be opened".to_owned()),
            }
        }
        Kind::Meta { kind, key } => match entry::read(main) {
            None => Some("torn or changed (checksum)".to_owned()),
            Some(body) if kind == layout::MANIFEST_KIND => {
                let bytes = body
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|i| body.slice(i + 1..));
                (!bytes.is_some_and(|b| key.matches(&b)))
                    .then(|| "manifest does not match its digest".to_owned())
            }
            Some(_) => None,
        },
    }
}

/// `regfs cache verify`: checks every entry (blobs against their digests, blocks and
/// entries against their checksums) and removes the damaged ones, which mounts then
/// fetch again. Returns (entries checked, one line per damaged entry).
pub fn verify(root: &Path) -> Result<(usize, Vec<String>), String> {
    check(root)?;
    let entries = layout::entries(root);
    let mut damaged = Vec::new();
    for entry in &entries {
        if let Some(why) = damage(entry) {
            remove_files(&entry.paths);
            damaged.push(format!("{}: {why}; removed", entry.paths[0].display()));
        }
    }
    for origin in fs::read_dir(root.join(layout::HELD))
        .into_iter()
        .flatten()
        .flatten()
    {
        for held in fs::read_dir(origin.path()).into_iter().flatten().flatten() {
            if entry::read(&held.path()).is_none() {
                // A held index is a write not yet pushed: keep the file for a person to
                // look at, but say so.
                damaged.push(format!(
                    "{}: held index torn or changed; left in place",
                    held.path().display()
                ));
            }
        }
    }
    Budget::open(root, u64::MAX)
        .and_then(|b| b.recount())
        .map_err(|e| format!("{}: {e}", root.display()))?;
    Ok((entries.len(), damaged))
}
