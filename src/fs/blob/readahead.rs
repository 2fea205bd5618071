//! Sequential-read detection for one open file, and the read-ahead window it earns.
//!
//! A reader that keeps asking for the bytes right after its previous read gets a window
//! that doubles with every such read, up to a maximum; any jump elsewhere resets it, so
//! random readers fetch only the blocks they touch. The kernel may deliver its own
//! read-ahead requests slightly out of order, so "right after" allows a little slack.
//!
//! A small first read of a file earns its window but does not use it yet: nothing says
//! that a reader of the first few bytes will go on (`file`, `head`, a tool reading a
//! header), and a read that waits for whole blocks costs a small reader dearly on a
//! distant link (pieces.rs). Its second read, if it goes on, gets the window the first
//! had earned, doubled, as if it had been used. A first read the size of the kernel's
//! read-ahead (`cat`, `cp`) uses its window at once.

/// How far a read may land from where the reader got (ahead, once it has shown it is
/// sequential; behind, always) and still count as sequential: the kernel keeps several
/// 1 MiB read-ahead requests in flight and they can arrive in any order. Ahead, a reader
/// not yet known to be sequential gets one kernel request (or one block) of slack, so
/// that a single read near the start of a file is not taken for the start of a stream.
pub const REORDER_SLACK: u64 = 4 << 20;
const START_SLACK: u64 = 1 << 20;
/// Before a reader is known to be sequential, a read near its last one continues it
/// only if it starts right where that one ended or is this large: the kernel's
/// read-ahead requests are (16 KiB at first, then 64 KiB and more), while a read of a
/// few KiB a little way off is a random reader's (the kernel reads those as they are).
const READ_AHEAD_SIZED: u64 = 64 << 10;

/// Window state of one open file. All positions are in bytes, the window in blocks.
#[derive(Debug)]
pub struct ReadAhead {
    block_size: u64,
    max_blocks: u64,
    /// Where the next read would start if the reader is sequential.
    next: u64,
    window: u64,
    /// Blocks below this index have already been handed to the prefetcher.
    prefetched_to: u64,
    /// Reads so far (counted up to 2).
    reads: u8,
    /// The last read was a small first read, whose window is held back.
    held_back: bool,
}

impl ReadAhead {
    pub fn new(block_size: u64, max_blocks: u64) -> ReadAhead {
        ReadAhead {
            block_size: block_size.max(1),
            max_blocks,
            next: 0,
            window: 0,
            prefetched_to: 0,
            reads: 0,
            held_back: false,
        }
    }

    /// The current window in blocks: 0 for a random reader, and after a small first
    /// read.
    pub fn window(&self) -> u64 {
        if self.held_back { 0 } else { self.window }
    }

