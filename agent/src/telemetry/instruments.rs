//! Every instrument of the metric contract (DESIGN.md), created once from one `Meter`.
//!
//! Instrument names are OpenTelemetry names; the comment on each field gives the Prometheus name
//! that `opentelemetry-prometheus` derives from it. Hot-path handles are bound to their attribute
//! set once per source/table, so recording does not look up or allocate attributes.

use std::sync::Arc;

use opentelemetry::metrics::{
    BoundCounter, BoundGauge, BoundHistogram, Counter, Gauge, Histogram, Meter,
};
use opentelemetry::KeyValue;

/// Pipeline state values of `philotes_cdc_pipeline_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    /// Not running.
    Stopped = 0,
    /// Connecting and preparing.
    Starting = 1,
    /// Copying existing rows.
    Snapshotting = 2,
    /// Streaming changes.
    Streaming = 3,
    /// Paused by an operator.
    Paused = 4,
    /// The last attempt failed; the next one is scheduled (see the status's `retry`).
    Retrying = 5,
    /// Another agent leads this pipeline (`[ha]`); this one waits to take over.
    Standby = 6,
}

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Freshness spans the flush interval (sub-second to seconds) and a pipeline that fell behind
/// (minutes to an hour); finer around common flush intervals so that p50/p99 interpolate well.
const FRESHNESS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
const BYTES_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
];

/// All instruments. Cheap to clone (handles are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    /// `philotes_cdc_events_total{source,table,operation}`.
    pub(super) cdc_events: Counter<u64>,
    /// `philotes_cdc_lag_seconds{source,table}`.
    pub(super) cdc_lag: Gauge<f64>,
    /// `philotes_cdc_freshness_seconds{source,table}`.
    pub(super) cdc_freshness: Histogram<f64>,
    /// `philotes_cdc_last_commit_timestamp_seconds{source,table}`.
    pub(super) cdc_last_commit: Gauge<f64>,
    /// `philotes_cdc_errors_total{source,error_type}`.
    pub(super) cdc_errors: Counter<u64>,
    /// `philotes_cdc_schema_changes_total{source,table,kind}`.
    pub(super) schema_changes: Counter<u64>,
    /// `philotes_cdc_retries_total{source}`.
    pub(super) cdc_retries: Counter<u64>,
    /// `philotes_cdc_pipeline_state{source}`.
    pub(super) cdc_state: Gauge<i64>,
    /// `philotes_ha_takeovers_total{source}`.
    pub(super) ha_takeovers: Counter<u64>,
    /// `philotes_ha_leaders_deposed_total{source}`.
    pub(super) ha_deposed: Counter<u64>,
    /// `philotes_ha_fenced_commits_total{source,table}`.
    pub(super) ha_fenced: Counter<u64>,
    /// `philotes_cdc_slot_lag_bytes{source}`.
    pub(super) cdc_slot_lag: Gauge<i64>,
    /// `philotes_api_requests_total{endpoint,method,status}`.
    pub(super) api_requests: Counter<u64>,
    /// `philotes_api_request_duration_seconds{endpoint,method}`.
    pub(super) api_duration: Histogram<f64>,
    /// `philotes_api_request_size_bytes{endpoint,method}`.
    pub(super) api_request_size: Histogram<u64>,
    /// `philotes_api_response_size_bytes{endpoint,method}`.
    pub(super) api_response_size: Histogram<u64>,
    /// `philotes_iceberg_commits_total{source,table}`.
    pub(super) ice_commits: Counter<u64>,
    /// `philotes_iceberg_commit_duration_seconds{source,table}`.
    pub(super) ice_commit_duration: Histogram<f64>,
    /// `philotes_iceberg_files_written_total{source,table}`.
    pub(super) ice_files: Counter<u64>,
    /// `philotes_iceberg_bytes_written_total{source,table}` (no unit: "By" would double the suffix).
    pub(super) ice_bytes: Counter<u64>,
    /// `philotes_buffer_depth{source}`.
    pub(super) buf_depth: Gauge<i64>,
    /// `philotes_buffer_spool_bytes{source}`.
    pub(super) buf_spool: Gauge<i64>,
    /// `philotes_buffer_streamed_converted_bytes{source}`.
    pub(super) buf_converted: Gauge<i64>,
    /// `philotes_buffer_batches_total{source,status}`.
    pub(super) buf_batches: Counter<u64>,
    /// `philotes_buffer_events_processed_total{source}`.
    pub(super) buf_events: Counter<u64>,
    /// `philotes_buffer_dlq_total{source}`.
    pub(super) buf_dlq: Counter<u64>,
    /// `philotes_iceberg_table_data_files{source,table}`.
    pub(super) table_data_files: Gauge<u64>,
    /// `philotes_iceberg_table_snapshots{source,table}`.
    pub(super) table_snapshots: Gauge<u64>,
    /// `philotes_iceberg_table_metadata_bytes{source,table}`.
    pub(super) table_metadata: Gauge<u64>,
    /// `philotes_iceberg_maintenance_total{source,table,action,status}`.
    pub(super) maintenance: Counter<u64>,
    /// `philotes_iceberg_maintenance_duration_seconds{source,table,action}`.
    pub(super) maintenance_duration: Histogram<f64>,
    /// `philotes_iceberg_files_removed_total{source,table}`.
    pub(super) files_removed: Counter<u64>,
    /// `philotes_iceberg_compacted_bytes_total{source,table}`.
    pub(super) compacted_bytes: Counter<u64>,
    /// `philotes_iceberg_table_delete_files{source,table}`.
    pub(super) table_delete_files: Gauge<u64>,
    /// `philotes_iceberg_delete_files_written_total{source,table}`.
    pub(super) delete_files_written: Counter<u64>,
    /// `philotes_iceberg_rows_deleted_total{source,table}`.
    pub(super) rows_deleted: Counter<u64>,
    /// `philotes_mirror_index_keys{source,table}`.
    pub(super) index_keys: Gauge<u64>,
    /// `philotes_mirror_index_bytes{source,table}`.
    pub(super) index_bytes: Gauge<u64>,
}

