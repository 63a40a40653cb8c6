//! Table upkeep: snapshot expiry (with the files only expired snapshots referenced), metadata
//! clean-up, compaction of small data files, and removal of orphan files. Each action starts
//! from the table's current version in the catalog, commits through [`Committer`] (so a
//! conflict with the stream or another engine restages or gives up, never loses or duplicates
//! a row) and reports what it did.

mod compact;
mod concat;
mod expire;
mod metadata;
mod orphans;
mod reach;
mod repair;

pub use compact::MAINTENANCE_PROPERTY;
pub(crate) use compact::{settled_head, writer_bound};
pub use orphans::set_store_config;

use std::time::{Duration, Instant};

use iceberg::table::Table;
use iceberg::TableIdent;
use tracing::Instrument;

use super::commit::{CommitError, Committer};
use crate::config::MaintenanceConfig;

/// A maintenance action (the `action` label of the maintenance metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Rewrite small data files into files near `target_file_size`.
    Compact,
    /// Expire old snapshots and delete the files only they referenced.
    Expire,
    /// Set the metadata-hygiene properties and delete metadata files no longer listed.
    CleanMetadata,
    /// Delete files under the table's location that no snapshot references.
    RemoveOrphans,
}

impl Action {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Compact => "compact",
            Action::Expire => "expire",
            Action::CleanMetadata => "clean_metadata",
            Action::RemoveOrphans => "remove_orphans",
        }
    }
}

/// How an action ended (the `status` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done (or nothing to do).
    Ok,
    /// Failed; the table is unchanged or the action left only unreferenced files.
    Failed,
    /// Another writer's commit got in the way; tried again next time.
    Conflict,
}

impl Status {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Conflict => "conflict",
        }
    }
}

/// What one action did (or, in a dry run, would do).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The action.
    pub action: Action,
    /// How it ended.
    pub status: Status,
    /// Files deleted (or that would be).
    pub files_removed: u64,
    /// Bytes of the files it wrote (compaction).
    pub bytes_written: u64,
    /// One line for the operator.
    pub summary: String,
    /// How long it took.
    pub duration: Duration,
}

/// A table's measured health: the debt maintenance pays off.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Data files in the current snapshot.
    pub data_files: u64,
    /// Delete files in the current snapshot.
    pub delete_files: u64,
    /// Snapshots in the metadata.
    pub snapshots: u64,
    /// Size of the current metadata file in bytes.
    pub metadata_bytes: u64,
    /// Metadata files in the log, plus the current one.
    pub metadata_files: u64,
    /// Partitions with at least `min_input_files` small files.
    pub partitions_to_compact: u64,
    /// Small data files in all partitions.
    pub small_files: u64,
}

/// Settings of one maintenance run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[maintenance]`.
    pub config: MaintenanceConfig,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// Run every action whatever the debt (the CLI); else only those the debt calls for.
    pub force: bool,
}

/// Which actions a run may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Compaction only: a run woken by small-file debt (expiry and clean-up wait for the
    /// timer; they read every retained snapshot's manifest list).
    Compaction,
    /// Every action the debt calls for, except the orphan sweep.
    Regular,
    /// Every action the debt calls for, and the orphan sweep.
    WithOrphans,
}

/// A maintenance failure.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// Reading the table or its files.
    #[error("reading the table: {0}")]
    Read(String),
    /// Writing new files.
    #[error("writing: {0}")]
    Write(String),
    /// Committing the change.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

impl From<iceberg::Error> for MaintenanceError {
    fn from(e: iceberg::Error) -> Self {
        MaintenanceError::Read(e.to_string())
    }
}

impl MaintenanceError {
    fn status(&self) -> Status {
        match self {
            MaintenanceError::Commit(CommitError::Conflict(_) | CommitError::Rebase(_)) => {
                Status::Conflict
            }
            _ => Status::Failed,
        }
    }
}

/// Measure `table`'s debt.
pub async fn health(table: &Table, cfg: &MaintenanceConfig) -> Result<Health, MaintenanceError> {
    let md = table.metadata();
    let files = reach::live_files(table).await?;
    let plan = compact::plan(table, &files, cfg);
    let metadata_bytes = match table.metadata_location() {
        Some(loc) => table
            .file_io()
            .new_input(loc)?
            .metadata()
            .await
            .map(|m| m.size)
            .unwrap_or(0),
        None => 0,
    };
    Ok(Health {
        data_files: files.iter().filter(|f| f.is_data).count() as u64,
        delete_files: files.iter().filter(|f| !f.is_data).count() as u64,
        snapshots: md.snapshots().count() as u64,
        metadata_bytes,
        metadata_files: md.metadata_log().len() as u64 + 1,
        partitions_to_compact: plan.len() as u64,
        small_files: compact::small_files(&files, cfg) as u64,
    })
}

