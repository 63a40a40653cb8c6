//! Mirror tables: the current state of a source table. Each flush folds the changelog rows it
//! received by key: a row that replaces or deletes a key's current row adds a position delete
//! for it (its data file and position, from the [`index::KeyIndex`]), a new or changed row is
//! appended to a data file whose path and positions the index then records. Data files and
//! the delete file commit as one snapshot. Position deletes, not equality deletes: every
//! engine reads them (PyIceberg refuses equality deletes) and a scan pays nothing per key.

mod compact;
pub mod files;
pub mod index;
mod rekey;

pub use compact::{CompactRules, Compacted, Rewrite};
pub use rekey::{MirrorKey, Rekeyed};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, UInt32Array};
use arrow_row::{RowConverter, SortField};
use arrow_schema::{DataType, SchemaRef};
use futures::StreamExt;
use iceberg::arrow::ArrowFileReader;
use iceberg::spec::{DataContentType, DataFile};
use iceberg::table::Table;
use parquet::arrow::arrow_reader::RowSelection;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

use self::files::DataWriter;
use self::index::{Key, KeyBytes, KeyIndex, Loc};
use super::project::{by_name, conform, field_id};
use super::schema::{CDC_LSN, CDC_OP, CDC_SEQ, CDC_UNCHANGED};
use super::SinkError;
use crate::model::Lsn;
use crate::telemetry::events::MirrorRowsWithoutKey;

/// Bytes after which a mirror data file is finished and the next one started (without
/// compaction rules; else their `target_file_size`).
const TARGET_FILE_BYTES: u64 = 128 << 20;

/// A live data file: what compaction weighs.
#[derive(Debug, Clone, Copy)]
struct FileStat {
    rows: u64,
    bytes: u64,
}

/// A live position delete file: its size and the data files it names (empty: not known).
#[derive(Debug, Clone)]
struct DeleteStat {
    bytes: u64,
    targets: Vec<Arc<str>>,
}

pub(super) fn werr(e: impl std::fmt::Display) -> SinkError {
    SinkError::Write(e.to_string())
}

/// Turns the key columns of a batch into index keys.
struct KeyEncoder {
    names: Vec<String>,
    /// The key columns' Arrow types (what the encoding depends on).
    types: Vec<DataType>,
    /// arrow-row's encoder, for any key that is not one integer column.
    rows: Option<RowConverter>,
}

impl KeyEncoder {
    /// An encoder of columns `names`; with `bytes`, every key is encoded (also one integer
    /// column).
    fn new(names: Vec<String>, types: &[DataType], bytes: bool) -> Result<Self, SinkError> {
        let single_int =
            !bytes && types.len() == 1 && matches!(types[0], DataType::Int32 | DataType::Int64);
        let rows = if single_int || types.is_empty() {
            None
        } else {
            Some(
                RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect())
                    .map_err(werr)?,
            )
        };
        Ok(Self {
            names,
            types: types.to_vec(),
            rows,
        })
    }

    /// The key of every row of `batch` (which holds the key columns by name).
    fn keys(&self, batch: &RecordBatch) -> Result<Vec<Key>, SinkError> {
        let cols: Vec<ArrayRef> = self
            .names
            .iter()
            .map(|n| {
                batch
                    .column_by_name(n)
                    .cloned()
                    .ok_or_else(|| SinkError::Write(format!("key column {n:?} missing")))
            })
            .collect::<Result<_, _>>()?;
        match &self.rows {
            None => {
                let c = &cols[0];
                Ok(match c.data_type() {
                    DataType::Int32 => c
                        .as_primitive::<Int32Type>()
                        .values()
                        .iter()
                        .map(|v| Key::Int(i64::from(*v)))
                        .collect(),
                    _ => c
                        .as_primitive::<Int64Type>()
                        .values()
                        .iter()
                        .map(|v| Key::Int(*v))
                        .collect(),
                })
            }
            Some(conv) => {
                let rows = conv.convert_columns(&cols).map_err(werr)?;
                Ok(rows
                    .iter()
                    .map(|r| Key::Bytes(KeyBytes::new(r.as_ref())))
                    .collect())
            }
        }
    }
}

/// What a mirror table holds and has staged for its next commit.
pub struct MirrorWriter {
    schema: SchemaRef,
    keys: Option<KeyEncoder>,
    index: KeyIndex,
    /// Keys changed since the last commit: their new location, or `None` if deleted.
    /// (Packed locations, [`GONE`] for a deleted key: 8 bytes where `Option<Loc>` takes 24;
    /// a flush can stage millions of keys.)
    staged: HashMap<Key, u64>,
    /// Rows to delete: (file id, position).
    deletes: Vec<(u32, u64)>,
    /// A TRUNCATE since the last commit: every file live at the base is removed.
    reset: bool,
    open: Option<DataWriter>,
    written: Vec<DataFile>,
    /// Rows appended since the last commit.
    rows: u64,
    /// Index build time at open.
    pub built_in: Duration,
    /// Most bytes the index (with the keys and deleted positions staged for the next commit)
    /// may hold.
    budget: u64,
    /// `namespace.table`, for the budget's error.
    name: String,
    /// Live data files of the table.
    data_files: HashMap<Arc<str>, FileStat>,
    /// Live position delete files of the table.
    delete_files: HashMap<Arc<str>, DeleteStat>,
    /// The delete file staged for the next commit.
    delete_staged: Option<(DataFile, Vec<Arc<str>>)>,
    /// When and how compaction rewrites files (`None`: maintenance is off).
    rules: Option<CompactRules>,
    /// Field ids of the key columns.
    key_ids: Vec<i32>,
    /// Those that were identifier fields at open (floats and lists cannot be).
    key_identifiers: Vec<i32>,
    /// Rows are identified by all their values (no key; REPLICA IDENTITY FULL): equal rows
    /// may repeat, the n-th copy is indexed as the row's bytes followed by n.
    whole_row: bool,
    /// Why the index may no longer match the table (a compaction whose commit outcome is
    /// unknown could not be reloaded): every later write fails until the table is reopened.
    stale: Option<String>,
    /// The key changed since the last commit: the index is in `staged` until it lands.
    rekeyed: bool,
    /// Rows without a value in a key column (PostgreSQL filled the column in without sending
    /// them): no change can name them, and compaction, which keeps only indexed rows, is off
    /// for the table so that they are not lost.
    unkeyed: u64,
    /// A copy of the table taken again is replacing the rows it had: see [`Replacing`].
    replacing: Option<Replacing>,
    /// The files the staged change removes at the end of a replacing copy.
    replaced: Option<HashSet<String>>,
    /// The last delete folded in: its `_cdc_lsn`, `_cdc_seq` and where its key's row was. An
    /// update that moved its key comes right after its old key's delete, and takes the values
    /// it did not send (unchanged TOAST) from that row.
    last_delete: Option<(i64, i64, Option<Loc>)>,
}

