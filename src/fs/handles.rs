//! Numbered handles for open files and directories.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

pub struct Handles<T> {
    open: Mutex<HashMap<u64, T>>,
    next: AtomicU64,
}

impl<T: Clone> Handles<T> {
    pub fn new() -> Handles<T> {
        Handles {
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, value);
        fh
    }

    pub fn get(&self, fh: u64) -> Option<T> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh)
            .cloned()
    }

    pub fn remove(&self, fh: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh);
    }
}

impl<T: Clone> Default for Handles<T> {
    fn default() -> Self {
        Self::new()
    }
}
