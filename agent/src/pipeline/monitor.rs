//! Slot monitor: how much WAL the slot retains, from `pg_replication_slots`, every few seconds;
//! the `max_slot_lag_bytes` alarm; the optional heartbeat; and whether the configured tables
//! are still the published ones (a dropped table leaves the publication without a message in
//! the stream), and whether the publication still publishes every operation.
//!
//! It runs on its own session (a replication connection that never starts streaming), so it
//! keeps reporting while the stream is busy or reconnecting.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::status::SharedStatus;
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::{Session, SourceError};
use crate::telemetry::events::{
    CopyReason, PartitionsMoved, PublicationLeavesOut, SlotLagMeasured, TableLeftPublication,
};
use crate::telemetry::SourceMetrics;

/// How often the slot is measured.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What the monitor watches and does.
pub struct MonitorConfig {
    /// Source.
    pub url: SourceUrl,
    /// Slot to measure.
    pub slot: String,
    /// Publication (the session needs one to connect; nothing is streamed).
    pub publication: String,
    /// Alarm threshold.
    pub max_slot_lag_bytes: Option<u64>,
    /// Heartbeat period.
    pub heartbeat_interval: Option<Duration>,
    /// The configured tables (`schema`, `table`) as the pipeline found them at start.
    pub tables: Vec<(String, String)>,
    /// Where a table found dropped and created again is asked to be copied again.
    pub copies: std::sync::Arc<super::requests::CopyRequests>,
}

/// Measure forever (the caller aborts the task); errors are retried at the next interval.
pub async fn slot_lag_loop(cfg: MonitorConfig, metrics: SourceMetrics, status: SharedStatus) {
    let MonitorConfig {
        url,
        slot,
        publication,
        max_slot_lag_bytes,
        heartbeat_interval,
        tables,
        copies,
    } = cfg;
    let mut last_beat = Instant::now();
    let mut alarmed = false;
    // The relations streamed (by OID: a table dropped and created again is another one),
    // and those already reported gone.
    let mut watched: Option<Vec<(u32, String)>> = None;
    let mut gone: HashSet<u32> = HashSet::new();
    // The leaf partitions of each partitioned table streamed, as last seen.
    let mut leaves: Option<Leaves> = None;
    // Whether the publication's missing operations were reported: once until it is fixed,
    // once more if it loses one again.
    let mut leaves_out = false;
    loop {
        match Session::connect(&url, &slot, &publication, None).await {
            Ok(mut session) => loop {
                if let Some(every) = heartbeat_interval {
                    if last_beat.elapsed() >= every {
                        last_beat = Instant::now();
                        if let Err(e) = session.emit_heartbeat().await {
                            tracing::debug!(slot, "heartbeat failed: {e}");
                            break;
                        }
                    }
                }
                match session.slot_retained_bytes(&slot).await {
                    Ok(Some(bytes)) => {
                        alarmed = SlotLagMeasured {
                            slot: &slot,
                            retained_bytes: bytes,
                            max: max_slot_lag_bytes,
                            was_over: alarmed,
                        }
                        .emit(&metrics, &status);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(slot, "slot monitor query failed: {e}");
                        break;
                    }
                }
                if watched.is_none() {
                    watched = session.table_oids(&tables).await.ok();
                }
                if let Some(w) = &watched {
                    let oids: Vec<u32> = w.iter().map(|(o, _)| *o).collect();
                    match session.unpublished(&publication, &oids).await {
                        Ok(now) => {
                            for (oid, table) in w {
                                if !now.contains(oid) || !gone.insert(*oid) {
                                    continue;
                                }
                                // Another relation under its name: created again.
                                let named = tables
                                    .iter()
                                    .filter(|(s, t)| format!("{s}.{t}") == *table)
                                    .cloned()
                                    .collect::<Vec<_>>();
                                match session.table_oids(&named).await {
                                    Ok(o) if o.iter().any(|(n, _)| n != oid) => {
                                        copies.ask(table, CopyReason::Recreated)
                                    }
                                    _ => TableLeftPublication {
                                        table,
                                        publication: &publication,
                                    }
                                    .emit(&metrics),
                                }
                            }
                        }
                        Err(e) => {
                            tracing::debug!(slot, "publication check failed: {e}");
                            break;
                        }
                    }
                }
                match session.check_operations(&publication).await {
                    Ok(()) => leaves_out = false,
                    Err(SourceError::Publication { reason, .. }) => {
                        if !leaves_out {
                            PublicationLeavesOut {
                                publication: &publication,
                                reason: &reason,
                            }
                            .emit(&metrics);
                        }
                        leaves_out = true;
                    }
                    Err(e) => {
                        tracing::debug!(slot, "publication operations check failed: {e}");
                        break;
                    }
                }
                if let Err(e) = watch_partitions(&mut session, &tables, &mut leaves, &metrics).await
                {
                    tracing::debug!(slot, "partition check failed: {e}");
                    break;
                }
                let nap = heartbeat_interval.map_or(INTERVAL, |h| h.min(INTERVAL));
                tokio::time::sleep(nap).await;
            },
            Err(e) => tracing::debug!(slot, "slot monitor cannot connect: {e}"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Per partitioned table streamed (`schema.table`), its leaf partitions (OID, quoted name).
type Leaves = Vec<(String, Vec<(u32, String)>)>;

/// Compare the leaf partitions of the partitioned tables among `tables` with those seen last
/// (`seen`, filled on the first call): a partition attached with rows, or one detached or
/// dropped, moved rows without publishing them (reported once each). A partition created
/// empty, then filled through the stream, is not reported.
async fn watch_partitions(
    session: &mut Session,
    tables: &[(String, String)],
    seen: &mut Option<Leaves>,
    metrics: &SourceMetrics,
) -> Result<(), SourceError> {
    let Some(seen) = seen else {
        let mut first = Vec::new();
        for (schema, table) in tables {
            if let Some(l) = session.leaf_partitions(schema, table).await? {
                first.push((format!("{schema}.{table}"), l));
            }
        }
        *seen = Some(first);
        return Ok(());
    };
    for (table, was) in seen.iter_mut() {
        let Some((schema, name)) = tables.iter().find(|(s, t)| format!("{s}.{t}") == *table) else {
            continue;
        };
        let now = session
            .leaf_partitions(schema, name)
            .await?
            .unwrap_or_default();
        let mut attached = Vec::new();
        for (oid, p) in now.iter().filter(|(o, _)| !was.iter().any(|(w, _)| w == o)) {
            if session
                .has_rows_older_than_attach(*oid, p, schema, name)
                .await?
            {
                attached.push(p.clone());
            }
        }
        let left: Vec<String> = was
            .iter()
            .filter(|(o, _)| !now.iter().any(|(n, _)| n == o))
            .map(|(_, p)| p.clone())
            .collect();
        if !attached.is_empty() || !left.is_empty() {
            PartitionsMoved {
                table,
                attached: &attached,
                left: &left,
            }
            .emit(metrics);
        }
        *was = now;
    }
    Ok(())
}