/// Run the actions `table` needs (all of them with `force`), in the order that frees the most:
/// compaction first (its replaced files then expire with their snapshots), expiry, metadata,
/// orphans. Each action starts from the table as the catalog holds it then (read again only
/// when another writer moved it: [`Committer::load`]).
pub async fn maintain(
    committer: &Committer,
    ident: &TableIdent,
    settings: &Settings,
    scope: Scope,
) -> (Option<Health>, Vec<Outcome>) {
    let orphans_due = scope == Scope::WithOrphans;
    let mut out = Vec::new();
    let load = || async {
        committer
            .load(ident)
            .await
            .map_err(|e| MaintenanceError::Read(e.to_string()))
    };
    let table = match load().await {
        Ok(t) => t,
        Err(e) => {
            out.push(failed(Action::Expire, e, Instant::now()));
            return (None, out);
        }
    };
    // Only the tables the agent created: another engine's table in the same namespace is its
    // owner's business.
    if !is_ours(&table) {
        tracing::debug!(table = %ident, "not created by philotes: no maintenance");
        return (None, out);
    }
    let cfg = &settings.config;
    // Measured once: it decides the actions and feeds the gauges.
    let measured = health(&table, cfg).await.ok();
    let health = measured.clone().unwrap_or_default();
    let expire_due = settings.force || expire::due(&table, cfg);
    let steps = [
        (
            Action::Compact,
            settings.force || health.partitions_to_compact > 0 || !repair::checked(&table),
        ),
        (Action::Expire, expire_due),
        (
            Action::CleanMetadata,
            settings.force
                || !super::hygiene::has_properties(&table, cfg.metadata_versions)
                || !metadata::stale_files(&table).is_empty(),
        ),
        (Action::RemoveOrphans, settings.force || orphans_due),
    ];
    for (action, due) in steps {
        if !due || (scope == Scope::Compaction && action != Action::Compact) {
            continue;
        }
        let started = Instant::now();
        let table = match load().await {
            Ok(t) => t,
            Err(e) => {
                out.push(failed(action, e, started));
                continue;
            }
        };
        let t = ident.to_string();
        let dry_run = settings.dry_run;
        let result = match action {
            Action::Compact => {
                compact::run(committer, &table, settings)
                    .instrument(tracing::info_span!("maintenance.compact", table = %t, dry_run))
                    .await
            }
            Action::Expire => expire::run(committer, &table, settings)
                .instrument(tracing::info_span!("maintenance.expire", table = %t, dry_run))
                .await
                .map(|(n, s)| (n, s, 0)),
            Action::CleanMetadata => metadata::run(committer, &table, settings)
                .instrument(tracing::info_span!("maintenance.clean_metadata", table = %t, dry_run))
                .await
                .map(|(n, s)| (n, s, 0)),
            Action::RemoveOrphans => orphans::run(&table, settings)
                .instrument(tracing::info_span!("maintenance.remove_orphans", table = %t, dry_run))
                .await
                .map(|(n, s)| (n, s, 0)),
        };
        out.push(match result {
            Ok((files_removed, summary, bytes_written)) => Outcome {
                action,
                status: Status::Ok,
                files_removed,
                bytes_written,
                summary,
                duration: started.elapsed(),
            },
            Err(e) => {
                // A read or write that failed while another writer replaced the table's
                // metadata (a leader that took over, another engine's expiry deleting the
                // files this run was reading) met a conflict: tried again next interval.
                let moved = !matches!(e, MaintenanceError::Commit(_))
                    && load()
                        .await
                        .is_ok_and(|now| now.metadata_location() != table.metadata_location());
                let mut o = failed(action, e, started);
                if moved {
                    o.status = Status::Conflict;
                }
                o
            }
        });
    }
    (measured, out)
}

/// Whether the agent created `table` (`philotes.created-by`).
pub fn is_ours(table: &Table) -> bool {
    table
        .metadata()
        .properties()
        .get(super::table::CREATED_BY_PROPERTY)
        .is_some_and(|v| v == "philotes")
}

fn failed(action: Action, e: MaintenanceError, started: Instant) -> Outcome {
    Outcome {
        action,
        status: e.status(),
        files_removed: 0,
        bytes_written: 0,
        summary: e.to_string(),
        duration: started.elapsed(),
    }
}

/// Delete `paths` (or count them in a dry run); how many went.
async fn delete_files(table: &Table, paths: &[String], dry_run: bool) -> u64 {
    if dry_run {
        return paths.len() as u64;
    }
    let mut n = 0;
    for p in paths {
        match table.file_io().delete(p).await {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(path = %p, "maintenance could not delete a file: {e}"),
        }
    }
    n
}
