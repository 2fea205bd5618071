//! The FlatBuffers binary layout, as much of it as the zTOC schema uses: tables of
//! scalars, strings, byte vectors and vectors of strings or tables. Read without
//! trusting a byte (every offset and length is checked against the buffer, nothing
//! panics), and written the way FlatBuffers builders write (back to front, children
//! before the tables that point at them, scalars aligned to their size).
//!
//! Layout: the buffer starts with a `u32` offset to the root table. A table starts
//! with an `i32` back to its vtable (`u16` vtable size, `u16` table size, then one
//! `u16` per field: its offset in the table, 0 when absent). Strings and vectors are a
//! `u32` count then the elements (strings end with a NUL); offsets to them are `u32`s
//! relative to where the offset itself is stored.

use std::fmt;

/// A buffer that is not the FlatBuffer it claims to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FbError(pub String);

impl fmt::Display for FbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type FbResult<T> = Result<T, FbError>;

fn bad<T>(what: impl fmt::Display) -> FbResult<T> {
    Err(FbError(what.to_string()))
}

/// `N` bytes of `buf` at `pos`, or an error naming `what`.
fn bytes_at<const N: usize>(buf: &[u8], pos: usize, what: &str) -> FbResult<[u8; N]> {
    pos.checked_add(N)
        .and_then(|end| buf.get(pos..end))
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| FbError(format!("{what} at byte {pos} is outside the buffer")))
}

fn u32_at(buf: &[u8], pos: usize, what: &str) -> FbResult<u32> {
    bytes_at::<4>(buf, pos, what).map(u32::from_le_bytes)
}

fn u16_at(buf: &[u8], pos: usize, what: &str) -> FbResult<u16> {
    bytes_at::<2>(buf, pos, what).map(u16::from_le_bytes)
}

/// Follows the `u32` offset stored at `pos`.
fn follow(buf: &[u8], pos: usize, what: &str) -> FbResult<usize> {
    let off = u32_at(buf, pos, what)? as usize;
    match pos.checked_add(off) {
        Some(target) if off > 0 && target < buf.len() => Ok(target),
        _ => bad(format!("{what} at byte {pos} points outside the buffer")),
    }
}

/// A table in a buffer.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
    table_len: usize,
}

impl<'a> Table<'a> {
    /// The root table of a buffer.
    pub fn root(buf: &'a [u8]) -> FbResult<Table<'a>> {
        Table::at(buf, follow(buf, 0, "the root offset")?)
    }

    fn at(buf: &'a [u8], pos: usize) -> FbResult<Table<'a>> {
        let back = i32::from_le_bytes(bytes_at::<4>(buf, pos, "a table")?);
        let vtable = (pos as i64) - i64::from(back);
        let vtable = usize::try_from(vtable).map_err(|_| {
            FbError(format!(
                "the table at byte {pos} has its vtable before the buffer"
            ))
        })?;
        let vtable_len = usize::from(u16_at(buf, vtable, "a vtable")?);
        let table_len = usize::from(u16_at(buf, vtable + 2, "a vtable")?);
        if vtable_len < 4 || vtable_len % 2 != 0 || vtable.saturating_add(vtable_len) > buf.len() {
            return bad(format!(
                "the vtable at byte {vtable} has a bad size ({vtable_len})"
            ));
        }
        if table_len < 4 || pos.saturating_add(table_len) > buf.len() {
            return bad(format!(
                "the table at byte {pos} has a bad size ({table_len})"
            ));
        }
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
            table_len,
        })
    }

    /// Where field `slot` is, with room for `size` bytes; `None` when absent.
    fn field(&self, slot: usize, size: usize) -> FbResult<Option<usize>> {
        let entry = 4 + 2 * slot;
        if entry + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = usize::from(u16_at(self.buf, self.vtable + entry, "a vtable entry")?);
        if off == 0 {
            return Ok(None);
        }
        if off < 4 || off + size > self.table_len {
            return bad(format!(
                "field {slot} of the table at byte {} lies outside it",
                self.pos
            ));
        }
        Ok(Some(self.pos + off))
    }

