//! Our own snapshot commits, built on iceberg-rust's public pieces (manifest and manifest-list
//! writers, `TableMetadataBuilder`, `TableUpdate` / `TableRequirement`): iceberg-rust 0.10 can
//! only fast-append, and compaction needs `replace`, mirror tables `overwrite` / `delete`.
//!
//! A commit is prepared against a base table (new manifests), finished on the newest base
//! (manifest list, snapshot) and published by the catalog's own protocol: a compare-and-swap of
//! `metadata_location` in the SQL catalog (the convention PyIceberg and Java share), the commit
//! endpoint of a REST catalog. Within the agent, commits to one table are serialized
//! ([`lock`]): the stream and maintenance never race each other, only other writers. A
//! conflict with another writer finishes the prepared manifests again on the new base; when
//! that base no longer holds what the change replaces, the change is prepared again, and when a
//! removed file is no longer live the change is dropped with [`CommitError::Rebase`] (it could
//! lose or duplicate rows). A change fenced on properties ([`Change::fence`]) is refused with
//! [`CommitError::Fenced`] on any base where another agent's data commit moved them.

pub mod lock;

mod rest;
mod snapshot;
mod sql;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use iceberg::spec::{DataContentType, Operation};
use iceberg::table::Table;
use iceberg::{Catalog, TableIdent, TableRequirement, TableUpdate};

use crate::config::{CatalogKind, IcebergConfig};
pub use snapshot::{Change, Prepared, Staged};

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
    /// Another agent's data commit moved what the change is fenced on ([`Change::fence`]).
    #[error("fenced: {0}")]
    Fenced(String),
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
    /// The newest state of each table the agent committed or read through the SQL catalog, one
    /// per table. A metadata file is written once, so while the catalog still names its
    /// location the table needs no new read: maintenance and the stream pass a table back and
    /// forth several times a pass, and each read of a table with many snapshots parses
    /// megabytes of JSON.
    known: Arc<Mutex<HashMap<TableIdent, Table>>>,
}

enum Inner {
    Sql(sql::SqlCommitter),
    Rest(Box<rest::RestCommitter>),
}

impl Committer {
    /// A committer for `[iceberg]`, beside the catalog the agent already opened.
    pub async fn open(cfg: &IcebergConfig, catalog: Arc<dyn Catalog>) -> Result<Self, CommitError> {
        let inner = match cfg.catalog {
            CatalogKind::Rest => Inner::Rest(Box::new(rest::RestCommitter::new(cfg).await?)),
            CatalogKind::Sql => Inner::Sql(sql::SqlCommitter::connect(cfg).await?),
        };
        Ok(Self {
            inner: Arc::new(inner),
            catalog,
            known: Arc::default(),
        })
    }

    /// `ident` as the catalog holds it now. Through the SQL catalog that is one query for its
    /// location, and a read of its metadata only when the agent does not hold that version.
    pub async fn load(&self, ident: &TableIdent) -> Result<Table, CommitError> {
        if let Inner::Sql(s) = self.inner.as_ref() {
            let now = s.location_of(ident).await?;
            if let Some(t) = self.known_at(ident, now.as_deref()) {
                return Ok(t);
            }
        }
        self.read(ident).await
    }

    /// Read `ident` from the catalog (and remember it).
    async fn read(&self, ident: &TableIdent) -> Result<Table, CommitError> {
        let t = self
            .catalog
            .load_table(ident)
            .await
            .map_err(|e| CommitError::Failed(e.to_string()))?;
        self.remember(&t)
    }

    /// The table the agent holds for `ident` if it is the version at `location`.
    fn known_at(&self, ident: &TableIdent, location: Option<&str>) -> Option<Table> {
        let location = location?;
        let known = self.known.lock().ok()?;
        known
            .get(ident)
            .filter(|t| t.metadata_location() == Some(location))
            .cloned()
    }

