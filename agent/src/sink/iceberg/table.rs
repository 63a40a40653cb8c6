//! One Iceberg table: Parquet data files written as batches fill, committed as one `append`
//! snapshot through our own commit path at flush time, with the source commit LSN in the
//! snapshot summary and the table properties.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use iceberg::arrow::schema_to_arrow_schema;
use iceberg::spec::{DataFile, Schema, UnboundPartitionSpec};
use iceberg::table::Table;
use iceberg::{Catalog, ErrorKind, NamespaceIdent, TableCreation, TableIdent, TableUpdate};

use super::commit::{is_data, operation_for, Change, CommitError, Committer};
use super::early::{self, EarlyFile};
use super::evolve::ColumnChange;
use super::mirror::{CompactRules, Compacted, MirrorKey, MirrorWriter, Rekeyed};
use super::schema::{
    changelog_shape, format_schema_before, mirror_schema, parse_schema_before, writer_id,
    SchemaBefore, FENCED_PROPERTIES, LSN_PROPERTY, MIRROR_PROPERTY, SCHEMA_BEFORE_PROPERTY,
    SNAPSHOT_PROGRESS_PROPERTY, SNAPSHOT_PROPERTY, WRITER_PROPERTY,
};
use super::writer::OpenFiles;
use super::SinkError;
use crate::model::{Column, Lsn};

/// Attempts at a commit when other writers keep committing first.
const COMMIT_ATTEMPTS: u32 = 5;

/// Result of one data-file write.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Files produced.
    pub files: u64,
    /// Bytes in them.
    pub bytes: u64,
}

/// Result of a commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Committed {
    /// Commit conflicts resolved by finishing the append again on the new table state.
    pub conflicts: u32,
    /// Position delete files committed (mirror tables).
    pub delete_files: u64,
    /// Rows those files delete.
    pub rows_deleted: u64,
}

/// Table properties a schema update sets and removes, in the same commit.
#[derive(Debug, Clone, Default)]
pub struct PropertyChanges {
    /// Set (or replaced).
    pub set: HashMap<String, String>,
    /// Removed.
    pub remove: Vec<String>,
}

/// What every table of a pipeline shares.
#[derive(Debug, Clone)]
pub struct TableOptions {
    /// Properties set on the tables it creates (metadata hygiene).
    pub properties: Arc<[(String, String)]>,
    /// When mirror tables' files are compacted (`None`: maintenance is off).
    pub mirror_compaction: Option<CompactRules>,
}

/// The source table a mirror holds.
#[derive(Debug, Clone, Copy)]
pub struct MirrorSource<'a> {
    /// `schema.table`.
    pub table: &'a str,
    /// Its columns, the key among them.
    pub columns: &'a [Column],
    /// Most bytes its key index may hold.
    pub index_budget: u64,
    /// When its files are compacted (`None`: never, maintenance is off).
    pub compaction: Option<CompactRules>,
    /// No key columns, yet rows are identified by all their values (REPLICA IDENTITY FULL
    /// without a primary key): a change names the whole old row, duplicates may exist.
    pub whole_row: bool,
}

/// A changelog (or dead-letter) table with its uncommitted data files.
pub struct TableSink {
    committer: Committer,
    table: Table,
    arrow_schema: SchemaRef,
    /// Highest source commit LSN this table holds (`philotes.lsn` of its last commit by us).
    pub last_lsn: Lsn,
    pending: Vec<DataFile>,
    pending_rows: u64,
    /// Arrow bytes of the rows in `pending_rows` (what they weighed in memory).
    pending_bytes: u64,
    /// Data files being written (not yet in `pending`).
    open: Option<OpenFiles>,
    /// A mirror table: changes are folded by key into data and position delete files.
    mirror: Option<Box<MirrorWriter>>,
    /// The schema batches for this table are built in (a mirror's adds the CDC columns).
    batch_schema: Option<(Schema, SchemaRef)>,
    secrets: Arc<[String]>,
    /// What the source confirmed: it never sends a transaction before this again.
    confirmed: Lsn,
    /// Columns written without a Parquet dictionary: a changelog's source key.
    unique: Arc<[String]>,
}

fn catalog_err(e: iceberg::Error, secrets: &[String]) -> SinkError {
    SinkError::Catalog(super::catalog::scrub(e.to_string(), secrets))
}

/// Ensure `ns` exists.
pub async fn ensure_namespace(
    catalog: &dyn Catalog,
    ns: &str,
    secrets: &[String],
) -> Result<(), SinkError> {
    let ident = NamespaceIdent::new(ns.to_string());
    if catalog
        .namespace_exists(&ident)
        .await
        .map_err(|e| catalog_err(e, secrets))?
    {
        return Ok(());
    }
    match catalog.create_namespace(&ident, HashMap::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NamespaceAlreadyExists => Ok(()),
        Err(e) => Err(catalog_err(e, secrets)),
    }
}