    fn scalar<const N: usize>(&self, slot: usize) -> FbResult<Option<[u8; N]>> {
        match self.field(slot, N)? {
            Some(pos) => bytes_at::<N>(self.buf, pos, "a scalar field").map(Some),
            None => Ok(None),
        }
    }

    pub fn i64(&self, slot: usize, default: i64) -> FbResult<i64> {
        Ok(self.scalar::<8>(slot)?.map_or(default, i64::from_le_bytes))
    }

    pub fn i32(&self, slot: usize, default: i32) -> FbResult<i32> {
        Ok(self.scalar::<4>(slot)?.map_or(default, i32::from_le_bytes))
    }

    pub fn u32(&self, slot: usize, default: u32) -> FbResult<u32> {
        Ok(self.scalar::<4>(slot)?.map_or(default, u32::from_le_bytes))
    }

    pub fn i8(&self, slot: usize, default: i8) -> FbResult<i8> {
        Ok(self.scalar::<1>(slot)?.map_or(default, i8::from_le_bytes))
    }

    /// Where the object an offset field points at starts.
    fn child(&self, slot: usize) -> FbResult<Option<usize>> {
        match self.field(slot, 4)? {
            Some(pos) => follow(self.buf, pos, "an offset field").map(Some),
            None => Ok(None),
        }
    }

    /// A string field's bytes (not checked to be UTF-8: Go writes any bytes).
    pub fn string(&self, slot: usize) -> FbResult<Option<&'a [u8]>> {
        self.child(slot)?
            .map(|pos| string_at(self.buf, pos))
            .transpose()
    }

    /// A `[ubyte]` field.
    pub fn bytes(&self, slot: usize) -> FbResult<Option<&'a [u8]>> {
        self.child(slot)?
            .map(|pos| Vector::at(self.buf, pos, 1).map(|v| v.raw()))
            .transpose()
    }

    pub fn table(&self, slot: usize) -> FbResult<Option<Table<'a>>> {
        self.child(slot)?
            .map(|pos| Table::at(self.buf, pos))
            .transpose()
    }

    /// A vector of offsets (strings or tables).
    pub fn vector(&self, slot: usize) -> FbResult<Option<Vector<'a>>> {
        self.child(slot)?
            .map(|pos| Vector::at(self.buf, pos, 4))
            .transpose()
    }
}

fn string_at(buf: &[u8], pos: usize) -> FbResult<&[u8]> {
    let v = Vector::at(buf, pos, 1)?;
    // The terminating NUL is part of the format; a writer that left it out wrote
    // something else.
    match buf.get(v.start + v.len) {
        Some(0) => Ok(v.raw()),
        _ => bad(format!("the string at byte {pos} has no terminating NUL")),
    }
}

/// A vector in a buffer: `len` elements of `elem` bytes from `start`.
#[derive(Clone, Copy, Debug)]
pub struct Vector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
}

impl<'a> Vector<'a> {
    fn at(buf: &'a [u8], pos: usize, elem: usize) -> FbResult<Vector<'a>> {
        let len = u32_at(buf, pos, "a vector length")? as usize;
        let start = pos + 4;
        match len.checked_mul(elem).and_then(|n| n.checked_add(start)) {
            Some(end) if end <= buf.len() => Ok(Vector { buf, start, len }),
            _ => bad(format!(
                "the vector at byte {pos} claims {len} elements, past the buffer's end"
            )),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn raw(&self) -> &'a [u8] {
        &self.buf[self.start..self.start + self.len]
    }

    fn element(&self, i: usize) -> FbResult<usize> {
        if i >= self.len {
            return bad(format!("element {i} of a vector of {}", self.len));
        }
        follow(self.buf, self.start + 4 * i, "a vector element")
    }

    pub fn table(&self, i: usize) -> FbResult<Table<'a>> {
        Table::at(self.buf, self.element(i)?)
    }

    pub fn string(&self, i: usize) -> FbResult<&'a [u8]> {
        string_at(self.buf, self.element(i)?)
    }
}

