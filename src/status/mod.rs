//! `regfs status [MOUNTPOINT]`: what a mount is doing, for people — the registry it
//! serves, cache use against budgets, how lazy its reads are, layers being indexed,
//! fallbacks and errors — read from its `/.regfs/stats`, with `--watch` and `--json`.

mod render;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::mount::mountinfo::{MountEntry, mount_entry, regfs_mounts};

/// How long a mount may take to answer its stats before it counts as not answering.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// How a mount answered.
pub enum Health {
    /// Its stats, as JSON.
    Answering(Value),
    /// Listed as mounted, but its daemon is gone (ENOTCONN) or refuses.
    Dead(String),
    /// Listed and alive as far as the kernel knows, but no answer in time.
    Silent,
}

pub struct MountStatus {
    pub mountpoint: PathBuf,
    /// "regfs:<registry host>".
    pub source: String,
    pub health: Health,
}

/// The mounts to show: `mountpoint`, or every regfs mount of this machine's namespace.
pub fn mounts(mountpoint: Option<&Path>) -> Result<Vec<(PathBuf, MountEntry)>, String> {
    let Some(path) = mountpoint else {
        return Ok(regfs_mounts());
    };
    let canonical = path
        .canonicalize()
        .or_else(|e| match e.raw_os_error() {
            // A dead FUSE mount cannot be canonicalised through itself.
            Some(libc::ENOTCONN) => std::path::absolute(path),
            _ => Err(e),
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match mount_entry(&canonical) {
        Some(entry) if crate::mount::mountinfo::is_regfs(&entry) => Ok(vec![(canonical, entry)]),
        Some(entry) => Err(format!(
            "{} is a {} mount, not regfs",
            path.display(),
            entry.fs_type
        )),
        None => Err(format!("{} is not a mount point", path.display())),
    }
}

/// Asks a mount for its stats, on a thread of its own: a hung mount must not hang us.
pub fn probe(mountpoint: &Path, entry: &MountEntry) -> MountStatus {
    let (answer, answered) = mpsc::channel();
    let stats = mountpoint.join(".regfs/stats");
    std::thread::spawn(move || {
        let _ = answer.send(std::fs::read(&stats));
    });
    let health = match answered.recv_timeout(ANSWER_WITHIN) {
        Err(_) => Health::Silent,
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => Health::Dead(
            "its daemon is gone (transport endpoint is not connected); `regfs mount` on it \
             clears it"
                .to_owned(),
        ),
        Ok(Err(e)) => Health::Dead(format!("reading its stats: {e}")),
        Ok(Ok(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(json) => Health::Answering(json),
            Err(e) => Health::Dead(format!("its stats are not JSON: {e}")),
        },
    };
    MountStatus {
        mountpoint: mountpoint.to_owned(),
        source: entry.source.clone(),
        health,
    }
}

/// `regfs status`: prints once, or every `watch` until interrupted. Exit status 1 when a
/// mount is dead or silent (scripts can check).
pub fn run(mountpoint: Option<&Path>, json: bool, watch: Option<Duration>) -> Result<bool, String> {
    loop {
        let list = mounts(mountpoint)?;
        let statuses: Vec<MountStatus> = list.iter().map(|(p, e)| probe(p, e)).collect();
        let text = if json {
            render::json(&statuses)
        } else {
            render::text(&statuses)
        };
        let mut out = io::stdout().lock();
        if watch.is_some() && !json {
            // Clear the screen and home the cursor, as watch(1) does.
            let _ = out.write_all(b"\x1b[H\x1b[2J");
        }
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        let healthy = statuses
            .iter()
            .all(|s| matches!(s.health, Health::Answering(_)));
        match watch {
            Some(every) => std::thread::sleep(every),
            None => return Ok(healthy),
        }
    }
}