/// Highest `philotes.lsn` of the table: the table property, or the newest along the current
/// snapshot's ancestry (other writers may commit too; tables written before the property).
pub fn committed_lsn(table: &Table) -> Lsn {
    let md = table.metadata();
    let from_property = md
        .properties()
        .get(LSN_PROPERTY)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Lsn)
        .unwrap_or(Lsn::ZERO);
    let mut cur = md.current_snapshot();
    while let Some(s) = cur {
        if let Some(v) = s.summary().additional_properties.get(LSN_PROPERTY) {
            if let Ok(lsn) = v.parse::<u64>() {
                return Lsn(lsn).max(from_property);
            }
        }
        cur = s.parent_snapshot_id().and_then(|id| md.snapshot_by_id(id));
    }
    from_property
}

/// Whether the table properties, or a snapshot in the current ancestry, carry every one of
/// `props`.
fn has_properties(table: &Table, props: &[(&str, &str)]) -> bool {
    let md = table.metadata();
    if props
        .iter()
        .all(|(k, v)| md.properties().get(*k).map(String::as_str) == Some(*v))
    {
        return true;
    }
    let mut cur = md.current_snapshot();
    while let Some(s) = cur {
        let p = &s.summary().additional_properties;
        if props
            .iter()
            .all(|(k, v)| p.get(*k).map(String::as_str) == Some(*v))
        {
            return true;
        }
        cur = s.parent_snapshot_id().and_then(|id| md.snapshot_by_id(id));
    }
    false
}

/// Table property marking the tables the agent created (the ones its maintenance looks after).
pub const CREATED_BY_PROPERTY: &str = "philotes.created-by";
/// Set once every live data file's column bounds are known to hold its rows: at creation
/// (the agent writes exact statistics), or by maintenance after it repaired the files of a
/// table written before (`maintenance/repair.rs`).
pub const BOUNDS_PROPERTY: &str = "philotes.bounds-checked";

/// Table property naming the source table an Iceberg table holds (`schema.table`).
pub const SOURCE_TABLE_PROPERTY: &str = "philotes.source-table";

/// Table `ident`'s properties, or None when the catalog has no such table.
pub async fn properties_of(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    secrets: &[String],
) -> Result<Option<HashMap<String, String>>, SinkError> {
    if !catalog
        .table_exists(ident)
        .await
        .map_err(|e| catalog_err(e, secrets))?
    {
        return Ok(None);
    }
    let table = catalog
        .load_table(ident)
        .await
        .map_err(|e| catalog_err(e, secrets))?;
    Ok(Some(table.metadata().properties().clone()))
}

/// Set and remove properties of table `ident` in one metadata commit (no new snapshot), for
/// state that must be recorded before the table is opened for writing.
pub async fn update_properties(
    committer: &Committer,
    ident: &TableIdent,
    changes: PropertyChanges,
    secrets: &[String],
) -> Result<(), SinkError> {
    let table = committer
        .catalog()
        .load_table(ident)
        .await
        .map_err(|e| catalog_err(e, secrets))?;
    let updates = std::iter::once(TableUpdate::SetProperties {
        updates: changes.set,
    })
    .chain(
        (!changes.remove.is_empty()).then_some(TableUpdate::RemoveProperties {
            removals: changes.remove,
        }),
    )
    .collect();
    committer
        .commit_updates(&table, Vec::new(), updates)
        .await
        .map_err(|e| SinkError::Commit(super::catalog::scrub(e.to_string(), secrets)))?;
    Ok(())
}

impl TableSink {
    /// Load `ns.name`, or create it with `schema` (and `partition`, if any) when missing.
    /// With `source`, the table records the source table it holds (`philotes.source-table`),
    /// and a table that holds another one is refused.
    pub async fn open_or_create(
        committer: Committer,
        ns: &str,
        name: &str,
        source: Option<&str>,
        schema: impl FnOnce() -> Result<(Schema, Option<UnboundPartitionSpec>), iceberg::Error>,
        properties: &[(String, String)],
        secrets: Arc<[String]>,
    ) -> Result<Self, SinkError> {
        let ident = TableIdent::new(NamespaceIdent::new(ns.to_string()), name.to_string());
        let catalog = committer.catalog().clone();
        let exists = catalog
            .table_exists(&ident)
            .await
            .map_err(|e| catalog_err(e, &secrets))?;
        let table = if exists {
            catalog
                .load_table(&ident)
                .await
                .map_err(|e| catalog_err(e, &secrets))?
        } else {
            let (schema, partition) = schema().map_err(|e| SinkError::Config(e.to_string()))?;
            let creation = TableCreation::builder()
                .name(name.to_string())
                .schema(schema)
                .properties(
                    HashMap::from([
                        (
                            "write.parquet.compression-codec".to_string(),
                            "zstd".to_string(),
                        ),
                        (CREATED_BY_PROPERTY.to_string(), "philotes".to_string()),
                        (BOUNDS_PROPERTY.to_string(), "true".to_string()),
                    ])
                    .into_iter()
                    .chain(source.map(|s| (SOURCE_TABLE_PROPERTY.to_string(), s.to_string())))
                    .chain(properties.iter().cloned())
                    .collect::<HashMap<_, _>>(),
                );
            let creation = match partition {
                Some(p) => creation.partition_spec(p).build(),
                None => creation.build(),
            };
            tracing::info!(table = %format!("{ns}.{name}"), "creating Iceberg table");
            match catalog
                .create_table(&NamespaceIdent::new(ns.to_string()), creation)
                .await
            {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::TableAlreadyExists => catalog
                    .load_table(&ident)
                    .await
                    .map_err(|e| catalog_err(e, &secrets))?,
                Err(e) => return Err(catalog_err(e, &secrets)),
            }
        };
        if let (Some(want), Some(has)) = (
            source,
            table.metadata().properties().get(SOURCE_TABLE_PROPERTY),
        ) {
            if want != has {
                return Err(SinkError::Config(format!(
                    "Iceberg table {ns}.{name} holds source table {has}, not {want}: the two \
                     names map to the same Iceberg table; stream one of them in a pipeline \
                     with its own namespace"
                )));
            }
        }
        Self::from_table(committer, table, secrets)
    }

