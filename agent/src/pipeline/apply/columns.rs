//! Following a source table's columns in its Iceberg tables: which field holds which source
//! column (by name, by the catalog's column numbers recorded in `philotes.source-columns`, or
//! through the schema of a replayed message's time), and the one schema update that adds,
//! renames, widens or moves aside columns and re-keys a mirror.

use std::collections::HashMap;

use iceberg::spec::NestedFieldRef;

use crate::model::Lsn;
use crate::pipeline::PipelineError;
use crate::sink::iceberg::evolve::{promotable, ColumnChange};
use crate::sink::iceberg::mirror::MirrorKey;
use crate::sink::iceberg::schema::{self, field_name, kind_of, SOURCE_COLUMNS_PROPERTY};
use crate::sink::iceberg::table::PropertyChanges;
use crate::sink::iceberg::TableSink;
use crate::source::postgres::pgoutput::RelationColumn;
use crate::source::postgres::session::CatalogColumn;
use crate::source::postgres::types::ColumnKind;
use crate::telemetry::events::{MirrorRekeyed, SchemaChanged};
use crate::telemetry::SourceMetrics;

/// The type of a relation column's binary form: what the catalog says for the column with
/// that type (a domain's base type, text for an enum), else the type itself.
pub(super) fn binary_oid(c: &RelationColumn, catalog: &[CatalogColumn]) -> u32 {
    catalog
        .iter()
        .find(|k| k.name == c.name && k.type_oid == c.type_oid)
        .map_or(c.type_oid, |k| k.binary_oid)
}

/// `columns` under the names of their Iceberg fields (see [`field_name`]): the pipeline's
/// tables hold them so, while the source's SQL (the snapshot's select list) uses the source's.
pub(super) fn as_fields(columns: Vec<RelationColumn>) -> Vec<RelationColumn> {
    renamed_as_fields(columns, |c| &mut c.name)
}

/// The catalog's columns under the names of their Iceberg fields, to match [`as_fields`].
pub(super) fn catalog_as_fields(columns: Vec<CatalogColumn>) -> Vec<CatalogColumn> {
    renamed_as_fields(columns, |c| &mut c.name)
}

fn renamed_as_fields<T>(mut columns: Vec<T>, name: fn(&mut T) -> &mut String) -> Vec<T> {
    for c in &mut columns {
        let n = name(c);
        if let Some(field) = field_name(n) {
            *n = field;
        }
    }
    columns
}

/// The kind a relation column takes in Iceberg: its base type's for a domain (or an array of
/// domains or enums) when the catalog still has the column with that type, else its own.
pub(super) fn wanted_kind(c: &RelationColumn, catalog: &[CatalogColumn]) -> ColumnKind {
    catalog
        .iter()
        .find(|k| k.name == c.name && k.type_oid == c.type_oid)
        .and_then(|k| k.kind.clone())
        .unwrap_or_else(|| ColumnKind::from_oid(c.type_oid, c.type_modifier))
}

/// Where a table's columns come from, which says what the catalog's numbers (read now) tell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Described {
    /// The catalog, now (what a copy reads): the columns have its numbers, and a table
    /// recreated with other numbers is recorded with them.
    Catalog,
    /// The table's first Relation message in this attempt: it may predate the catalog.
    FirstMessage,
    /// A later Relation message, sent after a change of the table.
    AfterAChange,
}

