//! Shared, read-mostly view of a pipeline for the API and the demo's progress line.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use utoipa::ToSchema;

use super::PipelineState;

/// Per-table counters.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TableStatus {
    /// Iceberg table (`namespace.table`).
    pub iceberg_table: String,
    /// Inserts read.
    pub inserts: u64,
    /// Updates read.
    pub updates: u64,
    /// Deletes read.
    pub deletes: u64,
    /// Truncates read.
    pub truncates: u64,
    /// Rows committed to Iceberg.
    pub committed_rows: u64,
    /// Snapshots committed.
    pub commits: u64,
    /// `philotes.lsn` of the last commit.
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub committed_lsn: String,
    /// When the last commit happened (RFC 3339).
    pub last_commit_at: Option<String>,
}

impl Default for TableStatus {
    fn default() -> Self {
        Self {
            iceberg_table: String::new(),
            inserts: 0,
            updates: 0,
            deletes: 0,
            truncates: 0,
            committed_rows: 0,
            commits: 0,
            committed_lsn: "0/0".into(),
            last_commit_at: None,
        }
    }
}

/// A pipeline between a failed attempt and the next one.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RetryStatus {
    /// Failed attempts in a row (1 after the first failure).
    #[schema(minimum = 1)]
    pub attempt: u32,
    /// When the next attempt starts (RFC 3339).
    pub next_attempt_at: String,
    /// The `error_type` of the last failure.
    pub error_type: super::events::ErrorType,
}

/// What the API shows for one pipeline.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineStatus {
    /// Pipeline name.
    pub name: String,
    /// Current state.
    pub state: PipelineState,
    /// Last WAL position received from the server.
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub received_lsn: String,
    /// Commit LSN of the last transaction committed to Iceberg.
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub committed_lsn: String,
    /// Position confirmed to PostgreSQL (the slot's flush position).
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub confirmed_lsn: String,
    /// Seconds between the last received commit and now.
    #[schema(minimum = 0)]
    pub lag_seconds: f64,
    /// WAL retained by the slot, in bytes (when known).
    pub slot_lag_bytes: Option<i64>,
    /// The slot retains more than `max_slot_lag_bytes`.
    pub slot_lag_exceeded: bool,
    /// Rows sent to the dead-letter table.
    pub dlq_rows: u64,
    /// Buffered, uncommitted events.
    pub buffered_events: u64,
    /// In-progress transactions the server is streaming, waiting in local spools.
    pub spooled_transactions: u64,
    /// Bytes in those spools.
    pub spooled_bytes: u64,
    /// Schema changes are placed by the DDL messages in the stream (the event trigger is in
    /// place), not by the catalog as it is now.
    pub ddl_messages: bool,
    /// Large transactions are received while still in progress (false: whole transactions at
    /// their commit: so configured, a server before 14, or after the server failed to decode
    /// one in progress).
    pub in_progress: bool,
    /// Set while the pipeline waits to try again after a failed attempt.
    pub retry: Option<RetryStatus>,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// When the last error happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// Per-table counters, keyed by source table.
    pub tables: BTreeMap<String, TableStatus>,
}

/// Shared handle to a pipeline's status.
pub type SharedStatus = Arc<RwLock<PipelineStatus>>;

impl PipelineStatus {
    /// A fresh status for `name`.
    pub fn new(name: &str) -> SharedStatus {
        Arc::new(RwLock::new(Self {
            name: name.to_string(),
            state: PipelineState::Starting,
            received_lsn: "0/0".into(),
            committed_lsn: "0/0".into(),
            confirmed_lsn: "0/0".into(),
            lag_seconds: 0.0,
            slot_lag_bytes: None,
            slot_lag_exceeded: false,
            dlq_rows: 0,
            buffered_events: 0,
            spooled_transactions: 0,
            spooled_bytes: 0,
            ddl_messages: false,
            in_progress: false,
            retry: None,
            last_error: None,
            last_error_at: None,
            tables: BTreeMap::new(),
        }))
    }
}

/// Apply `f` to the status; a poisoned lock is recovered (status is advisory).
pub fn update(s: &SharedStatus, f: impl FnOnce(&mut PipelineStatus)) {
    let mut g = s.write().unwrap_or_else(|p| p.into_inner());
    f(&mut g);
}

/// A copy of the status.
pub fn snapshot(s: &SharedStatus) -> PipelineStatus {
    s.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Current time as RFC 3339.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
