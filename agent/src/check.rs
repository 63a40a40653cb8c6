//! `philotes check`: reach every source and the catalog; report each problem on one line.

use crate::config::Config;
use crate::sink::iceberg::{catalog, open_catalog};
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::session::{Session, SourceError};

/// What `philotes check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Problems that make `run` fail: one line each, exit status 2.
    pub problems: Vec<String>,
    /// Things that work against the user but do not stop `run` (an unreachable OTLP endpoint).
    pub warnings: Vec<String>,
}

/// Check everything `cfg` needs. A failed check leaves nothing behind: local files and
/// directories it created while opening the catalog are removed again.
pub async fn check(cfg: &Config) -> CheckReport {
    let created = CreatedPaths::before(&catalog::local_paths(&cfg.iceberg));
    let problems = run_checks(cfg).await;
    if !problems.is_empty() {
        created.remove();
    }
    CheckReport {
        problems,
        warnings: check_otlp(cfg).await.into_iter().collect(),
    }
}

/// The topmost missing ancestor of each path that might be created, recorded before the check.
struct CreatedPaths(Vec<std::path::PathBuf>);

impl CreatedPaths {
    fn before(paths: &[std::path::PathBuf]) -> Self {
        let mut roots: Vec<std::path::PathBuf> = Vec::new();
        for p in paths {
            let mut top = None;
            let mut cur = Some(p.as_path());
            while let Some(c) = cur {
                if c.exists() {
                    break;
                }
                top = Some(c.to_path_buf());
                cur = c.parent();
            }
            if let Some(t) = top {
                if !roots.iter().any(|r| t.starts_with(r)) {
                    roots.retain(|r| !r.starts_with(&t));
                    roots.push(t);
                }
            }
        }
        Self(roots)
    }

    /// Remove what did not exist before; nothing that existed is touched.
    fn remove(&self) {
        for p in &self.0 {
            let result = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if let Err(e) = result {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), "check could not remove what it created: {e}");
                }
            }
        }
    }
}

/// A warning when the OTLP endpoint (config or `OTEL_EXPORTER_OTLP_ENDPOINT`) does not accept
/// a TCP connection: `run` would start and lose every metric and span it pushes.
async fn check_otlp(cfg: &Config) -> Option<String> {
    let (endpoint, _) = crate::telemetry::otlp_target(&cfg.telemetry)?;
    let url = match url::Url::parse(&endpoint) {
        Ok(u) => u,
        Err(e) => {
            return Some(format!(
                "telemetry.otlp_endpoint {endpoint:?} is not a URL: {e}"
            ))
        }
    };
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(4318);
    let shown = crate::config::redact_url(&endpoint);
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!(
            "telemetry.otlp_endpoint {shown} is not reachable ({e}); metrics and traces would not be pushed"
        )),
        Err(_) => Some(format!(
            "telemetry.otlp_endpoint {shown} did not answer within 3s; metrics and traces would not be pushed"
        )),
    }
}

/// Check everything `cfg` needs; returns one line per problem (empty = all good).
pub async fn run_checks(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let catalog = open_catalog(&cfg.iceberg).await.ok();
    for p in &cfg.pipelines {
        if let Err(e) = check_source(p.source.url(), p, catalog.as_deref(), cfg.ha.enabled).await {
            problems.push(format!("pipeline {}: {e}", p.name));
        }
    }
    let secrets = cfg.iceberg.secrets();
    match open_catalog(&cfg.iceberg).await {
        Ok(cat) => {
            // A cheap round trip proves reachability and credentials.
            if let Err(e) = cat.list_namespaces(None).await {
                problems.push(format!(
                    "iceberg: catalog {} is not usable: {}",
                    crate::config::redact_url(&cfg.iceberg.uri),
                    catalog::scrub(e.to_string(), &secrets)
                ));
            } else if cfg.iceberg.catalog == crate::config::CatalogKind::Sql
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
    catalog: Option<&dyn iceberg::Catalog>,
    standby_allowed: bool,
) -> Result<(), SourceError> {
    let mut s = Session::connect(url, &p.slot_name(), &p.publication_name(), None).await?;
    s.check_wal_level().await?;
    let mut tables = p.table_names();
    // A table renamed in the source is found under its new name (its Iceberg table says).
    if let Some(c) = catalog {
        crate::pipeline::renamed_tables(c, &p.namespace_name(), &mut s, &mut tables).await?;
    }
    s.check_tables(&tables).await?;
    s.check_partitioned(&p.publication_name(), &tables).await?;
    s.check_operations(&p.publication_name()).await?;
    // With `[ha]` another agent streaming from the slot is the leader this one stands by for.
    if standby_allowed {
        return Ok(());
    }
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
                        "it is in use by another consumer (pid {pid}); is a second agent running with this slot? ([ha] enabled = true runs agents as leader and standby)"
                    ),
                })
            }
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
    Ok(())
}

/// Problems found at start-up that no retry can cure (wrong `wal_level`, missing tables, a slot
/// held by another agent, a publication that would leave a partitioned table or an operation
/// out).
/// Unreachable sources are not among them: `run` keeps retrying those.
pub async fn fatal_source_problems(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let catalog = open_catalog(&cfg.iceberg).await.ok();
    for p in &cfg.pipelines {
        match check_source(p.source.url(), p, catalog.as_deref(), cfg.ha.enabled).await {
            Err(
                e @ (SourceError::WalLevel(_)
                | SourceError::MissingTable(_)
                | SourceError::NotATable { .. }
                | SourceError::Slot { .. }
                | SourceError::Publication { .. }),
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
