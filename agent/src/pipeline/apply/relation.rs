//! Registering a source table with the apply loop: the catalog lookups a Relation message
//! needs, which columns the message's fields are (the DDL messages of the event trigger, the
//! catalog's numbers, the schema of a replayed message's time), and the table's Iceberg
//! tables opened or followed to its new shape (`columns.rs` decides what changes).

use std::collections::HashMap;

use super::columns::{
    as_fields, binary_oid, catalog_as_fields, change_record, evolve, numbers_place,
    parse_source_columns, renumbered, replayed_names, report_changes, wanted_key, wanted_kind,
    Described, Evolved,
};
use super::{Applier, TableState, SOURCE_NAME_PROPERTY};
use crate::model::{iceberg_table_name, Lsn};
use crate::pipeline::batch::TableBatch;
use crate::pipeline::position::already_committed;
use crate::pipeline::status;
use crate::pipeline::PipelineError;
use crate::sink::iceberg::evolve::ColumnChange;
use crate::sink::iceberg::mirror::MirrorKey;
use crate::sink::iceberg::schema::{
    changelog_partition, changelog_schema, CHANGELOG_SUFFIX, SOURCE_COLUMNS_PROPERTY,
};
use crate::sink::iceberg::table::MirrorSource;
use crate::sink::iceberg::TableSink;
use crate::source::postgres::ddl;
use crate::source::postgres::pgoutput::RelationColumn;
use crate::source::postgres::session::{CatalogColumn, Session};
use crate::telemetry::events::{SchemaChanged, StaleRowsAfterSchemaChange};

impl Applier {
    /// Table `idx` is called `now` in the source (`ALTER TABLE … RENAME` or `SET SCHEMA`): it
    /// keeps streaming into its Iceberg table; the rename is logged, counted and recorded in
    /// the table's properties (`philotes.source-name`), which a restart reads back.
    pub(super) async fn table_renamed(
        &mut self,
        idx: usize,
        now: &str,
    ) -> Result<(), PipelineError> {
        let lsn = self.change_lsn();
        let t = &mut self.tables[idx];
        let before = std::mem::replace(&mut t.current, now.to_string());
        let detail = format!("rename table {before} to {now}");
        let mut props = change_record(&t.sink, lsn, &detail);
        props
            .set
            .insert(SOURCE_NAME_PROPERTY.to_string(), now.to_string());
        t.sink.set_properties(props.clone()).await?;
        if let Some(m) = t.mirror.as_mut() {
            m.set_properties(props).await?;
        }
        SchemaChanged {
            table: &t.source_name,
            kind: "rename_table",
            detail: &detail,
        }
        .emit(&self.metrics);
        self.aliases.insert(now.to_string(), t.source_name.clone());
        if let Some(pk) = self.full_identity.remove(&before) {
            self.full_identity.insert(now.to_string(), pk);
        }
        Ok(())
    }

    /// The connection for catalog lookups, opened on first use.
    async fn catalog_session(&mut self) -> Result<&mut Session, PipelineError> {
        if self.catalog.is_none() {
            let s = Session::connect(
                self.cfg.source.url(),
                &self.cfg.slot_name(),
                &self.cfg.publication_name(),
                None,
            )
            .await?;
            self.catalog = Some(s);
        }
        self.catalog
            .as_mut()
            .ok_or_else(|| PipelineError::StreamEnded("no catalog connection".into()))
    }

    /// The table's columns as the catalog has them now (a connection is opened once).
    pub(super) async fn catalog_columns(
        &mut self,
        schema: &str,
        name: &str,
        oid: Option<u32>,
    ) -> Result<Vec<CatalogColumn>, PipelineError> {
        let result = self
            .catalog_session()
            .await?
            .column_info(schema, name, oid)
            .await;
        // After a failure the next lookup opens a new connection.
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
    }

    /// Whether a column of table `i` is another source column than its name's field holds
    /// (dropped and added again under its name, names swapped): the Relation message looks
    /// the same then, only the catalog's numbers tell.
    fn renumbered(&self, i: usize, catalog: &[CatalogColumn]) -> Result<bool, PipelineError> {
        let Some(v) = self.tables[i].sink.property(SOURCE_COLUMNS_PROPERTY) else {
            return Ok(false);
        };
        let recorded = parse_source_columns(&v)?;
        let number: HashMap<&str, i32> = catalog
            .iter()
            .map(|c| (c.name.as_str(), c.attnum))
            .collect();
        let t = &self.tables[i];
        let sink_schema = t.sink.schema();
        Ok(
            numbers_place(sink_schema, &recorded, &t.columns, catalog, true)
                && renumbered(sink_schema, &recorded, &number, &t.columns),
        )
    }

