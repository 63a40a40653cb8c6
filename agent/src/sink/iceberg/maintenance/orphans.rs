//! Orphan removal: files under a table's location that no snapshot references (the files of
//! a flush that failed before its commit, an abandoned compaction) are deleted once older
//! than `orphan_age`, so a file another writer is about to commit is never taken.

use std::collections::HashSet;
use std::time::SystemTime;

use iceberg::spec::SnapshotRef;
use iceberg::table::Table;

use super::{reach, MaintenanceError, Settings};
use crate::config::IcebergConfig;

/// Where the object store settings come from (set once by the agent; REST catalogs that vend
/// credentials leave S3 listing to the operator).
static STORE: std::sync::OnceLock<IcebergConfig> = std::sync::OnceLock::new();

/// Remember the `[iceberg]` settings used to list object-store prefixes.
pub fn set_store_config(cfg: &IcebergConfig) {
    let _ = STORE.set(cfg.clone());
}

/// A file under the table's location with its modification time.
struct Listed {
    path: String,
    modified: Option<SystemTime>,
}

/// Every file below `location` (a local path, `file://` or `s3://bucket/prefix`).
async fn list(location: &str) -> Result<Vec<Listed>, MaintenanceError> {
    if let Some(rest) = location.strip_prefix("s3://") {
        return list_s3(rest).await;
    }
    let root = location
        .strip_prefix("file://")
        .unwrap_or(location)
        .to_string();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(&root)];
        while let Some(d) = dirs.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(MaintenanceError::Read(format!("{}: {e}", d.display()))),
            };
            for entry in rd.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(entry.path());
                } else {
                    out.push(Listed {
                        path: entry.path().display().to_string(),
                        modified: meta.modified().ok(),
                    });
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| MaintenanceError::Read(e.to_string()))?
}

async fn list_s3(bucket_and_prefix: &str) -> Result<Vec<Listed>, MaintenanceError> {
    let (bucket, prefix) = bucket_and_prefix
        .split_once('/')
        .unwrap_or((bucket_and_prefix, ""));
    let Some(cfg) = STORE.get() else {
        return Err(MaintenanceError::Read(
            "no object-store settings to list s3:// locations".into(),
        ));
    };
    let s3 = &cfg.s3;
    let mut b = opendal::services::S3::default().bucket(bucket).root("/");
    if let Some(e) = &s3.endpoint {
        b = b.endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.region(r);
    }
    if let (Some(k), Some(s)) = (&s3.access_key_id, &s3.secret_access_key) {
        b = b.access_key_id(k.expose()).secret_access_key(s.expose());
    }
    if let Some(t) = &s3.session_token {
        b = b.session_token(t.expose());
    }
    let secrets = cfg.secrets();
    let err = |e: opendal::Error| {
        MaintenanceError::Read(crate::sink::iceberg::catalog::scrub(
            e.to_string(),
            &secrets,
        ))
    };
    let op = opendal::Operator::new(b).map_err(err)?.finish();
    let dir = format!("{}/", prefix.trim_end_matches('/'));
    let entries = op.list_with(&dir).recursive(true).await.map_err(err)?;
    Ok(entries
        .into_iter()
        .filter(|e| e.metadata().is_file())
        .map(|e| Listed {
            path: format!("s3://{bucket}/{}", e.path()),
            modified: e.metadata().last_modified().map(SystemTime::from),
        })
        .collect())
}

/// Every file any snapshot of `table` references, and its metadata files.
async fn referenced(table: &Table) -> Result<HashSet<String>, MaintenanceError> {
    let snapshots: Vec<SnapshotRef> = table.metadata().snapshots().cloned().collect();
    let r = reach::manifests_of(table, &snapshots).await?;
    let (files, _) = reach::files_of(table, r.manifests.values().map(|m| m.as_ref())).await?;
    let mut out = super::super::hygiene::known_metadata_files(table);
    out.extend(r.lists);
    out.extend(r.manifests.into_keys());
    out.extend(files);
    Ok(out)
}

/// Normalise a location so listed paths and metadata paths compare (`file:///x` = `/x`).
fn norm(p: &str) -> &str {
    p.strip_prefix("file://").unwrap_or(p)
}

/// Delete unreferenced files older than `orphan_age`.
pub(super) async fn run(
    table: &Table,
    settings: &Settings,
) -> Result<(u64, String), MaintenanceError> {
    let location = table
        .metadata()
        .location()
        .trim_end_matches('/')
        .to_string();
    // Listed before reading the references: a file written after the listing is not seen,
    // one committed after the references were read is young and kept by the age rule.
    let listed = list(&location).await?;
    let referenced: HashSet<String> = referenced(table)
        .await?
        .iter()
        .map(|p| norm(p).to_string())
        .collect();
    let cutoff = SystemTime::now()
        .checked_sub(settings.config.orphan_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let orphans: Vec<String> = listed
        .into_iter()
        .filter(|f| !referenced.contains(norm(&f.path)))
        .filter(|f| f.modified.is_some_and(|m| m < cutoff))
        .map(|f| f.path)
        .collect();
    let removed = super::delete_files(table, &orphans, settings.dry_run).await;
    let verb = if settings.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    Ok((
        removed,
        format!("{verb} {removed} orphan files under {location}"),
    ))
}
