//! A zTOC and what regfs knows of a layer, one into the other: zTOC files become
//! [`Entry`]s, its checkpoints [`Checkpoint`]s and its spans [`Span`]s, and back.
//!
//! Both directions keep, per entry, where its tar headers are ([`TarPlace`]): soci
//! does not store them but derives them (each entry's headers start where the entry
//! before it ends, rounded up to a block), and both soci-snapshotter and regfs check a
//! file's header there before serving it (docs/SEMANTICS.md, "Trust"), so an index
//! cannot point a file at another file's bytes.

use std::ops::Range;

use super::spans::{self, Span};
use super::zinfo::{GzipZinfo, TarZinfo, WINDOW, ZINFO_VERSION, ZinfoCheckpoint};
use super::ztoc::{self, FileMetadata, FileType, Zinfo, Ztoc};
use crate::image::codec::{Checkpoint, Codec};
pub use crate::image::entry::TarPlace;
use crate::image::entry::{DataRef, Entry, EntryKind, Xattrs, normalise, shown};

/// The PAX records that are xattrs.
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// A layer as a zTOC describes it, in regfs's terms.
#[derive(Debug)]
pub struct SociLayer {
    pub codec: Codec,
    /// In tar order; entries regfs does not show are left out (see `refused`).
    pub entries: Vec<Entry>,
    /// One per entry.
    pub places: Vec<TarPlace>,
    /// Sorted; for gzip the first is at the first deflate byte, not the blob's start.
    pub checkpoints: Vec<Checkpoint>,
    pub spans: Vec<Span>,
    pub blob_size: u64,
    /// The tar stream's size.
    pub tar_size: u64,
    /// Why entries were left out, for the log.
    pub refused: Vec<String>,
}

/// Reads a zTOC as the index of the layer `layer_size` bytes long it claims to
/// describe (the size comes from the image manifest, which the image's digest vouches
/// for).
pub fn from_ztoc(z: &Ztoc, layer_size: u64) -> Result<SociLayer, String> {
    if z.compressed_size != layer_size {
        return Err(format!(
            "the zTOC describes a layer of {} bytes, the layer has {layer_size}",
            z.compressed_size
        ));
    }
    let (codec, checkpoints, ranges) = match &z.zinfo {
        Zinfo::Gzip(g) => {
            let points: Vec<Checkpoint> = g.checkpoints.iter().map(to_checkpoint).collect();
            let ranges = spans::checkpoint_ranges(&points, layer_size)?;
            (Codec::Gzip, points, ranges)
        }
        Zinfo::Tar(t) => (
            Codec::Tar,
            vec![Checkpoint::START],
            spans::fixed_ranges(t.span_size, t.size),
        ),
    };
    if ranges.len() != z.span_digests.len() {
        return Err(format!(
            "{} span digests for {} spans",
            z.span_digests.len(),
            ranges.len()
        ));
    }
    let spans = ranges
        .into_iter()
        .zip(&z.span_digests)
        .map(|(range, &digest)| Span { range, digest })
        .collect();
    let mut layer = SociLayer {
        codec,
        entries: Vec::with_capacity(z.files.len()),
        places: Vec::with_capacity(z.files.len()),
        checkpoints,
        spans,
        blob_size: layer_size,
        tar_size: z.uncompressed_size,
        refused: Vec::new(),
    };
    for f in &z.files {
        match to_entry(f) {
            Ok(entry) => {
                let raw_name = (*f.name != *entry.path).then(|| f.name.clone());
                layer.places.push(TarPlace {
                    header: f.header_offset,
                    data: f.offset,
                    raw_name,
                });
                layer.entries.push(entry);
            }
            Err(why) => layer.refused.push(why),
        }
    }
    Ok(layer)
}

/// A zinfo checkpoint as a decoder start: the window is cut to what can matter (no
/// more output than came before it).
fn to_checkpoint(c: &ZinfoCheckpoint) -> Checkpoint {
    let keep = c.out.min(c.window.len() as u64) as usize;
    Checkpoint {
        in_bit: c.in_bit(),
        out: c.out,
        window: Some(c.window[c.window.len() - keep..].into()),
    }
}

