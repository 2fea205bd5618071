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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use lru::LruCache;

use super::budget::{self, allocated};
use super::layout;
use super::partial::{Partial, Written};
use crate::buf::BlockBuf;
use crate::registry::Digest;

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
pub const WAITING_BLOCKS: usize = 64;

/// What decoded files need of the cache directory they are in (store.rs's Store).
pub trait Directory {
    fn root(&self) -> &Path;
    /// The name of this registry's directories.
    fn origin_id(&self) -> &str;
    /// Names this process in block records.
    fn writer_id(&self) -> u64;
    /// Reserves room in the budget (false: none).
    fn reserve(&self, bytes: u64, keep: Option<&Path>) -> bool;
    fn release(&self, bytes: u64);
    fn write_failed(&self, e: &io::Error, what: &str);
}

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
    pub waiting: Arc<AtomicUsize>,
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
    fn path(store: &dyn Directory, scope: Scope, key: &Digest) -> PathBuf {
        let dir = match scope {
            Scope::Shared => layout::SHARED,
            Scope::Origin => store.origin_id(),
        };
        layout::file_path(store.root(), dir, key, FILE_BLOCK)
    }

    /// The decoded file `key` of `scope`, opened (created if `create`).
    fn partial(
        &self,
        store: &dyn Directory,
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
    pub fn read(
        &self,
        store: &dyn Directory,
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
    pub fn write(
        &self,
        store: &dyn Directory,
        scope: Scope,
        key: &Digest,
        index: u64,
        bytes: &[u8],
    ) {
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
    pub fn whole(&self, store: &dyn Directory, key: &Digest, size: u64) -> Option<File> {
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
