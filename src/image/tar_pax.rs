//! PAX extended headers: the records regfs applies to the entry that follows (path,
//! linkpath, size, uid, gid, mtime, `SCHILY.xattr.*`).

use tar::PaxExtensions;

use super::entry::{Xattrs, shown};

/// The PAX records regfs applies.
#[derive(Default)]
pub struct Pax {
    pub path: Option<Vec<u8>>,
    pub linkpath: Option<Vec<u8>>,
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<(i64, u32)>,
    pub xattrs: Xattrs,
}

const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Xattrs kept per file; more are dropped (the log of the pass says so).
const MAX_XATTRS: usize = 128;

impl Pax {
    pub fn parse(bytes: &[u8]) -> Result<Pax, String> {
        let mut pax = Pax::default();
        for record in PaxExtensions::new(bytes) {
            let record = record.map_err(|e| format!("malformed PAX header: {e}"))?;
            let (key, value) = (record.key_bytes(), record.value_bytes());
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| format!("bad PAX {}", shown(key)))
            };
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"size" => pax.size = Some(number()?),
                b"uid" => pax.uid = Some(u32::try_from(number()?).map_err(|e| e.to_string())?),
                b"gid" => pax.gid = Some(u32::try_from(number()?).map_err(|e| e.to_string())?),
                b"mtime" => pax.mtime = parse_pax_time(value),
                k if k.starts_with(b"GNU.sparse.") => {
                    return Err("GNU sparse files are not supported".into());
                }
                k if k.starts_with(XATTR_PREFIX) && pax.xattrs.len() < MAX_XATTRS => {
                    let name = &k[XATTR_PREFIX.len()..];
                    if !name.is_empty() && !name.contains(&0) {
                        pax.xattrs.push((name.into(), value.into()));
                    }
                }
                _ => {}
            }
        }
        Ok(pax)
    }
}

/// A PAX time: decimal seconds, possibly negative, with an optional fraction.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    if secs < 0 && nanos > 0 {
        // "-1.5" is half a second before -1: one second earlier plus the complement.
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
