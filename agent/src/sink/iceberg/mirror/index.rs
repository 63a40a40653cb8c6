//! The mirror's key index: for every key in the table, where its current row is (data file
//! and position), which a position delete must name when the row is replaced or deleted.
//!
//! Memory is the point of this module. A key that is one integer column (the usual serial or
//! bigserial primary key) is stored as the number itself; any other key as its encoded bytes
//! (arrow-row's order-preserving encoding), inline up to 15 bytes, boxed beyond. The location
//! is one `u64` (file id, position). [`KeyIndex::bytes`] reports what the tables hold.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Bits of a location that hold the row position (the rest hold the file id).
const POS_BITS: u32 = 40;
/// Largest position a location can hold (a trillion rows per file).
const MAX_POS: u64 = (1 << POS_BITS) - 1;
/// Largest file id (16 million data files alive at once).
const MAX_FILE: u32 = (1 << (64 - POS_BITS)) - 1;

/// Where a row is: a data file (by id, see [`KeyIndex::path`]) and its position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    /// The file's id in this index.
    pub file: u32,
    /// The row's position (0-based) in the file.
    pub pos: u64,
}

impl Loc {
    /// The location as one number (file id in the high bits).
    pub fn pack(self) -> u64 {
        (u64::from(self.file) << POS_BITS) | self.pos
    }

    /// The location of a packed number.
    pub fn unpack(v: u64) -> Loc {
        Loc {
            file: (v >> POS_BITS) as u32,
            pos: v & MAX_POS,
        }
    }
}

/// A key as the index stores it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A key of one integer column.
    Int(i64),
    /// Any other key: its encoded bytes.
    Bytes(KeyBytes),
}

/// Encoded key bytes: inline when short (no allocation per key), boxed otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyBytes {
    /// Up to 15 bytes, stored in place.
    Inline { len: u8, bytes: [u8; 15] },
    /// Longer keys.
    Boxed(Box<[u8]>),
}

impl KeyBytes {
    /// The key of `b`.
    pub fn new(b: &[u8]) -> Self {
        if b.len() <= 15 {
            let mut bytes = [0u8; 15];
            bytes[..b.len()].copy_from_slice(b);
            KeyBytes::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            KeyBytes::Boxed(b.into())
        }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            KeyBytes::Inline { len, bytes } => &bytes[..*len as usize],
            KeyBytes::Boxed(b) => b,
        }
    }

    /// Heap bytes held beside the table entry (what the allocator hands out for a box).
    fn heap(&self) -> usize {
        match self {
            KeyBytes::Inline { .. } => 0,
            // glibc: 8 bytes of header, 16-byte granules, 32 at the least.
            KeyBytes::Boxed(b) => (b.len() + 8).div_ceil(16).max(2) * 16,
        }
    }
}

/// Why the index cannot take a row.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// More live data files, or a longer file, than a location can name.
    #[error("the mirror index cannot address {0}")]
    Capacity(String),
}

/// Key → location of its current row, with the data files the locations name.
#[derive(Debug, Default)]
pub struct KeyIndex {
    ints: HashMap<i64, u64>,
    bytes: HashMap<KeyBytes, u64>,
    paths: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
    /// Keys per file id: a file no key points at any more gives its id back ([`Self::free`]),
    /// so the path table holds the live files, not every file ever written.
    refs: Vec<u64>,
    free: Vec<u32>,
    /// Heap bytes of boxed keys and of paths, kept as they change ([`Self::bytes`] is O(1)).
    heap: usize,
}

/// Heap bytes of a path held once (its `Arc<str>` allocation and two table slots).
fn path_heap(p: &str) -> usize {
    p.len() + 16 + 24 + 8
}

