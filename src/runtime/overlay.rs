//! Where snapshots live on disk and the mounts containerd is handed for them, as
//! containerd's own overlayfs snapshotter does it: `<root>/snapshots/<id>/fs` holds a
//! snapshot's files (for a remote snapshot, a bind mount of its regfs layer
//! directory), `<root>/snapshots/<id>/work` is overlayfs's work dir. Each lower dir
//! is such a short path of its own: containerd 1.6 splits `lowerdir` on ':' once the
//! options near a page, so no path may carry a ':' (a digest would).

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::store::{Kind, Usage};

/// One mount(2) call for containerd to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The snapshotter's directories.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
        }
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// A snapshot's files (the upper dir of an active snapshot).
    pub fn fs(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Where the per-host regfs mounts are.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mounts")
    }

    pub fn metadata_file(&self) -> PathBuf {
        self.root.join("metadata.redb")
    }

    pub fn stats_file(&self) -> PathBuf {
        self.root.join("stats.json")
    }

    /// Makes `<id>/fs` (mode 0755, as containerd's suite checks) and, for an active
    /// snapshot, `<id>/work`. AlreadyExists when `<id>` is there already (left by a
    /// create that never committed): it is not made over, the store skips the number.
    pub fn make_dirs(&self, id: u64, kind: Kind) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(self.snapshot_dir(id))?;
        std::fs::DirBuilder::new().mode(0o755).create(self.fs(id))?;
        // umask may have taken bits away.
        std::fs::set_permissions(
            self.fs(id),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        if kind == Kind::Active {
            std::fs::DirBuilder::new()
                .mode(0o711)
                .create(self.work(id))?;
        }
        Ok(())
    }

    /// The snapshot directories whose number is not in `known`.
    pub fn unnamed_dirs(&self, known: &HashSet<u64>) -> std::io::Result<Vec<u64>> {
        let entries = match std::fs::read_dir(self.snapshots_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let names = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok());
        Ok(unnamed(known, names))
    }

    /// The mounts of snapshot `id` of `kind` over `parents` (their ids, nearest first).
    pub fn mounts(&self, id: u64, kind: Kind, parents: &[u64]) -> Vec<Mount> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        if parents.is_empty() {
            let mode = if kind == Kind::View { "ro" } else { "rw" };
            return vec![Mount {
                kind: "bind".into(),
                source: path(self.fs(id)),
                options: vec![mode.into(), "rbind".into()],
            }];
        }
        if kind != Kind::Active && parents.len() == 1 {
            return vec![Mount {
                kind: "bind".into(),
                source: path(self.fs(parents[0])),
                options: vec!["ro".into(), "rbind".into()],
            }];
        }
        let mut options = Vec::new();
        if kind == Kind::Active {
            options.push(format!("workdir={}", path(self.work(id))));
            options.push(format!("upperdir={}", path(self.fs(id))));
        }
        let lower: Vec<String> = parents.iter().map(|&p| path(self.fs(p))).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }
}

/// The numbers among directory `names` that are not in `known`; other names are not
/// the snapshotter's and stay.
fn unnamed(known: &HashSet<u64>, names: impl Iterator<Item = String>) -> Vec<u64> {
    let mut ids: Vec<u64> = names
        .filter_map(|name| name.parse::<u64>().ok())
        .filter(|id| !known.contains(id))
        .collect();
    ids.sort_unstable();
    ids
}

/// Bytes (allocated blocks) and inodes under `dir`, each inode once, not crossing into
/// other filesystems: a remote snapshot's bind mount of a regfs directory is never
/// walked (CRI asks for usage of every snapshot, often).
pub fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let top = std::fs::symlink_metadata(dir)?;
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut pending = vec![dir.to_owned()];
    let mut count = |meta: &std::fs::Metadata, usage: &mut Usage| {
        if seen.insert(meta.ino()) {
            usage.inodes += 1;
            usage.size += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        }
    };
    count(&top, &mut usage);
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.dev() != top.dev() {
                continue;
            }
            count(&meta, &mut usage);
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_as_containerd_overlayfs_makes_them() {
        let layout = Layout::new(Path::new("/r"));
        assert_eq!(
            layout.mounts(1, Kind::Active, &[]),
            vec![Mount {
                kind: "bind".into(),
                source: "/r/snapshots/1/fs".into(),
                options: vec!["rw".into(), "rbind".into()],
            }]
        );
        assert_eq!(
            layout.mounts(3, Kind::View, &[2])[0].source,
            "/r/snapshots/2/fs"
        );
        let active = layout.mounts(4, Kind::Active, &[3, 2]);
        assert_eq!(active[0].kind, "overlay");
        assert_eq!(
            active[0].options,
            [
                "workdir=/r/snapshots/4/work",
                "upperdir=/r/snapshots/4/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs",
            ]
        );
        let view = layout.mounts(5, Kind::View, &[3, 2]);
        assert_eq!(
            view[0].options,
            ["lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
    }

    #[test]
    fn unnamed_directories_are_numbers_no_record_has() {
        let known: HashSet<u64> = [1, 3].into();
        let names = ["1", "2", "3", "10", "new-x", "007x"].map(String::from);
        assert_eq!(unnamed(&known, names.into_iter()), [2, 10]);
    }

    #[test]
    fn a_directory_left_behind_is_not_made_over() {
        let root = tempfile::tempdir().expect("in a test");
        let layout = Layout::new(root.path());
        std::fs::create_dir(layout.snapshots_dir()).expect("in a test");
        layout.make_dirs(1, Kind::Active).expect("in a test");
        let again = layout.make_dirs(1, Kind::Active).expect_err("in a test");
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        let known: HashSet<u64> = HashSet::new();
        assert_eq!(layout.unnamed_dirs(&known).expect("in a test"), [1]);
    }

    #[test]
    fn usage_counts_hardlinks_once() {
        let dir = tempfile::tempdir().expect("in a test");
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).expect("in a test");
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).expect("in a test");
        std::fs::create_dir(dir.path().join("d")).expect("in a test");
        let usage = disk_usage(dir.path()).expect("in a test");
        assert_eq!(usage.inodes, 3);
        assert!(usage.size >= 10_000);
    }
}
