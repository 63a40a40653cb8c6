//! Initial snapshot of one table: a consistent copy as of a snapshot exported by a temporary
//! slot, read by parallel `COPY` sessions over TID ranges and committed in chunks that record
//! their progress, so a crash resumes the copy where its last chunk ended.
//!
//! A resumed copy runs in a new exported snapshot but keeps only the row versions the first
//! snapshot could already see (their `xmin` precedes its `xmax` and was not in progress then):
//! such a row is unchanged since the first snapshot, so every copied row is as of that first
//! point, and everything that changed after it comes from the stream (applied above the
//! first point's LSN). A row an update moved into a range not yet copied is therefore not
//! copied twice. `xmin` is a 32-bit id without its epoch, so the filter is only exact while
//! the cluster has used fewer than 2^32 transaction ids; past that, or when the table was
//! rewritten meanwhile (new relfilenode), the resumed copy keeps every row: nothing can be
//! lost, but a key may then appear twice as `R` (the later copy wins when folding).

use std::collections::HashMap;
use std::sync::Arc;

use std::time::{Duration, Instant};
use tracing::Instrument;

use serde::{Deserialize, Serialize};

use super::{now_micros, t_committed, Applier, SOURCE_OID_PROPERTY};
use crate::model::{Lsn, Op};
use crate::pipeline::batch::snapshot_row_json;
use crate::pipeline::dlq::DeadLetter;
use crate::pipeline::{AbortOnDrop, PipelineError};
use crate::sink::iceberg::schema::{
    SNAPSHOT_PROGRESS_PROPERTY, SNAPSHOT_PROPERTY, SNAPSHOT_REQUESTED,
};
use crate::sink::iceberg::table::PropertyChanges;
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::{Session, SourceError};
use crate::source::postgres::snapshot::{
    self as source_snapshot, copy_range, parse_tid, plan_ranges, range_select, snapshot_xids,
    table_facts, visible_then, Fetched, ReadAhead, TidRange,
};
use crate::telemetry::events::{ChangeReceived, TableCommitted};

/// A copy's committed progress (snapshot summary property `philotes.snapshot.progress`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Progress {
    /// `_cdc_lsn` of every copied row: the first snapshot's consistent point − 1.
    lsn: Lsn,
    /// Next `_cdc_seq`.
    seq: u64,
    /// The first snapshot's xmax (64-bit, with its epoch).
    xmax: u64,
    /// Transactions in progress in the first snapshot (32-bit).
    xip: Vec<u64>,
    /// The table's relfilenode when the copy started (a rewrite changes every ctid).
    filenode: String,
    /// What is left to copy.
    ranges: Vec<TidRange>,
    /// A copy taken again of a keyed mirror: the mirror's last sequence number before it,
    /// whose files the copy's end removes (its rows are replaced meanwhile, not emptied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mirror_before: Option<i64>,
    /// A copy taken again, recorded before its first chunk (see
    /// [`Applier::record_copy_start`]): its truncate marker is not committed yet, so a
    /// resumed copy starts with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    marker_pending: bool,
}

impl Progress {
    /// Row versions the first snapshot could see, for a copy resumed in a snapshot whose
    /// xmax is `now_xmax` (see [`visible_then`]).
    fn visible_then(&self, now_xmax: u64) -> Option<String> {
        visible_then(self.xmax, &self.xip, now_xmax)
    }
}

/// A copy under way: what the readers' batches advance.
struct Copying {
    progress: Progress,
    /// Per range: its reader reached the end.
    done: Vec<bool>,
    /// Rows since the last chunk commit.
    since_commit: u64,
    /// `_cdc_lsn` of every copied row.
    lsn: Lsn,
    /// `_cdc_ts` of every copied row.
    ts: i64,
    ncols: usize,
    /// Per column: read in binary.
    binary: Vec<bool>,
    source_name: String,
    /// The progress of a fresh copy before its first row, until the table records it (see
    /// [`Applier::record_copy_start`]).
    start: Option<String>,
}

