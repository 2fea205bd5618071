//! Where things are in a cache directory, and how to list them.
//!
//! ```text
//! DIR/CACHEDIR.TAG                      marks the directory (backup tools skip it)
//! DIR/lock, DIR/usage                   the shared size count (budget.rs)
//! DIR/blobs/<digest>                    whole blobs that matched their digest: shared
//!                                       by every registry
//! DIR/partial/<origin>/<digest>.<bs>    blocks of one registry's blob, not verified yet
//!                 (+ .log)              (partial.rs); <origin> is a hash of its URL,
//! DIR/partial/<origin>/origin           whose text is in this file
//! DIR/meta/<kind>/<digest>              checksummed entries (manifests, layer indexes)
//! DIR/files/<origin>/<key>.<bs> (+ .log) decoded file contents of image layers
//! DIR/files/shared/<key>.<bs>           (files.rs): an origin's until the layer is
//!                                       verified whole, then every registry's
//! DIR/held/<origin>/<digest>            indexes waiting for their child manifests
//! DIR/tmp/                              entries being written (renamed when whole)
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::private;
use crate::registry::Digest;

pub const TAG: &str = "CACHEDIR.TAG";
pub const LOCK: &str = "lock";
pub const USAGE: &str = "usage";
pub const BLOBS: &str = "blobs";
pub const PARTIAL: &str = "partial";
pub const META: &str = "meta";
pub const FILES: &str = "files";
/// The directory under `files/` of what every registry shares.
pub const SHARED: &str = "shared";
pub const HELD: &str = "held";
pub const TMP: &str = "tmp";
pub const ORIGIN: &str = "origin";
/// The metadata kind (a directory under `meta/`) manifests are stored under.
pub const MANIFEST_KIND: &str = "manifest";

const TAG_TEXT: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This directory is regfs's disk cache (content-addressed registry objects).\n\
# `regfs cache du|ls|prune|verify` look after it; it is safe to delete.\n";

/// Makes the directory's skeleton (idempotent).
pub fn create(root: &Path) -> io::Result<()> {
    private::create_dir_all(root)?;
    for dir in [BLOBS, PARTIAL, META, FILES, HELD, TMP] {
        private::create_dir_all(&root.join(dir))?;
    }
    let tag = root.join(TAG);
    if !tag.exists() {
        private::write(&tag, TAG_TEXT.as_bytes())?;
    }
    Ok(())
}

/// Whether `root` looks like a regfs cache directory.
pub fn is_cache_dir(root: &Path) -> bool {
    fs::read_to_string(root.join(TAG)).is_ok_and(|t| t.contains("regfs"))
}

pub fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join(BLOBS).join(digest.as_str())
}

pub fn partial_path(root: &Path, origin: &str, digest: &Digest, block_size: u64) -> PathBuf {
    root.join(PARTIAL)
        .join(origin)
        .join(format!("{digest}.{block_size}"))
}

/// A decoded file: `dir` is an origin's directory name, or [`SHARED`].
pub fn file_path(root: &Path, dir: &str, key: &Digest, block_size: u64) -> PathBuf {
    root.join(FILES)
        .join(dir)
        .join(format!("{key}.{block_size}"))
}

pub fn meta_path(root: &Path, kind: &str, key: &Digest) -> PathBuf {
    root.join(META).join(kind).join(key.as_str())
}

pub fn held_dir(root: &Path, origin: &str) -> PathBuf {
    root.join(HELD).join(origin)
}

/// What kind of thing an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A whole, verified blob.
    Blob(Digest),
    /// Blocks of a blob from one registry (its origin's URL, if known).
    Partial {
        digest: Digest,
        origin: String,
        block_size: u64,
    },
    /// A checksummed metadata entry of some kind (`manifest`, a layer index…).
    Meta { kind: String, key: Digest },
    /// A decoded file of an image layer (files.rs), of one registry (its origin's URL)
    /// or of every registry (`shared`).
    File {
        key: Digest,
        origin: String,
        block_size: u64,
    },
}

