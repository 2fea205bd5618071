//! What the snapshotter did with the layers it was asked for, in `<root>/stats.json`
//! (kept across restarts, rewritten whole by rename on each change): remote snapshots
//! served, and every fallback to an ordinary snapshot by reason. A fallback is also
//! logged, once per layer, with its reason: a lazy pull that became a full one is
//! never silent (docs/SEMANTICS.md, "Container runtimes").

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// Why a layer became an ordinary local snapshot. The names are the stats keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// An unpack whose labels name no image layer (a plain `ctr image pull`).
    NoLabels,
    /// Labels that name a layer badly (a reference or digest that does not parse).
    BadLabels,
    /// The registry host's regfs mount could not be made (unreachable, refused).
    MountFailed,
    /// The registry refused the credentials (EACCES).
    AccessDenied,
    /// The layer or its image is not at the registry (ENOENT).
    NotFound,
    /// The layer could not be read: unknown media type, corrupt, registry down (EIO).
    Unreadable,
    /// The layer directory could not be bound into the snapshot.
    BindFailed,
    /// The name the layer is to be committed under is taken by a snapshot of another
    /// parent (the same layer unpacked over another snapshot of its parent chain).
    NameTaken,
}

impl Fallback {
    pub fn key(self) -> &'static str {
        match self {
            Fallback::NoLabels => "no_labels",
            Fallback::BadLabels => "bad_labels",
            Fallback::MountFailed => "mount_failed",
            Fallback::AccessDenied => "access_denied",
            Fallback::NotFound => "not_found",
            Fallback::Unreadable => "unreadable",
            Fallback::BindFailed => "bind_failed",
            Fallback::NameTaken => "name_taken",
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Layers committed as remote snapshots (containerd downloaded none of them).
    pub remote_snapshots: u64,
    /// Layers containerd had to download and unpack, all reasons together.
    pub fallbacks: u64,
    /// The same by reason (Fallback::key).
    pub fallback_reasons: BTreeMap<String, u64>,
}

pub struct RuntimeStats {
    path: PathBuf,
    counters: Mutex<Counters>,
    /// Layers whose fallback was logged already.
    logged: Mutex<HashSet<String>>,
}

impl RuntimeStats {
    /// Starts from what `path` holds (a missing or damaged file starts from zero).
    pub fn load(path: PathBuf) -> RuntimeStats {
        let counters = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        RuntimeStats {
            path,
            counters: Mutex::new(counters),
            logged: Mutex::new(HashSet::new()),
        }
    }

    pub fn served(&self) {
        self.change(|c| c.remote_snapshots += 1);
    }

    /// Counts a fallback of `layer` ("layer sha256:…", or the chain ID where the
    /// unpack named no layer) and logs it the first time for that layer.
    pub fn fallback(&self, layer: &str, why: Fallback, detail: &str) {
        self.change(|c| {
            c.fallbacks += 1;
            *c.fallback_reasons.entry(why.key().to_owned()).or_default() += 1;
        });
        let first = self
            .logged
            .lock()
            .is_ok_and(|mut l| l.insert(layer.to_owned()));
        if first {
            warn!(
                "{layer}: not served by regfs ({}): {detail}; containerd downloads and unpacks it",
                why.key()
            );
        }
    }

    fn change(&self, f: impl FnOnce(&mut Counters)) {
        let Ok(mut counters) = self.counters.lock() else {
            return;
        };
        f(&mut counters);
        let Ok(bytes) = serde_json::to_vec_pretty(&*counters) else {
            return;
        };
        let tmp = self.path.with_extension("json.tmp");
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            warn!("cannot write {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        let stats = RuntimeStats::load(path.clone());
        stats.served();
        stats.fallback("layer sha256:a", Fallback::NoLabels, "plain pull");
        stats.fallback("layer sha256:a", Fallback::NoLabels, "plain pull");
        let again = RuntimeStats::load(path);
        let c = again.counters.lock().unwrap();
        assert_eq!((c.remote_snapshots, c.fallbacks), (1, 2));
        assert_eq!(c.fallback_reasons["no_labels"], 2);
    }
}
