//! Compaction of a mirror table, done by its writer because only the writer knows where each
//! key's row is: data files whose deleted fraction reached `delete_ratio` (or that are all
//! deleted) and small files are rewritten with their live rows only, the key index moves to
//! the new positions, and position delete files are dropped once every data file they name is
//! gone, or merged (without the entries of files no longer live) once there are
//! `min_input_files` of them. One `replace` snapshot; a scan of the mirror then reads about
//! what a fresh copy of the table would.
//!
//! Small files and delete files are merged by the rule the changelog's compaction uses (a
//! file larger than all smaller ones together stays), so a row or a delete entry is rewritten
//! O(log n) times, and one step reads at most twice `target_file_size` of data files: the
//! stream waits for it, so a step stays short.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_array::BooleanArray;
use futures::TryStreamExt;
use iceberg::scan::FileScanTask;
use iceberg::spec::{DataContentType, DataFile, DataFileFormat};
use iceberg::table::Table;

use super::files::{self, DataWriter};
use super::index::{Key, Loc};
use super::{project, werr, DeleteStat, FileStat, MirrorWriter};
use crate::sink::iceberg::maintenance::{settled_head, writer_bound};
use crate::sink::iceberg::SinkError;

/// When a mirror's files are rewritten (from `[maintenance]`).
#[derive(Debug, Clone, Copy)]
pub struct CompactRules {
    /// Size data files are written to; files under ¾ of it are small.
    pub target_file_size: u64,
    /// Small files (or delete files) that make a merge worth it.
    pub min_input_files: usize,
    /// Deleted fraction of a data file at which it is rewritten without its deleted rows.
    pub delete_ratio: f64,
}

/// What one compaction step takes.
#[derive(Debug, Default)]
struct Plan {
    /// Data files rewritten with their live rows.
    data: Vec<Arc<str>>,
    /// Delete files dropped: every data file they name is gone.
    dropped: Vec<Arc<str>>,
    /// Delete files merged into one.
    merged: Vec<Arc<str>>,
}

/// A rewrite written and waiting for its commit.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// Files the commit adds (data, then the merged delete file).
    pub added: Vec<DataFile>,
    /// Files the commit removes.
    pub removed: HashSet<String>,
    plan: Plan,
    /// Each kept key's new location (packed).
    moves: Vec<(Key, u64)>,
    /// The merged delete file and the data files it names.
    merged_into: Option<(DataFile, Vec<Arc<str>>)>,
    /// Rows kept and rows left out (deleted) by the rewrite.
    rows_kept: u64,
    rows_dropped: u64,
}

impl Rewrite {
    /// Whether the step changes nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What a committed compaction step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Compacted {
    /// Data files rewritten (or dropped, all their rows deleted).
    pub data_files_in: u64,
    /// Data files written.
    pub data_files_out: u64,
    /// Delete files removed (dropped or merged).
    pub delete_files_in: u64,
    /// Delete files written (0 or 1).
    pub delete_files_out: u64,
    /// Live rows copied.
    pub rows_kept: u64,
    /// Deleted rows left behind.
    pub rows_dropped: u64,
    /// Bytes of the files written.
    pub bytes_written: u64,
}

impl Compacted {
    /// Files the step removed from the table.
    pub fn files_removed(&self) -> u64 {
        self.data_files_in + self.delete_files_in
    }
}

impl MirrorWriter {
    /// The index key whose row is at `here`, if the row with key (or whole-row bytes) `k`
    /// there is live.
    fn key_at(&self, k: Key, here: Loc) -> Option<Key> {
        if !self.whole_row {
            return (self.index.get(&k) == Some(here)).then_some(k);
        }
        let mut n = 0;
        loop {
            let c = super::copy_of(&k, n);
            match self.index.get(&c) {
                Some(l) if l == here => return Some(c),
                Some(_) => n += 1,
                None => return None,
            }
        }
    }

    /// Keys whose row is in data file `path` (all its rows without a key).
    fn live_rows(&self, path: &str, stat: &FileStat) -> u64 {
        if self.keys.is_none() {
            return stat.rows;
        }
        self.index
            .known_file(path)
            .map_or(0, |id| self.index.rows_in(id))
    }

