//! The apply loop: the one place that owns replication state (received / committed / confirmed
//! LSN), turns pgoutput messages into buffered rows, flushes at transaction boundaries and
//! acknowledges only what every table has committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::Instrument;

use super::batch::{BatchError, TableBatch, PG_EPOCH_OFFSET_MICROS};
use super::dlq::{self, DeadLetter};
use super::position::{already_committed, Positions};
use super::status::{self, SharedStatus};
use super::{Control, PipelineError};

mod again;
mod columns;
mod partitions;
mod relation;
mod snapshot;
mod streamed;
use crate::config::PipelineConfig;
use crate::model::{Lsn, Op};
use crate::sink::iceberg::commit::Committer;
use crate::sink::iceberg::schema::{dlq_schema, DLQ_TABLE};
use crate::sink::iceberg::table::{Committed, TableOptions};
use crate::sink::iceberg::{SinkError, TableSink};
use crate::source::postgres::ddl;
use crate::source::postgres::pgoutput::{self, Message, RelationColumn, StreamMessage, TupleData};
use crate::source::postgres::session::{Session, SourceError};
use crate::source::postgres::wire::replication::{ReplEvent, ReplicationStream};
use crate::telemetry::events::{
    AppliedTable, BatchCommitted, BatchFailed, DeadLettered, FilesWritten, MirrorCommitted,
    SpoolChanged, TableCommitted, TableMaintained, TransactionApplied,
};
use crate::telemetry::{commit_span, record_trace_id, PipelineState, SourceMetrics, TableMetrics};
use columns::{as_fields, binary_oid};

/// A configured table being streamed.
struct TableState {
    /// `schema.table` in the source, as configured (its Iceberg table, its metric labels).
    source_name: String,
    /// What the source calls it now (another name after `ALTER TABLE … RENAME`).
    current: String,
    /// The changelog table (the mirror in `mode = "mirror"`): batches are built in its
    /// schema, and its `philotes.lsn` is where a replay starts.
    sink: TableSink,
    /// The mirror table beside the changelog (`mode = "both"`); committed first, so that its
    /// `philotes.lsn` is never behind the changelog's.
    mirror: Option<TableSink>,
    batch: TableBatch,
    columns: Vec<RelationColumn>,
    metrics: TableMetrics,
    /// Rows buffered or written since the last commit.
    dirty: bool,
    /// Transaction (commit LSN) that last touched the table, for the lag gauge.
    touched_in: Lsn,
    /// Commit times (Unix µs) of the transactions that changed the table since its last
    /// commit, for the freshness histogram; at most one per buffered row (`batch_rows`).
    fresh: Vec<i64>,
    /// Changes read: inserts, updates, deletes, truncates (published with the status).
    counts: [u64; 4],
    /// `counts` as last added to `philotes_cdc_events_total`: the counter moves once per
    /// source transaction, not per row.
    counted: [u64; 4],
    /// REPLICA IDENTITY FULL: the positions of the key columns (empty: the whole row is the
    /// identity). Every UPDATE then sends the old row.
    full_identity: Option<Vec<usize>>,
    /// Copied in this attempt (its rows are as of the copy's point).
    copied: bool,
    /// A Relation message of it was streamed in this attempt: a later one was sent after a
    /// change of the table (the first may be from before one the catalog already shows).
    relation_streamed: bool,
    /// Its schema waits for its first Relation message (`columns` are the catalog's, which
    /// the schema may not follow yet).
    pending: bool,
    /// Its rows are built through an older schema (a replayed Relation message older than a
    /// committed schema change): the next Relation message is followed in full.
    replayed_shape: bool,
    /// Batch column → mirror field renames while the mirror places a replayed relation
    /// through another schema than the changelog does (empty otherwise).
    mirror_names: Vec<(String, String)>,
}

/// The transaction being received.
#[derive(Debug, Clone, Copy)]
struct Txn {
    lsn: Lsn,
    ts_micros: i64,
    seq: u64,
}

pub(super) struct Applier {
    cfg: PipelineConfig,
    namespace: String,
    committer: Committer,
    secrets: Arc<[String]>,
    /// Properties of the tables this pipeline creates (metadata hygiene).
    options: TableOptions,
    metrics: SourceMetrics,
    status: SharedStatus,
    /// Relation OID → index into `tables` (None: not a configured table).
    relations: HashMap<u32, Option<usize>>,
    tables: Vec<TableState>,
    dlq_sink: Option<TableSink>,
    dlq_rows: Vec<DeadLetter>,
    txn: Option<Txn>,
    /// Received and confirmed positions, and what may be confirmed.
    positions: Positions,
    /// When the oldest uncommitted change arrived.
    oldest: Option<Instant>,
    buffered_events: u64,
    /// The previous attempt failed: the first flush of this one is a retried batch.
    retrying: bool,
    /// Tables that joined the publication but are no longer in it: streamed, not copied.
    no_copy: std::collections::HashSet<String>,
    /// In-progress transactions streamed by the server (protocol 2), by top-level xid.
    streams: HashMap<u32, streamed::Streamed>,
    /// Inside a stream block of this transaction.
    in_stream: Option<u32>,
    /// Bytes of the streamed transactions' rows converted ahead of their commit.
    early_held: u64,
    /// When the last flush ended, and the last idle mirror compaction step ran.
    last_flush: Instant,
    last_idle_step: Instant,
    /// Tables with REPLICA IDENTITY FULL (`schema.table`) and their primary key columns.
    full_identity: HashMap<String, Vec<String>>,
    /// A connection for catalog lookups (column numbers, domains), opened on first use and
    /// closed at the next flush.
    catalog: Option<Session>,
    /// Tables renamed in the source: their name now → the name they are configured under.
    aliases: HashMap<String, String>,
    /// The streamed tables' OIDs at the start of this attempt → their names then: a first
    /// Relation under another name is a rename made since, not a new table.
    started_as: HashMap<u32, String>,
    /// The stream sends values in binary (`binary 'true'`).
    binary: bool,
    /// This attempt receives whole transactions because the server failed to decode one in
    /// progress; from then on it ends at the next transaction boundary, so that the next
    /// attempt receives them in progress again.
    in_progress_again: Option<Instant>,
    /// Tables copied again because mirror rows lacked a key value, in this process: not
    /// again (a copy that leaves such rows would otherwise loop).
    healed: std::collections::HashSet<String>,
    /// Each table's columns as of the last DDL message streamed in this attempt (by OID).
    ddl_shapes: HashMap<u32, Vec<ddl::DdlColumn>>,
}

/// Dead-letter table property per source table: the newest `lsn:seq` stored for it.
const DLQ_FLOOR_PREFIX: &str = "philotes.dlq.";

/// Writers (tables with open data files) kept open at once, besides the one being fed.
const MAX_OPEN_WRITERS: usize = 4;
/// Most rows a builder holds before its batch goes to the writer task. Three batches are in
/// flight (being built, queued, being encoded), so their size is the agent's working set: at
/// 65,536 rows a snapshot's peak RSS was ~10 MB higher and varied with the allocator's
/// history (docs/performance.md, session 19).
const SPILL_ROWS: u64 = 16_384;
/// Most builder bytes before its batch goes to the writer task.
const SPILL_BYTES: u64 = 2 << 20;
/// Rows per batch a transaction streamed in progress holds until its commit. Larger than a
/// spill: these batches stay in memory, and at the spill's size their per-batch overhead
/// raised the bench's single-transaction peaks by 10–30 MB (session 19).
const SEAL_ROWS: u64 = 65_536;
/// Bytes per batch a transaction streamed in progress holds until its commit.
const SEAL_BYTES: u64 = 8 << 20;

/// A change's place in a table's `[inserts, updates, deletes, truncates]` counts.
fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate | Op::Read => 3,
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn pg_ts_to_unix(ts: i64) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

fn t_committed(t: &TableState) -> String {
    t.sink.last_lsn.pg()
}

