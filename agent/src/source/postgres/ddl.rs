//! A table's columns as of an `ALTER TABLE`, from the transactional message the DDL event
//! trigger writes into the WAL ([`DDL_MESSAGE_PREFIX`]). pgoutput's Relation message names
//! columns but not their numbers, and the catalog is read later than the message's point;
//! these messages arrive in the stream at the DDL's point, so the numbers of a Relation
//! message that follows one are known as they were then.

use super::session::CatalogColumn;
pub use super::session::DDL_MESSAGE_PREFIX;

/// One column as the event trigger saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct DdlColumn {
    /// `pg_attribute.attnum`.
    pub attnum: i32,
    /// Its name then.
    pub name: String,
    /// Its type's OID then.
    pub type_oid: u32,
    /// Its type modifier then.
    pub type_modifier: i32,
    /// It had a default then.
    pub has_default: bool,
}

/// A DDL message's table OID and columns; None for content this version cannot read (the
/// catalog is used then, as without the messages).
pub fn parse(content: &[u8]) -> Option<(u32, Vec<DdlColumn>)> {
    let v: serde_json::Value = serde_json::from_slice(content).ok()?;
    let oid = u32::try_from(v.get("oid")?.as_u64()?).ok()?;
    let columns = v
        .get("columns")?
        .as_array()?
        .iter()
        .map(|c| {
            let c = c.as_array()?;
            Some(DdlColumn {
                attnum: i32::try_from(c.first()?.as_i64()?).ok()?,
                name: c.get(1)?.as_str()?.to_string(),
                type_oid: u32::try_from(c.get(2)?.as_u64()?).ok()?,
                type_modifier: i32::try_from(c.get(3)?.as_i64()?).ok()?,
                has_default: c.get(4)?.as_bool()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((oid, columns))
}

/// The catalog's columns as `shape` says they were: numbers, names and types of then, the
/// rest (a domain's base type, the binary form) from `now` where the column still has its
/// type, else the type's own.
pub fn as_of(shape: &[DdlColumn], now: &[CatalogColumn]) -> Vec<CatalogColumn> {
    shape
        .iter()
        .map(|d| {
            let same = now
                .iter()
                .find(|k| k.attnum == d.attnum && k.type_oid == d.type_oid);
            CatalogColumn {
                name: d.name.clone(),
                attnum: d.attnum,
                type_oid: d.type_oid,
                type_modifier: d.type_modifier,
                kind: same.and_then(|k| k.kind.clone()),
                binary_oid: same.map_or(d.type_oid, |k| k.binary_oid),
                has_default: d.has_default,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_and_takes_the_catalogs_details_where_the_type_is_the_same() {
        let (oid, cols) = parse(
            br#"{"oid": 16384, "columns": [[1, "id", 23, -1, false], [3, "x, y", 25, -1, true]]}"#,
        )
        .unwrap();
        assert_eq!(oid, 16384);
        assert_eq!(cols[1].name, "x, y");
        assert!(cols[1].has_default);
        assert!(parse(b"{\"oid\": 1}").is_none());
        assert!(parse(b"not json").is_none());
        let now = vec![CatalogColumn {
            name: "renamed".into(),
            attnum: 3,
            type_oid: 25,
            type_modifier: -1,
            kind: None,
            binary_oid: 25,
            has_default: true,
        }];
        let then = as_of(&cols, &now);
        assert_eq!(then[1].name, "x, y");
        assert_eq!(then[0].binary_oid, 23);
    }
}
