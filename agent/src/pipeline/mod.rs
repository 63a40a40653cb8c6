//! One task per pipeline: connect, stream, batch, commit, acknowledge; retry on failure.

mod apply;
pub mod batch;
pub mod dlq;
mod leader;
mod monitor;
mod position;
pub mod requests;
pub mod retry;
mod spool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use iceberg::Catalog;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{HaConfig, PipelineConfig};
use crate::model::Lsn;
use crate::sink::iceberg::commit::Committer;
use crate::sink::iceberg::table::TableOptions;
use crate::sink::iceberg::SinkError;
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::{Session, SourceError};
use crate::telemetry::events::{
    CommitFenced, ErrorType, InProgressStreamingOff, InProgressStreamingOn, LeadershipLost,
    PartitionsMoved, PipelineRetrying, StateChanged, TableLeftPublication,
};
pub use crate::telemetry::status::{self, PipelineStatus, SharedStatus};
use crate::telemetry::{Metrics, PipelineState, SourceMetrics};
pub use apply::iceberg_table_name;

/// What an operator asked the pipeline to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stream.
    Run,
    /// Stop reading after flushing what is buffered; keep the slot.
    Pause,
}

/// A pipeline failure.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Source side.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Iceberg side.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Building a batch.
    #[error(transparent)]
    Batch(#[from] batch::BatchError),
    /// A source schema change Iceberg cannot follow.
    #[error("schema change: {0}")]
    Schema(String),
    /// The replication stream ended.
    #[error("replication stream ended: {0}")]
    StreamEnded(String),
    /// A table joined the publication and needs its initial snapshot: stream again.
    #[error("table {0} joined the publication")]
    NewTable(String),
    /// A table is to be copied again (asked for, or re-created): stream again after it.
    #[error("a table is to be copied again")]
    CopyAgain,
    /// Mirror rows of this table lack a key value: it is marked to be copied again.
    #[error("table {0} is to be copied again: mirror rows without a key value")]
    RowsWithoutKey(String),
    /// A binary stream met a column it cannot read in binary: stream again in text.
    #[error("table {0} has a column the agent reads in text only")]
    TextNeeded(String),
    /// The local spool of a streamed in-progress transaction failed (disk full, I/O error).
    #[error("spooling a streamed transaction: {0}")]
    Spool(String),
    /// Pipeline state stored in a table (e.g. a copy's progress) cannot be read.
    #[error("stored state: {0}")]
    State(String),
    /// `[ha]`: this agent no longer leads the pipeline (its heartbeat failed).
    #[error("leadership lost")]
    LeadershipLost,
    /// Whole transactions were received long enough after a decoding failure: stream again
    /// with transactions in progress.
    #[error("receiving transactions in progress again")]
    InProgressAgain,
}

impl PipelineError {
    /// The `error_type` label for `philotes_cdc_errors_total`.
    pub fn error_type(&self) -> ErrorType {
        match self {
            PipelineError::Source(e) => e.error_type(),
            PipelineError::Sink(e) => e.error_type(),
            PipelineError::Batch(_) => ErrorType::Batch,
            PipelineError::Schema(_) => ErrorType::Schema,
            // A new table is not a failure and never counted: the stream restarts at once.
            PipelineError::StreamEnded(_)
            | PipelineError::NewTable(_)
            | PipelineError::CopyAgain
            | PipelineError::RowsWithoutKey(_)
            | PipelineError::TextNeeded(_)
            | PipelineError::InProgressAgain
            | PipelineError::LeadershipLost => ErrorType::Connection,
            PipelineError::Spool(_) => ErrorType::Spool,
            PipelineError::State(_) => ErrorType::State,
        }
    }
}

/// The walsender ended the stream with an internal error (SQLSTATE XX000, what the
/// decoder's own checks raise), not a connection loss or a refusal.
fn decoding_failed(e: &PipelineError) -> bool {
    matches!(e, PipelineError::StreamEnded(m) if m.contains("(SQLSTATE XX000)"))
}

