//! Dead-letter rows: values that could not be converted, kept with their reason.

use std::sync::Arc;

use arrow_array::builder::{Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, SchemaRef};

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `schema.table` of the source.
    pub source_table: String,
    /// Commit LSN of the transaction.
    pub lsn: crate::model::Lsn,
    /// Position in the transaction.
    pub seq: u64,
    /// `I`, `U`, `D`.
    pub op: crate::model::Op,
    /// Why it could not be converted.
    pub error: String,
    /// The row as JSON text.
    pub row_json: String,
    /// When it was rejected (microseconds since the epoch).
    pub time_micros: i64,
    /// A row of a copy: its range (`TidRange::key`) and ctid, which name it again when the
    /// copy reads it again (its `seq` may then differ: the readers' batches interleave).
    pub copied: Option<(String, (u32, u16))>,
}

/// Build a batch in the dead-letter table's column order.
pub fn to_batch(schema: SchemaRef, rows: &[DeadLetter]) -> Result<RecordBatch, ArrowError> {
    let mut table = StringBuilder::new();
    let mut lsn = Int64Builder::new();
    let mut seq = Int64Builder::new();
    let mut op = StringBuilder::new();
    let mut err = StringBuilder::new();
    let mut json = StringBuilder::new();
    let mut time = TimestampMicrosecondBuilder::new();
    for r in rows {
        table.append_value(&r.source_table);
        lsn.append_value(r.lsn.get() as i64);
        seq.append_value(r.seq as i64);
        op.append_value(r.op.code());
        err.append_value(&r.error);
        json.append_value(&r.row_json);
        time.append_value(r.time_micros);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(table.finish()),
        Arc::new(lsn.finish()),
        Arc::new(seq.finish()),
        Arc::new(op.finish()),
        Arc::new(err.finish()),
        Arc::new(json.finish()),
        Arc::new(time.finish().with_timezone("+00:00")),
    ];
    RecordBatch::try_new(schema, cols)
}

/// Dead-letter table property prefix: per source table, the copy whose rows' dead letters it
/// holds, and per range of that copy the last ctid whose dead letters are stored
/// (`philotes.dlq-copy.<table>`, JSON; empty once the table streams after it).
pub const COPY_FLOOR_PREFIX: &str = "philotes.dlq-copy.";

/// What the dead-letter table holds of one copy (see [`COPY_FLOOR_PREFIX`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CopyFloor {
    /// The copy's `_cdc_lsn`.
    pub lsn: u64,
    /// Per range (`TidRange::key`): the last ctid whose dead letters are stored.
    pub after: std::collections::BTreeMap<String, (u32, u16)>,
}

/// The copy floors among the dead-letter table's properties (by source table). One that
/// cannot be read is an error: ignoring it would append a copy's dead letters again.
pub fn parse_copy_floors(
    props: impl IntoIterator<Item = (String, String)>,
) -> Result<std::collections::HashMap<String, CopyFloor>, String> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in props {
        let Some(table) = k.strip_prefix(COPY_FLOOR_PREFIX) else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let floor: CopyFloor = serde_json::from_str(&v).map_err(|e| {
            format!("dead-letter table property {k} cannot be read ({e}); fix or remove it (a copy's dead letters would be appended again)")
        })?;
        out.insert(table.to_string(), floor);
    }
    Ok(out)
}

/// Whether dead letter `r` of a copy is already stored: the same copy, at or before the last
/// ctid of its range whose dead letters were committed. None: not a copy's row, or nothing
/// recorded of its copy (the `(lsn, seq)` floor decides).
pub fn copied_already(
    r: &DeadLetter,
    floors: &std::collections::HashMap<String, CopyFloor>,
) -> Option<bool> {
    let (range, tid) = r.copied.as_ref()?;
    let f = floors
        .get(&r.source_table)
        .filter(|f| f.lsn == r.lsn.get())?;
    Some(f.after.get(range).is_some_and(|a| tid <= a))
}

