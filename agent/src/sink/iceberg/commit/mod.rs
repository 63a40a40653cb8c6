//! Our own snapshot commits, built on iceberg-rust's public pieces (manifest and manifest-list
//! writers, `TableMetadataBuilder`, `TableUpdate` / `TableRequirement`): iceberg-rust 0.10 can
//! only fast-append, and compaction needs `replace`, mirror tables `overwrite` / `delete`.
//!
//! A commit is staged against a base table (new manifests, manifest list, snapshot) and then
//! published by the catalog's own protocol: a compare-and-swap of `metadata_location` in the
//! SQL catalog (the convention PyIceberg and Java share), the commit endpoint of a REST
//! catalog. A conflict (another writer committed first) reloads the table and stages again on
//! the new base: files the change removes must still be live there, or the change is dropped
//! with [`CommitError::Rebase`] (it could lose or duplicate rows).

mod rest;
mod snapshot;
mod sql;

use std::sync::Arc;

use iceberg::spec::{DataContentType, Operation};
use iceberg::table::Table;
use iceberg::{Catalog, TableRequirement, TableUpdate};

use crate::config::IcebergConfig;
pub use snapshot::{Change, Staged};

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another writer committed first and the attempts ran out.
    #[error("commit conflict: {0}")]
    Conflict(String),
    /// The new base no longer holds a file the change removes.
    #[error("cannot rebase the change: {0}")]
    Rebase(String),
    /// Writing manifests or metadata, or the catalog refused the commit.
    #[error("commit failed: {0}")]
    Failed(String),
    /// The catalog did not say whether the commit landed (REST 5xx, a lost connection).
    #[error("commit state unknown: {0}")]
    Unknown(String),
}

impl From<iceberg::Error> for CommitError {
    fn from(e: iceberg::Error) -> Self {
        if e.kind() == iceberg::ErrorKind::CatalogCommitConflicts {
            CommitError::Conflict(e.to_string())
        } else {
            CommitError::Failed(e.to_string())
        }
    }
}

/// Publishes metadata changes through the configured catalog's commit protocol.
#[derive(Clone)]
pub struct Committer {
    inner: Arc<Inner>,
    catalog: Arc<dyn Catalog>,
}

enum Inner {
    Sql(sql::SqlCommitter),
    Rest(Box<rest::RestCommitter>),
}

impl Committer {
    /// A committer for `[iceberg]`, beside the catalog the agent already opened.
    pub async fn open(cfg: &IcebergConfig, catalog: Arc<dyn Catalog>) -> Result<Self, CommitError> {
        let inner = match cfg.catalog.as_str() {
            "rest" => Inner::Rest(Box::new(rest::RestCommitter::new(cfg).await?)),
            _ => Inner::Sql(sql::SqlCommitter::connect(cfg).await?),
        };
        Ok(Self {
            inner: Arc::new(inner),
            catalog,
        })
    }

    /// The catalog tables are loaded from.
    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.catalog
    }

    /// Apply `updates` to `table` if `requirements` hold on the catalog's current metadata,
    /// atomically; the table as committed.
    pub async fn commit_updates(
        &self,
        table: &Table,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<Table, CommitError> {
        let new = match self.inner.as_ref() {
            Inner::Sql(s) => s.commit(table, requirements, updates).await?,
            Inner::Rest(r) => r.commit(table, requirements, updates).await?,
        };
        super::hygiene::delete_dropped_metadata(table, &new).await;
        Ok(new)
    }

    /// Commit `change` as one snapshot, staging it again on a newer base after a conflict
    /// (at most `attempts` times).
    pub async fn commit_snapshot(
        &self,
        table: &Table,
        change: &Change,
        attempts: u32,
    ) -> Result<(Table, u32), CommitError> {
        let mut base = table.clone();
        let mut conflicts = 0u32;
        loop {
            let staged = snapshot::stage(&base, change).await?;
            match self
                .commit_updates(&base, staged.requirements.clone(), staged.updates.clone())
                .await
            {
                Ok(t) => return Ok((t, conflicts)),
                Err(CommitError::Conflict(msg)) => {
                    staged.abandon(base.file_io()).await;
                    conflicts += 1;
                    if conflicts >= attempts {
                        return Err(CommitError::Conflict(msg));
                    }
                    tracing::info!(table = %base.identifier(), conflicts, "another writer committed first: staging the change again on the new table state");
                    base = self
                        .catalog
                        .load_table(base.identifier())
                        .await
                        .map_err(|e| CommitError::Failed(e.to_string()))?;
                }
                Err(e) => {
                    if !matches!(e, CommitError::Unknown(_)) {
                        staged.abandon(base.file_io()).await;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// `table` as committed: its new metadata at `location`.
fn committed(
    table: &Table,
    metadata: iceberg::spec::TableMetadata,
    location: String,
) -> Result<Table, CommitError> {
    Table::builder()
        .file_io(table.file_io().clone())
        .metadata(metadata)
        .metadata_location(location)
        .identifier(table.identifier().clone())
        .runtime(iceberg::Runtime::try_current()?)
        .build()
        .map_err(CommitError::from)
}

/// The operation a snapshot records for a change (the names other engines read).
pub fn operation_for(added: usize, removed: usize, same_rows: bool) -> Operation {
    match (added, removed) {
        (_, 0) => Operation::Append,
        (0, _) => Operation::Delete,
        _ if same_rows => Operation::Replace,
        _ => Operation::Overwrite,
    }
}

/// Whether a file holds rows (data), not deletes.
pub fn is_data(content: DataContentType) -> bool {
    content == DataContentType::Data
}