    /// The next step's plan, if the table's files call for one.
    fn plan(&self, rules: &CompactRules) -> Option<Plan> {
        // Rows without a key value are not in the index, so they would count as deleted.
        if self.unkeyed > 0 {
            return None;
        }
        let small_bytes = rules.target_file_size / 4 * 3;
        let mut heavy: Vec<(f64, Arc<str>, u64)> = Vec::new();
        let mut small: Vec<(u64, Arc<str>)> = Vec::new();
        // Without a key (the table's key was dropped) nothing tells which rows of a file its
        // delete files removed, and a rewrite reads the file without them: such a file stays.
        let targeted: HashSet<&str> = if self.keys.is_none() {
            self.delete_files
                .values()
                .flat_map(|d| d.targets.iter().map(|t| t.as_ref()))
                .collect()
        } else {
            HashSet::new()
        };
        for (path, st) in &self.data_files {
            if targeted.contains(path.as_ref()) {
                continue;
            }
            let live = self.live_rows(path, st);
            let dead = st.rows.saturating_sub(live);
            let ratio = if st.rows == 0 {
                1.0
            } else {
                dead as f64 / st.rows as f64
            };
            if live == 0 || (dead > 0 && ratio >= rules.delete_ratio) {
                heavy.push((ratio, path.clone(), st.bytes));
            } else if st.bytes < small_bytes {
                small.push((st.bytes, path.clone()));
            }
        }
        // Most deleted first; all-deleted files cost nothing to drop.
        heavy.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        small.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let settled = settled_head(&small.iter().map(|s| s.0).collect::<Vec<_>>());
        small.drain(..settled);
        if small.len() < rules.min_input_files {
            small.clear();
        }
        let mut budget = rules.target_file_size.saturating_mul(2);
        let mut plan = Plan::default();
        for (ratio, path, bytes) in heavy {
            let free = ratio >= 1.0;
            if free || bytes <= budget || plan.data.is_empty() {
                if !free {
                    budget = budget.saturating_sub(bytes);
                }
                plan.data.push(path);
            }
        }
        // The smallest first: a step cut short by the budget still merges many files.
        let mut smalls = 0;
        for (bytes, path) in small.into_iter().rev() {
            if bytes > budget {
                break;
            }
            budget -= bytes;
            plan.data.push(path);
            smalls += 1;
        }
        if smalls == 1 {
            // One small file alone has nothing to merge with.
            plan.data.pop();
        }
        let gone: HashSet<&str> = plan.data.iter().map(|p| p.as_ref()).collect();
        let mut rest: Vec<(u64, Arc<str>)> = Vec::new();
        for (path, d) in &self.delete_files {
            let all_gone = !d.targets.is_empty()
                && d.targets
                    .iter()
                    .all(|t| gone.contains(t.as_ref()) || !self.data_files.contains_key(t));
            if all_gone {
                plan.dropped.push(path.clone());
            } else {
                rest.push((d.bytes, path.clone()));
            }
        }
        if rest.len() >= rules.min_input_files {
            rest.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            let settled = settled_head(&rest.iter().map(|r| r.0).collect::<Vec<_>>());
            if rest.len() - settled >= 2 {
                plan.merged = rest.drain(settled..).map(|r| r.1).collect();
            }
        }
        plan.dropped.sort();
        (!plan.data.is_empty() || !plan.dropped.is_empty() || !plan.merged.is_empty())
            .then_some(plan)
    }

    /// Write the next compaction step, if one is due: nothing is committed and the index is
    /// unchanged until [`Self::compacted`]. Only between commits (nothing staged).
    pub async fn rewrite(&mut self, table: &Table) -> Result<Option<Rewrite>, SinkError> {
        let Some(rules) = self.rules else {
            return Ok(None);
        };
        // A copy replacing the rows tells old files from its own by sequence number: a
        // rewrite mixing them would keep old rows past its end.
        if self.is_dirty() || self.is_replacing() {
            return Ok(None);
        }
        let Some(plan) = self.plan(&rules) else {
            return Ok(None);
        };
        let mut rw = Rewrite::default();
        let result = self.write_step(table, &plan, &rules, &mut rw).await;
        rw.plan = plan;
        if let Err(e) = result {
            self.forget(table, rw).await;
            return Err(e);
        }
        Ok(Some(rw))
    }