impl KeyIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of data file `path`, registering it if new.
    pub fn file_id(&mut self, path: &str) -> Result<u32, IndexError> {
        if let Some(id) = self.ids.get(path) {
            return Ok(*id);
        }
        let p: Arc<str> = path.into();
        self.heap += path_heap(path);
        let id = match self.free.pop() {
            Some(id) => {
                self.paths[id as usize] = p.clone();
                id
            }
            None => {
                let id = u32::try_from(self.paths.len())
                    .ok()
                    // The highest id stays unused: its last position packs to `GONE`.
                    .filter(|id| *id < MAX_FILE)
                    .ok_or_else(|| {
                        IndexError::Capacity(format!("{} data files", self.paths.len()))
                    })?;
                self.paths.push(p.clone());
                self.refs.push(0);
                id
            }
        };
        self.ids.insert(p, id);
        Ok(id)
    }

    /// Forget file `id` if no key points into it and it is not `keep`.
    fn release(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free_file(id);
        }
    }

    fn free_file(&mut self, id: u32) {
        if self.paths[id as usize].is_empty() {
            return;
        }
        let p = std::mem::replace(&mut self.paths[id as usize], Arc::from(""));
        self.heap -= path_heap(&p);
        self.ids.remove(&p);
        self.free.push(id);
    }

    /// Give back the ids of files no key points into (after a commit: files registered for
    /// rows that were all replaced within the flush).
    pub fn free(&mut self) {
        let unused: Vec<u32> = self
            .refs
            .iter()
            .enumerate()
            .filter(|(i, r)| **r == 0 && !self.paths[*i].is_empty())
            .map(|(i, _)| i as u32)
            .collect();
        for id in unused {
            self.free_file(id);
        }
    }

    /// The id of `path`, if the index knows it.
    pub fn known_file(&self, path: &str) -> Option<u32> {
        self.ids.get(path).copied()
    }

    /// Keys whose row is in file `id`.
    pub fn rows_in(&self, id: u32) -> u64 {
        self.refs.get(id as usize).copied().unwrap_or(0)
    }

    /// Every key's location (in no order).
    pub fn locations(&self) -> impl Iterator<Item = Loc> + '_ {
        self.ints
            .values()
            .chain(self.bytes.values())
            .map(|v| Loc::unpack(*v))
    }

    /// The path of file `id`.
    pub fn path(&self, id: u32) -> &str {
        &self.paths[id as usize]
    }

    /// Where `key`'s row is.
    pub fn get(&self, key: &Key) -> Option<Loc> {
        match key {
            Key::Int(k) => self.ints.get(k),
            Key::Bytes(k) => self.bytes.get(k),
        }
        .map(|v| Loc::unpack(*v))
    }

    /// `key`'s row is now at `loc`; the previous location, if any.
    pub fn insert(&mut self, key: Key, loc: Loc) -> Result<Option<Loc>, IndexError> {
        if loc.pos > MAX_POS || loc.file as usize >= self.refs.len() {
            return Err(IndexError::Capacity(format!(
                "position {} of file {}",
                loc.pos, loc.file
            )));
        }
        let v = loc.pack();
        self.refs[loc.file as usize] += 1;
        let old = match key {
            Key::Int(k) => self.ints.insert(k, v),
            Key::Bytes(k) => {
                let heap = k.heap();
                let old = self.bytes.insert(k, v);
                if old.is_none() {
                    self.heap += heap;
                }
                old
            }
        }
        .map(Loc::unpack);
        if let Some(o) = old {
            self.release(o.file);
        }
        Ok(old)
    }

    /// `key`'s row is gone; where it was.
    pub fn remove(&mut self, key: &Key) -> Option<Loc> {
        let old = match key {
            Key::Int(k) => self.ints.remove(k),
            Key::Bytes(k) => {
                let old = self.bytes.remove(k);
                if old.is_some() {
                    self.heap -= k.heap();
                }
                old
            }
        }
        .map(Loc::unpack);
        if let Some(o) = old {
            self.release(o.file);
        }
        old
    }

    /// Forget every key (the table was emptied); file ids stay valid until [`Self::free`].
    pub fn clear_keys(&mut self) {
        self.ints = HashMap::new();
        self.heap -= self.bytes.keys().map(KeyBytes::heap).sum::<usize>();
        self.bytes = HashMap::new();
        self.refs.iter_mut().for_each(|r| *r = 0);
    }

    /// Forget every key whose row is in one of the files `ids` (they were removed).
    pub fn drop_files(&mut self, ids: &HashSet<u32>) {
        if ids.is_empty() {
            return;
        }
        let gone = |v: &u64| ids.contains(&Loc::unpack(*v).file);
        self.ints.retain(|_, v| !gone(v));
        let mut freed = 0;
        self.bytes.retain(|k, v| {
            let keep = !gone(v);
            if !keep {
                freed += k.heap();
            }
            keep
        });
        self.heap -= freed;
        for id in ids {
            if let Some(r) = self.refs.get_mut(*id as usize) {
                *r = 0;
            }
        }
    }

    /// Files the index names.
    pub fn files(&self) -> usize {
        self.ids.len()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.ints.len() + self.bytes.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the index holds: the hash tables' buckets (entry and control byte, at their
    /// capacity), boxed keys, and the file paths. Constant time: checked after every batch.
    pub fn bytes(&self) -> u64 {
        fn table<K, V>(m: &HashMap<K, V>) -> usize {
            if m.capacity() == 0 {
                return 0;
            }
            // hashbrown: buckets are the next power of two above capacity × 8/7.
            let buckets = (m.capacity() * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(K, V)>() + 1)
        }
        (table(&self.ints) + table(&self.bytes) + self.heap) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_round_trip_and_keys_replace() {
        let mut ix = KeyIndex::new();
        let a = ix.file_id("s3://b/t/data/a.parquet").unwrap();
        let b = ix.file_id("s3://b/t/data/b.parquet").unwrap();
        assert_eq!(ix.file_id("s3://b/t/data/a.parquet").unwrap(), a);
        let at = |file, pos| Loc { file, pos };
        let long = Key::Bytes(KeyBytes::new(&[9u8; 40]));
        let short = Key::Bytes(KeyBytes::new(b"abc"));
        ix.insert(long.clone(), at(a, 0)).unwrap();
        assert_eq!(ix.insert(Key::Int(7), at(a, 3)).unwrap(), None);
        assert_eq!(
            ix.insert(Key::Int(7), at(b, MAX_POS)).unwrap(),
            Some(at(a, 3))
        );
        assert_eq!(ix.get(&Key::Int(7)), Some(at(b, MAX_POS)));
        ix.insert(short.clone(), at(b, 1)).unwrap();
        assert_eq!(ix.get(&long), Some(at(a, 0)));
        assert_eq!(ix.path(b), "s3://b/t/data/b.parquet");
        assert_eq!(ix.remove(&short), Some(at(b, 1)));
        assert_eq!(ix.get(&short), None);
        assert_eq!(ix.len(), 2);
        assert!(ix.insert(Key::Int(1), at(a, MAX_POS + 1)).is_err());
        assert_eq!(ix.files(), 2);
        // No key points into b any more: its id is free for the next file.
        ix.remove(&Key::Int(7));
        assert_eq!(ix.files(), 1);
        assert_eq!(ix.file_id("s3://b/t/data/c.parquet").unwrap(), b);
        // A registered file no key ever pointed into is given back by `free`.
        let d = ix.file_id("s3://b/t/data/d.parquet").unwrap();
        assert_eq!(ix.files(), 3);
        ix.free();
        assert_eq!(ix.files(), 1);
        assert_eq!(ix.known_file("s3://b/t/data/d.parquet"), None);
        assert_ne!(d, a);
        // The O(1) byte count agrees with a recount after all of this.
        let recount: usize = ix.bytes.keys().map(KeyBytes::heap).sum::<usize>()
            + ix.ids.keys().map(|p| path_heap(p)).sum::<usize>();
        assert_eq!(ix.heap, recount);
    }

    #[test]
    fn dropping_files_forgets_their_keys_only() {
        let mut ix = KeyIndex::new();
        let old = ix.file_id("s3://b/t/data/old.parquet").unwrap();
        let new = ix.file_id("s3://b/t/data/new.parquet").unwrap();
        let at = |file, pos| Loc { file, pos };
        let s = |b: &[u8]| Key::Bytes(KeyBytes::new(b));
        ix.insert(Key::Int(1), at(old, 0)).unwrap();
        ix.insert(Key::Int(2), at(new, 0)).unwrap();
        ix.insert(s(&[7u8; 30]), at(old, 1)).unwrap();
        ix.insert(s(b"kept"), at(new, 1)).unwrap();
        ix.drop_files(&HashSet::from([old]));
        assert_eq!(ix.get(&Key::Int(1)), None);
        assert_eq!(ix.get(&s(&[7u8; 30])), None);
        assert_eq!(ix.get(&Key::Int(2)), Some(at(new, 0)));
        assert_eq!(ix.get(&s(b"kept")), Some(at(new, 1)));
        assert_eq!((ix.len(), ix.rows_in(old), ix.rows_in(new)), (2, 0, 2));
        ix.free();
        assert_eq!(ix.known_file("s3://b/t/data/old.parquet"), None);
        let recount: usize = ix.bytes.keys().map(KeyBytes::heap).sum::<usize>()
            + ix.ids.keys().map(|p| path_heap(p)).sum::<usize>();
        assert_eq!(ix.heap, recount);
    }

    #[test]
    fn an_integer_key_costs_at_most_48_bytes() {
        for n in [1_000usize, 100_000, 1_000_000] {
            let mut ix = KeyIndex::new();
            let f = ix.file_id("f").unwrap();
            for k in 0..n as i64 {
                ix.insert(
                    Key::Int(k * 7919),
                    Loc {
                        file: f,
                        pos: k as u64,
                    },
                )
                .unwrap();
            }
            let per_key = ix.bytes() as f64 / n as f64;
            assert!(per_key <= 48.0, "{n} keys: {per_key:.1} bytes per key");
        }
    }
}
