//! Per-table Arrow batch builders: pgoutput tuple text goes straight into column builders.
//!
//! A row is converted in two phases: every column is parsed into a small stack value first,
//! and only when all succeed are they appended, so a bad value never leaves a half-written row
//! (the row goes to the dead-letter table instead).

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, FixedSizeBinaryBuilder, Float32Builder,
    Float64Builder, Int32Builder, Int64Builder, LargeBinaryBuilder, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{
    Array, ArrayRef, Int64Array, ListArray, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_buffer::{Buffer, NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Field, SchemaRef};

use crate::model::{Lsn, Op};
use crate::sink::iceberg::schema::{constant_column, kind_of, CDC_COLUMNS};
use crate::source::postgres::binary;
use crate::source::postgres::pgoutput::{Column, RelationColumn, TupleData};
use crate::source::postgres::types::{self as t, ColumnKind, ValueError};

/// The schema of a table cannot hold the relation as it is now.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A source column has no Iceberg column.
    #[error("source column {0:?} is not in the Iceberg table")]
    MissingColumn(String),
    /// An Iceberg column type has no converter.
    #[error("Iceberg column {0:?} has a type Philotes cannot write")]
    UnsupportedType(String),
    /// Arrow refused the batch.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
}

/// Microseconds between 1970-01-01 and 2000-01-01 (PostgreSQL's epoch).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A column value parsed and ready to append.
#[derive(Debug, Clone, Copy)]
enum Parsed<'a> {
    Null,
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Dec(i128),
    Bool(bool),
    Str(&'a str),
    Hex(&'a [u8]),
    Uuid([u8; 16]),
    List(&'a [u8]),
    /// An array in binary, checked, with its element type.
    BinList(&'a [u8], u32),
    /// bytea in binary: the bytes themselves.
    Bytes(&'a [u8]),
    /// An unconstrained numeric in binary, checked; rendered as text when appended.
    NumText(&'a [u8]),
}

fn parse<'a>(kind: &ColumnKind, raw: &'a [u8]) -> Result<Parsed<'a>, ValueError> {
    Ok(match kind {
        ColumnKind::Int32 => Parsed::I32(t::parse_i32(raw)?),
        ColumnKind::Int64 => Parsed::I64(t::parse_i64(raw)?),
        ColumnKind::Float32 => Parsed::F32(t::parse_f64(raw)? as f32),
        ColumnKind::Float64 => Parsed::F64(t::parse_f64(raw)?),
        ColumnKind::Decimal { precision, scale } => {
            Parsed::Dec(t::parse_decimal(raw, *precision, *scale)?)
        }
        ColumnKind::Bool => Parsed::Bool(t::parse_bool(raw)?),
        ColumnKind::Text => Parsed::Str(
            std::str::from_utf8(raw).map_err(|_| ValueError("text is not valid UTF-8".into()))?,
        ),
        ColumnKind::Bytea => {
            // Validate now; decode while appending (into a reused buffer).
            if !(raw.starts_with(b"\\x")
                && raw.len().is_multiple_of(2)
                && raw[2..].iter().all(u8::is_ascii_hexdigit))
            {
                return Err(ValueError("bytea is not in hex format".into()));
            }
            Parsed::Hex(raw)
        }
        ColumnKind::Date => Parsed::I32(t::parse_date(raw)?),
        ColumnKind::Time => Parsed::I64(t::parse_time(raw)?),
        ColumnKind::Timestamp => Parsed::I64(t::parse_timestamp(raw)?),
        ColumnKind::TimestampTz => Parsed::I64(t::parse_timestamptz(raw)?),
        ColumnKind::Uuid => Parsed::Uuid(t::parse_uuid(raw)?),
        ColumnKind::List(elem) => {
            t::parse_array(raw, |item| match item.bytes() {
                Some(b) => parse(elem, b).map(|_| ()),
                None => Ok(()),
            })?;
            Parsed::List(raw)
        }
    })
}

/// A binary value of source type `oid` as the value a builder of `kind` takes.
fn from_binary<'a>(oid: u32, kind: &ColumnKind, raw: &'a [u8]) -> Result<Parsed<'a>, ValueError> {
    use t::BinaryValue as B;
    let utf8 = |b: &'a [u8]| {
        std::str::from_utf8(b).map_err(|_| ValueError("text is not valid UTF-8".into()))
    };
    match (oid, kind) {
        (oid, ColumnKind::Text) if binary::is_text(oid) => return Ok(Parsed::Str(utf8(raw)?)),
        (3802, ColumnKind::Text) => {
            return match raw.split_first() {
                Some((1, json)) => Ok(Parsed::Str(utf8(json)?)),
                _ => Err(ValueError("jsonb in an unknown binary version".into())),
            }
        }
        (17, ColumnKind::Bytea) => return Ok(Parsed::Bytes(raw)),
        (2950, ColumnKind::Uuid) => {
            return raw
                .try_into()
                .map(Parsed::Uuid)
                .map_err(|_| ValueError("malformed binary uuid".into()))
        }
        (1700, ColumnKind::Decimal { precision, scale }) => {
            return Ok(Parsed::Dec(
                binary::parse_numeric(raw)?.to_decimal(*precision, *scale)?,
            ))
        }
        (1700, ColumnKind::Text) => {
            binary::parse_numeric(raw)?;
            return Ok(Parsed::NumText(raw));
        }
        (oid, ColumnKind::List(elem)) => {
            if let Some(e) = t::array_element(oid) {
                binary::parse_array(raw, e, |item| match item {
                    Some(b) => from_binary(e, elem, b).map(|_| ()),
                    None => Ok(()),
                })?;
                return Ok(Parsed::BinList(raw, e));
            }
        }
        _ => {}
    }
    Ok(match (t::parse_binary(oid, raw)?, kind) {
        (B::Int(v), ColumnKind::Int32) => {
            Parsed::I32(i32::try_from(v).map_err(|_| ValueError("integer out of range".into()))?)
        }
        (B::Int(v), ColumnKind::Int64) => Parsed::I64(v),
        (B::Float(v), ColumnKind::Float32) => Parsed::F32(v as f32),
        (B::Float(v), ColumnKind::Float64) => Parsed::F64(v),
        (B::Bool(v), ColumnKind::Bool) => Parsed::Bool(v),
        (B::Date(v), ColumnKind::Date) => Parsed::I32(v),
        (B::Micros(v), ColumnKind::Timestamp | ColumnKind::TimestampTz) => Parsed::I64(v),
        (B::Time(v), ColumnKind::Time) => Parsed::I64(v),
        (v, kind) => {
            return Err(ValueError(format!(
                "binary value {v:?} does not fit column kind {kind:?}"
            )))
        }
    })
}

