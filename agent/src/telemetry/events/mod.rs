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
    AppliedTable, BatchCommitted, BatchFailed, BufferChanged, ChangeReceived, CommitFenced,
    CopyReason, DeadLettered, FilesWritten, InProgressStreamingOff, InProgressStreamingOn,
    LeaderDeposed, LeaderSession, LeadershipLost, LeadershipTaken, MirrorCommitted, MirrorRekeyed,
    MirrorRowsWithoutKey, PartitionsMoved, PipelineRetrying, PublicationLeavesOut, SchemaChanged,
    SlotLagMeasured, SpoolChanged, StaleRowsAfterSchemaChange, StandingBy, StateChanged,
    TableCommitted, TableCopiedAgain, TableLeftPublication, TransactionApplied,
};

pub use crate::model::ErrorType;
#[cfg(test)]
mod tests {
    use crate::model::ErrorType;

    /// The serialized form (the API's `retry.error_type`) is the metric label.
    #[test]
    fn error_type_serializes_as_its_label() {
        for e in [
            ErrorType::Connection,
            ErrorType::SourceQuery,
            ErrorType::IcebergCommit,
            ErrorType::CommitConflict,
            ErrorType::SlotLag,
            ErrorType::Fenced,
        ] {
            assert_eq!(
                serde_json::to_value(e).ok(),
                Some(serde_json::Value::String(e.as_str().to_string()))
            );
        }
    }
}
