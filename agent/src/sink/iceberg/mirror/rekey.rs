//! A mirror whose source table changed key: a primary key added to a table that had none,
//! dropped, or replaced by another, a replica identity index, a keyless table turned
//! `REPLICA IDENTITY FULL`. The changes after it identify rows by the new key only (a DELETE
//! carries just those columns), so every row the mirror holds is keyed again by reading the
//! new key's columns back from its files: the committed ones and those this flush wrote.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use arrow_array::{Array, RecordBatch};
use arrow_schema::Field;
use iceberg::spec::DataContentType;
use iceberg::table::Table;

use super::index::Loc;
use super::{
    copy_of, live_files, over_budget, read_columns, read_delete_files, werr, KeyEncoder,
    MirrorWriter,
};
use crate::sink::iceberg::SinkError;

/// What identifies a mirror's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorKey {
    /// Key columns (Iceberg names), in key order; empty for none.
    pub columns: Vec<String>,
    /// Without key columns: whether the whole row identifies a row (`REPLICA IDENTITY FULL`
    /// without a primary key) rather than nothing (an insert-only table).
    pub whole_row: bool,
}

/// What keying a mirror again did.
#[derive(Debug)]
pub struct Rekeyed {
    /// Rows keyed.
    pub rows: usize,
    /// Rows that repeated another row's new key: the later one was kept, the others deleted.
    pub duplicates: u64,
    /// Rows without a value in a key column, left as they are (no change can name them).
    pub unkeyed: u64,
    /// Time taken (reading the key columns back).
    pub took: Duration,
}

impl MirrorWriter {
    /// The key the rows are identified by now.
    pub fn key(&self, table: &Table) -> MirrorKey {
        let schema = table.metadata().current_schema();
        MirrorKey {
            columns: self
                .key_ids
                .iter()
                .filter_map(|id| schema.name_by_field_id(*id).map(str::to_string))
                .collect(),
            whole_row: self.whole_row,
        }
    }

    /// Identify rows by `key` from now on: every live row, committed or written by this
    /// flush, is read back and indexed under its new key. The staged position deletes and
    /// files stay as they are; the new keys wait in `staged` for the commit (a failed commit
    /// then leaves the index to be rebuilt when the table is reopened). `None`: same key.
    pub async fn set_key(
        &mut self,
        table: &Table,
        key: &MirrorKey,
    ) -> Result<Option<Rekeyed>, SinkError> {
        self.check_fresh()?;
        let whole_row = key.whole_row && key.columns.is_empty();
        let schema = table.metadata().current_schema();
        let key_ids: Vec<i32> = key
            .columns
            .iter()
            .map(|k| {
                schema.field_id_by_name(k).ok_or_else(|| {
                    SinkError::Config(format!("key column {k:?} not in the mirror table"))
                })
            })
            .collect::<Result<_, _>>()?;
        if key_ids == self.key_ids && whole_row == self.whole_row {
            return Ok(None);
        }
        self.reindex(table, key_ids, whole_row).await.map(Some)
    }

