//! `COPY ... TO STDOUT (FORMAT binary)` stream parser: rows as ranges of the received
//! data (no copy unless a row spans two reads, no allocation or reference count per row).

use bytes::{Bytes, BytesMut};

/// The 11-byte signature that opens a binary COPY stream.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Malformed binary COPY data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("binary COPY data: {0}")]
pub struct CopyError(&'static str);

/// Parsed rows: every field a range of one of a few shared buffers.
#[derive(Default)]
pub struct CopyRows {
    chunks: Vec<Bytes>,
    /// Per row: its chunk and its first entry in `fields`.
    rows: Vec<(u32, u32)>,
    /// Per field, rows one after another: offset in the row's chunk, length (-1: NULL).
    fields: Vec<(u32, i32)>,
}

impl CopyRows {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row `i` (`i < len()`).
    pub fn row(&self, i: usize) -> CopyRow<'_> {
        let (chunk, first) = self.rows[i];
        let end = self
            .rows
            .get(i + 1)
            .map_or(self.fields.len(), |r| r.1 as usize);
        CopyRow {
            data: &self.chunks[chunk as usize],
            fields: &self.fields[first as usize..end],
        }
    }

    /// Bytes held: the received data the rows point into, and their index.
    pub fn held_bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>()
            + std::mem::size_of_val(self.rows.as_slice())
            + std::mem::size_of_val(self.fields.as_slice())
    }

    /// Hand over the rows held, keeping room for as many in `self` (no regrowth per batch).
    pub fn take(&mut self) -> CopyRows {
        let room = CopyRows {
            chunks: Vec::with_capacity(self.chunks.len()),
            rows: Vec::with_capacity(self.rows.len()),
            fields: Vec::with_capacity(self.fields.len()),
        };
        std::mem::replace(self, room)
    }

    /// Every row in order.
    pub fn iter(&self) -> impl Iterator<Item = CopyRow<'_>> {
        (0..self.len()).map(|i| self.row(i))
    }
}

/// One row of [`CopyRows`].
#[derive(Clone, Copy)]
pub struct CopyRow<'a> {
    data: &'a [u8],
    fields: &'a [(u32, i32)],
}

impl<'a> CopyRow<'a> {
    /// Fields in the row.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the row has no field.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Field `i`: None past the end, Some(None) for NULL.
    pub fn get(&self, i: usize) -> Option<Option<&'a [u8]>> {
        self.fields.get(i).map(|&f| self.field(f))
    }

    /// The first `n` fields (fewer if the row is shorter).
    pub fn values(&self, n: usize) -> impl ExactSizeIterator<Item = Option<&'a [u8]>> + Clone {
        let row = *self;
        row.fields[..n.min(row.fields.len())]
            .iter()
            .map(move |&f| row.field(f))
    }

    fn field(&self, (off, len): (u32, i32)) -> Option<&'a [u8]> {
        (len >= 0).then(|| &self.data[off as usize..off as usize + len as usize])
    }
}

/// Incremental parser; feed it the copy's data (the CopyData payloads, in order).
#[derive(Default)]
pub struct BinaryCopy {
    /// A row (or the header) split across reads.
    partial: BytesMut,
    header_done: bool,
    finished: bool,
}

impl BinaryCopy {
    /// Parse the complete rows of `chunk` (plus anything left from before) into `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut CopyRows) -> Result<(), CopyError> {
        let data = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        let mut pos = 0;
        if !self.header_done {
            match header_len(&data)? {
                Some(n) => {
                    pos = n;
                    self.header_done = true;
                }
                None => {
                    self.partial.extend_from_slice(&data);
                    return Ok(());
                }
            }
        }
        // Offsets are u32: a chunk is one read (at most a few hundred KiB), but stay safe.
        if data.len() > u32::MAX as usize {
            return Err(CopyError("a single read larger than 4 GiB"));
        }
        let chunk_index = out.chunks.len() as u32;
        let before = out.rows.len();
        while pos < data.len() {
            if self.finished {
                return Err(CopyError("data after the trailer"));
            }
            match row(&data, pos, chunk_index, out)? {
                Parsed::Row(used) => pos += used,
                Parsed::Trailer => {
                    self.finished = true;
                    pos += 2;
                }
                Parsed::Incomplete => break,
            }
        }
        if pos < data.len() {
            self.partial.extend_from_slice(&data[pos..]);
        }
        if out.rows.len() > before {
            out.chunks.push(data);
        }
        Ok(())
    }

    /// Whether the trailer arrived (the copy is complete).
    pub fn finished(&self) -> bool {
        self.finished && self.partial.is_empty()
    }
}

fn header_len(d: &[u8]) -> Result<Option<usize>, CopyError> {
    if d.len() < 19 {
        return Ok(None);
    }
    if &d[..11] != SIGNATURE {
        return Err(CopyError("bad signature"));
    }
    let ext = u32::from_be_bytes([d[15], d[16], d[17], d[18]]) as usize;
    Ok((d.len() >= 19 + ext).then_some(19 + ext))
}