fn to_kind(t: FileType) -> EntryKind {
    match t {
        FileType::Reg => EntryKind::File,
        FileType::Dir => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        FileType::Hardlink => EntryKind::Hardlink,
        FileType::Char => EntryKind::CharDev,
        FileType::Block => EntryKind::BlockDev,
        FileType::Fifo => EntryKind::Fifo,
    }
}

fn to_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::Reg,
        EntryKind::Dir => FileType::Dir,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Hardlink => FileType::Hardlink,
        EntryKind::CharDev => FileType::Char,
        EntryKind::BlockDev => FileType::Block,
        EntryKind::Fifo => FileType::Fifo,
    }
}

/// A zTOC file as an entry, with the same rules for names and links as tar headers
/// (src/image/tar.rs), or why it is not shown.
fn to_entry(f: &FileMetadata) -> Result<Entry, String> {
    let kind = to_kind(f.kind);
    let path = normalise(&f.name).map_err(|e| format!("{}: {e}", shown(&f.name)))?;
    if path.is_empty() && kind != EntryKind::Dir {
        return Err(format!("{}: names the root", shown(&f.name)));
    }
    let link = match kind {
        EntryKind::Symlink if f.linkname.is_empty() || f.linkname.contains(&0) => {
            return Err(format!("{}: bad symlink target", shown(&path)));
        }
        EntryKind::Symlink => Some(f.linkname.clone()),
        EntryKind::Hardlink => {
            let target = normalise(&f.linkname)
                .map_err(|e| format!("{}: hardlink target: {e}", shown(&path)))?;
            if target.is_empty() {
                return Err(format!("{}: hardlink to the root", shown(&path)));
            }
            Some(target)
        }
        _ => None,
    };
    let xattrs = f
        .pax
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(XATTR_PREFIX)?.into(), v.clone())))
        .filter(|(k, _): &(Box<[u8]>, Box<[u8]>)| !k.is_empty())
        .collect();
    let size = if kind == EntryKind::File { f.size } else { 0 };
    Ok(Entry {
        path,
        kind,
        mode: (f.mode & 0o7777) as u32,
        uid: f.uid,
        gid: f.gid,
        mtime: f.mtime.0,
        mtime_nsec: f.mtime.1,
        size,
        link,
        rdev: match kind {
            EntryKind::CharDev | EntryKind::BlockDev => (f.devmajor, f.devminor),
            _ => (0, 0),
        },
        xattrs,
        data: if size > 0 {
            DataRef::Stream(f.offset)
        } else {
            DataRef::None
        },
    })
}

/// What a zTOC is made from: a layer regfs indexed itself.
pub struct LayerForZtoc<'a> {
    pub codec: Codec,
    /// Every tar entry of the layer, in order (a zTOC that leaves one out points the
    /// next entry's header at the wrong bytes).
    pub entries: &'a [Entry],
    pub places: &'a [TarPlace],
    /// gzip: the first is at the first deflate byte (SOCI's first checkpoint).
    pub checkpoints: &'a [Checkpoint],
    /// SOCI's spans for these checkpoints (gzip) or fixed spans (tar).
    pub spans: &'a [Span],
    pub blob_size: u64,
    pub tar_size: u64,
    /// Uncompressed bytes between checkpoints (gzip), or the span size (tar).
    pub span_size: u64,
    pub build_tool: &'a str,
}

