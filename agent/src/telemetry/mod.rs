//! OpenTelemetry meter and tracer providers, the Prometheus and OTLP exporters, and logging.

pub mod events;
mod export;
pub mod instruments;
mod process;
mod scrub;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

pub use instruments::{Metrics, PipelineState, SourceMetrics, TableMetrics};
pub use process::OTLP_ONLY;

use crate::config::TelemetryConfig;
use export::{CountingMetricExporter, CountingSpanExporter, ExportErrors};

/// Telemetry set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An exporter could not be built.
    #[error("telemetry: {0}")]
    Exporter(String),
}

/// The providers and the instruments built from them.
pub struct Telemetry {
    /// Every instrument.
    pub metrics: Metrics,
    /// What `/metrics` serves (None when the Prometheus endpoint is off).
    pub registry: Option<Exposition>,
    meter_provider: Option<SdkMeterProvider>,
    /// Instruments only `/metrics` carries (the Prometheus client's process names).
    prometheus_only: Option<SdkMeterProvider>,
    tracer_provider: Option<SdkTracerProvider>,
}

fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| v.trim().eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

fn resource() -> Resource {
    let mut b = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        b = b.with_service_name("philotes-agent");
    }
    b.with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()),
    ])
    .build()
}

/// Where and how to push OTLP, from config and the standard `OTEL_*` variables.
pub fn otlp_target(cfg: &TelemetryConfig) -> Option<(String, bool)> {
    let endpoint = cfg
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty())?;
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
        .unwrap_or_else(|_| cfg.otlp_protocol.as_str().to_string());
    Some((
        endpoint.trim_end_matches('/').to_string(),
        protocol == "grpc",
    ))
}

fn export_interval(cfg: &TelemetryConfig) -> Duration {
    std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(cfg.export_interval)
}

impl Telemetry {
    /// Build providers and instruments; must run inside the tokio runtime (gRPC exporters).
    pub fn init(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let disabled = env_true("OTEL_SDK_DISABLED");
        let target = if disabled { None } else { otlp_target(cfg) };
        let timeout = Duration::from_secs(5);
        let res = resource();
        let errors = Arc::new(ExportErrors::default());
        let exp_err =
            |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter(e.to_string());

        let mut registry = None;
        let mut prometheus_only = None;
        let meter_provider = if disabled {
            None
        } else {
            let mut b = SdkMeterProvider::builder().with_resource(res.clone());
            if cfg.prometheus {
                let reg = prometheus::Registry::new();
                let exporter = opentelemetry_prometheus::exporter()
                    .with_registry(reg.clone())
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                b = b.with_reader(exporter);
                // A second provider and registry, for what OTLP must not carry (a registry
                // takes one OpenTelemetry exporter only); one target_info is enough.
                let only_reg = prometheus::Registry::new();
                let only = opentelemetry_prometheus::exporter()
                    .with_registry(only_reg.clone())
                    .without_target_info()
                    .build()
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                prometheus_only = Some(
                    SdkMeterProvider::builder()
                        .with_resource(res.clone())
                        .with_reader(only)
                        .build(),
                );
                registry = Some(Exposition {
                    registries: [reg, only_reg],
                });
            }
            if let Some((endpoint, grpc)) = &target {
                let interval = export_interval(cfg);
                if *grpc {
                    let exporter = opentelemetry_otlp::MetricExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_timeout(timeout)
                        .build()
                        .map_err(exp_err)?;
                    let exporter =
                        CountingMetricExporter::new(exporter, errors.clone(), endpoint.clone());
                    b = b.with_reader(
                        PeriodicReader::builder(exporter)
                            .with_interval(interval)
                            .build(),
                    );
                } else {
                    let exporter = opentelemetry_otlp::MetricExporter::builder()
                        .with_http()
                        .with_endpoint(format!("{endpoint}/v1/metrics"))
                        .with_timeout(timeout)
                        .build()
                        .map_err(exp_err)?;
                    let exporter =
                        CountingMetricExporter::new(exporter, errors.clone(), endpoint.clone());
                    b = b.with_reader(
                        PeriodicReader::builder(exporter)
                            .with_interval(interval)
                            .build(),
                    );
                }
            }
            Some(b.build())
        };

        // Spans always get ids (so logs carry trace_id); they leave the process only over OTLP.
        let tracer_provider = if disabled {
            None
        } else {
            let mut b = SdkTracerProvider::builder().with_resource(res);
            match &target {
                Some((endpoint, true)) if cfg.traces => {
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_timeout(timeout)
                        .build()
                        .map_err(exp_err)?;
                    b = b.with_batch_exporter(CountingSpanExporter::new(
                        exporter,
                        errors.clone(),
                        endpoint.clone(),
                    ));
                }
                Some((endpoint, false)) if cfg.traces => {
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_endpoint(format!("{endpoint}/v1/traces"))
                        .with_timeout(timeout)
                        .build()
                        .map_err(exp_err)?;
                    b = b.with_batch_exporter(CountingSpanExporter::new(
                        exporter,
                        errors.clone(),
                        endpoint.clone(),
                    ));
                }
                _ => {}
            }
            Some(b.build())
        };

        let meter = match &meter_provider {
            Some(mp) => mp.meter("philotes"),
            None => opentelemetry::metrics::NoopMeterProvider::new().meter("philotes"),
        };
        let metrics = Metrics::new(&meter);
        if meter_provider.is_some() {
            process::register_semconv(&meter);
            process::register_runtime(&meter);
            register_export_errors(&meter, errors);
        }
        if let Some(p) = &prometheus_only {
            process::register_prometheus(&p.meter("philotes"));
        }
        Ok(Self {
            metrics,
            registry,
            meter_provider,
            prometheus_only,
            tracer_provider,
        })
    }