impl Applier {
    /// Initial snapshot of `schema.table`: rows `_cdc_op = 'R'` as of an exported snapshot,
    /// committed every `snapshot_chunk_rows` rows with the progress, the last time with
    /// `philotes.snapshot = done`. Streamed transactions that committed before the point
    /// are then skipped for this table (they are in the copy); later ones are applied.
    pub(in crate::pipeline) async fn snapshot_table(
        &mut self,
        url: &SourceUrl,
        schema: &str,
        name: &str,
        oid: Option<u32>,
    ) -> Result<(), PipelineError> {
        let slot = self.cfg.slot_name();
        let publication = self.cfg.publication_name();
        let mut reader = Session::connect(url, &slot, &publication, None).await?;
        // The copy takes what the stream will send: the publication's column list and rows
        // (a column left out of it, an e-mail say, must not reach Iceberg through the copy).
        let published = source_snapshot::published(&mut reader, &publication, schema, name).await?;
        let mut columns = reader.relation_columns(schema, name).await?;
        if let Some(names) = &published.columns {
            columns.retain(|c| names.contains(&c.name));
        }
        let source = format!("{schema}.{name}");
        let source = self.aliases.get(&source).cloned().unwrap_or(source);
        let idx = self
            .relation(&source, schema, name, None, columns.clone())
            .await?;
        self.copy_if_rows_lack_a_key(idx).await?;
        if self.tables[idx].sink.snapshot_done() {
            return Ok(());
        }
        // Asked to copy again (see `again.rs`): a fresh copy starts with a truncate marker.
        let again = self.tables[idx].sink.property(SNAPSHOT_PROPERTY).as_deref()
            == Some(SNAPSHOT_REQUESTED);
        // A progress record that cannot be read is an error, not a fresh start: copying again
        // would add a second R row for every key already copied.
        let resumed: Option<Progress> = match self.tables[idx].sink.snapshot_progress() {
            None => None,
            Some(j) => Some(serde_json::from_str(&j).map_err(|e| {
                PipelineError::State(format!(
                    "table {schema}.{name}: the initial copy's progress (philotes.snapshot.progress) cannot be read ({e}); fix or remove the property to copy the table again"
                ))
            })?),
        };
        let source_name = format!("{schema}.{name}");
        let facts = table_facts(&mut reader, schema, name).await?;
        // The exporting session must stay open and idle until the copy is done.
        let mut exporter = Session::connect(url, &slot, &publication, None).await?;
        let (point, snapshot) = exporter
            .export_snapshot(&source_snapshot::temp_slot_name(&slot))
            .await?;
        let binary = self.tables[idx].batch.snapshot_binary();
        let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
        let list = source_snapshot::select_list(&mut reader, schema, name, &names, &binary).await?;
        let (estimate, filenode) = (facts.estimate, facts.filenode.clone());
        let readers = self.cfg.snapshot_readers;
        let (now_xmax, now_xip) = snapshot_xids(&mut reader, &snapshot).await?;
        let fresh = resumed.is_none();
        let (mut progress, visibility) = match resumed {
            Some(mut p) => {
                tracing::info!(table = %source_name, rows_done = p.seq, "initial snapshot: resuming after the last committed chunk");
                if p.filenode != filenode {
                    // VACUUM FULL, CLUSTER or a rewriting ALTER moved every row: the recorded
                    // positions mean nothing now.
                    tracing::warn!(table = %source_name, "table was rewritten since its copy started: copying all of it again (rows copied before may appear twice as R)");
                    p.ranges = plan_ranges(&mut reader, &facts, readers).await?;
                    p.filenode = filenode;
                }
                let v = p.visible_then(now_xmax);
                if v.is_none() {
                    tracing::warn!(table = %source_name, "past 2^32 transaction ids a row's xmin cannot tell whether it changed since the copy started: the resumed copy keeps every row (a key may appear twice as R)");
                }
                (p, v)
            }
            None => {
                let p = Progress {
                    lsn: point.saturating_sub(1),
                    // The marker takes `_cdc_seq` 0 at the copy's LSN, before every `R` row.
                    seq: u64::from(again),
                    xmax: now_xmax,
                    xip: now_xip,
                    filenode,
                    ranges: plan_ranges(&mut reader, &facts, readers).await?,
                    mirror_before: None,
                    marker_pending: again,
                };
                (p, None)
            }
        };
        drop(reader);
        // Rows the copy keeps: the first snapshot's (when resumed) that the publication's row
        // filter passes.
        let conditions: Vec<String> = visibility
            .into_iter()
            .chain(published.row_filter.map(|f| format!("({f})")))
            .collect();
        let conditions = (!conditions.is_empty()).then(|| conditions.join(" AND "));
        let lsn = progress.lsn;
        tracing::info!(table = %source_name, point = %point.pg(), estimate, "initial snapshot: copying");
        let started = Instant::now();
        let mut last_report = Instant::now();
        let first_seq = progress.seq;
        // Readers fetch ahead into a channel of a few batches, within a budget of receive
        // buffers (memory stays bounded) while this task converts; each ends with `Done`, so
        // a reader that vanished is noticed.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Fetched, SourceError>>(2);
        let budget = ReadAhead::new(readers as usize);
        let mut fetchers = Vec::new();
        // A partitioned table has ranges per partition: still `snapshot_readers` sessions.
        let sessions = Arc::new(tokio::sync::Semaphore::new(readers.max(1) as usize));
        for (r, range) in progress.ranges.iter().enumerate() {
            let select = range_select(&list, &facts.rel, range, conditions.as_deref());
            let (url, slot, publication) = (url.clone(), slot.clone(), publication.clone());
            let snapshot = snapshot.clone();
            let (tx, budget) = (tx.clone(), budget.clone());
            let sessions = sessions.clone();
            fetchers.push(AbortOnDrop(tokio::spawn(async move {
                let Ok(_session) = sessions.acquire_owned().await else {
                    return;
                };
                let result = copy_range(
                    &url,
                    &slot,
                    &publication,
                    &snapshot,
                    &select,
                    r,
                    &budget,
                    &tx,
                )
                .await;
                let _ = tx.send(result.map(|()| Fetched::Done(r))).await;
            })));
        }
        drop(tx);
        if progress.marker_pending {
            // A copy taken again, fresh or recorded before its first chunk committed: the
            // mirror's sequence number before it is the recorded one (nothing was committed
            // to the mirror since; properties alone do not add a snapshot).
            self.truncate_marker(idx, lsn)?;
            progress.mirror_before = self.replace_mirror(idx, lsn, progress.mirror_before);
        } else if let Some(before) = progress.mirror_before {
            if self.replace_mirror(idx, lsn, Some(before)).is_none() {
                // The mirror lost its key since the copy started: it cannot tell the copy's
                // rows from the old ones, so it is emptied like an unkeyed mirror.
                self.truncate_marker(idx, lsn)?;
                progress.mirror_before = None;
            }
        }
        // Recorded early, a copy taken again says that its marker is still pending; the
        // chunks commit the marker, so their progress no longer does.
        let start = if fresh {
            Some(
                serde_json::to_string(&progress)
                    .map_err(|e| SourceError::Query(format!("snapshot progress: {e}")))?,
            )
        } else {
            None
        };
        progress.marker_pending = false;
        let mut copy = Copying {
            done: vec![false; progress.ranges.len()],
            start,
            progress,
            since_commit: 0,
            lsn,
            ts: now_micros(),
            ncols: columns.len(),
            binary,
            source_name,
        };
        while let Some(msg) = rx.recv().await {
            self.take_fetched(idx, &mut copy, msg).await?;
            if copy.since_commit >= self.cfg.snapshot_chunk_rows {
                // The readers wait while the chunk commits, and what they fetched ahead is
                // converted into this chunk first: the commit's row-group flush then does not
                // meet a full read-ahead (it made a long copy's peak memory ~10 MB higher
                // than a short one's).
                let hold = budget.hold_all();
                tokio::pin!(hold);
                let _held = loop {
                    tokio::select! {
                        biased;
                        held = &mut hold => break held,
                        msg = rx.recv() => match msg {
                            Some(msg) => self.take_fetched(idx, &mut copy, msg).await?,
                            None => break (&mut hold).await,
                        },
                    }
                };
                copy.since_commit = 0;
                let left = Progress {
                    ranges: copy
                        .progress
                        .ranges
                        .iter()
                        .zip(&copy.done)
                        .filter(|(_, d)| !**d)
                        .map(|(r, _)| r.clone())
                        .collect(),
                    ..copy.progress.clone()
                };
                let json = serde_json::to_string(&left)
                    .map_err(|e| SourceError::Query(format!("snapshot progress: {e}")))?;
                self.record_copy_start(idx, &mut copy.start).await?;
                self.commit_snapshot_chunk(
                    idx,
                    lsn,
                    &[
                        (SNAPSHOT_PROPERTY, "partial"),
                        (SNAPSHOT_PROGRESS_PROPERTY, &json),
                    ],
                )
                .await?;
                tracing::info!(table = %copy.source_name, rows = copy.progress.seq, "initial snapshot: chunk committed");
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                last_report = Instant::now();
                let seq = copy.progress.seq;
                let rate = (seq - first_seq) as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = estimate.saturating_sub(seq) as f64 / rate.max(1.0);
                tracing::info!(table = %copy.source_name, rows = seq, rows_per_s = rate as u64, eta_s = eta as u64, "initial snapshot: progress");
            }
        }
        self.record_copy_start(idx, &mut copy.start).await?;
        let Copying {
            progress,
            done,
            source_name,
            ..
        } = copy;
        drop(fetchers);
        if done.iter().any(|d| !d) {
            return Err(SourceError::Query(format!(
                "{source_name}: a snapshot reader stopped early; the copy will resume"
            ))
            .into());
        }
        drop(exporter);
        if let Some(m) = self.mirror_of(idx) {
            m.finish_replacing();
        }
        let oid = oid.map(|o| o.to_string()).unwrap_or_default();
        let mut state = vec![(SNAPSHOT_PROPERTY, "done")];
        if !oid.is_empty() {
            state.push((SOURCE_OID_PROPERTY, &oid));
        }
        self.commit_snapshot_chunk(idx, lsn, &state).await?;
        self.tables[idx].copied = true;
        tracing::Span::current().record("rows", progress.seq as i64);
        tracing::info!(
            table = %source_name,
            rows = progress.seq,
            seconds = started.elapsed().as_secs_f64(),
            "initial snapshot: committed"
        );
        Ok(())
    }