    /// Whether relation `oid` is a partition published under an ancestor's name.
    pub(super) async fn published_as_ancestor(&mut self, oid: u32) -> Result<bool, PipelineError> {
        let result = self
            .catalog_session()
            .await?
            .published_as_ancestor(oid)
            .await;
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
    }

    /// `schema.table` of relation `oid` as committed now.
    pub(super) async fn committed_name(
        &mut self,
        oid: u32,
    ) -> Result<Option<String>, PipelineError> {
        let result = self.catalog_session().await?.relation_name(oid).await;
        result.map_err(|e| {
            self.catalog = None;
            e.into()
        })
    }

    /// A table's columns at an `ALTER TABLE` (the DDL event trigger's message): the Relation
    /// messages after it are placed by these numbers.
    pub(super) fn ddl_message(&mut self, content: &[u8]) {
        if !self.cfg.ddl_messages {
            return;
        }
        match ddl::parse(content) {
            Some((oid, columns)) => {
                self.ddl_shapes.insert(oid, columns);
            }
            None => tracing::debug!(
                "a DDL message this version cannot read: the catalog places the next relation"
            ),
        }
    }

    /// The catalog's columns for a Relation message of `columns`, as of the last DDL message
    /// of the table when it describes them (true then: the numbers are of the message's
    /// time), else as the catalog has them now.
    fn catalog_at_message(
        &self,
        oid: Option<u32>,
        now: Vec<CatalogColumn>,
        columns: &[RelationColumn],
    ) -> (Vec<CatalogColumn>, bool) {
        let then = oid
            .and_then(|o| self.ddl_shapes.get(&o))
            .map(|shape| catalog_as_fields(ddl::as_of(shape, &now)))
            // Another DDL since that the trigger does not see (a type dropped with its
            // columns, say): the message tells, and the catalog of now is used.
            .filter(|then| {
                then.len() == columns.len()
                    && then
                        .iter()
                        .zip(columns)
                        .all(|(k, c)| k.name == c.name && k.type_oid == c.type_oid)
            });
        match then {
            Some(then) => (then, true),
            None => (catalog_as_fields(now), false),
        }
    }

