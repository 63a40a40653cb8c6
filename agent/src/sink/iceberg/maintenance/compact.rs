//! Compaction: a partition's small data files are rewritten, in change order, into files near
//! `target_file_size`, committed as one `replace` snapshot. Files whose row groups are already
//! large are concatenated (their column chunks copied, see `concat`); the rest are decoded and
//! encoded again, rows streaming from the readers to the writer a batch at a time, so memory
//! stays bounded by a row group, not the partition. A commit that races the stream's appends
//! is staged again on the new state (appends never remove the files compaction replaces); any
//! other conflict drops the rewrite and deletes its files, so a row is never lost or written
//! twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::spec::{DataFile, Operation, PrimitiveLiteral, Struct};
use iceberg::table::Table;

use super::reach::LiveFile;
use super::{MaintenanceError, Settings};
use crate::config::MaintenanceConfig;
use crate::sink::iceberg::commit::{Change, CommitError};
use crate::sink::iceberg::writer::OpenFiles;
use crate::sink::iceberg::SinkError;
use arrow_array::RecordBatch;

/// Input files one compaction of a partition takes at most (the rest wait for the next run).
const MAX_INPUT_FILES: usize = 2_000;
/// Snapshot-summary property marking the agent's maintenance commits.
pub const MAINTENANCE_PROPERTY: &str = "philotes.maintenance";

/// One partition to compact: its small files in change order.
#[derive(Debug)]
pub(super) struct PartitionPlan {
    /// Input files, ordered by their first `(_cdc_lsn, _cdc_seq)`.
    pub files: Vec<DataFile>,
}

fn is_small(f: &DataFile, cfg: &MaintenanceConfig) -> bool {
    small(f.file_size_in_bytes(), cfg.target_file_size)
}

/// A file of `size` bytes is worth compacting: files within a quarter of the `target` are
/// done, compacting them again gains nothing.
pub(super) fn small(size: u64, target: u64) -> bool {
    size < target * 3 / 4
}

/// Small data files in all partitions.
pub(super) fn small_files(files: &[LiveFile], cfg: &MaintenanceConfig) -> usize {
    files
        .iter()
        .filter(|f| f.is_data && is_small(&f.file, cfg))
        .count()
}

/// `(lower, upper)` of a long column from a file's statistics.
fn bounds(f: &DataFile, field: Option<i32>) -> Option<(i64, i64)> {
    let id = field?;
    let get = |d: Option<&iceberg::spec::Datum>| match d.map(|d| d.literal()) {
        Some(PrimitiveLiteral::Long(v)) => Some(*v),
        Some(PrimitiveLiteral::Int(v)) => Some(i64::from(*v)),
        _ => None,
    };
    Some((
        get(f.lower_bounds().get(&id))?,
        get(f.upper_bounds().get(&id))?,
    ))
}

/// The partitions worth compacting now.
pub(super) fn plan(
    table: &Table,
    files: &[LiveFile],
    cfg: &MaintenanceConfig,
) -> Vec<PartitionPlan> {
    let md = table.metadata();
    // A mirror's row positions are in the agent's key index: rewriting its files would
    // leave the index pointing at removed files (rewrites with the index are to come).
    if md
        .properties()
        .get(crate::sink::iceberg::schema::MIRROR_PROPERTY)
        .is_some_and(|v| v == "true")
    {
        return Vec::new();
    }
    let spec_id = md.default_partition_spec_id();
    let schema = md.current_schema();
    let lsn = schema.field_id_by_name("_cdc_lsn");
    let seq = schema.field_id_by_name("_cdc_seq");
    let mut by_partition: HashMap<Struct, Vec<&DataFile>> = HashMap::new();
    for f in files {
        if f.is_data && f.spec_id == spec_id && is_small(&f.file, cfg) {
            by_partition
                .entry(f.file.partition().clone())
                .or_default()
                .push(&f.file);
        }
    }
    let mut out = Vec::new();
    for (_, mut group) in by_partition {
        if group.len() < cfg.min_input_files as usize {
            continue;
        }
        // Change order: each file is in order inside (it was written so); files follow each
        // other by their first (_cdc_lsn, _cdc_seq).
        let key = |f: &DataFile| {
            (
                bounds(f, lsn).map(|b| b.0).unwrap_or(i64::MIN),
                bounds(f, seq).map(|b| b.0).unwrap_or(i64::MIN),
                f.file_path().to_string(),
            )
        };
        group.sort_by_key(|f| key(f));
        // Keep a chain of files that do not overlap in change order (a file whose range
        // overlaps the chain waits for a later run): concatenating them keeps the order
        // inside the output file, with one input open at a time.
        let mut chosen: Vec<DataFile> = Vec::new();
        let mut last_end: Option<(i64, i64)> = None;
        for f in group {
            let start = (bounds(f, lsn).map(|b| b.0), bounds(f, seq).map(|b| b.0));
            let end = (bounds(f, lsn).map(|b| b.1), bounds(f, seq).map(|b| b.1));
            let ordered = match (start, end) {
                ((Some(l0), Some(s0)), (Some(l1), Some(s1))) => {
                    let ok = last_end.is_none_or(|e| (l0, s0) > e);
                    if ok {
                        last_end = Some((l1, s1));
                    }
                    ok
                }
                // No change columns (not a changelog): any order will do.
                _ => lsn.is_none(),
            };
            if chosen.len() >= MAX_INPUT_FILES {
                break;
            }
            if ordered {
                chosen.push(f.clone());
            }
        }
        let settled = settled_head(
            &chosen
                .iter()
                .map(|f| f.file_size_in_bytes())
                .collect::<Vec<_>>(),
        );
        chosen.drain(..settled);
        if chosen.len() >= cfg.min_input_files as usize {
            out.push(PartitionPlan { files: chosen });
        }
    }
    out
}

