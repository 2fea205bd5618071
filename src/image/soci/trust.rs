//! What a reader has proven of an index from a zTOC that the image does not vouch
//! for (docs/SEMANTICS.md, "Shared indexes"): which checkpoints (their offsets and
//! windows, proven by decoding the span before them: window.rs) and which files' tar
//! headers were checked, and whether the index was refused. Once refused, nothing of
//! it is used again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

pub struct Trust {
    /// Per checkpoint: proven.
    proven: Mutex<Vec<bool>>,
    /// Entries (by their number in the index) whose headers were checked.
    headers: Mutex<HashSet<usize>>,
    /// Why the index was refused.
    refused: Mutex<Option<String>>,
    /// The whole layer was checked against the index: nothing more to prove.
    checked: AtomicBool,
    /// Checkpoints need proving (the image does not vouch for the index).
    prove_checkpoints: bool,
}

impl Trust {
    pub fn new(checkpoints: usize, prove_checkpoints: bool) -> Trust {
        Trust {
            proven: Mutex::new(vec![false; checkpoints]),
            headers: Mutex::default(),
            refused: Mutex::default(),
            checked: AtomicBool::new(false),
            prove_checkpoints,
        }
    }

    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refuses the index; `true` the first time.
    pub fn refuse(&self, why: &str) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if refused.is_some() || self.is_checked() {
            return false;
        }
        *refused = Some(why.to_owned());
        true
    }

    /// The background check found the whole layer to be what the index says.
    pub fn set_checked(&self) {
        self.checked.store(true, Ordering::Release);
    }

    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    /// Whether checkpoint `k` may be used as it is.
    pub fn is_proven(&self, k: usize) -> bool {
        !self.prove_checkpoints
            || self.is_checked()
            || self
                .proven
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(k)
                .copied()
                .unwrap_or(false)
    }

    pub fn set_proven(&self, k: usize) {
        if let Some(p) = self
            .proven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(k)
        {
            *p = true;
        }
    }

    pub fn header_checked(&self, entry: usize) -> bool {
        self.is_checked()
            || self
                .headers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&entry)
    }

    pub fn set_header_checked(&self, entry: usize) {
        self.headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry);
    }
}
