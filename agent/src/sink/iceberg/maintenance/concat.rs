//! Compaction by concatenation: when a partition's small files share one Parquet schema and
//! their row groups are already of a useful size, the output files are made of the inputs'
//! encoded column chunks, copied byte for byte (Parquet's column-chunk append), with a new
//! footer. Nothing is decoded, re-encoded or compressed again, so a compaction running beside
//! the stream costs it neither a core nor a second writer's memory: one column chunk is held
//! at a time (plus, on an object store, the upload part OpenDAL gathers). The Iceberg
//! statistics of an output are its inputs' counts summed and bounds read from the row groups
//! it holds ([`crate::sink::iceberg::footer`]), never guessed: an input's manifest bounds are
//! not trusted, because files written before the agent wrote exact row-group statistics may
//! carry bounds that exclude some of their rows (a compaction repairs them).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use iceberg::io::{FileIO, FileRead};
use iceberg::spec::{
    DataContentType, DataFile, DataFileBuilder, DataFileFormat, PartitionKey, Schema,
};
use iceberg::table::Table;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator, FileNameGenerator, LocationGenerator,
};
use parquet::arrow::async_reader::MetadataFetch;
use parquet::column::writer::ColumnCloseResult;
use parquet::errors::ParquetError;
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use super::MaintenanceError;
use crate::sink::iceberg::footer::{self, FooterStats};
use crate::sink::iceberg::upload::{Spool, Upload};

/// Row groups at least this large (on average over the inputs) are kept as they are: readers
/// handle them as well as re-encoded ones (DuckDB writes 122,880 rows per row group). Smaller
/// ones are worth merging into larger row groups, which only re-encoding can do.
pub(super) const MIN_COPIED_ROW_GROUP_ROWS: u64 = 50_000;

/// Footer bytes read at once (the footer and page indexes of a file written by the agent).
const FOOTER_PREFETCH: usize = 64 << 10;

fn read_err(path: &str, e: impl std::fmt::Display) -> MaintenanceError {
    MaintenanceError::Read(format!("{path}: {e}"))
}

fn write_err(path: &str, e: impl std::fmt::Display) -> MaintenanceError {
    MaintenanceError::Write(format!("{path}: {e}"))
}

/// Byte ranges of an input file, fetched through the table's `FileIO`.
struct Fetch<'a>(&'a dyn FileRead);

