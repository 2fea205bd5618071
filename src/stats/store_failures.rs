//! Lookups in `/.layerstore/` that found no layer to serve for an image of this
//! registry (a digest the image does not have, a tag that is gone, a layer of a media
//! type regfs cannot read, a registry that did not answer): the runtime then downloads
//! that layer itself, so each is counted in `/.regfs/stats` (`layer_store`) and logged
//! once, never silent (docs/SEMANTICS.md, "Container runtimes").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Failed layers remembered (to log each once); past this, each failure is logged
/// again rather than forgotten.
const REMEMBERED: usize = 4096;
/// Failed layers whose reason the stats show.
const SHOWN: usize = 32;

#[derive(Default)]
pub struct StoreFailures {
    /// Distinct layers (reference and digest) whose lookup failed.
    failed: AtomicU64,
    why: Mutex<BTreeMap<String, String>>,
}

/// `layer_store` in `/.regfs/stats`.
#[derive(Serialize, Debug, Default)]
pub struct StoreFailuresSnapshot {
    /// Layers (by image reference and digest) the store could not serve.
    pub failed_lookups: u64,
    /// Why, for the first few: `<reference>/<digest>` → reason.
    pub failed: BTreeMap<String, String>,
}

impl StoreFailures {
    /// The lookup of `layer` failed for `why`. True the first time for `layer` (the
    /// caller logs it then), and whenever too many others are remembered to tell.
    pub fn failed(&self, layer: &str, why: &str) -> bool {
        let mut seen = self.why.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains_key(layer) {
            return false;
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        if seen.len() < REMEMBERED {
            seen.insert(layer.to_owned(), why.to_owned());
        }
        true
    }

    pub fn snapshot(&self) -> StoreFailuresSnapshot {
        let seen = self.why.lock().unwrap_or_else(PoisonError::into_inner);
        StoreFailuresSnapshot {
            failed_lookups: self.failed.load(Ordering::Relaxed),
            failed: seen
                .iter()
                .take(SHOWN)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failed_layer_is_counted_and_reported_once() {
        let failures = StoreFailures::default();
        assert!(failures.failed("ref/sha256:a", "no layer"));
        assert!(!failures.failed("ref/sha256:a", "no layer"));
        assert!(failures.failed("ref/sha256:b", "media type"));
        let shown = failures.snapshot();
        assert_eq!(shown.failed_lookups, 2);
        assert_eq!(shown.failed["ref/sha256:b"], "media type");
    }
}
