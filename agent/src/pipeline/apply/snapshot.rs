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

use std::time::{Duration, Instant};
use tracing::Instrument;

use serde::{Deserialize, Serialize};

use super::{now_micros, t_committed, Applier};
use crate::pipeline::batch::snapshot_row_json;
use crate::pipeline::dlq::DeadLetter;
use crate::pipeline::{AbortOnDrop, PipelineError};
use crate::sink::iceberg::schema::{SNAPSHOT_PROGRESS_PROPERTY, SNAPSHOT_PROPERTY};
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::copy::BinaryCopy;
use crate::source::postgres::session::{
    format_lsn, quote_ident, quote_literal, Session, SourceError,
};
use crate::source::postgres::wire::Row;
use crate::telemetry::events::{ChangeReceived, DeadLettered, Operation, TableCommitted};

/// Rows per batch handed from a snapshot reader to the converting task.
const BATCH_ROWS: usize = 20_000;

/// One reader's share of the table: row versions after `after` (else from block `from`) and
/// below block `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct TidRange {
    /// Copied up to and including this (block, offset).
    after: Option<(u32, u16)>,
    /// First block, while nothing is copied yet.
    from: u64,
    /// End block, exclusive; None: to the end (rows added after the size was measured too).
    to: Option<u64>,
}

impl TidRange {
    /// SQL conditions selecting what is left of the range.
    fn conditions(&self) -> Vec<String> {
        let mut c = Vec::new();
        match self.after {
            Some((b, o)) => c.push(format!("ctid > '({b},{o})'::tid")),
            None if self.from > 0 => c.push(format!("ctid >= '({},0)'::tid", self.from)),
            None => {}
        }
        if let Some(to) = self.to {
            c.push(format!("ctid < '({to},0)'::tid"));
        }
        c
    }
}

/// `readers` equal block ranges over a table of `blocks` blocks, the last one open-ended.
fn split_blocks(readers: u64, blocks: u64) -> Vec<TidRange> {
    let readers = readers.max(1);
    (0..readers)
        .map(|r| TidRange {
            after: None,
            from: blocks * r / readers,
            to: (r + 1 < readers).then(|| blocks * (r + 1) / readers),
        })
        .collect()
}

/// A copy's committed progress (snapshot summary property `philotes.snapshot.progress`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Progress {
    /// `_cdc_lsn` of every copied row: the first snapshot's consistent point − 1.
    lsn: u64,
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
}

impl Progress {
    /// Row versions the first snapshot could see, for a copy resumed in a snapshot whose
    /// xmax is `now_xmax`; None when `xmin` cannot be compared exactly (the cluster is past
    /// its first 2^32 transaction ids, so a raw `xmin` may belong to an earlier epoch).
    fn visible_then(&self, now_xmax: u64) -> Option<String> {
        if now_xmax >= 1 << 32 {
            return None;
        }
        let mut c = format!("xmin::text::bigint < {}", self.xmax);
        if !self.xip.is_empty() {
            let list: Vec<String> = self.xip.iter().map(u64::to_string).collect();
            c.push_str(&format!(
                " AND xmin::text::bigint NOT IN ({})",
                list.join(",")
            ));
        }
        Some(c)
    }
}

/// What a snapshot reader sends: a batch of rows, or the end of its range.
enum Fetched {
    Rows(usize, Vec<Row>),
    Done(usize),
}