pub use crate::model::iceberg_table_name;

impl Applier {
    pub(super) fn new(
        cfg: &PipelineConfig,
        committer: Committer,
        secrets: Arc<[String]>,
        options: TableOptions,
        metrics: SourceMetrics,
        status: SharedStatus,
    ) -> Self {
        // A new attempt starts with no spools (the server streams open transactions again).
        SpoolChanged {
            transactions: 0,
            bytes: 0,
            converted_bytes: 0,
        }
        .emit(&metrics, &status);
        Self {
            namespace: cfg.namespace_name(),
            cfg: cfg.clone(),
            committer,
            secrets,
            options,
            metrics,
            status,
            relations: HashMap::new(),
            tables: Vec::new(),
            dlq_sink: None,
            dlq_rows: Vec::new(),
            txn: None,
            positions: Positions::new(Lsn::ZERO),
            oldest: None,
            buffered_events: 0,
            retrying: false,
            no_copy: Default::default(),
            streams: HashMap::new(),
            in_stream: None,
            early_held: 0,
            last_flush: Instant::now(),
            last_idle_step: Instant::now(),
            full_identity: HashMap::new(),
            catalog: None,
            aliases: HashMap::new(),
            started_as: HashMap::new(),
            binary: false,
            in_progress_again: None,
            healed: Default::default(),
            ddl_shapes: HashMap::new(),
        }
    }

    /// The stream sends values in binary: every relation must be readable so.
    pub(super) fn set_binary(&mut self, binary: bool) {
        self.binary = binary;
    }

    /// End this attempt at the first transaction boundary after `at` (see
    /// [`Applier::in_progress_again`]).
    pub(super) fn set_in_progress_again(&mut self, at: Option<Instant>) {
        self.in_progress_again = at;
    }

    /// Tables renamed in the source before this attempt: their name now → as configured.
    pub(super) fn set_aliases(&mut self, aliases: HashMap<String, String>) {
        self.aliases = aliases;
    }

    /// The streamed tables' OIDs as this attempt starts, with their names then.
    pub(super) fn set_started_as(&mut self, started_as: HashMap<u32, String>) {
        self.started_as = started_as;
    }

    /// The position a schema change is recorded at: the transaction being received, else the
    /// last one.
    fn change_lsn(&self) -> Lsn {
        self.txn.map_or(self.positions.last().lsn, |t| t.lsn)
    }

    /// The slot's confirmed position as this attempt starts: the source sends no transaction
    /// before it again.
    pub(super) fn start_from(&mut self, confirmed: Lsn) {
        // The stream starts again from here: what an earlier attempt read is of later points.
        self.ddl_shapes.clear();
        self.confirmed(confirmed);
    }

    /// The source will not send again what is before `lsn`: the position and every table
    /// (whose next commit drops the schema-change entries of before it) know it.
    fn confirmed(&mut self, lsn: Lsn) {
        self.positions.confirm(lsn);
        for t in &mut self.tables {
            t.sink.set_confirmed(lsn);
            if let Some(m) = t.mirror.as_mut() {
                m.set_confirmed(lsn);
            }
        }
    }

    /// The tables with REPLICA IDENTITY FULL and their primary keys (from the source).
    pub(super) fn set_full_identity(&mut self, tables: HashMap<String, Vec<String>>) {
        self.full_identity = tables;
    }

