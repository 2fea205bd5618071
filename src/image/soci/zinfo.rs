//! The `checkpoints` bytes of a zTOC: how to start decoding in the middle of a layer.
//!
//! - gzip layers: SOCI's `gzip_zinfo` blob (the layout its C code writes): a
//!   little-endian header of `i32` checkpoint count and `i64` span size, then per
//!   checkpoint `i64` compressed offset of the first whole byte, `i64` uncompressed
//!   offset, one byte of bit count (the low `bits` of the byte before belong to the next
//!   block, 0 when the block starts on a byte) and the 32 KiB window before it, padded in
//!   front with zeros while less than 32 KiB came out. Version 1 blobs left out the
//!   first checkpoint (taken to be at byte 10, right after a plain gzip header); they
//!   are told apart by their length, as SOCI does.
//! - uncompressed layers: a FlatBuffers `TarZinfo` table (version, span size, size):
//!   spans are fixed-size ranges of the tar stream.

use super::flatbuf::{Builder, Table};

/// The deflate window a checkpoint carries.
pub const WINDOW: usize = 32 << 10;
/// Bytes of one packed checkpoint: `in`, `out`, `bits`, window.
const PACKED_CHECKPOINT: usize = 8 + 8 + 1 + WINDOW;
/// Bytes of the blob's header: count and span size.
const HEADER: usize = 4 + 8;
/// The blob version SOCI writes today.
pub const ZINFO_VERSION: i32 = 2;
/// Where version 1 blobs assume the first deflate block starts.
const V1_FIRST_IN: u64 = 10;

/// One place decoding of a gzip layer can start, as SOCI records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZinfoCheckpoint {
    /// Compressed offset of the first whole byte after the checkpoint.
    pub input: u64,
    /// Uncompressed offset.
    pub out: u64,
    /// Bits (0..=7) of the byte at `input - 1` that belong to the block starting here.
    pub bits: u8,
    /// The 32 KiB of output before `out` (zeros in front while there was less).
    pub window: Box<[u8]>,
}

impl ZinfoCheckpoint {
    /// The first compressed byte decoding from here reads (SOCI's span start).
    pub fn start_byte(&self) -> u64 {
        self.input - u64::from(self.bits > 0)
    }

    /// The bit offset of the checkpoint in the compressed stream (regfs's `in_bit`).
    pub fn in_bit(&self) -> u64 {
        self.input * 8 - u64::from(self.bits)
    }
}

/// SOCI's `gzip_zinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GzipZinfo {
    /// Uncompressed bytes its builder asked for between checkpoints (informational).
    pub span_size: u64,
    /// Sorted by offset; one per span.
    pub checkpoints: Vec<ZinfoCheckpoint>,
}

fn le_i64(bytes: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    i64::from_le_bytes(b)
}

fn offset(v: i64, what: &str, i: usize) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("checkpoint {i}: negative {what} {v}"))
}

