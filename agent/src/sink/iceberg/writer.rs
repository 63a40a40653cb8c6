//! A table's open data files, encoded and uploaded by a task of their own: decoding the next
//! rows overlaps with Parquet encoding, compression and the object-store upload of the last
//! ones, and one commit's rows land in few large files instead of one file per batch.

use arrow_array::RecordBatch;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::spec::DataFile;
use iceberg::spec::{DataFileFormat, PrimitiveType, Schema, Type};
use iceberg::table::Table;
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::schema::{CDC_LSN, CDC_SEQ, CDC_TS};
use super::SinkError;

/// Encoded bytes a row group may hold in memory before it is written out.
pub(super) const MAX_ROW_GROUP_BYTES: usize = 32 << 20;

/// Rows in a row group at most. A row group is held encoded in memory until it is written
/// out, so this bounds what a large copy or transaction holds at once: at 2^20 rows a 10M-row
/// copy peaked 5–7 MB higher than a 1M-row one, at 2^17 4–10 % higher, for 1 % larger files
/// (no dictionary on unique columns, so a row group's share of dictionary pages is small), and
/// about DuckDB's own row-group size (docs/performance.md, session 43).
pub(super) const MAX_ROW_GROUP_ROWS: usize = 1 << 17;

/// A column chunk falls back from dictionary to plain encoding once its dictionary holds
/// this much: a column with more distinct values than fit is not worth interning (every
/// value is hashed until the fallback), while a low-cardinality one (an enum, a status, a
/// commit time per transaction) keeps its dictionary. Parquet's default is 1 MiB.
const DICTIONARY_PAGE_BYTES: usize = 256 << 10;

/// The data page of a column written without a dictionary (see [`parquet_properties`]).
const PLAIN_PAGE_BYTES: usize = 256 << 10;

/// Past this many columns a table's pages and dictionaries share [`WIDE_BUFFER_BYTES`].
const WIDE_COLUMNS: usize = 32;

/// What the pages and dictionaries being filled of a wide table's columns may hold together.
const WIDE_BUFFER_BYTES: usize = 16 << 20;

/// The smallest data page (and dictionary) a wide table's column gets.
const MIN_PAGE_BYTES: usize = 16 << 10;

/// Open data files fed through a channel; `close` returns them once written.
pub(crate) struct OpenFiles {
    tx: Option<mpsc::Sender<RecordBatch>>,
    task: Option<JoinHandle<Result<Vec<DataFile>, SinkError>>>,
}

impl OpenFiles {
    /// Start a writer for `table`'s current schema and partition spec; `unique` names columns
    /// written without a dictionary (see [`parquet_properties`]).
    pub(super) fn open(table: &Table, unique: Arc<[String]>) -> Self {
        Self::open_sized(table, None, unique)
    }

    /// Like `open`, rolling over to a new file at `target_size` bytes (default: the crate's).
    pub(crate) fn open_sized(
        table: &Table,
        target_size: Option<usize>,
        unique: Arc<[String]>,
    ) -> Self {
        // One batch queued while one is encoded: memory stays bounded, decoding never waits
        // for a whole file.
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(write_files(table.clone(), rx, target_size, unique));
        Self {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Queue `batch`; waits while the writer is busy with the previous one.
    pub(crate) async fn send(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: its result says why.
        self.tx = None;
        match self.join().await {
            Err(e) => Err(e),
            Ok(_) => Err(SinkError::Write("the data file writer stopped".into())),
        }
    }

    /// Finish the files and return them (nothing is committed yet).
    pub(crate) async fn close(mut self) -> Result<Vec<DataFile>, SinkError> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> Result<Vec<DataFile>, SinkError> {
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| SinkError::Write(format!("data file writer task: {e}")))?,
            None => Err(SinkError::Write("the data file writer stopped".into())),
        }
    }
}

