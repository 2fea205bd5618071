//! A zTOC: SOCI's index of one layer (the files of its tar stream with their offsets,
//! and the checkpoints and span digests that let a reader decode any part of the
//! layer on its own), as the FlatBuffers table `Ztoc` of soci-snapshotter's
//! `ztoc/fbs/ztoc.fbs` (src/image/soci/ztoc.fbs has the same schema).
//!
//! Decoding trusts nothing: every offset, count and size is checked, and a zTOC that
//! soci-snapshotter itself would refuse (files out of order, a span count that does
//! not match the checkpoints) is refused here too, with the reason.

use super::flatbuf::{Builder, FbError, Offset, Table};
use super::mtime;
use super::zinfo::{GzipZinfo, TarZinfo};
use crate::image::entry::Xattrs;

/// The only zTOC version there is.
pub const VERSION: &str = "0.9";
/// Largest zTOC accepted: the same bound as any layer index (ARCHITECTURE.md,
/// src/image/index.rs).
pub const MAX_ZTOC_BYTES: usize = crate::image::index::MAX_INDEX_BYTES;
/// Most bytes the decoded file list may hold: strings may be shared in the buffer, so
/// a small zTOC could otherwise claim gigabytes (ARCHITECTURE.md, limits of an index).
pub const MAX_DECODED_BYTES: usize = crate::image::index::MAX_INDEX_BYTES;
/// Most spans a zTOC may have (32 MiB of digests).
pub const MAX_SPANS: usize = 1 << 20;
/// Memory counted per file and per PAX record, beyond their strings.
const FILE_OVERHEAD: usize = std::mem::size_of::<FileMetadata>();
const RECORD_OVERHEAD: usize = 2 * std::mem::size_of::<Box<[u8]>>();
/// A tar block: headers start on one.
pub const TAR_BLOCK: u64 = 512;

/// How a file is stored, by the names soci writes in `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    Reg,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl FileType {
    pub const ALL: [FileType; 7] = [
        FileType::Reg,
        FileType::Dir,
        FileType::Symlink,
        FileType::Hardlink,
        FileType::Char,
        FileType::Block,
        FileType::Fifo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::Reg => "reg",
            FileType::Dir => "dir",
            FileType::Symlink => "symlink",
            FileType::Hardlink => "hardlink",
            FileType::Char => "char",
            FileType::Block => "block",
            FileType::Fifo => "fifo",
        }
    }

    fn parse(name: &[u8]) -> Option<FileType> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().as_bytes() == name)
    }
}

/// One tar entry as a zTOC lists it (fields as Go's `archive/tar` read them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMetadata {
    /// The name as in the tar header (PAX `path` and GNU long names applied), not
    /// normalised.
    pub name: Box<[u8]>,
    pub kind: FileType,
    /// Where the entry's data starts in the tar stream (just after its headers).
    pub offset: u64,
    /// The header's size field.
    pub size: u64,
    /// Where the entry's first header starts: the end of the entry before it, rounded
    /// up to a block (computed when reading, as soci-snapshotter does; not stored).
    pub header_offset: u64,
    pub linkname: Box<[u8]>,
    /// The header's mode field (permission, setuid/setgid/sticky bits).
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub uname: Box<[u8]>,
    pub gname: Box<[u8]>,
    /// Seconds since the epoch and nanoseconds.
    pub mtime: (i64, u32),
    pub devmajor: u32,
    pub devminor: u32,
    /// Every PAX record of the entry, sorted by key (xattrs are the `SCHILY.xattr.`
    /// ones).
    pub pax: Xattrs,
}

/// How to decode the layer from a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Zinfo {
    Gzip(GzipZinfo),
    /// An uncompressed layer: fixed spans, no checkpoints.
    Tar(TarZinfo),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ztoc {
    pub version: String,
    pub build_tool: String,
    /// The layer blob's size.
    pub compressed_size: u64,
    /// The tar stream's size (up to the end-of-archive blocks).
    pub uncompressed_size: u64,
    /// Sorted by `offset`.
    pub files: Vec<FileMetadata>,
    pub zinfo: Zinfo,
    /// SHA-256 of each span's compressed bytes (src/image/soci/spans.rs).
    pub span_digests: Vec<[u8; 32]>,
}