/// How a column's binary values are read, decided once per relation: the common types skip
/// [`from_binary`]'s dispatch on type and kind per value (~70 instructions a value, session 34).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinaryRead {
    I64From8,
    I64From4,
    I64From2,
    I32From4,
    I32From2,
    F64From8,
    F32From4,
    Micros,
    Utf8,
    /// Through [`from_binary`].
    General,
}

impl BinaryRead {
    fn of(oid: u32, kind: &ColumnKind) -> Self {
        match (oid, kind) {
            (20, ColumnKind::Int64) => Self::I64From8,
            (23, ColumnKind::Int64) => Self::I64From4,
            (21, ColumnKind::Int64) => Self::I64From2,
            (23, ColumnKind::Int32) => Self::I32From4,
            (21, ColumnKind::Int32) => Self::I32From2,
            (701, ColumnKind::Float64) => Self::F64From8,
            (700, ColumnKind::Float32) => Self::F32From4,
            (1114 | 1184, ColumnKind::Timestamp | ColumnKind::TimestampTz) => Self::Micros,
            (oid, ColumnKind::Text) if binary::is_text(oid) => Self::Utf8,
            _ => Self::General,
        }
    }
}

/// A binary value of `slot`'s column; a value the fast paths do not take (a malformed one, an
/// infinite timestamp) goes through [`from_binary`], which names what is wrong with it.
fn read_binary<'a>(slot: &SourceSlot, raw: &'a [u8]) -> Result<Parsed<'a>, ValueError> {
    let fast = match slot.read {
        BinaryRead::I64From8 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::I64(i64::from_be_bytes(b))),
        BinaryRead::I64From4 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::I64(i32::from_be_bytes(b).into())),
        BinaryRead::I64From2 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::I64(i16::from_be_bytes(b).into())),
        BinaryRead::I32From4 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::I32(i32::from_be_bytes(b))),
        BinaryRead::I32From2 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::I32(i16::from_be_bytes(b).into())),
        BinaryRead::F64From8 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::F64(f64::from_be_bytes(b))),
        BinaryRead::F32From4 => raw
            .try_into()
            .ok()
            .map(|b| Parsed::F32(f32::from_be_bytes(b))),
        BinaryRead::Micros => raw
            .try_into()
            .ok()
            .and_then(|b| t::binary_micros(i64::from_be_bytes(b)))
            .map(Parsed::I64),
        BinaryRead::Utf8 => std::str::from_utf8(raw).ok().map(Parsed::Str),
        BinaryRead::General => None,
    };
    match fast {
        Some(p) => Ok(p),
        None => from_binary(slot.oid, &slot.kind, raw),
    }
}

/// Whether a binary value of type `oid` can feed a column of `kind` (see [`from_binary`]).
fn binary_fits(oid: u32, kind: &ColumnKind) -> bool {
    match (oid, kind) {
        (oid, ColumnKind::Text) if binary::is_text(oid) => true,
        (3802 | 1700, ColumnKind::Text) => true,
        (1700, ColumnKind::Decimal { .. }) => true,
        (17, ColumnKind::Bytea) | (2950, ColumnKind::Uuid) | (16, ColumnKind::Bool) => true,
        (20 | 21 | 23, ColumnKind::Int64) | (21 | 23, ColumnKind::Int32) => true,
        (700 | 701, ColumnKind::Float64) | (700, ColumnKind::Float32) => true,
        (1082, ColumnKind::Date) | (1083, ColumnKind::Time) => true,
        (1114 | 1184, ColumnKind::Timestamp | ColumnKind::TimestampTz) => true,
        (oid, ColumnKind::List(elem)) => {
            t::array_element(oid).is_some_and(|e| binary::supported(e) && binary_fits(e, elem))
        }
        _ => false,
    }
}