impl Metrics {
    /// Create every instrument on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            cdc_events: meter
                .u64_counter("philotes.cdc.events")
                .with_description("Change events read from the source, by operation")
                .build(),
            cdc_lag: meter
                .f64_gauge("philotes.cdc.lag")
                .with_unit("s")
                .with_description("Seconds between the source commit and now, at the last event")
                .build(),
            cdc_freshness: meter
                .f64_histogram("philotes.cdc.freshness")
                .with_unit("s")
                .with_boundaries(FRESHNESS_BUCKETS.to_vec())
                .with_description(
                    "Per committed source transaction and table: seconds from its commit in \
                     PostgreSQL to the Iceberg commit that made it visible",
                )
                .build(),
            cdc_last_commit: meter
                .f64_gauge("philotes.cdc.last_commit_timestamp")
                .with_unit("s")
                .with_description("Unix time of the table's last Iceberg commit")
                .build(),
            cdc_errors: meter
                .u64_counter("philotes.cdc.errors")
                .with_description("Errors by type")
                .build(),
            schema_changes: meter
                .u64_counter("philotes.cdc.schema_changes")
                .with_description(
                    "Source schema changes followed in Iceberg: add, drop, rename, widen, \
                     replace, rename_table, key, partition",
                )
                .build(),
            cdc_retries: meter
                .u64_counter("philotes.cdc.retries")
                .with_description("Retries after transient errors")
                .build(),
            cdc_state: meter
                .i64_gauge("philotes.cdc.pipeline_state")
                .with_description(
                    "0 stopped, 1 starting, 2 snapshotting, 3 streaming, 4 paused, 5 retrying, \
                     6 standby",
                )
                .build(),
            ha_takeovers: meter
                .u64_counter("philotes.ha.takeovers")
                .with_description("Times this agent became the pipeline's leader ([ha])")
                .build(),
            ha_deposed: meter
                .u64_counter("philotes.ha.leaders_deposed")
                .with_description(
                    "Silent leaders this agent cut off (sessions terminated) to take over",
                )
                .build(),
            ha_fenced: meter
                .u64_counter("philotes.ha.fenced_commits")
                .with_description(
                    "Commits refused because another agent committed to the table first",
                )
                .build(),
            cdc_slot_lag: meter
                .i64_gauge("philotes.cdc.slot_lag")
                .with_unit("By")
                .with_description("WAL retained by the replication slot")
                .build(),
            api_requests: meter
                .u64_counter("philotes.api.requests")
                .with_description("API requests by route template, method and status")
                .build(),
            api_duration: meter
                .f64_histogram("philotes.api.request.duration")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .with_description("API request latency")
                .build(),
            api_request_size: meter
                .u64_histogram("philotes.api.request.size")
                .with_unit("By")
                .with_boundaries(BYTES_BUCKETS.to_vec())
                .with_description("API request body size")
                .build(),
            api_response_size: meter
                .u64_histogram("philotes.api.response.size")
                .with_unit("By")
                .with_boundaries(BYTES_BUCKETS.to_vec())
                .with_description("API response body size")
                .build(),
            ice_commits: meter
                .u64_counter("philotes.iceberg.commits")
                .with_description("Iceberg snapshots committed")
                .build(),
            ice_commit_duration: meter
                .f64_histogram("philotes.iceberg.commit.duration")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .with_description("Time to write the data files and commit one snapshot")
                .build(),
            ice_files: meter
                .u64_counter("philotes.iceberg.files_written")
                .with_description("Parquet data files written")
                .build(),
            ice_bytes: meter
                .u64_counter("philotes.iceberg.bytes_written")
                .with_description("Bytes of Parquet data files written")
                .build(),
            buf_depth: meter
                .i64_gauge("philotes.buffer.depth")
                .with_description("Change events buffered and not yet committed")
                .build(),
            buf_spool: meter
                .i64_gauge("philotes.buffer.spool")
                .with_description(
                    "Bytes of in-progress transactions streamed by the server, spooled locally",
                )
                .with_unit("By")
                .build(),
            buf_converted: meter
                .i64_gauge("philotes.buffer.streamed_converted")
                .with_description(
                    "Bytes of rows of in-progress transactions converted ahead of their commit",
                )
                .with_unit("By")
                .build(),
            buf_batches: meter
                .u64_counter("philotes.buffer.batches")
                .with_description("Flushes by outcome (committed, failed, retried)")
                .build(),
            buf_events: meter
                .u64_counter("philotes.buffer.events_processed")
                .with_description("Change events committed to Iceberg")
                .build(),
            buf_dlq: meter
                .u64_counter("philotes.buffer.dlq")
                .with_description("Rows sent to the dead-letter table")
                .build(),
            table_data_files: meter
                .u64_gauge("philotes.iceberg.table.data_files")
                .with_description("Data files in the table's current snapshot")
                .build(),
            table_snapshots: meter
                .u64_gauge("philotes.iceberg.table.snapshots")
                .with_description("Snapshots in the table's metadata")
                .build(),
            table_metadata: meter
                .u64_gauge("philotes.iceberg.table.metadata")
                .with_unit("By")
                .with_description("Size of the table's current metadata file")
                .build(),
            maintenance: meter
                .u64_counter("philotes.iceberg.maintenance")
                .with_description("Maintenance actions by action and outcome")
                .build(),
            maintenance_duration: meter
                .f64_histogram("philotes.iceberg.maintenance.duration")
                .with_unit("s")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .with_description("Time one maintenance action took")
                .build(),
            files_removed: meter
                .u64_counter("philotes.iceberg.files_removed")
                .with_description("Files deleted by maintenance and metadata clean-up")
                .build(),
            compacted_bytes: meter
                .u64_counter("philotes.iceberg.compacted_bytes")
                .with_description("Bytes of the files compaction wrote")
                .build(),
            table_delete_files: meter
                .u64_gauge("philotes.iceberg.table.delete_files")
                .with_description("Delete files in the table's current snapshot")
                .build(),
            delete_files_written: meter
                .u64_counter("philotes.iceberg.delete_files_written")
                .with_description("Position delete files written for mirror tables")
                .build(),
            rows_deleted: meter
                .u64_counter("philotes.iceberg.rows_deleted")
                .with_description(
                    "Rows of mirror tables deleted by position (replaced or deleted at the source)",
                )
                .build(),
            index_keys: meter
                .u64_gauge("philotes.mirror.index.keys")
                .with_description("Keys in a mirror table's key index")
                .build(),
            index_bytes: meter
                .u64_gauge("philotes.mirror.index")
                .with_unit("By")
                .with_description("Memory held by a mirror table's key index")
                .build(),
        }
    }

    /// Handles bound to one pipeline (`source` label).
    pub fn source(&self, source: &str) -> SourceMetrics {
        let s = KeyValue::new("source", source.to_string());
        let with = |k: &'static str, v: &'static str| [s.clone(), KeyValue::new(k, v)];
        SourceMetrics {
            name: Arc::from(source),
            metrics: self.clone(),
            retries: self.cdc_retries.bind(std::slice::from_ref(&s)),
            state: self.cdc_state.bind(std::slice::from_ref(&s)),
            takeovers: self.ha_takeovers.bind(std::slice::from_ref(&s)),
            deposed: self.ha_deposed.bind(std::slice::from_ref(&s)),
            slot_lag: self.cdc_slot_lag.bind(std::slice::from_ref(&s)),
            depth: self.buf_depth.bind(std::slice::from_ref(&s)),
            spool: self.buf_spool.bind(std::slice::from_ref(&s)),
            converted: self.buf_converted.bind(std::slice::from_ref(&s)),
            batches_committed: self.buf_batches.bind(&with("status", "committed")),
            batches_failed: self.buf_batches.bind(&with("status", "failed")),
            batches_retried: self.buf_batches.bind(&with("status", "retried")),
            events_processed: self.buf_events.bind(std::slice::from_ref(&s)),
            dlq: self.buf_dlq.bind(std::slice::from_ref(&s)),
        }
    }
}

