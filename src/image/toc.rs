//! Layers that carry a table of contents: eStargz (gzip, TOC found through a footer)
//! and zstd:chunked (zstd, TOC position in the descriptor's annotations). Both TOCs
//! are the same JSON: entries with tar metadata, and for file data the compressed
//! offset of a gzip member / zstd frame holding each chunk, with the chunk's digest.
//!
//! Trust: the TOC is used only if it matches the digest the layer descriptor names
//! (`containerd.io/snapshot/stargz/toc.digest`, or the zstd:chunked manifest
//! checksum); then every chunk is checked against its `chunkDigest` when read. A layer
//! whose TOC is missing, unreadable or does not match is indexed by the plain pass
//! instead, which verifies the whole blob.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde::Deserialize;

use super::codec::{Codec, decode_range};
use super::entry::{DataRef, Entry, EntryKind, drop_estargz_metadata, normalise, shown};
use super::index::{Chunk, ChunkMap, Content, IndexSource, LayerIndex};
use super::index::{MAX_ENTRIES, unreadable};
use super::source::BlobSource;
use crate::registry::{Digest, Result};

pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// zstd:chunked annotations, under the name containers/storage uses now and the one
/// older writers (stargz-snapshotter 0.12) used.
const ZSTD_CHUNKED_CHECKSUM: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
const ZSTD_CHUNKED_POSITION: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];

/// The eStargz footer: an empty gzip member whose extra field holds the TOC offset.
const FOOTER: u64 = 51;
/// The footer of eStargz's predecessor (stargz), without the `SG` subfield.
const LEGACY_FOOTER: u64 = 47;
/// Largest TOC accepted, compressed and uncompressed.
const MAX_TOC: u64 = 64 << 20;
const MAX_TOC_JSON: usize = 256 << 20;

/// How a layer with a TOC says where it is and what it must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TocRef {
    Estargz {
        toc_digest: Digest,
    },
    ZstdChunked {
        checksum: Digest,
        offset: u64,
        len: u64,
        json_len: u64,
    },
}

impl TocRef {
    /// The digest the TOC must match: what identifies this TOC.
    pub fn digest(&self) -> &Digest {
        match self {
            TocRef::Estargz { toc_digest } => toc_digest,
            TocRef::ZstdChunked { checksum, .. } => checksum,
        }
    }

    /// The TOC a layer descriptor announces, if any (and if its codec fits).
    pub fn from_annotations(
        codec: Codec,
        annotations: &BTreeMap<String, String>,
    ) -> Option<TocRef> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| annotations.get(*k));
        match codec {
            Codec::Gzip => {
                let toc_digest = Digest::parse(annotations.get(ESTARGZ_TOC_DIGEST)?)?;
                Some(TocRef::Estargz { toc_digest })
            }
            Codec::Zstd => {
                let checksum = Digest::parse(get(&ZSTD_CHUNKED_CHECKSUM)?)?;
                let mut parts = get(&ZSTD_CHUNKED_POSITION)?
                    .split(':')
                    .map(str::parse::<u64>);
                let (Some(Ok(offset)), Some(Ok(len)), Some(Ok(json_len))) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return None;
                };
                Some(TocRef::ZstdChunked {
                    checksum,
                    offset,
                    len,
                    json_len,
                })
            }
            Codec::Tar => None,
        }
    }
}

