//! A blob as the read path sees it: which blob, and its bytes as consecutive blocks.

use bytes::{Bytes, BytesMut};

use crate::registry::{Digest, RepoName};

/// One blob, as each stage of the read path needs to know it.
#[derive(Clone, Copy)]
pub struct BlobAt<'a> {
    pub repo: &'a RepoName,
    pub digest: &'a Digest,
    pub size: u64,
}

/// Bytes `offset..end` of a blob, from its consecutive blocks starting at blob offset
/// `start` (a slice of the block when one is enough, no copy).
pub fn join_blocks(blocks: &[Bytes], start: u64, offset: u64, end: u64) -> Bytes {
    if let [block] = blocks {
        let from = (offset - start) as usize;
        return block.slice(from..from + (end - offset) as usize);
    }
    let mut out = BytesMut::with_capacity((end - offset) as usize);
    let mut block_start = start;
    for block in blocks {
        let from = offset.saturating_sub(block_start) as usize;
        let to = (end - block_start).min(block.len() as u64) as usize;
        out.extend_from_slice(&block[from..to]);
        block_start += block.len() as u64;
    }
    out.freeze()
}