    /// Index every live row, committed or written by this flush, under `key_ids` (or the
    /// whole row) as the table's current schema encodes them: a new key, or the same key
    /// columns widened (the index holds their old encoding) while changes are pending.
    pub(super) async fn reindex(
        &mut self,
        table: &Table,
        key_ids: Vec<i32>,
        whole_row: bool,
    ) -> Result<Rekeyed, SinkError> {
        self.check_fresh()?;
        let schema = table.metadata().current_schema();
        let started = Instant::now();
        self.finish_files().await?;
        // From here until the commit the index is the staged map: should anything below fail,
        // the table must be reopened.
        self.stale = Some(format!("the key of {} changed", self.name));
        self.key_identifiers = key_ids
            .iter()
            .copied()
            .filter(|id| schema.identifier_field_ids().any(|i| i == *id))
            .collect();
        self.key_ids = key_ids;
        self.whole_row = whole_row;
        self.keys = self.encoder(table)?;
        self.index.clear_keys();
        self.staged = HashMap::new();
        self.rekeyed = true;
        let Some(encoder) = self.keys.as_ref() else {
            // No key: rows are only appended from now on.
            self.stale = None;
            return Ok(Rekeyed {
                rows: 0,
                duplicates: 0,
                unkeyed: 0,
                took: started.elapsed(),
            });
        };
        // Positions that are no longer rows: replaced or deleted in this flush, and (unless a
        // TRUNCATE drops the committed files) those the committed delete files name.
        let mut gone: HashMap<String, HashSet<u64>> = HashMap::new();
        for (f, p) in &self.deletes {
            gone.entry(self.index.path(*f).to_string())
                .or_default()
                .insert(*p);
        }
        let mut paths: Vec<String> = Vec::new();
        if !self.reset {
            let live = live_files(table).await?;
            for (path, positions) in read_delete_files(table, &live).await?.0 {
                gone.entry(path).or_default().extend(positions);
            }
            paths.extend(
                live.iter()
                    .filter(|f| f.content_type() == DataContentType::Data)
                    .map(|f| f.file_path().to_string()),
            );
        }
        paths.extend(self.written.iter().map(|f| f.file_path().to_string()));
        let wanted = key_fields(table, encoder)?;
        let ids: Vec<i32> = wanted.iter().map(|(id, _)| *id).collect();
        let mut staged: HashMap<_, u64> = HashMap::new();
        let mut replaced: Vec<u64> = Vec::new();
        let mut unkeyed = 0u64;
        for path in paths {
            let file = self.index.file_id(&path).map_err(werr)?;
            let not_rows = gone.remove(&path).unwrap_or_default();
            let mut pos = 0u64;
            read_columns(table, &path, &ids, |b| {
                let b = by_field_id(&b, &wanted)?;
                for (i, k) in encoder.keys(&b)?.into_iter().enumerate() {
                    let p = pos + i as u64;
                    if not_rows.contains(&p) {
                        continue;
                    }
                    // A key column without a value: PostgreSQL filled it in without sending
                    // the rows (a column added with a default, then made the key). No
                    // change will name this row; it stays as it is, counted.
                    if !whole_row && key_is_null(&b, i) {
                        unkeyed += 1;
                        continue;
                    }
                    let k = if whole_row {
                        let mut n = 0;
                        while staged.contains_key(&copy_of(&k, n)) {
                            n += 1;
                        }
                        copy_of(&k, n)
                    } else {
                        k
                    };
                    // Files come committed first, then in the order written: the later
                    // row of a repeated key is the newer one.
                    if let Some(old) = staged.insert(k, Loc { file, pos: p }.pack()) {
                        replaced.push(old);
                    }
                }
                pos += b.num_rows() as u64;
                let need = staged.capacity() as u64 * super::STAGED_BYTES;
                if need > self.budget {
                    return Err(over_budget(&self.name, need, self.budget, staged.len()));
                }
                Ok(())
            })
            .await?;
        }
        for old in &replaced {
            let l = Loc::unpack(*old);
            self.deletes.push((l.file, l.pos));
        }
        self.staged = staged;
        self.unkeyed = unkeyed;
        self.stale = None;
        self.check_budget()?;
        Ok(Rekeyed {
            rows: self.staged.len(),
            duplicates: replaced.len() as u64,
            unkeyed,
            took: started.elapsed(),
        })
    }
}

/// Whether row `i` of `keys` (the key columns) has no value in one of them.
pub(super) fn key_is_null(keys: &RecordBatch, i: usize) -> bool {
    keys.columns().iter().any(|c| c.is_null(i))
}

/// The key columns' field ids, names and types: what [`by_field_id`] makes of a file's
/// columns (a file written before a rename or a widening has the old name or type).
pub(super) fn key_fields(table: &Table, keys: &KeyEncoder) -> Result<Vec<(i32, Field)>, SinkError> {
    let schema = table.metadata().current_schema();
    keys.names
        .iter()
        .zip(&keys.types)
        .map(|(n, t)| {
            let id = schema.field_id_by_name(n).ok_or_else(|| {
                SinkError::Config(format!("key column {n:?} not in the mirror table"))
            })?;
            Ok((id, Field::new(n, t.clone(), true)))
        })
        .collect()
}

/// The columns of `batch` (read from a data file, its fields tagged with field ids) as
/// `wanted` names and types them now.
pub(super) fn by_field_id(
    batch: &RecordBatch,
    wanted: &[(i32, Field)],
) -> Result<RecordBatch, SinkError> {
    let wanted: Vec<(i32, arrow_schema::FieldRef)> = wanted
        .iter()
        .map(|(id, f)| (*id, std::sync::Arc::new(f.clone())))
        .collect();
    crate::sink::iceberg::project::by_field_id(batch, &wanted).map_err(werr)
}
