//! The snapshotter itself, in plain Rust (service.rs speaks gRPC for it): containerd's
//! snapshot operations over the metadata store (store.rs) and the directories and
//! mounts of overlay.rs; a Prepare that names an image layer is handed to remote.rs.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::filter::{Fields, Filters};
use super::labels::{LABEL_TARGET, unpack_target};
use super::overlay::{Layout, Mount, disk_usage};
use super::remote::{Remote, Served};
use super::store::{Error, Kind, NewSnapshot, Record, Result, Store, Usage};

/// A snapshot as containerd's Info has it.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub record: Record,
}

pub struct Snapshotter {
    layout: Layout,
    store: Store,
    remote: Remote,
}

impl Snapshotter {
    pub fn new(layout: Layout, store: Store, remote: Remote) -> Snapshotter {
        Snapshotter {
            layout,
            store,
            remote,
        }
    }

    /// Binds every remote snapshot whose bind is gone (after a reboot); at start.
    pub fn bind_remote_snapshots(&self) {
        match self.store.list() {
            Ok(all) => {
                for (_, record) in all.iter().filter(|(_, r)| r.remote.is_some()) {
                    self.remote.ensure_bound(&self.layout, record);
                }
            }
            Err(e) => warn!("cannot list snapshots to bind remote layers: {e:?}"),
        }
    }

