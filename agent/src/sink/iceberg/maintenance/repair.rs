//! Repair of column bounds that exclude rows, in tables written before the agent wrote exact
//! Parquet statistics (docs/reliability.md, "Statistics never hide a row").
//!
//! Such a file has a column chunk whose minimum or maximum Parquet marks inexact (a long
//! string truncated to 64 bytes), and its manifest entry may hold a bound built from the
//! other row groups alone, which an engine pruning by it takes as "no row here". Once per
//! table, compaction reads the footer of every live data file; a file whose footer bounds
//! (the inexact ones included: the Parquet format defines them as bounds) reach beyond its
//! manifest entry's gets its entry written again with those bounds, in one `replace`
//! snapshot that changes no file: the same path, snapshot and sequence numbers, so position
//! deletes and a mirror's key index still name it. When none is left, the table property
//! [`BOUNDS_PROPERTY`] records it and the footers are not read again.

use std::collections::{HashMap, HashSet};

use iceberg::spec::{DataFile, DataFileFormat, Datum, Operation, Schema};
use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};

use super::reach::LiveFile;
use super::{MaintenanceError, Settings};
use crate::sink::iceberg::commit::Change;
use crate::sink::iceberg::table::BOUNDS_PROPERTY;
use crate::sink::iceberg::{bounds, footer};

/// Footers read at once.
const FOOTER_READS: usize = 8;

/// Whether `table`'s files were checked (or it was created with exact statistics).
pub(super) fn checked(table: &Table) -> bool {
    table.metadata().properties().contains_key(BOUNDS_PROPERTY)
}

/// Whether a footer's bound `f` reaches beyond the manifest's `m` in direction `beyond`
/// (the manifest's bound would exclude values the file may hold).
fn reaches_beyond(f: Option<&Datum>, m: Option<&Datum>, beyond: std::cmp::Ordering) -> bool {
    match (f, m) {
        (_, None) => false,
        // The footer cannot bound the column: neither can the manifest.
        (None, Some(_)) => true,
        (Some(f), Some(m)) => f.partial_cmp(m).is_none_or(|o| o == beyond),
    }
}

/// `file` described with bounds that hold its rows, when its manifest bounds may exclude
/// some (by its footer); None when they hold.
async fn restated(
    table: &Table,
    schema: &Schema,
    file: &LiveFile,
) -> Result<Option<DataFile>, MaintenanceError> {
    let f = &file.file;
    if f.file_format() != DataFileFormat::Parquet {
        return Ok(None);
    }
    let meta = super::concat::footer(table.file_io(), f).await?;
    let inexact = footer::inexact_columns(&meta);
    if inexact.is_empty() {
        return Ok(None);
    }
    let read_err =
        |e: footer::FooterError| MaintenanceError::Read(format!("{}: {e}", f.file_path()));
    let whole = footer::read_whole(schema, &meta).map_err(read_err)?;
    let wrong = inexact.iter().any(|id| {
        reaches_beyond(
            whole.lower.get(id),
            f.lower_bounds().get(id),
            std::cmp::Ordering::Less,
        ) || reaches_beyond(
            whole.upper.get(id),
            f.upper_bounds().get(id),
            std::cmp::Ordering::Greater,
        )
    });
    if !wrong {
        return Ok(None);
    }
    // The columns with an inexact row group take the footer's bounds (or none); the others'
    // were built from every row group and stay.
    let (mut lower, mut upper) = (f.lower_bounds().clone(), f.upper_bounds().clone());
    let (mut new_lower, mut new_upper) = (HashMap::new(), HashMap::new());
    for id in &inexact {
        lower.remove(id);
        upper.remove(id);
        if let Some(d) = whole.lower.get(id) {
            new_lower.insert(*id, d.clone());
        }
        if let Some(d) = whole.upper.get(id) {
            new_upper.insert(*id, d.clone());
        }
    }
    bounds::truncate(&mut new_lower, &mut new_upper);
    lower.extend(new_lower);
    upper.extend(new_upper);
    bounds::with_bounds(f, file.spec_id, lower, upper)
        .map(Some)
        .map_err(|e| MaintenanceError::Write(format!("{}: {e}", f.file_path())))
}

/// What a repair run found and did.
#[derive(Debug, Default)]
pub(super) struct Repaired {
    /// Files whose bounds may exclude rows.
    pub suspects: usize,
    /// Of them, described again with bounds that hold.
    pub restated: usize,
}

