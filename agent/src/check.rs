//! `philotes check`: reach every source and the catalog; report each problem on one line.

use crate::config::Config;
use crate::sink::iceberg::{catalog, open_catalog};
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::{Session, SourceError};

/// Check everything `cfg` needs; returns one line per problem (empty = all good).
pub async fn run_checks(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for p in &cfg.pipelines {
        let url = match SourceUrl::parse(&p.source) {
            Ok(u) => u,
            Err(e) => {
                problems.push(format!("pipeline {}: source: {e}", p.name));
                continue;
            }
        };
        if let Err(e) = check_source(&url, p).await {
            problems.push(format!("pipeline {}: {e}", p.name));
        }
    }
    let secrets = catalog::secrets(&cfg.iceberg);
    match open_catalog(&cfg.iceberg).await {
        Ok(cat) => {
            // A cheap round trip proves reachability and credentials.
            if let Err(e) = cat.list_namespaces(None).await {
                problems.push(format!(
                    "iceberg: catalog {} is not usable: {}",
                    crate::config::redact_url(&cfg.iceberg.uri),
                    catalog::scrub(e.to_string(), &secrets)
                ));
            } else if cfg.iceberg.catalog == "sql"
                || (cfg.iceberg.warehouse.starts_with("s3://")
                    && cfg.iceberg.s3.access_key_id.is_some())
            {
                // With the SQL catalog we own the warehouse; a REST catalog with static S3
                // credentials writes there too. (Vended credentials are the catalog's business.)
                if let Err(e) = catalog::probe_warehouse(&cfg.iceberg).await {
                    problems.push(e.to_string());
                }
            }
        }
        Err(e) => problems.push(catalog::scrub(e.to_string(), &secrets)),
    }
    problems.into_iter().map(|l| l.replace('\n', " ")).collect()
}

async fn check_source(
    url: &SourceUrl,
    p: &crate::config::PipelineConfig,
) -> Result<(), SourceError> {
    let mut s = Session::connect(url, &p.slot_name(), &p.publication_name(), None).await?;
    s.check_wal_level().await?;
    s.check_tables(&p.table_names()).await?;
    // Another agent on the same slot. A consumer that just died (SIGKILL) holds it until the
    // server notices the closed socket, so give that a moment before calling it a conflict.
    let slot = p.slot_name();
    for attempt in 0..20 {
        match s.slot_holder(&slot).await? {
            None => return Ok(()),
            Some(pid) if attempt == 19 => {
                return Err(SourceError::Slot {
                    slot,
                    reason: format!(
                        "it is in use by another consumer (pid {pid}); is a second agent running with this slot?"
                    ),
                })
            }
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
    Ok(())
}

/// Problems found at start-up that no retry can cure (wrong `wal_level`, missing tables, a slot
/// held by another agent).
/// Unreachable sources are not among them: `run` keeps retrying those.
pub async fn fatal_source_problems(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for p in &cfg.pipelines {
        let Ok(url) = SourceUrl::parse(&p.source) else {
            continue;
        };
        match check_source(&url, p).await {
            Err(
                e @ (SourceError::WalLevel(_)
                | SourceError::MissingTable(_)
                | SourceError::Slot { .. }),
            ) => {
                problems.push(format!("pipeline {}: {e}", p.name));
            }
            Err(e) => {
                tracing::warn!(pipeline = %p.name, "source not reachable yet, will retry: {e}");
            }
            Ok(()) => {}
        }
    }
    problems
}
