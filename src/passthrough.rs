//! FUSE passthrough (Linux ≥ 6.9, root): a blob that is whole and verified in the disk
//! cache is opened so that the kernel reads the cache file itself, at local-file speed,
//! without a request to regfs per read.
//!
//! The kernel's rules, which this keeps: every open of an inode that is open with
//! passthrough must use the same backing file (else the open fails with EIO), and an
//! inode that is open through the page cache cannot be opened with passthrough until
//! those opens are closed. So an open gets passthrough when a backing file is live for
//! its inode (shared), or when it has a local file and no other open of the inode reads
//! through regfs; anything else is an ordinary open. When the kernel or the privileges
//! do not allow it, the first refusal turns passthrough off for the mount, silently
//! (debug log): reads then come through regfs as always.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use fuser::{BackingId, ReplyOpen};
use tracing::debug;

#[derive(Default)]
pub struct Passthrough {
    enabled: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The backing file of each inode open with passthrough, alive while a handle holds it.
    by_inode: HashMap<u64, Weak<BackingId>>,
    by_handle: HashMap<u64, Arc<BackingId>>,
    /// Ordinary opens still open, by inode, and the inode of each such handle.
    ordinary: HashMap<u64, u32>,
    ordinary_handles: HashMap<u64, u64>,
}

impl Passthrough {
    /// The kernel agreed to passthrough at init.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides how handle `fh` of inode `ino` is opened: Some(backing) to answer with
    /// passthrough, None for an ordinary open (recorded until `release`).
    pub fn open(
        &self,
        reply: &ReplyOpen,
        ino: u64,
        fh: u64,
        local_file: Option<File>,
    ) -> Option<Arc<BackingId>> {
        let mut state = self.lock();
        let live = state.by_inode.get(&ino).and_then(Weak::upgrade);
        let backing = match (live, local_file) {
            (Some(backing), _) => Some(backing),
            (None, Some(file))
                if self.enabled.load(Ordering::Relaxed) && !state.ordinary.contains_key(&ino) =>
            {
                match reply.open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        state.by_inode.insert(ino, Arc::downgrade(&id));
                        Some(id)
                    }
                    Err(e) => {
                        debug!("FUSE passthrough refused ({e}); reads go through regfs");
                        self.enabled.store(false, Ordering::Relaxed);
                        None
                    }
                }
            }
            _ => None,
        };
        match &backing {
            Some(id) => {
                state.by_handle.insert(fh, id.clone());
            }
            None => {
                *state.ordinary.entry(ino).or_default() += 1;
                state.ordinary_handles.insert(fh, ino);
            }
        }
        backing
    }

    /// Handle `fh` was released.
    pub fn release(&self, fh: u64) {
        let mut state = self.lock();
        if state.by_handle.remove(&fh).is_some() {
            state.by_inode.retain(|_, weak| weak.strong_count() > 0);
            return;
        }
        if let Some(ino) = state.ordinary_handles.remove(&fh) {
            if let Some(n) = state.ordinary.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    state.ordinary.remove(&ino);
                }
            }
        }
    }
}