/// A snapshot value for the dead-letter table: text as is, binary decoded (hex if it cannot be).
fn snapshot_value_json(oid: u32, raw: &[u8], binary: bool) -> serde_json::Value {
    use t::BinaryValue as B;
    if !binary {
        return serde_json::Value::String(String::from_utf8_lossy(raw).into_owned());
    }
    if binary::is_text(oid) {
        return serde_json::Value::String(String::from_utf8_lossy(raw).into_owned());
    }
    if oid == 1700 {
        if let Ok(n) = binary::parse_numeric(raw) {
            let mut text = String::new();
            n.write_text(&mut text);
            return serde_json::Value::String(text);
        }
    }
    if let Some(e) = t::array_element(oid) {
        let mut items = Vec::new();
        let read = binary::parse_array(raw, e, |item| {
            items.push(item.map_or(serde_json::Value::Null, |b| snapshot_value_json(e, b, true)));
            Ok(())
        });
        if read.is_ok() {
            return serde_json::Value::Array(items);
        }
    }
    if let (3802, Some((1, json))) = (oid, raw.split_first()) {
        return serde_json::Value::String(String::from_utf8_lossy(json).into_owned());
    }
    let shown = match t::parse_binary(oid, raw) {
        Ok(B::Int(v)) => v.to_string(),
        Ok(B::Float(v)) => v.to_string(),
        Ok(B::Bool(v)) => v.to_string(),
        Ok(B::Date(v)) => format!("{v} days from 1970-01-01"),
        Ok(B::Micros(v)) => format!("{v} µs from 1970-01-01"),
        Ok(B::Time(v)) => format!("{v} µs from midnight"),
        Err(e) => format!(
            "\\x{} ({})",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            e.0
        ),
    };
    serde_json::Value::String(shown)
}

/// An Arrow builder for one column.
enum ColBuilder {
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Bin(LargeBinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Ts(TimestampMicrosecondBuilder),
    Uuid(FixedSizeBinaryBuilder),
    List {
        kind: ColumnKind,
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        inner: Box<ColBuilder>,
    },
}

impl ColBuilder {
    fn new(kind: &ColumnKind) -> Self {
        match kind {
            ColumnKind::Int32 => ColBuilder::I32(Int32Builder::new()),
            ColumnKind::Int64 => ColBuilder::I64(Int64Builder::new()),
            ColumnKind::Float32 => ColBuilder::F32(Float32Builder::new()),
            ColumnKind::Float64 => ColBuilder::F64(Float64Builder::new()),
            ColumnKind::Decimal { .. } => ColBuilder::Dec(Decimal128Builder::new()),
            ColumnKind::Bool => ColBuilder::Bool(BooleanBuilder::new()),
            ColumnKind::Text => ColBuilder::Str(StringBuilder::new()),
            ColumnKind::Bytea => ColBuilder::Bin(LargeBinaryBuilder::new()),
            ColumnKind::Date => ColBuilder::Date(Date32Builder::new()),
            ColumnKind::Time => ColBuilder::Time(Time64MicrosecondBuilder::new()),
            ColumnKind::Timestamp | ColumnKind::TimestampTz => {
                ColBuilder::Ts(TimestampMicrosecondBuilder::new())
            }
            ColumnKind::Uuid => ColBuilder::Uuid(FixedSizeBinaryBuilder::new(16)),
            ColumnKind::List(elem) => ColBuilder::List {
                kind: (**elem).clone(),
                offsets: vec![0],
                nulls: NullBufferBuilder::new(0),
                inner: Box::new(ColBuilder::new(elem)),
            },
        }
    }

    /// An empty builder of `kind` with room for `rows` values and, if variable-width, `data`
    /// bytes of them.
    fn with_capacity(kind: &ColumnKind, rows: usize, data: usize) -> Self {
        match kind {
            ColumnKind::Int32 => ColBuilder::I32(Int32Builder::with_capacity(rows)),
            ColumnKind::Int64 => ColBuilder::I64(Int64Builder::with_capacity(rows)),
            ColumnKind::Float32 => ColBuilder::F32(Float32Builder::with_capacity(rows)),
            ColumnKind::Float64 => ColBuilder::F64(Float64Builder::with_capacity(rows)),
            ColumnKind::Decimal { .. } => ColBuilder::Dec(Decimal128Builder::with_capacity(rows)),
            ColumnKind::Bool => ColBuilder::Bool(BooleanBuilder::with_capacity(rows)),
            ColumnKind::Text => ColBuilder::Str(StringBuilder::with_capacity(rows, data)),
            ColumnKind::Bytea => ColBuilder::Bin(LargeBinaryBuilder::with_capacity(rows, data)),
            ColumnKind::Date => ColBuilder::Date(Date32Builder::with_capacity(rows)),
            ColumnKind::Time => ColBuilder::Time(Time64MicrosecondBuilder::with_capacity(rows)),
            ColumnKind::Timestamp | ColumnKind::TimestampTz => {
                ColBuilder::Ts(TimestampMicrosecondBuilder::with_capacity(rows))
            }
            ColumnKind::Uuid => ColBuilder::Uuid(FixedSizeBinaryBuilder::with_capacity(rows, 16)),
            // A list's element count per row is unknown: it grows as before.
            ColumnKind::List(_) => ColBuilder::new(kind),
        }
    }

    /// Bytes of variable-width values held (0 for fixed-width builders).
    fn data_len(&self) -> usize {
        match self {
            ColBuilder::Str(b) => b.values_slice().len(),
            ColBuilder::Bin(b) => b.values_slice().len(),
            _ => 0,
        }
    }

    fn append_null(&mut self) {
        match self {
            ColBuilder::I32(b) => b.append_null(),
            ColBuilder::I64(b) => b.append_null(),
            ColBuilder::F32(b) => b.append_null(),
            ColBuilder::F64(b) => b.append_null(),
            ColBuilder::Dec(b) => b.append_null(),
            ColBuilder::Bool(b) => b.append_null(),
            ColBuilder::Str(b) => b.append_null(),
            ColBuilder::Bin(b) => b.append_null(),
            ColBuilder::Date(b) => b.append_null(),
            ColBuilder::Time(b) => b.append_null(),
            ColBuilder::Ts(b) => b.append_null(),
            ColBuilder::Uuid(b) => b.append_null(),
            ColBuilder::List { offsets, nulls, .. } => {
                let last = offsets.last().copied().unwrap_or(0);
                offsets.push(last);
                nulls.append_null();
            }
        }
    }