/// Field slots of the schema's tables, in declaration order.
mod slot {
    pub const XATTR_KEY: usize = 0;
    pub const XATTR_VALUE: usize = 1;
    pub const FM_NAME: usize = 0;
    pub const FM_TYPE: usize = 1;
    pub const FM_OFFSET: usize = 2;
    pub const FM_SIZE: usize = 3;
    pub const FM_LINKNAME: usize = 4;
    pub const FM_MODE: usize = 5;
    pub const FM_UID: usize = 6;
    pub const FM_GID: usize = 7;
    pub const FM_UNAME: usize = 8;
    pub const FM_GNAME: usize = 9;
    pub const FM_MOD_TIME: usize = 10;
    pub const FM_DEVMAJOR: usize = 11;
    pub const FM_DEVMINOR: usize = 12;
    pub const FM_XATTRS: usize = 13;
    pub const CI_ALGORITHM: usize = 0;
    pub const CI_MAX_SPAN_ID: usize = 1;
    pub const CI_SPAN_DIGESTS: usize = 2;
    pub const CI_CHECKPOINTS: usize = 3;
    pub const TOC_METADATA: usize = 0;
    pub const Z_VERSION: usize = 0;
    pub const Z_BUILD_TOOL: usize = 1;
    pub const Z_COMPRESSED_SIZE: usize = 2;
    pub const Z_UNCOMPRESSED_SIZE: usize = 3;
    pub const Z_TOC: usize = 4;
    pub const Z_COMPRESSION_INFO: usize = 5;
}

/// The schema's `CompressionAlgorithm` (default `Gzip`).
const ALGORITHM_GZIP: i8 = 1;
const ALGORITHM_UNCOMPRESSED: i8 = 2;

fn fb(what: &str) -> impl Fn(FbError) -> String + '_ {
    move |e| format!("zTOC {what}: {e}")
}

fn non_negative(v: i64, what: &str) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("zTOC: negative {what} ({v})"))
}

/// `o` rounded up to a tar block.
pub fn align_to_block(o: u64) -> Option<u64> {
    o.checked_add(TAR_BLOCK - 1)
        .map(|o| o / TAR_BLOCK * TAR_BLOCK)
}

