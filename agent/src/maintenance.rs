//! Keeping the pipelines' tables healthy: a background task that examines every table each
//! `maintenance.interval` and runs the actions its debt calls for, one table and one action at
//! a time (so it takes at most one core's share from streaming), and `philotes maintain`, the
//! same actions run once for operators and cron.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iceberg::{Catalog, NamespaceIdent, TableIdent};
use tokio::sync::watch;

use crate::config::{Config, MaintenanceConfig};
use crate::sink::iceberg::commit::Committer;
use crate::sink::iceberg::debt;
use crate::sink::iceberg::maintenance::{self, Outcome, Scope, Settings};
use crate::telemetry::events::{TableHealthMeasured, TableMaintained};
use crate::telemetry::status::SharedStatus;
use crate::telemetry::{Metrics, PipelineState};

/// A maintenance run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    /// The catalog could not be opened or listed.
    #[error("catalog: {0}")]
    Catalog(String),
    /// `--pipeline` or `--table` names nothing.
    #[error("{0}")]
    NotFound(String),
}

/// One table a pipeline writes: `(source label, identifier)`.
type Target = (String, TableIdent);

/// The tables of `cfg`'s pipelines, as the catalog lists them (the dead-letter table and
/// tables that joined the publication included).
async fn targets(
    catalog: &Arc<dyn Catalog>,
    cfg: &Config,
    pipeline: Option<&str>,
    table: Option<&str>,
) -> Result<Vec<Target>, MaintainError> {
    let mut out = Vec::new();
    for p in &cfg.pipelines {
        if pipeline.is_some_and(|want| want != p.name) {
            continue;
        }
        let ns = NamespaceIdent::new(p.namespace_name());
        if !catalog
            .namespace_exists(&ns)
            .await
            .map_err(|e| MaintainError::Catalog(e.to_string()))?
        {
            continue;
        }
        for ident in catalog
            .list_tables(&ns)
            .await
            .map_err(|e| MaintainError::Catalog(e.to_string()))?
        {
            let full = format!("{}.{}", p.namespace_name(), ident.name());
            if table.is_some_and(|want| want != full && want != ident.name()) {
                continue;
            }
            out.push((p.name.clone(), ident));
        }
    }
    Ok(out)
}

/// With `[ha]`, only the agent leading a pipeline looks after its tables (a standby's
/// compaction would only race the leader's).
fn leads(statuses: &[(String, SharedStatus)], source: &str) -> bool {
    statuses.iter().any(|(name, st)| {
        name == source
            && matches!(
                crate::telemetry::status::snapshot(st).state,
                PipelineState::Streaming | PipelineState::Snapshotting | PipelineState::Paused
            )
    })
}

/// `philotes maintain`: every action on the selected tables now; outcomes per table.
pub async fn run_once(
    cfg: &Config,
    pipeline: Option<&str>,
    table: Option<&str>,
    dry_run: bool,
    metrics: Option<&Metrics>,
) -> Result<Vec<(String, Outcome)>, MaintainError> {
    if let Some(p) = pipeline {
        if !cfg.pipelines.iter().any(|c| c.name == p) {
            return Err(MaintainError::NotFound(format!("no pipeline named {p:?}")));
        }
    }
    let catalog = crate::sink::iceberg::open_catalog(&cfg.iceberg)
        .await
        .map_err(|e| MaintainError::Catalog(e.to_string()))?;
    maintenance::set_store_config(&cfg.iceberg);
    let committer = Committer::open(&cfg.iceberg, catalog.clone())
        .await
        .map_err(|e| MaintainError::Catalog(e.to_string()))?;
    let list = targets(&catalog, cfg, pipeline, table).await?;
    if list.is_empty() {
        if let Some(t) = table {
            return Err(MaintainError::NotFound(format!(
                "no table {t:?} in the pipelines' namespaces"
            )));
        }
    }
    let settings = Settings {
        config: cfg.maintenance.clone(),
        dry_run,
        force: true,
    };
    let mut out = Vec::new();
    for (source, ident) in list {
        for o in maintenance::maintain(&committer, &ident, &settings, Scope::WithOrphans)
            .await
            .1
        {
            if let Some(m) = metrics {
                emit(m, &source, &ident, &o);
            }
            out.push((ident.to_string(), o));
        }
    }
    Ok(out)
}

fn emit(m: &Metrics, source: &str, ident: &TableIdent, o: &Outcome) {
    TableMaintained {
        source,
        table: &ident.to_string(),
        action: o.action.as_str(),
        status: o.status.as_str(),
        files_removed: o.files_removed,
        bytes_written: o.bytes_written,
        summary: &o.summary,
        duration: o.duration,
    }
    .emit(m);
}