/// Reads and checks the TOC of a layer and makes its index.
pub async fn toc_index(source: &dyn BlobSource, toc: &TocRef) -> Result<LayerIndex> {
    let digest = source.digest().clone();
    let size = source.size();
    let (codec, json, data_end, kind) = match toc {
        TocRef::Estargz { toc_digest } => {
            let (json, toc_offset) = estargz_toc(source).await?;
            if !toc_digest.matches(&json) {
                return Err(unreadable(
                    &digest,
                    "its eStargz TOC does not match the TOC digest annotation",
                ));
            }
            (Codec::Gzip, json, toc_offset, IndexSource::Estargz)
        }
        TocRef::ZstdChunked {
            checksum,
            offset,
            len,
            json_len,
        } => {
            let end = offset.checked_add(*len).filter(|&e| e <= size);
            if end.is_none() || *len > MAX_TOC || *json_len > MAX_TOC_JSON as u64 {
                return Err(unreadable(
                    &digest,
                    "its zstd:chunked manifest position is out of range",
                ));
            }
            let compressed = source.read(*offset, *len).await?;
            if !checksum.matches(&compressed) {
                return Err(unreadable(
                    &digest,
                    "its zstd:chunked manifest does not match its checksum annotation",
                ));
            }
            let json = decode_range(Codec::Zstd, &compressed, 0, *json_len as usize)
                .map_err(|e| unreadable(&digest, format!("zstd:chunked manifest: {e}")))?;
            (Codec::Zstd, json, *offset, IndexSource::ZstdChunked)
        }
    };
    let parsed: Toc = serde_json::from_slice(&json)
        .map_err(|e| unreadable(&digest, format!("TOC is not valid JSON: {e}")))?;
    build(&digest, codec, parsed, data_end, kind)
}

/// The eStargz TOC JSON and the blob offset where the TOC starts (where file data ends).
async fn estargz_toc(source: &dyn BlobSource) -> Result<(Vec<u8>, u64)> {
    let digest = source.digest().clone();
    let size = source.size();
    if size < FOOTER {
        return Err(unreadable(&digest, "too small to be eStargz"));
    }
    let tail = source.read(size - FOOTER, FOOTER).await?;
    let (toc_offset, footer) = match footer_offset(&tail) {
        Some(offset) => (offset, FOOTER),
        None => match footer_offset(&tail[(FOOTER - LEGACY_FOOTER) as usize..]) {
            Some(offset) => (offset, LEGACY_FOOTER),
            None => return Err(unreadable(&digest, "no eStargz footer at its end")),
        },
    };
    let toc_end = size - footer;
    if toc_offset >= toc_end || toc_end - toc_offset > MAX_TOC {
        return Err(unreadable(
            &digest,
            "eStargz footer names an impossible TOC offset",
        ));
    }
    let compressed = source.read(toc_offset, toc_end - toc_offset).await?;
    let tar = decode_all_gzip(&compressed, MAX_TOC_JSON + (1 << 20))
        .map_err(|e| unreadable(&digest, format!("eStargz TOC: {e}")))?;
    let json = tar_member(&tar, b"stargz.index.json")
        .ok_or_else(|| unreadable(&digest, "eStargz TOC has no stargz.index.json"))?;
    Ok((json.to_vec(), toc_offset))
}

