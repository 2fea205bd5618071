//! What the snapshotter keeps under its root came from registries or names their
//! images (snapshot labels, stats, the mounts' logs, CA bundles): only root may read
//! it, directories 0700 and files 0600 whatever the umask, and entries an older
//! version left wider are tightened (docs/SEMANTICS.md, "Container runtimes"). The
//! snapshot directories containers use keep the modes containers need (overlay.rs).

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::cache::disk::private::{self, DIR_MODE, FILE_MODE};

/// `mkdir -p` of `dir` (0700), and `dir` itself 0700 if it was there already.
pub fn dir(dir: &Path) -> Result<(), String> {
    private::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)))
        .map_err(|e| format!("cannot make {} private: {e}", dir.display()))
}

/// Creates `file` (0600) if it is missing, else makes it 0600; its contents stay.
pub fn file(file: &Path) -> Result<(), String> {
    private::options()
        .append(true)
        .create(true)
        .open(file)
        .and_then(|_| std::fs::set_permissions(file, Permissions::from_mode(FILE_MODE)))
        .map_err(|e| format!("cannot make {} private: {e}", file.display()))
}

/// Replaces `file` with `bytes` at once (a new file, 0600, renamed over it).
pub fn replace(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    // One left by a crash may be wider: a new file gets the mode.
    let _ = std::fs::remove_file(tmp);
    let mut out = private::options().write(true).create_new(true).open(tmp)?;
    out.write_all(bytes)?;
    drop(out);
    std::fs::rename(tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("in a test").mode() & 0o7777
    }

    #[test]
    fn wider_entries_are_tightened_and_new_ones_private() {
        let root = tempfile::tempdir().expect("in a test");
        let d = root.path().join("logs");
        std::fs::create_dir(&d).expect("in a test");
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).expect("in a test");
        dir(&d).expect("in a test");
        assert_eq!(mode(&d), 0o700);
        let f = d.join("host.log");
        std::fs::write(&f, b"kept").expect("in a test");
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).expect("in a test");
        file(&f).expect("in a test");
        assert_eq!(
            (mode(&f), std::fs::read(&f).expect("in a test")),
            (0o600, b"kept".to_vec())
        );
        let stats = d.join("stats.json");
        replace(&stats, b"{}").expect("in a test");
        replace(&stats, b"{\"a\":1}").expect("in a test");
        assert_eq!(mode(&stats), 0o600);
        assert_eq!(std::fs::read(&stats).expect("in a test"), b"{\"a\":1}");
    }
}
