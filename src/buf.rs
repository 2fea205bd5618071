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
//!
//! Whole blocks whose size is a multiple of the huge page size live in their own mapping,
//! aligned to it and advised for transparent huge pages: the first 256 MiB of a cold read
//! (the memory cache filling up) fault in 128 huge pages instead of 65,536 small ones
//! (each small fault costs microseconds in a VM), and the kernel pins one page instead of
//! 512 per block when it copies a FUSE reply or writes the block with `O_DIRECT`.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// The unit of alignment: `O_DIRECT` wants buffer addresses, lengths and offsets to be
/// multiples of it.
pub const PAGE: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub struct Page(pub [u8; PAGE]);

/// The huge page size of x86_64 and of arm64 with 4 KiB pages. Elsewhere the advice is
/// ignored or the mapping is merely aligned: either way the buffer works.
const HUGE_PAGE: usize = 2 << 20;

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
    free: Mutex<Vec<Memory>>,
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
        let memory = recycled.unwrap_or_else(|| {
            if block_sized {
                Memory::block(self.pages * PAGE)
            } else {
                Memory::Pages(vec![Page([0; PAGE]); want])
            }
        });
        BlockBuf {
            memory,
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

    fn give_back(&self, memory: Memory) {
        if memory.capacity() != self.pages * PAGE {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(memory);
        }
    }
}

/// The memory behind a buffer.
enum Memory {
    /// Pages from the allocator: small blocks, and blocks of sizes huge pages do not fit.
    Pages(Vec<Page>),
    /// A whole block in its own huge-page mapping.
    Mapped(Mapping),
}

impl Memory {
    /// Memory for a whole block of `len` bytes (a multiple of [`PAGE`]).
    fn block(len: usize) -> Memory {
        if len % HUGE_PAGE == 0
            && let Some(mapping) = Mapping::new(len)
        {
            return Memory::Mapped(mapping);
        }
        Memory::Pages(vec![Page([0; PAGE]); len / PAGE])
    }

    fn capacity(&self) -> usize {
        match self {
            Memory::Pages(pages) => pages.len() * PAGE,
            Memory::Mapped(mapping) => mapping.len,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Memory::Pages(pages) => page_bytes(pages),
            Memory::Mapped(mapping) => mapping.bytes(),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Memory::Pages(pages) => page_bytes_mut(pages),
            Memory::Mapped(mapping) => mapping.bytes_mut(),
        }
    }

    /// Makes room for at least `len` bytes, keeping the first `keep`.
    fn grow(&mut self, len: usize, keep: usize) {
        if len <= self.capacity() {
            return;
        }
        match self {
            Memory::Pages(pages) => pages.resize(len.div_ceil(PAGE), Page([0; PAGE])),
            Memory::Mapped(mapping) => {
                let mut pages = vec![Page([0; PAGE]); len.div_ceil(PAGE)];
                page_bytes_mut(&mut pages)[..keep].copy_from_slice(&mapping.bytes()[..keep]);
                *self = Memory::Pages(pages);
            }
        }
    }
}

/// An anonymous, private mapping aligned to [`HUGE_PAGE`] and advised for transparent
/// huge pages (`MADV_HUGEPAGE`: honoured where THP is `always` or `madvise`, as on
/// Debian; elsewhere it is plain memory).
struct Mapping {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned memory like a Box<[u8]>: nothing else refers to it, and
// shared access only reads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` bytes (a multiple of [`HUGE_PAGE`]), zeroed; None if the kernel refuses.
    fn new(len: usize) -> Option<Mapping> {
        // Map one huge page more than asked, then give back the unaligned head and tail.
        let span = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
        let tail = span - head - len;
        // SAFETY: the head and tail lie inside the mapping just made and nothing uses
        // them; the aligned part stays mapped. Advice that fails leaves plain memory.
        let start = unsafe {
            let start = raw.cast::<u8>().add(head);
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap(start.add(len).cast(), tail);
            }
            libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
            start
        };
        Some(Mapping {
            start: NonNull::new(start)?,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, zeroed by the kernel when mapped (so initialised),
        // owned by this value and borrowed for its lifetime.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no borrow of it outlives self.
        unsafe {
            libc::munmap(self.start.as_ptr().cast(), self.len);
        }
    }
}

/// A block being filled; [`BlockBuf::freeze`] makes it a `Bytes` that returns the memory
/// to its pool when the last clone is dropped.
pub struct BlockBuf {
    memory: Memory,
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
        self.memory.grow(end, self.len);
        self.memory.bytes_mut()[self.len..end].copy_from_slice(data);
        self.len = end;
    }

    /// Sets the length to `len` and returns those bytes to be written into (whatever
    /// they held before: the caller overwrites them all).
    pub fn fill(&mut self, len: usize) -> &mut [u8] {
        self.memory.grow(len, self.len);
        self.len = len;
        &mut self.memory.bytes_mut()[..len]
    }

    /// The bytes after the filled ones, up to `end`, to be written into (a socket read
    /// straight into the block); [`BlockBuf::filled`] then counts those written.
    pub fn unfilled(&mut self, end: usize) -> &mut [u8] {
        let end = end.max(self.len);
        self.memory.grow(end, self.len);
        &mut self.memory.bytes_mut()[self.len..end]
    }

    /// Counts `n` more bytes as filled (written through [`BlockBuf::unfilled`]).
    pub fn filled(&mut self, n: usize) {
        self.len = (self.len + n).min(self.memory.capacity());
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        &self.memory.bytes()[..self.len]
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        let memory = std::mem::replace(&mut self.memory, Memory::Pages(Vec::new()));
        self.pool.give_back(memory);
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
        assert_eq!(
            small.memory.capacity(),
            PAGE,
            "one page, not a recycled block"
        );
        assert_eq!(pool.free_buffers(), 1);
        drop(small);
        assert_eq!(pool.free_buffers(), 1, "and it is not pooled");
        let most = pool.take(40 * PAGE);
        assert_eq!(
            most.memory.capacity(),
            64 * PAGE,
            "most of a block takes a recycled one"
        );
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn a_huge_page_sized_block_is_its_own_aligned_mapping() {
        let pool = BufferPool::new(HUGE_PAGE as u64, 1);
        let mut buf = pool.take(HUGE_PAGE);
        assert!(matches!(buf.memory, Memory::Mapped(_)));
        buf.extend_from_slice(&[1; 100]);
        let bytes = buf.freeze();
        assert_eq!(bytes.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(&bytes[..], &[1; 100]);
        drop(bytes);
        assert_eq!(pool.free_buffers(), 1);
        let mut again = pool.take(HUGE_PAGE);
        again.extend_from_slice(&vec![2; HUGE_PAGE]);
        again.extend_from_slice(&[3; 5]);
        let grown = again.freeze();
        assert_eq!(grown.len(), HUGE_PAGE + 5);
        assert!(grown[..HUGE_PAGE].iter().all(|&b| b == 2));
        assert_eq!(&grown[HUGE_PAGE..], &[3; 5]);
        drop(grown);
        assert_eq!(pool.free_buffers(), 0, "a grown buffer is not block-sized");
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
