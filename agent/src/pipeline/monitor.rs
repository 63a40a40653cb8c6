//! Slot monitor: how much WAL the slot retains, from `pg_replication_slots`, every few seconds.
//!
//! It runs on its own session (a replication connection that never starts streaming), so it
//! keeps reporting while the stream is busy or reconnecting.

use std::time::Duration;

use super::status::{self, SharedStatus};
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::Session;
use crate::telemetry::SourceMetrics;

/// How often the slot is measured.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Measure forever (the caller aborts the task); errors are retried at the next interval.
pub async fn slot_lag_loop(
    url: SourceUrl,
    slot: String,
    publication: String,
    metrics: SourceMetrics,
    status: SharedStatus,
) {
    loop {
        match Session::connect(&url, &slot, &publication, None).await {
            Ok(mut session) => loop {
                match session.slot_retained_bytes(&slot).await {
                    Ok(Some(bytes)) => {
                        metrics.slot_lag.record(bytes);
                        status::update(&status, |s| s.slot_lag_bytes = Some(bytes));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(slot, "slot monitor query failed: {e}");
                        break;
                    }
                }
                tokio::time::sleep(INTERVAL).await;
            },
            Err(e) => tracing::debug!(slot, "slot monitor cannot connect: {e}"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
