//! Fast check that a whole batch falls into one partition, so the per-row partition splitter
//! (which builds an Iceberg literal and hashes a key for every row — ~17 % of the agent's CPU
//! in a snapshot profile) is only needed for batches that really span partitions.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use iceberg::spec::{PartitionSpec, Schema, Transform};

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// True when every row of `batch` has the same partition key under `spec`. Conservative:
/// any transform or type it does not understand answers false (the caller then splits).
pub fn single_partition(batch: &RecordBatch, schema: &Schema, spec: &PartitionSpec) -> bool {
    if batch.num_rows() <= 1 {
        return true;
    }
    spec.fields().iter().all(|f| {
        let Some(field) = schema.field_by_id(f.source_id) else {
            return false;
        };
        let Some(col) = batch.column_by_name(&field.name) else {
            return false;
        };
        same_value_after(col.as_ref(), &f.transform)
    })
}

/// Whether `transform` maps every value of `col` to the same partition value.
fn same_value_after(col: &dyn Array, transform: &Transform) -> bool {
    if matches!(transform, Transform::Void) || col.null_count() == col.len() {
        return true;
    }
    if col.null_count() != 0 {
        return false;
    }
    // Identity, hour and day are monotonic, so min and max agreeing means all rows agree.
    let bucket = |v: i64| -> Option<i64> {
        match transform {
            Transform::Identity => Some(v),
            Transform::Hour => Some(v.div_euclid(MICROS_PER_HOUR)),
            Transform::Day => Some(v.div_euclid(MICROS_PER_DAY)),
            _ => None,
        }
    };
    let range = match col.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            min_max(col.as_primitive::<TimestampMicrosecondType>().values())
        }
        DataType::Int64 if matches!(transform, Transform::Identity) => {
            min_max(col.as_primitive::<Int64Type>().values())
        }
        DataType::Int32 if matches!(transform, Transform::Identity) => {
            min_max(col.as_primitive::<Int32Type>().values()).map(|(a, b)| (a.into(), b.into()))
        }
        _ => None,
    };
    match range {
        Some((lo, hi)) => matches!((bucket(lo), bucket(hi)), (Some(a), Some(b)) if a == b),
        None => false,
    }
}

fn min_max<T: Copy + Ord>(values: &[T]) -> Option<(T, T)> {
    let first = *values.first()?;
    Some(
        values
            .iter()
            .fold((first, first), |(lo, hi), &v| (lo.min(v), hi.max(v))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::TimestampMicrosecondArray;

    fn ts(values: Vec<Option<i64>>) -> TimestampMicrosecondArray {
        TimestampMicrosecondArray::from(values).with_timezone("+00:00")
    }

    #[test]
    fn day_transform_groups_by_utc_day() {
        let day = 20_000 * MICROS_PER_DAY;
        assert!(same_value_after(
            &ts(vec![
                Some(day),
                Some(day + MICROS_PER_DAY - 1),
                Some(day + 5)
            ]),
            &Transform::Day
        ));
        assert!(!same_value_after(
            &ts(vec![Some(day - 1), Some(day)]),
            &Transform::Day
        ));
        // Before 1970 the day is floor-divided, as Iceberg does.
        assert!(!same_value_after(
            &ts(vec![Some(-1), Some(0)]),
            &Transform::Day
        ));
        assert!(same_value_after(
            &ts(vec![Some(-MICROS_PER_DAY), Some(-1)]),
            &Transform::Day
        ));
    }

    #[test]
    fn nulls_and_unknown_transforms_fall_back() {
        assert!(!same_value_after(&ts(vec![Some(0), None]), &Transform::Day));
        assert!(same_value_after(&ts(vec![None, None]), &Transform::Day));
        assert!(!same_value_after(
            &ts(vec![Some(0), Some(0)]),
            &Transform::Bucket(4)
        ));
        assert!(!same_value_after(
            &ts(vec![Some(0), Some(0)]),
            &Transform::Month
        ));
        assert!(same_value_after(
            &ts(vec![Some(0), Some(9)]),
            &Transform::Void
        ));
    }
}