/// Whole transactions after the server failed to decode one in progress: for
/// [`WHOLE_FIRST`] after the first failure, twice as long after each next one (up to
/// [`WHOLE_MAX`]), since the transaction it failed on may still be open when the wait ends.
#[derive(Clone, Copy, Debug, PartialEq)]
struct WholeTransactions {
    /// Until then.
    end: Instant,
    /// How long this time.
    wait: Duration,
}

/// Whole transactions after a first decoding failure: long enough for most transactions
/// open at the failure to have ended.
const WHOLE_FIRST: Duration = Duration::from_secs(10 * 60);

/// The longest wait, however often the decoder fails.
const WHOLE_MAX: Duration = Duration::from_secs(6 * 60 * 60);

impl WholeTransactions {
    /// The wait after a failure at `now`, given the one before (if any).
    fn after(before: Option<Self>, now: Instant) -> Self {
        let wait = before.map_or(WHOLE_FIRST, |b| (b.wait * 2).min(WHOLE_MAX));
        Self {
            end: now + wait,
            wait,
        }
    }

    /// When whole transactions end, if not yet at `now`.
    fn until(self, now: Instant) -> Option<Instant> {
        (now < self.end).then_some(self.end)
    }
}

/// Handles the API keeps for a running pipeline.
#[derive(Clone)]
pub struct PipelineHandle {
    /// Pipeline name.
    pub name: String,
    /// Live status.
    pub status: SharedStatus,
    /// Pause / resume.
    pub control: watch::Sender<Control>,
    /// Configuration (for tables and namespace).
    pub config: PipelineConfig,
    /// The catalog, for DLQ listing.
    pub catalog: Arc<dyn Catalog>,
    /// Tables to copy again.
    pub copies: Arc<requests::CopyRequests>,
}

impl PipelineHandle {
    /// The `limit` newest rows of this pipeline's dead-letter table, newest first.
    pub async fn dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::model::DeadLetter>, SinkError> {
        crate::sink::iceberg::dead_letters::newest(
            &self.catalog,
            &self.config.namespace_name(),
            limit,
        )
        .await
    }
}

/// Aborts a background task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Decides when a pipeline that failed has recovered: it streams and either committed
/// something or kept streaming for 30 s. Streaming alone is not enough: an attempt can fail
/// again milliseconds after it starts streaming (the same bad spool, the same bad table).
struct Recovery {
    name: String,
    status: SharedStatus,
    failures: Arc<std::sync::atomic::AtomicU32>,
}

