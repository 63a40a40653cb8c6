//! What a pipeline does: changes received, transactions applied, flushes, commits, dead letters,
//! spools, slot lag, state changes and retries.

use std::time::Duration;

use opentelemetry::KeyValue;

use super::ErrorType;
use crate::model::Op;
use crate::telemetry::instruments::{SourceMetrics, TableMetrics};
use crate::telemetry::status::{self, RetryStatus, SharedStatus};
use crate::telemetry::PipelineState;

/// Changes for a table were received (a source transaction's, or a batch of a snapshot copy):
/// counted per transaction or batch, never per row, through a pre-bound counter.
#[derive(Debug, Clone, Copy)]
pub struct ChangeReceived {
    /// Their kind (`Read` counts as `operation="snapshot"`).
    pub op: Op,
    /// How many.
    pub count: u64,
}

impl ChangeReceived {
    /// Count them in `philotes_cdc_events_total{operation}`.
    #[inline]
    pub fn emit(self, t: &TableMetrics) {
        let c = match self.op {
            Op::Insert => &t.insert,
            Op::Update => &t.update,
            Op::Delete => &t.delete,
            Op::Truncate => &t.truncate,
            Op::Read => &t.snapshot,
        };
        c.add(self.count);
    }
}

/// One table's view of an applied source transaction.
pub struct AppliedTable<'a> {
    /// Source table (`schema.table`), the status key.
    pub name: &'a str,
    /// Its instruments.
    pub metrics: &'a TableMetrics,
    /// Whether this transaction changed it (its lag is then measured).
    pub touched: bool,
    /// Inserts, updates, deletes, truncates received so far.
    pub counts: [u64; 4],
    /// Of those, received since the last transaction's (added to `philotes_cdc_events_total`).
    pub received: [u64; 4],
}

/// A source transaction's commit was read: lag measured, the buffer's depth and the received
/// position published (once per transaction, not per row).
pub struct TransactionApplied<I> {
    /// Seconds from its commit in PostgreSQL to now.
    pub lag_seconds: f64,
    /// `X/Y` of its end.
    pub received_lsn: String,
    /// Changes buffered and not yet committed.
    pub buffered_events: u64,
    /// The pipeline's tables (an iterator walked twice: no allocation per transaction).
    pub tables: I,
}

impl<'a, I: Iterator<Item = AppliedTable<'a>> + Clone> TransactionApplied<I> {
    /// Record `philotes_cdc_lag_seconds` of the touched tables and `philotes_buffer_depth`;
    /// publish lag, position and per-table counts to the status.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        for t in self.tables.clone() {
            if t.touched {
                t.metrics.lag.record(self.lag_seconds);
            }
            // Per transaction, not per row: a counter update per row was 2-3 % of the
            // agent's CPU in a streaming profile.
            let ops = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];
            for (op, count) in ops.into_iter().zip(t.received) {
                if count > 0 {
                    ChangeReceived { op, count }.emit(t.metrics);
                }
            }
        }
        m.depth.record(self.buffered_events as i64);
        status::update(status, |s| {
            s.lag_seconds = self.lag_seconds;
            s.received_lsn = self.received_lsn;
            s.buffered_events = self.buffered_events;
            for t in self.tables {
                if let Some(e) = s.tables.get_mut(t.name) {
                    [e.inserts, e.updates, e.deletes, e.truncates] = t.counts;
                }
            }
        });
    }
}

/// The buffer was emptied or refilled outside a transaction boundary (a new attempt, a
/// paused pipeline's flush).
#[derive(Debug, Clone, Copy)]
pub struct BufferChanged {
    /// Changes buffered now.
    pub events: u64,
}

impl BufferChanged {
    /// Record `philotes_buffer_depth` and the status's `buffered_events`.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        m.depth.record(self.events as i64);
        status::update(status, |s| s.buffered_events = self.events);
    }
}

