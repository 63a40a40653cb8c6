//! pgoutput message decoder: protocol version 1, plus the version 2 messages that stream
//! in-progress transactions ([`decode_stream`], [`split_streamed`]).
//!
//! Messages borrow from the replication payload: tuple values stay slices of the wire bytes
//! until they are appended to Arrow builders, so decoding allocates nothing per row.
//! Every length is checked; malformed input is an error, never a panic.

use crate::model::Lsn;

/// A malformed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended before the message did.
    #[error("pgoutput {0}: truncated message")]
    Truncated(&'static str),
    /// An unexpected tag byte.
    #[error("pgoutput {context}: unexpected byte {byte:#04x}")]
    UnexpectedByte {
        /// Where it was found.
        context: &'static str,
        /// The byte.
        byte: u8,
    },
    /// Not valid UTF-8 where the protocol promises text.
    #[error("pgoutput {0}: invalid UTF-8")]
    Utf8(&'static str),
    /// A negative count or length.
    #[error("pgoutput {0}: negative length")]
    NegativeLength(&'static str),
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`-1` if none).
    pub type_modifier: i32,
}

impl RelationColumn {
    /// The column as the sink sees it: its kind from the type OID and modifier.
    pub fn to_model(&self) -> crate::model::Column {
        crate::model::Column {
            name: self.name.clone(),
            kind: super::types::ColumnKind::from_oid(self.type_oid, self.type_modifier),
            key: self.key,
        }
    }
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
        /// Commit time.
        commit_ts: i64,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Origin commit LSN.
        lsn: Lsn,
        /// Origin name.
        name: &'a str,
    },
    /// Table definition; sent before the first change of a table in a session and after DDL.
    Relation {
        /// Relation OID.
        oid: u32,
        /// Schema name.
        namespace: &'a str,
        /// Table name.
        name: &'a str,
        /// Replica identity setting (`d`, `n`, `f`, `i`).
        replica_identity: u8,
        /// Columns.
        columns: Vec<RelationColumn>,
    },
    /// A non-builtin type referenced by a Relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema name.
        namespace: &'a str,
        /// Type name.
        name: &'a str,
    },
    /// A new row.
    Insert {
        /// Relation OID.
        oid: u32,
        /// New row.
        new: TupleData<'a>,
    },
    /// A changed row.
    Update {
        /// Relation OID.
        oid: u32,
        /// Old key (`K`) or old row (`O`) when the key changed or REPLICA IDENTITY FULL.
        old: Option<TupleData<'a>>,
        /// The old tuple is a `K` (key) tuple: sent only when the replica identity key changed.
        key_changed: bool,
        /// New row.
        new: TupleData<'a>,
    },
    /// A removed row.
    Delete {
        /// Relation OID.
        oid: u32,
        /// Key (`K`) or whole old row (`O`).
        old: TupleData<'a>,
    },
    /// Tables emptied.
    Truncate {
        /// 1 = CASCADE, 2 = RESTART IDENTITY.
        options: u8,
        /// Relation OIDs.
        oids: Vec<u32>,
    },
    /// `pg_logical_emit_message` payload.
    LogicalMessage {
        /// Emitted inside a transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Application prefix.
        prefix: &'a str,
        /// Content bytes.
        content: &'a [u8],
    },
}

/// One column value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column<'a> {
    /// SQL NULL.
    Null,
    /// Unchanged TOASTed value: not sent.
    Unchanged,
    /// Text format value.
    Text(&'a [u8]),
    /// Binary format value.
    Binary(&'a [u8]),
}

/// Validated tuple data; iterate with [`TupleData::columns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TupleData<'a> {
    count: u16,
    body: &'a [u8],
}

impl<'a> TupleData<'a> {
    /// Number of columns.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterate the column values in relation order.
    pub fn columns(&self) -> TupleIter<'a> {
        TupleIter {
            left: self.count,
            rest: self.body,
        }
    }

    /// Parse and validate a tuple at the start of `r`, advancing it past the tuple.
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let n = r.i16("tuple")?;
        if n < 0 {
            return Err(DecodeError::NegativeLength("tuple"));
        }
        let start = r.buf;
        for _ in 0..n {
            match r.u8("tuple column")? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = r.i32("tuple column")?;
                    if len < 0 {
                        return Err(DecodeError::NegativeLength("tuple column"));
                    }
                    r.take(len as usize, "tuple column")?;
                }
                byte => {
                    return Err(DecodeError::UnexpectedByte {
                        context: "tuple column kind",
                        byte,
                    })
                }
            }
        }
        let used = start.len() - r.buf.len();
        Ok(Self {
            count: n as u16,
            body: &start[..used],
        })
    }
}