impl Recovery {
    fn check(&self, streaming_since: &mut Option<Instant>, committed_at_start: &str) {
        let n = self.failures.load(std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let st = status::snapshot(&self.status);
        if st.state != PipelineState::Streaming {
            *streaming_since = None;
            return;
        }
        let since = *streaming_since.get_or_insert_with(Instant::now);
        if st.committed_lsn != committed_at_start || since.elapsed() >= Duration::from_secs(30) {
            self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(pipeline = %self.name, failed_attempts = n, "pipeline recovered after {n} failed attempt(s)");
        }
    }
}

/// Configured tables the source no longer has under their name but which their Iceberg table
/// says were renamed (`philotes.source-name`, recorded when the stream followed the rename):
/// `tables` gets their name now; returns name now → as configured.
pub async fn renamed_tables(
    catalog: &dyn Catalog,
    namespace: &str,
    session: &mut Session,
    tables: &mut [(String, String)],
) -> Result<std::collections::HashMap<String, String>, SourceError> {
    let mut aliases = std::collections::HashMap::new();
    let ns = iceberg::NamespaceIdent::new(namespace.to_string());
    for (schema, table) in tables.iter_mut() {
        if session.table_exists(schema, table).await? {
            continue;
        }
        let ident = iceberg::TableIdent::new(ns.clone(), apply::iceberg_table_name(schema, table));
        let Ok(t) = catalog.load_table(&ident).await else {
            continue;
        };
        let Some(now) = t
            .metadata()
            .properties()
            .get(apply::SOURCE_NAME_PROPERTY)
            .cloned()
        else {
            continue;
        };
        if let Some((s, n)) = now.split_once('.') {
            tracing::info!(table = %format!("{schema}.{table}"), now = %now, "configured table was renamed in the source: following it under its new name");
            aliases.insert(now.clone(), format!("{schema}.{table}"));
            *schema = s.to_string();
            *table = n.to_string();
        }
    }
    Ok(aliases)
}

/// A configured pipeline, ready to run.
pub struct Pipeline {
    cfg: PipelineConfig,
    url: SourceUrl,
    committer: Committer,
    secrets: Arc<[String]>,
    options: TableOptions,
    metrics: SourceMetrics,
    status: SharedStatus,
    control: watch::Receiver<Control>,
    /// The last attempt ended in an error.
    last_failed: bool,
    /// Failed attempts in a row; reset once an attempt proves it recovered (see
    /// [`Recovery`]).
    failures: Arc<std::sync::atomic::AtomicU32>,
    /// Tables that joined the publication mid-stream (`schema.table`): copied on the next
    /// attempt if still in the publication, else streamed without a copy.
    joined: std::collections::HashSet<String>,
    /// A binary stream met a column it cannot read so: text from now on.
    text_only: bool,
    /// The server failed to decode a transaction while streaming it in progress: whole
    /// transactions, sent at their commit, for a while (see [`WholeTransactions`]).
    whole: Option<WholeTransactions>,
    /// The current attempt receives transactions in progress.
    in_progress: bool,
    /// Tables to copy again (the API's and the monitor's requests).
    copies: Arc<requests::CopyRequests>,
    /// Tables copied again for mirror rows without a key value (once per process).
    healed: std::collections::HashSet<String>,
    /// Mirrors whose key column changed type, reopened once by this process without counting
    /// a failure (a second time is one: it would otherwise retry without a pause).
    retyped: std::collections::HashSet<String>,
    /// The first attempt compared the partitions with the last run's record.
    partitions_checked: bool,
    /// Requests taken from `copies` whose copy has not completed yet.
    pending_copies: std::collections::BTreeMap<String, requests::CopyReason>,
    /// `[ha]`.
    ha: HaConfig,
    /// Never sends: the "leadership lost" signal of an agent without `[ha]`.
    never_lost: watch::Sender<bool>,
}

impl Pipeline {
    /// Build a pipeline and the handle the API uses to observe and control it.
    pub fn new(
        cfg: PipelineConfig,
        committer: Committer,
        secrets: Arc<[String]>,
        options: TableOptions,
        ha: HaConfig,
        metrics: &Metrics,
    ) -> (Self, PipelineHandle) {
        let url = cfg.source.url().clone();
        let status = PipelineStatus::new(&cfg.name);
        let (tx, rx) = watch::channel(Control::Run);
        let metrics = metrics.source(&cfg.name);
        let copies = Arc::new(requests::CopyRequests::default());
        let handle = PipelineHandle {
            copies: copies.clone(),
            name: cfg.name.clone(),
            status: status.clone(),
            control: tx,
            config: cfg.clone(),
            catalog: committer.catalog().clone(),
        };
        (
            Self {
                cfg,
                url,
                committer,
                secrets: secrets.clone(),
                options,
                metrics,
                status,
                control: rx,
                last_failed: false,
                failures: Default::default(),
                joined: Default::default(),
                text_only: false,
                whole: None,
                in_progress: false,
                copies,
                pending_copies: Default::default(),
                healed: Default::default(),
                retyped: Default::default(),
                partitions_checked: false,
                ha,
                never_lost: watch::channel(false).0,
            },
            handle,
        )
    }

    fn failures(&self) -> u32 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_state(&mut self, s: PipelineState) {
        // An attempt after a failure is still a retry until the pipeline copies or streams.
        let s = if s == PipelineState::Starting && self.failures() > 0 {
            PipelineState::Retrying
        } else {
            s
        };
        StateChanged { state: s }.emit(&self.metrics, &self.status);
    }