/// The (block, offset) of a binary `tid` value.
fn parse_tid(v: Option<&bytes::Bytes>) -> Option<(u32, u16)> {
    let b = v?;
    (b.len() == 6).then(|| {
        (
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
        )
    })
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
    ) -> Result<(), PipelineError> {
        let slot = self.cfg.slot_name();
        let publication = self.cfg.publication_name();
        let mut reader = Session::connect(url, &slot, &publication, None).await?;
        let columns = reader.relation_columns(schema, name).await?;
        let idx = self.relation(schema, name, columns.clone()).await?;
        if self.tables[idx].sink.snapshot_done() {
            return Ok(());
        }
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
        // Tables can join through the publication with any name: quote everything.
        let rel = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let rel_oid = format!("{}::regclass", quote_literal(&rel));
        let estimate: u64 = reader
            .scalar(&format!(
                "SELECT GREATEST(reltuples, 0)::bigint::text FROM pg_catalog.pg_class WHERE oid = {rel_oid}"
            ))
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // The exporting session must stay open and idle until the copy is done.
        let mut exporter = Session::connect(url, &slot, &publication, None).await?;
        // Unique per pipeline slot and process, within the 63-character limit.
        let hash = slot.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        });
        let temp = format!(
            "{}_{hash:08x}_snap_{}",
            slot.chars().take(30).collect::<String>(),
            std::process::id()
        );
        let (point, snapshot) = exporter.export_snapshot(&temp).await?;
        // Fixed-width types travel in their send form (cheaper to produce and to read than
        // text); every other column is wrapped in its output function, whose cstring result
        // is the same text a text-mode read would give.
        let binary = self.tables[idx].batch.snapshot_binary();
        let outputs = reader.output_functions(schema, name).await?;
        if outputs.len() != columns.len() {
            return Err(SourceError::Query(format!(
                "{source_name} changed while the snapshot started; it will be retried"
            ))
            .into());
        }
        let list = columns
            .iter()
            .zip(&binary)
            .zip(&outputs)
            .map(|((c, &bin), f)| {
                let col = quote_ident(&c.name);
                if bin || f.is_empty() {
                    col
                } else {
                    format!("{f}({col})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let filenode = reader
            .scalar(&format!(
                "SELECT pg_catalog.pg_relation_filenode({rel_oid})::text"
            ))
            .await?
            .unwrap_or_default();
        let (now_xmax, now_xip) = snapshot_xids(&mut reader, &snapshot).await?;
        let (mut progress, visibility) = match resumed {
            Some(mut p) => {
                tracing::info!(table = %source_name, rows_done = p.seq, "initial snapshot: resuming after the last committed chunk");
                if p.filenode != filenode {
                    // VACUUM FULL, CLUSTER or a rewriting ALTER moved every row: the recorded
                    // positions mean nothing now.
                    tracing::warn!(table = %source_name, "table was rewritten since its copy started: copying all of it again (rows copied before may appear twice as R)");
                    p.ranges = self.plan_ranges(&mut reader, &rel_oid).await?;
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
                    seq: 0,
                    xmax: now_xmax,
                    xip: now_xip,
                    filenode,
                    ranges: self.plan_ranges(&mut reader, &rel_oid).await?,
                };
                (p, None)
            }
        };
        drop(reader);
        let lsn = progress.lsn;
        tracing::info!(table = %source_name, point = %format_lsn(point), estimate, "initial snapshot: copying");
        let started = Instant::now();
        let mut last_report = Instant::now();
        let first_seq = progress.seq;
        let ts = now_micros();
        let ncols = columns.len();
        // Readers fetch ahead into a channel of a few batches (memory stays bounded) while
        // this task converts; each ends with `Done`, so a reader that vanished is noticed.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Fetched, PipelineError>>(2);
        let mut fetchers = Vec::new();
        for (r, range) in progress.ranges.iter().enumerate() {
            let mut conds = range.conditions();
            conds.extend(visibility.clone());
            let filter = if conds.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conds.join(" AND "))
            };
            // A TID range scan returns rows in ctid order: the last ctid of a batch is the
            // reader's position.
            let select = format!("SELECT {list}, ctid FROM {rel}{filter}");
            let (url, slot, publication) = (url.clone(), slot.clone(), publication.clone());
            let snapshot = snapshot.clone();
            let tx = tx.clone();
            fetchers.push(AbortOnDrop(tokio::spawn(async move {
                let result =
                    copy_range(&url, &slot, &publication, &snapshot, &select, r, &tx).await;
                let _ = tx.send(result.map(|()| Fetched::Done(r))).await;
            })));
        }
        drop(tx);
        let mut done = vec![false; progress.ranges.len()];
        let mut since_commit = 0u64;
        while let Some(msg) = rx.recv().await {
            let (r, rows) = match msg? {
                Fetched::Rows(r, rows) => (r, rows),
                Fetched::Done(r) => {
                    done[r] = true;
                    continue;
                }
            };
            let Some(tid) = rows
                .last()
                .and_then(|row| parse_tid(row.get(ncols)?.as_ref()))
            else {
                return Err(SourceError::Query(format!(
                    "{source_name}: snapshot rows without their ctid"
                ))
                .into());
            };
            for row in &rows {
                let values = &row[..ncols.min(row.len())];
                let seq = progress.seq;
                let t = &mut self.tables[idx];
                if let Err(e) = t.batch.push_snapshot("R", lsn, seq, ts, values, &binary) {
                    // Logged like a dead letter of the stream (it used not to be).
                    DeadLettered {
                        table: &source_name,
                        lsn: &crate::source::postgres::session::format_lsn(lsn),
                        seq,
                        op: "R",
                        error: &e.0,
                    }
                    .emit(&self.metrics);
                    self.dlq_rows.push(DeadLetter {
                        source_table: source_name.clone(),
                        lsn,
                        seq,
                        op: "R",
                        error: e.0,
                        row_json: snapshot_row_json(&t.columns, values, &binary),
                        time_micros: now_micros(),
                    });
                } else {
                    t.dirty = true;
                }
                ChangeReceived {
                    op: Operation::Snapshot,
                }
                .emit(&t.metrics);
                progress.seq += 1;
                since_commit += 1;
                if self.should_spill(idx) {
                    self.spill(idx).await?;
                }
            }
            // Progress is "everything up to this ctid": it only holds if rows came in order.
            let first = rows
                .first()
                .and_then(|row| parse_tid(row.get(ncols)?.as_ref()));
            if first
                .zip(progress.ranges[r].after)
                .is_some_and(|(f, a)| f <= a)
                || first > Some(tid)
            {
                return Err(SourceError::Query(format!(
                    "{source_name}: snapshot rows did not arrive in ctid order; the copy will be retried"
                ))
                .into());
            }
            progress.ranges[r].after = Some(tid);
            if since_commit >= self.cfg.snapshot_chunk_rows {
                since_commit = 0;
                let left = Progress {
                    ranges: progress
                        .ranges
                        .iter()
                        .zip(&done)
                        .filter(|(_, d)| !**d)
                        .map(|(r, _)| r.clone())
                        .collect(),
                    ..progress.clone()
                };
                let json = serde_json::to_string(&left)
                    .map_err(|e| SourceError::Query(format!("snapshot progress: {e}")))?;
                self.commit_snapshot_chunk(
                    idx,
                    lsn,
                    &[
                        (SNAPSHOT_PROPERTY, "partial"),
                        (SNAPSHOT_PROGRESS_PROPERTY, &json),
                    ],
                )
                .await?;
                tracing::info!(table = %source_name, rows = progress.seq, "initial snapshot: chunk committed");
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                last_report = Instant::now();
                let copied = progress.seq - first_seq;
                let rate = copied as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = estimate.saturating_sub(progress.seq) as f64 / rate.max(1.0);
                tracing::info!(table = %source_name, rows = progress.seq, rows_per_s = rate as u64, eta_s = eta as u64, "initial snapshot: progress");
            }
        }
        drop(fetchers);
        if done.iter().any(|d| !d) {
            return Err(SourceError::Query(format!(
                "{source_name}: a snapshot reader stopped early; the copy will resume"
            ))
            .into());
        }
        drop(exporter);
        self.commit_snapshot_chunk(idx, lsn, &[(SNAPSHOT_PROPERTY, "done")])
            .await?;
        tracing::Span::current().record("rows", progress.seq as i64);
        tracing::info!(
            table = %source_name,
            rows = progress.seq,
            seconds = started.elapsed().as_secs_f64(),
            "initial snapshot: committed"
        );
        Ok(())
    }

    /// Block ranges for a copy from the start. Several sessions read disjoint block ranges of
    /// the same snapshot (a TID range scan each, PostgreSQL 14+): the server's per-row output
    /// work, the largest part of a copy, then runs on more than one core. Every row version
    /// has exactly one ctid, so the ranges cover each visible row once.
    async fn plan_ranges(
        &self,
        reader: &mut Session,
        rel_oid: &str,
    ) -> Result<Vec<TidRange>, PipelineError> {
        let readers = match reader.server_version().await? {
            v if v >= 140_000 => self.cfg.snapshot_readers.max(1) as u64,
            _ => 1,
        };
        let blocks: u64 = reader
            .scalar(&format!(
                "SELECT (pg_catalog.pg_relation_size({rel_oid}) / \
                 pg_catalog.current_setting('block_size')::bigint)::text"
            ))
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let readers = if blocks < 64 { 1 } else { readers };
        Ok(split_blocks(readers, blocks))
    }

    /// Commit what the copy of table `idx` wrote so far, with `props` in the summary. Its
    /// dead letters are committed first: a crash between the two re-reads those rows, and
    /// their dead letters are then recognised by `(lsn, seq)` and dropped.
    async fn commit_snapshot_chunk(
        &mut self,
        idx: usize,
        lsn: u64,
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
        let span = tracing::info_span!(
            "iceberg.commit",
            table = %t.source_name,
            iceberg.table = %t.sink.name(),
            rows = rows as i64,
            lsn = %crate::source::postgres::session::format_lsn(lsn),
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::record_trace_id(&span);
        let outcome = t.sink.commit_with(lsn, props).instrument(span).await?;
        t.dirty = false;
        TableCommitted {
            source_table: &t.source_name,
            iceberg_table: t.sink.name(),
            rows,
            committed_lsn: t_committed(t),
            conflicts: outcome.conflicts,
            duration: started.elapsed(),
        }
        .emit(&t.metrics, &self.metrics, &self.status);
        Ok(())
    }
}

/// Open a read-only transaction on `session` that sees exactly the exported `snapshot`.
async fn import_snapshot(session: &mut Session, snapshot: &str) -> Result<(), PipelineError> {
    // A synchronized scan may start mid-table and wrap around; the recorded progress assumes
    // ctid order.
    session.query("SET synchronize_seqscans = off").await?;
    session
        .query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    session
        .query(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "")
        ))
        .await?;
    Ok(())
}