    /// Keep `table` as the newest state of its table (SQL catalog only: a REST catalog is
    /// always asked). Kept without iceberg-rust's manifest cache, which a table read from the
    /// catalog brings and a scan fills (up to 32 MiB that would otherwise live on).
    fn remember(&self, table: &Table) -> Result<Table, CommitError> {
        let Inner::Sql(_) = self.inner.as_ref() else {
            return Ok(table.clone());
        };
        let (Some(location), Ok(mut known)) = (table.metadata_location(), self.known.lock()) else {
            return Ok(table.clone());
        };
        let kept = committed(table, table.metadata_ref(), location)?;
        known.insert(table.identifier().clone(), kept.clone());
        Ok(kept)
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
        let _serial = lock::table(table.identifier()).await;
        self.publish(table, requirements, updates).await
    }

    /// [`Self::commit_updates`] for a caller that holds the table's [`lock`].
    async fn publish(
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
        self.remember(&new)
    }

    /// Commit `change` as one snapshot. The manifests are written once, outside the table's
    /// lock; the manifest list is written under it on the newest table state, so the agent's
    /// own stream never invalidates the work. Another writer's commit costs a new manifest
    /// list (at most `attempts` conflicts), or a new preparation if it rewrote what the change
    /// replaces.
    pub async fn commit_snapshot(
        &self,
        table: &Table,
        change: &Change,
        attempts: u32,
    ) -> Result<(Table, u32), CommitError> {
        let io = table.file_io().clone();
        let mut prepared = snapshot::prepare(table, change).await?;
        let mut conflicts = 0u32;
        let mut base = table.clone();
        let built_on = table.metadata().current_snapshot_id();
        loop {
            let serial = lock::table(table.identifier()).await;
            // Under the lock nothing of ours moves the table.
            base = self.newest(base).await?;
            // Checked on every base the change may land on: the compare-and-swap below then
            // makes "still as last seen" and "committed" one step.
            if let Some(why) = change.fenced_by(&base) {
                prepared.abandon(&io).await;
                return Err(CommitError::Fenced(why));
            }
            // Another writer's commit since the change was built: what it requires must still
            // be there, or no re-application can make it right.
            if base.metadata().current_snapshot_id() != built_on {
                if let Err(e) = snapshot::check_required(&base, change).await {
                    prepared.abandon(&io).await;
                    return Err(e);
                }
            }
            let staged = match snapshot::finish(&base, change, &prepared).await {
                Ok(s) => s,
                Err(CommitError::Rebase(why))
                    if base.metadata().current_snapshot_id() != prepared.base_snapshot() =>
                {
                    drop(serial);
                    tracing::info!(table = %base.identifier(), "{why}: preparing the change again on the new table state");
                    prepared.abandon(&io).await;
                    prepared = snapshot::prepare(&base, change).await?;
                    conflicts += 1;
                    if conflicts >= attempts {
                        prepared.abandon(&io).await;
                        return Err(CommitError::Conflict(why));
                    }
                    continue;
                }
                Err(e) => {
                    prepared.abandon(&io).await;
                    return Err(e);
                }
            };
            match self
                .publish(&base, staged.requirements.clone(), staged.updates.clone())
                .await
            {
                Ok(t) => return Ok((t, conflicts)),
                Err(CommitError::Conflict(msg)) => {
                    drop(serial);
                    staged.abandon(&io).await;
                    conflicts += 1;
                    if conflicts >= attempts {
                        prepared.abandon(&io).await;
                        return Err(CommitError::Conflict(msg));
                    }
                    // The next turn finishes on the table as the other writer left it.
                    tracing::info!(table = %base.identifier(), conflicts, "another writer committed first: finishing the change again on the new table state");
                }
                Err(e) => {
                    if !matches!(e, CommitError::Unknown(_)) {
                        staged.abandon(&io).await;
                        prepared.abandon(&io).await;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// `table` as the catalog holds it now: the SQL catalog is asked for the location first
    /// and the metadata read only if it moved to a version the agent does not hold; a REST
    /// catalog has no cheaper look than a load.
    async fn newest(&self, table: Table) -> Result<Table, CommitError> {
        if let Inner::Sql(s) = self.inner.as_ref() {
            let now = s.location_of(table.identifier()).await?;
            if now.as_deref() == table.metadata_location() {
                return Ok(table);
            }
            if let Some(t) = self.known_at(table.identifier(), now.as_deref()) {
                return Ok(t);
            }
        }
        self.read(table.identifier()).await
    }
}

/// `table` as committed: its new metadata at `location`.
fn committed(
    table: &Table,
    metadata: impl Into<iceberg::spec::TableMetadataRef>,
    location: impl Into<String>,
) -> Result<Table, CommitError> {
    Table::builder()
        .file_io(table.file_io().clone())
        .metadata(metadata)
        .metadata_location(location)
        .identifier(table.identifier().clone())
        .runtime(iceberg::Runtime::try_current()?)
        // The committed table is committed to again, seldom scanned: no manifest cache (a new
        // 32 MiB-capacity cache per commit otherwise).
        .disable_cache()
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::IcebergConfig;
    use crate::sink::iceberg::catalog::open_catalog;
    use crate::sink::iceberg::footer::testfile;
    use iceberg::{NamespaceIdent, TableCreation};

    fn set(key: &str, value: &str) -> Vec<TableUpdate> {
        vec![TableUpdate::SetProperties {
            updates: HashMap::from([(key.to_string(), value.to_string())]),
        }]
    }

    /// A SQLite catalog in a fresh directory with namespace `ns`, and a committer beside it.
    pub(crate) struct TestCatalog {
        pub dir: std::path::PathBuf,
        pub cfg: IcebergConfig,
        pub catalog: Arc<dyn Catalog>,
        pub committer: Committer,
        pub ns: NamespaceIdent,
    }

    impl TestCatalog {
        pub(crate) async fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("philotes-{tag}-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let cfg = IcebergConfig {
                uri: format!("sqlite://{}/catalog.db", dir.display()),
                warehouse: format!("{}/wh", dir.display()),
                ..IcebergConfig::default()
            };
            let catalog = open_catalog(&cfg).await.unwrap();
            let committer = Committer::open(&cfg, catalog.clone()).await.unwrap();
            let ns = NamespaceIdent::new("ns".into());
            catalog.create_namespace(&ns, HashMap::new()).await.unwrap();
            Self {
                dir,
                cfg,
                catalog,
                committer,
                ns,
            }
        }
    }

    /// A real SQLite catalog and metadata files: the version the agent committed is handed back
    /// without reading it again; a version another writer committed is read.
    #[tokio::test]
    async fn a_table_is_read_again_only_when_another_writer_moved_it() {
        let TestCatalog {
            dir,
            cfg,
            catalog,
            committer: ours,
            ns,
        } = TestCatalog::new("known").await;
        let creation = TableCreation::builder()
            .name("t".into())
            .schema(testfile::schema())
            .build();
        let created = catalog.create_table(&ns, creation).await.unwrap();
        let ident = TableIdent::new(ns, "t".into());

        let committed = ours
            .commit_updates(&created, vec![], set("a", "1"))
            .await
            .unwrap();
        let loaded = ours.load(&ident).await.unwrap();
        assert_eq!(loaded.metadata_location(), committed.metadata_location());
        assert!(
            Arc::ptr_eq(&loaded.metadata_ref(), &committed.metadata_ref()),
            "the committed version was read again"
        );

        // Another writer (a committer that knows nothing the first one holds) moves the table.
        let other = Committer::open(&cfg, catalog.clone()).await.unwrap();
        let theirs = other
            .commit_updates(&committed, vec![], set("b", "2"))
            .await
            .unwrap();
        let loaded = ours.load(&ident).await.unwrap();
        assert_eq!(loaded.metadata_location(), theirs.metadata_location());
        assert_eq!(
            loaded.metadata().properties().get("b").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            loaded.metadata().properties().get("a").map(String::as_str),
            Some("1")
        );
        // Read once, then held: the next look is the same version again.
        let again = ours.load(&ident).await.unwrap();
        assert!(Arc::ptr_eq(&again.metadata_ref(), &loaded.metadata_ref()));

        // A commit on the stale table lands on the newest version, keeping the other's change.
        let next = ours
            .commit_updates(&committed, vec![], set("c", "3"))
            .await
            .unwrap();
        let props = next.metadata().properties();
        assert_eq!(props.get("c").map(String::as_str), Some("3"));
        assert_eq!(props.get("b").map(String::as_str), Some("2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
