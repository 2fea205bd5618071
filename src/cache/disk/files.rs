//! Decoded file contents of image layers (docs/SEMANTICS.md, "Disk cache"): what a mount
//! decoded to serve a file, kept so that the next mount reads it without fetching or
//! decoding again, as an unpacked root filesystem would be read.
//!
//! - One file per decoded file, named by a key the image code derives from the layer's
//!   content (image/kept.rs), holding the file's bytes at their own offsets, in blocks of
//!   [`FILE_BLOCK`] recorded with their CRC as partial.rs records blob blocks: nothing
//!   torn or flipped is read back, several daemons share it (the first writer of a
//!   block wins), and a file whose every block is there is the file itself, which the
//!   kernel may read directly (FUSE passthrough) once its blocks were checked.
//! - Kept under this registry's origin until the layer has been verified whole against
//!   its digest, then under `shared` (every registry): one registry's bytes never
//!   serve another's reads before that.
//! - Each file is one entry of the budget (least recently used first), like a blob.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::mpsc;

use super::DiskCache;
use super::budget::{self, allocated};
use super::layout;
use super::partial::{Partial, Written};
use super::store::{Job, Store};
use crate::buf::BlockBuf;
use crate::registry::Digest;
use crate::stats::Stats;

/// Bytes per block of a decoded file.
pub const FILE_BLOCK: u64 = 256 << 10;
/// Decoded files kept open, and remembered as checked whole.
const OPEN_FILES: usize = 64;
const CHECKED_FILES: usize = 4096;
/// Largest file handed to the kernel whole: checking it reads it all at its first open,
/// which a program reading a little of a larger file should not wait for (its reads
/// come through regfs, block by block, each checked).
const WHOLE_MAX: u64 = 64 << 20;
/// Blocks waiting for room in the writer's queue; more are dropped (counted).
const WAITING_BLOCKS: usize = 64;

/// Whose a decoded file is: every registry's (its layer was verified whole), or this
/// registry's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Shared,
    Origin,
}

const SCOPES: [Scope; 2] = [Scope::Shared, Scope::Origin];

/// The decoded files of one mount's view of the directory.
pub struct Files {
    open: Mutex<LruCache<(Scope, Digest), Arc<Partial>>>,
    /// Files this process checked whole (every block against its CRC).
    checked: Mutex<HashSet<(Scope, Digest)>>,
    /// Blocks queued by tasks waiting for room.
    waiting: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Blocks of a file of `size` bytes, and the length of block `index`.
fn block_len(size: u64, index: u64) -> Option<u64> {
    let start = index.checked_mul(FILE_BLOCK)?;
    (start < size).then(|| FILE_BLOCK.min(size - start))
}

impl Default for Files {
    fn default() -> Self {
        let open = std::num::NonZeroUsize::new(OPEN_FILES).unwrap_or(std::num::NonZeroUsize::MIN);
        Files {
            open: Mutex::new(LruCache::new(open)),
            checked: Mutex::default(),
            waiting: Arc::default(),
        }
    }
}

impl Files {
    fn path(store: &Store, scope: Scope, key: &Digest) -> PathBuf {
        let dir = match scope {
            Scope::Shared => layout::SHARED,
            Scope::Origin => store.origin_id(),
        };
        layout::file_path(store.root(), dir, key, FILE_BLOCK)
    }

    /// The decoded file `key` of `scope`, opened (created if `create`).
    fn partial(
        &self,
        store: &Store,
        scope: Scope,
        key: &Digest,
        create: bool,
    ) -> Option<Arc<Partial>> {
        let id = (scope, key.clone());
        let known = lock(&self.open).get(&id).cloned();
        if let Some(p) = known {
            if p.linked() {
                return Some(p);
            }
            lock(&self.open).pop(&id); // evicted by someone: open afresh
        }
        let path = Self::path(store, scope, key);
        if create {
            let dir = path.parent()?;
            super::private::create_dir_all(dir).ok()?;
        }
        let p = Arc::new(Partial::open(&path, FILE_BLOCK, create).ok()??);
        lock(&self.open).put(id, p.clone());
        Some(p)
    }

    /// Block `index` of the decoded file `key` (`size` bytes), checked against its CRC.
    fn read(
        &self,
        store: &Store,
        key: &Digest,
        size: u64,
        index: u64,
        buffer: BlockBuf,
    ) -> Option<Bytes> {
        let len = block_len(size, index)?;
        let p = SCOPES
            .iter()
            .filter_map(|&s| self.partial(store, s, key, false))
            .find(|p| p.has(index))?;
        let block = p.read(index, len, buffer)?;
        budget::touch(&p.data_path);
        Some(block)
    }

    /// Stores block `index` of the decoded file `key` (the writer thread's work).
    pub fn write(&self, store: &Store, scope: Scope, key: &Digest, index: u64, bytes: &[u8]) {
        let path = Self::path(store, scope, key);
        let new_file = !path.exists();
        // The block, its record, and the first blocks of two new files.
        let cost = allocated(bytes.len() as u64) + 32 + if new_file { 8192 } else { 0 };
        if !store.reserve(cost, Some(&path)) {
            return;
        }
        let Some(partial) = self.partial(store, scope, key, true) else {
            store.release(cost);
            return;
        };
        match partial.write(index, bytes, store.writer_id()) {
            Ok(Written::Stored(_)) => {}
            Ok(Written::AlreadyThere) => store.release(cost),
            Err(e) => {
                store.release(cost);
                store.write_failed(&e, "writing a decoded file block");
            }
        }
    }