/// Iterator over a validated tuple.
#[derive(Clone)]
pub struct TupleIter<'a> {
    left: u16,
    rest: &'a [u8],
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = Column<'a>;

    fn next(&mut self) -> Option<Column<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The tuple was validated when it was read, so these reads cannot fail; if they
        // somehow did, ending the iteration early is still safe.
        let (&kind, rest) = self.rest.split_first()?;
        self.rest = rest;
        match kind {
            b'n' => Some(Column::Null),
            b'u' => Some(Column::Unchanged),
            _ => {
                let len_bytes = self.rest.get(..4)?;
                let len = i32::from_be_bytes(len_bytes.try_into().ok()?) as usize;
                let value = self.rest.get(4..4 + len)?;
                self.rest = &self.rest[4 + len..];
                Some(if kind == b't' {
                    Column::Text(value)
                } else {
                    Column::Binary(value)
                })
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, ctx: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(ctx));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, ctx: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, ctx)?[0])
    }
    fn i16(&mut self, ctx: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, ctx)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self, ctx: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, ctx)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self, ctx: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(ctx)? as u32)
    }
    fn i64(&mut self, ctx: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, ctx)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn cstr(&mut self, ctx: &'static str) -> Result<&'a str, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(ctx))?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::Utf8(ctx))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

/// Decode one pgoutput v1 message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    match buf.split_first() {
        Some((tag, body)) => decode_tagged(*tag, body),
        None => Err(DecodeError::Truncated("message tag")),
    }
}

/// Decode a message given its tag and the bytes after it (a streamed change as
/// [`split_streamed`] leaves it, without copying it together).
pub fn decode_tagged(tag: u8, body: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader { buf: body };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.i64("begin")? as u64),
            commit_ts: r.i64("begin")?,
            xid: r.u32("begin")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit")?,
            commit_lsn: Lsn(r.i64("commit")? as u64),
            end_lsn: Lsn(r.i64("commit")? as u64),
            commit_ts: r.i64("commit")?,
        },
        b'O' => Message::Origin {
            lsn: Lsn(r.i64("origin")? as u64),
            name: r.cstr("origin")?,
        },
        b'R' => {
            let oid = r.u32("relation")?;
            let namespace = r.cstr("relation")?;
            let name = r.cstr("relation")?;
            let replica_identity = r.u8("relation")?;
            let n = r.i16("relation")?;
            if n < 0 {
                return Err(DecodeError::NegativeLength("relation"));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(RelationColumn {
                    key: r.u8("relation column")? & 1 == 1,
                    name: r.cstr("relation column")?.to_string(),
                    type_oid: r.u32("relation column")?,
                    type_modifier: r.i32("relation column")?,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32("type")?,
            namespace: r.cstr("type")?,
            name: r.cstr("type")?,
        },
        b'I' => {
            let oid = r.u32("insert")?;
            expect(&mut r, b'N', "insert")?;
            Message::Insert {
                oid,
                new: TupleData::read(&mut r)?,
            }
        }
        b'U' => {
            let oid = r.u32("update")?;
            let mut old = None;
            let mut kind = r.u8("update")?;
            let key_changed = kind == b'K';
            if kind == b'K' || kind == b'O' {
                old = Some(TupleData::read(&mut r)?);
                kind = r.u8("update")?;
            }
            if kind != b'N' {
                return Err(DecodeError::UnexpectedByte {
                    context: "update",
                    byte: kind,
                });
            }
            Message::Update {
                oid,
                old,
                key_changed,
                new: TupleData::read(&mut r)?,
            }
        }
        b'D' => {
            let oid = r.u32("delete")?;
            let kind = r.u8("delete")?;
            if kind != b'K' && kind != b'O' {
                return Err(DecodeError::UnexpectedByte {
                    context: "delete",
                    byte: kind,
                });
            }
            Message::Delete {
                oid,
                old: TupleData::read(&mut r)?,
            }
        }
        b'T' => {
            let n = r.i32("truncate")?;
            if n < 0 {
                return Err(DecodeError::NegativeLength("truncate"));
            }
            let options = r.u8("truncate")?;
            // Bound the allocation by what the payload can actually hold.
            let mut oids = Vec::with_capacity((n as usize).min(r.buf.len() / 4));
            for _ in 0..n {
                oids.push(r.u32("truncate")?);
            }
            Message::Truncate { options, oids }
        }
        b'M' => {
            let flags = r.u8("message")?;
            let lsn = Lsn(r.i64("message")? as u64);
            let prefix = r.cstr("message")?;
            let len = r.i32("message")?;
            if len < 0 {
                return Err(DecodeError::NegativeLength("message"));
            }
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len as usize, "message")?,
            }
        }
        byte => {
            return Err(DecodeError::UnexpectedByte {
                context: "message tag",
                byte,
            })
        }
    };
    Ok(msg)
}