/// The TOC offset in an eStargz (51-byte) or stargz (47-byte) footer.
fn footer_offset(footer: &[u8]) -> Option<u64> {
    // gzip header with FEXTRA: 1f 8b 08 04, mtime, xfl, os, then XLEN.
    if footer.len() < 12 || footer[..4] != [0x1f, 0x8b, 0x08, 0x04] {
        return None;
    }
    let xlen = usize::from(u16::from_le_bytes([footer[10], footer[11]]));
    let extra = footer.get(12..12 + xlen)?;
    // eStargz: subfield "SG" of 22 bytes; stargz: the 22 bytes directly.
    let payload = match extra {
        [b'S', b'G', 22, 0, rest @ ..] if xlen == 26 => rest,
        rest if xlen == 22 => rest,
        _ => return None,
    };
    let (hex, magic) = payload.split_at(16);
    if magic != b"STARGZ" {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Decodes a small gzip stream whole (at most `max` bytes of output).
fn decode_all_gzip(compressed: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    use super::codec::{Checkpoint, Decoder};
    let mut decoder = Decoder::at(Codec::Gzip, &Checkpoint::START)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut rest = compressed;
    loop {
        let step = decoder.decode(rest, &mut buf)?;
        rest = &rest[step.consumed..];
        out.extend_from_slice(&buf[..step.produced]);
        if out.len() > max {
            return Err(format!("decodes to more than {max} bytes"));
        }
        if rest.is_empty() && step.produced == 0 && step.consumed == 0 && !step.boundary {
            break;
        }
    }
    decoder.finish()?;
    Ok(out)
}

/// The content of the entry called `name` in a small tar archive held in memory.
fn tar_member<'a>(tar: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut parser = super::tar::TarParser::default();
    let mut found = None;
    parser
        .feed(tar, &mut |item| {
            if let super::tar::TarItem::Entry(e) = item {
                if &*e.path == name {
                    if let DataRef::Stream(at) = e.data {
                        found = Some((at, e.size));
                    }
                }
            }
        })
        .ok()?;
    let (at, len) = found?;
    tar.get(usize::try_from(at).ok()?..usize::try_from(at.checked_add(len)?).ok()?)
}

#[derive(Deserialize)]
struct Toc {
    #[serde(default)]
    entries: Vec<TocEntry>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    modtime: Option<String>,
    link_name: String,
    mode: i64,
    uid: i64,
    gid: i64,
    dev_major: i64,
    dev_minor: i64,
    xattrs: BTreeMap<String, String>,
    digest: Option<String>,
    offset: u64,
    end_offset: u64,
    chunk_offset: u64,
    chunk_size: u64,
    chunk_digest: Option<String>,
    chunk_type: String,
    inner_offset: u64,
}

/// The index a parsed TOC describes. `data_end` is where file data ends (the TOC's
/// own offset).
fn build(
    digest: &Digest,
    codec: Codec,
    toc: Toc,
    data_end: u64,
    source: IndexSource,
) -> Result<LayerIndex> {
    let bad = |what: String| unreadable(digest, format!("TOC: {what}"));
    if toc.entries.len() > MAX_ENTRIES {
        return Err(bad(format!("more than {MAX_ENTRIES} entries")));
    }
    // Where each compressed chunk ends: at the next offset the TOC names.
    let starts: BTreeSet<u64> = toc
        .entries
        .iter()
        .filter(|e| e.offset > 0)
        .map(|e| e.offset)
        .chain([data_end])
        .collect();
    let end_of = |e: &TocEntry| -> Result<u64> {
        let end = if e.end_offset > e.offset {
            e.end_offset
        } else {
            starts
                .range(e.offset + 1..)
                .next()
                .copied()
                .unwrap_or(data_end)
        };
        if e.offset == 0 || end > data_end {
            return Err(bad(format!("{}: chunk offset out of range", e.name)));
        }
        Ok(end)
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut last_file: Option<usize> = None;
    for e in &toc.entries {
        let chunk = |file_offset: u64, size: u64| -> Result<Chunk> {
            let zeros = e.chunk_type == "zeros";
            let digest_str = e.chunk_digest.as_deref().or(e.digest.as_deref());
            let digest = match (
                zeros,
                digest_str
                    .and_then(Digest::parse)
                    .and_then(|d| d.sha256_bytes()),
            ) {
                (true, _) => None,
                (false, Some(d)) => Some(d),
                (false, None) => {
                    return Err(bad(format!("{}: chunk without a sha256 digest", e.name)));
                }
            };
            Ok(Chunk {
                compressed: if zeros { 0..0 } else { e.offset..end_of(e)? },
                inner_offset: e.inner_offset,
                file_offset,
                size,
                digest,
            })
        };
        if e.kind == "chunk" {
            let Some(file) = last_file else {
                return Err(bad(format!("{}: a chunk with no file before it", e.name)));
            };
            chunks.push(chunk(e.chunk_offset, e.chunk_size)?);
            if let DataRef::Chunks(range) = &mut entries[file].data {
                range.end = chunks.len() as u32;
            }
            continue;
        }
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::CharDev,
            "block" => EntryKind::BlockDev,
            "fifo" => EntryKind::Fifo,
            other => {
                tracing::warn!(layer = %digest, "TOC entry {:?} of type {other:?} not shown", e.name);
                continue;
            }
        };
        let path = match normalise(e.name.as_bytes()) {
            Ok(p) if !p.is_empty() || kind == EntryKind::Dir => p,
            Ok(_) | Err(_) => {
                tracing::warn!(layer = %digest, "TOC entry {} not shown: bad name", shown(e.name.as_bytes()));
                continue;
            }
        };
        let link = match kind {
            EntryKind::Symlink if !e.link_name.is_empty() && !e.link_name.contains('\0') => {
                Some(e.link_name.as_bytes().into())
            }
            EntryKind::Hardlink => match normalise(e.link_name.as_bytes()) {
                Ok(t) if !t.is_empty() => Some(t),
                _ => return Err(bad(format!("{}: bad hardlink target", e.name))),
            },
            EntryKind::Symlink => return Err(bad(format!("{}: symlink without a target", e.name))),
            _ => None,
        };
        let id =
            |v: i64| u32::try_from(v).map_err(|_| bad(format!("{}: bad uid/gid/mode", e.name)));
        let (mtime, mtime_nsec) = e
            .modtime
            .as_deref()
            .and_then(parse_rfc3339)
            .unwrap_or((0, 0));
        let data = if kind == EntryKind::File && e.size > 0 {
            let first = chunks.len() as u32;
            let size = if e.chunk_size > 0 {
                e.chunk_size
            } else {
                e.size
            };
            chunks.push(chunk(e.chunk_offset, size)?);
            DataRef::Chunks(first..first + 1)
        } else {
            DataRef::None
        };
        let mut xattrs = Vec::new();
        for (name, value) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| bad(format!("{}: xattr {name} is not base64", e.name)))?;
            xattrs.push((name.as_bytes().into(), value.into_boxed_slice()));
        }
        last_file = (kind == EntryKind::File).then_some(entries.len());
        entries.push(Entry {
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
            xattrs,
            data,
        });
    }
    // A file's chunks must cover it exactly, in order, or reads would be wrong.
    for entry in &entries {
        if let DataRef::Chunks(range) = &entry.data {
            let mut at = 0;
            for c in &chunks[range.start as usize..range.end as usize] {
                if c.file_offset != at || c.size == 0 {
                    return Err(bad(format!(
                        "{}: chunks do not cover the file in order",
                        shown(&entry.path)
                    )));
                }
                at += c.size;
            }
            if at != entry.size {
                return Err(bad(format!(
                    "{}: chunks cover {at} of {} bytes",
                    shown(&entry.path),
                    entry.size
                )));
            }
        }
    }
    drop_estargz_metadata(&mut entries);
    Ok(LayerIndex {
        entries,
        content: Content::Chunks(ChunkMap { codec, chunks }),
        source,
    })
}