impl MetadataFetch for Fetch<'_> {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let reader = self.0;
        async move {
            reader
                .read(range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

/// An open input: its reader and its footer (with page indexes where it has them).
struct Input {
    reader: Box<dyn FileRead>,
    metadata: ParquetMetaData,
}

async fn open(io: &FileIO, file: &DataFile) -> Result<Input, MaintenanceError> {
    let path = file.file_path();
    let reader = io
        .new_input(path)
        .map_err(|e| read_err(path, e))?
        .reader()
        .await
        .map_err(|e| read_err(path, e))?;
    let metadata = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .with_prefetch_hint(Some(FOOTER_PREFETCH))
        .load_and_finish(Fetch(reader.as_ref()), file.file_size_in_bytes())
        .await
        .map_err(|e| read_err(path, e))?;
    Ok(Input { reader, metadata })
}

/// `file`'s Parquet footer.
pub(super) async fn footer(
    io: &FileIO,
    file: &DataFile,
) -> Result<ParquetMetaData, MaintenanceError> {
    Ok(open(io, file).await?.metadata)
}

/// Top-level columns a file stores without a dictionary (in its first row group): the
/// agent's writer chose plain for them (a changelog's source key, identifier fields, ...), and
/// a rewrite keeps that choice without knowing why it was made.
fn plain_in(md: &ParquetMetaData) -> Vec<String> {
    let Some(group) = md.row_groups().first() else {
        return Vec::new();
    };
    group
        .columns()
        .iter()
        .filter(|c| c.dictionary_page_offset().is_none())
        .filter_map(|c| match c.column_path().parts() {
            [name] => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// The Parquet layout every input shares: schema (with field ids) and key-value metadata
/// (the Arrow schema readers use to restore types).
#[derive(PartialEq)]
struct Layout {
    schema: Arc<Type>,
    key_values: Option<Vec<KeyValue>>,
    created_by: Option<String>,
}

fn layout(md: &ParquetMetaData) -> Layout {
    let fm = md.file_metadata();
    Layout {
        schema: fm.schema_descr().root_schema_ptr(),
        key_values: fm.key_value_metadata().cloned(),
        created_by: fm.created_by().map(str::to_string),
    }
}

/// What the inputs' footers say about a partition's compaction.
pub(super) struct Survey {
    /// The files can be concatenated: all Parquet, one layout, row groups of at least
    /// [`MIN_COPIED_ROW_GROUP_ROWS`] rows on average.
    pub concat: bool,
    /// The newest input's plain columns ([`plain_in`]): the encodings the stream's writer
    /// chooses today, which a re-encoding keeps.
    pub plain: Vec<String>,
}

/// Read each input's footer once (newest first, so that an early "no" still knows the newest
/// one's encodings) and keep none of them; only the newest one's when `concat_possible` is
/// false (deletes to apply need the rows decoded).
pub(super) async fn survey(
    table: &Table,
    files: &[DataFile],
    concat_possible: bool,
) -> Result<Survey, MaintenanceError> {
    let mut survey = Survey {
        concat: false,
        plain: Vec::new(),
    };
    let io = table.file_io();
    let mut first: Option<Layout> = None;
    let (mut rows, mut groups) = (0u64, 0u64);
    for (i, f) in files.iter().rev().enumerate() {
        if f.file_format() != DataFileFormat::Parquet {
            return Ok(survey);
        }
        let input = open(io, f).await?;
        let md = &input.metadata;
        if i == 0 {
            survey.plain = plain_in(md);
            if !concat_possible {
                return Ok(survey);
            }
        }
        if md.file_metadata().num_rows() as u64 != f.record_count() {
            return Ok(survey);
        }
        let l = layout(md);
        match &first {
            None => first = Some(l),
            Some(first) if *first != l => return Ok(survey),
            Some(_) => {}
        }
        rows += md
            .row_groups()
            .iter()
            .map(|rg| rg.num_rows() as u64)
            .sum::<u64>();
        groups += md.num_row_groups() as u64;
    }
    survey.concat = groups > 0 && rows / groups >= MIN_COPIED_ROW_GROUP_ROWS;
    Ok(survey)
}

/// One column chunk of an input, addressed by its offsets in that file.
struct Chunk {
    start: u64,
    bytes: Bytes,
}

impl Length for Chunk {
    fn len(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl Chunk {
    fn slice(&self, start: u64, len: Option<usize>) -> parquet::errors::Result<Bytes> {
        let from = start
            .checked_sub(self.start)
            .map(|v| v as usize)
            .filter(|v| *v <= self.bytes.len())
            .ok_or_else(|| ParquetError::General(format!("offset {start} outside the chunk")))?;
        let to = len.map_or(self.bytes.len(), |l| from + l);
        if to > self.bytes.len() {
            return Err(ParquetError::General(format!(
                "range {start}+{} outside the chunk",
                to - from
            )));
        }
        Ok(self.bytes.slice(from..to))
    }
}

impl ChunkReader for Chunk {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        Ok(self.slice(start, None)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, Some(length))
    }
}

/// An output file being assembled from whole input files.
struct Output {
    writer: SerializedFileWriter<Spool>,
    upload: Upload,
    inputs: Vec<DataFile>,
}

impl Output {
    async fn create(io: &FileIO, path: String, layout: &Layout) -> Result<Self, MaintenanceError> {
        let mut props =
            WriterProperties::builder().set_key_value_metadata(layout.key_values.clone());
        if let Some(by) = &layout.created_by {
            props = props.set_created_by(by.clone());
        }
        let spool = Spool::default();
        let writer = SerializedFileWriter::new(
            spool.clone(),
            layout.schema.clone(),
            Arc::new(props.build()),
        )
        .map_err(|e| write_err(&path, e))?;
        let upload = Upload::create(io, path.clone(), spool)
            .await
            .map_err(|e| write_err(&path, e))?;
        Ok(Self {
            writer,
            upload,
            inputs: Vec::new(),
        })
    }

    /// Copy every row group of `input`, one column chunk in memory at a time.
    async fn append(&mut self, file: &DataFile, input: &Input) -> Result<(), MaintenanceError> {
        let md = &input.metadata;
        let src = file.file_path();
        let path = self.upload.path.clone();
        for (g, rg) in md.row_groups().iter().enumerate() {
            let column_index = md.column_index().and_then(|c| c.get(g));
            let offset_index = md.offset_index().and_then(|o| o.get(g));
            let mut group = self
                .writer
                .next_row_group()
                .map_err(|e| write_err(&path, e))?;
            for (c, column) in rg.columns().iter().enumerate() {
                let start = column
                    .dictionary_page_offset()
                    .unwrap_or(column.data_page_offset());
                let start = u64::try_from(start).map_err(|e| read_err(src, e))?;
                let len = u64::try_from(column.compressed_size()).map_err(|e| read_err(src, e))?;
                let bytes = input
                    .reader
                    .read(start..start + len)
                    .await
                    .map_err(|e| read_err(src, e))?;
                let close = ColumnCloseResult {
                    bytes_written: len,
                    rows_written: rg.num_rows() as u64,
                    metadata: column.clone(),
                    // Not carried over (the agent writes none); without one a reader
                    // simply reads the row group.
                    bloom_filter: None,
                    column_index: column_index.and_then(|r| r.get(c)).cloned(),
                    offset_index: offset_index.and_then(|r| r.get(c)).cloned(),
                };
                group
                    .append_column(&Chunk { start, bytes }, close)
                    .map_err(|e| write_err(&path, e))?;
                self.upload.drain().await.map_err(|e| write_err(&path, e))?;
            }
            group.close().map_err(|e| write_err(&path, e))?;
        }
        self.inputs.push(file.clone());
        Ok(())
    }

    /// Write the footer, finish the upload and describe the file for Iceberg.
    async fn finish(
        mut self,
        schema: &Schema,
        partition: &iceberg::spec::Struct,
        spec_id: i32,
    ) -> Result<DataFile, MaintenanceError> {
        let path = self.upload.path.clone();
        let md = self.writer.close().map_err(|e| write_err(&path, e))?;
        self.upload.close().await.map_err(|e| write_err(&path, e))?;
        let footer = footer::read(schema, &md).map_err(|e| write_err(&path, e))?;
        data_file(
            &self.inputs,
            path,
            self.upload.size,
            footer,
            partition,
            spec_id,
        )
    }
}

/// Concatenate `files` (in order) into files of about `target` bytes (at most 1.5 × it, none
/// but the last under three quarters of it). Output files written
/// before a failure are deleted; on success none is committed yet.
pub(super) async fn concat(
    table: &Table,
    files: &[DataFile],
    target: u64,
) -> Result<Vec<DataFile>, MaintenanceError> {
    let mut created = Vec::new();
    let result = concat_into(table, files, target, &mut created).await;
    if result.is_err() {
        for p in created {
            let _ = table.file_io().delete(&p).await;
        }
    }
    result
}

async fn concat_into(
    table: &Table,
    files: &[DataFile],
    target: u64,
    created: &mut Vec<String>,
) -> Result<Vec<DataFile>, MaintenanceError> {
    let Some(first) = files.first() else {
        return Ok(Vec::new());
    };
    let md = table.metadata();
    let spec = md.default_partition_spec().clone();
    let spec_id = md.default_partition_spec_id();
    let partition = first.partition().clone();
    let schema = md.current_schema();
    let key = PartitionKey::new(spec.as_ref().clone(), schema.clone(), partition.clone());
    let location = DefaultLocationGenerator::new(md).map_err(|e| write_err("", e))?;
    let names = DefaultFileNameGenerator::new(
        uuid::Uuid::now_v7().to_string(),
        None,
        DataFileFormat::Parquet,
    );
    let io = table.file_io();
    let mut out: Vec<DataFile> = Vec::new();
    let mut open_output: Option<Output> = None;
    for f in files {
        let input = open(io, f).await?;
        // An open output already holds at least one input: it rolls over before this one
        // would take it past the target, unless it is still small itself (under three
        // quarters of the target): rolled then, it would be compacted again with the same
        // neighbours at every run (inputs of 0.4–0.75 of the target came out one per file,
        // as many as went in, for ever). Taking the input makes it at most 1.5 × the target.
        let full = open_output.as_ref().is_some_and(|o| {
            o.upload.size + f.file_size_in_bytes() > target
                && !super::compact::small(o.upload.size, target)
        });
        if full {
            if let Some(o) = open_output.take() {
                out.push(o.finish(schema, &partition, spec_id).await?);
            }
        }
        let o = match &mut open_output {
            Some(o) => o,
            None => {
                let path = location.generate_location(Some(&key), &names.generate_file_name());
                created.push(path.clone());
                let layout = layout(&input.metadata);
                open_output.insert(Output::create(io, path, &layout).await?)
            }
        };
        o.append(f, &input).await?;
    }
    if let Some(o) = open_output.take() {
        out.push(o.finish(schema, &partition, spec_id).await?);
    }
    Ok(out)
}

/// A count per column summed over `files`; a column some file has no count for gets none.
fn summed(files: &[DataFile], get: impl Fn(&DataFile) -> &HashMap<i32, u64>) -> HashMap<i32, u64> {
    let Some(first) = files.first() else {
        return HashMap::new();
    };
    get(first)
        .keys()
        .filter_map(|id| {
            files
                .iter()
                .map(|f| get(f).get(id).copied())
                .sum::<Option<u64>>()
                .map(|total| (*id, total))
        })
        .collect()
}

/// The Iceberg description of an output file made of `inputs`, whose own footer says
/// `footer`.
fn data_file(
    inputs: &[DataFile],
    path: String,
    size: u64,
    footer: FooterStats,
    partition: &iceberg::spec::Struct,
    spec_id: i32,
) -> Result<DataFile, MaintenanceError> {
    let mut b = DataFileBuilder::default();
    b.content(DataContentType::Data)
        .file_path(path.clone())
        .file_format(DataFileFormat::Parquet)
        .partition(partition.clone())
        .partition_spec_id(spec_id)
        .record_count(footer.rows)
        .file_size_in_bytes(size)
        .column_sizes(summed(inputs, DataFile::column_sizes))
        .value_counts(summed(inputs, DataFile::value_counts))
        .null_value_counts(summed(inputs, DataFile::null_value_counts))
        .nan_value_counts(summed(inputs, DataFile::nan_value_counts))
        .lower_bounds(footer.lower)
        .upper_bounds(footer.upper)
        .split_offsets(Some(footer.splits));
    let sort = inputs.first().and_then(DataFile::sort_order_id);
    if let Some(id) = sort.filter(|id| inputs.iter().all(|f| f.sort_order_id() == Some(*id))) {
        b.sort_order_id(id);
    }
    b.build().map_err(|e| write_err(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::iceberg::footer::testfile;

    fn file(
        values: &[(i32, u64)],
        nulls: &[(i32, u64)],
        lower: &[(i32, i64)],
        upper: &[(i32, i64)],
    ) -> DataFile {
        let mut b = DataFileBuilder::default();
        b.content(DataContentType::Data)
            .file_path("f".to_string())
            .file_format(DataFileFormat::Parquet)
            .record_count(10)
            .file_size_in_bytes(100)
            .value_counts(values.iter().copied().collect())
            .null_value_counts(nulls.iter().copied().collect())
            .lower_bounds(
                lower
                    .iter()
                    .map(|(k, v)| (*k, iceberg::spec::Datum::long(*v)))
                    .collect(),
            )
            .upper_bounds(
                upper
                    .iter()
                    .map(|(k, v)| (*k, iceberg::spec::Datum::long(*v)))
                    .collect(),
            );
        b.build().unwrap()
    }

    #[test]
    fn counts_are_summed_and_a_missing_one_is_unknown() {
        let a = file(&[(1, 10)], &[(1, 0)], &[(1, 5)], &[(1, 9)]);
        let b = file(&[(1, 10)], &[(1, 2)], &[(1, -3)], &[(1, 7)]);
        let files = [a.clone(), b];
        assert_eq!(summed(&files, DataFile::value_counts).get(&1), Some(&20));
        assert_eq!(
            summed(&files, DataFile::null_value_counts).get(&1),
            Some(&2)
        );
        let unknown = file(&[], &[], &[], &[]);
        assert!(summed(&[a, unknown], DataFile::value_counts).is_empty());
    }

    /// A table on the local file system, with `footer::testfile`'s schema.
    fn local_table(dir: &std::path::Path) -> Table {
        use iceberg::spec::{FormatVersion, PartitionSpec, SortOrder, TableMetadataBuilder};
        use iceberg_storage_opendal::OpenDalStorageFactory;
        let location = dir.display().to_string();
        let metadata = TableMetadataBuilder::new(
            footer::testfile::schema(),
            PartitionSpec::unpartition_spec(),
            SortOrder::unsorted_order(),
            location.clone(),
            FormatVersion::V2,
            HashMap::new(),
        )
        .unwrap()
        .build()
        .unwrap()
        .metadata;
        let io = iceberg::io::FileIOBuilder::new(Arc::new(OpenDalStorageFactory::Fs)).build();
        Table::builder()
            .metadata(metadata)
            .metadata_location(format!("{location}/metadata/v1.metadata.json"))
            .identifier(iceberg::TableIdent::from_strs(["ns", "t"]).unwrap())
            .file_io(io)
            .runtime(iceberg::Runtime::current())
            .build()
            .unwrap()
    }

    /// A file already in the table, described with the given `v` bounds (as a writer before
    /// the exact statistics described it: from its exact row groups only).
    async fn input(table: &Table, name: &str, bytes: bytes::Bytes, v: (&str, &str)) -> DataFile {
        let path = format!("{}/data/{name}.parquet", table.metadata().location());
        let out = table.file_io().new_output(&path).unwrap();
        let size = bytes.len() as u64;
        out.write(bytes).await.unwrap();
        let mut b = DataFileBuilder::default();
        b.content(DataContentType::Data)
            .file_path(path)
            .file_format(DataFileFormat::Parquet)
            .partition(iceberg::spec::Struct::empty())
            .record_count(4)
            .file_size_in_bytes(size)
            .value_counts(HashMap::from([(1, 4), (2, 4)]))
            .null_value_counts(HashMap::from([(1, 0), (2, 0)]))
            .lower_bounds(HashMap::from([(2, iceberg::spec::Datum::string(v.0))]))
            .upper_bounds(HashMap::from([(2, iceberg::spec::Datum::string(v.1))]));
        b.build().unwrap()
    }

    #[tokio::test]
    async fn a_concatenation_takes_its_bounds_from_the_rows_not_from_its_inputs_manifests() {
        use iceberg::spec::Datum;
        let dir = std::env::temp_dir().join(format!("philotes-concat-{}", uuid::Uuid::new_v4()));
        let table = local_table(&dir);
        let long: String = std::iter::repeat_n('a', 100).collect();
        // Written before the exact statistics: the long minimum of the first row group was
        // truncated (inexact) and left out, so the manifest says 'b'..'d' and hides 'aaa…'.
        let old = testfile::parquet(&[(1, &long), (2, "c"), (3, "b"), (4, "d")], 2, Some(64));
        let old = input(&table, "old", old, ("b", "d")).await;
        // Exact statistics, and a manifest bound that is too narrow all the same ('f').
        let new = testfile::parquet(&[(5, "e"), (6, "f"), (7, "e1"), (8, "g")], 2, None);
        let new = input(&table, "new", new, ("e", "f")).await;

        let out = concat(&table, &[old.clone(), new], 1 << 30).await.unwrap();
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(f.record_count(), 8);
        // The old file's inexact row group bounds `v` with its truncated value ('aaa…', cut
        // to 16 characters for the manifest), not the manifest's 'b'.
        assert_eq!(f.lower_bounds().get(&2), Some(&Datum::string(&long[..16])));
        assert_eq!(f.upper_bounds().get(&2), Some(&Datum::string("g")));
        assert_eq!(f.lower_bounds().get(&1), Some(&Datum::long(1)));
        assert_eq!(f.upper_bounds().get(&1), Some(&Datum::long(8)));
        assert_eq!(f.value_counts().get(&2), Some(&8));

        // Exact inputs alone: the bound is the rows' own ('A'), not the manifest's ('e').
        let new = testfile::parquet(&[(5, "e"), (6, "f"), (7, "A"), (8, "g")], 2, None);
        let a = input(&table, "a", new.clone(), ("e", "g")).await;
        let b = input(&table, "b", new, ("e", "g")).await;
        let out = concat(&table, &[a, b], 1 << 30).await.unwrap();
        assert_eq!(out[0].lower_bounds().get(&2), Some(&Datum::string("A")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chunk_reads_only_its_own_range() {
        let c = Chunk {
            start: 100,
            bytes: Bytes::from_static(b"abcdef"),
        };
        assert_eq!(c.get_bytes(102, 3).unwrap(), Bytes::from_static(b"cde"));
        assert!(c.get_bytes(99, 1).is_err());
        assert!(c.get_bytes(104, 3).is_err());
        assert_eq!(c.len(), 106);
    }
}