/// The spool of streamed in-progress transactions changed.
#[derive(Debug, Clone, Copy)]
pub struct SpoolChanged {
    /// In-progress transactions spooled.
    pub transactions: u64,
    /// Their bytes on disk.
    pub bytes: u64,
    /// Bytes of their rows converted ahead of the commit (in memory).
    pub converted_bytes: u64,
}

impl SpoolChanged {
    /// Record `philotes_buffer_spool_bytes`, `philotes_buffer_streamed_converted_bytes` and
    /// the status's spool fields.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        m.spool.record(self.bytes as i64);
        m.converted.record(self.converted_bytes as i64);
        status::update(status, |s| {
            s.spooled_transactions = self.transactions;
            s.spooled_bytes = self.bytes;
        });
    }
}

/// A table's pending data files were closed.
#[derive(Debug, Clone, Copy)]
pub struct FilesWritten {
    /// Files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl FilesWritten {
    /// Count `philotes_iceberg_files_written_total` and `..._bytes_written_total`.
    pub fn emit(self, t: &TableMetrics) {
        t.files.add(self.files);
        t.bytes.add(self.bytes);
    }
}

/// One table's snapshot committed: a flush's, or a chunk of an initial copy.
#[derive(Debug)]
pub struct TableCommitted<'a> {
    /// Source table (`schema.table`), the status key.
    pub source_table: &'a str,
    /// Iceberg table (`namespace.table`).
    pub iceberg_table: String,
    /// Rows the commit made visible.
    pub rows: u64,
    /// The table's committed position (`X/Y`).
    pub committed_lsn: String,
    /// Other writers' commits rebased over (each is an `error_type="commit_conflict"`).
    pub conflicts: u32,
    /// Closing the data files and committing.
    pub duration: Duration,
    /// Commit times (Unix microseconds) of the source transactions whose changes to this
    /// table the commit made visible; empty for a snapshot chunk.
    pub transactions: &'a [i64],
}

impl TableCommitted<'_> {
    /// Record `philotes_iceberg_commits_total`, the commit duration, the conflicts, the
    /// freshness of every transaction and the last commit's time; add the commit to the
    /// table's status.
    pub fn emit(self, t: &TableMetrics, m: &SourceMetrics, status: &SharedStatus) {
        for _ in 0..self.conflicts {
            m.error(ErrorType::CommitConflict);
        }
        t.commit_duration.record(self.duration.as_secs_f64());
        t.commits.add(1);
        let now = chrono::Utc::now().timestamp_micros();
        for ts in self.transactions {
            // A source clock ahead of ours would give negative ages: count them as fresh.
            t.freshness
                .record(now.saturating_sub(*ts).max(0) as f64 / 1e6);
        }
        t.last_commit.record(now as f64 / 1e6);
        status::update(status, |s| {
            let e = s.tables.entry(self.source_table.to_string()).or_default();
            e.iceberg_table = self.iceberg_table;
            e.committed_rows += self.rows;
            e.commits += 1;
            e.committed_lsn = self.committed_lsn;
            e.last_commit_at = Some(status::now_rfc3339());
        });
    }
}

/// The source changed a table's shape and its Iceberg table followed.
#[derive(Debug)]
pub struct SchemaChanged<'a> {
    /// Source table (`schema.table`, as configured).
    pub table: &'a str,
    /// `add`, `drop`, `rename`, `widen`, `replace`, `rename_table`, `key` or `partition`.
    pub kind: &'static str,
    /// What changed, for the log.
    pub detail: &'a str,
}

impl SchemaChanged<'_> {
    /// Log and count.
    pub fn emit(&self, m: &SourceMetrics) {
        m.schema_change(self.table, self.kind);
        tracing::info!(
            table = self.table,
            kind = self.kind,
            "schema change followed: {}",
            self.detail
        );
    }
}

