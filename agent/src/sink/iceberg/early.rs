//! A large streamed transaction's rows for one changelog table, Parquet-encoded while the
//! transaction still streams. Every column but the commit position and time (which only the
//! commit tells, and which every row of the transaction shares) is encoded and compressed as
//! the rows arrive, on a core the walsender leaves idle; at the commit those two columns are
//! encoded as constants and the file is assembled from the chunks (docs/performance.md,
//! session 39). Without this, all of the transaction's encoding came after its commit.
//!
//! Only for a table whose partition follows the commit alone (`day(_cdc_ts)`, or none): the
//! whole transaction then lands in one partition, so one file takes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use iceberg::spec::{
    DataContentType, DataFile, DataFileBuilder, DataFileFormat, Datum, Literal, PartitionKey,
    PrimitiveType, Schema, Struct, Type,
};
use iceberg::table::Table;
use iceberg::transform::create_transform_function;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator, FileNameGenerator, LocationGenerator,
};
use parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory,
};
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::writer::SerializedFileWriter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::project::field_id;
use super::schema::{constant_column, CDC_LSN, CDC_TS};
use super::upload::{Spool, Upload};
use super::writer::{parquet_properties, MAX_ROW_GROUP_BYTES, MAX_ROW_GROUP_ROWS};
use super::SinkError;

fn werr(e: impl std::fmt::Display) -> SinkError {
    SinkError::Write(format!("early data file: {e}"))
}

/// Whether `table` keeps a whole transaction in one partition: every field of its partition
/// spec is taken from the commit position or time.
pub(super) fn follows_commit(table: &Table) -> bool {
    let md = table.metadata();
    let schema = md.current_schema();
    md.default_partition_spec().fields().iter().all(|f| {
        schema
            .field_by_id(f.source_id)
            .is_some_and(|s| s.name == CDC_TS || s.name == CDC_LSN)
    })
}

/// One table's rows of a streamed transaction, handed to an encoding task batch by batch.
pub struct EarlyFile {
    tx: Option<mpsc::UnboundedSender<RecordBatch>>,
    task: Option<JoinHandle<Result<Encoded, SinkError>>>,
    rows: u64,
    bytes: u64,
    held: Arc<Held>,
}

/// What the rows handed over hold in memory: batches queued for the encoder (Arrow bytes)
/// and what it has encoded so far.
#[derive(Default)]
struct Held {
    queued: AtomicU64,
    encoded: AtomicU64,
}

impl EarlyFile {
    /// Start encoding rows of `arrow` (the table's batch schema, with field ids) for `table`.
    pub(super) fn open(table: &Table, arrow: SchemaRef, unique: Arc<[String]>) -> Self {
        let schema = table.metadata().current_schema().clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<RecordBatch>();
        let id = table.identifier();
        let span = tracing::info_span!(
            "iceberg.encode_early",
            table = %format!("{}.{}", id.namespace().join("."), id.name()),
            rows = tracing::field::Empty,
        );
        let held = Arc::new(Held::default());
        let counts = held.clone();
        let task = tokio::spawn(
            async move {
                let mut enc = Encoder::start(&schema, arrow, &unique)?;
                let mut rows = 0;
                while let Some(batch) = rx.recv().await {
                    rows += batch.num_rows() as i64;
                    enc.write(&batch).map_err(werr)?;
                    let bytes = batch.get_array_memory_size() as u64;
                    drop(batch);
                    counts.queued.fetch_sub(bytes, Ordering::Relaxed);
                    counts.encoded.store(enc.held(), Ordering::Relaxed);
                }
                tracing::Span::current().record("rows", rows);
                enc.finish().map_err(werr)
            }
            .instrument(span),
        );
        Self {
            tx: Some(tx),
            task: Some(task),
            rows: 0,
            bytes: 0,
            held,
        }
    }

    /// Hand `batch` (commit position and time left blank) to the encoder. A stopped encoder
    /// takes nothing; why it stopped is told by the commit ([`Self::finish`]).
    pub fn send(&mut self, batch: RecordBatch) {
        let bytes = batch.get_array_memory_size() as u64;
        self.rows += batch.num_rows() as u64;
        self.bytes += bytes;
        if let Some(tx) = &self.tx {
            self.held.queued.fetch_add(bytes, Ordering::Relaxed);
            if tx.send(batch).is_err() {
                self.held.queued.fetch_sub(bytes, Ordering::Relaxed);
                self.tx = None;
            }
        }
    }

