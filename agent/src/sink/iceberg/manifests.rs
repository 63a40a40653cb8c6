//! Parsed manifests, by path. A manifest is immutable once written, and parsing one is the
//! largest cost of maintenance (iceberg-rust parses the Avro schema of every file): each
//! compaction run looked at the current snapshot's manifests five times (health, plan, the
//! rewrite's preparation, the gauges after). The cache keeps only what a table's current
//! snapshot lists ([`keep_only`], called whenever the current manifests are read), so it holds
//! a few dozen manifests per table, not the history.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use iceberg::io::FileIO;
use iceberg::spec::{Manifest, ManifestFile};

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
