//! Snapshot expiry: snapshots older than `snapshot_retention` go, except the newest
//! `retain_last` of the current ancestry and the heads of every branch and tag. Then the
//! manifest lists, manifests and data files that only expired snapshots referenced are
//! deleted; a file live in any retained snapshot is never touched. Last, the schemas that
//! neither the table nor a retained snapshot uses are removed from the metadata.

use std::collections::HashSet;

use iceberg::spec::{SnapshotRef, TableMetadata};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use super::{reach, MaintenanceError, Settings};
use crate::config::MaintenanceConfig;
use crate::sink::iceberg::schema::{parse_schema_before, SCHEMA_BEFORE_PROPERTY};

/// Snapshot ids the heads of branches and tags point at (`refs` has no public accessor).
fn ref_heads(md: &TableMetadata) -> HashSet<i64> {
    let mut out: HashSet<i64> = md.current_snapshot_id().into_iter().collect();
    if let Ok(v) = serde_json::to_value(md) {
        if let Some(refs) = v.get("refs").and_then(|r| r.as_object()) {
            out.extend(
                refs.values()
                    .filter_map(|r| r.get("snapshot-id").and_then(|i| i.as_i64())),
            );
        }
    }
    out
}

/// The snapshots to expire now.
fn select(table: &Table, cfg: &MaintenanceConfig, now_ms: i64) -> Vec<i64> {
    let md = table.metadata();
    let cutoff = now_ms - cfg.snapshot_retention.as_millis() as i64;
    let mut keep = ref_heads(md);
    let mut cur = md.current_snapshot();
    let mut n = 0;
    while let Some(s) = cur {
        if n >= cfg.retain_last {
            break;
        }
        keep.insert(s.snapshot_id());
        n += 1;
        cur = s.parent_snapshot_id().and_then(|id| md.snapshot_by_id(id));
    }
    md.snapshots()
        .filter(|s| s.timestamp_ms() < cutoff && !keep.contains(&s.snapshot_id()))
        .map(|s| s.snapshot_id())
        .collect()
}

/// Schemas of `md` that are not current, that none of `snapshots` was written with and that
/// no recorded schema change of the stream still needs (a replay places its older rows
/// through them: [`SCHEMA_BEFORE_PROPERTY`]). Every schema change adds one for good
/// otherwise: a table whose column types changed a few hundred times carried 280 schemas in
/// a 3.3 MB metadata.json, rewritten at every commit.
fn unused_schemas<'a>(
    md: &TableMetadata,
    snapshots: impl Iterator<Item = &'a SnapshotRef>,
) -> Vec<i32> {
    let recorded = match md.properties().get(SCHEMA_BEFORE_PROPERTY) {
        Some(v) => match parse_schema_before(v) {
            Ok(entries) => entries.iter().map(|e| e.schema).collect(),
            // Which schemas a replay needs is unknown: none goes.
            Err(_) => return Vec::new(),
        },
        None => Vec::new(),
    };
    let used: HashSet<i32> = snapshots
        .filter_map(|s| s.schema_id())
        .chain([md.current_schema_id()])
        .chain(recorded)
        .collect();
    md.schemas_iter()
        .map(|s| s.schema_id())
        .filter(|id| !used.contains(id))
        .collect()
}

/// Remove `table`'s unused schemas; what happened, for the action's message. A catalog that
/// refuses the update (or a schema change that made one of them current again meanwhile)
/// leaves them for the next pass: the snapshots are expired either way.
async fn remove_unused_schemas(committer: &super::Committer, table: &Table) -> String {
    let md = table.metadata();
    let unused = unused_schemas(md, md.snapshots());
    if unused.is_empty() {
        return String::new();
    }
    let n = unused.len();
    match committer
        .commit_updates(
            table,
            vec![TableRequirement::UuidMatch { uuid: md.uuid() }],
            vec![TableUpdate::RemoveSchemas { schema_ids: unused }],
        )
        .await
    {
        Ok(_) => format!(", removed {n} unused schemas"),
        Err(e) => {
            tracing::info!(table = %table.identifier(), error = %e, "unused schemas kept for now");
            format!(", {n} unused schemas kept for now")
        }
    }
}