/// Instruments bound to one source.
#[derive(Clone)]
pub struct SourceMetrics {
    pub(super) name: Arc<str>,
    pub(super) metrics: Metrics,
    /// `philotes_cdc_retries_total`.
    pub(super) retries: BoundCounter<u64>,
    pub(super) state: BoundGauge<i64>,
    /// `philotes_ha_takeovers_total`.
    pub(super) takeovers: BoundCounter<u64>,
    /// `philotes_ha_leaders_deposed_total`.
    pub(super) deposed: BoundCounter<u64>,
    /// `philotes_cdc_slot_lag_bytes`.
    pub(super) slot_lag: BoundGauge<i64>,
    /// `philotes_buffer_depth`.
    pub(super) depth: BoundGauge<i64>,
    /// `philotes_buffer_spool_bytes`.
    pub(super) spool: BoundGauge<i64>,
    /// `philotes_buffer_streamed_converted_bytes`.
    pub(super) converted: BoundGauge<i64>,
    /// `philotes_buffer_batches_total{status="committed"}`.
    pub(super) batches_committed: BoundCounter<u64>,
    /// `philotes_buffer_batches_total{status="failed"}`.
    pub(super) batches_failed: BoundCounter<u64>,
    /// `philotes_buffer_batches_total{status="retried"}`.
    pub(super) batches_retried: BoundCounter<u64>,
    /// `philotes_buffer_events_processed_total`.
    pub(super) events_processed: BoundCounter<u64>,
    /// `philotes_buffer_dlq_total`.
    pub(super) dlq: BoundCounter<u64>,
}