/// Record a table's measured health in the gauges.
fn record(metrics: &Metrics, source: &str, ident: &TableIdent, h: &maintenance::Health) {
    TableHealthMeasured {
        source,
        table: &ident.to_string(),
        data_files: h.data_files,
        delete_files: h.delete_files,
        snapshots: h.snapshots,
        metadata_bytes: h.metadata_bytes,
    }
    .emit(metrics);
}

/// Measure `ident` again (after maintenance changed it) into the gauges.
async fn measure(
    committer: &Committer,
    ident: &TableIdent,
    source: &str,
    cfg: &MaintenanceConfig,
    metrics: &Metrics,
) {
    if let Ok(table) = committer.load(ident).await {
        if let Ok(h) = maintenance::health(&table, cfg).await {
            record(metrics, source, ident, &h);
        }
    }
}

/// Shortest time between two runs woken by debt.
const DEBT_SPACING: Duration = Duration::from_secs(1);

/// Small files added to a table since it was last maintained that wake maintenance early:
/// twice what makes a compaction worth it (`min_input_files`), at most 32, so a table stays
/// well under 50 files.
fn debt_threshold(cfg: &MaintenanceConfig) -> u64 {
    (u64::from(cfg.min_input_files) * 2).clamp(1, 32)
}

/// How often each table's orphans are looked for.
fn orphan_period(cfg: &MaintenanceConfig) -> Duration {
    (cfg.orphan_age / 4).max(Duration::from_secs(3600))
}

/// The background task: until `shutdown`, every `interval`, measure and maintain each table.
pub async fn run_loop(
    cfg: Config,
    committer: Committer,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
    statuses: Vec<(String, SharedStatus)>,
) {
    let settings = Settings {
        config: cfg.maintenance.clone(),
        dry_run: false,
        force: false,
    };
    // The first sweep for orphans waits a full period: files of flushes in flight at start
    // are young anyway, and a restart loop must not list the warehouse every time.
    let started = Instant::now();
    let mut last_orphans: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(cfg.maintenance.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Besides the timer, a table that gained this many small files since it was last looked
    // at wakes the task (at most once per `DEBT_SPACING`): the files a table holds stay
    // bounded however short the flush interval is.
    debt::set_threshold(debt_threshold(&settings.config));
    let mut last_run: Option<Instant> = None;
    loop {
        let by_debt = tokio::select! {
            _ = tick.tick() => false,
            _ = debt::due() => {
                if let Some(wait) = last_run.and_then(|t| DEBT_SPACING.checked_sub(t.elapsed())) {
                    tokio::time::sleep(wait).await;
                }
                true
            }
            _ = shutdown.changed() => return,
        };
        last_run = Some(Instant::now());
        if *shutdown.borrow() {
            return;
        }
        let list = match targets(committer.catalog(), &cfg, None, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("maintenance: cannot list tables: {e}");
                continue;
            }
        };
        let mut worked = false;
        for (source, ident) in list {
            if *shutdown.borrow() {
                return;
            }
            if cfg.ha.enabled && !leads(&statuses, &source) {
                continue;
            }
            // Woken by debt: only the tables in debt, and only their compaction.
            if by_debt && !debt::is_due(&ident) {
                continue;
            }
            let key = ident.to_string();
            let period = orphan_period(&settings.config);
            let orphans_due = match last_orphans.get(&key) {
                Some(t) => t.elapsed() >= period,
                None => started.elapsed() >= period,
            };
            let scope = match (by_debt, orphans_due) {
                (true, _) => Scope::Compaction,
                (false, true) => Scope::WithOrphans,
                (false, false) => Scope::Regular,
            };
            debt::reset(&ident);
            let (health, outcomes) = tokio::select! {
                o = maintenance::maintain(&committer, &ident, &settings, scope) => o,
                // Shutdown cancels a run between commits: nothing half-committed is left, at
                // worst unreferenced new files that the orphan sweep removes later.
                _ = shutdown.changed() => return,
            };
            // The measurement that decided the actions feeds the gauges (None: not ours).
            if let Some(h) = &health {
                record(&metrics, &source, &ident, h);
            }
            for o in &outcomes {
                if o.action == maintenance::Action::RemoveOrphans {
                    last_orphans.insert(key.clone(), Instant::now());
                }
                emit(&metrics, &source, &ident, o);
            }
            if !outcomes.is_empty() {
                // Measure again so the gauges show the paid-off debt at once.
                measure(&committer, &ident, &source, &settings.config, &metrics).await;
                worked = true;
            }
        }
        if worked {
            crate::memory::release_free().await;
        }
    }
}