    /// Records a read of `[offset, offset + len)` in a file of `size` bytes and returns
    /// the block indexes to prefetch now (none for a random reader).
    pub fn on_read(&mut self, offset: u64, len: u64, size: u64) -> std::ops::Range<u64> {
        self.reads = self.reads.saturating_add(1);
        let end = offset.saturating_add(len).min(size);
        let ahead_slack = self.block_size.max(if self.window > 0 {
            REORDER_SLACK
        } else {
            START_SLACK
        });
        // Behind where the reader got is a request the kernel reordered (its read-ahead
        // runs several at once, and a loaded machine serves them in any order), from the
        // first read on: only a jump further back is a new position.
        let behind_slack = self.block_size.max(REORDER_SLACK);
        let near = offset <= self.next.saturating_add(ahead_slack)
            && offset.saturating_add(behind_slack) >= self.next;
        let known = self.window > 0 && !std::mem::take(&mut self.held_back);
        let sequential = near && (known || offset == self.next || len >= READ_AHEAD_SIZED);
        if sequential {
            // Start at two blocks, double, never beyond the maximum (which may be 0).
            self.window = (self.window * 2).max(2).min(self.max_blocks);
            self.next = self.next.max(end);
        } else {
            self.window = 0;
            self.next = end;
            self.prefetched_to = 0;
            return 0..0;
        }
        if self.reads < 2 && len < READ_AHEAD_SIZED {
            self.held_back = true; // a small first read: see the module comment
            return 0..0;
        }
        let last_block = size.div_ceil(self.block_size);
        let first = end.div_ceil(self.block_size).max(self.prefetched_to);
        let upto = (end.div_ceil(self.block_size) + self.window).min(last_block);
        if first >= upto {
            return 0..0;
        }
        self.prefetched_to = upto;
        first..upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn sequential_reads_ramp_the_window_to_its_maximum() {
        let mut ra = ReadAhead::new(MB, 8);
        let size = 100 * MB;
        assert_eq!(ra.on_read(0, 128 << 10, size), 1..3);
        assert_eq!(ra.on_read(128 << 10, 128 << 10, size), 3..5);
        let mut off = 256 << 10;
        let mut last = 0..0;
        for _ in 0..20 {
            let r = ra.on_read(off, MB, size);
            if !r.is_empty() {
                last = r;
            }
            off += MB;
        }
        // The window is capped: at most 8 blocks ahead of the read.
        assert!(last.end <= off.div_ceil(MB) + 8, "{last:?} at {off}");
        assert!(last.end >= off.div_ceil(MB) + 7, "{last:?} at {off}");
    }

    #[test]
    fn blocks_are_handed_out_once() {
        let mut ra = ReadAhead::new(MB, 4);
        let size = 100 * MB;
        let a = ra.on_read(0, MB, size);
        let b = ra.on_read(MB, MB, size);
        assert!(a.end <= b.start || b.is_empty(), "{a:?} then {b:?}");
    }

    #[test]
    fn random_reads_prefetch_nothing() {
        let mut ra = ReadAhead::new(MB, 8);
        let size = 1024 * MB;
        assert!(ra.on_read(500 * MB, 4096, size).is_empty());
        assert!(ra.on_read(17 * MB, 4096, size).is_empty());
        assert!(ra.on_read(900 * MB, 4096, size).is_empty());
    }

    #[test]
    fn a_jump_resets_and_slightly_reordered_reads_stay_sequential() {
        let mut ra = ReadAhead::new(MB, 8);
        let size = 1024 * MB;
        ra.on_read(0, MB, size);
        ra.on_read(2 * MB, MB, size); // the kernel's next request overtook this one
        assert!(!ra.on_read(MB, MB, size).is_empty() || ra.window > 0);
        assert!(ra.on_read(600 * MB, MB, size).is_empty());
        assert_eq!(ra.window, 0);
    }

    #[test]
    fn kernel_read_ahead_out_of_order_stays_sequential_with_small_blocks() {
        let mut ra = ReadAhead::new(64 << 10, 32);
        let size = 1024 * MB;
        for (i, mib) in [0, 1, 3, 2, 5, 4, 6, 8, 7].into_iter().enumerate() {
            ra.on_read(mib * MB, MB, size);
            assert!(
                ra.window() > 0 || i == 0,
                "read {i} at {mib} MiB counted as a jump"
            );
        }
        ra.on_read(900 * MB, MB, size);
        assert_eq!(ra.window(), 0, "a real jump");
    }

    #[test]
    fn the_first_reads_arriving_out_of_order_are_not_jumps() {
        // fs::read of a file with 64 KiB blocks on a loaded machine: the kernel's
        // read-ahead requests served in the order its threads got to them.
        let mut ra = ReadAhead::new(64 << 10, 32);
        let size = 16 * MB;
        let k = 128 << 10;
        for (i, at) in [8 * k, 0, 2 * k, k, 4 * k, 3 * k, 6 * k, 5 * k, 7 * k]
            .into_iter()
            .enumerate()
        {
            ra.on_read(at, k, size);
            assert!(
                ra.window() > 0 || i == 0,
                "read {i} at {at} counted as a jump"
            );
        }
        assert_eq!(ra.window(), 32, "the window grew to its maximum");
        ra.on_read(0, k, size);
        assert!(
            ra.window() > 0,
            "a re-read of the start, 1 MiB back, is not a jump"
        );
        ra.on_read(12 * MB, k, size);
        assert_eq!(ra.window(), 0, "a jump 11 MiB ahead is");
    }

    #[test]
    fn one_read_near_the_start_is_not_a_stream() {
        let mut ra = ReadAhead::new(2 * MB, 32);
        assert!(ra.on_read(3 * MB, 4096, 1024 * MB).is_empty());
        assert_eq!(ra.window(), 0);
    }

    #[test]
    fn a_small_first_read_holds_its_window_back_until_the_reader_goes_on() {
        let mut ra = ReadAhead::new(MB, 8);
        let size = 100 * MB;
        assert_eq!(ra.on_read(0, 16 << 10, size), 0..0);
        assert_eq!(ra.window(), 0, "held back");
        // Going on: the window the first read earned, doubled.
        assert_eq!(ra.on_read(16 << 10, 64 << 10, size), 1..5);
        assert_eq!(ra.window(), 4);
    }

    #[test]
    fn small_reads_near_each_other_are_a_random_readers() {
        let mut ra = ReadAhead::new(2 * MB, 32);
        let size = 1024 * MB;
        for at in [300 * MB, 301 * MB, 299 * MB + 4096, 302 * MB] {
            assert!(ra.on_read(at, 4096, size).is_empty());
            assert_eq!(ra.window(), 0, "4 KiB at {at}");
        }
        // Small reads that follow each other exactly are a sequential reader's.
        for k in 1..4 {
            ra.on_read(302 * MB + k * 4096, 4096, size);
        }
        assert!(ra.window() > 0);
    }

    #[test]
    fn a_zero_maximum_means_no_prefetch() {
        let mut ra = ReadAhead::new(MB, 0);
        assert!(ra.on_read(0, MB, 10 * MB).is_empty());
        assert!(ra.on_read(MB, MB, 10 * MB).is_empty());
    }

    #[test]
    fn never_past_the_end() {
        let mut ra = ReadAhead::new(MB, 8);
        let size = 3 * MB + 10;
        let r = ra.on_read(0, MB, size);
        assert!(r.end <= 4, "{r:?}");
        let r = ra.on_read(MB, MB, size);
        assert!(r.end <= 4, "{r:?}");
    }
}