impl Drop for OpenFiles {
    fn drop(&mut self) {
        // Abandoned (a failed attempt): the files were never committed.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Columns whose values (nearly) never repeat within a file, or repeat in runs that zstd
/// takes as well: the commit position, time and sequence the agent adds to every row.
const PLAIN_CDC_COLUMNS: [&str; 3] = [CDC_LSN, CDC_SEQ, CDC_TS];

/// The Parquet settings of every file the agent writes for `schema`: zstd level 1, row groups
/// bounded in rows and in encoded bytes (a row group is held in memory until it is written
/// out), small dictionaries, and none for columns whose values are (nearly) unique: the
/// table's identifier fields, the columns in `unique` (a changelog's source key), floating
/// point columns and the `_cdc_lsn` / `_cdc_seq` / `_cdc_ts` columns.
pub(crate) fn parquet_properties(
    schema: &Schema,
    unique: &[String],
) -> Result<WriterProperties, SinkError> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).map_err(|e| SinkError::Write(e.to_string()))?,
        ))
        .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES))
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES)
        // Exact row-group statistics: a file's bounds are built from them, and a truncated
        // (inexact) one is left out of that, which made bounds exclude rows (`bounds.rs`).
        .set_statistics_truncate_length(None);
    // Every column buffers a data page and a dictionary of its own while the row group fills:
    // on a wide table (hundreds of columns) their defaults add up to hundreds of MiB.
    let columns = schema.as_struct().fields().len().max(1);
    let mut page = PLAIN_PAGE_BYTES;
    if columns > WIDE_COLUMNS {
        let share = (WIDE_BUFFER_BYTES / columns).max(MIN_PAGE_BYTES);
        page = page.min(share);
        props = props
            .set_data_page_size_limit(share)
            .set_dictionary_page_size_limit(share.min(DICTIONARY_PAGE_BYTES));
    }
    // A column whose values are unique within a file never keeps its dictionary: every value
    // is hashed and interned until the dictionary page overflows, then written plain after a
    // dictionary page that costs more than it saves (a 1M-row changelog: key column 1.62 →
    // 1.02 MB, a unique double 1.47 → 0.87 MB plain; docs/performance.md, session 34). The
    // CDC columns repeat in runs (one position and time per transaction, sequences from 0):
    // plain and zstd keep them within a few kB of the dictionary's size without hashing.
    let fields = schema.as_struct().fields();
    let floats = fields.iter().filter(|f| {
        matches!(
            *f.field_type,
            Type::Primitive(PrimitiveType::Float | PrimitiveType::Double)
        )
    });
    let plain = schema
        .identifier_field_ids()
        .filter_map(|id| schema.name_by_field_id(id))
        .chain(unique.iter().map(String::as_str))
        .chain(floats.map(|f| f.name.as_str()))
        .chain(PLAIN_CDC_COLUMNS)
        .filter(|name| schema.field_by_name(name).is_some());
    // A plain page is held uncompressed until full, and zstd sizes its context to the page:
    // at the default 1 MiB each such column held ~2 MiB more (peak RSS +10 MB with five).
    for name in plain {
        props = props
            .set_column_dictionary_enabled(ColumnPath::from(name), false)
            .set_column_data_page_size_limit(ColumnPath::from(name), page);
    }
    Ok(props.build())
}