/// Make the Iceberg schema follow `columns`, in one schema update: a column the table lacks
/// is added, unless the catalog says it is a column the table holds under its old name (same
/// `attnum`: a rename, the field id kept); a type Iceberg promotes is widened in place; any
/// other type change keeps the old column as `<name>__before_<lsn>` beside a new column of the
/// new type. A dropped column stays (null from then on). A mirror whose key is not `key` is
/// keyed by it from then on. Returns what changed.
pub(super) async fn evolve(
    sink: &mut TableSink,
    columns: &[RelationColumn],
    catalog: &[CatalogColumn],
    (lsn, at): (Lsn, Option<u64>),
    key: Option<&MirrorKey>,
    described: Described,
) -> Result<Evolved, PipelineError> {
    let schema = sink.schema().clone();
    let number: HashMap<&str, i32> = catalog
        .iter()
        .map(|c| (c.name.as_str(), c.attnum))
        .collect();
    let recorded: HashMap<i32, i32> = sink
        .property(SOURCE_COLUMNS_PROPERTY)
        .map(|v| parse_source_columns(&v))
        .transpose()?
        .unwrap_or_default();
    let in_relation: std::collections::HashSet<&str> =
        columns.iter().map(|c| c.name.as_str()).collect();
    // Whether the catalog's numbers place the columns (see `numbers_place`); then each
    // column's field is the one recorded with its number, whatever its name.
    let by_number = numbers_place(
        &schema,
        &recorded,
        columns,
        catalog,
        matches!(described, Described::AfterAChange),
    );
    let mut placed: HashMap<&str, Option<NestedFieldRef>> = if by_number {
        columns
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    numbered_field(&schema, &recorded, &number, c),
                )
            })
            .collect()
    } else {
        HashMap::new()
    };
    // Two columns in one field would leave one without a field (a record out of step with
    // the catalog): names place them then.
    let ids: Vec<i32> = placed.values().flatten().map(|f| f.id).collect();
    let by_number =
        by_number && ids.len() == ids.iter().collect::<std::collections::HashSet<_>>().len();
    if !by_number {
        placed.clear();
    }
    let claimed: std::collections::HashSet<i32> = placed.values().flatten().map(|f| f.id).collect();
    // A field named like a column but holding another source column that is gone (dropped,
    // or renamed away and its name taken): it keeps its values under a name of its own.
    let mut taken: std::collections::HashSet<String> = schema
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let mut aside = |name: &str| {
        let base = format!("{name}__before_{}", lsn.get());
        let mut n = base.clone();
        let mut k = 1;
        while !taken.insert(n.clone()) {
            k += 1;
            n = format!("{base}_{k}");
        }
        n
    };
    let unclaimed = |name: &str| {
        schema
            .field_by_name(name)
            .filter(|g| !claimed.contains(&g.id))
    };
    let mut changes = Vec::new();
    // Columns dropped and added again under their old name: a new column to PostgreSQL
    // (another number; its old values are gone), which must not inherit the old field's.
    let mut readded = Vec::new();
    for c in columns {
        let want = wanted_kind(c, catalog);
        let field = if by_number {
            placed.get(c.name.as_str()).cloned().flatten()
        } else {
            match schema.field_by_name(&c.name) {
                Some(f) => Some(f.clone()),
                None => number
                    .get(c.name.as_str())
                    .and_then(|n| recorded.iter().find(|(_, a)| *a == n).map(|(f, _)| *f))
                    .and_then(|id| schema.field_by_id(id).cloned())
                    .filter(|f| {
                        !in_relation.contains(f.name.as_str()) && !f.name.starts_with("_cdc_")
                    }),
            }
        };
        let Some(f) = field else {
            if by_number && unclaimed(&c.name).is_some() {
                changes.push(ColumnChange::Replace {
                    name: c.name.clone(),
                    keep_as: aside(&c.name),
                    kind: want,
                });
                readded.push(c.name.clone());
            } else {
                changes.push(ColumnChange::Add {
                    name: c.name.clone(),
                    kind: want,
                });
            }
            continue;
        };
        if f.name != c.name {
            if let Some(g) = by_number.then(|| unclaimed(&c.name)).flatten() {
                changes.push(ColumnChange::Rename {
                    from: g.name.clone(),
                    to: aside(&g.name),
                });
            }
            changes.push(ColumnChange::Rename {
                from: f.name.clone(),
                to: c.name.clone(),
            });
        }
        let have = kind_of(&f.field_type);
        let raw = ColumnKind::from_oid(c.type_oid, c.type_modifier);
        match have {
            Some(h) if h == want => {}
            Some(h) if promotable(&h, &want) => changes.push(ColumnChange::Widen {
                name: c.name.clone(),
                kind: want,
            }),
            // A domain (or an array of them) in a table created before domains took their
            // base type: the column stays text, the values arrive as text.
            Some(ColumnKind::Text) if raw == ColumnKind::Text => {}
            _ => changes.push(ColumnChange::Replace {
                name: c.name.clone(),
                keep_as: aside(&c.name),
                kind: want,
            }),
        }
    }
    // The key now, under the names it has before these changes (a renamed key column is
    // the same key).
    let before = |n: &String| {
        changes
            .iter()
            .find_map(|c| match c {
                ColumnChange::Rename { from, to } if to == n => Some(from.clone()),
                _ => None,
            })
            .unwrap_or_else(|| n.clone())
    };
    let rekey = key.filter(|k| {
        let was = MirrorKey {
            columns: k.columns.iter().map(before).collect(),
            whole_row: k.whole_row,
        };
        sink.mirror_key().is_some_and(|now| now != was) || sink.identifiers_lag(&was)
    });
    if let Some(k) = rekey {
        changes.push(ColumnChange::Key(k.clone()));
    }
    // Record what changed, and which field holds which source column as of this relation.
    let properties = if changes.is_empty() {
        PropertyChanges::default()
    } else {
        let detail = changes
            .iter()
            .map(ColumnChange::describe)
            .collect::<Vec<_>>()
            .join("; ");
        let mut p = change_record(sink, lsn, &detail);
        // Where in the stream the schema changed, for a replay that meets older messages.
        if let Some(seq) = at {
            let record = sink.schema_change_at(lsn, seq);
            p.set.extend(record.map_err(PipelineError::State)?);
        }
        p
    };
    let stale = gives_old_rows_values(&changes, catalog, &readded);
    // The catalog is read now, the relation is of its point in the stream: a column renamed
    // or dropped later (in the same transaction, say) keeps the number its field had.
    // A field keeps the number of the source column it was made for: the catalog may
    // already show a later column under its name (dropped and added again after this
    // relation's point), which must not take the field over in the record.
    let numbers: HashMap<String, i32> = columns
        .iter()
        .filter_map(|c| {
            let fresh = changes.iter().any(|ch| {
                matches!(ch, ColumnChange::Add { name, .. } | ColumnChange::Replace { name, .. } if *name == c.name)
            });
            let from = changes
                .iter()
                .find_map(|ch| match ch {
                    ColumnChange::Rename { from, to } if *to == c.name => Some(from.as_str()),
                    _ => None,
                })
                .unwrap_or(c.name.as_str());
            let kept = if fresh || matches!(described, Described::Catalog) {
                None
            } else {
                schema
                    .field_by_name(from)
                    .and_then(|f| recorded.get(&f.id).copied())
            };
            let n = kept.or_else(|| number.get(c.name.as_str()).copied())?;
            Some((c.name.clone(), n))
        })
        .collect();
    let rekeyed = sink
        .change_columns(&changes, properties, SOURCE_COLUMNS_PROPERTY, &numbers)
        .await?;
    if let (Some(k), Some(r)) = (rekey, rekeyed) {
        MirrorRekeyed {
            table: &sink.name(),
            key: &k.columns.join(", "),
            whole_row: k.whole_row,
            rows: r.rows,
            duplicates: r.duplicates,
            unkeyed: r.unkeyed,
            took: r.took,
        }
        .emit();
    }
    Ok(Evolved { changes, stale })
}

