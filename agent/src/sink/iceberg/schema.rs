//! The changelog table schema: source columns mapped to Iceberg types, then the `_cdc_*` columns.

use iceberg::spec::{
    ListType, NestedField, NestedFieldRef, PrimitiveType, Schema, Transform, Type,
    UnboundPartitionSpec,
};

use crate::model::{Column, ColumnKind};
use arrow_array::{ArrayRef, Int64Array, TimestampMicrosecondArray};
use arrow_schema::{DataType, TimeUnit};
use std::collections::HashMap;
use std::sync::Arc;

/// `_cdc_op`: I, U, D, T or R.
pub const CDC_OP: &str = "_cdc_op";
/// `_cdc_lsn`: commit LSN of the source transaction.
pub const CDC_LSN: &str = "_cdc_lsn";
/// `_cdc_seq`: position of the change in its transaction.
pub const CDC_SEQ: &str = "_cdc_seq";
/// `_cdc_ts`: source commit time.
pub const CDC_TS: &str = "_cdc_ts";
/// `_cdc_unchanged`: columns whose unchanged TOAST value was not sent.
pub const CDC_UNCHANGED: &str = "_cdc_unchanged";
/// The five CDC columns, in table order.
pub const CDC_COLUMNS: [&str; 5] = [CDC_OP, CDC_LSN, CDC_SEQ, CDC_TS, CDC_UNCHANGED];

/// `n` rows of `value` in a column of type `t`: the commit position (`Int64`) or time
/// (`Timestamp(µs)`, with or without a zone) every row of a transaction shares. None for
/// another type.
pub fn constant_column(t: &DataType, value: i64, n: usize) -> Option<ArrayRef> {
    match t {
        DataType::Int64 => Some(Arc::new(Int64Array::from_value(value, n))),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => Some(Arc::new(
            TimestampMicrosecondArray::from_value(value, n).with_timezone_opt(tz.clone()),
        )),
        _ => None,
    }
}

/// Put before the name of a source column that has the name of a column the agent adds
/// (`_cdc_op` → `source__cdc_op`): an Iceberg schema cannot hold two fields of one name.
pub const RESERVED_PREFIX: &str = "source_";

/// The Iceberg field name of source column `name` when it differs from `name`.
pub fn field_name(name: &str) -> Option<String> {
    CDC_COLUMNS
        .contains(&name)
        .then(|| format!("{RESERVED_PREFIX}{name}"))
}

/// Table property: each source column's number by the Iceberg field holding it
/// (`field:number,…`, the numbers opaque here), which tells a renamed column from a dropped
/// one and a new one. The fields it lists are the ones that hold a source column now.
pub const SOURCE_COLUMNS_PROPERTY: &str = "philotes.source-columns";

/// [`SOURCE_COLUMNS_PROPERTY`]'s value → source column number by field id; an entry that
/// cannot be read is an error naming it.
pub fn parse_source_columns(v: &str) -> Result<HashMap<i32, i32>, String> {
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split_once(':')
                .and_then(|(f, a)| Some((f.trim().parse().ok()?, a.trim().parse().ok()?)))
                .ok_or_else(|| {
                    format!(
                        "table property {SOURCE_COLUMNS_PROPERTY} has an entry {p:?} that is not <field id>:<attnum>; fix the property"
                    )
                })
        })
        .collect()
}

/// Table property: each schema change's place in the source stream (`lsn:seq`, the change's
/// position in its transaction) with the id of the schema in force before it,
/// `lsn:seq:schema,…` in stream order. A replay after a crash meets a change's older
/// Relation messages again after the change committed: their rows are placed through the
/// schema they were first written with, not followed as a change. Entries older than what
/// the source confirmed are dropped at the next change, and expiry keeps the schemas listed.
pub const SCHEMA_BEFORE_PROPERTY: &str = "philotes.schema-before";

