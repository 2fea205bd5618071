//! A TOC's entries made into a layer index: tar metadata for every entry and, for each
//! regular file, the chunks that hold its bytes with the blob range each is read from.
//!
//! What writers put in a TOC (eStargz and ctr-remote's zstd:chunked share
//! stargz-snapshotter's JSON; podman writes containers/storage's, a superset):
//! - A file's first chunk is its `reg` entry; more follow as `chunk` entries of the
//!   same name, each with `chunkOffset`, where it starts in the file.
//! - `chunkSize` left out means "to the next chunk, or the end of the file":
//!   ctr-remote leaves it out of one-chunk files and of every file's last chunk.
//! - A chunk's compressed bytes start at `offset` (a gzip member or zstd frame) and end
//!   where the next data starts (the next greater offset, else the TOC), or earlier at
//!   the file's `endOffset` (containers/storage: where the file's last frame ends).
//! - eStargz may pack small files into one member: they share `offset`, and
//!   `innerOffset` says where each starts in the member's decoded bytes.
//! - `chunkDigest` checks one chunk; a one-chunk file may carry only `digest` (the
//!   file's, the same bytes). containers/storage marks runs of zeros `chunkType: zeros`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use serde::Deserialize;

use super::super::codec::Codec;
use super::super::entry::{DataRef, Entry, EntryKind, drop_estargz_metadata, normalise, shown};
use super::super::index::{Chunk, ChunkMap, Content, IndexSource, LayerIndex};
use super::super::index::{MAX_ENTRIES, unreadable};
use super::rfc3339::parse_rfc3339;
use crate::registry::{Digest, Result};

#[derive(Deserialize)]
pub struct Toc {
    #[serde(default)]
    pub entries: Vec<TocEntry>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub modtime: Option<String>,
    pub link_name: String,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub dev_major: i64,
    pub dev_minor: i64,
    pub xattrs: BTreeMap<String, String>,
    pub digest: Option<String>,
    pub offset: u64,
    pub end_offset: u64,
    pub chunk_offset: u64,
    pub chunk_size: u64,
    pub chunk_digest: Option<String>,
    pub chunk_type: String,
    pub inner_offset: u64,
}

/// A chunk as its TOC entry gives it, before its size and end are worked out.
struct Piece {
    offset: u64,
    inner_offset: u64,
    file_offset: u64,
    /// 0: up to the next chunk, or the end of the file.
    size: u64,
    digest: Option<[u8; 32]>,
    zeros: bool,
}

/// A regular file with content, and the chunks its entries named.
struct File {
    /// Its place in the index's entries.
    entry: usize,
    size: u64,
    /// containers/storage: where the file's compressed data ends (0: not given).
    end_offset: u64,
    /// The whole file's digest.
    digest: Option<[u8; 32]>,
    pieces: Vec<Piece>,
}

/// What the TOC's entries made so far.
#[derive(Default)]
struct Parsed<'a> {
    entries: Vec<Entry>,
    files: Vec<File>,
    /// Files by raw TOC name (`None`: not shown, its chunks are dropped too).
    by_name: HashMap<&'a str, Option<usize>>,
    /// The last file entry, for chunks that do not say whose they are.
    last: Option<Option<usize>>,
}

/// The index a parsed TOC describes. `data_end` is where file data ends (the TOC's
/// own offset).
pub fn build(
    digest: &Digest,
    codec: Codec,
    toc: &Toc,
    data_end: u64,
    source: IndexSource,
) -> Result<LayerIndex> {
    let bad = |what: String| unreadable(digest, format!("TOC: {what}"));
    if toc.entries.len() > MAX_ENTRIES {
        return Err(bad(format!("more than {MAX_ENTRIES} entries")));
    }
    let mut parsed = Parsed::default();
    for e in &toc.entries {
        parsed.add(digest, e)?;
    }
    let Parsed {
        mut entries, files, ..
    } = parsed;
    // Where each compressed chunk ends: at the next offset the TOC names.
    let starts: BTreeSet<u64> = files
        .iter()
        .flat_map(|f| f.pieces.iter().map(|p| p.offset))
        .filter(|&o| o > 0)
        .chain([data_end])
        .collect();
    let mut chunks: Vec<Chunk> = Vec::new();
    for file in files {
        let first = chunks.len();
        chunks.extend(
            file_chunks(&file, &starts, data_end)
                .map_err(|e| bad(format!("{}: {e}", shown(&entries[file.entry].path))))?,
        );
        let range = u32::try_from(first)
            .ok()
            .zip(u32::try_from(chunks.len()).ok());
        let Some((from, to)) = range else {
            return Err(bad("too many chunks".into()));
        };
        entries[file.entry].data = DataRef::Chunks(from..to);
    }
    let prefetch_end = prefetch_end(toc, data_end);
    // Wherever they are (after the files wanted first), landmarks are not image files.
    entries.retain(|e| !LANDMARKS.contains(&&*e.path));
    drop_estargz_metadata(&mut entries);
    Ok(LayerIndex {
        entries,
        places: Vec::new(),
        content: Content::Chunks(ChunkMap {
            codec,
            chunks,
            prefetch_end,
        }),
        source,
        toc_unused: None,
        soci_unused: None,
        tar_size: 0,
        publishable: false,
    })
}

