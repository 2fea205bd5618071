//! Snapshot metadata in one redb file under the snapshotter's root: what each key is
//! (kind, parent, labels, times, the number of its directory), kept across restarts.
//! Every change is one write transaction, so a crash leaves the old or the new state
//! and at worst a directory no record names (removed by Cleanup).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Snapshot key → its record (JSON).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "next_id" → the number the next snapshot's directory gets.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// How many numbers a create skips, at most, for directories left behind.
const MAX_SKIPPED_IDS: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Seconds and nanoseconds since the epoch, as protobuf's Timestamp has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub seconds: i64,
    pub nanos: i32,
}

impl Time {
    pub fn now() -> Time {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        }
    }
}

/// Bytes and inodes a snapshot takes on the local disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Where a remote snapshot's files are: a layer of an image, served by the regfs mount
/// of the registry host (see remote.rs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The registry host as the image reference names it ("host[:port]").
    pub host: String,
    pub repo: String,
    /// The layer's digest.
    pub layer: String,
    /// The image manifest that lists the layer, where the labels named it.
    pub manifest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory, `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// The parent's key; empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: Time,
    pub updated: Time,
    /// Measured at commit (a committed snapshot no longer changes).
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Set for a remote snapshot: its files are a regfs layer directory.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

/// Errors as containerd's errdefs classes them (service.rs maps them to gRPC codes).
#[derive(Debug)]
pub enum Error {
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    InvalidArgument(String),
    Internal(String),
}

impl Error {
    fn internal(e: impl std::fmt::Display) -> Error {
        Error::Internal(format!("metadata store: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct Store {
    db: Database,
}

/// A new snapshot, before it has a number.
pub struct NewSnapshot<'a> {
    pub key: &'a str,
    pub parent: &'a str,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub remote: Option<RemoteLayer>,
}

impl Store {
    /// Opens (or creates) the store. redb locks the file: a second snapshotter on the
    /// same root is refused here.
    pub fn open(path: &Path) -> std::result::Result<Store, String> {
        let db = Database::create(path)
            .map_err(|e| format!("cannot open the metadata store {}: {e}", path.display()))?;
        let store = Store { db };
        store
            .write(|tx| {
                tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
                tx.open_table(COUNTERS).map_err(Error::internal)?;
                Ok(())
            })
            .map_err(|e| format!("{e:?}"))?;
        Ok(store)
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write().map_err(Error::internal)?;
        let out = f(&tx)?;
        tx.commit().map_err(Error::internal)?;
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read().map_err(Error::internal)?;
        let table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
        let value = table.get(key).map_err(Error::internal)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// The record of `key`, or NotFound.
    pub fn require(&self, key: &str) -> Result<Record> {
        self.get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
    }

    /// Every snapshot, in key order.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read().map_err(Error::internal)?;
        let table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(Error::internal)? {
            let (key, value) = entry.map_err(Error::internal)?;
            out.push((key.value().to_owned(), decode(value.value())?));
        }
        Ok(out)
    }

    /// The records from `key`'s parent down to the root, nearest first.
    pub fn ancestors(&self, record: &Record) -> Result<Vec<Record>> {
        let mut out: Vec<Record> = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let next = self.get(&parent)?.ok_or_else(|| {
                Error::Internal(format!("metadata store: parent {parent:?} is missing"))
            })?;
            parent.clone_from(&next.parent);
            out.push(next);
        }
        Ok(out)
    }

    /// Adds a snapshot. `make_dirs` runs inside the transaction with the new number,
    /// so a record never names a directory that was not made. A number whose directory
    /// is already there (left by a create that never committed: a crash, a failed
    /// bind) is skipped, never reused: Cleanup may be removing that directory now.
    /// `make_dirs` says so with ErrorKind::AlreadyExists.
    pub fn create(
        &self,
        new: NewSnapshot,
        make_dirs: impl FnMut(u64) -> std::io::Result<()>,
    ) -> Result<Record> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
            if table.get(new.key).map_err(Error::internal)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists",
                    new.key
                )));
            }
            check_parent(&table, new.parent)?;
            let id = claim_id(tx, make_dirs)?;
            let now = Time::now();
            let record = Record {
                id,
                kind: new.kind,
                parent: new.parent.to_owned(),
                labels: new.labels,
                created: now,
                updated: now,
                usage: None,
                remote: new.remote,
            };
            table
                .insert(new.key, encode(&record)?.as_slice())
                .map_err(Error::internal)?;
            Ok(record)
        })
    }

    /// Runs `scan` with the directory number of every snapshot, holding the store's
    /// write lock and writing nothing: no snapshot is made or removed meanwhile, so a
    /// directory `scan` finds that `ids` lacks belongs to no snapshot, and not to one
    /// whose directory is made but whose record is not yet committed.
    pub fn with_ids_held<T>(&self, scan: impl FnOnce(&HashSet<u64>) -> T) -> Result<T> {
        let tx = self.db.begin_write().map_err(Error::internal)?;
        let ids = {
            let table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
            let mut ids = HashSet::new();
            for entry in table.iter().map_err(Error::internal)? {
                let (_, value) = entry.map_err(Error::internal)?;
                ids.insert(decode(value.value())?.id);
            }
            ids
        };
        let out = scan(&ids);
        tx.abort().map_err(Error::internal)?;
        Ok(out)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Record> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
            let Some(active) = table.get(key).map_err(Error::internal)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let mut record = decode(active.value())?;
            drop(active);
            if record.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if table.get(name).map_err(Error::internal)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists"
                )));
            }
            let now = Time::now();
            record.kind = Kind::Committed;
            record.labels = labels;
            record.created = now;
            record.updated = now;
            record.usage = Some(usage);
            table.remove(key).map_err(Error::internal)?;
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(Error::internal)?;
            Ok(record)
        })
    }

    /// Removes `key`, unless another snapshot names it as parent.
    pub fn remove(&self, key: &str) -> Result<Record> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
            let Some(value) = table.get(key).map_err(Error::internal)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let record = decode(value.value())?;
            drop(value);
            for entry in table.iter().map_err(Error::internal)? {
                let (child, value) = entry.map_err(Error::internal)?;
                if decode(value.value())?.parent == key {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: {:?} is its child",
                        child.value()
                    )));
                }
            }
            table.remove(key).map_err(Error::internal)?;
            Ok(record)
        })
    }

    /// Changes the labels of `key`: all of them (no paths, or "labels"), or the
    /// `labels.<name>` paths given (a name absent from `labels` is removed). Any other
    /// path is InvalidArgument: nothing else of a snapshot may change.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        self.write(|tx| {
            let mut table = tx.open_table(SNAPSHOTS).map_err(Error::internal)?;
            let Some(value) = table.get(key).map_err(Error::internal)? else {
                return Err(Error::NotFound(format!("snapshot {key:?} does not exist")));
            };
            let mut record = decode(value.value())?;
            drop(value);
            record.labels = updated_labels(record.labels, labels, paths)?;
            record.updated = Time::now();
            table
                .insert(key, encode(&record)?.as_slice())
                .map_err(Error::internal)?;
            Ok(record)
        })
    }
}

fn updated_labels(
    mut current: BTreeMap<String, String>,
    mut given: BTreeMap<String, String>,
    paths: &[String],
) -> Result<BTreeMap<String, String>> {
    if paths.is_empty() || paths.iter().any(|p| p == "labels") {
        if let Some(bad) = paths.iter().find(|p| *p != "labels") {
            return Err(Error::InvalidArgument(format!(
                "cannot update {bad:?} of a snapshot"
            )));
        }
        return Ok(given);
    }
    for path in paths {
        let Some(name) = path.strip_prefix("labels.") else {
            return Err(Error::InvalidArgument(format!(
                "cannot update {path:?} of a snapshot"
            )));
        };
        match given.remove(name) {
            Some(value) => current.insert(name.to_owned(), value),
            None => current.remove(name),
        };
    }
    Ok(current)
}

fn check_parent(table: &redb::Table<&str, &[u8]>, parent: &str) -> Result<()> {
    if parent.is_empty() {
        return Ok(());
    }
    let Some(value) = table.get(parent).map_err(Error::internal)? else {
        return Err(Error::NotFound(format!(
            "parent snapshot {parent:?} does not exist"
        )));
    };
    if decode(value.value())?.kind != Kind::Committed {
        return Err(Error::InvalidArgument(format!(
            "parent {parent:?} is not a committed snapshot"
        )));
    }
    Ok(())
}

/// The counter's number, or the first after it whose directory `make_dirs` can make;
/// the counter then moves past it.
fn claim_id(
    tx: &redb::WriteTransaction,
    mut make_dirs: impl FnMut(u64) -> std::io::Result<()>,
) -> Result<u64> {
    let mut counters = tx.open_table(COUNTERS).map_err(Error::internal)?;
    let first = counters
        .get("next_id")
        .map_err(Error::internal)?
        .map_or(1, |v| v.value());
    for id in first..first.saturating_add(MAX_SKIPPED_IDS) {
        match make_dirs(id) {
            Ok(()) => {
                counters
                    .insert("next_id", id + 1)
                    .map_err(Error::internal)?;
                return Ok(id);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Internal(format!("snapshot directory: {e}"))),
        }
    }
    Err(Error::Internal(format!(
        "snapshot directory: the {MAX_SKIPPED_IDS} numbers from {first} are all taken by \
         directories no snapshot names (Cleanup removes them)"
    )))
}

fn encode(record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(Error::internal)
}

fn decode(bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(Error::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(key: &str, parent: &str, kind: Kind) -> NewSnapshot<'static> {
        NewSnapshot {
            key: key.to_owned().leak(),
            parent: parent.to_owned().leak(),
            kind,
            labels: BTreeMap::new(),
            remote: None,
        }
    }

    #[test]
    fn survives_reopening_and_keeps_the_rules() {
        let dir = tempfile::tempdir().expect("in a test");
        let path = dir.path().join("metadata.redb");
        {
            let store = Store::open(&path).expect("in a test");
            let a = store
                .create(new("a", "", Kind::Active), |_| Ok(()))
                .expect("in a test");
            assert!(matches!(
                store.create(new("a", "", Kind::Active), |_| Ok(())),
                Err(Error::AlreadyExists(_))
            ));
            assert!(matches!(
                store.create(new("b", "a", Kind::View), |_| Ok(())),
                Err(Error::InvalidArgument(_))
            ));
            let c = store
                .commit("c", "a", BTreeMap::new(), Usage::default())
                .expect("in a test");
            assert_eq!(c.id, a.id);
            store
                .create(new("d", "c", Kind::Active), |_| Ok(()))
                .expect("in a test");
            assert!(matches!(
                store.remove("c"),
                Err(Error::FailedPrecondition(_))
            ));
        }
        let store = Store::open(&path).expect("in a test");
        let keys: Vec<String> = store
            .list()
            .expect("in a test")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["c", "d"]);
        let d = store.require("d").expect("in a test");
        assert_eq!(store.ancestors(&d).expect("in a test").len(), 1);
        assert!(d.id > store.require("c").expect("in a test").id);
    }

    #[test]
    fn label_updates_follow_the_paths() {
        let current: BTreeMap<String, String> = [("l1", "v1"), ("l2", "v2"), ("l3", "v3")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let given: BTreeMap<String, String> = [("l1", "new"), ("l4", "v4")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let paths = ["labels.l1".to_string(), "labels.l2".to_string()];
        let out = updated_labels(current.clone(), given.clone(), &paths).expect("in a test");
        assert_eq!(out.len(), 2);
        assert_eq!(out["l1"], "new");
        assert_eq!(out["l3"], "v3");
        assert_eq!(
            updated_labels(current.clone(), given.clone(), &[]).expect("in a test"),
            given
        );
        assert!(matches!(
            updated_labels(current, given, &["parent".to_string()]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_number_whose_directory_is_left_is_skipped() {
        let dir = tempfile::tempdir().expect("in a test");
        let store = Store::open(&dir.path().join("metadata.redb")).expect("in a test");
        // A failed create leaves the counter where it was.
        assert!(matches!(
            store.create(new("a", "", Kind::Active), |_| Err(std::io::Error::other(
                "full"
            ))),
            Err(Error::Internal(_))
        ));
        // Its directory is still there (a crash, or Cleanup has not removed it yet).
        let left = |id: u64| {
            if id == 1 {
                Err(std::io::ErrorKind::AlreadyExists.into())
            } else {
                Ok(())
            }
        };
        let a = store
            .create(new("a", "", Kind::Active), left)
            .expect("in a test");
        assert_eq!(a.id, 2);
        let b = store
            .create(new("b", "", Kind::Active), |_| Ok(()))
            .expect("in a test");
        assert_eq!(b.id, 3);
        let taken = store.create(new("c", "", Kind::Active), |_| {
            Err(std::io::ErrorKind::AlreadyExists.into())
        });
        assert!(matches!(taken, Err(Error::Internal(_))));
    }

    /// The scan under the write lock sees a create that had made its directory but not
    /// committed its record as committed, never as a directory without a record.
    #[test]
    fn a_scan_waits_for_a_create_in_progress() {
        let dir = tempfile::tempdir().expect("in a test");
        let store = Store::open(&dir.path().join("metadata.redb")).expect("in a test");
        let made = dir.path().join("made");
        let (dirs_made, wait) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                store
                    .create(new("a", "", Kind::Active), |id| {
                        std::fs::write(&made, id.to_string())?;
                        let _ = dirs_made.send(());
                        // Holds the transaction open, as a slow mkdir or bind would.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        Ok(())
                    })
                    .expect("in a test");
            });
            wait.recv().expect("in a test");
            let unnamed = store
                .with_ids_held(|ids| {
                    let id: u64 = std::fs::read_to_string(&made)
                        .expect("in a test")
                        .parse()
                        .expect("in a test");
                    !ids.contains(&id)
                })
                .expect("in a test");
            assert!(
                !unnamed,
                "the directory of a create in progress looked unnamed"
            );
        });
    }
}
