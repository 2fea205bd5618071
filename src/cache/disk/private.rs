//! The cache holds what a mount fetched with its credentials (private layers and manifests
//! included), so only its owner may read it: directories 0700 and files 0600 whatever the
//! umask (docs/SEMANTICS.md, "Disk cache"). A directory found with wider modes is tightened
//! when it is ours (owned by this user, carrying regfs's CACHEDIR.TAG); otherwise regfs
//! says so and changes nothing.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;
/// Permission bits that let other users (group or world) in.
const OTHERS: u32 = 0o077;

/// `mkdir -p` with mode 0700 for every directory it makes.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Options that create files 0600.
pub fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Writes a small file, created 0600.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)
}

/// How open a cache directory is to other users.
#[derive(Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Only its owner can enter it.
    Private,
    /// It was open to others and was ours: `n` directories and files were tightened.
    Tightened(usize),
    /// Open to others and not ours to change: what to tell the user.
    Exposed(String),
}

/// Checks `root` (which exists) and tightens it and everything under it when it is open
/// to others and ours (`tagged`: it carries regfs's CACHEDIR.TAG). Entries written by an
/// older regfs (0755 / 0644) are the usual case.
pub fn secure(root: &Path, tagged: bool) -> io::Result<Exposure> {
    match judge(root, tagged)? {
        Judgement::Private => Ok(Exposure::Private),
        Judgement::Ours => Ok(Exposure::Tightened(tighten(root)?)),
        Judgement::NotOurs(why) => Ok(Exposure::Exposed(why)),
    }
}

/// What `regfs cache du` says about `root`'s modes, changing nothing: None when private.
pub fn report(root: &Path, tagged: bool) -> Option<String> {
    match judge(root, tagged).ok()? {
        Judgement::Private => None,
        Judgement::Ours => Some(format!(
            "{} is open to other users; the next mount makes it private (0700/0600)",
            root.display()
        )),
        Judgement::NotOurs(why) => Some(why),
    }
}

enum Judgement {
    Private,
    Ours,
    NotOurs(String),
}

fn judge(root: &Path, tagged: bool) -> io::Result<Judgement> {
    let meta = fs::metadata(root)?;
    if meta.mode() & OTHERS == 0 {
        return Ok(Judgement::Private);
    }
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || !tagged {
        let whose = if meta.uid() != me {
            format!("owned by uid {}, not {me}", meta.uid())
        } else {
            "it has no CACHEDIR.TAG of regfs's".to_owned()
        };
        return Ok(Judgement::NotOurs(format!(
            "disk cache {} is open to other users (mode {mode:04o}) and regfs leaves it as it \
             is ({whose}): other local users may read what this mount caches from the \
             registry; chmod -R go-rwx it, or choose another --cache-dir",
            root.display()
        )));
    }
    Ok(Judgement::Ours)
}

/// Takes group and world bits off `path` and everything under it (symlinks are not
/// followed: the cache makes none). Returns how many entries changed.
fn tighten(path: &Path) -> io::Result<usize> {
    let meta = fs::symlink_metadata(path)?;
    let mut changed = 0;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            changed += tighten(&entry?.path())?;
        }
    } else if !meta.is_file() {
        return Ok(0);
    }
    if meta.mode() & OTHERS != 0 {
        let mode = meta.mode() & 0o7777 & !OTHERS;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn made_private_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).expect("mkdir");
        write(&nested.join("f"), b"x").expect("write");
        unsafe { libc::umask(old) };
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&nested.join("f")), 0o600);
    }

    #[test]
    fn an_open_cache_of_ours_is_tightened_and_a_foreign_one_is_only_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        fs::create_dir_all(root.join("blobs")).expect("mkdir");
        fs::write(root.join("blobs/x"), b"secret").expect("write");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(root.join("blobs"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(root.join("blobs/x"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        // No CACHEDIR.TAG: not known to be regfs's.
        assert!(matches!(secure(&root, false), Ok(Exposure::Exposed(_))));
        assert_eq!(mode(&root), 0o755);
        fs::write(root.join("CACHEDIR.TAG"), b"regfs").expect("tag");
        assert!(matches!(secure(&root, true), Ok(Exposure::Tightened(n)) if n >= 3));
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("blobs")), 0o700);
        assert_eq!(mode(&root.join("blobs/x")), 0o600);
        assert_eq!(secure(&root, true).expect("secure"), Exposure::Private);
    }
}