    /// Append a value that `parse` accepted for this builder's kind.
    fn append(&mut self, v: Parsed<'_>, scratch: &mut Vec<u8>) {
        match (self, v) {
            (b, Parsed::Null) => b.append_null(),
            (ColBuilder::I32(b), Parsed::I32(x)) => b.append_value(x),
            (ColBuilder::Date(b), Parsed::I32(x)) => b.append_value(x),
            (ColBuilder::I64(b), Parsed::I64(x)) => b.append_value(x),
            (ColBuilder::Time(b), Parsed::I64(x)) => b.append_value(x),
            (ColBuilder::Ts(b), Parsed::I64(x)) => b.append_value(x),
            (ColBuilder::F32(b), Parsed::F32(x)) => b.append_value(x),
            (ColBuilder::F64(b), Parsed::F64(x)) => b.append_value(x),
            (ColBuilder::Dec(b), Parsed::Dec(x)) => b.append_value(x),
            (ColBuilder::Bool(b), Parsed::Bool(x)) => b.append_value(x),
            (ColBuilder::Str(b), Parsed::Str(x)) => b.append_value(x),
            (ColBuilder::Str(b), Parsed::NumText(raw)) => match binary::parse_numeric(raw) {
                Ok(n) => {
                    let mut text = String::new();
                    n.write_text(&mut text);
                    b.append_value(&text);
                }
                // Checked in phase one.
                Err(_) => b.append_null(),
            },
            (ColBuilder::Bin(b), Parsed::Bytes(x)) => b.append_value(x),
            (ColBuilder::Bin(b), Parsed::Hex(x)) => {
                if t::parse_bytea(x, scratch).is_ok() {
                    b.append_value(&scratch[..]);
                } else {
                    b.append_null();
                }
            }
            (ColBuilder::Uuid(b), Parsed::Uuid(x)) => {
                if b.append_value(x).is_err() {
                    b.append_null();
                }
            }
            (
                ColBuilder::List {
                    kind,
                    offsets,
                    nulls,
                    inner,
                },
                list @ (Parsed::List(_) | Parsed::BinList(..)),
            ) => {
                // Elements were checked in phase one; one that fails now is null.
                let mut n = 0i32;
                let mut push = |v: Option<Result<Parsed<'_>, ValueError>>| {
                    match v {
                        Some(Ok(p)) => inner.append(p, scratch),
                        _ => inner.append_null(),
                    }
                    n += 1;
                    Ok(())
                };
                let _ = match list {
                    Parsed::BinList(raw, elem) => binary::parse_array(raw, elem, |item| {
                        push(item.map(|b| from_binary(elem, kind, b)))
                    }),
                    Parsed::List(raw) => {
                        t::parse_array(raw, |item| push(item.bytes().map(|b| parse(kind, b))))
                    }
                    _ => Ok(()),
                };
                let last = offsets.last().copied().unwrap_or(0);
                offsets.push(last + n);
                nulls.append_non_null();
            }
            // Parsed values always match the builder they were parsed for.
            (b, _) => b.append_null(),
        }
    }

    fn finish(&mut self, field: &Field) -> Result<ArrayRef, ArrowError> {
        let dt = field.data_type();
        Ok(match self {
            ColBuilder::I32(b) => Arc::new(b.finish()),
            ColBuilder::I64(b) => Arc::new(b.finish()),
            ColBuilder::F32(b) => Arc::new(b.finish()),
            ColBuilder::F64(b) => Arc::new(b.finish()),
            ColBuilder::Dec(b) => match dt {
                DataType::Decimal128(p, s) => {
                    Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
                }
                _ => Arc::new(b.finish()),
            },
            ColBuilder::Bool(b) => Arc::new(b.finish()),
            ColBuilder::Str(b) => Arc::new(b.finish()),
            ColBuilder::Bin(b) => Arc::new(b.finish()),
            ColBuilder::Date(b) => Arc::new(b.finish()),
            ColBuilder::Time(b) => Arc::new(b.finish()),
            ColBuilder::Ts(b) => match dt {
                DataType::Timestamp(_, Some(tz)) => Arc::new(b.finish().with_timezone(tz.clone())),
                _ => Arc::new(b.finish()),
            },
            ColBuilder::Uuid(b) => Arc::new(b.finish()),
            ColBuilder::List {
                offsets,
                nulls,
                inner,
                ..
            } => {
                let DataType::List(elem) = dt else {
                    return Err(ArrowError::SchemaError(format!(
                        "column {} is not a list",
                        field.name()
                    )));
                };
                let values = inner.finish(elem)?;
                let offs = std::mem::replace(offsets, vec![0]);
                let list = ListArray::try_new(
                    elem.clone(),
                    OffsetBuffer::new(ScalarBuffer::from(offs)),
                    values,
                    nulls.finish(),
                )?;
                Arc::new(list)
            }
        })
    }
}

/// Where a relation column goes.
#[derive(Debug, Clone)]
struct SourceSlot {
    name: String,
    field: usize,
    kind: ColumnKind,
    /// The type of the column's binary form (decides how a binary value is read).
    oid: u32,
    /// How a binary value of it is read (from `oid` and `kind`).
    read: BinaryRead,
    /// Read in binary by the initial snapshot (a fixed-width type whose Iceberg column has
    /// the type's natural kind).
    binary: bool,
}

