//! What an open file reads from, as the area of the tree that opened it decided.

use std::sync::Arc;

use bytes::Bytes;

use crate::fs::blob::OpenBlob;
use crate::fs::images::ImageTree;
use crate::fs::write::WrittenFile;
use crate::stats::RecentObject;

/// An open file: its bytes, fixed at open (a tag that moves does not change an open
/// file), or what it reads from or writes to.
#[derive(Clone)]
pub enum OpenFile {
    Bytes(Bytes),
    Blob(Arc<OpenBlob>),
    /// A file being written (docs/SEMANTICS.md, "Writes").
    Write(Arc<WrittenFile>),
    /// A file of an image: node `id` of its tree, and what its reads are counted as.
    Image(Arc<ImageTree>, u32, Arc<RecentObject>),
}

/// An open as an area of the tree answers it, before it is given a handle.
pub struct Opening {
    pub file: OpenFile,
    /// Whether the kernel may keep cached pages from an earlier open (immutable content).
    pub keep_cache: bool,
    /// Whether every read must come here, past the kernel's page cache and its idea of
    /// the file size (files made fresh at each open, like `/.regfs/stats`).
    pub direct_io: bool,
    /// The content as a local file (a verified blob in the disk cache): the kernel may
    /// read it directly (FUSE passthrough) instead of asking here.
    pub local_file: Option<std::fs::File>,
}

impl Opening {
    /// Bytes fixed at open; `keep_cache` if they are the same at every open.
    pub fn bytes(bytes: Bytes, keep_cache: bool) -> Opening {
        Opening::of(OpenFile::Bytes(bytes), keep_cache)
    }

    pub fn of(file: OpenFile, keep_cache: bool) -> Opening {
        Opening {
            file,
            keep_cache,
            direct_io: false,
            local_file: None,
        }
    }
}

/// An open file as the front end sees it: its handle, and how the kernel may treat it.
pub struct Opened {
    pub fh: u64,
    /// Whether the kernel may keep cached pages from an earlier open (immutable content).
    pub keep_cache: bool,
    /// Whether every read must come here, past the kernel's page cache and its idea of
    /// the file size (files made fresh at each open, like `/.regfs/stats`).
    pub direct_io: bool,
    /// The content as a local file (a verified blob in the disk cache): the kernel may
    /// read it directly (FUSE passthrough) instead of asking here.
    pub local_file: Option<std::fs::File>,
}