    /// Table `idx`'s mirror table, if it has one.
    fn mirror_of(&mut self, idx: usize) -> Option<&mut crate::sink::iceberg::table::TableSink> {
        let t = &mut self.tables[idx];
        match t.mirror.as_mut() {
            Some(m) => Some(m),
            None => t.sink.is_mirror().then_some(&mut t.sink),
        }
    }

    /// Let a copy taken again replace the rows of table `idx`'s mirror rather than empty it
    /// at its marker (`lsn`): the mirror's sequence number before the copy (`before`, or now),
    /// `None` when there is no mirror or it has no key.
    fn replace_mirror(&mut self, idx: usize, lsn: Lsn, before: Option<i64>) -> Option<i64> {
        let m = self.mirror_of(idx)?;
        let before = before.unwrap_or_else(|| m.sequence_number());
        m.replace_from(lsn, before).then_some(before)
    }

    /// The `T` row that starts a copy asked for again (`_cdc_seq` 0 at the copy's LSN): the
    /// mirror drops every row it had, and the changelog's fold starts over from it.
    fn truncate_marker(&mut self, idx: usize, lsn: Lsn) -> Result<(), PipelineError> {
        let t = &mut self.tables[idx];
        t.batch
            .push(Op::Truncate, lsn, 0, now_micros(), None)
            .map_err(|e| {
                PipelineError::State(format!("{}: truncate marker: {}", t.source_name, e.0))
            })?;
        t.dirty = true;
        t.counts[super::op_index(Op::Truncate)] += 1;
        ChangeReceived {
            op: Op::Truncate,
            count: 1,
        }
        .emit(&t.metrics);
        Ok(())
    }