/// `sha256:<64 lowercase hex>`, as go-digest accepts it.
pub fn parse_digest(text: &[u8]) -> Option<[u8; 32]> {
    let hex = text.strip_prefix(b"sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let nibble = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

pub fn format_digest(d: &[u8; 32]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Ztoc {
    /// Reads a zTOC (untrusted bytes).
    pub fn decode(bytes: &[u8]) -> Result<Ztoc, String> {
        if bytes.len() > MAX_ZTOC_BYTES {
            return Err(format!(
                "zTOC of {} bytes: more than regfs accepts",
                bytes.len()
            ));
        }
        let root = Table::root(bytes).map_err(fb("root"))?;
        let text = |slot| -> Result<String, String> {
            let raw = root.string(slot).map_err(fb("header"))?.unwrap_or_default();
            Ok(String::from_utf8_lossy(raw).into_owned())
        };
        let version = text(slot::Z_VERSION)?;
        if version != VERSION {
            return Err(format!("zTOC version {version:?}: regfs reads {VERSION}"));
        }
        let build_tool = text(slot::Z_BUILD_TOOL)?;
        let size = |slot, what| {
            root.i64(slot, 0)
                .map_err(fb("header"))
                .and_then(|v| non_negative(v, what))
        };
        let compressed_size = size(slot::Z_COMPRESSED_SIZE, "compressed size")?;
        let uncompressed_size = size(slot::Z_UNCOMPRESSED_SIZE, "uncompressed size")?;
        let files = match root.table(slot::Z_TOC).map_err(fb("toc"))? {
            Some(toc) => decode_files(&toc, uncompressed_size)?,
            None => Vec::new(),
        };
        let info = root
            .table(slot::Z_COMPRESSION_INFO)
            .map_err(fb("compression info"))?
            .ok_or("zTOC without compression info")?;
        let (zinfo, span_digests) = decode_compression(&info, compressed_size, uncompressed_size)?;
        Ok(Ztoc {
            version,
            build_tool,
            compressed_size,
            uncompressed_size,
            files,
            zinfo,
            span_digests,
        })
    }

    /// The zTOC as FlatBuffers bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Builder::with_capacity(self.files.len() * 160 + (64 << 10));
        let version = b.string(self.version.as_bytes());
        let tool = b.string(self.build_tool.as_bytes());
        let files: Vec<Offset> = self.files.iter().map(|f| encode_file(&mut b, f)).collect();
        let metadata = b.offset_vector(&files);
        b.start_table();
        b.offset(slot::TOC_METADATA, metadata);
        let toc = b.end_table();
        let info = encode_compression(&mut b, &self.zinfo, &self.span_digests);
        b.start_table();
        b.i64(slot::Z_UNCOMPRESSED_SIZE, self.uncompressed_size as i64, 0);
        b.i64(slot::Z_COMPRESSED_SIZE, self.compressed_size as i64, 0);
        b.offset(slot::Z_VERSION, version);
        b.offset(slot::Z_BUILD_TOOL, tool);
        b.offset(slot::Z_TOC, toc);
        b.offset(slot::Z_COMPRESSION_INFO, info);
        let root = b.end_table();
        b.finish(root)
    }
}

/// The files, sorted by offset, their header offsets computed and checked as
/// soci-snapshotter does (no entry may start before the one in front of it ends).
fn decode_files(toc: &Table<'_>, uncompressed_size: u64) -> Result<Vec<FileMetadata>, String> {
    let Some(list) = toc.vector(slot::TOC_METADATA).map_err(fb("toc"))? else {
        return Ok(Vec::new());
    };
    if list.len() > crate::image::index::MAX_ENTRIES {
        return Err(format!(
            "zTOC lists {} files: more than regfs accepts",
            list.len()
        ));
    }
    let mut files = Vec::with_capacity(list.len().min(4096));
    let mut budget = Budget(MAX_DECODED_BYTES);
    for i in 0..list.len() {
        let table = list.table(i).map_err(|e| format!("zTOC file {i}: {e}"))?;
        let file = decode_file(&table, &mut budget).map_err(|e| format!("zTOC file {i}: {e}"))?;
        if file
            .offset
            .checked_add(file.size)
            .is_none_or(|end| end > uncompressed_size)
        {
            return Err(format!(
                "zTOC file {i}: {} bytes at {} run past the {uncompressed_size}-byte tar stream",
                file.size, file.offset
            ));
        }
        files.push(file);
    }
    files.sort_by_key(|f| f.offset);
    let mut next_header = 0u64;
    for f in &mut files {
        if next_header > f.offset {
            return Err(format!(
                "zTOC file at {} starts inside the entry before it (which ends at {next_header})",
                f.offset
            ));
        }
        f.header_offset = next_header;
        // Cannot overflow: offset + size <= uncompressed_size was checked.
        next_header = align_to_block(f.offset + f.size).unwrap_or(u64::MAX);
    }
    Ok(files)
}

/// What decoding may still allocate.
struct Budget(usize);

impl Budget {
    fn take(&mut self, n: usize) -> Result<(), String> {
        self.0 = self.0.checked_sub(n).ok_or_else(|| {
            format!(
                "the file list decodes to more than {} MiB",
                MAX_DECODED_BYTES >> 20
            )
        })?;
        Ok(())
    }

    /// A string of a table, counted.
    fn string(&mut self, t: &Table<'_>, slot: usize) -> Result<Box<[u8]>, String> {
        let s = t
            .string(slot)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        self.take(s.len())?;
        Ok(s.into())
    }
}

fn decode_file(t: &Table<'_>, budget: &mut Budget) -> Result<FileMetadata, String> {
    let e = |e: FbError| e.to_string();
    budget.take(FILE_OVERHEAD)?;
    let mut string = |slot| budget.string(t, slot);
    let name = string(slot::FM_NAME)?;
    let kind_name = string(slot::FM_TYPE)?;
    let kind = FileType::parse(&kind_name)
        .ok_or_else(|| format!("unknown type {:?}", String::from_utf8_lossy(&kind_name)))?;
    let device = |slot, what| {
        let v = t.i64(slot, 0).map_err(e)?;
        u32::try_from(v).map_err(|_| format!("{what} {v} is not a device number"))
    };
    Ok(FileMetadata {
        kind,
        offset: non_negative(t.i64(slot::FM_OFFSET, 0).map_err(e)?, "offset")?,
        size: non_negative(t.i64(slot::FM_SIZE, 0).map_err(e)?, "size")?,
        header_offset: 0,
        linkname: string(slot::FM_LINKNAME)?,
        mode: t.i64(slot::FM_MODE, 0).map_err(e)?,
        uid: t.u32(slot::FM_UID, 0).map_err(e)?,
        gid: t.u32(slot::FM_GID, 0).map_err(e)?,
        uname: string(slot::FM_UNAME)?,
        gname: string(slot::FM_GNAME)?,
        mtime: mtime::parse(&string(slot::FM_MOD_TIME)?)?,
        devmajor: device(slot::FM_DEVMAJOR, "devmajor")?,
        devminor: device(slot::FM_DEVMINOR, "devminor")?,
        pax: decode_pax(t, budget)?,
        name,
    })
}

fn decode_pax(t: &Table<'_>, budget: &mut Budget) -> Result<Xattrs, String> {
    let Some(list) = t.vector(slot::FM_XATTRS).map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    let mut pax = Vec::with_capacity(list.len().min(64));
    for i in 0..list.len() {
        let x = list.table(i).map_err(|e| e.to_string())?;
        budget.take(RECORD_OVERHEAD)?;
        pax.push((
            budget.string(&x, slot::XATTR_KEY)?,
            budget.string(&x, slot::XATTR_VALUE)?,
        ));
    }
    // Go keeps them in a map: the last of equal keys wins, order does not matter.
    pax.sort_by(|a, b| a.0.cmp(&b.0));
    pax.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            std::mem::swap(&mut later.1, &mut earlier.1);
        }
        same
    });
    Ok(pax)
}

