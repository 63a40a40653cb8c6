//! The mirror's files: data files whose path and row positions the index records, and
//! position delete files (`file_path`, `pos`, sorted), the delete kind every engine reads.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::spec::{
    DataContentType, DataFile, DataFileFormat, NestedField, PrimitiveType, Schema, Struct, Type,
};
use iceberg::table::Table;
use iceberg::writer::file_writer::{
    FileWriter, FileWriterBuilder, ParquetWriter, ParquetWriterBuilder,
};
use iceberg::writer::CurrentFileStatus;

use sync_wrapper::SyncWrapper;

use super::werr;
use crate::sink::iceberg::SinkError;

/// Field id of a position delete file's `file_path` (reserved by the Iceberg spec).
const FILE_PATH_ID: i32 = 2147483546;
/// Field id of a position delete file's `pos`.
const POS_ID: i32 = 2147483545;

/// A new file name under the table's data directory.
fn new_path(table: &Table, kind: &str) -> String {
    format!(
        "{}/data/{}-{kind}.parquet",
        table.metadata().location().trim_end_matches('/'),
        uuid::Uuid::now_v7()
    )
}

/// A data file being written, with the rows it holds so far (a new row's position).
pub struct DataWriter {
    // Parquet's encoders are `Send` but not `Sync`; the pipeline's futures hold shared
    // borrows of their tables across awaits, and this writer is only ever used mutably.
    writer: SyncWrapper<ParquetWriter>,
    path: String,
    rows: u64,
    bytes: u64,
    spec_id: i32,
}

impl DataWriter {
    /// Open a new data file in `table` (unpartitioned: the mirror has no partition spec).
    pub async fn open(table: &Table) -> Result<Self, SinkError> {
        let md = table.metadata();
        let path = new_path(table, "mirror");
        let out = table.file_io().new_output(&path).map_err(werr)?;
        let writer = ParquetWriterBuilder::new(
            crate::sink::iceberg::writer::parquet_properties(md.current_schema(), &[])?,
            md.current_schema().clone(),
        )
        .build(out)
        .await
        .map_err(werr)?;
        Ok(Self {
            writer: SyncWrapper::new(writer),
            path,
            rows: 0,
            bytes: 0,
            spec_id: md.default_partition_spec_id(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Rows written (the position the next row gets).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.bytes
    }

    /// Append `batch` (in the table's Arrow schema).
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let w = self.writer.get_mut();
        w.write(batch).await.map_err(werr)?;
        self.bytes = w.current_written_size() as u64;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Finish the file; `None` if it holds no row (then it is not kept).
    pub async fn close(self) -> Result<Option<DataFile>, SinkError> {
        let spec_id = self.spec_id;
        let builders = self.writer.into_inner().close().await.map_err(werr)?;
        let mut files = Vec::new();
        for mut b in builders {
            b.content(DataContentType::Data)
                .partition(Struct::empty())
                .partition_spec_id(spec_id);
            let f = b.build().map_err(werr)?;
            files.push(crate::sink::iceberg::bounds::truncated_file(f, spec_id).map_err(werr)?);
        }
        Ok(files.into_iter().next())
    }
}

/// The Iceberg schema of a position delete file.
fn delete_schema() -> Result<Schema, SinkError> {
    Schema::builder()
        .with_fields(vec![
            NestedField::required(
                FILE_PATH_ID,
                "file_path",
                Type::Primitive(PrimitiveType::String),
            )
            .into(),
            NestedField::required(POS_ID, "pos", Type::Primitive(PrimitiveType::Long)).into(),
        ])
        .build()
        .map_err(werr)
}

/// Rows per batch of a position delete file: the path repeats on every row in Arrow (Parquet
/// dictionary-encodes it), so a large flush's deletes are written a slice at a time.
const DELETE_BATCH_ROWS: usize = 65_536;

/// Call `each` with every entry (data file path, position) of position delete file `path`.
pub(super) async fn read_deletes(
    table: &Table,
    path: &str,
    mut each: impl FnMut(&str, u64),
) -> Result<(), SinkError> {
    super::read_columns(table, path, &[FILE_PATH_ID, POS_ID], |b| {
        let paths = b.column(0).as_string::<i32>();
        let positions = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            each(paths.value(i), positions.value(i) as u64);
        }
        Ok(())
    })
    .await
}

/// Write one position delete file for `deletes` (path, positions), sorted by path and position
/// as the spec requires. `None` when there is nothing to delete.
pub async fn write_deletes(
    table: &Table,
    mut deletes: Vec<(Arc<str>, Vec<u64>)>,
) -> Result<Option<DataFile>, SinkError> {
    deletes.retain(|(_, p)| !p.is_empty());
    if deletes.is_empty() {
        return Ok(None);
    }
    deletes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let schema = Arc::new(delete_schema()?);
    let arrow = Arc::new(schema_to_arrow_schema(&schema).map_err(werr)?);
    let path = new_path(table, "deletes");
    let out = table.file_io().new_output(&path).map_err(werr)?;
    let mut w = ParquetWriterBuilder::new(
        crate::sink::iceberg::writer::parquet_properties(&schema, &[])?,
        schema,
    )
    .build(out)
    .await
    .map_err(werr)?;
    for (file, mut positions) in deletes {
        positions.sort_unstable();
        positions.dedup();
        for chunk in positions.chunks(DELETE_BATCH_ROWS) {
            let paths: ArrayRef = Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                file.as_ref(),
                chunk.len(),
            )));
            let pos: ArrayRef = Arc::new(Int64Array::from_iter_values(
                chunk.iter().map(|p| *p as i64),
            ));
            let batch = RecordBatch::try_new(arrow.clone(), vec![paths, pos]).map_err(werr)?;
            w.write(&batch).await.map_err(werr)?;
        }
    }
    let spec_id = table.metadata().default_partition_spec_id();
    let mut files = Vec::new();
    for mut b in w.close().await.map_err(werr)? {
        b.content(DataContentType::PositionDeletes)
            .file_format(DataFileFormat::Parquet)
            .partition(Struct::empty())
            .partition_spec_id(spec_id);
        files.push(b.build().map_err(werr)?);
    }
    Ok(files.into_iter().next())
}