impl SourceMetrics {
    /// The instruments that are not bound to this source (maintenance, table health).
    pub fn global(&self) -> &Metrics {
        &self.metrics
    }

    /// Count an error; errors are rare, so the attribute set is built per call.
    pub(super) fn error(&self, error_type: super::events::ErrorType) {
        self.metrics.cdc_errors.add(
            1,
            &[
                KeyValue::new("source", self.name.to_string()),
                KeyValue::new("error_type", error_type.as_str()),
            ],
        );
    }

    /// Count a schema change of `table`; rare, so the attribute set is built per call.
    pub(super) fn schema_change(&self, table: &str, kind: &'static str) {
        self.metrics.schema_changes.add(
            1,
            &[
                KeyValue::new("source", self.name.to_string()),
                KeyValue::new("table", table.to_string()),
                KeyValue::new("kind", kind),
            ],
        );
    }

    /// Handles bound to one table of this source.
    pub fn table(&self, table: &str) -> TableMetrics {
        let base = [
            KeyValue::new("source", self.name.to_string()),
            KeyValue::new("table", table.to_string()),
        ];
        let op = |o: &'static str| {
            let mut a = base.to_vec();
            a.push(KeyValue::new("operation", o));
            self.metrics.cdc_events.bind(&a)
        };
        TableMetrics {
            insert: op("insert"),
            update: op("update"),
            delete: op("delete"),
            truncate: op("truncate"),
            snapshot: op("snapshot"),
            lag: self.metrics.cdc_lag.bind(&base),
            freshness: self.metrics.cdc_freshness.bind(&base),
            last_commit: self.metrics.cdc_last_commit.bind(&base),
            commits: self.metrics.ice_commits.bind(&base),
            commit_duration: self.metrics.ice_commit_duration.bind(&base),
            files: self.metrics.ice_files.bind(&base),
            bytes: self.metrics.ice_bytes.bind(&base),
            delete_files_written: self.metrics.delete_files_written.bind(&base),
            rows_deleted: self.metrics.rows_deleted.bind(&base),
            index_keys: self.metrics.index_keys.bind(&base),
            index_bytes: self.metrics.index_bytes.bind(&base),
        }
    }
}

