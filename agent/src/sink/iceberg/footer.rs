//! Iceberg column statistics read from a Parquet file's footer, for the files the agent
//! assembles itself (a streamed transaction's early file, compaction's concatenation):
//! counts and sizes summed over the row groups, bounds from the row groups' minimums and
//! maximums, by the field id of each leaf column.
//!
//! A bound must hold every row of the file, so a column gets none when a row group has no
//! statistics (or only the deprecated ones in a signed order). A minimum or maximum Parquet marks inexact (parquet-rs truncated long strings
//! to 64 bytes and marked them so, until the agent turned truncation off) is still a bound by
//! the Parquet format's definition (a truncated minimum is a prefix, a truncated maximum is
//! rounded up), so it counts like an exact one. Leaving such row groups out, as iceberg-rust's
//! writer does, is what gave files bounds that excluded their own rows
//! (docs/reliability.md, "Statistics never hide a row").

use std::collections::HashMap;

use iceberg::spec::{Datum, PrimitiveType, Schema, Type};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::statistics::Statistics;

/// A value in a footer that does not convert to its column's Iceberg type.
#[derive(Debug, thiserror::Error)]
#[error("column statistics: {0}")]
pub struct FooterError(String);

fn ferr(e: impl std::fmt::Display) -> FooterError {
    FooterError(e.to_string())
}

/// What a footer says about a file, in Iceberg's terms.
#[derive(Debug, Default)]
pub struct FooterStats {
    /// Rows in the file.
    pub rows: u64,
    /// Where each row group starts (Iceberg's split offsets).
    pub splits: Vec<i64>,
    /// Compressed bytes per column.
    pub sizes: HashMap<i32, u64>,
    /// Values (nulls included) per column.
    pub values: HashMap<i32, u64>,
    /// Nulls per column.
    pub nulls: HashMap<i32, u64>,
    /// Lower bounds, truncated as [`super::bounds::truncate`] does.
    pub lower: HashMap<i32, Datum>,
    /// Upper bounds, truncated as [`super::bounds::truncate`] does.
    pub upper: HashMap<i32, Datum>,
}

/// Read the statistics of `meta`, typing each column by its field id in `schema` (a column
/// the schema no longer has gets counts but no bounds); bounds truncated for the manifests.
pub fn read(schema: &Schema, meta: &ParquetMetaData) -> Result<FooterStats, FooterError> {
    let mut s = read_whole(schema, meta)?;
    super::bounds::truncate(&mut s.lower, &mut s.upper);
    Ok(s)
}

/// [`read`] with the bounds as the footer holds them, not truncated.
pub fn read_whole(schema: &Schema, meta: &ParquetMetaData) -> Result<FooterStats, FooterError> {
    let mut s = FooterStats::default();
    // Columns some row group cannot vouch for: they end without a bound.
    let (mut no_min, mut no_max) = (Vec::new(), Vec::new());
    for rg in meta.row_groups() {
        s.rows += rg.num_rows() as u64;
        if let Some(c) = rg.columns().first() {
            s.splits
                .push(c.dictionary_page_offset().unwrap_or(c.data_page_offset()));
        }
        for c in rg.columns() {
            let info = c.column_descr().self_type().get_basic_info();
            if !info.has_id() {
                continue;
            }
            let id = info.id();
            *s.sizes.entry(id).or_insert(0) += c.compressed_size() as u64;
            *s.values.entry(id).or_insert(0) += c.num_values() as u64;
            let Some(stats) = c.statistics() else {
                no_min.push(id);
                no_max.push(id);
                continue;
            };
            if let Some(n) = stats.null_count_opt() {
                *s.nulls.entry(id).or_insert(0) += n;
            }
            let Some(Type::Primitive(ty)) = schema.field_by_id(id).map(|f| &*f.field_type) else {
                continue;
            };
            // Only the deprecated fields, in an order that is not the type's (an old writer's
            // signed byte order for strings): no bound can be taken from them.
            if stats.is_min_max_deprecated() && !stats.is_min_max_backwards_compatible() {
                no_min.push(id);
                no_max.push(id);
                continue;
            }
            if let Some(d) = bound(ty, stats, false)? {
                if !keep(&mut s.lower, id, d, std::cmp::Ordering::Less) {
                    no_min.push(id);
                }
            }
            if let Some(d) = bound(ty, stats, true)? {
                if !keep(&mut s.upper, id, d, std::cmp::Ordering::Greater) {
                    no_max.push(id);
                }
            }
        }
    }
    for id in no_min {
        s.lower.remove(&id);
    }
    for id in no_max {
        s.upper.remove(&id);
    }
    Ok(s)
}