/// Where an object was written: its distance from the end of the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset(u32);

/// Writes a buffer back to front.
pub struct Builder {
    /// The bytes written so far are `buf[head..]`.
    buf: Vec<u8>,
    head: usize,
    /// Largest alignment used, so the finished buffer keeps every alignment.
    min_align: usize,
    /// Fields of the table being written: (slot, where).
    fields: Vec<(usize, u32)>,
    table_end: u32,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::with_capacity(1024)
    }
}

impl Builder {
    pub fn with_capacity(n: usize) -> Builder {
        let n = n.max(64);
        Builder {
            buf: vec![0; n],
            head: n,
            min_align: 1,
            fields: Vec::new(),
            table_end: 0,
        }
    }

    fn used(&self) -> u32 {
        // A zTOC is bounded far below 4 GiB (callers check), so this fits.
        (self.buf.len() - self.head) as u32
    }

    /// Makes room for `n` more bytes at the front.
    fn reserve(&mut self, n: usize) {
        if self.head >= n {
            return;
        }
        let used = self.buf.len() - self.head;
        let new_len = (self.buf.len() * 2).max(used + n + 64);
        let mut grown = vec![0u8; new_len];
        grown[new_len - used..].copy_from_slice(&self.buf[self.head..]);
        self.head = new_len - used;
        self.buf = grown;
    }

