//! Small whole entries (manifests, layer indexes, held indexes): written to a temp file
//! and renamed into place, so a reader sees the old entry, the new one or none, never a
//! half-written one; and checksummed, so a flipped or truncated entry is refused.
//!
//! Format: `MAGIC` (8 bytes), body length (u64 LE), CRC-32 of the body (u32 LE), 4 bytes
//! zero, then the body.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use bytes::Bytes;

use super::private;

const MAGIC: &[u8; 8] = b"RGFSENT1";
const HEADER: usize = 24;
/// Entries are metadata: anything larger than this is not one of ours.
pub const MAX_ENTRY: u64 = 256 << 20;

/// The file's bytes as an entry.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    out
}

/// The body of an encoded entry, if it is whole and unchanged.
pub fn decode(bytes: Bytes) -> Option<Bytes> {
    let header = bytes.get(..HEADER)?;
    if &header[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(header[16..20].try_into().ok()?);
    if len != (bytes.len() - HEADER) as u64 {
        return None;
    }
    let body = bytes.slice(HEADER..);
    (crc32fast::hash(&body) == crc).then_some(body)
}

/// Reads the entry at `path`: None if it is missing, torn or changed.
pub fn read(path: &Path) -> Option<Bytes> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len > MAX_ENTRY + HEADER as u64 {
        return None;
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).ok()?;
    decode(Bytes::from(bytes))
}

/// Writes `body` as the entry at `path`, through `temp` (on the same filesystem).
pub fn write(path: &Path, temp: &Path, body: &[u8]) -> io::Result<u64> {
    let encoded = encode(body);
    let result = (|| {
        let mut file = private::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)?;
        file.write_all(&encoded)?;
        fs::rename(temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(temp);
    }
    result.map(|()| encoded.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_refused() {
        let body = b"a layer index".to_vec();
        let good = Bytes::from(encode(&body));
        assert_eq!(decode(good.clone()).as_deref(), Some(&body[..]));
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode(Bytes::from(flipped)), None, "a flipped byte");
        assert_eq!(decode(good.slice(..good.len() - 1)), None, "a torn entry");
        assert_eq!(decode(Bytes::from_static(b"RGFS")), None, "a short file");
    }

    #[test]
    fn written_through_a_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, temp) = (dir.path().join("e"), dir.path().join("t"));
        assert!(write(&path, &temp, b"body").is_ok());
        assert!(!temp.exists());
        assert_eq!(read(&path).as_deref(), Some(&b"body"[..]));
    }
}
