//! Staging one snapshot in two steps. [`prepare`] writes the manifests of the change: one for
//! the added files, and the base's manifests that hold a removed file, rewritten (the slow
//! part: it reads every manifest when files are removed). [`finish`] writes the manifest list
//! on a base (the prepared one, or a newer one after a conflict) and builds the metadata
//! updates with the requirements that make publishing it a compare-and-swap. A conflict then
//! costs a new manifest list, not a new rewrite, as long as the manifests the change replaced
//! are still in the newer base: manifests are immutable, so their files are still live.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, FormatVersion, ManifestContentType, ManifestFile, ManifestListWriter, ManifestWriter,
    ManifestWriterBuilder, Operation, Snapshot, SnapshotReference, SnapshotRetention, Summary,
    MAIN_BRANCH, UNASSIGNED_SEQUENCE_NUMBER,
};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use super::CommitError;

/// What one snapshot changes.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The operation other engines see (`append`, `replace`, `overwrite`, `delete`).
    pub operation: Operation,
    /// Data (or delete) files the snapshot adds, in the table's default partition spec.
    pub added: Vec<DataFile>,
    /// Paths of live files the snapshot removes.
    pub removed: HashSet<String>,
    /// Extra snapshot-summary properties (e.g. `philotes.lsn`).
    pub summary: HashMap<String, String>,
    /// Table properties set in the same commit.
    pub properties: HashMap<String, String>,
    /// Data files that must still be live on the base it commits on (those its position
    /// deletes name): another writer that removed one (a rewrite) makes the change stale.
    pub requires_live: HashSet<String>,
    /// Table properties the base must still hold as the writer last saw them (its position
    /// and writer id): a data commit of another agent since then fences this one.
    pub fence: Vec<(String, Option<String>)>,
    /// Live files whose manifest entries are written again with these statistics, by path:
    /// the same file, snapshot and sequence numbers (position deletes still apply to it), only
    /// its description corrected (column bounds that excluded rows).
    pub restated: HashMap<String, DataFile>,
}

impl Change {
    /// Why `base` fences this change: a fenced property it no longer holds as expected.
    pub fn fenced_by(&self, base: &iceberg::table::Table) -> Option<String> {
        let props = base.metadata().properties();
        self.fence.iter().find_map(|(k, want)| {
            let now = props.get(k);
            (now != want.as_ref()).then(|| {
                format!(
                    "{k} is {} where this writer last saw {}",
                    now.map_or("unset", String::as_str),
                    want.as_deref().unwrap_or("unset")
                )
            })
        })
    }
}

/// The manifests of a change, written once for any base that still holds what it replaces.
pub struct Prepared {
    snapshot_id: i64,
    commit_id: uuid::Uuid,
    /// The snapshot of `main` it was prepared on.
    base_snapshot: Option<i64>,
    /// Manifests written for the change (added files, rewritten manifests).
    manifests: Vec<ManifestFile>,
    /// Paths of the base's manifests that `manifests` replace.
    replaced: HashSet<String>,
    /// Paths written (deleted again if the change is abandoned).
    written: Vec<String>,
    counts: Counts,
}

/// What the change adds and removes, for the snapshot summary.
#[derive(Default, Clone, Copy)]
struct Counts {
    added_files: i64,
    added_records: i64,
    added_size: i64,
    added_deletes: i64,
    added_pos: i64,
    removed_files: i64,
    removed_records: i64,
    removed_size: i64,
    removed_deletes: i64,
    removed_pos: i64,
}

impl Counts {
    /// Count `f` as added, or as removed.
    fn count(&mut self, f: &DataFile, removed: bool) {
        let (files, records, deletes, positions, size) = if removed {
            (
                &mut self.removed_files,
                &mut self.removed_records,
                &mut self.removed_deletes,
                &mut self.removed_pos,
                &mut self.removed_size,
            )
        } else {
            (
                &mut self.added_files,
                &mut self.added_records,
                &mut self.added_deletes,
                &mut self.added_pos,
                &mut self.added_size,
            )
        };
        if super::is_data(f.content_type()) {
            *files += 1;
            *records += f.record_count() as i64;
        } else {
            *deletes += 1;
            *positions += f.record_count() as i64;
        }
        *size += f.file_size_in_bytes() as i64;
    }
}

impl Prepared {
    /// The snapshot of `main` this was prepared on.
    pub fn base_snapshot(&self) -> Option<i64> {
        self.base_snapshot
    }

    /// Delete the manifests written for the change (it will not be committed).
    pub async fn abandon(&self, io: &FileIO) {
        delete_all(io, &self.written).await;
    }
}

/// A staged snapshot on one base: what to publish, and its manifest list.
pub struct Staged {
    /// Requirements: same table, same current snapshot of `main`.
    pub requirements: Vec<TableRequirement>,
    /// Updates: the snapshot, `main` pointing at it, the properties.
    pub updates: Vec<TableUpdate>,
    /// The manifest list written for this base.
    list: String,
}