/// Check `table`'s live data files once and describe again those whose bounds may exclude
/// rows; returns the table as committed.
pub(super) async fn run(
    committer: &super::Committer,
    table: &Table,
    live: &[LiveFile],
    settings: &Settings,
) -> Result<(Table, Repaired), MaintenanceError> {
    let md = table.metadata();
    let schema = md.current_schema().clone();
    let data: Vec<&LiveFile> = live.iter().filter(|f| f.is_data).collect();
    let mut files = HashMap::new();
    for chunk in data.chunks(FOOTER_READS) {
        let found =
            futures::future::try_join_all(chunk.iter().map(|f| restated(table, &schema, f)))
                .await?;
        for f in found.into_iter().flatten() {
            files.insert(f.file_path().to_string(), f);
        }
    }
    let mut out = Repaired {
        suspects: files.len(),
        restated: 0,
    };
    if settings.dry_run {
        return Ok((table.clone(), out));
    }
    let properties = HashMap::from([(BOUNDS_PROPERTY.to_string(), "true".to_string())]);
    if files.is_empty() {
        let t = committer
            .commit_updates(
                table,
                vec![TableRequirement::UuidMatch { uuid: md.uuid() }],
                vec![TableUpdate::SetProperties {
                    updates: properties,
                }],
            )
            .await?;
        return Ok((t, out));
    }
    let change = Change {
        operation: Operation::Replace,
        added: Vec::new(),
        removed: HashSet::new(),
        summary: HashMap::from([(
            super::MAINTENANCE_PROPERTY.to_string(),
            "repair_bounds".to_string(),
        )]),
        properties,
        requires_live: HashSet::new(),
        fence: Vec::new(),
        restated: files,
    };
    let (t, _) = committer.commit_snapshot(table, &change, 5).await?;
    out.restated = change.restated.len();
    Ok((t, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MaintenanceConfig;
    use crate::sink::iceberg::commit::tests::TestCatalog;
    use crate::sink::iceberg::commit::Committer;
    use crate::sink::iceberg::footer::testfile;
    use crate::sink::iceberg::maintenance::{maintain, Action, Scope, Status};
    use futures::StreamExt;
    use iceberg::spec::{DataContentType, DataFileBuilder, Struct};
    use iceberg::{TableCreation, TableIdent};
    use std::cmp::Ordering;

    /// Append a file holding `bytes` with the `v` bounds a writer gave it.
    async fn append(
        committer: &Committer,
        table: &Table,
        name: &str,
        bytes: bytes::Bytes,
        v: (&str, &str),
    ) {
        let path = format!("{}/data/{name}.parquet", table.metadata().location());
        let size = bytes.len() as u64;
        table
            .file_io()
            .new_output(&path)
            .unwrap()
            .write(bytes)
            .await
            .unwrap();
        let mut b = DataFileBuilder::default();
        b.content(DataContentType::Data)
            .file_path(path)
            .file_format(DataFileFormat::Parquet)
            .partition(Struct::empty())
            .partition_spec_id(table.metadata().default_partition_spec_id())
            .record_count(4)
            .file_size_in_bytes(size)
            .value_counts(HashMap::from([(1, 4), (2, 4)]))
            .null_value_counts(HashMap::from([(1, 0), (2, 0)]))
            .lower_bounds(HashMap::from([(2, Datum::string(v.0))]))
            .upper_bounds(HashMap::from([(2, Datum::string(v.1))]));
        let change = Change {
            operation: Operation::Append,
            added: vec![b.build().unwrap()],
            removed: HashSet::new(),
            summary: HashMap::new(),
            properties: HashMap::new(),
            requires_live: HashSet::new(),
            fence: Vec::new(),
            restated: HashMap::new(),
        };
        committer.commit_snapshot(table, &change, 1).await.unwrap();
    }

    /// The files a scan for `v = value` plans (iceberg-rust prunes files by their manifest
    /// bounds, as other engines do).
    async fn planned_for(table: &Table, value: &str) -> Vec<String> {
        let filter = iceberg::expr::Reference::new("v").equal_to(Datum::string(value));
        table
            .scan()
            .with_filter(filter)
            .build()
            .unwrap()
            .plan_files()
            .await
            .unwrap()
            .map(|t| t.unwrap().data_file_path().to_string())
            .collect()
            .await
    }

    /// A table written before exact statistics (real SQLite catalog, real files): the file
    /// whose manifest bound hides a row is described again with bounds that hold, the other
    /// is left as it is, and the check is not made again.
    #[tokio::test]
    async fn a_file_whose_bounds_exclude_rows_is_described_again_once_with_bounds_that_hold() {
        let TestCatalog {
            dir,
            catalog,
            committer,
            ns,
            ..
        } = TestCatalog::new("repair").await;
        // As the agent created its tables before the property existed.
        let creation = TableCreation::builder()
            .name("t".into())
            .schema(testfile::schema())
            .properties(HashMap::from([(
                crate::sink::iceberg::table::CREATED_BY_PROPERTY.to_string(),
                "philotes".to_string(),
            )]))
            .build();
        let table = catalog.create_table(&ns, creation).await.unwrap();
        let ident = TableIdent::new(ns, "t".into());
        let long: String = std::iter::repeat_n('a', 100).collect();
        // Its first row group's minimum 'aaa…' truncated (inexact); the manifest says 'b'.
        let old = testfile::parquet(&[(1, &long), (2, "c"), (3, "b"), (4, "d")], 2, Some(64));
        append(&committer, &table, "old", old, ("b", "d")).await;
        // Inexact too, but its manifest bounds hold (the long value is not the minimum).
        let table = catalog.load_table(&ident).await.unwrap();
        let fine = testfile::parquet(&[(5, "e"), (6, &long), (7, "a"), (8, "f")], 2, Some(64));
        append(&committer, &table, "fine", fine, ("a", "f")).await;

        let table = catalog.load_table(&ident).await.unwrap();
        assert!(
            !planned_for(&table, &long)
                .await
                .iter()
                .any(|p| p.ends_with("/old.parquet")),
            "the old bound hides the file from a filter on its own value"
        );

        let settings = Settings {
            config: MaintenanceConfig::default(),
            dry_run: false,
            force: false,
        };
        let (_, outcomes) = maintain(&committer, &ident, &settings, Scope::Compaction).await;
        let compact = outcomes
            .iter()
            .find(|o| o.action == Action::Compact)
            .unwrap();
        assert_eq!(compact.status, Status::Ok, "{}", compact.summary);
        assert!(
            compact
                .summary
                .starts_with("corrected the column bounds of 1 files"),
            "{}",
            compact.summary
        );

        let table = catalog.load_table(&ident).await.unwrap();
        let props = table.metadata().properties();
        assert_eq!(props.get(BOUNDS_PROPERTY).map(String::as_str), Some("true"));
        let snapshot = table.metadata().current_snapshot().unwrap();
        assert_eq!(snapshot.summary().operation, Operation::Replace);
        // The same files, described again: the old one's bound now holds 'aaa…' (cut to 16
        // characters); the other one's is as it was.
        let live = super::super::reach::live_files(&table).await.unwrap();
        assert_eq!(live.len(), 2);
        let find = |name: &str| {
            live.iter()
                .find(|f| f.file.file_path().ends_with(name))
                .unwrap_or_else(|| panic!("{name} not live"))
        };
        let (old, fine) = (find("/old.parquet"), find("/fine.parquet"));
        assert_eq!(
            old.file.lower_bounds().get(&2),
            Some(&Datum::string(&long[..16]))
        );
        assert_eq!(old.file.upper_bounds().get(&2), Some(&Datum::string("d")));
        assert_eq!(old.file.record_count(), 4);
        assert_eq!(fine.file.lower_bounds().get(&2), Some(&Datum::string("a")));
        // Sequence numbers kept: the position deletes of a mirror still apply.
        assert!(
            old.sequence > 0 && old.sequence < fine.sequence,
            "{} {}",
            old.sequence,
            fine.sequence
        );
        // A scan filtering on the column plans the old file for the row its bound hid.
        let planned = planned_for(&table, &long).await;
        assert!(
            planned.iter().any(|p| p.ends_with("/old.parquet")),
            "{planned:?}"
        );

        // Checked: the next run reads no footer and copies nothing.
        let (_, outcomes) = maintain(&committer, &ident, &settings, Scope::Compaction).await;
        assert!(
            outcomes.iter().all(|o| o.action != Action::Compact),
            "{outcomes:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_footer_bound_beyond_the_manifests_makes_the_file_suspect() {
        let s = |v: &str| Some(Datum::string(v));
        use Ordering::{Greater, Less};
        // (footer, manifest, direction, suspect): a lower bound below the manifest's, an upper
        // one above it; no manifest bound hides nothing; a manifest bound the footer cannot
        // vouch for may.
        let cases = [
            (s("a"), s("b"), Less, true),
            (s("b"), s("b"), Less, false),
            (s("c"), s("b"), Less, false),
            (s("e"), s("d"), Greater, true),
            (s("c"), s("d"), Greater, false),
            (s("a"), None, Less, false),
            (None, s("b"), Less, true),
        ];
        for (f, m, dir, want) in cases {
            assert_eq!(
                reaches_beyond(f.as_ref(), m.as_ref(), dir),
                want,
                "{f:?} {m:?} {dir:?}"
            );
        }
    }
}