/// The key a mirror of `columns` should have: its key columns (the replica identity's, or the
/// primary key of a FULL table); a FULL table without a known primary key keeps a key it has,
/// else is identified by its whole row.
pub(super) fn wanted_key(
    columns: &[RelationColumn],
    full_identity: Option<&[usize]>,
    now: Option<MirrorKey>,
) -> MirrorKey {
    match full_identity {
        Some([]) => now
            .filter(|k| !k.columns.is_empty() || k.whole_row)
            .unwrap_or(MirrorKey {
                columns: Vec::new(),
                whole_row: true,
            }),
        _ => MirrorKey {
            columns: columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone())
                .collect(),
            whole_row: false,
        },
    }
}

/// The names of the fields of `sink` holding `columns` now, when a schema change was committed
/// to it after `(lsn, seq)`: a replayed Relation message of before the change, placed through
/// the schema its rows were first written with (by name there, by field id from there). None
/// when the message is of the current schema, or the older one no longer places every column
/// (it is followed as a change then, as before such schemas were recorded).
pub(super) fn replayed_names(
    sink: &TableSink,
    columns: &[RelationColumn],
    lsn: Lsn,
    seq: u64,
) -> Result<Option<Vec<String>>, PipelineError> {
    let Some(then) = sink.schema_at(lsn, seq).map_err(PipelineError::State)? else {
        return Ok(None);
    };
    let (now, batch) = (sink.schema(), sink.batch_schema());
    let names = columns
        .iter()
        .map(|c| {
            let f = now.field_by_id(then.field_by_name(&c.name)?.id)?;
            batch.field_by_name(&f.name).map(|_| f.name.clone())
        })
        .collect::<Option<Vec<_>>>();
    if names.is_none() {
        tracing::debug!(table = %sink.name(), lsn = %lsn.pg(), "a replayed relation is not placed by the schema of its time: followed as a change");
    }
    Ok(names)
}