enum Parsed {
    Row(usize),
    Trailer,
    Incomplete,
}

/// The row at `d[start..]` into `out` (fields of `chunk`); nothing is added unless complete.
fn row(d: &[u8], start: usize, chunk: u32, out: &mut CopyRows) -> Result<Parsed, CopyError> {
    let Some(n) = d.get(start..start + 2) else {
        return Ok(Parsed::Incomplete);
    };
    let n = i16::from_be_bytes([n[0], n[1]]);
    if n == -1 {
        return Ok(Parsed::Trailer);
    }
    if n < 0 {
        return Err(CopyError("negative field count"));
    }
    let first = out.fields.len();
    let mut pos = start + 2;
    for _ in 0..n {
        let Some(l) = d.get(pos..pos + 4) else {
            out.fields.truncate(first);
            return Ok(Parsed::Incomplete);
        };
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        pos += 4;
        if len == -1 {
            out.fields.push((0, -1));
            continue;
        }
        if len < 0 {
            out.fields.truncate(first);
            return Err(CopyError("negative field length"));
        }
        let end = pos + len as usize;
        if d.len() < end {
            out.fields.truncate(first);
            return Ok(Parsed::Incomplete);
        }
        out.fields.push((pos as u32, len));
        pos = end;
    }
    out.rows.push((chunk, first as u32));
    Ok(Parsed::Row(pos - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend(0u32.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        for r in rows {
            v.extend((r.len() as i16).to_be_bytes());
            for f in r {
                match f {
                    None => v.extend((-1i32).to_be_bytes()),
                    Some(b) => {
                        v.extend((b.len() as i32).to_be_bytes());
                        v.extend(*b);
                    }
                }
            }
        }
        v.extend((-1i16).to_be_bytes());
        v
    }

    #[test]
    fn rows_survive_any_message_split() {
        let rows = vec![
            vec![Some(&b"1"[..]), None, Some(&b""[..])],
            vec![Some(&b"22"[..]), Some(&b"hello"[..]), None],
        ];
        let data = stream(&rows);
        for size in 1..data.len() {
            let mut p = BinaryCopy::default();
            let mut out = CopyRows::default();
            for c in data.chunks(size) {
                p.feed(Bytes::copy_from_slice(c), &mut out).unwrap();
            }
            assert!(p.finished(), "split {size}");
            let got: Vec<Vec<Option<Vec<u8>>>> = out
                .iter()
                .map(|r| {
                    r.values(usize::MAX)
                        .map(|f| f.map(<[u8]>::to_vec))
                        .collect()
                })
                .collect();
            let want: Vec<Vec<Option<Vec<u8>>>> = rows
                .iter()
                .map(|r| r.iter().map(|f| f.map(|b| b.to_vec())).collect())
                .collect();
            assert_eq!(got, want, "split {size}");
            let last = out.row(1);
            assert_eq!(last.len(), 3);
            assert_eq!(last.get(1), Some(Some(&b"hello"[..])));
            assert_eq!(last.get(2), Some(None));
            assert_eq!(last.get(3), None);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut p = BinaryCopy::default();
        assert!(p
            .feed(
                Bytes::from_static(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"),
                &mut CopyRows::default()
            )
            .is_err());
        let mut data = stream(&[]);
        data.truncate(19);
        data.extend((-7i16).to_be_bytes());
        let mut p = BinaryCopy::default();
        assert!(p.feed(Bytes::from(data), &mut CopyRows::default()).is_err());
        // A negative field length: an error, and no half row is left behind.
        let mut data = stream(&[]);
        data.truncate(19);
        data.extend(2i16.to_be_bytes());
        data.extend(1i32.to_be_bytes());
        data.push(b'x');
        data.extend((-5i32).to_be_bytes());
        let mut out = CopyRows::default();
        assert!(BinaryCopy::default()
            .feed(Bytes::from(data), &mut out)
            .is_err());
        assert!(out.is_empty() && out.fields.is_empty());
    }

    #[test]
    fn held_bytes_count_the_data_and_the_index_and_reset_on_take() {
        let rows = vec![
            vec![Some(&b"abc"[..]), None],
            vec![Some(&b"defgh"[..]), Some(&b""[..])],
        ];
        let data = stream(&rows);
        let mut out = CopyRows::default();
        BinaryCopy::default()
            .feed(Bytes::from(data.clone()), &mut out)
            .unwrap();
        // One chunk (the whole stream), two rows of two fields: 8 bytes per index entry.
        assert_eq!(out.held_bytes(), data.len() + 2 * 8 + 4 * 8);
        let taken = out.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(out.held_bytes(), 0);
    }
}