/// A schema change gave the rows that existed before it values no change carries (a column
/// added with a default, a type change that rewrote the rows): those rows keep null there
/// until they change. Counted as the schema change it is; this says what it means for them.
pub struct StaleRowsAfterSchemaChange<'a> {
    /// Source table (`schema.table`, as configured).
    pub table: &'a str,
}

impl StaleRowsAfterSchemaChange<'_> {
    /// Log.
    pub fn emit(&self) {
        tracing::warn!(
            table = self.table,
            "a schema change gave existing rows values no change carries (a column added with a default, or a type change that rewrote the table): in Iceberg those rows have null there until they change; an UPDATE that sets the column to itself sends them, or copy the table again (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot; docs/operations.md, \"Schema changes\")"
        );
    }
}

/// A mirror table's source changed key (a primary key added, dropped or replaced, another
/// replica identity): its rows were keyed again from its files. Counted as a schema change
/// (`kind="key"`); this says what the re-keying took.
pub struct MirrorRekeyed<'a> {
    /// Iceberg table (`namespace.table`).
    pub table: &'a str,
    /// The new key columns, comma-separated (empty: none).
    pub key: &'a str,
    /// Without key columns, whether the whole row identifies a row.
    pub whole_row: bool,
    /// Rows keyed.
    pub rows: usize,
    /// Rows that repeated a newer row's key and were deleted.
    pub duplicates: u64,
    /// Rows without a value in a key column, left unkeyed.
    pub unkeyed: u64,
    /// Time spent reading the key columns back.
    pub took: std::time::Duration,
}

impl MirrorRekeyed<'_> {
    /// Log.
    pub fn emit(&self) {
        let key = match (self.key, self.whole_row) {
            ("", true) => "the whole row",
            ("", false) => "nothing (rows are appended)",
            (k, _) => k,
        };
        if self.duplicates > 0 {
            tracing::warn!(
                table = self.table,
                key,
                rows = self.rows,
                duplicates = self.duplicates,
                "mirror keyed again, and rows repeating a newer row's key were deleted: the mirror had diverged from the source"
            );
        } else if self.unkeyed > 0 {
            tracing::warn!(
                table = self.table,
                key,
                rows = self.rows,
                unkeyed = self.unkeyed,
                "mirror keyed again, but some rows have no value in the new key (PostgreSQL filled the column in without sending the rows): no change can reach them; copy the table again to replace them (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot; docs/operations.md, \"Schema changes\")"
            );
        } else {
            tracing::info!(
                table = self.table,
                key,
                rows = self.rows,
                ms = self.took.as_millis() as u64,
                "mirror keyed again: the source table's key changed"
            );
        }
    }
}

/// Partitions joined or left a streamed partitioned table. PostgreSQL moves their rows in or
/// out without publishing them: rows of a partition attached with rows never reach Iceberg,
/// those of one detached or dropped stay there.
pub struct PartitionsMoved<'a> {
    /// The partitioned table (`schema.table`).
    pub table: &'a str,
    /// Partitions attached that already had rows.
    pub attached: &'a [String],
    /// Partitions detached or dropped.
    pub left: &'a [String],
}

impl PartitionsMoved<'_> {
    /// Count each as `philotes_cdc_schema_changes_total{kind="partition"}` and say what to do.
    pub fn emit(&self, m: &SourceMetrics) {
        for p in self.attached {
            m.schema_change(self.table, "partition");
            tracing::warn!(
                table = self.table,
                partition = %p,
                "a partition with rows was attached: PostgreSQL does not publish rows that join a partitioned table this way, so they are not in its Iceberg tables; copy the table again (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot)"
            );
        }
        for p in self.left {
            m.schema_change(self.table, "partition");
            tracing::warn!(
                table = self.table,
                partition = %p,
                "a partition was detached or dropped: its rows left the table without being published and stay in its Iceberg tables; copy the table again if its mirror must not hold them (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot)"
            );
        }
    }
}

