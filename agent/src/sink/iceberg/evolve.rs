//! Column changes applied to a table's schema by field id, as one schema update: renames keep
//! the field id (old files read under the new name), promotions Iceberg allows change the type
//! in place (int → long, float → double, a decimal's precision), and a change Iceberg cannot
//! promote keeps the old column under another name beside a new column of the new type, so no
//! value is lost and every reader sees both. iceberg-rust's schema action only adds and deletes
//! columns; the new schema is built here and committed as `AddSchema` + `SetCurrentSchema`
//! through our commit path, with the table's current schema and last column id required.

use std::collections::HashMap;

use iceberg::spec::{NestedField, NestedFieldRef, PrimitiveType, Schema, Type};
use iceberg::{TableRequirement, TableUpdate};

use super::mirror::MirrorKey;
use super::schema::iceberg_type;
use super::SinkError;
use crate::model::ColumnKind;

/// One change to a table's columns.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnChange {
    /// A new optional column.
    Add {
        /// Its name.
        name: String,
        /// Its kind.
        kind: ColumnKind,
    },
    /// Column `from` is now called `to`.
    Rename {
        /// The old name.
        from: String,
        /// The new name.
        to: String,
    },
    /// Column `name` takes a type Iceberg promotes in place.
    Widen {
        /// The column.
        name: String,
        /// Its new kind.
        kind: ColumnKind,
    },
    /// Column `name` changed to a type Iceberg cannot promote: the old column is kept as
    /// `keep_as` and a new column `name` of the new kind is added.
    Replace {
        /// The column.
        name: String,
        /// The old column's new name.
        keep_as: String,
        /// The new kind.
        kind: ColumnKind,
    },
    /// A mirror's rows are identified by `columns` now (none: by the whole row, or by
    /// nothing). They become the identifier fields where Iceberg allows it (required
    /// columns, never floating point); the old identifier fields become optional.
    Key(MirrorKey),
}

impl ColumnChange {
    /// The `kind` label of `philotes_cdc_schema_changes_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ColumnChange::Add { .. } => "add",
            ColumnChange::Rename { .. } => "rename",
            ColumnChange::Widen { .. } => "widen",
            ColumnChange::Replace { .. } => "replace",
            ColumnChange::Key(_) => "key",
        }
    }

    /// One line for the log and the table's properties.
    pub fn describe(&self) -> String {
        match self {
            ColumnChange::Add { name, kind } => format!("add {name} {kind:?}"),
            ColumnChange::Rename { from, to } => format!("rename {from} to {to}"),
            ColumnChange::Widen { name, kind } => format!("widen {name} to {kind:?}"),
            ColumnChange::Replace {
                name,
                keep_as,
                kind,
            } => format!("replace {name} by {kind:?} (the old column is now {keep_as})"),
            ColumnChange::Key(k) if k.columns.is_empty() && k.whole_row => {
                "key: the whole row".to_string()
            }
            ColumnChange::Key(k) if k.columns.is_empty() => "key: none".to_string(),
            ColumnChange::Key(k) => format!("key ({})", k.columns.join(", ")),
        }
    }
}

/// Whether Iceberg promotes a column of kind `from` to `to` in place.
pub fn promotable(from: &ColumnKind, to: &ColumnKind) -> bool {
    match (from, to) {
        (ColumnKind::Int32, ColumnKind::Int64) | (ColumnKind::Float32, ColumnKind::Float64) => true,
        (
            ColumnKind::Decimal {
                precision: p,
                scale: s,
            },
            ColumnKind::Decimal {
                precision: q,
                scale: t,
            },
        ) => s == t && q > p,
        _ => false,
    }
}