    /// Install the global `tracing` subscriber (text or JSON logs, plus spans to OTLP); every
    /// string in `secrets` is scrubbed from the log output.
    pub fn init_logging(&self, cfg: &TelemetryConfig, secrets: Vec<String>) {
        let writer = scrub::ScrubbingStderr::new(secrets);
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(format!(
                // Export failures are counted and logged by our wrappers (rate-limited); the SDK's own
                // per-attempt errors would repeat every interval.
                "{},opentelemetry=off,opendal=warn,sqlx=warn,hyper=warn,reqwest=warn",
                cfg.log_level
            ))
        });
        let fmt = if cfg.log_format == crate::config::LogFormat::Json {
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(writer)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(writer)
                .boxed()
        };
        let otel = self
            .tracer_provider
            .as_ref()
            .map(|tp| tracing_opentelemetry::layer().with_tracer(tp.tracer("philotes")));
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init();
    }

    /// The Prometheus text exposition, if the endpoint is on.
    pub fn render(&self) -> Option<String> {
        self.registry.as_ref()?.render().ok()
    }

    /// Flush and stop both exporters; blocking work runs off the async threads.
    pub async fn shutdown(self) {
        let mp = self.meter_provider;
        let only = self.prometheus_only;
        let tp = self.tracer_provider;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tp) = tp {
                let _ = tp.shutdown();
            }
            if let Some(mp) = mp {
                let _ = mp.shutdown();
            }
            if let Some(p) = only {
                let _ = p.shutdown();
            }
        })
        .await;
    }
}

/// The registries behind `/metrics`: the instruments both readers share, and those only
/// `/metrics` carries.
#[derive(Clone)]
pub struct Exposition {
    registries: [prometheus::Registry; 2],
}

impl Exposition {
    /// The `/metrics` text: every family except those meant for OTLP only.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut families: Vec<_> = self.registries.iter().flat_map(|r| r.gather()).collect();
        families.retain(|f| !process::OTLP_ONLY.contains(&f.name()));
        prometheus::TextEncoder::new().encode_to_string(&families)
    }
}

/// `philotes_telemetry_export_errors_total{signal}`: failed OTLP exports.
fn register_export_errors(meter: &opentelemetry::metrics::Meter, errors: Arc<ExportErrors>) {
    let _ = meter
        .u64_observable_counter("philotes.telemetry.export_errors")
        .with_description("Failed OTLP exports, by signal")
        .with_callback(move |o| {
            use std::sync::atomic::Ordering;
            o.observe(
                errors.metrics.load(Ordering::Relaxed),
                &[KeyValue::new("signal", "metrics")],
            );
            o.observe(
                errors.traces.load(Ordering::Relaxed),
                &[KeyValue::new("signal", "traces")],
            );
        })
        .build();
}

/// The `iceberg.commit` span of one table's commit (a flush's or a snapshot chunk's), its
/// trace id recorded.
pub fn commit_span(
    source: &str,
    table: &str,
    iceberg_table: impl std::fmt::Display,
    rows: u64,
    lsn: &str,
) -> tracing::Span {
    let span = tracing::info_span!(
        "iceberg.commit",
        source = %source,
        table = %table,
        iceberg.table = %iceberg_table,
        rows = rows as i64,
        lsn = %lsn,
        trace_id = tracing::field::Empty,
    );
    record_trace_id(&span);
    span
}

/// Record the span's OpenTelemetry trace id in its `trace_id` field, so every log line inside
/// it (text or JSON) carries the id that finds the trace.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// Logging for commands that run without the full telemetry stack (`check`); secrets scrubbed.
pub fn init_basic_logging(level: &str, secrets: Vec<String>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(scrub::ScrubbingStderr::new(secrets))
        .try_init();
}