/// Whether the catalog's column numbers (read now) place a Relation message's `columns` in
/// their fields: the message is of the catalog's time (the catalog has all its columns, in
/// its order, with its types, and a column only the catalog has is newer than all of them:
/// added since), and it was sent after a change in this attempt or names a column the table
/// lacks. The first
/// message of an attempt may predate a change the catalog already shows (a column dropped and
/// added again, names swapped): names place its columns then, as they were when it was sent.
///
/// A column whose type the catalog shows changed is of the message's time still when its
/// number is at most that of a column known from before the message (its field recorded
/// with the number the catalog has): one dropped and added again since would have a number
/// above every number of that time. Its type changed later (`ALTER … TYPE` keeps the number),
/// which a later message brings.
pub(super) fn numbers_place(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    columns: &[RelationColumn],
    catalog: &[CatalogColumn],
    after_a_change: bool,
) -> bool {
    let both: Vec<&RelationColumn> = columns
        .iter()
        .filter(|c| catalog.iter().any(|k| k.name == c.name))
        .collect();
    let listed: Vec<&CatalogColumn> = catalog
        .iter()
        .filter(|k| columns.iter().any(|c| c.name == k.name))
        .collect();
    // A column of the message the catalog lacks was dropped or renamed since: the numbers
    // are of a later table (`DROP d; RENAME c TO d` after the message would put `c` and `d`
    // in one field). A column the message lacks must be newer than all it has: one added
    // since. An older one was renamed since (`RENAME price TO price_old; ADD price` after
    // the message's point: the names it has would all line up).
    let newest = listed.iter().map(|k| k.attnum).max().unwrap_or(0);
    let known = listed
        .iter()
        .filter(|k| {
            schema
                .field_by_name(&k.name)
                .is_some_and(|f| recorded.get(&f.id) == Some(&k.attnum))
        })
        .map(|k| k.attnum)
        .max()
        .unwrap_or(0);
    let of_catalog = both.len() == columns.len()
        && both.len() == listed.len()
        && both
            .iter()
            .zip(&listed)
            .all(|(c, k)| c.name == k.name && (c.type_oid == k.type_oid || k.attnum <= known))
        && catalog
            .iter()
            .filter(|k| !columns.iter().any(|c| c.name == k.name))
            .all(|k| k.attnum > newest);
    of_catalog
        && (after_a_change
            || columns
                .iter()
                .any(|c| schema.field_by_name(&c.name).is_none()))
}

/// The field holding column `c` by the numbers: the one recorded with its number now (a
/// rename keeps the number); else its name's field, unless that one was recorded with
/// another number (it held another source column, renamed away or dropped: `c` is new).
fn numbered_field(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    number: &HashMap<&str, i32>,
    c: &RelationColumn,
) -> Option<NestedFieldRef> {
    let n = number.get(c.name.as_str()).copied();
    let by_number = n.and_then(|n| {
        recorded
            .iter()
            .filter(|(_, a)| **a == n)
            .filter_map(|(id, _)| schema.field_by_id(*id))
            .filter(|f| !f.name.starts_with("_cdc_"))
            .max_by_key(|f| f.id)
    });
    if let Some(f) = by_number {
        return Some(f.clone());
    }
    let f = schema.field_by_name(&c.name)?;
    (n.is_none() || !recorded.contains_key(&f.id)).then(|| f.clone())
}

/// Whether the numbers put a column of `columns` in another field than its name's (dropped
/// and added again, names swapped): the Relation message looks unchanged then.
pub(super) fn renumbered(
    schema: &iceberg::spec::Schema,
    recorded: &HashMap<i32, i32>,
    number: &HashMap<&str, i32>,
    columns: &[RelationColumn],
) -> bool {
    columns.iter().any(|c| {
        numbered_field(schema, recorded, number, c).map(|f| f.id)
            != schema.field_by_name(&c.name).map(|f| f.id)
    })
}

/// What [`evolve`] did.
#[derive(Default)]
pub(super) struct Evolved {
    pub(super) changes: Vec<ColumnChange>,
    /// The changes give rows written before them values no change carries.
    pub(super) stale: bool,
}