    /// An active snapshot over `parent`; or, when the labels name an image layer that
    /// regfs can serve, that layer committed under its target name and AlreadyExists
    /// (containerd then downloads and unpacks nothing).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(target) = labels.get(LABEL_TARGET).cloned() {
            self.try_remote(key, &target, parent, &labels)?;
        } else if let Some(chain) = unpack_target(key) {
            self.remote.unlabelled(chain);
        }
        self.create(key, parent, Kind::Active, labels)
    }

    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(key, parent, Kind::View, labels)
    }

    /// Err(AlreadyExists) when the layer is (now) a remote snapshot; Ok when the caller
    /// must make an ordinary snapshot (the fallback is counted and logged by remote.rs).
    fn try_remote(
        &self,
        key: &str,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        if let Some(existing) = self.store.get(target)? {
            if existing.kind == Kind::Committed && existing.parent == parent {
                return Err(Error::AlreadyExists(format!("snapshot {target:?} exists")));
            }
            // containerd could not find it over this parent: unpack here instead.
            self.remote.name_taken(target, parent);
            return Ok(());
        }
        let Served { dir, layer } = match self.remote.serve(key, labels) {
            Some(served) => served,
            None => return Ok(()),
        };
        let digest = layer.layer.clone();
        let served = layer.clone();
        let new = NewSnapshot {
            key: target,
            parent,
            kind: Kind::Committed,
            labels: labels.clone(),
            remote: Some(layer),
        };
        let layout = &self.layout;
        let created = self.store.create(new, |id| {
            layout.make_dirs(id, Kind::Committed)?;
            super::remote::bind(&dir, &layout.fs(id)).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(layout.snapshot_dir(id));
            })
        });
        match created {
            Ok(_) => {
                self.remote.committed(&served);
                Err(Error::AlreadyExists(format!(
                    "snapshot {target:?} is served by regfs"
                )))
            }
            // Another Prepare of the same layer committed it first.
            Err(Error::AlreadyExists(m)) => Err(Error::AlreadyExists(m)),
            Err(e) => {
                self.remote.bind_failed(&digest, &format!("{e:?}"));
                Ok(())
            }
        }
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let new = NewSnapshot {
            key,
            parent,
            kind,
            labels,
            remote: None,
        };
        let layout = &self.layout;
        let record = self.store.create(new, |id| layout.make_dirs(id, kind))?;
        self.mounts_of(&record)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let record = self.store.require(key)?;
        self.mounts_of(&record)
    }

    fn mounts_of(&self, record: &Record) -> Result<Vec<Mount>> {
        let ancestors = self.store.ancestors(record)?;
        // A remote layer whose bind mount went away (a reboot) is bound again first.
        for parent in ancestors.iter().filter(|a| a.remote.is_some()) {
            self.remote.ensure_bound(&self.layout, parent);
        }
        let parents: Vec<u64> = ancestors.iter().map(|a| a.id).collect();
        Ok(self.layout.mounts(record.id, record.kind, &parents))
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let record = self.store.require(key)?;
        if record.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let usage = disk_usage(&self.layout.fs(record.id))
            .map_err(|e| Error::Internal(format!("usage of {key:?}: {e}")))?;
        self.store.commit(name, key, labels, usage)?;
        Ok(())
    }

    /// Forgets `key` and removes its directory (a remote snapshot's bind mount first).
    pub fn remove(&self, key: &str) -> Result<()> {
        let record = self.store.remove(key)?;
        self.remove_dir(record.id);
        Ok(())
    }

    fn remove_dir(&self, id: u64) {
        let dir = self.layout.snapshot_dir(id);
        super::remote::unbind(&self.layout.fs(id));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("cannot remove {}: {e} (Cleanup tries again)", dir.display());
            }
        }
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let record = self.store.require(key)?;
        Ok(Info {
            name: key.to_owned(),
            record,
        })
    }

    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        let record = self.store.update(key, labels, paths)?;
        Ok(Info {
            name: key.to_owned(),
            record,
        })
    }

    /// Every snapshot any of `filters` matches (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse(filters).map_err(Error::InvalidArgument)?;
        let all = self.store.list()?;
        Ok(all
            .into_iter()
            .filter(|(name, record)| {
                filters.matches(&Fields {
                    name,
                    parent: &record.parent,
                    kind: record.kind.name(),
                    labels: &record.labels,
                })
            })
            .map(|(name, record)| Info { name, record })
            .collect())
    }

    /// Local bytes only: an active snapshot's upper dir as it is now, a committed one
    /// as measured at commit; a remote snapshot has none (its files are the registry's).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.store.require(key)?;
        match (record.kind, record.usage, &record.remote) {
            (_, _, Some(_)) => Ok(Usage::default()),
            (Kind::Committed, Some(usage), None) => Ok(usage),
            _ => disk_usage(&self.layout.fs(record.id))
                .map_err(|e| Error::Internal(format!("usage of {key:?}: {e}"))),
        }
    }

    /// Removes directories no snapshot names (left by a crash or a failed removal).
    /// They are listed while no snapshot can be made: containerd calls Cleanup as its
    /// garbage collection ends, just as the Prepares that waited for it go on, and a
    /// directory made for a record not yet committed must not look unnamed (it was
    /// removed under a container starting: ENOENT on its mount).
    pub fn cleanup(&self) -> Result<()> {
        let layout = &self.layout;
        let unnamed = self
            .store
            .with_ids_held(|known| layout.unnamed_dirs(known))?
            .map_err(|e| Error::Internal(format!("{}: {e}", layout.snapshots_dir().display())))?;
        // Outside the lock: no number is given out while its directory is there (store.rs).
        for id in unnamed {
            info!("cleanup: removing snapshot directory {id}, which no snapshot names");
            self.remove_dir(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::runtime::host_mounts::HostMounts;
    use crate::runtime::stats::RuntimeStats;

    fn snapshotter(root: &Path) -> Snapshotter {
        let layout = Layout::new(root);
        std::fs::create_dir(layout.snapshots_dir()).expect("in a test");
        let store = Store::open(&layout.metadata_file()).expect("in a test");
        let mounts = HostMounts::new(
            layout.mounts_dir(),
            root.join("hosts"),
            root.join("regfs"),
            Vec::new(),
        );
        let stats = RuntimeStats::load(layout.stats_file());
        Snapshotter::new(layout, store, Remote::new(mounts, stats))
    }

    /// containerd calls Cleanup beside Prepares (as its garbage collection ends): every
    /// snapshot made meanwhile keeps the directories its mounts name.
    #[test]
    fn cleanup_beside_prepares_takes_no_snapshots_directory() {
        let root = tempfile::tempdir().expect("in a test");
        let s = snapshotter(root.path());
        let done = AtomicBool::new(false);
        let missing = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    s.cleanup().expect("in a test");
                }
            });
            // No assertion in here: the cleaner must be stopped first.
            let missing: Vec<String> = (0..50)
                .filter_map(|n| {
                    let made = s.prepare(&format!("c{n}"), "", BTreeMap::new());
                    let gone = match &made {
                        Ok(mounts) => !Path::new(&mounts[0].source).is_dir(),
                        Err(_) => true,
                    };
                    gone.then(|| format!("c{n}: {made:?}"))
                })
                .collect();
            done.store(true, Ordering::Relaxed);
            missing
        });
        assert!(missing.is_empty(), "gone: {missing:?}");
        for n in 0..50 {
            let mounts = s.mounts(&format!("c{n}")).expect("in a test");
            assert!(Path::new(&mounts[0].source).is_dir(), "c{n}");
        }
    }
}
