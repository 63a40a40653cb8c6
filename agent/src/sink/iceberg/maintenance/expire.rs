//! Snapshot expiry: snapshots older than `snapshot_retention` go, except the newest
//! `retain_last` of the current ancestry and the heads of every branch and tag. Then the
//! manifest lists, manifests and data files that only expired snapshots referenced are
//! deleted; a file live in any retained snapshot is never touched.

use std::collections::HashSet;

use iceberg::spec::{SnapshotRef, TableMetadata};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use super::{reach, MaintenanceError, Settings};
use crate::config::MaintenanceConfig;

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
    if expired_ids.is_empty() {
        return Ok((0, "no snapshot to expire".into()));
    }
    let md = table.metadata();
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
        return Ok((
            files.len() as u64,
            format!(
                "would expire {} of {} snapshots and delete {} files",
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
    Ok((
        removed,
        format!(
            "expired {} snapshots ({} left), deleted {removed} files",
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