/// How many of the oldest files in a chain (sizes in change order) stay as they are: each is
/// larger than all newer files together. Rewriting such a file with a few small ones would
/// copy the partition's whole history at every run (the work, and the stream's wait for the
/// cores, growing with the table); leaving it until the newer files outweigh it makes files
/// grow geometrically, so a row is rewritten O(log n) times and a partition keeps O(log n)
/// files below the target size.
pub(crate) fn settled_head(sizes: &[u64]) -> usize {
    let mut newer: u64 = sizes.iter().sum();
    for (i, size) in sizes.iter().enumerate() {
        newer -= size;
        if *size <= newer {
            return i;
        }
    }
    sizes.len()
}

/// Compact every partition the plan names, one `replace` snapshot each.
pub(super) async fn run(
    committer: &super::Committer,
    table: &Table,
    settings: &Settings,
) -> Result<(u64, String, u64), MaintenanceError> {
    let cfg = &settings.config;
    let mut table = table.clone();
    let mut live = super::reach::live_files(&table).await?;
    let mut repaired = String::new();
    if !super::repair::checked(&table) {
        // A failed repair does not hold compaction back: it is tried again at the next run.
        match super::repair::run(committer, &table, &live, settings).await {
            Ok((t, r)) => {
                if r.suspects > 0 {
                    repaired = format!(
                        "{} the column bounds of {} files whose bounds may exclude rows; ",
                        if settings.dry_run {
                            "would correct"
                        } else {
                            "corrected"
                        },
                        if settings.dry_run {
                            r.suspects
                        } else {
                            r.restated
                        },
                    );
                }
                if t.metadata_location() != table.metadata_location() {
                    table = t;
                    live = super::reach::live_files(&table).await?;
                }
            }
            Err(e) => {
                tracing::warn!(table = %table.identifier(), "column bounds repair failed, tried again at the next run: {e}");
                repaired = format!("column bounds repair failed ({e}); ");
            }
        }
    }
    let plans = plan(&table, &live, cfg);
    if plans.is_empty() {
        return Ok((
            0,
            format!("{repaired}no partition has enough small files"),
            0,
        ));
    }
    let inputs: usize = plans.iter().map(|p| p.files.len()).sum();
    if settings.dry_run {
        return Ok((
            0,
            format!(
                "{repaired}would rewrite {inputs} small files in {} partitions",
                plans.len()
            ),
            0,
        ));
    }
    // Delete files (another engine's row deletes) apply to the rows only when they are
    // decoded: with any in the table, every partition is re-encoded through a scan.
    let deletes = live.iter().any(|f| !f.is_data);
    let (mut rewritten, mut written, mut copied, mut bytes) = (0usize, 0usize, 0usize, 0u64);
    for p in plans {
        let (t, outputs, by_copy) = compact_partition(committer, &table, &p, cfg, deletes).await?;
        table = t;
        rewritten += p.files.len();
        written += outputs.len();
        bytes += outputs.iter().map(|f| f.file_size_in_bytes()).sum::<u64>();
        if by_copy {
            copied += p.files.len();
        }
    }
    // The replaced files stay readable through the snapshots before the rewrite (time
    // travel) until expiry deletes them with those snapshots.
    Ok((
        0,
        format!(
            "{repaired}rewrote {rewritten} small files into {written} ({copied} by copying their row groups)"
        ),
        bytes,
    ))
}

