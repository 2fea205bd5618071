//! Tar entries from a layer's uncompressed tar stream, fed a piece at a time.
//!
//! Header fields (octal and base-256 numbers, the ustar prefix, PAX records) are read
//! by the `tar` crate; the sequencing of headers, GNU long names, PAX extensions and
//! data is here, because a layer is untrusted: the crate's own reader holds a long name
//! or PAX header of any claimed size in memory, and it pulls from a `Read` while our
//! bytes are pushed out of a decompressor. Here every piece held is capped, and the
//! parser never looks at file data, only skips it.
//!
//! Semantics follow Go's `archive/tar` (what built most images) and POSIX: the first
//! all-zero block ends the archive; links, symlinks, devices, fifos and directories
//! carry no data whatever their size field says; PAX `path`, `linkpath`, `size`,
//! `uid`, `gid` and `mtime` override the header; `SCHILY.xattr.*` are xattrs.

use tar::{EntryType, Header};

use super::entry::{DataRef, Entry, EntryKind, TarPlace, normalise, shown};
use super::tar_header::{check_checksum, data_after, kind_of, link_of, owner_mode_time, trim_nul};
use super::tar_pax::Pax;

const BLOCK: u64 = 512;
/// Longest GNU long name or long link accepted (Linux paths are at most 4 KiB).
const MAX_LONG_NAME: u64 = 64 << 10;
/// Largest PAX extended header accepted (xattrs live there; capabilities and ACLs are
/// small).
const MAX_PAX: u64 = 1 << 20;
/// The most the parser holds at once: a header, a long name, a long link and a PAX
/// header (counted in the memory budget while a pass runs, cache/limit.rs).
pub const MAX_HELD: u64 = BLOCK + 2 * MAX_LONG_NAME + MAX_PAX;

/// What the parser found, in stream order.
#[derive(Debug)]
pub enum TarItem {
    /// An entry, and where its headers and data are.
    Entry(Entry, TarPlace),
    /// An entry that is not shown, and why (for the log).
    Refused { offset: u64, reason: String },
}

/// The stream cannot be read as tar (a corrupt header, a truncated stream, a feature
/// regfs does not support); the whole layer is unreadable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarError(pub String);

impl std::fmt::Display for TarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extension {
    LongName,
    LongLink,
    Pax,
    GlobalPax,
}

enum State {
    /// Collecting a 512-byte header; `filled` bytes are in `block`.
    Header { filled: usize },
    /// Collecting the data of an extension header, then skipping its padding.
    Extension {
        kind: Extension,
        left: u64,
        pad: u64,
        data: Vec<u8>,
    },
    /// Skipping file data and its padding.
    Skip { left: u64 },
    /// After the end-of-archive block: whatever follows is padding.
    End,
}

/// A name as written, where it differs from the normalised path.
type RawName = Option<Box<[u8]>>;

/// Extension data waiting for the header it applies to.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

pub struct TarParser {
    /// Stream offset of the next byte fed.
    offset: u64,
    state: State,
    block: [u8; BLOCK as usize],
    /// Stream offset of the header being parsed.
    header_at: u64,
    /// Stream offset of the first header (extensions included) of the entry being
    /// parsed.
    entry_at: Option<u64>,
    /// Headers that are no entry (global PAX headers, volume labels).
    skipped: u64,
    pending: Pending,
}

impl Default for TarParser {
    fn default() -> Self {
        TarParser {
            offset: 0,
            state: State::Header { filled: 0 },
            block: [0; BLOCK as usize],
            header_at: 0,
            entry_at: None,
            skipped: 0,
            pending: Pending::default(),
        }
    }
}

fn corrupt(offset: u64, what: impl std::fmt::Display) -> TarError {
    TarError(format!("tar stream at byte {offset}: {what}"))
}

/// `n` rounded up to whole blocks.
fn padded(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n / BLOCK * BLOCK)
}