    async fn write_step(
        &mut self,
        table: &Table,
        plan: &Plan,
        rules: &CompactRules,
        rw: &mut Rewrite,
    ) -> Result<(), SinkError> {
        let schema = table.metadata().current_schema().clone();
        let field_ids: Vec<i32> = schema.as_struct().fields().iter().map(|f| f.id).collect();
        let mut out: Option<DataWriter> = None;
        // The open output's size at its inputs' compressed bytes per row: the writer's own
        // count measures the row group before compression, so files rolled by it came out
        // at what the target compresses to, small again, merged again after the next commit.
        let mut out_bytes = 0f64;
        for path in &plan.data {
            rw.removed.insert(path.to_string());
            let Some(stat) = self.data_files.get(path).copied() else {
                continue;
            };
            let expected = self.live_rows(path, &stat);
            if expected == 0 {
                rw.rows_dropped += stat.rows;
                continue;
            }
            let per_row = stat.bytes as f64 / stat.rows.max(1) as f64;
            let id = self.index.known_file(path);
            // The file as written, without the table's deletes: positions are the file's.
            let task = FileScanTask::builder()
                .with_file_size_in_bytes(stat.bytes)
                .with_start(0)
                .with_length(stat.bytes)
                .with_data_file_path(path.to_string())
                .with_data_file_format(DataFileFormat::Parquet)
                .with_schema(schema.clone())
                .with_project_field_ids(field_ids.clone())
                .with_case_sensitive(true)
                .build();
            let mut batches = table
                .reader_builder()
                .with_data_file_concurrency_limit(1)
                .build()
                .read(Box::pin(futures::stream::iter([Ok(task)])))
                .map_err(werr)?
                .stream();
            let (mut pos, mut kept) = (0u64, 0u64);
            while let Some(batch) = batches.try_next().await.map_err(werr)? {
                let batch = project(&batch, &self.schema)?;
                let n = batch.num_rows();
                let (mask, keys) = match (&self.keys, id) {
                    (Some(enc), Some(id)) => {
                        let mut mask = Vec::with_capacity(n);
                        let mut kept_keys = Vec::new();
                        for (i, k) in enc.keys(&batch)?.into_iter().enumerate() {
                            let here = Loc {
                                file: id,
                                pos: pos + i as u64,
                            };
                            let live = self.key_at(k, here);
                            mask.push(live.is_some());
                            kept_keys.extend(live);
                        }
                        (Some(BooleanArray::from(mask)), kept_keys)
                    }
                    _ => (None, Vec::new()),
                };
                let live = match &mask {
                    Some(m) => {
                        arrow_select::filter::filter_record_batch(&batch, m).map_err(werr)?
                    }
                    None => batch,
                };
                pos += n as u64;
                if live.num_rows() == 0 {
                    continue;
                }
                let target = rules.target_file_size;
                if out
                    .as_ref()
                    .is_some_and(|w| out_bytes >= target as f64 || w.size() >= writer_bound(target))
                {
                    if let Some(w) = out.take() {
                        rw.added.extend(w.close().await?);
                    }
                    out_bytes = 0.0;
                }
                if out.is_none() {
                    out = Some(DataWriter::open(table).await?);
                }
                let Some(w) = out.as_mut() else {
                    continue;
                };
                let (file, first) = (self.index.file_id(w.path()).map_err(werr)?, w.rows());
                for (j, k) in keys.into_iter().enumerate() {
                    let loc = Loc {
                        file,
                        pos: first + j as u64,
                    };
                    rw.moves.push((k, loc.pack()));
                }
                kept += live.num_rows() as u64;
                out_bytes += live.num_rows() as f64 * per_row;
                w.write(&live).await?;
            }
            // The index and the file must agree on every live row, or the rewrite would lose
            // or revive one: stop instead.
            if pos != stat.rows || kept != expected {
                if let Some(w) = out.take() {
                    rw.added.extend(w.close().await?);
                }
                return Err(SinkError::Write(format!(
                    "compaction of {path}: read {pos} rows ({} expected) and {kept} live rows \
                     ({expected} in the key index)",
                    stat.rows
                )));
            }
            rw.rows_kept += kept;
            rw.rows_dropped += stat.rows - kept;
        }
        if let Some(w) = out.take() {
            rw.added.extend(w.close().await?);
        }
        for p in plan.dropped.iter().chain(&plan.merged) {
            rw.removed.insert(p.to_string());
        }
        if !plan.merged.is_empty() {
            // Entries of data files that stay live; the rest name files no snapshot after
            // this one holds.
            let gone: HashSet<&str> = plan.data.iter().map(|p| p.as_ref()).collect();
            let mut entries: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
            for d in &plan.merged {
                files::read_deletes(table, d, |p, pos| {
                    if gone.contains(p) {
                        return;
                    }
                    if let Some((key, _)) = self.data_files.get_key_value(p) {
                        entries.entry(key.clone()).or_default().push(pos);
                    }
                })
                .await?;
            }
            let targets: Vec<Arc<str>> = entries.keys().cloned().collect();
            if let Some(d) = files::write_deletes(table, entries.into_iter().collect()).await? {
                rw.added.push(d.clone());
                rw.merged_into = Some((d, targets));
            }
        }
        Ok(())
    }