/// One evictable entry: its files, what they take on disk, and when it was last used.
#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub paths: Vec<PathBuf>,
    pub bytes: u64,
    pub last_used: SystemTime,
}

fn names(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(read) = fs::read_dir(dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

fn stat(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = fs::symlink_metadata(path).ok()?;
    Some((meta.blocks() * 512, meta.modified().ok()?))
}

/// The origin URL a registry's directory `dir` (named `origin_id`) holds.
fn origin_of(dir: &Path, origin_id: String) -> String {
    fs::read_to_string(dir.join(ORIGIN))
        .map(|s| s.trim().to_owned())
        .unwrap_or(origin_id)
}

/// A block file (partial.rs) found in a directory: its digest, block size, paths (data
/// and log), bytes on disk and last use.
type BlockFile = (Digest, u64, Vec<PathBuf>, u64, SystemTime);

/// The block files `<digest>.<block size>` (each with its `.log`) in `dir`.
fn block_files(dir: &Path) -> Vec<BlockFile> {
    let mut out = Vec::new();
    for (name, path) in names(dir) {
        let Some((digest, block_size)) = name
            .rsplit_once('.')
            .and_then(|(d, bs)| Some((Digest::parse(d)?, bs.parse().ok()?)))
        else {
            continue;
        };
        let log = super::partial::log_path(&path);
        let Some((bytes, last_used)) = stat(&path) else {
            continue;
        };
        let log_bytes = stat(&log).map_or(0, |(b, _)| b);
        out.push((
            digest,
            block_size,
            vec![path, log],
            bytes + log_bytes,
            last_used,
        ));
    }
    out
}

/// Every evictable entry (held indexes are not: they are writes not yet pushed).
pub fn entries(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for (name, path) in names(&root.join(BLOBS)) {
        if let (Some(digest), Some((bytes, last_used))) = (Digest::parse(&name), stat(&path)) {
            out.push(Entry {
                kind: Kind::Blob(digest),
                paths: vec![path],
                bytes,
                last_used,
            });
        }
    }
    for (origin_id, dir) in names(&root.join(PARTIAL)) {
        let origin = origin_of(&dir, origin_id);
        for (digest, block_size, paths, bytes, last_used) in block_files(&dir) {
            out.push(Entry {
                kind: Kind::Partial {
                    digest,
                    origin: origin.clone(),
                    block_size,
                },
                paths,
                bytes,
                last_used,
            });
        }
    }
    for (origin_id, dir) in names(&root.join(FILES)) {
        let origin = match origin_id.as_str() {
            SHARED => "every registry".to_owned(),
            _ => origin_of(&root.join(PARTIAL).join(&origin_id), origin_id),
        };
        for (key, block_size, paths, bytes, last_used) in block_files(&dir) {
            out.push(Entry {
                kind: Kind::File {
                    key,
                    origin: origin.clone(),
                    block_size,
                },
                paths,
                bytes,
                last_used,
            });
        }
    }
    for (kind, dir) in names(&root.join(META)) {
        for (name, path) in names(&dir) {
            if let (Some(key), Some((bytes, last_used))) = (Digest::parse(&name), stat(&path)) {
                out.push(Entry {
                    kind: Kind::Meta {
                        kind: kind.clone(),
                        key,
                    },
                    paths: vec![path],
                    bytes,
                    last_used,
                });
            }
        }
    }
    out
}

/// What the directory takes on disk, as `du` counts it (files and directories).
pub fn disk_usage(root: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(root) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for (_, path) in names(root) {
            total += disk_usage(&path);
        }
    }
    total
}

/// Removes temp files left by writers that died (older than an hour: a live writer
/// renames its file within seconds).
pub fn clean_tmp(root: &Path) {
    for (_, path) in names(&root.join(TMP)) {
        let stale = stat(&path)
            .and_then(|(_, t)| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age.as_secs() > 3600);
        if stale {
            let _ = fs::remove_file(path);
        }
    }
}
