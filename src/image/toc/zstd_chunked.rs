//! Finding a zstd:chunked layer's TOC ("manifest"): the layer descriptor's annotations
//! give its position (a zstd frame inside a skippable frame near the blob's end) and
//! the digest of its compressed bytes.

use super::super::codec::{Codec, decode_range};
use super::super::index::unreadable;
use super::super::index::{MAX_TOC, MAX_TOC_JSON};
use super::super::source::BlobSource;
use crate::registry::{Digest, Result};

/// Where the manifest is, as `manifest-position` says: `offset:len:json_len:type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub len: u64,
    pub json_len: u64,
}

impl Position {
    /// The annotation's value; its fourth field (the manifest type, 1 for the CRFS
    /// JSON every writer uses) may be missing in old writers' output.
    pub fn parse(value: &str) -> Option<Position> {
        let mut parts = value.split(':').map(str::parse::<u64>);
        let (Some(Ok(offset)), Some(Ok(len)), Some(Ok(json_len))) =
            (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        match parts.next() {
            None | Some(Ok(1)) => Some(Position {
                offset,
                len,
                json_len,
            }),
            Some(_) => None,
        }
    }
}

/// The manifest JSON, checked against `checksum`.
pub async fn read_toc(
    source: &dyn BlobSource,
    checksum: &Digest,
    at: &Position,
) -> Result<Vec<u8>> {
    let digest = source.digest();
    let end = at
        .offset
        .checked_add(at.len)
        .filter(|&e| e <= source.size());
    if end.is_none() || at.len > MAX_TOC || at.json_len > MAX_TOC_JSON as u64 {
        return Err(unreadable(
            digest,
            "its zstd:chunked manifest position is out of range",
        ));
    }
    let compressed = source.fetch_range(at.offset, at.len).await?;
    if !checksum.matches(&compressed) {
        return Err(unreadable(
            digest,
            "its zstd:chunked manifest does not match its checksum annotation",
        ));
    }
    decode_range(Codec::Zstd, &compressed, 0, at.json_len as usize)
        .map_err(|e| unreadable(digest, format!("zstd:chunked manifest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let p = |offset, len, json_len| {
            Some(Position {
                offset,
                len,
                json_len,
            })
        };
        assert_eq!(
            Position::parse("4090171:500:1708:1"),
            p(4_090_171, 500, 1708)
        );
        assert_eq!(Position::parse("10:20:30"), p(10, 20, 30));
        assert_eq!(Position::parse("10:20:30:2"), None);
        assert_eq!(Position::parse("10:20"), None);
        assert_eq!(Position::parse("a:b:c:1"), None);
    }
}
