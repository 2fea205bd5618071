//! The end-to-end tests that run one at a time, a test binary of their own (cargo runs test
//! binaries one after the other, so nothing of `tests/e2e/` runs beside them either):
//! - `soak` and `scale` load the machine on purpose (32 readers and uploads for 30 s;
//!   5,000 repositories on tmpfs walked by grep and rsync): beside them, the tests that
//!   hold regfs to a time (`--timeout`, stalls) would measure the soak;
//! - `pull_through` holds regfs to one stream per sequential reader of a cold
//!   pull-through cache, and regfs stops a stream it judges distant: one that took 15 ms
//!   or more to open, which a machine busy with other tests' daemons makes of any.
//!
//! Each takes [`alone`] first, so they run one at a time whatever `--test-threads` says.

use std::sync::{Mutex, MutexGuard, PoisonError};

// This binary uses only a part of the harness.
#[allow(dead_code, unused_imports)]
#[path = "../common/mod.rs"]
mod common;

mod pull_through;
mod scale;
mod soak;

/// Held for the whole of a test: no other test of this binary runs meanwhile.
fn alone() -> MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves it poisoned; the next still runs alone.
    ALONE.lock().unwrap_or_else(PoisonError::into_inner)
}
