//! Long work in progress — layers being read whole by the index pass — shown in
//! `/.regfs/stats` (`images.indexing`) with how far it got, so `regfs status` can tell
//! people what a first look is waiting for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;

#[derive(Default)]
pub struct Progress {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, Arc<Task>>>,
}

struct Task {
    what: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
}

/// One piece of work being tracked; it leaves the list when dropped.
pub struct Tracked {
    progress: Arc<Progress>,
    id: u64,
    task: Arc<Task>,
}

/// A snapshot of one piece of work.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskSnapshot {
    pub layer: String,
    pub done: u64,
    pub total: u64,
    pub elapsed_ms: u64,
}

impl Progress {
    /// Starts tracking `what` (a layer digest), `total` bytes to go through.
    pub fn start(self: &Arc<Self>, what: String, total: u64) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let task = Arc::new(Task {
            what,
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, task.clone());
        Tracked {
            progress: self.clone(),
            id,
            task,
        }
    }

    pub fn snapshot(&self) -> Vec<TaskSnapshot> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .values()
            .map(|t| TaskSnapshot {
                layer: t.what.clone(),
                done: t.done.load(Ordering::Relaxed),
                total: t.total,
                elapsed_ms: t.started.elapsed().as_millis() as u64,
            })
            .collect()
    }
}

impl Tracked {
    pub fn advance(&self, bytes: u64) {
        self.task.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.progress
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_listed_while_it_runs() {
        let progress = Arc::new(Progress::default());
        let a = progress.start("sha256:a".into(), 100);
        a.advance(40);
        let list = progress.snapshot();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].done, list[0].total), (40, 100));
        drop(a);
        assert!(progress.snapshot().is_empty());
    }
}
