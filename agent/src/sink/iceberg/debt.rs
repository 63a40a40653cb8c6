//! Small-file debt as the agent's own commits create it, so maintenance can run when a table
//! needs it instead of only on its timer. At a short `flush_interval` a table gains a data
//! file per commit: 20 commits/s put ~100 small files in a table between two runs 5 s apart,
//! far above the ≤ 50 files a healthy table keeps. The stream reports each commit's files
//! here; when a table's count since its last maintenance reaches the threshold, the waiting
//! maintenance task is woken (it rate-limits itself).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use iceberg::TableIdent;
use tokio::sync::Notify;

struct Debt {
    files: Mutex<HashMap<TableIdent, u64>>,
    threshold: AtomicU64,
    due: Notify,
}

fn debt() -> &'static Debt {
    static DEBT: OnceLock<Debt> = OnceLock::new();
    DEBT.get_or_init(|| Debt {
        files: Mutex::new(HashMap::new()),
        threshold: AtomicU64::new(u64::MAX),
        due: Notify::new(),
    })
}

/// Wake maintenance once a table gained `files` data files since it was last maintained
/// (`u64::MAX`, the default, never wakes it: no maintenance task runs).
pub fn set_threshold(files: u64) {
    debt().threshold.store(files.max(1), Ordering::Relaxed);
}

/// The agent committed `files` new data files to `ident`.
pub fn added(ident: &TableIdent, files: u64) {
    let d = debt();
    let total = {
        let mut m = d.files.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ident.clone()).or_default();
        *n += files;
        *n
    };
    let threshold = d.threshold.load(Ordering::Relaxed);
    if total >= threshold && total - files < threshold {
        d.due.notify_one();
    }
}

/// Whether `ident`'s debt reached the threshold.
pub fn is_due(ident: &TableIdent) -> bool {
    let d = debt();
    let m = d.files.lock().unwrap_or_else(|p| p.into_inner());
    m.get(ident).copied().unwrap_or(0) >= d.threshold.load(Ordering::Relaxed)
}

/// Maintenance looked at `ident`: its debt starts again from zero.
pub fn reset(ident: &TableIdent) {
    let mut m = debt().files.lock().unwrap_or_else(|p| p.into_inner());
    m.remove(ident);
}

/// Wait until some table's debt reached the threshold.
pub async fn due() {
    debt().due.notified().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn crossing_the_threshold_wakes_the_waiter_once() {
        set_threshold(10);
        let t = TableIdent::from_strs(["debt_ns", "t"]).unwrap_or_else(|_| unreachable!());
        added(&t, 6);
        added(&t, 6);
        // The permit of the crossing is stored until someone waits.
        tokio::time::timeout(std::time::Duration::from_secs(1), due())
            .await
            .unwrap_or_else(|_| panic!("not woken"));
        added(&t, 6);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), due())
                .await
                .is_err(),
            "woken only when crossing"
        );
        reset(&t);
        added(&t, 10);
        tokio::time::timeout(std::time::Duration::from_secs(1), due())
            .await
            .unwrap_or_else(|_| panic!("not woken after reset"));
    }
}