impl Staged {
    /// Delete this attempt's manifest list (it was not committed; the manifests stay for the
    /// next attempt).
    pub async fn abandon(&self, io: &FileIO) {
        delete_all(io, std::slice::from_ref(&self.list)).await;
    }
}

async fn delete_all(io: &FileIO, paths: &[String]) {
    for p in paths {
        if let Err(e) = io.delete(p).await {
            tracing::debug!(path = %p, "could not delete an abandoned manifest: {e}");
        }
    }
}

/// A snapshot id unique in `table` (random, positive).
fn new_snapshot_id(table: &Table) -> i64 {
    loop {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let id = ((a ^ b) & (i64::MAX as u64)) as i64;
        if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

fn total(parent: Option<&Summary>, key: &str) -> i64 {
    parent
        .and_then(|s| s.additional_properties.get(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Write the manifests of `change` on `base`'s current snapshot of `main`.
pub async fn prepare(base: &Table, change: &Change) -> Result<Prepared, CommitError> {
    let md = base.metadata();
    let io = base.file_io();
    let snapshot_id = new_snapshot_id(base);
    let parent = md.current_snapshot();
    let commit_id = uuid::Uuid::now_v7();
    let location = md.location().trim_end_matches('/');
    let mut written = Vec::new();
    let mut manifests: Vec<ManifestFile> = Vec::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let mut c = Counts::default();
    let fail = |e: iceberg::Error| CommitError::Failed(e.to_string());
    if md.format_version() == FormatVersion::V1 {
        return Err(CommitError::Failed(format!(
            "{}: format-version 1 tables are not supported (the agent writes v2 manifests); \
             upgrade the table to format-version 2",
            base.identifier()
        )));
    }

    for f in &change.added {
        c.count(f, false);
    }
    let (added_data, added_deletes): (Vec<&DataFile>, Vec<&DataFile>) = change
        .added
        .iter()
        .partition(|f| super::is_data(f.content_type()));
    for (n, (files, deletes)) in [(added_data, false), (added_deletes, true)]
        .into_iter()
        .enumerate()
    {
        if files.is_empty() {
            continue;
        }
        let path = format!("{location}/metadata/{commit_id}-m{n}.avro");
        let out = io.new_output(&path).map_err(fail)?;
        let builder = ManifestWriterBuilder::new(
            out,
            Some(snapshot_id),
            md.current_schema().clone(),
            md.default_partition_spec().as_ref().clone(),
        );
        let mut w = if deletes {
            builder.build_v2_deletes()
        } else {
            builder.build_v2_data()
        };
        for f in files {
            w.add_file(f.clone(), UNASSIGNED_SEQUENCE_NUMBER)
                .map_err(fail)?;
        }
        written.push(path);
        manifests.push(w.write_manifest_file().await.map_err(fail)?);
    }

    // Rewrite the current manifests holding a removed file.
    let mut removed_found: HashSet<String> = HashSet::new();
    let mut restated_found: HashSet<String> = HashSet::new();
    let rewrites = !change.removed.is_empty() || !change.restated.is_empty();
    if let (Some(cur), true) = (parent, rewrites) {
        let entries = crate::sink::iceberg::manifests::list_of(base, cur)
            .await
            .map_err(fail)?;
        // Touched manifests are merged into one per (content, spec): a compaction that
        // touches a manifest per small commit leaves one manifest, not as many new ones.
        let mut merged: HashMap<(bool, i32), (String, ManifestWriter)> = HashMap::new();
        for mf in entries.iter().cloned() {
            if is_empty(&mf) {
                continue;
            }
            let manifest = crate::sink::iceberg::manifests::load(io, &mf)
                .await
                .map_err(fail)?;
            let touched = manifest.entries().iter().any(|e| {
                e.is_alive()
                    && (change.removed.contains(e.file_path())
                        || change.restated.contains_key(e.file_path()))
            });
            if !touched {
                continue;
            }
            replaced.insert(mf.manifest_path.clone());
            let data = mf.content == ManifestContentType::Data;
            let key = (data, mf.partition_spec_id);
            if !merged.contains_key(&key) {
                let meta = manifest.metadata();
                let path = format!("{location}/metadata/{commit_id}-m{}.avro", 2 + merged.len());
                let builder = ManifestWriterBuilder::new(
                    io.new_output(&path).map_err(fail)?,
                    Some(snapshot_id),
                    meta.schema.clone(),
                    meta.partition_spec.clone(),
                );
                let w = if data {
                    builder.build_v2_data()
                } else {
                    builder.build_v2_deletes()
                };
                merged.insert(key, (path, w));
            }
            let Some((_, w)) = merged.get_mut(&key) else {
                continue;
            };
            for e in manifest.entries() {
                if !e.is_alive() {
                    continue;
                }
                let seq = e.sequence_number.unwrap_or(0);
                let file_seq = e.file_sequence_number.or(e.sequence_number);
                if change.removed.contains(e.file_path()) {
                    removed_found.insert(e.file_path().to_string());
                    c.count(e.data_file(), true);
                    w.add_delete_file(e.data_file.clone(), seq, file_seq)
                        .map_err(fail)?;
                } else {
                    let file = match change.restated.get(e.file_path()) {
                        Some(f) => {
                            restated_found.insert(e.file_path().to_string());
                            f.clone()
                        }
                        None => e.data_file.clone(),
                    };
                    w.add_existing_file(
                        file,
                        e.snapshot_id.unwrap_or(mf.added_snapshot_id),
                        seq,
                        file_seq,
                    )
                    .map_err(fail)?;
                }
            }
        }
        for (_, (path, w)) in merged {
            written.push(path);
            manifests.push(w.write_manifest_file().await.map_err(fail)?);
        }
    }
    if removed_found.len() != change.removed.len() || restated_found.len() != change.restated.len()
    {
        delete_all(io, &written).await;
        let missing = change
            .removed
            .iter()
            .chain(change.restated.keys())
            .find(|p| !removed_found.contains(*p) && !restated_found.contains(*p))
            .cloned()
            .unwrap_or_default();
        return Err(CommitError::Rebase(format!(
            "{missing} is no longer live in the table"
        )));
    }
    Ok(Prepared {
        snapshot_id,
        commit_id,
        base_snapshot: md.current_snapshot_id(),
        manifests,
        replaced,
        written,
        counts: c,
    })
}

/// [`CommitError::Rebase`] when `base` no longer holds a data file `change` requires (one its
/// position deletes name, removed by another writer's rewrite): the rows rewritten elsewhere
/// would stay, so the change must be made again from the table, not re-applied.
pub async fn check_required(base: &Table, change: &Change) -> Result<(), CommitError> {
    if change.requires_live.is_empty() {
        return Ok(());
    }
    let live: HashSet<String> = crate::sink::iceberg::manifests::live_files(base)
        .await
        .map_err(|e| CommitError::Failed(e.to_string()))?
        .into_iter()
        .filter(|f| f.is_data)
        .map(|f| f.file.file_path().to_string())
        .collect();
    // Files the change adds itself are not on the base yet.
    let added: HashSet<&str> = change.added.iter().map(|f| f.file_path()).collect();
    match change
        .requires_live
        .iter()
        .find(|p| !live.contains(*p) && !added.contains(p.as_str()))
    {
        Some(gone) => Err(CommitError::Rebase(format!(
            "another writer removed {gone}, whose rows this change deletes by position"
        ))),
        None => Ok(()),
    }
}

/// A manifest with no live entry only records deletions of its own snapshot.
fn is_empty(mf: &ManifestFile) -> bool {
    mf.added_files_count == Some(0) && mf.existing_files_count == Some(0)
}

/// Write the manifest list of `prepared` on `base`'s current snapshot of `main`, and the
/// updates that publish it. [`CommitError::Rebase`] when `base` no longer holds a manifest the
/// change replaced (another writer rewrote it: prepare again), or when it removes data files
/// and another writer added delete files since it was prepared (they could apply to the
/// rewritten rows).
pub async fn finish(
    base: &Table,
    change: &Change,
    prepared: &Prepared,
) -> Result<Staged, CommitError> {
    let md = base.metadata();
    let io = base.file_io();
    let fail = |e: iceberg::Error| CommitError::Failed(e.to_string());
    let parent = md.current_snapshot();
    let parent_id = md.current_snapshot_id();
    let sequence = md.next_sequence_number();
    let moved = parent_id != prepared.base_snapshot;
    let mut manifests = prepared.manifests.clone();
    let mut found = 0usize;
    if let Some(cur) = parent {
        let entries = crate::sink::iceberg::manifests::list_of(base, cur)
            .await
            .map_err(fail)?;
        for mf in entries.iter().cloned() {
            if prepared.replaced.contains(&mf.manifest_path) {
                found += 1;
                continue;
            }
            if is_empty(&mf) {
                continue;
            }
            // A rewrite must not drop delete files that another writer added meanwhile for
            // the rows it rewrites.
            if moved
                && prepared.counts.removed_files > 0
                && mf.content == ManifestContentType::Deletes
                && newer_than_base(base, mf.added_snapshot_id, prepared.base_snapshot)
            {
                return Err(CommitError::Rebase(
                    "delete files were added since the rewrite was planned".into(),
                ));
            }
            manifests.push(mf);
        }
    }
    if found != prepared.replaced.len() {
        return Err(CommitError::Rebase(
            "another writer rewrote a manifest this change replaces".into(),
        ));
    }
    let list_path = format!(
        "{}/metadata/snap-{}-{}-{}.avro",
        md.location().trim_end_matches('/'),
        prepared.snapshot_id,
        sequence,
        prepared.commit_id
    );
    let mut lw = ManifestListWriter::v2(
        io.new_output(&list_path)
            .map_err(fail)?
            .writer()
            .await
            .map_err(fail)?,
        prepared.snapshot_id,
        parent_id,
        sequence,
    );
    // The sequence numbers the writer would assign, so that the entries kept in memory for
    // the next commit are the ones written.
    for mf in manifests
        .iter_mut()
        .filter(|m| m.added_snapshot_id == prepared.snapshot_id)
    {
        if mf.sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            mf.sequence_number = sequence;
        }
        if mf.min_sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            mf.min_sequence_number = sequence;
        }
    }
    let entries: Arc<[ManifestFile]> = manifests.into();
    lw.add_manifests(entries.iter().cloned()).map_err(fail)?;
    lw.close().await.map_err(fail)?;
    crate::sink::iceberg::manifests::remember_list(md.location(), &list_path, entries);

    // The summary: what this snapshot did, and the table's totals after it.
    let prev = parent.map(|s| s.summary());
    let c = prepared.counts;
    let mut props: HashMap<String, String> = change.summary.clone();
    let mut put = |k: &str, v: i64| {
        props.insert(k.to_string(), v.to_string());
    };
    put("added-data-files", c.added_files);
    put("added-records", c.added_records);
    put("added-files-size", c.added_size);
    put("deleted-data-files", c.removed_files);
    put("deleted-records", c.removed_records);
    put("removed-files-size", c.removed_size);
    if c.added_deletes > 0 {
        put("added-delete-files", c.added_deletes);
        put("added-position-delete-files", c.added_deletes);
        put("added-position-deletes", c.added_pos);
    }
    if c.removed_deletes > 0 {
        put("removed-delete-files", c.removed_deletes);
        put("removed-position-delete-files", c.removed_deletes);
        put("removed-position-deletes", c.removed_pos);
    }
    put(
        "total-data-files",
        total(prev, "total-data-files") + c.added_files - c.removed_files,
    );
    put(
        "total-records",
        total(prev, "total-records") + c.added_records - c.removed_records,
    );
    put(
        "total-files-size",
        total(prev, "total-files-size") + c.added_size - c.removed_size,
    );
    put(
        "total-delete-files",
        total(prev, "total-delete-files") + c.added_deletes - c.removed_deletes,
    );
    put(
        "total-position-deletes",
        total(prev, "total-position-deletes") + c.added_pos - c.removed_pos,
    );
    put(
        "total-equality-deletes",
        total(prev, "total-equality-deletes"),
    );
    let now = chrono::Utc::now().timestamp_millis();
    let snapshot = Snapshot::builder()
        .with_snapshot_id(prepared.snapshot_id)
        .with_parent_snapshot_id(parent_id)
        .with_sequence_number(sequence)
        // Clocks differ between writers; a snapshot may not be older than the last one.
        .with_timestamp_ms(now.max(md.last_updated_ms()))
        .with_manifest_list(list_path.clone())
        .with_schema_id(md.current_schema_id())
        .with_summary(Summary {
            operation: change.operation.clone(),
            additional_properties: props,
        })
        .build();
    let mut updates = vec![
        TableUpdate::AddSnapshot { snapshot },
        TableUpdate::SetSnapshotRef {
            ref_name: MAIN_BRANCH.to_string(),
            reference: SnapshotReference::new(
                prepared.snapshot_id,
                SnapshotRetention::branch(None, None, None),
            ),
        },
    ];
    if !change.properties.is_empty() {
        updates.push(TableUpdate::SetProperties {
            updates: change.properties.clone(),
        });
    }
    Ok(Staged {
        requirements: vec![
            TableRequirement::UuidMatch { uuid: md.uuid() },
            TableRequirement::RefSnapshotIdMatch {
                r#ref: MAIN_BRANCH.to_string(),
                snapshot_id: parent_id,
            },
        ],
        updates,
        list: list_path,
    })
}

/// Whether snapshot `id` was committed after `base` (it is a descendant of it on `main`).
fn newer_than_base(table: &Table, id: i64, base: Option<i64>) -> bool {
    let md = table.metadata();
    let mut cur = md.current_snapshot_id();
    while let Some(s) = cur {
        if Some(s) == base {
            return false;
        }
        if s == id {
            return true;
        }
        cur = md.snapshot_by_id(s).and_then(|s| s.parent_snapshot_id());
    }
    // `base` expired or not an ancestor: assume the worst.
    true
}
