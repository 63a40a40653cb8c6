//! Metadata clean-up: the hygiene properties on tables that lack them (tables created before
//! them, or by another engine), and metadata files older than the oldest one the log still
//! lists (left by commits that did not delete them, e.g. another writer's).

use std::collections::HashMap;

use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use super::{MaintenanceError, Settings};
use crate::sink::iceberg::hygiene;

/// The version of a metadata file name `NNNNN-<uuid>.metadata.json` (`vN.metadata.json` too).
fn version(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    let stem = name.strip_suffix(".metadata.json")?.trim_end_matches(".gz");
    let digits = stem.strip_prefix('v').unwrap_or(stem);
    digits.split('-').next()?.parse().ok()
}

/// Metadata files of a local warehouse that the log no longer lists and that are older than
/// the oldest one it does: left by commits that lost a race (iceberg-rust's SQL catalog does
/// not delete the file of a commit that conflicted) or by writers that do not clean up.
/// Object stores: the orphan sweep finds them (it lists with an age bound).
pub(super) fn stale_files(table: &Table) -> Vec<String> {
    let known = hygiene::known_metadata_files(table);
    let oldest = known.iter().filter_map(|p| version(p)).min().unwrap_or(0);
    let dir = format!(
        "{}/metadata",
        table.metadata().location().trim_end_matches('/')
    );
    let local = dir.strip_prefix("file://").unwrap_or(&dir).to_string();
    let mut stale = Vec::new();
    if local.contains("://") {
        return stale;
    }
    if let Ok(rd) = std::fs::read_dir(&local) {
        for e in rd.flatten() {
            let path = e.path().display().to_string();
            let is_known = known.contains(&path) || known.contains(&format!("file://{path}"));
            if !is_known && version(&path).is_some_and(|v| v < oldest) {
                stale.push(path);
            }
        }
    }
    stale
}

pub(super) async fn run(
    committer: &super::Committer,
    table: &Table,
    settings: &Settings,
) -> Result<(u64, String), MaintenanceError> {
    let versions = settings.config.metadata_versions;
    let mut notes = Vec::new();
    let mut table = table.clone();
    if !hygiene::has_properties(&table, versions) {
        if settings.dry_run {
            notes.push(format!(
                "would set {}=true and {}={versions}",
                hygiene::DELETE_AFTER_COMMIT,
                hygiene::PREVIOUS_VERSIONS_MAX
            ));
        } else {
            let updates: HashMap<String, String> =
                hygiene::properties(versions).into_iter().collect();
            table = committer
                .commit_updates(
                    &table,
                    vec![TableRequirement::UuidMatch {
                        uuid: table.metadata().uuid(),
                    }],
                    vec![TableUpdate::SetProperties { updates }],
                )
                .await?;
            notes.push("set the metadata hygiene properties".to_string());
        }
    }
    let known = hygiene::known_metadata_files(&table);
    let stale = stale_files(&table);
    let removed = super::delete_files(&table, &stale, settings.dry_run).await;
    notes.push(format!(
        "{} {removed} old metadata files ({} listed)",
        if settings.dry_run {
            "would delete"
        } else {
            "deleted"
        },
        known.len()
    ));
    Ok((removed, notes.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::version;

    #[test]
    fn metadata_versions_parse() {
        assert_eq!(
            version("/w/t/metadata/00012-0b5f2b3e-8f6a-4f55-9d2a-1b2c3d4e5f60.metadata.json"),
            Some(12)
        );
        assert_eq!(version("s3://b/t/metadata/v3.metadata.json"), Some(3));
        assert_eq!(version("/w/t/metadata/snap-1-1-x.avro"), None);
    }
}
