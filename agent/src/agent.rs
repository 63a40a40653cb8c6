//! `philotes run`: telemetry, catalog, pipelines and the API, until a shutdown signal.

use std::sync::Arc;

use tokio::sync::watch;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::pipeline::{Pipeline, PipelineHandle};
use crate::sink::iceberg::commit::Committer;
use crate::sink::iceberg::mirror::CompactRules;
use crate::sink::iceberg::open_catalog;
use crate::sink::iceberg::table::TableOptions;
use crate::telemetry::Telemetry;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Telemetry could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The catalog could not be opened.
    #[error(transparent)]
    Sink(#[from] crate::sink::iceberg::SinkError),
    /// A pipeline could not be built.
    #[error(transparent)]
    Source(#[from] crate::source::postgres::session::SourceError),
    /// The API listener could not start.
    #[error("api: {0}")]
    Api(String),
}

/// A running agent.
pub struct Agent {
    /// Pipeline handles (status, control).
    pub pipelines: Vec<PipelineHandle>,
    /// The API's bound address, if it listens.
    pub api_addr: Option<std::net::SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stopped after the pipelines, so that health and `/metrics` answer through the drain.
    api_shutdown: watch::Sender<bool>,
    api_task: Option<tokio::task::JoinHandle<()>>,
    telemetry: Option<Telemetry>,
}

impl Agent {
    /// Start everything described by `cfg` (telemetry must already be initialised).
    pub async fn start(cfg: Config, telemetry: Telemetry) -> Result<Self, AgentError> {
        let catalog = open_catalog(&cfg.iceberg).await?;
        let secret_list: Arc<[String]> = cfg.iceberg.secrets().into();
        // Every commit of the agent (stream and maintenance) goes through one committer.
        let committer = Committer::open(&cfg.iceberg, catalog.clone())
            .await
            .map_err(|e| {
                crate::sink::iceberg::SinkError::Catalog(crate::sink::iceberg::catalog::scrub(
                    e.to_string(),
                    &secret_list,
                ))
            })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        // Metadata hygiene on every commit, also when maintenance is left to other engines.
        let options = TableOptions {
            properties: crate::sink::iceberg::hygiene::properties(
                cfg.maintenance.metadata_versions,
            )
            .into(),
            mirror_compaction: cfg.maintenance.enabled.then_some(CompactRules {
                target_file_size: cfg.maintenance.target_file_size,
                min_input_files: cfg.maintenance.min_input_files as usize,
                delete_ratio: cfg.maintenance.delete_ratio,
            }),
        };
        for p in &cfg.pipelines {
            let (pipeline, handle) = Pipeline::new(
                p.clone(),
                committer.clone(),
                secret_list.clone(),
                options.clone(),
                cfg.ha.clone(),
                &telemetry.metrics,
            );
            handles.push(handle);
            let rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(pipeline.run(rx)));
        }
        if cfg.maintenance.enabled {
            crate::sink::iceberg::maintenance::set_store_config(&cfg.iceberg);
            let statuses = handles
                .iter()
                .map(|h: &crate::pipeline::PipelineHandle| (h.name.clone(), h.status.clone()))
                .collect();
            tasks.push(tokio::spawn(crate::maintenance::run_loop(
                cfg.clone(),
                committer.clone(),
                telemetry.metrics.clone(),
                shutdown_rx.clone(),
                statuses,
            )));
        }
        tasks.push(tokio::spawn(crate::memory::trim_loop(shutdown_rx.clone())));
        let mut api_addr = None;
        let (api_shutdown, api_rx) = watch::channel(false);
        let mut api_task = None;
        if cfg.api.enabled {
            let state = ApiState::new(&cfg, handles.clone(), &telemetry, shutdown_rx.clone());
            let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
                .await
                .map_err(|e| {
                    AgentError::Api(format!("cannot listen on {}: {e}", cfg.api.listen))
                })?;
            api_addr = listener.local_addr().ok();
            api_task = Some(tokio::spawn(api::serve(listener, state, api_rx)));
        }
        Ok(Self {
            pipelines: handles,
            api_addr,
            shutdown: shutdown_tx,
            tasks,
            api_shutdown,
            api_task,
            telemetry: Some(telemetry),
        })
    }

    /// Drain: pipelines flush what they have, then the API stops, then exporters flush.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let _ = self.api_shutdown.send(true);
        if let Some(t) = self.api_task.take() {
            let _ = t.await;
        }
        if let Some(t) = self.telemetry.take() {
            t.shutdown().await;
        }
    }
}

/// Wait for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