/// The exported snapshot's xmax and in-progress transaction ids (64-bit, with their epoch),
/// read by importing it.
async fn snapshot_xids(
    session: &mut Session,
    snapshot: &str,
) -> Result<(u64, Vec<u64>), PipelineError> {
    import_snapshot(session, snapshot).await?;
    let rows = session
        .query(
            "SELECT pg_catalog.txid_snapshot_xmax(s)::text, \
             coalesce((SELECT pg_catalog.string_agg(x::text, ',') \
                       FROM pg_catalog.txid_snapshot_xip(s) x), '') \
             FROM pg_catalog.txid_current_snapshot() s",
        )
        .await?;
    session.query("COMMIT").await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let xmax = get(0)
        .parse()
        .map_err(|_| SourceError::Query("cannot read the snapshot's xmax".into()))?;
    let xip = get(1)
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    Ok((xmax, xip))
}

/// Copy `select` inside the exported `snapshot` on a session of its own (`COPY ... TO
/// STDOUT` in binary: no round trips, rows sliced out of the received messages), into `tx`
/// in batches tagged with reader `r`.
async fn copy_range(
    url: &SourceUrl,
    slot: &str,
    publication: &str,
    snapshot: &str,
    select: &str,
    r: usize,
    tx: &tokio::sync::mpsc::Sender<Result<Fetched, PipelineError>>,
) -> Result<(), PipelineError> {
    let mut reader = Session::connect(url, slot, publication, None).await?;
    import_snapshot(&mut reader, snapshot).await?;
    let mut parser = BinaryCopy::default();
    let mut rows: Vec<Row> = Vec::with_capacity(BATCH_ROWS);
    reader
        .copy_out_start(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await?;
    while let Some(chunk) = reader.copy_out_next().await? {
        parser
            .feed(chunk, &mut rows)
            .map_err(|e| SourceError::Query(e.to_string()))?;
        if rows.len() >= BATCH_ROWS {
            let batch = std::mem::replace(&mut rows, Vec::with_capacity(BATCH_ROWS));
            if tx.send(Ok(Fetched::Rows(r, batch))).await.is_err() {
                return Ok(());
            }
        }
    }
    if !parser.finished() {
        return Err(SourceError::Query("binary COPY ended without its trailer".into()).into());
    }
    if !rows.is_empty() && tx.send(Ok(Fetched::Rows(r, rows))).await.is_err() {
        return Ok(());
    }
    reader.query("COMMIT").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_table_once() {
        let r = split_blocks(3, 100);
        assert_eq!(r[0].conditions(), vec!["ctid < '(33,0)'::tid"]);
        assert_eq!(
            r[1].conditions(),
            vec!["ctid >= '(33,0)'::tid", "ctid < '(66,0)'::tid"]
        );
        assert_eq!(r[2].conditions(), vec!["ctid >= '(66,0)'::tid"]);
        assert!(split_blocks(1, 100)[0].conditions().is_empty());
        let resumed = TidRange {
            after: Some((40, 7)),
            from: 33,
            to: Some(66),
        };
        assert_eq!(
            resumed.conditions(),
            vec!["ctid > '(40,7)'::tid", "ctid < '(66,0)'::tid"]
        );
    }

    #[test]
    fn progress_round_trips_and_filters_on_the_first_snapshot() {
        let p = Progress {
            lsn: 42,
            seq: 10,
            xmax: 900,
            xip: vec![880, 895],
            filenode: "16384".into(),
            ranges: split_blocks(2, 10),
        };
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back.ranges, p.ranges);
        assert_eq!(
            back.visible_then(1000).as_deref(),
            Some("xmin::text::bigint < 900 AND xmin::text::bigint NOT IN (880,895)")
        );
        // Past the first epoch a raw xmin may alias a recent id: no filter, nothing lost.
        assert_eq!(back.visible_then((1 << 32) + 5), None);
        assert_eq!(
            parse_tid(Some(&bytes::Bytes::from_static(&[0, 0, 1, 0, 0, 3]))),
            Some((256, 3))
        );
        assert_eq!(parse_tid(None), None);
    }
}