/// Why a table is copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyReason {
    /// An operator asked (`POST …/tables/{table}/snapshot`).
    Requested,
    /// The source table was dropped and created again: another relation under its name.
    Recreated,
    /// Rows of the mirror have no value in its key (a key column rewritten without WAL): no
    /// change can reach them.
    RowsWithoutKey,
}

/// A table is about to be copied again behind a truncate marker (its state is marked in its
/// Iceberg table first, so a crash does not forget it).
pub struct TableCopiedAgain<'a> {
    /// Source table (`schema.table`).
    pub table: &'a str,
    /// Why.
    pub reason: CopyReason,
}

impl TableCopiedAgain<'_> {
    /// Log it: an operator's request at INFO, a re-created table at WARN (nobody asked).
    pub fn emit(&self) {
        match self.reason {
            CopyReason::Requested => tracing::info!(
                table = self.table,
                "copying the table again, as requested: a truncate marker, then every row as of a new snapshot"
            ),
            CopyReason::Recreated => tracing::warn!(
                table = self.table,
                "the table was dropped and created again (another relation under its name): copying it again behind a truncate marker; its earlier rows stay in the changelog's history"
            ),
            CopyReason::RowsWithoutKey => tracing::warn!(
                table = self.table,
                "rows of the mirror have no value in its key (PostgreSQL rewrote a key column without sending the rows): copying the table again behind a truncate marker, once per start of the agent"
            ),
        }
    }
}

/// A configured table is no longer published: dropped (and maybe created again, which is
/// another relation), or removed from the publication. Nothing in the stream says so.
pub struct TableLeftPublication<'a> {
    /// Source table (`schema.table`, as the pipeline found it at start).
    pub table: &'a str,
    /// The pipeline's publication.
    pub publication: &'a str,
}

impl TableLeftPublication<'_> {
    /// Log and count (`error_type="config"`).
    pub fn emit(&self, m: &SourceMetrics) {
        m.error(ErrorType::Config);
        tracing::warn!(
            table = self.table,
            publication = self.publication,
            "the table the pipeline streams is no longer published (dropped, perhaps created again, or removed from the publication): its changes from now on are not streamed, and its Iceberg tables keep the rows it had; a table created again under its name is copied again by itself, one removed from the publication is added back at the next restart (docs/operations.md, \"A table dropped or removed from the publication\")"
        );
    }
}

/// The pipeline's publication stopped publishing an operation while the agent streams
/// (`ALTER PUBLICATION … SET (publish = …)`): PostgreSQL decodes nothing of it from then on,
/// and nothing in the stream says so.
pub struct PublicationLeavesOut<'a> {
    /// The pipeline's publication.
    pub publication: &'a str,
    /// What it leaves out, and the fix.
    pub reason: &'a str,
}

impl PublicationLeavesOut<'_> {
    /// Log and count (`error_type="config"`).
    pub fn emit(&self, m: &SourceMetrics) {
        m.error(ErrorType::Config);
        tracing::warn!(
            publication = self.publication,
            "the publication no longer publishes every operation ({}): the changes it leaves out are not streamed and never will be; once it is fixed, copy the tables changed meanwhile again (docs/operations.md, \"Copying a table again\")",
            self.reason
        );
    }
}

/// A mirror table holds rows without a value in a key column (PostgreSQL filled the column
/// in without sending the rows: a column added with a default, or rewritten by a type change,
/// then the key): no change can name them, and its compaction is off so as not to drop them.
pub struct MirrorRowsWithoutKey<'a> {
    /// Iceberg table (`namespace.table`).
    pub table: &'a str,
    /// Such rows.
    pub rows: u64,
}

impl MirrorRowsWithoutKey<'_> {
    /// Log.
    pub fn emit(&self) {
        tracing::warn!(
            table = self.table,
            rows = self.rows,
            "mirror rows without a value in the key (PostgreSQL filled the column in without sending the rows): no change can reach them and the table's compaction is off; copy the table again (POST /api/v1/pipelines/{{name}}/tables/{{table}}/snapshot; docs/operations.md, \"Schema changes\")"
        );
    }
}

