//! Observable occurrences as typed events (Vector's `internal_events`): each `emit` writes the
//! log line, records the metrics and updates the live status in one place, so call sites read
//! `BatchCommitted { .. }.emit(..)` and the contract lives here. No code outside `telemetry`
//! touches an instrument: their fields are private to this module tree.

mod api;
mod maintenance;
mod pipeline;

pub use api::ApiRequestServed;
pub use maintenance::{TableHealthMeasured, TableMaintained};
pub use pipeline::{
    AppliedTable, BatchCommitted, BatchFailed, BufferChanged, ChangeReceived, DeadLettered,
    FilesWritten, PipelineRetrying, SlotLagMeasured, SpoolChanged, StateChanged, TableCommitted,
    TransactionApplied,
};

use serde::Serialize;

/// The `error_type` label of `philotes_cdc_errors_total` (and a retry's `error_type` in the
/// API): the contract's closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Connecting to PostgreSQL, or the replication stream ended.
    Connection,
    /// A setting the source or catalog refuses (wal_level, missing table, slot in use, …).
    Config,
    /// A query on the source failed.
    SourceQuery,
    /// A pgoutput message could not be decoded.
    Decode,
    /// Opening the catalog, a namespace or a table.
    IcebergCatalog,
    /// Writing data files.
    IcebergWrite,
    /// Committing a snapshot.
    IcebergCommit,
    /// Another writer committed first (rebased, or the retries ran out).
    CommitConflict,
    /// Building a batch.
    Batch,
    /// A schema change Iceberg cannot follow.
    Schema,
    /// Spooling a streamed in-progress transaction.
    Spool,
    /// State stored in a table cannot be read.
    State,
    /// A row that could not be converted went to the dead-letter table.
    Conversion,
    /// The slot retains more WAL than `max_slot_lag_bytes`.
    SlotLag,
}

impl ErrorType {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Connection => "connection",
            ErrorType::Config => "config",
            ErrorType::SourceQuery => "source_query",
            ErrorType::Decode => "decode",
            ErrorType::IcebergCatalog => "iceberg_catalog",
            ErrorType::IcebergWrite => "iceberg_write",
            ErrorType::IcebergCommit => "iceberg_commit",
            ErrorType::CommitConflict => "commit_conflict",
            ErrorType::Batch => "batch",
            ErrorType::Schema => "schema",
            ErrorType::Spool => "spool",
            ErrorType::State => "state",
            ErrorType::Conversion => "conversion",
            ErrorType::SlotLag => "slot_lag",
        }
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorType;

    /// The serialized form (the API's `retry.error_type`) is the metric label.
    #[test]
    fn error_type_serializes_as_its_label() {
        for e in [
            ErrorType::Connection,
            ErrorType::SourceQuery,
            ErrorType::IcebergCommit,
            ErrorType::CommitConflict,
            ErrorType::SlotLag,
        ] {
            assert_eq!(
                serde_json::to_value(e).ok(),
                Some(serde_json::Value::String(e.as_str().to_string()))
            );
        }
    }
}