/// Whether `changes` give the rows that existed before them values the stream never sends: a
/// column added with a default (PostgreSQL fills it in without writing the rows), or a type
/// Iceberg cannot promote (the rows were rewritten with new values, unpublished).
fn gives_old_rows_values(
    changes: &[ColumnChange],
    catalog: &[CatalogColumn],
    readded: &[String],
) -> bool {
    let defaulted = |name: &String| catalog.iter().any(|k| &k.name == name && k.has_default);
    changes.iter().any(|c| match c {
        ColumnChange::Add { name, .. } => defaulted(name),
        // A column added again is new: like an added one, it only has values with a default.
        ColumnChange::Replace { name, .. } if readded.contains(name) => defaulted(name),
        ColumnChange::Replace { .. } => true,
        _ => false,
    })
}

/// Table property prefix: one record per schema change, `philotes.schema-change.<lsn>`.
const SCHEMA_CHANGE_PREFIX: &str = "philotes.schema-change.";

/// Schema-change records a table keeps (the oldest go): they grow with DDL, not data.
const SCHEMA_CHANGES_KEPT: usize = 100;

/// The properties recording a change at `lsn`, dropping the oldest records past
/// [`SCHEMA_CHANGES_KEPT`].
pub(super) fn change_record(sink: &TableSink, lsn: Lsn, detail: &str) -> PropertyChanges {
    let key = format!("{SCHEMA_CHANGE_PREFIX}{}", lsn.get());
    let mut older: Vec<(u64, String)> = sink
        .properties_with_prefix(SCHEMA_CHANGE_PREFIX)
        .into_iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, _)| (k[SCHEMA_CHANGE_PREFIX.len()..].parse().unwrap_or(0), k))
        .collect();
    older.sort_unstable();
    let excess = (older.len() + 1).saturating_sub(SCHEMA_CHANGES_KEPT);
    PropertyChanges {
        set: HashMap::from([(key, detail.to_string())]),
        remove: older.into_iter().take(excess).map(|(_, k)| k).collect(),
    }
}

/// `field:attnum,…` → attnum by field id. An entry that cannot be read is an error: dropping
/// it would make a renamed column look new (its values would go to a fresh, empty column).
pub(super) fn parse_source_columns(v: &str) -> Result<HashMap<i32, i32>, PipelineError> {
    schema::parse_source_columns(v).map_err(PipelineError::State)
}