/// The copy floors to record with `rows` (the dead letters being committed): a copy's ranges
/// advance to the last ctid among them; the floor of a table whose rows now stream (of a
/// later LSN) is emptied.
pub fn copy_floors_after(
    rows: &[DeadLetter],
    floors: &std::collections::HashMap<String, CopyFloor>,
) -> Vec<(String, String)> {
    let mut next: std::collections::BTreeMap<&str, Option<CopyFloor>> = Default::default();
    for r in rows {
        match &r.copied {
            Some((range, tid)) => {
                let f = next
                    .entry(r.source_table.as_str())
                    .or_insert(None)
                    .get_or_insert_with(|| {
                        floors
                            .get(&r.source_table)
                            .filter(|f| f.lsn == r.lsn.get())
                            .cloned()
                            .unwrap_or(CopyFloor {
                                lsn: r.lsn.get(),
                                after: Default::default(),
                            })
                    });
                if f.lsn != r.lsn.get() {
                    // Another copy of the table (taken again): its own ranges.
                    f.lsn = r.lsn.get();
                    f.after.clear();
                }
                let a = f.after.entry(range.clone()).or_insert(*tid);
                *a = (*a).max(*tid);
            }
            None if floors
                .get(&r.source_table)
                .is_some_and(|f| r.lsn.get() > f.lsn) =>
            {
                next.entry(r.source_table.as_str()).or_insert(None);
            }
            None => {}
        }
    }
    next.into_iter()
        .map(|(t, f)| {
            let v = f
                .and_then(|f| serde_json::to_string(&f).ok())
                .unwrap_or_default();
            (format!("{COPY_FLOOR_PREFIX}{t}"), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Lsn, Op};

    fn letter(table: &str, lsn: u64, seq: u64, copied: Option<(&str, (u32, u16))>) -> DeadLetter {
        DeadLetter {
            source_table: table.into(),
            lsn: Lsn(lsn),
            seq,
            op: if copied.is_some() {
                Op::Read
            } else {
                Op::Insert
            },
            error: "e".into(),
            row_json: "{}".into(),
            time_micros: 0,
            copied: copied.map(|(r, t)| (r.to_string(), t)),
        }
    }

    #[test]
    fn a_copys_dead_letters_are_known_again_by_range_and_ctid() {
        let rows = [
            letter("public.t", 10, 5, Some(("@0", (3, 2)))),
            letter("public.t", 10, 2, Some(("@0", (1, 7)))),
            letter("public.t", 10, 9, Some(("@50", (60, 1)))),
        ];
        let props = copy_floors_after(&rows, &Default::default());
        let floors = parse_copy_floors(props).unwrap();
        let f = &floors["public.t"];
        assert_eq!(f.lsn, 10);
        assert_eq!(f.after["@0"], (3, 2));
        // Read again with other seqs (readers interleave otherwise): known by ctid.
        assert_eq!(
            copied_already(&letter("public.t", 10, 0, Some(("@0", (1, 7)))), &floors),
            Some(true)
        );
        assert_eq!(
            copied_already(&letter("public.t", 10, 1, Some(("@0", (3, 3)))), &floors),
            Some(false)
        );
        assert_eq!(
            copied_already(&letter("public.t", 10, 1, Some(("@9", (1, 1)))), &floors),
            Some(false)
        );
        // Another copy, or a streamed change: not this rule's.
        assert_eq!(
            copied_already(&letter("public.t", 11, 1, Some(("@0", (1, 1)))), &floors),
            None
        );
        assert_eq!(
            copied_already(&letter("public.t", 10, 1, None), &floors),
            None
        );
        // The table streams after the copy: its floor is emptied.
        let after = copy_floors_after(&[letter("public.t", 20, 0, None)], &floors);
        assert_eq!(
            after,
            vec![(format!("{COPY_FLOOR_PREFIX}public.t"), String::new())]
        );
        assert!(parse_copy_floors(after).unwrap().is_empty());
        assert!(
            parse_copy_floors([(format!("{COPY_FLOOR_PREFIX}public.t"), "{".to_string())]).is_err()
        );
    }
}