    /// Before a fresh copy's first dead letters are committed, the table records where the
    /// copy started (`philotes.snapshot = partial` with its progress before any row, table
    /// properties only: the rows written stay pending). A failure before the chunk's commit
    /// then resumes this copy, at its point, instead of starting another whose rows would
    /// give the dead-letter table the same rows again (under another `_cdc_lsn`).
    async fn record_copy_start(
        &mut self,
        idx: usize,
        start: &mut Option<String>,
    ) -> Result<(), PipelineError> {
        let name = &self.tables[idx].source_name;
        if !self.dlq_rows.iter().any(|r| &r.source_table == name) {
            return Ok(());
        }
        let Some(progress) = start.take() else {
            return Ok(());
        };
        let props = PropertyChanges {
            set: HashMap::from([
                (SNAPSHOT_PROPERTY.to_string(), "partial".to_string()),
                (SNAPSHOT_PROGRESS_PROPERTY.to_string(), progress),
            ]),
            remove: Vec::new(),
        };
        let t = &mut self.tables[idx];
        if let Some(m) = t.mirror.as_mut() {
            m.set_properties(props.clone()).await?;
        }
        t.sink.set_properties(props).await?;
        Ok(())
    }

    /// Convert one message of the copy's readers into table `idx`'s batch and advance the
    /// copy's progress; a batch's read-ahead buffers are returned once it is converted.
    async fn take_fetched(
        &mut self,
        idx: usize,
        c: &mut Copying,
        msg: Result<Fetched, SourceError>,
    ) -> Result<(), PipelineError> {
        let (r, rows) = match msg? {
            Fetched::Rows(r, rows, _share) => (r, rows),
            Fetched::Done(r) => {
                c.done[r] = true;
                return Ok(());
            }
        };
        let (lsn, ncols) = (c.lsn, c.ncols);
        // Every row ends with its ctid.
        let tid_of = |i: usize| {
            (i < rows.len())
                .then(|| rows.row(i))
                .and_then(|r| parse_tid(r.get(ncols).flatten()))
        };
        let Some(tid) = rows.len().checked_sub(1).and_then(tid_of) else {
            return Err(SourceError::Query(format!(
                "{}: snapshot rows without their ctid",
                c.source_name
            ))
            .into());
        };
        for (i, row) in rows.iter().enumerate() {
            let values = row.values(ncols);
            let seq = c.progress.seq;
            let t = &mut self.tables[idx];
            if let Err(e) =
                t.batch
                    .push_snapshot(Op::Read, lsn, seq, c.ts, values.clone(), &c.binary)
            {
                // Logged like a dead letter of the stream (it used not to be).
                let letter = DeadLetter {
                    source_table: c.source_name.clone(),
                    lsn,
                    seq,
                    op: Op::Read,
                    error: e.0,
                    row_json: snapshot_row_json(&t.columns, values, &c.binary),
                    time_micros: now_micros(),
                    copied: tid_of(i).map(|tid| (c.progress.ranges[r].key(), tid)),
                };
                self.dead_letter(letter);
            } else {
                t.dirty = true;
            }
            c.progress.seq += 1;
            c.since_commit += 1;
            if self.should_spill(idx) {
                self.spill(idx).await?;
            }
        }
        // Counted per fetched batch, not per row.
        ChangeReceived {
            op: Op::Read,
            count: rows.len() as u64,
        }
        .emit(&self.tables[idx].metrics);
        // Progress is "everything up to this ctid": it only holds if rows came in order.
        let first = tid_of(0);
        if first
            .zip(c.progress.ranges[r].after)
            .is_some_and(|(f, a)| f <= a)
            || first > Some(tid)
        {
            return Err(SourceError::Query(format!(
                "{}: snapshot rows did not arrive in ctid order; the copy will be retried",
                c.source_name
            ))
            .into());
        }
        c.progress.ranges[r].after = Some(tid);
        Ok(())
    }

