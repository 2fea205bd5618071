//! Which chunks of a TOC layer are being fetched right now (image/chunks.rs fetches a
//! run of a file's chunks in one range request), so that a reader of one of them
//! waits for that run rather than fetching the chunk a second time.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

/// The chunks of a layer that runs are fetching right now, so that a reader of one
/// waits for its run rather than fetching it again: the kernel reads ahead of a
/// program in parallel reads.
#[derive(Default)]
pub struct Flights(Mutex<HashMap<u32, watch::Receiver<()>>>);

/// Chunks held by one run until it is dropped (done, failed or cancelled).
pub struct Held<'a> {
    flights: &'a Flights,
    chunks: Range<u32>,
    done: watch::Receiver<()>,
    /// Dropped with the guard: waiters see the channel close.
    _signal: watch::Sender<()>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, watch::Receiver<()>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn holds(&self, chunk: u32) -> bool {
        self.lock().contains_key(&chunk)
    }

    /// Marks `chunks` as being fetched until the guard is dropped.
    pub fn hold(&self, chunks: Range<u32>) -> Held<'_> {
        let (signal, done) = watch::channel(());
        let mut map = self.lock();
        for c in chunks.clone() {
            map.entry(c).or_insert_with(|| done.clone());
        }
        Held {
            flights: self,
            chunks,
            done,
            _signal: signal,
        }
    }

    /// Waits for the run fetching `chunk`, if there is one.
    pub async fn wait(&self, chunk: u32) {
        let flight = self.lock().get(&chunk).cloned();
        if let Some(mut done) = flight {
            // Nothing is ever sent: this returns when the run's guard is dropped.
            let _ = done.changed().await;
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.lock();
        for c in self.chunks.clone() {
            if map.get(&c).is_some_and(|r| r.same_channel(&self.done)) {
                map.remove(&c);
            }
        }
    }
}