/// An RFC 3339 time ("2024-01-02T03:04:05.5Z", "...+01:00"): (seconds, nanoseconds).
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let padded: String = frac[..digits]
            .chars()
            .chain(std::iter::repeat('0'))
            .take(9)
            .collect();
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) => {
            let h: i64 = tz.get(1..3)?.parse().ok()?;
            let m: i64 = tz.get(4..6)?.parse().ok()?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + min * 60 + sec - offset, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2026-12-01T22:23:37Z"),
            Some((1_796_163_817, 0))
        );
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00.25+01:00"),
            Some((951_865_200, 250_000_000))
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn footers() {
        let mut f = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(b"00000000003e06a1STARGZ");
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(footer_offset(&f), Some(0x3e06a1));
        let mut legacy = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
        legacy.extend_from_slice(b"0000000000000100STARGZ");
        assert_eq!(footer_offset(&legacy), Some(0x100));
        assert_eq!(
            footer_offset(b"not a footer at all, not at all, not at all......."),
            None
        );
    }

    #[test]
    fn toc_annotations() {
        let mut a = BTreeMap::new();
        a.insert(
            ZSTD_CHUNKED_POSITION[1].to_owned(),
            "4090171:500:1708:1".to_owned(),
        );
        a.insert(
            ZSTD_CHUNKED_CHECKSUM[1].to_owned(),
            format!("sha256:{}", "a".repeat(64)),
        );
        assert_eq!(
            TocRef::from_annotations(Codec::Zstd, &a),
            Some(TocRef::ZstdChunked {
                checksum: Digest::parse(&format!("sha256:{}", "a".repeat(64))).expect("digest"),
                offset: 4_090_171,
                len: 500,
                json_len: 1708
            })
        );
        assert_eq!(TocRef::from_annotations(Codec::Gzip, &a), None);
    }
}
