//! Dead-letter rows: values that could not be converted, kept with their reason.

use std::sync::Arc;

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, SchemaRef};

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `schema.table` of the source.
    pub source_table: String,
    /// Commit LSN of the transaction.
    pub lsn: crate::model::Lsn,
    /// Position in the transaction.
    pub seq: u64,
    /// `I`, `U`, `D`.
    pub op: crate::model::Op,
    /// Why it could not be converted.
    pub error: String,
    /// The row as JSON text.
    pub row_json: String,
    /// When it was rejected (microseconds since the epoch).
    pub time_micros: i64,
}

/// Build a batch in the dead-letter table's column order.
pub fn to_batch(schema: SchemaRef, rows: &[DeadLetter]) -> Result<RecordBatch, ArrowError> {
    let mut table = StringBuilder::new();
    let mut lsn = Int64Builder::new();
    let mut seq = Int64Builder::new();
    let mut op = StringBuilder::new();
    let mut err = StringBuilder::new();
    let mut json = StringBuilder::new();
    let mut time = TimestampMicrosecondBuilder::new();
    for r in rows {
        table.append_value(&r.source_table);
        lsn.append_value(r.lsn.get() as i64);
        seq.append_value(r.seq as i64);
        op.append_value(r.op.code());
        err.append_value(&r.error);
        json.append_value(&r.row_json);
        time.append_value(r.time_micros);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(table.finish()),
        Arc::new(lsn.finish()),
        Arc::new(seq.finish()),
        Arc::new(op.finish()),
        Arc::new(err.finish()),
        Arc::new(json.finish()),
        Arc::new(time.finish().with_timezone("+00:00")),
    ];
    RecordBatch::try_new(schema, cols)
}
