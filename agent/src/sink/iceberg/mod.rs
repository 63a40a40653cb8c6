//! Iceberg sink: catalog (sql|rest), changelog schema, Parquet writing, commits with the LSN checkpoint.

pub mod bounds;
pub mod catalog;
pub mod commit;
pub mod dead_letters;
pub mod debt;
pub mod early;
pub mod evolve;
pub mod footer;
pub mod hygiene;
pub mod maintenance;
pub mod manifests;
pub mod mirror;
pub mod partition;
pub mod project;
pub mod schema;
pub mod table;
pub(crate) mod upload;
pub(crate) mod writer;

pub use catalog::open_catalog;

use crate::model::ErrorType;
pub use table::TableSink;

/// A sink failure, with the stage it happened in.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Opening the catalog or a table, creating a namespace or table.
    #[error("iceberg catalog: {0}")]
    Catalog(String),
    /// Writing Parquet data files.
    #[error("iceberg write: {0}")]
    Write(String),
    /// Committing a snapshot.
    #[error("iceberg commit: {0}")]
    Commit(String),
    /// Another writer committed first and the retries ran out.
    #[error("iceberg commit conflict: {0}")]
    Conflict(String),
    /// Bad catalog or storage settings.
    #[error("iceberg config: {0}")]
    Config(String),
    /// A mirror's key column changed to a type Iceberg cannot promote: the writer cannot
    /// match the rows written before by the new key and must be opened again.
    #[error("iceberg mirror {table}: {message}")]
    KeyRetyped {
        /// The mirror table.
        table: String,
        /// What changed and what to do.
        message: String,
    },
    /// Another agent committed to `table` since this one last looked: the commit is refused
    /// so that a deposed leader never adds what the new leader commits too.
    #[error("iceberg commit fenced on {table}: {reason}")]
    Fenced {
        /// The Iceberg table.
        table: String,
        /// What moved.
        reason: String,
    },
}

impl SinkError {
    /// The `error_type` label for `philotes_cdc_errors_total`.
    pub fn error_type(&self) -> ErrorType {
        match self {
            SinkError::Catalog(_) => ErrorType::IcebergCatalog,
            SinkError::Write(_) => ErrorType::IcebergWrite,
            SinkError::Commit(_) => ErrorType::IcebergCommit,
            SinkError::Conflict(_) => ErrorType::CommitConflict,
            SinkError::Config(_) | SinkError::KeyRetyped { .. } => ErrorType::Config,
            SinkError::Fenced { .. } => ErrorType::Fenced,
        }
    }
}