    /// Commit what the copy of table `idx` wrote so far, with `props` in the summary. Its
    /// dead letters are committed first: a crash between the two re-reads those rows, and
    /// their dead letters are then recognised by `(lsn, seq)` and dropped.
    async fn commit_snapshot_chunk(
        &mut self,
        idx: usize,
        lsn: Lsn,
        props: &[(&str, &str)],
    ) -> Result<(), PipelineError> {
        let rows = self.tables[idx].sink.pending_rows() + self.tables[idx].batch.rows() as u64;
        if !self.dlq_rows.is_empty() {
            self.flush_dlq_rows(lsn).await?;
        }
        // Measured and traced like a flush's commit (a chunk used to record neither).
        let started = std::time::Instant::now();
        self.close_files(idx).await?;
        let t = &mut self.tables[idx];
        let span = crate::telemetry::commit_span(
            &self.cfg.name,
            &t.source_name,
            t.sink.name(),
            rows,
            &lsn.pg(),
        );
        // The mirror first (see the flush): its progress is never behind the changelog's.
        if let Some(m) = t.mirror.as_mut() {
            let done = m.commit_with(lsn, props).instrument(span.clone()).await?;
            super::mirror_committed(m, &done, &t.metrics);
        }
        let outcome = t.sink.commit_with(lsn, props).instrument(span).await?;
        super::mirror_committed(&t.sink, &outcome, &t.metrics);
        t.dirty = false;
        TableCommitted {
            source_table: &t.source_name,
            iceberg_table: t.sink.name(),
            rows,
            committed_lsn: t_committed(t),
            conflicts: outcome.conflicts,
            duration: started.elapsed(),
            transactions: &[],
        }
        .emit(&t.metrics, &self.metrics, &self.status);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::snapshot::split_blocks;

    #[test]
    fn progress_round_trips_and_filters_on_the_first_snapshot() {
        let p = Progress {
            lsn: Lsn(42),
            seq: 10,
            xmax: 900,
            xip: vec![880, 895],
            filenode: "16384".into(),
            ranges: split_blocks(2, 10),
            mirror_before: Some(7),
            marker_pending: true,
        };
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back.ranges, p.ranges);
        assert_eq!(back.mirror_before, Some(7));
        assert!(back.marker_pending);
        let done = Progress {
            marker_pending: false,
            ..p.clone()
        };
        assert!(!serde_json::to_string(&done).unwrap().contains("marker"));
        // Progress recorded before the field existed still reads.
        let old: Progress = serde_json::from_str(
            r#"{"lsn":42,"seq":1,"xmax":9,"xip":[],"filenode":"1","ranges":[]}"#,
        )
        .unwrap();
        assert_eq!(old.mirror_before, None);
        assert!(!old.marker_pending);
        assert_eq!(
            back.visible_then(1000).as_deref(),
            Some("xmin::text::bigint < 900 AND xmin::text::bigint NOT IN (880,895)")
        );
    }
}
