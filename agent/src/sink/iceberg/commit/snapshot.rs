//! Staging one snapshot: a manifest for the added files, the current manifests carried over
//! (rewritten where they hold a removed file), a manifest list, and the metadata updates with
//! the requirements that make publishing it a compare-and-swap.

use std::collections::{HashMap, HashSet};

use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, ManifestContentType, ManifestFile, ManifestListWriter, ManifestWriter,
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
}

/// A staged snapshot: what to publish, and the files written for it.
pub struct Staged {
    /// Requirements: same table, same current snapshot of `main`.
    pub requirements: Vec<TableRequirement>,
    /// Updates: the snapshot, `main` pointing at it, the properties.
    pub updates: Vec<TableUpdate>,
    /// Manifests and manifest list written for this attempt.
    written: Vec<String>,
}

impl Staged {
    /// Delete what this attempt wrote (it was not committed).
    pub async fn abandon(&self, io: &FileIO) {
        for p in &self.written {
            if let Err(e) = io.delete(p).await {
                tracing::debug!(path = %p, "could not delete an abandoned manifest: {e}");
            }
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

/// Stage `change` on `base`'s current snapshot of `main`.
pub async fn stage(base: &Table, change: &Change) -> Result<Staged, CommitError> {
    let md = base.metadata();
    let io = base.file_io();
    let snapshot_id = new_snapshot_id(base);
    let sequence = md.next_sequence_number();
    let parent = md.current_snapshot();
    let parent_id = md.current_snapshot_id();
    let commit_id = uuid::Uuid::now_v7();
    let location = md.location().trim_end_matches('/');
    let mut written = Vec::new();
    let mut manifests: Vec<ManifestFile> = Vec::new();
    let fail = |e: iceberg::Error| CommitError::Failed(e.to_string());

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

    // Carry the current manifests over; rewrite those holding a removed file.
    let mut removed_found: HashSet<String> = HashSet::new();
    let (mut removed_files, mut removed_records, mut removed_size) = (0i64, 0i64, 0i64);
    let (mut removed_deletes, mut removed_pos) = (0i64, 0i64);
    if let Some(cur) = parent {
        let list = base.manifest_list_reader(cur).load().await.map_err(fail)?;
        let entries: Vec<ManifestFile> = list.consume_entries().into_iter().collect();
        // Touched manifests are merged into one per (content, spec): a compaction that
        // touches a manifest per small commit leaves one manifest, not as many new ones.
        let mut merged: HashMap<(bool, i32), (String, ManifestWriter)> = HashMap::new();
        for mf in entries {
            // A manifest with no live entry only records deletions of its own snapshot.
            if mf.added_files_count == Some(0) && mf.existing_files_count == Some(0) {
                continue;
            }
            if change.removed.is_empty() {
                manifests.push(mf);
                continue;
            }
            let manifest = mf.load_manifest(io).await.map_err(fail)?;
            let touched = manifest
                .entries()
                .iter()
                .any(|e| e.is_alive() && change.removed.contains(e.file_path()));
            if !touched {
                manifests.push(mf);
                continue;
            }
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
                    let f = e.data_file();
                    if super::is_data(f.content_type()) {
                        removed_files += 1;
                        removed_records += f.record_count() as i64;
                    } else {
                        removed_deletes += 1;
                        removed_pos += f.record_count() as i64;
                    }
                    removed_size += f.file_size_in_bytes() as i64;
                    w.add_delete_file(e.data_file.clone(), seq, file_seq)
                        .map_err(fail)?;
                } else {
                    w.add_existing_file(
                        e.data_file.clone(),
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
    if removed_found.len() != change.removed.len() {
        let staged = Staged {
            requirements: vec![],
            updates: vec![],
            written,
        };
        staged.abandon(io).await;
        let missing = change
            .removed
            .iter()
            .find(|p| !removed_found.contains(*p))
            .cloned()
            .unwrap_or_default();
        return Err(CommitError::Rebase(format!(
            "{missing} is no longer live in the table"
        )));
    }

    let list_path = format!("{location}/metadata/snap-{snapshot_id}-1-{commit_id}.avro");
    let mut lw = ManifestListWriter::v2(
        io.new_output(&list_path)
            .map_err(fail)?
            .writer()
            .await
            .map_err(fail)?,
        snapshot_id,
        parent_id,
        sequence,
    );
    lw.add_manifests(manifests.into_iter()).map_err(fail)?;
    lw.close().await.map_err(fail)?;
    written.push(list_path.clone());

    // The summary: what this snapshot did, and the table's totals after it.
    let prev = parent.map(|s| s.summary());
    let (mut added_files, mut added_records, mut added_size) = (0i64, 0i64, 0i64);
    let (mut added_deletes, mut added_pos) = (0i64, 0i64);
    for f in &change.added {
        if super::is_data(f.content_type()) {
            added_files += 1;
            added_records += f.record_count() as i64;
        } else {
            added_deletes += 1;
            added_pos += f.record_count() as i64;
        }
        added_size += f.file_size_in_bytes() as i64;
    }
    let mut props: HashMap<String, String> = change.summary.clone();
    let mut put = |k: &str, v: i64| {
        props.insert(k.to_string(), v.to_string());
    };
    put("added-data-files", added_files);
    put("added-records", added_records);
    put("added-files-size", added_size);
    put("deleted-data-files", removed_files);
    put("deleted-records", removed_records);
    put("removed-files-size", removed_size);
    if added_deletes > 0 {
        put("added-delete-files", added_deletes);
        put("added-position-delete-files", added_deletes);
        put("added-position-deletes", added_pos);
    }
    if removed_deletes > 0 {
        put("removed-delete-files", removed_deletes);
        put("removed-position-delete-files", removed_deletes);
        put("removed-position-deletes", removed_pos);
    }
    put(
        "total-data-files",
        total(prev, "total-data-files") + added_files - removed_files,
    );
    put(
        "total-records",
        total(prev, "total-records") + added_records - removed_records,
    );
    put(
        "total-files-size",
        total(prev, "total-files-size") + added_size - removed_size,
    );
    put(
        "total-delete-files",
        total(prev, "total-delete-files") + added_deletes - removed_deletes,
    );
    put(
        "total-position-deletes",
        total(prev, "total-position-deletes") + added_pos - removed_pos,
    );
    put(
        "total-equality-deletes",
        total(prev, "total-equality-deletes"),
    );
    let now = chrono::Utc::now().timestamp_millis();
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(parent_id)
        .with_sequence_number(sequence)
        // Clocks differ between writers; a snapshot may not be older than the last one.
        .with_timestamp_ms(now.max(md.last_updated_ms()))
        .with_manifest_list(list_path)
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
                snapshot_id,
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
        written,
    })
}
