//! `/.regfs`, regfs's own files: `stats`, the counters as JSON, made fresh at every
//! open. Opened by name only: `rsync -a` and `grep -r` of the whole mount must not pick
//! them up.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::cache::BlockCache;
use crate::fs::attr::{Attr, Kind};
use crate::fs::errno::Errno;
use crate::fs::tree::node::{ControlPath, Node, STATS};
use crate::fs::tree::open_file::Opening;
use crate::stats::Stats;

pub struct ControlFiles {
    stats: Arc<Stats>,
    cache: Arc<BlockCache>,
}

impl ControlFiles {
    pub fn new(stats: Arc<Stats>, cache: Arc<BlockCache>) -> ControlFiles {
        ControlFiles { stats, cache }
    }

    /// `/.regfs/stats`: the counters as pretty JSON.
    fn stats_json(&self) -> Bytes {
        let snapshot = self
            .stats
            .snapshot(self.cache.budget(), self.cache.block_size());
        let mut json = serde_json::to_vec_pretty(&snapshot).unwrap_or_default();
        json.push(b'\n');
        Bytes::from(json)
    }

    pub fn child(&self, path: ControlPath, name: &str) -> Result<Node, Errno> {
        match path {
            ControlPath::Dir if name == STATS => Ok(Node::Control(ControlPath::Stats)),
            ControlPath::Dir => Err(Errno::ENOENT),
            ControlPath::Stats => Err(Errno::ENOTDIR),
        }
    }

    pub fn children(&self, path: ControlPath) -> Result<Vec<(String, Node)>, Errno> {
        match path {
            ControlPath::Dir => Ok(vec![(STATS.to_owned(), Node::Control(ControlPath::Stats))]),
            ControlPath::Stats => Err(Errno::ENOTDIR),
        }
    }

    /// `ttl`: the mount's `--tag-ttl`, for the directory.
    pub fn attr(&self, path: ControlPath, ino: u64, ttl: Duration) -> Attr {
        match path {
            ControlPath::Dir => Attr::dir(ino, ttl),
            ControlPath::Stats => {
                let size = self.stats_json().len() as u64;
                let now = SystemTime::now();
                Attr::plain(ino, Kind::File, size, now, 0o444, Duration::ZERO)
            }
        }
    }

    pub fn open(&self, path: ControlPath) -> Result<Opening, Errno> {
        match path {
            ControlPath::Dir => Err(Errno::EISDIR),
            ControlPath::Stats => Ok(Opening {
                direct_io: true,
                ..Opening::bytes(self.stats_json(), false)
            }),
        }
    }
}