/// Field ids of the columns with a minimum or maximum marked inexact in some row group: the
/// columns whose bounds iceberg-rust's writer may have built from the other row groups alone.
pub fn inexact_columns(meta: &ParquetMetaData) -> Vec<i32> {
    let mut ids: Vec<i32> = meta
        .row_groups()
        .iter()
        .flat_map(|rg| rg.columns())
        .filter(|c| {
            c.statistics()
                .is_some_and(|s| !s.min_is_exact() || !s.max_is_exact())
        })
        .filter_map(|c| {
            let info = c.column_descr().self_type().get_basic_info();
            info.has_id().then(|| info.id())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Keep `d` for `id` when it is further in direction `keep` than the bound held; false when
/// the two do not compare (the column must then get no bound: either could hide rows).
fn keep(bounds: &mut HashMap<i32, Datum>, id: i32, d: Datum, keep: std::cmp::Ordering) -> bool {
    match bounds.get(&id).map(|held| d.partial_cmp(held)) {
        None => {
            bounds.insert(id, d);
        }
        Some(Some(o)) if o == keep => {
            bounds.insert(id, d);
        }
        Some(Some(_)) => {}
        Some(None) => return false,
    }
    true
}

/// A column chunk's minimum (or maximum, `max`) as an Iceberg value of type `ty`; None when
/// the chunk has none (all nulls). A file written before a promotion (int to long, float to
/// double) is read as the promoted type. Types the agent does not write get no bound.
fn bound(ty: &PrimitiveType, s: &Statistics, max: bool) -> Result<Option<Datum>, FooterError> {
    macro_rules! pick {
        ($v:expr) => {
            match if max { $v.max_opt() } else { $v.min_opt() } {
                Some(v) => v,
                None => return Ok(None),
            }
        };
    }
    let bytes = |s: &Statistics| -> Option<Vec<u8>> {
        if max {
            s.max_bytes_opt().map(<[u8]>::to_vec)
        } else {
            s.min_bytes_opt().map(<[u8]>::to_vec)
        }
    };
    let d = match (ty, s) {
        (PrimitiveType::Boolean, Statistics::Boolean(v)) => Datum::bool(*pick!(v)),
        (PrimitiveType::Int, Statistics::Int32(v)) => Datum::int(*pick!(v)),
        (PrimitiveType::Date, Statistics::Int32(v)) => Datum::date(*pick!(v)),
        (PrimitiveType::Long, Statistics::Int64(v)) => Datum::long(*pick!(v)),
        (PrimitiveType::Long, Statistics::Int32(v)) => Datum::long(i64::from(*pick!(v))),
        (PrimitiveType::Time, Statistics::Int64(v)) => {
            Datum::time_micros(*pick!(v)).map_err(ferr)?
        }
        (PrimitiveType::Timestamp, Statistics::Int64(v)) => Datum::timestamp_micros(*pick!(v)),
        (PrimitiveType::Timestamptz, Statistics::Int64(v)) => Datum::timestamptz_micros(*pick!(v)),
        (PrimitiveType::Float, Statistics::Float(v)) => Datum::float(*pick!(v)),
        (PrimitiveType::Double, Statistics::Double(v)) => Datum::double(*pick!(v)),
        (PrimitiveType::Double, Statistics::Float(v)) => Datum::double(f64::from(*pick!(v))),
        (PrimitiveType::String, Statistics::ByteArray(v)) => {
            Datum::string(pick!(v).as_utf8().map_err(ferr)?)
        }
        (PrimitiveType::Binary, Statistics::ByteArray(_)) => match bytes(s) {
            Some(b) => Datum::binary(b),
            None => return Ok(None),
        },
        (PrimitiveType::Decimal { .. }, Statistics::Int32(v)) => {
            decimal(ty, &i128::from(*pick!(v)).to_be_bytes())?
        }
        (PrimitiveType::Decimal { .. }, Statistics::Int64(v)) => {
            decimal(ty, &i128::from(*pick!(v)).to_be_bytes())?
        }
        (
            PrimitiveType::Decimal { .. },
            Statistics::FixedLenByteArray(_) | Statistics::ByteArray(_),
        ) => match bytes(s) {
            Some(b) => decimal(ty, &b)?,
            None => return Ok(None),
        },
        (PrimitiveType::Uuid, Statistics::FixedLenByteArray(_)) => match bytes(s) {
            Some(b) => Datum::uuid(uuid::Uuid::from_slice(&b).map_err(ferr)?),
            None => return Ok(None),
        },
        (PrimitiveType::Fixed(_), Statistics::FixedLenByteArray(_)) => match bytes(s) {
            Some(b) => Datum::fixed(b),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(d))
}

/// A decimal bound from its unscaled value's big-endian two's-complement bytes (Iceberg's
/// single-value form, which Parquet's fixed-length decimals share).
fn decimal(ty: &PrimitiveType, be: &[u8]) -> Result<Datum, FooterError> {
    Datum::try_from_bytes(be, ty.clone()).map_err(ferr)
}

/// Parquet files shaped like the agent's, for tests of code that reads footers.
#[cfg(test)]
pub(crate) mod testfile {
    use std::collections::HashMap;
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema as ArrowSchema};
    use bytes::Bytes;
    use iceberg::spec::{NestedField, PrimitiveType, Schema, Type};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    /// The Iceberg schema of [`parquet`]'s files: `id` long (field 1), `v` string (field 2).
    pub fn schema() -> Schema {
        Schema::builder()
            .with_fields(vec![
                NestedField::required(1, "id", Type::Primitive(PrimitiveType::Long)).into(),
                NestedField::optional(2, "v", Type::Primitive(PrimitiveType::String)).into(),
            ])
            .build()
            .expect("a valid schema")
    }

    /// A Parquet file of `rows` in row groups of `group_rows`; `truncate` is the footer's
    /// statistics truncation (parquet-rs's default was `Some(64)`, the agent's is `None`).
    pub fn parquet(rows: &[(i64, &str)], group_rows: usize, truncate: Option<usize>) -> Bytes {
        let field = |name: &str, ty: DataType, id: i32, null: bool| {
            Field::new(name, ty, null).with_metadata(HashMap::from([(
                "PARQUET:field_id".to_string(),
                id.to_string(),
            )]))
        };
        let arrow = Arc::new(ArrowSchema::new(vec![
            field("id", DataType::Int64, 1, false),
            field("v", DataType::Utf8, 2, true),
        ]));
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group_rows))
            .set_statistics_truncate_length(truncate)
            .build();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, arrow.clone(), Some(props)).expect("writer");
        let batch = RecordBatch::try_new(
            arrow,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .expect("batch");
        w.write(&batch).expect("write");
        w.close().expect("close");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iceberg::spec::{NestedField, Schema};
    use parquet::file::metadata::ParquetMetaDataReader;

    fn footer(bytes: &bytes::Bytes) -> ParquetMetaData {
        ParquetMetaDataReader::new()
            .parse_and_finish(bytes)
            .expect("a footer")
    }

    fn long(c: char) -> String {
        std::iter::repeat_n(c, 100).collect()
    }

    #[test]
    fn bounds_cover_every_row_group_and_are_truncated() {
        let (a, z) = (long('a'), long('z'));
        let rows = [(5, "m"), (7, a.as_str()), (-3, z.as_str()), (9, "b")];
        let s = read(
            &testfile::schema(),
            &footer(&testfile::parquet(&rows, 2, None)),
        )
        .unwrap();
        assert_eq!(s.rows, 4);
        assert_eq!(s.splits.len(), 2);
        assert_eq!(s.lower[&1], Datum::long(-3));
        assert_eq!(s.upper[&1], Datum::long(9));
        assert_eq!(s.lower[&2], Datum::string(&a[..16]));
        let mut up = z[..15].to_string();
        up.push('{');
        assert_eq!(s.upper[&2], Datum::string(up));
        assert_eq!(s.values[&2], 4);
    }

    #[test]
    fn an_inexact_row_group_bounds_its_column_with_its_truncated_value() {
        // What parquet-rs wrote by default: the long minimum of the first row group is cut to
        // 64 bytes and marked inexact; the second's short values are exact. A bound from the
        // second alone ('b', iceberg-rust's writer) would exclude the first row group's 'aaa…';
        // the 64-byte prefix is a lower bound of it.
        let a = long('a');
        let rows = [(1, a.as_str()), (2, "c"), (3, "b"), (4, "d")];
        let meta = footer(&testfile::parquet(&rows, 2, Some(64)));
        assert_eq!(inexact_columns(&meta), vec![2]);
        let whole = read_whole(&testfile::schema(), &meta).unwrap();
        assert_eq!(whole.lower[&2], Datum::string(&a[..64]));
        let s = read(&testfile::schema(), &meta).unwrap();
        assert_eq!(s.lower[&2], Datum::string(&a[..16]));
        assert_eq!(s.upper[&2], Datum::string("d"));
        assert_eq!(s.lower[&1], Datum::long(1));
        // A long maximum is cut and rounded up: still above every value.
        let z = long('z');
        let rows = [(1, "a"), (2, z.as_str())];
        let meta = footer(&testfile::parquet(&rows, 2, Some(64)));
        let whole = read_whole(&testfile::schema(), &meta).unwrap();
        let up = match whole.upper[&2].literal() {
            iceberg::spec::PrimitiveLiteral::String(v) => v.clone(),
            other => panic!("{other:?}"),
        };
        assert!(up.as_str() > z.as_str(), "{up}");
        assert!(inexact_columns(&footer(&testfile::parquet(&rows, 2, None))).is_empty());
    }

    #[test]
    fn a_promoted_column_is_read_as_its_new_type() {
        let bytes = testfile::parquet(&[(1, "x")], 10, None);
        // The same file read after `v` was dropped and `id` kept: counts, no bound for `v`.
        let only_id = Schema::builder()
            .with_fields(vec![NestedField::required(
                1,
                "id",
                Type::Primitive(PrimitiveType::Long),
            )
            .into()])
            .build()
            .unwrap();
        let s = read(&only_id, &footer(&bytes)).unwrap();
        assert_eq!(s.lower.get(&1), Some(&Datum::long(1)));
        assert!(!s.lower.contains_key(&2));
        assert_eq!(s.values.get(&2), Some(&1));
        // An int column read as long (Iceberg's promotion).
        let stats = Statistics::int32(Some(-4), Some(8), None, Some(0), false);
        assert_eq!(
            bound(&PrimitiveType::Long, &stats, false).unwrap(),
            Some(Datum::long(-4))
        );
        let stats = Statistics::float(Some(1.5), Some(2.5), None, Some(0), false);
        assert_eq!(
            bound(&PrimitiveType::Double, &stats, true).unwrap(),
            Some(Datum::double(2.5))
        );
    }
}
