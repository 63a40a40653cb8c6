//! Batches read from data files written under an older schema, in the table's schema now:
//! columns found by Iceberg field id (a renamed field keeps its id), a field added since
//! null, a promoted one cast (int → long, float → double, a wider decimal); and a
//! changelog's batch in its mirror's schema, by name.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{new_null_array, Array, ArrayRef, ListArray, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Schema, SchemaRef};
use parquet::arrow::PARQUET_FIELD_ID_META_KEY;

/// The Iceberg field id an Arrow field carries (`PARQUET:field_id`).
pub fn field_id(f: &Field) -> Option<i32> {
    f.metadata()
        .get(PARQUET_FIELD_ID_META_KEY)
        .and_then(|v| v.parse::<i32>().ok())
}

/// `a` as type `t` when they differ only in nested field metadata (list element ids) or by a
/// promotion Iceberg allows.
pub fn conform(a: &ArrayRef, t: &DataType) -> Result<ArrayRef, ArrowError> {
    if a.data_type() == t {
        return Ok(a.clone());
    }
    match (a.data_type(), t) {
        (DataType::List(_), DataType::List(to)) => {
            let l = a.as_list::<i32>();
            let values = conform(l.values(), to.data_type())?;
            Ok(Arc::new(ListArray::try_new(
                to.clone(),
                l.offsets().clone(),
                values,
                l.nulls().cloned(),
            )?))
        }
        (DataType::Int32, DataType::Int64)
        | (DataType::Float32, DataType::Float64)
        | (DataType::Decimal128(_, _), DataType::Decimal128(_, _)) => arrow_cast::cast(a, t),
        (from, to) => Err(ArrowError::CastError(format!(
            "column type {from} cannot be written as {to}"
        ))),
    }
}

/// `batch` (its fields tagged with field ids) as the `wanted` fields, each with its id.
pub fn by_field_id(
    batch: &RecordBatch,
    wanted: &[(i32, FieldRef)],
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let columns = wanted
        .iter()
        .map(|(id, field)| {
            match schema
                .fields()
                .iter()
                .position(|f| field_id(f) == Some(*id))
            {
                Some(i) => conform(batch.column(i), field.data_type()),
                // Added after the file was written: no value in its rows.
                None => Ok(new_null_array(field.data_type(), batch.num_rows())),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fields: Vec<FieldRef> = wanted.iter().map(|(_, f)| f.clone()).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// `batch` as `schema`'s fields, found by name (nested field ids retagged). A field the batch
/// has no value for is null: a mirror's batches are in its changelog's schema, whose columns
/// moved aside by type changes (`<name>__before_<lsn>`) hold no new values and may be named
/// or typed otherwise than the mirror's (a mirror made before its changelog, a replay that
/// met a change one of the two tables had already committed).
pub fn by_name(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let rows = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() || c.null_count() < rows => {
                conform(c, f.data_type())
            }
            _ => Ok(new_null_array(f.data_type(), rows)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// `batch` with its columns renamed `from` → `to` as `renames` lists, for a table whose
/// fields hold them under other names (a mirror placing a replayed relation through an older
/// schema than its changelog's). A column already named like a target leaves: the renamed
/// one is what the row holds under that name.
pub fn renamed(
    batch: &RecordBatch,
    renames: &[(String, String)],
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        match renames.iter().find(|(from, _)| from == f.name()) {
            Some((_, to)) => fields.push(Arc::new(f.as_ref().clone().with_name(to.clone()))),
            None if renames.iter().any(|(_, to)| to == f.name()) => continue,
            None => fields.push(f.clone()),
        }
        columns.push(c.clone());
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The fields of `schema` (an Iceberg table's, as Arrow) with their field ids.
pub fn with_ids(schema: &Schema) -> Vec<(i32, FieldRef)> {
    schema
        .fields()
        .iter()
        .filter_map(|f| Some((field_id(f)?, f.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, Int64Array, StringArray};
    use std::collections::HashMap;

    fn field(name: &str, t: DataType, id: i32) -> Field {
        Field::new(name, t, true).with_metadata(HashMap::from([(
            PARQUET_FIELD_ID_META_KEY.to_string(),
            id.to_string(),
        )]))
    }

    #[test]
    fn renamed_takes_the_target_names_and_drops_what_they_replace() {
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                field("id", DataType::Int32, 1),
                field("c__before_7", DataType::Int32, 2),
                field("c", DataType::Utf8, 3),
            ])),
            vec![
                Arc::new(Int32Array::from(vec![1])),
                Arc::new(Int32Array::from(vec![99])),
                Arc::new(StringArray::from(vec![None::<&str>])),
            ],
        )
        .unwrap();
        let r = renamed(&b, &[("c__before_7".into(), "c".into())]).unwrap();
        let names: Vec<String> = r
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["id", "c"]);
        assert_eq!(r.column_by_name("c").unwrap().data_type(), &DataType::Int32);
    }

    #[test]
    fn an_older_files_batch_takes_the_schema_now() {
        // Written as (id int, a text); since then a renamed to b, id widened, c added.
        let old = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                field("id", DataType::Int32, 1),
                field("a", DataType::Utf8, 2),
            ])),
            vec![
                Arc::new(Int32Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["x", "y"])),
            ],
        )
        .unwrap();
        let now = Schema::new(vec![
            field("id", DataType::Int64, 1),
            field("b", DataType::Utf8, 2),
            field("c", DataType::Int32, 3),
        ]);
        let b = by_field_id(&old, &with_ids(&now)).unwrap();
        assert_eq!(b.schema().field(1).name(), "b");
        let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(id.values(), &[1, 2]);
        assert_eq!(b.column(1).as_string::<i32>().value(1), "y");
        assert_eq!(b.column(2).null_count(), 2);
        // A type no promotion reaches is an error, not a silent cast.
        let text_id = Schema::new(vec![field("id", DataType::Utf8, 1)]);
        assert!(by_field_id(&old, &with_ids(&text_id)).is_err());
    }

    #[test]
    fn by_name_leaves_what_the_batch_has_no_value_for_null() {
        // A changelog batch: `b` moved aside as text, `c__before_9` all null as text.
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                field("id", DataType::Int32, 1),
                field("b", DataType::Utf8, 2),
                field("c__before_9", DataType::Utf8, 3),
            ])),
            vec![
                Arc::new(Int32Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["x", "y"])),
                Arc::new(StringArray::from(vec![None::<&str>, None])),
            ],
        )
        .unwrap();
        // The mirror: `c__before_9` is an integer there, `d__before_7` only the mirror has.
        let mirror: SchemaRef = Arc::new(Schema::new(vec![
            field("id", DataType::Int64, 1),
            field("b", DataType::Utf8, 2),
            field("c__before_9", DataType::Int64, 4),
            field("d__before_7", DataType::Float64, 5),
        ]));
        let b = by_name(&batch, &mirror).unwrap();
        assert_eq!(b.schema(), mirror);
        assert_eq!(b.column(1).as_string::<i32>().value(1), "y");
        assert_eq!(b.column(2).null_count(), 2);
        assert_eq!(b.column(3).null_count(), 2);
        // A value of a type the field cannot take is an error, never dropped.
        let int_b: SchemaRef = Arc::new(Schema::new(vec![field("b", DataType::Int64, 2)]));
        assert!(by_name(&batch, &int_b).is_err());
    }
}
