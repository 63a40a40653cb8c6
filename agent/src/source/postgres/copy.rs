//! `COPY ... TO STDOUT (FORMAT binary)` stream parser: rows as slices of the received
//! messages (no copy unless a row spans two messages).

use bytes::{Buf, Bytes, BytesMut};

use super::wire::Row;

/// The 11-byte signature that opens a binary COPY stream.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Malformed binary COPY data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("binary COPY data: {0}")]
pub struct CopyError(&'static str);

/// Incremental parser; feed it every CopyData payload in order.
#[derive(Default)]
pub struct BinaryCopy {
    /// A row (or the header) split across messages.
    partial: BytesMut,
    header_done: bool,
    finished: bool,
}

impl BinaryCopy {
    /// Parse the complete rows of `chunk` (plus anything left from before) into `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Row>) -> Result<(), CopyError> {
        let mut data = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        if !self.header_done {
            match header_len(&data)? {
                Some(n) => {
                    data.advance(n);
                    self.header_done = true;
                }
                None => {
                    self.partial.extend_from_slice(&data);
                    return Ok(());
                }
            }
        }
        while !data.is_empty() {
            if self.finished {
                return Err(CopyError("data after the trailer"));
            }
            match row(&data)? {
                Parsed::Row(r, used) => {
                    out.push(r);
                    data.advance(used);
                }
                Parsed::Trailer => {
                    self.finished = true;
                    data.advance(2);
                }
                Parsed::Incomplete => {
                    self.partial.extend_from_slice(&data);
                    return Ok(());
                }
            }
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
    Row(Row, usize),
    Trailer,
    Incomplete,
}

fn row(d: &Bytes) -> Result<Parsed, CopyError> {
    let Some(n) = d.get(..2) else {
        return Ok(Parsed::Incomplete);
    };
    let n = i16::from_be_bytes([n[0], n[1]]);
    if n == -1 {
        return Ok(Parsed::Trailer);
    }
    if n < 0 {
        return Err(CopyError("negative field count"));
    }
    let mut pos = 2;
    let mut r = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let Some(l) = d.get(pos..pos + 4) else {
            return Ok(Parsed::Incomplete);
        };
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        pos += 4;
        if len == -1 {
            r.push(None);
            continue;
        }
        if len < 0 {
            return Err(CopyError("negative field length"));
        }
        let end = pos + len as usize;
        if d.len() < end {
            return Ok(Parsed::Incomplete);
        }
        r.push(Some(d.slice(pos..end)));
        pos = end;
    }
    Ok(Parsed::Row(r, pos))
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
            let mut out = Vec::new();
            for c in data.chunks(size) {
                p.feed(Bytes::copy_from_slice(c), &mut out).unwrap();
            }
            assert!(p.finished(), "split {size}");
            let got: Vec<Vec<Option<Vec<u8>>>> = out
                .iter()
                .map(|r| r.iter().map(|f| f.as_ref().map(|b| b.to_vec())).collect())
                .collect();
            let want: Vec<Vec<Option<Vec<u8>>>> = rows
                .iter()
                .map(|r| r.iter().map(|f| f.map(|b| b.to_vec())).collect())
                .collect();
            assert_eq!(got, want, "split {size}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut p = BinaryCopy::default();
        assert!(p
            .feed(
                Bytes::from_static(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"),
                &mut Vec::new()
            )
            .is_err());
        let mut data = stream(&[]);
        data.truncate(19);
        data.extend((-7i16).to_be_bytes());
        let mut p = BinaryCopy::default();
        assert!(p.feed(Bytes::from(data), &mut Vec::new()).is_err());
    }
}