async fn write_files(
    table: Table,
    mut rx: mpsc::Receiver<RecordBatch>,
    target_size: Option<usize>,
    unique: Arc<[String]>,
) -> Result<Vec<DataFile>, SinkError> {
    let werr = |e: iceberg::Error| SinkError::Write(e.to_string());
    let md = table.metadata();
    let schema = md.current_schema().clone();
    let spec = md.default_partition_spec().clone();
    let pq = ParquetWriterBuilder::new(parquet_properties(&schema, &unique)?, schema.clone());
    let location = DefaultLocationGenerator::new(md).map_err(werr)?;
    // A fresh UUID per writer keeps names unique across restarts and re-created tables.
    let names = DefaultFileNameGenerator::new(
        uuid::Uuid::now_v7().to_string(),
        None,
        DataFileFormat::Parquet,
    );
    let rolling = match target_size {
        Some(size) => {
            RollingFileWriterBuilder::new(pq, size, table.file_io().clone(), location, names)
        }
        None => RollingFileWriterBuilder::new_with_default_file_size(
            pq,
            table.file_io().clone(),
            location,
            names,
        ),
    };
    let builder = DataFileWriterBuilder::new(rolling);
    let short = |files: Vec<DataFile>| {
        files
            .into_iter()
            .map(|f| super::bounds::truncated_file(f, spec.spec_id()).map_err(SinkError::Write))
            .collect::<Result<Vec<_>, SinkError>>()
    };
    if spec.is_unpartitioned() {
        let mut w = builder.build(None).await.map_err(werr)?;
        while let Some(batch) = rx.recv().await {
            w.write(batch).await.map_err(werr)?;
        }
        return short(w.close().await.map_err(werr)?);
    }
    let splitter =
        RecordBatchPartitionSplitter::try_new_with_computed_values(schema.clone(), spec.clone())
            .map_err(werr)?;
    let mut fanout = FanoutWriter::new(builder);
    while let Some(batch) = rx.recv().await {
        // One partition (the usual case: one day of commits): take its key from the first row
        // and write the batch whole; otherwise split it row by row.
        let single = if super::partition::single_partition(&batch, &schema, &spec) {
            splitter
                .split(&batch.slice(0, 1))
                .map_err(werr)?
                .into_iter()
                .next()
                .map(|(key, _)| key)
        } else {
            None
        };
        match single {
            Some(key) => fanout.write(key, batch).await.map_err(werr)?,
            None => {
                for (key, part) in splitter.split(&batch).map_err(werr)? {
                    fanout.write(key, part).await.map_err(werr)?;
                }
            }
        }
    }
    short(fanout.close().await.map_err(werr)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::spec::{NestedField, PrimitiveType, Type};

    fn schema(columns: i32) -> Schema {
        Schema::builder()
            .with_fields((1..=columns).map(|i| {
                NestedField::optional(i, format!("c{i}"), Type::Primitive(PrimitiveType::String))
                    .into()
            }))
            .build()
            .unwrap()
    }

    /// Unique columns go without a dictionary, in small pages; the others keep theirs.
    #[test]
    fn unique_columns_are_written_plain() {
        let model: Vec<crate::model::Column> = [
            ("id", crate::model::ColumnKind::Int64, true),
            ("n", crate::model::ColumnKind::Int32, false),
            ("s", crate::model::ColumnKind::Text, false),
            ("d", crate::model::ColumnKind::Float64, false),
        ]
        .into_iter()
        .map(|(name, kind, key)| crate::model::Column {
            name: name.into(),
            kind,
            key,
        })
        .collect();
        let schema = crate::sink::iceberg::schema::changelog_schema(&model).unwrap();
        let props = parquet_properties(&schema, &["id".to_string()]).unwrap();
        let dict = |c: &str| props.dictionary_enabled(&ColumnPath::from(c));
        for c in ["id", "d", CDC_LSN, CDC_SEQ, CDC_TS] {
            assert!(!dict(c), "{c} has a dictionary");
            let page = props.column_data_page_size_limit(&ColumnPath::from(c));
            assert_eq!(page, PLAIN_PAGE_BYTES, "{c}");
        }
        for c in ["n", "s", crate::sink::iceberg::schema::CDC_OP] {
            assert!(dict(c), "{c} has no dictionary");
        }
        // Without the source key named, the key column keeps its dictionary.
        let props = parquet_properties(&schema, &[]).unwrap();
        assert!(props.dictionary_enabled(&ColumnPath::from("id")));
    }

    #[test]
    fn a_wide_tables_columns_share_a_bounded_page_budget() {
        let narrow = parquet_properties(&schema(30), &[]).unwrap();
        assert_eq!(narrow.dictionary_page_size_limit(), DICTIONARY_PAGE_BYTES);
        let default_page = WriterProperties::builder().build().data_page_size_limit();
        assert_eq!(narrow.data_page_size_limit(), default_page);
        let wide = parquet_properties(&schema(500), &[]).unwrap();
        assert_eq!(wide.data_page_size_limit(), WIDE_BUFFER_BYTES / 500);
        assert_eq!(wide.dictionary_page_size_limit(), WIDE_BUFFER_BYTES / 500);
        let widest = parquet_properties(&schema(1600), &[]).unwrap();
        assert_eq!(widest.data_page_size_limit(), MIN_PAGE_BYTES);
    }
}
