//! Reading the dead-letter table back: the newest entries, for the API. Streams the table's
//! batches and keeps only the `limit` newest rows, so memory is bounded by the limit, not by
//! how many rows were ever dead-lettered.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use futures::TryStreamExt;
use iceberg::{Catalog, NamespaceIdent, TableIdent};
use serde_json::{json, Map, Value};

use super::schema::DLQ_TABLE;
use super::SinkError;
use crate::model::DeadLetter;

/// One entry, ordered by its `_cdc_lsn` (then by arrival, to keep the order total).
struct Entry {
    lsn: i64,
    n: u64,
    row: Map<String, Value>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.lsn, self.n) == (o.lsn, o.n)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.lsn, self.n).cmp(&(o.lsn, o.n))
    }
}

/// The `limit` newest rows of `<namespace>._philotes_dlq`, newest first; none when the table
/// does not exist yet.
pub async fn newest(
    catalog: &Arc<dyn Catalog>,
    namespace: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, SinkError> {
    let ident = TableIdent::new(
        NamespaceIdent::new(namespace.to_string()),
        DLQ_TABLE.to_string(),
    );
    let read = |e: iceberg::Error| SinkError::Catalog(format!("reading {ident}: {}", e.kind()));
    if !catalog.table_exists(&ident).await.map_err(read)? {
        return Ok(Vec::new());
    }
    let table = catalog.load_table(&ident).await.map_err(read)?;
    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let mut stream = table
        .scan()
        .build()
        .map_err(read)?
        .to_arrow()
        .await
        .map_err(read)?;
    // A min-heap of the newest `limit`: the oldest kept is dropped first.
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(limit + 1);
    let mut n = 0u64;
    while let Some(batch) = stream.try_next().await.map_err(read)? {
        for row in rows(&batch) {
            n += 1;
            let lsn = row.get("_cdc_lsn").and_then(Value::as_i64).unwrap_or(0);
            heap.push(Reverse(Entry { lsn, n, row }));
            if heap.len() > limit {
                heap.pop();
            }
        }
    }
    let mut out: Vec<Entry> = heap.into_iter().map(|Reverse(e)| e).collect();
    out.sort_by(|a, b| b.cmp(a));
    out.into_iter()
        .map(|e| {
            serde_json::from_value(Value::Object(e.row))
                .map_err(|err| SinkError::Catalog(format!("reading {ident}: a row: {err}")))
        })
        .collect()
}

/// Rows of a dead-letter batch as JSON objects.
fn rows(b: &RecordBatch) -> Vec<Map<String, Value>> {
    let schema = b.schema();
    let mut out = vec![Map::new(); b.num_rows()];
    for (f, col) in schema.fields().iter().zip(b.columns()) {
        for (i, row) in out.iter_mut().enumerate() {
            let v = if col.is_null(i) {
                Value::Null
            } else if let Some(a) = col.as_string_opt::<i32>() {
                Value::String(a.value(i).to_string())
            } else if let Some(a) = col.as_primitive_opt::<arrow_array::types::Int64Type>() {
                json!(a.value(i))
            } else if let Some(a) =
                col.as_primitive_opt::<arrow_array::types::TimestampMicrosecondType>()
            {
                chrono::DateTime::from_timestamp_micros(a.value(i))
                    .map(|t| Value::String(t.to_rfc3339()))
                    .unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            row.insert(f.name().clone(), v);
        }
    }
    out
}