/// A mirror table committed: its position deletes and its key index after the commit.
#[derive(Debug)]
pub struct MirrorCommitted {
    /// Position delete files the commit added.
    pub delete_files: u64,
    /// Rows they delete.
    pub rows_deleted: u64,
    /// Keys in the index.
    pub index_keys: u64,
    /// Bytes the index holds.
    pub index_bytes: u64,
}

impl MirrorCommitted {
    /// Record the delete counters and the index gauges.
    pub fn emit(&self, t: &TableMetrics) {
        t.delete_files_written.add(self.delete_files);
        t.rows_deleted.add(self.rows_deleted);
        t.index_keys.record(self.index_keys);
        t.index_bytes.record(self.index_bytes);
    }
}

/// A flush committed every dirty table (and the dead letters) at one source position.
#[derive(Debug)]
pub struct BatchCommitted {
    /// Rows committed to the tables.
    pub rows: u64,
    /// Rows committed to the dead-letter table.
    pub dead_letters: usize,
    /// The position (`X/Y`).
    pub lsn: String,
    /// Whether the batch had failed before (a retry's replay).
    pub retried: bool,
}

impl BatchCommitted {
    /// Log the flush (inside its span, so the line carries the trace id), count the batch and
    /// its events, empty the buffer's depth and publish the committed position.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        tracing::info!(
            rows = self.rows,
            dead_letters = self.dead_letters,
            lsn = %self.lsn,
            "flush committed"
        );
        m.batches_committed.add(1);
        if self.retried {
            m.batches_retried.add(1);
        }
        m.events_processed.add(self.rows);
        m.depth.record(0);
        status::update(status, |s| {
            s.committed_lsn = self.lsn;
            s.buffered_events = 0;
        });
    }
}

/// A flush failed; its error goes to the retry loop, which logs and counts it by type.
#[derive(Debug, Clone, Copy)]
pub struct BatchFailed;

impl BatchFailed {
    /// Count `philotes_buffer_batches_total{status="failed"}`.
    pub fn emit(self, m: &SourceMetrics) {
        m.batches_failed.add(1);
    }
}

/// A row that could not be converted went to the dead-letter table (streaming or copying).
#[derive(Debug)]
pub struct DeadLettered<'a> {
    /// Source table (`schema.table`).
    pub table: &'a str,
    /// Commit LSN of its transaction (`X/Y`), or the copy's snapshot point.
    pub lsn: &'a str,
    /// Its position in the transaction (or the copy).
    pub seq: u64,
    /// Its change.
    pub op: Op,
    /// Why it could not be converted.
    pub error: &'a str,
}

impl DeadLettered<'_> {
    /// Log and count it (`philotes_buffer_dlq_total`, `error_type="conversion"`).
    pub fn emit(&self, m: &SourceMetrics) {
        tracing::warn!(
            table = self.table,
            lsn = self.lsn,
            seq = self.seq,
            op = self.op.code(),
            "dead letter: {}",
            self.error
        );
        m.dlq.add(1);
        m.error(ErrorType::Conversion);
    }
}

/// The pipeline moved to another state.
#[derive(Debug, Clone, Copy)]
pub struct StateChanged {
    /// The new state.
    pub state: PipelineState,
}

impl StateChanged {
    /// Record `philotes_cdc_pipeline_state` and the status's state (a pending retry is
    /// forgotten once the pipeline is anything but retrying).
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        m.state.record(self.state as i64);
        status::update(status, |s| {
            s.state = self.state;
            if self.state != PipelineState::Retrying {
                s.retry = None;
            }
        });
    }
}

/// An attempt failed; the next one is scheduled.
#[derive(Debug)]
pub struct PipelineRetrying<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// What failed.
    pub error_type: ErrorType,
    /// The error, already scrubbed of secrets.
    pub message: String,
    /// Failures in a row, this one included.
    pub attempt: u32,
    /// Until the next attempt.
    pub delay: Duration,
}