    /// The decoded file `key` (`size` bytes) whole, every block checked once by this
    /// process, opened for reading: the file itself.
    fn whole(&self, store: &Store, key: &Digest, size: u64) -> Option<File> {
        if size > WHOLE_MAX {
            return None;
        }
        let blocks = size.div_ceil(FILE_BLOCK);
        for scope in SCOPES {
            let Some(p) = self.partial(store, scope, key, false) else {
                continue;
            };
            if !p.completeness(blocks).0 {
                continue;
            }
            let id = (scope, key.clone());
            if !lock(&self.checked).contains(&id) {
                if !p.damaged_blocks().is_empty() {
                    continue;
                }
                let mut checked = lock(&self.checked);
                if checked.len() >= CHECKED_FILES {
                    checked.clear();
                }
                checked.insert(id);
            }
            let file = File::open(&p.data_path).ok()?;
            if file.metadata().ok()?.len() != size {
                continue;
            }
            budget::touch(&p.data_path);
            return Some(file);
        }
        None
    }
}

impl DiskCache {
    /// Block `index` (of [`FILE_BLOCK`] bytes) of the decoded file `key` of `size` bytes,
    /// if it is kept (for every registry, or this one) and intact.
    pub async fn file_block(
        &self,
        key: &Digest,
        size: u64,
        index: u64,
        buffer: BlockBuf,
    ) -> Option<Bytes> {
        let (store, key) = (self.store.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.files().read(&store, &key, size, index, buffer))
            .await
            .ok()
            .flatten()
    }

    /// Keeps block `index` of the decoded file `key`, for every registry if `shared`
    /// (its layer was verified whole). Queued; the caller never waits for it.
    pub fn store_file_block(&self, key: &Digest, index: u64, bytes: Bytes, shared: bool) {
        if self.store.writing_off() {
            return;
        }
        let scope = if shared { Scope::Shared } else { Scope::Origin };
        let job = Job::FileBlock {
            scope,
            key: key.clone(),
            index,
            bytes,
        };
        let job = match self.jobs.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(job)) => job,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        };
        let waiting = self.store.files().waiting.clone();
        if waiting.fetch_add(1, Ordering::AcqRel) >= WAITING_BLOCKS {
            waiting.fetch_sub(1, Ordering::AcqRel);
            Stats::add(&self.store.stats().disk_dropped, 1);
            return;
        }
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let _ = jobs.send(job).await;
            waiting.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// The decoded file `key` of `size` bytes, if it is kept whole and intact: a local
    /// file the kernel may read directly.
    pub async fn whole_file(&self, key: &Digest, size: u64) -> Option<File> {
        let (store, key) = (self.store.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.files().whole(&store, &key, size))
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use super::*;

    fn cache(dir: &std::path::Path, origin: &str) -> DiskCache {
        DiskCache::open(dir, 64 << 20, origin, Arc::default()).expect("open")
    }

    fn buf() -> BlockBuf {
        crate::buf::BufferPool::new(FILE_BLOCK, 1).take(FILE_BLOCK as usize)
    }

    #[tokio::test]
    async fn decoded_files_stay_with_their_registry_until_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (
            cache(dir.path(), "http://a:5000"),
            cache(dir.path(), "http://b:5000"),
        );
        let (mine, ours) = (Digest::sha256_of(b"mine"), Digest::sha256_of(b"ours"));
        a.store_file_block(&mine, 0, Bytes::from_static(b"unverified"), false);
        a.store_file_block(&ours, 0, Bytes::from_static(b"verified"), true);
        a.settle(Duration::from_secs(5)).await;
        let got = |c: &DiskCache, key: &Digest, size| {
            let (c, key) = (c.clone(), key.clone());
            async move { c.file_block(&key, size, 0, buf()).await }
        };
        assert_eq!(
            got(&a, &mine, 10).await.as_deref(),
            Some(&b"unverified"[..])
        );
        assert_eq!(got(&b, &mine, 10).await, None, "another registry's");
        assert_eq!(got(&b, &ours, 8).await.as_deref(), Some(&b"verified"[..]));
        assert_eq!(
            got(&a, &mine, 11).await,
            None,
            "another size, another block"
        );
    }

    #[tokio::test]
    async fn a_whole_file_is_the_file_itself_once_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = cache(dir.path(), "http://a:5000");
        let key = Digest::sha256_of(b"file");
        let content: Vec<u8> = (0..FILE_BLOCK + 100).map(|i| (i % 251) as u8).collect();
        let size = content.len() as u64;
        a.store_file_block(
            &key,
            1,
            Bytes::copy_from_slice(&content[FILE_BLOCK as usize..]),
            true,
        );
        a.settle(Duration::from_secs(5)).await;
        assert!(a.whole_file(&key, size).await.is_none(), "block 0 missing");
        a.store_file_block(
            &key,
            0,
            Bytes::copy_from_slice(&content[..FILE_BLOCK as usize]),
            true,
        );
        a.settle(Duration::from_secs(5)).await;
        let file = a.whole_file(&key, size).await.expect("whole");
        let mut back = vec![0u8; content.len()];
        file.read_exact_at(&mut back, 0).expect("read");
        assert!(back == content);
        // A flipped byte: a fresh mount neither passes the file on nor reads the block.
        let path = layout::file_path(dir.path(), layout::SHARED, &key, FILE_BLOCK);
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        data.write_all_at(b"X", 7).expect("flip");
        let fresh = cache(dir.path(), "http://a:5000");
        assert!(fresh.whole_file(&key, size).await.is_none());
        assert_eq!(fresh.file_block(&key, size, 0, buf()).await, None);
        assert!(fresh.file_block(&key, size, 1, buf()).await.is_some());
    }
}
