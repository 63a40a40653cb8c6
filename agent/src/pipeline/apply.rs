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
mod partitions;
mod snapshot;
mod streamed;
use crate::config::PipelineConfig;
use crate::model::{Lsn, Op};
use crate::sink::iceberg::commit::Committer;
use crate::sink::iceberg::evolve::{promotable, ColumnChange};
use crate::sink::iceberg::mirror::MirrorKey;
use crate::sink::iceberg::schema::{
    self, changelog_partition, changelog_schema, dlq_schema, field_name, kind_of, CHANGELOG_SUFFIX,
    DLQ_TABLE, SOURCE_COLUMNS_PROPERTY,
};
use crate::sink::iceberg::table::{Committed, MirrorSource, PropertyChanges, TableOptions};
use crate::sink::iceberg::{SinkError, TableSink};
use crate::source::postgres::ddl;
use crate::source::postgres::pgoutput::{self, Message, RelationColumn, StreamMessage, TupleData};
use crate::source::postgres::session::{CatalogColumn, Session, SourceError};
use crate::source::postgres::types::ColumnKind;
use crate::source::postgres::wire::replication::{ReplEvent, ReplicationStream};
use crate::telemetry::events::{
    AppliedTable, BatchCommitted, BatchFailed, DeadLettered, FilesWritten, MirrorCommitted,
    MirrorRekeyed, SchemaChanged, SpoolChanged, StaleRowsAfterSchemaChange, TableCommitted,
    TableMaintained, TransactionApplied,
};
use crate::telemetry::{commit_span, record_trace_id, PipelineState, SourceMetrics, TableMetrics};
use iceberg::spec::NestedFieldRef;

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
    /// Tables with REPLICA IDENTITY FULL (`schema.table`) and their primary key columns.
    full_identity: HashMap<String, Vec<String>>,
    /// A connection for catalog lookups (column numbers, domains), opened on first use and
    /// closed at the next flush.
    catalog: Option<Session>,
    /// Tables renamed in the source: their name now → the name they are configured under.
    aliases: HashMap<String, String>,
    /// The stream sends values in binary (`binary 'true'`).
    binary: bool,
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
            full_identity: HashMap::new(),
            catalog: None,
            aliases: HashMap::new(),
            binary: false,
            healed: Default::default(),
            ddl_shapes: HashMap::new(),
        }
    }

    /// Tables renamed in the source before this attempt: their name now → as configured.
    /// The stream sends values in binary: every relation must be readable so.
    pub(super) fn set_binary(&mut self, binary: bool) {
        self.binary = binary;
    }

    pub(super) fn set_aliases(&mut self, aliases: HashMap<String, String>) {
        self.aliases = aliases;
    }

    /// Table `idx` is called `now` in the source (`ALTER TABLE … RENAME` or `SET SCHEMA`): it
    /// keeps streaming into its Iceberg table; the rename is logged, counted and recorded in
    /// the table's properties (`philotes.source-name`), which a restart reads back.
    async fn table_renamed(&mut self, idx: usize, now: &str) -> Result<(), PipelineError> {
        let lsn = self.change_lsn();
        let t = &mut self.tables[idx];
        let before = std::mem::replace(&mut t.current, now.to_string());
        let detail = format!("rename table {before} to {now}");
        let mut props = change_record(&t.sink, lsn, &detail);
        props
            .set
            .insert(SOURCE_NAME_PROPERTY.to_string(), now.to_string());
        let none = HashMap::new();
        t.sink
            .change_columns(&[], props.clone(), SOURCE_COLUMNS_PROPERTY, &none)
            .await?;
        if let Some(m) = t.mirror.as_mut() {
            m.change_columns(&[], props, SOURCE_COLUMNS_PROPERTY, &none)
                .await?;
        }
        SchemaChanged {
            table: &t.source_name,
            kind: "rename_table",
            detail: &detail,
        }
        .emit(&self.metrics);
        self.aliases.insert(now.to_string(), t.source_name.clone());
        if let Some(pk) = self.full_identity.remove(&before) {
            self.full_identity.insert(now.to_string(), pk);
        }
        Ok(())
    }

    /// The connection for catalog lookups, opened on first use.
    async fn catalog_session(&mut self) -> Result<&mut Session, PipelineError> {
        if self.catalog.is_none() {
            let s = Session::connect(
                self.cfg.source.url(),
                &self.cfg.slot_name(),
                &self.cfg.publication_name(),
                None,
            )
            .await?;
            self.catalog = Some(s);
        }
        self.catalog
            .as_mut()
            .ok_or_else(|| PipelineError::StreamEnded("no catalog connection".into()))
    }

    /// The table's columns as the catalog has them now (a connection is opened once).
    async fn catalog_columns(
        &mut self,
        schema: &str,
        name: &str,
        oid: Option<u32>,
    ) -> Result<Vec<CatalogColumn>, PipelineError> {
        let result = self
            .catalog_session()
            .await?
            .column_info(schema, name, oid)
            .await;
        // After a failure the next lookup opens a new connection.
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
    }

    /// Whether a column of table `i` is another source column than its name's field holds
    /// (dropped and added again under its name, names swapped): the Relation message looks
    /// the same then, only the catalog's numbers tell.
    fn renumbered(&self, i: usize, catalog: &[CatalogColumn]) -> Result<bool, PipelineError> {
        let Some(v) = self.tables[i].sink.property(SOURCE_COLUMNS_PROPERTY) else {
            return Ok(false);
        };
        let recorded = parse_source_columns(&v)?;
        let number: HashMap<&str, i32> = catalog
            .iter()
            .map(|c| (c.name.as_str(), c.attnum))
            .collect();
        let t = &self.tables[i];
        let sink_schema = t.sink.schema();
        Ok(
            numbers_place(sink_schema, &recorded, &t.columns, catalog, true)
                && renumbered(sink_schema, &recorded, &number, &t.columns),
        )
    }

    /// Whether relation `oid` is a partition published under an ancestor's name.
    async fn published_as_ancestor(&mut self, oid: u32) -> Result<bool, PipelineError> {
        let result = self
            .catalog_session()
            .await?
            .published_as_ancestor(oid)
            .await;
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
    }

    /// `schema.table` of relation `oid` as committed now.
    async fn committed_name(&mut self, oid: u32) -> Result<Option<String>, PipelineError> {
        let result = self.catalog_session().await?.relation_name(oid).await;
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
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
        let mut bell_open = true;
        loop {
            // `[ha]`: a leader that lost its lease stops here, committing nothing more.
            if *lost.borrow() {
                return Err(PipelineError::LeadershipLost);
            }
            if copy_wanted && self.txn.is_none() && !*shutdown.borrow() {
                if self.anything_uncommitted() {
                    self.flush(&client).await?;
                }
                client.stop().await;
                return Err(PipelineError::CopyAgain);
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
                    if self.flush_due() {
                        self.flush(&client).await?;
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
            Message::Insert { oid, new } => self.early_change(s, oid, Op::Insert, &new)?,
            Message::Delete { oid, old } => self.early_change(s, oid, Op::Delete, &old)?,
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
                        if !self.early_change(s, oid, Op::Delete, o)? {
                            return Ok(false);
                        }
                        // The delete is in: the update must follow it, or neither counts.
                        if !self.early_change(s, oid, Op::Update, &new)? {
                            s.discard();
                            return Ok(false);
                        }
                        true
                    }
                    _ => self.early_change(s, oid, Op::Update, &new)?,
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
        let et = early.table(idx, || (t.batch.empty_like(), t.columns.clone()));
        // Commit LSN and time are stamped on at the commit.
        if et.batch.push(op, Lsn::ZERO, seq, 0, Some(tuple)).is_err() {
            // A value for the dead-letter table: the replay writes it there.
            return Ok(false);
        }
        et.counts[op_index(op)] += 1;
        early.seq += 1;
        early.seal(
            idx,
            self.cfg.batch_rows.min(SEAL_ROWS),
            self.cfg.batch_bytes.min(SEAL_BYTES),
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
        if from > 0 {
            let early_seq = early.seq;
            if self.apply_early(early, commit_lsn, ts_micros).await? {
                seq = early_seq;
            } else {
                from = 0;
            }
        }
        tracing::Span::current().record("converted_early", seq as i64);
        tracing::debug!(
            converted_early = seq,
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
    /// commit LSN and time; false (nothing added) when a table changed shape since they were
    /// converted, and the whole spool must be replayed instead.
    async fn apply_early(
        &mut self,
        early: streamed::Early,
        lsn: Lsn,
        ts_micros: i64,
    ) -> Result<bool, PipelineError> {
        // A table placing a replayed relation through an older schema takes the replay.
        let current = |et: &streamed::EarlyTable| {
            self.tables.get(et.idx).is_some_and(|t| {
                !t.replayed_shape
                    && t.columns == et.columns
                    && t.batch.schema() == et.batch.schema()
            })
        };
        if !early.tables.iter().all(current) {
            return Ok(false);
        }
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
            let (layout, batches) = et.finish()?;
            let stamped = batches
                .iter()
                .map(|b| layout.stamp(b, lsn, ts_micros))
                .collect::<Result<Vec<_>, _>>()?;
            drop(batches);
            let t = &mut self.tables[idx];
            if let Some(m) = t.mirror.as_mut() {
                for b in &stamped {
                    m.write(b.clone()).await?;
                }
            }
            let w = t.sink.write_spread(stamped).await?;
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
        Ok(true)
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
                if let (true, Some(o)) = (leaves, &old) {
                    self.change(oid, Op::Delete, Some(o)).await?;
                }
                // Unchanged TOAST values are in the old row (FULL): take them from it.
                let fallback = if full.is_some() { old.as_ref() } else { None };
                self.change_with(oid, Op::Update, Some(&new), fallback)
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

    /// A table's columns at an `ALTER TABLE` (the DDL event trigger's message): the Relation
    /// messages after it are placed by these numbers.
    fn ddl_message(&mut self, content: &[u8]) {
        if !self.cfg.ddl_messages {
            return;
        }
        match ddl::parse(content) {
            Some((oid, columns)) => {
                self.ddl_shapes.insert(oid, columns);
            }
            None => tracing::debug!(
                "a DDL message this version cannot read: the catalog places the next relation"
            ),
        }
    }

    /// The catalog's columns for a Relation message of `columns`, as of the last DDL message
    /// of the table when it describes them (true then: the numbers are of the message's
    /// time), else as the catalog has them now.
    fn catalog_at_message(
        &self,
        oid: Option<u32>,
        now: Vec<CatalogColumn>,
        columns: &[RelationColumn],
    ) -> (Vec<CatalogColumn>, bool) {
        let then = oid
            .and_then(|o| self.ddl_shapes.get(&o))
            .map(|shape| catalog_as_fields(ddl::as_of(shape, &now)))
            // Another DDL since that the trigger does not see (a type dropped with its
            // columns, say): the message tells, and the catalog of now is used.
            .filter(|then| {
                then.len() == columns.len()
                    && then
                        .iter()
                        .zip(columns)
                        .all(|(k, c)| k.name == c.name && k.type_oid == c.type_oid)
            });
        match then {
            Some(then) => (then, true),
            None => (catalog_as_fields(now), false),
        }
    }

    /// Register (or re-register after DDL) a configured relation; returns its table index.
    ///
    /// `source` is the table as configured (its Iceberg table and metric labels); `schema` and
    /// `name` are what the source calls it now (they differ after `ALTER TABLE … RENAME`).
    async fn relation(
        &mut self,
        source: &str,
        schema: &str,
        name: &str,
        oid: Option<u32>,
        columns: Vec<RelationColumn>,
    ) -> Result<usize, PipelineError> {
        let source_name = source.to_string();
        let full_identity = self
            .full_identity
            .get(&format!("{schema}.{name}"))
            .map(|pk| {
                columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| pk.contains(&c.name))
                    .map(|(i, _)| i)
                    .collect::<Vec<usize>>()
            });
        let columns = as_fields(columns);
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| t.source_name == source_name)
        {
            // A keyless table turned FULL has the same columns and flags, another identity.
            let was = std::mem::replace(&mut self.tables[i].full_identity, full_identity.clone());
            // A column dropped and added again in its old place looks the same: only the
            // catalog's numbers tell, and only for a message sent after a change (the first
            // of an attempt may be older than the catalog).
            let mut described = match (oid, self.tables[i].relation_streamed) {
                (None, _) => Described::Catalog,
                (Some(_), false) => Described::FirstMessage,
                (Some(_), true) => Described::AfterAChange,
            };
            self.tables[i].relation_streamed |= oid.is_some();
            let unchanged = !self.tables[i].pending
                && !self.tables[i].replayed_shape
                && self.tables[i].columns == columns
                && was == full_identity;
            // A DDL message tells what a message that looks unchanged is (names swapped).
            let told = oid.is_some_and(|o| self.ddl_shapes.contains_key(&o));
            if unchanged && described != Described::AfterAChange && !told {
                return Ok(i);
            }
            // Read once: for the numbers of a message that looks unchanged, and to follow a
            // change.
            let now = self.catalog_columns(schema, name, oid).await?;
            let (catalog, exact) = self.catalog_at_message(oid, now, &columns);
            if exact {
                // The numbers are of the message's time, whatever it follows.
                described = Described::AfterAChange;
            }
            if unchanged && !self.renumbered(i, &catalog)? {
                return Ok(i);
            }
            // The table changed shape: write what was buffered with the old layout first,
            // then follow the change (renames by column number, promotions in place, other
            // type changes beside the old column) in both tables.
            // A schema update commits at once, the rows before it at the next flush: a replay
            // after a crash in between meets their older Relation messages after the change.
            // Each table records where its schema changed, and such a message is placed
            // through the schema of its time there (`replayed_names`), not followed again.
            // When the change comes first in its transaction, what is buffered is of whole
            // transactions: committed first, so less is replayed (after the catalog is read,
            // which should be as near the message's point as it can).
            let at = self.txn.filter(|_| oid.is_some()).map(|t| (t.lsn, t.seq));
            let t = &self.tables[i];
            let then = |sink: &TableSink| match at {
                Some((lsn, seq)) => replayed_names(sink, &columns, lsn, seq),
                None => Ok(None),
            };
            let replayed = then(&t.sink)?;
            let replayed_mirror = match &t.mirror {
                Some(m) => then(m)?,
                None => None,
            };
            let follows = replayed.is_none() || (t.mirror.is_some() && replayed_mirror.is_none());
            if follows
                && oid.is_some()
                && self.in_stream.is_none()
                && self.txn.is_some_and(|t| t.seq == 0)
                && self.anything_uncommitted()
            {
                // Confirmed at the next flush (the stream is not at hand here).
                self.commit_buffered(None).await?;
            }
            let lsn = self.change_lsn();
            self.close_files(i).await?;
            let t = &mut self.tables[i];
            // A table copied in this attempt holds the source as of the copy, keyed as the
            // source is keyed now: a replayed relation (its transaction is in the table) has
            // an older key, which must not key the copied rows again.
            let hold_key = t.copied && already_committed(lsn, t.sink.last_lsn);
            let key = |now: Option<MirrorKey>| {
                (!hold_key).then(|| wanted_key(&columns, full_identity.as_deref(), now))
            };
            let k = key(t.sink.mirror_key());
            let recorded = at.map(|(_, seq)| seq);
            let Evolved { mut changes, stale } = match replayed {
                Some(_) => Evolved::default(),
                None => {
                    let at = (lsn, recorded);
                    evolve(&mut t.sink, &columns, &catalog, at, k.as_ref(), described).await?
                }
            };
            if let Some(m) = t.mirror.as_mut().filter(|_| replayed_mirror.is_none()) {
                m.finish_files().await?;
                let k = key(m.mirror_key());
                let at = (lsn, recorded);
                let e = evolve(m, &columns, &catalog, at, k.as_ref(), described).await?;
                // The changelog has the column changes too; only the mirror has a key.
                changes.extend(
                    e.changes
                        .into_iter()
                        .filter(|c| matches!(c, ColumnChange::Key(_))),
                );
            }
            // A pending table's columns are the catalog's, not what the schema followed; a
            // replayed message changes nothing.
            let before: &[RelationColumn] = if t.pending || replayed.is_some() {
                &[]
            } else {
                &t.columns
            };
            report_changes(&self.metrics, &t.source_name, before, &columns, &changes);
            t.pending = false;
            // The batch's columns under the names of the fields holding them now; the
            // mirror takes them under its own.
            let named = |names: &Option<Vec<String>>, j: usize| {
                names
                    .as_ref()
                    .map_or(columns[j].name.clone(), |n| n[j].clone())
            };
            t.mirror_names = (0..columns.len())
                .map(|j| (named(&replayed, j), named(&replayed_mirror, j)))
                .filter(|(from, to)| from != to)
                .collect();
            t.replayed_shape = replayed.is_some() || replayed_mirror.is_some();
            let oids: HashMap<String, u32> = (0..columns.len())
                .map(|j| (named(&replayed, j), binary_oid(&columns[j], &catalog)))
                .collect();
            let placed: Vec<RelationColumn> = (0..columns.len())
                .map(|j| RelationColumn {
                    name: named(&replayed, j),
                    ..columns[j].clone()
                })
                .collect();
            t.batch = TableBatch::new(
                t.sink.batch_schema(),
                t.sink.batch_arrow_schema(),
                &placed,
                |c| oids.get(&c.name).copied().unwrap_or(c.type_oid),
            )?;
            t.columns = columns;
            if stale {
                StaleRowsAfterSchemaChange {
                    table: &t.source_name,
                }
                .emit();
            }
            return Ok(i);
        }
        let now = self.catalog_columns(schema, name, oid).await?;
        let (catalog, exact) = self.catalog_at_message(oid, now, &columns);
        let lsn = self.change_lsn();
        // A streamed message's place, where a schema change it makes is recorded.
        let at = self.txn.filter(|_| oid.is_some()).map(|t| t.seq);
        // Domains and arrays of domains or enums take their base type in new tables.
        let model: Vec<_> = columns
            .iter()
            .map(|c| {
                let mut m = c.to_model();
                m.kind = wanted_kind(c, &catalog);
                m
            })
            .collect();
        // Whether the schema change left rows without values no change carries.
        let mut stale = false;
        let (cfg_schema, cfg_name) = source.split_once('.').unwrap_or(("public", source));
        let table_name = iceberg_table_name(cfg_schema, cfg_name);
        let mode = self.cfg.mode_for(&source_name);
        let mut mirror = if mode.mirror() {
            Some(
                TableSink::open_mirror(
                    self.committer.clone(),
                    &self.namespace,
                    &table_name,
                    MirrorSource {
                        table: &source_name,
                        columns: &model,
                        index_budget: self.cfg.mirror_index_memory,
                        compaction: self.options.mirror_compaction,
                        whole_row: full_identity.as_ref().is_some_and(|k| k.is_empty()),
                    },
                    &self.options.properties,
                    self.secrets.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let mut changelog = if mode.changelog() {
            let changelog_name = if mode.mirror() {
                format!("{table_name}{CHANGELOG_SUFFIX}")
            } else {
                table_name
            };
            let cols = model.clone();
            Some(
                TableSink::open_or_create(
                    self.committer.clone(),
                    &self.namespace,
                    &changelog_name,
                    Some(&source_name),
                    move || {
                        let s = changelog_schema(&cols)?;
                        let p = changelog_partition(&s)?;
                        Ok((s, Some(p)))
                    },
                    &self.options.properties,
                    self.secrets.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        // Registered from the catalog before streaming (`oid` none), a table that was copied
        // and streamed before keeps its schema: the stream first replays what it did not
        // commit, with Relation messages of that time, and follows the changes made since in
        // their place. Evolved to the catalog now, the replayed rows of a column renamed
        // while the agent was stopped went to a new column under the old name.
        let state = changelog.as_ref().or(mirror.as_ref());
        let pending = oid.is_none()
            && state.is_some_and(|s| s.snapshot_done())
            && changelog
                .iter()
                .chain(mirror.iter())
                .all(|s| s.property(SOURCE_COLUMNS_PROPERTY).is_some());
        let mut changes = Vec::new();
        let described = match (oid, exact) {
            (None, _) => Described::Catalog,
            (Some(_), false) => Described::FirstMessage,
            (Some(_), true) => Described::AfterAChange,
        };
        if !pending {
            if let Some(m) = mirror.as_mut() {
                // The key as the source has it now: a table whose key changed while the agent
                // was stopped (or created again with another) has the old one in its metadata.
                let k = wanted_key(&columns, full_identity.as_deref(), m.mirror_key());
                let e = evolve(m, &columns, &catalog, (lsn, at), Some(&k), described).await?;
                stale = e.stale;
                changes = e.changes;
            }
            if let Some(c) = changelog.as_mut() {
                let e = evolve(c, &columns, &catalog, (lsn, at), None, described).await?;
                stale = e.stale;
                // The changelog reports the column changes; only the mirror has a key.
                changes.retain(|c| matches!(c, ColumnChange::Key(_)));
                changes.splice(0..0, e.changes);
            }
            report_changes(&self.metrics, &source_name, &[], &columns, &changes);
        }
        let confirmed = self.positions.confirmed();
        for s in changelog.iter_mut().chain(mirror.iter_mut()) {
            s.set_confirmed(confirmed);
        }
        let (sink, mirror) = match changelog {
            Some(c) => (c, mirror),
            None => match mirror {
                Some(m) => (m, None),
                None => {
                    return Err(PipelineError::State(format!(
                        "table {source_name}: its mode writes no table"
                    )))
                }
            },
        };
        // Until its first Relation message the table's builders hold the columns the schema has.
        let batch_columns: Vec<RelationColumn> = if pending {
            columns
                .iter()
                .filter(|c| sink.schema().field_by_name(&c.name).is_some())
                .cloned()
                .collect()
        } else {
            columns.clone()
        };
        let metrics = self.metrics.table(&source_name);
        let iceberg_name = sink.name();
        let committed = sink.last_lsn;
        self.tables.push(TableState {
            source_name: source_name.clone(),
            current: format!("{schema}.{name}"),
            batch: TableBatch::new(
                sink.batch_schema(),
                sink.batch_arrow_schema(),
                &batch_columns,
                |c| binary_oid(c, &catalog),
            )?,
            sink,
            mirror,
            columns,
            metrics,
            dirty: false,
            touched_in: Lsn::ZERO,
            fresh: Vec::new(),
            counts: [0; 4],
            counted: [0; 4],
            full_identity,
            copied: false,
            relation_streamed: oid.is_some(),
            pending,
            replayed_shape: false,
            mirror_names: Vec::new(),
        });
        let i = self.tables.len() - 1;
        status::update(&self.status, |s| {
            let e = s.tables.entry(source_name).or_default();
            e.iceberg_table = iceberg_name;
            e.committed_lsn = committed.pg();
        });
        if stale {
            StaleRowsAfterSchemaChange {
                table: &self.tables[i].source_name,
            }
            .emit();
        }
        Ok(i)
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
        self.change_with(oid, op, tuple, None).await
    }

    /// [`Self::change`] taking the columns `tuple` did not send (unchanged TOAST values) from
    /// `fallback` when it has them.
    async fn change_with(
        &mut self,
        oid: u32,
        op: Op,
        tuple: Option<&TupleData<'_>>,
        fallback: Option<&TupleData<'_>>,
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
            };
            self.dead_letter(letter);
        } else {
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
        if let Some(batch) = self.tables[i].batch.finish()? {
            self.write_batch(i, batch).await?;
        }
        self.limit_open_writers(i).await
    }

    /// Hand `batch` to table `i`'s data-file writers (the mirror's too).
    async fn write_batch(
        &mut self,
        i: usize,
        batch: arrow_array::RecordBatch,
    ) -> Result<(), PipelineError> {
        let t = &mut self.tables[i];
        if let Some(m) = t.mirror.as_mut() {
            let b = if t.mirror_names.is_empty() {
                batch.clone()
            } else {
                crate::sink::iceberg::project::renamed(&batch, &t.mirror_names)
                    .map_err(|e| PipelineError::State(format!("mirror batch: {e}")))?
            };
            m.write(b).await?;
        }
        t.sink.write(batch).await?;
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
        self.commit_buffered(Some(client)).await
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
            self.flush_dlq(lsn).await?;
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
            if let Some(m) = t.mirror.as_mut() {
                compact_mirror(m, pipeline, &self.metrics).await;
            }
            compact_mirror(&mut t.sink, pipeline, &self.metrics).await;
        }
        Ok((committed_events, dead_letters))
    }

    async fn flush_dlq(&mut self, lsn: Lsn) -> Result<(), PipelineError> {
        self.flush_dlq_rows(lsn).await
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
        // Tables from before the per-table floors: the table-wide LSN.
        let legacy = floors.is_empty().then_some((sink.last_lsn, u64::MAX));
        self.dlq_rows.retain(|r| {
            let floor = floors.get(&r.source_table).copied().or(legacy);
            floor.is_none_or(|f| (r.lsn, r.seq) > f)
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
    let (status, files_removed, summary) = match sink.compact_mirror().instrument(span).await {
        Ok(None) => return,
        Ok(Some(c)) => (
            "ok",
            c.files_removed(),
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
        Err(SinkError::Conflict(m)) => ("conflict", 0, m),
        Err(e) => ("failed", 0, e.to_string()),
    };
    TableMaintained {
        source: pipeline,
        table: &table,
        action: "compact",
        status,
        files_removed,
        summary: &summary,
        duration: started.elapsed(),
    }
    .emit(metrics.global());
}

/// Events handled per trip through the apply loop's select, at most (timers and control
/// are looked at between trips).
const DRAIN_EVENTS: usize = 1024;

/// Table property: what the source calls the table now, after a rename (a restart reads it).
pub(super) const SOURCE_NAME_PROPERTY: &str = "philotes.source-name";

/// Table property: the source relation's OID when it was last copied or streamed (a table
/// dropped and created again is another relation: its rows are copied again).
pub(super) const SOURCE_OID_PROPERTY: &str = "philotes.source-oid";

/// The type of a relation column's binary form: what the catalog says for the column with
/// that type (a domain's base type, text for an enum), else the type itself.
fn binary_oid(c: &RelationColumn, catalog: &[CatalogColumn]) -> u32 {
    catalog
        .iter()
        .find(|k| k.name == c.name && k.type_oid == c.type_oid)
        .map_or(c.type_oid, |k| k.binary_oid)
}

/// `columns` under the names of their Iceberg fields (see [`field_name`]): the pipeline's
/// tables hold them so, while the source's SQL (the snapshot's select list) uses the source's.
fn as_fields(columns: Vec<RelationColumn>) -> Vec<RelationColumn> {
    renamed_as_fields(columns, |c| &mut c.name)
}

/// The catalog's columns under the names of their Iceberg fields, to match [`as_fields`].
fn catalog_as_fields(columns: Vec<CatalogColumn>) -> Vec<CatalogColumn> {
    renamed_as_fields(columns, |c| &mut c.name)
}

fn renamed_as_fields<T>(mut columns: Vec<T>, name: fn(&mut T) -> &mut String) -> Vec<T> {
    for c in &mut columns {
        let n = name(c);
        if let Some(field) = field_name(n) {
            *n = field;
        }
    }
    columns
}

/// The kind a relation column takes in Iceberg: its base type's for a domain (or an array of
/// domains or enums) when the catalog still has the column with that type, else its own.
fn wanted_kind(c: &RelationColumn, catalog: &[CatalogColumn]) -> ColumnKind {
    catalog
        .iter()
        .find(|k| k.name == c.name && k.type_oid == c.type_oid)
        .and_then(|k| k.kind.clone())
        .unwrap_or_else(|| ColumnKind::from_oid(c.type_oid, c.type_modifier))
}

/// Where a table's columns come from, which says what the catalog's numbers (read now) tell.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Described {
    /// The catalog, now (what a copy reads): the columns have its numbers, and a table
    /// recreated with other numbers is recorded with them.
    Catalog,
    /// The table's first Relation message in this attempt: it may predate the catalog.
    FirstMessage,
    /// A later Relation message, sent after a change of the table.
    AfterAChange,
}

/// Make the Iceberg schema follow `columns`, in one schema update: a column the table lacks
/// is added, unless the catalog says it is a column the table holds under its old name (same
/// `attnum`: a rename, the field id kept); a type Iceberg promotes is widened in place; any
/// other type change keeps the old column as `<name>__before_<lsn>` beside a new column of the
/// new type. A dropped column stays (null from then on). A mirror whose key is not `key` is
/// keyed by it from then on. Returns what changed.
async fn evolve(
    sink: &mut TableSink,
    columns: &[RelationColumn],
    catalog: &[CatalogColumn],
    (lsn, at): (Lsn, Option<u64>),
    key: Option<&MirrorKey>,
    described: Described,
) -> Result<Evolved, PipelineError> {
    let schema = sink.schema().clone();
    let number: HashMap<&str, i32> = catalog
        .iter()
        .map(|c| (c.name.as_str(), c.attnum))
        .collect();
    let recorded: HashMap<i32, i32> = sink
        .property(SOURCE_COLUMNS_PROPERTY)
        .map(|v| parse_source_columns(&v))
        .transpose()?
        .unwrap_or_default();
    let in_relation: std::collections::HashSet<&str> =
        columns.iter().map(|c| c.name.as_str()).collect();
    // Whether the catalog's numbers place the columns (see `numbers_place`); then each
    // column's field is the one recorded with its number, whatever its name.
    let by_number = numbers_place(
        &schema,
        &recorded,
        columns,
        catalog,
        matches!(described, Described::AfterAChange),
    );
    let mut placed: HashMap<&str, Option<NestedFieldRef>> = if by_number {
        columns
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    numbered_field(&schema, &recorded, &number, c),
                )
            })
            .collect()
    } else {
        HashMap::new()
    };
    // Two columns in one field would leave one without a field (a record out of step with
    // the catalog): names place them then.
    let ids: Vec<i32> = placed.values().flatten().map(|f| f.id).collect();
    let by_number =
        by_number && ids.len() == ids.iter().collect::<std::collections::HashSet<_>>().len();
    if !by_number {
        placed.clear();
    }
    let claimed: std::collections::HashSet<i32> = placed.values().flatten().map(|f| f.id).collect();
    // A field named like a column but holding another source column that is gone (dropped,
    // or renamed away and its name taken): it keeps its values under a name of its own.
    let mut taken: std::collections::HashSet<String> = schema
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let mut aside = |name: &str| {
        let base = format!("{name}__before_{}", lsn.get());
        let mut n = base.clone();
        let mut k = 1;
        while !taken.insert(n.clone()) {
            k += 1;
            n = format!("{base}_{k}");
        }
        n
    };
    let unclaimed = |name: &str| {
        schema
            .field_by_name(name)
            .filter(|g| !claimed.contains(&g.id))
    };
    let mut changes = Vec::new();
    // Columns dropped and added again under their old name: a new column to PostgreSQL
    // (another number; its old values are gone), which must not inherit the old field's.
    let mut readded = Vec::new();
    for c in columns {
        let want = wanted_kind(c, catalog);
        let field = if by_number {
            placed.get(c.name.as_str()).cloned().flatten()
        } else {
            match schema.field_by_name(&c.name) {
                Some(f) => Some(f.clone()),
                None => number
                    .get(c.name.as_str())
                    .and_then(|n| recorded.iter().find(|(_, a)| *a == n).map(|(f, _)| *f))
                    .and_then(|id| schema.field_by_id(id).cloned())
                    .filter(|f| {
                        !in_relation.contains(f.name.as_str()) && !f.name.starts_with("_cdc_")
                    }),
            }
        };
        let Some(f) = field else {
            if by_number && unclaimed(&c.name).is_some() {
                changes.push(ColumnChange::Replace {
                    name: c.name.clone(),
                    keep_as: aside(&c.name),
                    kind: want,
                });
                readded.push(c.name.clone());
            } else {
                changes.push(ColumnChange::Add {
                    name: c.name.clone(),
                    kind: want,
                });
            }
            continue;
        };
        if f.name != c.name {
            if let Some(g) = by_number.then(|| unclaimed(&c.name)).flatten() {
                changes.push(ColumnChange::Rename {
                    from: g.name.clone(),
                    to: aside(&g.name),
                });
            }
            changes.push(ColumnChange::Rename {
                from: f.name.clone(),
                to: c.name.clone(),
            });
        }
        let have = kind_of(&f.field_type);
        let raw = ColumnKind::from_oid(c.type_oid, c.type_modifier);
        match have {
            Some(h) if h == want => {}
            Some(h) if promotable(&h, &want) => changes.push(ColumnChange::Widen {
                name: c.name.clone(),
                kind: want,
            }),
            // A domain (or an array of them) in a table created before domains took their
            // base type: the column stays text, the values arrive as text.
            Some(ColumnKind::Text) if raw == ColumnKind::Text => {}
            _ => changes.push(ColumnChange::Replace {
                name: c.name.clone(),
                keep_as: aside(&c.name),
                kind: want,
            }),
        }
    }
    // The key now, under the names it has before these changes (a renamed key column is
    // the same key).
    let before = |n: &String| {
        changes
            .iter()
            .find_map(|c| match c {
                ColumnChange::Rename { from, to } if to == n => Some(from.clone()),
                _ => None,
            })
            .unwrap_or_else(|| n.clone())
    };
    let rekey = key.filter(|k| {
        let was = MirrorKey {
            columns: k.columns.iter().map(before).collect(),
            whole_row: k.whole_row,
        };
        sink.mirror_key().is_some_and(|now| now != was) || sink.identifiers_lag(&was)
    });
    if let Some(k) = rekey {
        changes.push(ColumnChange::Key(k.clone()));
    }
    // Record what changed, and which field holds which source column as of this relation.
    let properties = if changes.is_empty() {
        PropertyChanges::default()
    } else {
        let detail = changes
            .iter()
            .map(ColumnChange::describe)
            .collect::<Vec<_>>()
            .join("; ");
        let mut p = change_record(sink, lsn, &detail);
        // Where in the stream the schema changed, for a replay that meets older messages.
        if let Some(seq) = at {
            let record = sink.schema_change_at(lsn, seq);
            p.set.extend(record.map_err(PipelineError::State)?);
        }
        p
    };
    let stale = gives_old_rows_values(&changes, catalog, &readded);
    // The catalog is read now, the relation is of its point in the stream: a column renamed
    // or dropped later (in the same transaction, say) keeps the number its field had.
    // A field keeps the number of the source column it was made for: the catalog may
    // already show a later column under its name (dropped and added again after this
    // relation's point), which must not take the field over in the record.
    let numbers: HashMap<String, i32> = columns
        .iter()
        .filter_map(|c| {
            let fresh = changes.iter().any(|ch| {
                matches!(ch, ColumnChange::Add { name, .. } | ColumnChange::Replace { name, .. } if *name == c.name)
            });
            let from = changes
                .iter()
                .find_map(|ch| match ch {
                    ColumnChange::Rename { from, to } if *to == c.name => Some(from.as_str()),
                    _ => None,
                })
                .unwrap_or(c.name.as_str());
            let kept = if fresh || matches!(described, Described::Catalog) {
                None
            } else {
                schema
                    .field_by_name(from)
                    .and_then(|f| recorded.get(&f.id).copied())
            };
            let n = kept.or_else(|| number.get(c.name.as_str()).copied())?;
            Some((c.name.clone(), n))
        })
        .collect();
    let rekeyed = sink
        .change_columns(&changes, properties, SOURCE_COLUMNS_PROPERTY, &numbers)
        .await?;
    if let (Some(k), Some(r)) = (rekey, rekeyed) {
        MirrorRekeyed {
            table: &sink.name(),
            key: &k.columns.join(", "),
            whole_row: k.whole_row,
            rows: r.rows,
            duplicates: r.duplicates,
            unkeyed: r.unkeyed,
            took: r.took,
        }
        .emit();
    }
    Ok(Evolved { changes, stale })
}

/// The key a mirror of `columns` should have: its key columns (the replica identity's, or the
/// primary key of a FULL table); a FULL table without a known primary key keeps a key it has,
/// else is identified by its whole row.
fn wanted_key(
    columns: &[RelationColumn],
    full_identity: Option<&[usize]>,
    now: Option<MirrorKey>,
) -> MirrorKey {
    match full_identity {
        Some([]) => now
            .filter(|k| !k.columns.is_empty() || k.whole_row)
            .unwrap_or(MirrorKey {
                columns: Vec::new(),
                whole_row: true,
            }),
        _ => MirrorKey {
            columns: columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect(),
            whole_row: false,
        },
    }
}

/// The names of the fields of `sink` holding `columns` now, when a schema change was committed
/// to it after `(lsn, seq)`: a replayed Relation message of before the change, placed through
/// the schema its rows were first written with (by name there, by field id from there). None
/// when the message is of the current schema, or the older one no longer places every column
/// (it is followed as a change then, as before such schemas were recorded).
fn replayed_names(
    sink: &TableSink,
    columns: &[RelationColumn],
    lsn: Lsn,
    seq: u64,
) -> Result<Option<Vec<String>>, PipelineError> {
    let Some(then) = sink.schema_at(lsn, seq).map_err(PipelineError::State)? else {
        return Ok(None);
    };
    let (now, batch) = (sink.schema(), sink.batch_schema());
    let names = columns
        .iter()
        .map(|c| {
            let f = now.field_by_id(then.field_by_name(&c.name)?.id)?;
            batch.field_by_name(&f.name).map(|_| f.name.clone())
        })
        .collect::<Option<Vec<_>>>();
    if names.is_none() {
        tracing::debug!(table = %sink.name(), lsn = %lsn.pg(), "a replayed relation is not placed by the schema of its time: followed as a change");
    }
    Ok(names)
}

/// Whether the catalog's column numbers (read now) place a Relation message's `columns` in
/// their fields: the message is of the catalog's time (the catalog has all its columns, in
/// its order, with its types, and a column only the catalog has is newer than all of them:
/// added since), and it was sent after a change in this attempt or names a column the table
/// lacks. The first
/// message of an attempt may predate a change the catalog already shows (a column dropped and
/// added again, names swapped): names place its columns then, as they were when it was sent.
///
/// A column whose type the catalog shows changed is of the message's time still when its
/// number is at most that of a column known from before the message (its field recorded
/// with the number the catalog has): one dropped and added again since would have a number
/// above every number of that time. Its type changed later (`ALTER … TYPE` keeps the number),
/// which a later message brings.
fn numbers_place(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    columns: &[RelationColumn],
    catalog: &[CatalogColumn],
    after_a_change: bool,
) -> bool {
    let both: Vec<&RelationColumn> = columns
        .iter()
        .filter(|c| catalog.iter().any(|k| k.name == c.name))
        .collect();
    let listed: Vec<&CatalogColumn> = catalog
        .iter()
        .filter(|k| columns.iter().any(|c| c.name == k.name))
        .collect();
    // A column of the message the catalog lacks was dropped or renamed since: the numbers
    // are of a later table (`DROP d; RENAME c TO d` after the message would put `c` and `d`
    // in one field). A column the message lacks must be newer than all it has: one added
    // since. An older one was renamed since (`RENAME price TO price_old; ADD price` after
    // the message's point: the names it has would all line up).
    let newest = listed.iter().map(|k| k.attnum).max().unwrap_or(0);
    let known = listed
        .iter()
        .filter(|k| {
            schema
                .field_by_name(&k.name)
                .is_some_and(|f| recorded.get(&f.id) == Some(&k.attnum))
        })
        .map(|k| k.attnum)
        .max()
        .unwrap_or(0);
    let of_catalog = both.len() == columns.len()
        && both.len() == listed.len()
        && both
            .iter()
            .zip(&listed)
            .all(|(c, k)| c.name == k.name && (c.type_oid == k.type_oid || k.attnum <= known))
        && catalog
            .iter()
            .filter(|k| !columns.iter().any(|c| c.name == k.name))
            .all(|k| k.attnum > newest);
    of_catalog
        && (after_a_change
            || columns
                .iter()
                .any(|c| schema.field_by_name(&c.name).is_none()))
}

/// The field holding column `c` by the numbers: the one recorded with its number now (a
/// rename keeps the number); else its name's field, unless that one was recorded with
/// another number (it held another source column, renamed away or dropped: `c` is new).
fn numbered_field(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    number: &HashMap<&str, i32>,
    c: &RelationColumn,
) -> Option<NestedFieldRef> {
    let n = number.get(c.name.as_str()).copied();
    let by_number = n.and_then(|n| {
        recorded
            .iter()
            .filter(|(_, a)| **a == n)
            .filter_map(|(id, _)| schema.field_by_id(*id))
            .filter(|f| !f.name.starts_with("_cdc_"))
            .max_by_key(|f| f.id)
    });
    if let Some(f) = by_number {
        return Some(f.clone());
    }
    let f = schema.field_by_name(&c.name)?;
    (n.is_none() || !recorded.contains_key(&f.id)).then(|| f.clone())
}

/// Whether the numbers put a column of `columns` in another field than its name's (dropped
/// and added again, names swapped): the Relation message looks unchanged then.
fn renumbered(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    number: &HashMap<&str, i32>,
    columns: &[RelationColumn],
) -> bool {
    columns.iter().any(|c| {
        numbered_field(schema, recorded, number, c).map(|f| f.id)
            != schema.field_by_name(&c.name).map(|f| f.id)
    })
}

/// What [`evolve`] did.
#[derive(Default)]
struct Evolved {
    changes: Vec<ColumnChange>,
    /// The changes give rows written before them values no change carries.
    stale: bool,
}

/// Whether `changes` give the rows that existed before them values the stream never sends: a
/// column added with a default (PostgreSQL fills it in without writing the rows), or a type
/// Iceberg cannot promote (the rows were rewritten with new values, unpublished).
fn gives_old_rows_values(
    changes: &[ColumnChange],
    catalog: &[CatalogColumn],
    readded: &[String],
) -> bool {
    let defaulted = |name: &String| catalog.iter().any(|k| &k.name == name && k.has_default);
    changes.iter().any(|c| match c {
        ColumnChange::Add { name, .. } => defaulted(name),
        // A column added again is new: like an added one, it only has values with a default.
        ColumnChange::Replace { name, .. } if readded.contains(name) => defaulted(name),
        ColumnChange::Replace { .. } => true,
        _ => false,
    })
}

/// Table property prefix: one record per schema change, `philotes.schema-change.<lsn>`.
const SCHEMA_CHANGE_PREFIX: &str = "philotes.schema-change.";

/// Schema-change records a table keeps (the oldest go): they grow with DDL, not data.
const SCHEMA_CHANGES_KEPT: usize = 100;

/// The properties recording a change at `lsn`, dropping the oldest records past
/// [`SCHEMA_CHANGES_KEPT`].
fn change_record(sink: &TableSink, lsn: Lsn, detail: &str) -> PropertyChanges {
    let key = format!("{SCHEMA_CHANGE_PREFIX}{}", lsn.get());
    let mut older: Vec<(u64, String)> = sink
        .properties_with_prefix(SCHEMA_CHANGE_PREFIX)
        .into_iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, _)| (k[SCHEMA_CHANGE_PREFIX.len()..].parse().unwrap_or(0), k))
        .collect();
    older.sort_unstable();
    let excess = (older.len() + 1).saturating_sub(SCHEMA_CHANGES_KEPT);
    PropertyChanges {
        set: HashMap::from([(key, detail.to_string())]),
        remove: older.into_iter().take(excess).map(|(_, k)| k).collect(),
    }
}

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

/// `field:attnum,…` → attnum by field id. An entry that cannot be read is an error: dropping
/// it would make a renamed column look new (its values would go to a fresh, empty column).
fn parse_source_columns(v: &str) -> Result<HashMap<i32, i32>, PipelineError> {
    schema::parse_source_columns(v).map_err(PipelineError::State)
}

/// Log and count the changes of `table`, and the columns the source dropped (they stay in
/// Iceberg, null from then on).
fn report_changes(
    metrics: &SourceMetrics,
    table: &str,
    before: &[RelationColumn],
    after: &[RelationColumn],
    changes: &[ColumnChange],
) {
    for c in changes {
        SchemaChanged {
            table,
            kind: c.label(),
            detail: &c.describe(),
        }
        .emit(metrics);
    }
    let renamed: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Rename { from, .. } => Some(from.as_str()),
            _ => None,
        })
        .collect();
    for gone in before
        .iter()
        .filter(|b| !after.iter().any(|a| a.name == b.name) && !renamed.contains(&b.name.as_str()))
    {
        SchemaChanged {
            table,
            kind: "drop",
            detail: &format!("drop {} (kept in Iceberg, null from now on)", gone.name),
        }
        .emit(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ErrorType;

    fn rel(names: &[&str]) -> Vec<RelationColumn> {
        names
            .iter()
            .map(|n| RelationColumn {
                key: *n == "id",
                name: n.to_string(),
                type_oid: 23,
                type_modifier: -1,
            })
            .collect()
    }

    fn cat(columns: &[(&str, i32)]) -> Vec<CatalogColumn> {
        columns
            .iter()
            .map(|(n, a)| CatalogColumn {
                name: n.to_string(),
                attnum: *a,
                type_oid: 23,
                type_modifier: -1,
                kind: None,
                binary_oid: 23,
                has_default: false,
            })
            .collect()
    }

    /// Fields id 1..: `id`, `price`, `v`, recorded as source columns 1, 2, 3.
    fn recorded_schema() -> (iceberg::spec::Schema, HashMap<i32, i32>) {
        use iceberg::spec::{NestedField, PrimitiveType, Type};
        let s = iceberg::spec::Schema::builder()
            .with_fields(
                ["id", "price", "v"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        NestedField::optional(i as i32 + 1, *n, Type::Primitive(PrimitiveType::Int))
                            .into()
                    })
                    .collect::<Vec<_>>(),
            )
            .build()
            .unwrap();
        (s, HashMap::from([(1, 1), (2, 2), (3, 3)]))
    }

    #[test]
    fn numbers_place_a_relation_only_of_the_catalogs_time() {
        let (s, recorded) = recorded_schema();
        let place = |names: &[&str], catalog: &[CatalogColumn], after_a_change| {
            numbers_place(&s, &recorded, &rel(names), catalog, after_a_change)
        };
        // A type the catalog shows changed since, of a column no newer than one known from
        // before the message (recorded with its number): `ALTER … TYPE`, the message of its
        // time still.
        let mut retyped = cat(&[("id", 1), ("price", 2), ("v", 3)]);
        retyped[1].type_oid = 25;
        assert!(place(&["id", "price", "v"], &retyped, true));
        // Dropped and added again since (new numbers, the first with another type): nothing
        // known is newer, the numbers are of a later table.
        let mut readded = cat(&[("id", 1), ("price", 4), ("v", 5)]);
        readded[1].type_oid = 25;
        assert!(!place(&["id", "price", "v"], &readded, true));
        // RENAME price TO price_old; ADD price: the message after it is the catalog's.
        let now = cat(&[("id", 1), ("price_old", 2), ("v", 3), ("price", 4)]);
        assert!(place(&["id", "price_old", "v", "price"], &now, false));
        // The message from before it has `price` before `v`: names place it.
        assert!(!place(&["id", "price", "v"], &now, true));
        // A first message naming only known columns may predate a swap the catalog shows.
        let swapped = cat(&[("id", 1), ("v", 2), ("price", 3)]);
        assert!(!place(&["id", "v", "price"], &swapped, false));
        assert!(place(&["id", "v", "price"], &swapped, true));
        // A column added since (the newest) leaves the rest comparable; one dropped since
        // (not in the catalog) or renamed since (an older column the message lacks) not.
        let dropped = cat(&[("id", 1), ("v", 3)]);
        assert!(!place(&["id", "price", "v"], &dropped, true));
        // `DROP v; RENAME price TO v` after the message: by the numbers `price` and `v`
        // would both be the old `price`.
        let moved = cat(&[("id", 1), ("v", 2)]);
        assert!(!place(&["id", "price", "v"], &moved, true));
        let added = cat(&[("id", 1), ("price", 2), ("v", 3), ("z", 4)]);
        assert!(place(&["id", "price", "v"], &added, true));
        let renamed = cat(&[("id", 1), ("cost", 2), ("v", 3)]);
        assert!(!place(&["id", "price", "v"], &renamed, true));
        // The last column renamed and a new one under its name after the message: the
        // columns the message names line up, the renamed one is older than the new one.
        let last = cat(&[("id", 1), ("v", 2), ("price_old", 3), ("price", 4)]);
        assert!(!place(&["id", "v", "price"], &last, true));
        assert!(place(&["id", "v", "price_old", "price"], &last, true));
    }

    #[test]
    fn a_column_is_placed_in_the_field_recorded_with_its_number() {
        let (s, recorded) = recorded_schema();
        let now = cat(&[("id", 1), ("price_old", 2), ("v", 3), ("price", 4)]);
        let number: HashMap<&str, i32> = now.iter().map(|c| (c.name.as_str(), c.attnum)).collect();
        let field = |n: &str| numbered_field(&s, &recorded, &number, &rel(&[n])[0]).map(|f| f.id);
        assert_eq!(field("price_old"), Some(2), "renamed: the old field");
        assert_eq!(field("price"), None, "new under the old name: a new field");
        assert_eq!(field("v"), Some(3));
        assert!(renumbered(
            &s,
            &recorded,
            &number,
            &rel(&["id", "price", "v"])
        ));
        assert!(!renumbered(&s, &recorded, &number, &rel(&["id", "v"])));
        // A name the catalog no longer has (renamed later) keeps its field.
        let later = cat(&[("id", 1), ("cost", 2), ("v", 3)]);
        let number: HashMap<&str, i32> =
            later.iter().map(|c| (c.name.as_str(), c.attnum)).collect();
        assert_eq!(
            numbered_field(&s, &recorded, &number, &rel(&["price"])[0]).map(|f| f.id),
            Some(2)
        );
    }

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

    #[test]
    fn source_columns_read_and_a_malformed_entry_is_an_error() {
        let m = parse_source_columns("1:1, 2:3,").unwrap();
        assert_eq!(m, HashMap::from([(1, 1), (2, 3)]));
        assert!(parse_source_columns("").unwrap().is_empty());
        for bad in ["1:1,2", "a:1", "1:b"] {
            let e = parse_source_columns(bad).unwrap_err();
            assert_eq!(e.error_type(), ErrorType::State, "{bad}");
        }
    }
}