/// A protocol 2 message about a streamed (in-progress) transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMessage {
    /// `S`: a block of the transaction's changes follows.
    Start {
        /// Top-level transaction id.
        xid: u32,
        /// The transaction's first block.
        first: bool,
    },
    /// `E`: the block ended.
    Stop,
    /// `c`: the transaction committed.
    Commit {
        /// Top-level transaction id.
        xid: u32,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// `A`: the transaction (`subxid == xid`) or one subtransaction of it aborted.
    Abort {
        /// Top-level transaction id.
        xid: u32,
        /// Aborted (sub)transaction id.
        subxid: u32,
    },
}

/// Decode a stream control message; None for any other tag.
pub fn decode_stream(buf: &[u8]) -> Result<Option<StreamMessage>, DecodeError> {
    let mut r = Reader { buf };
    Ok(Some(match r.u8("message tag")? {
        b'S' => StreamMessage::Start {
            xid: r.u32("stream start")?,
            first: r.u8("stream start")? == 1,
        },
        b'E' => StreamMessage::Stop,
        b'c' => {
            let xid = r.u32("stream commit")?;
            let _flags = r.u8("stream commit")?;
            StreamMessage::Commit {
                xid,
                commit_lsn: Lsn(r.i64("stream commit")? as u64),
                end_lsn: Lsn(r.i64("stream commit")? as u64),
                commit_ts: r.i64("stream commit")?,
            }
        }
        // Protocol 4 appends the abort LSN and time; they are not needed.
        b'A' => StreamMessage::Abort {
            xid: r.u32("stream abort")?,
            subxid: r.u32("stream abort")?,
        },
        _ => return Ok(None),
    }))
}

/// Whether `data` is an Origin message (inside a stream block it carries no xid).
pub fn is_origin(data: &[u8]) -> bool {
    data.first() == Some(&b'O')
}

/// A change inside a stream block carries its (sub)transaction id after the tag: returns
/// that id and the message as protocol 1 would send it (tag, then the rest).
pub fn split_streamed(buf: &[u8]) -> Result<(u32, [&[u8]; 2]), DecodeError> {
    match buf {
        [tag @ (b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M'), a, b, c, d, rest @ ..] => Ok((
            u32::from_be_bytes([*a, *b, *c, *d]),
            [std::slice::from_ref(tag), rest],
        )),
        [tag, ..] => Err(DecodeError::UnexpectedByte {
            context: "message in a stream block",
            byte: *tag,
        }),
        [] => Err(DecodeError::Truncated("message in a stream block")),
    }
}