/// The values of the CDC columns `_cdc_op` (its letter), `_cdc_lsn`, `_cdc_seq` and `_cdc_ts`.
#[derive(Debug, Default)]
struct CdcValues {
    ops: Vec<u8>,
    lsns: Vec<i64>,
    seqs: Vec<i64>,
    tss: Vec<i64>,
}

impl CdcValues {
    fn reserve(&mut self, rows: usize) {
        self.ops.reserve(rows);
        self.lsns.reserve(rows);
        self.seqs.reserve(rows);
        self.tss.reserve(rows);
    }
}

/// A finished batch and its rows that are updates which changed their key (ascending; see
/// [`TableBatch::mark_moved`]).
pub type Finished = (RecordBatch, Vec<u32>);

/// Buffered rows of one table, in the column order of its Iceberg schema.
pub struct TableBatch {
    schema: SchemaRef,
    cols: Vec<ColBuilder>,
    /// Each builder's kind (to start an empty copy).
    kinds: Vec<ColumnKind>,
    sources: Vec<SourceSlot>,
    /// Iceberg fields not fed by the relation (dropped source columns): null in every row.
    absent: Vec<usize>,
    cdc: [usize; 5],
    unchanged_names: StringBuilder,
    unchanged_offsets: Vec<i32>,
    /// The CDC columns' values, row by row: plain vectors become their arrays without a copy
    /// (a generic builder per value cost ~60 instructions a row each, session 34).
    cdc_values: CdcValues,
    rows: usize,
    bytes: usize,
    scratch: Vec<u8>,
    parsed: Vec<Parsed<'static>>,
    /// The last finished batch's rows and each column's variable-width bytes: the next batch's
    /// builders start at that size (taken at its first row, so an idle table holds nothing).
    room: Option<(usize, Vec<usize>)>,
    /// Rows that are updates which changed their key (see [`Self::mark_moved`]).
    moved: Vec<u32>,
}

impl TableBatch {
    /// Builders for `arrow_schema` (from the table's current Iceberg schema) fed by `relation`.
    ///
    /// `binary_oid` gives the type of a column's binary form (a domain's base type, text for an
    /// enum; the column's own type when the catalog does not say).
    pub fn new(
        iceberg_schema: &iceberg::spec::Schema,
        arrow_schema: SchemaRef,
        relation: &[RelationColumn],
        binary_oid: impl Fn(&RelationColumn) -> u32,
    ) -> Result<Self, BatchError> {
        let fields = iceberg_schema.as_struct().fields();
        let mut kinds = Vec::with_capacity(fields.len());
        for f in fields {
            let kind = if f.name == CDC_COLUMNS[4] {
                ColumnKind::Text
            } else {
                kind_of(&f.field_type).ok_or_else(|| BatchError::UnsupportedType(f.name.clone()))?
            };
            kinds.push(kind);
        }
        let pos = |name: &str| fields.iter().position(|f| f.name == name);
        let mut sources = Vec::with_capacity(relation.len());
        for c in relation {
            let field = pos(&c.name).ok_or_else(|| BatchError::MissingColumn(c.name.clone()))?;
            let kind = kind_of(&fields[field].field_type)
                .ok_or_else(|| BatchError::UnsupportedType(c.name.clone()))?;
            let binary = t::snapshot_binary(c.type_oid)
                && ColumnKind::from_oid(c.type_oid, c.type_modifier) == kind;
            let oid = binary_oid(c);
            sources.push(SourceSlot {
                name: c.name.clone(),
                field,
                read: BinaryRead::of(oid, &kind),
                kind,
                oid,
                binary,
            });
        }
        let mut cdc = [0usize; 5];
        for (i, name) in CDC_COLUMNS.iter().enumerate() {
            cdc[i] = pos(name).ok_or_else(|| BatchError::MissingColumn(name.to_string()))?;
        }
        let absent = (0..fields.len())
            .filter(|i| !cdc.contains(i) && !sources.iter().any(|s| s.field == *i))
            .collect();
        Ok(Self::with_layout(arrow_schema, kinds, sources, absent, cdc))
    }

    /// Empty builders of `kinds` fed by `sources`.
    fn with_layout(
        schema: SchemaRef,
        kinds: Vec<ColumnKind>,
        sources: Vec<SourceSlot>,
        absent: Vec<usize>,
        cdc: [usize; 5],
    ) -> Self {
        Self {
            schema,
            cols: kinds.iter().map(ColBuilder::new).collect(),
            kinds,
            sources,
            absent,
            cdc,
            unchanged_names: StringBuilder::new(),
            unchanged_offsets: vec![0],
            cdc_values: CdcValues::default(),
            rows: 0,
            bytes: 0,
            scratch: Vec::new(),
            parsed: Vec::new(),
            room: None,
            moved: Vec::new(),
        }
    }

    /// Builders sized for the rows `room` describes. Builders that start empty double their
    /// buffers from a few bytes on every batch; sized once, each batch makes one allocation of
    /// a similar size per buffer, which the allocator reuses instead of keeping every
    /// intermediate size in its arenas (a 10M-row copy's anonymous peak ~3 MB lower, session 20).
    fn presize(&mut self, rows: usize, data: &[usize]) {
        let unchanged = self.cdc[4];
        let cols = self.cols.iter_mut().zip(&self.kinds).zip(data).enumerate();
        for (i, ((b, kind), &bytes)) in cols {
            if i == unchanged {
                // A placeholder: that column is built from `unchanged_names`.
                continue;
            }
            // Powers of two: few distinct sizes, and room for a batch slightly larger.
            let bytes = if bytes == 0 {
                0
            } else {
                (bytes + bytes / 8).next_power_of_two()
            };
            *b = ColBuilder::with_capacity(kind, rows, bytes);
        }
        self.unchanged_offsets.reserve(rows);
        self.cdc_values.reserve(rows);
    }