    /// Run until `shutdown` turns true: stream, and on any error wait with backoff and retry.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut lease: Option<leader::Lease> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.set_state(PipelineState::Starting);
            let started = Instant::now();
            // `[ha]`: only the leader goes on; the lease is kept across failed attempts and
            // given up when it is lost or a commit is fenced.
            if self.ha.enabled && lease.as_ref().is_none_or(|l| l.is_lost()) {
                lease = None;
                let slot = self.cfg.slot_name();
                let contender = leader::Contender {
                    name: &self.cfg.name,
                    url: &self.url,
                    slot: &slot,
                    ha: &self.ha,
                    metrics: &self.metrics,
                    status: &self.status,
                };
                match contender.lead(&mut shutdown).await {
                    Ok(Some(l)) => lease = Some(l),
                    Ok(None) => break,
                    Err(e) => {
                        self.last_failed = true;
                        self.retry_after(e, started, &mut backoff, &mut shutdown)
                            .await;
                        continue;
                    }
                }
                self.set_state(PipelineState::Starting);
            }
            let lost = lease
                .as_ref()
                .map_or_else(|| self.never_lost.subscribe(), leader::Lease::lost);
            let recovery = Recovery {
                name: self.cfg.name.clone(),
                status: self.status.clone(),
                failures: self.failures.clone(),
            };
            let committed_at_start = status::snapshot(&self.status).committed_lsn;
            let result = {
                let attempt = self.stream_once(&mut shutdown, lost);
                tokio::pin!(attempt);
                let mut check = tokio::time::interval(Duration::from_secs(1));
                let mut streaming_since: Option<Instant> = None;
                loop {
                    tokio::select! {
                        r = &mut attempt => break r,
                        _ = check.tick() => recovery.check(&mut streaming_since, &committed_at_start),
                    }
                }
            };
            self.last_failed = result.is_err();
            match result {
                Ok(()) => break,
                // Not a failure: reconnect at once, snapshot the new table, stream on.
                Err(PipelineError::NewTable(table)) => {
                    self.last_failed = false;
                    tracing::info!(pipeline = %self.cfg.name, table, "table joined the publication: taking its initial snapshot");
                    self.joined.insert(table);
                }
                // Not a failure: the next attempt copies the table asked for.
                Err(PipelineError::CopyAgain) => {
                    self.last_failed = false;
                }
                // Not a failure: the next attempt receives transactions in progress again.
                Err(PipelineError::InProgressAgain) => {
                    self.last_failed = false;
                    InProgressStreamingOn {
                        pipeline: &self.cfg.name,
                    }
                    .emit();
                }
                Err(PipelineError::RowsWithoutKey(table)) => {
                    self.last_failed = false;
                    self.healed.insert(table);
                }
                // Not a failure the first time: the next attempt opens the mirror by its new
                // key, finds the rows written before without a value in it, and copies the
                // table again.
                Err(PipelineError::Sink(SinkError::KeyRetyped { table, message }))
                    if self.retyped.insert(table.clone()) =>
                {
                    self.last_failed = false;
                    tracing::info!(pipeline = %self.cfg.name, table, reason = %message, "a mirror key column changed type: opening the mirror again by its new key, then copying its older rows");
                }
                // Not a failure either: nothing of the binary attempt past its last commit is
                // confirmed, so the text stream replays it.
                Err(PipelineError::TextNeeded(table)) => {
                    self.last_failed = false;
                    tracing::info!(pipeline = %self.cfg.name, table, "a column cannot be read in binary: streaming in text");
                    self.text_only = true;
                }
                // The heartbeat said so already: contend again (as standby, most likely).
                Err(PipelineError::LeadershipLost) => {
                    self.last_failed = false;
                    lease = None;
                }
                // Another agent committed to a table first: nothing of this attempt past the
                // table's position may be committed by this one. Step down (with `[ha]`) and
                // start again from what the tables hold.
                Err(PipelineError::Sink(SinkError::Fenced { table, reason })) => {
                    self.last_failed = false;
                    CommitFenced {
                        pipeline: &self.cfg.name,
                        table: &table,
                        reason: &reason,
                    }
                    .emit(&self.metrics);
                    if lease.take().is_some() {
                        LeadershipLost {
                            pipeline: &self.cfg.name,
                            reason: "a commit was fenced: another agent leads",
                        }
                        .emit();
                    }
                    retry::pause(backoff.next_delay(), &mut shutdown).await;
                }
                // PostgreSQL's decoder can fail on a transaction it streams in progress
                // (an internal error, seen with a TRUNCATE in a subtransaction of a large
                // transaction) where decoding the whole transaction at its commit works:
                // counted as a failure, then streamed that way.
                Err(e) if self.in_progress && decoding_failed(&e) => {
                    let whole = WholeTransactions::after(self.whole, Instant::now());
                    InProgressStreamingOff {
                        pipeline: &self.cfg.name,
                        reason: &e.to_string(),
                        for_secs: whole.wait.as_secs(),
                    }
                    .emit();
                    self.whole = Some(whole);
                    self.retry_after(e, started, &mut backoff, &mut shutdown)
                        .await
                }
                Err(e) => {
                    self.retry_after(e, started, &mut backoff, &mut shutdown)
                        .await
                }
            }
        }
        self.set_state(PipelineState::Stopped);
    }

    /// Count a failed attempt and wait the backoff's delay (or until shutdown).
    async fn retry_after(
        &mut self,
        e: PipelineError,
        started: Instant,
        backoff: &mut retry::Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let attempt = self
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1);
        PipelineRetrying {
            pipeline: &self.cfg.name,
            error_type: e.error_type(),
            message: e.to_string(),
            attempt,
            delay,
        }
        .emit(&self.metrics, &self.status);
        retry::pause(delay, shutdown).await;
    }

    /// One connection's life: prepare, stream until shutdown (Ok) or an error.
    async fn stream_once(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        mut lost: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let slot = self.cfg.slot_name();
        let publication = self.cfg.publication_name();
        // Requests from now on end this attempt; those made before are taken here.
        let mut copies = self.copies.subscribe();
        copies.mark_unchanged();
        for (t, r) in self.copies.take() {
            self.pending_copies.entry(t).or_insert(r);
        }
        let mut tables = self.cfg.table_names();
        let mut session = Session::connect(&self.url, &slot, &publication, None).await?;
        session.check_wal_level().await?;
        let aliases = renamed_tables(
            self.committer.catalog().as_ref(),
            &self.cfg.namespace_name(),
            &mut session,
            &mut tables,
        )
        .await?;
        let mut applier = apply::Applier::new(
            &self.cfg,
            self.committer.clone(),
            self.secrets.clone(),
            self.options.clone(),
            self.metrics.clone(),
            self.status.clone(),
        );
        // A table dropped while the agent streams does not stop the others at the next
        // attempt: one that has Iceberg tables is left out, reported (a name that never
        // existed is still refused, and `run` refuses a missing table at start).
        let mut kept = Vec::with_capacity(tables.len());
        for (schema, table) in tables {
            let name = format!("{schema}.{table}");
            let source = aliases.get(&name).unwrap_or(&name);
            if !session.table_exists(&schema, &table).await? && applier.has_tables(source).await? {
                TableLeftPublication {
                    table: &name,
                    publication: &publication,
                }
                .emit(&self.metrics);
                continue;
            }
            kept.push((schema, table));
        }
        let mut tables = kept;
        session.check_tables(&tables).await?;
        session.ensure_publication(&publication, &tables).await?;
        if self.cfg.follow_publication {
            for t in session.publication_tables(&publication).await? {
                if !tables.contains(&t) {
                    tables.push(t);
                }
            }
        }
        let confirmed = session.ensure_slot(&slot).await?.unwrap_or(Lsn::ZERO);
        applier.start_from(confirmed);
        crate::sink::iceberg::table::ensure_namespace(
            self.committer.catalog().as_ref(),
            &self.cfg.namespace_name(),
            &self.secrets,
        )
        .await?;
        applier.set_full_identity(session.full_identity_keys().await?);
        if self.cfg.ddl_messages {
            let on = session.ensure_ddl_messages().await?;
            status::update(&self.status, |st| st.ddl_messages = on);
            tracing::info!(pipeline = %self.cfg.name, ddl_messages = on, "schema changes placed by {}", if on { "the DDL messages in the stream" } else { "the catalog as it is now (the DDL event trigger is not in place: it needs a superuser to install, or it was disabled)" });
        }
        // The relations streamed now, by name: one created again since is copied again.
        let oids: std::collections::HashMap<String, u32> = session
            .table_oids(&tables)
            .await?
            .into_iter()
            .map(|(oid, name)| (name, oid))
            .collect();
        applier.set_aliases(aliases.clone());
        applier.set_started_as(oids.iter().map(|(n, o)| (*o, n.clone())).collect());
        applier.after_failure(self.last_failed);
        applier.set_healed(self.healed.clone());
        // A table that joined and left the publication again before this attempt is not
        // copied (it is not in `tables`); its replayed changes stream without a restart.
        applier.stream_without_copy(
            self.joined
                .iter()
                .filter(|j| !tables.iter().any(|(s, t)| format!("{s}.{t}") == **j))
                .cloned()
                .collect(),
        );
        let initial = self.cfg.snapshot == crate::config::SnapshotMode::Initial;
        for (schema, table) in &tables {
            if *lost.borrow() {
                return Err(PipelineError::LeadershipLost);
            }
            let now = format!("{schema}.{table}");
            let source = aliases.get(&now).cloned().unwrap_or_else(|| now.clone());
            let asked = self
                .pending_copies
                .get(&source)
                .or_else(|| self.pending_copies.get(&now))
                .copied();
            let oid = oids.get(&now).copied();
            // With `snapshot = "never"` only a copy asked for (or under way) runs.
            let due = applier.copy_again(&source, oid, asked).await?;
            if due && asked.is_some() {
                // The table's state holds the request now: a later attempt resumes the copy
                // it started rather than taking the table again from the start.
                self.pending_copies.remove(&source);
                self.pending_copies.remove(&now);
            }
            if !due && !initial {
                continue;
            }
            self.set_state(PipelineState::Snapshotting);
            // A root span: one trace per table copy.
            let span = tracing::info_span!(
                parent: None,
                "pipeline.snapshot",
                source = %self.cfg.name,
                db.system.name = "postgresql",
                db.namespace = %self.url.database,
                db.operation.name = "COPY",
                db.collection.name = %format!("{schema}.{table}"),
                server.address = %self.url.host,
                server.port = self.url.port,
                table = %format!("{schema}.{table}"),
                rows = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            crate::telemetry::record_trace_id(&span);
            applier
                .snapshot_table(&self.url, schema, table, oid)
                .instrument(span)
                .await?;
            self.pending_copies.remove(&source);
            self.pending_copies.remove(&now);
        }
        // Partitions moved while the agent was stopped (the monitor reports those moved while
        // it runs): compared at the first attempt of this run, recorded at every attempt.
        for (schema, table) in &tables {
            let Some(leaves) = session.leaf_partitions(schema, table).await? else {
                continue;
            };
            let now = format!("{schema}.{table}");
            let source = aliases.get(&now).cloned().unwrap_or_else(|| now.clone());
            let report = !self.partitions_checked;
            let Some(change) = applier.partitions_since(&source, &leaves, report).await? else {
                continue;
            };
            let mut attached = Vec::new();
            for (oid, p) in &change.joined {
                if session
                    .has_rows_older_than_attach(*oid, p, schema, table)
                    .await?
                {
                    attached.push(p.clone());
                }
            }
            let mut left = Vec::new();
            for oid in &change.left {
                let name = session.relation_name(*oid).await?;
                left.push(name.unwrap_or_else(|| format!("OID {oid} (dropped)")));
            }
            if !attached.is_empty() || !left.is_empty() {
                PartitionsMoved {
                    table: &now,
                    attached: &attached,
                    left: &left,
                }
                .emit(&self.metrics);
            }
        }
        self.partitions_checked = true;
        for table in std::mem::take(&mut self.pending_copies).keys() {
            tracing::warn!(pipeline = %self.cfg.name, table, "a copy was asked for a table this pipeline does not stream (any more): ignored");
        }
        // Large transactions arrive while still in progress (protocol 2, PostgreSQL 14+)
        // and wait in a local spool, so the server does not have to spill them first.
        let v14 = session.server_version().await? >= 140_000;
        let wanted = self.cfg.stream_in_progress && v14;
        let whole_until = self
            .whole
            .filter(|_| wanted)
            .and_then(|w| w.until(Instant::now()));
        let in_progress = wanted && whole_until.is_none();
        applier.set_in_progress_again(whole_until);
        self.in_progress = in_progress;
        status::update(&self.status, |st| st.in_progress = in_progress);
        // Binary only when every published column has a binary reader: the server sends
        // every value of the stream in binary or none.
        let binary = self.cfg.binary
            && v14
            && !self.text_only
            && session
                .publication_column_types()
                .await?
                .iter()
                .all(|oid| crate::source::postgres::binary::supported(*oid));
        applier.set_binary(binary);
        let client = session
            .start(crate::source::postgres::session::StreamOptions {
                in_progress,
                binary,
            })
            .await?;
        // Aborted when this attempt ends (the guard drops).
        let monitor = tokio::spawn(monitor::slot_lag_loop(
            monitor::MonitorConfig {
                url: self.url.clone(),
                slot: slot.clone(),
                publication: publication.clone(),
                max_slot_lag_bytes: self.cfg.max_slot_lag_bytes,
                heartbeat_interval: self.cfg.heartbeat_interval,
                tables: tables.clone(),
                copies: self.copies.clone(),
            },
            self.metrics.clone(),
            self.status.clone(),
        ));
        let _monitor = AbortOnDrop(monitor);
        status::update(&self.status, |st| {
            st.confirmed_lsn = confirmed.pg();
        });
        tracing::info!(pipeline = %self.cfg.name, slot, confirmed_lsn = %confirmed.pg(), binary, in_progress, "streaming");
        self.set_state(PipelineState::Streaming);
        applier
            .stream(
                client,
                &mut self.control,
                shutdown,
                &mut lost,
                &mut copies,
                &|state| StateChanged { state }.emit(&self.metrics, &self.status),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_transactions_last_a_while_and_twice_as_long_after_each_failure() {
        let t0 = Instant::now();
        let first = WholeTransactions::after(None, t0);
        assert_eq!(first.wait, WHOLE_FIRST);
        // Inside the wait the attempt receives whole transactions and knows when to stop.
        assert_eq!(first.until(t0), Some(t0 + WHOLE_FIRST));
        assert_eq!(
            first.until(t0 + WHOLE_FIRST - Duration::from_secs(1)),
            Some(t0 + WHOLE_FIRST)
        );
        // Past it, in progress again.
        assert_eq!(first.until(t0 + WHOLE_FIRST), None);
        let t1 = t0 + WHOLE_FIRST + Duration::from_secs(5);
        let second = WholeTransactions::after(Some(first), t1);
        assert_eq!(second.wait, WHOLE_FIRST * 2);
        assert_eq!(second.until(t1), Some(t1 + WHOLE_FIRST * 2));
        let mut w = second;
        for _ in 0..20 {
            w = WholeTransactions::after(Some(w), t1);
        }
        assert_eq!(w.wait, WHOLE_MAX);
    }

    #[test]
    fn the_switch_back_to_in_progress_is_not_a_failure() {
        // Counted errors take another label path; this one restarts like a copy request.
        assert!(matches!(
            PipelineError::InProgressAgain.error_type(),
            ErrorType::Connection
        ));
        assert!(!decoding_failed(&PipelineError::InProgressAgain));
    }

    #[test]
    fn only_the_walsenders_internal_error_turns_in_progress_streaming_off() {
        // The text PostgreSQL 15 ended a stream with (reproduced by hand, docs/reliability.md).
        let decoder = PipelineError::StreamEnded(
            "could not map filenode \"base/16384/748456\" to relation OID (SQLSTATE XX000)".into(),
        );
        assert!(decoding_failed(&decoder));
        for other in [
            PipelineError::StreamEnded("server closed the stream".into()),
            PipelineError::StreamEnded(
                "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
            ),
            PipelineError::StreamEnded(
                "replication slot \"s\" is active for PID 7 (SQLSTATE 55006)".into(),
            ),
            PipelineError::Spool("No space left on device (SQLSTATE XX000)".into()),
        ] {
            assert!(!decoding_failed(&other), "{other}");
        }
    }
}