async fn compact_partition(
    committer: &super::Committer,
    table: &Table,
    plan: &PartitionPlan,
    cfg: &MaintenanceConfig,
    deletes: bool,
) -> Result<(Table, Vec<DataFile>, bool), MaintenanceError> {
    let survey = super::concat::survey(table, &plan.files, !deletes).await?;
    let (rows, written) = if survey.concat {
        let written = super::concat::concat(table, &plan.files, cfg.target_file_size).await?;
        (written.iter().map(|f| f.record_count()).sum(), written)
    } else {
        match rewrite(table, plan, cfg, survey.plain).await? {
            Some(r) => r,
            None => return Ok((table.clone(), Vec::new(), false)),
        }
    };
    let expected: u64 = plan.files.iter().map(|f| f.record_count()).sum();
    let delete_written = |files: &[DataFile]| {
        let io = table.file_io().clone();
        let paths: Vec<String> = files.iter().map(|f| f.file_path().to_string()).collect();
        async move {
            for p in paths {
                let _ = io.delete(&p).await;
            }
        }
    };
    let written_rows: u64 = written.iter().map(|f| f.record_count()).sum();
    if rows != expected || written_rows != expected {
        delete_written(&written).await;
        return Err(MaintenanceError::Write(format!(
            "read {rows} and wrote {written_rows} rows of {expected}: rewrite dropped"
        )));
    }
    // No `philotes.lsn` here: the stream's checkpoint is the table property (and the
    // summaries of its own appends); a rewrite changes no row.
    let summary = HashMap::from([(MAINTENANCE_PROPERTY.to_string(), "compact".to_string())]);
    let change = Change {
        operation: Operation::Replace,
        added: written.clone(),
        removed: plan
            .files
            .iter()
            .map(|f| f.file_path().to_string())
            .collect::<HashSet<_>>(),
        summary,
        properties: HashMap::new(),
        requires_live: HashSet::new(),
        fence: Vec::new(),
        restated: HashMap::new(),
    };
    match committer.commit_snapshot(table, &change, 5).await {
        Ok((t, _)) => Ok((t, written, survey.concat)),
        Err(e @ CommitError::Unknown(_)) => Err(e.into()),
        Err(e) => {
            delete_written(&written).await;
            Err(e.into())
        }
    }
}

/// Decode the plan's files in order and encode their rows into new files: the path for small
/// row groups (merged into larger ones) and for inputs of different layouts. `None` when the
/// table has no snapshot.
async fn rewrite(
    table: &Table,
    plan: &PartitionPlan,
    cfg: &MaintenanceConfig,
    plain: Vec<String>,
) -> Result<Option<(u64, Vec<DataFile>)>, MaintenanceError> {
    let Some(snapshot) = table.metadata().current_snapshot_id() else {
        return Ok(None);
    };
    let order: HashMap<&str, usize> = plan
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.file_path(), i))
        .collect();
    let mut tasks: Vec<_> = table
        .scan()
        .snapshot_id(snapshot)
        .build()?
        .plan_files()
        .await?
        .try_filter(|t| futures::future::ready(order.contains_key(t.data_file_path())))
        .try_collect()
        .await?;
    if tasks.len() != plan.files.len() {
        return Err(MaintenanceError::Read(format!(
            "planned {} files, the scan found {}",
            plan.files.len(),
            tasks.len()
        )));
    }
    tasks.sort_by_key(|t| order.get(t.data_file_path()).copied().unwrap_or(usize::MAX));
    // One file at a time, in order: the output keeps the change order.
    let mut batches = table
        .reader_builder()
        .with_data_file_concurrency_limit(1)
        .build()
        .read(Box::pin(futures::stream::iter(tasks.into_iter().map(Ok))))?
        .stream();
    let per_file = rows_per_file(&plan.files, cfg.target_file_size);
    let mut out = Output::new(table, cfg.target_file_size, per_file, plain.into());
    // The scan reads in its snapshot's schema; the files are written in the current one,
    // which is newer after a schema change with no rows since (a column added: "field id
    // not found" from the writer, every run until the next append).
    let md = table.metadata();
    let current = md.current_schema();
    let older = md
        .snapshot_by_id(snapshot)
        .and_then(|s| s.schema_id())
        .is_some_and(|id| id != current.schema_id());
    let wanted = if older {
        let arrow = schema_to_arrow_schema(current)?;
        Some(crate::sink::iceberg::project::with_ids(&arrow))
    } else {
        None
    };
    let mut rows = 0u64;
    while let Some(batch) = batches.try_next().await? {
        rows += batch.num_rows() as u64;
        let batch = match &wanted {
            Some(w) => crate::sink::iceberg::project::by_field_id(&batch, w)
                .map_err(|e| MaintenanceError::Read(e.to_string()))?,
            None => batch,
        };
        out.send(batch)
            .await
            .map_err(|e| MaintenanceError::Write(e.to_string()))?;
    }
    let written = out
        .close()
        .await
        .map_err(|e| MaintenanceError::Write(e.to_string()))?;
    Ok(Some((rows, written)))
}