    /// The step was committed: the index points at the new files.
    pub fn compacted(&mut self, rw: Rewrite) -> Compacted {
        for (k, v) in rw.moves {
            // Positions were checked when the rows were written.
            let _ = self.index.insert(k, Loc::unpack(v));
        }
        self.index.free();
        let bytes_written = rw.added.iter().map(|f| f.file_size_in_bytes()).sum();
        for p in &rw.plan.data {
            self.data_files.remove(p);
        }
        for p in rw.plan.dropped.iter().chain(&rw.plan.merged) {
            self.delete_files.remove(p);
        }
        let mut data_out = 0;
        for f in rw
            .added
            .iter()
            .filter(|f| f.content_type() == DataContentType::Data)
        {
            data_out += 1;
            self.data_files.insert(
                f.file_path().into(),
                FileStat {
                    rows: f.record_count(),
                    bytes: f.file_size_in_bytes(),
                },
            );
        }
        let delete_out = u64::from(rw.merged_into.is_some());
        if let Some((d, targets)) = rw.merged_into {
            self.delete_files.insert(
                d.file_path().into(),
                DeleteStat {
                    bytes: d.file_size_in_bytes(),
                    targets,
                },
            );
        }
        Compacted {
            data_files_in: rw.plan.data.len() as u64,
            data_files_out: data_out,
            delete_files_in: (rw.plan.dropped.len() + rw.plan.merged.len()) as u64,
            delete_files_out: delete_out,
            rows_kept: rw.rows_kept,
            rows_dropped: rw.rows_dropped,
            bytes_written,
        }
    }

    /// The step will not be committed: its files go, the index stays as it was.
    pub async fn forget(&mut self, table: &Table, rw: Rewrite) {
        let io = table.file_io();
        for f in &rw.added {
            // Never committed: nothing references it.
            let _ = io.delete(f.file_path()).await;
        }
        self.index.free();
    }

    /// The table could not even be loaded after an unknown outcome: refuse writes.
    pub fn reload_failed(&mut self, e: &SinkError) {
        self.stale = Some(e.to_string());
    }

