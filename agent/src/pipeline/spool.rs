//! Local spool for a transaction PostgreSQL streams while it is still in progress (pgoutput
//! protocol 2): its changes wait in an unnamed temporary file (memory stays flat however big
//! the transaction) until Stream Commit replays them in order, or Stream Abort drops them.
//!
//! Subtransactions: the changes of one top-level transaction arrive in the order they were
//! made, so everything after a subtransaction's first change belongs to it or to
//! subtransactions started after it. Rolling it back truncates the file there, as
//! PostgreSQL's own apply worker does.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Where spools go by default: `$TMPDIR` when set, else `/var/tmp` (on disk by convention,
/// where `/tmp` is often a RAM-backed tmpfs that would turn a large transaction into memory),
/// else the system temp directory.
pub fn default_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("TMPDIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let var_tmp = Path::new("/var/tmp");
    if var_tmp.is_dir() {
        return var_tmp.to_path_buf();
    }
    std::env::temp_dir()
}

/// The spooled changes of one in-progress transaction.
pub struct Spool {
    file: BufWriter<File>,
    /// Bytes written (the logical end of the file).
    len: u64,
    /// Top-level transaction id.
    xid: u32,
    /// Each subtransaction's first change: (subxid, offset), in arrival order.
    subxacts: Vec<(u32, u64)>,
    /// The subtransactions in `subxacts` (a transaction may have very many).
    seen: std::collections::HashSet<u32>,
    /// Changes spooled.
    changes: u64,
}

impl Spool {
    /// A new spool for top-level transaction `xid`, in `dir` (else [`default_dir`]).
    pub fn new(dir: Option<&Path>, xid: u32) -> std::io::Result<Self> {
        let file = match dir {
            Some(d) => tempfile::tempfile_in(d)?,
            None => tempfile::tempfile_in(default_dir())?,
        };
        Ok(Self {
            file: BufWriter::with_capacity(256 * 1024, file),
            len: 0,
            xid,
            subxacts: Vec::new(),
            seen: Default::default(),
            changes: 0,
        })
    }

    /// Append one message (`parts` concatenated) of (sub)transaction `subxid`.
    pub fn push(&mut self, subxid: u32, parts: &[&[u8]]) -> std::io::Result<()> {
        if subxid != self.xid
            && self.subxacts.last().is_none_or(|(x, _)| *x != subxid)
            && self.seen.insert(subxid)
        {
            self.subxacts.push((subxid, self.len));
        }
        let n: usize = parts.iter().map(|p| p.len()).sum();
        let n32 = u32::try_from(n).map_err(|_| std::io::Error::other("message over 4 GiB"))?;
        self.file.write_all(&n32.to_be_bytes())?;
        for p in parts {
            self.file.write_all(p)?;
        }
        self.len += 4 + n as u64;
        self.changes += 1;
        Ok(())
    }

    /// Drop subtransaction `subxid`'s changes and everything spooled after them.
    pub fn abort_subxact(&mut self, subxid: u32) -> std::io::Result<()> {
        if !self.seen.contains(&subxid) {
            // It spooled nothing.
            return Ok(());
        }
        // Usually the newest: search from the end.
        let Some(pos) = self.subxacts.iter().rposition(|(x, _)| *x == subxid) else {
            // It spooled nothing.
            return Ok(());
        };
        let offset = self.subxacts[pos].1;
        for (x, _) in self.subxacts.drain(pos..) {
            self.seen.remove(&x);
        }
        self.file.flush()?;
        let f = self.file.get_mut();
        f.set_len(offset)?;
        f.seek(SeekFrom::Start(offset))?;
        self.len = offset;
        // The count is only informational after a rollback; keep it an upper bound.
        Ok(())
    }

    /// Messages spooled (including any rolled back).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Bytes spooled.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Read the spooled messages back from the start.
    #[cfg(test)]
    pub fn into_reader(self) -> std::io::Result<SpoolReader> {
        self.into_reader_from(0)
    }

    /// Read the spooled messages back from byte `offset` (a message boundary, as
    /// [`Self::bytes`] gave it before that message was pushed).
    pub fn into_reader_from(self, offset: u64) -> std::io::Result<SpoolReader> {
        let mut f = self.file.into_inner().map_err(|e| e.into_error())?;
        let offset = offset.min(self.len);
        f.seek(SeekFrom::Start(offset))?;
        Ok(SpoolReader {
            r: BufReader::with_capacity(256 * 1024, f),
            left: self.len - offset,
        })
    }
}

/// Spooled messages in the order they were made.
pub struct SpoolReader {
    r: BufReader<File>,
    left: u64,
}

impl SpoolReader {
    /// The next message into `buf`; false at the end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> std::io::Result<bool> {
        if self.left == 0 {
            return Ok(false);
        }
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        buf.clear();
        buf.resize(n, 0);
        self.r.read_exact(buf)?;
        self.left = self.left.saturating_sub(4 + n as u64);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(s: Spool) -> Vec<Vec<u8>> {
        let mut r = s.into_reader().unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while r.next_into(&mut buf).unwrap() {
            out.push(buf.clone());
        }
        out
    }

    #[test]
    fn replays_in_order_and_rolls_back_subtransactions() {
        let mut s = Spool::new(None, 10).unwrap();
        s.push(10, &[b"a", b"1"]).unwrap();
        s.push(11, &[b"b"]).unwrap(); // SAVEPOINT s1
        s.push(12, &[b"c"]).unwrap(); // SAVEPOINT s2 inside s1
        s.push(12, &[b"c2"]).unwrap();
        s.abort_subxact(12).unwrap(); // ROLLBACK TO s2: its changes go
        s.push(13, &[b"d"]).unwrap(); // s2 again: a new subtransaction id
        s.abort_subxact(99).unwrap(); // a subtransaction that wrote nothing
        s.push(13, &[b"e"]).unwrap();
        assert_eq!(
            read_all(s),
            vec![b"a1".to_vec(), b"b".to_vec(), b"d".to_vec(), b"e".to_vec()]
        );
    }

    #[test]
    fn rolling_back_an_outer_subtransaction_drops_its_children() {
        let mut s = Spool::new(None, 1).unwrap();
        s.push(1, &[b"keep"]).unwrap();
        s.push(2, &[b"outer"]).unwrap();
        s.push(3, &[b"inner"]).unwrap();
        s.abort_subxact(3).unwrap();
        s.abort_subxact(2).unwrap();
        s.push(1, &[b"after"]).unwrap();
        assert_eq!(read_all(s), vec![b"keep".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn reads_back_from_a_message_boundary() {
        let mut s = Spool::new(None, 1).unwrap();
        s.push(1, &[b"first"]).unwrap();
        let at = s.bytes();
        s.push(1, &[b"sec", b"ond"]).unwrap();
        s.push(1, &[b"third"]).unwrap();
        let mut r = s.into_reader_from(at).unwrap();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while r.next_into(&mut buf).unwrap() {
            out.push(buf.clone());
        }
        assert_eq!(out, vec![b"second".to_vec(), b"third".to_vec()]);
    }

    #[test]
    fn large_spools_stay_on_disk() {
        let mut s = Spool::new(None, 1).unwrap();
        let row = vec![7u8; 1000];
        for _ in 0..10_000 {
            s.push(1, &[&row]).unwrap();
        }
        assert_eq!(s.bytes(), 10_000 * 1004);
        let mut r = s.into_reader().unwrap();
        let mut buf = Vec::new();
        let mut n = 0;
        while r.next_into(&mut buf).unwrap() {
            assert_eq!(buf, row);
            n += 1;
        }
        assert_eq!(n, 10_000);
    }
}
