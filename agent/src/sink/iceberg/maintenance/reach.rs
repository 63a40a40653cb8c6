//! What a table's snapshots reference: their manifest lists, manifests and files.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use iceberg::spec::{ManifestFile, SnapshotRef};
use iceberg::table::Table;

use super::MaintenanceError;

pub(super) use crate::sink::iceberg::manifests::LiveFile;

/// The live data and delete files of the current snapshot.
pub(super) async fn live_files(table: &Table) -> Result<Vec<LiveFile>, MaintenanceError> {
    Ok(crate::sink::iceberg::manifests::live_files(table).await?)
}

/// Manifest lists, manifests and live files of a set of snapshots.
#[derive(Debug, Default)]
pub(super) struct Reached {
    /// Manifest-list paths.
    pub lists: HashSet<String>,
    /// Manifest path → its manifest-list entry.
    pub manifests: HashMap<String, Arc<ManifestFile>>,
}

/// Manifest lists and manifests read before. Both are immutable once written, so expiry (every
/// `interval`, over every retained snapshot) reads only the ones written since its last run:
/// at a short flush interval a table retains hundreds of snapshots, and reading all their
/// manifest lists and manifests each time took seconds, during which compaction waited. After
/// each expiry, entries its table no longer references are dropped ([`keep_only`]), so the
/// cache holds what the retained snapshots reference (about a kilobyte per snapshot).
#[derive(Default)]
struct Cache {
    /// Manifest-list path → its manifests (shared with `manifests`).
    lists: HashMap<String, Arc<[Arc<ManifestFile>]>>,
    /// Manifest path → its manifest-list entry, one copy however many lists carry it (a
    /// snapshot's list repeats most of its parent's).
    manifests: HashMap<String, Arc<ManifestFile>>,
    /// Manifest path → every file it mentions, and whether the entry is live.
    files: HashMap<String, Mentions>,
}

/// The files a manifest mentions, each with whether its entry is live.
type Mentions = Arc<[(Arc<str>, bool)]>;

/// Entries beyond which the cache starts again empty (tables dropped while cached).
const CACHE_LIMIT: usize = 200_000;

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The manifests of one manifest list, from the cache or read.
async fn list_of(
    table: &Table,
    s: &SnapshotRef,
) -> Result<Arc<[Arc<ManifestFile>]>, MaintenanceError> {
    if let Some(l) = cache().lists.get(s.manifest_list()) {
        return Ok(l.clone());
    }
    let list = crate::sink::iceberg::manifests::list_of(table, s).await?;
    let mut c = cache();
    if c.lists.len() + c.manifests.len() + c.files.len() > CACHE_LIMIT {
        *c = Cache::default();
    }
    let entries: Arc<[Arc<ManifestFile>]> = list
        .iter()
        .map(|mf| {
            c.manifests
                .entry(mf.manifest_path.clone())
                .or_insert_with(|| Arc::new(mf.clone()))
                .clone()
        })
        .collect();
    c.lists
        .insert(s.manifest_list().to_string(), entries.clone());
    Ok(entries)
}

/// The manifest lists and manifests of `snapshots`.
pub(super) async fn manifests_of(
    table: &Table,
    snapshots: &[SnapshotRef],
) -> Result<Reached, MaintenanceError> {
    let mut r = Reached::default();
    for s in snapshots {
        r.lists.insert(s.manifest_list().to_string());
        for mf in list_of(table, s).await?.iter() {
            r.manifests
                .entry(mf.manifest_path.clone())
                .or_insert_with(|| mf.clone());
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
        let cached = cache().files.get(&mf.manifest_path).cloned();
        let files = match cached {
            Some(f) => f,
            None => {
                let m = mf.load_manifest(table.file_io()).await?;
                let f: Mentions = m
                    .entries()
                    .iter()
                    .map(|e| (Arc::from(e.file_path()), e.is_alive()))
                    .collect();
                cache().files.insert(mf.manifest_path.clone(), f.clone());
                f
            }
        };
        for (path, alive) in files.iter() {
            all.insert(path.to_string());
            if *alive {
                live.insert(path.to_string());
            }
        }
    }
    Ok((all, live))
}

/// Drop the cached lists and manifests under `table`'s location that `kept` (everything its
/// retained snapshots reference) does not hold.
pub(super) fn keep_only(table: &Table, kept: &Reached) {
    let prefix = table
        .metadata()
        .location()
        .trim_end_matches('/')
        .to_string()
        + "/";
    let mut c = cache();
    c.lists
        .retain(|p, _| !p.starts_with(&prefix) || kept.lists.contains(p));
    c.manifests
        .retain(|p, _| !p.starts_with(&prefix) || kept.manifests.contains_key(p));
    c.files
        .retain(|p, _| !p.starts_with(&prefix) || kept.manifests.contains_key(p));
}