impl PipelineRetrying<'_> {
    /// Log it (one ERROR for a new failure, then warnings, so a log alert fires once and the
    /// log does not read as if each was final), count `philotes_cdc_errors_total` and
    /// `philotes_cdc_retries_total`, and set the state to retrying with the retry's details.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        let retry_in =
            humantime::format_duration(Duration::from_millis(self.delay.as_millis() as u64));
        let (pipeline, error_type, attempt, msg) =
            (self.pipeline, self.error_type, self.attempt, &self.message);
        if attempt == 1 {
            tracing::error!(pipeline = %pipeline, error_type = error_type.as_str(), attempt, "pipeline failed, retrying in {retry_in}: {msg}");
        } else {
            tracing::warn!(pipeline = %pipeline, error_type = error_type.as_str(), attempt, "pipeline still failing (attempt {attempt}), retrying in {retry_in}: {msg}");
        }
        m.error(error_type);
        m.retries.add(1);
        let next = chrono::Utc::now()
            + chrono::Duration::from_std(self.delay).unwrap_or(chrono::Duration::zero());
        StateChanged {
            state: PipelineState::Retrying,
        }
        .emit(m, status);
        status::update(status, |st| {
            st.last_error = Some(self.message);
            st.last_error_at = Some(status::now_rfc3339());
            st.retry = Some(RetryStatus {
                attempt,
                next_attempt_at: next.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                error_type,
            });
        });
    }
}

/// The slot's retained WAL was measured.
#[derive(Debug, Clone, Copy)]
pub struct SlotLagMeasured<'a> {
    /// Slot name.
    pub slot: &'a str,
    /// WAL bytes the slot retains.
    pub retained_bytes: i64,
    /// `max_slot_lag_bytes`, if set.
    pub max: Option<u64>,
    /// Whether the previous measurement was already over the limit.
    pub was_over: bool,
}

impl SlotLagMeasured<'_> {
    /// Record `philotes_cdc_slot_lag_bytes` and the status; crossing the limit logs an ERROR
    /// and counts `error_type="slot_lag"` once. Returns whether it is over the limit now.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) -> bool {
        m.slot_lag.record(self.retained_bytes);
        let over = self.max.is_some_and(|max| self.retained_bytes as u64 > max);
        if over && !self.was_over {
            tracing::error!(
                slot = self.slot,
                retained_bytes = self.retained_bytes,
                max_slot_lag_bytes = self.max,
                "replication slot retains more WAL than max_slot_lag_bytes; the pipeline is not keeping up (or is paused) and the source disk may fill"
            );
            m.error(ErrorType::SlotLag);
        }
        status::update(status, |s| {
            s.slot_lag_bytes = Some(self.retained_bytes);
            s.slot_lag_exceeded = over;
        });
        over
    }
}

/// `[ha]`: another agent leads this pipeline; this one waits.
#[derive(Debug, Clone, Copy)]
pub struct StandingBy<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// The leader's session (its PostgreSQL backend pid), if seen.
    pub leader_pid: Option<i32>,
}

impl StandingBy<'_> {
    /// Log it and set the state to standby.
    pub fn emit(self, m: &SourceMetrics, status: &SharedStatus) {
        tracing::info!(pipeline = %self.pipeline, leader_pid = self.leader_pid, "another agent leads this pipeline: standing by");
        StateChanged {
            state: PipelineState::Standby,
        }
        .emit(m, status);
    }
}

/// `[ha]`: this agent took the pipeline's leadership.
#[derive(Debug, Clone, Copy)]
pub struct LeadershipTaken<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Whether it waited as standby first (a takeover, not a first start).
    pub after_standby: bool,
}

impl LeadershipTaken<'_> {
    /// Log it and count `philotes_ha_takeovers_total`.
    pub fn emit(self, m: &SourceMetrics) {
        if self.after_standby {
            tracing::warn!(pipeline = %self.pipeline, "leader gone: this agent takes over the pipeline");
        } else {
            tracing::info!(pipeline = %self.pipeline, "this agent leads the pipeline");
        }
        m.takeovers.add(1);
    }
}

