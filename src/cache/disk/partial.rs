//! A blob being cached block by block, before it is whole and verified: a sparse data
//! file (block `i` at offset `i × block size`) and a log of records, one per block
//! written, that says which blocks are there and their CRC-32.
//!
//! Sharing between daemons and surviving a kill:
//! - A block's bytes are written before its record is appended, so a record that can
//!   be read names bytes that are there; a block without a record is not trusted.
//! - Records are 32 bytes, appended with one `write` to an `O_APPEND` file, and carry
//!   their own CRC: one that is damaged is skipped, the others stay readable.
//! - The first writer of a block wins: a writer takes the log's lock (`flock`, so
//!   other daemons wait too), reads the records that arrived meanwhile and writes only
//!   blocks nobody recorded. A recorded block never changes.
//! - Every read checks the block against its record's CRC, so a torn or flipped block
//!   is a miss, never wrong bytes.
//!
//! The partial file is keyed by registry origin: what one registry served is never read
//! for another until the whole blob has matched its digest (see `consistent`).
//!
//! Blocks are written with `O_DIRECT` where the filesystem allows it: a cold read then
//! costs no page-cache copy of what it caches (measured: buffered writes tripled the CPU
//! of a cold 1 GiB read on a VM whose fresh pages are expensive). Reads stay buffered.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::private;
use crate::buf::{BlockBuf, PAGE, Page, page_aligned, page_bytes, page_bytes_mut};

const RECORD: usize = 32;

/// What one record says about one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    len: u32,
    crc: u32,
    /// The process that wrote the block (see `DiskCache`'s writer id).
    writer: u64,
}

pub struct Partial {
    pub data_path: PathBuf,
    pub log_path: PathBuf,
    data: File,
    /// The data file opened with O_DIRECT for writing, where the filesystem allows it.
    direct: Mutex<Option<File>>,
    log: File,
    block_size: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: HashMap<u64, Record>,
    /// Bytes of the log parsed so far.
    parsed: u64,
    /// Blocks whose bytes this process has seen to be exactly what the file holds: it
    /// wrote them first, or read them back with a matching CRC. A full read whose
    /// every block is consistent proves, by its digest check, the file's content.
    consistent: HashSet<u64>,
}

/// What writing a block did.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored: this many bytes were added to the file.
    Stored(u64),
    /// Another writer had stored it already.
    AlreadyThere,
}

fn encode_record(index: u64, r: &Record) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[0..8].copy_from_slice(&index.to_le_bytes());
    out[8..12].copy_from_slice(&r.len.to_le_bytes());
    out[12..16].copy_from_slice(&r.crc.to_le_bytes());
    out[16..24].copy_from_slice(&r.writer.to_le_bytes());
    let crc = crc32fast::hash(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode_record(raw: &[u8]) -> Option<(u64, Record)> {
    let field = |a: usize, b: usize| raw.get(a..b);
    let crc = u32::from_le_bytes(field(28, 32)?.try_into().ok()?);
    if crc32fast::hash(field(0, 28)?) != crc {
        return None;
    }
    let index = u64::from_le_bytes(field(0, 8)?.try_into().ok()?);
    let record = Record {
        len: u32::from_le_bytes(field(8, 12)?.try_into().ok()?),
        crc: u32::from_le_bytes(field(12, 16)?.try_into().ok()?),
        writer: u64::from_le_bytes(field(16, 24)?.try_into().ok()?),
    };
    Some((index, record))
}

/// Holds an exclusive `flock` on a file until dropped (other daemons wait for it).
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a File) -> io::Result<FileLock<'a>> {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// `flock` on `file` for the life of the guard, for callers outside this module.
pub fn with_lock<T>(file: &File, f: impl FnOnce() -> T) -> io::Result<T> {
    let _lock = FileLock::exclusive(file)?;
    Ok(f())
}

