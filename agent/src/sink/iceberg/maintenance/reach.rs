//! What a table's snapshots reference: their manifest lists, manifests and files.

use std::collections::{HashMap, HashSet};

use iceberg::spec::{DataFile, ManifestFile, SnapshotRef};
use iceberg::table::Table;

use super::MaintenanceError;

/// A live file of the current snapshot.
#[derive(Debug, Clone)]
pub(super) struct LiveFile {
    /// The manifest entry's file.
    pub file: DataFile,
    /// The partition spec it was written with.
    pub spec_id: i32,
    /// Data (not deletes).
    pub is_data: bool,
}

/// The live data and delete files of the current snapshot.
pub(super) async fn live_files(table: &Table) -> Result<Vec<LiveFile>, MaintenanceError> {
    let md = table.metadata();
    let Some(cur) = md.current_snapshot() else {
        return Ok(Vec::new());
    };
    let list = table.manifest_list_reader(cur).load().await?;
    let mut out = Vec::new();
    for mf in list.entries() {
        let m = mf.load_manifest(table.file_io()).await?;
        for e in m.entries() {
            if e.is_alive() {
                out.push(LiveFile {
                    file: e.data_file().clone(),
                    spec_id: mf.partition_spec_id,
                    is_data: super::super::commit::is_data(e.content_type()),
                });
            }
        }
    }
    Ok(out)
}

/// Manifest lists, manifests and live files of a set of snapshots.
#[derive(Debug, Default)]
pub(super) struct Reached {
    /// Manifest-list paths.
    pub lists: HashSet<String>,
    /// Manifest path → its manifest-list entry.
    pub manifests: HashMap<String, ManifestFile>,
}

/// The manifest lists and manifests of `snapshots`.
pub(super) async fn manifests_of(
    table: &Table,
    snapshots: &[SnapshotRef],
) -> Result<Reached, MaintenanceError> {
    let mut r = Reached::default();
    for s in snapshots {
        r.lists.insert(s.manifest_list().to_string());
        let list = table.manifest_list_reader(s).load().await?;
        for mf in list.consume_entries() {
            r.manifests.entry(mf.manifest_path.clone()).or_insert(mf);
        }
    }
    Ok(r)
}

/// Every file path the given manifests mention, live or not, and the live ones.
pub(super) async fn files_of<'a>(
    table: &Table,
    manifests: impl Iterator<Item = &'a ManifestFile>,
) -> Result<(HashSet<String>, HashSet<String>), MaintenanceError> {
    let mut all = HashSet::new();
    let mut live = HashSet::new();
    for mf in manifests {
        let m = mf.load_manifest(table.file_io()).await?;
        for e in m.entries() {
            all.insert(e.file_path().to_string());
            if e.is_alive() {
                live.insert(e.file_path().to_string());
            }
        }
    }
    Ok((all, live))
}