impl<'a> Parsed<'a> {
    /// Takes in one TOC entry: a file, directory, link, device, or a file's chunk.
    fn add(&mut self, layer: &Digest, e: &'a TocEntry) -> Result<()> {
        let bad = |what: String| unreadable(layer, format!("TOC: {what}"));
        if e.kind == "chunk" {
            let owner = match e.name.as_str() {
                "" => self.last,
                name => self.by_name.get(name).copied(),
            };
            return match owner {
                Some(Some(file)) => {
                    let piece = piece(e).map_err(|w| bad(format!("{}: {w}", e.name)))?;
                    self.files[file].pieces.push(piece);
                    Ok(())
                }
                Some(None) => Ok(()), // a chunk of a file that is not shown
                None => Err(bad(format!("{}: a chunk of no file before it", e.name))),
            };
        }
        let Some(entry) = entry(layer, e)? else {
            if e.kind == "reg" {
                self.by_name.insert(&e.name, None);
                self.last = Some(None);
            }
            return Ok(());
        };
        if entry.kind == EntryKind::File {
            let file = (entry.size > 0).then_some(self.files.len());
            if file.is_some() {
                self.files.push(File {
                    entry: self.entries.len(),
                    size: entry.size,
                    end_offset: e.end_offset,
                    digest: sha256_of(e.digest.as_deref()),
                    pieces: vec![piece(e).map_err(|w| bad(format!("{}: {w}", e.name)))?],
                });
            }
            self.by_name.insert(&e.name, file);
            self.last = Some(file);
        }
        self.entries.push(entry);
        Ok(())
    }
}

/// The chunk an entry (`reg` or `chunk`) names.
fn piece(e: &TocEntry) -> std::result::Result<Piece, String> {
    let zeros = match e.chunk_type.as_str() {
        "" | "data" => false,
        "zeros" => true,
        other => return Err(format!("chunk of unknown type {other:?}")),
    };
    let digest = match e.chunk_digest.as_deref() {
        None => None,
        Some(d) => Some(sha256_of(Some(d)).ok_or("chunk digest is not sha256")?),
    };
    Ok(Piece {
        offset: e.offset,
        inner_offset: e.inner_offset,
        file_offset: e.chunk_offset,
        size: e.chunk_size,
        digest,
        zeros,
    })
}

fn sha256_of(digest: Option<&str>) -> Option<[u8; 32]> {
    Digest::parse(digest?)?.sha256_bytes()
}

/// A file's chunks in file order, each with its size and blob range, covering the file
/// exactly (or why they do not).
fn file_chunks(
    file: &File,
    starts: &BTreeSet<u64>,
    data_end: u64,
) -> std::result::Result<Vec<Chunk>, String> {
    let mut pieces: Vec<&Piece> = file.pieces.iter().collect();
    pieces.sort_by_key(|p| p.file_offset);
    let mut out = Vec::with_capacity(pieces.len());
    let mut at = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        if p.file_offset != at {
            return Err(format!(
                "its chunks leave a gap or overlap at byte {at} (a chunk starts at {})",
                p.file_offset
            ));
        }
        let next = pieces.get(i + 1).map_or(file.size, |n| n.file_offset);
        let size = match p.size {
            0 => next.saturating_sub(at),
            size => size,
        };
        if size == 0 || at.checked_add(size).is_none_or(|e| e > file.size) {
            return Err(format!("a chunk at byte {at} of {size} bytes"));
        }
        let digest = p.digest.or(file.digest.filter(|_| pieces.len() == 1));
        let compressed = if p.zeros {
            0..0
        } else {
            let next_start = starts.range(p.offset.saturating_add(1)..).next().copied();
            let mut end = next_start.unwrap_or(data_end).min(data_end);
            if file.end_offset > p.offset {
                end = end.min(file.end_offset);
            }
            if p.offset == 0 || p.offset >= end {
                return Err(format!("chunk at byte {at} has no place in the blob"));
            }
            if digest.is_none() {
                return Err(format!("chunk at byte {at} has no sha256 digest"));
            }
            p.offset..end
        };
        out.push(Chunk {
            compressed,
            inner_offset: p.inner_offset,
            file_offset: at,
            size,
            digest,
            hole: p.zeros,
        });
        at += size;
    }
    if at != file.size {
        return Err(format!("chunks cover {at} of {} bytes", file.size));
    }
    Ok(out)
}