/// Log and count the changes of `table`, and the columns the source dropped (they stay in
/// Iceberg, null from then on).
pub(super) fn report_changes(
    metrics: &SourceMetrics,
    table: &str,
    before: &[RelationColumn],
    after: &[RelationColumn],
    changes: &[ColumnChange],
) {
    for c in changes {
        SchemaChanged {
            table,
            kind: c.label(),
            detail: &c.describe(),
        }
        .emit(metrics);
    }
    let renamed: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Rename { from, .. } => Some(from.as_str()),
            _ => None,
        })
        .collect();
    for gone in before
        .iter()
        .filter(|b| !after.iter().any(|a| a.name == b.name) && !renamed.contains(&b.name.as_str()))
    {
        SchemaChanged {
            table,
            kind: "drop",
            detail: &format!("drop {} (kept in Iceberg, null from now on)", gone.name),
        }
        .emit(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ErrorType;

    fn rel(names: &[&str]) -> Vec<RelationColumn> {
        names
            .iter()
            .map(|n| RelationColumn {
                key: *n == "id",
                name: n.to_string(),
                type_oid: 23,
                type_modifier: -1,
            })
            .collect()
    }

    fn cat(columns: &[(&str, i32)]) -> Vec<CatalogColumn> {
        columns
            .iter()
            .map(|(n, a)| CatalogColumn {
                name: n.to_string(),
                attnum: *a,
                type_oid: 23,
                type_modifier: -1,
                kind: None,
                binary_oid: 23,
                has_default: false,
            })
            .collect()
    }

    /// Fields id 1..: `id`, `price`, `v`, recorded as source columns 1, 2, 3.
    fn recorded_schema() -> (iceberg::spec::Schema, HashMap<i32, i32>) {
        use iceberg::spec::{NestedField, PrimitiveType, Type};
        let s = iceberg::spec::Schema::builder()
            .with_fields(
                ["id", "price", "v"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        NestedField::optional(i as i32 + 1, *n, Type::Primitive(PrimitiveType::Int))
                            .into()
                    })
                    .collect::<Vec<_>>(),
            )
            .build()
            .unwrap();
        (s, HashMap::from([(1, 1), (2, 2), (3, 3)]))
    }

    #[test]
    fn numbers_place_a_relation_only_of_the_catalogs_time() {
        let (s, recorded) = recorded_schema();
        let place = |names: &[&str], catalog: &[CatalogColumn], after_a_change| {
            numbers_place(&s, &recorded, &rel(names), catalog, after_a_change)
        };
        // A type the catalog shows changed since, of a column no newer than one known from
        // before the message (recorded with its number): `ALTER … TYPE`, the message of its
        // time still.
        let mut retyped = cat(&[("id", 1), ("price", 2), ("v", 3)]);
        retyped[1].type_oid = 25;
        assert!(place(&["id", "price", "v"], &retyped, true));
        // Dropped and added again since (new numbers, the first with another type): nothing
        // known is newer, the numbers are of a later table.
        let mut readded = cat(&[("id", 1), ("price", 4), ("v", 5)]);
        readded[1].type_oid = 25;
        assert!(!place(&["id", "price", "v"], &readded, true));
        // RENAME price TO price_old; ADD price: the message after it is the catalog's.
        let now = cat(&[("id", 1), ("price_old", 2), ("v", 3), ("price", 4)]);
        assert!(place(&["id", "price_old", "v", "price"], &now, false));
        // The message from before it has `price` before `v`: names place it.
        assert!(!place(&["id", "price", "v"], &now, true));
        // A first message naming only known columns may predate a swap the catalog shows.
        let swapped = cat(&[("id", 1), ("v", 2), ("price", 3)]);
        assert!(!place(&["id", "v", "price"], &swapped, false));
        assert!(place(&["id", "v", "price"], &swapped, true));
        // A column added since (the newest) leaves the rest comparable; one dropped since
        // (not in the catalog) or renamed since (an older column the message lacks) not.
        let dropped = cat(&[("id", 1), ("v", 3)]);
        assert!(!place(&["id", "price", "v"], &dropped, true));
        // `DROP v; RENAME price TO v` after the message: by the numbers `price` and `v`
        // would both be the old `price`.
        let moved = cat(&[("id", 1), ("v", 2)]);
        assert!(!place(&["id", "price", "v"], &moved, true));
        let added = cat(&[("id", 1), ("price", 2), ("v", 3), ("z", 4)]);
        assert!(place(&["id", "price", "v"], &added, true));
        let renamed = cat(&[("id", 1), ("cost", 2), ("v", 3)]);
        assert!(!place(&["id", "price", "v"], &renamed, true));
        // The last column renamed and a new one under its name after the message: the
        // columns the message names line up, the renamed one is older than the new one.
        let last = cat(&[("id", 1), ("v", 2), ("price_old", 3), ("price", 4)]);
        assert!(!place(&["id", "v", "price"], &last, true));
        assert!(place(&["id", "v", "price_old", "price"], &last, true));
    }

    #[test]
    fn a_column_is_placed_in_the_field_recorded_with_its_number() {
        let (s, recorded) = recorded_schema();
        let now = cat(&[("id", 1), ("price_old", 2), ("v", 3), ("price", 4)]);
        let number: HashMap<&str, i32> = now.iter().map(|c| (c.name.as_str(), c.attnum)).collect();
        let field = |n: &str| numbered_field(&s, &recorded, &number, &rel(&[n])[0]).map(|f| f.id);
        assert_eq!(field("price_old"), Some(2), "renamed: the old field");
        assert_eq!(field("price"), None, "new under the old name: a new field");
        assert_eq!(field("v"), Some(3));
        assert!(renumbered(
            &s,
            &recorded,
            &number,
            &rel(&["id", "price", "v"])
        ));
        assert!(!renumbered(&s, &recorded, &number, &rel(&["id", "v"])));
        // A name the catalog no longer has (renamed later) keeps its field.
        let later = cat(&[("id", 1), ("cost", 2), ("v", 3)]);
        let number: HashMap<&str, i32> =
            later.iter().map(|c| (c.name.as_str(), c.attnum)).collect();
        assert_eq!(
            numbered_field(&s, &recorded, &number, &rel(&["price"])[0]).map(|f| f.id),
            Some(2)
        );
    }

    #[test]
    fn source_columns_read_and_a_malformed_entry_is_an_error() {
        let m = parse_source_columns("1:1, 2:3,").unwrap();
        assert_eq!(m, HashMap::from([(1, 1), (2, 3)]));
        assert!(parse_source_columns("").unwrap().is_empty());
        for bad in ["1:1,2", "a:1", "1:b"] {
            let e = parse_source_columns(bad).unwrap_err();
            assert_eq!(e.error_type(), ErrorType::State, "{bad}");
        }
    }
}