    /// The step's commit may or may not have landed: rebuild from the table as it is.
    pub async fn reload(&mut self, table: &Table) -> Result<(), SinkError> {
        let result = match self.set_schema(table) {
            Ok(()) => self.load(table).await,
            Err(e) => Err(e),
        };
        self.stale = result.as_ref().err().map(|e| e.to_string());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(rules: CompactRules) -> MirrorWriter {
        let mut w = MirrorWriter::empty(
            Arc::new(arrow_schema::Schema::empty()),
            vec![1],
            vec![1],
            false,
            u64::MAX,
            Some(rules),
            "ns.t".into(),
        );
        w.keys = Some(
            super::super::KeyEncoder::new(
                vec!["id".into()],
                &[arrow_schema::DataType::Int64],
                false,
            )
            .unwrap(),
        );
        w
    }

    const RULES: CompactRules = CompactRules {
        target_file_size: 1000,
        min_input_files: 3,
        delete_ratio: 0.3,
    };

    /// A data file of `rows` rows and `bytes` bytes whose first `live` positions hold keys.
    fn add_file(w: &mut MirrorWriter, path: &str, rows: u64, bytes: u64, live: u64) {
        let id = w.index.file_id(path).unwrap();
        for pos in 0..live {
            let key = Key::Int((u64::from(id) * 1_000_000 + pos) as i64);
            w.index.insert(key, Loc { file: id, pos }).unwrap();
        }
        w.data_files.insert(path.into(), FileStat { rows, bytes });
    }

    #[test]
    fn files_past_the_delete_ratio_and_deleted_files_are_rewritten() {
        let mut w = writer(RULES);
        add_file(&mut w, "a", 100, 900, 100);
        add_file(&mut w, "b", 100, 900, 71); // 29 % deleted: stays
        add_file(&mut w, "c", 100, 900, 70); // 30 %: rewritten
        add_file(&mut w, "d", 100, 900, 0); // all deleted: dropped at no cost
        w.index.free();
        let plan = w.plan(&RULES).unwrap();
        let mut data: Vec<&str> = plan.data.iter().map(|p| p.as_ref()).collect();
        data.sort();
        assert_eq!(data, ["c", "d"]);
    }

    #[test]
    fn small_files_merge_once_enough_and_the_largest_settles() {
        let mut w = writer(RULES);
        add_file(&mut w, "big", 10, 600, 10);
        add_file(&mut w, "s1", 10, 50, 10);
        add_file(&mut w, "s2", 10, 50, 10);
        assert!(w.plan(&RULES).is_none(), "two small files wait");
        add_file(&mut w, "s3", 10, 50, 10);
        let plan = w.plan(&RULES).unwrap();
        let mut data: Vec<&str> = plan.data.iter().map(|p| p.as_ref()).collect();
        data.sort();
        // 600 outweighs the three others together: it stays as it is.
        assert_eq!(data, ["s1", "s2", "s3"]);
    }

    #[test]
    fn delete_files_drop_with_their_data_files_and_merge_when_many() {
        let mut w = writer(RULES);
        add_file(&mut w, "a", 100, 900, 100);
        add_file(&mut w, "b", 100, 900, 90);
        let del = |targets: &[&str]| DeleteStat {
            bytes: 10,
            targets: targets.iter().map(|t| Arc::<str>::from(*t)).collect(),
        };
        w.delete_files.insert("d-gone".into(), del(&["x"]));
        w.delete_files.insert("d-b".into(), del(&["b"]));
        let plan = w.plan(&RULES).unwrap();
        assert_eq!(plan.dropped, vec![Arc::<str>::from("d-gone")]);
        assert!(plan.merged.is_empty() && plan.data.is_empty());
        w.delete_files.remove("d-gone");
        w.delete_files.insert("d-b2".into(), del(&["b"]));
        w.delete_files.insert("d-b3".into(), del(&["b", "a"]));
        let plan = w.plan(&RULES).unwrap();
        assert_eq!(plan.merged.len(), 3, "{plan:?}");
    }

    #[test]
    fn rows_without_a_key_value_turn_compaction_off() {
        let mut w = writer(RULES);
        add_file(&mut w, "d", 100, 900, 0);
        assert!(w.plan(&RULES).is_some());
        w.unkeyed = 100;
        assert!(w.plan(&RULES).is_none());
    }

    #[test]
    fn without_a_key_files_with_deletes_are_not_merged() {
        // A mirror whose table lost its key: every row of a file counts as live, so a file
        // its deletes name must not be rewritten (the rewrite would bring them back).
        let mut w = writer(RULES);
        w.keys = None;
        for f in ["s1", "s2", "s3"] {
            add_file(&mut w, f, 10, 50, 0);
        }
        assert_eq!(w.plan(&RULES).unwrap().data.len(), 3);
        w.delete_files.insert(
            "d".into(),
            DeleteStat {
                bytes: 10,
                targets: vec![Arc::from("s2")],
            },
        );
        assert!(w.plan(&RULES).is_none(), "two small files left: they wait");
        add_file(&mut w, "s4", 10, 50, 0);
        let plan = w.plan(&RULES).unwrap();
        assert!(!plan.data.iter().any(|p| p.as_ref() == "s2"), "{plan:?}");
    }
}