    fn from_table(
        committer: Committer,
        table: Table,
        secrets: Arc<[String]>,
    ) -> Result<Self, SinkError> {
        let arrow_schema = Arc::new(
            schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(|e| SinkError::Config(e.to_string()))?,
        );
        let last_lsn = committed_lsn(&table);
        Ok(Self {
            committer,
            table,
            arrow_schema,
            last_lsn,
            pending: Vec::new(),
            pending_rows: 0,
            pending_bytes: 0,
            open: None,
            mirror: None,
            batch_schema: None,
            secrets,
            confirmed: Lsn::ZERO,
            unique: Arc::from([]),
        })
    }

    /// The source confirmed `lsn` and never sends a transaction before it again: the next
    /// commit drops the schema-change entries of before it ([`SCHEMA_BEFORE_PROPERTY`]).
    pub fn set_confirmed(&mut self, lsn: Lsn) {
        self.confirmed = self.confirmed.max(lsn);
    }

    /// The recorded schema changes the source may still send again (at or after what it
    /// confirmed); a property that cannot be read is an error naming it.
    fn schema_changes_ahead(&self) -> Result<Vec<SchemaBefore>, String> {
        let mut entries = match self
            .table
            .metadata()
            .properties()
            .get(SCHEMA_BEFORE_PROPERTY)
        {
            Some(v) => parse_schema_before(v)?,
            None => Vec::new(),
        };
        entries.retain(|e| e.lsn >= self.confirmed.get());
        Ok(entries)
    }

    /// The source's key columns (by the names of the fields holding them): unique within a
    /// file, they are written without a dictionary from the next file on.
    pub fn set_key_columns(&mut self, names: impl IntoIterator<Item = String>) {
        self.unique = names.into_iter().collect();
    }