impl TarParser {
    /// Whether the end-of-archive block has been seen.
    pub fn ended(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Headers seen that describe no entry: a global PAX header, a volume label (a
    /// zTOC, which lists entries only, cannot place the entry after one).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Parses `data`, the stream's next bytes, handing each entry to `found`.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        found: &mut impl FnMut(TarItem),
    ) -> Result<(), TarError> {
        while !data.is_empty() {
            match &mut self.state {
                State::End => {
                    self.offset += data.len() as u64;
                    return Ok(());
                }
                State::Skip { left } => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header { filled: 0 };
                    }
                    self.offset += n;
                    data = &data[n as usize..];
                }
                State::Extension {
                    kind,
                    left,
                    pad,
                    data: buf,
                } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    buf.extend_from_slice(&data[..n]);
                    *left -= n as u64;
                    self.offset += n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        let (kind, pad, buf) = (*kind, *pad, std::mem::take(buf));
                        match kind {
                            Extension::LongName => self.pending.long_name = Some(buf),
                            Extension::LongLink => self.pending.long_link = Some(buf),
                            Extension::Pax => self.pending.pax = Some(buf),
                            // Defaults for every later entry; no image tool writes them
                            // for the fields that matter, so they are not applied.
                            Extension::GlobalPax => {}
                        }
                        self.state = if pad > 0 {
                            State::Skip { left: pad }
                        } else {
                            State::Header { filled: 0 }
                        };
                    }
                }
                State::Header { filled } => {
                    if *filled == 0 {
                        self.header_at = self.offset;
                    }
                    let n = (BLOCK as usize - *filled).min(data.len());
                    self.block[*filled..*filled + n].copy_from_slice(&data[..n]);
                    *filled += n;
                    self.offset += n as u64;
                    data = &data[n..];
                    if *filled == BLOCK as usize {
                        self.header(found)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The stream ended: fine at an entry boundary (an archive without its end blocks
    /// is accepted, as `tar` does), an error inside an entry.
    pub fn finish(&self) -> Result<(), TarError> {
        match &self.state {
            State::End | State::Header { filled: 0 } => Ok(()),
            _ => Err(corrupt(
                self.offset,
                "the stream ends inside an entry (truncated layer)",
            )),
        }
    }

    /// A whole header is in `block`: work out what it is and what follows it.
    fn header(&mut self, found: &mut impl FnMut(TarItem)) -> Result<(), TarError> {
        let at = self.header_at;
        if self.block.iter().all(|&b| b == 0) {
            self.state = State::End;
            return Ok(());
        }
        let header = Header::from_byte_slice(&self.block);
        check_checksum(header).map_err(|e| corrupt(at, e))?;
        let kind = header.entry_type();
        let extension = match kind {
            EntryType::GNULongName => Some((Extension::LongName, MAX_LONG_NAME)),
            EntryType::GNULongLink => Some((Extension::LongLink, MAX_LONG_NAME)),
            EntryType::XHeader => Some((Extension::Pax, MAX_PAX)),
            EntryType::XGlobalHeader => Some((Extension::GlobalPax, MAX_PAX)),
            _ => None,
        };
        let stored = header
            .entry_size()
            .map_err(|e| corrupt(at, format!("bad size field: {e}")))?;
        if extension.is_some_and(|(ext, _)| ext == Extension::GlobalPax) {
            self.skipped += 1;
        } else {
            self.entry_at.get_or_insert(at);
        }
        if let Some((ext, max)) = extension {
            if stored > max {
                return Err(corrupt(
                    at,
                    format!("a {ext:?} header of {stored} bytes (at most {max} accepted)"),
                ));
            }
            let pad = padded(stored).unwrap_or(stored) - stored;
            self.state = if stored == 0 {
                State::Header { filled: 0 }
            } else {
                State::Extension {
                    kind: ext,
                    left: stored,
                    pad,
                    data: Vec::with_capacity(stored as usize),
                }
            };
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let pax = match &pending.pax {
            Some(bytes) => Pax::parse(bytes).map_err(|e| corrupt(at, e))?,
            None => Pax::default(),
        };
        let size = pax.size.unwrap_or(stored);
        let data_at = at + BLOCK;
        let first = self.entry_at.take().unwrap_or(at);
        match self.entry(header, &pending, pax, size, data_at) {
            Ok(Some((entry, raw_name))) => {
                let place = TarPlace {
                    header: first,
                    data: data_at,
                    raw_name,
                };
                found(TarItem::Entry(entry, place))
            }
            Ok(None) => self.skipped += 1,
            Err(reason) => found(TarItem::Refused { offset: at, reason }),
        }
        let has_data = data_after(kind);
        let skip = if has_data {
            padded(size).ok_or_else(|| corrupt(at, format!("a size of {size} bytes")))?
        } else {
            0
        };
        self.state = if skip > 0 {
            State::Skip { left: skip }
        } else {
            State::Header { filled: 0 }
        };
        Ok(())
    }

    /// The entry a header describes with its name as written when that differs from
    /// its path, `None` for headers that describe no file (a volume label), or why it
    /// is refused.
    fn entry(
        &self,
        header: &Header,
        pending: &Pending,
        mut pax: Pax,
        size: u64,
        data_at: u64,
    ) -> Result<Option<(Entry, RawName)>, String> {
        let raw_path: Vec<u8> = match (pax.path.take(), &pending.long_name) {
            (Some(p), _) => p,
            (None, Some(long)) => trim_nul(long).to_vec(),
            (None, None) => header.path_bytes().into_owned(),
        };
        let Some(kind) = kind_of(header, &raw_path)? else {
            return Ok(None);
        };
        let path = normalise(&raw_path).map_err(|e| format!("{}: {e}", shown(&raw_path)))?;
        if path.is_empty() && kind != EntryKind::Dir {
            return Err(format!("{}: names the root", shown(&raw_path)));
        }
        let raw_link: Option<Vec<u8>> = match (pax.linkpath.take(), &pending.long_link) {
            (Some(l), _) => Some(l),
            (None, Some(long)) => Some(trim_nul(long).to_vec()),
            (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
        };
        let link = link_of(kind, raw_link, &path)?;
        let (uid, gid, mode, (mtime, mtime_nsec)) = owner_mode_time(header, &pax, &path)?;
        let rdev = match kind {
            EntryKind::CharDev | EntryKind::BlockDev => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                (major, minor)
            }
            _ => (0, 0),
        };
        let data = match kind {
            EntryKind::File if size > 0 => DataRef::Stream(data_at),
            _ => DataRef::None,
        };
        let raw_name = (*raw_path != *path).then(|| raw_path.into_boxed_slice());
        Ok(Some((
            Entry {
                path,
                kind,
                mode,
                uid,
                gid,
                mtime,
                mtime_nsec,
                size: if kind == EntryKind::File { size } else { 0 },
                link,
                rdev,
                xattrs: pax.xattrs,
                data,
            },
            raw_name,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: EntryType, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_path(path).expect("short path");
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        h
    }

    fn pad(data: &mut Vec<u8>) {
        while data.len() % 512 != 0 {
            data.push(0);
        }
    }

    /// Parses `stream` fed in pieces of `piece` bytes.
    fn parse(stream: &[u8], piece: usize) -> Result<Vec<TarItem>, TarError> {
        let mut parser = TarParser::default();
        let mut items = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            parser.feed(chunk, &mut |item| items.push(item))?;
        }
        parser.finish()?;
        Ok(items)
    }

    fn entries(items: &[TarItem]) -> Vec<&Entry> {
        items
            .iter()
            .filter_map(|i| match i {
                TarItem::Entry(e, _) => Some(e),
                TarItem::Refused { .. } => None,
            })
            .collect()
    }

    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(header("etc/", EntryType::Directory, 0).as_bytes());
        s.extend_from_slice(header("etc/hosts", EntryType::Regular, 5).as_bytes());
        s.extend_from_slice(b"hello");
        pad(&mut s);
        let mut link = header("etc/hard", EntryType::Link, 0);
        link.set_link_name("etc/hosts").expect("link name");
        link.set_cksum();
        s.extend_from_slice(link.as_bytes());
        s.extend_from_slice(&[0; 1024]);
        s
    }

    #[test]
    fn entries_in_order_whatever_the_pieces() {
        let stream = sample();
        for piece in [1, 7, 511, 512, 513, 100_000] {
            let items = parse(&stream, piece).expect("valid tar");
            let e = entries(&items);
            assert_eq!(e.len(), 3, "piece {piece}");
            assert_eq!(&*e[0].path, b"etc");
            assert_eq!(e[0].kind, EntryKind::Dir);
            assert_eq!(&*e[1].path, b"etc/hosts");
            assert_eq!(e[1].data, DataRef::Stream(1024));
            assert_eq!(
                (e[1].size, e[1].uid, e[1].gid, e[1].mode),
                (5, 1000, 100, 0o644)
            );
            assert_eq!(&stream[1024..1029], b"hello");
            assert_eq!(e[2].kind, EntryKind::Hardlink);
            assert_eq!(e[2].link.as_deref(), Some(&b"etc/hosts"[..]));
        }
    }

    #[test]
    fn gnu_long_names_and_pax_records() {
        let long = format!("{}/{}", "d".repeat(200), "f".repeat(200));
        let mut s = Vec::new();
        let mut ln = header(
            "././@LongLink",
            EntryType::GNULongName,
            long.len() as u64 + 1,
        );
        ln.set_cksum();
        s.extend_from_slice(ln.as_bytes());
        s.extend_from_slice(long.as_bytes());
        s.push(0);
        pad(&mut s);
        s.extend_from_slice(header("short", EntryType::Regular, 0).as_bytes());
        let mut records = Vec::new();
        for (k, v) in [
            ("path", "pax/ünïcode name"),
            ("mtime", "1700000000.25"),
            ("uid", "70000"),
            ("SCHILY.xattr.user.note", "v\u{1}x"),
        ] {
            let line_len = k.len() + v.len() + 3;
            let digits = (line_len + 2).to_string().len();
            let n = line_len + digits;
            records.extend_from_slice(format!("{n} {k}={v}\n").as_bytes());
        }
        s.extend_from_slice(
            header("PaxHeaders/x", EntryType::XHeader, records.len() as u64).as_bytes(),
        );
        s.extend_from_slice(&records);
        pad(&mut s);
        s.extend_from_slice(header("ignored", EntryType::Regular, 0).as_bytes());
        s.extend_from_slice(&[0; 1024]);
        let items = parse(&s, 100).expect("valid tar");
        let e = entries(&items);
        assert_eq!(e[0].path.as_ref(), long.as_bytes());
        assert_eq!(e[1].path.as_ref(), "pax/ünïcode name".as_bytes());
        assert_eq!((e[1].mtime, e[1].mtime_nsec), (1_700_000_000, 250_000_000));
        assert_eq!(e[1].uid, 70000);
        assert_eq!(
            e[1].xattrs,
            vec![(b"user.note"[..].into(), b"v\x01x"[..].into())]
        );
    }

    #[test]
    fn places_cover_every_header_of_an_entry() {
        let long = format!("{}/{}", "d".repeat(150), "f".repeat(149));
        let mut s = Vec::new();
        let mut dir = header("x", EntryType::Directory, 0);
        dir.as_gnu_mut().expect("gnu").name[..7].copy_from_slice(b"./etc/\0");
        dir.set_cksum();
        s.extend_from_slice(dir.as_bytes());
        let ln = header("././@LongLink", EntryType::GNULongName, long.len() as u64);
        s.extend_from_slice(ln.as_bytes());
        s.extend_from_slice(long.as_bytes());
        pad(&mut s);
        s.extend_from_slice(header("cut", EntryType::Regular, 3).as_bytes());
        s.extend_from_slice(b"abc");
        pad(&mut s);
        let records = b"15 comment=hi!\n";
        s.extend_from_slice(header("g", EntryType::XGlobalHeader, 15).as_bytes());
        s.extend_from_slice(records);
        pad(&mut s);
        s.extend_from_slice(header("last", EntryType::Regular, 0).as_bytes());
        s.extend_from_slice(&[0; 1024]);
        let mut parser = TarParser::default();
        let mut items = Vec::new();
        for chunk in s.chunks(100) {
            parser.feed(chunk, &mut |i| items.push(i)).expect("valid");
        }
        let places: Vec<&TarPlace> = items
            .iter()
            .filter_map(|i| match i {
                TarItem::Entry(_, p) => Some(p),
                TarItem::Refused { .. } => None,
            })
            .collect();
        let raw = |n: &str| Some(n.as_bytes().into());
        assert_eq!(
            places[0],
            &TarPlace {
                header: 0,
                data: 512,
                raw_name: raw("./etc/")
            }
        );
        assert_eq!(
            places[1],
            &TarPlace {
                header: 512,
                data: 2048,
                raw_name: None
            }
        );
        // The global header is no entry: the next entry's headers start after it.
        assert_eq!(
            places[2],
            &TarPlace {
                header: 3584,
                data: 4096,
                raw_name: None
            }
        );
        assert_eq!(parser.skipped(), 1);
    }

    #[test]
    fn hostile_headers_are_errors_or_refusals() {
        // A long name claiming a gigabyte: refused before anything is buffered.
        let mut s = header("././@LongLink", EntryType::GNULongName, 1 << 30)
            .as_bytes()
            .to_vec();
        s.extend_from_slice(&[b'a'; 512]);
        assert!(parse(&s, 512).is_err());

        // A corrupt checksum.
        let mut h = header("x", EntryType::Regular, 0).as_bytes().to_vec();
        h[0] ^= 1;
        assert!(parse(&h, 512).is_err());

        // Truncated inside file data.
        let mut t = header("x", EntryType::Regular, 4096).as_bytes().to_vec();
        t.extend_from_slice(&[1; 100]);
        assert!(parse(&t, 64).is_err());

        // `..` and absolute names: `..` refused (data skipped), `/abs` made relative.
        let mut dotdot = header("x", EntryType::Regular, 3);
        dotdot.as_gnu_mut().expect("gnu").name[..17].copy_from_slice(b"../../etc/passwd\0");
        dotdot.set_cksum();
        let mut s = dotdot.as_bytes().to_vec();
        s.extend_from_slice(b"bad");
        pad(&mut s);
        let mut abs = Header::new_gnu();
        abs.as_gnu_mut().expect("gnu").name[..8].copy_from_slice(b"/abs/ok\0");
        abs.set_entry_type(EntryType::Regular);
        abs.set_size(0);
        abs.set_mode(0o600);
        abs.set_cksum();
        s.extend_from_slice(abs.as_bytes());
        s.extend_from_slice(&[0; 1024]);
        let items = parse(&s, 512).expect("the archive itself is fine");
        assert!(matches!(items[0], TarItem::Refused { offset: 0, .. }));
        let e = entries(&items);
        assert_eq!(e.len(), 1);
        assert_eq!(&*e[0].path, b"abs/ok");
    }

    #[test]
    fn sparse_files_are_unsupported() {
        let mut records = b"30 GNU.sparse.major=1\n".to_vec();
        records.extend_from_slice(b"30 GNU.sparse.minor=0\n");
        let mut s = header("P/x", EntryType::XHeader, records.len() as u64)
            .as_bytes()
            .to_vec();
        s.extend_from_slice(&records);
        pad(&mut s);
        s.extend_from_slice(header("sparse", EntryType::Regular, 0).as_bytes());
        assert!(parse(&s, 512).is_err());
    }
}