    /// A row as JSON text (column name → value), for the dead-letter table: text as sent,
    /// binary values read as their column's binary form (a domain's as its base type's).
    pub fn row_json(&self, tuple: Option<&TupleData<'_>>) -> String {
        let mut m = serde_json::Map::new();
        if let Some(tuple) = tuple {
            for (s, v) in self.sources.iter().zip(tuple.columns()) {
                let j = match v {
                    Column::Null => serde_json::Value::Null,
                    Column::Unchanged => serde_json::Value::String("<unchanged toast>".into()),
                    Column::Text(b) => {
                        serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                    }
                    Column::Binary(b) => snapshot_value_json(s.oid, b, true),
                };
                m.insert(s.name.clone(), j);
            }
        }
        serde_json::Value::Object(m).to_string()
    }

    /// Empty builders for the same schema and relation (rows of another transaction).
    pub fn empty_like(&self) -> Self {
        Self::with_layout(
            self.schema.clone(),
            self.kinds.clone(),
            self.sources.clone(),
            self.absent.clone(),
            self.cdc,
        )
    }

    /// The Arrow schema its batches have.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// `batch` (finished by a builder of this layout) with every row's commit LSN and commit
    /// time set: rows of a transaction converted before its commit was known.
    pub fn stamp(
        &self,
        batch: &RecordBatch,
        lsn: Lsn,
        ts_micros: i64,
    ) -> Result<RecordBatch, BatchError> {
        let n = batch.num_rows();
        let mut cols = batch.columns().to_vec();
        let [_, lsn_i, _, ts_i, _] = self.cdc;
        for (i, v) in [(lsn_i, lsn.get() as i64), (ts_i, ts_micros)] {
            let f = self.schema.field(i);
            cols[i] = constant_column(f.data_type(), v, n)
                .ok_or_else(|| BatchError::UnsupportedType(f.name().clone()))?;
        }
        Ok(RecordBatch::try_new(batch.schema(), cols)?)
    }

    /// Rows buffered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Approximate bytes buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Append one change. `tuple` is None for a truncate marker. On error nothing is appended.
    pub fn push(
        &mut self,
        op: Op,
        lsn: Lsn,
        seq: u64,
        ts_micros: i64,
        tuple: Option<&TupleData<'_>>,
    ) -> Result<(), ValueError> {
        self.push_columns(
            op,
            lsn,
            seq,
            ts_micros,
            tuple.map(|t| (t.len(), t.columns())),
        )
    }

    /// [`Self::push`] of `new` with the values it did not send (unchanged TOAST) taken from
    /// `old` (the whole old row, sent with REPLICA IDENTITY FULL).
    pub fn push_merged(
        &mut self,
        op: Op,
        lsn: Lsn,
        seq: u64,
        ts_micros: i64,
        new: &TupleData<'_>,
        old: &TupleData<'_>,
    ) -> Result<(), ValueError> {
        if old.len() != new.len() {
            return self.push(op, lsn, seq, ts_micros, Some(new));
        }
        let merged = new.columns().zip(old.columns()).map(|(n, o)| match (n, o) {
            (Column::Unchanged, Column::Text(_) | Column::Binary(_)) => o,
            _ => n,
        });
        self.push_columns(op, lsn, seq, ts_micros, Some((new.len(), merged)))
    }

    /// Whether every column can be read from its binary form (a stream with `binary 'true'`
    /// sends every value so).
    pub fn binary_ready(&self) -> bool {
        self.sources
            .iter()
            .all(|s| binary::supported(s.oid) && binary_fits(s.oid, &s.kind))
    }

    /// Which relation columns the initial snapshot reads in binary (see `push_snapshot`).
    pub fn snapshot_binary(&self) -> Vec<bool> {
        self.sources.iter().map(|s| s.binary).collect()
    }