    /// Bytes the rows handed over hold now: Arrow batches waiting for the encoder, and the
    /// encoded column chunks (a fraction of the rows they came from).
    pub fn held(&self) -> u64 {
        self.held.queued.load(Ordering::Relaxed) + self.held.encoded.load(Ordering::Relaxed)
    }

    /// Bytes of the encoded column chunks alone (for rows whose batches are held elsewhere
    /// too, the queue shares their arrays).
    pub fn encoded(&self) -> u64 {
        self.held.encoded.load(Ordering::Relaxed)
    }

    /// Rows handed over.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Arrow bytes of the rows handed over (what they weighed in memory).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Stamp every row with commit position `lsn` and time `ts_micros`, write the file to
    /// `table`'s storage and describe it (not committed yet).
    pub(super) async fn finish(
        mut self,
        table: &Table,
        lsn: i64,
        ts_micros: i64,
    ) -> Result<DataFile, SinkError> {
        self.tx = None;
        let task = self
            .task
            .take()
            .ok_or_else(|| werr("the encoder stopped"))?;
        let enc = task.await.map_err(werr)??;
        let md = table.metadata();
        let schema = md.current_schema().clone();
        let spec = md.default_partition_spec().clone();
        let partition = partition_of(table, lsn, ts_micros)?;
        let key = PartitionKey::new((*spec).clone(), schema.clone(), partition.clone());
        let names = DefaultFileNameGenerator::new(
            uuid::Uuid::now_v7().to_string(),
            None,
            DataFileFormat::Parquet,
        );
        let location = DefaultLocationGenerator::new(md).map_err(werr)?;
        let path = location.generate_location(Some(&key), &names.generate_file_name());
        let Encoded {
            mut file,
            spool,
            groups,
            arrow,
            nans,
        } = enc;
        let mut upload = Upload::create(table.file_io(), path.clone(), spool)
            .await
            .map_err(werr)?;
        for group in groups {
            let mut chunks = group.chunks;
            for (leaf, field, mut w) in group.waiting {
                let f = arrow.field(field);
                let value = if f.name() == CDC_LSN { lsn } else { ts_micros };
                let array = constant_column(f.data_type(), value, group.rows)
                    .ok_or_else(|| werr(format!("{} is not a CDC column", f.name())))?;
                for l in compute_leaves(f, &array).map_err(werr)? {
                    w.write(&l).map_err(werr)?;
                }
                chunks[leaf] = Some(w.close().map_err(werr)?);
            }
            let mut rg = file.next_row_group().map_err(werr)?;
            for chunk in chunks {
                let chunk = chunk.ok_or_else(|| werr("a column chunk is missing"))?;
                chunk.append_to_row_group(&mut rg).map_err(werr)?;
            }
            rg.close().map_err(werr)?;
            upload.drain().await.map_err(werr)?;
        }
        let meta = file.close().map_err(werr)?;
        upload.close().await.map_err(werr)?;
        data_file(
            &schema,
            &meta,
            path,
            upload.size,
            partition,
            spec.spec_id(),
            nans,
        )
    }
}