/// Instruments bound to one table.
#[derive(Clone)]
pub struct TableMetrics {
    /// `philotes_cdc_events_total{operation="insert"}`.
    pub(super) insert: BoundCounter<u64>,
    /// `...{operation="update"}`.
    pub(super) update: BoundCounter<u64>,
    /// `...{operation="delete"}`.
    pub(super) delete: BoundCounter<u64>,
    /// `...{operation="truncate"}`.
    pub(super) truncate: BoundCounter<u64>,
    /// `...{operation="snapshot"}`.
    pub(super) snapshot: BoundCounter<u64>,
    /// `philotes_cdc_lag_seconds`.
    pub(super) lag: BoundGauge<f64>,
    /// `philotes_cdc_freshness_seconds`.
    pub(super) freshness: BoundHistogram<f64>,
    /// `philotes_cdc_last_commit_timestamp_seconds`.
    pub(super) last_commit: BoundGauge<f64>,
    /// `philotes_iceberg_commits_total`.
    pub(super) commits: BoundCounter<u64>,
    /// `philotes_iceberg_commit_duration_seconds`.
    pub(super) commit_duration: BoundHistogram<f64>,
    /// `philotes_iceberg_files_written_total`.
    pub(super) files: BoundCounter<u64>,
    /// `philotes_iceberg_bytes_written_total`.
    pub(super) bytes: BoundCounter<u64>,
    /// `philotes_iceberg_delete_files_written_total`.
    pub(super) delete_files_written: BoundCounter<u64>,
    /// `philotes_iceberg_rows_deleted_total`.
    pub(super) rows_deleted: BoundCounter<u64>,
    /// `philotes_mirror_index_keys`.
    pub(super) index_keys: BoundGauge<u64>,
    /// `philotes_mirror_index_bytes`.
    pub(super) index_bytes: BoundGauge<u64>,
}