    /// Register (or re-register after DDL) a configured relation; returns its table index.
    ///
    /// `source` is the table as configured (its Iceberg table and metric labels); `schema` and
    /// `name` are what the source calls it now (they differ after `ALTER TABLE … RENAME`).
    pub(super) async fn relation(
        &mut self,
        source: &str,
        schema: &str,
        name: &str,
        oid: Option<u32>,
        columns: Vec<RelationColumn>,
    ) -> Result<usize, PipelineError> {
        let source_name = source.to_string();
        let full_identity = self
            .full_identity
            .get(&format!("{schema}.{name}"))
            .map(|pk| {
                columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| pk.contains(&c.name))
                    .map(|(i, _)| i)
                    .collect::<Vec<usize>>()
            });
        let columns = as_fields(columns);
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| t.source_name == source_name)
        {
            // A keyless table turned FULL has the same columns and flags, another identity.
            let was = std::mem::replace(&mut self.tables[i].full_identity, full_identity.clone());
            // A column dropped and added again in its old place looks the same: only the
            // catalog's numbers tell, and only for a message sent after a change (the first
            // of an attempt may be older than the catalog).
            let mut described = match (oid, self.tables[i].relation_streamed) {
                (None, _) => Described::Catalog,
                (Some(_), false) => Described::FirstMessage,
                (Some(_), true) => Described::AfterAChange,
            };
            self.tables[i].relation_streamed |= oid.is_some();
            let unchanged = !self.tables[i].pending
                && !self.tables[i].replayed_shape
                && self.tables[i].columns == columns
                && was == full_identity;
            // A DDL message tells what a message that looks unchanged is (names swapped).
            let told = oid.is_some_and(|o| self.ddl_shapes.contains_key(&o));
            if unchanged && described != Described::AfterAChange && !told {
                return Ok(i);
            }
            // Read once: for the numbers of a message that looks unchanged, and to follow a
            // change.
            let now = self.catalog_columns(schema, name, oid).await?;
            let (catalog, exact) = self.catalog_at_message(oid, now, &columns);
            if exact {
                // The numbers are of the message's time, whatever it follows.
                described = Described::AfterAChange;
            }
            if unchanged && !self.renumbered(i, &catalog)? {
                return Ok(i);
            }
            // The table changed shape: write what was buffered with the old layout first,
            // then follow the change (renames by column number, promotions in place, other
            // type changes beside the old column) in both tables.
            // A schema update commits at once, the rows before it at the next flush: a replay
            // after a crash in between meets their older Relation messages after the change.
            // Each table records where its schema changed, and such a message is placed
            // through the schema of its time there (`replayed_names`), not followed again.
            // When the change comes first in its transaction, what is buffered is of whole
            // transactions: committed first, so less is replayed (after the catalog is read,
            // which should be as near the message's point as it can).
            let at = self.txn.filter(|_| oid.is_some()).map(|t| (t.lsn, t.seq));
            let t = &self.tables[i];
            let then = |sink: &TableSink| match at {
                Some((lsn, seq)) => replayed_names(sink, &columns, lsn, seq),
                None => Ok(None),
            };
            let replayed = then(&t.sink)?;
            let replayed_mirror = match &t.mirror {
                Some(m) => then(m)?,
                None => None,
            };
            let follows = replayed.is_none() || (t.mirror.is_some() && replayed_mirror.is_none());
            if follows
                && oid.is_some()
                && self.in_stream.is_none()
                && self.txn.is_some_and(|t| t.seq == 0)
                && self.anything_uncommitted()
            {
                // Confirmed at the next flush (the stream is not at hand here).
                self.commit_buffered(None).await?;
            }
            let lsn = self.change_lsn();
            self.close_files(i).await?;
            let t = &mut self.tables[i];
            // A table copied in this attempt holds the source as of the copy, keyed as the
            // source is keyed now: a replayed relation (its transaction is in the table) has
            // an older key, which must not key the copied rows again.
            let hold_key = t.copied && already_committed(lsn, t.sink.last_lsn);
            let key = |now: Option<MirrorKey>| {
                (!hold_key).then(|| wanted_key(&columns, full_identity.as_deref(), now))
            };
            let k = key(t.sink.mirror_key());
            let recorded = at.map(|(_, seq)| seq);
            let Evolved { mut changes, stale } = match replayed {
                Some(_) => Evolved::default(),
                None => {
                    let at = (lsn, recorded);
                    evolve(&mut t.sink, &columns, &catalog, at, k.as_ref(), described).await?
                }
            };
            if let Some(m) = t.mirror.as_mut().filter(|_| replayed_mirror.is_none()) {
                m.finish_files().await?;
                let k = key(m.mirror_key());
                let at = (lsn, recorded);
                let e = evolve(m, &columns, &catalog, at, k.as_ref(), described).await?;
                // The changelog has the column changes too; only the mirror has a key.
                changes.extend(
                    e.changes
                        .into_iter()
                        .filter(|c| matches!(c, ColumnChange::Key(_))),
                );
            }
            // A pending table's columns are the catalog's, not what the schema followed; a
            // replayed message changes nothing.
            let before: &[RelationColumn] = if t.pending || replayed.is_some() {
                &[]
            } else {
                &t.columns
            };
            report_changes(&self.metrics, &t.source_name, before, &columns, &changes);
            t.pending = false;
            // The batch's columns under the names of the fields holding them now; the
            // mirror takes them under its own.
            let named = |names: &Option<Vec<String>>, j: usize| {
                names
                    .as_ref()
                    .map_or(columns[j].name.clone(), |n| n[j].clone())
            };
            t.mirror_names = (0..columns.len())
                .map(|j| (named(&replayed, j), named(&replayed_mirror, j)))
                .filter(|(from, to)| from != to)
                .collect();
            t.replayed_shape = replayed.is_some() || replayed_mirror.is_some();
            let oids: HashMap<String, u32> = (0..columns.len())
                .map(|j| (named(&replayed, j), binary_oid(&columns[j], &catalog)))
                .collect();
            let placed: Vec<RelationColumn> = (0..columns.len())
                .map(|j| RelationColumn {
                    name: named(&replayed, j),
                    ..columns[j].clone()
                })
                .collect();
            t.batch = TableBatch::new(
                t.sink.batch_schema(),
                t.sink.batch_arrow_schema(),
                &placed,
                |c| oids.get(&c.name).copied().unwrap_or(c.type_oid),
            )?;
            t.sink
                .set_key_columns(placed.iter().filter(|c| c.key).map(|c| c.name.clone()));
            t.columns = columns;
            if stale {
                StaleRowsAfterSchemaChange {
                    table: &t.source_name,
                }
                .emit();
            }
            return Ok(i);
        }
        let now = self.catalog_columns(schema, name, oid).await?;
        let (catalog, exact) = self.catalog_at_message(oid, now, &columns);
        let lsn = self.change_lsn();
        // A streamed message's place, where a schema change it makes is recorded.
        let at = self.txn.filter(|_| oid.is_some()).map(|t| t.seq);
        // Domains and arrays of domains or enums take their base type in new tables.
        let model: Vec<_> = columns
            .iter()
            .map(|c| {
                let mut m = c.to_model();
                m.kind = wanted_kind(c, &catalog);
                m
            })
            .collect();
        // Whether the schema change left rows without values no change carries.
        let mut stale = false;
        let (cfg_schema, cfg_name) = source.split_once('.').unwrap_or(("public", source));
        let table_name = iceberg_table_name(cfg_schema, cfg_name);
        let mode = self.cfg.mode_for(&source_name);
        let mut mirror = if mode.mirror() {
            Some(
                TableSink::open_mirror(
                    self.committer.clone(),
                    &self.namespace,
                    &table_name,
                    MirrorSource {
                        table: &source_name,
                        columns: &model,
                        index_budget: self.cfg.mirror_index_memory,
                        compaction: self.options.mirror_compaction,
                        whole_row: full_identity.as_ref().is_some_and(|k| k.is_empty()),
                    },
                    &self.options.properties,
                    self.secrets.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let mut changelog = if mode.changelog() {
            let changelog_name = if mode.mirror() {
                format!("{table_name}{CHANGELOG_SUFFIX}")
            } else {
                table_name
            };
            let cols = model.clone();
            Some(
                TableSink::open_or_create(
                    self.committer.clone(),
                    &self.namespace,
                    &changelog_name,
                    Some(&source_name),
                    move || {
                        let s = changelog_schema(&cols)?;
                        let p = changelog_partition(&s)?;
                        Ok((s, Some(p)))
                    },
                    &self.options.properties,
                    self.secrets.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        // Registered from the catalog before streaming (`oid` none), a table that was copied
        // and streamed before keeps its schema: the stream first replays what it did not
        // commit, with Relation messages of that time, and follows the changes made since in
        // their place. Evolved to the catalog now, the replayed rows of a column renamed
        // while the agent was stopped went to a new column under the old name.
        let state = changelog.as_ref().or(mirror.as_ref());
        let pending = oid.is_none()
            && state.is_some_and(|s| s.snapshot_done())
            && changelog
                .iter()
                .chain(mirror.iter())
                .all(|s| s.property(SOURCE_COLUMNS_PROPERTY).is_some());
        let mut changes = Vec::new();
        let described = match (oid, exact) {
            (None, _) => Described::Catalog,
            (Some(_), false) => Described::FirstMessage,
            (Some(_), true) => Described::AfterAChange,
        };
        if !pending {
            if let Some(m) = mirror.as_mut() {
                // The key as the source has it now: a table whose key changed while the agent
                // was stopped (or created again with another) has the old one in its metadata.
                let k = wanted_key(&columns, full_identity.as_deref(), m.mirror_key());
                let e = evolve(m, &columns, &catalog, (lsn, at), Some(&k), described).await?;
                stale = e.stale;
                changes = e.changes;
            }
            if let Some(c) = changelog.as_mut() {
                let e = evolve(c, &columns, &catalog, (lsn, at), None, described).await?;
                stale = e.stale;
                // The changelog reports the column changes; only the mirror has a key.
                changes.retain(|c| matches!(c, ColumnChange::Key(_)));
                changes.splice(0..0, e.changes);
            }
            report_changes(&self.metrics, &source_name, &[], &columns, &changes);
        }
        let confirmed = self.positions.confirmed();
        for s in changelog.iter_mut().chain(mirror.iter_mut()) {
            s.set_confirmed(confirmed);
        }
        let (mut sink, mirror) = match changelog {
            Some(c) => (c, mirror),
            None => match mirror {
                Some(m) => (m, None),
                None => {
                    return Err(PipelineError::State(format!(
                        "table {source_name}: its mode writes no table"
                    )))
                }
            },
        };
        // Until its first Relation message the table's builders hold the columns the schema has.
        let batch_columns: Vec<RelationColumn> = if pending {
            columns
                .iter()
                .filter(|c| sink.schema().field_by_name(&c.name).is_some())
                .cloned()
                .collect()
        } else {
            columns.clone()
        };
        sink.set_key_columns(
            batch_columns
                .iter()
                .filter(|c| c.key)
                .map(|c| c.name.clone()),
        );
        let metrics = self.metrics.table(&source_name);
        let iceberg_name = sink.name();
        let committed = sink.last_lsn;
        self.tables.push(TableState {
            source_name: source_name.clone(),
            current: format!("{schema}.{name}"),
            batch: TableBatch::new(
                sink.batch_schema(),
                sink.batch_arrow_schema(),
                &batch_columns,
                |c| binary_oid(c, &catalog),
            )?,
            sink,
            mirror,
            columns,
            metrics,
            dirty: false,
            touched_in: Lsn::ZERO,
            fresh: Vec::new(),
            counts: [0; 4],
            counted: [0; 4],
            full_identity,
            copied: false,
            relation_streamed: oid.is_some(),
            pending,
            replayed_shape: false,
            mirror_names: Vec::new(),
        });
        let i = self.tables.len() - 1;
        status::update(&self.status, |s| {
            let e = s.tables.entry(source_name).or_default();
            e.iceberg_table = iceberg_name;
            e.committed_lsn = committed.pg();
        });
        if stale {
            StaleRowsAfterSchemaChange {
                table: &self.tables[i].source_name,
            }
            .emit();
        }
        Ok(i)
    }
}
