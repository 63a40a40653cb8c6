//! What table maintenance does: actions and health measurements.

use std::time::Duration;

use opentelemetry::KeyValue;

use crate::telemetry::Metrics;

/// One maintenance action on one table finished (or was planned, in a dry run).
#[derive(Debug)]
pub struct TableMaintained<'a> {
    /// Pipeline (`source` label).
    pub source: &'a str,
    /// Iceberg table (`namespace.table`).
    pub table: &'a str,
    /// `compact`, `expire`, `clean_metadata`, `remove_orphans`.
    pub action: &'static str,
    /// `ok`, `failed`, `conflict`.
    pub status: &'static str,
    /// Files deleted.
    pub files_removed: u64,
    /// Bytes of the files it wrote (compaction's rewritten data).
    pub bytes_written: u64,
    /// What it did, for the log.
    pub summary: &'a str,
    /// How long it took.
    pub duration: Duration,
}

impl TableMaintained<'_> {
    /// Log and record.
    pub fn emit(&self, m: &Metrics) {
        let base = [
            KeyValue::new("source", self.source.to_string()),
            KeyValue::new("table", self.table.to_string()),
        ];
        let mut with_action = base.to_vec();
        with_action.push(KeyValue::new("action", self.action));
        m.maintenance_duration
            .record(self.duration.as_secs_f64(), &with_action);
        let mut with_status = with_action.clone();
        with_status.push(KeyValue::new("status", self.status));
        m.maintenance.add(1, &with_status);
        if self.files_removed > 0 {
            m.files_removed.add(self.files_removed, &base);
        }
        if self.bytes_written > 0 {
            m.compacted_bytes.add(self.bytes_written, &base);
        }
        match self.status {
            "ok" => tracing::info!(
                source = self.source,
                table = self.table,
                action = self.action,
                files_removed = self.files_removed,
                duration_ms = self.duration.as_millis() as u64,
                "maintenance: {}",
                self.summary
            ),
            "conflict" => tracing::info!(
                source = self.source,
                table = self.table,
                action = self.action,
                "maintenance gave way to another commit, next run tries again: {}",
                self.summary
            ),
            _ => tracing::warn!(
                source = self.source,
                table = self.table,
                action = self.action,
                "maintenance failed: {}",
                self.summary
            ),
        }
    }
}

/// A table's health was measured.
#[derive(Debug)]
pub struct TableHealthMeasured<'a> {
    /// Pipeline (`source` label).
    pub source: &'a str,
    /// Iceberg table (`namespace.table`).
    pub table: &'a str,
    /// Data files in the current snapshot.
    pub data_files: u64,
    /// Delete files in the current snapshot.
    pub delete_files: u64,
    /// Snapshots in the metadata.
    pub snapshots: u64,
    /// Bytes of the current metadata file.
    pub metadata_bytes: u64,
}

impl TableHealthMeasured<'_> {
    /// Record the gauges.
    pub fn emit(&self, m: &Metrics) {
        let base = [
            KeyValue::new("source", self.source.to_string()),
            KeyValue::new("table", self.table.to_string()),
        ];
        m.table_data_files.record(self.data_files, &base);
        m.table_delete_files.record(self.delete_files, &base);
        m.table_snapshots.record(self.snapshots, &base);
        m.table_metadata.record(self.metadata_bytes, &base);
        tracing::debug!(
            source = self.source,
            table = self.table,
            data_files = self.data_files,
            snapshots = self.snapshots,
            metadata_bytes = self.metadata_bytes,
            "table health"
        );
    }
}
