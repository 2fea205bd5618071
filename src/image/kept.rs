//! Decoded file contents kept in the disk cache (docs/SEMANTICS.md, "Disk cache";
//! ARCHITECTURE.md, "A file inside an image"), so that a file read once is read on the
//! next mount, over the same cache, without fetching or decoding again: at local speed,
//! as from an unpacked root filesystem.
//!
//! A file is read in blocks of [`FILE_BLOCK`]: from the piece cache, else the disk,
//! else decoded (content.rs) and then kept in both. A file is named by its layer's
//! content (the blob, and the TOC its manifest announced) and its place in the layer,
//! so the same file of the same layer is found by every mount. What is kept stays with
//! this registry until the layer has been verified whole against its digest (a pass, or
//! a background fill); then it is shared by every registry.

use std::fs::File;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};

use super::entry::{DataRef, Entry};
use crate::cache::disk::FILE_BLOCK;
use crate::cache::{BlockCache, DiskCache};
use crate::registry::{Digest, Result};
use crate::stats::Stats;

/// The decoded files of one layer in the disk cache.
pub struct KeptFiles {
    pub disk: DiskCache,
    /// Names the layer's content: the digest of its blob and announced TOC.
    pub layer: Digest,
    /// Whether the layer's blob has been verified whole (then files are shared).
    pub whole: Arc<AtomicBool>,
}

impl KeptFiles {
    /// The name of `entry`'s decoded content: its layer's, and where its data is.
    fn key(&self, entry: &Entry) -> Option<Digest> {
        let at = match &entry.data {
            DataRef::None => return None,
            DataRef::Stream(at) => format!("stream {at}"),
            DataRef::Chunks(range) => format!("chunks {}", range.start),
        };
        let name = format!("regfs decoded file v1 {} {at} {}", self.layer, entry.size);
        Some(Digest::sha256_of(name.as_bytes()))
    }

    /// Bytes `offset..offset + len` of `entry` (within it); `decode(start, len)` makes
    /// those of a block not kept anywhere.
    pub async fn read<F, Fut>(
        &self,
        pieces: &BlockCache,
        stats: &Stats,
        entry: &Entry,
        (offset, len): (u64, u64),
        decode: F,
    ) -> Result<Bytes>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        let Some(key) = self.key(entry) else {
            return decode(offset, len).await;
        };
        let end = offset + len;
        let (first, last) = (offset / FILE_BLOCK, (end - 1) / FILE_BLOCK);
        let mut out = BytesMut::new();
        for i in first..=last {
            let start = i * FILE_BLOCK;
            let block_len = FILE_BLOCK.min(entry.size - start);
            let block = pieces
                .get(&(key.clone(), i), || async {
                    let buffer = pieces.buffer(block_len as usize);
                    if let Some(kept) = self.disk.file_block(&key, entry.size, i, buffer).await {
                        Stats::add(&stats.decoded_from_disk, kept.len() as u64);
                        return Ok(kept);
                    }
                    let decoded = decode(start, block_len).await?;
                    let shared = self.whole.load(Ordering::Acquire);
                    self.disk.store_file_block(&key, i, decoded.clone(), shared);
                    Ok(decoded)
                })
                .await?;
            let from = (offset.max(start) - start) as usize;
            let to = ((end.min(start + block_len) - start) as usize).min(block.len());
            if first == last {
                return Ok(block.slice(from.min(to)..to));
            }
            out.extend_from_slice(&block[from.min(to)..to]);
        }
        Ok(out.freeze())
    }

    /// `entry`'s content as a local file, if it is kept whole and intact: the kernel
    /// may read it directly (FUSE passthrough).
    pub async fn local_file(&self, entry: &Entry) -> Option<File> {
        let key = self.key(entry)?;
        self.disk.whole_file(&key, entry.size).await
    }
}
