//! Finding an eStargz layer's TOC: a 51-byte footer (an empty gzip member whose extra
//! field holds the TOC's offset) ends the blob; the TOC is a gzip'd tar holding
//! `stargz.index.json`, between that offset and the footer.

use super::super::codec::{Checkpoint, Codec, Decoder};
use super::super::entry::DataRef;
use super::super::index::unreadable;
use super::super::index::{MAX_TOC, MAX_TOC_JSON};
use super::super::source::BlobSource;
use super::super::tar::{TarItem, TarParser};
use crate::registry::Result;

/// The eStargz footer: an empty gzip member whose extra field holds the TOC offset.
const FOOTER: u64 = 51;
/// The footer of eStargz's predecessor (stargz), without the `SG` subfield.
const LEGACY_FOOTER: u64 = 47;
/// The blob's tail asked for first: the footer and, in most layers, the whole TOC, so
/// one round trip finds both; a larger TOC costs one more.
const TAIL: u64 = 64 << 10;

/// The eStargz TOC JSON and the blob offset where the TOC starts (where file data ends).
pub async fn read_toc(source: &dyn BlobSource) -> Result<(Vec<u8>, u64)> {
    let digest = source.digest().clone();
    let size = source.size();
    if size < FOOTER {
        return Err(unreadable(&digest, "too small to be eStargz"));
    }
    let tail_start = size - TAIL.min(size);
    let tail = source.fetch_range(tail_start, size - tail_start).await?;
    let footer_at = tail.len() - FOOTER as usize;
    let (toc_offset, footer) = match footer_offset(&tail[footer_at..]) {
        Some(offset) => (offset, FOOTER),
        None => match footer_offset(&tail[footer_at + (FOOTER - LEGACY_FOOTER) as usize..]) {
            Some(offset) => (offset, LEGACY_FOOTER),
            None if external_toc(&tail) => {
                return Err(unreadable(
                    &digest,
                    "its eStargz TOC is kept apart from the layer (an external TOC), which regfs does not fetch",
                ));
            }
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
    let compressed = if toc_offset >= tail_start {
        let from = (toc_offset - tail_start) as usize;
        tail.slice(from..(toc_end - tail_start) as usize)
    } else {
        // Only the part before the tail is missing.
        let head = source
            .fetch_range(toc_offset, tail_start - toc_offset)
            .await?;
        let mut whole = Vec::with_capacity((toc_end - toc_offset) as usize);
        whole.extend_from_slice(&head);
        whole.extend_from_slice(&tail[..(toc_end - tail_start) as usize]);
        whole.into()
    };
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

/// Whether the blob ends with the footer of an eStargz layer whose TOC is in another
/// blob (stargz-snapshotter's `externaltoc`: a 46-byte footer naming no offset).
fn external_toc(tail: &[u8]) -> bool {
    const MAGIC: &[u8] = b"STARGZEXTERNALTOC";
    tail.len() >= 46
        && tail[tail.len() - 46..]
            .windows(MAGIC.len())
            .any(|w| w == MAGIC)
}

/// Decodes a small gzip stream whole (at most `max` bytes of output).
fn decode_all_gzip(compressed: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
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
    let mut parser = TarParser::default();
    let mut found = None;
    parser
        .feed(tar, &mut |item| {
            if let TarItem::Entry(e, _) = item {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut external = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 21, 0, b'S', b'G',
        ];
        external.extend_from_slice(&[17, 0]);
        external.extend_from_slice(b"STARGZEXTERNALTOC");
        external.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(external.len(), 46);
        assert_eq!(
            footer_offset(&external[external.len() - 51.min(external.len())..]),
            None
        );
        assert!(external_toc(&external));
        assert!(!external_toc(&f));
    }
}
