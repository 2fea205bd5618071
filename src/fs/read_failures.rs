//! A read of an image's file that failed for want of an answer fails again at once, for
//! [`FAILURE_MEMORY`], when the same open file is read again: the kernel retries a
//! failed read-ahead with a read of the page alone (and overlayfs, in a container, once
//! more), and a reader must get its EIO within `--timeout`, not after one wait per
//! retry (docs/SEMANTICS.md, "Under faults"). Blob files do the same (blob/reads.rs).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::cache::memo::FAILURE_MEMORY;
use crate::registry::Error;

use super::Errno;

/// Open files (by handle) whose last read failed for want of an answer, and when.
#[derive(Default)]
pub struct ReadFailures {
    recent: Mutex<HashMap<u64, (Instant, Errno)>>,
}

impl ReadFailures {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Instant, Errno)>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error of a read of `fh` that failed moments ago, if any.
    pub fn recent(&self, fh: u64) -> Option<Errno> {
        let mut recent = self.lock();
        match recent.get(&fh) {
            Some((at, errno)) if at.elapsed() < FAILURE_MEMORY => Some(*errno),
            Some(_) => {
                recent.remove(&fh);
                None
            }
            None => None,
        }
    }

    /// Notes a failed read of `fh`; only a registry that did not answer is remembered
    /// (a retry cannot do better within moments), not what a read could fix.
    pub fn failed(&self, fh: u64, e: &Error) {
        if e.is_transient() {
            self.lock().insert(fh, (Instant::now(), Errno(e.errno())));
        }
    }

    /// `fh` was closed.
    pub fn forget(&self, fh: u64) {
        self.lock().remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_registry_is_remembered_per_open_file() {
        let failures = ReadFailures::default();
        failures.failed(1, &Error::Unavailable("no answer within 3s".into()));
        failures.failed(2, &Error::NotFound("gone".into()));
        assert_eq!(failures.recent(1), Some(Errno::EIO));
        assert_eq!(failures.recent(2), None);
        assert_eq!(failures.recent(3), None);
        failures.forget(1);
        assert_eq!(failures.recent(1), None);
    }
}
