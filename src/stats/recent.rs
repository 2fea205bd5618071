//! Bytes fetched against bytes read, per blob file and per image, for the objects read
//! most recently: what `regfs status` shows so that whether a read was lazy is plain
//! at a glance (a 200 MiB image of which 3 MiB were fetched for 1 MiB read).
//!
//! Fetched bytes are counted per blob as they arrive from the registry (whatever asked
//! for them: a read, an index pass, a background fetch); an image's are the sum over
//! its layers' blobs. Read bytes are what programs read through the mount.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;
use serde::Serialize;

/// Blobs whose fetched bytes are remembered (the least recently fetched are forgotten).
const BLOBS: usize = 4096;
/// Objects listed, the most recently read first.
const SHOWN: usize = 8;

/// Something programs read: a blob file, or the files of an image (its layers' blobs).
#[derive(Debug)]
pub struct RecentObject {
    /// "blob" or "image".
    pub kind: &'static str,
    /// How the user reached it: `team/app@sha256:…`, `team/app:v1`.
    pub name: String,
    /// Bytes of the blob, or of the image's layer blobs.
    pub size: u64,
    /// The digests whose fetched bytes are this object's.
    pub blobs: Vec<String>,
}

/// The recent objects of a mount.
pub struct Recent {
    fetched: Mutex<LruCache<String, u64>>,
    read: Mutex<LruCache<String, (Arc<RecentObject>, u64)>>,
}

impl Default for Recent {
    fn default() -> Recent {
        Recent {
            fetched: Mutex::new(LruCache::new(capacity(BLOBS))),
            read: Mutex::new(LruCache::new(capacity(SHOWN))),
        }
    }
}

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One object as `/.regfs/stats` lists it.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct RecentSnapshot {
    pub kind: &'static str,
    pub name: String,
    pub size: u64,
    pub fetched: u64,
    pub read: u64,
}

impl Recent {
    /// `n` bytes of blob `digest` arrived from the registry.
    pub fn fetched(&self, digest: &str, n: u64) {
        let mut fetched = lock(&self.fetched);
        match fetched.get_mut(digest) {
            Some(total) => *total += n,
            None => {
                fetched.put(digest.to_owned(), n);
            }
        }
    }

    /// A program read `n` bytes of `object`.
    pub fn read(&self, object: &Arc<RecentObject>, n: u64) {
        let mut read = lock(&self.read);
        match read.get_mut(&object.name) {
            Some((_, total)) => *total += n,
            None => {
                read.put(object.name.clone(), (object.clone(), n));
            }
        }
    }

    /// The objects read most recently, the latest first.
    pub fn snapshot(&self) -> Vec<RecentSnapshot> {
        let read: Vec<(Arc<RecentObject>, u64)> = lock(&self.read)
            .iter()
            .map(|(_, (o, n))| (o.clone(), *n))
            .collect();
        let fetched = lock(&self.fetched);
        read.into_iter()
            .map(|(o, n)| RecentSnapshot {
                kind: o.kind,
                name: o.name.clone(),
                size: o.size,
                fetched: o.blobs.iter().filter_map(|b| fetched.peek(b)).sum(),
                read: n,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &'static str, name: &str, blobs: &[&str]) -> Arc<RecentObject> {
        Arc::new(RecentObject {
            kind,
            name: name.into(),
            size: 100,
            blobs: blobs.iter().map(|b| (*b).to_owned()).collect(),
        })
    }

    #[test]
    fn an_image_sums_its_layers_and_the_latest_read_comes_first() {
        let recent = Recent::default();
        let blob = object("blob", "r@a", &["a"]);
        let image = object("image", "r:v1", &["a", "b"]);
        recent.fetched("a", 10);
        recent.fetched("b", 5);
        recent.fetched("a", 1);
        recent.read(&blob, 3);
        recent.read(&image, 4);
        recent.read(&image, 4);
        let shown = recent.snapshot();
        assert_eq!(shown.len(), 2);
        assert_eq!(
            (shown[0].name.as_str(), shown[0].fetched, shown[0].read),
            ("r:v1", 16, 8)
        );
        assert_eq!(
            (shown[1].name.as_str(), shown[1].fetched, shown[1].read),
            ("r@a", 11, 3)
        );
    }

    #[test]
    fn only_the_most_recent_objects_are_listed() {
        let recent = Recent::default();
        for i in 0..20 {
            recent.read(&object("blob", &format!("r@{i}"), &[]), 1);
        }
        let shown = recent.snapshot();
        assert_eq!(shown.len(), SHOWN);
        assert_eq!(shown[0].name, "r@19");
    }
}
