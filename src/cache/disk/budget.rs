//! The size bound of a cache directory shared by several daemons: one `usage` file, read
//! and changed only under the directory's `lock` (`flock`), holds the bytes the cache
//! takes on disk (allocated, as `du` counts them). A writer reserves room before it
//! writes; when the reservation would pass the budget, the least recently used entries
//! go, whole, until there is room again (and a little more, so that a full cache does
//! not scan the directory for every block).
//!
//! The count is an estimate between scans (a daemon killed between reserving and
//! writing leaves it too high, never too low); every daemon start recounts it from
//! the directory.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::layout;
use super::partial::with_lock;
use super::private;

/// How far below the budget eviction goes once it has to run: 1/16 of the budget.
const EVICTION_SLACK_DIVISOR: u64 = 16;

pub struct Budget {
    root: PathBuf,
    limit: u64,
    lock: File,
}

/// What a reservation found.
#[derive(Debug, PartialEq, Eq)]
pub struct Reserved {
    pub granted: bool,
    /// Bytes in use afterwards.
    pub used: u64,
    /// Entries evicted to make room.
    pub evicted: u64,
}

/// Rounds up to the filesystem's allocation unit, as `du` counts.
pub fn allocated(bytes: u64) -> u64 {
    bytes.div_ceil(4096) * 4096
}

impl Budget {
    pub fn open(root: &Path, limit: u64) -> io::Result<Budget> {
        let lock = private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(root.join(layout::LOCK))?;
        Ok(Budget {
            root: root.to_owned(),
            limit,
            lock,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Recounts the directory, evicts down to the budget if it is over, and stores the
    /// count. Returns the bytes in use.
    pub fn recount(&self) -> io::Result<u64> {
        with_lock(&self.lock, || {
            let mut used = layout::disk_usage(&self.root);
            if used > self.limit {
                used = self.evict(used, self.limit, None).0;
            }
            self.store(used).map(|()| used)
        })?
    }

    /// Makes room for `bytes` more, evicting if needed (never `keep`, the entry being
    /// written). Not granted when even evicting everything else would not make room.
    pub fn reserve(&self, bytes: u64, keep: Option<&Path>) -> io::Result<Reserved> {
        with_lock(&self.lock, || {
            let mut used = self.load()?;
            let mut evicted = 0;
            if used + bytes > self.limit {
                let target =
                    (self.limit - self.limit / EVICTION_SLACK_DIVISOR).saturating_sub(bytes);
                (used, evicted) = self.evict(used, target, keep);
            }
            let granted = used + bytes <= self.limit;
            if granted {
                used += bytes;
                self.store(used)?;
            } else {
                self.store(used)?;
            }
            Ok(Reserved {
                granted,
                used,
                evicted,
            })
        })?
    }

    /// Gives back `bytes` (a write that failed, an entry removed); the bytes in use.
    pub fn release(&self, bytes: u64) -> io::Result<u64> {
        with_lock(&self.lock, || {
            let used = self.load()?.saturating_sub(bytes);
            self.store(used).map(|()| used)
        })?
    }

    /// Removes entries, least recently used first, until `used` is at most `target`.
    fn evict(&self, mut used: u64, target: u64, keep: Option<&Path>) -> (u64, u64) {
        let mut entries = layout::entries(&self.root);
        entries.sort_by_key(|e| e.last_used);
        let mut evicted = 0;
        for entry in entries {
            if used <= target {
                break;
            }
            if keep.is_some_and(|k| entry.paths.iter().any(|p| p == k)) {
                continue;
            }
            used = used.saturating_sub(remove_files(&entry.paths));
            evicted += 1;
        }
        (used, evicted)
    }

    fn load(&self) -> io::Result<u64> {
        let mut text = String::new();
        let mut file = File::open(self.root.join(layout::USAGE)).or_else(|_| {
            private::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(self.root.join(layout::USAGE))
        })?;
        file.read_to_string(&mut text)?;
        match text.trim().parse() {
            Ok(used) => Ok(used),
            // Missing or damaged: count again (we hold the lock).
            Err(_) => Ok(layout::disk_usage(&self.root)),
        }
    }

    fn store(&self, used: u64) -> io::Result<()> {
        let mut file = private::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.root.join(layout::USAGE))?;
        let text = format!("{used}\n");
        file.rewind()?;
        file.write_all(text.as_bytes())?;
        file.set_len(text.len() as u64)
    }
}

/// Deletes files (an entry's); the bytes they took.
pub fn remove_files(paths: &[PathBuf]) -> u64 {
    let mut freed = 0;
    for path in paths {
        if let Ok(meta) = fs::symlink_metadata(path) {
            if fs::remove_file(path).is_ok() {
                freed += meta.blocks() * 512;
            }
        }
    }
    freed
}

/// Marks an entry as used now, unless that was said less than a minute ago (cheap
/// enough for every open, without a write per read).
pub fn touch(path: &Path) {
    let Ok(file) = File::options().write(true).open(path) else {
        return;
    };
    let recent = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age.as_secs() < 60);
    if !recent {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        layout::create(dir.path()).expect("layout");
        dir
    }

    #[test]
    fn reserving_past_the_budget_evicts_the_least_recently_used() {
        let dir = cache_dir();
        let old = layout::blob_path(dir.path(), &crate::registry::Digest::sha256_of(b"old"));
        let new = layout::blob_path(dir.path(), &crate::registry::Digest::sha256_of(b"new"));
        fs::write(&old, vec![1u8; 64 << 10]).expect("write");
        File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH))
            .expect("age it");
        fs::write(&new, vec![2u8; 64 << 10]).expect("write");
        let budget = Budget::open(dir.path(), 200 << 10).expect("budget");
        let used = budget.recount().expect("recount");
        assert!((128 << 10..=200 << 10).contains(&used), "{used}");
        let r = budget.reserve(64 << 10, None).expect("reserve");
        assert!(r.granted && r.evicted == 1 && r.used <= 200 << 10, "{r:?}");
        assert!(!old.exists() && new.exists());
        let too_big = budget.reserve(300 << 10, None).expect("reserve");
        assert!(!too_big.granted);
    }
}