/// Rows per output file of a rewrite: the target size at the inputs' bytes per row. The
/// writer's own rollover measures a row group by its size before compression, so its files
/// came out at what the target compresses to (~0.6–0.75 of it): still "small", they were
/// rewritten into as many files at every run, for ever. The inputs' compressed bytes per row
/// are what the outputs will have, near enough.
fn rows_per_file(files: &[DataFile], target: u64) -> usize {
    let bytes: u64 = files.iter().map(|f| f.file_size_in_bytes()).sum();
    let rows: u64 = files.iter().map(|f| f.record_count()).sum();
    let per_row = (bytes as f64 / rows.max(1) as f64).max(1.0);
    ((target as f64 / per_row) as usize).max(1)
}

/// Where a compaction output is cut at the latest, whatever the inputs' bytes per row say:
/// the writer's own count (before compression) at four times the `target`. It runs early, so
/// it is only a bound (see [`rows_per_file`]).
pub(crate) fn writer_bound(target: u64) -> u64 {
    target.saturating_mul(4)
}

/// A rewrite's output: a new file every `per_file` rows.
struct Output<'a> {
    table: &'a Table,
    /// The writer's own rollover ([`writer_bound`]).
    bound: usize,
    per_file: usize,
    open: Option<(OpenFiles, usize)>,
    written: Vec<DataFile>,
    /// Columns written without a dictionary, as in the inputs.
    plain: Arc<[String]>,
}

impl<'a> Output<'a> {
    fn new(table: &'a Table, target: u64, per_file: usize, plain: Arc<[String]>) -> Self {
        Self {
            table,
            bound: usize::try_from(writer_bound(target)).unwrap_or(usize::MAX),
            per_file,
            open: None,
            written: Vec::new(),
            plain,
        }
    }

    async fn send(&mut self, mut batch: RecordBatch) -> Result<(), SinkError> {
        while batch.num_rows() > 0 {
            let (files, rows) = self.open.get_or_insert_with(|| {
                (
                    OpenFiles::open_sized(self.table, Some(self.bound), self.plain.clone()),
                    0,
                )
            });
            let take = batch.num_rows().min(self.per_file - *rows);
            files.send(batch.slice(0, take)).await?;
            *rows += take;
            batch = batch.slice(take, batch.num_rows() - take);
            if *rows >= self.per_file {
                if let Some((files, _)) = self.open.take() {
                    self.written.extend(files.close().await?);
                }
            }
        }
        Ok(())
    }

    async fn close(mut self) -> Result<Vec<DataFile>, SinkError> {
        if let Some((files, _)) = self.open.take() {
            self.written.extend(files.close().await?);
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::settled_head;

    #[test]
    fn a_file_larger_than_all_newer_ones_stays() {
        assert_eq!(settled_head(&[100, 10, 10, 10]), 1);
        assert_eq!(settled_head(&[100, 50, 5, 5, 5, 5, 5, 5, 5, 5]), 2);
        assert_eq!(settled_head(&[100, 40, 5, 5, 5, 5, 5, 5, 5, 5]), 1);
        assert_eq!(settled_head(&[100, 60, 50]), 0);
    }

    #[test]
    fn files_that_the_newer_ones_outweigh_are_rewritten() {
        assert_eq!(settled_head(&[30, 10, 10, 10]), 0);
        assert_eq!(settled_head(&[10, 10, 10]), 0);
        assert_eq!(settled_head(&[]), 0);
    }

    #[test]
    fn repeated_runs_keep_a_logarithmic_number_of_files() {
        // Simulate a partition gaining 8 equal small files between runs: compaction merges
        // what the rule leaves, so the file count stays logarithmic in the rows.
        let mut files: Vec<u64> = Vec::new();
        let mut rewritten = 0u64;
        for _ in 0..1_000 {
            files.extend([1; 8]);
            let keep = settled_head(&files);
            let merged: u64 = files[keep..].iter().sum();
            rewritten += merged;
            files.truncate(keep);
            files.push(merged);
        }
        assert!(files.len() <= 14, "{} files: {files:?}", files.len());
        // Each row is rewritten about log2(n) times, not n times.
        let rows = 8_000u64;
        assert!(
            rewritten <= rows * 14,
            "{rewritten} rows rewritten for {rows}"
        );
    }
}