/// A copy taken again of a keyed mirror upserts its rows over the ones the mirror had, so
/// that readers never see it emptier than before; at its end the files written before it
/// (data sequence number up to `before`) go, and with them every row the copy did not
/// replace (keys gone from the source, rows that lost their key value).
#[derive(Debug, Clone, Copy)]
struct Replacing {
    /// `_cdc_lsn` of the copy's truncate marker, which the mirror does not apply.
    marker: Lsn,
    /// The mirror table's last sequence number before the copy's first commit.
    before: i64,
    /// The next commit ends the copy.
    finishing: bool,
}

/// Bytes a key staged for the next commit takes (map entry and control byte, at ~2/3 load).
const STAGED_BYTES: u64 = 50;

/// A staged key that was deleted.
const GONE: u64 = u64::MAX;

impl MirrorWriter {
    /// The writer for `table`, keyed by the columns `keys` (none: the source table has no
    /// key, its rows are only ever inserted). The index is rebuilt from the table.
    pub async fn open(
        table: &Table,
        keys: Vec<String>,
        whole_row: bool,
        budget: u64,
        rules: Option<CompactRules>,
    ) -> Result<Self, SinkError> {
        let ident = table.identifier();
        let name = format!("{}.{}", ident.namespace().join("."), ident.name());
        let schema = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(werr)?,
        );
        let whole_row = whole_row && keys.is_empty();
        // Key columns by field id: a rename or a widening keeps them.
        let current = table.metadata().current_schema();
        let key_ids: Vec<i32> = keys
            .iter()
            .map(|k| {
                current.field_id_by_name(k).ok_or_else(|| {
                    SinkError::Config(format!("key column {k:?} not in the mirror table"))
                })
            })
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        let key_identifiers = key_ids
            .iter()
            .copied()
            .filter(|id| current.identifier_field_ids().any(|i| i == *id))
            .collect();
        let mut w = Self::empty(
            schema,
            key_ids,
            key_identifiers,
            whole_row,
            budget,
            rules,
            name,
        );
        w.load(table).await?;
        w.built_in = started.elapsed();
        Ok(w)
    }

    /// A writer with nothing loaded yet (no index, no file statistics).
    fn empty(
        schema: SchemaRef,
        key_ids: Vec<i32>,
        key_identifiers: Vec<i32>,
        whole_row: bool,
        budget: u64,
        rules: Option<CompactRules>,
        name: String,
    ) -> Self {
        Self {
            schema,
            keys: None,
            key_ids,
            key_identifiers,
            index: KeyIndex::new(),
            staged: HashMap::new(),
            deletes: Vec::new(),
            reset: false,
            open: None,
            written: Vec::new(),
            rows: 0,
            built_in: Duration::ZERO,
            budget,
            name,
            data_files: HashMap::new(),
            delete_files: HashMap::new(),
            delete_staged: None,
            rules,
            whole_row,
            stale: None,
            rekeyed: false,
            unkeyed: 0,
            replacing: None,
            replaced: None,
            last_delete: None,
        }
    }

    /// The key encoder for `table`'s current schema: the key columns by field id, or the
    /// whole row (the columns the table was created with, field ids below the CDC columns',
    /// so a column added later, whose old rows read as null here but as its default in
    /// PostgreSQL, does not keep a row from being found).
    fn encoder(&self, table: &Table) -> Result<Option<KeyEncoder>, SinkError> {
        let current = table.metadata().current_schema();
        // A key column replaced by one of another type (Iceberg could not promote it) is no
        // longer an identifier: rows written before it cannot be matched by the new key.
        if let Some(id) = self
            .key_identifiers
            .iter()
            .find(|id| !current.identifier_field_ids().any(|i| i == **id))
        {
            return Err(SinkError::KeyRetyped {
                table: self.name.clone(),
                message: format!(
                    "key column {} changed to a type Iceberg cannot promote: the mirror cannot \
                     match its earlier rows by the new key; copy the table again \
                     (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot), or use \
                     mode = \"changelog\"",
                    current.name_by_field_id(*id).unwrap_or("?"),
                ),
            });
        }
        let names: Vec<String> = if self.whole_row {
            row_key_columns(table)
        } else {
            self.key_ids
                .iter()
                .map(|id| {
                    current
                        .name_by_field_id(*id)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            SinkError::Config(format!(
                                "key column (field id {id}) not in the mirror table"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        };
        if names.is_empty() {
            return Ok(None);
        }
        let types: Vec<DataType> = names
            .iter()
            .map(|k| {
                self.schema
                    .field_with_name(k)
                    .map(|f| f.data_type().clone())
                    .map_err(|_| {
                        SinkError::Config(format!("key column {k:?} not in the mirror table"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(KeyEncoder::new(names, &types, self.whole_row)?))
    }

    /// Rebuild the index and the file statistics from `table`'s current snapshot.
    async fn load(&mut self, table: &Table) -> Result<(), SinkError> {
        self.keys = self.encoder(table)?;
        let live = live_files(table).await?;
        let (index, targets, unkeyed) = match &self.keys {
            Some(e) => rebuild(table, &live, e, self.whole_row, self.budget, &self.name).await?,
            // No key, but the data files its delete files name must be known: compaction
            // leaves them alone then.
            None => (KeyIndex::new(), read_delete_files(table, &live).await?.1, 0),
        };
        self.index = index;
        self.unkeyed = unkeyed;
        if unkeyed > 0 {
            MirrorRowsWithoutKey {
                table: &self.name,
                rows: unkeyed,
            }
            .emit();
        }
        self.data_files.clear();
        self.delete_files.clear();
        for f in &live {
            let path: Arc<str> = f.file_path().into();
            if f.content_type() == DataContentType::Data {
                self.data_files.insert(
                    path,
                    FileStat {
                        rows: f.record_count(),
                        bytes: f.file_size_in_bytes(),
                    },
                );
            } else {
                let targets = targets
                    .get(f.file_path())
                    .map(|t| t.iter().map(|p| Arc::<str>::from(p.as_str())).collect())
                    .unwrap_or_default();
                self.delete_files.insert(
                    path,
                    DeleteStat {
                        bytes: f.file_size_in_bytes(),
                        targets,
                    },
                );
            }
        }
        Ok(())
    }

    /// Fail while the index may not match the table.
    fn check_fresh(&self) -> Result<(), SinkError> {
        match &self.stale {
            Some(why) => Err(SinkError::Write(format!(
                "the mirror key index of {} must be rebuilt: {why}",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// Fail before the index outgrows its budget.
    fn check_budget(&self) -> Result<(), SinkError> {
        let need = self.index.bytes()
            + self.staged.capacity() as u64 * STAGED_BYTES
            + (self.deletes.capacity() * std::mem::size_of::<(u32, u64)>()) as u64;
        if need > self.budget {
            return Err(over_budget(&self.name, need, self.budget, self.index.len()));
        }
        Ok(())
    }

    /// The table's columns changed (added, renamed, widened): new files use the new schema
    /// and keys are read under their columns' new names. A key whose encoding changed (a
    /// widened key column: `ALTER COLUMN id TYPE bigint`) rebuilds the index from the table,
    /// with this flush's rows and deletes too when changes are pending.
    pub async fn schema_changed(&mut self, table: &Table) -> Result<(), SinkError> {
        let before = self
            .keys
            .as_ref()
            .map(|k| (k.names.clone(), k.types.clone()));
        self.set_schema(table)?;
        let encoder = self.encoder(table)?;
        let now = encoder.as_ref().map(|e| (e.names.clone(), e.types.clone()));
        // A whole-row key changes columns with the table (see `row_key_columns`); a key
        // column renamed is the same key.
        let same = match (&now, &before) {
            (Some((n, t)), Some((bn, bt))) => t == bt && (!self.whole_row || n == bn),
            (a, b) => a == b,
        };
        if same {
            self.keys = encoder;
            return Ok(());
        }
        if !self.is_dirty() && self.staged.is_empty() {
            return self.load(table).await;
        }
        let r = self
            .reindex(table, self.key_ids.clone(), self.whole_row)
            .await?;
        tracing::info!(
            table = %self.name,
            rows = r.rows,
            build_ms = r.took.as_millis() as u64,
            "mirror key index rebuilt with the flush's changes: a key column's type changed"
        );
        Ok(())
    }

    /// The table's schema changed (columns added): new files use it.
    pub fn set_schema(&mut self, table: &Table) -> Result<(), SinkError> {
        self.schema = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(werr)?,
        );
        Ok(())
    }

    /// Keys in the index.
    pub fn keys(&self) -> usize {
        self.index.len()
    }

    /// Bytes the index holds.
    pub fn index_bytes(&self) -> u64 {
        self.index.bytes()
    }

    /// Rows appended since the last commit.
    pub fn pending_rows(&self) -> u64 {
        self.rows
    }

    /// Whether a data file is open.
    pub fn has_open_file(&self) -> bool {
        self.open.is_some()
    }

    /// Live rows without a value in a key column (not indexed; see `unkeyed`).
    pub fn rows_without_key(&self) -> u64 {
        self.unkeyed
    }

    /// Whether anything waits for a commit.
    pub fn is_dirty(&self) -> bool {
        self.rows > 0
            || !self.deletes.is_empty()
            || self.reset
            || !self.written.is_empty()
            || self.replacing.is_some_and(|r| r.finishing)
    }

    /// A copy taken again (its truncate marker at `marker`) replaces the rows of the files
    /// committed up to sequence number `before` instead of emptying the mirror first. Only a
    /// keyed mirror can: `false` for one without a key (whose copies of equal rows are
    /// counted), which the marker empties as before.
    pub fn replace_from(&mut self, marker: Lsn, before: i64) -> bool {
        if self.keys.is_none() || self.whole_row {
            return false;
        }
        self.replacing = Some(Replacing {
            marker,
            before,
            finishing: false,
        });
        true
    }

    /// The next commit ends the copy that is replacing the mirror's rows (if one is).
    pub fn finish_replacing(&mut self) {
        if let Some(r) = self.replacing.as_mut() {
            r.finishing = true;
        }
    }

    /// Whether a copy taken again is replacing the mirror's rows.
    pub fn is_replacing(&self) -> bool {
        self.replacing.is_some()
    }

    /// The key of the last copy of whole row `k` (staged or committed), if any.
    fn last_copy(&self, k: &Key) -> Option<Key> {
        let n = self.copies(k);
        (n > 0).then(|| copy_of(k, n - 1))
    }

    /// The key a new copy of whole row `k` takes.
    fn next_copy(&self, k: &Key) -> Key {
        copy_of(k, self.copies(k))
    }

    /// Copies of whole row `k` (they are numbered from 0 without gaps: the last one goes
    /// first).
    fn copies(&self, k: &Key) -> u32 {
        let mut n = 0;
        while self.lookup(&copy_of(k, n)).is_some() {
            n += 1;
        }
        n
    }

    fn lookup(&self, key: &Key) -> Option<Loc> {
        match self.staged.get(key) {
            Some(&v) => (v != GONE).then(|| Loc::unpack(v)),
            None if self.reset => None,
            None => self.index.get(key),
        }
    }

    /// Fold `batch` (changelog rows in change order) into the staged state; rows at or below
    /// `committed` are already in the table. `moved` lists the rows (ascending) that are
    /// updates which changed their key: each follows its old key's delete.
    pub async fn push(
        &mut self,
        table: &Table,
        batch: &RecordBatch,
        moved: &[u32],
        committed: Lsn,
    ) -> Result<(), SinkError> {
        self.check_fresh()?;
        let ops = batch
            .column_by_name(CDC_OP)
            .and_then(|c| c.as_string_opt::<i32>().cloned())
            .ok_or_else(|| SinkError::Write("changelog batch without _cdc_op".into()))?;
        let lsns = batch
            .column_by_name(CDC_LSN)
            .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
            .ok_or_else(|| SinkError::Write("changelog batch without _cdc_lsn".into()))?;
        let seqs = batch
            .column_by_name(CDC_SEQ)
            .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
            .ok_or_else(|| SinkError::Write("changelog batch without _cdc_seq".into()))?;
        let keys = match &self.keys {
            Some(k) => Some(k.keys(batch)?),
            None => None,
        };
        // A batch goes into one file, so every upsert's position is known before it is written.
        if self
            .open
            .as_ref()
            .is_some_and(|w| w.size() >= self.target_file_bytes())
        {
            self.finish_files().await?;
        }
        // Rows whose unchanged TOAST values were not sent take them from the key's previous
        // row, which must be readable: in a finished file or this batch. The open file is
        // finished only when such a row lives in it (finishing at every such batch gave a
        // busy table with large values several small files per flush).
        let unchanged = batch
            .column_by_name(CDC_UNCHANGED)
            .and_then(|c| c.as_list_opt::<i32>().cloned())
            .filter(|l| !l.values().is_empty());
        if let Some(list) = unchanged.as_ref() {
            if self.fills_from_open_file(list, keys.as_deref(), moved) {
                self.finish_files().await?;
            }
        }
        let mut fills: Vec<Fill> = Vec::new();
        let (mut file, mut first) = self.open_file(table).await?;
        let mut take: Vec<u32> = Vec::new();
        for row in 0..batch.num_rows() {
            let op = ops.value(row);
            // A snapshot's chunks share one LSN: only streamed changes are filtered by it.
            if op != "R" && lsns.value(row) as u64 <= committed.get() {
                continue;
            }
            let key = keys.as_ref().map(|k| &k[row]);
            let (lsn, seq) = (lsns.value(row), seqs.value(row));
            // Where the row of the key this update moved from was: the delete just before it.
            let moved_from = match self.last_delete.take() {
                Some((l, s, loc)) if l == lsn && s + 1 == seq => loc,
                _ => None,
            }
            .filter(|_| moved.binary_search(&(row as u32)).is_ok());
            match op {
                "T" if self
                    .replacing
                    .is_some_and(|r| r.marker.get() == lsns.value(row) as u64) =>
                {
                    // A copy taken again: its rows replace the mirror's, which stay
                    // readable until the copy ends.
                }
                "T" => {
                    // Everything before it goes: the base's files at the commit, this
                    // flush's files now.
                    take.clear();
                    fills.clear();
                    self.last_delete = None;
                    self.truncate(table).await?;
                    (file, first) = self.open_file(table).await?;
                }
                "D" => {
                    // Without a key, the last copy of the row goes.
                    let k = match key {
                        Some(k) if self.whole_row => self.last_copy(k),
                        Some(k) => Some(k.clone()),
                        None => None,
                    };
                    if let Some(k) = k {
                        let before = self.lookup(&k);
                        if let Some(loc) = before {
                            self.deletes.push((loc.file, loc.pos));
                        }
                        self.staged.insert(k, GONE);
                        self.last_delete = Some((lsn, seq, before));
                    }
                }
                _ => {
                    // I, U, R: the key's new row (without a key, one more copy of the row).
                    let k = match key {
                        Some(k) if self.whole_row => Some(self.next_copy(k)),
                        Some(k) => Some(k.clone()),
                        None => None,
                    };
                    if let Some(k) = k.as_ref() {
                        let before = self.lookup(k);
                        if let Some(old) = before {
                            self.deletes.push((old.file, old.pos));
                        }
                        let names = unchanged_names(unchanged.as_ref(), row);
                        if !names.is_empty() {
                            let from = match before.or(moved_from) {
                                Some(l) if l.file == file && l.pos >= first => {
                                    Source::Batch((l.pos - first) as usize)
                                }
                                Some(l) => Source::File(l),
                                None => Source::Nowhere,
                            };
                            fills.push(Fill {
                                row: take.len(),
                                names,
                                from,
                            });
                        }
                        let loc = Loc {
                            file,
                            pos: first + take.len() as u64,
                        };
                        self.staged.insert(k.clone(), loc.pack());
                    }
                    take.push(row as u32);
                }
            }
        }
        if take.is_empty() {
            return Ok(());
        }
        let idx = UInt32Array::from(take);
        let picked = arrow_select::take::take_record_batch(batch, &idx).map_err(werr)?;
        let mut rows = project(&picked, &self.schema)?;
        if !fills.is_empty() {
            rows = self.fill_unchanged(table, rows, &fills).await?;
        }
        let Some(w) = self.open.as_mut() else {
            return Err(SinkError::Write("mirror data file not open".into()));
        };
        w.write(&rows).await?;
        self.rows += rows.num_rows() as u64;
        self.check_budget()
    }

    /// Whether a row of the next batch may take an unchanged TOAST value from a row in the
    /// open data file (unreadable until finished). Asked before the batch changes anything,
    /// so a key the batch itself moves is answered on the safe side.
    fn fills_from_open_file(
        &self,
        unchanged: &ListArray,
        keys: Option<&[Key]>,
        moved: &[u32],
    ) -> bool {
        let Some(w) = self.open.as_ref().filter(|w| w.rows() > 0) else {
            return false;
        };
        // Without a key nothing is filled; copies of whole rows are numbered as the batch
        // goes, so they are not looked up ahead.
        let Some(keys) = keys else {
            return false;
        };
        let Some(open) = self.index.known_file(w.path()).filter(|_| !self.whole_row) else {
            return true;
        };
        let in_open = |l: Option<Loc>| l.is_some_and(|l| l.file == open);
        (0..keys.len()).any(|row| {
            if unchanged.is_null(row) || unchanged.value_length(row) == 0 {
                return false;
            }
            let moved_from = if moved.binary_search(&(row as u32)).is_err() {
                None
            } else if row == 0 {
                // Its old key's delete ended the batch before.
                self.last_delete.and_then(|(_, _, loc)| loc)
            } else {
                self.lookup(&keys[row - 1])
            };
            in_open(self.lookup(&keys[row])) || in_open(moved_from)
        })
    }

    /// `rows` with the unchanged TOAST values of `fills` taken from each key's previous row:
    /// an earlier row of the same batch, or a row read back from its data file.
    async fn fill_unchanged(
        &self,
        table: &Table,
        rows: RecordBatch,
        fills: &[Fill],
    ) -> Result<RecordBatch, SinkError> {
        // Read the previous rows that live in files, one read per file.
        let mut wanted: HashMap<u32, (Vec<u64>, HashSet<String>)> = HashMap::new();
        for f in fills {
            if let Source::File(l) = f.from {
                let e = wanted.entry(l.file).or_default();
                e.0.push(l.pos);
                e.1.extend(f.names.iter().cloned());
            }
        }
        let mut read: HashMap<u32, (Vec<u64>, RecordBatch)> = HashMap::new();
        for (file, (mut positions, names)) in wanted {
            positions.sort_unstable();
            positions.dedup();
            let batch = read_rows(table, self.index.path(file), &positions, &names).await?;
            read.insert(file, (positions, batch));
        }
        let mut cols: Vec<ArrayRef> = rows.columns().to_vec();
        for (c, field) in self.schema.fields().iter().enumerate() {
            let name = field.name();
            if !fills.iter().any(|f| f.names.iter().any(|n| n == name)) {
                continue;
            }
            // Sources: 0 is this batch's column, then one per file read.
            let mut arrays: Vec<ArrayRef> = vec![cols[c].clone()];
            let mut slot: HashMap<u32, usize> = HashMap::new();
            for (file, (_, b)) in &read {
                if let Some(a) = b.column_by_name(name) {
                    slot.insert(*file, arrays.len());
                    arrays.push(conform(a, field.data_type()).map_err(werr)?);
                }
            }
            let mut index: Vec<(usize, usize)> = (0..rows.num_rows()).map(|i| (0, i)).collect();
            for f in fills.iter().filter(|f| f.names.iter().any(|n| n == name)) {
                index[f.row] = match f.from {
                    // The earlier row may itself have taken the value from elsewhere.
                    Source::Batch(j) => index[j],
                    Source::File(l) => match (slot.get(&l.file), read.get(&l.file)) {
                        (Some(a), Some((positions, _))) => match positions.binary_search(&l.pos) {
                            Ok(r) => (*a, r),
                            Err(_) => index[f.row],
                        },
                        _ => index[f.row],
                    },
                    Source::Nowhere => {
                        tracing::warn!(column = %name, "an UPDATE did not send an unchanged TOAST value and the mirror holds no previous row for its key: stored as null");
                        index[f.row]
                    }
                };
            }
            let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
            cols[c] = arrow_select::interleave::interleave(&refs, &index).map_err(werr)?;
        }
        RecordBatch::try_new(self.schema.clone(), cols).map_err(werr)
    }

    /// Bytes after which a data file is finished.
    fn target_file_bytes(&self) -> u64 {
        self.rules
            .as_ref()
            .map_or(TARGET_FILE_BYTES, |r| r.target_file_size)
    }

    /// The open data file (opened if none): its id and the position of its next row.
    async fn open_file(&mut self, table: &Table) -> Result<(u32, u64), SinkError> {
        if self.open.is_none() {
            self.open = Some(DataWriter::open(table).await?);
        }
        let Some(w) = self.open.as_ref() else {
            return Err(SinkError::Write("mirror data file not open".into()));
        };
        let id = self.index.file_id(w.path()).map_err(werr)?;
        Ok((id, w.rows()))
    }

    /// A TRUNCATE: this flush's files are dropped, the base's are removed at the commit.
    async fn truncate(&mut self, table: &Table) -> Result<(), SinkError> {
        self.finish_files().await?;
        let io = table.file_io();
        for f in self.written.drain(..) {
            // Never committed: nothing references it (orphan removal would find it too).
            let _ = io.delete(f.file_path()).await;
        }
        self.reset = true;
        self.deletes.clear();
        self.staged.clear();
        self.rows = 0;
        // Rows without a key value go with the rest.
        self.unkeyed = 0;
        Ok(())
    }

    /// Finish the open data file (it waits for the commit).
    pub async fn finish_files(&mut self) -> Result<(u64, u64), SinkError> {
        let Some(w) = self.open.take() else {
            return Ok((0, 0));
        };
        match w.close().await? {
            Some(f) => {
                let r = (1, f.file_size_in_bytes());
                self.written.push(f);
                Ok(r)
            }
            None => Ok((0, 0)),
        }
    }

    /// The files the next commit adds (data, then one position delete file) and removes (on
    /// TRUNCATE, every live file of `table`).
    pub async fn change(
        &mut self,
        table: &Table,
    ) -> Result<(Vec<DataFile>, HashSet<String>), SinkError> {
        self.check_fresh()?;
        self.finish_files().await?;
        let mut by_file: HashMap<u32, Vec<u64>> = HashMap::new();
        for (f, p) in self.deletes.drain(..) {
            by_file.entry(f).or_default().push(p);
        }
        let deletes: Vec<(Arc<str>, Vec<u64>)> = by_file
            .into_iter()
            .map(|(f, p)| (Arc::<str>::from(self.index.path(f)), p))
            .collect();
        let targets: Vec<Arc<str>> = deletes.iter().map(|(p, _)| p.clone()).collect();
        let mut added = self.written.clone();
        self.delete_staged = None;
        self.replaced = match self.replacing {
            Some(r) if r.finishing && !self.reset => Some(self.written_before(table, r).await?),
            _ => None,
        };
        // Deletes of rows whose files this commit removes would name nothing.
        if !targets
            .iter()
            .all(|t| self.replaced.as_ref().is_some_and(|g| g.contains(&**t)))
        {
            if let Some(d) = files::write_deletes(table, deletes).await? {
                added.push(d.clone());
                self.delete_staged = Some((d, targets));
            }
        }
        let removed = if self.reset {
            live_paths(table).await?
        } else {
            self.replaced.clone().unwrap_or_default()
        };
        Ok((added, removed))
    }

    /// What the end of a replacing copy removes: the files committed before it, and the
    /// delete files that only name those.
    async fn written_before(
        &self,
        table: &Table,
        r: Replacing,
    ) -> Result<HashSet<String>, SinkError> {
        let live = super::manifests::live_files(table).await.map_err(werr)?;
        let mut gone: HashSet<String> = live
            .iter()
            .filter(|f| f.sequence <= r.before)
            .map(|f| f.file.file_path().to_string())
            .collect();
        for f in live.iter().filter(|f| !f.is_data && f.sequence > r.before) {
            let path = f.file.file_path();
            let only_old = self.delete_files.get(path).is_some_and(|d| {
                !d.targets.is_empty() && d.targets.iter().all(|t| gone.contains(&**t))
            });
            if only_old {
                gone.insert(path.to_string());
            }
        }
        Ok(gone)
    }

    /// The data files the staged delete file names (they must still be live at the commit).
    pub fn delete_targets(&self) -> HashSet<String> {
        self.delete_staged
            .iter()
            .flat_map(|(_, t)| t.iter().map(|p| p.to_string()))
            .collect()
    }

    /// The staged change was committed: the index follows it.
    pub fn committed(&mut self) {
        // A key's move is within one transaction, never across a commit.
        self.last_delete = None;
        if self.reset {
            self.index.clear_keys();
            self.data_files.clear();
            self.delete_files.clear();
            self.replacing = None;
        }
        for f in &self.written {
            self.data_files.insert(
                f.file_path().into(),
                FileStat {
                    rows: f.record_count(),
                    bytes: f.file_size_in_bytes(),
                },
            );
        }
        if let Some((d, targets)) = self.delete_staged.take() {
            self.delete_files.insert(
                d.file_path().into(),
                DeleteStat {
                    bytes: d.file_size_in_bytes(),
                    targets,
                },
            );
        }
        for (k, v) in self.staged.drain() {
            if v == GONE {
                self.index.remove(&k);
            } else {
                // Positions were checked when staged.
                let _ = self.index.insert(k, Loc::unpack(v));
            }
        }
        if let Some(gone) = self.replaced.take() {
            let ids: HashSet<u32> = gone
                .iter()
                .filter_map(|p| self.index.known_file(p))
                .collect();
            self.index.drop_files(&ids);
            self.data_files.retain(|p, _| !gone.contains(&**p));
            self.delete_files.retain(|p, _| !gone.contains(&**p));
            // Rows without a key value were in those files.
            self.unkeyed = 0;
            self.replacing = None;
        }
        self.index.free();
        self.deletes.clear();
        self.written.clear();
        self.reset = false;
        self.rekeyed = false;
        self.rows = 0;
    }

    /// The staged change will not be committed (a failed attempt): forget it.
    pub fn abandon(&mut self) {
        if self.rekeyed {
            self.stale = Some(format!(
                "the key of {} changed and the commit after it failed",
                self.name
            ));
        }
        self.open = None;
        self.delete_staged = None;
        self.replaced = None;
        if let Some(r) = self.replacing.as_mut() {
            r.finishing = false;
        }
        self.staged.clear();
        self.deletes.clear();
        self.written.clear();
        self.reset = false;
        self.rows = 0;
        self.last_delete = None;
        self.index.free();
    }
}

/// Where an unchanged TOAST value is found.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// An earlier row of the same batch (its index among the batch's upserts).
    Batch(usize),
    /// The key's row in a finished data file.
    File(Loc),
    /// Nowhere: the key has no previous row.
    Nowhere,
}

/// An upsert whose unchanged TOAST columns must be filled.
#[derive(Debug)]
struct Fill {
    /// Its index among the batch's upserts.
    row: usize,
    /// The columns that were not sent.
    names: Vec<String>,
    from: Source,
}

/// The `_cdc_unchanged` names of `row`.
fn unchanged_names(list: Option<&ListArray>, row: usize) -> Vec<String> {
    let Some(l) = list else {
        return Vec::new();
    };
    if l.is_null(row) {
        return Vec::new();
    }
    let v = l.value(row);
    let names = v.as_string::<i32>();
    (0..names.len())
        .filter(|i| names.is_valid(*i))
        .map(|i| names.value(i).to_string())
        .collect()
}

/// A Parquet reader of `path` through the table's FileIO (ranged reads, not the whole file).
async fn open_parquet(
    table: &Table,
    path: &str,
) -> Result<ParquetRecordBatchStreamBuilder<ArrowFileReader>, SinkError> {
    let input = table.file_io().new_input(path).map_err(werr)?;
    let meta = input.metadata().await.map_err(werr)?;
    let reader = ArrowFileReader::new(meta, input.reader().await.map_err(werr)?);
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(werr)
}

/// Rows at `positions` (sorted) of data file `path`, columns `names` (those it has).
async fn read_rows(
    table: &Table,
    path: &str,
    positions: &[u64],
    names: &HashSet<String>,
) -> Result<RecordBatch, SinkError> {
    // By field id: a file written before a rename has the column under its old name.
    let current = table.metadata().current_schema();
    let ids: HashMap<i32, &String> = names
        .iter()
        .filter_map(|n| Some((current.field_id_by_name(n)?, n)))
        .collect();
    let builder = open_parquet(table, path).await?;
    let total = builder.metadata().file_metadata().num_rows() as usize;
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| field_id(f).is_some_and(|id| ids.contains_key(&id)))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let selection = RowSelection::from_consecutive_ranges(
        positions.iter().map(|p| *p as usize..*p as usize + 1),
        total,
    );
    let mut stream = builder
        .with_projection(mask)
        .with_row_selection(selection)
        .build()
        .map_err(werr)?;
    let schema = stream.schema().clone();
    let mut batches = Vec::new();
    while let Some(b) = stream.next().await {
        batches.push(b.map_err(werr)?);
    }
    let batch = arrow_select::concat::concat_batches(&schema, &batches).map_err(werr)?;
    // Under the names the columns have now.
    let fields: Vec<arrow_schema::FieldRef> = schema
        .fields()
        .iter()
        .map(|f| match field_id(f).and_then(|id| ids.get(&id)) {
            Some(n) if *n != f.name() => Arc::new(f.as_ref().clone().with_name(n.as_str())),
            _ => f.clone(),
        })
        .collect();
    RecordBatch::try_new(
        Arc::new(arrow_schema::Schema::new(fields)),
        batch.columns().to_vec(),
    )
    .map_err(werr)
}

/// Columns of `batch` the mirror holds (by name), in its schema (see [`by_name`]).
fn project(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, SinkError> {
    by_name(batch, schema).map_err(werr)
}

/// Live files (data and deletes) of the table's current snapshot.
async fn live_files(table: &Table) -> Result<Vec<DataFile>, SinkError> {
    Ok(super::manifests::live_files(table)
        .await
        .map_err(werr)?
        .into_iter()
        .map(|f| f.file)
        .collect())
}

async fn live_paths(table: &Table) -> Result<HashSet<String>, SinkError> {
    Ok(live_files(table)
        .await?
        .into_iter()
        .map(|f| f.file_path().to_string())
        .collect())
}

/// Read the columns of `path` whose field ids are `ids`, batch by batch (those the file has:
/// a column added after it was written is not in the batches).
async fn read_columns(
    table: &Table,
    path: &str,
    ids: &[i32],
    mut each: impl FnMut(RecordBatch) -> Result<(), SinkError>,
) -> Result<(), SinkError> {
    let builder = open_parquet(table, path).await?;
    let leaves: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| field_id(f).is_some_and(|id| ids.contains(&id)))
        .map(|(i, _)| i)
        .collect();
    if leaves.is_empty() {
        // None of them (a key column added after the file was written): its rows, each
        // without a value, as a batch without columns.
        let rows = builder.metadata().file_metadata().num_rows() as usize;
        let empty = Arc::new(arrow_schema::Schema::empty());
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(rows));
        return each(RecordBatch::try_new_with_options(empty, Vec::new(), &options).map_err(werr)?);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), leaves);
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()
        .map_err(werr)?;
    while let Some(batch) = stream.next().await {
        each(batch.map_err(werr)?)?;
    }
    Ok(())
}

/// The index key of the `n`-th copy of whole row `k`.
fn copy_of(k: &Key, n: u32) -> Key {
    match k {
        Key::Bytes(b) => {
            let mut v = b.as_bytes().to_vec();
            v.extend_from_slice(&n.to_be_bytes());
            Key::Bytes(KeyBytes::new(&v))
        }
        // Whole rows are always encoded; an integer here is a key of its own.
        Key::Int(_) => k.clone(),
    }
}

/// The columns a whole-row mirror is identified by: those the table was created with.
fn row_key_columns(table: &Table) -> Vec<String> {
    let schema = table.metadata().current_schema();
    let first_cdc = schema
        .field_by_name(super::schema::CDC_LSN)
        .map_or(i32::MAX, |f| f.id);
    // Only fields that hold a source column now: a column dropped, or moved aside by a type
    // change, gets no value in new rows, so the rows before would never match by it again
    // (an UPDATE after `DROP COLUMN` added a row beside the old one, a DELETE left it).
    let live: Option<HashSet<i32>> = table
        .metadata()
        .properties()
        .get(super::schema::SOURCE_COLUMNS_PROPERTY)
        .and_then(|v| super::schema::parse_source_columns(v).ok())
        .map(|m| m.into_keys().collect());
    let source = |id: i32, name: &str| {
        !name.starts_with("_cdc_") && live.as_ref().is_none_or(|l| l.contains(&id))
    };
    let fields = schema.as_struct().fields();
    let original: Vec<String> = fields
        .iter()
        .filter(|f| f.id < first_cdc && source(f.id, &f.name))
        .map(|f| f.name.clone())
        .collect();
    if !original.is_empty() {
        return original;
    }
    // Every column the table was made with is gone: the ones added since key it.
    fields
        .iter()
        .filter(|f| source(f.id, &f.name))
        .map(|f| f.name.clone())
        .collect()
}

/// The clear error of an index past its budget.
fn over_budget(table: &str, need: u64, budget: u64, keys: usize) -> SinkError {
    SinkError::Config(format!(
        "the key index of mirror table {table} needs {} ({keys} keys), more than \
         mirror_index_memory = {}: raise it, or mirror this table with mode = \"changelog\"",
        bytesize::ByteSize(need),
        bytesize::ByteSize(budget)
    ))
}

/// The index of `table` as its current snapshot (`live`) holds it: every live data file's
/// keys at their positions, minus the positions its delete files name; and the data files
/// each delete file names. Stops with an error as soon as it passes `budget`.
async fn rebuild(
    table: &Table,
    live: &[DataFile],
    keys: &KeyEncoder,
    whole_row: bool,
    budget: u64,
    name: &str,
) -> Result<(KeyIndex, Targets, u64), SinkError> {
    let (mut deleted, targets) = read_delete_files(table, live).await?;
    let wanted = rekey::key_fields(table, keys)?;
    let ids: Vec<i32> = wanted.iter().map(|(id, _)| *id).collect();
    let mut index = KeyIndex::new();
    let mut unkeyed = 0u64;
    for f in live
        .iter()
        .filter(|f| f.content_type() == DataContentType::Data)
    {
        let file = index.file_id(f.file_path()).map_err(werr)?;
        let gone = deleted.remove(f.file_path()).unwrap_or_default();
        let mut pos = 0u64;
        read_columns(table, f.file_path(), &ids, |b| {
            let b = rekey::by_field_id(&b, &wanted)?;
            for (i, k) in keys.keys(&b)?.into_iter().enumerate() {
                let p = pos + i as u64;
                if !whole_row && rekey::key_is_null(&b, i) {
                    // No value in a key column: it cannot be one key's row (see `unkeyed`).
                    if !gone.contains(&p) {
                        unkeyed += 1;
                    }
                    continue;
                }
                if !gone.contains(&p) {
                    let k = if whole_row {
                        let mut n = 0;
                        while index.get(&copy_of(&k, n)).is_some() {
                            n += 1;
                        }
                        copy_of(&k, n)
                    } else {
                        k
                    };
                    index.insert(k, Loc { file, pos: p }).map_err(werr)?;
                }
            }
            pos += b.num_rows() as u64;
            if index.bytes() > budget {
                return Err(over_budget(name, index.bytes(), budget, index.len()));
            }
            Ok(())
        })
        .await?;
    }
    Ok((index, targets, unkeyed))
}

/// The data files each position delete file names, by its path.
type Targets = HashMap<String, HashSet<String>>;

/// What `live`'s position delete files remove: the positions, by data file path; and the
/// data files each names, by its path.
async fn read_delete_files(
    table: &Table,
    live: &[DataFile],
) -> Result<(HashMap<String, HashSet<u64>>, Targets), SinkError> {
    let mut deleted: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut targets: Targets = HashMap::new();
    for f in live
        .iter()
        .filter(|f| f.content_type() == DataContentType::PositionDeletes)
    {
        let named = targets.entry(f.file_path().to_string()).or_default();
        files::read_deletes(table, f.file_path(), |p, pos| {
            if !named.contains(p) {
                named.insert(p.to_string());
            }
            deleted.entry(p.to_string()).or_default().insert(pos);
        })
        .await?;
    }
    Ok((deleted, targets))
}