    /// Append one row as a snapshot reads it: values (None = NULL) in binary where
    /// `snapshot_binary` says so, text otherwise.
    pub fn push_snapshot<'a>(
        &mut self,
        op: Op,
        lsn: Lsn,
        seq: u64,
        ts_micros: i64,
        values: impl ExactSizeIterator<Item = Option<&'a [u8]>> + Clone,
        binary: &[bool],
    ) -> Result<(), ValueError> {
        let n = values.len();
        let cols = values.zip(binary).map(|(v, &bin)| match v {
            None => Column::Null,
            Some(b) if bin => Column::Binary(b),
            Some(b) => Column::Text(b),
        });
        self.push_columns(op, lsn, seq, ts_micros, Some((n, cols)))
    }

    /// `push` over any column iterator (`n` columns).
    fn push_columns<'a, I>(
        &mut self,
        op: Op,
        lsn: Lsn,
        seq: u64,
        ts_micros: i64,
        tuple: Option<(usize, I)>,
    ) -> Result<(), ValueError>
    where
        I: Iterator<Item = Column<'a>> + Clone,
    {
        if self.rows == 0 {
            if let Some((rows, data)) = self.room.take() {
                self.presize(rows, &data);
            }
        }
        // Reuse the parse buffer's allocation across rows (same layout, any lifetime).
        let mut parsed: Vec<Parsed<'_>> = std::mem::take(&mut self.parsed)
            .into_iter()
            .map(|_| Parsed::Null)
            .collect();
        parsed.clear();
        let mut unchanged = 0usize;
        if let Some((n, cols)) = &tuple {
            if *n != self.sources.len() {
                return Err(ValueError(format!(
                    "tuple has {} columns, relation has {}",
                    n,
                    self.sources.len()
                )));
            }
            for (col, slot) in cols.clone().zip(&self.sources) {
                parsed.push(match col {
                    Column::Null => Parsed::Null,
                    Column::Unchanged => {
                        unchanged += 1;
                        Parsed::Null
                    }
                    Column::Text(raw) => parse(&slot.kind, raw)
                        .map_err(|e| ValueError(format!("column {:?}: {}", slot.name, e.0)))?,
                    Column::Binary(raw) => read_binary(slot, raw)
                        .map_err(|e| ValueError(format!("column {:?}: {}", slot.name, e.0)))?,
                });
            }
        }
        // Phase two: cannot fail.
        let mut bytes = 40;
        if tuple.is_some() {
            for (i, p) in parsed.iter().enumerate() {
                let slot = &self.sources[i];
                bytes += match p {
                    Parsed::Str(s) => s.len() + 4,
                    Parsed::Hex(h) => h.len() / 2 + 4,
                    Parsed::Bytes(b) => b.len() + 4,
                    Parsed::NumText(n) => n.len() * 2,
                    Parsed::List(l) | Parsed::BinList(l, _) => l.len(),
                    _ => slot.kind.fixed_width(),
                };
                self.cols[slot.field].append(*p, &mut self.scratch);
            }
            if unchanged > 0 {
                if let Some((_, cols)) = &tuple {
                    for (col, slot) in cols.clone().zip(&self.sources) {
                        if col == Column::Unchanged {
                            self.unchanged_names.append_value(&slot.name);
                        }
                    }
                }
            }
        } else {
            for s in &self.sources {
                self.cols[s.field].append_null();
            }
        }
        for &i in &self.absent {
            self.cols[i].append_null();
        }
        let last = self.unchanged_offsets.last().copied().unwrap_or(0);
        self.unchanged_offsets.push(last + unchanged as i32);
        let v = &mut self.cdc_values;
        v.ops.push(op.letter());
        v.lsns.push(lsn.get() as i64);
        v.seqs.push(seq as i64);
        v.tss.push(ts_micros);
        self.rows += 1;
        self.bytes += bytes;
        parsed.clear();
        self.parsed = parsed.into_iter().map(|_| Parsed::Null).collect();
        Ok(())
    }

    /// The row just pushed is an update that changed its key, pushed right after its old
    /// key's delete: a mirror takes the values it did not send (unchanged TOAST) from the old
    /// key's row.
    pub fn mark_moved(&mut self) {
        if let Some(last) = self.rows.checked_sub(1) {
            self.moved.push(last as u32);
        }
    }

    /// Take the buffered rows as a RecordBatch with its moved rows (see [`Self::mark_moved`]),
    /// None if empty; the builders start over.
    pub fn finish(&mut self) -> Result<Option<Finished>, BatchError> {
        if self.rows == 0 {
            return Ok(None);
        }
        let [op_i, lsn_i, seq_i, ts_i, unchanged_idx] = self.cdc;
        let mut cdc = std::mem::take(&mut self.cdc_values);
        self.room = Some((
            self.rows,
            self.cols.iter().map(ColBuilder::data_len).collect(),
        ));
        let mut arrays = Vec::with_capacity(self.cols.len());
        for (i, (b, f)) in self.cols.iter_mut().zip(self.schema.fields()).enumerate() {
            if i == unchanged_idx {
                let DataType::List(elem) = f.data_type() else {
                    return Err(BatchError::UnsupportedType(f.name().clone()));
                };
                let names = Arc::new(self.unchanged_names.finish()) as ArrayRef;
                let offs = std::mem::replace(&mut self.unchanged_offsets, vec![0]);
                arrays.push(Arc::new(ListArray::try_new(
                    elem.clone(),
                    OffsetBuffer::new(ScalarBuffer::from(offs)),
                    names,
                    None,
                )?) as ArrayRef);
                // Keep the placeholder builder in step (it is never appended to).
                let _ = b;
            } else if i == op_i {
                let ops = std::mem::take(&mut cdc.ops);
                let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(1, ops.len()));
                arrays.push(Arc::new(StringArray::try_new(
                    offsets,
                    Buffer::from_vec(ops),
                    None,
                )?));
            } else if i == lsn_i {
                arrays.push(Arc::new(Int64Array::from(std::mem::take(&mut cdc.lsns))));
            } else if i == seq_i {
                arrays.push(Arc::new(Int64Array::from(std::mem::take(&mut cdc.seqs))));
            } else if i == ts_i {
                let ts = TimestampMicrosecondArray::from(std::mem::take(&mut cdc.tss));
                arrays.push(match f.data_type() {
                    DataType::Timestamp(_, Some(tz)) => Arc::new(ts.with_timezone(tz.clone())),
                    _ => Arc::new(ts),
                });
            } else {
                arrays.push(b.finish(f)?);
            }
        }
        debug_assert!(arrays.iter().all(|a| a.len() == self.rows));
        self.rows = 0;
        self.bytes = 0;
        let moved = std::mem::take(&mut self.moved);
        Ok(Some((
            RecordBatch::try_new(self.schema.clone(), arrays)?,
            moved,
        )))
    }
}