    /// Pads so that, after `len` more bytes, the data is aligned to `align`.
    fn align(&mut self, len: usize, align: usize) {
        self.min_align = self.min_align.max(align);
        let pad = (align - ((self.used() as usize + len) % align)) % align;
        self.reserve(pad + len);
        for _ in 0..pad {
            self.head -= 1;
            self.buf[self.head] = 0;
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.head -= bytes.len();
        self.buf[self.head..self.head + bytes.len()].copy_from_slice(bytes);
    }

    /// A `u32` offset to `target`, written here.
    fn push_offset(&mut self, target: Offset) {
        self.align(4, 4);
        let here = self.used() + 4;
        self.push(&(here - target.0).to_le_bytes());
    }

    /// A vector of `elem`-byte elements given as their bytes in order.
    fn vector(&mut self, raw: &[u8], elem_align: usize, nul: bool) -> Offset {
        let extra = usize::from(nul);
        self.align(raw.len() + extra, 4.max(elem_align));
        if nul {
            self.push(&[0]);
        }
        self.push(raw);
        let count = if elem_align == 1 {
            raw.len()
        } else {
            raw.len() / elem_align
        };
        self.push(&(count as u32).to_le_bytes());
        Offset(self.used())
    }

    pub fn string(&mut self, s: &[u8]) -> Offset {
        self.vector(s, 1, true)
    }

    pub fn byte_vector(&mut self, b: &[u8]) -> Offset {
        self.vector(b, 1, false)
    }

    /// A vector of offsets to objects already written, in this order.
    pub fn offset_vector(&mut self, items: &[Offset]) -> Offset {
        self.align(4 * items.len() + 4, 4);
        for &item in items.iter().rev() {
            self.push_offset(item);
        }
        self.push(&(items.len() as u32).to_le_bytes());
        Offset(self.used())
    }

    pub fn start_table(&mut self) {
        self.fields.clear();
        self.table_end = self.used();
    }

    fn scalar(&mut self, slot: usize, bytes: &[u8]) {
        self.align(bytes.len(), bytes.len());
        self.push(bytes);
        self.fields.push((slot, self.used()));
    }

    /// Scalars equal to their schema default are left out, as FlatBuffers builders do.
    pub fn i64(&mut self, slot: usize, v: i64, default: i64) {
        if v != default {
            self.scalar(slot, &v.to_le_bytes());
        }
    }

    pub fn i32(&mut self, slot: usize, v: i32, default: i32) {
        if v != default {
            self.scalar(slot, &v.to_le_bytes());
        }
    }

    pub fn u32(&mut self, slot: usize, v: u32, default: u32) {
        if v != default {
            self.scalar(slot, &v.to_le_bytes());
        }
    }

    pub fn i8(&mut self, slot: usize, v: i8, default: i8) {
        if v != default {
            self.scalar(slot, &v.to_le_bytes());
        }
    }

    pub fn offset(&mut self, slot: usize, target: Offset) {
        self.push_offset(target);
        self.fields.push((slot, self.used()));
    }

    /// Ends the table: its `i32` to the vtable, and the vtable in front of it.
    pub fn end_table(&mut self) -> Offset {
        self.align(4, 4);
        self.push(&[0; 4]);
        let table = self.used();
        let slots = self.fields.iter().map(|&(s, _)| s + 1).max().unwrap_or(0);
        let mut entries = vec![0u16; slots];
        for &(slot, at) in &self.fields {
            entries[slot] = (table - at) as u16;
        }
        let vtable_len = 4 + 2 * slots;
        let table_len = (table - self.table_end) as u16;
        self.align(vtable_len, 2);
        for e in entries.iter().rev() {
            self.push(&e.to_le_bytes());
        }
        self.push(&table_len.to_le_bytes());
        self.push(&(vtable_len as u16).to_le_bytes());
        let vtable = self.used();
        // The vtable is in front of the table: a positive distance back.
        let at = self.buf.len() - table as usize;
        self.buf[at..at + 4].copy_from_slice(&((vtable - table) as i32).to_le_bytes());
        self.fields.clear();
        Offset(table)
    }

    /// The finished buffer, `root` its root table.
    pub fn finish(mut self, root: Offset) -> Vec<u8> {
        let align = self.min_align.max(4);
        self.align(4, align);
        self.push_offset(root);
        self.buf.split_off(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = Builder::default();
        let name = b.string(b"etc/passwd");
        let blob = b.byte_vector(&[1, 2, 3]);
        let inner = {
            b.start_table();
            b.i64(0, -7, 0);
            b.end_table()
        };
        let list = b.offset_vector(&[inner, inner]);
        let strings = b.offset_vector(&[name]);
        b.start_table();
        b.offset(0, name);
        b.i64(1, 1 << 40, 0);
        b.u32(2, 7, 0);
        b.i8(3, 2, 1);
        b.offset(4, blob);
        b.offset(5, list);
        b.offset(6, strings);
        b.i32(7, 0, 0); // the default: left out
        let root = b.end_table();
        b.finish(root)
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let buf = sample();
        let t = Table::root(&buf).expect("root");
        assert_eq!(t.string(0).expect("ok"), Some(&b"etc/passwd"[..]));
        assert_eq!(t.i64(1, 0).expect("ok"), 1 << 40);
        assert_eq!(t.u32(2, 0).expect("ok"), 7);
        assert_eq!(t.i8(3, 1).expect("ok"), 2);
        assert_eq!(t.bytes(4).expect("ok"), Some(&[1u8, 2, 3][..]));
        let list = t.vector(5).expect("ok").expect("present");
        assert_eq!(list.len(), 2);
        assert_eq!(list.table(1).expect("ok").i64(0, 0).expect("ok"), -7);
        assert!(list.table(2).is_err());
        let strings = t.vector(6).expect("ok").expect("present");
        assert_eq!(strings.string(0).expect("ok"), b"etc/passwd");
        assert_eq!(t.i32(7, 99).expect("ok"), 99, "absent: the default");
        assert_eq!(
            t.i64(40, 5).expect("ok"),
            5,
            "beyond the vtable: the default"
        );
        assert_eq!(buf.len() % 8, 0);
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(Table::root(&[]).is_err());
        assert!(Table::root(&[200, 0, 0, 0]).is_err());
        assert!(Table::root(&[4, 0, 0, 0, 0, 0, 0, 0]).is_err());
        let buf = sample();
        for cut in 0..buf.len() {
            let t = Table::root(&buf[..cut]);
            if let Ok(t) = t {
                let _ = t.string(0);
                let _ = t.vector(5).map(|v| v.map(|v| v.table(0)));
            }
        }
    }
}