fn decode_compression(
    info: &Table<'_>,
    compressed_size: u64,
    uncompressed_size: u64,
) -> Result<(Zinfo, Vec<[u8; 32]>), String> {
    let e = fb("compression info");
    let algorithm = info.i8(slot::CI_ALGORITHM, ALGORITHM_GZIP).map_err(&e)?;
    let max_span_id = info.i32(slot::CI_MAX_SPAN_ID, 0).map_err(&e)?;
    let digests = info.vector(slot::CI_SPAN_DIGESTS).map_err(&e)?;
    let checkpoints = info
        .bytes(slot::CI_CHECKPOINTS)
        .map_err(&e)?
        .unwrap_or_default();
    let spans = usize::try_from(max_span_id)
        .map(|m| m + 1)
        .ok()
        .filter(|&n| n <= MAX_SPANS)
        .ok_or_else(|| format!("zTOC: max span id {max_span_id}"))?;
    let claimed = digests.map_or(0, |v| v.len());
    if claimed != spans {
        return Err(format!("zTOC: {claimed} span digests for {spans} spans"));
    }
    let zinfo = match algorithm {
        ALGORITHM_GZIP => {
            let z = GzipZinfo::decode(checkpoints)?;
            check_gzip_bounds(&z, compressed_size, uncompressed_size)?;
            (z.checkpoints.len() == spans).then_some(Zinfo::Gzip(z))
        }
        ALGORITHM_UNCOMPRESSED => {
            let z = TarZinfo::decode(checkpoints)?;
            if z.size != compressed_size {
                return Err(format!(
                    "zTOC: tar zinfo of {} bytes for a {compressed_size}-byte layer",
                    z.size
                ));
            }
            (z.spans() == spans as u64).then_some(Zinfo::Tar(z))
        }
        other => return Err(format!("zTOC: compression algorithm {other}")),
    }
    .ok_or_else(|| format!("zTOC: max span id {max_span_id} does not match its checkpoints"))?;
    let digests = match digests {
        Some(v) => (0..v.len())
            .map(|i| {
                let text = v.string(i).map_err(&e)?;
                parse_digest(text).ok_or_else(|| {
                    format!(
                        "zTOC span digest {i} {:?} is not a sha256 digest",
                        String::from_utf8_lossy(text)
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    if digests.len() != spans {
        return Err(format!(
            "zTOC: {} span digests for {spans} spans",
            digests.len()
        ));
    }
    Ok((zinfo, digests))
}

/// Every span is a non-empty range of the blob and of the tar stream.
fn check_gzip_bounds(z: &GzipZinfo, compressed: u64, uncompressed: u64) -> Result<(), String> {
    for (i, c) in z.checkpoints.iter().enumerate() {
        if c.input > compressed || c.start_byte() >= compressed || c.out > uncompressed {
            return Err(format!(
                "zTOC checkpoint {i} (byte {}, output {}) lies outside the layer ({compressed} bytes, {uncompressed} decoded)",
                c.input, c.out
            ));
        }
    }
    Ok(())
}

fn encode_file(b: &mut Builder, f: &FileMetadata) -> Offset {
    let name = b.string(&f.name);
    let kind = b.string(f.kind.name().as_bytes());
    let linkname = b.string(&f.linkname);
    let uname = b.string(&f.uname);
    let gname = b.string(&f.gname);
    // Go writes an empty string for a time it cannot write as RFC 3339.
    let text = mtime::format(f.mtime.0, f.mtime.1).unwrap_or_default();
    let mod_time = b.string(text.as_bytes());
    let pax: Vec<Offset> = f
        .pax
        .iter()
        .map(|(k, v)| {
            let (k, v) = (b.string(k), b.string(v));
            b.start_table();
            b.offset(slot::XATTR_KEY, k);
            b.offset(slot::XATTR_VALUE, v);
            b.end_table()
        })
        .collect();
    let xattrs = b.offset_vector(&pax);
    b.start_table();
    b.i64(slot::FM_OFFSET, f.offset as i64, 0);
    b.i64(slot::FM_SIZE, f.size as i64, 0);
    b.i64(slot::FM_MODE, f.mode, 0);
    b.i64(slot::FM_DEVMAJOR, i64::from(f.devmajor), 0);
    b.i64(slot::FM_DEVMINOR, i64::from(f.devminor), 0);
    b.offset(slot::FM_NAME, name);
    b.offset(slot::FM_TYPE, kind);
    b.offset(slot::FM_LINKNAME, linkname);
    b.u32(slot::FM_UID, f.uid, 0);
    b.u32(slot::FM_GID, f.gid, 0);
    b.offset(slot::FM_UNAME, uname);
    b.offset(slot::FM_GNAME, gname);
    b.offset(slot::FM_MOD_TIME, mod_time);
    b.offset(slot::FM_XATTRS, xattrs);
    b.end_table()
}

fn encode_compression(b: &mut Builder, zinfo: &Zinfo, digests: &[[u8; 32]]) -> Offset {
    let (algorithm, blob, spans) = match zinfo {
        Zinfo::Gzip(z) => (ALGORITHM_GZIP, z.encode(), z.checkpoints.len()),
        Zinfo::Tar(z) => (ALGORITHM_UNCOMPRESSED, z.encode(), z.spans() as usize),
    };
    let checkpoints = b.byte_vector(&blob);
    let texts: Vec<Offset> = digests
        .iter()
        .map(|d| b.string(format_digest(d).as_bytes()))
        .collect();
    let span_digests = b.offset_vector(&texts);
    b.start_table();
    b.offset(slot::CI_SPAN_DIGESTS, span_digests);
    b.offset(slot::CI_CHECKPOINTS, checkpoints);
    b.i32(slot::CI_MAX_SPAN_ID, spans as i32 - 1, 0);
    b.i8(slot::CI_ALGORITHM, algorithm, ALGORITHM_GZIP);
    b.end_table()
}