/// `schema` with `changes` applied; new field ids start above `last_column_id`.
pub fn apply(
    schema: &Schema,
    last_column_id: i32,
    changes: &[ColumnChange],
) -> Result<Schema, SinkError> {
    let mut fields: Vec<NestedField> = schema
        .as_struct()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut next = last_column_id + 1;
    let find = |fields: &[NestedField], name: &str| -> Result<usize, SinkError> {
        fields
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| SinkError::Commit(format!("schema change: no column {name:?}")))
    };
    let mut added: Vec<NestedField> = Vec::new();
    let mut key: Option<&[String]> = None;
    // Renames name the columns as they were, and take effect together: two columns may swap
    // names, or one may take the name another gives up.
    let renames = changes
        .iter()
        .filter_map(|c| match c {
            ColumnChange::Rename { from, to } => Some(find(&fields, from).map(|i| (i, to))),
            _ => None,
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, to) in renames {
        fields[i].name = to.clone();
    }
    for c in changes {
        match c {
            ColumnChange::Add { name, kind } => {
                let id = next;
                next += 1;
                let t = iceberg_type(kind, &mut next);
                added.push(NestedField::optional(id, name, t));
            }
            ColumnChange::Rename { .. } => {}
            ColumnChange::Widen { name, kind } => {
                let i = find(&fields, name)?;
                *fields[i].field_type = iceberg_type(kind, &mut next);
            }
            ColumnChange::Replace {
                name,
                keep_as,
                kind,
            } => {
                let i = find(&fields, name)?;
                fields[i].name = keep_as.clone();
                // The old column keeps its values and stops being an identifier: new rows
                // leave it null.
                fields[i].required = false;
                let id = next;
                next += 1;
                let t = iceberg_type(kind, &mut next);
                added.push(NestedField::optional(id, name, t));
            }
            ColumnChange::Key(k) => key = Some(&k.columns),
        }
    }
    // New columns go before the CDC columns' block would be nicer, but field order is what
    // readers show; appended keeps every existing column where it was.
    fields.extend(added);
    for (i, f) in fields.iter().enumerate() {
        if fields[..i].iter().any(|g| g.name == f.name) {
            return Err(SinkError::Commit(format!(
                "schema change: two columns would be named {:?}",
                f.name
            )));
        }
    }
    let kept: Vec<i32> = match key {
        None => schema
            .identifier_field_ids()
            .filter(|id| fields.iter().any(|f| f.id == *id && f.required))
            .collect(),
        Some(columns) => {
            let ids: Vec<i32> = columns
                .iter()
                .filter_map(|c| fields.iter().find(|f| f.name == *c))
                .filter(|f| f.required && identifier_type(&f.field_type))
                .map(|f| f.id)
                .collect();
            // Rows may leave an old key column null from now on.
            for f in fields.iter_mut() {
                if f.required
                    && schema.identifier_field_ids().any(|i| i == f.id)
                    && !ids.contains(&f.id)
                {
                    f.required = false;
                }
            }
            if ids.len() == columns.len() {
                ids
            } else {
                Vec::new()
            }
        }
    };
    Schema::builder()
        .with_schema_id(schema.schema_id() + 1)
        .with_fields(fields.into_iter().map(NestedFieldRef::new))
        .with_identifier_field_ids(kept)
        .build()
        .map_err(|e| SinkError::Commit(format!("schema change: {e}")))
}

/// Whether Iceberg lets a field of type `t` be an identifier field.
fn identifier_type(t: &Type) -> bool {
    matches!(t, Type::Primitive(p) if !matches!(p, PrimitiveType::Float | PrimitiveType::Double))
}