/// A row as a snapshot reads it, as JSON text, for the dead-letter table.
pub fn snapshot_row_json<'a>(
    relation: &[RelationColumn],
    values: impl Iterator<Item = Option<&'a [u8]>>,
    binary: &[bool],
) -> String {
    let m: serde_json::Map<String, serde_json::Value> = relation
        .iter()
        .zip(values)
        .zip(binary)
        .map(|((c, v), &bin)| {
            let j = v.map_or(serde_json::Value::Null, |b| {
                snapshot_value_json(c.type_oid, b, bin)
            });
            (c.name.clone(), j)
        })
        .collect();
    serde_json::Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::pgoutput::{decode, Message};

    fn column(name: &str, type_oid: u32) -> RelationColumn {
        RelationColumn {
            key: name == "id",
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    /// A binary Insert of `values` (None: NULL).
    fn insert(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(b) => {
                    m.push(b'b');
                    m.extend((b.len() as i32).to_be_bytes());
                    m.extend(*b);
                }
            }
        }
        m
    }

    proptest::proptest! {
        /// The per-column fast paths read every binary value as the general reader does:
        /// the same value, or the same error for one that cannot be stored.
        #[test]
        fn fast_binary_reads_agree_with_the_general_reader(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..10),
            pick in 0usize..12,
        ) {
            let (oid, kind) = [
                (20, ColumnKind::Int64),
                (23, ColumnKind::Int64),
                (21, ColumnKind::Int64),
                (23, ColumnKind::Int32),
                (21, ColumnKind::Int32),
                (701, ColumnKind::Float64),
                (700, ColumnKind::Float32),
                (1114, ColumnKind::Timestamp),
                (1184, ColumnKind::TimestampTz),
                (25, ColumnKind::Text),
                (1043, ColumnKind::Text),
                (1082, ColumnKind::Date),
            ][pick].clone();
            let slot = SourceSlot {
                name: "c".into(),
                field: 0,
                read: BinaryRead::of(oid, &kind),
                kind: kind.clone(),
                oid,
                binary: true,
            };
            let fast = format!("{:?}", read_binary(&slot, &raw));
            let general = format!("{:?}", from_binary(oid, &kind, &raw));
            proptest::prop_assert_eq!(fast, general);
        }
    }

    #[test]
    fn infinite_and_out_of_range_timestamps_take_the_general_path() {
        let slot = SourceSlot {
            name: "at".into(),
            field: 0,
            read: BinaryRead::of(1184, &ColumnKind::TimestampTz),
            kind: ColumnKind::TimestampTz,
            oid: 1184,
            binary: true,
        };
        assert_eq!(slot.read, BinaryRead::Micros);
        for v in [i64::MAX, i64::MIN, i64::MAX - 1, 0, -1] {
            let raw = v.to_be_bytes();
            assert_eq!(
                format!("{:?}", read_binary(&slot, &raw)),
                format!("{:?}", from_binary(1184, &ColumnKind::TimestampTz, &raw)),
                "{v}"
            );
        }
        assert!(read_binary(&slot, &i64::MAX.to_be_bytes()).is_err());
    }

    /// A domain (own OID 70000, over int4) and an enum (70001) read in binary through the
    /// type the catalog names; a row that cannot be stored is appended nowhere and its
    /// dead-letter JSON shows the domain's value, not its bytes.
    #[test]
    fn domains_and_enums_read_through_their_binary_type() {
        let rel = vec![
            column("id", 20),
            column("d", 70000),
            column("mood", 70001),
            column("at", 1184),
        ];
        let model: Vec<crate::model::Column> = rel
            .iter()
            .map(|c| crate::model::Column {
                name: c.name.clone(),
                kind: match c.type_oid {
                    70000 => ColumnKind::Int32,
                    o => ColumnKind::from_oid(o, -1),
                },
                key: c.key,
            })
            .collect();
        let schema = crate::sink::iceberg::schema::changelog_schema(&model).unwrap();
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema).unwrap());
        let read_as = |c: &RelationColumn| match c.type_oid {
            70000 => 23,
            70001 => 25,
            o => o,
        };
        let mut b = TableBatch::new(&schema, arrow.clone(), &rel, read_as).unwrap();
        assert!(b.binary_ready());
        let unresolved = TableBatch::new(&schema, arrow, &rel, |c| c.type_oid).unwrap();
        assert!(!unresolved.binary_ready(), "own OIDs have no binary reader");

        let ok = insert(&[
            Some(&7i64.to_be_bytes()),
            Some(&42i32.to_be_bytes()),
            Some(b"happy"),
            Some(&0i64.to_be_bytes()),
        ]);
        let Ok(Message::Insert { new, .. }) = decode(&ok) else {
            panic!("insert")
        };
        b.push(Op::Insert, Lsn(1), 0, 0, Some(&new)).unwrap();
        let bad = insert(&[
            Some(&8i64.to_be_bytes()),
            Some(&42i32.to_be_bytes()),
            None,
            Some(&i64::MAX.to_be_bytes()),
        ]);
        let Ok(Message::Insert { new, .. }) = decode(&bad) else {
            panic!("insert")
        };
        let err = b.push(Op::Insert, Lsn(1), 1, 0, Some(&new)).unwrap_err();
        assert!(
            err.0.contains("infinity") && err.0.contains("\"at\""),
            "{}",
            err.0
        );
        let json: serde_json::Value = serde_json::from_str(&b.row_json(Some(&new))).unwrap();
        assert_eq!(json["d"], "42", "{json}");
        assert_eq!(json["mood"], serde_json::Value::Null);

        let (batch, _) = b.finish().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 1);
        let d = batch.column_by_name("d").unwrap();
        let d = d
            .as_any()
            .downcast_ref::<arrow_array::Int32Array>()
            .unwrap();
        assert_eq!(d.value(0), 42);
        let mood = batch.column_by_name("mood").unwrap();
        let mood = mood
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        assert_eq!(mood.value(0), "happy");
    }
}