/// One [`SCHEMA_BEFORE_PROPERTY`] entry: a schema change at `(lsn, seq)` replaced `schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaBefore {
    /// The change's transaction (commit LSN).
    pub lsn: u64,
    /// The change's position in its transaction: changes streamed before it.
    pub seq: u64,
    /// The schema id in force before the change.
    pub schema: i32,
}

/// [`SCHEMA_BEFORE_PROPERTY`]'s value → its entries in stream order; an entry that cannot be
/// read is an error naming it.
pub fn parse_schema_before(v: &str) -> Result<Vec<SchemaBefore>, String> {
    let mut entries = v
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let mut parts = p.trim().splitn(3, ':');
            let mut next = || parts.next().map(str::trim);
            let read = (|| {
                Some(SchemaBefore {
                    lsn: next()?.parse().ok()?,
                    seq: next()?.parse().ok()?,
                    schema: next()?.parse().ok()?,
                })
            })();
            read.ok_or_else(|| {
                format!(
                    "table property {SCHEMA_BEFORE_PROPERTY} has an entry {p:?} that is not <lsn>:<seq>:<schema id>; fix or remove the property"
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_unstable_by_key(|e| (e.lsn, e.seq));
    Ok(entries)
}

/// The [`SCHEMA_BEFORE_PROPERTY`] value of `entries`.
pub fn format_schema_before(entries: &[SchemaBefore]) -> String {
    entries
        .iter()
        .map(|e| format!("{}:{}:{}", e.lsn, e.seq, e.schema))
        .collect::<Vec<_>>()
        .join(",")
}

/// Snapshot summary property holding the last source commit LSN in the table.
pub const LSN_PROPERTY: &str = "philotes.lsn";

/// Table (and summary) property naming the agent process that made the table's last data
/// commit: with [`LSN_PROPERTY`], what a commit is fenced on.
pub const WRITER_PROPERTY: &str = "philotes.writer";

/// The properties every data commit is fenced on (what the writer last saw must still hold).
pub const FENCED_PROPERTIES: [&str; 2] = [LSN_PROPERTY, WRITER_PROPERTY];

/// This process's writer id (a UUID drawn at first use): two agents never share one.
pub fn writer_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

/// Snapshot summary property marking a table whose initial snapshot is committed (`done`).
pub const SNAPSHOT_PROPERTY: &str = "philotes.snapshot";

/// `philotes.snapshot` of a table asked to be copied again: the next copy starts with a
/// truncate marker.
pub const SNAPSHOT_REQUESTED: &str = "requested";

/// Snapshot summary property with a partial initial snapshot's progress (JSON), next to
/// `philotes.snapshot = partial`.
pub const SNAPSHOT_PROGRESS_PROPERTY: &str = "philotes.snapshot.progress";

/// Name of the dead-letter table in each namespace.
pub const DLQ_TABLE: &str = "_philotes_dlq";

fn prim(p: PrimitiveType) -> Type {
    Type::Primitive(p)
}

/// The Iceberg type of a column kind; list element ids are taken from `next_id`.
pub fn iceberg_type(kind: &ColumnKind, next_id: &mut i32) -> Type {
    match kind {
        ColumnKind::Int32 => prim(PrimitiveType::Int),
        ColumnKind::Int64 => prim(PrimitiveType::Long),
        ColumnKind::Float32 => prim(PrimitiveType::Float),
        ColumnKind::Float64 => prim(PrimitiveType::Double),
        ColumnKind::Decimal { precision, scale } => prim(PrimitiveType::Decimal {
            precision: *precision as u32,
            scale: *scale as u32,
        }),
        ColumnKind::Bool => prim(PrimitiveType::Boolean),
        ColumnKind::Text => prim(PrimitiveType::String),
        ColumnKind::Bytea => prim(PrimitiveType::Binary),
        ColumnKind::Date => prim(PrimitiveType::Date),
        ColumnKind::Time => prim(PrimitiveType::Time),
        ColumnKind::Timestamp => prim(PrimitiveType::Timestamp),
        ColumnKind::TimestampTz => prim(PrimitiveType::Timestamptz),
        ColumnKind::Uuid => prim(PrimitiveType::Uuid),
        ColumnKind::List(elem) => {
            let id = *next_id;
            *next_id += 1;
            let t = iceberg_type(elem, next_id);
            Type::List(ListType::new(
                NestedField::list_element(id, t, false).into(),
            ))
        }
    }
}

/// The column kind that parses source text into values of Iceberg type `t`.
pub fn kind_of(t: &Type) -> Option<ColumnKind> {
    Some(match t {
        Type::Primitive(p) => match p {
            PrimitiveType::Int => ColumnKind::Int32,
            PrimitiveType::Long => ColumnKind::Int64,
            PrimitiveType::Float => ColumnKind::Float32,
            PrimitiveType::Double => ColumnKind::Float64,
            PrimitiveType::Decimal { precision, scale } if *precision <= 38 => {
                ColumnKind::Decimal {
                    precision: *precision as u8,
                    scale: *scale as u8,
                }
            }
            PrimitiveType::Boolean => ColumnKind::Bool,
            PrimitiveType::String => ColumnKind::Text,
            PrimitiveType::Binary => ColumnKind::Bytea,
            PrimitiveType::Date => ColumnKind::Date,
            PrimitiveType::Time => ColumnKind::Time,
            PrimitiveType::Timestamp => ColumnKind::Timestamp,
            PrimitiveType::Timestamptz => ColumnKind::TimestampTz,
            PrimitiveType::Uuid => ColumnKind::Uuid,
            _ => return None,
        },
        Type::List(l) => ColumnKind::List(Box::new(kind_of(&l.element_field.field_type)?)),
        _ => return None,
    })
}

/// Changelog schema for a source relation: its columns (all optional: deletes carry only the
/// key, unchanged TOAST values are null), then the CDC columns.
pub fn changelog_schema(columns: &[Column]) -> Result<Schema, iceberg::Error> {
    let top = columns.len() as i32 + CDC_COLUMNS.len() as i32;
    // Top-level ids 1..=top, nested ids after them: the order iceberg-rust assigns on create.
    let mut next_nested = top + 1;
    let mut fields: Vec<NestedFieldRef> = Vec::with_capacity(top as usize);
    for (i, c) in columns.iter().enumerate() {
        let t = iceberg_type(&c.kind, &mut next_nested);
        fields.push(NestedField::optional(i as i32 + 1, &c.name, t).into());
    }
    let base = columns.len() as i32;
    fields.extend(cdc_fields(base, &mut next_nested));
    Schema::builder().with_fields(fields).build()
}

fn cdc_fields(base: i32, next_nested: &mut i32) -> Vec<NestedFieldRef> {
    let list_id = *next_nested;
    *next_nested += 1;
    vec![
        NestedField::required(base + 1, CDC_OP, prim(PrimitiveType::String)).into(),
        NestedField::required(base + 2, CDC_LSN, prim(PrimitiveType::Long)).into(),
        NestedField::required(base + 3, CDC_SEQ, prim(PrimitiveType::Long)).into(),
        NestedField::required(base + 4, CDC_TS, prim(PrimitiveType::Timestamptz)).into(),
        NestedField::optional(
            base + 5,
            CDC_UNCHANGED,
            Type::List(ListType::new(
                NestedField::list_element(list_id, prim(PrimitiveType::String), true).into(),
            )),
        )
        .into(),
    ]
}

/// Suffix of the changelog table's name when a pipeline writes both (`mode = "both"`).
pub const CHANGELOG_SUFFIX: &str = "_changelog";

/// Table property marking a mirror table (`true`): maintenance does not rewrite its data
/// files, whose row positions the agent's key index holds.
pub const MIRROR_PROPERTY: &str = "philotes.mirror";

/// Mirror schema for a source relation: its columns (key columns required and the table's
/// identifier fields, others optional), then `_cdc_lsn` and `_cdc_ts` of each row's last
/// change.
pub fn mirror_schema(columns: &[Column]) -> Result<Schema, iceberg::Error> {
    let top = columns.len() as i32 + 2;
    let mut next_nested = top + 1;
    let mut fields: Vec<NestedFieldRef> = Vec::with_capacity(top as usize);
    let mut identifiers = Vec::new();
    for (i, c) in columns.iter().enumerate() {
        let id = i as i32 + 1;
        let t = iceberg_type(&c.kind, &mut next_nested);
        // Iceberg identifier fields are required primitives, never floating point.
        let identifier = c.key
            && !matches!(
                c.kind,
                ColumnKind::Float32 | ColumnKind::Float64 | ColumnKind::List(_)
            );
        if identifier {
            identifiers.push(id);
            fields.push(NestedField::required(id, &c.name, t).into());
        } else {
            fields.push(NestedField::optional(id, &c.name, t).into());
        }
    }
    let base = columns.len() as i32;
    fields.push(NestedField::required(base + 1, CDC_LSN, prim(PrimitiveType::Long)).into());
    fields.push(NestedField::required(base + 2, CDC_TS, prim(PrimitiveType::Timestamptz)).into());
    Schema::builder()
        .with_fields(fields)
        .with_identifier_field_ids(identifiers)
        .build()
}

/// The changelog-shaped schema of a mirror table: its columns plus the CDC columns it does
/// not store, which is what a batch for it is built in (the mirror folds it by key).
pub fn changelog_shape(mirror: &Schema) -> Result<Schema, iceberg::Error> {
    let mut next = mirror.highest_field_id() + 1;
    let mut fields: Vec<NestedFieldRef> = mirror
        .as_struct()
        .fields()
        .iter()
        .filter(|f| f.name != CDC_LSN && f.name != CDC_TS)
        // A `T` row has no values, not even in the key columns the mirror requires: it is
        // never written there (the mirror folds it), but the batch must hold it.
        .map(|f| {
            let mut f = f.as_ref().clone();
            f.required = false;
            Arc::new(f)
        })
        .collect();
    let base = next;
    next += 5;
    let cdc = cdc_fields(base - 1, &mut next);
    fields.extend(cdc);
    Schema::builder().with_fields(fields).build()
}

/// `day(_cdc_ts)` on a changelog schema.
pub fn changelog_partition(schema: &Schema) -> Result<UnboundPartitionSpec, iceberg::Error> {
    let ts = schema
        .field_by_name(CDC_TS)
        .ok_or_else(|| {
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "schema has no _cdc_ts")
        })?
        .id;
    Ok(UnboundPartitionSpec::builder()
        .add_partition_field(ts, format!("{CDC_TS}_day"), Transform::Day)?
        .build())
}

/// Dead-letter table schema.
pub fn dlq_schema() -> Result<Schema, iceberg::Error> {
    let s = |id, n| NestedField::optional(id, n, prim(PrimitiveType::String)).into();
    Schema::builder()
        .with_fields(vec![
            s(1, "source_table"),
            NestedField::required(2, CDC_LSN, prim(PrimitiveType::Long)).into(),
            NestedField::required(3, CDC_SEQ, prim(PrimitiveType::Long)).into(),
            s(4, CDC_OP),
            s(5, "error"),
            s(6, "row_json"),
            NestedField::required(7, "time", prim(PrimitiveType::Timestamptz)).into(),
        ])
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_before_entries_read_in_stream_order_and_a_malformed_one_is_an_error() {
        let e = parse_schema_before("30:2:5, 30:0:4,10:7:1").unwrap();
        let order: Vec<(u64, u64, i32)> = e.iter().map(|e| (e.lsn, e.seq, e.schema)).collect();
        assert_eq!(order, [(10, 7, 1), (30, 0, 4), (30, 2, 5)]);
        assert_eq!(format_schema_before(&e), "10:7:1,30:0:4,30:2:5");
        assert_eq!(parse_schema_before("").unwrap(), []);
        let err = parse_schema_before("10:7:1,30:x:4").unwrap_err();
        assert!(err.contains("\"30:x:4\""), "{err}");
        assert!(parse_schema_before("10:7").is_err());
    }
}