/// The updates and requirements that make `schema` the table's current schema, with
/// `properties` set in the same commit.
pub fn updates(
    current_schema_id: i32,
    last_column_id: i32,
    schema: Schema,
    properties: HashMap<String, String>,
) -> (Vec<TableRequirement>, Vec<TableUpdate>) {
    let requirements = vec![
        TableRequirement::CurrentSchemaIdMatch { current_schema_id },
        TableRequirement::LastAssignedFieldIdMatch {
            last_assigned_field_id: last_column_id,
        },
    ];
    let mut updates = vec![
        TableUpdate::AddSchema { schema },
        TableUpdate::SetCurrentSchema { schema_id: -1 },
    ];
    if !properties.is_empty() {
        updates.push(TableUpdate::SetProperties {
            updates: properties,
        });
    }
    (requirements, updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::builder()
            .with_fields(vec![
                NestedField::required(1, "id", Type::Primitive(PrimitiveType::Int)).into(),
                NestedField::optional(2, "amount", Type::Primitive(PrimitiveType::Int)).into(),
                NestedField::optional(3, "note", Type::Primitive(PrimitiveType::String)).into(),
            ])
            .with_identifier_field_ids(vec![1])
            .build()
            .unwrap()
    }

    #[test]
    fn renames_and_widenings_keep_field_ids_and_a_replacement_adds_one() {
        let s = apply(
            &schema(),
            3,
            &[
                ColumnChange::Rename {
                    from: "note".into(),
                    to: "remark".into(),
                },
                ColumnChange::Widen {
                    name: "id".into(),
                    kind: ColumnKind::Int64,
                },
                ColumnChange::Replace {
                    name: "amount".into(),
                    keep_as: "amount__before_1".into(),
                    kind: ColumnKind::Text,
                },
            ],
        )
        .unwrap();
        assert_eq!(s.field_by_name("remark").unwrap().id, 3);
        assert_eq!(
            *s.field_by_name("id").unwrap().field_type,
            Type::Primitive(PrimitiveType::Long)
        );
        assert_eq!(s.field_by_name("amount__before_1").unwrap().id, 2);
        assert_eq!(s.field_by_name("amount").unwrap().id, 4);
        assert_eq!(s.identifier_field_ids().collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.schema_id(), 1);
    }

    #[test]
    fn renames_take_effect_together_and_names_stay_unique() {
        let rename = |from: &str, to: &str| ColumnChange::Rename {
            from: from.into(),
            to: to.into(),
        };
        // Swapped names: each field keeps its id under the other's name, in either order.
        for changes in [
            [rename("amount", "note"), rename("note", "amount")],
            [rename("note", "amount"), rename("amount", "note")],
        ] {
            let s = apply(&schema(), 3, &changes).unwrap();
            assert_eq!(s.field_by_name("note").unwrap().id, 2);
            assert_eq!(s.field_by_name("amount").unwrap().id, 3);
        }
        // A name given up is taken by another column, and a new column takes the first's.
        let s = apply(
            &schema(),
            3,
            &[
                ColumnChange::Add {
                    name: "note".into(),
                    kind: ColumnKind::Int64,
                },
                rename("amount", "amount_old"),
                rename("note", "amount"),
            ],
        )
        .unwrap();
        assert_eq!(s.field_by_name("amount_old").unwrap().id, 2);
        assert_eq!(s.field_by_name("amount").unwrap().id, 3);
        assert_eq!(s.field_by_name("note").unwrap().id, 4);
        // Two columns under one name is an error, not a schema readers cannot use.
        let e = apply(&schema(), 3, &[rename("note", "amount")]).unwrap_err();
        assert!(e.to_string().contains("\"amount\""), "{e}");
    }

    #[test]
    fn only_what_iceberg_promotes_is_a_widening() {
        let dec = |p, s| ColumnKind::Decimal {
            precision: p,
            scale: s,
        };
        assert!(promotable(&ColumnKind::Int32, &ColumnKind::Int64));
        assert!(promotable(&ColumnKind::Float32, &ColumnKind::Float64));
        assert!(promotable(&dec(10, 2), &dec(14, 2)));
        assert!(!promotable(&dec(10, 2), &dec(14, 3)));
        assert!(!promotable(&dec(14, 2), &dec(10, 2)));
        assert!(!promotable(&ColumnKind::Int64, &ColumnKind::Int32));
        assert!(!promotable(&ColumnKind::Int32, &ColumnKind::Text));
        assert!(!promotable(
            &ColumnKind::Timestamp,
            &ColumnKind::TimestampTz
        ));
    }

    #[test]
    fn a_new_key_moves_the_identifier_fields_where_iceberg_allows() {
        let key = |c: &[&str]| {
            ColumnChange::Key(MirrorKey {
                columns: c.iter().map(|s| s.to_string()).collect(),
                whole_row: false,
            })
        };
        // An optional column cannot become an identifier: none then, and the old key
        // column may hold nulls from now on.
        let s = apply(&schema(), 3, &[key(&["amount"])]).unwrap();
        assert_eq!(s.identifier_field_ids().count(), 0);
        assert!(!s.field_by_name("id").unwrap().required);
        assert!(!s.field_by_name("amount").unwrap().required);
        // The same key again keeps it; no key drops it.
        let s = apply(&schema(), 3, &[key(&["id"])]).unwrap();
        assert_eq!(s.identifier_field_ids().collect::<Vec<_>>(), vec![1]);
        assert!(s.field_by_name("id").unwrap().required);
        let s = apply(&schema(), 3, &[key(&[])]).unwrap();
        assert_eq!(s.identifier_field_ids().count(), 0);
        assert_eq!(
            ColumnChange::Key(MirrorKey {
                columns: vec![],
                whole_row: true
            })
            .describe(),
            "key: the whole row"
        );
        assert_eq!(key(&["a", "b"]).describe(), "key (a, b)");
        assert_eq!(key(&["a"]).label(), "key");
    }
}