/// The zTOC of a layer regfs indexed; an error when the layer is not one soci can
/// describe (zstd, entries missing, checkpoints that are not SOCI's).
pub fn to_ztoc(layer: &LayerForZtoc<'_>) -> Result<Ztoc, String> {
    if layer.entries.len() != layer.places.len() {
        return Err("entries and tar places differ in number".into());
    }
    let (zinfo, ranges) = match layer.codec {
        Codec::Gzip => gzip_zinfo(layer)?,
        Codec::Tar => {
            let z = TarZinfo {
                version: ZINFO_VERSION,
                span_size: layer.span_size,
                size: layer.blob_size,
            };
            (
                Zinfo::Tar(z),
                spans::fixed_ranges(layer.span_size, layer.blob_size),
            )
        }
        Codec::Zstd => return Err("SOCI has no zstd layers".into()),
    };
    let given: Vec<&Range<u64>> = layer.spans.iter().map(|s| &s.range).collect();
    if given != ranges.iter().collect::<Vec<_>>() {
        return Err("the layer's spans are not the spans SOCI defines for its checkpoints".into());
    }
    let mut files = Vec::with_capacity(layer.entries.len());
    let mut next_header = 0u64;
    for (entry, place) in layer.entries.iter().zip(layer.places) {
        if place.header != next_header || place.data < place.header {
            return Err(format!(
                "{}: its header is at {}, where soci would look for it at {next_header}",
                shown(&entry.path),
                place.header
            ));
        }
        let file = to_file(entry, place);
        next_header = file
            .offset
            .checked_add(file.size)
            .and_then(ztoc::align_to_block)
            .ok_or("an entry past 2^64")?;
        files.push(file);
    }
    if next_header > layer.tar_size {
        return Err(format!(
            "entries run past the {}-byte tar stream",
            layer.tar_size
        ));
    }
    Ok(Ztoc {
        version: ztoc::VERSION.into(),
        build_tool: layer.build_tool.into(),
        compressed_size: layer.blob_size,
        uncompressed_size: layer.tar_size,
        files,
        zinfo,
        span_digests: layer.spans.iter().map(|s| s.digest).collect(),
    })
}

fn gzip_zinfo(layer: &LayerForZtoc<'_>) -> Result<(Zinfo, Vec<Range<u64>>), String> {
    match layer.checkpoints.first() {
        Some(first) if first.out == 0 && first.in_bit > 0 && first.in_bit % 8 == 0 => {}
        _ => return Err("the first checkpoint is not the first deflate byte".into()),
    }
    let mut points = Vec::with_capacity(layer.checkpoints.len());
    for c in layer.checkpoints {
        let window = c.window.as_deref().unwrap_or_default();
        if window.len() > WINDOW {
            return Err(format!("a window of {} bytes", window.len()));
        }
        let bits = ((8 - c.in_bit % 8) % 8) as u8;
        points.push(ZinfoCheckpoint {
            input: c.in_bit.div_ceil(8),
            out: c.out,
            bits,
            window: window.into(),
        });
    }
    let ranges = spans::checkpoint_ranges(layer.checkpoints, layer.blob_size)?;
    let zinfo = GzipZinfo {
        span_size: layer.span_size,
        checkpoints: points,
    };
    Ok((Zinfo::Gzip(zinfo), ranges))
}

fn to_file(entry: &Entry, place: &TarPlace) -> FileMetadata {
    let mut pax: Xattrs = entry
        .xattrs
        .iter()
        .map(|(k, v)| ([XATTR_PREFIX, k].concat().into(), v.clone()))
        .collect();
    pax.sort_by(|a, b| a.0.cmp(&b.0));
    let (devmajor, devminor) = entry.rdev;
    FileMetadata {
        name: place.raw_name.clone().unwrap_or_else(|| entry.path.clone()),
        kind: to_type(entry.kind),
        offset: place.data,
        size: entry.size,
        header_offset: place.header,
        linkname: entry.link.clone().unwrap_or_default(),
        mode: i64::from(entry.mode),
        uid: entry.uid,
        gid: entry.gid,
        uname: Box::default(),
        gname: Box::default(),
        mtime: (entry.mtime, entry.mtime_nsec),
        devmajor,
        devminor,
        pax,
    }
}

/// The checkpoints of regfs's pass as SOCI's: the pass starts at the blob's first byte
/// (gzip header included); SOCI's first checkpoint is the first deflate byte, right
/// after the first member's header of `header_len` bytes, with an empty window.
pub fn soci_checkpoints(pass: &[Checkpoint], header_len: u64) -> Vec<Checkpoint> {
    let first = Checkpoint {
        in_bit: header_len * 8,
        out: 0,
        window: Some(Box::default()),
    };
    std::iter::once(first)
        .chain(pass.iter().filter(|c| c.out > 0).cloned())
        .collect()
}
