//! One commit at a time per table within the agent. The stream commits a table every flush and
//! maintenance rewrites it meanwhile; without this, at a short flush interval the stream wins
//! every race and a compaction or expiry never lands (measured: 20 commits/s left every
//! maintenance action in conflict). Other writers are still handled by the catalog's
//! compare-and-swap and our rebase.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use iceberg::TableIdent;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Locks = Mutex<HashMap<TableIdent, Arc<AsyncMutex<()>>>>;

fn locks() -> &'static Locks {
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

/// Wait for and hold the commit lock of `ident` (one entry per table, never removed: bounded
/// by the tables the agent writes).
pub async fn table(ident: &TableIdent) -> OwnedMutexGuard<()> {
    let m = {
        let mut map = locks().lock().unwrap_or_else(|p| p.into_inner());
        map.entry(ident.clone()).or_default().clone()
    };
    m.lock_owned().await
}
