//! Block buffers: page-aligned memory that goes back to a pool when its last holder lets
//! go.
//!
//! A cold sequential read fills a fresh block every millisecond or so. Allocated anew,
//! each block costs page faults and the kernel's zeroing of its pages (a tenth of the
//! daemon's CPU in a profile of a cold read); recycled only when the cache evicts it and
//! nobody else holds it, a block the disk writer or a FUSE reply still held was lost to
//! the allocator. Here a block's memory returns to the pool whoever drops it last (the
//! cache, the kernel reply, the disk writer), and the next block reuses it.
//!
//! Page alignment lets the disk cache write a block with `O_DIRECT` straight from the
//! buffer, without a bounce copy.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// The unit of alignment: `O_DIRECT` wants buffer addresses, lengths and offsets to be
/// multiples of it.
pub const PAGE: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub struct Page(pub [u8; PAGE]);

/// The pages as bytes.
pub fn page_bytes(pages: &[Page]) -> &[u8] {
    // SAFETY: `Page` is a plain, initialised 4096-byte array (repr C, no padding), so a
    // slice of pages is one contiguous initialised region of `len * PAGE` bytes, borrowed
    // for the slice's lifetime.
    unsafe { std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * PAGE) }
}

/// The pages as bytes, writable.
pub fn page_bytes_mut(pages: &mut [Page]) -> &mut [u8] {
    // SAFETY: as in `page_bytes`; the exclusive borrow of the pages is handed on, and
    // every byte pattern is a valid `Page`.
    unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), pages.len() * PAGE) }
}

/// A pool of block-sized page runs, shared by all the buffers taken from it.
pub struct BufferPool {
    /// Pages per pooled buffer: the block size, rounded up.
    pages: usize,
    /// How many free buffers to keep; more go back to the allocator.
    keep: usize,
    free: Mutex<Vec<Vec<Page>>>,
}

impl BufferPool {
    pub fn new(block_size: u64, keep: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            pages: usize::try_from(block_size).map_or(1, |b| b.div_ceil(PAGE).max(1)),
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer for up to `capacity` bytes: a recycled block if that is most of
    /// one, else exactly as many pages as asked for (a small block, the tail of a blob,
    /// must not hold a whole block's memory while it is cached: the cache counts its
    /// length, not its capacity).
    pub fn take(self: &Arc<Self>, capacity: usize) -> BlockBuf {
        let want = capacity.div_ceil(PAGE).max(1);
        let block_sized = want <= self.pages && want * 2 > self.pages;
        let recycled = block_sized
            .then(|| {
                self.free
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop()
            })
            .flatten();
        let pages = recycled.unwrap_or_else(|| {
            let pages = if block_sized { self.pages } else { want };
            vec![Page([0; PAGE]); pages]
        });
        BlockBuf {
            pages,
            len: 0,
            pool: self.clone(),
        }
    }

    /// Free buffers held now.
    pub fn free_buffers(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn give_back(&self, pages: Vec<Page>) {
        if pages.len() != self.pages {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(pages);
        }
    }
}

/// A block being filled; [`BlockBuf::freeze`] makes it a `Bytes` that returns the memory
/// to its pool when the last clone is dropped.
pub struct BlockBuf {
    pages: Vec<Page>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl BlockBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`, growing the buffer if it must (a block is never larger than the
    /// capacity it was taken for, but growing is cheaper than failing).
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let end = self.len + data.len();
        if end > self.pages.len() * PAGE {
            self.pages.resize(end.div_ceil(PAGE), Page([0; PAGE]));
        }
        page_bytes_mut(&mut self.pages)[self.len..end].copy_from_slice(data);
        self.len = end;
    }

    /// Sets the length to `len` and returns those bytes to be written into (whatever
    /// they held before: the caller overwrites them all).
    pub fn fill(&mut self, len: usize) -> &mut [u8] {
        if len > self.pages.len() * PAGE {
            self.pages.resize(len.div_ceil(PAGE), Page([0; PAGE]));
        }
        self.len = len;
        &mut page_bytes_mut(&mut self.pages)[..len]
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        &page_bytes(&self.pages)[..self.len]
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.pages));
    }
}

/// Whether `bytes` starts on a page boundary (so `O_DIRECT` can take it as it is).
pub fn page_aligned(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize) % PAGE == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_comes_back_when_its_last_holder_drops_it() {
        let pool = BufferPool::new(3 * PAGE as u64, 2);
        let mut buf = pool.take(3 * PAGE);
        buf.extend_from_slice(b"abc");
        buf.extend_from_slice(b"def");
        let bytes = buf.freeze();
        assert_eq!(&bytes[..], b"abcdef");
        assert!(page_aligned(&bytes));
        let slice = bytes.slice(2..4);
        drop(bytes);
        assert_eq!(pool.free_buffers(), 0, "a slice still holds it");
        assert_eq!(&slice[..], b"cd");
        drop(slice);
        assert_eq!(pool.free_buffers(), 1);
        let again = pool.take(3 * PAGE);
        assert!(again.is_empty(), "a recycled buffer starts empty");
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn the_pool_keeps_only_so_many_and_only_block_sized_ones() {
        let pool = BufferPool::new(PAGE as u64, 1);
        let (a, b) = (pool.take(10).freeze(), pool.take(10).freeze());
        let big = pool.take(5 * PAGE).freeze();
        drop((a, b, big));
        assert_eq!(pool.free_buffers(), 1);
    }

    #[test]
    fn a_small_block_holds_only_its_own_pages() {
        let pool = BufferPool::new(64 * PAGE as u64, 4);
        drop(pool.take(64 * PAGE).freeze());
        assert_eq!(pool.free_buffers(), 1);
        let small = pool.take(10);
        assert_eq!(small.pages.len(), 1, "one page, not a recycled block");
        assert_eq!(pool.free_buffers(), 1);
        drop(small);
        assert_eq!(pool.free_buffers(), 1, "and it is not pooled");
        let most = pool.take(40 * PAGE);
        assert_eq!(most.pages.len(), 64, "most of a block takes a recycled one");
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn a_buffer_grows_past_its_capacity_rather_than_fail() {
        let pool = BufferPool::new(PAGE as u64, 1);
        let mut buf = pool.take(PAGE);
        buf.extend_from_slice(&[7; PAGE]);
        buf.extend_from_slice(&[8; 10]);
        assert_eq!(buf.len(), PAGE + 10);
        let filled = buf.fill(3 * PAGE);
        filled.fill(1);
        assert_eq!(buf.freeze().len(), 3 * PAGE);
    }
}