/// Whether any snapshot is due to expire.
pub(super) fn due(table: &Table, cfg: &MaintenanceConfig) -> bool {
    !select(table, cfg, chrono::Utc::now().timestamp_millis()).is_empty()
}

/// Expire, then delete what only the expired snapshots referenced.
pub(super) async fn run(
    committer: &super::Committer,
    table: &Table,
    settings: &Settings,
) -> Result<(u64, String), MaintenanceError> {
    let expired_ids = select(
        table,
        &settings.config,
        chrono::Utc::now().timestamp_millis(),
    );
    let md = table.metadata();
    if expired_ids.is_empty() {
        let schemas = if settings.dry_run {
            String::new()
        } else {
            remove_unused_schemas(committer, table).await
        };
        return Ok((0, format!("no snapshot to expire{schemas}")));
    }
    let expired: Vec<SnapshotRef> = expired_ids
        .iter()
        .filter_map(|id| md.snapshot_by_id(*id).cloned())
        .collect();
    let gone = reach::manifests_of(table, &expired).await?;
    if settings.dry_run {
        let retained: Vec<SnapshotRef> = md
            .snapshots()
            .filter(|s| !expired_ids.contains(&s.snapshot_id()))
            .cloned()
            .collect();
        let files = unreferenced(table, &gone, &retained).await?;
        let schemas = unused_schemas(md, retained.iter()).len();
        return Ok((
            files.len() as u64,
            format!(
                "would expire {} of {} snapshots, delete {} files and remove {schemas} unused schemas",
                expired.len(),
                md.snapshots().count(),
                files.len()
            ),
        ));
    }
    // Removing old snapshots commutes with the stream's appends: only the table must be
    // the same one.
    let new = committer
        .commit_updates(
            table,
            vec![TableRequirement::UuidMatch { uuid: md.uuid() }],
            vec![TableUpdate::RemoveSnapshots {
                snapshot_ids: expired_ids.clone(),
            }],
        )
        .await?;
    // What the table retains after the commit (with any snapshot another writer added).
    let retained: Vec<SnapshotRef> = new.metadata().snapshots().cloned().collect();
    let files = unreferenced(&new, &gone, &retained).await?;
    let removed = super::delete_files(&new, &files, false).await;
    let schemas = remove_unused_schemas(committer, &new).await;
    Ok((
        removed,
        format!(
            "expired {} snapshots ({} left), deleted {removed} files{schemas}",
            expired.len(),
            retained.len()
        ),
    ))
}

/// Files referenced by the expired snapshots' manifests and lists, and by no retained one.
async fn unreferenced(
    table: &Table,
    gone: &reach::Reached,
    retained: &[SnapshotRef],
) -> Result<Vec<String>, MaintenanceError> {
    let kept = reach::manifests_of(table, retained).await?;
    let mut out: Vec<String> = gone
        .lists
        .iter()
        .filter(|l| !kept.lists.contains(*l))
        .cloned()
        .collect();
    let candidates: Vec<_> = gone
        .manifests
        .values()
        .filter(|m| !kept.manifests.contains_key(&m.manifest_path))
        .collect();
    if candidates.is_empty() {
        reach::keep_only(table, &kept);
        return Ok(out);
    }
    let (mentioned, _) = reach::files_of(table, candidates.iter().map(|m| m.as_ref())).await?;
    let (_, live_kept) =
        reach::files_of(table, kept.manifests.values().map(|m| m.as_ref())).await?;
    reach::keep_only(table, &kept);
    out.extend(mentioned.into_iter().filter(|f| !live_kept.contains(f)));
    out.extend(candidates.iter().map(|m| m.manifest_path.clone()));
    Ok(out)
}