const LANDMARKS: [&[u8]; 2] = [b".prefetch.landmark", b".no.prefetch.landmark"];

/// Where eStargz's `.prefetch.landmark` is: the files its writer wanted first are before
/// it in the blob. None without one, or with `.no.prefetch.landmark` (nothing first).
fn prefetch_end(toc: &Toc, data_end: u64) -> Option<u64> {
    let named = |name: &[u8]| {
        toc.entries
            .iter()
            .find(|e| e.kind == "reg" && normalise(e.name.as_bytes()).is_ok_and(|p| &*p == name))
    };
    if named(LANDMARKS[1]).is_some() {
        return None;
    }
    named(LANDMARKS[0])
        .map(|e| e.offset)
        .filter(|&at| at > 0 && at <= data_end)
}

/// The entry a TOC entry describes (`None`: not shown, with the reason logged).
fn entry(layer: &Digest, e: &TocEntry) -> Result<Option<Entry>> {
    let bad = |what: &str| unreadable(layer, format!("TOC: {}: {what}", e.name));
    let kind = match e.kind.as_str() {
        "dir" => EntryKind::Dir,
        "reg" => EntryKind::File,
        "symlink" => EntryKind::Symlink,
        "hardlink" => EntryKind::Hardlink,
        "char" => EntryKind::CharDev,
        "block" => EntryKind::BlockDev,
        "fifo" => EntryKind::Fifo,
        other => {
            tracing::warn!(layer = %layer, "TOC entry {:?} of type {other:?} not shown", e.name);
            return Ok(None);
        }
    };
    let path = match normalise(e.name.as_bytes()) {
        Ok(p) if !p.is_empty() || kind == EntryKind::Dir => p,
        Ok(_) | Err(_) => {
            tracing::warn!(layer = %layer, "TOC entry {} not shown: bad name", shown(e.name.as_bytes()));
            return Ok(None);
        }
    };
    let link = match kind {
        EntryKind::Symlink if !e.link_name.is_empty() && !e.link_name.contains('\0') => {
            Some(e.link_name.as_bytes().into())
        }
        EntryKind::Hardlink => match normalise(e.link_name.as_bytes()) {
            Ok(t) if !t.is_empty() => Some(t),
            _ => return Err(bad("bad hardlink target")),
        },
        EntryKind::Symlink => return Err(bad("symlink without a target")),
        _ => None,
    };
    let id = |v: i64| u32::try_from(v).map_err(|_| bad("bad uid/gid/mode/device"));
    let (mtime, mtime_nsec) = e
        .modtime
        .as_deref()
        .and_then(parse_rfc3339)
        .unwrap_or((0, 0));
    Ok(Some(Entry {
        path,
        kind,
        mode: id(e.mode)? & 0o7777,
        uid: id(e.uid)?,
        gid: id(e.gid)?,
        mtime,
        mtime_nsec,
        size: if kind == EntryKind::File { e.size } else { 0 },
        link,
        rdev: (id(e.dev_major)?, id(e.dev_minor)?),
        xattrs: xattrs(e).map_err(|w| bad(&w))?,
        data: DataRef::None,
    }))
}

/// A TOC entry's xattrs (values are base64).
fn xattrs(e: &TocEntry) -> std::result::Result<super::super::entry::Xattrs, String> {
    let mut out = Vec::new();
    for (name, value) in &e.xattrs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| format!("xattr {name} is not base64"))?;
        out.push((name.as_bytes().into(), value.into_boxed_slice()));
    }
    Ok(out)
}
