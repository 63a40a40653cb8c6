//! Tables to copy again: asked for through the API or found re-created by the slot monitor.
//! A request rings a bell that ends the streaming attempt at the next transaction boundary;
//! the next attempt marks the table's Iceberg state (so a crash does not forget it) and
//! copies it behind a truncate marker.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

pub use crate::telemetry::events::CopyReason;

/// Pending requests of one pipeline, shared by the API, the monitor and the pipeline task.
pub struct CopyRequests {
    /// `schema.table` (as configured or as the source calls it now) → why.
    tables: Mutex<BTreeMap<String, CopyReason>>,
    bell: watch::Sender<u64>,
}

impl Default for CopyRequests {
    fn default() -> Self {
        Self {
            tables: Mutex::new(BTreeMap::new()),
            bell: watch::channel(0).0,
        }
    }
}

impl CopyRequests {
    /// Ask for `table` to be copied again; the streaming attempt ends at its next boundary.
    pub fn ask(&self, table: &str, reason: CopyReason) {
        if let Ok(mut t) = self.tables.lock() {
            // An operator's request is not downgraded by the monitor's, nor the reverse: the
            // first reason is the one logged.
            t.entry(table.to_string()).or_insert(reason);
        }
        self.bell.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The requests so far, leaving none.
    pub fn take(&self) -> BTreeMap<String, CopyReason> {
        self.tables
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    /// A receiver that changes with every request made after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.bell.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_rings_once_and_is_taken_once() {
        let r = CopyRequests::default();
        let mut bell = r.subscribe();
        assert!(!bell.has_changed().unwrap_or(true));
        r.ask("public.t", CopyReason::Requested);
        r.ask("public.t", CopyReason::Recreated);
        assert!(bell.has_changed().unwrap_or(false));
        bell.mark_unchanged();
        let taken = r.take();
        assert_eq!(taken.get("public.t"), Some(&CopyReason::Requested));
        assert!(r.take().is_empty());
    }
}
