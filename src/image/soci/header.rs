//! The check a file from an index gets before its bytes are served: the tar stream's
//! bytes where the index says the entry's headers are must be exactly those headers,
//! and say what the index says (docs/SEMANTICS.md, "Trust"). Span digests prove the
//! bytes are the layer's; this proves the index put the file where it is, so an index
//! cannot show one file's genuine bytes under another's name.

use super::layer::TarPlace;
use crate::image::entry::{DataRef, Entry, shown};
use crate::image::tar::{TarItem, TarParser};

const BLOCK: usize = 512;

/// Checks `bytes`, the tar stream's bytes `place.header..place.data`, against `entry`.
pub fn check_headers(bytes: &[u8], entry: &Entry, place: &TarPlace) -> Result<(), String> {
    let name = shown(&entry.path);
    let span = place.data.checked_sub(place.header);
    if span != Some(bytes.len() as u64) || bytes.is_empty() || bytes.len() % BLOCK != 0 {
        return Err(format!(
            "{name}: {} bytes of headers where the index says {}..{}",
            bytes.len(),
            place.header,
            place.data
        ));
    }
    let mut parser = TarParser::default();
    let mut found = Vec::new();
    let blocks = bytes.len() / BLOCK;
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        parser
            .feed(block, &mut |item| found.push(item))
            .map_err(|e| format!("{name}: the tar header is not one: {e}"))?;
        // The entry must come out of the last block, not earlier: the index's data
        // offset is then exactly where its data starts.
        if !found.is_empty() && i + 1 != blocks {
            return Err(format!(
                "{name}: its headers end before the index's data offset"
            ));
        }
    }
    let parsed = match found.pop() {
        Some(TarItem::Entry(parsed, _)) if found.is_empty() => parsed,
        Some(TarItem::Refused { reason, .. }) => {
            return Err(format!(
                "{name}: the tar header there is one regfs does not show: {reason}"
            ));
        }
        _ => return Err(format!("{name}: no single tar header at {}", place.header)),
    };
    if comparable(&parsed) != comparable(entry) {
        return Err(format!(
            "{name}: the tar header at {} describes {} ({:?}, {} bytes), not the index's entry",
            place.header,
            shown(&parsed.path),
            parsed.kind,
            parsed.size
        ));
    }
    Ok(())
}

/// The entry without where its data is (offsets differ by the header's position) and
/// with xattrs in one order.
fn comparable(e: &Entry) -> Entry {
    let mut e = e.clone();
    e.data = DataRef::None;
    e.xattrs.sort();
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::entry::EntryKind;
    use crate::image::pass::tests::tar_of;

    fn file(path: &str, size: u64, at: u64) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            data: DataRef::Stream(at),
        }
    }

    fn place(header: u64, data: u64) -> TarPlace {
        TarPlace {
            header,
            data,
            raw_name: None,
        }
    }

    #[test]
    fn a_header_matches_only_its_entry() {
        let tar = tar_of(&[("a", b"alpha"), ("b", b"bravo!")]);
        let hdr = |p: &TarPlace| &tar[p.header as usize..p.data as usize];
        let (pa, pb) = (place(0, 512), place(1024, 1536));
        check_headers(hdr(&pa), &file("a", 5, 512), &pa).expect("a's header");
        check_headers(hdr(&pb), &file("b", 6, 1536), &pb).expect("b's header");
        // Another name, size or kind than the header says.
        assert!(check_headers(hdr(&pb), &file("a", 6, 1536), &pb).is_err());
        assert!(check_headers(hdr(&pb), &file("b", 5, 1536), &pb).is_err());
        let mut dir = file("b", 0, 0);
        dir.kind = EntryKind::Dir;
        dir.data = DataRef::None;
        assert!(check_headers(hdr(&pb), &dir, &pb).is_err());
        // A range that is data, or two headers, or not whole blocks.
        let data = place(512, 1024);
        assert!(check_headers(hdr(&data), &file("a", 5, 1024), &data).is_err());
        let both = place(0, 1536);
        assert!(check_headers(hdr(&both), &file("b", 6, 1536), &both).is_err());
        assert!(check_headers(&tar[..100], &file("a", 5, 100), &place(0, 100)).is_err());
        assert!(check_headers(hdr(&pa), &file("a", 5, 512), &place(0, 1024)).is_err());
    }
}
