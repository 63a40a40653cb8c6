//! Metadata hygiene after every commit: the metadata files a commit drops from the table's
//! `metadata-log` (trimmed to `write.metadata.previous-versions-max`) are deleted when the
//! table says `write.metadata.delete-after-commit.enabled`, as Java's and PyIceberg's writers do.

use std::collections::HashSet;

use iceberg::table::Table;

/// Table property: delete metadata files dropped from the log after each commit.
pub const DELETE_AFTER_COMMIT: &str = "write.metadata.delete-after-commit.enabled";
/// Table property: previous metadata files kept in the log.
pub const PREVIOUS_VERSIONS_MAX: &str = "write.metadata.previous-versions-max";

/// The properties the agent sets on the tables it creates (and on older tables it finds).
pub fn properties(metadata_versions: u32) -> [(String, String); 2] {
    [
        (DELETE_AFTER_COMMIT.to_string(), "true".to_string()),
        (
            PREVIOUS_VERSIONS_MAX.to_string(),
            metadata_versions.to_string(),
        ),
    ]
}

/// Whether `table` has the hygiene properties set to `metadata_versions`.
pub fn has_properties(table: &Table, metadata_versions: u32) -> bool {
    let p = table.metadata().properties();
    properties(metadata_versions)
        .iter()
        .all(|(k, v)| p.get(k) == Some(v))
}

/// Every metadata file `table` knows of: the current one and those in its log.
pub fn known_metadata_files(table: &Table) -> HashSet<String> {
    table
        .metadata()
        .metadata_log()
        .iter()
        .map(|l| l.metadata_file.clone())
        .chain(table.metadata_location().map(str::to_string))
        .collect()
}

/// After a commit from `old` to `new`: delete the metadata files `new` no longer lists.
/// Returns how many were deleted. Failures are logged, never fatal: a file left behind is
/// found again by the metadata clean-up of the maintenance task.
pub async fn delete_dropped_metadata(old: &Table, new: &Table) -> u64 {
    let enabled = new
        .metadata()
        .properties()
        .get(DELETE_AFTER_COMMIT)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !enabled {
        return 0;
    }
    let keep = known_metadata_files(new);
    let mut deleted = 0;
    for path in known_metadata_files(old) {
        if keep.contains(&path) {
            continue;
        }
        match new.file_io().delete(&path).await {
            Ok(()) => deleted += 1,
            Err(e) => {
                tracing::debug!(path = %path, "could not delete an old metadata file: {e}");
            }
        }
    }
    deleted
}