    fn buffered_rows(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.batch.rows() as u64 + t.sink.pending_rows())
            .sum::<u64>()
            + self.dlq_rows.len() as u64
    }

    /// Bytes in the Arrow builders (in memory).
    fn builder_bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.batch.bytes() as u64).sum()
    }

    /// Bytes not yet committed: in the builders and handed to the data-file writers.
    fn buffered_bytes(&self) -> u64 {
        self.builder_bytes()
            + self
                .tables
                .iter()
                .map(|t| t.sink.pending_bytes())
                .sum::<u64>()
    }

    /// Whether table `i`'s builders should go to its writer now. Batches stay small (the
    /// writer appends them to the same files), so memory in flight is a few small batches.
    fn should_spill(&self, i: usize) -> bool {
        let t = &self.tables[i];
        t.batch.rows() as u64 >= self.cfg.batch_rows.min(SPILL_ROWS)
            || t.batch.bytes() as u64 >= self.cfg.batch_bytes.min(SPILL_BYTES)
            || self.builder_bytes() + self.early_held >= self.cfg.max_buffer_bytes
    }

    fn anything_uncommitted(&self) -> bool {
        self.buffered_events > 0 || self.tables.iter().any(|t| t.dirty) || !self.dlq_rows.is_empty()
    }

    /// Stream until shutdown; returns Err on any failure (the caller reconnects).
    pub(super) async fn stream(
        &mut self,
        mut client: ReplicationStream,
        control: &mut watch::Receiver<Control>,
        shutdown: &mut watch::Receiver<bool>,
        lost: &mut watch::Receiver<bool>,
        copies: &mut watch::Receiver<u64>,
        set_state: &(dyn Fn(PipelineState) + Sync),
    ) -> Result<(), PipelineError> {
        let tick = (self.cfg.flush_interval / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set for the moment the oldest buffered change reaches `flush_interval` (between
        // transactions): the tick alone committed up to a quarter of the interval late, and
        // every commit's freshness carried that delay.
        let due = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(due);
        let mut armed: Option<Instant> = None;
        let mut paused = false;
        let mut stopping = false;
        let mut stop_deadline: Option<Instant> = None;
        // A table to copy again: the attempt ends at the next transaction boundary, after a
        // flush, and the next one copies it before streaming.
        let mut copy_wanted = false;
        // Whole transactions for long enough: the attempt ends like a copy's, at a boundary.
        let mut again_wanted = false;
        let mut bell_open = true;
        loop {
            // `[ha]`: a leader that lost its lease stops here, committing nothing more.
            if *lost.borrow() {
                return Err(PipelineError::LeadershipLost);
            }
            if (copy_wanted || again_wanted) && self.txn.is_none() && !*shutdown.borrow() {
                if self.anything_uncommitted() {
                    self.flush(&client).await?;
                }
                client.stop().await;
                return Err(if copy_wanted {
                    PipelineError::CopyAgain
                } else {
                    PipelineError::InProgressAgain
                });
            }
            let want_pause = *control.borrow() == Control::Pause;
            if *shutdown.borrow() && !stopping {
                stopping = true;
                stop_deadline = Some(Instant::now() + Duration::from_secs(10));
            }
            // Pausing and stopping wait for the open transaction to end, then flush.
            if (want_pause || stopping) && self.txn.is_none() {
                if self.anything_uncommitted() {
                    self.flush(&client).await?;
                }
                if stopping {
                    client.stop().await;
                    return Ok(());
                }
                if !paused {
                    paused = true;
                    set_state(PipelineState::Paused);
                    tracing::info!(pipeline = %self.cfg.name, "paused");
                }
                tokio::select! {
                    _ = control.changed() => {}
                    _ = shutdown.changed() => {}
                    r = copies.changed(), if bell_open => match r {
                        Ok(()) => copy_wanted = true,
                        Err(_) => bell_open = false,
                    },
                }
                continue;
            }
            if stopping && stop_deadline.is_some_and(|d| Instant::now() > d) {
                // The open transaction did not end in time: leave it to the slot.
                tracing::warn!(pipeline = %self.cfg.name, "stopping inside a transaction; it will be re-read on restart");
                client.stop().await;
                return Ok(());
            }
            if paused && !want_pause {
                paused = false;
                set_state(PipelineState::Streaming);
                tracing::info!(pipeline = %self.cfg.name, "resumed");
            }
            let want = self
                .oldest
                .filter(|_| self.txn.is_none())
                .map(|t| t + self.cfg.flush_interval);
            if want != armed {
                armed = want;
                if let Some(at) = want {
                    due.as_mut().reset(at.into());
                }
            }
            // The timer first: a batch that is due is committed before the next message is
            // read (or the stream's end is seen), so a steady stream cannot starve the flush
            // and a leader resumed after a stall commits, or is fenced, before anything else.
            tokio::select! {
                biased;
                _ = &mut due, if armed.is_some() => {
                    armed = None;
                    if self.flush_due() {
                        self.flush(&client).await?;
                    }
                }
                _ = timer.tick() => {
                    again_wanted |= self.in_progress_again.is_some_and(|at| Instant::now() >= at);
                    if self.flush_due() {
                        self.flush(&client).await?;
                    } else {
                        self.compact_idle_mirrors().await;
                    }
                }
                ev = client.recv() => {
                    match ev {
                        Ok(Some(ev)) => {
                            self.on_event(ev, &client).await?;
                            // The rest of the same socket read directly: a select per
                            // message polled five futures and registered their wakers.
                            for _ in 0..DRAIN_EVENTS {
                                let Some(ev) = client.try_recv() else { break };
                                self.on_event(ev, &client).await?;
                            }
                        }
                        Ok(None) => return Err(PipelineError::StreamEnded("server closed the stream".into())),
                        Err(e) => return Err(PipelineError::StreamEnded(e.to_string())),
                    }
                }
                _ = control.changed() => {}
                _ = shutdown.changed() => {}
                _ = lost.changed() => {}
                r = copies.changed(), if bell_open && !copy_wanted => match r {
                    Ok(()) => copy_wanted = true,
                    Err(_) => bell_open = false,
                },
            }
        }
    }

    async fn on_event(
        &mut self,
        ev: ReplEvent,
        client: &ReplicationStream,
    ) -> Result<(), PipelineError> {
        let data = match ev {
            ReplEvent::KeepAlive { wal_end } => {
                self.idle_point(client, Lsn(wal_end));
                return Ok(());
            }
            ReplEvent::XLogData { data, .. } => data,
        };
        if let Some(m) = pgoutput::decode_stream(&data).map_err(SourceError::from)? {
            return self.on_stream(m, client).await;
        }
        if let Some(xid) = self.in_stream {
            if pgoutput::is_origin(&data) {
                // The replication origin of a streamed transaction (after its Stream Start,
                // without an xid): nothing we store.
                return Ok(());
            }
            return self.on_streamed_change(xid, &data).await;
        }
        let msg = pgoutput::decode(&data).map_err(SourceError::from)?;
        match msg {
            Message::Begin {
                final_lsn,
                commit_ts,
                ..
            } => {
                self.txn = Some(Txn {
                    lsn: final_lsn,
                    ts_micros: pg_ts_to_unix(commit_ts),
                    seq: 0,
                });
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                self.on_commit(commit_lsn, end_lsn, commit_ts, client)
                    .await?
            }
            Message::LogicalMessage {
                transactional: false,
                lsn,
                ..
            } => {
                // Heartbeats (ours or anyone's): like a keepalive, a safe point to confirm when idle.
                self.idle_point(client, lsn);
            }
            other => self.on_message(other).await?,
        }
        Ok(())
    }

    /// The server has sent everything before `lsn`: when nothing of ours is in flight,
    /// confirm it so an idle slot does not retain WAL.
    fn idle_point(&mut self, client: &ReplicationStream, lsn: Lsn) {
        if let Some(lsn) =
            self.positions
                .idle_point(lsn, self.txn.is_some(), self.anything_uncommitted())
        {
            self.confirm(client, lsn);
        }
    }

    async fn on_commit(
        &mut self,
        lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
        client: &ReplicationStream,
    ) -> Result<(), PipelineError> {
        let ts = pg_ts_to_unix(commit_ts);
        let lag = ((now_micros() - ts) as f64 / 1e6).max(0.0);
        self.txn = None;
        self.positions.received(lsn, end_lsn);
        self.publish(lag, lsn, end_lsn);
        if !self.anything_uncommitted() {
            // Nothing of ours in flight: everything up to here is durable by definition.
            self.ack(client);
        } else if self.should_flush() {
            self.flush(client).await?;
        }
        Ok(())
    }

    /// The error only: the retry loop counts it (`error_type="spool"`), once per attempt.
    fn spool_error(&self, e: std::io::Error) -> PipelineError {
        PipelineError::Spool(e.to_string())
    }

    /// Publish how many in-progress transactions are spooled, their bytes, and the bytes of
    /// their rows converted ahead of the commit.
    fn publish_spools(&mut self) {
        self.early_held = self.streams.values().map(|s| s.early_bytes()).sum();
        SpoolChanged {
            transactions: self.streams.len() as u64,
            bytes: self.streams.values().map(|s| s.spool_bytes()).sum(),
            converted_bytes: self.early_held,
        }
        .emit(&self.metrics, &self.status);
    }

    /// A change of in-progress transaction `xid`: spooled until the server says how the
    /// transaction ended, and converted now while that is possible (see `streamed`).
    async fn on_streamed_change(&mut self, xid: u32, data: &[u8]) -> Result<(), PipelineError> {
        let (subxid, parts) = pgoutput::split_streamed(data).map_err(SourceError::from)?;
        let Some(mut s) = self.streams.remove(&xid) else {
            return Err(PipelineError::StreamEnded(format!(
                "change of streamed transaction {xid} outside its stream"
            )));
        };
        let before = s.early_bytes();
        let converted = if s.converting() {
            self.convert_early(&mut s, parts[0], parts[1]).await
        } else {
            Ok(false)
        };
        self.early_held = self.early_held.saturating_sub(before) + s.early_bytes();
        let converted = match converted {
            Ok(c) => c,
            Err(e) => {
                self.streams.insert(xid, s);
                return Err(e);
            }
        };
        if !converted && s.converting() {
            tracing::debug!(
                xid,
                converted = s.converted(),
                early_bytes = s.early_bytes(),
                "streamed transaction: the rest is converted at its commit"
            );
            // Before the push: the replay starts with this change.
            s.stop();
        }
        let pushed = s.push(subxid, &parts);
        self.streams.insert(xid, s);
        pushed.map_err(|e| self.spool_error(e))
    }

    /// Convert one streamed change into the transaction's early rows; false when it cannot
    /// be taken now (the replay at the commit takes it and everything after it).
    async fn convert_early(
        &mut self,
        s: &mut streamed::Streamed,
        tag: &[u8],
        body: &[u8],
    ) -> Result<bool, PipelineError> {
        let Some(&tag) = tag.first() else {
            return Ok(false);
        };
        // A message that does not decode is the replay's to report.
        let Ok(msg) = pgoutput::decode_tagged(tag, body) else {
            return Ok(false);
        };
        Ok(match msg {
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
                replica_identity,
            } => {
                if !self
                    .relation_settled(oid, namespace, name, &columns, replica_identity)
                    .await?
                {
                    return Ok(false);
                }
                self.on_message(Message::Relation {
                    oid,
                    namespace,
                    name,
                    columns,
                    replica_identity,
                })
                .await?;
                true
            }
            Message::Insert { oid, new } => self.early_change(s, oid, Op::Insert, &new, false)?,
            Message::Delete { oid, old } => self.early_change(s, oid, Op::Delete, &old, false)?,
            Message::Update {
                oid,
                old,
                key_changed,
                new,
            } => {
                // REPLICA IDENTITY FULL (another key rule) stops in `early_change`, before
                // anything is added.
                match (key_changed, &old) {
                    (true, Some(o)) => {
                        if !self.early_change(s, oid, Op::Delete, o, false)? {
                            return Ok(false);
                        }
                        // The delete is in: the update must follow it, or neither counts.
                        if !self.early_change(s, oid, Op::Update, &new, true)? {
                            s.discard();
                            return Ok(false);
                        }
                        true
                    }
                    _ => self.early_change(s, oid, Op::Update, &new, false)?,
                }
            }
            // A table's columns at a DDL: taken in order at the commit, with what follows.
            Message::LogicalMessage { prefix, .. } if prefix == ddl::DDL_MESSAGE_PREFIX => false,
            // Nothing stored, nothing counted.
            Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => true,
            Message::Truncate { .. } | Message::Begin { .. } | Message::Commit { .. } => false,
        })
    }

    /// Whether a Relation inside a streamed transaction describes its table as it stands, so
    /// that registering it now changes nothing this transaction could still roll back: the
    /// table is known with exactly these columns, or it is new here and the catalog (which
    /// sees committed DDL only) has the same columns.
    async fn relation_settled(
        &mut self,
        oid: u32,
        namespace: &str,
        name: &str,
        columns: &[RelationColumn],
        replica_identity: u8,
    ) -> Result<bool, PipelineError> {
        let now = format!("{namespace}.{name}");
        if replica_identity == b'f' || self.full_identity.contains_key(&now) {
            return Ok(false);
        }
        // Known under this name with these columns: nothing changes. A table placing a
        // replayed relation through an older schema waits for the commit, where the
        // message's place in the stream is known.
        if let Some(Some(i)) = self.relations.get(&oid) {
            let t = &self.tables[*i];
            return Ok(t.current == now
                && !t.replayed_shape
                && t.columns == as_fields(columns.to_vec()));
        }
        // Not mapped yet, or not ours: the name must be the committed one, or a rename inside
        // this transaction would be followed before the transaction is known to commit.
        if self.committed_name(oid).await?.as_deref() != Some(now.as_str()) {
            return Ok(false);
        }
        let source = self
            .aliases
            .get(&now)
            .cloned()
            .unwrap_or_else(|| now.clone());
        if let Some(t) = self.tables.iter().find(|t| t.source_name == source) {
            return Ok(t.current == now
                && !t.replayed_shape
                && t.columns == as_fields(columns.to_vec()));
        }
        let configured = self
            .cfg
            .table_names()
            .iter()
            .any(|(s, t)| format!("{s}.{t}") == source);
        if !configured && !self.cfg.follow_publication {
            return Ok(true);
        }
        if self.cfg.snapshot == crate::config::SnapshotMode::Initial
            && !self.no_copy.contains(&source)
        {
            // A table that joined the publication: the commit restarts the stream to copy it.
            return Ok(false);
        }
        let catalog = self.catalog_columns(namespace, name, Some(oid)).await?;
        Ok(columns.len() == catalog.len()
            && columns.iter().zip(&catalog).all(|(r, c)| {
                r.name == c.name && r.type_oid == c.type_oid && r.type_modifier == c.type_modifier
            }))
    }

    /// One row of a streamed transaction into its early rows; false when it cannot be
    /// converted now (nothing was added then).
    fn early_change(
        &self,
        s: &mut streamed::Streamed,
        oid: u32,
        op: Op,
        tuple: &TupleData<'_>,
        moved: bool,
    ) -> Result<bool, PipelineError> {
        let idx = match self.relations.get(&oid) {
            Some(Some(i)) => *i,
            // Not a table of ours: it only takes a position in the transaction.
            Some(None) => {
                s.early_mut().seq += 1;
                return Ok(true);
            }
            None => return Ok(false),
        };
        let t = &self.tables[idx];
        if t.full_identity.is_some() {
            return Ok(false);
        }
        if self.early_held + self.builder_bytes() >= self.cfg.max_buffer_bytes / 2 {
            return Ok(false);
        }
        let early = s.early_mut();
        let seq = early.seq;
        let et = early.table(idx, || {
            (t.batch.empty_like(), t.columns.clone(), t.mirror.is_some())
        });
        // Commit LSN and time are stamped on at the commit.
        if et.batch.push(op, Lsn::ZERO, seq, 0, Some(tuple)).is_err() {
            // A value for the dead-letter table: the replay writes it there.
            return Ok(false);
        }
        if moved {
            et.batch.mark_moved();
        }
        et.counts[op_index(op)] += 1;
        early.seq += 1;
        // A changelog takes its rows encoded as they come; a mirror (alone, or beside the
        // changelog) takes the batches themselves at the commit.
        early.seal(
            idx,
            self.cfg.batch_rows.min(SEAL_ROWS),
            self.cfg.batch_bytes.min(SEAL_BYTES),
            || t.sink.early_file(),
        )?;
        Ok(true)
    }

    /// Protocol 2: blocks of in-progress transactions, and how each one ended.
    async fn on_stream(
        &mut self,
        m: StreamMessage,
        client: &ReplicationStream,
    ) -> Result<(), PipelineError> {
        let result = self.on_stream_inner(m, client).await;
        // Once per block or outcome, not per message.
        self.publish_spools();
        result
    }

    async fn on_stream_inner(
        &mut self,
        m: StreamMessage,
        client: &ReplicationStream,
    ) -> Result<(), PipelineError> {
        match m {
            StreamMessage::Start { xid, first } => {
                if first || !self.streams.contains_key(&xid) {
                    if !first {
                        return Err(PipelineError::StreamEnded(format!(
                            "streamed transaction {xid} continues, but its start was not received"
                        )));
                    }
                    let spool = super::spool::Spool::new(self.cfg.spool_dir.as_deref(), xid)
                        .map_err(|e| self.spool_error(e))?;
                    self.streams.insert(xid, streamed::Streamed::new(spool));
                }
                self.in_stream = Some(xid);
            }
            StreamMessage::Stop => self.in_stream = None,
            StreamMessage::Abort { xid, subxid } => {
                if xid == subxid {
                    if let Some(s) = self.streams.remove(&xid) {
                        tracing::debug!(
                            xid,
                            changes = s.changes(),
                            "streamed transaction rolled back"
                        );
                    }
                } else if let Some(s) = self.streams.get_mut(&xid) {
                    s.abort_subxact(subxid).map_err(|e| self.spool_error(e))?;
                }
            }
            StreamMessage::Commit {
                xid,
                commit_lsn,
                end_lsn,
                commit_ts,
            } => {
                self.in_stream = None;
                let Some(streamed) = self.streams.remove(&xid) else {
                    return Err(PipelineError::StreamEnded(format!(
                        "commit of streamed transaction {xid} that was never started"
                    )));
                };
                // Its converted rows go to the writers now.
                self.early_held = self.early_held.saturating_sub(streamed.early_bytes());
                let url = self.cfg.source.url();
                let span = tracing::info_span!(
                    "postgres.stream_replay",
                    source = %self.cfg.name,
                    db.system.name = "postgresql",
                    db.namespace = %url.database,
                    db.operation.name = "START_REPLICATION",
                    server.address = %url.host,
                    server.port = url.port,
                    xid,
                    lsn = %commit_lsn.pg(),
                    changes = streamed.changes() as i64,
                    bytes = streamed.spool_bytes() as i64,
                    converted_early = tracing::field::Empty,
                    encoded_early = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                record_trace_id(&span);
                tracing::debug!(xid, lsn = %commit_lsn.pg(), "streamed transaction committed");
                self.replay(streamed, commit_lsn, commit_ts)
                    .instrument(span)
                    .await?;
                self.on_commit(commit_lsn, end_lsn, commit_ts, client)
                    .await?;
            }
        }
        Ok(())
    }

    /// Apply a committed streamed transaction's changes in order, as one transaction: the
    /// rows converted as they arrived, then the spool from where that conversion stopped.
    async fn replay(
        &mut self,
        streamed: streamed::Streamed,
        commit_lsn: Lsn,
        commit_ts: i64,
    ) -> Result<(), PipelineError> {
        let ts_micros = pg_ts_to_unix(commit_ts);
        let (spool, early, mut from) = streamed.into_parts();
        let mut seq = 0;
        let mut encoded = 0;
        if from > 0 {
            let early_seq = early.seq;
            match self.apply_early(early, commit_lsn, ts_micros).await? {
                Some(rows) => {
                    seq = early_seq;
                    encoded = rows;
                }
                None => from = 0,
            }
        }
        let span = tracing::Span::current();
        span.record("converted_early", seq as i64);
        span.record("encoded_early", encoded as i64);
        tracing::debug!(
            converted_early = seq,
            encoded_early = encoded,
            replayed_bytes = spool.bytes() - from,
            "streamed transaction: converted rows handed to the writers, replaying the rest"
        );
        self.txn = Some(Txn {
            lsn: commit_lsn,
            ts_micros,
            seq,
        });
        let mut reader = spool
            .into_reader_from(from)
            .map_err(|e| self.spool_error(e))?;
        let mut buf = Vec::new();
        while reader
            .next_into(&mut buf)
            .map_err(|e| self.spool_error(e))?
        {
            let msg = pgoutput::decode(&buf).map_err(SourceError::from)?;
            self.on_message(msg).await?;
        }
        Ok(())
    }

    /// Add a committed streamed transaction's early rows to their tables, stamped with its
    /// commit LSN and time; returns how many of them were encoded while it streamed, or None
    /// (nothing added) when a table changed shape since they were converted, and the whole
    /// spool must be replayed instead.
    async fn apply_early(
        &mut self,
        early: streamed::Early,
        lsn: Lsn,
        ts_micros: i64,
    ) -> Result<Option<u64>, PipelineError> {
        // A table placing a replayed relation through an older schema takes the replay.
        let current = |et: &streamed::EarlyTable| {
            self.tables.get(et.idx).is_some_and(|t| {
                !t.replayed_shape
                    && t.columns == et.columns
                    && t.batch.schema() == et.batch.schema()
            })
        };
        if !early.tables.iter().all(current) {
            return Ok(None);
        }
        let mut encoded = 0;
        for et in early.tables {
            let idx = et.idx;
            let counts = et.counts;
            // Its first row could not be converted (the replay takes it): nothing of it here.
            if counts.iter().all(|&n| n == 0) {
                continue;
            }
            // Exactly-once across restarts: this transaction is already in the table.
            if already_committed(lsn, self.tables[idx].sink.last_lsn) {
                continue;
            }
            // Rows of earlier transactions go first (a mirror applies them in order).
            self.spill(idx).await?;
            let (layout, batches, file) = et.finish()?;
            let stamped = batches
                .into_iter()
                .map(|(b, moved)| Ok((layout.stamp(&b, lsn, ts_micros)?, moved)))
                .collect::<Result<Vec<_>, BatchError>>()?;
            let t = &mut self.tables[idx];
            // The changelog's early file first: its encoded chunks are freed before a mirror
            // beside it encodes the kept batches (both at once raised the peak by the file's
            // size).
            let early = match file {
                Some(file) => {
                    encoded += file.rows();
                    Some(t.sink.add_early(file, lsn, ts_micros).await?)
                }
                None => None,
            };
            if let Some(m) = t.mirror.as_mut() {
                for (b, moved) in &stamped {
                    m.write_moved(b.clone(), moved).await?;
                }
            }
            let w = match early {
                Some(w) => w,
                None => t.sink.write_spread(stamped).await?,
            };
            let t = &mut self.tables[idx];
            if w.files > 0 {
                FilesWritten {
                    files: w.files,
                    bytes: w.bytes,
                }
                .emit(&t.metrics);
            }
            let t = &mut self.tables[idx];
            if t.touched_in != lsn {
                t.fresh.push(ts_micros);
            }
            t.touched_in = lsn;
            t.dirty = true;
            for (c, n) in t.counts.iter_mut().zip(counts) {
                *c += n;
            }
            self.buffered_events += counts.iter().sum::<u64>();
            self.oldest.get_or_insert_with(Instant::now);
            self.limit_open_writers(idx).await?;
        }
        Ok(Some(encoded))
    }

    /// Publish lag, depth and counters once per transaction (not per row); `lsn` is the
    /// transaction's commit, `received` its end.
    fn publish(&mut self, lag: f64, lsn: Lsn, received: Lsn) {
        TransactionApplied {
            lag_seconds: lag,
            received_lsn: received.pg(),
            buffered_events: self.buffered_events,
            tables: self.tables.iter().map(|t| AppliedTable {
                name: &t.source_name,
                metrics: &t.metrics,
                touched: t.touched_in == lsn,
                counts: t.counts,
                received: std::array::from_fn(|i| t.counts[i] - t.counted[i]),
            }),
        }
        .emit(&self.metrics, &self.status);
        for t in &mut self.tables {
            t.counted = t.counts;
        }
    }

    /// Tables to stream without an initial copy when their Relation arrives.
    pub(super) fn stream_without_copy(&mut self, tables: std::collections::HashSet<String>) {
        self.no_copy = tables;
    }

    /// Tables already copied again for rows without a key value by this process.
    pub(super) fn set_healed(&mut self, tables: std::collections::HashSet<String>) {
        self.healed = tables;
    }

    /// Mark this attempt as following a failed one (see `batches_retried`).
    pub(super) fn after_failure(&mut self, failed: bool) {
        self.retrying = failed;
    }

    /// Between transactions, the oldest buffered change has waited `flush_interval`.
    fn flush_due(&self) -> bool {
        self.txn.is_none()
            && self
                .oldest
                .is_some_and(|t| t.elapsed() >= self.cfg.flush_interval)
    }

    fn should_flush(&self) -> bool {
        self.buffered_rows() >= self.cfg.batch_rows
            || self.buffered_bytes() >= self.cfg.batch_bytes
            || self
                .oldest
                .is_some_and(|t| t.elapsed() >= self.cfg.flush_interval)
    }

    async fn on_message(&mut self, msg: Message<'_>) -> Result<(), PipelineError> {
        match msg {
            Message::Relation {
                oid,
                namespace,
                name,
                mut columns,
                replica_identity,
            } => {
                let now = format!("{namespace}.{name}");
                // A table is its relation: a known OID under another name is the same table,
                // renamed or moved to another schema.
                if let Some(Some(idx)) = self.relations.get(&oid).copied() {
                    if self.tables[idx].current != now {
                        self.table_renamed(idx, &now).await?;
                    }
                }
                // Renamed after this attempt started and before its first Relation: the
                // table it was, not a new one (which would take its changes elsewhere, or
                // drop them when the publication is not followed).
                let renamed_from = match self.relations.contains_key(&oid) {
                    false => self
                        .started_as
                        .get(&oid)
                        .filter(|was| **was != now)
                        .cloned(),
                    true => None,
                };
                if let Some(was) = &renamed_from {
                    let configured = self.aliases.get(was).cloned().unwrap_or(was.clone());
                    self.aliases.insert(now.clone(), configured);
                    if let Some(pk) = self.full_identity.remove(was) {
                        self.full_identity.insert(now.clone(), pk);
                    }
                }
                // A FULL table that joined the publication since the source was asked has no
                // known primary key: its whole row is its identity. One that left FULL for a
                // key of its own (a primary key added with it, say) is keyed by it.
                if replica_identity == b'f' && !self.full_identity.contains_key(&now) {
                    self.full_identity.insert(now.clone(), Vec::new());
                } else if replica_identity != b'f'
                    && self.full_identity.get(&now).is_some_and(Vec::is_empty)
                {
                    self.full_identity.remove(&now);
                }
                // FULL flags every column as key; the sink's key is the primary key.
                if let Some(pk) = self.full_identity.get(&now) {
                    for c in &mut columns {
                        c.key = pk.contains(&c.name);
                    }
                }
                let source = self.aliases.get(&now).cloned().unwrap_or(now);
                let configured = self
                    .cfg
                    .table_names()
                    .iter()
                    .any(|(s, t)| format!("{s}.{t}") == source);
                if !configured && !self.cfg.follow_publication {
                    self.relations.insert(oid, None);
                    return Ok(());
                }
                let known = self.tables.iter().any(|t| t.source_name == source);
                if !known && !configured && self.published_as_ancestor(oid).await? {
                    // A partition of a table published under its own name: its rows come
                    // under that table's OID, never this one's.
                    self.relations.insert(oid, None);
                    return Ok(());
                }
                if !known {
                    // A table added to the publication while streaming. Nothing of this
                    // transaction is confirmed yet, so with an initial snapshot the stream
                    // restarts: the table is copied first and its earlier changes skipped.
                    if self.cfg.snapshot == crate::config::SnapshotMode::Initial {
                        if !self.no_copy.contains(&source) {
                            return Err(PipelineError::NewTable(source));
                        }
                        tracing::warn!(table = %source, "table joined the publication and left it again before it could be copied: streaming its changes only");
                    } else {
                        tracing::info!(table = %source, "table joined the publication: streaming it");
                    }
                }
                // A binary stream cannot read this table's values: change nothing, reconnect
                // in text (the check on the catalog at start missed a column added since).
                // Domains and enums have their own type OIDs: the catalog names their form
                // (asked only when a column is not a built-in type with a reader).
                use crate::source::postgres::binary::supported;
                if self.binary && !columns.iter().all(|c| supported(c.type_oid)) {
                    let catalog = self.catalog_columns(namespace, name, Some(oid)).await?;
                    if !columns.iter().all(|c| supported(binary_oid(c, &catalog))) {
                        return Err(PipelineError::TextNeeded(source));
                    }
                }
                let idx = self
                    .relation(&source, namespace, name, Some(oid), columns)
                    .await?;
                self.copy_if_rows_lack_a_key(idx).await?;
                // Supported types feeding columns of another kind (a widened decimal, say).
                if self.binary && !self.tables[idx].batch.binary_ready() {
                    return Err(PipelineError::TextNeeded(source));
                }
                self.relations.insert(oid, Some(idx));
                if let Some(was) = renamed_from {
                    self.tables[idx].current = was;
                    self.table_renamed(idx, &format!("{namespace}.{name}"))
                        .await?;
                }
            }
            Message::LogicalMessage {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == ddl::DDL_MESSAGE_PREFIX => self.ddl_message(content),
            Message::Insert { oid, new } => self.change(oid, Op::Insert, Some(&new)).await?,
            Message::Update {
                oid,
                old,
                key_changed,
                new,
            } => {
                // A changed key: the old key leaves (a delete), the new row arrives, so
                // folding the changelog by key stays correct. With REPLICA IDENTITY FULL the
                // old row comes with every UPDATE: the key changed if its columns differ, and
                // without a primary key the whole row is the key.
                let full = self.full_identity_of(oid);
                let leaves = match (&full, &old) {
                    (Some(keys), Some(o)) => keys.is_empty() || key_differs(keys, o, &new),
                    _ => key_changed,
                };
                let moved = leaves && old.is_some();
                if let (true, Some(o)) = (moved, &old) {
                    self.change(oid, Op::Delete, Some(o)).await?;
                }
                // Unchanged TOAST values are in the old row (FULL): take them from it; else
                // a mirror takes them from the old key's row.
                let fallback = if full.is_some() { old.as_ref() } else { None };
                self.change_with(oid, Op::Update, Some(&new), fallback, moved)
                    .await?
            }
            Message::Delete { oid, old } => self.change(oid, Op::Delete, Some(&old)).await?,
            Message::Truncate { oids, .. } => {
                for oid in oids {
                    self.change(oid, Op::Truncate, None).await?;
                }
            }
            // Begin/Commit/Message arrive as events; Type and Origin carry nothing we store.
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Type { .. }
            | Message::Origin { .. }
            | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }

    /// The key positions of `oid`'s table when it has REPLICA IDENTITY FULL.
    fn full_identity_of(&self, oid: u32) -> Option<Vec<usize>> {
        let i = (*self.relations.get(&oid)?)?;
        self.tables.get(i)?.full_identity.clone()
    }

    async fn change(
        &mut self,
        oid: u32,
        op: Op,
        tuple: Option<&TupleData<'_>>,
    ) -> Result<(), PipelineError> {
        self.change_with(oid, op, tuple, None, false).await
    }

    /// [`Self::change`] taking the columns `tuple` did not send (unchanged TOAST values) from
    /// `fallback` when it has them; `moved`: an update that changed its key, right after its
    /// old key's delete (a mirror takes the values it did not send from the old key's row).
    async fn change_with(
        &mut self,
        oid: u32,
        op: Op,
        tuple: Option<&TupleData<'_>>,
        fallback: Option<&TupleData<'_>>,
        moved: bool,
    ) -> Result<(), PipelineError> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(PipelineError::StreamEnded(
                "change outside a transaction".into(),
            ));
        };
        let seq = txn.seq;
        txn.seq += 1;
        let (lsn, ts) = (txn.lsn, txn.ts_micros);
        let idx = match self.relations.get(&oid) {
            Some(Some(i)) => *i,
            Some(None) => return Ok(()),
            None => {
                return Err(PipelineError::StreamEnded(format!(
                    "change for relation {oid} before its Relation message"
                )))
            }
        };
        let t = &mut self.tables[idx];
        // Exactly-once across restarts: this transaction is already in the table.
        if already_committed(lsn, t.sink.last_lsn) {
            return Ok(());
        }
        if t.touched_in != lsn {
            t.fresh.push(ts);
        }
        t.touched_in = lsn;
        let pushed = match (tuple, fallback) {
            (Some(new), Some(old)) => t.batch.push_merged(op, lsn, seq, ts, new, old),
            _ => t.batch.push(op, lsn, seq, ts, tuple),
        };
        if let Err(e) = pushed {
            let letter = DeadLetter {
                source_table: t.source_name.clone(),
                lsn,
                seq,
                op,
                error: e.0,
                row_json: t.batch.row_json(tuple),
                time_micros: now_micros(),
                copied: None,
            };
            self.dead_letter(letter);
        } else {
            if moved {
                t.batch.mark_moved();
            }
            t.dirty = true;
        }
        self.buffered_events += 1;
        self.oldest.get_or_insert_with(Instant::now);
        self.tables[idx].counts[op_index(op)] += 1;
        // Bound memory inside large transactions: write the batch out, commit later.
        if self.should_spill(idx) {
            self.spill(idx).await?;
        }
        Ok(())
    }

    /// Hand table `i`'s buffered rows to its data-file writer (uncommitted).
    /// Log and count a row that cannot be converted, and keep it for the dead-letter table.
    fn dead_letter(&mut self, letter: DeadLetter) {
        DeadLettered {
            table: &letter.source_table,
            lsn: &letter.lsn.pg(),
            seq: letter.seq,
            op: letter.op,
            error: &letter.error,
        }
        .emit(&self.metrics);
        self.dlq_rows.push(letter);
    }

    async fn spill(&mut self, i: usize) -> Result<(), PipelineError> {
        if let Some((batch, moved)) = self.tables[i].batch.finish()? {
            self.write_batch(i, batch, &moved).await?;
        }
        self.limit_open_writers(i).await
    }

    /// Hand `batch` to table `i`'s data-file writers (the mirror's too).
    async fn write_batch(
        &mut self,
        i: usize,
        batch: arrow_array::RecordBatch,
        moved: &[u32],
    ) -> Result<(), PipelineError> {
        let t = &mut self.tables[i];
        if let Some(m) = t.mirror.as_mut() {
            let b = if t.mirror_names.is_empty() {
                batch.clone()
            } else {
                crate::sink::iceberg::project::renamed(&batch, &t.mirror_names)
                    .map_err(|e| PipelineError::State(format!("mirror batch: {e}")))?
            };
            m.write_moved(b, moved).await?;
        }
        t.sink.write_moved(batch, moved).await?;
        Ok(())
    }

    /// Each open writer holds a row group being encoded (up to 32 MiB): a transaction that
    /// fills many tables keeps only a few open; the others' files are finished early.
    async fn limit_open_writers(&mut self, i: usize) -> Result<(), PipelineError> {
        let others: Vec<usize> = (0..self.tables.len())
            .filter(|&j| j != i && self.tables[j].sink.has_open_files())
            .collect();
        if others.len() >= MAX_OPEN_WRITERS {
            for j in others {
                self.finish_files(j).await?;
            }
        }
        Ok(())
    }

    /// Spill table `i` and finish its data files, ready to commit.
    async fn close_files(&mut self, i: usize) -> Result<(), PipelineError> {
        self.spill(i).await?;
        self.finish_files(i).await
    }

    /// Finish table `i`'s open data files (they stay pending until the commit).
    async fn finish_files(&mut self, i: usize) -> Result<(), PipelineError> {
        let t = &mut self.tables[i];
        let span = tracing::info_span!(
            "iceberg.write",
            source = %self.cfg.name,
            table = %t.source_name,
            iceberg.table = %t.sink.name(),
            rows = t.sink.pending_rows() as i64,
            bytes = tracing::field::Empty,
            files = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        record_trace_id(&span);
        let mut w = t.sink.finish_files().instrument(span.clone()).await?;
        if let Some(m) = t.mirror.as_mut() {
            let mw = m.finish_files().instrument(span.clone()).await?;
            w.files += mw.files;
            w.bytes += mw.bytes;
        }
        span.record("bytes", w.bytes as i64);
        span.record("files", w.files as i64);
        FilesWritten {
            files: w.files,
            bytes: w.bytes,
        }
        .emit(&t.metrics);
        Ok(())
    }

    /// Commit every dirty table (and dead letters) at the last complete transaction.
    async fn flush(&mut self, client: &ReplicationStream) -> Result<(), PipelineError> {
        let result = self.commit_buffered(Some(client)).await;
        self.last_flush = Instant::now();
        result
    }

    /// A mirror's compaction steps run after its commits, so a mirror that stops changing
    /// kept its small files and delete debt until its next change. Once nothing is buffered
    /// and nothing has been flushed for [`IDLE_STEP_EVERY`], each mirror takes one step per
    /// [`IDLE_STEP_EVERY`] until none is due (planning one reads nothing).
    async fn compact_idle_mirrors(&mut self) {
        if self.txn.is_some()
            || self.anything_uncommitted()
            || self.last_flush.elapsed() < IDLE_STEP_EVERY
            || self.last_idle_step.elapsed() < IDLE_STEP_EVERY
        {
            return;
        }
        let pipeline = self.cfg.name.as_str();
        for t in &mut self.tables {
            compact_mirrors(t, pipeline, &self.metrics).await;
        }
        self.last_idle_step = Instant::now();
    }

    /// Commit what is buffered, up to the last transaction received whole, and confirm it
    /// to the server when `client` is given (the ack is part of the flush's trace).
    async fn commit_buffered(
        &mut self,
        client: Option<&ReplicationStream>,
    ) -> Result<(), PipelineError> {
        let lsn = self.positions.last().lsn;
        // A root span: one trace per flush, whatever span the caller is in.
        let span = tracing::info_span!(
            parent: None,
            "pipeline.flush",
            source = %self.cfg.name,
            lsn = %lsn.pg(),
            rows = self.buffered_events as i64,
            trace_id = tracing::field::Empty,
        );
        record_trace_id(&span);
        let result = async {
            let (rows, dead_letters) = self.flush_inner(lsn).await?;
            // Inside the span: the flush's log line carries its trace id.
            self.flushed(lsn, rows, dead_letters);
            if let Some(c) = client {
                self.ack(c);
            }
            Ok(())
        }
        .instrument(span)
        .await;
        if result.is_err() {
            BatchFailed.emit(&self.metrics);
        }
        result
    }

    /// A flush committed: report it and empty the buffer's bookkeeping.
    fn flushed(&mut self, lsn: Lsn, rows: u64, dead_letters: usize) {
        // The catalog connection is a walsender on the source (`max_wal_senders`): kept only
        // for the Relation messages of one flush (many at start), not for the stream's life.
        self.catalog = None;
        BatchCommitted {
            rows,
            dead_letters,
            lsn: lsn.pg(),
            retried: std::mem::take(&mut self.retrying),
        }
        .emit(&self.metrics, &self.status);
        self.buffered_events = 0;
        self.oldest = None;
    }

    /// Commit the dead letters, then every dirty table; returns (rows, dead letters).
    async fn flush_inner(&mut self, lsn: Lsn) -> Result<(u64, usize), PipelineError> {
        // Dead letters first: if the tables' commits then fail, the replay finds them already
        // stored (and drops them); the other order would lose them, because a replayed
        // change at or below its table's philotes.lsn is skipped before it is converted.
        let dead_letters = self.dlq_rows.len();
        if dead_letters > 0 {
            self.flush_dlq_rows(lsn).await?;
        }
        let mut committed_events = 0u64;
        for i in 0..self.tables.len() {
            if !self.tables[i].dirty {
                // Its transactions' rows all went to the dead-letter table: nothing of them
                // becomes visible in this table, so they have no freshness here.
                self.tables[i].fresh.clear();
                continue;
            }
            // Commit latency includes writing the last data files, as users feel it.
            let started = Instant::now();
            self.close_files(i).await?;
            let t = &mut self.tables[i];
            let rows = t.sink.pending_rows();
            let span = commit_span(
                &self.cfg.name,
                &t.source_name,
                t.sink.name(),
                rows,
                &lsn.pg(),
            );
            // The mirror first: a crash between the two commits then leaves the changelog
            // behind, and the replay from its position skips what the mirror already holds.
            if let Some(m) = t.mirror.as_mut() {
                let mspan = commit_span(
                    &self.cfg.name,
                    &t.source_name,
                    m.name(),
                    m.pending_rows(),
                    &lsn.pg(),
                );
                let done = m.commit(lsn).instrument(mspan).await?;
                mirror_committed(m, &done, &t.metrics);
            }
            let outcome = t.sink.commit(lsn).instrument(span).await?;
            mirror_committed(&t.sink, &outcome, &t.metrics);
            t.dirty = false;
            committed_events += rows;
            let transactions = std::mem::take(&mut t.fresh);
            TableCommitted {
                source_table: &t.source_name,
                iceberg_table: t.sink.name(),
                rows,
                committed_lsn: lsn.pg(),
                conflicts: outcome.conflicts,
                duration: started.elapsed(),
                transactions: &transactions,
            }
            .emit(&t.metrics, &self.metrics, &self.status);
            // A mirror's files are compacted here, between commits, by the writer that holds
            // its key index (the background maintenance cannot move rows the index points at).
            let pipeline = self.cfg.name.as_str();
            compact_mirrors(t, pipeline, &self.metrics).await;
        }
        Ok((committed_events, dead_letters))
    }

    /// Commit the buffered dead letters at `lsn` (with each source table's newest
    /// `(lsn, seq)` as the property `philotes.dlq.<table>`), dropping replayed ones.
    async fn flush_dlq_rows(&mut self, lsn: Lsn) -> Result<(), PipelineError> {
        if self.dlq_sink.is_none() {
            let sink = TableSink::open_or_create(
                self.committer.clone(),
                &self.namespace,
                DLQ_TABLE,
                None,
                || Ok((dlq_schema()?, None)),
                &self.options.properties,
                self.secrets.clone(),
            )
            .await?;
            self.dlq_sink = Some(sink);
        }
        let Some(sink) = self.dlq_sink.as_mut() else {
            return Ok(());
        };
        // Replayed dead letters already in the table are dropped: per source table, those at
        // or below the last (lsn, seq) committed for it. (One floor for the whole table would
        // drop a table's real dead letters below another table's snapshot point.)
        // A floor that cannot be read is an error, not a missing floor: ignoring it would
        // append that table's replayed dead letters a second time.
        let floors = parse_dlq_floors(sink.properties_with_prefix(DLQ_FLOOR_PREFIX))?;
        // A copy's rows read again (a chunk whose commit failed after its dead letters
        // landed) are known by their range and ctid: their `seq` depends on how the
        // readers' batches interleaved.
        let copies = dlq::parse_copy_floors(sink.properties_with_prefix(dlq::COPY_FLOOR_PREFIX))
            .map_err(PipelineError::State)?;
        // Tables from before the per-table floors: the table-wide LSN.
        let legacy = floors.is_empty().then_some((sink.last_lsn, u64::MAX));
        self.dlq_rows
            .retain(|r| match dlq::copied_already(r, &copies) {
                Some(stored) => !stored,
                None => {
                    let floor = floors.get(&r.source_table).copied().or(legacy);
                    floor.is_none_or(|f| (r.lsn, r.seq) > f)
                }
            });
        if !self.dlq_rows.is_empty() {
            let mut tops: HashMap<&str, (Lsn, u64)> = HashMap::new();
            for r in &self.dlq_rows {
                let e = tops.entry(r.source_table.as_str()).or_default();
                *e = (*e).max((r.lsn, r.seq));
            }
            let props: Vec<(String, String)> = tops
                .into_iter()
                .map(|(t, (l, s))| (format!("{DLQ_FLOOR_PREFIX}{t}"), format!("{}:{s}", l.get())))
                .chain(dlq::copy_floors_after(&self.dlq_rows, &copies))
                .collect();
            let props: Vec<(&str, &str)> = props
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let batch =
                dlq::to_batch(sink.arrow_schema(), &self.dlq_rows).map_err(BatchError::from)?;
            sink.write(batch).await?;
            sink.commit_with(lsn, &props).await?;
        }
        let n = self.dlq_rows.len() as u64;
        self.dlq_rows.clear();
        status::update(&self.status, |s| s.dlq_rows += n);
        Ok(())
    }

    /// Confirm the last complete transaction (everything before it is committed).
    fn ack(&mut self, client: &ReplicationStream) {
        if let Some(end) = self.positions.ack_point(self.anything_uncommitted()) {
            let url = self.cfg.source.url();
            let span = tracing::info_span!(
                "postgres.ack",
                source = %self.cfg.name,
                db.system.name = "postgresql",
                db.namespace = %url.database,
                db.operation.name = "STANDBY_STATUS_UPDATE",
                server.address = %url.host,
                server.port = url.port,
                lsn = %end.pg(),
                trace_id = tracing::field::Empty,
            );
            record_trace_id(&span);
            let _g = span.enter();
            self.confirm(client, end);
        }
    }

    fn confirm(&mut self, client: &ReplicationStream, lsn: Lsn) {
        client.confirm(lsn);
        self.confirmed(lsn);
        status::update(&self.status, |s| s.confirmed_lsn = lsn.pg());
    }
}

/// Whether the columns at `keys` differ between the old and the new row (an unchanged TOAST
/// value in the new row is the old one).
fn key_differs(keys: &[usize], old: &TupleData<'_>, new: &TupleData<'_>) -> bool {
    old.columns()
        .zip(new.columns())
        .enumerate()
        .any(|(i, (o, n))| keys.contains(&i) && n != pgoutput::Column::Unchanged && o != n)
}

/// Report a mirror table's commit (nothing for a changelog).
fn mirror_committed(sink: &TableSink, c: &Committed, metrics: &TableMetrics) {
    if let Some((index_keys, index_bytes)) = sink.mirror_index() {
        MirrorCommitted {
            delete_files: c.delete_files,
            rows_deleted: c.rows_deleted,
            index_keys,
            index_bytes,
        }
        .emit(metrics);
    }
}

/// A compaction step for a table's mirror, in either place it lives (beside the changelog,
/// or as the table's only sink).
async fn compact_mirrors(t: &mut TableState, pipeline: &str, metrics: &SourceMetrics) {
    if let Some(m) = t.mirror.as_mut() {
        compact_mirror(m, pipeline, metrics).await;
    }
    compact_mirror(&mut t.sink, pipeline, metrics).await;
}

/// Run a mirror's compaction step if its files call for one (nothing for a changelog). A
/// failed step is reported and left for the next commit: the table and the index are as
/// they were, or the mirror refuses writes until the pipeline reopens it.
async fn compact_mirror(sink: &mut TableSink, pipeline: &str, metrics: &SourceMetrics) {
    if sink.mirror_index().is_none() {
        return;
    }
    let started = Instant::now();
    let table = sink.name();
    let span = tracing::info_span!("maintenance.compact", table = %table, mirror = true);
    let (status, files_removed, bytes_written, summary) =
        match sink.compact_mirror().instrument(span).await {
            Ok(None) => return,
            Ok(Some(c)) => (
                "ok",
                c.files_removed(),
                c.bytes_written,
                format!(
                    "mirror: {} data files rewritten into {} ({} live rows kept, {} deleted rows \
                 left out), {} delete files into {}",
                    c.data_files_in,
                    c.data_files_out,
                    c.rows_kept,
                    c.rows_dropped,
                    c.delete_files_in,
                    c.delete_files_out
                ),
            ),
            Err(SinkError::Conflict(m)) => ("conflict", 0, 0, m),
            // A deposed leader's step: its next data commit steps it down.
            Err(e @ SinkError::Fenced { .. }) => ("conflict", 0, 0, e.to_string()),
            Err(e) => ("failed", 0, 0, e.to_string()),
        };
    TableMaintained {
        source: pipeline,
        table: &table,
        action: "compact",
        status,
        files_removed,
        bytes_written,
        summary: &summary,
        duration: started.elapsed(),
    }
    .emit(metrics.global());
}

/// Events handled per trip through the apply loop's select, at most (timers and control
/// are looked at between trips).
const DRAIN_EVENTS: usize = 1024;

/// How long a pipeline is quiet before its mirrors take compaction steps on their own, and
/// how often they take one then.
const IDLE_STEP_EVERY: Duration = Duration::from_secs(1);

/// Table property: what the source calls the table now, after a rename (a restart reads it).
pub(super) const SOURCE_NAME_PROPERTY: &str = "philotes.source-name";

/// Table property: the source relation's OID when it was last copied or streamed (a table
/// dropped and created again is another relation: its rows are copied again).
pub(super) const SOURCE_OID_PROPERTY: &str = "philotes.source-oid";

/// The dead-letter table's per-source-table floors (`philotes.dlq.<table>` = `lsn:seq`).
fn parse_dlq_floors(
    props: impl IntoIterator<Item = (String, String)>,
) -> Result<HashMap<String, (Lsn, u64)>, PipelineError> {
    props
        .into_iter()
        .map(|(k, v)| {
            let floor = v
                .split_once(':')
                .and_then(|(l, s)| Some((Lsn(l.parse().ok()?), s.parse().ok()?)));
            match floor {
                Some(f) => Ok((k[DLQ_FLOOR_PREFIX.len()..].to_string(), f)),
                None => Err(PipelineError::State(format!(
                    "dead-letter table property {k} = {v:?} is not <lsn>:<seq>; fix or remove it (dead letters at or below it would be appended again)"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ErrorType;

    #[test]
    fn dlq_floors_read_and_a_malformed_one_is_an_error() {
        let ok = parse_dlq_floors([(format!("{DLQ_FLOOR_PREFIX}public.t"), "42:7".to_string())])
            .unwrap();
        assert_eq!(ok.get("public.t"), Some(&(Lsn(42), 7)));
        for bad in ["42", "x:7", "42:", "42:-1"] {
            let e = parse_dlq_floors([(format!("{DLQ_FLOOR_PREFIX}public.t"), bad.to_string())])
                .unwrap_err();
            assert_eq!(e.error_type(), ErrorType::State, "{bad}");
            assert!(e.to_string().contains("philotes.dlq.public.t"), "{e}");
        }
    }
}
