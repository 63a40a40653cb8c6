//! Parsed manifests, by path. A manifest is immutable once written, and parsing one is the
//! largest cost of maintenance (iceberg-rust parses the Avro schema of every file): each
//! compaction run looked at the current snapshot's manifests five times (health, plan, the
//! rewrite's preparation, the gauges after). The cache keeps only what a table's current
//! snapshot lists ([`keep_only`], called whenever the current manifests are read), so it holds
//! a few dozen manifests per table, not the history.
//!
//! Beside them, the newest manifest list of each table: every commit carries the current
//! list's entries into the next one, and reading it back (an object read and an Avro parse)
//! was the largest allocation of a streamed commit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use iceberg::io::FileIO;
use iceberg::spec::{DataFile, Manifest, ManifestFile, SnapshotRef};
use iceberg::table::Table;

/// Manifests beyond which the cache starts again empty (a table dropped while cached).
const LIMIT: usize = 20_000;

fn cache() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Manifest>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Manifest>>>> = OnceLock::new();
    CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The manifest `mf` points at, read once.
pub async fn load(io: &FileIO, mf: &ManifestFile) -> Result<Arc<Manifest>, iceberg::Error> {
    if let Some(m) = cache().get(&mf.manifest_path) {
        return Ok(m.clone());
    }
    let m = Arc::new(mf.load_manifest(io).await?);
    let mut c = cache();
    if c.len() >= LIMIT {
        c.clear();
    }
    c.insert(mf.manifest_path.clone(), m.clone());
    Ok(m)
}

/// Forget the manifests under `location` (a table's) that `current` does not list.
pub fn keep_only(location: &str, current: &HashSet<&str>) {
    let prefix = location.trim_end_matches('/').to_string() + "/";
    cache().retain(|p, _| !p.starts_with(&prefix) || current.contains(p.as_str()));
}

/// Table location → its newest manifest list (path, entries).
type Lists = HashMap<String, (String, Arc<[ManifestFile]>)>;

fn lists() -> std::sync::MutexGuard<'static, Lists> {
    static LISTS: OnceLock<Mutex<Lists>> = OnceLock::new();
    LISTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The entries of `snapshot`'s manifest list: from memory when it is the table's newest list
/// (written or read by this process), else read.
pub async fn list_of(
    table: &Table,
    snapshot: &SnapshotRef,
) -> Result<Arc<[ManifestFile]>, iceberg::Error> {
    let location = table.metadata().location();
    if let Some((path, entries)) = lists().get(location) {
        if path == snapshot.manifest_list() {
            return Ok(entries.clone());
        }
    }
    let entries: Arc<[ManifestFile]> = table
        .manifest_list_reader(snapshot)
        .load()
        .await?
        .consume_entries()
        .into_iter()
        .collect();
    // Only the current list is carried into the next commit; an older one read by expiry
    // must not displace it.
    if table.metadata().current_snapshot_id() == Some(snapshot.snapshot_id()) {
        remember_list(location, snapshot.manifest_list(), entries.clone());
    }
    Ok(entries)
}

/// `entries` were written as the list at `path` of the table at `location`.
pub fn remember_list(location: &str, path: &str, entries: Arc<[ManifestFile]>) {
    let mut l = lists();
    if l.len() >= LIMIT && !l.contains_key(location) {
        l.clear();
    }
    l.insert(location.to_string(), (path.to_string(), entries));
}

/// A live file of a table's current snapshot.
#[derive(Debug, Clone)]
pub struct LiveFile {
    /// The manifest entry's file.
    pub file: DataFile,
    /// The partition spec it was written with.
    pub spec_id: i32,
    /// Data (not deletes).
    pub is_data: bool,
    /// Its data sequence number (0 when the manifest does not say).
    pub sequence: i64,
}

/// The live data and delete files of `table`'s current snapshot. Manifests of the table that
/// the current snapshot no longer lists leave the cache here.
pub async fn live_files(table: &Table) -> Result<Vec<LiveFile>, iceberg::Error> {
    let md = table.metadata();
    let Some(cur) = md.current_snapshot() else {
        return Ok(Vec::new());
    };
    let list = list_of(table, cur).await?;
    keep_only(
        md.location(),
        &list.iter().map(|m| m.manifest_path.as_str()).collect(),
    );
    let mut out = Vec::new();
    for mf in list.iter() {
        let m = load(table.file_io(), mf).await?;
        for e in m.entries() {
            if e.is_alive() {
                out.push(LiveFile {
                    file: e.data_file().clone(),
                    spec_id: mf.partition_spec_id,
                    is_data: super::commit::is_data(e.content_type()),
                    sequence: e.sequence_number().unwrap_or(0),
                });
            }
        }
    }
    Ok(out)
}