impl Drop for EarlyFile {
    fn drop(&mut self) {
        // Abandoned (rolled back, replayed, or already in the table): nothing was uploaded.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The partition a transaction committed at `lsn` / `ts_micros` falls in.
fn partition_of(table: &Table, lsn: i64, ts_micros: i64) -> Result<Struct, SinkError> {
    let md = table.metadata();
    let schema = md.current_schema();
    let mut values = Vec::new();
    for f in md.default_partition_spec().fields() {
        let source = schema.field_by_id(f.source_id).ok_or_else(|| {
            werr(format!(
                "partition source {} not in the schema",
                f.source_id
            ))
        })?;
        let datum = match (&*source.field_type, source.name.as_str()) {
            (Type::Primitive(PrimitiveType::Long), CDC_LSN) => Datum::long(lsn),
            (Type::Primitive(PrimitiveType::Timestamptz), CDC_TS) => {
                Datum::timestamptz_micros(ts_micros)
            }
            (Type::Primitive(PrimitiveType::Timestamp), CDC_TS) => {
                Datum::timestamp_micros(ts_micros)
            }
            _ => return Err(werr(format!("partition source {} varies", source.name))),
        };
        let value = create_transform_function(&f.transform)
            .and_then(|t| t.transform_literal_result(&datum))
            .map_err(werr)?;
        values.push(Some(Literal::from(value)));
    }
    Ok(Struct::from_iter(values))
}

/// Rows per row group, as the agent's other data files have them.
fn group_rows_left(rows: usize) -> usize {
    MAX_ROW_GROUP_ROWS.saturating_sub(rows)
}

/// Column chunks of one row group, by leaf; the commit's columns (None) still to encode.
struct Group {
    rows: usize,
    chunks: Vec<Option<ArrowColumnChunk>>,
    /// The writers of the commit's columns: leaf, top-level field, writer.
    waiting: Vec<(usize, usize, ArrowColumnWriter)>,
}

/// What the encoding task hands to the commit.
struct Encoded {
    file: SerializedFileWriter<Spool>,
    spool: Spool,
    groups: Vec<Group>,
    arrow: SchemaRef,
    nans: HashMap<i32, u64>,
}

/// The encoding task's state.
struct Encoder {
    file: SerializedFileWriter<Spool>,
    spool: Spool,
    factory: ArrowRowGroupWriterFactory,
    arrow: SchemaRef,
    /// Top-level fields of the commit position and time.
    waiting: [usize; 2],
    /// Leaf (Parquet column) index of each top-level field's first leaf.
    first_leaf: Vec<usize>,
    open: Option<(Vec<ArrowColumnWriter>, usize)>,
    groups: Vec<Group>,
    /// Compressed bytes of the closed row groups' chunks.
    closed_bytes: u64,
    /// NaN values per float field id (top-level and list elements).
    nans: HashMap<i32, u64>,
}

impl Encoder {
    fn start(schema: &Schema, arrow: SchemaRef, unique: &[String]) -> Result<Self, SinkError> {
        let props = parquet_properties(schema, unique)?;
        let spool = Spool::default();
        let writer =
            ArrowWriter::try_new(spool.clone(), arrow.clone(), Some(props)).map_err(werr)?;
        let (file, factory) = writer.into_serialized_writer().map_err(werr)?;
        let pos = |name: &str| {
            arrow
                .index_of(name)
                .map_err(|_| werr(format!("no {name} column")))
        };
        let waiting = [pos(CDC_LSN)?, pos(CDC_TS)?];
        // Leaves come in field order; a top-level field's leaves are those whose path starts
        // with its name.
        let leaves = file.schema_descr().columns();
        let mut first_leaf = Vec::with_capacity(arrow.fields().len());
        let mut at = 0;
        for f in arrow.fields() {
            first_leaf.push(at);
            while leaves
                .get(at)
                .is_some_and(|c| c.path().parts().first() == Some(f.name()))
            {
                at += 1;
            }
        }
        if at != leaves.len() {
            return Err(werr("the Parquet columns do not follow the table's fields"));
        }
        Ok(Self {
            file,
            spool,
            factory,
            arrow,
            waiting,
            first_leaf,
            open: None,
            groups: Vec::new(),
            closed_bytes: 0,
            nans: HashMap::new(),
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetError> {
        self.count_nans(batch);
        let mut off = 0;
        while off < batch.num_rows() {
            let (mut writers, rows) = match self.open.take() {
                Some(open) => open,
                None => (self.factory.create_column_writers(self.groups.len())?, 0),
            };
            let take = group_rows_left(rows).min(batch.num_rows() - off);
            let part = batch.slice(off, take);
            for (i, f) in self.arrow.fields().iter().enumerate() {
                if self.waiting.contains(&i) {
                    continue;
                }
                let leaves = compute_leaves(f, part.column(i))?;
                for (leaf, l) in (self.first_leaf[i]..).zip(leaves) {
                    writers
                        .get_mut(leaf)
                        .ok_or_else(|| ParquetError::General(format!("no column {leaf}")))?
                        .write(&l)?;
                }
            }
            off += take;
            let rows = rows + take;
            let bytes: usize = writers.iter().map(|w| w.get_estimated_total_bytes()).sum();
            if rows >= MAX_ROW_GROUP_ROWS || bytes >= MAX_ROW_GROUP_BYTES {
                self.close_group(writers, rows)?;
            } else {
                self.open = Some((writers, rows));
            }
        }
        Ok(())
    }

    fn close_group(
        &mut self,
        writers: Vec<ArrowColumnWriter>,
        rows: usize,
    ) -> Result<(), ParquetError> {
        let mut chunks = Vec::with_capacity(writers.len());
        let mut waiting = Vec::new();
        for (leaf, w) in writers.into_iter().enumerate() {
            match self.waiting.iter().find(|&&i| self.first_leaf[i] == leaf) {
                Some(&field) => {
                    chunks.push(None);
                    waiting.push((leaf, field, w));
                }
                None => {
                    let chunk = w.close()?;
                    self.closed_bytes += chunk.close().bytes_written;
                    chunks.push(Some(chunk));
                }
            }
        }
        self.groups.push(Group {
            rows,
            chunks,
            waiting,
        });
        Ok(())
    }

    /// Bytes held: the closed row groups' chunks and the open one's writers.
    fn held(&self) -> u64 {
        let open = self.open.iter().flat_map(|(w, _)| w.iter());
        self.closed_bytes + open.map(|w| w.memory_size() as u64).sum::<u64>()
    }

    fn finish(mut self) -> Result<Encoded, ParquetError> {
        if let Some((writers, rows)) = self.open.take() {
            if rows > 0 {
                self.close_group(writers, rows)?;
            }
        }
        Ok(Encoded {
            file: self.file,
            spool: self.spool,
            groups: self.groups,
            arrow: self.arrow,
            nans: self.nans,
        })
    }

    /// Iceberg's NaN counts (Parquet's statistics leave NaN out of the bounds and count none).
    fn count_nans(&mut self, batch: &RecordBatch) {
        for (f, col) in self.arrow.fields().iter().zip(batch.columns()) {
            let (id, values) = match f.data_type() {
                DataType::Float32 | DataType::Float64 => (field_id(f), col.clone()),
                DataType::List(el)
                    if matches!(el.data_type(), DataType::Float32 | DataType::Float64) =>
                {
                    let l = col.as_list::<i32>();
                    let offsets = l.value_offsets();
                    let (start, end) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
                    (field_id(el), l.values().slice(start, end - start))
                }
                _ => continue,
            };
            let Some(id) = id else { continue };
            let n = match values.data_type() {
                DataType::Float32 => values
                    .as_primitive::<Float32Type>()
                    .iter()
                    .filter(|v| v.is_some_and(f32::is_nan))
                    .count(),
                _ => values
                    .as_primitive::<Float64Type>()
                    .iter()
                    .filter(|v| v.is_some_and(f64::is_nan))
                    .count(),
            };
            *self.nans.entry(id).or_insert(0) += n as u64;
        }
    }
}

/// The Iceberg description of a file the agent wrote, from its Parquet footer
/// ([`super::footer`]) and the NaNs counted while encoding.
fn data_file(
    schema: &Schema,
    meta: &ParquetMetaData,
    path: String,
    size: u64,
    partition: Struct,
    spec_id: i32,
    nans: HashMap<i32, u64>,
) -> Result<DataFile, SinkError> {
    let s = super::footer::read(schema, meta).map_err(werr)?;
    let mut b = DataFileBuilder::default();
    b.content(DataContentType::Data)
        .file_path(path)
        .file_format(DataFileFormat::Parquet)
        .partition(partition)
        .partition_spec_id(spec_id)
        .record_count(s.rows)
        .file_size_in_bytes(size)
        .column_sizes(s.sizes)
        .value_counts(s.values)
        .null_value_counts(s.nulls)
        .nan_value_counts(nans)
        .lower_bounds(s.lower)
        .upper_bounds(s.upper)
        .split_offsets(Some(s.splits));
    b.build().map_err(werr)
}