/// A leader's session a standby may terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderSession {
    /// The session holding the leadership lock (the leader itself).
    Lock,
    /// A walsender still streaming from the slot after the lock changed hands.
    Walsender,
}

/// `[ha]`: a leader that stopped answering (or a stale consumer of the slot) was cut off.
#[derive(Debug, Clone, Copy)]
pub struct LeaderDeposed<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// The terminated backend.
    pub pid: i32,
    /// Which of the leader's sessions it was.
    pub session: LeaderSession,
    /// How long it had been silent, when known.
    pub silent: Option<Duration>,
}

impl LeaderDeposed<'_> {
    /// Log it and count `philotes_ha_leaders_deposed_total` (a leader's session, not its
    /// lingering walsender, counts).
    pub fn emit(self, m: &SourceMetrics) {
        let what = match self.session {
            LeaderSession::Lock => "lock",
            LeaderSession::Walsender => "walsender",
        };
        tracing::warn!(pipeline = %self.pipeline, pid = self.pid, silent_seconds = self.silent.map(|d| d.as_secs_f64()), "terminating the {what} session of a silent leader");
        if self.session == LeaderSession::Lock {
            m.deposed.add(1);
        }
    }
}

/// The server could not decode a transaction it streamed in progress: the pipeline asks
/// for whole transactions for a while.
#[derive(Debug)]
pub struct InProgressStreamingOff<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// The server's error.
    pub reason: &'a str,
    /// For how long, in seconds.
    pub for_secs: u64,
}

impl InProgressStreamingOff<'_> {
    /// Log it (WARN); the failed attempt is counted by [`PipelineRetrying`].
    pub fn emit(self) {
        tracing::warn!(pipeline = %self.pipeline, reason = %self.reason, for_secs = self.for_secs, "the server failed to decode a transaction streamed in progress: receiving whole transactions at their commit for a while, then in progress again (large transactions meanwhile wait on the server's disk, not in the spool)");
    }
}

/// The wait after [`InProgressStreamingOff`] ended: the pipeline reconnects at a transaction
/// boundary and receives transactions in progress again.
#[derive(Debug)]
pub struct InProgressStreamingOn<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
}

impl InProgressStreamingOn<'_> {
    /// Log it (INFO); the API's `in_progress` shows the mode of the running attempt.
    pub fn emit(self) {
        tracing::info!(pipeline = %self.pipeline, "receiving transactions in progress again");
    }
}

/// `[ha]`: this agent stops leading (its lock session was lost, or a commit was fenced).
#[derive(Debug)]
pub struct LeadershipLost<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Why.
    pub reason: &'a str,
}

impl LeadershipLost<'_> {
    /// Log it (WARN).
    pub fn emit(self) {
        tracing::warn!(pipeline = %self.pipeline, "stepping down: {}", self.reason);
    }
}

/// A commit was refused because another agent committed to the table first.
#[derive(Debug)]
pub struct CommitFenced<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Iceberg table.
    pub table: &'a str,
    /// What moved.
    pub reason: &'a str,
}

impl CommitFenced<'_> {
    /// Log it (ERROR: two agents believed they led), count
    /// `philotes_ha_fenced_commits_total{table}` and `philotes_cdc_errors_total{error_type="fenced"}`.
    pub fn emit(self, m: &SourceMetrics) {
        tracing::error!(pipeline = %self.pipeline, table = %self.table, "commit fenced: another agent committed to the table first ({}); nothing of this batch was committed", self.reason);
        m.metrics.ha_fenced.add(
            1,
            &[
                KeyValue::new("source", m.name.to_string()),
                KeyValue::new("table", self.table.to_string()),
            ],
        );
        m.error(ErrorType::Fenced);
    }
}
