//! OTLP exporters wrapped so that failures are counted and logged at most once a minute.
//!
//! The SDK's own error logging fires on every failed export (every interval); with a collector
//! down that floods the log. The wrappers keep the count in atomics (read by the observable
//! counter `philotes.telemetry.export_errors`) and rate-limit the log line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Export failure counts per signal, shared with the observable counter.
#[derive(Debug, Default)]
pub struct ExportErrors {
    /// Failed metric exports.
    pub metrics: AtomicU64,
    /// Failed span exports.
    pub traces: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl ExportErrors {
    fn record(&self, signal: &'static str, endpoint: &str, err: &dyn std::fmt::Display) {
        let n = match signal {
            "metrics" => self.metrics.fetch_add(1, Ordering::Relaxed),
            _ => self.traces.fetch_add(1, Ordering::Relaxed),
        } + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                signal,
                endpoint,
                failures = n,
                "OTLP export failing (logged at most once a minute): {err}"
            );
        }
    }
}

/// A metric exporter that counts its failures.
#[derive(Debug)]
pub struct CountingMetricExporter<E> {
    inner: E,
    errors: Arc<ExportErrors>,
    endpoint: String,
}

impl<E> CountingMetricExporter<E> {
    /// Wrap `inner`.
    pub fn new(inner: E, errors: Arc<ExportErrors>, endpoint: String) -> Self {
        Self {
            inner,
            errors,
            endpoint,
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for CountingMetricExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let r = self.inner.export(metrics).await;
        if let Err(e) = &r {
            self.errors.record("metrics", &self.endpoint, e);
        }
        r
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// A span exporter that counts its failures.
#[derive(Debug)]
pub struct CountingSpanExporter<E> {
    inner: E,
    errors: Arc<ExportErrors>,
    endpoint: String,
}

impl<E> CountingSpanExporter<E> {
    /// Wrap `inner`.
    pub fn new(inner: E, errors: Arc<ExportErrors>, endpoint: String) -> Self {
        Self {
            inner,
            errors,
            endpoint,
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingSpanExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let r = self.inner.export(batch).await;
        if let Err(e) = &r {
            self.errors.record("traces", &self.endpoint, e);
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}