fn expect(r: &mut Reader<'_>, want: u8, ctx: &'static str) -> Result<(), DecodeError> {
    let byte = r.u8(ctx)?;
    if byte != want {
        return Err(DecodeError::UnexpectedByte { context: ctx, byte });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(cols: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => v.push(b'n'),
                Some(b) => {
                    v.push(b't');
                    v.extend((b.len() as i32).to_be_bytes());
                    v.extend(*b);
                }
            }
        }
        v
    }

    #[test]
    fn insert_round_trip() {
        let mut m = vec![b'I'];
        m.extend(42u32.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(&[Some(b"1"), None, Some(b"hello")]));
        let Message::Insert { oid, new } = decode(&m).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(oid, 42);
        let cols: Vec<_> = new.columns().collect();
        assert_eq!(
            cols,
            vec![Column::Text(b"1"), Column::Null, Column::Text(b"hello")]
        );
    }

    #[test]
    fn update_with_old_key() {
        let mut m = vec![b'U'];
        m.extend(7u32.to_be_bytes());
        m.push(b'K');
        m.extend(tuple(&[Some(b"1")]));
        m.push(b'N');
        m.extend(tuple(&[Some(b"2"), Some(b"x")]));
        let Message::Update { old, new, .. } = decode(&m).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(old.unwrap().len(), 1);
        assert_eq!(new.len(), 2);
    }

    #[test]
    fn stream_messages_decode() {
        let mut c = vec![b'c'];
        c.extend_from_slice(&7u32.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&100u64.to_be_bytes());
        c.extend_from_slice(&120u64.to_be_bytes());
        c.extend_from_slice(&5i64.to_be_bytes());
        assert_eq!(
            decode_stream(&c).unwrap(),
            Some(StreamMessage::Commit {
                xid: 7,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(120),
                commit_ts: 5
            })
        );
        let mut a = vec![b'A'];
        a.extend_from_slice(&7u32.to_be_bytes());
        a.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_stream(&a).unwrap(),
            Some(StreamMessage::Abort { xid: 7, subxid: 9 })
        );
        assert_eq!(decode_stream(b"E").unwrap(), Some(StreamMessage::Stop));
        assert_eq!(decode_stream(b"I").unwrap(), None);
        assert!(decode_stream(&c[..10]).is_err());
        // An in-stream insert is the protocol 1 insert with the xid after the tag.
        let mut ins = vec![b'I'];
        ins.extend_from_slice(&9u32.to_be_bytes());
        ins.extend_from_slice(&16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some(&b"1"[..])]));
        let (xid, [tag, rest]) = split_streamed(&ins).unwrap();
        assert_eq!(xid, 9);
        let v1 = [tag, rest].concat();
        assert!(matches!(
            decode(&v1).unwrap(),
            Message::Insert { oid: 16384, .. }
        ));
        assert!(split_streamed(b"I\0").is_err());
        assert!(split_streamed(b"B\0\0\0\0").is_err());
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        assert!(decode(b"").is_err());
        assert!(decode(b"B\0\0").is_err());
        assert!(decode(b"Z").is_err());
        let mut m = vec![b'I'];
        m.extend(1u32.to_be_bytes());
        m.push(b'N');
        m.extend(1i16.to_be_bytes());
        m.push(b't');
        m.extend(100i32.to_be_bytes());
        m.extend(b"short");
        assert_eq!(decode(&m), Err(DecodeError::Truncated("tuple column")));
        // A huge truncate count must not allocate gigabytes.
        let mut t = vec![b'T'];
        t.extend(i32::MAX.to_be_bytes());
        t.push(0);
        assert!(decode(&t).is_err());
    }

    /// Deterministic pseudo-random bytes never make the decoder panic.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let mut buf = Vec::with_capacity(len % 64);
            for _ in 0..(len % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if let Some(first) = buf.first_mut() {
                *first = b"BCORYIUDTM"[len % 10];
            }
            if let Ok(Message::Insert { new, .. }) = decode(&buf) {
                let _ = new.columns().count();
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        /// Arbitrary bytes: an error or a message, never a panic; tuples iterate safely.
        #[test]
        fn decoder_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(msg) = decode(&buf) {
                match msg {
                    Message::Insert { new, .. } => { let _ = new.columns().count(); }
                    Message::Update { old, new, .. } => {
                        let _ = new.columns().count();
                        if let Some(o) = old { let _ = o.columns().count(); }
                    }
                    Message::Delete { old, .. } => { let _ = old.columns().count(); }
                    _ => {}
                }
            }
        }

        /// Valid tag bytes followed by arbitrary bodies reach deeper into each parser.
        #[test]
        fn decoder_never_panics_on_tagged_bodies(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let mut buf = vec![tag];
            buf.extend(body);
            let _ = decode(&buf);
        }
    }
}