impl Partial {
    /// Opens the partial file at `data_path` (and its log beside it), creating both if
    /// `create`; None if they are not there (and not to be created).
    pub fn open(data_path: &Path, block_size: u64, create: bool) -> io::Result<Option<Partial>> {
        let log_path = log_path(data_path);
        let open = |path: &Path, append: bool| {
            let mut options = private::options();
            options.read(true).create(create);
            if append {
                options.append(true);
            } else {
                options.write(true);
            }
            options.open(path)
        };
        let (data, log) = match (open(data_path, false), open(&log_path, true)) {
            (Ok(d), Ok(l)) => (d, l),
            (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(data_path)
            .ok();
        let partial = Partial {
            data_path: data_path.to_owned(),
            log_path,
            data,
            direct: Mutex::new(direct),
            log,
            block_size,
            state: Mutex::new(State::default()),
        };
        partial.refresh(&mut partial.lock());
        Ok(Some(partial))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the records appended since the last look.
    fn refresh(&self, state: &mut State) {
        let Ok(len) = self.log.metadata().map(|m| m.len()) else {
            return;
        };
        let whole = len - len % RECORD as u64;
        if whole <= state.parsed {
            return;
        }
        let mut raw = vec![0u8; (whole - state.parsed) as usize];
        if self.log.read_exact_at(&mut raw, state.parsed).is_err() {
            return;
        }
        for chunk in raw.chunks_exact(RECORD) {
            // A damaged record is skipped; records are fixed-size, so the rest still align.
            if let Some((index, record)) = decode_record(chunk) {
                state.records.entry(index).or_insert(record);
            }
        }
        state.parsed = whole;
    }

    /// Whether both files are still in the cache directory (not evicted or promoted by
    /// another daemon).
    pub fn linked(&self) -> bool {
        let linked = |f: &File| f.metadata().is_ok_and(|m| m.nlink() > 0);
        linked(&self.data) && linked(&self.log)
    }

    pub fn has(&self, index: u64) -> bool {
        let mut state = self.lock();
        if !state.records.contains_key(&index) {
            self.refresh(&mut state);
        }
        state.records.contains_key(&index)
    }

    /// Block `index` (`len` bytes long), if it is recorded and its bytes match.
    pub fn read(&self, index: u64, len: u64, buffer: BlockBuf) -> Option<Bytes> {
        let record = {
            let mut state = self.lock();
            if !state.records.contains_key(&index) {
                self.refresh(&mut state);
            }
            *state.records.get(&index)?
        };
        if u64::from(record.len) != len {
            return None;
        }
        let mut buffer = buffer;
        let bytes = buffer.fill(usize::try_from(len).ok()?);
        self.data
            .read_exact_at(bytes, index * self.block_size)
            .ok()?;
        if crc32fast::hash(bytes) != record.crc {
            return None;
        }
        self.lock().consistent.insert(index);
        Some(buffer.freeze())
    }

    /// Stores block `index` unless another writer has; `writer` names this process.
    pub fn write(&self, index: u64, block: &[u8], writer: u64) -> io::Result<Written> {
        let len = u32::try_from(block.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut state = self.lock();
        let _lock = FileLock::exclusive(&self.log)?;
        self.refresh(&mut state);
        if state.records.contains_key(&index) {
            return Ok(Written::AlreadyThere);
        }
        self.write_data(block, index * self.block_size)?;
        let record = Record {
            len,
            crc: crc32fast::hash(block),
            writer,
        };
        (&self.log).write_all(&encode_record(index, &record))?;
        state.records.insert(index, record);
        state.consistent.insert(index);
        Ok(Written::Stored(block.len() as u64))
    }

    /// Writes block bytes at `offset`: directly when block and offset are aligned and
    /// the filesystem takes it (else, and from then on, through the page cache).
    fn write_data(&self, block: &[u8], offset: u64) -> io::Result<()> {
        let aligned = block.len() % PAGE == 0 && offset % PAGE as u64 == 0;
        let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        if let (true, Some(file)) = (aligned, direct.as_ref()) {
            // Block buffers are page-aligned (buffer.rs); a block from elsewhere (a
            // range answer) is copied into aligned memory first.
            let written = if page_aligned(block) {
                file.write_all_at(block, offset)
            } else {
                ALIGNED.with(|buffer| {
                    let mut buffer = buffer.borrow_mut();
                    file.write_all_at(buffer.fill(block), offset)
                })
            };
            match written {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
                other => return other,
            }
        }
        drop(direct);
        self.data.write_all_at(block, offset)
    }

    /// Whether blocks `0..blocks` are all recorded, and whether they are all consistent
    /// with what this process served (see `State::consistent`).
    pub fn completeness(&self, blocks: u64) -> (bool, bool) {
        let mut state = self.lock();
        self.refresh(&mut state);
        let complete = (0..blocks).all(|i| state.records.contains_key(&i));
        (
            complete,
            complete && (0..blocks).all(|i| state.consistent.contains(&i)),
        )
    }

    /// The data file, to be made durable and renamed into place by the caller, who
    /// holds the log's lock meanwhile (`with_lock(partial.log_file(), …)`).
    pub fn data_file(&self) -> &File {
        &self.data
    }

    pub fn log_file(&self) -> &File {
        &self.log
    }

    /// Checks every recorded block against its CRC; the indexes that fail.
    pub fn damaged_blocks(&self) -> Vec<u64> {
        let records: Vec<(u64, Record)> = {
            let mut state = self.lock();
            self.refresh(&mut state);
            state.records.iter().map(|(i, r)| (*i, *r)).collect()
        };
        let mut damaged = Vec::new();
        for (index, record) in records {
            let mut buffer = vec![0u8; record.len as usize];
            let ok = self
                .data
                .read_exact_at(&mut buffer, index * self.block_size)
                .is_ok()
                && crc32fast::hash(&buffer) == record.crc;
            if !ok {
                damaged.push(index);
            }
        }
        damaged.sort_unstable();
        damaged
    }

    #[cfg(test)]
    fn recorded(&self) -> usize {
        let mut state = self.lock();
        self.refresh(&mut state);
        state.records.len()
    }
}

/// A page-aligned copy of a block, for O_DIRECT (the writer thread reuses one).
#[derive(Default)]
struct Aligned(Vec<Page>);

thread_local! {
    static ALIGNED: RefCell<Aligned> = RefCell::default();
}

impl Aligned {
    /// `data` copied into aligned memory.
    fn fill(&mut self, data: &[u8]) -> &[u8] {
        let pages = data.len().div_ceil(PAGE);
        if self.0.len() < pages {
            self.0.resize(pages, Page([0; PAGE]));
        }
        page_bytes_mut(&mut self.0)[..data.len()].copy_from_slice(data);
        &page_bytes(&self.0)[..data.len()]
    }
}

/// The log that goes with a partial data file.
pub fn log_path(data_path: &Path) -> PathBuf {
    let mut name = data_path.as_os_str().to_owned();
    name.push(".log");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf() -> crate::buf::BlockBuf {
        crate::buf::BufferPool::new(4096, 1).take(0)
    }

    fn partial(dir: &Path) -> Partial {
        Partial::open(&dir.join("blob.4"), 4, true)
            .expect("open")
            .expect("created")
    }

    #[test]
    fn first_writer_wins_and_reads_check_the_crc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = partial(dir.path());
        let b = partial(dir.path()); // another daemon, its own descriptors
        assert_eq!(a.write(1, b"efgh", 7).ok(), Some(Written::Stored(4)));
        assert_eq!(b.write(1, b"XXXX", 8).ok(), Some(Written::AlreadyThere));
        assert_eq!(b.read(1, 4, buf()).as_deref(), Some(&b"efgh"[..]));
        assert_eq!(b.read(0, 4, buf()), None, "never written");
        // A flipped byte in the data file is a miss, not wrong bytes.
        a.data.write_all_at(b"Z", 5).expect("flip");
        assert_eq!(b.read(1, 4, buf()), None);
        assert_eq!(a.damaged_blocks(), vec![1]);
    }

    #[test]
    fn complete_only_when_every_block_was_seen_consistent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = partial(dir.path());
        let b = partial(dir.path());
        assert!(a.write(0, b"abcd", 1).is_ok());
        assert!(b.write(1, b"ef", 2).is_ok());
        assert_eq!(a.completeness(2), (true, false), "block 1 was written by b");
        assert!(a.read(1, 2, buf()).is_some());
        assert_eq!(a.completeness(2), (true, true), "and a has read it back");
        assert_eq!(b.completeness(2), (true, false), "b never saw block 0");
        assert_eq!(b.completeness(3), (false, false));
    }

    #[test]
    fn aligned_blocks_are_written_directly_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Partial::open(&dir.path().join("blob.4096"), 4096, true)
            .expect("open")
            .expect("created");
        let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(p.write(3, &block, 1).ok(), Some(Written::Stored(4096)));
        assert_eq!(p.write(4, b"tail", 1).ok(), Some(Written::Stored(4)));
        assert_eq!(p.read(3, 4096, buf()).as_deref(), Some(&block[..]));
        assert_eq!(p.read(4, 4, buf()).as_deref(), Some(&b"tail"[..]));
    }

    #[test]
    fn a_damaged_record_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = partial(dir.path());
        assert!(a.write(0, b"abcd", 1).is_ok());
        (&a.log).write_all(&[0xff; RECORD]).expect("garbage record");
        assert!(a.write(1, b"efgh", 1).is_ok());
        let fresh = partial(dir.path());
        assert_eq!(fresh.recorded(), 2);
        assert!(fresh.has(1));
    }
}