impl GzipZinfo {
    /// Parses a blob (untrusted): sizes, counts, bits and order are checked.
    pub fn decode(bytes: &[u8]) -> Result<GzipZinfo, String> {
        if bytes.len() < HEADER {
            return Err(format!(
                "gzip zinfo of {} bytes: shorter than its header",
                bytes.len()
            ));
        }
        let count = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let span_size = u64::try_from(le_i64(bytes, 4))
            .map_err(|_| "gzip zinfo: negative span size".to_string())?;
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| format!("gzip zinfo: {count} checkpoints"))?;
        let body = bytes.len() - HEADER;
        let packed = if body == count.saturating_mul(PACKED_CHECKPOINT) {
            count
        } else if body == (count - 1).saturating_mul(PACKED_CHECKPOINT) {
            count - 1 // version 1: the first checkpoint is implied
        } else {
            return Err(format!(
                "gzip zinfo of {} bytes cannot hold the {count} checkpoints it claims",
                bytes.len()
            ));
        };
        let mut checkpoints = Vec::with_capacity(count);
        if packed < count {
            checkpoints.push(ZinfoCheckpoint {
                input: V1_FIRST_IN,
                out: 0,
                bits: 0,
                window: vec![0; WINDOW].into(),
            });
        }
        for (i, raw) in bytes[HEADER..].chunks_exact(PACKED_CHECKPOINT).enumerate() {
            let i = i + count - packed;
            let point = ZinfoCheckpoint {
                input: offset(le_i64(raw, 0), "compressed offset", i)?,
                out: offset(le_i64(raw, 8), "uncompressed offset", i)?,
                bits: raw[16],
                window: raw[17..].into(),
            };
            if point.bits > 7 || (point.bits > 0 && point.input == 0) {
                return Err(format!(
                    "checkpoint {i}: {} bits before byte {}",
                    point.bits, point.input
                ));
            }
            checkpoints.push(point);
        }
        let zinfo = GzipZinfo {
            span_size,
            checkpoints,
        };
        zinfo.check_order()?;
        Ok(zinfo)
    }

    /// The first checkpoint is at the start of the output; offsets only grow.
    fn check_order(&self) -> Result<(), String> {
        if self.checkpoints.first().is_some_and(|c| c.out != 0) {
            return Err(
                "gzip zinfo: the first checkpoint is not at the start of the output".into(),
            );
        }
        for (i, pair) in self.checkpoints.windows(2).enumerate() {
            if pair[1].out <= pair[0].out || pair[1].in_bit() <= pair[0].in_bit() {
                return Err(format!(
                    "gzip zinfo: checkpoint {} does not come after checkpoint {i}",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// The blob, version 2 (every checkpoint written).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.checkpoints.len() * PACKED_CHECKPOINT);
        out.extend_from_slice(&(self.checkpoints.len() as i32).to_le_bytes());
        out.extend_from_slice(&(self.span_size as i64).to_le_bytes());
        for c in &self.checkpoints {
            out.extend_from_slice(&(c.input as i64).to_le_bytes());
            out.extend_from_slice(&(c.out as i64).to_le_bytes());
            out.push(c.bits);
            // Windows are exactly 32 KiB: shorter ones are padded in front.
            let w = &c.window[c.window.len().saturating_sub(WINDOW)..];
            out.resize(out.len() + WINDOW - w.len(), 0);
            out.extend_from_slice(w);
        }
        out
    }
}

/// SOCI's `TarZinfo`: fixed spans of an uncompressed layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarZinfo {
    pub version: i32,
    pub span_size: u64,
    /// The layer's size.
    pub size: u64,
}

impl TarZinfo {
    pub fn decode(bytes: &[u8]) -> Result<TarZinfo, String> {
        let fail = |e: super::flatbuf::FbError| format!("tar zinfo: {e}");
        let t = Table::root(bytes).map_err(fail)?;
        let version = t.i32(0, 0).map_err(fail)?;
        let span_size = t.i64(1, 0).map_err(fail)?;
        let size = t.i64(2, 0).map_err(fail)?;
        match (u64::try_from(span_size), u64::try_from(size)) {
            (Ok(span_size), Ok(size)) if span_size > 0 && size > 0 => Ok(TarZinfo {
                version,
                span_size,
                size,
            }),
            _ => Err(format!("tar zinfo: span size {span_size}, size {size}")),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Builder::with_capacity(64);
        b.start_table();
        b.i64(2, self.size as i64, 0);
        b.i64(1, self.span_size as i64, 0);
        b.i32(0, self.version, 0);
        let root = b.end_table();
        b.finish(root)
    }

    /// Spans: `size / span_size`, rounded up.
    pub fn spans(&self) -> u64 {
        self.size.div_ceil(self.span_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(input: u64, out: u64, bits: u8, fill: u8) -> ZinfoCheckpoint {
        ZinfoCheckpoint {
            input,
            out,
            bits,
            window: vec![fill; WINDOW].into(),
        }
    }

    #[test]
    fn gzip_zinfo_round_trips_and_reads_version_1() {
        let z = GzipZinfo {
            span_size: 1 << 22,
            checkpoints: vec![point(10, 0, 0, 0), point(5000, 1 << 22, 3, 7)],
        };
        let bytes = z.encode();
        assert_eq!(bytes.len(), 12 + 2 * PACKED_CHECKPOINT);
        assert_eq!(&bytes[..4], &2i32.to_le_bytes());
        assert_eq!(bytes[12 + 16], 0);
        assert_eq!(bytes[12 + PACKED_CHECKPOINT + 16], 3);
        assert_eq!(GzipZinfo::decode(&bytes), Ok(z.clone()));
        // Version 1: same count, the first checkpoint left out.
        let mut v1 = bytes[..12].to_vec();
        v1.extend_from_slice(&bytes[12 + PACKED_CHECKPOINT..]);
        assert_eq!(GzipZinfo::decode(&v1), Ok(z));
    }

    #[test]
    fn bad_gzip_zinfo_is_refused() {
        let good = GzipZinfo {
            span_size: 100,
            checkpoints: vec![point(10, 0, 0, 0), point(50, 200, 1, 1)],
        };
        let bytes = good.encode();
        let refused = |mut b: Vec<u8>, at: usize, v: &[u8]| {
            b[at..at + v.len()].copy_from_slice(v);
            GzipZinfo::decode(&b).is_err()
        };
        let second = 12 + PACKED_CHECKPOINT;
        assert!(
            refused(bytes.clone(), 0, &3i32.to_le_bytes()),
            "count vs length"
        );
        assert!(
            refused(bytes.clone(), 0, &0i32.to_le_bytes()),
            "no checkpoints"
        );
        assert!(refused(bytes.clone(), 0, &(-1i32).to_le_bytes()));
        assert!(
            refused(bytes.clone(), 4, &(-1i64).to_le_bytes()),
            "negative span size"
        );
        assert!(refused(bytes.clone(), second + 16, &[8]), "8 bits");
        assert!(
            refused(bytes.clone(), second + 8, &0i64.to_le_bytes()),
            "out goes back"
        );
        assert!(
            refused(bytes.clone(), second, &(-5i64).to_le_bytes()),
            "negative in"
        );
        assert!(
            refused(bytes.clone(), 12 + 8, &1i64.to_le_bytes()),
            "first out not 0"
        );
        assert!(GzipZinfo::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(GzipZinfo::decode(&bytes[..5]).is_err());
    }

    #[test]
    fn tar_zinfo_round_trips() {
        let z = TarZinfo {
            version: 2,
            span_size: 1 << 20,
            size: (3 << 20) + 1,
        };
        assert_eq!(TarZinfo::decode(&z.encode()), Ok(z.clone()));
        assert_eq!(z.spans(), 4);
        let zero = TarZinfo { span_size: 0, ..z };
        assert!(TarZinfo::decode(&zero.encode()).is_err());
    }
}