    /// A mirror's live rows without a value in a key column (0 for a changelog).
    pub fn rows_without_key(&self) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.rows_without_key())
    }

    /// Whether this is a mirror table (not a changelog).
    pub fn is_mirror(&self) -> bool {
        self.mirror.is_some()
    }

    /// The table's last sequence number (every commit takes the next one).
    pub fn sequence_number(&self) -> i64 {
        self.table.metadata().last_sequence_number()
    }

    /// A mirror: a copy taken again, whose truncate marker is at `marker`, replaces the rows
    /// committed up to sequence number `before` at its end instead of emptying the mirror
    /// first. `false` when the mirror cannot (no key) or this is a changelog.
    pub fn replace_from(&mut self, marker: Lsn, before: i64) -> bool {
        self.mirror
            .as_mut()
            .is_some_and(|m| m.replace_from(marker, before))
    }

    /// A mirror: the next commit ends the copy replacing its rows.
    pub fn finish_replacing(&mut self) {
        if let Some(m) = self.mirror.as_mut() {
            m.finish_replacing();
        }
    }

    /// A mirror's key (`None` for a changelog).
    pub fn mirror_key(&self) -> Option<MirrorKey> {
        self.mirror.as_ref().map(|m| m.key(&self.table))
    }

    /// Whether a mirror's identifier fields are not what `key` gives them (a key changed
    /// while the agent was stopped, or a table created again with another key: the index
    /// is opened by the new key, the table's metadata still names the old one).
    pub fn identifiers_lag(&self, key: &MirrorKey) -> bool {
        if self.mirror.is_none() {
            return false;
        }
        let md = self.table.metadata();
        let schema = md.current_schema();
        // Sets: the ids come out of a hash set, in another order from another schema (a
        // composite key looked changed at every start and schema change, and the mirror was
        // keyed again, every row read back, for nothing).
        let now: std::collections::BTreeSet<i32> = schema.identifier_field_ids().collect();
        super::evolve::apply(
            schema,
            md.last_column_id(),
            &[ColumnChange::Key(key.clone())],
        )
        .is_ok_and(|s| {
            s.identifier_field_ids()
                .collect::<std::collections::BTreeSet<_>>()
                != now
        })
    }

    /// Load or create the mirror table `ns.name` of `source`; the key index is rebuilt from
    /// the table.
    pub async fn open_mirror(
        committer: Committer,
        ns: &str,
        name: &str,
        source: MirrorSource<'_>,
        properties: &[(String, String)],
        secrets: Arc<[String]>,
    ) -> Result<Self, SinkError> {
        let MirrorSource {
            table: source,
            columns,
            index_budget,
            compaction,
            whole_row,
        } = source;
        let cols = columns.to_vec();
        let props: Vec<(String, String)> = properties
            .iter()
            .cloned()
            .chain([(MIRROR_PROPERTY.to_string(), "true".to_string())])
            .collect();
        let mut sink = Self::open_or_create(
            committer,
            ns,
            name,
            Some(source),
            move || Ok((mirror_schema(&cols)?, None)),
            &props,
            secrets,
        )
        .await?;
        if sink
            .table
            .metadata()
            .properties()
            .get(MIRROR_PROPERTY)
            .map(String::as_str)
            != Some("true")
        {
            return Err(SinkError::Config(format!(
                "Iceberg table {} exists and is not a mirror table (no {MIRROR_PROPERTY} \
                 property): choose another namespace for mode \"mirror\"",
                sink.name()
            )));
        }
        let mut keys: Vec<String> = columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect();
        // A key column the table does not have yet (the key moved to a new column while the
        // agent was stopped, or the table was created again with one): open by the key the
        // rows were written under; the schema change that adds the column keys them again.
        let schema = sink.table.metadata().current_schema();
        if keys.iter().any(|k| schema.field_by_name(k).is_none()) {
            keys = schema
                .identifier_field_ids()
                .filter_map(|id| schema.name_by_field_id(id).map(str::to_string))
                .collect();
        }
        let mirror =
            MirrorWriter::open(&sink.table, keys, whole_row, index_budget, compaction).await?;
        tracing::info!(
            table = %sink.name(),
            keys = mirror.keys(),
            index_bytes = mirror.index_bytes(),
            build_ms = mirror.built_in.as_millis() as u64,
            "mirror key index built from the table"
        );
        sink.mirror = Some(Box::new(mirror));
        sink.set_batch_schema()?;
        Ok(sink)
    }

    fn set_batch_schema(&mut self) -> Result<(), SinkError> {
        if self.mirror.is_none() {
            return Ok(());
        }
        let shape = changelog_shape(self.table.metadata().current_schema())
            .map_err(|e| SinkError::Config(e.to_string()))?;
        let arrow =
            Arc::new(schema_to_arrow_schema(&shape).map_err(|e| SinkError::Config(e.to_string()))?);
        self.batch_schema = Some((shape, arrow));
        Ok(())
    }

    /// The mirror's key index: keys held and their bytes (`None` for a changelog).
    pub fn mirror_index(&self) -> Option<(u64, u64)> {
        self.mirror
            .as_ref()
            .map(|m| (m.keys() as u64, m.index_bytes()))
    }

    /// The schema a batch for this table is built in (a changelog's own; a mirror's columns
    /// with the CDC columns it folds by).
    pub fn batch_schema(&self) -> &Schema {
        match &self.batch_schema {
            Some((s, _)) => s,
            None => self.schema(),
        }
    }

    /// Arrow form of [`Self::batch_schema`].
    pub fn batch_arrow_schema(&self) -> SchemaRef {
        match &self.batch_schema {
            Some((_, a)) => a.clone(),
            None => self.arrow_schema(),
        }
    }

    /// The table's current Iceberg schema.
    pub fn schema(&self) -> &Schema {
        self.table.metadata().current_schema()
    }

    /// Arrow schema (with field ids) that batches for this table must use.
    pub fn arrow_schema(&self) -> SchemaRef {
        self.arrow_schema.clone()
    }

    /// `namespace.table`.
    pub fn name(&self) -> String {
        let id = self.table.identifier();
        format!("{}.{}", id.namespace().join("."), id.name())
    }

    /// Arrow bytes handed to the data files and not yet committed.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Rows written to data files and not yet committed.
    pub fn pending_rows(&self) -> u64 {
        self.pending_rows
    }

    /// Apply `changes` to the table's columns in one schema update, with `properties` set in
    /// the same commit; batches must be rebuilt afterwards. A mirror reloads its key index
    /// (its key columns may have a new name or type), or keys its rows again for a new key.
    ///
    /// `numbers` gives a source number for columns by name; the property `numbers_property`
    /// then records `field:number,…` for the fields holding them, in the same commit.
    pub async fn change_columns(
        &mut self,
        changes: &[ColumnChange],
        properties: PropertyChanges,
        numbers_property: &str,
        numbers: &HashMap<String, i32>,
    ) -> Result<Option<Rekeyed>, SinkError> {
        let PropertyChanges {
            set: mut properties,
            remove,
        } = properties;
        let md = self.table.metadata();
        let (current, last) = (md.current_schema_id(), md.last_column_id());
        let schema = super::evolve::apply(md.current_schema(), last, changes)?;
        let mut record: Vec<(i32, i32)> = schema
            .as_struct()
            .fields()
            .iter()
            .filter_map(|f| Some((f.id, *numbers.get(&f.name)?)))
            .collect();
        record.sort_unstable();
        let record = record
            .iter()
            .map(|(f, n)| format!("{f}:{n}"))
            .collect::<Vec<_>>()
            .join(",");
        if !numbers.is_empty() && md.properties().get(numbers_property) != Some(&record) {
            properties.insert(numbers_property.to_string(), record);
        }
        if changes.is_empty() && properties.is_empty() && remove.is_empty() {
            return Ok(None);
        }
        let removals =
            (!remove.is_empty()).then_some(TableUpdate::RemoveProperties { removals: remove });
        if changes.is_empty() {
            // Only properties: the schema stays (no new schema id).
            let updates = std::iter::once(TableUpdate::SetProperties {
                updates: properties,
            })
            .chain(removals)
            .collect();
            let table = self
                .committer
                .commit_updates(&self.table, Vec::new(), updates)
                .await
                .map_err(|e| {
                    SinkError::Commit(super::catalog::scrub(e.to_string(), &self.secrets))
                })?;
            self.fence_on(&table)?;
            self.table = table;
            // A whole-row mirror key follows the columns the source has now: a dropped
            // column leaves it (its field stays, null from now on).
            if let Some(m) = self.mirror.as_mut() {
                m.schema_changed(&self.table).await?;
            }
            return Ok(None);
        }
        // Files being written have the old schema: finish them first.
        self.finish_files().await?;
        let (requirements, mut updates) = super::evolve::updates(current, last, schema, properties);
        updates.extend(removals);
        let table = self
            .committer
            .commit_updates(&self.table, requirements, updates)
            .await
            .map_err(|e| SinkError::Commit(super::catalog::scrub(e.to_string(), &self.secrets)))?;
        self.fence_on(&table)?;
        self.arrow_schema = Arc::new(
            schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(|e| SinkError::Config(e.to_string()))?,
        );
        self.table = table;
        // A new key: the mirror's rows are keyed again (a changelog has no key).
        let key = changes.iter().find_map(|c| match c {
            ColumnChange::Key(k) => Some(k),
            _ => None,
        });
        let mut rekeyed = None;
        if let Some(m) = self.mirror.as_mut() {
            if let Some(k) = key {
                m.set_schema(&self.table)?;
                rekeyed = m.set_key(&self.table, k).await?;
            }
            if rekeyed.is_none() {
                m.schema_changed(&self.table).await?;
            }
        }
        self.set_batch_schema()?;
        Ok(rekeyed)
    }

    /// Commit `properties` alone (no schema change, no data: what is written stays pending).
    pub async fn set_properties(&mut self, properties: PropertyChanges) -> Result<(), SinkError> {
        let no_numbers = HashMap::new();
        self.change_columns(&[], properties, "", &no_numbers)
            .await
            .map(|_| ())
    }

    /// Queue `batch` for the table's open data files (opened on first use); it stays pending
    /// until `commit`. Returns once the writer task has taken it.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), SinkError> {
        self.write_moved(batch, &[]).await
    }

    /// [`Self::write`], where the rows `moved` (ascending) are updates that changed their
    /// key, each right after its old key's delete: a mirror takes the values such a row did
    /// not send from the old key's row. A changelog stores the rows as they are.
    pub async fn write_moved(
        &mut self,
        batch: RecordBatch,
        moved: &[u32],
    ) -> Result<(), SinkError> {
        self.pending_rows += batch.num_rows() as u64;
        self.pending_bytes += batch.get_array_memory_size() as u64;
        if let Some(m) = self.mirror.as_mut() {
            return m.push(&self.table, &batch, moved, self.last_lsn).await;
        }
        let open = self
            .open
            .get_or_insert_with(|| OpenFiles::open(&self.table, self.unique.clone()));
        let sent = open.send(batch).await;
        if sent.is_err() {
            self.open = None;
        }
        sent
    }

    /// Queue many batches at once (a large transaction converted before its commit): they
    /// are spread over two writers, whose tasks encode on two cores, into two sets of files.
    /// A mirror takes them in order through [`Self::write_moved`] (each batch with its moved
    /// rows). Returns what the second set of files holds (already finished; the first stays
    /// open like `write`'s).
    pub async fn write_spread(
        &mut self,
        batches: Vec<(RecordBatch, Vec<u32>)>,
    ) -> Result<Written, SinkError> {
        if self.mirror.is_some() || batches.len() < 4 {
            for (b, moved) in batches {
                self.write_moved(b, &moved).await?;
            }
            return Ok(Written::default());
        }
        let mut second = OpenFiles::open(&self.table, self.unique.clone());
        for (i, (b, _)) in batches.into_iter().enumerate() {
            if i % 2 == 0 {
                self.write(b).await?;
            } else {
                self.pending_rows += b.num_rows() as u64;
                self.pending_bytes += b.get_array_memory_size() as u64;
                second.send(b).await?;
            }
        }
        let files = second.close().await?;
        Ok(self.add_pending(files))
    }

    /// A file for this table's rows of a large streamed transaction, encoded while it
    /// streams ([`EarlyFile`]); None for a mirror, or a table partitioned by a source column
    /// (its rows could fall in many partitions).
    pub fn early_file(&self) -> Option<EarlyFile> {
        if self.mirror.is_some()
            || self.batch_schema.is_some()
            || !early::follows_commit(&self.table)
        {
            return None;
        }
        Some(EarlyFile::open(
            &self.table,
            self.arrow_schema.clone(),
            self.unique.clone(),
        ))
    }

    /// Finish `file` with its transaction's commit `lsn` and time: it joins the pending files
    /// (committed by `commit`). Returns what it holds.
    pub async fn add_early(
        &mut self,
        file: EarlyFile,
        lsn: Lsn,
        ts_micros: i64,
    ) -> Result<Written, SinkError> {
        let (rows, bytes) = (file.rows(), file.bytes());
        let f = file
            .finish(&self.table, lsn.get() as i64, ts_micros)
            .await?;
        self.pending_rows += rows;
        self.pending_bytes += bytes;
        Ok(self.add_pending(vec![f]))
    }

    /// Finished data files join the pending ones; returns what they hold.
    fn add_pending(&mut self, files: Vec<DataFile>) -> Written {
        let written = Written {
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.file_size_in_bytes()).sum(),
        };
        self.pending.extend(files);
        written
    }

    /// Whether data files are being written (a writer task is open).
    pub fn has_open_files(&self) -> bool {
        self.open.is_some() || self.mirror.as_ref().is_some_and(|m| m.has_open_file())
    }

    /// Finish the open data files (if any): they join the pending ones. Returns what was
    /// written by them.
    pub async fn finish_files(&mut self) -> Result<Written, SinkError> {
        if let Some(m) = self.mirror.as_mut() {
            let (files, bytes) = m.finish_files().await?;
            return Ok(Written { files, bytes });
        }
        let Some(open) = self.open.take() else {
            return Ok(Written::default());
        };
        let files = open.close().await?;
        Ok(self.add_pending(files))
    }

    /// Commit pending files with `philotes.lsn = lsn`. Safe to call again after a failure:
    /// if the previous attempt did land (ambiguous failure), nothing is appended twice.
    ///
    /// When another writer committed since our last look, the append is finished again on the
    /// new table state (appends commute); each such turn is counted in `conflicts`.
    pub async fn commit(&mut self, lsn: Lsn) -> Result<Committed, SinkError> {
        self.commit_with(lsn, &[]).await
    }

    /// Whether an initial snapshot of this table was committed (`philotes.snapshot = done`,
    /// a table property that survives snapshot expiry; older tables have it only in a
    /// snapshot summary).
    pub fn snapshot_done(&self) -> bool {
        let md = self.table.metadata();
        // The property, once there, decides: a copy asked for again is not done although an
        // older summary says so.
        if let Some(state) = md.properties().get(SNAPSHOT_PROPERTY) {
            return state == "done";
        }
        md.snapshots().any(|s| {
            s.summary()
                .additional_properties
                .get(SNAPSHOT_PROPERTY)
                .map(String::as_str)
                == Some("done")
        })
    }

    /// The table property `key`.
    pub fn property(&self, key: &str) -> Option<String> {
        self.table.metadata().properties().get(key).cloned()
    }

    /// The schema rows at `(lsn, seq)` of the source stream were written with, when a schema
    /// change was committed after that point (a replay meets it again); None when the
    /// current schema is in force there, or the older one is no longer in the metadata.
    /// A property that cannot be read is an error naming it.
    pub fn schema_at(&self, lsn: Lsn, seq: u64) -> Result<Option<Arc<Schema>>, String> {
        Ok(self
            .schema_changes_ahead()?
            .iter()
            .find(|e| (e.lsn, e.seq) > (lsn.get(), seq))
            .and_then(|e| self.table.metadata().schema_by_id(e.schema).cloned()))
    }

    /// The properties recording a schema change at `(lsn, seq)` (the current schema is the
    /// one before it), without the entries the source never sends again.
    pub fn schema_change_at(&self, lsn: Lsn, seq: u64) -> Result<HashMap<String, String>, String> {
        let mut entries = self.schema_changes_ahead()?;
        // A change met again (a replay) replaces its entry: the schema before it stays the
        // one first recorded.
        let first = entries
            .iter()
            .find(|e| (e.lsn, e.seq) == (lsn.get(), seq))
            .map_or(self.table.metadata().current_schema_id(), |e| e.schema);
        entries.retain(|e| (e.lsn, e.seq) < (lsn.get(), seq));
        entries.push(SchemaBefore {
            lsn: lsn.get(),
            seq,
            schema: first,
        });
        Ok(HashMap::from([(
            SCHEMA_BEFORE_PROPERTY.to_string(),
            format_schema_before(&entries),
        )]))
    }

    /// Table properties whose key starts with `prefix`.
    pub fn properties_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.table
            .metadata()
            .properties()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A metadata-only commit lands on whatever the catalog holds (a REST catalog has no
    /// requirement for properties): if another agent's data commit came in between, this
    /// sink must not take that state as its own view (its next data commit would then pass
    /// the fence), so it is fenced here.
    fn fence_on(&self, new: &Table) -> Result<(), SinkError> {
        let (was, now) = (
            self.table.metadata().properties(),
            new.metadata().properties(),
        );
        if let Some(k) = FENCED_PROPERTIES
            .iter()
            .find(|k| was.get(**k) != now.get(**k))
        {
            return Err(SinkError::Fenced {
                table: self.name(),
                reason: format!("{k} moved under a metadata update"),
            });
        }
        // Another writer's snapshot (a deposed leader's compaction step, say) may have moved
        // rows the mirror's key index points at: taken as this sink's view, later deletes
        // would name files no longer live. The pipeline reopens the table instead.
        let snapshot = |t: &Table| t.metadata().current_snapshot_id();
        if self.mirror.is_some() && snapshot(new) != snapshot(&self.table) {
            return Err(SinkError::Conflict(format!(
                "another writer committed a snapshot to {} under a metadata update: the mirror is opened again",
                self.name()
            )));
        }
        Ok(())
    }

    /// The position and writer this sink last saw: a commit fenced on them is refused if
    /// another agent committed data since (a new leader, while this one was cut off).
    fn fence(&self) -> Vec<(String, Option<String>)> {
        let seen = self.table.metadata().properties();
        FENCED_PROPERTIES
            .iter()
            .map(|k| (k.to_string(), seen.get(*k).cloned()))
            .collect()
    }

    /// What was pending is in the table at `lsn`: start the next batch empty.
    fn settled(&mut self, lsn: Lsn) {
        self.pending.clear();
        self.pending_rows = 0;
        self.pending_bytes = 0;
        self.last_lsn = lsn;
        if let Some(m) = self.mirror.as_mut() {
            m.committed();
        }
    }

    /// The progress of an unfinished initial snapshot (its last chunk commit), if any.
    pub fn snapshot_progress(&self) -> Option<String> {
        let md = self.table.metadata();
        match md.properties().get(SNAPSHOT_PROPERTY).map(String::as_str) {
            Some("partial") => return md.properties().get(SNAPSHOT_PROGRESS_PROPERTY).cloned(),
            Some(_) => return None,
            None => {}
        }
        let mut cur = md.current_snapshot();
        while let Some(s) = cur {
            let p = &s.summary().additional_properties;
            match p.get(SNAPSHOT_PROPERTY).map(String::as_str) {
                Some("partial") => return p.get(SNAPSHOT_PROGRESS_PROPERTY).cloned(),
                Some(_) => return None,
                None => {}
            }
            cur = s.parent_snapshot_id().and_then(|id| md.snapshot_by_id(id));
        }
        None
    }

    /// `commit` with extra snapshot-summary properties.
    pub async fn commit_with(
        &mut self,
        lsn: Lsn,
        extra: &[(&str, &str)],
    ) -> Result<Committed, SinkError> {
        self.finish_files().await?;
        let nothing = match &self.mirror {
            Some(m) => !m.is_dirty(),
            None => self.pending.is_empty(),
        };
        // Nothing to add and nothing to record (an empty table's snapshot marker still
        // needs its snapshot, or the copy would run again after every restart).
        if nothing && extra.is_empty() {
            self.last_lsn = self.last_lsn.max(lsn);
            if let Some(m) = self.mirror.as_mut() {
                m.committed();
            }
            return Ok(Committed::default());
        }
        let (added, removed) = match self.mirror.as_mut() {
            Some(m) => m.change(&self.table).await?,
            None => (self.pending.clone(), HashSet::new()),
        };
        let data = added.iter().filter(|f| is_data(f.content_type())).count();
        let deletes = added.len() - data;
        let base = self.table.metadata().current_snapshot_id();
        // The same state also goes into table properties, in the same commit: snapshot
        // expiry (ours or a maintenance job's) removes old summaries, never properties.
        let state: HashMap<String, String> =
            // The contract stores the number, not PostgreSQL's X/Y form.
            [
                (LSN_PROPERTY.to_string(), lsn.get().to_string()),
                (WRITER_PROPERTY.to_string(), writer_id().to_string()),
            ]
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        // Fenced on the position and writer this sink last saw: if another agent committed
        // data since (a new leader, while this one was cut off), this commit must not land.
        let seen = self.table.metadata().properties();
        // Schema-change entries the source no longer sends go (the schemas they keep from
        // expiry with them); one that cannot be read stays for the stream to report.
        let mut properties = state.clone();
        if let (Some(was), Ok(ahead)) = (
            seen.get(SCHEMA_BEFORE_PROPERTY),
            self.schema_changes_ahead(),
        ) {
            let now = format_schema_before(&ahead);
            if *was != now {
                properties.insert(SCHEMA_BEFORE_PROPERTY.to_string(), now);
            }
        }
        let fence = self.fence();
        let change = Change {
            operation: operation_for(data, deletes + removed.len(), false),
            added,
            removed,
            summary: state,
            properties,
            requires_live: self
                .mirror
                .as_ref()
                .map(|m| m.delete_targets())
                .unwrap_or_default(),
            fence,
            restated: HashMap::new(),
        };
        // Appends commute: another writer's commit costs a new manifest list, not a rewrite.
        let result = self
            .committer
            .commit_snapshot(&self.table, &change, COMMIT_ATTEMPTS)
            .await;
        match result {
            Ok((table, conflicts)) => {
                // Another writer's commit since our last look counts as a (resolved) conflict,
                // whether the committer saw it before publishing or its compare-and-swap did.
                let parent = table
                    .metadata()
                    .current_snapshot()
                    .and_then(|s| s.parent_snapshot_id());
                let conflicts = conflicts.max(u32::from(parent != base));
                if conflicts > 0 {
                    tracing::info!(table = %self.name(), conflicts, "another writer committed first; append finished on the new table state");
                }
                super::debt::added(table.identifier(), data as u64);
                self.table = table;
                self.settled(lsn);
                if parent != base {
                    if let Some(m) = self.mirror.as_mut() {
                        // Another writer's snapshot in between may have rewritten files the
                        // key index points into: rebuilt from the table as committed.
                        m.reload(&self.table).await?;
                    }
                }
                Ok(Committed {
                    conflicts,
                    delete_files: deletes as u64,
                    rows_deleted: change
                        .added
                        .iter()
                        .filter(|f| !is_data(f.content_type()))
                        .map(|f| f.record_count())
                        .sum(),
                })
            }
            Err(e) => {
                let msg = super::catalog::scrub(e.to_string(), &self.secrets);
                // Reload: the commit may have landed although an error was reported.
                if let Ok(table) = self
                    .committer
                    .catalog()
                    .load_table(self.table.identifier())
                    .await
                {
                    // Commits at one LSN (a snapshot's chunks) differ by their properties;
                    // another agent's commit at or past `lsn` is not ours.
                    let lsn_text = lsn.get().to_string();
                    let mut ours = vec![
                        (LSN_PROPERTY, lsn_text.as_str()),
                        (WRITER_PROPERTY, writer_id()),
                    ];
                    ours.extend_from_slice(extra);
                    let landed = has_properties(&table, &ours);
                    self.table = table;
                    if landed {
                        self.settled(lsn);
                        return Ok(Committed::default());
                    }
                }
                if let Some(m) = self.mirror.as_mut() {
                    m.abandon();
                }
                if matches!(e, CommitError::Fenced(_)) {
                    Err(SinkError::Fenced {
                        table: self.name(),
                        reason: msg,
                    })
                } else if matches!(e, CommitError::Conflict(_) | CommitError::Rebase(_)) {
                    Err(SinkError::Conflict(msg))
                } else {
                    Err(SinkError::Commit(msg))
                }
            }
        }
    }

    /// Run a mirror's compaction step if its files call for one (right after a commit, with
    /// nothing staged): `None` when there was nothing to do. Any failure leaves the table and
    /// the index as they were (an unknown commit outcome rebuilds the index from the table).
    pub async fn compact_mirror(&mut self) -> Result<Option<Compacted>, SinkError> {
        // A deposed leader's step must not land after the new leader's data commit.
        let fence = self.fence();
        let Some(m) = self.mirror.as_mut() else {
            return Ok(None);
        };
        let rw = match m.rewrite(&self.table).await {
            Ok(Some(rw)) => rw,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Files gone while the step read them because another writer replaced the
                // table meanwhile (a leader that took over expired them): a conflict.
                let moved = self
                    .committer
                    .catalog()
                    .load_table(self.table.identifier())
                    .await
                    .is_ok_and(|now| now.metadata_location() != self.table.metadata_location());
                return Err(if moved {
                    SinkError::Conflict(e.to_string())
                } else {
                    e
                });
            }
        };
        if rw.is_empty() {
            return Ok(None);
        }
        let change = Change {
            operation: iceberg::spec::Operation::Replace,
            added: rw.added.clone(),
            removed: rw.removed.clone(),
            summary: HashMap::from([(
                super::maintenance::MAINTENANCE_PROPERTY.to_string(),
                "compact".to_string(),
            )]),
            properties: HashMap::new(),
            requires_live: HashSet::new(),
            fence,
            restated: HashMap::new(),
        };
        // One attempt: another writer's commit in between may have touched the same files;
        // the next step plans again on the table as it then is.
        match self
            .committer
            .commit_snapshot(&self.table, &change, 1)
            .await
        {
            Ok((table, _)) => {
                self.table = table;
                Ok(Some(m.compacted(rw)))
            }
            Err(e) => {
                let msg = super::catalog::scrub(e.to_string(), &self.secrets);
                if matches!(e, CommitError::Unknown(_)) {
                    // Until the reload succeeds the mirror refuses writes (the pipeline then
                    // reopens its tables and rebuilds the index).
                    match self
                        .committer
                        .catalog()
                        .load_table(self.table.identifier())
                        .await
                    {
                        Ok(table) => {
                            self.table = table;
                            m.reload(&self.table).await?;
                        }
                        Err(le) => {
                            let le = catalog_err(le, &self.secrets);
                            m.reload_failed(&le);
                            return Err(le);
                        }
                    }
                } else {
                    m.forget(&self.table, rw).await;
                }
                Err(match e {
                    CommitError::Conflict(_) | CommitError::Rebase(_) => SinkError::Conflict(msg),
                    CommitError::Fenced(_) => SinkError::Fenced {
                        table: self.name(),
                        reason: msg,
                    },
                    _ => SinkError::Commit(msg),
                })
            }
        }
    }
}
